//! Failures as people and clients see them: a missing or failing mkfs
//! reaches the client as the option error's message; bad command lines get
//! one line on stderr and a nonzero exit; no activation means exit 2.

use crate::common::nbdraw::{self, GoReply};
use crate::common::*;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::Duration;

/// The first line mkfs.xfs prints for a disk below its minimum size, as this
/// machine's xfsprogs words it.
fn xfs_too_small_message(dir: &TestDir) -> String {
    let img = dir.join("probe-xfs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let out = run("mkfs.xfs", cmd("mkfs.xfs", &[img.to_str().unwrap()]));
    assert!(
        !out.status.success(),
        "mkfs.xfs must refuse a 16 MiB disk for this test to mean anything"
    );
    std::fs::remove_file(&img).unwrap();
    out.stderr
        .lines()
        .find(|l| !l.trim().is_empty())
        .expect("mkfs.xfs printed nothing")
        .trim()
        .to_string()
}

/// Real clients connecting to `server` must fail and show the server's
/// reason `needle`: qemu-io prints the option error's message ("server
/// reported: ..."); libnbd (1.14) only shows it in its debug output, so
/// nbdinfo runs with LIBNBD_DEBUG=1.
fn clients_fail_with(server: &Server, needle: &str, what: &str) {
    let mut c = cmd("nbdinfo", &["--size", server.uri()]);
    c.env("LIBNBD_DEBUG", "1");
    let out = run("nbdinfo", c);
    assert!(
        !out.status.success(),
        "{what}: nbdinfo must fail\n{}",
        out.describe()
    );
    assert!(
        out.stderr
            .lines()
            .any(|l| l.contains("server error message") && l.contains(needle)),
        "{what}: nbdinfo (libnbd debug) must show the server's error message with {needle:?}\n{}",
        out.describe()
    );

    let out = run(
        "qemu-io",
        cmd("qemu-io", &["-f", "raw", "-c", "read 0 512", server.uri()]),
    );
    assert!(
        !out.status.success(),
        "{what}: qemu-io must fail\n{}",
        out.describe()
    );
    assert!(
        out.stderr.contains(needle),
        "{what}: qemu-io must show the server's reason {needle:?}\n{}",
        out.describe()
    );
}

#[test]
fn missing_mkfs_is_reported_to_the_client() {
    require(&["nbdinfo", "qemu-io"]);
    let dir = TestDir::new("nosuchfs");
    let mut server = Server::unix(&dir, &["--type", "nosuchfs", "64M"]);
    clients_fail_with(&server, "mkfs.nosuchfs", "--type nosuchfs");
    // The listener survives its child's failure and answers the next client
    // the same way.
    assert!(
        server.proc.try_status().is_none(),
        "the --unix listener must survive a missing mkfs in its child\n{}",
        server.proc.describe()
    );
    clients_fail_with(&server, "mkfs.nosuchfs", "--type nosuchfs, second client");

    // A known type whose tool is not installed names the package.
    if find_tool("mkfs.btrfs").is_none() {
        let dir2 = TestDir::new("btrfs");
        let server2 = Server::unix(&dir2, &["--type", "btrfs", "256M"]);
        clients_fail_with(&server2, "btrfs-progs", "--type btrfs without mkfs.btrfs");
    } else {
        eprintln!("note: mkfs.btrfs is installed; not checking the package hint for btrfs");
    }
}

#[test]
fn mkfs_failure_reaches_the_client() {
    require(&["nbdinfo", "qemu-io", "mkfs.xfs"]);
    let dir = TestDir::new("xfs-too-small");
    let message = xfs_too_small_message(&dir);
    let mut server = Server::unix(&dir, &["--type", "xfs", "16M"]);
    clients_fail_with(&server, &message, "mkfs.xfs on 16 MiB");
    assert!(
        server.proc.try_status().is_none(),
        "the --unix listener must survive a failing mkfs in its child\n{}",
        server.proc.describe()
    );
    server.proc.wait_stderr(&message, Duration::from_secs(5));
}

#[test]
fn failing_command_reaches_the_client() {
    require(&["nbdinfo", "qemu-io"]);
    let dir = TestDir::new("command-fails");
    let server = Server::unix(
        &dir,
        &[
            "--command",
            "echo 'the command went wrong' >&2; exit 3",
            "64M",
        ],
    );
    clients_fail_with(&server, "the command went wrong", "a failing --command");
}

/// Runs `tmpdisk --stdio ARGS` on one end of a socket pair, negotiates GO by
/// hand, and returns the GO reply, the exit status and stderr.
fn stdio_go(dir: &TestDir, args: &[&str]) -> (GoReply, std::process::ExitStatus, String) {
    let images = dir.subdir("images");
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(DEADLINE)).unwrap();
    let theirs2 = theirs.try_clone().unwrap();
    let mut c = tmpdisk_cmd(&["--stdio", "--tmpdir", images.to_str().unwrap()]);
    c.args(args)
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::from(OwnedFd::from(theirs2)));
    // Proc::spawn would replace stdin/stdout; spawn by hand with stderr kept.
    c.stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawning tmpdisk --stdio");
    drop(c); // our copies of the child's socket end
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let reply = nbdraw::handshake(&mut ours)
        .and_then(|_| nbdraw::opt_go(&mut ours))
        .unwrap_or_else(|e| {
            let _ = child.kill();
            panic!("negotiating with tmpdisk --stdio: {e}")
        });
    // Like a real client after a failed GO: hang up. (The server may wait for
    // further options until then, as the protocol allows.)
    drop(ours);
    let end = std::time::Instant::now() + DEADLINE;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "tmpdisk --stdio did not exit within {DEADLINE:?} after failing and the client hanging up (reply {reply:?})"
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stderr = reader.join().unwrap();
    (reply, status, stderr)
}

#[test]
fn stdio_mkfs_failure_is_an_option_error_and_exit_1() {
    require(&["mkfs.xfs"]);
    let dir = TestDir::new("stdio-fail");
    let message = xfs_too_small_message(&dir);
    let (reply, status, stderr) = stdio_go(&dir, &["--type", "xfs", "16M"]);
    match &reply {
        GoReply::Err {
            reply_type,
            message: m,
        } => {
            assert!(
                m.len() <= 4096,
                "option error messages must be at most 4096 bytes (NBD strings), got {}",
                m.len()
            );
            assert!(
                m.contains(&message),
                "the GO error's message must carry mkfs's reason {message:?}, got {m:?} (type {reply_type:#x})"
            );
        }
        GoReply::Ok { .. } => panic!("GO must fail when mkfs fails, got {reply:?}"),
    }
    assert_eq!(
        status.code(),
        Some(1),
        "tmpdisk --stdio must exit 1 after mkfs failed; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains(&message),
        "the server must log mkfs's reason {message:?}; stderr:\n{stderr}"
    );
}

#[test]
fn stdio_missing_mkfs_is_an_option_error_and_exit_1() {
    let dir = TestDir::new("stdio-nosuchfs");
    let (reply, status, stderr) = stdio_go(&dir, &["--type", "nosuchfs", "64M"]);
    match &reply {
        GoReply::Err { message, .. } => assert!(
            message.contains("mkfs.nosuchfs"),
            "the GO error's message must name mkfs.nosuchfs, got {message:?}"
        ),
        GoReply::Ok { .. } => panic!("GO must fail without mkfs.nosuchfs, got {reply:?}"),
    }
    assert_eq!(
        status.code(),
        Some(1),
        "tmpdisk --stdio must exit 1; stderr:\n{stderr}"
    );
}

#[test]
fn invalid_values_give_one_line_and_nonzero_exit() {
    let dir = TestDir::new("invalid");
    let images = dir.subdir("images");
    let tmpdir = images.to_str().unwrap();
    // (what, arguments, environment)
    type Case<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, &'a str)]);
    let cases: &[Case] = &[
        ("size 0", &["0"], &[]),
        ("unknown suffix", &["5Q"], &[]),
        ("size above 2^63", &["9223372036854775809"], &[]),
        ("size above 2^64", &["18446744073709551616"], &[]),
        ("suffixed size above 2^64", &["16777216T"], &[]),
        ("size 0 from the environment", &[], &[("TMPDISK_SIZE", "0")]),
        // Accepted once, then every client process panicked adding the
        // duration to the clock (and with --stdio died by SIGSEGV under
        // the seccomp filter).
        (
            "handshake timeout 2^64-1",
            &["--handshake-timeout", "18446744073709551615", "1G"],
            &[],
        ),
        (
            "setup timeout 2^63",
            &["--setup-timeout", "9223372036854775808", "1G"],
            &[],
        ),
        // mkfs.fat refused it at every client's GO; mke2fs cut it short.
        (
            "a 12-character vfat label",
            &["-t", "vfat", "-L", "ABCDEFGHIJKL", "64M"],
            &[],
        ),
        (
            "a 13-character xfs label",
            &["-t", "xfs", "-L", "abcdefghijklm", "1G"],
            &[],
        ),
        (
            "a 17-byte ext4 label from the environment",
            &["1G"],
            &[("TMPDISK_LABEL", "abcdefghijklmnopq")],
        ),
        (
            "--proxy-protocol without --proxy-from",
            &["--proxy-protocol", "1G"],
            &[],
        ),
        (
            "--proxy-from without --proxy-protocol",
            &["--proxy-from", "10.0.0.5", "1G"],
            &[],
        ),
        (
            "a --proxy-from that is no address",
            &["1G"],
            &[
                ("TMPDISK_PROXY_PROTOCOL", "true"),
                ("TMPDISK_PROXY_FROM", "10.0.0.5,host"),
            ],
        ),
        (
            "a reconnect grace of 2^64-1",
            &["--reconnect-grace", "18446744073709551615", "1G"],
            &[],
        ),
        (
            "reply timeout 2^64-1 from the environment",
            &["1G"],
            &[("TMPDISK_REPLY_TIMEOUT", "18446744073709551615")],
        ),
        ("SIZE and --size both", &["--size", "2G", "3G"], &[]),
    ];
    let mut failures = Vec::new();
    for (what, args, env) in cases {
        let mut c = tmpdisk_cmd(&["--stdio", "--tmpdir", tmpdir]);
        c.args(*args);
        for (k, v) in *env {
            c.env(k, v);
        }
        let out = run(&format!("tmpdisk ({what})"), c);
        let lines = out.stderr.lines().filter(|l| !l.trim().is_empty()).count();
        if out.status.success() || lines != 1 {
            failures.push(format!(
                "{what} (args {args:?}, env {env:?}): expected a nonzero exit and one line on stderr\n{}",
                out.describe()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_dir_empty(&images, "after refused command lines");

    // A size is required.
    let out = run(
        "tmpdisk without size",
        tmpdisk_cmd(&["--stdio", "--tmpdir", tmpdir]),
    );
    assert!(
        !out.status.success(),
        "tmpdisk without a size must fail\n{}",
        out.describe()
    );
}

#[test]
fn missing_tmpdir_in_listener_modes_fails_before_listening() {
    let dir = TestDir::new("no-tmpdir");
    let missing = dir.join("does-not-exist");
    let sock = dir.join("nbd.sock");
    let port = free_port().to_string();
    let addr = format!("127.0.0.1:{port}");
    for (what, args) in [
        ("--unix", ["--unix", sock.to_str().unwrap()]),
        ("--listen", ["--listen", addr.as_str()]),
    ] {
        let mut c = tmpdisk_cmd(&args);
        c.args(["--tmpdir", missing.to_str().unwrap(), "64M"]);
        let out = run(&format!("tmpdisk {what} with a missing tmpdir"), c);
        assert!(
            !out.status.success(),
            "{what} with a missing --tmpdir must fail at start\n{}",
            out.describe()
        );
        assert_one_line(&out.stderr, what);
    }
    assert!(
        !sock.exists(),
        "no socket may be left behind when tmpdisk refuses to start"
    );
}

#[test]
fn no_activation_exits_2_naming_the_ways() {
    let dir = TestDir::new("no-activation");
    let images = dir.subdir("images");
    let tmpdir = images.to_str().unwrap();
    // No LISTEN_FDS at all; then LISTEN_FDS meant for another process.
    for env in [vec![], vec![("LISTEN_FDS", "1"), ("LISTEN_PID", "1")]] {
        let mut c = tmpdisk_cmd(&["--tmpdir", tmpdir, "64M"]);
        for (k, v) in &env {
            c.env(k, v);
        }
        let out = run("tmpdisk without activation", c);
        assert_eq!(
            out.status.code(),
            Some(2),
            "no activation (env {env:?}) must exit 2\n{}",
            out.describe()
        );
        for way in ["--stdio", "--listen", "--unix"] {
            assert!(
                out.stderr.contains(way),
                "the message must mention {way} (env {env:?})\n{}",
                out.describe()
            );
        }
    }
}

/// Client-controlled text cannot forge log lines: an export name with a
/// newline, an ANSI colour and a fake error appears escaped, on the one
/// line that logs it.
#[test]
fn client_text_cannot_forge_log_lines() {
    let dir = TestDir::new("forge");
    let mut server = Server::unix(&dir, &["--command", "true", "1M"]);
    let mut s = UnixStream::connect(dir.join("nbd.sock")).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    nbdraw::handshake(&mut s).unwrap();
    let name = "x\n\u{1b}[31mERROR client process crashed pid=1 signal=\"SIGSEGV\"\u{1b}[0m";
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    let replies = nbdraw::option(&mut s, nbdraw::OPT_GO, &data).unwrap();
    assert_eq!(replies.last().unwrap().0, nbdraw::REP_ACK);
    drop(s);
    server.proc.wait_stderr("client left", DEADLINE);
    let log = server.proc.stderr();
    assert!(
        !log.contains('\u{1b}'),
        "no escape character may reach the log:\n{log}"
    );
    assert!(
        log.lines()
            .all(|l| !l.trim_start().starts_with("ERROR client process crashed")),
        "a client forged a log line:\n{log}"
    );
    let served = served_lines(&log);
    assert_eq!(served.len(), 1, "{log}");
    assert!(
        served[0].contains(r"export=x\u{a}\u{1b}[31mERROR client process crashed"),
        "the export name must be logged escaped on its one line:\n{log}"
    );
}

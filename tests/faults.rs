//! Faults, each against the built binary with real clients (nbdinfo,
//! qemu-io, libnbd's python bindings) or the raw client of tests/common:
//! a full tmpdir, admission control, unusable tmpdirs, failing or hanging
//! mkfs and commands, signals at bad moments, clients that misbehave
//! (silent, slow, not reading, half-closing, pipelining hard), connection
//! floods and crashing children; and the serving process's lockdown
//! (no_new_privs and seccomp). Every wait has a deadline; mounts are undone
//! by guards; tests that need root fail (never skip) without it.

use crate::common::nbdraw::{self, Framing, GoReply, Reply};
use crate::common::*;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

// --- helpers ------------------------------------------------------------------------

/// `tmpdisk --stdio ARGS` on one end of a socket pair; the other end is
/// the test's.
fn stdio_server(cmd: std::process::Command) -> (Proc, UnixStream) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(DEADLINE)).unwrap();
    ours.set_write_timeout(Some(DEADLINE)).unwrap();
    let p = Proc::spawn_on("tmpdisk --stdio", cmd, OwnedFd::from(theirs));
    (p, ours)
}

/// Negotiates GO with a `--stdio` server built from `cmd`, hangs up, and
/// returns the GO reply, the exit status and the log (stderr).
fn stdio_go(cmd: std::process::Command) -> (GoReply, ExitStatus, String) {
    let (mut p, mut sock) = stdio_server(cmd);
    let reply = nbdraw::handshake(&mut sock)
        .and_then(|_| nbdraw::opt_go(&mut sock))
        .unwrap_or_else(|e| panic!("negotiating with tmpdisk --stdio: {e}\n{}", p.describe()));
    drop(sock);
    let status = p.wait();
    (reply, status, p.stderr())
}

/// Like [`stdio_go`], for a GO that must fail: returns the message the
/// client got, after checking that the log has it too and the exit code
/// is 1.
fn stdio_go_fails(cmd: std::process::Command, what: &str) -> String {
    let (reply, status, log) = stdio_go(cmd);
    let GoReply::Err { message, .. } = reply else {
        panic!("{what}: GO must fail, got {reply:?}\n{log}");
    };
    assert_eq!(
        status.code(),
        Some(1),
        "{what}: exit status 1 (the disk could not be built)\n{log}"
    );
    let first = message.lines().next().unwrap_or_default();
    assert!(
        log.contains(first.get(..first.len().min(60)).unwrap_or(first)),
        "{what}: the log must carry the client's message {message:?}\n--- log ---\n{log}"
    );
    message
}

/// qemu-io against `uri` must fail, printing the server's `needle`; so
/// must nbdinfo (libnbd shows the server's message in its debug output).
fn clients_refused(uri: &str, needle: &str, what: &str) {
    let out = run(
        "qemu-io",
        cmd("qemu-io", &["-f", "raw", "-c", "read 0 512", uri]),
    );
    assert!(
        !out.status.success() && out.stderr.contains(needle),
        "{what}: qemu-io must fail showing {needle:?}\n{}",
        out.describe()
    );
    let mut c = cmd("nbdinfo", &["--size", uri]);
    c.env("LIBNBD_DEBUG", "1");
    let out = run("nbdinfo", c);
    assert!(
        !out.status.success() && out.stderr.contains(needle),
        "{what}: nbdinfo must fail with the server's message {needle:?}\n{}",
        out.describe()
    );
}

/// qemu-io writes a pattern and reads it back.
fn qemu_io_round_trip(uri: &str, what: &str) {
    run_ok(
        what,
        cmd(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x5c 1M 1M",
                "-c",
                "read -P 0x5c 1M 1M",
                uri,
            ],
        ),
    );
}

/// A shell snippet that appends the running shell's pid, as this host
/// sees it, to $PIDS. (`$$` and `$!` are the pids inside the setup's PID
/// namespace; /proc is the host's, and /proc/self is the shell itself.)
macro_rules! record {
    () => {
        r#"read -r p _ < /proc/self/stat; echo "$p" >> "$PIDS""#
    };
}

/// The one process serving a client of the listener `server`.
fn serving_child(server: &Server) -> u32 {
    wait_live_children(server.pid(), 1, "one client connected")[0]
}

/// A raw client connected to a `--unix` listener in `dir`, negotiated.
fn raw_client(dir: &TestDir, framing: Framing, meta: bool) -> UnixStream {
    let mut s = UnixStream::connect(dir.join("nbd.sock")).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.set_write_timeout(Some(DEADLINE)).unwrap();
    nbdraw::negotiate(&mut s, framing, meta).expect("negotiating");
    s
}

/// The pids a `--command` wrote to the file named by $PIDS.
fn pids_in(path: &Path, n: usize) -> Vec<u32> {
    wait_lines(path, n, DEADLINE)
        .iter()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

/// Kills what a failing test would otherwise leave running (the very
/// orphans it checks for), whether the test passes or not.
struct KillOnDrop(Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &p in &self.0 {
            if alive(p) {
                send_signal(p, libc::SIGKILL);
            }
        }
    }
}

// --- the disk fills up ----------------------------------------------------------------

#[test]
fn full_tmpdir_gives_enospc_keeps_reads_and_recovers() {
    require_root("it mounts a 64 MiB tmpfs as the tmpdir");
    require(&["python3-nbd", "qemu-io", "nbdinfo"]);
    let dir = TestDir::new("full");
    let mnt = Mount::tmpfs(&dir.join("mnt"), 64);
    // A 256 MiB raw disk (no mkfs) on a 64 MiB filesystem.
    let server = Server::start_in(
        &dir,
        Mode::Unix,
        mnt.path(),
        &["--command", "true", "256M"],
        &[],
    );
    let script = r#"
import errno
h = connect(sys.argv[1])
chunk = 1 << 20
first = b'\xab' * chunk
n, err = 0, None
while n < 256:
    try:
        h.pwrite(first if n == 0 else bytes([n % 251 + 1]) * chunk, n * chunk)
    except nbd.Error as e:
        err = e
        break
    n += 1
check(err is not None, 'writing 256 MiB to a 64 MiB filesystem never failed')
check(err.errnum == errno.ENOSPC, 'the failed write must be ENOSPC, got %r' % (err,))
check(n >= 16, 'only %d MiB were written before ENOSPC' % n)
# The session goes on: reads work, and so does everything written before.
check(h.pread(chunk, 0) == first, 'first MiB reads back after ENOSPC')
check(h.pread(chunk, (n - 1) * chunk) == bytes([(n - 1) % 251 + 1]) * chunk, 'last good MiB')
h.flush()
# Trimming frees space: writing works again.
h.trim(8 * chunk, 0)
h.pwrite(b'\x5a' * chunk, 0)
check(h.pread(chunk, 0) == b'\x5a' * chunk, 'a write after TRIM freed space')
print('WROTE', n, flush=True)
h.shutdown()
"#;
    let out = run_ok(
        "libnbd client filling the disk",
        python(script, &[server.uri()]),
    );
    assert!(out.stdout.contains("WROTE"), "{}", out.describe());
    wait_no_image_holders(mnt.path(), "after the client filled the tmpdir and left");
    assert_dir_empty(mnt.path(), "after the client that filled it left");
    wait_children_reaped(
        server.pid(),
        0,
        "after the client that filled the tmpdir left",
    );
    assert!(
        mnt.free() > 60 * MIB,
        "the space must be back once the client left: {} bytes free",
        mnt.free()
    );
    // The listener survived, and the next client is served normally.
    qemu_io_round_trip(server.uri(), "qemu-io after the disk was full");
    nbdinfo_ok(&["--size", server.uri()]);
    let log = server.proc.stderr();
    assert!(
        !log.contains("crashed") && !log.contains("panick"),
        "nothing may crash when the tmpdir fills up\n{log}"
    );
}

// --- admission control ----------------------------------------------------------------

#[test]
fn min_free_refuses_new_clients_with_the_reason_and_logs_it() {
    require_root("it mounts a 64 MiB tmpfs as the tmpdir");
    require(&["qemu-io", "nbdinfo"]);
    let dir = TestDir::new("min-free");
    let mnt = Mount::tmpfs(&dir.join("mnt"), 64);
    let mut server = Server::start_in(
        &dir,
        Mode::Unix,
        mnt.path(),
        &["--min-free", "16M", "--command", "true", "1G"],
        &[],
    );
    // Plenty of space: admitted.
    nbdinfo_ok(&["--size", server.uri()]);
    // Leave 8 MiB of 64: below --min-free 16M.
    let ballast = mnt.path().join("ballast");
    std::fs::write(&ballast, vec![1u8; 56 << 20]).unwrap();
    clients_refused(
        server.uri(),
        "not enough free space",
        "--min-free 16M with 8 MiB free",
    );
    server.proc.wait_stderr(
        "refusing a client: not enough free space",
        Duration::from_secs(5),
    );
    assert!(
        server.proc.try_status().is_none(),
        "the listener must survive refusing clients\n{}",
        server.proc.describe()
    );
    assert_eq!(
        dir_entries(mnt.path()),
        ["ballast"],
        "a refused client must not create anything in the tmpdir"
    );
    // Space is back: admitted again.
    std::fs::remove_file(&ballast).unwrap();
    qemu_io_round_trip(server.uri(), "qemu-io once space is back");
    drop(server);

    // A percentage, from the environment, told to a --stdio client.
    std::fs::write(&ballast, vec![1u8; 40 << 20]).unwrap();
    let mut c = tmpdisk_cmd(&["--stdio", "--tmpdir", mnt.path().to_str().unwrap()]);
    c.args(["--command", "true", "1G"])
        .env("TMPDISK_MIN_FREE", "50%");
    let msg = stdio_go_fails(c, "TMPDISK_MIN_FREE=50% with 24 of 64 MiB free");
    assert!(
        msg.contains("not enough free space") && msg.contains("50%"),
        "the refusal must say why, with the threshold: {msg:?}"
    );
}

// --- unusable tmpdirs -------------------------------------------------------------------

#[test]
fn missing_or_non_directory_tmpdir_is_a_clear_error() {
    let dir = TestDir::new("bad-tmpdir");
    let missing = dir.join("does-not-exist");
    let file = dir.join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    for (path, reason) in [
        (&missing, "No such file or directory"),
        (&file, "Not a directory"),
    ] {
        let p = path.to_str().unwrap();
        let msg = stdio_go_fails(
            tmpdisk_cmd(&["--stdio", "--tmpdir", p, "64M"]),
            &format!("--stdio with tmpdir {p}"),
        );
        assert!(
            msg.contains(p) && msg.contains(reason),
            "the client's message must name the tmpdir and say {reason:?}: {msg:?}"
        );
        // A listener refuses to start at all: one line, exit 2.
        let sock = dir.join("nbd.sock");
        let out = run(
            "tmpdisk --unix",
            tmpdisk_cmd(&["--unix", sock.to_str().unwrap(), "--tmpdir", p, "64M"]),
        );
        assert_eq!(out.status.code(), Some(2), "{}", out.describe());
        assert!(
            out.stderr.contains(p) && !sock.exists(),
            "a listener with tmpdir {p} must fail at start naming it, without listening\n{}",
            out.describe()
        );
    }
    assert_eq!(dir_entries(dir.path()), ["a-file"], "nothing left behind");
}

#[test]
fn unwritable_tmpdir_is_a_clear_error() {
    require_root("it runs the server as user nobody with setpriv");
    let dir = TestDir::new("unwritable");
    let images = dir.subdir("images"); // root's, mode 0755
    let p = images.to_str().unwrap();
    let c = wrapped_tmpdisk_cmd(
        &[
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
        ],
        &["--stdio", "--tmpdir", p, "64M"],
    );
    let msg = stdio_go_fails(c, "an unwritable tmpdir");
    assert!(
        msg.contains(p) && msg.contains("Permission denied"),
        "the client's message must name the tmpdir and the reason: {msg:?}"
    );
    assert_dir_empty(&images, "after a refused client");
}

#[test]
fn tmpdir_without_o_tmpfile_uses_the_unlinked_fallback_and_leaves_nothing() {
    require_root("it mounts a FUSE filesystem (bindfs) as the tmpdir");
    require(&["bindfs", "python3-nbd", "mkfs.ext4"]);
    let dir = TestDir::new("no-tmpfile");
    let mnt = Mount::bindfs(&dir.join("backing"), &dir.join("mnt"));
    // The premise: this filesystem really has no O_TMPFILE.
    let probe = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .mode(0o600)
            .open(mnt.path())
    };
    assert!(
        probe.is_err(),
        "bindfs accepted O_TMPFILE here; this test would not test the fallback"
    );
    let server = Server::start_in(&dir, Mode::Unix, mnt.path(), &["64M"], &[]);
    let client = HeldClient::start(
        "h = connect(sys.argv[1])\nh.pwrite(b'\\x77' * 65536, 1 << 20)",
        "check(h.pread(65536, 1 << 20) == b'\\x77' * 65536, 'read back')\nh.shutdown()",
        &[server.uri()],
    );
    let holders = image_holders(mnt.path());
    assert!(
        !holders.is_empty() && holders.iter().all(|(_, t)| t.ends_with(" (deleted)")),
        "the image must be open but already unlinked: {holders:?}"
    );
    // libfuse keeps an unlinked open file under a .fuse_hidden* name until
    // it is closed; the server's own private name must be gone.
    let ours_only = |when: &str| {
        let names = dir_entries(mnt.path());
        assert!(
            names.iter().all(|n| n.starts_with(".fuse_hidden")),
            "{when}: the tmpdir must hold no name of the server's: {names:?}"
        );
    };
    ours_only("while serving (the fallback unlinks at once)");
    client.finish();
    wait_no_image_holders(mnt.path(), "after the client left");
    wait_dir_empty(mnt.path(), "after the client left");

    // Even SIGKILL of the serving process leaves nothing.
    let _held = HeldClient::start("h = connect(sys.argv[1])", "", &[server.uri()]);
    let child = serving_child(&server);
    ours_only("while serving the second client");
    send_signal(child, libc::SIGKILL);
    wait_no_image_holders(mnt.path(), "after SIGKILL of the serving process");
    wait_dir_empty(mnt.path(), "after SIGKILL of the serving process");
    assert_dir_empty(&dir.join("backing"), "the filesystem under the FUSE mount");
}

/// Waits (boundedly) for a directory to become empty: FUSE removes its
/// hidden names shortly after the last close.
fn wait_dir_empty(dir: &Path, when: &str) {
    let end = Instant::now() + Duration::from_secs(10);
    while !dir_entries(dir).is_empty() && Instant::now() < end {
        thread::sleep(Duration::from_millis(20));
    }
    assert_dir_empty(dir, when);
}

// --- mkfs missing or failing -----------------------------------------------------------------

#[test]
fn missing_mkfs_names_the_package() {
    // Types tmpdisk knows the package of, whose tools CI does not install.
    let candidates = [
        ("btrfs", "btrfs-progs"),
        ("f2fs", "f2fs-tools"),
        ("jfs", "jfsutils"),
        ("nilfs2", "nilfs-tools"),
        ("reiserfs", "reiserfsprogs"),
        ("udf", "udftools"),
        ("exfat", "exfatprogs"),
        ("ntfs", "ntfs-3g"),
    ];
    let (fs_type, package) = candidates
        .iter()
        .find(|(t, _)| find_tool(&format!("mkfs.{t}")).is_none())
        .expect("every candidate mkfs is installed; add one that is not");
    let dir = TestDir::new("missing-mkfs");
    let images = dir.subdir("images");
    let msg = stdio_go_fails(
        tmpdisk_cmd(&[
            "--stdio",
            "--tmpdir",
            images.to_str().unwrap(),
            "-t",
            fs_type,
            "512M",
        ]),
        &format!("--type {fs_type} without mkfs.{fs_type}"),
    );
    assert!(
        msg.contains(&format!("mkfs.{fs_type}")) && msg.contains(package),
        "the message must name mkfs.{fs_type} and the package {package}: {msg:?}"
    );
    assert_dir_empty(&images, "after mkfs was missing");
}

/// The first non-empty line mkfs.TYPE prints on stderr for these
/// arguments on a file of `size` bytes (it must fail).
fn mkfs_message(dir: &TestDir, fs_type: &str, args: &[&str], size: u64) -> String {
    let img = dir.join(&format!("probe-{fs_type}.img"));
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    let mut a: Vec<&str> = args.to_vec();
    a.push(img.to_str().unwrap());
    let out = run("mkfs", cmd(&format!("mkfs.{fs_type}"), &a));
    assert!(
        !out.status.success(),
        "mkfs.{fs_type} {args:?} must fail for this test to mean anything"
    );
    std::fs::remove_file(&img).unwrap();
    out.stderr
        .lines()
        .find(|l| !l.trim().is_empty())
        .expect("mkfs printed nothing on stderr")
        .trim()
        .to_string()
}

#[test]
fn mkfs_failures_reach_the_client_and_the_log() {
    require(&["mkfs.vfat", "mkfs.xfs"]);
    let dir = TestDir::new("mkfs-fails");
    let images = dir.subdir("images");
    let t = images.to_str().unwrap();
    // (A label too long for vfat made a good example until tmpdisk began
    // refusing such labels at start; an impossible FAT size still fails.)
    for (fs_type, size, mkfs_args, args) in [
        (
            "vfat",
            64 * MIB,
            vec!["-F", "99"],
            vec![
                "-t",
                "vfat",
                "--mkfs-option",
                "-F",
                "--mkfs-option",
                "99",
                "64M",
            ],
        ),
        ("xfs", 16 * MIB, vec![], vec!["-t", "xfs", "16M"]),
    ] {
        let expected = mkfs_message(&dir, fs_type, &mkfs_args, size);
        let mut c = tmpdisk_cmd(&["--stdio", "--tmpdir", t]);
        c.args(&args);
        let msg = stdio_go_fails(c, &format!("mkfs.{fs_type} failing"));
        assert!(
            msg.contains(&expected) && msg.contains(&format!("mkfs.{fs_type}")),
            "the client must get mkfs.{fs_type}'s own message {expected:?}: {msg:?}"
        );
        assert_dir_empty(&images, "after mkfs failed");
    }
}

// --- --command failing, dying, hanging, chattering ------------------------------------------

#[test]
fn command_exit_status_and_signal_reach_the_client() {
    let dir = TestDir::new("command-fails");
    let images = dir.subdir("images");
    let t = images.to_str().unwrap();
    for (command, needles) in [
        (
            "echo 'no good disk today' >&2; exit 7",
            &["exit status 7", "no good disk today"][..],
        ),
        (
            "echo 'about to die' >&2; kill -KILL $$",
            &["signal 9", "SIGKILL", "about to die"][..],
        ),
    ] {
        let msg = stdio_go_fails(
            tmpdisk_cmd(&["--stdio", "--tmpdir", t, "--command", command, "64M"]),
            command,
        );
        for n in needles {
            assert!(msg.contains(n), "--command {command:?}: {n:?} in {msg:?}");
        }
    }
    assert_dir_empty(&images, "after failed commands");
}

/// `c`, a `tmpdisk --stdio ... --setup-timeout 2` whose setup never ends
/// by itself: the client hears about the timeout, within 10 s.
fn fails_by_a_2s_setup_timeout(c: std::process::Command, what: &str) {
    let started = Instant::now();
    let msg = stdio_go_fails(c, what);
    let took = started.elapsed();
    assert!(
        msg.contains("did not finish within 2 s"),
        "{what}: the client must hear about the setup timeout: {msg:?}"
    );
    assert!(
        took < Duration::from_secs(10),
        "{what}: --setup-timeout 2 took {took:?}"
    );
}

/// Where close_range is refused (a kernel before 5.9; a seccomp policy
/// that does not know it: here a filter tmpdisk inherits makes it fail
/// with ENOSYS), the fds are closed one by one instead. Before, the
/// stand-in then kept std's exec-status pipe open, so spawning the command
/// waited for the command itself: no setup timeout, no client watch, no
/// stop signal until it ended. The command also checks that an fd tmpdisk
/// inherited without close-on-exec (9) did not reach it.
#[test]
fn without_close_range_the_setup_timeout_still_holds() {
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};
    use std::os::unix::process::CommandExt;
    let dir = TestDir::new("no-close-range");
    let images = dir.subdir("images");
    let mut c = tmpdisk_cmd(&[
        "--stdio",
        "--tmpdir",
        images.to_str().unwrap(),
        "--setup-timeout",
        "2",
        "--command",
        r#"if [ -e /proc/self/fd/9 ]; then echo "fd 9 reached the command" >&2; exit 3; fi; sleep 20"#,
        "64M",
    ]);
    let filter: BpfProgram = SeccompFilter::new(
        [(libc::SYS_close_range, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        std::env::consts::ARCH.try_into().unwrap(),
    )
    .and_then(TryInto::try_into)
    .unwrap();
    let stray = std::fs::File::open("/dev/null").unwrap();
    let stray_fd = stray.as_raw_fd();
    // SAFETY: dup2 and the prctl/seccomp calls of apply_filter are
    // async-signal-safe; the filter was built before the fork.
    unsafe {
        c.pre_exec(move || {
            if libc::dup2(stray_fd, 9) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            seccompiler::apply_filter(&filter).map_err(std::io::Error::other)
        });
    }
    fails_by_a_2s_setup_timeout(c, "a command that sleeps past it, without close_range");
    assert_dir_empty(&images, "after the setup timeout");
}

#[test]
fn hanging_command_is_killed_with_its_whole_process_group() {
    let dir = TestDir::new("command-hangs");
    let images = dir.subdir("images");
    let pids = dir.join("pids");
    let mut c = tmpdisk_cmd(&[
        "--stdio",
        "--tmpdir",
        images.to_str().unwrap(),
        "--setup-timeout",
        "2",
        "--command",
        concat!(
            record!(),
            "; (",
            record!(),
            "; exec sleep 1000) & sleep 1000"
        ),
        "64M",
    ]);
    c.env("PIDS", &pids);
    fails_by_a_2s_setup_timeout(c, "a command that never returns");
    let pids = pids_in(&pids, 2);
    let _reaper = KillOnDrop(pids.clone());
    let left = wait_gone(&pids, Duration::from_secs(5));
    assert!(
        left.is_empty(),
        "the command's processes {left:?} (of {pids:?}) outlived the setup timeout"
    );
    assert_dir_empty(&images, "after the setup timeout");
}

#[test]
fn command_stdout_never_reaches_a_stdio_client() {
    let dir = TestDir::new("command-stdout");
    let images = dir.subdir("images");
    let noise = "echo GARBAGE-ON-STDOUT; echo GARBAGE-ON-DEV-STDOUT > /dev/stdout; \
                 printf GARBAGE-ON-FD1 >&1; echo GARBAGE-ON-FD1-PATH > /proc/self/fd/1";
    let (mut p, mut sock) = stdio_server(tmpdisk_cmd(&[
        "--stdio",
        "--tmpdir",
        images.to_str().unwrap(),
        "--command",
        noise,
        "1M",
    ]));
    // Negotiation must parse cleanly (stray bytes would break it)...
    let size = nbdraw::negotiate(&mut sock, Framing::Simple, false)
        .unwrap_or_else(|e| panic!("negotiation broke: {e}\n{}", p.describe()));
    assert_eq!(size, 1 << 20);
    // ...and so must everything after it, up to the end of the stream.
    sock.write_all(&nbdraw::request(
        Framing::Simple,
        0,
        nbdraw::CMD_READ,
        7,
        0,
        4096,
        &[],
    ))
    .unwrap();
    let r = nbdraw::read_reply(&mut sock, Framing::Simple, Some(4096)).unwrap();
    assert_eq!((r.cookie(), r.error()), (7, 0));
    sock.write_all(&nbdraw::request(
        Framing::Simple,
        0,
        nbdraw::CMD_DISC,
        8,
        0,
        0,
        &[],
    ))
    .unwrap();
    let mut rest = Vec::new();
    sock.read_to_end(&mut rest).unwrap();
    assert!(
        rest.is_empty(),
        "bytes after DISC: {:?}",
        String::from_utf8_lossy(&rest)
    );
    let status = p.wait();
    assert!(status.success(), "{}", p.describe());
    assert!(
        !p.stderr().contains("GARBAGE"),
        "the command's stdout must go nowhere (not even the log)\n{}",
        p.stderr()
    );
}

// --- signals ---------------------------------------------------------------------------------

/// The command used while mkfs "runs": a shell with a child of its own,
/// both recorded in $PIDS.
const SLOW_SETUP: &str = concat!(record!(), "; (", record!(), "; exec sleep 1000) & wait");

fn sigterm_during_setup(listener: bool) {
    let what = if listener { "--unix" } else { "--stdio" };
    let dir = TestDir::new(if listener {
        "term-setup-unix"
    } else {
        "term-setup-stdio"
    });
    let images = dir.subdir("images");
    let pids = dir.join("pids");
    let env = [("PIDS", pids.to_str().unwrap())];
    let args = ["--command", SLOW_SETUP, "64M"];
    let (mut server, _client): (Proc, Box<dyn std::any::Any>) = if listener {
        let s = Server::start_in(&dir, Mode::Unix, &images, &args, &env);
        let mut sock = UnixStream::connect(dir.join("nbd.sock")).unwrap();
        nbdraw::handshake(&mut sock).unwrap();
        // GO without waiting for the answer: the server is now in setup.
        sock.write_all(&{
            let mut m = nbdraw::IHAVEOPT.to_be_bytes().to_vec();
            m.extend_from_slice(&nbdraw::OPT_GO.to_be_bytes());
            m.extend_from_slice(&6u32.to_be_bytes());
            m.extend_from_slice(&[0; 6]);
            m
        })
        .unwrap();
        (s.proc, Box::new(sock))
    } else {
        let mut c = tmpdisk_cmd(&["--stdio", "--tmpdir", images.to_str().unwrap()]);
        c.args(args).env("PIDS", &pids);
        let (p, mut sock) = stdio_server(c);
        let reader = thread::spawn(move || {
            let _ = nbdraw::handshake(&mut sock).and_then(|_| nbdraw::opt_go(&mut sock));
            sock
        });
        (p, Box::new(reader))
    };
    let pids = pids_in(&pids, 2);
    let _reaper = KillOnDrop(pids.clone());
    let started = Instant::now();
    send_signal(server.pid(), libc::SIGTERM);
    let status = server.wait_timeout(Duration::from_secs(15));
    let took = started.elapsed();
    assert!(
        status.is_some() && took < Duration::from_secs(5),
        "{what}: tmpdisk must exit promptly on SIGTERM during setup (took {took:?}, status {status:?})\n{}",
        server.describe()
    );
    let left = wait_gone(&pids, Duration::from_secs(3));
    assert!(
        left.is_empty(),
        "{what}: the setup command's processes {left:?} (of {pids:?}, the shell and its child) outlived SIGTERM of the server"
    );
    wait_no_image_holders(&images, "after SIGTERM during setup");
    assert_dir_empty(&images, "after SIGTERM during setup");
}

#[test]
fn sigterm_during_setup_stdio_leaves_no_orphan() {
    sigterm_during_setup(false);
}

#[test]
fn sigterm_during_setup_listener_leaves_no_orphan() {
    sigterm_during_setup(true);
}

#[test]
fn sigkill_during_setup_takes_the_mkfs_child_and_the_image_along() {
    let dir = TestDir::new("kill-setup");
    let images = dir.subdir("images");
    let pids = dir.join("pids");
    let mut c = tmpdisk_cmd(&[
        "--stdio",
        "--tmpdir",
        images.to_str().unwrap(),
        "--command",
        concat!(record!(), "; exec sleep 1000"),
        "64M",
    ]);
    c.env("PIDS", &pids);
    let (mut server, mut sock) = stdio_server(c);
    let _reader = thread::spawn(move || {
        let _ = nbdraw::handshake(&mut sock).and_then(|_| nbdraw::opt_go(&mut sock));
    });
    let pids = pids_in(&pids, 1);
    let _reaper = KillOnDrop(pids.clone());
    let holders = wait_image_holders(&images, 2, "tmpdisk and its setup child hold the image");
    assert!(holders.contains(&pids[0]), "{holders:?} vs {pids:?}");
    // Only the server, as the OOM killer or an admin would.
    send_signal(server.pid(), libc::SIGKILL);
    server.wait();
    let left = wait_gone(&pids, Duration::from_secs(5));
    assert!(
        left.is_empty(),
        "the setup child {left:?} outlived SIGKILL of the server (PR_SET_PDEATHSIG)"
    );
    wait_no_image_holders(&images, "after SIGKILL during setup");
    assert_dir_empty(&images, "after SIGKILL during setup");
}

#[test]
fn sigterm_while_serving_exits_promptly_and_leaves_nothing() {
    require(&["python3-nbd"]);
    // Listener: it passes SIGTERM on to the serving children.
    let dir = TestDir::new("term-serving");
    let mut server = Server::unix(&dir, &["--command", "true", "64M"]);
    let _client = HeldClient::start(
        "h = connect(sys.argv[1])\nh.pwrite(b'x' * 4096, 0)",
        "",
        &[server.uri()],
    );
    let child = serving_child(&server);
    let started = Instant::now();
    send_signal(server.pid(), libc::SIGTERM);
    let status = server.proc.wait_timeout(Duration::from_secs(15));
    let took = started.elapsed();
    assert!(
        status.is_some_and(|s| s.success()) && took < Duration::from_secs(5),
        "the listener must stop within 5 s of SIGTERM with status 0 (took {took:?}, {status:?})\n{}",
        server.proc.describe()
    );
    assert!(!alive(child), "the serving child survived the listener");
    wait_no_image_holders(server.images(), "after SIGTERM while serving");
    assert_dir_empty(server.images(), "after SIGTERM while serving");
    server.proc.wait_stderr("stopping", Duration::from_secs(1));

    // --stdio: the one process.
    let images = dir.subdir("images-stdio");
    let (mut p, mut sock) = stdio_server(tmpdisk_cmd(&[
        "--stdio",
        "--tmpdir",
        images.to_str().unwrap(),
        "--command",
        "true",
        "64M",
    ]));
    nbdraw::negotiate(&mut sock, Framing::Structured, false).unwrap();
    let started = Instant::now();
    send_signal(p.pid(), libc::SIGTERM);
    let status = p.wait_timeout(Duration::from_secs(15));
    assert!(
        status.is_some() && started.elapsed() < Duration::from_secs(5),
        "tmpdisk --stdio must exit promptly on SIGTERM ({status:?})\n{}",
        p.describe()
    );
    wait_no_image_holders(&images, "after SIGTERM of --stdio");
    assert_dir_empty(&images, "after SIGTERM of --stdio");
}

// --- clients that misbehave ---------------------------------------------------------------------

#[test]
fn silent_and_dribbling_clients_are_dropped_by_the_handshake_timeout() {
    let dir = TestDir::new("handshake");
    let mut server = Server::start(
        &dir,
        Mode::Tcp,
        &["--handshake-timeout", "2", "--command", "true", "64M"],
        &[],
    );
    let addr = server.uri().trim_start_matches("nbd://").to_string();

    // Connects and says nothing (not even reading the greeting).
    let mut silent = std::net::TcpStream::connect(&addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    // Sends one byte of its options every 300 ms, forever.
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let started = Instant::now();
    let mut greeting = [0u8; 18];
    slow.read_exact(&mut greeting).unwrap();
    slow.write_all(&3u32.to_be_bytes()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let dribbler = {
        let mut w = slow.try_clone().unwrap();
        let stop = stop.clone();
        thread::spawn(move || {
            let opt = nbdraw::IHAVEOPT.to_be_bytes();
            for b in opt.iter().cycle() {
                if stop.load(Ordering::Relaxed) || w.write_all(&[*b]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(300));
            }
        })
    };
    for (name, s) in [("silent", &mut silent), ("dribbling", &mut slow)] {
        let mut all = Vec::new();
        let r = s.read_to_end(&mut all);
        let took = started.elapsed();
        assert!(
            r.is_ok()
                || r.as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "{name} client: {r:?}"
        );
        assert!(
            took >= Duration::from_millis(1800) && took < Duration::from_secs(8),
            "the {name} client must be dropped about 2 s after connecting (--handshake-timeout 2), was after {took:?}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    dribbler.join().unwrap();
    server
        .proc
        .wait_stderr("did not finish negotiating", Duration::from_secs(5));
    wait_children_reaped(server.pid(), 0, "after the handshake timeouts");
    assert_dir_empty(server.images(), "after the handshake timeouts");
}

/// Sends READ requests of 1 MiB (and small WRITEs) without ever reading a
/// reply, until the connection stops taking them; returns how many went.
fn flood_without_reading<S: Write + Nonblocking>(s: &mut S) -> usize {
    s.nonblocking(true);
    let mut sent: usize = 0;
    let mut stuck_since: Option<Instant> = None;
    let started = Instant::now();
    let mut pending: Vec<u8> = Vec::new();
    while started.elapsed() < Duration::from_secs(10) {
        if pending.is_empty() {
            let cookie = sent as u64;
            pending = if sent.is_multiple_of(2) {
                nbdraw::request(
                    Framing::Simple,
                    0,
                    nbdraw::CMD_READ,
                    cookie,
                    0,
                    1 << 20,
                    &[],
                )
            } else {
                nbdraw::request(
                    Framing::Simple,
                    0,
                    nbdraw::CMD_WRITE,
                    cookie,
                    4096,
                    512,
                    &[7; 512],
                )
            };
            sent += 1;
        }
        match s.write(&pending) {
            Ok(n) => {
                pending.drain(..n);
                stuck_since = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let t = *stuck_since.get_or_insert_with(Instant::now);
                if t.elapsed() > Duration::from_millis(700) {
                    break;
                }
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("sending requests: {e}"),
        }
    }
    s.nonblocking(false);
    sent
}

/// The sockets a flood can be sent on.
trait Nonblocking {
    fn nonblocking(&self, on: bool);
}

impl Nonblocking for UnixStream {
    fn nonblocking(&self, on: bool) {
        self.set_nonblocking(on).unwrap();
    }
}

impl Nonblocking for std::net::TcpStream {
    fn nonblocking(&self, on: bool) {
        self.set_nonblocking(on).unwrap();
    }
}

#[test]
fn client_that_stops_reading_neither_spins_nor_grows_the_server() {
    let dir = TestDir::new("no-read");
    let server = Server::unix(&dir, &["--command", "true", "256M"]);
    let mut s = raw_client(&dir, Framing::Simple, false);
    let child = serving_child(&server);
    let rss_before = rss_kib(child).unwrap();
    let sent = flood_without_reading(&mut s);
    assert!(sent > 10, "only {sent} requests went out");
    // The server is now stuck writing replies nobody reads.
    let cpu0 = cpu_ticks(child).expect("serving child alive");
    thread::sleep(Duration::from_secs(3));
    let cpu1 = cpu_ticks(child).expect("serving child alive while blocked");
    let rss = rss_kib(child).unwrap();
    assert!(
        cpu1 - cpu0 <= 15,
        "the blocked server used {} ticks of CPU in 3 s: it spins",
        cpu1 - cpu0
    );
    assert!(
        rss < 64 * 1024 && rss < rss_before + 40 * 1024,
        "the blocked server grew from {rss_before} KiB to {rss} KiB"
    );
    // Once the client goes, so does its server.
    drop(s);
    let left = wait_gone(&[child], Duration::from_secs(10));
    assert!(left.is_empty(), "the serving child outlived its client");
    wait_children_reaped(server.pid(), 0, "after the non-reading client left");
}

#[test]
fn client_that_stops_reading_is_dropped_after_the_reply_timeout() {
    let dir = TestDir::new("reply-timeout");
    let mut server = Server::unix(&dir, &["--reply-timeout", "2", "--command", "true", "256M"]);
    let mut s = raw_client(&dir, Framing::Simple, false);
    let child = serving_child(&server);
    flood_without_reading(&mut s);
    let started = Instant::now();
    let left = wait_gone(&[child], Duration::from_secs(15));
    assert!(
        left.is_empty(),
        "a client that has not read its replies for 2 s must be dropped (--reply-timeout 2)"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "dropped only after {:?}",
        started.elapsed()
    );
    wait_children_reaped(server.pid(), 0, "after the reply timeout");
    server
        .proc
        .wait_stderr("client dropped", Duration::from_secs(5));
    let log = server.proc.stderr().to_lowercase();
    assert!(
        log.lines()
            .any(|l| l.contains("client dropped") && l.contains("repl")),
        "the log must say the client was dropped for not reading its replies\n{log}"
    );
}

/// Over TCP a client that never reads was dropped only after about four
/// reply timeouts (12.5 s for 3 s): each partial send, made as the
/// kernel's buffers grew, restarted the timeout. A reply the client has not
/// taken within the timeout now ends the session.
#[test]
fn client_that_never_reads_over_tcp_is_dropped_after_one_reply_timeout() {
    let dir = TestDir::new("reply-timeout-tcp");
    let server = Server::start(
        &dir,
        Mode::Tcp,
        &["--reply-timeout", "3", "--command", "true", "256M"],
        &[],
    );
    let mut s = std::net::TcpStream::connect(listen_addr(&server)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    nbdraw::negotiate(&mut s, Framing::Simple, false).expect("negotiating");
    let child = serving_child(&server);
    let started = Instant::now();
    flood_without_reading(&mut s);
    let left = wait_gone(&[child], Duration::from_secs(20));
    let took = started.elapsed();
    assert!(
        left.is_empty() && took < Duration::from_secs(6),
        "a client that never read was dropped after {took:?} with --reply-timeout 3\n{}",
        server.proc.describe()
    );
}

#[test]
fn half_closed_client_still_gets_every_reply() {
    for (framing, name) in [
        (Framing::Simple, "simple"),
        (Framing::Structured, "structured"),
        (Framing::Extended, "extended"),
    ] {
        let dir = TestDir::new(&format!("half-close-{name}"));
        let mut server = Server::unix(&dir, &["--command", "true", "16M"]);
        let mut s = raw_client(&dir, framing, framing != Framing::Simple);
        let mut reqs = Vec::new();
        for i in 0..64u64 {
            let data = vec![i as u8 + 1; 65536];
            reqs.extend(nbdraw::request(
                framing,
                0,
                nbdraw::CMD_WRITE,
                i,
                i << 16,
                65536,
                &data,
            ));
        }
        for i in 0..64u64 {
            reqs.extend(nbdraw::request(
                framing,
                0,
                nbdraw::CMD_READ,
                100 + i,
                i << 16,
                65536,
                &[],
            ));
        }
        let writer = {
            let mut w = s.try_clone().unwrap();
            thread::spawn(move || {
                w.write_all(&reqs).unwrap();
                // No DISC: the client just stops sending.
                w.shutdown(std::net::Shutdown::Write).unwrap();
            })
        };
        for i in 0..64u64 {
            let r = nbdraw::read_replies(&mut s, framing, None).unwrap();
            assert_eq!((r[0].cookie(), r[0].error()), (i, 0), "{name}: write {i}");
        }
        for i in 0..64u64 {
            let r = nbdraw::read_replies(&mut s, framing, Some(65536)).unwrap();
            let mut data = Vec::new();
            for c in &r {
                assert_eq!(c.cookie(), 100 + i);
                match c {
                    Reply::Simple {
                        data: d, error: 0, ..
                    } => data.extend_from_slice(d),
                    Reply::Chunk {
                        kind: nbdraw::REPLY_TYPE_OFFSET_DATA,
                        payload,
                        ..
                    } => data.extend_from_slice(&payload[8..]),
                    other => panic!("{name}: unexpected reply to read {i}: {other:?}"),
                }
            }
            assert!(
                data.len() == 65536 && data.iter().all(|&b| b == i as u8 + 1),
                "{name}: read {i} after the half-close"
            );
        }
        writer.join().unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{name}: extra bytes after the last reply");
        wait_children_reaped(server.pid(), 0, "after the half-closed client");
        server
            .proc
            .wait_stderr("end=closed", Duration::from_secs(5));
    }
}

#[test]
fn huge_pipeline_is_answered_in_order_in_bounded_memory() {
    const N: u64 = 200_000;
    const SLOTS: u64 = 1024;
    let dir = TestDir::new("pipeline");
    let server = Server::unix(&dir, &["--command", "true", "16M"]);
    let mut s = raw_client(&dir, Framing::Simple, false);
    let child = serving_child(&server);
    // Request i: WRITE of 512 bytes of (i % 251) to slot i % SLOTS when i
    // is even, READ of the slot just written when odd, FLUSH every 97th.
    let kind = |i: u64| {
        if i.is_multiple_of(97) {
            nbdraw::CMD_FLUSH
        } else if i.is_multiple_of(2) {
            nbdraw::CMD_WRITE
        } else {
            nbdraw::CMD_READ
        }
    };
    let slot = |i: u64| (i - (i % 2)) % SLOTS * 512;
    let writer = {
        let mut w = s.try_clone().unwrap();
        thread::spawn(move || {
            let mut buf = Vec::with_capacity(1 << 20);
            for i in 0..N {
                let m = match kind(i) {
                    nbdraw::CMD_FLUSH => {
                        nbdraw::request(Framing::Simple, 0, nbdraw::CMD_FLUSH, i, 0, 0, &[])
                    }
                    nbdraw::CMD_WRITE => nbdraw::request(
                        Framing::Simple,
                        0,
                        nbdraw::CMD_WRITE,
                        i,
                        slot(i),
                        512,
                        &[(i % 251) as u8; 512],
                    ),
                    _ => {
                        nbdraw::request(Framing::Simple, 0, nbdraw::CMD_READ, i, slot(i), 512, &[])
                    }
                };
                buf.extend_from_slice(&m);
                if buf.len() >= 1 << 20 {
                    w.write_all(&buf).unwrap();
                    buf.clear();
                }
            }
            w.write_all(&buf).unwrap();
        })
    };
    let peak = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some(r) = rss_kib(child) {
                    peak.fetch_max(r as usize, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let started = Instant::now();
    let mut reader = std::io::BufReader::with_capacity(1 << 20, s.try_clone().unwrap());
    for i in 0..N {
        let read = kind(i) == nbdraw::CMD_READ;
        let r = nbdraw::read_reply(&mut reader, Framing::Simple, read.then_some(512))
            .unwrap_or_else(|e| panic!("reply {i} of {N}: {e}"));
        assert_eq!((r.cookie(), r.error()), (i, 0), "replies in order, all ok");
        if let (true, Reply::Simple { data, .. }) = (read, &r) {
            // Odd i reads what even i - 1 wrote (unless i - 1 was a FLUSH).
            if kind(i - 1) == nbdraw::CMD_WRITE {
                assert!(
                    data.iter().all(|&b| b == ((i - 1) % 251) as u8),
                    "read {i} sees write {}",
                    i - 1
                );
            }
        }
        assert!(
            started.elapsed() < DEADLINE,
            "only {i} of {N} replies within {DEADLINE:?}"
        );
    }
    writer.join().unwrap();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    assert!(
        peak < 64 * 1024,
        "the server's RSS peaked at {peak} KiB for a pipeline of {N} requests"
    );
    s.write_all(&nbdraw::request(
        Framing::Simple,
        0,
        nbdraw::CMD_DISC,
        0,
        0,
        0,
        &[],
    ))
    .unwrap();
    wait_children_reaped(server.pid(), 0, "after the pipeline");
}

// --- the standalone listener under load ----------------------------------------------------

#[test]
fn listener_never_runs_more_than_max_connections_and_serves_the_rest_later() {
    const MAX: usize = 3;
    const CLIENTS: usize = 8;
    let dir = TestDir::new("flood");
    let mut server = Server::unix(
        &dir,
        &[
            "--max-connections",
            &MAX.to_string(),
            "--command",
            "true",
            "16M",
        ],
    );
    let listener = server.pid();
    // Count the listener's children all along.
    let most = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (most, stop) = (most.clone(), stop.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                most.fetch_max(children_of(listener).len(), Ordering::Relaxed);
                thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let (greeted_tx, greeted_rx) = mpsc::channel::<usize>();
    let mut release = Vec::new();
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let (tx, rx) = mpsc::channel::<()>();
        release.push(tx);
        let greeted = greeted_tx.clone();
        let sock = dir.join("nbd.sock");
        clients.push(thread::spawn(move || {
            let mut s = UnixStream::connect(&sock).expect("connect (the backlog takes it)");
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            nbdraw::negotiate(&mut s, Framing::Simple, false).expect("negotiate");
            greeted.send(i).unwrap();
            rx.recv().unwrap();
            s.write_all(&nbdraw::request(
                Framing::Simple,
                0,
                nbdraw::CMD_DISC,
                1,
                0,
                0,
                &[],
            ))
            .unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).unwrap();
        }));
    }
    let mut served = Vec::new();
    for _ in 0..MAX {
        served.push(
            greeted_rx
                .recv_timeout(DEADLINE)
                .expect("the first clients must be served"),
        );
    }
    // The rest wait in the backlog while MAX are being served.
    assert!(
        greeted_rx.recv_timeout(Duration::from_secs(1)).is_err(),
        "a client beyond --max-connections {MAX} was served while {MAX} were connected"
    );
    server
        .proc
        .wait_stderr("connection limit reached", Duration::from_secs(5));
    // As each served client leaves, a waiting one gets in.
    let mut released = 0;
    while released < CLIENTS {
        let i = served[released];
        release[i].send(()).unwrap();
        released += 1;
        if served.len() < CLIENTS {
            served.push(
                greeted_rx
                    .recv_timeout(DEADLINE)
                    .expect("a waiting client must be served once a slot frees"),
            );
        }
    }
    for c in clients {
        c.join().unwrap();
    }
    wait_children_reaped(listener, 0, "after the flood");
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let most = most.load(Ordering::Relaxed);
    assert!(
        most <= MAX,
        "the listener had {most} children at once with --max-connections {MAX}"
    );
    assert_eq!(served.len(), CLIENTS, "every client was served in the end");
}

#[test]
fn crashed_children_are_reaped_and_logged() {
    require(&["python3-nbd", "nbdinfo"]);
    let dir = TestDir::new("crash");
    let mut server = Server::unix(&dir, &["--command", "true", "64M"]);
    // A panic is SIGABRT (panic = "abort"); SIGSYS stands for any other
    // fatal signal. (Not SIGSEGV from kill(2): Rust's stack-overflow
    // handler swallows one that no faulting instruction raised.)
    for (signal, name) in [(libc::SIGABRT, "SIGABRT"), (libc::SIGSYS, "SIGSYS")] {
        let _client = HeldClient::start("h = connect(sys.argv[1])", "", &[server.uri()]);
        let child = serving_child(&server);
        send_signal(child, signal);
        wait_children_reaped(
            server.pid(),
            0,
            &format!("after {name} of the serving child"),
        );
        let end = Instant::now() + Duration::from_secs(5);
        let logged = |p: &Proc| {
            p.stderr().lines().any(|l| {
                l.contains("client process crashed")
                    && l.contains(name)
                    && l.contains(&format!("pid={child}"))
            })
        };
        while !logged(&server.proc) && Instant::now() < end {
            thread::sleep(Duration::from_millis(20));
        }
        assert!(
            logged(&server.proc),
            "the listener must log the crash of {child} by {name}\n{}",
            server.proc.stderr()
        );
        wait_no_image_holders(server.images(), "after a crash");
        assert_dir_empty(server.images(), "after a crash");
    }
    // The listener serves on.
    nbdinfo_ok(&["--size", server.uri()]);
    assert!(server.proc.try_status().is_none());
}

// --- defence in depth ----------------------------------------------------------------------

/// NoNewPrivs and Seccomp of a serving process.
fn lockdown(pid: u32) -> (String, String) {
    (
        proc_status(pid, "NoNewPrivs").unwrap_or_default(),
        proc_status(pid, "Seccomp").unwrap_or_default(),
    )
}

const IO_SETUP: &str = r#"
h = connect(sys.argv[1])
h.pwrite(b'\x42' * (1 << 20), 1 << 20)
"#;

const IO_FINISH: &str = r#"
check(h.pread(1 << 20, 1 << 20) == b'\x42' * (1 << 20), 'read')
h.trim(1 << 19, 1 << 20)
h.zero(65536, 1 << 21)
h.flush()
check(h.pread(4096, 1 << 20) == bytes(4096), 'trimmed range reads zeroes')
ex = extents(h, 0, h.get_size())
check(sum(l for (_, l, _) in ex) == h.get_size(), 'block status covers the disk')
h.pwrite(b'\x43' * 4096, h.get_size() - 4096)
check(h.pread(4096, h.get_size() - 4096) == b'\x43' * 4096, 'last block')
h.shutdown()
"#;

#[test]
fn serving_process_runs_with_no_new_privs_and_seccomp_and_still_works() {
    require(&["python3-nbd", "mkfs.ext4"]);
    let dir = TestDir::new("seccomp");
    // Listener child.
    let server = Server::unix(&dir, &["64M"]);
    let client = HeldClient::start(IO_SETUP, IO_FINISH, &[server.uri()]);
    let child = serving_child(&server);
    assert_eq!(
        lockdown(child),
        ("1".into(), "2".into()),
        "a listener's serving child: NoNewPrivs 1 and Seccomp 2 (filter) while it serves"
    );
    assert_eq!(
        proc_status(server.pid(), "Seccomp").as_deref(),
        Some("0"),
        "the listener itself is not filtered (it must fork and exec nothing odd, but stays general)"
    );
    client.finish();
    wait_children_reaped(server.pid(), 0, "after the locked-down session");
    let log = server.proc.stderr();
    assert!(!log.contains("crashed"), "{log}");

    // --stdio, as libnbd's connect_command starts it.
    let images = dir.subdir("images-stdio");
    let setup = format!(
        "h = nbd.NBD()\nh.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)\n\
         h.connect_command([{:?}, '--stdio', '--tmpdir', {:?}, '64M'])\n\
         h.pwrite(b'\\x42' * (1 << 20), 1 << 20)",
        TMPDISK,
        images.to_str().unwrap()
    );
    let client = HeldClient::start(&setup, IO_FINISH, &[]);
    let pid = wait_live_children(client.proc.pid(), 1, "connect_command's tmpdisk")[0];
    assert_eq!(
        lockdown(pid),
        ("1".into(), "2".into()),
        "tmpdisk --stdio: NoNewPrivs 1 and Seccomp 2 while it serves"
    );
    client.finish();
    let left = wait_gone(&[pid], Duration::from_secs(10));
    assert!(left.is_empty(), "tmpdisk --stdio outlived its client");
}

// --- nothing a client's setup starts outlives it ------------------------------------------

/// How tmpdisk runs, for the containment tests: each takes a different
/// way through `sys::prepare_child`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Privilege {
    /// As root: the setup gets a PID namespace directly.
    Root,
    /// As nobody: a PID namespace inside a new user namespace.
    Nobody,
    /// Where neither is allowed (uid 0 of a user namespace with no
    /// capabilities and no room for more user namespaces, as under a
    /// RestrictNamespaces= policy): the stand-in and subreapers only.
    NoNamespaces,
}

/// `WRAPPER... tmpdisk ARGS` for `p`, with $PIDS set.
fn contained_cmd(p: Privilege, args: &[&str], pids: &Path) -> std::process::Command {
    let mut c = match p {
        Privilege::Root => tmpdisk_cmd(args),
        Privilege::Nobody => wrapped_tmpdisk_cmd(
            &[
                "setpriv",
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
            ],
            args,
        ),
        Privilege::NoNamespaces => wrapped_tmpdisk_cmd(
            &[
                "unshare",
                "--user",
                "--map-root-user",
                "sh",
                "-c",
                "echo 0 > /proc/sys/user/max_user_namespaces && \
                 exec setpriv --bounding-set=-all --inh-caps=-all \"$@\"",
                "sh",
            ],
            args,
        ),
    };
    c.env("PIDS", pids);
    c
}

/// A test directory whose images dir and $PIDS file anyone may write
/// (for the unprivileged runs).
fn open_dir(name: &str) -> (TestDir, PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = TestDir::new(name);
    let images = dir.subdir("images");
    let pids = dir.join("pids");
    std::fs::write(&pids, "").unwrap();
    for p in [dir.path(), &images, &pids] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    (dir, images, pids)
}

/// The PID namespace a process is in.
fn pid_ns(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/pid"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A command that leaves a background job, a `setsid` job and a
/// foreground job running, all three recorded in $PIDS.
const THREE_JOBS: &str = concat!(
    "(",
    record!(),
    "; exec sleep 1000) & (",
    record!(),
    "; exec setsid sleep 1000) & ",
    record!(),
    "; sleep 1000"
);

/// kill -9 of the process serving the client, while its setup runs jobs
/// of every kind: nothing of the setup may survive.
fn setup_dies_with_a_killed_server(p: Privilege) {
    require_root("it runs tmpdisk as other users and in user namespaces");
    let (_dir, images, pids) = open_dir(&format!("contain-kill-{p:?}"));
    let t = images.to_str().unwrap();
    let cmd = contained_cmd(
        p,
        &["--stdio", "--tmpdir", t, "--command", THREE_JOBS, "64M"],
        &pids,
    );
    let (mut server, mut sock) = stdio_server(cmd);
    let _reader = thread::spawn(move || {
        let _ = nbdraw::handshake(&mut sock).and_then(|_| nbdraw::opt_go(&mut sock));
        thread::sleep(Duration::from_secs(30));
    });
    let jobs = pids_in(&pids, 3);
    let _reaper = KillOnDrop(jobs.clone());
    let own_ns = pid_ns(server.pid()) != pid_ns(jobs[0]);
    assert_eq!(
        own_ns,
        p != Privilege::NoNamespaces,
        "{p:?}: the setup's PID namespace (server {}, setup {})",
        pid_ns(server.pid()),
        pid_ns(jobs[0])
    );
    send_signal(server.pid(), libc::SIGKILL);
    server.wait();
    let left = wait_gone(&jobs, Duration::from_secs(5));
    assert!(
        left.is_empty(),
        "{p:?}: the setup's jobs {left:?} (of {jobs:?}) outlived kill -9 of the server"
    );
    wait_no_image_holders(&images, "after kill -9 during setup");
    assert_dir_empty(&images, "after kill -9 during setup");
}

#[test]
fn setup_dies_with_a_killed_server_as_root() {
    setup_dies_with_a_killed_server(Privilege::Root);
}

#[test]
fn setup_dies_with_a_killed_server_as_nobody() {
    setup_dies_with_a_killed_server(Privilege::Nobody);
}

#[test]
fn setup_dies_with_a_killed_server_without_namespaces() {
    setup_dies_with_a_killed_server(Privilege::NoNamespaces);
}

/// A command that succeeds but leaves a `setsid` job and a background job
/// behind: both are gone by the time the client is served.
fn nothing_outlives_a_successful_setup(p: Privilege) {
    require_root("it runs tmpdisk as other users and in user namespaces");
    let (_dir, images, pids) = open_dir(&format!("contain-ok-{p:?}"));
    let t = images.to_str().unwrap();
    let command = concat!(
        "(",
        record!(),
        "; exec setsid sleep 1000) & (",
        record!(),
        "; exec sleep 1000) & ",
        "while [ $(wc -l < \"$PIDS\") -lt 2 ]; do sleep 0.01; done"
    );
    let cmd = contained_cmd(
        p,
        &["--stdio", "--tmpdir", t, "--command", command, "64M"],
        &pids,
    );
    let (mut server, mut sock) = stdio_server(cmd);
    let reply = nbdraw::handshake(&mut sock).and_then(|_| nbdraw::opt_go(&mut sock));
    assert!(
        matches!(reply, Ok(GoReply::Ok { .. })),
        "{p:?}: {reply:?}\n{}",
        server.describe()
    );
    let jobs = pids_in(&pids, 2);
    let _reaper = KillOnDrop(jobs.clone());
    // The client is still connected: the disk is served, the jobs are not.
    let left = wait_gone(&jobs, Duration::from_secs(5));
    assert!(
        left.is_empty(),
        "{p:?}: jobs {left:?} a successful setup left behind still run while its client is served"
    );
    assert!(alive(server.pid()), "{p:?}: the server must still serve");
    drop(sock);
    assert!(server.wait().success(), "{}", server.describe());
}

#[test]
fn nothing_outlives_a_successful_setup_as_root() {
    nothing_outlives_a_successful_setup(Privilege::Root);
}

#[test]
fn nothing_outlives_a_successful_setup_without_namespaces() {
    nothing_outlives_a_successful_setup(Privilege::NoNamespaces);
}

/// A client that hangs up while its (slow) setup runs takes it along at
/// once: the setup is killed, the process exits 0, and a listener's slot
/// is free for the next client.
#[test]
fn a_client_that_leaves_during_setup_ends_it() {
    require_root("the no-namespace case runs in a user namespace");
    for p in [Privilege::Root, Privilege::NoNamespaces] {
        let (_dir, images, pids) = open_dir(&format!("contain-leave-{p:?}"));
        let t = images.to_str().unwrap();
        let cmd = contained_cmd(
            p,
            &["--stdio", "--tmpdir", t, "--command", SLOW_SETUP, "64M"],
            &pids,
        );
        let (mut server, mut sock) = stdio_server(cmd);
        nbdraw::handshake(&mut sock).unwrap();
        let mut go = nbdraw::IHAVEOPT.to_be_bytes().to_vec();
        go.extend_from_slice(&nbdraw::OPT_GO.to_be_bytes());
        go.extend_from_slice(&6u32.to_be_bytes());
        go.extend_from_slice(&[0; 6]);
        sock.write_all(&go).unwrap();
        let jobs = pids_in(&pids, 2);
        let _reaper = KillOnDrop(jobs.clone());
        let left_at = Instant::now();
        drop(sock);
        let status = server.wait_timeout(Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()) && left_at.elapsed() < Duration::from_secs(3),
            "{p:?}: tmpdisk must stop setup and exit 0 when its client leaves \
             (status {status:?} after {:?})\n{}",
            left_at.elapsed(),
            server.describe()
        );
        assert!(
            server
                .stderr()
                .contains("client left while its disk was being built"),
            "{}",
            server.describe()
        );
        let left = wait_gone(&jobs, Duration::from_secs(3));
        assert!(
            left.is_empty(),
            "{p:?}: setup jobs {left:?} outlived their client"
        );
        assert_dir_empty(&images, "after the client left during setup");
    }

    // A listener with one slot: the slot frees as soon as the client goes.
    let dir = TestDir::new("contain-leave-slot");
    let pids = dir.join("pids");
    let server = Server::start(
        &dir,
        Mode::Unix,
        &["--max-connections", "1", "--command", SLOW_SETUP, "64M"],
        &[("PIDS", pids.to_str().unwrap())],
    );
    let mut first = UnixStream::connect(dir.join("nbd.sock")).unwrap();
    nbdraw::handshake(&mut first).unwrap();
    let mut go = nbdraw::IHAVEOPT.to_be_bytes().to_vec();
    go.extend_from_slice(&nbdraw::OPT_GO.to_be_bytes());
    go.extend_from_slice(&6u32.to_be_bytes());
    go.extend_from_slice(&[0; 6]);
    first.write_all(&go).unwrap();
    let jobs = pids_in(&pids, 2);
    let _reaper = KillOnDrop(jobs.clone());
    drop(first);
    let mut second = UnixStream::connect(dir.join("nbd.sock")).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let greeted = nbdraw::handshake(&mut second);
    assert!(
        greeted.is_ok(),
        "the next client must be greeted within 3 s once the first left during setup: {greeted:?}\n{}",
        server.proc.describe()
    );
    assert!(wait_gone(&jobs, Duration::from_secs(3)).is_empty());
}

/// The last net: if the serving child and its setup's stand-in are killed
/// together, whatever the setup left is handed to the listener (a
/// subreaper), which kills it.
#[test]
fn the_listener_kills_what_a_killed_client_process_left() {
    require_root("it runs tmpdisk in a user namespace without capabilities");
    let (dir, images, pids) = open_dir("contain-listener");
    let sock = dir.join("nbd.sock");
    let args = [
        "--unix",
        sock.to_str().unwrap(),
        "--tmpdir",
        images.to_str().unwrap(),
        "--command",
        THREE_JOBS,
        "64M",
    ];
    let listener = Proc::spawn(
        "tmpdisk --unix without namespaces",
        contained_cmd(Privilege::NoNamespaces, &args, &pids),
    );
    let end = Instant::now() + DEADLINE;
    let mut c = loop {
        if let Ok(c) = UnixStream::connect(&sock) {
            break c;
        }
        assert!(Instant::now() < end, "{}", listener.describe());
        thread::sleep(Duration::from_millis(20));
    };
    nbdraw::handshake(&mut c).unwrap();
    let mut go = nbdraw::IHAVEOPT.to_be_bytes().to_vec();
    go.extend_from_slice(&nbdraw::OPT_GO.to_be_bytes());
    go.extend_from_slice(&6u32.to_be_bytes());
    go.extend_from_slice(&[0; 6]);
    c.write_all(&go).unwrap();
    let jobs = pids_in(&pids, 3);
    let _reaper = KillOnDrop(jobs.clone());
    let serving = wait_live_children(listener.pid(), 1, "one client")[0];
    let stand_in = wait_live_children(serving, 1, "the setup's stand-in")[0];
    send_signal(stand_in, libc::SIGKILL);
    send_signal(serving, libc::SIGKILL);
    let left = wait_gone(&jobs, Duration::from_secs(5));
    assert!(
        left.is_empty(),
        "setup jobs {left:?} outlived their serving process and its stand-in\n{}",
        listener.describe()
    );
    drop(c);
}

// --- one source cannot starve the others -------------------------------------------------

/// A TCP connection to `to` from the loopback address `from` (all of
/// 127/8 is local), so one machine can play several sources.
fn tcp_from(from: std::net::Ipv4Addr, to: std::net::SocketAddr) -> std::net::TcpStream {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(std::net::SocketAddrV4::new(from, 0)),
    )
    .expect("bind");
    let std::net::SocketAddr::V4(to) = to else {
        panic!("IPv4 only")
    };
    connect(fd.as_raw_fd(), &SockaddrIn::from(to)).expect("connect");
    let s = std::net::TcpStream::from(fd);
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s
}

fn listen_addr(server: &Server) -> std::net::SocketAddr {
    server
        .uri()
        .trim_start_matches("nbd://")
        .parse()
        .expect("a TCP server's address")
}

/// How long until `s` gets the server's greeting (or the error).
fn greeting_time(s: &mut std::net::TcpStream) -> (Duration, std::io::Result<u16>) {
    let t = Instant::now();
    let r = nbdraw::handshake(s);
    (t.elapsed(), r)
}

/// A listener that cannot accept (out of fds, a connection waiting) logs
/// it at most once a second, with the count, and serves the connection
/// once it can again. Before, it logged every attempt: a line every 10 ms.
#[test]
fn a_listener_out_of_fds_logs_once_a_second_and_recovers() {
    require(&["nbdinfo", "mkfs.ext4"]);
    let dir = TestDir::new("listener-emfile");
    let mut server = Server::unix(&dir, &["64M"]);
    let pid = server.pid();
    // The probe connection's child must be gone, or it holds fds too.
    wait_children_reaped(pid, 0, "after the probe connection");
    set_soft_nofile(pid, lowest_free_fd(pid));
    let waiting = UnixStream::connect(dir.join("nbd.sock")).unwrap();
    server
        .proc
        .wait_stderr("accept failed", Duration::from_secs(10));
    thread::sleep(Duration::from_secs(2));
    let lines = server.proc.stderr().matches("accept failed").count();
    assert!(
        (1..=4).contains(&lines),
        "{lines} 'accept failed' lines in about 2 s:\n{}",
        server.proc.stderr()
    );
    assert!(
        server.proc.stderr().contains("failures="),
        "{}",
        server.proc.stderr()
    );
    set_soft_nofile(pid, 1024);
    drop(waiting);
    nbdinfo_ok(&["--size", server.uri()]);
}

/// 200 idle connections from one address took every slot of a listener
/// (a new client's greeting came after 89 s). Now one source gets at most
/// --max-connections-per-source of them, and the rest are refused at once.
#[test]
fn one_source_cannot_take_every_slot() {
    let dir = TestDir::new("per-source");
    let mut server = Server::start(&dir, Mode::Tcp, &["--command", "true", "16M"], &[]);
    let to = listen_addr(&server);
    let attacker = std::net::Ipv4Addr::new(127, 0, 0, 2);
    let idle: Vec<_> = (0..200).map(|_| tcp_from(attacker, to)).collect();
    // The listener sees them all (accepting or refusing each) before the
    // victim below, who connects last.
    let mut victim = tcp_from(std::net::Ipv4Addr::new(127, 0, 0, 3), to);
    let (took, r) = greeting_time(&mut victim);
    assert!(
        r.is_ok() && took < Duration::from_secs(2),
        "a client from another address waited {took:?} for its greeting ({r:?})\n{}",
        server.proc.describe()
    );
    server
        .proc
        .wait_stderr("too many from one source", Duration::from_secs(5));
    let children = live_children(server.pid()).len();
    assert!(
        children <= 8 + 1,
        "one source holds {children} serving processes; the default limit is 8"
    );
    // The refused ones were closed at once, not left waiting.
    let closed = idle
        .into_iter()
        .filter_map(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut b = [0u8; 1];
            // Closed: the end of the stream, or a reset. A timeout is a
            // connection left open, which must not count.
            let r = s.read(&mut b);
            let reset = matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset);
            (matches!(r, Ok(0)) || reset).then_some(())
        })
        .count();
    assert!(closed >= 190, "only {closed} of the 200 were refused");
}

/// When every slot is taken by clients that connect and say nothing (from
/// many addresses), a waiting client gets a slot within the pressure
/// grace: the idle ones are dropped, a client that chose its disk is not.
#[test]
fn idle_clients_make_room_under_pressure_and_served_ones_stay() {
    require(&["python3-nbd"]);
    let dir = TestDir::new("pressure");
    let mut server = Server::start(
        &dir,
        Mode::Tcp,
        &[
            "--max-connections",
            "4",
            "--max-connections-per-source",
            "1",
            "--command",
            "true",
            "16M",
        ],
        &[],
    );
    let to = listen_addr(&server);
    // A real client chooses its disk first and keeps it.
    let served = HeldClient::start(
        "h = connect(sys.argv[1]); h.pwrite(b'k' * 4096, 0)",
        "check(h.pread(4096, 0) == b'k' * 4096, 'the served client lost its disk'); h.shutdown()",
        &[server.uri()],
    );
    let idle: Vec<_> = (1..=3)
        .map(|i| tcp_from(std::net::Ipv4Addr::new(127, 0, 1, i), to))
        .collect();
    wait_live_children(server.pid(), 4, "every slot taken");
    let mut victim = tcp_from(std::net::Ipv4Addr::new(127, 0, 2, 1), to);
    let (took, r) = greeting_time(&mut victim);
    assert!(
        r.is_ok() && took < Duration::from_secs(5),
        "the waiting client got its greeting after {took:?} ({r:?})\n{}",
        server.proc.describe()
    );
    server.proc.wait_stderr(
        "dropping a client that has not asked for a disk",
        Duration::from_secs(5),
    );
    served.finish();
    drop(idle);
}

/// Ctrl-C in the terminal reaches the whole foreground process group, the
/// listener's children included: they stopped, they did not crash.
#[test]
fn ctrl_c_on_a_foreground_listener_is_not_a_crash() {
    require(&["python3-nbd"]);
    let dir = TestDir::new("ctrl-c");
    let mut server = Server::unix(&dir, &["--command", "true", "16M"]);
    let clients: Vec<_> = (0..2)
        .map(|_| HeldClient::start("h = connect(sys.argv[1])", "", &[server.uri()]))
        .collect();
    wait_live_children(server.pid(), 2, "two clients");
    server.proc.kill_group(libc::SIGINT);
    let status = server.proc.wait();
    assert!(status.success(), "{}", server.proc.describe());
    let log = server.proc.stderr();
    assert!(!log.contains("crashed"), "Ctrl-C is not a crash:\n{log}");
    assert!(log.contains("stopping signal=\"SIGINT\""), "{log}");
    drop(clients);
}

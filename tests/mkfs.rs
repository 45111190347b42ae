//! How tmpdisk runs mkfs or `--command`: once per connection, only when the
//! client asks for the export, with exactly fds 0-3, the documented
//! environment, and the image's size taken from the file afterwards.

use crate::common::*;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

fn mkfs_ext4() -> String {
    find_tool("mkfs.ext4")
        .expect("mkfs.ext4 (e2fsprogs)")
        .to_str()
        .unwrap()
        .to_string()
}

fn line_count(file: &Path) -> usize {
    fs::read_to_string(file).map_or(0, |s| s.lines().count())
}

#[test]
fn info_then_go_runs_mkfs_once() {
    require(&["python3-nbd", "nbdinfo", "mkfs.ext4"]);
    let dir = TestDir::new("once");
    let counter = dir.join("counter");
    let command = format!(r#"echo x >> "$COUNTER"; {} -q -F "$disk""#, mkfs_ext4());
    let server = Server::start(
        &dir,
        Mode::Unix,
        &["--command", &command, "64M"],
        &[("COUNTER", counter.to_str().unwrap())],
    );

    // INFO, INFO again, then GO on one connection: one disk, built once.
    let script = r#"
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(sys.argv[1])
h.opt_info()
size = h.get_size()
h.opt_info()
h.opt_go()
check(h.get_size() == size, "GO must describe the same export as INFO")
check(h.pread(2, 1024 + 56) == b"\x53\xef", "the disk must be the ext4 built by the command")
h.shutdown()
"#;
    run_ok("python INFO+INFO+GO", python(script, &[server.uri()]));
    assert_eq!(
        line_count(&counter),
        1,
        "INFO, INFO and GO on one connection must run the command exactly once"
    );

    // nbdinfo negotiates in its own way (INFO and/or GO): still once.
    nbdinfo_ok(&["--json", server.uri()]);
    assert_eq!(
        line_count(&counter),
        2,
        "one nbdinfo connection must run the command exactly once"
    );

    // A client that only lists exports or aborts costs no mkfs.
    let script = r#"
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(sys.argv[1])
names = []
h.opt_list(lambda name, description: names.append(name) or 0)
check(names == [""], "LIST must show the one default export, got %r" % names)
h.opt_abort()
"#;
    run_ok("python LIST+ABORT", python(script, &[server.uri()]));
    assert_eq!(
        line_count(&counter),
        2,
        "a client that only LISTs and ABORTs must not run mkfs"
    );
}

#[test]
fn command_sees_disk_size_type_label_and_sets_the_size() {
    require(&["nbdinfo"]);
    let dir = TestDir::new("command-env");
    let out = dir.join("env.txt");
    let server = Server::start(
        &dir,
        Mode::Unix,
        &[
            "--command",
            r#"printf '%s\n' "$disk" "$size" "$type" "$label" > "$OUT"; truncate -s 3M "$disk""#,
            "--type",
            "xfs",
            "--label",
            "lbl",
            "64M",
        ],
        &[("OUT", out.to_str().unwrap())],
    );
    let size = nbdinfo_ok(&["--size", server.uri()]);
    assert_eq!(
        size.trim(),
        (3 * MIB).to_string(),
        "the served size must be the image's size after the command"
    );
    let env = fs::read_to_string(&out).expect("the command must have run");
    let lines: Vec<&str> = env.lines().collect();
    assert_eq!(
        lines,
        ["/proc/self/fd/3", "67108864", "xfs", "lbl"],
        "the command's $disk, $size (bytes), $type, $label"
    );
}

/// A fake `mkfs.fake` (python, which closes its script before running it, so
/// it sees exactly what it inherited) that records its fds and arguments
/// next to `$FD_REPORT`, then runs the real mkfs.ext4 on its last argument.
fn fake_mkfs(dir: &TestDir) -> PathBuf {
    let bin = dir.subdir("bin");
    let script = format!(
        r#"#!{PYTHON}
import os, sys
fds = []
for name in os.listdir("/proc/self/fd"):
    try:
        fds.append("%s %s" % (name, os.readlink("/proc/self/fd/" + name)))
    except OSError:
        pass  # the directory fd listdir used, closed by now
report = os.environ.get("FD_REPORT")
if not report:
    sys.exit("mkfs.fake: FD_REPORT is not in the environment tmpdisk passed on")
with open(report + ".fds", "w") as f:
    f.write("\n".join(fds) + "\n")
with open(report + ".args", "w") as f:
    f.write("\n".join(sys.argv[1:]) + "\n")
os.execv("{mkfs}", ["mkfs.ext4", "-q", "-F", sys.argv[-1]])
"#,
        mkfs = mkfs_ext4()
    );
    let path = bin.join("mkfs.fake");
    fs::write(&path, script).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// Checks the report of [`fake_mkfs`]: fds 0 and 1 are /dev/null, 2 is
/// open, 3 is the unlinked image in `images`, nothing else; the image path
/// argument is /proc/self/fd/3.
fn check_fd_report(report: &Path, images: &Path, mode: &str) {
    let text = fs::read_to_string(report.with_extension("fds"))
        .unwrap_or_else(|e| panic!("{mode}: mkfs.fake did not run (no fd report: {e})"));
    let fds: BTreeMap<u32, String> = text
        .lines()
        .filter_map(|l| {
            let (fd, target) = l.split_once(' ')?;
            Some((fd.parse().ok()?, target.to_string()))
        })
        .collect();
    assert_eq!(
        fds.keys().copied().collect::<Vec<_>>(),
        [0, 1, 2, 3],
        "{mode}: mkfs must inherit exactly fds 0, 1, 2 and the image on 3, got {fds:#?}"
    );
    assert_eq!(
        fds[&0], "/dev/null",
        "{mode}: mkfs's stdin must be /dev/null"
    );
    assert_eq!(
        fds[&1], "/dev/null",
        "{mode}: mkfs's stdout must be /dev/null"
    );
    assert!(
        is_deleted_image(&fds[&3], images),
        "{mode}: mkfs's fd 3 must be the unlinked image in {}, got {}",
        images.display(),
        fds[&3]
    );
    let args = fs::read_to_string(report.with_extension("args")).unwrap();
    assert_eq!(
        args.lines().last(),
        Some("/proc/self/fd/3"),
        "{mode}: mkfs's last argument must be the image as /proc/self/fd/3, args: {args:?}"
    );
}

fn path_with(bin: &Path) -> String {
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Start `c` (a `tmpdisk --unix SOCK` built with what `Server` cannot give
/// it: a pre_exec, an environment of its own) and wait until it accepts
/// connections on `sock`.
fn spawn_listening(c: std::process::Command, sock: &Path) -> Proc {
    let mut server = Proc::spawn("tmpdisk --unix", c);
    let end = std::time::Instant::now() + DEADLINE;
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            server.try_status().is_none() && std::time::Instant::now() < end,
            "tmpdisk --unix did not start listening\n{}",
            server.describe()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    server
}

#[test]
fn mkfs_sees_only_stdio_and_the_image_in_listener_mode() {
    require(&["nbdinfo", "mkfs.ext4", "python3-nbd"]);
    let dir = TestDir::new("fds-listener");
    let bin = fake_mkfs(&dir);
    let report = dir.join("report");
    let images = dir.subdir("images");
    let sock = dir.join("nbd.sock");

    let mut c = tmpdisk_cmd(&[
        "--unix",
        sock.to_str().unwrap(),
        "--tmpdir",
        images.to_str().unwrap(),
        "--type",
        "fake",
        "64M",
    ]);
    c.env("PATH", path_with(&bin))
        .env("FD_REPORT", &report)
        .current_dir(dir.path());
    // tmpdisk itself inherits a stray fd 7 (as a careless parent might leak
    // one); mkfs must not see it either.
    let stray = fs::File::open("/dev/zero").unwrap();
    let stray_fd = std::os::fd::AsRawFd::as_raw_fd(&stray);
    // SAFETY: dup2 is async-signal-safe; the child only duplicates an fd.
    unsafe {
        c.pre_exec(move || {
            if libc::dup2(stray_fd, 7) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let server = spawn_listening(c, &sock);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    nbdinfo_ok(&["--size", &uri]);
    check_fd_report(&report, &images, "--unix listener");
    drop(server);
}

#[test]
fn mkfs_sees_only_stdio_and_the_image_in_stdio_mode() {
    require(&["python3-nbd", "mkfs.ext4"]);
    let dir = TestDir::new("fds-stdio");
    let bin = fake_mkfs(&dir);
    let report = dir.join("report");
    let images = dir.subdir("images");
    // Here tmpdisk's stdin/stdout are the client's socket: mkfs must get
    // /dev/null instead. The python client also leaks an fd 7 into tmpdisk.
    let script = r#"
stray = os.open("/dev/zero", os.O_RDONLY)
os.dup2(stray, 7)  # inheritable
h = nbd.NBD()
h.connect_command([sys.argv[1], "--stdio", "--tmpdir", sys.argv[2], "--type", "fake", "64M"])
check(h.pread(2, 1024 + 56) == b"\x53\xef", "the disk must be the ext4 built through mkfs.fake")
h.shutdown()
"#;
    let mut c = python(script, &[TMPDISK, images.to_str().unwrap()]);
    c.env("PATH", path_with(&bin)).env("FD_REPORT", &report);
    run_ok("python connect_command --stdio", c);
    check_fd_report(&report, &images, "--stdio");
}

/// A parent that ignored SIGCHLD passes that on through exec: the kernel
/// would then reap tmpdisk's children by itself, so that waiting for mkfs
/// failed (ECHILD) and the listener never saw a client's process end.
/// With --max-connections 1, three clients one after another each get an
/// ext4 disk only if mkfs was waited for and each process was reaped.
#[test]
fn an_ignored_sigchld_is_not_inherited() {
    require(&["python3-nbd", "mkfs.ext4"]);
    let dir = TestDir::new("sigchld-ignored");
    let images = dir.subdir("images");
    let sock = dir.join("nbd.sock");
    let mut c = tmpdisk_cmd(&[
        "--unix",
        sock.to_str().unwrap(),
        "--tmpdir",
        images.to_str().unwrap(),
        "--max-connections",
        "1",
        "64M",
    ]);
    c.current_dir(dir.path());
    // SAFETY: signal() with SIG_IGN is async-signal-safe and installs no
    // handler code.
    unsafe {
        c.pre_exec(|| {
            if libc::signal(libc::SIGCHLD, libc::SIG_IGN) == libc::SIG_ERR {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let server = spawn_listening(c, &sock);
    let script = r#"
# One connection at a time: the next waits until the last client's
# process is reaped (before the fix: never; already the probe
# connection's was not).
for i in range(3):
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    check(h.pread(2, 1024 + 56) == b"\x53\xef", "client %d: not an ext4 disk" % i)
    h.shutdown()
    del h
    print("client", i, "ok", flush=True)
"#;
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let out = run_within("three clients in turn", python(script, &[uri]), DEADLINE);
    assert!(
        out.status.success() && out.stdout.contains("client 2 ok"),
        "{out}\n{}",
        server.describe()
    );
    drop(server);
}

/// An mkfs that cannot be executed although it looks executable (here: a
/// script whose interpreter does not exist, so execve fails with ENOENT)
/// is reported with the reason, to the client and in the log. Before, the
/// child closed std's exec-status pipe before exec, and std aborted the
/// child when it could not write the error there: "killed by signal 6".
#[test]
fn an_mkfs_that_cannot_be_executed_is_named_with_the_reason() {
    require(&["python3-nbd"]);
    let dir = TestDir::new("mkfs-noexec");
    let bin = dir.subdir("bin");
    let path = bin.join("mkfs.broken");
    fs::write(&path, "#!/nonexistent/interpreter\n").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    let script = r#"
h = nbd.NBD()
try:
    h.connect_command(sys.argv[1:])
    print("connected")
except nbd.Error as e:
    print("refused:", e)
"#;
    let images = dir.subdir("images");
    let mut c = python(
        script,
        &[
            TMPDISK,
            "--stdio",
            "--tmpdir",
            images.to_str().unwrap(),
            "--type",
            "broken",
            "64M",
        ],
    );
    c.env("PATH", path_with(&bin));
    let out = run_ok("python connect_command --stdio", c);
    // tmpdisk's log is the python client's stderr (libnbd does not show
    // the server's option error text).
    assert!(
        out.stdout.contains("refused:")
            && out
                .stderr
                .contains("cannot run mkfs.broken: No such file or directory"),
        "{out}"
    );
    assert!(!out.stderr.contains("signal"), "{out}");
}

//! Shared helpers for the integration tests that run the built `tmpdisk`
//! against real NBD clients (libnbd's nbdinfo/nbdcopy/python bindings,
//! qemu-io) and real mkfs tools.
//!
//! Rules every test follows, enforced here:
//! - every process is spawned in its own process group and killed (with the
//!   whole group) when its guard drops, so a failing test leaves nothing behind;
//! - every wait has a deadline, so no test can hang;
//! - every test works in its own temporary directory, removed on drop;
//! - missing tools make the test fail with the Debian package to install,
//!   never skip.
pub mod json;
pub mod kernel_mount;
pub mod nbdraw;
pub mod pki;
pub mod relay;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The binary under test.
pub const TMPDISK: &str = env!("CARGO_BIN_EXE_tmpdisk");
/// Debian's python3 has the libnbd `nbd` module; the first `python3` on PATH
/// may be another installation without it.
pub const PYTHON: &str = "/usr/bin/python3";
/// The longest any single client or server step may take.
pub const DEADLINE: Duration = Duration::from_secs(30);
pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

// ---------------------------------------------------------------------------
// Tools

/// Every external tool a test may need, with the Debian package shipping
/// it: tests/tools, the table tests/run and bench/run read too.
const TOOLS: &str = include_str!("../tools");

/// The Debian package of `tool`, from tests/tools.
pub fn package_of(tool: &str) -> Option<&'static str> {
    TOOLS
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default())
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?, f.next()?))
        })
        .find(|(t, _)| *t == tool)
        .map(|(_, p)| p)
}

/// Where a tool is found: PATH, then /usr/sbin and /sbin (where the mkfs
/// tools live, which a non-root PATH often lacks).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Fails the test, naming the Debian packages to install, when any of the
/// tools is missing. `python3-nbd` stands for `import nbd` in [`PYTHON`].
pub fn require(tools: &[&str]) {
    let mut missing = Vec::new();
    for &tool in tools {
        let package = package_of(tool)
            .unwrap_or_else(|| panic!("test bug: tool {tool} is not in tests/tools"));
        let present = if tool == "python3-nbd" {
            Command::new(PYTHON)
                .args(["-c", "import nbd"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        } else {
            find_tool(tool).is_some()
        };
        if !present {
            missing.push(format!("{tool} (Debian package {package})"));
        }
    }
    assert!(
        missing.is_empty(),
        "missing test tools: {}; run tests/run as root to install them",
        missing.join(", ")
    );
}

// ---------------------------------------------------------------------------
// Temporary directories and ports

/// A per-test directory under the system temp dir, removed on drop.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        Self::new_in(&std::env::temp_dir(), name)
    }

    /// Like [`TestDir::new`], under `parent` (e.g. /var/tmp, where the
    /// filesystem matters to the test).
    pub fn new_in(parent: &Path, name: &str) -> TestDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let base = parent
            .canonicalize()
            .unwrap_or_else(|e| panic!("the directory {} must exist: {e}", parent.display()));
        let path = base.join(format!("tmpdisk-test-{name}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Creates (if needed) and returns a subdirectory.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        p
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// The names in a directory (sorted), for "the tmpdir must stay empty".
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

pub fn assert_dir_empty(dir: &Path, when: &str) {
    let names = dir_entries(dir);
    assert!(
        names.is_empty(),
        "the image tmpdir {} must be empty {when}, but it holds {names:?}",
        dir.display()
    );
}

// ---------------------------------------------------------------------------
// Processes

/// A spawned process (in its own process group) whose stdout and stderr are
/// collected in the background. Dropping it kills the whole group; if the
/// test is failing, its output is printed to help the diagnosis.
pub struct Proc {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

fn collect<R: Read + Send + 'static>(mut r: R, buf: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.lock().unwrap().extend_from_slice(&chunk[..n]),
            }
        }
    })
}

impl Proc {
    /// Spawns with stdin from /dev/null.
    pub fn spawn(name: &str, cmd: Command) -> Proc {
        Self::spawn_inner(name, cmd, false)
    }

    /// Spawns with a pipe on stdin (see [`Proc::send`]).
    pub fn spawn_with_stdin(name: &str, cmd: Command) -> Proc {
        Self::spawn_inner(name, cmd, true)
    }

    /// Spawns with stdin and stdout both on `fd` (one end of a socket
    /// pair: `tmpdisk --stdio`), stderr collected; [`Proc::stdout`] stays
    /// empty.
    pub fn spawn_on(name: &str, mut cmd: Command, fd: std::os::fd::OwnedFd) -> Proc {
        let out = fd.try_clone().expect("dup");
        cmd.stdin(Stdio::from(fd))
            .stdout(Stdio::from(out))
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name} ({cmd:?}): {e}"));
        // `cmd` holds our copies of the socket: the child must be its only
        // holder, or it never sees the client hang up.
        drop(cmd);
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![collect(child.stderr.take().unwrap(), stderr.clone())];
        Proc {
            name: name.to_string(),
            stdin: None,
            child,
            status: None,
            stdout,
            stderr,
            readers,
        }
    }

    fn spawn_inner(name: &str, mut cmd: Command, piped_stdin: bool) -> Proc {
        cmd.stdin(if piped_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name} ({cmd:?}): {e}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), stdout.clone()),
            collect(child.stderr.take().unwrap(), stderr.clone()),
        ];
        Proc {
            name: name.to_string(),
            stdin: child.stdin.take(),
            child,
            status: None,
            stdout,
            stderr,
            readers,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Writes to the process's stdin (spawned with [`Proc::spawn_with_stdin`]).
    pub fn send(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin was not piped");
        stdin
            .write_all(text.as_bytes())
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("writing to {}'s stdin: {e}", self.name));
    }

    /// The exit status if the process has exited (reaping it).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Waits up to `limit` for the process to exit, then for its output to
    /// be complete: a caller that checks stderr right after an exit must see
    /// all of it (CI once read it while the reader thread still held the
    /// last line).
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            if let Some(s) = self.try_status() {
                self.drain_output();
                return Some(s);
            }
            if Instant::now() >= end {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit (failing the test after [`DEADLINE`]),
    /// then for its output to be complete.
    pub fn wait(&mut self) -> ExitStatus {
        self.wait_timeout(DEADLINE).unwrap_or_else(|| {
            panic!(
                "{} did not exit within {DEADLINE:?}\n{}",
                self.name,
                self.describe()
            )
        })
    }

    /// Waits for the output readers to reach end of file. The pipes close
    /// when the last holder exits; a leftover grandchild could keep them
    /// open, so this wait is bounded.
    fn drain_output(&self) {
        let end = Instant::now() + Duration::from_secs(5);
        while !self.readers.iter().all(|r| r.is_finished()) && Instant::now() < end {
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until stdout contains `needle`; fails the test on timeout or if
    /// the process exits first.
    pub fn wait_stdout(&mut self, needle: &str, limit: Duration) {
        self.wait_output(needle, limit, true)
    }

    /// Like [`Proc::wait_stdout`] for stderr.
    pub fn wait_stderr(&mut self, needle: &str, limit: Duration) {
        self.wait_output(needle, limit, false)
    }

    fn wait_output(&mut self, needle: &str, limit: Duration, stdout: bool) {
        let end = Instant::now() + limit;
        loop {
            let text = if stdout { self.stdout() } else { self.stderr() };
            if text.contains(needle) {
                return;
            }
            if let Some(status) = self.try_status() {
                // Give the readers a moment to drain the pipes.
                thread::sleep(Duration::from_millis(50));
                let text = if stdout { self.stdout() } else { self.stderr() };
                if text.contains(needle) {
                    return;
                }
                panic!(
                    "{} exited ({status}) before printing {needle:?}\n{}",
                    self.name,
                    self.describe()
                );
            }
            assert!(
                Instant::now() < end,
                "{} did not print {needle:?} within {limit:?}\n{}",
                self.name,
                self.describe()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends a signal to the process group.
    pub fn kill_group(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's process group; no memory involved.
        unsafe {
            libc::kill(-(self.child.id() as i32), signal);
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "--- {} stdout ---\n{}\n--- {} stderr ---\n{}",
            self.name,
            self.stdout(),
            self.name,
            self.stderr()
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_group(libc::SIGKILL);
        let _ = self.wait_timeout(Duration::from_secs(10));
        if thread::panicking() {
            eprintln!("{}", self.describe());
        }
    }
}

/// What a finished client said.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Output {
    pub fn describe(&self) -> String {
        format!(
            "exit status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs a command to completion (within [`DEADLINE`]).
pub fn run(name: &str, cmd: Command) -> Output {
    run_within(name, cmd, DEADLINE)
}

/// Runs a command to completion within `limit`: past it the command is
/// killed and the test fails.
pub fn run_within(name: &str, cmd: Command, limit: Duration) -> Output {
    let mut p = Proc::spawn(name, cmd);
    if p.wait_timeout(limit).is_none() {
        panic!("{name} did not finish within {limit:?}\n{}", p.describe());
    }
    let status = p.wait();
    Output {
        status,
        stdout: p.stdout(),
        stderr: p.stderr(),
    }
}

/// Polls `f` until it returns `Some`, failing the test after `limit`.
pub fn wait_until<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {limit:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits up to `limit` for a child started outside [`Proc`] to exit;
/// false if it still runs.
pub fn wait_child(child: &mut Child, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if Instant::now() >= end => return false,
            Ok(None) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Runs a command that must succeed.
pub fn run_ok(name: &str, cmd: Command) -> Output {
    let out = run(name, cmd);
    assert!(out.status.success(), "{name} failed\n{}", out.describe());
    out
}

/// A `Command` from a program (looked up like [`find_tool`], so the sbin
/// tools work with a user's PATH) and arguments.
pub fn cmd<S: AsRef<std::ffi::OsStr>>(program: &str, args: &[S]) -> Command {
    let path = if program.contains('/') {
        PathBuf::from(program)
    } else {
        find_tool(program).unwrap_or_else(|| PathBuf::from(program))
    };
    let mut c = Command::new(path);
    c.args(args);
    c
}

/// `tmpdisk ARGS` with a clean environment (see [`clean_env`]).
pub fn tmpdisk_cmd<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Command {
    let mut c = Command::new(TMPDISK);
    c.args(args);
    clean_env(&mut c);
    c
}

/// `WRAPPER... tmpdisk ARGS` (e.g. `setpriv --reuid=nobody ...`) with the
/// same clean environment as [`tmpdisk_cmd`].
pub fn wrapped_tmpdisk_cmd<S: AsRef<std::ffi::OsStr>>(wrapper: &[&str], args: &[S]) -> Command {
    let mut c = cmd(wrapper[0], &wrapper[1..]);
    c.arg(TMPDISK).args(args);
    clean_env(&mut c);
    c
}

/// Removes what would change tmpdisk's behaviour behind the test's back:
/// activation variables, TMPDISK_*, and JOURNAL_STREAM (which would send
/// the logs to the journal instead of stderr).
fn clean_env(c: &mut Command) {
    for var in [
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "JOURNAL_STREAM",
    ] {
        c.env_remove(var);
    }
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("TMPDISK_") {
            c.env_remove(var);
        }
    }
}

/// `/usr/bin/python3 -c PRELUDE+SCRIPT ARGS`; see [`PY_PRELUDE`].
pub fn python<S: AsRef<std::ffi::OsStr>>(script: &str, args: &[S]) -> Command {
    let mut c = Command::new(PYTHON);
    c.arg("-c")
        .arg(format!("{PY_PRELUDE}\n{script}"))
        .args(args);
    // The nbd module's connect_command runs tmpdisk with this environment.
    clean_env(&mut c);
    c
}

/// Python helpers shared by the libnbd scripts.
pub const PY_PRELUDE: &str = r#"
import nbd, os, sys

def check(cond, msg):
    if not cond:
        sys.exit("ASSERTION FAILED: " + msg)

def connect(uri):
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h

def extents(h, offset, length):
    """base:allocation extents [(offset, length, flags)] covering the range."""
    out = []
    end = offset + length
    pos = offset
    while pos < end:
        got = []
        def cb(meta, off, entries, err):
            if meta == nbd.CONTEXT_BASE_ALLOCATION:
                p = off
                for i in range(0, len(entries), 2):
                    got.append((p, entries[i], entries[i + 1]))
                    p += entries[i]
            return 0
        h.block_status(min(end - pos, 1 << 30), pos, cb)
        check(len(got) > 0, "block_status returned no base:allocation extent at %d" % pos)
        for (o, l, f) in got:
            check(o == pos, "extent starts at %d, expected %d" % (o, pos))
            check(l > 0, "zero-length extent at %d" % o)
            out.append((o, min(l, end - o), f))
            pos = o + l
            if pos >= end:
                break
    return out

def flags_over(h, offset, length):
    """The set of base:allocation flag values seen over the range."""
    return set(f for (_, _, f) in extents(h, offset, length))
"#;

// ---------------------------------------------------------------------------
// Servers

/// How the test reaches tmpdisk.
pub enum Mode {
    /// `tmpdisk --unix SOCKET`
    Unix,
    /// `tmpdisk --listen 127.0.0.1:PORT`
    Tcp,
    /// `systemd-socket-activate --accept -l 127.0.0.1:PORT tmpdisk`
    SocketActivate,
}

/// A running tmpdisk listener (or systemd-socket-activate in front of
/// tmpdisk) serving images out of its own tmpdir.
pub struct Server {
    pub proc: Proc,
    uri: String,
    images: PathBuf,
}

impl Server {
    /// Starts a `--unix` listener with `args` (size, type, …) after
    /// `--tmpdir`; waits until it accepts connections.
    pub fn unix(dir: &TestDir, args: &[&str]) -> Server {
        Self::start(dir, Mode::Unix, args, &[])
    }

    pub fn start(dir: &TestDir, mode: Mode, args: &[&str], env: &[(&str, &str)]) -> Server {
        let images = dir.subdir("images");
        Self::start_in(dir, mode, &images, args, env)
    }

    /// Like [`Server::start`] with the image tmpdir given.
    pub fn start_in(
        dir: &TestDir,
        mode: Mode,
        images: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let tmpdir = images.to_str().expect("utf-8 path");
        let (mut c, uri, probe): (Command, String, Box<dyn Fn() -> bool>) = match mode {
            Mode::Unix => {
                let sock = dir.join("nbd.sock");
                let mut c = tmpdisk_cmd(&["--unix", sock.to_str().unwrap(), "--tmpdir", tmpdir]);
                c.args(args);
                let uri = format!("nbd+unix:///?socket={}", sock.display());
                (c, uri, Box::new(move || UnixStream::connect(&sock).is_ok()))
            }
            Mode::Tcp => {
                let port = free_port();
                let addr = format!("127.0.0.1:{port}");
                let mut c = tmpdisk_cmd(&["--listen", &addr, "--tmpdir", tmpdir]);
                c.args(args);
                let uri = format!("nbd://{addr}");
                (c, uri, Box::new(move || TcpStream::connect(&addr).is_ok()))
            }
            Mode::SocketActivate => {
                let port = free_port();
                let addr = format!("127.0.0.1:{port}");
                let mut c = cmd("systemd-socket-activate", &["--accept", "-l", &addr]);
                // systemd-socket-activate passes on only PATH, HOME, USER,
                // TERM and what -E names.
                for (k, v) in env {
                    c.arg(format!("-E{k}={v}"));
                }
                c.args([TMPDISK, "--tmpdir", tmpdir]).args(args);
                (c, format!("nbd://{addr}"), Box::new(|| true))
            }
        };
        for (k, v) in env {
            c.env(k, v);
        }
        c.current_dir(dir.path());
        let name = match mode {
            Mode::Unix => "tmpdisk --unix",
            Mode::Tcp => "tmpdisk --listen",
            Mode::SocketActivate => "systemd-socket-activate tmpdisk",
        };
        let mut proc = Proc::spawn(name, c);
        if let Mode::SocketActivate = mode {
            proc.wait_stderr("Listening on", Duration::from_secs(10));
        } else {
            // A probe connection costs a forked child that sees EOF at once;
            // it never asks for the export, so no image is built.
            let end = Instant::now() + Duration::from_secs(10);
            while !probe() {
                if let Some(status) = proc.try_status() {
                    panic!(
                        "{name} exited ({status}) instead of listening\n{}",
                        proc.describe()
                    );
                }
                assert!(
                    Instant::now() < end,
                    "{name} did not accept connections within 10 s\n{}",
                    proc.describe()
                );
                thread::sleep(Duration::from_millis(20));
            }
        }
        Server {
            proc,
            uri,
            images: images.to_path_buf(),
        }
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The tmpdir where this server's images live.
    pub fn images(&self) -> &Path {
        &self.images
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

// ---------------------------------------------------------------------------
// Clients

/// `nbdinfo ARGS`, which must succeed; returns stdout.
pub fn nbdinfo_ok(args: &[&str]) -> String {
    run_ok("nbdinfo", cmd("nbdinfo", args)).stdout
}

/// `nbdinfo --json URI` parsed, with the single export object.
pub fn nbdinfo_json(uri: &str) -> (json::Json, json::Json) {
    let text = nbdinfo_ok(&["--json", uri]);
    let doc = json::parse(&text).unwrap_or_else(|e| panic!("nbdinfo --json: {e}\n{text}"));
    let exports = doc["exports"].as_array().expect("exports array").to_vec();
    assert_eq!(
        exports.len(),
        1,
        "nbdinfo --json must show one export:\n{text}"
    );
    (doc, exports[0].clone())
}

/// One line of `nbdinfo --map`: offset, length, base:allocation flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub flags: u32,
}

/// Parses `nbdinfo --map` text output, checking the extents are contiguous
/// from 0.
pub fn parse_map(text: &str) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> u64 {
            f.get(i)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad nbdinfo --map line {line:?}"))
        };
        let e = Extent {
            offset: num(0),
            length: num(1),
            flags: num(2) as u32,
        };
        let expected = out.last().map_or(0, |p| p.offset + p.length);
        assert_eq!(
            e.offset, expected,
            "nbdinfo --map extents must be contiguous:\n{text}"
        );
        out.push(e);
    }
    out
}

/// A python libnbd client that connects, runs `setup`, prints READY and then
/// waits for a line on stdin before running `finish` and printing DONE. It
/// keeps connections open while the test looks at the server.
pub struct HeldClient {
    pub proc: Proc,
}

impl HeldClient {
    pub fn start(setup: &str, finish: &str, args: &[&str]) -> HeldClient {
        let script = format!(
            "{setup}\nprint('READY', flush=True)\nsys.stdin.readline()\n{finish}\nprint('DONE', flush=True)\n"
        );
        let mut proc = Proc::spawn_with_stdin("python libnbd client", python(&script, args));
        proc.wait_stdout("READY", DEADLINE);
        HeldClient { proc }
    }

    /// Lets the script go on and waits for it to succeed.
    pub fn finish(mut self) -> String {
        self.proc.send("go\n");
        let status = self.proc.wait();
        assert!(
            status.success(),
            "python libnbd client failed after READY\n{}",
            self.proc.describe()
        );
        self.proc.stdout()
    }
}

// ---------------------------------------------------------------------------
// Looking at processes

/// Sends `signal` to process `pid` (one the test started, or one its
/// server forked).
pub fn send_signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) takes two integers; no memory is involved.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// (ppid, state) of a process, from /proc/PID/stat.
pub fn proc_stat(pid: u32) -> Option<(u32, char)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ..."; comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut f = rest.split(' ');
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((ppid, state))
}

fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Children of `parent` as (pid, state).
pub fn children_of(parent: u32) -> Vec<(u32, char)> {
    all_pids()
        .into_iter()
        .filter_map(|pid| match proc_stat(pid) {
            Some((ppid, state)) if ppid == parent => Some((pid, state)),
            _ => None,
        })
        .collect()
}

/// The open fds of a process: fd number → link target.
pub fn fds_of(pid: u32) -> BTreeMap<u32, String> {
    let mut out = BTreeMap::new();
    if let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in rd.flatten() {
            if let (Some(fd), Ok(target)) = (
                e.file_name().to_str().and_then(|s| s.parse().ok()),
                fs::read_link(e.path()),
            ) {
                out.insert(fd, target.to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// Every (pid, fd target) where some process has a file inside `dir` open:
/// the images being served from that tmpdir.
pub fn image_holders(dir: &Path) -> Vec<(u32, String)> {
    let prefix = format!("{}/", dir.display());
    let mut out = Vec::new();
    for pid in all_pids() {
        for target in fds_of(pid).into_values() {
            if target.starts_with(&prefix) {
                out.push((pid, target));
            }
        }
    }
    out
}

/// The distinct pids holding an image in `dir`.
pub fn image_holder_pids(dir: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = image_holders(dir).into_iter().map(|(p, _)| p).collect();
    pids.sort();
    pids.dedup();
    pids
}

/// Waits until no process holds a file in `dir` (the serving processes have
/// exited), failing the test after [`DEADLINE`].
pub fn wait_no_image_holders(dir: &Path, when: &str) {
    let end = Instant::now() + DEADLINE;
    loop {
        let holders = image_holders(dir);
        if holders.is_empty() {
            return;
        }
        assert!(
            Instant::now() < end,
            "{when}: processes still hold images in {} after {DEADLINE:?}: {holders:?}",
            dir.display()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `count` distinct processes hold an image in `dir`; returns them.
pub fn wait_image_holders(dir: &Path, count: usize, when: &str) -> Vec<u32> {
    let end = Instant::now() + DEADLINE;
    loop {
        let pids = image_holder_pids(dir);
        if pids.len() == count {
            return pids;
        }
        assert!(
            Instant::now() < end,
            "{when}: expected {count} processes holding an image in {}, found {:?}",
            dir.display(),
            image_holders(dir)
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Checks that an fd target is an unlinked image in `dir` (O_TMPFILE shows as
/// `DIR/#INODE (deleted)`).
pub fn is_deleted_image(target: &str, dir: &Path) -> bool {
    target.starts_with(&format!("{}/", dir.display())) && target.ends_with(" (deleted)")
}

/// Waits until the listener `parent` has reaped its exited children (no
/// zombies) and at most `alive` children remain.
pub fn wait_children_reaped(parent: u32, alive: usize, when: &str) {
    let end = Instant::now() + DEADLINE;
    loop {
        let kids = children_of(parent);
        let zombies = kids.iter().filter(|(_, s)| *s == 'Z').count();
        if zombies == 0 && kids.len() <= alive {
            return;
        }
        assert!(
            Instant::now() < end,
            "{when}: children of {parent} (pid, state) {kids:?}: expected no zombies and at most {alive} alive"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// Disk contents

/// Copies the whole export to a local file with nbdcopy.
pub fn copy_out(uri: &str, dest: &Path) {
    run_ok(
        "nbdcopy",
        cmd("nbdcopy", &[uri, dest.to_str().expect("utf-8 path")]),
    );
}

/// `blkid -o value -s TAG FILE`.
pub fn blkid_tag(file: &Path, tag: &str) -> String {
    let out = run_ok(
        "blkid",
        cmd(
            "blkid",
            &["-p", "-o", "value", "-s", tag, file.to_str().unwrap()],
        ),
    );
    out.stdout.trim_end_matches('\n').to_string()
}

/// Blocks of the filesystem at `path` times its block size, as `stat -f`
/// reports them: `count` is `%f` (free blocks) or `%a` (free blocks
/// available to unprivileged users).
pub fn statfs_bytes(path: &Path, count: &str) -> u64 {
    let format = format!("{count} %S");
    let out = run_ok(
        "stat -f",
        cmd("stat", &["-f", "-c", &format, path.to_str().unwrap()]),
    );
    let v: Vec<u64> = out
        .stdout
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    v[0] * v[1]
}

/// The value of field `key` in one of the server's stderr log lines
/// (`... key=value ...`, quotes taken off), if it has one.
pub fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..].split(' ').next().map(|v| v.trim_matches('"'))
}

/// The `client served` lines of a server's log, one per client served.
pub fn served_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("client served"))
        .collect()
}

/// Asserts `s` has exactly one non-empty line (an error message for people).
pub fn assert_one_line(s: &str, what: &str) {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected exactly one line on stderr, got {}:\n{s}",
        lines.len()
    );
}

// ---------------------------------------------------------------------------
// Root-only fixtures and a closer look at processes (tests/faults.rs)

/// Fails (never skips) a test that needs root, saying why.
pub fn require_root(why: &str) {
    // SAFETY: geteuid has no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test must run as root ({why}); CI runs as root: run tests/run as root"
    );
}

/// A filesystem mounted for one test, unmounted on drop (lazily if busy).
pub struct Mount {
    path: PathBuf,
}

impl Mount {
    /// A tmpfs of `mib` MiB at `path` (created if needed).
    pub fn tmpfs(path: &Path, mib: u64) -> Mount {
        fs::create_dir_all(path).unwrap();
        let opts = format!("size={mib}m,mode=0755");
        run_ok(
            "mount tmpfs",
            cmd(
                "mount",
                &["-t", "tmpfs", "-o", &opts, "tmpfs", path.to_str().unwrap()],
            ),
        );
        Mount {
            path: path.to_path_buf(),
        }
    }

    /// `bindfs SOURCE PATH`: a FUSE view of `source` at `path`. FUSE
    /// filesystems like it have no O_TMPFILE.
    pub fn bindfs(source: &Path, path: &Path) -> Mount {
        fs::create_dir_all(source).unwrap();
        fs::create_dir_all(path).unwrap();
        run_ok(
            "bindfs",
            cmd(
                "bindfs",
                &[source.to_str().unwrap(), path.to_str().unwrap()],
            ),
        );
        Mount {
            path: path.to_path_buf(),
        }
    }

    /// The filesystem in the image file `image`, through a loop device
    /// (which umount detaches).
    pub fn loop_device(image: &Path, path: &Path) -> Mount {
        fs::create_dir_all(path).unwrap();
        run_ok(
            "mount -o loop",
            cmd(
                "mount",
                &[
                    "-o",
                    "loop",
                    image.to_str().unwrap(),
                    path.to_str().unwrap(),
                ],
            ),
        );
        Mount {
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes available to unprivileged users, as statvfs says.
    pub fn free(&self) -> u64 {
        statfs_bytes(&self.path, "%a")
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let p = self.path.to_str().unwrap().to_string();
        let ok = Command::new("umount")
            .arg(&p)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").args(["-l", &p]).status();
        }
    }
}

/// The fields of /proc/PID/stat after the command name, from the state on
/// (field 3 of proc(5) is index 0).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(rest.split(' ').map(str::to_string).collect())
}

/// The lowest fd number `pid` has free: a new fd needs one below the
/// soft RLIMIT_NOFILE, so a limit of this makes its next one fail (EMFILE).
pub fn lowest_free_fd(pid: u32) -> u64 {
    let fds = fds_of(pid);
    assert!(!fds.is_empty(), "no fds seen in /proc/{pid}/fd");
    (0..).find(|n| !fds.contains_key(n)).map(u64::from).unwrap()
}

/// Set `pid`'s soft RLIMIT_NOFILE to `n` (at most its hard limit).
pub fn set_soft_nofile(pid: u32, n: u64) {
    let mut lim = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit64 reading into a stack value.
    let r = unsafe { libc::prlimit64(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut lim) };
    assert_eq!(r, 0, "prlimit {pid}: {}", std::io::Error::last_os_error());
    lim.rlim_cur = n.min(lim.rlim_max);
    // SAFETY: prlimit64 with a stack value and no old-limit pointer.
    let r = unsafe { libc::prlimit64(pid as i32, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
    assert_eq!(r, 0, "prlimit {pid}: {}", std::io::Error::last_os_error());
}

/// User + system CPU time of a process, in clock ticks (1/100 s).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// A line's value from /proc/PID/status ("NoNewPrivs", "Seccomp", "VmRSS").
pub fn proc_status(pid: u32, key: &str) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

/// Resident memory of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    proc_status(pid, "VmRSS")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    matches!(proc_stat(pid), Some((_, s)) if s != 'Z')
}

/// Waits up to `limit` for all of `pids` to be gone (or zombies); returns
/// the ones still alive.
pub fn wait_gone(pids: &[u32], limit: Duration) -> Vec<u32> {
    let end = Instant::now() + limit;
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if left.is_empty() || Instant::now() >= end {
            return left;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Live (non-zombie) children of `parent`.
pub fn live_children(parent: u32) -> Vec<u32> {
    children_of(parent)
        .into_iter()
        .filter(|(_, s)| *s != 'Z')
        .map(|(p, _)| p)
        .collect()
}

/// Waits until `parent` has exactly `n` live children; returns them.
pub fn wait_live_children(parent: u32, n: usize, when: &str) -> Vec<u32> {
    let end = Instant::now() + DEADLINE;
    loop {
        let kids = live_children(parent);
        if kids.len() == n {
            return kids;
        }
        assert!(
            Instant::now() < end,
            "{when}: expected {n} live children of {parent}, found {kids:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until a file exists with at least `lines` lines; returns them.
pub fn wait_lines(path: &Path, lines: usize, limit: Duration) -> Vec<String> {
    let end = Instant::now() + limit;
    loop {
        if let Ok(t) = fs::read_to_string(path) {
            let v: Vec<String> = t.lines().map(str::to_string).collect();
            if v.len() >= lines && t.ends_with('\n') {
                return v;
            }
        }
        assert!(
            Instant::now() < end,
            "{} did not get {lines} lines within {limit:?}",
            path.display()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

//! Putting a filesystem on the image: `mkfs.TYPE` (or the user's command),
//! run as a child without a shell.
//!
//! The child gets the image as its fd 3 and the path `/proc/self/fd/3`
//! (the image has no name anywhere else), `/dev/null` on stdin and stdout
//! (with `--stdio`, our stdout *is* the client), and a pipe on stderr whose
//! text becomes the log line and the client's error message. Every other fd
//! of ours is close-on-exec, so that is all it inherits. It dies with us
//! (PR_SET_PDEATHSIG), runs in its own process group so a timeout can kill
//! all of it, and its fsync calls are turned into no-ops: the image dies
//! with the process, so flushing it to the platter is pure waste (mkfs's
//! writes are in the page cache we read from either way).

use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, killpg};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::Pid;

use crate::cli::FsSpec;
use crate::image::Image;
use crate::nbd::storage::Storage;
use crate::sys;

/// The fd number the child finds the image on.
const IMAGE_FD: i32 = 3;
const IMAGE_PATH: &str = "/proc/self/fd/3";
/// How much of the child's stderr we keep (the start holds the reason).
const STDERR_KEEP: usize = 16 * 1024;

/// Why the disk could not be initialised, in words for the client and log.
#[derive(Debug, Clone)]
pub struct MkfsError(pub String);

impl std::fmt::Display for MkfsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Initialise `image` as `spec` says, waiting at most `timeout`.
pub fn run(image: &Image, spec: &FsSpec, timeout: Option<Duration>) -> Result<(), MkfsError> {
    let (mut cmd, what) = match &spec.command {
        Some(script) => (
            user_command(script, spec, image.size()),
            "command".to_string(),
        ),
        None => {
            let program = find_mkfs(&spec.fs_type)?;
            let mut cmd = Command::new(&program);
            cmd.args(mkfs_args(spec, OsStr::new(IMAGE_PATH)));
            (cmd, format!("mkfs.{}", spec.fs_type))
        }
    };
    // What systemd handed us is ours alone.
    for var in [
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    sys::prepare_child(&mut cmd, image.as_fd(), IMAGE_FD, Some(&NO_SYNC));
    let stop = StopSignals::catch().map_err(|e| MkfsError(format!("{what}: {e}")))?;
    let mut child = cmd
        .spawn()
        .map_err(|e| MkfsError(format!("cannot run {what}: {e}")))?;
    let outcome = wait(&mut child, timeout, &stop);
    let (ended, stderr) = outcome.map_err(|e| MkfsError(format!("{what}: {e}")))?;
    let said = summarize(&stderr);
    match ended {
        Ended::Exited(st) if st.success() => Ok(()),
        Ended::Exited(st) => Err(MkfsError(format!("{what} {}{said}", describe(st)))),
        Ended::TimedOut => Err(MkfsError(format!(
            "{what} did not finish within {} s and was killed{said}",
            timeout.map_or(0, |t| t.as_secs())
        ))),
        Ended::Stopped(sig) => {
            // We were told to stop: the child's group is dead, now we
            // stop the way the signal asked.
            tracing::info!(signal = sig.as_str(), "stopping during {what}");
            drop(stop);
            let _ = nix::sys::signal::raise(sig);
            std::process::exit(128 + sig as i32);
        }
    }
}

/// How waiting for the child ended.
enum Ended {
    Exited(ExitStatus),
    /// Past the setup timeout; the child's group was killed.
    TimedOut,
    /// A stop signal arrived for us; the child's group was killed.
    Stopped(Signal),
}

/// While a child runs, the signals that stop us (SIGTERM from systemd or
/// our listener, SIGINT, SIGHUP) are blocked and read from a signalfd, so
/// that the child's whole process group is killed before we go: PDEATHSIG
/// reaches only the child itself, not what a command started. The mask is
/// restored on drop (children reset theirs before exec).
struct StopSignals {
    fd: SignalFd,
    old: SigSet,
}

impl StopSignals {
    fn catch() -> io::Result<Self> {
        let mut set = SigSet::empty();
        for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
            set.add(s);
        }
        let old = set.thread_swap_mask(SigmaskHow::SIG_BLOCK)?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .inspect_err(|_| {
                let _ = old.thread_set_mask();
            })?;
        Ok(StopSignals { fd, old })
    }

    fn received(&self) -> Option<Signal> {
        match self.fd.read_signal() {
            Ok(Some(info)) => Signal::try_from(info.ssi_signo as i32).ok(),
            _ => None,
        }
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        let _ = self.old.thread_set_mask();
    }
}

/// `/bin/sh -c CMD`, with the values in the environment, never in the
/// script text.
fn user_command(script: &OsStr, spec: &FsSpec, size: u64) -> Command {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(script);
    cmd.env("disk", IMAGE_PATH)
        .env("size", size.to_string())
        .env("type", &spec.fs_type)
        .env("label", spec.label.as_deref().unwrap_or_default());
    cmd
}

/// Flags for each filesystem's mkfs: force (the target is a file, not a
/// device), quiet, keep the image sparse and skip work a fresh image does
/// not need (it reads as zeroes already), and the label with the flag this
/// mkfs expects. The user's options come after ours, so they win.
pub fn mkfs_args(spec: &FsSpec, disk: &OsStr) -> Vec<OsString> {
    let (defaults, label_flag): (&[&str], Option<&str>) = match spec.fs_type.as_str() {
        // resize_inode reserves group descriptor blocks for growing the
        // filesystem online, and mke2fs writes them all: 1066 of its 1079
        // writes on a 16 GiB image. An NBD export never grows, so they are
        // pure cost (time, and 4 MiB of real disk per client).
        "ext2" | "ext3" | "ext4" => (
            &[
                "-F",
                "-q",
                "-O",
                "^resize_inode",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
            ],
            Some("-L"),
        ),
        "xfs" => (&["-f", "-q", "-K"], Some("-L")),
        "btrfs" => (&["-f", "-q", "-K"], Some("-L")),
        // mkfs.fat: -L does not exist, -n is the volume name.
        "vfat" | "fat" | "msdos" => (&[], Some("-n")),
        // mkntfs: -n means "do nothing"; -F: not a block device; -Q: quick.
        "ntfs" => (&["-F", "-Q", "-q"], Some("-L")),
        "exfat" => (&[], Some("-L")),
        "f2fs" => (&["-f", "-q"], Some("-l")),
        "minix" | "cramfs" | "bfs" => (&[], None),
        _ => (&[], Some("-L")),
    };
    let mut args: Vec<OsString> = defaults.iter().map(OsString::from).collect();
    if let (Some(flag), Some(label)) = (label_flag, &spec.label) {
        args.push(flag.into());
        args.push(label.clone());
    }
    args.extend(spec.mkfs_options.iter().cloned());
    args.push(disk.to_owned());
    args
}

/// Find `mkfs.TYPE` on PATH or in the sbin directories (which a non-root
/// PATH often lacks).
pub fn find_mkfs(fs_type: &str) -> Result<PathBuf, MkfsError> {
    let name = format!("mkfs.{fs_type}");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(
        ["/usr/local/sbin", "/usr/sbin", "/sbin"]
            .iter()
            .map(PathBuf::from),
    );
    for dir in dirs {
        let p = dir.join(&name);
        if is_executable(&p) {
            return Ok(p);
        }
    }
    Err(MkfsError(format!(
        "{name} not found on PATH or in /usr/sbin, /sbin: install {}",
        package_for(fs_type)
    )))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The Debian/Fedora package that ships `mkfs.TYPE`.
fn package_for(fs_type: &str) -> String {
    match fs_type {
        "ext2" | "ext3" | "ext4" => "e2fsprogs",
        "xfs" => "xfsprogs",
        "vfat" | "fat" | "msdos" => "dosfstools",
        "btrfs" => "btrfs-progs",
        "ntfs" => "ntfs-3g",
        "exfat" => "exfatprogs",
        "f2fs" => "f2fs-tools",
        "minix" | "cramfs" | "bfs" => "util-linux",
        "jfs" => "jfsutils",
        "nilfs2" => "nilfs-tools",
        "reiserfs" => "reiserfsprogs",
        "udf" => "udftools",
        other => return format!("the package that provides mkfs.{other}"),
    }
    .to_string()
}

/// Collect the child's stderr and wait for it to exit, within `timeout`.
/// Returns None for the status when it had to be killed. Stderr is read
/// while waiting (a chatty child must not block on a full pipe) and kept
/// only up to a bound.
fn wait(
    child: &mut std::process::Child,
    timeout: Option<Duration>,
    stop: &StopSignals,
) -> io::Result<(Ended, Vec<u8>)> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut stderr = child.stderr.take();
    let pidfd = sys::pidfd_open(child.id())?;
    let mut kept = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut exited = false;
    while !exited {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let stopped = stop.received();
        if left == Some(Duration::ZERO) || stopped.is_some() {
            reap(child)?;
            return Ok((stopped.map_or(Ended::TimedOut, Ended::Stopped), kept));
        }
        let mut fds = vec![
            PollFd::new(pidfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.fd.as_fd(), PollFlags::POLLIN),
        ];
        if let Some(e) = &stderr {
            fds.push(PollFd::new(e.as_fd(), PollFlags::POLLIN));
        }
        sys::poll_fds(&mut fds, left)?;
        exited = fds[0].any().unwrap_or(false);
        let err_ready = fds.get(2).is_some_and(|f| f.any().unwrap_or(false));
        drop(fds);
        if err_ready && !read_some(&mut stderr, &mut kept, &mut chunk) {
            stderr = None;
        }
    }
    // Exited: take what is left on stderr without waiting for others that
    // may still hold the pipe open.
    while let Some(e) = &stderr {
        if !sys::poll_one(e.as_fd(), PollFlags::POLLIN, Some(Duration::ZERO))?
            || !read_some(&mut stderr, &mut kept, &mut chunk)
        {
            break;
        }
    }
    Ok((Ended::Exited(reap(child)?), kept))
}

/// Kill the child's whole process group, then collect the child. Whatever
/// it started and left behind (a command's background job) must not
/// outlive setup: it could hold the image open or keep running under our
/// name. The group is killed before the child is reaped, while its zombie
/// still holds the group's id, so the id cannot meanwhile name another
/// group.
fn reap(child: &mut std::process::Child) -> io::Result<ExitStatus> {
    let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
    child.wait()
}

/// Read once from the pipe into `kept` (bounded). False at EOF or error.
fn read_some(
    pipe: &mut Option<std::process::ChildStderr>,
    kept: &mut Vec<u8>,
    chunk: &mut [u8],
) -> bool {
    let Some(p) = pipe else { return false };
    match p.read(chunk) {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            let room = STDERR_KEEP.saturating_sub(kept.len());
            kept.extend_from_slice(&chunk[..n.min(room)]);
            true
        }
    }
}

fn describe(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("failed with exit status {c}"),
        (None, Some(s)) => format!(
            "was killed by signal {s} ({})",
            nix::sys::signal::Signal::try_from(s).map_or("unknown", |s| s.as_str())
        ),
        _ => format!("failed ({st})"),
    }
}

/// The child's stderr as one line to append to a message: ": what it said".
/// A usage text after the reason (mkfs.xfs prints 1.5 KB of it) is left
/// out: the reason is what the client needs.
fn summarize(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let said: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let reason = said
        .iter()
        .take_while(|l| !l.to_ascii_lowercase().starts_with("usage:"))
        .count();
    // Nothing but usage: then its first line is all there is.
    let keep = if reason == 0 {
        said.len().min(1)
    } else {
        reason
    };
    let lines = &said[..keep];
    if lines.is_empty() {
        return String::new();
    }
    let mut joined = lines.join(" / ");
    if joined.len() > 3000 {
        let mut end = 3000;
        while !joined.is_char_boundary(end) {
            end -= 1;
        }
        joined.truncate(end);
        joined.push_str(" ...");
    }
    format!(": {joined}")
}

// --- the no-fsync seccomp filter ------------------------------------------------

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

const fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    }
}

const LD_ARCH: u32 = 4; // offsetof(struct seccomp_data, arch)
const LD_NR: u32 = 0; // offsetof(struct seccomp_data, nr)

/// A seccomp program for the mkfs child: fsync, fdatasync, syncfs, sync and
/// sync_file_range return 0 at once; everything else is allowed. Measured
/// (shared/notes/measured.md): 23 ms of mkfs.ext4's 36 ms on a 16 GiB
/// image is its final fsync.
static NO_SYNC: [libc::sock_filter; 10] = [
    stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, LD_ARCH),
    jeq(AUDIT_ARCH, 0, 6),
    stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, LD_NR),
    jeq(libc::SYS_fsync as u32, 5, 0),
    jeq(libc::SYS_fdatasync as u32, 4, 0),
    jeq(libc::SYS_syncfs as u32, 3, 0),
    jeq(libc::SYS_sync as u32, 2, 0),
    jeq(libc::SYS_sync_file_range as u32, 1, 0),
    stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ERRNO),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(fs: &str, label: Option<&str>, opts: &[&str]) -> FsSpec {
        FsSpec {
            fs_type: fs.into(),
            label: label.map(OsString::from),
            mkfs_options: opts.iter().map(OsString::from).collect(),
            command: None,
        }
    }

    #[test]
    fn label_flag_depends_on_the_filesystem() {
        let d = OsStr::new("/d");
        let a = mkfs_args(&spec("vfat", Some("X"), &[]), d);
        assert_eq!(a, ["-n", "X", "/d"]);
        let a = mkfs_args(&spec("ntfs", Some("X"), &[]), d);
        assert!(a.windows(2).any(|w| w[0] == "-L" && w[1] == "X"), "{a:?}");
        assert!(!a.iter().any(|x| x == "-n"));
        let a = mkfs_args(&spec("xfs", Some("X"), &["-m", "crc=1"]), d);
        assert_eq!(a, ["-f", "-q", "-K", "-L", "X", "-m", "crc=1", "/d"]);
    }

    #[test]
    fn user_options_come_after_the_fast_defaults() {
        let a = mkfs_args(
            &spec("ext4", None, &["-E", "lazy_itable_init=0"]),
            OsStr::new("/d"),
        );
        let ours = a
            .iter()
            .position(|x| x == "lazy_itable_init=1,lazy_journal_init=1,nodiscard");
        let theirs = a.iter().position(|x| x == "lazy_itable_init=0");
        assert!(ours < theirs, "{a:?}");
        assert_eq!(a.last().map(|s| s.as_os_str()), Some(OsStr::new("/d")));
    }

    #[test]
    fn a_missing_mkfs_names_its_package() {
        let e = find_mkfs("btrfs-does-not-exist").unwrap_err();
        assert!(e.0.contains("mkfs.btrfs-does-not-exist not found"), "{e}");
        assert_eq!(package_for("btrfs"), "btrfs-progs");
        assert_eq!(package_for("xfs"), "xfsprogs");
    }

    #[test]
    fn stderr_is_summarized_on_one_line() {
        assert_eq!(summarize(b""), "");
        assert_eq!(summarize(b"bad\n\n  worse \n"), ": bad / worse");
        assert_eq!(
            summarize(b"Filesystem must be larger than 300MB.\nUsage: mkfs.xfs\n/* blocksize */\n"),
            ": Filesystem must be larger than 300MB."
        );
    }
}

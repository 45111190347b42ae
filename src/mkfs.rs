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
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::cli::FsSpec;
use crate::image::Image;
use crate::nbd::storage::Storage;
use crate::{sandbox, sys};

/// The fd number the child finds the image on.
const IMAGE_FD: i32 = 3;
const IMAGE_PATH: &str = "/proc/self/fd/3";
/// How much of the child's stderr we keep (the start holds the reason).
const STDERR_KEEP: usize = 16 * 1024;

/// Why the disk could not be initialised. The text is what the client and
/// the log are told.
#[derive(Debug)]
pub enum SetupError {
    /// `mkfs.TYPE` is not installed.
    NotFound { program: String, package: String },
    /// It could not be started, or waiting for it failed.
    Run { what: String, error: io::Error },
    /// It ran and failed: how, and the start of what it said on stderr.
    Failed {
        what: String,
        how: String,
        said: String,
    },
    /// It ran past the setup timeout and was killed.
    TimedOut {
        what: String,
        secs: u64,
        said: String,
    },
    /// The client went away while it ran; it was killed.
    ClientLeft,
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SetupError::NotFound { program, package } => write!(
                f,
                "{program} not found on PATH or in /usr/sbin, /sbin: install {package}"
            ),
            SetupError::Run { what, error } => write!(f, "cannot run {what}: {error}"),
            SetupError::Failed { what, how, said } => write!(f, "{what} {how}{said}"),
            SetupError::TimedOut { what, secs, said } => {
                write!(
                    f,
                    "{what} did not finish within {secs} s and was killed{said}"
                )
            }
            SetupError::ClientLeft => write!(f, "the client left while its disk was being built"),
        }
    }
}

/// Initialise `image` as `spec` says, waiting at most `timeout`. While it
/// runs, `client` (the connection's read side) is watched: a client that
/// hangs up with nothing left unread (unless `pipelined`: it sent more
/// than the option that asked for the disk) is gone, and so is the setup.
///
/// Nothing the setup starts outlives it: where the kernel permits, it runs
/// in a PID namespace of its own (see `sys::prepare_child`); in any case
/// this process is a subreaper, and every process left once the setup is
/// over (a command's `setsid` job, a double fork) is killed.
pub fn run(
    image: &Image,
    spec: &FsSpec,
    timeout: Option<Duration>,
    client: Option<BorrowedFd<'_>>,
    pipelined: bool,
) -> Result<(), SetupError> {
    let (mut cmd, what) = match &spec.command {
        Some(script) => (
            user_command(script, spec, image.size()),
            "command".to_string(),
        ),
        // A blank disk: nothing to run.
        None if spec.fs_type == BLANK => return Ok(()),
        None => {
            let program = find_mkfs(&spec.fs_type)?;
            let name = program.file_name().map_or_else(
                || program.display().to_string(),
                |n| n.to_string_lossy().into(),
            );
            let mut cmd = Command::new(&program);
            cmd.args(mkfs_args(spec, OsStr::new(IMAGE_PATH)));
            (cmd, name)
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
    let run_err = |error: io::Error| SetupError::Run {
        what: what.clone(),
        error,
    };
    // Best effort: without the filter mkfs only takes longer.
    let filter = sandbox::no_sync_filter()
        .inspect_err(|e| tracing::debug!(error = %e, "mkfs runs without its no-fsync filter"))
        .ok();
    // The child's stand-in watches this to clean up if we are killed.
    let me = sys::pidfd_open(std::process::id()).map_err(run_err)?;
    sys::prepare_child(&mut cmd, image.as_fd(), IMAGE_FD, me.as_fd(), filter);
    sys::become_subreaper().map_err(run_err)?;
    let stop = sys::BlockedSignals::block(&[Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP])
        .map_err(run_err)?;
    let mut child = cmd.spawn().map_err(run_err)?;
    drop(cmd);
    drop(me);
    let watch = client.filter(|_| !pipelined);
    let outcome = wait(&mut child, timeout, &stop, watch);
    // The setup is over, however it ended: whatever it left behind goes.
    let left = sys::kill_children(&|_| false);
    if left > 0 {
        tracing::debug!(processes = left, "killed what {what} left running");
    }
    let (ended, stderr) = outcome.map_err(run_err)?;
    let said = summarize(&stderr);
    match ended {
        SetupEnd::Exited(st) if st.success() => Ok(()),
        SetupEnd::Exited(st) => Err(SetupError::Failed {
            what,
            how: describe(st),
            said,
        }),
        SetupEnd::TimedOut => Err(SetupError::TimedOut {
            what,
            secs: timeout.map_or(0, |t| t.as_secs()),
            said,
        }),
        SetupEnd::ClientLeft => Err(SetupError::ClientLeft),
        SetupEnd::Stopped(sig) => {
            // We were told to stop: the child's tree is dead, now we stop
            // the way the signal asked.
            tracing::info!(signal = sig.as_str(), "stopping during {what}");
            stop.restore();
            let _ = nix::sys::signal::raise(sig);
            std::process::exit(128 + sig as i32);
        }
    }
}

/// How waiting for the child ended.
enum SetupEnd {
    Exited(ExitStatus),
    /// Past the setup timeout; the child's group was killed.
    TimedOut,
    /// A stop signal arrived for us; the child's group was killed.
    Stopped(Signal),
    /// The client hung up; the child's group was killed.
    ClientLeft,
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
        //
        // 4 KiB blocks whatever the size: mke2fs picks 1 KiB for disks
        // under 512 MiB, and the kernel cannot mount those on a device of
        // 4096-byte logical blocks ("EXT4-fs (nbd0): bad block size 1024"
        // with nbd-client -b 4096). The user's -b, later, still wins.
        "ext2" | "ext3" | "ext4" => (
            &[
                "-F",
                "-q",
                "-b",
                "4096",
                "-O",
                "^resize_inode",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
            ],
            Some("-L"),
        ),
        // 4 KiB sectors: on a file mkfs.xfs picks 512, and the kernel then
        // refuses a device of 4096-byte logical blocks ("XFS (nbd0): device
        // supports 4096 byte sectors (not 512)" with nbd-client -b 4096).
        // mkfs.xfs refuses a respecified -s, so a user's own sector size
        // replaces ours (see below).
        "xfs" if sets_sector_size(&spec.mkfs_options) => (&["-f", "-q", "-K"], Some("-L")),
        "xfs" => (&["-f", "-q", "-K", "-s", "size=4096"], Some("-L")),
        "btrfs" => (&["-f", "-q", "-K"], Some("-L")),
        // mkfs.fat: -L does not exist, -n is the volume name.
        "vfat" | "fat" | "msdos" => (&[], Some("-n")),
        // mkntfs: -n means "do nothing"; -F: not a block device; -Q: quick.
        "ntfs" => (&["-F", "-Q", "-q"], Some("-L")),
        "exfat" => (&[], Some("-L")),
        "f2fs" => (&["-f", "-q"], Some("-l")),
        "minix" | "cramfs" | "bfs" => (&[], None),
        // mkswap: -f, a file is fine.
        SWAP => (&["-f"], Some("-L")),
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

/// Whether mkfs.xfs options set the sector size (`-s ...`, or
/// `sectsize=` of -d or -l).
fn sets_sector_size(options: &[OsString]) -> bool {
    options.iter().any(|o| {
        let o = o.to_string_lossy();
        o == "-s" || o.starts_with("-s") && o.len() > 2 || o.contains("sectsize=")
    })
}

/// How long a label each filesystem's mkfs takes: the longest, and in what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelLimit {
    Bytes(usize),
    /// UTF-16 code units (exFAT, NTFS and F2FS store labels so).
    Utf16(usize),
}

/// The label limit of `fs_type`, where tmpdisk knows it. mke2fs cuts a
/// longer label short without failing; the others fail, but only once a
/// client has asked for its disk: tmpdisk refuses such a label at start.
pub fn label_limit(fs_type: &str) -> Option<LabelLimit> {
    Some(match fs_type {
        "ext2" | "ext3" | "ext4" | SWAP => LabelLimit::Bytes(16),
        "xfs" => LabelLimit::Bytes(12),
        "vfat" | "fat" | "msdos" => LabelLimit::Bytes(11),
        "btrfs" => LabelLimit::Bytes(255),
        "exfat" => LabelLimit::Utf16(11),
        "ntfs" => LabelLimit::Utf16(128),
        "f2fs" => LabelLimit::Utf16(512),
        _ => return None,
    })
}

/// Refuse a label `fs_type`'s mkfs would refuse or cut short.
pub fn check_label(fs_type: &str, label: &OsStr) -> Result<(), String> {
    let Some(limit) = label_limit(fs_type) else {
        return Ok(());
    };
    let (len, max, unit) = match limit {
        LabelLimit::Bytes(max) => (label.len(), max, "bytes"),
        LabelLimit::Utf16(max) => {
            let Some(text) = label.to_str() else {
                return Err(format!("{fs_type} labels must be UTF-8"));
            };
            (text.encode_utf16().count(), max, "characters")
        }
    };
    if len > max {
        return Err(format!(
            "label {:?} is {len} {unit} long; {fs_type} labels hold at most {max}",
            label.to_string_lossy()
        ));
    }
    Ok(())
}

/// The type of a blank disk: no mkfs, all zeroes (nbd-server's
/// `temporary`).
pub const BLANK: &str = "none";
/// The type of a swap disk: mkswap instead of mkfs (what LTSP's nbdswapd
/// served thin clients).
pub const SWAP: &str = "swap";

/// Find the program that makes `fs_type` (`mkfs.TYPE`, or mkswap) on PATH
/// or in the sbin directories (which a non-root PATH often lacks).
pub fn find_mkfs(fs_type: &str) -> Result<PathBuf, SetupError> {
    let name = match fs_type {
        SWAP => "mkswap".to_string(),
        t => format!("mkfs.{t}"),
    };
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
    Err(SetupError::NotFound {
        program: name,
        package: package_for(fs_type),
    })
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
        "minix" | "cramfs" | "bfs" | SWAP => "util-linux",
        "jfs" => "jfsutils",
        "nilfs2" => "nilfs-tools",
        "reiserfs" => "reiserfsprogs",
        "udf" => "udftools",
        other => return format!("the package that provides mkfs.{other}"),
    }
    .to_string()
}

/// Collect the child's stderr and wait for it to exit, within `timeout`,
/// for as long as no stop signal comes and the client (if watched) stays.
/// Stderr is read while waiting (a chatty child must not block on a full
/// pipe) and kept only up to a bound.
fn wait(
    child: &mut std::process::Child,
    timeout: Option<Duration>,
    stop: &sys::BlockedSignals,
    mut client: Option<BorrowedFd<'_>>,
) -> io::Result<(SetupEnd, Vec<u8>)> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut stderr = child.stderr.take();
    let pidfd = sys::pidfd_open(child.id())?;
    let mut kept = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut exited = false;
    while !exited {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let stopped = stop.next();
        if left == Some(Duration::ZERO) || stopped.is_some() {
            reap(child)?;
            return Ok((stopped.map_or(SetupEnd::TimedOut, SetupEnd::Stopped), kept));
        }
        let mut fds = vec![
            PollFd::new(pidfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        if let Some(c) = client {
            // Readable with nothing to read is the end of the client's
            // input (the peer closed, or shut down its side).
            fds.push(PollFd::new(c, PollFlags::POLLIN));
        }
        if let Some(e) = &stderr {
            fds.push(PollFd::new(e.as_fd(), PollFlags::POLLIN));
        }
        sys::poll_fds(&mut fds, left)?;
        let ready = |f: &PollFd| f.any().unwrap_or(false);
        exited = ready(&fds[0]);
        let hung_up = client.is_some() && ready(&fds[2]);
        let err_ready = fds.last().is_some_and(ready) && stderr.is_some();
        drop(fds);
        if let (true, Some(c)) = (hung_up, client) {
            // Nothing to read: the client has gone (or shut down its side
            // with nothing more to say, which leaves nothing to serve).
            // Something to read: it sent more than GO, and may half-close
            // and still want the replies; stop watching.
            if sys::pending_input(c).unwrap_or(0) == 0 {
                reap(child)?;
                return Ok((SetupEnd::ClientLeft, kept));
            }
            client = None;
        }
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
    Ok((SetupEnd::Exited(reap(child)?), kept))
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
        assert_eq!(
            a,
            [
                "-f",
                "-q",
                "-K",
                "-s",
                "size=4096",
                "-L",
                "X",
                "-m",
                "crc=1",
                "/d"
            ]
        );
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
    fn disks_mount_at_4096_byte_logical_blocks_by_default() {
        let d = OsStr::new("/d");
        let a = mkfs_args(&spec("xfs", None, &[]), d);
        assert!(
            a.windows(2).any(|w| w[0] == "-s" && w[1] == "size=4096"),
            "{a:?}"
        );
        let a = mkfs_args(&spec("xfs", None, &["-s", "size=512"]), d);
        assert_eq!(a.iter().filter(|x| *x == "-s").count(), 1, "{a:?}");
        let a = mkfs_args(&spec("xfs", None, &["-d", "sectsize=512"]), d);
        assert!(!a.iter().any(|x| x == "size=4096"), "{a:?}");
        let a = mkfs_args(&spec("ext4", None, &[]), d);
        assert!(
            a.windows(2).any(|w| w[0] == "-b" && w[1] == "4096"),
            "{a:?}"
        );
    }

    #[test]
    fn labels_too_long_for_their_filesystem_are_refused() {
        let ok = |fs: &str, l: &str| check_label(fs, OsStr::new(l));
        assert!(ok("vfat", "ABCDEFGHIJK").is_ok());
        assert!(
            ok("vfat", "ABCDEFGHIJKL")
                .unwrap_err()
                .contains("at most 11")
        );
        assert!(ok("xfs", "abcdefghijkl").is_ok());
        assert!(ok("xfs", "abcdefghijklm").is_err());
        assert!(ok("ext4", &"x".repeat(16)).is_ok());
        assert!(
            ok("ext4", &"x".repeat(17))
                .unwrap_err()
                .contains("17 bytes")
        );
        assert!(ok("ext4", "ééééééééé").is_err(), "18 bytes");
        assert!(ok("exfat", "ééééééééééé").is_ok(), "11 characters");
        assert!(ok("exfat", "éééééééééééé").is_err());
        assert!(ok("someotherfs", &"x".repeat(1000)).is_ok());
    }

    #[test]
    fn a_missing_mkfs_names_its_package() {
        let e = find_mkfs("btrfs-does-not-exist").unwrap_err();
        assert!(
            e.to_string()
                .contains("mkfs.btrfs-does-not-exist not found"),
            "{e}"
        );
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

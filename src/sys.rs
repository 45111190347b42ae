//! The few system calls that safe std and nix do not cover, each in a small
//! function; every `unsafe` block of the program lives here with a
//! `// SAFETY:` comment. Plus safe helpers around poll(2) that several
//! modules share.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::unistd::Pid;

/// poll(2) on `fds` for at most `timeout` (None: forever), restarting after
/// signals with the time that is left. Returns how many fds are ready (0 on
/// timeout).
pub fn poll_fds(fds: &mut [PollFd], timeout: Option<Duration>) -> io::Result<usize> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let wait = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Round up: a sub-millisecond remainder must not busy-loop.
                let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
        };
        match poll(fds, wait) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(0) if deadline.is_some_and(|d| Instant::now() < d) => continue,
            Ok(n) => return Ok(n as usize),
        }
    }
}

/// Wait until one fd is ready for `events` (or has hung up). False on timeout.
pub fn poll_one(
    fd: BorrowedFd<'_>,
    events: PollFlags,
    timeout: Option<Duration>,
) -> io::Result<bool> {
    let mut fds = [PollFd::new(fd, events)];
    Ok(poll_fds(&mut fds, timeout)? > 0)
}

/// Take the client's stdin/stdout for our own use (as close-on-exec fds)
/// and point fds 0 and 1 at /dev/null, so that nothing else, a child
/// included, can ever read from or write to the client by accident.
pub fn take_stdio() -> io::Result<(OwnedFd, OwnedFd)> {
    let stdin = io::stdin();
    let stdout = io::stdout();
    let rd = dup_cloexec(stdin.as_fd())?;
    let wr = dup_cloexec(stdout.as_fd())?;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    nix::unistd::dup2_stdin(&null)?;
    nix::unistd::dup2_stdout(&null)?;
    Ok((rd, wr))
}

fn dup_cloexec(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let raw = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(3))?;
    // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor; nothing
    // else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Mark an fd close-on-exec (fds we are handed may not be).
pub fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(())
}

/// An fd that becomes readable when process `pid` exits, so a wait can be
/// bounded with poll(2) instead of blocking in waitpid.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and returns a new fd or -1; no
    // memory is passed.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor (pidfds are always
    // close-on-exec) that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as RawFd) })
}

/// Where a fork left us.
pub enum Forked {
    Parent(Pid),
    Child,
}

/// fork(2), for the standalone listener: the child serves one connection
/// with the same code systemd's per-connection instances run.
///
/// Callers must be single-threaded (the listener never starts a thread).
pub fn fork() -> io::Result<Forked> {
    // SAFETY: the listener process is single-threaded, so the child gets a
    // consistent copy of every lock and allocator state.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(Forked::Parent(child)),
        nix::unistd::ForkResult::Child => Ok(Forked::Child),
    }
}

/// Prepare `cmd` (mkfs or the user's command) so that in the child:
/// - the image is fd `target` and every fd above it is closed: ours are
///   close-on-exec anyway, but whatever our own parent leaked to us must not
///   reach mkfs either, so fds 0-2 and the image are all it gets;
/// - it is killed if we die (PR_SET_PDEATHSIG), so no mkfs outlives a
///   killed server;
/// - fsync and friends are filtered to succeed without doing anything when
///   `no_sync` holds a seccomp program (see `mkfs::no_sync_filter`).
pub fn prepare_child(
    cmd: &mut Command,
    image: BorrowedFd<'_>,
    target: RawFd,
    no_sync: Option<&'static [libc::sock_filter]>,
) {
    let src = image.as_raw_fd();
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec, so it only makes
    // async-signal-safe calls (dup2, fcntl, close_range, sigprocmask,
    // prctl, getppid, _exit) on integers, a stack sigset and a `'static`
    // filter program; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if src == target {
                // dup2 onto itself would keep FD_CLOEXEC: clear it instead.
                if libc::fcntl(target, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(src, target) < 0 {
                return Err(io::Error::last_os_error());
            }
            close_from(target + 1);
            // Children inherit the signal mask, and we block stop signals
            // while waiting for this one (see mkfs::StopSignals).
            let mut empty = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(empty.as_mut_ptr());
            if libc::sigprocmask(libc::SIG_SETMASK, empty.as_ptr(), std::ptr::null_mut()) < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) < 0 {
                return Err(io::Error::last_os_error());
            }
            // We may have died between fork and prctl: then nobody would
            // ever send the signal.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            if let Some(filter) = no_sync {
                let prog = libc::sock_fprog {
                    len: filter.len() as libc::c_ushort,
                    filter: filter.as_ptr() as *mut libc::sock_filter,
                };
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 {
                    // Best effort: mkfs still works (only slower) without it.
                    libc::prctl(
                        libc::PR_SET_SECCOMP,
                        libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                        &prog as *const libc::sock_fprog as libc::c_ulong,
                    );
                }
            }
            Ok(())
        });
    }
}

/// Close every fd from `first` up. Only async-signal-safe calls: it runs
/// between fork and exec.
///
/// # Safety
/// Must only run in a freshly forked child about to exec, where no Rust
/// object owns the fds being closed.
unsafe fn close_from(first: RawFd) {
    // SAFETY: close_range takes integers only; closing fds is what the
    // caller wants, and no Rust object in this child will use them again.
    unsafe {
        if libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            0,
        ) == 0
        {
            return;
        }
        // Kernels before 5.9: close them one by one, up to the fd limit.
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur.min(65536) as RawFd
        } else {
            4096
        };
        for fd in first..max {
            libc::close(fd);
        }
    }
}

/// Ignore SIGXFSZ: with a file size limit (systemd's LimitFSIZE=) below the
/// disk size, ftruncate or a write past the limit then fails with EFBIG,
/// which the client hears about, instead of killing the process silently.
pub fn ignore_sigxfsz() -> io::Result<()> {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: SIG_IGN installs no handler code, so nothing can run in
    // signal context.
    unsafe { signal(Signal::SIGXFSZ, SigHandler::SigIgn) }?;
    Ok(())
}

/// Make the process non-dumpable: no core dumps of client data, and its
/// /proc entries (fds included) belong to root, so another instance
/// running as the same (dynamic) user cannot open this client's image
/// through /proc/PID/fd.
pub fn set_not_dumpable() -> io::Result<()> {
    nix::sys::prctl::set_dumpable(false)?;
    Ok(())
}

/// The largest file this process may create (RLIMIT_FSIZE), if limited.
pub fn file_size_limit() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit};
    match getrlimit(Resource::RLIMIT_FSIZE) {
        Ok((soft, _)) if soft != libc::RLIM_INFINITY => Some(soft),
        _ => None,
    }
}

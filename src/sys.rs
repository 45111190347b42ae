#![allow(unsafe_code)]
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
use nix::fcntl::{FcntlArg, fcntl};
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

/// Prepare `cmd` (mkfs or the user's command) so that:
/// - the image is its fd `target` and every fd above it is closed: ours are
///   close-on-exec anyway, but whatever our own parent leaked to us must not
///   reach mkfs either, so fds 0-2 and the image are all it gets;
/// - nothing it starts outlives it, nor us ([`contain`]);
/// - `filter`, a seccomp program (mkfs's "fsync does nothing", see
///   `sandbox::no_sync_filter`), is installed when given.
///
/// `server` is a pidfd of this process, opened before the fork (see
/// [`contain`]); it must stay open until `cmd` has been spawned.
pub fn prepare_child(
    cmd: &mut Command,
    image: BorrowedFd<'_>,
    target: RawFd,
    server: BorrowedFd<'_>,
    filter: Option<seccompiler::BpfProgram>,
) {
    let src = image.as_raw_fd();
    let server = server.as_raw_fd();
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec, so it only makes
    // async-signal-safe calls (dup2, fcntl, close_range, sigprocmask,
    // prctl, getppid, and those of `contain`) on integers, stack values and
    // a filter program built before the fork; it allocates nothing.
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
            // Children inherit the signal mask, and we block stop signals
            // while waiting for this one (see mkfs::run).
            let mut empty = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(empty.as_mut_ptr());
            if libc::sigprocmask(libc::SIG_SETMASK, empty.as_ptr(), std::ptr::null_mut()) < 0 {
                return Err(io::Error::last_os_error());
            }
            // We may have died already; from here on `server` tells.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            contain(server)?;
            close_fds(target + 1, None, Closing::AtExec);
            // The command dies with whoever is its parent now.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(filter) = &filter {
                // Best effort: mkfs still works (only slower) without it.
                let _ = seccompiler::apply_filter(filter);
            }
            Ok(())
        });
    }
}

/// Make sure nothing the command starts outlives the command or the
/// server, whatever kills which.
///
/// The forked child stays as a *stand-in* for the command and forks again.
/// The stand-in is a subreaper, so a job the command leaves behind (`&`,
/// `setsid`, a double fork) becomes its child; it waits for the command,
/// or for the server (its pidfd `server`) to die, then kills every child
/// it has left, and exits the way the command did. So the server still
/// waits for, times out and kills one child, and a SIGKILLed server still
/// has its setup cleaned up.
///
/// Where the kernel permits (as root, or in a new user namespace where
/// unprivileged user namespaces are allowed; systemd's RestrictNamespaces=
/// refuses both, and there the unit's cgroup is the last net), the command
/// also gets a PID namespace of its own. Then the stand-in's child is the
/// namespace's init, a few lines of ours: when it exits, the kernel kills
/// everything in the namespace. Init is not the command itself, because a
/// namespace's init ignores the signals it has no handler for when they
/// come from inside (a command's `kill $$`, or SIGPIPE, would do nothing).
/// Init reaps orphans and, when the command ends, passes its wait status
/// up a pipe and exits.
///
/// Returns in the process that goes on to exec the command.
///
/// # Safety
/// Only between fork and exec, in a single-threaded child, with `server` a
/// pidfd.
unsafe fn contain(server: RawFd) -> io::Result<()> {
    // SAFETY: prctl, unshare, pipe2, clone, and the stand-in's and init's
    // calls (see there) are async-signal-safe and take integers and
    // pointers to stack values.
    unsafe {
        if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) < 0 {
            return Err(io::Error::last_os_error());
        }
        let pid_ns = libc::unshare(libc::CLONE_NEWPID) == 0
            || libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWPID) == 0;
        let mut pipe = [-1 as RawFd; 2];
        if libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) < 0 {
            return Err(io::Error::last_os_error());
        }
        let [status_r, status_w] = pipe;
        let child = raw_fork()?;
        if child > 0 {
            libc::close(status_w);
            stand_in(child, server, pid_ns.then_some(status_r));
        }
        libc::close(status_r);
        if !pid_ns {
            libc::close(status_w);
            return Ok(());
        }
        // Init, pid 1 of the namespace; dies with the stand-in.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) < 0 {
            return Err(io::Error::last_os_error());
        }
        let command = raw_fork()?;
        if command > 0 {
            be_init(command, status_w);
        }
        // The command, pid 2 (the pipe's end is close-on-exec).
        Ok(())
    }
}

/// fork(2) as a raw clone: no atfork handlers in a forked child.
///
/// # Safety
/// Only between fork and exec, in a single-threaded child.
unsafe fn raw_fork() -> io::Result<libc::pid_t> {
    // SAFETY: clone with only SIGCHLD and no stack is fork; the child
    // continues on a copy of this stack.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::SIGCHLD as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pid as libc::pid_t)
}

/// The namespace's init: hold nothing, reap every child (orphans come to
/// us), and when `command` ends send its wait status up `status_w` and
/// exit, which ends the namespace.
///
/// # Safety
/// Only in the init process of [`contain`].
unsafe fn be_init(command: libc::pid_t, status_w: RawFd) -> ! {
    // SAFETY: close_range, waitpid, write and _exit on integers and a
    // stack word.
    unsafe {
        close_all_but(status_w, -1);
        loop {
            let mut status = 0;
            let pid = libc::waitpid(-1, &mut status, 0);
            if pid == command {
                let bytes = status.to_ne_bytes();
                libc::write(status_w, bytes.as_ptr().cast(), bytes.len());
                libc::_exit(0);
            }
            if pid < 0 && *libc::__errno_location() != libc::EINTR {
                libc::_exit(127);
            }
        }
    }
}

/// The stand-in: hold nothing but what it watches; wait for `child` (the
/// command, or the namespace's init) or for the server to die; kill every
/// child it has left; end the way the command did (its exit status, or
/// its signal, as `status_r` says when there is a namespace).
///
/// # Safety
/// Only in the forked child of [`contain`].
unsafe fn stand_in(child: libc::pid_t, server: RawFd, status_r: Option<RawFd>) -> ! {
    // SAFETY: close, pidfd_open, poll, waitpid, read, kill, signal and
    // _exit on integers and stack values.
    unsafe {
        close_all_but(server, status_r.unwrap_or(-1));
        let child_fd = libc::syscall(libc::SYS_pidfd_open, child, 0) as RawFd;
        let mut status = 0;
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: server,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: child_fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            if libc::poll(fds.as_mut_ptr(), 2, -1) < 0 {
                if *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                // Cannot watch: fall back to waiting for the child.
                fds[1].revents = libc::POLLIN;
            }
            if fds[0].revents != 0 {
                // The server is gone: so is its client, and so goes the
                // setup.
                libc::kill(child, libc::SIGKILL);
                kill_all_children();
                libc::_exit(1);
            }
            if fds[1].revents != 0 {
                while libc::waitpid(child, &mut status, 0) < 0 {
                    if *libc::__errno_location() != libc::EINTR {
                        break;
                    }
                }
                break;
            }
        }
        kill_all_children();
        if let Some(r) = status_r {
            let mut said = [0u8; 4];
            if libc::read(r, said.as_mut_ptr().cast(), said.len()) == said.len() as isize {
                status = i32::from_ne_bytes(said);
            }
        }
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            libc::signal(sig, libc::SIG_DFL);
            libc::kill(libc::getpid(), sig);
            libc::_exit(128 + sig);
        }
        libc::_exit(libc::WEXITSTATUS(status))
    }
}

/// Kill and reap every child of this (single-threaded, subreaper) process,
/// round after round, until none is left: each death may hand us orphans.
/// Reads /proc/thread-self/children into a stack buffer.
///
/// # Safety
/// Only between fork and exec (no allocation, async-signal-safe calls).
unsafe fn kill_all_children() {
    // SAFETY: open, read, close, kill and waitpid on a constant path, a
    // stack buffer and integers.
    unsafe {
        for _round in 0..64 {
            let fd = libc::open(
                c"/proc/thread-self/children".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            );
            if fd < 0 {
                return;
            }
            let mut buf = [0u8; 4096];
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len()).max(0) as usize;
            libc::close(fd);
            // A full buffer may end inside a pid: only whole ones count
            // (the rest come next round).
            let whole = if n == buf.len() {
                buf.iter().rposition(|&b| b == b' ').unwrap_or(0)
            } else {
                n
            };
            let mut killed = 0;
            for token in buf[..whole].split(|&b| b == b' ' || b == b'\n') {
                let mut pid: libc::pid_t = 0;
                for &b in token {
                    pid = pid
                        .saturating_mul(10)
                        .saturating_add(libc::pid_t::from(b - b'0'));
                }
                if pid > 0 && token.iter().all(u8::is_ascii_digit) {
                    libc::kill(pid, libc::SIGKILL);
                    killed += 1;
                }
            }
            if killed == 0 {
                return;
            }
            for _ in 0..killed {
                let mut st = 0;
                if libc::waitpid(-1, &mut st, 0) < 0 && *libc::__errno_location() == libc::ECHILD {
                    break;
                }
            }
        }
    }
}

/// Make this process the reaper of every orphan among its descendants:
/// a job a command started and left (`setsid`, a double fork) becomes our
/// child instead of init's, so [`kill_children`] can end it.
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)?;
    Ok(())
}

/// Our live children, from /proc (every thread's list).
pub fn children() -> Vec<Pid> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(list) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .map(Pid::from_raw),
            );
        }
    }
    out
}

/// Kill every child except `keep`, reap them, and repeat for the orphans
/// that their deaths hand to us (a subreaper), until none is left.
/// Returns how many were killed.
pub fn kill_children(keep: &dyn Fn(Pid) -> bool) -> usize {
    use nix::sys::signal::{Signal, kill};
    let mut killed = 0;
    // Each round reaches one generation deeper; a bound keeps a process
    // tree that forks faster than we kill (TasksMax= bounds it anyway)
    // from holding us forever.
    for _ in 0..64 {
        let victims: Vec<Pid> = children().into_iter().filter(|&p| !keep(p)).collect();
        if victims.is_empty() {
            break;
        }
        for &p in &victims {
            let _ = kill(p, Signal::SIGKILL);
        }
        for &p in &victims {
            let _ = nix::sys::wait::waitpid(p, None);
        }
        killed += victims.len();
    }
    killed
}

/// Close every fd but `a` and `b` (-1 for none), now. For the stand-in
/// and init, which go on without exec: among what they close is std's
/// exec-status pipe, which `Command::spawn` reads until every copy of
/// it is closed.
///
/// # Safety
/// As [`close_fds`].
unsafe fn close_all_but(a: RawFd, b: RawFd) {
    let (lo, hi) = (a.min(b), a.max(b));
    // SAFETY: as this function's contract.
    unsafe {
        let mut from = 0;
        for keep in [lo, hi] {
            if keep >= from {
                if keep > from {
                    close_fds(from, Some(keep - 1), Closing::Now);
                }
                from = keep + 1;
            }
        }
        close_fds(from, None, Closing::Now);
    }
}

/// When [`close_fds`] closes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Closing {
    Now,
    /// At exec (FD_CLOEXEC): for the process about to exec, whose
    /// exec-status pipe (std's, close-on-exec) must stay open to report
    /// an exec that fails.
    AtExec,
}

/// Close the fds from `first` to `last` (None: all above `first`), now or
/// at exec. Only async-signal-safe calls: it runs between fork and exec.
///
/// # Safety
/// Must only run in a freshly forked child, where no Rust object owns the
/// fds closed now.
unsafe fn close_fds(first: RawFd, last: Option<RawFd>, how: Closing) {
    /// CLOSE_RANGE_CLOEXEC (Linux 5.11), from linux/close_range.h.
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    let flags = match how {
        Closing::Now => 0,
        Closing::AtExec => CLOSE_RANGE_CLOEXEC,
    };
    let upto = last.map_or(libc::c_uint::MAX, |l| l as libc::c_uint);
    // SAFETY: close_range, getrlimit, close and fcntl take integers and a
    // pointer to a stack value; closing fds is what the caller wants.
    unsafe {
        if libc::syscall(libc::SYS_close_range, first as libc::c_uint, upto, flags) == 0 {
            return;
        }
        // close_range refused (a kernel before 5.9, or 5.11 for the flag; a
        // seccomp policy that does not know it): one by one, up to the fd
        // limit.
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        let limit = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur.min(65536) as RawFd
        } else {
            4096
        };
        let end = last.map_or(limit, |l| l.saturating_add(1).min(limit));
        for fd in first..end {
            match how {
                Closing::Now => libc::close(fd),
                Closing::AtExec => libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC),
            };
        }
    }
}

/// The signal dispositions tmpdisk relies on, whatever it inherited:
/// - SIGXFSZ ignored: with a file size limit (systemd's LimitFSIZE=)
///   below the disk size, ftruncate or a write past the limit then fails
///   with EFBIG, which the client hears about, instead of killing the
///   process silently;
/// - SIGCHLD at its default: a parent that ignored it (the setting
///   survives exec) would have the kernel reap our children by itself, so
///   that waiting for mkfs failed with ECHILD and the listener never saw a
///   client's process end (its connection count only grew).
pub fn set_signal_dispositions() -> io::Result<()> {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: SIG_IGN and SIG_DFL install no handler code, so nothing can
    // run in signal context.
    unsafe {
        signal(Signal::SIGXFSZ, SigHandler::SigIgn)?;
        signal(Signal::SIGCHLD, SigHandler::SigDfl)?;
    }
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

/// Give the heap's free memory back to the kernel. What start-up and
/// negotiation allocated and freed (the command line, the exports file,
/// the handshake) stays mapped otherwise, in every client's process.
/// (musl's allocator returns freed memory by itself and has no
/// malloc_trim.)
pub fn release_free_memory() {
    // SAFETY: malloc_trim only walks glibc's own heap; it takes a size
    // and touches no memory of ours.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The largest file this process may create (RLIMIT_FSIZE), if limited.
pub fn file_size_limit() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit};
    match getrlimit(Resource::RLIMIT_FSIZE) {
        Ok((soft, _)) if soft != libc::RLIM_INFINITY => Some(soft),
        _ => None,
    }
}

/// Signals taken out of asynchronous delivery for as long as this guard
/// lives: blocked, and read in order from a signalfd, so a poll loop can
/// wait for them next to its fds. The old mask comes back on drop
/// (children reset theirs before exec). The listener waits for SIGCHLD
/// and the stop signals this way; a process running mkfs, for the stop
/// signals, so that mkfs's whole tree is killed before it goes.
pub struct BlockedSignals {
    fd: nix::sys::signalfd::SignalFd,
    old: nix::sys::signal::SigSet,
}

impl BlockedSignals {
    pub fn block(signals: &[nix::sys::signal::Signal]) -> io::Result<Self> {
        use nix::sys::signal::{SigSet, SigmaskHow};
        use nix::sys::signalfd::{SfdFlags, SignalFd};
        let mut set = SigSet::empty();
        for &s in signals {
            set.add(s);
        }
        let old = set.thread_swap_mask(SigmaskHow::SIG_BLOCK)?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .inspect_err(|_| {
                let _ = old.thread_set_mask();
            })?;
        Ok(BlockedSignals { fd, old })
    }

    /// The next pending signal, if any (never blocks).
    pub fn next(&self) -> Option<nix::sys::signal::Signal> {
        match self.fd.read_signal() {
            Ok(Some(info)) => nix::sys::signal::Signal::try_from(info.ssi_signo as i32).ok(),
            _ => None,
        }
    }

    /// Restore the old mask now (before a child of ours starts serving,
    /// or before re-raising a signal that must act).
    pub fn restore(self) {
        drop(self)
    }
}

impl AsFd for BlockedSignals {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for BlockedSignals {
    fn drop(&mut self) {
        let _ = self.old.thread_set_mask();
    }
}

/// Bytes waiting to be read on `fd` (a socket or a pipe): FIONREAD.
pub fn pending_input(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which points at
    // a live stack variable.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// About how many bytes written to a socket its peer has not taken yet:
/// SIOCOUTQ (the same number as TIOCOUTQ). On a Unix stream socket, the
/// memory still charged for what the peer has not read (its buffers'
/// overhead included, and a partly read buffer in full); on TCP, the
/// bytes not yet sent or acknowledged, which over loopback means those the
/// client's full receive buffer has no room for (what waits unread in
/// that buffer is not counted). A pipe has no such count (ENOTTY).
pub fn unsent_output(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the pointer, which points at
    // a live stack variable.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// How [`flock`] locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    /// Exclusive, failing with `WouldBlock` while anyone holds it.
    ExclusiveNow,
    /// Shared, failing with `WouldBlock` while anyone holds it exclusively.
    SharedNow,
}

/// `flock(2)` on `fd`. There is no unlock: the lock goes when the last
/// descriptor of the open file is closed (a process's exit included),
/// which is also why nix's `Flock` guard is not used: it unlocks on drop
/// and panics if that fails, as `flock` does under the serving phase's
/// seccomp filter.
pub fn flock(fd: BorrowedFd<'_>, how: Lock) -> io::Result<()> {
    let op = match how {
        Lock::ExclusiveNow => libc::LOCK_EX | libc::LOCK_NB,
        Lock::SharedNow => libc::LOCK_SH | libc::LOCK_NB,
    };
    loop {
        // SAFETY: flock takes an fd and an integer; no memory is passed.
        if unsafe { libc::flock(fd.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Make `dst` share all of `src`'s extents (FICLONE): a copy that copies
/// nothing, where the filesystem can (xfs with reflink=1, btrfs,
/// bcachefs) and both files are on it.
pub fn clone_file(dst: BorrowedFd<'_>, src: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: FICLONE takes the source fd as its integer argument; no
    // memory is passed.
    if unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One extent of a file as FIEMAP maps it: `length` bytes at `logical` in
/// the file, stored at `physical` on the device, with the kernel's
/// `FIEMAP_EXTENT_*` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
    pub flags: u32,
}

/// The kernel's struct fiemap_extent (linux/fiemap.h).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

/// The kernel's struct fiemap with room for [`FIEMAP_BATCH`] extents.
#[repr(C)]
struct Fiemap {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
    fm_extents: [FiemapExtent; FIEMAP_BATCH],
}

const FIEMAP_BATCH: usize = 128;
/// _IOWR('f', 11, struct fiemap): the ioctl number of FS_IOC_FIEMAP.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;

/// Where the file `fd` keeps its data (FS_IOC_FIEMAP), in order; `sync`
/// writes its dirty pages out first, so that data still in the page cache
/// (or, on xfs, a copy-on-write not yet remapped) is mapped where it will
/// be. `Ok(None)` when the file has more than `max` extents: the caller
/// does without, rather than hold an unbounded list.
pub fn fiemap(fd: BorrowedFd<'_>, sync: bool, max: usize) -> io::Result<Option<Vec<Mapping>>> {
    let mut out = Vec::new();
    // Where the batch asks from, and where the last extent listed ends.
    let (mut start, mut end) = (0u64, 0u64);
    loop {
        let mut fm = Fiemap {
            fm_start: start,
            fm_length: u64::MAX - start,
            // The first call writes the whole file out; once is enough.
            fm_flags: if sync && out.is_empty() {
                FIEMAP_FLAG_SYNC
            } else {
                0
            },
            fm_mapped_extents: 0,
            fm_extent_count: FIEMAP_BATCH as u32,
            fm_reserved: 0,
            fm_extents: [FiemapExtent::default(); FIEMAP_BATCH],
        };
        // SAFETY: `fm` is a struct fiemap followed by room for exactly
        // fm_extent_count extents, as FS_IOC_FIEMAP requires; the kernel
        // writes no more than that and `fm` outlives the call.
        if unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_FIEMAP as _, &mut fm as *mut Fiemap) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = (fm.fm_mapped_extents as usize).min(FIEMAP_BATCH);
        if n == 0 {
            return Ok(Some(out));
        }
        if out.len() + n > max {
            return Ok(None);
        }
        let mut last = false;
        for e in &fm.fm_extents[..n] {
            // In order and apart, as callers rely on; the kernel may start a
            // batch with an extent that began before fm_start.
            if e.fe_logical < end {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "FIEMAP listed overlapping extents",
                ));
            }
            out.push(Mapping {
                logical: e.fe_logical,
                physical: e.fe_physical,
                length: e.fe_length,
                flags: e.fe_flags,
            });
            end = e.fe_logical.saturating_add(e.fe_length);
            last |= e.fe_flags & FIEMAP_EXTENT_LAST != 0;
        }
        if last || end <= start {
            return Ok(Some(out));
        }
        start = end;
    }
}

/// The kernel's struct cachestat_range and struct cachestat
/// (linux/mman.h).
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Bytes of `fd`'s page cache that are dirty or being written back
/// (cachestat(2), Linux 6.5; the libc crate does not name its number on
/// x86_64 yet). Fails with ENOSYS on older kernels, and where a sandbox
/// refuses the call.
pub fn dirty_bytes(fd: BorrowedFd<'_>) -> io::Result<u64> {
    #[cfg(target_arch = "x86_64")]
    const SYS_CACHESTAT: libc::c_long = 451;
    #[cfg(not(target_arch = "x86_64"))]
    return Err(io::Error::from_raw_os_error(libc::ENOSYS));
    #[cfg(target_arch = "x86_64")]
    {
        // len 0: to the end of the file.
        let range = CachestatRange { off: 0, len: 0 };
        let mut cs = Cachestat::default();
        // SAFETY: both pointers are to live structs of the layout the
        // kernel expects; it reads `range`, writes `cs`, keeps neither.
        let r = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                fd.as_raw_fd(),
                &range as *const CachestatRange,
                &mut cs as *mut Cachestat,
                0u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // cachestat counts pages of the kernel's page size.
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map_or(4096, |p| p as u64);
        Ok(cs
            .nr_dirty
            .saturating_add(cs.nr_writeback)
            .saturating_mul(page))
    }
}

/// Connect to the Unix socket at `path`, trying for at most `limit`: a
/// listener whose backlog is full refuses a non-blocking connect with
/// EAGAIN (where a blocking one would wait until there is room, however
/// long), so it is tried again every 20 ms. The stream returned blocks.
pub fn connect_unix_within(
    path: &std::path::Path,
    limit: Duration,
) -> io::Result<std::os::unix::net::UnixStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let addr = UnixAddr::new(path)?;
    let end = Instant::now() + limit;
    loop {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => {
                let s = std::os::unix::net::UnixStream::from(fd);
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) if Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(Errno::EAGAIN) => return Err(io::ErrorKind::TimedOut.into()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Room for the most descriptors one SCM_RIGHTS message can carry (the
/// kernel's SCM_MAX_FD). A message with more than its control buffer
/// holds is truncated (MSG_CTRUNC): the kernel installs the descriptors
/// that fit, and nix then refuses to list them, so they would stay open
/// with no owner. With room for a whole message, a sender that passes
/// more than it should has them all received, owned and closed by the
/// caller that finds the wrong files.
const MAX_PASSED_FILES: usize = 253;

/// Receive up to `buf.len()` bytes from the Unix socket `sock` and the
/// descriptors that came with them (`SCM_RIGHTS`, close-on-exec). Returns
/// 0 bytes at end of file; a timeout set on the socket gives `WouldBlock`.
pub fn recv_with_files(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut space = nix::cmsg_space!([RawFd; MAX_PASSED_FILES]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(Errno::EINTR) => continue,
            r => break r?,
        }
    };
    let mut files = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: the kernel has just installed these descriptors in
            // this process for this message (SCM_RIGHTS, close-on-exec);
            // nothing else refers to them, so each gets one owner here.
            files.extend(
                fds.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok((msg.bytes, files))
}

/// Send `bytes` on the Unix socket `sock` with `files` attached
/// (`SCM_RIGHTS`); returns how many bytes went (the rest is the caller's
/// to write).
pub fn send_with_files(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    files: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&fds)];
    loop {
        match sendmsg::<()>(
            sock.as_raw_fd(),
            &[io::IoSlice::new(bytes)],
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(Errno::EINTR) => continue,
            r => return Ok(r?),
        }
    }
}

//! The standalone accept loop (`--listen`, `--unix`, or a listening socket
//! from systemd): accept, fork one child per connection, reap. The child
//! serves its connection through exactly the path a socket-activated
//! instance takes; the parent never serves, and keeps accepting while
//! children run, up to `max_connections` at once (beyond that, new
//! connections wait in the kernel's backlog).
//!
//! Signals arrive through a signalfd, so the loop is a plain poll over two
//! fds: SIGCHLD reaps, SIGTERM/SIGINT/SIGHUP stop accepting, pass SIGTERM
//! on to the children and wait for them.

use std::collections::HashSet;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tracing::{error, info, warn};

use crate::activation::{Listener, connection, peer_name};
use crate::conn::Conn;
use crate::sys::{self, Forked};

/// How long children get to finish after we pass on SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Run the accept loop until a stop signal. `serve` runs in each child and
/// returns its exit code.
pub fn run(
    listener: Listener,
    max_connections: usize,
    serve: &dyn Fn(Conn, String) -> u8,
) -> Result<(), String> {
    let mut signals = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        signals.add(s);
    }
    let old_mask = signals
        .thread_swap_mask(SigmaskHow::SIG_BLOCK)
        .map_err(|e| format!("sigprocmask: {e}"))?;
    let sfd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| format!("signalfd: {e}"))?;
    let lfd: &dyn AsFd = match &listener {
        Listener::Tcp(l) => l,
        Listener::Unix(l, _) => l,
    };
    set_nonblocking(&listener)?;
    info!(address = %listener.describe(), max_connections, "listening");
    // For a Type=notify unit running the listener itself (Accept=no).
    crate::status::ready(&format!("listening on {}", listener.describe()));
    let mut children: HashSet<Pid> = HashSet::new();
    let stop = loop {
        let accepting = children.len() < max_connections;
        let mut fds = vec![PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
        if accepting {
            fds.push(PollFd::new(lfd.as_fd(), PollFlags::POLLIN));
        }
        if let Err(e) = sys::poll_fds(&mut fds, None) {
            break Err(format!("poll: {e}"));
        }
        let signalled = fds[0].any().unwrap_or(false);
        let incoming = fds.get(1).is_some_and(|f| f.any().unwrap_or(false));
        drop(fds);
        if signalled {
            match drain_signals(&sfd) {
                Some(sig) => {
                    info!(signal = sig.as_str(), clients = children.len(), "stopping");
                    break Ok(());
                }
                None => reap(&mut children),
            }
        }
        if incoming {
            let Some(fd) = accept(&listener) else {
                continue;
            };
            match sys::fork() {
                Ok(Forked::Child) => {
                    // The child: no listener, no signalfd, the normal signal
                    // mask; then the one serving path.
                    drop(sfd);
                    drop(listener);
                    let _ = old_mask.thread_set_mask();
                    let peer = peer_name(&fd, false);
                    let code = serve(connection(fd), peer);
                    std::process::exit(i32::from(code));
                }
                Ok(Forked::Parent(pid)) => {
                    children.insert(pid);
                    if children.len() == max_connections {
                        warn!(
                            max_connections,
                            "connection limit reached; new clients wait"
                        );
                    }
                }
                Err(e) => error!(error = %e, "fork failed; connection dropped"),
            }
        }
    };
    if let Listener::Unix(_, Some(path)) = &listener {
        let _ = std::fs::remove_file(path);
    }
    drop(listener);
    stop_children(&sfd, &mut children);
    stop
}

fn set_nonblocking(l: &Listener) -> Result<(), String> {
    // A connection can vanish between poll and accept: never block there.
    match l {
        Listener::Tcp(l) => l.set_nonblocking(true),
        Listener::Unix(l, _) => l.set_nonblocking(true),
    }
    .map_err(|e| format!("listener: {e}"))
}

/// Accept one connection as a blocking, close-on-exec fd.
fn accept(l: &Listener) -> Option<OwnedFd> {
    let r = match l {
        Listener::Tcp(l) => l.accept().and_then(|(s, _)| {
            s.set_nonblocking(false)?;
            Ok(OwnedFd::from(s))
        }),
        Listener::Unix(l, _) => l.accept().and_then(|(s, _)| {
            s.set_nonblocking(false)?;
            Ok(OwnedFd::from(s))
        }),
    };
    match r {
        Ok(fd) => Some(fd),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(e) => {
            // EMFILE, ECONNABORTED...: log, and do not spin on it.
            warn!(error = %e, "accept failed");
            std::thread::sleep(Duration::from_millis(10));
            None
        }
    }
}

/// Read all pending signals; the first stop signal among them, if any.
fn drain_signals(sfd: &SignalFd) -> Option<Signal> {
    let mut stop = None;
    while let Ok(Some(info)) = sfd.read_signal() {
        match Signal::try_from(info.ssi_signo as i32) {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(s) => stop = stop.or(Some(s)),
        }
    }
    stop
}

/// Collect every child that has exited, logging the ones that failed.
fn reap(children: &mut HashSet<Pid>) {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => {
                children.remove(&pid);
                if code != 0 {
                    warn!(
                        pid = pid.as_raw(),
                        code, "client process exited with an error"
                    );
                }
            }
            Ok(WaitStatus::Signaled(pid, sig, core)) => {
                children.remove(&pid);
                // SIGTERM/SIGKILL are what we (or an admin) send to stop;
                // anything else (SIGSEGV, SIGABRT...) is a crash.
                if matches!(sig, Signal::SIGTERM | Signal::SIGKILL) {
                    info!(
                        pid = pid.as_raw(),
                        signal = sig.as_str(),
                        "client process stopped"
                    );
                } else {
                    error!(
                        pid = pid.as_raw(),
                        signal = sig.as_str(),
                        core,
                        "client process crashed"
                    );
                }
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Pass SIGTERM on to every child and wait (boundedly) for them.
fn stop_children(sfd: &SignalFd, children: &mut HashSet<Pid>) {
    for pid in children.iter() {
        let _ = kill(*pid, Signal::SIGTERM);
    }
    let deadline = std::time::Instant::now() + STOP_GRACE;
    while !children.is_empty() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            for pid in children.drain() {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
            }
            return;
        }
        let _ = sys::poll_one(sfd.as_fd(), PollFlags::POLLIN, Some(left));
        let _ = drain_signals(sfd);
        reap(children);
    }
}

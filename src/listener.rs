//! The standalone accept loop (`--listen`, `--unix`, or a listening socket
//! from systemd): accept, fork one child per connection, reap. The child
//! serves its connection through exactly the path a socket-activated
//! instance takes; the parent never serves, and keeps accepting while
//! children run.
//!
//! What it lets in, so that one source cannot starve the others (systemd's
//! socket units have `MaxConnections=` and `MaxConnectionsPerSource=` for
//! the same reasons):
//! - at most `max_connections` children at once; beyond that, new
//!   connections wait in the kernel's backlog;
//! - at most `per_source` of them from one IP address (or, on a Unix
//!   socket, one user); more are closed at once;
//! - while connections wait for a slot, a child whose client has not yet
//!   asked for a disk (INFO/GO/EXPORT_NAME) after [`PRESSURE_GRACE`] is
//!   stopped to make room: negotiate or go. Real clients negotiate in
//!   milliseconds; mkfs time is not counted (the child reports the moment
//!   its client commits, on a pipe).
//!
//! Signals arrive through a signalfd, so the loop is a plain poll: SIGCHLD
//! reaps, SIGTERM/SIGINT/SIGHUP stop accepting, pass SIGTERM on to the
//! children and wait for them. The listener is a subreaper: whatever a
//! killed child's setup left running becomes its child and is killed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags};
use nix::sys::signal::{Signal, kill};
use nix::sys::socket::{getsockopt, sockopt};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tracing::{error, info, warn};

use crate::activation::{Listener, connection, peer_name};
use crate::cli::ListenerLimits;
use crate::conn::Conn;
use crate::logging::Escaped;
use crate::sys::{self, BlockedSignals, Forked};

/// How long children get to finish after we pass on SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Under pressure (every slot taken, connections waiting), how long a
/// client may take to ask for a disk before its slot goes to another.
pub const PRESSURE_GRACE: Duration = Duration::from_secs(2);

/// Where a connection comes from, for the per-source limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Source {
    Ip(IpAddr),
    User(u32),
    Unknown,
}

/// Where a serving child is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Its client has not asked for a disk yet.
    Negotiating,
    /// Its client asked for a disk: never dropped to make room.
    Committed,
    /// Stopped to make room; counted until reaped.
    Dropped,
}

/// One serving child.
struct Child {
    source: Source,
    peer: String,
    since: Instant,
    stage: Stage,
}

/// Why the listener could not run: what it was doing, and the error.
#[derive(Debug)]
pub struct ListenerError {
    pub doing: &'static str,
    pub error: std::io::Error,
}

impl std::fmt::Display for ListenerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.doing, self.error)
    }
}

/// Run the accept loop until a stop signal. `serve` runs in each child and
/// returns its exit code; `killed` runs here for a child that a signal
/// ended, to clear what it could not.
pub fn run(
    listener: Listener,
    limits: ListenerLimits,
    serve: &dyn Fn(Conn, String) -> u8,
    killed: &dyn Fn(u32),
) -> Result<(), ListenerError> {
    let fail = |doing: &'static str| move |e| ListenerError { doing, error: e };
    let signals = BlockedSignals::block(&[
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ])
    .map_err(fail("signals"))?;
    sys::become_subreaper().map_err(fail("subreaper"))?;
    // Children report on this pipe when their client commits to a disk.
    let (reports, report_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
        .map_err(|e| fail("pipe")(e.into()))?;
    set_nonblocking(&listener).map_err(fail("listener"))?;
    let max = limits.max_connections;
    info!(
        address = %listener.describe(),
        max_connections = max,
        max_connections_per_source = limits.per_source.unwrap_or(0),
        "listening"
    );
    // For a Type=notify unit running the listener itself (Accept=no).
    crate::status::ready(&format!("listening on {}", listener.describe()));
    let grace = limits
        .handshake_timeout
        .map_or(PRESSURE_GRACE, |t| t.min(PRESSURE_GRACE));
    let mut children: HashMap<Pid, Child> = HashMap::new();
    let mut refusals = Throttle::default();
    let mut accept_errors = Throttle::default();
    // Every slot taken and a connection waiting for one.
    let mut pressure = false;
    let stop = loop {
        let full = children.len() >= max;
        if !full {
            pressure = false;
        }
        let next_drop = pressure
            .then(|| {
                children
                    .values()
                    .filter(|c| c.stage == Stage::Negotiating)
                    .map(|c| (c.since + grace).saturating_duration_since(Instant::now()))
                    .min()
            })
            .flatten();
        let mut fds = vec![
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(reports.as_fd(), PollFlags::POLLIN),
        ];
        // When full, watch the listener only to learn that someone waits.
        let watch_listener = !full || !pressure;
        if watch_listener {
            fds.push(PollFd::new(listener.as_fd(), PollFlags::POLLIN));
        }
        if let Err(e) = sys::poll_fds(&mut fds, next_drop) {
            break Err(fail("poll")(e));
        }
        let ready = |f: &PollFd| f.any().unwrap_or(false);
        let signalled = ready(&fds[0]);
        let reported = ready(&fds[1]);
        let incoming = watch_listener && ready(&fds[2]);
        drop(fds);
        if signalled {
            match drain_signals(&signals) {
                Some(sig) => {
                    info!(signal = sig.as_str(), clients = children.len(), "stopping");
                    break Ok(());
                }
                None => reap(&mut children, killed),
            }
        }
        if reported {
            read_reports(&reports, &mut children);
        }
        if pressure {
            make_room(&mut children, grace);
        }
        if !incoming {
            continue;
        }
        if full {
            if !pressure {
                warn!(
                    max_connections = max,
                    "connection limit reached; new clients wait, and clients that have not \
                     asked for a disk within {} s make room",
                    grace.as_secs_f64()
                );
            }
            pressure = true;
            continue;
        }
        let Some((fd, source)) = accept(&listener, &mut accept_errors) else {
            continue;
        };
        let peer = peer_name(&fd, false);
        let balancer =
            matches!(source, Source::Ip(ip) if limits.balancers.contains(&ip.to_canonical()));
        if let Some(limit) = limits.per_source.filter(|_| !balancer) {
            let from_source = children.values().filter(|c| c.source == source).count();
            if from_source >= limit {
                if let Some(refused) = refusals.due() {
                    warn!(
                        peer = %Escaped(&peer),
                        limit,
                        refused,
                        "refusing a connection: too many from one source"
                    );
                }
                continue;
            }
        }
        match sys::fork() {
            Ok(Forked::Child) => {
                // The child: no listener, no signalfd, the normal signal
                // mask; then the one serving path.
                drop(reports);
                crate::status::report_to_listener(report_w);
                drop(listener);
                signals.restore();
                let code = serve(connection(fd), peer);
                std::process::exit(i32::from(code));
            }
            Ok(Forked::Parent(pid)) => {
                children.insert(
                    pid,
                    Child {
                        source,
                        peer,
                        since: Instant::now(),
                        stage: Stage::Negotiating,
                    },
                );
            }
            Err(e) => error!(error = %e, "fork failed; connection dropped"),
        }
    };
    if let Listener::Unix(_, Some(path)) = &listener {
        let _ = std::fs::remove_file(path);
    }
    drop(listener);
    stop_children(&signals, &mut children, killed);
    stop
}

/// Log a repeated event without letting a flood of it flood the log: the
/// first one, then at most one line a second, with the count since the
/// last line.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    unlogged: u64,
}

impl Throttle {
    /// Count one event; `Some(count)` when a line is due.
    fn due(&mut self) -> Option<u64> {
        self.unlogged += 1;
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// Stop every child whose client has not asked for a disk within `grace`:
/// a slot is wanted by a waiting connection.
fn make_room(children: &mut HashMap<Pid, Child>, grace: Duration) {
    for (pid, c) in children.iter_mut() {
        if c.stage == Stage::Negotiating && c.since.elapsed() >= grace {
            warn!(
                peer = %c.peer,
                pid = pid.as_raw(),
                seconds = format!("{:.1}", c.since.elapsed().as_secs_f64()),
                "dropping a client that has not asked for a disk, to make room"
            );
            let _ = kill(*pid, Signal::SIGKILL);
            c.stage = Stage::Dropped;
        }
    }
}

/// Mark the children that reported their client committed.
fn read_reports(reports: &OwnedFd, children: &mut HashMap<Pid, Child>) {
    let mut buf = [0u8; 4 * 256];
    while let Ok(n) = nix::unistd::read(reports, &mut buf) {
        if n == 0 {
            break;
        }
        for pid in buf[..n - n % 4].chunks_exact(4) {
            let pid = Pid::from_raw(i32::from_ne_bytes([pid[0], pid[1], pid[2], pid[3]]));
            if let Some(c) = children
                .get_mut(&pid)
                .filter(|c| c.stage == Stage::Negotiating)
            {
                c.stage = Stage::Committed;
            }
        }
    }
}

fn set_nonblocking(l: &Listener) -> std::io::Result<()> {
    // A connection can vanish between poll and accept: never block there.
    match l {
        Listener::Tcp(l) => l.set_nonblocking(true),
        Listener::Unix(l, _) => l.set_nonblocking(true),
    }
}

/// Accept one connection as a blocking, close-on-exec fd, with its source.
fn accept(l: &Listener, errors: &mut Throttle) -> Option<(OwnedFd, Source)> {
    let r = match l {
        Listener::Tcp(l) => l.accept().and_then(|(s, addr)| {
            s.set_nonblocking(false)?;
            let ip = match addr.ip() {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                v4 => v4,
            };
            Ok((OwnedFd::from(s), Source::Ip(ip)))
        }),
        Listener::Unix(l, _) => l.accept().and_then(|(s, _)| {
            s.set_nonblocking(false)?;
            let source = getsockopt(&s, sockopt::PeerCredentials)
                .map_or(Source::Unknown, |c| Source::User(c.uid()));
            Ok((OwnedFd::from(s), source))
        }),
    };
    match r {
        Ok(x) => Some(x),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(e) => {
            // EMFILE, ECONNABORTED...: log (not a line per attempt), and
            // do not spin on it.
            if let Some(failures) = errors.due() {
                warn!(error = %e, failures, "accept failed");
            }
            std::thread::sleep(Duration::from_millis(10));
            None
        }
    }
}

/// Read all pending signals; the first stop signal among them, if any.
fn drain_signals(signals: &BlockedSignals) -> Option<Signal> {
    let mut stop = None;
    while let Some(sig) = signals.next() {
        if sig != Signal::SIGCHLD {
            stop = stop.or(Some(sig));
        }
    }
    stop
}

/// Collect every child that has exited, logging the ones that failed;
/// then kill whatever the dead left behind (orphans handed to us).
fn reap(children: &mut HashMap<Pid, Child>, killed: &dyn Fn(u32)) {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => {
                if children.remove(&pid).is_some() && code != 0 {
                    warn!(
                        pid = pid.as_raw(),
                        code, "client process exited with an error"
                    );
                }
            }
            Ok(WaitStatus::Signaled(pid, sig, core)) => {
                if children.remove(&pid).is_none() {
                    continue;
                }
                killed(pid.as_raw() as u32);
                // The stop signals (ours, an admin's, or the terminal's
                // Ctrl-C, which reaches the whole process group) are how a
                // client process is meant to stop; anything else (SIGSEGV,
                // SIGABRT...) is a crash.
                if matches!(
                    sig,
                    Signal::SIGTERM | Signal::SIGKILL | Signal::SIGINT | Signal::SIGHUP
                ) {
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
            Ok(WaitStatus::StillAlive) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let orphans = sys::kill_children(&|p| children.contains_key(&p));
    if orphans > 0 {
        info!(
            processes = orphans,
            "killed processes a client's setup left behind"
        );
    }
}

/// Pass SIGTERM on to every child and wait (boundedly) for them.
fn stop_children(
    signals: &BlockedSignals,
    children: &mut HashMap<Pid, Child>,
    killed: &dyn Fn(u32),
) {
    for pid in children.keys() {
        let _ = kill(*pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    while !children.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            for (pid, _) in children.drain() {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                killed(pid.as_raw() as u32);
            }
            break;
        }
        let _ = sys::poll_one(signals.as_fd(), PollFlags::POLLIN, Some(left));
        let _ = drain_signals(signals);
        reap(children, killed);
    }
    sys::kill_children(&|_| false);
}

//! Finding the client: the socket systemd passed (connected with
//! `Accept=yes`, or listening), stdin/stdout, or a listener of our own.
//! Whatever the way, a connection ends up as a [`Conn`] and a peer name for
//! the one serving path; listening sockets go to the accept loop.

use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrLike, SockaddrStorage, getpeername, getsockname,
    getsockopt, setsockopt, socket, sockopt,
};

use crate::cli::Mode;
use crate::conn::Conn;
use crate::sys;

/// What this process does.
pub enum Activation {
    /// Serve this one client.
    Connection { conn: Conn, peer: String },
    /// Accept clients and run one child process per connection.
    Listen(Listener),
}

pub enum Listener {
    Tcp(TcpListener),
    /// The path is removed when we stop, if we created it.
    Unix(UnixListener, Option<PathBuf>),
}

impl Listener {
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "TCP socket".into(), |a| a.to_string()),
            Listener::Unix(l, p) => p
                .clone()
                .or_else(|| {
                    l.local_addr()
                        .ok()
                        .and_then(|a| a.as_pathname().map(Into::into))
                })
                .map_or_else(|| "Unix socket".into(), |p| p.display().to_string()),
        }
    }
}

impl std::os::fd::AsFd for Listener {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l, _) => l.as_fd(),
        }
    }
}

/// Why activation failed: a usage error (exit 2) or a system error (exit 1).
pub enum ActivationError {
    Usage(String),
    Failed(String),
}

/// The fd systemd passes first (SD_LISTEN_FDS_START).
const SD_FIRST_FD: i32 = 3;

pub fn activate(mode: &Mode) -> Result<Activation, ActivationError> {
    let failed =
        |what: &str, e: &dyn std::fmt::Display| ActivationError::Failed(format!("{what}: {e}"));
    match mode {
        Mode::Stdio => {
            let (rd, wr) = sys::take_stdio().map_err(|e| failed("stdin/stdout", &e))?;
            // libnbd's connect_command and inetd-style managers hand us a
            // socket here; a pipe is left as it is.
            let _ = tune(&wr);
            Ok(Activation::Connection {
                conn: Conn::pipes(rd, wr),
                peer: "stdio".into(),
            })
        }
        Mode::Tcp(addrs) => {
            let l = TcpListener::bind(&addrs[..])
                .map_err(|e| failed(&format!("cannot listen on {}", addrs[0]), &e))?;
            Ok(Activation::Listen(Listener::Tcp(l)))
        }
        Mode::Unix(path) => {
            remove_stale_socket(path);
            let l = UnixListener::bind(path)
                .map_err(|e| failed(&format!("cannot listen on {}", path.display()), &e))?;
            Ok(Activation::Listen(Listener::Unix(l, Some(path.clone()))))
        }
        Mode::Systemd => from_systemd(),
    }
}

fn from_systemd() -> Result<Activation, ActivationError> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() == 0 {
        return Err(ActivationError::Usage(
            "no socket to serve: run it from tmpdisk.socket (systemd passes LISTEN_FDS), \
             or use --stdio, --listen ADDR[:PORT] or --unix PATH"
                .into(),
        ));
    }
    if fds.len() > 1 {
        tracing::warn!(
            count = fds.len(),
            "systemd passed several sockets; serving the first"
        );
    }
    let bad = |e: &dyn std::fmt::Display| {
        ActivationError::Failed(format!("socket passed by systemd (fd {SD_FIRST_FD}): {e}"))
    };
    let family = getsockname::<SockaddrStorage>(SD_FIRST_FD)
        .map_err(|e| bad(&e))?
        .family()
        .ok_or_else(|| bad(&"unknown address family"))?;
    // listenfd validates the fd as a stream socket of this family, marks it
    // close-on-exec (so mkfs never inherits it) and hands over ownership.
    let fd: OwnedFd = fds
        .take_custom(0, family as i32, libc::SOCK_STREAM, "stream socket")
        .map_err(|e| bad(&e))?
        .ok_or_else(|| bad(&"already taken"))?;
    let listening = getsockopt(&fd, sockopt::AcceptConn).map_err(|e| bad(&e))?;
    if listening {
        return Ok(Activation::Listen(match family {
            AddressFamily::Unix => Listener::Unix(UnixListener::from(fd), None),
            _ => Listener::Tcp(TcpListener::from(fd)),
        }));
    }
    let peer = peer_name(&fd, true);
    Ok(Activation::Connection {
        conn: connection(fd),
        peer,
    })
}

/// What a Unix socket's send buffer is set to (net.core.wmem_max caps it).
const UNIX_SNDBUF: usize = 2 << 20;

/// A connected socket, tuned for NBD.
pub fn connection(fd: OwnedFd) -> Conn {
    let remote = tune(&fd).is_some_and(|ours| is_remote(&fd, &ours));
    let mut conn = Conn::socket(fd);
    conn.set_remote(remote);
    conn
}

/// Whether the peer of a TCP socket whose own address is `ours` is on
/// another machine: neither a loopback address nor our own end's address.
/// A Unix socket's peer, or one whose address cannot be read, is taken as
/// local.
fn is_remote(fd: &OwnedFd, ours: &SockaddrStorage) -> bool {
    let ip = |a: &SockaddrStorage| -> Option<std::net::IpAddr> {
        if let Some(v4) = a.as_sockaddr_in() {
            return Some(std::net::IpAddr::V4(v4.ip()));
        }
        a.as_sockaddr_in6()
            .map(|v6| std::net::IpAddr::V6(v6.ip()).to_canonical())
    };
    let peer = getpeername::<SockaddrStorage>(fd.as_raw_fd())
        .ok()
        .and_then(|p| ip(&p));
    match (peer, ip(ours)) {
        (Some(p), Some(o)) => !p.is_loopback() && p != o,
        _ => false,
    }
}

/// Tunes the socket we send to, if it is one. TCP: small replies must not
/// wait for Nagle's algorithm. Unix: a Unix stream socket's send buffer
/// does not grow by itself like TCP's; the default (net.core.wmem_default,
/// 208 KiB) is less than one 256 KiB read reply, so each large reply went
/// out in pieces, each waiting for the client to drain the last. With
/// 2 MiB the bench's Unix seq read-back went from a median of 3014 to
/// 4363 MB/s (9 runs each, interleaved, on a machine whose wmem_max is
/// 4 MiB; at the stock 208 KiB wmem_max the buffer only doubles). Best
/// effort: a socket that refuses it still works, and a pipe is left alone.
/// TCP: the receive buffer is raised too, where the system allows it
/// (see [`TCP_RCVBUF`]).
/// Returns the socket's own address (None for a pipe).
fn tune(fd: &OwnedFd) -> Option<SockaddrStorage> {
    let addr = getsockname::<SockaddrStorage>(fd.as_raw_fd()).ok()?;
    let _ = if addr.family() == Some(AddressFamily::Unix) {
        setsockopt(fd, sockopt::SndBuf, &UNIX_SNDBUF)
    } else {
        if receive_buffer_allowed(TCP_RCVBUF) {
            let _ = setsockopt(fd, sockopt::RcvBuf, &TCP_RCVBUF);
        }
        setsockopt(fd, sockopt::TcpNoDelay, &true)
    };
    Some(addr)
}

/// What a TCP connection's receive buffer is set to (the kernel doubles
/// it for its bookkeeping): room for a client's sixteen 256 KiB writes in
/// flight while we copy the last ones into the page cache. Left to its
/// autotuning, which starts at tcp_rmem's 128 KiB and grows as we read,
/// fio's sequential 1 GiB write (256 KiB x 16) ran at 1949-2073 MB/s in
/// six alternating runs, against 2209-2698 with this (and nbdkit
/// tmpdisk's 2251-2833); 1 MiB (2 MiB doubled) gained nothing. Setting
/// it turns the autotuning off for good, so it is only set when
/// net.core.rmem_max lets it be this large: at the stock 208 KiB the
/// buffer would be pinned well below what autotuning reaches.
const TCP_RCVBUF: usize = 4 << 20;

/// Whether net.core.rmem_max lets a socket's receive buffer be set to
/// `want`, asked of a throwaway socket: asking the connection would pin
/// its buffer, and /proc/sys is hidden from the unit (ProcSubset=pid).
/// The kernel caps the value at rmem_max and then doubles it.
fn receive_buffer_allowed(want: usize) -> bool {
    let Ok(probe) = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return false;
    };
    setsockopt(&probe, sockopt::RcvBuf, &want).is_ok()
        && getsockopt(&probe, sockopt::RcvBuf).is_ok_and(|got| got >= want.saturating_mul(2))
}

/// Who is on the other end: systemd's REMOTE_ADDR/REMOTE_PORT when it set
/// them, else getpeername.
pub fn peer_name(fd: &OwnedFd, from_systemd: bool) -> String {
    if let (true, Ok(addr)) = (from_systemd, std::env::var("REMOTE_ADDR")) {
        return match std::env::var("REMOTE_PORT") {
            Ok(port) if addr.contains(':') => format!("[{addr}]:{port}"),
            Ok(port) => format!("{addr}:{port}"),
            Err(_) => addr,
        };
    }
    match getpeername::<SockaddrStorage>(fd.as_raw_fd()) {
        Ok(a) => match a.family() {
            Some(AddressFamily::Unix) => "unix socket".into(),
            _ => a.to_string(),
        },
        Err(_) => "unknown peer".into(),
    }
}

/// A socket file left by a previous run would make bind fail; remove it,
/// but only if it is a socket nobody listens on.
fn remove_stale_socket(path: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if is_socket && std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe answers what net.core.rmem_max says, just below and just
    /// above it, and a TCP connection gets the raised buffer exactly when
    /// the probe allows it (doubled by the kernel), else keeps autotuning.
    #[test]
    fn the_receive_buffer_is_raised_only_as_far_as_rmem_max_allows() {
        let max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .expect("read net.core.rmem_max")
            .trim()
            .parse::<usize>()
            .expect("net.core.rmem_max is a number");
        // The kernel also caps the value at INT_MAX / 2.
        let max = max.min(i32::MAX as usize / 2);
        assert!(receive_buffer_allowed(max));
        assert!(!receive_buffer_allowed(max + 1));

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        let ours = OwnedFd::from(ours);
        let before: usize = getsockopt(&ours, sockopt::RcvBuf).unwrap();
        tune(&ours).expect("a socket");
        let after: usize = getsockopt(&ours, sockopt::RcvBuf).unwrap();
        if max >= TCP_RCVBUF {
            assert_eq!(after, 2 * TCP_RCVBUF);
        } else {
            assert_eq!(
                after, before,
                "rmem_max {max}: the buffer must be left to autotuning"
            );
        }
        drop(client);
    }
}

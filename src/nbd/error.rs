//! Errors of the protocol, sorted by what happens next.
//!
//! - [`Hangup`]: the session cannot go on (the peer left, broke framing, or
//!   the server itself failed); the connection is closed.
//! - [`ReplyError`]: a well-framed request or option was wrong or failed;
//!   the client gets an error reply and the session goes on.
//!
//! Host errors reach the wire only through [`nbd_errno`], the one place that
//! turns an `io::Error` into a protocol error number.

use std::fmt;
use std::io;

use super::wire;

/// Why a session ended without the client asking for it.
#[derive(Debug)]
pub enum Hangup {
    /// The peer closed the connection cleanly between messages.
    Closed,
    /// The peer closed the connection in the middle of a message.
    Truncated,
    /// The client broke the protocol in a way that loses framing.
    Protocol(String),
    /// The client did not finish negotiating in time.
    Timeout,
    /// The client stopped reading its replies (`--reply-timeout`).
    Stalled,
    /// Reading from or writing to the client failed.
    Io(io::Error),
    /// The server could not build or use the disk: this is our failure, not
    /// the client's, and it makes the process exit non-zero.
    Server(String),
}

impl Hangup {
    /// Whether this ending is a failure of the server (exit 1) rather than
    /// something the client did or suffered.
    pub fn is_server_failure(&self) -> bool {
        matches!(self, Hangup::Server(_))
    }

    /// Sort a transport error: EOF is the peer leaving, a timeout is the
    /// handshake deadline, everything else is an I/O failure.
    pub fn from_io(e: io::Error, mid_message: bool) -> Self {
        match e.kind() {
            io::ErrorKind::UnexpectedEof if mid_message => Hangup::Truncated,
            io::ErrorKind::UnexpectedEof => Hangup::Closed,
            io::ErrorKind::TimedOut => Hangup::Timeout,
            io::ErrorKind::WouldBlock => Hangup::Stalled,
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => Hangup::Closed,
            _ => Hangup::Io(e),
        }
    }
}

impl fmt::Display for Hangup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hangup::Closed => write!(f, "client closed the connection"),
            Hangup::Truncated => write!(f, "client closed the connection mid-message"),
            Hangup::Protocol(why) => write!(f, "protocol violation: {why}"),
            Hangup::Timeout => write!(f, "client did not finish negotiating in time"),
            Hangup::Stalled => write!(f, "client stopped reading its replies"),
            Hangup::Io(e) => write!(f, "connection error: {e}"),
            Hangup::Server(why) => write!(f, "{why}"),
        }
    }
}

/// A request that gets an error reply; the session goes on.
#[derive(Debug)]
pub struct ReplyError {
    /// Protocol error number (see [`wire`]'s E* constants).
    pub errno: u32,
    /// What went wrong, for the log and for structured error chunks.
    pub message: String,
    /// The disk failed (ENOSPC, EIO...), as opposed to the client asking
    /// for something wrong: worth telling the operator.
    pub disk: bool,
}

impl ReplyError {
    pub fn new(errno: u32, message: impl Into<String>) -> Self {
        ReplyError {
            errno,
            message: message.into(),
            disk: false,
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(wire::EINVAL, message)
    }
    /// A failed operation on the disk.
    pub fn from_io(what: &str, e: &io::Error) -> Self {
        ReplyError {
            disk: true,
            ..Self::new(nbd_errno(e), format!("{what}: {e}"))
        }
    }
}

/// The one mapping from a host error to the protocol's error numbers.
/// Unknown errors become EIO, never a raw host errno the client would
/// misread.
pub fn nbd_errno(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => wire::EPERM,
        Some(libc::ENOMEM) => wire::ENOMEM,
        Some(libc::EINVAL) => wire::EINVAL,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => wire::ENOSPC,
        Some(libc::EOVERFLOW) => wire::EOVERFLOW,
        Some(libc::EOPNOTSUPP) => wire::ENOTSUP,
        Some(libc::ESHUTDOWN) => wire::ESHUTDOWN,
        _ => wire::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_errors_map_to_protocol_values() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert_eq!(nbd_errno(&e(libc::EDQUOT)), wire::ENOSPC);
        assert_eq!(nbd_errno(&e(libc::EFBIG)), wire::ENOSPC);
        assert_eq!(nbd_errno(&e(libc::EOPNOTSUPP)), wire::ENOTSUP);
        assert_eq!(nbd_errno(&e(libc::EBADF)), wire::EIO);
        assert_eq!(nbd_errno(&io::Error::other("x")), wire::EIO);
    }
}

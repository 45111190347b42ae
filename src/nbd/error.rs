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
    /// A failed operation on the disk, for request `req`.
    pub fn from_io(what: &str, e: &io::Error, req: &wire::Request) -> Self {
        ReplyError {
            disk: true,
            ..Self::new(nbd_errno(e, req), format!("{what}: {e}"))
        }
    }
}

/// The one mapping from a host error to the protocol's error numbers, for
/// request `req`. Unknown errors become EIO, never a raw host errno the
/// client would misread. The spec lets a server send ENOTSUP only for a
/// WRITE_ZEROES with FAST_ZERO that would not be fast, and EOVERFLOW only
/// for a READ with DF that cannot be sent in one chunk (which we never
/// refuse); any other "not supported" is EINVAL.
pub fn nbd_errno(e: &io::Error, req: &wire::Request) -> u32 {
    use io::ErrorKind as K;
    let fast_zero =
        req.command == wire::CMD_WRITE_ZEROES && req.flags & wire::CMD_FLAG_FAST_ZERO != 0;
    match e.kind() {
        K::PermissionDenied | K::ReadOnlyFilesystem => wire::EPERM,
        K::OutOfMemory => wire::ENOMEM,
        K::InvalidInput => wire::EINVAL,
        K::StorageFull | K::QuotaExceeded | K::FileTooLarge => wire::ENOSPC,
        K::Unsupported if fast_zero => wire::ENOTSUP,
        K::Unsupported => wire::EINVAL,
        _ => wire::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(command: u16, flags: u16) -> wire::Request {
        wire::Request {
            flags,
            command,
            cookie: 1,
            offset: 0,
            length: 1,
        }
    }

    #[test]
    fn host_errors_map_to_protocol_values() {
        use io::ErrorKind as K;
        let e = |k: K| io::Error::from(k);
        let w = req(wire::CMD_WRITE, 0);
        assert_eq!(nbd_errno(&e(K::QuotaExceeded), &w), wire::ENOSPC);
        assert_eq!(nbd_errno(&e(K::FileTooLarge), &w), wire::ENOSPC);
        assert_eq!(nbd_errno(&e(K::StorageFull), &w), wire::ENOSPC);
        assert_eq!(nbd_errno(&e(K::ReadOnlyFilesystem), &w), wire::EPERM);
        assert_eq!(nbd_errno(&e(K::NotFound), &w), wire::EIO);
        assert_eq!(nbd_errno(&io::Error::other("x"), &w), wire::EIO);
    }

    #[test]
    fn enotsup_only_where_the_request_allows_it() {
        let e = io::Error::from(io::ErrorKind::Unsupported);
        let fast = req(wire::CMD_WRITE_ZEROES, wire::CMD_FLAG_FAST_ZERO);
        assert_eq!(nbd_errno(&e, &fast), wire::ENOTSUP);
        assert_eq!(nbd_errno(&e, &req(wire::CMD_WRITE_ZEROES, 0)), wire::EINVAL);
        assert_eq!(nbd_errno(&e, &req(wire::CMD_TRIM, 0)), wire::EINVAL);
        assert_eq!(nbd_errno(&e, &req(wire::CMD_READ, 0)), wire::EINVAL);
    }
}

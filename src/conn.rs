//! The byte stream to one client: a connected socket (systemd, our own
//! listener) or a pair of pipes (`--stdio`). It carries an optional *wait
//! budget*: while negotiating, the total time spent waiting for the client
//! is bounded (`--handshake-timeout`), but time the server spends on its own
//! work, such as running mkfs, does not count against the client.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::poll::PollFlags;

use crate::nbd::stream::Channel;
use crate::sys;

/// One client's connection.
pub struct Conn {
    rd: OwnedFd,
    /// Where replies go when it is not `rd` (stdio: stdout).
    wr: Option<OwnedFd>,
    /// Time the client may still keep us waiting, if bounded.
    budget: Option<Duration>,
    /// How long one reply may wait for the client to read (pipes; sockets
    /// use SO_SNDTIMEO instead, which costs no extra system call).
    pipe_stall: Option<Duration>,
}

impl Conn {
    /// A connected stream socket (both directions on one fd).
    pub fn socket(fd: OwnedFd) -> Conn {
        Conn {
            rd: fd,
            wr: None,
            budget: None,
            pipe_stall: None,
        }
    }

    /// Separate read and write ends (stdin/stdout).
    pub fn pipes(rd: OwnedFd, wr: OwnedFd) -> Conn {
        Conn {
            rd,
            wr: Some(wr),
            budget: None,
            pipe_stall: None,
        }
    }

    /// Bound the total time the peer may make us wait from now on (`None`:
    /// wait forever).
    pub fn set_wait_budget(&mut self, budget: Option<Duration>) {
        self.budget = budget;
    }

    /// Bound how long a reply may wait for a client that does not read
    /// (`None`: forever). A stalled write then fails with `WouldBlock`.
    pub fn set_reply_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        if self.wr.is_some() {
            self.pipe_stall = timeout;
            return Ok(());
        }
        let tv = nix::sys::time::TimeVal::new(
            timeout.map_or(0, |t| t.as_secs() as i64),
            timeout.map_or(0, |t| i64::from(t.subsec_micros())),
        );
        nix::sys::socket::setsockopt(&self.rd, nix::sys::socket::sockopt::SendTimeout, &tv)?;
        Ok(())
    }

    pub fn read_fd(&self) -> BorrowedFd<'_> {
        self.rd.as_fd()
    }

    /// The fd replies are written to.
    pub fn write_fd(&self) -> BorrowedFd<'_> {
        self.wr.as_ref().unwrap_or(&self.rd).as_fd()
    }

    /// Wait until the fd is ready, charging the wait to the budget.
    fn wait(&mut self, write: bool) -> io::Result<()> {
        let Some(budget) = self.budget else {
            if let (true, Some(stall)) = (write, self.pipe_stall)
                && !sys::poll_one(self.write_fd(), PollFlags::POLLOUT, Some(stall))?
            {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            return Ok(());
        };
        let (fd, events) = if write {
            (self.write_fd(), PollFlags::POLLOUT)
        } else {
            (self.read_fd(), PollFlags::POLLIN)
        };
        let started = Instant::now();
        let ready = sys::poll_one(fd, events, Some(budget))?;
        self.budget = Some(budget.saturating_sub(started.elapsed()));
        if !ready {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client did not finish negotiating in time",
            ));
        }
        Ok(())
    }
}

/// A client stream the session can run over: the plain connection, or TLS
/// on top of it.
pub trait Transport: Channel {
    /// The connection underneath (for its wait budget).
    fn conn(&mut self) -> &mut Conn;
    /// Say goodbye properly before the process exits (TLS close_notify).
    fn finish(&mut self) {}
}

impl Channel for Conn {
    fn raw_fds(&self) -> Option<(BorrowedFd<'_>, BorrowedFd<'_>)> {
        Some((self.read_fd(), self.write_fd()))
    }
}

impl Transport for Conn {
    fn conn(&mut self) -> &mut Conn {
        self
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.wait(false)?;
        nix::unistd::read(&self.rd, buf).map_err(io::Error::from)
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.wait(true)?;
        nix::unistd::write(self.write_fd(), buf).map_err(io::Error::from)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.wait(true)?;
        nix::sys::uio::writev(self.write_fd(), bufs).map_err(io::Error::from)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

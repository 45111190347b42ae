//! The byte stream to one client: a connected socket (systemd, our own
//! listener) or a pair of fds (`--stdio`: a socket pair from libnbd, or
//! pipes from inetd or ssh). It carries an optional *wait budget*: while
//! negotiating, the total time spent waiting for the client is bounded
//! (`--handshake-timeout`), but time the server spends on its own work,
//! such as running mkfs, does not count against the client. While serving,
//! a reply the client does not take within `--reply-timeout` ends the
//! session.
//!
//! It is also where data moves between the client and a file inside the
//! kernel ([`ZeroCopy`]: sendfile for reads, splice for writes).

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use nix::poll::PollFlags;

use crate::nbd::storage::{Received, ZeroCopy};
use crate::nbd::stream::{Channel, write_all_vectored};
use crate::sys;

/// How replies leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    /// A socket: blocking sends bounded by SO_SNDTIMEO, which costs no
    /// extra system call.
    Socket,
    /// A pipe: non-blocking writes, and poll(2) to wait for room, bounded
    /// by the reply timeout.
    Pipe,
}

/// A send that times out may still have sent part of what it was given;
/// it returns early only then (or for a signal). Allow for the kernel's
/// timer granularity when telling the two apart.
const TIMER_SLACK: Duration = Duration::from_millis(20);

/// One client's connection.
pub struct Conn {
    rd: OwnedFd,
    /// Where replies go when it is not `rd` (stdio: stdout).
    wr: Option<OwnedFd>,
    out: Out,
    /// Time the client may still keep us waiting, if bounded.
    budget: Option<Duration>,
    /// How long one reply may wait for the client to take it.
    reply_timeout: Option<Duration>,
    /// For splice(2) from the client into a file, made on first use.
    pipe: Option<(OwnedFd, OwnedFd)>,
}

impl Conn {
    /// A connected stream socket (both directions on one fd).
    pub fn socket(fd: OwnedFd) -> Conn {
        Conn {
            rd: fd,
            wr: None,
            out: Out::Socket,
            budget: None,
            reply_timeout: None,
            pipe: None,
        }
    }

    /// Separate read and write ends (stdin/stdout). A pipe to write to is
    /// made non-blocking so that a client that stops reading cannot hold a
    /// write forever; a socket keeps blocking sends with a timeout.
    pub fn pipes(rd: OwnedFd, wr: OwnedFd) -> Conn {
        let out = if is_fifo(wr.as_fd()) {
            let flags = fcntl(&wr, FcntlArg::F_GETFL).map(OFlag::from_bits_truncate);
            if let Ok(f) = flags {
                let _ = fcntl(&wr, FcntlArg::F_SETFL(f | OFlag::O_NONBLOCK));
            }
            Out::Pipe
        } else {
            Out::Socket
        };
        Conn {
            rd,
            wr: Some(wr),
            out,
            budget: None,
            reply_timeout: None,
            pipe: None,
        }
    }

    /// Bound the total time the peer may make us wait from now on (`None`:
    /// wait forever).
    pub fn set_wait_budget(&mut self, budget: Option<Duration>) {
        self.budget = budget;
    }

    /// Bound how long a reply may wait for a client that does not read
    /// (`None`: forever). A reply not taken in time fails with
    /// `WouldBlock`: the client stopped reading.
    pub fn set_reply_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.reply_timeout = timeout;
        if self.out == Out::Pipe {
            return Ok(());
        }
        let tv = nix::sys::time::TimeVal::new(
            timeout.map_or(0, |t| t.as_secs() as i64),
            timeout.map_or(0, |t| i64::from(t.subsec_micros())),
        );
        nix::sys::socket::setsockopt(
            &self.write_fd(),
            nix::sys::socket::sockopt::SendTimeout,
            &tv,
        )?;
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
            if write && self.out == Out::Pipe {
                let ready = sys::poll_one(self.write_fd(), PollFlags::POLLOUT, self.reply_timeout)?;
                if !ready {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
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

    /// Account for a send that took `asked` bytes and sent `sent` of them,
    /// having started at `started`. On a socket a blocking send returns
    /// early only when its timeout expired (or a signal came): a reply the
    /// client did not take within the reply timeout ends the session then,
    /// not after one more full timeout per partial send (a client that
    /// never reads used to be dropped after about four).
    fn sent(&self, sent: usize, asked: usize, started: Instant) -> io::Result<usize> {
        if let (Out::Socket, Some(limit)) = (self.out, self.reply_timeout)
            && sent < asked
            && started.elapsed() + TIMER_SLACK >= limit
        {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(sent)
    }

    /// One send of the reply path: `op` is retried while a non-blocking
    /// pipe is full, and its count goes through [`Conn::sent`].
    fn send_with(
        &mut self,
        asked: usize,
        mut op: impl FnMut(BorrowedFd<'_>) -> nix::Result<usize>,
    ) -> io::Result<usize> {
        self.wait(true)?;
        let started = Instant::now();
        loop {
            match op(self.write_fd()) {
                Ok(n) => return self.sent(n, asked, started),
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) if self.out == Out::Pipe => self.wait(true)?,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn is_fifo(fd: BorrowedFd<'_>) -> bool {
    nix::sys::stat::fstat(fd).is_ok_and(|st| {
        nix::sys::stat::SFlag::from_bits_truncate(st.st_mode)
            .contains(nix::sys::stat::SFlag::S_IFIFO)
    })
}

/// A client stream the session can run over: the plain connection, or TLS
/// on top of it.
pub trait Transport: Channel {
    /// The connection underneath (for its wait budget).
    fn conn(&mut self) -> &mut Conn;
    /// Say goodbye properly before the process exits (TLS close_notify).
    fn close(&mut self) {}
}

impl Channel for Conn {
    fn zero_copy(&mut self) -> Option<&mut dyn ZeroCopy> {
        Some(self)
    }

    fn input_ready(&self) -> Option<bool> {
        // An error is news too: let the read report it.
        Some(sys::poll_one(self.read_fd(), PollFlags::POLLIN, Some(Duration::ZERO)).unwrap_or(true))
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
        self.send_with(buf.len(), |fd| nix::unistd::write(fd, buf))
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let asked = bufs.iter().map(|b| b.len()).sum();
        self.send_with(asked, |fd| nix::sys::uio::writev(fd, bufs))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ZeroCopy for Conn {
    fn send_file(
        &mut self,
        head: &[&[u8]],
        file: BorrowedFd<'_>,
        offset: u64,
        len: usize,
    ) -> io::Result<usize> {
        let mut slices: Vec<IoSlice<'_>> = head
            .iter()
            .filter(|h| !h.is_empty())
            .map(|h| IoSlice::new(h))
            .collect();
        write_all_vectored(self, &mut slices)?;
        let mut off =
            i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut sent = 0;
        while sent < len {
            let want = len - sent;
            let n = self.send_with(want, |fd| {
                nix::sys::sendfile::sendfile64(fd, file, Some(&mut off), want)
            })?;
            if n == 0 {
                // The file ended: the caller decides what the rest is.
                break;
            }
            sent += n;
        }
        Ok(sent)
    }

    fn splice_to_file(
        &mut self,
        file: BorrowedFd<'_>,
        offset: u64,
        len: usize,
    ) -> io::Result<Received> {
        let mut off =
            i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        if self.pipe.is_none() {
            let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
            // Bigger pipes mean fewer splices; the default (64 KiB) works too.
            let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(1 << 20));
            self.pipe = Some((r, w));
        }
        let Some((pr, pw)) = &self.pipe else {
            return Err(io::Error::other("splice pipe missing"));
        };
        let mut failure: Option<io::Error> = None;
        let mut left = len;
        while left > 0 {
            let n = loop {
                match splice(&self.rd, None, pw, None, left, SpliceFFlags::SPLICE_F_MOVE) {
                    Err(Errno::EINTR) => continue,
                    r => break r?,
                }
            };
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            left -= n;
            // Empty the pipe into the file, every byte or an error; once
            // the file has failed, into nowhere (the payload must still be
            // consumed to keep the stream in step).
            let mut in_pipe = n;
            while in_pipe > 0 {
                if failure.is_none() {
                    match splice(
                        pr,
                        None,
                        file,
                        Some(&mut off),
                        in_pipe,
                        SpliceFFlags::SPLICE_F_MOVE,
                    ) {
                        Ok(0) => failure = Some(io::ErrorKind::WriteZero.into()),
                        Ok(m) => in_pipe -= m,
                        Err(Errno::EINTR) => {}
                        Err(e) => failure = Some(e.into()),
                    }
                } else {
                    let mut sink = [0u8; 8192];
                    let m = nix::unistd::read(pr, &mut sink[..in_pipe.min(8192)])?;
                    in_pipe -= m;
                }
            }
        }
        Ok(match failure {
            None => Received::Stored,
            Some(e) => Received::Failed(e),
        })
    }
}

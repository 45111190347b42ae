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

/// One client's connection.
pub struct Conn {
    rd: OwnedFd,
    /// Where replies go when it is not `rd` (stdio: stdout).
    wr: Option<OwnedFd>,
    /// Time the client may still keep us waiting while negotiating, if
    /// bounded.
    budget: Option<Duration>,
    /// Serving: the fds are non-blocking, and every wait is a poll.
    serving: bool,
    /// How long the client may leave data we are sending untaken.
    reply_timeout: Option<Duration>,
    /// When we first had to wait for the client to take data, in the
    /// stretch of waiting that is still going on.
    stalled_since: Option<Instant>,
    /// For splice(2) from the client into a file, made on first use.
    pipe: Option<(OwnedFd, OwnedFd)>,
    /// The client is on another machine: read replies go out with
    /// sendfile (see [`Conn::set_remote`]).
    remote: bool,
}

impl Conn {
    /// A connected stream socket (both directions on one fd).
    pub fn socket(fd: OwnedFd) -> Conn {
        Self::new(fd, None)
    }

    /// Separate read and write ends (stdin/stdout).
    pub fn pipes(rd: OwnedFd, wr: OwnedFd) -> Conn {
        Self::new(rd, Some(wr))
    }

    fn new(rd: OwnedFd, wr: Option<OwnedFd>) -> Conn {
        Conn {
            rd,
            wr,
            budget: None,
            serving: false,
            reply_timeout: None,
            stalled_since: None,
            pipe: None,
            remote: false,
        }
    }

    /// Say whether the client is on another machine: read replies to a
    /// remote client always leave straight from the file (sendfile: no
    /// copy here, and the NIC reads the page cache). For a client on this
    /// machine it depends on who is waiting for whom (see
    /// [`Conn::sends_files`]).
    pub fn set_remote(&mut self, remote: bool) {
        self.remote = remote;
    }

    /// Bound the total time the peer may make us wait from now on (`None`:
    /// wait forever).
    ///
    /// With a bound, the write side becomes non-blocking: poll(2) saying
    /// there is room promises only some room, and a blocking write of more
    /// (a batch of option replies, TLS's first flight) would then wait for
    /// a client that never reads, however long, outside the budget.
    pub fn set_wait_budget(&mut self, budget: Option<Duration>) -> io::Result<()> {
        self.budget = budget;
        if budget.is_some() {
            set_nonblocking(self.write_fd())?;
        }
        Ok(())
    }

    /// Enter the transmission phase: a client that leaves the data we send
    /// untaken for `reply_timeout` (`None`: forever) is dropped, its next
    /// send failing with `WouldBlock`.
    ///
    /// The fds become non-blocking and every wait a poll(2) bounded by
    /// what is left of the timeout. A blocking send with SO_SNDTIMEO, as
    /// before, restarted its timeout after every partial send, and
    /// sendfile makes one send per 64 KiB: a client that never read was
    /// dropped only after several timeouts (9.25 s for 3 s, measured with
    /// 1 MiB reads over TCP; 12.5 s in the report). Reads stay as they
    /// were: a read that finds nothing polls, which only happens when we
    /// would have slept anyway.
    pub fn start_serving(&mut self, reply_timeout: Option<Duration>) -> io::Result<()> {
        self.budget = None;
        self.reply_timeout = reply_timeout;
        set_nonblocking(self.write_fd())?;
        // A read pipe stays blocking (nothing else reads from it); a
        // socket is one file description for both directions anyway.
        if self.wr.is_none() || !is_fifo(self.rd.as_fd()) {
            set_nonblocking(self.rd.as_fd())?;
        }
        self.serving = true;
        Ok(())
    }

    pub fn read_fd(&self) -> BorrowedFd<'_> {
        self.rd.as_fd()
    }

    /// The fd replies are written to.
    pub fn write_fd(&self) -> BorrowedFd<'_> {
        self.wr.as_ref().unwrap_or(&self.rd).as_fd()
    }

    /// While negotiating: wait until the fd is ready, charging the wait to
    /// the budget.
    fn wait(&mut self, write: bool) -> io::Result<()> {
        let Some(budget) = self.budget else {
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

    /// Serving: the client has not taken what we sent and the kernel has
    /// no room for more. Wait for room, within what is left of the reply
    /// timeout counted from the first such wait.
    fn wait_for_room(&mut self) -> io::Result<()> {
        let since = *self.stalled_since.get_or_insert_with(Instant::now);
        let left = self
            .reply_timeout
            .map(|t| t.saturating_sub(since.elapsed()));
        if left == Some(Duration::ZERO)
            || !sys::poll_one(self.write_fd(), PollFlags::POLLOUT, left)?
        {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(())
    }

    /// One send of `asked` bytes by `op`; how many went. While serving, a
    /// full kernel buffer is waited out with [`Conn::wait_for_room`], and a
    /// send that takes everything ends a stretch of waiting.
    fn send_with(
        &mut self,
        asked: usize,
        mut op: impl FnMut(BorrowedFd<'_>) -> nix::Result<usize>,
    ) -> io::Result<usize> {
        self.wait(true)?;
        loop {
            match op(self.write_fd()) {
                Ok(n) => {
                    if n == asked {
                        self.stalled_since = None;
                    }
                    return Ok(n);
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) if self.serving => self.wait_for_room()?,
                // Negotiating with a budget (see set_wait_budget).
                Err(Errno::EAGAIN) if self.budget.is_some() => self.wait(true)?,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// One read by `op`; while serving, an empty socket is waited for.
    fn recv_with(
        &mut self,
        mut op: impl FnMut(BorrowedFd<'_>) -> nix::Result<usize>,
    ) -> io::Result<usize> {
        self.wait(false)?;
        loop {
            match op(self.read_fd()) {
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) if self.serving => {
                    sys::poll_one(self.read_fd(), PollFlags::POLLIN, None)?;
                }
                // A socket's read side shares the write side's
                // non-blocking flag while negotiating.
                Err(Errno::EAGAIN) if self.budget.is_some() => self.wait(false)?,
                r => return r.map_err(io::Error::from),
            }
        }
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
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

    /// To a client on this machine, sendfile moves a copy from us to the
    /// client: its own receive copies straight out of our page cache
    /// instead of out of the socket's buffer. That pays when we are the
    /// slower side, and costs when the client is: one that works between
    /// requests (fio verifying every block, a kernel filesystem, a VM).
    /// The socket tells which: when less than this reply is still waiting
    /// for the client, it is about to wait for us, and the reply leaves by
    /// sendfile; otherwise it is copied here, sparing the client. Where the
    /// count cannot be had (a pipe), replies are copied. Over TCP the count
    /// leaves out what waits unread in the client's receive buffer, so a
    /// client is seen as behind only once that buffer is full.
    ///
    /// Measured with fio (256 KiB x 16, alternating runs, one binary, TCP
    /// unless said), against copying every reply and against sendfile for
    /// all: the base's data read 3.8-5.0 GB/s against 2.0-3.0 and
    /// 2.8-3.7; a filled disk's read 3.3-4.6 against 1.8-3.1 and 3.2-3.6
    /// (Unix: 3.5-4.9 against 2.1-2.5); the read-back while verifying, the
    /// client's busiest case, 2.6-3.1 against 2.4-2.5 and 1.7-1.9 (Unix:
    /// 3.2-4.1 against 3.4-3.5).
    fn sends_files(&self, len: usize) -> bool {
        self.remote || sys::unsent_output(self.write_fd()).is_ok_and(|untaken| untaken < len)
    }

    fn read_waiting(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // Only serving makes the fd non-blocking (a read pipe stays
        // blocking, see start_serving): before that, or on such a pipe, a
        // read could block.
        if !self.serving || self.wr.is_some() {
            return Ok(None);
        }
        loop {
            match nix::unistd::read(self.read_fd(), buf) {
                Ok(n) => return Ok(Some(n)),
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Transport for Conn {
    fn conn(&mut self) -> &mut Conn {
        self
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv_with(|fd| nix::unistd::read(fd, buf))
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
        if self.pipe.is_none() {
            let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
            // Bigger pipes mean fewer splices; the default (64 KiB) works too.
            let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(1 << 20));
            self.pipe = Some((r, w));
        }
        let Some((pr, pw)) = self.pipe.take() else {
            return Err(io::Error::other("splice pipe missing"));
        };
        let r = self.splice_through(&pr, &pw, file, offset, len);
        self.pipe = Some((pr, pw));
        r
    }
}

impl Conn {
    /// [`ZeroCopy::splice_to_file`] through the pipe `pr`/`pw`.
    fn splice_through(
        &mut self,
        pr: &OwnedFd,
        pw: &OwnedFd,
        file: BorrowedFd<'_>,
        offset: u64,
        len: usize,
    ) -> io::Result<Received> {
        let mut off =
            i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut failure: Option<io::Error> = None;
        let mut left = len;
        while left > 0 {
            let n =
                self.recv_with(|fd| splice(fd, None, pw, None, left, SpliceFFlags::SPLICE_F_MOVE))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// Read replies to a remote client leave by sendfile, which must send
    /// the header and exactly the range.
    #[test]
    fn sendfile_sends_the_header_and_the_range() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut conn = Conn::socket(OwnedFd::from(ours));
        conn.set_remote(true);
        assert!(conn.sends_files(1 << 20));
        let path = std::env::temp_dir().join(format!("tmpdisk-conn-{}", std::process::id()));
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut theirs = theirs;
            theirs.read_to_end(&mut got).unwrap();
            got
        });
        let sent = conn
            .send_file(&[b"head", b"er"], file.as_fd(), 1000, 150_000)
            .unwrap();
        assert_eq!(sent, 150_000);
        drop(conn);
        let got = reader.join().unwrap();
        assert_eq!(&got[..6], b"header");
        assert_eq!(&got[6..], &data[1000..151_000]);
    }

    /// A local client gets sendfile while it has less than the reply
    /// still to take, and copies once it falls behind; over a pipe, where
    /// nothing tells, always copies.
    #[test]
    fn a_local_client_gets_sendfile_only_while_it_waits() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut conn = Conn::socket(OwnedFd::from(ours));
        assert!(conn.sends_files(4096), "nothing untaken: the client waits");
        conn.write_all(&[7u8; 100_000]).unwrap();
        assert!(!conn.sends_files(65_536), "100 kB untaken: copy");
        assert!(conn.sends_files(200_000), "less than the reply untaken");
        let mut got = vec![0u8; 100_000];
        theirs.read_exact(&mut got).unwrap();
        assert!(conn.sends_files(65_536), "all taken: sendfile again");

        let (pr, pw) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        let piped = Conn::pipes(pr, pw);
        assert!(!piped.sends_files(1 << 20), "a pipe: copied");
    }

    /// `read_waiting` never blocks: nothing before serving starts (the fd
    /// may still block), nothing when the client has sent nothing, what
    /// it sent when it has, and the end of the stream as a read of 0.
    #[test]
    fn read_waiting_takes_only_what_is_there() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut conn = Conn::socket(OwnedFd::from(ours));
        let mut buf = [0u8; 16];
        theirs.write_all(b"early").unwrap();
        assert_eq!(conn.read_waiting(&mut buf).unwrap(), None);
        conn.start_serving(None).unwrap();
        assert_eq!(conn.read_waiting(&mut buf).unwrap(), Some(5));
        assert_eq!(&buf[..5], b"early");
        assert_eq!(conn.read_waiting(&mut buf).unwrap(), None);
        theirs.write_all(b"more").unwrap();
        assert_eq!(conn.read_waiting(&mut buf).unwrap(), Some(4));
        drop(theirs);
        assert_eq!(conn.read_waiting(&mut buf).unwrap(), Some(0));
    }
}

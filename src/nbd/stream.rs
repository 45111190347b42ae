//! A buffered, full-duplex view of the client's byte stream, shared by
//! negotiation and transmission.
//!
//! Reads come through a fixed buffer, so that a pipeline of small requests
//! costs one read(2) rather than one per header. Small replies are queued
//! and sent together: the queue is flushed before we would block waiting
//! for the client (nothing buffered on the input side), before a large
//! payload, and when it grows large. Large payloads go out with one
//! writev(2) that carries the queue, the header and the data together.
//!
//! It works over any [`Channel`], so tests and fuzzers can run the protocol
//! over an in-memory stream. When the channel offers [`ZeroCopy`] (a plain
//! fd, no TLS in between) and the storage can use it, large reads go from
//! the disk to the client and large writes from the client into the disk
//! inside the kernel. Everything else passes through one page-aligned
//! payload buffer in pieces of at most [`PIECE`] bytes, so no request,
//! however large, grows the process.
//!
//! Every error comes back as the protocol's [`Hangup`]: the stream is the
//! one place where a transport error is sorted into what it means.

use std::io::{self, IoSlice, Read, Write};
use std::time::{Duration, Instant};

use super::buf::PageBuf;
use super::error::Hangup;
use super::storage::{Received, Storage, ZeroCopy};

/// A byte stream to the client.
pub trait Channel: Read + Write {
    /// The connection as a zero-copy endpoint, when the bytes on it are the
    /// protocol itself (not under TLS).
    fn zero_copy(&mut self) -> Option<&mut dyn ZeroCopy> {
        None
    }

    /// Whether client input is waiting right now, without blocking; `None`
    /// when this channel cannot tell (the stream then never spins).
    fn input_ready(&self) -> Option<bool> {
        None
    }

    /// Read what the client has sent already, without waiting: `Ok(None)`
    /// when nothing is waiting, or when this channel cannot read without
    /// blocking.
    fn read_waiting(&mut self, _buf: &mut [u8]) -> io::Result<Option<usize>> {
        Ok(None)
    }

    /// Whether a read reply of `len` bytes should leave straight from the
    /// file (sendfile) rather than through our buffer, where
    /// [`Channel::zero_copy`] allows both.
    fn sends_files(&self, _len: usize) -> bool {
        true
    }
}

const READ_BUF: usize = 32 * 1024;
/// The read buffer's size until a read fills it: a client that sends one
/// request at a time, or big payloads (which bypass it), never needs more,
/// and the pages of a zeroed buffer are real memory in every client's
/// process (7 of the 8 pages of a 32 KiB buffer were resident zeroes in an
/// idle client: 28 KiB of its 255 KiB PSS).
const READ_BUF_START: usize = 4 * 1024;
/// Flush the reply queue once it holds this much.
const QUEUE_LIMIT: usize = 64 * 1024;
/// Payloads at least this large are not copied into the queue.
const COPY_LIMIT: usize = 16 * 1024;
/// The most payload held in memory at once on the copy path: a request
/// larger than this is read and written, or read and sent, in pieces.
pub const PIECE: usize = 256 * 1024;
/// How long we keep polling for the client's next message before going to
/// sleep in read(2), and how soon after our last flush its previous message
/// must have come for us to bother (see [`Stream::fill`]).
const SPIN: Duration = Duration::from_micros(50);
const SPIN_WINDOW: Duration = Duration::from_micros(200);

/// Data at least this large moves between client and disk inside the
/// kernel, when channel and storage allow. Smaller pieces are cheaper
/// copied: a small read reply then joins the batched queue, and a small
/// write payload usually arrived in the read buffer with its header.
pub const ZERO_COPY_MIN: usize = 64 * 1024;

pub struct Stream<C> {
    ch: C,
    /// READ_BUF_START bytes, grown to READ_BUF once a read fills it.
    rbuf: Vec<u8>,
    rpos: usize,
    rend: usize,
    queue: Vec<u8>,
    /// Read and write payloads on the copy path: no per-request
    /// allocation, page-aligned for fast copies, at most [`PIECE`] bytes.
    data: PageBuf,
    /// How long the client took, after our last flush, to send more the
    /// last time we had to wait for it.
    last_gap: Option<Duration>,
    /// A large payload was taken on the splice path: the next read takes
    /// only the next message's header (see [`Stream::read_message`]).
    header_next: bool,
}

impl<C: Channel> Stream<C> {
    pub fn new(ch: C) -> Self {
        Stream {
            ch,
            rbuf: vec![0u8; READ_BUF_START],
            rpos: 0,
            rend: 0,
            queue: Vec::with_capacity(4096),
            data: PageBuf::default(),
            last_gap: None,
            header_next: false,
        }
    }

    /// The channel underneath, with every queued reply flushed first.
    pub fn channel(&mut self) -> Result<&mut C, Hangup> {
        self.flush()?;
        Ok(&mut self.ch)
    }

    /// Take the channel back (e.g. to wrap it in TLS). Input that was
    /// already buffered is returned too: the caller decides whether it is
    /// a protocol error (data pipelined past STARTTLS is).
    pub fn into_parts(mut self) -> Result<(C, Vec<u8>), Hangup> {
        self.flush()?;
        let rest = self.rbuf[self.rpos..self.rend].to_vec();
        Ok((self.ch, rest))
    }

    /// Whether the client has sent more than we have read so far, as far as
    /// this stream can tell without blocking: buffered here, or waiting in
    /// the channel.
    pub fn has_pending_input(&self) -> bool {
        self.rpos < self.rend || self.ch.input_ready() == Some(true)
    }

    fn fill(&mut self) -> Result<usize, Hangup> {
        self.fill_up_to(self.rbuf.len())
    }

    /// [`Stream::fill`], reading at most `max` bytes.
    fn fill_up_to(&mut self, max: usize) -> Result<usize, Hangup> {
        debug_assert!(self.rpos == self.rend);
        // About to wait for the client: everything it is owed goes first.
        self.flush()?;
        let flushed = Instant::now();
        // A client that keeps requests in flight has usually sent the next
        // one already: one read takes it, where asking poll(2) first made
        // a second system call (strace -c, fio reading the 4 GiB golden
        // disk at 256 KiB x 16: 2562 polls, now 126, beside 2822 writev and
        // 3079 pread). A read that finds nothing costs what the poll it
        // replaces did, spent while we would wait anyway.
        let r = match self.ch.read_waiting(&mut self.rbuf[..max]) {
            Ok(Some(n)) => {
                self.took(n);
                Ok(n)
            }
            Ok(None) => {
                self.spin_for_input(flushed);
                self.read_into_buffer(max)
            }
            Err(e) => Err(Hangup::from_io(e, false)),
        };
        self.last_gap = Some(flushed.elapsed());
        r
    }

    /// A client that answers our replies within microseconds (one request
    /// in flight at a time) is best met awake: going to sleep in read(2)
    /// and being woken costs tens of microseconds per request on a VM
    /// (measured here: 4 KiB random reads at queue depth 1 over a Unix
    /// socket went from 13.0k to 33-37k IOPS with a 50 us spin). So when
    /// the client's last message followed our flush within SPIN_WINDOW,
    /// poll without sleeping for up to SPIN before the blocking read. An
    /// idle client is never spun for, and nor is a channel that cannot be
    /// polled (under TLS, rustls may hold decrypted input already).
    fn spin_for_input(&self, since: Instant) {
        if self.last_gap.is_none_or(|gap| gap > SPIN_WINDOW) {
            return;
        }
        while since.elapsed() < SPIN {
            if self.ch.input_ready() != Some(false) {
                return;
            }
            std::hint::spin_loop();
        }
    }

    /// A read put `n` bytes in the empty buffer; one that filled it means
    /// the client sends more than it holds, so it grows for the next.
    fn took(&mut self, n: usize) {
        self.rpos = 0;
        self.rend = n;
        if n == self.rbuf.len() && n < READ_BUF {
            self.rbuf.resize(READ_BUF, 0);
        }
    }

    fn read_into_buffer(&mut self, max: usize) -> Result<usize, Hangup> {
        loop {
            match self.ch.read(&mut self.rbuf[..max]) {
                Ok(n) => {
                    self.took(n);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // A TLS peer that closes without close_notify: an end of
                // stream like any other (the caller decides whether it fell
                // between messages).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.rpos = 0;
                    self.rend = 0;
                    return Ok(0);
                }
                Err(e) => return Err(Hangup::from_io(e, false)),
            }
        }
    }

    /// Read exactly `out.len()` bytes. Returns `Ok(false)` if the stream
    /// ended cleanly before the first byte (the peer left between
    /// messages); an end after some bytes is [`Hangup::Truncated`].
    ///
    /// Right after a payload that went to the disk by splice, only the
    /// message itself is read: a client streaming large writes has the
    /// next payload behind the header, and a full read would take up to
    /// 32 KiB of it through the read buffer, to be written from there
    /// (one pwrite per request, strace) before the rest could splice.
    /// Left in the socket, all of it splices. fio's sequential write (256
    /// KiB x 16, 1 GiB), alternating runs of the builds before and after,
    /// medians: 2122 against 2684 MB/s over a Unix socket (5 runs each),
    /// 2237 against 2698 over TCP (11), 2334 against 3121 into a golden
    /// overlay (11); single runs still spread widely (813-3591 over TCP).
    /// A pipeline of small requests after such a write costs one more read
    /// for the first header.
    pub fn read_message(&mut self, out: &mut [u8]) -> Result<bool, Hangup> {
        if out.is_empty() {
            return Ok(true);
        }
        let max = if std::mem::take(&mut self.header_next) {
            out.len().min(self.rbuf.len())
        } else {
            self.rbuf.len()
        };
        if self.rpos == self.rend && self.fill_up_to(max)? == 0 {
            return Ok(false);
        }
        self.read_exact(out)?;
        Ok(true)
    }

    /// Read exactly `out.len()` bytes; large reads bypass the buffer.
    pub fn read_exact(&mut self, out: &mut [u8]) -> Result<(), Hangup> {
        let mut done = 0;
        while done < out.len() {
            if self.rpos < self.rend {
                let n = (self.rend - self.rpos).min(out.len() - done);
                out[done..done + n].copy_from_slice(&self.rbuf[self.rpos..self.rpos + n]);
                self.rpos += n;
                done += n;
                continue;
            }
            let want = out.len() - done;
            if want >= READ_BUF {
                self.flush()?;
                done += read_past_buffer(&mut self.ch, &mut out[done..])?;
            } else if self.fill()? == 0 {
                return Err(Hangup::Truncated);
            }
        }
        Ok(())
    }

    /// Read and throw away `n` bytes, in fixed-size pieces: a client cannot
    /// make us allocate by announcing a large payload we do not want.
    pub fn skip(&mut self, mut n: u64) -> Result<(), Hangup> {
        while n > 0 {
            if self.rpos == self.rend && self.fill()? == 0 {
                return Err(Hangup::Truncated);
            }
            let k = ((self.rend - self.rpos) as u64).min(n) as usize;
            self.rpos += k;
            n -= k as u64;
        }
        Ok(())
    }

    /// Queue bytes to send; they go out at the next flush.
    pub fn queue(&mut self, parts: &[&[u8]]) -> Result<(), Hangup> {
        for p in parts {
            self.queue.extend_from_slice(p);
        }
        if self.queue.len() >= QUEUE_LIMIT {
            self.flush()?;
        }
        Ok(())
    }

    /// Send a header and a payload. Small payloads join the queue; large
    /// ones leave at once in one writev with whatever was queued.
    pub fn send(&mut self, header: &[u8], payload: &[u8]) -> Result<(), Hangup> {
        if payload.len() < COPY_LIMIT {
            return self.queue(&[header, payload]);
        }
        let queued = std::mem::take(&mut self.queue);
        let mut slices = [
            IoSlice::new(&queued),
            IoSlice::new(header),
            IoSlice::new(payload),
        ];
        let r = write_all_vectored(&mut self.ch, &mut slices);
        self.queue = queued;
        self.queue.clear();
        r.map_err(|e| Hangup::from_io(e, false))
    }

    /// Send `header` followed by `len` bytes of the disk from `offset`
    /// inside the kernel. Returns false (and sends nothing) when channel or
    /// storage cannot; the caller then reads the data and sends it. Once
    /// the header is out, any failure is a broken stream: we hang up.
    pub fn send_range<S: Storage + ?Sized>(
        &mut self,
        header: &[u8],
        disk: &S,
        offset: u64,
        len: usize,
    ) -> Result<bool, Hangup> {
        if !self.ch.sends_files(len) {
            return Ok(false);
        }
        let Some(out) = self.ch.zero_copy() else {
            return Ok(false);
        };
        // The queue leaves first, in the same writev as the header.
        let sent = disk
            .send(out, &[&self.queue, header], offset, len)
            .map_err(|e| Hangup::from_io(e, false))?;
        if sent {
            self.queue.clear();
        }
        Ok(sent)
    }

    /// Take a `len`-byte payload from the client into the disk at
    /// `offset`: the part already buffered is written from the buffer, the
    /// rest moves inside the kernel where channel and storage allow, and
    /// otherwise through the payload buffer in pieces. The whole payload is
    /// consumed either way; the inner result says whether the disk stored
    /// every byte of it.
    pub fn receive<S: Storage + ?Sized>(
        &mut self,
        disk: &S,
        offset: u64,
        len: usize,
    ) -> Result<io::Result<()>, Hangup> {
        if len >= ZERO_COPY_MIN && self.ch.zero_copy().is_some() {
            self.header_next = true;
            let head = self.take_head(offset, len, disk.receive_align())?;
            // Nothing buffered (the usual case, see read_message): no call
            // at all, where an overlay would have read and rewritten a block
            // for an empty write.
            let stored = match head.is_empty() {
                true => Ok(()),
                false => disk.write_at(head, offset),
            };
            let rest = len - head.len();
            if let Err(e) = stored {
                self.skip(rest as u64)?;
                return Ok(Err(e));
            }
            if rest == 0 {
                return Ok(Ok(()));
            }
            let at = offset + (len - rest) as u64;
            if let Some(inp) = self.ch.zero_copy() {
                match disk.receive(inp, at, rest) {
                    Ok(Some(Received::Stored)) => return Ok(Ok(())),
                    Ok(Some(Received::Failed(e))) => return Ok(Err(e)),
                    Ok(None) => return self.copy_in(disk, at, rest),
                    Err(e) => return Err(Hangup::from_io(e, true)),
                }
            }
            return self.copy_in(disk, at, rest);
        }
        self.copy_in(disk, offset, len)
    }

    /// The part of a `len`-byte payload for `offset` that came in with
    /// its header (already in the read buffer), topped up from the channel
    /// to the next multiple of `align` on the disk, so that the rest starts
    /// on one ([`Storage::receive_align`]): an overlay takes only whole
    /// blocks into its delta by splice, and copied the whole payload of
    /// every large write when the rest began mid-block (strace -c, fio
    /// 256 KiB writes: four pwrite64 and a pread64 of the image per
    /// request, no splice). A plain image splices from anywhere, so its
    /// head is just what was buffered. In a stream of large writes only the
    /// first has a head: after it, [`Stream::read_message`] reads headers
    /// alone.
    fn take_head(&mut self, offset: u64, len: usize, align: u64) -> Result<&[u8], Hangup> {
        let buffered = (self.rend - self.rpos).min(len);
        if buffered == 0 {
            return Ok(&[]);
        }
        let end = (offset + buffered as u64).next_multiple_of(align.max(1));
        let want = usize::try_from(end - offset).map_or(len, |n| n.min(len));
        if want == buffered {
            let head = &self.rbuf[self.rpos..self.rpos + buffered];
            self.rpos += buffered;
            return Ok(head);
        }
        // About to wait for the client (a little): what it is owed first.
        self.flush()?;
        // The buffered bytes and the few after them, together: the head
        // is at most a read buffer and a block, well under a piece.
        let head = self.data.get(0, want);
        head[..buffered].copy_from_slice(&self.rbuf[self.rpos..self.rpos + buffered]);
        self.rpos += buffered;
        let mut done = buffered;
        while done < want {
            // Never through the read buffer, which would take in more than
            // `want`.
            done += read_past_buffer(&mut self.ch, &mut head[done..])?;
        }
        Ok(head)
    }

    /// The copy path of [`Stream::receive`]: piece by piece through the
    /// payload buffer. After the disk fails, the rest is still read (and
    /// dropped), so that the stream stays in step.
    fn copy_in<S: Storage + ?Sized>(
        &mut self,
        disk: &S,
        offset: u64,
        len: usize,
    ) -> Result<io::Result<()>, Hangup> {
        let mut data = std::mem::take(&mut self.data);
        let mut result = Ok(());
        let mut done = 0;
        while done < len {
            let n = (len - done).min(PIECE);
            let piece = data.get(0, n);
            if let Err(h) = self.read_exact(piece) {
                self.data = data;
                return Err(h);
            }
            if result.is_ok() {
                result = disk.write_at(piece, offset + done as u64);
            }
            done += n;
        }
        self.data = data;
        Ok(result)
    }

    /// The payload buffer, `lead + len` bytes with byte `lead` on a page
    /// boundary (room for a chunk header's offset in front of the data).
    /// `len` is at most [`PIECE`].
    pub fn payload(&mut self, lead: usize, len: usize) -> &mut [u8] {
        debug_assert!(len <= PIECE);
        self.data.get(lead, len)
    }

    /// Send `header` then the payload buffer as [`Stream::payload`] gave
    /// it out for (`lead`, `len`): all `lead + len` bytes, or with
    /// `data_only` just the `len` bytes after the lead.
    pub fn send_payload(
        &mut self,
        header: &[u8],
        lead: usize,
        len: usize,
        data_only: bool,
    ) -> Result<(), Hangup> {
        let mut data = std::mem::take(&mut self.data);
        let p = data.get(lead, len);
        let r = self.send(header, if data_only { &p[lead..] } else { p });
        self.data = data;
        r
    }

    /// Send everything queued.
    pub fn flush(&mut self) -> Result<(), Hangup> {
        if self.queue.is_empty() {
            return Ok(());
        }
        let r = self
            .ch
            .write_all(&self.queue)
            .and_then(|()| self.ch.flush());
        self.queue.clear();
        r.map_err(|e| Hangup::from_io(e, false))
    }
}

/// `write_all` for a list of slices (std's is unstable).
pub fn write_all_vectored<W: Write + ?Sized>(
    w: &mut W,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    w.flush()
}

/// One read(2) straight from the channel into `out`, mid-message: how many
/// bytes came (0 only if `out` is empty), an end of stream being
/// [`Hangup::Truncated`]. A signal's interruption is retried.
fn read_past_buffer<C: Channel>(ch: &mut C, out: &mut [u8]) -> Result<usize, Hangup> {
    loop {
        match ch.read(out) {
            Ok(0) if !out.is_empty() => return Err(Hangup::Truncated),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Hangup::from_io(e, true)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::storage::Extent;
    use std::io::Cursor;
    use std::os::fd::AsFd;

    /// An in-memory channel: reads from `input`, at most `per_read`
    /// bytes a read, and records writes.
    struct Mem {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
        per_read: usize,
    }
    impl Read for Mem {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            let n = b.len().min(self.per_read);
            self.input.read(&mut b[..n])
        }
    }
    impl Channel for Mem {}

    impl Write for Mem {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A stream whose reads dribble, at most 7 bytes each, to exercise
    /// reassembly.
    fn stream(input: &[u8]) -> Stream<Mem> {
        Stream::new(Mem {
            input: Cursor::new(input.to_vec()),
            output: Vec::new(),
            per_read: 7,
        })
    }

    /// The read buffer stays small for a client whose reads never fill
    /// it, grows once one does, and keeps every byte in order across the
    /// growth (the read that filled it is still being taken apart).
    #[test]
    fn the_read_buffer_grows_only_when_a_read_fills_it() {
        let messages: Vec<[u8; 28]> = (0..2000u32)
            .map(|i| {
                let mut m = [0u8; 28];
                m[..4].copy_from_slice(&i.to_be_bytes());
                m[27] = i as u8;
                m
            })
            .collect();
        let input = messages.concat();
        let read_all = |per_read: usize| {
            let mut s = Stream::new(Mem {
                input: Cursor::new(input.clone()),
                output: Vec::new(),
                per_read,
            });
            for m in &messages {
                let mut got = [0u8; 28];
                assert!(s.read_message(&mut got).unwrap());
                assert_eq!(&got, m);
            }
            let mut one = [0u8; 1];
            assert!(!s.read_message(&mut one).unwrap());
            s.rbuf.len()
        };
        assert_eq!(read_all(28), READ_BUF_START, "one message a read");
        assert_eq!(read_all(usize::MAX), READ_BUF, "reads that fill it");
    }

    #[test]
    fn messages_reassemble_and_eof_is_clean_only_between_messages() {
        let mut s = stream(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        let mut a = [0u8; 10];
        assert!(s.read_message(&mut a).unwrap());
        assert_eq!(a, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        let mut b = [0u8; 4];
        assert!(matches!(s.read_message(&mut b), Err(Hangup::Truncated)));
        let mut s = stream(&[]);
        assert!(!s.read_message(&mut b).unwrap());
    }

    #[test]
    fn skip_consumes_exactly() {
        let mut s = stream(&[0; 100]);
        s.skip(99).unwrap();
        let mut one = [9u8; 1];
        s.read_exact(&mut one).unwrap();
        assert_eq!(one, [0]);
        assert!(s.skip(1).is_err());
    }

    /// A channel that splices: what it hands a file is recorded, by file
    /// offset.
    struct Splicing {
        mem: Mem,
        spliced: Vec<(u64, Vec<u8>)>,
    }
    impl Read for Splicing {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.mem.read(b)
        }
    }
    impl Write for Splicing {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.mem.write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl Channel for Splicing {
        fn zero_copy(&mut self) -> Option<&mut dyn ZeroCopy> {
            Some(self)
        }
    }
    impl ZeroCopy for Splicing {
        fn send_file(
            &mut self,
            _: &[&[u8]],
            _: std::os::fd::BorrowedFd<'_>,
            _: u64,
            _: usize,
        ) -> io::Result<usize> {
            Err(io::Error::other("not here"))
        }
        fn splice_to_file(
            &mut self,
            _: std::os::fd::BorrowedFd<'_>,
            offset: u64,
            len: usize,
        ) -> io::Result<Received> {
            let mut got = vec![0u8; len];
            self.mem.input.read_exact(&mut got)?;
            self.spliced.push((offset, got));
            Ok(Received::Stored)
        }
    }

    /// A disk that, like an overlay, takes a payload by splice only from a
    /// block boundary on; it records what it was given which way.
    struct BlockDisk {
        written: std::cell::RefCell<Vec<(u64, Vec<u8>)>>,
        /// 4096 like an overlay, 1 like a plain image.
        align: u64,
    }
    impl Storage for BlockDisk {
        fn size(&self) -> u64 {
            1 << 30
        }
        fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.written.borrow_mut().push((offset, buf.to_vec()));
            Ok(())
        }
        fn trim(&self, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn zero(&self, _: u64, _: u64, _: bool, _: bool) -> io::Result<()> {
            Ok(())
        }
        fn cache(&self, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn extents(&self, _: u64, _: u64, _: usize, _: &mut Vec<Extent>) -> io::Result<()> {
            Ok(())
        }
        fn send(&self, _: &mut dyn ZeroCopy, _: &[&[u8]], _: u64, _: usize) -> io::Result<bool> {
            Ok(false)
        }
        fn receive_align(&self) -> u64 {
            self.align
        }
        fn receive(
            &self,
            inp: &mut dyn ZeroCopy,
            offset: u64,
            len: usize,
        ) -> io::Result<Option<Received>> {
            if !offset.is_multiple_of(self.align) {
                return Ok(None);
            }
            inp.splice_to_file(std::io::stdin().as_fd(), offset, len)
                .map(Some)
        }
    }

    /// A large write whose header came with part of its payload: for a
    /// disk that splices only whole blocks, the buffered part is written up
    /// to a block boundary and all the rest is spliced from there; for one
    /// that splices from anywhere, just the buffered part is written. Every
    /// byte once and in place.
    #[test]
    fn a_large_write_is_spliced_from_where_the_disk_can_take_it() {
        let cases = [
            (0u64, READ_BUF, 4096),
            (1000, READ_BUF, 4096),
            (8192, 28 + 4068, 4096),
            (0, 28, 4096),
            (1000, READ_BUF, 1),
        ];
        for (offset, per_read, align) in cases {
            let len = 256 * 1024;
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut input = vec![0xAAu8; 28];
            input.extend_from_slice(&payload);
            let mut s = Stream::new(Splicing {
                mem: Mem {
                    input: Cursor::new(input),
                    output: Vec::new(),
                    per_read,
                },
                spliced: Vec::new(),
            });
            // Let the read buffer grow as it would in a busy client.
            s.rbuf.resize(READ_BUF, 0);
            let mut header = [0u8; 28];
            assert!(s.read_message(&mut header).unwrap());
            let disk = BlockDisk {
                written: Default::default(),
                align,
            };
            s.receive(&disk, offset, len).unwrap().unwrap();
            let spliced = std::mem::take(&mut s.ch.spliced);
            let written = disk.written.into_inner();
            let case = format!("offset {offset}, {per_read} bytes a read, align {align}");
            assert_eq!(spliced.len(), 1, "{case}: one splice for the rest");
            let (at, rest) = &spliced[0];
            assert!(at.is_multiple_of(align), "{case}: splice at {at}");
            let buffered = (per_read - 28).min(len) as u64;
            if align == 1 {
                assert_eq!(
                    *at,
                    offset + buffered,
                    "{case}: only the buffered part written"
                );
            }
            assert!(
                rest.len() > len - READ_BUF - 4096,
                "{case}: {} spliced",
                rest.len()
            );
            let mut disk_bytes = vec![0u8; len];
            let mut covered = 0;
            for (o, b) in written.iter().chain(spliced.iter()) {
                let i = (o - offset) as usize;
                disk_bytes[i..i + b.len()].copy_from_slice(b);
                covered += b.len();
            }
            assert_eq!(covered, len, "{case}: every byte once");
            assert!(disk_bytes == payload, "{case}: bytes in place");
        }
    }

    /// After a payload that went by splice, the next read takes just the
    /// next header, so the following large write splices whole (nothing of
    /// it written from the read buffer); the read after that fills the
    /// buffer as usual again.
    #[test]
    fn after_a_spliced_write_the_next_payload_stays_for_splice() {
        let len = 256 * 1024;
        let payload = |k: usize| -> Vec<u8> { (0..len).map(|i| ((i + k) % 253) as u8).collect() };
        let mut input = Vec::new();
        for k in 0..2 {
            input.extend_from_slice(&[0xA0 + k as u8; 28]);
            input.extend_from_slice(&payload(k));
        }
        input.extend_from_slice(&[0xB0; 28]);
        input.extend_from_slice(&[0xC0; 28]);
        let mut s = Stream::new(Splicing {
            mem: Mem {
                input: Cursor::new(input),
                output: Vec::new(),
                per_read: usize::MAX,
            },
            spliced: Vec::new(),
        });
        s.rbuf.resize(READ_BUF, 0);
        let disk = BlockDisk {
            written: Default::default(),
            align: 1,
        };
        let mut header = [0u8; 28];
        for k in 0..2u64 {
            assert!(s.read_message(&mut header).unwrap());
            assert_eq!(header, [0xA0 + k as u8; 28]);
            s.receive(&disk, k << 20, len).unwrap().unwrap();
        }
        let written = disk.written.into_inner();
        assert_eq!(written.len(), 1, "only the first write had a buffered head");
        assert_eq!(written[0].0, 0);
        let spliced = std::mem::take(&mut s.ch.spliced);
        assert_eq!(spliced.len(), 2);
        assert_eq!(spliced[1].0, 1 << 20, "the second splices from its start");
        assert!(spliced[1].1 == payload(1), "all of it, in place");
        assert!(s.read_message(&mut header).unwrap());
        assert_eq!(header, [0xB0; 28]);
        assert_eq!(s.rend - s.rpos, 0, "just the header was read");
        assert!(s.read_message(&mut header).unwrap());
        assert_eq!(header, [0xC0; 28]);
    }

    #[test]
    fn replies_keep_their_order_across_queue_and_writev() {
        let mut s = stream(&[]);
        s.queue(&[b"ab"]).unwrap();
        s.send(b"H", &[7u8; COPY_LIMIT]).unwrap();
        s.queue(&[b"cd"]).unwrap();
        s.flush().unwrap();
        let out = &s.ch.output;
        assert_eq!(&out[..3], b"abH");
        assert_eq!(out.len(), 3 + COPY_LIMIT + 2);
        assert_eq!(&out[out.len() - 2..], b"cd");
    }
}

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
//! It works over any `Read + Write` channel, so tests and fuzzers can run
//! the protocol over an in-memory stream.

use std::io::{self, IoSlice, Read, Write};

const READ_BUF: usize = 64 * 1024;
/// Flush the reply queue once it holds this much.
const QUEUE_LIMIT: usize = 64 * 1024;
/// Payloads at least this large are not copied into the queue.
const COPY_LIMIT: usize = 16 * 1024;

pub struct Stream<C> {
    ch: C,
    rbuf: Box<[u8]>,
    rpos: usize,
    rend: usize,
    queue: Vec<u8>,
    /// Bytes read from / written to the client so far.
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl<C: Read + Write> Stream<C> {
    pub fn new(ch: C) -> Self {
        Stream {
            ch,
            rbuf: vec![0u8; READ_BUF].into_boxed_slice(),
            rpos: 0,
            rend: 0,
            queue: Vec::with_capacity(QUEUE_LIMIT),
            bytes_in: 0,
            bytes_out: 0,
        }
    }

    /// The channel underneath, with every queued reply flushed first.
    pub fn channel(&mut self) -> io::Result<&mut C> {
        self.flush()?;
        Ok(&mut self.ch)
    }

    /// Take the channel back (e.g. to wrap it in TLS). Input that was
    /// already buffered is returned too: the caller decides whether it is
    /// a protocol error (data pipelined past STARTTLS is).
    pub fn into_parts(mut self) -> io::Result<(C, Vec<u8>)> {
        self.flush()?;
        let rest = self.rbuf[self.rpos..self.rend].to_vec();
        Ok((self.ch, rest))
    }

    /// Whether more client input is already buffered (so reading the next
    /// message will not block).
    pub fn has_buffered_input(&self) -> bool {
        self.rpos < self.rend
    }

    fn fill(&mut self) -> io::Result<usize> {
        debug_assert!(self.rpos == self.rend);
        // About to wait for the client: everything it is owed goes first.
        self.flush()?;
        loop {
            match self.ch.read(&mut self.rbuf) {
                Ok(n) => {
                    self.rpos = 0;
                    self.rend = n;
                    self.bytes_in += n as u64;
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
                Err(e) => return Err(e),
            }
        }
    }

    /// Read exactly `out.len()` bytes. Returns `Ok(false)` if the stream
    /// ended cleanly before the first byte (the peer left between
    /// messages); an end after some bytes is `UnexpectedEof`.
    pub fn read_message(&mut self, out: &mut [u8]) -> io::Result<bool> {
        if out.is_empty() {
            return Ok(true);
        }
        if self.rpos == self.rend && self.fill()? == 0 {
            return Ok(false);
        }
        self.read_exact(out)?;
        Ok(true)
    }

    /// Read exactly `out.len()` bytes; large reads bypass the buffer.
    pub fn read_exact(&mut self, out: &mut [u8]) -> io::Result<()> {
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
                let n = match self.ch.read(&mut out[done..]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => r?,
                };
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                self.bytes_in += n as u64;
                done += n;
            } else if self.fill()? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    /// Read and throw away `n` bytes, in fixed-size pieces: a client cannot
    /// make us allocate by announcing a large payload we do not want.
    pub fn skip(&mut self, mut n: u64) -> io::Result<()> {
        while n > 0 {
            if self.rpos == self.rend && self.fill()? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let k = ((self.rend - self.rpos) as u64).min(n) as usize;
            self.rpos += k;
            n -= k as u64;
        }
        Ok(())
    }

    /// Queue bytes to send; they go out at the next flush.
    pub fn queue(&mut self, parts: &[&[u8]]) -> io::Result<()> {
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
    pub fn send(&mut self, header: &[u8], payload: &[u8]) -> io::Result<()> {
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
        self.bytes_out += (queued.len() + header.len() + payload.len()) as u64;
        self.queue = queued;
        self.queue.clear();
        r
    }

    /// Send everything queued.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.queue.is_empty() {
            return Ok(());
        }
        let r = self.ch.write_all(&self.queue);
        self.bytes_out += self.queue.len() as u64;
        self.queue.clear();
        r?;
        self.ch.flush()
    }
}

/// `write_all` for a list of slices (std's is unstable).
fn write_all_vectored<W: Write>(w: &mut W, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// An in-memory channel: reads from `input`, records writes.
    struct Mem {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Mem {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            // Dribble: at most 7 bytes a read, to exercise reassembly.
            let n = b.len().min(7);
            self.input.read(&mut b[..n])
        }
    }
    impl Write for Mem {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn stream(input: &[u8]) -> Stream<Mem> {
        Stream::new(Mem {
            input: Cursor::new(input.to_vec()),
            output: Vec::new(),
        })
    }

    #[test]
    fn messages_reassemble_and_eof_is_clean_only_between_messages() {
        let mut s = stream(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        let mut a = [0u8; 10];
        assert!(s.read_message(&mut a).unwrap());
        assert_eq!(a, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        let mut b = [0u8; 4];
        let e = s.read_message(&mut b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
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
        assert_eq!(s.bytes_out, out.len() as u64);
    }
}

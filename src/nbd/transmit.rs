//! The transmission phase: read a request, validate it, do it, reply; until
//! the client disconnects.
//!
//! Requests are served one at a time in arrival order (one client, one
//! disk, one process); pipelined requests are read from the buffer and
//! their replies batched (see [`Stream`]). Reads are hole-aware: with
//! structured replies an unallocated range goes out as an OFFSET_HOLE chunk
//! of 12 bytes instead of its zeroes. The disk is whatever implements
//! [`Storage`].

use tracing::{debug, warn};

use super::error::{Hangup, ReplyError};
use super::negotiate::{Negotiated, Replies};
use super::storage::{Extent, Storage};
use super::stream::{Channel, PIECE, Stream, ZERO_COPY_MIN};
use super::validate::{Command, Limits, max_drain, payload_len, validate};
use super::wire::*;

/// Most descriptors sent in one block-status reply: plenty for a client to
/// make progress, and a bound on the work one request can cause.
const MAX_DESCRIPTORS: usize = 4096;

/// What one session did, for the disconnect log line.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub requests: u64,
    /// Bytes the client read from the disk (holes included).
    pub bytes_read: u64,
    /// Of those, the bytes of replies that took the zero-copy path
    /// (sendfile; a part past the end of a shorter file goes as written
    /// zeroes): every read of a remote client, a local client's while it
    /// waits.
    pub bytes_read_by_sendfile: u64,
    /// Bytes the client wrote to the disk.
    pub bytes_written: u64,
    /// Requests the disk failed (ENOSPC when the tmpdir is full...).
    pub disk_errors: u64,
}

/// How the session ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransmissionEnd {
    /// NBD_CMD_DISC.
    Disconnect,
    /// The client closed the connection between requests.
    Closed,
}

/// Serve requests until the client leaves.
pub fn serve<C: Channel, S: Storage + ?Sized>(
    s: &mut Stream<C>,
    disk: &S,
    n: &Negotiated,
    stats: &mut Stats,
) -> Result<TransmissionEnd, Hangup> {
    let mut t = Transmission {
        s,
        disk,
        replies: n.replies,
        limits: Limits {
            size: n.size,
            replies: n.replies,
            base_allocation: n.base_allocation,
        },
        buf: Vec::new(),
        extents: Vec::new(),
        stats,
    };
    let r = t.run();
    if let Err(Hangup::Protocol(_)) = &r {
        // Replies to the requests before the one that broke framing are
        // owed; the client may still be reading.
        let _ = t.s.flush();
    }
    r
}

struct Transmission<'a, C, S: ?Sized> {
    s: &'a mut Stream<C>,
    disk: &'a S,
    replies: Replies,
    limits: Limits,
    /// Reused for block-status replies.
    buf: Vec<u8>,
    extents: Vec<Extent>,
    stats: &'a mut Stats,
}

impl<C: Channel, S: Storage + ?Sized> Transmission<'_, C, S> {
    fn run(&mut self) -> Result<TransmissionEnd, Hangup> {
        loop {
            let Some(req) = self.next_request()? else {
                return Ok(TransmissionEnd::Closed);
            };
            self.stats.requests += 1;
            let payload = payload_len(&req, self.replies);
            let cmd = match validate(&req, &self.limits) {
                Ok(cmd) => cmd,
                Err(e) => {
                    if payload > max_drain(self.replies) {
                        return Err(Hangup::Protocol(format!(
                            "{}: {} and its {payload}-byte payload is too large to skip",
                            command_name(req.command),
                            e.message
                        )));
                    }
                    self.s.skip(payload)?;
                    self.reply_error(&req, &e)?;
                    continue;
                }
            };
            let (off, len) = (req.offset, req.length);
            match cmd {
                Command::Disc => {
                    self.s.flush()?;
                    return Ok(TransmissionEnd::Disconnect);
                }
                Command::Read { df } => self.read(&req, df)?,
                Command::Write => {
                    let r = self.s.receive(self.disk, off, len as usize)?;
                    self.stats.bytes_written += len;
                    self.reply(&req, r.map_err(|e| ReplyError::from_io("write", &e, &req)))?;
                }
                // The disk is temporary and dies with the process: there is
                // nothing to make durable, so FLUSH (and FUA) are no-ops.
                Command::Flush => self.reply_ok(&req)?,
                Command::Trim => {
                    let r = self.disk.trim(off, len);
                    self.reply(&req, r.map_err(|e| ReplyError::from_io("trim", &e, &req)))?;
                }
                Command::Cache => {
                    // Advisory: the data is in the page cache or a hole.
                    if let Err(e) = self.disk.cache(off, len) {
                        debug!(error = %e, "cache hint failed");
                    }
                    self.reply_ok(&req)?;
                }
                Command::WriteZeroes { no_hole, fast } => {
                    let r = self.disk.zero(off, len, !no_hole, fast);
                    let r = r.map_err(|e| ReplyError::from_io("write zeroes", &e, &req));
                    self.reply(&req, r)?;
                }
                Command::BlockStatus { req_one } => self.block_status(&req, req_one)?,
            }
        }
    }

    fn next_request(&mut self) -> Result<Option<Request>, Hangup> {
        let extended = self.replies == Replies::Extended;
        let len = if extended {
            EXTENDED_REQUEST_LEN
        } else {
            COMPACT_REQUEST_LEN
        };
        let mut h = [0u8; EXTENDED_REQUEST_LEN];
        if !self.s.read_message(&mut h[..len])? {
            return Ok(None);
        }
        let decoded = match h.first_chunk() {
            Some(compact) if !extended => Request::decode_compact(compact),
            _ => Request::decode_extended(&h),
        };
        decoded
            .map(Some)
            .map_err(|m| Hangup::Protocol(format!("bad request magic {:#x}", m.0)))
    }

    fn read(&mut self, req: &Request, df: bool) -> Result<(), Hangup> {
        self.stats.bytes_read += req.length;
        if !self.replies.structured() {
            return self.read_simple(req);
        }
        self.extents.clear();
        if df {
            // Don't fragment: one data chunk, holes as literal zeroes.
            self.extents.push(Extent {
                offset: req.offset,
                length: req.length,
                data: true,
            });
        } else if let Err(e) =
            self.disk
                .extents(req.offset, req.length, usize::MAX, &mut self.extents)
        {
            return self.reply_error(req, &ReplyError::from_io("read", &e, req));
        }
        let extents = std::mem::take(&mut self.extents);
        let last = extents.len().saturating_sub(1);
        let mut result = Ok(true);
        for (i, x) in extents.iter().enumerate() {
            result = self.read_chunks(req, x, i == last, df);
            if !matches!(result, Ok(true)) {
                break;
            }
        }
        self.extents = extents;
        result.map(|_| ())
    }

    /// A read with a simple reply: one header, then the data. The header
    /// may only go out once the first piece is in hand, because an error
    /// after it cannot be reported: a later piece that cannot be read (or
    /// a failure after sendfile began) ends the session, as the spec
    /// requires.
    fn read_simple(&mut self, req: &Request) -> Result<(), Hangup> {
        let h = simple_reply(0, req.cookie);
        let len = req.length as usize;
        if len >= ZERO_COPY_MIN && self.s.send_range(h.bytes(), self.disk, req.offset, len)? {
            self.stats.bytes_read_by_sendfile += req.length;
            return Ok(());
        }
        let mut done = 0;
        while done < len {
            let n = (len - done).min(PIECE);
            if let Err(e) = self
                .disk
                .read_at(self.s.payload(0, n), req.offset + done as u64)
            {
                if done == 0 {
                    return self.reply_error(req, &ReplyError::from_io("read", &e, req));
                }
                return Err(Hangup::Server(format!(
                    "the disk failed a read after its simple reply began: {e}"
                )));
            }
            let head: &[u8] = if done == 0 { h.bytes() } else { &[] };
            self.s.send_payload(head, 0, n, false)?;
            done += n;
        }
        Ok(())
    }

    /// Send one extent of a structured read: a hole chunk, or its data in
    /// one chunk sent from the disk inside the kernel, or read through the
    /// payload buffer in pieces of at most [`PIECE`] bytes. Each piece is
    /// a chunk of its own, so that a piece that cannot be read is reported
    /// with an error chunk. With DF (`one_chunk`) the data is one chunk
    /// whose header goes out with the first piece; when a later piece
    /// fails, the chunk is finished with zeroes and an error chunk with
    /// the failed offset follows, as the spec asks. `last`: the reply ends
    /// here, with DONE on the final chunk; a DF chunk of more than one
    /// piece is not final (an error may still come), so a NONE chunk
    /// carries it. Ok(false) when the read failed and an error chunk ended
    /// the reply.
    fn read_chunks(
        &mut self,
        req: &Request,
        x: &Extent,
        last: bool,
        one_chunk: bool,
    ) -> Result<bool, Hangup> {
        let done_if = |end: bool| if end { REPLY_FLAG_DONE } else { 0 };
        if !x.data {
            let mut h = self.chunk_header(done_if(last), REPLY_TYPE_OFFSET_HOLE, req, 12);
            // A hole inside one request fits in u32 (payloads are <= 32 MiB).
            h.u64(x.offset).u32(x.length as u32);
            self.s.queue(&[h.bytes()])?;
            return Ok(true);
        }
        let len = x.length as usize;
        if len >= ZERO_COPY_MIN {
            let flags = done_if(last);
            let mut h = self.chunk_header(flags, REPLY_TYPE_OFFSET_DATA, req, 8 + len as u64);
            h.u64(x.offset);
            if self.s.send_range(h.bytes(), self.disk, x.offset, len)? {
                self.stats.bytes_read_by_sendfile += x.length;
                return Ok(true);
            }
        }
        // A DF chunk read in one piece is read before its header goes
        // out, so it may be final; a longer one is followed by NONE.
        let df_final = last && len <= PIECE;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(PIECE);
            let at = x.offset + done as u64;
            // Room for the offset in front of the data, so the chunk's
            // payload is one contiguous slice.
            let payload = self.s.payload(8, n);
            payload[..8].copy_from_slice(&at.to_be_bytes());
            if let Err(e) = self.disk.read_at(&mut payload[8..], at) {
                if one_chunk && done > 0 {
                    // The chunk's header is out: finish it with zeroes.
                    self.pad_chunk(len - done)?;
                }
                self.reply_error_at(req, &ReplyError::from_io("read", &e, req), at)?;
                return Ok(false);
            }
            if one_chunk {
                // One header for the whole extent, then the pieces as they
                // are read (the offset goes out once, in front).
                let h = match done {
                    0 => self.chunk_header(
                        done_if(df_final),
                        REPLY_TYPE_OFFSET_DATA,
                        req,
                        8 + len as u64,
                    ),
                    _ => ChunkHeader::default(),
                };
                self.s.send_payload(h.bytes(), 8, n, done > 0)?;
            } else {
                let end = last && done + n == len;
                let h = self.chunk_header(done_if(end), REPLY_TYPE_OFFSET_DATA, req, 8 + n as u64);
                self.s.send_payload(h.bytes(), 8, n, false)?;
            }
            done += n;
        }
        if one_chunk && last && !df_final {
            let h = self.chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, req, 0);
            self.s.queue(&[h.bytes()])?;
        }
        Ok(true)
    }

    /// The rest of a data chunk whose header is out, `left` bytes, as
    /// zeroes (the spec's padding after an error inside a chunk).
    fn pad_chunk(&mut self, mut left: usize) -> Result<(), Hangup> {
        while left > 0 {
            let n = left.min(PIECE);
            self.s.payload(0, n).fill(0);
            self.s.send_payload(&[], 0, n, false)?;
            left -= n;
        }
        Ok(())
    }

    fn block_status(&mut self, req: &Request, req_one: bool) -> Result<(), Hangup> {
        self.extents.clear();
        let max = if req_one { 1 } else { MAX_DESCRIPTORS };
        if let Err(e) = self
            .disk
            .extents(req.offset, req.length, max, &mut self.extents)
        {
            return self.reply_error(req, &ReplyError::from_io("block status", &e, req));
        }
        let extended = self.replies == Replies::Extended;
        let mut p = std::mem::take(&mut self.buf);
        p.clear();
        p.u32(META_ID_BASE_ALLOCATION);
        if extended {
            p.u32(self.extents.len() as u32);
        }
        for x in &self.extents {
            let state = if x.data { 0 } else { STATE_HOLE | STATE_ZERO };
            if extended {
                p.u64(x.length).u64(u64::from(state));
            } else {
                // Compact requests are at most 4 GiB - 1, so each extent
                // inside one fits.
                p.u32(x.length as u32).u32(state);
            }
        }
        let kind = if extended {
            REPLY_TYPE_BLOCK_STATUS_EXT
        } else {
            REPLY_TYPE_BLOCK_STATUS
        };
        let h = self.chunk_header(REPLY_FLAG_DONE, kind, req, p.len() as u64);
        let r = self.s.send(h.bytes(), &p);
        self.buf = p;
        r
    }

    /// The header of a structured or extended reply chunk.
    fn chunk_header(&self, flags: u16, kind: u16, req: &Request, len: u64) -> ChunkHeader {
        match self.replies {
            Replies::Extended => extended_reply(flags, kind, req.cookie, req.offset, len),
            _ => structured_reply(flags, kind, req.cookie, len as u32),
        }
    }

    fn reply(&mut self, req: &Request, r: Result<(), ReplyError>) -> Result<(), Hangup> {
        match r {
            Ok(()) => self.reply_ok(req),
            Err(e) => self.reply_error(req, &e),
        }
    }

    fn reply_ok(&mut self, req: &Request) -> Result<(), Hangup> {
        if self.replies == Replies::Extended {
            // No simple replies with extended headers.
            let h = self.chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, req, 0);
            return self.s.queue(&[h.bytes()]);
        }
        self.s.queue(&[simple_reply(0, req.cookie).bytes()])
    }

    fn reply_error(&mut self, req: &Request, e: &ReplyError) -> Result<(), Hangup> {
        self.send_error(req, e, None)
    }

    fn reply_error_at(&mut self, req: &Request, e: &ReplyError, offset: u64) -> Result<(), Hangup> {
        self.send_error(req, e, Some(offset))
    }

    fn send_error(
        &mut self,
        req: &Request,
        e: &ReplyError,
        offset: Option<u64>,
    ) -> Result<(), Hangup> {
        if e.disk {
            // The operator hears about the first one; the rest are counted
            // in the disconnect line (a client hammering a full disk must
            // not flood the log).
            if self.stats.disk_errors == 0 {
                warn!(
                    command = command_name(req.command),
                    reason = %e.message,
                    "the disk failed a request; later failures are counted"
                );
            }
            self.stats.disk_errors += 1;
        }
        debug!(
            command = command_name(req.command),
            offset = req.offset,
            length = req.length,
            errno = e.errno,
            reason = %e.message,
            "request failed"
        );
        if !self.replies.structured() {
            return self.s.queue(&[simple_reply(e.errno, req.cookie).bytes()]);
        }
        let msg = &e.message.as_bytes()[..e.message.len().min(MAX_STRING)];
        let mut p = Vec::with_capacity(6 + msg.len() + 8);
        p.u32(e.errno).u16(msg.len() as u16).put(msg);
        let kind = match offset {
            Some(o) => {
                p.u64(o);
                REPLY_TYPE_ERROR_OFFSET
            }
            None => REPLY_TYPE_ERROR,
        };
        let h = self.chunk_header(REPLY_FLAG_DONE, kind, req, p.len() as u64);
        self.s.queue(&[h.bytes(), &p])
    }
}

//! The transmission phase: read a request, validate it, do it, reply; until
//! the client disconnects.
//!
//! Requests are served one at a time in arrival order (one client, one
//! disk, one process); pipelined requests are read from the buffer and
//! their replies batched (see [`Stream`]). Reads are hole-aware: with
//! structured replies an unallocated range goes out as an OFFSET_HOLE chunk
//! of 12 bytes instead of its zeroes.

use tracing::{debug, warn};

use std::os::fd::AsFd;

use super::buf::PageBuf;
use super::error::{Hangup, ReplyError};
use super::negotiate::{Negotiated, Replies};
use super::stream::{Channel, Received, Stream, ZERO_COPY_MIN};
use super::validate::{Command, Limits, max_drain, payload_len, validate};
use super::wire::*;
use crate::image::{Extent, Image};

/// Most descriptors sent in one block-status reply: plenty for a client to
/// make progress, and a bound on the work one request can cause.
const MAX_DESCRIPTORS: usize = 4096;

/// What one session did, for the disconnect log line.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub requests: u64,
    /// Bytes the client read from the disk (holes included).
    pub bytes_read: u64,
    /// Bytes the client wrote to the disk.
    pub bytes_written: u64,
    /// Requests the disk failed (ENOSPC when the tmpdir is full...).
    pub disk_errors: u64,
}

/// How the session ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// NBD_CMD_DISC.
    Disconnect,
    /// The client closed the connection between requests.
    Closed,
}

/// Serve requests until the client leaves.
pub fn serve<C: Channel>(
    s: &mut Stream<C>,
    image: &Image,
    n: &Negotiated,
    stats: &mut Stats,
) -> Result<End, Hangup> {
    let mut t = Transmission {
        s,
        image,
        replies: n.replies,
        limits: Limits {
            size: n.size,
            replies: n.replies,
            base_allocation: n.base_allocation,
        },
        data: PageBuf::default(),
        buf: Vec::new(),
        extents: Vec::new(),
        stats,
    };
    loop {
        let Some(req) = t.next_request()? else {
            return Ok(End::Closed);
        };
        t.stats.requests += 1;
        let payload = payload_len(&req, t.replies);
        let cmd = match validate(&req, &t.limits) {
            Ok(cmd) => cmd,
            Err(e) => {
                if payload > max_drain(t.replies) {
                    return Err(Hangup::Protocol(format!(
                        "{}: {} and its {payload}-byte payload is too large to skip",
                        command_name(req.command),
                        e.message
                    )));
                }
                t.s.skip(payload).map_err(|e| Hangup::from_io(e, true))?;
                t.reply_error(&req, &e)?;
                continue;
            }
        };
        match cmd {
            Command::Disc => {
                t.s.flush().map_err(|e| Hangup::from_io(e, false))?;
                return Ok(End::Disconnect);
            }
            Command::Read { df } => t.read(&req, df)?,
            Command::Write => t.write(&req)?,
            // The disk is temporary and dies with the process: there is
            // nothing to make durable, so FLUSH (and FUA) are no-ops.
            Command::Flush => t.reply_ok(&req)?,
            Command::Trim => {
                let r = match image.punch_hole(req.offset, req.length) {
                    // TRIM is advisory: a filesystem that cannot punch holes
                    // simply keeps the data.
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
                    r => r.map_err(|e| ReplyError::from_io("trim", &e)),
                };
                t.reply(&req, r)?;
            }
            Command::Cache => {
                // Advisory too; the data is in the page cache or a hole.
                if let Err(e) = image.prefetch(req.offset, req.length) {
                    debug!(error = %e, "cache hint failed");
                }
                t.reply_ok(&req)?;
            }
            Command::WriteZeroes { no_hole, fast } => {
                let r = t.write_zeroes(&req, no_hole, fast);
                t.reply(&req, r)?;
            }
            Command::BlockStatus { req_one } => t.block_status(&req, req_one)?,
        }
    }
}

struct Transmission<'a, C> {
    s: &'a mut Stream<C>,
    image: &'a Image,
    replies: Replies,
    limits: Limits,
    /// Reused for every read and write payload: no per-request allocation,
    /// and page-aligned for fast copies.
    data: PageBuf,
    /// Reused for zeroes and block-status replies.
    buf: Vec<u8>,
    extents: Vec<Extent>,
    stats: &'a mut Stats,
}

impl<C: Channel> Transmission<'_, C> {
    fn next_request(&mut self) -> Result<Option<Request>, Hangup> {
        let extended = self.replies == Replies::Extended;
        let len = if extended {
            EXTENDED_REQUEST_LEN
        } else {
            COMPACT_REQUEST_LEN
        };
        let mut h = [0u8; EXTENDED_REQUEST_LEN];
        if !self
            .s
            .read_message(&mut h[..len])
            .map_err(|e| Hangup::from_io(e, true))?
        {
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
        let len = req.length as usize;
        self.stats.bytes_read += req.length;
        if !self.replies.structured() {
            let h = simple_reply(0, req.cookie);
            // Large reads go by sendfile. Its header leaves before the data
            // is read, so a (very unlikely) read error of the image after
            // that can only end the session, as the spec requires.
            if len >= ZERO_COPY_MIN
                && self
                    .s
                    .send_file(&h, self.image.as_fd(), req.offset, len)
                    .map_err(|e| Hangup::from_io(e, false))?
            {
                return Ok(());
            }
            // Simple reply: the header may only go out once the data is in
            // hand, because an error after it cannot be reported.
            let data = self.data.get(0, len);
            if let Err(e) = self.image.read_at(data, req.offset) {
                return self.reply_error(req, &ReplyError::from_io("read", &e));
            }
            return self.s.send(&h, data).map_err(|e| Hangup::from_io(e, false));
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
            self.image
                .extents(req.offset, req.length, usize::MAX, &mut self.extents)
        {
            return self.reply_error(req, &ReplyError::from_io("read", &e));
        }
        let extents = std::mem::take(&mut self.extents);
        let last = extents.len().saturating_sub(1);
        let mut result = Ok(true);
        for (i, x) in extents.iter().enumerate() {
            let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
            result = self.read_chunk(req, x, flags);
            if !matches!(result, Ok(true)) {
                break;
            }
        }
        self.extents = extents;
        result.map(|_| ())
    }

    /// Send one chunk of a structured read. Ok(false) when the read failed
    /// and an error chunk ended the reply.
    fn read_chunk(&mut self, req: &Request, x: &Extent, flags: u16) -> Result<bool, Hangup> {
        let off = x.offset.to_be_bytes();
        if !x.data {
            let mut p = [0u8; 12];
            p[..8].copy_from_slice(&off);
            // A hole inside one request fits in u32 (payloads are <= 32 MiB).
            p[8..].copy_from_slice(&(x.length as u32).to_be_bytes());
            let (h, hl) = self.chunk_header(flags, REPLY_TYPE_OFFSET_HOLE, req, 12);
            self.s
                .queue(&[&h[..hl], &p])
                .map_err(|e| Hangup::from_io(e, false))?;
            return Ok(true);
        }
        let len = x.length as usize;
        let (h, hl) = self.chunk_header(flags, REPLY_TYPE_OFFSET_DATA, req, 8 + len as u64);
        if len >= ZERO_COPY_MIN {
            let mut head = [0u8; 40];
            head[..hl].copy_from_slice(&h[..hl]);
            head[hl..hl + 8].copy_from_slice(&off);
            if self
                .s
                .send_file(&head[..hl + 8], self.image.as_fd(), x.offset, len)
                .map_err(|e| Hangup::from_io(e, false))?
            {
                return Ok(true);
            }
        }
        // Room for the offset in front of the data, so the chunk's payload
        // is one contiguous slice.
        let payload = self.data.get(8, len);
        payload[..8].copy_from_slice(&off);
        if let Err(e) = self.image.read_at(&mut payload[8..], x.offset) {
            let err = ReplyError::from_io("read", &e);
            self.reply_error_at(req, &err, x.offset)?;
            return Ok(false);
        }
        self.s
            .send(&h[..hl], payload)
            .map_err(|e| Hangup::from_io(e, false))?;
        Ok(true)
    }

    fn write(&mut self, req: &Request) -> Result<(), Hangup> {
        let len = req.length as usize;
        if len >= ZERO_COPY_MIN {
            let received = self
                .s
                .recv_into_file(self.image.as_fd(), req.offset, len)
                .map_err(|e| Hangup::from_io(e, true))?;
            if let Some(r) = received {
                self.stats.bytes_written += req.length;
                let r = match r {
                    Received::Stored => Ok(()),
                    Received::Failed(e) => Err(ReplyError::from_io("write", &e)),
                };
                return self.reply(req, r);
            }
        }
        let data = self.data.get(0, len);
        self.s
            .read_exact(data)
            .map_err(|e| Hangup::from_io(e, true))?;
        self.stats.bytes_written += req.length;
        let r = self
            .image
            .write_at(data, req.offset)
            .map_err(|e| ReplyError::from_io("write", &e));
        self.reply(req, r)
    }

    /// Zero a range by fallocate. Without NO_HOLE a punched hole is best:
    /// it reads as zeroes and frees space. FAST_ZERO only succeeds where
    /// fallocate does; we never fall back to writing zeroes for it.
    fn write_zeroes(&mut self, req: &Request, no_hole: bool, fast: bool) -> Result<(), ReplyError> {
        let unsupported = |e: &std::io::Error| e.raw_os_error() == Some(libc::EOPNOTSUPP);
        let (off, len) = (req.offset, req.length);
        if !no_hole {
            match self.image.punch_hole(off, len) {
                Err(e) if unsupported(&e) => {}
                r => return r.map_err(|e| ReplyError::from_io("write zeroes", &e)),
            }
        }
        match self.image.zero_range(off, len) {
            Err(e) if unsupported(&e) => {}
            r => return r.map_err(|e| ReplyError::from_io("write zeroes", &e)),
        }
        if fast {
            return Err(ReplyError::new(
                ENOTSUP,
                "this filesystem cannot zero without writing",
            ));
        }
        let mut scratch = std::mem::take(&mut self.buf);
        let r = self.image.write_zeroes(off, len, &mut scratch);
        self.buf = scratch;
        r.map_err(|e| ReplyError::from_io("write zeroes", &e))
    }

    fn block_status(&mut self, req: &Request, req_one: bool) -> Result<(), Hangup> {
        self.extents.clear();
        let max = if req_one { 1 } else { MAX_DESCRIPTORS };
        if let Err(e) = self
            .image
            .extents(req.offset, req.length, max, &mut self.extents)
        {
            return self.reply_error(req, &ReplyError::from_io("block status", &e));
        }
        let extended = self.replies == Replies::Extended;
        let mut p = std::mem::take(&mut self.buf);
        p.clear();
        p.extend_from_slice(&META_ID_BASE_ALLOCATION.to_be_bytes());
        if extended {
            p.extend_from_slice(&(self.extents.len() as u32).to_be_bytes());
        }
        for x in &self.extents {
            let state = if x.data { 0 } else { STATE_HOLE | STATE_ZERO };
            if extended {
                p.extend_from_slice(&x.length.to_be_bytes());
                p.extend_from_slice(&u64::from(state).to_be_bytes());
            } else {
                // Compact requests are at most 4 GiB - 1, so each extent
                // inside one fits.
                p.extend_from_slice(&(x.length as u32).to_be_bytes());
                p.extend_from_slice(&state.to_be_bytes());
            }
        }
        let kind = if extended {
            REPLY_TYPE_BLOCK_STATUS_EXT
        } else {
            REPLY_TYPE_BLOCK_STATUS
        };
        let (h, hl) = self.chunk_header(REPLY_FLAG_DONE, kind, req, p.len() as u64);
        let r = self
            .s
            .send(&h[..hl], &p)
            .map_err(|e| Hangup::from_io(e, false));
        self.buf = p;
        r
    }

    /// The header of a structured or extended reply chunk, and its length.
    fn chunk_header(&self, flags: u16, kind: u16, req: &Request, len: u64) -> ([u8; 32], usize) {
        let mut h = [0u8; 32];
        if self.replies == Replies::Extended {
            h.copy_from_slice(&extended_reply(flags, kind, req.cookie, req.offset, len));
            (h, EXTENDED_REPLY_LEN)
        } else {
            h[..STRUCTURED_REPLY_LEN]
                .copy_from_slice(&structured_reply(flags, kind, req.cookie, len as u32));
            (h, STRUCTURED_REPLY_LEN)
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
            let (h, hl) = self.chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, req, 0);
            return self
                .s
                .queue(&[&h[..hl]])
                .map_err(|e| Hangup::from_io(e, false));
        }
        let h = simple_reply(0, req.cookie);
        self.s.queue(&[&h]).map_err(|e| Hangup::from_io(e, false))
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
                    message = %e.message,
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
            message = %e.message,
            "request failed"
        );
        if !self.replies.structured() {
            let h = simple_reply(e.errno, req.cookie);
            return self.s.queue(&[&h]).map_err(|e| Hangup::from_io(e, false));
        }
        let msg = &e.message.as_bytes()[..e.message.len().min(MAX_STRING)];
        let mut p = Vec::with_capacity(6 + msg.len() + 8);
        p.extend_from_slice(&e.errno.to_be_bytes());
        p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        p.extend_from_slice(msg);
        let kind = match offset {
            Some(o) => {
                p.extend_from_slice(&o.to_be_bytes());
                REPLY_TYPE_ERROR_OFFSET
            }
            None => REPLY_TYPE_ERROR,
        };
        let (h, hl) = self.chunk_header(REPLY_FLAG_DONE, kind, req, p.len() as u64);
        self.s
            .queue(&[&h[..hl], &p])
            .map_err(|e| Hangup::from_io(e, false))
    }
}

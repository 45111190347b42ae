//! NBD wire format: every magic number, option, reply, command and flag by
//! name, plus the fixed-size headers encoded and decoded as big-endian byte
//! arrays. No I/O and no `unsafe` here; values come from `doc/proto.md` of
//! NetworkBlockDevice/nbd.

// --- handshake ---------------------------------------------------------------
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Server handshake flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client handshake flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
pub const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

// --- options -----------------------------------------------------------------
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_PEEK_EXPORT: u32 = 4;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// A printable name for an option, so logs read as words.
pub fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_PEEK_EXPORT => "NBD_OPT_PEEK_EXPORT",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "unknown option",
    }
}

// --- option replies ----------------------------------------------------------
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR | 10;

/// Information types of NBD_REP_INFO (requested through INFO/GO).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// --- transmission flags (sent with the export size) --------------------------
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_RESIZE: u16 = 1 << 9;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// --- transmission ------------------------------------------------------------
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// A printable name for a command.
pub fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "NBD_CMD_READ",
        CMD_WRITE => "NBD_CMD_WRITE",
        CMD_DISC => "NBD_CMD_DISC",
        CMD_FLUSH => "NBD_CMD_FLUSH",
        CMD_TRIM => "NBD_CMD_TRIM",
        CMD_CACHE => "NBD_CMD_CACHE",
        CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        _ => "unknown command",
    }
}

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// base:allocation descriptor flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context we offer, and the id we give it.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
pub const META_ID_BASE_ALLOCATION: u32 = 1;

/// Error numbers on the wire. These are the protocol's values, not the
/// host's errno (they happen to agree on Linux, but only by convention).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// --- sizes and limits ----------------------------------------------------------
/// Largest READ/WRITE payload we accept and advertise in NBD_INFO_BLOCK_SIZE.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
pub const PREFERRED_BLOCK: u32 = 4096;
/// Longest string (export name, query) the spec lets a peer send.
pub const MAX_STRING: usize = 4096;

pub const COMPACT_REQUEST_LEN: usize = 28;
pub const EXTENDED_REQUEST_LEN: usize = 32;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_REPLY_LEN: usize = 20;
pub const EXTENDED_REPLY_LEN: usize = 32;

// --- encoding and decoding ---------------------------------------------------

/// Reads big-endian fields off a byte slice, front to back; every read
/// fails (`None`) rather than run past the end. The one cursor every
/// parser of client bytes uses.
pub struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader(bytes)
    }
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    pub fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }
    pub fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }
    pub fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }
    /// What is left.
    pub fn rest(&self) -> &'a [u8] {
        self.0
    }
}

/// Writes big-endian fields, front to back: the one way replies are
/// encoded, into a growing `Vec` or a fixed header ([`Fixed`]).
pub trait Put {
    fn put(&mut self, bytes: &[u8]) -> &mut Self;
    fn u16(&mut self, v: u16) -> &mut Self {
        self.put(&v.to_be_bytes())
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.put(&v.to_be_bytes())
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.put(&v.to_be_bytes())
    }
}

impl Put for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) -> &mut Self {
        self.extend_from_slice(bytes);
        self
    }
}

/// Up to `N` bytes on the stack, for headers sent on every request.
/// Writing more than `N` is a bug of ours (the sizes are constants) and
/// panics.
#[derive(Clone, Copy)]
pub struct Fixed<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Default for Fixed<N> {
    fn default() -> Self {
        Fixed {
            buf: [0; N],
            len: 0,
        }
    }
}

impl<const N: usize> Fixed<N> {
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<const N: usize> Put for Fixed<N> {
    fn put(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
        self
    }
}

/// The option header a client sends: IHAVEOPT, option, length.
pub struct OptionHeader {
    pub magic: u64,
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub const LEN: usize = 16;
    pub fn decode(b: &[u8; Self::LEN]) -> Self {
        let mut r = Reader::new(b);
        // Sixteen bytes hold the three fields: the reads cannot fail.
        OptionHeader {
            magic: r.u64().unwrap_or_default(),
            option: r.u32().unwrap_or_default(),
            length: r.u32().unwrap_or_default(),
        }
    }
}

/// The header of an option reply (payload follows).
pub fn option_reply_header(option: u32, reply: u32, len: u32) -> Fixed<20> {
    let mut h = Fixed::default();
    h.u64(OPTION_REPLY_MAGIC).u32(option).u32(reply).u32(len);
    h
}

/// A transmission request, in either header style, with a 64-bit length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

/// Why a request header could not be decoded: these end the session.
#[derive(Debug, PartialEq, Eq)]
pub struct BadMagic(pub u32);

impl Request {
    pub fn decode_compact(b: &[u8; COMPACT_REQUEST_LEN]) -> Result<Self, BadMagic> {
        Self::decode(b, REQUEST_MAGIC, false)
    }

    pub fn decode_extended(b: &[u8; EXTENDED_REQUEST_LEN]) -> Result<Self, BadMagic> {
        Self::decode(b, EXTENDED_REQUEST_MAGIC, true)
    }

    fn decode(b: &[u8], expect: u32, extended: bool) -> Result<Self, BadMagic> {
        let mut r = Reader::new(b);
        let magic = r.u32().ok_or(BadMagic(0))?;
        if magic != expect {
            return Err(BadMagic(magic));
        }
        let length = |r: &mut Reader| match extended {
            true => r.u64(),
            false => r.u32().map(u64::from),
        };
        let (Some(flags), Some(command), Some(cookie), Some(offset), Some(length)) =
            (r.u16(), r.u16(), r.u64(), r.u64(), length(&mut r))
        else {
            // The caller's array is exactly a header long.
            return Err(BadMagic(magic));
        };
        Ok(Request {
            flags,
            command,
            cookie,
            offset,
            length,
        })
    }
}

pub fn simple_reply(error: u32, cookie: u64) -> Fixed<SIMPLE_REPLY_LEN> {
    let mut h = Fixed::default();
    h.u32(SIMPLE_REPLY_MAGIC).u32(error).u64(cookie);
    h
}

/// The header of a structured or extended reply chunk, with room behind
/// it for the small payloads that travel with it: a data chunk's 8-byte
/// offset, or a hole chunk's offset and length.
pub type ChunkHeader = Fixed<{ EXTENDED_REPLY_LEN + 12 }>;

pub fn structured_reply(flags: u16, kind: u16, cookie: u64, len: u32) -> ChunkHeader {
    let mut h = ChunkHeader::default();
    h.u32(STRUCTURED_REPLY_MAGIC)
        .u16(flags)
        .u16(kind)
        .u64(cookie)
        .u32(len);
    h
}

pub fn extended_reply(flags: u16, kind: u16, cookie: u64, offset: u64, len: u64) -> ChunkHeader {
    let mut h = ChunkHeader::default();
    h.u32(EXTENDED_REPLY_MAGIC)
        .u16(flags)
        .u16(kind)
        .u64(cookie)
        .u64(offset)
        .u64(len);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_request_round_trip() {
        let mut b = Fixed::<COMPACT_REQUEST_LEN>::default();
        b.u32(REQUEST_MAGIC)
            .u16(CMD_FLAG_FUA)
            .u16(CMD_WRITE)
            .u64(0x1122_3344_5566_7788)
            .u64(4096)
            .u32(512);
        let b: [u8; COMPACT_REQUEST_LEN] = b.bytes().try_into().unwrap();
        let r = Request::decode_compact(&b).expect("valid header");
        assert_eq!(
            r,
            Request {
                flags: CMD_FLAG_FUA,
                command: CMD_WRITE,
                cookie: 0x1122_3344_5566_7788,
                offset: 4096,
                length: 512
            }
        );
    }

    #[test]
    fn bad_request_magic_is_reported() {
        let b = [0u8; COMPACT_REQUEST_LEN];
        assert_eq!(Request::decode_compact(&b), Err(BadMagic(0)));
    }
}

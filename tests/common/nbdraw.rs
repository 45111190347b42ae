//! Just enough of an NBD client, written by hand, for what the real clients
//! cannot do: negotiate and then vanish without NBD_CMD_DISC, or read the
//! server's error reply over a socket the test owns (`--stdio`).

use std::io::{self, Read, Write};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const OPT_GO: u32 = 7;
pub const OPT_LIST: u32 = 3;
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const INFO_EXPORT: u16 = 0;

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads the fixed-newstyle greeting and answers with the client flags.
/// Returns the server's handshake flags.
pub fn handshake<S: Read + Write>(s: &mut S) -> io::Result<u16> {
    let magic = read_u64(s)?;
    if magic != NBDMAGIC {
        return Err(bad(format!("greeting magic {magic:#x}, expected NBDMAGIC")));
    }
    let opt = read_u64(s)?;
    if opt != IHAVEOPT {
        return Err(bad(format!("greeting magic {opt:#x}, expected IHAVEOPT")));
    }
    let flags = read_u16(s)?;
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(bad(format!("server flags {flags:#x} lack FIXED_NEWSTYLE")));
    }
    let client = u32::from(flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    s.write_all(&client.to_be_bytes())?;
    Ok(flags)
}

/// Sends one option and reads nothing.
pub fn send_option<S: Write>(s: &mut S, option: u32, data: &[u8]) -> io::Result<()> {
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    s.write_all(&msg)
}

/// What the server said to NBD_OPT_GO.
#[derive(Debug)]
pub enum GoReply {
    Ok { size: u64, flags: u16 },
    Err { reply_type: u32, message: String },
}

/// Sends NBD_OPT_GO for the default export ("") and reads the replies up to
/// the ACK or the error.
pub fn opt_go<S: Read + Write>(s: &mut S) -> io::Result<GoReply> {
    opt_go_name(s, b"")
}

/// Sends NBD_OPT_GO for the export `name` (any bytes: the test may send
/// what no real client would) and reads the replies up to the ACK or the
/// error.
pub fn opt_go_name<S: Read + Write>(s: &mut S, name: &[u8]) -> io::Result<GoReply> {
    // name length, name, 0 information requests
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name);
    data.extend_from_slice(&[0, 0]);
    send_option(s, OPT_GO, &data)?;
    let mut export = None;
    loop {
        let magic = read_u64(s)?;
        if magic != OPT_REPLY_MAGIC {
            return Err(bad(format!("option reply magic {magic:#x}")));
        }
        let option = read_u32(s)?;
        if option != OPT_GO {
            return Err(bad(format!("reply to option {option}, expected GO")));
        }
        let reply_type = read_u32(s)?;
        let len = read_u32(s)?;
        if len > 1 << 20 {
            return Err(bad(format!("option reply length {len}")));
        }
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload)?;
        if reply_type & REP_FLAG_ERROR != 0 {
            return Ok(GoReply::Err {
                reply_type,
                message: String::from_utf8_lossy(&payload).into_owned(),
            });
        }
        match reply_type {
            REP_ACK => {
                let (size, flags) =
                    export.ok_or_else(|| bad("ACK to GO without NBD_INFO_EXPORT".into()))?;
                return Ok(GoReply::Ok { size, flags });
            }
            REP_INFO if payload.len() >= 2 => {
                let info = u16::from_be_bytes([payload[0], payload[1]]);
                if info == INFO_EXPORT {
                    if payload.len() != 12 {
                        return Err(bad(format!("NBD_INFO_EXPORT of {} bytes", payload.len())));
                    }
                    let size = u64::from_be_bytes(payload[2..10].try_into().unwrap());
                    let flags = u16::from_be_bytes([payload[10], payload[11]]);
                    export = Some((size, flags));
                }
            }
            other => return Err(bad(format!("unexpected reply type {other} to GO"))),
        }
    }
}

// ---------------------------------------------------------------------------
// Beyond GO: other options, and the transmission phase (requests and
// replies in all three framings), for tests that need exact control over
// what goes on the wire: pipelining, half-closes, clients that stop reading.

pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;
pub const REP_META_CONTEXT: u32 = 4;

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
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_FLAG_DF: u16 = 1 << 2;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;

/// NBD error numbers on the wire.
pub const NBD_ENOSPC: u32 = 28;

/// How replies are framed after GO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Simple,
    /// NBD_OPT_STRUCTURED_REPLY (+ base:allocation when asked).
    Structured,
    /// NBD_OPT_EXTENDED_HEADERS (+ base:allocation when asked).
    Extended,
}

/// Sends one option and reads its replies up to the ACK or an error:
/// (reply type, payload) each.
pub fn option<S: Read + Write>(
    s: &mut S,
    option: u32,
    data: &[u8],
) -> io::Result<Vec<(u32, Vec<u8>)>> {
    send_option(s, option, data)?;
    let mut out = Vec::new();
    loop {
        let magic = read_u64(s)?;
        if magic != OPT_REPLY_MAGIC {
            return Err(bad(format!("option reply magic {magic:#x}")));
        }
        let got = read_u32(s)?;
        if got != option {
            return Err(bad(format!("reply to option {got}, expected {option}")));
        }
        let kind = read_u32(s)?;
        let len = read_u32(s)?;
        if len > 1 << 20 {
            return Err(bad(format!("option reply length {len}")));
        }
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload)?;
        let last = kind == REP_ACK || kind & REP_FLAG_ERROR != 0;
        out.push((kind, payload));
        if last {
            return Ok(out);
        }
    }
}

/// Handshake, the options for `framing` (and base:allocation if `meta`),
/// then GO; returns the export size.
pub fn negotiate<S: Read + Write>(s: &mut S, framing: Framing, meta: bool) -> io::Result<u64> {
    handshake(s)?;
    let ack = |r: Vec<(u32, Vec<u8>)>, what: &str| -> io::Result<()> {
        match r.last() {
            Some((REP_ACK, _)) => Ok(()),
            other => Err(bad(format!("{what} refused: {other:?}"))),
        }
    };
    match framing {
        Framing::Simple => {}
        Framing::Structured => ack(option(s, OPT_STRUCTURED_REPLY, &[])?, "structured replies")?,
        Framing::Extended => ack(option(s, OPT_EXTENDED_HEADERS, &[])?, "extended headers")?,
    }
    if meta {
        let q = b"base:allocation";
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q);
        let r = option(s, OPT_SET_META_CONTEXT, &d)?;
        if !r.iter().any(|(k, _)| *k == REP_META_CONTEXT) {
            return Err(bad("base:allocation was not selected".into()));
        }
        ack(r, "SET_META_CONTEXT")?;
    }
    match opt_go(s)? {
        GoReply::Ok { size, .. } => Ok(size),
        GoReply::Err { message, .. } => Err(bad(format!("GO refused: {message}"))),
    }
}

/// One request header (and payload) in the framing's request format.
pub fn request(
    framing: Framing,
    flags: u16,
    cmd: u16,
    cookie: u64,
    offset: u64,
    length: u64,
    payload: &[u8],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(32 + payload.len());
    let magic = if framing == Framing::Extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    m.extend_from_slice(&magic.to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&cmd.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    if framing == Framing::Extended {
        m.extend_from_slice(&length.to_be_bytes());
    } else {
        let l = u32::try_from(length).expect("compact requests have 32-bit lengths");
        m.extend_from_slice(&l.to_be_bytes());
    }
    m.extend_from_slice(payload);
    m
}

/// One reply as it came off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A simple reply; a successful simple READ reply's data is in `data`.
    Simple {
        error: u32,
        cookie: u64,
        data: Vec<u8>,
    },
    /// One structured or extended chunk (`offset` is the extended header's
    /// offset field, 0 for structured chunks).
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: u64,
        payload: Vec<u8>,
    },
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }

    /// Whether this is the last reply to its request.
    pub fn done(&self) -> bool {
        match self {
            Reply::Simple { .. } => true,
            Reply::Chunk { flags, .. } => flags & REPLY_FLAG_DONE != 0,
        }
    }

    /// The NBD error number a final reply carries (0 for success).
    pub fn error(&self) -> u32 {
        match self {
            Reply::Simple { error, .. } => *error,
            Reply::Chunk { kind, payload, .. } if kind & (1 << 15) != 0 && payload.len() >= 4 => {
                u32::from_be_bytes(payload[0..4].try_into().unwrap())
            }
            Reply::Chunk { .. } => 0,
        }
    }
}

/// Reads one reply. `simple_read_len` is the length of the READ being
/// answered if a simple reply to it may come (the data follows the header
/// of a successful one); `None` otherwise.
pub fn read_reply<S: Read>(
    s: &mut S,
    framing: Framing,
    simple_read_len: Option<usize>,
) -> io::Result<Reply> {
    let magic = read_u32(s)?;
    match magic {
        SIMPLE_REPLY_MAGIC if framing != Framing::Extended => {
            let error = read_u32(s)?;
            let cookie = read_u64(s)?;
            let mut data = Vec::new();
            if let (0, Some(n)) = (error, simple_read_len) {
                data.resize(n, 0);
                s.read_exact(&mut data)?;
            }
            Ok(Reply::Simple {
                error,
                cookie,
                data,
            })
        }
        STRUCTURED_REPLY_MAGIC if framing == Framing::Structured => {
            let flags = read_u16(s)?;
            let kind = read_u16(s)?;
            let cookie = read_u64(s)?;
            let len = read_u32(s)? as usize;
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload)?;
            Ok(Reply::Chunk {
                flags,
                kind,
                cookie,
                offset: 0,
                payload,
            })
        }
        EXTENDED_REPLY_MAGIC if framing == Framing::Extended => {
            let flags = read_u16(s)?;
            let kind = read_u16(s)?;
            let cookie = read_u64(s)?;
            let offset = read_u64(s)?;
            let len = read_u64(s)?;
            if len > 64 << 20 {
                return Err(bad(format!("extended reply of {len} bytes")));
            }
            let mut payload = vec![0u8; len as usize];
            s.read_exact(&mut payload)?;
            Ok(Reply::Chunk {
                flags,
                kind,
                cookie,
                offset,
                payload,
            })
        }
        m => Err(bad(format!("reply magic {m:#x} with {framing:?} framing"))),
    }
}

/// Reads every reply to one request, up to the final one.
pub fn read_replies<S: Read>(
    s: &mut S,
    framing: Framing,
    simple_read_len: Option<usize>,
) -> io::Result<Vec<Reply>> {
    let mut out = Vec::new();
    loop {
        let r = read_reply(s, framing, simple_read_len)?;
        let done = r.done();
        out.push(r);
        if done {
            return Ok(out);
        }
    }
}

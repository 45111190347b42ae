//! The fixed-newstyle handshake and option haggling.
//!
//! It ends in one of three ways: the client picked the export (GO or
//! EXPORT_NAME) and [`Negotiated`] says what was agreed; the client
//! aborted; or the session is over ([`Hangup`]). A wrong but well-framed
//! option gets an error reply and haggling goes on; broken framing, an
//! oversized option or an exhausted option budget hang up.
//!
//! The disk behind the export is built only when a client first asks for
//! it (INFO, GO or EXPORT_NAME), through [`Exports::open`], and reused
//! after that; LIST and ABORT cost nothing.

use tracing::debug;

use super::error::Hangup;
use super::stream::{Channel, Stream};
use super::wire::*;

/// Longest option payload we accept: room for an export name and a
/// generous list of info requests or metadata queries. Anything longer is
/// not a real client; we hang up rather than buffer it.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Options a client may send before it must pick an export.
pub const MAX_OPTIONS: usize = 256;

/// Why an export cannot be opened, told to the client as an option error.
#[derive(Debug, Clone)]
pub struct OpenError {
    /// An `NBD_REP_ERR_*` value.
    pub reply: u32,
    pub message: String,
    /// The client asked for something it may not have (an unknown export,
    /// a size over the limit), as opposed to the server failing to build
    /// what it may.
    pub refused: bool,
}

/// Why negotiation asks for an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// NBD_OPT_INFO: its size and description; the disk need not exist
    /// yet (`nbdinfo --list` asks this of every export).
    Info,
    /// NBD_OPT_GO or NBD_OPT_EXPORT_NAME: the disk, to be served.
    Serve,
}

/// What negotiation needs from whatever serves the export.
pub trait Exports {
    /// The size of the disk the export name `name` asks for; for
    /// `Purpose::Serve`, build it first. A later call for the same name
    /// returns the same disk (INFO then GO must not build twice), another
    /// name replaces it. `pipelined`: the client has already sent more than
    /// this option, so an end of its input during the build is not a
    /// goodbye (it may have half-closed and still want the replies).
    fn open(&mut self, name: &str, purpose: Purpose, pipelined: bool) -> Result<u64, OpenError>;
    /// What the disk `open` last returned is, for NBD_INFO_DESCRIPTION.
    fn description(&self) -> String;
    /// Every export as (name, description), for NBD_OPT_LIST.
    fn list(&self) -> Vec<(String, String)>;
}

/// How replies are framed in the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replies {
    Simple,
    Structured,
    /// NBD_OPT_EXTENDED_HEADERS: 32-byte requests and replies, 64-bit
    /// lengths, structured replies throughout.
    Extended,
}

impl Replies {
    pub fn structured(self) -> bool {
        self != Replies::Simple
    }
}

/// What the client and server agreed on.
#[derive(Debug, Clone)]
pub struct Negotiated {
    pub replies: Replies,
    /// `base:allocation` was selected for block status.
    pub base_allocation: bool,
    pub export_name: String,
    pub size: u64,
    pub flags: u16,
}

pub enum NegotiationEnd {
    Go(Negotiated),
    /// The client sent NBD_OPT_ABORT.
    Abort,
    /// The client asked for TLS and got the ACK: the caller runs the TLS
    /// handshake and negotiates again from the option phase, with nothing
    /// of this round kept.
    StartTls,
}

/// TLS as negotiation sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// No TLS configured: STARTTLS gets ERR_POLICY.
    Unavailable,
    /// TLS available but optional and not (yet) active.
    Offered,
    /// TLS required and not yet active: everything but STARTTLS and ABORT
    /// is refused.
    Required,
    /// The session is already encrypted.
    Active,
}

/// The transmission flags we offer. Never CAN_MULTI_CONN: every connection
/// is a different disk. FLUSH and FUA are offered because clients expect
/// them, and are no-ops because the disk is temporary. DF only exists with
/// structured replies.
pub fn transmission_flags(replies: Replies) -> u16 {
    let mut f = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_SEND_CACHE
        | TFLAG_SEND_FAST_ZERO;
    if replies.structured() {
        f |= TFLAG_SEND_DF;
    }
    f
}

/// Per-round state: everything here is forgotten at STARTTLS.
#[derive(Default)]
struct State {
    structured: bool,
    extended: bool,
    /// The export name of the last successful SET_META_CONTEXT, and whether
    /// it selected base:allocation.
    meta: Option<(Vec<u8>, bool)>,
}

impl State {
    fn replies(&self) -> Replies {
        match (self.extended, self.structured) {
            (true, _) => Replies::Extended,
            (false, true) => Replies::Structured,
            _ => Replies::Simple,
        }
    }
}

/// Send the greeting and read the client's flags. Done once per connection
/// (not again after STARTTLS).
pub fn handshake<C: Channel>(s: &mut Stream<C>) -> Result<bool, Hangup> {
    let mut greeting = Fixed::<18>::default();
    greeting
        .u64(NBDMAGIC)
        .u64(IHAVEOPT)
        .u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.queue(&[greeting.bytes()])?;
    let mut cflags = [0u8; 4];
    if !s.read_message(&mut cflags)? {
        return Err(Hangup::Closed);
    }
    // A PROXY protocol header where none is taken (this peer is not in
    // --proxy-from, or --proxy-protocol is off): say so, not "bad flags".
    if crate::proxy::looks_like_header(&cflags) {
        return Err(Hangup::Protocol(
            "a PROXY protocol header from a peer that may not send one \
             (not in --proxy-from, or --proxy-protocol is off)"
                .into(),
        ));
    }
    let cflags = u32::from_be_bytes(cflags);
    if cflags & !KNOWN_CLIENT_FLAGS != 0 {
        return Err(Hangup::Protocol(format!(
            "client sent unknown handshake flags {cflags:#x}"
        )));
    }
    if cflags & FLAG_C_FIXED_NEWSTYLE == 0 {
        // Old-style newstyle clients cannot read option replies at all;
        // every client of the last decade sets this bit.
        return Err(Hangup::Protocol(
            "client does not support fixed newstyle negotiation".into(),
        ));
    }
    Ok(cflags & FLAG_C_NO_ZEROES != 0)
}

/// Haggle over options until the client picks the export, aborts, or asks
/// for TLS.
pub fn negotiate<C: Channel, E: Exports>(
    s: &mut Stream<C>,
    exports: &mut E,
    no_zeroes: bool,
    tls: Tls,
) -> Result<NegotiationEnd, Hangup> {
    let r = haggle(s, exports, no_zeroes, tls);
    if let Err(Hangup::Protocol(_)) = &r {
        // The replies to every option before the one that broke the rules
        // are owed (the 256th option's, pipelined LISTs before a bad
        // magic): the client may still be reading.
        let _ = s.flush();
    }
    r
}

fn haggle<C: Channel, E: Exports>(
    s: &mut Stream<C>,
    exports: &mut E,
    no_zeroes: bool,
    tls: Tls,
) -> Result<NegotiationEnd, Hangup> {
    let mut st = State::default();
    let mut data = Vec::new();
    for _ in 0..MAX_OPTIONS {
        let mut hdr = [0u8; OptionHeader::LEN];
        if !s.read_message(&mut hdr)? {
            return Err(Hangup::Closed);
        }
        let h = OptionHeader::decode(&hdr);
        if h.magic != IHAVEOPT {
            return Err(Hangup::Protocol(format!("bad option magic {:#x}", h.magic)));
        }
        if h.length > MAX_OPTION_LEN {
            return Err(Hangup::Protocol(format!(
                "{} with {} bytes of data (limit {MAX_OPTION_LEN})",
                option_name(h.option),
                h.length
            )));
        }
        data.resize(h.length as usize, 0);
        s.read_exact(&mut data)?;
        debug!(option = option_name(h.option), length = h.length, "option");

        let mut o = OptionReplier {
            s,
            option: h.option,
        };
        // With TLS required, only STARTTLS and ABORT may come first.
        if tls == Tls::Required && !matches!(h.option, OPT_STARTTLS | OPT_ABORT) {
            if h.option == OPT_EXPORT_NAME {
                return Err(Hangup::Protocol(
                    "NBD_OPT_EXPORT_NAME before TLS, which this server requires".into(),
                ));
            }
            o.error(
                REP_ERR_TLS_REQD,
                "this server requires TLS: send NBD_OPT_STARTTLS first",
            )?;
            continue;
        }
        match h.option {
            OPT_EXPORT_NAME => {
                if st.extended {
                    return Err(Hangup::Protocol(
                        "NBD_OPT_EXPORT_NAME after extended headers".into(),
                    ));
                }
                // EXPORT_NAME has no way to report an error: hang up.
                let name = export_name(&data).map_err(|why| Hangup::Protocol(why.into()))?;
                let pipelined = o.s.has_pending_input();
                let size =
                    exports
                        .open(name, Purpose::Serve, pipelined)
                        .map_err(|e| match e.refused {
                            true => Hangup::Protocol(format!(
                                "NBD_OPT_EXPORT_NAME refused: {}",
                                e.message
                            )),
                            false => Hangup::Server(e.message),
                        })?;
                let n = agreed(&st, name, size);
                let mut reply = Vec::with_capacity(134);
                reply.u64(size).u16(n.flags);
                if !no_zeroes {
                    reply.resize(134, 0);
                }
                o.s.queue(&[&reply])?;
                return Ok(NegotiationEnd::Go(n));
            }
            OPT_ABORT => {
                // The client may already be gone; that is fine.
                let _ = o.ack().and_then(|_| o.s.flush());
                return Ok(NegotiationEnd::Abort);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    o.error(REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                    continue;
                }
                for (name, desc) in exports.list() {
                    let mut p = Vec::with_capacity(4 + name.len() + desc.len());
                    // Descriptions are strings too: at most 4096 bytes.
                    let desc = &desc.as_bytes()[..desc.len().min(MAX_STRING)];
                    p.u32(name.len() as u32).put(name.as_bytes()).put(desc);
                    o.reply(REP_SERVER, &p)?;
                }
                o.ack()?;
            }
            OPT_STARTTLS => {
                if !data.is_empty() {
                    o.error(REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")?;
                    continue;
                }
                match tls {
                    Tls::Unavailable => {
                        o.error(REP_ERR_POLICY, "TLS is not enabled on this server")?
                    }
                    Tls::Active => o.error(REP_ERR_INVALID, "TLS is already active")?,
                    Tls::Offered | Tls::Required => {
                        // The ACK must be on the wire before the handshake.
                        o.ack()?;
                        o.s.flush()?;
                        return Ok(NegotiationEnd::StartTls);
                    }
                }
            }
            OPT_INFO | OPT_GO => {
                let Some((name, requests)) = parse_info(&data) else {
                    o.error(REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data")?;
                    continue;
                };
                let name = match export_name(name) {
                    Ok(name) => name,
                    Err(why) => {
                        o.error(REP_ERR_INVALID, why)?;
                        continue;
                    }
                };
                let pipelined = o.s.has_pending_input();
                let purpose = match h.option {
                    OPT_GO => Purpose::Serve,
                    _ => Purpose::Info,
                };
                let size = match exports.open(name, purpose, pipelined) {
                    Ok(size) => size,
                    Err(e) => {
                        o.error(e.reply, &e.message)?;
                        continue;
                    }
                };
                let n = agreed(&st, name, size);
                send_info(&mut o, &n, &requests, &exports.description())?;
                o.ack()?;
                if h.option == OPT_GO {
                    return Ok(NegotiationEnd::Go(n));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    o.error(REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")?;
                } else if st.extended {
                    o.error(
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers are already negotiated",
                    )?;
                } else {
                    // A repeat is harmless: ACK it again.
                    st.structured = true;
                    o.ack()?;
                }
            }
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    o.error(REP_ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data")?;
                } else if st.extended {
                    o.error(REP_ERR_INVALID, "extended headers are already negotiated")?;
                } else {
                    st.extended = true;
                    o.ack()?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = h.option == OPT_SET_META_CONTEXT;
                if set {
                    // Replaced even if this SET fails.
                    st.meta = None;
                }
                let Some((name, queries)) = parse_meta(&data) else {
                    o.error(REP_ERR_INVALID, "malformed metadata context request")?;
                    continue;
                };
                if !st.structured && !st.extended {
                    o.error(
                        REP_ERR_INVALID,
                        "metadata contexts need structured replies: send NBD_OPT_STRUCTURED_REPLY first",
                    )?;
                    continue;
                }
                let selected = if set {
                    queries
                        .iter()
                        .any(|q| *q == META_BASE_ALLOCATION.as_bytes())
                } else {
                    // LIST: no queries means "everything"; "base:" is a
                    // wildcard for the namespace.
                    queries.is_empty()
                        || queries
                            .iter()
                            .any(|q| *q == META_BASE_ALLOCATION.as_bytes() || *q == b"base:")
                };
                if selected {
                    let id = if set { META_ID_BASE_ALLOCATION } else { 0 };
                    let mut p = Vec::with_capacity(4 + META_BASE_ALLOCATION.len());
                    p.u32(id).put(META_BASE_ALLOCATION.as_bytes());
                    o.reply(REP_META_CONTEXT, &p)?;
                }
                if set {
                    st.meta = Some((name.to_vec(), selected));
                }
                o.ack()?;
            }
            other => {
                o.error(
                    REP_ERR_UNSUP,
                    &format!("option {other} ({}) is not supported", option_name(other)),
                )?;
            }
        }
    }
    Err(Hangup::Protocol(format!(
        "more than {MAX_OPTIONS} options without choosing an export"
    )))
}

/// An export name as the protocol defines strings: UTF-8, no NUL, at most
/// 4096 bytes. Anything else is refused, never echoed or logged as
/// something it is not.
fn export_name(raw: &[u8]) -> Result<&str, &'static str> {
    if raw.len() > MAX_STRING {
        return Err("export name longer than 4096 bytes");
    }
    let name = std::str::from_utf8(raw).map_err(|_| "export names must be UTF-8")?;
    if name.contains('\0') {
        return Err("export names must not contain NUL");
    }
    Ok(name)
}

/// What the client gets once it has chosen the export named `name`.
fn agreed(st: &State, name: &str, size: u64) -> Negotiated {
    let replies = st.replies();
    // Block status needs the selection to have been made for the export
    // that was finally chosen.
    let base_allocation = matches!(&st.meta, Some((n, true)) if n == name.as_bytes());
    Negotiated {
        replies,
        base_allocation,
        export_name: name.to_string(),
        size,
        flags: transmission_flags(replies),
    }
}

/// Parse NBD_OPT_INFO/GO data: name length, name, request count, requests.
/// Every length must fit exactly.
fn parse_info(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let mut r = Reader::new(data);
    let name_len = r.u32()? as usize;
    if name_len > MAX_STRING {
        return None;
    }
    let name = r.take(name_len)?;
    let count = r.u16()? as usize;
    let mut requests = Vec::with_capacity(count.min(r.rest().len() / 2));
    for _ in 0..count {
        requests.push(r.u16()?);
    }
    r.rest().is_empty().then_some((name, requests))
}

/// Parse LIST/SET_META_CONTEXT data: name length, name, query count, then
/// each query as length + string. Every length must fit exactly.
fn parse_meta(data: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let mut r = Reader::new(data);
    let name_len = r.u32()? as usize;
    if name_len > MAX_STRING {
        return None;
    }
    let name = r.take(name_len)?;
    let count = r.u32()?;
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = r.u32()? as usize;
        if len > MAX_STRING {
            return None;
        }
        queries.push(r.take(len)?);
    }
    r.rest().is_empty().then_some((name, queries))
}

fn send_info<C: Channel>(
    o: &mut OptionReplier<'_, C>,
    n: &Negotiated,
    requests: &[u16],
    description: &str,
) -> Result<(), Hangup> {
    let mut p = Vec::with_capacity(12);
    p.u16(INFO_EXPORT).u64(n.size).u16(n.flags);
    o.reply(REP_INFO, &p)?;
    if requests.contains(&INFO_NAME) {
        let mut p = Vec::with_capacity(2 + n.export_name.len());
        p.u16(INFO_NAME).put(n.export_name.as_bytes());
        o.reply(REP_INFO, &p)?;
    }
    if requests.contains(&INFO_DESCRIPTION) {
        let mut p = Vec::with_capacity(2 + description.len());
        p.u16(INFO_DESCRIPTION).put(description.as_bytes());
        o.reply(REP_INFO, &p)?;
    }
    // Always sent, asked for or not: clients then know the payload limit.
    let mut p = Vec::with_capacity(14);
    p.u16(INFO_BLOCK_SIZE)
        .u32(1)
        .u32(PREFERRED_BLOCK)
        .u32(MAX_PAYLOAD);
    o.reply(REP_INFO, &p)
}

/// Sends replies to the option being handled.
struct OptionReplier<'a, C> {
    s: &'a mut Stream<C>,
    option: u32,
}

impl<C: Channel> OptionReplier<'_, C> {
    fn reply(&mut self, kind: u32, payload: &[u8]) -> Result<(), Hangup> {
        let h = option_reply_header(self.option, kind, payload.len() as u32);
        self.s.queue(&[h.bytes(), payload])
    }

    fn ack(&mut self) -> Result<(), Hangup> {
        self.reply(REP_ACK, &[])
    }

    fn error(&mut self, kind: u32, message: &str) -> Result<(), Hangup> {
        debug!(
            option = option_name(self.option),
            reply = kind,
            reason = message,
            "option refused"
        );
        // Messages are bounded like every string of the protocol.
        let mut end = message.len().min(MAX_STRING);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        self.reply(kind, &message.as_bytes()[..end])
    }
}

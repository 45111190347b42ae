//! The fuzzing harness: the real negotiation and transmission code over an
//! in-memory client, against a real sparse image made once per process.
//!
//! Shared by the `cargo fuzz` targets (fuzz/fuzz_targets/) and by
//! tests/heavy/fuzz.rs, which replays the committed corpus and every regression
//! input through exactly the same code in the normal test run.
//!
//! The first input byte selects the scenario (see [`option_phase`] and
//! [`request_phase`]); the rest is what the client sends. The oracle: no
//! panic (including integer overflow: fuzz builds keep overflow checks), no
//! unbounded allocation (libFuzzer's -rss_limit_mb and -malloc_limit_mb),
//! and, where the reply framing is self-describing, well-framed replies.

#![allow(dead_code)] // each fuzz target uses one phase

use std::io::{self, Read, Write};
use std::sync::OnceLock;

use tmpdisk::image::Image;
use tmpdisk::nbd::negotiate::{
    Exports, NegotiationEnd, OpenError, Purpose, Tls, handshake, negotiate,
};
use tmpdisk::nbd::stream::{Channel, Stream};
use tmpdisk::nbd::transmit::{Stats, serve};
use tmpdisk::nbd::wire::*;

/// The export size. Small, so that every valid READ/WRITE stays small too;
/// requests past it exercise the range checks.
pub const SIZE: u64 = 1 << 20;

/// Big-endian fields of a reply, for checking it.
fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// One image per process, not per input: creating files is slow and would
/// dominate the fuzzer's time. Each input starts from an all-hole image.
fn image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    let img = IMAGE.get_or_init(|| {
        Image::create(&std::env::temp_dir(), SIZE)
            .expect("an O_TMPFILE image in the temp dir")
            .0
    });
    img.punch_hole(0, SIZE).expect("resetting the image");
    img
}

/// The client as the server sees it: reads come from the input (whole, or
/// dribbled a few bytes at a time), writes go to `out`, optionally failing
/// once `budget` bytes were written (a client that went away).
pub struct Mem<'a> {
    input: &'a [u8],
    dribble: bool,
    pub out: Vec<u8>,
    budget: Option<usize>,
}

impl<'a> Mem<'a> {
    pub fn new(input: &'a [u8], dribble: bool, budget: Option<usize>) -> Self {
        Mem {
            input,
            dribble,
            out: Vec::new(),
            budget,
        }
    }
}

impl Read for Mem<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut n = buf.len().min(self.input.len());
        if self.dribble {
            // 1 to 7 bytes, varying with the position: headers arrive in pieces.
            n = n.min(1 + self.input.len() % 7);
        }
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Mem<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(b) = self.budget {
            let room = b.saturating_sub(self.out.len());
            if room == 0 {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            let n = buf.len().min(room);
            self.out.extend_from_slice(&buf[..n]);
            return Ok(n);
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Exports backed by the shared image, or failing like a broken mkfs.
pub struct FuzzExports {
    fail: bool,
    opened: usize,
}

/// Opaque to the server: no fds, so every byte goes through the stream's
/// buffers (the zero-copy paths need a real socket; tests/properties.rs
/// drives those).
impl Channel for Mem<'_> {}

impl Exports for FuzzExports {
    fn open(&mut self, _name: &str, _purpose: Purpose, _pipelined: bool) -> Result<u64, OpenError> {
        self.opened += 1;
        if self.fail {
            return Err(OpenError {
                reply: REP_ERR_UNKNOWN,
                message: "mkfs.fuzz failed with exit status 1: \u{e9}\u{e9}\u{e9}".repeat(2000),
                refused: false,
            });
        }
        Ok(SIZE)
    }
    fn description(&self) -> String {
        "fuzz disk".into()
    }
    fn list(&self) -> Vec<(String, String)> {
        vec![(String::new(), self.description())]
    }
}

/// Selector bits shared by both targets.
const DRIBBLE: u8 = 1 << 2;
const BROKEN_PIPE: u8 = 1 << 3;
const OPEN_FAILS: u8 = 1 << 4;

fn budget(sel: u8) -> Option<usize> {
    (sel & BROKEN_PIPE != 0).then_some(4096 + 97 * usize::from(sel >> 5))
}

/// The option phase: everything after the server's greeting is the input
/// (the client flags, then options). Selector: bits 0-1 the TLS policy
/// (unavailable, offered, required, active), bit 2 dribbled reads, bit 3 a
/// client that stops accepting replies, bit 4 a disk that cannot be built.
/// A GO is followed into transmission with the rest of the input.
pub fn option_phase(data: &[u8]) {
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    let tls = match sel & 3 {
        0 => Tls::Unavailable,
        1 => Tls::Offered,
        2 => Tls::Required,
        _ => Tls::Active,
    };
    let mut ex = FuzzExports {
        fail: sel & OPEN_FAILS != 0,
        opened: 0,
    };
    let img = image();
    let mut s = Stream::new(Mem::new(input, sel & DRIBBLE != 0, budget(sel)));
    match handshake(&mut s).and_then(|nz| negotiate(&mut s, &mut ex, nz, tls)) {
        Ok(NegotiationEnd::Go(n)) => {
            assert!(
                !ex.fail,
                "GO succeeded although the disk could not be built"
            );
            assert!(ex.opened >= 1, "GO without building the disk");
            assert_eq!(n.size, SIZE);
            assert_eq!(n.flags & TFLAG_CAN_MULTI_CONN, 0, "never multi-conn");
            let mut stats = Stats::default();
            let _ = serve(&mut s, img, &n, &mut stats);
        }
        Ok(NegotiationEnd::StartTls) => assert!(
            matches!(tls, Tls::Offered | Tls::Required),
            "STARTTLS accepted with TLS {tls:?}"
        ),
        Ok(NegotiationEnd::Abort) | Err(_) => {}
    }
    if tls == Tls::Required {
        assert_eq!(ex.opened, 0, "the disk was built before TLS");
    }
}

/// How the fixed negotiation before the request phase goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Simple,
    Structured,
    /// Structured replies and base:allocation.
    StructuredMeta,
    /// Extended headers and base:allocation.
    Extended,
}

fn option(out: &mut Vec<u8>, opt: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// What a client sends to get from the greeting to transmission in `mode`.
pub fn negotiation(mode: Mode) -> Vec<u8> {
    let mut v = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    match mode {
        Mode::Simple => {}
        Mode::Structured | Mode::StructuredMeta => option(&mut v, OPT_STRUCTURED_REPLY, &[]),
        Mode::Extended => option(&mut v, OPT_EXTENDED_HEADERS, &[]),
    }
    if matches!(mode, Mode::StructuredMeta | Mode::Extended) {
        let q = META_BASE_ALLOCATION.as_bytes();
        let mut d = 0u32.to_be_bytes().to_vec(); // export name ""
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q);
        option(&mut v, OPT_SET_META_CONTEXT, &d);
    }
    option(&mut v, OPT_GO, &[0, 0, 0, 0, 0, 0]);
    v
}

/// The request phase: a fixed, valid negotiation, then the input as the
/// client's requests. Selector: bits 0-1 the mode ([`Mode`] in order), bit
/// 2 dribbled reads, bit 3 a client that stops accepting replies.
pub fn request_phase(data: &[u8]) {
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    let mode = [
        Mode::Simple,
        Mode::Structured,
        Mode::StructuredMeta,
        Mode::Extended,
    ][usize::from(sel & 3)];
    let mut all = negotiation(mode);
    all.extend_from_slice(input);
    let img = image();
    let mut ex = FuzzExports {
        fail: false,
        opened: 0,
    };
    let broken = budget(sel);
    let mut s = Stream::new(Mem::new(&all, sel & DRIBBLE != 0, broken));
    let n = match handshake(&mut s).and_then(|nz| negotiate(&mut s, &mut ex, nz, Tls::Unavailable))
    {
        Ok(NegotiationEnd::Go(n)) => n,
        Err(_) if broken.is_some() => return,
        _ => panic!("the fixed {mode:?} negotiation must end in GO"),
    };
    let start = match s.channel() {
        Ok(c) => c.out.len(),
        Err(_) => return,
    };
    let mut stats = Stats::default();
    let _ = serve(&mut s, img, &n, &mut stats);
    let Ok(ch) = s.channel() else { return };
    if broken.is_none() && mode != Mode::Simple {
        check_framing(&ch.out[start..], mode == Mode::Extended);
    }
}

/// Replies with structured or extended headers describe their own length:
/// the output must split exactly into well-formed replies.
pub fn check_framing(mut out: &[u8], extended: bool) {
    while !out.is_empty() {
        assert!(out.len() >= 4, "a reply header cut short: {out:?}");
        let magic = be32(&out[0..4]);
        let (header, payload) = match magic {
            SIMPLE_REPLY_MAGIC if !extended => (16, 0),
            STRUCTURED_REPLY_MAGIC if !extended => {
                assert!(out.len() >= 20, "structured reply header cut short");
                (20, be32(&out[16..20]) as usize)
            }
            EXTENDED_REPLY_MAGIC if extended => {
                assert!(out.len() >= 32, "extended reply header cut short");
                let len = be64(&out[24..32]);
                assert!(len <= u64::from(MAX_PAYLOAD) + 64, "reply of {len} bytes");
                (32, len as usize)
            }
            m => panic!("bad reply magic {m:#x} (extended: {extended})"),
        };
        if header > 16 {
            let kind = be16(&out[6..8]);
            assert!(
                matches!(
                    kind,
                    REPLY_TYPE_NONE
                        | REPLY_TYPE_OFFSET_DATA
                        | REPLY_TYPE_OFFSET_HOLE
                        | REPLY_TYPE_BLOCK_STATUS
                        | REPLY_TYPE_BLOCK_STATUS_EXT
                        | REPLY_TYPE_ERROR
                        | REPLY_TYPE_ERROR_OFFSET
                ),
                "unknown reply type {kind}"
            );
        }
        assert!(
            out.len() >= header + payload,
            "reply payload cut short: {} of {payload} bytes",
            out.len() - header
        );
        out = &out[header + payload..];
    }
}

/// The catalog the export-name target resolves against: the default
/// export, one where clients choose (size up to 64 GiB, xfs or ext4, a
/// label), and one where they choose nothing.
fn catalog() -> &'static tmpdisk::exports::Catalog {
    static CATALOG: OnceLock<tmpdisk::exports::Catalog> = OnceLock::new();
    CATALOG.get_or_init(|| {
        let common = tmpdisk::cli::Common {
            tmpdir: std::env::temp_dir(),
            min_free: tmpdisk::cli::MinFree::Bytes(0),
            setup_timeout: None,
        };
        let text = "[export.scratch]\nsize = \"8G\"\ntype = \"xfs\"\nmax-size = \"64G\"\n\
                    types = [\"xfs\", \"ext4\"]\nlabels = true\n\n\
                    [export.fixed]\nsize = \"512M\"\ntype = \"vfat\"\n";
        tmpdisk::exports::Catalog::from_texts(
            &[("exports.toml".into(), text.into())],
            Some(common.disk(SIZE, tmpdisk::cli::FsSpec::of_type("ext4"), None)),
            &common,
        )
        .expect("the harness's catalog")
    })
}

/// An export name, as a client sends it (the negotiation has already
/// refused anything but UTF-8 without NUL, up to 4096 bytes). The oracle:
/// a shape within the catalog's limits, or a refusal whose message is
/// printable and bounded.
pub fn export_name(data: &[u8]) {
    let Ok(name) = std::str::from_utf8(data) else {
        return;
    };
    if name.len() > 4096 || name.contains('\0') {
        return;
    }
    match catalog().resolve(name) {
        Ok(shape) => {
            let d = &shape.disk;
            assert!(d.size <= 64 << 30, "{name:?}: size {}", d.size);
            assert!(
                ["ext4", "xfs", "vfat"].contains(&d.fs.fs_type.as_str()),
                "{name:?}: type {}",
                d.fs.fs_type
            );
            if let Some(l) = &d.fs.label {
                assert!(l.len() <= 16, "{name:?}: label {l:?}");
            }
        }
        Err(r) => {
            assert!(
                r.reply == REP_ERR_UNKNOWN || r.reply == REP_ERR_POLICY,
                "{name:?}: reply {:#x}",
                r.reply
            );
            assert!(
                !r.message.is_empty()
                    && r.message.len() <= 1024
                    && !r.message.chars().any(char::is_control),
                "{name:?}: message {:?}",
                r.message
            );
        }
    }
}

/// The reconnect handover's bytes (what one tmpdisk process sends
/// another): selector 0 a taker's request, 1-3 a holder's offer with that
/// many files, 4 an overlay's block map for a disk whose size is
/// the next 5 bytes (up to 1 TiB). The oracle: a clean error or a value
/// within bounds, never a panic or an allocation beyond the disk's map.
pub fn handover(data: &[u8]) {
    use tmpdisk::handover::{LEAF_BYTES, check_map, decode_offer, decode_request};
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 5 {
        0 => {
            let _ = decode_request(rest);
        }
        4 => {
            if rest.len() < 5 {
                return;
            }
            let mut size = [0u8; 8];
            size[3..].copy_from_slice(&rest[..5]);
            let size = u64::from_be_bytes(size);
            let _ = check_map(size, &rest[5..]);
        }
        n => {
            if let Ok(o) = decode_offer(rest, usize::from(n)) {
                assert!(o.size > 0 && o.size <= i64::MAX as u64);
                // The map is bounded by the disk: a leaf per 128 MiB.
                assert!(o.owned_len() as u64 <= o.size.div_ceil(1 << 27) * LEAF_BYTES as u64);
            }
        }
    }
}

/// A PROXY protocol header (v1 or v2) as a balancer's connection starts,
/// read the way session.rs reads it: from nothing, asking for as many
/// bytes as the parser says, never past the header. The oracle: the
/// header's length and every request for more stay within the input
/// grown so far and the protocol's bounds, or a clean error.
pub fn proxy_header(data: &[u8]) {
    use tmpdisk::proxy::{Parsed, V1_MAX, V2_FIXED, V2_MAX_BODY, parse};
    let mut have = 0;
    loop {
        match parse(&data[..have]) {
            Ok(Parsed::Header { len, .. }) => {
                assert!(len == have && len <= (V2_FIXED + V2_MAX_BODY).max(V1_MAX));
                return;
            }
            Ok(Parsed::Incomplete(need)) => {
                assert!(
                    need > have && need <= V2_FIXED + V2_MAX_BODY,
                    "{need} after {have}"
                );
                if need > data.len() {
                    return;
                }
                have = need;
            }
            Err(_) => return,
        }
    }
}

//! Property tests: size parsing against a reference model; block-status
//! extents from `Image::extents` against a model of the file's holes; and
//! structured read chunking over the real protocol code, on a real socket,
//! against a model of the disk's bytes; export names against a model of an
//! exports file's limits.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::common::nbdraw::{self, Framing, Reply};
use proptest::prelude::*;
use tmpdisk::cli::{Common, FsSpec, MinFree, parse_size};
use tmpdisk::conn::Conn;
use tmpdisk::exports::{Catalog, Refusal};
use tmpdisk::image::Image;
use tmpdisk::nbd::negotiate::{
    Exports, NegotiationEnd, OpenError, Purpose, Tls, handshake, negotiate,
};
use tmpdisk::nbd::storage::{Extent, Storage};
use tmpdisk::nbd::stream::{Channel, Stream};
use tmpdisk::nbd::transmit::{Stats, serve};
use tmpdisk::nbd::wire::{REP_ERR_POLICY, REP_ERR_UNKNOWN};

// --- size parsing -----------------------------------------------------------------

/// What `parse_size` must do, written independently: digits, then an
/// optional binary suffix (any case), surrounding whitespace ignored; the
/// result must be 1 ..= 2^63-1.
fn size_model(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    if digits.is_empty() {
        return None;
    }
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        "p" | "pib" => 50,
        "e" | "eib" => 60,
        _ => return None,
    };
    // Leading zeros are fine; the value is what counts.
    let digits = digits.trim_start_matches('0');
    if digits.len() > 30 {
        return None;
    }
    let n: u128 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    let bytes = n.checked_shl(shift)?;
    (1..=i64::MAX as u128)
        .contains(&bytes)
        .then_some(bytes as u64)
}

const SUFFIXES: &[(&str, u32)] = &[
    ("", 0),
    ("b", 0),
    ("B", 0),
    ("k", 10),
    ("K", 10),
    ("KiB", 10),
    ("kib", 10),
    ("M", 20),
    ("MiB", 20),
    ("mIb", 20),
    ("G", 30),
    ("GiB", 30),
    ("T", 40),
    ("TiB", 40),
    ("P", 50),
    ("PiB", 50),
    ("E", 60),
    ("EiB", 60),
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Every byte count a file offset can hold parses back to itself.
    #[test]
    fn plain_numbers_round_trip(n in 1u64..=i64::MAX as u64, pad in "[ \t]{0,2}") {
        prop_assert_eq!(parse_size(&n.to_string()), Ok(n));
        prop_assert_eq!(parse_size(&format!("{pad}{n}{pad}")), Ok(n));
    }

    /// NUMBER+SUFFIX is NUMBER << shift, accepted exactly while that is
    /// 1 ..= 2^63-1.
    #[test]
    fn suffixes_multiply_by_powers_of_1024(
        n in prop_oneof![0u64..4096, any::<u64>()],
        i in 0..SUFFIXES.len(),
    ) {
        let (suffix, shift) = SUFFIXES[i];
        let text = format!("{n}{suffix}");
        let expected = u128::from(n) << shift;
        match parse_size(&text) {
            Ok(v) => {
                prop_assert_eq!(u128::from(v), expected, "{}", text);
                prop_assert!(v >= 1 && v <= i64::MAX as u64);
            }
            Err(e) => {
                prop_assert!(
                    expected == 0 || expected > i64::MAX as u128,
                    "{} rejected: {}", text, e
                );
                prop_assert!(!e.is_empty());
            }
        }
    }

    /// Anything else, printable or not, is rejected with a message; and on
    /// every string parse_size agrees with the model.
    #[test]
    fn arbitrary_text_matches_the_model(s in prop_oneof![
        "[0-9]{0,22}[a-zA-Z%. +-]{0,4}",
        "[ ]?[0-9]{1,3}(b|k|m|g|t|p|e|kib|mib|gib|tib|pib|eib|KB|MB|iB|bytes|x)?[ ]?",
        ".{0,12}",
    ]) {
        let got = parse_size(&s);
        prop_assert_eq!(got.clone().ok(), size_model(&s), "{:?} gave {:?}", s, got);
        if let Err(e) = got {
            prop_assert!(!e.is_empty() && !e.contains('\n'), "one-line message: {:?}", e);
        }
    }

    /// Unknown suffixes say so.
    #[test]
    fn unknown_suffixes_are_named(n in 1u64..1000, suffix in "[a-zA-Z]{1,4}") {
        prop_assume!(!SUFFIXES.iter().any(|(s, _)| s.eq_ignore_ascii_case(&suffix)));
        let e = parse_size(&format!("{n}{suffix}")).unwrap_err();
        prop_assert!(e.contains("unknown suffix"), "{}", e);
    }
}

// --- block-status extents against a model of the holes -------------------------------

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 64;
const IMG: u64 = BLOCK * BLOCKS;

#[derive(Debug, Clone)]
enum Op {
    /// Write `len` bytes of `byte` at `off`.
    Write { off: u64, len: u64, byte: u8 },
    /// Punch a hole (FALLOC_FL_PUNCH_HOLE) over `[off, off+len)`.
    Punch { off: u64, len: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    // Offsets and lengths at byte granularity, biased towards block edges.
    let pos = prop_oneof![
        (0..BLOCKS).prop_map(|b| b * BLOCK),
        0..IMG,
        (0..BLOCKS, 0..2u64).prop_map(|(b, d)| (b * BLOCK).saturating_sub(d)),
    ];
    let len = prop_oneof![(1..8u64).prop_map(|b| b * BLOCK), 1..3 * BLOCK, 1..IMG,];
    prop_oneof![
        (pos.clone(), len.clone(), 1..=255u8).prop_map(|(off, len, byte)| Op::Write {
            off,
            len,
            byte
        }),
        (pos, len).prop_map(|(off, len)| Op::Punch { off, len }),
    ]
}

/// The file as it must be: its bytes, and which 4 KiB blocks surely hold
/// data (written and not entirely punched since). Blocks the model calls
/// holes may still be allocated (a partial punch zeroes without freeing),
/// so only "model says data" is binding for the data/hole flag; every range
/// reported as a hole must read as zeroes.
struct Model {
    bytes: Vec<u8>,
    data: Vec<bool>,
}

impl Model {
    fn new() -> Self {
        Model {
            bytes: vec![0; IMG as usize],
            data: vec![false; BLOCKS as usize],
        }
    }

    fn apply(&mut self, img: &Image, op: &Op) {
        match *op {
            Op::Write { off, len, byte } => {
                let len = len.min(IMG - off);
                img.write_at(&vec![byte; len as usize], off).unwrap();
                self.bytes[off as usize..(off + len) as usize].fill(byte);
                for b in off / BLOCK..(off + len).div_ceil(BLOCK) {
                    self.data[b as usize] = true;
                }
            }
            Op::Punch { off, len } => {
                let len = len.min(IMG - off);
                img.punch_hole(off, len).unwrap();
                self.bytes[off as usize..(off + len) as usize].fill(0);
                // Only whole blocks inside the range are freed.
                for b in off.div_ceil(BLOCK)..(off + len) / BLOCK {
                    self.data[b as usize] = false;
                }
            }
        }
    }
}

fn check_extents(
    model: &Model,
    img: &Image,
    off: u64,
    len: u64,
    max: usize,
    got: &[Extent],
) -> Result<(), TestCaseError> {
    let what = format!("extents({off}, {len}, max {max}) = {got:?}");
    prop_assert!(got.len() <= max, "more than max extents: {}", what);
    prop_assert!(!got.is_empty(), "no extent at all: {}", what);
    let mut pos = off;
    for (i, x) in got.iter().enumerate() {
        prop_assert_eq!(x.offset, pos, "gap or overlap at extent {}: {}", i, &what);
        prop_assert!(x.length > 0, "empty extent {}: {}", i, &what);
        if i > 0 {
            prop_assert_ne!(
                got[i - 1].data,
                x.data,
                "adjacent extents of one kind are not merged: {}",
                &what
            );
        }
        pos = x.offset + x.length;
        prop_assert!(
            pos <= off + len,
            "extent {} runs past the range: {}",
            i,
            &what
        );
        // Past the end of the file everything is a hole.
        if x.offset >= IMG {
            prop_assert!(!x.data, "data past the end of the file: {}", &what);
        }
        let (a, b) = (x.offset.min(IMG), pos.min(IMG));
        if x.data {
            // And the other way: a whole block never written (or punched
            // whole) is a hole, never reported as data, which would send
            // its zeroes and hide the disk's sparseness.
            for blk in a.div_ceil(BLOCK)..b / BLOCK {
                prop_assert!(
                    model.data[blk as usize],
                    "block {} was never written but is inside data extent {}: {}",
                    blk,
                    i,
                    &what
                );
            }
        }
        if !x.data {
            prop_assert!(
                model.bytes[a as usize..b as usize].iter().all(|&v| v == 0),
                "extent {} is reported as a hole but holds written bytes: {}",
                i,
                &what
            );
            for blk in a / BLOCK..b.div_ceil(BLOCK) {
                prop_assert!(
                    !model.data[blk as usize],
                    "block {} was written (data) but is inside hole extent {}: {}",
                    blk,
                    i,
                    &what
                );
            }
            // The image agrees: a hole reads as zeroes.
            let mut buf = vec![1u8; (b - a) as usize];
            img.read_at(&mut buf, a).unwrap();
            prop_assert!(
                buf.iter().all(|&v| v == 0),
                "hole reads non-zero: {}",
                &what
            );
        }
    }
    if got.len() < max {
        prop_assert_eq!(pos, off + len, "extents do not cover the range: {}", &what);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn extents_match_a_model_of_the_holes(
        ops in prop::collection::vec(op(), 0..24),
        queries in prop::collection::vec(
            (0..IMG + 2 * BLOCK, 1..IMG + 2 * BLOCK, prop_oneof![Just(usize::MAX), 1..6usize]),
            1..12,
        ),
    ) {
        let (img, _) = Image::create(&std::env::temp_dir(), IMG).unwrap();
        let mut model = Model::new();
        for op in &ops {
            model.apply(&img, op);
        }
        // The whole file first, then the random windows.
        let all = [(0, IMG, usize::MAX)];
        for &(off, len, max) in all.iter().chain(queries.iter()) {
            let mut got = Vec::new();
            img.extents(off, len, max, &mut got).unwrap();
            check_extents(&model, &img, off, len, max, &got)?;
        }
    }
}

// --- structured read chunking over the real protocol ---------------------------------

const DISK: u64 = 1 << 20;

/// The server's end of the socket, opaque: every byte is copied through
/// the stream, as under TLS. (With zero copy the server gets the real
/// connection, which offers sendfile and splice.)
struct Copying(UnixStream);

impl Read for Copying {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(b)
    }
}

impl Write for Copying {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.write(b)
    }
    fn write_vectored(&mut self, b: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.0.write_vectored(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Channel for Copying {}

struct OneDisk(Option<Image>);

impl Exports for OneDisk {
    fn open(&mut self, _name: &str, _purpose: Purpose, _pipelined: bool) -> Result<u64, OpenError> {
        if self.0.is_none() {
            self.0 = Some(Image::create(&std::env::temp_dir(), DISK).unwrap().0);
        }
        Ok(DISK)
    }
    fn description(&self) -> String {
        "property test disk".into()
    }
    fn list(&self) -> Vec<(String, String)> {
        vec![(String::new(), self.description())]
    }
}

/// The library's negotiation and transmission on a thread, serving one
/// client over a socket pair; returns the client's end.
fn start_server(zero_copy: bool) -> (JoinHandle<Result<(), String>>, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let t = std::thread::spawn(move || {
        let mut ex = OneDisk(None);
        if zero_copy {
            serve_one(Stream::new(Conn::socket(OwnedFd::from(a))), &mut ex)
        } else {
            serve_one(Stream::new(Copying(a)), &mut ex)
        }
    });
    (t, b)
}

fn serve_one<C: Channel>(mut s: Stream<C>, ex: &mut OneDisk) -> Result<(), String> {
    match handshake(&mut s).and_then(|nz| negotiate(&mut s, ex, nz, Tls::Unavailable)) {
        Ok(NegotiationEnd::Go(n)) => {
            let img = ex.0.as_ref().unwrap();
            serve(&mut s, img, &n, &mut Stats::default())
                .map(|_| ())
                .map_err(|h| h.to_string())
        }
        Ok(_) => Err("negotiation did not end in GO".into()),
        Err(h) => Err(h.to_string()),
    }
}

#[derive(Debug, Clone)]
enum DiskOp {
    Write { off: u64, len: u64, byte: u8 },
    Trim { off: u64, len: u64 },
    Zero { off: u64, len: u64 },
}

fn disk_op() -> impl Strategy<Value = DiskOp> {
    let pos = prop_oneof![(0..DISK / BLOCK).prop_map(|b| b * BLOCK), 0..DISK];
    let len = prop_oneof![(1..32u64).prop_map(|b| b * BLOCK), 1..200_000u64];
    prop_oneof![
        3 => (pos.clone(), len.clone(), 1..=255u8).prop_map(|(off, len, byte)| DiskOp::Write {
            off,
            len,
            byte
        }),
        1 => (pos.clone(), len.clone()).prop_map(|(off, len)| DiskOp::Trim { off, len }),
        1 => (pos, len).prop_map(|(off, len)| DiskOp::Zero { off, len }),
    ]
}

fn expect_ok(s: &mut UnixStream, framing: Framing, cookie: u64) -> Result<(), TestCaseError> {
    let r =
        nbdraw::read_replies(s, framing, None).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(r.len(), 1);
    prop_assert_eq!(r[0].cookie(), cookie);
    prop_assert_eq!(r[0].error(), 0, "request {} failed: {:?}", cookie, r);
    Ok(())
}

/// Checks the chunks answering READ(off, len): each for this cookie, DONE
/// on the last only, offsets inside the request, no overlap, together
/// covering it exactly; data chunks carry the model's bytes, hole chunks
/// cover only zeroes; a NONE chunk may only end the reply.
fn check_read_chunks(
    chunks: &[Reply],
    cookie: u64,
    off: u64,
    len: u64,
    df: bool,
    model: &[u8],
) -> Result<(), TestCaseError> {
    let mut pieces = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let Reply::Chunk {
            flags,
            kind,
            cookie: ck,
            payload,
            ..
        } = c
        else {
            return Err(TestCaseError::fail(format!(
                "simple reply to a structured read: {c:?}"
            )));
        };
        prop_assert_eq!(*ck, cookie);
        prop_assert_eq!(
            flags & nbdraw::REPLY_FLAG_DONE != 0,
            i == chunks.len() - 1,
            "DONE must be set on the last chunk only (chunk {} of {})",
            i,
            chunks.len()
        );
        if *kind == nbdraw::REPLY_TYPE_NONE {
            // Only to end the reply (a DF chunk read in pieces is not
            // final: an error could still follow its header).
            prop_assert!(
                i == chunks.len() - 1 && payload.is_empty(),
                "a NONE chunk that does not end the reply: {:?}",
                c
            );
            continue;
        }
        prop_assert!(payload.len() >= 8, "chunk payload too short: {:?}", c);
        let at = u64::from_be_bytes(payload[0..8].try_into().unwrap());
        let (n, data) = match *kind {
            nbdraw::REPLY_TYPE_OFFSET_DATA => ((payload.len() - 8) as u64, Some(&payload[8..])),
            nbdraw::REPLY_TYPE_OFFSET_HOLE => {
                prop_assert_eq!(payload.len(), 12);
                prop_assert!(!df, "a hole chunk despite DF");
                (
                    u64::from(u32::from_be_bytes(payload[8..12].try_into().unwrap())),
                    None,
                )
            }
            k => {
                return Err(TestCaseError::fail(format!(
                    "chunk type {k} in a read: {c:?}"
                )));
            }
        };
        prop_assert!(n > 0, "empty chunk at {}", at);
        prop_assert!(
            at >= off && at + n <= off + len,
            "chunk [{}, +{}) outside the request",
            at,
            n
        );
        let want = &model[at as usize..(at + n) as usize];
        match data {
            Some(d) => prop_assert!(d == want, "data chunk at {} differs from the disk", at),
            None => prop_assert!(
                want.iter().all(|&b| b == 0),
                "hole chunk at {} over written data",
                at
            ),
        }
        pieces.push((at, n));
    }
    if df {
        prop_assert_eq!(pieces.len(), 1, "DF: one chunk");
    }
    pieces.sort();
    let mut pos = off;
    for (at, n) in pieces {
        prop_assert_eq!(at, pos, "chunks overlap or leave a gap at {}", pos);
        pos += n;
    }
    prop_assert_eq!(pos, off + len, "chunks do not cover the request");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn structured_reads_chunk_the_request_exactly(
        extended in any::<bool>(),
        zero_copy in any::<bool>(),
        ops in prop::collection::vec(disk_op(), 0..16),
        reads in prop::collection::vec((0..DISK, 1..300_000u64, any::<bool>()), 1..10),
    ) {
        let framing = if extended { Framing::Extended } else { Framing::Structured };
        let (server, mut c) = start_server(zero_copy);
        let size = nbdraw::negotiate(&mut c, framing, false).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(size, DISK);
        let mut model = vec![0u8; DISK as usize];
        let mut cookie = 100;
        for op in &ops {
            cookie += 1;
            let (msg, range, fill) = match *op {
                DiskOp::Write { off, len, byte } => {
                    let len = len.min(DISK - off);
                    let payload = vec![byte; len as usize];
                    let m = nbdraw::request(framing, 0, nbdraw::CMD_WRITE, cookie, off, len, &payload);
                    (m, (off, len), byte)
                }
                DiskOp::Trim { off, len } => {
                    let len = len.min(DISK - off);
                    (nbdraw::request(framing, 0, nbdraw::CMD_TRIM, cookie, off, len, &[]), (off, len), 0)
                }
                DiskOp::Zero { off, len } => {
                    let len = len.min(DISK - off);
                    (nbdraw::request(framing, 0, nbdraw::CMD_WRITE_ZEROES, cookie, off, len, &[]), (off, len), 0)
                }
            };
            c.write_all(&msg).unwrap();
            expect_ok(&mut c, framing, cookie)?;
            model[range.0 as usize..(range.0 + range.1) as usize].fill(fill);
        }
        for &(off, len, df) in &reads {
            let len = len.min(DISK - off);
            cookie += 1;
            let flags = if df { nbdraw::CMD_FLAG_DF } else { 0 };
            c.write_all(&nbdraw::request(framing, flags, nbdraw::CMD_READ, cookie, off, len, &[])).unwrap();
            let chunks = nbdraw::read_replies(&mut c, framing, None)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            check_read_chunks(&chunks, cookie, off, len, df, &model)?;
        }
        c.write_all(&nbdraw::request(framing, 0, nbdraw::CMD_DISC, 1, 0, 0, &[])).unwrap();
        let ended = server.join().unwrap();
        prop_assert!(ended.is_ok(), "server: {:?}", ended);
    }
}

// --- export names -------------------------------------------------------------------

/// The catalog the export-name properties run against: a default export,
/// one that lets clients choose (size up to 64 GiB, xfs or ext4, a label)
/// and one that lets them choose nothing.
fn name_catalog() -> &'static Catalog {
    static CATALOG: std::sync::OnceLock<Catalog> = std::sync::OnceLock::new();
    CATALOG.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tmpdisk-names-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("test dir");
        let file = dir.join("exports.toml");
        std::fs::write(
            &file,
            "[export.scratch]\nsize = \"8G\"\ntype = \"xfs\"\nmax-size = \"64G\"\n\
             types = [\"xfs\", \"ext4\"]\nlabels = true\n\n\
             [export.fixed]\nsize = \"512M\"\ntype = \"vfat\"\n",
        )
        .expect("write");
        let common = Common {
            tmpdir: "/var/tmp".into(),
            min_free: MinFree::Bytes(0),
            setup_timeout: None,
        };
        let cli = common.disk(1 << 30, FsSpec::of_type("ext4"), None);
        let catalog = Catalog::load(&file, Some(cli), &common).expect("loads");
        let _ = std::fs::remove_dir_all(&dir);
        catalog
    })
}

/// What a client may write: an export, and any of the three choices.
#[derive(Debug, Clone)]
struct NameModel {
    export: &'static str,
    size: Option<u64>,
    fs_type: Option<&'static str>,
    label: Option<String>,
}

impl NameModel {
    fn text(&self) -> String {
        let mut choices = Vec::new();
        if let Some(s) = self.size {
            choices.push(format!("size={s}"));
        }
        if let Some(t) = self.fs_type {
            choices.push(format!("type={t}"));
        }
        if let Some(l) = &self.label {
            choices.push(format!("label={l}"));
        }
        match choices.is_empty() {
            true => self.export.to_string(),
            false => format!("{}:{}", self.export, choices.join(":")),
        }
    }

    /// (size, type, label) the disk must have, or None if it is refused;
    /// written from the catalog's definition, not from its code.
    fn expected(&self) -> Option<(u64, String, Option<String>)> {
        let (size, fs_type, may_choose) = match self.export {
            "" => (1 << 30, "ext4", false),
            "scratch" => (8 << 30, "xfs", true),
            "fixed" => (512 << 20, "vfat", false),
            _ => return None,
        };
        let chose = self.size.is_some() || self.fs_type.is_some() || self.label.is_some();
        if chose && !may_choose {
            return None;
        }
        let size = self.size.unwrap_or(size);
        let fs_type = self.fs_type.unwrap_or(fs_type);
        let label_max = if fs_type == "xfs" { 12 } else { 16 };
        let ok = !chose
            || size <= 64 << 30
                && ["xfs", "ext4"].contains(&fs_type)
                && self.label.as_ref().is_none_or(|l| l.len() <= label_max);
        ok.then(|| (size, fs_type.to_string(), self.label.clone()))
    }
}

fn name_model() -> impl Strategy<Value = NameModel> {
    (
        prop_oneof![Just(""), Just("scratch"), Just("fixed"), Just("other")],
        proptest::option::of(prop_oneof![
            1u64..=1 << 40,
            (1u64..=128).prop_map(|g| g << 30)
        ]),
        proptest::option::of(prop_oneof![
            Just("xfs"),
            Just("ext4"),
            Just("btrfs"),
            Just("vfat")
        ]),
        proptest::option::of("[A-Za-z0-9._-]{1,20}"),
    )
        .prop_map(|(export, size, fs_type, label)| NameModel {
            export,
            size,
            fs_type,
            label,
        })
}

/// A refusal tells the client what is allowed, in printable text.
fn check_refusal(name: &str, r: &Refusal) -> Result<(), TestCaseError> {
    prop_assert!(
        r.reply == REP_ERR_UNKNOWN || r.reply == REP_ERR_POLICY,
        "{name:?}: reply {:#x}",
        r.reply
    );
    prop_assert!(!r.message.is_empty(), "{name:?}: an empty message");
    prop_assert!(
        !r.message.chars().any(char::is_control),
        "{name:?}: control characters reach the message {:?}",
        r.message
    );
    prop_assert!(
        r.message.len() <= 1024,
        "{name:?}: {} bytes",
        r.message.len()
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Names built from the grammar get exactly the disk the catalog's
    /// limits allow, or a refusal.
    #[test]
    fn export_names_get_the_allowed_shape_or_a_refusal(m in name_model()) {
        let name = m.text();
        match (name_catalog().resolve(&name), m.expected()) {
            (Ok(shape), Some((size, fs_type, label))) => {
                prop_assert_eq!(shape.disk.size, size, "{:?}", name);
                prop_assert_eq!(&shape.disk.fs.fs_type, &fs_type, "{:?}", name);
                prop_assert_eq!(
                    shape.disk.fs.label.map(|l| l.to_string_lossy().into_owned()),
                    label,
                    "{:?}", name
                );
            }
            (Err(r), None) => check_refusal(&name, &r)?,
            (got, want) => prop_assert!(false, "{name:?}: got {got:?}, the model says {want:?}"),
        }
    }

    /// Any text at all (what a hostile client sends, up to the protocol's
    /// 4096 bytes) gets one of the catalog's shapes or a printable refusal,
    /// never a panic.
    #[test]
    fn any_export_name_gets_a_shape_or_a_clear_refusal(name in prop_oneof![
        ".{0,64}",
        "[a-z:=,.0-9]{0,64}",
        "(scratch|fixed)?:[a-z=,:0-9GM]{0,40}",
        proptest::collection::vec(any::<char>(), 0..1100).prop_map(|v| v.into_iter().collect::<String>()),
    ]) {
        let name: String = name.replace('\0', "");
        match name_catalog().resolve(&name) {
            Ok(shape) => {
                let d = &shape.disk;
                prop_assert!(d.size <= 64 << 30, "{name:?}: {}", d.size);
                prop_assert!(["ext4", "xfs", "vfat"].contains(&d.fs.fs_type.as_str()), "{name:?}");
                if let Some(l) = &d.fs.label {
                    prop_assert!(l.len() <= 16 && l.to_str().is_some_and(|l| l
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))), "{name:?}");
                }
            }
            Err(r) => check_refusal(&name, &r)?,
        }
    }
}

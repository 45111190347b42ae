//! Protocol tests: the real negotiation and transmission code on one end
//! of a socket pair, a hand-written client speaking raw bytes on the other.
//! Transmission runs against both kinds of [`Storage`]: the real nameless
//! image (through the real connection, so sendfile and splice are used for
//! large transfers) and an in-memory disk that offers no zero-copy path.
//! They pin the wire format and what each kind of bad input gets.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::Duration;

use super::error::Hangup;
use super::negotiate::{
    Exports, MAX_OPTIONS, NegotiationEnd, OpenError, Purpose, Replies, Tls, handshake, negotiate,
};
use super::storage::{Extent, Received, Storage, ZeroCopy};
use super::stream::{Channel, Stream};
use super::transmit::{Stats, TransmissionEnd, serve};
use super::wire::*;
use crate::conn::Conn;
use crate::image::Image;

const SIZE: u64 = 4 << 20;

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

/// The same socket, but opaque: every byte is copied through the stream's
/// buffers, as under TLS.
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
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Channel for Copying {}

/// A disk in memory, for tests only: its bytes, and which 4 KiB blocks
/// hold data (the rest are holes). It has no fd, so it offers no
/// zero-copy path: everything goes through the stream's payload buffer.
struct MemDisk {
    bytes: RefCell<Vec<u8>>,
    data: RefCell<Vec<bool>>,
    /// Reads of anything from here on fail with EIO (a bad disk).
    bad_from: Option<u64>,
}

const BLOCK: u64 = 4096;

impl MemDisk {
    fn new(size: u64) -> MemDisk {
        MemDisk {
            bytes: RefCell::new(vec![0; size as usize]),
            data: RefCell::new(vec![false; size.div_ceil(BLOCK) as usize]),
            bad_from: None,
        }
    }

    fn range(&self, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(offset as usize..end as usize),
            _ => Err(io::ErrorKind::InvalidInput.into()),
        }
    }

    /// Zero a range; blocks it covers whole become holes when `punch`.
    fn clear(&self, offset: u64, len: u64, punch: bool) -> io::Result<()> {
        let r = self.range(offset, len)?;
        self.bytes.borrow_mut()[r.clone()].fill(0);
        let mut data = self.data.borrow_mut();
        let first = offset.div_ceil(BLOCK);
        let last = (offset + len) / BLOCK;
        for b in first..last.max(first) {
            data[b as usize] = !punch;
        }
        Ok(())
    }
}

impl Storage for MemDisk {
    fn size(&self) -> u64 {
        self.bytes.borrow().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let r = self.range(offset, buf.len() as u64)?;
        if self.bad_from.is_some_and(|b| r.end as u64 > b) {
            return Err(io::Error::other("bad block"));
        }
        buf.copy_from_slice(&self.bytes.borrow()[r]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let r = self.range(offset, buf.len() as u64)?;
        self.bytes.borrow_mut()[r.clone()].copy_from_slice(buf);
        let mut data = self.data.borrow_mut();
        for b in r.start as u64 / BLOCK..(r.end as u64).div_ceil(BLOCK) {
            data[b as usize] = true;
        }
        Ok(())
    }
    fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        self.clear(offset, length, true)
    }
    fn zero(&self, offset: u64, length: u64, may_punch: bool, _fast: bool) -> io::Result<()> {
        self.clear(offset, length, may_punch)
    }
    fn cache(&self, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }
    fn extents(
        &self,
        offset: u64,
        length: u64,
        max: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        let r = self.range(offset, length)?;
        let data = self.data.borrow();
        let mut pos = r.start as u64;
        while pos < r.end as u64 {
            let is = data[(pos / BLOCK) as usize];
            let mut end = ((pos / BLOCK) + 1) * BLOCK;
            while end < r.end as u64 && data[(end / BLOCK) as usize] == is {
                end += BLOCK;
            }
            let end = end.min(r.end as u64);
            if out.len() == max {
                break;
            }
            out.push(Extent {
                offset: pos,
                length: end - pos,
                data: is,
            });
            pos = end;
        }
        Ok(())
    }
    fn send(&self, _: &mut dyn ZeroCopy, _: &[&[u8]], _: u64, _: usize) -> io::Result<bool> {
        Ok(false)
    }
    fn receive_align(&self) -> u64 {
        1
    }
    fn receive(&self, _: &mut dyn ZeroCopy, _: u64, _: usize) -> io::Result<Option<Received>> {
        Ok(None)
    }
}

/// Which disk a test server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Image,
    Memory,
    /// In memory, reads failing from [`BAD_FROM`] on.
    BadMemory,
}

const BAD_FROM: u64 = 3 << 20;

const BACKENDS: [Backend; 2] = [Backend::Image, Backend::Memory];

/// Exports backed by one disk; counts how often it is built.
struct TestExports {
    backend: Backend,
    disk: Option<Box<dyn Storage + Send>>,
    builds: usize,
    fail: Option<String>,
}

impl TestExports {
    fn new(backend: Backend, fail: Option<String>) -> Self {
        TestExports {
            backend,
            disk: None,
            builds: 0,
            fail,
        }
    }
}

impl Exports for TestExports {
    fn open(&mut self, _name: &str, _purpose: Purpose, _pipelined: bool) -> Result<u64, OpenError> {
        if let Some(m) = &self.fail {
            return Err(OpenError {
                reply: REP_ERR_UNKNOWN,
                message: m.clone(),
                refused: false,
            });
        }
        if self.disk.is_none() {
            self.builds += 1;
            self.disk = Some(match self.backend {
                Backend::Image => Box::new(Image::create(&std::env::temp_dir(), SIZE).unwrap().0),
                Backend::Memory => Box::new(MemDisk::new(SIZE)),
                Backend::BadMemory => Box::new(MemDisk {
                    bad_from: Some(BAD_FROM),
                    ..MemDisk::new(SIZE)
                }),
            });
        }
        Ok(SIZE)
    }
    fn description(&self) -> String {
        "test disk".into()
    }
    fn list(&self) -> Vec<(String, String)> {
        vec![(String::new(), self.description())]
    }
}

/// How the server side of a test ended.
#[derive(Debug)]
enum Ended {
    Aborted,
    Served(TransmissionEnd),
    Hung(String),
}

struct Server {
    thread: JoinHandle<(Ended, usize)>,
}

impl Server {
    fn start(fail: Option<&str>) -> (Server, Client) {
        Self::start_with(fail, Tls::Unavailable)
    }

    fn start_with(fail: Option<&str>, tls: Tls) -> (Server, Client) {
        Self::start_full(fail, tls, true, Backend::Image)
    }

    /// A server on `backend`; `zero_copy`: over the real connection (which
    /// offers sendfile/splice) rather than an opaque copying channel.
    fn on(backend: Backend, zero_copy: bool) -> (Server, Client) {
        Self::start_full(None, Tls::Unavailable, zero_copy, backend)
    }

    fn start_full(
        fail: Option<&str>,
        tls: Tls,
        zero_copy: bool,
        backend: Backend,
    ) -> (Server, Client) {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let fail = fail.map(String::from);
        let thread = std::thread::spawn(move || {
            let mut ex = TestExports::new(backend, fail);
            let (ended, builds) = if zero_copy {
                session(Stream::new(Conn::socket(OwnedFd::from(a))), &mut ex, tls)
            } else {
                session(Stream::new(Copying(a)), &mut ex, tls)
            };
            (ended, builds)
        });
        (Server { thread }, Client { s: b })
    }

    fn join(self) -> (Ended, usize) {
        self.thread.join().unwrap()
    }
}

/// The server side: negotiate, then serve, as the session module does.
fn session<C: Channel>(mut s: Stream<C>, ex: &mut TestExports, tls: Tls) -> (Ended, usize) {
    let r = handshake(&mut s).and_then(|nz| negotiate(&mut s, ex, nz, tls));
    let ended = match r {
        Ok(NegotiationEnd::Go(n)) => {
            let disk = ex.disk.as_deref().unwrap();
            let mut stats = Stats::default();
            match serve(&mut s, disk, &n, &mut stats) {
                Ok(e) => Ended::Served(e),
                Err(h) => Ended::Hung(h.to_string()),
            }
        }
        Ok(NegotiationEnd::Abort) => Ended::Aborted,
        Ok(NegotiationEnd::StartTls) => Ended::Hung("starttls".into()),
        Err(Hangup::Closed) => Ended::Hung("closed".into()),
        Err(h) => Ended::Hung(h.to_string()),
    };
    (ended, ex.builds)
}

struct Client {
    s: UnixStream,
}

struct OptReply {
    option: u32,
    kind: u32,
    data: Vec<u8>,
}

struct Chunk {
    flags: u16,
    kind: u16,
    cookie: u64,
    payload: Vec<u8>,
}

impl Client {
    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    /// Read the greeting, send client flags.
    fn hello(&mut self, cflags: u32) {
        let g = self.read_n(18);
        assert_eq!(be64(&g[0..8]), NBDMAGIC);
        assert_eq!(be64(&g[8..16]), IHAVEOPT);
        assert_eq!(be16(&g[16..18]), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        self.s.write_all(&cflags.to_be_bytes()).unwrap();
    }

    fn opt(&mut self, option: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).unwrap();
    }

    fn reply(&mut self) -> OptReply {
        let h = self.read_n(20);
        assert_eq!(be64(&h[0..8]), OPTION_REPLY_MAGIC);
        let len = be32(&h[16..20]) as usize;
        OptReply {
            option: be32(&h[8..12]),
            kind: be32(&h[12..16]),
            data: self.read_n(len),
        }
    }

    /// Send an option and collect replies up to the final ACK or error.
    fn haggle(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.opt(option, data);
        let mut out = Vec::new();
        loop {
            let r = self.reply();
            assert_eq!(r.option, option);
            let last = r.kind == REP_ACK || r.kind & (1 << 31) != 0;
            out.push(r);
            if last {
                return out;
            }
        }
    }

    fn go(&mut self, name: &[u8]) -> Vec<OptReply> {
        self.haggle(OPT_GO, &info_data(name, &[]))
    }

    fn negotiate_structured(&mut self, meta: bool) {
        self.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        assert_eq!(self.haggle(OPT_STRUCTURED_REPLY, &[])[0].kind, REP_ACK);
        if meta {
            let r = self.haggle(OPT_SET_META_CONTEXT, &meta_data(b"", &[b"base:allocation"]));
            assert_eq!(r[0].kind, REP_META_CONTEXT);
        }
        assert_eq!(self.go(b"").last().unwrap().kind, REP_ACK);
    }

    fn request(
        &mut self,
        flags: u16,
        cmd: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut m = Vec::new();
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&cmd.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(payload);
        self.s.write_all(&m).unwrap();
    }

    /// A simple reply: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        let h = self.read_n(16);
        assert_eq!(
            be32(&h[0..4]),
            SIMPLE_REPLY_MAGIC,
            "expected a simple reply"
        );
        (be32(&h[4..8]), be64(&h[8..16]))
    }

    fn chunk(&mut self) -> Chunk {
        let h = self.read_n(20);
        assert_eq!(
            be32(&h[0..4]),
            STRUCTURED_REPLY_MAGIC,
            "expected a structured reply"
        );
        let len = be32(&h[16..20]) as usize;
        Chunk {
            flags: be16(&h[4..6]),
            kind: be16(&h[6..8]),
            cookie: be64(&h[8..16]),
            payload: self.read_n(len),
        }
    }

    /// Chunks up to and including the one marked DONE.
    fn chunks(&mut self) -> Vec<Chunk> {
        let mut v = Vec::new();
        loop {
            let c = self.chunk();
            let done = c.flags & REPLY_FLAG_DONE != 0;
            v.push(c);
            if done {
                return v;
            }
        }
    }

    /// The error code (0 for success) of a reply that may be simple or
    /// structured (servers may answer non-reads either way).
    fn status(&mut self) -> u32 {
        let magic = self.read_n(4);
        let rest = if be32(&magic) == SIMPLE_REPLY_MAGIC {
            12
        } else {
            16
        };
        let mut h = magic;
        h.extend(self.read_n(rest));
        if be32(&h[0..4]) == SIMPLE_REPLY_MAGIC {
            return be32(&h[4..8]);
        }
        assert_eq!(be32(&h[0..4]), STRUCTURED_REPLY_MAGIC);
        assert_ne!(be16(&h[4..6]) & REPLY_FLAG_DONE, 0, "single chunk expected");
        let payload = self.read_n(be32(&h[16..20]) as usize);
        match be16(&h[6..8]) {
            REPLY_TYPE_ERROR => be32(&payload[0..4]),
            _ => 0,
        }
    }

    /// The server hung up: an end of stream, or a reset when it closed
    /// with bytes of ours it never read (it stops reading where it hangs
    /// up, so what we pipelined past that point makes the kernel send RST
    /// instead of FIN).
    fn assert_closed(&mut self) {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("server should have hung up, read gave {other:?}"),
        }
    }
}

fn info_data(name: &[u8], requests: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

fn meta_data(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q);
    }
    d
}

fn hung(e: Ended, what: &str) {
    match e {
        Ended::Hung(m) => assert!(m.contains(what), "hung up with {m:?}, expected {what:?}"),
        other => panic!("expected a hang-up ({what}), got {other:?}"),
    }
}

// --- handshake and options ------------------------------------------------------

#[test]
fn unknown_client_flags_hang_up() {
    let (srv, mut c) = Server::start(None);
    c.hello(1 << 5 | FLAG_C_FIXED_NEWSTYLE);
    c.assert_closed();
    hung(srv.join().0, "unknown handshake flags");
}

#[test]
fn unknown_option_gets_unsup_and_negotiation_goes_on() {
    let (srv, mut c) = Server::start(None);
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    let r = c.haggle(99, b"some data");
    assert_eq!(r[0].kind, REP_ERR_UNSUP);
    assert!(String::from_utf8_lossy(&r[0].data).contains("not supported"));
    let r = c.haggle(OPT_PEEK_EXPORT, &[]);
    assert_eq!(r[0].kind, REP_ERR_UNSUP);
    assert_eq!(c.go(b"").last().unwrap().kind, REP_ACK);
    c.request(0, CMD_DISC, 1, 0, 0, &[]);
    assert!(matches!(
        srv.join().0,
        Ended::Served(TransmissionEnd::Disconnect)
    ));
}

#[test]
fn bad_option_magic_and_oversized_options_hang_up() {
    let (srv, mut c) = Server::start(None);
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    c.s.write_all(&[0u8; 16]).unwrap();
    c.assert_closed();
    hung(srv.join().0, "bad option magic");

    let (srv, mut c) = Server::start(None);
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&u32::MAX.to_be_bytes());
    c.s.write_all(&m).unwrap();
    c.assert_closed();
    hung(srv.join().0, "bytes of data");
}

#[test]
fn malformed_info_requests_get_invalid() {
    let (srv, mut c) = Server::start(None);
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    // Too short.
    assert_eq!(c.haggle(OPT_INFO, &[0, 0, 0])[0].kind, REP_ERR_INVALID);
    // Name length past the data.
    let mut d = info_data(b"x", &[]);
    d[3] = 200;
    assert_eq!(c.haggle(OPT_INFO, &d)[0].kind, REP_ERR_INVALID);
    // Request count does not match.
    let mut d = info_data(b"", &[INFO_NAME]);
    d.push(0);
    assert_eq!(c.haggle(OPT_GO, &d)[0].kind, REP_ERR_INVALID);
    c.opt(OPT_ABORT, &[]);
    assert_eq!(c.reply().kind, REP_ACK);
    let (ended, builds) = srv.join();
    assert!(matches!(ended, Ended::Aborted));
    assert_eq!(builds, 0, "malformed requests must not build the disk");
}

#[test]
fn info_then_go_builds_once_and_describes_the_same_export() {
    let (srv, mut c) = Server::start(None);
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    let reqs = [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 77];
    let info = c.haggle(OPT_INFO, &info_data(b"any name", &reqs));
    let go = c.haggle(OPT_GO, &info_data(b"any name", &reqs));
    for r in [&info, &go] {
        assert_eq!(r.last().unwrap().kind, REP_ACK);
        let infos: Vec<&OptReply> = r.iter().filter(|x| x.kind == REP_INFO).collect();
        let export = infos.iter().find(|x| be16(&x.data) == INFO_EXPORT).unwrap();
        assert_eq!(be64(&export.data[2..10]), SIZE);
        let flags = be16(&export.data[10..12]);
        assert_ne!(flags & TFLAG_HAS_FLAGS, 0);
        assert_eq!(flags & TFLAG_CAN_MULTI_CONN, 0, "never multi-conn");
        assert_eq!(flags & TFLAG_READ_ONLY, 0);
        assert_eq!(flags & TFLAG_SEND_DF, 0, "no DF without structured replies");
        let name = infos.iter().find(|x| be16(&x.data) == INFO_NAME).unwrap();
        assert_eq!(&name.data[2..], b"any name");
        let desc = infos
            .iter()
            .find(|x| be16(&x.data) == INFO_DESCRIPTION)
            .unwrap();
        assert_eq!(&desc.data[2..], b"test disk");
        let bs = infos
            .iter()
            .find(|x| be16(&x.data) == INFO_BLOCK_SIZE)
            .unwrap();
        assert_eq!(
            (
                be32(&bs.data[2..]),
                be32(&bs.data[6..]),
                be32(&bs.data[10..])
            ),
            (1, 4096, MAX_PAYLOAD)
        );
    }
    c.request(0, CMD_DISC, 1, 0, 0, &[]);
    let (_, builds) = srv.join();
    assert_eq!(builds, 1);
}

#[test]
fn a_failed_build_is_an_option_error_with_the_reason() {
    let (srv, mut c) = Server::start(Some("mkfs.xfs: Filesystem must be larger than 300MB."));
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    let r = c.go(b"");
    assert_eq!(r[0].kind, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&r[0].data).contains("larger than 300MB"));
    c.opt(OPT_ABORT, &[]);
    assert_eq!(c.reply().kind, REP_ACK);
    assert!(matches!(srv.join().0, Ended::Aborted));
}

#[test]
fn list_starttls_and_structured_reply_rules() {
    let (srv, mut c) = Server::start(None);
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    assert_eq!(c.haggle(OPT_LIST, b"x")[0].kind, REP_ERR_INVALID);
    let l = c.haggle(OPT_LIST, &[]);
    assert_eq!(l.len(), 2);
    assert_eq!(l[0].kind, REP_SERVER);
    assert_eq!(be32(&l[0].data), 0);
    assert_eq!(&l[0].data[4..], b"test disk");
    let t = c.haggle(OPT_STARTTLS, &[]);
    assert_eq!(t[0].kind, REP_ERR_POLICY);
    assert_eq!(
        c.haggle(OPT_STRUCTURED_REPLY, b"x")[0].kind,
        REP_ERR_INVALID
    );
    assert_eq!(c.haggle(OPT_STRUCTURED_REPLY, &[])[0].kind, REP_ACK);
    assert_eq!(c.haggle(OPT_STRUCTURED_REPLY, &[])[0].kind, REP_ACK);
    assert_eq!(c.haggle(OPT_EXTENDED_HEADERS, &[])[0].kind, REP_ACK);
    assert_eq!(
        c.haggle(OPT_STRUCTURED_REPLY, &[])[0].kind,
        REP_ERR_EXT_HEADER_REQD
    );
    assert_eq!(c.haggle(OPT_EXTENDED_HEADERS, &[])[0].kind, REP_ERR_INVALID);
    // EXPORT_NAME is forbidden after extended headers: hang up.
    c.opt(OPT_EXPORT_NAME, b"");
    c.assert_closed();
    hung(srv.join().0, "after extended headers");
}

#[test]
fn meta_contexts() {
    let (srv, mut c) = Server::start(None);
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    // SET before structured replies: invalid.
    let r = c.haggle(OPT_SET_META_CONTEXT, &meta_data(b"", &[b"base:allocation"]));
    assert_eq!(r[0].kind, REP_ERR_INVALID);
    assert_eq!(c.haggle(OPT_STRUCTURED_REPLY, &[])[0].kind, REP_ACK);
    // LIST with no query lists everything, with id 0.
    let r = c.haggle(OPT_LIST_META_CONTEXT, &meta_data(b"", &[]));
    assert_eq!(r[0].kind, REP_META_CONTEXT);
    assert_eq!(be32(&r[0].data), 0);
    assert_eq!(&r[0].data[4..], b"base:allocation");
    // "base:" is a wildcard for LIST, ignored by SET; other namespaces are ignored.
    let r = c.haggle(OPT_LIST_META_CONTEXT, &meta_data(b"", &[b"base:"]));
    assert_eq!(r[0].kind, REP_META_CONTEXT);
    let r = c.haggle(
        OPT_SET_META_CONTEXT,
        &meta_data(b"", &[b"base:", b"qemu:dirty-bitmap:x"]),
    );
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, REP_ACK);
    // Malformed: query length runs past the data.
    let mut d = meta_data(b"", &[b"base:allocation"]);
    d.truncate(d.len() - 1);
    assert_eq!(c.haggle(OPT_SET_META_CONTEXT, &d)[0].kind, REP_ERR_INVALID);
    let r = c.haggle(OPT_SET_META_CONTEXT, &meta_data(b"", &[b"base:allocation"]));
    assert_eq!(r[0].kind, REP_META_CONTEXT);
    assert_eq!(be32(&r[0].data), META_ID_BASE_ALLOCATION);
    assert_eq!(c.go(b"").last().unwrap().kind, REP_ACK);
    c.request(0, CMD_BLOCK_STATUS, 5, 0, 4096, &[]);
    let ch = c.chunks();
    assert_eq!(ch[0].kind, REPLY_TYPE_BLOCK_STATUS);
    assert_eq!(ch[0].cookie, 5);
    c.request(0, CMD_DISC, 1, 0, 0, &[]);
    srv.join();
}

#[test]
fn block_status_for_another_export_name_is_dropped() {
    let (srv, mut c) = Server::start(None);
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    assert_eq!(c.haggle(OPT_STRUCTURED_REPLY, &[])[0].kind, REP_ACK);
    c.haggle(
        OPT_SET_META_CONTEXT,
        &meta_data(b"a", &[b"base:allocation"]),
    );
    assert_eq!(c.go(b"b").last().unwrap().kind, REP_ACK);
    c.request(0, CMD_BLOCK_STATUS, 5, 0, 4096, &[]);
    assert_eq!(c.status(), EINVAL);
    c.request(0, CMD_DISC, 1, 0, 0, &[]);
    srv.join();
}

#[test]
fn export_name_reply_honours_no_zeroes() {
    for (cflags, len) in [
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 10),
        (FLAG_C_FIXED_NEWSTYLE, 134),
    ] {
        let (srv, mut c) = Server::start(None);
        c.hello(cflags);
        c.opt(OPT_EXPORT_NAME, b"whatever");
        let r = c.read_n(len);
        assert_eq!(be64(&r[0..8]), SIZE);
        assert!(r[10..].iter().all(|&b| b == 0));
        c.request(0, CMD_DISC, 1, 0, 0, &[]);
        assert!(matches!(
            srv.join().0,
            Ended::Served(TransmissionEnd::Disconnect)
        ));
    }
}

/// Replies owed before a hang-up are sent first: a client that pipelined
/// good options in front of a bad one still gets their answers.
#[test]
fn replies_to_options_before_a_protocol_hangup_are_sent() {
    // Two LISTs, then an option with a bad magic, in one write.
    let (srv, mut c) = Server::start(None);
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    let mut all = Vec::new();
    for _ in 0..2 {
        all.extend_from_slice(&IHAVEOPT.to_be_bytes());
        all.extend_from_slice(&OPT_LIST.to_be_bytes());
        all.extend_from_slice(&0u32.to_be_bytes());
    }
    all.extend_from_slice(&[0x55; 16]);
    c.s.write_all(&all).unwrap();
    for _ in 0..2 {
        assert_eq!(c.reply().kind, REP_SERVER);
        assert_eq!(c.reply().kind, REP_ACK);
    }
    c.assert_closed();
    hung(srv.join().0, "bad option magic");

    // The 256th option's reply, then the hang-up for the 257th.
    let (srv, mut c) = Server::start(None);
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    let mut all = Vec::new();
    for _ in 0..MAX_OPTIONS + 1 {
        all.extend_from_slice(&IHAVEOPT.to_be_bytes());
        all.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
        all.extend_from_slice(&0u32.to_be_bytes());
    }
    let mut w = c.s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&all);
    });
    let mut acks = 0;
    while acks < MAX_OPTIONS {
        assert_eq!(c.reply().kind, REP_ACK, "reply {acks}");
        acks += 1;
    }
    c.assert_closed();
    writer.join().unwrap();
    hung(srv.join().0, "options without choosing an export");
}

/// Export names are protocol strings: UTF-8, no NUL, at most 4096 bytes.
/// NBD_INFO_NAME echoes exactly what was asked for (a lossy conversion
/// once made a 4096-byte name 12288 bytes long).
#[test]
fn export_names_must_be_utf8_without_nul_and_are_echoed_exactly() {
    let (srv, mut c) = Server::start(None);
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    for bad in [vec![0xffu8; 4096], b"a\0b".to_vec(), vec![b'x', 0xc3]] {
        let r = c.haggle(OPT_INFO, &info_data(&bad, &[INFO_NAME]));
        assert_eq!(r.len(), 1);
        assert_eq!(
            r[0].kind,
            REP_ERR_INVALID,
            "{:?}",
            String::from_utf8_lossy(&r[0].data)
        );
    }
    let long = "\u{e9}".repeat(2048);
    assert_eq!(long.len(), MAX_STRING);
    let r = c.haggle(OPT_INFO, &info_data(long.as_bytes(), &[INFO_NAME]));
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    let name = r
        .iter()
        .find(|x| x.kind == REP_INFO && be16(&x.data) == INFO_NAME)
        .unwrap();
    assert_eq!(&name.data[2..], long.as_bytes());
    c.opt(OPT_ABORT, &[]);
    assert_eq!(c.reply().kind, REP_ACK);
    assert!(matches!(srv.join().0, Ended::Aborted));

    // EXPORT_NAME cannot carry an error: a bad name hangs up.
    let (srv, mut c) = Server::start(None);
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    c.opt(OPT_EXPORT_NAME, &[0xfe, 0xff]);
    c.assert_closed();
    hung(srv.join().0, "UTF-8");
}

#[test]
fn too_many_options_hang_up() {
    let (srv, mut c) = Server::start(None);
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    let mut all = Vec::new();
    for _ in 0..300 {
        all.extend_from_slice(&IHAVEOPT.to_be_bytes());
        all.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
        all.extend_from_slice(&0u32.to_be_bytes());
    }
    // Replies are read by a thread so the server never blocks on us.
    let mut r = c.s.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
    });
    let _ = c.s.write_all(&all);
    reader.join().unwrap();
    hung(srv.join().0, "options without choosing an export");
}

// --- transmission -----------------------------------------------------------------

#[test]
fn write_then_read_with_simple_replies() {
    for backend in BACKENDS {
        let (srv, mut c) = Server::on(backend, true);
        c.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        c.go(b"");
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        c.request(CMD_FLAG_FUA, CMD_WRITE, 7, 4096, 8192, &data);
        assert_eq!(c.simple(), (0, 7));
        c.request(0, CMD_READ, 8, 4096, 8192, &[]);
        assert_eq!(c.simple(), (0, 8));
        assert_eq!(c.read_n(8192), data);
        c.request(0, CMD_FLUSH, 9, 0, 0, &[]);
        assert_eq!(c.simple(), (0, 9));
        c.request(0, CMD_DISC, 1, 0, 0, &[]);
        assert!(matches!(
            srv.join().0,
            Ended::Served(TransmissionEnd::Disconnect)
        ));
    }
}

#[test]
fn bad_requests_get_errors_and_the_session_goes_on() {
    for backend in BACKENDS {
        let (srv, mut c) = Server::on(backend, true);
        c.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        c.go(b"");
        // Past the end: write ENOSPC (payload consumed), read EINVAL.
        c.request(0, CMD_WRITE, 1, SIZE - 1, 2, &[1, 2]);
        assert_eq!(c.simple(), (ENOSPC, 1));
        c.request(0, CMD_READ, 2, SIZE, 1, &[]);
        assert_eq!(c.simple(), (EINVAL, 2));
        // Wrapping offset.
        c.request(0, CMD_TRIM, 3, u64::MAX, 2, &[]);
        assert_eq!(c.simple(), (EINVAL, 3));
        // Unknown command and unknown flag.
        c.request(0, 42, 4, 0, 1, &[]);
        assert_eq!(c.simple(), (EINVAL, 4));
        c.request(1 << 12, CMD_READ, 5, 0, 1, &[]);
        assert_eq!(c.simple(), (EINVAL, 5));
        // DF without structured replies; block status without a context.
        c.request(CMD_FLAG_DF, CMD_READ, 6, 0, 1, &[]);
        assert_eq!(c.simple(), (EINVAL, 6));
        c.request(0, CMD_BLOCK_STATUS, 7, 0, 1, &[]);
        assert_eq!(c.simple(), (EINVAL, 7));
        // Zero length.
        c.request(0, CMD_READ, 8, 0, 0, &[]);
        assert_eq!(c.simple(), (EINVAL, 8));
        // An oversized write is drained and refused, and framing survives.
        let big = vec![0u8; MAX_PAYLOAD as usize + 4096];
        c.request(0, CMD_WRITE, 9, 0, big.len() as u32, &big);
        assert_eq!(c.simple(), (EINVAL, 9));
        c.request(0, CMD_READ, 10, 0, 16, &[]);
        assert_eq!(c.simple(), (0, 10));
        assert_eq!(c.read_n(16), vec![0u8; 16]);
        c.request(0, CMD_DISC, 1, 0, 0, &[]);
        assert!(matches!(
            srv.join().0,
            Ended::Served(TransmissionEnd::Disconnect)
        ));
    }
}

#[test]
fn a_write_too_large_to_skip_hangs_up() {
    let (srv, mut c) = Server::start(None);
    c.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.go(b"");
    c.request(0, CMD_WRITE, 1, 0, u32::MAX, &[]);
    c.assert_closed();
    hung(srv.join().0, "too large to skip");
}

#[test]
fn bad_request_magic_and_truncated_requests_hang_up() {
    let (srv, mut c) = Server::start(None);
    c.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.go(b"");
    c.s.write_all(&[0x25, 0x60, 0x95, 0x14]).unwrap();
    c.s.write_all(&[0u8; 24]).unwrap();
    c.assert_closed();
    hung(srv.join().0, "bad request magic");

    let (srv, mut c) = Server::start(None);
    c.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.go(b"");
    c.s.write_all(&REQUEST_MAGIC.to_be_bytes()).unwrap();
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    hung(srv.join().0, "mid-message");

    // A write whose payload never fully arrives.
    let (srv, mut c) = Server::start(None);
    c.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.go(b"");
    c.request(0, CMD_WRITE, 1, 0, 4096, &[1u8; 100]);
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    hung(srv.join().0, "mid-message");

    // Between requests, a close is clean.
    let (srv, mut c) = Server::start(None);
    c.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.go(b"");
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(matches!(
        srv.join().0,
        Ended::Served(TransmissionEnd::Closed)
    ));
}

#[test]
fn structured_reads_send_holes_as_holes() {
    for backend in BACKENDS {
        let (srv, mut c) = Server::on(backend, true);
        c.negotiate_structured(true);
        c.request(0, CMD_WRITE, 1, 65536, 4096, &[0xaa; 4096]);
        assert_eq!(c.status(), 0);
        // [0, 64K) hole, [64K, 68K) data, [68K, 128K) hole.
        c.request(0, CMD_READ, 2, 0, 131072, &[]);
        let ch = c.chunks();
        let mut covered = 0u64;
        let mut data_bytes = 0;
        for (i, x) in ch.iter().enumerate() {
            assert_eq!(x.cookie, 2);
            assert_eq!(x.flags & REPLY_FLAG_DONE != 0, i == ch.len() - 1);
            let off = be64(&x.payload[0..8]);
            match x.kind {
                REPLY_TYPE_OFFSET_HOLE => {
                    assert_eq!(off, covered);
                    covered += u64::from(be32(&x.payload[8..12]));
                }
                REPLY_TYPE_OFFSET_DATA => {
                    assert_eq!(off, covered);
                    let d = &x.payload[8..];
                    if off <= 65536 && off + d.len() as u64 >= 69632 {
                        let at = (65536 - off) as usize;
                        assert!(d[at..at + 4096].iter().all(|&b| b == 0xaa));
                    }
                    covered += d.len() as u64;
                    data_bytes += d.len();
                }
                k => panic!("unexpected chunk type {k}"),
            }
        }
        assert_eq!(covered, 131072);
        assert!(data_bytes < 131072, "holes must not be sent as zero bytes");
        // DF: exactly one data chunk with the zeroes in it.
        c.request(CMD_FLAG_DF, CMD_READ, 3, 0, 131072, &[]);
        let ch = c.chunks();
        assert_eq!(ch.len(), 1);
        assert_eq!(ch[0].kind, REPLY_TYPE_OFFSET_DATA);
        assert_eq!(ch[0].payload.len(), 8 + 131072);
        // An error to a read is a structured error chunk.
        c.request(0, CMD_READ, 4, SIZE, 1, &[]);
        let ch = c.chunks();
        assert_eq!(ch[0].kind, REPLY_TYPE_ERROR);
        assert_eq!(be32(&ch[0].payload), EINVAL);
        c.request(0, CMD_DISC, 1, 0, 0, &[]);
        srv.join();
    }
}

/// DF reads: one data chunk. DONE goes on it only when no error can come
/// after its header (one piece); a longer chunk is followed by a NONE
/// chunk, and a piece that fails inside it is padded with zeroes and
/// reported in an error chunk with its offset, after which the session
/// goes on (before, the server hung up).
#[test]
fn df_reads_end_with_done_only_when_no_error_can_follow() {
    const M: u64 = 1 << 20;
    let (srv, mut c) = Server::on(Backend::BadMemory, false);
    c.negotiate_structured(true);
    c.request(0, CMD_WRITE, 1, 2 * M, 4096, &[0xaa; 4096]);
    assert_eq!(c.status(), 0);
    // One piece: one data chunk, final.
    c.request(CMD_FLAG_DF, CMD_READ, 2, 0, 65536, &[]);
    let ch = c.chunks();
    assert_eq!(ch.len(), 1);
    assert_eq!(
        (ch[0].kind, ch[0].flags),
        (REPLY_TYPE_OFFSET_DATA, REPLY_FLAG_DONE)
    );
    // Four pieces: the data chunk, then NONE with DONE.
    c.request(CMD_FLAG_DF, CMD_READ, 3, 2 * M - M / 2, M as u32, &[]);
    let ch = c.chunks();
    let kinds: Vec<_> = ch.iter().map(|x| (x.kind, x.flags)).collect();
    assert_eq!(
        kinds,
        [
            (REPLY_TYPE_OFFSET_DATA, 0),
            (REPLY_TYPE_NONE, REPLY_FLAG_DONE)
        ]
    );
    assert_eq!(ch[0].payload.len(), 8 + M as usize);
    assert_eq!(
        &ch[0].payload[8 + (M / 2) as usize..][..4096],
        &[0xaa; 4096]
    );
    // Failing in its third piece: padded, then the error at that offset.
    c.request(CMD_FLAG_DF, CMD_READ, 4, BAD_FROM - M / 2, M as u32, &[]);
    let ch = c.chunks();
    assert_eq!(ch.len(), 2);
    assert_eq!((ch[0].kind, ch[0].flags), (REPLY_TYPE_OFFSET_DATA, 0));
    assert_eq!(ch[0].payload.len(), 8 + M as usize);
    assert!(
        ch[0].payload[8 + (M / 2) as usize..]
            .iter()
            .all(|&b| b == 0)
    );
    assert_eq!(
        (ch[1].kind, ch[1].flags),
        (REPLY_TYPE_ERROR_OFFSET, REPLY_FLAG_DONE)
    );
    assert_eq!(be32(&ch[1].payload), EIO);
    let at = ch[1].payload.len() - 8;
    assert_eq!(be64(&ch[1].payload[at..]), BAD_FROM);
    // The session goes on.
    c.request(0, CMD_READ, 5, 2 * M, 4096, &[]);
    let ch = c.chunks();
    assert_eq!(&ch[0].payload[8..], &[0xaa; 4096]);
    c.request(0, CMD_DISC, 1, 0, 0, &[]);
    assert!(matches!(srv.join().0, Ended::Served(_)));
}

#[test]
fn block_status_trim_and_zeroes() {
    for backend in BACKENDS {
        let (srv, mut c) = Server::on(backend, true);
        c.negotiate_structured(true);
        let extents = |c: &mut Client, flags: u16| -> Vec<(u32, u32)> {
            c.request(flags, CMD_BLOCK_STATUS, 9, 0, SIZE as u32, &[]);
            let ch = c.chunks();
            assert_eq!(ch.len(), 1);
            assert_eq!(ch[0].kind, REPLY_TYPE_BLOCK_STATUS);
            assert_eq!(be32(&ch[0].payload), META_ID_BASE_ALLOCATION);
            ch[0].payload[4..]
                .chunks_exact(8)
                .map(|d| (be32(&d[0..4]), be32(&d[4..8])))
                .collect()
        };
        assert_eq!(
            extents(&mut c, 0),
            vec![(SIZE as u32, STATE_HOLE | STATE_ZERO)]
        );
        c.request(0, CMD_WRITE, 1, 1 << 20, 65536, &[1u8; 65536]);
        assert_eq!(c.status(), 0);
        let e = extents(&mut c, 0);
        assert_eq!(e.iter().map(|x| u64::from(x.0)).sum::<u64>(), SIZE);
        assert!(e.iter().any(|x| x.1 == 0), "written range is data: {e:?}");
        // REQ_ONE: exactly one descriptor, not past the request.
        let one = extents(&mut c, CMD_FLAG_REQ_ONE);
        assert_eq!(one, vec![(1 << 20, STATE_HOLE | STATE_ZERO)]);
        // TRIM punches the data back into a hole.
        c.request(0, CMD_TRIM, 2, 1 << 20, 65536, &[]);
        assert_eq!(c.status(), 0);
        assert_eq!(
            extents(&mut c, 0),
            vec![(SIZE as u32, STATE_HOLE | STATE_ZERO)]
        );
        // WRITE_ZEROES (fast, and with NO_HOLE) reads back as zeroes.
        c.request(0, CMD_WRITE, 3, 0, 4096, &[9u8; 4096]);
        assert_eq!(c.status(), 0);
        c.request(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 4, 0, 4096, &[]);
        assert_eq!(c.status(), 0);
        // NO_HOLE over written data, so that zeroes prove it zeroed.
        c.request(0, CMD_WRITE, 5, 8192, 4096, &[7u8; 4096]);
        assert_eq!(c.status(), 0);
        c.request(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 5, 8192, 4096, &[]);
        assert_eq!(c.status(), 0);
        c.request(CMD_FLAG_DF, CMD_READ, 6, 0, 16384, &[]);
        let ch = c.chunks();
        assert!(ch[0].payload[8..].iter().all(|&b| b == 0));
        // WRITE_ZEROES past the end: ENOSPC.
        c.request(0, CMD_WRITE_ZEROES, 7, SIZE, 1, &[]);
        assert_eq!(c.status(), ENOSPC);
        c.request(0, CMD_CACHE, 8, 0, 4096, &[]);
        assert_eq!(c.status(), 0);
        c.request(0, CMD_DISC, 1, 0, 0, &[]);
        srv.join();
    }
}

#[test]
fn extended_headers_round_trip() {
    for backend in BACKENDS {
        let (srv, mut c) = Server::on(backend, true);
        c.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        assert_eq!(c.haggle(OPT_EXTENDED_HEADERS, &[])[0].kind, REP_ACK);
        c.haggle(OPT_SET_META_CONTEXT, &meta_data(b"", &[b"base:allocation"]));
        c.go(b"");
        let ext = |c: &mut Client,
                   flags: u16,
                   cmd: u16,
                   cookie: u64,
                   off: u64,
                   len: u64,
                   payload: &[u8]| {
            let mut m = EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec();
            m.extend_from_slice(&flags.to_be_bytes());
            m.extend_from_slice(&cmd.to_be_bytes());
            m.extend_from_slice(&cookie.to_be_bytes());
            m.extend_from_slice(&off.to_be_bytes());
            m.extend_from_slice(&len.to_be_bytes());
            m.extend_from_slice(payload);
            c.s.write_all(&m).unwrap();
        };
        let reply = |c: &mut Client| {
            let h = c.read_n(32);
            assert_eq!(be32(&h[0..4]), EXTENDED_REPLY_MAGIC);
            let len = be64(&h[24..32]) as usize;
            (
                be16(&h[4..6]),
                be16(&h[6..8]),
                be64(&h[8..16]),
                be64(&h[16..24]),
                c.read_n(len),
            )
        };
        ext(
            &mut c,
            CMD_FLAG_PAYLOAD_LEN,
            CMD_WRITE,
            1,
            4096,
            4,
            &[1, 2, 3, 4],
        );
        let (flags, kind, cookie, off, _) = reply(&mut c);
        assert_eq!(
            (flags, kind, cookie, off),
            (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, 4096)
        );
        // WRITE without PAYLOAD_LEN (as qemu sends it) still carries its data.
        ext(&mut c, 0, CMD_WRITE, 2, 8192, 4, &[5, 6, 7, 8]);
        let (_, kind, _, _, _) = reply(&mut c);
        assert_eq!(kind, REPLY_TYPE_NONE);
        // Another command with a payload: consumed, refused, framing kept.
        ext(&mut c, CMD_FLAG_PAYLOAD_LEN, CMD_TRIM, 6, 0, 3, &[1, 2, 3]);
        let (_, kind, cookie, _, p) = reply(&mut c);
        assert_eq!((kind, cookie, be32(&p)), (REPLY_TYPE_ERROR, 6, EINVAL));
        ext(&mut c, CMD_FLAG_DF, CMD_READ, 3, 4096, 4, &[]);
        let (_, kind, _, _, p) = reply(&mut c);
        assert_eq!(kind, REPLY_TYPE_OFFSET_DATA);
        assert_eq!(&p[8..], &[1, 2, 3, 4]);
        ext(&mut c, 0, CMD_BLOCK_STATUS, 4, 0, SIZE, &[]);
        let (_, kind, _, _, p) = reply(&mut c);
        assert_eq!(kind, REPLY_TYPE_BLOCK_STATUS_EXT);
        assert_eq!(be32(&p[0..4]), META_ID_BASE_ALLOCATION);
        let n = be32(&p[4..8]) as usize;
        assert_eq!(p.len(), 8 + 16 * n);
        let total: u64 = p[8..].chunks_exact(16).map(|d| be64(&d[0..8])).sum();
        assert_eq!(total, SIZE);
        ext(&mut c, 0, CMD_DISC, 5, 0, 0, &[]);
        assert!(matches!(
            srv.join().0,
            Ended::Served(TransmissionEnd::Disconnect)
        ));
    }
}

// --- TLS policy in negotiation ------------------------------------------------------

#[test]
fn tls_required_refuses_everything_but_starttls() {
    let (srv, mut c) = Server::start_with(None, Tls::Required);
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    for opt in [OPT_LIST, OPT_STRUCTURED_REPLY, OPT_INFO, OPT_GO, 99] {
        let r = c.haggle(opt, &info_data(b"", &[]));
        assert_eq!(r[0].kind, REP_ERR_TLS_REQD, "option {opt}");
    }
    assert_eq!(c.haggle(OPT_STARTTLS, &[])[0].kind, REP_ACK);
    let (ended, builds) = srv.join();
    hung(ended, "starttls");
    assert_eq!(builds, 0, "nothing is built before TLS");

    // EXPORT_NAME before TLS cannot be refused politely: hang up.
    let (srv, mut c) = Server::start_with(None, Tls::Required);
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    c.opt(OPT_EXPORT_NAME, b"");
    c.assert_closed();
    hung(srv.join().0, "before TLS");
}

#[test]
fn starttls_when_offered_and_again_when_active() {
    let (srv, mut c) = Server::start_with(None, Tls::Offered);
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    assert_eq!(c.haggle(OPT_STARTTLS, b"x")[0].kind, REP_ERR_INVALID);
    assert_eq!(c.haggle(OPT_STARTTLS, &[])[0].kind, REP_ACK);
    hung(srv.join().0, "starttls");

    // Once TLS is active (the round after the handshake), a second
    // STARTTLS is invalid.
    let (srv, mut c) = Server::start_with(None, Tls::Active);
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    assert_eq!(c.haggle(OPT_STARTTLS, &[])[0].kind, REP_ERR_INVALID);
    c.opt(OPT_ABORT, &[]);
    assert_eq!(c.reply().kind, REP_ACK);
    assert!(matches!(srv.join().0, Ended::Aborted));
}

#[test]
fn large_transfers_are_the_same_with_and_without_zero_copy() {
    for (zero_copy, backend) in [
        (true, Backend::Image),
        (false, Backend::Image),
        (true, Backend::Memory),
    ] {
        let (srv, mut c) = Server::on(backend, zero_copy);
        c.negotiate_structured(true);
        // 256 KiB of data at 1 MiB, then a 1 MiB read spanning hole, data,
        // hole, and a DF read of the data alone.
        let data: Vec<u8> = (0..262144u32).map(|i| (i * 7 % 253) as u8).collect();
        c.request(0, CMD_WRITE, 1, 1 << 20, data.len() as u32, &data);
        assert_eq!(c.status(), 0);
        c.request(0, CMD_READ, 2, (1 << 20) - 65536, 1 << 20, &[]);
        let mut image = vec![0xffu8; 1 << 20];
        for ch in c.chunks() {
            let off = (be64(&ch.payload[0..8]) - ((1 << 20) - 65536)) as usize;
            match ch.kind {
                REPLY_TYPE_OFFSET_DATA => {
                    let d = &ch.payload[8..];
                    image[off..off + d.len()].copy_from_slice(d);
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let n = be32(&ch.payload[8..12]) as usize;
                    image[off..off + n].fill(0);
                }
                k => panic!("chunk type {k}"),
            }
        }
        assert!(
            image[..65536].iter().all(|&b| b == 0),
            "zero_copy={zero_copy}"
        );
        assert_eq!(
            &image[65536..65536 + data.len()],
            &data[..],
            "zero_copy={zero_copy}"
        );
        assert!(image[65536 + data.len()..].iter().all(|&b| b == 0));
        c.request(CMD_FLAG_DF, CMD_READ, 3, 1 << 20, data.len() as u32, &[]);
        let ch = c.chunks();
        assert_eq!(ch.len(), 1);
        assert_eq!(&ch[0].payload[8..], &data[..]);
        c.request(0, CMD_DISC, 4, 0, 0, &[]);
        assert!(matches!(
            srv.join().0,
            Ended::Served(TransmissionEnd::Disconnect)
        ));

        // Simple replies too.
        let (srv, mut c) = Server::on(backend, zero_copy);
        c.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        c.go(b"");
        c.request(0, CMD_WRITE, 1, 65536, data.len() as u32, &data);
        assert_eq!(c.simple(), (0, 1));
        c.request(0, CMD_READ, 2, 65536, data.len() as u32, &[]);
        assert_eq!(c.simple(), (0, 2));
        assert_eq!(c.read_n(data.len()), data);
        // A large write past the end is refused and its payload consumed.
        c.request(0, CMD_WRITE, 3, SIZE - 4096, data.len() as u32, &data);
        assert_eq!(c.simple(), (ENOSPC, 3));
        c.request(0, CMD_DISC, 4, 0, 0, &[]);
        assert!(matches!(
            srv.join().0,
            Ended::Served(TransmissionEnd::Disconnect)
        ));
    }
}

#[test]
fn nothing_negotiated_before_starttls_survives_it() {
    // CVE-2021-3716: state from the plaintext round must not leak into the
    // encrypted one. The second round here runs on the same socket (the
    // real server wraps it in TLS first; the state logic is the same).
    let (a, b) = UnixStream::pair().unwrap();
    b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let server = std::thread::spawn(move || {
        let mut ex = TestExports::new(Backend::Image, None);
        let mut s = Stream::new(Copying(a));
        let nz = handshake(&mut s).unwrap();
        assert!(matches!(
            negotiate(&mut s, &mut ex, nz, Tls::Offered),
            Ok(NegotiationEnd::StartTls)
        ));
        let r = negotiate(&mut s, &mut ex, nz, Tls::Active);
        s.flush().unwrap();
        match r {
            Ok(NegotiationEnd::Go(n)) => n,
            _ => panic!("second round must end in GO"),
        }
    });
    let mut c = Client { s: b };
    c.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    assert_eq!(c.haggle(OPT_STRUCTURED_REPLY, &[])[0].kind, REP_ACK);
    let r = c.haggle(OPT_SET_META_CONTEXT, &meta_data(b"", &[b"base:allocation"]));
    assert_eq!(r[0].kind, REP_META_CONTEXT);
    assert_eq!(c.haggle(OPT_STARTTLS, &[])[0].kind, REP_ACK);
    // "TLS is up": go straight to GO without renegotiating anything.
    let go = c.go(b"");
    let export = go.iter().find(|r| r.kind == REP_INFO).unwrap();
    assert_eq!(
        be16(&export.data[10..12]) & TFLAG_SEND_DF,
        0,
        "structured replies from before STARTTLS must be forgotten"
    );
    let n = server.join().unwrap();
    assert_eq!(n.replies, Replies::Simple);
    assert!(
        !n.base_allocation,
        "meta contexts from before STARTTLS must be forgotten"
    );
}

#[test]
fn pipelined_large_writes_are_done_before_anything_after_them() {
    for backend in BACKENDS {
        // A read pipelined right behind large (spliced) writes must see all of
        // them, in order (the last write wins).
        let (srv, mut c) = Server::on(backend, true);
        c.negotiate_structured(false);
        let block = |v: u8| vec![v; 256 * 1024];
        let mut all = Vec::new();
        for (cookie, v) in [(1u64, 1u8), (2, 2), (3, 3), (4, 4), (5, 5)] {
            // Writes 1-4 at consecutive offsets, write 5 over write 2.
            let off = if v == 5 {
                256 * 1024
            } else {
                u64::from(v - 1) * 256 * 1024
            };
            let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
            m.extend_from_slice(&0u16.to_be_bytes());
            m.extend_from_slice(&CMD_WRITE.to_be_bytes());
            m.extend_from_slice(&cookie.to_be_bytes());
            m.extend_from_slice(&off.to_be_bytes());
            m.extend_from_slice(&(256u32 * 1024).to_be_bytes());
            m.extend_from_slice(&block(v));
            all.extend(m);
        }
        let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&CMD_FLAG_DF.to_be_bytes());
        m.extend_from_slice(&CMD_READ.to_be_bytes());
        m.extend_from_slice(&9u64.to_be_bytes());
        m.extend_from_slice(&0u64.to_be_bytes());
        m.extend_from_slice(&(1024u32 * 1024).to_be_bytes());
        all.extend(m);
        let mut w = c.s.try_clone().unwrap();
        let sender = std::thread::spawn(move || w.write_all(&all).unwrap());
        let mut statuses = Vec::new();
        let mut data = None;
        while data.is_none() || statuses.len() < 5 {
            let magic = c.read_n(4);
            if be32(&magic) == SIMPLE_REPLY_MAGIC {
                let rest = c.read_n(12);
                assert_eq!(be32(&rest[0..4]), 0, "write failed");
                statuses.push(be64(&rest[4..12]));
            } else {
                let rest = c.read_n(16);
                let payload = c.read_n(be32(&rest[12..16]) as usize);
                assert_eq!(be16(&rest[2..4]), REPLY_TYPE_OFFSET_DATA);
                assert_eq!(be64(&rest[4..12]), 9);
                data = Some(payload[8..].to_vec());
            }
        }
        sender.join().unwrap();
        statuses.sort();
        assert_eq!(statuses, vec![1, 2, 3, 4, 5]);
        let data = data.unwrap();
        let expect: Vec<u8> = [1u8, 5, 3, 4].iter().flat_map(|&v| block(v)).collect();
        assert!(
            data == expect,
            "the read did not see the writes before it, in order"
        );
        c.request(0, CMD_DISC, 10, 0, 0, &[]);
        assert!(matches!(
            srv.join().0,
            Ended::Served(TransmissionEnd::Disconnect)
        ));
    }
}

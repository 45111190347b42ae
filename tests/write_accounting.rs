//! Every byte a client writes is either stored or answered with an error.
//!
//! A block device that once says "written" for data it dropped cannot be
//! trusted with anything. These tests fill a small tmpfs (the tmpdir) to
//! the last page, so that the next write can only be partly stored, and
//! check that each path that moves client data into the image (a small
//! write copied through our buffer, a large one received partly from the
//! buffer and partly by splice, and TLS) answers such a write with ENOSPC.
//! How we know a failure was due: the test leaves exactly two free pages
//! (statvfs says so) and the write needs seven new ones.
//!
//! A model-based test then lets several clients write, trim and zero at
//! random on a tmpfs too small for all of them, and checks that every byte
//! acknowledged as written reads back.

use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::common::nbdraw::{self, Framing, Reply};
use crate::common::*;

const PAGE: u64 = 4096;

/// Fills the filesystem at `dir` with a file until it is full, then frees
/// exactly `pages` pages of it. Returns the filler (kept open so its space
/// stays taken).
fn fill_leaving(dir: &Path, pages: u64) -> File {
    let path = dir.join("filler");
    let mut f = File::create(&path).unwrap();
    let chunk = vec![0x77u8; 1 << 20];
    let mut len = 0u64;
    for size in [1 << 20, PAGE as usize] {
        loop {
            match f.write(&chunk[..size]) {
                Ok(0) => break,
                Ok(n) => len += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", dir.display()),
            }
        }
    }
    let keep = (len / PAGE)
        .checked_sub(pages)
        .expect("the filler is too small")
        * PAGE;
    f.set_len(keep).unwrap();
    // The filler is unlinked: only the open fd keeps its pages, so nothing
    // is left if the test fails.
    std::fs::remove_file(&path).unwrap();
    let free = statfs_bytes(dir, "%f");
    assert_eq!(
        free,
        pages * PAGE,
        "the tmpfs must have exactly {pages} free pages"
    );
    f
}

/// A raw client of a `--unix` server in `dir`, negotiated with `framing`.
fn client(dir: &TestDir, framing: Framing) -> UnixStream {
    let mut s = UnixStream::connect(dir.join("nbd.sock")).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.set_write_timeout(Some(DEADLINE)).unwrap();
    nbdraw::negotiate(&mut s, framing, false).expect("negotiating");
    s
}

/// WRITE and its reply's error number (0: success).
fn write(s: &mut UnixStream, framing: Framing, cookie: u64, offset: u64, data: &[u8]) -> u32 {
    let req = nbdraw::request(
        framing,
        0,
        nbdraw::CMD_WRITE,
        cookie,
        offset,
        data.len() as u64,
        data,
    );
    s.write_all(&req).unwrap();
    let r = nbdraw::read_replies(s, framing, None).unwrap();
    assert_eq!(r.last().unwrap().cookie(), cookie);
    r.last().unwrap().error()
}

/// READ of `len` bytes at `offset`, holes filled in as zeroes.
fn read(s: &mut UnixStream, framing: Framing, cookie: u64, offset: u64, len: usize) -> Vec<u8> {
    let req = nbdraw::request(
        framing,
        0,
        nbdraw::CMD_READ,
        cookie,
        offset,
        len as u64,
        &[],
    );
    s.write_all(&req).unwrap();
    let replies = nbdraw::read_replies(s, framing, Some(len)).unwrap();
    assemble(&replies, offset, len)
}

/// The bytes a successful READ reply carries (simple data, or data and
/// hole chunks).
fn assemble(replies: &[Reply], offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for r in replies {
        assert_eq!(r.error(), 0, "READ failed: {r:?}");
        match r {
            Reply::Simple { data, .. } => out.copy_from_slice(data),
            Reply::Chunk { kind, payload, .. } if *kind == nbdraw::REPLY_TYPE_OFFSET_DATA => {
                let at = u64::from_be_bytes(payload[..8].try_into().unwrap()) - offset;
                out[at as usize..at as usize + payload.len() - 8].copy_from_slice(&payload[8..]);
            }
            // Holes read as the zeroes `out` starts with.
            _ => {}
        }
    }
    out
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed ^ (i as u8).wrapping_mul(31))
        .collect()
}

/// The serving process of the one client of `server`.
fn serving_child(server: &Server) -> u32 {
    wait_live_children(server.pid(), 1, "one client connected")[0]
}

/// One deterministic case: a tmpfs tmpdir, a disk whose pages
/// `allocated` hold data, the tmpfs filled to two free pages, then a WRITE
/// of `pages` pages at offset 0 sent in one piece while the server is
/// stopped (so that its first read takes as much of the payload as its
/// buffer holds). It needs more new pages than there are: the reply must
/// be ENOSPC.
fn partly_storable_write(name: &str, pages: u64, allocated: &[u64]) {
    require_root("it mounts a small tmpfs as the tmpdir");
    let dir = TestDir::new(name);
    let mnt = Mount::tmpfs(&dir.join("mnt"), 16);
    let server = Server::start_in(
        &dir,
        Mode::Unix,
        mnt.path(),
        &["--min-free", "0", "--command", "true", "4M"],
        &[],
    );
    let framing = Framing::Structured;
    let mut s = client(&dir, framing);
    for &p in allocated {
        assert_eq!(
            write(&mut s, framing, p, p * PAGE, &[0xee; PAGE as usize]),
            0
        );
    }
    let holes = pages - allocated.len() as u64;
    assert!(holes > 2, "the case must need more than the two free pages");
    let filler = fill_leaving(mnt.path(), 2);

    let data = pattern(0x3c, (pages * PAGE) as usize);
    let req = nbdraw::request(
        framing,
        0,
        nbdraw::CMD_WRITE,
        99,
        0,
        data.len() as u64,
        &data,
    );
    let child = serving_child(&server);
    send_signal(child, libc::SIGSTOP);
    s.write_all(&req).unwrap();
    send_signal(child, libc::SIGCONT);
    let replies = nbdraw::read_replies(&mut s, framing, None).unwrap();
    let last = replies.last().unwrap();
    let back = read(&mut s, framing, 100, 0, data.len());
    let wrong = (0..pages as usize)
        .filter(|&p| back[p * 4096..(p + 1) * 4096] != data[p * 4096..(p + 1) * 4096])
        .count();
    assert_eq!(
        last.error(),
        nbdraw::NBD_ENOSPC,
        "a write of {pages} pages needing {holes} new ones, with 2 free, must fail with ENOSPC; \
         got {last:?}, and {wrong} of {pages} pages read back wrong"
    );
    // The session went on (the read above), and the log counts the
    // failure.
    drop(s);
    drop(filler);
    server_log_counts_disk_errors(&server);
}

fn server_log_counts_disk_errors(server: &Server) {
    wait_no_image_holders(server.images(), "after the client left");
    let end = std::time::Instant::now() + DEADLINE;
    while !server.proc.stderr().contains("client left") {
        assert!(
            std::time::Instant::now() < end,
            "{}",
            server.proc.describe()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let log = server.proc.stderr();
    assert!(
        log.contains("the disk failed a request") && !log.contains("disk_errors=0"),
        "the failed write must be logged and counted\n{log}"
    );
}

/// A write below the zero-copy size is copied through our buffer and
/// written with one positional write loop.
#[test]
fn small_write_that_does_not_fit_is_enospc() {
    partly_storable_write("acct-small", 8, &[7]);
}

/// The part of a large write that arrived with its header is written from
/// the read buffer: seven hole pages at the start, in that part. Before the
/// fix its short pwrite was ignored, the spliced rest succeeded and the
/// client was told "written" with 6 of 16 pages wrong.
#[test]
fn large_write_whose_buffered_part_does_not_fit_is_enospc() {
    partly_storable_write("acct-buffered", 16, &[7, 8, 9, 10, 11, 12, 13, 14, 15]);
}

/// The rest of a large write is spliced from the socket into the image:
/// seven hole pages at the end, in that part.
#[test]
fn large_write_whose_spliced_part_does_not_fit_is_enospc() {
    partly_storable_write("acct-spliced", 16, &[0, 1, 2, 3, 4, 5, 6, 7, 8]);
}

/// Through TLS every payload passes through the cipher and our buffer.
#[test]
fn tls_write_that_does_not_fit_is_enospc() {
    require_root("it mounts a small tmpfs as the tmpdir");
    require(&["python3-nbd"]);
    let dir = TestDir::new("acct-tls");
    let pki = crate::common::pki::pki(&dir);
    let mnt = Mount::tmpfs(&dir.join("mnt"), 16);
    let server = Server::start_in(
        &dir,
        Mode::Tcp,
        mnt.path(),
        &[
            "--tls",
            "require",
            "--tls-certificates",
            pki.server.to_str().unwrap(),
            "--min-free",
            "0",
            "--command",
            "true",
            "4M",
        ],
        &[],
    );
    let port = server.uri().rsplit(':').next().unwrap().to_string();
    let uri = format!(
        "nbds://localhost:{port}/?tls-certificates={}",
        pki.client.to_str().unwrap()
    );
    let script = r#"
import errno
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
check(h.get_tls_negotiated(), "TLS not negotiated")
P = 4096
for p in range(7, 16):
    h.pwrite(b'\xee' * P, p * P)
print('FILL', flush=True)
sys.stdin.readline()
data = bytes((0x3c ^ (i * 31)) & 0xff for i in range(16 * P))
for size in (8 * P, 16 * P, 64 * P):
    try:
        h.pwrite(data[:size] if size <= len(data) else data * (size // len(data)), 0)
        back = h.pread(size, 0)
        sys.exit("ASSERTION FAILED: a TLS write of %d bytes needing new pages was acknowledged "
                 "with 2 pages free; it reads back %s" % (size, "equal" if back[:len(data)] == data[:size] else "different"))
    except nbd.Error as e:
        check(e.errnum == errno.ENOSPC, "expected ENOSPC, got %r" % (e,))
print('OK', flush=True)
h.shutdown()
"#;
    let mut c = Proc::spawn_with_stdin("python libnbd TLS client", python(script, &[&uri]));
    c.wait_stdout("FILL", DEADLINE);
    let filler = fill_leaving(mnt.path(), 2);
    c.send("go\n");
    let status = c.wait();
    drop(filler);
    assert!(
        status.success() && c.stdout().contains("OK"),
        "{}",
        c.describe()
    );
    server_log_counts_disk_errors(&server);
}

// --- the model --------------------------------------------------------------------

/// xorshift64*: small, seedable, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What a client knows of its disk: the bytes it was told were stored
/// (`known`), the rest unknown (a write that failed may have stored part).
struct Model {
    bytes: Vec<u8>,
    known: Vec<bool>,
}

impl Model {
    fn set(&mut self, offset: u64, data: Option<&[u8]>, len: usize) {
        let r = offset as usize..offset as usize + len;
        match data {
            Some(d) => self.bytes[r.clone()].copy_from_slice(d),
            None => self.bytes[r.clone()].fill(0),
        }
        self.known[r].fill(true);
    }
    fn forget(&mut self, offset: u64, len: usize) {
        self.known[offset as usize..offset as usize + len].fill(false);
    }
    fn check(&self, disk: &[u8], who: &str) {
        let bad: Vec<usize> = (0..disk.len())
            .filter(|&i| self.known[i] && disk[i] != self.bytes[i])
            .collect();
        assert!(
            bad.is_empty(),
            "{who}: {} acknowledged bytes read back wrong, first at offset {} \
             (expected {:#x}, read {:#x})",
            bad.len(),
            bad[0],
            self.bytes[bad[0]],
            disk[bad[0]]
        );
    }
}

const DISK: u64 = 8 << 20;

/// One client's random run of `ops` writes, trims and zeroes on a disk
/// whose bytes are `start` (its length a multiple of 1 MiB), checked
/// against a model as it goes; returns (writes acknowledged, writes
/// refused).
pub(crate) fn model_client(
    dir: &TestDir,
    framing: Framing,
    seed: u64,
    ops: usize,
    start: Vec<u8>,
) -> (u64, u64) {
    let who = format!("client {framing:?} seed {seed:#x}");
    let disk = start.len() as u64;
    let mut rng = Rng(seed | 1);
    let mut s = client(dir, framing);
    let mut m = Model {
        known: vec![true; start.len()],
        bytes: start,
    };
    let (mut stored, mut refused) = (0, 0);
    let mut cookie = 0u64;
    let mut done = 0;
    while done < ops {
        // A pipelined batch of one to eight requests, answered in order.
        let batch = 1 + rng.below(8) as usize;
        let mut sent = Vec::new();
        let mut wire = Vec::new();
        for _ in 0..batch {
            cookie += 1;
            let len = match rng.below(4) {
                0 => 1 + rng.below(8192),
                1 => PAGE * (1 + rng.below(16)),
                2 => 65536 + rng.below(200_000),
                _ => PAGE * (16 + rng.below(112)),
            };
            let offset = match rng.below(2) {
                0 => rng.below(disk - len),
                _ => rng.below((disk - len) / PAGE) * PAGE,
            };
            let (cmd, data) = match rng.below(10) {
                0..=6 => {
                    let d: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                    (nbdraw::CMD_WRITE, Some(d))
                }
                7 | 8 => (nbdraw::CMD_TRIM, None),
                _ => (nbdraw::CMD_WRITE_ZEROES, None),
            };
            wire.extend(nbdraw::request(
                framing,
                0,
                cmd,
                cookie,
                offset,
                len,
                data.as_deref().unwrap_or(&[]),
            ));
            sent.push((cookie, cmd, offset, len as usize, data));
        }
        s.write_all(&wire).unwrap();
        for (cookie, cmd, offset, len, data) in sent {
            let r = nbdraw::read_replies(&mut s, framing, None).unwrap();
            let last = r.last().unwrap();
            assert_eq!(last.cookie(), cookie, "{who}: replies out of order");
            match (cmd, last.error()) {
                (nbdraw::CMD_WRITE, 0) => {
                    stored += 1;
                    m.set(offset, data.as_deref(), len);
                }
                (nbdraw::CMD_WRITE, nbdraw::NBD_ENOSPC) => {
                    refused += 1;
                    m.forget(offset, len);
                }
                // TRIM punches a hole; WRITE_ZEROES without NO_HOLE too.
                (_, 0) => m.set(offset, None, len),
                (_, e) => panic!("{who}: command {cmd} failed with NBD error {e}"),
            }
            done += 1;
        }
        if done % 100 < 8 {
            check_disk(&mut s, framing, &mut cookie, &m, &who);
        }
    }
    check_disk(&mut s, framing, &mut cookie, &m, &who);
    (stored, refused)
}

fn check_disk(s: &mut UnixStream, framing: Framing, cookie: &mut u64, m: &Model, who: &str) {
    let mut disk = Vec::with_capacity(m.bytes.len());
    let step = 1 << 20;
    for off in (0..m.bytes.len() as u64).step_by(step) {
        *cookie += 1;
        disk.extend(read(s, framing, *cookie, off, step));
    }
    m.check(&disk, who);
}

/// A random seed, or TMPDISK_MODEL_SEED's (hex), printed so that a failing
/// run can be repeated.
pub(crate) fn model_seed() -> u64 {
    let seed = std::env::var("TMPDISK_MODEL_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("model seed {seed:#x} (rerun with TMPDISK_MODEL_SEED={seed:x})");
    seed
}

#[test]
fn every_acknowledged_byte_reads_back_when_the_tmpdir_fills() {
    require_root("it mounts a small tmpfs as the tmpdir");
    let seed = model_seed();
    // Declared first so it is dropped last, after the server and the
    // tmpfs mounted inside it (a busy mount point cannot be removed).
    let dir = std::sync::Arc::new(TestDir::new("acct-model"));
    // Three 8 MiB disks on 12 MiB: they cannot all fit.
    let mnt = Mount::tmpfs(&dir.join("mnt"), 12);
    let _server = Server::start_in(
        &dir,
        Mode::Unix,
        mnt.path(),
        &["--min-free", "0", "--command", "true", "8M"],
        &[],
    );
    let clients: Vec<_> = [Framing::Simple, Framing::Structured, Framing::Extended]
        .into_iter()
        .enumerate()
        .map(|(i, framing)| {
            let dir = dir.clone();
            let seed = seed.wrapping_add(i as u64 * 0x9e37_79b9_7f4a_7c15);
            std::thread::spawn(move || {
                model_client(&dir, framing, seed, 600, vec![0; DISK as usize])
            })
        })
        .collect();
    let (mut stored, mut refused) = (0, 0);
    for c in clients {
        let (s, r) = c
            .join()
            .expect("a model client failed (see its message above)");
        stored += s;
        refused += r;
    }
    eprintln!("{stored} writes acknowledged, {refused} refused with ENOSPC");
    assert!(
        refused > 0 && stored > refused,
        "the run must both fill the tmpdir and keep writing: {stored} stored, {refused} refused"
    );
}

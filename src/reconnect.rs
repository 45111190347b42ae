//! Reconnect: a client that names its disk with a token (`NAME:id=TOKEN`)
//! gets the same disk back after its connection drops, within a grace
//! period, instead of a fresh one under its mounted filesystem.
//!
//! Every connection still has its own process. The process serving a
//! tokened disk (the *holder*) listens on a Unix socket in the reconnect
//! directory, named by a hash of the export name, token and TLS subject
//! (the [`Key`]): only a client that knows all three finds it. A new
//! connection naming the same (the *taker*) connects there and proves the
//! key; the holder drops its old connection (it may still look alive: a
//! half-open TCP connection after a network loss), hands over the disk's
//! open files with `SCM_RIGHTS`, and exits; the taker serves on.
//!
//! The listening socket goes to the taker with the disk, so its name is
//! answered for as long as the disk lives, and is never removed: when a
//! disk ends (a clean `NBD_CMD_DISC`, a grace that ran out, a killed
//! holder), the name stays, unanswered, and a later connection naming
//! that token is refused rather than given a fresh disk under a mounted
//! filesystem. A token is for one disk.
//!
//! The handover's bytes are parsed by [`crate::handover`]; this module
//! moves them and the files.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::handover::{self, Offer, REQUEST_LEN};

/// How reconnects are kept: for how long, and where the holders listen.
#[derive(Debug, Clone)]
pub struct Settings {
    pub grace: Duration,
    pub dir: PathBuf,
}

/// What identifies a reconnectable disk: SHA-256 of the export name as the
/// client sent it (token included) and the TLS subject, if any. A client
/// that knows less computes another key, and finds nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; 32]);

impl Key {
    pub fn new(export_name: &str, tls_subject: Option<&[u8]>) -> Key {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"tmpdisk reconnect key v1\0");
        ctx.update(export_name.as_bytes());
        ctx.update(b"\0");
        if let Some(s) = tls_subject {
            ctx.update(b"tls\0");
            ctx.update(s);
        }
        let mut k = [0; 32];
        k.copy_from_slice(ctx.finish().as_ref());
        Key(k)
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The holder's socket name: 128 bits of the key, in hex.
    fn file_name(&self) -> String {
        hex(&self.0[..16])
    }

    /// For logs: 8 hex digits of a hash of the key (not of the file name,
    /// so a log reader learns nothing that finds the socket).
    pub fn short(&self) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, &self.0);
        hex(&d.as_ref()[..4])
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({})", self.short())
    }
}

/// Bytes as lowercase hex digits.
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Compare two keys in time that does not depend on where they differ.
fn same_key(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// What a taker found for its key.
pub enum Claim {
    /// No disk has this key: a fresh one may be made.
    Nothing,
    /// A disk had this key and is gone (or is being taken by another
    /// connection): the client must not get a fresh one under that name.
    Gone,
    /// The disk, handed over.
    Disk(Handed),
}

/// A disk's files as a holder handed them over.
pub struct Handed {
    pub offer: Offer,
    pub files: Vec<OwnedFd>,
    /// The holder's listening socket, for [`Holder::adopt`].
    pub listener: OwnedFd,
    /// For an overlay: the client's blocks.
    pub owned: Vec<u8>,
    /// How long the disk waited for its client, as the holder said.
    pub waited_ms: u64,
}

/// How long a taker waits for a holder's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a holder waits for a connection's whole request: a taker
/// sends its 37 bytes as soon as it connects. Short, because one
/// connection is read at a time: a local user who connects and says
/// nothing, or trickles a byte at a time (socket names are visible in
/// /proc/net/unix), delays a real taker by this much per such
/// connection.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// Ask the holder of `key`, if any, for its disk. `size` is the export's:
/// an overlay must be that size, which also bounds its block map.
pub fn claim(settings: &Settings, key: &Key, size: u64) -> io::Result<Claim> {
    let path = settings.dir.join(key.file_name());
    // Within the answer's time: a holder whose backlog is full (someone
    // keeping it busy) would otherwise keep a blocking connect for ever.
    let mut s = match crate::sys::connect_unix_within(&path, ANSWER_TIMEOUT) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Claim::Nothing),
        // A name nobody listens on: its disk is gone.
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(Claim::Gone),
        Err(e) => return Err(e),
    };
    s.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    s.set_write_timeout(Some(ANSWER_TIMEOUT))?;
    s.write_all(&handover::request(key.bytes()))?;
    let mut head = [0u8; handover::OFFER_LEN];
    let (n, mut files) = match crate::sys::recv_with_files(s.as_fd(), &mut head) {
        Ok(got) => got,
        // No answer in time: the holder is not handing over.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Claim::Gone),
        Err(e) => return Err(e),
    };
    // The holder closed without an offer: another connection took the
    // disk first, or the holder is ending.
    if n == 0 {
        return Ok(Claim::Gone);
    }
    if n < head.len() {
        s.read_exact(&mut head[n..])?;
    }
    let bad = |e: String| io::Error::new(io::ErrorKind::InvalidData, e);
    let offer = handover::decode_offer(&head, files.len()).map_err(|e| bad(e.to_string()))?;
    if matches!(offer.kind, handover::Kind::Overlay { .. }) && offer.size != size {
        return Err(bad(format!(
            "an overlay of {} bytes for an export of {size}",
            offer.size
        )));
    }
    let mut owned = vec![0u8; offer.owned_len()];
    s.read_exact(&mut owned)?;
    // The last file is the listening socket: the name goes with the disk.
    let listener = files
        .pop()
        .ok_or_else(|| bad("no listening socket".into()))?;
    Ok(Claim::Disk(Handed {
        waited_ms: offer.waited_ms,
        offer,
        files,
        listener,
        owned,
    }))
}

/// A taker that proved the key, waiting for the disk.
type Taker = Arc<(Mutex<Option<UnixStream>>, Condvar)>;

/// The holder of a tokened disk: its listening socket, and whoever came to
/// take it.
pub struct Holder {
    /// A duplicate of the listening socket (the thread has the other):
    /// handed to the taker with the disk, else shut down on drop, which
    /// ends the thread and leaves the name unanswered.
    listener: Option<OwnedFd>,
    taker: Taker,
    /// The key's hash for logs ([`Key::short`]).
    key_short: String,
}

impl Holder {
    /// Listen for takers of `key`. `connection` is a duplicate of the
    /// client's connection, shut down when a taker proves the key so that
    /// serving ends even on a connection that still looks alive. Fails
    /// with `AddrInUse` when the name exists (another holder, or a disk
    /// that has ended).
    pub fn listen(settings: &Settings, key: &Key, connection: OwnedFd) -> io::Result<Holder> {
        ensure_shared_dir(&settings.dir, Listing::Hidden)?;
        let path = settings.dir.join(key.file_name());
        let listener = UnixListener::bind(&path)?;
        // Takers run as other users under systemd (DynamicUser=): they must
        // be able to connect. The key is what protects the disk: socket
        // names are visible to every local user in /proc/net/unix.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        Self::start(listener, key, connection)
    }

    /// Go on holding a disk on the listening socket its last holder handed
    /// over.
    pub fn adopt(listener: OwnedFd, key: &Key, connection: OwnedFd) -> io::Result<Holder> {
        Self::start(UnixListener::from(listener), key, connection)
    }

    fn start(listener: UnixListener, key: &Key, connection: OwnedFd) -> io::Result<Holder> {
        let dup = listener.as_fd().try_clone_to_owned()?;
        let taker: Taker = Arc::new((Mutex::new(None), Condvar::new()));
        let found = taker.clone();
        let want = key.clone();
        // The serving filter (seccomp, all threads) comes soon after: the
        // thread must be through its start-up first (glibc registers rseq
        // and the robust list in the new thread, calls the filter denies).
        let (started, running) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("reconnect".into())
            .spawn(move || {
                let _ = started.send(());
                wait_for_taker(listener, want, connection, found)
            })?;
        running
            .recv()
            .map_err(|_| io::Error::other("the reconnect thread did not start"))?;
        Ok(Holder {
            listener: Some(dup),
            taker,
            key_short: key.short(),
        })
    }

    /// The held key's hash, for logs.
    pub fn key_short(&self) -> &str {
        &self.key_short
    }

    /// Whether a taker has proved the key (the connection was shut down
    /// for it).
    pub fn taken(&self) -> bool {
        self.taker.0.lock().map(|t| t.is_some()).unwrap_or(false)
    }

    /// Wait up to `grace` for a taker; `tick` is called every few seconds
    /// with the time left (for the status line).
    pub fn wait(&self, grace: Duration, mut tick: impl FnMut(Duration)) -> Option<UnixStream> {
        let end = Instant::now() + grace;
        let (lock, cv) = &*self.taker;
        let mut t = lock.lock().ok()?;
        loop {
            if let Some(s) = t.take() {
                return Some(s);
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            tick(left);
            t = cv.wait_timeout(t, left.min(Duration::from_secs(5))).ok()?.0;
        }
    }

    /// Give the disk to `taker`: the offer with the disk's files and the
    /// listening socket, then the overlay's blocks. If this fails, the
    /// listening socket is shut down with the holder: the name stays
    /// unanswered and the disk is gone, never replaced by a fresh one.
    pub fn hand_over(
        mut self,
        mut taker: UnixStream,
        offer: &Offer,
        files: &[std::os::fd::BorrowedFd<'_>],
        owned: &[u8],
    ) -> io::Result<()> {
        let listener = self
            .listener
            .as_ref()
            .ok_or_else(|| io::Error::other("no listening socket"))?;
        // A taker that proved the key and then stops reading must not keep
        // this process (and the disk) past the grace period: each send
        // waits at most this long.
        taker.set_write_timeout(Some(ANSWER_TIMEOUT))?;
        let mut all = files.to_vec();
        all.push(listener.as_fd());
        let head = handover::encode_offer(offer);
        let sent = crate::sys::send_with_files(taker.as_fd(), &head, &all)?;
        taker.write_all(&head[sent..])?;
        taker.write_all(owned)?;
        // The taker has the listening socket now: ours must not shut it.
        self.listener = None;
        Ok(())
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Some(l) = &self.listener {
            // Wakes the thread's accept (EINVAL), which ends it.
            let _ = nix::sys::socket::shutdown(l.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
    }
}

/// How long the holder's thread waits after an accept that failed for
/// want of a resource.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The holder's thread: accept connections until one proves the key,
/// then shut the client's connection down and hand the taker to the
/// serving thread.
fn wait_for_taker(listener: UnixListener, key: Key, connection: OwnedFd, found: Taker) {
    for s in listener.incoming() {
        let mut s = match s {
            Ok(s) => s,
            // The holder shut the socket down: it is done.
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => return,
            // A connection that went before it was accepted: the next.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) =>
            {
                continue;
            }
            // Out of fds or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM): the
            // same error again at once, so pause rather than spin a core.
            Err(_) => {
                std::thread::sleep(ACCEPT_RETRY);
                continue;
            }
        };
        let mut req = [0u8; REQUEST_LEN];
        let proved = read_exact_within(&mut s, &mut req, REQUEST_TIMEOUT).is_ok()
            && handover::decode_request(&req).is_ok_and(|k| same_key(&k, key.bytes()));
        if !proved {
            continue;
        }
        let _ =
            nix::sys::socket::shutdown(connection.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let (lock, cv) = &*found;
        if let Ok(mut t) = lock.lock() {
            *t = Some(s);
            cv.notify_all();
        }
        // One disk, one taker at a time: the next one is accepted by the
        // process the listening socket goes to.
        return;
    }
}

/// Fill `buf` from `s` within `limit` in all (a read timeout alone
/// restarts with every byte that comes).
fn read_exact_within(s: &mut UnixStream, buf: &mut [u8], limit: Duration) -> io::Result<()> {
    let end = Instant::now() + limit;
    let mut got = 0;
    while got < buf.len() {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether anyone may list a shared directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listing {
    /// `1733`: the names are secrets (the reconnect directory).
    Hidden,
    /// `1777`: the names mean nothing (the registry).
    Listable,
}

/// A directory that processes running as different users share (the
/// reconnect directory, the registry): made if missing, sticky, so that
/// each can make its own names and nobody can remove another's.
pub(crate) fn ensure_shared_dir(dir: &Path, listing: Listing) -> io::Result<()> {
    let mode = match listing {
        Listing::Hidden => 0o1733,
        Listing::Listable => 0o1777,
    };
    match std::fs::create_dir(dir) {
        Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_name_token_and_subject() {
        let a = Key::new("scratch:id=3f9c2d7e1a4b5c6d8e9f0a1b2c3d4e5f", None);
        assert_eq!(
            a,
            Key::new("scratch:id=3f9c2d7e1a4b5c6d8e9f0a1b2c3d4e5f", None)
        );
        for other in [
            Key::new("scratch:id=3f9c2d7e1a4b5c6d8e9f0a1b2c3d4e5e", None),
            Key::new("other:id=3f9c2d7e1a4b5c6d8e9f0a1b2c3d4e5f", None),
            Key::new(
                "scratch:id=3f9c2d7e1a4b5c6d8e9f0a1b2c3d4e5f",
                Some(b"CN=a".as_slice()),
            ),
        ] {
            assert!(a != other);
            assert!(!same_key(a.bytes(), other.bytes()));
        }
        assert!(same_key(a.bytes(), a.clone().bytes()));
        assert_eq!(a.file_name().len(), 32);
        assert_eq!(a.short().len(), 8);
        assert!(!a.file_name().starts_with(&a.short()));
    }
}

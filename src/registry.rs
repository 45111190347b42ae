//! This host's disks, as the capacity agent ([`crate::agent`]) counts
//! them: one small file per live disk in the clients directory, which its
//! process holds under an exclusive `flock` for as long as it lives, and
//! rewrites with the disk's size and the space it takes as the client
//! writes (at most once a second: no thread, no timer; see
//! [`Entry::changed`]).
//!
//! The lock, not the file, says a disk is alive: the kernel drops it when
//! the process ends however it ends, so a process killed with SIGKILL
//! leaves a file nobody holds, which the agent skips (and whoever may,
//! removes: the process itself on every other exit, the agent when it
//! can; under systemd it stays until reboot, as an idle client's live
//! entry may go unwritten for days). Under
//! systemd the directory is like /tmp (`1777`): every instance (each its
//! own dynamic user) makes and removes only its own file, and the agent
//! (another one) lists the directory and reads the entries (`0644`)
//! without any privilege. What that shows anyone else on the host is the
//! number of disks and their sizes; what a local user can do there is
//! add entries that make the host look fuller, which filling the tmpdir
//! does as well.
//!
//! An entry is one line of two fixed-width decimal numbers, so that a
//! rewrite never leaves a longer old line's tail behind. Whatever else is
//! in the directory, a local user's file included, is hostile: names,
//! types and contents are checked, reads are bounded, and a bad entry is
//! skipped with a debug line, never trusted.

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::debug;

use crate::nbd::storage::{Extent, Received, Storage, ZeroCopy};
use crate::reconnect::Listing;
use crate::sys::{self, Lock};

/// How often at most a live disk's entry is rewritten while its client
/// writes.
const REFRESH: Duration = Duration::from_secs(1);

/// `{size:020} {taken:020}\n`
const ENTRY_LEN: usize = 42;

/// Name of an entry: 16 lowercase hex digits.
const NAME_LEN: usize = 16;

/// The most entries the agent reads in one answer: a directory flooded by
/// a local user costs it bounded work. Far above any host's clients.
pub const MAX_ENTRIES: usize = 100_000;

/// What one disk may still claim of the tmpdir's space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// The disk's size: what it may take at most.
    pub size: u64,
    /// What it takes now.
    pub taken: u64,
}

impl Claim {
    /// Bytes it may still take.
    pub fn outstanding(self) -> u64 {
        self.size.saturating_sub(self.taken)
    }

    /// The entry's bytes, on the stack.
    fn line(self) -> [u8; ENTRY_LEN] {
        let mut out = [b' '; ENTRY_LEN];
        let mut put = |mut v: u64, end: usize| {
            for i in (end - 20..end).rev() {
                out[i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(self.size, 20);
        put(self.taken, 41);
        out[ENTRY_LEN - 1] = b'\n';
        out
    }

    fn parse(bytes: &[u8]) -> Option<Claim> {
        if bytes.len() != ENTRY_LEN || bytes[20] != b' ' || bytes[41] != b'\n' {
            return None;
        }
        let number = |b: &[u8]| -> Option<u64> {
            if !b.iter().all(u8::is_ascii_digit) {
                return None;
            }
            std::str::from_utf8(b).ok()?.parse().ok()
        };
        Some(Claim {
            size: number(&bytes[..20])?,
            taken: number(&bytes[21..41])?,
        })
    }
}

/// This process's entry: held (locked) while it exists, removed when
/// dropped; rewritten by [`Entry::changed`] as the disk changes.
pub struct Entry {
    path: PathBuf,
    /// The entry's file, locked for as long as it is open.
    file: File,
    /// The disk's file, whose allocated blocks are what it takes.
    image: Arc<File>,
    size: u64,
    baseline: u64,
    /// When the entry was last written.
    written: Cell<Instant>,
}

impl Entry {
    /// Register a disk of `size` bytes whose space is what `image` (its
    /// file, shared: the same descriptor) takes on disk beyond `baseline`
    /// (what a clone shares with the base: it may all still be copied on
    /// write, so it is not counted as taken).
    pub fn register(
        dir: &Path,
        size: u64,
        image: Arc<File>,
        baseline: u64,
    ) -> std::io::Result<Entry> {
        crate::reconnect::ensure_shared_dir(dir, Listing::Listable)?;
        let name = random_name()?;
        // Made under a name the agent skips, private, locked and written
        // before it gets its entry name: an entry is never seen half-made,
        // and nobody else can take its lock first.
        let temp = dir.join(format!(".new-{name}"));
        let path = dir.join(&name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temp)?;
        let mut entry = Entry {
            path: temp.clone(),
            file,
            image,
            size,
            baseline,
            written: Cell::new(Instant::now()),
        };
        let made = (|| {
            sys::flock(entry.file.as_fd(), Lock::ExclusiveNow)?;
            entry.write()?;
            // Readable by the agent, another user.
            entry
                .file
                .set_permissions(std::fs::Permissions::from_mode(0o644))?;
            std::fs::rename(&temp, &path)
        })();
        // On failure, dropping `entry` removes the file under its
        // temporary name.
        made?;
        entry.path = path;
        Ok(entry)
    }

    fn write(&self) -> std::io::Result<()> {
        let taken = crate::image::allocated_of(&self.image).saturating_sub(self.baseline);
        let line = Claim {
            size: self.size,
            taken,
        }
        .line();
        self.file.write_all_at(&line, 0)
    }

    /// The disk was written to, trimmed or zeroed: rewrite the entry, at
    /// most once per [`REFRESH`]. The agent's view then lags what the
    /// client wrote in the last such interval before it went quiet, and
    /// errs on the safe side: that space counts both as used (the
    /// filesystem's free space fell) and as still to be claimed.
    pub fn changed(&self) {
        if self.written.get().elapsed() < REFRESH {
            return;
        }
        self.written.set(Instant::now());
        if let Err(e) = self.write() {
            debug!(error = %e, "cannot update the registry entry");
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        // The lock goes with the file, closed after this.
    }
}

/// A disk being served, with its registry entry kept in step: what
/// transmission gets in place of the disk itself.
pub struct Tracked<'a> {
    pub disk: &'a dyn Storage,
    pub entry: Option<&'a Entry>,
}

impl Tracked<'_> {
    fn changed<T>(&self, r: std::io::Result<T>) -> std::io::Result<T> {
        if let Some(e) = self.entry {
            e.changed();
        }
        r
    }
}

impl Storage for Tracked<'_> {
    fn size(&self) -> u64 {
        self.disk.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.disk.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.changed(self.disk.write_at(buf, offset))
    }

    fn trim(&self, offset: u64, length: u64) -> std::io::Result<()> {
        self.changed(self.disk.trim(offset, length))
    }

    fn zero(&self, offset: u64, length: u64, may_punch: bool, fast: bool) -> std::io::Result<()> {
        self.changed(self.disk.zero(offset, length, may_punch, fast))
    }

    fn cache(&self, offset: u64, length: u64) -> std::io::Result<()> {
        self.disk.cache(offset, length)
    }

    fn extents(
        &self,
        offset: u64,
        length: u64,
        max: usize,
        out: &mut Vec<Extent>,
    ) -> std::io::Result<()> {
        self.disk.extents(offset, length, max, out)
    }

    fn send(
        &self,
        out: &mut dyn ZeroCopy,
        head: &[&[u8]],
        offset: u64,
        len: usize,
    ) -> std::io::Result<bool> {
        self.disk.send(out, head, offset, len)
    }

    fn receive_align(&self) -> u64 {
        self.disk.receive_align()
    }

    fn receive(
        &self,
        inp: &mut dyn ZeroCopy,
        offset: u64,
        len: usize,
    ) -> std::io::Result<Option<Received>> {
        self.changed(self.disk.receive(inp, offset, len))
    }
}

/// A fresh entry name: 16 random hex digits.
fn random_name() -> std::io::Result<String> {
    let rng = ring::rand::SystemRandom::new();
    let raw: [u8; NAME_LEN / 2] = ring::rand::generate(&rng)
        .map_err(|_| std::io::Error::other("no random numbers"))?
        .expose();
    Ok(crate::reconnect::hex(&raw))
}

/// The claims of the disks alive now in `dir`, and how many entries were
/// skipped (stale or not ours). A directory with more than [`MAX_ENTRIES`]
/// files is an error: what it holds cannot be counted in bounded work,
/// and a host that cannot count its disks takes no more.
pub fn census(dir: &Path) -> std::io::Result<(Vec<Claim>, usize)> {
    let mut claims = Vec::new();
    let mut skipped = 0;
    let listing = match std::fs::read_dir(dir) {
        Ok(l) => l,
        // Made by the first disk registered: none yet.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((claims, 0)),
        Err(e) => return Err(e),
    };
    for (i, dirent) in listing.enumerate() {
        if i >= MAX_ENTRIES {
            return Err(std::io::Error::other(format!(
                "more than {MAX_ENTRIES} files: not counted"
            )));
        }
        let Ok(dirent) = dirent else {
            skipped += 1;
            continue;
        };
        match read_entry(&dirent.path()) {
            Some(Some(claim)) => claims.push(claim),
            Some(None) => {
                // Nobody holds it: an entry is locked before it gets its
                // name, so its process is gone. Removed, if we may (a
                // standalone agent runs as the servers' user), once ten
                // REFRESH intervals old: a margin, not a need.
                let old = dirent
                    .metadata()
                    .ok()
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > REFRESH * 10);
                if old {
                    let _ = std::fs::remove_file(dirent.path());
                }
                skipped += 1;
            }
            None => skipped += 1,
        }
    }
    Ok((claims, skipped))
}

/// One entry: None if it is not one (bad name, type or content),
/// Some(None) if it is stale, Some(Some(claim)) if it is alive.
fn read_entry(path: &Path) -> Option<Option<Claim>> {
    let name = path.file_name()?.to_str()?;
    if name.len() != NAME_LEN
        || !name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        debug!(entry = %name.escape_debug(), "registry: not an entry name; skipped");
        return None;
    }
    // O_NONBLOCK: a FIFO planted here must not stall the agent's open.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        debug!(entry = name, "registry: not a regular file; skipped");
        return None;
    }
    let mut buf = [0u8; ENTRY_LEN + 1];
    let mut len = 0;
    // Bounded: one byte more than an entry tells a long file apart.
    while len < buf.len() {
        match (&file).read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(_) => return None,
        }
    }
    // A shared lock we get means nobody holds the entry; it goes with
    // `file`, closed on return.
    let alive = match sys::flock(file.as_fd(), Lock::SharedNow) {
        Ok(()) => false,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
        Err(_) => return None,
    };
    if !alive {
        return Some(None);
    }
    match Claim::parse(&buf[..len]) {
        Some(c) => Some(Some(c)),
        None => {
            debug!(entry = name, "registry: not an entry's content; skipped");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_reads_back_as_its_claim() {
        let c = Claim {
            size: 1 << 40,
            taken: 12345,
        };
        assert_eq!(Claim::parse(&c.line()), Some(c));
        assert_eq!(
            c.line().as_slice(),
            format!("{:020} {:020}\n", c.size, c.taken).as_bytes()
        );
        let max = Claim {
            size: u64::MAX,
            taken: 0,
        };
        assert_eq!(Claim::parse(&max.line()), Some(max));
        assert_eq!(c.outstanding(), (1 << 40) - 12345);
        let full = Claim {
            size: 10,
            taken: 4096,
        };
        assert_eq!(full.outstanding(), 0);
    }

    #[test]
    fn anything_but_a_line_is_not_a_claim() {
        let good = String::from_utf8(Claim { size: 1, taken: 2 }.line().to_vec()).unwrap();
        for bad in [
            "",
            "1 2\n",
            &good[..ENTRY_LEN - 1],
            &format!("{good}x"),
            &good.replace('\n', " "),
            &good.replacen('0', "-", 1),
            &good.replacen('0', "+", 1),
            // 99999999999999999999 does not fit in a u64.
            &format!("{} {:020}\n", "9".repeat(20), 0),
        ] {
            assert_eq!(Claim::parse(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn an_entry_counts_while_held_and_a_stale_or_foreign_file_never() {
        let dir = tempdir();
        let image = tempfile_in(&dir, "image");
        image.set_len(1 << 20).unwrap();
        let entry =
            Entry::register(&dir, 1 << 30, Arc::new(image.try_clone().unwrap()), 0).unwrap();
        // Files that are not live entries: a bad name, a bad content, a
        // FIFO, and a good line nobody holds.
        std::fs::write(dir.join("not-an-entry"), Claim { size: 5, taken: 0 }.line()).unwrap();
        std::fs::write(dir.join("00000000000000aa"), "junk").unwrap();
        nix::unistd::mkfifo(&dir.join("00000000000000bb"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let stale = dir.join("00000000000000cc");
        std::fs::write(&stale, Claim { size: 7, taken: 0 }.line()).unwrap();
        let old = std::time::SystemTime::now() - REFRESH * 60;
        File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let new_stale = dir.join("00000000000000dd");
        std::fs::write(&new_stale, Claim { size: 9, taken: 0 }.line()).unwrap();
        let (claims, skipped) = census(&dir).unwrap();
        assert_eq!(
            claims,
            vec![Claim {
                size: 1 << 30,
                taken: 0
            }]
        );
        assert_eq!(skipped, 6, "image, bad name, junk, FIFO, two stale");
        assert!(!stale.exists(), "an old stale entry is removed");
        assert!(new_stale.exists(), "a new one may be in the making: kept");
        drop(entry);
        let (claims, _) = census(&dir).unwrap();
        assert!(claims.is_empty(), "{claims:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_entry_follows_what_the_image_takes() {
        let dir = tempdir();
        let image = tempfile_in(&dir, "image");
        let shared = Arc::new(image.try_clone().unwrap());
        let entry = Entry::register(&dir, 1 << 30, shared.clone(), 0).unwrap();
        let disk = crate::image::Image::adopt(image.try_clone().unwrap().into()).unwrap();
        let tracked = Tracked {
            disk: &disk,
            entry: Some(&entry),
        };
        tracked.write_at(&vec![1u8; 4 << 20], 0).unwrap();
        // Within REFRESH of the last write of the entry: not yet.
        assert_eq!(census(&dir).unwrap().0[0].taken, 0);
        std::thread::sleep(REFRESH);
        tracked.write_at(&[2u8; 4096], 8 << 20).unwrap();
        let taken = census(&dir).unwrap().0[0].taken;
        assert!(taken >= (4 << 20) + 4096, "{taken}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "tmpdisk-registry-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        d
    }

    fn tempfile_in(dir: &Path, name: &str) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(name))
            .unwrap()
    }
}

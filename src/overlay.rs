//! A client's copy-on-write copy of the base image: the blocks the client
//! has written live in a nameless sparse *delta* image of the disk's size,
//! every other block is read from the base, which is never written. A
//! bitmap says which 4 KiB blocks are the client's.
//!
//! This is the copy on every filesystem, reflink or not. A reflink clone
//! of the base was the copy where the tmpdir could share extents with it,
//! and lost on every count measured (loop-mounted xfs, 4 GiB base with
//! 702 MiB of data):
//! - Page cache belongs to a file, not to the extents it shares: each
//!   clone client cached a private copy of the base's data it read (+692
//!   to +719 MiB per client reading its whole disk) and read it from the
//!   device again (2.4-2.8 GB/s), where reads of the base share one cached
//!   copy (+0 MiB, 7.7-11.8 GB/s).
//! - Writes into a clone go through xfs's copy-on-write of shared extents:
//!   fio 256 KiB sequential writes ran at 1167-1799 MB/s into a clone and
//!   1432-3196 MB/s into an empty delta on the same xfs, four alternating
//!   runs each; 1 KiB random writes (a partial block: the clone's block
//!   is read from the device, the delta's from the base's page cache)
//!   35-79k against 47-94k IOPS; 4 KiB random writes alike.
//! - The clone itself, and dropping it at exit, cost time at every connect
//!   (0.09 ms more than an empty delta, median of 60).
//!
//! A `--command` still gets a clone (or a full copy): it needs the copy as
//! one file. Once it has run, a clone becomes this overlay's delta, with
//! the blocks the command changed as the client's, found from the two
//! files' extent maps ([`Overlay::over_clone`], `crate::clonemap`). A full
//! copy (no reflink in the tmpdir), and a clone the command resized, are
//! served whole.
//!
//! - A write of whole blocks goes to the delta; a write of part of a block
//!   the client does not own yet first copies the rest of that block from
//!   the base. The blocks are the client's once the write succeeded (a
//!   failed write leaves them reading as before, which NBD allows).
//! - TRIM and WRITE_ZEROES make blocks the client's and read as zeroes:
//!   never the base again.
//! - Block status merges both: the delta's holes and data where the client
//!   owns the blocks, the base's elsewhere (a hole of the base that the
//!   client never wrote stays a hole).
//! - Large reads stay zero-copy: sendfile from whichever file holds each
//!   run; large block-aligned writes are spliced into the delta.
//!
//! The bitmap has two levels: a leaf of 4 KiB covers 128 MiB of disk and
//! exists only once the client wrote there, so memory is 32 KiB per GiB
//! written (at most per GiB of disk), plus 8 bytes per 128 MiB of disk.
//! Like the plain image, the delta has no name: nothing is left behind
//! however the process ends.

use std::cell::RefCell;
use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;

use crate::base::Base;
use crate::clonemap::Part;
use crate::handover::BadHandover;
use crate::image::{Image, push_extent};
use crate::nbd::storage::{Extent, Received, Storage, ZeroCopy};
use crate::nbd::wire::{Put, Reader};
use tracing::debug;

/// The unit of ownership.
pub const BLOCK: u64 = 4096;
pub const LEAF_WORDS: usize = 512;
/// Blocks one leaf covers: 32768, that is 128 MiB.
const LEAF_BLOCKS: u64 = 64 * LEAF_WORDS as u64;

/// Leaves of the block map of a disk of `size` bytes: one per 128 MiB.
pub fn leaves_for(size: u64) -> u64 {
    size.div_ceil(BLOCK).div_ceil(LEAF_BLOCKS)
}

/// Check a handed-over block map for a disk of `size` bytes, as
/// [`Overlay::adopt`] would read it (for the fuzz target).
pub fn check_map(size: u64, map: &[u8]) -> Result<(), BadHandover> {
    Owned::decode(size.div_ceil(BLOCK), map).map(|_| ())
}

/// Which blocks are the client's.
struct Owned {
    leaves: Vec<Option<Box<[u64; LEAF_WORDS]>>>,
}

impl Owned {
    fn new(blocks: u64) -> Owned {
        Owned {
            leaves: (0..blocks.div_ceil(LEAF_BLOCKS)).map(|_| None).collect(),
        }
    }

    fn get(&self, b: u64) -> bool {
        let (leaf, word, bit) = Self::place(b);
        self.leaves
            .get(leaf)
            .and_then(|l| l.as_ref())
            .is_some_and(|l| l[word] & (1 << bit) != 0)
    }

    /// Mark blocks `[first, end)` as the client's.
    fn set(&mut self, first: u64, end: u64) {
        for b in first..end {
            let (leaf, word, bit) = Self::place(b);
            if let Some(slot) = self.leaves.get_mut(leaf) {
                slot.get_or_insert_with(|| Box::new([0; LEAF_WORDS]))[word] |= 1 << bit;
            }
        }
    }

    /// The first block in `(b, end)` whose ownership differs from `b`'s, or
    /// `end`: where the run starting at `b` ends.
    fn run_end(&self, b: u64, end: u64) -> u64 {
        let owned = self.get(b);
        let mut next = b + 1;
        while next < end {
            let (leaf, word, bit) = Self::place(next);
            let words = self.leaves.get(leaf).and_then(|l| l.as_ref());
            match words {
                // A leaf never written: all of it unowned.
                None if !owned => next = (leaf as u64 + 1) * LEAF_BLOCKS,
                None => return next,
                Some(w) => {
                    let rest = w[word] >> bit;
                    // All 64-bit words of one value can be skipped whole.
                    if bit == 0 && (rest == 0 && !owned || rest == u64::MAX && owned) {
                        next += 64;
                    } else if (rest & 1 != 0) != owned {
                        return next;
                    } else {
                        next += 1;
                    }
                }
            }
        }
        end
    }

    fn count(&self) -> u64 {
        self.leaves
            .iter()
            .flatten()
            .map(|l| l.iter().map(|w| u64::from(w.count_ones())).sum::<u64>())
            .sum()
    }

    /// The map for a reconnect handover: each leaf that has any block,
    /// as its index and words (big-endian), in order.
    fn encode(&self) -> (u64, Vec<u8>) {
        let mut out = Vec::new();
        let mut n = 0;
        for (i, leaf) in self.leaves.iter().enumerate() {
            if let Some(words) = leaf {
                out.put(&(i as u64).to_be_bytes());
                for w in words.iter() {
                    out.u64(*w);
                }
                n += 1;
            }
        }
        (n, out)
    }

    /// The map of a disk of `blocks` from [`Owned::encode`]'s bytes:
    /// indexes in range and strictly increasing, no partial leaf.
    fn decode(blocks: u64, bytes: &[u8]) -> Result<Owned, BadHandover> {
        let mut owned = Owned::new(blocks);
        let mut r = Reader::new(bytes);
        let mut last: Option<u64> = None;
        while !r.rest().is_empty() {
            let i = r.u64().ok_or(BadHandover("a partial leaf"))?;
            if i as usize >= owned.leaves.len() || last.is_some_and(|l| i <= l) {
                return Err(BadHandover("a leaf out of range or order"));
            }
            let mut words = Box::new([0u64; LEAF_WORDS]);
            for w in words.iter_mut() {
                *w = r.u64().ok_or(BadHandover("a partial leaf"))?;
            }
            owned.leaves[i as usize] = Some(words);
            last = Some(i);
        }
        Ok(owned)
    }

    fn place(b: u64) -> (usize, usize, u32) {
        let leaf = (b / LEAF_BLOCKS) as usize;
        let in_leaf = b % LEAF_BLOCKS;
        (leaf, (in_leaf / 64) as usize, (in_leaf % 64) as u32)
    }
}

/// The client's copy of the base (see the module comment).
pub struct Overlay {
    base: Arc<Base>,
    delta: Image,
    owned: RefCell<Owned>,
    /// The delta began as a command's clone of the base.
    clone: bool,
}

impl Overlay {
    /// A copy of `base` whose changes go to `delta` (a fresh, empty
    /// nameless image of the disk's size).
    pub fn new(base: Arc<Base>, delta: Image) -> Overlay {
        let blocks = delta.size().div_ceil(BLOCK);
        Overlay {
            base,
            delta,
            owned: RefCell::new(Owned::new(blocks)),
            clone: false,
        }
    }

    /// A command's reflink clone of `base`, served as an overlay whose
    /// delta it is: the blocks `parts` says the command changed are the
    /// client's, and every other block is read from the base, as for any
    /// overlay. A clone served as one file read its unchanged blocks from
    /// the device into a page cache of its own (+692 to +719 MiB per client
    /// reading a 4 GiB image holding 702 MiB; see the module notes).
    ///
    /// The ranges still shared with the base are punched out of the clone
    /// (whole blocks; metadata only): the client's writes there then fill
    /// holes, as in any delta, rather than go through the filesystem's
    /// copy-on-write, and the clone takes only the command's changes. A
    /// punch that fails changes nothing that is read: those blocks are not
    /// the client's.
    pub fn over_clone(base: Arc<Base>, clone: Image, parts: &[(u64, u64, Part)]) -> Overlay {
        let mut owned = Owned::new(clone.size().div_ceil(BLOCK));
        for &(start, end, part) in parts {
            match part {
                Part::Changed => owned.set(start / BLOCK, end.div_ceil(BLOCK)),
                Part::Shared => {
                    let (first, last) = (start.next_multiple_of(BLOCK), end / BLOCK * BLOCK);
                    if last > first
                        && let Err(e) = clone.punch_hole(first, last - first)
                    {
                        debug!(error = %e, "cannot punch a shared range out of the clone");
                    }
                }
                Part::Hole => {}
            }
        }
        Overlay {
            base,
            delta: clone,
            owned: RefCell::new(owned),
            clone: true,
        }
    }

    /// Whether the delta began as a command's clone of the base.
    pub fn is_clone(&self) -> bool {
        self.clone
    }

    /// The copy a holder handed over (see [`crate::reconnect`]): the same
    /// base and delta, the client's blocks from `map`, and whether the
    /// delta began as a command's clone.
    pub fn adopt(
        base: Arc<Base>,
        delta: Image,
        map: &[u8],
        clone: bool,
    ) -> Result<Overlay, BadHandover> {
        let owned = Owned::decode(delta.size().div_ceil(BLOCK), map)?;
        Ok(Overlay {
            base,
            delta,
            owned: RefCell::new(owned),
            clone,
        })
    }

    /// What a handover sends: the delta, the base, and the block map (its
    /// leaves and bytes).
    /// The client's own blocks: the file whose space the disk takes.
    pub fn delta(&self) -> &Image {
        &self.delta
    }

    pub fn parts(&self) -> (&Image, &Base, u64, Vec<u8>) {
        let (n, map) = self.owned.borrow().encode();
        (&self.delta, &self.base, n, map)
    }

    /// Bytes of the disk that are the client's own (written, trimmed,
    /// zeroed; for a command's clone, also what the command changed).
    pub fn owned_bytes(&self) -> u64 {
        (self.owned.borrow().count() * BLOCK).min(self.size())
    }

    /// Real disk space the delta takes.
    pub fn allocated(&self) -> u64 {
        self.delta.allocated()
    }

    /// The runs of constant ownership over `[offset, end)`: (start, stop,
    /// owned) in order.
    fn runs(
        &self,
        offset: u64,
        end: u64,
        mut f: impl FnMut(u64, u64, bool) -> io::Result<bool>,
    ) -> io::Result<()> {
        let owned = self.owned.borrow();
        let last = end.div_ceil(BLOCK);
        let mut pos = offset;
        while pos < end {
            let b = pos / BLOCK;
            let mine = owned.get(b);
            let stop = (owned.run_end(b, last) * BLOCK).min(end);
            if !f(pos, stop, mine)? {
                break;
            }
            pos = stop;
        }
        Ok(())
    }

    /// The bytes of block `b` that are inside the disk: `[start, stop)`.
    fn block(&self, b: u64) -> (u64, u64) {
        let start = b * BLOCK;
        (start, (start + BLOCK).min(self.size()))
    }

    /// Write `data` at `at`, inside one block `b`: straight to the delta if
    /// the client owns the block, else over a copy of the rest of the block
    /// from the base. The caller marks the block owned.
    fn write_in_block(&self, b: u64, at: u64, data: &[u8]) -> io::Result<()> {
        if self.owned.borrow().get(b) {
            return self.delta.write_at(data, at);
        }
        let (start, stop) = self.block(b);
        let mut block = [0u8; BLOCK as usize];
        let block = &mut block[..(stop - start) as usize];
        self.base.read_at(block, start)?;
        let from = (at - start) as usize;
        block[from..from + data.len()].copy_from_slice(data);
        self.delta.write_at(block, start)
    }

    /// Make `[offset, offset+length)` read as zeroes and the client's: whole
    /// blocks zeroed in the delta (a hole where `may_punch`), a partial one
    /// at either edge written over a copy of the base.
    fn clear(&self, offset: u64, length: u64, may_punch: bool, fast: bool) -> io::Result<()> {
        if length == 0 {
            return Ok(());
        }
        let end = offset + length;
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        let whole = |b: u64| {
            let (start, stop) = self.block(b);
            offset <= start && stop <= end
        };
        let a = if whole(first) { first } else { first + 1 };
        let z = if whole(last) { last + 1 } else { last };
        if a < z {
            let (from, to) = (a * BLOCK, self.block(z - 1).1);
            self.delta.zero(from, to - from, may_punch, fast)?;
        }
        let mut edges = vec![first];
        if last != first {
            edges.push(last);
        }
        for b in edges.into_iter().filter(|&b| !whole(b)) {
            let (start, stop) = self.block(b);
            let (from, to) = (offset.max(start), end.min(stop));
            if self.owned.borrow().get(b) {
                self.delta.zero(from, to - from, may_punch, fast)?;
            } else {
                let zeroes = [0u8; BLOCK as usize];
                self.write_in_block(b, from, &zeroes[..(to - from) as usize])?;
            }
        }
        self.owned.borrow_mut().set(first, last + 1);
        Ok(())
    }
}

impl Overlay {
    /// Send `[at, stop)` of a run whose file did not hold all of it (it
    /// ended early, or this is past the base) as read: zeroes, as the one
    /// rule says. Rare, so the buffer is made here: a stack array in
    /// `send` was zeroed (64 KiB) before every run, needed or not.
    fn send_rest(
        &self,
        out: &mut dyn ZeroCopy,
        mut at: u64,
        stop: u64,
        mine: bool,
    ) -> io::Result<()> {
        let mut rest = vec![0u8; (stop - at).min(64 * 1024) as usize];
        while at < stop {
            let n = (stop - at).min(rest.len() as u64) as usize;
            match mine {
                true => self.delta.read_at(&mut rest[..n], at)?,
                false => self.base.read_at(&mut rest[..n], at)?,
            }
            out.write_all(&rest[..n])?;
            at += n as u64;
        }
        Ok(())
    }
}

impl Storage for Overlay {
    fn size(&self) -> u64 {
        self.delta.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        self.runs(offset, end, |pos, stop, mine| {
            let part = &mut buf[(pos - offset) as usize..(stop - offset) as usize];
            match mine {
                true => self.delta.read_at(part, pos)?,
                false => self.base.read_at(part, pos)?,
            }
            Ok(true)
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            // Else the block at `offset` would be copied from the base.
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        // The part of a first block the write does not start at, or does
        // not fill.
        if !pos.is_multiple_of(BLOCK) || end - pos < BLOCK {
            let b = pos / BLOCK;
            let stop = end.min(self.block(b).1);
            self.write_in_block(b, pos, &buf[..(stop - offset) as usize])?;
            pos = stop;
        }
        let whole_end = (end / BLOCK * BLOCK).max(pos);
        if whole_end > pos {
            let part = &buf[(pos - offset) as usize..(whole_end - offset) as usize];
            self.delta.write_at(part, pos)?;
            pos = whole_end;
        }
        if pos < end {
            self.write_in_block(pos / BLOCK, pos, &buf[(pos - offset) as usize..])?;
        }
        self.owned
            .borrow_mut()
            .set(offset / BLOCK, end.div_ceil(BLOCK));
        Ok(())
    }

    fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        self.clear(offset, length, true, false)
    }

    fn zero(&self, offset: u64, length: u64, may_punch: bool, fast: bool) -> io::Result<()> {
        self.clear(offset, length, may_punch, fast)
    }

    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.delta.cache(offset, length)
    }

    fn extents(
        &self,
        offset: u64,
        length: u64,
        max: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        let mut part = Vec::new();
        self.runs(offset, offset + length, |pos, stop, mine| {
            part.clear();
            match mine {
                true => self.delta.extents(pos, stop - pos, max, &mut part)?,
                false => self.base.extents(pos, stop - pos, max, &mut part)?,
            }
            for e in &part {
                if !push_extent(out, max, e.offset, e.length, e.data) {
                    return Ok(false);
                }
            }
            // A run cut short by `max` ends the answer there.
            Ok(part.last().is_some_and(|e| e.offset + e.length == stop))
        })
    }

    fn send(
        &self,
        out: &mut dyn ZeroCopy,
        head: &[&[u8]],
        offset: u64,
        len: usize,
    ) -> io::Result<bool> {
        let end = offset + len as u64;
        let mut head = Some(head);
        self.runs(offset, end, |pos, stop, mine| {
            let h = head.take().unwrap_or_default();
            // Past the base's end the disk reads as zeroes: no file there.
            let (fd, inside) = match mine {
                true => (self.delta.as_fd(), stop),
                false => (self.base.as_fd(), stop.min(self.base.size()).max(pos)),
            };
            let want = (inside - pos) as usize;
            let sent = if want > 0 || !h.is_empty() {
                out.send_file(h, fd, pos, want)?
            } else {
                0
            };
            let at = pos + sent as u64;
            if at < stop {
                self.send_rest(out, at, stop, mine)?;
            }
            Ok(true)
        })?;
        Ok(true)
    }

    fn receive_align(&self) -> u64 {
        BLOCK
    }

    fn receive(
        &self,
        inp: &mut dyn ZeroCopy,
        offset: u64,
        len: usize,
    ) -> io::Result<Option<Received>> {
        // Only whole blocks can go straight into the delta; a partial one
        // needs the rest of its block from the base first.
        let end = offset + len as u64;
        if !offset.is_multiple_of(BLOCK) || (!end.is_multiple_of(BLOCK) && end != self.size()) {
            return Ok(None);
        }
        let r = inp.splice_to_file(self.delta.as_fd(), offset, len)?;
        if let Received::Stored = r {
            self.owned
                .borrow_mut()
                .set(offset / BLOCK, end.div_ceil(BLOCK));
        }
        Ok(Some(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    const DISK: u64 = 64 * BLOCK + 1000;

    /// A base image of `len` bytes: a pattern with a hole in the middle
    /// (so block status has something to merge).
    fn base(len: u64) -> (tempfile_path::Path, Arc<Base>, Vec<u8>) {
        let dir = std::env::temp_dir();
        let path = dir.join(format!(
            "tmpdisk-overlay-base-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let mut bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8 + 1).collect();
        let hole = (len / 3 / BLOCK * BLOCK, len / 3 / BLOCK * BLOCK + 8 * BLOCK);
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&bytes).unwrap();
        drop(f);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        nix::fcntl::fallocate(
            &f,
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            hole.0 as i64,
            (hole.1 - hole.0) as i64,
        )
        .unwrap();
        bytes[hole.0 as usize..(hole.1 as usize).min(len as usize)].fill(0);
        let b = Arc::new(Base::open(&path).unwrap());
        (tempfile_path::Path(path), b, bytes)
    }

    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

    mod tempfile_path {
        /// Removed on drop.
        pub struct Path(pub std::path::PathBuf);
        impl Drop for Path {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn overlay(b: &Arc<Base>) -> Overlay {
        let delta = Image::create(&std::env::temp_dir(), DISK).unwrap().0;
        Overlay::new(b.clone(), delta)
    }

    /// Transmission gets the disk wrapped for the capacity registry; the
    /// wrapper must say the overlay splices only whole blocks, or the
    /// stream never lines a large write up for the splice (it did not, for
    /// one commit: every large write was copied).
    #[test]
    fn the_registry_s_wrapper_passes_on_the_block_alignment() {
        let (_keep, b, _) = base(DISK);
        let o = overlay(&b);
        let tracked = crate::registry::Tracked {
            disk: &o,
            entry: None,
        };
        assert_eq!(tracked.receive_align(), BLOCK);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Read(u64, u64),
        Write(u64, u64, u8),
        Trim(u64, u64),
        Zero(u64, u64, bool),
        Extents(u64, u64),
    }

    fn range() -> impl Strategy<Value = (u64, u64)> {
        let aligned = (0..DISK / BLOCK, 1..8u64)
            .prop_map(|(b, n)| (b * BLOCK, (n * BLOCK).min(DISK - b * BLOCK)));
        let any = (0..DISK - 1).prop_flat_map(|o| (Just(o), 1..=(DISK - o).min(3 * BLOCK)));
        prop_oneof![aligned, any]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => range().prop_map(|(o, l)| Op::Read(o, l)),
            4 => (range(), 1..=255u8).prop_map(|((o, l), v)| Op::Write(o, l, v)),
            1 => range().prop_map(|(o, l)| Op::Trim(o, l)),
            1 => (range(), any::<bool>()).prop_map(|((o, l), p)| Op::Zero(o, l, p)),
            1 => range().prop_map(|(o, l)| Op::Extents(o, l)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Random reads, writes (aligned or not), trims, zeroes and block
        /// status against a model of the disk's bytes, over a base shorter
        /// than the disk (the rest reads as zeroes) with a hole in it. The
        /// base file never changes.
        #[test]
        fn the_overlay_behaves_like_a_plain_disk(ops in prop::collection::vec(op(), 1..60)) {
            let base_len = DISK - 5 * BLOCK - 123;
            let (_keep, b, base_bytes) = base(base_len);
            let o = overlay(&b);
            let mut model = base_bytes.clone();
            model.resize(DISK as usize, 0);
            for op in ops {
                match op {
                    Op::Read(off, len) => {
                        let mut got = vec![0xaa; len as usize];
                        o.read_at(&mut got, off).unwrap();
                        prop_assert!(got == model[off as usize..(off + len) as usize], "read {} {}", off, len);
                    }
                    Op::Write(off, len, v) => {
                        let data: Vec<u8> = (0..len).map(|i| v ^ (i as u8)).collect();
                        o.write_at(&data, off).unwrap();
                        model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    }
                    Op::Trim(off, len) => {
                        o.trim(off, len).unwrap();
                        model[off as usize..(off + len) as usize].fill(0);
                    }
                    Op::Zero(off, len, punch) => {
                        o.zero(off, len, punch, false).unwrap();
                        model[off as usize..(off + len) as usize].fill(0);
                    }
                    Op::Extents(off, len) => {
                        let mut ex = Vec::new();
                        o.extents(off, len, usize::MAX, &mut ex).unwrap();
                        let mut pos = off;
                        for e in &ex {
                            prop_assert_eq!(e.offset, pos);
                            prop_assert!(e.length > 0);
                            if !e.data {
                                let r = e.offset as usize..(e.offset + e.length) as usize;
                                prop_assert!(model[r].iter().all(|&x| x == 0), "a hole must read as zeroes");
                            }
                            pos += e.length;
                        }
                        prop_assert_eq!(pos, off + len);
                    }
                }
            }
            let mut all = vec![0; DISK as usize];
            o.read_at(&mut all, 0).unwrap();
            prop_assert!(all == model);
            let mut now = vec![0; base_len as usize];
            b.read_at(&mut now, 0).unwrap();
            prop_assert!(now == base_bytes, "the base must never change");
        }
    }

    /// The zero-copy read (what a remote client gets: sendfile from the
    /// delta or the base run by run, zeroes past the base's end) sends
    /// the header and then exactly what `read_at` reads.
    #[test]
    fn zero_copy_reads_send_what_reads_return() {
        use std::io::Read;
        use std::os::fd::OwnedFd;
        use std::os::unix::net::UnixStream;
        let base_len = DISK - 5 * BLOCK - 123;
        let (_keep, b, _) = base(base_len);
        let o = overlay(&b);
        o.write_at(&[0xee; 3 * BLOCK as usize], 10 * BLOCK).unwrap();
        o.write_at(&[0xdd; 100], DISK - 2 * BLOCK).unwrap();
        o.trim(20 * BLOCK, 2 * BLOCK).unwrap();
        for (offset, len) in [
            (0, DISK),
            (9 * BLOCK + 7, 4 * BLOCK),
            (base_len - 1000, DISK - base_len + 1000),
            (DISK - 3 * BLOCK, 3 * BLOCK),
        ] {
            let (ours, mut theirs) = UnixStream::pair().unwrap();
            let mut conn = crate::conn::Conn::socket(OwnedFd::from(ours));
            let reader = std::thread::spawn(move || {
                let mut got = Vec::new();
                theirs.read_to_end(&mut got).unwrap();
                got
            });
            assert!(o.send(&mut conn, &[b"HDR"], offset, len as usize).unwrap());
            drop(conn);
            let got = reader.join().unwrap();
            let mut want = b"HDR".to_vec();
            let at = want.len();
            want.resize(at + len as usize, 0);
            o.read_at(&mut want[at..], offset).unwrap();
            assert!(got == want, "{offset}+{len}");
        }
    }

    #[test]
    fn bitmap_runs_and_counts() {
        let mut w = Owned::new(3 * LEAF_BLOCKS);
        assert_eq!(w.run_end(0, 3 * LEAF_BLOCKS), 3 * LEAF_BLOCKS);
        w.set(100, 200);
        assert_eq!(w.run_end(0, 1000), 100);
        assert_eq!(w.run_end(100, 1000), 200);
        assert_eq!(w.run_end(150, 1000), 200);
        w.set(LEAF_BLOCKS - 1, LEAF_BLOCKS + 70);
        assert_eq!(
            w.run_end(LEAF_BLOCKS - 1, 3 * LEAF_BLOCKS),
            LEAF_BLOCKS + 70
        );
        assert_eq!(
            w.run_end(LEAF_BLOCKS + 70, 3 * LEAF_BLOCKS),
            3 * LEAF_BLOCKS
        );
        assert_eq!(w.count(), 100 + 71);
        // Leaves exist only where something was set.
        assert_eq!(w.leaves.iter().flatten().count(), 2);
    }
}

//! Which parts of a `--command`'s reflink clone still hold the base's own
//! blocks, told from the two files' extent maps alone, without reading a
//! byte: where the clone maps an offset to the same physical block as the
//! base maps the same offset, the bytes are the base's (a shared block is
//! never written in place: a write to either file gets a new block). What
//! the command wrote, trimmed or grew is elsewhere.
//!
//! The clone is then served as an overlay whose delta it is (see
//! [`crate::overlay::Overlay::over_clone`]), so that the client reads the
//! unchanged part from the base's page cache, shared by every client,
//! instead of caching a private copy of it.
//!
//! Anything the maps cannot vouch for counts as changed: an extent not
//! marked shared, or whose physical address does not name its bytes one
//! to one (unwritten, delayed, encoded, inline, not aligned, unknown), or
//! a hole in one file where the other has data. That errs towards serving
//! the clone's bytes, which are right either way.

use crate::sys::Mapping;

/// FIEMAP_EXTENT_* flags under which an extent's physical address does not
/// name its bytes one to one: UNKNOWN, DELALLOC, ENCODED, DATA_ENCRYPTED,
/// NOT_ALIGNED, DATA_INLINE, DATA_TAIL, UNWRITTEN.
const NOT_PLAIN: u32 = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800;
/// FIEMAP_EXTENT_SHARED: the filesystem says the blocks are shared with
/// another file. Required of both sides: not every filesystem's physical
/// addresses are real (CIFS reports the logical offset, with no flags, and
/// can clone), and one that reports shared extents has real ones.
const SHARED: u32 = 0x2000;

/// What a range of the clone holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The base's own blocks, shared: the base's bytes.
    Shared,
    /// A hole in both files: zeroes either way.
    Hole,
    /// Anything else: the clone's own bytes.
    Changed,
}

/// The first `size` bytes of the clone, cut into runs of one [`Part`] each,
/// in order and covering `[0, size)`. `base` and `clone` are the files'
/// extents as FIEMAP lists them (sorted, not overlapping).
pub fn compare(base: &[Mapping], clone: &[Mapping], size: u64) -> Vec<(u64, u64, Part)> {
    let mut cuts: Vec<u64> = vec![0, size];
    for m in base.iter().chain(clone) {
        let end = m.logical.saturating_add(m.length);
        cuts.extend([m.logical.min(size), end.min(size)]);
    }
    cuts.sort_unstable();
    cuts.dedup();
    let mut out: Vec<(u64, u64, Part)> = Vec::new();
    for w in cuts.windows(2) {
        let (a, b) = (w[0], w[1]);
        let part = match (covering(base, a), covering(clone, a)) {
            (None, None) => Part::Hole,
            (Some(x), Some(y)) if same_block(x, y, a) => Part::Shared,
            _ => Part::Changed,
        };
        match out.last_mut() {
            Some(last) if last.2 == part && last.1 == a => last.1 = b,
            _ => out.push((a, b, part)),
        }
    }
    out
}

/// The extent of `map` that holds offset `at`, if any.
fn covering(map: &[Mapping], at: u64) -> Option<&Mapping> {
    let i = map.partition_point(|m| m.logical <= at);
    let m = map.get(i.checked_sub(1)?)?;
    (at < m.logical.saturating_add(m.length)).then_some(m)
}

/// Whether `m`'s physical address can be compared: marked shared, not 0,
/// and naming its bytes one to one.
fn vouches(m: &Mapping) -> bool {
    m.flags & NOT_PLAIN == 0 && m.flags & SHARED != 0 && m.physical != 0
}

/// Whether `x` and `y` put offset `at` in the same physical place, both
/// vouching for it.
fn same_block(x: &Mapping, y: &Mapping, at: u64) -> bool {
    let place = |m: &Mapping| m.physical.checked_add(at - m.logical);
    vouches(x) && vouches(y) && matches!((place(x), place(y)), (Some(p), Some(q)) if p == q)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A file's extents from (gap, length, physical, flags) steps: sorted,
    /// not overlapping, as FIEMAP lists them.
    fn layout(steps: &[(u64, u64, u64, u32)]) -> Vec<Mapping> {
        let mut at = 0;
        steps
            .iter()
            .map(|&(gap, length, physical, flags)| {
                let m = Mapping {
                    logical: at + gap,
                    physical,
                    length,
                    flags,
                };
                at += gap + length;
                m
            })
            .collect()
    }

    /// What one byte offset holds, asked of the maps directly.
    fn naive(base: &[Mapping], clone: &[Mapping], at: u64) -> Part {
        let find = |map: &[Mapping]| {
            map.iter()
                .find(|m| m.logical <= at && at < m.logical + m.length)
                .map(|m| (m.physical + (at - m.logical), vouches(m)))
        };
        match (find(base), find(clone)) {
            (None, None) => Part::Hole,
            (Some((p, true)), Some((q, true))) if p == q => Part::Shared,
            _ => Part::Changed,
        }
    }

    fn steps() -> impl Strategy<Value = Vec<(u64, u64, u64, u32)>> {
        // Physical addresses from a small set, so that extents line up.
        let flags = prop_oneof![
            4 => Just(SHARED),
            1 => Just(SHARED | 0x800),
            1 => Just(SHARED | 0x1),
            1 => Just(0u32),
        ];
        prop::collection::vec(
            (0..40u64, 1..40u64, (0..8u64).prop_map(|p| p * 16), flags),
            0..8,
        )
    }

    proptest! {
        /// The runs cover [0, size) in order, no two neighbours alike, and
        /// every offset's run says what the maps say of that offset.
        #[test]
        fn runs_agree_with_the_maps_offset_by_offset(
            b in steps(), c in steps(), size in 0..400u64,
        ) {
            let (base, clone) = (layout(&b), layout(&c));
            let runs = compare(&base, &clone, size);
            let mut at = 0;
            for (i, &(start, end, part)) in runs.iter().enumerate() {
                prop_assert_eq!(start, at);
                prop_assert!(end > start);
                if i > 0 {
                    prop_assert_ne!(runs[i - 1].2, part);
                }
                for o in start..end {
                    prop_assert_eq!(part, naive(&base, &clone, o), "offset {}", o);
                }
                at = end;
            }
            prop_assert_eq!(at, size);
        }
    }

    /// An extent; `flags` on top of SHARED (what a clone's extents carry).
    fn ext(logical: u64, physical: u64, length: u64, flags: u32) -> Mapping {
        Mapping {
            logical,
            physical,
            length,
            flags: flags | SHARED,
        }
    }

    #[test]
    fn an_untouched_clone_is_all_shared_or_hole() {
        let base = [ext(0, 1000, 100, 0), ext(300, 5000, 100, 0)];
        assert_eq!(
            compare(&base, &base, 500),
            vec![
                (0, 100, Part::Shared),
                (100, 300, Part::Hole),
                (300, 400, Part::Shared),
                (400, 500, Part::Hole)
            ]
        );
    }

    /// A write in the middle of a shared extent moves those blocks; a
    /// punched range and data where the base had a hole are the clone's;
    /// the clone's extents may be cut differently from the base's and
    /// still be shared where they line up.
    #[test]
    fn changes_are_found_wherever_the_blocks_differ() {
        let base = [ext(0, 1000, 400, 0)];
        let clone = [
            ext(0, 1000, 100, 0),
            ext(100, 9000, 50, 0),  // written: new blocks
            ext(150, 1150, 150, 0), // shared again, its own extent
            ext(500, 7000, 100, 0), // data past the base's data
        ];
        assert_eq!(
            compare(&base, &clone, 700),
            vec![
                (0, 100, Part::Shared),
                (100, 150, Part::Changed),
                (150, 300, Part::Shared),
                (300, 400, Part::Changed), // punched in the clone
                (400, 500, Part::Hole),
                (500, 600, Part::Changed),
                (600, 700, Part::Hole)
            ]
        );
    }

    /// A filesystem that does not mark shared extents, or maps to
    /// address 0, vouches for nothing (CIFS reports the logical offset as
    /// the physical one).
    #[test]
    fn unshared_or_unaddressed_extents_are_changed() {
        let unshared = |m: Mapping| Mapping {
            flags: m.flags & !SHARED,
            ..m
        };
        let base = [unshared(ext(0, 0, 100, 0)), unshared(ext(100, 100, 100, 0))];
        assert_eq!(compare(&base, &base, 200), vec![(0, 200, Part::Changed)]);
        let zero = [ext(0, 0, 100, 0)];
        assert_eq!(compare(&zero, &zero, 100), vec![(0, 100, Part::Changed)]);
    }

    #[test]
    fn extents_the_map_cannot_vouch_for_are_changed() {
        for flags in [0x4, 0x8, 0x800, 0x2 | 0x1] {
            let base = [ext(0, 1000, 100, 0)];
            let clone = [ext(0, 1000, 100, flags)];
            let want = if flags & NOT_PLAIN == 0 {
                Part::Shared
            } else {
                Part::Changed
            };
            assert_eq!(
                compare(&base, &clone, 100),
                vec![(0, 100, want)],
                "{flags:#x}"
            );
        }
    }

    #[test]
    fn the_runs_stop_at_the_size_and_overflow_is_harmless() {
        let base = [ext(0, u64::MAX - 10, u64::MAX, 0)];
        let clone = [ext(0, u64::MAX - 10, 50, 0)];
        assert_eq!(
            compare(&base, &clone, 100),
            vec![(0, 50, Part::Shared), (50, 100, Part::Changed)]
        );
        assert_eq!(compare(&[], &[], 0), vec![]);
    }
}

//! Where a file that nothing writes holds data: walked once with
//! SEEK_DATA/SEEK_HOLE, as far as the questions reach, then answered from
//! memory. The base image's block status, which every read of a client's
//! copy asks.
//!
//! Asking the file each time was quadratic in one common case: an
//! unwritten (preallocated) extent whose pages are in the page cache
//! (`cp` onto xfs leaves such extents; reading the whole image, to check
//! its sum say, caches them). The filesystem then finds where the extent's
//! data ends by visiting every cached page from the offset asked to the
//! extent's end, for each 256 KiB read: `mapping_seek_hole_data` took
//! 19-23 % of the server's time reading a 4 GiB base that way (perf). The
//! walk visits each extent once per process.
//!
//! The map is bounded: past [`MAX_RUNS`] data runs (a very fragmented
//! image) it is dropped and the file is asked again each time, as before.

use std::fs::File;
use std::io;

use crate::image::{self, push_extent};
use crate::nbd::storage::Extent;

/// The most data runs kept: 16 bytes each, 256 KiB at most per process.
pub const MAX_RUNS: usize = 16 * 1024;

/// The data runs of a file found so far.
#[derive(Debug, Default)]
pub struct DataMap {
    /// `[start, end)` of each data run, in order, not touching.
    runs: Vec<(u64, u64)>,
    /// Everything before this offset has been walked.
    known: u64,
    /// Too many runs to keep: the file answers each time.
    given_up: bool,
}

impl DataMap {
    /// The data/hole runs of `file`, of `size` bytes, over
    /// `[offset, end)` (`end <= size`), at most `max` of them, appended to
    /// `out` as [`image::data_runs`] would.
    pub fn extents(
        &mut self,
        file: &File,
        size: u64,
        offset: u64,
        end: u64,
        max: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        if !self.given_up {
            self.walk_to(file, size, end)?;
        }
        if self.given_up {
            return image::data_runs(file, offset, end - offset, max, out);
        }
        let mut next = self.runs.partition_point(|r| r.1 <= offset);
        let mut pos = offset;
        while pos < end {
            let (data, stop) = match self.runs.get(next) {
                Some(&(start, stop)) if start <= pos => {
                    next += 1;
                    (true, stop)
                }
                Some(&(start, _)) => (false, start),
                None => (false, end),
            };
            let stop = stop.min(end);
            if !push_extent(out, max, pos, stop - pos, data) {
                break;
            }
            pos = stop;
        }
        Ok(())
    }

    /// Walk on until everything before `target` is known. The last run
    /// found is followed to its real end, so no extent is visited twice.
    fn walk_to(&mut self, file: &File, size: u64, target: u64) -> io::Result<()> {
        while self.known < target.min(size) {
            let Some(start) = image::seek_data(file, self.known)?.filter(|&d| d < size) else {
                // No data after this (the file may have been cut short
                // since it was opened: what is gone reads as zeroes).
                self.known = size;
                break;
            };
            let stop = image::seek_hole(file, start)?
                .unwrap_or(size)
                .clamp(start + 1, size);
            if self.runs.len() >= MAX_RUNS {
                self.given_up = true;
                self.runs = Vec::new();
                return Ok(());
            }
            match self.runs.last_mut() {
                Some(last) if last.1 == start => last.1 = stop,
                _ => self.runs.push((start, stop)),
            }
            self.known = stop;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::{FallocateFlags, fallocate};
    use std::os::unix::fs::FileExt;

    const BLOCK: u64 = 4096;

    /// A file of `blocks` blocks with data where `pattern(i)`, unlinked.
    fn file(blocks: u64, pattern: impl Fn(u64) -> bool) -> File {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("tmpdisk-datamap-{}-{n}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.set_len(blocks * BLOCK).unwrap();
        for i in (0..blocks).filter(|&i| pattern(i)) {
            f.write_all_at(&[i as u8 | 1; BLOCK as usize], i * BLOCK)
                .unwrap();
        }
        f
    }

    /// Every range of a file with irregular holes: the map answers as the
    /// file does, asked in any order.
    #[test]
    fn answers_as_the_file_does() {
        let blocks = 64;
        let f = file(blocks, |i| i % 7 < 3 || (20..30).contains(&i));
        let size = blocks * BLOCK;
        let mut map = DataMap::default();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for a in (0..size).step_by(3 * BLOCK as usize + 512) {
            for len in [1, BLOCK, 5 * BLOCK + 7, size - a] {
                ranges.push((a, (a + len).min(size)));
            }
        }
        // Far ranges first, so that the walk is extended from the middle.
        ranges.reverse();
        for (offset, end) in ranges {
            for max in [1, 2, usize::MAX] {
                let (mut want, mut got) = (Vec::new(), Vec::new());
                image::data_runs(&f, offset, end - offset, max, &mut want).unwrap();
                map.extents(&f, size, offset, end, max, &mut got).unwrap();
                assert_eq!(got, want, "{offset}..{end} max {max}");
            }
        }
    }

    /// The walk is done once: a hole punched after the map saw the data is
    /// not asked about again (nothing writes a base; this shows the map
    /// answers from memory).
    #[test]
    fn walks_each_part_once() {
        let f = file(16, |_| true);
        let size = 16 * BLOCK;
        let mut map = DataMap::default();
        let mut out = Vec::new();
        map.extents(&f, size, 0, BLOCK, usize::MAX, &mut out)
            .unwrap();
        fallocate(
            &f,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            (8 * BLOCK) as i64,
            BLOCK as i64,
        )
        .unwrap();
        out.clear();
        map.extents(&f, size, 0, size, usize::MAX, &mut out)
            .unwrap();
        assert_eq!(
            out,
            vec![Extent {
                offset: 0,
                length: size,
                data: true
            }]
        );
    }

    /// A file with more runs than the map keeps is asked each time, and
    /// answered right.
    #[test]
    fn too_many_runs_fall_back_to_the_file() {
        let blocks = 2 * MAX_RUNS as u64 + 8;
        let f = file(blocks, |i| i % 2 == 0);
        let size = blocks * BLOCK;
        let mut map = DataMap::default();
        let (mut want, mut got) = (Vec::new(), Vec::new());
        map.extents(&f, size, 0, size, usize::MAX, &mut got)
            .unwrap();
        assert!(map.given_up && map.runs.is_empty());
        image::data_runs(&f, 0, size, usize::MAX, &mut want).unwrap();
        assert_eq!(got, want);
    }
}

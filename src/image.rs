//! The temporary image: a sparse file that has no name.
//!
//! It is created with `O_TMPFILE` in the tmpdir (or, where the filesystem
//! lacks it, under a private name that is unlinked at once), so it lives
//! exactly as long as our fd: when the process dies, however it dies, the
//! kernel frees it. Everything the protocol does to the disk goes through
//! here: positional reads and writes, hole punching, zeroing by fallocate,
//! and the SEEK_DATA/SEEK_HOLE walk behind block status and sparse reads.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use nix::fcntl::{FallocateFlags, PosixFadviseAdvice, fallocate, posix_fadvise};
use nix::unistd::{Whence, lseek};

use crate::nbd::storage::{Extent, Received, Storage, ZeroCopy};

/// How the image got its (lack of a) name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anonymity {
    /// `O_TMPFILE`: it never had a name.
    Tmpfile,
    /// The filesystem does not support O_TMPFILE: it had a private name for
    /// the moment between open and unlink.
    Unlinked,
}

pub struct Image {
    /// Shared with the disk's registry entry, which reports the space it
    /// takes: a second descriptor would be a second open image.
    file: Arc<File>,
    size: u64,
}

impl Image {
    /// Make a new, empty, sparse image of `size` bytes in `dir`, with
    /// `O_TMPFILE` where the filesystem has it.
    pub fn create(dir: &Path, size: u64) -> io::Result<(Image, Anonymity)> {
        Image::create_as(dir, size, Anonymity::Tmpfile)
    }

    /// [`Image::create`], choosing how the image is made nameless: `how`
    /// [`Anonymity::Unlinked`] skips `O_TMPFILE`. A reflink clone wants
    /// that: on xfs (kernel 6.18 here), 4 KiB random writes into a clone
    /// made in an `O_TMPFILE` ran at half the rate of the same clone in a
    /// file created and unlinked at once (fio randwrite QD16 through
    /// tmpdisk, three alternating runs: 34-41k against 66-87k IOPS; fio
    /// psync on the file itself: 40-57k against 104-175k). With the
    /// O_TMPFILE, every timestamp update (one a clock tick) logged the
    /// clone's whole in-core extent list (`xfs_iextents_copy`, 67 % of
    /// the server's time). Plain images, and ext4, showed no difference.
    pub fn create_as(dir: &Path, size: u64, how: Anonymity) -> io::Result<(Image, Anonymity)> {
        let tmpfile = match how {
            Anonymity::Tmpfile => open_tmpfile(dir),
            Anonymity::Unlinked => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        };
        let (file, how) = match tmpfile {
            Ok(f) => (f, Anonymity::Tmpfile),
            // EOPNOTSUPP/EISDIR/EINVAL: this filesystem or kernel has no
            // O_TMPFILE. Anything else (ENOENT, EACCES, ...) is a real error.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)
                ) =>
            {
                (open_unlinked(dir)?, Anonymity::Unlinked)
            }
            Err(e) => return Err(e),
        };
        file.set_len(size).map_err(|e| {
            if e.raw_os_error() == Some(libc::EFBIG) {
                io::Error::new(
                    e.kind(),
                    format!(
                        "{size} bytes is larger than the tmpdir's filesystem allows for a file"
                    ),
                )
            } else {
                e
            }
        })?;
        Ok((
            Image {
                file: Arc::new(file),
                size,
            },
            how,
        ))
    }

    /// An image whose file another process made and handed over (see
    /// [`crate::reconnect`]); its size is the file's.
    pub fn adopt(fd: std::os::fd::OwnedFd) -> io::Result<Image> {
        let file = File::from(fd);
        let size = file.metadata()?.len();
        Ok(Image {
            file: Arc::new(file),
            size,
        })
    }

    /// The image's file, for the registry to watch (the same descriptor).
    pub fn shared_file(&self) -> Arc<File> {
        Arc::clone(&self.file)
    }

    /// Bytes of real disk space the image occupies.
    pub fn allocated(&self) -> u64 {
        allocated_of(&self.file)
    }

    /// Make the file `size` bytes long again (a clone took the base's
    /// length): what it grows by reads as zeroes, a hole. A file already
    /// that long is left alone: xfs counts a truncate to the same length
    /// as a truncate down, and then writes every dirty page back when the
    /// file is closed. Measured on a clone of a 4 GiB base after 5 s of
    /// 4 KiB random writes: the process took 9-15 s to exit, all of it in
    /// close(2) writing the client's data out.
    pub fn set_size(&mut self, size: u64) -> io::Result<()> {
        if self.file.metadata()?.len() != size {
            self.file.set_len(size)?;
        }
        self.size = size;
        Ok(())
    }

    /// Re-read the size after something else (the user's command) may have
    /// changed it.
    pub fn refresh_size(&mut self) -> io::Result<u64> {
        self.size = self.file.metadata()?.len();
        Ok(self.size)
    }

    fn read_zero_filled(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        read_zero_filled(&self.file, buf, offset)
    }

    /// Deallocate a range: it reads back as zeroes and frees disk space.
    pub fn punch_hole(&self, offset: u64, length: u64) -> io::Result<()> {
        self.fallocate(
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset,
            length,
        )
    }

    /// Give back the disk space of every range that reads as zeroes: punch
    /// each hole SEEK_HOLE reports. A range can read as zeroes and still
    /// hold disk space: mkfs.xfs clears its log (64 MiB at 1 GiB) with
    /// FALLOC_FL_ZERO_RANGE, which leaves allocated, unwritten extents
    /// behind. A hole reads as zeroes by definition, so punching it changes
    /// nothing a client can see. Punching costs a journal transaction per
    /// hole on ext4 (about 0.3 ms in all for a fresh image here), so it is
    /// only done when the image holds more than `slack` bytes beyond its
    /// data. Returns how many bytes of disk were freed.
    pub fn release_holes(&self, slack: u64) -> io::Result<u64> {
        let before = self.allocated();
        if before <= slack {
            return Ok(0);
        }
        let mut data = 0;
        self.for_each_run(|r| {
            if r.data {
                data += r.length;
            }
            Ok(())
        })?;
        if before <= data.saturating_add(slack) {
            return Ok(0);
        }
        let punched = self.for_each_run(|r| match r.data {
            true => Ok(()),
            false => self.punch_hole(r.offset, r.length),
        });
        match punched {
            // A filesystem that cannot punch keeps the space.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(0),
            r => r.map(|()| before.saturating_sub(self.allocated())),
        }
    }

    /// Calls `f` on each data or hole run of the whole image, in order,
    /// holding a bounded number of them at a time.
    fn for_each_run(&self, mut f: impl FnMut(&Extent) -> io::Result<()>) -> io::Result<()> {
        let mut runs = Vec::new();
        let mut pos = 0;
        while pos < self.size {
            runs.clear();
            self.runs(pos, self.size - pos, 64, &mut runs)?;
            let Some(last) = runs.last() else { break };
            pos = last.offset + last.length;
            runs.iter().try_for_each(&mut f)?;
        }
        Ok(())
    }

    /// Zero a range and keep it allocated (for NBD_CMD_FLAG_NO_HOLE).
    fn zero_range(&self, offset: u64, length: u64) -> io::Result<()> {
        self.fallocate(
            FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset,
            length,
        )
    }

    fn fallocate(&self, flags: FallocateFlags, offset: u64, length: u64) -> io::Result<()> {
        let (off, len) = (to_off(offset)?, to_off(length)?);
        loop {
            match fallocate(&self.file, flags, off, len) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => return r.map_err(io::Error::from),
            }
        }
    }

    /// Write literal zero bytes (when the filesystem can do nothing faster).
    fn write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];
        let mut done = 0u64;
        while done < length {
            let n = (length - done).min(ZEROES.len() as u64) as usize;
            self.file.write_all_at(&ZEROES[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Hint that a range will be read soon (NBD_CMD_CACHE).
    fn prefetch(&self, offset: u64, length: u64) -> io::Result<()> {
        posix_fadvise(
            &self.file,
            to_off(offset)?,
            to_off(length)?,
            PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        )
        .map_err(io::Error::from)
    }

    fn runs(&self, offset: u64, length: u64, max: usize, out: &mut Vec<Extent>) -> io::Result<()> {
        data_runs(&self.file, offset, length, max, out)
    }
}

/// Bytes of real disk space `file` occupies (0 if it cannot be told).
pub(crate) fn allocated_of(file: &File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    file.metadata()
        .map_or(0, |m| m.blocks().saturating_mul(512))
}

/// Fill `buf` from `offset` of `file`; a range past the end of the file
/// reads as zeroes (the one place that rule lives: a disk larger than its
/// base, a base or image that shrank under us).
pub(crate) fn read_zero_filled(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The data/hole runs of `file` covering `[offset, offset+length)`, at most
/// `max` of them (the last one may then end early), appended to `out` and
/// merged with its last run where they meet. Ranges past the end of the
/// file are holes.
pub(crate) fn data_runs(
    file: &File,
    offset: u64,
    length: u64,
    max: usize,
    out: &mut Vec<Extent>,
) -> io::Result<()> {
    let end = offset.saturating_add(length);
    let mut pos = offset;
    while pos < end {
        let (data, next) = match seek(file, pos, Whence::SeekData)? {
            // Data starts here: it runs until the next hole.
            Some(d) if d == pos => (true, seek(file, pos, Whence::SeekHole)?.unwrap_or(end)),
            // A hole runs until the next data (or the end).
            Some(d) => (false, d),
            None => (false, end),
        };
        let stop = next.clamp(pos + 1, end);
        if !push_extent(out, max, pos, stop - pos, data) {
            break;
        }
        pos = stop;
    }
    Ok(())
}

/// Append a run to `out`, merged into the last one when it continues it
/// with the same kind; false (nothing added) when `out` already holds
/// `max` runs and this one cannot merge.
pub(crate) fn push_extent(
    out: &mut Vec<Extent>,
    max: usize,
    offset: u64,
    length: u64,
    data: bool,
) -> bool {
    let full = out.len() >= max;
    match out.last_mut() {
        Some(last) if last.data == data && last.offset + last.length == offset => {
            last.length += length;
            true
        }
        _ if full => false,
        _ => {
            out.push(Extent {
                offset,
                length,
                data,
            });
            true
        }
    }
}

/// lseek with SEEK_DATA/SEEK_HOLE; `None` where the kernel says there is
/// no more data (ENXIO) past `pos`.
/// Where the next data at or after `pos` starts; None past the last.
pub(crate) fn seek_data(file: &File, pos: u64) -> io::Result<Option<u64>> {
    seek(file, pos, Whence::SeekData)
}

/// Where the next hole at or after `pos` starts (the end of the file is
/// one); None past the end.
pub(crate) fn seek_hole(file: &File, pos: u64) -> io::Result<Option<u64>> {
    seek(file, pos, Whence::SeekHole)
}

fn seek(file: &File, pos: u64, whence: Whence) -> io::Result<Option<u64>> {
    match lseek(file, to_off(pos)?, whence) {
        Ok(p) => Ok(Some(p as u64)),
        Err(nix::errno::Errno::ENXIO) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// What the protocol sees: reads and writes of every byte or an error,
/// holes, zeroes, and the zero-copy paths through the image's fd.
impl Storage for Image {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_zero_filled(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        // write_all_at: a short count (the filesystem stored only what fit)
        // is followed by the call that says why the rest cannot go in.
        self.file.write_all_at(buf, offset)
    }

    fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        match self.punch_hole(offset, length) {
            // TRIM is advisory: a filesystem that cannot punch holes simply
            // keeps the data.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            r => r,
        }
    }

    /// Without NO_HOLE a punched hole is best: it reads as zeroes and
    /// frees space. Then zeroing by fallocate; FAST_ZERO only succeeds
    /// where one of those does, and never falls back to writing zeroes.
    fn zero(&self, offset: u64, length: u64, may_punch: bool, fast: bool) -> io::Result<()> {
        let unsupported = |e: &io::Error| e.raw_os_error() == Some(libc::EOPNOTSUPP);
        if may_punch {
            match self.punch_hole(offset, length) {
                Err(e) if unsupported(&e) => {}
                r => return r,
            }
        }
        match self.zero_range(offset, length) {
            Err(e) if unsupported(&e) => {}
            r => return r,
        }
        if fast {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this filesystem cannot zero without writing",
            ));
        }
        self.write_zeroes(offset, length)
    }

    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.prefetch(offset, length)
    }

    fn extents(
        &self,
        offset: u64,
        length: u64,
        max: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        self.runs(offset, length, max, out)
    }

    fn send(
        &self,
        out: &mut dyn ZeroCopy,
        head: &[&[u8]],
        offset: u64,
        len: usize,
    ) -> io::Result<bool> {
        let sent = out.send_file(head, self.file.as_fd(), offset, len)?;
        if sent < len {
            // The file ended early: what is not there reads as zeroes, and
            // read_at is where that rule lives.
            let mut rest = vec![0u8; (len - sent).min(1 << 20)];
            let mut done = sent;
            while done < len {
                let n = (len - done).min(rest.len());
                self.read_zero_filled(&mut rest[..n], offset + done as u64)?;
                out.write_all(&rest[..n])?;
                done += n;
            }
        }
        Ok(true)
    }

    /// A splice lands anywhere in a plain file: nothing is topped up. (How
    /// its page cache takes the aligned writes this gives a stream of
    /// large writes when this VM's memory is cold: README, Performance,
    /// "Payloads stay in the socket".)
    fn receive_align(&self) -> u64 {
        1
    }

    fn receive(
        &self,
        inp: &mut dyn ZeroCopy,
        offset: u64,
        len: usize,
    ) -> io::Result<Option<Received>> {
        inp.splice_to_file(self.file.as_fd(), offset, len).map(Some)
    }
}

impl AsFd for Image {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

fn to_off(v: u64) -> io::Result<i64> {
    i64::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

fn open_tmpfile(dir: &Path) -> io::Result<File> {
    // std adds O_CLOEXEC to every open.
    OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
}

/// The start of the private names process `pid` gives its images
/// ([`open_unlinked`]).
fn private_prefix(pid: u32) -> String {
    format!(".tmpdisk-{pid}-")
}

/// For filesystems without O_TMPFILE, and for reflink clones: a name nobody
/// else can guess or open (O_EXCL, mode 0600), unlinked before anything
/// else happens.
fn open_unlinked(dir: &Path) -> io::Result<File> {
    for attempt in 0..100u32 {
        let name = dir.join(format!(
            "{}{}-{attempt}",
            private_prefix(std::process::id()),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        ));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&name)
        {
            Ok(f) => {
                std::fs::remove_file(&name)?;
                return Ok(f);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "could not find a free temporary name",
    ))
}

/// After a signal ended a client process: remove what it may have left in
/// the tmpdir. A kill between creating an image's private name and
/// unlinking it (a clone's, or any image where the filesystem has no
/// O_TMPFILE) leaves that name, empty; under systemd it is in the
/// instance's private /var/tmp, which goes with the instance.
pub fn clear_left_behind(tmpdir: &Path, pid: u32) {
    match remove_left_behind(tmpdir, pid) {
        Ok(0) => {}
        Ok(removed) => tracing::info!(
            pid,
            removed,
            "removed the empty image name a killed client process left"
        ),
        Err(e) => tracing::warn!(
            pid,
            tmpdir = %tmpdir.display(),
            error = %e,
            "cannot look for what a killed client process left in the tmpdir"
        ),
    }
}

/// Remove what a process `pid`, killed between creating a private name
/// and unlinking it, can have left in `dir`: empty regular files under
/// its prefix (nothing is written to the image before the unlink). Returns
/// how many were removed.
pub fn remove_left_behind(dir: &Path, pid: u32) -> io::Result<usize> {
    let prefix = private_prefix(pid);
    let mut removed = 0;
    for dirent in std::fs::read_dir(dir)?.flatten() {
        if !dirent.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let path = dirent.path();
        // Not followed: a symlink or a file with data is not ours.
        let ours =
            std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_file() && m.len() == 0);
        if ours {
            std::fs::remove_file(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(size: u64) -> Image {
        Image::create(&std::env::temp_dir(), size)
            .expect("image in temp dir")
            .0
    }

    #[test]
    fn only_a_dead_process_s_empty_private_names_are_removed() {
        let dir = std::env::temp_dir().join(format!("tmpdisk-left-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        let touch = |name: &str, data: &[u8]| std::fs::write(dir.join(name), data).unwrap();
        touch(".tmpdisk-424242-17-0", b"");
        touch(".tmpdisk-424242-18-0", b"data: not what the window leaves");
        touch(".tmpdisk-4242420-17-0", b"");
        touch("tmpdisk-424242-17-0", b"");
        std::os::unix::fs::symlink("/dev/null", dir.join(".tmpdisk-424242-19-0")).unwrap();
        assert_eq!(remove_left_behind(&dir, 424242).unwrap(), 1);
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".tmpdisk-424242-18-0",
                ".tmpdisk-424242-19-0",
                ".tmpdisk-4242420-17-0",
                "tmpdisk-424242-17-0"
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fresh_image_is_one_hole() {
        let img = image(1 << 20);
        let mut out = Vec::new();
        img.extents(0, 1 << 20, 16, &mut out).unwrap();
        assert_eq!(
            out,
            vec![Extent {
                offset: 0,
                length: 1 << 20,
                data: false
            }]
        );
    }

    #[test]
    fn written_block_is_data_and_punch_makes_it_a_hole() {
        let img = image(1 << 20);
        img.write_at(&[7u8; 4096], 65536).unwrap();
        let mut out = Vec::new();
        img.extents(0, 1 << 20, 16, &mut out).unwrap();
        assert!(
            out.iter()
                .any(|e| e.data && e.offset <= 65536 && e.offset + e.length >= 69632),
            "{out:?}"
        );
        assert_eq!(out.iter().map(|e| e.length).sum::<u64>(), 1 << 20);
        img.punch_hole(65536, 4096).unwrap();
        out.clear();
        img.extents(0, 1 << 20, 16, &mut out).unwrap();
        assert!(out.iter().all(|e| !e.data), "{out:?}");
        let mut buf = [1u8; 4096];
        img.read_at(&mut buf, 65536).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn release_holes_frees_reserved_zeroes_and_keeps_data() {
        let img = image(4 << 20);
        img.write_at(&[9u8; 4096], 0).unwrap();
        img.write_at(&[5u8; 4096], (3 << 20) + 8192).unwrap();
        // Reserved but never written, as mkfs.xfs leaves its log: reads as
        // zeroes, SEEK_DATA calls it a hole, yet it takes disk space.
        fallocate(
            &img.file,
            FallocateFlags::FALLOC_FL_KEEP_SIZE,
            1 << 20,
            2 << 20,
        )
        .unwrap();
        assert!(img.allocated() >= 2 << 20, "{}", img.allocated());
        assert_eq!(img.release_holes(4 << 20).unwrap(), 0, "within the slack");
        let freed = img.release_holes(1 << 20).unwrap();
        assert!(freed >= 2 << 20, "freed {freed}");
        assert!(img.allocated() < 1 << 20, "{}", img.allocated());
        let mut a = [0u8; 4096];
        img.read_at(&mut a, 0).unwrap();
        assert_eq!(a, [9u8; 4096]);
        img.read_at(&mut a, (3 << 20) + 8192).unwrap();
        assert_eq!(a, [5u8; 4096]);
        img.read_at(&mut a, 1 << 20).unwrap();
        assert_eq!(a, [0u8; 4096]);
    }

    #[test]
    fn extents_stop_at_max() {
        let img = image(1 << 20);
        for i in 0..8u64 {
            img.write_at(&[1u8; 4096], i * 65536).unwrap();
        }
        let mut out = Vec::new();
        img.extents(0, 1 << 20, 3, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].offset, 0);
        assert!(out[0].data);
    }
}

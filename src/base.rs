//! The golden image (`--base`): a prepared disk every client gets a fresh
//! copy-on-write copy of. It is opened once, read-only, when tmpdisk
//! starts, and checked there (it exists, it is a regular file or a block
//! device, it is not empty); every client process uses that one open file,
//! so replacing the path later (a new image renamed into place) changes
//! nothing for clients already running, and the next process sees the new
//! one. Nothing here ever writes to it.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use crate::clonemap::{self, Part};
use crate::datamap::DataMap;
use crate::image::{self, Image};
use crate::nbd::storage::{Extent, Storage};
use crate::sys;

/// The most extents of the base, or of a command's clone, that
/// [`Base::compare_clone`] maps (2 MiB of them, 32 bytes each): a clone
/// past it is served as the one file it is.
pub const MAX_MAPPED: usize = 1 << 16;

/// The most of a command's writes to its clone still in the page cache
/// that [`Base::compare_clone`] writes out to compare the clone (tune2fs -U
/// leaves a few KiB; 32 MiB is a fraction of a second on a disk).
pub const MAX_WRITE_BACK: u64 = 32 << 20;

/// What [`Base::compare_clone`] found.
#[derive(Debug)]
pub enum Compared {
    /// The clone, cut into runs of what it holds.
    Parts(Vec<(u64, u64, Part)>),
    /// Either file has more than [`MAX_MAPPED`] extents.
    TooManyExtents,
    /// The command left this many bytes unwritten in the page cache, more
    /// than [`MAX_WRITE_BACK`].
    TooMuchToWriteBack(u64),
}

/// Why the base image cannot be used; the text is one line for stderr.
#[derive(Debug)]
pub enum BaseError {
    Open {
        path: PathBuf,
        error: io::Error,
    },
    Directory(PathBuf),
    /// Neither a regular file nor a block device (a FIFO, a socket...).
    Kind(PathBuf),
    Empty(PathBuf),
    Size {
        path: PathBuf,
        error: io::Error,
    },
}

impl std::fmt::Display for BaseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BaseError::Open { path, error } | BaseError::Size { path, error } => {
                write!(f, "base image {}: {error}", path.display())
            }
            BaseError::Directory(p) => {
                write!(
                    f,
                    "base image {}: is a directory, not an image",
                    p.display()
                )
            }
            BaseError::Kind(p) => write!(
                f,
                "base image {}: neither a regular file nor a block device",
                p.display()
            ),
            BaseError::Empty(p) => write!(f, "base image {}: is empty", p.display()),
        }
    }
}

/// The open base image.
#[derive(Debug)]
pub struct Base {
    file: File,
    path: PathBuf,
    size: u64,
    /// A block device: no holes to ask about, all of it reads as data.
    device: bool,
    /// Where a file holds data, walked once per process (see
    /// [`crate::datamap`]). A Mutex only so that the base can be shared
    /// as `Arc`; one thread serves a client.
    map: Mutex<DataMap>,
}

impl Base {
    /// Open and check `path`, read-only.
    pub fn open(path: &Path) -> Result<Base, BaseError> {
        let bad = |error| BaseError::Open {
            path: path.to_path_buf(),
            error,
        };
        // std opens with O_CLOEXEC; read-only, so nothing can write through
        // it by mistake; O_NONBLOCK, so that a FIFO cannot hold the start
        // (it makes no difference to a file or a block device).
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(bad)?;
        let kind = file.metadata().map_err(bad)?.file_type();
        if kind.is_dir() {
            return Err(BaseError::Directory(path.to_path_buf()));
        }
        let device = kind.is_block_device();
        if !kind.is_file() && !device {
            return Err(BaseError::Kind(path.to_path_buf()));
        }
        // A block device's size is where SEEK_END takes us; a file's too.
        let size = nix::unistd::lseek(&file, 0, nix::unistd::Whence::SeekEnd)
            .map(|end| end as u64)
            .map_err(|e| BaseError::Size {
                path: path.to_path_buf(),
                error: e.into(),
            })?;
        if size == 0 {
            return Err(BaseError::Empty(path.to_path_buf()));
        }
        Ok(Base {
            file,
            path: path.to_path_buf(),
            size,
            device,
            map: Mutex::default(),
        })
    }

    /// The base another process opened and handed over with a client's
    /// overlay (see [`crate::reconnect`]): the file it served, even if the
    /// image at `path` was replaced since.
    pub fn adopt(fd: std::os::fd::OwnedFd, path: &Path) -> Result<Base, BaseError> {
        let file = File::from(fd);
        let bad = |error| BaseError::Open {
            path: path.to_path_buf(),
            error,
        };
        let device = file.metadata().map_err(bad)?.file_type().is_block_device();
        let size = nix::unistd::lseek(&file, 0, nix::unistd::Whence::SeekEnd)
            .map(|end| end as u64)
            .map_err(|e| bad(e.into()))?;
        Ok(Base {
            file,
            path: path.to_path_buf(),
            size,
            device,
            map: Mutex::default(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fill `buf` from `offset`; past the end of the base, zeroes (a disk
    /// larger than its base reads as zeroes there).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        image::read_zero_filled(&self.file, buf, offset)
    }

    /// The data/hole runs of the base over `[offset, offset+length)` (see
    /// `Storage::extents`); past its end, a hole.
    pub fn extents(
        &self,
        offset: u64,
        length: u64,
        max: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        let end = offset.saturating_add(length);
        let inside = end.min(self.size).saturating_sub(offset);
        if inside > 0 {
            if self.device {
                image::push_extent(out, max, offset, inside, true);
            } else {
                let stop = offset + inside;
                self.map
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extents(&self.file, self.size, offset, stop, max, out)?;
            }
        }
        if offset + inside < end {
            image::push_extent(out, max, offset + inside, end - offset - inside, false);
        }
        Ok(())
    }

    /// Whether a clone of the base into `dir` may work on xfs: the base is
    /// a file on the same filesystem as `dir` (FICLONE fails across
    /// filesystems, and for a block device), and that is xfs. A guess, for
    /// choosing how to make the image (see `Image::create_as`, measured on
    /// xfs only); the clone itself decides.
    pub fn may_clone_on_xfs(&self, dir: &Path) -> bool {
        use nix::sys::statfs::{FsType, statfs};
        // nix names XFS_SUPER_MAGIC for glibc only; the value is the
        // kernel's (include/uapi/linux/magic.h), the same on every libc.
        const XFS_SUPER_MAGIC: FsType = FsType(0x5846_5342);
        use std::os::unix::fs::MetadataExt;
        let dev = |m: io::Result<std::fs::Metadata>| m.map(|m| m.dev()).ok();
        !self.device
            && dev(self.file.metadata()).is_some_and(|d| Some(d) == dev(std::fs::metadata(dir)))
            && statfs(dir).is_ok_and(|s| s.filesystem_type() == XFS_SUPER_MAGIC)
    }

    /// Make `image` a copy of the base by sharing its extents (reflink:
    /// FICLONE, on xfs with reflink=1, btrfs, bcachefs): no data is copied
    /// and no space taken. Fails (EXDEV, EOPNOTSUPP, EINVAL) where the
    /// tmpdir cannot share extents with the base.
    pub fn clone_into(&self, image: &Image) -> io::Result<()> {
        if self.device {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        sys::clone_file(image.as_fd(), self.file.as_fd())
    }

    /// What `clone`, a reflink clone of the base that a command has had,
    /// still shares with the base and what the command changed, over the
    /// clone's size (see [`crate::clonemap`]). The clone's dirty pages are
    /// written out first (FIEMAP_FLAG_SYNC), so that every change is mapped
    /// where it will stay; a command that left more than
    /// [`MAX_WRITE_BACK`] of them is not compared: the client would wait
    /// for that write-back, and the device take it, for data that is
    /// dropped when the client leaves.
    pub fn compare_clone(&self, clone: &Image) -> io::Result<Compared> {
        // Unknown (a kernel before 6.5, a sandbox that refuses the call):
        // compare anyway.
        if let Ok(bytes) = sys::dirty_bytes(clone.as_fd())
            && bytes > MAX_WRITE_BACK
        {
            return Ok(Compared::TooMuchToWriteBack(bytes));
        }
        let Some(ours) = sys::fiemap(self.file.as_fd(), false, MAX_MAPPED)? else {
            return Ok(Compared::TooManyExtents);
        };
        let Some(theirs) = sys::fiemap(clone.as_fd(), true, MAX_MAPPED)? else {
            return Ok(Compared::TooManyExtents);
        };
        Ok(Compared::Parts(clonemap::compare(
            &ours,
            &theirs,
            clone.size(),
        )))
    }

    /// Call `f(offset, length)` for each run of the base that holds data,
    /// in order: the one walk of its extents, for sizing a full copy and
    /// for making it.
    fn each_data_run(&self, mut f: impl FnMut(u64, u64) -> io::Result<()>) -> io::Result<()> {
        let mut runs = Vec::new();
        let mut pos = 0;
        while pos < self.size {
            runs.clear();
            self.extents(pos, self.size - pos, 64, &mut runs)?;
            let Some(last) = runs.last() else { break };
            pos = last.offset + last.length;
            for r in runs.iter().filter(|r| r.data) {
                f(r.offset, r.length)?;
            }
        }
        Ok(())
    }

    /// Bytes of the base that hold data (what a full copy writes).
    pub fn data_bytes(&self) -> io::Result<u64> {
        let mut total = 0;
        self.each_data_run(|_, length| {
            total += length;
            Ok(())
        })?;
        Ok(total)
    }

    /// Copy the base's data into `image`, leaving its holes holes: the
    /// fallback for a `--command` where no clone is possible (the command
    /// needs the client's copy as one file). copy_file_range stays inside
    /// the kernel where it can (not from a block device).
    pub fn copy_into(&self, image: &Image) -> io::Result<u64> {
        let mut copied = 0;
        self.each_data_run(|offset, length| {
            copy_range(&self.file, image, offset, length)?;
            copied += length;
            Ok(())
        })?;
        Ok(copied)
    }
}

/// copy_file_range(2) of `[offset, offset+length)` from `src` to the same
/// place in `dst`, until all of it is there. Where the kernel cannot (a
/// block device: copy_file_range takes regular files only; a kernel
/// before 5.19 between two kinds of filesystem), through memory instead.
fn copy_range(src: &File, dst: &Image, offset: u64, length: u64) -> io::Result<()> {
    use nix::errno::Errno;
    let to_off =
        |v: u64| i64::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let (mut from, mut to) = (to_off(offset)?, to_off(offset)?);
    let mut left = length;
    while left > 0 {
        let want = left.min(1 << 30) as usize;
        match nix::fcntl::copy_file_range(src, Some(&mut from), dst, Some(&mut to), want) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => left -= n as u64,
            Err(Errno::EINTR) => {}
            Err(Errno::EINVAL | Errno::EXDEV | Errno::EOPNOTSUPP | Errno::ENOSYS)
                if left == length =>
            {
                return copy_through_memory(src, dst, offset, length);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Bytes read at a time by [`copy_through_memory`].
const COPY_CHUNK: usize = 1 << 20;

/// Copy `[offset, offset+length)` from `src` into the same place in `dst`
/// by reading and writing, leaving out every block of zeroes: `dst` is a
/// fresh sparse image, so they stay holes there (a block device has no
/// holes to skip by asking).
fn copy_through_memory(src: &File, dst: &Image, offset: u64, length: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const BLOCK: usize = 4096;
    let out = dst.shared_file();
    let mut buf = vec![0u8; COPY_CHUNK.min(usize::try_from(length).unwrap_or(COPY_CHUNK))];
    let mut done = 0u64;
    while done < length {
        let want = buf
            .len()
            .min(usize::try_from(length - done).unwrap_or(buf.len()));
        let n = match src.read_at(&mut buf[..want], offset + done) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        // Runs of blocks that are not all zeroes, each written at once.
        let mut run: Option<usize> = None;
        for start in (0..n).step_by(BLOCK) {
            let block = &buf[start..(start + BLOCK).min(n)];
            match (block.iter().all(|&b| b == 0), run) {
                (false, None) => run = Some(start),
                (true, Some(from)) => {
                    out.write_all_at(&buf[from..start], offset + done + from as u64)?;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(from) = run {
            out.write_all_at(&buf[from..n], offset + done + from as u64)?;
        }
        done += n as u64;
    }
    Ok(())
}

impl AsFd for Base {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

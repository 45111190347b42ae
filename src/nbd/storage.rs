//! What transmission needs from a disk, whatever holds it: the plain
//! nameless image ([`crate::image`]) today, a copy-on-write overlay next.
//! The protocol code asks for bytes, holes and zeroes through [`Storage`]
//! and never learns what is behind it.
//!
//! Large reads and writes can move between the disk and the client inside
//! the kernel; the connection offers that through [`ZeroCopy`] and the
//! storage decides whether, and from which file, it can. No system calls
//! here: both traits are implemented outside `nbd/`.

use std::io;
use std::os::fd::BorrowedFd;

/// A run of the disk that is either all data or all hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// False for a hole (reads as zeroes, takes no space).
    pub data: bool,
}

/// A client's disk. Every method answers for the whole range it is given
/// or fails: a write that could store only part of its bytes is an error,
/// never a success.
pub trait Storage {
    /// The size the client was promised.
    fn size(&self) -> u64;

    /// Fill `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Store all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Deallocate a range (TRIM): it reads as zeroes afterwards where the
    /// storage can punch holes; where it cannot, nothing changes (TRIM is
    /// advisory) and this still succeeds.
    fn trim(&self, offset: u64, length: u64) -> io::Result<()>;

    /// Make a range read as zeroes. `may_punch`: leaving a hole is fine
    /// (no NBD_CMD_FLAG_NO_HOLE). `fast`: fail with
    /// [`io::ErrorKind::Unsupported`], changing nothing, rather than write
    /// zero bytes (NBD_CMD_FLAG_FAST_ZERO).
    fn zero(&self, offset: u64, length: u64, may_punch: bool, fast: bool) -> io::Result<()>;

    /// A hint that a range will be read soon (NBD_CMD_CACHE).
    fn cache(&self, offset: u64, length: u64) -> io::Result<()>;

    /// The data/hole runs covering `[offset, offset+length)`, at most `max`
    /// of them (the last one may then end early), appended to `out`.
    fn extents(
        &self,
        offset: u64,
        length: u64,
        max: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()>;

    /// Send `head` and then `len` bytes from `offset` to the client through
    /// `out` without copying them through memory. `Ok(false)`, with nothing
    /// sent, when this storage cannot; the caller then reads and sends the
    /// data itself. Once anything is sent, an error is a broken stream.
    fn send(
        &self,
        out: &mut dyn ZeroCopy,
        head: &[&[u8]],
        offset: u64,
        len: usize,
    ) -> io::Result<bool>;

    /// Where [`Storage::receive`] can take a payload: from a multiple of
    /// this many bytes of the disk (1: anywhere), and, for the overlay, up
    /// to one or the disk's end. The part of a large write that came in
    /// with its header is written up to such a boundary, so that the rest
    /// can go by splice. No default: a wrapper that forgot to pass it on
    /// silently copied every large write into an overlay.
    fn receive_align(&self) -> u64;

    /// Take the next `len` bytes the client sends through `inp` and store
    /// them at `offset`. `Ok(None)`, with nothing consumed, when this
    /// storage cannot; the caller then reads the payload itself. An `Err`
    /// is a broken stream.
    fn receive(
        &self,
        inp: &mut dyn ZeroCopy,
        offset: u64,
        len: usize,
    ) -> io::Result<Option<Received>>;
}

/// What became of a payload received straight into the disk.
#[derive(Debug)]
pub enum Received {
    /// Stored, every byte.
    Stored,
    /// Consumed from the client, but the disk refused (part of) it
    /// (ENOSPC...): the client gets this error; the stream is in step.
    Failed(io::Error),
}

/// A connection that can move bytes between the client and a file inside
/// the kernel (a plain socket or pipe; not TLS, whose bytes must pass
/// through the cipher).
pub trait ZeroCopy: io::Write {
    /// Write all of `head`, then up to `len` bytes of `file` from `offset`.
    /// Returns how many bytes of the file went out: fewer than `len` only
    /// where the file ends.
    fn send_file(
        &mut self,
        head: &[&[u8]],
        file: BorrowedFd<'_>,
        offset: u64,
        len: usize,
    ) -> io::Result<usize>;

    /// Consume exactly `len` bytes from the client and store them in `file`
    /// at `offset`. A failure of the file is [`Received::Failed`], with the
    /// rest of the bytes still consumed; an `Err` is a broken stream.
    fn splice_to_file(
        &mut self,
        file: BorrowedFd<'_>,
        offset: u64,
        len: usize,
    ) -> io::Result<Received>;
}

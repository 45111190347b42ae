"""The golden-image rows' files, made once per run under the scratch dir
and removed on every way out: the base (a 4 GiB raw ext4 image holding
about 700 MiB of random files, made with mkfs.ext4 -d), the tmpdir that
tmpdisk's overlay path and both peers use, and for the clone path a
loop-mounted xfs (reflink=1) holding a copy of the base and that path's
tmpdir.  The base's content hash is taken when it is made and checked at
the end: no server may have written to it."""

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import time

from .common import MiB, log, size_str, uninterrupted
from .config import SERVER_PATH, Golden
from .machine import fs_of

HASH_BLOCK = MiB
XFS_SIZE_FACTOR = 4  # the xfs is 4× the base: the copy, plus every client's writes (one client at a time)


def data_extents(fd):
    """[(start, end)] of the file's data (SEEK_DATA / SEEK_HOLE)."""
    size = os.fstat(fd).st_size
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end))
        pos = end
    return out


def content_hash(path):
    """sha256 of what the file reads as, whatever its holes: over its size
    and every 1 MiB block that is not all zeroes (with the block's index);
    blocks wholly in holes are not read.  So a copy with other holes (cp
    --sparse=always makes zero runs into holes) hashes the same, and any
    change of content does not."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        h.update(b"size %d\n" % size)
        zero = bytes(HASH_BLOCK)
        last = -1
        for start, end in data_extents(fd):
            for blk in range(max(start // HASH_BLOCK, last + 1), (end - 1) // HASH_BLOCK + 1):
                buf = os.pread(fd, HASH_BLOCK, blk * HASH_BLOCK)
                if buf != zero[:len(buf)]:
                    h.update(b"block %d\n" % blk)
                    h.update(buf)
                last = blk
    finally:
        os.close(fd)
    return h.hexdigest()


def make_files(top, total):
    """Random (incompressible) files adding up to total bytes, like a
    toolchain: a few large ones and many of 1 MiB."""
    os.makedirs(os.path.join(top, "lib"))
    big, small = 16 * MiB, MiB
    nbig = total * 5 // 8 // big
    for i in range(nbig):
        with open(os.path.join(top, "big%02d.bin" % i), "wb") as f:
            f.write(os.urandom(big))
    for i in range((total - nbig * big) // small):
        with open(os.path.join(top, "lib", "f%03d.bin" % i), "wb") as f:
            f.write(os.urandom(small))


def run(argv, what, timeout=300):
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        sys.exit("bench/run: %s failed (%s): %s" % (what, " ".join(argv), (r.stderr or r.stdout).strip()[:500]))


@contextlib.contextmanager
def golden_images(work, tools, settings, clone):
    """Yields the config.Golden for the golden rows; clone: also the xfs
    of the clone path (loop-mounted: root, checked by the caller).
    Everything is under the run's scratch dir; the xfs is unmounted on
    every way out."""
    top = os.path.join(work.scratch, "golden")
    base_dir, tmpdir = os.path.join(top, "base"), os.path.join(top, "tmp")
    xfs_img, mnt = os.path.join(top, "xfs.img"), os.path.join(top, "xfs")
    mounted = False
    try:
        for d in (base_dir, tmpdir):
            os.makedirs(d)
        base = os.path.join(base_dir, "base.img")
        t0 = time.monotonic()
        log("golden: making the base: %s ext4 with %s of random files (mkfs.ext4 -d)"
            % (size_str(settings.golden_size), size_str(settings.golden_data)))
        src = os.path.join(top, "files")
        make_files(src, settings.golden_data)
        with open(base, "wb") as f:
            f.truncate(settings.golden_size)
        # lazy init as tmpdisk's own mkfs does: the base is its files and metadata, not zeroed tables
        run([shutil.which("mkfs.ext4", path=SERVER_PATH), "-q", "-F",
             "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", "-L", "golden", "-d", src, base],
            "mkfs.ext4 -d")
        shutil.rmtree(src)
        os.chmod(base, 0o644)
        fd = os.open(base, os.O_RDONLY)
        try:
            ext = data_extents(fd)
        finally:
            os.close(fd)
        sha = content_hash(base)  # also brings the base into the page cache, for every server alike
        clone_base = clone_tmpdir = clone_fs = None
        if clone:
            run(["truncate", "-s", str(settings.golden_size * XFS_SIZE_FACTOR), xfs_img], "truncate")
            run([tools.mkfs_xfs, "-q", "-m", "reflink=1", "-L", "golden-clone", xfs_img], "mkfs.xfs")
            os.makedirs(mnt)
            run(["mount", "-t", "xfs", "-o", "loop", xfs_img, mnt], "mount -o loop (the clone path's xfs)")
            mounted = True
            clone_base = os.path.join(mnt, "base.img")
            clone_tmpdir = os.path.join(mnt, "tmp")
            os.makedirs(clone_tmpdir)
            run(["cp", "--sparse=always", base, clone_base], "cp --sparse=always (the base onto the xfs)")
            os.chmod(clone_base, 0o644)
            if content_hash(clone_base) != sha:
                sys.exit("bench/run: the copy of the base on the xfs differs from the base")
            clone_fs = "xfs (reflink=1) on %s, loop-mounted from a sparse %s file in the scratch dir" % (
                fs_of(mnt).split(" on ")[-1], size_str(settings.golden_size * XFS_SIZE_FACTOR))
        log("golden: base ready in %.1f s: %.0f MiB of data in %d extents, sha256 %s"
            % (time.monotonic() - t0, sum(e - s for s, e in ext) / MiB, len(ext), sha[:16]))
        yield Golden(base=base, size=settings.golden_size, data=sum(e - s for s, e in ext),
                     extents=len(ext), sha256=sha, tmpdir=tmpdir, tmpdir_fs=fs_of(tmpdir),
                     clone_base=clone_base, clone_tmpdir=clone_tmpdir,
                     clone_mount=mnt if clone else None, clone_fs=clone_fs)
    finally:
        with uninterrupted():
            if mounted:
                unmount(mnt)
            shutil.rmtree(top, ignore_errors=True)


def unmount(mnt):
    """umount, retried for a few seconds (a server's last process may still
    be closing its image), then lazily, so the scratch dir can go."""
    err = ""
    for _ in range(20):
        r = subprocess.run(["umount", mnt], capture_output=True, text=True, timeout=60)
        if r.returncode == 0:
            return
        err = r.stderr.strip()
        time.sleep(0.25)
    log("warning: umount %s: %s; unmounting lazily" % (mnt, err))
    subprocess.run(["umount", "-l", mnt], timeout=60)


def check_base(g):
    """{file: "unchanged" | "CHANGED"} for the base and its copy on the xfs:
    their content hashes against the one taken when the base was made."""
    out = {}
    for name, path in (("base", g.base), ("xfs copy", g.clone_base)):
        if path:
            try:
                out[name] = "unchanged" if content_hash(path) == g.sha256 else "CHANGED"
            except OSError as e:
                out[name] = "unreadable (%s)" % e.strerror
    return out

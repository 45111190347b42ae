//! Golden images (`--base`): every client a copy-on-write copy of a
//! prepared disk, on both paths: a reflink clone where the tmpdir shares
//! extents with the image (an xfs on a loop device here), an overlay
//! elsewhere (the tests' ext4 /tmp). A real kernel mounts the copies
//! (qemu-storage-daemon's FUSE export and a loop device): the image's files
//! are there, a client changes and deletes some, fsck is clean, another
//! client sees the original, and the image's checksum never changes.
//! Bad images fail at start.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::kernel_mount::KernelMount;
use crate::common::nbdraw::Framing;
use crate::common::*;

/// The files every image holds: name → contents.
fn files() -> BTreeMap<&'static str, Vec<u8>> {
    let mut f = BTreeMap::new();
    f.insert("hello.txt", b"hello from the golden image\n".to_vec());
    f.insert(
        "keep.txt",
        b"a client deletes me; the image keeps me\n".to_vec(),
    );
    f.insert(
        "big.bin",
        (0..3 * MIB as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect(),
    );
    f
}

/// An image of `fs` ("ext4" or "xfs") of `size`, holding [`files`], at
/// `dir/name`.
fn image(dir: &TestDir, name: &str, fs_type: &str, size: &str) -> PathBuf {
    require(&["mkfs.ext4", "mkfs.xfs", "losetup"]);
    let src = dir.subdir(&format!("{name}-src"));
    for (n, data) in files() {
        fs::write(src.join(n), data).unwrap();
    }
    let img = dir.join(name);
    run_ok(
        "truncate",
        cmd("truncate", &["-s", size, img.to_str().unwrap()]),
    );
    if fs_type == "ext4" {
        // mke2fs fills the filesystem from a directory itself.
        run_ok(
            "mkfs.ext4",
            cmd(
                "mkfs.ext4",
                &[
                    "-q",
                    "-F",
                    "-d",
                    src.to_str().unwrap(),
                    img.to_str().unwrap(),
                ],
            ),
        );
        return img;
    }
    require_root("it mounts the new xfs image to fill it");
    run_ok(
        "mkfs.xfs",
        cmd("mkfs.xfs", &["-q", "-f", img.to_str().unwrap()]),
    );
    let mnt = dir.subdir(&format!("{name}-fill"));
    run_ok(
        "mount",
        cmd(
            "mount",
            &["-o", "loop", img.to_str().unwrap(), mnt.to_str().unwrap()],
        ),
    );
    for (n, data) in files() {
        fs::write(mnt.join(n), data).unwrap();
    }
    run_ok("umount", cmd("umount", &[mnt.to_str().unwrap()]));
    img
}

/// A copy that keeps the image's holes.
fn sparse_copy(from: &Path, to: &Path) {
    run_ok(
        "cp --sparse=always",
        cmd(
            "cp",
            &[
                "--sparse=always",
                from.to_str().unwrap(),
                to.to_str().unwrap(),
            ],
        ),
    );
}

fn sha256(path: &Path) -> String {
    run_ok("sha256sum", cmd("sha256sum", &[path.to_str().unwrap()]))
        .stdout
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A kernel mount of a new client's copy, checked to hold the image's
/// files as they are.
fn mount_copy(dir: &TestDir, name: &str, socket: &Path) -> KernelMount {
    let m = KernelMount::new(dir, name, socket);
    for (n, data) in files() {
        let got = fs::read(m.path().join(n)).unwrap_or_else(|e| panic!("{name}: {n}: {e}"));
        assert!(got == data, "{name}: {n} differs from the image's");
    }
    assert!(!m.path().join("new.txt").exists(), "{name}: a fresh copy");
    m
}

/// Change the copy mounted at `m` (a new file, one changed, one deleted),
/// unmount it and check its filesystem.
fn scribble_and_fsck(mut m: KernelMount, fs_type: &str) {
    fs::write(m.path().join("new.txt"), b"written by a client\n").unwrap();
    fs::write(m.path().join("hello.txt"), b"changed by a client\n").unwrap();
    fs::remove_file(m.path().join("keep.txt")).unwrap();
    let big: Vec<u8> = (0..5 * MIB as u32).map(|i| (i % 253) as u8).collect();
    fs::write(m.path().join("big2.bin"), &big).unwrap();
    run_ok("sync", cmd("sync", &[] as &[&str]));
    m.unmount();
    let fsck = match fs_type {
        "ext4" => cmd("e2fsck", &["-fn", m.device()]),
        _ => cmd("xfs_repair", &["-n", m.device()]),
    };
    run_ok("fsck of a client's changed copy", fsck);
}

/// One image served to two clients at once, mounted by the kernel: each
/// sees the image; the first changes its copy, the second still sees the
/// original; fsck is clean; the image never changes; nothing is left.
fn two_clients_on(dir: &TestDir, images: &Path, base: &Path, fs_type: &str, copy: &str) {
    let before = sha256(base);
    let mut server = base_server(dir, images, base);
    let socket = dir.join("nbd.sock");
    let a = mount_copy(dir, "a", &socket);
    server
        .proc
        .wait_stderr(&format!("copy=\"{copy}\""), Duration::from_secs(10));
    scribble_and_fsck(a, fs_type);
    let b = mount_copy(dir, "b", &socket);
    drop(b);
    assert_eq!(sha256(base), before, "the base image changed");
    wait_no_image_holders(images, "after both clients left");
    assert_dir_empty(images, "after both clients left");
    let log = server.proc.stderr();
    assert!(!log.contains("WARN") && !log.contains("ERROR"), "{log}");
}

#[test]
fn overlay_copies_of_ext4_and_xfs_images() {
    require_root("it mounts the copies");
    for fs_type in ["ext4", "xfs"] {
        let dir = TestDir::new(&format!("golden-overlay-{fs_type}"));
        let base = image(&dir, "base.img", fs_type, "512M");
        // /tmp here is ext4: no reflink, so an overlay.
        let images = dir.subdir("images");
        two_clients_on(&dir, &images, &base, fs_type, "overlay");
    }
}

/// An xfs (reflink=1, mkfs.xfs's default) on a loop device, as the tmpdir.
pub(crate) struct ReflinkFs {
    _mount: Mount,
}

pub(crate) fn reflink_tmpdir(dir: &TestDir) -> (ReflinkFs, PathBuf) {
    require_root("it mounts an xfs on a loop device");
    let img = dir.join("xfs.img");
    run_ok(
        "truncate",
        cmd("truncate", &["-s", "3G", img.to_str().unwrap()]),
    );
    run_ok(
        "mkfs.xfs",
        cmd(
            "mkfs.xfs",
            &["-q", "-f", "-m", "reflink=1", img.to_str().unwrap()],
        ),
    );
    let path = dir.subdir("xfs");
    let mount = Mount::loop_device(&img, &path);
    let images = path.join("images");
    fs::create_dir_all(&images).unwrap();
    (ReflinkFs { _mount: mount }, images)
}

/// `base` copied (sparse) onto the reflink filesystem whose images dir is
/// `images`: the clone path needs the image on the tmpdir's filesystem.
fn onto_reflink_fs(base: &Path, images: &Path) -> PathBuf {
    let shared = images.parent().unwrap().join("base.img");
    sparse_copy(base, &shared);
    shared
}

/// A tmpdisk on a Unix socket serving `base` to every client.
fn base_server(dir: &TestDir, images: &Path, base: &Path) -> Server {
    Server::start_in(
        dir,
        Mode::Unix,
        images,
        &["--base", base.to_str().unwrap()],
        &[],
    )
}

/// The same with a command (`true`: it changes nothing) run on each copy,
/// which makes the copy one file: a reflink clone where `images` allows.
fn clone_server(dir: &TestDir, images: &Path, base: &Path) -> Server {
    Server::start_in(
        dir,
        Mode::Unix,
        images,
        &["--base", base.to_str().unwrap(), "--command", "true"],
        &[],
    )
}

/// On a reflink tmpdir a copy is an overlay all the same (a clone lost to
/// it on every count: see src/overlay.rs), and costs no space; a command's
/// copy is a clone, which costs none either.
#[test]
fn copies_on_a_reflink_tmpdir_take_no_space() {
    let dir = TestDir::new("golden-clone");
    let (xfs, images) = reflink_tmpdir(&dir);
    // The image lives on the same filesystem, as a clone needs.
    let base = image(&dir, "base.img", "ext4", "512M");
    let shared = onto_reflink_fs(&base, &images);
    two_clients_on(&dir, &images, &shared, "ext4", "overlay");

    // A fresh copy costs no space: a clone's extents are the image's. (Its
    // st_blocks count them all, shared or not: the filesystem's free space
    // is what tells.)
    let xfs_path = images.parent().unwrap().to_path_buf();
    for clone in [false, true] {
        let mut server = match clone {
            false => base_server(&dir, &images, &shared),
            true => clone_server(&dir, &images, &shared),
        };
        let before = statfs_bytes(&xfs_path, "%f");
        let held = HeldClient::start("h = connect(sys.argv[1])", "h.shutdown()", &[server.uri()]);
        wait_image_holders(&images, 1, "one client");
        let taken = before.saturating_sub(statfs_bytes(&xfs_path, "%f"));
        // A clone is made in a file unlinked at once, not an O_TMPFILE
        // (`DIR/#INODE (deleted)`): random writes to a clone in an
        // O_TMPFILE are half as fast on xfs (see Image::create_as). An
        // overlay's delta is an O_TMPFILE. Unlinked either way: the tmpdir
        // lists nothing.
        let holders = image_holders(&images);
        let prefix = format!("{}/.tmpdisk-", images.display());
        assert!(
            holders
                .iter()
                .all(|(_, t)| t.starts_with(&prefix) == clone && t.ends_with(" (deleted)")),
            "clone {clone}: {holders:?}"
        );
        assert_eq!(fs::read_dir(&images).unwrap().count(), 0);
        held.finish();
        let copy = if clone { "clone" } else { "overlay" };
        server
            .proc
            .wait_stderr(&format!("copy=\"{copy}\""), Duration::from_secs(10));
        assert!(
            taken <= MIB,
            "a fresh {copy} of a 512 MiB image took {taken} bytes of the tmpdir"
        );
    }
    drop(xfs);
}

/// Sectors written to the block device `dev` (/dev/loopN) so far.
fn written_sectors(dev: &str) -> u64 {
    let name = dev.trim_start_matches("/dev/");
    let stat = fs::read_to_string(format!("/sys/block/{name}/stat")).unwrap();
    stat.split_whitespace().nth(6).unwrap().parse().unwrap()
}

/// What a client wrote to its clone (a command's copy) is dropped when it
/// leaves, never written out. The copy is set to the disk's size only where the clone
/// left it shorter: xfs counts a truncate to a file's own length as a
/// truncate down and then writes its dirty pages back on close (a client
/// that had written for 5 s took 9-15 s to exit, measured). How we know:
/// the tmpdir's device takes a fraction of what the client wrote while the
/// client leaves.
#[test]
fn a_clone_s_writes_are_dropped_not_written_out_when_its_client_leaves() {
    require(&["python3-nbd", "findmnt"]);
    let dir = TestDir::new("golden-clone-exit");
    let (xfs, images) = reflink_tmpdir(&dir);
    let base = image(&dir, "base.img", "ext4", "256M");
    let shared = onto_reflink_fs(&base, &images);
    let server = clone_server(&dir, &images, &shared);
    let mnt = images.parent().unwrap().to_str().unwrap().to_string();
    let dev = run_ok("findmnt", cmd("findmnt", &["-n", "-o", "SOURCE", &mnt]))
        .stdout
        .trim()
        .to_string();
    assert!(dev.starts_with("/dev/loop"), "{mnt} is on {dev}");
    let held = HeldClient::start(
        "h = connect(sys.argv[1])\nfor i in range(64): h.pwrite(os.urandom(1 << 20), i * 3 << 20)",
        "h.shutdown()",
        &[server.uri()],
    );
    let before = written_sectors(&dev);
    held.finish();
    wait_no_image_holders(&images, "after the client left");
    let written = (written_sectors(&dev) - before) * 512;
    assert!(
        written < 8 * MIB,
        "{written} bytes went to the tmpdir's device as a client with 64 MiB written left"
    );
    drop(server);
    drop(xfs);
}

/// Bytes of the file behind `/proc/PID/fd/FD` in the page cache.
fn cached_bytes(fd_path: &str) -> u64 {
    let out = run_ok(
        "fincore",
        cmd(
            "fincore",
            &["--bytes", "--noheadings", "--output", "RES", fd_path],
        ),
    )
    .stdout;
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("fincore printed {out:?}"))
}

/// A client on a reflink tmpdir reads what it has not written from the
/// base, so every client shares the base's page cache: page cache belongs
/// to a file, not to the extents it shares, and reading through a clone
/// cached a copy of the base's data per client (+692 to +719 MiB for each
/// client reading the golden bench's 702 MiB base, measured). The same
/// holds for a command's copy, a reflink clone: what the command left
/// unchanged is read from the base, what it wrote from the clone. How we
/// know: a client reads all of its disk, correctly (the command's bytes
/// included), and the server's copy has next to nothing in the page cache
/// (a clone read through: all 48 MiB of the image's data; with the
/// comparison turned off, the command's clone held 53 MiB).
#[test]
fn a_client_on_a_reflink_tmpdir_reads_the_base_through_its_page_cache() {
    require(&["python3-nbd", "fincore"]);
    let dir = TestDir::new("golden-clone-cache");
    let (xfs, images) = reflink_tmpdir(&dir);
    let base = dir.join("base.img");
    let bytes: Vec<u8> = (0..48u32 << 20).map(|i| (i % 251) as u8 + 1).collect();
    fs::write(&base, &bytes).unwrap();
    let shared = onto_reflink_fs(&base, &images);
    // The command overwrites 9 bytes in the middle of a block of the base's
    // data, and makes a block past the base's data its own.
    let (mid, tail) = (20_000_003u64, 48u64 << 20);
    let command = format!(
        "printf tmpdisk-1 | dd of=\"$disk\" bs=1 seek={mid} conv=notrunc status=none && \
         printf tmpdisk-2 | dd of=\"$disk\" bs=1 seek={tail} conv=notrunc status=none"
    );
    let mut changed = bytes.clone();
    changed.resize(64 << 20, 0);
    changed[mid as usize..mid as usize + 9].copy_from_slice(b"tmpdisk-1");
    changed[tail as usize..tail as usize + 9].copy_from_slice(b"tmpdisk-2");
    let mut plain = bytes.clone();
    plain.resize(64 << 20, 0);
    for (extra, want, copy) in [
        (vec![], plain, "overlay"),
        (vec!["--command", command.as_str()], changed, "clone"),
    ] {
        let mut args = vec!["--base", shared.to_str().unwrap(), "64M"];
        args.extend(extra);
        let mut server = Server::start_in(&dir, Mode::Unix, &images, &args, &[]);
        let expected = dir.join(&format!("expected-{copy}.img"));
        fs::write(&expected, &want).unwrap();
        let held = HeldClient::start(
            "import hashlib\n\
             h = connect(sys.argv[1])\n\
             d = hashlib.sha256()\n\
             for off in range(0, h.get_size(), 4 << 20): d.update(h.pread(4 << 20, off))\n\
             assert d.hexdigest() == sys.argv[2], 'the copy reads differently'",
            "h.shutdown()",
            &[server.uri(), &sha256(&expected)],
        );
        server
            .proc
            .wait_stderr(&format!("copy=\"{copy}\""), Duration::from_secs(10));
        let holders = image_holders(&images);
        assert_eq!(holders.len(), 1, "{copy}: one copy held: {holders:?}");
        let (pid, target) = &holders[0];
        let fd = fds_of(*pid)
            .into_iter()
            .find(|(_, t)| t == target)
            .map(|(fd, _)| fd)
            .expect("the copy's descriptor");
        let cached = cached_bytes(&format!("/proc/{pid}/fd/{fd}"));
        held.finish();
        assert!(
            cached < MIB,
            "{copy}: the copy holds {cached} bytes of page cache after its client read 64 MiB"
        );
        drop(server);
    }
    drop(xfs);
}

/// Whether the running kernel is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}

/// A command's clone is served as an overlay over what the command left
/// unchanged, found from the two files' extent maps (src/clonemap.rs).
/// Whatever the command does to the copy (writes in the middle of the
/// image's data, zeroes it, punches or zero-ranges it, which leaves
/// unwritten extents on xfs, shrinks or grows the file: a resized clone is
/// served whole), the client reads exactly what the same command leaves in
/// a plain copy of the image.
/// How we know: nbdcopy of the whole disk against the plain copy,
/// byte for byte; the image's checksum never changes.
#[test]
fn a_command_s_changes_of_every_kind_read_back_as_it_left_them() {
    require(&["nbdcopy", "fallocate"]);
    let dir = TestDir::new("golden-clone-changes");
    let base = image(&dir, "base.img", "ext4", "64M");
    let (xfs, images) = reflink_tmpdir(&dir);
    let shared = onto_reflink_fs(&base, &images);
    let before = sha256(&shared);
    let commands = [
        r#"printf tmpdisk | dd of="$disk" bs=1 seek=12345 conv=notrunc status=none"#,
        r#"dd if=/dev/zero of="$disk" bs=64k seek=3 count=40 conv=notrunc status=none"#,
        r#"fallocate -p -o 4096 -l 1M "$disk""#,
        r#"fallocate -z -o 1M -l 3M "$disk""#,
        r#"truncate -s 40M "$disk""#,
        r#"truncate -s 80M "$disk" && printf end | dd of="$disk" bs=1 seek=70000000 conv=notrunc status=none"#,
        // More than tmpdisk writes back to compare (32 MiB): served whole.
        r#"dd if=/dev/zero of="$disk" bs=1M seek=8 count=40 conv=notrunc status=none"#,
    ];
    let whole = "the command left too much unwritten to compare";
    for (i, command) in commands.iter().enumerate() {
        // The same command on a plain copy, outside the reflink tmpdir.
        let want = dir.join(&format!("want-{i}.img"));
        sparse_copy(&shared, &want);
        let mut sh = cmd("sh", &["-c", command]);
        sh.env("disk", &want);
        run_ok("the command on a plain copy", sh);
        let mut server = Server::start_in(
            &dir,
            Mode::Unix,
            &images,
            &[
                "--base",
                shared.to_str().unwrap(),
                "--command",
                command,
                "--log-level",
                "debug",
            ],
            &[],
        );
        let got = dir.join(&format!("got-{i}.img"));
        copy_out(server.uri(), &got);
        server
            .proc
            .wait_stderr("copy=\"clone\"", Duration::from_secs(10));
        // cachestat(2), which tells, is Linux 6.5's; before it, every
        // clone is compared.
        let big = command.contains("bs=1M");
        assert_eq!(
            server.proc.stderr().contains(whole),
            big && kernel_at_least(6, 5),
            "{command}: served whole or compared"
        );
        assert_eq!(
            fs::metadata(&got).unwrap().len(),
            fs::metadata(&want).unwrap().len(),
            "{command}: the disk's size"
        );
        assert!(
            sha256(&got) == sha256(&want),
            "{command}: the client reads otherwise than the command left a plain copy"
        );
        assert_eq!(sha256(&shared), before, "{command}: the image changed");
        drop(server);
        fs::remove_file(&got).unwrap();
        fs::remove_file(&want).unwrap();
    }
    wait_no_image_holders(&images, "after the clients left");
    assert_dir_empty(&images, "after the clients left");
    drop(xfs);
}

/// `--command` runs on each client's copy: `tune2fs -U random` gives every
/// client a filesystem UUID of its own, on the clone path and on the full
/// copy a command needs where there is no reflink.
#[test]
fn a_command_changes_each_copy_and_never_the_image() {
    require(&["tune2fs", "blkid", "nbdcopy"]);
    let dir = TestDir::new("golden-command");
    let base = image(&dir, "base.img", "ext4", "64M");
    let original = blkid_tag(&base, "UUID");
    let (xfs, reflink_images) = reflink_tmpdir(&dir);
    let shared = onto_reflink_fs(&base, &reflink_images);
    for (images, base, copy) in [
        (dir.subdir("images"), base.clone(), "copy"),
        (reflink_images.clone(), shared.clone(), "clone"),
    ] {
        let before = sha256(&base);
        let mut server = Server::start_in(
            &dir,
            Mode::Unix,
            &images,
            &[
                "--base",
                base.to_str().unwrap(),
                "--command",
                r#"tune2fs -U random "$disk""#,
            ],
            &[],
        );
        let mut uuids = Vec::new();
        for i in 0..2 {
            let out = dir.join(&format!("copy-{copy}-{i}.img"));
            copy_out(server.uri(), &out);
            uuids.push(blkid_tag(&out, "UUID"));
            fs::remove_file(&out).unwrap();
        }
        server
            .proc
            .wait_stderr(&format!("copy=\"{copy}\""), Duration::from_secs(10));
        assert!(
            uuids[0] != uuids[1] && !uuids.contains(&original),
            "{copy}: each copy needs a UUID of its own: {uuids:?}, image {original}"
        );
        assert_eq!(sha256(&base), before, "{copy}: the image changed");
        wait_no_image_holders(&images, "after the clients left");
        assert_dir_empty(&images, "after the clients left");
    }
    drop(xfs);
}

/// kill -9 of the serving process while its client writes as fast as it
/// can: nothing is left in the tmpdir, and the image is intact.
#[test]
fn sigkill_during_heavy_writes_leaves_nothing_and_the_image_intact() {
    require(&["python3-nbd"]);
    let dir = TestDir::new("golden-kill");
    let base = image(&dir, "base.img", "ext4", "128M");
    let (xfs, reflink_images) = reflink_tmpdir(&dir);
    let shared = onto_reflink_fs(&base, &reflink_images);
    for (images, base) in [
        (dir.subdir("images"), base.clone()),
        (reflink_images, shared),
    ] {
        let before = sha256(&base);
        let server = base_server(&dir, &images, &base);
        let writer = HeldClient::start(
            r#"
import random, threading
h = connect(sys.argv[1])
size = h.get_size()
def scribble():
    try:
        while True:
            n = random.choice([4096, 65536, 1 << 20]) + random.randrange(512)
            h.pwrite(os.urandom(16) * (n // 16), random.randrange(size - n))
    except nbd.Error:
        pass
threading.Thread(target=scribble, daemon=True).start()
"#,
            "",
            &[server.uri()],
        );
        let pid = wait_image_holders(&images, 1, "the writing client")[0];
        std::thread::sleep(Duration::from_millis(500));
        send_signal(pid, libc::SIGKILL);
        wait_no_image_holders(&images, "after kill -9 of the serving process");
        assert_dir_empty(&images, "after kill -9 of the serving process");
        assert_eq!(sha256(&base), before, "the image changed");
        drop(writer);
    }
    drop(xfs);
}

/// Random writes, trims and zeroes, aligned and not, by clients of each
/// framing on both kinds of copy (an overlay on this tmpdir, a command's
/// clone on a reflink one), checked against a model that starts as the image's bytes: an 8 MiB
/// disk over a 6 MiB image of random bytes with a 1 MiB hole in it (so the
/// disk's last 2 MiB are past the image's end). The image never changes.
#[test]
fn random_io_on_both_paths_matches_a_model() {
    let dir = TestDir::new("golden-model");
    let (xfs, reflinked) = reflink_tmpdir(&dir);
    let seed = crate::write_accounting::model_seed();
    let mut bytes = vec![0u8; 6 << 20];
    let mut x = seed | 1;
    for b in bytes.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let hole = (2 << 20)..(3 << 20);
    bytes[hole.clone()].fill(0);
    for (tmpdir, base, copy) in [
        (dir.subdir("images"), dir.join("base.img"), "overlay"),
        (
            reflinked.clone(),
            reflinked.parent().unwrap().join("base.img"),
            "clone",
        ),
    ] {
        // The hole is never written, so it is a hole in the file too, for
        // block status to merge.
        let mut f = fs::File::create(&base).unwrap();
        f.write_all(&bytes[..hole.start]).unwrap();
        f.seek(SeekFrom::Start(hole.end as u64)).unwrap();
        f.write_all(&bytes[hole.end..]).unwrap();
        drop(f);
        let before = sha256(&base);
        // A command's copy is the clone: `true` leaves it as it is.
        let mut args = vec!["--base", base.to_str().unwrap(), "8M"];
        if copy == "clone" {
            args.extend(["--command", "true"]);
        }
        let mut server = Server::start_in(&dir, Mode::Unix, &tmpdir, &args, &[]);
        let mut start = bytes.clone();
        start.resize(8 << 20, 0);
        for (i, framing) in [Framing::Simple, Framing::Structured, Framing::Extended]
            .into_iter()
            .enumerate()
        {
            let (stored, refused) = crate::write_accounting::model_client(
                &dir,
                framing,
                seed.wrapping_add(i as u64),
                300,
                start.clone(),
            );
            assert!(stored > 0, "{copy}: no write was acknowledged");
            // A roomy tmpdir: no write may be refused (the model drops
            // refused bytes, so only this tells a stray ENOSPC).
            assert_eq!(refused, 0, "{copy}: writes refused on a roomy tmpdir");
        }
        server
            .proc
            .wait_stderr(&format!("copy=\"{copy}\""), Duration::from_secs(10));
        assert_eq!(sha256(&base), before, "{copy}: the image changed");
        wait_no_image_holders(&tmpdir, "after the model clients left");
        assert_dir_empty(&tmpdir, "after the model clients left");
        drop(server);
    }
    drop(xfs);
}

/// What a client sees when the admin changes the image under a running
/// server (the README says it): truncated in place, the part that is gone
/// reads as zeroes, through the zero-copy path too (nbdcopy's 256 KiB
/// reads are sent with sendfile), with no hang and no error; replaced by a
/// rename, the server keeps the image it opened.
#[test]
fn an_image_truncated_or_replaced_under_the_server() {
    require(&["nbdcopy"]);
    let dir = TestDir::new("golden-swap");
    let base = dir.join("base.img");
    let old: Vec<u8> = (0..8u32 << 20).map(|i| (i % 253) as u8 + 1).collect();
    fs::write(&base, &old).unwrap();
    let server = Server::unix(&dir, &["--base", base.to_str().unwrap()]);
    let copy_out = |name: &str| -> Vec<u8> {
        let out = dir.join(name);
        run_ok(
            "nbdcopy",
            cmd(
                "timeout",
                &["30", "nbdcopy", server.uri(), out.to_str().unwrap()],
            ),
        );
        fs::read(&out).unwrap()
    };
    assert!(copy_out("first") == old, "a client's copy is not the image");

    fs::File::options()
        .write(true)
        .open(&base)
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    let got = copy_out("truncated");
    assert_eq!(got.len(), 8 << 20, "the disk's size changed");
    assert!(got[..3 << 20] == old[..3 << 20], "the part kept changed");
    assert!(
        got[3 << 20..].iter().all(|&b| b == 0),
        "what truncation removed must read as zeroes"
    );

    let new = dir.join("new.img");
    fs::write(&new, vec![0x55u8; 8 << 20]).unwrap();
    fs::rename(&new, &base).unwrap();
    let got = copy_out("replaced");
    assert!(
        got[..3 << 20] == old[..3 << 20] && got[3 << 20..].iter().all(|&b| b == 0),
        "a running server must keep serving the image it opened"
    );
    let log = server.proc.stderr();
    assert!(!log.contains("ERROR"), "{log}");
}

/// A disk larger than its image reads as zeroes (and holes) past the
/// image's end, and an image may be a block device (a read-only loop
/// device here), whose copies are overlays.
#[test]
fn a_larger_disk_over_a_block_device_image() {
    require_root("it makes a loop device");
    require(&["python3-nbd"]);
    let dir = TestDir::new("golden-device");
    let base = image(&dir, "base.img", "ext4", "64M");
    let dev = LoopDevice::read_only(&base);
    let server = Server::unix(&dir, &["--base", dev.path(), "96M"]);
    let script = r#"
h = connect(sys.argv[1])
M = 1 << 20
check(h.get_size() == 96 * M, "size %d" % h.get_size())
check(h.pread(M, 64 * M) == bytes(M), "past the image: zeroes")
check(flags_over(h, 64 * M, 32 * M) == {3}, "past the image: a hole")
sb = h.pread(4096, 0)
check(sb[1024 + 56:1024 + 58] == b"\x53\xef", "the image's ext4 superblock")
h.pwrite(b"x" * 4096, 70 * M)
check(h.pread(4096, 70 * M) == b"x" * 4096, "written past the image")
h.shutdown()
print("ok")
"#;
    let out = run_ok("python", python(script, &[server.uri()]));
    assert!(out.stdout.contains("ok"), "{out}");
    let mut server = server;
    server
        .proc
        .wait_stderr("copy=\"overlay\"", Duration::from_secs(10));
}

/// A command on a block device's copy: no clone and no copy_file_range
/// from a device, so the copy is read and written, its blocks of zeroes
/// left out. Each client gets a UUID of its own, the device never
/// changes, and the copy takes what the image holds, not the device's
/// size (the log's `allocated`). Before, every such client was refused:
/// copy_file_range failed with EINVAL.
#[test]
fn a_command_on_a_block_device_image_s_copy() {
    require_root("it makes a loop device");
    require(&["tune2fs", "blkid", "nbdcopy"]);
    let dir = TestDir::new("golden-device-command");
    let base = image(&dir, "base.img", "ext4", "64M");
    let original = blkid_tag(&base, "UUID");
    let before = sha256(&base);
    let dev = LoopDevice::read_only(&base);
    let mut server = Server::unix(
        &dir,
        &[
            "--base",
            dev.path(),
            "--command",
            r#"tune2fs -U random "$disk""#,
        ],
    );
    let mut uuids = Vec::new();
    for i in 0..2 {
        let out = dir.join(&format!("copy-{i}.img"));
        copy_out(server.uri(), &out);
        uuids.push(blkid_tag(&out, "UUID"));
        // The zeroes left out read back as zeroes: the copy is whole.
        run_ok("e2fsck", cmd("e2fsck", &["-fn", out.to_str().unwrap()]));
        fs::remove_file(&out).unwrap();
    }
    assert!(
        uuids[0] != uuids[1] && !uuids.contains(&original),
        "each copy needs a UUID of its own: {uuids:?}, image {original}"
    );
    server
        .proc
        .wait_stderr("client left", Duration::from_secs(10));
    let log = server.proc.stderr();
    let served = served_lines(&log);
    assert_eq!(served.len(), 2, "{log}");
    for line in served {
        assert!(line.contains("copy=\"copy\""), "{line}");
        let allocated: u64 = log_field(line, "allocated")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no allocated= in {line}"));
        assert!(
            allocated < 16 << 20,
            "a copy of a 64 MiB device holding a fresh ext4 took {allocated} bytes: {line}"
        );
    }
    drop(dev);
    assert_eq!(sha256(&base), before, "the image changed");
    wait_no_image_holders(server.images(), "after the clients left");
    assert_dir_empty(server.images(), "after the clients left");
}

/// A read-only loop device for a file, detached on drop.
struct LoopDevice(String);

impl LoopDevice {
    fn read_only(file: &Path) -> LoopDevice {
        let out = run_ok(
            "losetup",
            cmd("losetup", &["-r", "-f", "--show", file.to_str().unwrap()]),
        );
        LoopDevice(out.stdout.trim().to_string())
    }
    fn path(&self) -> &str {
        &self.0
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = cmd("losetup", &["-d", &self.0]).status();
    }
}

#[test]
fn bad_images_fail_at_start_with_one_line() {
    let dir = TestDir::new("golden-bad");
    let images = dir.subdir("images");
    let empty = dir.join("empty.img");
    fs::write(&empty, b"").unwrap();
    let good = dir.join("good.img");
    fs::write(&good, vec![7u8; 2 * MIB as usize]).unwrap();
    let fifo = dir.join("fifo");
    run_ok("mkfifo", cmd("mkfifo", &[fifo.to_str().unwrap()]));
    let missing = dir.join("missing.img");
    let d = dir.subdir("a-directory");
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "missing",
            vec!["--base".into(), missing.display().to_string()],
            "No such file",
        ),
        (
            "a directory",
            vec!["--base".into(), d.display().to_string()],
            "is a directory",
        ),
        (
            "empty",
            vec!["--base".into(), empty.display().to_string()],
            "is empty",
        ),
        (
            "a FIFO",
            vec!["--base".into(), fifo.display().to_string()],
            "neither a regular file",
        ),
        (
            "smaller SIZE",
            vec!["--base".into(), good.display().to_string(), "1M".into()],
            "smaller than the base image",
        ),
        (
            "with --type",
            vec![
                "--base".into(),
                good.display().to_string(),
                "-t".into(),
                "xfs".into(),
            ],
            "cannot go with it",
        ),
        (
            "with --label",
            vec![
                "--base".into(),
                good.display().to_string(),
                "-L".into(),
                "x".into(),
            ],
            "cannot go with it",
        ),
    ];
    for (what, args, needle) in cases {
        let mut c = tmpdisk_cmd(&["--stdio", "--tmpdir", images.to_str().unwrap()]);
        c.args(&args);
        let out = run(&format!("tmpdisk --base ({what})"), c);
        assert_eq!(out.status.code(), Some(2), "{what}: exit status 2\n{out}");
        assert_one_line(&out.stderr, what);
        assert!(out.stderr.contains(needle), "{what}: {needle:?} in\n{out}");
    }
    // Unreadable: a file only root may read, for tmpdisk as nobody.
    use std::os::unix::fs::PermissionsExt;
    let secret = dir.join("secret.img");
    fs::write(&secret, vec![1u8; MIB as usize]).unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let c = wrapped_tmpdisk_cmd(
        &[
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
        ],
        &["--stdio", "--base", secret.to_str().unwrap()],
    );
    let out = run("tmpdisk --base (unreadable)", c);
    assert_eq!(out.status.code(), Some(2), "{out}");
    assert!(out.stderr.contains("Permission denied"), "{out}");
    assert_dir_empty(&images, "after refused images");
}

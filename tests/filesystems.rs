//! The disk each client gets holds a real, consistent filesystem of the
//! requested type and label: copy it out with nbdcopy, then fsck and blkid
//! the copy.

use crate::common::*;
use std::path::Path;

/// Serves `size` with `args`, copies the disk out and checks blkid's TYPE and
/// LABEL and that `fsck` (given the copy as last argument) finds no error.
fn check_filesystem(
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
    size: u64,
    fs_type: &str,
    label: &str,
    fsck: &[&str],
) {
    let dir = TestDir::new(name);
    let server = Server::start(&dir, Mode::Unix, args, env);
    let copy = dir.join("copy.img");
    copy_out(server.uri(), &copy);
    let len = std::fs::metadata(&copy).unwrap().len();
    assert_eq!(len, size, "the copied disk must be {size} bytes");
    assert_eq!(
        blkid_tag(&copy, "TYPE"),
        fs_type,
        "blkid must see a {fs_type} filesystem"
    );
    assert_eq!(
        blkid_tag(&copy, "LABEL"),
        label,
        "blkid must see the label given to tmpdisk"
    );
    let mut check = cmd(fsck[0], &fsck[1..]);
    check.arg(&copy);
    run_ok(&format!("{} on the copied disk", fsck[0]), check);
    drop(server);
}

#[test]
fn ext4_with_label() {
    require(&["nbdcopy", "mkfs.ext4", "e2fsck", "blkid"]);
    check_filesystem(
        "ext4",
        &["--label", "tmpdisk-ext4", "1G"],
        &[],
        GIB,
        "ext4",
        "tmpdisk-ext4",
        &["e2fsck", "-fn"],
    );
}

#[test]
fn xfs_with_label() {
    require(&["nbdcopy", "mkfs.xfs", "xfs_repair", "blkid"]);
    check_filesystem(
        "xfs",
        &["--type", "xfs", "-L", "tdxfs", "512M"],
        &[],
        512 * MIB,
        "xfs",
        "tdxfs",
        &["xfs_repair", "-n", "-f"],
    );
}

#[test]
fn vfat_with_label() {
    require(&["nbdcopy", "mkfs.vfat", "fsck.vfat", "blkid"]);
    check_filesystem(
        "vfat",
        &["-t", "vfat", "--label", "TMPDISKV", "64M"],
        &[],
        64 * MIB,
        "vfat",
        "TMPDISKV",
        &["fsck.vfat", "-n"],
    );
}

#[test]
fn type_label_and_size_from_environment() {
    require(&["nbdcopy", "mkfs.vfat", "fsck.vfat", "blkid"]);
    check_filesystem(
        "env",
        &[],
        &[
            ("TMPDISK_TYPE", "vfat"),
            ("TMPDISK_LABEL", "ENVLABEL"),
            ("TMPDISK_SIZE", "32M"),
        ],
        32 * MIB,
        "vfat",
        "ENVLABEL",
        &["fsck.vfat", "-n"],
    );
}

#[test]
fn mkfs_options_are_passed_on() {
    require(&["nbdcopy", "mkfs.ext4", "e2fsck", "blkid"]);
    let uuid = "0f2d4a5e-1b3c-4d5e-8f70-123456789abc";
    let dir = TestDir::new("mkfs-option");
    let server = Server::unix(
        &dir,
        &["--mkfs-option=-U", &format!("--mkfs-option={uuid}"), "64M"],
    );
    let copy = dir.join("copy.img");
    copy_out(server.uri(), &copy);
    assert_eq!(
        blkid_tag(&copy, "UUID"),
        uuid,
        "--mkfs-option -U UUID must reach mkfs.ext4"
    );
    run_ok("e2fsck", cmd("e2fsck", &["-fn", copy.to_str().unwrap()]));
}

#[test]
fn label_and_tmpdir_are_used_literally() {
    require(&["python3-nbd", "nbdcopy", "mkfs.ext4", "blkid"]);
    let dir = TestDir::new("literal");
    // Anything a shell would expand or execute, in the tmpdir name and the
    // label (16 bytes: the ext4 maximum).
    let images =
        dir.subdir("im ages 'single' \"double\" $(touch pwned-tmpdir) `touch pwned-bt` $HOME");
    let label = "x'\"$(touch pwnd)";
    assert_eq!(label.len(), 16);
    let markers = ["pwned-tmpdir", "pwned-bt", "pwnd"];

    let server = Server::start_in(&dir, Mode::Unix, &images, &["--label", label, "64M"], &[]);

    // While a client is connected its image lives (unlinked) in that tmpdir.
    let client = HeldClient::start("h = connect(sys.argv[1])", "h.shutdown()", &[server.uri()]);
    let holders = image_holders(&images);
    assert!(
        !holders.is_empty() && holders.iter().all(|(_, t)| is_deleted_image(t, &images)),
        "the image must be an unlinked file in the literal tmpdir {}, open fds: {holders:?}",
        images.display()
    );
    assert_dir_empty(&images, "while serving");
    client.finish();

    let copy = dir.join("copy.img");
    copy_out(server.uri(), &copy);
    assert_eq!(
        blkid_tag(&copy, "LABEL"),
        label,
        "the label must reach mkfs byte for byte"
    );
    for m in markers {
        for base in [dir.path(), images.as_path(), Path::new("/")] {
            assert!(
                !base.join(m).exists(),
                "{} exists: something ran a shell over the label or tmpdir",
                base.join(m).display()
            );
        }
    }
    drop(server);
}

/// mkfs.xfs clears its log (64 MiB here) with FALLOC_FL_ZERO_RANGE, which
/// leaves that much allocated on the host while it reads as zeroes; the
/// server gives it back before serving. The disk is still a valid xfs
/// (`xfs_with_label` repairs a copy made through the same path). The images
/// go to /var/tmp, the server's default tmpdir: on a tmpfs (the system temp
/// dir on some distributions) ZERO_RANGE is refused and mkfs.xfs writes
/// real zeroes, which are data.
#[test]
fn xfs_log_takes_no_disk_space() {
    require(&["python3-nbd", "mkfs.xfs"]);
    let dir = TestDir::new("xfs-space");
    let images = TestDir::new_in(Path::new("/var/tmp"), "xfs-space-images");
    let images = images.path();
    let server = Server::start_in(&dir, Mode::Unix, images, &["--type", "xfs", "1G"], &[]);
    let client = HeldClient::start(
        "h = connect(sys.argv[1])\nassert h.pread(4, 0) == b'XFSB'",
        "h.shutdown()",
        &[server.uri()],
    );
    let allocated = served_image_allocated(images);
    assert!(
        allocated < 4 * MIB,
        "a fresh 1G xfs disk must take under 4 MiB of real disk, it takes {allocated} bytes"
    );
    client.finish();
    drop(server);
}

/// A `--command` may preallocate on purpose (so that its client never meets
/// ENOSPC): the server leaves that space allocated, although it reads as
/// zeroes like xfs's log.
#[test]
fn command_preallocation_is_kept() {
    require(&["python3-nbd"]);
    let dir = TestDir::new("prealloc");
    let images = TestDir::new_in(Path::new("/var/tmp"), "prealloc-images");
    let images = images.path();
    let server = Server::start_in(
        &dir,
        Mode::Unix,
        images,
        &["--command", "fallocate -l 16M \"$disk\"", "64M"],
        &[],
    );
    let client = HeldClient::start("h = connect(sys.argv[1])", "h.shutdown()", &[server.uri()]);
    let allocated = served_image_allocated(images);
    assert!(
        allocated >= 16 * MIB,
        "the command preallocated 16 MiB; the served image takes only {allocated} bytes"
    );
    client.finish();
    drop(server);
}

/// Real disk space (st_blocks) of the one image being served from `images`.
fn served_image_allocated(images: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let pid = wait_image_holders(images, 1, "while serving")[0];
    let sizes: Vec<u64> = fds_of(pid)
        .into_iter()
        .filter(|(_, t)| is_deleted_image(t, images))
        .map(|(fd, _)| {
            std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
                .expect("stat the served image")
                .blocks()
                * 512
        })
        .collect();
    assert_eq!(sizes.len(), 1, "one image open in {pid}: {sizes:?}");
    sizes[0]
}

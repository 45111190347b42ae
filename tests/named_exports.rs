//! Named exports (`--exports FILE`): one socket, many kinds of disk, and
//! clients that choose size, type and label by export name within the
//! file's limits. Real clients for each kind: nbdinfo (list, info),
//! qemu-io and qemu-img, nbdcopy with fsck and blkid, and the host kernel
//! mounting chosen ext4 and xfs disks. Refusals are checked on the wire
//! (the reply type and the message) and through qemu, which prints the
//! server's message; nothing is created for a refused name.

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::kernel_mount::KernelMount;
use crate::common::nbdraw::{self, GoReply};
use crate::common::*;

/// The site's exports: a scratch disk whose size, type and label clients
/// choose, a FAT stick of fixed shape, a swap disk and a blank disk.
const EXPORTS: &str = r#"# a test site
[export.scratch]
description = "scratch disk for builds"
size = "64M"
type = "ext4"
max-size = "512M"
types = ["ext4", "xfs"]
labels = true

[export.stick]
size = "48M"
type = "vfat"
label = "FIRMWARE"

[export.swap]
size = "40M"
type = "swap"

[export.blank]
size = "16M"
type = "none"
"#;

const REP_ERR_POLICY: u32 = (1 << 31) | 2;
const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;

fn exports_file(dir: &TestDir, text: &str) -> PathBuf {
    let f = dir.join("exports.toml");
    fs::write(&f, text).unwrap();
    f
}

/// A `--unix` server with [`EXPORTS`] and a 32M ext4 default export.
fn server(dir: &TestDir) -> Server {
    let f = exports_file(dir, EXPORTS);
    Server::unix(dir, &["--exports", f.to_str().unwrap(), "32M"])
}

fn uri(dir: &TestDir, name: &str) -> String {
    format!(
        "nbd+unix:///{name}?socket={}",
        dir.join("nbd.sock").display()
    )
}

#[test]
fn list_shows_every_export_and_builds_nothing() {
    require(&["nbdinfo"]);
    let dir = TestDir::new("named-list");
    let server = server(&dir);
    let text = nbdinfo_ok(&["--list", "--json", server.uri()]);
    let doc = json::parse(&text).unwrap_or_else(|e| panic!("nbdinfo --list --json: {e}\n{text}"));
    let exports = doc["exports"].as_array().expect("exports array");
    let listed: Vec<(&str, &str, u64)> = exports
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap_or("?"),
                e["description"].as_str().unwrap_or("?"),
                e["export-size"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("", "32 MiB ext4 disk, fresh per connection", 32 * MIB),
            ("blank", "16 MiB blank disk, fresh per connection", 16 * MIB),
            ("scratch", "scratch disk for builds", 64 * MIB),
            (
                "stick",
                "48 MiB vfat disk labelled \"FIRMWARE\", fresh per connection",
                48 * MIB
            ),
            ("swap", "40 MiB swap disk, fresh per connection", 40 * MIB),
        ],
        "{text}"
    );
    // Listing asks every export for its size: no disk was made for it.
    assert_dir_empty(server.images(), "after nbdinfo --list");
    assert!(
        !server.proc.stderr().contains("mkfs"),
        "{}",
        server.proc.describe()
    );
}

#[test]
fn clients_choose_size_type_and_label() {
    require(&[
        "nbdinfo",
        "nbdcopy",
        "qemu-io",
        "mkfs.ext4",
        "e2fsck",
        "blkid",
    ]);
    let dir = TestDir::new("named-choose");
    let server = server(&dir);
    let chosen = uri(&dir, "scratch:size=96M:type=ext4:label=build");

    let (_, export) = nbdinfo_json(&chosen);
    assert_eq!(export["export-size"].as_u64(), Some(96 * MIB), "{export:?}");
    assert_eq!(
        export["description"].as_str(),
        Some("96 MiB ext4 disk labelled \"build\", fresh per connection"),
        "NBD_INFO_DESCRIPTION says what the client chose"
    );

    // The chosen disk is a real ext4 of that size and label.
    let copy = dir.join("chosen.img");
    copy_out(&chosen, &copy);
    assert_eq!(fs::metadata(&copy).unwrap().len(), 96 * MIB);
    assert_eq!(blkid_tag(&copy, "TYPE"), "ext4");
    assert_eq!(blkid_tag(&copy, "LABEL"), "build");
    run_ok(
        "e2fsck",
        cmd("e2fsck", &["-f", "-n", copy.to_str().unwrap()]),
    );

    // qemu takes the same name in its URI, unescaped; what it writes
    // there reads back.
    let out = run_ok(
        "qemu-io",
        cmd(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0xa5 80M 1M",
                "-c",
                "read -P 0xa5 80M 1M",
                "-c",
                "length",
                &chosen,
            ],
        ),
    );
    assert!(
        out.stdout.contains("96 MiB"),
        "qemu-io sees the chosen size:\n{out}"
    );

    // The log names the export and the shape the client got.
    let log = server.proc.stderr();
    assert!(
        log.contains("export=scratch") && log.contains("label=build"),
        "{log}"
    );
}

#[test]
fn kernel_mounts_chosen_ext4_and_xfs() {
    require(&["mkfs.ext4", "mkfs.xfs", "blkid", "findmnt"]);
    let dir = TestDir::new("named-kernel");
    let server = server(&dir);
    let sock = dir.join("nbd.sock");
    for (name, export, fs_type, label) in [
        ("ext4", "scratch:label=k-ext4", "ext4", "k-ext4"),
        (
            "xfs",
            "scratch:size=320M:type=xfs:label=k-xfs",
            "xfs",
            "k-xfs",
        ),
    ] {
        let mut m = KernelMount::with_export(&dir, name, &sock, export);
        let out = run_ok(
            "findmnt",
            cmd(
                "findmnt",
                &["-n", "-o", "FSTYPE", m.path().to_str().unwrap()],
            ),
        );
        assert_eq!(out.stdout.trim(), fs_type, "{export}");
        assert_eq!(blkid_tag(Path::new(m.device()), "LABEL"), label, "{export}");
        let data: Vec<u8> = (0..MIB as u32).map(|i| (i * 7 + 3) as u8).collect();
        fs::write(m.path().join("f.bin"), &data).unwrap();
        run_ok("sync", cmd("sync", &["-f", m.path().to_str().unwrap()]));
        assert!(
            fs::read(m.path().join("f.bin")).unwrap() == data,
            "{export}"
        );
        m.unmount();
    }
    drop(server);
}

#[test]
fn swap_and_blank_disks() {
    require(&["nbdcopy", "mkswap", "blkid"]);
    let dir = TestDir::new("named-kinds");
    let server = server(&dir);

    let swap = dir.join("swap.img");
    copy_out(&uri(&dir, "swap"), &swap);
    assert_eq!(
        blkid_tag(&swap, "TYPE"),
        "swap",
        "mkswap made the swap header"
    );

    let blank = dir.join("blank.img");
    copy_out(&uri(&dir, "blank"), &blank);
    let bytes = fs::read(&blank).unwrap();
    assert_eq!(bytes.len() as u64, 16 * MIB);
    assert!(
        bytes.iter().all(|&b| b == 0),
        "a blank disk is all zeroes: nothing was run on it"
    );
    let probe = run("blkid", cmd("blkid", &["-p", blank.to_str().unwrap()]));
    assert_eq!(
        probe.status.code(),
        Some(2),
        "blkid finds no signature on a blank disk:\n{probe}"
    );
    drop(server);
}

#[test]
fn refusals_say_what_is_allowed_and_create_nothing() {
    require(&["qemu-img"]);
    let dir = TestDir::new("named-refuse");
    let server = server(&dir);
    let sock = dir.join("nbd.sock");
    let long_ok = "s".repeat(4096);
    let cases: Vec<(Vec<u8>, u32, &str)> = vec![
        (
            b"nosuch".to_vec(),
            REP_ERR_UNKNOWN,
            "exports: \"\" (default), blank, scratch, stick, swap",
        ),
        (
            b"scratch:size=1G".to_vec(),
            REP_ERR_POLICY,
            "over its limit of 512 MiB",
        ),
        (
            b"scratch:type=btrfs".to_vec(),
            REP_ERR_POLICY,
            "offers the types ext4, xfs, not \"btrfs\"",
        ),
        (
            b"scratch:type=xfs:label=thirteen-long".to_vec(),
            REP_ERR_POLICY,
            "xfs labels hold at most 12",
        ),
        (
            b"stick:size=1G".to_vec(),
            REP_ERR_POLICY,
            "fixed size (48 MiB)",
        ),
        (b"blank:label=x".to_vec(), REP_ERR_POLICY, "takes no label="),
        (
            b"scratch:size=64M,type=xfs".to_vec(),
            REP_ERR_UNKNOWN,
            "separated by ':'",
        ),
        (
            b"scratch:colour=red".to_vec(),
            REP_ERR_UNKNOWN,
            "unknown key",
        ),
        (
            b"scratch:type=x$(reboot)".to_vec(),
            REP_ERR_UNKNOWN,
            "only A-Z",
        ),
        (b"../../etc/passwd".to_vec(), REP_ERR_UNKNOWN, "is not one"),
        (b"scr\x1b[2Jatch".to_vec(), REP_ERR_UNKNOWN, "\\u{1b}"),
        (long_ok.clone().into_bytes(), REP_ERR_UNKNOWN, "is not one"),
    ];
    for (name, reply, needle) in &cases {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        nbdraw::handshake(&mut s).unwrap();
        let shown = String::from_utf8_lossy(&name[..name.len().min(40)]).into_owned();
        match nbdraw::opt_go_name(&mut s, name) {
            Ok(GoReply::Err {
                reply_type,
                message,
            }) => {
                assert_eq!(reply_type, *reply, "{shown:?}: {message}");
                assert!(message.contains(needle), "{shown:?}: {message}");
                assert!(
                    !message.chars().any(char::is_control),
                    "{shown:?}: {message:?}"
                );
            }
            other => panic!("{shown:?}: {other:?}"),
        }
    }
    // qemu shows the server's message to its user.
    let out = run(
        "qemu-img",
        cmd("qemu-img", &["info", &uri(&dir, "scratch:size=1G")]),
    );
    assert!(
        !out.status.success() && out.stderr.contains("over its limit of 512 MiB"),
        "{out}"
    );
    assert_dir_empty(server.images(), "after refused names");
    // Client text reaches the log escaped, never as raw control bytes.
    let log = server.proc.stderr();
    // An image is nameless from the start, so the empty tmpdir above
    // cannot tell: no disk was built and served for a refused name.
    assert!(
        !log.contains("mkfs") && served_lines(&log).is_empty(),
        "{log}"
    );
    assert!(!log.contains('\x1b'), "{log}");
    assert!(log.contains("refused"), "{log}");
}

#[test]
fn check_config_prints_the_exports_or_says_file_and_line() {
    let dir = TestDir::new("named-check");
    let f = exports_file(&dir, EXPORTS);
    let images = dir.subdir("images");
    let check = |args: &[&str]| {
        let mut c = tmpdisk_cmd(&["--check-config", "--tmpdir", images.to_str().unwrap()]);
        c.args(args);
        run("tmpdisk --check-config", c)
    };
    let out = check(&["--exports", f.to_str().unwrap(), "32M"]);
    assert!(out.status.success(), "{out}");
    let table: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        table,
        [
            "EXPORT     DISK                        CLIENTS MAY CHOOSE",
            "(default)  32 MiB ext4                 -",
            "blank      16 MiB blank                -",
            "scratch    64 MiB ext4                 size<=512 MiB type=ext4|xfs label",
            "stick      48 MiB vfat label=FIRMWARE  -",
            "swap       40 MiB swap                 -",
        ],
        "{out}"
    );

    // A drop-in with a mistake: the file and line, exit 2, at check and
    // at start alike (the server never listens).
    let drop_ins = dir.subdir("exports.d");
    let bad = drop_ins.join("50-lab.toml");
    fs::write(&bad, "[export.lab]\nsize = \"1G\"\ncolour = \"red\"\n").unwrap();
    let want = format!("{}:3: unknown field `colour`", bad.display());
    let out = check(&["--exports", f.to_str().unwrap(), "32M"]);
    assert_eq!(out.status.code(), Some(2), "{out}");
    assert!(out.stderr.contains(&want), "{out}");
    assert_one_line(&out.stderr, "a bad exports file");
    let sock = dir.join("never.sock");
    let out = run(
        "tmpdisk --unix",
        tmpdisk_cmd(&[
            "--unix",
            sock.to_str().unwrap(),
            "--tmpdir",
            images.to_str().unwrap(),
            "--exports",
            f.to_str().unwrap(),
            "32M",
        ]),
    );
    assert_eq!(out.status.code(), Some(2), "{out}");
    assert!(out.stderr.contains(&want), "{out}");
    assert!(
        !sock.exists(),
        "a bad file must stop tmpdisk before it listens"
    );

    // A type whose mkfs is not installed: --check-config names it.
    fs::write(&bad, "[export.lab]\nsize = \"1G\"\ntype = \"nosuchfs\"\n").unwrap();
    let out = check(&["--exports", f.to_str().unwrap(), "32M"]);
    assert_eq!(out.status.code(), Some(2), "{out}");
    assert!(
        out.stderr.contains("export \"lab\", type nosuchfs")
            && out.stderr.contains("mkfs.nosuchfs"),
        "{out}"
    );
}

#[test]
fn socket_activated_instances_read_the_file_per_client() {
    require(&["nbdinfo", "systemd-socket-activate"]);
    let dir = TestDir::new("named-reload");
    let f = exports_file(&dir, "[export.first]\nsize = \"8M\"\ntype = \"none\"\n");
    let server = Server::start(
        &dir,
        Mode::SocketActivate,
        &["32M"],
        &[("TMPDISK_EXPORTS", f.to_str().unwrap())],
    );
    let size = |name: &str| {
        let uri = format!("{}/{name}", server.uri());
        nbdinfo_ok(&["--size", &uri]).trim().to_string()
    };
    assert_eq!(size("first"), (8 * MIB).to_string());
    // The next client sees the edited file: no restart.
    fs::write(
        &f,
        "[export.first]\nsize = \"8M\"\ntype = \"none\"\n\n[export.second]\nsize = \"12M\"\ntype = \"none\"\n",
    )
    .unwrap();
    assert_eq!(size("second"), (12 * MIB).to_string());
}

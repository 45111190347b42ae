//! The Linux kernel's own NBD client (nbd.ko + nbd-client, what thin clients
//! run) against tmpdisk. The host has no nbd module, so this boots a Debian
//! 12 guest under qemu's TCG (the machines' /dev/kvm hangs a stock kernel)
//! with user-mode networking, where the host's 127.0.0.1 is 10.0.2.2. One
//! boot runs every scenario of tests/guest/init:
//!
//! 1. ext4 at 512- and 4096-byte logical blocks (`nbd-client -b`): mount,
//!    write ~100 MiB, sync, fstrim, drop caches, re-read and compare
//!    checksums, unmount, `e2fsck -fn` clean, disconnect;
//! 2. the same with xfs (`xfs_repair -n`), with tmpdisk's default mkfs
//!    options: xfs mounts at 4096 only if mkfs.xfs was told 4 KiB sectors;
//! 3. a reconnect to the same server gets a fresh disk (new UUID, never
//!    mounted, no marker);
//! 4. /dev/nbd0 and /dev/nbd1 on the same server at once are two disks;
//! 5. `nbd-client -C 2` is refused by the kernel, as tmpdisk never
//!    advertises multi-conn, and leaves the device unusable;
//! 6. reconnect: a tokened export (`:id=TOKEN`, `--reconnect-grace`)
//!    through a relay on the host, connected by examples/nbd-persist.rs
//!    (the netlink half of a kernel client that reconnects: Debian 12's
//!    nbd-client 3.24 quits when the connection dies, and 3.27.1's
//!    `-persist` is never wired to its reconnect code). The relay is cut
//!    while ~100 MiB are written back: the kernel holds the I/O, the
//!    reconnect gets the same disk, the data reads back and `e2fsck` is
//!    clean;
//! 7. an outage longer than the grace: the disk is dropped, the reconnect
//!    refused, and the kernel fails the I/O after its dead-connection
//!    timeout; nothing is left on the host.
//!
//! tests/guest/prepare builds the guest (kernel, initramfs, qemu) from Debian
//! 12 packages into target/guest/ once, and again when apt offers newer
//! versions; this test runs it first and fails, naming what is missing, if
//! it cannot. The console log of the last run is kept as
//! target/guest/last-console.log.

use crate::common::relay::{Relay, Upstream};
use crate::common::*;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

/// Every line the guest's /init reports on starts with this.
const MARK: &str = "@@tmpdisk-guest@@";
/// The steps of tests/guest/init, in order; each must PASS.
const STEPS: &[&str] = &[
    "setup",
    "ext4-512",
    "ext4-4096",
    "xfs-512",
    "xfs-4096",
    "reconnect-fresh",
    "two-devices",
    "multi-conn-refused",
    "persist",
    "persist-expired",
];
/// The reconnect scenarios: the server keeps a dropped disk this long; the
/// short outage is well within it, the long one well past it; the kernel
/// holds I/O for a reconnect for DEAD_TIMEOUT, longer than the long outage
/// (so that the reconnect is refused before the kernel gives up).
const GRACE: Duration = Duration::from_secs(8);
const SHORT_OUTAGE: Duration = Duration::from_secs(2);
const LONG_OUTAGE: Duration = Duration::from_secs(14);
const DEAD_TIMEOUT: Duration = Duration::from_secs(25);
const TOKEN: &str = "9c1f6e2d7b3a48c5a0e4d2f1b6c8e3a7";
/// Connections each server must see: ext4-512, ext4-4096, two for
/// reconnect-fresh, two for two-devices, two for `-C 2`; xfs-512 and
/// xfs-4096.
const EXT4_CLIENTS: usize = 8;
const XFS_CLIENTS: usize = 2;
/// Clients that ended with NBD_CMD_DISC (all but the two of `-C 2`, which
/// the kernel refused before any request).
const EXT4_DISCONNECTS: usize = 6;
/// The disk size every client gets.
const SIZE: u64 = GIB;

/// Downloading and unpacking ~100 MB of packages on a cold cache.
const PREPARE_LIMIT: Duration = Duration::from_secs(20 * 60);
/// From starting qemu to the guest's BOOTED line (about 5 s here).
const BOOT_LIMIT: Duration = Duration::from_secs(180);
/// The longest the guest may go without a new marker line (a step takes
/// under 20 s here).
const STEP_LIMIT: Duration = Duration::from_secs(240);
/// The whole guest run (about 80 s here).
const TOTAL_LIMIT: Duration = Duration::from_secs(15 * 60);
/// From DONE to qemu's exit (poweroff -f).
const POWEROFF_LIMIT: Duration = Duration::from_secs(60);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn guest_cache() -> PathBuf {
    repo().join("target/guest")
}

/// Runs tests/guest/prepare (idempotent; quick on a complete cache).
fn prepare() -> Duration {
    let started = Instant::now();
    let mut c = Command::new("bash");
    c.arg(repo().join("tests/guest/prepare")).arg(guest_cache());
    let mut p = Proc::spawn("tests/guest/prepare", c);
    if p.wait_timeout(PREPARE_LIMIT).is_none() {
        panic!(
            "tests/guest/prepare did not finish within {PREPARE_LIMIT:?}: the guest for the kernel NBD client cannot be built\n{}",
            p.describe()
        );
    }
    let status = p.wait();
    assert!(
        status.success(),
        "tests/guest/prepare failed ({status}): the guest for the kernel NBD client cannot be built\n{}",
        p.describe()
    );
    started.elapsed()
}

/// Zero bytes up to the next multiple of 4 (cpio's alignment).
fn pad(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// A cpio archive ("newc") of regular files and directories: (name, mode,
/// contents).
fn cpio(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let trailer: (&str, u32, &[u8]) = ("TRAILER!!!", 0, &[]);
    for (i, (name, mode, data)) in files.iter().chain([&trailer]).enumerate() {
        let fields = [
            i as u32 + 1,          // ino
            *mode,                 // mode
            0,                     // uid
            0,                     // gid
            1,                     // nlink
            0,                     // mtime
            data.len() as u32,     // filesize
            0,                     // devmajor
            0,                     // devminor
            0,                     // rdevmajor
            0,                     // rdevminor
            name.len() as u32 + 1, // namesize, with the NUL
            0,                     // check
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        pad(&mut out);
        out.extend_from_slice(data);
        pad(&mut out);
    }
    out
}

/// The files every filesystem gets, ~100 MiB of random bytes: (name, size).
/// "small" is also the one file of the two-devices step.
const DATA: &[(&str, usize)] = &[
    ("f40M", 40 << 20),
    ("f30M", 30 << 20),
    ("f20M", 20 << 20),
    ("f10M-3", (10 << 20) - 3),
    ("f299999", 299_999),
    ("small", 12_345),
];

/// The base initramfs with a second archive (the kernel unpacks
/// concatenated archives in turn) holding `init` as /init, the DATA files
/// from /dev/urandom in /data, and their `sha256sum` as /data.sha256.
/// Made here, not in the guest, where urandom and sha256sum take ~10 s.
fn initrd(base: &Path, init: &str, scratch: &Path) -> Vec<u8> {
    let mut urandom = fs::File::open("/dev/urandom").expect("/dev/urandom");
    let mut data = Vec::new();
    for (name, size) in DATA {
        let mut bytes = vec![0u8; *size];
        urandom
            .read_exact(&mut bytes)
            .expect("reading /dev/urandom");
        fs::write(scratch.join(name), &bytes).unwrap();
        data.push((format!("data/{name}"), bytes));
    }
    let names: Vec<&str> = DATA.iter().map(|(n, _)| *n).collect();
    let mut sums = cmd("sha256sum", &names);
    sums.current_dir(scratch);
    let sums = run_ok("sha256sum", sums).stdout;
    for name in names {
        fs::remove_file(scratch.join(name)).unwrap();
    }

    let helper = persist_helper();
    let mut files: Vec<(&str, u32, &[u8])> = vec![
        ("init", 0o100755, init.as_bytes()),
        ("data.sha256", 0o100644, sums.as_bytes()),
        ("data", 0o040755, &[]),
    ];
    files.extend(
        data.iter()
            .map(|(n, b)| (n.as_str(), 0o100644, b.as_slice())),
    );
    files.extend(
        helper
            .iter()
            .map(|(n, mode, b)| (n.as_str(), *mode, b.as_slice())),
    );
    let mut out = fs::read(base).unwrap_or_else(|e| panic!("reading {}: {e}", base.display()));
    pad(&mut out);
    out.extend(cpio(&files));
    out
}

/// examples/nbd-persist.rs as the guest gets it: the binary (cargo test
/// builds the examples next to the test binary's directory) as
/// /sbin/nbd-persist, and the libraries it needs that the base initramfs
/// may lack (its libc is Debian 12's, as the host's: not replaced).
fn persist_helper() -> Vec<(String, u32, Vec<u8>)> {
    let exe = std::env::current_exe().expect("the test binary's path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("examples/nbd-persist"))
        .expect("target/<profile>/examples");
    let bytes = fs::read(&bin).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: cargo test builds the examples; build it with `cargo build --release --examples`",
            bin.display()
        )
    });
    let mut out = vec![("sbin/nbd-persist".to_string(), 0o100755, bytes)];
    let ldd = run_ok("ldd", cmd("ldd", &[bin.to_str().unwrap()])).stdout;
    for path in ldd
        .lines()
        .filter_map(|l| l.split("=> ").nth(1)?.split_whitespace().next())
    {
        let name = Path::new(path).file_name().unwrap().to_str().unwrap();
        if name.starts_with("libc.so") {
            continue;
        }
        let lib = fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        out.push((format!("lib/x86_64-linux-gnu/{name}"), 0o100644, lib));
    }
    out
}

fn port_of(server: &Server) -> u16 {
    server
        .uri()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {}", server.uri()))
}

/// (word, rest) of every marker line: "START ext4-512 ...", "PASS ...".
fn markers(log: &str) -> Vec<(String, String)> {
    log.lines()
        .filter_map(|l| {
            let rest = l[l.find(MARK)? + MARK.len()..].trim();
            let (word, rest) = rest.split_once(' ').unwrap_or((rest, ""));
            Some((word.to_string(), rest.trim_end_matches('\r').to_string()))
        })
        .collect()
}

/// The console lines of one step, from its START marker to the next one.
fn step_section(log: &str, step: &str) -> String {
    let start = format!("{MARK} START {step} ");
    let mut out = Vec::new();
    let mut inside = false;
    for l in log.lines() {
        if l.contains(MARK) && (l.contains(" START ") || l.contains(" DONE")) {
            inside = l.contains(&start);
        }
        if inside {
            out.push(l.trim_end_matches('\r'));
        }
    }
    out.join("\n")
}

fn tail(log: &str, lines: usize) -> String {
    let v: Vec<&str> = log.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Facts from a listener's log lines.
#[derive(Debug, Default)]
struct ServerLog {
    served: usize,
    /// (end, requests, bytes_written, disk_errors) of every "client left".
    left: Vec<(String, u64, u64, u64)>,
    /// WARN and ERROR lines.
    complaints: Vec<String>,
}

fn server_log(stderr: &str) -> ServerLog {
    let mut out = ServerLog::default();
    for line in stderr.lines() {
        if line.contains(" client served ") {
            out.served += 1;
        }
        if line.contains(" client left ") {
            let num = |k| {
                log_field(line, k)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(u64::MAX)
            };
            out.left.push((
                log_field(line, "end").unwrap_or("?").to_string(),
                num("requests"),
                num("bytes_written"),
                num("disk_errors"),
            ));
        }
        if line.contains(" WARN ") || line.contains(" ERROR ") {
            out.complaints.push(line.to_string());
        }
    }
    out
}

#[test]
fn kernel_nbd_client_in_a_guest() {
    if !cfg!(all(target_arch = "x86_64", target_os = "linux")) {
        eprintln!("skipping: the guest is an x86_64 Debian 12 one, run by Debian's amd64 qemu");
        return;
    }
    let prepare_time = prepare();
    let current = guest_cache().join("current");

    let dir = TestDir::new("kernel-client");
    let ext4_images = dir.subdir("ext4-images");
    let xfs_images = dir.subdir("xfs-images");
    let ext4 = Server::start_in(&dir, Mode::Tcp, &ext4_images, &["1G"], &[]);
    // tmpdisk's default mkfs options for xfs, which must make a filesystem
    // that mounts at -b 4096 too (4 KiB sectors).
    let xfs = Server::start_in(&dir, Mode::Tcp, &xfs_images, &["-t", "xfs", "1G"], &[]);
    // The reconnect server, behind a relay the test cuts.
    let persist_images = dir.subdir("persist-images");
    let grace = GRACE.as_secs().to_string();
    let persist = Server::start_in(
        &dir,
        Mode::Unix,
        &persist_images,
        &[
            "--reconnect-grace",
            &grace,
            "--reconnect-dir",
            dir.subdir("reconnect").to_str().unwrap(),
            "1G",
        ],
        &[],
    );
    let socket = persist
        .uri()
        .split("socket=")
        .nth(1)
        .expect("a Unix socket server");
    let relay = Relay::start("127.0.0.1:0", Upstream::Unix(socket.into()));

    let template = fs::read_to_string(repo().join("tests/guest/init")).expect("tests/guest/init");
    let init = template
        .replace("@EXT4_PORT@", &port_of(&ext4).to_string())
        .replace("@XFS_PORT@", &port_of(&xfs).to_string())
        .replace("@SIZE@", &SIZE.to_string())
        .replace("@PERSIST_PORT@", &relay.port.to_string())
        .replace("@TOKEN@", TOKEN)
        .replace("@DEAD_TIMEOUT@", &DEAD_TIMEOUT.as_secs().to_string());
    assert!(!init.contains("@EXT4_PORT@") && !init.contains("@SIZE@"));
    let initrd_path = dir.join("initrd");
    let base = current.join("initramfs.cpio");
    fs::write(&initrd_path, initrd(&base, &init, &dir.subdir("data"))).unwrap();
    let console = dir.join("console.log");

    let mut c = cmd(
        current.join("qemu").to_str().unwrap(),
        &[
            "-accel",
            "tcg",
            "-M",
            "pc",
            // TCG runs this guest about twice as fast with qemu64 as with max.
            "-cpu",
            "qemu64",
            "-smp",
            "1",
            "-m",
            "1024",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ],
    );
    c.arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(current.join("vmlinux"))
        .arg("-initrd")
        .arg(&initrd_path)
        // init=/init: if /init cannot run, the kernel panics (and qemu
        // exits) instead of falling back to busybox's /sbin/init.
        .args(["-append", "console=ttyS0 quiet panic=-1 init=/init"])
        // No option ROM: the kernel is loaded directly, iPXE is not needed.
        .args([
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-pci,netdev=n0,romfile=",
        ]);
    let started = Instant::now();
    let mut qemu = Proc::spawn("qemu-system-x86_64 (guest)", c);

    let read_console =
        || String::from_utf8_lossy(&fs::read(&console).unwrap_or_default()).into_owned();
    let keep = |log: &str| {
        let _ = fs::write(guest_cache().join("last-console.log"), log);
    };
    let fail = |why: String, log: &str| -> ! {
        keep(log);
        panic!(
            "{why}\n--- guest console (last 150 lines; all of it in {}) ---\n{}",
            guest_cache().join("last-console.log").display(),
            tail(log, 150)
        );
    };

    // Watch the console until qemu exits, bounding every wait; the guest's
    // CUT and DOWN lines are outages of the relay.
    let mut outages = 0;
    let mut seen = 0;
    let mut progress = Instant::now();
    let mut booted_after = None;
    let mut done_at: Option<Instant> = None;
    let status = loop {
        let exited = qemu.try_status();
        let log = read_console();
        let ms = markers(&log);
        if ms.len() > seen {
            seen = ms.len();
            progress = Instant::now();
        }
        let asked: Vec<&str> = ms
            .iter()
            .filter(|(w, _)| w == "CUT" || w == "DOWN")
            .map(|(w, _)| w.as_str())
            .collect();
        for word in &asked[outages..] {
            let how_long = if *word == "CUT" {
                SHORT_OUTAGE
            } else {
                LONG_OUTAGE
            };
            let cut = relay.outage(how_long);
            eprintln!(
                "kernel NBD client: {word}: {cut} connection(s) cut, relay down for {how_long:?}"
            );
        }
        outages = asked.len();
        if booted_after.is_none() && ms.iter().any(|(w, _)| w == "BOOTED") {
            booted_after = Some(started.elapsed());
        }
        if done_at.is_none() && ms.iter().any(|(w, _)| w == "DONE") {
            done_at = Some(Instant::now());
        }
        if let Some(status) = exited {
            break status;
        }
        let running = ms
            .iter()
            .rev()
            .find(|(w, _)| w == "START")
            .map_or("-", |(_, r)| r.as_str());
        if let Some(at) = done_at {
            if at.elapsed() > POWEROFF_LIMIT {
                fail(
                    format!("the guest did not power off within {POWEROFF_LIMIT:?} of DONE"),
                    &log,
                );
            }
        } else if booted_after.is_none() {
            if started.elapsed() > BOOT_LIMIT {
                fail(
                    format!(
                        "the guest did not boot within {BOOT_LIMIT:?}\n{}",
                        qemu.describe()
                    ),
                    &log,
                );
            }
        } else if progress.elapsed() > STEP_LIMIT {
            fail(
                format!("the guest made no progress for {STEP_LIMIT:?}; running: {running}"),
                &log,
            );
        }
        if started.elapsed() > TOTAL_LIMIT {
            fail(
                format!("the guest did not finish within {TOTAL_LIMIT:?}; running: {running}"),
                &log,
            );
        }
        thread::sleep(Duration::from_millis(200));
    };
    let guest_time = started.elapsed();
    let log = read_console();
    keep(&log);
    let ms = markers(&log);
    if done_at.is_none() {
        fail(
            format!(
                "qemu exited ({status}) before the guest said DONE\n{}",
                qemu.describe()
            ),
            &log,
        );
    }

    // Every step must have passed.
    let mut failures = Vec::new();
    for step in STEPS {
        let pass = ms
            .iter()
            .any(|(w, r)| w == "PASS" && r.split(' ').next() == Some(step));
        let failed = ms
            .iter()
            .find(|(w, r)| w == "FAIL" && r.starts_with(&format!("{step}:")));
        match (pass, failed) {
            (true, None) => {}
            (_, Some((_, why))) => failures.push(format!(
                "step {step} FAILED: {why}\n{}",
                step_section(&log, step)
            )),
            (false, None) => failures.push(format!("step {step}: no PASS or FAIL marker")),
        }
    }
    if !failures.is_empty() {
        // What a known kernel message means for tmpdisk.
        let hints = [(
            "device supports 4096 byte sectors (not 512)",
            "xfs was made with 512-byte sectors, which a 4096-byte block device cannot mount: \
             tmpdisk must run mkfs.xfs with -s size=4096 by default",
        )];
        let hints: String = hints
            .iter()
            .filter(|(message, _)| log.contains(message))
            .map(|(message, hint)| format!("\n\nhint: the kernel said \"{message}\": {hint}"))
            .collect();
        fail(
            format!(
                "{} of {} guest steps failed (log kept in {}):\n\n{}{hints}",
                failures.len(),
                STEPS.len(),
                guest_cache().join("last-console.log").display(),
                failures.join("\n\n")
            ),
            &log,
        );
    }

    // The servers saw what the guest did, and kept nothing.
    for (name, server, images, clients) in [
        ("ext4", &ext4, &ext4_images, EXT4_CLIENTS),
        ("xfs", &xfs, &xfs_images, XFS_CLIENTS),
    ] {
        wait_no_image_holders(images, &format!("after the guest is gone ({name} server)"));
        wait_children_reaped(
            server.pid(),
            0,
            &format!("after the guest is gone ({name} server)"),
        );
        let stderr = server.proc.stderr();
        let facts = server_log(&stderr);
        let context = format!("{name} server log:\n{stderr}");
        assert_eq!(facts.served, clients, "{name}: clients served\n{context}");
        assert_eq!(facts.left.len(), clients, "{name}: clients left\n{context}");
        assert!(
            facts.complaints.is_empty(),
            "{name}: warnings or errors\n{context}"
        );
        assert!(
            facts.left.iter().all(|(_, _, _, errors)| *errors == 0),
            "{name}: disk errors\n{context}"
        );
        // The two round trips each wrote their ~100 MiB to the server.
        let big = facts
            .left
            .iter()
            .filter(|(_, _, w, _)| *w >= 100 * MIB)
            .count();
        assert_eq!(
            big, 2,
            "{name}: clients that wrote 100 MiB or more\n{context}"
        );
        let disconnects = facts
            .left
            .iter()
            .filter(|(e, ..)| e == "disconnect")
            .count();
        let expected = if name == "ext4" {
            EXT4_DISCONNECTS
        } else {
            XFS_CLIENTS
        };
        assert_eq!(
            disconnects, expected,
            "{name}: clients that ended with a disconnect\n{context}"
        );
        // The rest are the two connections of -C 2: refused by the kernel
        // before any request.
        assert!(
            facts
                .left
                .iter()
                .filter(|(e, ..)| e != "disconnect")
                .all(|(e, requests, ..)| e == "closed" && *requests == 0),
            "{name}: the connections without a disconnect must be -C 2's, closed unused\n{context}"
        );
        assert_dir_empty(images, "after the guest is gone");
    }

    // The reconnect server: one disk, handed over once after the short
    // outage, dropped after the long one, nothing left.
    wait_no_image_holders(
        &persist_images,
        "after the guest is gone (reconnect server)",
    );
    let log = persist.proc.stderr();
    for (what, count) in [
        ("client reconnected to its disk", 1),
        ("disk handed to its reconnecting client", 1),
        ("no reconnect within the grace period: disk dropped", 1),
    ] {
        assert_eq!(
            log.matches(what).count(),
            count,
            "reconnect server: {what:?}\n{log}"
        );
    }
    assert_dir_empty(
        &persist_images,
        "after the guest is gone (reconnect server)",
    );
    let uptime = |word: &str, step: &str| {
        ms.iter()
            .find(|(w, r)| w == word && r.split(' ').next() == Some(step))
            .and_then(|(_, r)| log_field(&format!(" {r}"), "uptime").map(str::to_string))
            .unwrap_or_default()
    };
    eprintln!(
        "kernel NBD client: prepare {:.1}s, boot {:.1}s, guest run {:.1}s (setup done at uptime {}s, all done at {}s)",
        prepare_time.as_secs_f64(),
        booted_after.unwrap_or_default().as_secs_f64(),
        guest_time.as_secs_f64(),
        uptime("PASS", "setup"),
        uptime("PASS", "persist-expired"),
    );
}

//! End to end in a real systemd: build the .deb and the .rpm with
//! `packaging/build-packages`, boot systemd as PID 1 in `systemd-nspawn`
//! (on a copy-on-write overlay of this machine's root), install the package
//! in it, `systemctl enable --now tmpdisk.socket`, and drive it from the
//! host with real clients (nbdinfo, libnbd). Checked, for each package:
//!
//! - installing enables and starts nothing; `systemd-analyze verify` prints
//!   nothing and `systemd-analyze security` scores the template ≤ 0.5;
//! - nbdinfo sees the size set in /etc/tmpdisk/tmpdisk.conf and an ext4
//!   filesystem, built by mkfs inside the full sandbox;
//! - two concurrent clients get two `tmpdisk@…` instances, running as the
//!   dynamic user, each with its image in its own private /var/tmp, and
//!   independent disks; the instances are gone after the clients leave and
//!   nothing is left in the container's /tmp or /var/tmp;
//! - the journal holds a structured "client served" and "client left"
//!   record for each client;
//! - `systemctl show` reports the limits of the units and of a drop-in
//!   (the kernel does not enforce them in this container: configuration is
//!   what can be checked here);
//! - reinstalling (an upgrade) leaves a connected client alone; removing
//!   the package stops the socket and the connected client's instance,
//!   disables the socket and removes the units.
//!
//! Needs root (mounts, cgroups, nspawn). A missing tool fails the test with
//! the Debian package to install; tests/run installs them all.

use crate::common::{
    Output, PYTHON, free_port, require, require_root, run_within, wait_child, wait_until,
};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::thread;
use std::time::{Duration, Instant};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// Debian's python3, which has the libnbd bindings.
/// The disk size the test puts in /etc/tmpdisk/tmpdisk.conf (the unit's
/// default is 1G: seeing this proves the file was read).
const SIZE: u64 = 320 << 20;
/// MemoryMax= set by the test's drop-in for tmpdisk@.service.
const DROPIN_MEMORY_MAX: u64 = 300 << 20;
/// The Unix socket the test's drop-in adds to tmpdisk.socket.
const UNIX_SOCKET: &str = "/run/tmpdisk/nbd.sock";
/// systemd's range of dynamic users.
const DYNAMIC_UIDS: std::ops::RangeInclusive<u32> = 61184..=65519;
/// Services the host may have enabled that must not run in the container:
/// they bind ports on the shared network or hold the dpkg lock.
const MASKED: &[&str] = &[
    "postgresql.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "man-db.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Format {
    Deb,
    Rpm,
}

#[test]
fn deb_package_in_booted_systemd() {
    end_to_end(Format::Deb);
}

#[test]
fn rpm_package_in_booted_systemd() {
    end_to_end(Format::Rpm);
}

fn end_to_end(format: Format) {
    let started = Instant::now();
    require_root_and_tools(format);
    let packages = packages();
    let package = match format {
        Format::Deb => &packages.deb,
        Format::Rpm => &packages.rpm,
    };
    let port = free_port();
    let ct = Container::boot(format);

    // Before installing: where the test wants the socket, and a per-client
    // limit changed the documented way, with a drop-in.
    ct.write(
        "etc/systemd/system/tmpdisk.socket.d/port.conf",
        &format!(
            "[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n\
             ListenStream={UNIX_SOCKET}\nSocketMode=0660\n"
        ),
    );
    let agent_port = free_port();
    ct.write(
        "etc/systemd/system/tmpdisk-agent.socket.d/port.conf",
        &format!("[Socket]\nListenStream=\nListenStream=127.0.0.1:{agent_port}\n"),
    );
    ct.write(
        "etc/systemd/system/tmpdisk@.service.d/limits.conf",
        &format!("[Service]\nMemoryMax={DROPIN_MEMORY_MAX}\n"),
    );
    let file_name = package.file_name().unwrap().to_str().unwrap();
    fs::create_dir_all(ct.host_path("tdpkg")).unwrap();
    fs::copy(package, ct.host_path(&format!("tdpkg/{file_name}"))).unwrap();
    let in_ct = format!("/tdpkg/{file_name}");

    install(&ct, format, &in_ct);
    check_installed_files(&ct, format);
    assert_eq!(
        ct.out(&["systemctl", "is-enabled", "tmpdisk.socket"]),
        "disabled",
        "installing must not enable the socket"
    );
    assert_eq!(
        ct.out(&["systemctl", "is-active", "tmpdisk.socket"]),
        "inactive",
        "installing must not start the socket"
    );
    check_offline_analysis(&ct);

    // Configure the size in the shipped file; instances read it when they
    // start, so no reload is needed.
    let conf = ct.host_path("etc/tmpdisk/tmpdisk.conf");
    let mut text = fs::read_to_string(&conf).unwrap();
    text.push_str(&format!("TMPDISK_SIZE={}M\n", SIZE >> 20));
    fs::write(&conf, text).unwrap();

    ct.ok(&["systemctl", "enable", "--now", "tmpdisk.socket"]);
    assert_eq!(
        ct.out(&["systemctl", "is-active", "tmpdisk.socket"]),
        "active"
    );
    let tmp_before = ct.tmp_listing();

    // nbdinfo from the host.
    let uri = format!("nbd://127.0.0.1:{port}");
    let info = nbdinfo(&uri);
    assert!(
        info.contains(&format!("export-size: {SIZE} ")),
        "nbdinfo must see the configured size {SIZE}: {info}"
    );
    let content = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("content: "))
        .unwrap_or_else(|| panic!("nbdinfo shows no content line: {info}"));
    assert!(
        content.contains("ext4 filesystem data"),
        "a fresh ext4 expected, nbdinfo says {content:?}"
    );

    // Two concurrent clients.
    let mut a = Client::connect(&uri, "client A");
    let mut b = Client::connect(&uri, "client B");
    for c in [&a, &b] {
        assert_eq!(c.size, SIZE, "{}: size", c.name);
        assert_eq!(c.magic, 0xef53, "{}: ext4 superblock magic", c.name);
    }
    assert_ne!(
        a.uuid, b.uuid,
        "two clients must get two freshly made filesystems"
    );
    let units = wait_until(
        "exactly two running tmpdisk@ instances",
        Duration::from_secs(30),
        || {
            let units = ct.running_instances();
            (units.len() == 2).then_some(units)
        },
    );
    check_instances(&ct, &units);
    check_slice(&ct);
    assert_eq!(a.request("check"), "marker=client A", "client A's disk");
    assert_eq!(b.request("check"), "marker=client B", "client B's disk");
    assert_eq!(a.request("bye"), "bye");
    assert_eq!(b.request("bye"), "bye");
    a.wait_exit();
    b.wait_exit();

    wait_until(
        "the tmpdisk@ instances to disappear",
        Duration::from_secs(30),
        || ct.instances().is_empty().then_some(()),
    );
    // systemd removes an instance's private tmp directories in the
    // background after the instance is gone.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = ct.tmp_listing();
        if now == tmp_before {
            break;
        }
        if Instant::now() > deadline {
            let added: Vec<_> = now.iter().filter(|p| !tmp_before.contains(p)).collect();
            let gone: Vec<_> = tmp_before.iter().filter(|p| !now.contains(p)).collect();
            panic!(
                "nothing may be left in the container's /tmp and /var/tmp: new {added:?}, gone {gone:?}"
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    check_journal(&ct, 3);
    check_cgroup_ends_what_setup_left(&ct, port);
    check_golden_image(&ct, &uri);
    check_named_exports(&ct, &uri);
    check_reconnect(&ct, &uri);
    check_agent(&ct, &uri, agent_port);

    // The Unix socket of the drop-in serves the same way (seen from the
    // host through the container's root).
    let unix_uri = format!("nbd+unix:///?socket=/proc/{}/root{UNIX_SOCKET}", ct.leader);
    let unix_info = nbdinfo(&unix_uri);
    assert!(
        unix_info.contains("ext4 filesystem data"),
        "over the Unix socket: {unix_info}"
    );

    // TLS with the certificates passed as systemd credentials.
    let tls_uri = enable_tls(&ct, port);
    // The agent reads the same tmpdisk.conf, now with TLS on, and the
    // certificates are the disks' credentials only: it answers all the
    // same.
    assert_eq!(
        agent_answer(agent_port),
        "ready 100% maxconn:64\n",
        "the agent with TLS on"
    );

    // An upgrade (here: reinstalling) leaves a connected client alone.
    let mut c = Client::connect(&tls_uri, "client C");
    let unit = wait_until("client C's instance", Duration::from_secs(30), || {
        let units = ct.running_instances();
        (units.len() == 1).then(|| units[0].clone())
    });
    reinstall(&ct, format, &in_ct);
    assert_eq!(c.request("check"), "marker=client C", "after the upgrade");
    assert_eq!(ct.running_instances(), vec![unit.clone()]);
    assert_eq!(
        ct.out(&["systemctl", "is-active", "tmpdisk.socket"]),
        "active"
    );

    // Removing the package ends everything.
    remove(&ct, format);
    let after = c.request("check");
    assert!(
        after.starts_with("error"),
        "removing the package must stop the connected client's instance, the client said {after:?}"
    );
    c.wait_exit();
    check_removed(&ct, format, port);

    eprintln!(
        "systemd_e2e: {format:?} passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

// --- the checks --------------------------------------------------------------

/// nbdinfo's report on `uri`; it must succeed.
fn nbdinfo(uri: &str) -> String {
    let mut c = Command::new("nbdinfo");
    c.arg(uri);
    let info = run_within("nbdinfo", c, Duration::from_secs(60));
    assert!(
        info.status.success(),
        "nbdinfo {uri} failed: {}",
        info.describe()
    );
    info.stdout
}

/// Require TLS, with the server's certificate and key handed to the
/// instances as systemd credentials (LoadCredential=, the README's TLS
/// drop-in); returns the URI a client with the CA certificate uses.
fn enable_tls(ct: &Container, port: u16) -> String {
    let pki = ct.work.join("pki");
    let client = pki.join("client");
    fs::create_dir_all(&client).unwrap();
    let openssl = |args: &[&str]| {
        let mut c = Command::new("openssl");
        c.args(args).current_dir(&pki);
        let out = run_within("openssl", c, Duration::from_secs(60));
        assert!(out.status.success(), "{}", out.describe());
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    openssl(
        &[
            &["req", "-x509", "-nodes", "-days", "2"][..],
            &ec,
            &[
                "-keyout",
                "ca-key.pem",
                "-out",
                "client/ca-cert.pem",
                "-subj",
                "/CN=tmpdisk test CA",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req", "-nodes"][..],
            &ec,
            &[
                "-keyout",
                "server-key.pem",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat(),
    );
    fs::write(
        pki.join("san.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "client/ca-cert.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.cnf",
        "-out",
        "server-cert.pem",
    ]);
    for f in ["server-cert.pem", "server-key.pem"] {
        ct.write(
            &format!("etc/tmpdisk/tls/{f}"),
            &fs::read_to_string(pki.join(f)).unwrap(),
        );
    }
    ct.write(
        "etc/systemd/system/tmpdisk@.service.d/tls.conf",
        "[Service]\n\
         LoadCredential=server-cert.pem:/etc/tmpdisk/tls/server-cert.pem\n\
         LoadCredential=server-key.pem:/etc/tmpdisk/tls/server-key.pem\n",
    );
    ct.ok(&["systemctl", "daemon-reload"]);
    let conf = ct.host_path("etc/tmpdisk/tmpdisk.conf");
    let mut text = fs::read_to_string(&conf).unwrap();
    text.push_str("TMPDISK_TLS=require\n");
    fs::write(&conf, text).unwrap();

    let uri = format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}&tls-hostname=localhost",
        client.display()
    );
    let info = nbdinfo(&uri);
    assert!(
        info.contains("with TLS") && info.contains("ext4 filesystem data"),
        "over TLS: {info}"
    );
    let mut c = Command::new("nbdinfo");
    c.arg(format!("nbd://127.0.0.1:{port}"));
    let plain = run_within("nbdinfo", c, Duration::from_secs(60));
    assert!(
        !plain.status.success(),
        "TMPDISK_TLS=require must refuse a plaintext client: {plain}"
    );
    uri
}

fn install(ct: &Container, format: Format, package: &str) {
    match format {
        Format::Deb => ct.ok(&["dpkg", "-i", package]),
        // The container is Debian: e2fsprogs is there, but not in rpm's
        // database.
        Format::Rpm => ct.ok(&["rpm", "-i", "--nodeps", package]),
    };
}

/// Whether a 64-bit little-endian ELF executable is position-independent
/// and whether it has a program interpreter (a dynamic loader), from its
/// header and program headers.
fn elf_layout(elf: &[u8]) -> Result<(bool, bool), String> {
    let field = |at: usize, len: usize| -> Result<u64, String> {
        let b = elf
            .get(at..at + len)
            .ok_or_else(|| format!("ELF cut short at byte {at}"))?;
        Ok(b.iter().rev().fold(0u64, |v, &x| (v << 8) | u64::from(x)))
    };
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    const ET_DYN: u64 = 3;
    const PT_INTERP: u64 = 3;
    let (phoff, phentsize, phnum) = (field(32, 8)?, field(54, 2)?, field(56, 2)?);
    let mut interp = false;
    for i in 0..phnum {
        let at = usize::try_from(phoff + i * phentsize).map_err(|e| e.to_string())?;
        interp |= field(at, 4)? == PT_INTERP;
    }
    Ok((field(16, 2)? == ET_DYN, interp))
}

fn reinstall(ct: &Container, format: Format, package: &str) {
    match format {
        Format::Deb => ct.ok(&["dpkg", "-i", package]),
        Format::Rpm => ct.ok(&["rpm", "-U", "--replacepkgs", "--nodeps", package]),
    };
}

fn remove(ct: &Container, format: Format) {
    match format {
        Format::Deb => ct.ok(&["dpkg", "-r", "tmpdisk"]),
        Format::Rpm => ct.ok(&["rpm", "-e", "tmpdisk"]),
    };
}

fn check_installed_files(ct: &Container, format: Format) {
    let zsh = match format {
        Format::Deb => "usr/share/zsh/vendor-completions/_tmpdisk",
        Format::Rpm => "usr/share/zsh/site-functions/_tmpdisk",
    };
    let mut expected = vec![
        "usr/bin/tmpdisk",
        "usr/lib/systemd/system/tmpdisk.socket",
        "usr/lib/systemd/system/tmpdisk@.service",
        "usr/lib/systemd/system/tmpdisk.slice",
        "usr/lib/systemd/system/tmpdisk-agent.socket",
        "usr/lib/systemd/system/tmpdisk-agent@.service",
        "etc/tmpdisk/tmpdisk.conf",
        "etc/tmpdisk/exports.toml",
        "usr/lib/tmpfiles.d/tmpdisk.conf",
        "usr/share/man/man8/tmpdisk.8.gz",
        "usr/share/bash-completion/completions/tmpdisk",
        "usr/share/fish/vendor_completions.d/tmpdisk.fish",
        zsh,
    ];
    if format == Format::Rpm {
        expected.push("usr/lib/systemd/system-preset/80-tmpdisk.preset");
    }
    for path in expected {
        assert!(
            ct.host_path(path).is_file(),
            "{format:?} package must install /{path}"
        );
    }
    // The packages ship packaging/build-release's binary: a static-pie,
    // which starts faster (once per client) than a dynamic one, linked
    // against musl where the build had Rust's musl target, else glibc.
    let elf = fs::read(ct.host_path("usr/bin/tmpdisk")).unwrap();
    if cfg!(target_env = "gnu") {
        assert_eq!(
            elf_layout(&elf),
            Ok((true, false)),
            "{format:?} package: /usr/bin/tmpdisk must be a static-pie \
             (position-independent, no program interpreter)"
        );
        let chosen = Command::new(format!("{REPO}/packaging/build-release"))
            .arg("--print-path")
            .output()
            .expect("packaging/build-release --print-path runs");
        assert!(
            chosen.status.success(),
            "packaging/build-release --print-path failed: {}",
            String::from_utf8_lossy(&chosen.stderr)
        );
        let musl = String::from_utf8_lossy(&chosen.stdout).contains("-linux-musl/");
        // glibc's start-up reads this variable; musl has no such name.
        let glibc = elf.windows(14).any(|w| w == b"GLIBC_TUNABLES");
        assert_eq!(
            glibc,
            !musl,
            "{format:?} package: /usr/bin/tmpdisk must be linked against the \
             libc packaging/build-release chose ({})",
            if musl { "musl" } else { "glibc" }
        );
    }
    let docs = match format {
        Format::Deb => ct.out(&["dpkg", "-L", "tmpdisk"]),
        Format::Rpm => ct.out(&["rpm", "-qd", "tmpdisk"]),
    };
    assert!(docs.contains("README.md"), "the README is packaged: {docs}");
    let man = ct.out(&["man", "-w", "8", "tmpdisk"]);
    assert!(man.contains("tmpdisk.8"), "man tmpdisk(8) is found: {man}");
    let conffiles = match format {
        Format::Deb => ct.out(&["dpkg-query", "-W", "-f=${Conffiles}", "tmpdisk"]),
        Format::Rpm => ct.out(&["rpm", "-qc", "tmpdisk"]),
    };
    for file in ["/etc/tmpdisk/tmpdisk.conf", "/etc/tmpdisk/exports.toml"] {
        assert!(
            conffiles.contains(file),
            "{file} must be a config file of the package: {conffiles:?}"
        );
    }
}

/// `systemd-analyze verify` prints nothing (warnings count) and the
/// template's exposure is at most 0.5.
fn check_offline_analysis(ct: &Container) {
    let verify = ct.run(&[
        "systemd-analyze",
        "verify",
        "tmpdisk.socket",
        "tmpdisk@0.service",
        "tmpdisk.slice",
        "tmpdisk-agent.socket",
        "tmpdisk-agent@0.service",
    ]);
    assert!(
        verify.status.success() && verify.stdout.is_empty() && verify.stderr.is_empty(),
        "systemd-analyze verify must print nothing: {verify}"
    );
    for (unit, most) in [("tmpdisk@.service", 0.5), ("tmpdisk-agent@.service", 0.5)] {
        let security = ct.run(&[
            "systemd-analyze",
            "security",
            "--offline=yes",
            "--no-pager",
            unit,
        ]);
        let score: f64 = security
            .stdout
            .lines()
            .find_map(|l| l.split_once("Overall exposure level for "))
            .and_then(|(_, rest)| rest.split_once(": "))
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in: {security}"));
        eprintln!("systemd_e2e: systemd-analyze security exposure of {unit}: {score}");
        assert!(
            score <= most,
            "{unit}: exposure {score} is above {most}: {}",
            security.stdout
        );
    }
}

/// Each running instance: the sandbox and limits as configured, a dynamic
/// user, its image an unlinked file in its own private /var/tmp.
fn check_instances(ct: &Container, units: &[String]) {
    let mut pids = BTreeSet::new();
    for unit in units {
        let p = ct.show(
            unit,
            &[
                "MainPID",
                "User",
                "DynamicUser",
                "Type",
                "Slice",
                "StatusText",
                "MemoryMax",
                "TasksMax",
                "CPUQuotaPerSecUSec",
                "IOWeight",
                "LimitFSIZE",
                "RuntimeMaxUSec",
                "PrivateTmp",
                "PrivateNetwork",
                "ProtectSystem",
                "NoNewPrivileges",
                "CapabilityBoundingSet",
            ],
        );
        let expect = |key: &str, want: &str| {
            assert_eq!(p[key], want, "{unit}: {key} (all: {p:?})");
        };
        expect("DynamicUser", "yes");
        expect("User", "tmpdisk");
        expect("Type", "notify");
        expect("Slice", "tmpdisk.slice");
        expect("MemoryMax", &DROPIN_MEMORY_MAX.to_string());
        expect("TasksMax", "32");
        expect("CPUQuotaPerSecUSec", "1s");
        expect("IOWeight", "100");
        expect("LimitFSIZE", &(64u64 << 30).to_string());
        expect("RuntimeMaxUSec", "infinity");
        expect("PrivateTmp", "yes");
        expect("PrivateNetwork", "yes");
        expect("ProtectSystem", "strict");
        expect("NoNewPrivileges", "yes");
        expect("CapabilityBoundingSet", "");
        assert!(
            p["StatusText"].starts_with("serving 127.0.0.1:"),
            "{unit}: the STATUS= line says whom it serves: {:?}",
            p["StatusText"]
        );
        let pid = &p["MainPID"];
        assert!(pids.insert(pid.clone()), "two instances share a process");
        let status = ct.out(&["cat", &format!("/proc/{pid}/status")]);
        let uid: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse().ok())
            .unwrap_or_else(|| panic!("{unit}: no Uid in {status}"));
        assert!(
            DYNAMIC_UIDS.contains(&uid),
            "{unit} runs as uid {uid}, not a dynamic user"
        );
        // The image: an unlinked file in the instance's private /var/tmp,
        // which is a directory of its own on the host side.
        let fds = ct.out(&[
            "sh",
            "-c",
            &format!("for f in /proc/{pid}/fd/*; do readlink $f; done"),
        ]);
        assert!(
            fds.lines()
                .any(|l| l.starts_with("/var/tmp/#") && l.ends_with("(deleted)")),
            "{unit}: the image must be an unlinked file in /var/tmp: {fds}"
        );
        let private = ct.out(&[
            "sh",
            "-c",
            &format!("ls -d /var/tmp/systemd-private-*-{unit}-*"),
        ]);
        assert_eq!(
            private.lines().count(),
            1,
            "{unit}: its own private /var/tmp"
        );
    }
}

fn check_slice(ct: &Container) {
    let p = ct.show(
        "tmpdisk.slice",
        &[
            "MemoryMax",
            "MemoryHigh",
            "TasksMax",
            "CPUWeight",
            "IOWeight",
        ],
    );
    assert_eq!(p["TasksMax"], "1024", "tmpdisk.slice: {p:?}");
    assert_eq!(p["CPUWeight"], "50", "tmpdisk.slice: {p:?}");
    assert_eq!(p["IOWeight"], "50", "tmpdisk.slice: {p:?}");
    for key in ["MemoryMax", "MemoryHigh"] {
        assert!(
            p[key].parse::<u64>().is_ok(),
            "tmpdisk.slice: {key} must be a limit (a share of RAM): {p:?}"
        );
    }
}

/// A "client served" and a "client left" record per client, with the
/// structured fields, from the instances.
fn check_journal(ct: &Container, clients: usize) {
    let (served, left) = wait_until(
        "the journal records of every client",
        Duration::from_secs(30),
        || {
            let entries = ct.journal();
            let of = |message: &str| -> Vec<BTreeMap<String, String>> {
                entries
                    .iter()
                    .filter(|e| e.get("MESSAGE").map(String::as_str) == Some(message))
                    .cloned()
                    .collect()
            };
            let (served, left) = (of("client served"), of("client left"));
            (served.len() >= clients && left.len() >= clients).then_some((served, left))
        },
    );
    let field = |e: &BTreeMap<String, String>, name: &str| -> String {
        // tracing-journald prefixes the fields of an event with "F_" unless
        // told otherwise; accept both spellings.
        e.get(name)
            .or_else(|| e.get(&format!("F_{name}")))
            .cloned()
            .unwrap_or_else(|| panic!("journal record lacks {name}: {e:?}"))
    };
    let number = |e: &BTreeMap<String, String>, name: &str| -> u64 {
        field(e, name)
            .parse()
            .unwrap_or_else(|_| panic!("{name} is not a number: {e:?}"))
    };
    let mut served_peers = BTreeSet::new();
    for e in &served {
        assert_eq!(field(e, "SYSLOG_IDENTIFIER"), "tmpdisk");
        assert!(field(e, "_SYSTEMD_UNIT").starts_with("tmpdisk@"), "{e:?}");
        let uid: u32 = field(e, "_UID").parse().unwrap();
        assert!(DYNAMIC_UIDS.contains(&uid), "logged by uid {uid}: {e:?}");
        let peer = field(e, "PEER");
        assert!(peer.starts_with("127.0.0.1:"), "PEER: {e:?}");
        served_peers.insert(peer);
        assert_eq!(number(e, "SIZE"), SIZE, "{e:?}");
        assert_eq!(field(e, "FS_TYPE"), "ext4", "{e:?}");
        assert_eq!(field(e, "EXPORT"), "", "{e:?}");
        number(e, "MKFS_MS");
        assert!(number(e, "ALLOCATED") > 0, "{e:?}");
    }
    let mut left_peers = BTreeSet::new();
    let mut writers = 0;
    for e in &left {
        left_peers.insert(field(e, "PEER"));
        assert_eq!(field(e, "END"), "disconnect", "{e:?}");
        assert!(number(e, "REQUESTS") > 0, "{e:?}");
        assert!(number(e, "BYTES_READ") > 0, "{e:?}");
        if number(e, "BYTES_WRITTEN") >= 4096 {
            writers += 1;
        }
        let seconds: f64 = field(e, "SECONDS").parse().expect("SECONDS");
        assert!((0.0..600.0).contains(&seconds), "{e:?}");
    }
    assert_eq!(served_peers.len(), clients, "one record per client");
    assert_eq!(served_peers, left_peers, "every client served also left");
    assert_eq!(writers, 2, "the two clients that wrote: {left:?}");
}

/// The last net under systemd is the unit's cgroup. A setup whose command
/// starts a `setsid` job is in progress; the serving process and the
/// stand-in it left for the command are killed together (so neither can
/// clean up, and the unit's RestrictNamespaces= gave the command no PID
/// namespace): systemd must kill the `setsid` job with the unit.
fn check_cgroup_ends_what_setup_left(ct: &Container, port: u16) {
    let conf = ct.host_path("etc/tmpdisk/tmpdisk.conf");
    let saved = fs::read_to_string(&conf).unwrap();
    fs::write(
        &conf,
        format!("{saved}TMPDISK_COMMAND=setsid sleep 1001 & exec sleep 1002\n"),
    )
    .unwrap();
    // A client that asks for its disk and waits.
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connecting");
    let mut greeting = [0u8; 18];
    client.read_exact(&mut greeting).expect("the greeting");
    let mut hello = 3u32.to_be_bytes().to_vec();
    hello.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    hello.extend_from_slice(&7u32.to_be_bytes());
    hello.extend_from_slice(&6u32.to_be_bytes());
    hello.extend_from_slice(&[0; 6]);
    client.write_all(&hello).unwrap();
    let job = wait_until("the setup's setsid job", Duration::from_secs(30), || {
        let pid = ct.out(&["pgrep", "-f", "^sleep 1001$"]);
        (!pid.is_empty() && !ct.out(&["pgrep", "-f", "^sleep 1002$"]).is_empty()).then_some(pid)
    });
    let unit = wait_until("the setting-up instance", Duration::from_secs(30), || {
        let units = ct.instances();
        (units.len() == 1).then(|| units[0].clone())
    });
    let p = ct.show(&unit, &["MainPID", "KillMode"]);
    assert_eq!(p["KillMode"], "control-group", "{unit}: {p:?}");
    let cgroup = ct.out(&["cat", &format!("/proc/{job}/cgroup")]);
    assert!(
        cgroup.contains(&unit),
        "the setsid job runs in {unit}'s cgroup: {cgroup}"
    );
    let main = &p["MainPID"];
    let stand_in = ct.out(&["cat", &format!("/proc/{main}/task/{main}/children")]);
    assert_eq!(
        stand_in.split_whitespace().count(),
        1,
        "the serving process has one child, the setup's stand-in: {stand_in:?}"
    );
    ct.ok(&["kill", "-9", main, stand_in.trim()]);
    wait_until(
        "systemd to kill the setsid job with the unit",
        Duration::from_secs(30),
        || {
            ct.out(&["pgrep", "-f", "^sleep 100[12]$"])
                .is_empty()
                .then_some(())
        },
    );
    wait_until(
        "the killed instance to be gone",
        Duration::from_secs(30),
        || ct.instances().is_empty().then_some(()),
    );
    drop(client);
    fs::write(&conf, saved).unwrap();
}

/// A golden image where the README says to put one: two clients at once
/// each get their own copy of it, and it never changes.
fn check_golden_image(ct: &Container, uri: &str) {
    const UUID: &str = "2f1d0e4c-9a7b-4c3d-8e5f-60718293a4b5";
    let dir = ct.host_path("var/lib/tmpdisk");
    fs::create_dir_all(&dir).unwrap();
    let base = dir.join("base.img");
    fs::File::create(&base).unwrap().set_len(128 << 20).unwrap();
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-U", UUID]).arg(&base);
    let made = run_within("mkfs.ext4", mkfs, Duration::from_secs(60));
    assert!(made.status.success(), "{made}");
    let sha = |p: &Path| {
        let mut c = Command::new("sha256sum");
        c.arg(p);
        run_within("sha256sum", c, Duration::from_secs(60)).stdout
    };
    let before = sha(&base);
    let conf = ct.host_path("etc/tmpdisk/tmpdisk.conf");
    let saved = fs::read_to_string(&conf).unwrap();
    fs::write(
        &conf,
        format!("{saved}TMPDISK_BASE=/var/lib/tmpdisk/base.img\n"),
    )
    .unwrap();
    let mut a = Client::connect(uri, "copy A");
    let mut b = Client::connect(uri, "copy B");
    for c in [&a, &b] {
        assert_eq!(c.magic, 0xef53, "{}: the image's ext4", c.name);
        assert_eq!(
            c.uuid,
            UUID.replace('-', ""),
            "{}: the image's UUID",
            c.name
        );
    }
    assert_eq!(a.request("check"), "marker=copy A");
    assert_eq!(b.request("check"), "marker=copy B");
    assert_eq!(a.request("bye"), "bye");
    assert_eq!(b.request("bye"), "bye");
    a.wait_exit();
    b.wait_exit();
    assert_eq!(sha(&base), before, "the golden image changed");
    wait_until(
        "the copies' instances to be gone",
        Duration::from_secs(30),
        || ct.instances().is_empty().then_some(()),
    );
    fs::write(&conf, saved).unwrap();
}

/// Named exports from the packaged exports file, turned on the way
/// tmpdisk.conf says: `--check-config` in the container prints them, and
/// two clients at once get two different kinds of disk, one of them with
/// the size and label it chose; `systemctl status` and the journal name
/// the export and the shape.
fn check_named_exports(ct: &Container, uri: &str) {
    let exports = ct.host_path("etc/tmpdisk/exports.toml");
    let shipped = fs::read_to_string(&exports).unwrap();
    assert!(
        shipped.contains("# [export.scratch]") && shipped.contains("# [export.swap]"),
        "the packaged exports.toml has commented examples"
    );
    fs::write(
        &exports,
        format!(
            "{shipped}\n[export.scratch]\nsize = \"96M\"\nmax-size = \"256M\"\nlabels = true\n\n\
             [export.swap]\nsize = \"100M\"\ntype = \"swap\"\n"
        ),
    )
    .unwrap();
    let conf = ct.host_path("etc/tmpdisk/tmpdisk.conf");
    let saved = fs::read_to_string(&conf).unwrap();
    assert!(saved.contains("#TMPDISK_EXPORTS=/etc/tmpdisk/exports.toml"));
    fs::write(
        &conf,
        format!("{saved}TMPDISK_EXPORTS=/etc/tmpdisk/exports.toml\n"),
    )
    .unwrap();
    let table = ct.ok(&[
        "tmpdisk",
        "--check-config",
        "--tmpdir",
        "/var/tmp",
        "--exports",
        "/etc/tmpdisk/exports.toml",
        "1G",
    ]);
    let rows: Vec<String> = table
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert!(
        rows.iter()
            .any(|r| r == "scratch 96 MiB ext4 size<=256 MiB label")
            && rows.iter().any(|r| r == "swap 100 MiB swap -"),
        "{}",
        table.describe()
    );

    let mut a = Client::connect(&format!("{uri}/scratch:size=200M:label=named-a"), "named A");
    let mut b = Client::connect(&format!("{uri}/swap"), "named B");
    assert_eq!((a.size, a.magic), (200 << 20, 0xef53), "the chosen ext4");
    assert_eq!(b.size, 100 << 20, "the swap disk");
    let units = wait_until("two named instances", Duration::from_secs(30), || {
        let units = ct.running_instances();
        (units.len() == 2).then_some(units)
    });
    let mut statuses: Vec<String> = units
        .iter()
        .map(|u| ct.show(u, &["StatusText"])["StatusText"].clone())
        .collect();
    statuses.sort();
    assert!(
        statuses[0].contains(", export scratch: 200 MiB ext4 disk labelled \"named-a\"")
            && statuses[1].contains(", export swap: 100 MiB swap disk"),
        "systemctl status names the export and the disk: {statuses:?}"
    );
    assert_eq!(a.request("check"), "marker=named A");
    assert_eq!(b.request("check"), "marker=named B");
    assert_eq!(a.request("bye"), "bye");
    assert_eq!(b.request("bye"), "bye");
    a.wait_exit();
    b.wait_exit();
    let served = wait_until(
        "the named clients' records",
        Duration::from_secs(30),
        || {
            let named: Vec<BTreeMap<String, String>> = ct
                .journal()
                .into_iter()
                .filter(|e| {
                    // The default export's records have an empty SERVES.
                    e.get("MESSAGE").map(String::as_str) == Some("client served")
                        && e.iter()
                            .any(|(k, v)| k.ends_with("SERVES") && !v.is_empty())
                })
                .collect();
            (named.len() >= 2).then_some(named)
        },
    );
    let field = |e: &BTreeMap<String, String>, name: &str| {
        e.get(name)
            .or_else(|| e.get(&format!("F_{name}")))
            .cloned()
            .unwrap_or_default()
    };
    let mut seen: Vec<(String, String, String, String)> = served
        .iter()
        .map(|e| {
            (
                field(e, "SERVES"),
                field(e, "EXPORT"),
                field(e, "FS_TYPE"),
                field(e, "LABEL"),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            (
                "scratch".to_string(),
                "scratch:size=200M:label=named-a".to_string(),
                "ext4".to_string(),
                "named-a".to_string()
            ),
            (
                "swap".to_string(),
                "swap".to_string(),
                "swap".to_string(),
                String::new()
            ),
        ],
        "the journal names the export and the shape"
    );
    wait_until(
        "the named instances to be gone",
        Duration::from_secs(30),
        || ct.instances().is_empty().then_some(()),
    );
    fs::write(&conf, saved).unwrap();
    fs::write(&exports, shipped).unwrap();
}

/// Reconnect under the hardened unit: a client whose connection ends
/// without NBD_CMD_DISC gets its disk back from the waiting instance (a
/// different dynamic user) through the packaged reconnect directory;
/// `systemctl status` shows the wait and the journal the reconnect.
fn check_reconnect(ct: &Container, uri: &str) {
    const TOKEN: &str = "5e1d2c3b4a5968778695a4b3c2d1e0f1";
    let dir = ct.out(&["stat", "-c", "%a %U", "/run/tmpdisk-reconnect"]);
    assert_eq!(dir, "1733 root", "the packaged reconnect directory");
    let name = format!("{uri}/:id={TOKEN}");
    let mut a = Client::connect(&name, "reconnect A");
    let first = wait_until("A's instance", Duration::from_secs(30), || {
        let units = ct.running_instances();
        (units.len() == 1).then(|| units[0].clone())
    });
    a.kill();
    wait_until(
        "the instance to wait for its client",
        Duration::from_secs(30),
        || {
            ct.show(&first, &["StatusText"])["StatusText"]
                .starts_with("waiting for reconnect (")
                .then_some(())
        },
    );
    let mut b = Client::connect(&name, "reconnect B");
    assert_eq!(b.request("check"), "marker=reconnect B");
    // B's client wrote its own marker over A's on connecting; A's data is
    // checked by the size and the filesystem being the same disk's.
    assert_eq!(b.uuid, a.uuid, "the same filesystem, not a fresh one");
    // B's instance took the disk over and says it is ready, as one that
    // built its disk does: a Type=notify instance that never sends READY=1
    // stays "activating" and is stopped at TimeoutStartSec (15 min), disk
    // and all. (Before, it stayed activating.)
    let second = wait_until("B's instance running", Duration::from_secs(30), || {
        ct.running_instances().into_iter().find(|u| *u != first)
    });
    let state = ct.show(&second, &["ActiveState", "StatusText"]);
    assert_eq!(state["ActiveState"], "active", "{second}: {state:?}");
    assert!(
        state["StatusText"].starts_with("serving "),
        "{second}: {state:?}"
    );
    assert_eq!(b.request("bye"), "bye");
    b.wait_exit();
    wait_until("the reconnect record", Duration::from_secs(30), || {
        ct.journal()
            .iter()
            .find(|e| {
                e.get("MESSAGE").map(String::as_str) == Some("client reconnected to its disk")
            })
            .cloned()
    });
    wait_until("the instances to be gone", Duration::from_secs(30), || {
        ct.instances().is_empty().then_some(())
    });
    // The ended disk's name stays, unanswered: the token is spent.
    assert_eq!(
        ct.out(&["ls", "-A", "/run/tmpdisk-reconnect"])
            .lines()
            .count(),
        1,
        "one name for the one tokened disk"
    );
}

/// The capacity agent under its hardened unit: it sees the disks the
/// instances (other dynamic users) register, and answers HAProxy's
/// agent-check with the host's room: 64 slots (TMPDISK_MAX_CONNECTIONS's
/// default, as tmpdisk.socket's MaxConnections), of which a connected
/// client takes one.
fn check_agent(ct: &Container, uri: &str, port: u16) {
    let dir = ct.out(&["stat", "-c", "%a %U", "/run/tmpdisk-clients"]);
    assert_eq!(dir, "1777 root", "the packaged registry directory");
    ct.ok(&["systemctl", "enable", "--now", "tmpdisk-agent.socket"]);
    let ask = || agent_answer(port);
    assert_eq!(ask(), "ready 100% maxconn:64\n", "no client connected");
    let mut a = Client::connect(uri, "agent A");
    wait_until("A's instance", Duration::from_secs(30), || {
        (ct.running_instances().len() == 1).then_some(())
    });
    assert_eq!(
        ct.out(&["ls", "-A", "/run/tmpdisk-clients"])
            .lines()
            .count(),
        1,
        "one registry entry for the one disk"
    );
    assert_eq!(ask(), "ready 99% maxconn:64\n", "one client connected");
    assert_eq!(a.request("bye"), "bye");
    a.wait_exit();
    wait_until("the entry to go", Duration::from_secs(30), || {
        ct.out(&["ls", "-A", "/run/tmpdisk-clients"])
            .is_empty()
            .then_some(())
    });
    assert_eq!(ask(), "ready 100% maxconn:64\n", "the client gone");
    let failed = ct.out(&[
        "systemctl",
        "list-units",
        "--failed",
        "--plain",
        "--no-legend",
    ]);
    assert!(
        !failed.contains("tmpdisk-agent"),
        "no agent instance may fail: {failed}"
    );
}

/// One answer of the capacity agent on `port`.
fn agent_answer(port: u16) -> String {
    let mut line = String::new();
    TcpStream::connect(("127.0.0.1", port))
        .and_then(|mut s| s.read_to_string(&mut line))
        .unwrap_or_else(|e| panic!("the agent on port {port}: {e}"));
    line
}

fn check_removed(ct: &Container, format: Format, port: u16) {
    wait_until(
        "no tmpdisk@ instance after removal",
        Duration::from_secs(30),
        || ct.instances().is_empty().then_some(()),
    );
    for socket in ["tmpdisk.socket", "tmpdisk-agent.socket"] {
        let active = ct.out(&["systemctl", "is-active", socket]);
        assert_eq!(active, "inactive", "{socket} must be stopped");
    }
    let files = ct.out(&["systemctl", "list-unit-files", "--no-legend", "tmpdisk*"]);
    assert_eq!(files, "", "the unit files must be gone");
    for path in [
        "usr/lib/systemd/system/tmpdisk.socket",
        "usr/lib/systemd/system/tmpdisk@.service",
        "usr/lib/systemd/system/tmpdisk.slice",
        "usr/bin/tmpdisk",
        "etc/systemd/system/sockets.target.wants/tmpdisk.socket",
        "etc/systemd/system/sockets.target.wants/tmpdisk-agent.socket",
        "usr/lib/systemd/system/tmpdisk-agent@.service",
    ] {
        assert!(
            !ct.host_path(path).exists(),
            "/{path} must be gone after removal"
        );
    }
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing may listen on port {port} after removal"
    );
    match format {
        Format::Deb => {
            // Removal keeps the configuration; purge deletes it, but not
            // what the admin added (the TLS certificates).
            assert!(ct.host_path("etc/tmpdisk/tmpdisk.conf").exists());
            ct.ok(&["dpkg", "--purge", "tmpdisk"]);
            assert!(
                !ct.host_path("etc/tmpdisk/tmpdisk.conf").exists(),
                "purge must remove /etc/tmpdisk/tmpdisk.conf"
            );
            assert!(ct.host_path("etc/tmpdisk/tls/server-key.pem").exists());
        }
        Format::Rpm => {
            // rpm keeps a changed config file as .rpmsave.
            assert!(!ct.host_path("etc/tmpdisk/tmpdisk.conf").exists());
            assert!(ct.host_path("etc/tmpdisk/tmpdisk.conf.rpmsave").exists());
        }
    }
}

// --- tools -------------------------------------------------------------------

fn require_root_and_tools(format: Format) {
    require_root("systemd-nspawn, overlay mounts and cgroups need it");
    // systemd-analyze verify checks Documentation=man:tmpdisk(8) with man.
    let mut tools = vec![
        "systemd-nspawn",
        "systemd-analyze",
        "nsenter",
        "nbdinfo",
        "mkfs.ext4",
        "openssl",
        "python3",
        "python3-nbd",
        "man",
    ];
    match format {
        Format::Deb => tools.push("dpkg"),
        Format::Rpm => tools.extend(["rpm", "rpmbuild"]),
    }
    require(&tools);
}

// --- the packages, built once per test run -------------------------------------

struct Packages {
    deb: PathBuf,
    rpm: PathBuf,
}

fn packages() -> &'static Packages {
    static PACKAGES: OnceLock<Result<Packages, String>> = OnceLock::new();
    PACKAGES
        .get_or_init(build_packages)
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn build_packages() -> Result<Packages, String> {
    // A directory of this process's own under target/tmp; ones left by
    // earlier runs go (their process is gone).
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    if let Ok(entries) = fs::read_dir(base) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("systemd-e2e-packages-")
                && !Path::new("/proc").join(pid).exists()
            {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    let out = base.join(format!("systemd-e2e-packages-{}", std::process::id()));
    let _ = fs::remove_dir_all(&out);
    let started = Instant::now();
    // Without --no-build: cargo finds the binary and the gen-assets example
    // up to date (cargo test built them) or builds what is missing.
    let mut cmd = Command::new(format!("{REPO}/packaging/build-packages"));
    cmd.arg("--out").arg(&out);
    // Not the variables cargo set for this test: build scripts that watch
    // them (ring's watches CARGO_MANIFEST_DIR) would make the nested cargo
    // rebuild, and the next plain cargo build rebuild again.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_")
            || key.starts_with("CARGO_MANIFEST_")
            || [
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "OUT_DIR",
            ]
            .contains(&key.as_ref())
        {
            cmd.env_remove(key.as_ref());
        }
    }
    let built = run_within("packaging/build-packages", cmd, Duration::from_secs(600));
    if !built.status.success() {
        return Err(format!(
            "packaging/build-packages failed: {}",
            built.describe()
        ));
    }
    eprintln!(
        "systemd_e2e: packages built in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let lines: Vec<&str> = built.stdout.lines().collect();
    let find = |suffix: &str| {
        lines
            .iter()
            .find(|l| l.ends_with(suffix))
            .map(PathBuf::from)
            .filter(|p| p.is_file())
            .ok_or_else(|| format!("build-packages printed no {suffix} file: {built}"))
    };
    Ok(Packages {
        deb: find(".deb")?,
        rpm: find(".rpm")?,
    })
}

// --- systemd as PID 1 in systemd-nspawn -------------------------------------

/// A booted container on an overlay of `/`, torn down on drop however the
/// test ends: poweroff (then SIGKILL), unmount, cgroups and files removed.
struct Container {
    name: String,
    work: PathBuf,
    root: PathBuf,
    mounted: bool,
    cgroups: Vec<PathBuf>,
    nspawn: Option<Child>,
    /// The container's PID 1, as the host sees it.
    leader: u32,
}

impl Container {
    fn boot(format: Format) -> Container {
        let tag = format!("{format:?}").to_lowercase();
        let unique = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        let name = format!("tde2e-{tag}-{unique}");
        let work = std::env::temp_dir().join(&name);
        let mut ct = Container {
            name: name.clone(),
            root: work.join("root"),
            work,
            mounted: false,
            cgroups: Vec::new(),
            nspawn: None,
            leader: 0,
        };
        for d in ["upper", "work", "root"] {
            fs::create_dir_all(ct.work.join(d)).unwrap();
        }
        let options = format!(
            "lowerdir=/,upperdir={},workdir={}",
            ct.work.join("upper").display(),
            ct.work.join("work").display()
        );
        let mut c = Command::new("mount");
        c.args(["-t", "overlay", "overlay", "-o", &options])
            .arg(&ct.root);
        let mount = run_within("mount", c, Duration::from_secs(30));
        assert!(
            mount.status.success(),
            "overlay mount failed: {}",
            mount.describe()
        );
        ct.mounted = true;

        // nspawn runs in a cgroup of its own (in both hierarchies of this
        // host), so whatever it leaves behind is easy to find and kill.
        for hierarchy in ["systemd", "unified"] {
            let cg = Path::new("/sys/fs/cgroup").join(hierarchy).join(&name);
            if cg.parent().is_some_and(Path::is_dir) {
                fs::create_dir_all(&cg).unwrap();
                ct.cgroups.push(cg);
            }
        }
        let mut script = String::new();
        for cg in &ct.cgroups {
            script.push_str(&format!("echo $$ > {}/cgroup.procs && ", cg.display()));
        }
        script.push_str("exec systemd-nspawn \"$@\"");
        let masks: Vec<String> = MASKED.iter().map(|u| format!("systemd.mask={u}")).collect();
        let console = fs::File::create(ct.work.join("console.log")).unwrap();
        let child = Command::new("/bin/sh")
            .args(["-c", &script, "sh"])
            .args(["--quiet", "-D"])
            .arg(&ct.root)
            .args(["-M", &name, "--register=no", "--keep-unit"])
            .args(["--console=passive", "--boot", "--"])
            .arg("systemd.firstboot=off")
            .args(&masks)
            .stdin(Stdio::null())
            .stdout(console.try_clone().unwrap())
            .stderr(console)
            .spawn()
            .expect("cannot run systemd-nspawn");
        let nspawn_pid = child.id();
        ct.nspawn = Some(child);

        ct.leader = wait_until(
            "the container's systemd to start",
            Duration::from_secs(30),
            || {
                if let Some(Ok(Some(st))) = ct.nspawn.as_mut().map(Child::try_wait) {
                    panic!("systemd-nspawn exited ({st}) during boot: {}", ct.console());
                }
                let children =
                    fs::read_to_string(format!("/proc/{nspawn_pid}/task/{nspawn_pid}/children"))
                        .unwrap_or_default();
                children.split_whitespace().find_map(|c| {
                    let comm = fs::read_to_string(format!("/proc/{c}/comm")).unwrap_or_default();
                    (comm.trim() == "systemd").then(|| c.parse().unwrap())
                })
            },
        );
        let state = wait_until(
            "the container to finish booting",
            Duration::from_secs(60),
            || {
                let out = ct.run_for(
                    &["systemctl", "is-system-running", "--wait"],
                    Duration::from_secs(30),
                );
                let state = out.stdout.trim().to_string();
                matches!(state.as_str(), "running" | "degraded").then_some(state)
            },
        );
        if state == "degraded" {
            let failed = ct.out(&["systemctl", "--failed", "--no-legend", "--plain"]);
            eprintln!("systemd_e2e: container degraded (not our units): {failed}");
        }
        ct
    }

    /// A path of the container's filesystem, seen from the host.
    fn host_path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    fn write(&self, path: &str, text: &str) {
        let p = self.host_path(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    fn console(&self) -> String {
        fs::read_to_string(self.work.join("console.log")).unwrap_or_default()
    }

    fn run_for(&self, args: &[&str], timeout: Duration) -> Output {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.leader.to_string(), "-a", "--"])
            .args(args)
            .env("SYSTEMD_PAGER", "")
            .env("SYSTEMD_COLORS", "0")
            .env("LC_ALL", "C.UTF-8");
        run_within(&args.join(" "), cmd, timeout)
    }

    /// Run a command in the container (60 s at most).
    fn run(&self, args: &[&str]) -> Output {
        self.run_for(args, Duration::from_secs(60))
    }

    /// Run a command in the container; it must succeed.
    fn ok(&self, args: &[&str]) -> Output {
        let out = self.run(args);
        assert!(out.status.success(), "in the container: {}", out.describe());
        out
    }

    /// A command's trimmed stdout, whatever its exit status.
    fn out(&self, args: &[&str]) -> String {
        self.run(args).stdout.trim().to_string()
    }

    fn show(&self, unit: &str, props: &[&str]) -> BTreeMap<String, String> {
        let out = self.ok(&["systemctl", "show", unit, "-p", &props.join(",")]);
        let map: BTreeMap<String, String> = out
            .stdout
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for p in props {
            assert!(
                map.contains_key(*p),
                "systemctl show {unit}: no {p}: {map:?}"
            );
        }
        map
    }

    /// Loaded tmpdisk@ instances, whatever their state.
    fn instances(&self) -> Vec<String> {
        self.units(&["--all"])
    }

    fn running_instances(&self) -> Vec<String> {
        self.units(&["--state=running"])
    }

    fn units(&self, filter: &[&str]) -> Vec<String> {
        let mut args = vec![
            "systemctl",
            "list-units",
            "--type=service",
            "--no-legend",
            "--plain",
        ];
        args.extend_from_slice(filter);
        args.push("tmpdisk@*");
        self.ok(&args)
            .stdout
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }

    /// Everything in the container's /tmp (a tmpfs of its own) and what the
    /// container has put in /var/tmp (the overlay's upper layer: the host's
    /// own /var/tmp, which other processes use, is not ours to judge).
    fn tmp_listing(&self) -> Vec<String> {
        let mut all: BTreeSet<String> = self
            .ok(&["find", "/tmp", "-xdev"])
            .stdout
            .lines()
            .map(str::to_string)
            .collect();
        fn walk(dir: &Path, shown: &Path, all: &mut BTreeSet<String>) {
            all.insert(shown.display().to_string());
            if let Ok(entries) = fs::read_dir(dir) {
                for e in entries.flatten() {
                    let shown = shown.join(e.file_name());
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        walk(&e.path(), &shown, all);
                    } else {
                        all.insert(shown.display().to_string());
                    }
                }
            }
        }
        walk(
            &self.work.join("upper/var/tmp"),
            Path::new("/var/tmp"),
            &mut all,
        );
        all.into_iter().collect()
    }

    /// The journal records tmpdisk wrote, as field maps.
    fn journal(&self) -> Vec<BTreeMap<String, String>> {
        let out = self.ok(&["journalctl", "-t", "tmpdisk", "-o", "export", "--no-pager"]);
        out.stdout
            .split("\n\n")
            .map(|entry| {
                entry
                    .lines()
                    .filter_map(|l| l.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>()
            })
            .filter(|e| !e.is_empty())
            .collect()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if thread::panicking() && self.leader != 0 {
            // What the instances said, for the failure report.
            let journal = self.run_for(
                &["journalctl", "--no-pager", "-n", "60", "-u", "tmpdisk*"],
                Duration::from_secs(10),
            );
            eprintln!(
                "systemd_e2e: container {}: journalctl -u 'tmpdisk*':\n{}",
                self.name, journal.stdout
            );
        }
        if let Some(mut nspawn) = self.nspawn.take() {
            // SIGTERM: nspawn powers the container off.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(nspawn.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            if !wait_child(&mut nspawn, Duration::from_secs(20)) {
                let _ = nspawn.kill();
                let _ = nspawn.wait();
            }
        }
        // Whatever is still in the cgroups (nothing, after a clean
        // poweroff) is killed.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = cgroup_pids(&self.cgroups);
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        for cg in &self.cgroups {
            remove_cgroup(cg);
        }
        if self.mounted {
            let umount = Command::new("umount").arg(&self.root).status();
            if !umount.is_ok_and(|s| s.success()) {
                let _ = Command::new("umount").arg("-l").arg(&self.root).status();
            }
        }
        if thread::panicking() {
            let console = self.console();
            let tail: Vec<&str> = console.lines().rev().take(15).collect();
            eprintln!(
                "systemd_e2e: container {}: end of the console:\n{}",
                self.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        let _ = fs::remove_dir_all(&self.work);
    }
}

fn cgroup_pids(cgroups: &[PathBuf]) -> Vec<i32> {
    fn walk(dir: &Path, pids: &mut Vec<i32>) {
        if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), pids);
                }
            }
        }
    }
    let mut pids = Vec::new();
    for cg in cgroups {
        walk(cg, &mut pids);
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Remove a cgroup directory and its children, deepest first.
fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

// --- a libnbd client on the host, held open ------------------------------------

/// Connects, checks the superblock, writes its name at 64 MiB, says
/// "ready ...", then answers commands on stdin: "check" reads the marker
/// back, "bye" disconnects.
const CLIENT: &str = r#"
import nbd, sys
h = nbd.NBD()
h.set_uri_allow_local_file(True)  # tls-certificates=DIR
h.connect_uri(sys.argv[1])
sb = h.pread(1024, 1024)
marker = sys.argv[2].encode()
h.pwrite(marker.ljust(4096, b"\0"), 64 << 20)
print("ready size=%d magic=%#x uuid=%s" % (h.get_size(), sb[0x38] | sb[0x39] << 8, sb[0x68:0x78].hex()), flush=True)
for line in sys.stdin:
    try:
        if line.strip() == "check":
            print("marker=" + bytes(h.pread(4096, 64 << 20)).rstrip(b"\0").decode(), flush=True)
        elif line.strip() == "bye":
            h.shutdown()
            print("bye", flush=True)
            break
    except nbd.Error as e:
        print("error: %s" % e, flush=True)
        break
"#;

struct Client {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    size: u64,
    magic: u32,
    uuid: String,
}

impl Client {
    fn connect(uri: &str, name: &str) -> Client {
        let mut child = Command::new(PYTHON)
            .args(["-c", CLIENT, uri, name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot run python3");
        let stdin = child.stdin.take();
        let lines = line_channel(child.stdout.take().unwrap());
        let mut c = Client {
            name: name.to_string(),
            child,
            stdin,
            lines,
            size: 0,
            magic: 0,
            uuid: String::new(),
        };
        let ready = c.line(Duration::from_secs(60));
        let fields: BTreeMap<&str, &str> = ready
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("{name}: {ready:?}"))
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .collect();
        c.size = fields["size"].parse().unwrap();
        c.magic = u32::from_str_radix(fields["magic"].trim_start_matches("0x"), 16).unwrap();
        c.uuid = fields["uuid"].to_string();
        c
    }

    fn line(&mut self, timeout: Duration) -> String {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => {
                panic!("{}: no answer within {timeout:?}", self.name)
            }
            Err(RecvTimeoutError::Disconnected) => {
                let st = self.child.wait();
                panic!(
                    "{}: the client exited ({st:?}) without answering",
                    self.name
                )
            }
        }
    }

    fn request(&mut self, command: &str) -> String {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
        self.line(Duration::from_secs(30))
    }

    /// Ends the client without NBD_CMD_DISC, as a lost connection would.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn wait_exit(&mut self) {
        self.stdin = None;
        assert!(
            wait_child(&mut self.child, Duration::from_secs(30)),
            "{} did not exit",
            self.name
        );
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn line_channel<R: Read + Send + 'static>(r: R) -> Receiver<String> {
    let (tx, rx) = channel();
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

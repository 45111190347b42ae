//! TLS with real clients and real certificates (made by openssl for each
//! test): nbdinfo with an nbds:// URI, qemu-img with tls-creds-x509, libnbd
//! doing I/O and block status through TLS; require mode and peer
//! verification refusing what they must; a garbage handshake ending the
//! process cleanly; bad key material failing at start, naming the file.

use crate::common::pki::pki;
use crate::common::*;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The nbds:// URI of a TCP server, with the client's certificate directory.
fn nbds(server: &Server, certs: &Path) -> String {
    let port = server.uri().rsplit(':').next().unwrap().to_string();
    format!("nbds://localhost:{port}/?tls-certificates={}", s(certs))
}

#[test]
fn real_clients_connect_through_tls_with_certificates() {
    require(&["nbdinfo", "qemu-img", "python3-nbd"]);
    let dir = TestDir::new("tls-clients");
    let pki = pki(&dir);
    let mut server = Server::start(
        &dir,
        Mode::Tcp,
        &[
            "--tls",
            "require",
            "--tls-certificates",
            s(&pki.server),
            "--tls-verify-peer",
            "1G",
        ],
        &[],
    );
    let uri = nbds(&server, &pki.client);

    let out = nbdinfo_ok(&[&uri]);
    assert!(out.contains("with TLS"), "nbdinfo must report TLS:\n{out}");
    assert!(out.contains("export-size: 1073741824"), "{out}");
    assert!(out.contains("ext4 filesystem"), "{out}");

    let port = server.uri().rsplit(':').next().unwrap().to_string();
    let out = run_ok(
        "qemu-img",
        cmd(
            "qemu-img",
            &[
                "info",
                "--object",
                &format!(
                    "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                    s(&pki.client)
                ),
                "--image-opts",
                &format!("driver=nbd,host=localhost,port={port},tls-creds=tls0"),
            ],
        ),
    );
    assert!(out.stdout.contains("1073741824 bytes"), "{}", out.stdout);

    // Data and holes through TLS: a fresh range is a hole and reads as
    // zeroes; what we write comes back and becomes data.
    let script = r#"
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
check(h.get_tls_negotiated(), "TLS not negotiated")
M = 1 << 20
# Away from ext4's metadata (block group 1 starts at 128 MiB).
check(flags_over(h, 200 * M, 8 * M) == {3}, "fresh range must be a hole")
check(h.pread(M, 200 * M) == bytes(M), "a hole reads as zeroes")
data = os.urandom(3 * M + 12345)
h.pwrite(data, 201 * M)
check(h.pread(len(data), 201 * M) == data, "data read back through TLS differs")
check(0 in flags_over(h, 201 * M, M), "written range must be data")
h.shutdown()
print("ok")
"#;
    let out = run_ok("python tls", python(script, &[uri.as_str()]));
    assert!(out.stdout.contains("ok"), "{}", out.describe());

    // The client certificate's subject is in the connect log line.
    server.proc.wait_stderr(
        "tls_subject=\"CN=alice,O=Example\"",
        Duration::from_secs(10),
    );
    wait_no_image_holders(server.images(), "after the TLS clients left");
    assert_dir_empty(server.images(), "after the TLS clients left");
}

#[test]
fn require_mode_refuses_plaintext_clients() {
    require(&["nbdinfo"]);
    let dir = TestDir::new("tls-require");
    let pki = pki(&dir);
    let server = Server::start(
        &dir,
        Mode::Tcp,
        &[
            "--tls",
            "require",
            "--tls-certificates",
            s(&pki.server),
            "64M",
        ],
        &[],
    );
    let mut c = cmd("nbdinfo", &["--size", server.uri()]);
    c.env("LIBNBD_DEBUG", "1");
    let out = run("nbdinfo plaintext", c);
    assert!(
        !out.status.success(),
        "a plaintext client must be refused\n{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("requires TLS"),
        "the refusal must say why (ERR_TLS_REQD with a message)\n{}",
        out.describe()
    );
    // Without --tls-verify-peer, a client without a certificate is fine.
    let out = nbdinfo_ok(&["--size", &nbds(&server, &pki.anonymous)]);
    assert_eq!(out.trim(), "67108864");
    assert_dir_empty(server.images(), "after a refused plaintext client");
}

#[test]
fn tls_on_serves_both_plaintext_and_tls() {
    require(&["nbdinfo"]);
    let dir = TestDir::new("tls-on");
    let pki = pki(&dir);
    let server = Server::start(
        &dir,
        Mode::Tcp,
        &["--tls", "on", "--tls-certificates", s(&pki.server), "64M"],
        &[],
    );
    let plain = nbdinfo_ok(&[server.uri()]);
    assert!(plain.contains("without TLS"), "{plain}");
    let tls = nbdinfo_ok(&[&nbds(&server, &pki.client)]);
    assert!(tls.contains("with TLS"), "{tls}");
}

#[test]
fn verify_peer_refuses_missing_and_foreign_certificates() {
    require(&["nbdinfo"]);
    let dir = TestDir::new("tls-verify");
    let pki = pki(&dir);
    let mut server = Server::start(
        &dir,
        Mode::Tcp,
        &[
            "--tls",
            "require",
            "--tls-certificates",
            s(&pki.server),
            "--tls-verify-peer",
            "64M",
        ],
        &[],
    );
    for (who, certs) in [
        ("no certificate", &pki.anonymous),
        ("another CA", &pki.stranger),
    ] {
        let out = run(
            "nbdinfo",
            cmd("nbdinfo", &["--size", &nbds(&server, certs)]),
        );
        assert!(
            !out.status.success(),
            "a client with {who} must be refused\n{}",
            out.describe()
        );
    }
    server
        .proc
        .wait_stderr("TLS handshake failed", Duration::from_secs(10));
    // The listener is unharmed and the right client still gets in.
    let out = nbdinfo_ok(&["--size", &nbds(&server, &pki.client)]);
    assert_eq!(out.trim(), "67108864");
    wait_no_image_holders(server.images(), "after refused TLS clients");
    assert_dir_empty(server.images(), "after refused TLS clients");
}

/// Read exactly `n` bytes from the server's stdout (bounded by the test
/// deadline through a reader thread).
fn read_n(out: &mut impl Read, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    out.read_exact(&mut b).expect("server output");
    b
}

#[test]
fn a_garbage_tls_handshake_ends_the_process_cleanly() {
    let dir = TestDir::new("tls-garbage");
    let pki = pki(&dir);
    let images = dir.subdir("images");
    let mut c = tmpdisk_cmd(&[
        "--stdio",
        "--tls",
        "require",
        "--tls-certificates",
        s(&pki.server),
        "--tmpdir",
        s(&images),
        "64M",
    ]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("start tmpdisk --stdio");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    // Whatever happens, the child must not outlive the test.
    let pid = child.id();
    let _guard = KillOnDrop(pid);

    let greeting = read_n(&mut stdout, 18);
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    stdin.write_all(&1u32.to_be_bytes()).unwrap(); // fixed newstyle
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&5u32.to_be_bytes()); // NBD_OPT_STARTTLS
    opt.extend_from_slice(&0u32.to_be_bytes());
    stdin.write_all(&opt).unwrap();
    let reply = read_n(&mut stdout, 20);
    assert_eq!(
        &reply[12..16],
        &1u32.to_be_bytes(),
        "STARTTLS must be ACKed"
    );
    // Not a TLS ClientHello.
    stdin
        .write_all(b"GET / HTTP/1.0\r\n\r\nthis is not TLS at all")
        .unwrap();
    drop(stdin);

    let deadline = std::time::Instant::now() + DEADLINE;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tmpdisk did not exit after a garbage handshake"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut log = String::new();
    stderr.read_to_string(&mut log).unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "a client's bad handshake is not a server failure\n{log}"
    );
    assert!(log.contains("TLS handshake failed"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert_dir_empty(&images, "after a garbage TLS handshake");
}

struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0 as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[test]
fn bad_key_material_fails_at_start_naming_the_file() {
    let dir = TestDir::new("tls-bad-keys");
    let pki = pki(&dir);
    let start = |args: &[&str]| {
        let mut c = tmpdisk_cmd(args);
        c.args(["--listen", "127.0.0.1:1", "64M"]);
        run("tmpdisk", c)
    };
    // A directory without the files.
    let empty = dir.subdir("empty");
    let out = start(&["--tls", "on", "--tls-certificates", s(&empty)]);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("server-cert.pem"), "{}", out.describe());
    assert_one_line(&out.stderr, "missing certificate");
    // --tls-verify-peer without ca-cert.pem.
    let no_ca = dir.subdir("no-ca");
    for f in ["server-cert.pem", "server-key.pem"] {
        std::fs::copy(pki.server.join(f), no_ca.join(f)).unwrap();
    }
    let out = start(&[
        "--tls",
        "on",
        "--tls-certificates",
        s(&no_ca),
        "--tls-verify-peer",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("ca-cert.pem"), "{}", out.describe());
    // A key that does not belong to the certificate.
    let mismatched = dir.subdir("mismatched");
    std::fs::copy(
        pki.server.join("server-cert.pem"),
        mismatched.join("server-cert.pem"),
    )
    .unwrap();
    std::fs::copy(
        pki.client.join("client-key.pem"),
        mismatched.join("server-key.pem"),
    )
    .unwrap();
    let out = start(&["--tls", "on", "--tls-certificates", s(&mismatched)]);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(
        out.stderr.contains("server-key.pem") && out.stderr.contains("do not go together"),
        "{}",
        out.describe()
    );
    // The key itself never appears in the message.
    let key = std::fs::read_to_string(pki.client.join("client-key.pem")).unwrap();
    let key_line = key.lines().nth(1).unwrap();
    assert!(
        !out.stderr.contains(key_line),
        "key material leaked into the error"
    );
    // TLS options without TLS.
    let out = start(&["--tls-verify-peer"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
}

/// Through TLS every payload passes through our memory. A 32 MiB write
/// and read (the largest the protocol allows) used to keep a 32 MiB
/// buffer for the rest of the session; now payloads go through one
/// buffer in 256 KiB pieces, so the serving process stays small.
#[test]
fn large_tls_requests_do_not_grow_the_server() {
    require(&["python3-nbd"]);
    let dir = TestDir::new("tls-memory");
    let pki = pki(&dir);
    let server = Server::start(
        &dir,
        Mode::Tcp,
        &[
            "--tls",
            "require",
            "--tls-certificates",
            s(&pki.server),
            "--command",
            "true",
            "256M",
        ],
        &[],
    );
    let client = HeldClient::start(
        r#"
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
check(h.get_tls_negotiated(), "TLS not negotiated")
M = 1 << 20
data = os.urandom(32 * M)
for i in range(3):
    h.pwrite(data, i * 32 * M)
    check(h.pread(32 * M, i * 32 * M) == data, "32 MiB read back through TLS differs")
"#,
        "h.shutdown()",
        &[&nbds(&server, &pki.client)],
    );
    let child = wait_live_children(server.pid(), 1, "one TLS client")[0];
    let hwm = proc_status(child, "VmHWM")
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .expect("VmHWM of the serving process");
    client.finish();
    eprintln!("serving process VmHWM after 32 MiB TLS requests: {hwm} KiB");
    assert!(
        hwm < 16 * 1024,
        "the serving process peaked at {hwm} KiB after 32 MiB TLS requests (a buffer per request size?)"
    );
}

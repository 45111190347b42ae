//! Every way to hand tmpdisk its clients: `--stdio` (libnbd
//! connect_command), an inherited listening socket (libnbd's systemd socket
//! activation), `--listen`, `--unix`, and `systemd-socket-activate --accept`.

use crate::common::*;

#[test]
fn stdio_with_libnbd_connect_command() {
    require(&["python3-nbd", "mkfs.ext4"]);
    let dir = TestDir::new("stdio");
    let images = dir.subdir("images");
    let setup = r#"
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_command([sys.argv[1], "--stdio", "--tmpdir", sys.argv[2], "64M"])
check(h.get_size() == 64 << 20, "size over --stdio: %d" % h.get_size())
check(h.get_structured_replies_negotiated(), "structured replies over --stdio")
check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation over --stdio")
check(h.pread(2, 1024 + 56) == b"\x53\xef", "the disk must be a fresh ext4")
W, L = 32 << 20, 1 << 20
check(all(f & 1 for f in flags_over(h, W, L)), "unwritten middle of a fresh disk must be a hole")
h.pwrite(b"\x77" * L, W)
check(h.pread(L, W) == b"\x77" * L, "read back over --stdio")
check(flags_over(h, W, L) == {0}, "written range must be data")
"#;
    let finish = r#"
h.zero(L, W)
check(h.pread(L, W) == bytes(L), "zeroed range")
h.shutdown()
del h  # libnbd waits for tmpdisk to exit
"#;
    let client = HeldClient::start(setup, finish, &[TMPDISK, images.to_str().unwrap()]);
    let pids = wait_image_holders(&images, 1, "--stdio client connected");
    let (parent, _) = proc_stat(pids[0]).expect("serving process stat");
    assert_eq!(
        parent,
        client.proc.pid(),
        "the image must be held by the tmpdisk that libnbd started"
    );
    assert_dir_empty(&images, "while serving --stdio");
    client.finish();
    wait_no_image_holders(&images, "after the --stdio client left");
    assert_dir_empty(&images, "after the --stdio client left");
}

#[test]
fn inherited_listening_socket_through_nbdinfo() {
    require(&["nbdinfo", "mkfs.ext4"]);
    let dir = TestDir::new("sact");
    let images = dir.subdir("images");
    // `nbdinfo -- [ CMD ]` runs CMD with a listening socket in LISTEN_FDS.
    let mut c = cmd(
        "nbdinfo",
        &[
            "--json",
            "--",
            "[",
            TMPDISK,
            "--tmpdir",
            images.to_str().unwrap(),
            "64M",
            "]",
        ],
    );
    c.env_remove("LISTEN_FDS").env_remove("LISTEN_PID");
    let out = run_ok("nbdinfo -- [ tmpdisk ]", c);
    let doc =
        json::parse(&out.stdout).unwrap_or_else(|e| panic!("nbdinfo --json: {e}\n{}", out.stdout));
    assert_eq!(
        doc["exports"]
            .as_array()
            .map(|e| e[0]["export-size"].as_u64()),
        Some(Some(64 * MIB)),
        "size through an inherited listening socket:\n{}",
        out.stdout
    );
    wait_no_image_holders(&images, "after nbdinfo -- [ tmpdisk ]");
    assert_dir_empty(&images, "after nbdinfo -- [ tmpdisk ]");
}

/// Four libnbd connections at once to a `--listen`/`--unix` listener, each
/// with its own disk and process, then four concurrent nbdinfo and qemu-io
/// clients.
fn concurrent_clients(mode: Mode, name: &str) {
    let dir = TestDir::new(name);
    let server = Server::start(&dir, mode, &["64M"], &[]);
    let setup = r#"
hs = [connect(sys.argv[1]) for _ in range(4)]
P, L = 2 << 20, 65536
for i, h in enumerate(hs):
    h.pwrite(bytes([0x10 + i]) * L, P)
for i, h in enumerate(hs):
    check(h.pread(L, P) == bytes([0x10 + i]) * L, "client %d must read back its own data" % i)
"#;
    let client = HeldClient::start(setup, "for h in hs:\n    h.shutdown()", &[server.uri()]);
    let pids = wait_image_holders(server.images(), 4, "four clients connected");
    for pid in &pids {
        let (parent, _) = proc_stat(*pid).expect("serving process stat");
        assert_eq!(
            parent,
            server.pid(),
            "each connection must be served by a child of the listener"
        );
    }
    assert_dir_empty(server.images(), "with four clients connected");
    client.finish();

    let mut procs = Vec::new();
    for i in 0..4 {
        procs.push(Proc::spawn(
            "nbdinfo",
            cmd("nbdinfo", &["--size", server.uri()]),
        ));
        let pattern = format!("0x{:x}", 0x20 + i);
        procs.push(Proc::spawn(
            "qemu-io",
            cmd(
                "qemu-io",
                &[
                    "-f",
                    "raw",
                    "-c",
                    &format!("write -P {pattern} 1M 1M"),
                    "-c",
                    &format!("read -P {pattern} 1M 1M"),
                    server.uri(),
                ],
            ),
        ));
    }
    for mut p in procs {
        let status = p.wait();
        assert!(
            status.success(),
            "concurrent {} failed\n{}",
            p.name(),
            p.describe()
        );
        if p.name() == "nbdinfo" {
            assert_eq!(p.stdout().trim(), (64 * MIB).to_string(), "nbdinfo --size");
        }
    }
    wait_no_image_holders(server.images(), "after the concurrent clients");
    assert_dir_empty(server.images(), "after the concurrent clients");
    wait_children_reaped(server.pid(), 0, "after the concurrent clients");
}

#[test]
fn tcp_listener_serves_concurrent_clients() {
    require(&["python3-nbd", "nbdinfo", "qemu-io", "mkfs.ext4"]);
    concurrent_clients(Mode::Tcp, "tcp");
}

#[test]
fn unix_listener_serves_concurrent_clients() {
    require(&["python3-nbd", "nbdinfo", "qemu-io", "mkfs.ext4"]);
    concurrent_clients(Mode::Unix, "unix");
}

#[test]
fn systemd_socket_activate_accept_serves_two_clients() {
    require(&[
        "python3-nbd",
        "nbdinfo",
        "mkfs.ext4",
        "systemd-socket-activate",
    ]);
    let dir = TestDir::new("socket-activate");
    let server = Server::start(&dir, Mode::SocketActivate, &["64M"], &[]);
    let setup = r#"
h1 = connect(sys.argv[1])
h2 = connect(sys.argv[1])
h1.pwrite(b"\xab" * 65536, 2 << 20)
check(h2.pread(65536, 2 << 20) == bytes(65536), "the second connection must have its own disk")
check(h2.pread(2, 1024 + 56) == b"\x53\xef", "the second connection's disk must be a fresh ext4")
"#;
    let client = HeldClient::start(setup, "h1.shutdown()\nh2.shutdown()", &[server.uri()]);
    let pids = wait_image_holders(server.images(), 2, "two socket-activated clients");
    for pid in &pids {
        let (parent, _) = proc_stat(*pid).expect("serving process stat");
        assert_eq!(
            parent,
            server.pid(),
            "each connection must be its own process started by systemd-socket-activate"
        );
    }
    assert_dir_empty(server.images(), "with two socket-activated clients");
    client.finish();
    let (_, export) = nbdinfo_json(server.uri());
    assert_eq!(export["export-size"].as_u64(), Some(64 * MIB), "size");
    wait_no_image_holders(server.images(), "after the socket-activated clients");
    assert_dir_empty(server.images(), "after the socket-activated clients");
}

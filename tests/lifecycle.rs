//! The image's life: it never shows in the tmpdir (not even while serving),
//! and it is gone with its process however the connection ends: NBD_CMD_DISC,
//! a client that vanishes, or SIGKILL of the serving process. Also the
//! handshake timeout.

use crate::common::nbdraw::{self, GoReply};
use crate::common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The one process serving a single connected client, after checking that
/// its image is an unlinked file in the tmpdir and that the tmpdir is empty.
fn serving_process(server: &Server) -> u32 {
    let pids = wait_image_holders(server.images(), 1, "one client connected");
    let holders = image_holders(server.images());
    assert!(
        holders
            .iter()
            .all(|(_, t)| is_deleted_image(t, server.images())),
        "the image must be an unlinked file (O_TMPFILE), got {holders:?}"
    );
    assert_dir_empty(server.images(), "while a client is connected");
    pids[0]
}

#[test]
fn tmpdir_stays_empty_while_serving_and_after_disconnect() {
    require(&["python3-nbd", "nbdinfo", "mkfs.ext4"]);
    let dir = TestDir::new("disc");
    let server = Server::unix(&dir, &["64M"]);
    let images = server.images().to_path_buf();
    assert_dir_empty(&images, "before any client");

    let client = HeldClient::start(
        "h = connect(sys.argv[1])\nh.pwrite(b'\\xcd' * 65536, 2 << 20)",
        "check(h.pread(65536, 2 << 20) == b'\\xcd' * 65536, 'read back')\nh.shutdown()",
        &[server.uri()],
    );
    let pid = serving_process(&server);
    assert_ne!(
        pid,
        server.pid(),
        "the listener must serve each connection in a forked child"
    );
    client.finish();
    wait_no_image_holders(&images, "after NBD_CMD_DISC");
    assert_dir_empty(&images, "after NBD_CMD_DISC");
    wait_children_reaped(server.pid(), 0, "after NBD_CMD_DISC");

    nbdinfo_ok(&["--json", server.uri()]);
    wait_no_image_holders(&images, "after nbdinfo");
    assert_dir_empty(&images, "after nbdinfo");
    wait_children_reaped(server.pid(), 0, "after nbdinfo");
}

#[test]
fn tmpdir_stays_empty_after_abrupt_close() {
    require(&["python3-nbd", "mkfs.ext4"]);
    let dir = TestDir::new("abrupt");
    let server = Server::unix(&dir, &["64M"]);
    let images = server.images().to_path_buf();

    // A hand-written client that negotiates GO and then just closes.
    let mut sock = UnixStream::connect(dir.join("nbd.sock")).unwrap();
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    nbdraw::handshake(&mut sock).expect("handshake");
    match nbdraw::opt_go(&mut sock).expect("GO") {
        GoReply::Ok { size, flags } => {
            assert_eq!(size, 64 * MIB, "size in NBD_INFO_EXPORT");
            // NBD_FLAG_CAN_MULTI_CONN: every connection is a disk of its own.
            assert_eq!(flags & (1 << 8), 0, "multi-conn advertised: {flags:#x}");
        }
        other => panic!("GO failed: {other:?}"),
    }
    serving_process(&server);
    drop(sock);
    wait_no_image_holders(&images, "after the client closed without DISC");
    assert_dir_empty(&images, "after the client closed without DISC");
    wait_children_reaped(server.pid(), 0, "after the client closed without DISC");

    // A libnbd client killed mid-session.
    let client = HeldClient::start(
        "h = connect(sys.argv[1])\nh.pwrite(b'\\xcd' * 65536, 0)",
        "",
        &[server.uri()],
    );
    serving_process(&server);
    client.proc.kill_group(libc::SIGKILL);
    drop(client);
    wait_no_image_holders(&images, "after the client was killed");
    assert_dir_empty(&images, "after the client was killed");
    wait_children_reaped(server.pid(), 0, "after the client was killed");
}

/// SIGKILLs the process serving one client of `server`; the image must be
/// gone, the client must see the connection fail, and the server must go on
/// serving new clients.
fn sigkill_serving_process(server: &Server) {
    let images = server.images().to_path_buf();
    let client = HeldClient::start(
        "h = connect(sys.argv[1])\nh.pwrite(b'\\xcd' * 65536, 0)",
        r#"
try:
    h.pread(65536, 0)
    failed = False
except nbd.Error:
    failed = True
check(failed, "I/O must fail once the serving process is killed")
"#,
        &[server.uri()],
    );
    let pid = serving_process(server);
    assert_ne!(pid, server.pid(), "the serving process must be a child");
    send_signal(pid, libc::SIGKILL);
    wait_no_image_holders(&images, "after SIGKILL of the serving process");
    assert_dir_empty(&images, "after SIGKILL of the serving process");
    client.finish();

    // The listener is unaffected.
    nbdinfo_ok(&["--size", server.uri()]);
    wait_no_image_holders(&images, "after a client following the SIGKILL");
    assert_dir_empty(&images, "after a client following the SIGKILL");
}

#[test]
fn tmpdir_stays_empty_after_sigkill_of_listener_child() {
    require(&["python3-nbd", "nbdinfo", "mkfs.ext4"]);
    let dir = TestDir::new("sigkill-unix");
    let server = Server::unix(&dir, &["64M"]);
    sigkill_serving_process(&server);
    wait_children_reaped(server.pid(), 0, "after SIGKILL of a child");
}

/// A client process killed between creating its image's private name and
/// unlinking it (where the tmpdir has no O_TMPFILE; the window is two
/// system calls, so the name it would leave is put there by hand): the
/// listener removes that empty name when it reaps the process, and nothing
/// else.
#[test]
fn the_listener_clears_the_name_a_killed_child_left() {
    require(&["python3-nbd", "mkfs.ext4"]);
    let dir = TestDir::new("sigkill-window");
    let server = Server::unix(&dir, &["64M"]);
    let images = server.images().to_path_buf();
    let held = HeldClient::start("h = connect(sys.argv[1])", "", &[server.uri()]);
    let pid = serving_process(&server);
    assert_ne!(pid, server.pid(), "the serving process must be a child");
    let left = images.join(format!(".tmpdisk-{pid}-123456789-0"));
    let not_ours = images.join(format!(".tmpdisk-{pid}-123456789-1"));
    std::fs::write(&left, b"").unwrap();
    std::fs::write(&not_ours, b"someone's data").unwrap();
    send_signal(pid, libc::SIGKILL);
    wait_children_reaped(server.pid(), 0, "after SIGKILL of a child");
    wait_until(
        "the listener to remove the killed child's empty name",
        Duration::from_secs(10),
        || (!left.exists()).then_some(()),
    );
    assert!(not_ours.exists(), "a file with data is not the window's");
    std::fs::remove_file(&not_ours).unwrap();
    held.finish();
    assert!(
        server
            .proc
            .stderr()
            .contains("removed the empty image name a killed client process left"),
        "{}",
        server.proc.stderr()
    );
}

#[test]
fn tmpdir_stays_empty_after_sigkill_of_socket_activated_process() {
    require(&[
        "python3-nbd",
        "nbdinfo",
        "mkfs.ext4",
        "systemd-socket-activate",
    ]);
    let dir = TestDir::new("sigkill-sa");
    let server = Server::start(&dir, Mode::SocketActivate, &["64M"], &[]);
    sigkill_serving_process(&server);
}

#[test]
fn handshake_timeout_drops_a_silent_client() {
    let dir = TestDir::new("handshake-timeout");
    let server = Server::unix(&dir, &["--handshake-timeout", "1", "64M"]);
    let mut sock = UnixStream::connect(dir.join("nbd.sock")).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let start = Instant::now();
    // Read the greeting, then say nothing.
    let mut greeting = [0u8; 18];
    sock.read_exact(&mut greeting).expect("greeting");
    let mut rest = [0u8; 1];
    let r = sock.read(&mut rest);
    let waited = start.elapsed();
    assert!(
        matches!(r, Ok(0))
            || matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the server must hang up on a client silent past --handshake-timeout 1, got {r:?} after {waited:?}"
    );
    assert!(
        waited >= Duration::from_millis(900),
        "the server hung up after {waited:?}, before the 1 s timeout"
    );
    wait_children_reaped(server.pid(), 0, "after the handshake timeout");
    assert_dir_empty(server.images(), "after the handshake timeout");
}

/// A client that sends options and never reads their replies is dropped
/// within the handshake timeout. Before, poll(2) saying the pipe had room
/// (one free page is enough) was followed by a blocking write of a whole
/// batch of replies (some 33 KB here: NBD_OPT_LIST with long
/// descriptions), which waited for the client for ever, outside the
/// budget. Over `--stdio` (ssh, inetd) any batch over a page does it.
#[test]
fn a_client_that_never_reads_option_replies_is_dropped_in_time() {
    use std::process::Stdio;
    let dir = TestDir::new("handshake-unread");
    let mut exports = String::new();
    for i in 0..8 {
        exports += &format!(
            "[export.e{i}]\nsize = \"64M\"\ndescription = \"{}\"\n",
            "d".repeat(4000)
        );
    }
    let file = dir.join("exports.toml");
    std::fs::write(&file, exports).unwrap();
    let images = dir.subdir("images");
    let mut c = tmpdisk_cmd(&[
        "--stdio",
        "--tmpdir",
        images.to_str().unwrap(),
        "--handshake-timeout",
        "2",
        "--exports",
        file.to_str().unwrap(),
    ]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut input = child.stdin.take().unwrap();
    let mut greeting = [0u8; 18];
    out.read_exact(&mut greeting).unwrap();
    input.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
    let start = Instant::now();
    // 200 lists of 8 exports of 4000 bytes each: 6.4 MB of replies, far
    // more than the 64 KiB pipe holds; none of it is read.
    let mut all = Vec::new();
    for _ in 0..200 {
        nbdraw::send_option(&mut all, nbdraw::OPT_LIST, &[]).unwrap();
    }
    input.write_all(&all).unwrap();
    let ended = wait_child(&mut child, Duration::from_secs(15));
    let waited = start.elapsed();
    if !ended {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(
        ended && waited < Duration::from_secs(10),
        "still negotiating after {waited:?} with --handshake-timeout 2"
    );
    drop((out, input));
    assert_dir_empty(&images, "after the handshake timeout");
}

//! Reconnect: a client that names its disk with a token (`NAME:id=TOKEN`)
//! and loses its connection gets the same disk back within the grace
//! period. Real clients: libnbd (a client that dies without NBD_CMD_DISC,
//! then a new one with the same name) and qemu-io with `reconnect-delay`
//! through a TCP relay that the test cuts. How a test knows the disk is
//! the same: it reads back what the first connection wrote, byte for
//! byte, and the server logs the handover.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use crate::common::nbdraw;
use crate::common::relay::{Relay, Upstream};
use crate::common::*;

const TOKEN: &str = "3f9c2d7e1a4b5c6d8e9f0a1b2c3d4e5f";
const OTHER: &str = "9a8b7c6d5e4f30112233445566778899";

/// A server on a Unix socket with its own reconnect directory.
fn server(dir: &TestDir, grace: &str, more: &[&str]) -> (Server, PathBuf) {
    let meet = dir.join("meet");
    let mut args = vec![
        "--reconnect-dir",
        meet.to_str().unwrap(),
        "--reconnect-grace",
        grace,
    ];
    args.extend_from_slice(more);
    (Server::unix(dir, &args), meet)
}

fn uri(dir: &TestDir, name: &str) -> String {
    format!(
        "nbd+unix:///{name}?socket={}",
        dir.join("nbd.sock").display()
    )
}

/// A libnbd client that connects to `uri`, prints what is at `offset`
/// (16 bytes, hex), writes `text` there, and dies without NBD_CMD_DISC
/// (`die`) or disconnects cleanly.
fn client(uri: &str, offset: u64, text: &str, die: bool) -> Output {
    let script = r#"
uri, offset, text, die = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "die"
h = nbd.NBD()
h.set_uri_allow_local_file(True)  # tls-certificates=DIR
h.connect_uri(uri)
print("size", h.get_size())
print("read", bytes(h.pread(16, offset)).hex())
if text:
    h.pwrite(text.encode().ljust(4096, b"\0"), offset)
if die:
    os._exit(0)
h.shutdown()
"#;
    run(
        "libnbd client",
        python(
            script,
            &[
                uri,
                &offset.to_string(),
                text,
                if die { "die" } else { "disc" },
            ],
        ),
    )
}

fn hex16(text: &str) -> String {
    let mut b = text.as_bytes().to_vec();
    b.resize(16, 0);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn read_line(out: &Output) -> &str {
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("read "))
        .unwrap_or_else(|| panic!("no read line:\n{out}"))
}

#[test]
fn a_dropped_client_gets_its_disk_back_and_a_clean_end_ends_the_token() {
    require(&["python3-nbd", "mkfs.ext4"]);
    let dir = TestDir::new("reconnect-basic");
    let (mut server, meet) = server(&dir, "20", &["64M"]);
    let name = format!(":id={TOKEN}");
    let a = client(&uri(&dir, &name), 1 << 20, "written by A", true);
    assert!(a.status.success(), "{a}");
    // B: the same name, a new connection, the same disk.
    let b = client(&uri(&dir, &name), 1 << 20, "written by B", true);
    assert!(b.status.success(), "{b}");
    assert_eq!(read_line(&b), hex16("written by A"), "B must see A's write");
    assert!(b.stdout.contains("size 67108864"), "{b}");
    // C after B dropped too: still the one disk; C disconnects cleanly.
    let c = client(&uri(&dir, &name), 1 << 20, "", false);
    assert_eq!(read_line(&c), hex16("written by B"), "{c}");
    wait_no_image_holders(server.images(), "after a clean disconnect");
    // After a clean disconnect the disk is gone, and a token is for one
    // disk: the name is refused, never a fresh disk.
    let d = client(&uri(&dir, &name), 1 << 20, "", false);
    assert!(
        !d.status.success() && d.stderr.contains("no export named"),
        "a token after its disk's clean end: {d}"
    );
    wait_no_image_holders(server.images(), "after the last client");
    assert_dir_empty(server.images(), "after all clients left");
    server
        .proc
        .wait_stderr("client left peer", Duration::from_secs(10));
    let log = server.proc.stderr();
    assert_eq!(
        log.matches("client reconnected to its disk").count(),
        2,
        "{log}"
    );
    assert!(
        !log.contains(TOKEN),
        "the token must not reach the log:\n{log}"
    );
    // One name for the one disk, unanswered now that the disk has ended.
    let names = dir_entries(&meet);
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(
        std::os::unix::net::UnixStream::connect(meet.join(&names[0])).is_err(),
        "nobody answers for an ended disk"
    );
}

#[test]
fn a_half_open_connection_gives_way_to_the_reconnect() {
    require(&["python3-nbd", "mkfs.ext4"]);
    let dir = TestDir::new("reconnect-takeover");
    let (server, _) = server(&dir, "20", &["64M"]);
    // A still holds its connection (as after a network loss nobody saw)
    // when B arrives with the same name: B gets the disk, A's connection
    // is shut down.
    let script = r#"
uri = sys.argv[1]
a = nbd.NBD(); a.connect_uri(uri)
a.pwrite(b"from A".ljust(4096, b"\0"), 0)
b = nbd.NBD(); b.connect_uri(uri)
check(bytes(b.pread(6, 0)) == b"from A", "B sees A's disk")
try:
    a.pread(6, 0)
    check(False, "A's connection must be ended")
except nbd.Error:
    pass
b.shutdown()
"#;
    run_ok(
        "takeover",
        python(script, &[uri(&dir, &format!(":id={TOKEN}"))]),
    );
    wait_no_image_holders(server.images(), "after the takeover");
}

/// A copy of the base whose client drops comes back with the blocks it
/// wrote and trimmed, and the base's bytes everywhere else: run by both
/// paths' tests below. `images` is the tmpdir.
fn a_copy_reconnects_with_its_own_blocks(
    dir: &TestDir,
    images: &Path,
    base: &Path,
    more: &[&str],
    copy: &str,
) {
    // A base of known bytes: block i holds i.
    let bytes: Vec<u8> = (0..16 * 4096u32).map(|i| (i / 4096) as u8 + 1).collect();
    std::fs::write(base, &bytes).unwrap();
    let meet = dir.join("meet");
    let mut args = vec![
        "--reconnect-dir",
        meet.to_str().unwrap(),
        "--reconnect-grace",
        "20",
        "--base",
        base.to_str().unwrap(),
    ];
    args.extend_from_slice(more);
    let mut server = Server::start_in(dir, Mode::Unix, images, &args, &[]);
    let name = format!(":id={TOKEN}");
    let script = r#"
uri, phase = sys.argv[1], sys.argv[2]
h = nbd.NBD(); h.connect_uri(uri)
if phase == "write":
    h.pwrite(b"\xee" * 100, 4096 * 3 + 10)
    h.trim(4096, 4096 * 5)
    os._exit(0)
for blk in range(16):
    got = bytes(h.pread(4096, 4096 * blk))
    want = bytearray([blk + 1] * 4096)
    if blk == 3:
        want[10:110] = b"\xee" * 100
    if blk == 5:
        want = bytearray(4096)
    check(got == bytes(want), "block %d after the reconnect" % blk)
h.shutdown()
"#;
    run_ok(
        "client A",
        python(script, &[uri(dir, &name), "write".into()]),
    );
    run_ok(
        "client B",
        python(script, &[uri(dir, &name), "check".into()]),
    );
    wait_no_image_holders(server.images(), "after the client");
    server
        .proc
        .wait_stderr("client reconnected to its disk", Duration::from_secs(10));
    server
        .proc
        .wait_stderr(&format!("copy=\"{copy}\""), Duration::from_secs(10));
    // The reconnected client's line too: the handover carries what the
    // copy is (a clone's line said "overlay" once it was handed over).
    let log = server.proc.stderr();
    let served = served_lines(&log);
    assert_eq!(served.len(), 2, "a line per client:\n{log}");
    for line in served {
        assert!(line.contains(&format!("copy=\"{copy}\"")), "{line}");
    }
}

#[test]
fn an_overlay_copy_reconnects_with_its_own_blocks() {
    require(&["python3-nbd"]);
    let dir = TestDir::new("reconnect-overlay");
    let images = dir.subdir("images");
    a_copy_reconnects_with_its_own_blocks(&dir, &images, &dir.join("base.img"), &[], "overlay");
}

/// The same for a command's copy, a reflink clone on this tmpdir: the
/// clone goes over as the one file it is.
#[test]
fn a_clone_copy_reconnects_with_its_own_blocks() {
    require(&["python3-nbd"]);
    let dir = TestDir::new("reconnect-clone");
    let (xfs, images) = crate::golden::reflink_tmpdir(&dir);
    let base = images.parent().unwrap().join("base.img");
    let command = ["--command", "true"];
    a_copy_reconnects_with_its_own_blocks(&dir, &images, &base, &command, "clone");
    drop(xfs);
}

#[test]
fn another_token_finds_nothing_and_racers_get_one_disk() {
    require(&["python3-nbd", "mkfs.ext4"]);
    let dir = TestDir::new("reconnect-race");
    let (server, _) = server(&dir, "20", &["64M"]);
    let name = format!(":id={TOKEN}");
    client(&uri(&dir, &name), 0, "the one disk", true);
    // Another token: an ordinary fresh disk, no hint of the other.
    let other = client(&uri(&dir, &format!(":id={OTHER}")), 0, "", false);
    assert_eq!(read_line(&other), "0".repeat(32), "{other}");
    // Two reconnects at once: at the end exactly one has the disk. Each
    // connects, reads, holds its connection a moment, and reads again; a
    // later taker ends an earlier one's connection, a racer that comes
    // while the disk is being handed over finds it gone.
    let script = r#"
h = nbd.NBD()
try:
    h.connect_uri(sys.argv[1])
except nbd.Error as e:
    print("refused"); sys.exit(0)
try:
    first = bytes(h.pread(16, 0)).hex()
except nbd.Error:
    print("cut"); os._exit(0)
time.sleep(1.5)
try:
    print("alive", first, bytes(h.pread(16, 0)).hex())
except nbd.Error:
    print("cut", first)
os._exit(0)
"#;
    let racers: Vec<_> = (0..2)
        .map(|_| {
            let u = uri(&dir, &name);
            thread::spawn(move || run_ok("racer", python(&format!("import time\n{script}"), &[u])))
        })
        .collect();
    let outs: Vec<String> = racers
        .into_iter()
        .map(|t| t.join().unwrap().stdout.trim().to_string())
        .collect();
    let disk = hex16("the one disk");
    let holders = outs
        .iter()
        .filter(|o| **o == format!("alive {disk} {disk}"))
        .count();
    assert_eq!(
        holders, 1,
        "exactly one racer ends up with the disk: {outs:?}"
    );
    // Never a fresh disk under the token: whatever a racer read was the
    // one disk's.
    let allowed = [
        format!("alive {disk} {disk}"),
        format!("cut {disk}"),
        "cut".to_string(),
        "refused".to_string(),
    ];
    assert!(outs.iter().all(|o| allowed.contains(o)), "{outs:?}");
    drop(server);
}

/// A connection that had a disk built under another name first (INFO of
/// a command's export builds it, as `nbdinfo --list` does) still takes
/// its tokened disk over, and still holds a fresh one. Before the fix the
/// first build dropped the connection's watch, so the handover failed
/// after the old process had given the disk up: the disk was lost.
#[test]
fn a_disk_built_earlier_in_the_negotiation_does_not_stop_a_reconnect() {
    require(&["python3-nbd"]);
    let dir = TestDir::new("reconnect-after-info");
    let (mut server, _) = server(&dir, "20", &["--command", "true", "64M"]);
    let script = r#"
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(sys.argv[1])
h.set_export_name("")
h.opt_info()
h.set_export_name(sys.argv[2])
h.opt_go()
print("read", bytes(h.pread(16, 1 << 20)).hex())
h.pwrite(sys.argv[3].encode().ljust(4096, b"\0"), 1 << 20)
os._exit(0)
"#;
    let plain = uri(&dir, "");
    let (first, second) = (format!(":id={TOKEN}"), format!(":id={OTHER}"));
    let a = client(
        &uri(&dir, &format!(":id={TOKEN}")),
        1 << 20,
        "written by A",
        true,
    );
    assert!(a.status.success(), "{a}");
    // B: INFO builds a disk for "", then GO takes A's disk over.
    let b = run_ok(
        "INFO, then GO with a token",
        python(script, &[plain.as_str(), &first, "written by B"]),
    );
    assert_eq!(read_line(&b), hex16("written by A"), "B must get A's disk");
    // C: the same with a token no disk has: a fresh disk, held.
    let c = run_ok(
        "INFO, then GO with a new token",
        python(script, &[plain.as_str(), &second, "written by C"]),
    );
    assert_eq!(read_line(&c), hex16(""), "{c}");
    let c2 = client(&uri(&dir, &format!(":id={OTHER}")), 1 << 20, "", false);
    assert_eq!(read_line(&c2), hex16("written by C"), "{c2}");
    server
        .proc
        .wait_stderr("client reconnected to its disk", Duration::from_secs(10));
    let log = server.proc.stderr();
    assert_eq!(
        log.matches("client reconnected to its disk").count(),
        2,
        "{log}"
    );
    assert!(!log.contains("no connection to watch"), "{log}");
}

/// A process keeping a disk for its client that cannot accept (here: out
/// of fds, its limit lowered to what it has open, with a connection
/// waiting) pauses between attempts instead of spinning a core, and
/// hands the disk over once it can again. Before, its accept loop retried
/// at once: 126 ticks of CPU in the 2 s measured here.
#[test]
fn a_holder_out_of_fds_does_not_spin() {
    require(&["python3-nbd", "mkfs.ext4"]);
    let dir = TestDir::new("reconnect-emfile");
    let (server, meet) = server(&dir, "30", &["64M"]);
    let holder_socket = drop_a_client(&dir, &meet);
    let holder = wait_image_holders(server.images(), 1, "the process keeping the disk")[0];
    set_soft_nofile(holder, lowest_free_fd(holder));
    // A connection waits in the backlog; every accept of it fails (EMFILE).
    let waiting = UnixStream::connect(holder_socket).unwrap();
    thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(holder).unwrap();
    thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(holder).unwrap() - before;
    assert!(
        used < 20,
        "the holder used {used} ticks of CPU in 2 s while it could not accept"
    );
    set_soft_nofile(holder, 1024);
    drop(waiting);
    a_s_disk_comes_back(&dir);
}

/// A connection to the process keeping a disk that trickles its request
/// a byte at a time is dropped a second after it connected, however
/// often bytes come: the holder reads one connection at a time, so each
/// such connection delays a real reconnect. Before, each byte restarted
/// the 1 s read timeout. The client still gets its disk afterwards.
#[test]
fn a_trickling_connection_to_a_holder_is_dropped_in_time() {
    require(&["python3-nbd", "mkfs.ext4"]);
    let dir = TestDir::new("reconnect-trickle");
    let (_server, meet) = server(&dir, "30", &["64M"]);
    let mut s = UnixStream::connect(drop_a_client(&dir, &meet)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(250)))
        .unwrap();
    let start = std::time::Instant::now();
    let mut closed = None;
    while start.elapsed() < Duration::from_secs(5) {
        if std::io::Write::write_all(&mut s, b"x").is_err() {
            closed = Some(start.elapsed());
            break;
        }
        let mut b = [0u8; 1];
        match std::io::Read::read(&mut s, &mut b) {
            Ok(0) => {
                closed = Some(start.elapsed());
                break;
            }
            Ok(_) => panic!("the holder answered a trickle"),
            Err(_) => {} // nothing yet: the next byte
        }
    }
    let closed = closed.expect("the holder kept a trickling connection 5 s");
    assert!(
        closed < Duration::from_millis(2500),
        "the holder dropped a trickling connection after {closed:?}"
    );
    a_s_disk_comes_back(&dir);
}

/// Client A names its disk with TOKEN, writes "written by A" at 1 MiB and
/// dies without NBD_CMD_DISC; returns the socket of the process keeping
/// its disk (the one name in `meet`).
fn drop_a_client(dir: &TestDir, meet: &Path) -> PathBuf {
    let a = client(
        &uri(dir, &format!(":id={TOKEN}")),
        1 << 20,
        "written by A",
        true,
    );
    assert!(a.status.success(), "{a}");
    let names = wait_until("the holder's name", Duration::from_secs(10), || {
        let n = dir_entries(meet);
        (n.len() == 1).then_some(n)
    });
    meet.join(&names[0])
}

/// A reconnect with TOKEN gets the disk [`drop_a_client`] left.
fn a_s_disk_comes_back(dir: &TestDir) {
    let b = client(&uri(dir, &format!(":id={TOKEN}")), 1 << 20, "", false);
    assert_eq!(read_line(&b), hex16("written by A"), "{b}");
}

#[test]
fn the_grace_running_out_ends_the_disk_for_good() {
    require(&["python3-nbd", "mkfs.ext4"]);
    let dir = TestDir::new("reconnect-grace");
    let (mut server, _) = server(&dir, "1", &["64M"]);
    let name = format!(":id={TOKEN}");
    client(&uri(&dir, &name), 0, "lost", true);
    wait_no_image_holders(server.images(), "after the grace period");
    assert_dir_empty(server.images(), "after the grace period");
    // A late reconnect is refused: never a fresh disk under its name.
    let late = client(&uri(&dir, &name), 0, "", false);
    assert!(
        !late.status.success() && late.stderr.contains("no export named"),
        "{late}"
    );
    server.proc.wait_stderr(
        "no reconnect within the grace period",
        Duration::from_secs(10),
    );
}

#[test]
fn a_killed_waiting_process_leaves_nothing() {
    require(&["python3-nbd", "mkfs.ext4"]);
    let dir = TestDir::new("reconnect-kill");
    let (server, _) = server(&dir, "60", &["64M"]);
    let name = format!(":id={TOKEN}");
    client(&uri(&dir, &name), 0, "killed", true);
    let holders = wait_image_holders(server.images(), 1, "the waiting process");
    send_signal(holders[0], libc::SIGKILL);
    wait_no_image_holders(server.images(), "after SIGKILL of the waiting process");
    assert_dir_empty(server.images(), "after SIGKILL of the waiting process");
    let late = client(&uri(&dir, &name), 0, "", false);
    assert!(
        !late.status.success() && late.stderr.contains("no export named"),
        "{late}"
    );
}

#[test]
fn tokens_are_checked_and_need_a_grace_period() {
    require(&["python3-nbd", "mkfs.ext4"]);
    let dir = TestDir::new("reconnect-tokens");
    let (mut server, _) = server(&dir, "0", &["64M"]);
    let script = r#"
h = nbd.NBD()
try:
    h.connect_uri(sys.argv[1])
    print("connected")
except nbd.Error as e:
    print("refused", e)
"#;
    let out = run_ok(
        "grace 0",
        python(script, &[uri(&dir, &format!(":id={TOKEN}"))]),
    );
    assert!(out.stdout.starts_with("refused"), "{out}");
    server
        .proc
        .wait_stderr("reconnects are off", Duration::from_secs(10));
    drop(server);
    let dir = TestDir::new("reconnect-short");
    let (server, _) = self::server(&dir, "10", &["64M"]);
    for token in ["short", &"ab".repeat(20)] {
        let mut s = UnixStream::connect(dir.join("nbd.sock")).unwrap();
        nbdraw::handshake(&mut s).unwrap();
        match nbdraw::opt_go_name(&mut s, format!(":id={token}").as_bytes()).unwrap() {
            nbdraw::GoReply::Err { message, .. } => {
                assert!(
                    message.contains("at least 32 characters"),
                    "{token}: {message}"
                )
            }
            other => panic!("{token}: {other:?}"),
        }
    }
    assert_dir_empty(server.images(), "after refused tokens");
}

// --- qemu through a relay -----------------------------------------------------------

#[test]
fn qemu_reconnects_through_a_cut_relay_and_keeps_its_data() {
    require(&["qemu-io", "mkfs.ext4"]);
    let dir = TestDir::new("reconnect-qemu");
    let (mut server, _) = server(&dir, "30", &["64M"]);
    let relay = Relay::start("127.0.0.1:0", Upstream::Unix(dir.join("nbd.sock")));
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=:id={TOKEN},reconnect-delay=20",
        relay.port
    );
    let mut qemu = Proc::spawn(
        "qemu-io",
        cmd(
            "qemu-io",
            &[
                "--image-opts",
                &opts,
                "-c",
                "write -P 0x5a 4M 1M",
                "-c",
                "sleep 3000",
                "-c",
                "read -P 0x5a 4M 1M",
                "-c",
                "write -P 0xa5 8M 64k",
                "-c",
                "read -P 0xa5 8M 64k",
            ],
        ),
    );
    // Cut while qemu sleeps between its write and its read: its one
    // connection is up, and the write (a few ms) is done a second later.
    wait_until("qemu's connection", Duration::from_secs(20), || {
        (relay.connections() > 0).then_some(())
    });
    thread::sleep(Duration::from_secs(1));
    assert_eq!(relay.cut(), 1, "one connection through the relay");
    let status = qemu.wait();
    let out = qemu.stdout();
    assert!(status.success(), "{}", qemu.describe());
    assert!(
        !out.contains("Pattern verification failed") && out.matches("read ").count() == 2,
        "qemu reads back what it wrote before the cut:\n{out}"
    );
    server
        .proc
        .wait_stderr("client reconnected to its disk", Duration::from_secs(10));
    wait_no_image_holders(server.images(), "after qemu-io");
}

#[test]
fn a_disk_reconnects_only_to_the_same_tls_identity() {
    require(&["python3-nbd", "mkfs.ext4"]);
    crate::common::pki::require_openssl();
    let dir = TestDir::new("reconnect-tls");
    let pki = crate::common::pki::pki(&dir);
    let meet = dir.join("meet");
    let server = Server::start(
        &dir,
        Mode::Tcp,
        &[
            "--tls",
            "on",
            "--tls-certificates",
            pki.server.to_str().unwrap(),
            "--tls-verify-peer",
            "--reconnect-dir",
            meet.to_str().unwrap(),
            "64M",
        ],
        &[],
    );
    let port = server.uri().rsplit(':').next().unwrap().to_string();
    let name = format!(":id={TOKEN}");
    let tls = format!(
        "nbds://localhost:{port}/{name}?tls-certificates={}",
        pki.client.display()
    );
    let plain = format!("nbd://127.0.0.1:{port}/{name}");
    let a = client(&tls, 0, "certified", true);
    assert!(a.status.success(), "{a}");
    // The same token without the certificate: another identity, another
    // key: a fresh disk, and no hint.
    let b = client(&plain, 0, "", false);
    assert_eq!(read_line(&b), "0".repeat(32), "{b}");
    // The certificate's holder gets its disk.
    let c = client(&tls, 0, "", false);
    assert_eq!(read_line(&c), hex16("certified"), "{c}");
    wait_no_image_holders(server.images(), "after the TLS clients");
}

//! The PROXY protocol (`--proxy-protocol --proxy-from ADDRS`): a balancer
//! in the list sends a header first, and the client's address from it is
//! the one logged; anyone else sending one, a listed balancer not sending
//! one, and bad headers are dropped with a log line, before any disk is
//! made. Real HAProxy (Debian's package) in front, with send-proxy-v2 and
//! send-proxy, and raw clients for what HAProxy never sends.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use crate::common::nbdraw::{self, GoReply};
use crate::common::*;

const SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

fn v2_tcp4(src: [u8; 4], sport: u16) -> Vec<u8> {
    let mut v = SIG.to_vec();
    v.extend_from_slice(&[0x21, 0x11, 0, 12]);
    v.extend_from_slice(&src);
    v.extend_from_slice(&[10, 0, 0, 1]);
    v.extend_from_slice(&sport.to_be_bytes());
    v.extend_from_slice(&10809u16.to_be_bytes());
    v
}

fn tcp_server(dir: &TestDir, from: &str, more: &[&str]) -> Server {
    let mut args = vec![
        "--proxy-protocol",
        "--proxy-from",
        from,
        "--handshake-timeout",
        "3",
    ];
    args.extend_from_slice(more);
    args.push("64M");
    Server::start(dir, Mode::Tcp, &args, &[])
}

fn addr(server: &Server) -> String {
    server.uri().trim_start_matches("nbd://").to_string()
}

/// Connect, send `first`, then negotiate the default export: the reply.
fn go_after(server: &Server, first: &[u8]) -> std::io::Result<GoReply> {
    let mut s = TcpStream::connect(addr(server))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(first)?;
    nbdraw::handshake(&mut s)?;
    nbdraw::opt_go(&mut s)
}

#[test]
fn a_listed_balancer_names_the_client_in_v1_and_v2() {
    require(&["mkfs.ext4"]);
    let dir = TestDir::new("proxy-headers");
    let mut server = tcp_server(&dir, "127.0.0.1,2001:db8::5", &[]);
    let v1 = b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 10809\r\n";
    assert!(matches!(go_after(&server, v1), Ok(GoReply::Ok { .. })));
    server.proc.wait_stderr(
        "client served peer=192.0.2.7:51234",
        Duration::from_secs(10),
    );
    let v2 = v2_tcp4([198, 51, 100, 9], 4242);
    assert!(matches!(go_after(&server, &v2), Ok(GoReply::Ok { .. })));
    server.proc.wait_stderr(
        "client served peer=198.51.100.9:4242",
        Duration::from_secs(10),
    );
    // A LOCAL header (a health check) speaks for the balancer itself.
    let local = [SIG.as_slice(), &[0x20, 0x00, 0, 0]].concat();
    assert!(matches!(go_after(&server, &local), Ok(GoReply::Ok { .. })));
    server
        .proc
        .wait_stderr("client served peer=127.0.0.1:", Duration::from_secs(10));
}

#[test]
fn headers_from_the_wrong_peer_missing_or_bad_are_dropped() {
    let dir = TestDir::new("proxy-refusals");
    // 127.0.0.1 is not a balancer here: its header is refused.
    let mut other = tcp_server(&dir, "192.0.2.1", &[]);
    let got = go_after(&other, &v2_tcp4([198, 51, 100, 9], 4242));
    assert!(!matches!(got, Ok(GoReply::Ok { .. })), "{got:?}");
    other.proc.wait_stderr(
        "a PROXY protocol header from a peer that may not send one",
        Duration::from_secs(10),
    );
    drop(other);

    let dir = TestDir::new("proxy-bad");
    let mut server = tcp_server(&dir, "127.0.0.1", &[]);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n".to_vec(),
            "a bad port",
        ),
        (b"PROXY nonsense\r\n".to_vec(), "of the wrong form"),
        (
            [b"PROXY ".as_slice(), &[b'x'; 120]].concat(),
            "longer than 107",
        ),
        (
            [SIG.as_slice(), &[0x21, 0x11, 0xff, 0xff]].concat(),
            "more than 1024 bytes",
        ),
        (
            // 15 bytes after the fixed part: the addresses, then a TLV
            // that claims 9 bytes where none are left.
            [SIG.as_slice(), &[0x21, 0x11, 0, 15], &[0; 12], &[1, 0, 9]].concat(),
            "a TLV longer than the header",
        ),
        (
            b"GET / HTTP/1.0\r\n\r\n".to_vec(),
            "does not start with one",
        ),
    ];
    for (header, why) in &cases {
        // The header (with a wrong length, some of it) and then silence:
        // the server must give up, not wait for more than it was told.
        let mut s = TcpStream::connect(addr(&server)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(header);
        let mut greeting = [0u8; 18];
        assert!(
            std::io::Read::read_exact(&mut s, &mut greeting).is_err(),
            "{why}: no greeting after a bad header"
        );
        server.proc.wait_stderr(why, Duration::from_secs(10));
    }
    // Truncated: a part of a header, then the balancer hangs up. The
    // start-up probe (a connection that sends nothing) logged this line
    // already: a new one must come.
    let truncated = "the balancer closed the connection before a whole PROXY header";
    let before = server.proc.stderr().matches(truncated).count();
    let mut s = TcpStream::connect(addr(&server)).unwrap();
    s.write_all(&SIG[..8]).unwrap();
    drop(s);
    wait_until("a truncated header logged", Duration::from_secs(10), || {
        (server.proc.stderr().matches(truncated).count() > before).then_some(())
    });
    // A listed balancer that sends nothing: dropped after the timeout.
    let mut s = TcpStream::connect(addr(&server)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    assert!(std::io::Read::read_exact(&mut s, &mut greeting).is_err());
    server.proc.wait_stderr(
        "no PROXY header from the balancer within the handshake timeout",
        Duration::from_secs(10),
    );
    assert_dir_empty(server.images(), "after bad headers");
    assert!(
        !server.proc.stderr().contains("client served"),
        "{}",
        server.proc.describe()
    );
}

/// HAProxy in TCP mode in front of one tmpdisk, sending `send` (the
/// server option: send-proxy-v2 or send-proxy).
fn haproxy(dir: &TestDir, backend: &str, send: &str) -> (Proc, u16) {
    let port = free_port();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n    maxconn 200\n\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1m\n    timeout server 1m\n\n\
             frontend nbd\n    bind 127.0.0.1:{port}\n    default_backend tmpdisk\n\n\
             backend tmpdisk\n    server s1 {backend} {send}\n"
        ),
    )
    .unwrap();
    let check = run(
        "haproxy -c",
        cmd("haproxy", &["-c", "-f", cfg.to_str().unwrap()]),
    );
    assert!(check.status.success(), "{check}");
    let p = Proc::spawn(
        "haproxy",
        cmd("haproxy", &["-db", "-f", cfg.to_str().unwrap()]),
    );
    wait_until("haproxy to listen", Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
    });
    (p, port)
}

#[test]
fn through_haproxy_the_log_names_the_client_not_the_balancer() {
    require(&["haproxy", "nbdinfo", "mkfs.ext4"]);
    for send in ["send-proxy-v2", "send-proxy"] {
        let dir = TestDir::new(&format!("proxy-haproxy-{send}"));
        let mut server = tcp_server(&dir, "127.0.0.1", &[]);
        let (_haproxy, port) = haproxy(&dir, &addr(&server), send);
        // A real client through the balancer.
        let size = nbdinfo_ok(&["--size", &format!("nbd://127.0.0.1:{port}")]);
        assert_eq!(size.trim(), (64 * MIB).to_string(), "{send}");
        // A client whose own address we know: it is the one logged, not
        // the balancer's connection to tmpdisk.
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let me = s.local_addr().unwrap();
        nbdraw::handshake(&mut s).unwrap();
        assert!(matches!(nbdraw::opt_go(&mut s), Ok(GoReply::Ok { .. })));
        server.proc.wait_stderr(
            &format!("client served peer={me} "),
            Duration::from_secs(10),
        );
        drop(s);
        // HAProxy's own side of the connection never shows up as a peer.
        let log = server.proc.stderr();
        let served = served_lines(&log);
        assert_eq!(served.len(), 2, "{send}:\n{log}");
    }
}

#[test]
fn clients_behind_a_balancer_are_not_one_source() {
    require(&["mkfs.ext4"]);
    let dir = TestDir::new("proxy-sources");
    // One client per source, but the balancer is not a source: two of
    // its clients at once are both served.
    let server = tcp_server(&dir, "127.0.0.1", &["--max-connections-per-source", "1"]);
    let mut held = Vec::new();
    for (i, ip) in [[192, 0, 2, 7], [192, 0, 2, 8]].into_iter().enumerate() {
        let mut s = TcpStream::connect(addr(&server)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&v2_tcp4(ip, 4000 + i as u16)).unwrap();
        nbdraw::handshake(&mut s).unwrap();
        let got = nbdraw::opt_go(&mut s);
        assert!(matches!(got, Ok(GoReply::Ok { .. })), "client {i}: {got:?}");
        held.push(s);
    }
    drop(held);
}

//! nbd-persist: the userspace half of the Linux kernel's NBD client for a
//! connection that must survive network loss, which tests/heavy's guest
//! runs (tests/guest/init, step `persist`).
//!
//! Why this exists: the kernel can keep a device through a dead
//! connection (netlink `NBD_ATTR_DEAD_CONN_TIMEOUT`: I/O waits, then goes
//! to a socket given with `NBD_CMD_RECONFIGURE`), but no released
//! nbd-client drives it. Debian 12's 3.24 ignores `-persist` in netlink
//! mode and quits when the socket dies in ioctl mode; 3.27.1 parses
//! `-persist` into a field its netlink code never reads, and its
//! reconnect functions are never called. So the test drives the kernel
//! the way nbd-client would: connect and negotiate (fixed newstyle,
//! NBD_OPT_GO with the export name), `NBD_CMD_CONNECT` with the socket,
//! then wait on the `nbd_mc_group` multicast group for `NBD_CMD_LINK_DEAD`
//! and reconnect with the same export name.
//!
//!   nbd-persist HOST PORT EXPORT-NAME DEAD-TIMEOUT-SECS
//!
//! Connects /dev/nbd0 (index 0, 4096-byte blocks, a 5 s request timeout
//! after which the kernel requeues a request to the new socket), prints
//! `connected size=N` and then one line per event on stdout, and runs
//! until killed. Exit status 1 with a message if the first connection
//! cannot be made.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    socket,
};

// --- NBD negotiation (fixed newstyle) ---------------------------------------

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

/// A negotiated connection: the socket, the export's size and flags.
struct Negotiated {
    sock: TcpStream,
    size: u64,
    flags: u16,
}

fn err(what: String) -> std::io::Error {
    std::io::Error::other(what)
}

fn read_u64(s: &mut TcpStream) -> std::io::Result<u64> {
    let mut b = [0; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn read_u32(s: &mut TcpStream) -> std::io::Result<u32> {
    let mut b = [0; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn negotiate(addr: &str, name: &str) -> std::io::Result<Negotiated> {
    let to = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| err(format!("{addr}: no address")))?;
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_nodelay(true)?;
    if read_u64(&mut s)? != NBDMAGIC || read_u64(&mut s)? != IHAVEOPT {
        return Err(err("not a fixed-newstyle NBD server".into()));
    }
    let mut b = [0; 2];
    s.read_exact(&mut b)?;
    let server = u16::from_be_bytes(b);
    let client = u32::from(server & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    s.write_all(&client.to_be_bytes())?;
    let mut opt = Vec::new();
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&OPT_GO.to_be_bytes());
    opt.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name.as_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt)?;
    let mut export = None;
    loop {
        if read_u64(&mut s)? != REPLY_MAGIC || read_u32(&mut s)? != OPT_GO {
            return Err(err("a bad option reply".into()));
        }
        let kind = read_u32(&mut s)?;
        let len = read_u32(&mut s)?;
        if len > 65536 {
            return Err(err(format!("an option reply of {len} bytes")));
        }
        let mut payload = vec![0; len as usize];
        s.read_exact(&mut payload)?;
        match kind {
            REP_ACK => break,
            REP_INFO if payload.len() >= 12 && payload[..2] == INFO_EXPORT.to_be_bytes() => {
                let size = u64::from_be_bytes(payload[2..10].try_into().unwrap_or_default());
                let flags = u16::from_be_bytes([payload[10], payload[11]]);
                export = Some((size, flags));
            }
            REP_INFO => {}
            k if k & 0x8000_0000 != 0 => {
                return Err(err(format!(
                    "refused ({k:#x}): {}",
                    String::from_utf8_lossy(&payload)
                )));
            }
            k => return Err(err(format!("an unexpected option reply {k:#x}"))),
        }
    }
    let (size, flags) =
        export.ok_or_else(|| err("GO acknowledged without the export's size".into()))?;
    s.set_read_timeout(None)?;
    Ok(Negotiated {
        sock: s,
        size,
        flags,
    })
}

// --- generic netlink -------------------------------------------------------

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const SOL_NETLINK: i32 = 270;
const NETLINK_ADD_MEMBERSHIP: i32 = 1;

// linux/nbd-netlink.h
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_RECONFIGURE: u8 = 3;
const NBD_CMD_LINK_DEAD: u8 = 4;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

/// One netlink attribute, padded to 4 bytes.
fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(4 + payload.len() + 3);
    a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    a.extend_from_slice(&kind.to_ne_bytes());
    a.extend_from_slice(payload);
    while a.len() % 4 != 0 {
        a.push(0);
    }
    a
}

/// The attributes in `buf`: (type without flags, payload).
fn attrs(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            break;
        }
        out.push((kind, &buf[4..len]));
        buf = &buf[len.div_ceil(4) * 4..];
        if buf.len() < 4 {
            break;
        }
    }
    out
}

struct Genl {
    sock: OwnedFd,
    seq: u32,
}

impl Genl {
    fn open() -> std::io::Result<Genl> {
        let sock = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkGeneric,
        )?;
        bind(sock.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        Ok(Genl { sock, seq: 1 })
    }

    /// Send one generic netlink request and return the messages that
    /// answer it (payloads after the genl header), checking the ACK.
    fn request(&mut self, family: u16, cmd: u8, body: &[u8]) -> std::io::Result<Vec<Vec<u8>>> {
        self.seq += 1;
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + 4 + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&family.to_ne_bytes());
        m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        m.extend_from_slice(&self.seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[cmd, 1, 0, 0]);
        m.extend_from_slice(body);
        send(self.sock.as_raw_fd(), &m, MsgFlags::empty())?;
        let mut answers = Vec::new();
        loop {
            for (kind, seq, payload) in self.receive()? {
                if seq != self.seq {
                    continue;
                }
                if kind == NLMSG_ERROR {
                    let code = i32::from_ne_bytes(payload[..4].try_into().unwrap_or_default());
                    if code == 0 {
                        return Ok(answers);
                    }
                    return Err(std::io::Error::from_raw_os_error(-code));
                }
                answers.push(payload.get(4..).unwrap_or_default().to_vec());
            }
        }
    }

    /// The messages of one datagram: (type, seq, payload after nlmsghdr).
    fn receive(&self) -> std::io::Result<Vec<(u16, u32, Vec<u8>)>> {
        let mut buf = vec![0u8; 65536];
        let n = recv(self.sock.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        let mut out = Vec::new();
        let mut b = &buf[..n];
        while b.len() >= 16 {
            let len = u32::from_ne_bytes(b[..4].try_into().unwrap_or_default()) as usize;
            if len < 16 || len > b.len() {
                break;
            }
            let kind = u16::from_ne_bytes([b[4], b[5]]);
            let seq = u32::from_ne_bytes(b[8..12].try_into().unwrap_or_default());
            out.push((kind, seq, b[16..len].to_vec()));
            b = &b[len.div_ceil(4) * 4..];
        }
        Ok(out)
    }

    /// The nbd family's id and its multicast group's id.
    fn nbd_family(&mut self) -> std::io::Result<(u16, u32)> {
        let body = attr(CTRL_ATTR_FAMILY_NAME, b"nbd\0");
        let answers = self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, &body)?;
        let mut family = None;
        let mut group = None;
        for a in &answers {
            for (kind, p) in attrs(a) {
                match kind {
                    CTRL_ATTR_FAMILY_ID if p.len() >= 2 => {
                        family = Some(u16::from_ne_bytes([p[0], p[1]]))
                    }
                    CTRL_ATTR_MCAST_GROUPS => {
                        for (_, g) in attrs(p) {
                            let fields = attrs(g);
                            let named = fields.iter().any(|(k, v)| {
                                *k == CTRL_ATTR_MCAST_GRP_NAME && v.starts_with(b"nbd_mc_group")
                            });
                            let id = fields
                                .iter()
                                .find(|(k, v)| *k == CTRL_ATTR_MCAST_GRP_ID && v.len() >= 4);
                            if let (true, Some((_, id))) = (named, id) {
                                group = Some(u32::from_ne_bytes([id[0], id[1], id[2], id[3]]));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        match (family, group) {
            (Some(f), Some(g)) => Ok((f, g)),
            _ => Err(err(
                "the kernel has no nbd netlink family (is nbd loaded?)".into()
            )),
        }
    }

    fn join(&self, group: u32) -> std::io::Result<()> {
        // SAFETY: setsockopt reads one u32 from a live stack variable whose
        // size is passed.
        let rc = unsafe {
            libc::setsockopt(
                self.sock.as_raw_fd(),
                SOL_NETLINK,
                NETLINK_ADD_MEMBERSHIP,
                (&group as *const u32).cast(),
                4,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

fn sockets(fd: i32) -> Vec<u8> {
    attr(
        NBD_ATTR_SOCKETS,
        &attr(
            NBD_SOCK_ITEM,
            &attr(NBD_SOCK_FD, &(fd as u32).to_ne_bytes()),
        ),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: nbd-persist HOST PORT EXPORT-NAME DEAD-TIMEOUT-SECS");
        std::process::exit(2);
    }
    let addr = format!("{}:{}", args[1], args[2]);
    let name = &args[3];
    let dead: u64 = args[4].parse().unwrap_or(30);
    let fail = |what: &str, e: std::io::Error| -> ! {
        println!("failed: {what}: {e}");
        std::process::exit(1)
    };
    let mut genl = Genl::open().unwrap_or_else(|e| fail("netlink socket", e));
    let (family, group) = genl.nbd_family().unwrap_or_else(|e| fail("nbd family", e));
    let events = Genl::open().unwrap_or_else(|e| fail("netlink socket", e));
    events
        .join(group)
        .unwrap_or_else(|e| fail("joining nbd_mc_group", e));

    let first = negotiate(&addr, name).unwrap_or_else(|e| fail("negotiating", e));
    let mut body = attr(NBD_ATTR_INDEX, &0u32.to_ne_bytes());
    body.extend(attr(NBD_ATTR_SIZE_BYTES, &first.size.to_ne_bytes()));
    body.extend(attr(NBD_ATTR_BLOCK_SIZE_BYTES, &4096u64.to_ne_bytes()));
    body.extend(attr(NBD_ATTR_TIMEOUT, &5u64.to_ne_bytes()));
    body.extend(attr(
        NBD_ATTR_SERVER_FLAGS,
        &u64::from(first.flags).to_ne_bytes(),
    ));
    body.extend(attr(NBD_ATTR_DEAD_CONN_TIMEOUT, &dead.to_ne_bytes()));
    body.extend(sockets(first.sock.as_raw_fd()));
    genl.request(family, NBD_CMD_CONNECT, &body)
        .unwrap_or_else(|e| fail("NBD_CMD_CONNECT", e));
    // The kernel holds its own reference to the socket now.
    drop(first.sock);
    println!("connected size={}", first.size);
    let _ = std::io::stdout().flush();

    loop {
        let msgs = match events.receive() {
            Ok(m) => m,
            Err(e) => {
                println!("event socket: {e}");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        for (kind, _, payload) in msgs {
            if kind != family || payload.first() != Some(&NBD_CMD_LINK_DEAD) {
                continue;
            }
            let index = attrs(payload.get(4..).unwrap_or_default())
                .into_iter()
                .find(|(k, p)| *k == NBD_ATTR_INDEX && p.len() >= 4)
                .map(|(_, p)| u32::from_ne_bytes([p[0], p[1], p[2], p[3]]));
            if index != Some(0) {
                continue;
            }
            println!("link dead");
            let _ = std::io::stdout().flush();
            let t = Instant::now();
            let mut attempts = 0;
            let mut last = String::new();
            loop {
                attempts += 1;
                match negotiate(&addr, name) {
                    Ok(n) => {
                        let mut body = attr(NBD_ATTR_INDEX, &0u32.to_ne_bytes());
                        body.extend(sockets(n.sock.as_raw_fd()));
                        match genl.request(family, NBD_CMD_RECONFIGURE, &body) {
                            Ok(_) => println!(
                                "reconnected after {:.1} s, attempt {attempts}, size={}",
                                t.elapsed().as_secs_f64(),
                                n.size
                            ),
                            Err(e) => println!("NBD_CMD_RECONFIGURE: {e}"),
                        }
                        break;
                    }
                    Err(e) if t.elapsed() > Duration::from_secs(dead) => {
                        println!("gave up after {attempts} attempts: {e}");
                        break;
                    }
                    Err(e) => {
                        // Each new reason once (an outage, then a refusal).
                        let why = e.to_string();
                        if why != last {
                            println!("attempt {attempts}: {why}");
                            last = why;
                        }
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }
            }
            let _ = std::io::stdout().flush();
        }
    }
}

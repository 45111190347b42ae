//! Many machines: three tmpdisk hosts (socket-activated on loopback ports
//! by systemd-socket-activate --accept, a process per connection as
//! tmpdisk.socket does, each with its own tmpdir, registry and capacity
//! agent) behind
//! Debian's HAProxy running the README's haproxy.cfg, and 60 and more
//! real NBD clients (raw protocol: handshake, GO, reads and writes)
//! through it. What is checked is what the README promises: distinct
//! fresh disks spread by leastconn, the clients' own addresses in the
//! hosts' logs (PROXY v2), a filled host drained by its agent within two
//! agent intervals, a killed host's clients cut off and nobody else's,
//! the agent's answer against the host's measured free space, and
//! clients turned away before the greeting when every host is full.
//! (A PROXY header from an unlisted address: tests/proxy.rs.)

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::nbdraw::{self, Framing, GoReply, Reply};
use crate::common::*;

const SIZE: u64 = 16 * MIB;
const SIZE_ARG: &str = "16M";
/// Every host's --max-connections (the agent's slots).
const SLOTS: u64 = 40;
/// The README's agent-inter.
const AGENT_INTER: Duration = Duration::from_secs(2);

/// One tmpdisk host: the NBD listener and its capacity agent.
struct Host {
    name: String,
    server: Server,
    agent: Proc,
    agent_port: u16,
    tmpdir: PathBuf,
    registry: PathBuf,
}

impl Host {
    fn start(dir: &TestDir, name: &str, tmpdir: &Path) -> Host {
        let registry = dir.join(&format!("{name}-registry"));
        let reg = registry.to_str().unwrap();
        let slots = SLOTS.to_string();
        let server = Server::start_in(
            dir,
            Mode::SocketActivate,
            tmpdir,
            &[
                "--registry-dir",
                reg,
                "--proxy-protocol",
                "--proxy-from",
                "127.0.0.1",
                "--max-connections",
                &slots,
                SIZE_ARG,
            ],
            &[],
        );
        let agent_port = free_port();
        let addr = format!("127.0.0.1:{agent_port}");
        let agent = Proc::spawn(
            &format!("{name} agent"),
            tmpdisk_cmd(&[
                "--agent",
                "--listen",
                &addr,
                "--tmpdir",
                tmpdir.to_str().unwrap(),
                "--registry-dir",
                reg,
                "--max-connections",
                &slots,
                SIZE_ARG,
            ]),
        );
        wait_until(
            &format!("{name}'s agent to listen"),
            Duration::from_secs(10),
            || TcpStream::connect(&addr).ok().map(|_| ()),
        );
        Host {
            name: name.into(),
            server,
            agent,
            agent_port,
            tmpdir: tmpdir.to_path_buf(),
            registry,
        }
    }

    fn nbd_port(&self) -> u16 {
        self.server
            .uri()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// The agent's answer, asked directly.
    fn ask(&self) -> String {
        let mut line = String::new();
        TcpStream::connect(("127.0.0.1", self.agent_port))
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                s.read_to_string(&mut line)
            })
            .unwrap_or_else(|e| panic!("{}'s agent: {e}", self.name));
        line
    }

    /// The clients this host served, by the address its log names.
    fn served(&self) -> BTreeSet<String> {
        served_lines(&self.server.proc.stderr())
            .into_iter()
            .filter_map(|l| l.split("peer=").nth(1))
            .filter_map(|r| r.split_whitespace().next())
            .map(String::from)
            .collect()
    }
}

/// A client holding its disk through the balancer.
struct Client {
    s: TcpStream,
    me: SocketAddr,
    /// The ext4 filesystem UUID its fresh disk came with.
    uuid: [u8; 16],
    marker: Vec<u8>,
}

impl Client {
    /// Connect, GO, check a fresh ext4 and write a marker of its own at
    /// the end of the disk.
    fn connect(port: u16, n: usize) -> std::io::Result<Client> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let me = s.local_addr()?;
        nbdraw::handshake(&mut s)?;
        match nbdraw::opt_go(&mut s)? {
            GoReply::Ok { size, .. } if size == SIZE => {}
            other => return Err(std::io::Error::other(format!("GO: {other:?}"))),
        }
        let mut c = Client {
            s,
            me,
            uuid: [0; 16],
            marker: format!("client {n} was here\n").repeat(400).into_bytes()[..4096].to_vec(),
        };
        let sb = c.read(1024, 1024)?;
        if sb[56..58] != [0x53, 0xef] {
            return Err(std::io::Error::other("no ext4 superblock"));
        }
        c.uuid.copy_from_slice(&sb[104..120]);
        let marker = c.marker.clone();
        c.write(SIZE - 4096, &marker)?;
        c.check()?;
        Ok(c)
    }

    fn read(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let req = nbdraw::request(
            Framing::Simple,
            0,
            nbdraw::CMD_READ,
            1,
            offset,
            len as u64,
            &[],
        );
        self.s.write_all(&req)?;
        match nbdraw::read_reply(&mut self.s, Framing::Simple, Some(len))? {
            Reply::Simple { error: 0, data, .. } => Ok(data),
            r => Err(std::io::Error::other(format!("READ: {r:?}"))),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let req = nbdraw::request(
            Framing::Simple,
            0,
            nbdraw::CMD_WRITE,
            2,
            offset,
            data.len() as u64,
            data,
        );
        self.s.write_all(&req)?;
        match nbdraw::read_reply(&mut self.s, Framing::Simple, None)? {
            Reply::Simple { error: 0, .. } => Ok(()),
            r => Err(std::io::Error::other(format!("WRITE: {r:?}"))),
        }
    }

    /// Its marker reads back: the disk is still its own and still there.
    fn check(&mut self) -> std::io::Result<()> {
        let got = self.read(SIZE - 4096, 4096)?;
        if got != self.marker {
            return Err(std::io::Error::other("the marker does not read back"));
        }
        Ok(())
    }
}

/// `count` clients at once through the balancer on `port`.
fn connect_many(port: u16, first: usize, count: usize) -> Vec<Client> {
    let threads: Vec<_> = (first..first + count)
        .map(|n| thread::spawn(move || Client::connect(port, n)))
        .collect();
    threads
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.join()
                .unwrap()
                .unwrap_or_else(|e| panic!("client {}: {e}", first + i))
        })
        .collect()
}

/// The README's haproxy.cfg, with this test's addresses and an admin
/// socket to read the servers' state from.
fn haproxy_config(port: u16, hosts: &[&Host], admin: &Path) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let block = readme
        .split("```haproxy\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the README has a ```haproxy block");
    let mut servers = 0;
    let mut out = String::new();
    for line in block.lines() {
        let t = line.trim_start();
        if t.starts_with("server ") {
            // One of ours per README server line.
            let h = hosts.get(servers).expect("three server lines");
            out.push_str(&format!(
                "    server {} 127.0.0.1:{} agent-port {}\n",
                h.name,
                h.nbd_port(),
                h.agent_port
            ));
            servers += 1;
        } else if t == "bind :10809" {
            out.push_str(&format!("    bind 127.0.0.1:{port}\n"));
        } else {
            out.push_str(line);
            out.push('\n');
            if t == "global" {
                out.push_str(&format!(
                    "    stats socket {} mode 600 level admin\n",
                    admin.display()
                ));
            }
        }
    }
    assert_eq!(servers, hosts.len(), "server lines in the README's config");
    assert!(out.contains(&format!("bind 127.0.0.1:{port}")), "{out}");
    out
}

/// (status, weight) of each server, from HAProxy's `show stat`.
fn server_states(admin: &Path) -> BTreeMap<String, (String, String)> {
    let mut s = UnixStream::connect(admin).expect("haproxy's admin socket");
    s.write_all(b"show stat\n").unwrap();
    let mut csv = String::new();
    s.read_to_string(&mut csv).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .trim_start_matches("# ")
        .split(',')
        .collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (sv, status, weight) = (col("svname"), col("status"), col("weight"));
    lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.len() > weight && f[sv] != "FRONTEND" && f[sv] != "BACKEND")
        .map(|f| {
            (
                f[sv].to_string(),
                (f[status].to_string(), f[weight].to_string()),
            )
        })
        .collect()
}

/// What the agent must answer for `host`, from its tmpdir's free space
/// as statvfs reports it and the registry's live entries (the same
/// arithmetic as the README states it, done here independently).
fn expected_answer(host: &Host) -> String {
    let free = statfs_bytes(&host.tmpdir, "%a");
    let total = statfs_bytes(&host.tmpdir, "%b");
    let reserve = total * 5 / 100;
    let mut clients = 0u64;
    let mut outstanding = 0u64;
    for entry in std::fs::read_dir(&host.registry).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let v: Vec<u64> = text
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        clients += 1;
        outstanding += v[0].saturating_sub(v[1]);
    }
    let room = free.saturating_sub(reserve).saturating_sub(outstanding);
    let more = (room / SIZE).min(SLOTS - clients);
    match more {
        0 => "drain\n".into(),
        m => format!(
            "ready {}% maxconn:{}\n",
            (m * 100).div_ceil(SLOTS),
            clients + m
        ),
    }
}

/// Fill a host's tmpdir to its last 4 MiB, below any --min-free here.
fn fill(fs: &Mount) {
    let filler = fs.path().join("filler");
    let size = (fs.free() - 4 * MIB).to_string();
    run_ok(
        "fallocate",
        cmd("fallocate", &["-l", &size, filler.to_str().unwrap()]),
    );
}

#[test]
fn three_hosts_behind_haproxy_with_their_agents() {
    require(&["haproxy", "mkfs.ext4"]);
    require_root("it mounts tmpfs tmpdirs it can fill");
    let dir = TestDir::new("balancer");
    // host1 and host3 on tmpfs of their own (measurable, fillable); host2
    // on the tests' filesystem.
    let fs1 = Mount::tmpfs(&dir.join("host1-tmp"), 1024);
    let fs3 = Mount::tmpfs(&dir.join("host3-tmp"), 1024);
    let h1 = Host::start(&dir, "host1", fs1.path());
    let h2 = Host::start(&dir, "host2", &dir.subdir("host2-tmp"));
    let h3 = Host::start(&dir, "host3", fs3.path());
    let port = free_port();
    let admin = dir.join("haproxy.sock");
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, haproxy_config(port, &[&h1, &h2, &h3], &admin)).unwrap();
    let check = run(
        "haproxy -c",
        cmd("haproxy", &["-c", "-f", cfg.to_str().unwrap()]),
    );
    assert!(check.status.success(), "{check}");
    let mut haproxy = Proc::spawn(
        "haproxy",
        cmd("haproxy", &["-db", "-f", cfg.to_str().unwrap()]),
    );
    // Every host up, and its agent heard (weight 100: "ready 100%").
    let up = Instant::now();
    loop {
        let st = UnixStream::connect(&admin)
            .ok()
            .map(|_| server_states(&admin));
        let all_up = |st: &BTreeMap<String, (String, String)>| {
            st.len() == 3 && st.values().all(|(s, w)| s == "UP" && w == "100")
        };
        if st.as_ref().is_some_and(all_up) {
            break;
        }
        assert!(
            up.elapsed() < Duration::from_secs(20),
            "three hosts up at full weight: {st:?}\n{}",
            haproxy.describe()
        );
        thread::sleep(Duration::from_millis(100));
    }

    // 60 clients at once: distinct fresh disks, spread by leastconn, each
    // logged by its own address.
    let mut clients = connect_many(port, 0, 60);
    let uuids: BTreeSet<[u8; 16]> = clients.iter().map(|c| c.uuid).collect();
    assert_eq!(uuids.len(), 60, "60 freshly made filesystems");
    let hosts = [&h1, &h2, &h3];
    let where_is = |c: &Client| -> Vec<&str> {
        hosts
            .iter()
            .filter(|h| h.served().contains(&c.me.to_string()))
            .map(|h| h.name.as_str())
            .collect()
    };
    let mut on: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, c) in clients.iter().enumerate() {
        let w = where_is(c);
        assert_eq!(
            w.len(),
            1,
            "client {i} ({}) must be logged by its own address on one host: {w:?}",
            c.me
        );
        on.entry(w[0]).or_default().push(i);
    }
    let spread: Vec<usize> = hosts
        .iter()
        .map(|h| on.get(h.name.as_str()).map_or(0, Vec::len))
        .collect();
    assert!(
        spread.iter().all(|&n| n >= 15),
        "leastconn spreads 60 clients over 3 hosts: {spread:?}"
    );
    let logged: usize = hosts.iter().map(|h| h.served().len()).sum();
    assert_eq!(logged, 60, "no other peer (HAProxy's own) was served");

    // The agent against the host's measured free space and registry:
    // host3's clients are all registered, and with a 1 GiB tmpdir the
    // slots decide (20 of 40 left).
    let on3 = on.get("host3").map_or(0, Vec::len);
    assert_eq!(
        dir_entries(&h3.registry).len(),
        on3,
        "one registry entry per client on host3"
    );
    let answer = wait_until("host3's agent to match", Duration::from_secs(10), || {
        let (want, got) = (expected_answer(&h3), h3.ask());
        (want == got).then_some(got)
    });
    assert_eq!(
        answer,
        format!(
            "ready {}% maxconn:{SLOTS}\n",
            ((SLOTS - on3 as u64) * 100).div_ceil(SLOTS)
        )
    );
    // The connected disks' claims decide: with all but 150 MiB kept free,
    // what is left is less than they may still write (about 20 × 15 MiB),
    // and no new disk fits; expecting them to write a hundredth of that,
    // 9 do. Without the claims (a registry nobody wrote) both would say 9.
    let keep = (fs3.free() - 150 * MIB).to_string();
    let claims = |extra: &[&str]| {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut args = vec![
            "--agent",
            "--listen",
            &addr,
            "--tmpdir",
            fs3.path().to_str().unwrap(),
            "--registry-dir",
            h3.registry.to_str().unwrap(),
            "--min-free",
            &keep,
        ];
        args.extend_from_slice(extra);
        args.push(SIZE_ARG);
        let _agent = Proc::spawn("claims agent", tmpdisk_cmd(&args));
        wait_until("the claims agent", Duration::from_secs(10), || {
            let mut line = String::new();
            let mut s = TcpStream::connect(&addr).ok()?;
            s.read_to_string(&mut line).ok()?;
            Some(line)
        })
    };
    assert_eq!(claims(&[]), "drain\n", "the claims fill what is left");
    let overcommitted = claims(&["--overcommit", "100"]);
    assert!(
        overcommitted.starts_with("ready ") && overcommitted.ends_with(&format!(":{}\n", on3 + 9)),
        "overcommitted 100x: {overcommitted}"
    );

    // Fill host3's tmpdir: its agent drains it within two agent
    // intervals, and new clients go to the others without an error.
    fill(&fs3);
    let filled = Instant::now();
    assert_eq!(h3.ask(), "drain\n");
    wait_until("HAProxy to drain host3", Duration::from_secs(10), || {
        // "DRAIN (agent)"; the weight column keeps the last weight.
        let (status, _) = server_states(&admin).remove("host3")?;
        status.starts_with("DRAIN").then_some(())
    });
    let took = filled.elapsed();
    assert!(
        took <= AGENT_INTER * 2 + Duration::from_millis(500),
        "drained after {took:?}, more than two agent intervals"
    );
    let before3 = h3.served().len();
    clients.extend(connect_many(port, 60, 10));
    assert_eq!(h3.served().len(), before3, "no new client on the full host");

    // Kill host2 (listener, its clients' processes, its agent): its
    // clients see their connection end; everyone else's disk is intact;
    // new clients are still served.
    h2.server.proc.kill_group(libc::SIGKILL);
    h2.agent.kill_group(libc::SIGKILL);
    let (mut cut, mut fine) = (0, 0);
    for c in clients.iter_mut() {
        match (where_is(c)[0] == "host2", c.check()) {
            (true, Err(_)) => cut += 1,
            (false, Ok(())) => fine += 1,
            (on2, got) => panic!("client {} on host2: {on2}, check: {got:?}", c.me),
        }
    }
    assert_eq!(cut + fine, clients.len());
    assert!(cut >= 15, "host2's clients were cut off: {cut}");
    let late = connect_many(port, 70, 5);
    for c in &late {
        assert_eq!(where_is(c), ["host1"], "host3 is full, host2 dead");
    }

    // Every host full: host1's tmpdir too. A new client is turned away
    // before the greeting, and no disk is made anywhere.
    fill(&fs1);
    wait_until(
        "HAProxy to drain host1 too",
        Duration::from_secs(10),
        || {
            let st = server_states(&admin);
            ["host1", "host3"]
                .iter()
                .all(|h| st.get(*h).is_some_and(|(s, _)| s.starts_with("DRAIN")))
                .then_some(())
        },
    );
    let served = [h1.served().len(), h3.served().len()];
    let t = Instant::now();
    let refused = Client::connect(port, 99).err();
    // Closed before the greeting: not a host that greeted and then failed
    // to build a disk (that would be a GO error).
    assert!(
        refused.as_ref().is_some_and(|e| matches!(
            e.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
        )),
        "every host is full: turned away before the greeting, got {refused:?}"
    );
    assert!(
        haproxy.try_status().is_none(),
        "turned away by a running HAProxy\n{}",
        haproxy.describe()
    );
    let turned_away = t.elapsed();
    assert!(turned_away < Duration::from_secs(15), "{turned_away:?}");
    assert_eq!([h1.served().len(), h3.served().len()], served);
    eprintln!(
        "balancer: 60 clients spread {spread:?}; host3 drained {took:?} after its tmpdir \
         filled; killing host2 cut {cut} clients, {fine} others intact; every host full: \
         turned away in {turned_away:?}"
    );
    drop(late);
    drop(clients);
}

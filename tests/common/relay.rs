//! A TCP relay in front of a server whose connections a test can cut, as
//! a network outage would: both sides see their connection end. New
//! connections keep being relayed after a cut, or, for an outage that
//! lasts, are closed at once until it is over.

use std::io::Read;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Where a relay forwards to: a server's Unix socket.
#[derive(Clone)]
pub enum Upstream {
    Unix(PathBuf),
}

/// One relayed connection's upstream side.
enum Up {
    Unix(UnixStream),
}

impl Up {
    fn halves(&self) -> std::io::Result<(Box<dyn Read + Send>, Box<dyn std::io::Write + Send>)> {
        Ok(match self {
            Up::Unix(s) => (Box::new(s.try_clone()?), Box::new(s.try_clone()?)),
        })
    }
    fn shutdown(&self) {
        let _ = match self {
            Up::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

pub struct Relay {
    pub port: u16,
    live: Arc<Mutex<Vec<(TcpStream, Up)>>>,
    /// Until when new connections are closed at once.
    down_until: Arc<Mutex<Option<Instant>>>,
}

impl Relay {
    /// Listen on `bind` (port 0: any free one) and relay to `to`.
    pub fn start(bind: &str, to: Upstream) -> Relay {
        let listener = TcpListener::bind(bind).expect("relay: bind");
        let port = listener.local_addr().expect("relay: address").port();
        let live: Arc<Mutex<Vec<(TcpStream, Up)>>> = Arc::default();
        let held = live.clone();
        let down_until: Arc<Mutex<Option<Instant>>> = Arc::default();
        let down = down_until.clone();
        thread::spawn(move || {
            for c in listener.incoming() {
                let Ok(c) = c else { return };
                if down.lock().unwrap().is_some_and(|t| Instant::now() < t) {
                    let _ = c.shutdown(Shutdown::Both);
                    continue;
                }
                let up = match &to {
                    Upstream::Unix(p) => UnixStream::connect(p).map(Up::Unix),
                };
                let Ok(up) = up else { continue };
                let (Ok((up_r, up_w)), Ok(c_r), Ok(c_w)) =
                    (up.halves(), c.try_clone(), c.try_clone())
                else {
                    continue;
                };
                let pipe = |mut from: Box<dyn Read + Send>,
                            mut to: Box<dyn std::io::Write + Send>| {
                    thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                    })
                };
                pipe(Box::new(c_r), up_w);
                pipe(up_r, Box::new(c_w));
                held.lock().unwrap().push((c, up));
            }
        });
        Relay {
            port,
            live,
            down_until,
        }
    }

    /// An outage of `how_long`: every connection is cut now, and new ones
    /// are closed at once until it is over.
    pub fn outage(&self, how_long: Duration) -> usize {
        *self.down_until.lock().unwrap() = Some(Instant::now() + how_long);
        self.cut()
    }

    /// How many connections are relayed now.
    pub fn connections(&self) -> usize {
        self.live.lock().unwrap().len()
    }

    /// End every connection through the relay, both sides; returns how
    /// many there were.
    pub fn cut(&self) -> usize {
        let mut live = self.live.lock().unwrap();
        for (c, up) in live.iter() {
            let _ = c.shutdown(Shutdown::Both);
            up.shutdown();
        }
        let n = live.len();
        live.clear();
        n
    }
}

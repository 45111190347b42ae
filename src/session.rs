//! One client, start to finish: the serving path every activation mode
//! ends in. Negotiate (building the disk on the first INFO/GO), serve
//! requests until the client leaves, log what happened, and return the
//! exit code. The disk goes with the process.

use std::time::Instant;

use tracing::{debug, error, info, warn};

use crate::cli::{Config, human_size};
use std::sync::Arc;

use rustls::server::ServerConfig;

use crate::conn::{Conn, Transport};
use crate::image::Image;
use crate::mkfs;
use crate::nbd::error::Hangup;
use crate::nbd::negotiate::{self, Exports, Negotiated, OpenError, Outcome, Tls};
use crate::nbd::storage::Storage;
use crate::nbd::stream::Stream;
use crate::nbd::transmit::{self, End, Stats};
use crate::nbd::wire::REP_ERR_UNKNOWN;
use crate::tls::{self, TlsStream};
use crate::{sandbox, status, sys};

/// Exit codes (see `tmpdisk --help`).
pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILURE: u8 = 1;

/// Serve one client over `conn`; returns the process exit code. `tls` is
/// the loaded TLS configuration when TLS is on.
pub fn serve(mut conn: Conn, peer: String, cfg: &Config, tls: Option<&Arc<ServerConfig>>) -> u8 {
    let started = Instant::now();
    conn.set_wait_budget(cfg.handshake_timeout);
    let mut disk = Disk::new(cfg);
    let mut s = Stream::new(conn);
    debug!(%peer, "client connected");
    let policy = match (&cfg.tls, tls) {
        (Some(spec), Some(_)) if spec.require => Tls::Required,
        (Some(_), Some(_)) => Tls::Offered,
        _ => Tls::Unavailable,
    };
    let first = negotiate::handshake(&mut s).and_then(|no_zeroes| {
        negotiate::negotiate(&mut s, &mut disk, no_zeroes, policy).map(|o| (no_zeroes, o))
    });
    let ended = match first {
        Ok((_, Outcome::Go(n))) => {
            transmission(s, &n, &disk, &peer, None, started, cfg.reply_timeout)
        }
        Ok((no_zeroes, Outcome::StartTls)) => match starttls(s, tls) {
            Ok((mut s, subject)) => {
                // Everything negotiated before STARTTLS is forgotten: this
                // is a new round with fresh state (CVE-2021-3716).
                match negotiate::negotiate(&mut s, &mut disk, no_zeroes, Tls::Active) {
                    Ok(Outcome::Go(n)) => {
                        // Some("") for TLS without a client certificate.
                        let subject = Some(subject.unwrap_or_default());
                        transmission(s, &n, &disk, &peer, subject, started, cfg.reply_timeout)
                    }
                    Ok(_) => {
                        s.into_parts().map(|(mut t, _)| t.finish()).ok();
                        Ok(Left::Negotiating)
                    }
                    Err(h) => Err(h),
                }
            }
            Err(h) => Err(h),
        },
        Ok((_, Outcome::Abort)) => Ok(Left::Negotiating),
        Err(h) => Err(h),
    };
    match ended {
        Ok(Left::Negotiating) => {
            info!(%peer, "client left during negotiation");
            finish(&disk, None)
        }
        Ok(Left::Served) => finish(&disk, None),
        Err(h) => finish(&disk, Some((&peer, &h))),
    }
}

/// How a session that did not break ended.
enum Left {
    Negotiating,
    Served,
}

/// Upgrade to TLS after the client's STARTTLS was acknowledged.
fn starttls(
    s: Stream<Conn>,
    tls: Option<&Arc<ServerConfig>>,
) -> Result<(Stream<TlsStream>, Option<String>), Hangup> {
    let config = tls.ok_or_else(|| Hangup::Server("STARTTLS accepted without TLS".into()))?;
    let (conn, pipelined) = s.into_parts()?;
    if !pipelined.is_empty() {
        // Plaintext sent after STARTTLS could be injected by anyone on the
        // path; it must not be read as if it came through TLS.
        return Err(Hangup::Protocol(
            "data sent after NBD_OPT_STARTTLS before the TLS handshake".into(),
        ));
    }
    let t = tls::accept(conn, config.clone()).map_err(|e| match e.kind() {
        std::io::ErrorKind::TimedOut => Hangup::Timeout,
        _ => Hangup::Protocol(format!("TLS handshake failed: {e}")),
    })?;
    let subject = tls::peer_subject(&t);
    debug!(
        subject = subject.as_deref().unwrap_or("-"),
        "TLS established"
    );
    Ok((Stream::new(t), subject))
}

/// The transmission phase, over whichever transport negotiation ended on.
fn transmission<T: Transport>(
    mut s: Stream<T>,
    n: &Negotiated,
    disk: &Disk,
    peer: &str,
    // None for plaintext; the client certificate's subject (or "") for TLS.
    tls_subject: Option<String>,
    started: Instant,
    reply_timeout: Option<std::time::Duration>,
) -> Result<Left, Hangup> {
    let Some(image) = disk.image() else {
        // negotiate only returns Go after `open` succeeded.
        return Err(Hangup::Server("export chosen but no disk was built".into()));
    };
    if let Ok(t) = s.channel() {
        let c = t.conn();
        c.set_wait_budget(None);
        if let Err(e) = c.set_reply_timeout(reply_timeout) {
            warn!(error = %e, "cannot set the reply timeout");
        }
    }
    info!(
        %peer,
        export = %n.export_name,
        size = n.size,
        fs_type = %disk.kind(),
        mkfs_ms = disk.mkfs_ms,
        allocated = image.allocated(),
        structured = n.replies.structured(),
        tls = tls_subject.is_some(),
        tls_subject = tls_subject.as_deref().unwrap_or(""),
        "client served"
    );
    status::status(&format!("serving {peer}: {}", disk.description()));
    if let Err(e) = sandbox::lock_down() {
        warn!(error = %e, "serving without a seccomp filter");
    }

    let mut stats = Stats::default();
    let end = transmit::serve(&mut s, image, n, &mut stats);
    let seconds = started.elapsed().as_secs_f64();
    let how = match &end {
        Ok(End::Disconnect) => "disconnect".to_string(),
        Ok(End::Closed) => "closed".to_string(),
        Err(h) => h.to_string(),
    };
    info!(
        %peer,
        bytes_read = stats.bytes_read,
        bytes_written = stats.bytes_written,
        requests = stats.requests,
        disk_errors = stats.disk_errors,
        seconds = format!("{seconds:.3}"),
        end = %how,
        "client left"
    );
    if let Ok((mut t, _)) = s.into_parts() {
        t.finish();
    }
    end.map(|_| Left::Served)
}

/// Log how the session ended and pick the exit code: 1 when the server
/// failed (the disk could not be built or used), 0 otherwise, including
/// clients that misbehaved (logged as warnings, not our failure).
fn finish(disk: &Disk, hangup: Option<(&str, &Hangup)>) -> u8 {
    status::ready_before_exit("client left");
    if let Some((peer, h)) = hangup {
        match h {
            Hangup::Closed => debug!(%peer, "client closed the connection"),
            Hangup::Server(why) => error!(%peer, reason = %why, "cannot serve the client"),
            _ => warn!(%peer, reason = %h, "client dropped"),
        }
        if h.is_server_failure() {
            return EXIT_FAILURE;
        }
    }
    if disk.failed() { EXIT_FAILURE } else { EXIT_OK }
}

/// The client's disk: nothing until first asked for, then built once and
/// kept (or the reason it could not be built, told to every later ask).
struct Disk<'a> {
    cfg: &'a Config,
    state: State,
    mkfs_ms: u64,
}

enum State {
    Empty,
    Ready(Image),
    Failed(OpenError),
}

impl<'a> Disk<'a> {
    fn new(cfg: &'a Config) -> Self {
        Disk {
            cfg,
            state: State::Empty,
            mkfs_ms: 0,
        }
    }

    fn image(&self) -> Option<&Image> {
        match &self.state {
            State::Ready(i) => Some(i),
            _ => None,
        }
    }

    fn failed(&self) -> bool {
        matches!(self.state, State::Failed(_))
    }

    fn kind(&self) -> &str {
        match self.cfg.fs.command {
            Some(_) => "command",
            None => &self.cfg.fs.fs_type,
        }
    }

    fn build(&mut self) -> Result<Image, String> {
        let cfg = self.cfg;
        if let Some(limit) = sys::file_size_limit().filter(|&l| l < cfg.size) {
            return Err(format!(
                "disk size {} exceeds this process's file size limit (LimitFSIZE=) of {}",
                human_size(cfg.size),
                human_size(limit)
            ));
        }
        check_free_space(cfg)?;
        let (mut image, how) = Image::create(&cfg.tmpdir, cfg.size)
            .map_err(|e| format!("cannot create the disk in {}: {e}", cfg.tmpdir.display()))?;
        status::status(&format!("building {}", self.description()));
        let t = Instant::now();
        mkfs::run(&image, &cfg.fs, cfg.setup_timeout).map_err(|e| e.0)?;
        self.mkfs_ms = t.elapsed().as_millis() as u64;
        if cfg.fs.command.is_some() {
            // The command may have resized the file: serve what it made.
            image
                .refresh_size()
                .map_err(|e| format!("cannot stat the disk after the command: {e}"))?;
        }
        // Space mkfs reserved but left reading as zeroes (xfs's log) would
        // otherwise stay allocated for the client's whole session. A user's
        // --command may preallocate on purpose (so that the client never
        // meets ENOSPC): its image is left as it made it.
        if cfg.fs.command.is_none() {
            let t0 = Instant::now();
            match image.release_holes(RELEASE_SLACK) {
                Ok(freed) => debug!(
                    freed,
                    micros = t0.elapsed().as_micros() as u64,
                    "released unwritten space"
                ),
                Err(e) => warn!(error = %e, "cannot release the disk's unwritten space"),
            }
        }
        debug!(anonymity = ?how, mkfs_ms = self.mkfs_ms, "disk built");
        Ok(image)
    }
}

/// Space reserved beyond the data that is not worth a punch per hole after
/// mkfs (mke2fs leaves 64 KiB; mkfs.xfs leaves its whole log).
const RELEASE_SLACK: u64 = 1 << 20;

/// Admission control: refuse a new client while the tmpdir is short of
/// space (`--min-free`), before anything is created there.
fn check_free_space(cfg: &Config) -> Result<(), String> {
    let st = nix::sys::statvfs::statvfs(&cfg.tmpdir)
        .map_err(|e| format!("cannot check free space in {}: {e}", cfg.tmpdir.display()))?;
    let frsize = st.fragment_size() as u64;
    let free = (st.blocks_available() as u64).saturating_mul(frsize);
    let total = (st.blocks() as u64).saturating_mul(frsize);
    let need = cfg.min_free.bytes(total);
    if free < need {
        warn!(
            tmpdir = %cfg.tmpdir.display(),
            free,
            min_free = need,
            "refusing a client: not enough free space"
        );
        return Err(format!(
            "not enough free space for a new disk: {} free in {}, --min-free is {} ({}); try again later",
            human_size(free),
            cfg.tmpdir.display(),
            cfg.min_free,
            human_size(need)
        ));
    }
    Ok(())
}

impl Exports for Disk<'_> {
    fn open(&mut self, _pipelined: bool) -> Result<u64, OpenError> {
        if let State::Empty = self.state {
            self.state = match self.build() {
                Ok(image) => {
                    status::ready(&format!("ready: {}", self.description()));
                    State::Ready(image)
                }
                Err(message) => {
                    error!(reason = %message, "cannot build the disk");
                    State::Failed(OpenError {
                        reply: REP_ERR_UNKNOWN,
                        message,
                    })
                }
            };
        }
        match &self.state {
            State::Ready(image) => Ok(image.size()),
            State::Failed(e) => Err(e.clone()),
            State::Empty => unreachable!("built above"),
        }
    }

    fn description(&self) -> String {
        let size = human_size(self.image().map_or(self.cfg.size, Image::size));
        let label = match &self.cfg.fs.label {
            Some(l) => format!(" labelled {:?}", l.to_string_lossy()),
            None => String::new(),
        };
        match self.cfg.fs.command {
            Some(_) => format!("fresh {size} disk prepared by a command, per connection"),
            None => format!(
                "fresh {size} {}{label} disk per connection",
                self.cfg.fs.fs_type
            ),
        }
    }
}

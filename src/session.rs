//! One client, start to finish: the serving path every activation mode
//! ends in. Negotiate (the disk is built on the first INFO/GO), upgrade to
//! TLS when asked, serve requests until the client leaves, log what
//! happened, and return the exit code. The disk goes with the process.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::server::ServerConfig;
use tracing::{debug, error, info, warn};

use crate::cli::Config;
use crate::conn::{Conn, Transport};
use crate::disk::Disk;
use crate::nbd::error::Hangup;
use crate::nbd::negotiate::{self, Exports, Negotiated, NegotiationEnd, Tls};
use crate::nbd::stream::Stream;
use crate::nbd::transmit::{self, Stats, TransmissionEnd};
use crate::tls::{self, TlsStream};
use crate::{proxy, sandbox, status};

/// Exit codes (see `tmpdisk --help`).
pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILURE: u8 = 1;

/// Whether, and as whom, the client talks TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsIdentity {
    /// Plaintext.
    None,
    /// TLS without a client certificate.
    Anonymous,
    /// TLS with a client certificate of this subject: as text for the
    /// logs ("CN=alice,O=..."), and as DER, which a reconnect must show
    /// again.
    Subject { text: String, der: Vec<u8> },
}

impl TlsIdentity {
    fn active(&self) -> bool {
        *self != TlsIdentity::None
    }

    fn subject(&self) -> &str {
        match self {
            TlsIdentity::Subject { text, .. } => text,
            _ => "",
        }
    }

    fn der(&self) -> Option<Vec<u8>> {
        match self {
            TlsIdentity::Subject { der, .. } => Some(der.clone()),
            _ => None,
        }
    }
}

/// How a session that did not break ended.
enum SessionEnd {
    /// Negotiation ended without a disk (ABORT, or the client left while
    /// its disk was being built).
    Negotiating,
    /// Transmission ended: `clean` with NBD_CMD_DISC, else the client
    /// closed the connection without it.
    Served { clean: bool },
}

/// Serve one client over `conn`; returns the process exit code. `tls` is
/// the loaded TLS configuration when TLS is on.
pub fn serve(mut conn: Conn, peer: String, cfg: &Config, tls: Option<&Arc<ServerConfig>>) -> u8 {
    let started = Instant::now();
    if let Err(e) = conn.set_wait_budget(cfg.handshake_timeout) {
        error!(%peer, error = %e, "cannot set up the connection");
        status::ready_before_exit("connection dropped");
        return EXIT_FAILURE;
    }
    // A balancer's connection: who the client is comes first.
    let peer = match proxied_peer(&mut conn, peer, cfg) {
        Ok(peer) => peer,
        Err((peer, why)) => {
            warn!(%peer, reason = %why, "connection dropped: PROXY protocol");
            status::ready_before_exit("connection dropped");
            return EXIT_OK;
        }
    };
    let watch = conn.read_fd().try_clone_to_owned().ok();
    let mut disk = Disk::new(
        &cfg.exports,
        watch,
        cfg.reconnect.as_ref(),
        &cfg.registry_dir,
    );
    let mut s = Stream::new(conn);
    debug!(%peer, "client connected");
    let policy = match (&cfg.tls, tls) {
        (Some(spec), Some(_)) if spec.require => Tls::Required,
        (Some(_), Some(_)) => Tls::Offered,
        _ => Tls::Unavailable,
    };
    let client = Client {
        peer: &peer,
        started,
        reply_timeout: cfg.reply_timeout,
    };
    let first = negotiate::handshake(&mut s).and_then(|no_zeroes| {
        negotiate::negotiate(&mut s, &mut disk, no_zeroes, policy).map(|o| (no_zeroes, o))
    });
    let ended = match first {
        Ok((_, NegotiationEnd::Go(n))) => client.transmission(s, &n, &mut disk, TlsIdentity::None),
        Ok((no_zeroes, NegotiationEnd::StartTls)) => match starttls(s, tls) {
            Ok((mut s, identity)) => {
                // A reconnect finds its disk only under the same identity.
                disk.set_tls_subject(identity.der());
                // Everything negotiated before STARTTLS is forgotten: this
                // is a new round with fresh state (CVE-2021-3716).
                match negotiate::negotiate(&mut s, &mut disk, no_zeroes, Tls::Active) {
                    Ok(NegotiationEnd::Go(n)) => client.transmission(s, &n, &mut disk, identity),
                    Ok(_) => {
                        s.into_parts().map(|(mut t, _)| t.close()).ok();
                        Ok(SessionEnd::Negotiating)
                    }
                    Err(h) => Err(h),
                }
            }
            Err(h) => Err(h),
        },
        Ok((_, NegotiationEnd::Abort)) => Ok(SessionEnd::Negotiating),
        Err(h) => Err(h),
    };
    let code = match &ended {
        Ok(SessionEnd::Negotiating) => {
            info!(%peer, "client left during negotiation");
            exit_code(&disk, None)
        }
        Ok(SessionEnd::Served { .. }) => exit_code(&disk, None),
        Err(h) => exit_code(&disk, Some((&peer, h))),
    };
    // A tokened disk outlives a connection that ended without DISC, for
    // its client to reconnect to (or goes to whoever proved the token).
    disk.finish(matches!(ended, Ok(SessionEnd::Served { clean: true })));
    status::ready_before_exit("client left");
    code
}

/// The client's address: `peer`, or, when `peer` is a balancer in
/// --proxy-from, what the PROXY header it must send first says (`peer`
/// itself for a header that names no client: a health check). The header
/// is read exactly, never past its end, within the handshake timeout.
fn proxied_peer(conn: &mut Conn, peer: String, cfg: &Config) -> Result<String, (String, String)> {
    use std::io::Read;
    let Some(from) = &cfg.proxy_from else {
        return Ok(peer);
    };
    let listed = peer
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| from.contains(a.ip()));
    if !listed {
        return Ok(peer);
    }
    let mut buf = vec![0u8; proxy::V2_FIXED + proxy::V2_MAX_BODY];
    let mut have = 0;
    loop {
        match proxy::parse(&buf[..have]) {
            Ok(proxy::Parsed::Header { len, source }) => {
                debug_assert_eq!(len, have);
                return Ok(source.map_or(peer, |s| s.to_string()));
            }
            Ok(proxy::Parsed::Incomplete(need)) => {
                let need = need.min(buf.len());
                if let Err(e) = conn.read_exact(&mut buf[have..need]) {
                    let why = match e.kind() {
                        std::io::ErrorKind::UnexpectedEof => "the balancer closed the connection \
                                                             before a whole PROXY header"
                            .to_string(),
                        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                            "no PROXY header from the balancer within the handshake timeout".into()
                        }
                        _ => format!("reading the PROXY header: {e}"),
                    };
                    return Err((peer, why));
                }
                have = need;
            }
            Err(e) => return Err((peer, format!("{e} (from a --proxy-from balancer)"))),
        }
    }
}

/// Upgrade to TLS after the client's STARTTLS was acknowledged.
fn starttls(
    s: Stream<Conn>,
    tls: Option<&Arc<ServerConfig>>,
) -> Result<(Stream<TlsStream>, TlsIdentity), Hangup> {
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
    let identity = match tls::peer_subject(&t) {
        Some(text) => TlsIdentity::Subject {
            text,
            der: tls::peer_subject_der(&t).unwrap_or_default(),
        },
        None => TlsIdentity::Anonymous,
    };
    debug!(subject = identity.subject(), "TLS established");
    Ok((Stream::new(t), identity))
}

/// What the transmission phase needs to know about the client.
struct Client<'a> {
    peer: &'a str,
    started: Instant,
    reply_timeout: Option<Duration>,
}

impl Client<'_> {
    /// The transmission phase, over whichever transport negotiation ended
    /// on.
    fn transmission<T: Transport>(
        &self,
        mut s: Stream<T>,
        n: &Negotiated,
        disk: &mut Disk,
        tls: TlsIdentity,
    ) -> Result<SessionEnd, Hangup> {
        disk.stop_watching();
        let disk = &*disk;
        let (Some(served), Some(storage)) = (disk.served(), disk.storage()) else {
            // negotiate only returns Go after `open` succeeded.
            return Err(Hangup::Server("export chosen but no disk was built".into()));
        };
        let peer = self.peer;
        if let Err(e) = s.channel()?.conn().start_serving(self.reply_timeout) {
            return Err(Hangup::Server(format!("cannot set up the connection: {e}")));
        }
        let shape = disk.shape();
        info!(
            %peer,
            export = %crate::exportname::redacted(&n.export_name),
            serves = shape.map(|s| s.export.as_str()),
            size = n.size,
            fs_type = %disk.kind(),
            label = shape
                .and_then(|s| s.disk.fs.label.as_ref())
                .map(|l| l.to_string_lossy().into_owned()),
            base = disk.base().map(|p| p.display().to_string()),
            copy = disk.base().map(|_| served.copy()),
            mkfs_ms = disk.mkfs_ms(),
            allocated = served.allocated(),
            structured = n.replies.structured(),
            tls = tls.active(),
            tls_subject = tls.subject(),
            "client served"
        );
        // What `systemctl status` shows: the export (admin-defined, so
        // safe to print) and the disk the client got.
        let export = match shape.map(|s| s.export.as_str()) {
            Some("") | None => "the default export".to_string(),
            Some(name) => format!("export {name}"),
        };
        status::status(&format!("serving {peer}, {export}: {}", disk.description()));
        if let Err(e) = sandbox::lock_down() {
            warn!(error = %e, "serving without a seccomp filter");
        }
        // After the filter: building it allocated too.
        crate::sys::release_free_memory();

        let mut stats = Stats::default();
        let end = transmit::serve(&mut s, &storage, n, &mut stats);
        let seconds = self.started.elapsed().as_secs_f64();
        let how = match &end {
            Ok(TransmissionEnd::Disconnect) => "disconnect".to_string(),
            Ok(TransmissionEnd::Closed) => "closed".to_string(),
            Err(h) => h.to_string(),
        };
        info!(
            %peer,
            bytes_read = stats.bytes_read,
            bytes_read_by_sendfile = stats.bytes_read_by_sendfile,
            bytes_written = stats.bytes_written,
            requests = stats.requests,
            disk_errors = stats.disk_errors,
            changed = served.changed(),
            seconds = format!("{seconds:.3}"),
            end = %how,
            "client left"
        );
        if let Ok((mut t, _)) = s.into_parts() {
            t.close();
        }
        end.map(|e| SessionEnd::Served {
            clean: matches!(e, TransmissionEnd::Disconnect),
        })
    }
}

/// Log how the session ended and pick the exit code: 1 when the server
/// failed (the disk could not be built or used), 0 otherwise, including
/// clients that misbehaved (logged as warnings, not our failure) or left
/// while their disk was being built.
fn exit_code(disk: &Disk, hangup: Option<(&str, &Hangup)>) -> u8 {
    if let Some((peer, h)) = hangup {
        match h {
            Hangup::Closed => debug!(%peer, "client closed the connection"),
            Hangup::Server(why) => error!(%peer, reason = %why, "cannot serve the client"),
            _ if disk.abandoned() => debug!(%peer, reason = %h, "client gone during setup"),
            _ => warn!(%peer, reason = %h, "client dropped"),
        }
        if h.is_server_failure() && !disk.abandoned() {
            return EXIT_FAILURE;
        }
    }
    if disk.failed() { EXIT_FAILURE } else { EXIT_OK }
}

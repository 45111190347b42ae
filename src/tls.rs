//! TLS for NBD_OPT_STARTTLS, with rustls: loading the key material (once,
//! at start, from the nbdkit/qemu directory layout), the handshake over the
//! client's connection, and the peer certificate's subject for the log.
//!
//! Key material is never logged; errors name the file, not its contents.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, ServerConnection, WebPkiClientVerifier};

use crate::conn::Conn;

/// The client's stream once TLS is up.
pub type TlsStream = rustls::StreamOwned<ServerConnection, Conn>;

pub const CA_CERT: &str = "ca-cert.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";

/// Why the key material could not be loaded. Every message names the
/// file, never its contents.
#[derive(Debug)]
pub enum TlsError {
    /// rustls refused its own configuration (no usable protocol versions).
    Config(rustls::Error),
    /// A file could not be read.
    Read { path: PathBuf, error: io::Error },
    /// A certificate file held no certificate, or a bad one.
    Certificates { path: PathBuf, why: String },
    /// The key file held no private key.
    Key { path: PathBuf, why: String },
    /// The CA certificate cannot verify clients.
    Ca { path: PathBuf, why: String },
    /// The certificate and the key are not a pair.
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        error: rustls::Error,
    },
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsError::Config(e) => write!(f, "TLS: {e}"),
            TlsError::Read { path, error } => write!(f, "{}: {error}", path.display()),
            TlsError::Certificates { path, why }
            | TlsError::Key { path, why }
            | TlsError::Ca { path, why } => write!(f, "{}: {why}", path.display()),
            TlsError::Mismatch { cert, key, error } => write!(
                f,
                "{} and {} do not go together: {error}",
                cert.display(),
                key.display()
            ),
        }
    }
}

/// Build the server's TLS configuration from `dir`: server-cert.pem (the
/// chain), server-key.pem, and with `verify_peer` ca-cert.pem, which every
/// client certificate must chain to.
pub fn load(dir: &Path, verify_peer: bool) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?;
    let builder = if verify_peer {
        let ca = dir.join(CA_CERT);
        let bad_ca = |why: String| TlsError::Ca {
            path: ca.clone(),
            why,
        };
        let mut roots = RootCertStore::empty();
        for cert in certs(&ca)? {
            roots
                .add(cert)
                .map_err(|e| bad_ca(format!("not a usable CA certificate: {e}")))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| bad_ca(e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let cert_path = dir.join(SERVER_CERT);
    let key_path = dir.join(SERVER_KEY);
    let chain = certs(&cert_path)?;
    let key = PrivateKeyDer::from_pem_slice(&read(&key_path)?).map_err(|e| TlsError::Key {
        path: key_path.clone(),
        why: format!("no private key found ({e})"),
    })?;
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|error| TlsError::Mismatch {
            cert: cert_path,
            key: key_path,
            error,
        })?;
    Ok(Arc::new(config))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|error| TlsError::Read {
        path: path.to_path_buf(),
        error,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let bad = |why: String| TlsError::Certificates {
        path: path.to_path_buf(),
        why,
    };
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    let certs = certs.map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no certificate found".into()));
    }
    Ok(certs)
}

/// Where the key material is when no directory is given: systemd's
/// credentials directory (`LoadCredential=`), if there is one.
pub fn default_dir() -> Option<PathBuf> {
    std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from)
}

/// Run the server side of the handshake over `conn`. The connection's wait
/// budget (the handshake timeout) still applies.
pub fn accept(mut conn: Conn, config: Arc<ServerConfig>) -> io::Result<TlsStream> {
    let mut tls = ServerConnection::new(config).map_err(io::Error::other)?;
    while tls.is_handshaking() {
        let (read, _) = tls.complete_io(&mut conn)?;
        if read == 0 && tls.is_handshaking() && !tls.wants_write() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(rustls::StreamOwned::new(tls, conn))
}

/// Encrypted: bytes must pass through rustls, never straight to the fd.
impl crate::nbd::stream::Channel for TlsStream {}

impl crate::conn::Transport for TlsStream {
    fn conn(&mut self) -> &mut Conn {
        &mut self.sock
    }

    fn close(&mut self) {
        self.conn.send_close_notify();
        let _ = self.conn.complete_io(&mut self.sock);
    }
}

/// The subject of the client's certificate ("CN=alice,O=Example"), if it
/// sent one.
pub fn peer_subject(tls: &TlsStream) -> Option<String> {
    let cert = tls.conn.peer_certificates()?.first()?;
    subject(cert.as_ref())
}

/// The client certificate's subject as DER, if it sent one: what a
/// reconnect must show again (unlike the text above, it keeps every
/// attribute and cannot be confused by commas in a value).
pub fn peer_subject_der(tls: &TlsStream) -> Option<Vec<u8>> {
    let cert = tls.conn.peer_certificates()?.first()?;
    subject_name(cert.as_ref()).map(<[u8]>::to_vec)
}

/// The subject Name of a DER certificate, as the DER of its contents.
fn subject_name(der: &[u8]) -> Option<&[u8]> {
    let (cert, _) = der_item(der, 0x30)?;
    let (tbs, _) = der_item(cert, 0x30)?;
    let mut rest = tbs;
    // Optional explicit [0] version.
    if rest.first() == Some(&0xa0) {
        rest = der_item(rest, 0xa0)?.1;
    }
    // serialNumber, signature, issuer, validity, then subject.
    for tag in [0x02, 0x30, 0x30, 0x30] {
        rest = der_item(rest, tag)?.1;
    }
    der_item(rest, 0x30).map(|(name, _)| name)
}

/// Pull the subject distinguished name out of a DER certificate. Only the
/// few DER shapes a certificate uses are parsed; anything unexpected gives
/// `None`.
pub fn subject(der: &[u8]) -> Option<String> {
    let mut name = subject_name(der)?;
    let mut parts = Vec::new();
    while !name.is_empty() {
        let (set, after) = der_item(name, 0x31)?;
        name = after;
        let (atv, _) = der_item(set, 0x30)?;
        let (oid, value) = der_item(atv, 0x06)?;
        let (text, _) = der_any(value)?;
        let key = match oid {
            [0x55, 0x04, 0x03] => "CN",
            [0x55, 0x04, 0x06] => "C",
            [0x55, 0x04, 0x07] => "L",
            [0x55, 0x04, 0x08] => "ST",
            [0x55, 0x04, 0x0a] => "O",
            [0x55, 0x04, 0x0b] => "OU",
            _ => continue,
        };
        parts.push(format!("{key}={}", String::from_utf8_lossy(text)));
    }
    Some(parts.join(","))
}

/// One DER item with the expected tag: (contents, what follows).
fn der_item(b: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *b.first()? != tag {
        return None;
    }
    der_any(b)
}

fn der_any(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let first = *b.get(1)?;
    let (len, hdr) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *b.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = hdr.checked_add(len)?;
    Some((b.get(hdr..end)?, &b[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_garbage_gives_no_subject() {
        assert_eq!(subject(&[]), None);
        assert_eq!(subject(&[0x30, 0x82, 0xff]), None);
        assert_eq!(subject(&[0x30, 0x85, 1, 2, 3, 4, 5]), None);
        assert_eq!(subject(&[0x30, 0x03, 0x30, 0x01]), None);
    }

    #[test]
    fn missing_files_are_named() {
        let e = load(Path::new("/nonexistent-tls-dir"), false).unwrap_err();
        assert!(
            e.to_string()
                .contains("/nonexistent-tls-dir/server-cert.pem"),
            "{e}"
        );
        let e = load(Path::new("/nonexistent-tls-dir"), true).unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent-tls-dir/ca-cert.pem"),
            "{e}"
        );
    }
}

//! Certificates made by openssl for one test: a CA, a server certificate
//! for localhost/127.0.0.1, client certificates, in the directory layouts
//! tmpdisk (nbdkit/qemu) and libnbd expect.

use std::path::{Path, PathBuf};

use super::{TestDir, cmd, find_tool, run_ok};

/// Certificates for one test: a CA, a server certificate for
/// localhost/127.0.0.1, a client certificate, and a second CA with its own
/// client certificate (a stranger).
pub struct Pki {
    /// nbdkit/qemu layout for the server: ca-cert.pem, server-cert.pem,
    /// server-key.pem.
    pub server: PathBuf,
    /// libnbd/qemu layout for a client: ca-cert.pem, client-cert.pem,
    /// client-key.pem.
    pub client: PathBuf,
    /// A client that trusts our CA but presents no certificate.
    pub anonymous: PathBuf,
    /// A client whose certificate comes from another CA.
    pub stranger: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let mut c = cmd("openssl", args);
    c.current_dir(dir);
    run_ok("openssl", c);
}

fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}-cert.pem"),
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// A certificate signed by CA `ca`, with extensions from `ext`.
fn make_cert(dir: &Path, ca: &str, name: &str, subject: &str, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            subject,
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}-cert.pem"),
            "-CAkey",
            &format!("{ca}-key.pem"),
            "-CAcreateserial",
            "-out",
            &format!("{name}-cert.pem"),
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

pub fn pki(dir: &TestDir) -> Pki {
    require_openssl();
    let w = dir.subdir("pki");
    make_ca(&w, "ca");
    make_ca(&w, "otherca");
    make_cert(
        &w,
        "ca",
        "server",
        "/CN=localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    );
    make_cert(
        &w,
        "ca",
        "client",
        "/CN=alice/O=Example",
        "extendedKeyUsage=clientAuth\n",
    );
    make_cert(
        &w,
        "otherca",
        "mallory",
        "/CN=mallory",
        "extendedKeyUsage=clientAuth\n",
    );
    let layout = |name: &str, files: &[(&str, &str)]| {
        let d = dir.subdir(name);
        for (from, to) in files {
            std::fs::copy(w.join(from), d.join(to)).unwrap();
        }
        d
    };
    Pki {
        server: layout(
            "server",
            &[
                ("ca-cert.pem", "ca-cert.pem"),
                ("server-cert.pem", "server-cert.pem"),
                ("server-key.pem", "server-key.pem"),
            ],
        ),
        client: layout(
            "client",
            &[
                ("ca-cert.pem", "ca-cert.pem"),
                ("client-cert.pem", "client-cert.pem"),
                ("client-key.pem", "client-key.pem"),
            ],
        ),
        anonymous: layout("anonymous", &[("ca-cert.pem", "ca-cert.pem")]),
        stranger: layout(
            "stranger",
            &[
                ("ca-cert.pem", "ca-cert.pem"),
                ("mallory-cert.pem", "client-cert.pem"),
                ("mallory-key.pem", "client-key.pem"),
            ],
        ),
    }
}

pub fn require_openssl() {
    assert!(
        find_tool("openssl").is_some(),
        "missing test tool: openssl (Debian package openssl); run tests/run as root to install it"
    );
}

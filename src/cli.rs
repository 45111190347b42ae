//! The command line (clap, every option also readable from a `TMPDISK_*`
//! environment variable so units can use `Environment=`/`EnvironmentFile=`)
//! and its validation into a [`Config`]. Nothing here touches the system
//! except the tmpdir check and opening the base image (checked at start,
//! once, so that a bad one fails here rather than at the first client).

use std::ffi::OsString;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use clap::{ArgGroup, Parser};

use crate::base::Base;
use crate::exports::Catalog;

/// NBD's registered port.
pub const DEFAULT_PORT: u16 = 10809;

#[derive(Parser, Debug)]
#[command(
    name = "tmpdisk",
    version,
    about = "Serve every NBD client a fresh, empty, temporary filesystem of its own",
    long_about = "Serve every NBD client a fresh, empty, temporary filesystem of its own.\n\n\
        Each connection gets a new sparse image of SIZE in the tmpdir, formatted by mkfs, \
        served over NBD until the client leaves, and gone when it does: the image never has \
        a name, so nothing survives the process, however it ends.\n\n\
        Activation: without --stdio/--listen/--unix, tmpdisk takes the socket systemd passes \
        (LISTEN_FDS): a connected one (Accept=yes) is served, a listening one gets the \
        standalone accept loop.",
    after_help = "Exit status: 0 the client was served (or left), 1 the disk could not be \
        built or served, 2 usage error, 70 a bug (a panic; the log says where).",
    group(ArgGroup::new("activation").args(["stdio", "listen", "unix"]).multiple(false))
)]
pub struct Args {
    /// Size of each client's disk: bytes, or with K, M, G, T, P, E (powers of 1024; KiB, MiB... also accepted)
    #[arg(value_name = "SIZE", env = "TMPDISK_SIZE", value_parser = parse_size)]
    pub size_arg: Option<u64>,

    /// Same as the SIZE argument
    #[arg(long = "size", value_name = "SIZE", value_parser = parse_size)]
    pub size_opt: Option<u64>,

    /// Whether `size_arg` came from TMPDISK_SIZE rather than the command
    /// line (set by [`Args::parse_command_line`]): the command line wins
    /// over the environment, but SIZE and --size both on it conflict.
    /// clap's own conflict counted the environment's value too, so a
    /// `--size` failed under the unit, which sets TMPDISK_SIZE.
    #[arg(skip)]
    pub size_arg_from_env: bool,

    /// Filesystem to create: runs mkfs.TYPE (ext4, xfs, vfat, btrfs, ntfs, ...), or
    /// swap (mkswap), or none (a blank disk) [default: ext4]
    #[arg(short = 't', long = "type", value_name = "TYPE", env = "TMPDISK_TYPE",
          value_parser = parse_fs_type)]
    pub fs_type: Option<String>,

    /// Give every client a copy-on-write copy of this image (a raw image
    /// file or a block device, never modified) instead of a new filesystem;
    /// SIZE defaults to its size
    #[arg(long, value_name = "IMAGE", env = "TMPDISK_BASE")]
    pub base: Option<PathBuf>,

    /// Filesystem label (passed to mkfs with the right flag for the type)
    #[arg(short = 'L', long, value_name = "LABEL", env = "TMPDISK_LABEL")]
    pub label: Option<OsString>,

    /// Extra argument for mkfs (repeatable; in the environment variable, space-separated)
    #[arg(long = "mkfs-option", value_name = "OPT", env = "TMPDISK_MKFS_OPTIONS",
          value_delimiter = ' ', allow_hyphen_values = true, action = clap::ArgAction::Append)]
    pub mkfs_options: Vec<OsString>,

    /// Run CMD with /bin/sh instead of mkfs; it finds the image in $disk and the
    /// settings in $size, $type and $label
    #[arg(short = 'c', long, value_name = "CMD", env = "TMPDISK_COMMAND")]
    pub command: Option<OsString>,

    /// Directory for the images [default: $TMPDIR, else /var/tmp]
    #[arg(long, value_name = "DIR", env = "TMPDISK_TMPDIR")]
    pub tmpdir: Option<PathBuf>,

    /// Drop a client that has not finished negotiating after SECS seconds of
    /// waiting for it (0 = never)
    #[arg(long, value_name = "SECS", env = "TMPDISK_HANDSHAKE_TIMEOUT", default_value = "30",
          value_parser = parse_timeout)]
    pub handshake_timeout: u64,

    /// Drop a client that has not read its replies for SECS seconds (0 = never)
    #[arg(long, value_name = "SECS", env = "TMPDISK_REPLY_TIMEOUT", default_value = "300",
          value_parser = parse_timeout)]
    pub reply_timeout: u64,

    /// Refuse new clients while the tmpdir has less free space than this: a
    /// size (64M, 2G) or a percentage of the filesystem (5%)
    #[arg(long, value_name = "SIZE|PCT", env = "TMPDISK_MIN_FREE", default_value = "5%",
          value_parser = parse_min_free)]
    pub min_free: MinFree,

    /// Give mkfs (or --command) at most SECS seconds, then kill it and fail
    /// the client (0 = wait forever)
    #[arg(long, value_name = "SECS", env = "TMPDISK_SETUP_TIMEOUT", default_value = "300",
          value_parser = parse_timeout)]
    pub setup_timeout: u64,

    /// Keep the disk of a client that named it with a token (NAME:id=TOKEN)
    /// this long after its connection drops without NBD_CMD_DISC, for the
    /// same client to reconnect to (0 = never keep it)
    #[arg(long, value_name = "SECS", env = "TMPDISK_RECONNECT_GRACE", default_value = "60",
          value_parser = parse_timeout)]
    pub reconnect_grace: u64,

    /// Where the processes holding disks for reconnects meet the ones
    /// reconnecting [default: $XDG_RUNTIME_DIR/tmpdisk-reconnect, else
    /// /run/tmpdisk-reconnect]
    #[arg(long, value_name = "DIR", env = "TMPDISK_RECONNECT_DIR")]
    pub reconnect_dir: Option<PathBuf>,

    /// Where every process serving a disk registers it for the capacity
    /// agent [default: $XDG_RUNTIME_DIR/tmpdisk-clients, else
    /// /run/tmpdisk-clients]
    #[arg(long, value_name = "DIR", env = "TMPDISK_REGISTRY_DIR")]
    pub registry_dir: Option<PathBuf>,

    /// Agent: count the connected disks' unwritten space divided by this
    /// (1 = every disk may fill up; 4 = a quarter of that is expected)
    #[arg(long, value_name = "RATIO", env = "TMPDISK_OVERCOMMIT", default_value = "1",
          value_parser = parse_overcommit)]
    pub overcommit: f64,

    /// Clients served at once (standalone listeners; more wait in the
    /// backlog); the capacity agent's limit (set it to the socket's
    /// MaxConnections)
    #[arg(long, value_name = "N", env = "TMPDISK_MAX_CONNECTIONS", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Standalone listeners: clients at once from one IP address (TCP) or
    /// one user (Unix socket); more are refused at once (0 = no limit)
    #[arg(
        long,
        value_name = "N",
        env = "TMPDISK_MAX_CONNECTIONS_PER_SOURCE",
        default_value_t = 8
    )]
    pub max_connections_per_source: u32,

    /// TLS: off, on (offered through NBD_OPT_STARTTLS) or require (plaintext refused)
    #[arg(long, value_name = "MODE", env = "TMPDISK_TLS", default_value = "off",
          value_parser = ["off", "on", "require"])]
    pub tls: String,

    /// Directory with server-cert.pem, server-key.pem and (for --tls-verify-peer)
    /// ca-cert.pem [default: $CREDENTIALS_DIRECTORY under systemd]
    #[arg(long, value_name = "DIR", env = "TMPDISK_TLS_CERTIFICATES")]
    pub tls_certificates: Option<PathBuf>,

    /// Require clients to present a certificate signed by ca-cert.pem
    #[arg(long, env = "TMPDISK_TLS_VERIFY_PEER")]
    pub tls_verify_peer: bool,

    /// Take the PROXY protocol (v1 or v2) header a load balancer sends
    /// first, from the --proxy-from addresses only, and log and serve its
    /// client's address
    #[arg(long, env = "TMPDISK_PROXY_PROTOCOL")]
    pub proxy_protocol: bool,

    /// The balancers' addresses, comma-separated (IPv4 or IPv6): they must
    /// send a PROXY header, nobody else may
    #[arg(long, value_name = "ADDRS", env = "TMPDISK_PROXY_FROM", value_parser = parse_proxy_from)]
    pub proxy_from: Option<ProxyFrom>,

    /// Named exports: a TOML file of exports (and FILE's drop-in directory,
    /// exports.d/*.toml beside exports.toml) that clients choose by export
    /// name; the command line's disk stays the default export. The format:
    /// the commented /etc/tmpdisk/exports.toml of the packages, or the
    /// README (/usr/share/doc/tmpdisk)
    #[arg(long, value_name = "FILE", env = "TMPDISK_EXPORTS")]
    pub exports: Option<PathBuf>,

    /// Check the configuration (options, environment, exports file), print
    /// the exports and exit: 0 if it is good, 2 with file:line if not
    #[arg(long)]
    pub check_config: bool,

    /// Log level: error, warn, info, debug or trace
    #[arg(long, value_name = "LEVEL", env = "TMPDISK_LOG_LEVEL", default_value = "info",
          value_parser = ["error", "warn", "info", "debug", "trace"])]
    pub log_level: String,

    // Activation flags deliberately have no environment variable: the same
    // configuration file feeds socket-activated instances, which must never
    // start listening on their own.
    /// Serve one client on stdin/stdout (inetd, ssh, libnbd's connect_command)
    #[arg(long)]
    pub stdio: bool,

    /// Standalone: listen on TCP ADDR[:PORT] (port 10809 by default), one process per client
    #[arg(long, value_name = "ADDR[:PORT]")]
    pub listen: Option<String>,

    /// Standalone: listen on a Unix socket, one process per client
    #[arg(long, value_name = "PATH")]
    pub unix: Option<PathBuf>,

    /// Be the capacity agent instead: answer HAProxy's agent-check on the
    /// socket(s) (systemd's, or --listen/--unix) with what this host can
    /// still take; never serves a disk
    #[arg(long, conflicts_with = "stdio")]
    pub agent: bool,
}

impl Args {
    /// Parse this process's command line and environment, noting where
    /// SIZE came from (see `size_arg_from_env`).
    pub fn parse_command_line() -> Result<Args, clap::Error> {
        use clap::{CommandFactory, FromArgMatches, parser::ValueSource};
        let mut cmd = Args::command();
        let m = cmd.try_get_matches_from_mut(std::env::args_os())?;
        let mut a = Args::from_arg_matches(&m).map_err(|e| e.format(&mut cmd))?;
        a.size_arg_from_env = m.value_source("size_arg") == Some(ValueSource::EnvVariable);
        Ok(a)
    }
}

/// How this process meets its clients.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Whatever systemd passed in LISTEN_FDS.
    Systemd,
    Stdio,
    Tcp(Vec<SocketAddr>),
    Unix(PathBuf),
}

/// Free space the tmpdir must keep for a new client to be admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinFree {
    Bytes(u64),
    Percent(u8),
}

impl MinFree {
    /// The threshold in bytes for a filesystem of `total` bytes.
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            MinFree::Bytes(b) => b,
            MinFree::Percent(p) => (u128::from(total) * u128::from(p) / 100) as u64,
        }
    }
}

impl std::fmt::Display for MinFree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MinFree::Bytes(b) => f.write_str(&human_size(*b)),
            MinFree::Percent(p) => write!(f, "{p}%"),
        }
    }
}

fn parse_overcommit(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && (1.0..=1000.0).contains(&r) => Ok(r),
        _ => Err(format!(
            "invalid --overcommit {s:?}: a ratio from 1 (no overcommit) to 1000"
        )),
    }
}

/// `$XDG_RUNTIME_DIR/NAME` (a user's own tmpdisk), else `/run/NAME`.
fn runtime_dir(name: &str) -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("/run"), PathBuf::from)
        .join(name)
}

fn parse_min_free(s: &str) -> Result<MinFree, String> {
    let t = s.trim();
    if let Some(p) = t.strip_suffix('%') {
        return match p.trim().parse::<u8>() {
            Ok(p) if p <= 100 => Ok(MinFree::Percent(p)),
            _ => Err(format!(
                "invalid --min-free {s:?}: a percentage is 0% to 100%"
            )),
        };
    }
    if t == "0" {
        return Ok(MinFree::Bytes(0));
    }
    parse_size(t).map(MinFree::Bytes)
}

/// How the disk is initialised.
#[derive(Debug, Clone)]
pub struct FsSpec {
    pub fs_type: String,
    pub label: Option<OsString>,
    pub mkfs_options: Vec<OsString>,
    pub command: Option<OsString>,
}

impl FsSpec {
    /// A filesystem of `fs_type` made by its mkfs with tmpdisk's defaults:
    /// no label, no extra options, no command.
    pub fn of_type(fs_type: &str) -> FsSpec {
        FsSpec {
            fs_type: fs_type.into(),
            label: None,
            mkfs_options: Vec::new(),
            command: None,
        }
    }
}

/// TLS settings; the key material itself is loaded by [`crate::tls::load`].
#[derive(Debug, Clone)]
pub struct TlsSpec {
    /// Plaintext clients are refused.
    pub require: bool,
    pub certificates: PathBuf,
    pub verify_peer: bool,
}

/// What a standalone listener lets in.
#[derive(Debug, Clone)]
pub struct ListenerLimits {
    /// Clients served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Clients at once from one source (IP address, or user for a Unix
    /// socket); more are refused at once.
    pub per_source: Option<usize>,
    /// Balancers (--proxy-from): every client behind one shares its
    /// address, so the per-source limit does not count them.
    pub balancers: Vec<std::net::IpAddr>,
    /// How long a client may take to negotiate at all.
    pub handshake_timeout: Option<Duration>,
}

/// What a client's disk is made of and where: everything the disk module
/// needs, and nothing else.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub size: u64,
    /// mkfs, or a command (after the copy when there is a base).
    pub fs: FsSpec,
    /// The golden image every client gets a copy of, opened at start.
    pub base: Option<Arc<Base>>,
    pub tmpdir: PathBuf,
    pub min_free: MinFree,
    pub setup_timeout: Option<Duration>,
}

/// What every export's disk shares: where it goes and how it is admitted.
#[derive(Debug, Clone)]
pub struct Common {
    pub tmpdir: PathBuf,
    pub min_free: MinFree,
    pub setup_timeout: Option<Duration>,
}

impl Common {
    /// A disk of this shape, made here.
    pub fn disk(&self, size: u64, fs: FsSpec, base: Option<Arc<Base>>) -> DiskSpec {
        DiskSpec {
            size,
            fs,
            base,
            tmpdir: self.tmpdir.clone(),
            min_free: self.min_free,
            setup_timeout: self.setup_timeout,
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub tls: Option<TlsSpec>,
    /// The balancers that send PROXY headers (None: nobody may).
    pub proxy_from: Option<ProxyFrom>,
    /// The disks clients may have, by export name.
    pub exports: Catalog,
    /// Where every export's images go.
    pub tmpdir: PathBuf,
    /// Print the exports and exit.
    pub check_only: bool,
    pub handshake_timeout: Option<Duration>,
    pub reply_timeout: Option<Duration>,
    /// Keeping tokened disks for reconnects (None: --reconnect-grace 0).
    pub reconnect: Option<crate::reconnect::Settings>,
    /// Where each disk is registered for the capacity agent.
    pub registry_dir: PathBuf,
    /// Answer agent checks instead of serving disks.
    pub agent: bool,
    /// The agent's overcommit ratio (≥ 1).
    pub overcommit: f64,
    /// The tmpdir's reserve (every export shares it).
    pub min_free: MinFree,
    pub limits: ListenerLimits,
    pub mode: Mode,
    pub log_level: tracing::Level,
}

impl Config {
    /// Validate what clap parsed. The error is one line for stderr.
    pub fn from_args(a: Args) -> Result<Config, String> {
        let mkfs_options: Vec<OsString> = a
            .mkfs_options
            .into_iter()
            .filter(|o| !o.is_empty())
            .collect();
        let base = match &a.base {
            Some(path) => {
                if a.fs_type.is_some() || a.label.is_some() || !mkfs_options.is_empty() {
                    return Err("--base gives every client a copy of an image: --type, --label \
                                and --mkfs-option make a new filesystem and cannot go with it \
                                (a --command can change each copy, e.g. tune2fs -U random \"$disk\")"
                        .into());
                }
                Some(Arc::new(Base::open(path).map_err(|e| e.to_string())?))
            }
            None => None,
        };
        // Without SIZE (or a base) the command line has no disk: fine with
        // an exports file, which then needs `default =` for the empty name.
        let shaped = a.fs_type.is_some()
            || a.label.is_some()
            || !mkfs_options.is_empty()
            || a.command.is_some();
        let size = match (a.size_opt, a.size_arg, a.size_arg_from_env) {
            (Some(_), Some(_), false) => {
                return Err("give the disk's size once: as SIZE or as --size, not both".into());
            }
            (Some(size), _, _) => Some(size),
            (None, size, _) => size,
        };
        let size = match (size, &base) {
            (Some(size), Some(b)) if size < b.size() => {
                return Err(format!(
                    "SIZE {} is smaller than the base image {} ({}): a copy cannot shrink it",
                    human_size(size),
                    b.path().display(),
                    human_size(b.size())
                ));
            }
            (Some(size), _) => Some(size),
            (None, Some(b)) => Some(b.size()),
            (None, None) if a.exports.is_some() && !shaped => None,
            (None, None) => {
                return Err(
                    "the disk SIZE is required (e.g. `tmpdisk 1G`, or TMPDISK_SIZE=1G)".into(),
                );
            }
        };
        let fs_type = match &base {
            Some(_) => String::new(),
            None => a.fs_type.unwrap_or_else(|| "ext4".into()),
        };
        if let Some(label) = &a.label {
            if label.as_encoded_bytes().contains(&0) {
                return Err("--label must not contain a NUL byte".into());
            }
            // mkfs would fail (or cut it short) at every client's GO.
            if a.command.is_none() {
                crate::mkfs::check_label(&fs_type, label).map_err(|e| format!("--label: {e}"))?;
            }
        }
        let tmpdir = a
            .tmpdir
            .or_else(|| {
                std::env::var_os("TMPDIR")
                    .filter(|t| !t.is_empty())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| PathBuf::from("/var/tmp"));
        let mode = if a.stdio {
            Mode::Stdio
        } else if let Some(l) = a.listen {
            Mode::Tcp(parse_listen(&l)?)
        } else if let Some(u) = a.unix {
            Mode::Unix(u)
        } else {
            Mode::Systemd
        };
        let log_level = a.log_level.parse().map_err(|_| "bad --log-level")?;
        let tls = match a.tls.as_str() {
            // The agent speaks to the balancer, never TLS, and reads the
            // disks' configuration file, where TLS may be on with the
            // certificates only the disks' instances are given.
            _ if a.agent => None,
            "off" => {
                if a.tls_verify_peer {
                    return Err("--tls-verify-peer needs --tls on or --tls require".into());
                }
                None
            }
            mode => Some(TlsSpec {
                require: mode == "require",
                certificates: a
                    .tls_certificates
                    .or_else(crate::tls::default_dir)
                    .ok_or("--tls needs --tls-certificates DIR (or systemd credentials)")?,
                verify_peer: a.tls_verify_peer,
            }),
        };
        let common = Common {
            tmpdir: tmpdir.clone(),
            min_free: a.min_free,
            setup_timeout: (a.setup_timeout > 0).then(|| Duration::from_secs(a.setup_timeout)),
        };
        let cli_disk = size.map(|size| {
            common.disk(
                size,
                FsSpec {
                    fs_type,
                    label: a.label,
                    mkfs_options,
                    command: a.command,
                },
                base,
            )
        });
        let exports = match (&a.exports, cli_disk) {
            (Some(file), disk) => Catalog::load(file, disk, &common).map_err(|e| e.to_string())?,
            (None, Some(disk)) => Catalog::single(disk),
            (None, None) => {
                return Err(
                    "the disk SIZE is required (e.g. `tmpdisk 1G`, or TMPDISK_SIZE=1G)".into(),
                );
            }
        };
        if a.proxy_protocol && a.proxy_from.is_none() {
            return Err(
                "--proxy-protocol needs --proxy-from ADDRS (TMPDISK_PROXY_FROM): \
                        the balancers' addresses, the only peers whose PROXY headers are taken"
                    .into(),
            );
        }
        if a.proxy_from.is_some() && !a.proxy_protocol {
            return Err(
                "--proxy-from needs --proxy-protocol (or TMPDISK_PROXY_PROTOCOL=true)".into(),
            );
        }
        Ok(Config {
            proxy_from: a.proxy_from.clone().filter(|_| a.proxy_protocol),
            tls,
            exports,
            tmpdir,
            check_only: a.check_config,
            handshake_timeout: (a.handshake_timeout > 0)
                .then(|| Duration::from_secs(a.handshake_timeout)),
            reply_timeout: (a.reply_timeout > 0).then(|| Duration::from_secs(a.reply_timeout)),
            reconnect: (a.reconnect_grace > 0).then(|| crate::reconnect::Settings {
                grace: Duration::from_secs(a.reconnect_grace),
                dir: a
                    .reconnect_dir
                    .clone()
                    .unwrap_or_else(|| runtime_dir("tmpdisk-reconnect")),
            }),
            registry_dir: a
                .registry_dir
                .clone()
                .unwrap_or_else(|| runtime_dir("tmpdisk-clients")),
            agent: a.agent,
            overcommit: a.overcommit,
            min_free: a.min_free,
            limits: ListenerLimits {
                max_connections: a.max_connections as usize,
                per_source: (a.max_connections_per_source > 0)
                    .then_some(a.max_connections_per_source as usize),
                balancers: match (&a.proxy_from, a.proxy_protocol) {
                    (Some(from), true) => from.0.clone(),
                    _ => Vec::new(),
                },
                handshake_timeout: (a.handshake_timeout > 0)
                    .then(|| Duration::from_secs(a.handshake_timeout)),
            },
            mode,
            log_level,
        })
    }

    /// Check that the tmpdir is a directory we can use. Listener modes fail
    /// at start on this; a single connection instead tells its client.
    pub fn check_tmpdir(&self) -> Result<(), String> {
        let tmpdir = &self.tmpdir;
        match std::fs::metadata(tmpdir) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(format!("tmpdir {}: not a directory", tmpdir.display())),
            Err(e) => Err(format!("tmpdir {}: {e}", tmpdir.display())),
        }
    }
}

/// Parse a size: a number with an optional binary suffix. Rejects 0,
/// unknown suffixes and anything a file offset cannot hold (2^63 and up).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "invalid size {s:?}: expected a number such as 1073741824, 64M or 1G"
        ));
    }
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        "p" | "pib" => 50,
        "e" | "eib" => 60,
        _ => {
            return Err(format!(
                "invalid size {s:?}: unknown suffix {suffix:?} (use K, M, G, T, P or E, powers of 1024)"
            ));
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size {s:?}: number too large"))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .filter(|&b| b <= i64::MAX as u64)
        .ok_or_else(|| format!("invalid size {s:?}: larger than the maximum of 2^63-1 bytes"))?;
    if bytes == 0 {
        return Err("invalid size: must be at least 1 byte".into());
    }
    Ok(bytes)
}

/// The longest timeout accepted: ten years. Anything longer is a typo or
/// an attempt to mean "never", which is 0; beyond about 2^63 ns a deadline
/// no longer fits the clock and every client would fail.
pub const MAX_TIMEOUT_SECS: u64 = 10 * 365 * 24 * 3600;

/// A timeout in seconds: 0 (never) up to [`MAX_TIMEOUT_SECS`].
fn parse_timeout(s: &str) -> Result<u64, String> {
    let n: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("invalid timeout {s:?}: expected whole seconds, 0 for never"))?;
    if n > MAX_TIMEOUT_SECS {
        return Err(format!(
            "timeout {n} is too long: at most {MAX_TIMEOUT_SECS} seconds (ten years); 0 means never"
        ));
    }
    Ok(n)
}

/// A filesystem type names a program, `mkfs.TYPE`: keep it to a plain name
/// so it can never become a path. (`none` is a blank disk, `swap` runs
/// mkswap.)
pub(crate) fn parse_fs_type(s: &str) -> Result<String, String> {
    if s.is_empty()
        || s.len() > 32
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(format!(
            "invalid filesystem type {s:?}: expected a name such as ext4, xfs or vfat"
        ));
    }
    Ok(s.to_string())
}

/// The addresses --proxy-from names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyFrom(pub Vec<std::net::IpAddr>);

impl ProxyFrom {
    /// Whether `ip` is one of them (an IPv4-mapped IPv6 address, as a
    /// dual-stack socket reports an IPv4 peer, counts as its IPv4 one).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        self.0.contains(&ip.to_canonical())
    }
}

/// `10.0.0.5,10.0.0.6,2001:db8::5` for --proxy-from.
fn parse_proxy_from(s: &str) -> Result<ProxyFrom, String> {
    let v: Result<Vec<std::net::IpAddr>, String> = s
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| {
            a.parse::<std::net::IpAddr>()
                .map(|ip| ip.to_canonical())
                .map_err(|_| {
                    format!("invalid --proxy-from address {a:?}: expected an IPv4 or IPv6 address")
                })
        })
        .collect();
    let v = v?;
    if v.is_empty() {
        return Err("--proxy-from names no address".into());
    }
    Ok(ProxyFrom(v))
}

/// ADDR[:PORT] for --listen: "127.0.0.1", "[::1]:10810", "localhost:10810",
/// ":10810" (all addresses).
fn parse_listen(s: &str) -> Result<Vec<SocketAddr>, String> {
    let bad = |e: &dyn std::fmt::Display| format!("invalid --listen address {s:?}: {e}");
    let with_port = if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(vec![a]);
    } else if let Ok(ip) = s
        .trim_matches(|c| c == '[' || c == ']')
        .parse::<std::net::IpAddr>()
    {
        return Ok(vec![SocketAddr::new(ip, DEFAULT_PORT)]);
    } else if let Some(port) = s.strip_prefix(':') {
        format!("0.0.0.0:{port}")
    } else if s.contains(':') {
        s.to_string()
    } else {
        format!("{s}:{DEFAULT_PORT}")
    };
    let addrs: Vec<SocketAddr> = with_port.to_socket_addrs().map_err(|e| bad(&e))?.collect();
    if addrs.is_empty() {
        return Err(bad(&"no address"));
    }
    Ok(addrs)
}

/// Human-readable size for logs and export descriptions ("1 GiB", "1.5 GiB").
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut i = 0;
    while i + 1 < UNITS.len() && bytes >= 1u64 << (10 * (i + 1)) {
        i += 1;
    }
    if i == 0 {
        return format!("{bytes} bytes");
    }
    let unit = 1u64 << (10 * i);
    if bytes.is_multiple_of(unit) {
        format!("{} {}", bytes / unit, UNITS[i])
    } else {
        format!("{:.1} {}", bytes as f64 / unit as f64, UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_powers_of_1024() {
        assert_eq!(parse_size("1073741824"), Ok(1 << 30));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("10gib"), Ok(10 << 30));
        assert_eq!(parse_size("7E"), Ok(7 << 60));
    }

    #[test]
    fn bad_sizes_say_why() {
        assert!(parse_size("0").unwrap_err().contains("at least 1"));
        assert!(parse_size("0G").unwrap_err().contains("at least 1"));
        assert!(parse_size("5Q").unwrap_err().contains("unknown suffix"));
        assert!(parse_size("1KB").unwrap_err().contains("unknown suffix"));
        assert!(parse_size("8E").unwrap_err().contains("2^63"));
        assert!(
            parse_size("9223372036854775808")
                .unwrap_err()
                .contains("2^63")
        );
        assert!(
            parse_size("99999999999999999999")
                .unwrap_err()
                .contains("too large")
        );
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("1.5G").is_err());
        assert_eq!(parse_size("9223372036854775807"), Ok(i64::MAX as u64));
    }

    #[test]
    fn min_free_is_a_size_or_a_percentage() {
        assert_eq!(parse_min_free("5%"), Ok(MinFree::Percent(5)));
        assert_eq!(parse_min_free("0"), Ok(MinFree::Bytes(0)));
        assert_eq!(parse_min_free("2G"), Ok(MinFree::Bytes(2 << 30)));
        assert!(parse_min_free("101%").is_err());
        assert!(parse_min_free("x%").is_err());
        assert_eq!(MinFree::Percent(10).bytes(1000), 100);
        assert_eq!(MinFree::Percent(100).bytes(u64::MAX), u64::MAX);
    }

    #[test]
    fn timeouts_are_bounded() {
        assert_eq!(parse_timeout("0"), Ok(0));
        assert_eq!(parse_timeout("300"), Ok(300));
        assert_eq!(
            parse_timeout(&MAX_TIMEOUT_SECS.to_string()),
            Ok(MAX_TIMEOUT_SECS)
        );
        assert!(parse_timeout("315360001").unwrap_err().contains("at most"));
        assert!(
            parse_timeout("18446744073709551615")
                .unwrap_err()
                .contains("at most")
        );
        assert!(parse_timeout("-1").is_err());
        assert!(parse_timeout("1.5").is_err());
    }

    #[test]
    fn filesystem_types_cannot_be_paths() {
        assert!(parse_fs_type("ext4").is_ok());
        assert!(parse_fs_type("../../bin/sh").is_err());
        assert!(parse_fs_type("").is_err());
        assert!(parse_fs_type("a b").is_err());
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen("127.0.0.1").unwrap()[0].port(), DEFAULT_PORT);
        assert_eq!(parse_listen("127.0.0.1:1234").unwrap()[0].port(), 1234);
        assert_eq!(parse_listen("[::1]:1234").unwrap()[0].port(), 1234);
        assert_eq!(parse_listen("::1").unwrap()[0].port(), DEFAULT_PORT);
        assert_eq!(parse_listen(":1234").unwrap()[0].port(), 1234);
        assert!(parse_listen("127.0.0.1:notaport").is_err());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        assert_eq!(human_size(512), "512 bytes");
        assert_eq!(human_size(64 << 20), "64 MiB");
    }
}

//! Wires the modules together: parse and validate the command line, set up
//! logging, find the client(s), serve, and turn the result into an exit
//! code (0 served, 1 failure, 2 usage error, 70 a bug: see `crash`).

use std::process::ExitCode;

use tracing::error;

use tmpdisk::activation::{self, Activation, ActivationError};
use tmpdisk::cli::{Args, Config, Mode};
use tmpdisk::listener::ListenerError;
use tmpdisk::tls::TlsError;
use tmpdisk::{
    agent, crash, image, listener, logging, session, set_not_dumpable, set_signal_dispositions, tls,
};

/// Why tmpdisk could not start (or its listener stopped), which decides
/// the exit status: the one place start-up errors meet the documented
/// codes.
enum StartError {
    /// The command line or the environment is wrong.
    Usage(String),
    /// The TLS key material cannot be used.
    Tls(TlsError),
    /// No client to serve, or the socket to serve cannot be had.
    Activation(ActivationError),
    /// The standalone listener failed.
    Listener(ListenerError),
}

impl StartError {
    fn exit_code(&self) -> u8 {
        match self {
            StartError::Usage(_)
            | StartError::Tls(_)
            | StartError::Activation(ActivationError::Usage(_)) => 2,
            StartError::Activation(ActivationError::Failed(_)) | StartError::Listener(_) => 1,
        }
    }
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Usage(e) => f.write_str(e),
            StartError::Tls(e) => write!(f, "{e}"),
            StartError::Activation(ActivationError::Usage(e) | ActivationError::Failed(e)) => {
                f.write_str(e)
            }
            StartError::Listener(e) => write!(f, "{e}"),
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            match &e {
                // Once running, the log is where an operator looks.
                StartError::Listener(_) => error!("{e}"),
                // Before: one line on stderr.
                _ => eprintln!("tmpdisk: {e}"),
            }
            ExitCode::from(e.exit_code())
        }
    }
}

fn run() -> Result<ExitCode, StartError> {
    let args = match Args::parse_command_line() {
        Ok(a) => a,
        Err(e) if e.use_stderr() => {
            // One line, as for every other start-up error; clap's own
            // rendering adds a usage hint on further lines.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            return Err(StartError::Usage(
                first.trim_start_matches("error: ").to_string(),
            ));
        }
        Err(e) => {
            // --help, --version.
            let _ = e.print();
            return Ok(ExitCode::SUCCESS);
        }
    };
    let cfg = Config::from_args(args).map_err(StartError::Usage)?;
    if cfg.check_only {
        return check_config(&cfg);
    }
    logging::init(cfg.log_level);
    crash::install();
    if let Err(e) = set_signal_dispositions().and_then(|_| set_not_dumpable()) {
        error!("process setup: {e}");
    }
    let listening = matches!(cfg.mode, Mode::Tcp(_) | Mode::Unix(_));
    if let Err(e) = cfg.check_tmpdir() {
        if listening {
            return Err(StartError::Usage(e));
        }
        // A single connection reports it to its client when the disk is
        // built; say it here too.
        error!("{e}");
    }
    // Key material is read once, before any client: a bad file fails here,
    // naming the file.
    let tls = match &cfg.tls {
        Some(spec) => {
            Some(tls::load(&spec.certificates, spec.verify_peer).map_err(StartError::Tls)?)
        }
        None => None,
    };
    if cfg.agent {
        return run_agent(&cfg);
    }
    match activation::activate(&cfg.mode).map_err(StartError::Activation)? {
        Activation::Connection { conn, peer } => Ok(ExitCode::from(session::serve(
            conn,
            peer,
            &cfg,
            tls.as_ref(),
        ))),
        Activation::Listen(l) => {
            let serve = |conn, peer| session::serve(conn, peer, &cfg, tls.as_ref());
            let killed = |pid| image::clear_left_behind(&cfg.tmpdir, pid);
            listener::run(l, cfg.limits.clone(), &serve, &killed).map_err(StartError::Listener)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `--agent`: the same activation, answering capacity checks.
fn run_agent(cfg: &Config) -> Result<ExitCode, StartError> {
    match activation::activate(&cfg.mode).map_err(StartError::Activation)? {
        Activation::Connection { conn, peer } => {
            Ok(ExitCode::from(agent::answer(conn, &peer, cfg)))
        }
        Activation::Listen(l) => {
            let serve = |conn, peer: String| agent::answer(conn, &peer, cfg);
            // The agent makes no disks: nothing to clear.
            listener::run(l, cfg.limits.clone(), &serve, &|_| {}).map_err(StartError::Listener)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `--check-config`: what start-up checks, without serving; the exports
/// as a table on stdout.
fn check_config(cfg: &Config) -> Result<ExitCode, StartError> {
    cfg.check_tmpdir().map_err(StartError::Usage)?;
    if let Some(spec) = &cfg.tls {
        tls::load(&spec.certificates, spec.verify_peer).map_err(StartError::Tls)?;
    }
    print!("{}", cfg.exports.table());
    let missing = cfg.exports.missing_programs();
    match missing.is_empty() {
        true => Ok(ExitCode::SUCCESS),
        false => Err(StartError::Usage(missing.join("\ntmpdisk: "))),
    }
}

//! Wires the modules together: parse and validate the command line, set up
//! logging, find the client(s), serve, and turn the result into an exit
//! code (0 served, 1 failure, 2 usage error).

use std::process::ExitCode;

use clap::Parser;
use tracing::error;

use tmpdisk::activation::{self, Activation, ActivationError};
use tmpdisk::cli::{Args, Config, Mode};
use tmpdisk::{crash, listener, logging, session, sys, tls};

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if e.use_stderr() => {
            // One line, as for every other start-up error; clap's own
            // rendering adds a usage hint on further lines.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("tmpdisk: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
        Err(e) => {
            // --help, --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let cfg = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tmpdisk: {e}");
            return ExitCode::from(2);
        }
    };
    logging::init(cfg.log_level);
    crash::install();
    if let Err(e) = sys::ignore_sigxfsz().and_then(|_| sys::set_not_dumpable()) {
        error!("process setup: {e}");
    }
    let listening = matches!(cfg.mode, Mode::Tcp(_) | Mode::Unix(_));
    if let Err(e) = cfg.check_tmpdir() {
        if listening {
            eprintln!("tmpdisk: {e}");
            return ExitCode::from(2);
        }
        // A single connection reports it to its client when the disk is
        // built; say it here too.
        error!("{e}");
    }
    // Key material is read once, before any client: a bad file fails here,
    // naming the file.
    let tls = match &cfg.tls {
        Some(spec) => match tls::load(&spec.certificates, spec.verify_peer) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("tmpdisk: {e}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    match activation::activate(&cfg.mode) {
        Ok(Activation::Connection { conn, peer }) => {
            ExitCode::from(session::serve(conn, peer, &cfg, tls.as_ref()))
        }
        Ok(Activation::Listen(l)) => {
            let serve = |conn, peer| session::serve(conn, peer, &cfg, tls.as_ref());
            match listener::run(l, cfg.limits, &serve) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e}");
                    ExitCode::from(1)
                }
            }
        }
        Err(ActivationError::Usage(e)) => {
            eprintln!("tmpdisk: {e}");
            ExitCode::from(2)
        }
        Err(ActivationError::Failed(e)) => {
            eprintln!("tmpdisk: {e}");
            ExitCode::from(1)
        }
    }
}

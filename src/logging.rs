//! Logging: to the journal, with structured fields, when our stderr is
//! connected to it (systemd sets `JOURNAL_STREAM` to stderr's device and
//! inode); else readable lines on stderr.

use std::io::IsTerminal;
use std::os::fd::AsFd;

use tracing::Level;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::prelude::*;

pub fn init(level: Level) {
    let filter = LevelFilter::from_level(level);
    let journal = stderr_is_journal()
        .then(tracing_journald::layer)
        .and_then(Result::ok);
    if let Some(journal) = journal {
        tracing_subscriber::registry()
            // Plain field names (PEER=, SIZE=...), not tracing-journald's
            // default F_PEER=.
            .with(
                journal
                    .with_syslog_identifier("tmpdisk".into())
                    .with_field_prefix(None),
            )
            .with(filter)
            .init();
        return;
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Whether stderr is the journal stream systemd connected us to (not, say,
/// a pipe a child of ours inherited JOURNAL_STREAM through).
fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
}

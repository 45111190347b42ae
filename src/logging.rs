//! Logging: to the journal, with structured fields, when our stderr is
//! connected to it (systemd sets `JOURNAL_STREAM` to stderr's device and
//! inode); else readable lines on stderr.

use std::io::IsTerminal;
use std::os::fd::AsFd;

use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::debug_fn;
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;

pub fn init(level: Level) {
    let filter = LevelFilter::from_level(level);
    let journal = stderr_is_journal()
        .then(tracing_journald::layer)
        .and_then(Result::ok);
    if let Some(journal) = journal {
        EventsOnly
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
    EventsOnly
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_ansi(std::io::stderr().is_terminal())
                .fmt_fields(escaping_fields()),
        )
        .with(filter)
        .init();
}

/// What our layers sit on, in place of tracing-subscriber's `Registry`:
/// we log events and make no spans, and the registry's span store (a
/// sharded slab) writes its table of 4096 shard pointers, 32 KiB, at
/// start-up, in every client's process. Measured: 32 KiB of the heap of an
/// idle client, a ninth of its PSS. Span callsites are disabled here, so
/// no span is ever created (a dependency's would be dropped) and there is
/// never span data to look up.
struct EventsOnly;

impl Subscriber for EventsOnly {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        !metadata.is_span()
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        // Not reached: span callsites are disabled (see `enabled`).
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, _: &Event<'_>) {}

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

impl<'a> LookupSpan<'a> for EventsOnly {
    type Data = tracing_subscriber::registry::Data<'a>;

    fn span_data(&'a self, _: &Id) -> Option<Self::Data> {
        None
    }
}

/// Field formatting for stderr lines: as tracing's default (the message
/// bare, other fields `name=value`), but with every control character and
/// bidirectional-text override in a value written as an escape. Export
/// names, TLS subjects and anything else a client controls then cannot
/// start a new line, colour the terminal or reorder what an operator
/// reads (an export name holding "\n\x1b[31mERROR client process
/// crashed" once forged a log line). The journal keeps exact values: each
/// field is its own record there.
fn escaping_fields() -> impl for<'w> FormatFields<'w> + 'static {
    debug_fn(|w, field, value| {
        let text = format!("{value:?}");
        match field.name() {
            "message" => write!(w, "{}", Escaped(&text)),
            name => write!(w, "{name}={}", Escaped(&text)),
        }
    })
    .delimited(" ")
}

/// Writes a string with control characters and bidi overrides escaped.
pub struct Escaped<'a>(pub &'a str);

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        for c in self.0.chars() {
            let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
            if c.is_control() || bidi {
                write!(f, "\\u{{{:x}}}", c as u32)?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::Escaped;

    #[test]
    fn control_characters_and_bidi_overrides_are_escaped() {
        let forged = "x\n\u{1b}[31mERROR client process crashed\r\u{202e}txt.exe";
        let shown = Escaped(forged).to_string();
        assert_eq!(
            shown,
            "x\\u{a}\\u{1b}[31mERROR client process crashed\\u{d}\\u{202e}txt.exe"
        );
        assert!(!shown.chars().any(char::is_control));
        assert_eq!(
            Escaped("CN=alice,O=Example é").to_string(),
            "CN=alice,O=Example é"
        );
    }
}

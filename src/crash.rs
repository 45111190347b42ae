//! What a bug does: a panic anywhere in tmpdisk logs one line saying what
//! and where, and the process exits with [`EXIT_BUG`]. Without this, a
//! panic in the serving phase aborted, and abort's own signal is not in
//! the seccomp filter, so the process died by SIGSEGV with nothing in the
//! log but the listener's "client process crashed".
//!
//! Exiting (rather than aborting) is fine here: every process serves one
//! client and holds nothing that outlives it; the image goes with the fd.

/// Exit status after a panic: EX_SOFTWARE from sysexits.h, "an internal
/// software error has been detected".
pub const EXIT_BUG: u8 = 70;

/// Install the panic hook. Call once, after logging is set up.
pub fn install() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map_or_else(|| "unknown location".to_string(), |l| l.to_string());
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_string());
        tracing::error!(%location, panic = %message, "tmpdisk hit a bug and stops (a panic)");
        std::process::exit(i32::from(EXIT_BUG));
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The child half of the test below: with the hook installed and the
    /// serving phase's seccomp filter in place, panic. Runs only when the
    /// parent test starts this test binary again with the marker set.
    #[test]
    #[ignore = "run by a_panic_under_the_serving_filter_logs_and_exits_70"]
    fn panicking_child() {
        if std::env::var_os("TMPDISK_CRASH_CHILD").is_none() {
            return;
        }
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .init();
        install();
        crate::sandbox::lock_down().expect("seccomp filter");
        panic!("deliberate panic under the filter");
    }

    #[test]
    fn a_panic_under_the_serving_filter_logs_and_exits_70() {
        let exe = std::env::current_exe().expect("test binary");
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "crash::tests::panicking_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("TMPDISK_CRASH_CHILD", "1")
            .output()
            .expect("running the test binary");
        let stderr = String::from_utf8_lossy(&out.stderr);
        // The test harness reports a failed test with 101, and a signal
        // death has no code: only the hook exits with 70.
        assert_eq!(out.status.code(), Some(i32::from(EXIT_BUG)), "{stderr}");
        assert!(
            stderr.contains("tmpdisk hit a bug and stops")
                && stderr.contains("deliberate panic under the filter")
                && stderr.contains("src/crash.rs:"),
            "the log line must say what and where:\n{stderr}"
        );
    }
}

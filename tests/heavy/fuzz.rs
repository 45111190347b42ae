//! The fuzz targets of fuzz/ in the normal test run:
//!
//! - every committed input (the seed corpus in fuzz/corpus/TARGET/ and the
//!   fuzzer's past finds in fuzz/regressions/TARGET/) is replayed through
//!   the same harness the fuzzer runs, in this process, on every test run;
//! - each target is fuzzed for a bounded time with `cargo fuzz` (installed
//!   when missing), with libFuzzer's memory limits as part of the oracle.
//!   `TMPDISK_FUZZ_SECONDS` sets the time per target (default 30; 0 skips
//!   the fuzzing, not the replay).
//!
//! A crash the fuzzer finds lands in fuzz/artifacts/TARGET/; copy it into
//! fuzz/regressions/TARGET/ so it is replayed from then on.

#[path = "../../fuzz/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// A fuzz target's entry point.
type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("option_phase", harness::option_phase),
    ("request_phase", harness::request_phase),
    ("export_name", harness::export_name),
    ("handover", harness::handover),
    ("proxy_header", harness::proxy_header),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_none_or(|e| e != "md"))
        .collect();
    v.sort();
    v
}

#[test]
fn committed_corpus_and_regressions_replay_cleanly() {
    for (target, run) in TARGETS {
        let corpus = inputs(&fuzz_dir().join("corpus").join(target));
        assert!(
            corpus.len() >= 5,
            "fuzz/corpus/{target}/ must hold the seed corpus (fuzz/make_seeds.py writes it)"
        );
        let regressions = inputs(&fuzz_dir().join("regressions").join(target));
        for input in corpus.iter().chain(&regressions) {
            let data = std::fs::read(input).unwrap();
            let r = std::panic::catch_unwind(|| run(&data));
            assert!(
                r.is_ok(),
                "{target}: {} makes the harness panic",
                input.display()
            );
        }
    }
}

/// The cargo running this test (or the first on PATH).
fn cargo() -> Command {
    Command::new(
        std::env::var_os("CARGO")
            .or(option_env!("CARGO").map(Into::into))
            .unwrap_or_else(|| "cargo".into()),
    )
}

fn have_cargo_fuzz() -> bool {
    cargo()
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn fuzz_targets_run_clean_for_a_bounded_time() {
    let seconds: u64 = std::env::var("TMPDISK_FUZZ_SECONDS")
        .ok()
        .map(|s| {
            s.parse()
                .expect("TMPDISK_FUZZ_SECONDS: a number of seconds")
        })
        .unwrap_or(30);
    if seconds == 0 {
        eprintln!("TMPDISK_FUZZ_SECONDS=0: not fuzzing");
        return;
    }
    if !have_cargo_fuzz() {
        eprintln!("installing cargo-fuzz (cargo install cargo-fuzz --locked)");
        let st = cargo()
            .args(["install", "cargo-fuzz", "--locked"])
            .status()
            .expect("running cargo install");
        assert!(st.success(), "cargo install cargo-fuzz failed");
        assert!(have_cargo_fuzz(), "cargo fuzz still missing after install");
    }
    let fuzz = fuzz_dir();
    let scratch = std::env::temp_dir().join(format!("tmpdisk-fuzz-{}", std::process::id()));
    for (target, _) in TARGETS {
        // New inputs go to a scratch corpus; the committed one is only read.
        let work = scratch.join(target);
        std::fs::create_dir_all(&work).unwrap();
        let started = Instant::now();
        let out = cargo()
            .current_dir(&fuzz)
            // cargo fuzz needs nightly flags; stable takes them with this.
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", target])
            .arg(&work)
            .arg(fuzz.join("corpus").join(target))
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-max_len=16384",
                // Bounded memory is part of the oracle: the whole process
                // (ASan's own overhead included) and any single allocation.
                "-rss_limit_mb=1024",
                "-malloc_limit_mb=64",
                "-timeout=10",
                "-print_final_stats=1",
            ])
            .output()
            .expect("running cargo fuzz");
        let log = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        assert!(
            out.status.success(),
            "cargo fuzz run {target} failed ({}); the input is in fuzz/artifacts/{target}/: \
             copy it into fuzz/regressions/{target}/ and fix the bug\n{}",
            out.status,
            tail.join("\n")
        );
        let runs = log
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .map(|v| v.trim().to_string())
            .unwrap_or_default();
        eprintln!(
            "{target}: {runs} runs in {:.0?} (including the build)",
            started.elapsed()
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

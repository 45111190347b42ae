//! The option phase: arbitrary client bytes after the server's greeting.
//! See fuzz/harness.rs for the selector byte and the oracle.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::option_phase(data));

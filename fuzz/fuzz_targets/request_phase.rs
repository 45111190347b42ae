//! The request phase: arbitrary client bytes after a fixed, valid GO.
//! See fuzz/harness.rs for the selector byte and the oracle.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::request_phase(data));

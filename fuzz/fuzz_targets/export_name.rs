//! Export names: what a client sends as the name it wants, resolved
//! against a catalog with choices. See fuzz/harness.rs for the oracle.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::export_name(data));

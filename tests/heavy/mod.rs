//! Tests that build or boot something big; see tests/tests.rs.

mod fuzz;
mod kernel_client;
mod systemd_e2e;

//! The integration tests, one binary (as ripgrep does): the helpers in
//! `common` compile once, and the suite links once.
//!
//! `heavy` holds the tests that build or boot something big (the fuzz
//! targets, a guest with the kernel's NBD client, packages in a booted
//! systemd); `tests/run` runs them on their own, one at a time, after the
//! rest, so that their load cannot skew the tests that measure time.

mod common;

mod activation;
mod balancer;
mod errors;
mod export_info;
mod faults;
mod filesystems;
mod golden;
mod heavy;
mod io;
mod lifecycle;
mod mkfs;
mod named_exports;
mod properties;
mod proxy;
mod reconnect;
mod tls;
mod write_accounting;

//! tmpdisk: an NBD server that gives every client a fresh, empty, temporary
//! filesystem of its own and forgets it when the client goes.
//!
//! The life of one process: [`activation`] finds the client (or a listener,
//! whose [`listener`] forks one child per client); [`session`] negotiates,
//! builds the disk (`disk`: the [`image`] and `mkfs`) on the first
//! INFO/GO, serves requests ([`nbd`]) and exits; the image, having no name,
//! goes with the process.
//!
//! What is public is what the binary, the tests and the fuzz targets use;
//! the rest is the crate's own, so the compiler reports what nobody calls.
//! `unsafe` lives in `sys` alone.
#![deny(unsafe_code)]

pub mod activation;
pub mod agent;
pub mod base;
pub mod cli;
pub mod clonemap;
pub mod conn;
pub mod crash;
pub(crate) mod datamap;
pub(crate) mod disk;
pub mod exportname;
pub mod exports;
pub mod handover;
pub mod image;
pub mod listener;
pub mod logging;
pub(crate) mod mkfs;
pub mod nbd;
pub(crate) mod overlay;
pub mod proxy;
pub(crate) mod reconnect;
pub mod registry;
pub(crate) mod sandbox;
pub mod session;
pub(crate) mod status;
pub(crate) mod sys;
pub mod tls;

/// Process-wide setup before anything else runs (see `sys`).
pub use sys::{set_not_dumpable, set_signal_dispositions};

//! tmpdisk: an NBD server that gives every client a fresh, empty, temporary
//! filesystem of its own and forgets it when the client goes.
//!
//! The life of one process: [`activation`] finds the client (or a listener,
//! whose [`listener`] forks one child per client); [`session`] negotiates,
//! builds the [`image`] with [`mkfs`] on the first INFO/GO, serves requests
//! ([`nbd`]) and exits; the image, having no name, goes with the process.

pub mod activation;
pub mod cli;
pub mod conn;
pub mod crash;
pub mod disk;
pub mod image;
pub mod listener;
pub mod logging;
pub mod mkfs;
pub mod nbd;
pub mod sandbox;
pub mod session;
pub mod status;
pub mod sys;
pub mod tls;

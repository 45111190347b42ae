//! The NBD protocol, server side. No `unsafe` and no system calls here:
//! everything runs over a [`stream::Channel`] (a `Read + Write` byte stream
//! that may offer zero copy) and a [`storage::Storage`] (whatever holds the
//! disk); both are implemented outside `nbd/`.
#![forbid(unsafe_code)]

pub(crate) mod buf;
pub mod error;
pub mod negotiate;
pub mod storage;
pub mod stream;
pub mod transmit;
pub(crate) mod validate;
pub mod wire;

#[cfg(test)]
mod tests;

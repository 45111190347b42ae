//! The NBD protocol, server side. No `unsafe` and no system calls here:
//! everything runs over a `Read + Write` stream and an [`crate::image::Image`].
#![forbid(unsafe_code)]

pub mod buf;
pub mod error;
pub mod negotiate;
pub mod storage;
pub mod stream;
pub mod transmit;
pub mod validate;
pub mod wire;

#[cfg(test)]
mod tests;

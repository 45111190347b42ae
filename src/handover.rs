//! The bytes of a reconnect handover (see [`crate::reconnect`]): what a
//! taker sends to prove the key, and the holder's offer that goes with
//! the disk's files. Big-endian, through the one byte cursor
//! ([`Reader`]); every field is checked before anything is built from it.
//! No system calls here.

use crate::nbd::wire::{Put, Reader};

const REQUEST_MAGIC: &[u8; 4] = b"TDRQ";
const OFFER_MAGIC: &[u8; 4] = b"TDHO";
const VERSION: u8 = 1;

/// magic, version, key.
pub const REQUEST_LEN: usize = 4 + 1 + 32;
/// magic, version, kind, size, owned leaves, waited ms.
pub const OFFER_LEN: usize = 4 + 1 + 1 + 8 + 8 + 8;
/// The most files an offer carries (an overlay: delta, base and the
/// listening socket).
pub const MAX_FILES: usize = 3;
/// One leaf of an overlay's block map on the wire: its index, then its
/// words (see [`crate::overlay`]).
pub const LEAF_BYTES: usize = 8 + 8 * crate::overlay::LEAF_WORDS;

/// What kind of disk is handed over, and so which files come with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The image.
    Image,
    /// The delta and the base, and the client's block map; `clone`: the
    /// delta began as a command's clone of the base (its log line and its
    /// capacity accounting say so after a reconnect too).
    Overlay { clone: bool },
}

impl Kind {
    /// The files that come with the offer: the disk's, then the holder's
    /// listening socket.
    fn files(self) -> usize {
        match self {
            Kind::Image => 2,
            Kind::Overlay { .. } => 3,
        }
    }
}

/// The holder's offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub kind: Kind,
    pub size: u64,
    /// Leaves of the overlay's block map that follow (0 for an image).
    pub leaves: u64,
    pub waited_ms: u64,
}

impl Offer {
    /// Bytes of block map that follow the offer.
    pub fn owned_len(&self) -> usize {
        self.leaves as usize * LEAF_BYTES
    }
}

/// Why an offer or request is not one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadHandover(pub &'static str);

impl std::fmt::Display for BadHandover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad reconnect handover: {}", self.0)
    }
}

impl std::error::Error for BadHandover {}

pub fn request(key: &[u8; 32]) -> Vec<u8> {
    let mut v = Vec::with_capacity(REQUEST_LEN);
    v.put(REQUEST_MAGIC).put(&[VERSION]).put(key);
    v
}

pub fn decode_request(b: &[u8]) -> Result<[u8; 32], BadHandover> {
    let mut r = Reader::new(b);
    if r.take(4) != Some(REQUEST_MAGIC) || r.take(1) != Some(&[VERSION]) {
        return Err(BadHandover("not a reconnect request"));
    }
    let key = r.take(32).ok_or(BadHandover("short request"))?;
    if !r.rest().is_empty() {
        return Err(BadHandover("trailing bytes after the request"));
    }
    let mut k = [0; 32];
    k.copy_from_slice(key);
    Ok(k)
}

pub fn encode_offer(o: &Offer) -> Vec<u8> {
    let kind = match o.kind {
        Kind::Image => 0,
        Kind::Overlay { clone: false } => 1,
        Kind::Overlay { clone: true } => 2,
    };
    let mut v = Vec::with_capacity(OFFER_LEN);
    v.put(OFFER_MAGIC)
        .put(&[VERSION, kind])
        .u64(o.size)
        .u64(o.leaves)
        .u64(o.waited_ms);
    v
}

/// An offer that came with `files` descriptors. The map's length is
/// bounded by the disk's size (one leaf per 128 MiB), so a holder cannot
/// make a taker allocate more than the disk's map.
pub fn decode_offer(b: &[u8], files: usize) -> Result<Offer, BadHandover> {
    let mut r = Reader::new(b);
    if r.take(4) != Some(OFFER_MAGIC) || r.take(1) != Some(&[VERSION]) {
        return Err(BadHandover("not a reconnect offer"));
    }
    let kind = match r.take(1) {
        Some([0]) => Kind::Image,
        Some([1]) => Kind::Overlay { clone: false },
        Some([2]) => Kind::Overlay { clone: true },
        Some(_) => return Err(BadHandover("unknown kind of disk")),
        None => return Err(BadHandover("short offer")),
    };
    let (Some(size), Some(leaves), Some(waited_ms)) = (r.u64(), r.u64(), r.u64()) else {
        return Err(BadHandover("short offer"));
    };
    if !r.rest().is_empty() {
        return Err(BadHandover("trailing bytes after the offer"));
    }
    if files != kind.files() {
        return Err(BadHandover("the wrong number of files for the disk"));
    }
    if size == 0 || size > i64::MAX as u64 {
        return Err(BadHandover("a disk size out of range"));
    }
    let most = match kind {
        Kind::Image => 0,
        Kind::Overlay { .. } => crate::overlay::leaves_for(size),
    };
    if leaves > most {
        return Err(BadHandover("more block map than the disk has"));
    }
    Ok(Offer {
        kind,
        size,
        leaves,
        waited_ms,
    })
}

/// A block map as an overlay's taker reads it, for a disk of `size`.
pub fn check_map(size: u64, map: &[u8]) -> Result<(), BadHandover> {
    crate::overlay::check_map(size, map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refusals() {
        let key = [7u8; 32];
        assert_eq!(decode_request(&request(&key)), Ok(key));
        assert!(decode_request(&request(&key)[..36]).is_err());
        let mut long = request(&key);
        long.push(0);
        assert!(decode_request(&long).is_err());

        let o = Offer {
            kind: Kind::Overlay { clone: false },
            size: 1 << 30,
            leaves: 8,
            waited_ms: 1500,
        };
        assert_eq!(decode_offer(&encode_offer(&o), 3), Ok(o.clone()));
        let clone = Offer {
            kind: Kind::Overlay { clone: true },
            ..o.clone()
        };
        assert_eq!(decode_offer(&encode_offer(&clone), 3), Ok(clone));
        assert!(decode_offer(&encode_offer(&o), 2).is_err(), "files");
        let too_many = Offer {
            leaves: 9,
            ..o.clone()
        };
        assert!(decode_offer(&encode_offer(&too_many), 3).is_err(), "leaves");
        let image = Offer {
            kind: Kind::Image,
            leaves: 1,
            ..o
        };
        assert!(
            decode_offer(&encode_offer(&image), 2).is_err(),
            "a map for an image"
        );
        let mut bad = encode_offer(&image);
        bad[5] = 9;
        assert!(decode_offer(&bad, 2).is_err(), "kind");
    }
}

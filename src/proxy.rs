//! The PROXY protocol (HAProxy's `doc/proxy-protocol.txt`, versions 1 and
//! 2): the header a load balancer sends before the client's first byte,
//! saying who the client really is. Parsing only; no system calls. The
//! bytes come from a trusted balancer (`--proxy-from`), but are checked as
//! if they did not: lengths are bounded before anything is kept.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::nbd::wire::Reader;

/// Version 2's signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 1's start.
pub const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// The longest version 1 line, CRLF included (the spec's 107).
pub const V1_MAX: usize = 107;
/// The most address and TLV bytes of a version 2 header we accept: the
/// largest addresses (UNIX: 216) plus room for the TLVs HAProxy sends
/// (ALPN, authority, CRC, unique id, SSL: a few hundred bytes). Larger is
/// refused, not read.
pub const V2_MAX_BODY: usize = 1024;
/// Enough bytes to decide: version 2's fixed part.
pub const V2_FIXED: usize = 16;

/// What the first bytes of a connection say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A header needs at least this many bytes in all; read more.
    Incomplete(usize),
    /// A complete header of `len` bytes; `source` is the client's address
    /// (None: the balancer speaks for itself, a health check, or the
    /// client is not on IP).
    Header {
        len: usize,
        source: Option<SocketAddr>,
    },
}

/// Why the bytes are not a PROXY header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadHeader(pub &'static str);

impl std::fmt::Display for BadHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad PROXY header: {}", self.0)
    }
}

/// Whether `start` (a connection's first bytes, at least 1) may begin a
/// PROXY header of either version.
pub fn looks_like_header(start: &[u8]) -> bool {
    let n = start.len().min(V1_PREFIX.len());
    start[..n] == V1_PREFIX[..n] || {
        let m = start.len().min(V2_SIGNATURE.len());
        start[..m] == V2_SIGNATURE[..m]
    }
}

/// Parse the header at the start of `buf` (what has arrived so far).
pub fn parse(buf: &[u8]) -> Result<Parsed, BadHeader> {
    if buf.is_empty() {
        return Ok(Parsed::Incomplete(V2_FIXED.min(V1_PREFIX.len())));
    }
    if !looks_like_header(buf) {
        return Err(BadHeader("the connection does not start with one"));
    }
    if buf[0] == b'P' {
        return parse_v1(buf);
    }
    if buf.len() < V2_FIXED {
        return Ok(Parsed::Incomplete(V2_FIXED));
    }
    parse_v2(buf)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, BadHeader> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX {
            return Err(BadHeader("a version 1 line longer than 107 bytes"));
        }
        return Ok(Parsed::Incomplete(buf.len() + 1));
    };
    let len = end + 2;
    if len > V1_MAX {
        return Err(BadHeader("a version 1 line longer than 107 bytes"));
    }
    let line = std::str::from_utf8(&buf[V1_PREFIX.len()..end])
        .map_err(|_| BadHeader("a version 1 line that is not text"))?;
    let fields: Vec<&str> = line.split(' ').collect();
    let source = match fields.as_slice() {
        // The balancer could not tell: use the connection's own address.
        ["UNKNOWN", ..] => None,
        [proto @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let src: IpAddr = src.parse().map_err(|_| BadHeader("a bad source address"))?;
            let _: IpAddr = dst
                .parse()
                .map_err(|_| BadHeader("a bad destination address"))?;
            if (*proto == "TCP4") != src.is_ipv4() {
                return Err(BadHeader("an address of the other family"));
            }
            let port = |p: &str| {
                // Decimal, no sign, no leading zero (the spec's form).
                (!p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| p.parse::<u16>().ok())
                    .flatten()
                    .ok_or(BadHeader("a bad port"))
            };
            let sport = port(sport)?;
            port(dport)?;
            Some(SocketAddr::new(src, sport))
        }
        _ => return Err(BadHeader("a version 1 line of the wrong form")),
    };
    Ok(Parsed::Header { len, source })
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, BadHeader> {
    let mut r = Reader::new(&buf[V2_SIGNATURE.len()..]);
    let short = BadHeader("short");
    let ver_cmd = r.take(1).ok_or(short.clone())?[0];
    let fam = r.take(1).ok_or(short.clone())?[0];
    let body = r.u16().ok_or(short)? as usize;
    if ver_cmd >> 4 != 2 {
        return Err(BadHeader("not version 2"));
    }
    if body > V2_MAX_BODY {
        return Err(BadHeader("more than 1024 bytes of addresses and TLVs"));
    }
    let len = V2_FIXED + body;
    if buf.len() < len {
        return Ok(Parsed::Incomplete(len));
    }
    let mut a = Reader::new(&buf[V2_FIXED..len]);
    let source = match (ver_cmd & 0x0f, fam) {
        // LOCAL: the balancer's own connection (a health check); the spec
        // says to discard the whole block, addresses and TLVs.
        (0, _) => return Ok(Parsed::Header { len, source: None }),
        // PROXY over TCP or UDP on IPv4, then IPv6.
        (1, 0x11 | 0x12) => {
            let bad = BadHeader("an IPv4 block shorter than 12 bytes");
            let src = a.take(4).ok_or(bad.clone())?;
            a.take(4).ok_or(bad.clone())?;
            let sport = a.u16().ok_or(bad.clone())?;
            a.u16().ok_or(bad)?;
            let ip = Ipv4Addr::new(src[0], src[1], src[2], src[3]);
            Some(SocketAddr::new(IpAddr::V4(ip), sport))
        }
        (1, 0x21 | 0x22) => {
            let bad = BadHeader("an IPv6 block shorter than 36 bytes");
            let src: [u8; 16] = a
                .take(16)
                .and_then(|s| s.try_into().ok())
                .ok_or(bad.clone())?;
            a.take(16).ok_or(bad.clone())?;
            let sport = a.u16().ok_or(bad.clone())?;
            a.u16().ok_or(bad)?;
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(src)), sport))
        }
        // UNSPEC: no addresses, and nothing said about the rest.
        (1, 0x00) => return Ok(Parsed::Header { len, source: None }),
        // UNIX: two 108-byte paths, no IP to speak of; TLVs follow.
        (1, 0x31 | 0x32) => {
            a.take(216)
                .ok_or(BadHeader("a UNIX block shorter than 216 bytes"))?;
            None
        }
        (1, _) => return Err(BadHeader("an unknown address family")),
        _ => return Err(BadHeader("an unknown command")),
    };
    // What follows the addresses are TLVs: each must fit exactly.
    let mut tlvs = Reader::new(a.rest());
    while !tlvs.rest().is_empty() {
        let _kind = tlvs.take(1).ok_or(BadHeader("a truncated TLV"))?;
        let n = tlvs.u16().ok_or(BadHeader("a truncated TLV"))? as usize;
        tlvs.take(n)
            .ok_or(BadHeader("a TLV longer than the header"))?;
    }
    Ok(Parsed::Header { len, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut v = V2_SIGNATURE.to_vec();
        v.push(0x20 | cmd);
        v.push(fam);
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn version_1() {
        let h = b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 10809\r\nNBD";
        assert_eq!(
            parse(h),
            Ok(Parsed::Header {
                len: h.len() - 3,
                source: Some("192.0.2.7:51234".parse().unwrap())
            })
        );
        let h6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 10809\r\n";
        assert!(
            matches!(parse(h6), Ok(Parsed::Header { source: Some(s), .. }) if s.port() == 4000)
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Ok(Parsed::Header {
                len: 15,
                source: None
            })
        );
        assert_eq!(parse(b"PROXY TCP4 1.2"), Ok(Parsed::Incomplete(15)));
        assert_eq!(parse(b"PRO"), Ok(Parsed::Incomplete(4)));
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n"[..],
            b"PROXY TCP4 2001:db8::1 5.6.7.8 1 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 1\r\n",
            b"PROXY garbage\r\n",
            b"GET / HTTP/1.0\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = [b"PROXY ".as_slice(), &[b'x'; 120]].concat();
        assert!(parse(&long).is_err(), "no CRLF within 107 bytes");
    }

    #[test]
    fn version_2() {
        let mut body = vec![192, 0, 2, 7, 10, 0, 0, 1];
        body.extend_from_slice(&51234u16.to_be_bytes());
        body.extend_from_slice(&10809u16.to_be_bytes());
        let h = v2(1, 0x11, &body);
        assert_eq!(
            parse(&h),
            Ok(Parsed::Header {
                len: 28,
                source: Some("192.0.2.7:51234".parse().unwrap())
            })
        );
        assert_eq!(parse(&h[..20]), Ok(Parsed::Incomplete(28)));
        assert_eq!(parse(&h[..5]), Ok(Parsed::Incomplete(16)));
        // A TLV (ALPN "nbd") after the addresses.
        let mut with_tlv = body.clone();
        with_tlv.extend_from_slice(&[0x01, 0, 3, b'n', b'b', b'd']);
        assert!(matches!(
            parse(&v2(1, 0x11, &with_tlv)),
            Ok(Parsed::Header { len: 34, .. })
        ));
        // LOCAL: a health check; no address, whatever the block holds.
        assert_eq!(
            parse(&v2(0, 0x11, &body)),
            Ok(Parsed::Header {
                len: 28,
                source: None
            })
        );
        // UNIX addresses, then a TLV.
        let unix = [vec![b'/'; 216], vec![0x01, 0, 1, b'x']].concat();
        assert_eq!(
            parse(&v2(1, 0x31, &unix)),
            Ok(Parsed::Header {
                len: 16 + 220,
                source: None
            })
        );
        assert!(parse(&v2(1, 0x31, &unix[..100])).is_err());
        assert_eq!(
            parse(&v2(0, 0, &[])),
            Ok(Parsed::Header {
                len: 16,
                source: None
            })
        );
        let mut v6 = vec![0x20, 0x01, 0x0d, 0xb8];
        v6.extend_from_slice(&[0; 12]);
        v6.extend_from_slice(&[0; 16]);
        v6.extend_from_slice(&[0x0f, 0xa0, 0x2a, 0x39]);
        assert!(
            matches!(parse(&v2(1, 0x21, &v6)), Ok(Parsed::Header { source: Some(s), .. }) if s.port() == 4000)
        );
        for bad in [
            v2(1, 0x11, &body[..8]),
            v2(1, 0x11, &[body.clone(), vec![0x01, 0, 9, 1]].concat()),
            v2(1, 0x51, &body),
            v2(3, 0x11, &body),
            v2(1, 0x11, &vec![0; 2000]),
        ] {
            assert!(parse(&bad).is_err(), "{bad:?}");
        }
        let mut v1_ver = v2(1, 0x11, &body);
        v1_ver[12] = 0x11;
        assert!(parse(&v1_ver).is_err(), "version 1 in a version 2 header");
    }
}

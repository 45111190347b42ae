//! Just enough of an NBD client, written by hand, for what the real clients
//! cannot do: negotiate and then vanish without NBD_CMD_DISC, or read the
//! server's error reply over a socket the test owns (`--stdio`).

use std::io::{self, Read, Write};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_GO: u32 = 7;
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const INFO_EXPORT: u16 = 0;

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads the fixed-newstyle greeting and answers with the client flags.
/// Returns the server's handshake flags.
pub fn handshake<S: Read + Write>(s: &mut S) -> io::Result<u16> {
    let magic = read_u64(s)?;
    if magic != NBDMAGIC {
        return Err(bad(format!("greeting magic {magic:#x}, expected NBDMAGIC")));
    }
    let opt = read_u64(s)?;
    if opt != IHAVEOPT {
        return Err(bad(format!("greeting magic {opt:#x}, expected IHAVEOPT")));
    }
    let flags = read_u16(s)?;
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(bad(format!("server flags {flags:#x} lack FIXED_NEWSTYLE")));
    }
    let client = u32::from(flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    s.write_all(&client.to_be_bytes())?;
    Ok(flags)
}

fn send_option<S: Write>(s: &mut S, option: u32, data: &[u8]) -> io::Result<()> {
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    s.write_all(&msg)
}

/// What the server said to NBD_OPT_GO.
#[derive(Debug)]
pub enum GoReply {
    Ok { size: u64, flags: u16 },
    Err { reply_type: u32, message: String },
}

/// Sends NBD_OPT_GO for the default export ("") and reads the replies up to
/// the ACK or the error.
pub fn opt_go<S: Read + Write>(s: &mut S) -> io::Result<GoReply> {
    // name length 0, no name, 0 information requests
    send_option(s, OPT_GO, &[0, 0, 0, 0, 0, 0])?;
    let mut export = None;
    loop {
        let magic = read_u64(s)?;
        if magic != OPT_REPLY_MAGIC {
            return Err(bad(format!("option reply magic {magic:#x}")));
        }
        let option = read_u32(s)?;
        if option != OPT_GO {
            return Err(bad(format!("reply to option {option}, expected GO")));
        }
        let reply_type = read_u32(s)?;
        let len = read_u32(s)?;
        if len > 1 << 20 {
            return Err(bad(format!("option reply length {len}")));
        }
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload)?;
        if reply_type & REP_FLAG_ERROR != 0 {
            return Ok(GoReply::Err {
                reply_type,
                message: String::from_utf8_lossy(&payload).into_owned(),
            });
        }
        match reply_type {
            REP_ACK => {
                let (size, flags) =
                    export.ok_or_else(|| bad("ACK to GO without NBD_INFO_EXPORT".into()))?;
                return Ok(GoReply::Ok { size, flags });
            }
            REP_INFO if payload.len() >= 2 => {
                let info = u16::from_be_bytes([payload[0], payload[1]]);
                if info == INFO_EXPORT {
                    if payload.len() != 12 {
                        return Err(bad(format!("NBD_INFO_EXPORT of {} bytes", payload.len())));
                    }
                    let size = u64::from_be_bytes(payload[2..10].try_into().unwrap());
                    let flags = u16::from_be_bytes([payload[10], payload[11]]);
                    export = Some((size, flags));
                }
            }
            other => return Err(bad(format!("unexpected reply type {other} to GO"))),
        }
    }
}

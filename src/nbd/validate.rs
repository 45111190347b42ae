//! The one request validator. Every request passes through [`validate`]
//! before it touches the disk; the checks run cheapest first: the command,
//! its flags, the length, then the range against the export size. A
//! rejected request gets an error reply and the session goes on.

use super::error::ReplyError;
use super::negotiate::Replies;
use super::wire::*;

/// A request that passed validation, with the flags that matter to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read { df: bool },
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes { no_hole: bool, fast: bool },
    BlockStatus { req_one: bool },
}

/// What validation needs to know about the session.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub size: u64,
    pub replies: Replies,
    pub base_allocation: bool,
}

/// How many payload bytes follow this request header on the wire. They
/// must be consumed whether or not the request is valid, or the stream
/// loses its framing.
///
/// A WRITE's length is its payload in both header styles (with extended
/// headers qemu sends WRITE without NBD_CMD_FLAG_PAYLOAD_LEN, and qemu's own
/// server reads the payload regardless); with extended headers any other
/// command that sets PAYLOAD_LEN carries `length` bytes too.
pub fn payload_len(req: &Request, replies: Replies) -> u64 {
    match replies {
        _ if req.command == CMD_WRITE => req.length,
        Replies::Extended if req.flags & CMD_FLAG_PAYLOAD_LEN != 0 => req.length,
        _ => 0,
    }
}

/// The largest payload we read and throw away to answer a bad request
/// with an error rather than hanging up. The spec asks servers not to treat
/// payloads up to 32 MiB as an attack; we go to twice that.
pub fn max_drain(replies: Replies) -> u64 {
    match replies {
        // With extended headers the spec asks for a hard disconnect when a
        // payload exceeds the maximum.
        Replies::Extended => u64::from(MAX_PAYLOAD),
        _ => 2 * u64::from(MAX_PAYLOAD),
    }
}

pub fn validate(req: &Request, lim: &Limits) -> Result<Command, ReplyError> {
    let f = req.flags;
    // Flags each command accepts. FUA is accepted on every command because
    // we advertise SEND_FUA (the spec requires it); PAYLOAD_LEN only exists
    // with extended headers, and only WRITE carries a payload.
    let payload_flag = if lim.replies == Replies::Extended {
        CMD_FLAG_PAYLOAD_LEN
    } else {
        0
    };
    let allowed = CMD_FLAG_FUA
        | match req.command {
            CMD_READ if lim.replies.structured() => CMD_FLAG_DF,
            CMD_WRITE => payload_flag,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            CMD_READ | CMD_DISC | CMD_FLUSH | CMD_TRIM | CMD_CACHE => 0,
            other => {
                return Err(ReplyError::invalid(format!("unknown command {other}")));
            }
        };
    if f & !allowed != 0 {
        return Err(ReplyError::invalid(format!(
            "flags {:#x} not valid for {}",
            f & !allowed,
            command_name(req.command)
        )));
    }

    let cmd = match req.command {
        CMD_READ => Command::Read {
            df: f & CMD_FLAG_DF != 0,
        },
        CMD_WRITE => Command::Write,
        CMD_DISC => return Ok(Command::Disc),
        CMD_FLUSH => {
            if req.offset != 0 || req.length != 0 {
                return Err(ReplyError::invalid("NBD_CMD_FLUSH with offset or length"));
            }
            return Ok(Command::Flush);
        }
        CMD_TRIM => Command::Trim,
        CMD_CACHE => Command::Cache,
        CMD_WRITE_ZEROES => Command::WriteZeroes {
            no_hole: f & CMD_FLAG_NO_HOLE != 0,
            fast: f & CMD_FLAG_FAST_ZERO != 0,
        },
        _ => {
            if !lim.base_allocation {
                return Err(ReplyError::invalid(
                    "NBD_CMD_BLOCK_STATUS without a selected metadata context",
                ));
            }
            Command::BlockStatus {
                req_one: f & CMD_FLAG_REQ_ONE != 0,
            }
        }
    };

    if req.length == 0 {
        return Err(ReplyError::invalid(format!(
            "{} of length 0",
            command_name(req.command)
        )));
    }
    if matches!(cmd, Command::Read { .. } | Command::Write) && req.length > u64::from(MAX_PAYLOAD) {
        return Err(ReplyError::invalid(format!(
            "{} of {} bytes exceeds the maximum payload of {MAX_PAYLOAD}",
            command_name(req.command),
            req.length
        )));
    }
    let end = req.offset.checked_add(req.length);
    if end.is_none_or(|e| e > lim.size) {
        // Writing past the end is "no space"; anything else is invalid.
        let errno = match cmd {
            Command::Write | Command::WriteZeroes { .. } if end.is_some() => ENOSPC,
            _ => EINVAL,
        };
        return Err(ReplyError::new(
            errno,
            format!(
                "{} at {} + {} is beyond the end of the disk ({})",
                command_name(req.command),
                req.offset,
                req.length,
                lim.size
            ),
        ));
    }
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIM: Limits = Limits {
        size: 1 << 20,
        replies: Replies::Structured,
        base_allocation: true,
    };

    fn req(command: u16, flags: u16, offset: u64, length: u64) -> Request {
        Request {
            flags,
            command,
            cookie: 1,
            offset,
            length,
        }
    }

    fn errno(r: Result<Command, ReplyError>) -> u32 {
        r.expect_err("should be rejected").errno
    }

    #[test]
    fn range_checks_pick_the_spec_errno() {
        assert_eq!(
            errno(validate(&req(CMD_WRITE, 0, 1 << 20, 1), &LIM)),
            ENOSPC
        );
        assert_eq!(
            errno(validate(&req(CMD_WRITE_ZEROES, 0, 1 << 20, 1), &LIM)),
            ENOSPC
        );
        assert_eq!(errno(validate(&req(CMD_READ, 0, 1 << 20, 1), &LIM)), EINVAL);
        assert_eq!(errno(validate(&req(CMD_TRIM, 0, 1 << 20, 1), &LIM)), EINVAL);
        assert_eq!(
            errno(validate(&req(CMD_BLOCK_STATUS, 0, 1 << 20, 1), &LIM)),
            EINVAL
        );
        // offset + length wraps: invalid, not "no space".
        assert_eq!(
            errno(validate(&req(CMD_WRITE, 0, u64::MAX, 2), &LIM)),
            EINVAL
        );
        assert!(validate(&req(CMD_READ, 0, (1 << 20) - 1, 1), &LIM).is_ok());
    }

    #[test]
    fn flags_must_fit_the_command() {
        assert_eq!(
            errno(validate(&req(CMD_READ, CMD_FLAG_NO_HOLE, 0, 1), &LIM)),
            EINVAL
        );
        assert_eq!(
            errno(validate(&req(CMD_WRITE, CMD_FLAG_DF, 0, 1), &LIM)),
            EINVAL
        );
        assert_eq!(errno(validate(&req(CMD_READ, 1 << 9, 0, 1), &LIM)), EINVAL);
        assert_eq!(
            errno(validate(&req(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 1), &LIM)),
            EINVAL
        );
        // FUA is accepted everywhere.
        assert!(validate(&req(CMD_TRIM, CMD_FLAG_FUA, 0, 1), &LIM).is_ok());
        assert!(validate(&req(CMD_READ, CMD_FLAG_FUA | CMD_FLAG_DF, 0, 1), &LIM).is_ok());
        let simple = Limits {
            replies: Replies::Simple,
            ..LIM
        };
        assert_eq!(
            errno(validate(&req(CMD_READ, CMD_FLAG_DF, 0, 1), &simple)),
            EINVAL
        );
    }

    #[test]
    fn unknown_zero_length_and_oversized_requests_are_invalid() {
        assert_eq!(errno(validate(&req(99, 0, 0, 1), &LIM)), EINVAL);
        assert_eq!(errno(validate(&req(CMD_READ, 0, 0, 0), &LIM)), EINVAL);
        let big = Limits {
            size: 1 << 40,
            ..LIM
        };
        let over = u64::from(MAX_PAYLOAD) + 1;
        assert_eq!(errno(validate(&req(CMD_READ, 0, 0, over), &big)), EINVAL);
        assert_eq!(errno(validate(&req(CMD_WRITE, 0, 0, over), &big)), EINVAL);
        // Commands without a payload may cover more.
        assert!(validate(&req(CMD_TRIM, 0, 0, over), &big).is_ok());
    }

    #[test]
    fn block_status_needs_a_context() {
        let none = Limits {
            base_allocation: false,
            ..LIM
        };
        assert_eq!(
            errno(validate(&req(CMD_BLOCK_STATUS, 0, 0, 1), &none)),
            EINVAL
        );
    }

    #[test]
    fn extended_writes_carry_their_payload_with_or_without_payload_len() {
        let ext = Limits {
            replies: Replies::Extended,
            ..LIM
        };
        // qemu 10 sends WRITE without PAYLOAD_LEN under extended headers.
        assert!(validate(&req(CMD_WRITE, 0, 0, 1), &ext).is_ok());
        assert!(validate(&req(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 1), &ext).is_ok());
        let r = req(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 7);
        assert_eq!(payload_len(&r, Replies::Extended), 7);
        assert_eq!(payload_len(&req(CMD_WRITE, 0, 0, 7), Replies::Extended), 7);
        assert_eq!(payload_len(&req(CMD_WRITE, 0, 0, 7), Replies::Simple), 7);
        // Any other command with PAYLOAD_LEN: the payload must be consumed.
        let bs = req(CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN, 0, 12);
        assert_eq!(payload_len(&bs, Replies::Extended), 12);
        assert_eq!(errno(validate(&bs, &ext)), EINVAL);
    }
}

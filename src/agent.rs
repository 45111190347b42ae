//! The capacity agent (`tmpdisk --agent`): answers HAProxy's `agent-check`
//! with one line saying how many more clients this host can take, from
//! its real state. It reads; it never makes a disk.
//!
//! What a new client needs is what the server's admission asks (the
//! tmpdir above `--min-free`, a connection slot) and room for its disk
//! once every connected disk has taken what it still may: free space,
//! less the reserve, less the connected disks' outstanding claims (their
//! size less what they take now, from [`crate::registry`]) divided by
//! `--overcommit`. The answer is
//!
//! - `drain` when a new client of the default export's size would not
//!   fit (HAProxy then sends it nowhere here, and the clients already
//!   here stay);
//! - otherwise `ready W% maxconn:N`: W the share of the host's client
//!   slots still usable (at least 1), N the clients it can hold in all,
//!   so that HAProxy never queues more onto it than that.

use std::fmt;

use tracing::{debug, warn};

use crate::cli::{Config, MinFree};
use crate::conn::Conn;
use crate::registry::{self, Claim};

/// The host as the agent sees it.
#[derive(Debug, Clone)]
pub struct Host {
    /// Free and total bytes of the tmpdir's filesystem.
    pub free: u64,
    pub total: u64,
    /// The disks alive now.
    pub claims: Vec<Claim>,
}

/// The limits it is measured against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub min_free: MinFree,
    /// Clients at once (the socket's MaxConnections).
    pub max_clients: u32,
    /// The size of a new client's disk (the default export's).
    pub new_size: u64,
    /// Outstanding claims are counted divided by this (≥ 1).
    pub overcommit: f64,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Room for `more` clients: weight `percent`, `maxconn` in all.
    Ready {
        more: u64,
        percent: u8,
        maxconn: u64,
    },
    /// No room for one more, and why.
    Drain(Full),
}

/// Why a host takes no new client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The tmpdir is below --min-free: the server itself would refuse.
    BelowMinFree,
    /// Every connection slot is taken.
    Slots,
    /// The connected disks may claim what is left.
    Claimed,
}

impl fmt::Display for Answer {
    /// The line HAProxy reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::Ready {
                percent, maxconn, ..
            } => writeln!(f, "ready {percent}% maxconn:{maxconn}"),
            // No maxconn: HAProxy reads maxconn:0 as "no limit".
            Answer::Drain(_) => writeln!(f, "drain"),
        }
    }
}

impl fmt::Display for Full {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Full::BelowMinFree => "the tmpdir is below --min-free",
            Full::Slots => "every connection slot is taken",
            Full::Claimed => "the connected disks may claim the free space",
        })
    }
}

/// What this host can take (pure: the unit tests drive it).
pub fn assess(host: &Host, limits: &Limits) -> Answer {
    let reserve = limits.min_free.bytes(host.total);
    if host.free < reserve {
        return Answer::Drain(Full::BelowMinFree);
    }
    let clients = host.claims.len() as u64;
    let slots = u64::from(limits.max_clients).saturating_sub(clients);
    if slots == 0 {
        return Answer::Drain(Full::Slots);
    }
    let outstanding: u128 = host
        .claims
        .iter()
        .map(|c| u128::from(c.outstanding()))
        .sum();
    let owed = (outstanding as f64 / limits.overcommit.max(1.0)).ceil() as u128;
    let room = u128::from(host.free - reserve).saturating_sub(owed);
    let by_space = match limits.new_size {
        0 => u128::from(slots),
        size => room / u128::from(size),
    };
    let more = u64::try_from(by_space.min(u128::from(slots))).unwrap_or(slots);
    if more == 0 {
        return Answer::Drain(Full::Claimed);
    }
    let percent = (more * 100).div_ceil(u64::from(limits.max_clients.max(1)));
    Answer::Ready {
        more,
        percent: percent.clamp(1, 100) as u8,
        maxconn: clients + more,
    }
}

/// Measure this host now.
pub fn measure(cfg: &Config) -> Result<Host, String> {
    let (free, total) = crate::disk::free_space(&cfg.tmpdir)?;
    let (claims, skipped) = registry::census(&cfg.registry_dir).map_err(|e| {
        format!(
            "cannot read the clients directory {}: {e}",
            cfg.registry_dir.display()
        )
    })?;
    if skipped > 0 {
        debug!(skipped, "registry entries skipped (stale or not entries)");
    }
    Ok(Host {
        free,
        total,
        claims,
    })
}

/// The limits `cfg` sets.
pub fn limits(cfg: &Config) -> Limits {
    Limits {
        min_free: cfg.min_free,
        max_clients: cfg.limits.max_connections as u32,
        new_size: cfg.exports.new_client_size(),
        overcommit: cfg.overcommit,
    }
}

/// Answer one agent connection: the line, then close. Nothing the peer
/// sends is read (HAProxy's `agent-send` string, if any, is ignored).
/// Returns the exit code.
pub fn answer(mut conn: Conn, peer: &str, cfg: &Config) -> u8 {
    let answer = match measure(cfg) {
        Ok(host) => {
            let a = assess(&host, &limits(cfg));
            debug!(
                %peer,
                free = host.free,
                clients = host.claims.len(),
                answer = %a.to_string().trim_end(),
                "agent check"
            );
            if let Answer::Drain(why) = &a {
                debug!(reason = %why, "draining");
            }
            a
        }
        Err(e) => {
            // A host that cannot see its own tmpdir takes no new client.
            warn!(error = %e, "agent: cannot measure this host; answering drain");
            Answer::Drain(Full::BelowMinFree)
        }
    };
    // The line; the connection closes as `conn` goes.
    if let Err(e) = std::io::Write::write_all(&mut conn, answer.to_string().as_bytes()) {
        debug!(%peer, error = %e, "agent: the checker left before the answer");
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    fn limits() -> Limits {
        Limits {
            min_free: MinFree::Bytes(10 * G),
            max_clients: 10,
            new_size: 4 * G,
            overcommit: 1.0,
        }
    }

    fn host(free: u64, claims: &[(u64, u64)]) -> Host {
        Host {
            free,
            total: 1000 * G,
            claims: claims
                .iter()
                .map(|&(size, taken)| Claim { size, taken })
                .collect(),
        }
    }

    #[test]
    fn an_empty_host_offers_every_slot() {
        let a = assess(&host(500 * G, &[]), &limits());
        assert_eq!(
            a,
            Answer::Ready {
                more: 10,
                percent: 100,
                maxconn: 10
            }
        );
        assert_eq!(a.to_string(), "ready 100% maxconn:10\n");
    }

    #[test]
    fn space_limits_before_slots_do() {
        // 30 G above the reserve: 7 disks of 4 G.
        let a = assess(&host(40 * G, &[]), &limits());
        assert_eq!(
            a,
            Answer::Ready {
                more: 7,
                percent: 70,
                maxconn: 7
            }
        );
    }

    #[test]
    fn connected_disks_claim_what_they_have_not_taken() {
        // Two 8 G disks that took 2 G each still claim 12 G of the 30 G.
        let a = assess(&host(40 * G, &[(8 * G, 2 * G), (8 * G, 2 * G)]), &limits());
        assert_eq!(
            a,
            Answer::Ready {
                more: 4,
                percent: 40,
                maxconn: 6
            }
        );
        // Overcommitted 3×: they count 4 G.
        let over = Limits {
            overcommit: 3.0,
            ..limits()
        };
        assert_eq!(
            assess(&host(40 * G, &[(8 * G, 2 * G), (8 * G, 2 * G)]), &over),
            Answer::Ready {
                more: 6,
                percent: 60,
                maxconn: 8
            }
        );
    }

    #[test]
    fn a_full_host_drains_and_says_why() {
        assert_eq!(
            assess(&host(9 * G, &[]), &limits()),
            Answer::Drain(Full::BelowMinFree)
        );
        assert_eq!(
            assess(&host(13 * G, &[]), &limits()),
            Answer::Drain(Full::Claimed),
            "3 G above the reserve: no room for a 4 G disk"
        );
        assert_eq!(
            assess(&host(500 * G, &[(G, 0); 10]), &limits()),
            Answer::Drain(Full::Slots)
        );
        assert_eq!(assess(&host(9 * G, &[]), &limits()).to_string(), "drain\n");
    }

    #[test]
    fn the_weight_is_never_zero_while_there_is_room() {
        let many = Limits {
            max_clients: 1000,
            ..limits()
        };
        assert_eq!(
            assess(&host(14 * G, &[]), &many),
            Answer::Ready {
                more: 1,
                percent: 1,
                maxconn: 1
            }
        );
    }

    #[test]
    fn huge_numbers_do_not_overflow() {
        let h = host(u64::MAX, &[(u64::MAX, 0), (u64::MAX, 0)]);
        let a = assess(
            &h,
            &Limits {
                min_free: MinFree::Percent(100),
                max_clients: u32::MAX,
                new_size: 1,
                overcommit: 1.0,
            },
        );
        assert_eq!(a, Answer::Drain(Full::Claimed));
    }
}

//! What a client asks for in its export name: an export, and optionally
//! the shape it wants within what the admin allows there, as
//! `NAME[:key=value...]`, e.g. `scratch:size=16G:type=xfs:label=build`.
//!
//! The syntax needs no escaping in any client's export name or URI:
//! `nbd://host/scratch:size=16G:type=xfs` (qemu, libnbd's nbdinfo and
//! nbdcopy), `nbd-client -N scratch:size=16G host /dev/nbd0`. Colons, not
//! commas, separate the choices because qemu's option syntax (`-blockdev
//! driver=nbd,...,export=NAME`, `-drive file=...`, which reconnect-delay
//! needs) splits at commas: a comma in a name would have to be doubled. Every part is
//! checked here, before anything else sees it: names and values are short,
//! of a restricted alphabet, and never reach a shell or a path (a type
//! names a program only after it is checked against the export's list).

use crate::cli::parse_size;

/// The longest export name the admin may define (and the client name).
pub const MAX_EXPORT_NAME: usize = 64;
/// The longest value of a choice (a label, a size, a type).
pub const MAX_VALUE: usize = 255;

/// A parsed export name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// The export ("" for the default one).
    pub export: String,
    pub size: Option<u64>,
    pub fs_type: Option<String>,
    pub label: Option<String>,
    /// The client's reconnect token (see [`valid_token`]): its disk
    /// outlives a dropped connection, for the client that knows it.
    pub id: Option<String>,
}

impl Request {
    /// Whether the client chose anything beyond the export itself.
    pub fn has_choices(&self) -> bool {
        self.size.is_some() || self.fs_type.is_some() || self.label.is_some()
    }
}

/// Why a name cannot be parsed; the text tells the client what is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameError(pub String);

impl std::fmt::Display for NameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `s` is a valid export name as the admin writes it: 1 to 64
/// characters of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.
pub fn valid_export(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_EXPORT_NAME
        && !s.starts_with(['.', '-'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The shortest reconnect token: 32 hex digits are 128 bits.
pub const MIN_TOKEN: usize = 32;
/// Fewer different characters than this cannot be a random token of
/// [`MIN_TOKEN`] characters (32 random hex digits have 15.9 on average,
/// and fewer than 10 with a probability below 10^-6).
pub const MIN_TOKEN_SYMBOLS: usize = 10;

/// Whether `token` can carry 128 bits of entropy. Randomness cannot be
/// measured from one sample; what can be refused is what cannot hold 128
/// bits: fewer than 32 characters (of an alphabet of 64 at most, that is
/// 192 bits for base64url and 128 for hex), or fewer than 10 different
/// characters (`aaaa...`, `0101...`, a counter).
pub fn valid_token(token: &str) -> Result<(), String> {
    let symbols = token
        .bytes()
        .fold(0u128, |seen, b| seen | 1 << (b % 128))
        .count_ones() as usize;
    if token.len() < MIN_TOKEN || symbols < MIN_TOKEN_SYMBOLS {
        return Err(format!(
            "id= must be a random token of at least {MIN_TOKEN} characters \
             (128 bits, e.g. `openssl rand -hex 16`)"
        ));
    }
    Ok(())
}

/// The name for logs: a reconnect token is a secret, so its value is
/// replaced (the reconnect lines carry a hash of the whole key instead).
pub fn redacted(name: &str) -> std::borrow::Cow<'_, str> {
    if !name.contains("id=") {
        return name.into();
    }
    let mut parts = name.split(':');
    let mut out = parts.next().unwrap_or_default().to_string();
    for p in parts {
        out.push(':');
        out.push_str(if p.starts_with("id=") {
            "id=(token)"
        } else {
            p
        });
    }
    out.into()
}

/// Parse what the client sent as its export name (already known to be
/// UTF-8 without NUL, at most 4096 bytes).
pub fn parse(name: &str) -> Result<Request, NameError> {
    let bad = |why: String| Err(NameError(why));
    let (export, choices) = match name.split_once(':') {
        Some((e, c)) => (e, Some(c)),
        None => (name, None),
    };
    if !export.is_empty() && !valid_export(export) {
        return bad(format!(
            "export name {:?} is not one: names are 1-{MAX_EXPORT_NAME} characters of \
             A-Z a-z 0-9 . _ -, then optionally :key=value:... (size, type, label, id)",
            truncated(export)
        ));
    }
    let mut r = Request {
        export: export.to_string(),
        ..Request::default()
    };
    let Some(choices) = choices else {
        return Ok(r);
    };
    if choices.is_empty() {
        return bad("nothing after ':' in the export name: expected key=value:...".into());
    }
    for pair in choices.split(':') {
        let Some((key, value)) = pair.split_once('=') else {
            return bad(format!(
                "{:?} in the export name is not key=value (keys: size, type, label, id)",
                truncated(pair)
            ));
        };
        if value.is_empty() || value.len() > MAX_VALUE {
            return bad(format!(
                "the value of {:?} must be 1-{MAX_VALUE} characters",
                truncated(key)
            ));
        }
        if value.contains(',') {
            return bad("choices in an export name are separated by ':', not ',' \
                 (e.g. scratch:size=16G:type=xfs)"
                .into());
        }
        if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return bad(format!(
                "the value of {:?} may hold only A-Z a-z 0-9 . _ -",
                truncated(key)
            ));
        }
        let slot_taken = match key {
            "size" => r
                .size
                .replace(parse_size(value).map_err(NameError)?)
                .is_some(),
            "type" => r.fs_type.replace(value.to_string()).is_some(),
            "label" => r.label.replace(value.to_string()).is_some(),
            "id" => {
                valid_token(value).map_err(NameError)?;
                r.id.replace(value.to_string()).is_some()
            }
            other => {
                return bad(format!(
                    "unknown key {:?} in the export name (keys: size, type, label, id)",
                    truncated(other)
                ));
            }
        };
        if slot_taken {
            return bad(format!("{key} is given twice in the export name"));
        }
    }
    Ok(r)
}

/// At most 64 characters of client text, for a message.
fn truncated(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_choices() {
        assert_eq!(parse("").unwrap(), Request::default());
        assert_eq!(parse("scratch").unwrap().export, "scratch");
        let r = parse("scratch:size=16G:type=xfs:label=build").unwrap();
        assert_eq!(r.size, Some(16 << 30));
        assert_eq!(r.fs_type.as_deref(), Some("xfs"));
        assert_eq!(r.label.as_deref(), Some("build"));
        assert!(r.has_choices());
        let r = parse(":size=2G").unwrap();
        assert_eq!((r.export.as_str(), r.size), ("", Some(2 << 30)));
        assert!(!parse("ci").unwrap().has_choices());
        let r = parse("ci:id=3f9c2d7e1a4b5c6d8e9f0a1b2c3d4e5f").unwrap();
        assert_eq!(r.id.as_deref(), Some("3f9c2d7e1a4b5c6d8e9f0a1b2c3d4e5f"));
        assert!(!r.has_choices(), "a token is not a choice of shape");
    }

    #[test]
    fn tokens_are_redacted_for_logs() {
        assert_eq!(redacted("scratch:size=1G"), "scratch:size=1G");
        assert_eq!(
            redacted("scratch:id=3f9c2d7e1a4b5c6d8e9f0a1b2c3d4e5f:size=1G"),
            "scratch:id=(token):size=1G"
        );
        assert_eq!(redacted(":id=secret"), ":id=(token)");
    }

    #[test]
    fn bad_names_say_what_is_allowed() {
        for (name, needle) in [
            ("scr atch", "not one"),
            ("../etc", "not one"),
            ("-x", "not one"),
            ("x:", "nothing after"),
            ("x:size", "not key=value"),
            ("x:size=", "must be 1-255"),
            ("x:size=1G:size=2G", "twice"),
            ("x:size=1G,type=xfs", "separated by ':'"),
            ("x:colour=red", "unknown key"),
            ("x:id=7f3c", "at least 32"),
            (
                "x:id=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                "at least 32",
            ),
            ("x:type=x$(reboot)", "only A-Z"),
            ("x:label=a/b", "only A-Z"),
            ("x:size=5Q", "unknown suffix"),
        ] {
            let e = parse(name).expect_err(name);
            assert!(e.0.contains(needle), "{name}: {e}");
        }
        assert!(parse(&"a".repeat(65)).is_err());
        assert!(parse(&"a".repeat(64)).is_ok());
    }
}

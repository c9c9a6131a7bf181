//! Checks on a command line's bytes before any parser sees them: invalid UTF-8 and NUL
//! never reach the session (SMTPUTF8 allows UTF-8, never broken UTF-8), and the EHLO /
//! HELO argument must be a domain or an address literal.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::reply::{Reply, fixed};

/// Why a command line was refused before parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadLine {
    #[error("command line holds a NUL byte")]
    Nul,
    #[error("command line is not valid UTF-8")]
    NotUtf8,
    #[error("command line holds a bare CR or LF")]
    BareLineBreak,
}

/// The line as text, CRLF (or a lone LF) stripped, when its bytes are acceptable.
/// Cheap: one pass over at most 1000 octets, no allocation.
pub fn text(line: &[u8]) -> Result<&str, BadLine> {
    let body = line.strip_suffix(b"\n").unwrap_or(line);
    let body = body.strip_suffix(b"\r").unwrap_or(body);
    if body.contains(&0) {
        return Err(BadLine::Nul);
    }
    if body.iter().any(|&b| b == b'\r' || b == b'\n') {
        return Err(BadLine::BareLineBreak);
    }
    std::str::from_utf8(body).map_err(|_| BadLine::NotUtf8)
}

/// The reply for a refused line: the envelope verbs name their field (RFC 3463 5.1.7
/// for the sender, 5.1.3 for a recipient), anything else is a syntax error (5.5.2).
pub fn refusal(line: &[u8]) -> Reply {
    let verb: Vec<u8> = line.iter().take(4).map(u8::to_ascii_uppercase).collect();
    match verb.as_slice() {
        b"MAIL" => fixed::BAD_SENDER_BYTES,
        b"RCPT" => fixed::BAD_RECIPIENT_BYTES,
        _ => fixed::BAD_BYTES,
    }
}

/// Whether `host` is acceptable as the EHLO / HELO argument: a domain (LDH labels, or
/// U-labels that IDNA accepts) or an address literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`).
/// Underscores are tolerated in labels: many Windows hosts announce themselves so.
pub fn valid_helo(host: &str) -> bool {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return match inner.get(..5) {
            Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => {
                inner[5..].parse::<Ipv6Addr>().is_ok()
            }
            _ => inner.parse::<Ipv4Addr>().is_ok(),
        };
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.len() > 253 {
        return false;
    }
    let ascii = if host.is_ascii() {
        std::borrow::Cow::Borrowed(host)
    } else {
        match idna::domain_to_ascii_strict(host) {
            Ok(a) => std::borrow::Cow::Owned(a),
            Err(_) => return false,
        }
    };
    ascii.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bytes_table() {
        assert_eq!(text(b"NOOP\r\n"), Ok("NOOP"));
        assert_eq!(text(b"EHLO a\x00b\r\n"), Err(BadLine::Nul));
        assert_eq!(
            text(b"MAIL FROM:<\xff\xfe@client.test>\r\n"),
            Err(BadLine::NotUtf8)
        );
        assert_eq!(text(b"NOOP\rRSET\r\n"), Err(BadLine::BareLineBreak));
        assert_eq!(
            text("MAIL FROM:<sénder@example.org> SMTPUTF8\r\n".as_bytes()),
            Ok("MAIL FROM:<sénder@example.org> SMTPUTF8")
        );
        assert_eq!(refusal(b"mail FROM:<\xff>").status(), "5.1.7");
        assert_eq!(refusal(b"RCPT TO:<\xff>").status(), "5.1.3");
        assert_eq!(refusal(b"EHLO a\x00b").status(), "5.5.2");
    }

    #[test]
    fn helo_table() {
        for ok in [
            "client.test",
            "localhost",
            "mail-1.example.org.",
            "win_host",
            "xn--bcher-kva.example",
            "bücher.example",
            "[192.0.2.1]",
            "[IPv6:2001:db8::1]",
        ] {
            assert!(valid_helo(ok), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "-a.test",
            "a..test",
            "[300.1.1.1]",
            "[IPv6:nothex]",
            "a<b>",
            "a\u{0}b",
            &"x".repeat(64),
        ] {
            assert!(!valid_helo(bad), "{bad:?}");
        }
    }

    proptest! {
        /// Whatever the bytes, the check answers without panicking, and what it lets
        /// through holds no NUL, no CR and no LF.
        #[test]
        fn any_bytes(line in proptest::collection::vec(any::<u8>(), 0..1100)) {
            if let Ok(t) = text(&line) {
                prop_assert!(!t.contains(['\0', '\r', '\n']));
            }
            let r = refusal(&line);
            prop_assert_eq!(r.code, 501);
        }

        #[test]
        fn helo_never_panics(host in "\\PC{0,80}") {
            let _ = valid_helo(&host);
        }
    }
}

//! Envelope address syntax (RFC 5321 §4.1.2, with RFC 6531 UTF-8) for recipients and
//! senders alike: the first, cheapest check at both doors, answered from memory with no
//! DNS query and no disk write. Whatever passes here is what goes into the envelope, so
//! it never holds a control character (CR, LF, NUL, ...).
//!
//! Called on the hot path for every recipient of a flood: no I/O, no awaits, one
//! allocation for the lower-cased domain (IDNA conversion only for non-ASCII domains).

use crate::reason::Reason;

/// A syntactically valid mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    /// The address as given (a UTF-8 domain stays as the client wrote it).
    pub address: String,
    /// The domain as IDNA A-labels in lower case (`xn--...` for a UTF-8 domain): the key
    /// for DNS, routes and rate limits.
    pub domain: String,
}

/// An envelope sender: the null reverse-path `<>` (bounces) or a mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sender {
    Null,
    Mailbox(Mailbox),
}

impl Sender {
    /// The reverse-path as stored and written into `MAIL FROM:<...>`: empty for `<>`.
    pub fn envelope(&self) -> &str {
        match self {
            Sender::Null => "",
            Sender::Mailbox(m) => &m.address,
        }
    }
}

const MAX_LOCAL: usize = 64;
const MAX_DOMAIN: usize = 253;
const MAX_ADDRESS: usize = 254;

/// Checks a recipient address. Refuses empty ones with `EmptyAddress` and everything else
/// that is not `local@domain` with `MalformedAddress`. Address literals (`user@[10.0.0.1]`)
/// are refused too: a relay that forwards to raw IPs is a relay someone will abuse.
/// Control characters and U+FFFD (the mark of bytes that were not UTF-8) are refused
/// anywhere, quoted local parts included.
pub fn parse(address: &str) -> Result<Mailbox, Reason> {
    if address.trim().is_empty() {
        return Err(Reason::EmptyAddress);
    }
    if address.len() > MAX_ADDRESS
        || address
            .chars()
            .any(|c| c.is_control() || c == char::REPLACEMENT_CHARACTER)
    {
        return Err(Reason::MalformedAddress);
    }
    let at = address.rfind('@').ok_or(Reason::MalformedAddress)?;
    let (local, domain) = (&address[..at], &address[at + 1..]);
    if !valid_local(local) {
        return Err(Reason::MalformedAddress);
    }
    let domain = ascii_domain(domain).ok_or(Reason::MalformedAddress)?;
    Ok(Mailbox {
        address: address.to_owned(),
        domain,
    })
}

/// Checks an envelope sender (SMTP `MAIL FROM`, the HTTP `from`): `<>` or an empty
/// string is the null sender; anything else follows the recipients' rules, optionally
/// in one pair of angle brackets.
pub fn parse_sender(sender: &str) -> Result<Sender, Reason> {
    let inner = sender
        .strip_prefix('<')
        .and_then(|s| s.strip_suffix('>'))
        .unwrap_or(sender);
    if inner.is_empty() {
        return Ok(Sender::Null);
    }
    match parse(inner) {
        Ok(m) => Ok(Sender::Mailbox(m)),
        // A blank sender is not the null sender: `<>` is written, not implied.
        Err(_) => Err(Reason::MalformedAddress),
    }
}

/// The domain as lower-case IDNA A-labels, if it is a valid host name. ASCII domains are
/// only lower-cased; UTF-8 ones go through UTS 46 (the `idna` crate) and are checked
/// again as ASCII.
pub fn ascii_domain(domain: &str) -> Option<String> {
    if domain.is_ascii() {
        return valid_domain(domain).then(|| domain.to_ascii_lowercase());
    }
    if domain.len() > MAX_DOMAIN * 4 {
        return None;
    }
    let ascii = idna::domain_to_ascii_strict(domain).ok()?;
    valid_domain(&ascii).then_some(ascii)
}

fn valid_local(local: &str) -> bool {
    if local.is_empty() || local.len() > MAX_LOCAL {
        return false;
    }
    if let Some(inner) = local.strip_prefix('"').and_then(|l| l.strip_suffix('"')) {
        return valid_quoted(inner);
    }
    // dot-atom: atoms of atext separated by single dots.
    local
        .split('.')
        .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

fn valid_quoted(inner: &str) -> bool {
    let mut escaped = false;
    for c in inner.chars() {
        if escaped {
            if !(' '..='~').contains(&c) {
                return false;
            }
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' || (c.is_ascii() && !(' '..='~').contains(&c)) {
            return false;
        }
    }
    !escaped
}

fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

fn valid_domain(domain: &str) -> bool {
    if domain.is_empty() || domain.len() > MAX_DOMAIN {
        return false;
    }
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2 {
        return false;
    }
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    // An all-numeric top label is an IP address written without brackets, not a domain.
    let tld_ok = labels
        .last()
        .is_some_and(|t| !t.chars().all(|c| c.is_ascii_digit()));
    labels.iter().all(label_ok) && tld_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted() {
        for a in [
            "user@example.com",
            "first.last+tag@sub.example.co.uk",
            "\"quoted local\"@example.com",
            "o'brien@example.ie",
            "üser@exämple.de",
            "x@a-b.test",
        ] {
            assert!(parse(a).is_ok(), "{a} should be accepted");
        }
        assert_eq!(parse("User@EXAMPLE.Com").unwrap().domain, "example.com");
    }

    #[test]
    fn utf8_domains_become_a_labels() {
        let m = parse("x@xé.test").unwrap();
        assert_eq!(m.address, "x@xé.test");
        assert_eq!(m.domain, "xn--x-bga.test");
        assert_eq!(parse("a@XÉ.B.test").unwrap().domain, "xn--x-bga.b.test");
        assert_eq!(
            parse("üser@exämple.de").unwrap().domain,
            "xn--exmple-cua.de"
        );
        assert_eq!(parse("a@bad\u{2028}.test"), Err(Reason::MalformedAddress));
    }

    #[test]
    fn control_characters_are_refused_everywhere() {
        for a in [
            "a@b.test\r\nRCPT TO:<x@y.test>",
            "a\0b@c.test",
            "\"a\rb\"@c.test",
            "\"a\u{85}b\"@c.test",
            "a\u{fffd}@c.test",
            "a@c.test\u{7f}",
        ] {
            assert_eq!(parse(a), Err(Reason::MalformedAddress), "{a:?}");
        }
    }

    #[test]
    fn senders() {
        assert_eq!(parse_sender(""), Ok(Sender::Null));
        assert_eq!(parse_sender("<>"), Ok(Sender::Null));
        assert_eq!(
            parse_sender("<app@client.test>").unwrap().envelope(),
            "app@client.test"
        );
        for s in [
            " ",
            "app@client.test>\r\nRCPT TO:<bcc@nowhere.example>\r\nNOOP",
            "<app@client.test",
            "App <app@client.test>",
            "\u{fffd}\u{fffd}@client.test",
        ] {
            assert_eq!(parse_sender(s), Err(Reason::MalformedAddress), "{s:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn no_input_panics_and_nothing_accepted_holds_a_control(s in "\\PC*|[\\x00-\\x7f]{0,80}|.{0,300}") {
            for accepted in [parse(&s).ok().map(|m| m.address), parse_sender(&s).ok().map(|m| m.envelope().to_owned())].into_iter().flatten() {
                proptest::prop_assert!(!accepted.chars().any(char::is_control), "{:?}", accepted);
            }
            if let Ok(m) = parse(&s) {
                proptest::prop_assert!(m.domain.is_ascii());
                proptest::prop_assert_eq!(m.domain.to_ascii_lowercase(), m.domain.clone());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let s = String::from_utf8_lossy(&bytes);
            let _ = parse(&s);
            let _ = parse_sender(&s);
        }

        #[test]
        fn address_like_inputs(local in "[a-z\\x00-\\x1f.\"\\\\ ]{1,10}", domain in "[a-zé\\x00\\r\\n.-]{1,20}") {
            let a = format!("{local}@{domain}");
            if let Ok(m) = parse(&a) {
                proptest::prop_assert!(!m.address.chars().any(char::is_control));
            }
        }
    }

    #[test]
    fn refused() {
        assert_eq!(parse(""), Err(Reason::EmptyAddress));
        assert_eq!(parse("  "), Err(Reason::EmptyAddress));
        for a in [
            "no-at-sign",
            "@example.com",
            "user@",
            "user@localhost",
            "user@-bad.com",
            "user@bad-.com",
            "user@exa mple.com",
            "us er@example.com",
            ".user@example.com",
            "user.@example.com",
            "us..er@example.com",
            "user@example..com",
            "user@[10.0.0.1]",
            "user@10.0.0.1",
            "\"unterminated@example.com",
        ] {
            assert_eq!(
                parse(a),
                Err(Reason::MalformedAddress),
                "{a} should be refused"
            );
        }
        let long_local = format!("{}@example.com", "a".repeat(65));
        assert_eq!(parse(&long_local), Err(Reason::MalformedAddress));
    }
}

//! Recipient address syntax (RFC 5321 §4.1.2, with RFC 6531 UTF-8): the first, cheapest
//! check at the door, answered from memory with no DNS query and no disk write.
//!
//! Called on the hot path for every recipient of a flood: no I/O, no awaits, one
//! allocation for the lower-cased domain.

use crate::reason::Reason;

/// A syntactically valid mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    /// The address as given.
    pub address: String,
    /// The domain in lower case, the key for DNS, routes and rate limits.
    pub domain: String,
}

const MAX_LOCAL: usize = 64;
const MAX_DOMAIN: usize = 253;
const MAX_ADDRESS: usize = 254;

/// Checks a recipient address. Refuses empty ones with `EmptyAddress` and everything else
/// that is not `local@domain` with `MalformedAddress`. Address literals (`user@[10.0.0.1]`)
/// are refused too: a relay that forwards to raw IPs is a relay someone will abuse.
pub fn parse(address: &str) -> Result<Mailbox, Reason> {
    if address.trim().is_empty() {
        return Err(Reason::EmptyAddress);
    }
    if address.len() > MAX_ADDRESS {
        return Err(Reason::MalformedAddress);
    }
    let at = address.rfind('@').ok_or(Reason::MalformedAddress)?;
    let (local, domain) = (&address[..at], &address[at + 1..]);
    if !valid_local(local) || !valid_domain(domain) {
        return Err(Reason::MalformedAddress);
    }
    Ok(Mailbox {
        address: address.to_owned(),
        domain: domain.to_ascii_lowercase(),
    })
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
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
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

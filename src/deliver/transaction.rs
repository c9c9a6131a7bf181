//! One outbound transaction as the SMTP client sends it: what goes out, the SMTPUTF8
//! rules for a next hop with or without the extension, and how far it got when the
//! connection failed (which decides whether it may be resent at once).

use super::Outcome;
use super::client::ClientError;
use crate::reason::Reason;

/// How far a transaction got when its connection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// MAIL, RCPT, DATA or RSET: nothing of the message was sent.
    Envelope,
    /// The body, before its final dot was written completely: the server cannot have
    /// accepted the message.
    Body,
    /// The final dot was written and its reply never came: the server may have accepted
    /// the message, so sending it again at once could deliver it twice (RFC 1047).
    AwaitingFinalReply,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Envelope => "before the message was sent",
            Phase::Body => "while sending the message",
            Phase::AwaitingFinalReply => "after the message was sent, awaiting its reply",
        })
    }
}

/// A transaction's connection failed.
#[derive(Debug, thiserror::Error)]
#[error("{error} ({phase})")]
pub struct SendError {
    pub phase: Phase,
    pub error: ClientError,
    /// Final answers already given before the failure (RCPT refusals), per recipient.
    pub known: Vec<Option<Outcome>>,
}

impl SendError {
    pub(super) fn new(phase: Phase, error: ClientError, known: &[Option<Outcome>]) -> SendError {
        SendError {
            phase,
            error,
            known: known.to_vec(),
        }
    }

    /// Whether the server may hold the message now: then it must not be resent at once.
    pub fn handed_over(&self) -> bool {
        self.phase == Phase::AwaitingFinalReply
    }
}

/// What one transaction sends.
pub struct Transaction<'a> {
    pub sender: &'a str,
    pub recipients: &'a [&'a str],
    pub body: &'a [u8],
    /// The message was submitted with the SMTPUTF8 parameter (RFC 6531).
    pub smtputf8: bool,
}

impl Transaction<'_> {
    /// Whether the SMTPUTF8 parameter belongs on `MAIL FROM`: asked for at submission,
    /// or needed by a UTF-8 address in the envelope.
    pub fn needs_smtputf8(&self) -> bool {
        self.smtputf8 || !self.sender.is_ascii() || self.recipients.iter().any(|r| !r.is_ascii())
    }

    /// Without SMTPUTF8 at the next hop (RFC 6531 §3.4): a UTF-8 local part of the
    /// sender, or the UTF-8 headers of a message submitted with SMTPUTF8, fail every
    /// recipient; a recipient with a UTF-8 local part fails alone. A UTF-8 *domain* needs
    /// no extension: it is sent as its A-label (see [`Transaction::wire`]). Permanent:
    /// this host will not grow the extension between two attempts often enough to hold
    /// mail for it.
    pub(super) fn utf8_refusals(&self, offered: bool) -> Vec<Option<Outcome>> {
        let n = self.recipients.len();
        if offered {
            return vec![None; n];
        }
        let refused = || {
            Some(Outcome::permanent(
                Reason::Rejected,
                "550 5.6.7 next hop does not support SMTPUTF8, which this message needs (RFC 6531)",
            ))
        };
        if !local_part(self.sender).is_ascii()
            || (self.smtputf8 && !header_section(self.body).is_ascii())
        {
            return vec![refused(); n];
        }
        self.recipients
            .iter()
            .map(|r| {
                if local_part(r).is_ascii() {
                    None
                } else {
                    refused()
                }
            })
            .collect()
    }

    /// An envelope address as written to a next hop: as given when it offers SMTPUTF8;
    /// otherwise with its domain as IDNA A-labels (`a@xn--x-bga.test`), which names the
    /// same domain in ASCII.
    pub fn wire<'a>(&self, address: &'a str, offered: bool) -> std::borrow::Cow<'a, str> {
        if offered || address.is_ascii() {
            return address.into();
        }
        match address.rsplit_once('@') {
            Some((local, domain)) if local.is_ascii() => {
                match crate::address::ascii_domain(domain) {
                    Some(ascii) => format!("{local}@{ascii}").into(),
                    None => address.into(),
                }
            }
            _ => address.into(),
        }
    }
}

/// The part of an address before its last `@` (all of it when there is none).
fn local_part(address: &str) -> &str {
    address.rsplit_once('@').map_or(address, |(l, _)| l)
}

/// The header section of a message (up to the first empty line), for the SMTPUTF8 check.
fn header_section(body: &[u8]) -> &[u8] {
    let end = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(body.len());
    &body[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(tx: &Transaction<'_>, offered: bool) -> Vec<bool> {
        tx.utf8_refusals(offered)
            .iter()
            .map(Option::is_some)
            .collect()
    }

    #[test]
    fn smtputf8_rules_without_the_extension() {
        let ascii_body: &[u8] = b"Subject: hi\r\n\r\nbody \xc3\xa9\r\n";
        let utf8_headers: &[u8] = b"Subject: h\xc3\xa9\r\n\r\nbody\r\n";
        let tx = |sender, recipients, body, smtputf8| Transaction {
            sender,
            recipients,
            body,
            smtputf8,
        };
        // (sender, recipients, body, submitted with SMTPUTF8) -> refused per recipient
        let plain = tx("a@x.test", &["b@y.test"], ascii_body, true);
        assert_eq!(
            refused(&plain, false),
            [false],
            "UTF-8 in the body alone is 8BITMIME"
        );
        assert!(plain.needs_smtputf8());
        let headers = tx("a@x.test", &["b@y.test", "c@y.test"], utf8_headers, true);
        assert_eq!(refused(&headers, false), [true, true]);
        let legacy = tx("a@x.test", &["b@y.test"], utf8_headers, false);
        assert_eq!(
            refused(&legacy, false),
            [false],
            "8-bit headers without SMTPUTF8 pass as before"
        );
        assert!(!legacy.needs_smtputf8());
        let sender = tx("sé@x.test", &["b@y.test", "c@y.test"], ascii_body, false);
        assert_eq!(refused(&sender, false), [true, true]);
        assert!(sender.needs_smtputf8());
        let one = tx("a@x.test", &["ü@y.test", "c@y.test"], ascii_body, false);
        assert_eq!(refused(&one, false), [true, false]);
        // A UTF-8 domain alone needs no extension: it goes out as its A-label.
        let idn = tx("a@xé.test", &["b@yé.test"], ascii_body, false);
        assert_eq!(refused(&idn, false), [false]);
        assert_eq!(idn.wire("b@yé.test", false), "b@xn--y-bga.test");
        assert_eq!(idn.wire("b@yé.test", true), "b@yé.test");
        assert_eq!(idn.wire("ü@yé.test", false), "ü@yé.test");
        // With the extension nothing is refused here.
        assert_eq!(refused(&sender, true), [false, false]);
        let Some(Outcome::Permanent { reply, .. }) = &sender.utf8_refusals(false)[0] else {
            panic!("permanent");
        };
        assert_eq!(reply.enhanced, Some(crate::deliver::Enhanced::new(5, 6, 7)));
    }
}

//! SMTP replies with enhanced status codes (RFC 3463) and their wire form; the table that
//! maps a failure reason to its reply is beside [`Reason`] (DESIGN.md, "Replies").

use std::borrow::Cow;
use std::fmt;

use crate::reason::{Reason, ReasonReply};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub esc: [u8; 3],
    pub text: Cow<'static, str>,
}

impl Reply {
    pub const fn new(code: u16, esc: [u8; 3], text: &'static str) -> Reply {
        Reply {
            code,
            esc,
            text: Cow::Borrowed(text),
        }
    }

    pub fn owned(code: u16, esc: [u8; 3], text: String) -> Reply {
        Reply {
            code,
            esc,
            text: Cow::Owned(text),
        }
    }

    /// 4xx: the client keeps the message and tries again.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// Appends the wire form (`CODE X.Y.Z text\r\n`) through smtp-proto's generator.
    /// Replies outside a transaction (greeting, 354, 334) carry no enhanced code (RFC
    /// 2034 §4): they are built with `[0, 0, 0]` and written as `CODE text`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        if self.esc == [0, 0, 0] {
            out.extend_from_slice(format!("{} {}\r\n", self.code, self.text).as_bytes());
            return;
        }
        let [a, b, c] = self.esc;
        smtp_proto::Response::new(self.code, a, b, c, &self.text)
            .write(out)
            .expect("writing to a Vec cannot fail");
    }

    /// The enhanced status code as text, e.g. `5.1.10`.
    pub fn status(&self) -> String {
        let [a, b, c] = self.esc;
        format!("{a}.{b}.{c}")
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c] = self.esc;
        write!(f, "{} {a}.{b}.{c} {}", self.code, self.text)
    }
}

/// The SMTP reply for a recipient or message refused for `reason`, from the table beside
/// [`Reason`] (which HTTP responses quote too, so both doors speak one language).
pub fn for_reason(reason: Reason) -> Reply {
    reason.reply().into()
}

impl From<ReasonReply> for Reply {
    fn from(r: ReasonReply) -> Reply {
        Reply::new(r.code, r.esc, r.text)
    }
}

/// Replies that are not about a recipient's fate.
pub mod fixed {
    use super::Reply;

    pub const OK: Reply = Reply::new(250, [2, 0, 0], "OK");
    pub const SENDER_OK: Reply = Reply::new(250, [2, 1, 0], "Sender OK");
    pub const RCPT_OK: Reply = Reply::new(250, [2, 1, 5], "Recipient OK");
    pub const RESET: Reply = Reply::new(250, [2, 0, 0], "Reset");
    pub const BYE: Reply = Reply::new(221, [2, 0, 0], "Bye");
    pub const VRFY: Reply = Reply::new(
        252,
        [2, 5, 2],
        "Cannot verify the user, but will accept the message",
    );
    pub const HELP: Reply = Reply::new(
        214,
        [2, 0, 0],
        "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS AUTH",
    );
    pub const START_DATA: Reply = Reply::new(354, [0, 0, 0], "");
    pub const START_TLS: Reply = Reply::new(220, [2, 0, 0], "Ready to start TLS");
    pub const AUTH_OK: Reply = Reply::new(235, [2, 7, 0], "Authentication succeeded");
    pub const AUTH_FAILED: Reply = Reply::new(535, [5, 7, 8], "Authentication credentials invalid");
    pub const AUTH_NEEDS_TLS: Reply = Reply::new(
        538,
        [5, 7, 11],
        "Encryption required for requested authentication mechanism",
    );
    pub const AUTH_CANCELLED: Reply = Reply::new(501, [5, 0, 0], "Authentication cancelled");
    pub const AUTH_MECH: Reply =
        Reply::new(504, [5, 5, 4], "Unrecognized authentication mechanism");
    pub const AUTH_TWICE: Reply = Reply::new(503, [5, 5, 1], "Already authenticated");
    pub const BAD_SEQUENCE_HELO: Reply = Reply::new(503, [5, 5, 1], "Send EHLO or HELO first");
    pub const BAD_SEQUENCE_MAIL: Reply = Reply::new(503, [5, 5, 1], "Sender not yet given");
    pub const BAD_SEQUENCE_NESTED: Reply = Reply::new(503, [5, 5, 1], "Sender already given");
    pub const BAD_SEQUENCE_RCPT: Reply = Reply::new(503, [5, 5, 1], "No valid recipients");
    pub const BAD_SEQUENCE_TLS: Reply = Reply::new(503, [5, 5, 1], "TLS already active");
    pub const NO_TLS: Reply = Reply::new(454, [4, 7, 0], "TLS not available");
    pub const TLS_FIRST: Reply =
        Reply::new(503, [5, 5, 1], "Finish or reset the transaction first");
    pub const UNKNOWN: Reply = Reply::new(500, [5, 5, 1], "Command unrecognized");
    pub const UNSUPPORTED: Reply = Reply::new(502, [5, 5, 1], "Command not implemented");
    pub const SYNTAX: Reply = Reply::new(501, [5, 5, 4], "Syntax error in parameters");
    pub const BAD_SENDER: Reply = Reply::new(501, [5, 1, 7], "Sender address is malformed");
    pub const LINE_TOO_LONG: Reply =
        Reply::new(500, [5, 5, 2], "Line too long (limit is 1000 octets)");
    pub const SIZE_DECLARED: Reply =
        Reply::new(552, [5, 3, 4], "Declared message size exceeds maximum size");
    pub const TOO_MANY_ERRORS: Reply =
        Reply::new(421, [4, 7, 0], "Too many errors, closing connection");
    pub const TOO_MANY_CONNECTIONS: Reply =
        Reply::new(421, [4, 7, 0], "Too many connections, try again later");
    pub const TIMEOUT: Reply = Reply::new(421, [4, 4, 2], "Timeout, closing connection");
    pub const SHUTDOWN: Reply =
        Reply::new(421, [4, 3, 2], "Service shutting down, try again later");
    pub const BAD_BYTES: Reply = Reply::new(
        501,
        [5, 5, 2],
        "Invalid bytes in command (NUL, bare CR/LF or invalid UTF-8)",
    );
    pub const BAD_SENDER_BYTES: Reply = Reply::new(
        501,
        [5, 1, 7],
        "Sender address holds invalid bytes (NUL, bare CR or LF, or invalid UTF-8)",
    );
    pub const BAD_RECIPIENT_BYTES: Reply = Reply::new(
        501,
        [5, 1, 3],
        "Recipient address holds invalid bytes (NUL, bare CR or LF, or invalid UTF-8)",
    );
    pub const BAD_HELO: Reply = Reply::new(
        501,
        [5, 5, 4],
        "EHLO/HELO needs a domain name or an address literal",
    );
    pub const AUTH_BUSY: Reply = Reply::new(
        454,
        [4, 7, 0],
        "Too many authentication attempts, try again later",
    );
    pub const EVICTED: Reply = Reply::new(
        421,
        [4, 7, 0],
        "Connection table full, closing an idle session",
    );
    pub const LIFETIME: Reply =
        Reply::new(421, [4, 4, 2], "Session lifetime over, closing connection");
    pub const BARE_LF: Reply = Reply::new(500, [5, 5, 2], "Bare LF or CR in data is not allowed");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(r: &Reply) -> String {
        let mut out = Vec::new();
        r.write_to(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn design_table() {
        for (reason, code, esc) in [
            (Reason::EmptyAddress, 501, "5.1.3"),
            (Reason::MalformedAddress, 501, "5.1.3"),
            (Reason::NoSuchDomain, 550, "5.1.2"),
            (Reason::NoMailHost, 550, "5.1.2"),
            (Reason::NullMx, 556, "5.1.10"),
            (Reason::DnsTempfail, 451, "4.4.3"),
            (Reason::NoRoute, 550, "5.7.1"),
            (Reason::RelayDenied, 554, "5.7.1"),
            (Reason::CampaignPaused, 451, "4.7.1"),
            (Reason::IntakePaused, 451, "4.7.1"),
            (Reason::TooManyRecipients, 452, "4.5.3"),
            (Reason::MessageTooBig, 552, "5.3.4"),
            (Reason::LineTooLong, 550, "5.6.0"),
            (Reason::QueueUnavailable, 452, "4.3.1"),
        ] {
            let r = for_reason(reason);
            assert_eq!((r.code, r.status().as_str()), (code, esc), "{reason}");
            assert!(
                wire(&r).starts_with(&format!("{code} {esc} ")),
                "{}",
                wire(&r)
            );
            assert_eq!(r.is_transient(), reason.is_temporary(), "{reason}");
        }
    }

    #[test]
    fn the_smtp_reply_reads_as_the_table_says() {
        for reason in Reason::ALL {
            assert_eq!(for_reason(*reason).to_string(), reason.reply().to_string());
        }
    }

    #[test]
    fn two_digit_detail_is_written_whole() {
        assert!(wire(&for_reason(Reason::NullMx)).starts_with("556 5.1.10 "));
    }
}

//! The closed set of reasons a recipient fails, shared by intake, relay, metrics and the
//! failure log, so that every failure has a name that counts and aggregates the same way
//! everywhere.

use std::fmt;

/// Where in a message's life a failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// Refused at the door (SMTP reply or HTTP response); never queued.
    Intake,
    /// Failed while relaying a queued recipient.
    Relay,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Intake => "intake",
            Stage::Relay => "relay",
        }
    }
}

macro_rules! reasons {
    ($($variant:ident => $name:literal, $temporary:literal;)*) => {
        /// Why a recipient failed. `as_str` is the stable name used in metrics, the
        /// failure log and the admin API.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason { $($variant),* }

        impl Reason {
            pub const ALL: &'static [Reason] = &[$(Reason::$variant),*];

            pub fn as_str(self) -> &'static str {
                match self { $(Reason::$variant => $name),* }
            }

            /// Whether the sender is expected to retry (4xx), as opposed to a final refusal.
            pub fn is_temporary(self) -> bool {
                match self { $(Reason::$variant => $temporary),* }
            }

            pub fn parse(name: &str) -> Option<Reason> {
                match name { $($name => Some(Reason::$variant),)* _ => None }
            }

            /// Dense index for per-reason counter arrays.
            pub fn index(self) -> usize {
                self as usize
            }
        }
    };
}

reasons! {
    EmptyAddress => "empty_address", false;
    MalformedAddress => "malformed_address", false;
    NoSuchDomain => "no_such_domain", false;
    NoMailHost => "no_mail_host", false;
    NullMx => "null_mx", false;
    DnsTempfail => "dns_tempfail", true;
    Suppressed => "suppressed", false;
    NoRoute => "no_route", false;
    DestinationDisabled => "destination_disabled", true;
    RelayDenied => "relay_denied", false;
    CampaignPaused => "campaign_paused", true;
    IntakePaused => "intake_paused", true;
    TooManyRecipients => "too_many_recipients", true;
    MessageTooBig => "message_too_big", false;
    LineTooLong => "line_too_long", false;
    QueueUnavailable => "queue_unavailable", true;
    RateLimited => "rate_limited", true;
    Rejected => "rejected", false;
    Deferred => "deferred", true;
    Expired => "expired", false;
    Purged => "purged", false;
    MalformedRow => "malformed_row", false;
    Template => "template", false;
}

/// A reason's reply: SMTP code, enhanced status code (RFC 3463) and text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReasonReply {
    pub code: u16,
    pub esc: [u8; 3],
    pub text: &'static str,
}

impl ReasonReply {
    /// The enhanced status code as text, e.g. `5.1.10`.
    pub fn status(&self) -> String {
        let [a, b, c] = self.esc;
        format!("{a}.{b}.{c}")
    }
}

/// `550 5.1.2 Recipient domain does not exist`, as an SMTP client reads it.
impl fmt::Display for ReasonReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.code, self.status(), self.text)
    }
}

impl Reason {
    /// The reply for a recipient or message refused for this reason (DESIGN.md,
    /// "Replies"). SMTP sends it, HTTP responses quote the same code and text, so both
    /// doors speak one language.
    pub fn reply(self) -> ReasonReply {
        use Reason::*;
        let (code, esc, text) = match self {
            EmptyAddress => (501, [5, 1, 3], "Recipient address is empty"),
            MalformedAddress => (501, [5, 1, 3], "Recipient address is malformed"),
            NoSuchDomain => (550, [5, 1, 2], "Recipient domain does not exist"),
            NoMailHost => (
                550,
                [5, 1, 2],
                "Recipient domain has no mail host (no MX, A or AAAA)",
            ),
            NullMx => (
                556,
                [5, 1, 10],
                "Recipient domain accepts no mail (null MX)",
            ),
            DnsTempfail => (
                451,
                [4, 4, 3],
                "DNS lookup of recipient domain failed, try again later",
            ),
            Suppressed => (
                550,
                [5, 7, 1],
                "Recipient is suppressed (on the do-not-contact list)",
            ),
            NoRoute => (550, [5, 7, 1], "No route for recipient domain"),
            DestinationDisabled => (
                451,
                [4, 3, 2],
                "Destination of recipient domain is disabled, try again later",
            ),
            RelayDenied => (
                554,
                [5, 7, 1],
                "Relay access denied: authenticate or connect from an allowed network",
            ),
            CampaignPaused => (451, [4, 7, 1], "Campaign is paused, try again later"),
            IntakePaused => (451, [4, 7, 1], "Intake is paused, try again later"),
            TooManyRecipients => (452, [4, 5, 3], "Too many recipients"),
            MessageTooBig => (552, [5, 3, 4], "Message exceeds maximum size"),
            LineTooLong => (
                550,
                [5, 6, 0],
                "Message has a line over 998 octets that cannot be folded; encode the body",
            ),
            QueueUnavailable => (
                452,
                [4, 3, 1],
                "Queue unavailable (insufficient storage), try again later",
            ),
            RateLimited => (451, [4, 7, 1], "Rate limit exceeded, try again later"),
            Rejected => (550, [5, 0, 0], "Rejected by the destination"),
            Deferred => (451, [4, 0, 0], "Deferred by the destination"),
            Expired => (550, [5, 4, 7], "Delivery time expired"),
            Purged => (550, [5, 0, 0], "Purged by an operator"),
            MalformedRow => (501, [5, 5, 2], "Recipient row is not valid NDJSON or CSV"),
            Template => (
                554,
                [5, 6, 0],
                "Message template does not render for this recipient",
            ),
        };
        ReasonReply { code, esc, text }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_indices_are_dense() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(Reason::parse(r.as_str()), Some(*r));
            assert_eq!(r.index(), i);
        }
    }

    #[test]
    fn every_reply_is_temporary_exactly_when_its_reason_is() {
        for r in Reason::ALL {
            let reply = r.reply();
            assert_eq!((400..500).contains(&reply.code), r.is_temporary(), "{r}");
            assert_eq!(reply.esc[0] as u16, reply.code / 100, "{r}");
        }
    }
}

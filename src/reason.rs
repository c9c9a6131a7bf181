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
}

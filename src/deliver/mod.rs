//! Delivery: the `Courier` trait every transport implements, the typed outcome of an
//! attempt per recipient, and the routing of a recipient to its destination.

use std::sync::Arc;
use std::time::Duration;

use crate::bounce::{BounceClass, Classifier};
use crate::config::{Route, Transport};
use crate::future::BoxFuture;
use crate::queue::Claimed;
use crate::reason::Reason;
pub use reply::{Enhanced, Reply};

pub mod client;
pub mod dsn;
pub mod reply;
pub mod smtp;
pub mod sts;
pub mod transaction;
pub mod webhook;

/// Where a batch goes: the route, and within it the destination that has its own rate
/// and concurrency (an MX domain, a smarthost, a webhook URL).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    pub route: usize,
    pub key: String,
}

impl Destination {
    /// The destination of `domain` under `route` (the `route`-th of the config).
    pub fn of(index: usize, route: &Route, domain: &str) -> Destination {
        let key = match route.transport {
            Transport::Mx => domain.to_owned(),
            Transport::Smarthost => format!(
                "{}:{}",
                route.host.as_deref().unwrap_or_default(),
                route.port.unwrap_or(25)
            ),
            Transport::Webhook => route.url.clone().unwrap_or_default(),
        };
        Destination { route: index, key }
    }
}

/// Every recipient of one message bound for one destination: one transaction.
pub struct Job {
    pub message_id: i64,
    pub queue_id: String,
    pub sender: String,
    pub body: Arc<Vec<u8>>,
    pub recipients: Vec<Claimed>,
    pub route: Route,
    pub destination: Destination,
    /// Relay with the SMTPUTF8 parameter (the message was submitted with it).
    pub smtputf8: bool,
}

/// What became of one recipient in one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: the destination took responsibility.
    Delivered { reply: Reply },
    /// 4xx, network or TLS trouble: try again later (not before `retry_after` if given).
    Transient {
        reply: Reply,
        retry_after: Option<Duration>,
    },
    /// 5xx or equivalent: it will never work.
    Permanent { reason: Reason, reply: Reply },
}

impl Outcome {
    /// A transient outcome with one of Floodgate's own replies (see [`Reply::local`]).
    pub fn transient(reply: impl AsRef<str>) -> Outcome {
        Outcome::Transient {
            reply: Reply::local(reply.as_ref()),
            retry_after: None,
        }
    }

    /// A permanent outcome with one of Floodgate's own replies.
    pub fn permanent(reason: Reason, reply: impl AsRef<str>) -> Outcome {
        Outcome::Permanent {
            reason,
            reply: Reply::local(reply.as_ref()),
        }
    }

    /// Classifies an SMTP reply: 2xx delivered, 4xx transient, 5xx permanent; the code
    /// and enhanced code stay typed in the outcome.
    pub fn from_reply(reply: Reply) -> Outcome {
        match reply.code.unwrap_or(0) {
            200..=299 => Outcome::Delivered { reply },
            500..=599 => Outcome::Permanent {
                reason: Reason::Rejected,
                reply,
            },
            _ => Outcome::Transient {
                reply,
                retry_after: None,
            },
        }
    }

    /// An SMTP reply as read from the wire: `code` and its text.
    pub fn from_smtp(code: u16, text: &str) -> Outcome {
        Outcome::from_reply(Reply::smtp(code, text))
    }

    pub fn reply(&self) -> &Reply {
        match self {
            Outcome::Delivered { reply }
            | Outcome::Transient { reply, .. }
            | Outcome::Permanent { reply, .. } => reply,
        }
    }
}

impl Reply {
    /// This reply's bounce class under `rules`. A reply without an SMTP code (a webhook's,
    /// or why no request went out) is read as code 0, which the shipped rules know.
    pub fn class(&self, rules: &Classifier) -> BounceClass {
        let enhanced = self
            .enhanced
            .map(|e| [u16::from(e.class), e.subject, e.detail]);
        rules.classify(self.code.unwrap_or(0), enhanced, &self.text)
    }
}

/// What one attempt at a job came to: an outcome per recipient of the job, in order, and
/// whether the destination could be reached at all.
pub struct Attempt {
    pub outcomes: Vec<Outcome>,
    /// `false`: no host of the destination took a connection (refused, timed out, or
    /// closed with a 4xx/5xx greeting); the scheduler suspends the destination.
    pub reached: bool,
}

impl Attempt {
    /// Outcomes from a destination that was reached (or whose reachability is not the
    /// question: a DNS verdict, a policy refusal, a webhook's own circuit).
    pub fn reached(outcomes: Vec<Outcome>) -> Attempt {
        Attempt {
            outcomes,
            reached: true,
        }
    }
}

/// A transport. `deliver` returns one outcome per recipient of the job, in order.
pub trait Courier: Send + Sync + 'static {
    fn deliver<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Attempt>;
}

/// Where relay outcomes are reported (counters, failure log, delivery events). Called
/// once per recipient and attempt: must be cheap and never block.
/// `class` names why the attempt failed ([`crate::bounce`]).
pub trait FailureSink: Send + Sync + 'static {
    fn relay_failed(&self, recipient: &Claimed, reason: Reason, class: BounceClass, reply: &str);
    fn relay_deferred(&self, recipient: &Claimed, class: BounceClass, reply: &str);
    fn relay_delivered(&self, recipient: &Claimed, reply: &str);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smtp_classification() {
        assert!(matches!(
            Outcome::from_smtp(250, "2.0.0 ok"),
            Outcome::Delivered { .. }
        ));
        assert!(matches!(
            Outcome::from_smtp(451, "4.3.0 later"),
            Outcome::Transient { .. }
        ));
        let Outcome::Permanent {
            reason: Reason::Rejected,
            reply,
        } = Outcome::from_smtp(550, "5.1.1 no such user")
        else {
            panic!("5xx is permanent");
        };
        assert_eq!(reply.enhanced, Some(Enhanced::new(5, 1, 1)));
        assert_eq!(reply.to_string(), "550 5.1.1 no such user");
    }
}

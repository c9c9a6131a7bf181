//! Delivery: the `Courier` trait every transport implements, the typed outcome of an
//! attempt per recipient, and the routing of a recipient to its destination.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{Route, Transport};
use crate::dns::BoxFuture;
use crate::queue::Claimed;
use crate::reason::Reason;

pub mod client;
pub mod dsn;
pub mod smtp;
pub mod tls;
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
}

/// What became of one recipient in one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: the destination took responsibility.
    Delivered { reply: String },
    /// 4xx, network or TLS trouble: try again later (not before `retry_after` if given).
    Transient {
        reply: String,
        retry_after: Option<Duration>,
    },
    /// 5xx or equivalent: it will never work.
    Permanent { reason: Reason, reply: String },
}

impl Outcome {
    pub fn transient(reply: impl Into<String>) -> Outcome {
        Outcome::Transient {
            reply: reply.into(),
            retry_after: None,
        }
    }

    /// Classifies an SMTP reply: 2xx delivered, 4xx transient, 5xx permanent.
    pub fn from_smtp(code: u16, text: &str) -> Outcome {
        let reply = format!("{code} {text}");
        match code {
            200..=299 => Outcome::Delivered { reply },
            500..=599 => Outcome::Permanent {
                reason: Reason::Rejected,
                reply,
            },
            _ => Outcome::transient(reply),
        }
    }
}

/// A transport. `deliver` returns one outcome per recipient of the job, in order.
pub trait Courier: Send + Sync + 'static {
    fn deliver<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Vec<Outcome>>;
}

/// Where relay outcomes are reported (counters, failure log, delivery events). Called
/// once per recipient and attempt: must be cheap and never block.
pub trait FailureSink: Send + Sync + 'static {
    fn relay_failed(&self, recipient: &Claimed, reason: Reason, reply: &str);
    fn relay_deferred(&self, recipient: &Claimed, reply: &str);
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
        assert!(matches!(
            Outcome::from_smtp(550, "5.1.1 no such user"),
            Outcome::Permanent {
                reason: Reason::Rejected,
                ..
            }
        ));
    }
}

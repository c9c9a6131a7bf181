//! The webhook courier: POSTs each message as signed JSON (Standard Webhooks) to its
//! route's `url` and maps the HTTP answer to per-recipient outcomes; the endpoint's
//! circuit breaker (and its `410 Gone` switch) is in [`breaker`]. Rate and concurrency
//! per endpoint come from the scheduler's lanes (the destination key is the URL).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;

use super::{Attempt, Courier, Job, Outcome, Reply};
use crate::clock::Clock;
use crate::future::BoxFuture;
use crate::net::client::{HttpClient, HttpResponse};
use crate::net::signed::{self, Answer, SignedPost};
use crate::net::tls;
use crate::reason::Reason;
use crate::signing::Secret;

pub mod breaker;
pub mod disabled;
pub mod payload;

pub use breaker::EndpointStatus;
use breaker::{Breakers, Health, Limits, Refusal};
pub use disabled::DisabledEndpoints;

/// How much of a response body is read (it only ends up, cut shorter, in the reply).
const MAX_RESPONSE_BODY: usize = 16 * 1024;
/// How long an idle connection to an endpoint is kept for the next message.
const IDLE_CONNECTION: Duration = Duration::from_secs(30);
/// Longest Retry-After honoured; beyond it the backoff schedule and `max_age` rule.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(86_400);

pub struct WebhookCourier {
    clock: Arc<dyn Clock>,
    /// One client per trust anchor (`None`: the web roots; or a route's `tls_ca`).
    clients: Mutex<HashMap<Option<PathBuf>, Arc<HttpClient>>>,
    breakers: Breakers,
}

impl WebhookCourier {
    /// `disabled` is shared with the door (`Policy`), which refuses the domains of a
    /// disabled endpoint with a temporary reply instead of accepting mail that would fail.
    pub fn new(clock: Arc<dyn Clock>, disabled: Arc<DisabledEndpoints>) -> WebhookCourier {
        WebhookCourier {
            breakers: Breakers::new(clock.clone(), disabled),
            clock,
            clients: Mutex::default(),
        }
    }

    /// Re-enables every endpoint disabled by a `410 Gone` (called on config reload: the
    /// operator has had a chance to fix or remove the route). Returns how many.
    pub fn enable_all(&self) -> usize {
        self.breakers.enable_all()
    }

    pub fn status(&self) -> Vec<EndpointStatus> {
        self.breakers.status()
    }

    fn client(&self, ca: Option<&PathBuf>) -> Result<Arc<HttpClient>, String> {
        let mut clients = self.clients.lock();
        if let Some(c) = clients.get(&ca.cloned()) {
            return Ok(c.clone());
        }
        let config = tls::verified(ca.map(PathBuf::as_path))?;
        let client = Arc::new(
            HttpClient::new(config, IDLE_CONNECTION, MAX_RESPONSE_BODY)
                .with_clock(self.clock.clone()),
        );
        clients.insert(ca.cloned(), client.clone());
        Ok(client)
    }

    async fn attempt(&self, job: &Job) -> Vec<Outcome> {
        let all = |o: Outcome| vec![o; job.recipients.len()];
        let url = job.route.url.as_deref().unwrap_or_default();
        let Some(secret) = job
            .route
            .secret
            .as_deref()
            .and_then(|s| Secret::parse(s).ok())
        else {
            // Route::validate refuses this; kept transient so a fixed config delivers.
            return all(Outcome::transient("webhook route has no valid `secret`"));
        };
        let timeout = job.route.webhook_timeout();
        let client = match self.client(job.route.tls_ca.as_ref()) {
            Ok(c) => c,
            Err(e) => return all(Outcome::transient(format!("webhook TLS setup: {e}"))),
        };
        let ep = self.breakers.endpoint(url);
        if let Err(refusal) = self.breakers.admit(&ep, timeout) {
            return all(refused(refusal));
        }
        let now_ms = self.clock.now_ms();
        let id = payload::webhook_id(job);
        let post = SignedPost {
            url,
            secret: Some(&secret),
            id: &id,
            timestamp: now_ms / 1000,
            body: Bytes::from(payload::build(job)),
            timeout,
        };
        let (outcome, health) = classify(signed::post(&client, post).await, now_ms);
        let limits = Limits {
            threshold: job.route.breaker_threshold(),
            cooldown: job.route.breaker_cooldown(),
        };
        let reply = outcome.reply().to_string();
        self.breakers
            .record(&ep, url, &job.queue_id, limits, health, &reply);
        all(outcome)
    }
}

/// The outcome for every recipient of a message the breaker holds back.
fn refused(refusal: Refusal) -> Outcome {
    match refusal {
        Refusal::Disabled(why) => Outcome::Permanent {
            reason: Reason::Rejected,
            reply: Reply::other(format!(
                "webhook endpoint disabled ({why}); reload the config to re-enable"
            )),
        },
        Refusal::Open(left) => Outcome::Transient {
            reply: Reply::other("webhook circuit open"),
            retry_after: Some(left),
        },
        Refusal::Probing => Outcome::Transient {
            reply: Reply::other("webhook circuit open (probe in flight)"),
            retry_after: None,
        },
    }
}

impl Courier for WebhookCourier {
    // An endpoint that is down is the business of its own circuit breaker.
    fn deliver<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Attempt> {
        Box::pin(async move { Attempt::reached(self.attempt(job).await) })
    }
}

/// Maps an answer to the recipients' outcome and the endpoint's health.
fn classify(answer: Answer, now_ms: i64) -> (Outcome, Health) {
    let resp = match answer {
        Answer::Accepted(r) | Answer::Refused(r) => r,
        Answer::Failed(e) => {
            return (
                Outcome::transient(format!("webhook request failed: {e}")),
                Health::Down,
            );
        }
    };
    let reply = Reply::other(reply_text(&resp));
    let retry_after = || {
        resp.headers
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, now_ms))
    };
    match resp.status {
        200..=299 => (Outcome::Delivered { reply }, Health::Up),
        410 => (
            Outcome::Permanent {
                reason: Reason::Rejected,
                reply,
            },
            Health::Gone,
        ),
        429 => (
            Outcome::Transient {
                reply,
                retry_after: retry_after(),
            },
            Health::Up,
        ),
        500..=599 => (
            Outcome::Transient {
                reply,
                retry_after: retry_after(),
            },
            Health::Down,
        ),
        // Redirects are not followed: a webhook that moved must be reconfigured, and
        // following one would resend the message to wherever the answer points.
        _ => (
            Outcome::Permanent {
                reason: Reason::Rejected,
                reply,
            },
            Health::Up,
        ),
    }
}

/// `HTTP 503 Service Unavailable: <start of the body>`, on one line.
fn reply_text(resp: &HttpResponse) -> String {
    let phrase = hyper::StatusCode::from_u16(resp.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let mut reply = format!("HTTP {} {phrase}", resp.status)
        .trim_end()
        .to_owned();
    let body: String = String::from_utf8_lossy(&resp.body)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    let body = body.trim();
    if !body.is_empty() {
        reply.push_str(": ");
        reply.push_str(body);
    }
    reply
}

/// `Retry-After` as delay-seconds or an HTTP-date (RFC 9110 §10.2.3), capped.
fn parse_retry_after(value: &str, now_ms: i64) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
            let ms = at.timestamp_millis() - now_ms;
            Duration::from_millis(ms.max(0) as u64)
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::net::client::HttpError;

    fn resp(status: u16, retry_after: Option<&str>) -> Answer {
        let mut headers = hyper::HeaderMap::new();
        if let Some(v) = retry_after {
            headers.insert(hyper::header::RETRY_AFTER, v.parse().unwrap());
        }
        Ok(HttpResponse {
            status,
            headers,
            body: Bytes::from_static(b"nope\r\n"),
            truncated: false,
        })
        .into()
    }

    #[test]
    fn status_table() {
        for (status, kind, health) in [
            (200, "delivered", Health::Up),
            (204, "delivered", Health::Up),
            (301, "permanent", Health::Up),
            (400, "permanent", Health::Up),
            (404, "permanent", Health::Up),
            (410, "permanent", Health::Gone),
            (429, "transient", Health::Up),
            (500, "transient", Health::Down),
            (502, "transient", Health::Down),
            (503, "transient", Health::Down),
            (504, "transient", Health::Down),
        ] {
            let (o, h) = classify(resp(status, None), 0);
            let k = match o {
                Outcome::Delivered { .. } => "delivered",
                Outcome::Transient { .. } => "transient",
                Outcome::Permanent { .. } => "permanent",
            };
            assert_eq!((k, h), (kind, health), "{status}");
        }
        let (o, h) = classify(Err(HttpError::Timeout(Duration::from_secs(1))).into(), 0);
        assert!(matches!(o, Outcome::Transient { .. }));
        assert_eq!(h, Health::Down);
    }

    #[test]
    fn retry_after_forms() {
        let (o, _) = classify(resp(429, Some("120")), 0);
        assert_eq!(
            o,
            Outcome::Transient {
                reply: Reply::other("HTTP 429 Too Many Requests: nope"),
                retry_after: Some(Duration::from_secs(120))
            }
        );
        // Sun, 06 Nov 1994 08:49:37 GMT is 784111777 s after the epoch.
        let now = 784_111_777_000 - 30_000;
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("soon", 0), None);
        assert_eq!(
            parse_retry_after("99999999", 0),
            Some(MAX_RETRY_AFTER),
            "capped"
        );
    }
}

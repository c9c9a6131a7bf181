//! The webhook courier: POSTs each message as signed JSON (Standard Webhooks) to its
//! route's `url`, maps the HTTP answer to per-recipient outcomes, disables an endpoint
//! that answers `410 Gone`, and keeps a circuit breaker per endpoint so that a dead one
//! costs no requests while it is down. Rate and concurrency per endpoint come from the
//! scheduler's lanes (the destination key is the URL).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{Courier, Job, Outcome, Reply, tls};
use crate::clock::Clock;
use crate::dns::BoxFuture;
use crate::http::client::{HttpClient, HttpError, HttpResponse, redact};
use crate::reason::Reason;

pub mod disabled;
pub mod payload;

pub use disabled::DisabledEndpoints;

/// How much of a response body is read (it only ends up, cut shorter, in the reply).
const MAX_RESPONSE_BODY: usize = 16 * 1024;
/// How long an idle connection to an endpoint is kept for the next message.
const IDLE_CONNECTION: Duration = Duration::from_secs(30);
/// Longest Retry-After honoured; beyond it the backoff schedule and `max_age` rule.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(86_400);

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("must start with `whsec_`")]
    Prefix,
    #[error("the part after `whsec_` is not base64")]
    Base64,
    #[error("must hold at least 16 bytes once decoded")]
    Short,
}

/// A Standard Webhooks signing secret (`whsec_` + base64 key).
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    pub fn parse(text: &str) -> Result<Secret, SecretError> {
        let encoded = text.strip_prefix("whsec_").ok_or(SecretError::Prefix)?;
        let key = B64.decode(encoded).map_err(|_| SecretError::Base64)?;
        if key.len() < 16 {
            return Err(SecretError::Short);
        }
        Ok(Secret(key))
    }

    /// The `webhook-signature` value: `v1,` + base64 HMAC-SHA256 of `id.timestamp.body`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key size");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
    }

    /// The three Standard Webhooks headers for one attempt.
    pub fn headers(&self, id: &str, timestamp: i64, body: &[u8]) -> Vec<(&'static str, String)> {
        vec![
            ("content-type", "application/json".to_owned()),
            ("webhook-id", id.to_owned()),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", self.sign(id, timestamp, body)),
        ]
    }
}

/// What an answer says about the endpoint's health, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    /// It answered sensibly (2xx, 3xx, 4xx): close the circuit.
    Up,
    /// Timeout, connection trouble or 5xx: count towards opening the circuit.
    Down,
    /// 410: the receiver asks never to be called again.
    Gone,
}

#[derive(Debug, Clone, Copy)]
enum Circuit {
    Closed,
    Open {
        until: Instant,
    },
    /// One probe request is under way.
    Probing {
        since: Instant,
    },
}

#[derive(Debug)]
struct Endpoint {
    disabled: Option<String>,
    failures: u32,
    circuit: Circuit,
}

/// One endpoint's state, for the admin API and dashboard.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointStatus {
    /// The URL without query or credentials.
    pub url: String,
    pub disabled: bool,
    pub circuit: &'static str,
    pub consecutive_failures: u32,
}

pub struct WebhookCourier {
    clock: Arc<dyn Clock>,
    /// One client per trust anchor (`None`: the web roots; or a route's `tls_ca`).
    clients: Mutex<HashMap<Option<PathBuf>, Arc<HttpClient>>>,
    endpoints: Mutex<HashMap<String, Arc<Mutex<Endpoint>>>>,
    /// The disabled endpoints, as the door sees them.
    disabled: Arc<DisabledEndpoints>,
}

impl WebhookCourier {
    /// `disabled` is shared with the door (`Policy`), which refuses the domains of a
    /// disabled endpoint with a temporary reply instead of accepting mail that would fail.
    pub fn new(clock: Arc<dyn Clock>, disabled: Arc<DisabledEndpoints>) -> WebhookCourier {
        WebhookCourier {
            clock,
            clients: Mutex::default(),
            endpoints: Mutex::default(),
            disabled,
        }
    }

    /// Re-enables every endpoint disabled by a `410 Gone` (called on config reload: the
    /// operator has had a chance to fix or remove the route). Returns how many.
    pub fn enable_all(&self) -> usize {
        let endpoints = self.endpoints.lock().expect("endpoints lock");
        let mut enabled = 0;
        for (url, ep) in endpoints.iter() {
            let mut ep = ep.lock().expect("endpoint lock");
            if ep.disabled.take().is_some() {
                tracing::info!(url = %redact(url), "webhook endpoint re-enabled");
                enabled += 1;
            }
        }
        self.disabled.clear();
        enabled
    }

    pub fn status(&self) -> Vec<EndpointStatus> {
        let endpoints = self.endpoints.lock().expect("endpoints lock");
        let mut list: Vec<EndpointStatus> = endpoints
            .iter()
            .map(|(url, ep)| {
                let ep = ep.lock().expect("endpoint lock");
                EndpointStatus {
                    url: redact(url),
                    disabled: ep.disabled.is_some(),
                    circuit: match ep.circuit {
                        Circuit::Closed => "closed",
                        Circuit::Open { .. } => "open",
                        Circuit::Probing { .. } => "half-open",
                    },
                    consecutive_failures: ep.failures,
                }
            })
            .collect();
        list.sort_by(|a, b| a.url.cmp(&b.url));
        list
    }

    fn endpoint(&self, url: &str) -> Arc<Mutex<Endpoint>> {
        self.endpoints
            .lock()
            .expect("endpoints lock")
            .entry(url.to_owned())
            .or_insert_with(|| {
                Arc::new(Mutex::new(Endpoint {
                    disabled: None,
                    failures: 0,
                    circuit: Circuit::Closed,
                }))
            })
            .clone()
    }

    fn client(&self, ca: Option<&PathBuf>) -> Result<Arc<HttpClient>, String> {
        let mut clients = self.clients.lock().expect("clients lock");
        if let Some(c) = clients.get(&ca.cloned()) {
            return Ok(c.clone());
        }
        let config = tls::verified(ca.map(PathBuf::as_path))?;
        let client = Arc::new(HttpClient::new(config, IDLE_CONNECTION, MAX_RESPONSE_BODY));
        clients.insert(ca.cloned(), client.clone());
        Ok(client)
    }

    /// Whether a request may go out now. `Err` is the outcome for every recipient.
    fn admit(&self, ep: &Mutex<Endpoint>, timeout: Duration) -> Result<(), Outcome> {
        let mut ep = ep.lock().expect("endpoint lock");
        if let Some(why) = &ep.disabled {
            return Err(Outcome::Permanent {
                reason: Reason::Rejected,
                reply: Reply::other(format!(
                    "webhook endpoint disabled ({why}); reload the config to re-enable"
                )),
            });
        }
        let now = Instant::now();
        match ep.circuit {
            Circuit::Closed => Ok(()),
            Circuit::Open { until } if now < until => Err(Outcome::Transient {
                reply: Reply::other("webhook circuit open"),
                retry_after: Some(until - now),
            }),
            // A probe that outlived its own timeout was dropped (shutdown); let another go.
            Circuit::Probing { since } if now - since < timeout + Duration::from_secs(1) => {
                Err(Outcome::Transient {
                    reply: Reply::other("webhook circuit open (probe in flight)"),
                    retry_after: None,
                })
            }
            Circuit::Open { .. } | Circuit::Probing { .. } => {
                ep.circuit = Circuit::Probing { since: now };
                Ok(())
            }
        }
    }

    fn record(&self, ep: &Mutex<Endpoint>, url: &str, job: &Job, health: Health, reply: &str) {
        let mut ep = ep.lock().expect("endpoint lock");
        match health {
            Health::Up => {
                if !matches!(ep.circuit, Circuit::Closed) {
                    tracing::info!(url = %redact(url), "webhook circuit closed");
                }
                ep.failures = 0;
                ep.circuit = Circuit::Closed;
            }
            Health::Gone => {
                tracing::warn!(
                    url = %redact(url),
                    queue_id = %job.queue_id,
                    reply,
                    "webhook endpoint answered 410 Gone; disabled until the config is reloaded"
                );
                ep.disabled = Some(reply.to_owned());
                self.disabled.insert(url);
                ep.failures = 0;
                ep.circuit = Circuit::Closed;
            }
            Health::Down => {
                ep.failures = ep.failures.saturating_add(1);
                let probing = matches!(ep.circuit, Circuit::Probing { .. });
                let closed = matches!(ep.circuit, Circuit::Closed);
                if probing || ep.failures >= job.route.breaker_threshold() {
                    let cooldown = job.route.breaker_cooldown();
                    if probing || closed {
                        tracing::warn!(
                            url = %redact(url),
                            failures = ep.failures,
                            cooldown_ms = cooldown.as_millis() as u64,
                            reply,
                            "webhook circuit opened"
                        );
                    }
                    ep.circuit = Circuit::Open {
                        until: Instant::now() + cooldown,
                    };
                }
            }
        }
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
        let ep = self.endpoint(url);
        if let Err(outcome) = self.admit(&ep, timeout) {
            return all(outcome);
        }
        let body = Bytes::from(payload::build(job));
        let id = payload::webhook_id(job);
        let now_ms = self.clock.now_ms();
        let headers = secret.headers(&id, now_ms / 1000, &body);
        let result = client.post(url, &headers, body, timeout).await;
        let (outcome, health) = classify(result, now_ms);
        let reply = outcome.reply().to_string();
        self.record(&ep, url, job, health, &reply);
        all(outcome)
    }
}

impl Courier for WebhookCourier {
    fn deliver<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(self.attempt(job))
    }
}

/// Maps an HTTP result to the recipients' outcome and the endpoint's health.
fn classify(result: Result<HttpResponse, HttpError>, now_ms: i64) -> (Outcome, Health) {
    let resp = match result {
        Ok(r) => r,
        Err(e) => {
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

    fn resp(status: u16, retry_after: Option<&str>) -> Result<HttpResponse, HttpError> {
        let mut headers = hyper::HeaderMap::new();
        if let Some(v) = retry_after {
            headers.insert(hyper::header::RETRY_AFTER, v.parse().unwrap());
        }
        Ok(HttpResponse {
            status,
            headers,
            body: Bytes::from_static(b"nope\r\n"),
        })
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
        let (o, h) = classify(Err(HttpError::Timeout(Duration::from_secs(1))), 0);
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

    #[test]
    fn secrets_and_signatures() {
        assert!(matches!(Secret::parse("abc"), Err(SecretError::Prefix)));
        assert!(matches!(
            Secret::parse("whsec_!!"),
            Err(SecretError::Base64)
        ));
        assert!(matches!(
            Secret::parse("whsec_YWJj"),
            Err(SecretError::Short)
        ));
        // The example of the Standard Webhooks reference libraries.
        let s = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            s.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }
}

//! The circuit breaker per webhook endpoint: after `breaker_threshold` failures in a row
//! the circuit opens for `breaker_cooldown` (no requests), then one probe decides
//! whether it closes again. A `410 Gone` disables the endpoint until the next reload.
//! Time comes from the injected clock, so tests move it instead of waiting.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::DisabledEndpoints;
use crate::clock::Clock;
use crate::net::client::redact;

/// What an answer says about the endpoint's health, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// It answered sensibly (2xx, 3xx, 4xx): close the circuit.
    Up,
    /// Timeout, connection trouble or 5xx: count towards opening the circuit.
    Down,
    /// 410: the receiver asks never to be called again.
    Gone,
}

/// Times are the clock's milliseconds. A clock that stepped back before `since` counts
/// as the wait being over: a stuck-open circuit is worse than an early probe.
#[derive(Debug, Clone, Copy)]
enum Circuit {
    Closed,
    Open {
        since: i64,
        cooldown: Duration,
    },
    /// One probe request is under way.
    Probing {
        since: i64,
    },
}

/// How long ago `since` was, or `None` if the clock is now before it.
fn elapsed(now_ms: i64, since: i64) -> Option<Duration> {
    u64::try_from(now_ms - since)
        .ok()
        .map(Duration::from_millis)
}

#[derive(Debug)]
pub struct Endpoint {
    disabled: Option<String>,
    failures: u32,
    circuit: Circuit,
}

/// Why a request may not go out now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Disabled by a `410 Gone` (the reply it gave).
    Disabled(String),
    /// The circuit is open for this much longer.
    Open(Duration),
    /// Another request is probing the endpoint.
    Probing,
}

/// The breaker's limits, from the route.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub threshold: u32,
    pub cooldown: Duration,
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

pub struct Breakers {
    clock: Arc<dyn Clock>,
    endpoints: Mutex<HashMap<String, Arc<Mutex<Endpoint>>>>,
    /// The disabled endpoints, as the door sees them.
    disabled: Arc<DisabledEndpoints>,
}

impl Breakers {
    pub fn new(clock: Arc<dyn Clock>, disabled: Arc<DisabledEndpoints>) -> Breakers {
        Breakers {
            clock,
            endpoints: Mutex::default(),
            disabled,
        }
    }

    /// Re-enables every endpoint disabled by a `410 Gone`. Returns how many.
    pub fn enable_all(&self) -> usize {
        let endpoints = self.endpoints.lock();
        let mut enabled = 0;
        for (url, ep) in endpoints.iter() {
            if ep.lock().disabled.take().is_some() {
                tracing::info!(url = %redact(url), "webhook endpoint re-enabled");
                enabled += 1;
            }
        }
        self.disabled.clear();
        enabled
    }

    pub fn status(&self) -> Vec<EndpointStatus> {
        let endpoints = self.endpoints.lock();
        let mut list: Vec<EndpointStatus> = endpoints
            .iter()
            .map(|(url, ep)| {
                let ep = ep.lock();
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

    pub fn endpoint(&self, url: &str) -> Arc<Mutex<Endpoint>> {
        self.endpoints
            .lock()
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

    /// Whether a request with `timeout` may go out now; if so and the circuit was open,
    /// this request is the probe.
    pub fn admit(&self, ep: &Mutex<Endpoint>, timeout: Duration) -> Result<(), Refusal> {
        let mut ep = ep.lock();
        if let Some(why) = &ep.disabled {
            return Err(Refusal::Disabled(why.clone()));
        }
        let now = self.clock.now_ms();
        match ep.circuit {
            Circuit::Closed => return Ok(()),
            Circuit::Open { since, cooldown } => {
                let left = elapsed(now, since).and_then(|e| cooldown.checked_sub(e));
                if let Some(left) = left.filter(|l| !l.is_zero()) {
                    return Err(Refusal::Open(left));
                }
            }
            // A probe that outlived its own timeout was dropped (shutdown); let another go.
            Circuit::Probing { since } => {
                if elapsed(now, since).is_some_and(|e| e < timeout + Duration::from_secs(1)) {
                    return Err(Refusal::Probing);
                }
            }
        }
        ep.circuit = Circuit::Probing { since: now };
        Ok(())
    }

    /// Records what an attempt's answer (`reply`) said about the endpoint at `url`.
    pub fn record(
        &self,
        ep: &Mutex<Endpoint>,
        url: &str,
        queue_id: &str,
        limits: Limits,
        health: Health,
        reply: &str,
    ) {
        let mut ep = ep.lock();
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
                    queue_id,
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
                if probing || ep.failures >= limits.threshold {
                    if probing || closed {
                        tracing::warn!(
                            url = %redact(url),
                            failures = ep.failures,
                            cooldown_ms = limits.cooldown.as_millis() as u64,
                            reply,
                            "webhook circuit opened"
                        );
                    }
                    ep.circuit = Circuit::Open {
                        since: self.clock.now_ms(),
                        cooldown: limits.cooldown,
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ShiftedClock;

    const URL: &str = "http://127.0.0.1:1/hook";
    const LIMITS: Limits = Limits {
        threshold: 2,
        cooldown: Duration::from_secs(30),
    };
    const TIMEOUT: Duration = Duration::from_secs(5);

    fn breakers() -> (Breakers, Arc<ShiftedClock>, Arc<DisabledEndpoints>) {
        let clock = Arc::new(ShiftedClock::default());
        let disabled = Arc::new(DisabledEndpoints::default());
        (
            Breakers::new(clock.clone(), disabled.clone()),
            clock,
            disabled,
        )
    }

    #[test]
    fn opens_after_the_threshold_and_a_probe_after_the_cooldown_closes_it() {
        let (b, clock, _) = breakers();
        let ep = b.endpoint(URL);
        for _ in 0..2 {
            assert_eq!(b.admit(&ep, TIMEOUT), Ok(()));
            b.record(&ep, URL, "q1", LIMITS, Health::Down, "HTTP 503");
        }
        assert!(matches!(b.admit(&ep, TIMEOUT), Err(Refusal::Open(_))));
        assert_eq!(b.status()[0].circuit, "open");
        clock.advance(Duration::from_secs(31));
        assert_eq!(b.admit(&ep, TIMEOUT), Ok(()), "the probe");
        assert_eq!(b.admit(&ep, TIMEOUT), Err(Refusal::Probing));
        assert_eq!(b.status()[0].circuit, "half-open");
        b.record(&ep, URL, "q1", LIMITS, Health::Up, "HTTP 200");
        assert_eq!(b.admit(&ep, TIMEOUT), Ok(()));
        assert_eq!(b.status()[0].consecutive_failures, 0);
    }

    #[test]
    fn a_failed_probe_reopens_and_a_lost_probe_lets_another_go() {
        let (b, clock, _) = breakers();
        let ep = b.endpoint(URL);
        for _ in 0..2 {
            b.record(&ep, URL, "q1", LIMITS, Health::Down, "timeout");
        }
        clock.advance(Duration::from_secs(31));
        assert_eq!(b.admit(&ep, TIMEOUT), Ok(()));
        b.record(&ep, URL, "q1", LIMITS, Health::Down, "timeout");
        assert!(matches!(b.admit(&ep, TIMEOUT), Err(Refusal::Open(_))));
        clock.advance(Duration::from_secs(31));
        assert_eq!(b.admit(&ep, TIMEOUT), Ok(()));
        // The probe never reported (dropped at shutdown): after its timeout, another.
        clock.advance(TIMEOUT + Duration::from_secs(2));
        assert_eq!(b.admit(&ep, TIMEOUT), Ok(()));
    }

    #[test]
    fn gone_disables_until_enable_all() {
        let (b, _, disabled) = breakers();
        let ep = b.endpoint(URL);
        b.record(&ep, URL, "q1", LIMITS, Health::Gone, "HTTP 410 Gone");
        assert_eq!(
            b.admit(&ep, TIMEOUT),
            Err(Refusal::Disabled("HTTP 410 Gone".into()))
        );
        assert!(disabled.contains(URL));
        assert_eq!(b.enable_all(), 1);
        assert!(!disabled.contains(URL));
        assert_eq!(b.admit(&ep, TIMEOUT), Ok(()));
    }
}

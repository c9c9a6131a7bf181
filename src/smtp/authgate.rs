//! The gate in front of AUTH password checks. Argon2 costs ~19 MiB and tens of
//! milliseconds per verification, so verifications run on a bounded pool (one worker per
//! core by default) with a bounded queue, and a client address that keeps failing is
//! limited across sessions: `auth_fail_burst` failures, then one guess per
//! `auth_fail_interval` (a governor keyed limiter), and a lockout that doubles each time
//! it is hit. Failures are counted for `/metrics` and logged once per address per
//! interval, never one line each.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use governor::clock::Clock as _;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::{SmtpConfig, UserConfig};

/// Client addresses tracked at once. Past it, new failing addresses share one bucket,
/// which makes them stricter, never looser: memory stays bounded under any spread.
const MAX_TRACKED: usize = 16 * 1024;
/// The shared bucket's key.
const OVERFLOW: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
/// An address with no failure for this long is forgotten.
const FORGET_AFTER_MS: i64 = 15 * 60 * 1000;
/// The longest lockout, however often it is hit.
const MAX_LOCKOUT_MS: i64 = 5 * 60 * 1000;
/// Aggregated failure log lines: one per address per interval, at most this many.
pub const LOG_INTERVAL: Duration = Duration::from_secs(60);
const LOG_LINES: usize = 20;

/// What became of one AUTH attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    Refused,
    /// The address is over its failure limit: not verified.
    Limited,
    /// Every worker is busy and the queue is full: not verified.
    Busy,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct AuthStats {
    pub verifications: AtomicU64,
    pub failures: AtomicU64,
    pub limited: AtomicU64,
    pub busy: AtomicU64,
    pub running: AtomicUsize,
    /// The most verifications ever seen running at once.
    pub peak: AtomicUsize,
}

/// One failing client address.
#[derive(Debug, Default)]
struct Suspect {
    last_failure_ms: i64,
    strikes: u32,
    locked_until_ms: i64,
    /// Failures since the last aggregated log line.
    unlogged: u32,
}

/// governor's clock over the daemon's, so that tests move both together.
#[derive(Clone)]
pub struct GovernorClock(Arc<dyn Clock>);

impl governor::clock::Clock for GovernorClock {
    type Instant = Nanos;
    fn now(&self) -> Nanos {
        Nanos::from(self.0.now_ms().max(0) as u64 * 1_000_000)
    }
}

type Limiter = RateLimiter<IpAddr, HashMapStateStore<IpAddr>, GovernorClock, NoOpMiddleware<Nanos>>;

pub struct AuthGate {
    pool: Arc<Semaphore>,
    pub workers: usize,
    queue: usize,
    waiting: AtomicUsize,
    limiter: Limiter,
    clock: GovernorClock,
    suspects: Mutex<HashMap<IpAddr, Suspect>>,
    pub stats: Arc<AuthStats>,
}

impl AuthGate {
    /// The pool size and the limits are read once: changing them needs a restart.
    pub fn new(config: &SmtpConfig, clock: Arc<dyn Clock>) -> AuthGate {
        let workers = match config.auth_workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let burst = NonZeroU32::new(config.auth_fail_burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(config.auth_fail_interval.0)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        let clock = GovernorClock(clock);
        AuthGate {
            pool: Arc::new(Semaphore::new(workers)),
            workers,
            queue: config.auth_queue,
            waiting: AtomicUsize::new(0),
            limiter: RateLimiter::hashmap_with_clock(quota, clock.clone()),
            clock,
            suspects: Mutex::default(),
            stats: Arc::default(),
        }
    }

    fn now_ms(&self) -> i64 {
        self.clock.0.now_ms()
    }

    /// Checks `password` for `user`, within the limits. Never runs more than `workers`
    /// verifications at once, whatever the number of sessions.
    pub async fn verify(
        &self,
        ip: IpAddr,
        users: Arc<Vec<UserConfig>>,
        user: String,
        password: String,
    ) -> Verdict {
        let charged = match self.admit(ip) {
            Admit::Refused => return self.limited(),
            Admit::Charged => true,
            Admit::Free => false,
        };
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            self.stats.busy.fetch_add(1, Ordering::Relaxed);
            return Verdict::Busy;
        }
        let permit = self.pool.clone().acquire_owned().await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        let Ok(permit) = permit else {
            return Verdict::Busy;
        };
        // The address may have started failing while this attempt queued (a thousand
        // parallel guesses): it then pays like any later guess.
        if !charged && matches!(self.admit(ip), Admit::Refused) {
            return self.limited();
        }
        let stats = self.stats.clone();
        let running = stats.running.fetch_add(1, Ordering::AcqRel) + 1;
        stats.peak.fetch_max(running, Ordering::AcqRel);
        let ok = tokio::task::spawn_blocking(move || {
            let ok = super::auth::verify(&users, &user, &password);
            stats.running.fetch_sub(1, Ordering::AcqRel);
            drop(permit);
            ok
        })
        .await
        .unwrap_or(false);
        self.stats.verifications.fetch_add(1, Ordering::Relaxed);
        if ok {
            return Verdict::Accepted;
        }
        self.failed(ip);
        Verdict::Refused
    }

    fn limited(&self) -> Verdict {
        self.stats.limited.fetch_add(1, Ordering::Relaxed);
        Verdict::Limited
    }

    /// An address with no recent failure verifies freely; a failing one pays one
    /// governor cell per verification, and waits out its lockout first.
    fn admit(&self, ip: IpAddr) -> Admit {
        let now = self.now_ms();
        let mut suspects = self.suspects.lock();
        let key = key_of(&suspects, ip);
        let Some(s) = suspects.get_mut(&key) else {
            return Admit::Free;
        };
        if s.locked_until_ms > now {
            return Admit::Refused;
        }
        match self.limiter.check_key(&key) {
            Ok(()) => Admit::Charged,
            Err(not_until) => {
                s.strikes = s.strikes.saturating_add(1);
                let wait = not_until.wait_time_from(self.clock.now()).as_millis() as i64;
                let factor = 1i64 << s.strikes.saturating_sub(1).min(20);
                s.locked_until_ms = now + wait.max(1).saturating_mul(factor).min(MAX_LOCKOUT_MS);
                Admit::Refused
            }
        }
    }

    fn failed(&self, ip: IpAddr) {
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ms();
        let mut suspects = self.suspects.lock();
        let mut key = key_of(&suspects, ip);
        if !suspects.contains_key(&key) {
            if suspects.len() >= MAX_TRACKED {
                suspects.retain(|_, s| now - s.last_failure_ms < FORGET_AFTER_MS);
            }
            if suspects.len() >= MAX_TRACKED {
                key = OVERFLOW;
            }
            // The first failure is the first cell of the address's burst.
            let _ = self.limiter.check_key(&key);
        }
        let s = suspects.entry(key).or_default();
        s.last_failure_ms = now;
        s.unlogged += 1;
    }

    /// Logs the failures of the last interval and forgets quiet addresses, until
    /// shutdown (and once more then).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(LOG_INTERVAL);
        tick.tick().await;
        loop {
            let stop = tokio::select! {
                _ = tick.tick() => false,
                () = shutdown.cancelled() => true,
            };
            self.flush_log();
            if stop {
                return;
            }
        }
    }

    fn flush_log(&self) {
        let now = self.now_ms();
        let mut lines = Vec::new();
        {
            let mut suspects = self.suspects.lock();
            for (ip, s) in suspects.iter_mut().filter(|(_, s)| s.unlogged > 0) {
                lines.push((*ip, s.unlogged, s.locked_until_ms > now));
                s.unlogged = 0;
            }
            suspects.retain(|_, s| {
                now - s.last_failure_ms < FORGET_AFTER_MS || s.locked_until_ms > now
            });
        }
        self.limiter.retain_recent();
        lines.sort_by_key(|(_, n, _)| std::cmp::Reverse(*n));
        for (ip, failures, locked) in lines.iter().take(LOG_LINES) {
            let client = if *ip == OVERFLOW {
                "(other addresses)".to_owned()
            } else {
                ip.to_string()
            };
            tracing::warn!(%client, failures, locked, interval_s = LOG_INTERVAL.as_secs(), "authentication failures");
        }
        if lines.len() > LOG_LINES {
            let rest: u32 = lines.iter().skip(LOG_LINES).map(|(_, n, _)| n).sum();
            tracing::warn!(
                addresses = lines.len() - LOG_LINES,
                failures = rest,
                "authentication failures from further addresses"
            );
        }
    }
}

enum Admit {
    Free,
    Charged,
    Refused,
}

/// The key an address is tracked under: its own, or the shared bucket when the map is
/// full and it is not in it.
fn key_of(suspects: &HashMap<IpAddr, Suspect>, ip: IpAddr) -> IpAddr {
    if suspects.contains_key(&ip) || suspects.len() < MAX_TRACKED {
        ip
    } else {
        OVERFLOW
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ShiftedClock;

    fn gate(clock: Arc<ShiftedClock>) -> AuthGate {
        let config = SmtpConfig {
            auth_workers: 1,
            ..SmtpConfig::default()
        };
        AuthGate::new(&config, clock)
    }

    #[test]
    fn burst_then_one_per_interval_then_growing_lockout() {
        let clock = Arc::new(ShiftedClock::default());
        let g = gate(clock.clone());
        let ip: IpAddr = [192, 0, 2, 1].into();
        let mut verified = 0;
        for _ in 0..50 {
            match g.admit(ip) {
                Admit::Refused => {}
                _ => {
                    verified += 1;
                    g.failed(ip);
                }
            }
        }
        assert_eq!(verified, 10, "the burst");
        let other: IpAddr = [192, 0, 2, 2].into();
        assert!(matches!(g.admit(other), Admit::Free));
        // Each later lockout is longer: after 1 s one guess, after 1 s more none.
        clock.advance(Duration::from_millis(1100));
        assert!(matches!(g.admit(ip), Admit::Charged));
        g.failed(ip);
        assert!(matches!(g.admit(ip), Admit::Refused));
        clock.advance(Duration::from_millis(1100));
        assert!(matches!(g.admit(ip), Admit::Refused), "lockout doubled");
    }
}

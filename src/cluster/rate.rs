//! Per-destination delivery rates shared by every node: a GCRA in Redis hands out
//! leases of consecutive send slots, so that the cluster as a whole never exceeds a
//! destination's rate and a node pays one round trip per lease, not per message. While
//! Redis is unreachable a node paces itself at the rate divided by the node count.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, RateLimiter};
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::config::Rate;

/// Most slots one lease takes, however fast the destination: a node that stops (or a
/// lane that empties) wastes at most this many of the cluster's slots.
pub const MAX_LEASE: u32 = 500;

/// How late a slot may still be used. A fast destination's slots are microseconds
/// apart, and a lane that sends a little slower than its rate must not throw its lease
/// away (and pay a round trip) at every message; a slow one's must not be spent so late
/// that it lands next to the following slot. Either way a window of the rate holds at
/// most this much of the rate more than the rate.
pub const GRACE: Duration = Duration::from_millis(50);

/// Takes `ARGV[2]` consecutive slots `ARGV[1]` microseconds apart from the destination's
/// theoretical arrival time, on Redis's own clock so that nodes' clocks never matter.
/// Returns how many microseconds from now the first slot is.
pub const LEASE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local after = tat + n * interval
redis.call('SET', KEYS[1], string.format('%.0f', after), 'PX', math.floor((after - now) / 1000) + 60000)
return math.floor(tat - now)
";

/// How many slots to ask for: what `horizon` of the rate holds, no more than the lane
/// has waiting (an unused slot is lost to the whole cluster), at least one.
pub fn lease_size(rate: Rate, horizon: Duration, waiting: usize) -> u32 {
    let per_sec = f64::from(rate.count) / rate.per.as_secs_f64().max(1e-6);
    let fits = (per_sec * horizon.as_secs_f64()).floor();
    let fits = if fits.is_finite() { fits as u64 } else { 1 };
    let fits = u32::try_from(fits).unwrap_or(u32::MAX).clamp(1, MAX_LEASE);
    fits.min(u32::try_from(waiting.max(1)).unwrap_or(u32::MAX))
}

/// The slots of a lease as offsets from the moment its answer arrived.
pub fn slots(first_in: Duration, interval: Duration, n: u32) -> Vec<Duration> {
    (0..n).map(|i| first_in + interval * i).collect()
}

/// The rate a node keeps to while it cannot reach Redis.
pub fn fallback(rate: Rate, divisor: u32) -> Rate {
    Rate {
        count: rate.count,
        per: rate.per * divisor.max(1),
    }
}

/// One destination's leased slots and its fallback pace.
struct Lane {
    slots: VecDeque<Instant>,
    fallback: Option<(Rate, Arc<DefaultDirectRateLimiter>)>,
}

/// Every destination's lease; lanes are driven one job at a time, so each lane's entry
/// is taken by one caller at once.
#[derive(Default)]
pub struct Leases {
    lanes: Mutex<HashMap<String, Lane>>,
}

impl Leases {
    /// The next leased slot of `key`, if one is left. Cheap: no I/O.
    pub fn next_slot(&self, key: &str) -> Option<Instant> {
        let mut lanes = self.lanes.lock();
        let lane = lanes.get_mut(key)?;
        let now = Instant::now();
        while lane.slots.front().is_some_and(|s| *s + GRACE < now) {
            lane.slots.pop_front();
        }
        lane.slots.pop_front()
    }

    /// Stores a lease that arrived at `at`.
    pub fn store(&self, key: &str, at: Instant, offsets: Vec<Duration>) {
        let mut lanes = self.lanes.lock();
        let lane = lanes.entry(key.to_owned()).or_insert_with(|| Lane {
            slots: VecDeque::new(),
            fallback: None,
        });
        lane.slots.extend(offsets.into_iter().map(|o| at + o));
    }

    /// The limiter that paces `key` at `rate` while Redis is away.
    pub fn fallback(&self, key: &str, rate: Rate) -> Arc<DefaultDirectRateLimiter> {
        let mut lanes = self.lanes.lock();
        let lane = lanes.entry(key.to_owned()).or_insert_with(|| Lane {
            slots: VecDeque::new(),
            fallback: None,
        });
        match &lane.fallback {
            Some((r, limiter)) if *r == rate => limiter.clone(),
            _ => {
                let limiter = Arc::new(RateLimiter::direct(rate.quota()));
                lane.fallback = Some((rate, limiter.clone()));
                limiter
            }
        }
    }

    /// Slots leased and not yet used, over all destinations (for `/metrics`).
    pub fn unused(&self) -> usize {
        self.lanes.lock().values().map(|l| l.slots.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lease_sizes() {
        let ten = Rate::per_second(10);
        assert_eq!(lease_size(ten, Duration::from_secs(1), 100), 10);
        assert_eq!(lease_size(ten, Duration::from_secs(1), 3), 3);
        assert_eq!(lease_size(ten, Duration::from_millis(50), 100), 1);
        assert_eq!(
            lease_size(
                Rate::per_second(1_000_000),
                Duration::from_secs(1),
                usize::MAX
            ),
            MAX_LEASE
        );
        assert_eq!(ten.interval(), Duration::from_millis(100));
        assert_eq!(fallback(ten, 3).per, Duration::from_secs(3));
        assert_eq!(fallback(ten, 0).per, Duration::from_secs(1));
    }

    proptest! {
        /// However a lease is cut, the slots it holds never put more than `count + 1`
        /// sends in any window of `per` (the GCRA's promise that the tests rely on).
        #[test]
        fn slots_keep_the_rate(count in 1u32..200, per_ms in 1u64..5000, first_ms in 0u64..5000, waiting in 0usize..1000) {
            let rate = Rate { count, per: Duration::from_millis(per_ms) };
            let n = lease_size(rate, Duration::from_secs(1), waiting);
            prop_assert!((1..=MAX_LEASE).contains(&n));
            let s = slots(Duration::from_millis(first_ms), rate.interval(), n);
            prop_assert_eq!(s.len(), n as usize);
            for (i, start) in s.iter().enumerate() {
                let within = s[i..].iter().take_while(|t| **t < *start + rate.per).count();
                prop_assert!(within as u32 <= count + 1);
            }
        }
    }

    #[test]
    fn stale_slots_are_dropped() {
        let leases = Leases::default();
        let step = Duration::from_millis(10);
        let long_ago = Instant::now() - Duration::from_secs(5);
        leases.store("d", long_ago, slots(Duration::ZERO, step, 3));
        assert!(leases.next_slot("d").is_none(), "missed slots are given up");
        leases.store("d", Instant::now(), slots(Duration::ZERO, step, 3));
        assert!(leases.next_slot("d").is_some());
        assert_eq!(leases.unused(), 2);
        assert!(leases.next_slot("other").is_none());
    }
}

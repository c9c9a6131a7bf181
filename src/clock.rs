//! Time as the daemon sees it, passed in so that tests can move it (retry schedules,
//! expiry and cache lifetimes are tested without sleeping for minutes).

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch: for what is stored or shown (due times, expiry).
    fn now_ms(&self) -> i64;

    fn now_us(&self) -> i64 {
        self.now_ms() * 1000
    }

    /// The monotonic clock: for in-memory lifetimes and intervals (cache entries, pooled
    /// connections, rate windows), which must not jump when the wall clock is stepped.
    fn now_instant(&self) -> Instant {
        Instant::now()
    }
}

/// The wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }

    fn now_us(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0)
    }
}

/// A clock that runs from the real clocks plus an offset that tests advance; both the
/// wall and the monotonic reading move by it.
#[derive(Default)]
pub struct ShiftedClock {
    offset_ms: AtomicI64,
}

impl ShiftedClock {
    /// Moves time forward. Nothing sleeping on the real clock notices by itself: whoever
    /// advances also rings what waits on the moved deadlines (e.g. `App::wake_scheduler`).
    pub fn advance(&self, by: Duration) {
        self.offset_ms
            .fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }

    fn offset(&self) -> Duration {
        Duration::from_millis(self.offset_ms.load(Ordering::SeqCst).max(0) as u64)
    }
}

impl Clock for ShiftedClock {
    fn now_ms(&self) -> i64 {
        SystemClock.now_ms() + self.offset_ms.load(Ordering::SeqCst)
    }

    fn now_us(&self) -> i64 {
        SystemClock.now_us() + self.offset_ms.load(Ordering::SeqCst) * 1000
    }

    fn now_instant(&self) -> Instant {
        Instant::now() + self.offset()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifted_clock_moves_wall_and_monotonic_time_together() {
        let clock = ShiftedClock::default();
        let (wall, mono) = (clock.now_ms(), clock.now_instant());
        clock.advance(Duration::from_secs(3600));
        assert!(clock.now_ms() - wall >= 3_600_000);
        assert!(clock.now_instant() - mono >= Duration::from_secs(3600));
    }
}

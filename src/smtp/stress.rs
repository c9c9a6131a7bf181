//! The connection table: open sessions in total and per client address, the "stress"
//! state that shortens every timeout under connection pressure (as Postfix's smtpd does),
//! and eviction of the idlest session when a new client finds the table full.
//!
//! A session's "activity" is the last moment it made real progress: a complete command
//! line, or in DATA a second's worth of bytes at the minimum rate. A client that dribbles
//! a byte every few seconds never refreshes it, so it is the first to go.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;

/// A session idle for less than this is never evicted: a burst of new connections must
/// not push out clients that are working.
const EVICT_MIN_IDLE_MS: i64 = 1000;

/// The limits that define "full" and "under stress", read from the live config.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub max_total: usize,
    pub max_per_ip: usize,
    /// Fraction (0..=1) of either cap above which sessions run with the stress timeouts.
    pub stress_threshold: f64,
}

struct Entry {
    ip: IpAddr,
    activity: Arc<Activity>,
    evict: CancellationToken,
}

#[derive(Default)]
struct Inner {
    per_ip: HashMap<IpAddr, usize>,
    sessions: HashMap<u64, Entry>,
    caps: Option<Caps>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct TableStats {
    pub refused: AtomicU64,
    pub evicted: AtomicU64,
}

pub struct Table {
    inner: Mutex<Inner>,
    since: Since,
    next_id: AtomicU64,
    /// Bumped whenever the stress state of the table or of an address may have changed;
    /// waiting sessions re-evaluate their deadlines.
    generation: watch::Sender<u64>,
    pub stats: TableStats,
}

/// Milliseconds since the table was made, on the injected monotonic clock.
#[derive(Clone)]
struct Since {
    epoch: Instant,
    clock: Arc<dyn Clock>,
}

impl Since {
    /// Called on every command line: one clock read, no allocation.
    fn ms(&self) -> i64 {
        self.clock
            .now_instant()
            .saturating_duration_since(self.epoch)
            .as_millis() as i64
    }
}

/// The last moment (ms since the table's epoch) a session made progress.
pub struct Activity {
    since: Since,
    last_ms: AtomicI64,
}

impl Activity {
    pub fn touch(&self) {
        self.last_ms.store(self.since.ms(), Ordering::Relaxed);
    }
}

/// A session's place in the table, released on drop however the session ends.
pub struct Slot {
    table: Arc<Table>,
    id: u64,
    pub ip: IpAddr,
    pub activity: Arc<Activity>,
    /// Cancelled when the session is evicted to admit another client.
    pub evict: CancellationToken,
}

impl Slot {
    /// Whether this session should run with the stress timeouts now.
    pub fn stressed(&self) -> bool {
        self.table.stressed(self.ip)
    }

    /// Changes whenever [`Slot::stressed`] may have changed.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.table.generation.subscribe()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.table.release(self.id);
    }
}

impl Table {
    pub fn new(clock: Arc<dyn Clock>) -> Table {
        Table {
            inner: Mutex::default(),
            since: Since {
                epoch: clock.now_instant(),
                clock,
            },
            next_id: AtomicU64::new(0),
            generation: watch::Sender::new(0),
            stats: TableStats::default(),
        }
    }
}

fn over(n: usize, cap: usize, threshold: f64) -> bool {
    n as f64 > cap as f64 * threshold
}

impl Table {
    pub fn total(&self) -> usize {
        self.inner.lock().sessions.len()
    }

    /// Whether sessions of `ip` run under stress: the table, or this address's share of
    /// it, is above the threshold. Cheap: one lock, two lookups.
    pub fn stressed(&self, ip: IpAddr) -> bool {
        let (table, mine) = Self::pressure(&self.inner.lock(), ip);
        table || mine
    }

    /// (table under stress, `ip`'s share under stress).
    fn pressure(inner: &Inner, ip: IpAddr) -> (bool, bool) {
        let Some(caps) = inner.caps else {
            return (false, false);
        };
        let mine = inner.per_ip.get(&ip).copied().unwrap_or(0);
        (
            over(inner.sessions.len(), caps.max_total, caps.stress_threshold),
            over(mine, caps.max_per_ip, caps.stress_threshold),
        )
    }

    /// Wakes waiting sessions only when a stress state flipped: a thousand sessions
    /// must not all wake for every connection that comes and goes.
    fn notify_if(&self, before: (bool, bool), after: (bool, bool)) {
        if before != after {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// A slot for a client of `ip`, evicting the idlest session (of the table when it is
    /// full, of this address when its share is) if one has been idle long enough.
    /// `None` when no room can be made.
    pub fn try_take(self: &Arc<Self>, ip: IpAddr, caps: Caps) -> Option<Slot> {
        let mut inner = self.inner.lock();
        let before = Self::pressure(&inner, ip);
        inner.caps = Some(caps);
        let now = self.since.ms();
        let mine = inner.per_ip.get(&ip).copied().unwrap_or(0);
        let scope = if mine >= caps.max_per_ip {
            Some(Some(ip))
        } else if inner.sessions.len() >= caps.max_total {
            Some(None)
        } else {
            None
        };
        if let Some(only) = scope {
            let victim = inner
                .sessions
                .iter()
                .filter(|(_, e)| only.is_none_or(|ip| e.ip == ip))
                .map(|(id, e)| (*id, e.activity.last_ms.load(Ordering::Relaxed)))
                .filter(|(_, last)| now - last >= EVICT_MIN_IDLE_MS)
                .min_by_key(|(_, last)| *last);
            let Some((id, _)) = victim else {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                return None;
            };
            if let Some(e) = Self::remove(&mut inner, id) {
                e.evict.cancel();
                self.stats.evicted.fetch_add(1, Ordering::Relaxed);
                tracing::info!(victim = %e.ip, client = %ip, "idle session evicted: connection table full");
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity {
            since: self.since.clone(),
            last_ms: AtomicI64::new(now),
        });
        let evict = CancellationToken::new();
        *inner.per_ip.entry(ip).or_insert(0) += 1;
        inner.sessions.insert(
            id,
            Entry {
                ip,
                activity: activity.clone(),
                evict: evict.clone(),
            },
        );
        let after = Self::pressure(&inner, ip);
        drop(inner);
        self.notify_if(before, after);
        Some(Slot {
            table: self.clone(),
            id,
            ip,
            activity,
            evict,
        })
    }

    fn remove(inner: &mut Inner, id: u64) -> Option<Entry> {
        let e = inner.sessions.remove(&id)?;
        if let Some(n) = inner.per_ip.get_mut(&e.ip) {
            *n -= 1;
            if *n == 0 {
                inner.per_ip.remove(&e.ip);
            }
        }
        Some(e)
    }

    fn release(&self, id: u64) {
        let mut inner = self.inner.lock();
        let Some(ip) = inner.sessions.get(&id).map(|e| e.ip) else {
            return;
        };
        let before = Self::pressure(&inner, ip);
        Self::remove(&mut inner, id);
        let after = Self::pressure(&inner, ip);
        drop(inner);
        self.notify_if(before, after);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ShiftedClock, SystemClock};
    use std::time::Duration;

    const CAPS: Caps = Caps {
        max_total: 4,
        max_per_ip: 2,
        stress_threshold: 0.5,
    };

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    #[test]
    fn per_ip_cap_evicts_only_an_idle_session_of_that_address() {
        let clock = Arc::new(ShiftedClock::default());
        let t = Arc::new(Table::new(clock.clone()));
        let a = t.try_take(ip(2), CAPS).unwrap();
        let b = t.try_take(ip(2), CAPS).unwrap();
        // Nobody idle long enough yet: refused.
        assert!(t.try_take(ip(2), CAPS).is_none());
        // Both go idle; b then makes progress.
        clock.advance(Duration::from_secs(5));
        b.activity.touch();
        let c = t.try_take(ip(2), CAPS).expect("a's slot");
        assert!(a.evict.is_cancelled() && !b.evict.is_cancelled());
        assert_eq!(t.total(), 2);
        drop(a); // the evicted session ending later releases nothing twice
        assert_eq!(t.total(), 2);
        assert!(t.stressed(ip(2)) && !t.stressed(ip(3)));
        drop((b, c));
        assert_eq!(t.total(), 0);
    }

    #[test]
    fn full_table_evicts_the_idlest() {
        let t = Arc::new(Table::new(Arc::new(SystemClock)));
        let s: Vec<Slot> = (2..6).map(|n| t.try_take(ip(n), CAPS).unwrap()).collect();
        s[1].activity.last_ms.store(-9000, Ordering::Relaxed);
        s[2].activity.last_ms.store(-3000, Ordering::Relaxed);
        let _new = t.try_take(ip(9), CAPS).unwrap();
        assert!(s[1].evict.is_cancelled());
        assert!(!s[2].evict.is_cancelled());
        assert!(t.stressed(ip(9)));
    }
}

//! Domains whose new recipients wait: those of a destination the scheduler suspended
//! (it cannot be reached), until the destination's next probe. A recipient stored for
//! one gets that time as its first attempt, so it is not due, and no claim pass looks
//! at it, before the probe: an arrival for a dead next hop costs its insert and nothing
//! more.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::RwLock;

use super::NewRecipient;

#[derive(Default)]
pub struct DomainDelays {
    until: RwLock<HashMap<String, i64>>,
    /// Entries in `until`: the common case, nothing suspended, costs one load.
    len: AtomicUsize,
}

impl DomainDelays {
    /// New recipients of `domain` wait until `until_ms` (replacing an earlier wait).
    pub fn set(&self, domain: &str, until_ms: i64) {
        let mut map = self.until.write();
        map.insert(domain.to_owned(), until_ms);
        self.len.store(map.len(), Ordering::Release);
    }

    /// New recipients of these domains are due at once again.
    pub fn clear<'a>(&self, domains: impl IntoIterator<Item = &'a str>) {
        let mut map = self.until.write();
        for d in domains {
            map.remove(d);
        }
        self.len.store(map.len(), Ordering::Release);
    }

    /// When a recipient of `domain` stored at `now_ms` is first due. Called per
    /// recipient on the intake path: no allocation, one atomic load when no destination
    /// is suspended.
    pub fn first_attempt(&self, domain: &str, now_ms: i64) -> i64 {
        if self.len.load(Ordering::Acquire) == 0 {
            return now_ms;
        }
        match self.until.read().get(domain) {
            Some(&until) if until > now_ms => until,
            _ => now_ms,
        }
    }

    /// Each recipient's first attempt (by its domain, in order), or `None` when every one
    /// is due at `now_ms`.
    pub fn first_attempts<'a>(
        &self,
        domains: impl IntoIterator<Item = &'a str>,
        now_ms: i64,
    ) -> Option<Vec<i64>> {
        if self.len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let firsts: Vec<i64> = domains
            .into_iter()
            .map(|d| self.first_attempt(d, now_ms))
            .collect();
        firsts.iter().any(|&t| t > now_ms).then_some(firsts)
    }

    /// Whether every one of `recipients` would wait (so nothing needs the scheduler now).
    pub fn all_wait(&self, recipients: &[NewRecipient], now_ms: i64) -> bool {
        self.len.load(Ordering::Acquire) != 0
            && recipients
                .iter()
                .all(|r| self.first_attempt(&r.domain, now_ms) > now_ms)
    }
}

/// Row `i`'s first attempt from what [`DomainDelays::first_attempts`] returned: due at
/// `now_ms` when nothing waits.
pub fn first_of(firsts: Option<&[i64]>, i: usize, now_ms: i64) -> i64 {
    firsts.and_then(|f| f.get(i).copied()).unwrap_or(now_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rcpt(domain: &str) -> NewRecipient {
        NewRecipient {
            address: format!("a@{domain}"),
            domain: domain.into(),
        }
    }

    #[test]
    fn waits_only_for_delayed_domains_until_their_time() {
        let d = DomainDelays::default();
        let both = [rcpt("down.test"), rcpt("up.test")];
        assert_eq!(d.first_attempts(crate::queue::domains(&both), 100), None);
        assert!(!d.all_wait(&both, 100));
        d.set("down.test", 500);
        assert_eq!(
            d.first_attempts(crate::queue::domains(&both), 100),
            Some(vec![500, 100])
        );
        assert!(!d.all_wait(&both, 100));
        assert!(d.all_wait(&both[..1], 100));
        // Past its time the wait is over even before anyone clears it.
        assert_eq!(d.first_attempts(crate::queue::domains(&both), 500), None);
        d.clear(["down.test"]);
        assert_eq!(d.first_attempt("down.test", 100), 100);
        assert!(!d.all_wait(&both[..1], 100));
    }
}

//! Which webhook endpoints are disabled (they answered `410 Gone`), shared between the
//! courier that learns it and the door, which refuses their domains while it lasts.

use parking_lot::RwLock;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The set of disabled endpoint URLs. Cloned cheaply behind an `Arc`; no globals.
#[derive(Debug, Default)]
pub struct DisabledEndpoints {
    /// How many are disabled: with none (the normal case) the door pays one atomic load.
    count: AtomicUsize,
    urls: RwLock<HashSet<String>>,
}

impl DisabledEndpoints {
    /// Whether `url` is disabled. Called at RCPT time for webhook routes: must be cheap
    /// (no I/O, no awaits, no allocation).
    pub fn contains(&self, url: &str) -> bool {
        if self.count.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.urls.read().contains(url)
    }

    pub(super) fn insert(&self, url: &str) {
        let mut urls = self.urls.write();
        urls.insert(url.to_owned());
        self.count.store(urls.len(), Ordering::Release);
    }

    pub(super) fn clear(&self) {
        let mut urls = self.urls.write();
        urls.clear();
        self.count.store(0, Ordering::Release);
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_contains_clear() {
        let d = DisabledEndpoints::default();
        assert!(!d.contains("https://a.test/hook"));
        d.insert("https://a.test/hook");
        d.insert("https://a.test/hook");
        assert!(d.contains("https://a.test/hook") && !d.contains("https://b.test/hook"));
        assert_eq!(d.len(), 1);
        d.clear();
        assert!(d.is_empty() && !d.contains("https://a.test/hook"));
    }
}

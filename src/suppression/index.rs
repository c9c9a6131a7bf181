//! The suppression list's in-memory index: one 64-bit keyed hash per entry mapped to its
//! expiry, so that the door's check is a few hash lookups whatever the list's size, and a
//! million entries cost tens of megabytes, not the addresses themselves.
//!
//! A hash collision would refuse one unrelated recipient; with 2^64 keys and a million
//! entries the chance per lookup is about 5 in 10^14, which is accepted. The hash keys
//! are random per process, so nobody can aim a collision at the list.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};

use parking_lot::RwLock;

use super::{NewEntry, Scope};

/// Minutes since the Unix epoch, 0 = never expires: four bytes per entry instead of eight.
type ExpiryMinutes = u32;

/// Keys are already uniform hashes; hashing them again would only cost time.
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

pub(super) struct Index {
    keys: RandomState,
    map: RwLock<HashMap<u64, ExpiryMinutes, BuildHasherDefault<Identity>>>,
}

fn to_minutes(ms: Option<i64>) -> ExpiryMinutes {
    match ms {
        None => 0,
        Some(ms) => (ms.max(60_000) / 60_000).min(i64::from(u32::MAX)) as u32,
    }
}

impl Index {
    pub fn new() -> Index {
        Index {
            keys: RandomState::new(),
            map: RwLock::new(HashMap::default()),
        }
    }

    /// The key of `target` (a normalised address, or `@domain`) within `scope`.
    fn key(&self, scope: &Scope, target: &str) -> u64 {
        let mut h = self.keys.build_hasher();
        match scope {
            Scope::Global => h.write_u8(0),
            Scope::Campaign(name) => {
                h.write_u8(1);
                h.write(name.as_bytes());
                h.write_u8(0xff);
            }
        }
        h.write(target.as_bytes());
        h.finish()
    }

    pub fn insert_many<'a>(
        &self,
        entries: impl IntoIterator<Item = (&'a Scope, &'a str, Option<i64>)>,
    ) {
        let keyed: Vec<(u64, ExpiryMinutes)> = entries
            .into_iter()
            .map(|(s, t, e)| (self.key(s, t), to_minutes(e)))
            .collect();
        let mut map = self.map.write();
        map.reserve(keyed.len());
        map.extend(keyed);
    }

    /// Entries just added (on the delivery path, or after their commit).
    pub fn insert_entries(&self, entries: &[NewEntry]) {
        let keyed: Vec<(u64, ExpiryMinutes)> = entries
            .iter()
            .map(|e| {
                (
                    self.key(&e.scope, &e.target.as_column()),
                    to_minutes(e.expires_ms),
                )
            })
            .collect();
        let mut map = self.map.write();
        map.reserve(keyed.len());
        map.extend(keyed);
    }

    pub fn remove(&self, scope: &Scope, target: &str) {
        let key = self.key(scope, target);
        self.map.write().remove(&key);
    }

    /// Whether `target` is suppressed in `scope` at `now_ms`.
    ///
    /// On the door's hot path: one hash, one read lock, one lookup; no allocation.
    pub fn contains(&self, scope: &Scope, target: &str, now_ms: i64) -> bool {
        let key = self.key(scope, target);
        match self.map.read().get(&key) {
            None => false,
            Some(0) => true,
            Some(&minutes) => i64::from(minutes) * 60_000 > now_ms,
        }
    }

    pub fn len(&self) -> usize {
        self.map.read().len()
    }

    /// Bytes the table holds: its buckets (key, expiry, one control byte each).
    pub fn memory_bytes(&self) -> usize {
        let capacity = self.map.read().capacity();
        // hashbrown keeps the bucket count a power of two at most 7/8 full.
        let buckets = (capacity * 8 / 7).next_power_of_two();
        buckets * (std::mem::size_of::<(u64, ExpiryMinutes)>() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    trait InsertOne {
        fn insert(&self, scope: &Scope, target: &str, expires_ms: Option<i64>);
    }

    impl InsertOne for Index {
        fn insert(&self, scope: &Scope, target: &str, expires_ms: Option<i64>) {
            self.insert_many([(scope, target, expires_ms)]);
        }
    }

    #[test]
    fn scopes_are_separate_and_expiry_is_honoured() {
        let index = Index::new();
        let spring = Scope::Campaign("spring".into());
        index.insert(&Scope::Global, "a@x.test", None);
        index.insert(&spring, "b@x.test", Some(10 * 60_000));
        assert!(index.contains(&Scope::Global, "a@x.test", 0));
        assert!(!index.contains(&spring, "a@x.test", 0));
        assert!(index.contains(&spring, "b@x.test", 9 * 60_000));
        assert!(!index.contains(&spring, "b@x.test", 10 * 60_000));
        assert!(!index.contains(&Scope::Global, "b@x.test", 0));
        // A campaign name cannot run into its target: "ab" + "c@x" is not "a" + "bc@x".
        index.insert(&Scope::Campaign("ab".into()), "c@x.test", None);
        assert!(!index.contains(&Scope::Campaign("a".into()), "bc@x.test", 0));
        index.remove(&Scope::Global, "a@x.test");
        assert!(!index.contains(&Scope::Global, "a@x.test", 0));
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn a_million_entries_stay_within_about_forty_bytes_each() {
        let index = Index::new();
        let targets: Vec<String> = (0..1_000_000).map(|i| format!("u{i}@x.test")).collect();
        index.insert_many(targets.iter().map(|t| (&Scope::Global, t.as_str(), None)));
        assert_eq!(index.len(), 1_000_000);
        let per_entry = index.memory_bytes() / index.len();
        assert!(per_entry <= 40, "{per_entry} bytes per entry");
        assert!(index.contains(&Scope::Global, "u999999@x.test", 0));
        assert!(!index.contains(&Scope::Global, "u1000000@x.test", 0));
    }
}

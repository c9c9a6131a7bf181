//! The guard's inputs as one node counts them, in the form nodes exchange through Redis:
//! each node writes its cumulative per-campaign counts every heartbeat and reads the
//! others', and the guard judges its windows on the sums.

use std::sync::atomic::Ordering;

use crate::campaign::{Campaign, Tally};
use crate::reason::Reason;

/// Cumulative counts of one campaign on one node (or summed over nodes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub presented: u64,
    pub failed: u64,
    /// Recipients whose delivery ended, and those of them that failed.
    pub attempted: u64,
    pub relay_failed: u64,
}

impl Counts {
    /// `c`'s counts now, as the guard's samples take them.
    pub fn of(c: &Campaign) -> Counts {
        let Tally { failed, presented } = c.tally();
        let relay_failed = c.failures(Reason::Rejected) + c.failures(Reason::Expired);
        Counts {
            presented,
            failed,
            attempted: c.delivered.load(Ordering::Relaxed) + relay_failed,
            relay_failed,
        }
    }

    pub fn add(&mut self, other: Counts) {
        self.presented += other.presented;
        self.failed += other.failed;
        self.attempted += other.attempted;
        self.relay_failed += other.relay_failed;
    }

    /// The value stored in a node's counts hash.
    pub fn encode(&self) -> String {
        format!(
            "{} {} {} {}",
            self.presented, self.failed, self.attempted, self.relay_failed
        )
    }

    /// A value read back; `None` for anything but four counts.
    pub fn decode(text: &str) -> Option<Counts> {
        let mut it = text.split(' ').map(|n| n.parse::<u64>().ok());
        let c = Counts {
            presented: it.next()??,
            failed: it.next()??,
            attempted: it.next()??,
            relay_failed: it.next()??,
        };
        it.next().is_none().then_some(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(p in any::<u64>(), f in any::<u64>(), a in any::<u64>(), r in any::<u64>()) {
            let c = Counts { presented: p, failed: f, attempted: a, relay_failed: r };
            prop_assert_eq!(Counts::decode(&c.encode()), Some(c));
        }

        #[test]
        fn never_panics(text in "\\PC{0,64}") {
            let _ = Counts::decode(&text);
        }
    }

    #[test]
    fn refuses_partial_values() {
        assert_eq!(Counts::decode("1 2 3"), None);
        assert_eq!(Counts::decode("1 2 3 4 5"), None);
        assert_eq!(Counts::decode("1 2 x 4"), None);
        let mut sum = Counts::decode("1 2 3 4").unwrap();
        sum.add(Counts::decode("10 20 30 40").unwrap());
        assert_eq!(sum.encode(), "11 22 33 44");
    }
}

//! Campaigns as the daemon sees them in memory: who owns each message and failure,
//! counters per campaign, and the pause / block state that the hot path consults.
//!
//! Counting a failure is an atomic add on a counter found under a read lock: it is what
//! a flood of bad recipients costs instead of a database row.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use parking_lot::RwLock;

use crate::bounce::BounceClass;
use crate::reason::Reason;

/// Failures with no campaign are counted under this name.
pub const UNATTRIBUTED: &str = "-";
/// Campaigns beyond the cap are counted together under this name, so that a client
/// inventing a new campaign per message cannot exhaust memory.
pub const OVERFLOW: &str = "_other";
/// The canary's probes carry this campaign, so that nothing counts them as mail: intake
/// and the delivery reports skip it (see `canary`).
pub const CANARY: &str = "floodgate-canary";

/// Whether `campaign` is the canary's, whose messages count in no statistic.
pub fn is_canary(campaign: Option<&str>) -> bool {
    campaign == Some(CANARY)
}

/// A campaign a client named, kept off the canary's reserved name: a client claiming it
/// would otherwise escape every statistic, and with them the guard.
pub fn unreserved(name: String) -> String {
    match name == CANARY {
        true => format!("{CANARY}-client"),
        false => name,
    }
}

const REASONS: usize = Reason::ALL.len();
const CLASSES: usize = BounceClass::ALL.len();

#[derive(Debug)]
pub struct Campaign {
    pub name: Arc<str>,
    pub accepted: AtomicU64,
    pub delivered: AtomicU64,
    failures: [AtomicU64; REASONS],
    /// The share of `failures` refused at the door (never queued), for the periodic
    /// `intake_rejections` event.
    refusals: [AtomicU64; REASONS],
    /// Failed and deferred delivery attempts by bounce class.
    classes: [AtomicU64; CLASSES],
    paused: AtomicBool,
    /// Until when (ms since the epoch) new submissions are refused after a purge.
    blocked_until_ms: AtomicI64,
}

impl Campaign {
    fn new(name: Arc<str>) -> Campaign {
        Campaign {
            name,
            accepted: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            failures: std::array::from_fn(|_| AtomicU64::new(0)),
            refusals: std::array::from_fn(|_| AtomicU64::new(0)),
            classes: std::array::from_fn(|_| AtomicU64::new(0)),
            paused: AtomicBool::new(false),
            blocked_until_ms: AtomicI64::new(0),
        }
    }

    pub fn failures(&self, reason: Reason) -> u64 {
        self.failures[reason.index()].load(Ordering::Relaxed)
    }

    /// Failed and deferred delivery attempts of `class`.
    pub fn attempts_of(&self, class: BounceClass) -> u64 {
        self.classes[class.index()].load(Ordering::Relaxed)
    }

    /// The class most of this campaign's failed attempts had, if any failed.
    pub fn top_class(&self) -> Option<(BounceClass, u64)> {
        BounceClass::ALL
            .iter()
            .map(|c| (*c, self.attempts_of(*c)))
            .filter(|(_, n)| *n > 0)
            .max_by_key(|(_, n)| *n)
    }

    /// Failures for `reason` refused at intake (a subset of [`Campaign::failures`]).
    pub fn refusals(&self, reason: Reason) -> u64 {
        self.refusals[reason.index()].load(Ordering::Relaxed)
    }

    /// Every failure, whatever its reason, deferrals apart (a deferral is an attempt
    /// that will be retried, not a failure).
    pub fn total_failures(&self) -> u64 {
        Reason::ALL
            .iter()
            .filter(|r| **r != Reason::Deferred)
            .map(|r| self.failures(*r))
            .sum()
    }

    /// The failures that count against the campaign, and the recipients it presented.
    ///
    /// A recipient refused at the door was presented once and failed once; one accepted
    /// and then refused by the destination was presented once (as accepted) and failed
    /// once. So the ratio is 1.0 for a campaign whose every recipient fails, whichever
    /// stage fails it.
    pub fn tally(&self) -> Tally {
        let failed: u64 = Reason::ALL
            .iter()
            .filter(|r| counts_against(**r))
            .map(|r| self.failures(*r))
            .sum();
        let after_acceptance = self.failures(Reason::Rejected) + self.failures(Reason::Expired);
        let accepted = self.accepted.load(Ordering::Relaxed);
        Tally {
            failed,
            presented: accepted + failed.saturating_sub(after_acceptance),
        }
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    pub fn block_until(&self, until_ms: i64) {
        self.blocked_until_ms.store(until_ms, Ordering::Relaxed);
    }

    pub fn blocked_until(&self) -> i64 {
        self.blocked_until_ms.load(Ordering::Relaxed)
    }

    /// Whether new mail for this campaign is refused right now (paused, or blocked after
    /// a purge).
    pub fn is_held(&self, now_ms: i64) -> bool {
        self.is_paused() || self.blocked_until() > now_ms
    }
}

/// Failures that say something about the campaign's recipients. Temporary refusals
/// (a DNS outage, our own pauses, a full queue), deferrals and purges are not the
/// campaign's doing.
pub fn counts_against(reason: Reason) -> bool {
    !reason.is_temporary() && reason != Reason::Purged
}

/// A campaign's failures and the recipients they are a share of: the one definition of
/// the failure ratio that the guard, the admin API, `ctl` and the dashboard show.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub failed: u64,
    pub presented: u64,
}

impl Tally {
    /// `failed / presented`, 0 when nothing was presented.
    pub fn ratio(self) -> f64 {
        if self.presented == 0 {
            0.0
        } else {
            self.failed as f64 / self.presented as f64
        }
    }

    /// The counts between an earlier tally and this one (a sliding window).
    pub fn since(self, earlier: Tally) -> Tally {
        Tally {
            failed: self.failed.saturating_sub(earlier.failed),
            presented: self.presented.saturating_sub(earlier.presented),
        }
    }
}

/// Every campaign seen since start, plus the intake-wide pause switch.
pub struct Campaigns {
    map: RwLock<HashMap<Arc<str>, Arc<Campaign>>>,
    cap: usize,
    intake_paused: AtomicBool,
}

impl Campaigns {
    pub fn new(cap: usize) -> Campaigns {
        Campaigns {
            map: RwLock::new(HashMap::new()),
            cap: cap.max(1),
            intake_paused: AtomicBool::new(false),
        }
    }

    /// The campaign called `name` (or the unattributed bucket), created on first sight.
    pub fn get(&self, name: Option<&str>) -> Arc<Campaign> {
        let name = name.filter(|n| !n.is_empty()).unwrap_or(UNATTRIBUTED);
        if let Some(c) = self.map.read().get(name) {
            return c.clone();
        }
        let mut map = self.map.write();
        if let Some(c) = map.get(name) {
            return c.clone();
        }
        let key: Arc<str> = if map.len() >= self.cap {
            Arc::from(OVERFLOW)
        } else {
            Arc::from(name)
        };
        map.entry(key.clone())
            .or_insert_with(|| Arc::new(Campaign::new(key)))
            .clone()
    }

    /// Looks a campaign up without creating it.
    pub fn find(&self, name: &str) -> Option<Arc<Campaign>> {
        self.map.read().get(name).cloned()
    }

    pub fn record_failure(&self, campaign: Option<&str>, reason: Reason) -> Arc<Campaign> {
        let c = self.get(campaign);
        c.failures[reason.index()].fetch_add(1, Ordering::Relaxed);
        c
    }

    /// As [`Campaigns::record_failure`] for a failed or deferred delivery attempt, which
    /// also counts its bounce class.
    pub fn record_attempt(
        &self,
        campaign: Option<&str>,
        reason: Reason,
        class: BounceClass,
    ) -> Arc<Campaign> {
        let c = self.record_failure(campaign, reason);
        c.classes[class.index()].fetch_add(1, Ordering::Relaxed);
        c
    }

    /// As [`Campaigns::record_failure`], for a recipient refused at the door.
    pub fn record_refusal(&self, campaign: Option<&str>, reason: Reason) -> Arc<Campaign> {
        self.record_refusals(campaign, reason, 1)
    }

    /// As [`Campaigns::record_refusal`], for `n` recipients at once.
    pub fn record_refusals(&self, campaign: Option<&str>, reason: Reason, n: u64) -> Arc<Campaign> {
        let c = self.get(campaign);
        c.failures[reason.index()].fetch_add(n, Ordering::Relaxed);
        c.refusals[reason.index()].fetch_add(n, Ordering::Relaxed);
        c
    }

    pub fn record_accepted(&self, campaign: Option<&str>, recipients: u64) {
        self.get(campaign)
            .accepted
            .fetch_add(recipients, Ordering::Relaxed);
    }

    /// Whether new mail for `campaign` is refused now. Cheap: one read lock, no allocation.
    pub fn is_held(&self, campaign: Option<&str>, now_ms: i64) -> bool {
        let Some(name) = campaign else { return false };
        self.map.read().get(name).is_some_and(|c| c.is_held(now_ms))
    }

    pub fn all(&self) -> Vec<Arc<Campaign>> {
        self.map.read().values().cloned().collect()
    }

    pub fn intake_paused(&self) -> bool {
        self.intake_paused.load(Ordering::Relaxed)
    }

    pub fn set_intake_paused(&self, paused: bool) {
        self.intake_paused.store(paused, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_overflow() {
        let c = Campaigns::new(2);
        c.record_failure(Some("a"), Reason::MalformedAddress);
        c.record_failure(Some("a"), Reason::MalformedAddress);
        c.record_failure(None, Reason::NoSuchDomain);
        // The cap is reached: a third name lands in the overflow bucket.
        c.record_failure(Some("b"), Reason::NullMx);
        assert_eq!(c.get(Some("a")).failures(Reason::MalformedAddress), 2);
        assert_eq!(c.get(None).failures(Reason::NoSuchDomain), 1);
        assert_eq!(c.find(OVERFLOW).unwrap().failures(Reason::NullMx), 1);
        assert!(c.find("b").is_none());
    }

    #[test]
    fn one_ratio_whichever_stage_fails() {
        let c = Campaigns::new(10);
        // 5 refused at the door, 1 accepted then rejected by the destination, 4 fine.
        c.record_refusals(Some("a"), Reason::NoSuchDomain, 5);
        c.record_accepted(Some("a"), 5);
        c.record_failure(Some("a"), Reason::Rejected);
        c.record_failure(Some("a"), Reason::Deferred);
        c.record_refusal(Some("a"), Reason::DnsTempfail);
        let t = c.get(Some("a")).tally();
        assert_eq!(
            t,
            Tally {
                failed: 6,
                presented: 10
            }
        );
        assert!((t.ratio() - 0.6).abs() < 1e-9);
        assert_eq!(c.get(Some("a")).total_failures(), 7, "deferral apart");
        assert_eq!(Tally::default().ratio(), 0.0);
    }

    #[test]
    fn held_when_paused_or_blocked() {
        let c = Campaigns::new(10);
        let a = c.get(Some("a"));
        assert!(!c.is_held(Some("a"), 1000));
        a.set_paused(true);
        assert!(c.is_held(Some("a"), 1000));
        a.set_paused(false);
        a.block_until(2000);
        assert!(c.is_held(Some("a"), 1000));
        assert!(!c.is_held(Some("a"), 2001));
        assert!(!c.is_held(Some("unknown"), 0));
    }
}

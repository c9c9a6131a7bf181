//! The hot-path half of the failure log: in-memory aggregates (sharded, so concurrent
//! sessions rarely meet on one lock) and the decision whether an event also earns a row
//! (mode, per-campaign sampling, per-campaign governor).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultKeyedRateLimiter, Quota};
use parking_lot::Mutex;

use super::{AggKey, FailLogSettings, FailureEvent};
use crate::bounce::BounceClass;
use crate::config::FailLogMode;
use crate::reason::{Reason, Stage};

/// Per-campaign row budget. Keyed by the event's own `Option<String>` so that a check
/// borrows the event's campaign instead of allocating a key.
pub type Limiter = DefaultKeyedRateLimiter<Option<String>>;

const SHARDS: usize = 16;
/// Campaign entries one shard keeps before it forgets the idle ones (which only resets
/// their sampling phase): bounds memory when campaign names are many.
const CAMPAIGNS_PER_SHARD: usize = 1024;

/// What `record` does with an event beyond counting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Mode off: not even counted.
    Skip,
    /// Counted; no row wanted (mode aggregate).
    CountOnly,
    /// Counted; sampling passed it over.
    SampledOut,
    /// Counted; a row was wanted but the campaign's budget is spent.
    Suppressed,
    /// Counted, and a row goes to the writer.
    Row,
}

/// The live settings and the governor built from them; swapped whole on a change.
pub struct Gate {
    pub settings: FailLogSettings,
    /// None when rows_per_sec is 0: no event rows at all.
    pub limiter: Option<Arc<Limiter>>,
}

impl Gate {
    pub fn new(settings: FailLogSettings) -> Gate {
        let limiter = NonZeroU32::new(settings.rows_per_sec).map(|rate| {
            let burst = NonZeroU32::new(settings.burst).unwrap_or(NonZeroU32::MIN);
            Arc::new(Limiter::keyed(Quota::per_second(rate).allow_burst(burst)))
        });
        Gate { settings, limiter }
    }

    /// The gate for `next`, keeping this governor when the quota is unchanged: toggling
    /// the mode must not hand every campaign a fresh burst.
    pub fn next(&self, next: FailLogSettings) -> Gate {
        if self.same_quota(&next) {
            Gate {
                settings: next,
                limiter: self.limiter.clone(),
            }
        } else {
            Gate::new(next)
        }
    }

    /// Whether the governor and sampling both want a row for an event that is the
    /// `seen`-th (0-based) of its campaign. Cheap: no I/O, no allocation once the
    /// campaign has a governor cell.
    pub fn decide(&self, campaign: &Option<String>, seen: u64) -> Decision {
        match self.settings.mode {
            FailLogMode::Off => return Decision::Skip,
            FailLogMode::Aggregate => return Decision::CountOnly,
            FailLogMode::Full => {}
            FailLogMode::Sampled => {
                // Deterministic: the 1st, (N+1)th, (2N+1)th ... of each campaign.
                if !seen.is_multiple_of(u64::from(self.settings.sample_rate.max(1))) {
                    return Decision::SampledOut;
                }
            }
        }
        match &self.limiter {
            Some(l) if l.check_key(campaign).is_ok() => Decision::Row,
            _ => Decision::Suppressed,
        }
    }

    fn same_quota(&self, next: &FailLogSettings) -> bool {
        self.settings.rows_per_sec == next.rows_per_sec && self.settings.burst == next.burst
    }
}

#[derive(Default)]
struct CampaignTally {
    counts: HashMap<(i64, Stage, Reason, Option<BounceClass>), u64>,
    /// Events of this campaign since it was first seen: the sampling phase.
    seen: u64,
}

type Shard = HashMap<Option<String>, CampaignTally>;

/// In-memory aggregates keyed (minute, campaign, stage, reason), taken by each flush.
pub struct Tally {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl Tally {
    fn shard(&self, campaign: &Option<String>) -> &Mutex<Shard> {
        let i = self.hasher.hash_one(campaign) as usize % self.shards.len();
        &self.shards[i]
    }

    /// Counts `ev` unless `closed()` says the writer has taken its final tally, and returns
    /// the campaign's 0-based event index for sampling. `closed` is read under the shard
    /// lock, which is what makes the final flush exact. Cheap: one short lock; allocates
    /// only on a campaign's first event in a flush interval.
    pub fn count(&self, ev: &FailureEvent, closed: impl FnOnce() -> bool) -> Option<u64> {
        let mut shard = self.shard(&ev.campaign).lock();
        if closed() {
            return None;
        }
        let tally = match shard.get_mut(&ev.campaign) {
            Some(t) => t,
            None => shard.entry(ev.campaign.clone()).or_default(),
        };
        *tally
            .counts
            .entry((ev.at_ms.div_euclid(60_000), ev.stage, ev.reason, ev.class))
            .or_insert(0) += 1;
        let seen = tally.seen;
        tally.seen += 1;
        Some(seen)
    }

    /// Takes every count, leaving the map empty for the next interval.
    pub fn take(&self) -> Vec<(AggKey, u64)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            if shard.len() > CAMPAIGNS_PER_SHARD {
                shard.retain(|_, t| !t.counts.is_empty());
            }
            for (campaign, tally) in shard.iter_mut() {
                for ((minute, stage, reason, class), n) in tally.counts.drain() {
                    out.push((
                        AggKey {
                            minute,
                            campaign: campaign.clone(),
                            stage,
                            reason,
                            class,
                        },
                        n,
                    ));
                }
            }
        }
        out
    }

    /// Puts back counts whose flush did not commit, so that the next flush retries them.
    pub fn merge(&self, aggs: Vec<(AggKey, u64)>) {
        for (key, n) in aggs {
            let mut shard = self.shard(&key.campaign).lock();
            *shard
                .entry(key.campaign)
                .or_default()
                .counts
                .entry((key.minute, key.stage, key.reason, key.class))
                .or_insert(0) += n;
        }
    }

    /// Keys waiting for the next flush.
    pub fn pending_keys(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().values().map(|t| t.counts.len()).sum::<usize>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(
        mode: FailLogMode,
        sample_rate: u32,
        rows_per_sec: u32,
        burst: u32,
    ) -> FailLogSettings {
        FailLogSettings {
            mode,
            sample_rate,
            rows_per_sec,
            burst,
        }
    }

    fn ev(campaign: Option<&str>, at_ms: i64, reason: Reason) -> FailureEvent {
        FailureEvent {
            at_ms,
            campaign: campaign.map(str::to_owned),
            stage: Stage::Intake,
            reason,
            class: None,
            recipient: "x@nx.test".into(),
            detail: "550 5.1.2".into(),
        }
    }

    #[test]
    fn sampled_keeps_the_first_and_every_nth_per_campaign() {
        let gate = Gate::new(settings(FailLogMode::Sampled, 4, 1000, 1000));
        let a = Some("a".to_owned());
        let decisions: Vec<Decision> = (0..9).map(|seen| gate.decide(&a, seen)).collect();
        use Decision::*;
        assert_eq!(
            decisions,
            [
                Row, SampledOut, SampledOut, SampledOut, Row, SampledOut, SampledOut, SampledOut,
                Row
            ]
        );
        // A rate of 0 or 1 keeps every event.
        let every = Gate::new(settings(FailLogMode::Sampled, 0, 1000, 1000));
        assert!((0..5).all(|s| every.decide(&a, s) == Row));
    }

    #[test]
    fn governor_suppresses_beyond_the_burst_per_campaign() {
        // One row per hour refills nothing during the test: exactly the burst passes.
        let gate = Gate {
            settings: settings(FailLogMode::Full, 1, 1, 5),
            limiter: Some(Arc::new(Limiter::keyed(
                Quota::per_hour(NonZeroU32::MIN).allow_burst(NonZeroU32::new(5).unwrap()),
            ))),
        };
        let (a, b) = (Some("a".to_owned()), None);
        let rows_a = (0..20)
            .filter(|&s| gate.decide(&a, s) == Decision::Row)
            .count();
        let rows_b = (0..20)
            .filter(|&s| gate.decide(&b, s) == Decision::Row)
            .count();
        assert_eq!((rows_a, rows_b), (5, 5), "each campaign has its own budget");
        assert_eq!(gate.decide(&a, 99), Decision::Suppressed);
    }

    #[test]
    fn zero_rate_means_no_rows_and_modes_without_rows() {
        let a = Some("a".to_owned());
        let none = Gate::new(settings(FailLogMode::Full, 1, 0, 10));
        assert_eq!(none.decide(&a, 0), Decision::Suppressed);
        let agg = Gate::new(settings(FailLogMode::Aggregate, 1, 10, 10));
        assert_eq!(agg.decide(&a, 0), Decision::CountOnly);
        let off = Gate::new(settings(FailLogMode::Off, 1, 10, 10));
        assert_eq!(off.decide(&a, 0), Decision::Skip);
        // A mode change keeps the governor (no fresh burst); a quota change rebuilds it.
        let kept = off.next(settings(FailLogMode::Full, 7, 10, 10));
        assert!(Arc::ptr_eq(
            kept.limiter.as_ref().unwrap(),
            off.limiter.as_ref().unwrap()
        ));
        let rebuilt = off.next(settings(FailLogMode::Off, 1, 11, 10));
        assert!(!Arc::ptr_eq(
            rebuilt.limiter.as_ref().unwrap(),
            off.limiter.as_ref().unwrap()
        ));
    }

    #[test]
    fn tally_counts_by_minute_campaign_stage_reason() {
        let t = Tally::default();
        assert_eq!(
            t.count(&ev(Some("a"), 60_000, Reason::NullMx), || false),
            Some(0)
        );
        assert_eq!(
            t.count(&ev(Some("a"), 119_999, Reason::NullMx), || false),
            Some(1)
        );
        assert_eq!(
            t.count(&ev(Some("a"), 120_000, Reason::NullMx), || false),
            Some(2)
        );
        assert_eq!(
            t.count(&ev(None, 60_000, Reason::NullMx), || false),
            Some(0)
        );
        assert_eq!(
            t.count(&ev(None, 60_000, Reason::NullMx), || true),
            None,
            "closed"
        );
        assert_eq!(t.pending_keys(), 3);
        let mut got = t.take();
        got.sort_by(|x, y| (&x.0.campaign, x.0.minute).cmp(&(&y.0.campaign, y.0.minute)));
        let flat: Vec<_> = got
            .iter()
            .map(|(k, n)| (k.campaign.as_deref(), k.minute, *n))
            .collect();
        assert_eq!(flat, [(None, 1, 1), (Some("a"), 1, 2), (Some("a"), 2, 1)]);
        assert_eq!(t.pending_keys(), 0);
        // The sampling phase survives a take.
        assert_eq!(
            t.count(&ev(Some("a"), 60_000, Reason::NullMx), || false),
            Some(3)
        );
    }

    #[test]
    fn merge_back_adds_to_counts_made_since_the_take() {
        let t = Tally::default();
        for _ in 0..3 {
            t.count(&ev(Some("a"), 0, Reason::NoSuchDomain), || false);
        }
        let taken = t.take();
        t.count(&ev(Some("a"), 0, Reason::NoSuchDomain), || false);
        t.merge(taken);
        let again = t.take();
        assert_eq!(again.len(), 1);
        assert_eq!(
            again[0].1, 4,
            "3 merged back + 1 new, nothing lost or doubled"
        );
    }
}

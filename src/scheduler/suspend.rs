//! Suspended destinations (Postfix's dead destination, KumoMTA's suspended ready queue):
//! a destination none of whose hosts takes a connection is not tried again before its
//! probe time. Then one job goes alone as the probe: through, and the destination
//! resumes; refused, and it waits the next period of the backoff schedule. While it is
//! suspended a destination costs nothing per arriving message: its domains' new
//! recipients are stored due at the probe (`queue::delays`), and jobs already claimed
//! are deferred to the probe without a connection.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::admin_api::SuspendedDestination;
use crate::deliver::{Destination, Job};
use crate::queue::delays::DomainDelays;

/// Most domains remembered per suspended destination (a smarthost routes any number):
/// beyond them, arrivals are claimed and deferred per pass instead of waiting unclaimed.
const MAX_DOMAINS: usize = 10_000;

/// Lifetime counters, for `/metrics`.
#[derive(Default)]
pub struct SuspendStats {
    /// Destinations suspended after being up.
    pub suspended: AtomicU64,
    /// Probe attempts at suspended destinations.
    pub probes: AtomicU64,
    /// Suspended destinations that answered again.
    pub resumed: AtomicU64,
    /// Recipients deferred to a probe time without a connection.
    pub deferred: AtomicU64,
}

struct State {
    since_ms: i64,
    until_ms: i64,
    failures: u32,
    reply: String,
    domains: HashSet<String>,
}

/// What a lane does with its next job.
#[derive(Debug, PartialEq, Eq)]
pub enum Gate {
    /// Deliver as usual.
    Open,
    /// The destination is suspended and its probe is due: deliver this job alone.
    Probe,
    /// Suspended: defer the job to `until_ms` without a connection.
    Suspended { until_ms: i64, reply: String },
}

/// What an attempt's reachability changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Recorded {
    /// Up and still up.
    Up,
    /// Suspended until then (newly, or still after a failed probe).
    Suspended { until_ms: i64 },
    /// Was suspended, answered: these domains' deferred recipients can go now.
    Resumed { domains: Vec<String> },
}

pub struct Suspensions {
    states: Mutex<HashMap<Destination, State>>,
    delays: Arc<DomainDelays>,
    pub stats: SuspendStats,
}

impl Suspensions {
    pub fn new(delays: Arc<DomainDelays>) -> Suspensions {
        Suspensions {
            states: Mutex::default(),
            delays,
            stats: SuspendStats::default(),
        }
    }

    /// Asked by a lane before each job: one lock and one lookup in a map that is
    /// empty while every destination answers.
    pub fn gate(&self, dest: &Destination, now_ms: i64, schedule: &[Duration]) -> Gate {
        let mut states = self.states.lock();
        let Some(s) = states.get_mut(dest) else {
            return Gate::Open;
        };
        if now_ms < s.until_ms {
            return Gate::Suspended {
                until_ms: s.until_ms,
                reply: s.reply.clone(),
            };
        }
        // Counted as failed until it answers, so that whatever else the lane holds
        // waits for the next period instead of following the probe.
        s.failures += 1;
        s.until_ms = now_ms + wait(schedule, s.failures);
        self.stats.probes.fetch_add(1, Ordering::Relaxed);
        Gate::Probe
    }

    /// Records whether `job`'s destination took a connection.
    pub fn record(
        &self,
        job: &Job,
        reached: bool,
        reply: &str,
        now_ms: i64,
        schedule: &[Duration],
    ) -> Recorded {
        let dest = &job.destination;
        let mut states = self.states.lock();
        if reached {
            let Some(s) = states.remove(dest) else {
                return Recorded::Up;
            };
            drop(states);
            self.stats.resumed.fetch_add(1, Ordering::Relaxed);
            self.delays.clear(s.domains.iter().map(String::as_str));
            tracing::info!(destination = %dest.key, failures = s.failures, "destination answers again: resumed");
            return Recorded::Resumed {
                domains: s.domains.into_iter().collect(),
            };
        }
        let s = states.entry(dest.clone()).or_insert_with(|| {
            self.stats.suspended.fetch_add(1, Ordering::Relaxed);
            let until_ms = now_ms + wait(schedule, 1);
            tracing::warn!(destination = %dest.key, %reply, probe_in_ms = until_ms - now_ms, "destination unreachable: suspended until its probe");
            State {
                since_ms: now_ms,
                until_ms,
                failures: 1,
                reply: String::new(),
                domains: HashSet::new(),
            }
        });
        reply.clone_into(&mut s.reply);
        self.hold_domains(s, job);
        // The period may have moved (a probe): every known domain's arrivals wait for it.
        for d in &s.domains {
            self.delays.set(d, s.until_ms);
        }
        Recorded::Suspended {
            until_ms: s.until_ms,
        }
    }

    /// Defers `job` (claimed before its destination's suspension, or one of a new
    /// domain): later arrivals of its domains wait unclaimed.
    pub fn deferred(&self, job: &Job) {
        self.stats
            .deferred
            .fetch_add(job.recipients.len() as u64, Ordering::Relaxed);
        if let Some(s) = self.states.lock().get_mut(&job.destination) {
            self.hold_domains(s, job);
        }
    }

    /// Remembers `job`'s domains as the destination's; a new one's arrivals wait too.
    fn hold_domains(&self, s: &mut State, job: &Job) {
        for r in &job.recipients {
            if s.domains.len() < MAX_DOMAINS && !s.domains.contains(&r.domain) {
                s.domains.insert(r.domain.clone());
                self.delays.set(&r.domain, s.until_ms);
            }
        }
    }

    /// The suspended destinations, by name.
    pub fn snapshot(&self) -> Vec<SuspendedDestination> {
        let mut v: Vec<SuspendedDestination> = self
            .states
            .lock()
            .iter()
            .map(|(d, s)| SuspendedDestination {
                destination: d.key.clone(),
                since_ms: s.since_ms,
                probe_at_ms: s.until_ms,
                failures: s.failures,
                last_reply: s.reply.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.destination.cmp(&b.destination));
        v
    }

    /// How many destinations are suspended now.
    pub fn count(&self) -> usize {
        self.states.lock().len()
    }
}

/// The wait after `failures` failures in a row: the delivery backoff schedule's entry
/// (with its jitter), the last repeating.
fn wait(schedule: &[Duration], failures: u32) -> i64 {
    super::backoff(schedule, failures, rand::random::<f64>()).as_millis() as i64
}

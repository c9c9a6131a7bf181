//! The end-to-end canary: a probe message per configured address, every `[canary]
//! interval`, submitted through the same intake as real mail, queued, claimed by the
//! scheduler and handed to the route's courier; its latency and result feed `/metrics`,
//! `/readyz` and the admin API. A probe is excluded from campaign statistics (its
//! reserved campaign, [`CAMPAIGN`]), has the null sender (it never bounces), is at most
//! one in flight per address, and one not delivered in time is cancelled: never retried.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::admin_api::{ProbeReport, ProbeStage};
use crate::guard::Guard;
use crate::intake::Intake;
use crate::queue::{NewMessage, NewRecipient, QueueId, Source, Target};

pub use crate::campaign::CANARY as CAMPAIGN;

/// Latency histogram bounds, in milliseconds (exported in seconds).
pub const BUCKETS_MS: [u64; 10] = [50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000];

/// Addresses whose counters are kept: every configured one, and ad-hoc ones (`ctl probe
/// --address`) only while fewer than this are kept, so `/metrics` stays bounded.
const MAX_ADDRESSES: usize = 64;

/// How often a probe's message is looked at while it travels: a point read by queue id.
const POLL: Duration = Duration::from_millis(25);

/// The stages a probe passes, in order, each histogrammed by the time it took from the
/// one before (`committed` from submission): where a slow probe lost its time.
pub const STAGES: [&str; 5] = ["committed", "claimed", "handed", "delivered", "failed"];

/// When the scheduler claimed a probe's recipient and when a courier started its
/// attempt: written by the scheduler (its hook for canary messages), read by the probe
/// that registered the queue id. Only registered ids are kept (at most one per probe in
/// flight), so the scheduler's calls for anything else cost a lock and a miss.
#[derive(Default)]
pub struct Stamps {
    by_queue_id: Mutex<HashMap<String, Stamp>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stamp {
    pub claimed_ms: Option<i64>,
    pub handed_ms: Option<i64>,
}

impl Stamps {
    fn register(&self, queue_id: &str) {
        self.by_queue_id
            .lock()
            .insert(queue_id.to_owned(), Stamp::default());
    }

    fn take(&self, queue_id: &str) -> Stamp {
        self.by_queue_id.lock().remove(queue_id).unwrap_or_default()
    }

    fn get(&self, queue_id: &str) -> Stamp {
        self.by_queue_id
            .lock()
            .get(queue_id)
            .copied()
            .unwrap_or_default()
    }

    /// The scheduler claimed the probe's recipient at `now_ms` (the first claim counts:
    /// a probe is never retried, but a lease can expire and be claimed again).
    pub fn claimed(&self, queue_id: &str, now_ms: i64) {
        if let Some(s) = self.by_queue_id.lock().get_mut(queue_id) {
            s.claimed_ms.get_or_insert(now_ms);
        }
    }

    /// A courier started the probe's attempt at `now_ms`.
    pub fn handed(&self, queue_id: &str, now_ms: i64) {
        if let Some(s) = self.by_queue_id.lock().get_mut(queue_id) {
            s.handed_ms.get_or_insert(now_ms);
        }
    }
}

/// What `/metrics` reads for one address.
#[derive(Debug, Clone, Default)]
pub struct ProbeStats {
    /// Probes delivered, per upper bound of [`BUCKETS_MS`] (not cumulative), and beyond.
    pub buckets: [u64; BUCKETS_MS.len() + 1],
    pub latency_sum_ms: u64,
    pub delivered: u64,
    pub slow: u64,
    /// Failed, timed out or refused.
    pub failed: u64,
    pub last: Option<ProbeReport>,
}

/// Every probe's time in one stage (see [`STAGES`]), for the per-stage histogram.
#[derive(Debug, Clone, Default)]
pub struct StageStats {
    /// Per upper bound of [`BUCKETS_MS`] (not cumulative), and beyond.
    pub buckets: [u64; BUCKETS_MS.len() + 1],
    pub sum_ms: u64,
}

impl StageStats {
    fn record(&mut self, ms: i64) {
        let ms = ms.max(0) as u64;
        self.buckets[BUCKETS_MS.partition_point(|&b| b < ms)] += 1;
        self.sum_ms += ms;
    }
}

impl ProbeStats {
    fn record(&mut self, report: &ProbeReport) {
        if report.result == "busy" {
            return;
        }
        match report.stages.last() {
            Some(s) if report.result == "delivered" => {
                let ms = s.after_ms.max(0) as u64;
                let i = BUCKETS_MS.partition_point(|&b| b < ms);
                self.buckets[i] += 1;
                self.latency_sum_ms += ms;
                self.delivered += 1;
                self.slow += u64::from(report.slow);
            }
            _ => self.failed += 1,
        }
        self.last = Some(report.clone());
    }
}

pub struct Canary {
    intake: Arc<Intake>,
    /// Raises the alert of a failing or slow probe.
    guard: Arc<Guard>,
    stats: Mutex<HashMap<String, ProbeStats>>,
    /// Per stage of [`STAGES`], over every probe: bounded by the stage names.
    stages: Mutex<[StageStats; STAGES.len()]>,
    in_flight: Mutex<HashSet<String>>,
    /// Filled in by the scheduler for the probes in flight.
    stamps: Arc<Stamps>,
}

impl Canary {
    pub fn new(intake: Arc<Intake>, guard: Arc<Guard>) -> Canary {
        Canary {
            intake,
            guard,
            stats: Mutex::default(),
            stages: Mutex::default(),
            in_flight: Mutex::default(),
            stamps: Arc::default(),
        }
    }

    /// What the scheduler stamps a probe's claim and hand-over into.
    pub fn stamps(&self) -> Arc<Stamps> {
        self.stamps.clone()
    }

    /// The per-stage histograms, in the order of [`STAGES`].
    pub fn stage_stats(&self) -> Vec<(&'static str, StageStats)> {
        let stages = self.stages.lock();
        STAGES.iter().copied().zip(stages.iter().cloned()).collect()
    }

    /// Every address's counters, sorted by address.
    pub fn stats(&self) -> Vec<(String, ProbeStats)> {
        let mut all: Vec<_> = self
            .stats
            .lock()
            .iter()
            .map(|(a, s)| (a.clone(), s.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Why the daemon is degraded, if the last probe of a configured address failed or
    /// was slow (for `/readyz`). Addresses no longer configured do not count.
    pub fn degraded(&self) -> Option<String> {
        let config = self.intake.config.load();
        if !config.canary.enabled {
            return None;
        }
        let stats = self.stats.lock();
        let bad: Vec<String> = config
            .canary
            .probes
            .iter()
            .filter_map(|a| {
                let last = stats.get(a)?.last.as_ref()?;
                (!last.healthy()).then(|| match last.slow {
                    true => format!("{a}: slow"),
                    false => format!("{a}: {}", last.result),
                })
            })
            .collect();
        (!bad.is_empty()).then(|| format!("canary degraded: {}", bad.join(", ")))
    }

    /// Probes every configured address each interval until `shutdown`; each address
    /// waits for its previous probe, so a slow route never has two in flight.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut running = tokio::task::JoinSet::new();
        loop {
            let config = self.intake.config.load_full();
            if config.canary.enabled {
                for address in &config.canary.probes {
                    let (me, address) = (self.clone(), address.clone());
                    running.spawn(async move { me.probe(&address).await });
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(config.canary.interval.0) => {}
            }
            // Finished probes are reaped; a probe still running makes the next one for
            // its address report `busy` and count nothing.
            while running.try_join_next().is_some() {}
        }
        running.abort_all();
    }

    /// One probe to `address` now: queued through intake, followed until delivered,
    /// failed or `[canary] timeout` (then cancelled). Records and returns the report.
    pub async fn probe(&self, address: &str) -> ProbeReport {
        let started_at_ms = self.intake.clock.now_ms();
        if !self.in_flight.lock().insert(address.to_owned()) {
            return report(address, "", "busy", started_at_ms, Vec::new());
        }
        let out = self.travel(address, started_at_ms).await;
        self.in_flight.lock().remove(address);
        let configured = self
            .intake
            .config
            .load()
            .canary
            .probes
            .iter()
            .any(|p| p == address);
        let mut stats = self.stats.lock();
        if configured || stats.contains_key(address) || stats.len() < MAX_ADDRESSES {
            stats.entry(address.to_owned()).or_default().record(&out);
        }
        drop(stats);
        self.record_stages(&out);
        if out.healthy() {
            tracing::info!(address, queue_id = %out.queue_id, "canary probe delivered");
        } else {
            let what = match out.slow {
                true => "slow",
                false => out.result.as_str(),
            };
            self.guard.canary_alert(
                self.intake.clock.now_ms(),
                format!(
                    "canary probe to {address}: {what} (queue id {})",
                    out.queue_id
                ),
            );
        }
        out
    }

    /// Each stage's time since the one before it into its histogram.
    fn record_stages(&self, out: &ProbeReport) {
        let mut stages = self.stages.lock();
        let mut before = 0;
        for s in &out.stages {
            if let Some(i) = STAGES.iter().position(|&n| n == s.stage) {
                stages[i].record(s.after_ms - before);
            }
            before = s.after_ms;
        }
    }

    async fn travel(&self, address: &str, started: i64) -> ProbeReport {
        let id = QueueId::generate(self.intake.clock.now_us());
        self.stamps.register(id.as_str());
        let mut out = self.follow(address, id, started).await;
        out.route = crate::address::parse(address).ok().and_then(|a| {
            let config = self.intake.config.load();
            let (_, route) = crate::config::route::find(&config.routes, &a.domain)?;
            route.name.clone()
        });
        let stamp = self.stamps.take(&out.queue_id);
        // A stamp the last poll did not see yet still goes in, before the result.
        let result = out.stages.pop_if(|s| s.stage != "committed");
        push_stamps(&mut out.stages, stamp, started);
        out.stages.extend(result);
        out
    }

    async fn follow(&self, address: &str, id: QueueId, started: i64) -> ProbeReport {
        let config = self.intake.config.load_full();
        let Ok(rcpt) = crate::address::parse(address) else {
            return report(address, "", "refused", started, Vec::new());
        };
        let queue_id = id.as_str().to_owned();
        let msg = NewMessage {
            queue_id: id,
            // The null sender: a probe that fails is never bounced to anyone.
            sender: String::new(),
            campaign: Some(CAMPAIGN.to_owned()),
            source: Source::Canary,
            client: "canary".into(),
            identity: None,
            body: body(&config.server.hostname, address, &queue_id, started),
            recipients: vec![NewRecipient {
                address: rcpt.address,
                domain: rcpt.domain,
            }],
            smtputf8: false,
        };
        if self.intake.enqueue(msg).await.is_err() {
            return report(address, &queue_id, "refused", started, Vec::new());
        }
        let mut stages = vec![stage("committed", self.intake.clock.now_ms() - started)];
        let deadline = tokio::time::Instant::now() + config.canary.timeout.0;
        let mut reply = None;
        loop {
            if let Ok(Some(trace)) = self.intake.queue.trace(&queue_id).await
                && let Some(r) = trace.recipients.first()
            {
                reply = r.last_reply.as_ref().map(reply_line).or(reply);
                push_stamps(&mut stages, self.stamps.get(&queue_id), started);
                let done = match r.state.as_str() {
                    "delivered" => Some(("delivered", r.delivered_at_ms)),
                    "failed" => Some(("failed", r.failed_at_ms)),
                    _ => None,
                };
                if let Some((result, at)) = done {
                    let at = at.unwrap_or_else(|| self.intake.clock.now_ms());
                    stages.push(stage(result, at - started));
                    let mut out = report(address, &queue_id, result, started, stages);
                    out.slow = result == "delivered"
                        && (at - started) as u128 > config.canary.slow.0.as_millis();
                    out.reply = reply;
                    return out;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        // Never retried into a flood: the probe's recipient fails as `cancelled` now.
        if let Err(e) = self
            .intake
            .queue
            .cancel_batch(Target::Message(queue_id.clone()))
            .await
        {
            tracing::warn!(error = %e, queue_id, "canary probe not cancelled");
        }
        stages.push(stage("timeout", self.intake.clock.now_ms() - started));
        let mut out = report(address, &queue_id, "timeout", started, stages);
        out.reply = reply;
        out
    }
}

/// The stored reply as the receiver gave it: code, enhanced code, text.
fn reply_line(r: &crate::admin_api::LastReply) -> String {
    [
        r.code.map(|c| c.to_string()),
        r.enhanced.clone(),
        Some(r.text.clone()),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(" ")
}

/// The scheduler's stamps not yet among `stages`, as stages after submission.
fn push_stamps(stages: &mut Vec<ProbeStage>, stamp: Stamp, started: i64) {
    for (name, at) in [("claimed", stamp.claimed_ms), ("handed", stamp.handed_ms)] {
        if let Some(at) = at
            && !stages.iter().any(|s| s.stage == name)
        {
            stages.push(stage(name, at - started));
        }
    }
}

fn stage(name: &str, after_ms: i64) -> ProbeStage {
    ProbeStage {
        stage: name.to_owned(),
        after_ms,
    }
}

fn report(
    address: &str,
    queue_id: &str,
    result: &str,
    started_at_ms: i64,
    stages: Vec<ProbeStage>,
) -> ProbeReport {
    ProbeReport {
        address: address.to_owned(),
        route: None,
        queue_id: queue_id.to_owned(),
        result: result.to_owned(),
        slow: false,
        started_at_ms,
        stages,
        reply: None,
    }
}

/// The probe's message: small, plain, and recognisable by a receiver's filter.
fn body(hostname: &str, to: &str, queue_id: &str, now_ms: i64) -> Vec<u8> {
    let date = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(now_ms)
        .unwrap_or_default()
        .to_rfc2822();
    format!(
        "From: Floodgate canary <canary@{hostname}>\r\nTo: <{to}>\r\nSubject: Floodgate canary {queue_id}\r\nDate: {date}\r\nMessage-ID: <{queue_id}.canary@{hostname}>\r\nX-Floodgate-Canary: {queue_id}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nEnd-to-end probe from Floodgate; it needs no answer.\r\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivered_after(ms: i64, slow: bool) -> ProbeReport {
        let mut r = report(
            "p@x.test",
            "q",
            "delivered",
            0,
            vec![stage("delivered", ms)],
        );
        r.slow = slow;
        r
    }

    #[test]
    fn stats_bucket_deliveries_and_count_failures() {
        let mut s = ProbeStats::default();
        s.record(&delivered_after(40, false));
        s.record(&delivered_after(50, false));
        s.record(&delivered_after(120_000, true));
        s.record(&report("p@x.test", "q", "timeout", 0, Vec::new()));
        s.record(&report("p@x.test", "", "busy", 0, Vec::new()));
        assert_eq!(s.buckets[0], 2, "at or below 50 ms");
        assert_eq!(s.buckets[BUCKETS_MS.len()], 1, "beyond the last bound");
        assert_eq!((s.delivered, s.slow, s.failed), (3, 1, 1));
        assert_eq!(s.latency_sum_ms, 120_090);
        assert_eq!(s.last.unwrap().result, "timeout", "busy is not a result");
    }
}

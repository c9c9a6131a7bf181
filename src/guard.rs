//! The guard: per-campaign sliding windows of accepted and failed recipients. A campaign
//! whose failure ratio crosses the rule is alerted on and, with `action = "pause"`,
//! paused — the step the incident's operators took by hand after two hours. It also
//! alerts when the failure log is written too fast or drops events. Sending the alerts
//! to the alert webhook is [`alerts`]' job.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::campaign::{Campaign, Campaigns, Tally};
use crate::cluster::{Cluster, Counts, Setting};
use crate::config::{Config, GuardAction, GuardConfig};
use crate::faillog::FailLog;
use crate::queue::{CampaignState, Queue};
use crate::supervise::Supervisor;

/// Alerts kept in memory for the API and dashboard.
const RECENT_ALERTS: usize = 100;
/// The same system-wide alert (write rate, drops) is raised at most this often.
const SYSTEM_ALERT_EVERY_MS: i64 = 60_000;

mod alerts;

#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    pub at_ms: i64,
    pub kind: &'static str,
    pub campaign: Option<String>,
    pub message: String,
    pub action: Option<&'static str>,
}

pub use crate::campaign::counts_against;

/// Cumulative counts of one campaign at one tick.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    at: i64,
    /// Recipients presented at the door, and those of them that failed anywhere.
    presented: u64,
    failed: u64,
    /// Recipients whose delivery ended (delivered or failed), and those that failed.
    attempted: u64,
    relay_failed: u64,
}

#[derive(Default)]
struct Window {
    samples: VecDeque<Sample>,
    tripped: bool,
    paused: bool,
}

impl Sample {
    /// `c`'s cumulative counts now, plus `others` (the other nodes' in cluster mode).
    fn of(c: &Campaign, others: Counts, now_ms: i64) -> Sample {
        let mut counts = Counts::of(c);
        counts.add(others);
        Sample {
            at: now_ms,
            presented: counts.presented,
            failed: counts.failed,
            attempted: counts.attempted,
            relay_failed: counts.relay_failed,
        }
    }
}

impl Window {
    /// What a campaign did before the guard first saw it happened within the window:
    /// start from zero.
    fn starting(now_ms: i64) -> Window {
        let mut w = Window::default();
        w.samples.push_back(Sample {
            at: now_ms,
            ..Sample::default()
        });
        w
    }

    /// Adds `sample`, drops what fell out of the window, and returns the window's
    /// counts in the view that `rule` judges.
    fn observe(&mut self, sample: Sample, window_ms: i64, rule: &GuardConfig) -> Option<Tally> {
        let now_ms = sample.at;
        self.samples.push_back(sample);
        // Keep one sample at or before the window's start as the baseline.
        while self.samples.len() > 2 && self.samples[1].at <= now_ms - window_ms {
            self.samples.pop_front();
        }
        let (first, last) = (self.samples.front()?, self.samples.back()?);
        // Two views of one campaign: everything it presented, and what its deliveries
        // did. The second trips a campaign whose recipients pass the door but bounce at
        // the destination within a delivery batch, instead of waiting for the failures
        // to catch up with intake-speed acceptances.
        let door = Tally {
            failed: last.failed,
            presented: last.presented,
        }
        .since(Tally {
            failed: first.failed,
            presented: first.presented,
        });
        let relay = Tally {
            failed: last.relay_failed,
            presented: last.attempted,
        }
        .since(Tally {
            failed: first.relay_failed,
            presented: first.attempted,
        });
        let qualifies =
            |t: Tally| t.presented >= rule.min_events && t.ratio() >= rule.failure_ratio;
        Some(if !qualifies(door) && qualifies(relay) {
            relay
        } else {
            door
        })
    }
}

#[derive(Debug, Default, Serialize)]
pub struct GuardStats {
    pub trips: AtomicU64,
    pub pauses: AtomicU64,
    pub alerts: AtomicU64,
    /// Alerts the webhook delivered, and those it skipped (over its rate) or failed.
    pub webhook_sent: AtomicU64,
    pub webhook_skipped: AtomicU64,
    pub webhook_failed: AtomicU64,
}

/// Alerts waiting for the alert webhook; beyond it they are skipped (and counted).
const ALERT_BACKLOG: usize = 100;

pub struct Guard {
    campaigns: Arc<Campaigns>,
    config: Arc<ArcSwap<Config>>,
    queue: Queue,
    faillog: FailLog,
    windows: Mutex<HashMap<Arc<str>, Window>>,
    recent: Mutex<VecDeque<Alert>>,
    last_system_alert: Mutex<HashMap<&'static str, i64>>,
    last_dropped: AtomicU64,
    hook: tokio::sync::mpsc::Sender<Alert>,
    hook_rx: Mutex<Option<tokio::sync::mpsc::Receiver<Alert>>>,
    pub stats: GuardStats,
    /// In cluster mode: the other nodes' counts are added to this node's, and a pause
    /// is published to every node.
    cluster: Option<Arc<Cluster>>,
}

impl Guard {
    pub fn new(
        campaigns: Arc<Campaigns>,
        config: Arc<ArcSwap<Config>>,
        queue: Queue,
        faillog: FailLog,
    ) -> Guard {
        let (tx, rx) = tokio::sync::mpsc::channel(ALERT_BACKLOG);
        Guard {
            campaigns,
            config,
            queue,
            faillog,
            windows: Mutex::default(),
            recent: Mutex::default(),
            last_system_alert: Mutex::default(),
            last_dropped: AtomicU64::new(0),
            hook: tx,
            hook_rx: Mutex::new(Some(rx)),
            stats: GuardStats::default(),
            cluster: None,
        }
    }

    /// Judges on the cluster's sums and publishes its pauses.
    pub fn with_cluster(mut self, cluster: Option<Arc<Cluster>>) -> Guard {
        self.cluster = cluster;
        self
    }

    /// Alerts that Redis is unreachable (at most once a minute, as every system alert).
    pub fn cluster_alert(&self, now_ms: i64, message: String) {
        self.system_alert(now_ms, "cluster_disconnected", message);
    }

    /// Ticks once a second until shutdown; the alert sender runs beside it, supervised.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken, supervisor: Supervisor) {
        if let Some(rx) = self.hook_rx.lock().take() {
            let sender = alerts::send(self.clone(), rx, shutdown.clone());
            supervisor.spawn("alert sender", sender);
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = self.queue.clock().now_ms();
            for (campaign, paused) in self.tick(now) {
                if paused {
                    // Its queued recipients leave the due index, so that what the flood
                    // already queued costs the scheduler nothing while it waits.
                    self.queue.hold_in_background(campaign.clone());
                    if let Some(cluster) = &self.cluster {
                        let setting = Setting::Campaign {
                            name: campaign.clone(),
                            paused: true,
                            blocked_until: 0,
                        };
                        cluster.publish(setting, now);
                    }
                    let state = CampaignState {
                        name: campaign,
                        paused: true,
                        blocked_until: 0,
                    };
                    if let Err(e) = self.queue.save_campaign(state).await {
                        tracing::error!(error = %e, "cannot persist the guard's pause");
                    }
                }
            }
        }
    }

    /// One evaluation. Returns the campaigns it acted on (name, paused). No I/O.
    pub fn tick(&self, now_ms: i64) -> Vec<(String, bool)> {
        let config = self.config.load();
        let rule = &config.guard;
        let mut acted = Vec::new();
        if rule.enabled {
            let window_ms = rule.window.0.as_millis() as i64;
            let mut windows = self.windows.lock();
            for c in self.campaigns.all() {
                let w = windows
                    .entry(c.name.clone())
                    .or_insert_with(|| Window::starting(now_ms));
                let paused = c.is_paused();
                if w.paused && !paused {
                    // Resumed by an operator: judge it afresh, not on the failures that
                    // made it pause.
                    w.samples.clear();
                    w.tripped = false;
                }
                w.paused = paused;
                let others = self
                    .cluster
                    .as_ref()
                    .map(|cl| cl.remote_counts(&c.name))
                    .unwrap_or_default();
                let Some(window) = w.observe(Sample::of(&c, others, now_ms), window_ms, rule)
                else {
                    continue;
                };
                let ratio = window.ratio();
                if window.presented >= rule.min_events && ratio >= rule.failure_ratio {
                    if w.tripped || paused {
                        continue;
                    }
                    acted.push(self.trip(&c, w, window, rule, now_ms));
                } else if ratio < rule.failure_ratio {
                    w.tripped = false;
                }
            }
        }
        self.check_faillog(now_ms, rule.faillog_rows_per_sec_alert);
        acted
    }

    /// Trips `c` (its `window` crossed the rule): counts, pauses if the rule says so,
    /// alerts. Returns (name, paused).
    fn trip(
        &self,
        c: &Campaign,
        w: &mut Window,
        window: Tally,
        rule: &GuardConfig,
        now_ms: i64,
    ) -> (String, bool) {
        let (total, df) = (window.presented, window.failed);
        let da = total.saturating_sub(df);
        let ratio = window.ratio();
        w.tripped = true;
        self.stats.trips.fetch_add(1, Ordering::Relaxed);
        let pause = rule.action == GuardAction::Pause;
        if pause {
            c.set_paused(true);
            w.paused = true;
            self.stats.pauses.fetch_add(1, Ordering::Relaxed);
        }
        let action = if pause { "pause" } else { "alert" };
        tracing::warn!(campaign = %c.name, failed = df, accepted = da, ratio, action, "guard tripped: campaign failure ratio over the limit");
        self.alert(Alert {
            at_ms: now_ms,
            kind: "campaign_failure_ratio",
            campaign: Some(c.name.to_string()),
            message: format!(
                "{df} of {total} recipients failed in the last {} ({:.0}%){}",
                rule.window,
                ratio * 100.0,
                match c.top_class() {
                    Some((class, n)) => format!("; most delivery failures {class} ({n})"),
                    None => String::new(),
                }
            ),
            action: Some(action),
        });
        (c.name.to_string(), pause)
    }

    fn check_faillog(&self, now_ms: i64, limit: u64) {
        let faillog = &self.faillog;
        let rate = faillog.rows_per_sec_recent();
        if rate > limit as f64 {
            self.system_alert(
                now_ms,
                "faillog_write_rate",
                format!("failure log written at {rate:.0} rows/s (limit {limit})"),
            );
        }
        let dropped = faillog.counters().dropped;
        let before = self.last_dropped.swap(dropped, Ordering::Relaxed);
        if dropped > before {
            self.system_alert(
                now_ms,
                "faillog_drops",
                format!(
                    "{} failure events dropped (channel full); aggregates still count them",
                    dropped - before
                ),
            );
        }
    }

    fn system_alert(&self, now_ms: i64, kind: &'static str, message: String) {
        let mut last = self.last_system_alert.lock();
        if last
            .get(kind)
            .is_some_and(|t| now_ms - t < SYSTEM_ALERT_EVERY_MS)
        {
            return;
        }
        last.insert(kind, now_ms);
        tracing::warn!(kind, %message, "guard alert");
        self.alert(Alert {
            at_ms: now_ms,
            kind,
            campaign: None,
            message,
            action: None,
        });
    }

    /// A canary probe failed or was slow (`canary` calls it): an alert like the others,
    /// at most one a minute however many probes fail.
    pub fn canary_alert(&self, now_ms: i64, message: String) {
        self.system_alert(now_ms, "canary", message);
    }

    fn alert(&self, alert: Alert) {
        self.stats.alerts.fetch_add(1, Ordering::Relaxed);
        if self.config.load().guard.alert_webhook.is_some()
            && self.hook.try_send(alert.clone()).is_err()
        {
            self.stats.webhook_skipped.fetch_add(1, Ordering::Relaxed);
        }
        let mut recent = self.recent.lock();
        if recent.len() == RECENT_ALERTS {
            recent.pop_front();
        }
        recent.push_back(alert);
    }

    /// Recent alerts, newest last.
    pub fn alerts(&self) -> Vec<Alert> {
        self.recent.lock().iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::reason::Reason;

    fn guard() -> (Guard, Arc<Campaigns>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[admin]\ntoken = \"0123456789abcdef01234567\"\n[queue]\ndir = \"{}\"\n[guard]\nmin_events = 500\nfailure_ratio = 0.5\n",
            dir.path().display()
        );
        let config = Config::parse(&text, std::path::Path::new("test.toml")).unwrap();
        let (queue, _writer) = Queue::open(&config.queue, Arc::new(SystemClock)).unwrap();
        let campaigns = Arc::new(Campaigns::new(100));
        let (faillog, _faillog_writer) = FailLog::open(
            &dir.path().join("failures.db"),
            &config.faillog,
            Arc::new(SystemClock),
        )
        .unwrap();
        let g = Guard::new(
            campaigns.clone(),
            Arc::new(ArcSwap::from_pointee(config)),
            queue,
            faillog,
        );
        (g, campaigns, dir)
    }

    #[tokio::test]
    async fn door_flood_trips_and_pauses() {
        let (g, campaigns, _dir) = guard();
        for _ in 0..600 {
            campaigns.record_failure(Some("flood"), Reason::MalformedAddress);
        }
        campaigns.record_accepted(Some("good"), 600);
        assert_eq!(g.tick(1_000), vec![("flood".to_string(), true)]);
        assert!(campaigns.get(Some("flood")).is_paused());
        assert!(!campaigns.get(Some("good")).is_paused());
        // Already paused: no second trip.
        assert!(g.tick(2_000).is_empty());
    }

    #[tokio::test]
    async fn destination_bounces_trip_without_waiting_for_intake_volume() {
        let (g, campaigns, _dir) = guard();
        // 10,000 accepted at the door; then 600 of them bounce at the destination.
        campaigns.record_accepted(Some("list"), 10_000);
        assert!(g.tick(1_000).is_empty());
        for _ in 0..600 {
            campaigns.record_failure(Some("list"), Reason::Rejected);
        }
        // At the door: 600 / 10,000. At the destination: 600 / 600.
        assert_eq!(g.tick(2_000), vec![("list".to_string(), true)]);
    }

    #[tokio::test]
    async fn a_mostly_delivering_campaign_is_left_alone() {
        let (g, campaigns, _dir) = guard();
        let c = campaigns.get(Some("ok"));
        campaigns.record_accepted(Some("ok"), 10_000);
        c.delivered.fetch_add(9_000, Ordering::Relaxed);
        for _ in 0..900 {
            campaigns.record_failure(Some("ok"), Reason::Rejected);
        }
        assert!(g.tick(1_000).is_empty());
        assert!(!c.is_paused());
    }
}

//! The node registry: every heartbeat a node writes its beat (rates, queue, totals) and
//! its guard counts, reads the registry, and sums the other live nodes' counts for the
//! guard. Two round trips a heartbeat, however much mail flows.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Applier, Cluster, ClusterError, Counts};
use crate::campaign::is_canary;

/// A node that has not beaten for this long is dropped from the registry for good.
const FORGET_AFTER_MS: i64 = 24 * 3600 * 1000;
/// The queue's live count is a scan: taken every this many heartbeats.
const QUEUE_EVERY: u64 = 10;

/// One node's heartbeat as stored in the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeBeat {
    pub node: String,
    pub at_ms: i64,
    pub started_ms: i64,
    pub accepted_total: u64,
    pub delivered_total: u64,
    /// Since the previous heartbeat.
    pub accepted_per_sec: f64,
    pub delivered_per_sec: f64,
    /// Recipients in this node's spool (scheduled or held), as of its last count.
    pub queued: u64,
}

impl NodeBeat {
    /// Whether the beat is recent enough to count the node as alive.
    pub fn alive(&self, now_ms: i64, ttl: Duration) -> bool {
        now_ms - self.at_ms <= ttl.as_millis() as i64
    }
}

/// What the heartbeat remembers from one beat to the next.
#[derive(Default)]
pub(super) struct Beating {
    beats: u64,
    last: Option<(i64, u64, u64)>,
    queued: u64,
    /// Counts last written per campaign: only changes are written again.
    written: HashMap<String, Counts>,
    started_ms: i64,
}

impl Cluster {
    /// Beats every `[cluster] heartbeat` until shutdown; a beat that fails marks the
    /// node disconnected (and raises an alert), the first one that succeeds after that
    /// publishes what changed meanwhile.
    pub async fn heartbeat(self: Arc<Self>, app: Arc<Applier>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.heartbeat.0);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut beating = Beating {
            started_ms: app.clock.now_ms(),
            ..Beating::default()
        };
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let result = match self.connect().await {
                Ok(()) => self.beat(&app, &mut beating).await,
                Err(e) => Err(e),
            };
            let was = self.connected.load(Ordering::Relaxed);
            match result {
                Ok(()) => {
                    if !was {
                        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                        self.connected.store(true, Ordering::Relaxed);
                        let pushed = self.push_pending().await;
                        tracing::info!(node = %self.node, nodes = self.node_count(), pushed, "cluster connected");
                    }
                }
                Err(e) => {
                    self.connected.store(false, Ordering::Relaxed);
                    // Counts of a cluster that cannot be read must not keep tripping
                    // (or failing to trip) the guard: judge on local counts alone.
                    self.remote.lock().clear();
                    if was {
                        tracing::warn!(error = %e, node = %self.node, divisor = self.divisor(), "cluster disconnected; going on with local state");
                    }
                    (app.alert)(
                        app.clock.now_ms(),
                        format!(
                            "Redis unreachable ({e}); rates divided by {}",
                            self.divisor()
                        ),
                    );
                }
            }
        }
    }

    async fn beat(&self, app: &Applier, b: &mut Beating) -> Result<(), ClusterError> {
        let now = app.clock.now_ms();
        if b.beats.is_multiple_of(QUEUE_EVERY)
            && let Ok(live) = app.queue.live_by_state().await
        {
            b.queued = live.iter().map(|(_, n)| n).sum();
        }
        b.beats += 1;
        let campaigns = app.campaigns.all();
        let accepted: u64 = campaigns
            .iter()
            .map(|c| c.accepted.load(Ordering::Relaxed))
            .sum();
        let delivered: u64 = campaigns
            .iter()
            .map(|c| c.delivered.load(Ordering::Relaxed))
            .sum();
        let per_sec = |then: u64, now_n: u64, secs: f64| now_n.saturating_sub(then) as f64 / secs;
        let (a_rate, d_rate) = match b.last {
            Some((at, a, d)) if now > at => {
                let secs = (now - at) as f64 / 1000.0;
                (per_sec(a, accepted, secs), per_sec(d, delivered, secs))
            }
            _ => (0.0, 0.0),
        };
        b.last = Some((now, accepted, delivered));
        let beat = NodeBeat {
            node: self.node.clone(),
            at_ms: now,
            started_ms: b.started_ms,
            accepted_total: accepted,
            delivered_total: delivered,
            accepted_per_sec: a_rate,
            delivered_per_sec: d_rate,
            queued: b.queued,
        };
        let mut changed: Vec<(String, String)> = Vec::new();
        for c in campaigns.iter().filter(|c| !is_canary(Some(&c.name))) {
            let counts = Counts::of(c);
            if b.written.get(&*c.name) != Some(&counts) {
                b.written.insert(c.name.to_string(), counts);
                changed.push((c.name.to_string(), counts.encode()));
            }
        }
        let (nodes_key, counts_key) = (self.keys.nodes(), self.keys.counts(&self.node));
        let ttl_ms = self.config.node_ttl.0.as_millis() as u64 * 2;
        let node = self.node.clone();
        let beat_json = serde_json::to_string(&beat).expect("a beat serialises");
        let registry: HashMap<String, String> = self
            .call(|mut c| async move {
                let mut pipe = redis::pipe();
                pipe.hset(&nodes_key, &node, beat_json).ignore();
                if !changed.is_empty() {
                    pipe.hset_multiple(&counts_key, &changed).ignore();
                }
                pipe.pexpire(&counts_key, ttl_ms as i64).ignore();
                pipe.hgetall(&nodes_key);
                let (registry,): (HashMap<String, String>,) = pipe.query_async(&mut c).await?;
                Ok(registry)
            })
            .await
            .inspect_err(|_| b.written.clear())?;
        let mut beats: Vec<NodeBeat> = Vec::new();
        let mut forgotten = Vec::new();
        for (name, text) in registry {
            match serde_json::from_str::<NodeBeat>(&text) {
                Ok(beat) if now - beat.at_ms < FORGET_AFTER_MS => beats.push(beat),
                _ => forgotten.push(name),
            }
        }
        beats.sort_by(|a, b| a.node.cmp(&b.node));
        let ttl = self.config.node_ttl.0;
        let others: Vec<String> = beats
            .iter()
            .filter(|n| n.node != self.node && n.alive(now, ttl))
            .map(|n| n.node.clone())
            .collect();
        let live = beats.iter().filter(|n| n.alive(now, ttl)).count().max(1);
        self.last_nodes.store(live as u32, Ordering::Relaxed);
        *self.registry.lock() = beats;
        self.read_counts(others, forgotten).await
    }

    /// Sums the other live nodes' counts per campaign (and drops forgotten nodes).
    async fn read_counts(
        &self,
        others: Vec<String>,
        forgotten: Vec<String>,
    ) -> Result<(), ClusterError> {
        if others.is_empty() && forgotten.is_empty() {
            self.remote.lock().clear();
            return Ok(());
        }
        let keys: Vec<String> = others.iter().map(|n| self.keys.counts(n)).collect();
        let nodes_key = self.keys.nodes();
        let tables: Vec<HashMap<String, String>> = self
            .call(|mut c| async move {
                let mut pipe = redis::pipe();
                if !forgotten.is_empty() {
                    pipe.hdel(&nodes_key, &forgotten).ignore();
                }
                for k in &keys {
                    pipe.hgetall(k);
                }
                pipe.query_async(&mut c).await
            })
            .await?;
        let mut sums: HashMap<String, Counts> = HashMap::new();
        for table in tables {
            for (campaign, text) in table {
                if let Some(counts) = Counts::decode(&text) {
                    sums.entry(campaign).or_default().add(counts);
                }
            }
        }
        *self.remote.lock() = sums;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alive_within_ttl() {
        let b = NodeBeat {
            node: "a".into(),
            at_ms: 1000,
            started_ms: 0,
            accepted_total: 0,
            delivered_total: 0,
            accepted_per_sec: 0.0,
            delivered_per_sec: 0.0,
            queued: 0,
        };
        assert!(b.alive(5000, Duration::from_secs(5)));
        assert!(!b.alive(7000, Duration::from_secs(5)));
    }
}

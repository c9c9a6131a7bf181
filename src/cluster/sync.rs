//! Shared settings in motion: a node's change is stored and published in one atomic
//! script (the newer change of a field wins), every node applies what the channel
//! brings within the second, and a node that starts or reconnects loads the whole hash
//! before it goes on. Changes made while Redis was away wait in `pending` and are pushed
//! at reconnection, where the same rule settles them against what others did meanwhile.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{Change, Cluster, ClusterError, Setting};
use crate::campaign::Campaigns;
use crate::clock::Clock;
use crate::faillog::FailLog;
use crate::queue::{CampaignState, Queue};
use crate::supervise::Supervisor;
use crate::suppression::Suppressions;

/// Stores `ARGV[2]` under field `ARGV[1]` of the state hash and publishes it, unless
/// the stored change is newer (`ARGV[3]` is the change's time). Returns 1 when stored.
pub const PUBLISH_SCRIPT: &str = r"
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local ok, decoded = pcall(cjson.decode, old)
  if ok and type(decoded) == 'table' and tonumber(decoded['at_ms']) and tonumber(decoded['at_ms']) > tonumber(ARGV[3]) then
    return 0
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 1
";

/// Wait between two attempts to subscribe again.
const RESUBSCRIBE: Duration = Duration::from_millis(500);

/// The parts of the daemon that shared state lands in (passed in, so that the cluster
/// sits below intake and the guard, which use it).
pub struct Applier {
    pub campaigns: Arc<Campaigns>,
    pub queue: Queue,
    /// Rung after a resume: the campaign's mail is due again.
    pub wake: Arc<tokio::sync::Notify>,
    pub clock: Arc<dyn Clock>,
    pub faillog: FailLog,
    pub suppressions: Arc<Suppressions>,
    /// Raises the guard's alert that Redis is unreachable (rate-limited there).
    pub alert: Box<dyn Fn(i64, String) + Send + Sync>,
}

impl Cluster {
    /// Connects, loads the shared settings and starts the heartbeat and the subscriber.
    /// Bounded by the connect timeout: with Redis away the node starts on its own state
    /// and catches up when Redis is back.
    pub async fn start(
        self: &Arc<Self>,
        app: Arc<Applier>,
        supervisor: &Supervisor,
        shutdown: CancellationToken,
    ) {
        match self.connect().await {
            Ok(()) => match self.load_state(&app).await {
                Ok(n) => {
                    self.connected.store(true, Ordering::Relaxed);
                    tracing::info!(node = %self.node, settings = n, "cluster state loaded");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cluster state not loaded; starting on local state")
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "Redis unreachable at start; starting on local state")
            }
        }
        supervisor.spawn(
            "cluster heartbeat",
            self.clone().heartbeat(app.clone(), shutdown.clone()),
        );
        let (tx, rx) = tokio::sync::mpsc::channel(super::suppressions::CHANNEL);
        let list = app.suppressions.clone();
        list.share_with(tx);
        supervisor.spawn(
            "cluster suppressions",
            self.clone().share_suppressions(list, rx, shutdown.clone()),
        );
        supervisor.spawn("cluster subscriber", self.clone().subscribe(app, shutdown));
    }

    /// Records a setting made on this node and publishes it in the background; never
    /// waits on Redis. What does not reach Redis is pushed at reconnection.
    pub fn publish(self: &Arc<Self>, setting: Setting, at_ms: i64) {
        let change = Change {
            at_ms,
            node: self.node.clone(),
            setting,
        };
        let field = change.setting.field();
        self.known.lock().insert(field.clone(), at_ms);
        self.pending.lock().insert(field.clone(), change.clone());
        let this = self.clone();
        tokio::spawn(async move {
            if this.store(&change).await.is_ok() {
                let mut pending = this.pending.lock();
                // A newer change of the same field made meanwhile stays pending.
                if pending.get(&field) == Some(&change) {
                    pending.remove(&field);
                }
            }
        });
    }

    async fn store(&self, change: &Change) -> Result<bool, ClusterError> {
        let (state, channel) = (self.keys.state(), self.keys.changes());
        let (field, json, at) = (change.setting.field(), change.encode(), change.at_ms);
        let script = self.publish_script.clone();
        let stored: i64 = self
            .call(|mut c| async move {
                script
                    .key(state)
                    .key(channel)
                    .arg(field)
                    .arg(json)
                    .arg(at)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        Ok(stored == 1)
    }

    /// Pushes the changes Redis has not confirmed; returns how many went through.
    pub(super) async fn push_pending(&self) -> usize {
        let pending: Vec<Change> = self.pending.lock().values().cloned().collect();
        let mut pushed = 0;
        for change in pending {
            if self.store(&change).await.is_ok() {
                pushed += 1;
                let mut p = self.pending.lock();
                if p.get(&change.setting.field()) == Some(&change) {
                    p.remove(&change.setting.field());
                }
            }
        }
        pushed
    }

    /// Applies every stored setting newer than what this node knows.
    async fn load_state(&self, app: &Applier) -> Result<usize, ClusterError> {
        let key = self.keys.state();
        let all: HashMap<String, Vec<u8>> = self
            .call(|mut c| async move { redis::cmd("HGETALL").arg(key).query_async(&mut c).await })
            .await?;
        let mut applied = 0;
        for payload in all.values() {
            applied += usize::from(self.receive(app, payload).await);
        }
        Ok(applied)
    }

    /// Follows the channel until shutdown, subscribing again (and reloading the hash,
    /// for what was missed) whenever the connection drops.
    async fn subscribe(self: Arc<Self>, app: Arc<Applier>, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.follow(&app, &shutdown).await {
                tracing::debug!(error = %e, "cluster channel lost");
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(RESUBSCRIBE) => {}
            }
        }
    }

    async fn follow(
        &self,
        app: &Applier,
        shutdown: &CancellationToken,
    ) -> Result<(), ClusterError> {
        let timeout = self.config.connect_timeout.0;
        let mut pubsub = tokio::time::timeout(timeout, self.client.get_async_pubsub())
            .await
            .map_err(|_| ClusterError::Timeout)??;
        tokio::time::timeout(timeout, pubsub.subscribe(self.keys.changes()))
            .await
            .map_err(|_| ClusterError::Timeout)??;
        self.load_state(app).await?;
        let mut messages = pubsub.on_message();
        loop {
            let msg = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                m = messages.next() => m,
            };
            let Some(msg) = msg else { return Ok(()) };
            self.receive(app, msg.get_payload_bytes()).await;
        }
    }

    /// Decodes and applies one payload; `true` when it changed something here.
    async fn receive(&self, app: &Applier, payload: &[u8]) -> bool {
        match Change::decode(payload) {
            Ok(change) => self.apply(app, change).await,
            Err(e) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "cluster change refused");
                false
            }
        }
    }

    async fn apply(&self, app: &Applier, change: Change) -> bool {
        {
            let mut known = self.known.lock();
            let field = change.setting.field();
            if !change.newer_than(known.get(&field).copied()) {
                return false;
            }
            known.insert(field, change.at_ms);
        }
        self.stats.applied.fetch_add(1, Ordering::Relaxed);
        tracing::info!(from = %change.node, setting = ?change.setting, "cluster setting applied");
        match change.setting {
            Setting::Campaign {
                name,
                paused,
                blocked_until,
            } => {
                let c = app.campaigns.get(Some(&name));
                let was = c.is_paused();
                c.set_paused(paused);
                c.block_until(blocked_until);
                if paused && !was {
                    app.queue.hold_in_background(name.clone());
                } else if !paused && was {
                    app.queue
                        .release_in_background(name.clone(), app.wake.clone());
                }
                let state = CampaignState {
                    name,
                    paused,
                    blocked_until,
                };
                if let Err(e) = app.queue.save_campaign(state).await {
                    tracing::error!(error = %e, "cannot persist a cluster campaign state");
                }
                app.wake.notify_one();
            }
            Setting::Intake { paused } => app.campaigns.set_intake_paused(paused),
            Setting::FailLog { settings } => app.faillog.set_settings(settings),
        }
        true
    }
}

//! Cluster mode: several nodes, each with its own durable spool, share through Redis
//! (or Valkey) the state that only makes sense cluster-wide — destination rates,
//! campaign and intake pauses, the failure log's mode, the guard's counts, idempotency
//! keys — and list each other with heartbeats. Nothing durable depends on Redis: every
//! call is bounded by `command_timeout`, and while Redis is away each node goes on with
//! its local state and publishes what changed meanwhile when it is back.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Script};

use crate::config::{ClusterConfig, Rate};

pub mod counts;
mod idempotency;
mod nodes;
pub mod rate;
pub mod state;
mod suppressions;
mod sync;

pub use counts::Counts;
pub use idempotency::Reservation;
pub use nodes::NodeBeat;
pub use state::{Change, Setting};
pub use sync::Applier;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("not connected to Redis")]
    NotConnected,
    #[error("Redis did not answer within the command timeout")]
    Timeout,
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    pub round_trips: AtomicU64,
    pub errors: AtomicU64,
    pub reconnects: AtomicU64,
    pub leases: AtomicU64,
    pub leased_slots: AtomicU64,
    /// Sends paced locally because Redis was away.
    pub fallback_sends: AtomicU64,
    pub published: AtomicU64,
    pub applied: AtomicU64,
    /// Payloads read from the channel or the hash that were not a change.
    pub refused: AtomicU64,
    pub idempotency_replays: AtomicU64,
    pub idempotency_in_flight: AtomicU64,
    /// Suppression changes appended to the stream, applied from it, and dropped
    /// unshared (held too long while Redis was away).
    pub suppressions_shared: AtomicU64,
    pub suppressions_applied: AtomicU64,
    pub suppressions_unshared: AtomicU64,
}

/// Key and channel names, all under the configured prefix.
struct Keys {
    prefix: String,
}

impl Keys {
    fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }
    fn state(&self) -> String {
        format!("{}:state", self.prefix)
    }
    fn changes(&self) -> String {
        format!("{}:changes", self.prefix)
    }
    fn rate(&self, destination: &str) -> String {
        format!("{}:rate:{destination}", self.prefix)
    }
    fn counts(&self, node: &str) -> String {
        format!("{}:counts:{node}", self.prefix)
    }
    fn idempotency(&self, key: &str) -> String {
        format!("{}:idem:{key}", self.prefix)
    }
}

pub struct Cluster {
    config: ClusterConfig,
    node: String,
    keys: Keys,
    client: redis::Client,
    conn: ArcSwapOption<ConnectionManager>,
    connected: AtomicBool,
    /// Live nodes at the last heartbeat (this one included), at least 1.
    last_nodes: AtomicU32,
    leases: rate::Leases,
    lease_script: Script,
    publish_script: Script,
    /// When each shared setting last changed, as far as this node knows (field → ms).
    known: Mutex<HashMap<String, i64>>,
    /// Changes made here that Redis has not confirmed; published on reconnection.
    pending: Mutex<HashMap<String, Change>>,
    /// The other live nodes' guard counts summed per campaign, as of the last heartbeat.
    remote: Mutex<HashMap<String, Counts>>,
    /// The registry as of the last heartbeat.
    registry: Mutex<Vec<NodeBeat>>,
    pub stats: Stats,
}

impl Cluster {
    /// Parses the URL; no I/O (the connection is made by [`Cluster::connect`]).
    pub fn new(config: &ClusterConfig) -> Result<Arc<Cluster>, ClusterError> {
        let client = redis::Client::open(config.redis.as_str())?;
        Ok(Arc::new(Cluster {
            node: config.node_name(),
            keys: Keys {
                prefix: config.prefix.clone(),
            },
            config: config.clone(),
            client,
            conn: ArcSwapOption::empty(),
            connected: AtomicBool::new(false),
            last_nodes: AtomicU32::new(1),
            leases: rate::Leases::default(),
            lease_script: Script::new(rate::LEASE_SCRIPT),
            publish_script: Script::new(sync::PUBLISH_SCRIPT),
            known: Mutex::default(),
            pending: Mutex::default(),
            remote: Mutex::default(),
            registry: Mutex::default(),
            stats: Stats::default(),
        }))
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether the last heartbeat reached Redis. Cheap: one atomic load.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Live nodes at the last heartbeat.
    pub fn node_count(&self) -> u32 {
        self.last_nodes.load(Ordering::Relaxed).max(1)
    }

    /// What a destination's rate is divided by while Redis is away.
    pub fn divisor(&self) -> u32 {
        match self.config.fallback_divisor {
            0 => self.node_count(),
            n => n,
        }
    }

    /// Makes the connection (once; the manager reconnects by itself afterwards).
    async fn connect(&self) -> Result<(), ClusterError> {
        if self.conn.load().is_some() {
            return Ok(());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.config.connect_timeout.0))
            .set_response_timeout(Some(self.config.command_timeout.0))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let made = tokio::time::timeout(
            self.config.connect_timeout.0,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .map_err(|_| ClusterError::Timeout)??;
        self.conn.store(Some(Arc::new(made)));
        Ok(())
    }

    /// One command (or pipeline, or script) on the shared connection, bounded by the
    /// command timeout and counted as one round trip.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, ClusterError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let Some(conn) = self.conn.load_full() else {
            return Err(ClusterError::NotConnected);
        };
        self.stats.round_trips.fetch_add(1, Ordering::Relaxed);
        let outcome = tokio::time::timeout(self.config.command_timeout.0, f((*conn).clone())).await;
        let result = match outcome {
            Err(_) => Err(ClusterError::Timeout),
            Ok(r) => r.map_err(ClusterError::from),
        };
        if result.is_err() {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Waits for the cluster-wide rate of `destination` to allow one more transaction:
    /// a slot of this node's lease, a new lease (one round trip for up to `[cluster]
    /// lease` of the rate), or, while Redis is away, the local share of the rate.
    pub async fn pace(&self, destination: &str, rate: Rate, waiting: usize) {
        if let Some(slot) = self.leases.next_slot(destination) {
            tokio::time::sleep_until(slot).await;
            return;
        }
        if self.is_connected() {
            let n = rate::lease_size(rate, self.config.lease.0, waiting);
            let interval = rate.interval();
            let key = self.keys.rate(destination);
            let script = self.lease_script.clone();
            let micros = u64::try_from(interval.as_micros()).unwrap_or(u64::MAX);
            let sent = tokio::time::Instant::now();
            let leased = self
                .call(|mut c| async move {
                    script
                        .key(key)
                        .arg(micros)
                        .arg(n)
                        .invoke_async::<i64>(&mut c)
                        .await
                })
                .await;
            match leased {
                Ok(first_us) => {
                    // Redis read its clock about halfway through the round trip.
                    let at = sent + (tokio::time::Instant::now() - sent) / 2;
                    let first = Duration::from_micros(u64::try_from(first_us).unwrap_or(0));
                    self.leases
                        .store(destination, at, rate::slots(first, interval, n));
                    self.stats.leases.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .leased_slots
                        .fetch_add(u64::from(n), Ordering::Relaxed);
                    if let Some(slot) = self.leases.next_slot(destination) {
                        tokio::time::sleep_until(slot).await;
                    }
                    return;
                }
                Err(e) => tracing::debug!(error = %e, destination, "no rate lease; pacing locally"),
            }
        }
        self.stats.fallback_sends.fetch_add(1, Ordering::Relaxed);
        let share = rate::fallback(rate, self.divisor());
        self.leases.fallback(destination, share).until_ready().await;
    }

    /// The other live nodes' counts of `campaign`, summed (zero when alone or apart).
    /// Cheap: one lock and a lookup.
    pub fn remote_counts(&self, campaign: &str) -> Counts {
        self.remote
            .lock()
            .get(campaign)
            .copied()
            .unwrap_or_default()
    }

    /// The registry as of the last heartbeat.
    pub fn registry(&self) -> Vec<NodeBeat> {
        self.registry.lock().clone()
    }

    /// The cluster for `GET /admin/v1/status`: the registry with per-node and total
    /// rates and queues.
    pub fn status(&self, now_ms: i64) -> crate::admin_api::ClusterStatus {
        let ttl = self.config.node_ttl.0;
        let nodes: Vec<crate::admin_api::ClusterNode> = self
            .registry()
            .into_iter()
            .map(|b| crate::admin_api::ClusterNode {
                alive: b.alive(now_ms, ttl),
                node: b.node,
                last_heartbeat_ms: b.at_ms,
                accepted_per_sec: b.accepted_per_sec,
                delivered_per_sec: b.delivered_per_sec,
                queued: b.queued,
                accepted_total: b.accepted_total,
                delivered_total: b.delivered_total,
            })
            .collect();
        let live = || nodes.iter().filter(|n| n.alive);
        crate::admin_api::ClusterStatus {
            node: self.node.clone(),
            connected: self.is_connected(),
            fallback_divisor: self.divisor(),
            accepted_per_sec: live().map(|n| n.accepted_per_sec).sum(),
            delivered_per_sec: live().map(|n| n.delivered_per_sec).sum(),
            queued: live().map(|n| n.queued).sum(),
            nodes,
        }
    }

    /// Leased slots not used yet.
    pub fn unused_slots(&self) -> usize {
        self.leases.unused()
    }
}

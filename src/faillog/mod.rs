//! The failure log: every refused or failed recipient is counted in memory and flushed as
//! aggregate rows; only a governed, optionally sampled share becomes an event row in
//! failures.db, written by its own thread in batches. A flood of bad recipients costs
//! counters, not database writes, and the hot path never waits on this file.
//!
//! Lifecycle: [`FailLog::open`] starts the single writer thread. It exits after a final
//! flush once [`FailLog::close`] is called, or once every `FailLog` clone is dropped;
//! joining the returned handle guarantees that last flush happened. Events recorded after
//! `close` are not counted (`closed_skipped`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::thread::JoinHandle;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::{Serialize, Serializer};

use crate::bounce::BounceClass;
use crate::clock::Clock;
use crate::config::{FailLogConfig, FailLogMode};
use crate::reason::{Reason, Stage};

mod gate;
mod store;
mod writer;

use gate::{Decision, Gate, Tally};

pub use store::MAX_QUERY_ROWS;

/// One failed recipient, as intake or relay saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureEvent {
    /// Milliseconds since the Unix epoch; also picks the aggregate's minute.
    pub at_ms: i64,
    /// None is stored and shown as `-` (see `campaign::UNATTRIBUTED`).
    pub campaign: Option<String>,
    pub stage: Stage,
    pub reason: Reason,
    /// The bounce class of a relay failure; `None` for refusals at the door.
    pub class: Option<BounceClass>,
    pub recipient: String,
    /// The reply given or received, e.g. "550 5.1.2 Recipient domain does not exist".
    pub detail: String,
}

/// The switches that can change at runtime (admin API, SIGHUP), and the counters since
/// start: the admin API's types, served as they are.
pub use crate::admin_api::{FailLogCounters, FailLogSettings};

impl From<&FailLogConfig> for FailLogSettings {
    fn from(c: &FailLogConfig) -> Self {
        FailLogSettings {
            mode: c.mode,
            sample_rate: c.sample_rate,
            rows_per_sec: c.rows_per_sec,
            burst: c.burst,
        }
    }
}

/// Limits on the failures.db file itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FailLogLimits {
    /// Cap on failures.db in MiB (0 = none), so that a flood cannot fill the disk that
    /// queue.db lives on. Past it, flushes fail with "full" and are counted.
    pub max_size_mb: u64,
}

/// The aggregate key: rows per minute are bounded by these, never by volume.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AggKey {
    pub minute: i64,
    pub campaign: Option<String>,
    pub stage: Stage,
    pub reason: Reason,
    pub class: Option<BounceClass>,
}

/// Filter and page for [`FailLog::failures`].
#[derive(Debug, Clone, Default)]
pub struct FailureQuery {
    /// `-` selects unattributed failures.
    pub campaign: Option<String>,
    pub reason: Option<Reason>,
    pub since_ms: Option<i64>,
    /// Rows with an id below this: pass the last id of the previous page.
    pub before_id: Option<i64>,
    /// Capped at [`MAX_QUERY_ROWS`].
    pub limit: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailureRow {
    pub id: i64,
    pub at_ms: i64,
    pub campaign: String,
    #[serde(serialize_with = "stage_name")]
    pub stage: Stage,
    #[serde(serialize_with = "reason_name")]
    pub reason: Reason,
    #[serde(serialize_with = "class_name")]
    pub class: Option<BounceClass>,
    pub recipient: String,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatRow {
    /// Minutes since the Unix epoch.
    pub minute: i64,
    pub campaign: String,
    #[serde(serialize_with = "stage_name")]
    pub stage: Stage,
    #[serde(serialize_with = "reason_name")]
    pub reason: Reason,
    #[serde(serialize_with = "class_name")]
    pub class: Option<BounceClass>,
    pub count: u64,
}

fn stage_name<S: Serializer>(stage: &Stage, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(stage.as_str())
}

fn class_name<S: Serializer>(class: &Option<BounceClass>, s: S) -> Result<S::Ok, S::Error> {
    match class {
        Some(c) => s.serialize_str(c.as_str()),
        None => s.serialize_none(),
    }
}

fn reason_name<S: Serializer>(reason: &Reason, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(reason.as_str())
}

#[derive(Default)]
struct Counters {
    recorded: AtomicU64,
    off_skipped: AtomicU64,
    closed_skipped: AtomicU64,
    queued: AtomicU64,
    rows_written: AtomicU64,
    suppressed: AtomicU64,
    sampled_out: AtomicU64,
    dropped: AtomicU64,
    lost_rows: AtomicU64,
    lost_aggregates: AtomicU64,
    transactions: AtomicU64,
    failed_transactions: AtomicU64,
    pruned_rows: AtomicU64,
    pruned_stats: AtomicU64,
    prune_runs: AtomicU64,
    /// f64 bits, updated by the writer at each flush tick.
    rows_per_sec: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug, thiserror::Error)]
pub enum FailLogError {
    #[error("failures.db: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(
        "failures.db has schema version {found}, this Floodgate knows {known}: refusing to touch it"
    )]
    Schema { found: usize, known: usize },
    #[error("failures.db holds an unknown {what} `{value}`")]
    Corrupt { what: &'static str, value: String },
    #[error("cannot start the failure log writer thread: {0}")]
    Spawn(std::io::Error),
    #[error("failure log read task failed: {0}")]
    Task(String),
}

/// What the writer thread receives.
enum Msg {
    Row(FailureEvent),
    /// Look at the flags (close, prune) now rather than at the next tick.
    Wake,
}

/// State shared by every handle and the writer thread.
struct Shared {
    path: PathBuf,
    clock: Arc<dyn Clock>,
    gate: ArcSwap<Gate>,
    /// Serialises `set_settings` so that two concurrent changes cannot lose one.
    settings_lock: Mutex<()>,
    tally: Tally,
    closed: AtomicBool,
    prune_requested: AtomicBool,
    counters: Counters,
    /// The writer's batch size, flush interval and retention, read at each tick so
    /// that a reload applies them (the channel's capacity is fixed at open).
    config: ArcSwap<FailLogConfig>,
}

impl Shared {
    fn new(path: PathBuf, clock: Arc<dyn Clock>, config: &FailLogConfig) -> Shared {
        let settings = FailLogSettings::from(config);
        Shared {
            config: ArcSwap::from_pointee(config.clone()),
            path,
            clock,
            gate: ArcSwap::from_pointee(Gate::new(settings)),
            settings_lock: Mutex::new(()),
            tally: Tally::default(),
            closed: AtomicBool::new(false),
            prune_requested: AtomicBool::new(false),
            counters: Counters::default(),
        }
    }
}

/// Only handles hold the sender: when the last one drops, the writer sees the channel
/// disconnect and finishes.
struct Inner {
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
}

/// Cheap to clone; every producer holds one.
#[derive(Clone)]
pub struct FailLog {
    inner: Arc<Inner>,
}

impl FailLog {
    /// Opens (creating and migrating) failures.db and starts its writer thread.
    pub fn open(
        path: &Path,
        config: &FailLogConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<(FailLog, JoinHandle<()>), FailLogError> {
        FailLog::open_with_limits(path, config, FailLogLimits::default(), clock)
    }

    pub fn open_with_limits(
        path: &Path,
        config: &FailLogConfig,
        limits: FailLogLimits,
        clock: Arc<dyn Clock>,
    ) -> Result<(FailLog, JoinHandle<()>), FailLogError> {
        let conn = store::open_writer(path, limits.max_size_mb)?;
        let (tx, rx) = mpsc::sync_channel(config.channel_capacity.max(1));
        let settings = FailLogSettings::from(config);
        let shared = Arc::new(Shared::new(path.to_owned(), clock, config));
        let writer = writer::Writer::new(conn, rx, shared.clone());
        let handle = std::thread::Builder::new()
            .name("faillog-writer".into())
            .spawn(move || writer.run())
            .map_err(FailLogError::Spawn)?;
        tracing::info!(
            path = %path.display(),
            mode = settings.mode.as_str(),
            rows_per_sec = settings.rows_per_sec,
            burst = settings.burst,
            "failure log open"
        );
        Ok((
            FailLog {
                inner: Arc::new(Inner { tx, shared }),
            },
            handle,
        ))
    }

    /// Records one failure. Never blocks and never fails: one short shard lock for the
    /// aggregate, a governor check, and a `try_send`. No I/O, no await; allocates only
    /// when a campaign (or its governor cell) is new since the last flush or prune.
    pub fn record(&self, ev: FailureEvent) {
        self.record_as(ev, true);
    }

    /// Counts a failure in the aggregates only, never as an event row, in every mode:
    /// for deferrals, which are frequent, temporary and interesting only in sum.
    pub fn record_aggregate(&self, ev: FailureEvent) {
        self.record_as(ev, false);
    }

    fn record_as(&self, ev: FailureEvent, row_wanted: bool) {
        let shared = &self.inner.shared;
        let c = &shared.counters;
        let gate = shared.gate.load();
        if gate.settings.mode == FailLogMode::Off {
            bump(&c.off_skipped);
            return;
        }
        let Some(seen) = shared
            .tally
            .count(&ev, || shared.closed.load(Ordering::Acquire))
        else {
            bump(&c.closed_skipped);
            return;
        };
        bump(&c.recorded);
        if !row_wanted {
            return;
        }
        match gate.decide(&ev.campaign, seen) {
            Decision::Skip | Decision::CountOnly => {}
            Decision::SampledOut => bump(&c.sampled_out),
            Decision::Suppressed => bump(&c.suppressed),
            // Full or gone (the writer finished): either way the row is dropped and
            // counted; its aggregate is already in.
            Decision::Row => match self.inner.tx.try_send(Msg::Row(ev)) {
                Ok(()) => bump(&c.queued),
                Err(_) => bump(&c.dropped),
            },
        }
    }

    /// Applies new switches to every later `record`. A new rows_per_sec or burst rebuilds
    /// the governor (every campaign starts with a full burst); other changes keep it.
    pub fn set_settings(&self, next: FailLogSettings) {
        let shared = &self.inner.shared;
        let _serial = shared.settings_lock.lock();
        let gate = shared.gate.load().next(next);
        shared.gate.store(Arc::new(gate));
        tracing::info!(
            mode = next.mode.as_str(),
            sample_rate = next.sample_rate,
            rows_per_sec = next.rows_per_sec,
            burst = next.burst,
            "failure log settings changed"
        );
    }

    /// Applies a reloaded `[faillog]`: the switches (as [`FailLog::set_settings`]) when
    /// they changed, and the writer's batch size, flush interval and retention from
    /// its next tick on.
    pub fn set_config(&self, config: &FailLogConfig) {
        let shared = &self.inner.shared;
        if FailLogSettings::from(config) != self.settings() {
            self.set_settings(FailLogSettings::from(config));
        }
        shared.config.store(Arc::new(config.clone()));
        let _ = self.inner.tx.try_send(Msg::Wake);
    }

    pub fn settings(&self) -> FailLogSettings {
        self.inner.shared.gate.load().settings
    }

    /// Asks the writer to flush what it holds and stop. Returns at once; join the handle
    /// from `open` to wait for the final flush.
    pub fn close(&self) {
        self.inner.shared.closed.store(true, Ordering::Release);
        // A full channel means the writer is about to wake anyway.
        let _ = self.inner.tx.try_send(Msg::Wake);
    }

    /// Asks the writer to run a retention pass now instead of at its next ~30 s tick;
    /// `counters().prune_runs` rises when it is done.
    pub fn prune_now(&self) {
        self.inner
            .shared
            .prune_requested
            .store(true, Ordering::Release);
        let _ = self.inner.tx.try_send(Msg::Wake);
    }

    pub fn path(&self) -> &Path {
        &self.inner.shared.path
    }

    pub fn counters(&self) -> FailLogCounters {
        let shared = &self.inner.shared;
        let c = &shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FailLogCounters {
            recorded: get(&c.recorded),
            off_skipped: get(&c.off_skipped),
            closed_skipped: get(&c.closed_skipped),
            queued: get(&c.queued),
            rows_written: get(&c.rows_written),
            suppressed: get(&c.suppressed),
            sampled_out: get(&c.sampled_out),
            dropped: get(&c.dropped),
            lost_rows: get(&c.lost_rows),
            lost_aggregates: get(&c.lost_aggregates),
            transactions: get(&c.transactions),
            failed_transactions: get(&c.failed_transactions),
            pruned_rows: get(&c.pruned_rows),
            pruned_stats: get(&c.pruned_stats),
            prune_runs: get(&c.prune_runs),
            pending_aggregate_keys: shared.tally.pending_keys() as u64,
        }
    }

    /// Event rows written per second over the last ~10 s, for the guard's
    /// "failures.db written too fast" alert.
    pub fn rows_per_sec_recent(&self) -> f64 {
        f64::from_bits(
            self.inner
                .shared
                .counters
                .rows_per_sec
                .load(Ordering::Relaxed),
        )
    }

    /// Event rows, newest first. Runs on a blocking thread with its own read-only
    /// connection, so it never touches the writer.
    pub async fn failures(&self, q: FailureQuery) -> Result<Vec<FailureRow>, FailLogError> {
        let path = self.inner.shared.path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = store::open_reader(&path)?;
            store::query_failures(&conn, &q)
        })
        .await
        .map_err(|e| FailLogError::Task(e.to_string()))?
    }

    /// Aggregate rows from `since_minute` (minutes since the epoch) on.
    pub async fn stats(&self, since_minute: i64) -> Result<Vec<StatRow>, FailLogError> {
        let path = self.inner.shared.path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = store::open_reader(&path)?;
            store::query_stats(&conn, since_minute)
        })
        .await
        .map_err(|e| FailLogError::Task(e.to_string()))?
    }
}

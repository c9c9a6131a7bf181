//! The durable queue in `<[queue] dir>/queue.db`: types, and the API the rest of the
//! daemon uses. SQL lives in `store` (changes), `status` (reads behind metrics) and
//! `retention` (deleting finished rows); the group commit in `writer`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;
use rusqlite::Connection;
use rusqlite::ffi::ErrorCode;

pub mod backup;
pub mod batch;
pub mod delays;
pub mod ops;
pub mod retention;
pub mod schema;
pub mod status;
pub mod store;
pub mod trace;
pub mod writer;

pub use batch::{Append, BatchRecord, BatchRow, ChunkProgress};
pub use ops::{Cancelled, Target};
pub use retention::Pruned;
pub use status::{QueueSummary, Totals};
pub use store::{CampaignState, Claimed, Holding, StoredMessage, StoredRecipient, Update};
pub use writer::{Writer, WriterStats};

use crate::clock::Clock;
use crate::config::QueueConfig;

/// Why the queue could not take or give something. Cloneable because one failed group
/// commit answers every caller in it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    /// SQLITE_FULL: the disk, or the configured size cap, is full.
    #[error("queue is full: {0}")]
    Full(String),
    /// Another process holds the database lock past the busy timeout.
    #[error("queue is busy: {0}")]
    Busy(String),
    #[error("queue write failed: {0}")]
    Write(String),
    #[error("queue schema: {0}")]
    Schema(String),
    #[error("queue is shutting down")]
    Closed,
}

impl From<rusqlite::Error> for QueueError {
    fn from(e: rusqlite::Error) -> QueueError {
        match e.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => QueueError::Full(e.to_string()),
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
                QueueError::Busy(e.to_string())
            }
            _ => QueueError::Write(e.to_string()),
        }
    }
}

/// A queue identifier, given to the client in `250 2.0.0 <id>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QueueId(String);

impl QueueId {
    /// Time-ordered and unique enough for a UNIQUE column: microseconds since the epoch
    /// plus 20 random bits.
    pub fn generate(now_us: i64) -> QueueId {
        let noise: u32 = rand::random::<u32>() & 0xF_FFFF;
        QueueId(format!("{:013X}{noise:05X}", now_us.max(0)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for QueueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a message came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Smtp,
    Http,
    /// A delivery status notification Floodgate wrote itself.
    Bounce,
    /// A TLS report (RFC 8460) Floodgate wrote itself.
    Report,
    /// A canary probe Floodgate sent through its own door.
    Canary,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Smtp => "smtp",
            Source::Http => "http",
            Source::Bounce => "bounce",
            Source::Report => "tls-report",
            Source::Canary => "canary",
        }
    }
}

/// An HTTP response remembered under an idempotency key, with the SHA-256 (hex) of the
/// request it answered, so that a replay of the key with another request is told apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remembered {
    pub status: u16,
    pub body: String,
    /// Empty for responses stored before the fingerprint existed.
    pub request_sha256: String,
}

#[derive(Debug, Clone)]
pub struct NewRecipient {
    pub address: String,
    pub domain: String,
}

#[derive(Debug, Clone)]
pub struct NewMessage {
    pub queue_id: QueueId,
    pub sender: String,
    pub campaign: Option<String>,
    pub source: Source,
    /// Client address (SMTP) or API key name (HTTP), for the record.
    pub client: String,
    /// Who submitted it: the SMTP AUTH user or the HTTP API key's name, for the trace.
    pub identity: Option<String>,
    pub body: Vec<u8>,
    pub recipients: Vec<NewRecipient>,
    /// Submitted with the SMTPUTF8 parameter (RFC 6531): relayed with it.
    pub smtputf8: bool,
}

/// A recipient's place in its life. Stored as an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecipientState {
    /// Waiting for its next attempt (first or retry).
    Scheduled,
    Delivered,
    Failed,
    /// Its campaign is paused: out of the due index, so that a million held recipients
    /// cost the scheduler's claims nothing. Back to `Scheduled` on resume.
    Held,
}

impl RecipientState {
    pub fn as_i64(self) -> i64 {
        match self {
            RecipientState::Scheduled => 0,
            RecipientState::Delivered => 1,
            RecipientState::Failed => 2,
            RecipientState::Held => 3,
        }
    }

    pub fn from_i64(v: i64) -> RecipientState {
        match v {
            1 => RecipientState::Delivered,
            2 => RecipientState::Failed,
            3 => RecipientState::Held,
            _ => RecipientState::Scheduled,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RecipientState::Scheduled => "scheduled",
            RecipientState::Delivered => "delivered",
            RecipientState::Failed => "failed",
            RecipientState::Held => "held",
        }
    }
}

/// Recipients one batch of an operator's bulk operation changes: one short writer
/// operation, so that intake never waits long behind an action on a big campaign.
pub const OPS_BATCH: usize = 5000;

/// The queue: a writer for changes and read-only connections for status.
#[derive(Clone)]
pub struct Queue {
    writer: Writer,
    path: PathBuf,
    readers: Arc<Mutex<Vec<Connection>>>,
    clock: Arc<dyn Clock>,
    /// Rung by [`Queue::prune_now`]: the retention task runs a pass at once.
    prune_wake: Arc<tokio::sync::Notify>,
    /// Retention passes finished (successful or not), for whoever waits on one.
    prune_runs: Arc<tokio::sync::watch::Sender<u64>>,
    /// Domains of suspended destinations: their new recipients wait for the probe.
    delays: Arc<delays::DomainDelays>,
}

/// The recipients' domains, in order: what [`delays::DomainDelays`] looks up.
fn domains(recipients: &[NewRecipient]) -> impl Iterator<Item = &str> {
    recipients.iter().map(|r| r.domain.as_str())
}

impl Queue {
    /// Opens (creating if needed) queue.db and starts its writer thread. The thread ends
    /// once every clone of the returned `Queue` is dropped; join it to be sure the last
    /// batch is committed.
    pub fn open(
        config: &QueueConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<(Queue, JoinHandle<()>), QueueError> {
        std::fs::create_dir_all(&config.dir).map_err(|e| {
            QueueError::Write(format!("cannot create {}: {e}", config.dir.display()))
        })?;
        let path = config.dir.join("queue.db");
        let conn = store::open_writer(&path, config.synchronous, config.max_size_mb)?;
        let (writer, handle) = Writer::start(conn, config.max_batch, config.max_size_mb);
        let queue = Queue {
            writer,
            path,
            readers: Arc::default(),
            clock,
            prune_wake: Arc::default(),
            prune_runs: Arc::new(tokio::sync::watch::Sender::new(0)),
            delays: Arc::default(),
        };
        Ok((queue, handle))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn writer_stats(&self) -> &WriterStats {
        &self.writer.stats
    }

    /// Stores a message and its recipients; returns once the commit holding it is durable.
    pub async fn enqueue(&self, msg: NewMessage) -> Result<(), QueueError> {
        let now = self.clock.now_ms();
        let firsts = self.delays.first_attempts(domains(&msg.recipients), now);
        self.writer
            .run(move |conn| store::insert_message(conn, &msg, now, firsts.as_deref()))
            .await
    }

    /// The domains whose new recipients wait (see [`delays`]); the scheduler sets them.
    pub fn delays(&self) -> &Arc<delays::DomainDelays> {
        &self.delays
    }

    /// Stores a message together with the HTTP response that acknowledges it, keyed by
    /// an idempotency key, in one transaction. If the key already has a fresh response,
    /// nothing is stored and that response is returned: a repeat never enqueues twice.
    pub async fn enqueue_idempotent(
        &self,
        msg: Option<NewMessage>,
        key: String,
        response: Remembered,
        ttl: std::time::Duration,
    ) -> Result<Option<Remembered>, QueueError> {
        let now = self.clock.now_ms();
        let not_before = now - ttl.as_millis() as i64;
        let firsts = msg
            .as_ref()
            .and_then(|m| self.delays.first_attempts(domains(&m.recipients), now));
        self.writer
            .run(move |conn| {
                if let Some(existing) = store::idempotent_response(conn, &key, not_before)? {
                    return Ok(Some(existing));
                }
                if let Some(msg) = &msg {
                    store::insert_message(conn, msg, now, firsts.as_deref())?;
                }
                store::remember_response(conn, &key, &response, now, not_before)
            })
            .await
    }

    /// Creates a batch (its message row and template); returns once durable.
    pub async fn create_batch(&self, msg: NewMessage, template: String) -> Result<i64, QueueError> {
        let now = self.clock.now_ms();
        self.writer
            .run(move |conn| batch::create(conn, &msg, &template, now))
            .await
    }

    pub async fn batch(&self, batch_id: &str) -> Result<Option<BatchRecord>, QueueError> {
        let id = batch_id.to_owned();
        self.read(move |conn| batch::find(conn, &id)).await
    }

    pub async fn batch_of_message(
        &self,
        message_id: i64,
    ) -> Result<Option<BatchRecord>, QueueError> {
        self.read(move |conn| batch::by_message(conn, message_id))
            .await
    }

    /// Whether a campaign has batch sends still waiting (see [`batch::campaign_has_waiting`]).
    pub async fn campaign_has_batches(&self, campaign: &str) -> Result<bool, QueueError> {
        let campaign = campaign.to_owned();
        self.read(move |conn| batch::campaign_has_waiting(conn, &campaign))
            .await
    }

    /// The most recent batches, newest first.
    pub async fn batches(&self, limit: usize) -> Result<Vec<BatchRecord>, QueueError> {
        self.read(move |conn| batch::recent(conn, limit)).await
    }

    /// A chunk upload's committed progress under its key.
    pub async fn batch_chunk(
        &self,
        message_id: i64,
        key: &str,
    ) -> Result<Option<ChunkProgress>, QueueError> {
        let key = key.to_owned();
        self.read(move |conn| batch::chunk(conn, message_id, &key))
            .await
    }

    /// One slice of a batch upload (rows, counters, chunk progress) in the next group
    /// commit; returns once it is durable.
    pub async fn append_batch(&self, slice: Append) -> Result<(), QueueError> {
        let now = self.clock.now_ms();
        // Rows for a suspended destination wait for its probe, as the doors' do.
        let firsts = self
            .delays
            .first_attempts(slice.rows.iter().map(|r| r.domain.as_str()), now);
        self.writer
            .run(move |conn| batch::append(conn, &slice, now, firsts.as_deref()))
            .await
    }

    /// The stored response for an idempotency key, if fresh.
    pub async fn idempotent_response(
        &self,
        key: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<Remembered>, QueueError> {
        let key = key.to_owned();
        let not_before = self.clock.now_ms() - ttl.as_millis() as i64;
        self.read(move |conn| store::idempotent_response(conn, &key, not_before))
            .await
    }

    /// Proves the writer thread is alive and committing (the systemd watchdog asks).
    pub async fn ping(&self) -> Result<(), QueueError> {
        self.writer.run(|_| Ok(())).await
    }

    /// Runs a read on a pooled read-only connection, off the async threads.
    pub async fn read<T, F>(&self, f: F) -> Result<T, QueueError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, QueueError> + Send + 'static,
    {
        let readers = self.readers.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = readers.lock().pop();
            let conn = match pooled {
                Some(c) => c,
                None => store::open_reader(&path)?,
            };
            let result = f(&conn);
            readers.lock().push(conn);
            result
        })
        .await
        .map_err(|e| QueueError::Write(format!("read task failed: {e}")))?
    }

    pub async fn message(&self, queue_id: &str) -> Result<Option<StoredMessage>, QueueError> {
        let id = queue_id.to_owned();
        self.read(move |conn| store::read_message(conn, &id)).await
    }

    /// Leases due recipients for delivery (see [`store::claim`]).
    pub async fn claim(
        &self,
        limit: usize,
        lease: std::time::Duration,
        held_campaigns: Vec<String>,
        skip_domains: Vec<String>,
    ) -> Result<Vec<Claimed>, QueueError> {
        let now = self.clock.now_ms();
        let until = now + lease.as_millis() as i64;
        self.writer
            .run(move |conn| store::claim(conn, now, until, limit, &held_campaigns, &skip_domains))
            .await
    }

    /// Records attempt outcomes; returns once they are durable.
    pub async fn apply(&self, updates: Vec<(i64, Update)>) -> Result<(), QueueError> {
        let now = self.clock.now_ms();
        self.writer
            .run(move |conn| store::apply(conn, &updates, now))
            .await
    }

    pub async fn release_leases(&self) -> Result<usize, QueueError> {
        self.writer.run(store::release_leases).await
    }

    pub async fn next_due(&self) -> Result<Option<i64>, QueueError> {
        self.read(store::next_due).await
    }

    pub async fn body(&self, message_id: i64) -> Result<Option<Vec<u8>>, QueueError> {
        self.read(move |conn| store::body(conn, message_id)).await
    }

    pub async fn save_campaign(&self, state: CampaignState) -> Result<(), QueueError> {
        let now = self.clock.now_ms();
        self.writer
            .run(move |conn| store::save_campaign(conn, &state, now))
            .await
    }

    pub async fn load_campaigns(&self) -> Result<Vec<CampaignState>, QueueError> {
        self.read(store::load_campaigns).await
    }

    /// Purges a campaign's scheduled and held recipients (those with an id up to
    /// `through`, when given) in batches; returns how many.
    pub async fn purge(&self, campaign: &str, through: Option<i64>) -> Result<u64, QueueError> {
        let through = through.unwrap_or(i64::MAX);
        self.campaign_batches(campaign, move |conn, name, limit, now| {
            store::purge_batch(conn, name, through, limit, now)
        })
        .await
    }

    /// A message's trace (without bounce classes), if it is still stored.
    pub async fn trace(
        &self,
        queue_id: &str,
    ) -> Result<Option<crate::admin_api::MessageTrace>, QueueError> {
        let id = queue_id.to_owned();
        self.read(move |conn| trace::message(conn, &id)).await
    }

    /// One page of a search (see [`trace::find`]).
    pub async fn find(
        &self,
        f: trace::Find,
    ) -> Result<(Vec<crate::admin_api::FoundRecipient>, Option<String>), QueueError> {
        self.read(move |conn| trace::find(conn, &f)).await
    }

    /// Makes the target's deferred recipients due now, in batches; returns how many.
    pub async fn retry(&self, target: Target) -> Result<u64, QueueError> {
        self.in_batches(move |conn, limit, now| ops::retry_batch(conn, &target, limit, now))
            .await
    }

    /// One batch of a cancel (see [`ops::cancel_batch`]): the caller sends the batch's
    /// notifications, then asks for the next, until a batch changes fewer than
    /// [`OPS_BATCH`] recipients.
    pub async fn cancel_batch(
        &self,
        target: Target,
    ) -> Result<(usize, Vec<Cancelled>), QueueError> {
        let now = self.clock.now_ms();
        self.writer
            .run(move |conn| ops::cancel_batch(conn, &target, OPS_BATCH, now))
            .await
    }

    /// Holds (or releases) a destination domain: records (or forgets) the hold, then
    /// moves its queued recipients in batches. Returns whether the hold changed and how
    /// many recipients moved.
    pub async fn hold_domain(&self, domain: &str, hold: bool) -> Result<(bool, u64), QueueError> {
        let (name, now) = (domain.to_owned(), self.clock.now_ms());
        let changed = self
            .writer
            .run(move |conn| match hold {
                true => ops::hold_domain(conn, &name, now),
                false => ops::release_domain(conn, &name),
            })
            .await?;
        let name = domain.to_owned();
        let moved = self
            .in_batches(move |conn, limit, now| ops::domain_batch(conn, &name, hold, limit, now))
            .await?;
        Ok((changed, moved))
    }

    pub async fn domain_holds(&self) -> Result<Vec<crate::admin_api::DomainHold>, QueueError> {
        self.read(ops::domain_holds).await
    }

    /// A page of a campaign's waiting messages after `after` (see [`ops::export_page`]).
    pub async fn export_page(
        &self,
        campaign: &str,
        after: i64,
    ) -> Result<(Vec<crate::admin_api::SavedMessage>, Option<i64>, i64), QueueError> {
        const MESSAGES: usize = 500;
        const BYTES: usize = 4 * 1024 * 1024;
        let name = campaign.to_owned();
        self.read(move |conn| ops::export_page(conn, &name, after, MESSAGES, BYTES))
            .await
    }

    /// Puts saved messages back, in one operation (see [`ops::requeue`]).
    pub async fn requeue(
        &self,
        messages: Vec<crate::admin_api::SavedMessage>,
    ) -> Result<crate::admin_api::RequeueResponse, QueueError> {
        let now = self.clock.now_ms();
        self.writer
            .run(move |conn| ops::requeue(conn, &messages, now))
            .await
    }

    /// Copies queue.db (and `failures_db`) into the new folder `dir`, off the async
    /// threads, while the writer goes on committing (see [`backup`]).
    pub async fn backup(
        &self,
        dir: PathBuf,
        failures_db: Option<PathBuf>,
    ) -> Result<crate::admin_api::BackupResponse, backup::BackupError> {
        let src = self.path.clone();
        tokio::task::spawn_blocking(move || backup::run(&src, &dir, failures_db.as_deref()))
            .await
            .map_err(|e| backup::BackupError::Failed(format!("backup task failed: {e}")))?
    }

    /// Runs `step` in batches of [`OPS_BATCH`], one writer operation each, until a batch
    /// comes back short; returns the total.
    async fn in_batches(
        &self,
        step: impl Fn(&Connection, usize, i64) -> Result<usize, QueueError> + Clone + Send + 'static,
    ) -> Result<u64, QueueError> {
        let mut total = 0u64;
        loop {
            let (step, now) = (step.clone(), self.clock.now_ms());
            let n = self
                .writer
                .run(move |conn| step(conn, OPS_BATCH, now))
                .await?;
            total += n as u64;
            if n < OPS_BATCH {
                return Ok(total);
            }
        }
    }

    /// Moves a campaign's queued recipients the `way` says, in batches: held out of the
    /// due index while paused (recipients in flight are left alone; the claim still
    /// skips paused campaigns), scheduled again when resumed. Returns how many moved.
    pub async fn hold_campaign(&self, campaign: &str, way: Holding) -> Result<u64, QueueError> {
        self.campaign_batches(campaign, move |conn, name, limit, now| {
            store::hold_batch(conn, way, name, limit, now)
        })
        .await
    }

    /// [`Queue::hold_campaign`] off the caller's path: an operator's pause (or the
    /// guard's) answers at once; the rows follow.
    pub fn hold_in_background(&self, campaign: String) {
        self.hold_off_path(campaign, Holding::Hold, None);
    }

    /// [`Queue::hold_campaign`] releasing, off the caller's path; rings `wake` when done.
    pub fn release_in_background(&self, campaign: String, wake: Arc<tokio::sync::Notify>) {
        self.hold_off_path(campaign, Holding::Release, Some(wake));
    }

    fn hold_off_path(
        &self,
        campaign: String,
        way: Holding,
        wake: Option<Arc<tokio::sync::Notify>>,
    ) {
        let queue = self.clone();
        tokio::spawn(async move {
            match queue.hold_campaign(&campaign, way).await {
                Ok(n) => tracing::info!(%campaign, recipients = n, "{}", way.done()),
                Err(e) => match way {
                    Holding::Hold => {
                        tracing::error!(%campaign, error = %e, "holding queued recipients failed; the scheduler still skips them")
                    }
                    Holding::Release => {
                        tracing::error!(%campaign, error = %e, "releasing held recipients failed")
                    }
                },
            }
            if let Some(wake) = wake {
                wake.notify_one();
            }
        });
    }

    /// Runs `step` over a campaign's recipients in batches, one short transaction each,
    /// so that intake never waits long behind an operator's action on a big campaign.
    async fn campaign_batches(
        &self,
        campaign: &str,
        step: impl Fn(&Connection, &str, usize, i64) -> Result<usize, QueueError>
        + Copy
        + Send
        + 'static,
    ) -> Result<u64, QueueError> {
        let name = campaign.to_owned();
        self.in_batches(move |conn, limit, now| step(conn, &name, limit, now))
            .await
    }

    pub async fn summary(&self) -> Result<QueueSummary, QueueError> {
        self.read(status::summary).await
    }

    /// Lifetime totals of finished recipients and of what retention deleted.
    pub async fn totals(&self) -> Result<Totals, QueueError> {
        self.read(status::totals).await
    }

    /// Live recipients by state (scheduled, held): O(live rows).
    pub async fn live_by_state(&self) -> Result<Vec<(RecipientState, u64)>, QueueError> {
        self.read(status::live_by_state).await
    }

    /// One retention batch (see [`retention::prune_batch`]), in the next group commit.
    pub async fn prune_batch(&self, before_ms: i64, limit: usize) -> Result<Pruned, QueueError> {
        self.writer
            .run(move |conn| retention::prune_batch(conn, before_ms, limit))
            .await
    }

    /// Asks the retention task for a pass now rather than at its next tick; returns a
    /// receiver of the pass count, which rises once that pass is done.
    pub fn prune_now(&self) -> tokio::sync::watch::Receiver<u64> {
        let rx = self.prune_runs.subscribe();
        self.prune_wake.notify_one();
        rx
    }

    fn note_pass(&self) {
        self.prune_runs.send_modify(|n| *n += 1);
    }

    /// Caps queue.db at `max_size_mb` MiB from the next commit on (0 = no cap). A cap
    /// below the file's current size holds it at that size until retention frees pages.
    pub fn set_max_size(&self, max_size_mb: u64) {
        self.writer.set_max_size(max_size_mb);
    }

    /// Most operations per group commit, from the next batch on.
    pub fn set_max_batch(&self, max_batch: usize) {
        self.writer.set_max_batch(max_batch);
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Live recipients by state, then lifetime totals of delivered and failed ones.
    pub async fn count_by_state(&self) -> Result<Vec<(RecipientState, u64)>, QueueError> {
        self.read(status::count_by_state).await
    }
}

/// The health check waits on the writer: every acknowledgement does.
impl crate::supervise::Heartbeat for Queue {
    async fn answers(&self) -> bool {
        self.ping().await.is_ok()
    }
}

//! The suppression list (do-not-contact): addresses and domains Floodgate must never send
//! to again, globally or for one campaign — mailboxes that bounced as dead, people who
//! unsubscribed, and whatever operators add. Checked at the door from memory; kept in its
//! own `suppressions.db` with its own writer thread, so that a flood of bounces being
//! recorded never holds the queue's lock.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::bounce::BounceClass;
use crate::clock::Clock;
use crate::sqlite::{self, OpenError, Spec};

pub mod import;
mod index;
mod store;

use index::Index;

/// Most operations waiting for the writer; a bounce flood beyond it is counted, and its
/// entries still hold in memory until the next restart.
const CHANNEL: usize = 4096;
/// Most entries written in one transaction.
const BATCH: usize = 10_000;
/// How often expired entries are pruned, and how many at most per pass.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
const PRUNE_BATCH: usize = 5_000;
/// Entries hashed into the index at a time while loading at start.
const LOAD_CHUNK: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum SuppressionError {
    #[error("suppressions.db: {0}")]
    Open(#[from] OpenError),
    #[error("suppressions.db: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the suppression writer has stopped")]
    Closed,
    #[error("cannot start the suppression writer: {0}")]
    Spawn(std::io::Error),
}

/// Who an entry is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// A mailbox: local part lower-cased, domain as an IDNA A-label.
    Address(String),
    /// Every mailbox of a domain (A-label).
    Domain(String),
}

impl Target {
    /// Reads `user@example.com` or `@example.com` / `example.com` (a whole domain).
    pub fn parse(text: &str) -> Option<Target> {
        let text = text.trim();
        if text.is_empty() || text.chars().any(char::is_control) {
            return None;
        }
        match text.rsplit_once('@') {
            Some(("", domain)) => normal_domain(domain).map(Target::Domain),
            Some((local, domain)) => {
                let mailbox = crate::address::parse(&format!("{local}@{domain}")).ok()?;
                Some(Target::for_mailbox(local, &mailbox.domain))
            }
            None => normal_domain(text).map(Target::Domain),
        }
    }

    /// The target for a recipient the door already parsed.
    pub fn for_mailbox(local: &str, ascii_domain: &str) -> Target {
        let mut address = String::with_capacity(local.len() + ascii_domain.len() + 1);
        push_local(&mut address, local);
        address.push('@');
        address.push_str(ascii_domain);
        Target::Address(address)
    }

    pub fn domain(&self) -> &str {
        match self {
            Target::Address(a) => a.rsplit_once('@').map_or("", |(_, d)| d),
            Target::Domain(d) => d,
        }
    }

    /// As stored: the address, or `@domain`.
    pub fn as_column(&self) -> String {
        match self {
            Target::Address(a) => a.clone(),
            Target::Domain(d) => format!("@{d}"),
        }
    }

    fn from_column(text: &str) -> Option<Target> {
        match text.strip_prefix('@') {
            Some(d) if !d.is_empty() => Some(Target::Domain(d.to_owned())),
            Some(_) => None,
            None => text.contains('@').then(|| Target::Address(text.to_owned())),
        }
    }
}

/// Local parts compare without case, as every large mailbox provider treats them.
fn push_local(out: &mut String, local: &str) {
    out.extend(local.chars().flat_map(char::to_lowercase));
}

fn normal_domain(domain: &str) -> Option<String> {
    let probe = crate::address::parse(&format!("x@{domain}")).ok()?;
    Some(probe.domain)
}

/// Where an entry applies.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    Global,
    Campaign(String),
}

impl Scope {
    /// The scope a campaign name gives an entry: none (or empty) is global; `None` for a
    /// name no campaign can have (a control character, over 128 characters).
    pub fn for_campaign(campaign: Option<&str>) -> Option<Scope> {
        match campaign {
            None | Some("") => Some(Scope::Global),
            Some(c) if c.chars().any(char::is_control) || c.len() > 128 => None,
            Some(c) => Some(Scope::Campaign(c.to_owned())),
        }
    }

    fn as_column(&self) -> &str {
        match self {
            Scope::Global => "",
            Scope::Campaign(c) => c,
        }
    }

    fn from_column(text: &str) -> Scope {
        match text {
            "" => Scope::Global,
            c => Scope::Campaign(c.to_owned()),
        }
    }

    /// The campaign's name, or `None` for a global entry.
    pub fn campaign(&self) -> Option<&str> {
        match self {
            Scope::Global => None,
            Scope::Campaign(c) => Some(c),
        }
    }
}

crate::names::closed_names! {
    /// Why an entry exists.
    Reason {
        InvalidRecipient => "invalid_recipient",
        BadDomain => "bad_domain",
        InactiveMailbox => "inactive_mailbox",
        Unsubscribed => "unsubscribed",
        Complaint => "complaint",
        Manual => "manual",
    }
}

impl Reason {
    /// The reason a permanent failure of `class` gives, if it suppresses at all: only a
    /// dead mailbox does; a policy block is about the sender and never suppresses.
    pub fn for_bounce(class: BounceClass) -> Option<Reason> {
        match class {
            BounceClass::InvalidRecipient => Some(Reason::InvalidRecipient),
            BounceClass::BadDomain => Some(Reason::BadDomain),
            BounceClass::InactiveMailbox => Some(Reason::InactiveMailbox),
            _ => None,
        }
    }
}

/// An entry to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    pub target: Target,
    pub scope: Scope,
    pub reason: Reason,
    /// A queue id, "api", "import", "unsubscribe".
    pub source: String,
    pub expires_ms: Option<i64>,
}

/// An entry as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: i64,
    pub target: Target,
    pub scope: Scope,
    pub reason: Reason,
    pub source: String,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
}

/// What a listing asks for. `cursor` is the last id of the previous page.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub target: Option<Target>,
    pub domain: Option<String>,
    pub reason: Option<Reason>,
    pub scope: Option<Scope>,
    pub cursor: Option<i64>,
    pub limit: usize,
}

/// Which entry stopped a recipient at the door.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hit {
    Address,
    Domain,
}

enum Op {
    Add(
        Vec<NewEntry>,
        Option<oneshot::Sender<Result<usize, SuppressionError>>>,
    ),
    Remove(
        Scope,
        Target,
        oneshot::Sender<Result<bool, SuppressionError>>,
    ),
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    pub added: AtomicU64,
    pub removed: AtomicU64,
    pub pruned: AtomicU64,
    pub door_hits: AtomicU64,
    /// Bounce entries that found the writer's channel full: in memory, not on disk.
    pub unpersisted: AtomicU64,
    pub write_errors: AtomicU64,
}

pub struct Suppressions {
    index: Arc<Index>,
    tx: SyncSender<Op>,
    path: std::path::PathBuf,
    clock: Arc<dyn Clock>,
    pub stats: Arc<Stats>,
    /// In cluster mode, where this node's own changes go to be shared (bounded; what
    /// does not fit is counted by the cluster, never waited for).
    shared: std::sync::OnceLock<tokio::sync::mpsc::Sender<Shared>>,
}

/// A change of the list made on this node, for cluster mode to share with the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shared {
    Add(Vec<NewEntry>),
    Remove(Scope, Target),
}

impl Suppressions {
    /// Opens (creating) `suppressions.db` in `dir`, loads every live entry into memory and
    /// starts the writer thread, which ends when the last handle is dropped.
    pub fn open(
        dir: &Path,
        clock: Arc<dyn Clock>,
    ) -> Result<(Arc<Suppressions>, JoinHandle<()>), SuppressionError> {
        let path = dir.join("suppressions.db");
        let conn = sqlite::open_writer(
            &path,
            &Spec {
                name: "suppressions.db",
                busy_timeout: Duration::from_secs(5),
                synchronous: "FULL",
                foreign_keys: false,
                max_size_mb: 0,
                migrations: store::MIGRATIONS,
            },
        )?;
        let index = Arc::new(Index::new());
        // Hashed into the index in chunks as rows are read: a million entries at start
        // never sit in memory as strings.
        let mut chunk: Vec<(Scope, String, Option<i64>)> = Vec::with_capacity(LOAD_CHUNK);
        let flush = |chunk: &mut Vec<(Scope, String, Option<i64>)>| {
            index.insert_many(chunk.iter().map(|(s, t, e)| (s, t.as_str(), *e)));
            chunk.clear();
        };
        let now = clock.now_ms();
        store::for_each_live(&conn, now, |scope, target, expires| {
            if Target::from_column(target).is_some() {
                chunk.push((Scope::from_column(scope), target.to_owned(), expires));
                if chunk.len() == LOAD_CHUNK {
                    flush(&mut chunk);
                }
            }
        })?;
        flush(&mut chunk);
        let (tx, rx) = mpsc::sync_channel(CHANNEL);
        let stats = Arc::new(Stats::default());
        let writer = WriterLoop {
            conn,
            rx,
            index: index.clone(),
            clock: clock.clone(),
            stats: stats.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("suppressions".into())
            .spawn(move || writer.run())
            .map_err(SuppressionError::Spawn)?;
        Ok((
            Arc::new(Suppressions {
                index,
                tx,
                path,
                clock,
                stats,
                shared: std::sync::OnceLock::new(),
            }),
            handle,
        ))
    }

    /// Whether a recipient is suppressed for `campaign`: its address or its domain,
    /// globally or for that campaign.
    ///
    /// On the door's hot path for every recipient: up to four hash lookups under a read
    /// lock; no I/O, no await, no allocation beyond the lower-cased address.
    pub fn check(&self, local: &str, ascii_domain: &str, campaign: Option<&str>) -> Option<Hit> {
        let now = self.clock.now_ms();
        let mut address = String::with_capacity(local.len() + ascii_domain.len() + 1);
        push_local(&mut address, local);
        address.push('@');
        address.push_str(ascii_domain);
        let domain = &address[address.len() - ascii_domain.len() - 1..];
        let scopes = [
            Some(Scope::Global),
            campaign.map(|c| Scope::Campaign(c.to_owned())),
        ];
        for scope in scopes.iter().flatten() {
            if self.index.contains(scope, &address, now) {
                self.stats.door_hits.fetch_add(1, Ordering::Relaxed);
                return Some(Hit::Address);
            }
            if self.index.contains(scope, domain, now) {
                self.stats.door_hits.fetch_add(1, Ordering::Relaxed);
                return Some(Hit::Domain);
            }
        }
        None
    }

    /// Adds entries and answers once they are on disk (the API and imports).
    pub async fn add(&self, entries: Vec<NewEntry>) -> Result<usize, SuppressionError> {
        self.share(|| Shared::Add(entries.clone()));
        self.apply(Shared::Add(entries))
            .await
            .map(|n| n.unwrap_or(0))
    }

    /// Sends this node's changes to `tx` from now on (cluster mode).
    pub fn share_with(&self, tx: tokio::sync::mpsc::Sender<Shared>) {
        let _ = self.shared.set(tx);
    }

    fn share(&self, change: impl FnOnce() -> Shared) {
        if let Some(tx) = self.shared.get() {
            // Full: the cluster counts what it could not share; the door never waits.
            let _ = tx.try_send(change());
        }
    }

    /// Applies a change (another node's, or this node's own) without sharing it:
    /// `Ok(Some(n))` entries added, `Ok(None)` for a removal.
    pub async fn apply(&self, change: Shared) -> Result<Option<usize>, SuppressionError> {
        match change {
            Shared::Add(entries) => {
                let (done, wait) = oneshot::channel();
                self.send(Op::Add(entries, Some(done))).await?;
                wait.await.map_err(|_| SuppressionError::Closed)?.map(Some)
            }
            Shared::Remove(scope, target) => {
                let (done, wait) = oneshot::channel();
                self.send(Op::Remove(scope, target, done)).await?;
                wait.await.map_err(|_| SuppressionError::Closed)??;
                Ok(None)
            }
        }
    }

    /// Hands `op` to the writer. A full channel means a bounce flood is being written:
    /// wait for room off the async threads rather than refuse an operator's request.
    async fn send(&self, op: Op) -> Result<(), SuppressionError> {
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || tx.send(op))
            .await
            .map_err(|_| SuppressionError::Closed)?
            .map_err(|_| SuppressionError::Closed)
    }

    /// Adds entries learnt on the delivery path: in memory at once (the next RCPT is
    /// refused), on disk with the writer's next batch. Never blocks; a full channel is
    /// counted.
    pub fn record(&self, entries: Vec<NewEntry>) {
        self.share(|| Shared::Add(entries.clone()));
        self.index.insert_entries(&entries);
        let n = entries.len() as u64;
        match self.tx.try_send(Op::Add(entries, None)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats.unpersisted.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Removes one entry; `false` when there was none.
    pub async fn remove(&self, scope: Scope, target: Target) -> Result<bool, SuppressionError> {
        self.share(|| Shared::Remove(scope.clone(), target.clone()));
        let (done, wait) = oneshot::channel();
        self.send(Op::Remove(scope, target, done)).await?;
        wait.await.map_err(|_| SuppressionError::Closed)?
    }

    /// Runs `read` on a read-only connection off the async threads.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Connection, i64) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, SuppressionError> {
        let path = self.path.clone();
        let now = self.clock.now_ms();
        tokio::task::spawn_blocking(move || {
            let conn = sqlite::open_reader(&path, Duration::from_secs(5))?;
            Ok(read(&conn, now)?)
        })
        .await
        .map_err(|_| SuppressionError::Closed)?
    }

    pub async fn list(&self, filter: Filter) -> Result<Vec<Entry>, SuppressionError> {
        self.read(move |conn, now| store::list(conn, &filter, now))
            .await
    }

    pub async fn get(&self, target: Target) -> Result<Vec<Entry>, SuppressionError> {
        self.read(move |conn, now| store::get(conn, &target, now))
            .await
    }

    pub async fn stored(&self) -> Result<u64, SuppressionError> {
        self.read(|conn, _| store::count(conn)).await
    }

    /// Entries held in memory, and the bytes they take there.
    pub fn in_memory(&self) -> (usize, usize) {
        (self.index.len(), self.index.memory_bytes())
    }
}

struct WriterLoop {
    conn: Connection,
    rx: Receiver<Op>,
    index: Arc<Index>,
    clock: Arc<dyn Clock>,
    stats: Arc<Stats>,
}

impl WriterLoop {
    fn run(mut self) {
        // On the injected clock: a test that moves it sees expired entries pruned at the
        // next write rather than after PRUNE_EVERY of real time.
        let mut last_prune = self.clock.now_instant();
        loop {
            match self.rx.recv_timeout(PRUNE_EVERY) {
                Ok(op) => self.batch(op),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let now = self.clock.now_instant();
            if now.saturating_duration_since(last_prune) >= PRUNE_EVERY {
                self.prune();
                last_prune = now;
            }
        }
    }

    /// Writes `first` and whatever else is waiting, up to `BATCH` entries, in one
    /// transaction, then answers each caller.
    fn batch(&mut self, first: Op) {
        let mut adds: Vec<(Vec<NewEntry>, Option<oneshot::Sender<_>>)> = Vec::new();
        let mut removes = Vec::new();
        let mut entries = 0;
        let mut next = Some(first);
        while let Some(op) = next.take() {
            match op {
                Op::Add(e, done) => {
                    entries += e.len();
                    adds.push((e, done));
                }
                Op::Remove(s, t, done) => removes.push((s, t, done)),
            }
            if entries < BATCH {
                next = self.rx.try_recv().ok();
            }
        }
        let now = self.clock.now_ms();
        let result = (|| -> rusqlite::Result<Vec<bool>> {
            let tx = self.conn.transaction()?;
            for (e, _) in &adds {
                store::upsert(&tx, e, now)?;
            }
            let removed = removes
                .iter()
                .map(|(s, t, _)| store::remove(&tx, s, t))
                .collect::<rusqlite::Result<Vec<bool>>>()?;
            tx.commit()?;
            Ok(removed)
        })();
        match result {
            Ok(removed) => {
                for (e, done) in adds {
                    self.index.insert_entries(&e);
                    self.stats
                        .added
                        .fetch_add(e.len() as u64, Ordering::Relaxed);
                    if let Some(done) = done {
                        let _ = done.send(Ok(e.len()));
                    }
                }
                for ((s, t, done), was) in removes.into_iter().zip(removed) {
                    self.index.remove(&s, &t.as_column());
                    if was {
                        self.stats.removed.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = done.send(Ok(was));
                }
            }
            Err(e) => {
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "suppression write failed");
                for (_, done) in adds {
                    if let Some(done) = done {
                        let _ = done.send(Err(SuppressionError::Sqlite(clone_error(&e))));
                    }
                }
                for (_, _, done) in removes {
                    let _ = done.send(Err(SuppressionError::Sqlite(clone_error(&e))));
                }
            }
        }
    }

    fn prune(&mut self) {
        let now = self.clock.now_ms();
        loop {
            match store::prune(&self.conn, now, PRUNE_BATCH) {
                Ok(gone) => {
                    for (scope, target) in &gone {
                        self.index.remove(scope, &target.as_column());
                    }
                    self.stats
                        .pruned
                        .fetch_add(gone.len() as u64, Ordering::Relaxed);
                    if gone.len() < PRUNE_BATCH {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "suppression retention failed");
                    return;
                }
            }
        }
    }
}

/// rusqlite errors are not `Clone`; one failed batch answers several callers.
fn clone_error(e: &rusqlite::Error) -> rusqlite::Error {
    match e.sqlite_error_code() {
        Some(code) => rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error {
                code,
                extended_code: 0,
            },
            Some(e.to_string()),
        ),
        None => rusqlite::Error::InvalidQuery,
    }
}

#[cfg(test)]
mod tests;

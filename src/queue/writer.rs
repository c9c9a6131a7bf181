//! The single writer of queue.db: one thread owns the write connection and group-commits
//! every waiting operation into one transaction, answering each caller only after the
//! COMMIT that holds its work (durable before ack).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::QueueError;

/// One unit of work inside a group transaction.
trait Work: Send {
    /// Runs inside the batch's transaction, under its own savepoint.
    fn apply(&mut self, conn: &Connection) -> bool;
    /// Called once the batch is committed (or failed as a whole).
    fn finish(self: Box<Self>, commit: Result<(), QueueError>);
}

struct Task<T, F> {
    f: Option<F>,
    result: Option<Result<T, QueueError>>,
    done: oneshot::Sender<Result<T, QueueError>>,
}

impl<T, F> Work for Task<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> Result<T, QueueError> + Send,
{
    fn apply(&mut self, conn: &Connection) -> bool {
        let f = self.f.take().expect("a task is applied once");
        let result = f(conn);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn finish(self: Box<Self>, commit: Result<(), QueueError>) {
        let result = match commit {
            Ok(()) => self.result.unwrap_or(Err(QueueError::Closed)),
            Err(e) => Err(e),
        };
        // The caller may have gone (client hung up); its work is committed regardless.
        let _ = self.done.send(result);
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub transactions: AtomicU64,
    pub operations: AtomicU64,
    pub failed_transactions: AtomicU64,
}

/// Cheap to clone; every producer holds one.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Box<dyn Work>>,
    pub stats: Arc<WriterStats>,
    settings: Arc<Settings>,
}

/// What a reload may change, read by the writer thread at each batch.
struct Settings {
    max_batch: AtomicUsize,
    /// `[queue] max_size_mb`, applied as `PRAGMA max_page_count` on the write connection.
    max_size_mb: AtomicU64,
}

impl Writer {
    /// Starts the writer thread. It exits, after committing what it holds, once every
    /// `Writer` clone is dropped.
    /// `max_size_mb` is the cap `conn` was opened with.
    pub fn start(conn: Connection, max_batch: usize, max_size_mb: u64) -> (Writer, JoinHandle<()>) {
        // The channel's size is fixed at start: it bounds waiting callers, not batches.
        let (tx, rx) = mpsc::channel(max_batch * 8);
        let stats = Arc::new(WriterStats::default());
        let settings = Arc::new(Settings {
            max_batch: AtomicUsize::new(max_batch),
            max_size_mb: AtomicU64::new(max_size_mb),
        });
        let (thread_stats, thread_settings) = (stats.clone(), settings.clone());
        let handle = std::thread::Builder::new()
            .name("queue-writer".into())
            .spawn(move || run(conn, rx, &thread_settings, &thread_stats))
            .expect("spawn queue writer thread");
        (
            Writer {
                tx,
                stats,
                settings,
            },
            handle,
        )
    }

    /// Most operations per group commit, from the next batch on.
    pub fn set_max_batch(&self, max_batch: usize) {
        self.settings
            .max_batch
            .store(max_batch.max(1), Ordering::Relaxed);
    }

    /// The size cap in MiB (0 = none), applied before the next batch.
    pub fn set_max_size(&self, max_size_mb: u64) {
        self.settings
            .max_size_mb
            .store(max_size_mb, Ordering::Relaxed);
    }

    /// Runs `f` inside the next group transaction and returns its result once committed.
    pub async fn run<T, F>(&self, f: F) -> Result<T, QueueError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, QueueError> + Send + 'static,
    {
        let (done, wait) = oneshot::channel();
        let task = Box::new(Task {
            f: Some(f),
            result: None,
            done,
        });
        self.tx.send(task).await.map_err(|_| QueueError::Closed)?;
        wait.await.map_err(|_| QueueError::Closed)?
    }
}

fn run(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Box<dyn Work>>,
    settings: &Settings,
    stats: &WriterStats,
) {
    let mut batch: Vec<Box<dyn Work>> = Vec::new();
    let mut size_cap = settings.max_size_mb.load(Ordering::Relaxed);
    while let Some(first) = rx.blocking_recv() {
        let max_batch = settings.max_batch.load(Ordering::Relaxed);
        let wanted = settings.max_size_mb.load(Ordering::Relaxed);
        if wanted != size_cap {
            match super::store::set_max_size(&conn, wanted) {
                Ok(()) => {
                    tracing::info!(max_size_mb = wanted, "queue size cap applied");
                    size_cap = wanted;
                }
                // Tried again before the next batch; the old cap stays meanwhile.
                Err(e) => tracing::error!(error = %e, "cannot apply the queue size cap"),
            }
        }
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(work) => batch.push(work),
                Err(_) => break,
            }
        }
        let commit = commit_batch(&mut conn, &mut batch);
        stats.transactions.fetch_add(1, Ordering::Relaxed);
        stats
            .operations
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        if let Err(e) = &commit {
            stats.failed_transactions.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, operations = batch.len(), "queue transaction failed");
        }
        for work in batch.drain(..) {
            work.finish(commit.clone());
        }
    }
    tracing::debug!("queue writer stopped");
}

fn commit_batch(conn: &mut Connection, batch: &mut [Box<dyn Work>]) -> Result<(), QueueError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for work in batch.iter_mut() {
        // A savepoint per operation: one failing insert (a constraint, a full disk on one
        // row) fails that caller alone, not the whole batch.
        // Cached statements: parsing these anew for every operation was 1% of the
        // writer's CPU under intake.
        tx.prepare_cached("SAVEPOINT op")?.execute([])?;
        if work.apply(&tx) {
            tx.prepare_cached("RELEASE op")?.execute([])?;
        } else {
            tx.prepare_cached("ROLLBACK TO op")?.execute([])?;
            tx.prepare_cached("RELEASE op")?.execute([])?;
        }
    }
    tx.commit()?;
    Ok(())
}

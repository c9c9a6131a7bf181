//! Counters of batch sends for `/metrics`: batches created, chunk uploads, rows read and
//! accepted, bytes uploaded, and the renders at delivery (with their failures and
//! bytes). Process-lifetime counters in memory; the batches' own progress is in queue.db.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct BatchStats {
    pub created: AtomicU64,
    /// Chunk uploads read to their end and answered (replays of a finished chunk not
    /// included).
    pub chunks: AtomicU64,
    /// Retries under a chunk's Idempotency-Key with other content, refused with 422.
    pub chunks_refused: AtomicU64,
    /// Bytes of recipient lists received.
    pub upload_bytes: AtomicU64,
    /// Rows committed: read (accepted or rejected) and accepted.
    pub rows_received: AtomicU64,
    pub rows_accepted: AtomicU64,
    /// Messages rendered at delivery, their bytes, and those that did not render (a
    /// permanent failure of class `template`).
    pub renders: AtomicU64,
    pub rendered_bytes: AtomicU64,
    pub render_failures: AtomicU64,
}

impl BatchStats {
    /// Adds `n` to `counter`; relaxed, as every reader only sums.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

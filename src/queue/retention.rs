//! Retention of finished work: recipients delivered or failed more than `[queue]
//! retention` ago are deleted, and with them the messages that have no recipient left.
//! The deletes run in small batches through the queue writer, each one operation of a
//! group commit, so intake never waits long behind them; the lifetime totals are kept in
//! `counters`, updated in the same transaction.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rusqlite::{Connection, params};
use tokio_util::sync::CancellationToken;

use super::{Queue, QueueError};
use crate::config::Config;

/// Finished recipients deleted per operation: short enough that a commit holding one
/// batch still answers its submitters promptly.
pub const BATCH: usize = 500;
/// How often retention looks for finished rows, unless woken by [`Queue::prune_now`].
/// queue.db's size is set by the rows finished within retention plus one tick (freed
/// pages are reused, the file never shrinks), so the tick is short: at 2,000 messages/s
/// and a 1-minute retention, a 30 s tick held 90 s of finished rows (55.9 MiB), 5 s
/// holds 65 s. A pass with nothing old enough costs one probe of `recipients_finished`.
const EVERY: Duration = Duration::from_secs(5);

/// What one batch deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub recipients: usize,
    pub messages: usize,
}

/// Deletes up to `limit` recipients that finished before `before_ms`, then the messages
/// among theirs that have no recipient left. Runs in the writer's transaction.
pub fn prune_batch(conn: &Connection, before_ms: i64, limit: usize) -> Result<Pruned, QueueError> {
    let mut stmt = conn.prepare_cached(
        "DELETE FROM recipients WHERE id IN (
             SELECT id FROM recipients WHERE state IN (1, 2) AND updated_at < ?1 LIMIT ?2)
         RETURNING message_id",
    )?;
    let messages: Vec<i64> = stmt
        .query_map(params![before_ms, limit as i64], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let recipients = messages.len();
    let messages: std::collections::BTreeSet<i64> = messages.into_iter().collect();
    let mut orphan = conn.prepare_cached(
        // A batch waits for more chunks: retention takes it once untouched (below).
        "DELETE FROM messages WHERE id = ?1
           AND NOT EXISTS (SELECT 1 FROM recipients WHERE message_id = ?1)
           AND NOT EXISTS (SELECT 1 FROM batches WHERE message_id = ?1)",
    )?;
    let mut deleted = 0;
    for m in messages {
        deleted += orphan.execute([m])?;
    }
    deleted += super::batch::prune(conn, before_ms, limit)?;
    let mut count =
        conn.prepare_cached("UPDATE counters SET value = value + ?2 WHERE name = ?1")?;
    count.execute(params!["pruned_recipients", recipients as i64])?;
    count.execute(params!["pruned_messages", deleted as i64])?;
    Ok(Pruned {
        recipients,
        messages: deleted,
    })
}

/// The retention task: every [`EVERY`] (or when woken) deletes finished rows older than
/// the live `[queue] retention`, batch after batch until none is left. Ends at
/// `shutdown`, or with an error if the queue is gone.
pub async fn run(
    queue: Queue,
    config: Arc<ArcSwap<Config>>,
    shutdown: CancellationToken,
) -> Result<(), QueueError> {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = queue.prune_wake.notified() => {}
            () = tokio::time::sleep(EVERY) => {}
        }
        let retention = config.load().queue.retention.0;
        let before =
            queue.clock().now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let mut total = Pruned::default();
        loop {
            let p = match queue.prune_batch(before, BATCH).await {
                Ok(p) => p,
                Err(QueueError::Closed) => return Err(QueueError::Closed),
                Err(e) => {
                    // A full disk or a busy file: the rows stay, the next pass tries again.
                    tracing::warn!(error = %e, "queue retention pass failed");
                    break;
                }
            };
            total.recipients += p.recipients;
            total.messages += p.messages;
            if p.recipients < BATCH || shutdown.is_cancelled() {
                break;
            }
        }
        queue.note_pass();
        if total.recipients > 0 {
            tracing::debug!(
                recipients = total.recipients,
                messages = total.messages,
                "queue retention pruned finished rows"
            );
        }
    }
}

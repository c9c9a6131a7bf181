//! Batch sends in queue.db: the batch row (its template stored once, its progress as
//! counters), the appended recipient rows (each with only its variables), the progress
//! of Idempotency-Key'd chunks, and the per-batch outcome counters moved with every
//! delivery outcome. Every function runs inside the writer's transaction or a reader.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, params};

use super::{NewMessage, QueueError};

/// A batch as stored: the message row that carries its envelope, its template (JSON, as
/// the HTTP door wrote it) and its counters.
#[derive(Debug, Clone)]
pub struct BatchRecord {
    pub message_id: i64,
    pub batch_id: String,
    pub sender: String,
    pub campaign: Option<String>,
    /// The API key that created it: only that key may add recipients or read it.
    pub client: String,
    pub template: String,
    pub created_at: i64,
    pub received: u64,
    pub accepted: u64,
    /// Rejected rows by reason name.
    pub rejected: BTreeMap<String, u64>,
    pub delivered: u64,
    pub deferred: u64,
    pub failed: u64,
    pub failed_template: u64,
}

impl BatchRecord {
    /// Accepted recipients not yet delivered or failed.
    pub fn queued(&self) -> u64 {
        self.accepted.saturating_sub(self.delivered + self.failed)
    }
}

/// One accepted recipient row of a batch.
#[derive(Debug, Clone)]
pub struct BatchRow {
    pub address: String,
    pub domain: String,
    /// The row's variables, a JSON object.
    pub vars: String,
}

/// What one chunk upload has done so far, as committed with its rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkProgress {
    /// Lines of the upload read and accounted for (accepted rows committed).
    pub lines: u64,
    /// The counts so far (JSON, the HTTP door's own shape).
    pub progress: String,
    /// The final response, once the upload ended.
    pub response: Option<String>,
    /// SHA-256 (hex) of the first `lines` lines, as the HTTP door fingerprints them;
    /// `None` for a chunk stored before fingerprints were kept.
    pub fingerprint: Option<String>,
}

/// One group-committed slice of an upload: its accepted rows, and what the lines it
/// covers counted.
#[derive(Debug, Clone, Default)]
pub struct Append {
    pub message_id: i64,
    pub campaign: Option<String>,
    pub rows: Vec<BatchRow>,
    /// Rows this slice read (accepted and rejected).
    pub lines: u64,
    pub rejected: BTreeMap<String, u64>,
    /// The chunk's key and its progress after this slice.
    pub chunk: Option<(String, ChunkProgress)>,
}

/// Creates a batch: its message row (no body: each recipient's is rendered at delivery)
/// and its template.
pub fn create(
    conn: &Connection,
    msg: &NewMessage,
    template: &str,
    now_ms: i64,
) -> Result<i64, QueueError> {
    conn.prepare_cached(
        "INSERT INTO messages (queue_id, sender, campaign, source, client, received_at, size, smtputf8)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, 0)",
    )?
    .execute(params![
        msg.queue_id.as_str(),
        msg.sender,
        msg.campaign,
        msg.source.as_str(),
        msg.client,
        now_ms,
    ])?;
    let id = conn.last_insert_rowid();
    conn.prepare_cached(
        "INSERT INTO batches (message_id, template, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)",
    )?
    .execute(params![id, template, now_ms])?;
    Ok(id)
}

pub fn find(conn: &Connection, batch_id: &str) -> Result<Option<BatchRecord>, QueueError> {
    read(conn, "m.queue_id = ?1", batch_id)
}

pub fn by_message(conn: &Connection, message_id: i64) -> Result<Option<BatchRecord>, QueueError> {
    read(conn, "m.id = ?1", message_id)
}

/// Whether a campaign has batch sends with recipients still waiting: their rows hold
/// only variables, rendered from the batch's template at delivery, so an export of
/// message bodies (`ctl purge --save`) cannot save them.
pub fn campaign_has_waiting(conn: &Connection, campaign: &str) -> Result<bool, QueueError> {
    let mut stmt = conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM batches b JOIN messages m ON m.id = b.message_id
                          WHERE m.campaign = ?1
                            AND EXISTS (SELECT 1 FROM recipients r
                                        WHERE r.message_id = m.id AND r.state IN (0, 3)))",
    )?;
    Ok(stmt.query_row([campaign], |r| r.get(0))?)
}

/// The most recent batches, newest first.
pub fn recent(conn: &Connection, limit: usize) -> Result<Vec<BatchRecord>, QueueError> {
    let ids: Vec<i64> = conn
        .prepare_cached("SELECT message_id FROM batches ORDER BY message_id DESC LIMIT ?1")?
        .query_map([limit as i64], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        out.extend(by_message(conn, id)?);
    }
    Ok(out)
}

fn read(
    conn: &Connection,
    filter: &str,
    key: impl rusqlite::ToSql,
) -> Result<Option<BatchRecord>, QueueError> {
    let sql = format!(
        "SELECT m.id, m.queue_id, m.sender, m.campaign, m.client, b.template, b.created_at,
                b.received, b.accepted, b.rejected, b.delivered, b.deferred, b.failed,
                b.failed_template
         FROM batches b JOIN messages m ON m.id = b.message_id WHERE {filter}"
    );
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([key], |r| {
            let rejected: String = r.get(9)?;
            Ok(BatchRecord {
                message_id: r.get(0)?,
                batch_id: r.get(1)?,
                sender: r.get(2)?,
                campaign: r.get(3)?,
                client: r.get(4)?,
                template: r.get(5)?,
                created_at: r.get(6)?,
                received: r.get(7)?,
                accepted: r.get(8)?,
                rejected: serde_json::from_str(&rejected).unwrap_or_default(),
                delivered: r.get(10)?,
                deferred: r.get(11)?,
                failed: r.get(12)?,
                failed_template: r.get(13)?,
            })
        })
        .optional()?)
}

pub fn chunk(
    conn: &Connection,
    message_id: i64,
    key: &str,
) -> Result<Option<ChunkProgress>, QueueError> {
    Ok(conn
        .prepare_cached(
            "SELECT lines, progress, response, fingerprint FROM batch_chunks
             WHERE message_id = ?1 AND key = ?2",
        )?
        .query_row(params![message_id, key], |r| {
            Ok(ChunkProgress {
                lines: r.get(0)?,
                progress: r.get(1)?,
                response: r.get(2)?,
                fingerprint: r.get(3)?,
            })
        })
        .optional()?)
}

/// Stores one slice of an upload: its accepted rows, the batch's counters and the
/// chunk's progress, all in the caller's transaction, so that a crash leaves either all
/// of a slice or none of it.
/// `firsts` holds each row's first attempt when some wait (see `queue::delays`).
pub fn append(
    conn: &Connection,
    a: &Append,
    now_ms: i64,
    firsts: Option<&[i64]>,
) -> Result<(), QueueError> {
    let mut insert = conn.prepare_cached(
        "INSERT INTO recipients (message_id, address, domain, campaign, state, next_attempt, updated_at, vars)
         VALUES (?1, ?2, ?3, ?4, 0, ?7, ?5, ?6)",
    )?;
    for (i, row) in a.rows.iter().enumerate() {
        let first = super::delays::first_of(firsts, i, now_ms);
        insert.execute(params![
            a.message_id,
            row.address,
            row.domain,
            a.campaign,
            now_ms,
            row.vars,
            first
        ])?;
    }
    let old: String = conn
        .prepare_cached("SELECT rejected FROM batches WHERE message_id = ?1")?
        .query_row([a.message_id], |r| r.get(0))?;
    let mut rejected: BTreeMap<String, u64> = serde_json::from_str(&old).unwrap_or_default();
    for (reason, n) in &a.rejected {
        *rejected.entry(reason.clone()).or_default() += n;
    }
    conn.prepare_cached(
        "UPDATE batches SET received = received + ?2, accepted = accepted + ?3, rejected = ?4,
             updated_at = ?5 WHERE message_id = ?1",
    )?
    .execute(params![
        a.message_id,
        a.lines as i64,
        a.rows.len() as i64,
        serde_json::to_string(&rejected).expect("counts serialize"),
        now_ms
    ])?;
    if let Some((key, p)) = &a.chunk {
        conn.prepare_cached(
            "INSERT INTO batch_chunks (message_id, key, lines, progress, response, fingerprint)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (message_id, key) DO UPDATE SET lines = excluded.lines,
                 progress = excluded.progress, response = excluded.response,
                 fingerprint = excluded.fingerprint",
        )?
        .execute(params![
            a.message_id,
            key,
            p.lines as i64,
            p.progress,
            p.response,
            p.fingerprint
        ])?;
    }
    Ok(())
}

/// How one batch's recipients moved in one outcome operation.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved {
    pub delivered: i64,
    pub failed: i64,
    pub deferred: i64,
    pub failed_template: i64,
}

impl Moved {
    /// A recipient entering (`n = 1`) or leaving (`n = -1`) a finished state.
    pub fn add(&mut self, state: super::RecipientState, n: i64) {
        match state {
            super::RecipientState::Delivered => self.delivered += n,
            super::RecipientState::Failed => self.failed += n,
            super::RecipientState::Scheduled | super::RecipientState::Held => {}
        }
    }
}

/// Moves the outcome counters of the batches among `moved` (other messages match no
/// batch row and cost one index probe).
pub fn record_outcomes(conn: &Connection, moved: &BTreeMap<i64, Moved>) -> Result<(), QueueError> {
    let mut stmt = conn.prepare_cached(
        "UPDATE batches SET delivered = delivered + ?2, failed = failed + ?3,
             deferred = deferred + ?4, failed_template = failed_template + ?5
         WHERE message_id = ?1",
    )?;
    for (id, m) in moved {
        stmt.execute(params![
            id,
            m.delivered,
            m.failed,
            m.deferred,
            m.failed_template
        ])?;
    }
    Ok(())
}

/// Retention of batches: deletes (with their message row, chunks cascading) up to
/// `limit` batches untouched since `before_ms` that have no recipient row left.
pub fn prune(conn: &Connection, before_ms: i64, limit: usize) -> Result<usize, QueueError> {
    Ok(conn
        .prepare_cached(
            "DELETE FROM messages WHERE id IN (
                 SELECT b.message_id FROM batches b WHERE b.updated_at < ?1
                   AND NOT EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = b.message_id)
                 LIMIT ?2)",
        )?
        .execute(params![before_ms, limit as i64])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;
    use crate::queue::{QueueId, Source, retention, store};

    fn batch(conn: &Connection, now: i64) -> i64 {
        let msg = NewMessage {
            queue_id: QueueId::generate(now * 1000),
            sender: "a@client.test".into(),
            campaign: Some("c".into()),
            source: Source::Http,
            client: "crm".into(),
            identity: None,
            body: Vec::new(),
            recipients: Vec::new(),
            smtputf8: false,
        };
        create(conn, &msg, "{}", now).unwrap()
    }

    #[test]
    fn a_campaign_with_waiting_batch_rows_is_known_so_an_export_can_refuse_it() {
        let dir = tempfile::tempdir().unwrap();
        let conn =
            store::open_writer(&dir.path().join("queue.db"), Synchronous::Normal, 0).unwrap();
        let id = batch(&conn, 0);
        assert!(!campaign_has_waiting(&conn, "c").unwrap(), "no rows yet");
        let slice = Append {
            message_id: id,
            campaign: Some("c".into()),
            rows: vec![BatchRow {
                address: "u@mx.test".into(),
                domain: "mx.test".into(),
                vars: "{}".into(),
            }],
            lines: 1,
            rejected: Default::default(),
            chunk: None,
        };
        append(&conn, &slice, 1, None).unwrap();
        assert!(campaign_has_waiting(&conn, "c").unwrap());
        assert!(!campaign_has_waiting(&conn, "other").unwrap());
        conn.execute("UPDATE recipients SET state = 1", []).unwrap();
        assert!(!campaign_has_waiting(&conn, "c").unwrap(), "all delivered");
    }

    #[test]
    fn counters_move_with_rows_and_outcomes_and_retention_takes_finished_batches() {
        let dir = tempfile::tempdir().unwrap();
        let conn =
            store::open_writer(&dir.path().join("queue.db"), Synchronous::Normal, 0).unwrap();
        let id = batch(&conn, 0);
        let waiting = batch(&conn, 0);
        let slice = Append {
            message_id: id,
            campaign: Some("c".into()),
            rows: vec![BatchRow {
                address: "u@mx.test".into(),
                domain: "mx.test".into(),
                vars: r#"{"n":1}"#.into(),
            }],
            lines: 3,
            rejected: [("no_such_domain".to_owned(), 2)].into(),
            chunk: Some((
                "k".into(),
                ChunkProgress {
                    lines: 3,
                    progress: "{}".into(),
                    response: None,
                    fingerprint: Some("ab".into()),
                },
            )),
        };
        append(&conn, &slice, 1, None).unwrap();
        let b = by_message(&conn, id).unwrap().unwrap();
        assert_eq!((b.received, b.accepted, b.queued()), (3, 1, 1));
        assert_eq!(b.rejected["no_such_domain"], 2);
        let stored = chunk(&conn, id, "k").unwrap().unwrap();
        assert_eq!(
            (stored.lines, stored.fingerprint.as_deref()),
            (3, Some("ab"))
        );

        let claimed = store::claim(&conn, 1, 100, 10, &[], &[]).unwrap();
        assert_eq!(claimed[0].vars.as_deref(), Some(r#"{"n":1}"#));
        let failed = store::Update::Failed {
            reason: "template".into(),
            class: crate::bounce::BounceClass::Template,
            reply: "554 5.6.0 x".into(),
        };
        store::apply(&conn, &[(claimed[0].id, failed)], 2).unwrap();
        let b = by_message(&conn, id).unwrap().unwrap();
        assert_eq!((b.failed, b.failed_template, b.queued()), (1, 1, 0));

        // Its rows pruned, the batch goes once untouched past retention; a batch that was
        // touched since stays for its next chunk.
        append(
            &conn,
            &Append {
                message_id: waiting,
                ..Append::default()
            },
            50,
            None,
        )
        .unwrap();
        retention::prune_batch(&conn, 10, 100).unwrap();
        assert!(
            by_message(&conn, id).unwrap().is_none(),
            "finished batch kept"
        );
        assert!(
            chunk(&conn, id, "k").unwrap().is_none(),
            "chunks go with it"
        );
        assert!(by_message(&conn, waiting).unwrap().is_some());
    }
}

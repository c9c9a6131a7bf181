//! queue.db's schema (versioned migrations) and how it is opened: through [`sqlite`],
//! with the queue's own busy timeout, sync mode and foreign keys. Existing files open
//! unchanged: a migration, once released, is never edited.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

use super::QueueError;
use crate::config::Synchronous;
use crate::sqlite::{self, OpenError, Spec};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    // 1: messages with their body stored once; one row per recipient; campaign states.
    "CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        queue_id TEXT NOT NULL UNIQUE,
        sender TEXT NOT NULL,
        campaign TEXT,
        source TEXT NOT NULL,
        client TEXT NOT NULL,
        received_at INTEGER NOT NULL,
        size INTEGER NOT NULL,
        body BLOB
    );
    CREATE TABLE recipients (
        id INTEGER PRIMARY KEY,
        message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        address TEXT NOT NULL,
        domain TEXT NOT NULL,
        campaign TEXT,
        state INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt INTEGER NOT NULL,
        lease_until INTEGER,
        last_reply TEXT,
        reason TEXT,
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX recipients_due ON recipients(state, next_attempt) WHERE state = 0;
    CREATE INDEX recipients_message ON recipients(message_id);
    CREATE INDEX recipients_campaign ON recipients(campaign, state);
    CREATE TABLE campaigns (
        name TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        blocked_until INTEGER,
        updated_at INTEGER NOT NULL
    );",
    // 2: responses kept for HTTP Idempotency-Key replays, written in the same
    // transaction as the message they describe.
    "CREATE TABLE idempotency (
        key TEXT PRIMARY KEY,
        status INTEGER NOT NULL,
        body TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX idempotency_created ON idempotency(created_at);",
    // 3: the fingerprint of the request an idempotent response answered, so that the same
    // key with a different request is refused instead of answered with the first response.
    "ALTER TABLE idempotency ADD COLUMN request_sha256 TEXT NOT NULL DEFAULT '';",
    // 4: retention. Lifetime totals of finished recipients live in `counters`, updated in
    // the same transaction as the outcome, so that pruning finished rows loses no count.
    // Status reads touch live rows only (`recipients_live`); retention finds finished
    // ones by age (`recipients_finished`): neither costs anything per row of history.
    "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
    INSERT INTO counters (name, value)
        SELECT 'delivered', COUNT(*) FROM recipients WHERE state = 1;
    INSERT INTO counters (name, value)
        SELECT 'failed', COUNT(*) FROM recipients WHERE state = 2;
    INSERT INTO counters (name, value) VALUES ('pruned_recipients', 0), ('pruned_messages', 0);
    CREATE INDEX recipients_live ON recipients(state, campaign, domain) WHERE state IN (0, 3);
    CREATE INDEX recipients_finished ON recipients(updated_at) WHERE state IN (1, 2);",
    // 5: whether the message was submitted with SMTPUTF8 (RFC 6531), so the
    // relay passes the parameter on or refuses a next hop that lacks it.
    "ALTER TABLE messages ADD COLUMN smtputf8 INTEGER NOT NULL DEFAULT 0;",
    // 6: bodies in their own table, deleted once no recipient waits for them. In the
    // messages table a nulled 1 KiB body left its page full of holes that later (higher
    // rowid) inserts never reuse, so the file held every body within retention; here the
    // oldest pages empty out whole and go back to the free list.
    "CREATE TABLE bodies (
        message_id INTEGER PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
        body BLOB NOT NULL
    );
    INSERT INTO bodies (message_id, body) SELECT id, body FROM messages WHERE body IS NOT NULL;
    ALTER TABLE messages DROP COLUMN body;",
    // 7: message trace and search. Who submitted the message (AUTH user or API key name),
    // and the indexes behind `GET /admin/v1/messages?rcpt=&sender=&campaign=&since=`:
    // each filter is served by an index, never by a scan of the queue.
    "ALTER TABLE messages ADD COLUMN identity TEXT;
    CREATE INDEX recipients_address ON recipients(address);
    CREATE INDEX messages_sender ON messages(sender);
    CREATE INDEX messages_campaign ON messages(campaign);
    CREATE INDEX messages_received ON messages(received_at);",
    // 8: destination-domain holds (an operator's suspension of one domain), persisted so
    // that a restart keeps them; the recipients of a held domain wait in state 3 (held),
    // found by `recipients_domain` for the hold, the release and `ctl retry --domain`.
    "CREATE TABLE domain_holds (domain TEXT PRIMARY KEY, since INTEGER NOT NULL) WITHOUT ROWID;
    CREATE INDEX recipients_domain ON recipients(domain, state);",
    // 9: batch sends. A batch is one message row (its id is the batch id) whose template
    // is stored once in `batches`; each recipient row holds only its variables (`vars`),
    // rendered at delivery. Progress is counters in the batch row, moved in the same
    // transaction as the rows, never a scan. `batch_chunks` holds each Idempotency-Key'd
    // upload's progress (lines done, counts so far) written with its rows, so a retried
    // chunk resumes after the last committed line and queues nothing twice.
    "ALTER TABLE recipients ADD COLUMN vars TEXT;
    CREATE TABLE batches (
        message_id INTEGER PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
        template TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        received INTEGER NOT NULL DEFAULT 0,
        accepted INTEGER NOT NULL DEFAULT 0,
        rejected TEXT NOT NULL DEFAULT '{}',
        delivered INTEGER NOT NULL DEFAULT 0,
        deferred INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        failed_template INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX batches_updated ON batches(updated_at);
    CREATE TABLE batch_chunks (
        message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        key TEXT NOT NULL,
        lines INTEGER NOT NULL,
        progress TEXT NOT NULL,
        response TEXT,
        PRIMARY KEY (message_id, key)
    ) WITHOUT ROWID;",
    // 10: the bounce class of a recipient's last failed or deferred attempt
    // (`crate::bounce::BounceClass` names); NULL before any failure and once delivered.
    "ALTER TABLE recipients ADD COLUMN class TEXT;",
    // 11: a chunk's fingerprint, the SHA-256 (hex) of the lines its progress covers, so a
    // retry under the same Idempotency-Key with other content is refused, not merged.
    // NULL for chunks begun before this migration: they are not compared.
    "ALTER TABLE batch_chunks ADD COLUMN fingerprint TEXT;",
];

/// How long a connection waits for a lock held by another connection.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// queue.db as [`sqlite`] opens it: an acknowledgement waits on its commit, so how hard
/// it syncs is the operator's choice; recipients cascade with their message.
fn spec(synchronous: Synchronous, max_size_mb: u64) -> Spec<'static> {
    Spec {
        name: "queue.db",
        busy_timeout: BUSY_TIMEOUT,
        synchronous: match synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        },
        foreign_keys: true,
        max_size_mb,
        migrations: MIGRATIONS,
    }
}

impl From<OpenError> for QueueError {
    fn from(e: OpenError) -> QueueError {
        match e {
            OpenError::Sqlite(e) => e.into(),
            e @ OpenError::TooNew { .. } => QueueError::Schema(e.to_string()),
        }
    }
}

/// Opens queue.db for writing, applies pragmas and migrations.
pub fn open_writer(
    path: &Path,
    synchronous: Synchronous,
    max_size_mb: u64,
) -> Result<Connection, QueueError> {
    Ok(sqlite::open_writer(path, &spec(synchronous, max_size_mb))?)
}

/// `PRAGMA max_page_count` for a cap in MiB; 0 lifts the cap.
pub fn set_max_size(conn: &Connection, max_size_mb: u64) -> Result<(), QueueError> {
    Ok(sqlite::set_max_size(conn, max_size_mb)?)
}

/// Opens a read-only connection (WAL readers never block the writer).
pub fn open_reader(path: &Path) -> Result<Connection, QueueError> {
    Ok(sqlite::open_reader(path, BUSY_TIMEOUT)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_existing_file_reopens_and_a_newer_one_is_refused_as_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        drop(open_writer(&path, Synchronous::Normal, 0).unwrap());
        let conn = open_writer(&path, Synchronous::Full, 0).unwrap();
        let version: usize = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len());
        conn.pragma_update(None, "user_version", version + 1)
            .unwrap();
        drop(conn);
        let err = open_writer(&path, Synchronous::Normal, 0).unwrap_err();
        assert!(matches!(err, QueueError::Schema(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "queue schema: queue.db has schema version {}, this Floodgate knows {version}: refusing to touch it",
                version + 1
            )
        );
    }

    /// A queue written before bodies had their own table: a waiting message keeps its
    /// body (now in `bodies`), a finished one (body already NULL) gets no row.
    #[test]
    fn bodies_move_to_their_own_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let old = Connection::open(&path).unwrap();
        for m in &MIGRATIONS[..5] {
            old.execute_batch(m).unwrap();
        }
        old.pragma_update(None, "user_version", 5).unwrap();
        old.execute_batch(
            "INSERT INTO messages (id, queue_id, sender, source, client, received_at, size, body)
                 VALUES (1, 'q1', 'a@b.test', 'smtp', 'x', 0, 5, x'68656c6c6f'),
                        (2, 'q2', 'a@b.test', 'smtp', 'x', 0, 5, NULL);",
        )
        .unwrap();
        drop(old);
        let conn = open_writer(&path, Synchronous::Normal, 0).unwrap();
        let bodies: Vec<(i64, Vec<u8>)> = conn
            .prepare("SELECT message_id, body FROM bodies ORDER BY message_id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(bodies, [(1, b"hello".to_vec())]);
        let columns: Vec<String> = conn
            .prepare("SELECT name FROM pragma_table_info('messages')")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(!columns.iter().any(|c| c == "body"), "{columns:?}");
        conn.execute("DELETE FROM messages WHERE id = 1", [])
            .unwrap();
        let left: i64 = conn
            .query_row("SELECT COUNT(*) FROM bodies", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0, "a body goes with its message");
    }
}

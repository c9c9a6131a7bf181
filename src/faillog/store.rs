//! Every SQL statement the failure log runs against failures.db: schema and migrations,
//! the one-transaction flush, retention deletes, and the admin reads. Nothing else in the
//! failure log speaks SQL.

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::{Connection, TransactionBehavior, params_from_iter};

use super::{AggKey, FailLogError, FailureEvent, FailureQuery, FailureRow, StatRow};
use crate::bounce::BounceClass;
use crate::campaign::UNATTRIBUTED;
use crate::reason::{Reason, Stage};
use crate::sqlite::{self, OpenError, Spec};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    // 1: one row per logged event (governed, so bounded per second), and aggregates whose
    // row count per minute is bounded by distinct keys, never by volume. Campaign is never
    // NULL: NULLs are distinct in a PRIMARY KEY, which would defeat the upsert.
    "CREATE TABLE failures (
        id INTEGER PRIMARY KEY,
        at_ms INTEGER NOT NULL,
        campaign TEXT NOT NULL,
        stage TEXT NOT NULL,
        reason TEXT NOT NULL,
        recipient TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX failures_campaign ON failures(campaign, at_ms);
    CREATE INDEX failures_reason ON failures(reason, at_ms);
    CREATE TABLE failure_stats (
        minute INTEGER NOT NULL,
        campaign TEXT NOT NULL,
        stage TEXT NOT NULL,
        reason TEXT NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (minute, campaign, stage, reason)
    );",
    // 2: the bounce class of relay failures (`crate::bounce`), a column of event rows and
    // one more dimension of the aggregates ('' for refusals at the door, so that the
    // primary key's upsert still works). The key changes, so the table is rebuilt.
    "ALTER TABLE failures ADD COLUMN class TEXT NOT NULL DEFAULT '';
    CREATE TABLE failure_stats_v2 (
        minute INTEGER NOT NULL,
        campaign TEXT NOT NULL,
        stage TEXT NOT NULL,
        reason TEXT NOT NULL,
        class TEXT NOT NULL DEFAULT '',
        count INTEGER NOT NULL,
        PRIMARY KEY (minute, campaign, stage, reason, class)
    );
    INSERT INTO failure_stats_v2 (minute, campaign, stage, reason, class, count)
        SELECT minute, campaign, stage, reason, '', count FROM failure_stats;
    DROP TABLE failure_stats;
    ALTER TABLE failure_stats_v2 RENAME TO failure_stats;",
];

/// The writer never waits long for a lock: a busy failures.db costs a failed (counted)
/// flush, never a stalled writer whose channel then overflows for longer.
const WRITER_BUSY_TIMEOUT: Duration = Duration::from_millis(100);
/// Admin reads may wait a little longer; they run on a blocking thread, off the hot path.
const READER_BUSY_TIMEOUT: Duration = Duration::from_secs(1);
/// Rows per retention DELETE: each statement is its own short transaction.
const DELETE_BATCH: i64 = 5_000;
/// Most rows one admin read returns, whatever the caller asks.
pub const MAX_QUERY_ROWS: usize = 10_000;

/// failures.db as [`sqlite`] opens it. A log, not a ledger: losing the last flush in a
/// power cut is acceptable, an fsync per flush is not worth it.
fn spec(max_size_mb: u64) -> Spec<'static> {
    Spec {
        name: "failures.db",
        busy_timeout: WRITER_BUSY_TIMEOUT,
        synchronous: "NORMAL",
        foreign_keys: false,
        max_size_mb,
        migrations: MIGRATIONS,
    }
}

impl From<OpenError> for FailLogError {
    fn from(e: OpenError) -> FailLogError {
        match e {
            OpenError::Sqlite(e) => e.into(),
            OpenError::TooNew { found, known, .. } => FailLogError::Schema { found, known },
        }
    }
}

/// Opens failures.db for writing, applies pragmas and migrations.
pub fn open_writer(path: &Path, max_size_mb: u64) -> Result<Connection, FailLogError> {
    Ok(sqlite::open_writer(path, &spec(max_size_mb))?)
}

/// Opens a read-only connection; WAL readers never block the writer.
pub fn open_reader(path: &Path) -> Result<Connection, FailLogError> {
    Ok(sqlite::open_reader(path, READER_BUSY_TIMEOUT)?)
}

/// The schema on a connection opened elsewhere (the writer's tests use an in-memory
/// database).
#[cfg(test)]
pub fn migrate(conn: &Connection) -> Result<(), FailLogError> {
    Ok(sqlite::migrate(conn, &spec(0))?)
}

/// Stored as '' when there is none (a refusal at the door): a key column cannot be NULL.
fn class_name(class: Option<BounceClass>) -> &'static str {
    class.map_or("", BounceClass::as_str)
}

fn parse_class(name: &str) -> Option<BounceClass> {
    BounceClass::parse(name)
}

fn campaign_name(campaign: &Option<String>) -> &str {
    campaign.as_deref().unwrap_or(UNATTRIBUTED)
}

/// Writes event rows and aggregate upserts in ONE transaction. An error means nothing of
/// it committed: a failed COMMIT leaves the transaction to be rolled back on drop.
pub fn write_batch(
    conn: &mut Connection,
    rows: &[FailureEvent],
    aggs: &[(AggKey, u64)],
) -> rusqlite::Result<()> {
    // IMMEDIATE takes the write lock up front, so a lock held elsewhere fails here, before
    // any work, rather than at COMMIT.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO failures (at_ms, campaign, stage, reason, recipient, detail, class)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for ev in rows {
            insert.execute((
                ev.at_ms,
                campaign_name(&ev.campaign),
                ev.stage.as_str(),
                ev.reason.as_str(),
                &ev.recipient,
                &ev.detail,
                class_name(ev.class),
            ))?;
        }
        let mut upsert = tx.prepare_cached(
            "INSERT INTO failure_stats (minute, campaign, stage, reason, class, count)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (minute, campaign, stage, reason, class)
             DO UPDATE SET count = count + excluded.count",
        )?;
        for (key, count) in aggs {
            upsert.execute((
                key.minute,
                campaign_name(&key.campaign),
                key.stage.as_str(),
                key.reason.as_str(),
                class_name(key.class),
                *count as i64,
            ))?;
        }
    }
    tx.commit()
}

/// What a retention pass removed, and whether it ran out of time before finishing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub rows: u64,
    pub stats: u64,
    pub unfinished: bool,
}

/// Deletes event rows older than `rows_before_ms` or beyond `max_rows` (oldest first), and
/// aggregate rows older than `stats_before_minute`, in batches of autocommit statements,
/// stopping once `budget` is spent so that the writer goes back to flushing.
pub fn prune(
    conn: &Connection,
    rows_before_ms: i64,
    max_rows: u64,
    stats_before_minute: i64,
    budget: Duration,
) -> rusqlite::Result<Pruned> {
    let started = Instant::now();
    let mut out = Pruned::default();
    let over_budget = |out: &mut Pruned| {
        let over = started.elapsed() >= budget;
        out.unfinished |= over;
        over
    };

    // Age: ids grow with arrival, so looking only at the oldest batch by id finds old rows
    // without a full scan (no at_ms index needed). A row that arrived out of order waits
    // for its neighbours; max_rows still bounds the table.
    loop {
        let n = conn.execute(
            "DELETE FROM failures WHERE id IN (
                 SELECT id FROM (SELECT id, at_ms FROM failures ORDER BY id LIMIT ?2)
                 WHERE at_ms < ?1)",
            (rows_before_ms, DELETE_BATCH),
        )? as i64;
        out.rows += n as u64;
        if n < DELETE_BATCH || over_budget(&mut out) {
            break;
        }
    }

    if !out.unfinished {
        let count: i64 = conn.query_row("SELECT count(*) FROM failures", [], |r| r.get(0))?;
        let mut excess = count.saturating_sub(max_rows.min(i64::MAX as u64) as i64);
        while excess > 0 && !over_budget(&mut out) {
            let n = conn.execute(
                "DELETE FROM failures WHERE id IN (SELECT id FROM failures ORDER BY id LIMIT ?1)",
                [excess.min(DELETE_BATCH)],
            )? as i64;
            out.rows += n as u64;
            excess -= n;
            if n == 0 {
                break;
            }
        }
    }

    while !out.unfinished {
        let n = conn.execute(
            "DELETE FROM failure_stats WHERE rowid IN (
                 SELECT rowid FROM failure_stats WHERE minute < ?1 LIMIT ?2)",
            (stats_before_minute, DELETE_BATCH),
        )? as i64;
        out.stats += n as u64;
        if n < DELETE_BATCH || over_budget(&mut out) {
            break;
        }
    }
    Ok(out)
}

pub fn parse_stage(name: &str) -> Result<Stage, FailLogError> {
    match name {
        "intake" => Ok(Stage::Intake),
        "relay" => Ok(Stage::Relay),
        _ => Err(FailLogError::Corrupt {
            what: "stage",
            value: name.to_owned(),
        }),
    }
}

pub fn parse_reason(name: &str) -> Result<Reason, FailLogError> {
    Reason::parse(name).ok_or_else(|| FailLogError::Corrupt {
        what: "reason",
        value: name.to_owned(),
    })
}

/// Event rows matching `q`, newest first (id DESC); `before_id` pages backwards.
pub fn query_failures(
    conn: &Connection,
    q: &FailureQuery,
) -> Result<Vec<FailureRow>, FailLogError> {
    let mut sql = String::from(
        "SELECT id, at_ms, campaign, stage, reason, recipient, detail, class FROM failures WHERE 1",
    );
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    if let Some(c) = &q.campaign {
        args.push(c.clone().into());
        sql.push_str(&format!(" AND campaign = ?{}", args.len()));
    }
    if let Some(r) = q.reason {
        args.push(r.as_str().to_owned().into());
        sql.push_str(&format!(" AND reason = ?{}", args.len()));
    }
    if let Some(since) = q.since_ms {
        args.push(since.into());
        sql.push_str(&format!(" AND at_ms >= ?{}", args.len()));
    }
    if let Some(before) = q.before_id {
        args.push(before.into());
        sql.push_str(&format!(" AND id < ?{}", args.len()));
    }
    args.push((q.limit.min(MAX_QUERY_ROWS) as i64).into());
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", args.len()));

    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.query(params_from_iter(args))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let stage: String = r.get(3)?;
        let reason: String = r.get(4)?;
        out.push(FailureRow {
            id: r.get(0)?,
            at_ms: r.get(1)?,
            campaign: r.get(2)?,
            stage: parse_stage(&stage)?,
            reason: parse_reason(&reason)?,
            recipient: r.get(5)?,
            detail: r.get(6)?,
            class: parse_class(&r.get::<_, String>(7)?),
        });
    }
    Ok(out)
}

/// Aggregate rows from `since_minute` on, oldest minute first.
pub fn query_stats(conn: &Connection, since_minute: i64) -> Result<Vec<StatRow>, FailLogError> {
    let mut stmt = conn.prepare(
        "SELECT minute, campaign, stage, reason, count, class FROM failure_stats
         WHERE minute >= ?1 ORDER BY minute, campaign, stage, reason, class",
    )?;
    let mut rows = stmt.query([since_minute])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let stage: String = r.get(2)?;
        let reason: String = r.get(3)?;
        let count: i64 = r.get(4)?;
        out.push(StatRow {
            minute: r.get(0)?,
            campaign: r.get(1)?,
            stage: parse_stage(&stage)?,
            reason: parse_reason(&reason)?,
            class: parse_class(&r.get::<_, String>(5)?),
            count: count.max(0) as u64,
        });
    }
    Ok(out)
}

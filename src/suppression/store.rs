//! Every SQL statement of `suppressions.db`: schema, upserts, removal, listing with a
//! cursor, and retention of expired entries.

use rusqlite::{Connection, params};

use super::{Entry, Filter, NewEntry, Reason, Scope, Target};

pub(super) const MIGRATIONS: &[&str] = &["CREATE TABLE suppressions (
        id INTEGER PRIMARY KEY,
        scope TEXT NOT NULL,
        target TEXT NOT NULL,
        domain TEXT NOT NULL,
        reason TEXT NOT NULL,
        source TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        UNIQUE (scope, target)
    );
    CREATE INDEX suppressions_domain ON suppressions(domain);
    CREATE INDEX suppressions_target ON suppressions(target);
    CREATE INDEX suppressions_expires ON suppressions(expires_at) WHERE expires_at IS NOT NULL;"];

/// Inserts or refreshes entries (a second add of the same target and scope replaces its
/// reason, source and expiry). Runs inside the caller's transaction.
pub(super) fn upsert(conn: &Connection, entries: &[NewEntry], now_ms: i64) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO suppressions (scope, target, domain, reason, source, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (scope, target) DO UPDATE SET
           reason = excluded.reason, source = excluded.source,
           created_at = excluded.created_at, expires_at = excluded.expires_at",
    )?;
    for e in entries {
        stmt.execute(params![
            e.scope.as_column(),
            e.target.as_column(),
            e.target.domain(),
            e.reason.as_str(),
            e.source,
            now_ms,
            e.expires_ms,
        ])?;
    }
    Ok(())
}

pub(super) fn remove(conn: &Connection, scope: &Scope, target: &Target) -> rusqlite::Result<bool> {
    let n = conn.execute(
        "DELETE FROM suppressions WHERE scope = ?1 AND target = ?2",
        params![scope.as_column(), target.as_column()],
    )?;
    Ok(n > 0)
}

/// Deletes up to `limit` entries expired at `now_ms`; returns them so that the index can
/// forget them too.
pub(super) fn prune(
    conn: &Connection,
    now_ms: i64,
    limit: usize,
) -> rusqlite::Result<Vec<(Scope, Target)>> {
    let mut stmt = conn.prepare_cached(
        "DELETE FROM suppressions WHERE id IN (
           SELECT id FROM suppressions WHERE expires_at IS NOT NULL AND expires_at <= ?1 LIMIT ?2)
         RETURNING scope, target",
    )?;
    let rows = stmt.query_map(params![now_ms, limit as i64], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (scope, target) = row?;
        if let Some(target) = Target::from_column(&target) {
            out.push((Scope::from_column(&scope), target));
        }
    }
    Ok(out)
}

fn entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<Option<Entry>> {
    let target: String = r.get(2)?;
    let reason: String = r.get(3)?;
    let (Some(target), Some(reason)) = (Target::from_column(&target), Reason::parse(&reason))
    else {
        return Ok(None);
    };
    Ok(Some(Entry {
        id: r.get(0)?,
        scope: Scope::from_column(&r.get::<_, String>(1)?),
        target,
        reason,
        source: r.get(4)?,
        created_ms: r.get(5)?,
        expires_ms: r.get(6)?,
    }))
}

const COLUMNS: &str = "id, scope, target, reason, source, created_at, expires_at";

/// One page of entries after `cursor` (an id), oldest first, served from indexes.
pub(super) fn list(
    conn: &Connection,
    filter: &Filter,
    now_ms: i64,
) -> rusqlite::Result<Vec<Entry>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM suppressions
         WHERE id > ?1
           AND (?2 IS NULL OR target = ?2)
           AND (?3 IS NULL OR domain = ?3)
           AND (?4 IS NULL OR reason = ?4)
           AND (?5 IS NULL OR scope = ?5)
           AND (expires_at IS NULL OR expires_at > ?6)
         ORDER BY id LIMIT ?7"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(
        params![
            filter.cursor.unwrap_or(0),
            filter.target.as_ref().map(Target::as_column),
            filter.domain,
            filter.reason.map(Reason::as_str),
            filter.scope.as_ref().map(Scope::as_column),
            now_ms,
            filter.limit as i64,
        ],
        entry,
    )?;
    let mut out = Vec::new();
    for row in rows {
        out.extend(row?);
    }
    Ok(out)
}

/// Every live entry naming `target`, in any scope.
pub(super) fn get(conn: &Connection, target: &Target, now_ms: i64) -> rusqlite::Result<Vec<Entry>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM suppressions
         WHERE target = ?1 AND (expires_at IS NULL OR expires_at > ?2) ORDER BY id"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params![target.as_column(), now_ms], entry)?;
    let mut out = Vec::new();
    for row in rows {
        out.extend(row?);
    }
    Ok(out)
}

/// Calls `each` for every live entry, in batches read by id so that an export of a
/// million entries never holds them all.
pub(super) fn for_each_live(
    conn: &Connection,
    now_ms: i64,
    mut each: impl FnMut(&str, &str, Option<i64>),
) -> rusqlite::Result<u64> {
    let mut stmt = conn.prepare(
        "SELECT scope, target, expires_at FROM suppressions
         WHERE expires_at IS NULL OR expires_at > ?1",
    )?;
    let mut rows = stmt.query(params![now_ms])?;
    let mut n = 0;
    while let Some(r) = rows.next()? {
        let scope: String = r.get(0)?;
        let target: String = r.get(1)?;
        each(&scope, &target, r.get(2)?);
        n += 1;
    }
    Ok(n)
}

pub(super) fn count(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row("SELECT COUNT(*) FROM suppressions", [], |r| r.get(0))
}

//! sts.db: the MTA-STS policies fetched (so that a restart does not refetch them, and a
//! failed fetch falls back to the cached policy, RFC 8461 §5) and the TLS-RPT counters
//! per recipient domain and UTC day (RFC 8460), with the record of reports sent.
//!
//! Its own small file rather than tables in queue.db: policy writes and counter flushes
//! happen on the delivery path's side, and must never wait behind (or delay) the queue
//! writer's group commits that every acknowledgement waits on. Losing the last seconds of
//! it on power loss costs a refetch or a few uncounted sessions, so it syncs `NORMAL`.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use crate::sqlite::{OpenError, Spec};

const MIGRATIONS: &[&str] = &["CREATE TABLE policies (
        domain TEXT PRIMARY KEY,
        id TEXT NOT NULL,
        body TEXT NOT NULL,
        fetched_ms INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL
    );
    CREATE TABLE tls_counts (
        day TEXT NOT NULL,
        domain TEXT NOT NULL,
        policy_type TEXT NOT NULL,
        result TEXT NOT NULL,
        mx TEXT NOT NULL,
        ip TEXT NOT NULL,
        sessions INTEGER NOT NULL,
        PRIMARY KEY (day, domain, policy_type, result, mx, ip)
    );
    CREATE TABLE tls_reports (
        day TEXT NOT NULL,
        domain TEXT NOT NULL,
        sent_ms INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        PRIMARY KEY (day, domain)
    );"];

fn spec() -> Spec<'static> {
    Spec {
        name: "sts.db",
        busy_timeout: Duration::from_secs(5),
        synchronous: "NORMAL",
        foreign_keys: false,
        // Bounded by retention and the number of domains delivered to; the cap is a
        // backstop against a bug, not a limit anyone should reach.
        max_size_mb: 256,
        migrations: MIGRATIONS,
    }
}

pub fn open(path: &Path) -> Result<Connection, OpenError> {
    crate::sqlite::open_writer(path, &spec())
}

/// A policy as stored: its TXT id, the policy file's text, and when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRow {
    pub domain: String,
    pub id: String,
    pub body: String,
    pub fetched_ms: i64,
    pub expires_ms: i64,
}

/// One counter: sessions of one result with one MX host on one day.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CountKey {
    pub day: String,
    pub domain: String,
    /// `sts` or `no-policy-found` (RFC 8460 §4.4).
    pub policy_type: &'static str,
    /// `success` or an RFC 8460 §4.3 result type.
    pub result: &'static str,
    /// The MX host name (empty for failures before any host, like a policy fetch).
    pub mx: String,
    pub ip: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountRow {
    pub day: String,
    pub domain: String,
    pub policy_type: String,
    pub result: String,
    pub mx: String,
    pub ip: String,
    pub sessions: u64,
}

pub fn unexpired_policies(
    conn: &Connection,
    now_ms: i64,
    limit: usize,
) -> rusqlite::Result<Vec<PolicyRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT domain, id, body, fetched_ms, expires_ms FROM policies
         WHERE expires_ms > ?1 ORDER BY expires_ms DESC LIMIT ?2",
    )?;
    stmt.query_map(params![now_ms, limit as i64], policy_row)?
        .collect()
}

pub fn policy(conn: &Connection, domain: &str, now_ms: i64) -> rusqlite::Result<Option<PolicyRow>> {
    conn.prepare_cached(
        "SELECT domain, id, body, fetched_ms, expires_ms FROM policies
         WHERE domain = ?1 AND expires_ms > ?2",
    )?
    .query_row(params![domain, now_ms], policy_row)
    .optional()
}

fn policy_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PolicyRow> {
    Ok(PolicyRow {
        domain: r.get(0)?,
        id: r.get(1)?,
        body: r.get(2)?,
        fetched_ms: r.get(3)?,
        expires_ms: r.get(4)?,
    })
}

pub fn put_policy(conn: &Connection, row: &PolicyRow) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO policies (domain, id, body, fetched_ms, expires_ms) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (domain) DO UPDATE SET id = excluded.id, body = excluded.body,
             fetched_ms = excluded.fetched_ms, expires_ms = excluded.expires_ms",
    )?
    .execute(params![
        row.domain,
        row.id,
        row.body,
        row.fetched_ms,
        row.expires_ms
    ])?;
    Ok(())
}

/// Adds `counts` to the stored counters in one transaction.
pub fn add_counts(conn: &mut Connection, counts: &[(CountKey, u64)]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO tls_counts (day, domain, policy_type, result, mx, ip, sessions)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (day, domain, policy_type, result, mx, ip)
             DO UPDATE SET sessions = sessions + excluded.sessions",
        )?;
        for (k, n) in counts {
            stmt.execute(params![
                k.day,
                k.domain,
                k.policy_type,
                k.result,
                k.mx,
                k.ip,
                *n as i64
            ])?;
        }
    }
    tx.commit()
}

/// The counters, newest day first, of `domain` if given, at most `limit` rows.
pub fn counts(
    conn: &Connection,
    domain: Option<&str>,
    day: Option<&str>,
    limit: usize,
) -> rusqlite::Result<Vec<CountRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT day, domain, policy_type, result, mx, ip, sessions FROM tls_counts
         WHERE (?1 IS NULL OR domain = ?1) AND (?2 IS NULL OR day = ?2)
         ORDER BY day DESC, domain, policy_type, result, mx, ip LIMIT ?3",
    )?;
    stmt.query_map(params![domain, day, limit as i64], |r| {
        Ok(CountRow {
            day: r.get(0)?,
            domain: r.get(1)?,
            policy_type: r.get(2)?,
            result: r.get(3)?,
            mx: r.get(4)?,
            ip: r.get(5)?,
            sessions: r.get::<_, i64>(6)?.max(0) as u64,
        })
    })?
    .collect()
}

/// `(day, domain)` pairs with counters before `today` and no report recorded yet, oldest
/// first, at most `limit`.
pub fn unreported(
    conn: &Connection,
    today: &str,
    limit: usize,
) -> rusqlite::Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT c.day, c.domain FROM tls_counts c
         WHERE c.day < ?1 AND NOT EXISTS
             (SELECT 1 FROM tls_reports r WHERE r.day = c.day AND r.domain = c.domain)
         ORDER BY c.day, c.domain LIMIT ?2",
    )?;
    stmt.query_map(params![today, limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect()
}

pub fn mark_reported(
    conn: &Connection,
    day: &str,
    domain: &str,
    now_ms: i64,
    outcome: &str,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO tls_reports (day, domain, sent_ms, outcome) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![day, domain, now_ms, outcome])?;
    Ok(())
}

/// The reports recorded for `day` (all days when `None`), newest first.
pub fn reports(
    conn: &Connection,
    domain: Option<&str>,
    limit: usize,
) -> rusqlite::Result<Vec<(String, String, i64, String)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT day, domain, sent_ms, outcome FROM tls_reports
         WHERE (?1 IS NULL OR domain = ?1) ORDER BY day DESC, domain LIMIT ?2",
    )?;
    stmt.query_map(params![domain, limit as i64], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
    })?
    .collect()
}

/// Retention: counters and report records of days before `before_day`, and policies
/// expired at `now_ms`. Returns the rows deleted.
pub fn prune(conn: &Connection, before_day: &str, now_ms: i64) -> rusqlite::Result<usize> {
    let mut n = conn.execute("DELETE FROM tls_counts WHERE day < ?1", [before_day])?;
    n += conn.execute("DELETE FROM tls_reports WHERE day < ?1", [before_day])?;
    n += conn.execute("DELETE FROM policies WHERE expires_ms <= ?1", [now_ms])?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(day: &str, result: &'static str) -> CountKey {
        CountKey {
            day: day.into(),
            domain: "a.test".into(),
            policy_type: "sts",
            result,
            mx: "mx.a.test".into(),
            ip: "127.0.0.1".into(),
        }
    }

    #[test]
    fn counters_add_up_and_unreported_days_are_found_then_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("sts.db")).unwrap();
        add_counts(&mut conn, &[(key("2026-12-01", "success"), 2)]).unwrap();
        add_counts(
            &mut conn,
            &[
                (key("2026-12-01", "success"), 3),
                (key("2026-12-02", "starttls-not-supported"), 1),
            ],
        )
        .unwrap();
        let rows = counts(&conn, Some("a.test"), Some("2026-12-01"), 10).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].sessions, 5);
        assert_eq!(
            unreported(&conn, "2026-12-02", 10).unwrap(),
            vec![("2026-12-01".to_string(), "a.test".to_string())],
            "today is not reported yet"
        );
        mark_reported(&conn, "2026-12-01", "a.test", 1, "sent").unwrap();
        assert!(unreported(&conn, "2026-12-03", 10).unwrap().len() == 1);
        assert_eq!(prune(&conn, "2026-12-02", 0).unwrap(), 2);
        assert_eq!(counts(&conn, None, None, 10).unwrap().len(), 1);
    }

    #[test]
    fn policies_expire() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join("sts.db")).unwrap();
        let row = PolicyRow {
            domain: "a.test".into(),
            id: "1".into(),
            body: "x".into(),
            fetched_ms: 0,
            expires_ms: 100,
        };
        put_policy(&conn, &row).unwrap();
        assert_eq!(policy(&conn, "a.test", 99).unwrap(), Some(row.clone()));
        assert_eq!(policy(&conn, "a.test", 100).unwrap(), None);
        assert_eq!(unexpired_policies(&conn, 50, 10).unwrap(), vec![row]);
    }
}

//! Opening Floodgate's SQLite files: one writer connection per database with its pragmas
//! and versioned migrations, and read-only connections beside it. The databases differ
//! on purpose (how long a writer waits for a lock, how hard it syncs); those differences
//! are the parameters here, everything else is the same code.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

/// How one database is opened.
#[derive(Debug, Clone, Copy)]
pub struct Spec<'a> {
    /// The file's name in messages ("queue.db").
    pub name: &'a str,
    /// How long the writer waits for a lock held by another process.
    pub busy_timeout: Duration,
    /// `PRAGMA synchronous`: "FULL" where an acknowledgement depends on the commit.
    pub synchronous: &'static str,
    pub foreign_keys: bool,
    /// 0: no cap; otherwise `PRAGMA max_page_count` so that the file stops at this size
    /// (SQLite then reports SQLITE_FULL, exactly as for a full disk).
    pub max_size_mb: u64,
    /// Applied in order; `PRAGMA user_version` records how many ran.
    pub migrations: &'a [&'a str],
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// The file was written by a newer Floodgate.
    #[error(
        "{name} has schema version {found}, this Floodgate knows {known}: refusing to touch it"
    )]
    TooNew {
        name: String,
        found: usize,
        known: usize,
    },
}

/// Opens `path` for writing in WAL mode, sets the pragmas and runs pending migrations.
pub fn open_writer(path: &Path, spec: &Spec<'_>) -> Result<Connection, OpenError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(spec.busy_timeout)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", spec.synchronous)?;
    // Sub-journals (the writers' savepoint per operation) and temporary tables in memory:
    // otherwise every savepoint copies the pages it touches into a temporary file, a
    // write syscall per page per operation (10% of the queue writer's CPU in a profile).
    // Durability is the WAL's and untouched; these files never outlive the transaction.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    if spec.foreign_keys {
        conn.pragma_update(None, "foreign_keys", "ON")?;
    }
    set_max_size(&conn, spec.max_size_mb)?;
    migrate(&conn, spec)?;
    Ok(conn)
}

/// Caps the file at `max_size_mb` (0 lifts the cap). Safe to call on a live writer.
pub fn set_max_size(conn: &Connection, max_size_mb: u64) -> Result<(), rusqlite::Error> {
    // SQLite's own ceiling on the page count: "no cap".
    const NO_CAP: u64 = 4_294_967_294;
    let pages = if max_size_mb == 0 {
        NO_CAP
    } else {
        let page_size: u64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        (max_size_mb * 1024 * 1024 / page_size.max(512)).min(NO_CAP)
    };
    conn.pragma_update(None, "max_page_count", pages)
}

/// A read-only connection: WAL readers never block the writer.
pub fn open_reader(path: &Path, busy_timeout: Duration) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy_timeout)?;
    Ok(conn)
}

/// Runs the migrations `conn` has not seen yet, each in its own transaction with the
/// version it reaches; refuses a file from a newer Floodgate.
pub fn migrate(conn: &Connection, spec: &Spec<'_>) -> Result<(), OpenError> {
    let version: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > spec.migrations.len() {
        return Err(OpenError::TooNew {
            name: spec.name.to_owned(),
            found: version,
            known: spec.migrations.len(),
        });
    }
    for (i, sql) in spec.migrations.iter().enumerate().skip(version) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &[&str] = &["CREATE TABLE t (x INTEGER);"];
    const V2: &[&str] = &["CREATE TABLE t (x INTEGER);", "ALTER TABLE t ADD y TEXT;"];

    fn spec(migrations: &'static [&'static str]) -> Spec<'static> {
        Spec {
            name: "test.db",
            busy_timeout: Duration::from_millis(100),
            synchronous: "NORMAL",
            foreign_keys: true,
            max_size_mb: 0,
            migrations,
        }
    }

    #[test]
    fn migrations_run_once_in_order_and_newer_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.db");
        drop(open_writer(&path, &spec(V1)).unwrap());
        let conn = open_writer(&path, &spec(V2)).unwrap();
        conn.execute("INSERT INTO t (x, y) VALUES (1, 'a')", [])
            .unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        drop(conn);
        let err = open_writer(&path, &spec(V1)).unwrap_err();
        assert!(
            matches!(
                err,
                OpenError::TooNew {
                    found: 2,
                    known: 1,
                    ..
                }
            ),
            "{err}"
        );
        let reader = open_reader(&path, Duration::from_millis(100)).unwrap();
        assert!(reader.execute("DELETE FROM t", []).is_err());
    }

    #[test]
    fn the_size_cap_reports_a_full_disk() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer(
            &dir.path().join("cap.db"),
            &Spec {
                max_size_mb: 1,
                ..spec(V1)
            },
        )
        .unwrap();
        conn.execute_batch("CREATE TABLE blob (b BLOB)").unwrap();
        let big = vec![0u8; 256 * 1024];
        let full = (0..16).find_map(|_| conn.execute("INSERT INTO blob VALUES (?1)", [&big]).err());
        let code = full.and_then(|e| e.sqlite_error_code());
        assert_eq!(code, Some(rusqlite::ffi::ErrorCode::DiskFull));
        set_max_size(&conn, 0).unwrap();
        conn.execute("INSERT INTO blob VALUES (?1)", [&big])
            .unwrap();
    }
}

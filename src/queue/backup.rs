//! Online backup: a consistent copy of queue.db (and failures.db) taken with `VACUUM
//! INTO` on a connection of its own, while intake and delivery go on. The copy is one
//! read transaction's snapshot (WAL readers never block the writer), so it holds every
//! message whose commit came before it began, and so every one acknowledged before the
//! backup was asked for. The copy is checked with `PRAGMA integrity_check` before the
//! answer says it is good.
//!
//! Where copies go is fixed by the operator (`[queue] backup_dir`): the admin API names
//! only a new folder in it, never a path of its own choosing, and never an existing one,
//! so a leaked admin token cannot turn the daemon into a writer of arbitrary files.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use super::QueueError;
use crate::admin_api as api;

/// Why a backup was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The name is not a plain folder name inside the backup folder (the API's 400).
    #[error("{0}")]
    Name(String),
    /// The folder exists already (the API's 409).
    #[error("{0} exists already: a backup never overwrites")]
    Exists(String),
    #[error("backup failed: {0}")]
    Failed(String),
}

impl From<rusqlite::Error> for BackupError {
    fn from(e: rusqlite::Error) -> BackupError {
        BackupError::Failed(e.to_string())
    }
}

impl From<QueueError> for BackupError {
    fn from(e: QueueError) -> BackupError {
        BackupError::Failed(e.to_string())
    }
}

/// The backup folder `name` stands for: a plain name (letters, digits, `.`, `_`, `-`;
/// not starting with a dot) in `backup_dir`, or an absolute path whose parent is
/// `backup_dir`.
pub fn resolve(backup_dir: &Path, name: &str) -> Result<PathBuf, BackupError> {
    let path = Path::new(name);
    let (parent, leaf) = match (path.parent(), path.file_name().and_then(|f| f.to_str())) {
        (Some(p), Some(leaf)) if path.is_absolute() => (Some(p), leaf),
        _ => (None, name),
    };
    let plain = !leaf.is_empty()
        && leaf.len() <= 128
        && !leaf.starts_with('.')
        && leaf
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !plain {
        return Err(BackupError::Name(format!(
            "backup name `{}`: a plain folder name (letters, digits, . _ -) in {}",
            name.escape_debug(),
            backup_dir.display()
        )));
    }
    if let Some(parent) = parent {
        let same = match (parent.canonicalize(), backup_dir.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => parent == backup_dir,
        };
        if !same {
            return Err(BackupError::Name(format!(
                "backup {}: backups go in [queue] backup_dir ({})",
                name.escape_debug(),
                backup_dir.display()
            )));
        }
    }
    Ok(backup_dir.join(leaf))
}

/// Creates the backup folder `dir` (its parent as well, owner-only), refusing one that
/// exists.
pub fn create_folder(dir: &Path) -> Result<(), BackupError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let fail = |e: std::io::Error| BackupError::Failed(format!("{}: {e}", dir.display()));
    if let Some(parent) = dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(fail)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(BackupError::Exists(dir.display().to_string()));
        }
        Err(e) => return Err(fail(e)),
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(fail)
}

/// Copies the database at `src` to `dest` (a new file) and checks the copy.
pub fn copy(src: &Path, dest: &Path) -> Result<api::BackupFile, BackupError> {
    let conn = Connection::open_with_flags(
        src,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let target = dest
        .to_str()
        .ok_or_else(|| BackupError::Name(format!("{} is not UTF-8", dest.display())))?;
    conn.execute("VACUUM INTO ?1", [target])?;
    drop(conn);
    let copy = Connection::open_with_flags(dest, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let integrity: String = copy.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    let bytes = std::fs::metadata(dest)
        .map_err(|e| BackupError::Failed(format!("{}: {e}", dest.display())))?
        .len();
    Ok(api::BackupFile {
        path: dest.display().to_string(),
        bytes,
        integrity,
    })
}

/// A whole backup: the new folder `dir`, queue.db (`queue_db`) copied into it and
/// checked, failures.db too when given; blocking.
pub fn run(
    queue_db: &Path,
    dir: &Path,
    failures_db: Option<&Path>,
) -> Result<api::BackupResponse, BackupError> {
    let started = std::time::Instant::now();
    create_folder(dir)?;
    let queue = copy(queue_db, &dir.join("queue.db"))?;
    let failures = match failures_db {
        Some(f) => Some(copy(f, &dir.join("failures.db"))?),
        None => None,
    };
    let (messages, queued_recipients) = contents(&dir.join("queue.db"))?;
    Ok(api::BackupResponse {
        dir: dir.display().to_string(),
        queue,
        failures,
        messages,
        queued_recipients,
        took_ms: started.elapsed().as_millis() as u64,
    })
}

/// Messages, and recipients still waiting, in a copy of queue.db.
pub fn contents(queue_copy: &Path) -> Result<(u64, u64), BackupError> {
    let conn = Connection::open_with_flags(queue_copy, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let messages: i64 = conn.query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))?;
    let queued: i64 = conn.query_row(
        "SELECT COUNT(*) FROM recipients WHERE state IN (0, 3)",
        [],
        |r| r.get(0),
    )?;
    Ok((messages.max(0) as u64, queued.max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_inside_the_backup_folder() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        assert_eq!(
            resolve(base, "nightly-2026-12-02").unwrap(),
            base.join("nightly-2026-12-02")
        );
        let inside = base.join("x.1");
        assert_eq!(resolve(base, inside.to_str().unwrap()).unwrap(), inside);
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../etc",
            "/etc/cron.d",
            "a\nb",
            "a b",
            "/",
            "x\0y",
        ] {
            assert!(
                matches!(resolve(base, bad), Err(BackupError::Name(_))),
                "{bad:?} accepted"
            );
        }
        let elsewhere = tempfile::tempdir().unwrap();
        let outside = elsewhere.path().join("copy");
        assert!(matches!(
            resolve(base, outside.to_str().unwrap()),
            Err(BackupError::Name(_))
        ));
    }

    proptest::proptest! {
        /// Whatever the name, the folder is inside the backup folder or refused.
        #[test]
        fn every_accepted_name_stays_inside(name in "\\PC{0,60}") {
            let base = Path::new("/var/lib/floodgate/backups");
            if let Ok(p) = resolve(base, &name) {
                proptest::prop_assert_eq!(p.parent(), Some(base));
                proptest::prop_assert!(!p.file_name().unwrap().to_string_lossy().starts_with('.'));
            }
        }
    }

    #[test]
    fn a_folder_is_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("backups").join("one");
        create_folder(&target).unwrap();
        assert!(matches!(
            create_folder(&target),
            Err(BackupError::Exists(_))
        ));
    }

    #[test]
    fn the_copy_holds_what_was_committed_and_passes_the_check() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("queue.db");
        let conn =
            super::super::store::open_writer(&src, crate::config::Synchronous::Normal, 0).unwrap();
        conn.execute_batch(
            "INSERT INTO messages (queue_id, sender, source, client, received_at, size)
                 VALUES ('q1', 'a@b.test', 'smtp', 'x', 0, 1);
             INSERT INTO recipients (message_id, address, domain, next_attempt, updated_at)
                 VALUES (1, 'u@d.test', 'd.test', 0, 0);",
        )
        .unwrap();
        let dest = dir.path().join("copy.db");
        let file = copy(&src, &dest).unwrap();
        assert_eq!(file.integrity, "ok");
        assert!(file.bytes > 0);
        assert_eq!(contents(&dest).unwrap(), (1, 1));
        assert!(
            copy(&src, &dest).is_err(),
            "VACUUM INTO refuses an existing file"
        );
    }
}

//! The admin token: either `[admin] token` from the config, or one generated at first
//! start into the state directory (`<[queue] dir>/admin.token`, mode 0600), which
//! `floodgate ctl` reads when given no token. A shipped config therefore never carries a
//! token anyone can read in the repository.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The token shipped in the sample config of earlier releases: known to everyone.
pub const PLACEHOLDER: &str = "change-me-to-a-long-random-string";
/// Shortest token accepted in the config.
pub const MIN_LEN: usize = 24;
/// The token file's name inside `[queue] dir`.
pub const FILE: &str = "admin.token";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot create the admin token file {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the admin token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the admin token file {path} is readable by others (mode {mode:o}); make it 0600 or delete it to get a new one"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("the admin token file {path} holds no usable token; delete it to get a new one")]
    Bad { path: PathBuf },
}

/// Why a configured token is refused, or `None` when it is acceptable.
pub fn refusal(token: &str) -> Option<String> {
    if token == PLACEHOLDER {
        return Some(
            "is the placeholder from the sample config, known to anyone: remove the line to have a random one generated, or set your own".into(),
        );
    }
    if token.chars().count() < MIN_LEN {
        return Some(format!(
            "must be at least {MIN_LEN} characters (or remove it to have one generated)"
        ));
    }
    None
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// Reads the token file in `state_dir`, if there is one.
pub fn read(state_dir: &Path) -> Result<Option<String>, TokenError> {
    let path = path(state_dir);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(TokenError::Read { path, source }),
    };
    let mode = file
        .metadata()
        .map_err(|source| TokenError::Read {
            path: path.clone(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(TokenError::Exposed {
            path,
            mode: mode & 0o777,
        });
    }
    let text = std::io::read_to_string(file).map_err(|source| TokenError::Read {
        path: path.clone(),
        source,
    })?;
    let token = text.trim().to_owned();
    if refusal(&token).is_some() {
        return Err(TokenError::Bad { path });
    }
    Ok(Some(token))
}

/// The token in `state_dir`, generated first if there is none. Creation is atomic: the
/// token is written to a private temporary file that is then linked into place, so a
/// reader never sees a partial token and two starts never both win.
pub fn load_or_create(state_dir: &Path) -> Result<(String, bool), TokenError> {
    if let Some(token) = read(state_dir)? {
        return Ok((token, false));
    }
    let path = path(state_dir);
    let create = |source| TokenError::Create {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(state_dir).map_err(create)?;
    let bytes: [u8; 32] = rand::random();
    let token = format!("fga_{}", hex::encode(bytes));
    let tmp = state_dir.join(format!(".{FILE}.{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(create)?;
    let written = file
        .write_all(format!("{token}\n").as_bytes())
        .and_then(|()| file.sync_all());
    drop(file);
    // `hard_link` fails if the name exists: another start won the race; use its token.
    let linked = written.and_then(|()| std::fs::hard_link(&tmp, &path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok((token, true)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match read(state_dir)? {
            Some(token) => Ok((token, false)),
            None => Err(TokenError::Bad { path }),
        },
        Err(e) => Err(create(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_and_short_tokens_are_refused() {
        assert!(refusal(PLACEHOLDER).is_some());
        assert!(refusal("0123456789abcdef").is_some());
        assert!(refusal("0123456789abcdef01234567").is_none());
    }

    #[test]
    fn a_generated_token_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let (token, created) = load_or_create(dir.path()).unwrap();
        assert!(created);
        let mode = std::fs::metadata(path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create(dir.path()).unwrap(), (token, false));
    }
}

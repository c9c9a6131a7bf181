//! SMTP AUTH (RFC 4954): the PLAIN and LOGIN exchanges, and password checks against the
//! Argon2 hashes in `[[smtp.users]]`.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use crate::config::UserConfig;

/// Where an AUTH exchange stands between two client lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// PLAIN sent without an initial response: waiting for it.
    PlainResponse,
    /// LOGIN: waiting for the user name.
    LoginUser,
    /// LOGIN: waiting for the password of this user.
    LoginPassword(String),
}

/// What a client line contributes to the exchange.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// Send this `334` challenge (already base64) and wait for the next line.
    Challenge(&'static str, Step),
    /// Credentials are complete: verify them.
    Credentials { user: String, password: String },
    /// The client sent `*`.
    Cancelled,
    /// Not valid base64 or not the expected shape.
    Malformed,
}

pub const USERNAME_CHALLENGE: &str = "VXNlcm5hbWU6";
pub const PASSWORD_CHALLENGE: &str = "UGFzc3dvcmQ6";

/// The first step of `AUTH PLAIN [initial]` / `AUTH LOGIN [initial]`.
pub fn start(plain: bool, initial: &str) -> Progress {
    match (plain, initial.is_empty()) {
        (true, true) => Progress::Challenge("", Step::PlainResponse),
        (true, false) => decode_plain(initial),
        (false, true) => Progress::Challenge(USERNAME_CHALLENGE, Step::LoginUser),
        (false, false) => advance(Step::LoginUser, initial),
    }
}

/// Feeds one client line into the exchange.
pub fn advance(step: Step, line: &str) -> Progress {
    let line = line.trim();
    if line == "*" {
        return Progress::Cancelled;
    }
    match step {
        Step::PlainResponse => decode_plain(line),
        Step::LoginUser => match decode_text(line) {
            Some(user) => Progress::Challenge(PASSWORD_CHALLENGE, Step::LoginPassword(user)),
            None => Progress::Malformed,
        },
        Step::LoginPassword(user) => match decode_text(line) {
            Some(password) => Progress::Credentials { user, password },
            None => Progress::Malformed,
        },
    }
}

fn decode_text(b64: &str) -> Option<String> {
    B64.decode(b64.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
}

/// PLAIN carries `authzid NUL authcid NUL password` (RFC 4616).
fn decode_plain(b64: &str) -> Progress {
    let Some(text) = decode_text(b64) else {
        return Progress::Malformed;
    };
    let mut parts = text.split('\0');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(_authzid), Some(user), Some(password), None) if !user.is_empty() => {
            Progress::Credentials {
                user: user.to_owned(),
                password: password.to_owned(),
            }
        }
        _ => Progress::Malformed,
    }
}

/// Checks a password against the configured users. Argon2 is deliberately slow: call
/// it off the async threads.
pub fn verify(users: &[UserConfig], user: &str, password: &str) -> bool {
    let Some(entry) = users.iter().find(|u| u.name == user) else {
        // Spend the same effort for unknown users so timing does not reveal who exists.
        let _ = Argon2::default().hash_password(
            password.as_bytes(),
            &SaltString::from_b64("c29tZXNhbHRzb21lc2FsdA").expect("static salt"),
        );
        return false;
    };
    PasswordHash::new(&entry.password_hash)
        .map(|hash| {
            Argon2::default()
                .verify_password(password.as_bytes(), &hash)
                .is_ok()
        })
        .unwrap_or(false)
}

/// An Argon2id PHC string for `password`, for `floodgate hash-password`.
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default parameters")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_login_exchanges() {
        let initial = B64.encode("\0alice\0secret");
        assert_eq!(
            start(true, &initial),
            Progress::Credentials {
                user: "alice".into(),
                password: "secret".into()
            }
        );
        let Progress::Challenge(c, step) = start(false, "") else {
            panic!()
        };
        assert_eq!(c, USERNAME_CHALLENGE);
        let Progress::Challenge(c, step) = advance(step, &B64.encode("bob")) else {
            panic!()
        };
        assert_eq!(c, PASSWORD_CHALLENGE);
        assert_eq!(
            advance(step, &B64.encode("pw")),
            Progress::Credentials {
                user: "bob".into(),
                password: "pw".into()
            }
        );
        assert_eq!(advance(Step::PlainResponse, "*"), Progress::Cancelled);
        assert_eq!(
            advance(Step::PlainResponse, "!!notbase64"),
            Progress::Malformed
        );
        assert_eq!(start(true, &B64.encode("no-nuls")), Progress::Malformed);
    }

    #[test]
    fn verify_against_hash() {
        let users = vec![UserConfig {
            name: "app".into(),
            password_hash: hash_password("s3cret"),
        }];
        assert!(verify(&users, "app", "s3cret"));
        assert!(!verify(&users, "app", "wrong"));
        assert!(!verify(&users, "nobody", "s3cret"));
    }
}

//! DKIM signing (RFC 6376, Ed25519 by RFC 8463) of what Floodgate sends: keys loaded from
//! `[[dkim]]` tables and chosen by the `From:` header's domain, one signature per key so
//! that a domain can sign with RSA and Ed25519 at once; and `dkim-keygen`, which writes a
//! new key and prints the DNS record to publish. Signing and canonicalisation are
//! mail-auth's (Stalwart's), on the same aws-lc-rs backend as Floodgate's TLS.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{DkimSigner, Done};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;

use crate::config::{DkimAlgorithm, DkimConfig};

mod signing;
pub use signing::{Signing, SigningStats};

/// Headers signed by default. Those that must not be added to a signed message are
/// listed twice: the second, absent instance is signed as empty (RFC 6376 §8.15,
/// "oversigning"), so nobody can add a second `From:` or `Subject:` on the way.
pub const DEFAULT_HEADERS: &[&str] = &[
    "From",
    "From",
    "Reply-To",
    "Reply-To",
    "Subject",
    "Subject",
    "Date",
    "Date",
    "To",
    "To",
    "Cc",
    "Cc",
    "Message-ID",
    "Message-ID",
    "MIME-Version",
    "MIME-Version",
    "Content-Type",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-Transfer-Encoding",
    "List-Unsubscribe",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Unsubscribe-Post",
    "In-Reply-To",
    "References",
    "Sender",
];

/// Smallest RSA key accepted; below it receivers treat the signature as absent.
pub const MIN_RSA_BITS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error("{path}: {why}")]
    Key { path: String, why: String },
    #[error("{path}: readable by group or others (mode {mode:o}); chmod 600 it")]
    Exposed { path: String, mode: u32 },
    #[error("{path}: RSA key of {bits} bits; at least {MIN_RSA_BITS} are required")]
    Weak { path: String, bits: usize },
    #[error("signing failed: {0}")]
    Sign(String),
    #[error("{path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

enum Key {
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
    Ed25519(DkimSigner<Ed25519Key, Done>),
}

/// One configured key.
struct Signer {
    /// The domain the table names: exact, or `*.suffix` for every subdomain.
    pattern: String,
    key: Key,
}

impl Signer {
    fn covers(&self, from_domain: &str) -> bool {
        match self.pattern.strip_prefix("*.") {
            Some(suffix) => from_domain
                .strip_suffix(suffix)
                .is_some_and(|head| head.ends_with('.') && head.len() > 1),
            None => self.pattern == from_domain,
        }
    }

    fn sign(&self, message: &[u8]) -> Result<String, DkimError> {
        let signature = match &self.key {
            Key::Rsa(s) => s.sign(message),
            Key::Ed25519(s) => s.sign(message),
        }
        .map_err(|e| DkimError::Sign(e.to_string()))?;
        Ok(signature.to_header())
    }
}

/// Every configured key, ready to sign.
#[derive(Default)]
pub struct Signers {
    signers: Vec<Signer>,
}

impl std::fmt::Debug for Signers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.signers.iter().map(|s| &s.pattern))
            .finish()
    }
}

/// What signing a message gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Signed {
    /// `DKIM-Signature:` header lines (CRLF-terminated) to put in front of the message.
    Headers(String),
    /// No key covers the `From:` domain (or the message has no `From:`): sent unsigned.
    NoKey,
}

impl Signers {
    /// Loads every `[[dkim]]` table's key; refuses an unreadable key, a key others can
    /// read, or an RSA key under 1024 bits.
    pub fn load(tables: &[DkimConfig]) -> Result<Signers, DkimError> {
        let mut signers = Vec::with_capacity(tables.len());
        for table in tables {
            signers.push(load_one(table)?);
        }
        Ok(Signers { signers })
    }

    pub fn is_empty(&self) -> bool {
        self.signers.is_empty()
    }

    /// Whether every key is Ed25519: a signature then costs tens of microseconds, less
    /// than handing the message to another thread and back.
    pub fn cheap(&self) -> bool {
        self.signers
            .iter()
            .all(|s| matches!(s.key, Key::Ed25519(_)))
    }

    /// Signs `message` with every key that covers its `From:` domain.
    ///
    /// CPU-bound (an RSA-2048 signature costs about a millisecond): call it from a
    /// blocking thread, never on the async workers.
    pub fn sign(&self, message: &[u8]) -> Result<Signed, DkimError> {
        let Some(domain) = from_domain(message) else {
            return Ok(Signed::NoKey);
        };
        let mut headers = String::new();
        for signer in self.signers.iter().filter(|s| s.covers(&domain)) {
            headers.push_str(&signer.sign(message)?);
        }
        Ok(if headers.is_empty() {
            Signed::NoKey
        } else {
            Signed::Headers(headers)
        })
    }
}

fn load_one(table: &DkimConfig) -> Result<Signer, DkimError> {
    let path = table.key.display().to_string();
    let fail = |why: String| DkimError::Key {
        path: path.clone(),
        why,
    };
    check_private(&table.key)?;
    let pem = std::fs::read(&table.key).map_err(|e| fail(e.to_string()))?;
    let der =
        PrivateKeyDer::from_pem_slice(&pem).map_err(|e| fail(format!("no private key: {e}")))?;
    let headers: Vec<String> = match &table.headers {
        Some(h) => h.clone(),
        None => DEFAULT_HEADERS.iter().map(|h| (*h).to_owned()).collect(),
    };
    let expire = table.expire.map_or(0, |d| d.0.as_secs());
    let key = match table.algorithm {
        DkimAlgorithm::RsaSha256 => {
            let bits = rsa_bits(&der).ok_or_else(|| fail("not an RSA key".into()))?;
            if bits < MIN_RSA_BITS {
                return Err(DkimError::Weak { path, bits });
            }
            let key = RsaKey::<Sha256>::from_key_der(der).map_err(|e| fail(e.to_string()))?;
            Key::Rsa(
                DkimSigner::from_key(key)
                    .domain(signing_domain(&table.domain))
                    .selector(&table.selector)
                    .headers(headers)
                    .expiration(expire),
            )
        }
        DkimAlgorithm::Ed25519Sha256 => {
            let PrivateKeyDer::Pkcs8(pkcs8) = der else {
                return Err(fail("an Ed25519 key must be PKCS#8".into()));
            };
            let key = Ed25519Key::from_pkcs8_maybe_unchecked_der(pkcs8.secret_pkcs8_der())
                .map_err(|e| fail(format!("not an Ed25519 key: {e}")))?;
            Key::Ed25519(
                DkimSigner::from_key(key)
                    .domain(signing_domain(&table.domain))
                    .selector(&table.selector)
                    .headers(headers)
                    .expiration(expire),
            )
        }
    };
    Ok(Signer {
        pattern: table.domain.to_ascii_lowercase(),
        key,
    })
}

/// The `d=` of a table: a wildcard table signs as its parent domain, which covers the
/// subdomains under DMARC's relaxed alignment.
fn signing_domain(pattern: &str) -> String {
    pattern
        .strip_prefix("*.")
        .unwrap_or(pattern)
        .to_ascii_lowercase()
}

#[cfg(unix)]
fn check_private(path: &Path) -> Result<(), DkimError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| DkimError::Key {
        path: path.display().to_string(),
        why: e.to_string(),
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(DkimError::Exposed {
            path: path.display().to_string(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path) -> Result<(), DkimError> {
    Ok(())
}

fn rsa_bits(der: &PrivateKeyDer<'_>) -> Option<usize> {
    use aws_lc_rs::signature::KeyPair;
    let pair = match der {
        PrivateKeyDer::Pkcs1(k) => aws_lc_rs::rsa::KeyPair::from_der(k.secret_pkcs1_der()),
        PrivateKeyDer::Pkcs8(k) => aws_lc_rs::rsa::KeyPair::from_pkcs8(k.secret_pkcs8_der()),
        _ => return None,
    }
    .ok()?;
    Some(pair.public_key().modulus_len() * 8)
}

/// The lower-cased, A-label domain of the first address in the `From:` header.
pub fn from_domain(message: &[u8]) -> Option<String> {
    let from = crate::wire::header_value(message, "From")?;
    let domain = first_address(&from).rsplit_once('@')?.1;
    crate::address::parse(&format!("x@{domain}"))
        .ok()
        .map(|m| m.domain)
}

/// The first mailbox of an address list: inside the first `<...>` outside quotes, or
/// the text up to the first comma outside quotes.
fn first_address(list: &str) -> &str {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in list.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '<' if !quoted => {
                let rest = &list[i + 1..];
                return rest.split_once('>').map_or(rest, |(a, _)| a).trim();
            }
            ',' if !quoted => return list[..i].trim(),
            _ => {}
        }
    }
    list.trim()
}

/// A new key pair for `dkim-keygen`: the private key as PKCS#8 PEM, and the TXT record's
/// value to publish at `SELECTOR._domainkey.DOMAIN`.
pub fn generate(algorithm: DkimAlgorithm) -> Result<(String, String), DkimError> {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::KeyPair;
    let fail = |why: String| DkimError::Sign(format!("key generation: {why}"));
    let (pkcs8, record) = match algorithm {
        DkimAlgorithm::RsaSha256 => {
            let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                .map_err(|e| fail(e.to_string()))?;
            let pkcs8 = pair
                .as_der()
                .map_err(|e| fail(e.to_string()))?
                .as_ref()
                .to_vec();
            let spki = rsa_spki(pair.public_key().as_ref());
            (pkcs8, format!("v=DKIM1; k=rsa; p={}", B64.encode(spki)))
        }
        DkimAlgorithm::Ed25519Sha256 => {
            let rng = aws_lc_rs::rand::SystemRandom::new();
            let doc = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|e| fail(e.to_string()))?;
            let pair = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref())
                .map_err(|e| fail(e.to_string()))?;
            let public = pair.public_key().as_ref().to_vec();
            (
                doc.as_ref().to_vec(),
                format!("v=DKIM1; k=ed25519; p={}", B64.encode(public)),
            )
        }
    };
    Ok((pem("PRIVATE KEY", &pkcs8), record))
}

/// Writes a new key to `DIR/SELECTOR.DOMAIN.key` (mode 0600, never over an existing
/// file) and returns its path and the TXT record.
pub fn keygen(
    domain: &str,
    selector: &str,
    algorithm: DkimAlgorithm,
    dir: &Path,
) -> Result<(PathBuf, String), DkimError> {
    let (pem, record) = generate(algorithm)?;
    let path = dir.join(format!("{selector}.{domain}.key"));
    let write_err = |source| DkimError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&path).map_err(write_err)?;
    std::io::Write::write_all(&mut file, pem.as_bytes()).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    Ok((path, record))
}

/// An RSAPublicKey (PKCS#1) wrapped as a SubjectPublicKeyInfo, the form DKIM records
/// carry in practice (what `openssl rsa -pubout` writes).
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    // AlgorithmIdentifier { rsaEncryption, NULL }
    const ALGORITHM: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bit_string = vec![0x00];
    bit_string.extend_from_slice(pkcs1);
    let mut inner = ALGORITHM.to_vec();
    inner.extend(der(0x03, &bit_string));
    der(0x30, &inner)
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|&b| b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = B64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests;

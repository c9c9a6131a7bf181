//! `[[dkim]]`: the keys outgoing mail is signed with, one table per key (two tables for
//! one domain sign with both: RSA and Ed25519 side by side).

use std::path::PathBuf;

use serde::Deserialize;

use super::Dur;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum DkimAlgorithm {
    #[default]
    #[serde(rename = "rsa-sha256")]
    RsaSha256,
    #[serde(rename = "ed25519-sha256")]
    Ed25519Sha256,
}

impl DkimAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            DkimAlgorithm::RsaSha256 => "rsa-sha256",
            DkimAlgorithm::Ed25519Sha256 => "ed25519-sha256",
        }
    }

    pub fn parse(text: &str) -> Option<DkimAlgorithm> {
        match text {
            "rsa-sha256" | "rsa" => Some(DkimAlgorithm::RsaSha256),
            "ed25519-sha256" | "ed25519" => Some(DkimAlgorithm::Ed25519Sha256),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimConfig {
    /// The `From:` domain this key signs for, or `*.example.com` for its subdomains.
    pub domain: String,
    pub selector: String,
    /// PEM file (PKCS#8, or PKCS#1 for RSA), readable by Floodgate's user only.
    pub key: PathBuf,
    #[serde(default)]
    pub algorithm: DkimAlgorithm,
    /// Headers to sign instead of the default set (`dkim::DEFAULT_HEADERS`).
    pub headers: Option<Vec<String>>,
    /// Signatures expire this long after signing (`x=`); absent: never.
    pub expire: Option<Dur>,
}

impl DkimConfig {
    /// Checks the table's names (the key file is checked when it is loaded).
    pub fn check(&self) -> Result<(), String> {
        let domain = self.domain.strip_prefix("*.").unwrap_or(&self.domain);
        if crate::address::parse(&format!("x@{domain}")).is_err() {
            return Err(format!("{:?} is not a domain", self.domain));
        }
        let selector_ok = !self.selector.is_empty()
            && self.selector.split('.').all(|l| {
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !selector_ok {
            return Err(format!("selector {:?} is not a DNS label", self.selector));
        }
        if let Some(headers) = &self.headers {
            if !headers.iter().any(|h| h.eq_ignore_ascii_case("from")) {
                return Err("headers must include From (RFC 6376 §5.4)".into());
            }
            if headers
                .iter()
                .any(|h| h.is_empty() || !h.bytes().all(|b| b.is_ascii_graphic() && b != b':'))
            {
                return Err("headers holds a name that is not a header name".into());
            }
        }
        Ok(())
    }
}

//! `[suppression]`: how long do-not-contact entries last, by reason.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::Dur;
use crate::suppression::Reason;

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SuppressionConfig {
    /// How long an entry of each reason lasts, e.g. `quota`-like soft reasons can be
    /// given a lifetime while `unsubscribed` stays forever. A reason not named never
    /// expires. Keys are reason names (`invalid_recipient`, `bad_domain`,
    /// `inactive_mailbox`, `unsubscribed`, `complaint`, `manual`).
    pub expire_after: BTreeMap<String, Dur>,
    /// One-click unsubscribe (RFC 8058) for campaign mail.
    pub unsubscribe: UnsubscribeConfig,
}

/// `[suppression.unsubscribe]`. Off by default; transactional mail (a campaign not
/// listed) never gets the headers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UnsubscribeConfig {
    pub enabled: bool,
    /// The campaigns whose mail carries `List-Unsubscribe`; `"*"` for every attributed
    /// campaign.
    pub campaigns: Vec<String>,
    /// Names of `[[http.api_keys]]` whose mail (`POST /v1/messages`) carries it whatever
    /// its campaign; without a campaign the link unsubscribes from everything.
    pub api_keys: Vec<String>,
    /// The public URL the token is appended to, e.g. `https://mail.example.com/u/`.
    pub base_url: String,
    /// An address for the `mailto:` alternative, if any.
    pub mailto: Option<String>,
    /// The token key, `whsec_` + base64 of at least 16 bytes (as webhook secrets).
    pub secret: String,
    /// The public listener serving `POST /u/TOKEN` (loopback by default: put the
    /// reverse proxy that answers `base_url` in front of it).
    pub listen: Option<std::net::SocketAddr>,
    /// `campaign`: an unsubscribe suppresses the recipient for that campaign only;
    /// `global`: for every campaign.
    pub scope: UnsubscribeScope,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnsubscribeScope {
    #[default]
    Campaign,
    Global,
}

impl Default for UnsubscribeConfig {
    fn default() -> Self {
        UnsubscribeConfig {
            enabled: false,
            campaigns: Vec::new(),
            api_keys: Vec::new(),
            base_url: String::new(),
            mailto: None,
            secret: String::new(),
            listen: Some("127.0.0.1:8027".parse().expect("literal address")),
            scope: UnsubscribeScope::Campaign,
        }
    }
}

impl UnsubscribeConfig {
    /// Whether mail of `campaign` gets the headers.
    pub fn applies_to(&self, campaign: Option<&str>) -> bool {
        let Some(campaign) = campaign else {
            return false;
        };
        self.enabled && self.campaigns.iter().any(|c| c == "*" || c == campaign)
    }

    /// Whether mail submitted with the API key named `key` gets the headers.
    pub fn applies_to_key(&self, key: Option<&str>) -> bool {
        self.enabled && key.is_some_and(|k| self.api_keys.iter().any(|n| n == k))
    }

    /// Why the table cannot be used, if it cannot.
    pub fn refusal(&self) -> Option<(&'static str, String)> {
        if !self.enabled {
            return None;
        }
        if let Err(e) = crate::signing::Secret::parse(&self.secret) {
            return Some(("suppression.unsubscribe.secret", e.to_string()));
        }
        let url_ok = self.base_url.starts_with("https://") || self.base_url.starts_with("http://");
        if !url_ok
            || self
                .base_url
                .chars()
                .any(|c| c.is_control() || c == '>' || c == ' ')
        {
            return Some((
                "suppression.unsubscribe.base_url",
                "an http(s) URL ending where the token goes, e.g. https://mail.example.com/u/"
                    .into(),
            ));
        }
        if let Some(m) = &self.mailto
            && crate::address::parse(m).is_err()
        {
            return Some(("suppression.unsubscribe.mailto", "not an address".into()));
        }
        None
    }
}

impl SuppressionConfig {
    /// When an entry of `reason` made at `now_ms` expires, if it does.
    pub fn expiry(&self, reason: Reason, now_ms: i64) -> Option<i64> {
        self.expire_after
            .get(reason.as_str())
            .map(|d| now_ms.saturating_add(d.0.as_millis().min(i64::MAX as u128) as i64))
    }

    /// The first key that is not a reason's name.
    pub fn unknown_reason(&self) -> Option<&str> {
        self.expire_after
            .keys()
            .find(|k| Reason::parse(k).is_none())
            .map(String::as_str)
    }
}

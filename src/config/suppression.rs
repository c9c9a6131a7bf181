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

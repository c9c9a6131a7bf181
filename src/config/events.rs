//! `[events]`: where delivery events (delivered, deferred, failed, and the periodic
//! per-campaign `intake_rejections` aggregate) are POSTed, and how they are batched.

use serde::Deserialize;

use super::Dur;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Receivers of event batches; empty turns events off.
    pub urls: Vec<String>,
    /// `whsec_` Standard Webhooks secret the batches are signed with (required with urls).
    pub secret: Option<String>,
    /// Most events in one POST.
    pub batch_max: usize,
    /// How often buffered events and the rejection aggregates are sent.
    pub flush_interval: Dur,
    /// Events waiting to be sent; beyond it new ones are dropped and counted (read at
    /// start: changing it needs a restart).
    pub max_pending: usize,
    /// Further attempts for a batch that failed, waiting 1 s, 2 s, 4 s, ... between.
    pub retry: u32,
    /// Total time for one POST.
    pub timeout: Dur,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            urls: Vec::new(),
            secret: None,
            batch_max: 100,
            flush_interval: Dur::secs(1),
            max_pending: 10_000,
            retry: 3,
            timeout: Dur::secs(10),
        }
    }
}

impl EventsConfig {
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.batch_max == 0 || self.max_pending == 0 {
            return Err("batch_max and max_pending must be at least 1".into());
        }
        if self.flush_interval.0.is_zero() || self.timeout.0.is_zero() {
            return Err("flush_interval and timeout must be above 0".into());
        }
        for url in &self.urls {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!("`{url}` is not an http:// or https:// URL"));
            }
        }
        if !self.urls.is_empty() {
            let secret = self.secret.as_deref().unwrap_or_default();
            crate::deliver::webhook::Secret::parse(secret)
                .map_err(|e| format!("`secret` (whsec_<base64>, required with urls): {e}"))?;
        }
        Ok(())
    }
}

//! `[events]`: where delivery events (delivered, deferred, failed, and the periodic
//! per-campaign `intake_rejections` aggregate) are POSTed, and how they are batched.

use serde::Deserialize;

use super::Dur;

#[derive(Debug, Clone, PartialEq, Deserialize)]
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
            crate::signing::Secret::parse(secret)
                .map_err(|e| format!("`secret` (whsec_<base64>, required with urls): {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    const BASE: &str = "[admin]\ntoken = \"0123456789abcdef01234567\"\n";
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn parse(extra: &str) -> Result<Config, String> {
        Config::parse(&format!("{BASE}{extra}"), Path::new("t.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn events_need_a_valid_secret_with_urls() {
        let c = parse("").unwrap();
        assert!(c.events.urls.is_empty());
        assert_eq!(c.events.batch_max, 100);
        let err = parse("[events]\nurls = [\"http://127.0.0.1:1/e\"]\n").unwrap_err();
        assert!(err.contains("events") && err.contains("secret"), "{err}");
        let err = parse("[events]\nurls = [\"ftp://x/\"]\n").unwrap_err();
        assert!(err.contains("ftp://x/"), "{err}");
        parse(&format!(
            "[events]\nurls = [\"http://127.0.0.1:1/e\"]\nsecret = \"{SECRET}\"\n"
        ))
        .unwrap();
        let err = parse("[events]\nbatch_size = 5\n").unwrap_err();
        assert!(err.contains("batch_size"), "{err}");
    }

    #[test]
    fn webhook_routes_need_a_whsec_secret() {
        let route = "[[route]]\ndomains = [\"h.test\"]\ntransport = \"webhook\"\nurl = \"http://127.0.0.1:1/\"\n";
        let err = parse(route).unwrap_err();
        assert!(err.contains("route[0]") && err.contains("whsec_"), "{err}");
        let err = parse(&format!("{route}secret = \"not-a-secret\"\n")).unwrap_err();
        assert!(err.contains("whsec_"), "{err}");
        let c = parse(&format!(
            "{route}secret = \"{SECRET}\"\nbreaker_threshold = 3\nbreaker_cooldown = \"2s\"\n"
        ))
        .unwrap();
        assert_eq!(c.routes[0].breaker_threshold(), 3);
        assert_eq!(
            c.routes[0].webhook_timeout(),
            std::time::Duration::from_secs(10)
        );
        let err = parse(&format!(
            "{route}secret = \"{SECRET}\"\nbreaker_threshold = 0\n"
        ))
        .unwrap_err();
        assert!(err.contains("breaker_threshold"), "{err}");
    }
}

//! `[faillog]` and `[guard]`: how failures are recorded, and when a campaign's failures
//! trip an alert or a pause.

use serde::Deserialize;

use super::Dur;

/// How much of each failure reaches failures.db: the admin API's type, so the config,
/// the daemon and `ctl` share one definition.
pub use crate::admin_api::FailLogMode;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailLogConfig {
    pub mode: FailLogMode,
    /// `sampled`: one event row in this many, per campaign.
    pub sample_rate: u32,
    /// `full` and `sampled`: most event rows per second per campaign, and the burst above it.
    pub rows_per_sec: u32,
    pub burst: u32,
    /// Events waiting for the writer; past it they are dropped (and counted).
    pub channel_capacity: usize,
    /// A batch is written at this many rows or after `flush_interval`, whichever first.
    pub batch_rows: usize,
    pub flush_interval: Dur,
    /// Event rows older than this are deleted, in small batches.
    pub retention: Dur,
    /// Event rows beyond this count are deleted, oldest first.
    pub max_rows: u64,
    /// Aggregate rows older than this are deleted.
    pub stats_retention: Dur,
}

impl Default for FailLogConfig {
    fn default() -> Self {
        Self {
            mode: FailLogMode::Full,
            sample_rate: 100,
            rows_per_sec: 50,
            burst: 200,
            channel_capacity: 65_536,
            batch_rows: 2000,
            flush_interval: Dur::secs(1),
            retention: Dur::secs(7 * 86_400),
            max_rows: 1_000_000,
            stats_retention: Dur::secs(90 * 86_400),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuardAction {
    Alert,
    Pause,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    pub enabled: bool,
    /// The sliding window over which a campaign's accepted and failed are counted.
    pub window: Dur,
    /// No verdict before this many events (accepted + failed) in the window.
    pub min_events: u64,
    /// Trip when failed / (accepted + failed) reaches this.
    pub failure_ratio: f64,
    pub action: GuardAction,
    /// Alert when failures.db is written faster than this many rows per second.
    pub faillog_rows_per_sec_alert: u64,
    /// Optional URL that receives each alert as signed JSON (Standard Webhooks).
    pub alert_webhook: Option<String>,
    pub alert_webhook_secret: Option<String>,
    /// Most alert webhook calls per minute.
    pub alert_webhook_per_minute: u32,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            window: Dur::secs(60),
            min_events: 500,
            failure_ratio: 0.5,
            action: GuardAction::Pause,
            faillog_rows_per_sec_alert: 1000,
            alert_webhook: None,
            alert_webhook_secret: None,
            alert_webhook_per_minute: 10,
        }
    }
}

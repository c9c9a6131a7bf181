//! `[log]`: the log's format and how many delivery-outcome lines a campaign may write.

use serde::Deserialize;

use super::Dur;

/// How lines are written to standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One `key=value` line per event, without a timestamp under journald (which stamps
    /// lines itself).
    #[default]
    Text,
    /// One JSON object per line (tracing-subscriber's JSON formatter), for log shippers.
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Read once at start: the subscriber is installed before anything else runs.
    pub format: LogFormat,
    /// Delivery-outcome lines per second per campaign, and the burst above it; beyond
    /// them lines are counted, not written.
    pub outcomes_per_sec: u32,
    pub outcomes_burst: u32,
    /// How often one summary line per campaign says how many outcome lines were skipped.
    pub summary_interval: Dur,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            outcomes_per_sec: 20,
            outcomes_burst: 100,
            summary_interval: Dur::secs(60),
        }
    }
}

impl LogConfig {
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.outcomes_per_sec == 0 || self.outcomes_burst == 0 {
            return Err("outcomes_per_sec and outcomes_burst must be at least 1");
        }
        if self.summary_interval.0.is_zero() {
            return Err("summary_interval must be above 0");
        }
        Ok(())
    }
}

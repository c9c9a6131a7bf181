//! `[canary]`: probe messages sent through the whole path on a schedule.

use serde::Deserialize;

use super::Dur;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CanaryConfig {
    pub enabled: bool,
    /// How often each probe address gets a probe (one in flight per address at most).
    pub interval: Dur,
    /// A probe not delivered within this fails, and its message is cancelled: a probe
    /// is never retried.
    pub timeout: Dur,
    /// A probe delivered slower than this counts as slow (degraded).
    pub slow: Dur,
    /// One address per route to watch: the route its domain matches carries the probe
    /// (an operator's mailbox, or a loopback receiver the operator runs).
    pub probes: Vec<String>,
}

impl Default for CanaryConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            interval: Dur::secs(60),
            timeout: Dur::secs(30),
            slow: Dur::secs(5),
            probes: Vec::new(),
        }
    }
}

impl CanaryConfig {
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.interval.0.is_zero() || self.timeout.0.is_zero() || self.slow.0.is_zero() {
            return Err("interval, timeout and slow must be above 0");
        }
        if self.slow > self.timeout {
            return Err("slow must not be above timeout");
        }
        if self.enabled && self.probes.is_empty() {
            return Err("enabled needs at least one address in probes");
        }
        if self
            .probes
            .iter()
            .any(|p| crate::address::parse(p).is_err())
        {
            return Err("every probe must be a valid address");
        }
        Ok(())
    }
}

//! `[delivery]`: how fast, how hard and how long Floodgate tries each destination.

use serde::Deserialize;

use super::Dur;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Whether the scheduler runs. Off, mail is accepted and queued but not relayed.
    pub enabled: bool,
    /// Default rate per destination (an MX domain, a smarthost, a webhook URL).
    pub rate: Rate,
    /// Per-domain rate overrides, e.g. `"slow.example" = "10/s"`.
    pub rates: std::collections::BTreeMap<String, Rate>,
    /// Concurrent transactions per destination, and in total.
    pub concurrency: usize,
    pub max_concurrency: usize,
    /// Recipients claimed from the queue per scheduler pass.
    pub batch: usize,
    /// Waits before each retry; the last repeats. Each wait gets up to 10% jitter.
    pub backoff: Vec<Dur>,
    /// A recipient still failing this long after it was queued fails for good (`expired`).
    pub max_age: Dur,
    /// Send RFC 3464 delivery status notifications to the envelope sender on permanent
    /// failure (never for the null sender).
    pub bounces: bool,
    /// RFC 5321 §4.5.3.2 timeouts for outbound SMTP.
    pub connect_timeout: Dur,
    pub command_timeout: Dur,
    pub data_timeout: Dur,
    /// How long an idle outbound connection is kept for reuse.
    pub idle_connection: Dur,
    /// MTA-STS (RFC 8461) for MX delivery; a route's `mta_sts` overrides it.
    pub mta_sts: StsMode,
    /// The port MTA-STS policies are fetched from (`https://mta-sts.DOMAIN:PORT/`). 443 is
    /// the standard's and the only sensible value in production; tests serve policies
    /// from a loopback port.
    pub mta_sts_port: u16,
    /// An operator's bounce rules (TOML, as `conf/bounce_rules.toml`), matched before
    /// the shipped ones; read again at every reload.
    pub bounce_rules: Option<std::path::PathBuf>,
}

/// What Floodgate does with a receiving domain's MTA-STS policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StsMode {
    /// Honour each domain's policy: a policy in `mode: enforce` is enforced (matching
    /// MX hosts, STARTTLS, verified certificate, or the recipient is deferred), one in
    /// `mode: testing` is only counted and reported.
    #[default]
    Enforce,
    /// Treat every policy as `mode: testing`: deliver as without one, count what would
    /// have failed.
    Testing,
    /// Do not look policies up.
    Off,
}

impl StsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StsMode::Enforce => "enforce",
            StsMode::Testing => "testing",
            StsMode::Off => "off",
        }
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            rate: Rate::per_second(100),
            rates: Default::default(),
            concurrency: 10,
            max_concurrency: 200,
            batch: 500,
            backoff: [60, 300, 900, 1800, 3600, 7200, 14_400]
                .into_iter()
                .map(Dur::secs)
                .collect(),
            max_age: Dur::secs(5 * 86_400),
            bounces: false,
            connect_timeout: Dur::secs(30),
            command_timeout: Dur::secs(300),
            data_timeout: Dur::secs(600),
            idle_connection: Dur::secs(30),
            mta_sts: StsMode::default(),
            mta_sts_port: 443,
            bounce_rules: None,
        }
    }
}

impl DeliveryConfig {
    pub fn rate_for(&self, domain: &str) -> Rate {
        self.rates.get(domain).copied().unwrap_or(self.rate)
    }
}

/// `"100/s"`, `"600/m"`, `"5000/h"`: how many per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: std::time::Duration,
}

impl Rate {
    pub const fn per_second(count: u32) -> Rate {
        Rate {
            count,
            per: std::time::Duration::from_secs(1),
        }
    }

    pub fn parse(text: &str) -> Result<Rate, String> {
        let (n, unit) = text
            .split_once('/')
            .ok_or_else(|| format!("`{text}`: expected N/s, N/m or N/h"))?;
        let count: u32 = n
            .trim()
            .parse()
            .ok()
            .filter(|c| *c > 0)
            .ok_or_else(|| format!("`{text}`: count must be a whole number above 0"))?;
        let per = match unit.trim() {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return Err(format!("`{text}`: unit must be s, m or h")),
        };
        Ok(Rate {
            count,
            per: std::time::Duration::from_secs(per),
        })
    }

    /// The time between two sends at this rate (at least 1 µs).
    pub fn interval(&self) -> std::time::Duration {
        (self.per / self.count.max(1)).max(std::time::Duration::from_micros(1))
    }

    /// The governor quota: evenly spaced, no burst, so a destination never sees more
    /// than its rate in any window, even after an idle spell.
    pub fn quota(&self) -> governor::Quota {
        governor::Quota::with_period(self.interval()).expect("period above zero")
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Rate::parse(&text).map_err(serde::de::Error::custom)
    }
}

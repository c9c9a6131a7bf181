//! A session's deadlines. None is restarted by a byte: a command line must be complete
//! within `idle_timeout` of the previous reply, a DATA transfer within `data_timeout`
//! plus its size at `data_min_rate`, and the whole session within `session_lifetime`.
//! Under stress (see `stress`) the shorter stress timeouts apply.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::SmtpConfig;

/// The deadline of one wait, normally and under stress.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub normal: Instant,
    pub stressed: Instant,
}

impl Deadline {
    pub fn at(&self, stressed: bool) -> Instant {
        if stressed {
            self.stressed.min(self.normal)
        } else {
            self.normal
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    idle: Duration,
    data: Duration,
    stress_idle: Duration,
    stress_data: Duration,
    min_rate: u64,
    /// When the session's lifetime is over.
    pub end: Instant,
}

impl Limits {
    pub fn new(config: &SmtpConfig, started: Instant) -> Limits {
        Limits {
            idle: config.idle_timeout.0,
            data: config.data_timeout.0,
            stress_idle: config.stress_idle_timeout.0,
            stress_data: config.stress_data_timeout.0,
            min_rate: config.data_min_rate.max(1),
            end: started + config.session_lifetime.0,
        }
    }

    /// For a command line (or a TLS handshake) whose wait began at `start`.
    pub fn command(&self, start: Instant) -> Deadline {
        Deadline {
            normal: (start + self.idle).min(self.end),
            stressed: (start + self.stress_idle).min(self.end),
        }
    }

    /// For a DATA transfer begun at `start` that has received `bytes` so far: the
    /// allowance grows with what arrived, so a fast big message is never cut, while a
    /// dribble runs out.
    pub fn data(&self, start: Instant, bytes: u64) -> Deadline {
        let earned = Duration::from_millis(bytes.saturating_mul(1000) / self.min_rate);
        Deadline {
            normal: (start + self.data + earned).min(self.end),
            stressed: (start + self.stress_data + earned).min(self.end),
        }
    }

    /// Bytes that count as "a second of progress" at the minimum rate.
    pub fn min_rate(&self) -> u64 {
        self.min_rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_grow_with_bytes_and_stop_at_lifetime() {
        let config = SmtpConfig::default();
        let t0 = Instant::now();
        let l = Limits::new(&config, t0);
        let d = l.data(t0, 0);
        assert_eq!(d.normal - t0, Duration::from_secs(180));
        assert_eq!(d.at(true) - t0, Duration::from_secs(10));
        // 500 B/s: 50 kB earn 100 s more.
        assert_eq!(l.data(t0, 50_000).normal - t0, Duration::from_secs(280));
        let late = t0 + Duration::from_secs(3590);
        assert_eq!(l.command(late).normal, l.end);
    }
}

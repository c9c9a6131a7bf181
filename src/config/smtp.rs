//! `[smtp]`: the listeners, connection and message limits, timeouts (and their shorter
//! stress values), relay networks, TLS, AUTH users and where a campaign comes from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

use super::{Dur, Refusal};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    pub listen: Vec<SocketAddr>,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_message_size: usize,
    pub max_recipients: usize,
    pub max_bad_commands: u32,
    /// Time allowed for a whole command line, from the previous reply to its CRLF (not
    /// restarted by each byte received).
    pub idle_timeout: Dur,
    /// Time allowed for DATA before the minimum rate counts: the deadline is this plus
    /// the bytes received divided by `data_min_rate`.
    pub data_timeout: Dur,
    /// Networks whose clients may relay without authenticating.
    pub allowed_networks: Vec<IpNet>,
    /// Allow AUTH without TLS for clients on the loopback interface (local submission only).
    pub auth_without_tls_on_loopback: bool,
    /// Where a message's campaign comes from, first that yields wins:
    /// `header:NAME`, `auth` (the authenticated user) or `sender` (envelope sender).
    pub campaign_from: Vec<String>,
    pub tls: Option<TlsConfig>,
    pub users: Vec<UserConfig>,
    /// Slow clients: bytes per second a DATA transfer must average (see `data_timeout`).
    pub data_min_rate: u64,
    /// A session is closed after this long, whatever it is doing.
    pub session_lifetime: Dur,
    /// Fraction of `max_connections` (or of `max_connections_per_ip`, for one address's
    /// sessions) above which the stress timeouts apply.
    pub stress_threshold: f64,
    pub stress_idle_timeout: Dur,
    pub stress_data_timeout: Dur,
    /// AUTH: password verifications running at once (0 = one per CPU core).
    pub auth_workers: usize,
    /// AUTH: verifications waiting for a worker; beyond this, `454 4.7.0` at once.
    pub auth_queue: usize,
    /// AUTH: failed verifications one client address gets before the limit applies,
    /// and the interval that earns it one more guess.
    pub auth_fail_burst: u32,
    pub auth_fail_interval: Dur,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        Self {
            listen: vec!["127.0.0.1:2525".parse().expect("literal address")],
            max_connections: 1000,
            max_connections_per_ip: 100,
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 100,
            max_bad_commands: 20,
            idle_timeout: Dur::secs(300),
            data_timeout: Dur::secs(180),
            allowed_networks: vec![
                "127.0.0.0/8".parse().expect("literal net"),
                "::1/128".parse().expect("literal net"),
            ],
            auth_without_tls_on_loopback: false,
            campaign_from: vec![
                "header:X-Campaign-ID".into(),
                "auth".into(),
                "sender".into(),
            ],
            tls: None,
            users: Vec::new(),
            data_min_rate: 500,
            session_lifetime: Dur::secs(3600),
            stress_threshold: 0.8,
            stress_idle_timeout: Dur::secs(10),
            stress_data_timeout: Dur::secs(10),
            auth_workers: 0,
            auth_queue: 32,
            auth_fail_burst: 10,
            auth_fail_interval: Dur::secs(1),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: toml::Spanned<PathBuf>,
    pub key: toml::Spanned<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// An Argon2 PHC string, as printed by `floodgate hash-password`.
    pub password_hash: String,
}

impl SmtpConfig {
    /// Checks `[smtp]`; certificate paths are made absolute from `base`.
    pub(super) fn check(&mut self, base: &Path) -> Result<(), Refusal> {
        self.check_limits()?;
        self.check_identities()?;
        if let Some(tls) = &mut self.tls {
            for (key, file) in [
                ("smtp.tls.cert", &mut tls.cert),
                ("smtp.tls.key", &mut tls.key),
            ] {
                let full = base.join(file.get_ref());
                if !full.is_file() {
                    return Err(Refusal::new(
                        key,
                        format!("file {} does not exist", full.display()),
                    )
                    .at(file.span()));
                }
                *file.get_mut() = full;
            }
        }
        Ok(())
    }

    fn check_limits(&self) -> Result<(), Refusal> {
        if self.listen.is_empty() {
            return Err(Refusal::new("smtp.listen", "at least one address"));
        }
        if self.max_recipients == 0 || self.max_connections == 0 {
            return Err(Refusal::new(
                "smtp.max_recipients / smtp.max_connections",
                "must be at least 1",
            ));
        }
        if !(self.stress_threshold > 0.0 && self.stress_threshold <= 1.0) {
            return Err(Refusal::new(
                "smtp.stress_threshold",
                "must be above 0 and at most 1 (a fraction of the connection caps)",
            ));
        }
        for (key, d) in [
            ("smtp.idle_timeout", self.idle_timeout),
            ("smtp.data_timeout", self.data_timeout),
            ("smtp.session_lifetime", self.session_lifetime),
            ("smtp.stress_idle_timeout", self.stress_idle_timeout),
            ("smtp.stress_data_timeout", self.stress_data_timeout),
            ("smtp.auth_fail_interval", self.auth_fail_interval),
        ] {
            if d.0.is_zero() {
                return Err(Refusal::new(key, "must be above 0"));
            }
        }
        if self.data_min_rate == 0 || self.auth_fail_burst == 0 {
            return Err(Refusal::new(
                "smtp.data_min_rate / smtp.auth_fail_burst",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// Campaign sources and AUTH users.
    fn check_identities(&self) -> Result<(), Refusal> {
        for source in &self.campaign_from {
            let ok = source == "auth"
                || source == "sender"
                || source
                    .strip_prefix("header:")
                    .is_some_and(|h| !h.is_empty());
            if !ok {
                return Err(Refusal::new(
                    "smtp.campaign_from",
                    format!("`{source}`: expected `header:NAME`, `auth` or `sender`"),
                ));
            }
        }
        for user in &self.users {
            if argon2::PasswordHash::new(&user.password_hash).is_err() {
                return Err(Refusal::new(
                    "smtp.users.password_hash",
                    format!(
                        "user `{}`: not a PHC hash string (make one with `floodgate hash-password`)",
                        user.name
                    ),
                ));
            }
        }
        Ok(())
    }
}

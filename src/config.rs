//! Configuration: the TOML file's structs, their defaults, and validation with errors that
//! name the key, the line and the reason.
//!
//! Every table denies unknown keys, so a typo is an error at start-up rather than a setting
//! silently ignored at 3 a.m.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

pub mod delivery;
pub mod diff;
pub mod dkim;
pub mod duration;
pub mod events;
pub mod faillog;
pub mod route;
pub mod token;

pub use delivery::{DeliveryConfig, Rate};
pub use dkim::{DkimAlgorithm, DkimConfig};
pub use duration::Dur;
pub use events::EventsConfig;
pub use faillog::{FailLogConfig, FailLogMode, GuardAction, GuardConfig};
pub use route::{Route, TlsMode, Transport};

/// Why a configuration was refused. `Display` gives the key, the line when known, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}{}: key `{key}`: {why}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        key: String,
        line: Option<usize>,
        why: String,
    },
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub smtp: SmtpConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub queue: QueueConfig,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub faillog: FailLogConfig,
    #[serde(default)]
    pub guard: GuardConfig,
    #[serde(default)]
    pub events: EventsConfig,
    #[serde(default, rename = "route")]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dkim: Vec<DkimConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Name used in the SMTP greeting, EHLO reply and `Received:` headers.
    pub hostname: String,
    /// How long SIGTERM waits for sessions to finish before closing them.
    pub shutdown_grace: Dur,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            hostname: "floodgate.localdomain".into(),
            shutdown_grace: Dur::secs(30),
        }
    }
}

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

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: Option<SocketAddr>,
    /// Largest request body accepted (bytes); larger ones get 413 before being read.
    pub max_request_size: usize,
    /// How long the response to an `Idempotency-Key` is kept for replay.
    pub idempotency_ttl: Dur,
    pub api_keys: Vec<ApiKeyConfig>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: Some("127.0.0.1:8025".parse().expect("literal address")),
            max_request_size: 35 * 1024 * 1024,
            idempotency_ttl: Dur::secs(86_400),
            api_keys: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub name: String,
    /// Hex SHA-256 of the key, as printed by `floodgate gen-key`.
    pub key_sha256: String,
    /// Campaign for requests that name none (default: the key's name).
    pub campaign: Option<String>,
    /// Requests per period for this key (`"100/s"`); beyond it, 429.
    pub rate: Option<Rate>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: Option<SocketAddr>,
    pub token: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: Some("127.0.0.1:8026".parse().expect("literal address")),
            token: String::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync the WAL at every commit: an acknowledged message survives power loss.
    Full,
    /// fsync at checkpoints only: survives a crash of the daemon, not of the machine.
    Normal,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    pub dir: PathBuf,
    pub synchronous: Synchronous,
    /// Most operations one group commit carries.
    pub max_batch: usize,
    /// Upper bound on queue.db's size in MiB (0 = none). Past it, intake answers 452 4.3.1.
    pub max_size_mb: u64,
    /// How long a claimed recipient stays leased to a courier before it is due again.
    pub lease: Dur,
    /// Finished (delivered or failed) recipients, and messages with none left, are
    /// deleted this long after they finished; lifetime totals are kept in counters.
    pub retention: Dur,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("./var"),
            synchronous: Synchronous::Full,
            max_batch: 1024,
            max_size_mb: 0,
            lease: Dur::secs(600),
            retention: Dur::secs(7 * 86_400),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Nameservers as `ip:port`; empty means the system resolver (/etc/resolv.conf).
    pub nameservers: Vec<SocketAddr>,
    pub timeout: Dur,
    pub attempts: usize,
    /// Most domains whose verdicts are cached.
    pub cache_size: usize,
    /// Floor and ceiling applied to record TTLs.
    pub min_ttl: Dur,
    pub max_ttl: Dur,
    /// How long a temporary failure (timeout, SERVFAIL) is remembered, so that a flood
    /// at a broken domain does not hammer the nameserver.
    pub temp_fail_ttl: Dur,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            timeout: Dur::secs(5),
            attempts: 2,
            cache_size: 100_000,
            min_ttl: Dur::secs(30),
            max_ttl: Dur::secs(3600),
            temp_fail_ttl: Dur::secs(5),
        }
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` names the file in errors and anchors
    /// relative paths (certificates) at the file's folder.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            // One line, `line N: why`, so that it reads well in journald too.
            message: match e.span() {
                Some(span) => match key_at(text, span.start) {
                    Some(key) => format!(
                        "line {}: key `{key}`: {}",
                        line_of(text, span.start),
                        e.message().trim_end()
                    ),
                    None => format!(
                        "line {}: {}",
                        line_of(text, span.start),
                        e.message().trim_end()
                    ),
                },
                None => e.message().trim_end().to_owned(),
            },
        })?;
        config.validate(text, path)?;
        Ok(config)
    }

    fn validate(&mut self, text: &str, path: &Path) -> Result<(), ConfigError> {
        let invalid =
            |key: &str, span: Option<std::ops::Range<usize>>, why: String| ConfigError::Invalid {
                path: path.to_owned(),
                key: key.to_owned(),
                line: span.map(|s| line_of(text, s.start)),
                why,
            };
        if self.smtp.listen.is_empty() {
            return Err(invalid("smtp.listen", None, "at least one address".into()));
        }
        if self.smtp.max_recipients == 0 || self.smtp.max_connections == 0 {
            return Err(invalid(
                "smtp.max_recipients / smtp.max_connections",
                None,
                "must be at least 1".into(),
            ));
        }
        let smtp = &self.smtp;
        if !(smtp.stress_threshold > 0.0 && smtp.stress_threshold <= 1.0) {
            return Err(invalid(
                "smtp.stress_threshold",
                None,
                "must be above 0 and at most 1 (a fraction of the connection caps)".into(),
            ));
        }
        for (key, d) in [
            ("smtp.idle_timeout", smtp.idle_timeout),
            ("smtp.data_timeout", smtp.data_timeout),
            ("smtp.session_lifetime", smtp.session_lifetime),
            ("smtp.stress_idle_timeout", smtp.stress_idle_timeout),
            ("smtp.stress_data_timeout", smtp.stress_data_timeout),
            ("smtp.auth_fail_interval", smtp.auth_fail_interval),
        ] {
            if d.0.is_zero() {
                return Err(invalid(key, None, "must be above 0".into()));
            }
        }
        if smtp.data_min_rate == 0 || smtp.auth_fail_burst == 0 {
            return Err(invalid(
                "smtp.data_min_rate / smtp.auth_fail_burst",
                None,
                "must be at least 1".into(),
            ));
        }
        for source in &self.smtp.campaign_from {
            let ok = source == "auth"
                || source == "sender"
                || source
                    .strip_prefix("header:")
                    .is_some_and(|h| !h.is_empty());
            if !ok {
                return Err(invalid(
                    "smtp.campaign_from",
                    None,
                    format!("`{source}`: expected `header:NAME`, `auth` or `sender`"),
                ));
            }
        }
        for user in &self.smtp.users {
            if argon2::PasswordHash::new(&user.password_hash).is_err() {
                return Err(invalid(
                    "smtp.users.password_hash",
                    None,
                    format!(
                        "user `{}`: not a PHC hash string (make one with `floodgate hash-password`)",
                        user.name
                    ),
                ));
            }
        }
        if let Some(tls) = &mut self.smtp.tls {
            let base = path.parent().unwrap_or(Path::new("."));
            for (key, file) in [
                ("smtp.tls.cert", &mut tls.cert),
                ("smtp.tls.key", &mut tls.key),
            ] {
                let full = base.join(file.get_ref());
                if !full.is_file() {
                    return Err(invalid(
                        key,
                        Some(file.span()),
                        format!("file {} does not exist", full.display()),
                    ));
                }
                *file.get_mut() = full;
            }
        }
        for key in &self.http.api_keys {
            let ok =
                key.key_sha256.len() == 64 && key.key_sha256.chars().all(|c| c.is_ascii_hexdigit());
            if !ok {
                return Err(invalid(
                    "http.api_keys.key_sha256",
                    None,
                    format!(
                        "key `{}`: expected 64 hex digits (make one with `floodgate gen-key`)",
                        key.name
                    ),
                ));
            }
        }
        // No token: one is generated into the state directory at start (see `token`).
        if let Some(why) = (!self.admin.token.is_empty())
            .then(|| token::refusal(&self.admin.token))
            .flatten()
        {
            return Err(invalid("admin.token", None, why));
        }
        if self.queue.max_batch == 0 {
            return Err(invalid(
                "queue.max_batch",
                None,
                "must be at least 1".into(),
            ));
        }
        if self.queue.retention.0.is_zero() {
            return Err(invalid(
                "queue.retention",
                None,
                "must be above 0 (e.g. \"7d\")".into(),
            ));
        }
        if self.dns.attempts == 0 || self.dns.timeout.0.is_zero() {
            return Err(invalid(
                "dns.timeout / dns.attempts",
                None,
                "must be above 0".into(),
            ));
        }
        if self.routes.is_empty() {
            // No [[route]] at all: every domain goes to its MX, the behaviour of a plain
            // relay. Once any route is written, only written routes apply.
            self.routes.push(Route::default_mx());
        }
        if self.delivery.backoff.is_empty()
            || self.delivery.batch == 0
            || self.delivery.concurrency == 0
            || self.delivery.max_concurrency == 0
        {
            return Err(invalid(
                "delivery.backoff / batch / concurrency / max_concurrency",
                None,
                "backoff needs at least one wait; counts must be at least 1".into(),
            ));
        }
        if self.faillog.sample_rate == 0
            || self.faillog.rows_per_sec == 0
            || self.faillog.batch_rows == 0
        {
            return Err(invalid(
                "faillog.sample_rate / rows_per_sec / batch_rows",
                None,
                "must be at least 1".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.guard.failure_ratio) || self.guard.window.0.is_zero() {
            return Err(invalid(
                "guard.failure_ratio / guard.window",
                None,
                "failure_ratio must be within 0..=1 and window above 0".into(),
            ));
        }
        self.events
            .validate()
            .map_err(|why| invalid("events", None, why))?;
        for (i, route) in self.routes.iter().enumerate() {
            route
                .validate()
                .map_err(|why| invalid(&format!("route[{i}]"), None, why))?;
        }
        for (i, table) in self.dkim.iter().enumerate() {
            table
                .check()
                .map_err(|why| invalid(&format!("dkim[{i}]"), None, why))?;
        }
        Ok(())
    }

    /// The route for a recipient domain, with its index in `routes`.
    pub fn route_for(&self, domain: &str) -> Option<&Route> {
        route::find(&self.routes, domain).map(|(_, r)| r)
    }

    pub fn failures_db(&self) -> PathBuf {
        self.queue.dir.join("failures.db")
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The dotted key (`smtp.allowed_networks`) written on the line holding `offset`, found
/// from the text: the key left of `=`, under the nearest `[table]` header above it.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = text[start..end].trim();
    let key = line.split_once('=').map(|(k, _)| k.trim())?;
    let table = text[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    Some(match table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/floodgate/test.toml"))
    }

    const TOKEN: &str = "[admin]\ntoken = \"0123456789abcdef01234567\"\n";

    #[test]
    fn dkim_tables_parse_and_a_bad_domain_is_refused() {
        let text = format!(
            "{TOKEN}[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\nkey = \"/k.pem\"\n"
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.dkim.len(), 1);
        assert_eq!(config.dkim[0].selector, "s1");
        let bad = format!(
            "{TOKEN}[[dkim]]\ndomain = \"bad domain\"\nselector = \"s1\"\nkey = \"/k.pem\"\n"
        );
        assert!(
            parse(&bad)
                .unwrap_err()
                .to_string()
                .contains("not a domain")
        );
    }

    #[test]
    fn empty_file_gets_defaults() {
        let c = parse(TOKEN).unwrap();
        assert_eq!(c.smtp.max_recipients, 100);
        assert_eq!(c.queue.synchronous, Synchronous::Full);
        assert!(c.dns.nameservers.is_empty());
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = parse(&format!(
            "{TOKEN}[smtp]\nlisten = [\"127.0.0.1:25\"]\nmax_rcpts = 5\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("max_rcpts"), "{err}");
        assert!(err.contains("line 5"), "{err}");
    }

    #[test]
    fn bad_cidr_is_refused_with_line() {
        let err = parse(&format!(
            "{TOKEN}[smtp]\nallowed_networks = [\"10.0.0.0/33\"]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("key `smtp.allowed_networks`"), "{err}");
    }

    #[test]
    fn missing_certificate_names_key_and_line() {
        let err = parse(&format!(
            "{TOKEN}[smtp.tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("smtp.tls.cert"), "{err}");
        assert!(err.contains("test.toml:4"), "{err}");
        assert!(err.contains("does not exist"), "{err}");
    }

    #[test]
    fn short_or_placeholder_admin_token_is_refused() {
        for bad in ["short", "0123456789abcdef", token::PLACEHOLDER] {
            let err = parse(&format!("[admin]\ntoken = \"{bad}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("admin.token"), "{err}");
        }
        // No token at all is fine: one is generated at start.
        assert!(parse("[admin]\nlisten = \"127.0.0.1:8026\"\n").is_ok());
    }

    #[test]
    fn bad_campaign_source_is_refused() {
        let err = parse(&format!("{TOKEN}[smtp]\ncampaign_from = [\"header:\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("campaign_from"), "{err}");
    }
}

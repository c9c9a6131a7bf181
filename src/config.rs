//! Configuration: the TOML file's structs, their defaults, and validation with errors that
//! name the key, the line and the reason.
//!
//! Every table denies unknown keys, so a typo is an error at start-up rather than a setting
//! silently ignored at 3 a.m.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub mod canary;
pub mod cluster;
pub mod delivery;
pub mod diff;
pub mod dkim;
pub mod duration;
pub mod events;
pub mod faillog;
pub mod log;
pub mod route;
pub mod smtp;
pub mod suppression;
pub mod tls_report;
pub mod token;

pub use canary::CanaryConfig;
pub use cluster::ClusterConfig;
pub use delivery::{DeliveryConfig, Rate, StsMode};
pub use dkim::{DkimAlgorithm, DkimConfig};
pub use duration::Dur;
pub use events::EventsConfig;
pub use faillog::{FailLogConfig, FailLogMode, GuardAction, GuardConfig};
pub use log::{LogConfig, LogFormat};
pub use route::{Route, TlsMode, Transport};
pub use smtp::{SmtpConfig, TlsConfig, UserConfig};
pub use suppression::SuppressionConfig;
pub use tls_report::TlsReportConfig;

/// A refused key, before the file's path and line are attached.
#[derive(Debug)]
struct Refusal {
    key: String,
    /// Where in the file, when the value kept its span.
    span: Option<std::ops::Range<usize>>,
    why: String,
}

impl Refusal {
    fn new(key: impl Into<String>, why: impl Into<String>) -> Refusal {
        Refusal {
            key: key.into(),
            span: None,
            why: why.into(),
        }
    }

    fn at(mut self, span: std::ops::Range<usize>) -> Refusal {
        self.span = Some(span);
        self
    }
}

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
    #[serde(default)]
    pub suppression: SuppressionConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub canary: CanaryConfig,
    /// Absent: a single node, no Redis.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
    #[serde(default, rename = "route")]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dkim: Vec<DkimConfig>,
    #[serde(default)]
    pub tls_report: TlsReportConfig,
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
    /// Where `floodgate ctl backup` copies go (default `<dir>/backups`): the admin API
    /// only ever names a new folder in it.
    pub backup_dir: Option<PathBuf>,
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
            backup_dir: None,
        }
    }
}

impl QueueConfig {
    /// `backup_dir`, or `<dir>/backups`.
    pub fn backup_dir(&self) -> PathBuf {
        self.backup_dir
            .clone()
            .unwrap_or_else(|| self.dir.join("backups"))
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
        let base = path.parent().unwrap_or(Path::new("."));
        self.check(base).map_err(|r| ConfigError::Invalid {
            path: path.to_owned(),
            key: r.key,
            line: r.span.map(|s| line_of(text, s.start)),
            why: r.why,
        })
    }

    /// Every table's rules, in file order; the first refusal is reported. Relative paths
    /// are anchored at `base`, the config file's folder.
    fn check(&mut self, base: &Path) -> Result<(), Refusal> {
        self.smtp.check(base)?;
        self.check_http_and_admin()?;
        self.check_storage()?;
        if self.routes.is_empty() {
            // No [[route]] at all: every domain goes to its MX, the behaviour of a plain
            // relay. Once any route is written, only written routes apply.
            self.routes.push(Route::default_mx());
        }
        self.check_delivery()?;
        if let Some((key, why)) = self.suppression.unsubscribe.refusal() {
            return Err(Refusal::new(key, why));
        }
        if let Some(name) = (self.suppression.unsubscribe.api_keys.iter())
            .find(|n| !self.http.api_keys.iter().any(|k| &k.name == *n))
        {
            return Err(Refusal::new(
                "suppression.unsubscribe.api_keys",
                format!("no [[http.api_keys]] is named `{name}`"),
            ));
        }
        if let Some(key) = self.suppression.unknown_reason() {
            return Err(Refusal::new(
                "suppression.expire_after",
                format!(
                    "`{key}` is not a suppression reason (invalid_recipient, bad_domain, inactive_mailbox, unsubscribed, complaint, manual)"
                ),
            ));
        }
        self.check_routes_and_dkim()
    }

    fn check_http_and_admin(&self) -> Result<(), Refusal> {
        for key in &self.http.api_keys {
            let ok =
                key.key_sha256.len() == 64 && key.key_sha256.chars().all(|c| c.is_ascii_hexdigit());
            if !ok {
                return Err(Refusal::new(
                    "http.api_keys.key_sha256",
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
            return Err(Refusal::new("admin.token", why));
        }
        Ok(())
    }

    /// `[queue]` and `[dns]`.
    fn check_storage(&self) -> Result<(), Refusal> {
        if self.queue.max_batch == 0 {
            return Err(Refusal::new("queue.max_batch", "must be at least 1"));
        }
        if self.queue.retention.0.is_zero() {
            return Err(Refusal::new(
                "queue.retention",
                "must be above 0 (e.g. \"7d\")",
            ));
        }
        if self.dns.attempts == 0 || self.dns.timeout.0.is_zero() {
            return Err(Refusal::new(
                "dns.timeout / dns.attempts",
                "must be above 0",
            ));
        }
        Ok(())
    }

    /// `[delivery]`, `[faillog]`, `[guard]` and `[events]`.
    fn check_delivery(&self) -> Result<(), Refusal> {
        if self.delivery.backoff.is_empty()
            || self.delivery.batch == 0
            || self.delivery.concurrency == 0
            || self.delivery.max_concurrency == 0
        {
            return Err(Refusal::new(
                "delivery.backoff / batch / concurrency / max_concurrency",
                "backoff needs at least one wait; counts must be at least 1",
            ));
        }
        if self.faillog.sample_rate == 0
            || self.faillog.rows_per_sec == 0
            || self.faillog.batch_rows == 0
        {
            return Err(Refusal::new(
                "faillog.sample_rate / rows_per_sec / batch_rows",
                "must be at least 1",
            ));
        }
        if !(0.0..=1.0).contains(&self.guard.failure_ratio) || self.guard.window.0.is_zero() {
            return Err(Refusal::new(
                "guard.failure_ratio / guard.window",
                "failure_ratio must be within 0..=1 and window above 0",
            ));
        }
        self.log
            .validate()
            .map_err(|why| Refusal::new("log", why))?;
        self.canary
            .validate()
            .map_err(|why| Refusal::new("canary", why))?;
        if let Some(cluster) = &self.cluster {
            cluster
                .validate()
                .map_err(|why| Refusal::new("cluster", why))?;
        }
        self.events
            .validate()
            .map_err(|why| Refusal::new("events", why))
    }

    fn check_routes_and_dkim(&self) -> Result<(), Refusal> {
        for (i, route) in self.routes.iter().enumerate() {
            route
                .validate()
                .map_err(|why| Refusal::new(format!("route[{i}]"), why))?;
            if let Some(name) = &route.name
                && self.routes[..i]
                    .iter()
                    .any(|r| r.name.as_ref() == Some(name))
            {
                let why = format!("route name `{name}` is given to two routes");
                return Err(Refusal::new(format!("route[{i}].name"), why));
            }
        }
        for (i, table) in self.dkim.iter().enumerate() {
            table
                .check()
                .map_err(|why| Refusal::new(format!("dkim[{i}]"), why))?;
        }
        self.tls_report
            .check()
            .map_err(|(key, why)| Refusal::new(format!("tls_report.{key}"), why))
    }

    /// The route for a recipient domain, with its index in `routes`.
    pub fn route_for(&self, domain: &str) -> Option<&Route> {
        route::find(&self.routes, domain).map(|(_, r)| r)
    }

    pub fn failures_db(&self) -> PathBuf {
        self.queue.dir.join("failures.db")
    }

    /// MTA-STS policies and TLS-RPT counters (see `deliver::sts`).
    pub fn sts_db(&self) -> PathBuf {
        self.queue.dir.join("sts.db")
    }

    /// The MTA-STS mode for a domain delivered by `route` (its override, or `[delivery]`'s).
    pub fn sts_mode(&self, route: &Route) -> StsMode {
        match route.transport {
            Transport::Mx => route.mta_sts.unwrap_or(self.delivery.mta_sts),
            _ => StsMode::Off,
        }
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
    fn route_names_are_checked_and_unique() {
        let route = |name: &str| {
            format!("[[route]]\nname = \"{name}\"\ndomains = [\"*\"]\ntransport = \"mx\"\n")
        };
        let config = parse(&format!("{TOKEN}{}", route("mx-default"))).unwrap();
        assert_eq!(
            route::named(&config.routes, "mx-default").map(|r| r.transport),
            Some(Transport::Mx)
        );
        let twice = format!("{TOKEN}{}{}", route("a"), route("a"));
        let why = parse(&twice).unwrap_err().to_string();
        assert!(
            why.contains("route[1].name") && why.contains("two routes"),
            "{why}"
        );
        for bad in ["", "has space", "new\\nline"] {
            let why = parse(&format!("{TOKEN}{}", route(bad)))
                .unwrap_err()
                .to_string();
            assert!(why.contains("route name"), "{bad:?}: {why}");
        }
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

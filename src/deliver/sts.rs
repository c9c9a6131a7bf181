//! MTA-STS (RFC 8461) and TLS-RPT counting (RFC 8460) for MX delivery: which policy a
//! recipient domain has (looked up, fetched, cached and persisted here), and how many
//! sessions with its MX hosts had working TLS and how many failed, by RFC 8460 result
//! type. The courier asks [`Sts::policy`] and reports each session with [`Sts::count`];
//! enforcing is the courier's (`smtp.rs`), sending reports is `tls_report`'s.
//!
//! Lookup (RFC 8461 §5): the `_mta-sts.DOMAIN` TXT record on every delivery (hickory
//! caches it for its TTL); the policy is fetched only when no unexpired policy with that
//! TXT id is cached. A failed fetch, a failed TXT lookup or a withdrawn TXT record keep
//! the cached policy until its `max_age` runs out. Policies live in memory (at most
//! [`MAX_CACHED`] domains) and in sts.db (see `store`), which is read whole at start so
//! that a restart does not refetch.
//!
//! Counting costs a hash-map increment under a lock per session; [`Sts::flush`] writes
//! the counters to sts.db in one transaction (the reporter does it every minute), so no
//! row is written per session. At most [`MAX_PENDING`] distinct counters wait in memory;
//! beyond that sessions are dropped and counted as dropped.

pub mod store;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use rusqlite::Connection;

use crate::clock::Clock;
use crate::dns::{LookupError, MailDns};
use crate::mta_sts::{MAX_POLICY_BYTES, Mode, Policy, parse_sts_record};
use crate::net::client::{HttpClient, HttpError};
use crate::net::tls;
use crate::sqlite::OpenError;
pub use store::{CountKey, CountRow, PolicyRow};

/// Most domains whose policy is held in memory; the rest are read from sts.db.
pub const MAX_CACHED: usize = 10_000;
/// Most distinct counters waiting for a flush.
pub const MAX_PENDING: usize = 100_000;

/// RFC 8460 §4.3 result types (and `success`), as written in reports and sts.db.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TlsResult {
    Success,
    StarttlsNotSupported,
    CertificateHostMismatch,
    CertificateExpired,
    CertificateNotTrusted,
    ValidationFailure,
    StsPolicyFetchError,
    StsPolicyInvalid,
    StsWebpkiInvalid,
}

impl TlsResult {
    pub const ALL: [TlsResult; 9] = [
        TlsResult::Success,
        TlsResult::StarttlsNotSupported,
        TlsResult::CertificateHostMismatch,
        TlsResult::CertificateExpired,
        TlsResult::CertificateNotTrusted,
        TlsResult::ValidationFailure,
        TlsResult::StsPolicyFetchError,
        TlsResult::StsPolicyInvalid,
        TlsResult::StsWebpkiInvalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TlsResult::Success => "success",
            TlsResult::StarttlsNotSupported => "starttls-not-supported",
            TlsResult::CertificateHostMismatch => "certificate-host-mismatch",
            TlsResult::CertificateExpired => "certificate-expired",
            TlsResult::CertificateNotTrusted => "certificate-not-trusted",
            TlsResult::ValidationFailure => "validation-failure",
            TlsResult::StsPolicyFetchError => "sts-policy-fetch-error",
            TlsResult::StsPolicyInvalid => "sts-policy-invalid",
            TlsResult::StsWebpkiInvalid => "sts-webpki-invalid",
        }
    }

    /// The result type of a certificate the chain check refused.
    pub fn of_certificate(e: &rustls::Error) -> TlsResult {
        use rustls::CertificateError as C;
        match e {
            rustls::Error::InvalidCertificate(
                C::NotValidForName | C::NotValidForNameContext { .. },
            ) => TlsResult::CertificateHostMismatch,
            rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
                TlsResult::CertificateExpired
            }
            _ => TlsResult::CertificateNotTrusted,
        }
    }
}

/// A domain's policy as cached: the TXT id it was fetched under, the file's text (for
/// reports' `policy-string`), the parsed policy and when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    pub id: String,
    pub body: String,
    pub policy: Policy,
    pub expires_ms: i64,
}

impl Cached {
    fn from_row(row: PolicyRow) -> Option<(String, Cached)> {
        let policy = Policy::parse(row.body.as_bytes()).ok()?;
        Some((
            row.domain,
            Cached {
                id: row.id,
                body: row.body,
                policy,
                expires_ms: row.expires_ms,
            },
        ))
    }
}

/// Since start: the `/metrics` counters.
#[derive(Debug, Default)]
pub struct StsStats {
    pub fetched: AtomicU64,
    pub fetch_failed: AtomicU64,
    /// Deliveries that used a cached policy because the fetch or the TXT lookup failed.
    pub cache_fallbacks: AtomicU64,
    /// Recipients deferred because a policy in enforce could not be met.
    pub deferred: AtomicU64,
    /// Sessions that would have failed a policy, delivered anyway (testing).
    pub testing_failures: AtomicU64,
    /// TLS sessions and failures by [`TlsResult`] (index in [`TlsResult::ALL`]).
    pub results: [AtomicU64; 9],
    /// Sessions not counted because [`MAX_PENDING`] counters were waiting.
    pub dropped: AtomicU64,
}

/// What the courier needs to know to reach one MX domain.
#[derive(Debug, Clone, Copy)]
pub struct Fetch<'a> {
    pub port: u16,
    pub ca: Option<&'a Path>,
    pub timeout: Duration,
}

pub struct Sts {
    db: Arc<Mutex<Connection>>,
    memory: Mutex<HashMap<String, Arc<Cached>>>,
    /// Whether sts.db held more unexpired policies than memory: then a miss reads it.
    partial: bool,
    clients: Mutex<HashMap<Option<PathBuf>, Arc<HttpClient>>>,
    dns: Arc<MailDns>,
    clock: Arc<dyn Clock>,
    pending: Mutex<HashMap<CountKey, u64>>,
    pub stats: StsStats,
}

impl Sts {
    /// Opens sts.db at `path` and loads the unexpired policies.
    pub fn open(path: &Path, dns: Arc<MailDns>, clock: Arc<dyn Clock>) -> Result<Sts, OpenError> {
        let conn = store::open(path)?;
        let rows = store::unexpired_policies(&conn, clock.now_ms(), MAX_CACHED + 1)?;
        let partial = rows.len() > MAX_CACHED;
        let memory = rows
            .into_iter()
            .take(MAX_CACHED)
            .filter_map(Cached::from_row)
            .map(|(d, c)| (d, Arc::new(c)))
            .collect();
        Ok(Sts {
            db: Arc::new(Mutex::new(conn)),
            memory: Mutex::new(memory),
            partial,
            clients: Mutex::default(),
            dns,
            clock,
            pending: Mutex::default(),
            stats: StsStats::default(),
        })
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Policies held in memory (a gauge).
    pub fn cached(&self) -> usize {
        self.memory.lock().len()
    }

    /// The policy in force for `domain`, or `None` (no policy, `mode: none`, or none could
    /// be had: then delivery goes on as without one, RFC 8461 §5).
    pub async fn policy(&self, domain: &str, fetch: Fetch<'_>) -> Option<Arc<Cached>> {
        let txt = self.dns.resolver().txt(&format!("_mta-sts.{domain}")).await;
        let id = match txt {
            Ok(r) => {
                // RFC 8461 §3.1: several STSv1 records are as none.
                let ids: Vec<String> = r.items.iter().filter_map(|t| parse_sts_record(t)).collect();
                (ids.len() == 1).then(|| ids[0].clone())
            }
            Err(LookupError::NxDomain { .. } | LookupError::NoData { .. }) => None,
            Err(LookupError::Temporary(e)) => {
                tracing::debug!(domain, error = %e, "_mta-sts lookup failed; using the cached policy if any");
                None
            }
        };
        let cached = self.lookup_cached(domain).await;
        let found = match (id, cached) {
            (Some(id), Some(c)) if c.id == id => Some(c),
            (Some(id), cached) => match self.fetch(domain, &id, fetch).await {
                Ok(fresh) => Some(fresh),
                Err(result) => {
                    self.stats.fetch_failed.fetch_add(1, Ordering::Relaxed);
                    // Reported under the `sts` policy type: the domain advertised one.
                    self.count(domain, true, result, "", None);
                    if cached.is_some() {
                        self.stats.cache_fallbacks.fetch_add(1, Ordering::Relaxed);
                    }
                    cached
                }
            },
            (None, cached) => cached,
        };
        found.filter(|c| c.policy.mode != Mode::None)
    }

    async fn lookup_cached(&self, domain: &str) -> Option<Arc<Cached>> {
        let now = self.clock.now_ms();
        if let Some(c) = self.memory.lock().get(domain).cloned() {
            return (c.expires_ms > now).then_some(c);
        }
        if !self.partial {
            return None;
        }
        let db = self.db.clone();
        let domain = domain.to_owned();
        let row = tokio::task::spawn_blocking(move || store::policy(&db.lock(), &domain, now))
            .await
            .ok()?
            .ok()??;
        let (domain, cached) = Cached::from_row(row)?;
        let cached = Arc::new(cached);
        self.remember(domain, cached.clone());
        Some(cached)
    }

    fn remember(&self, domain: String, cached: Arc<Cached>) {
        let mut memory = self.memory.lock();
        if memory.len() >= MAX_CACHED && !memory.contains_key(&domain) {
            // The policy closest to expiry goes; sts.db still has it.
            if let Some(oldest) = memory
                .iter()
                .min_by_key(|(_, c)| c.expires_ms)
                .map(|(d, _)| d.clone())
            {
                memory.remove(&oldest);
            }
        }
        memory.insert(domain, cached);
    }

    /// Fetches, parses and stores the policy of `domain` published under TXT `id`.
    async fn fetch(&self, domain: &str, id: &str, f: Fetch<'_>) -> Result<Arc<Cached>, TlsResult> {
        let host = format!("mta-sts.{domain}");
        let url = if f.port == 443 {
            format!("https://{host}/.well-known/mta-sts.txt")
        } else {
            format!("https://{host}:{}/.well-known/mta-sts.txt", f.port)
        };
        let ip = match self.dns.resolver().ips(&host).await {
            Ok(r) => r.items.first().copied(),
            Err(_) => None,
        };
        let Some(ip) = ip else {
            tracing::info!(domain, %host, "MTA-STS policy host has no address");
            return Err(TlsResult::StsPolicyFetchError);
        };
        let client = self.https_client(f.ca).map_err(|e| {
            tracing::warn!(domain, error = %e, "MTA-STS: TLS setup");
            TlsResult::StsPolicyFetchError
        })?;
        let response = client
            .request_at(
                hyper::Method::GET,
                &url,
                Some(ip),
                &[],
                Bytes::new(),
                f.timeout,
            )
            .await
            .map_err(|e| {
                tracing::info!(domain, error = %e, "MTA-STS policy fetch failed");
                match e {
                    HttpError::Tls { .. } => TlsResult::StsWebpkiInvalid,
                    _ => TlsResult::StsPolicyFetchError,
                }
            })?;
        // RFC 8461 §3.3: 200 only (no redirects followed), text/plain, bounded size.
        let text_plain = response
            .headers
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().to_ascii_lowercase().starts_with("text/plain"));
        if response.status != 200 {
            tracing::info!(
                domain,
                status = response.status,
                "MTA-STS policy fetch refused"
            );
            return Err(TlsResult::StsPolicyFetchError);
        }
        if response.truncated || !text_plain {
            tracing::info!(domain, "MTA-STS policy too large or not text/plain");
            return Err(TlsResult::StsPolicyInvalid);
        }
        let policy = Policy::parse(&response.body).map_err(|e| {
            tracing::info!(domain, error = %e, "MTA-STS policy invalid");
            TlsResult::StsPolicyInvalid
        })?;
        let now = self.clock.now_ms();
        let row = PolicyRow {
            domain: domain.to_owned(),
            id: id.to_owned(),
            body: String::from_utf8_lossy(&response.body).into_owned(),
            fetched_ms: now,
            expires_ms: now.saturating_add(policy.max_age.saturating_mul(1000) as i64),
        };
        let cached = Arc::new(Cached {
            id: row.id.clone(),
            body: row.body.clone(),
            policy,
            expires_ms: row.expires_ms,
        });
        let db = self.db.clone();
        match tokio::task::spawn_blocking(move || store::put_policy(&db.lock(), &row)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(domain, error = %e, "MTA-STS policy not persisted"),
            Err(e) => tracing::warn!(domain, error = %e, "MTA-STS policy not persisted"),
        }
        self.stats.fetched.fetch_add(1, Ordering::Relaxed);
        tracing::info!(domain, id, mode = ?cached.policy.mode, "MTA-STS policy fetched");
        self.remember(domain.to_owned(), cached.clone());
        Ok(cached)
    }

    /// The policy held in memory for `domain`, expired or not (for reports).
    pub fn cached_policy(&self, domain: &str) -> Option<Arc<Cached>> {
        self.memory.lock().get(domain).cloned()
    }

    /// An HTTPS client verifying against `ca` (or the web roots), without keep-alive:
    /// for policy fetches and TLS report POSTs, each rare.
    pub fn https_client(&self, ca: Option<&Path>) -> Result<Arc<HttpClient>, String> {
        let key = ca.map(Path::to_path_buf);
        let mut clients = self.clients.lock();
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        // No keep-alive: a policy is fetched once per max_age. One byte over the limit
        // tells a too-large policy from one exactly at it.
        let client = Arc::new(
            HttpClient::new(tls::verified(ca)?, Duration::ZERO, MAX_POLICY_BYTES + 1)
                .with_clock(self.clock.clone()),
        );
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// Counts one session (or one policy failure before any session) for `domain`'s
    /// TLS report on today's UTC date.
    pub fn count(&self, domain: &str, sts: bool, result: TlsResult, mx: &str, ip: Option<IpAddr>) {
        let index = TlsResult::ALL
            .iter()
            .position(|r| *r == result)
            .unwrap_or(0);
        self.stats.results[index].fetch_add(1, Ordering::Relaxed);
        let key = CountKey {
            day: utc_day(self.clock.now_ms()),
            domain: domain.to_owned(),
            policy_type: if sts { "sts" } else { "no-policy-found" },
            result: result.as_str(),
            mx: mx.to_owned(),
            ip: ip.map(|i| i.to_string()).unwrap_or_default(),
        };
        let mut pending = self.pending.lock();
        let full = pending.len() >= MAX_PENDING;
        match pending.get_mut(&key) {
            Some(n) => *n += 1,
            None if full => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                pending.insert(key, 1);
            }
        }
    }

    /// Writes the counters waiting in memory to sts.db, in one transaction; on failure
    /// they wait for the next flush.
    pub async fn flush(&self) -> rusqlite::Result<()> {
        let counts: Vec<(CountKey, u64)> = std::mem::take(&mut *self.pending.lock())
            .into_iter()
            .collect();
        if counts.is_empty() {
            return Ok(());
        }
        let kept = counts.clone();
        if let Err(e) = self
            .with_db(move |conn| store::add_counts(conn, &counts))
            .await
        {
            let mut pending = self.pending.lock();
            for (k, n) in kept {
                *pending.entry(k).or_default() += n;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Runs `f` on sts.db on the blocking pool.
    pub async fn with_db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> rusqlite::Result<T> {
        let db = self.db.clone();
        // A panicked closure comes back as an error of the one type callers handle.
        tokio::task::spawn_blocking(move || f(&mut db.lock()))
            .await
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?
    }
}

/// The UTC date of `ms` since the epoch, `YYYY-MM-DD`.
pub fn utc_day(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y-%m-%d")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_utc_dates() {
        assert_eq!(utc_day(0), "1970-01-01");
        assert_eq!(utc_day(1_764_633_600_000), "2025-12-02");
        assert_eq!(utc_day(1_764_633_599_999), "2025-12-01");
    }

    #[test]
    fn certificate_errors_have_their_result_type() {
        use rustls::CertificateError as C;
        let r = |c| TlsResult::of_certificate(&rustls::Error::InvalidCertificate(c));
        assert_eq!(r(C::NotValidForName), TlsResult::CertificateHostMismatch);
        assert_eq!(r(C::Expired), TlsResult::CertificateExpired);
        assert_eq!(r(C::UnknownIssuer), TlsResult::CertificateNotTrusted);
    }
}

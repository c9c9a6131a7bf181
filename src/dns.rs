//! DNS: the `Resolver` trait, its hickory implementation, the mail-host rules (null MX,
//! implicit MX) and the verdict cache that makes a flood at one domain cost one lookup.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::{Resolver as HickoryResolver, TokioResolver};
use parking_lot::Mutex;
use tokio::sync::OnceCell;

use crate::clock::Clock;
use crate::config::DnsConfig;
pub use crate::future::BoxFuture;

/// One MX record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHost {
    pub preference: u16,
    /// Host name, lower case, without the trailing dot.
    pub exchange: String,
}

/// Records found, with how long they may be trusted.
#[derive(Debug, Clone)]
pub struct Records<T> {
    pub items: Vec<T>,
    pub ttl: Duration,
}

/// Why a lookup found nothing.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    /// The name does not exist (authoritative NXDOMAIN).
    #[error("no such domain")]
    NxDomain { ttl: Option<Duration> },
    /// The name exists but has no record of the asked type.
    #[error("no records of that type")]
    NoData { ttl: Option<Duration> },
    /// Timeout, SERVFAIL, refused, network error: ask again later.
    #[error("temporary DNS failure: {0}")]
    Temporary(String),
}

/// What Floodgate asks of DNS. Implementations do the network work; caching and the
/// mail rules sit above in [`MailDns`].
pub trait Resolver: Send + Sync + 'static {
    fn mx(&self, domain: &str) -> BoxFuture<'_, Result<Records<MxHost>, LookupError>>;
    fn ips(&self, host: &str) -> BoxFuture<'_, Result<Records<IpAddr>, LookupError>>;
    /// The TXT records at `name`, each record's character-strings joined (RFC 7208 §3.3
    /// style), invalid UTF-8 replaced. Used for `_mta-sts` and `_smtp._tls` records.
    fn txt(&self, name: &str) -> BoxFuture<'_, Result<Records<String>, LookupError>>;
}

/// hickory-resolver, either the system's configuration or explicit nameservers.
pub struct Hickory {
    resolver: TokioResolver,
}

impl Hickory {
    pub fn new(config: &DnsConfig) -> Result<Hickory, NetError> {
        let mut builder = if config.nameservers.is_empty() {
            TokioResolver::builder_tokio()?
        } else {
            let servers = config
                .nameservers
                .iter()
                .map(|addr| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                })
                .collect();
            HickoryResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts = builder.options_mut();
        if !config.nameservers.is_empty() {
            // Explicit nameservers mean explicit answers: /etc/hosts must not shadow them.
            opts.use_hosts_file = ResolveHosts::Never;
        }
        opts.timeout = config.timeout.0;
        opts.attempts = config.attempts;
        // Our own cache holds verdicts; hickory's holds the raw records for delivery.
        opts.cache_size = 4096;
        Ok(Hickory {
            resolver: builder.build()?,
        })
    }
}

fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_owned()
    } else {
        format!("{name}.")
    }
}

fn classify(err: NetError) -> LookupError {
    match err {
        NetError::Dns(DnsError::NoRecordsFound(nr)) => {
            let ttl = nr.negative_ttl.map(|s| Duration::from_secs(s.into()));
            if nr.response_code == ResponseCode::NXDomain {
                LookupError::NxDomain { ttl }
            } else {
                LookupError::NoData { ttl }
            }
        }
        other => LookupError::Temporary(other.to_string()),
    }
}

impl Resolver for Hickory {
    fn mx(&self, domain: &str) -> BoxFuture<'_, Result<Records<MxHost>, LookupError>> {
        let name = fqdn(domain);
        Box::pin(async move {
            let lookup = self.resolver.mx_lookup(name).await.map_err(classify)?;
            let ttl = lookup
                .valid_until()
                .saturating_duration_since(Instant::now());
            let items = lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::MX(mx) => Some(MxHost {
                        preference: mx.preference,
                        exchange: mx
                            .exchange
                            .to_ascii()
                            .trim_end_matches('.')
                            .to_ascii_lowercase(),
                    }),
                    _ => None,
                })
                .collect();
            Ok(Records { items, ttl })
        })
    }

    fn ips(&self, host: &str) -> BoxFuture<'_, Result<Records<IpAddr>, LookupError>> {
        let name = fqdn(host);
        Box::pin(async move {
            let lookup = self.resolver.lookup_ip(name).await.map_err(classify)?;
            let ttl = lookup
                .valid_until()
                .saturating_duration_since(Instant::now());
            Ok(Records {
                items: lookup.iter().collect(),
                ttl,
            })
        })
    }

    fn txt(&self, name: &str) -> BoxFuture<'_, Result<Records<String>, LookupError>> {
        let name = fqdn(name);
        Box::pin(async move {
            let lookup = self
                .resolver
                .lookup(name, RecordType::TXT)
                .await
                .map_err(classify)?;
            let ttl = lookup
                .valid_until()
                .saturating_duration_since(Instant::now());
            let items = lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(txt) => Some(
                        txt.txt_data
                            .iter()
                            .map(|part| String::from_utf8_lossy(part))
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect();
            Ok(Records { items, ttl })
        })
    }
}

/// Whether a domain can receive mail, the answer the RCPT check needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Deliverable: these hosts, best preference first. With no MX the domain itself is
    /// its implicit MX (RFC 5321 §5.1).
    Mail(Arc<[MxHost]>),
    /// RFC 7505: the domain says it accepts no mail.
    NullMx,
    /// NXDOMAIN.
    NoSuchDomain,
    /// The domain exists but has neither MX nor A/AAAA.
    NoMailHost,
    /// Timeout or server failure: the client should retry.
    Temporary,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct DnsStats {
    pub lookups: AtomicU64,
    pub cache_hits: AtomicU64,
}

struct Slot {
    cell: OnceCell<(Verdict, Instant)>,
}

struct Cache {
    slots: HashMap<Box<str>, Arc<Slot>>,
    capacity: usize,
    min_ttl: Duration,
    max_ttl: Duration,
    temp_fail_ttl: Duration,
}

impl Cache {
    fn new(config: &DnsConfig) -> Cache {
        Cache {
            slots: HashMap::new(),
            capacity: config.cache_size.max(16),
            min_ttl: config.min_ttl.0,
            max_ttl: config.max_ttl.0.max(config.min_ttl.0),
            temp_fail_ttl: config.temp_fail_ttl.0,
        }
    }
}

/// The mail rules over a [`Resolver`], with a bounded cache of verdicts in which
/// concurrent asks for one domain share a single lookup.
pub struct MailDns {
    resolver: ArcSwap<Arc<dyn Resolver>>,
    cache: Mutex<Cache>,
    /// Ages cached verdicts (tests move it to expire them without waiting out a TTL).
    clock: Arc<dyn Clock>,
    pub stats: DnsStats,
}

impl MailDns {
    pub fn new(resolver: Arc<dyn Resolver>, config: &DnsConfig, clock: Arc<dyn Clock>) -> MailDns {
        MailDns {
            resolver: ArcSwap::from_pointee(resolver),
            cache: Mutex::new(Cache::new(config)),
            clock,
            stats: DnsStats::default(),
        }
    }

    pub fn resolver(&self) -> Arc<dyn Resolver> {
        (*self.resolver.load_full()).clone()
    }

    /// Applies new DNS settings (SIGHUP): a new resolver, new TTL bounds, an empty cache.
    pub fn reconfigure(&self, resolver: Arc<dyn Resolver>, config: &DnsConfig) {
        self.resolver.store(Arc::new(resolver));
        *self.cache.lock() = Cache::new(config);
    }

    /// The verdict for `domain` (lower-cased ASCII, no trailing dot), from the cache when
    /// it is fresh. A miss costs at most one MX and one address lookup however many
    /// callers ask at once.
    pub async fn verdict(&self, domain: &str) -> Verdict {
        let slot = self.slot(domain);
        let mut fresh = false;
        let (verdict, _) = slot
            .cell
            .get_or_init(|| {
                fresh = true;
                self.lookup(domain)
            })
            .await;
        if !fresh {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
        }
        verdict.clone()
    }

    fn slot(&self, domain: &str) -> Arc<Slot> {
        let now = self.clock.now_instant();
        let mut cache = self.cache.lock();
        if let Some(slot) = cache.slots.get(domain) {
            match slot.cell.get() {
                Some((_, expires)) if *expires <= now => {}
                _ => return slot.clone(),
            }
        }
        let capacity = cache.capacity;
        if cache.slots.len() >= capacity {
            evict(&mut cache.slots, now, capacity);
        }
        let slot = Arc::new(Slot {
            cell: OnceCell::new(),
        });
        cache.slots.insert(domain.into(), slot.clone());
        slot
    }

    async fn lookup(&self, domain: &str) -> (Verdict, Instant) {
        self.stats.lookups.fetch_add(1, Ordering::Relaxed);
        let resolver = self.resolver();
        let (verdict, ttl) = match resolver.mx(domain).await {
            Ok(records) => mx_verdict(domain, records.items, records.ttl),
            Err(LookupError::NxDomain { ttl }) => (Verdict::NoSuchDomain, ttl),
            Err(LookupError::NoData { .. }) => match resolver.ips(domain).await {
                Ok(r) if !r.items.is_empty() => (implicit_mx(domain), Some(r.ttl)),
                Ok(_) => (Verdict::NoMailHost, None),
                Err(LookupError::NxDomain { ttl } | LookupError::NoData { ttl }) => {
                    (Verdict::NoMailHost, ttl)
                }
                Err(LookupError::Temporary(why)) => {
                    tracing::debug!(%domain, %why, "address lookup failed");
                    (Verdict::Temporary, None)
                }
            },
            Err(LookupError::Temporary(why)) => {
                tracing::debug!(%domain, %why, "MX lookup failed");
                (Verdict::Temporary, None)
            }
        };
        let ttl = {
            let cache = self.cache.lock();
            match verdict {
                Verdict::Temporary => cache.temp_fail_ttl,
                _ => ttl
                    .unwrap_or(cache.min_ttl)
                    .clamp(cache.min_ttl, cache.max_ttl),
            }
        };
        (verdict, self.clock.now_instant() + ttl)
    }
}

fn implicit_mx(domain: &str) -> Verdict {
    Verdict::Mail(Arc::from(vec![MxHost {
        preference: 0,
        exchange: domain.to_owned(),
    }]))
}

/// Applies RFC 7505 and sorts by preference.
fn mx_verdict(domain: &str, mut hosts: Vec<MxHost>, ttl: Duration) -> (Verdict, Option<Duration>) {
    if hosts.is_empty() {
        return (implicit_mx(domain), Some(ttl));
    }
    // A null MX is a single record whose exchange is the root; when it stands among
    // real MX records (a misconfiguration) the real ones are used.
    hosts.retain(|h| !h.exchange.is_empty());
    if hosts.is_empty() {
        return (Verdict::NullMx, Some(ttl));
    }
    hosts.sort_by_key(|h| h.preference);
    (Verdict::Mail(hosts.into()), Some(ttl))
}

/// Drops expired verdicts, then, if the cache is still full, an arbitrary tenth of it: a
/// full cache must never refuse to answer, only cost a few repeat lookups.
fn evict(slots: &mut HashMap<Box<str>, Arc<Slot>>, now: Instant, capacity: usize) {
    slots.retain(|_, s| s.cell.get().is_none_or(|(_, exp)| *exp > now));
    if slots.len() >= capacity {
        let drop: Vec<Box<str>> = slots.keys().take(capacity / 10 + 1).cloned().collect();
        for key in drop {
            slots.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ShiftedClock, SystemClock};
    use std::sync::atomic::AtomicUsize;

    /// A resolver whose answers come from a table, counting calls; it sleeps so that
    /// concurrent callers overlap.
    struct Table {
        calls: AtomicUsize,
    }

    impl Resolver for Table {
        fn mx(&self, domain: &str) -> BoxFuture<'_, Result<Records<MxHost>, LookupError>> {
            let domain = domain.to_owned();
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                if domain == "nx.test" {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let mx = |exchange: &str| MxHost {
                    preference: 10,
                    exchange: exchange.into(),
                };
                match domain.as_str() {
                    "mx.test" => Ok(Records {
                        items: vec![
                            mx("b.mx.test"),
                            MxHost {
                                preference: 5,
                                exchange: "a.mx.test".into(),
                            },
                        ],
                        ttl: Duration::from_secs(60),
                    }),
                    "null.test" => Ok(Records {
                        items: vec![mx("")],
                        ttl: Duration::from_secs(60),
                    }),
                    "a-only.test" | "nothing.test" => Err(LookupError::NoData { ttl: None }),
                    "broken.test" => Err(LookupError::Temporary("servfail".into())),
                    _ => Err(LookupError::NxDomain {
                        ttl: Some(Duration::from_secs(60)),
                    }),
                }
            })
        }

        fn ips(&self, host: &str) -> BoxFuture<'_, Result<Records<IpAddr>, LookupError>> {
            let found = host == "a-only.test";
            Box::pin(async move {
                if found {
                    Ok(Records {
                        items: vec!["127.0.0.1".parse().unwrap()],
                        ttl: Duration::from_secs(60),
                    })
                } else {
                    Err(LookupError::NoData { ttl: None })
                }
            })
        }

        fn txt(&self, _name: &str) -> BoxFuture<'_, Result<Records<String>, LookupError>> {
            Box::pin(async { Err(LookupError::NoData { ttl: None }) })
        }
    }

    fn dns() -> (Arc<Table>, MailDns) {
        let table = Arc::new(Table {
            calls: AtomicUsize::new(0),
        });
        let dns = MailDns::new(table.clone(), &DnsConfig::default(), Arc::new(SystemClock));
        (table, dns)
    }

    #[tokio::test]
    async fn verdict_table() {
        let (_, dns) = dns();
        match dns.verdict("mx.test").await {
            Verdict::Mail(hosts) => assert_eq!(hosts[0].exchange, "a.mx.test"),
            other => panic!("{other:?}"),
        }
        assert_eq!(dns.verdict("null.test").await, Verdict::NullMx);
        assert_eq!(dns.verdict("nx.test").await, Verdict::NoSuchDomain);
        assert_eq!(dns.verdict("nothing.test").await, Verdict::NoMailHost);
        assert_eq!(dns.verdict("broken.test").await, Verdict::Temporary);
        match dns.verdict("a-only.test").await {
            Verdict::Mail(hosts) => assert_eq!(hosts[0].exchange, "a-only.test"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn concurrent_asks_share_one_lookup() {
        let (table, dns) = dns();
        let dns = Arc::new(dns);
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let dns = dns.clone();
                tokio::spawn(async move { dns.verdict("nx.test").await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), Verdict::NoSuchDomain);
        }
        assert_eq!(table.calls.load(Ordering::SeqCst), 1);
        assert_eq!(dns.stats.lookups.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn cache_stays_bounded() {
        let table = Arc::new(Table {
            calls: AtomicUsize::new(0),
        });
        let config = DnsConfig {
            cache_size: 100,
            ..DnsConfig::default()
        };
        let dns = MailDns::new(table, &config, Arc::new(SystemClock));
        for i in 0..1000 {
            dns.verdict(&format!("d{i}.test")).await;
        }
        assert!(dns.cache.lock().slots.len() <= 100);
    }

    #[tokio::test]
    async fn cached_verdict_expires_with_the_clock() {
        let table = Arc::new(Table {
            calls: AtomicUsize::new(0),
        });
        let clock = Arc::new(ShiftedClock::default());
        let dns = MailDns::new(table.clone(), &DnsConfig::default(), clock.clone());
        dns.verdict("mx.test").await;
        dns.verdict("mx.test").await;
        assert_eq!(
            table.calls.load(Ordering::SeqCst),
            1,
            "second ask is a cache hit"
        );
        clock.advance(Duration::from_secs(24 * 3600));
        dns.verdict("mx.test").await;
        assert_eq!(
            table.calls.load(Ordering::SeqCst),
            2,
            "an expired verdict is looked up again"
        );
    }
}

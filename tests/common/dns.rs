//! A real authoritative DNS server (hickory-server 0.26) for the zone `test.`, plus a
//! black-hole nameserver, so integration tests exercise the real resolver over real UDP/TCP.
//!
//! # How hickory-resolver 0.26 reports each outcome (verified by `tests/harness/dns_tests.rs`)
//!
//! All lookups (`TokioResolver::mx_lookup`, `ipv4_lookup`, `ipv6_lookup`, `lookup`) return
//! `Result<hickory_resolver::lookup::Lookup, hickory_resolver::net::NetError>`
//! (`lookup_ip` returns `Result<hickory_resolver::lookup_ip::LookupIp, NetError>`).
//! There are no typed `MxLookup` etc. any more: read `lookup.answers(): &[Record]` and match
//! `record.data` against `hickory_resolver::proto::rr::RData::MX(mx)` (`mx.preference: u16`,
//! `mx.exchange: Name`, both pub fields). `lookup.valid_until(): Instant` gives the positive TTL.
//! `NetError`, `DnsError` and `NoRecords` live in `hickory_resolver::net` (re-export of
//! hickory-net); `ResponseCode` is `hickory_resolver::proto::op::ResponseCode`.
//!
//! * **NXDOMAIN** (name does not exist):
//!   `Err(NetError::Dns(DnsError::NoRecordsFound(NoRecords { response_code: ResponseCode::NXDomain, negative_ttl: Some(secs), soa: Some(_), .. })))`.
//!   `err.is_nx_domain()` is true, `err.is_no_records_found()` is true.
//!   `negative_ttl` = min(SOA record TTL, SOA MINIMUM), present only when the server put the
//!   SOA in the authority section (this server does). `NoRecords` is `#[non_exhaustive]`:
//!   match with `..`. Cached by the resolver for the negative TTL (second lookup: no query).
//! * **NODATA** (name exists, no record of that type, e.g. MX lookup of a name that only has A):
//!   the same `NetError::Dns(DnsError::NoRecordsFound(NoRecords { response_code: ResponseCode::NoError, negative_ttl: Some(secs), .. }))`;
//!   `is_no_records_found()` true, `is_nx_domain()` false. Also negatively cached.
//!   (RFC 5321 §5.1: no MX but an A/AAAA => use the A/AAAA as implicit MX.)
//! * **Null MX** (RFC 7505): a *successful* lookup with one `RData::MX` whose
//!   `preference == 0` and `exchange.is_root()` (it displays as `"."`).
//! * **SERVFAIL**: `Err(NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail)))`.
//!   Not cached, and it *is* retried: one lookup sends `1 + attempts` queries
//!   (RetryDnsHandle re-sends on every error except NoRecordsFound/NoConnections).
//!   REFUSED etc. come back the same way as `DnsError::ResponseCode(code)`.
//! * **Timeout** (server never answers): `Err(NetError::Timeout)`, after roughly
//!   `timeout * (1 + attempts)`. Also sends `1 + attempts` queries. Not cached.
//! * Nothing listening: over UDP it is indistinguishable from a black hole (`NetError::Timeout`,
//!   ICMP port-unreachable is not surfaced); a TCP-only config gets `NetError::NoConnections`
//!   immediately (not retried).
//! * **Truncated** answer (TC bit, here > ~1232 bytes with the default EDNS payload): with
//!   `NameServerConfig::udp_and_tcp` the pool silently retries over TCP (2 queries, success);
//!   with `NameServerConfig::udp` alone it fails with `NetError::Truncated`. Use `udp_and_tcp`.
//! * A name outside every zone the server serves: `DnsError::ResponseCode(ResponseCode::Refused)`.
//!
//! Building a resolver against a custom nameserver (no system config, no /etc/resolv.conf):
//! ```ignore
//! use hickory_resolver::{TokioResolver, config::*, net::runtime::TokioRuntimeProvider};
//! let mut ns = NameServerConfig::udp_and_tcp(addr.ip()); // or ::udp(ip) for UDP only
//! for c in &mut ns.connections { c.port = addr.port(); }  // ConnectionConfig.port is pub
//! let config = ResolverConfig::from_name_servers(vec![ns]);
//! let mut opts = ResolverOpts::default();                   // #[non_exhaustive]: mutate fields
//! opts.timeout = Duration::from_millis(300);               // per attempt, default 5 s
//! opts.attempts = 1;                                       // RE-tries; default 2
//! opts.cache_size = 8192;                                  // default; moka LRU, 0 = no cache
//! opts.use_hosts_file = ResolveHosts::Never;                // default Auto reads /etc/hosts
//! let resolver = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
//!     .with_options(opts)
//!     .build()?;                                           // Result<_, NetError>
//! ```
//! Query with a trailing dot (`"example.test."`) so no search-list expansion happens.
//! Identical lookups in flight at the same time usually share one query (NameServerPool
//! dedupes them), but not reliably under load: Floodgate does not count on it, its own
//! verdict cache (`src/dns.rs`) coalesces. Answered and negative results are cached.
//! `Resolver::clear_cache()` empties the cache (e.g. between test phases).

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::{Time, TokioRuntimeProvider};
use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::rr::rdata::{A, AAAA, MX, SOA, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, MessageResponseBuilder, ZoneType};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;

/// Builder for the contents of the zone `test.`. Every name must end in `.test`
/// (a trailing dot is optional).
pub struct Zone {
    records: Vec<Record>,
    servfail: HashSet<LowerName>,
    ttl: u32,
    negative_ttl: u32,
}

impl Default for Zone {
    fn default() -> Self {
        Self::new()
    }
}

/// Parses `name` as a fully-qualified name inside `test.`; panics otherwise because a
/// record outside the zone would silently never be served.
fn fqdn(name: &str) -> Name {
    let mut n = Name::from_str(name).unwrap_or_else(|e| panic!("bad DNS name {name:?}: {e}"));
    n.set_fqdn(true);
    assert!(
        Name::from_ascii("test.").unwrap().zone_of(&n),
        "{name:?} is not inside the test zone `test.`"
    );
    n
}

impl Zone {
    /// An empty zone: only the SOA. Default TTL 300 s, negative TTL 60 s.
    pub fn new() -> Self {
        Zone {
            records: Vec::new(),
            servfail: HashSet::new(),
            ttl: 300,
            negative_ttl: 60,
        }
    }

    /// TTL for records added after this call.
    pub fn ttl(mut self, secs: u32) -> Self {
        self.ttl = secs;
        self
    }

    /// Negative-caching TTL (SOA MINIMUM and the SOA's own TTL) for NXDOMAIN/NODATA answers.
    pub fn negative_ttl(mut self, secs: u32) -> Self {
        self.negative_ttl = secs;
        self
    }

    fn push(mut self, name: &str, data: RData) -> Self {
        self.records
            .push(Record::from_rdata(fqdn(name), self.ttl, data));
        self
    }

    pub fn mx(self, domain: &str, pref: u16, exchange: &str) -> Self {
        let exchange = fqdn(exchange);
        self.push(domain, RData::MX(MX::new(pref, exchange)))
    }

    /// RFC 7505 null MX: `domain. MX 0 .`
    pub fn null_mx(self, domain: &str) -> Self {
        self.push(domain, RData::MX(MX::new(0, Name::root())))
    }

    pub fn a(self, name: &str, ip: Ipv4Addr) -> Self {
        self.push(name, RData::A(A(ip)))
    }

    pub fn aaaa(self, name: &str, ip: Ipv6Addr) -> Self {
        self.push(name, RData::AAAA(AAAA(ip)))
    }

    /// A TXT record. A value over 255 octets is split into several character-strings, as
    /// DNS requires (a DKIM RSA-2048 key record is about 400 octets); readers join them.
    pub fn txt(self, name: &str, value: &str) -> Self {
        let parts = value
            .as_bytes()
            .chunks(255)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        self.push(name, RData::TXT(TXT::new(parts)))
    }

    /// Every query for exactly this name (any type) is answered SERVFAIL.
    pub fn servfail(mut self, domain: &str) -> Self {
        self.servfail.insert(LowerName::new(&fqdn(domain)));
        self
    }
}

/// Request handler in front of the catalog: counts every query and injects SERVFAIL,
/// which the in-memory zone handler has no way to express.
struct Handler {
    catalog: Catalog,
    servfail: HashSet<LowerName>,
    queries: Arc<AtomicUsize>,
}

// Written out by hand instead of `#[async_trait]` so the harness needs no extra dev-dependency:
// this is exactly the signature `async_trait` generates for `RequestHandler::handle_request`.
impl RequestHandler for Handler {
    fn handle_request<'life0, 'life1, 'async_trait, R, T>(
        &'life0 self,
        request: &'life1 Request,
        mut response_handle: R,
    ) -> Pin<Box<dyn Future<Output = ResponseInfo> + Send + 'async_trait>>
    where
        R: ResponseHandler + 'async_trait,
        T: Time + 'async_trait,
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            self.queries.fetch_add(1, Ordering::SeqCst);
            let fail = request
                .queries
                .queries()
                .iter()
                .any(|q| self.servfail.contains(q.name()));
            if !fail {
                return self
                    .catalog
                    .handle_request::<R, T>(request, response_handle)
                    .await;
            }
            let response = MessageResponseBuilder::new(&request.queries, None)
                .error_msg(&request.metadata, ResponseCode::ServFail);
            response_handle
                .send_response(response)
                .await
                .expect("send SERVFAIL response")
        })
    }
}

/// Binds a UDP socket and a TCP listener on the same free port of `ip`. Retries because
/// the port picked for UDP may already be taken for TCP by someone else.
async fn bind_pair(ip: Ipv4Addr) -> (UdpSocket, TcpListener) {
    for _ in 0..50 {
        let udp = UdpSocket::bind((ip, 0)).await.expect("bind UDP");
        let port = udp.local_addr().unwrap().port();
        if let Ok(tcp) = TcpListener::bind((ip, port)).await {
            return (udp, tcp);
        }
    }
    panic!("could not bind UDP and TCP on one port of {ip}");
}

/// A running authoritative server for `test.` on 127.0.0.1 (UDP and TCP, same port).
/// Stops when dropped.
pub struct TestDns {
    pub addr: SocketAddr,
    queries: Arc<AtomicUsize>,
    server: Server<Handler>,
}

impl TestDns {
    pub async fn start(zone: Zone) -> TestDns {
        let origin = Name::from_ascii("test.").unwrap();
        let mut handler = InMemoryZoneHandler::<TokioRuntimeProvider>::empty(
            origin.clone(),
            ZoneType::Primary,
            AxfrPolicy::Deny,
        );
        let serial = 1;
        // The SOA in the authority section of negative answers is what lets resolvers
        // cache NXDOMAIN/NODATA; its TTL and MINIMUM both carry the negative TTL.
        let soa = SOA::new(
            Name::from_ascii("ns.test.").unwrap(),
            Name::from_ascii("hostmaster.test.").unwrap(),
            serial,
            3600,
            600,
            86400,
            zone.negative_ttl,
        );
        let soa = Record::from_rdata(origin.clone(), zone.negative_ttl, RData::SOA(soa));
        assert!(handler.upsert_mut(soa, serial));
        for record in zone.records {
            let desc = format!("{record}");
            assert!(handler.upsert_mut(record, serial), "upsert {desc}");
        }
        let mut catalog = Catalog::new();
        catalog.upsert(LowerName::new(&origin), vec![Arc::new(handler)]);

        let queries = Arc::new(AtomicUsize::new(0));
        let mut server = Server::new(Handler {
            catalog,
            servfail: zone.servfail,
            queries: queries.clone(),
        });
        let (udp, tcp) = bind_pair(Ipv4Addr::LOCALHOST).await;
        let addr = udp.local_addr().unwrap();
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(10), 64);
        TestDns {
            addr,
            queries,
            server,
        }
    }

    /// Number of DNS queries received so far (UDP and TCP, including SERVFAILed ones).
    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        // Tasks in the server's JoinSet are aborted when it drops; cancelling also stops
        // per-connection loops promptly.
        self.server.shutdown_token().cancel();
    }
}

/// A nameserver that reads queries over UDP and TCP (same port) and never answers,
/// to exercise resolver timeouts. Stops when dropped.
pub struct BlackholeDns {
    pub addr: SocketAddr,
    queries: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl BlackholeDns {
    pub async fn start() -> BlackholeDns {
        let (udp, tcp) = bind_pair(Ipv4Addr::LOCALHOST).await;
        let addr = udp.local_addr().unwrap();
        let queries = Arc::new(AtomicUsize::new(0));
        let q = queries.clone();
        let udp_task = tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while udp.recv_from(&mut buf).await.is_ok() {
                q.fetch_add(1, Ordering::SeqCst);
            }
        });
        let q = queries.clone();
        let tcp_task = tokio::spawn(async move {
            // Connections are kept (and drained) inside this task so they are closed when it is
            // aborted, not leaked.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut stream, _)) = tcp.accept().await {
                let q = q.clone();
                conns.spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        q.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        BlackholeDns {
            addr,
            queries,
            tasks: vec![udp_task, tcp_task],
        }
    }

    /// UDP datagrams plus TCP reads received (roughly: queries).
    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

impl Drop for BlackholeDns {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

//! DNS half of the harness self-test: `common::dns` answers the real hickory-resolver 0.26
//! exactly as that module's doc comment says.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::common::dns::{BlackholeDns, TestDns, Zone};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError, NoRecords};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RData;

/// The construction the lead's src/dns.rs should mirror: one nameserver, no system config.
fn resolver(addr: SocketAddr, timeout_ms: u64, attempts: usize, tcp_only: bool) -> TokioResolver {
    let mut ns = if tcp_only {
        NameServerConfig::tcp(addr.ip())
    } else {
        NameServerConfig::udp(addr.ip())
    };
    for c in &mut ns.connections {
        c.port = addr.port();
    }
    let mut opts = ResolverOpts::default();
    opts.timeout = Duration::from_millis(timeout_ms);
    opts.attempts = attempts;
    opts.use_hosts_file = ResolveHosts::Never;
    TokioResolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![ns]),
        TokioRuntimeProvider::default(),
    )
    .with_options(opts)
    .build()
    .expect("build resolver")
}

fn mx_of(l: &hickory_resolver::lookup::Lookup) -> Vec<(u16, String)> {
    l.answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::MX(mx) => Some((mx.preference, mx.exchange.to_string())),
            _ => None,
        })
        .collect()
}

fn zone() -> Zone {
    Zone::new()
        .mx("example.test", 10, "mx1.example.test")
        .mx("example.test", 20, "mx2.example.test")
        .a("mx1.example.test", Ipv4Addr::new(127, 0, 0, 2))
        .aaaa("mx1.example.test", Ipv6Addr::LOCALHOST)
        .null_mx("nomail.test")
        .ttl(30)
        .a("bare.test", Ipv4Addr::new(127, 0, 0, 3))
        .servfail("broken.test")
        .negative_ttl(45)
}

#[tokio::test]
async fn dns_positive_answers() {
    let dns = TestDns::start(zone()).await;
    let r = resolver(dns.addr, 2000, 1, false);

    let mut mx = mx_of(&r.mx_lookup("example.test.").await.unwrap());
    mx.sort();
    assert_eq!(
        mx,
        [
            (10, "mx1.example.test.".to_string()),
            (20, "mx2.example.test.".to_string())
        ]
    );

    let null = r.mx_lookup("nomail.test.").await.unwrap();
    let rec = null.answers().iter().find_map(|r| match &r.data {
        RData::MX(mx) => Some(mx.clone()),
        _ => None,
    });
    let rec = rec.expect("null MX record");
    assert_eq!(rec.preference, 0);
    assert!(rec.exchange.is_root());
    assert_eq!(rec.exchange.to_string(), ".");

    let a = r.ipv4_lookup("mx1.example.test.").await.unwrap();
    assert!(matches!(&a.answers()[0].data, RData::A(a) if a.0 == Ipv4Addr::new(127, 0, 0, 2)));
    let aaaa = r.ipv6_lookup("mx1.example.test.").await.unwrap();
    assert!(matches!(&aaaa.answers()[0].data, RData::AAAA(a) if a.0 == Ipv6Addr::LOCALHOST));

    // ttl(30) applied to records added after it.
    let bare = r.ipv4_lookup("bare.test.").await.unwrap();
    assert_eq!(bare.answers()[0].ttl, 30);
    let left = bare.valid_until().saturating_duration_since(Instant::now());
    assert!(left <= Duration::from_secs(30) && left > Duration::from_secs(25));
}

#[tokio::test]
async fn dns_nodata_nxdomain_and_negative_cache() {
    let dns = TestDns::start(zone()).await;
    let r = resolver(dns.addr, 2000, 1, false);

    // NODATA: the name exists (A only) but has no MX.
    let err = r.mx_lookup("bare.test.").await.unwrap_err();
    assert!(err.is_no_records_found() && !err.is_nx_domain(), "{err:?}");
    match &err {
        NetError::Dns(DnsError::NoRecordsFound(NoRecords {
            response_code,
            negative_ttl,
            soa,
            ..
        })) => {
            assert_eq!(*response_code, ResponseCode::NoError);
            assert_eq!(*negative_ttl, Some(45));
            assert!(soa.is_some());
        }
        other => panic!("expected NoRecordsFound, got {other:?}"),
    }
    // An existing name with only A still resolves its A (the implicit-MX fallback).
    assert!(r.ipv4_lookup("bare.test.").await.is_ok());

    // NXDOMAIN.
    let before = dns.queries();
    let err = r.mx_lookup("nope.test.").await.unwrap_err();
    assert!(err.is_nx_domain(), "{err:?}");
    match &err {
        NetError::Dns(DnsError::NoRecordsFound(nr)) => {
            assert_eq!(nr.response_code, ResponseCode::NXDomain);
            assert_eq!(nr.negative_ttl, Some(45));
        }
        other => panic!("expected NoRecordsFound, got {other:?}"),
    }
    assert_eq!(dns.queries(), before + 1, "one query on the wire");

    // Negative answers are cached by the resolver: repeated lookups cost no queries.
    for _ in 0..100 {
        assert!(r.mx_lookup("nope.test.").await.unwrap_err().is_nx_domain());
        assert!(
            r.mx_lookup("bare.test.")
                .await
                .unwrap_err()
                .is_no_records_found()
        );
    }
    assert_eq!(dns.queries(), before + 1);

    // Names outside our zone are REFUSED by an authoritative-only server.
    let err = r.mx_lookup("example.com.").await.unwrap_err();
    assert!(
        matches!(
            err,
            NetError::Dns(DnsError::ResponseCode(ResponseCode::Refused))
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn dns_servfail_is_retried_and_not_cached() {
    let dns = TestDns::start(zone()).await;
    let r = resolver(dns.addr, 2000, 1, false);
    let err = r.mx_lookup("broken.test.").await.unwrap_err();
    assert!(
        matches!(
            err,
            NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail))
        ),
        "{err:?}"
    );
    assert!(!err.is_no_records_found());
    // attempts = 1 means one retry: two queries.
    assert_eq!(dns.queries(), 2);
    let _ = r.mx_lookup("broken.test.").await.unwrap_err();
    assert_eq!(dns.queries(), 4, "SERVFAIL is not cached");
}

#[tokio::test]
async fn dns_over_tcp_same_port() {
    let dns = TestDns::start(zone()).await;
    let r = resolver(dns.addr, 2000, 0, true);
    let mx = mx_of(&r.mx_lookup("example.test.").await.unwrap());
    assert_eq!(mx.len(), 2);
    assert!(r.mx_lookup("nope.test.").await.unwrap_err().is_nx_domain());
}

#[tokio::test]
async fn dns_truncated_udp_falls_back_to_tcp() {
    // 150 A records (~2.4 KB) exceed the resolver's EDNS UDP payload, so the answer is TC.
    let mut z = Zone::new();
    for i in 0..150u8 {
        z = z.a("big.test", Ipv4Addr::new(127, 1, 0, i));
    }
    let dns = TestDns::start(z).await;
    let mut ns = NameServerConfig::udp_and_tcp(dns.addr.ip());
    for c in &mut ns.connections {
        c.port = dns.addr.port();
    }
    let r = TokioResolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![ns]),
        TokioRuntimeProvider::default(),
    )
    .build()
    .unwrap();
    let a = r.ipv4_lookup("big.test.").await.unwrap();
    assert_eq!(a.answers().len(), 150);
    assert_eq!(dns.queries(), 2, "UDP (truncated) then TCP");

    // UDP-only config: the truncated answer is an error.
    let err = resolver(dns.addr, 2000, 0, false)
        .ipv4_lookup("big.test.")
        .await
        .unwrap_err();
    assert!(matches!(err, NetError::Truncated), "{err:?}");
}

#[tokio::test]
async fn dns_attempts_count_is_retries() {
    let dns = TestDns::start(zone()).await;
    // `ResolverOpts::attempts` counts RE-tries: a failing lookup sends 1 + attempts queries.
    for attempts in [0, 2] {
        let r = resolver(dns.addr, 2000, attempts, false);
        let before = dns.queries();
        assert!(r.mx_lookup("broken.test.").await.is_err());
        assert_eq!(dns.queries() - before, 1 + attempts);
    }
}

#[tokio::test]
async fn dns_blackhole_times_out() {
    let bh = BlackholeDns::start().await;
    let r = resolver(bh.addr, 300, 1, false);
    let t = Instant::now();
    let err = r.mx_lookup("example.test.").await.unwrap_err();
    let took = t.elapsed();
    assert!(matches!(err, NetError::Timeout), "{err:?}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // 1 + attempts queries reached the black hole.
    assert_eq!(bh.queries(), 2);
    eprintln!("blackhole timeout after {took:?}");
}

#[tokio::test]
async fn dns_closed_port() {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    drop(sock);
    // UDP: the ICMP port-unreachable is not surfaced; it looks exactly like a black hole.
    let e = resolver(addr, 300, 1, false)
        .mx_lookup("x.test.")
        .await
        .unwrap_err();
    assert!(matches!(e, NetError::Timeout), "{e:?}");
    // TCP: the refused connect comes back at once as NoConnections.
    let e = resolver(addr, 300, 1, true)
        .mx_lookup("x.test.")
        .await
        .unwrap_err();
    assert!(matches!(e, NetError::NoConnections), "{e:?}");
}

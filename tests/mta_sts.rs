//! MTA-STS (RFC 8461) and TLS reporting (RFC 8460) against real peers on loopback: an
//! HTTPS policy server with a certificate from a test CA, reachable as `mta-sts.a.test`
//! through the test DNS server; a receiving SMTP server offering STARTTLS with a
//! certificate for its MX name (or not offering it); HTTPS and mail receivers of the
//! daily report, triggered by moving the daemon's clock a day and `ctl tls-report --send`.

mod common;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::floodgate::{
    TestApp, admin, config_text_with_queue, ctl, message, metric, parse_config,
};
use common::http_receiver::{Receiver, Reply};
use common::relay::{WAIT, relay_config, wait_recipient};
use common::sink::{Sink, SinkConfig};
use floodgate::app::{App, Deps};
use floodgate::clock::{Clock, ShiftedClock};
use floodgate::queue::RecipientState;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

const POLICY: &str = "version: STSv1\r\nmode: enforce\r\nmx: mx.a.test\r\nmax_age: 86400\r\n";

/// A test certificate authority, its certificate written to `ca.pem`.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, issuer.pem()).unwrap();
        Ca {
            issuer,
            path,
            _dir: dir,
        }
    }

    /// `(cert_pem, key_pem)` for `names`, signed by this CA.
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// `a.test` (MX `mx.a.test`) publishing MTA-STS with `id`, its policy host, and the
/// reports domain whose MX is the same sink.
fn zone(id: &str, tlsrpt: Option<&str>) -> Zone {
    let zone = Zone::new()
        .mx("a.test", 10, "mx.a.test")
        .a("mx.a.test", Ipv4Addr::LOCALHOST)
        .a("mta-sts.a.test", Ipv4Addr::LOCALHOST)
        .txt("_mta-sts.a.test", &format!("v=STSv1; id={id};"))
        .mx("reports.test", 10, "mx.a.test")
        .a("rua.reports.test", Ipv4Addr::LOCALHOST);
    match tlsrpt {
        Some(record) => zone.txt("_smtp._tls.a.test", record),
        None => zone,
    }
}

/// The policy server: HTTPS with a CA-signed certificate for `mta-sts.a.test`.
async fn policy_server(ca: &Ca, policy: &str) -> Receiver {
    let (cert, key) = ca.leaf(&["mta-sts.a.test"]);
    let reply = Reply::status(200)
        .header("content-type", "text/plain")
        .body(policy);
    Receiver::start_tls(reply, &cert, &key).await
}

/// The MX: STARTTLS with a CA-signed certificate for `mx.a.test`, or no STARTTLS.
async fn mx(ca: &Ca, starttls: bool) -> Sink {
    Sink::start_with(SinkConfig {
        tls: starttls.then(|| ca.leaf(&["mx.a.test"])),
        ..Default::default()
    })
    .await
}

/// Delivery to `sink` under MTA-STS `mode`, policies fetched from `policy_port`.
fn config(sink: &Sink, policy_port: u16, ca: &Ca, mode: &str, more: &str) -> String {
    relay_config(
        sink.addr.port(),
        &format!("mta_sts = \"{mode}\"\nmta_sts_port = {policy_port}\nbackoff = [\"1h\"]"),
        &format!("tls_ca = \"{}\"\n{more}", ca.path.display()),
    )
}

async fn start(dns: &TestDns, config: &str, clock: Arc<ShiftedClock>) -> TestApp {
    common::relay::start(dns, config, clock).await
}

/// The daemon again on `dir`'s queue (and sts.db), with a new config.
async fn restart(
    dir: tempfile::TempDir,
    dns: &TestDns,
    config: &str,
    clock: Arc<dyn Clock>,
) -> TestApp {
    let text = config_text_with_queue(dir.path(), dns.addr, "", "lease = \"30s\"", config);
    let config = parse_config(dir.path(), &text);
    let deps = Deps {
        clock,
        ..Deps::default()
    };
    let app = App::start(config, deps).await.expect("app restarts");
    TestApp { app, dir }
}

async fn send(t: &TestApp, to: &str, subject: &str) -> String {
    let mut c = t.client().await;
    c.ehlo().await;
    c.send_mail("app@client.test", &[to], &message(subject, ""))
        .await
}

async fn delivered(t: &TestApp, id: &str, to: &str) {
    wait_recipient(t, id, to, "delivery", |r| {
        r.state == RecipientState::Delivered
    })
    .await;
}

/// Waits for `to` to be deferred; returns its last reply.
async fn deferred(t: &TestApp, id: &str, to: &str) -> String {
    let r = wait_recipient(t, id, to, "a deferral", |r| r.attempts > 0).await;
    assert_eq!(
        r.state,
        RecipientState::Scheduled,
        "deferred, not failed: {r:?}"
    );
    r.last_reply.clone().unwrap_or_default()
}

fn classify(reply: &str) -> &'static str {
    floodgate::bounce::Classifier::shipped()
        .classify_line(reply)
        .as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_with_a_matching_mx_and_a_valid_certificate_delivers_over_tls() {
    let ca = Ca::new();
    let dns = TestDns::start(zone("1", None)).await;
    let policy = policy_server(&ca, POLICY).await;
    let sink = mx(&ca, true).await;
    let t = start(
        &dns,
        &config(&sink, policy.addr.port(), &ca, "enforce", ""),
        Arc::default(),
    )
    .await;

    let id = send(&t, "user@a.test", "first").await;
    delivered(&t, &id, "user@a.test").await;
    let id2 = send(&t, "user@a.test", "second").await;
    delivered(&t, &id2, "user@a.test").await;
    let got = sink.received();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|m| m.tls), "delivered inside STARTTLS");

    let fetches = policy.received();
    assert_eq!(fetches.len(), 1, "one fetch for one TXT id");
    assert_eq!(fetches[0].method, "GET");
    assert_eq!(fetches[0].path, "/.well-known/mta-sts.txt");
    assert!(
        fetches[0]
            .header("host")
            .unwrap()
            .starts_with("mta-sts.a.test")
    );
    let admin_addr = t.app.admin_addr.unwrap();
    assert_eq!(
        metric(admin_addr, "floodgate_mta_sts_policies_fetched_total").await,
        1.0
    );
    assert!(
        metric(
            admin_addr,
            "floodgate_tls_sessions_total{result=\"success\"}"
        )
        .await
            >= 1.0
    );
    assert_eq!(
        metric(admin_addr, "floodgate_mta_sts_deferred_total").await,
        0.0
    );
    t.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_defers_an_mx_not_in_the_policy_without_connecting() {
    let ca = Ca::new();
    let dns = TestDns::start(zone("1", None)).await;
    let other = "version: STSv1\nmode: enforce\nmx: *.elsewhere.test\nmax_age: 86400\n";
    let policy = policy_server(&ca, other).await;
    let sink = mx(&ca, true).await;
    let t = start(
        &dns,
        &config(&sink, policy.addr.port(), &ca, "enforce", ""),
        Arc::default(),
    )
    .await;

    let id = send(&t, "user@a.test", "not in policy").await;
    let reply = deferred(&t, &id, "user@a.test").await;
    assert!(
        reply.starts_with("451 4.7.5 MTA-STS policy of a.test"),
        "{reply}"
    );
    assert!(reply.contains("validation-failure"), "{reply}");
    assert_eq!(classify(&reply), "tls", "{reply}");
    assert_eq!(
        sink.connections(),
        0,
        "nothing was sent, in clear or otherwise"
    );
    let admin_addr = t.app.admin_addr.unwrap();
    assert_eq!(
        metric(admin_addr, "floodgate_mta_sts_deferred_total").await,
        1.0
    );
    t.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_defers_when_the_mx_offers_no_starttls_or_a_wrong_certificate() {
    let ca = Ca::new();
    let dns = TestDns::start(zone("1", None)).await;
    let policy = policy_server(&ca, POLICY).await;
    let plain = mx(&ca, false).await;
    let t = start(
        &dns,
        &config(&plain, policy.addr.port(), &ca, "enforce", ""),
        Arc::default(),
    )
    .await;
    let id = send(&t, "user@a.test", "no starttls").await;
    let reply = deferred(&t, &id, "user@a.test").await;
    assert!(reply.contains("starttls-not-supported"), "{reply}");
    assert_eq!(classify(&reply), "tls");
    assert!(plain.received().is_empty(), "never sent in clear");
    assert!(
        !plain.commands().iter().any(|c| c.starts_with("MAIL")),
        "{:?}",
        plain.commands()
    );
    t.app.shutdown().await;

    // A certificate for another name, from the trusted CA.
    let wrong = Sink::start_with(SinkConfig {
        tls: Some(ca.leaf(&["other.a.test"])),
        ..Default::default()
    })
    .await;
    let dns = TestDns::start(zone("1", None)).await;
    let t = start(
        &dns,
        &config(&wrong, policy.addr.port(), &ca, "enforce", ""),
        Arc::default(),
    )
    .await;
    let id = send(&t, "user@a.test", "wrong name").await;
    let reply = deferred(&t, &id, "user@a.test").await;
    assert!(reply.contains("certificate-host-mismatch"), "{reply}");
    assert_eq!(classify(&reply), "tls");
    assert!(wrong.received().is_empty());
    assert!(!wrong.commands().iter().any(|c| c.starts_with("MAIL")));
    t.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testing_mode_delivers_and_counts_what_would_have_failed() {
    let ca = Ca::new();
    let dns = TestDns::start(zone("1", None)).await;
    let policy = policy_server(&ca, POLICY).await;
    let plain = mx(&ca, false).await;
    let t = start(
        &dns,
        &config(&plain, policy.addr.port(), &ca, "testing", ""),
        Arc::default(),
    )
    .await;
    let id = send(&t, "user@a.test", "testing").await;
    delivered(&t, &id, "user@a.test").await;
    assert!(!plain.received()[0].tls);
    let admin_addr = t.app.admin_addr.unwrap();
    assert_eq!(
        metric(admin_addr, "floodgate_mta_sts_testing_failures_total").await,
        1.0
    );
    assert_eq!(
        metric(
            admin_addr,
            "floodgate_tls_sessions_total{result=\"starttls-not-supported\"}"
        )
        .await,
        1.0
    );
    let view = admin(
        admin_addr,
        "GET",
        "/admin/v1/tls-report?domain=a.test",
        None,
    )
    .await;
    let counts = view["counts"].as_array().unwrap();
    assert_eq!(counts.len(), 1, "{view}");
    assert_eq!(counts[0]["result"], "starttls-not-supported");
    assert_eq!(counts[0]["policy_type"], "sts");
    assert_eq!(counts[0]["mx"], "mx.a.test");
    assert_eq!(counts[0]["sessions"], 1);
    let text = ctl(admin_addr, &["tls-report", "--domain", "a.test"]).await;
    assert!(
        text.contains("a.test") && text.contains("starttls-not-supported 1"),
        "{text}"
    );
    t.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cached_policy_survives_a_restart_and_a_new_id_refetches() {
    let ca = Ca::new();
    let dns = TestDns::start(zone("1", None)).await;
    let policy = policy_server(&ca, POLICY).await;
    let sink = mx(&ca, true).await;
    let clock: Arc<ShiftedClock> = Arc::default();
    let t = start(
        &dns,
        &config(&sink, policy.addr.port(), &ca, "enforce", ""),
        clock.clone(),
    )
    .await;
    let id = send(&t, "user@a.test", "before restart").await;
    delivered(&t, &id, "user@a.test").await;
    assert_eq!(policy.count(), 1);
    let policy_port = policy.addr.port();
    drop(policy);
    let TestApp { app, dir } = t;
    app.shutdown().await;

    // The policy server is gone and the MX no longer offers STARTTLS: only the policy
    // cached in sts.db can make this delivery wait.
    let plain = mx(&ca, false).await;
    let cfg = config(&plain, policy_port, &ca, "enforce", "");
    let t = restart(dir, &dns, &cfg, clock.clone()).await;
    let id = send(&t, "user@a.test", "after restart").await;
    let reply = deferred(&t, &id, "user@a.test").await;
    assert!(reply.contains("starttls-not-supported"), "{reply}");
    assert!(plain.received().is_empty());
    let admin_addr = t.app.admin_addr.unwrap();
    assert_eq!(
        metric(admin_addr, "floodgate_mta_sts_policies_fetched_total").await,
        0.0
    );
    assert_eq!(
        metric(admin_addr, "floodgate_mta_sts_fetch_failures_total").await,
        0.0
    );
    let TestApp { app, dir } = t;
    app.shutdown().await;

    // A new TXT id: the policy is fetched again, and the new one (testing) is in force.
    let dns = TestDns::start(zone("2", None)).await;
    let testing = "version: STSv1\nmode: testing\nmx: mx.a.test\nmax_age: 86400\n";
    let policy = policy_server(&ca, testing).await;
    let t = restart(
        dir,
        &dns,
        &config(&plain, policy.addr.port(), &ca, "enforce", ""),
        clock,
    )
    .await;
    let id = send(&t, "user@a.test", "new id").await;
    delivered(&t, &id, "user@a.test").await;
    assert_eq!(policy.count(), 1, "refetched for the new id");
    let admin_addr = t.app.admin_addr.unwrap();
    assert_eq!(
        metric(admin_addr, "floodgate_mta_sts_policies_fetched_total").await,
        1.0
    );
    assert_eq!(
        metric(admin_addr, "floodgate_mta_sts_testing_failures_total").await,
        1.0
    );
    t.app.shutdown().await;
}

/// mail-auth's verifier asking the test DNS server for the keys: each signature's
/// (domain, passed).
async fn dkim_results(dns: std::net::SocketAddr, message: &[u8]) -> Vec<(String, bool)> {
    use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
    use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};
    let mut ns = NameServerConfig::udp_and_tcp(dns.ip());
    for c in &mut ns.connections {
        c.port = dns.port();
    }
    let mut opts = ResolverOpts::default();
    opts.timeout = std::time::Duration::from_millis(500);
    opts.attempts = 1;
    let verifier =
        MessageAuthenticator::new(ResolverConfig::from_name_servers(vec![ns]), opts).unwrap();
    let parsed = AuthenticatedMessage::parse(message).expect("a parsable message");
    verifier
        .verify_dkim(&parsed)
        .await
        .iter()
        .map(|out| {
            let d = out.signature().map(|s| s.d.clone()).unwrap_or_default();
            (d, *out.result() == DkimResult::Pass)
        })
        .collect()
}

fn gunzip_json(bytes: &[u8]) -> serde_json::Value {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(bytes), &mut text)
        .expect("gzip");
    serde_json::from_str(&text).expect("JSON")
}

/// The base64 attachment of a report mail, decoded.
fn attachment(mail: &str) -> Vec<u8> {
    use base64::Engine;
    let part = mail
        .split("Content-Type: application/tlsrpt+gzip")
        .nth(1)
        .expect("a tlsrpt+gzip part");
    let body = part.split_once("\r\n\r\n").expect("part body").1;
    let b64: String = body
        .lines()
        .take_while(|l| !l.starts_with("--"))
        .collect::<Vec<_>>()
        .concat();
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .expect("base64")
}

/// The RFC 8460 fields of a.test's report: one success with mx.a.test, one
/// validation failure with mx2.a.test (an MX host the policy does not name).
fn assert_report(r: &serde_json::Value, day: &str) {
    assert_eq!(r["organization-name"], "Floodgate Test", "{r}");
    assert_eq!(r["contact-info"], "postmaster@floodgate.test");
    assert_eq!(
        r["date-range"]["start-datetime"],
        format!("{day}T00:00:00Z")
    );
    assert_eq!(r["date-range"]["end-datetime"], format!("{day}T23:59:59Z"));
    assert!(r["report-id"].as_str().unwrap().contains("a.test"));
    let policies = r["policies"].as_array().unwrap();
    assert_eq!(policies.len(), 1, "{r}");
    let p = &policies[0];
    assert_eq!(p["policy"]["policy-type"], "sts");
    assert_eq!(p["policy"]["policy-domain"], "a.test");
    assert_eq!(p["policy"]["mx-host"], serde_json::json!(["mx.a.test"]));
    assert!(
        p["policy"]["policy-string"]
            .as_array()
            .unwrap()
            .contains(&"mode: enforce".into())
    );
    assert_eq!(p["summary"]["total-successful-session-count"], 1, "{r}");
    assert_eq!(p["summary"]["total-failure-session-count"], 1, "{r}");
    let d = &p["failure-details"][0];
    assert_eq!(d["result-type"], "validation-failure");
    assert_eq!(d["receiving-mx-hostname"], "mx2.a.test");
    assert_eq!(d["failed-session-count"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_report_arrives_by_https_and_as_a_signed_mail() {
    let ca = Ca::new();
    let (cert, key) = ca.leaf(&["rua.reports.test"]);
    let rua = Receiver::start_tls(Reply::status(200), &cert, &key).await;
    let keys = tempfile::tempdir().unwrap();
    let (key_path, record) = floodgate::dkim::keygen(
        "floodgate.test",
        "host",
        floodgate::config::DkimAlgorithm::Ed25519Sha256,
        keys.path(),
    )
    .unwrap();
    let tlsrpt = format!(
        "v=TLSRPTv1; rua=https://rua.reports.test:{}/v1/tlsrpt,mailto:tls@reports.test",
        rua.addr.port()
    );
    let zone = zone("1", Some(&tlsrpt))
        .mx("a.test", 5, "mx2.a.test")
        .a("mx2.a.test", Ipv4Addr::LOCALHOST)
        .txt("host._domainkey.floodgate.test", &record);
    let dns = TestDns::start(zone).await;
    let policy = policy_server(&ca, POLICY).await;
    let sink = mx(&ca, true).await;
    let more = format!(
        "[tls_report]\nenabled = true\norganization = \"Floodgate Test\"\n\n[[dkim]]\ndomain = \"floodgate.test\"\nselector = \"host\"\nkey = \"{}\"\nalgorithm = \"ed25519-sha256\"\n",
        key_path.display()
    );
    let clock: Arc<ShiftedClock> = Arc::default();
    let t = start(
        &dns,
        &config(&sink, policy.addr.port(), &ca, "enforce", &more),
        clock.clone(),
    )
    .await;
    let id = send(&t, "user@a.test", "counted").await;
    delivered(&t, &id, "user@a.test").await;
    let admin_addr = t.app.admin_addr.unwrap();
    let day = floodgate::deliver::sts::utc_day(clock.now_ms());

    let none = ctl(admin_addr, &["tls-report", "--send"]).await;
    assert_eq!(none, "no TLS report due\n", "today is not over");
    clock.advance(Duration::from_secs(86_400));
    let sent = ctl(admin_addr, &["--json", "tls-report", "--send"]).await;
    let sent: serde_json::Value = serde_json::from_str(&sent).unwrap();
    let outcome = sent["sent"][0]["outcome"].as_str().unwrap().to_owned();
    assert_eq!(sent["sent"][0]["domain"], "a.test", "{sent}");
    assert!(
        outcome.contains("sent https://rua.reports.test"),
        "{outcome}"
    );
    assert!(
        outcome.contains("queued mailto:tls@reports.test"),
        "{outcome}"
    );

    let posted = rua.wait_for(1, WAIT).await;
    assert_eq!(posted[0].method, "POST");
    assert_eq!(posted[0].path, "/v1/tlsrpt");
    assert_eq!(
        posted[0].header("content-type"),
        Some("application/tlsrpt+gzip")
    );
    assert_report(&gunzip_json(&posted[0].body), &day);

    t.app.wake_scheduler();
    let got = sink.wait_for(2, WAIT).await;
    let mail = got
        .iter()
        .find(|m| m.rcpts == ["tls@reports.test"])
        .expect("the report mail");
    assert_eq!(mail.mail_from, "", "from the null sender");
    let text = String::from_utf8_lossy(&mail.data).into_owned();
    assert!(text.contains("TLS-Report-Domain: a.test\r\n"), "{text}");
    assert!(text.contains("TLS-Report-Submitter: Floodgate Test\r\n"));
    assert!(text.contains("report-type=\"tlsrpt\""));
    assert!(text.contains("Subject: Report Domain: a.test Submitter: Floodgate Test Report-ID: <"));
    assert_eq!(
        dkim_results(dns.addr, &mail.data).await,
        vec![("floodgate.test".to_string(), true)],
        "signed like a DSN, and the signature verifies"
    );
    assert_report(&gunzip_json(&attachment(&text)), &day);

    let view = admin(admin_addr, "GET", "/admin/v1/tls-report", None).await;
    assert_eq!(view["reports"][0]["domain"], "a.test", "{view}");
    assert_eq!(
        ctl(admin_addr, &["tls-report", "--send"]).await,
        "no TLS report due\n"
    );
    assert_eq!(
        metric(admin_addr, "floodgate_tls_reports_sent_total").await,
        2.0
    );
    t.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_refetch_or_txt_lookup_keeps_the_cached_policy() {
    let ca = Ca::new();
    let dns = TestDns::start(zone("1", None)).await;
    let policy = policy_server(&ca, POLICY).await;
    let sink = mx(&ca, true).await;
    let clock: Arc<ShiftedClock> = Arc::default();
    let t = start(
        &dns,
        &config(&sink, policy.addr.port(), &ca, "enforce", ""),
        clock.clone(),
    )
    .await;
    let id = send(&t, "user@a.test", "cached").await;
    delivered(&t, &id, "user@a.test").await;
    let policy_port = policy.addr.port();
    drop(policy);
    let TestApp { app, dir } = t;
    app.shutdown().await;

    // A new id, and the policy server is down: the cached (enforce) policy stays in force.
    let plain = mx(&ca, false).await;
    let dns = TestDns::start(zone("2", None)).await;
    let t = restart(
        dir,
        &dns,
        &config(&plain, policy_port, &ca, "enforce", ""),
        clock.clone(),
    )
    .await;
    let id = send(&t, "user@a.test", "refetch fails").await;
    let reply = deferred(&t, &id, "user@a.test").await;
    assert!(reply.contains("starttls-not-supported"), "{reply}");
    let admin_addr = t.app.admin_addr.unwrap();
    assert_eq!(
        metric(admin_addr, "floodgate_mta_sts_fetch_failures_total").await,
        1.0
    );
    assert_eq!(
        metric(admin_addr, "floodgate_mta_sts_cache_fallbacks_total").await,
        1.0
    );
    let TestApp { app, dir } = t;
    app.shutdown().await;

    // The TXT lookup fails (SERVFAIL): the cached policy, again.
    let dns = TestDns::start(zone("1", None).servfail("_mta-sts.a.test")).await;
    let t = restart(
        dir,
        &dns,
        &config(&plain, policy_port, &ca, "enforce", ""),
        clock.clone(),
    )
    .await;
    let id = send(&t, "user@a.test", "txt fails").await;
    let reply = deferred(&t, &id, "user@a.test").await;
    assert!(reply.contains("starttls-not-supported"), "{reply}");
    let TestApp { app, dir } = t;
    app.shutdown().await;

    // Once the policy expired (max_age one day), a failed lookup leaves no policy: delivery
    // goes on as without one (RFC 8461 §5), in clear to a host without STARTTLS.
    clock.advance(Duration::from_secs(86_401));
    let t = restart(
        dir,
        &dns,
        &config(&plain, policy_port, &ca, "enforce", ""),
        clock,
    )
    .await;
    let id = send(&t, "user@a.test", "expired").await;
    delivered(&t, &id, "user@a.test").await;
    assert!(!plain.received().last().unwrap().tls);
    t.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_can_turn_mta_sts_off_for_its_domains() {
    let ca = Ca::new();
    let dns = TestDns::start(zone("1", None)).await;
    let policy = policy_server(&ca, POLICY).await;
    let plain = mx(&ca, false).await;
    let cfg = format!(
        "{}\n[[route]]\ndomains = [\"a.test\"]\ntransport = \"mx\"\nport = {}\nmta_sts = \"off\"\n",
        config(&plain, policy.addr.port(), &ca, "enforce", ""),
        plain.addr.port()
    );
    let t = start(&dns, &cfg, Arc::default()).await;
    let id = send(&t, "user@a.test", "override").await;
    delivered(&t, &id, "user@a.test").await;
    assert_eq!(policy.count(), 0, "no policy looked for");
    t.app.shutdown().await;
}

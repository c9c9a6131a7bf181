//! DKIM signing on the message path: mail submitted over SMTP and HTTP, and the DSNs
//! Floodgate writes itself, leave signed with every key of the `From:` domain (RSA and
//! Ed25519 together), and the signatures verify against the public keys published in a
//! real DNS server on loopback; a header changed after signing fails; keys reload on
//! SIGHUP; `check-config` refuses a key others can read. The `#[ignore]`d test repeats the
//! check with dkimpy, an independent implementation (`.ci/run` installs it).

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::floodgate::{TestApp, binary, config_text_with_queue, message, metric, parse_config};
use common::http::request;
use common::relay::relay_config;
use common::sink::{RcptScript, Sink, SinkConfig};
use floodgate::clock::SystemClock;
use floodgate::config::DkimAlgorithm;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};

const WAIT: Duration = Duration::from_secs(15);
const KEY: &str = "fg_dkim_test_key_0123456789";

/// One generated key and the TXT record that publishes it.
struct Key {
    selector: &'static str,
    domain: &'static str,
    algorithm: DkimAlgorithm,
    path: std::path::PathBuf,
    record: String,
}

impl Key {
    fn new(
        dir: &Path,
        domain: &'static str,
        selector: &'static str,
        algorithm: DkimAlgorithm,
    ) -> Key {
        let (path, record) =
            floodgate::dkim::keygen(domain, selector, algorithm, dir).expect("keygen");
        Key {
            selector,
            domain,
            algorithm,
            path,
            record,
        }
    }

    fn name(&self) -> String {
        format!("{}._domainkey.{}", self.selector, self.domain)
    }

    fn table(&self) -> String {
        format!(
            "[[dkim]]\ndomain = \"{}\"\nselector = \"{}\"\nkey = \"{}\"\nalgorithm = \"{}\"\n",
            self.domain,
            self.selector,
            self.path.display(),
            self.algorithm.as_str()
        )
    }
}

/// The keys of a test: RSA and Ed25519 for `signer.test`, and one for the daemon's own
/// hostname (`floodgate.test`, the DSNs' `From:` domain).
struct Keys {
    _dir: tempfile::TempDir,
    rsa: Key,
    ed: Key,
    host: Key,
}

fn keys() -> Keys {
    let dir = tempfile::tempdir().unwrap();
    Keys {
        rsa: Key::new(dir.path(), "signer.test", "rsa", DkimAlgorithm::RsaSha256),
        ed: Key::new(
            dir.path(),
            "signer.test",
            "ed",
            DkimAlgorithm::Ed25519Sha256,
        ),
        host: Key::new(
            dir.path(),
            "floodgate.test",
            "host",
            DkimAlgorithm::Ed25519Sha256,
        ),
        _dir: dir,
    }
}

fn zone(keys: &Keys) -> Zone {
    [&keys.rsa, &keys.ed, &keys.host].into_iter().fold(
        Zone::new()
            .mx("mx.test", 10, "mail.mx.test")
            .a("mail.mx.test", Ipv4Addr::LOCALHOST)
            .mx("signer.test", 10, "mail.mx.test")
            .mx("nokey.test", 10, "mail.mx.test"),
        |zone, key| zone.txt(&key.name(), &key.record),
    )
}

fn relay(sink_port: u16, delivery_extra: &str, dkim: &str) -> String {
    let api_key = format!(
        "[[http.api_keys]]\nname = \"app\"\nkey_sha256 = \"{}\"\n",
        floodgate::http::api::key_hash(KEY)
    );
    relay_config(sink_port, delivery_extra, &format!("{api_key}\n{dkim}"))
}

/// A receiving server that refuses `gone*` mailboxes for good (so bounces are written).
async fn bouncing_sink() -> Sink {
    Sink::start_with(SinkConfig {
        rcpt: Box::new(|r| {
            if r.starts_with("gone") {
                RcptScript::Reply(550, "5.1.1 no such user")
            } else {
                RcptScript::Accept
            }
        }),
        ..Default::default()
    })
    .await
}

/// One message from `app@signer.test` over SMTP and one over HTTP.
async fn send_smtp_and_http(t: &TestApp) {
    let mut c = t.client().await;
    c.ehlo().await;
    c.send_mail(
        "app@signer.test",
        &["user@mx.test"],
        &signer_message("smtp"),
    )
    .await;
    let body = serde_json::json!({
        "from": "App <app@signer.test>",
        "to": ["user@mx.test"],
        "subject": "over http",
        "text": "Hello over HTTP",
        "html": "<p>Hello</p>",
    })
    .to_string();
    let bearer = format!("Bearer {KEY}");
    let (status, _, text) = request(
        t.app.http_addr.unwrap(),
        "POST",
        "/v1/messages",
        &[
            ("Authorization", bearer.as_str()),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    )
    .await;
    assert_eq!(status, 202, "{text}");
}

/// mail-auth's verifier asking the test DNS server for the keys.
fn verifier(dns: SocketAddr) -> MessageAuthenticator {
    let mut ns = NameServerConfig::udp_and_tcp(dns.ip());
    for c in &mut ns.connections {
        c.port = dns.port();
    }
    let mut opts = ResolverOpts::default();
    opts.timeout = Duration::from_millis(500);
    opts.attempts = 1;
    MessageAuthenticator::new(ResolverConfig::from_name_servers(vec![ns]), opts).expect("resolver")
}

/// Each signature's (domain, selector, passed).
async fn verify(dns: SocketAddr, message: &[u8]) -> Vec<(String, String, bool)> {
    let parsed = AuthenticatedMessage::parse(message).expect("a parsable message");
    verifier(dns)
        .verify_dkim(&parsed)
        .await
        .iter()
        .map(|out| {
            let sig = out.signature().expect("a signature");
            (
                sig.d.clone(),
                sig.s.clone(),
                *out.result() == DkimResult::Pass,
            )
        })
        .collect()
}

fn sorted(mut v: Vec<(String, String, bool)>) -> Vec<(String, String, bool)> {
    v.sort();
    v
}

fn both_pass() -> Vec<(String, String, bool)> {
    vec![
        ("signer.test".into(), "ed".into(), true),
        ("signer.test".into(), "rsa".into(), true),
    ]
}

async fn start(dns: &TestDns, config: &str) -> TestApp {
    TestApp::start_full("", "", config, dns.addr, Arc::new(SystemClock)).await
}

fn signer_message(subject: &str) -> String {
    format!(
        "From: App <app@signer.test>\r\nTo: user@mx.test\r\nSubject: {subject}\r\nDate: Wed, 02 Dec 2026 02:00:00 +0000\r\nMessage-ID: <{subject}@signer.test>\r\n\r\nHello.\r\n.leading dot line\r\n"
    )
}

#[tokio::test]
async fn smtp_and_http_mail_is_signed_with_both_keys_and_verifies_through_dns() {
    let keys = keys();
    let dns = TestDns::start(zone(&keys)).await;
    let sink = Sink::start().await;
    let dkim = format!("{}{}", keys.rsa.table(), keys.ed.table());
    let t = start(&dns, &relay(sink.addr.port(), "", &dkim)).await;

    send_smtp_and_http(&t).await;

    let got = sink.wait_for(2, WAIT).await;
    for received in &got {
        let text = String::from_utf8_lossy(&received.data);
        assert_eq!(
            text.matches("DKIM-Signature:").count(),
            2,
            "one signature per key: {text}"
        );
        assert_eq!(
            sorted(verify(dns.addr, &received.data).await),
            both_pass(),
            "{text}"
        );
    }
    assert_eq!(
        metric(t.app.admin_addr.unwrap(), "floodgate_dkim_signed_total").await,
        2.0
    );
}

#[tokio::test]
async fn a_header_changed_after_signing_fails_verification() {
    let keys = keys();
    let dns = TestDns::start(zone(&keys)).await;
    let sink = Sink::start().await;
    let t = start(&dns, &relay(sink.addr.port(), "", &keys.ed.table())).await;
    let mut c = t.client().await;
    c.ehlo().await;
    c.send_mail(
        "app@signer.test",
        &["user@mx.test"],
        &signer_message("original"),
    )
    .await;
    let got = sink.wait_for(1, WAIT).await;
    let data = &got[0].data;
    assert_eq!(
        verify(dns.addr, data).await,
        [("signer.test".into(), "ed".into(), true)]
    );
    let text = String::from_utf8_lossy(data);
    let tampered = text.replace("Subject: original", "Subject: changed");
    assert_ne!(text, tampered);
    assert_eq!(
        verify(dns.addr, tampered.as_bytes()).await,
        [("signer.test".into(), "ed".into(), false)],
        "a changed Subject must break the signature"
    );
    let body_changed = text.replace("Hello.", "Hello!");
    assert_eq!(
        verify(dns.addr, body_changed.as_bytes()).await,
        [("signer.test".into(), "ed".into(), false)],
        "a changed body must break the signature"
    );
}

#[tokio::test]
async fn dsns_floodgate_writes_are_signed() {
    let keys = keys();
    let dns = TestDns::start(zone(&keys)).await;
    let sink = bouncing_sink().await;
    let t = start(
        &dns,
        &relay(sink.addr.port(), "bounces = true", &keys.host.table()),
    )
    .await;
    let mut c = t.client().await;
    c.ehlo().await;
    c.send_mail(
        "owner@mx.test",
        &["gone@mx.test"],
        &message("bounce me", ""),
    )
    .await;
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got[0].mail_from, "", "the DSN, from the null sender");
    let dsn = String::from_utf8_lossy(&got[0].data);
    assert!(dsn.contains("report-type=delivery-status"), "{dsn}");
    assert_eq!(
        verify(dns.addr, &got[0].data).await,
        [("floodgate.test".into(), "host".into(), true)],
        "{dsn}"
    );
}

#[tokio::test]
async fn mail_from_a_domain_without_a_key_goes_out_unsigned_and_is_counted() {
    let keys = keys();
    let dns = TestDns::start(zone(&keys)).await;
    let sink = Sink::start().await;
    let t = start(&dns, &relay(sink.addr.port(), "", &keys.ed.table())).await;
    let mut c = t.client().await;
    c.ehlo().await;
    c.send_mail(
        "app@nokey.test",
        &["user@mx.test"],
        "From: app@nokey.test\r\nTo: user@mx.test\r\nSubject: unsigned\r\n\r\nHello.\r\n",
    )
    .await;
    let got = sink.wait_for(1, WAIT).await;
    let text = String::from_utf8_lossy(&got[0].data);
    assert!(!text.contains("DKIM-Signature"), "{text}");
    let admin = t.app.admin_addr.unwrap();
    assert_eq!(metric(admin, "floodgate_dkim_unsigned_total").await, 1.0);
    assert_eq!(metric(admin, "floodgate_dkim_signed_total").await, 0.0);
}

#[tokio::test]
async fn keys_added_by_a_reload_sign_the_next_message() {
    let keys = keys();
    let dns = TestDns::start(zone(&keys)).await;
    let sink = Sink::start().await;
    let t = start(&dns, &relay(sink.addr.port(), "", "")).await;
    let send = |subject: &'static str| {
        let t = &t;
        async move {
            let mut c = t.client().await;
            c.ehlo().await;
            c.send_mail(
                "app@signer.test",
                &["user@mx.test"],
                &signer_message(subject),
            )
            .await;
        }
    };
    send("before").await;
    let text = config_text_with_queue(
        t.dir.path(),
        dns.addr,
        "",
        "",
        &relay(sink.addr.port(), "", &keys.rsa.table()),
    );
    let reloaded = t
        .app
        .reload(parse_config(t.dir.path(), &text))
        .expect("reload");
    assert!(reloaded.applied.iter().any(|k| k == "dkim"), "{reloaded:?}");
    send("after").await;
    let got = sink.wait_for(2, WAIT).await;
    let by_subject = |s: &str| {
        got.iter()
            .find(|r| String::from_utf8_lossy(&r.data).contains(&format!("Subject: {s}")))
            .unwrap_or_else(|| panic!("no message {s}"))
    };
    assert!(
        verify(dns.addr, &by_subject("before").data)
            .await
            .is_empty()
    );
    assert_eq!(
        verify(dns.addr, &by_subject("after").data).await,
        [("signer.test".into(), "rsa".into(), true)]
    );
}

#[test]
fn check_config_refuses_a_key_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let keys = keys();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("floodgate.toml");
    let dns: SocketAddr = "127.0.0.1:53".parse().unwrap();
    std::fs::write(
        &config,
        config_text_with_queue(dir.path(), dns, "", "", &keys.ed.table()),
    )
    .unwrap();
    let check = || {
        std::process::Command::new(binary())
            .args(["check-config", "--config"])
            .arg(&config)
            .output()
            .expect("run check-config")
    };
    let ok = check();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    std::fs::set_permissions(&keys.ed.path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = check();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a 0644 key must be refused");
    assert!(stderr.contains("readable by group or others"), "{stderr}");
}

include!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/tools/dkimpy.rs"
));

/// dkimpy against the records that publish `keys`.
fn dkimpy_keys(message: &[u8], keys: &[&Key]) -> (bool, String) {
    dkimpy(message, keys.iter().map(|k| (k.name(), &k.record)))
}

#[tokio::test]
#[ignore = "needs python3 with dkimpy and pynacl (the independent verifier); .ci/run installs them"]
async fn dkimpy_verifies_smtp_http_and_dsn_signatures() {
    let keys = keys();
    let dns = TestDns::start(zone(&keys)).await;
    let sink = bouncing_sink().await;
    let dkim = format!(
        "{}{}{}",
        keys.rsa.table(),
        keys.ed.table(),
        keys.host.table()
    );
    let t = start(&dns, &relay(sink.addr.port(), "bounces = true", &dkim)).await;
    send_smtp_and_http(&t).await;
    let mut c = t.client().await;
    c.ehlo().await;
    c.send_mail(
        "owner@mx.test",
        &["gone@mx.test"],
        &message("bounce me", ""),
    )
    .await;
    let got = sink.wait_for(3, WAIT).await;
    assert_eq!(got.len(), 3);
    let all = [&keys.rsa, &keys.ed, &keys.host];
    for received in &got {
        let (passed, report) = dkimpy_keys(&received.data, &all);
        assert!(
            passed,
            "{report}\n{}",
            String::from_utf8_lossy(&received.data)
        );
        let expected = if received.mail_from.is_empty() { 1 } else { 2 };
        assert_eq!(report.matches("pass").count(), expected, "{report}");
    }
    let text = String::from_utf8_lossy(&got[0].data).replace("Subject: smtp", "Subject: other");
    let (passed, report) = dkimpy_keys(text.as_bytes(), &all);
    assert!(!passed, "tampering must fail: {report}");
}

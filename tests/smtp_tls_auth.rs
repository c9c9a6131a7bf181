//! STARTTLS and AUTH with a real client (lettre) and a self-signed certificate: who may
//! relay, and that credentials never cross the wire in clear text unless allowed.

mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use common::dns::{TestDns, Zone};
use common::floodgate::{TestApp, message};
use common::sink::self_signed;
use floodgate::clock::SystemClock;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

async fn zone() -> TestDns {
    TestDns::start(
        Zone::new()
            .mx("mx.test", 10, "mail.mx.test")
            .a("mail.mx.test", Ipv4Addr::LOCALHOST),
    )
    .await
}

/// Starts Floodgate with TLS and one user, not trusting loopback (so only AUTH relays).
async fn start(dns: &TestDns, smtp_extra: &str) -> (TestApp, String) {
    let (cert, key) = self_signed(&["floodgate.test"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cert.pem"), &cert).unwrap();
    std::fs::write(dir.path().join("key.pem"), &key).unwrap();
    let hash = floodgate::smtp::auth::hash_password("s3cret");
    let smtp = format!(
        r#"allowed_networks = []
{smtp_extra}

[smtp.tls]
cert = "{}"
key = "{}"

[[smtp.users]]
name = "billing"
password_hash = "{hash}"
"#,
        dir.path().join("cert.pem").display(),
        dir.path().join("key.pem").display(),
    );
    let t = TestApp::start_full(&smtp, "", "", dns.addr, Arc::new(SystemClock)).await;
    // Keep the certificate folder alive as long as the app's.
    std::mem::forget(dir);
    (t, cert)
}

fn mail(subject: &str) -> Message {
    Message::builder()
        .from("billing@client.test".parse().unwrap())
        .to("user@mx.test".parse().unwrap())
        .subject(subject)
        .body(String::from("Invoice attached.\n"))
        .unwrap()
}

/// A lettre client that requires STARTTLS (trusting `cert`) and authenticates.
fn mailer(t: &TestApp, cert: &str, password: &str) -> AsyncSmtpTransport<Tokio1Executor> {
    let tls = TlsParameters::builder("floodgate.test".into())
        .add_root_certificate(Certificate::from_pem(cert.as_bytes()).unwrap())
        .build_rustls()
        .unwrap();
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(t.smtp().port())
        .tls(Tls::Required(tls))
        .credentials(Credentials::new("billing".into(), password.into()))
        .timeout(Some(Duration::from_secs(10)))
        .build()
}

#[tokio::test]
async fn starttls_then_auth_relays_with_lettre() {
    let dns = zone().await;
    let (t, cert) = start(&dns, "").await;
    let mailer = mailer(&t, &cert, "s3cret");
    let response = mailer
        .send(mail("invoice"))
        .await
        .expect("sent over STARTTLS + AUTH");
    let text = response.message().collect::<Vec<_>>().join(" ");
    let id = text.split_whitespace().nth(1).expect("queue id").to_owned();
    let stored = t.app.queue().message(&id).await.unwrap().expect("queued");
    let body = String::from_utf8(stored.body.unwrap()).unwrap();
    assert!(body.contains("with ESMTPSA id"), "{body}");
    // Campaign comes from the AUTH user when there is no campaign header.
    assert_eq!(stored.campaign.as_deref(), Some("billing"));
}

#[tokio::test]
async fn wrong_password_is_refused_and_relay_stays_closed() {
    let dns = zone().await;
    let (t, cert) = start(&dns, "").await;
    let mailer = mailer(&t, &cert, "wrong");
    let err = mailer.send(mail("x")).await.expect_err("bad password");
    assert!(
        err.to_string().contains("535") || err.is_permanent(),
        "{err}"
    );
    // Unauthenticated (and loopback not trusted): the open-relay attempt is refused.
    let mut c = t.client().await;
    c.ehlo().await;
    c.cmd("MAIL FROM:<spam@client.test>", "250").await;
    c.rcpt("user@mx.test", "554 5.7.1").await;
}

#[tokio::test]
async fn auth_in_clear_text_is_refused_and_not_advertised() {
    let dns = zone().await;
    let (t, _) = start(&dns, "").await;
    let mut c = t.client().await;
    let ehlo = c.ehlo().await;
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    assert!(
        !ehlo.contains("AUTH"),
        "AUTH must not be offered before TLS: {ehlo}"
    );
    let creds = base64::engine::general_purpose::STANDARD.encode("\0billing\0s3cret");
    c.cmd(&format!("AUTH PLAIN {creds}"), "538 5.7.11").await;
}

#[tokio::test]
async fn auth_in_clear_text_on_loopback_when_allowed() {
    let dns = zone().await;
    let (t, _) = start(&dns, "auth_without_tls_on_loopback = true").await;
    let mut c = t.client().await;
    let ehlo = c.ehlo().await;
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
    // LOGIN, step by step.
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    c.cmd("AUTH LOGIN", "334 VXNlcm5hbWU6").await;
    c.cmd(&b64("billing"), "334 UGFzc3dvcmQ6").await;
    c.cmd(&b64("s3cret"), "235 2.7.0").await;
    let id = c
        .send_mail(
            "billing@client.test",
            &["user@mx.test"],
            &message("login", ""),
        )
        .await;
    assert!(t.app.queue().message(&id).await.unwrap().is_some());
}

#[tokio::test]
async fn commands_pipelined_after_starttls_are_dropped() {
    let dns = zone().await;
    let (t, _) = start(&dns, "").await;
    let mut c = t.client().await;
    c.ehlo().await;
    // An injection attempt (CVE-2011-0411): plain-text commands after STARTTLS.
    c.send(b"STARTTLS\r\nMAIL FROM:<evil@client.test>\r\n")
        .await;
    c.expect("220 2.0.0").await;
    // The server now waits for a TLS ClientHello; the injected MAIL got no reply.
    let r = tokio::time::timeout(Duration::from_millis(300), c.reply()).await;
    assert!(r.is_err(), "injected command was answered: {r:?}");
}

//! The SMTP door's hardening, each over real sockets to the real daemon: bad bytes and
//! bad EHLO arguments refused before any parser, open transactions finishing at
//! shutdown, RCPT refusals counted against the transaction's final campaign, and the
//! per-address limit on failed AUTH.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use common::dns::{TestDns, Zone};
use common::floodgate::{Smtp, TestApp, admin, message, metric, stored_message};
use floodgate::clock::ShiftedClock;
use floodgate::reason::Reason;

const LOCAL: Ipv4Addr = Ipv4Addr::LOCALHOST;

async fn zone() -> TestDns {
    TestDns::start(
        Zone::new()
            .mx("mx.test", 10, "mail.mx.test")
            .a("mail.mx.test", LOCAL),
    )
    .await
}

/// `[smtp]` lines for one user `app` / `s3cret`, AUTH allowed in clear on loopback.
/// The hash is a cheap Argon2id (256 KiB, one pass): verification takes the cost from
/// the hash, and these tests are about how many guesses are checked, not their cost.
fn user() -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let params = argon2::Params::new(256, 1, 1, None).unwrap();
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::encode_b64(b"floodgate-tests!").unwrap();
    let hash = argon.hash_password(b"s3cret", &salt).unwrap().to_string();
    format!(
        "auth_without_tls_on_loopback = true\n[[smtp.users]]\nname = \"app\"\npassword_hash = \"{hash}\"\n"
    )
}

fn plain(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
}

#[tokio::test]
async fn bad_bytes_and_bad_helo_get_501_and_never_reach_the_store() {
    let dns = zone().await;
    let t = TestApp::start(&user(), "", dns.addr).await;
    let mut c = t.client().await;
    c.send(b"EHLO a\x00b\r\n").await;
    c.expect("501 5.5.2").await;
    c.cmd("EHLO -not-a-domain-", "501 5.5.4").await;
    c.cmd("EHLO a..test", "501 5.5.4").await;
    c.cmd("HELO [IPv6:::1]", "250").await;
    c.cmd("EHLO [127.0.0.1]", "250").await;
    c.ehlo().await;
    c.send(b"MAIL FROM:<\xff\xfe@client.test>\r\n").await;
    c.expect("501 5.1.7").await;
    c.send(b"MAIL FROM:<a\x00@client.test>\r\n").await;
    c.expect("501 5.1.7").await;
    c.cmd("MAIL FROM:<app@client.test>", "250").await;
    c.send(b"RCPT TO:<\xc3(@mx.test>\r\n").await;
    c.expect("501 5.1.3").await;
    c.send(b"RCPT TO:<a\x00b@mx.test>\r\n").await;
    c.expect("501 5.1.3").await;
    c.send(b"NOOP \xff\r\n").await;
    c.expect("501 5.5.2").await;
    c.send(b"NOOP\rRSET\r\n").await;
    c.expect("501 5.5.2").await;
    c.rcpt("user@mx.test", "250").await;
    let id = common::floodgate::queue_id(&c.data(&message("clean", "")).await);
    let (sender, _, rcpts) = stored_message(t.app.queue().path(), &id).expect("stored");
    assert_eq!(sender, "app@client.test");
    assert_eq!(rcpts.len(), 1, "{rcpts:?}");
    assert_eq!(rcpts[0].0, "user@mx.test");

    // AUTH lines are never decoded lossily: broken UTF-8 ends the exchange with 501.
    c.cmd("AUTH PLAIN", "334").await;
    c.send(b"\xff\xfe\r\n").await;
    c.expect("501 5.5.2").await;
    c.cmd(&format!("AUTH PLAIN {}", plain("app", "s3cret")), "235")
        .await;
}

#[tokio::test]
async fn shutdown_lets_open_transactions_finish_and_tells_idle_sessions() {
    let dns = zone().await;
    let t = TestApp::start("", "", dns.addr).await;
    let queue_db = t.app.queue().path().to_owned();
    // One transaction before DATA, one in the middle of its body, one idle session.
    let mut before = t.client().await;
    before.ehlo().await;
    before.cmd("MAIL FROM:<a@client.test>", "250").await;
    before.rcpt("user@mx.test", "250").await;
    let mut during = t.client().await;
    during.ehlo().await;
    during.cmd("MAIL FROM:<b@client.test>", "250").await;
    during.rcpt("user@mx.test", "250").await;
    during.cmd("DATA", "354").await;
    during.send(b"Subject: half\r\n\r\nfirst half\r\n").await;
    let mut idle = t.client().await;
    idle.ehlo().await;

    let TestApp { app, dir } = t;
    let stopping = tokio::spawn(app.shutdown());
    // The idle session hears at once; that is how we know shutdown has begun.
    idle.expect("421 4.3.2").await;

    during.send(b"second half\r\n.\r\n").await;
    let during_id = common::floodgate::queue_id(&during.expect("250 2.0.0").await);
    let before_id = common::floodgate::queue_id(&before.data(&message("before", "")).await);
    // Their transactions done, both are told at their next command.
    before.cmd("NOOP", "421 4.3.2").await;
    during.cmd("MAIL FROM:<b@client.test>", "421 4.3.2").await;
    stopping.await.unwrap();
    for id in [before_id, during_id] {
        assert!(stored_message(&queue_db, &id).is_some(), "{id} stored");
    }
    drop(dir);
}

#[tokio::test]
async fn rcpt_refusals_count_against_the_campaign_in_the_header() {
    let dns = zone().await;
    let t = TestApp::start("", "", dns.addr).await;
    let mut c = t.client().await;
    c.ehlo().await;
    c.cmd("MAIL FROM:<sender@client.test>", "250").await;
    for i in 0..5 {
        c.rcpt(&format!("u{i}@nx.test"), "550 5.1.2").await;
    }
    c.rcpt("user@mx.test", "250").await;
    c.data(&message("real", "X-Campaign-ID: real\r\n")).await;
    let real = t.app.campaigns().get(Some("real"));
    assert_eq!(real.failures(Reason::NoSuchDomain), 5);
    assert_eq!(real.accepted.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert!(
        t.app.campaigns().find("sender@client.test").is_none(),
        "nothing counted under the sender"
    );
    // The admin API shows one ratio: 5 failed of 6 presented.
    let list = admin(
        t.app.admin_addr.unwrap(),
        "GET",
        "/admin/v1/campaigns",
        None,
    )
    .await;
    let view = list
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "real"))
        .unwrap_or_else(|| panic!("campaign real in {list}"))
        .clone();
    assert_eq!(view["failed"], 5);
    let ratio = view["failure_ratio"].as_f64().unwrap();
    assert!((ratio - 5.0 / 6.0).abs() < 1e-9, "{view}");

    // Without DATA the campaign known before DATA (the sender) owns the refusals.
    c.cmd("MAIL FROM:<sender@client.test>", "250").await;
    c.rcpt("x@nx.test", "550 5.1.2").await;
    c.rcpt("y@nx.test", "550 5.1.2").await;
    c.cmd("RSET", "250").await;
    let sender = t.app.campaigns().get(Some("sender@client.test"));
    assert_eq!(sender.failures(Reason::NoSuchDomain), 2);
    assert_eq!(real.failures(Reason::NoSuchDomain), 5);
}

/// Guesses from one address over fresh sessions; returns (535 replies, 454 replies).
async fn guess(t: &TestApp, from: IpAddr, attempts: usize, password: &str) -> (usize, usize) {
    let (mut refused, mut limited) = (0, 0);
    let mut session: Option<Smtp> = None;
    for _ in 0..attempts {
        let c = match session.as_mut() {
            Some(c) => c,
            None => {
                let mut c = Smtp::connect_from(t.smtp(), from).await.expect("connect");
                c.expect("220").await;
                c.ehlo().await;
                session.insert(c)
            }
        };
        c.send(format!("AUTH PLAIN {}\r\n", plain("app", password)).as_bytes())
            .await;
        let reply = c.reply().await;
        if reply.starts_with("535 5.7.8") {
            refused += 1;
        } else if reply.starts_with("454 4.7.0") {
            limited += 1;
        } else if reply.starts_with("421 4.7.0") || reply.is_empty() {
            // Too many errors in one session: the client reconnects, as attackers do.
            session = None;
        } else {
            panic!("unexpected AUTH reply {reply:?}");
        }
    }
    (refused, limited)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_auth_is_limited_per_address_across_sessions() {
    let dns = zone().await;
    let clock = Arc::new(ShiftedClock::default());
    let t = TestApp::start_with_clock(&user(), "", dns.addr, clock.clone()).await;
    let admin_addr = t.app.admin_addr.unwrap();
    let attacker: IpAddr = [127, 0, 0, 3].into();
    let started = Instant::now();
    let (refused, limited) = guess(&t, attacker, 80, "wrong").await;
    let elapsed = started.elapsed();
    let verified = metric(admin_addr, "floodgate_smtp_auth_verifications_total").await;
    // Ten free failures, then at most one guess per second of the attack.
    let bound = 10.0 + elapsed.as_secs_f64().ceil() + 1.0;
    assert!(
        verified <= bound,
        "{verified} guesses verified in {elapsed:?} (bound {bound})"
    );
    assert_eq!(refused as f64, verified);
    assert!(limited > 0, "no guess was limited");
    assert!(metric(admin_addr, "floodgate_smtp_auth_limited_total").await >= limited as f64);
    // Even the right password is not checked from the limited address for now...
    assert_eq!(guess(&t, attacker, 1, "s3cret").await, (0, 1));
    // ...while another address is not affected.
    let mut c = Smtp::connect_from(t.smtp(), [127, 0, 0, 4].into())
        .await
        .unwrap();
    c.expect("220").await;
    c.ehlo().await;
    c.cmd(
        &format!("AUTH PLAIN {}", plain("app", "s3cret")),
        "235 2.7.0",
    )
    .await;
    // The lockout grows: one second later the attacker is still locked out.
    clock.advance(Duration::from_millis(1100));
    let before = metric(admin_addr, "floodgate_smtp_auth_verifications_total").await;
    let (_, limited_later) = guess(&t, attacker, 5, "wrong").await;
    let after = metric(admin_addr, "floodgate_smtp_auth_verifications_total").await;
    assert!(
        after - before <= 1.0,
        "{} verified after the lockout",
        after - before
    );
    assert!(limited_later >= 4);
}

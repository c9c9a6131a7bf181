//! Relay: mail submitted over SMTP reaches real receiving SMTP servers on loopback through
//! the MX and smarthost transports, with honest per-recipient outcomes, retries on a
//! schedule (with a movable clock), expiry, MX fallback, rate limits and held campaigns.

mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::floodgate::{TestApp, message};
use common::relay::{WAIT, partial_sink, relay_config, start, wait_recipient};
use common::sink::{RcptScript, Sink, SinkConfig, self_signed};
use floodgate::clock::ShiftedClock;
use floodgate::queue::RecipientState;

fn zone() -> Zone {
    Zone::new()
        .mx("mx.test", 10, "mail.mx.test")
        .a("mail.mx.test", Ipv4Addr::LOCALHOST)
        .mx("rate.test", 10, "mail.mx.test")
}

/// A sink that answers 451 to every RCPT until the returned switch is turned on.
async fn deferring_sink() -> (Arc<AtomicBool>, Sink) {
    let accept = Arc::new(AtomicBool::new(false));
    let flag = accept.clone();
    let sink = Sink::start_with(SinkConfig {
        rcpt: Box::new(move |_| {
            if flag.load(Ordering::SeqCst) {
                RcptScript::Accept
            } else {
                RcptScript::Reply(451, "4.3.0 try later")
            }
        }),
        ..Default::default()
    })
    .await;
    (accept, sink)
}

/// Polls until the recipient reaches `state`, returning its last reply, reason and
/// attempts.
async fn wait_state(
    t: &TestApp,
    queue_id: &str,
    address: &str,
    state: RecipientState,
) -> (Option<String>, Option<String>, u32) {
    let r = wait_recipient(t, queue_id, address, &format!("reaching {state:?}"), |r| {
        r.state == state
    })
    .await;
    (r.last_reply, r.reason, r.attempts)
}

/// Polls until the recipient has been attempted `n` times.
async fn wait_attempts(t: &TestApp, queue_id: &str, address: &str, n: u32) {
    wait_recipient(t, queue_id, address, &format!("attempt {n}"), |r| {
        r.attempts >= n
    })
    .await;
}

#[tokio::test]
async fn delivers_to_mx_with_envelope_and_body_in_one_transaction() {
    let dns = TestDns::start(zone()).await;
    let sink = Sink::start().await;
    let t = start(
        &dns,
        &relay_config(sink.addr.port(), "", ""),
        Arc::default(),
    )
    .await;
    let mut c = t.client().await;
    c.ehlo().await;
    let id = c
        .send_mail(
            "app@client.test",
            &["a@mx.test", "b@mx.test"],
            &message("relayed", ""),
        )
        .await;
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got[0].mail_from, "app@client.test");
    assert_eq!(
        got[0].rcpts,
        ["a@mx.test", "b@mx.test"],
        "one transaction, one RCPT each"
    );
    let body = String::from_utf8_lossy(&got[0].data);
    assert!(body.starts_with("Received: from client.test"), "{body}");
    assert!(
        body.contains("Subject: relayed\r\n") && body.contains("\r\n.leading dot line\r\n"),
        "{body}"
    );
    wait_state(&t, &id, "a@mx.test", RecipientState::Delivered).await;
    wait_state(&t, &id, "b@mx.test", RecipientState::Delivered).await;
    let msg = t.app.queue().message(&id).await.unwrap().unwrap();
    assert!(
        msg.body.is_none(),
        "the body is freed once every recipient is done"
    );
}

#[tokio::test]
async fn partial_acceptance_gives_per_recipient_outcomes() {
    let dns = TestDns::start(zone()).await;
    let sink = partial_sink().await;
    let t = start(
        &dns,
        &relay_config(sink.addr.port(), "", ""),
        Arc::default(),
    )
    .await;
    let mut c = t.client().await;
    c.ehlo().await;
    let id = c
        .send_mail(
            "app@client.test",
            &["ok@mx.test", "gone@mx.test", "busy@mx.test"],
            &message("partial", ""),
        )
        .await;
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got[0].rcpts, ["ok@mx.test"]);
    wait_state(&t, &id, "ok@mx.test", RecipientState::Delivered).await;
    let (reply, reason, _) = wait_state(&t, &id, "gone@mx.test", RecipientState::Failed).await;
    assert_eq!(reason.as_deref(), Some("rejected"));
    assert!(reply.unwrap().starts_with("550 5.1.1"));
    wait_attempts(&t, &id, "busy@mx.test", 1).await;
    let (reply, _, attempts) = wait_state(&t, &id, "busy@mx.test", RecipientState::Scheduled).await;
    assert_eq!(attempts, 1);
    assert!(reply.unwrap().starts_with("450 4.2.1"));
    let campaign = t.app.campaigns().get(Some("app@client.test"));
    assert_eq!(campaign.failures(floodgate::reason::Reason::Rejected), 1);
}

#[tokio::test]
async fn retry_follows_the_schedule_on_a_moved_clock() {
    let dns = TestDns::start(zone()).await;
    let (accept, sink) = deferring_sink().await;
    let clock = Arc::new(ShiftedClock::default());
    let t = start(
        &dns,
        &relay_config(sink.addr.port(), r#"backoff = ["10m", "1h"]"#, ""),
        clock.clone(),
    )
    .await;
    let mut c = t.client().await;
    c.ehlo().await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let id = c
        .send_mail("app@client.test", &["r@mx.test"], &message("retry", ""))
        .await;
    wait_attempts(&t, &id, "r@mx.test", 1).await;
    // The next attempt is 10 minutes out, plus at most 10% jitter.
    let next = next_attempt(&t, &id);
    assert!(
        next >= before + 600_000 && next <= before + 660_000 + 5_000,
        "next attempt at +{} ms",
        next - before
    );
    // Nothing happens before it is due.
    clock.advance(Duration::from_secs(5 * 60));
    t.scheduler_pass().await;
    assert_eq!(attempt_count(&t, &id).await, 1);
    // Once due, the second attempt is made and succeeds.
    accept.store(true, Ordering::SeqCst);
    clock.advance(Duration::from_secs(7 * 60));
    t.app.wake_scheduler();
    wait_state(&t, &id, "r@mx.test", RecipientState::Delivered).await;
    sink.wait_for(1, WAIT).await;
}

fn next_attempt(t: &TestApp, queue_id: &str) -> i64 {
    let conn = rusqlite::Connection::open(t.app.queue().path()).unwrap();
    conn.query_row(
        "SELECT r.next_attempt FROM recipients r JOIN messages m ON m.id = r.message_id WHERE m.queue_id = ?1",
        [queue_id],
        |r| r.get(0),
    )
    .unwrap()
}

async fn attempt_count(t: &TestApp, queue_id: &str) -> u32 {
    t.app
        .queue()
        .message(queue_id)
        .await
        .unwrap()
        .unwrap()
        .recipients[0]
        .attempts
}

#[tokio::test]
async fn expires_after_max_age() {
    let dns = TestDns::start(zone()).await;
    let sink = Sink::start_with(SinkConfig {
        rcpt: Box::new(|_| RcptScript::Reply(451, "4.3.0 never")),
        ..Default::default()
    })
    .await;
    let clock = Arc::new(ShiftedClock::default());
    let cfg = relay_config(
        sink.addr.port(),
        r#"backoff = ["1m"]
max_age = "1h""#,
        "",
    );
    let t = start(&dns, &cfg, clock.clone()).await;
    let mut c = t.client().await;
    c.ehlo().await;
    let id = c
        .send_mail("app@client.test", &["x@mx.test"], &message("expire", ""))
        .await;
    wait_attempts(&t, &id, "x@mx.test", 1).await;
    clock.advance(Duration::from_secs(2 * 3600));
    t.app.wake_scheduler();
    let (reply, reason, attempts) = wait_state(&t, &id, "x@mx.test", RecipientState::Failed).await;
    assert_eq!(reason.as_deref(), Some("expired"));
    assert_eq!(attempts, 2);
    assert!(reply.unwrap().starts_with("451 4.3.0"));
}

#[tokio::test]
async fn falls_back_to_the_next_mx() {
    // Two MX hosts on one port: the preferred one (127.0.0.2) has nothing listening.
    let sink = Sink::start_with(SinkConfig {
        bind_ip: Ipv4Addr::new(127, 0, 0, 3),
        ..Default::default()
    })
    .await;
    let dns = TestDns::start(
        Zone::new()
            .mx("multi.test", 10, "primary.multi.test")
            .mx("multi.test", 20, "backup.multi.test")
            .a("primary.multi.test", Ipv4Addr::new(127, 0, 0, 2))
            .a("backup.multi.test", Ipv4Addr::new(127, 0, 0, 3)),
    )
    .await;
    let t = start(
        &dns,
        &relay_config(sink.addr.port(), "", ""),
        Arc::default(),
    )
    .await;
    let mut c = t.client().await;
    c.ehlo().await;
    let id = c
        .send_mail(
            "app@client.test",
            &["u@multi.test"],
            &message("fallback", ""),
        )
        .await;
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got[0].rcpts, ["u@multi.test"]);
    wait_state(&t, &id, "u@multi.test", RecipientState::Delivered).await;
}

#[tokio::test]
async fn smarthost_with_auth_over_starttls() {
    let (cert, key) = self_signed(&["smarthost.test"]);
    let sink = Sink::start_with(SinkConfig {
        tls: Some((cert.clone(), key)),
        auth: Some(("relayuser".into(), "relaypass".into())),
        ..Default::default()
    })
    .await;
    let dns = TestDns::start(zone().a("smarthost.test", Ipv4Addr::LOCALHOST)).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &cert).unwrap();
    let config = format!(
        r#"
[delivery]
enabled = true

[[route]]
domains = ["*"]
transport = "smarthost"
host = "smarthost.test"
port = {}
tls = "starttls"
tls_ca = "{}"
auth_user = "relayuser"
auth_password = "relaypass"
"#,
        sink.addr.port(),
        ca.display()
    );
    let t = start(&dns, &config, Arc::default()).await;
    let mut c = t.client().await;
    c.ehlo().await;
    let id = c
        .send_mail(
            "app@client.test",
            &["someone@mx.test"],
            &message("smarthost", ""),
        )
        .await;
    let got = sink.wait_for(1, WAIT).await;
    assert!(got[0].tls, "delivered inside STARTTLS");
    assert_eq!(got[0].auth_user.as_deref(), Some("relayuser"));
    wait_state(&t, &id, "someone@mx.test", RecipientState::Delivered).await;
}

/// Relays one message to a sink set up as `cfg`, waits for its first attempt, and
/// returns that attempt's recorded reply (the recipient stays scheduled).
async fn first_attempt_reply(dns: &TestDns, cfg: SinkConfig, rcpt: &str) -> String {
    let sink = Sink::start_with(cfg).await;
    let t = start(dns, &relay_config(sink.addr.port(), "", ""), Arc::default()).await;
    let mut c = t.client().await;
    c.ehlo().await;
    let id = c
        .send_mail("app@client.test", &[rcpt], &message("trouble", ""))
        .await;
    wait_attempts(&t, &id, rcpt, 1).await;
    let (reply, _, _) = wait_state(&t, &id, rcpt, RecipientState::Scheduled).await;
    reply.expect("a reply is recorded")
}

#[tokio::test]
async fn dropped_and_stalled_connections_are_transient() {
    let dns = TestDns::start(zone()).await;
    let dropped = SinkConfig {
        drop_mid_data: true,
        ..Default::default()
    };
    let reply = first_attempt_reply(&dns, dropped, "d@mx.test").await;
    // The sink vanished after DATA: from here the final dot went out unanswered.
    assert!(reply.starts_with("451 4.4.2"), "{reply}");
    let stalled = SinkConfig {
        stall_after_greeting: Some(Duration::from_secs(10)),
        ..Default::default()
    };
    let reply = first_attempt_reply(&dns, stalled, "s@mx.test").await;
    assert!(
        reply.contains("timeout"),
        "stalled past the command timeout: {reply}"
    );
}

#[tokio::test]
async fn per_domain_rate_holds() {
    let dns = TestDns::start(zone()).await;
    let sink = Sink::start().await;
    let cfg = relay_config(
        sink.addr.port(),
        "[delivery.rates]\n\"rate.test\" = \"10/s\"",
        "",
    );
    let t = start(&dns, &cfg, Arc::default()).await;
    let mut c = t.client().await;
    c.ehlo().await;
    for i in 0..30 {
        c.send_mail(
            "app@client.test",
            &[&format!("u{i}@rate.test")],
            &message("rated", ""),
        )
        .await;
    }
    let got = sink.wait_for(30, Duration::from_secs(30)).await;
    let mut times: Vec<_> = got.iter().map(|r| r.at).collect();
    times.sort();
    // No one-second window holds more than the rate (plus one for the window's edge).
    for (i, start) in times.iter().enumerate() {
        let in_window = times[i..]
            .iter()
            .filter(|t| t.duration_since(*start) < Duration::from_secs(1))
            .count();
        assert!(
            in_window <= 11,
            "{in_window} deliveries within one second at 10/s"
        );
    }
    let span = times[29].duration_since(times[0]);
    assert!(
        span >= Duration::from_millis(2500),
        "30 messages at 10/s took only {span:?}"
    );
}

#[tokio::test]
async fn paused_campaign_is_held_until_resumed() {
    let dns = TestDns::start(zone()).await;
    let (accept, sink) = deferring_sink().await;
    let clock = Arc::new(ShiftedClock::default());
    let t = start(
        &dns,
        &relay_config(sink.addr.port(), r#"backoff = ["1m"]"#, ""),
        clock.clone(),
    )
    .await;
    let mut c = t.client().await;
    c.ehlo().await;
    let id = c
        .send_mail(
            "app@client.test",
            &["h@mx.test"],
            &message("held", "X-Campaign-ID: promo\r\n"),
        )
        .await;
    wait_attempts(&t, &id, "h@mx.test", 1).await;
    // Paused while queued: it is due, but not attempted.
    let campaign = t.app.campaigns().get(Some("promo"));
    campaign.set_paused(true);
    accept.store(true, Ordering::SeqCst);
    clock.advance(Duration::from_secs(3600));
    t.scheduler_pass().await;
    assert_eq!(
        attempt_count(&t, &id).await,
        1,
        "a paused campaign's recipients are held"
    );
    assert!(sink.received().is_empty());
    campaign.set_paused(false);
    t.app.wake_scheduler();
    wait_state(&t, &id, "h@mx.test", RecipientState::Delivered).await;
}

#[tokio::test]
async fn bounces_go_to_the_sender_but_never_for_the_null_sender() {
    let dns = TestDns::start(zone()).await;
    let sink = Sink::start_with(SinkConfig {
        rcpt: Box::new(|r| {
            if r.starts_with("gone") {
                RcptScript::Reply(550, "5.1.1 no such user")
            } else {
                RcptScript::Accept
            }
        }),
        ..Default::default()
    })
    .await;
    let t = start(
        &dns,
        &relay_config(sink.addr.port(), "bounces = true", ""),
        Arc::default(),
    )
    .await;
    let mut c = t.client().await;
    c.ehlo().await;
    let id = c
        .send_mail(
            "owner@mx.test",
            &["gone1@mx.test", "gone2@mx.test"],
            &message("bounce me", ""),
        )
        .await;
    wait_state(&t, &id, "gone1@mx.test", RecipientState::Failed).await;
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1, "one notification for both recipients");
    assert_eq!(got[0].mail_from, "", "sent from the null sender");
    assert_eq!(got[0].rcpts, ["owner@mx.test"]);
    let dsn = String::from_utf8_lossy(&got[0].data);
    assert!(dsn.contains("report-type=delivery-status"), "{dsn}");
    assert!(
        dsn.contains("Final-Recipient: rfc822; gone1@mx.test")
            && dsn.contains("Final-Recipient: rfc822; gone2@mx.test")
    );
    assert!(dsn.contains("Status: 5.1.1"));
    // A message from the null sender that fails is not bounced.
    c.cmd("MAIL FROM:<>", "250").await;
    c.rcpt("gone3@mx.test", "250").await;
    let reply = c.data(&message("null", "")).await;
    let id = common::floodgate::queue_id(&reply);
    wait_state(&t, &id, "gone3@mx.test", RecipientState::Failed).await;
    t.scheduler_pass().await;
    assert_eq!(sink.received().len(), 1);
}

/// An operator's pause takes the campaign's queued recipients out of the due index (so a
/// paused flood costs the scheduler's claims nothing); resume puts them back.
#[tokio::test]
async fn admin_pause_holds_queued_recipients_and_resume_releases_them() {
    let dns = TestDns::start(zone()).await;
    let (accept, sink) = deferring_sink().await;
    let clock = Arc::new(ShiftedClock::default());
    let t = start(
        &dns,
        &relay_config(sink.addr.port(), r#"backoff = ["1m"]"#, ""),
        clock.clone(),
    )
    .await;
    let admin = t.app.admin_addr.unwrap();
    let mut c = t.client().await;
    c.ehlo().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let id = c
            .send_mail(
                "app@client.test",
                &[&format!("p{i}@mx.test")],
                &message("promo", "X-Campaign-ID: promo\r\n"),
            )
            .await;
        wait_attempts(&t, &id, &format!("p{i}@mx.test"), 1).await;
        ids.push(id);
    }
    common::floodgate::admin(admin, "POST", "/admin/v1/campaigns/promo/pause", None).await;
    let held = || {
        let conn = rusqlite::Connection::open(t.app.queue().path()).unwrap();
        conn.query_row(
            "SELECT COUNT(*) FROM recipients WHERE campaign = 'promo' AND state = 3",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while held() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "recipients never held"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let queue = common::floodgate::admin(admin, "GET", "/admin/v1/queue", None).await;
    assert_eq!(queue["by_state"]["held"], 3, "{queue}");
    accept.store(true, Ordering::SeqCst);
    clock.advance(Duration::from_secs(3600));
    t.scheduler_pass().await;
    assert!(
        sink.received().is_empty(),
        "held recipients are not attempted"
    );
    common::floodgate::admin(admin, "POST", "/admin/v1/campaigns/promo/resume", None).await;
    for (i, id) in ids.iter().enumerate() {
        wait_state(&t, id, &format!("p{i}@mx.test"), RecipientState::Delivered).await;
    }
    let msg = t.app.queue().message(&ids[0]).await.unwrap().unwrap();
    assert!(msg.body.is_none(), "delivered: the body is freed");
}

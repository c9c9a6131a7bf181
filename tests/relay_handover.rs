//! Relay correctness at the edges of a transaction: a reply lost after the final dot on a
//! pooled connection defers the recipient instead of resending at once (no duplicate
//! before the scheduler's retry), and SMTPUTF8 is passed on to a next hop that offers it
//! and refused, with a notification, by one that does not.

mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::floodgate::{Smtp, TestApp, message, queue_id};
use common::relay::{WAIT, start, wait_recipient};
use common::sink::{Received, Sink, SinkConfig};
use floodgate::clock::ShiftedClock;
use floodgate::queue::RecipientState;

fn zone() -> Zone {
    Zone::new()
        .mx("mx.test", 10, "mail.mx.test")
        .a("mail.mx.test", Ipv4Addr::LOCALHOST)
}

/// Retries ten minutes out: a second attempt only happens when a test moves the clock.
fn relay_config(port: u16, delivery_extra: &str) -> String {
    common::relay::relay_config(port, &format!("backoff = [\"10m\"]\n{delivery_extra}"), "")
}

/// Polls until the recipient has been attempted at least `n` times; returns its state,
/// last reply and reason then.
async fn after_attempts(
    t: &TestApp,
    id: &str,
    address: &str,
    n: u32,
) -> (RecipientState, String, Option<String>) {
    let r = wait_recipient(t, id, address, &format!("attempt {n}"), |r| r.attempts >= n).await;
    (r.state, r.last_reply.unwrap_or_default(), r.reason)
}

fn copies(got: &[Received], subject: &str) -> usize {
    let needle = format!("Subject: {subject}\r\n");
    got.iter()
        .filter(|r| String::from_utf8_lossy(&r.data).contains(&needle))
        .count()
}

/// The second message on a pooled connection is taken by the sink, whose reply to the
/// final dot is then lost (`lost_for`: silent that long, then the connection closes).
async fn lost_reply_on_pooled_connection(lost_for: Duration) {
    let dns = TestDns::start(zone()).await;
    let sink = Sink::start_with(SinkConfig {
        lose_reply: Box::new(move |accepted| (accepted == 1).then_some(lost_for)),
        ..Default::default()
    })
    .await;
    let clock = Arc::new(ShiftedClock::default());
    let t = start(&dns, &relay_config(sink.addr.port(), ""), clock.clone()).await;
    let mut c = t.client().await;
    c.ehlo().await;
    let first = c
        .send_mail("app@client.test", &["r@mx.test"], &message("first", ""))
        .await;
    let (state, _, _) = after_attempts(&t, &first, "r@mx.test", 1).await;
    assert_eq!(state, RecipientState::Delivered);
    let second = c
        .send_mail("app@client.test", &["r@mx.test"], &message("second", ""))
        .await;
    let (state, reply, reason) = after_attempts(&t, &second, "r@mx.test", 1).await;
    // Received once, and not sent again before the scheduler's retry.
    assert_eq!(copies(&sink.received(), "second"), 1);
    assert_eq!(sink.connections(), 1, "no fresh connection for a resend");
    assert_eq!(state, RecipientState::Scheduled, "deferred: {reply}");
    assert!(
        reply.starts_with("451 4.4.2 no reply to the end of DATA"),
        "{reply}"
    );
    assert_eq!(reason, None);
    // The scheduler retries after the backoff: the one duplicate SMTP allows (RFC 1047).
    clock.advance(Duration::from_secs(11 * 60));
    t.app.wake_scheduler();
    let (state, reply, _) = after_attempts(&t, &second, "r@mx.test", 2).await;
    assert_eq!(state, RecipientState::Delivered, "{reply}");
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    assert_eq!(copies(&sink.received(), "second"), 2);
}

#[tokio::test]
async fn reply_dropped_after_the_final_dot_defers_instead_of_resending() {
    lost_reply_on_pooled_connection(Duration::ZERO).await;
}

#[tokio::test]
async fn reply_stalled_after_the_final_dot_defers_instead_of_resending() {
    // Silent past the 2 s data timeout.
    lost_reply_on_pooled_connection(Duration::from_secs(8)).await;
}

/// A pooled connection closed by the peer while idle fails before anything is sent: the
/// message goes out at once on a fresh connection, exactly once.
#[tokio::test]
async fn pooled_connection_closed_before_the_message_is_retried_at_once() {
    let dns = TestDns::start(zone()).await;
    let sink = Sink::start().await;
    let t = start(&dns, &relay_config(sink.addr.port(), ""), Arc::default()).await;
    let mut c = t.client().await;
    c.ehlo().await;
    let first = c
        .send_mail("app@client.test", &["r@mx.test"], &message("one", ""))
        .await;
    after_attempts(&t, &first, "r@mx.test", 1).await;
    // Stop the sink's sessions (the pooled connection closes) but keep the port.
    let port = sink.addr.port();
    drop(sink);
    // Let the aborted accept task release the port.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sink = Sink::start_with(SinkConfig {
        bind_port: port,
        ..Default::default()
    })
    .await;
    let second = c
        .send_mail("app@client.test", &["r@mx.test"], &message("two", ""))
        .await;
    let (state, reply, _) = after_attempts(&t, &second, "r@mx.test", 1).await;
    assert_eq!(state, RecipientState::Delivered, "{reply}");
    assert_eq!(copies(&sink.received(), "two"), 1);
}

fn sink_with_smtputf8(offer: bool) -> SinkConfig {
    SinkConfig {
        smtputf8: offer,
        ..Default::default()
    }
}

async fn submit(c: &mut Smtp, mail: &str, rcpts: &[&str], body: &str) -> String {
    c.cmd(mail, "250").await;
    for r in rcpts {
        c.rcpt(r, "250").await;
    }
    let reply = c.data(body).await;
    assert!(reply.starts_with("250 2.0.0 "), "DATA: {reply}");
    queue_id(&reply)
}

#[tokio::test]
async fn smtputf8_is_passed_to_a_next_hop_that_offers_it() {
    let dns = TestDns::start(zone()).await;
    let sink = Sink::start_with(sink_with_smtputf8(true)).await;
    let t = start(&dns, &relay_config(sink.addr.port(), ""), Arc::default()).await;
    let mut c = t.client().await;
    c.ehlo().await;
    let id = submit(
        &mut c,
        "MAIL FROM:<sénder@mx.test> SMTPUTF8",
        &["r@mx.test"],
        &message("héllo", ""),
    )
    .await;
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got[0].mail_from, "sénder@mx.test");
    assert!(
        got[0]
            .mail_params
            .split_whitespace()
            .any(|p| p == "SMTPUTF8"),
        "{:?}",
        got[0].mail_params
    );
    let (state, _, _) = after_attempts(&t, &id, "r@mx.test", 1).await;
    assert_eq!(state, RecipientState::Delivered);
    // A plain message is relayed without the parameter.
    let id = c
        .send_mail("app@client.test", &["p@mx.test"], &message("plain", ""))
        .await;
    let got = sink.wait_for(2, WAIT).await;
    assert!(
        !got[1].mail_params.contains("SMTPUTF8"),
        "{:?}",
        got[1].mail_params
    );
    after_attempts(&t, &id, "p@mx.test", 1).await;
}

#[tokio::test]
async fn smtputf8_message_fails_for_good_at_a_next_hop_without_it_and_bounces() {
    let dns = TestDns::start(zone()).await;
    let sink = Sink::start_with(sink_with_smtputf8(false)).await;
    let t = start(
        &dns,
        &relay_config(sink.addr.port(), "bounces = true"),
        Arc::default(),
    )
    .await;
    let mut c = t.client().await;
    c.ehlo().await;
    // An ASCII envelope, but UTF-8 headers under SMTPUTF8: not relayable there.
    let id = submit(
        &mut c,
        "MAIL FROM:<owner@mx.test> SMTPUTF8",
        &["r@mx.test"],
        &message("héllo wörld", ""),
    )
    .await;
    let (state, reply, reason) = after_attempts(&t, &id, "r@mx.test", 1).await;
    assert_eq!(state, RecipientState::Failed, "{reply}");
    assert!(reply.starts_with("550 5.6.7"), "{reply}");
    assert_eq!(reason.as_deref(), Some("rejected"));
    // Only the notification reached the sink, from the null sender, with the status.
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].mail_from, "");
    assert_eq!(got[0].rcpts, ["owner@mx.test"]);
    let dsn = String::from_utf8_lossy(&got[0].data);
    assert!(dsn.contains("Status: 5.6.7"), "{dsn}");
    assert!(dsn.contains("SMTPUTF8"), "{dsn}");
    // A UTF-8 sender cannot be written at all: every recipient fails the same way.
    let id = submit(
        &mut c,
        "MAIL FROM:<sénder@mx.test> SMTPUTF8",
        &["a@mx.test", "b@mx.test"],
        &message("ascii", ""),
    )
    .await;
    for r in ["a@mx.test", "b@mx.test"] {
        let (state, reply, _) = after_attempts(&t, &id, r, 1).await;
        assert_eq!(state, RecipientState::Failed, "{reply}");
        assert!(reply.starts_with("550 5.6.7"), "{reply}");
    }
}

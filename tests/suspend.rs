//! A next hop that is down: after a connection failure the destination is suspended and
//! tried once per backoff period (the probe), not once per message; arrivals meanwhile
//! are stored without the scheduler touching them; when the next hop answers again
//! everything queued is delivered, nothing lost. Real smarthost sinks on loopback, a
//! movable clock for the probe times.

mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::floodgate::{TestApp, ctl, message, metric};
use common::relay::{WAIT, start, wait_recipient};
use common::sink::{Sink, SinkConfig};
use floodgate::clock::ShiftedClock;
use floodgate::queue::RecipientState;

/// Messages queued while the next hop is down: many more than the probes allowed.
const MESSAGES: usize = 30;

fn zone() -> Zone {
    Zone::new()
        .mx("down.test", 10, "mail.down.test")
        .a("mail.down.test", Ipv4Addr::LOCALHOST)
}

/// A smarthost that takes the TCP connection and turns it away with 421 at once: every
/// connection attempt is counted, and none gets further.
async fn refusing_smarthost(port: u16) -> Sink {
    Sink::start_with(SinkConfig {
        bind_port: port,
        greeting: (421, "4.3.2 service not available".into()),
        ..Default::default()
    })
    .await
}

/// Delivery through a smarthost on `port`: two at a time, probes after 60 s then 120 s.
fn smarthost_config(port: u16) -> String {
    format!(
        r#"
[delivery]
enabled = true
concurrency = 2
connect_timeout = "2s"
command_timeout = "2s"
data_timeout = "2s"
backoff = ["60s", "120s"]

[[route]]
domains = ["*"]
transport = "smarthost"
host = "127.0.0.1"
port = {port}
tls = "none"
"#
    )
}

async fn send(t: &TestApp, n: usize, tag: &str) -> Vec<String> {
    let mut c = t.client().await;
    c.ehlo().await;
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let to = format!("{tag}{i}@down.test");
        ids.push(
            c.send_mail(
                "app@client.test",
                &[&to],
                &message(&format!("{tag} {i}"), ""),
            )
            .await,
        );
    }
    ids
}

async fn recipient(t: &TestApp, id: &str) -> floodgate::queue::StoredRecipient {
    let msg = t.app.queue().message(id).await.unwrap().expect("message");
    msg.recipients.into_iter().next().expect("recipient")
}

/// Until the first failure has suspended the destination (it is recorded after the
/// attempt returns).
async fn wait_suspended(t: &TestApp) {
    let admin = t.app.admin_addr.expect("admin listener");
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(admin, "floodgate_destinations_suspended").await < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "never suspended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_refusing_next_hop_is_probed_once_per_period_and_everything_follows_its_return() {
    let dns = TestDns::start(zone()).await;
    let down = refusing_smarthost(0).await;
    let port = down.addr.port();
    let clock = Arc::new(ShiftedClock::default());
    let t = start(&dns, &smarthost_config(port), clock.clone()).await;
    let admin = t.app.admin_addr.expect("admin listener");

    // The first messages meet the refusal; at most the two attempts already under way
    // when the first failure came back were made, not one per message.
    let mut ids = send(&t, MESSAGES, "early").await;
    wait_suspended(&t).await;
    t.scheduler_pass().await;
    let first = down.connections();
    assert!(
        (1..=2).contains(&first),
        "{first} connection attempts for {MESSAGES} messages (concurrency 2)"
    );
    for id in &ids {
        assert_eq!(recipient(&t, id).await.state, RecipientState::Scheduled);
    }
    let status = ctl(admin, &["status"]).await;
    assert!(
        status.contains(&format!("suspended     127.0.0.1:{port}: unreachable")),
        "{status}"
    );
    assert!(status.contains("421"), "{status}");

    // Arrivals while it is suspended wait for the probe untouched: never claimed, never
    // attempted, no connection.
    let later = send(&t, 10, "late").await;
    t.scheduler_pass().await;
    for id in &later {
        let r = recipient(&t, id).await;
        assert_eq!(
            (r.state, r.attempts),
            (RecipientState::Scheduled, 0),
            "{r:?}"
        );
    }
    assert_eq!(down.connections(), first);
    ids.extend(later);

    // The probe time (60 s and its jitter): one connection, and the others, all due by
    // now, are deferred to the next period without one.
    clock.advance(Duration::from_secs(70));
    t.scheduler_pass().await;
    assert_eq!(down.connections(), first + 1, "one probe per period");
    assert_eq!(
        metric(admin, "floodgate_destination_probes_total").await,
        1.0
    );
    t.scheduler_pass().await;
    assert_eq!(down.connections(), first + 1);
    for id in &ids {
        assert_eq!(recipient(&t, id).await.state, RecipientState::Scheduled);
    }
    assert!(metric(admin, "floodgate_suspended_deferrals_total").await >= 1.0);

    // The next hop comes back on the same port; the next probe (120 s and its jitter)
    // gets through and everything queued follows it.
    drop(down);
    let up = loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            break Sink::start_with(SinkConfig {
                bind_port: port,
                ..Default::default()
            })
            .await;
        }
    };
    clock.advance(Duration::from_secs(140));
    t.app.wake_scheduler();
    for id in &ids {
        wait_recipient(&t, id, &recipient(&t, id).await.address, "delivery", |r| {
            r.state == RecipientState::Delivered
        })
        .await;
    }
    let got = up.wait_for(ids.len(), WAIT).await;
    let mut rcpts: Vec<String> = got.iter().flat_map(|m| m.rcpts.clone()).collect();
    rcpts.sort();
    rcpts.dedup();
    assert_eq!(rcpts.len(), MESSAGES + 10, "each message once, none lost");
    assert_eq!(metric(admin, "floodgate_destinations_suspended").await, 0.0);
    assert_eq!(
        metric(admin, "floodgate_destination_resumes_total").await,
        1.0
    );
    assert!(!ctl(admin, &["status"]).await.contains("suspended "));
}

#[tokio::test]
async fn a_next_hop_that_answers_is_never_suspended() {
    let dns = TestDns::start(zone()).await;
    let sink = Sink::start().await;
    let t = start(&dns, &smarthost_config(sink.addr.port()), Arc::default()).await;
    let admin = t.app.admin_addr.expect("admin listener");
    let ids = send(&t, 5, "ok").await;
    sink.wait_for(ids.len(), WAIT).await;
    t.scheduler_pass().await;
    assert_eq!(metric(admin, "floodgate_destinations_suspended").await, 0.0);
    assert_eq!(
        metric(admin, "floodgate_destination_suspensions_total").await,
        0.0
    );
    assert_eq!(
        metric(admin, "floodgate_destination_probes_total").await,
        0.0
    );
}

#[tokio::test]
async fn batch_rows_for_a_suspended_destination_wait_for_its_probe_unclaimed() {
    const KEY: &str = "fg_suspend_batch_key_0123";
    let dns = TestDns::start(zone()).await;
    let down = refusing_smarthost(0).await;
    let port = down.addr.port();
    let clock = Arc::new(ShiftedClock::default());
    let config = format!(
        "{}\n[[http.api_keys]]\nname = \"crm\"\nkey_sha256 = \"{}\"\n",
        smarthost_config(port),
        floodgate::http::api::key_hash(KEY)
    );
    let t = start(&dns, &config, clock.clone()).await;
    let admin = t.app.admin_addr.expect("admin listener");
    let http = t.app.http_addr.expect("http listener");
    send(&t, 3, "early").await;
    wait_suspended(&t).await;
    t.scheduler_pass().await;
    let connections = down.connections();
    let deferrals = metric(admin, "floodgate_suspended_deferrals_total").await;

    let bearer = format!("Bearer {KEY}");
    let json = [
        ("Authorization", bearer.as_str()),
        ("Content-Type", "application/json"),
    ];
    let template =
        br#"{"from":"app@client.test","campaign":"later","subject":"Hi {{ n }}","text":"x"}"#;
    let (status, _, body) =
        common::http::request(http, "POST", "/v1/batches", &json, template).await;
    assert_eq!(status, 201, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let rows: String = (0..20)
        .map(|n| format!("{{\"to\":\"b{n}@down.test\",\"vars\":{{\"n\":{n}}}}}\n"))
        .collect();
    let ndjson = [
        ("Authorization", bearer.as_str()),
        ("Content-Type", "application/x-ndjson"),
    ];
    let path = format!("/v1/batches/{id}/recipients");
    let (status, _, body) =
        common::http::request(http, "POST", &path, &ndjson, rows.as_bytes()).await;
    assert_eq!(status, 200, "{body}");

    // Stored due at the probe: the passes before it neither claim nor defer them.
    t.scheduler_pass().await;
    t.scheduler_pass().await;
    let batch = t.app.queue().message(&id).await.unwrap().expect("batch");
    assert_eq!(batch.recipients.len(), 20);
    for r in &batch.recipients {
        assert_eq!(
            (r.state, r.attempts),
            (RecipientState::Scheduled, 0),
            "{r:?}"
        );
    }
    assert_eq!(
        metric(admin, "floodgate_suspended_deferrals_total").await,
        deferrals,
        "no batch row was claimed before the probe"
    );
    assert_eq!(down.connections(), connections);
}

//! Cluster mode: three Floodgate nodes, each with its own spool, share one real
//! `redis-server` on loopback. A destination's rate holds across the three, a pause made
//! on one node closes the others, an Idempotency-Key retried on another node replays the
//! first answer, the guard judges a flood on the cluster's sums, and with Redis killed
//! every node keeps accepting and delivering, converging again once it is back.
//!
//! These need `redis-server` on PATH (Debian: `apt-get install redis-server`), so they are
//! ignored by a plain `cargo test`; `.ci/run` runs them with `--ignored`.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::floodgate::{Smtp, TestApp, admin, message, metric};
use common::http::request;
use common::redis::RedisServer;
use common::sink::Sink;
use floodgate::clock::SystemClock;

const KEY: &str = "fg_cluster_key_0123456789";
const NEEDS_REDIS: &str = "needs redis-server on PATH";

fn zone() -> Zone {
    Zone::new()
        .mx("rate.test", 10, "mail.mx.test")
        .mx("mx.test", 10, "mail.mx.test")
        .a("mail.mx.test", Ipv4Addr::LOCALHOST)
}

/// A node's config: delivery to `sink_port`, `[cluster]` on `redis`, and `more`.
fn node_config(name: &str, redis: &str, sink_port: u16, more: &str) -> String {
    format!(
        r#"
[[http.api_keys]]
name = "crm"
key_sha256 = "{key}"

[delivery]
enabled = true
connect_timeout = "2s"
command_timeout = "2s"
data_timeout = "2s"
backoff = ["1s"]
[delivery.rates]
"rate.test" = "10/s"

[cluster]
redis = "{redis}"
node = "{name}"
heartbeat = "200ms"
node_ttl = "2s"
connect_timeout = "1s"
command_timeout = "200ms"

[[route]]
domains = ["*"]
transport = "mx"
port = {sink_port}
{more}
"#,
        key = floodgate::http::api::key_hash(KEY)
    )
}

struct Cluster {
    redis: RedisServer,
    sink: Sink,
    _dns: TestDns,
    nodes: Vec<TestApp>,
}

async fn cluster(more: &str) -> Cluster {
    let redis = RedisServer::start();
    let dns = TestDns::start(zone()).await;
    let sink = Sink::start().await;
    let mut nodes = Vec::new();
    for i in 1..=3 {
        let cfg = node_config(&format!("n{i}"), &redis.url(), sink.addr.port(), more);
        nodes.push(
            TestApp::start_full("", "lease = \"30s\"", &cfg, dns.addr, Arc::new(SystemClock)).await,
        );
    }
    let c = Cluster {
        redis,
        sink,
        _dns: dns,
        nodes,
    };
    c.wait_nodes(3).await;
    c
}

impl Cluster {
    fn admin(&self, i: usize) -> SocketAddr {
        self.nodes[i].app.admin_addr.unwrap()
    }

    /// Waits until every node's registry lists `n` live nodes.
    async fn wait_nodes(&self, n: usize) {
        for i in 0..self.nodes.len() {
            let addr = self.admin(i);
            eventually(
                Duration::from_secs(10),
                &format!("node {i} sees {n} nodes"),
                || async move {
                    let status = admin(addr, "GET", "/admin/v1/status", None).await;
                    let live = status["cluster"]["nodes"]
                        .as_array()
                        .map(|a| a.iter().filter(|n| n["alive"] == true).count());
                    live == Some(n) && status["cluster"]["connected"] == true
                },
            )
            .await;
        }
    }
}

/// Polls `check` until it holds, failing with `what` after `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until nodes 1 and 2 both answer `campaign`'s sender at the door with `reply`
/// (a prefix), failing with `what` after `limit`.
async fn others_answer(c: &Cluster, campaign: &str, reply: &str, limit: Duration, what: &str) {
    for i in [1, 2] {
        let node = &c.nodes[i];
        eventually(limit, &format!("node {i} {what}"), || async move {
            door(node, campaign, "a@mx.test").await.starts_with(reply)
        })
        .await;
    }
}

/// MAIL and RCPT for `sender` → `rcpt`; returns the first reply that is not 250.
async fn door(node: &TestApp, sender: &str, rcpt: &str) -> String {
    let mut c = Smtp::connect(node.smtp()).await;
    c.ehlo().await;
    c.send(format!("MAIL FROM:<{sender}>\r\n").as_bytes()).await;
    let mail = c.reply().await;
    if !mail.starts_with("250") {
        return mail;
    }
    c.send(format!("RCPT TO:<{rcpt}>\r\n").as_bytes()).await;
    c.reply().await
}

async fn send_http(
    node: &TestApp,
    body: &serde_json::Value,
    key: Option<&str>,
) -> (u16, serde_json::Value) {
    let bearer = format!("Bearer {KEY}");
    let mut headers = vec![
        ("Authorization", bearer.as_str()),
        ("Content-Type", "application/json"),
    ];
    if let Some(k) = key {
        headers.push(("Idempotency-Key", k));
    }
    let (status, _, text) = request(
        node.app.http_addr.unwrap(),
        "POST",
        "/v1/messages",
        &headers,
        body.to_string().as_bytes(),
    )
    .await;
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
#[ignore = "needs redis-server on PATH"]
async fn three_nodes_keep_one_destination_rate() {
    let _ = NEEDS_REDIS;
    let c = cluster("").await;
    // 30 messages on each node, submitted at once: 90 for a destination at 10/s.
    let mut sends = tokio::task::JoinSet::new();
    for (n, node) in c.nodes.iter().enumerate() {
        let addr = node.smtp();
        sends.spawn(async move {
            let mut s = Smtp::connect(addr).await;
            s.ehlo().await;
            for i in 0..30 {
                s.send_mail(
                    "app@client.test",
                    &[&format!("n{n}-u{i}@rate.test")],
                    &message("rated", ""),
                )
                .await;
            }
        });
    }
    sends.join_all().await;
    let got = c.sink.wait_for(90, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 90, "all 90 arrive");
    let mut times: Vec<_> = got.iter().map(|r| r.at).collect();
    times.sort();
    for (i, start) in times.iter().enumerate() {
        let in_window = times[i..]
            .iter()
            .take_while(|t| t.duration_since(*start) < Duration::from_secs(1))
            .count();
        assert!(
            in_window <= 11,
            "{in_window} deliveries within one second at 10/s across three nodes"
        );
    }
    // Every node delivered its own spool: no node took another's mail.
    for (n, node) in c.nodes.iter().enumerate() {
        let delivered = metric(node.app.admin_addr.unwrap(), "floodgate_deliveries_total").await;
        assert_eq!(delivered, 30.0, "node {n}");
    }
    // Leases, not one round trip per message.
    let leases: f64 = {
        let mut sum = 0.0;
        for i in 0..3 {
            sum += metric(c.admin(i), "floodgate_cluster_rate_leases_total").await;
        }
        sum
    };
    assert!(leases < 90.0, "{leases} leases for 90 messages");
}

#[tokio::test]
#[ignore = "needs redis-server on PATH"]
async fn a_pause_on_one_node_closes_every_node() {
    let c = cluster("").await;
    let campaign = "spring@client.test";
    assert!(
        door(&c.nodes[1], campaign, "a@mx.test")
            .await
            .starts_with("250")
    );
    admin(
        c.admin(0),
        "POST",
        &format!("/admin/v1/campaigns/{campaign}/pause"),
        Some(""),
    )
    .await;
    others_answer(
        &c,
        campaign,
        "451 4.7.1",
        Duration::from_secs(1),
        "refuses the paused campaign",
    )
    .await;
    // Another campaign still flows.
    assert!(
        door(&c.nodes[2], "other@client.test", "a@mx.test")
            .await
            .starts_with("250")
    );
    admin(
        c.admin(0),
        "POST",
        &format!("/admin/v1/campaigns/{campaign}/resume"),
        Some(""),
    )
    .await;
    others_answer(
        &c,
        campaign,
        "250",
        Duration::from_secs(1),
        "accepts the resumed campaign",
    )
    .await;
    // The intake switch and the failure log's mode follow too.
    admin(c.admin(2), "POST", "/admin/v1/intake/pause", None).await;
    let first = &c.nodes[0];
    eventually(
        Duration::from_secs(1),
        "node 0 intake paused",
        || async move {
            door(first, "x@client.test", "a@mx.test")
                .await
                .starts_with("451 4.7.1")
        },
    )
    .await;
    admin(c.admin(2), "POST", "/admin/v1/intake/resume", None).await;
    admin(
        c.admin(1),
        "PUT",
        "/admin/v1/faillog",
        Some(r#"{"mode":"off"}"#),
    )
    .await;
    let addr = c.admin(0);
    eventually(
        Duration::from_secs(1),
        "node 0 failure log off",
        || async move {
            admin(addr, "GET", "/admin/v1/faillog", None).await["settings"]["mode"] == "off"
        },
    )
    .await;
}

#[tokio::test]
#[ignore = "needs redis-server on PATH"]
async fn an_idempotency_key_retried_on_another_node_replays_the_first_answer() {
    let c = cluster("").await;
    let req =
        serde_json::json!({"from": "a@client.test", "to": ["once@mx.test"], "subject": "once"});
    let (s1, first) = send_http(&c.nodes[0], &req, Some("order-42")).await;
    let (s2, second) = send_http(&c.nodes[1], &req, Some("order-42")).await;
    assert_eq!((s1, s2), (202, 202), "{first} {second}");
    assert_eq!(first["id"], second["id"]);
    let got = c.sink.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(got.len(), 1);
    // Nothing else arrives: node 1 queued nothing under the key.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(c.sink.received().len(), 1, "one delivery");
    let queued = metric(c.admin(1), "floodgate_recipients_accepted_total").await;
    assert_eq!(queued, 0.0, "node 1 queued nothing");
    assert_eq!(
        metric(c.admin(1), "floodgate_cluster_idempotency_replays_total").await,
        1.0
    );
}

#[tokio::test]
#[ignore = "needs redis-server on PATH"]
async fn a_flood_spread_over_three_nodes_is_paused_by_the_guard() {
    // 60 events at half failures trip it; each node alone sees only 20.
    let c = cluster("[guard]\nenabled = true\nwindow = \"60s\"\nmin_events = 60\nfailure_ratio = 0.5\naction = \"pause\"\n").await;
    let campaign = "flood@client.test";
    for node in &c.nodes {
        let mut s = Smtp::connect(node.smtp()).await;
        s.ehlo().await;
        s.send(format!("MAIL FROM:<{campaign}>\r\n").as_bytes())
            .await;
        s.expect("250").await;
        for i in 0..20 {
            s.send(format!("RCPT TO:<bad{i}>\r\n").as_bytes()).await;
            s.reply().await;
        }
        s.send(b"QUIT\r\n").await;
    }
    for i in 0..3 {
        let addr = c.admin(i);
        eventually(
            Duration::from_secs(8),
            &format!("node {i} has the flood paused"),
            || async move {
                let v = admin(addr, "GET", "/admin/v1/campaigns", None).await;
                v.as_array()
                    .or_else(|| v["campaigns"].as_array())
                    .into_iter()
                    .flatten()
                    .any(|x| x["name"] == campaign && x["state"] == "paused")
            },
        )
        .await;
    }
    assert!(
        door(&c.nodes[2], campaign, "a@mx.test")
            .await
            .starts_with("451 4.7.1")
    );
}

#[tokio::test]
#[ignore = "needs redis-server on PATH"]
async fn with_redis_killed_every_node_goes_on_and_converges_when_it_is_back() {
    let mut c = cluster("").await;
    c.redis.kill();
    for i in 0..3 {
        let addr = c.admin(i);
        eventually(
            Duration::from_secs(5),
            &format!("node {i} reports disconnected"),
            || async move { metric(addr, "floodgate_cluster_connected").await == 0.0 },
        )
        .await;
    }
    // Every node accepts and delivers on local state, the door answering at once.
    for (n, node) in c.nodes.iter().enumerate() {
        let mut s = node.client().await;
        s.ehlo().await;
        let started = std::time::Instant::now();
        s.send_mail(
            "app@client.test",
            &[&format!("away{n}@mx.test")],
            &message("away", ""),
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "intake waited on Redis"
        );
    }
    c.sink.wait_for(3, Duration::from_secs(15)).await;
    assert_eq!(c.sink.received().len(), 3);
    // A pause made on node 0 while Redis is away holds there at once...
    let campaign = "late@client.test";
    admin(
        c.admin(0),
        "POST",
        &format!("/admin/v1/campaigns/{campaign}/pause"),
        Some(""),
    )
    .await;
    assert!(
        door(&c.nodes[0], campaign, "a@mx.test")
            .await
            .starts_with("451 4.7.1")
    );
    assert!(
        door(&c.nodes[1], campaign, "a@mx.test")
            .await
            .starts_with("250")
    );
    // ...and reaches the others once Redis is back.
    c.redis.restart();
    c.wait_nodes(3).await;
    others_answer(
        &c,
        campaign,
        "451 4.7.1",
        Duration::from_secs(5),
        "learns the pause",
    )
    .await;
    // The shared rate is back in use.
    let before = metric(c.admin(0), "floodgate_cluster_rate_leases_total").await;
    let mut s = c.nodes[0].client().await;
    s.ehlo().await;
    s.send_mail("app@client.test", &["back@rate.test"], &message("back", ""))
        .await;
    c.sink.wait_for(4, Duration::from_secs(15)).await;
    let addr = c.admin(0);
    eventually(
        Duration::from_secs(5),
        "a lease taken after reconnection",
        || async move { metric(addr, "floodgate_cluster_rate_leases_total").await > before },
    )
    .await;
}

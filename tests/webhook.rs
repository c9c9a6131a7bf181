//! Webhook gateway: mail submitted over SMTP reaches real HTTP receivers on loopback as
//! signed JSON (Standard Webhooks), with honest outcomes per HTTP answer (410 disables the
//! endpoint, 429 honours Retry-After, 5xx / timeouts / refused connections retry), a
//! circuit breaker per endpoint, isolation between endpoints, and delivery events posted
//! in signed batches with intake rejections only as per-campaign aggregates.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::dns::{TestDns, Zone};
use common::floodgate::{TestApp, config_text, parse_config};
use common::http_receiver::{Received, Receiver, Reply};
use floodgate::clock::{Clock, SystemClock};
use floodgate::queue::RecipientState;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const WAIT: Duration = Duration::from_secs(15);
/// The signing key; the config holds it as `whsec_` + base64.
const KEY: &[u8] = b"floodgate-webhook-test-key-32-by";
const API_KEY: &str = "fg_webhook_test_api_key_01";

fn secret() -> String {
    format!("whsec_{}", B64.encode(KEY))
}

fn route(domain: &str, url: &str, extra: &str) -> String {
    format!(
        "[[route]]\ndomains = [\"{domain}\"]\ntransport = \"webhook\"\nurl = \"{url}\"\nsecret = \"{}\"\n{extra}\n",
        secret()
    )
}

/// Delivery on with `delivery_extra`, then the routes and any further tables.
fn config(delivery_extra: &str, routes: &[String], more: &str) -> String {
    format!(
        "[delivery]\nenabled = true\n{delivery_extra}\n\n{}\n{more}\n",
        routes.concat()
    )
}

async fn start(dns: &TestDns, extra: &str) -> TestApp {
    TestApp::start("", extra, dns.addr).await
}

/// Sends one message per recipient (separate transactions); returns the queue ids.
async fn submit(t: &TestApp, from: &str, to: &[&str]) -> Vec<String> {
    let mut c = t.client().await;
    c.ehlo().await;
    let mut ids = Vec::new();
    for r in to {
        ids.push(
            c.send_mail(from, &[r], &common::floodgate::message("hook", ""))
                .await,
        );
    }
    ids
}

/// The recipient's (state, attempts, last reply, reason).
async fn recipient(
    t: &TestApp,
    queue_id: &str,
) -> (RecipientState, u32, Option<String>, Option<String>) {
    let msg = t
        .app
        .queue()
        .message(queue_id)
        .await
        .unwrap()
        .expect("message");
    let r = &msg.recipients[0];
    (r.state, r.attempts, r.last_reply.clone(), r.reason.clone())
}

/// Polls until `done` holds for the (only) recipient of `queue_id`; returns its reply.
async fn wait_until(
    t: &TestApp,
    queue_id: &str,
    what: &str,
    done: impl Fn(RecipientState, u32, &str) -> bool,
) -> (RecipientState, u32, String, Option<String>) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (state, attempts, reply, reason) = recipient(t, queue_id).await;
        let reply = reply.unwrap_or_default();
        if done(state, attempts, &reply) {
            return (state, attempts, reply, reason);
        }
        assert!(
            Instant::now() < deadline,
            "{queue_id} never {what}: {state:?}, {attempts} attempts, {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn wait_state(t: &TestApp, queue_id: &str, want: RecipientState) -> (String, Option<String>) {
    let (_, _, reply, reason) = wait_until(t, queue_id, &format!("reached {want:?}"), |s, _, _| {
        s == want
    })
    .await;
    (reply, reason)
}

/// Polls until the first attempt is recorded, and asserts it left the recipient queued.
async fn wait_deferred(t: &TestApp, queue_id: &str) -> String {
    let (state, _, reply, _) = wait_until(t, queue_id, "attempted", |_, a, _| a >= 1).await;
    assert_eq!(state, RecipientState::Scheduled, "{reply}");
    reply
}

/// The recipient's next attempt (ms since the epoch), read from queue.db.
fn next_attempt(t: &TestApp, queue_id: &str) -> i64 {
    let conn = rusqlite::Connection::open_with_flags(
        t.dir.path().join("queue").join("queue.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    conn.query_row(
        "SELECT r.next_attempt FROM recipients r JOIN messages m ON m.id = r.message_id
         WHERE m.queue_id = ?1",
        [queue_id],
        |r| r.get(0),
    )
    .unwrap()
}

/// Checks the Standard Webhooks headers with our own HMAC; returns the webhook-id.
fn assert_signed(req: &Received) -> String {
    let id = req.header("webhook-id").expect("webhook-id").to_owned();
    let ts = req.header("webhook-timestamp").expect("webhook-timestamp");
    let sig = req.header("webhook-signature").expect("webhook-signature");
    let now = SystemClock.now_ms() / 1000;
    let ts_num: i64 = ts.parse().expect("unix seconds");
    assert!(
        (now - ts_num).abs() < 300,
        "timestamp {ts} far from now {now}"
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(KEY).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(&req.body);
    let expected = format!("v1,{}", B64.encode(mac.finalize().into_bytes()));
    assert!(
        sig.split(' ').any(|s| s == expected),
        "signature {sig} != {expected}"
    );
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert_eq!(req.method, "POST");
    id
}

#[tokio::test]
async fn message_is_posted_as_signed_json() {
    let dns = TestDns::start(Zone::new()).await;
    let hook = Receiver::start().await;
    let t = start(
        &dns,
        &config("", &[route("hook.test", &hook.url("/in?k=v"), "")], ""),
    )
    .await;
    let body = concat!(
        "From: app@client.test\r\nTo: a@hook.test\r\n",
        "Subject: =?utf-8?Q?Caf=C3=A9?= news\r\nX-Campaign-ID: spring\r\n",
        "MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"b1\"\r\n\r\n",
        "--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello text\r\n",
        "--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Hello html</p>\r\n",
        "--b1--\r\n"
    );
    let mut c = t.client().await;
    c.ehlo().await;
    let id = c
        .send_mail("app@client.test", &["a@hook.test", "b@hook.test"], body)
        .await;
    let got = hook.wait_for(1, WAIT).await;
    let req = &got[0];
    assert_eq!(req.path, "/in");
    let webhook_id = assert_signed(req);
    assert!(
        webhook_id.starts_with(&format!("msg_{id}_")),
        "{webhook_id}"
    );
    let json = req.json();
    assert_eq!(json["type"], "message");
    assert_eq!(json["queue_id"], id.as_str());
    assert_eq!(json["campaign"], "spring");
    assert_eq!(json["envelope"]["from"], "app@client.test");
    assert_eq!(
        json["envelope"]["to"],
        serde_json::json!(["a@hook.test", "b@hook.test"]),
        "one request for both recipients"
    );
    assert_eq!(json["subject"], "Café news");
    assert_eq!(json["text"], "Hello text");
    assert_eq!(json["html"], "<p>Hello html</p>");
    let headers = json["headers"].as_array().expect("headers list");
    assert!(
        headers
            .iter()
            .any(|h| h["name"] == "X-Campaign-ID" && h["value"] == "spring"),
        "{headers:?}"
    );
    let raw = B64.decode(json["raw"].as_str().unwrap()).unwrap();
    let raw = String::from_utf8(raw).unwrap();
    assert!(raw.starts_with("Received: "), "{raw}");
    assert!(raw.ends_with(body), "{raw}");
    let (reply, _) = wait_state(&t, &id, RecipientState::Delivered).await;
    assert_eq!(reply, "HTTP 200 OK");
    assert_eq!(hook.count(), 1);
}

#[tokio::test]
async fn gone_fails_permanently_and_disables_the_endpoint_until_reload() {
    let dns = TestDns::start(Zone::new()).await;
    let hook = Receiver::start().await;
    hook.script([Reply::status(410)]);
    let keys = format!(
        "[[http.api_keys]]\nname = \"app\"\nkey_sha256 = \"{}\"\n",
        floodgate::http::api::key_hash(API_KEY)
    );
    let extra = config("", &[route("hook.test", &hook.url("/in"), "")], &keys);
    let t = start(&dns, &extra).await;
    let first = submit(&t, "app@client.test", &["a@hook.test"]).await;
    let (reply, reason) = wait_state(&t, &first[0], RecipientState::Failed).await;
    assert!(reply.starts_with("HTTP 410"), "{reply}");
    assert_eq!(reason.as_deref(), Some("rejected"));
    let status = t.app.webhook.status();
    assert!(status[0].disabled, "{status:?}");
    // Operators see it: in the admin API and in /metrics.
    let admin = t.app.admin_addr.unwrap();
    let view = common::floodgate::admin(admin, "GET", "/admin/v1/webhooks", None).await;
    assert_eq!(view["endpoints"][0]["disabled"], true, "{view}");
    let (_, metrics) = common::floodgate::http(
        admin,
        "GET",
        "/metrics",
        Some(common::floodgate::TOKEN),
        None,
    )
    .await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("floodgate_webhook_endpoint_disabled{") && l.ends_with(" 1")),
        "{metrics}"
    );
    // While it is disabled its domains wait at the door (a temporary refusal, nothing
    // queued to fail), over SMTP and over HTTP; other routes are not affected.
    let mut c = t.client().await;
    c.ehlo().await;
    c.cmd("MAIL FROM:<app@client.test>", "250").await;
    c.rcpt("b@hook.test", "451 4.3.2").await;
    c.cmd("QUIT", "221").await;
    let req = r#"{"from": "app@client.test", "to": ["b@hook.test"], "subject": "s", "text": "t"}"#;
    let (status, body) = common::floodgate::http(
        t.app.http_addr.unwrap(),
        "POST",
        "/v1/messages",
        Some(API_KEY),
        Some(req),
    )
    .await;
    assert!(status == 503 || status == 422, "{status} {body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["recipients"][0]["code"], 451, "{answer}");
    assert_eq!(
        answer["recipients"][0]["enhanced_code"], "4.3.2",
        "{answer}"
    );
    assert_eq!(answer["recipients"][0]["reason"], "destination_disabled");
    assert_eq!(hook.count(), 1, "no request to a disabled endpoint");
    // `ctl webhooks` shows it too.
    let out = common::floodgate::ctl(admin, &["webhooks"]).await;
    assert!(out.contains("disabled"), "{out}");
    // A config reload re-enables it.
    let text = config_text(t.dir.path(), dns.addr, "", &extra);
    t.app.reload(parse_config(t.dir.path(), &text)).unwrap();
    let third = submit(&t, "app@client.test", &["c@hook.test"]).await;
    wait_state(&t, &third[0], RecipientState::Delivered).await;
    assert_eq!(hook.count(), 2);
}

#[tokio::test]
async fn too_many_requests_honours_retry_after() {
    let dns = TestDns::start(Zone::new()).await;
    let hook = Receiver::start().await;
    hook.script([Reply::status(429).header("Retry-After", "120")]);
    let t = start(
        &dns,
        &config("", &[route("hook.test", &hook.url("/"), "")], ""),
    )
    .await;
    let before = SystemClock.now_ms();
    let ids = submit(&t, "app@client.test", &["a@hook.test"]).await;
    let reply = wait_deferred(&t, &ids[0]).await;
    assert!(reply.starts_with("HTTP 429"), "{reply}");
    let next = next_attempt(&t, &ids[0]);
    assert!(
        next >= before + 120_000,
        "next attempt {} ms after submission, expected at least 120 s",
        next - before
    );
}

#[tokio::test]
async fn server_errors_are_transient() {
    let dns = TestDns::start(Zone::new()).await;
    let hook = Receiver::start().await;
    hook.script([503, 500, 502].map(|s| Reply::status(s).body("try later")));
    let t = start(
        &dns,
        &config("", &[route("hook.test", &hook.url("/"), "")], ""),
    )
    .await;
    for (rcpt, code) in [
        ("a@hook.test", "503"),
        ("b@hook.test", "500"),
        ("c@hook.test", "502"),
    ] {
        let ids = submit(&t, "app@client.test", &[rcpt]).await;
        let reply = wait_deferred(&t, &ids[0]).await;
        assert!(reply.starts_with(&format!("HTTP {code}")), "{reply}");
        assert!(reply.ends_with(": try later"), "{reply}");
    }
}

#[tokio::test]
async fn timeout_is_transient() {
    let dns = TestDns::start(Zone::new()).await;
    let hook = Receiver::start_with(Reply::status(200).delay(Duration::from_secs(5))).await;
    let route = route("hook.test", &hook.url("/"), "timeout = \"300ms\"");
    let t = start(&dns, &config("", &[route], "")).await;
    let ids = submit(&t, "app@client.test", &["a@hook.test"]).await;
    let reply = wait_deferred(&t, &ids[0]).await;
    assert!(reply.contains("no response within"), "{reply}");
    assert_eq!(hook.count(), 1);
}

#[tokio::test]
async fn connection_refused_is_transient() {
    let dns = TestDns::start(Zone::new()).await;
    // A port that was free a moment ago: nothing listens there now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let t = start(&dns, &config("", &[route("hook.test", &url, "")], "")).await;
    let ids = submit(&t, "app@client.test", &["a@hook.test"]).await;
    let reply = wait_deferred(&t, &ids[0]).await;
    assert!(reply.contains("connect to"), "{reply}");
}

#[tokio::test]
async fn circuit_breaker_opens_then_recovers_after_the_cooldown() {
    let dns = TestDns::start(Zone::new()).await;
    let hook = Receiver::start_with(Reply::status(503)).await;
    let cooldown = Duration::from_secs(1);
    let route = route(
        "hook.test",
        &hook.url("/"),
        "breaker_threshold = 2\nbreaker_cooldown = \"1s\"",
    );
    // One job at a time, so the breaker sees failures in order; quick retries.
    let t = start(
        &dns,
        &config("concurrency = 1\nbackoff = [\"200ms\"]", &[route], ""),
    )
    .await;
    let ids = submit(
        &t,
        "app@client.test",
        &["a@hook.test", "b@hook.test", "c@hook.test", "d@hook.test"],
    )
    .await;
    // Two failures open the circuit; the other messages then fail fast, without a request.
    let mut fast = 0;
    for id in &ids {
        let (_, _, reply, _) = wait_until(&t, id, "attempted", |_, a, _| a >= 1).await;
        fast += usize::from(reply.contains("circuit open"));
    }
    assert!(fast >= 1, "no message failed fast on the open circuit");
    let status = t.app.webhook.status();
    assert_ne!(status[0].circuit, "closed", "{status:?}");
    // While it stays down, probes come after the cool-down, one per cool-down.
    let got = hook.wait_for(3, Duration::from_secs(20)).await;
    for pair in got[1..].windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= cooldown - Duration::from_millis(50),
            "requests {gap:?} apart while open"
        );
    }
    // The endpoint recovers: the next probe closes the circuit and everything goes.
    hook.set_default(Reply::status(200));
    for id in &ids {
        wait_state(&t, id, RecipientState::Delivered).await;
    }
    let status = t.app.webhook.status();
    assert_eq!(status[0].circuit, "closed", "{status:?}");
    assert_eq!(status[0].consecutive_failures, 0);
}

#[tokio::test]
async fn dead_endpoint_does_not_delay_a_healthy_one() {
    let dns = TestDns::start(Zone::new()).await;
    let dead = Receiver::start_with(Reply::status(200).delay(Duration::from_secs(30))).await;
    let healthy = Receiver::start().await;
    let routes = [
        // A high threshold keeps the dead endpoint's circuit closed: every job waits
        // for its full timeout, the worst case for its neighbours.
        route(
            "dead.test",
            &dead.url("/"),
            "timeout = \"1s\"\nbreaker_threshold = 1000",
        ),
        route("ok.test", &healthy.url("/"), ""),
    ];
    let t = start(&dns, &config("concurrency = 2", &routes, "")).await;
    let dead_rcpts: Vec<String> = (0..12).map(|i| format!("u{i}@dead.test")).collect();
    let ok_rcpts: Vec<String> = (0..6).map(|i| format!("u{i}@ok.test")).collect();
    let dead_refs: Vec<&str> = dead_rcpts.iter().map(String::as_str).collect();
    let ok_refs: Vec<&str> = ok_rcpts.iter().map(String::as_str).collect();
    // The dead endpoint's messages go first: 12 jobs, 2 at a time, 1 s each.
    let dead_ids = submit(&t, "app@client.test", &dead_refs).await;
    let ok_ids = submit(&t, "app@client.test", &ok_refs).await;
    healthy
        .wait_for(ok_ids.len(), Duration::from_secs(10))
        .await;
    for id in &ok_ids {
        wait_state(&t, id, RecipientState::Delivered).await;
    }
    let mut pending = 0;
    for id in &dead_ids {
        let (state, _, _, _) = recipient(&t, id).await;
        assert_ne!(state, RecipientState::Delivered);
        pending += usize::from(state == RecipientState::Scheduled);
    }
    assert_eq!(pending, dead_ids.len());
    assert!(
        dead.count() < dead_ids.len(),
        "the healthy endpoint was served only after the dead one's queue ({} requests)",
        dead.count()
    );
}

#[tokio::test]
async fn delivery_events_are_signed_batches_with_rejections_aggregated() {
    let dns = TestDns::start(Zone::new()).await;
    let events = Receiver::start().await;
    let ok = Receiver::start().await;
    let bad = Receiver::start_with(Reply::status(422)).await;
    let routes = [
        route("ok.test", &ok.url("/"), ""),
        route("bad.test", &bad.url("/"), ""),
    ];
    let more = format!(
        "[events]\nurls = [\"{}\"]\nsecret = \"{}\"\nflush_interval = \"200ms\"\n",
        events.url("/events"),
        secret()
    );
    let t = start(&dns, &config("", &routes, &more)).await;
    let mut c = t.client().await;
    c.ehlo().await;
    c.cmd("MAIL FROM:<promo@client.test>", "250").await;
    c.rcpt("good@ok.test", "250").await;
    c.rcpt("", "501 5.1.3").await;
    c.rcpt("not-an-address", "501 5.1.3").await;
    c.rcpt("x@noroute.test", "550 5.7.1").await;
    c.rcpt("z@bad.test", "250").await;
    let reply = c.data(&common::floodgate::message("events", "")).await;
    assert!(reply.starts_with("250 "), "{reply}");
    let id = common::floodgate::queue_id(&reply);

    // Collect entries until the delivered, failed and aggregate entries have all come.
    let deadline = Instant::now() + WAIT;
    let mut entries: Vec<serde_json::Value>;
    let mut batch_ids = Vec::new();
    loop {
        let got = events.received();
        entries = Vec::new();
        batch_ids.clear();
        for req in &got {
            batch_ids.push(assert_signed(req));
            entries.extend(req.json().as_array().expect("a JSON array").iter().cloned());
        }
        let has = |kind: &str| entries.iter().any(|e| e["type"] == kind);
        let rejections: u64 = entries
            .iter()
            .filter(|e| e["type"] == "intake_rejections")
            .map(|e| e["total"].as_u64().unwrap())
            .sum();
        if has("delivered") && has("failed") && rejections >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "events so far: {entries:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    batch_ids.sort();
    batch_ids.dedup();
    assert_eq!(batch_ids.len(), events.count(), "one webhook-id per batch");

    let delivered = entries.iter().find(|e| e["type"] == "delivered").unwrap();
    assert_eq!(delivered["recipient"], "good@ok.test");
    assert_eq!(delivered["queue_id"], id.as_str());
    assert_eq!(delivered["campaign"], "promo@client.test");
    assert_eq!(delivered["reply"], "HTTP 200 OK");
    assert!(delivered["at"].as_str().unwrap().ends_with('Z'));
    let failed = entries.iter().find(|e| e["type"] == "failed").unwrap();
    assert_eq!(failed["recipient"], "z@bad.test");
    assert_eq!(failed["reason"], "rejected");
    assert!(failed["reply"].as_str().unwrap().starts_with("HTTP 422"));

    // Refusals appear only inside the per-campaign aggregate, never one by one.
    let aggregates: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|e| e["type"] == "intake_rejections")
        .collect();
    let mut counts = std::collections::BTreeMap::new();
    for a in &aggregates {
        assert_eq!(a["campaign"], "promo@client.test");
        for (reason, n) in a["counts"].as_object().unwrap() {
            *counts.entry(reason.clone()).or_insert(0) += n.as_u64().unwrap();
        }
    }
    assert_eq!(
        counts,
        [
            ("empty_address".to_owned(), 1),
            ("malformed_address".to_owned(), 1),
            ("no_route".to_owned(), 1)
        ]
        .into()
    );
    for e in entries.iter().filter(|e| e.get("recipient").is_some()) {
        assert!(
            ["good@ok.test", "z@bad.test"].contains(&e["recipient"].as_str().unwrap()),
            "a refusal sent on its own: {e}"
        );
    }
    assert_eq!(t.app.events.dropped(), 0);
}

#[tokio::test]
async fn https_endpoint_is_verified_against_the_route_ca() {
    let dns = TestDns::start(Zone::new()).await;
    let (cert, key) = common::sink::self_signed(&["127.0.0.1"]);
    let hook = Receiver::start_tls(Reply::status(204), &cert, &key).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &cert).unwrap();
    let routes = [
        route(
            "hook.test",
            &hook.url("/tls"),
            &format!("tls_ca = \"{}\"", ca.display()),
        ),
        // The same endpoint without its CA: the web roots do not vouch for it.
        route("untrusted.test", &hook.url("/tls"), ""),
    ];
    let t = start(&dns, &config("", &routes, "")).await;
    let ids = submit(&t, "app@client.test", &["a@hook.test", "b@untrusted.test"]).await;
    let (reply, _) = wait_state(&t, &ids[0], RecipientState::Delivered).await;
    assert_eq!(reply, "HTTP 204 No Content");
    assert_signed(&hook.received()[0]);
    let reply = wait_deferred(&t, &ids[1]).await;
    assert!(reply.contains("TLS"), "{reply}");
    assert_eq!(hook.count(), 1);
}

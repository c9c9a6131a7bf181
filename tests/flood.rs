//! The incident, small: eight campaigns flood Floodgate with bad recipients while one
//! campaign sends good mail. Good mail is delivered, failures cost aggregates rather than
//! rows, the guard pauses the flooders, and operators switch, purge and pause live.

mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::floodgate::{Smtp, TestApp, admin, http, message};
use common::sink::{RcptScript, Sink, SinkConfig};
use floodgate::clock::SystemClock;

const PER_CAMPAIGN: usize = 5000;

fn zone() -> Zone {
    Zone::new()
        .mx("good.test", 10, "mx.good.test")
        .mx("bounce.test", 10, "mx.good.test")
        .mx("slow.test", 10, "mx.good.test")
        .a("mx.good.test", Ipv4Addr::LOCALHOST)
}

fn config(sink_port: u16) -> String {
    format!(
        r#"
[delivery]
enabled = true
backoff = ["10m"]

[faillog]
mode = "full"
rows_per_sec = 20
burst = 50
flush_interval = "200ms"

[guard]
enabled = true
window = "60s"
min_events = 500
failure_ratio = 0.5
action = "pause"

[[route]]
domains = ["*"]
transport = "mx"
port = {sink_port}
"#
    )
}

async fn start() -> (TestDns, Sink, TestApp) {
    let dns = TestDns::start(zone()).await;
    let sink = Sink::start_with(SinkConfig {
        rcpt: Box::new(|r| {
            if r.ends_with("@bounce.test") {
                RcptScript::Reply(550, "5.1.1 no such user")
            } else if r.ends_with("@slow.test") {
                RcptScript::Reply(451, "4.3.0 try later")
            } else {
                RcptScript::Accept
            }
        }),
        ..Default::default()
    })
    .await;
    let t = TestApp::start_full(
        "max_recipients = 100",
        "",
        &config(sink.addr.port()),
        dns.addr,
        Arc::new(SystemClock),
    )
    .await;
    (dns, sink, t)
}

/// Sends `n` recipients made by `rcpt(i)` from `sender`, 100 per message, pipelined.
/// Returns how many RCPTs were refused.
async fn flood(
    addr: std::net::SocketAddr,
    sender: &str,
    n: usize,
    rcpt: impl Fn(usize) -> String,
) -> usize {
    let mut c = Smtp::connect(addr).await;
    c.ehlo().await;
    let mut refused = 0;
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let mut batch = format!("MAIL FROM:<{sender}>\r\n");
        for i in chunk {
            batch.push_str(&format!("RCPT TO:<{}>\r\n", rcpt(*i)));
        }
        c.send(batch.as_bytes()).await;
        c.expect("250").await;
        let mut accepted = 0;
        for _ in chunk {
            let reply = c.reply().await;
            if reply.starts_with("250") {
                accepted += 1;
            } else {
                refused += 1;
            }
        }
        if accepted > 0 {
            let reply = c.data(&message("flood", "")).await;
            assert!(
                reply.starts_with("250") || reply.starts_with("451"),
                "{reply}"
            );
            if !reply.starts_with("250") {
                // Refused after DATA (the guard paused the campaign meanwhile): every
                // accepted recipient of the message failed at the door too.
                refused += accepted;
            }
        } else {
            c.cmd("RSET", "250").await;
        }
    }
    refused
}

fn sqlite_count(path: &std::path::Path, sql: &str) -> i64 {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_flood_is_absorbed_and_the_good_campaign_delivered() {
    let (_dns, sink, t) = start().await;
    let admin_addr = t.app.admin_addr.expect("admin listener");
    let smtp = t.smtp();
    let started = std::time::Instant::now();

    // Eight flooding campaigns, two of each kind of bad recipient.
    let kinds: [fn(usize) -> String; 4] = [
        |_| String::new(),
        |i| format!("not an address {i}"),
        |i| format!("u{i}@nx.test"),
        |i| format!("u{i}@bounce.test"),
    ];
    let mut tasks = Vec::new();
    for k in 0..8 {
        let kind = kinds[k % 4];
        tasks.push(tokio::spawn(async move {
            flood(smtp, &format!("flood{k}@client.test"), PER_CAMPAIGN, kind).await
        }));
    }
    // Meanwhile the good campaign sends 20 messages.
    let mut good = Smtp::connect(smtp).await;
    good.ehlo().await;
    for i in 0..20 {
        good.send_mail(
            "good@client.test",
            &[&format!("user{i}@good.test")],
            &message("good", ""),
        )
        .await;
    }
    let mut intake_refused = 0;
    for task in tasks {
        intake_refused += task.await.unwrap();
    }

    // The good campaign's mail is all delivered.
    let got = sink.wait_for(20, Duration::from_secs(30)).await;
    assert!(
        got.iter()
            .filter(|m| m.mail_from == "good@client.test")
            .count()
            >= 20
    );

    // The guard paused the flooders (the 550 ones once their relay failures came in),
    // and not the good campaign.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let campaigns = admin(admin_addr, "GET", "/admin/v1/campaigns", None).await;
        let state = |name: &str| {
            campaigns
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name)
                .map(|c| c["state"].as_str().unwrap().to_owned())
        };
        let paused = (0..8)
            .filter(|k| state(&format!("flood{k}@client.test")).as_deref() == Some("paused"))
            .count();
        if paused == 8 {
            assert_eq!(state("good@client.test").as_deref(), Some("active"));
            break;
        }
        let unpaused: Vec<_> = campaigns
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["state"] != "paused")
            .collect();
        assert!(
            tokio::time::Instant::now() < deadline,
            "guard paused {paused} of 8; not paused: {unpaused:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let alerts = admin(admin_addr, "GET", "/admin/v1/alerts", None).await;
    assert!(
        alerts
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "campaign_failure_ratio")
    );

    // failure_stats counts every failure exactly: what the clients were refused, plus
    // what the relay failed, equals the sum of the aggregates.
    let faillog = t.app.faillog.clone();
    let db = faillog.path().to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        // Relay failures may still be arriving: read them afresh each round.
        let relay_failed = t
            .app
            .campaigns()
            .all()
            .iter()
            .map(|c| c.failures(floodgate::reason::Reason::Rejected))
            .sum::<u64>();
        let expected = intake_refused as i64 + relay_failed as i64;
        let counted = sqlite_count(
            &db,
            "SELECT COALESCE(SUM(count), 0) FROM failure_stats WHERE reason != 'deferred'",
        );
        if counted == expected {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "failure_stats holds {counted}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        intake_refused >= 6 * PER_CAMPAIGN - 6 * 100,
        "most bad recipients were refused at the door: {intake_refused}"
    );

    // Event rows stay within the governor's budget: burst + rate × time per campaign.
    let rows = sqlite_count(&db, "SELECT COUNT(*) FROM failures");
    let secs = started.elapsed().as_secs_f64().ceil() as i64 + 1;
    let budget = 10 * (50 + 20 * secs);
    assert!(rows <= budget, "{rows} event rows, budget {budget}");
    let counters = faillog.counters();
    assert!(
        counters.suppressed > 0,
        "the governor suppressed rows: {counters:?}"
    );
    assert!(
        counters.transactions < 200,
        "writes are batched: {counters:?}"
    );

    // /metrics shows the same story.
    let (status, metrics) = http(
        admin_addr,
        "GET",
        "/metrics",
        Some(common::floodgate::TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("floodgate_failures_total{reason=\"no_such_domain\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("floodgate_guard_pauses_total"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_switch_the_failure_log_live_and_purge_exactly_one_campaign() {
    let (_dns, _sink, t) = start().await;
    let admin_addr = t.app.admin_addr.unwrap();
    let db = t.app.faillog.path().to_owned();

    // Without the token: 401, whatever the endpoint.
    for path in ["/admin/v1/campaigns", "/metrics", "/admin/v1/faillog"] {
        assert_eq!(
            http(admin_addr, "GET", path, None, None).await.0,
            401,
            "{path}"
        );
        assert_eq!(
            http(
                admin_addr,
                "GET",
                path,
                Some("wrong-token-wrong-token"),
                None
            )
            .await
            .0,
            401,
            "{path}"
        );
    }
    assert_eq!(http(admin_addr, "GET", "/healthz", None, None).await.0, 200);
    assert_eq!(http(admin_addr, "GET", "/readyz", None, None).await.0, 200);

    // Full mode writes rows.
    flood(t.smtp(), "a@client.test", 30, |i| format!("u{i}@nx.test")).await;
    wait_rows(&db, |n| n >= 30).await;
    // Aggregate mode: no new rows, but every failure still counted.
    let v = admin(
        admin_addr,
        "PUT",
        "/admin/v1/faillog",
        Some(r#"{"mode":"aggregate"}"#),
    )
    .await;
    assert_eq!(v["settings"]["mode"], "aggregate");
    let rows_before = sqlite_count(&db, "SELECT COUNT(*) FROM failures");
    flood(t.smtp(), "b@client.test", 40, |i| format!("u{i}@nx.test")).await;
    wait_stats(&db, "b@client.test", 40).await;
    assert_eq!(
        sqlite_count(&db, "SELECT COUNT(*) FROM failures"),
        rows_before
    );
    // Off: nothing written at all.
    admin(
        admin_addr,
        "PUT",
        "/admin/v1/faillog",
        Some(r#"{"mode":"off"}"#),
    )
    .await;
    let before = t.app.faillog.counters();
    flood(t.smtp(), "c@client.test", 10, |i| format!("u{i}@nx.test")).await;
    // Every refusal reached the failure log and was skipped; then a flush after them (a
    // retention pass flushes first) writes nothing for them.
    let prunes = t.app.faillog.counters().prune_runs;
    t.app.faillog.prune_now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = t.app.faillog.counters();
        if now.off_skipped >= before.off_skipped + 10 && now.prune_runs > prunes {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{now:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        sqlite_count(
            &db,
            "SELECT COALESCE(SUM(count),0) FROM failure_stats WHERE campaign = 'c@client.test'"
        ),
        0
    );
    admin(
        admin_addr,
        "PUT",
        "/admin/v1/faillog",
        Some(r#"{"mode":"full"}"#),
    )
    .await;
    // A bad switch is refused with the reason.
    let (status, body) = http(
        admin_addr,
        "PUT",
        "/admin/v1/faillog",
        Some(common::floodgate::TOKEN),
        Some(r#"{"mode":"loud"}"#),
    )
    .await;
    assert_eq!(status, 400, "{body}");

    // The failures endpoint pages through rows of one campaign.
    let page = admin(
        admin_addr,
        "GET",
        "/admin/v1/failures?campaign=a%40client.test&limit=10",
        None,
    )
    .await;
    assert_eq!(page["failures"].as_array().unwrap().len(), 10);
    assert!(
        page["failures"][0]["detail"]
            .as_str()
            .unwrap()
            .starts_with("550 5.1.2")
    );

    // Two campaigns with deferred (queued) recipients; purge one.
    let mut c = Smtp::connect(t.smtp()).await;
    c.ehlo().await;
    for sender in ["keep@client.test", "purge@client.test"] {
        for i in 0..3 {
            let rcpts: Vec<String> = (0..5).map(|j| format!("r{i}{j}@slow.test")).collect();
            let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
            c.send_mail(sender, &rcpts, &message("deferred", "")).await;
        }
    }
    let queue_db = t.app.queue().path().to_owned();
    let scheduled = |campaign: &str| {
        sqlite_count(
            &queue_db,
            &format!("SELECT COUNT(*) FROM recipients WHERE state = 0 AND campaign = '{campaign}'"),
        )
    };
    assert_eq!(
        (
            scheduled("keep@client.test"),
            scheduled("purge@client.test")
        ),
        (15, 15)
    );
    let v = admin(
        admin_addr,
        "POST",
        "/admin/v1/campaigns/purge%40client.test/purge",
        Some(r#"{"block_for":"10m"}"#),
    )
    .await;
    assert_eq!(v["purged"], 15);
    assert_eq!(v["state"], "blocked");
    assert_eq!(
        (
            scheduled("keep@client.test"),
            scheduled("purge@client.test")
        ),
        (15, 0)
    );
    // Blocked: its new mail is refused for a while; resume lifts it.
    c.cmd("MAIL FROM:<purge@client.test>", "250").await;
    c.rcpt("x@good.test", "451 4.7.1").await;
    c.cmd("RSET", "250").await;
    admin(
        admin_addr,
        "POST",
        "/admin/v1/campaigns/purge%40client.test/resume",
        None,
    )
    .await;
    c.cmd("MAIL FROM:<purge@client.test>", "250").await;
    c.rcpt("x@good.test", "250").await;
    c.cmd("RSET", "250").await;

    // Pause by hand, and intake pause.
    admin(
        admin_addr,
        "POST",
        "/admin/v1/campaigns/keep%40client.test/pause",
        None,
    )
    .await;
    c.cmd("MAIL FROM:<keep@client.test>", "250").await;
    c.rcpt("x@good.test", "451 4.7.1").await;
    c.cmd("RSET", "250").await;
    admin(admin_addr, "POST", "/admin/v1/intake/pause", None).await;
    c.cmd("MAIL FROM:<other@client.test>", "250").await;
    c.rcpt("x@good.test", "451 4.7.1").await;
    admin(admin_addr, "POST", "/admin/v1/intake/resume", None).await;
    c.rcpt("x@good.test", "250").await;
}

async fn wait_rows(db: &std::path::Path, ok: impl Fn(i64) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = sqlite_count(db, "SELECT COUNT(*) FROM failures");
        if ok(n) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "failures rows stuck at {n}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_stats(db: &std::path::Path, campaign: &str, want: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = sqlite_count(
            db,
            &format!(
                "SELECT COALESCE(SUM(count),0) FROM failure_stats WHERE campaign = '{campaign}'"
            ),
        );
        if n == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{campaign}: {n} counted, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_failure_log_never_stalls_intake_and_the_loss_is_counted() {
    let (_dns, sink, t) = start().await;
    let db = t.app.faillog.path().to_owned();
    // Another process takes the write lock on failures.db and keeps it.
    let locker = rusqlite::Connection::open(&db).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();

    let refused = flood(t.smtp(), "flood@client.test", 300, |i| {
        format!("u{i}@nx.test")
    })
    .await;
    assert_eq!(refused, 300);
    let mut c = Smtp::connect(t.smtp()).await;
    c.ehlo().await;
    c.send_mail(
        "good@client.test",
        &["ok@good.test"],
        &message("through", ""),
    )
    .await;
    sink.wait_for(1, Duration::from_secs(10)).await;
    // Give the writer a flush or two against the lock.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while t.app.faillog.counters().failed_transactions == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failed transaction counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    locker.execute_batch("ROLLBACK").unwrap();
    // Once the lock is gone the aggregates land, exactly.
    wait_stats(&db, "flood@client.test", 300).await;
    let counters = t.app.faillog.counters();
    assert!(
        counters.lost_rows > 0 || counters.rows_written > 0,
        "{counters:?}"
    );
}

/// Guard alerts reach the alert webhook signed (Standard Webhooks), and no faster than
/// `alert_webhook_per_minute`: three trips, a limit of two, two requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_alerts_are_posted_signed_and_rate_limited() {
    use base64::Engine;
    use hmac::{Hmac, Mac};
    use sha2::Sha256;

    let key = b"floodgate-alert-test-key-0123456";
    let secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    );
    let hook = common::http_receiver::Receiver::start().await;
    let dns = TestDns::start(zone()).await;
    let extra = format!(
        r#"
[guard]
min_events = 50
failure_ratio = 0.5
action = "pause"
alert_webhook = "{}"
alert_webhook_secret = "{secret}"
alert_webhook_per_minute = 2
"#,
        hook.url("/alerts")
    );
    let t = TestApp::start_full("", "", &extra, dns.addr, Arc::new(SystemClock)).await;
    for k in 0..3 {
        flood(t.smtp(), &format!("bad{k}@client.test"), 100, |i| {
            format!("u{i}@nx.test")
        })
        .await;
    }
    let got = hook.wait_for(2, Duration::from_secs(15)).await;
    // The third alert is over the limit: wait for the guard to skip it.
    let skipped = || {
        t.app
            .guard
            .stats
            .webhook_skipped
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while skipped() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the third alert was never skipped ({} requests)",
            hook.count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(hook.count(), 2, "rate-limited to 2 a minute");
    assert_eq!(
        t.app
            .guard
            .stats
            .webhook_skipped
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    for req in &got {
        let body = req.json();
        assert_eq!(body["type"], "floodgate.alert");
        assert_eq!(body["alert"]["kind"], "campaign_failure_ratio");
        let id = req.header("webhook-id").unwrap();
        let ts = req.header("webhook-timestamp").unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
        mac.update(format!("{id}.{ts}.").as_bytes());
        mac.update(&req.body);
        let expected = format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        );
        assert_eq!(req.header("webhook-signature"), Some(expected.as_str()));
    }
}

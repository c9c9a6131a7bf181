//! The end-to-end canary against the daemon, a real DNS server, a real receiving SMTP
//! server and a real webhook receiver on loopback: probes through an SMTP route and a
//! webhook route are delivered and counted in `/metrics` (never in campaign statistics);
//! with the receiver down a probe times out, is cancelled instead of retried, and
//! `/readyz` says the daemon is degraded; `ctl probe` prints each stage, the scheduler's
//! claim and the courier's start included, and picks addresses by route name. A webhook
//! route whose receiver answers 500 or is gone fails the probe with its reply.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::dns::{TestDns, Zone};
use common::floodgate::{TOKEN, TestApp, admin, ctl, http};
use common::http_receiver::Receiver;
use common::sink::Sink;
use serde_json::Value;

async fn dns() -> TestDns {
    TestDns::start(
        Zone::new()
            .mx("mx.test", 10, "mail.mx.test")
            .a("mail.mx.test", Ipv4Addr::LOCALHOST),
    )
    .await
}

fn admin_addr(t: &TestApp) -> SocketAddr {
    t.app.admin_addr.expect("admin listener")
}

fn config(smtp_port: u16, webhook_url: &str, canary: &str) -> String {
    let secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(b"floodgate-canary-test-key-32-byt")
    );
    format!(
        "[delivery]\nenabled = true\n\n[canary]\n{canary}\n\n[[route]]\nname = \"hooks\"\ndomains = [\"hooks.test\"]\ntransport = \"webhook\"\nurl = \"{webhook_url}\"\nsecret = \"{secret}\"\n\n[[route]]\ndomains = [\"*\"]\ntransport = \"mx\"\nport = {smtp_port}\n"
    )
}

/// Polls `/metrics` until the line starting with `series` reads `want`, for at most
/// 30 s (a bound on a broken build, not a timing assertion).
async fn wait_metric(addr: SocketAddr, series: &str, want: &str) {
    let start = Instant::now();
    loop {
        let (_, text) = http(addr, "GET", "/metrics", Some(TOKEN), None).await;
        if text.lines().any(|l| l == format!("{series} {want}")) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{series} never {want}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_through_an_smtp_and_a_webhook_route_are_delivered_and_measured() {
    let sink = Sink::start().await;
    let hooks = Receiver::start().await;
    let dns = dns().await;
    let canary = "enabled = true\ninterval = \"1h\"\ntimeout = \"20s\"\nslow = \"20s\"\nprobes = [\"probe@mx.test\", \"probe@hooks.test\"]";
    let t = TestApp::start(
        "",
        &config(sink.addr.port(), &hooks.url("/in"), canary),
        dns.addr,
    )
    .await;
    let addr = admin_addr(&t);
    // The scheduled probe, sent at start.
    for probe in ["probe@mx.test", "probe@hooks.test"] {
        wait_metric(
            addr,
            &format!("floodgate_canary_probes_total{{probe=\"{probe}\",result=\"delivered\"}}"),
            "1",
        )
        .await;
        wait_metric(
            addr,
            &format!("floodgate_canary_latency_milliseconds_count{{probe=\"{probe}\"}}"),
            "1",
        )
        .await;
    }
    let received = sink.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(received[0].rcpts, ["probe@mx.test"]);
    assert_eq!(received[0].mail_from, "", "a probe never bounces");
    assert!(String::from_utf8_lossy(&received[0].data).contains("X-Floodgate-Canary: "));
    assert_eq!(hooks.wait_for(1, Duration::from_secs(10)).await.len(), 1);

    // One more now, through the admin API: each stage in order.
    let reports = admin(
        addr,
        "POST",
        "/admin/v1/probe?address=probe@hooks.test",
        None,
    )
    .await;
    let report = &reports[0];
    assert_eq!(report["result"], "delivered", "{report}");
    let stages: Vec<&str> = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        ["committed", "claimed", "handed", "delivered"],
        "{report}"
    );
    let after: Vec<i64> = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["after_ms"].as_i64().unwrap())
        .collect();
    assert!(after.windows(2).all(|w| w[0] <= w[1]), "{report}");
    assert_eq!(report["route"], "hooks", "{report}");
    // Each stage went into its histogram: three probes so far (two at start, this one).
    for stage in ["committed", "claimed", "handed", "delivered"] {
        wait_metric(
            addr,
            &format!("floodgate_canary_stage_milliseconds_count{{stage=\"{stage}\"}}"),
            "3",
        )
        .await;
    }
    wait_metric(
        addr,
        "floodgate_canary_probes_total{probe=\"probe@hooks.test\",result=\"delivered\"}",
        "2",
    )
    .await;

    // Healthy, and no campaign statistic knows about the probes.
    let (status, text) = http(addr, "GET", "/readyz", None, None).await;
    assert_eq!(status, 200, "{text}");
    let campaigns = admin(addr, "GET", "/admin/v1/campaigns", None).await;
    assert!(
        !campaigns.to_string().contains("floodgate-canary"),
        "{campaigns}"
    );

    // `ctl probe` runs one and prints its stages.
    let out = ctl(addr, &["probe", "--address", "probe@mx.test"]).await;
    assert!(out.contains("probe@mx.test"), "{out}");
    assert!(out.contains("delivered"), "{out}");
    assert!(out.contains("committed"), "{out}");
    assert!(out.contains("claimed") && out.contains("handed"), "{out}");
    // By route name: the configured address that the route serves.
    let out = ctl(addr, &["probe", "--route", "hooks"]).await;
    assert!(
        out.starts_with("probe@hooks.test: delivered") && out.contains("route hooks"),
        "{out}"
    );
    assert!(!out.contains("probe@mx.test"), "{out}");
    let (status, text) = http(
        addr,
        "POST",
        "/admin/v1/probe?route=nope",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 404, "{text}");
    let out = ctl(addr, &["probe", "--address", "probe@mx.test", "--json"]).await;
    let json: Value = serde_json::from_str(&out).expect("ctl probe --json");
    assert_eq!(json[0]["result"], "delivered", "{json}");
    // `ctl status` shows the last probe of each address.
    let out = ctl(addr, &["status"]).await;
    assert!(
        out.contains("canary        probe@mx.test: delivered in "),
        "{out}"
    );
    assert!(
        out.contains("canary        probe@hooks.test: delivered in "),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_receiver_down_the_probe_fails_once_and_readyz_is_degraded() {
    // A port nothing listens on: bound, then closed.
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = down.local_addr().unwrap().port();
    drop(down);
    let hooks = Receiver::start().await;
    let dns = dns().await;
    let canary = "enabled = true\ninterval = \"1h\"\ntimeout = \"1s\"\nslow = \"1s\"\nprobes = [\"probe@mx.test\"]";
    let t = TestApp::start("", &config(port, &hooks.url("/in"), canary), dns.addr).await;
    let addr = admin_addr(&t);
    wait_metric(
        addr,
        "floodgate_canary_probes_total{probe=\"probe@mx.test\",result=\"failed\"}",
        "1",
    )
    .await;
    let (status, text) = http(addr, "GET", "/readyz", None, None).await;
    assert_eq!(status, 503, "{text}");
    assert!(
        text.contains("canary degraded") && text.contains("probe@mx.test: timeout"),
        "{text}"
    );

    // The guard raised an alert.
    let alerts = admin(addr, "GET", "/admin/v1/alerts", None).await;
    let canary_alert = |a: &Value| {
        a["kind"] == "canary"
            && a["message"]
                .as_str()
                .unwrap()
                .contains("probe@mx.test: timeout")
    };
    assert!(
        alerts.as_array().unwrap().iter().any(canary_alert),
        "{alerts}"
    );

    // A probe run now fails the same way; its message is cancelled, not left to retry.
    let reports = admin(addr, "POST", "/admin/v1/probe", None).await;
    let report = &reports[0];
    assert_eq!(report["result"], "timeout", "{report}");
    let id = report["queue_id"].as_str().unwrap();
    let trace = admin(addr, "GET", &format!("/admin/v1/messages/{id}"), None).await;
    let rcpt = &trace["recipients"][0];
    assert_eq!(rcpt["state"], "failed", "{trace}");
    assert_eq!(rcpt["reason"], "cancelled", "{trace}");
    assert_eq!(trace["source"], "canary", "{trace}");
}

/// Two webhook routes, one whose receiver answers 500 and one whose receiver is gone:
/// each probe ends in `timeout` with the stages it reached and the last reply, is
/// cancelled, and raises the alert and the degraded `/readyz` the README describes; once
/// the first receiver answers 200 again a probe of it succeeds and `/readyz` names only
/// the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_webhook_receiver_fails_the_probe_with_its_reply() {
    use common::http_receiver::Reply;
    let hooks = Receiver::start_with(Reply::status(500).body("receiver broken")).await;
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone_url = format!("http://{}/in", gone.local_addr().unwrap());
    drop(gone);
    let dns = dns().await;
    let canary = "enabled = true\ninterval = \"1h\"\ntimeout = \"3s\"\nslow = \"3s\"\nprobes = [\"probe@hooks.test\", \"probe@gone.test\"]";
    let secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(b"floodgate-canary-test-key-32-byt")
    );
    let routes = format!(
        "[delivery]\nenabled = true\n\n[canary]\n{canary}\n\n[[route]]\nname = \"hooks\"\ndomains = [\"hooks.test\"]\ntransport = \"webhook\"\nurl = \"{}\"\nsecret = \"{secret}\"\n\n[[route]]\nname = \"gone\"\ndomains = [\"gone.test\"]\ntransport = \"webhook\"\nurl = \"{gone_url}\"\nsecret = \"{secret}\"\n",
        hooks.url("/in")
    );
    let t = TestApp::start("", &routes, dns.addr).await;
    let addr = admin_addr(&t);
    for probe in ["probe@hooks.test", "probe@gone.test"] {
        wait_metric(
            addr,
            &format!("floodgate_canary_probes_total{{probe=\"{probe}\",result=\"failed\"}}"),
            "1",
        )
        .await;
    }
    assert!(hooks.count() >= 1, "the receiver was asked");

    let stages_of = |report: &Value| -> Vec<String> {
        report["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["stage"].as_str().unwrap().to_owned())
            .collect()
    };
    let reports = admin(addr, "POST", "/admin/v1/probe?route=hooks", None).await;
    assert_eq!(reports.as_array().unwrap().len(), 1, "{reports}");
    let report = &reports[0];
    assert_eq!(report["address"], "probe@hooks.test", "{report}");
    assert_eq!(report["result"], "timeout", "{report}");
    assert_eq!(
        stages_of(report),
        ["committed", "claimed", "handed", "timeout"],
        "{report}"
    );
    let reply = report["reply"].as_str().expect("a reply was stored");
    assert!(
        reply.contains("HTTP 500") && reply.contains("receiver broken"),
        "{report}"
    );
    let id = report["queue_id"].as_str().unwrap();
    let trace = admin(addr, "GET", &format!("/admin/v1/messages/{id}"), None).await;
    assert_eq!(trace["recipients"][0]["reason"], "cancelled", "{trace}");

    let out = ctl(addr, &["probe", "--route", "gone"]).await;
    assert!(out.starts_with("probe@gone.test: timeout"), "{out}");
    assert!(
        out.contains("route gone") && out.contains("handed"),
        "{out}"
    );
    assert!(
        out.contains("last reply: webhook request failed"),
        "the connection error is the reply: {out}"
    );

    let (status, text) = http(addr, "GET", "/readyz", None, None).await;
    assert_eq!(status, 503, "{text}");
    assert!(
        text.contains("probe@hooks.test: timeout") && text.contains("probe@gone.test: timeout"),
        "{text}"
    );
    let alerts = admin(addr, "GET", "/admin/v1/alerts", None).await;
    let alerted = |who: &str| {
        alerts
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "canary" && a["message"].as_str().unwrap().contains(who))
    };
    // One canary alert a minute at most, whichever probe failed first.
    assert!(
        alerted("probe@hooks.test: timeout") || alerted("probe@gone.test: timeout"),
        "{alerts}"
    );

    // The receiver recovers: its probe is delivered and only the gone one stays degraded.
    hooks.set_default(Reply::status(200));
    let reports = admin(addr, "POST", "/admin/v1/probe?route=hooks", None).await;
    assert_eq!(reports[0]["result"], "delivered", "{}", reports[0]);
    let (status, text) = http(addr, "GET", "/readyz", None, None).await;
    assert_eq!(status, 503, "{text}");
    assert!(
        !text.contains("probe@hooks.test") && text.contains("probe@gone.test: timeout"),
        "{text}"
    );
}

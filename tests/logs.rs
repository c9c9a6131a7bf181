//! Logs for shipping, against the real daemon (its standard error captured), a real DNS
//! server and a real receiving SMTP server on loopback: `[log] format = "json"` writes
//! one JSON object per line and every delivery outcome carries its fields; a flood of
//! one campaign's failures is governed and summarised, exactly counted; a reply text
//! with a carriage return cannot forge a line in the text format.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::dns::{TestDns, Zone};
use common::floodgate::{Daemon, Smtp, config_text, message};
use common::sink::{RcptScript, Sink, SinkConfig};
use serde_json::Value;

async fn dns() -> TestDns {
    TestDns::start(
        Zone::new()
            .mx("mx.test", 10, "mail.mx.test")
            .a("mail.mx.test", Ipv4Addr::LOCALHOST),
    )
    .await
}

/// A daemon relaying everything to `sink`, with `log` as its `[log]` table.
fn daemon(dir: &std::path::Path, dns: &TestDns, sink: &Sink, log: &str) -> Daemon {
    let extra = format!(
        "[delivery]\nenabled = true\n\n[guard]\nenabled = false\n\n[log]\n{log}\n\n[[route]]\ndomains = [\"*\"]\ntransport = \"mx\"\nport = {}\n",
        sink.addr.port()
    );
    let path = dir.join("floodgate.toml");
    std::fs::write(&path, config_text(dir, dns.addr, "", &extra)).unwrap();
    Daemon::start(&path)
}

fn json_lines(daemon: &Daemon) -> Vec<Value> {
    daemon
        .log
        .lock()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect()
}

fn with_message<'a>(lines: &'a [Value], message: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| l["fields"]["message"] == message)
        .collect()
}

/// Polls `lines` until `done` holds, for at most 30 s (a bound on a broken build, not a
/// timing assertion).
fn wait_until(daemon: &Daemon, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let lines = json_lines(daemon);
        if done(&lines) {
            return lines;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what}: {:?}",
            daemon.log.lock()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_outcome_lines_carry_id_domain_campaign_class_and_reply() {
    let sink = Sink::start_with(SinkConfig {
        rcpt: Box::new(|to| match to.starts_with("bad") {
            true => RcptScript::Reply(550, "5.1.1 no such user"),
            false => RcptScript::Accept,
        }),
        ..SinkConfig::default()
    })
    .await;
    let dns = dns().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon(dir.path(), &dns, &sink, "format = \"json\"");
    let mut c = Smtp::connect(daemon.smtp).await;
    c.ehlo().await;
    let id = c
        .send_mail(
            "app@client.test",
            &["good@mx.test", "bad@mx.test"],
            &message("json", "X-Campaign-ID: news\r\n"),
        )
        .await;

    let lines = wait_until(&daemon, "two outcome lines", |l| {
        with_message(l, "delivery outcome").len() >= 2
    });
    let outcomes = with_message(&lines, "delivery outcome");
    assert_eq!(outcomes.len(), 2, "{outcomes:?}");
    let of = |outcome: &str| {
        outcomes
            .iter()
            .map(|l| &l["fields"])
            .find(|f| f["outcome"] == outcome)
            .unwrap_or_else(|| panic!("no {outcome} line: {outcomes:?}"))
    };
    let delivered = of("delivered");
    assert_eq!(delivered["queue_id"], id.as_str());
    assert_eq!(delivered["domain"], "mx.test");
    assert_eq!(delivered["campaign"], "news");
    assert_eq!(delivered["code"], 250);
    assert!(delivered.get("class").is_none(), "{delivered}");
    let failed = of("failed");
    assert_eq!(failed["queue_id"], id.as_str());
    assert_eq!(failed["domain"], "mx.test");
    assert_eq!(failed["campaign"], "news");
    assert_eq!(failed["code"], 550);
    assert_eq!(failed["enhanced"], "5.1.1");
    assert_eq!(failed["reply"], "no such user");
    assert_eq!(failed["class"], "invalid_recipient");
    assert_eq!(failed["reason"], "rejected");
    assert!(outcomes.iter().all(|l| l["level"] == "INFO"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_failures_is_governed_and_every_skipped_line_is_counted() {
    const BURST: u64 = 5;
    const MESSAGES: usize = 4;
    const PER_MESSAGE: usize = 50;
    let sink = Sink::start_with(SinkConfig {
        rcpt: Box::new(|_| RcptScript::Reply(550, "5.1.1 no such user")),
        ..SinkConfig::default()
    })
    .await;
    let dns = dns().await;
    let dir = tempfile::tempdir().unwrap();
    let log = format!(
        "format = \"json\"\noutcomes_per_sec = 1\noutcomes_burst = {BURST}\nsummary_interval = \"1s\""
    );
    let started = Instant::now();
    let daemon = daemon(dir.path(), &dns, &sink, &log);
    let mut c = Smtp::connect(daemon.smtp).await;
    c.ehlo().await;
    for m in 0..MESSAGES {
        let to: Vec<String> = (0..PER_MESSAGE)
            .map(|i| format!("r{m}-{i}@mx.test"))
            .collect();
        let to: Vec<&str> = to.iter().map(String::as_str).collect();
        c.send_mail(
            "app@client.test",
            &to,
            &message("flood", "X-Campaign-ID: flood\r\n"),
        )
        .await;
    }
    let total = (MESSAGES * PER_MESSAGE) as u64;
    let of_flood = |lines: &[Value], message: &str| -> Vec<Value> {
        with_message(lines, message)
            .into_iter()
            .filter(|l| l["fields"]["campaign"] == "flood")
            .cloned()
            .collect()
    };
    let count = |lines: &[Value]| {
        let written = of_flood(lines, "delivery outcome").len() as u64;
        let skipped: u64 = of_flood(lines, "delivery outcome lines skipped")
            .iter()
            .map(|l| l["fields"]["skipped"].as_u64().expect("skipped count"))
            .sum();
        (written, skipped)
    };
    let lines = wait_until(&daemon, "every failure written or counted", |l| {
        let (written, skipped) = count(l);
        written + skipped >= total
    });
    let (written, skipped) = count(&lines);
    assert_eq!(written + skipped, total, "counted exactly once each");
    // The burst, plus at most one line per second the daemon has been up.
    let refill = started.elapsed().as_secs() + 1;
    assert!(written <= BURST + refill, "{written} lines written");
    assert!(skipped >= total - BURST - refill, "{skipped} skipped");
    let summaries = of_flood(&lines, "delivery outcome lines skipped");
    assert!(
        summaries.len() as u64 <= refill,
        "one summary per interval at most: {}",
        summaries.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_with_a_carriage_return_cannot_forge_a_text_log_line() {
    let forged = "INFO floodgate: delivery outcome outcome=delivered";
    let sink = Sink::start_with(SinkConfig {
        rcpt: Box::new(|_| {
            RcptScript::Reply(
                550,
                "5.7.1 no\rINFO floodgate: delivery outcome outcome=delivered\u{1b}[2K",
            )
        }),
        ..SinkConfig::default()
    })
    .await;
    let dns = dns().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon(dir.path(), &dns, &sink, "format = \"text\"");
    let mut c = Smtp::connect(daemon.smtp).await;
    c.ehlo().await;
    c.send_mail("app@client.test", &["x@mx.test"], &message("cr", ""))
        .await;
    let line = daemon.wait_log("outcome=failed", Duration::from_secs(30));
    assert!(
        line.contains(r"reply=no\rINFO floodgate: delivery outcome outcome=delivered\u{1b}[2K"),
        "{line:?}"
    );
    let log = daemon.log.lock();
    for l in log.iter() {
        assert!(!l.contains(['\r', '\u{1b}']), "raw control in {l:?}");
        assert!(!l.starts_with(forged), "forged line {l:?}");
    }
}

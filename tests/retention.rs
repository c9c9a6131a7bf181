//! The queue forgets what is finished: delivered and failed recipients (and messages
//! with none left) are deleted after `[queue] retention`, live ones never, and the
//! lifetime totals survive both pruning and a restart. The status reads behind /metrics,
//! `ctl status` and the dashboard touch live rows only (checked on the query plan).

mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::floodgate::{TOKEN, TestApp, http, message};
use common::relay::{WAIT, wait_recipient};
use common::sink::{RcptScript, Sink, SinkConfig};
use floodgate::clock::ShiftedClock;
use floodgate::config::QueueConfig;
use floodgate::queue::{Queue, RecipientState, Totals, status};

async fn wait_state(t: &TestApp, id: &str, address: &str, state: RecipientState) {
    wait_recipient(t, id, address, &format!("reaching {state:?}"), |r| {
        r.state == state
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn finished_rows_are_pruned_live_ones_kept_and_totals_survive() {
    let dns = TestDns::start(
        Zone::new()
            .mx("mx.test", 10, "mail.mx.test")
            .a("mail.mx.test", Ipv4Addr::LOCALHOST),
    )
    .await;
    let sink = Sink::start_with(SinkConfig {
        rcpt: Box::new(|rcpt| {
            if rcpt.starts_with("bad") {
                RcptScript::Reply(550, "5.1.1 no such user")
            } else if rcpt.starts_with("later") {
                RcptScript::Reply(451, "4.3.0 try later")
            } else {
                RcptScript::Accept
            }
        }),
        ..Default::default()
    })
    .await;
    let clock = Arc::new(ShiftedClock::default());
    let config = format!(
        "[delivery]\nenabled = true\n\n[[route]]\ndomains = [\"*\"]\ntransport = \"mx\"\nport = {}\n",
        sink.addr.port()
    );
    let t = TestApp::start_full("", "retention = \"1h\"", &config, dns.addr, clock.clone()).await;
    let mut c = t.client().await;
    c.ehlo().await;
    let done = c
        .send_mail("a@client.test", &["u1@mx.test"], &message("one", ""))
        .await;
    let mixed = c
        .send_mail(
            "a@client.test",
            &["u2@mx.test", "bad@mx.test"],
            &message("two", ""),
        )
        .await;
    let live = c
        .send_mail("a@client.test", &["later@mx.test"], &message("three", ""))
        .await;
    wait_state(&t, &done, "u1@mx.test", RecipientState::Delivered).await;
    wait_state(&t, &mixed, "u2@mx.test", RecipientState::Delivered).await;
    wait_state(&t, &mixed, "bad@mx.test", RecipientState::Failed).await;
    // `later@` was attempted once and waits for its retry.
    sink.wait_for(2, WAIT).await;
    let totals = t.app.queue().totals().await.unwrap();
    assert_eq!((totals.delivered, totals.failed), (2, 1), "{totals:?}");

    // Within retention nothing finished is deleted.
    t.app.queue().prune_now().changed().await.unwrap();
    assert!(t.app.queue().message(&done).await.unwrap().is_some());

    clock.advance(Duration::from_secs(2 * 3600));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        t.app.queue().prune_now().changed().await.unwrap();
        if t.app.queue().message(&mixed).await.unwrap().is_none() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never pruned");
    }
    assert!(t.app.queue().message(&done).await.unwrap().is_none());
    let kept = t
        .app
        .queue()
        .message(&live)
        .await
        .unwrap()
        .expect("live message kept");
    assert_eq!(kept.recipients[0].state, RecipientState::Scheduled);
    assert!(kept.body.is_some(), "a live message keeps its body");
    let expected = Totals {
        delivered: 2,
        failed: 1,
        pruned_recipients: 3,
        pruned_messages: 2,
    };
    assert_eq!(t.app.queue().totals().await.unwrap(), expected);

    // /metrics reports the lifetime totals and the live count.
    let (status, text) = http(
        t.app.admin_addr.unwrap(),
        "GET",
        "/metrics",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200);
    for line in [
        "floodgate_queue_finished_total{state=\"delivered\"} 2",
        "floodgate_queue_finished_total{state=\"failed\"} 1",
        "floodgate_queue_recipients{state=\"scheduled\"} 1",
        "floodgate_queue_pruned_total{table=\"messages\"} 2",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }

    // The totals are in queue.db, not in memory: a restart keeps them.
    let TestApp { app, dir } = t;
    app.shutdown().await;
    let queue_config = QueueConfig {
        dir: dir.path().join("queue"),
        ..QueueConfig::default()
    };
    let (queue, _writer) = Queue::open(&queue_config, clock).unwrap();
    assert_eq!(queue.totals().await.unwrap(), expected);
}

/// The plan of `sql` on a fresh queue.db, one detail line per step.
fn plan(conn: &rusqlite::Connection, sql: &str) -> String {
    let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
    let rows = stmt
        .query_map([], |r| r.get::<_, String>(3))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    rows.join("\n")
}

#[tokio::test]
async fn status_queries_read_an_index_over_live_rows_only() {
    let dir = tempfile::tempdir().unwrap();
    let config = QueueConfig {
        dir: dir.path().to_owned(),
        ..QueueConfig::default()
    };
    let clock = Arc::new(ShiftedClock::default());
    let (queue, _writer) = Queue::open(&config, clock).unwrap();
    queue.ping().await.unwrap();
    let conn = rusqlite::Connection::open(queue.path()).unwrap();
    for sql in [
        status::LIVE_BY_STATE,
        status::LIVE_BY_DOMAIN,
        status::LIVE_BY_CAMPAIGN,
    ] {
        let plan = plan(&conn, sql);
        assert!(
            plan.contains("USING COVERING INDEX recipients_live"),
            "{sql}\n{plan}"
        );
    }
    let index: String = conn
        .query_row(
            "SELECT sql FROM sqlite_master WHERE name = 'recipients_live'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(index.ends_with("WHERE state IN (0, 3)"), "{index}");
    // Retention finds finished rows by age through their own partial index.
    let prune = plan(
        &conn,
        "SELECT id FROM recipients WHERE state IN (1, 2) AND updated_at < 0 LIMIT 500",
    );
    assert!(prune.contains("INDEX recipients_finished"), "{prune}");
}

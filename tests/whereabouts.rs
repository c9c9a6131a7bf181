//! "Where is my mail?" against the real daemon and real peers: a message's trace after a
//! partial acceptance at a receiving SMTP server, the search among 100,000 queued
//! recipients, retry once a sink recovers, cancel with a notification, a held domain
//! waiting (across a restart) while another flows, a backup taken during intake restored
//! and delivered, and a purge saved to a file then put back.

mod common;

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::dns::{TestDns, Zone};
use common::floodgate::{TestApp, admin, config_text_with_queue, ctl, message, parse_config};
use common::relay::{WAIT, partial_sink, relay_config, start, wait_recipient};
use common::sink::{RcptScript, Sink, SinkConfig};
use floodgate::app::{App, Deps};
use floodgate::queue::{NewMessage, NewRecipient, QueueId, RecipientState, Source};
use serde_json::Value;

fn zone() -> Zone {
    Zone::new()
        .mx("mx.test", 10, "mail.mx.test")
        .mx("held.test", 10, "mail.mx.test")
        .mx("client.test", 10, "mail.mx.test")
        .a("mail.mx.test", Ipv4Addr::LOCALHOST)
}

fn admin_addr(t: &TestApp) -> std::net::SocketAddr {
    t.app.admin_addr.expect("admin listener")
}

async fn ctl_json(t: &TestApp, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = ctl(admin_addr(t), &all).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

async fn state(t: &TestApp, id: &str, address: &str) -> RecipientState {
    let msg = t.app.queue().message(id).await.unwrap().expect("message");
    msg.recipients
        .iter()
        .find(|r| r.address == address)
        .expect("recipient")
        .state
}

async fn wait_state(t: &TestApp, id: &str, address: &str, want: RecipientState) {
    wait_recipient(t, id, address, &format!("{want:?}"), |r| r.state == want).await;
}

#[tokio::test]
async fn trace_after_partial_acceptance_shows_each_recipient() {
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
            &["ok@mx.test", "busy@mx.test", "gone@mx.test"],
            &message("partial", "X-Campaign-ID: spring\r\n"),
        )
        .await;
    wait_state(&t, &id, "gone@mx.test", RecipientState::Failed).await;
    wait_recipient(&t, &id, "busy@mx.test", "one attempt", |r| r.attempts == 1).await;
    wait_state(&t, &id, "ok@mx.test", RecipientState::Delivered).await;

    let trace = ctl_json(&t, &["message", &id]).await;
    assert_eq!(trace["queue_id"], id.as_str());
    assert_eq!(trace["sender"], "app@client.test");
    assert_eq!(trace["campaign"], "spring");
    assert_eq!(trace["source"], "smtp");
    assert_eq!(trace["client"], "127.0.0.1");
    assert!(trace["size"].as_u64().unwrap() > 0);
    let r = |a: &str| {
        trace["recipients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["address"] == a)
            .cloned()
            .unwrap()
    };
    let ok = r("ok@mx.test");
    assert_eq!(ok["state"], "delivered");
    assert_eq!(ok["last_reply"]["code"], 250);
    assert!(ok["delivered_at_ms"].as_i64().unwrap() > 0);
    assert!(ok["class"].is_null());
    let busy = r("busy@mx.test");
    assert_eq!(busy["state"], "scheduled");
    assert_eq!(busy["attempts"], 1);
    assert_eq!(busy["last_reply"]["code"], 450);
    assert_eq!(busy["last_reply"]["enhanced"], "4.2.1");
    assert_eq!(busy["last_reply"]["text"], "mailbox busy");
    assert!(busy["next_attempt_ms"].as_i64().unwrap() > trace["received_at_ms"].as_i64().unwrap());
    assert!(busy["class"].is_string());
    let gone = r("gone@mx.test");
    assert_eq!(gone["state"], "failed");
    assert_eq!(gone["last_reply"]["enhanced"], "5.1.1");
    assert_eq!(gone["class"], "invalid_recipient");
    assert_eq!(gone["reason"], "rejected");
    assert!(gone["failed_at_ms"].as_i64().unwrap() > 0);

    // The same in words, and an unknown id is an error (exit 1).
    let text = ctl(admin_addr(&t), &["message", &id]).await;
    assert!(
        text.contains("gone@mx.test") && text.contains("invalid_recipient"),
        "{text}"
    );
    let (status, _) = common::floodgate::http(
        admin_addr(&t),
        "GET",
        "/admin/v1/messages/nope",
        Some(common::floodgate::TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn find_by_recipient_among_100000_queued() {
    let dns = TestDns::start(zone()).await;
    let t = TestApp::start("", "", dns.addr).await;
    // 1,000 messages of 100 recipients, through the writer's group commit.
    let queue = t.app.queue().clone();
    let mut tasks = tokio::task::JoinSet::new();
    for m in 0..1000u32 {
        let queue = queue.clone();
        tasks.spawn(async move {
            let recipients = (0..100)
                .map(|r| NewRecipient {
                    address: format!("u{m}-{r}@mx.test"),
                    domain: "mx.test".into(),
                })
                .collect();
            queue
                .enqueue(NewMessage {
                    queue_id: QueueId::generate(i64::from(m)),
                    sender: format!("s{}@client.test", m % 7),
                    campaign: Some(format!("c{}", m % 3)),
                    source: Source::Http,
                    client: "bulk".into(),
                    identity: Some("bulk".into()),
                    body: b"Subject: x\r\n\r\nx\r\n".to_vec(),
                    recipients,
                    smtputf8: false,
                })
                .await
                .unwrap();
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let found = ctl_json(&t, &["find", "--rcpt", "u517-42@mx.test", "--since", "1h"]).await;
    let rows = found["recipients"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{found}");
    assert_eq!(rows[0]["address"], "u517-42@mx.test");
    assert_eq!(rows[0]["sender"], "s6@client.test");
    assert_eq!(rows[0]["campaign"], "c1");
    assert_eq!(rows[0]["state"], "scheduled");
    assert!(found["next_cursor"].is_null());
    let text = ctl(admin_addr(&t), &["find", "--rcpt", "u517-42@mx.test"]).await;
    assert!(text.contains("u517-42@mx.test"), "{text}");

    // Pages of a sender's recipients follow the cursor without repeats.
    let mut seen = std::collections::HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = "/admin/v1/messages?sender=s3%40client.test&limit=1000".to_owned();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = admin(admin_addr(&t), "GET", &path, None).await;
        for r in page["recipients"].as_array().unwrap() {
            assert!(
                seen.insert(r["address"].as_str().unwrap().to_owned()),
                "repeat"
            );
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    // Messages 3, 10, 17, ... : 143 of them, 100 recipients each.
    assert_eq!(seen.len(), 14_300);
    let (status, body) = common::floodgate::http(
        admin_addr(&t),
        "GET",
        "/admin/v1/messages?limit=5000",
        Some(common::floodgate::TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn retry_after_the_sink_recovers_delivers_within_one_pass() {
    let dns = TestDns::start(zone()).await;
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
    // The first retry would be an hour away.
    let t = start(
        &dns,
        &relay_config(sink.addr.port(), "backoff = [\"1h\"]", ""),
        Arc::default(),
    )
    .await;
    let mut c = t.client().await;
    c.ehlo().await;
    let id = c
        .send_mail("app@client.test", &["a@mx.test"], &message("later", ""))
        .await;
    wait_recipient(&t, &id, "a@mx.test", "deferred", |r| r.attempts == 1).await;
    accept.store(true, Ordering::SeqCst);
    t.scheduler_pass().await;
    assert_eq!(
        state(&t, &id, "a@mx.test").await,
        RecipientState::Scheduled,
        "not due yet"
    );
    let done = ctl_json(&t, &["retry", "--domain", "mx.test"]).await;
    assert_eq!(done["recipients"], 1);
    t.scheduler_pass().await;
    assert_eq!(state(&t, &id, "a@mx.test").await, RecipientState::Delivered);
    assert_eq!(sink.received().len(), 1);
    // Nothing deferred is left: a second retry changes nothing.
    let again = ctl_json(&t, &["retry", "--message", &id]).await;
    assert_eq!(again["recipients"], 0);
}

#[tokio::test]
async fn cancel_fails_the_recipient_and_notifies_the_sender() {
    let dns = TestDns::start(zone()).await;
    let sink = Sink::start_with(SinkConfig {
        rcpt: Box::new(|r| match r {
            "stuck@mx.test" => RcptScript::Reply(451, "4.3.0 try later"),
            _ => RcptScript::Accept,
        }),
        ..Default::default()
    })
    .await;
    let t = start(
        &dns,
        &relay_config(sink.addr.port(), "bounces = true\nbackoff = [\"1h\"]", ""),
        Arc::default(),
    )
    .await;
    let mut c = t.client().await;
    c.ehlo().await;
    let id = c
        .send_mail("app@client.test", &["stuck@mx.test"], &message("stuck", ""))
        .await;
    wait_recipient(&t, &id, "stuck@mx.test", "deferred", |r| r.attempts == 1).await;
    let done = ctl_json(&t, &["cancel", "--message", &id, "--yes"]).await;
    assert_eq!(done["recipients"], 1);
    assert_eq!(done["notifications"], 1);
    let trace = admin(
        admin_addr(&t),
        "GET",
        &format!("/admin/v1/messages/{id}"),
        None,
    )
    .await;
    assert_eq!(trace["recipients"][0]["state"], "failed");
    assert_eq!(trace["recipients"][0]["reason"], "cancelled");
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got[0].mail_from, "");
    assert_eq!(got[0].rcpts, ["app@client.test"]);
    let dsn = String::from_utf8_lossy(&got[0].data);
    assert!(
        dsn.contains("Final-Recipient: rfc822; stuck@mx.test"),
        "{dsn}"
    );
    assert!(dsn.contains("cancelled by an operator"), "{dsn}");
    // Cancel does not take a domain or a campaign (a purge does that).
    let (status, _) = common::floodgate::http(
        admin_addr(&t),
        "POST",
        "/admin/v1/queue/cancel",
        Some(common::floodgate::TOKEN),
        Some(r#"{"domain":"mx.test"}"#),
    )
    .await;
    assert_eq!(status, 400);
}

/// The config text of a relaying daemon whose queue lives in `dir`.
fn relay_text(dir: &Path, dns: &TestDns, port: u16) -> String {
    config_text_with_queue(
        dir,
        dns.addr,
        "",
        "lease = \"30s\"",
        &relay_config(port, "", ""),
    )
}

#[tokio::test]
async fn a_held_domain_waits_while_another_flows_and_stays_held_across_a_restart() {
    let dns = TestDns::start(zone()).await;
    let sink = Sink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = relay_text(dir.path(), &dns, sink.addr.port());
    let app = App::start(parse_config(dir.path(), &text), Deps::default())
        .await
        .unwrap();
    let t = TestApp { app, dir };
    let held = ctl_json(&t, &["hold", "--domain", "Held.test"]).await;
    assert_eq!(held["domain"], "held.test");
    assert_eq!(held["held"], true);
    let mut c = t.client().await;
    c.ehlo().await;
    let id = c
        .send_mail(
            "app@client.test",
            &["x@held.test", "y@mx.test"],
            &message("two", ""),
        )
        .await;
    wait_state(&t, &id, "y@mx.test", RecipientState::Delivered).await;
    t.scheduler_pass().await;
    assert_eq!(state(&t, &id, "x@held.test").await, RecipientState::Held);
    assert_eq!(sink.received().len(), 1);

    let TestApp { app, dir } = t;
    app.shutdown().await;
    let app = App::start(parse_config(dir.path(), &text), Deps::default())
        .await
        .unwrap();
    let t = TestApp { app, dir };
    t.scheduler_pass().await;
    assert_eq!(
        state(&t, &id, "x@held.test").await,
        RecipientState::Held,
        "still held"
    );
    let holds = ctl_json(&t, &["holds"]).await;
    assert_eq!(holds[0]["domain"], "held.test");
    // New mail for the held domain waits too.
    let later = c_send(&t, "z@held.test").await;
    t.scheduler_pass().await;
    assert_eq!(state(&t, &later, "z@held.test").await, RecipientState::Held);

    let released = ctl_json(&t, &["release", "--domain", "held.test"]).await;
    assert_eq!(released["recipients"], 2);
    wait_state(&t, &id, "x@held.test", RecipientState::Delivered).await;
    wait_state(&t, &later, "z@held.test", RecipientState::Delivered).await;
    assert_eq!(ctl_json(&t, &["holds"]).await, serde_json::json!([]));
}

async fn c_send(t: &TestApp, to: &str) -> String {
    let mut c = t.client().await;
    c.ehlo().await;
    c.send_mail("app@client.test", &[to], &message("one", ""))
        .await
}

#[tokio::test]
async fn a_backup_taken_during_intake_restores_and_delivers() {
    let dns = TestDns::start(zone()).await;
    // Delivery off: everything acknowledged stays queued.
    let t = TestApp::start("", "", dns.addr).await;
    let smtp = t.smtp();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let intake = {
        let (stop, acked) = (stop.clone(), acked.clone());
        tokio::spawn(async move {
            let mut c = common::floodgate::Smtp::connect(smtp).await;
            c.ehlo().await;
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let id = c
                    .send_mail(
                        "app@client.test",
                        &[&format!("r{n}@mx.test")],
                        &message("b", ""),
                    )
                    .await;
                acked.lock().push(id);
                n += 1;
            }
        })
    };
    while acked.lock().len() < 50 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let before: Vec<String> = acked.lock().clone();
    let backup = ctl_json(&t, &["backup", "nightly-1", "--failures"]).await;
    let during = acked.lock().len();
    while acked.lock().len() < during + 20 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::SeqCst);
    intake.await.unwrap();
    assert_eq!(backup["queue"]["integrity"], "ok");
    assert_eq!(backup["failures"]["integrity"], "ok");
    let copy_dir = Path::new(backup["dir"].as_str().unwrap()).to_owned();
    assert_eq!(
        copy_dir,
        t.dir.path().join("queue").join("backups").join("nightly-1")
    );
    assert!(backup["messages"].as_u64().unwrap() >= before.len() as u64);
    // The same name again is refused: a backup never overwrites.
    let (status, _) = common::floodgate::http(
        admin_addr(&t),
        "POST",
        "/admin/v1/backup",
        Some(common::floodgate::TOKEN),
        Some(r#"{"name":"nightly-1"}"#),
    )
    .await;
    assert_eq!(status, 409);
    let (status, _) = common::floodgate::http(
        admin_addr(&t),
        "POST",
        "/admin/v1/backup",
        Some(common::floodgate::TOKEN),
        Some(r#"{"name":"/etc/floodgate-owned"}"#),
    )
    .await;
    assert_eq!(status, 400);

    // Restore: a new daemon, delivering, started on the copy.
    let sink = Sink::start().await;
    let restored = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(restored.path().join("queue")).unwrap();
    std::fs::copy(
        copy_dir.join("queue.db"),
        restored.path().join("queue").join("queue.db"),
    )
    .unwrap();
    std::fs::copy(
        copy_dir.join("failures.db"),
        restored.path().join("queue").join("failures.db"),
    )
    .unwrap();
    let text = relay_text(restored.path(), &dns, sink.addr.port());
    let app = App::start(parse_config(restored.path(), &text), Deps::default())
        .await
        .unwrap();
    let r = TestApp { app, dir: restored };
    let held = backup["messages"].as_u64().unwrap() as usize;
    let got = sink.wait_for(held, WAIT).await;
    let delivered: std::collections::HashSet<String> =
        got.iter().flat_map(|m| m.rcpts.clone()).collect();
    for n in 0..before.len() {
        assert!(
            delivered.contains(&format!("r{n}@mx.test")),
            "r{n} acknowledged before the backup, not delivered"
        );
    }
    for id in &before {
        wait_state(
            &r,
            id,
            &format!("r{}@mx.test", before.iter().position(|b| b == id).unwrap()),
            RecipientState::Delivered,
        )
        .await;
    }
    drop(t);
}

#[tokio::test]
async fn a_purge_saved_first_is_put_back_by_requeue_once() {
    let dns = TestDns::start(zone()).await;
    let t = TestApp::start("", "", dns.addr).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        let mut c = t.client().await;
        c.ehlo().await;
        ids.push(
            c.send_mail(
                "app@client.test",
                &[&format!("p{n}@mx.test"), &format!("q{n}@mx.test")],
                &message("purge me", "X-Campaign-ID: oops\r\n"),
            )
            .await,
        );
    }
    let file = t.dir.path().join("oops.ndjson");
    let file_arg = file.to_str().unwrap();
    let purged = ctl_json(&t, &["purge", "oops", "--save", file_arg, "--yes"]).await;
    assert_eq!(purged["purged"], 6);
    let saved = std::fs::read_to_string(&file).unwrap();
    assert_eq!(saved.lines().count(), 3, "{saved}");
    assert!(saved.contains("body_base64"));
    for id in &ids {
        let trace = admin(
            admin_addr(&t),
            "GET",
            &format!("/admin/v1/messages/{id}"),
            None,
        )
        .await;
        assert_eq!(trace["recipients"][0]["reason"], "purged");
        assert_eq!(trace["body_stored"], false, "a purge frees the body");
    }
    // The file is never overwritten by a second purge.
    let out = tokio::process::Command::new(common::floodgate::binary())
        .args([
            "ctl",
            "--admin",
            &admin_addr(&t).to_string(),
            "--token",
            common::floodgate::TOKEN,
        ])
        .args(["purge", "oops", "--save", file_arg, "--yes"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    let back = ctl_json(&t, &["requeue", file_arg]).await;
    assert_eq!(back["recipients"], 6);
    assert_eq!(back["unchanged"], 0);
    for (n, id) in ids.iter().enumerate() {
        let msg = t.app.queue().message(id).await.unwrap().unwrap();
        assert!(
            msg.body
                .as_deref()
                .is_some_and(|b| b.ends_with(b"Hello.\r\n.leading dot line\r\n"))
        );
        assert_eq!(
            state(&t, id, &format!("p{n}@mx.test")).await,
            RecipientState::Scheduled
        );
    }
    // Idempotent by queue id: a second requeue changes nothing.
    let again = ctl_json(&t, &["requeue", file_arg]).await;
    assert_eq!(
        (again["recipients"].as_u64(), again["unchanged"].as_u64()),
        (Some(0), Some(6))
    );
    let text = ctl(admin_addr(&t), &["requeue", file_arg]).await;
    assert!(text.contains("0 recipients queued again"), "{text}");
    let queued = admin(
        admin_addr(&t),
        "GET",
        "/admin/v1/messages?campaign=oops&state=scheduled",
        None,
    )
    .await;
    assert_eq!(queued["recipients"].as_array().unwrap().len(), 6);
}

//! The real `floodgate` binary: config errors, durability across SIGKILL, graceful
//! SIGTERM, and live reload on SIGHUP.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::floodgate::{Daemon, Smtp, check_config, config_text, message, stored_message};

async fn zone() -> TestDns {
    TestDns::start(
        Zone::new()
            .mx("mx.test", 10, "mail.mx.test")
            .a("mail.mx.test", Ipv4Addr::LOCALHOST),
    )
    .await
}

const TOKEN: &str = "[admin]\ntoken = \"0123456789abcdef01234567\"\n";

#[test]
fn check_config_explains_what_is_wrong() {
    let (code, out) = check_config(&format!(
        "{TOKEN}[smtp]\nlisten = [\"127.0.0.1:25\"]\nmax_rcpts = 10\n"
    ));
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("max_rcpts") && out.contains("line 5"), "{out}");

    let (code, out) = check_config(&format!(
        "{TOKEN}[smtp]\nallowed_networks = [\"192.168.0.0/99\"]\n"
    ));
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("allowed_networks") && out.contains("line 4"),
        "{out}"
    );

    let (code, out) = check_config(&format!(
        "{TOKEN}[smtp.tls]\ncert = \"/no/such/cert.pem\"\nkey = \"/no/such/key.pem\"\n"
    ));
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("smtp.tls.cert") && out.contains("does not exist"),
        "{out}"
    );

    let (code, out) = check_config(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/floodgate.toml"))
            .unwrap(),
    );
    assert_eq!(code, 0, "the shipped config must pass: {out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_message_survives_sigkill() {
    let dns = zone().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("floodgate.toml");
    std::fs::write(&path, config_text(dir.path(), dns.addr, "", "")).unwrap();
    let queue_db = dir.path().join("queue/queue.db");

    let mut daemon = Daemon::start(&path);
    let mut c = Smtp::connect(daemon.smtp).await;
    c.ehlo().await;
    let id = c
        .send_mail(
            "app@client.test",
            &["a@mx.test", "b@mx.test"],
            &message("durable", ""),
        )
        .await;
    // 250 was answered: kill without any chance to flush.
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();

    let (sender, body, rcpts) =
        stored_message(&queue_db, &id).expect("message on disk after SIGKILL");
    assert_eq!(sender, "app@client.test");
    assert!(String::from_utf8_lossy(&body).contains("Subject: durable"));
    assert_eq!(
        rcpts,
        [("a@mx.test".to_owned(), 0), ("b@mx.test".to_owned(), 0)]
    );

    // The daemon starts again on the same queue and the message is still there, intact.
    let daemon = Daemon::start(&path);
    let mut c = Smtp::connect(daemon.smtp).await;
    c.ehlo().await;
    let (_, body_again, _) = stored_message(&queue_db, &id).expect("still queued after restart");
    assert_eq!(body, body_again);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_sessions_and_exits_zero() {
    let dns = zone().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("floodgate.toml");
    std::fs::write(&path, config_text(dir.path(), dns.addr, "", "")).unwrap();
    let mut daemon = Daemon::start(&path);

    // One session mid-transaction, one idle.
    let mut busy = Smtp::connect(daemon.smtp).await;
    busy.ehlo().await;
    busy.cmd("MAIL FROM:<app@client.test>", "250").await;
    busy.rcpt("a@mx.test", "250").await;
    busy.cmd("DATA", "354").await;
    let mut idle = Smtp::connect(daemon.smtp).await;
    idle.ehlo().await;

    daemon.signal(libc::SIGTERM);
    // The idle session is told to come back later.
    idle.expect("421 4.3.2").await;
    // The one receiving a message may finish it, and it is queued.
    busy.send(b"Subject: last one\r\n\r\nbye\r\n.\r\n").await;
    let reply = busy.expect("250 2.0.0").await;
    let id = common::floodgate::queue_id(&reply);
    busy.expect("421 4.3.2").await;
    assert_eq!(daemon.wait(Duration::from_secs(10)), Some(0));
    assert!(stored_message(&dir.path().join("queue/queue.db"), &id).is_some());
    // New connections are refused once it stopped listening.
    assert!(tokio::net::TcpStream::connect(daemon.smtp).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_limits_and_refuses_a_bad_config() {
    let dns = zone().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("floodgate.toml");
    std::fs::write(
        &path,
        config_text(dir.path(), dns.addr, "max_recipients = 1", ""),
    )
    .unwrap();
    let daemon = Daemon::start(&path);

    let mut c = Smtp::connect(daemon.smtp).await;
    c.ehlo().await;
    c.cmd("MAIL FROM:<a@client.test>", "250").await;
    c.rcpt("u1@mx.test", "250").await;
    c.rcpt("u2@mx.test", "452 4.5.3").await;

    std::fs::write(
        &path,
        config_text(dir.path(), dns.addr, "max_recipients = 3", ""),
    )
    .unwrap();
    daemon.signal(libc::SIGHUP);
    daemon.wait_log("config reloaded", Duration::from_secs(10));
    let mut c = Smtp::connect(daemon.smtp).await;
    c.ehlo().await;
    c.cmd("MAIL FROM:<a@client.test>", "250").await;
    for i in 0..3 {
        c.rcpt(&format!("u{i}@mx.test"), "250").await;
    }

    std::fs::write(&path, "[smtp]\nthis_is_not_a_key = 1\n").unwrap();
    daemon.signal(libc::SIGHUP);
    let line = daemon.wait_log("reload refused", Duration::from_secs(10));
    assert!(line.contains("this_is_not_a_key"), "{line}");
    // The old config stays in force.
    let mut c = Smtp::connect(daemon.smtp).await;
    c.ehlo().await;
    c.cmd("MAIL FROM:<a@client.test>", "250").await;
    for i in 0..3 {
        c.rcpt(&format!("u{i}@mx.test"), "250").await;
    }
    c.rcpt("u4@mx.test", "452 4.5.3").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_accepted_is_lost_across_sigkill_during_delivery() {
    use common::sink::Sink;
    use std::collections::HashSet;

    let dns = zone().await;
    let sink = Sink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("floodgate.toml");
    // 40/s to the sink, so the burst is still being delivered when the daemon dies.
    let relay = format!(
        "[delivery]\nenabled = true\n[delivery.rates]\n\"mx.test\" = \"40/s\"\n\n[[route]]\ndomains = [\"*\"]\ntransport = \"mx\"\nport = {}\n",
        sink.addr.port()
    );
    std::fs::write(&path, config_text(dir.path(), dns.addr, "", &relay)).unwrap();

    let mut daemon = Daemon::start(&path);
    let mut c = Smtp::connect(daemon.smtp).await;
    c.ehlo().await;
    let total = 120;
    for i in 0..total {
        c.send_mail(
            "app@client.test",
            &["u@mx.test"],
            &message(&format!("n{i}"), ""),
        )
        .await;
    }
    // Some delivered, most not: kill mid-burst.
    while sink.received().len() < 10 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    let before = sink.received().len();
    assert!(
        before < total,
        "the burst finished before the kill ({before}); nothing was tested"
    );

    let _daemon = Daemon::start(&path);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let subjects = loop {
        let subjects: HashSet<String> = sink
            .received()
            .iter()
            .filter_map(|r| {
                let text = String::from_utf8_lossy(&r.data).into_owned();
                text.lines()
                    .find_map(|l| l.strip_prefix("Subject: ").map(str::to_owned))
            })
            .collect();
        if subjects.len() == total || tokio::time::Instant::now() > deadline {
            break subjects;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        subjects.len(),
        total,
        "every accepted message delivered at least once"
    );
}

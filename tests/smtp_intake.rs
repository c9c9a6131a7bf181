//! SMTP intake against a real DNS server on loopback: every row of the DESIGN.md reply
//! table, pipelining, limits, and what is (and is not) written to the queue.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::dns::{BlackholeDns, TestDns, Zone};
use common::floodgate::{Smtp, TestApp, message, stored_message};
use floodgate::clock::SystemClock;
use floodgate::reason::Reason;
use std::sync::Arc;

const LOCAL: Ipv4Addr = Ipv4Addr::LOCALHOST;

async fn zone() -> TestDns {
    TestDns::start(
        Zone::new()
            .mx("mx.test", 10, "mail.mx.test")
            .a("mail.mx.test", LOCAL)
            .null_mx("nullmx.test")
            .a("aonly.test", LOCAL)
            // `nomail.test` exists only as the parent of this name: no MX, no A.
            .a("host.nomail.test", LOCAL)
            .servfail("broken.test"),
    )
    .await
}

#[tokio::test]
async fn reply_table_rows_for_recipients() {
    let dns = zone().await;
    let t = TestApp::start("", "", dns.addr).await;
    let mut c = t.client().await;
    c.ehlo().await;
    c.cmd("MAIL FROM:<app@client.test>", "250 2.1.0").await;
    c.rcpt("", "501 5.1.3").await;
    c.rcpt("not-an-address", "501 5.1.3").await;
    c.rcpt("user@nx.test", "550 5.1.2").await;
    c.rcpt("user@nomail.test", "550 5.1.2").await;
    c.rcpt("user@nullmx.test", "556 5.1.10").await;
    c.rcpt("user@broken.test", "451 4.4.3").await;
    c.rcpt("user@aonly.test", "250 2.1.5").await;
    c.rcpt("user@mx.test", "250 2.1.5").await;
    let id = common::floodgate::queue_id(&c.data(&message("table", "")).await);
    let (_, _, rcpts) = stored_message(t.app.queue().path(), &id).expect("stored");
    let addresses: Vec<&str> = rcpts.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(
        addresses,
        ["user@aonly.test", "user@mx.test"],
        "only accepted recipients are queued"
    );
    c.cmd("QUIT", "221").await;
}

#[tokio::test]
async fn malformed_recipients_cost_no_dns_query_and_no_write() {
    let dns = zone().await;
    let t = TestApp::start("", "", dns.addr).await;
    let mut c = t.client().await;
    c.ehlo().await;
    c.cmd("MAIL FROM:<flood@client.test>", "250").await;
    for bad in [
        "",
        "a",
        "a@",
        "@b.test",
        "a b@c.test",
        "x@localhost",
        "x@[10.0.0.1]",
    ] {
        c.rcpt(bad, "501 5.1.3").await;
    }
    c.cmd("DATA", "503 5.5.1").await;
    // Refusals count once the transaction's campaign is final: here it ends without
    // DATA, so against the campaign known before DATA (the sender).
    c.cmd("RSET", "250").await;
    assert_eq!(dns.queries(), 0, "syntax refusals must not reach DNS");
    let counts = t.app.queue().count_by_state().await.unwrap();
    assert!(counts.is_empty(), "nothing queued: {counts:?}");
    let campaign = t.app.campaigns().get(Some("flood@client.test"));
    assert_eq!(campaign.failures(Reason::EmptyAddress), 1);
    assert_eq!(campaign.failures(Reason::MalformedAddress), 6);
}

#[tokio::test]
async fn dns_timeout_is_temporary() {
    let hole = BlackholeDns::start().await;
    let t = TestApp::start("", "", hole.addr).await;
    let mut c = t.client().await;
    c.ehlo().await;
    c.cmd("MAIL FROM:<a@client.test>", "250").await;
    c.rcpt("user@slow.test", "451 4.4.3").await;
    // The session goes on; the client may retry later.
    c.cmd("NOOP", "250").await;
}

#[tokio::test]
async fn a_flood_at_one_bad_domain_costs_one_lookup() {
    let dns = zone().await;
    let t = TestApp::start("max_recipients = 1000", "", dns.addr).await;
    let mut tasks = Vec::new();
    for s in 0..4 {
        let addr = t.smtp();
        tasks.push(tokio::spawn(async move {
            let mut c = Smtp::connect(addr).await;
            c.ehlo().await;
            c.cmd("MAIL FROM:<flood@client.test>", "250").await;
            // Pipelined: all RCPTs in one write, then all replies.
            let mut batch = String::new();
            for i in 0..250 {
                batch.push_str(&format!("RCPT TO:<user{s}-{i}@nx.test>\r\n"));
            }
            c.send(batch.as_bytes()).await;
            for _ in 0..250 {
                c.expect("550 5.1.2").await;
            }
            c.cmd("QUIT", "221").await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        dns.queries(),
        1,
        "1,000 recipients at nx.test cost one DNS query"
    );
    let c = t.app.campaigns().get(Some("flood@client.test"));
    assert_eq!(c.failures(Reason::NoSuchDomain), 1000);
}

#[tokio::test]
async fn no_route_is_refused() {
    let dns = zone().await;
    let routes = r#"
[[route]]
domains = ["mx.test"]
transport = "mx"
"#;
    let t = TestApp::start("", routes, dns.addr).await;
    let mut c = t.client().await;
    c.ehlo().await;
    c.cmd("MAIL FROM:<a@client.test>", "250").await;
    c.rcpt("user@aonly.test", "550 5.7.1").await;
    c.rcpt("user@mx.test", "250").await;
}

#[tokio::test]
async fn relay_is_denied_outside_allowed_networks() {
    let dns = zone().await;
    let t = TestApp::start(r#"allowed_networks = ["10.0.0.0/8"]"#, "", dns.addr).await;
    let mut c = t.client().await;
    c.ehlo().await;
    // The null sender is a valid sender (bounces use it).
    c.cmd("MAIL FROM:<>", "250").await;
    c.rcpt("user@mx.test", "554 5.7.1").await;
    c.cmd("DATA", "503").await;
    assert_eq!(dns.queries(), 0);
}

#[tokio::test]
async fn paused_campaign_and_paused_intake_get_451() {
    let dns = zone().await;
    let t = TestApp::start("", "", dns.addr).await;
    t.app
        .campaigns()
        .get(Some("promo@client.test"))
        .set_paused(true);
    let mut c = t.client().await;
    c.ehlo().await;
    c.cmd("MAIL FROM:<promo@client.test>", "250").await;
    c.rcpt("user@mx.test", "451 4.7.1").await;
    c.cmd("RSET", "250").await;
    // Another campaign is not affected...
    c.cmd("MAIL FROM:<billing@client.test>", "250").await;
    c.rcpt("user@mx.test", "250").await;
    c.cmd("RSET", "250").await;
    // ...unless its header names the paused campaign: checked again after DATA.
    c.cmd("MAIL FROM:<billing@client.test>", "250").await;
    c.rcpt("user@mx.test", "250").await;
    let reply = c
        .data(&message("x", "X-Campaign-ID: promo@client.test\r\n"))
        .await;
    assert!(reply.starts_with("451 4.7.1"), "{reply}");
    t.app.campaigns().set_intake_paused(true);
    c.cmd("MAIL FROM:<billing@client.test>", "250").await;
    c.rcpt("user@mx.test", "451 4.7.1").await;
    t.app.campaigns().set_intake_paused(false);
    c.rcpt("user@mx.test", "250").await;
}

#[tokio::test]
async fn long_lines_are_refused_without_ending_the_session() {
    let dns = zone().await;
    let t = TestApp::start("", "", dns.addr).await;
    let mut c = t.client().await;
    c.ehlo().await;
    // 1001 octets with CRLF: one over the limit.
    let line = format!("NOOP {}\r\n", "x".repeat(1001 - 7));
    c.send(line.as_bytes()).await;
    c.expect("500 5.5.2").await;
    // A 2 MB line, sent in pieces, is skipped without being held.
    let chunk = vec![b'y'; 64 * 1024];
    for _ in 0..32 {
        c.send(&chunk).await;
    }
    c.send(b"\r\n").await;
    c.expect("500 5.5.2").await;
    c.cmd("NOOP", "250").await;
    // Exactly 1000 octets is fine.
    let line = format!("NOOP {}\r\n", "x".repeat(1000 - 7));
    c.send(line.as_bytes()).await;
    c.expect("250").await;
}

#[tokio::test]
async fn oversized_messages_are_refused_and_the_session_goes_on() {
    let dns = zone().await;
    let t = TestApp::start("max_message_size = 10000", "", dns.addr).await;
    let mut c = t.client().await;
    let ehlo = c.ehlo().await;
    assert!(ehlo.contains("SIZE 10000"), "{ehlo}");
    c.cmd("MAIL FROM:<a@client.test> SIZE=20000", "552 5.3.4")
        .await;
    c.cmd("MAIL FROM:<a@client.test>", "250").await;
    c.rcpt("user@mx.test", "250").await;
    let big = format!(
        "Subject: big\r\n\r\n{}",
        "z".repeat(100).repeat(300).replace("zz", "z\r\n")
    );
    let reply = c.data(&big).await;
    assert!(reply.starts_with("552 5.3.4"), "{reply}");
    assert!(t.app.queue().count_by_state().await.unwrap().is_empty());
    // The next transaction works.
    c.send_mail("a@client.test", &["user@mx.test"], &message("small", ""))
        .await;
}

#[tokio::test]
async fn one_recipient_over_the_limit_gets_452() {
    let dns = zone().await;
    let t = TestApp::start("max_recipients = 3", "", dns.addr).await;
    let mut c = t.client().await;
    c.ehlo().await;
    c.cmd("MAIL FROM:<a@client.test>", "250").await;
    for i in 0..3 {
        c.rcpt(&format!("u{i}@mx.test"), "250").await;
    }
    c.rcpt("u3@mx.test", "452 4.5.3").await;
    let reply = c.data(&message("three", "")).await;
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
}

#[tokio::test]
async fn pipelined_transaction_gets_replies_in_order() {
    let dns = zone().await;
    let t = TestApp::start("", "", dns.addr).await;
    let mut c = t.client().await;
    c.send(b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<u1@mx.test>\r\nRCPT TO:<bad>\r\nRCPT TO:<u2@nx.test>\r\nRCPT TO:<u3@mx.test>\r\nDATA\r\n").await;
    let ehlo = c.expect("250-").await;
    assert!(ehlo.contains("PIPELINING"));
    c.expect("250 2.1.0").await;
    c.expect("250 2.1.5").await;
    c.expect("501 5.1.3").await;
    c.expect("550 5.1.2").await;
    c.expect("250 2.1.5").await;
    c.expect("354").await;
    c.send(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        .await;
    let reply = c.expect("250 2.0.0").await;
    c.expect("221").await;
    let id = common::floodgate::queue_id(&reply);
    let (_, body, rcpts) = stored_message(t.app.queue().path(), &id).unwrap();
    assert_eq!(rcpts.len(), 2);
    let body = String::from_utf8(body).unwrap();
    assert!(
        body.starts_with("Received: from client.test ([127.0.0.1])"),
        "{body}"
    );
    assert!(
        body.ends_with("Subject: pipelined\r\n\r\nbody\r\n"),
        "{body}"
    );
}

#[tokio::test]
async fn message_is_stored_dot_unstuffed_with_its_campaign() {
    let dns = zone().await;
    let t = TestApp::start("", "", dns.addr).await;
    let mut c = t.client().await;
    c.ehlo().await;
    let id = c
        .send_mail(
            "news@client.test",
            &["user@mx.test"],
            &message("hello", "X-Campaign-ID: spring-sale\r\n"),
        )
        .await;
    let stored = t.app.queue().message(&id).await.unwrap().expect("stored");
    assert_eq!(stored.campaign.as_deref(), Some("spring-sale"));
    let body = String::from_utf8(stored.body.unwrap()).unwrap();
    assert!(
        body.contains("\r\n.leading dot line\r\n"),
        "dot-unstuffed: {body}"
    );
    assert!(body.contains("for <user@mx.test>;"), "{body}");
    // Without the header, the envelope sender is the campaign.
    let id = c
        .send_mail("news@client.test", &["user@mx.test"], &message("hello", ""))
        .await;
    let stored = t.app.queue().message(&id).await.unwrap().unwrap();
    assert_eq!(stored.campaign.as_deref(), Some("news@client.test"));
    assert_eq!(
        t.app
            .campaigns()
            .get(Some("spring-sale"))
            .accepted
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn empty_message_and_bare_dot_are_handled() {
    let dns = zone().await;
    let t = TestApp::start("", "", dns.addr).await;
    let mut c = t.client().await;
    c.ehlo().await;
    c.cmd("MAIL FROM:<a@client.test>", "250").await;
    c.rcpt("user@mx.test", "250").await;
    c.cmd("DATA", "354").await;
    c.send(b".\r\n").await;
    let id = common::floodgate::queue_id(&c.expect("250 2.0.0").await);
    let (_, body, _) = stored_message(t.app.queue().path(), &id).unwrap();
    assert!(String::from_utf8(body).unwrap().starts_with("Received:"));
}

#[tokio::test]
async fn disk_full_gets_452_and_the_daemon_keeps_serving() {
    let dns = zone().await;
    // A 1 MiB cap on queue.db stands in for a full disk: SQLite reports SQLITE_FULL
    // either way.
    let t = TestApp::start_full("", "max_size_mb = 1", "", dns.addr, Arc::new(SystemClock)).await;
    let mut c = t.client().await;
    c.ehlo().await;
    let body = format!(
        "Subject: filler\r\n\r\n{}\r\n",
        "f".repeat(900)
            .repeat(100)
            .replace(&"f".repeat(900), &format!("{}\r\n", "f".repeat(900)))
    );
    let mut full = false;
    for _ in 0..40 {
        c.cmd("MAIL FROM:<a@client.test>", "250").await;
        c.rcpt("user@mx.test", "250").await;
        let reply = c.data(&body).await;
        if reply.starts_with("452 4.3.1") {
            full = true;
            break;
        }
        assert!(reply.starts_with("250"), "{reply}");
    }
    assert!(full, "the size cap was never reached");
    // Still serving: the session and a new connection both work, and a small
    // message that fits is not blocked by the failed one.
    c.cmd("NOOP", "250").await;
    let mut fresh = t.client().await;
    fresh.ehlo().await;
    let c = t.app.campaigns().get(Some("a@client.test"));
    assert_eq!(c.failures(Reason::QueueUnavailable), 1);
}

#[tokio::test]
async fn too_many_connections_get_421() {
    let dns = zone().await;
    let t = TestApp::start("max_connections_per_ip = 2", "", dns.addr).await;
    let _a = t.client().await;
    let _b = t.client().await;
    let mut third = Smtp::connect_raw(t.smtp()).await;
    third.expect("421 4.7.0").await;
    drop(_a);
    // The slot is released when the session ends.
    let start = std::time::Instant::now();
    loop {
        let mut again = Smtp::connect_raw(t.smtp()).await;
        let greeting = again.reply().await;
        if greeting.starts_with("220") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "slot never released: {greeting}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn too_many_bad_commands_close_the_session() {
    let dns = zone().await;
    let t = TestApp::start("max_bad_commands = 3", "", dns.addr).await;
    let mut c = t.client().await;
    for _ in 0..3 {
        c.cmd("BOGUS", "500 5.5.1").await;
    }
    c.cmd("BOGUS", "421 4.7.0").await;
    assert_eq!(c.reply().await, "", "connection closed");
}

#[tokio::test]
async fn sequence_errors_follow_the_state_machine() {
    let dns = zone().await;
    let t = TestApp::start("", "", dns.addr).await;
    let mut c = t.client().await;
    c.cmd("MAIL FROM:<a@client.test>", "503 5.5.1").await;
    c.ehlo().await;
    c.cmd("RCPT TO:<user@mx.test>", "503 5.5.1").await;
    c.cmd("DATA", "503 5.5.1").await;
    c.cmd("MAIL FROM:<a@client.test>", "250").await;
    c.cmd("MAIL FROM:<a@client.test>", "503 5.5.1").await;
    c.cmd("RSET", "250").await;
    c.cmd("VRFY someone", "252").await;
    c.cmd("HELP", "214").await;
    c.cmd("STARTTLS", "454 4.7.0").await;
    c.cmd("AUTH PLAIN", "502 5.5.1").await;
    c.cmd("HELO old.client", "250").await;
}

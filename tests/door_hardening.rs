//! Both doors against hostile and careless input, over real sockets to the real daemon
//! with a real receiving SMTP server: envelope and header injection (issue 9), lines the
//! next hop would refuse, bare line ends and smuggling sequences, UTF-8 domains,
//! idempotency under temporary failures, the HTTP client's address and bounces' source
//! (issue 10). HTTP requests in flight at SIGTERM: `tests/http_shutdown.rs`.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::floodgate::TestApp;
use common::sink::{RcptScript, Sink, SinkConfig};
use floodgate::clock::SystemClock;
use tokio::net::{TcpSocket, TcpStream};

const KEY: &str = "fg_test_key_0123456789";
const WAIT: Duration = Duration::from_secs(15);

fn zone() -> Zone {
    Zone::new()
        .mx("mx.test", 10, "mail.mx.test")
        .mx("good.test", 10, "mail.mx.test")
        .mx("client.test", 10, "mail.mx.test")
        .mx("xn--x-bga.b.test", 10, "mail.mx.test")
        .a("mail.mx.test", Ipv4Addr::LOCALHOST)
        .servfail("down.test")
}

fn extra(sink_port: u16, routes: &str, delivery_extra: &str) -> String {
    format!(
        r#"
[[http.api_keys]]
name = "crm"
key_sha256 = "{}"

[delivery]
enabled = true
connect_timeout = "2s"
command_timeout = "2s"
data_timeout = "2s"
{delivery_extra}

{routes}

[[route]]
domains = ["*"]
transport = "mx"
port = {sink_port}
"#,
        floodgate::http::api::key_hash(KEY)
    )
}

async fn start(sink: &Sink) -> (TestDns, TestApp) {
    start_with(sink, "", "").await
}

async fn start_with(sink: &Sink, routes: &str, delivery_extra: &str) -> (TestDns, TestApp) {
    let dns = TestDns::start(zone()).await;
    let t = TestApp::start_full(
        "",
        "",
        &extra(sink.addr.port(), routes, delivery_extra),
        dns.addr,
        Arc::new(SystemClock),
    )
    .await;
    (dns, t)
}

/// A POST with the `crm` key over `stream`.
async fn exchange_as_crm(
    stream: TcpStream,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> common::http::Response {
    let bearer = format!("Bearer {KEY}");
    let mut all = vec![("Authorization", bearer.as_str())];
    all.extend_from_slice(headers);
    common::http::exchange(stream, "POST", path, &all, body).await
}

async fn post(
    http: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, serde_json::Value) {
    let stream = TcpStream::connect(http).await.unwrap();
    let (status, h, text) = exchange_as_crm(stream, path, headers, body).await;
    (
        status,
        h,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

async fn send_json(http: SocketAddr, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let (status, _, json) = post(http, "/v1/messages", &[], body.to_string().as_bytes()).await;
    (status, json)
}

fn messages_in_queue(t: &TestApp) -> i64 {
    let conn = rusqlite::Connection::open(t.app.queue().path()).unwrap();
    conn.query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))
        .unwrap()
}

fn lines_over_998(data: &[u8]) -> Vec<usize> {
    data.split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l).len())
        .filter(|&n| n > 998)
        .collect()
}

#[tokio::test]
async fn an_injected_raw_sender_is_refused_and_nothing_extra_reaches_the_sink() {
    let sink = Sink::start().await;
    let (_dns, t) = start(&sink).await;
    let http = t.app.http_addr.unwrap();
    let exploit = "/v1/messages/raw?from=app%40client.test%3E%0D%0ARCPT%20TO%3A%3Cbcc%40nowhere.example%3E%0D%0ANOOP&to=victim%40good.test";
    let msg = b"From: app@client.test\r\nTo: victim@good.test\r\nSubject: hi\r\n\r\nHello.\r\n";
    let (status, _, json) = post(http, exploit, &[], msg).await;
    assert_eq!(status, 400, "{json}");
    assert_eq!(json["field"], "from", "{json}");
    let nul = "/v1/messages/raw?from=app%00%40client.test&to=victim%40good.test";
    let (status, _, json) = post(http, nul, &[], msg).await;
    assert_eq!(
        (status, json["field"].as_str()),
        (400, Some("from")),
        "{json}"
    );
    let rcpt = "/v1/messages/raw?from=app%40client.test&to=victim%40good.test%3E%0D%0ARSET";
    let (status, _, json) = post(http, rcpt, &[], msg).await;
    assert_eq!(
        (status, json["field"].as_str()),
        (400, Some("to[0]")),
        "{json}"
    );
    assert_eq!(messages_in_queue(&t), 0, "nothing refused was queued");

    let legit = "/v1/messages/raw?from=%3Capp%40client.test%3E&to=victim%40good.test";
    let (status, _, json) = post(http, legit, &[], msg).await;
    assert_eq!(status, 202, "{json}");
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].mail_from, "app@client.test");
    assert_eq!(got[0].rcpts, ["victim@good.test"]);
    let commands = sink.commands().join("\n");
    assert!(
        !commands.contains("nowhere") && !commands.contains("NOOP"),
        "{commands}"
    );
}

#[tokio::test]
async fn a_bad_smtp_sender_gets_501_5_1_7() {
    let sink = Sink::start().await;
    let (_dns, t) = start(&sink).await;
    let mut c = t.client().await;
    c.ehlo().await;
    for bad in [
        &b"MAIL FROM:<a\x01b@client.test>\r\n"[..],
        b"MAIL FROM:<\xff\xfe@client.test>\r\n",
        b"MAIL FROM:<a\x00b@client.test>\r\n",
    ] {
        c.send(bad).await;
        let reply = c.reply().await;
        assert!(reply.starts_with("501 5.1.7"), "{bad:?}: {reply}");
    }
    c.cmd("MAIL FROM:<>", "250").await;
    c.cmd("RSET", "250").await;
    let id = c
        .send_mail(
            "app@client.test",
            &["u@mx.test"],
            "Subject: ok\r\n\r\nok\r\n",
        )
        .await;
    let stored = t.app.queue().message(&id).await.unwrap().unwrap();
    assert_eq!(stored.sender, "app@client.test");
    assert_eq!(sink.wait_for(1, WAIT).await[0].mail_from, "app@client.test");
}

#[tokio::test]
async fn header_injection_in_the_json_api_is_refused_naming_the_field() {
    let sink = Sink::start().await;
    let (_dns, t) = start(&sink).await;
    let http = t.app.http_addr.unwrap();
    let base = serde_json::json!({"from": "app@client.test", "to": ["u@mx.test"], "subject": "s", "text": "t"});
    let with = |k: &str, v: serde_json::Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    for (body, field) in [
        (
            with("reply_to", "r@client.test\r\nX-Injected: yes".into()),
            "reply_to",
        ),
        (
            with(
                "attachments",
                serde_json::json!([{"filename": "a.txt", "content_type": "text/plain\r\nX-Injected: yes", "content": "aGk="}]),
            ),
            "attachments[0].content_type",
        ),
        (
            with(
                "attachments",
                serde_json::json!([{"filename": "a\r\nX-Injected: yes", "content_type": "text/plain", "content": "aGk="}]),
            ),
            "attachments[0].filename",
        ),
        (
            with("tags", serde_json::json!(["a\nX-Injected: yes"])),
            "tags[0]",
        ),
        (with("campaign", "c\r\nX-Injected: yes".into()), "campaign"),
        (serde_json::json!({"to": ["u@mx.test"]}), "from"),
    ] {
        let (status, json) = send_json(http, &body).await;
        assert_eq!(status, 400, "{body}: {json}");
        assert_eq!(json["field"], field, "{body}: {json}");
    }
    assert_eq!(messages_in_queue(&t), 0);
    let (status, json) = send_json(
        http,
        &with(
            "attachments",
            serde_json::json!([{"filename": "a.txt", "content_type": "text/plain", "content": "aGk="}]),
        ),
    )
    .await;
    assert_eq!(status, 202, "{json}");
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1);
    let data = String::from_utf8_lossy(&got[0].data);
    assert!(!data.contains("X-Injected"), "{data}");
}

#[tokio::test]
async fn a_json_text_line_of_5000_characters_arrives_encoded() {
    let sink = Sink::start().await;
    let (_dns, t) = start(&sink).await;
    let line = "0123456789".repeat(500);
    let (status, json) = send_json(
        t.app.http_addr.unwrap(),
        &serde_json::json!({"from": "app@client.test", "to": ["u@mx.test"], "subject": "long",
            "text": line, "html": format!("<p>{line}</p>"), "headers": {"X-Long": "word ".repeat(400)}}),
    )
    .await;
    assert_eq!(status, 202, "{json}");
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(lines_over_998(&got[0].data), Vec::<usize>::new());
    let data = String::from_utf8_lossy(&got[0].data);
    assert!(
        data.contains("Content-Transfer-Encoding: quoted-printable")
            || data.contains("Content-Transfer-Encoding: base64"),
        "{data}"
    );
}

#[tokio::test]
async fn a_body_line_over_998_octets_is_refused_at_the_end_of_data() {
    let sink = Sink::start().await;
    let (_dns, t) = start(&sink).await;
    let mut c = t.client().await;
    c.ehlo().await;
    c.cmd("MAIL FROM:<app@client.test>", "250").await;
    c.rcpt("u@mx.test", "250").await;
    let body = format!("Subject: long\r\n\r\n{}\r\n", "x".repeat(1500));
    let reply = c.data(&body).await;
    assert!(reply.starts_with("550 5.6.0"), "{reply}");
    assert!(reply.contains("line 3"), "{reply}");
    assert_eq!(messages_in_queue(&t), 0, "nothing queued");
    // The session goes on, and a relayable message is accepted and delivered.
    c.send_mail(
        "app@client.test",
        &["u@mx.test"],
        "Subject: ok\r\n\r\nshort\r\n",
    )
    .await;
    let got = sink.wait_for(1, WAIT).await;
    assert!(String::from_utf8_lossy(&got[0].data).contains("Subject: ok"));

    // Over HTTP raw, the same refusal names the body.
    let (status, _, json) = post(
        t.app.http_addr.unwrap(),
        "/v1/messages/raw?from=app%40client.test&to=u%40mx.test",
        &[],
        body.as_bytes(),
    )
    .await;
    assert_eq!(
        (status, json["field"].as_str()),
        (400, Some("body")),
        "{json}"
    );
}

#[tokio::test]
async fn a_long_to_header_is_folded_and_a_100_kb_token_is_refused() {
    let sink = Sink::start().await;
    let (_dns, t) = start(&sink).await;
    let to: Vec<String> = (0..100).map(|i| format!("rcpt{i:03}@mx.test")).collect();
    let to_header = format!("To: {}", to.join(", "));
    assert!(to_header.len() > 1600);
    let mut c = t.client().await;
    c.ehlo().await;
    c.send_mail(
        "app@client.test",
        &["u@mx.test"],
        &format!("{to_header}\r\nSubject: many\r\n\r\nhello\r\n"),
    )
    .await;
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(lines_over_998(&got[0].data), Vec::<usize>::new());
    let data = String::from_utf8_lossy(&got[0].data);
    let unfolded = data.replace("\r\n ", " ");
    assert!(unfolded.contains(&format!("{to_header}\r\n")), "{data}");
    assert!(data.contains(",\r\n rcpt"), "folded after a comma: {data}");

    c.cmd("MAIL FROM:<app@client.test>", "250").await;
    c.rcpt("u@mx.test", "250").await;
    let reply = c
        .data(&format!(
            "X-Token: {}\r\nSubject: huge\r\n\r\nhi\r\n",
            "t".repeat(100 * 1024)
        ))
        .await;
    assert!(reply.starts_with("550 5.6.0"), "{reply}");
    assert_eq!(
        messages_in_queue(&t),
        1,
        "only the folded message was queued"
    );
}

#[tokio::test]
async fn bare_line_ends_are_normalised_and_smuggling_never_splits_a_message() {
    let sink = Sink::start().await;
    let (_dns, t) = start(&sink).await;
    let sequences: [&[u8]; 6] = [
        b"\n.\r\n", b"\r.\r\n", b"\n.\n", b"\r\n.\r", b"\r\n.\n", b"\n.\r",
    ];
    let mut c = t.client().await;
    c.ehlo().await;
    for (i, seq) in sequences.iter().enumerate() {
        c.cmd("MAIL FROM:<app@client.test>", "250").await;
        c.rcpt("u@mx.test", "250").await;
        c.cmd("DATA", "354").await;
        let mut wire = format!("Subject: s{i}\r\n\r\nbefore").into_bytes();
        wire.extend_from_slice(seq);
        wire.extend_from_slice(
            b"MAIL FROM:<evil@client.test>\r\nRCPT TO:<x@mx.test>\r\nDATA\r\nsmuggled\r\n.\r\n",
        );
        c.send(&wire).await;
        let reply = c.reply().await;
        assert!(reply.starts_with("250 2.0.0"), "{seq:?}: {reply}");
    }
    // A last, plain message: once it and the others are in, anything split off would be
    // there too.
    c.send_mail(
        "app@client.test",
        &["u@mx.test"],
        "Subject: last\r\n\r\nend\r\n",
    )
    .await;
    let got = sink.wait_for(sequences.len() + 1, WAIT).await;
    assert_eq!(got.len(), sequences.len() + 1, "no message was split off");
    let smuggled: Vec<_> = got
        .iter()
        .filter(|m| !String::from_utf8_lossy(&m.data).contains("Subject: last"))
        .collect();
    assert_eq!(smuggled.len(), sequences.len());
    for m in smuggled {
        assert_eq!(m.mail_from, "app@client.test");
        assert_eq!(m.rcpts, ["u@mx.test"]);
        let data = &m.data;
        for (i, &b) in data.iter().enumerate() {
            if b == b'\n' {
                assert_eq!(
                    data[i - 1],
                    b'\r',
                    "bare LF in {:?}",
                    String::from_utf8_lossy(data)
                );
            }
            if b == b'\r' {
                assert_eq!(
                    data.get(i + 1),
                    Some(&b'\n'),
                    "bare CR in {:?}",
                    String::from_utf8_lossy(data)
                );
            }
        }
        let text = String::from_utf8_lossy(data);
        assert!(
            text.contains("before") && text.contains("smuggled"),
            "{text}"
        );
    }
    assert!(!sink.commands().iter().any(|l| l.contains("evil")));
}

#[tokio::test]
async fn utf8_domains_are_routed_as_a_labels() {
    let sink = Sink::start().await;
    let routes = format!(
        "[[route]]\ndomains = [\"*.b.test\"]\ntransport = \"mx\"\nport = {}\n\n[[route]]\ndomains = [\"xé.test\"]\ntransport = \"webhook\"\nurl = \"http://127.0.0.1:1/\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n",
        sink.addr.port()
    );
    let dns = TestDns::start(zone()).await;
    // Only these routes: `*` is left out, so a miss is a refusal, not a fallback.
    let extra = format!(
        "[[http.api_keys]]\nname = \"crm\"\nkey_sha256 = \"{}\"\n\n[delivery]\nenabled = true\n\n{routes}",
        floodgate::http::api::key_hash(KEY)
    );
    let t = TestApp::start_full("", "", &extra, dns.addr, Arc::new(SystemClock)).await;
    let mut c = t.client().await;
    c.ehlo().await;
    c.cmd("MAIL FROM:<app@client.test>", "250").await;
    c.rcpt("x@xé.test", "250").await;
    c.rcpt("x@yé.test", "550 5.7.1").await;
    c.rcpt("a@xé.b.test", "250").await;
    c.cmd("RSET", "250").await;
    c.send_mail(
        "app@client.test",
        &["a@XÉ.b.test"],
        "Subject: idn\r\n\r\nhi\r\n",
    )
    .await;
    let got = sink.wait_for(1, WAIT).await;
    // The sink offers no SMTPUTF8: the UTF-8 domain goes out as its A-label (RFC 6531
    // needs the extension only for a UTF-8 local part).
    assert_eq!(got[0].rcpts, ["a@xn--x-bga.b.test"]);
    let conn = rusqlite::Connection::open(t.app.queue().path()).unwrap();
    let domain: String = conn
        .query_row("SELECT domain FROM recipients", [], |r| r.get(0))
        .unwrap();
    assert_eq!(domain, "xn--x-bga.b.test");
}

#[tokio::test]
async fn temporary_refusals_are_not_remembered_and_a_changed_request_is_refused() {
    let sink = Sink::start().await;
    let (_dns, t) = start(&sink).await;
    let http = t.app.http_addr.unwrap();
    let down =
        serde_json::json!({"from": "app@client.test", "to": ["u@down.test"], "subject": "s"});
    for _ in 0..2 {
        let (status, headers, json) = post(
            http,
            "/v1/messages",
            &[("Idempotency-Key", "k-down")],
            down.to_string().as_bytes(),
        )
        .await;
        assert_eq!(status, 503, "{json}");
        assert_eq!(json["recipients"][0]["enhanced_code"], "4.4.3", "{json}");
        assert!(
            headers.iter().any(|(k, _)| k == "retry-after"),
            "{headers:?}"
        );
    }
    let conn = rusqlite::Connection::open(t.app.queue().path()).unwrap();
    let remembered: i64 = conn
        .query_row("SELECT COUNT(*) FROM idempotency", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        remembered, 0,
        "a temporary refusal is not stored under its key"
    );

    let good = serde_json::json!({"from": "app@client.test", "to": ["u@mx.test"], "subject": "s"});
    let key = [("Idempotency-Key", "k-1")];
    let (s1, _, first) = post(http, "/v1/messages", &key, good.to_string().as_bytes()).await;
    assert_eq!(s1, 202, "{first}");
    let other = serde_json::json!({"from": "app@client.test", "to": ["v@mx.test"], "subject": "s"});
    let (s2, _, json) = post(http, "/v1/messages", &key, other.to_string().as_bytes()).await;
    assert_eq!(s2, 422, "{json}");
    let (s3, _, again) = post(http, "/v1/messages", &key, good.to_string().as_bytes()).await;
    assert_eq!((s3, &again["id"]), (202, &first["id"]));
    assert_eq!(messages_in_queue(&t), 1);
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got[0].rcpts, ["u@mx.test"]);
}

#[tokio::test]
async fn the_received_header_names_the_http_client() {
    let sink = Sink::start().await;
    let (_dns, t) = start(&sink).await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let stream = socket.connect(t.app.http_addr.unwrap()).await.unwrap();
    let body = serde_json::json!({"from": "app@client.test", "to": ["u@mx.test"], "subject": "s", "text": "t"});
    let (status, _, text) =
        exchange_as_crm(stream, "/v1/messages", &[], body.to_string().as_bytes()).await;
    assert_eq!(status, 202, "{text}");
    let got = sink.wait_for(1, WAIT).await;
    let data = String::from_utf8_lossy(&got[0].data);
    assert!(
        data.starts_with("Received: from crm ([127.0.0.2])"),
        "{data}"
    );
}

#[tokio::test]
async fn bounces_are_recorded_as_bounces() {
    let sink = Sink::start_with(SinkConfig {
        rcpt: Box::new(|r| {
            if r.starts_with("gone") {
                RcptScript::Reply(550, "5.1.1 no such user")
            } else {
                RcptScript::Accept
            }
        }),
        ..SinkConfig::default()
    })
    .await;
    let (_dns, t) = start_with(&sink, "", "bounces = true").await;
    let mut c = t.client().await;
    c.ehlo().await;
    c.send_mail(
        "app@client.test",
        &["gone@mx.test"],
        "Subject: b\r\n\r\nhi\r\n",
    )
    .await;
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got[0].mail_from, "", "the bounce, from the null sender");
    let conn = rusqlite::Connection::open(t.app.queue().path()).unwrap();
    let sources: Vec<String> = conn
        .prepare("SELECT source FROM messages ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(sources, ["smtp", "bounce"]);
}

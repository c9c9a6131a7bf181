//! The JSON send API against the running daemon: every documented status, idempotent
//! repeats, size limits without buffering, and a message sent over HTTP delivered over
//! SMTP. The OpenAPI document in docs/openapi.yaml is checked against what the server
//! actually answers.

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::floodgate::{TestApp, admin, message};
use common::http::{header, read_response, request};
use common::sink::Sink;
use floodgate::clock::SystemClock;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const KEY: &str = "fg_test_key_0123456789";
const SLOW_KEY: &str = "fg_rate_limited_key_42";

fn key_sha(key: &str) -> String {
    floodgate::http::api::key_hash(key)
}

async fn start(sink_port: u16, queue_extra: &str) -> (TestDns, TestApp) {
    let dns = TestDns::start(
        Zone::new()
            .mx("mx.test", 10, "mail.mx.test")
            .a("mail.mx.test", Ipv4Addr::LOCALHOST),
    )
    .await;
    let extra = format!(
        r#"
[[http.api_keys]]
name = "crm"
key_sha256 = "{}"
campaign = "crm-default"

[[http.api_keys]]
name = "slow"
key_sha256 = "{}"
rate = "2/m"

[delivery]
enabled = true

[[route]]
domains = ["*"]
transport = "mx"
port = {sink_port}
"#,
        key_sha(KEY),
        key_sha(SLOW_KEY)
    );
    let t = TestApp::start_full("", queue_extra, &extra, dns.addr, Arc::new(SystemClock)).await;
    (dns, t)
}

fn auth(key: &str) -> String {
    format!("Bearer {key}")
}

async fn send(
    addr: SocketAddr,
    body: &serde_json::Value,
    extra: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, serde_json::Value) {
    let bearer = auth(KEY);
    let mut headers = vec![
        ("Authorization", bearer.as_str()),
        ("Content-Type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    let (status, h, text) = request(
        addr,
        "POST",
        "/v1/messages",
        &headers,
        body.to_string().as_bytes(),
    )
    .await;
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    (status, h, json)
}

#[tokio::test]
async fn a_message_sent_over_http_is_delivered_over_smtp() {
    let sink = Sink::start().await;
    let (_dns, t) = start(sink.addr.port(), "").await;
    let http = t.app.http_addr.unwrap();
    let (status, _, json) = send(
        http,
        &serde_json::json!({
            "from": "Billing <billing@client.test>",
            "to": ["Ann <ann@mx.test>", "bad address", "x@nx.test"],
            "bcc": ["audit@mx.test"],
            "subject": "Your invoice",
            "text": "Hello Ann",
            "html": "<p>Hello Ann</p>",
            "headers": {"X-Ticket": "42"},
            "attachments": [{"filename": "invoice.txt", "content_type": "text/plain", "content": "SW52b2ljZQ=="}],
            "tags": ["billing"],
            "metadata": {"customer": 7}
        }),
        &[],
    )
    .await;
    assert_eq!(status, 202, "{json}");
    let results = json["recipients"].as_array().unwrap();
    assert_eq!(results[0]["status"], "accepted");
    assert_eq!(results[1]["status"], "rejected");
    assert_eq!(results[1]["code"], 501);
    assert_eq!(results[1]["enhanced_code"], "5.1.3");
    assert_eq!(results[2]["reason"], "no_such_domain");
    assert_eq!(results[3]["status"], "accepted");
    assert_eq!(json["campaign"], "crm-default");
    let got = sink.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(got[0].mail_from, "billing@client.test");
    assert_eq!(got[0].rcpts, ["ann@mx.test", "audit@mx.test"]);
    let body = String::from_utf8_lossy(&got[0].data);
    assert!(body.contains("Subject: Your invoice"), "{body}");
    assert!(body.contains("X-Ticket: 42"), "{body}");
    assert!(body.contains("invoice.txt"), "{body}");
    assert!(
        !body.contains("audit@mx.test"),
        "bcc stays out of the headers: {body}"
    );
    assert!(body.contains("with HTTP id"), "{body}");
}

#[tokio::test]
async fn raw_messages_take_their_envelope_from_the_query() {
    let sink = Sink::start().await;
    let (_dns, t) = start(sink.addr.port(), "").await;
    let http = t.app.http_addr.unwrap();
    let bearer = auth(KEY);
    let (status, _, body) = request(
        http,
        "POST",
        "/v1/messages/raw?from=app%40client.test&to=u1%40mx.test&to=u2%40mx.test&campaign=raw-test",
        &[
            ("Authorization", &bearer),
            ("Content-Type", "message/rfc822"),
        ],
        message("raw", "").replace("\r\n", "\n").as_bytes(),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let got = sink.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(got[0].rcpts, ["u1@mx.test", "u2@mx.test"]);
    assert!(
        String::from_utf8_lossy(&got[0].data).contains("Subject: raw\r\n"),
        "bare LFs become CRLF"
    );
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let stored = t.app.queue().message(&id).await.unwrap().unwrap();
    assert_eq!(stored.campaign.as_deref(), Some("raw-test"));
}

#[tokio::test]
async fn an_idempotent_repeat_returns_the_same_id_and_enqueues_once() {
    let (_dns, t) = start(1, "").await;
    let http = t.app.http_addr.unwrap();
    let req = serde_json::json!({"from": "a@client.test", "to": ["u@mx.test"], "subject": "once"});
    let (s1, _, first) = send(http, &req, &[("Idempotency-Key", "order-77")]).await;
    let (s2, _, second) = send(http, &req, &[("Idempotency-Key", "order-77")]).await;
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(first["id"], second["id"]);
    let (_, _, third) = send(http, &req, &[("Idempotency-Key", "order-78")]).await;
    assert_ne!(first["id"], third["id"]);
    let conn = rusqlite::Connection::open(t.app.queue().path()).unwrap();
    let n: i64 = conn
        .query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2, "the repeat was not queued again");
}

#[tokio::test]
async fn a_huge_body_is_refused_without_being_read() {
    let (_dns, t) = start(1, "").await;
    let http = t.app.http_addr.unwrap();
    // Declares 50 MB and sends almost nothing: the answer must come without the rest.
    let mut stream = TcpStream::connect(http).await.unwrap();
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {}\r\n\r\n{{\"from\":",
        50 * 1024 * 1024
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let (status, _, _) = read_response(&mut stream).await;
    assert_eq!(status, 413);
    // Chunked, with no length up front: reading stops at the limit.
    let mut stream = TcpStream::connect(http).await.unwrap();
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b' '; 1024 * 1024];
    let mut status = 0;
    for _ in 0..50 {
        let frame = format!("{:x}\r\n", chunk.len());
        if stream.write_all(frame.as_bytes()).await.is_err()
            || stream.write_all(&chunk).await.is_err()
            || stream.write_all(b"\r\n").await.is_err()
        {
            break;
        }
    }
    let (s, _, _) = read_response(&mut stream).await;
    if s != 0 {
        status = s;
    }
    assert_eq!(status, 413);
}

/// Every documented (path, method, status) is produced by a scenario here, and every
/// scenario's status is documented.
#[tokio::test]
async fn the_openapi_document_matches_the_server() {
    let (_dns, t) = start(1, "max_size_mb = 1").await;
    let http = t.app.http_addr.unwrap();
    let admin_addr = t.app.admin_addr.unwrap();
    let bearer = auth(KEY);
    let slow = auth(SLOW_KEY);
    let good = serde_json::json!({"from": "a@client.test", "to": ["u@mx.test"], "subject": "s", "text": "t"}).to_string();
    let raw_ok = "/v1/messages/raw?from=a%40client.test&to=u%40mx.test";
    let mut seen: BTreeSet<(String, String, u16)> = BTreeSet::new();
    let mut check = |path: &str, status: u16, want: u16, what: &str| {
        assert_eq!(status, want, "{what}");
        let path = path.split('?').next().unwrap().to_owned();
        seen.insert((path, "post".into(), status));
    };

    for (path, body, ctype) in [
        ("/v1/messages", good.clone(), "application/json"),
        (raw_ok, message("x", ""), "message/rfc822"),
    ] {
        let (s, _, b) = request(
            http,
            "POST",
            path,
            &[("Authorization", &bearer), ("Content-Type", ctype)],
            body.as_bytes(),
        )
        .await;
        check(path, s, 202, &format!("accepted: {b}"));
        let (s, h, _) = request(
            http,
            "POST",
            path,
            &[("Content-Type", ctype)],
            body.as_bytes(),
        )
        .await;
        check(path, s, 401, "no key");
        assert_eq!(header(&h, "www-authenticate"), Some("Bearer"));
        let (s, _, _) = request(
            http,
            "POST",
            path,
            &[("Authorization", "Bearer nope")],
            body.as_bytes(),
        )
        .await;
        check(path, s, 401, "wrong key");
        let huge = format!("{}", 36 * 1024 * 1024);
        let mut stream = TcpStream::connect(http).await.unwrap();
        stream
            .write_all(format!("POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: {bearer}\r\nContent-Length: {huge}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (s, _, _) = read_response(&mut stream).await;
        check(path, s, 413, "too large");
    }
    // 400: malformed JSON and a bad field, each naming the field.
    let (s, _, b) = request(
        http,
        "POST",
        "/v1/messages",
        &[("Authorization", &bearer)],
        b"{\"from\": ",
    )
    .await;
    check("/v1/messages", s, 400, "broken JSON");
    assert!(b.contains("error"), "{b}");
    let (s, _, b) = request(
        http,
        "POST",
        "/v1/messages",
        &[("Authorization", &bearer)],
        br#"{"from":"a@client.test","to":["u@mx.test", 7]}"#,
    )
    .await;
    check("/v1/messages", s, 400, "a number as an address");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&b).unwrap()["field"],
        "to[1]",
        "{b}"
    );
    let (s, _, b) = request(
        http,
        "POST",
        "/v1/messages",
        &[("Authorization", &bearer)],
        br#"{"from":"a@client.test","too":["u@mx.test"]}"#,
    )
    .await;
    check("/v1/messages", s, 400, "unknown field");
    assert!(b.contains("too"), "{b}");
    let (s, _, _) = request(
        http,
        "POST",
        "/v1/messages/raw?to=u%40mx.test",
        &[("Authorization", &bearer)],
        b"Subject: x\r\n\r\nx\r\n",
    )
    .await;
    check("/v1/messages/raw", s, 400, "no envelope sender");
    // 422: every recipient rejected.
    let (s, _, b) = request(
        http,
        "POST",
        "/v1/messages",
        &[("Authorization", &bearer)],
        br#"{"from":"a@client.test","to":["", "x@nx.test"]}"#,
    )
    .await;
    check("/v1/messages", s, 422, "all rejected");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&b).unwrap()["recipients"][1]["code"],
        550
    );
    let (s, _, _) = request(
        http,
        "POST",
        "/v1/messages/raw?from=a%40client.test&to=bad",
        &[("Authorization", &bearer)],
        b"Subject: x\r\n\r\nx\r\n",
    )
    .await;
    check("/v1/messages/raw", s, 422, "raw, all rejected");
    // 429: over the key's rate (2 a minute), and for a paused campaign.
    for path in ["/v1/messages", raw_ok] {
        let body = if path == raw_ok {
            message("x", "")
        } else {
            good.clone()
        };
        let mut last = 0;
        let mut retry = None;
        for _ in 0..3 {
            let (s, h, _) = request(
                http,
                "POST",
                path,
                &[("Authorization", &slow)],
                body.as_bytes(),
            )
            .await;
            last = s;
            retry = header(&h, "retry-after").map(str::to_owned);
        }
        check(path, last, 429, "over the key's rate");
        assert!(retry.is_some(), "Retry-After on 429");
    }
    admin(
        admin_addr,
        "POST",
        "/admin/v1/campaigns/crm-default/pause",
        None,
    )
    .await;
    for path in ["/v1/messages", raw_ok] {
        let body = if path == raw_ok {
            message("x", "X-Campaign-ID: crm-default\r\n")
        } else {
            good.clone()
        };
        let (s, h, _) = request(
            http,
            "POST",
            path,
            &[("Authorization", &bearer)],
            body.as_bytes(),
        )
        .await;
        check(path, s, 429, "paused campaign");
        assert!(header(&h, "retry-after").is_some());
    }
    admin(
        admin_addr,
        "POST",
        "/admin/v1/campaigns/crm-default/resume",
        None,
    )
    .await;
    // 409: the same Idempotency-Key while another request with it is still being sent.
    // Two such requests send their headers and stall in the body: whichever the server
    // reads first holds the key, and the other is answered 409 at once. (A key per path:
    // the next pair does not wait for this pair's hold to be released.)
    for (i, path) in ["/v1/messages", raw_ok].into_iter().enumerate() {
        let key = format!("same-{i}");
        let mut pair = Vec::new();
        for _ in 0..2 {
            let mut stream = TcpStream::connect(http).await.unwrap();
            stream
                .write_all(format!("POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: {bearer}\r\nIdempotency-Key: {key}\r\nContent-Length: 100\r\n\r\n{{").as_bytes())
                .await
                .unwrap();
            pair.push(stream);
        }
        let [mut a, mut b] = <[TcpStream; 2]>::try_from(pair).unwrap();
        let (s, _, _) = tokio::select! {
            r = read_response(&mut a) => r,
            r = read_response(&mut b) => r,
        };
        check(path, s, 409, "concurrent duplicate");
    }
    // 503: intake paused, then a queue that cannot be written (a 1 MiB cap, filled).
    admin(admin_addr, "POST", "/admin/v1/intake/pause", None).await;
    for path in ["/v1/messages", raw_ok] {
        let (s, h, _) = request(
            http,
            "POST",
            path,
            &[("Authorization", &bearer)],
            good.as_bytes(),
        )
        .await;
        check(path, s, 503, "intake paused");
        assert!(header(&h, "retry-after").is_some());
    }
    admin(admin_addr, "POST", "/admin/v1/intake/resume", None).await;
    let filler = serde_json::json!({"from": "a@client.test", "to": ["u@mx.test"], "text": "f".repeat(200_000)}).to_string();
    let mut full = false;
    for _ in 0..20 {
        let (s, h, _) = request(
            http,
            "POST",
            "/v1/messages",
            &[("Authorization", &bearer)],
            filler.as_bytes(),
        )
        .await;
        if s == 503 {
            assert!(header(&h, "retry-after").is_some());
            check("/v1/messages", s, 503, "queue full");
            full = true;
            break;
        }
    }
    assert!(full, "the queue never filled");
    let (s, _, _) = request(
        http,
        "POST",
        raw_ok,
        &[("Authorization", &bearer)],
        "f".repeat(400_000).replace("ff", "f\n").as_bytes(),
    )
    .await;
    check(raw_ok, s, 503, "raw, queue full");
    // Unknown paths and wrong methods (not API operations, so not in the document).
    assert_eq!(request(http, "GET", "/v1/messages", &[], b"").await.0, 405);
    assert_eq!(request(http, "POST", "/v2/other", &[], b"").await.0, 404);

    let documented = documented_operations();
    let missing: Vec<_> = documented.difference(&seen).collect();
    let undocumented: Vec<_> = seen.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "documented but never produced: {missing:?}"
    );
    assert!(
        undocumented.is_empty(),
        "produced but not documented: {undocumented:?}"
    );
}

fn documented_operations() -> BTreeSet<(String, String, u16)> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml")).unwrap();
    let doc: serde_json::Value = serde_norway::from_str(&text).expect("docs/openapi.yaml parses");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        // Batch sends: tests/batch.rs checks them against the document.
        if path.starts_with("/v1/batches") {
            continue;
        }
        for (method, op) in item.as_object().unwrap() {
            // Path-level `servers`, and the admin API (tag admin), which tests/openapi.rs
            // checks against the admin listener.
            let Some(responses) = op.get("responses") else {
                continue;
            };
            if op["tags"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t == "admin"))
            {
                continue;
            }
            for status in responses.as_object().unwrap().keys() {
                ops.insert((path.clone(), method.clone(), status.parse().unwrap()));
            }
        }
    }
    ops
}

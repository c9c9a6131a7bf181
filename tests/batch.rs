//! Batch sends against the running daemon, a real DNS server and a real receiving SMTP
//! server on loopback: a 20,000-row streamed upload counted exactly and delivered with
//! each recipient's own variables; a CSV chunk; an Idempotency-Key'd chunk repeated; a
//! template that does not compile; a variable missing at render time; a batch paused
//! by the guard mid-stream, its stream still read and counted.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::floodgate::TestApp;
use common::http::{read_response, request};
use common::sink::Sink;
use floodgate::clock::SystemClock;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const KEY: &str = "fg_batch_key_0123456789";

async fn start(sink_port: u16, guard: &str) -> (TestDns, TestApp) {
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

[delivery]
enabled = true

{guard}

[[route]]
domains = ["*"]
transport = "mx"
port = {sink_port}
"#,
        floodgate::http::api::key_hash(KEY)
    );
    let t = TestApp::start_full("", "", &extra, dns.addr, Arc::new(SystemClock)).await;
    (dns, t)
}

fn http(t: &TestApp) -> SocketAddr {
    t.app.http_addr.expect("http listening")
}

async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    extra: &[(&str, &str)],
    body: &[u8],
) -> (u16, Value) {
    let bearer = format!("Bearer {KEY}");
    let mut headers = vec![
        ("Authorization", bearer.as_str()),
        ("Content-Type", content_type),
    ];
    headers.extend_from_slice(extra);
    let (status, _, text) = request(addr, method, path, &headers, body).await;
    let value = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }));
    (status, value)
}

async fn create(addr: SocketAddr, template: Value) -> String {
    let (status, body) = call(
        addr,
        "POST",
        "/v1/batches",
        "application/json",
        &[],
        template.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

async fn status(addr: SocketAddr, id: &str) -> Value {
    let (code, body) = call(addr, "GET", &format!("/v1/batches/{id}"), "", &[], b"").await;
    assert_eq!(code, 200, "{body}");
    body
}

fn header_of(data: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    let prefix = format!("{name}: ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
}

/// Polls the batch until `done` holds (the deliveries are asynchronous).
async fn wait_status(addr: SocketAddr, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let s = status(addr, id).await;
        if done(&s) {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "batch never got there: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_rows_in_one_stream_are_counted_exactly_and_rendered_each() {
    let sink = Sink::start().await;
    let (_dns, t) = start(sink.addr.port(), "[guard]\nenabled = false").await;
    let addr = http(&t);
    let id = create(
        addr,
        json!({
            "from": "App <app@client.test>", "campaign": "activation",
            "subject": "Hello {{ name }}", "text": "Your code is {{ code }}.",
            "headers": {"X-Code": "{{ code }}"}
        }),
    )
    .await;
    let mut body = String::new();
    for i in 0..20_000u32 {
        let line = match i % 4 {
            0 | 2 => {
                let n = i / 2;
                json!({"to": format!("u{n}@mx.test"), "vars": {"name": format!("n{n}"), "code": n}})
                    .to_string()
            }
            1 if i % 8 == 1 => json!({"to": ""}).to_string(),
            1 => "{not json".to_owned(),
            _ => json!({"to": format!("x{i}@nx.test"), "vars": {"name": "x"}}).to_string(),
        };
        body.push_str(&line);
        body.push('\n');
    }
    let (code, r) = call(
        addr,
        "POST",
        &format!("/v1/batches/{id}/recipients"),
        "application/x-ndjson",
        &[],
        body.as_bytes(),
    )
    .await;
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["received"], 20_000);
    assert_eq!(r["accepted"], 10_000);
    assert_eq!(
        r["rejected"],
        json!({"empty_address": 2500, "malformed_row": 2500, "no_such_domain": 5000})
    );
    let rejections = r["rejections"].as_array().unwrap();
    assert_eq!(rejections.len(), 100);
    assert_eq!(rejections[0]["line"], 2);
    assert_eq!(rejections[0]["reason"], "empty_address");
    assert_eq!(rejections[1]["line"], 4);
    assert_eq!(rejections[1]["reason"], "no_such_domain");
    assert_eq!(rejections[2]["line"], 6);
    assert_eq!(rejections[2]["reason"], "malformed_row");

    let got = sink.wait_for(10_000, Duration::from_secs(240)).await;
    let mut seen = std::collections::BTreeSet::new();
    for m in &got {
        assert_eq!(m.rcpts.len(), 1, "one recipient per rendered message");
        let to = &m.rcpts[0];
        let n: u32 = to
            .strip_prefix('u')
            .and_then(|s| s.strip_suffix("@mx.test"))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("unexpected recipient {to}"));
        assert_eq!(
            header_of(&m.data, "Subject").as_deref(),
            Some(&*format!("Hello n{n}"))
        );
        assert_eq!(header_of(&m.data, "X-Code"), Some(n.to_string()));
        assert!(
            String::from_utf8_lossy(&m.data).contains(&format!("Your code is {n}.")),
            "{}",
            String::from_utf8_lossy(&m.data)
        );
        assert!(seen.insert(n), "{to} delivered twice");
    }
    assert_eq!(seen.len(), 10_000);
    let s = wait_status(addr, &id, |s| s["delivered"] == 10_000).await;
    assert_eq!(s["accepted"], 10_000);
    assert_eq!(s["received"], 20_000);
    assert_eq!(s["queued"], 0);
    assert_eq!(s["failed"], 0);
    t.scheduler_pass().await;
    assert_eq!(sink.received().len(), 10_000, "nothing else arrives");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_chunks_idempotent_repeats_and_template_errors() {
    let sink = Sink::start().await;
    let (_dns, t) = start(sink.addr.port(), "[guard]\nenabled = false").await;
    let addr = http(&t);

    let (code, r) = call(
        addr,
        "POST",
        "/v1/batches",
        "application/json",
        &[],
        json!({"from": "app@client.test", "subject": "ok", "text": "line one\nline two {{ broken\n"})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(code, 400, "{r}");
    assert_eq!(
        (r["field"].as_str(), r["line"].as_u64()),
        (Some("text"), Some(2))
    );
    let (code, r) = call(
        addr,
        "POST",
        "/v1/batches",
        "application/json",
        &[],
        json!({"from": "app@client.test", "subject": "a\r\nBcc: x@y.test"})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!((code, r["field"].as_str()), (400, Some("subject")), "{r}");

    let id = create(
        addr,
        json!({"from": "app@client.test", "subject": "Hi {{ name }}", "text": "from {{ city }}"}),
    )
    .await;
    let csv =
        "to,name,city\r\nann@mx.test,Ann,Paris\r\nbob@mx.test,\"Bob, Jr\",Oslo\r\n,Nobody,Rome\r\n";
    let path = format!("/v1/batches/{id}/recipients");
    let chunk = |key: &'static str, body: &'static str, ct: &'static str| {
        let path = path.clone();
        async move {
            call(
                addr,
                "POST",
                &path,
                ct,
                &[("Idempotency-Key", key)],
                body.as_bytes(),
            )
            .await
        }
    };
    let (code, first) = chunk("chunk-1", csv, "text/csv").await;
    assert_eq!(code, 200, "{first}");
    assert_eq!(first["accepted"], 2);
    assert_eq!(first["rejected"], json!({"empty_address": 1}));
    assert_eq!(first["rejections"][0]["line"], 4);
    let (code, again) = chunk("chunk-1", csv, "text/csv").await;
    assert_eq!(
        (code, &again),
        (200, &first),
        "a repeat is answered, not queued"
    );
    // The same rows with LF line ends are the same chunk; other rows under its key are
    // refused, and queue nothing.
    let lf: &'static str = Box::leak(csv.replace("\r\n", "\n").into_boxed_str());
    let (code, again) = chunk("chunk-1", lf, "text/csv").await;
    assert_eq!((code, &again), (200, &first), "{again}");
    let other = "to,name,city\r\ncy@mx.test,Cy,Lima\r\n";
    let (code, r) = chunk("chunk-1", other, "text/csv").await;
    assert_eq!(code, 422, "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("different content"),
        "{r}"
    );

    // Strict: a row without `city` fails at render, class `template`.
    let ndjson = "{\"to\":\"cy@mx.test\",\"vars\":{\"name\":\"Cy\"}}\n";
    let (code, r) = chunk("chunk-2", ndjson, "application/x-ndjson").await;
    assert_eq!((code, r["accepted"].as_u64()), (200, Some(1)), "{r}");

    let s = wait_status(addr, &id, |s| s["delivered"] == 2 && s["failed"] == 1).await;
    assert_eq!(s["failed_template"], 1, "{s}");
    assert_eq!(s["accepted"], 3);
    assert_eq!(s["received"], 4);
    t.scheduler_pass().await;
    let got = sink.received();
    assert_eq!(got.len(), 2, "the repeat queued nothing");
    let bob = got.iter().find(|m| m.rcpts == ["bob@mx.test"]).unwrap();
    assert_eq!(
        header_of(&bob.data, "Subject").as_deref(),
        Some("Hi Bob, Jr")
    );
    assert!(String::from_utf8_lossy(&bob.data).contains("from Oslo"));

    // The same counters through the admin API, `floodgate ctl` and its --json.
    let admin = t.app.admin_addr.unwrap();
    let table = common::floodgate::ctl(admin, &["batches"]).await;
    assert!(table.contains(&id) && table.contains("BATCH"), "{table}");
    let one: Value =
        serde_json::from_str(&common::floodgate::ctl(admin, &["--json", "batch", &id]).await)
            .unwrap();
    assert_eq!(
        (one["delivered"].as_u64(), one["failed_template"].as_u64()),
        (Some(2), Some(1))
    );
    let words = common::floodgate::ctl(admin, &["batch", &id]).await;
    assert!(words.contains("empty_address"), "{words}");

    let (code, _) = call(addr, "GET", "/v1/batches/NOSUCH", "", &[], b"").await;
    assert_eq!(code, 404);
    let (code, _) = call(addr, "POST", &path, "application/json", &[], b"{}").await;
    assert_eq!(code, 415);

    // /metrics counts what happened: one batch, two chunks read (the repeats are
    // replays), one refused, four rows of which three were queued, two renders and one
    // failure to render.
    let (_, text) = common::floodgate::http(
        admin,
        "GET",
        "/metrics",
        Some(common::floodgate::TOKEN),
        None,
    )
    .await;
    let value = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
    };
    assert_eq!(value("floodgate_batches_created_total"), 1);
    assert_eq!(value("floodgate_batch_chunks_total"), 2);
    assert_eq!(value("floodgate_batch_chunks_refused_total"), 1);
    assert_eq!(value("floodgate_batch_rows_received_total"), 4);
    assert_eq!(value("floodgate_batch_rows_accepted_total"), 3);
    assert_eq!(
        value("floodgate_batch_upload_bytes_total"),
        (csv.len() + ndjson.len()) as u64
    );
    assert_eq!(value("floodgate_batch_renders_total"), 2);
    assert_eq!(value("floodgate_batch_render_failures_total"), 1);
    let rendered = value("floodgate_batch_rendered_bytes_total");
    let received: usize = got.iter().map(|m| m.data.len()).sum();
    assert!(
        rendered > 0 && rendered <= received as u64,
        "{rendered} rendered, {received} received"
    );
}

/// Writes a request whose body arrives in two parts, with `between` run in the middle.
async fn two_part_upload(
    addr: SocketAddr,
    path: &str,
    first: &[u8],
    second: &[u8],
    between: impl std::future::Future<Output = ()>,
) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/x-ndjson\r\nContent-Length: {}\r\n\r\n",
        first.len() + second.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(first).await.unwrap();
    stream.flush().await.unwrap();
    between.await;
    stream.write_all(second).await.unwrap();
    let (status, _, text) = read_response(&mut stream).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mostly_bad_batch_is_paused_by_the_guard_mid_stream_and_still_counted() {
    let sink = Sink::start().await;
    let guard = "[guard]\nenabled = true\nwindow = \"60s\"\nmin_events = 200\nfailure_ratio = 0.5\naction = \"pause\"";
    let (_dns, t) = start(sink.addr.port(), guard).await;
    let addr = http(&t);
    let id = create(
        addr,
        json!({"from": "app@client.test", "campaign": "bad-list", "subject": "Hi"}),
    )
    .await;
    let mut first = String::new();
    for i in 0..1000 {
        let to = if i % 10 == 0 {
            format!("ok{i}@mx.test")
        } else {
            format!("gone{i}@nx.test")
        };
        first.push_str(&json!({"to": to}).to_string());
        first.push('\n');
    }
    let mut second = String::new();
    for i in 0..1000 {
        second.push_str(&json!({"to": format!("late{i}@mx.test")}).to_string());
        second.push('\n');
    }
    let path = format!("/v1/batches/{id}/recipients");
    let (code, r) = two_part_upload(addr, &path, first.as_bytes(), second.as_bytes(), async {
        wait_status(addr, &id, |s| s["state"] == "paused").await;
    })
    .await;
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["state"], "paused");
    // Every row is counted exactly once. The guard's tick may fall while the first part
    // is still being read, so where the first part's rows end up varies; every row of
    // the second part comes after the pause.
    assert_eq!(r["received"], 2000);
    let accepted = r["accepted"].as_u64().unwrap();
    let rejected = r["rejected"].as_object().unwrap();
    let paused = rejected["campaign_paused"].as_u64().unwrap();
    let nxdomain = rejected
        .get("no_such_domain")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    assert_eq!(accepted + paused + nxdomain, 2000, "{r}");
    assert!(paused >= 1000 && accepted <= 100 && nxdomain <= 900, "{r}");
    let s = status(addr, &id).await;
    assert_eq!(
        (s["received"].as_u64(), s["accepted"].as_u64()),
        (Some(2000), Some(accepted))
    );
    assert_eq!(&s["rejected"], &r["rejected"]);
    t.scheduler_pass().await;
    assert!(
        sink.received().is_empty(),
        "a paused campaign sends nothing"
    );
}

fn http_of(daemon: &common::floodgate::Daemon) -> SocketAddr {
    let line = daemon.wait_log("http listening", Duration::from_secs(20));
    line.split("addr=")
        .nth(1)
        .and_then(|a| a.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_cut_by_sigkill_is_retried_with_its_key_and_nothing_is_queued_twice() {
    let sink = Sink::start().await;
    let dns = TestDns::start(
        Zone::new()
            .mx("mx.test", 10, "mail.mx.test")
            .a("mail.mx.test", Ipv4Addr::LOCALHOST),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("floodgate.toml");
    let extra = format!(
        "[[http.api_keys]]\nname = \"crm\"\nkey_sha256 = \"{}\"\n\n[delivery]\nenabled = true\n\n[guard]\nenabled = false\n\n[[route]]\ndomains = [\"*\"]\ntransport = \"mx\"\nport = {}\n",
        floodgate::http::api::key_hash(KEY),
        sink.addr.port()
    );
    std::fs::write(
        &path,
        common::floodgate::config_text(dir.path(), dns.addr, "", &extra),
    )
    .unwrap();
    let mut daemon = common::floodgate::Daemon::start(&path);
    let addr = http_of(&daemon);
    let id = create(
        addr,
        json!({"from": "app@client.test", "subject": "Hi {{ n }}"}),
    )
    .await;
    let rows: Vec<String> = (0..3000)
        .map(|n| {
            format!(
                "{}\n",
                json!({"to": format!("r{n}@mx.test"), "vars": {"n": n}})
            )
        })
        .collect();
    let body: String = rows.concat();
    let upload = format!("/v1/batches/{id}/recipients");

    // The first 2,000 rows go out, are committed (the batch counts them), then the
    // daemon is killed before the stream ends: no response ever comes.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {upload} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/x-ndjson\r\nIdempotency-Key: chunk-7\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
        .write_all(rows[..2000].concat().as_bytes())
        .await
        .unwrap();
    stream.flush().await.unwrap();
    let before = wait_status(addr, &id, |s| s["accepted"] == 2000).await;
    assert_eq!(before["received"], 2000);
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    drop(stream);

    // Restarted on the same queue. A retry under the key whose first rows differ from
    // those committed is refused and queues nothing.
    let daemon = common::floodgate::Daemon::start(&path);
    let addr = http_of(&daemon);
    let mut changed = rows.clone();
    changed[1999] = format!("{}\n", json!({"to": "other@mx.test", "vars": {"n": 0}}));
    let (code, r) = call(
        addr,
        "POST",
        &upload,
        "application/x-ndjson",
        &[("Idempotency-Key", "chunk-7")],
        changed.concat().as_bytes(),
    )
    .await;
    assert_eq!(code, 422, "{r}");
    let (code, r) = call(
        addr,
        "POST",
        &upload,
        "application/x-ndjson",
        &[("Idempotency-Key", "chunk-7")],
        rows[..1000].concat().as_bytes(),
    )
    .await;
    assert_eq!(code, 422, "shorter than what was committed: {r}");
    assert_eq!(status(addr, &id).await["accepted"], 2000);
    // The client retries the whole chunk with its key.
    let (code, r) = call(
        addr,
        "POST",
        &upload,
        "application/x-ndjson",
        &[("Idempotency-Key", "chunk-7")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(code, 200, "{r}");
    assert_eq!(
        (r["received"].as_u64(), r["accepted"].as_u64()),
        (Some(3000), Some(3000))
    );
    let s = wait_status(addr, &id, |s| s["delivered"] == 3000).await;
    assert_eq!(
        (s["accepted"].as_u64(), s["received"].as_u64()),
        (Some(3000), Some(3000)),
        "{s}"
    );
    assert_eq!(s["queued"], 0);
    // Deliveries are at least once (a kill between the 250 and its record repeats
    // one); every row is delivered, and none was queued twice.
    let delivered: std::collections::BTreeSet<String> = sink
        .received()
        .iter()
        .flat_map(|m| m.rcpts.clone())
        .collect();
    let want: std::collections::BTreeSet<String> =
        (0..3000).map(|n| format!("r{n}@mx.test")).collect();
    assert_eq!(delivered, want);
    let queue_db = dir.path().join("queue/queue.db");
    let conn = rusqlite::Connection::open(&queue_db).unwrap();
    let rows_stored: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM recipients WHERE vars IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows_stored, 3000, "each row queued once");
}

/// What the batch routes answer is what docs/openapi.yaml documents, and the reverse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_routes_match_the_openapi_document() {
    let sink = Sink::start().await;
    let (_dns, t) = start(sink.addr.port(), "[guard]\nenabled = false").await;
    let addr = http(&t);
    let mut seen = std::collections::BTreeSet::new();
    let mut note = |path: &str, method: &str, status: u16| {
        seen.insert((path.to_owned(), method.to_owned(), status));
    };
    let create_path = "/v1/batches";
    let id = create(addr, json!({"from": "app@client.test", "subject": "Hi"})).await;
    note(create_path, "post", 201);
    let (s, _) = call(
        addr,
        "POST",
        create_path,
        "application/json",
        &[],
        b"{\"subject\": \"{{ x\"}",
    )
    .await;
    note(create_path, "post", s);
    let (s, _, _) = request(addr, "POST", create_path, &[], b"{}").await;
    note(create_path, "post", s);

    let rcpts = "/v1/batches/{id}/recipients";
    let upload = format!("/v1/batches/{id}/recipients");
    for (ct, body) in [
        ("application/x-ndjson", "{\"to\":\"a@mx.test\"}\n"),
        ("text/csv", "email\na@mx.test\n"),
        ("application/json", "{}"),
    ] {
        let (s, _) = call(addr, "POST", &upload, ct, &[], body.as_bytes()).await;
        note(rcpts, "post", s);
    }
    let (s, _) = call(
        addr,
        "POST",
        "/v1/batches/NOSUCH/recipients",
        "text/csv",
        &[],
        b"to\n",
    )
    .await;
    note(rcpts, "post", s);
    let (s, _, _) = request(addr, "POST", &upload, &[], b"").await;
    note(rcpts, "post", s);
    // A second upload under a key still in progress.
    let (s, _) = two_part_upload_keyed(addr, &upload, "busy", async {
        let (s, _) = call(
            addr,
            "POST",
            &upload,
            "application/x-ndjson",
            &[("Idempotency-Key", "busy")],
            b"",
        )
        .await;
        assert_eq!(s, 409);
    })
    .await;
    note(rcpts, "post", s);
    note(rcpts, "post", 409);
    // A key used again for other rows.
    for body in ["{\"to\":\"k@mx.test\"}\n", "{\"to\":\"other@mx.test\"}\n"] {
        let key = [("Idempotency-Key", "reused")];
        let (s, _) = call(
            addr,
            "POST",
            &upload,
            "application/x-ndjson",
            &key,
            body.as_bytes(),
        )
        .await;
        note(rcpts, "post", s);
    }

    let one = "/v1/batches/{id}";
    for path in [format!("/v1/batches/{id}"), "/v1/batches/NOSUCH".to_owned()] {
        let (s, _) = call(addr, "GET", &path, "", &[], b"").await;
        note(one, "get", s);
    }
    let (s, _, _) = request(addr, "GET", &format!("/v1/batches/{id}"), &[], b"").await;
    note(one, "get", s);

    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml")).unwrap();
    let doc: Value = serde_norway::from_str(&text).unwrap();
    let mut documented = std::collections::BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        if !path.starts_with("/v1/batches") {
            continue;
        }
        for (method, op) in item.as_object().unwrap() {
            for status in op["responses"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, _)| k)
            {
                documented.insert((path.clone(), method.clone(), status.parse::<u16>().unwrap()));
            }
        }
    }
    assert_eq!(seen, documented, "produced and documented");
}

/// A keyed upload whose body is held half-sent while `between` runs.
async fn two_part_upload_keyed(
    addr: SocketAddr,
    path: &str,
    key: &str,
    between: impl std::future::Future<Output = ()>,
) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let body = b"{\"to\":\"k1@mx.test\"}\n{\"to\":\"k2@mx.test\"}\n";
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/x-ndjson\r\nIdempotency-Key: {key}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..20]).await.unwrap();
    stream.flush().await.unwrap();
    // The first request holds its key once its head is read.
    tokio::time::sleep(Duration::from_millis(500)).await;
    between.await;
    stream.write_all(&body[20..]).await.unwrap();
    let (status, _, text) = read_response(&mut stream).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Batch mail is campaign mail: each rendered message carries its recipient's one-click
/// unsubscribe link (added before signing, as for the doors' messages), and once the
/// recipient used it, the next chunk's row for them is refused at the door as suppressed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_mail_carries_one_click_unsubscribe_and_the_door_then_refuses_the_row() {
    let sink = Sink::start().await;
    let unsubscribe = r#"
[guard]
enabled = false

[suppression.unsubscribe]
enabled = true
campaigns = ["spring"]
base_url = "https://mail.test/u/"
secret = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
listen = "127.0.0.1:0"
"#;
    let (_dns, t) = start(sink.addr.port(), unsubscribe).await;
    let addr = http(&t);
    let public = t.app.unsubscribe_addr.expect("unsubscribe listener");
    let id = create(
        addr,
        json!({"from": "app@client.test", "campaign": "spring",
               "subject": "Hi {{ name }}", "text": "Sale."}),
    )
    .await;
    let rows = |names: &[&str]| {
        names
            .iter()
            .map(|n| json!({"to": format!("{n}@mx.test"), "vars": {"name": n}}).to_string() + "\n")
            .collect::<String>()
    };
    let path = format!("/v1/batches/{id}/recipients");
    let nd = "application/x-ndjson";
    let (code, r) = call(
        addr,
        "POST",
        &path,
        nd,
        &[],
        rows(&["ann", "bob"]).as_bytes(),
    )
    .await;
    assert_eq!((code, &r["accepted"]), (200, &json!(2)), "{r}");

    let got = sink.wait_for(2, Duration::from_secs(60)).await;
    let ann = got.iter().find(|m| m.rcpts == ["ann@mx.test"]).unwrap();
    let ann = String::from_utf8_lossy(&ann.data).into_owned();
    assert!(
        ann.contains("List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"),
        "{ann}"
    );
    let at = ann
        .find("<https://mail.test/u/")
        .expect("List-Unsubscribe URL")
        + 18;
    let token_path = &ann[at..at + ann[at..].find('>').unwrap()];
    let bob = got.iter().find(|m| m.rcpts == ["bob@mx.test"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&bob.data).contains(token_path),
        "each recipient has a token of their own"
    );

    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let (status, _, page) = request(
        public,
        "POST",
        token_path,
        &form,
        b"List-Unsubscribe=One-Click",
    )
    .await;
    assert_eq!(status, 200, "{page}");

    // The next chunk: ann is refused (suppressed for spring), bob goes on.
    let (code, r) = call(
        addr,
        "POST",
        &path,
        nd,
        &[],
        rows(&["ann", "bob"]).as_bytes(),
    )
    .await;
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["accepted"], 1, "{r}");
    assert_eq!(r["rejected"], json!({"suppressed": 1}), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_attachments_and_dot_lines_arrive_intact_for_every_recipient() {
    use base64::Engine as _;
    let sink = Sink::start().await;
    let (_dns, t) = start(sink.addr.port(), "[guard]\nenabled = false").await;
    let addr = http(&t);
    // Every byte value, so a decode or copy that drops or changes one shows.
    let bytes: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    let id = create(
        addr,
        json!({"from": "app@client.test", "campaign": "files",
               "subject": "Report for {{ name }}",
               "text": "Hello {{ name }}\n.a line that starts with a dot\n..and two\n.",
               "attachments": [{"filename": "data.bin",
                                "content_type": "application/octet-stream",
                                "content": base64::engine::general_purpose::STANDARD.encode(&bytes)}]}),
    )
    .await;
    let rows: String = ["ann", "bob", "cy"]
        .iter()
        .map(|n| json!({"to": format!("{n}@mx.test"), "vars": {"name": n}}).to_string() + "\n")
        .collect();
    let path = format!("/v1/batches/{id}/recipients");
    let (code, r) = call(
        addr,
        "POST",
        &path,
        "application/x-ndjson",
        &[],
        rows.as_bytes(),
    )
    .await;
    assert_eq!((code, &r["accepted"]), (200, &json!(3)), "{r}");

    let got = sink.wait_for(3, Duration::from_secs(60)).await;
    for name in ["ann", "bob", "cy"] {
        let m = got
            .iter()
            .find(|m| m.rcpts == [format!("{name}@mx.test")])
            .unwrap_or_else(|| panic!("{name} got nothing"));
        let text = String::from_utf8_lossy(&m.data).into_owned();
        assert!(text.contains(&format!("Hello {name}\r\n")), "{text}");
        assert!(
            text.contains("\r\n.a line that starts with a dot\r\n..and two\r\n.\r\n"),
            "dot lines come back as written once unstuffed: {text}"
        );
        let part = text
            .find("filename=\"data.bin\"")
            .expect("the attachment part");
        let start = part + text[part..].find("\r\n\r\n").unwrap() + 4;
        let end = start + text[start..].find("\r\n--").unwrap();
        let encoded: String = text[start..end].split("\r\n").collect();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .expect("base64 attachment");
        assert_eq!(decoded, bytes, "{name}'s attachment is the template's");
    }
}

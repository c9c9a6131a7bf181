//! The HTTP door at SIGTERM, against the real binary: a request in flight is answered
//! within `shutdown_grace` (issue 10, item 9), so a committed message never loses its 202.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::floodgate::{Daemon, config_text};
use common::http::read_response;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const KEY: &str = "fg_test_key_0123456789";

fn zone() -> Zone {
    Zone::new()
        .mx("mx.test", 10, "mail.mx.test")
        .a("mail.mx.test", Ipv4Addr::LOCALHOST)
}

async fn probe(http: SocketAddr) -> u16 {
    let mut s = TcpStream::connect(http).await.unwrap();
    s.write_all(
        b"POST /v1/nothing HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    )
    .await
    .unwrap();
    read_response(&mut s).await.0
}

/// A request still arriving when SIGTERM comes is answered within `shutdown_grace`, even
/// after the 5 s the rest of shutdown takes at most.
#[tokio::test]
async fn an_http_request_in_flight_at_sigterm_still_gets_its_202() {
    let dns = TestDns::start(zone()).await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        dir.path(),
        dns.addr,
        "",
        &format!(
            "[[http.api_keys]]\nname = \"crm\"\nkey_sha256 = \"{}\"\n",
            floodgate::http::api::key_hash(KEY)
        ),
    )
    .replace("shutdown_grace = \"5s\"", "shutdown_grace = \"20s\"");
    let path = dir.path().join("floodgate.toml");
    std::fs::write(&path, text).unwrap();
    let mut daemon = Daemon::start(&path);
    let line = daemon.wait_log("http listening", Duration::from_secs(10));
    let http: SocketAddr = line
        .split("addr=")
        .nth(1)
        .and_then(|a| a.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    let body = serde_json::json!({"from": "app@client.test", "to": ["u@mx.test"], "subject": "s"})
        .to_string();
    let mut stream = TcpStream::connect(http).await.unwrap();
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let (first, rest) = body.as_bytes().split_at(10);
    stream.write_all(first).await.unwrap();
    // The request is being read: a probe on a second connection proves the server took
    // the first one's headers before SIGTERM.
    assert_eq!(probe(http).await, 404);
    daemon.signal(libc::SIGTERM);
    daemon.wait_log("shutting down", Duration::from_secs(10));
    // Longer than the writer's 5 s join wait: without draining, the process is gone.
    tokio::time::sleep(Duration::from_secs(6)).await;
    stream.write_all(rest).await.unwrap();
    let (status, _, text) = read_response(&mut stream).await;
    assert_eq!(status, 202, "{text}");
    assert_eq!(daemon.wait(Duration::from_secs(20)), Some(0));
}

//! The dashboard in a real browser: Debian's chromium, headless, driven through
//! chromedriver's W3C WebDriver HTTP API. A campaign floods the daemon with bad recipients;
//! the operator logs in (a wrong token first), finds the campaign at the top with its
//! failure ratio, and clicks Pause; the admin API confirms the campaign is paused.
//!
//! Needs `chromium` and `chromium-driver` (`.ci/run` installs them), hence `#[ignore]`:
//! run with `cargo test --test dashboard -- --ignored`. A screenshot of the dashboard is
//! left in `target/tmp/dashboard.png` for a human to look at.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::dns::{TestDns, Zone};
use common::floodgate::{Smtp, TOKEN, TestApp, admin, message};
use serde_json::{Value, json};

const FLOOD: &str = "spring-sale@client.test";
const GOOD: &str = "receipts@client.test";
/// The W3C name of the key under which an element reference is returned.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Guard off: the click, not the guard, must be what pauses the campaign.
const CONFIG: &str = r#"
[faillog]
mode = "full"
rows_per_sec = 20
burst = 50
flush_interval = "200ms"

[guard]
enabled = false
"#;

/// chromedriver on a loopback port, killed when dropped.
struct Driver {
    child: Child,
    addr: SocketAddr,
    _profile: tempfile::TempDir,
    session: String,
}

impl Driver {
    async fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (apt-get install chromium-driver)");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        // Owned by `d` from here on, so that a panic below still kills chromedriver.
        let mut d = Driver {
            child,
            addr,
            session: String::new(),
            _profile: tempfile::tempdir().expect("profile dir"),
        };
        let start = Instant::now();
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                let (status, body) = request(addr, "GET", "/status", None).await;
                if status == 200 && body.contains("\"ready\":true") {
                    break;
                }
            }
            // A readiness wait, not a measurement: a cold chromedriver on a busy 2-core
            // machine has taken over 20 s.
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "chromedriver did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-dev-shm-usage",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--window-size=1440,1100",
            &format!("--user-data-dir={}", d._profile.path().display()),
        ];
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": args },
        }}});
        let v = d.call("POST", "/session", caps).await;
        d.session = v["sessionId"].as_str().expect("session id").to_owned();
        d
    }

    /// One WebDriver command; returns its `value`, panicking on a WebDriver error.
    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let body = body.to_string();
        let body = (method == "POST").then_some(body.as_str());
        let (status, text) = request(self.addr, method, path, body).await;
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text}"));
        assert_eq!(status, 200, "{method} {path}: {text}");
        v["value"].clone()
    }

    async fn session(&self, method: &str, path: &str, body: Value) -> Value {
        let path = format!("/session/{}{path}", self.session);
        self.call(method, &path, body).await
    }

    async fn goto(&self, url: &str) {
        self.session("POST", "/url", json!({ "url": url })).await;
    }

    /// Runs `script` in the page (arguments as `arguments[i]`), returning its value.
    async fn js(&self, script: &str, args: Value) -> Value {
        self.session(
            "POST",
            "/execute/sync",
            json!({ "script": script, "args": args }),
        )
        .await
    }

    /// Waits until `script` returns something truthy; returns it.
    async fn wait_for(&self, what: &str, script: &str) -> Value {
        let start = Instant::now();
        loop {
            let v = self.js(script, json!([])).await;
            if !(v.is_null() || v == false || v == "") {
                return v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .session(
                "POST",
                "/element",
                json!({ "using": "css selector", "value": css }),
            )
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_owned()
    }

    async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.session("POST", &format!("/element/{id}/click"), json!({}))
            .await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.session("POST", &format!("/element/{id}/clear"), json!({}))
            .await;
        self.session(
            "POST",
            &format!("/element/{id}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    async fn screenshot(&self, name: &str) -> std::path::PathBuf {
        let b64 = self.session("GET", "/screenshot", Value::Null).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().expect("base64 screenshot"))
            .expect("valid base64");
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        std::fs::write(&path, png).expect("write screenshot");
        eprintln!("screenshot: {}", path.display());
        path
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Ending the session closes the browser; do it even when the test failed, so no
        // chromium outlives the test. Blocking is fine here: the test is over.
        if !self.session.is_empty() {
            use std::io::{Read, Write};
            if let Ok(mut s) = std::net::TcpStream::connect(self.addr) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = write!(
                    s,
                    "DELETE /session/{} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                    self.session, self.addr
                );
                let _ = s.read_to_end(&mut Vec::new());
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 exchange with chromedriver, which keeps connections open whatever the
/// client asks, so the answer is read by its length (hyper) rather than to the close.
async fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect chromedriver");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("http handshake");
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(body.unwrap_or("").to_owned())))
        .expect("request");
    let exchange = async {
        let response = sender
            .send_request(req)
            .await
            .expect("chromedriver answers");
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(60), exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer within 60 s"))
}

/// Keeps sending one good recipient and a batch of bad ones for the flooding campaign, so
/// that rates and sparklines have something to show, until the task is aborted.
async fn keep_flooding(smtp: SocketAddr) {
    let mut c = Smtp::connect(smtp).await;
    c.ehlo().await;
    let mut n = 0;
    loop {
        c.cmd(&format!("MAIL FROM:<{GOOD}>"), "250").await;
        c.rcpt("someone@good.test", "250").await;
        c.data(&message("receipt", "")).await;
        c.cmd(&format!("MAIL FROM:<{FLOOD}>"), "250").await;
        for _ in 0..20 {
            n += 1;
            // 550 while active; 451 once paused. Either way, refused at the door.
            let reply = reply_to(&mut c, &format!("RCPT TO:<u{n}@nx.test>")).await;
            assert!(
                reply.starts_with("550") || reply.starts_with("451"),
                "{reply}"
            );
        }
        c.cmd("RSET", "250").await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// Sends one command and returns its reply, whatever it is.
async fn reply_to(c: &mut Smtp, line: &str) -> String {
    c.send(format!("{line}\r\n").as_bytes()).await;
    c.reply().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium and chromedriver (installed by .ci/run)"]
async fn an_operator_finds_the_failing_campaign_and_pauses_it() {
    let dns = TestDns::start(
        Zone::new()
            .mx("good.test", 10, "mx.good.test")
            .a("mx.good.test", Ipv4Addr::LOCALHOST),
    )
    .await;
    let t = TestApp::start("", CONFIG, dns.addr).await;
    let admin_addr = t.app.admin_addr.expect("admin listener");
    let flood = tokio::spawn(keep_flooding(t.smtp()));

    let d = Driver::start().await;
    d.goto(&format!("http://{admin_addr}/")).await;

    // A wrong token is refused with a clear message, and the dashboard stays hidden.
    d.type_into("#token", "not-the-token").await;
    d.click("#login-submit").await;
    let error = d
        .wait_for(
            "the wrong-token error",
            "const e = document.getElementById('login-error'); return !e.hidden && e.textContent;",
        )
        .await;
    assert!(error.as_str().unwrap().contains("401"), "{error}");
    let hidden = d
        .js(
            "return document.getElementById('dashboard').hidden;",
            json!([]),
        )
        .await;
    assert_eq!(hidden, true);
    d.screenshot("dashboard-login.png").await;

    d.type_into("#token", TOKEN).await;
    d.click("#login-submit").await;

    // The flooding campaign is listed first, with its failure ratio.
    let ratio = d
        .wait_for(
            "the flooding campaign's row with its ratio",
            &format!(
                "const r = document.querySelector('#campaign-rows tr'); \
                 return r && r.dataset.campaign === '{FLOOD}' && \
                 r.querySelector('td[data-field=ratio] .pct').textContent;"
            ),
        )
        .await;
    assert_eq!(ratio, "100.0 %");
    let state = d
        .js(
            &format!(
                "return document.querySelector('tr[data-campaign=\"{FLOOD}\"]').dataset.state;"
            ),
            json!([]),
        )
        .await;
    assert_eq!(state, "active");
    // Let a few samples accumulate so that rates and sparklines are drawn.
    d.wait_for(
        "a failure rate",
        "const r = document.getElementById('rate-failures').textContent; return r !== '–' && r;",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    d.screenshot("dashboard.png").await;

    d.click(&format!(
        "tr[data-campaign=\"{FLOOD}\"] button[data-action=\"pause\"]"
    ))
    .await;

    // The admin API, not the page, is the judge.
    let start = Instant::now();
    loop {
        let list = admin(admin_addr, "GET", "/admin/v1/campaigns", None).await;
        let c = list
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == FLOOD)
            .cloned()
            .expect("flooding campaign listed");
        if c["state"] == "paused" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "not paused: {c}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let good = admin(admin_addr, "GET", "/admin/v1/campaigns", None).await;
    let good = good
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == GOOD)
        .cloned();
    assert_eq!(good.expect("good campaign listed")["state"], "active");

    // And the page says so, in words.
    let shown = d
        .wait_for(
            "the paused state on the page",
            &format!(
                "const r = document.querySelector('tr[data-campaign=\"{FLOOD}\"]'); \
                 return r && r.dataset.state === 'paused' && \
                 r.querySelector('td[data-field=state]').textContent;"
            ),
        )
        .await;
    assert_eq!(shown, "PAUSED");
    d.screenshot("dashboard-paused.png").await;

    // The failure-log selector switches the mode live.
    d.click("#faillog-mode option[value=\"aggregate\"]").await;
    let start = Instant::now();
    while admin(admin_addr, "GET", "/admin/v1/faillog", None).await["settings"]["mode"]
        != "aggregate"
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "failure log not switched"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    flood.abort();
}

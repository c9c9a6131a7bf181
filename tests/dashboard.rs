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
use common::floodgate::{Smtp, TOKEN, TestApp, admin, http, message};
use serde_json::{Value, json};

const FLOOD: &str = "spring-sale@client.test";
const GOOD: &str = "receipts@client.test";
/// The W3C name of the key under which an element reference is returned.
const ELEMENT: &str = "element-6066-11e4-a52f-4f735466cecf";

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
        let start = Instant::now();
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                let (status, body) = http(addr, "GET", "/status", None, None).await;
                if status == 200 && body.contains("\"ready\":true") {
                    break;
                }
            }
            assert!(start.elapsed() < Duration::from_secs(20), "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().expect("profile dir");
        let mut d = Driver {
            child,
            addr,
            session: String::new(),
            _profile: profile,
        };
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
        let (status, text) = http(self.addr, method, path, None, body).await;
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}: {text}"));
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
        self.session("POST", "/execute/sync", json!({ "script": script, "args": args }))
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
            .session("POST", "/element", json!({ "using": "css selector", "value": css }))
            .await;
        v[ELEMENT].as_str().expect("element id").to_owned()
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
        self.session("POST", &format!("/element/{id}/value"), json!({ "text": text }))
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
        // The session's browser exits with chromedriver; a leftover one would hold the
        // profile directory open.
        if !self.session.is_empty() {
            let _ = std::process::Command::new("true").status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
            let reply = c.reply_to(&format!("RCPT TO:<u{n}@nx.test>")).await;
            assert!(reply.starts_with("550") || reply.starts_with("451"), "{reply}");
        }
        c.cmd("RSET", "250").await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

trait ReplyTo {
    async fn reply_to(&mut self, line: &str) -> String;
}

impl ReplyTo for Smtp {
    async fn reply_to(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }
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
    let hidden = d.js("return document.getElementById('dashboard').hidden;", json!([])).await;
    assert_eq!(hidden, true);

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
            &format!("return document.querySelector('tr[data-campaign=\"{FLOOD}\"]').dataset.state;"),
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

    d.click(&format!("tr[data-campaign=\"{FLOOD}\"] button[data-action=\"pause\"]"))
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
    let good = good.as_array().unwrap().iter().find(|c| c["name"] == GOOD).cloned();
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
    d.session("DELETE", "", Value::Null).await;
    flood.abort();
}

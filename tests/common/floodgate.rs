//! Floodgate under test: its config, the daemon in-process (`App`) or as the real binary,
//! and a raw SMTP line client whose calls read like transcripts.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use floodgate::app::{App, Deps};
use floodgate::clock::{Clock, SystemClock};
use floodgate::config::Config;
use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::TcpStream;

pub const TOKEN: &str = "test-admin-token-0123456789";

/// A config for tests: loopback listeners on port 0, the queue in `dir`, DNS at `dns`,
/// quick timeouts. `extra` is appended and may add or override tables.
pub fn config_text(dir: &Path, dns: SocketAddr, smtp_extra: &str, extra: &str) -> String {
    config_text_with_queue(dir, dns, smtp_extra, "", extra)
}

/// As [`config_text`], with extra `[queue]` keys.
pub fn config_text_with_queue(
    dir: &Path,
    dns: SocketAddr,
    smtp_extra: &str,
    queue_extra: &str,
    extra: &str,
) -> String {
    format!(
        r#"
[server]
hostname = "floodgate.test"
shutdown_grace = "5s"

[smtp]
listen = ["127.0.0.1:0"]
idle_timeout = "30s"
{smtp_extra}

[http]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"
token = "{TOKEN}"

[queue]
dir = "{}"
{queue_extra}

[dns]
nameservers = ["{dns}"]
timeout = "300ms"
attempts = 1

{delivery}
{extra}
"#,
        dir.join("queue").display(),
        // Delivery stays off unless the test configures it.
        delivery = if extra.contains("[delivery]") {
            ""
        } else {
            "[delivery]\nenabled = false"
        },
    )
}

pub fn parse_config(dir: &Path, text: &str) -> Config {
    let path = dir.join("floodgate.toml");
    std::fs::write(&path, text).expect("write config");
    Config::load(&path).unwrap_or_else(|e| panic!("test config refused: {e}"))
}

/// The daemon in-process, with its temporary folder.
pub struct TestApp {
    pub app: App,
    pub dir: tempfile::TempDir,
}

impl TestApp {
    pub async fn start(smtp_extra: &str, extra: &str, dns: SocketAddr) -> TestApp {
        Self::start_with_clock(smtp_extra, extra, dns, Arc::new(SystemClock)).await
    }

    pub async fn start_with_clock(
        smtp_extra: &str,
        extra: &str,
        dns: SocketAddr,
        clock: Arc<dyn Clock>,
    ) -> TestApp {
        Self::start_full(smtp_extra, "", extra, dns, clock).await
    }

    pub async fn start_full(
        smtp_extra: &str,
        queue_extra: &str,
        extra: &str,
        dns: SocketAddr,
        clock: Arc<dyn Clock>,
    ) -> TestApp {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = config_text_with_queue(dir.path(), dns, smtp_extra, queue_extra, extra);
        let config = parse_config(dir.path(), &text);
        let deps = Deps {
            clock,
            ..Deps::default()
        };
        let app = App::start(config, deps).await.expect("app starts");
        TestApp { app, dir }
    }

    pub fn smtp(&self) -> SocketAddr {
        self.app.smtp_addrs[0]
    }

    pub async fn client(&self) -> Smtp {
        Smtp::connect(self.smtp()).await
    }

    /// Waits for deliveries under way to be recorded (and whatever they queued, such as
    /// a bounce), then wakes the scheduler and returns once a claim pass begun after that
    /// has finished and every delivery it started is recorded: what was due has been
    /// tried, and what was not has not been. Awaited instead of sleeping before asserting
    /// that nothing was delivered.
    pub async fn scheduler_pass(&self) {
        let progress = || self.app.scheduler_progress().expect("delivery enabled");
        let deadline = Instant::now() + Duration::from_secs(20);
        let settle = |done: &dyn Fn(floodgate::scheduler::Progress) -> bool| {
            let now = progress();
            assert!(
                Instant::now() < deadline,
                "scheduler never settled: {now:?}"
            );
            done(now)
        };
        while !settle(&|p| p.in_flight == 0) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let before = progress();
        self.app.wake_scheduler();
        while !settle(&|p| p.passes_finished > before.passes_started && p.in_flight == 0) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A raw SMTP client: send lines, read replies, assert on their code and status.
pub struct Smtp {
    reader: TokioBufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Smtp {
    /// Connects and reads the greeting (asserting it is 220).
    pub async fn connect(addr: SocketAddr) -> Smtp {
        let mut c = Smtp::connect_raw(addr).await;
        c.expect("220").await;
        c
    }

    /// As [`Smtp::connect_raw`], from the loopback address `source` (`127.0.0.2`, ...):
    /// tests that need many client addresses use the whole of 127.0.0.0/8.
    pub async fn connect_from(addr: SocketAddr, source: std::net::IpAddr) -> std::io::Result<Smtp> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = socket.connect(addr).await?;
        let (r, w) = stream.into_split();
        Ok(Smtp {
            reader: TokioBufReader::new(r),
            writer: w,
        })
    }

    pub async fn connect_raw(addr: SocketAddr) -> Smtp {
        let stream = TcpStream::connect(addr)
            .await
            .expect("connect to floodgate");
        let (r, w) = stream.into_split();
        Smtp {
            reader: TokioBufReader::new(r),
            writer: w,
        }
    }

    /// Half-closes: the server sees the end of input after what was sent.
    pub async fn finish(&mut self) {
        let _ = self.writer.shutdown().await;
    }

    /// Every reply until the server closes (or `limit` passes), one entry per line.
    pub async fn replies_until_close(&mut self, limit: Duration) -> Vec<String> {
        let mut lines = Vec::new();
        let _ = tokio::time::timeout(limit, async {
            loop {
                let mut line = Vec::new();
                match self.reader.read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => lines.push(String::from_utf8_lossy(&line).trim_end().to_owned()),
                }
            }
        })
        .await;
        lines
    }

    /// As [`Smtp::send`], for clients that expect to be cut off.
    pub async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes).await
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("send");
    }

    /// One reply, all its lines joined by `\n`. Empty string when the server closed.
    pub async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(20), self.reader.read_line(&mut line))
                .await
                .expect("reply within 20 s")
                .unwrap_or(0);
            if n == 0 {
                return all;
            }
            let last = line.len() < 4 || line.as_bytes()[3] == b' ';
            all.push_str(line.trim_end());
            if last {
                return all;
            }
            all.push('\n');
        }
    }

    /// Reads a reply and asserts it starts with `prefix` (e.g. `"550 5.1.2"`).
    pub async fn expect(&mut self, prefix: &str) -> String {
        let reply = self.reply().await;
        assert!(
            reply.starts_with(prefix),
            "expected {prefix:?}, got {reply:?}"
        );
        reply
    }

    /// Sends a command and asserts the reply starts with `prefix`.
    pub async fn cmd(&mut self, line: &str, prefix: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        let reply = self.reply().await;
        assert!(
            reply.starts_with(prefix),
            "{line}: expected {prefix:?}, got {reply:?}"
        );
        reply
    }

    pub async fn ehlo(&mut self) -> String {
        self.cmd("EHLO client.test", "250").await
    }

    pub async fn rcpt(&mut self, address: &str, prefix: &str) -> String {
        self.cmd(&format!("RCPT TO:<{address}>"), prefix).await
    }

    /// Sends DATA, the body (dot-stuffing done here) and the final dot; returns the
    /// reply to the final dot.
    pub async fn data(&mut self, body: &str) -> String {
        self.cmd("DATA", "354").await;
        let mut wire = String::new();
        for line in body.split_inclusive('\n') {
            if line.starts_with('.') {
                wire.push('.');
            }
            wire.push_str(line);
        }
        if !wire.ends_with("\r\n") {
            wire.push_str("\r\n");
        }
        wire.push_str(".\r\n");
        self.send(wire.as_bytes()).await;
        self.reply().await
    }

    /// A whole transaction; returns the queue id from `250 2.0.0 <id> ...`.
    pub async fn send_mail(&mut self, from: &str, to: &[&str], body: &str) -> String {
        self.cmd(&format!("MAIL FROM:<{from}>"), "250").await;
        for r in to {
            self.rcpt(r, "250").await;
        }
        let reply = self.data(body).await;
        assert!(reply.starts_with("250 2.0.0 "), "DATA: {reply}");
        queue_id(&reply)
    }
}

pub fn queue_id(reply: &str) -> String {
    reply
        .split_whitespace()
        .nth(2)
        .expect("queue id in reply")
        .to_owned()
}

pub fn message(subject: &str, extra_headers: &str) -> String {
    format!(
        "From: app@client.test\r\nTo: user@mx.test\r\nSubject: {subject}\r\n{extra_headers}\r\nHello.\r\n.leading dot line\r\n"
    )
}

/// The real `floodgate` binary, for lifecycle tests (signals, SIGKILL, check-config).
pub struct Daemon {
    pub child: Child,
    pub smtp: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_floodgate"))
}

impl Daemon {
    /// Starts `floodgate serve --config <path>` and waits until it logs its SMTP address.
    pub fn start(config: &Path) -> Daemon {
        let mut child = Command::new(binary())
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn floodgate");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = smtp_listening(&line) {
                    let _ = tx.send(addr);
                }
                sink.lock().push(line);
            }
        });
        let smtp = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("floodgate did not start: {:?}", log.lock()));
        Daemon { child, smtp, log }
    }

    /// Sends a signal: `libc::SIGTERM`, `libc::SIGHUP`, ...
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "floodgate did not exit within {limit:?}; log: {:?}",
            self.log.lock()
        );
    }

    /// Waits until a log line contains `needle`.
    pub fn wait_log(&self, needle: &str, limit: Duration) -> String {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(l) = self.log.lock().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no log line with {needle:?}: {:?}", self.log.lock());
    }
}

/// The address of a "smtp listening" line, in the text or the JSON log format.
fn smtp_listening(line: &str) -> Option<SocketAddr> {
    if let Some(addr) = line.split("smtp listening addr=").nth(1) {
        return Some(addr.trim().parse().expect("address"));
    }
    let json: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = json.get("fields")?;
    (fields.get("message")?.as_str()? == "smtp listening")
        .then(|| fields.get("addr")?.as_str()?.parse().ok())
        .flatten()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `floodgate check-config` (the real binary) on `text`: its exit code, and what it
/// printed (standard error first).
pub fn check_config(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("floodgate.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(binary())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.code().unwrap_or(-1), text)
}

/// Sender, body, and (address, state) per recipient.
pub type Stored = (String, Vec<u8>, Vec<(String, i64)>);

/// Reads a stored message straight from queue.db (a real SQLite file).
pub fn stored_message(queue_db: &Path, queue_id: &str) -> Option<Stored> {
    let conn =
        rusqlite::Connection::open_with_flags(queue_db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open queue.db");
    let (id, sender, body): (i64, String, Vec<u8>) = conn
        .query_row(
            "SELECT m.id, m.sender, b.body FROM messages m JOIN bodies b ON b.message_id = m.id
             WHERE m.queue_id = ?1",
            [queue_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .ok()?;
    let mut stmt = conn
        .prepare("SELECT address, state FROM recipients WHERE message_id = ?1 ORDER BY id")
        .unwrap();
    let rcpts = stmt
        .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    Some((sender, body, rcpts))
}

/// A minimal HTTP/1.1 request over a fresh connection: returns status and body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    let mut stream = TcpStream::connect(addr).await.expect("connect http");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    req.push_str(&format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    stream.write_all(req.as_bytes()).await.expect("send http");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut raw))
        .await
        .expect("http response within 20 s")
        .expect("read http");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// `floodgate ctl --admin ADDR --token TOKEN ARGS` (the real binary), asserting exit 0;
/// returns its standard output.
pub async fn ctl(admin: SocketAddr, args: &[&str]) -> String {
    let out = tokio::process::Command::new(binary())
        .arg("ctl")
        .args(["--admin", &admin.to_string(), "--token", TOKEN])
        .args(args)
        .env_remove("FLOODGATE_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run floodgate ctl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "ctl {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `http` against the admin API with the test token, parsing the JSON body.
pub async fn admin(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> serde_json::Value {
    let (status, text) = http(addr, method, path, Some(TOKEN), body).await;
    assert_eq!(status, 200, "{method} {path}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text}"))
}

/// One series' value from the admin `/metrics` page (`name` with its labels, as written).
pub async fn metric(admin_addr: SocketAddr, name: &str) -> f64 {
    let (status, text) = http(admin_addr, "GET", "/metrics", Some(TOKEN), None).await;
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no series {name} in /metrics"))
}

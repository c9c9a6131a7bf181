//! Load generator for `bench/incident.sh`: replays the 2024-11-05 incident against a running
//! Floodgate on loopback, and is its own receiving SMTP server.
//!
//! - **Flood**: `--campaigns` campaigns of `1,000,000 × --scale` recipients each, injected as
//!   fast as the machine allows over pipelined SMTP sessions (`MAIL`, many `RCPT`, then
//!   `RSET`, or `DATA` when some recipient was accepted). Each campaign has its own envelope
//!   sender (`floodN@flood.test`), which is what Floodgate attributes RCPT-time refusals to.
//!   Kinds, by campaign number: empty `<>`, malformed, NXDOMAIN, and a domain whose MX (this
//!   program's sink) answers 550 at RCPT; then again. With `--http-campaigns N` the first N
//!   NXDOMAIN campaigns are posted to `POST /v1/messages` instead.
//! - **Valid**: one campaign sends one message at a time to the valid domain at `--valid-rate`
//!   messages per second; each carries `X-Bench-Seq`, and latency runs from the `250` after
//!   DATA to the moment the sink has the whole message.
//! - **Sink**: accepts mail for every domain except `--bounce-domain`, whose recipients get
//!   `550 5.1.1`; counts both.
//! - **Watch**: polls the admin API (campaign states, /metrics) and the daemon's RSS.
//!
//! Prints a JSON summary on stdout. Every loop is bounded by `--max-seconds`.
//! It speaks only to the addresses it is given (the bench script gives it 127.0.0.1 only).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug, Clone)]
#[command(about = "Floodgate incident-replay load generator (loopback only)")]
struct Args {
    /// Floodgate's SMTP address.
    #[arg(long)]
    smtp: SocketAddr,
    /// Floodgate's HTTP API address (for --http-campaigns).
    #[arg(long)]
    http: Option<SocketAddr>,
    /// API key for the HTTP API (Bearer).
    #[arg(long, default_value = "")]
    api_key: String,
    /// Floodgate's admin address and token (campaign states, /metrics).
    #[arg(long)]
    admin: SocketAddr,
    #[arg(long)]
    admin_token: String,
    /// Where this program's receiving SMTP server listens (Floodgate's MX for both domains).
    #[arg(long)]
    sink: SocketAddr,
    #[arg(long, default_value = "ok.test")]
    valid_domain: String,
    #[arg(long, default_value = "bounce.test")]
    bounce_domain: String,
    /// Flood campaigns.
    #[arg(long, default_value_t = 8)]
    campaigns: u32,
    /// Recipients per flood campaign = 1,000,000 × scale.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// 0 = no flood (the baseline).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    flood: bool,
    /// SMTP sessions per flood campaign.
    #[arg(long, default_value_t = 2)]
    sessions_per_campaign: u32,
    /// RCPTs per flood transaction (Floodgate's max_recipients defaults to 100).
    #[arg(long, default_value_t = 50)]
    rcpts_per_txn: u64,
    /// Flood recipients per second across every SMTP flood session; 0 = as fast as the
    /// machine allows.
    #[arg(long, default_value_t = 0.0)]
    flood_rate: f64,
    /// NXDOMAIN campaigns sent over HTTP instead of SMTP.
    #[arg(long, default_value_t = 0)]
    http_campaigns: u32,
    /// Valid messages per second.
    #[arg(long, default_value_t = 50.0)]
    valid_rate: f64,
    #[arg(long, default_value_t = 4)]
    valid_sessions: u32,
    /// Valid mail runs at least this long (the baseline runs exactly this long).
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Valid mail keeps going this long after the flood has been injected.
    #[arg(long, default_value_t = 5)]
    tail: u64,
    /// How long to wait, after the last valid message was acknowledged, for the sink.
    #[arg(long, default_value_t = 60)]
    drain: u64,
    /// Hard bound on the whole run.
    #[arg(long, default_value_t = 1800)]
    max_seconds: u64,
    /// Floodgate's pid, for VmRSS / VmHWM.
    #[arg(long)]
    pid: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Empty,
    Malformed,
    NxDomain,
    Bounce,
}

impl Kind {
    fn of(i: u32) -> Kind {
        [Kind::Empty, Kind::Malformed, Kind::NxDomain, Kind::Bounce][(i % 4) as usize]
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Empty => "empty",
            Kind::Malformed => "malformed",
            Kind::NxDomain => "nxdomain",
            Kind::Bounce => "bounce550",
        }
    }
}

/// Client-side tallies for one flood campaign.
#[derive(Default)]
struct Tally {
    /// Recipients handed to Floodgate (RCPT lines or JSON addresses).
    injected: AtomicU64,
    /// RCPTs answered 2xx and then carried by a DATA answered 2xx.
    accepted: AtomicU64,
    /// Refusals seen by the client: non-2xx RCPT replies, recipients of a refused DATA,
    /// rejected recipients in HTTP responses, all recipients of a refused request.
    refused: AtomicU64,
    /// RCPT accepted but then dropped by RSET (should not happen for the refused kinds).
    reset: AtomicU64,
    codes: Mutex<BTreeMap<String, u64>>,
    first_ms: AtomicU64,
    done_ms: AtomicU64,
}

impl Tally {
    fn code(&self, code: &str, n: u64) {
        *self
            .codes
            .lock()
            .unwrap()
            .entry(code.to_owned())
            .or_default() += n;
    }
}

struct Shared {
    args: Args,
    t0: Instant,
    stop_valid: AtomicBool,
    stop_all: AtomicBool,
    /// Valid messages: seq -> ms (since t0) of the 250 after DATA.
    acked: Mutex<HashMap<u64, f64>>,
    /// Sink: seq -> ms of receipt.
    received: Mutex<HashMap<u64, f64>>,
    duplicates: AtomicU64,
    sink_refused: AtomicU64,
    sink_accepted_other: AtomicU64,
    valid_errors: AtomicU64,
    valid_submit_ms: Mutex<Vec<f64>>,
    valid_lag_max_ms: Mutex<f64>,
}

impl Shared {
    fn ms(&self) -> f64 {
        self.t0.elapsed().as_secs_f64() * 1000.0
    }
    fn expired(&self) -> bool {
        self.t0.elapsed() > Duration::from_secs(self.args.max_seconds)
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

// ------------------------------------------------------------------ SMTP client

struct Client {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
    line: String,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Res<Client> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        let mut c = Client {
            r: BufReader::with_capacity(64 * 1024, r),
            w,
            line: String::new(),
        };
        let greet = c.reply().await?;
        if greet != 220 {
            return Err(format!("greeting {greet}").into());
        }
        c.w.write_all(b"EHLO loadgen.test\r\n").await?;
        let ehlo = c.reply().await?;
        if ehlo != 250 {
            return Err(format!("EHLO {ehlo}").into());
        }
        Ok(c)
    }

    /// Reads one (possibly multi-line) reply; returns its code. `self.line` keeps its last line.
    async fn reply(&mut self) -> Res<u16> {
        loop {
            self.line.clear();
            let n =
                tokio::time::timeout(Duration::from_secs(120), self.r.read_line(&mut self.line))
                    .await??;
            if n == 0 {
                return Err("connection closed".into());
            }
            if self.line.len() < 4 {
                return Err(format!("short reply {:?}", self.line).into());
            }
            if self.line.as_bytes()[3] != b'-' {
                return Ok(self.line[..3].parse()?);
            }
        }
    }

    /// "451 4.7.1" style key for tallies.
    fn code_key(&self) -> String {
        self.line
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn flood_address(kind: Kind, campaign: u32, n: u64, bounce: &str) -> String {
    match kind {
        Kind::Empty => String::new(),
        Kind::Malformed => {
            if n.is_multiple_of(2) {
                format!("user{n}..dots@@bad-{campaign}")
            } else {
                format!("no-at-sign-{campaign}-{n}")
            }
        }
        Kind::NxDomain => format!("user{n}@nx{campaign}-{}.test", n % 1000),
        Kind::Bounce => format!("user{n}@{bounce}"),
    }
}

/// One flood session: takes batches of the campaign's quota until none is left.
async fn flood_session(
    sh: Arc<Shared>,
    c: u32,
    kind: Kind,
    left: Arc<AtomicU64>,
    tally: Arc<Tally>,
) -> Res<()> {
    let args = &sh.args;
    let sender = format!("flood{c}@flood.test");
    let mut client = Client::connect(args.smtp).await?;
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut seq = 0u64;
    // --flood-rate: each session sends its share, one transaction per tick; a late tick
    // is made up (Burst), so the average holds.
    let sessions = f64::from(args.campaigns * args.sessions_per_campaign);
    let mut pace = (args.flood_rate > 0.0).then(|| {
        tokio::time::interval(Duration::from_secs_f64(
            args.rcpts_per_txn as f64 * sessions / args.flood_rate,
        ))
    });
    loop {
        if let Some(p) = &mut pace {
            p.tick().await;
        }
        if sh.stop_all.load(Ordering::Relaxed) || sh.expired() {
            break;
        }
        // Claim up to rcpts_per_txn recipients of the quota.
        let mut k = 0;
        let mut base = 0;
        let _ = left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
            k = l.min(args.rcpts_per_txn);
            base = l;
            Some(l - k)
        });
        if k == 0 {
            break;
        }
        buf.clear();
        buf.extend_from_slice(format!("MAIL FROM:<{sender}>\r\n").as_bytes());
        for i in 0..k {
            let addr = flood_address(kind, c, base - i, &args.bounce_domain);
            buf.extend_from_slice(format!("RCPT TO:<{addr}>\r\n").as_bytes());
        }
        client.w.write_all(&buf).await?;
        tally.injected.fetch_add(k, Ordering::Relaxed);
        let mail = client.reply().await?;
        if mail != 250 {
            return Err(format!("MAIL {}", client.line.trim_end()).into());
        }
        let mut ok = 0u64;
        for _ in 0..k {
            let code = client.reply().await?;
            if (200..300).contains(&code) {
                ok += 1;
            } else {
                tally.refused.fetch_add(1, Ordering::Relaxed);
                let key = client.code_key();
                tally.code(&key, 1);
            }
        }
        if ok > 0 && kind == Kind::Bounce {
            seq += 1;
            client.w.write_all(b"DATA\r\n").await?;
            let d = client.reply().await?;
            if d != 354 {
                tally.refused.fetch_add(ok, Ordering::Relaxed);
                tally.code(&format!("DATA {}", client.code_key()), ok);
                client.w.write_all(b"RSET\r\n").await?;
                client.reply().await?;
                continue;
            }
            let body = format!(
                "From: <{sender}>\r\nTo: <flood@{}>\r\nSubject: flood {c} {seq}\r\nMessage-ID: <flood{c}.{seq}@loadgen.test>\r\n\r\nThis is flood campaign {c}.\r\n.\r\n",
                args.bounce_domain
            );
            client.w.write_all(body.as_bytes()).await?;
            let e = client.reply().await?;
            if (200..300).contains(&e) {
                tally.accepted.fetch_add(ok, Ordering::Relaxed);
            } else {
                tally.refused.fetch_add(ok, Ordering::Relaxed);
                tally.code(&format!("DATA-END {}", client.code_key()), ok);
            }
        } else {
            if ok > 0 {
                tally.reset.fetch_add(ok, Ordering::Relaxed);
            }
            client.w.write_all(b"RSET\r\n").await?;
            client.reply().await?;
        }
    }
    let _ = client.w.write_all(b"QUIT\r\n").await;
    Ok(())
}

/// One HTTP flood connection: POSTs batches of NXDOMAIN recipients as JSON.
async fn http_flood_session(
    sh: Arc<Shared>,
    c: u32,
    kind: Kind,
    left: Arc<AtomicU64>,
    tally: Arc<Tally>,
) -> Res<()> {
    let args = &sh.args;
    let addr = args.http.ok_or("--http needed for --http-campaigns")?;
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    loop {
        if sh.stop_all.load(Ordering::Relaxed) || sh.expired() {
            break;
        }
        let mut k = 0;
        let mut base = 0;
        let _ = left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
            k = l.min(args.rcpts_per_txn);
            base = l;
            Some(l - k)
        });
        if k == 0 {
            break;
        }
        let to: Vec<String> = (0..k)
            .map(|i| flood_address(kind, c, base - i, &args.bounce_domain))
            .collect();
        let body = json!({
            "from": format!("flood{c}@flood.test"),
            "to": to,
            "subject": format!("flood {c}"),
            "text": "This is a flood campaign.",
            "campaign": format!("flood{c}@flood.test"),
        })
        .to_string();
        let req = hyper::Request::post("/v1/messages")
            .header("host", addr.to_string())
            .header("authorization", format!("Bearer {}", args.api_key))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
        send.ready().await?;
        tally.injected.fetch_add(k, Ordering::Relaxed);
        let resp = send.send_request(req).await?;
        let status = resp.status().as_u16();
        let bytes = http_body_util::BodyExt::collect(resp.into_body())
            .await?
            .to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        match v.get("recipients").and_then(Value::as_array) {
            Some(rs) => {
                for r in rs {
                    if r.get("status").and_then(Value::as_str) == Some("accepted") {
                        tally.accepted.fetch_add(1, Ordering::Relaxed);
                    } else {
                        tally.refused.fetch_add(1, Ordering::Relaxed);
                        let code = format!(
                            "HTTP {status} {} {}",
                            r.get("code").and_then(Value::as_u64).unwrap_or(0),
                            r.get("enhanced_code").and_then(Value::as_str).unwrap_or("")
                        );
                        tally.code(&code, 1);
                    }
                }
            }
            None => {
                // The whole request was refused (paused campaign: 429; intake paused: 503).
                tally.refused.fetch_add(k, Ordering::Relaxed);
                tally.code(&format!("HTTP {status}"), k);
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ valid traffic

async fn valid_sender(
    sh: Arc<Shared>,
    rx: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<(u64, f64)>>>,
) -> Res<()> {
    let args = &sh.args;
    let mut client = Client::connect(args.smtp).await?;
    loop {
        let job = { rx.lock().await.recv().await };
        let Some((seq, due_ms)) = job else { break };
        let start = sh.ms();
        {
            let mut lag = sh.valid_lag_max_ms.lock().unwrap();
            *lag = lag.max(start - due_ms);
        }
        let head = format!(
            "MAIL FROM:<valid@client.test>\r\nRCPT TO:<user{}@{}>\r\nDATA\r\n",
            seq % 1000,
            args.valid_domain
        );
        client.w.write_all(head.as_bytes()).await?;
        let m = client.reply().await?;
        let r = client.reply().await?;
        let d = client.reply().await?;
        if m != 250 || r != 250 || d != 354 {
            sh.valid_errors.fetch_add(1, Ordering::Relaxed);
            eprintln!(
                "loadgen: valid #{seq}: MAIL {m} RCPT {r} DATA {d}: {}",
                client.line.trim_end()
            );
            if d == 354 {
                client.w.write_all(b".\r\n").await?;
                client.reply().await?;
            }
            client.w.write_all(b"RSET\r\n").await?;
            client.reply().await?;
            continue;
        }
        let mut body = format!(
            "From: <valid@client.test>\r\nTo: <user@{}>\r\nSubject: valid {seq}\r\nX-Bench-Seq: {seq}\r\nMessage-ID: <valid.{seq}@loadgen.test>\r\n\r\n",
            args.valid_domain
        );
        while body.len() < 1000 {
            body.push_str("The quick brown fox jumps over the lazy dog, valid mail.\r\n");
        }
        body.push_str(".\r\n");
        client.w.write_all(body.as_bytes()).await?;
        let e = client.reply().await?;
        let now = sh.ms();
        if e == 250 {
            sh.acked.lock().unwrap().insert(seq, now);
            sh.valid_submit_ms.lock().unwrap().push(now - start);
        } else {
            sh.valid_errors.fetch_add(1, Ordering::Relaxed);
            eprintln!(
                "loadgen: valid #{seq}: end of DATA {e}: {}",
                client.line.trim_end()
            );
        }
    }
    let _ = client.w.write_all(b"QUIT\r\n").await;
    Ok(())
}

async fn valid_ticker(sh: Arc<Shared>, tx: tokio::sync::mpsc::Sender<(u64, f64)>) -> u64 {
    let period = Duration::from_secs_f64(1.0 / sh.args.valid_rate.max(0.1));
    let start = Instant::now();
    let mut seq = 0u64;
    while !sh.stop_valid.load(Ordering::Relaxed) && !sh.expired() {
        seq += 1;
        let due = start + period * seq as u32;
        tokio::time::sleep_until(due.into()).await;
        let due_ms = (due - sh.t0).as_secs_f64() * 1000.0;
        if tx.send((seq, due_ms)).await.is_err() {
            break;
        }
    }
    seq
}

// ------------------------------------------------------------------ sink

async fn sink_conn(sh: Arc<Shared>, s: TcpStream) -> Res<()> {
    s.set_nodelay(true)?;
    let (r, mut w) = s.into_split();
    let mut r = BufReader::with_capacity(64 * 1024, r);
    let mut out = Vec::new();
    out.extend_from_slice(b"220 sink.loadgen.test ESMTP loadgen sink\r\n");
    w.write_all(&out).await?;
    out.clear();
    let mut line = Vec::new();
    let mut good = 0u64;
    let bounce = format!("@{}>", sh.args.bounce_domain.to_ascii_lowercase());
    loop {
        line.clear();
        let n = tokio::time::timeout(Duration::from_secs(600), r.read_until(b'\n', &mut line))
            .await??;
        if n == 0 {
            break;
        }
        let upper = String::from_utf8_lossy(&line).to_ascii_uppercase();
        let cmd = upper.trim_end();
        if cmd.starts_with("EHLO") {
            out.extend_from_slice(b"250-sink.loadgen.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n");
        } else if cmd.starts_with("HELO") || cmd.starts_with("MAIL") || cmd.starts_with("NOOP") {
            out.extend_from_slice(b"250 2.0.0 OK\r\n");
        } else if cmd.starts_with("RSET") {
            good = 0;
            out.extend_from_slice(b"250 2.0.0 OK\r\n");
        } else if cmd.starts_with("RCPT") {
            if cmd.to_ascii_lowercase().ends_with(&bounce) {
                sh.sink_refused.fetch_add(1, Ordering::Relaxed);
                out.extend_from_slice(b"550 5.1.1 No such user here\r\n");
            } else {
                good += 1;
                out.extend_from_slice(b"250 2.1.5 OK\r\n");
            }
        } else if cmd.starts_with("DATA") {
            if good == 0 {
                out.extend_from_slice(b"554 5.5.1 No valid recipients\r\n");
            } else {
                out.extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
                w.write_all(&out).await?;
                out.clear();
                let mut seq = None;
                let mut in_headers = true;
                loop {
                    line.clear();
                    let n = tokio::time::timeout(
                        Duration::from_secs(600),
                        r.read_until(b'\n', &mut line),
                    )
                    .await??;
                    if n == 0 {
                        return Err("closed in DATA".into());
                    }
                    if line == b".\r\n" || line == b".\n" {
                        break;
                    }
                    if in_headers {
                        if line == b"\r\n" {
                            in_headers = false;
                        } else if line.len() > 13
                            && line[..13].eq_ignore_ascii_case(b"x-bench-seq: ")
                        {
                            seq = String::from_utf8_lossy(&line[13..])
                                .trim()
                                .parse::<u64>()
                                .ok();
                        }
                    }
                }
                let now = sh.ms();
                match seq {
                    Some(s) => {
                        if sh.received.lock().unwrap().insert(s, now).is_some() {
                            sh.duplicates.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    None => {
                        sh.sink_accepted_other.fetch_add(good, Ordering::Relaxed);
                    }
                }
                good = 0;
                out.extend_from_slice(b"250 2.0.0 Received\r\n");
            }
        } else if cmd.starts_with("QUIT") {
            out.extend_from_slice(b"221 2.0.0 Bye\r\n");
            w.write_all(&out).await?;
            break;
        } else {
            out.extend_from_slice(b"502 5.5.2 Command not implemented\r\n");
        }
        if r.buffer().is_empty() {
            w.write_all(&out).await?;
            out.clear();
        }
    }
    Ok(())
}

async fn sink(sh: Arc<Shared>, listener: TcpListener) {
    loop {
        let Ok((s, _)) = listener.accept().await else {
            continue;
        };
        let sh = sh.clone();
        tokio::spawn(async move {
            if let Err(e) = sink_conn(sh, s).await {
                eprintln!("loadgen: sink connection: {e}");
            }
        });
    }
}

// ------------------------------------------------------------------ watching the daemon

async fn http_get(addr: SocketAddr, path: &str, token: &str) -> Res<String> {
    let mut s = TcpStream::connect(addr).await?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP header end")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("GET {path}: {}", head.lines().next().unwrap_or("")).into());
    }
    // Chunked bodies: join the chunks.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || tail.len() < n {
                break;
            }
            out.push_str(&tail[..n]);
            rest = tail[n..].trim_start_matches("\r\n");
        }
        return Ok(out);
    }
    Ok(body.to_owned())
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        .filter(|(k, _)| *k == name || k.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v.trim().parse::<f64>().unwrap_or(0.0))
        .reduce(|a, b| a + b)
}

fn labelled(text: &str, name: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(k, v)| (k[name.len()..].to_owned(), v.parse().unwrap_or(0.0)))
        .collect()
}

fn rss_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[derive(Default)]
struct Watch {
    paused_at_ms: BTreeMap<String, f64>,
    faillog_tx: Vec<(f64, f64)>,
    rss_max_kb: u64,
    polls: u64,
    errors: u64,
}

async fn watcher(sh: Arc<Shared>, watch: Arc<Mutex<Watch>>, done: Arc<AtomicBool>) {
    let a = &sh.args;
    let mut tick = 0u64;
    while !done.load(Ordering::Relaxed) && !sh.expired() {
        if let Ok(text) = http_get(a.admin, "/admin/v1/campaigns", &a.admin_token).await {
            let now = sh.ms();
            if let Ok(Value::Array(cs)) = serde_json::from_str::<Value>(&text) {
                let mut w = watch.lock().unwrap();
                w.polls += 1;
                for c in cs {
                    let name = c
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned();
                    if c.get("state").and_then(Value::as_str) == Some("paused") {
                        w.paused_at_ms.entry(name).or_insert(now);
                    }
                }
            }
        } else {
            watch.lock().unwrap().errors += 1;
        }
        if tick.is_multiple_of(4)
            && let Ok(text) = http_get(a.admin, "/metrics", &a.admin_token).await
            && let Some(v) = metric(&text, "floodgate_faillog_transactions_total")
        {
            watch.lock().unwrap().faillog_tx.push((sh.ms(), v));
        }
        if let Some(pid) = a.pid
            && let Some(kb) = rss_kb(pid, "VmRSS:")
        {
            let mut w = watch.lock().unwrap();
            w.rss_max_kb = w.rss_max_kb.max(kb);
        }
        tick += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(((sorted.len() - 1) as f64) * p) as usize]
}

#[tokio::main]
async fn main() -> Res<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.sink).await?;
    let sh = Arc::new(Shared {
        args: args.clone(),
        t0: Instant::now(),
        stop_valid: AtomicBool::new(false),
        stop_all: AtomicBool::new(false),
        acked: Mutex::default(),
        received: Mutex::default(),
        duplicates: AtomicU64::new(0),
        sink_refused: AtomicU64::new(0),
        sink_accepted_other: AtomicU64::new(0),
        valid_errors: AtomicU64::new(0),
        valid_submit_ms: Mutex::default(),
        valid_lag_max_ms: Mutex::new(0.0),
    });
    tokio::spawn(sink(sh.clone(), listener));
    let watch = Arc::new(Mutex::new(Watch::default()));
    let watch_done = Arc::new(AtomicBool::new(false));
    let watch_task = tokio::spawn(watcher(sh.clone(), watch.clone(), watch_done.clone()));
    let metrics_before = http_get(args.admin, "/metrics", &args.admin_token)
        .await
        .unwrap_or_default();

    // Valid traffic.
    let (tx, rx) = tokio::sync::mpsc::channel(100_000);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut valid_tasks = Vec::new();
    for _ in 0..args.valid_sessions {
        let (sh, rx) = (sh.clone(), rx.clone());
        valid_tasks.push(tokio::spawn(async move {
            if let Err(e) = valid_sender(sh.clone(), rx).await {
                eprintln!("loadgen: valid session: {e}");
            }
        }));
    }
    let ticker = tokio::spawn(valid_ticker(sh.clone(), tx));

    // The flood.
    let per_campaign = (1_000_000.0 * args.scale).round() as u64;
    let mut tallies = Vec::new();
    let mut flood_tasks = Vec::new();
    let flood_start_ms = sh.ms();
    if args.flood {
        let mut http_left = args.http_campaigns;
        for i in 0..args.campaigns {
            let c = i + 1;
            let kind = Kind::of(i);
            let via_http = kind == Kind::NxDomain && http_left > 0;
            if via_http {
                http_left -= 1;
            }
            let tally = Arc::new(Tally::default());
            tally.first_ms.store(sh.ms() as u64, Ordering::Relaxed);
            let left = Arc::new(AtomicU64::new(per_campaign));
            tallies.push((c, kind, via_http, tally.clone()));
            let mut sessions = Vec::new();
            for _ in 0..args.sessions_per_campaign {
                let (sh, left, tally) = (sh.clone(), left.clone(), tally.clone());
                sessions.push(tokio::spawn(async move {
                    let r = if via_http {
                        http_flood_session(sh.clone(), c, kind, left, tally).await
                    } else {
                        flood_session(sh.clone(), c, kind, left, tally).await
                    };
                    if let Err(e) = r {
                        eprintln!("loadgen: flood{c} session: {e}");
                    }
                }));
            }
            let (sh2, tally2) = (sh.clone(), tally.clone());
            flood_tasks.push(tokio::spawn(async move {
                for s in sessions {
                    let _ = s.await;
                }
                tally2.done_ms.store(sh2.ms() as u64, Ordering::Relaxed);
            }));
        }
    }
    for t in flood_tasks {
        let _ = t.await;
    }
    let flood_end_ms = sh.ms();
    // Valid mail runs at least --duration, and --tail beyond the flood.
    let until = Duration::from_secs(args.duration).max(
        Duration::from_millis(flood_end_ms as u64)
            + Duration::from_secs(if args.flood { args.tail } else { 0 }),
    );
    while sh.t0.elapsed() < until && !sh.expired() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sh.stop_valid.store(true, Ordering::Relaxed);
    let ticks = ticker.await.unwrap_or(0);
    for t in valid_tasks {
        let _ = t.await;
    }
    let valid_end_ms = sh.ms();
    // Wait for the sink to have every acknowledged valid message.
    let drain_deadline = Instant::now() + Duration::from_secs(args.drain);
    loop {
        let missing = {
            let acked = sh.acked.lock().unwrap();
            let received = sh.received.lock().unwrap();
            acked.keys().filter(|k| !received.contains_key(k)).count()
        };
        if missing == 0 || Instant::now() > drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drained_ms = sh.ms();
    // One more second of watching, then the final figures.
    tokio::time::sleep(Duration::from_secs(1)).await;
    watch_done.store(true, Ordering::Relaxed);
    let _ = watch_task.await;
    sh.stop_all.store(true, Ordering::Relaxed);
    let metrics_after = http_get(args.admin, "/metrics", &args.admin_token)
        .await
        .unwrap_or_default();
    let campaigns_after = http_get(args.admin, "/admin/v1/campaigns", &args.admin_token)
        .await
        .unwrap_or_default();

    // Latencies.
    let acked = sh.acked.lock().unwrap().clone();
    let received = sh.received.lock().unwrap().clone();
    let mut lat: Vec<f64> = acked
        .iter()
        .filter_map(|(k, a)| received.get(k).map(|r| r - a))
        .collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let negative = lat.iter().filter(|v| **v < 0.0).count();
    let mut submit = sh.valid_submit_ms.lock().unwrap().clone();
    submit.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let lost: Vec<u64> = {
        let mut v: Vec<u64> = acked
            .keys()
            .filter(|k| !received.contains_key(k))
            .copied()
            .collect();
        v.sort();
        v.truncate(20);
        v
    };

    let w = watch.lock().unwrap();
    // Failure-log transactions per second: overall, and the worst 1 s+ window.
    let tx0 = metric(&metrics_before, "floodgate_faillog_transactions_total").unwrap_or(0.0);
    let tx1 = metric(&metrics_after, "floodgate_faillog_transactions_total").unwrap_or(0.0);
    let mut tx_peak: f64 = 0.0;
    for pair in w.faillog_tx.windows(2) {
        let dt = (pair[1].0 - pair[0].0) / 1000.0;
        if dt > 0.5 {
            tx_peak = tx_peak.max((pair[1].1 - pair[0].1) / dt);
        }
    }
    let run_s = drained_ms / 1000.0;
    let flood_s = (flood_end_ms - flood_start_ms) / 1000.0;

    let mut campaigns = Vec::new();
    let mut client_refused_total = 0u64;
    let mut injected_total = 0u64;
    for (c, kind, via_http, t) in &tallies {
        let name = format!("flood{c}@flood.test");
        let refused = t.refused.load(Ordering::Relaxed);
        client_refused_total += refused;
        injected_total += t.injected.load(Ordering::Relaxed);
        let paused = w
            .paused_at_ms
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(&name))
            .map(|(_, ms)| (ms - t.first_ms.load(Ordering::Relaxed) as f64) / 1000.0);
        campaigns.push(json!({
            "campaign": name,
            "kind": kind.name(),
            "via": if *via_http { "http" } else { "smtp" },
            "injected": t.injected.load(Ordering::Relaxed),
            "accepted": t.accepted.load(Ordering::Relaxed),
            "refused": refused,
            "reset_after_accept": t.reset.load(Ordering::Relaxed),
            "codes": *t.codes.lock().unwrap(),
            "seconds_to_paused": paused,
            "injection_seconds": (t.done_ms.load(Ordering::Relaxed) as f64 - t.first_ms.load(Ordering::Relaxed) as f64) / 1000.0,
        }));
    }
    let failures_before = labelled(&metrics_before, "floodgate_failures_total");
    let failures_after = labelled(&metrics_after, "floodgate_failures_total");
    let failures_delta: BTreeMap<String, f64> = failures_after
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v - failures_before.get(k).copied().unwrap_or(0.0),
            )
        })
        .collect();
    let out = json!({
        "flood": args.flood,
        "scale": args.scale,
        "per_campaign": per_campaign,
        "run_seconds": run_s,
        "flood_seconds": flood_s,
        "valid_seconds": valid_end_ms / 1000.0,
        "flood_injected": injected_total,
        "flood_recipients_per_second": if flood_s > 0.0 { injected_total as f64 / flood_s } else { 0.0 },
        "client_refused": client_refused_total,
        "sink_refused_550": sh.sink_refused.load(Ordering::Relaxed),
        "sink_accepted_other": sh.sink_accepted_other.load(Ordering::Relaxed),
        "valid": {
            "ticks": ticks,
            "sent_acked": acked.len(),
            "received": received.len(),
            "received_of_acked": acked.len() - lost.len().min(acked.len()),
            "missing_examples": lost,
            "duplicates": sh.duplicates.load(Ordering::Relaxed),
            "errors": sh.valid_errors.load(Ordering::Relaxed),
            "rate_achieved": acked.len() as f64 / (valid_end_ms / 1000.0),
            "max_send_lag_ms": *sh.valid_lag_max_ms.lock().unwrap(),
            "latency_ms": { "n": lat.len(), "p50": pct(&lat, 0.5), "p90": pct(&lat, 0.9), "p99": pct(&lat, 0.99), "max": lat.last().copied().unwrap_or(f64::NAN), "negative": negative },
            "submit_ms": { "p50": pct(&submit, 0.5), "p99": pct(&submit, 0.99), "max": submit.last().copied().unwrap_or(f64::NAN) },
        },
        "faillog_transactions": { "total": tx1 - tx0, "per_second_avg": (tx1 - tx0) / run_s, "per_second_peak": tx_peak, "samples": w.faillog_tx.len() },
        "floodgate_failures_delta": failures_delta,
        "floodgate_failures_sum": failures_delta.values().sum::<f64>(),
        "rss_max_kb_sampled": w.rss_max_kb,
        "vm_hwm_kb": args.pid.and_then(|p| rss_kb(p, "VmHWM:")),
        "admin_polls": w.polls,
        "admin_poll_errors": w.errors,
        "campaigns": campaigns,
        "campaigns_after": serde_json::from_str::<Value>(&campaigns_after).unwrap_or(Value::Null),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

//! A real, scriptable receiving SMTP server (raw tokio, own line parser) that records every
//! accepted message, for testing delivery against a genuine peer over TCP (and STARTTLS).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// One message the sink accepted (final DATA reply was 2xx).
#[derive(Clone, Debug)]
pub struct Received {
    /// Reverse path without angle brackets ("" for the null sender `<>`).
    pub mail_from: String,
    /// Only the recipients that got a 2xx, without angle brackets.
    pub rcpts: Vec<String>,
    /// Dot-unstuffed message, CRLF line endings, without the terminating `.CRLF`.
    pub data: Vec<u8>,
    pub at: Instant,
    /// Whether the transaction ran inside STARTTLS.
    pub tls: bool,
    pub auth_user: Option<String>,
    /// The EHLO/HELO argument the client gave.
    pub helo: String,
    /// MAIL FROM parameters after the path, as sent (e.g. `SIZE=123 SMTPUTF8`).
    pub mail_params: String,
}

/// What to answer to one RCPT TO.
pub enum RcptScript {
    Accept,
    /// Full reply, e.g. `Reply(450, "4.2.0 try later")` or `Reply(550, "5.1.1 no such user")`.
    Reply(u16, &'static str),
}

type RcptFn = Box<dyn Fn(&str) -> RcptScript + Send + Sync>;

pub struct SinkConfig {
    /// Any 127.0.0.0/8 address works on Linux without configuration.
    pub bind_ip: Ipv4Addr,
    /// 0 picks a free port; tests that need two MX hosts on one port set it.
    pub bind_port: u16,
    /// Called with the bare recipient address (no brackets).
    pub rcpt: RcptFn,
    /// Reply after the final dot.
    pub data_reply: (u16, String),
    /// Read the DATA header line(s) then close the connection without a reply.
    pub drop_mid_data: bool,
    /// After the greeting, read nothing and stay silent for this long, then close.
    pub stall_after_greeting: Option<Duration>,
    /// After the final dot, stay silent for this long, then close (message not recorded).
    pub stall_on_data: Option<Duration>,
    /// Banner. A 4xx banner closes right after; a 5xx banner answers 503 until QUIT.
    pub greeting: (u16, String),
    /// `(cert_pem, key_pem)`: offer STARTTLS.
    pub tls: Option<(String, String)>,
    /// `(user, pass)`: offer AUTH PLAIN LOGIN and require it for MAIL
    /// (and only offer it after STARTTLS when `tls` is set).
    pub auth: Option<(String, String)>,
    /// Called with the number of messages this connection already accepted: `Some(d)`
    /// records the message, then sends no reply to its final dot (silent for `d`, then
    /// closes): a reply lost after the message was taken.
    pub lose_reply: Box<dyn Fn(usize) -> Option<Duration> + Send + Sync>,
    /// Offer SMTPUTF8 (RFC 6531) in EHLO.
    pub smtputf8: bool,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            bind_ip: Ipv4Addr::LOCALHOST,
            bind_port: 0,
            rcpt: Box::new(|_| RcptScript::Accept),
            data_reply: (250, "2.0.0 OK".into()),
            drop_mid_data: false,
            stall_after_greeting: None,
            stall_on_data: None,
            greeting: (220, "sink.test ESMTP floodgate-test-sink".into()),
            tls: None,
            auth: None,
            lose_reply: Box::new(|_| None),
            smtputf8: false,
        }
    }
}

struct Shared {
    cfg: SinkConfig,
    tls: Option<TlsAcceptor>,
    received: Mutex<Vec<Received>>,
    /// Every command line received, in order, across connections (AUTH payloads included).
    commands: Mutex<Vec<String>>,
    connections: AtomicUsize,
}

/// A running sink; stops (and drops its connections) when dropped.
pub struct Sink {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Sink {
    /// Accepts everything on 127.0.0.1, no TLS, no AUTH.
    pub async fn start() -> Sink {
        Sink::start_with(SinkConfig::default()).await
    }

    pub async fn start_with(cfg: SinkConfig) -> Sink {
        let listener = TcpListener::bind((cfg.bind_ip, cfg.bind_port))
            .await
            .expect("bind sink");
        let addr = listener.local_addr().unwrap();
        let tls = cfg.tls.as_ref().map(|(cert, key)| tls_acceptor(cert, key));
        let shared = Arc::new(Shared {
            cfg,
            tls,
            received: Mutex::new(Vec::new()),
            commands: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            // Sessions live in this JoinSet so aborting the accept task closes them all.
            let mut sessions = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                s.connections.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                sessions.spawn(async move {
                    let _ = session(stream, &s).await;
                });
                while sessions.try_join_next().is_some() {}
            }
        });
        Sink { addr, shared, task }
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().clone()
    }

    /// Command lines received so far (e.g. to assert pipelining or RSET).
    pub fn commands(&self) -> Vec<String> {
        self.shared.commands.lock().clone()
    }

    /// Polls until at least `n_messages` were received; panics with what it has on timeout.
    pub async fn wait_for(&self, n_messages: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.received();
            if got.len() >= n_messages {
                return got;
            }
            if Instant::now() >= deadline {
                panic!(
                    "sink {}: expected {n_messages} message(s) within {timeout:?}, got {}: {:?}\ncommands: {:?}",
                    self.addr,
                    got.len(),
                    got.iter()
                        .map(|r| (&r.mail_from, &r.rcpts))
                        .collect::<Vec<_>>(),
                    self.commands()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Self-signed certificate for `names` (DNS names or IP literals): `(cert_pem, key_pem)`.
pub fn self_signed(names: &[&str]) -> (String, String) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names).expect("rcgen");
    (ck.cert.pem(), ck.signing_key.serialize_pem())
}

fn tls_acceptor(cert_pem: &str, key_pem: &str) -> TlsAcceptor {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("cert pem");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key pem");
    // Explicit provider: never depends on a process-wide default being installed.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server cert");
    TlsAcceptor::from(Arc::new(cfg))
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Per-connection state. The stream is boxed so STARTTLS can swap TCP for TLS in place.
struct Conn<'a> {
    io: BufReader<Box<dyn Io>>,
    s: &'a Shared,
    tls: bool,
    helo: Option<String>,
    auth_user: Option<String>,
    mail_from: Option<String>,
    mail_params: String,
    rcpts: Vec<String>,
    /// Messages accepted on this connection.
    accepted: usize,
}

/// Maximum accepted line; longer lines end the session (keeps a broken client from eating RAM).
const MAX_LINE: u64 = 1 << 20;

impl Conn<'_> {
    async fn reply(&mut self, code: u16, text: &str) -> std::io::Result<()> {
        let w = self.io.get_mut();
        w.write_all(format!("{code} {text}\r\n").as_bytes()).await?;
        w.flush().await
    }

    async fn reply_multi(&mut self, code: u16, lines: &[String]) -> std::io::Result<()> {
        let mut out = String::new();
        for (i, l) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            out.push_str(&format!("{code}{sep}{l}\r\n"));
        }
        let w = self.io.get_mut();
        w.write_all(out.as_bytes()).await?;
        w.flush().await
    }

    /// One line including its terminator; `None` on EOF.
    async fn line(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let mut buf = Vec::new();
        let n = (&mut self.io)
            .take(MAX_LINE)
            .read_until(b'\n', &mut buf)
            .await?;
        Ok((n > 0).then_some(buf))
    }

    async fn text_line(&mut self) -> std::io::Result<Option<String>> {
        Ok(self.line().await?.map(|l| {
            String::from_utf8_lossy(&l)
                .trim_end_matches(['\r', '\n'])
                .to_string()
        }))
    }

    fn reset(&mut self) {
        self.mail_from = None;
        self.rcpts.clear();
    }

    fn ehlo_lines(&self) -> Vec<String> {
        let cfg = &self.s.cfg;
        let mut l = vec![
            "sink.test greets you".to_string(),
            "PIPELINING".into(),
            "8BITMIME".into(),
            "SIZE 52428800".into(),
            "ENHANCEDSTATUSCODES".into(),
        ];
        if cfg.smtputf8 {
            l.push("SMTPUTF8".into());
        }
        if cfg.tls.is_some() && !self.tls {
            l.push("STARTTLS".into());
        }
        if cfg.auth.is_some() && (self.tls || cfg.tls.is_none()) {
            l.push("AUTH PLAIN LOGIN".into());
        }
        l
    }

    /// Handles AUTH; returns the reply to send.
    async fn auth(&mut self, args: &str) -> std::io::Result<(u16, &'static str)> {
        let Some((user, pass)) = self.s.cfg.auth.clone() else {
            return Ok((502, "5.5.1 AUTH not offered"));
        };
        if self.s.cfg.tls.is_some() && !self.tls {
            return Ok((530, "5.7.0 Must issue a STARTTLS command first"));
        }
        if self.auth_user.is_some() {
            return Ok((503, "5.5.1 Already authenticated"));
        }
        let mut parts = args.split_whitespace();
        let mech = parts.next().unwrap_or("").to_ascii_uppercase();
        let initial = parts.next().map(str::to_string);
        let decode = |s: &str| B64.decode(s.trim()).ok();
        let (u, p) = match mech.as_str() {
            "PLAIN" => {
                let resp = match initial {
                    Some(i) => i,
                    None => {
                        self.reply(334, "").await?;
                        self.text_line().await?.unwrap_or_default()
                    }
                };
                // authzid \0 authcid \0 passwd
                let Some(raw) = decode(&resp) else {
                    return Ok((501, "5.5.2 bad base64"));
                };
                let f: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
                if f.len() != 3 {
                    return Ok((501, "5.5.2 bad PLAIN response"));
                }
                (f[1].to_vec(), f[2].to_vec())
            }
            "LOGIN" => {
                let u = match initial {
                    Some(i) => i,
                    None => {
                        self.reply(334, "VXNlcm5hbWU6").await?;
                        self.text_line().await?.unwrap_or_default()
                    }
                };
                self.reply(334, "UGFzc3dvcmQ6").await?;
                let p = self.text_line().await?.unwrap_or_default();
                match (decode(&u), decode(&p)) {
                    (Some(u), Some(p)) => (u, p),
                    _ => return Ok((501, "5.5.2 bad base64")),
                }
            }
            _ => return Ok((504, "5.5.4 Unrecognized authentication type")),
        };
        if u == user.as_bytes() && p == pass.as_bytes() {
            self.auth_user = Some(user);
            Ok((235, "2.7.0 Authentication successful"))
        } else {
            Ok((535, "5.7.8 Authentication credentials invalid"))
        }
    }

    /// Reads the message after 354 up to the lone dot, dot-unstuffing. `None` on EOF.
    async fn read_data(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let mut data = Vec::new();
        loop {
            let Some(line) = self.line().await? else {
                return Ok(None);
            };
            if line == b".\r\n" || line == b".\n" {
                return Ok(Some(data));
            }
            let body = line.strip_prefix(b".").unwrap_or(&line);
            data.extend_from_slice(body);
        }
    }
}

/// Extracts the address inside `<...>` after `FROM:`/`TO:` (tolerates a space after the colon).
fn path_arg(args: &str, prefix: &str) -> Option<String> {
    let rest = args.get(..prefix.len())?;
    if !rest.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = args[prefix.len()..].trim_start();
    let rest = rest.strip_prefix('<')?;
    let end = rest.find('>')?;
    Some(rest[..end].to_string())
}

async fn session(stream: TcpStream, s: &Shared) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut c = Conn {
        io: BufReader::new(Box::new(stream) as Box<dyn Io>),
        s,
        tls: false,
        helo: None,
        auth_user: None,
        mail_from: None,
        mail_params: String::new(),
        rcpts: Vec::new(),
        accepted: 0,
    };
    let (gcode, gtext) = s.cfg.greeting.clone();
    c.reply(gcode, &gtext).await?;
    if gcode / 100 == 4 {
        return Ok(());
    }
    if let Some(d) = s.cfg.stall_after_greeting {
        tokio::time::sleep(d).await;
        return Ok(());
    }
    let refused = gcode / 100 != 2;

    while let Some(line) = c.text_line().await? {
        s.commands.lock().push(line.clone());
        let (verb, args) = match line.split_once(' ') {
            Some((v, a)) => (v.to_ascii_uppercase(), a.trim().to_string()),
            None => (line.to_ascii_uppercase(), String::new()),
        };
        if refused && verb != "QUIT" {
            c.reply(503, "5.5.1 No service").await?;
            continue;
        }
        match verb.as_str() {
            "EHLO" => {
                c.reset();
                c.helo = Some(args);
                let lines = c.ehlo_lines();
                c.reply_multi(250, &lines).await?;
            }
            "HELO" => {
                c.reset();
                c.helo = Some(args);
                c.reply(250, "sink.test").await?;
            }
            "STARTTLS" => {
                let Some(acceptor) = s.tls.clone().filter(|_| !c.tls) else {
                    c.reply(502, "5.5.1 STARTTLS not available").await?;
                    continue;
                };
                // Anything pipelined after STARTTLS must be discarded (RFC 3207 §4.2
                // injection defence), so only the raw stream is carried over.
                c.reply(220, "2.0.0 Ready to start TLS").await?;
                let raw = std::mem::replace(
                    &mut c.io,
                    BufReader::new(Box::new(tokio::io::empty()) as Box<dyn Io>),
                )
                .into_inner();
                let tls = acceptor.accept(raw).await?;
                c.io = BufReader::new(Box::new(tls) as Box<dyn Io>);
                c.tls = true;
                c.helo = None;
                c.reset();
            }
            "AUTH" => {
                let (code, text) = c.auth(&args).await?;
                c.reply(code, text).await?;
            }
            "MAIL" => {
                let from = path_arg(&args, "FROM:");
                if c.helo.is_none() {
                    c.reply(503, "5.5.1 EHLO first").await?;
                } else if s.cfg.auth.is_some() && c.auth_user.is_none() {
                    c.reply(530, "5.7.0 Authentication required").await?;
                } else if c.mail_from.is_some() {
                    c.reply(503, "5.5.1 Nested MAIL command").await?;
                } else if let Some(from) = from {
                    c.mail_from = Some(from);
                    c.mail_params = args
                        .split_once('>')
                        .map(|(_, p)| p.trim().to_string())
                        .unwrap_or_default();
                    c.reply(250, "2.1.0 OK").await?;
                } else {
                    c.reply(501, "5.5.4 Syntax: MAIL FROM:<address>").await?;
                }
            }
            "RCPT" => {
                let to = path_arg(&args, "TO:");
                if c.mail_from.is_none() {
                    c.reply(503, "5.5.1 MAIL first").await?;
                } else if let Some(to) = to {
                    match (s.cfg.rcpt)(&to) {
                        RcptScript::Accept => {
                            c.rcpts.push(to);
                            c.reply(250, "2.1.5 OK").await?;
                        }
                        RcptScript::Reply(code, text) => {
                            if code / 100 == 2 {
                                c.rcpts.push(to);
                            }
                            c.reply(code, text).await?;
                        }
                    }
                } else {
                    c.reply(501, "5.5.4 Syntax: RCPT TO:<address>").await?;
                }
            }
            "DATA" => {
                if c.mail_from.is_none() {
                    c.reply(503, "5.5.1 MAIL first").await?;
                    continue;
                }
                if c.rcpts.is_empty() {
                    c.reply(554, "5.5.1 No valid recipients").await?;
                    continue;
                }
                c.reply(354, "Start mail input; end with <CRLF>.<CRLF>")
                    .await?;
                if s.cfg.drop_mid_data {
                    // Wait for the client to start sending, then vanish.
                    let _ = c.line().await?;
                    return Ok(());
                }
                let Some(data) = c.read_data().await? else {
                    return Ok(());
                };
                if let Some(d) = s.cfg.stall_on_data {
                    tokio::time::sleep(d).await;
                    return Ok(());
                }
                let (code, text) = s.cfg.data_reply.clone();
                let lost = (s.cfg.lose_reply)(c.accepted);
                if code / 100 == 2 || lost.is_some() {
                    c.accepted += 1;
                    s.received.lock().push(Received {
                        mail_from: c.mail_from.clone().unwrap_or_default(),
                        rcpts: c.rcpts.clone(),
                        data,
                        at: Instant::now(),
                        tls: c.tls,
                        auth_user: c.auth_user.clone(),
                        helo: c.helo.clone().unwrap_or_default(),
                        mail_params: c.mail_params.clone(),
                    });
                }
                if let Some(d) = lost {
                    tokio::time::sleep(d).await;
                    return Ok(());
                }
                c.reset();
                c.reply(code, &text).await?;
            }
            "RSET" => {
                c.reset();
                c.reply(250, "2.0.0 OK").await?;
            }
            "NOOP" => c.reply(250, "2.0.0 OK").await?,
            "VRFY" => c.reply(252, "2.5.0 Cannot VRFY user").await?,
            "QUIT" => {
                c.reply(221, "2.0.0 Bye").await?;
                return Ok(());
            }
            _ => c.reply(500, "5.5.2 Command not recognized").await?,
        }
    }
    Ok(())
}

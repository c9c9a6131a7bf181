//! The outbound SMTP client: one connection's protocol — greeting, EHLO, STARTTLS, AUTH,
//! and a transaction that yields one outcome per recipient. Knows nothing of routes or
//! queues.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub use super::transaction::{Phase, SendError, Transaction};
use super::{Enhanced, Outcome, Reply};

/// Why a connection or a command failed below the level of an SMTP reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connection to {0} failed: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("timeout waiting for {0}")]
    Timeout(&'static str),
    #[error("connection lost during {0}: {1}")]
    Io(&'static str, std::io::Error),
    #[error("connection closed by peer during {0}")]
    Closed(&'static str),
    #[error("malformed reply: {0}")]
    Protocol(String),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    /// The server answered, but not with what the step needs.
    #[error("{0} {1}")]
    Refused(u16, String),
    /// A command argument holds CR, LF or NUL: writing it would inject commands. Nothing
    /// was written.
    #[error("refusing to write a {0} command holding CR, LF or NUL")]
    UnsafeCommand(&'static str),
}

/// Refuses a command argument that would end the line early or smuggle another command.
/// Defence in depth: the doors never let such a value into the queue.
fn safe_argument(value: &str, step: &'static str) -> Result<(), ClientError> {
    if value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        return Err(ClientError::UnsafeCommand(step));
    }
    Ok(())
}

/// The outcome of a recipient whose envelope value could not be written safely.
fn unsafe_outcome(e: &ClientError) -> Outcome {
    Outcome::permanent(
        crate::reason::Reason::MalformedAddress,
        format!("550 5.1.3 {e}"),
    )
}

/// Marks the recipients that cannot be written safely (all of them when the sender
/// cannot), so that no byte of theirs reaches the wire.
fn refuse_unsafe(tx: &Transaction<'_>, known: &mut [Option<Outcome>]) {
    if let Err(e) = safe_argument(tx.sender, "MAIL") {
        tracing::warn!(error = %e, "envelope sender not written");
        let outcome = unsafe_outcome(&e);
        for slot in known.iter_mut().filter(|k| k.is_none()) {
            *slot = Some(outcome.clone());
        }
        return;
    }
    for (slot, r) in known.iter_mut().zip(tx.recipients) {
        if slot.is_none()
            && let Err(e) = safe_argument(r, "RCPT")
        {
            *slot = Some(unsafe_outcome(&e));
        }
    }
}

/// One SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub code: u16,
    /// All lines' text, joined with a space.
    pub text: String,
    /// Each line's text, for EHLO keywords.
    pub lines: Vec<String>,
}

impl Response {
    /// The outcome this reply means for the recipients it answers, code and enhanced
    /// code typed.
    pub fn outcome(&self) -> Outcome {
        Outcome::from_reply(self.reply())
    }

    pub fn reply(&self) -> Reply {
        // Multi-line replies repeat the enhanced code on every line; the first one counts.
        let first = self.lines.first().map(String::as_str).unwrap_or("");
        let mut reply = Reply::smtp(self.code, first);
        if self.lines.len() > 1 {
            let strip = |l: &String| match (reply.enhanced, l.split_once(' ')) {
                (Some(e), Some((w, rest))) if Enhanced::parse(w) == Some(e) => rest.to_owned(),
                _ => l.clone(),
            };
            let more: Vec<String> = self.lines[1..].iter().map(strip).collect();
            reply.text = std::iter::once(reply.text.clone())
                .chain(more)
                .collect::<Vec<_>>()
                .join(" ");
        }
        reply
    }
}

/// What the server's EHLO reply offered.
#[derive(Debug, Clone, Default)]
pub struct Capabilities {
    pub pipelining: bool,
    pub starttls: bool,
    pub size: Option<usize>,
    pub auth_plain: bool,
    pub auth_login: bool,
    pub eight_bit: bool,
    pub smtputf8: bool,
}

impl Capabilities {
    fn parse(lines: &[String]) -> Capabilities {
        let mut caps = Capabilities::default();
        for line in lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            match words.next().map(str::to_ascii_uppercase).as_deref() {
                Some("PIPELINING") => caps.pipelining = true,
                Some("STARTTLS") => caps.starttls = true,
                Some("8BITMIME") => caps.eight_bit = true,
                Some("SMTPUTF8") => caps.smtputf8 = true,
                Some("SIZE") => caps.size = words.next().and_then(|n| n.parse().ok()),
                Some("AUTH") => {
                    for mech in words {
                        match mech.to_ascii_uppercase().as_str() {
                            "PLAIN" => caps.auth_plain = true,
                            "LOGIN" => caps.auth_login = true,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        caps
    }
}

/// A plain or TLS stream, so pooled connections have one type.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub command: Duration,
    pub data: Duration,
}

/// An open SMTP connection, greeted and EHLO'd.
pub struct Connection {
    io: BufReader<Stream>,
    pub caps: Capabilities,
    pub tls: bool,
    helo: String,
    timeouts: Timeouts,
}

/// Largest reply line we accept; RFC 5321 allows 512, servers send more in practice.
const MAX_REPLY_LINE: usize = 4096;

impl Connection {
    /// Connects, reads the greeting and says EHLO. With `implicit_tls`, TLS starts first.
    pub async fn open(
        addr: SocketAddr,
        server_name: &str,
        helo: &str,
        implicit_tls: Option<Arc<ClientConfig>>,
        timeouts: Timeouts,
    ) -> Result<Connection, ClientError> {
        let tcp = tokio::time::timeout(timeouts.connect, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout("connect"))?
            .map_err(|e| ClientError::Connect(addr, e))?;
        let _ = tcp.set_nodelay(true);
        let (stream, tls) = match implicit_tls {
            Some(config) => (
                Stream::Tls(Box::new(
                    handshake(tcp, server_name, config, timeouts).await?,
                )),
                true,
            ),
            None => (Stream::Plain(tcp), false),
        };
        let mut conn = Connection {
            io: BufReader::new(stream),
            caps: Capabilities::default(),
            tls,
            helo: helo.to_owned(),
            timeouts,
        };
        let greeting = conn.read("greeting", timeouts.command).await?;
        if greeting.code != 220 {
            return Err(ClientError::Refused(greeting.code, greeting.text));
        }
        conn.ehlo().await?;
        Ok(conn)
    }

    async fn ehlo(&mut self) -> Result<(), ClientError> {
        let reply = self.command(&format!("EHLO {}", self.helo), "EHLO").await?;
        if reply.code == 250 {
            self.caps = Capabilities::parse(&reply.lines);
            return Ok(());
        }
        let reply = self.command(&format!("HELO {}", self.helo), "HELO").await?;
        if reply.code != 250 {
            return Err(ClientError::Refused(reply.code, reply.text));
        }
        self.caps = Capabilities::default();
        Ok(())
    }

    /// STARTTLS, then EHLO again over TLS (RFC 3207).
    pub async fn starttls(
        self,
        server_name: &str,
        config: Arc<ClientConfig>,
    ) -> Result<Connection, ClientError> {
        let mut this = self;
        let reply = this.command("STARTTLS", "STARTTLS").await?;
        if reply.code != 220 {
            return Err(ClientError::Refused(reply.code, reply.text));
        }
        let Stream::Plain(tcp) = this.io.into_inner() else {
            return Err(ClientError::Protocol("STARTTLS inside TLS".into()));
        };
        let tls = handshake(tcp, server_name, config, this.timeouts).await?;
        let mut conn = Connection {
            io: BufReader::new(Stream::Tls(Box::new(tls))),
            caps: Capabilities::default(),
            tls: true,
            helo: this.helo,
            timeouts: this.timeouts,
        };
        conn.ehlo().await?;
        Ok(conn)
    }

    /// AUTH PLAIN (or LOGIN when PLAIN is not offered).
    pub async fn auth(&mut self, user: &str, password: &str) -> Result<(), ClientError> {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let reply = if self.caps.auth_plain || !self.caps.auth_login {
            let token = b64(&format!("\0{user}\0{password}"));
            self.command(&format!("AUTH PLAIN {token}"), "AUTH").await?
        } else {
            let r = self.command("AUTH LOGIN", "AUTH").await?;
            if r.code != 334 {
                return Err(ClientError::Refused(r.code, r.text));
            }
            let r = self.command(&b64(user), "AUTH").await?;
            if r.code != 334 {
                return Err(ClientError::Refused(r.code, r.text));
            }
            self.command(&b64(password), "AUTH").await?
        };
        if reply.code != 235 {
            return Err(ClientError::Refused(reply.code, reply.text));
        }
        Ok(())
    }

    /// One mail transaction. Returns one outcome per recipient. An error means the
    /// connection is unusable; its phase says whether the message may have been handed
    /// over (only then can another attempt duplicate it). A sender or recipient holding
    /// CR, LF or NUL fails for good before anything is written.
    pub async fn send(&mut self, tx: &Transaction<'_>) -> Result<Vec<Outcome>, SendError> {
        let mut known = tx.utf8_refusals(self.caps.smtputf8);
        refuse_unsafe(tx, &mut known);
        let active: Vec<usize> = (0..known.len()).filter(|&i| known[i].is_none()).collect();
        if active.is_empty() {
            return Ok(known.into_iter().flatten().collect());
        }
        let (mail_reply, rcpt_replies) = self
            .envelope(tx, &active)
            .await
            .map_err(|e| SendError::new(Phase::Envelope, e, &known))?;
        if mail_reply.code != 250 {
            self.reset()
                .await
                .map_err(|e| SendError::new(Phase::Envelope, e, &known))?;
            let outcome = mail_reply.outcome();
            for &i in &active {
                known[i] = Some(outcome.clone());
            }
            return Ok(known.into_iter().flatten().collect());
        }
        for (&i, r) in active.iter().zip(&rcpt_replies) {
            if r.code != 250 && r.code != 251 {
                known[i] = Some(r.outcome());
            }
        }
        if known.iter().all(Option::is_some) {
            self.reset()
                .await
                .map_err(|e| SendError::new(Phase::Envelope, e, &known))?;
            return Ok(known.into_iter().flatten().collect());
        }
        let data = self
            .command("DATA", "DATA")
            .await
            .map_err(|e| SendError::new(Phase::Envelope, e, &known))?;
        if data.code != 354 {
            let o = data.outcome();
            return Ok(known
                .into_iter()
                .map(|x| x.unwrap_or_else(|| o.clone()))
                .collect());
        }
        let wire = dot_stuff(tx.body);
        // Until the final dot is written completely the server cannot have taken the
        // message: a failure here is safe to retry anywhere.
        self.write_with(&wire, "DATA", self.timeouts.data)
            .await
            .map_err(|e| SendError::new(Phase::Body, e, &known))?;
        let final_reply = self
            .read("end of DATA", self.timeouts.data)
            .await
            .map_err(|e| SendError::new(Phase::AwaitingFinalReply, e, &known))?;
        let o = final_reply.outcome();
        Ok(known
            .into_iter()
            .map(|x| x.unwrap_or_else(|| o.clone()))
            .collect())
    }

    /// MAIL and the RCPTs of the `active` recipients, pipelined when offered; returns
    /// their replies (no RCPT replies when MAIL was refused without pipelining).
    async fn envelope(
        &mut self,
        tx: &Transaction<'_>,
        active: &[usize],
    ) -> Result<(Response, Vec<Response>), ClientError> {
        let mail = self.mail_command(tx);
        let mut rcpt_replies = Vec::with_capacity(active.len());
        if self.caps.pipelining {
            // Pipelined: the envelope in one write, then its replies (RFC 2920).
            let mut batch = format!("{mail}\r\n");
            for &i in active {
                let rcpt = tx.wire(tx.recipients[i], self.caps.smtputf8);
                batch.push_str(&format!("RCPT TO:<{rcpt}>\r\n"));
            }
            self.write(batch.as_bytes(), "MAIL").await?;
            let mail_reply = self.read("MAIL", self.timeouts.command).await?;
            for _ in active {
                rcpt_replies.push(self.read("RCPT", self.timeouts.command).await?);
            }
            return Ok((mail_reply, rcpt_replies));
        }
        let mail_reply = self.command(&mail, "MAIL").await?;
        if mail_reply.code == 250 {
            for &i in active {
                let line = format!(
                    "RCPT TO:<{}>",
                    tx.wire(tx.recipients[i], self.caps.smtputf8)
                );
                rcpt_replies.push(self.command(&line, "RCPT").await?);
            }
        }
        Ok((mail_reply, rcpt_replies))
    }

    /// `MAIL FROM` with the parameters the server offers and the message needs.
    fn mail_command(&self, tx: &Transaction<'_>) -> String {
        let mut mail = format!("MAIL FROM:<{}>", tx.wire(tx.sender, self.caps.smtputf8));
        if self.caps.size.is_some() {
            mail.push_str(&format!(" SIZE={}", tx.body.len()));
        }
        if self.caps.eight_bit && !tx.body.is_ascii() {
            mail.push_str(" BODY=8BITMIME");
        }
        if self.caps.smtputf8 && tx.needs_smtputf8() {
            mail.push_str(" SMTPUTF8");
        }
        mail
    }

    async fn reset(&mut self) -> Result<(), ClientError> {
        self.command("RSET", "RSET").await.map(|_| ())
    }

    /// The certificate chain the server presented in TLS (leaf first), if any.
    pub fn peer_certificates(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        match self.io.get_ref() {
            Stream::Tls(s) => s.get_ref().1.peer_certificates(),
            Stream::Plain(_) => None,
        }
    }

    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.command("QUIT", "QUIT")).await;
    }

    async fn command(&mut self, line: &str, step: &'static str) -> Result<Response, ClientError> {
        self.write(format!("{line}\r\n").as_bytes(), step).await?;
        self.read(step, self.timeouts.command).await
    }

    async fn write(&mut self, bytes: &[u8], step: &'static str) -> Result<(), ClientError> {
        self.write_with(bytes, step, self.timeouts.command).await
    }

    async fn write_with(
        &mut self,
        bytes: &[u8],
        step: &'static str,
        limit: Duration,
    ) -> Result<(), ClientError> {
        let io = self.io.get_mut();
        tokio::time::timeout(limit, async {
            io.write_all(bytes).await?;
            io.flush().await
        })
        .await
        .map_err(|_| ClientError::Timeout(step))?
        .map_err(|e| ClientError::Io(step, e))
    }

    /// Reads one reply, every line of it.
    async fn read(&mut self, step: &'static str, limit: Duration) -> Result<Response, ClientError> {
        tokio::time::timeout(limit, read_reply(&mut self.io, step))
            .await
            .map_err(|_| ClientError::Timeout(step))?
    }
}

async fn handshake(
    tcp: TcpStream,
    server_name: &str,
    config: Arc<ClientConfig>,
    timeouts: Timeouts,
) -> Result<TlsStream<TcpStream>, ClientError> {
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| ClientError::Protocol(format!("server name {server_name}: {e}")))?;
    tokio::time::timeout(
        timeouts.command,
        TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| ClientError::Timeout("TLS handshake"))?
    .map_err(ClientError::Tls)
}

async fn read_reply<R: AsyncRead + Unpin>(
    io: &mut BufReader<R>,
    step: &'static str,
) -> Result<Response, ClientError> {
    let mut lines = Vec::new();
    let mut code = 0;
    loop {
        let mut raw = Vec::new();
        let n = (&mut *io)
            .take(MAX_REPLY_LINE as u64)
            .read_until(b'\n', &mut raw)
            .await
            .map_err(|e| ClientError::Io(step, e))?;
        if n == 0 {
            return Err(ClientError::Closed(step));
        }
        let line = String::from_utf8_lossy(&raw);
        let line = line.trim_end();
        let parsed: Option<u16> = line.get(..3).and_then(|c| c.parse().ok());
        let Some(this_code) = parsed.filter(|c| (200..600).contains(c)) else {
            return Err(ClientError::Protocol(line.chars().take(80).collect()));
        };
        if code != 0 && this_code != code {
            return Err(ClientError::Protocol(format!(
                "reply code changed mid-reply: {line}"
            )));
        }
        code = this_code;
        let more = line.as_bytes().get(3) == Some(&b'-');
        lines.push(line.get(4..).unwrap_or("").to_owned());
        if !more {
            break;
        }
    }
    Ok(Response {
        code,
        text: lines.join(" "),
        lines,
    })
}

use tokio::io::AsyncReadExt as _;

/// Dot-stuffs a message body and appends the terminating `.` line (RFC 5321 §4.5.2).
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 5);
    // Line by line with memchr, copying whole lines: every delivery passes here.
    let mut rest = body;
    loop {
        if rest.first() == Some(&b'.') {
            out.push(b'.');
        }
        match memchr::memchr(b'\n', rest) {
            Some(i) => {
                out.extend_from_slice(&rest[..=i]);
                rest = &rest[i + 1..];
            }
            None => {
                out.extend_from_slice(rest);
                break;
            }
        }
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_stuffing() {
        assert_eq!(
            dot_stuff(b".a\r\nb\r\n..c\r\n"),
            b"..a\r\nb\r\n...c\r\n.\r\n"
        );
        assert_eq!(dot_stuff(b"no newline"), b"no newline\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b"\r\n.\r\n");
    }

    #[test]
    fn ehlo_keywords() {
        let lines: Vec<String> = [
            "mx.test hi",
            "PIPELINING",
            "SIZE 1000",
            "AUTH LOGIN PLAIN",
            "STARTTLS",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let caps = Capabilities::parse(&lines);
        assert!(caps.pipelining && caps.starttls && caps.auth_plain && caps.auth_login);
        assert_eq!(caps.size, Some(1000));
    }

    /// A real loopback peer that records every byte it receives.
    async fn recording_peer() -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut io = BufReader::new(stream);
            io.get_mut().write_all(b"220 peer\r\n").await.unwrap();
            let mut seen = Vec::new();
            loop {
                let mut line = Vec::new();
                if io.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                    return seen;
                }
                seen.extend_from_slice(&line);
                let reply: &[u8] = match line.get(..4) {
                    Some(b"EHLO") => b"250-peer\r\n250 PIPELINING\r\n",
                    Some(b"DATA") => b"354 go\r\n",
                    Some(b"QUIT") => b"221 bye\r\n",
                    _ if line == b".\r\n" => b"250 queued\r\n",
                    _ if seen.ends_with(b"\r\n.\r\n") || !line.is_ascii() => continue,
                    Some(b"MAIL" | b"RCPT" | b"RSET") => b"250 ok\r\n",
                    _ => continue,
                };
                io.get_mut().write_all(reply).await.unwrap();
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn command_lines_never_carry_cr_lf_or_nul() {
        let (addr, peer) = recording_peer().await;
        let timeouts = Timeouts {
            connect: Duration::from_secs(5),
            command: Duration::from_secs(5),
            data: Duration::from_secs(5),
        };
        let mut conn = Connection::open(addr, "peer", "relay.test", None, timeouts)
            .await
            .unwrap();
        let injected = "app@client.test>\r\nRCPT TO:<bcc@nowhere.example>\r\nNOOP";
        let tx = |sender, recipients| Transaction {
            sender,
            recipients,
            body: b"Subject: x\r\n\r\nhi\r\n",
            smtputf8: false,
        };
        let out = conn
            .send(&tx(injected, &["victim@good.test"]))
            .await
            .unwrap();
        assert!(
            matches!(&out[..], [Outcome::Permanent { reply, .. }] if reply.to_string().contains("CR, LF or NUL")),
            "{out:?}"
        );
        let out = conn
            .send(&tx(
                "app@client.test",
                &["ok@good.test", "x@y.test>\r\nRSET", "nul\0@y.test"],
            ))
            .await
            .unwrap();
        assert!(matches!(out[0], Outcome::Delivered { .. }), "{out:?}");
        assert!(matches!(out[1], Outcome::Permanent { .. }), "{out:?}");
        assert!(matches!(out[2], Outcome::Permanent { .. }), "{out:?}");
        conn.quit().await;
        let seen = String::from_utf8(peer.await.unwrap()).unwrap();
        let commands: Vec<&str> = seen
            .split("\r\n")
            .filter(|l| l.starts_with("MAIL") || l.starts_with("RCPT"))
            .collect();
        assert_eq!(
            commands,
            ["MAIL FROM:<app@client.test>", "RCPT TO:<ok@good.test>"],
            "{seen}"
        );
        assert!(
            !seen.contains("bcc@nowhere") && !seen.contains('\0'),
            "{seen}"
        );
    }

    #[tokio::test]
    async fn multi_line_reply() {
        let data: &[u8] = b"250-first\r\n250-second\r\n250 last\r\n";
        let mut io = BufReader::new(data);
        let r = read_reply(&mut io, "test").await.unwrap();
        assert_eq!(r.code, 250);
        assert_eq!(r.lines, ["first", "second", "last"]);
        // Enhanced codes repeated on each line of a multi-line reply are given once.
        let data: &[u8] = b"550-5.1.1 no such user\r\n550 5.1.1 see the docs\r\n";
        let r = read_reply(&mut BufReader::new(data), "test").await.unwrap();
        let reply = r.reply();
        assert_eq!(reply.enhanced, Some(Enhanced::new(5, 1, 1)));
        assert_eq!(reply.to_string(), "550 5.1.1 no such user see the docs");
        let mut bad = BufReader::new(&b"hello\r\n"[..]);
        assert!(read_reply(&mut bad, "test").await.is_err());
    }
}

//! Drives one SMTP connection: reads command lines within the 1000-octet limit, answers
//! pipelined commands in one write, receives DATA within the size limit, upgrades to
//! TLS, and enforces idle and data timeouts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use smtp_proto::request::receiver::{DataReceiver, DummyDataReceiver};
use smtp_proto::{Error as ParseError, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::reply::{self, Reply, fixed};
use super::session::{Action, Session};
use crate::intake::Intake;
use crate::reason::Reason;

/// RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets including CRLF.
pub const MAX_LINE: usize = 1000;
const READ_CHUNK: usize = 16 * 1024;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why no command line came.
enum LineError {
    TooLong,
    Timeout,
    Shutdown,
    Closed,
}

/// How a plain-text drive ended.
enum Exit {
    Close,
    StartTls,
}

struct Conn<S> {
    stream: S,
    buf: BytesMut,
    out: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(stream: S) -> Conn<S> {
        Conn {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            out: Vec::with_capacity(1024),
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.out.clear();
        }
        self.stream.flush().await
    }

    /// Reads more input. Replies gathered so far go out first: a pipelining client gets
    /// one write for its whole batch of commands.
    async fn fill(
        &mut self,
        timeout: Duration,
        shutdown: Option<&CancellationToken>,
    ) -> Result<(), LineError> {
        self.flush().await.map_err(|_| LineError::Closed)?;
        self.buf.reserve(READ_CHUNK);
        let read = tokio::time::timeout(timeout, self.stream.read_buf(&mut self.buf));
        let result = match shutdown {
            Some(token) => tokio::select! {
                r = read => r,
                () = token.cancelled() => return Err(LineError::Shutdown),
            },
            None => read.await,
        };
        match result {
            Err(_) => Err(LineError::Timeout),
            Ok(Ok(0)) | Ok(Err(_)) => Err(LineError::Closed),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// The next line, CRLF included. A line over the limit is skipped to its end without
    /// being buffered and reported as `TooLong`.
    async fn next_line(
        &mut self,
        timeout: Duration,
        shutdown: &CancellationToken,
    ) -> Result<BytesMut, LineError> {
        loop {
            if let Some(pos) = memchr(&self.buf) {
                let line = self.buf.split_to(pos + 1);
                return if line.len() > MAX_LINE {
                    Err(LineError::TooLong)
                } else {
                    Ok(line)
                };
            }
            if self.buf.len() > MAX_LINE {
                self.buf.clear();
                loop {
                    self.fill(timeout, None).await?;
                    if let Some(pos) = memchr(&self.buf) {
                        self.buf.advance(pos + 1);
                        return Err(LineError::TooLong);
                    }
                    self.buf.clear();
                }
            }
            self.fill(timeout, Some(shutdown)).await?;
        }
    }

    /// Receives a message body up to the terminating `CRLF.CRLF`. Returns `None` when it
    /// was larger than `max`: the excess is read and dropped, never held.
    async fn read_data(
        &mut self,
        max: usize,
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>, LineError> {
        let mut receiver = DataReceiver::new();
        let mut body = Vec::with_capacity(max.min(64 * 1024));
        // The receiver only recognises a dot that follows CRLF; seeding it with one lets
        // an empty message (`.` as the first line) end correctly. The seed is cut below.
        receiver.ingest(&mut b"\r\n".iter(), &mut body);
        let mut discard: Option<DummyDataReceiver> = None;
        loop {
            if !self.buf.is_empty() {
                let mut bytes = self.buf.iter();
                let done = match &mut discard {
                    Some(d) => d.ingest(&mut bytes),
                    None => receiver.ingest(&mut bytes, &mut body),
                };
                let consumed = self.buf.len() - bytes.as_slice().len();
                self.buf.advance(consumed);
                if discard.is_none() && body.len() > max + 2 {
                    discard = Some(DummyDataReceiver::new_data(&receiver));
                    body = Vec::new();
                }
                if done {
                    if discard.is_some() {
                        return Ok(None);
                    }
                    body.drain(..2);
                    return Ok(Some(body));
                }
            }
            self.fill(timeout, None).await?;
        }
    }
}

fn memchr(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n')
}

/// Serves one accepted connection to its end.
pub async fn serve(
    intake: Arc<Intake>,
    tls: Option<TlsAcceptor>,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let mut session = Session::new(intake, peer, tls.is_some());
    let mut conn = Conn::new(stream);
    session.greeting().write_to(&mut conn.out);
    if let Exit::Close = drive(&mut session, &mut conn, &shutdown).await {
        return;
    }
    let Some(acceptor) = tls else { return };
    let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(conn.stream)).await;
    let stream = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    session.tls_started();
    let mut conn = Conn::new(stream);
    drive(&mut session, &mut conn, &shutdown).await;
}

async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    session: &mut Session,
    conn: &mut Conn<S>,
    shutdown: &CancellationToken,
) -> Exit {
    let idle = session.config().smtp.idle_timeout.0;
    let data_timeout = session.config().smtp.data_timeout.0;
    loop {
        let action = match conn.next_line(idle, shutdown).await {
            Ok(line) if session.in_auth() => {
                session.auth_line(&String::from_utf8_lossy(&line)).await
            }
            Ok(line) => command(session, &line).await,
            Err(LineError::TooLong) => session.bad_command(fixed::LINE_TOO_LONG),
            Err(LineError::Timeout) => Action::Close(fixed::TIMEOUT),
            Err(LineError::Shutdown) => Action::Close(fixed::SHUTDOWN),
            Err(LineError::Closed) => return Exit::Close,
        };
        match action {
            Action::Reply(r) => r.write_to(&mut conn.out),
            Action::Raw(bytes) => conn.out.extend_from_slice(&bytes),
            Action::Challenge(text) => {
                conn.out
                    .extend_from_slice(format!("334 {text}\r\n").as_bytes());
            }
            Action::Close(r) => {
                r.write_to(&mut conn.out);
                let _ = conn.flush().await;
                return Exit::Close;
            }
            Action::StartTls => {
                fixed::START_TLS.write_to(&mut conn.out);
                if conn.flush().await.is_err() {
                    return Exit::Close;
                }
                // Anything pipelined after STARTTLS was sent in clear text and must not be
                // honoured inside the TLS session (RFC 3207 §4.2, CVE-2011-0411).
                conn.buf.clear();
                return Exit::StartTls;
            }
            Action::StartData => {
                conn.out
                    .extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
                let body = match conn
                    .read_data(session.max_message_size(), data_timeout)
                    .await
                {
                    Ok(body) => body,
                    Err(LineError::Timeout) => {
                        fixed::TIMEOUT.write_to(&mut conn.out);
                        let _ = conn.flush().await;
                        return Exit::Close;
                    }
                    Err(_) => return Exit::Close,
                };
                session.data_done(body).await.write_to(&mut conn.out);
            }
        }
    }
}

/// Parses one command line and hands it to the session.
async fn command(session: &mut Session, line: &[u8]) -> Action {
    match Request::parse(&mut line.iter()) {
        Ok(request) => session.handle(request).await,
        Err(e) => parse_error(session, e, line),
    }
}

fn parse_error(session: &mut Session, error: ParseError, line: &[u8]) -> Action {
    match error {
        ParseError::UnknownCommand => session.bad_command(fixed::UNKNOWN),
        ParseError::InvalidSenderAddress => session.bad_command(fixed::BAD_SENDER),
        // A recipient the parser cannot even read is a malformed recipient, counted like
        // any other, not a protocol error that would end the session.
        ParseError::InvalidRecipientAddress => {
            session.refuse_unparsed_rcpt(&String::from_utf8_lossy(line));
            Action::Reply(reply::for_reason(Reason::MalformedAddress))
        }
        ParseError::ResponseTooLong => session.bad_command(fixed::LINE_TOO_LONG),
        _ => session.bad_command(fixed::SYNTAX),
    }
}

/// The reply for a connection refused before its session starts.
pub async fn refuse(mut stream: TcpStream, reply: Reply) {
    let mut out = Vec::new();
    reply.write_to(&mut out);
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&out)).await;
    let _ = stream.shutdown().await;
}

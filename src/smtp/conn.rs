//! Drives one SMTP connection: reads command lines within the 1000-octet limit, answers
//! pipelined commands in one write, receives DATA within the size limit, upgrades to
//! TLS, and holds every wait to its deadline (see `limits`): a whole command line, a DATA
//! transfer at the minimum rate, the session's lifetime, shorter under stress, and an
//! eviction when the connection table needs the slot.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use smtp_proto::request::receiver::{DataReceiver, DummyDataReceiver};
use smtp_proto::{Error as ParseError, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::authgate::AuthGate;
use super::limits::{Deadline, Limits};
use super::line;
use super::reply::{self, Reply, fixed};
use super::session::{Action, Session};
use super::stress::Slot;
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
    Lifetime,
    Evicted,
    Shutdown,
    Closed,
}

impl LineError {
    /// The reply before closing, if the client is still there to read one.
    fn farewell(&self) -> Option<Reply> {
        match self {
            LineError::Timeout => Some(fixed::TIMEOUT),
            LineError::Lifetime => Some(fixed::LIFETIME),
            LineError::Evicted => Some(fixed::EVICTED),
            LineError::Shutdown => Some(fixed::SHUTDOWN),
            LineError::TooLong | LineError::Closed => None,
        }
    }
}

/// How a plain-text drive ended.
enum Exit {
    Close,
    StartTls,
}

/// What every wait of one session answers to besides the socket.
struct Watch {
    slot: Slot,
    stress: watch::Receiver<u64>,
    limits: Limits,
}

impl Watch {
    /// Resolves when the deadline passes (re-judged whenever stress starts or ends), or
    /// the session is evicted.
    async fn expire(&mut self, deadline: Deadline) -> LineError {
        loop {
            let at = deadline.at(self.slot.stressed());
            tokio::select! {
                () = tokio::time::sleep_until(at) => {
                    return if at >= self.limits.end { LineError::Lifetime } else { LineError::Timeout };
                }
                changed = self.stress.changed() => {
                    if changed.is_err() {
                        // The table is gone (never while a slot lives): keep the deadline.
                        tokio::time::sleep_until(at).await;
                    }
                }
                () = self.slot.evict.cancelled() => return LineError::Evicted,
            }
        }
    }
}

struct Conn<S> {
    stream: S,
    buf: BytesMut,
    out: Vec<u8>,
    /// Commands served from `buf` since the last read: see [`PIPELINED_SLICE`].
    served: u32,
}

/// Commands a session serves from its buffer before it lets other tasks run. A
/// pipelining client's 16 KiB read holds hundreds of short commands, all answered
/// without touching the socket, so tokio's budget never runs out; a flood of them on a
/// few sessions made every other session on the worker (the valid mail beside the
/// flood) wait a whole buffer per session per command.
const PIPELINED_SLICE: u32 = 16;

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(stream: S) -> Conn<S> {
        Conn {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            out: Vec::with_capacity(1024),
            served: 0,
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
    /// one write for its whole batch of commands. A client that does not read its
    /// replies is held to the same deadline.
    async fn fill(
        &mut self,
        watch: &mut Watch,
        deadline: Deadline,
        shutdown: Option<&CancellationToken>,
    ) -> Result<(), LineError> {
        let never = CancellationToken::new();
        let shutdown = shutdown.unwrap_or(&never);
        let Conn {
            stream,
            buf,
            out,
            served,
        } = self;
        *served = 0;
        buf.reserve(READ_CHUNK);
        let io = async {
            if !out.is_empty() {
                stream.write_all(out).await?;
                out.clear();
            }
            stream.flush().await?;
            stream.read_buf(buf).await
        };
        tokio::select! {
            r = io => match r {
                Ok(0) | Err(_) => Err(LineError::Closed),
                Ok(_) => Ok(()),
            },
            e = watch.expire(deadline) => Err(e),
            () = shutdown.cancelled() => Err(LineError::Shutdown),
        }
    }

    /// The next line, CRLF included, complete within one deadline. A line over the
    /// limit is skipped to its end without being buffered and reported as `TooLong`.
    async fn next_line(
        &mut self,
        watch: &mut Watch,
        shutdown: Option<&CancellationToken>,
    ) -> Result<BytesMut, LineError> {
        let deadline = watch.limits.command(Instant::now());
        self.served += 1;
        if self.served >= PIPELINED_SLICE {
            self.served = 0;
            tokio::task::yield_now().await;
        }
        loop {
            if let Some(pos) = memchr(&self.buf) {
                let line = self.buf.split_to(pos + 1);
                watch.slot.activity.touch();
                return if line.len() > MAX_LINE {
                    Err(LineError::TooLong)
                } else {
                    Ok(line)
                };
            }
            if self.buf.len() > MAX_LINE {
                self.buf.clear();
                loop {
                    self.fill(watch, deadline, None).await?;
                    if let Some(pos) = memchr(&self.buf) {
                        self.buf.advance(pos + 1);
                        return Err(LineError::TooLong);
                    }
                    self.buf.clear();
                }
            }
            self.fill(watch, deadline, shutdown).await?;
        }
    }

    /// Receives a message body up to the terminating `CRLF.CRLF`. Returns `None` when it
    /// was larger than `max`: the excess is read and dropped, never held.
    async fn read_data(
        &mut self,
        max: usize,
        watch: &mut Watch,
    ) -> Result<Option<Vec<u8>>, LineError> {
        let start = Instant::now();
        let (mut received, mut progress_mark) = (0u64, 0u64);
        let mut receiver = DataReceiver::new();
        // Sized for a typical message, not the largest: the buffer lives until the
        // commit, in every session at once.
        let mut body = Vec::with_capacity(max.min(8 * 1024));
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
                received += consumed as u64;
                // A second's worth at the minimum rate counts as progress: a dribbling
                // client never earns it, so it stays the first to be evicted.
                if received - progress_mark >= watch.limits.min_rate() {
                    progress_mark = received;
                    watch.slot.activity.touch();
                }
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
            let deadline = watch.limits.data(start, received);
            self.fill(watch, deadline, None).await?;
        }
    }
}

fn memchr(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n')
}

/// How long a farewell reply may take to leave: the client may not be reading.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(5);

/// What a session needs from the listener.
pub struct Context {
    pub intake: Arc<Intake>,
    pub tls: Option<TlsAcceptor>,
    pub auth: Arc<AuthGate>,
    pub slot: Slot,
    pub shutdown: CancellationToken,
}

/// Serves one accepted connection to its end.
pub async fn serve(ctx: Context, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let Context {
        intake,
        tls,
        auth,
        slot,
        shutdown,
    } = ctx;
    let mut session = Session::new(intake, peer, tls.is_some(), auth);
    let mut watch = Watch {
        stress: slot.watch(),
        limits: Limits::new(&session.config().smtp, Instant::now()),
        slot,
    };
    let mut conn = Conn::new(stream);
    session.greeting().write_to(&mut conn.out);
    if let Exit::Close = drive(&mut session, &mut conn, &mut watch, &shutdown).await {
        return;
    }
    let Some(acceptor) = tls else { return };
    let deadline = watch.limits.command(Instant::now());
    let deadline = Deadline {
        normal: deadline.normal.min(Instant::now() + TLS_HANDSHAKE_TIMEOUT),
        ..deadline
    };
    let stream = tokio::select! {
        r = acceptor.accept(conn.stream) => match r {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
        },
        _ = watch.expire(deadline) => return,
    };
    session.tls_started();
    let mut conn = Conn::new(stream);
    drive(&mut session, &mut conn, &mut watch, &shutdown).await;
}

/// Replies, then closes: the transaction in progress (if any) ends first, so that its
/// held refusals are counted before the client can see the reply.
async fn close<S: AsyncRead + AsyncWrite + Unpin>(
    session: &mut Session,
    conn: &mut Conn<S>,
    reply: Option<Reply>,
) -> Exit {
    session.end_transaction();
    if let Some(r) = reply {
        r.write_to(&mut conn.out);
    }
    let _ = tokio::time::timeout(FAREWELL_TIMEOUT, conn.flush()).await;
    Exit::Close
}

async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    session: &mut Session,
    conn: &mut Conn<S>,
    watch: &mut Watch,
    shutdown: &CancellationToken,
) -> Exit {
    loop {
        // An open transaction may finish within the grace period; an idle session is
        // told at its next command wait.
        let idle = !session.in_transaction();
        if idle && shutdown.is_cancelled() {
            return close(session, conn, Some(fixed::SHUTDOWN)).await;
        }
        let line = conn.next_line(watch, idle.then_some(shutdown)).await;
        let action = match line {
            Ok(line) if session.in_auth() => session.auth_line(&line).await,
            Ok(line) => command(session, &line).await,
            Err(LineError::TooLong) => session.bad_command(fixed::LINE_TOO_LONG),
            Err(e) => return close(session, conn, e.farewell()).await,
        };
        match action {
            Action::Reply(r) => r.write_to(&mut conn.out),
            Action::Raw(bytes) => conn.out.extend_from_slice(&bytes),
            Action::Challenge(text) => {
                conn.out
                    .extend_from_slice(format!("334 {text}\r\n").as_bytes());
            }
            Action::Close(r) => return close(session, conn, Some(r)).await,
            Action::StartTls => {
                fixed::START_TLS.write_to(&mut conn.out);
                let sent = tokio::time::timeout(FAREWELL_TIMEOUT, conn.flush()).await;
                if !matches!(sent, Ok(Ok(()))) {
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
                let body = match conn.read_data(session.max_message_size(), watch).await {
                    Ok(body) => body,
                    Err(e) => return close(session, conn, e.farewell()).await,
                };
                session.data_done(body).await.write_to(&mut conn.out);
            }
        }
    }
}

/// Parses one command line and hands it to the session.
async fn command(session: &mut Session, line: &[u8]) -> Action {
    if line::text(line).is_err() {
        return session.bad_command(line::refusal(line));
    }
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
            // The bytes were checked above: this is clean UTF-8 without NUL, CR or LF.
            session.refuse_unparsed_rcpt(line::text(line).unwrap_or_default());
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

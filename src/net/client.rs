//! A small outbound HTTP/1.1 client on hyper's `client::conn::http1`: send a request to
//! an `http://` or `https://` URL under one total timeout (and optionally a shorter one
//! for the connection), with a keep-alive pool per origin. The webhook courier, events,
//! guard alerts and `floodgate ctl` all use it.
//!
//! Cost: a pooled request is one write and one read on an open connection. A fresh one
//! adds a TCP connect, for https a TLS handshake (rustls, web roots, SNI from the host),
//! and one spawned task that drives the connection until it closes. Name resolution of a
//! host name goes through tokio's blocking-pool `getaddrinfo`. The response body is read
//! up to a bound; a longer body is cut and its connection not reused.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::{Clock, SystemClock};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{CONTENT_LENGTH, HOST, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Most idle connections kept per origin.
const MAX_IDLE_PER_ORIGIN: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("invalid URL `{0}`")]
    InvalidUrl(String),
    #[error("invalid header: {0}")]
    InvalidHeader(String),
    #[error("connect to {origin}: {source}")]
    Connect {
        origin: String,
        source: std::io::Error,
    },
    #[error("TLS with {origin}: {source}")]
    Tls {
        origin: String,
        source: std::io::Error,
    },
    /// The HTTP/1.1 handshake on a fresh connection failed.
    #[error("HTTP: {0}")]
    Handshake(hyper::Error),
    /// The connection broke while the request was sent or its answer awaited.
    #[error("HTTP: {0}")]
    Send(hyper::Error),
    /// The connection broke while the answer's body was read.
    #[error("HTTP: {0}")]
    Body(hyper::Error),
    #[error("no connection within {0:?}")]
    ConnectTimeout(Duration),
    #[error("no response within {0:?}")]
    Timeout(Duration),
}

/// What came back: the status, the headers, and at most the configured number of body
/// bytes.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The body was longer than the client reads and was cut.
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Origin {
    https: bool,
    host: String,
    port: u16,
    /// The address to connect to, when the caller resolved `host` itself.
    at: Option<IpAddr>,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

type Sender = SendRequest<Full<Bytes>>;

pub struct HttpClient {
    tls: TlsConnector,
    pool: Mutex<HashMap<Origin, Vec<(Sender, Instant)>>>,
    idle: Duration,
    max_body: usize,
    connect_timeout: Option<Duration>,
    /// Ages idle connections (the daemon's clock, so tests can move it).
    clock: Arc<dyn Clock>,
}

impl HttpClient {
    /// A client verifying servers against `tls` roots, keeping idle connections for
    /// `idle` (zero: a fresh connection per request), and reading at most `max_body`
    /// bytes of each response.
    pub fn new(tls: Arc<ClientConfig>, idle: Duration, max_body: usize) -> HttpClient {
        HttpClient {
            tls: TlsConnector::from(tls),
            pool: Mutex::default(),
            idle,
            max_body,
            connect_timeout: None,
            clock: Arc::new(SystemClock),
        }
    }

    /// Ages idle connections by `clock` instead of the system's.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> HttpClient {
        self.clock = clock;
        self
    }

    /// Gives up on a connection (TCP and TLS) after `limit`, within the request's own
    /// timeout, with [`HttpError::ConnectTimeout`].
    pub fn with_connect_timeout(mut self, limit: Duration) -> HttpClient {
        self.connect_timeout = Some(limit);
        self
    }

    /// POSTs `body` to `url` with `headers`; everything (connect, TLS, request, response
    /// body) must fit in `timeout`.
    pub async fn post(
        &self,
        url: &str,
        headers: &[(&str, String)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<HttpResponse, HttpError> {
        self.request(Method::POST, url, headers, body, timeout)
            .await
    }

    /// Sends one `method` request, under `timeout` as [`HttpClient::post`] does.
    pub async fn request(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, String)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<HttpResponse, HttpError> {
        self.request_at(method, url, None, headers, body, timeout)
            .await
    }

    /// As [`HttpClient::request`], connecting to `at` when given instead of resolving the
    /// URL's host with the system resolver: for callers that resolve through the daemon's
    /// own DNS (MTA-STS policy hosts, TLS report endpoints). TLS still verifies the URL's
    /// host name, and `Host:` names it.
    pub async fn request_at(
        &self,
        method: Method,
        url: &str,
        at: Option<IpAddr>,
        headers: &[(&str, String)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<HttpResponse, HttpError> {
        let uri: Uri = url
            .parse()
            .map_err(|_| HttpError::InvalidUrl(redact(url)))?;
        let mut origin = origin(&uri).ok_or_else(|| HttpError::InvalidUrl(redact(url)))?;
        origin.at = at;
        let mut req = Request::builder()
            .method(method)
            .uri(uri.path_and_query().map_or("/", |p| p.as_str()));
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
        req = req.header(HOST, authority);
        req = req.header(CONTENT_LENGTH, body.len());
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| HttpError::InvalidHeader(e.to_string()))?;
            let value = HeaderValue::from_str(value)
                .map_err(|e| HttpError::InvalidHeader(e.to_string()))?;
            req = req.header(name, value);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| HttpError::InvalidHeader(e.to_string()))?;
        tokio::time::timeout(timeout, self.exchange(&origin, req))
            .await
            .map_err(|_| HttpError::Timeout(timeout))?
    }

    async fn exchange(
        &self,
        origin: &Origin,
        mut req: Request<Full<Bytes>>,
    ) -> Result<HttpResponse, HttpError> {
        // A pooled connection the server closed meanwhile gives the request back unsent;
        // then it goes out on a fresh connection, so a POST is never sent twice.
        let response = loop {
            let (mut sender, pooled) = match self.checkout(origin) {
                Some(s) => (s, true),
                None => (self.connect_within(origin).await?, false),
            };
            if pooled && sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => break (resp, sender),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if pooled => req = unsent,
                    _ => return Err(HttpError::Send(e.into_error())),
                },
            }
        };
        let (resp, sender) = response;
        let (parts, mut body) = resp.into_parts();
        let mut buf = BytesMut::new();
        let mut complete = true;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.map_err(HttpError::Body)?.into_data() {
                let room = self.max_body.saturating_sub(buf.len());
                buf.extend_from_slice(&data[..data.len().min(room)]);
                if data.len() > room {
                    // The rest is not worth reading; the connection cannot be reused.
                    complete = false;
                    break;
                }
            }
        }
        if complete {
            self.checkin(origin, sender);
        }
        Ok(HttpResponse {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: buf.freeze(),
            truncated: !complete,
        })
    }

    fn checkout(&self, origin: &Origin) -> Option<Sender> {
        let mut pool = self.pool.lock();
        let idle = pool.get_mut(origin)?;
        let now = self.clock.now_instant();
        while let Some((sender, since)) = idle.pop() {
            if now.saturating_duration_since(since) < self.idle && !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    fn checkin(&self, origin: &Origin, sender: Sender) {
        if sender.is_closed() || self.idle.is_zero() {
            return;
        }
        let mut pool = self.pool.lock();
        let idle = pool.entry(origin.clone()).or_default();
        let now = self.clock.now_instant();
        idle.retain(|(s, since)| {
            now.saturating_duration_since(*since) < self.idle && !s.is_closed()
        });
        if idle.len() < MAX_IDLE_PER_ORIGIN {
            idle.push((sender, now));
        }
    }

    async fn connect_within(&self, origin: &Origin) -> Result<Sender, HttpError> {
        match self.connect_timeout {
            Some(limit) => tokio::time::timeout(limit, self.connect(origin))
                .await
                .map_err(|_| HttpError::ConnectTimeout(limit))?,
            None => self.connect(origin).await,
        }
    }

    async fn connect(&self, origin: &Origin) -> Result<Sender, HttpError> {
        let tcp = match origin.at {
            Some(ip) => TcpStream::connect((ip, origin.port)).await,
            None => TcpStream::connect((origin.host.as_str(), origin.port)).await,
        };
        let tcp = tcp.map_err(|source| HttpError::Connect {
            origin: origin.to_string(),
            source,
        })?;
        let _ = tcp.set_nodelay(true);
        if origin.https {
            let name = ServerName::try_from(origin.host.clone()).map_err(|e| HttpError::Tls {
                origin: origin.to_string(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            })?;
            let tls = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|source| HttpError::Tls {
                    origin: origin.to_string(),
                    source,
                })?;
            handshake(TokioIo::new(tls)).await
        } else {
            handshake(TokioIo::new(tcp)).await
        }
    }
}

async fn handshake<T>(io: T) -> Result<Sender, HttpError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = http1::handshake(io).await.map_err(HttpError::Handshake)?;
    // The connection task ends when the server closes or every sender is dropped (pool
    // eviction), so it needs no shutdown token of its own.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "http client connection ended");
        }
    });
    Ok(sender)
}

fn origin(uri: &Uri) -> Option<Origin> {
    let https = match uri.scheme_str()? {
        "http" => false,
        "https" => true,
        _ => return None,
    };
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some(Origin {
        https,
        host: host.to_owned(),
        port: uri.port_u16().unwrap_or(if https { 443 } else { 80 }),
        at: None,
    })
}

/// `url` without its query and credentials, for logs: query strings often carry tokens.
pub fn redact(url: &str) -> String {
    let no_query = url.split(['?', '#']).next().unwrap_or_default();
    match no_query.split_once("://") {
        Some((scheme, rest)) => {
            let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
            format!("{scheme}://{rest}")
        }
        None => no_query.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let o = origin(&"https://hooks.example/x?y".parse().unwrap()).unwrap();
        assert_eq!(
            (o.https, o.host.as_str(), o.port),
            (true, "hooks.example", 443)
        );
        let o = origin(&"http://[::1]:8080/".parse().unwrap()).unwrap();
        assert_eq!((o.https, o.host.as_str(), o.port), (false, "::1", 8080));
        assert_eq!(o.to_string(), "http://[::1]:8080");
        assert!(origin(&"ftp://a/".parse().unwrap()).is_none());
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redact("https://u:p@hooks.example/in?token=s3cret"),
            "https://hooks.example/in"
        );
        assert_eq!(redact("http://127.0.0.1:1/a#b"), "http://127.0.0.1:1/a");
    }
}

//! HTTP surfaces on hyper 1: the admin API and the JSON send API, sharing one small
//! server loop (which tells handlers the client's address and lets shutdown wait for
//! requests in flight) and the helpers for JSON bodies and replies.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod admin;
pub mod api;
pub mod daemon;
pub mod dashboard;
pub mod metrics;
pub mod unsubscribe;

pub type Body = Full<Bytes>;

/// The client's address, set on every request's extensions by [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// How shutdown waits for a server's connections: each runs on `tracker` (which the
/// caller waits on, within its grace period), and is dropped when `abort` fires.
#[derive(Clone)]
pub struct Drain {
    pub tracker: TaskTracker,
    pub abort: CancellationToken,
}

impl Drain {
    pub fn new(tracker: TaskTracker, abort: CancellationToken) -> Drain {
        Drain { tracker, abort }
    }
}

impl From<TaskTracker> for Drain {
    /// Tracked but never aborted: requests finish however long they take.
    fn from(tracker: TaskTracker) -> Drain {
        Drain::new(tracker, CancellationToken::new())
    }
}

/// Serves `handler` on `listener` until `shutdown`; connections in flight finish their
/// request (graceful shutdown) unless `drain.abort` fires first.
pub async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    shutdown: CancellationToken,
    drain: impl Into<Drain>,
) where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let Drain { tracker, abort } = drain.into();
    let handler = Arc::new(handler);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        let abort = abort.clone();
        tracker.spawn(async move {
            let service = service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(Peer(peer));
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = shutdown.cancelled() => {
                    // The request in flight is answered (its 202 may follow a commit
                    // already made); idle keep-alive connections close at once.
                    conn.as_mut().graceful_shutdown();
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        () = abort.cancelled() => {}
                    }
                }
            }
        });
    }
}

pub fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}

pub fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(
        status,
        &crate::admin_api::ErrorBody {
            error: message.to_owned(),
        },
    )
}

pub fn text(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("static response parts")
}

/// Reads a request body of at most `limit` bytes; `None` if larger or broken.
pub async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, Response<Body>> {
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(_) => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large or unreadable",
        )),
    }
}

/// Decodes `%XX` escapes in a path segment or query value (and `+` in queries).
pub fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// The query string as key/value pairs.
pub fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("spring%20sale", false), "spring sale");
        assert_eq!(percent_decode("a%40b.test", false), "a@b.test");
        assert_eq!(percent_decode("100%", false), "100%");
        assert_eq!(
            query_pairs(Some("campaign=a+b&reason=rejected")),
            [
                ("campaign".into(), "a b".into()),
                ("reason".into(), "rejected".into())
            ]
        );
    }
}

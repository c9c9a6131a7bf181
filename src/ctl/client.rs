//! The admin API as `floodgate ctl` sees it: one plain HTTP/1.1 request per call over a
//! fresh loopback connection (the daemon's own outbound client, [`HttpClient`]), with the
//! bearer token, under a bounded time, and errors sorted into the kinds a script can act
//! on.

use std::time::Duration;

use bytes::Bytes;
use hyper::{Method, StatusCode};

use crate::net::client::{HttpClient, HttpError};
use crate::net::tls;

/// A daemon that does not accept within this is as good as down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A purge of a large campaign deletes many rows in one transaction; give it time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest answer read (a failures page of 1,000 rows fits easily).
const MAX_RESPONSE: usize = 16 * 1024 * 1024;

/// Why a call failed, one variant per exit code that scripts rely on.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach the admin API at {addr}: {why} — is floodgate running?")]
    Unreachable { addr: String, why: String },
    #[error("{addr}: the admin token was refused (401)")]
    Unauthorized { addr: String },
    #[error("{addr}: {method} {path}: {status}: {message}")]
    Api {
        addr: String,
        method: Method,
        path: String,
        status: StatusCode,
        message: String,
    },
}

impl CtlError {
    /// The process exit code documented in `floodgate ctl --help`.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Api { .. } => 1,
            CtlError::Usage(_) => 2,
            CtlError::Unreachable { .. } => 3,
            CtlError::Unauthorized { .. } => 4,
        }
    }
}

pub struct Client {
    /// `host:port` as the operator gave it (or the config file has it).
    pub addr: String,
    token: String,
    /// Plain HTTP only; no idle connections kept (one call, one connection).
    http: HttpClient,
}

impl Client {
    pub fn new(addr: String, token: String) -> Client {
        let http = HttpClient::new(tls::opportunistic(), Duration::ZERO, MAX_RESPONSE)
            .with_connect_timeout(CONNECT_TIMEOUT);
        Client { addr, token, http }
    }

    pub async fn get(&self, path: &str) -> Result<serde_json::Value, CtlError> {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(
        &self,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, CtlError> {
        self.call(Method::POST, path, body).await
    }

    pub async fn put(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, CtlError> {
        self.call(Method::PUT, path, Some(body)).await
    }

    /// One request; the JSON answer of a 2xx, or the error that explains the failure.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, CtlError> {
        let body = Bytes::from(body.map(|b| b.to_string()).unwrap_or_default());
        self.call_raw(method, path, "application/json", body).await
    }

    /// As [`Client::call`] with a body that is not JSON (an import file).
    pub async fn call_raw(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> Result<serde_json::Value, CtlError> {
        let (status, bytes) = self
            .exchange(method.clone(), path, content_type, body)
            .await?;
        if status == StatusCode::UNAUTHORIZED {
            return Err(CtlError::Unauthorized {
                addr: self.addr.clone(),
            });
        }
        let value: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
        if !status.is_success() {
            let message = value
                .as_ref()
                .and_then(|v| v.get("error"))
                .and_then(|e| e.as_str())
                .map(str::to_owned)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_owned());
            return Err(CtlError::Api {
                addr: self.addr.clone(),
                method,
                path: path.to_owned(),
                status,
                message,
            });
        }
        value.ok_or_else(|| CtlError::Api {
            addr: self.addr.clone(),
            method,
            path: path.to_owned(),
            status,
            message: "the answer is not JSON — is this floodgate's admin listener?".into(),
        })
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), CtlError> {
        // `host:port` only, as a socket address is: a URL would quietly default a missing
        // port to 80. The connection's time limit covers finding the host.
        let _resolved = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host(&self.addr))
            .await
            .map_err(|_| self.unreachable(format!("no connection within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| self.unreachable(io_reason(&e)))?;
        let url = format!("http://{}{path}", self.addr);
        let headers = [
            ("authorization", format!("Bearer {}", self.token)),
            ("content-type", content_type.to_owned()),
            ("user-agent", "floodgate-ctl".to_owned()),
        ];
        let result = self
            .http
            .request(method, &url, &headers, body, REQUEST_TIMEOUT)
            .await;
        let response = result.map_err(|e| match e {
            HttpError::InvalidUrl(_) | HttpError::InvalidHeader(_) => {
                CtlError::Usage(format!("cannot build the request for {path}: {e}"))
            }
            HttpError::Connect { source, .. } => self.unreachable(io_reason(&source)),
            HttpError::ConnectTimeout(limit) => {
                self.unreachable(format!("no connection within {limit:?}"))
            }
            HttpError::Handshake(e) => self.unreachable(e.to_string()),
            HttpError::Tls { .. } => self.unreachable(e.to_string()),
            HttpError::Send(e) => self.unreachable(format!("the connection broke: {e}")),
            HttpError::Body(e) => self.unreachable(format!("the answer broke off: {e}")),
            HttpError::Timeout(limit) => self.unreachable(format!("no answer within {limit:?}")),
        })?;
        if response.truncated {
            return Err(self.unreachable("the answer broke off: length limit exceeded".into()));
        }
        let status = StatusCode::from_u16(response.status)
            .map_err(|e| self.unreachable(format!("the connection broke: {e}")))?;
        Ok((status, response.body))
    }

    fn unreachable(&self, why: String) -> CtlError {
        CtlError::Unreachable {
            addr: self.addr.clone(),
            why,
        }
    }
}

/// The usual socket errors in the words an operator expects, chosen by kind.
fn io_reason(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::ConnectionRefused => "connection refused".into(),
        ErrorKind::TimedOut => "connection timed out".into(),
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => "no route to host".into(),
        _ => e.to_string(),
    }
}

/// Percent-encodes a path segment or query value (campaign names hold `@`, spaces, ...).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_through_the_admin_decoder() {
        for name in ["spring sale", "flood0@client.test", "a/b+c%d", "ünï"] {
            let encoded = encode(name);
            assert!(!encoded.contains(['/', ' ', '+', '@']), "{encoded}");
            assert_eq!(crate::http::percent_decode(&encoded, true), name);
        }
    }

    #[test]
    fn exit_codes_are_the_documented_ones() {
        let unreachable = CtlError::Unreachable {
            addr: "127.0.0.1:8026".into(),
            why: "connection refused".into(),
        };
        assert_eq!(unreachable.exit_code(), 3);
        assert_eq!(
            unreachable.to_string(),
            "cannot reach the admin API at 127.0.0.1:8026: connection refused — is floodgate running?"
        );
        let refused = CtlError::Unauthorized {
            addr: "127.0.0.1:8026".into(),
        };
        assert_eq!(refused.exit_code(), 4);
        assert_eq!(CtlError::Usage(String::new()).exit_code(), 2);
    }
}

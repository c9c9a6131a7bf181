//! One signed POST: JSON body, Standard Webhooks headers (when there is a secret), one
//! attempt under a total timeout, and the answer sorted into accepted / refused / no
//! answer. The webhook courier, delivery events and guard alerts send through it and
//! decide from the [`Answer`] what it means for them.

use std::time::Duration;

use bytes::Bytes;

use super::client::{HttpClient, HttpError, HttpResponse};
use super::tls;
use crate::signing::Secret;

/// How long an idle connection to a receiver is kept for the next request.
const IDLE_CONNECTION: Duration = Duration::from_secs(30);

/// One request: the same `id` on every attempt lets the receiver drop duplicates.
#[derive(Debug, Clone)]
pub struct SignedPost<'a> {
    pub url: &'a str,
    /// `None`: sent unsigned, with only the content type.
    pub secret: Option<&'a Secret>,
    pub id: &'a str,
    /// `webhook-timestamp`, in seconds since the epoch.
    pub timestamp: i64,
    pub body: Bytes,
    pub timeout: Duration,
}

/// What came of one POST.
#[derive(Debug)]
pub enum Answer {
    /// A 2xx.
    Accepted(HttpResponse),
    /// Any other status.
    Refused(HttpResponse),
    /// No HTTP answer: bad URL, connection or TLS trouble, timeout.
    Failed(HttpError),
}

impl Answer {
    /// Whether a later attempt may fare better: no answer, 5xx, 408 and 429.
    pub fn retryable(&self) -> bool {
        match self {
            Answer::Accepted(_) => false,
            Answer::Refused(r) => r.status >= 500 || r.status == 408 || r.status == 429,
            Answer::Failed(_) => true,
        }
    }
}

impl From<Result<HttpResponse, HttpError>> for Answer {
    fn from(result: Result<HttpResponse, HttpError>) -> Answer {
        match result {
            Ok(r) if (200..300).contains(&r.status) => Answer::Accepted(r),
            Ok(r) => Answer::Refused(r),
            Err(e) => Answer::Failed(e),
        }
    }
}

/// A client for receivers on the public web (web roots; opportunistic TLS if the roots
/// cannot be loaded), reading at most `max_body` bytes of each answer.
pub fn web_client(max_body: usize) -> HttpClient {
    let config = tls::verified(None).unwrap_or_else(|_| tls::opportunistic());
    HttpClient::new(config, IDLE_CONNECTION, max_body)
}

/// Signs (if there is a secret) and sends one POST.
pub async fn post(client: &HttpClient, req: SignedPost<'_>) -> Answer {
    let headers = match req.secret {
        Some(secret) => secret.headers(req.id, req.timestamp, &req.body),
        None => vec![("content-type", "application/json".to_owned())],
    };
    client
        .post(req.url, &headers, req.body, req.timeout)
        .await
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16) -> Answer {
        Ok(HttpResponse {
            status,
            headers: hyper::HeaderMap::new(),
            body: Bytes::new(),
            truncated: false,
        })
        .into()
    }

    #[test]
    fn answers_sort_by_status_and_say_whether_to_retry() {
        for (status, accepted, retryable) in [
            (200, true, false),
            (204, true, false),
            (301, false, false),
            (400, false, false),
            (408, false, true),
            (410, false, false),
            (429, false, true),
            (500, false, true),
            (503, false, true),
        ] {
            let a = answer(status);
            assert_eq!(
                (matches!(a, Answer::Accepted(_)), a.retryable()),
                (accepted, retryable),
                "{status}"
            );
        }
        let failed: Answer = Err(HttpError::Timeout(Duration::from_secs(1))).into();
        assert!(failed.retryable());
    }
}

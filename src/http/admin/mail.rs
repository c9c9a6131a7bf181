//! "Where is my mail?" on the admin API: a message's trace, the search over queued
//! recipients, the queue operations (retry, cancel, domain hold and release), the export
//! a purge saves first and the requeue that puts it back, and the online backup. Each
//! operation goes through the queue writer in batches and answers with counts.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::Admin;
use crate::admin_api as api;
use crate::config::duration;
use crate::deliver::Reply;
use crate::http::{Body, error, json, query_pairs, read_body};
use crate::queue::backup::{self, BackupError};
use crate::queue::trace::{self, Find};
use crate::queue::{Claimed, OPS_BATCH, QueueError, QueueId, RecipientState, Target, ops};

/// The largest `POST /admin/v1/requeue` body (ctl sends a file in pieces below it).
pub const MAX_REQUEUE_BODY: usize = 16 * 1024 * 1024;

fn unavailable(e: QueueError) -> Response<Body> {
    error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
}

/// `since`/`until`: milliseconds since the epoch, or a duration ago (`1h`).
fn instant(now_ms: i64, key: &str, value: &str) -> Result<i64, String> {
    if let Ok(ms) = value.parse::<i64>() {
        return Ok(ms);
    }
    let ago = duration::parse(value)
        .map_err(|e| format!("{key}: milliseconds since the epoch or a duration ago: {e}"))?;
    Ok(now_ms - ago.as_millis() as i64)
}

/// Parses the query of `GET /admin/v1/messages`; `Err` is the message of a 400.
fn find_query(now_ms: i64, query: Option<&str>) -> Result<Find, String> {
    let mut f = Find {
        limit: 100,
        ..Find::default()
    };
    for (key, value) in query_pairs(query) {
        match key.as_str() {
            "rcpt" => f.rcpt = Some(value),
            "sender" => f.sender = Some(value),
            "campaign" => f.campaign = Some(value),
            "state" => {
                f.state = Some(match value.as_str() {
                    "scheduled" => RecipientState::Scheduled,
                    "held" => RecipientState::Held,
                    "delivered" => RecipientState::Delivered,
                    "failed" => RecipientState::Failed,
                    other => return Err(format!("unknown state `{other}`")),
                })
            }
            "since" => f.since_ms = Some(instant(now_ms, "since", &value)?),
            "until" => f.until_ms = Some(instant(now_ms, "until", &value)?),
            "cursor" => {
                f.cursor = Some(trace::parse_cursor(&value).ok_or("cursor: from next_cursor")?)
            }
            "limit" => {
                f.limit = value
                    .parse()
                    .map_err(|_| format!("limit: a number up to {}", trace::MAX_PAGE))?
            }
            other => return Err(format!("unknown parameter `{other}`")),
        }
    }
    if f.limit == 0 || f.limit > trace::MAX_PAGE {
        return Err(format!("limit: 1 to {}", trace::MAX_PAGE));
    }
    Ok(f)
}

async fn json_body<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    limit: usize,
) -> Result<T, Response<Body>> {
    let body = read_body(req, limit).await?;
    serde_json::from_slice(&body).map_err(|e| error(StatusCode::BAD_REQUEST, &format!("body: {e}")))
}

/// A saved message's envelope as the door would check it: CR, LF or NUL in an address
/// never reaches the wire, whatever a requeue file says.
fn check_saved(m: &api::SavedMessage) -> Result<(), String> {
    crate::address::parse_sender(&m.sender).map_err(|_| format!("{}: bad sender", m.queue_id))?;
    if m.queue_id.is_empty()
        || m.queue_id.len() > 64
        || !m.queue_id.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err("bad queue id".into());
    }
    for r in &m.recipients {
        let parsed = crate::address::parse(&r.address)
            .map_err(|_| format!("{}: bad recipient", m.queue_id))?;
        if parsed.domain != r.domain {
            return Err(format!(
                "{}: {} is not in {}",
                m.queue_id, r.address, r.domain
            ));
        }
    }
    Ok(())
}

impl Admin {
    pub(super) async fn message_trace(&self, queue_id: &str) -> Response<Body> {
        match self.intake.queue.trace(queue_id).await {
            Ok(Some(t)) => json(StatusCode::OK, &t),
            Ok(None) => error(
                StatusCode::NOT_FOUND,
                "no such message (or retention deleted it)",
            ),
            Err(e) => unavailable(e),
        }
    }

    pub(super) async fn find_messages(&self, query: Option<&str>) -> Response<Body> {
        let f = match find_query(self.now(), query) {
            Ok(f) => f,
            Err(message) => return error(StatusCode::BAD_REQUEST, &message),
        };
        match self.intake.queue.find(f).await {
            Ok((recipients, next_cursor)) => json(
                StatusCode::OK,
                &api::FindResponse {
                    recipients,
                    next_cursor,
                },
            ),
            Err(e) => unavailable(e),
        }
    }

    pub(super) async fn queue_op(&self, op: &str, req: Request<Incoming>) -> Response<Body> {
        let selector: api::Selector = match json_body(req, 4096).await {
            Ok(s) => s,
            Err(r) => return r,
        };
        let target = match Target::of(&selector) {
            Ok(t) => t,
            Err(why) => return error(StatusCode::BAD_REQUEST, why),
        };
        let done = match op {
            "retry" => {
                self.intake
                    .queue
                    .retry(target.clone())
                    .await
                    .map(|n| api::QueueOpResponse {
                        recipients: n,
                        notifications: 0,
                    })
            }
            "cancel" if matches!(target, Target::Message(_) | Target::Recipient(_)) => {
                self.cancel(target.clone()).await
            }
            "cancel" => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "cancel takes a message or a recipient",
                );
            }
            _ => return error(StatusCode::NOT_FOUND, "operation must be retry or cancel"),
        };
        match done {
            Ok(done) => {
                self.intake.wake.notify_one();
                tracing::warn!(op, target = ?target, recipients = done.recipients, notifications = done.notifications, "operator queue operation");
                json(StatusCode::OK, &done)
            }
            Err(e) => unavailable(e),
        }
    }

    /// Cancels in batches; after each, queues one notification per message when
    /// bounces are on.
    async fn cancel(&self, target: Target) -> Result<api::QueueOpResponse, QueueError> {
        let mut done = api::QueueOpResponse::default();
        loop {
            let (n, cancelled) = self.intake.queue.cancel_batch(target.clone()).await?;
            done.recipients += n as u64;
            if self.intake.config.load().delivery.bounces {
                for c in cancelled {
                    done.notifications += u64::from(self.notify_cancelled(c).await);
                }
            }
            if n < OPS_BATCH {
                return Ok(done);
            }
        }
    }

    /// Queues the notification for one message's cancelled recipients; false when there
    /// is none to send (null sender) or it could not be queued.
    async fn notify_cancelled(&self, c: ops::Cancelled) -> bool {
        let config = self.intake.config.load_full();
        let first = Claimed {
            id: 0,
            message_id: 0,
            queue_id: c.queue_id.clone(),
            sender: c.sender,
            campaign: c.campaign,
            address: String::new(),
            domain: String::new(),
            attempts: 0,
            received_at: 0,
            smtputf8: false,
            vars: None,
        };
        let reply = Reply::local(ops::CANCELLED);
        let failed: Vec<(String, Reply)> = c
            .addresses
            .into_iter()
            .map(|a| (a, reply.clone()))
            .collect();
        let id = QueueId::generate(self.intake.clock.now_us());
        let now = self.now();
        let Some(mut msg) =
            crate::scheduler::bounce::notification(&config, &first, &c.headers, &failed, id, now)
        else {
            return false;
        };
        msg.body = self
            .intake
            .signing
            .sign(std::mem::take(&mut msg.body))
            .await;
        match self.intake.queue.enqueue(msg).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, queue_id = %c.queue_id, "cancel notification not queued");
                false
            }
        }
    }

    pub(super) async fn domain_action(&self, domain: &str, action: &str) -> Response<Body> {
        let hold = match action {
            "hold" => true,
            "release" => false,
            _ => return error(StatusCode::NOT_FOUND, "action must be hold or release"),
        };
        let Some(domain) = crate::address::ascii_domain(domain) else {
            return error(StatusCode::BAD_REQUEST, "not a domain name");
        };
        match self.intake.queue.hold_domain(&domain, hold).await {
            Ok((changed, moved)) => {
                self.intake.wake.notify_one();
                tracing::warn!(%domain, action, changed, recipients = moved, "operator domain action");
                json(
                    StatusCode::OK,
                    &api::DomainActionResponse {
                        domain,
                        held: hold,
                        recipients: moved,
                    },
                )
            }
            Err(e) => unavailable(e),
        }
    }

    pub(super) async fn domain_holds(&self) -> Response<Body> {
        match self.intake.queue.domain_holds().await {
            Ok(holds) => json(StatusCode::OK, &holds),
            Err(e) => unavailable(e),
        }
    }

    pub(super) async fn export(&self, query: Option<&str>) -> Response<Body> {
        let (mut campaign, mut after) = (None, 0i64);
        for (key, value) in query_pairs(query) {
            match key.as_str() {
                "campaign" => campaign = Some(value),
                "after" => match value.parse() {
                    Ok(v) => after = v,
                    Err(_) => return error(StatusCode::BAD_REQUEST, "after: from next_cursor"),
                },
                other => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!("unknown parameter `{other}`"),
                    );
                }
            }
        }
        let Some(campaign) = campaign else {
            return error(StatusCode::BAD_REQUEST, "campaign is required");
        };
        // Refused rather than half done: a purge after an export that skipped them would
        // remove batch recipients nobody saved.
        match self.intake.queue.campaign_has_batches(&campaign).await {
            Ok(false) => {}
            Ok(true) => {
                return error(
                    StatusCode::CONFLICT,
                    &format!(
                        "campaign {campaign} has batch sends waiting; their recipients are \
                         rendered from the batch template and cannot be saved as messages \
                         (pause the campaign instead, or purge without --save)"
                    ),
                );
            }
            Err(e) => return unavailable(e),
        }
        match self.intake.queue.export_page(&campaign, after).await {
            Ok((messages, last, through)) => json(
                StatusCode::OK,
                &api::ExportPage {
                    messages,
                    next_cursor: last.map(|id| id.to_string()),
                    through,
                },
            ),
            Err(e) => unavailable(e),
        }
    }

    pub(super) async fn requeue(&self, req: Request<Incoming>) -> Response<Body> {
        let request: api::RequeueRequest = match json_body(req, MAX_REQUEUE_BODY).await {
            Ok(r) => r,
            Err(r) => return r,
        };
        if let Some(why) = request.messages.iter().find_map(|m| check_saved(m).err()) {
            return error(StatusCode::BAD_REQUEST, &why);
        }
        match self.intake.queue.requeue(request.messages).await {
            Ok(done) => {
                self.intake.wake.notify_one();
                tracing::warn!(
                    restored = done.messages_restored,
                    recipients = done.recipients,
                    unchanged = done.unchanged,
                    "operator requeue"
                );
                json(StatusCode::OK, &done)
            }
            Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        }
    }

    pub(super) async fn backup(&self, req: Request<Incoming>) -> Response<Body> {
        let request: api::BackupRequest = match json_body(req, 4096).await {
            Ok(r) => r,
            Err(r) => return r,
        };
        let config = self.intake.config.load_full();
        let dir = match backup::resolve(&config.queue.backup_dir(), &request.name) {
            Ok(d) => d,
            Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        let failures = request.failures.then(|| config.failures_db());
        match self.intake.queue.backup(dir, failures).await {
            Ok(done) => {
                tracing::warn!(dir = %done.dir, bytes = done.queue.bytes, integrity = %done.queue.integrity, took_ms = done.took_ms, "operator backup");
                json(StatusCode::OK, &done)
            }
            Err(e @ BackupError::Name(_)) => error(StatusCode::BAD_REQUEST, &e.to_string()),
            Err(e @ BackupError::Exists(_)) => error(StatusCode::CONFLICT, &e.to_string()),
            Err(e @ BackupError::Failed(_)) => {
                error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_queries_parse_or_say_why_not() {
        let f = find_query(
            10_000_000,
            Some("rcpt=a%40b.test&since=1h&state=scheduled&limit=5"),
        )
        .unwrap();
        assert_eq!(f.rcpt.as_deref(), Some("a@b.test"));
        assert_eq!(f.since_ms, Some(10_000_000 - 3_600_000));
        assert_eq!(f.state, Some(RecipientState::Scheduled));
        assert_eq!(f.limit, 5);
        for bad in [
            "limit=0",
            "limit=1001",
            "state=gone",
            "since=soon",
            "cursor=x",
            "what=1",
        ] {
            assert!(find_query(0, Some(bad)).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        /// Hostile queries and requeue files: an answer or a 400, never a panic, and a
        /// saved address with a control character never passes.
        #[test]
        fn arbitrary_queries_and_saved_envelopes_never_panic(
            query in "\\PC{0,120}",
            address in "\\PC{0,40}",
            cursor in "[0-9.]{0,24}",
        ) {
            let _ = find_query(0, Some(&query));
            let _ = trace::parse_cursor(&cursor);
            let saved = api::SavedMessage {
                queue_id: "Q1".into(),
                sender: address.clone(),
                campaign: None,
                source: "smtp".into(),
                client: "x".into(),
                identity: None,
                received_at_ms: 0,
                smtputf8: false,
                body_base64: String::new(),
                recipients: vec![api::SavedRecipient {
                    domain: address.rsplit('@').next().unwrap_or("").to_ascii_lowercase(),
                    address: address.clone(),
                    attempts: 0,
                }],
            };
            if check_saved(&saved).is_ok() {
                proptest::prop_assert!(!address.chars().any(char::is_control));
            }
        }
    }
}

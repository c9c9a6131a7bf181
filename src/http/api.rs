//! The JSON send API on `[http] listen`: `POST /v1/messages` (a JSON message in the shape
//! integrations already use with Postal, Mailgun, SendGrid and Postmark) and
//! `POST /v1/messages/raw` (an RFC 5322 message with its envelope in the query). Every
//! recipient passes the same door as SMTP; `202` means the message is on disk.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use base64::Engine;
use governor::{DefaultDirectRateLimiter, RateLimiter};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Body, error, json, query_pairs};
use crate::address::{self, Mailbox};
use crate::config::{ApiKeyConfig, Config};
use crate::intake::Intake;
use crate::policy::Submitter;
use crate::queue::{NewMessage, NewRecipient, QueueId, Source};
use crate::reason::Reason;
use crate::smtp::message::{self, Trace};
use crate::smtp::reply;

/// Seconds a client is told to wait when intake, a campaign or the queue says "not now".
const RETRY_AFTER_PAUSED: u64 = 60;
const RETRY_AFTER_QUEUE: u64 = 30;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    pub from: String,
    #[serde(default)]
    pub to: Vec<String>,
    #[serde(default)]
    pub cc: Vec<String>,
    #[serde(default)]
    pub bcc: Vec<String>,
    pub reply_to: Option<String>,
    #[serde(default)]
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
    #[serde(default)]
    pub headers: HashMap<String, String>,
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    pub campaign: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    pub filename: String,
    pub content_type: String,
    /// Base64.
    pub content: String,
}

/// One recipient's result in the response.
#[derive(Debug, Serialize)]
pub struct RecipientResult {
    pub address: String,
    /// `accepted` or `rejected`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enhanced_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl RecipientResult {
    fn accepted(address: &str) -> RecipientResult {
        RecipientResult {
            address: address.to_owned(),
            status: "accepted",
            code: None,
            enhanced_code: None,
            reason: None,
            message: None,
        }
    }

    fn rejected(address: &str, why: Reason) -> RecipientResult {
        let r = reply::for_reason(why);
        RecipientResult {
            address: address.to_owned(),
            status: "rejected",
            code: Some(r.code),
            enhanced_code: Some(r.status()),
            reason: Some(why.as_str()),
            message: Some(r.text.into_owned()),
        }
    }
}

/// Headers the API sets itself; `headers{}` may not override them.
const RESERVED: &[&str] = &[
    "from",
    "to",
    "cc",
    "bcc",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "received",
    "sender",
];

pub struct Api {
    pub intake: Arc<Intake>,
    limiters: Mutex<HashMap<String, Arc<DefaultDirectRateLimiter>>>,
    in_flight: Mutex<HashSet<String>>,
}

/// An authenticated caller.
struct Caller {
    name: String,
    campaign: Option<String>,
}

/// Releases an idempotency key held while its request is processed.
struct InFlight<'a> {
    set: &'a Mutex<HashSet<String>>,
    key: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.set.lock().expect("in-flight lock").remove(&self.key);
    }
}

fn with_retry_after(mut r: Response<Body>, secs: u64) -> Response<Body> {
    r.headers_mut().insert(
        hyper::header::RETRY_AFTER,
        hyper::header::HeaderValue::from(secs),
    );
    r
}

/// Hex SHA-256, as stored in `key_sha256`.
pub fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl Api {
    pub fn new(intake: Arc<Intake>) -> Api {
        Api {
            intake,
            limiters: Mutex::default(),
            in_flight: Mutex::default(),
        }
    }

    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let raw = match (req.method(), req.uri().path()) {
            (&Method::POST, "/v1/messages") => false,
            (&Method::POST, "/v1/messages/raw") => true,
            (_, "/v1/messages" | "/v1/messages/raw") => {
                return error(StatusCode::METHOD_NOT_ALLOWED, "use POST");
            }
            _ => return error(StatusCode::NOT_FOUND, "no such endpoint"),
        };
        let config = self.intake.config.load_full();
        let Some(caller) = self.authenticate(&config, &req) else {
            let mut r = error(StatusCode::UNAUTHORIZED, "missing or unknown API key");
            r.headers_mut().insert(
                "www-authenticate",
                hyper::header::HeaderValue::from_static("Bearer"),
            );
            return r;
        };
        if !self.within_rate(&config, &caller) {
            return with_retry_after(
                error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate limit of this API key exceeded",
                ),
                1,
            );
        }
        if self.intake.campaigns().intake_paused() {
            return with_retry_after(
                error(StatusCode::SERVICE_UNAVAILABLE, "intake is paused"),
                RETRY_AFTER_PAUSED,
            );
        }
        let declared = req
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > config.http.max_request_size as u64) {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body exceeds max_request_size",
            );
        }
        let idempotency = match req.headers().get("idempotency-key").map(|v| v.to_str()) {
            None => None,
            Some(Ok(k)) if !k.is_empty() && k.len() <= 255 => {
                Some(key_hash(&format!("{}\0{k}", caller.name)))
            }
            Some(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "Idempotency-Key must be 1 to 255 visible characters",
                );
            }
        };
        let _held = match &idempotency {
            Some(key) => match self.hold(key, &config).await {
                Ok(held) => Some(held),
                Err(response) => return response,
            },
            None => None,
        };
        let query = req.uri().query().map(str::to_owned);
        let body = match super::read_body(req, config.http.max_request_size).await {
            Ok(b) => b,
            Err(_) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body exceeds max_request_size",
                );
            }
        };
        let prepared = if raw {
            raw_message(query.as_deref(), body.to_vec())
        } else {
            json_message(&body)
        };
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => return e.response(),
        };
        self.submit(&config, &caller, prepared, idempotency).await
    }

    fn authenticate(&self, config: &Config, req: &Request<Incoming>) -> Option<Caller> {
        let given = req
            .headers()
            .get(hyper::header::AUTHORIZATION)?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")?;
        let hash = key_hash(given.trim());
        // Compare against every key, always, so timing does not tell how many match.
        let mut found: Option<&ApiKeyConfig> = None;
        for key in &config.http.api_keys {
            if bool::from(
                hash.as_bytes()
                    .ct_eq(key.key_sha256.to_ascii_lowercase().as_bytes()),
            ) {
                found = Some(key);
            }
        }
        found.map(|k| Caller {
            name: k.name.clone(),
            campaign: k.campaign.clone(),
        })
    }

    fn within_rate(&self, config: &Config, caller: &Caller) -> bool {
        let Some(rate) = config
            .http
            .api_keys
            .iter()
            .find(|k| k.name == caller.name)
            .and_then(|k| k.rate)
        else {
            return true;
        };
        let limiter = self
            .limiters
            .lock()
            .expect("limiters lock")
            .entry(format!("{}\0{rate:?}", caller.name))
            .or_insert_with(|| {
                let burst = std::num::NonZeroU32::new(rate.count).expect("rate count above 0");
                Arc::new(RateLimiter::direct(rate.quota().allow_burst(burst)))
            })
            .clone();
        limiter.check().is_ok()
    }

    /// Replays a stored response, refuses a concurrent duplicate, or holds the key.
    async fn hold<'a>(
        &'a self,
        key: &str,
        config: &Config,
    ) -> Result<InFlight<'a>, Response<Body>> {
        match self
            .intake
            .queue
            .idempotent_response(key, config.http.idempotency_ttl.0)
            .await
        {
            Ok(Some((status, body))) => return Err(replay(status, body)),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "idempotency lookup failed");
                return Err(with_retry_after(
                    error(StatusCode::SERVICE_UNAVAILABLE, "queue unavailable"),
                    RETRY_AFTER_QUEUE,
                ));
            }
        }
        if !self
            .in_flight
            .lock()
            .expect("in-flight lock")
            .insert(key.to_owned())
        {
            return Err(error(
                StatusCode::CONFLICT,
                "a request with this Idempotency-Key is in progress",
            ));
        }
        Ok(InFlight {
            set: &self.in_flight,
            key: key.to_owned(),
        })
    }

    async fn submit(
        &self,
        config: &Config,
        caller: &Caller,
        p: Prepared,
        idempotency: Option<String>,
    ) -> Response<Body> {
        let campaign = p
            .campaign
            .clone()
            .or_else(|| caller.campaign.clone())
            .unwrap_or_else(|| caller.name.clone());
        let campaign = message::campaign_name(&campaign);
        let campaign = (!campaign.is_empty()).then_some(campaign);
        if let Err(reason) = self.intake.policy.check_open(campaign.as_deref()) {
            for r in &p.recipients {
                self.intake.refused(campaign.as_deref(), reason, r);
            }
            let status = if reason == Reason::IntakePaused {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::TOO_MANY_REQUESTS
            };
            return with_retry_after(
                error(
                    status,
                    &format!("{}: try again later", reason.as_str().replace('_', " ")),
                ),
                RETRY_AFTER_PAUSED,
            );
        }
        let who = Submitter {
            trusted_network: false,
            authenticated: true,
        };
        let mut results = Vec::with_capacity(p.recipients.len());
        let mut accepted: Vec<Mailbox> = Vec::new();
        for address in &p.recipients {
            match self
                .intake
                .policy
                .check_rcpt(config, who, campaign.as_deref(), accepted.len(), address)
                .await
            {
                Ok(m) => {
                    results.push(RecipientResult::accepted(address));
                    accepted.push(m);
                }
                Err(reason) => {
                    self.intake.refused(campaign.as_deref(), reason, address);
                    results.push(RecipientResult::rejected(address, reason));
                }
            }
        }
        let now_us = self.intake.clock.now_us();
        let queue_id = QueueId::generate(now_us);
        if accepted.is_empty() {
            let body = serde_json::json!({ "error": "every recipient was rejected", "recipients": results });
            let response = (422, body.to_string());
            if let Some(key) = idempotency {
                // Remember the refusal too, so a retry with the same key gets the same answer.
                let _ = self
                    .intake
                    .queue
                    .enqueue_idempotent(None, key, response.clone(), config.http.idempotency_ttl.0)
                    .await;
            }
            return replay(response.0, response.1);
        }
        let body = match p.body {
            Body_::Raw(b) => b,
            Body_::Json(req) => match build_mime(&req, &queue_id, &config.server.hostname) {
                Ok(b) => b,
                Err(e) => return error(StatusCode::BAD_REQUEST, &e),
            },
        };
        let trace = message::received_header(&Trace {
            helo: &caller.name,
            peer: std::net::Ipv4Addr::LOCALHOST.into(),
            hostname: &config.server.hostname,
            protocol: "HTTP",
            queue_id: queue_id.as_str(),
            single_recipient: None,
            now_us,
        });
        let mut stored = trace.into_bytes();
        stored.extend_from_slice(&body);
        if stored.len() > config.smtp.max_message_size {
            for m in &accepted {
                self.intake
                    .refused(campaign.as_deref(), Reason::MessageTooBig, &m.address);
            }
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "message exceeds max_message_size",
            );
        }
        let msg = NewMessage {
            queue_id: queue_id.clone(),
            sender: p.sender,
            campaign: campaign.clone(),
            source: Source::Http,
            client: caller.name.clone(),
            body: stored,
            recipients: accepted
                .into_iter()
                .map(|m| NewRecipient {
                    address: m.address,
                    domain: m.domain,
                })
                .collect(),
        };
        let response_body = serde_json::json!({ "id": queue_id.as_str(), "campaign": campaign, "recipients": results }).to_string();
        let outcome = match idempotency {
            Some(key) => {
                self.intake
                    .enqueue_idempotent(
                        msg,
                        key,
                        (202, response_body.clone()),
                        config.http.idempotency_ttl.0,
                    )
                    .await
            }
            None => self.intake.enqueue(msg).await.map(|()| None),
        };
        match outcome {
            Ok(Some((status, body))) => replay(status, body),
            Ok(None) => replay(202, response_body),
            Err(_) => with_retry_after(
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "queue unavailable, try again later",
                ),
                RETRY_AFTER_QUEUE,
            ),
        }
    }
}

fn replay(status: u16, body: String) -> Response<Body> {
    super::text(
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        "application/json",
        body,
    )
}

enum Body_ {
    Json(Box<SendRequest>),
    Raw(Vec<u8>),
}

/// A request checked for shape, before the door.
struct Prepared {
    sender: String,
    recipients: Vec<String>,
    campaign: Option<String>,
    body: Body_,
}

/// A request field at fault: answered 400 with the field named.
struct FieldError {
    field: String,
    why: String,
}

impl FieldError {
    fn response(&self) -> Response<Body> {
        json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({ "error": format!("{}: {}", self.field, self.why), "field": self.field }),
        )
    }
}

fn field_error(field: &str, why: &str) -> FieldError {
    FieldError {
        field: field.to_owned(),
        why: why.to_owned(),
    }
}

fn json_message(body: &[u8]) -> Result<Prepared, FieldError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let req: SendRequest = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "body".to_owned() } else { path };
        field_error(&field, &e.into_inner().to_string())
    })?;
    let sender =
        parse_mailbox(&req.from).ok_or_else(|| field_error("from", "not a valid address"))?;
    for (list, name) in [(&req.to, "to"), (&req.cc, "cc"), (&req.bcc, "bcc")] {
        for (i, a) in list.iter().enumerate() {
            if a.contains(['\r', '\n']) {
                return Err(field_error(
                    &format!("{name}[{i}]"),
                    "line breaks are not allowed",
                ));
            }
        }
    }
    if req.to.is_empty() && req.cc.is_empty() && req.bcc.is_empty() {
        return Err(field_error("to", "at least one recipient in to, cc or bcc"));
    }
    for (name, value) in &req.headers {
        let bad_name = name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        if bad_name || value.contains(['\r', '\n']) {
            return Err(field_error(
                &format!("headers.{name}"),
                "not a valid header",
            ));
        }
        if RESERVED.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(field_error(
                &format!("headers.{name}"),
                "set by its own field, not in headers",
            ));
        }
    }
    if req.subject.contains(['\r', '\n']) {
        return Err(field_error("subject", "line breaks are not allowed"));
    }
    for (i, a) in req.attachments.iter().enumerate() {
        if base64::engine::general_purpose::STANDARD
            .decode(a.content.as_bytes())
            .is_err()
        {
            return Err(field_error(
                &format!("attachments[{i}].content"),
                "not valid base64",
            ));
        }
    }
    let mut seen = HashSet::new();
    let recipients: Vec<String> = req
        .to
        .iter()
        .chain(&req.cc)
        .chain(&req.bcc)
        .map(|a| bare_address(a).to_owned())
        .filter(|a| seen.insert(a.to_ascii_lowercase()))
        .collect();
    Ok(Prepared {
        sender: sender.address,
        recipients,
        campaign: req.campaign.clone(),
        body: Body_::Json(Box::new(req)),
    })
}

fn raw_message(query: Option<&str>, body: Vec<u8>) -> Result<Prepared, FieldError> {
    let mut sender = None;
    let mut recipients = Vec::new();
    let mut campaign = None;
    for (k, v) in query_pairs(query) {
        match k.as_str() {
            "from" => sender = Some(v),
            "to" => recipients.push(v),
            "campaign" => campaign = Some(v),
            other => {
                return Err(field_error(
                    other,
                    "unknown parameter (use from, to, campaign)",
                ));
            }
        }
    }
    let sender =
        sender.ok_or_else(|| field_error("from", "the envelope sender is required (?from=)"))?;
    if !sender.is_empty() && parse_mailbox(&sender).is_none() {
        return Err(field_error("from", "not a valid address"));
    }
    if recipients.is_empty() {
        return Err(field_error("to", "at least one recipient (?to=)"));
    }
    if body.is_empty() {
        return Err(field_error("body", "the RFC 5322 message is empty"));
    }
    let mut body = body;
    // Normalise bare LF line ends: the stored message is sent over SMTP as is.
    if body.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r') || body.first() == Some(&b'\n') {
        let mut fixed = Vec::with_capacity(body.len() + body.len() / 40);
        let mut prev = 0u8;
        for &b in &body {
            if b == b'\n' && prev != b'\r' {
                fixed.push(b'\r');
            }
            fixed.push(b);
            prev = b;
        }
        body = fixed;
    }
    let mut seen = HashSet::new();
    recipients.retain(|a| seen.insert(a.to_ascii_lowercase()));
    Ok(Prepared {
        sender,
        recipients,
        campaign: campaign.or_else(|| message::header_value(&body, "X-Campaign-ID")),
        body: Body_::Raw(body),
    })
}

/// `Name <addr>` or `addr` → `addr`.
fn bare_address(s: &str) -> &str {
    match (s.rfind('<'), s.rfind('>')) {
        (Some(a), Some(b)) if a < b => s[a + 1..b].trim(),
        _ => s.trim(),
    }
}

fn display_name(s: &str) -> Option<&str> {
    s.rfind('<')
        .map(|a| s[..a].trim().trim_matches('"').trim())
        .filter(|n| !n.is_empty())
}

fn parse_mailbox(s: &str) -> Option<Mailbox> {
    address::parse(bare_address(s)).ok()
}

fn mb_address(s: &str) -> mail_builder::headers::address::Address<'_> {
    mail_builder::headers::address::Address::new_address(display_name(s), bare_address(s))
}

fn build_mime(req: &SendRequest, queue_id: &QueueId, hostname: &str) -> Result<Vec<u8>, String> {
    use mail_builder::MessageBuilder;
    use mail_builder::headers::address::Address;
    use mail_builder::headers::raw::Raw;

    let mut b = MessageBuilder::new()
        .from(mb_address(&req.from))
        .subject(req.subject.as_str())
        .message_id(format!("{}@{hostname}", queue_id.as_str()));
    if !req.to.is_empty() {
        b = b.to(Address::new_list(
            req.to.iter().map(|a| mb_address(a)).collect(),
        ));
    }
    if !req.cc.is_empty() {
        b = b.cc(Address::new_list(
            req.cc.iter().map(|a| mb_address(a)).collect(),
        ));
    }
    // Bcc recipients are in the envelope only, never in the headers.
    if let Some(r) = &req.reply_to {
        b = b.reply_to(mb_address(r));
    }
    let mut names: Vec<&String> = req.headers.keys().collect();
    names.sort();
    for name in names {
        b = b.header(name.as_str(), Raw::new(req.headers[name].as_str()));
    }
    let tags;
    if !req.tags.is_empty() {
        tags = req.tags.join(", ").replace(['\r', '\n'], " ");
        b = b.header("X-Floodgate-Tags", Raw::new(tags.as_str()));
    }
    let metadata;
    if !req.metadata.is_empty() {
        metadata = serde_json::Value::Object(req.metadata.clone()).to_string();
        b = b.header("X-Floodgate-Metadata", Raw::new(metadata.as_str()));
    }
    if let Some(c) = &req.campaign {
        b = b.header("X-Campaign-ID", Raw::new(c.as_str()));
    }
    if let Some(text) = &req.text {
        b = b.text_body(text.as_str());
    }
    if let Some(html) = &req.html {
        b = b.html_body(html.as_str());
    }
    if req.text.is_none() && req.html.is_none() && req.attachments.is_empty() {
        b = b.text_body("");
    }
    for a in &req.attachments {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(a.content.as_bytes())
            .map_err(|_| format!("attachment {}: not valid base64", a.filename))?;
        b = b.attachment(a.content_type.as_str(), a.filename.as_str(), bytes);
    }
    b.write_to_vec()
        .map_err(|e| format!("cannot build the message: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_with_names() {
        assert_eq!(bare_address("Alice <alice@a.test>"), "alice@a.test");
        assert_eq!(bare_address("bob@b.test"), "bob@b.test");
        assert_eq!(display_name("\"Alice A\" <alice@a.test>"), Some("Alice A"));
        assert_eq!(display_name("bob@b.test"), None);
    }

    #[test]
    fn field_errors_name_the_field() {
        let err = match json_message(br#"{"from":"a@b.test","to":[1]}"#) {
            Err(e) => e,
            Ok(_) => panic!("accepted a number as an address"),
        };
        assert_eq!(err.field, "to[0]");
        assert_eq!(err.response().status(), StatusCode::BAD_REQUEST);
        assert!(json_message(br#"{"from":"a@b.test","tos":["x@y.test"]}"#).is_err());
        assert!(
            json_message(br#"{"from":"a@b.test","to":["x@y.test"],"headers":{"Subject":"x"}}"#)
                .is_err()
        );
        assert!(json_message(br#"{"from":"a@b.test","to":["x@y.test"]}"#).is_ok());
    }

    #[test]
    fn mime_keeps_bcc_out_of_headers() {
        let req: SendRequest = serde_json::from_str(
            r#"{"from":"App <app@a.test>","to":["x@y.test"],"bcc":["hidden@y.test"],"subject":"Hi","text":"hello","html":"<p>hello</p>","headers":{"X-Thing":"1"},"attachments":[{"filename":"a.txt","content_type":"text/plain","content":"aGVsbG8="}],"tags":["t1"]}"#,
        )
        .unwrap();
        let mime =
            String::from_utf8(build_mime(&req, &QueueId::generate(1), "relay.test").unwrap())
                .unwrap();
        assert!(mime.contains("Subject: Hi"), "{mime}");
        assert!(mime.contains("X-Thing: 1"), "{mime}");
        assert!(mime.contains("multipart/"), "{mime}");
        assert!(!mime.contains("hidden@y.test"), "{mime}");
        assert!(mime.contains("X-Floodgate-Tags: t1"), "{mime}");
    }
}

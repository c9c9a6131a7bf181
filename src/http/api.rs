//! The JSON send API on `[http] listen`: `POST /v1/messages` (a JSON message in the shape
//! integrations already use with Postal, Mailgun, SendGrid and Postmark) and
//! `POST /v1/messages/raw` (an RFC 5322 message with its envelope in the query). Every
//! recipient passes the same door as SMTP; `202` means the message is on disk.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use governor::{DefaultDirectRateLimiter, RateLimiter};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use parking_lot::Mutex;
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub mod batch;
mod compose;
mod rows;

pub use compose::{Attachment, SendRequest};
use compose::{Body_, Prepared, build_mime, json_message, raw_message};

use super::{Body, error};
use crate::address::Mailbox;
use crate::cluster::Reservation;
use crate::config::{ApiKeyConfig, Config};
use crate::intake::Intake;
use crate::policy::Submitter;
use crate::queue::{NewMessage, NewRecipient, QueueId, Remembered, Source};
use crate::reason::Reason;
use crate::smtp::message::{self, Trace};

/// Seconds a client is told to wait when intake, a campaign or the queue says "not now".
const RETRY_AFTER_PAUSED: u64 = 60;
const RETRY_AFTER_QUEUE: u64 = 30;
/// Every recipient was refused only for now (a DNS outage, a rate limit).
const RETRY_AFTER_TEMPORARY: u64 = 30;

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
        let r = why.reply();
        RecipientResult {
            address: address.to_owned(),
            status: "rejected",
            code: Some(r.code),
            enhanced_code: Some(r.status()),
            reason: Some(why.as_str()),
            message: Some(r.text.to_owned()),
        }
    }
}

pub struct Api {
    pub intake: Arc<Intake>,
    limiters: Mutex<HashMap<String, Arc<DefaultDirectRateLimiter>>>,
    in_flight: Mutex<HashSet<String>>,
}

/// An authenticated caller.
struct Caller {
    name: String,
    campaign: Option<String>,
    /// The client's IP address, for the `Received:` header.
    peer: std::net::IpAddr,
}

impl Caller {
    /// The request's campaign, else the key's, else the key's name.
    fn campaign_for(&self, requested: Option<&str>) -> Option<String> {
        let campaign = requested.or(self.campaign.as_deref()).unwrap_or(&self.name);
        let campaign = message::campaign_name(campaign);
        (!campaign.is_empty()).then_some(campaign)
    }

    /// The `Received:` header of what this caller submits as `queue_id`.
    fn trace(&self, config: &Config, queue_id: &QueueId, now_us: i64) -> String {
        message::received_header(&Trace {
            helo: &self.name,
            peer: self.peer,
            hostname: &config.server.hostname,
            protocol: "HTTP",
            queue_id: queue_id.as_str(),
            single_recipient: None,
            now_us,
        })
    }
}

/// An Idempotency-Key (hashed with its API key's name) and the fingerprint of the
/// request that came with it.
struct Idempotency {
    key: String,
    request_sha256: String,
}

/// Releases an idempotency key held while its request is processed.
struct InFlight<'a> {
    set: &'a Mutex<HashSet<String>>,
    key: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.set.lock().remove(&self.key);
    }
}

fn with_retry_after(mut r: Response<Body>, secs: u64) -> Response<Body> {
    r.headers_mut().insert(
        hyper::header::RETRY_AFTER,
        hyper::header::HeaderValue::from(secs),
    );
    r
}

/// What a request asks for.
enum Endpoint {
    Send { raw: bool },
    CreateBatch,
    BatchRecipients(String),
    BatchStatus(String),
}

impl Endpoint {
    /// The endpoint, or the status and message that refuse the request.
    fn of(method: &Method, path: &str) -> Result<Endpoint, (StatusCode, &'static str)> {
        let post = |e: Endpoint| match *method {
            Method::POST => Ok(e),
            _ => Err((StatusCode::METHOD_NOT_ALLOWED, "use POST")),
        };
        match path {
            "/v1/messages" => return post(Endpoint::Send { raw: false }),
            "/v1/messages/raw" => return post(Endpoint::Send { raw: true }),
            "/v1/batches" => return post(Endpoint::CreateBatch),
            _ => {}
        }
        let Some(rest) = path.strip_prefix("/v1/batches/") else {
            return Err((StatusCode::NOT_FOUND, "no such endpoint"));
        };
        match rest.split_once('/') {
            Some((id, "recipients")) if !id.is_empty() => {
                post(Endpoint::BatchRecipients(id.to_owned()))
            }
            None if !rest.is_empty() => match *method {
                Method::GET => Ok(Endpoint::BatchStatus(rest.to_owned())),
                _ => Err((StatusCode::METHOD_NOT_ALLOWED, "use GET")),
            },
            _ => Err((StatusCode::NOT_FOUND, "no such endpoint")),
        }
    }
}

/// The request's Idempotency-Key, hashed with its API key's name; a `400` when it is
/// not 1 to 255 visible characters.
fn idempotency_key(req: &Request<Incoming>, caller: &Caller) -> Result<Option<String>, BadKey> {
    match req.headers().get("idempotency-key").map(|v| v.to_str()) {
        None => Ok(None),
        Some(Ok(k)) if !k.is_empty() && k.len() <= 255 => {
            Ok(Some(key_hash(&format!("{}\0{k}", caller.name))))
        }
        Some(_) => Err(BadKey),
    }
}

/// An Idempotency-Key that is not 1 to 255 visible characters.
struct BadKey;

impl BadKey {
    fn response(&self) -> Response<Body> {
        error(
            StatusCode::BAD_REQUEST,
            "Idempotency-Key must be 1 to 255 visible characters",
        )
    }
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
        let endpoint = match Endpoint::of(req.method(), req.uri().path()) {
            Ok(e) => e,
            Err((status, why)) => return error(status, why),
        };
        let config = self.intake.config.load_full();
        let peer = req
            .extensions()
            .get::<super::Peer>()
            .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |p| p.0.ip());
        let Some(caller) = self.authenticate(&config, &req, peer) else {
            let mut r = error(StatusCode::UNAUTHORIZED, "missing or unknown API key");
            r.headers_mut().insert(
                "www-authenticate",
                hyper::header::HeaderValue::from_static("Bearer"),
            );
            return r;
        };
        // A recipient list has no size limit but memory: it is streamed, never held.
        let sized = !matches!(endpoint, Endpoint::BatchRecipients(_));
        if let Some(refusal) = self.admit(&config, &caller, &req, sized) {
            return refusal;
        }
        match endpoint {
            Endpoint::Send { raw } => self.receive(&config, &caller, raw, req).await,
            Endpoint::CreateBatch => self.create_batch(&config, &caller, req).await,
            Endpoint::BatchRecipients(id) => {
                self.batch_recipients(&config, &caller, &id, req).await
            }
            Endpoint::BatchStatus(id) => self.batch_status(&caller, &id).await,
        }
    }

    /// The checks that need no body: the key's rate, intake pause, declared size.
    fn admit(
        &self,
        config: &Config,
        caller: &Caller,
        req: &Request<Incoming>,
        sized: bool,
    ) -> Option<Response<Body>> {
        if !self.within_rate(config, caller) {
            return Some(with_retry_after(
                error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate limit of this API key exceeded",
                ),
                1,
            ));
        }
        if self.intake.campaigns().intake_paused() {
            return Some(with_retry_after(
                error(StatusCode::SERVICE_UNAVAILABLE, "intake is paused"),
                RETRY_AFTER_PAUSED,
            ));
        }
        let declared = req
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if sized && declared.is_some_and(|n| n > config.http.max_request_size as u64) {
            return Some(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body exceeds max_request_size",
            ));
        }
        None
    }

    /// Reads the body under its Idempotency-Key (held against concurrent duplicates),
    /// answers a repeat from the store, or checks and submits the request.
    async fn receive(
        &self,
        config: &Config,
        caller: &Caller,
        raw: bool,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let key = match idempotency_key(&req, caller) {
            Ok(k) => k,
            Err(bad) => return bad.response(),
        };
        let _held = match &key {
            Some(k) => match self.hold(k) {
                Some(held) => Some(held),
                None => {
                    return error(
                        StatusCode::CONFLICT,
                        "a request with this Idempotency-Key is in progress",
                    );
                }
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
        let idempotency = key.map(|key| Idempotency {
            key,
            request_sha256: fingerprint(raw, query.as_deref(), &body),
        });
        if let Some(i) = &idempotency
            && let Some(response) = self.earlier(i, config).await
        {
            return response;
        }
        let reserved = match (&idempotency, &self.intake.cluster) {
            (Some(i), Some(cluster)) => match cluster.reserve(&i.key).await {
                Reservation::Replay(earlier) => return replay_for(i, earlier),
                Reservation::InFlight => {
                    return error(
                        StatusCode::CONFLICT,
                        "a request with this Idempotency-Key is in progress on another node",
                    );
                }
                Reservation::Reserved => Some(cluster.clone()),
                Reservation::Unavailable => None,
            },
            _ => None,
        };
        let cluster_key = reserved.map(|c| (c, idempotency.as_ref().map(|i| i.key.clone())));
        let response = self
            .prepare(config, caller, raw, query, &body, idempotency)
            .await;
        if let Some((cluster, Some(key))) = cluster_key {
            let ttl = config.http.idempotency_ttl.0;
            // What the local commit remembered is what the other nodes replay; nothing
            // remembered (a temporary refusal) frees the key for a retry.
            let remembered = self
                .intake
                .queue
                .idempotent_response(&key, ttl)
                .await
                .ok()
                .flatten();
            cluster.settle(&key, remembered, ttl).await;
        }
        response
    }

    /// Parses the request and submits it.
    async fn prepare(
        &self,
        config: &Config,
        caller: &Caller,
        raw: bool,
        query: Option<String>,
        body: &[u8],
        idempotency: Option<Idempotency>,
    ) -> Response<Body> {
        let prepared = if raw {
            raw_message(query.as_deref(), body.to_vec())
        } else {
            json_message(body)
        };
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => return e.response(),
        };
        self.submit(config, caller, prepared, idempotency).await
    }

    fn authenticate(
        &self,
        config: &Config,
        req: &Request<Incoming>,
        peer: std::net::IpAddr,
    ) -> Option<Caller> {
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
            peer,
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
            .entry(format!("{}\0{rate:?}", caller.name))
            .or_insert_with(|| {
                let burst = std::num::NonZeroU32::new(rate.count).expect("rate count above 0");
                Arc::new(RateLimiter::direct(rate.quota().allow_burst(burst)))
            })
            .clone();
        limiter.check().is_ok()
    }

    /// Holds an idempotency key while its request is read and processed; `None` when a
    /// concurrent duplicate holds it already.
    fn hold<'a>(&'a self, key: &str) -> Option<InFlight<'a>> {
        let fresh = self.in_flight.lock().insert(key.to_owned());
        fresh.then(|| InFlight {
            set: &self.in_flight,
            key: key.to_owned(),
        })
    }

    /// The answer to a key seen before: its stored response for the same request, `422`
    /// for a different one. `None` when the key is new.
    async fn earlier(&self, idempotency: &Idempotency, config: &Config) -> Option<Response<Body>> {
        match self
            .intake
            .queue
            .idempotent_response(&idempotency.key, config.http.idempotency_ttl.0)
            .await
        {
            Ok(Some(earlier)) => Some(replay_for(idempotency, earlier)),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "idempotency lookup failed");
                Some(with_retry_after(
                    error(StatusCode::SERVICE_UNAVAILABLE, "queue unavailable"),
                    RETRY_AFTER_QUEUE,
                ))
            }
        }
    }

    async fn submit(
        &self,
        config: &Config,
        caller: &Caller,
        p: Prepared,
        idempotency: Option<Idempotency>,
    ) -> Response<Body> {
        let campaign = caller.campaign_for(p.campaign.as_deref());
        if let Err(reason) = self.intake.policy.check_open(campaign.as_deref()) {
            return self.closed(campaign.as_deref(), reason, &p.recipients);
        }
        let (results, accepted, all_temporary) =
            self.door(config, campaign.as_deref(), &p.recipients).await;
        let now_us = self.intake.clock.now_us();
        let queue_id = QueueId::generate(now_us);
        if accepted.is_empty() {
            return self
                .all_rejected(config, results, all_temporary, idempotency)
                .await;
        }
        let stored = match stored(config, caller, p.body, &queue_id, now_us) {
            Ok(stored) => stored,
            Err(why) => return error(StatusCode::BAD_REQUEST, &why),
        };
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
            identity: Some(caller.name.clone()),
            body: stored,
            recipients: accepted
                .into_iter()
                .map(|m| NewRecipient {
                    address: m.address,
                    domain: m.domain,
                })
                .collect(),
            smtputf8: false,
        };
        let response_body = serde_json::json!({ "id": queue_id.as_str(), "campaign": campaign, "recipients": results }).to_string();
        self.commit(config, msg, response_body, idempotency).await
    }
}

/// The message as queued: the `Received:` trace, then the raw body or the MIME built
/// from the JSON request. `Err` says why the JSON request cannot be built (a 400).
fn stored(
    config: &Config,
    caller: &Caller,
    body: Body_,
    queue_id: &QueueId,
    now_us: i64,
) -> Result<Vec<u8>, String> {
    let body = match body {
        Body_::Raw(b) => b,
        Body_::Json(req) => build_mime(&req, queue_id, &config.server.hostname)?,
    };
    let mut stored = caller.trace(config, queue_id, now_us).into_bytes();
    stored.extend_from_slice(&body);
    Ok(stored)
}

impl Api {
    /// The answer while intake or the campaign is closed: 503 when intake is paused,
    /// 429 for a held campaign, each recipient counted as refused.
    fn closed(
        &self,
        campaign: Option<&str>,
        reason: Reason,
        recipients: &[String],
    ) -> Response<Body> {
        for r in recipients {
            self.intake.refused(campaign, reason, r);
        }
        let status = if reason == Reason::IntakePaused {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::TOO_MANY_REQUESTS
        };
        with_retry_after(
            error(
                status,
                &format!("{}: try again later", reason.as_str().replace('_', " ")),
            ),
            RETRY_AFTER_PAUSED,
        )
    }

    /// Queues the message (with its response under the Idempotency-Key, in the same
    /// transaction) and answers only once it is durable.
    async fn commit(
        &self,
        config: &Config,
        msg: NewMessage,
        response_body: String,
        idempotency: Option<Idempotency>,
    ) -> Response<Body> {
        let outcome = match &idempotency {
            Some(i) => {
                let response = Remembered {
                    status: 202,
                    body: response_body.clone(),
                    request_sha256: i.request_sha256.clone(),
                };
                self.intake
                    .enqueue_idempotent(msg, i.key.clone(), response, config.http.idempotency_ttl.0)
                    .await
            }
            None => self.intake.enqueue(msg).await.map(|()| None),
        };
        match (outcome, &idempotency) {
            (Ok(Some(earlier)), Some(i)) => replay_for(i, earlier),
            (Ok(_), _) => replay(202, response_body),
            (Err(_), _) => with_retry_after(
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "queue unavailable, try again later",
                ),
                RETRY_AFTER_QUEUE,
            ),
        }
    }

    /// Every recipient through the same door as SMTP's RCPT. Returns each one's result,
    /// the accepted mailboxes, and whether every refusal was temporary.
    async fn door(
        &self,
        config: &Config,
        campaign: Option<&str>,
        recipients: &[String],
    ) -> (Vec<RecipientResult>, Vec<Mailbox>, bool) {
        let who = Submitter {
            trusted_network: false,
            authenticated: true,
        };
        let mut results = Vec::with_capacity(recipients.len());
        let mut accepted: Vec<Mailbox> = Vec::new();
        let mut all_temporary = true;
        for address in recipients {
            match self
                .intake
                .policy
                .check_rcpt(config, who, campaign, accepted.len(), address)
                .await
            {
                Ok(m) => {
                    results.push(RecipientResult::accepted(address));
                    accepted.push(m);
                }
                Err(reason) => {
                    self.intake.refused(campaign, reason, address);
                    results.push(RecipientResult::rejected(address, reason));
                    all_temporary &= reason.is_temporary();
                }
            }
        }
        (results, accepted, all_temporary)
    }

    /// No recipient was accepted. When every refusal was temporary the client is told to
    /// come back (`503`, `Retry-After`) and nothing is remembered under its key: the same
    /// request may well succeed later. Only a final refusal is stored for replays.
    async fn all_rejected(
        &self,
        config: &Config,
        results: Vec<RecipientResult>,
        all_temporary: bool,
        idempotency: Option<Idempotency>,
    ) -> Response<Body> {
        if all_temporary {
            let body = serde_json::json!({ "error": "every recipient was refused for now, try again later", "recipients": results });
            return with_retry_after(replay(503, body.to_string()), RETRY_AFTER_TEMPORARY);
        }
        let body =
            serde_json::json!({ "error": "every recipient was rejected", "recipients": results })
                .to_string();
        let any_temporary = results
            .iter()
            .filter_map(|r| r.reason.and_then(Reason::parse))
            .any(Reason::is_temporary);
        if let (Some(i), false) = (idempotency, any_temporary) {
            let response = Remembered {
                status: 422,
                body: body.clone(),
                request_sha256: i.request_sha256,
            };
            // Remember the final refusal too, so a retry with the same key gets it again.
            let stored = self
                .intake
                .queue
                .enqueue_idempotent(None, i.key, response, config.http.idempotency_ttl.0)
                .await;
            if let Err(e) = stored {
                tracing::warn!(error = %e, "idempotent refusal not remembered");
            }
        }
        replay(422, body)
    }
}

/// SHA-256 (hex) of what identifies a request: its endpoint, query and body.
fn fingerprint(raw: bool, query: Option<&str>, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(if raw { b"raw\0".as_slice() } else { b"json\0" });
    h.update(query.unwrap_or_default().as_bytes());
    h.update(b"\0");
    h.update(body);
    hex::encode(h.finalize())
}

/// The stored response for a repeat of the same request; a `422` when the key was used
/// for a different one (IETF Idempotency-Key draft, section 2.7).
fn replay_for(idempotency: &Idempotency, earlier: Remembered) -> Response<Body> {
    if !earlier.request_sha256.is_empty() && earlier.request_sha256 != idempotency.request_sha256 {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "this Idempotency-Key was already used for a different request",
        );
    }
    replay(earlier.status, earlier.body)
}

fn replay(status: u16, body: String) -> Response<Body> {
    super::text(
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        "application/json",
        body,
    )
}

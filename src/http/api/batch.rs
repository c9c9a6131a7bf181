//! Batch sends: `POST /v1/batches` (a template whose subject, text, HTML and header
//! values are minijinja templates, checked as a message's fields are), `POST
//! /v1/batches/{id}/recipients` (a streamed NDJSON or CSV recipient list: each row
//! through the same door as any recipient, accepted rows group-committed as they arrive,
//! constant memory) and `GET /v1/batches/{id}` (progress from counters). Each message is
//! rendered at delivery by [`Renderer`], for the scheduler.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::compose::{
    Attachment, Decoded, SendRequest, build_mime_with, check_fields, decode_attachments,
    field_error,
};
use super::rows::{Format, MAX_LINE, NoToColumn, Parsed, Rows};
use super::{Api, Caller, RETRY_AFTER_QUEUE, with_retry_after};
use crate::admin_api as api;
use crate::batch_stats::BatchStats;
use crate::config::Config;
use crate::http::{Body, error, json};
use crate::lines::{Line, LineCutter};
use crate::policy::Submitter;
use crate::queue::{
    Append, BatchRecord, BatchRow, ChunkProgress, NewMessage, Queue, QueueId, Source,
};
use crate::reason::Reason;
use crate::scheduler::{Render, RenderFailure};
use crate::template::{Spec, Templates};

/// Rows an upload checks before it lets other tasks run. A body frame holds thousands
/// of rows, all checked without an await that could yield (the slice is committed only
/// every [`FLUSH_LINES`]): eight uploads of invalid rows on one CPU made the valid mail
/// beside them wait seconds (p99 7.4 s; 12 ms with the slice, `bench/incident.sh
/// --batch-flood --pin`).
const ROW_SLICE: u64 = 64;

/// Rejections answered in full, with their line numbers; the rest are counted only.
const MAX_REPORTED: usize = 100;
/// Accepted rows held before a group commit; bounds an upload's memory.
const FLUSH_ROWS: usize = 500;
/// Lines read between commits of a chunk's progress when few rows are accepted.
const FLUSH_LINES: u64 = 5000;
/// Compiled templates kept for delivery; a miss reads and compiles the batch again.
const CACHED_TEMPLATES: usize = 64;

/// A batch's template, as posted and as stored.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    #[serde(default)]
    pub from: String,
    pub reply_to: Option<String>,
    #[serde(default)]
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    pub campaign: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// `strict` (an undefined variable fails the recipient, class `template`) or
    /// `lenient` (it renders as the empty string).
    #[serde(default)]
    pub undefined: Undefined,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Undefined {
    #[default]
    Strict,
    Lenient,
}

/// What queue.db holds for a batch: the request and the `Received:` trace of its
/// creation, prepended to every rendered message.
#[derive(Debug, Clone, Deserialize, Serialize)]
struct Stored {
    request: BatchRequest,
    trace: String,
}

impl BatchRequest {
    /// The message fields as `POST /v1/messages` takes them, for the same checks and
    /// the same MIME.
    fn as_message(&self, to: Vec<String>) -> SendRequest {
        SendRequest {
            attachments: self.attachments.clone(),
            ..self.without_attachments(to)
        }
    }

    /// The message a recipient's render starts from: the attachments were checked when
    /// the batch was created and are decoded once, in [`Compiled`].
    fn without_attachments(&self, to: Vec<String>) -> SendRequest {
        SendRequest {
            from: self.from.clone(),
            to,
            cc: Vec::new(),
            bcc: Vec::new(),
            reply_to: self.reply_to.clone(),
            subject: self.subject.clone(),
            text: self.text.clone(),
            html: self.html.clone(),
            headers: self.headers.clone().into_iter().collect(),
            attachments: Vec::new(),
            campaign: self.campaign.clone(),
            tags: self.tags.clone(),
            metadata: self.metadata.clone(),
        }
    }

    fn spec(&self) -> Spec {
        Spec {
            subject: self.subject.clone(),
            text: self.text.clone(),
            html: self.html.clone(),
            headers: self.headers.clone().into_iter().collect(),
            lenient: self.undefined == Undefined::Lenient,
        }
    }
}

/// A batch's progress for the send API and the admin API, in its campaign's state.
pub fn view(b: &BatchRecord, state: api::CampaignState) -> api::BatchView {
    api::BatchView {
        id: b.batch_id.clone(),
        campaign: b.campaign.clone(),
        state,
        created_at_ms: b.created_at,
        received: b.received,
        accepted: b.accepted,
        rejected: b.rejected.clone(),
        delivered: b.delivered,
        deferred: b.deferred,
        failed: b.failed,
        failed_template: b.failed_template,
        queued: b.queued(),
    }
}

/// The counts of one chunk upload, kept with its progress and answered at its end.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Counts {
    received: u64,
    accepted: u64,
    rejected: BTreeMap<String, u64>,
    rejections: Vec<Rejection>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Rejection {
    line: u64,
    to: String,
    reason: String,
    message: String,
}

impl Counts {
    fn reject(&mut self, line: u64, to: &str, reason: Reason, message: String) {
        self.received += 1;
        *self.rejected.entry(reason.as_str().to_owned()).or_default() += 1;
        if self.rejections.len() < MAX_REPORTED {
            self.rejections.push(Rejection {
                line,
                to: to.chars().take(320).collect(),
                reason: reason.as_str().to_owned(),
                message,
            });
        }
    }
}

impl Api {
    pub(super) async fn create_batch(
        &self,
        config: &Config,
        caller: &Caller,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let body = match crate::http::read_body(req, config.http.max_request_size).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let de = &mut serde_json::Deserializer::from_slice(&body);
        let request: BatchRequest = match serde_path_to_error::deserialize(de) {
            Ok(r) => r,
            Err(e) => {
                let path = e.path().to_string();
                let field = if path == "." { "body".to_owned() } else { path };
                return field_error(&field, &e.into_inner().to_string()).response();
            }
        };
        let sender = match check_fields(&request.as_message(Vec::new())) {
            Ok(s) => s,
            Err(e) => return e.response(),
        };
        if let Err(e) = Templates::compile(request.spec()) {
            return json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({ "error": e.to_string(), "field": e.field, "line": e.line }),
            );
        }
        let campaign = caller.campaign_for(request.campaign.as_deref());
        let now_us = self.intake.clock.now_us();
        let queue_id = QueueId::generate(now_us);
        let trace = caller.trace(config, &queue_id, now_us);
        let stored = serde_json::to_string(&Stored { request, trace }).expect("serializes");
        let msg = NewMessage {
            queue_id: queue_id.clone(),
            sender,
            campaign: campaign.clone(),
            source: Source::Http,
            client: caller.name.clone(),
            identity: Some(caller.name.clone()),
            body: Vec::new(),
            recipients: Vec::new(),
            smtputf8: false,
        };
        match self.intake.queue.create_batch(msg, stored).await {
            Ok(_) => {
                BatchStats::add(&self.intake.batches.created, 1);
                json(
                    StatusCode::CREATED,
                    &serde_json::json!({ "id": queue_id.as_str(), "campaign": campaign }),
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, "batch not created");
                queue_unavailable()
            }
        }
    }

    /// The caller's batch, or the response that ends the request.
    async fn owned_batch(&self, caller: &Caller, id: &str) -> Result<BatchRecord, Response<Body>> {
        match self.intake.queue.batch(id).await {
            Ok(Some(b)) if b.client == caller.name => Ok(b),
            Ok(_) => Err(error(StatusCode::NOT_FOUND, "no such batch")),
            Err(e) => {
                tracing::warn!(error = %e, "batch lookup failed");
                Err(queue_unavailable())
            }
        }
    }

    pub(super) async fn batch_status(&self, caller: &Caller, id: &str) -> Response<Body> {
        match self.owned_batch(caller, id).await {
            Ok(b) => {
                let state = campaign_state(&self.intake, b.campaign.as_deref());
                json(StatusCode::OK, &view(&b, state))
            }
            Err(r) => r,
        }
    }

    /// Streams one chunk of recipients into a batch (see the module doc). Under an
    /// Idempotency-Key the chunk's progress is committed with its rows: a repeat of a
    /// finished chunk is answered from it, a retry after a crash resumes after the last
    /// committed line, so nothing is queued twice.
    pub(super) async fn batch_recipients(
        &self,
        config: &Config,
        caller: &Caller,
        id: &str,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let format = req
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(Format::of_content_type);
        let Some(format) = format else {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send application/x-ndjson or text/csv",
            );
        };
        let key = match super::idempotency_key(&req, caller) {
            Ok(k) => k,
            Err(bad) => return bad.response(),
        };
        let batch = match self.owned_batch(caller, id).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let _held = match &key {
            Some(k) => match self.hold(k) {
                Some(h) => Some(h),
                None => {
                    return error(
                        StatusCode::CONFLICT,
                        "a request with this Idempotency-Key is in progress",
                    );
                }
            },
            None => None,
        };
        let resumed = match &key {
            Some(k) => match self.intake.queue.batch_chunk(batch.message_id, k).await {
                Ok(p) => p,
                Err(_) => return queue_unavailable(),
            },
            None => None,
        };
        if let Some(ChunkProgress {
            response: Some(done),
            fingerprint,
            ..
        }) = &resumed
        {
            // A repeat of a finished chunk is read through (not counted) to compare it.
            if let Some(expected) = fingerprint {
                match fingerprint_of(req.into_body()).await {
                    Ok(print) if &print == expected => {}
                    Ok(_) => return different_chunk(&self.intake.batches),
                    Err(bad) => return bad,
                }
            }
            return super::replay(200, done.clone());
        }
        let mut upload = Upload {
            api: self,
            config,
            batch: &batch,
            key,
            rows: Rows::new(format),
            line: 0,
            skip_to: resumed.as_ref().map_or(0, |p| p.lines),
            expected: resumed.as_ref().and_then(|p| p.fingerprint.clone()),
            print: Fingerprint::default(),
            counts: resumed
                .as_ref()
                .and_then(|p| serde_json::from_str(&p.progress).ok())
                .unwrap_or_default(),
            pending: Vec::new(),
            slice_rejected: BTreeMap::new(),
            slice_received: 0,
            since_flush: 0,
        };
        match upload.stream(req.into_body()).await {
            Ok(response) => response,
            Err(r) => r,
        }
    }
}

/// A batch's campaign state, as the admin API names it.
pub fn campaign_state(
    intake: &crate::intake::Intake,
    campaign: Option<&str>,
) -> api::CampaignState {
    let c = intake.campaigns().get(campaign);
    crate::http::admin::views::campaign_state(&c, intake.clock.now_ms())
}

fn queue_unavailable() -> Response<Body> {
    with_retry_after(
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "queue unavailable, try again later",
        ),
        RETRY_AFTER_QUEUE,
    )
}

/// One chunk upload in progress.
struct Upload<'a> {
    api: &'a Api,
    config: &'a Config,
    batch: &'a BatchRecord,
    key: Option<String>,
    rows: Rows,
    /// Lines read so far (1-based numbers in rejections).
    line: u64,
    /// Lines a crashed attempt of this chunk committed already: read, not counted again.
    skip_to: u64,
    /// The fingerprint of those lines as committed: this attempt's must match.
    expected: Option<String>,
    /// This attempt's lines so far.
    print: Fingerprint,
    counts: Counts,
    pending: Vec<BatchRow>,
    slice_rejected: BTreeMap<String, u64>,
    slice_received: u64,
    since_flush: u64,
}

impl Upload<'_> {
    async fn stream(&mut self, mut body: Incoming) -> Result<Response<Body>, Response<Body>> {
        let mut cutter = LineCutter::new(MAX_LINE);
        let mut lines: Vec<Option<Vec<u8>>> = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                // The client went away: what was committed stays (and is resumed under
                // the same key); nobody reads an answer.
                self.flush(None).await?;
                return Err(error(StatusCode::BAD_REQUEST, "request body unreadable"));
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            BatchStats::add(&self.api.intake.batches.upload_bytes, data.len() as u64);
            cutter.feed(&data, |l| lines.push(owned(l)));
            for l in lines.drain(..) {
                self.line(l).await?;
            }
        }
        cutter.finish(|l| lines.push(owned(l)));
        for l in lines.drain(..) {
            self.line(l).await?;
        }
        if self.line < self.skip_to && self.expected.is_some() {
            return Err(different_chunk(&self.api.intake.batches));
        }
        let paused = self
            .api
            .intake
            .policy
            .check_open(self.batch.campaign.as_deref())
            .is_err();
        let response = serde_json::json!({
            "batch": self.batch.batch_id,
            "state": if paused { "paused" } else { "active" },
            "received": self.counts.received,
            "accepted": self.counts.accepted,
            "rejected": self.counts.rejected,
            "rejections": self.counts.rejections,
        })
        .to_string();
        self.flush(Some(response.clone())).await?;
        BatchStats::add(&self.api.intake.batches.chunks, 1);
        Ok(super::replay(200, response))
    }

    async fn line(&mut self, line: Option<Vec<u8>>) -> Result<(), Response<Body>> {
        self.line += 1;
        if self.line.is_multiple_of(ROW_SLICE) {
            tokio::task::yield_now().await;
        }
        self.print.line(line.as_deref());
        if self.line == self.skip_to
            && let Some(expected) = &self.expected
            && *expected != self.print.hex()
        {
            return Err(different_chunk(&self.api.intake.batches));
        }
        let parsed = match &line {
            Some(text) => match self.rows.line(text) {
                Ok(p) => p,
                Err(NoToColumn) => {
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        "the CSV header row has no `to` column",
                    ));
                }
            },
            None => Parsed::Bad(format!("line longer than {MAX_LINE} bytes")),
        };
        if self.line <= self.skip_to {
            return Ok(());
        }
        self.since_flush += 1;
        match parsed {
            Parsed::Skip => {}
            Parsed::Bad(why) => self.reject("", Reason::MalformedRow, why),
            Parsed::Row(row) => self.row(row).await,
        }
        if self.pending.len() >= FLUSH_ROWS || self.since_flush >= FLUSH_LINES {
            self.flush(None).await?;
        }
        Ok(())
    }

    async fn row(&mut self, row: super::rows::Row) {
        let campaign = self.batch.campaign.as_deref();
        let who = Submitter {
            trusted_network: false,
            authenticated: true,
        };
        let checked = self
            .api
            .intake
            .policy
            .check_rcpt(self.config, who, campaign, 0, &row.to)
            .await;
        match checked {
            Ok(m) => {
                self.counts.received += 1;
                self.counts.accepted += 1;
                self.slice_received += 1;
                self.pending.push(BatchRow {
                    address: m.address,
                    domain: m.domain,
                    vars: serde_json::Value::Object(row.vars).to_string(),
                });
            }
            Err(reason) => {
                self.api.intake.refused(campaign, reason, &row.to);
                let message = reason.reply().text.to_owned();
                self.reject(&row.to, reason, message);
            }
        }
    }

    fn reject(&mut self, to: &str, reason: Reason, message: String) {
        if reason == Reason::MalformedRow {
            self.api
                .intake
                .refused(self.batch.campaign.as_deref(), reason, to);
        }
        self.counts.reject(self.line, to, reason, message);
        self.slice_received += 1;
        *self
            .slice_rejected
            .entry(reason.as_str().to_owned())
            .or_default() += 1;
    }

    /// Commits the accepted rows held, the counters of the lines read since the last
    /// commit and the chunk's progress (with its response, at the end), in one writer
    /// operation.
    async fn flush(&mut self, response: Option<String>) -> Result<(), Response<Body>> {
        if self.since_flush == 0 && response.is_none() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.pending);
        let accepted = rows.len() as u64;
        let received = self.slice_received;
        let slice = Append {
            message_id: self.batch.message_id,
            campaign: self.batch.campaign.clone(),
            rows,
            lines: self.slice_received,
            rejected: std::mem::take(&mut self.slice_rejected),
            chunk: self.key.clone().map(|k| {
                (
                    k,
                    ChunkProgress {
                        lines: self.line,
                        progress: serde_json::to_string(&self.counts).expect("serializes"),
                        response,
                        fingerprint: Some(self.print.hex()),
                    },
                )
            }),
        };
        self.slice_received = 0;
        self.since_flush = 0;
        let campaign = self.batch.campaign.as_deref();
        match self.api.intake.queue.append_batch(slice).await {
            Ok(()) => {
                let stats = &self.api.intake.batches;
                BatchStats::add(&stats.rows_received, received);
                BatchStats::add(&stats.rows_accepted, accepted);
                if accepted > 0 {
                    self.api
                        .intake
                        .campaigns()
                        .record_accepted(campaign, accepted);
                    self.api.intake.wake.notify_one();
                }
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, campaign, "batch rows not queued");
                self.api
                    .intake
                    .refused_unlisted(campaign, Reason::QueueUnavailable, accepted);
                Err(queue_unavailable())
            }
        }
    }
}

/// A chunk's content as the upload reads it: SHA-256 over its lines, each ended by LF
/// (so CR LF and LF files of the same rows are the same chunk); a line over the limit,
/// never buffered, counts as a fixed marker.
#[derive(Default, Clone)]
struct Fingerprint(sha2::Sha256);

impl Fingerprint {
    fn line(&mut self, text: Option<&[u8]>) {
        use sha2::Digest;
        match text {
            Some(t) => self.0.update(t),
            None => self.0.update(b"\0too long"),
        }
        self.0.update(b"\n");
    }

    fn cut(&mut self, l: Line<'_>) {
        match l {
            Line::Text(t) => self.line(Some(t)),
            Line::TooLong => self.line(None),
        }
    }

    /// The lines so far, in hex.
    fn hex(&self) -> String {
        use sha2::Digest;
        hex::encode(self.0.clone().finalize())
    }
}

/// The fingerprint of a whole chunk body, read to its end in constant memory.
async fn fingerprint_of(mut body: Incoming) -> Result<String, Response<Body>> {
    let mut cutter = LineCutter::new(MAX_LINE);
    let mut print = Fingerprint::default();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err(error(StatusCode::BAD_REQUEST, "request body unreadable"));
        };
        if let Ok(data) = frame.into_data() {
            cutter.feed(&data, |l| print.cut(l));
        }
    }
    cutter.finish(|l| print.cut(l));
    Ok(print.hex())
}

/// A retry under a chunk's Idempotency-Key whose lines differ from what was stored.
fn different_chunk(stats: &BatchStats) -> Response<Body> {
    BatchStats::add(&stats.chunks_refused, 1);
    error(
        StatusCode::UNPROCESSABLE_ENTITY,
        "this Idempotency-Key was already used for a chunk with different content: \
         send new rows under a new key",
    )
}

fn owned(l: Line<'_>) -> Option<Vec<u8>> {
    match l {
        Line::Text(t) => Some(t.to_vec()),
        Line::TooLong => None,
    }
}

/// A batch's template compiled for delivery.
struct Compiled {
    stored: Stored,
    templates: Templates,
    /// Decoded once here, not once per recipient.
    attachments: Vec<Decoded>,
}

/// Renders batch recipients' messages at delivery: the batch's template (compiled once,
/// cached) with the recipient's variables, into the same MIME as `POST /v1/messages`.
pub struct Renderer {
    queue: Queue,
    config: Arc<ArcSwap<Config>>,
    /// The one-click unsubscribe key: batch mail is campaign mail, so its rendered
    /// messages get `List-Unsubscribe` as the doors' messages do.
    unsubscribe: Option<Arc<crate::unsubscribe::Signer>>,
    cache: Mutex<HashMap<i64, Arc<Compiled>>>,
    stats: Arc<BatchStats>,
}

impl Renderer {
    pub fn new(
        queue: Queue,
        config: Arc<ArcSwap<Config>>,
        unsubscribe: Option<Arc<crate::unsubscribe::Signer>>,
    ) -> Renderer {
        Renderer {
            queue,
            config,
            unsubscribe,
            cache: Mutex::default(),
            stats: Arc::default(),
        }
    }

    /// Counts renders into `stats` (the daemon's, read by `/metrics`).
    pub fn with_stats(mut self, stats: Arc<BatchStats>) -> Renderer {
        self.stats = stats;
        self
    }

    async fn compiled(&self, message_id: i64) -> Result<Arc<Compiled>, RenderFailure> {
        if let Some(c) = self.cache.lock().get(&message_id) {
            return Ok(c.clone());
        }
        let batch = self
            .queue
            .batch_of_message(message_id)
            .await
            .map_err(|e| RenderFailure::Unavailable(e.to_string()))?
            .ok_or_else(|| RenderFailure::Template("the batch is gone".into()))?;
        let stored: Stored = serde_json::from_str(&batch.template)
            .map_err(|e| RenderFailure::Template(format!("stored template unreadable: {e}")))?;
        let templates = Templates::compile(stored.request.spec())
            .map_err(|e| RenderFailure::Template(e.to_string()))?;
        let attachments =
            decode_attachments(&stored.request.attachments).map_err(RenderFailure::Template)?;
        let compiled = Arc::new(Compiled {
            stored,
            templates,
            attachments,
        });
        let mut cache = self.cache.lock();
        if cache.len() >= CACHED_TEMPLATES {
            cache.clear();
        }
        cache.insert(message_id, compiled.clone());
        Ok(compiled)
    }
}

impl Render for Renderer {
    fn render<'a>(
        &'a self,
        r: &'a crate::queue::Claimed,
    ) -> crate::future::BoxFuture<'a, Result<Vec<u8>, RenderFailure>> {
        Box::pin(async move {
            let out = self.render_uncounted(r).await;
            match &out {
                Ok(body) => {
                    BatchStats::add(&self.stats.renders, 1);
                    BatchStats::add(&self.stats.rendered_bytes, body.len() as u64);
                }
                Err(RenderFailure::Template(_)) => BatchStats::add(&self.stats.render_failures, 1),
                Err(RenderFailure::Unavailable(_)) => {}
            }
            out
        })
    }
}

impl Renderer {
    /// One recipient's message (what [`Render::render`] counts).
    async fn render_uncounted(&self, r: &crate::queue::Claimed) -> Result<Vec<u8>, RenderFailure> {
        {
            let compiled = self.compiled(r.message_id).await?;
            let config = self.config.load_full();
            let vars = r.vars.clone().unwrap_or_default();
            let address = r.address.clone();
            let campaign = r.campaign.clone();
            let now_us = self.queue.clock().now_us();
            let unsubscribe = self.unsubscribe.clone();
            tokio::task::spawn_blocking(move || {
                let body = render_one(&compiled, &config, &address, &vars, now_us)?;
                Ok(crate::intake::with_unsubscribe(
                    unsubscribe.as_deref(),
                    &config,
                    &address,
                    campaign.as_deref(),
                    // Batches are matched by their campaign (every batch has one or its
                    // key's), not by key.
                    None,
                    body,
                ))
            })
            .await
            .map_err(|e| RenderFailure::Unavailable(e.to_string()))?
        }
    }
}

fn render_one(
    c: &Compiled,
    config: &Config,
    address: &str,
    vars: &str,
    now_us: i64,
) -> Result<Vec<u8>, RenderFailure> {
    let fail = |why: String| RenderFailure::Template(why);
    let vars: serde_json::Value =
        serde_json::from_str(vars).map_err(|e| fail(format!("variables unreadable: {e}")))?;
    let rendered = c.templates.render(&vars).map_err(|e| fail(e.to_string()))?;
    let mut req = c
        .stored
        .request
        .without_attachments(vec![address.to_owned()]);
    req.subject = rendered.subject;
    req.text = rendered.text;
    req.html = rendered.html;
    req.headers = rendered.headers.into_iter().collect();
    // A variable may hold a line break: the rendered header fields pass the same checks
    // as a message's.
    check_fields(&req).map_err(|e| fail(e.to_string()))?;
    let body = build_mime_with(
        &req,
        &c.attachments,
        &QueueId::generate(now_us),
        &config.server.hostname,
    )
    .map_err(fail)?;
    let mut out = c.stored.trace.clone().into_bytes();
    out.extend_from_slice(&body);
    if out.len() > config.smtp.max_message_size {
        return Err(fail("renders larger than max_message_size".into()));
    }
    Ok(out)
}

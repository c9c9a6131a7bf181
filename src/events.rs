//! Delivery events: `delivered`, `deferred` and `failed` per recipient, plus a periodic
//! `intake_rejections` aggregate per campaign, POSTed as signed JSON arrays (Standard
//! Webhooks) to the `[events] urls`.
//!
//! The delivery path only ever does a `try_send` into a bounded channel (`max_pending`):
//! when the receivers are slow or down, events are dropped and counted, and delivery
//! never waits. Refusals at the door are never sent one by one (a flood of bad
//! recipients would become a flood of events): each flush sends, per campaign, the
//! counts by reason since the previous flush, read from the in-memory counters.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::bounce::BounceClass;
use crate::campaign::Campaigns;
use crate::clock::Clock;
use crate::config::Config;
use crate::deliver::FailureSink;
use crate::net::client::{HttpClient, redact};
use crate::net::signed::{self, Answer, SignedPost};
use crate::queue::Claimed;
use crate::reason::Reason;
use crate::signing::Secret;
use crate::supervise::Supervisor;

/// Batches waiting per receiver while it is slow; beyond, batches are dropped.
const BATCHES_PER_RECEIVER: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Delivered,
    Deferred,
    Failed,
    /// A recipient used a message's one-click unsubscribe (RFC 8058).
    Unsubscribed,
}

/// One recipient's outcome of one attempt.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    #[serde(rename = "type")]
    pub kind: Kind,
    /// Empty (and left out) for an unsubscribe, which names no message.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub queue_id: String,
    pub recipient: String,
    pub campaign: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// Why the attempt failed (`crate::bounce`); absent for deliveries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<&'static str>,
    pub reply: String,
    #[serde(rename = "at", serialize_with = "ser_time")]
    pub at_ms: i64,
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn ser_time<S: serde::Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*ms))
}

struct Shared {
    tx: mpsc::Sender<Record>,
    enabled: AtomicBool,
    dropped: AtomicU64,
    clock: Arc<dyn Clock>,
}

/// The handle the delivery path emits through. Cheap to clone.
#[derive(Clone)]
pub struct Events {
    shared: Arc<Shared>,
}

/// The running sender; [`EventsTask::close`] flushes what is left.
pub struct EventsTask {
    supervisor: Supervisor,
    shutdown: CancellationToken,
}

/// The supervised name of the event sender's task.
const TASK: &str = "event sender";

impl Events {
    /// Starts the collector. `[events] max_pending` is read now; everything else is read
    /// live at each flush, so a reload can add, change or remove receivers.
    pub fn start(
        config: Arc<ArcSwap<Config>>,
        campaigns: Arc<Campaigns>,
        clock: Arc<dyn Clock>,
        supervisor: &Supervisor,
    ) -> (Events, EventsTask) {
        let pending = config.load().events.max_pending.max(1);
        let (tx, rx) = mpsc::channel(pending);
        let shared = Arc::new(Shared {
            tx,
            enabled: AtomicBool::new(!config.load().events.urls.is_empty()),
            dropped: AtomicU64::new(0),
            clock: clock.clone(),
        });
        let shutdown = CancellationToken::new();
        let collector = Collector {
            config,
            campaigns,
            client: Arc::new(signed::web_client(4096).with_clock(clock.clone())),
            clock,
            shared: shared.clone(),
            workers: HashMap::new(),
            snapshot: HashMap::new(),
            since_ms: 0,
            seq: 0,
            reported_drops: 0,
            stop_retrying: CancellationToken::new(),
        };
        supervisor.spawn(TASK, collector.run(rx, shutdown.clone()));
        let task = EventsTask {
            supervisor: supervisor.clone(),
            shutdown,
        };
        (Events { shared }, task)
    }

    /// Queues an event without waiting. Cost: one atomic load when events are off; a
    /// few small allocations and a `try_send` when on. Never blocks.
    pub fn emit(
        &self,
        kind: Kind,
        r: &Claimed,
        reason: Option<Reason>,
        class: Option<BounceClass>,
        reply: &str,
    ) {
        // Canary probes are Floodgate's own, not a customer's delivery.
        if !self.shared.enabled.load(Ordering::Relaxed)
            || crate::campaign::is_canary(r.campaign.as_deref())
        {
            return;
        }
        let record = Record {
            kind,
            queue_id: r.queue_id.clone(),
            recipient: r.address.clone(),
            campaign: r.campaign.clone(),
            reason: reason.map(Reason::as_str),
            class: class.map(BounceClass::as_str),
            reply: reply.to_owned(),
            at_ms: self.shared.clock.now_ms(),
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = self.shared.tx.try_send(record) {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queues an `unsubscribed` event, as [`Events::emit`] does.
    pub fn unsubscribed(&self, recipient: &str, campaign: &str) {
        if !self.shared.enabled.load(Ordering::Relaxed) {
            return;
        }
        let record = Record {
            kind: Kind::Unsubscribed,
            queue_id: String::new(),
            recipient: recipient.to_owned(),
            campaign: Some(campaign.to_owned()),
            reason: None,
            class: None,
            reply: String::new(),
            at_ms: self.shared.clock.now_ms(),
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = self.shared.tx.try_send(record) {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Events dropped since start because `max_pending` were waiting, or a receiver's
    /// queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl EventsTask {
    /// Sends what is buffered (one attempt per batch, no retries) and stops, within
    /// `limit`.
    pub async fn close(self, limit: Duration) {
        self.shutdown.cancel();
        if !self.supervisor.join(TASK, limit).await {
            tracing::warn!("delivery events not all sent at shutdown");
            self.supervisor.abort(TASK);
        }
    }
}

/// A [`FailureSink`] that reports to `inner` (counters, failure log) and emits events.
pub struct Reporting<S> {
    pub inner: Arc<S>,
    pub events: Events,
}

impl<S: FailureSink> FailureSink for Reporting<S> {
    fn relay_failed(&self, r: &Claimed, reason: Reason, class: BounceClass, reply: &str) {
        self.inner.relay_failed(r, reason, class, reply);
        self.events
            .emit(Kind::Failed, r, Some(reason), Some(class), reply);
    }

    fn relay_deferred(&self, r: &Claimed, class: BounceClass, reply: &str) {
        self.inner.relay_deferred(r, class, reply);
        self.events
            .emit(Kind::Deferred, r, None, Some(class), reply);
    }

    fn relay_delivered(&self, r: &Claimed, reply: &str) {
        self.inner.relay_delivered(r, reply);
        self.events.emit(Kind::Delivered, r, None, None, reply);
    }
}

/// One POST body, sent to every receiver with the same `webhook-id` on every attempt.
struct Batch {
    id: String,
    body: Bytes,
    events: usize,
}

struct Worker {
    queue: mpsc::Sender<Arc<Batch>>,
    handle: JoinHandle<()>,
}

struct Collector {
    config: Arc<ArcSwap<Config>>,
    campaigns: Arc<Campaigns>,
    clock: Arc<dyn Clock>,
    shared: Arc<Shared>,
    client: Arc<HttpClient>,
    workers: HashMap<String, Worker>,
    /// Refusal counters per campaign at the last flush.
    snapshot: HashMap<Arc<str>, Vec<u64>>,
    since_ms: i64,
    seq: u64,
    reported_drops: u64,
    /// Cancelled at shutdown: receivers get one last attempt per batch, no retries.
    stop_retrying: CancellationToken,
}

impl Collector {
    async fn run(mut self, mut rx: mpsc::Receiver<Record>, shutdown: CancellationToken) {
        self.since_ms = self.clock.now_ms();
        let mut buf: Vec<Value> = Vec::new();
        let mut next = tokio::time::Instant::now() + self.config.load().events.flush_interval.0;
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => {
                        buf.push(serde_json::to_value(ev).unwrap_or(Value::Null));
                        if buf.len() >= self.config.load().events.batch_max {
                            self.dispatch(&mut buf);
                        }
                    }
                    None => break,
                },
                () = tokio::time::sleep_until(next) => {
                    self.flush(&mut buf);
                    next = tokio::time::Instant::now() + self.config.load().events.flush_interval.0;
                }
                () = shutdown.cancelled() => break,
            }
        }
        while let Ok(ev) = rx.try_recv() {
            buf.push(serde_json::to_value(ev).unwrap_or(Value::Null));
        }
        self.flush(&mut buf);
        self.stop_retrying.cancel();
        for (_, worker) in self.workers.drain() {
            drop(worker.queue);
            let _ = worker.handle.await;
        }
    }

    /// Adds the rejection aggregates and sends everything buffered.
    fn flush(&mut self, buf: &mut Vec<Value>) {
        let config = self.config.load_full();
        self.sync_workers(&config);
        let aggregates = self.aggregates();
        if self.workers.is_empty() {
            buf.clear();
        } else {
            buf.extend(aggregates);
            self.dispatch(buf);
        }
        let dropped = self.shared.dropped.load(Ordering::Relaxed);
        if dropped > self.reported_drops {
            tracing::warn!(
                dropped = dropped - self.reported_drops,
                total = dropped,
                "delivery events dropped: receivers too slow or down"
            );
            self.reported_drops = dropped;
        }
    }

    /// Starts a sender per new URL, lets removed ones finish their queue and stop.
    fn sync_workers(&mut self, config: &Config) {
        let urls = &config.events.urls;
        self.workers.retain(|url, _| urls.contains(url));
        for url in urls {
            if !self.workers.contains_key(url) {
                let (queue, rx) = mpsc::channel(BATCHES_PER_RECEIVER);
                let handle = tokio::spawn(send_loop(
                    url.clone(),
                    rx,
                    self.client.clone(),
                    self.config.clone(),
                    self.clock.clone(),
                    self.stop_retrying.clone(),
                ));
                self.workers.insert(url.clone(), Worker { queue, handle });
            }
        }
        self.shared
            .enabled
            .store(!self.workers.is_empty(), Ordering::Relaxed);
    }

    /// `intake_rejections` per campaign with refusals since the last flush.
    fn aggregates(&mut self) -> Vec<Value> {
        let now = self.clock.now_ms();
        let mut out = Vec::new();
        for c in self.campaigns.all() {
            let counts: Vec<u64> = Reason::ALL.iter().map(|r| c.refusals(*r)).collect();
            let prev = self
                .snapshot
                .entry(c.name.clone())
                .or_insert_with(|| vec![0; counts.len()]);
            let mut by_reason = serde_json::Map::new();
            let mut total = 0;
            for (i, reason) in Reason::ALL.iter().enumerate() {
                let delta = counts[i].saturating_sub(prev[i]);
                if delta > 0 {
                    by_reason.insert(reason.as_str().into(), delta.into());
                    total += delta;
                }
            }
            *prev = counts;
            if total > 0 {
                out.push(json!({
                    "type": "intake_rejections",
                    "campaign": &*c.name,
                    "total": total,
                    "counts": by_reason,
                    "since": rfc3339(self.since_ms),
                    "at": rfc3339(now),
                }));
            }
        }
        self.since_ms = now;
        out
    }

    /// Cuts `buf` into batches and queues each for every receiver.
    fn dispatch(&mut self, buf: &mut Vec<Value>) {
        let batch_max = self.config.load().events.batch_max.max(1);
        for chunk in buf.chunks(batch_max) {
            self.seq += 1;
            let batch = Arc::new(Batch {
                id: format!("evt_{}_{}", self.since_ms, self.seq),
                body: Bytes::from(serde_json::to_vec(chunk).unwrap_or_default()),
                events: chunk.len(),
            });
            for worker in self.workers.values() {
                if worker.queue.try_send(batch.clone()).is_err() {
                    self.shared
                        .dropped
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            }
        }
        buf.clear();
    }
}

/// Sends one receiver's batches in order, retrying each with doubling waits.
async fn send_loop(
    url: String,
    mut rx: mpsc::Receiver<Arc<Batch>>,
    client: Arc<HttpClient>,
    config: Arc<ArcSwap<Config>>,
    clock: Arc<dyn Clock>,
    stop_retrying: CancellationToken,
) {
    while let Some(batch) = rx.recv().await {
        let mut attempts = 0;
        loop {
            let config = config.load_full();
            let Some(secret) = config
                .events
                .secret
                .as_deref()
                .and_then(|s| Secret::parse(s).ok())
            else {
                tracing::warn!("[events] secret missing or invalid; batch dropped");
                break;
            };
            let post = SignedPost {
                url: &url,
                secret: Some(&secret),
                id: &batch.id,
                timestamp: clock.now_ms() / 1000,
                body: batch.body.clone(),
                timeout: config.events.timeout.0,
            };
            let answer = signed::post(&client, post).await;
            attempts += 1;
            let retryable = answer.retryable();
            let error = match answer {
                Answer::Accepted(_) => break,
                Answer::Refused(r) => format!("HTTP {}", r.status),
                Answer::Failed(e) => e.to_string(),
            };
            if !retryable || attempts > config.events.retry || stop_retrying.is_cancelled() {
                tracing::warn!(
                    url = %redact(&url),
                    events = batch.events,
                    attempts,
                    error,
                    "delivery event batch dropped"
                );
                break;
            }
            let wait = Duration::from_secs(1 << (attempts - 1).min(6));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop_retrying.cancelled() => {}
            }
        }
    }
}

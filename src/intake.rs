//! What both doors (SMTP and HTTP) share: the live config, the policy, the queue, and
//! the one place where an accepted or refused recipient is counted and attributed.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use crate::bounce::BounceClass;
use crate::campaign::Campaigns;
use crate::clock::Clock;
use crate::config::Config;
use crate::dkim::Signing;
use crate::faillog::{FailLog, FailureEvent};
use crate::policy::Policy;
use crate::queue::{NewMessage, Queue, Remembered};
use crate::reason::{Reason, Stage};
use crate::suppression::{self, NewEntry, Scope, Target};
use crate::unsubscribe::Signer;

pub struct Intake {
    pub config: Arc<ArcSwap<Config>>,
    pub policy: Policy,
    pub queue: Queue,
    pub clock: Arc<dyn Clock>,
    /// Tells the scheduler that new work was queued.
    pub wake: Arc<Notify>,
    pub faillog: FailLog,
    /// DKIM keys: every message is signed here, before its commit.
    pub signing: Arc<Signing>,
    /// The unsubscribe token key, when `[suppression.unsubscribe]` is enabled.
    pub unsubscribe: Option<Arc<Signer>>,
    /// Batch sends' counters: the door counts uploads, the renderer deliveries.
    pub batches: Arc<crate::batch_stats::BatchStats>,
    /// The shared state of `[cluster]`, when configured.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl Intake {
    pub fn campaigns(&self) -> &Arc<Campaigns> {
        &self.policy.campaigns
    }

    /// Counts a refused recipient against its campaign. Never blocks, never fails: it is
    /// called once per bad recipient of a flood.
    pub fn refused(&self, campaign: Option<&str>, reason: Reason, recipient: &str) {
        // The counted campaign's name is bounded (unattributed and overflow buckets), so
        // the failure log's keys are too, whatever names clients invent.
        let counted = self.policy.campaigns.record_refusal(campaign, reason);
        self.log_failure(
            Some(&counted.name),
            Stage::Intake,
            (reason, None),
            recipient,
            true,
            || reason.reply().to_string(),
        );
        tracing::trace!(campaign, %reason, stage = Stage::Intake.as_str(), "recipient refused");
    }

    /// As [`Intake::refused`] for `count` recipients whose addresses were not kept (a
    /// transaction holds only a few samples): counted, and in the failure log's
    /// aggregates only.
    pub fn refused_unlisted(&self, campaign: Option<&str>, reason: Reason, count: u64) {
        if count == 0 {
            return;
        }
        let counted = self
            .policy
            .campaigns
            .record_refusals(campaign, reason, count);
        for _ in 0..count {
            self.log_failure(
                Some(&counted.name),
                Stage::Intake,
                (reason, None),
                "",
                false,
                || reason.reply().to_string(),
            );
        }
    }

    fn log_failure(
        &self,
        campaign: Option<&str>,
        stage: Stage,
        (reason, class): (Reason, Option<BounceClass>),
        recipient: &str,
        row: bool,
        detail: impl FnOnce() -> String,
    ) {
        let ev = FailureEvent {
            at_ms: self.clock.now_ms(),
            campaign: campaign.map(str::to_owned),
            stage,
            reason,
            class,
            recipient: recipient.to_owned(),
            detail: detail(),
        };
        if row {
            self.faillog.record(ev);
        } else {
            self.faillog.record_aggregate(ev);
        }
    }

    /// Queues a message; returns once it is durable. On failure every recipient is
    /// counted as refused with `QueueUnavailable`.
    pub async fn enqueue(&self, msg: NewMessage) -> Result<(), Reason> {
        self.store(msg, None).await.map(|_| ())
    }

    /// As [`Intake::enqueue`], storing `response` under an idempotency key in the same
    /// transaction. Returns the earlier response instead when the key was seen already
    /// (and then nothing is queued or counted).
    pub async fn enqueue_idempotent(
        &self,
        msg: NewMessage,
        key: String,
        response: Remembered,
        ttl: std::time::Duration,
    ) -> Result<Option<Remembered>, Reason> {
        self.store(msg, Some((key, response, ttl))).await
    }

    /// Both doors' enqueue, and its accounting: accepted recipients counted and the
    /// scheduler woken, or every recipient refused with `QueueUnavailable`.
    async fn store(
        &self,
        mut msg: NewMessage,
        idempotency: Option<(String, Remembered, std::time::Duration)>,
    ) -> Result<Option<Remembered>, Reason> {
        self.add_unsubscribe(&mut msg);
        msg.body = self.signing.sign(std::mem::take(&mut msg.body)).await;
        let campaign = msg.campaign.clone();
        let recipients: Vec<String> = msg.recipients.iter().map(|r| r.address.clone()).collect();
        // Mail only for suspended destinations is not due before their probe: waking the
        // scheduler for it would be a claim pass per message that finds nothing.
        let waits = self
            .queue
            .delays()
            .all_wait(&msg.recipients, self.queue.clock().now_ms());
        let stored = match idempotency {
            None => self.queue.enqueue(msg).await.map(|()| None),
            Some((key, response, ttl)) => {
                self.queue
                    .enqueue_idempotent(Some(msg), key, response, ttl)
                    .await
            }
        };
        match stored {
            Ok(Some(earlier)) => Ok(Some(earlier)),
            Ok(None) => {
                if !crate::campaign::is_canary(campaign.as_deref()) {
                    self.policy
                        .campaigns
                        .record_accepted(campaign.as_deref(), recipients.len() as u64);
                }
                if !waits {
                    self.wake.notify_one();
                }
                Ok(None)
            }
            Err(e) => {
                tracing::warn!(error = %e, campaign, "message not queued");
                for r in &recipients {
                    self.refused(campaign.as_deref(), Reason::QueueUnavailable, r);
                }
                Err(Reason::QueueUnavailable)
            }
        }
    }
}

impl Intake {
    /// See [`with_unsubscribe`]; a message to several recipients gets none (the token
    /// names one).
    fn add_unsubscribe(&self, msg: &mut NewMessage) {
        let [recipient] = msg.recipients.as_slice() else {
            return;
        };
        let config = self.config.load();
        // The identity of an HTTP message is its API key's name (of SMTP, an AUTH user).
        let api_key = (msg.source == crate::queue::Source::Http)
            .then_some(msg.identity.as_deref())
            .flatten();
        msg.body = with_unsubscribe(
            self.unsubscribe.as_deref(),
            &config,
            &recipient.address,
            msg.campaign.as_deref(),
            api_key,
            std::mem::take(&mut msg.body),
        );
    }

    /// A permanent refusal that says the mailbox is gone suppresses that recipient (and
    /// only it: the message's other recipients had their own answers), globally, with
    /// the message's queue id as the source. A policy block is about the sender and
    /// never suppresses; an expired recipient only ever had temporary answers.
    fn suppress_dead_mailbox(&self, r: &crate::queue::Claimed, reason: Reason, class: BounceClass) {
        if reason != Reason::Rejected {
            return;
        }
        let Some(why) = suppression::Reason::for_bounce(class) else {
            return;
        };
        let Some((local, _)) = r.address.rsplit_once('@') else {
            return;
        };
        let expires_ms = self
            .config
            .load()
            .suppression
            .expiry(why, self.clock.now_ms());
        self.policy.suppressions.record(vec![NewEntry {
            target: Target::for_mailbox(local, &r.domain),
            scope: Scope::Global,
            reason: why,
            source: r.queue_id.clone(),
            expires_ms,
        }]);
    }
}

/// Prepends RFC 8058 `List-Unsubscribe` and `List-Unsubscribe-Post` headers for one
/// recipient to campaign mail that `[suppression.unsubscribe]` names, before DKIM signs
/// it: both doors' messages (through `Intake::store`) and batch messages (rendered at
/// delivery), and mail of the API keys it names whatever the campaign (a token without
/// a campaign unsubscribes from everything). A message carrying its own
/// `List-Unsubscribe` keeps it.
pub fn with_unsubscribe(
    signer: Option<&Signer>,
    config: &Config,
    recipient: &str,
    campaign: Option<&str>,
    api_key: Option<&str>,
    message: Vec<u8>,
) -> Vec<u8> {
    let Some(signer) = signer else {
        return message;
    };
    let u = &config.suppression.unsubscribe;
    let applies = u.applies_to(campaign) || u.applies_to_key(api_key);
    if !applies || has_header(&message, b"list-unsubscribe") {
        return message;
    }
    let campaign = campaign.unwrap_or("");
    let headers = signer.headers(&u.base_url, u.mailto.as_deref(), recipient, campaign);
    let mut body = Vec::with_capacity(message.len() + 256);
    for (name, value) in headers {
        // Tokens are base64url, the URL and mailto were checked by the config: no CR, LF
        // or NUL can reach the header.
        if value.contains(['\r', '\n', '\0']) {
            return message;
        }
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(b": ");
        body.extend_from_slice(value.as_bytes());
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(&message);
    body
}

/// Whether the header section of `message` has a field named `name` (lower case).
fn has_header(message: &[u8], name: &[u8]) -> bool {
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return false;
        }
        if let Some(colon) = line.iter().position(|&b| b == b':') {
            let field = line[..colon].trim_ascii();
            if field.eq_ignore_ascii_case(name) {
                return true;
            }
        }
    }
    false
}

impl crate::deliver::FailureSink for Intake {
    fn relay_failed(
        &self,
        r: &crate::queue::Claimed,
        reason: Reason,
        class: BounceClass,
        reply: &str,
    ) {
        if crate::campaign::is_canary(r.campaign.as_deref()) {
            return;
        }
        let (campaign, recipient) = (r.campaign.as_deref(), r.address.as_str());
        let counted = self
            .policy
            .campaigns
            .record_attempt(campaign, reason, class);
        self.log_failure(
            Some(&counted.name),
            Stage::Relay,
            (reason, Some(class)),
            recipient,
            true,
            || reply.to_owned(),
        );
        self.suppress_dead_mailbox(r, reason, class);
        // Debug, not info: a flood of failures must cost counters, not one log line (and
        // one journald write) each. The failure log and /metrics hold them.
        tracing::debug!(campaign, %reason, recipient, reply, "delivery failed");
    }

    fn relay_deferred(&self, r: &crate::queue::Claimed, class: BounceClass, reply: &str) {
        if crate::campaign::is_canary(r.campaign.as_deref()) {
            return;
        }
        let (campaign, recipient) = (r.campaign.as_deref(), r.address.as_str());
        self.policy
            .campaigns
            .record_attempt(campaign, Reason::Deferred, class);
        tracing::debug!(campaign, recipient, %class, reply, "delivery deferred");
    }

    fn relay_delivered(&self, r: &crate::queue::Claimed, _reply: &str) {
        if crate::campaign::is_canary(r.campaign.as_deref()) {
            return;
        }
        self.policy
            .campaigns
            .get(r.campaign.as_deref())
            .delivered
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

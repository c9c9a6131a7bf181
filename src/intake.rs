//! What both doors (SMTP and HTTP) share: the live config, the policy, the queue, and
//! the one place where an accepted or refused recipient is counted and attributed.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use crate::campaign::Campaigns;
use crate::clock::Clock;
use crate::config::Config;
use crate::dkim::Signing;
use crate::faillog::{FailLog, FailureEvent};
use crate::policy::Policy;
use crate::queue::{NewMessage, Queue, Remembered};
use crate::reason::{Reason, Stage};

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
            reason,
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
                reason,
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
        reason: Reason,
        recipient: &str,
        row: bool,
        detail: impl FnOnce() -> String,
    ) {
        let ev = FailureEvent {
            at_ms: self.clock.now_ms(),
            campaign: campaign.map(str::to_owned),
            stage,
            reason,
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
        msg.body = self.signing.sign(std::mem::take(&mut msg.body)).await;
        let campaign = msg.campaign.clone();
        let recipients: Vec<String> = msg.recipients.iter().map(|r| r.address.clone()).collect();
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
                self.wake.notify_one();
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

impl crate::deliver::FailureSink for Intake {
    fn relay_failed(&self, r: &crate::queue::Claimed, reason: Reason, reply: &str) {
        if crate::campaign::is_canary(r.campaign.as_deref()) {
            return;
        }
        let (campaign, recipient) = (r.campaign.as_deref(), r.address.as_str());
        let counted = self.policy.campaigns.record_failure(campaign, reason);
        self.log_failure(
            Some(&counted.name),
            Stage::Relay,
            reason,
            recipient,
            true,
            || reply.to_owned(),
        );
        // Debug, not info: a flood of failures must cost counters, not one log line (and
        // one journald write) each. The failure log and /metrics hold them.
        tracing::debug!(campaign, %reason, recipient, reply, "delivery failed");
    }

    fn relay_deferred(&self, r: &crate::queue::Claimed, reply: &str) {
        if crate::campaign::is_canary(r.campaign.as_deref()) {
            return;
        }
        let (campaign, recipient) = (r.campaign.as_deref(), r.address.as_str());
        self.policy
            .campaigns
            .record_failure(campaign, Reason::Deferred);
        tracing::debug!(campaign, recipient, reply, "delivery deferred");
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

//! Delivery outcomes in the log: one info line per delivered, deferred or failed
//! recipient with structured fields, governed per campaign like the failure log's rows,
//! so that a flood of a million failures costs counters and one summary line, not a
//! million lines.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::{DefaultKeyedRateLimiter, Quota};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::bounce::BounceClass;
use crate::config::{Config, LogConfig};
use crate::deliver::Reply;
use crate::queue::Claimed;
use crate::reason::Reason;

/// What became of one recipient, as the log names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Delivered,
    Deferred,
    Failed(Reason),
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Delivered => "delivered",
            Kind::Deferred => "deferred",
            Kind::Failed(_) => "failed",
        }
    }
}

/// The per-campaign line budget and the quota it was built from; swapped whole when a
/// reload changes the quota (and only then: an unrelated reload hands out no fresh burst).
struct Governed {
    per_sec: u32,
    burst: u32,
    limiter: DefaultKeyedRateLimiter<Option<String>>,
}

impl Governed {
    fn new(config: &LogConfig) -> Governed {
        let rate = NonZeroU32::new(config.outcomes_per_sec).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.outcomes_burst).unwrap_or(NonZeroU32::MIN);
        Governed {
            per_sec: config.outcomes_per_sec,
            burst: config.outcomes_burst,
            limiter: DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
        }
    }
}

pub struct OutcomeLog {
    governed: ArcSwap<Governed>,
    /// Lines not written since the last summary, per campaign.
    skipped: Mutex<HashMap<Option<String>, u64>>,
}

impl OutcomeLog {
    pub fn new(config: &LogConfig) -> OutcomeLog {
        OutcomeLog {
            governed: ArcSwap::from_pointee(Governed::new(config)),
            skipped: Mutex::default(),
        }
    }

    /// Writes one outcome line, or counts it as skipped when its campaign's budget is
    /// spent. No I/O beyond the line itself; one short lock when skipped.
    pub fn record(
        &self,
        config: &LogConfig,
        r: &Claimed,
        kind: Kind,
        class: Option<BounceClass>,
        reply: &Reply,
    ) {
        if !self.allow(config, &r.campaign) {
            *self.skipped.lock().entry(r.campaign.clone()).or_insert(0) += 1;
            return;
        }
        // Displayed, not debugged: `outcome=failed` in text, unquoted like every field.
        let reason = match kind {
            Kind::Failed(reason) => Some(reason.as_str()),
            _ => None,
        };
        tracing::info!(
            outcome = %kind.as_str(),
            queue_id = %r.queue_id,
            domain = %Escaped(&r.domain),
            campaign = r.campaign.as_deref().map(Escaped).map(display),
            attempt = r.attempts + 1,
            class = class.map(BounceClass::as_str).map(display),
            reason = reason.map(display),
            code = reply.code,
            enhanced = reply.enhanced.map(display),
            reply = %Escaped(&reply.text),
            "delivery outcome"
        );
    }

    fn allow(&self, config: &LogConfig, campaign: &Option<String>) -> bool {
        let mut governed = self.governed.load();
        if governed.per_sec != config.outcomes_per_sec || governed.burst != config.outcomes_burst {
            self.governed.store(Arc::new(Governed::new(config)));
            governed = self.governed.load();
        }
        governed.limiter.check_key(campaign).is_ok()
    }

    /// One line per campaign that had lines skipped since the last summary, saying how
    /// many; returns how many were skipped in all.
    pub fn summarize(&self) -> u64 {
        let skipped = std::mem::take(&mut *self.skipped.lock());
        let mut total = 0;
        for (campaign, n) in skipped {
            total += n;
            tracing::info!(
                campaign = campaign.as_deref().map(Escaped).map(display),
                skipped = n,
                "delivery outcome lines skipped"
            );
        }
        total
    }

    /// Writes the summary every `[log] summary_interval` until `shutdown`, and once more
    /// then, so that no count is lost at a stop.
    pub async fn run(self: Arc<Self>, config: Arc<ArcSwap<Config>>, shutdown: CancellationToken) {
        loop {
            let every: Duration = config.load().log.summary_interval.0;
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(every) => {}
            }
            self.summarize();
        }
        self.summarize();
    }
}

/// A remote-controlled string made safe for one log line: control characters (CR, LF,
/// NUL, ESC ...) and the backslash are written as escapes, so that a reply text can
/// never end the line and forge the next one in the text format.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write as _;
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '\r' => f.write_str("\\r")?,
                '\n' => f.write_str("\\n")?,
                '\t' => f.write_str("\\t")?,
                // U+2028/2029 end a line for some viewers.
                c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                    write!(f, "\\u{{{:x}}}", u32::from(c))?
                }
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn escapes_line_breaks_and_controls() {
        assert_eq!(
            Escaped("a\r\nb\0c\\d\u{1b}[31m").to_string(),
            "a\\r\\nb\\u{0}c\\\\d\\u{1b}[31m"
        );
        assert_eq!(
            Escaped("550 5.1.1 no such user").to_string(),
            "550 5.1.1 no such user"
        );
    }

    fn claimed(campaign: Option<&str>) -> Claimed {
        Claimed {
            id: 1,
            message_id: 1,
            queue_id: "q".into(),
            sender: "a@b.test".into(),
            campaign: campaign.map(str::to_owned),
            address: "x@mx.test".into(),
            domain: "mx.test".into(),
            attempts: 0,
            received_at: 0,
            smtputf8: false,
            vars: None,
        }
    }

    #[test]
    fn a_campaign_past_its_burst_is_counted_not_written_and_others_are_unaffected() {
        let config = LogConfig {
            outcomes_per_sec: 1,
            outcomes_burst: 3,
            ..LogConfig::default()
        };
        let log = OutcomeLog::new(&config);
        let reply = Reply::smtp(550, "5.1.1 no such user");
        for _ in 0..1000 {
            log.record(
                &config,
                &claimed(Some("flood")),
                Kind::Failed(Reason::Rejected),
                Some(BounceClass::InvalidRecipient),
                &reply,
            );
        }
        log.record(
            &config,
            &claimed(Some("other")),
            Kind::Delivered,
            None,
            &reply,
        );
        let skipped = log.skipped.lock().clone();
        // A second may pass during the loop and refill one cell: at most a few written.
        let flood = skipped[&Some("flood".to_owned())];
        assert!((995..=997).contains(&flood), "{flood}");
        assert!(!skipped.contains_key(&Some("other".to_owned())));
        assert_eq!(log.summarize(), flood);
        assert_eq!(log.summarize(), 0, "a summary takes the counts");
    }

    proptest! {
        #[test]
        fn escaped_text_has_no_control_characters(s in any::<String>()) {
            let out = Escaped(&s).to_string();
            let breaks = |c: char| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}');
            prop_assert!(!out.chars().any(breaks), "{:?}", out);
        }
    }
}

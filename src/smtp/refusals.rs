//! The RCPT-time refusals of one transaction, held until its campaign is final: the
//! `X-Campaign-ID` header is only seen after DATA, and counting the refusals against the
//! sender meanwhile would pause the sender for the real campaign's bad addresses.
//!
//! Bounded whatever the client sends: a count per reason and the first
//! [`SAMPLES`] addresses, each cut to [`SAMPLE_LEN`] octets (the failure log records
//! those as rows, as it would have at RCPT time; the rest go to its aggregates only).

use crate::intake::Intake;
use crate::reason::Reason;

/// Refused addresses kept per transaction: a normal transaction's worth
/// (`max_recipients` defaults to 100), so the failure log sees each one.
pub const SAMPLES: usize = 100;
/// An address longer than RFC 5321's 256-octet path is malformed anyway; keep its start.
pub const SAMPLE_LEN: usize = 256;

#[derive(Debug, Default)]
pub struct Held {
    counts: [u64; Reason::ALL.len()],
    samples: Vec<(Reason, String)>,
}

impl Held {
    /// Notes one refused recipient. Cheap: an add, and a copy for the first few.
    pub fn push(&mut self, reason: Reason, address: &str) {
        self.counts[reason.index()] += 1;
        if self.samples.len() < SAMPLES {
            let mut end = address.len().min(SAMPLE_LEN);
            while !address.is_char_boundary(end) {
                end -= 1;
            }
            self.samples.push((reason, address[..end].to_owned()));
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Counts every held refusal against `campaign`, now final.
    pub fn account(self, intake: &Intake, campaign: Option<&str>) {
        let mut counts = self.counts;
        for (reason, address) in &self.samples {
            intake.refused(campaign, *reason, address);
            counts[reason.index()] -= 1;
        }
        for reason in Reason::ALL {
            let n = counts[reason.index()];
            if n > 0 {
                intake.refused_unlisted(campaign, *reason, n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_samples_exact_counts() {
        let mut h = Held::default();
        for i in 0..1000 {
            h.push(Reason::NoSuchDomain, &format!("u{i}@nx.test"));
        }
        h.push(Reason::MalformedAddress, "bad");
        assert_eq!(h.total(), 1001);
        assert_eq!(h.samples.len(), SAMPLES);
        assert_eq!(h.counts[Reason::NoSuchDomain.index()], 1000);
    }
}

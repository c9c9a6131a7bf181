//! The RCPT-time refusals of one transaction, held until its campaign is final: the
//! `X-Campaign-ID` header is only seen after DATA, and counting the refusals against the
//! sender meanwhile would pause the sender for the real campaign's bad addresses.
//!
//! Bounded whatever the client sends: a count per reason and a few sample addresses
//! (which the failure log records as rows; the rest go to its aggregates).

use crate::intake::Intake;
use crate::reason::Reason;

/// Sample addresses kept per transaction.
pub const SAMPLES: usize = 5;

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
            self.samples.push((reason, address.to_owned()));
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

//! The door: for each recipient, in order of cost, relay access, limits, syntax, the
//! suppression list (memory), pause switches, route (and whether its webhook endpoint is
//! enabled) and DNS, ending in an accepted mailbox or a typed refusal.

use std::net::IpAddr;
use std::sync::Arc;

use crate::address::{self, Mailbox};
use crate::campaign::Campaigns;
use crate::clock::Clock;
use crate::config::{Config, Transport};
use crate::deliver::webhook::DisabledEndpoints;
use crate::dns::{MailDns, Verdict};
use crate::reason::Reason;
use crate::suppression::Suppressions;

/// What the door knows about who is submitting.
#[derive(Debug, Clone, Copy)]
pub struct Submitter {
    /// Connected from one of `[smtp] allowed_networks`, or holding an API key.
    pub trusted_network: bool,
    pub authenticated: bool,
}

impl Submitter {
    pub fn may_relay(&self) -> bool {
        self.trusted_network || self.authenticated
    }
}

pub struct Policy {
    pub dns: Arc<MailDns>,
    pub campaigns: Arc<Campaigns>,
    pub clock: Arc<dyn Clock>,
    /// Webhook endpoints disabled by `410 Gone`: their domains wait at the door.
    pub webhooks: Arc<DisabledEndpoints>,
    /// The do-not-contact list, answered from memory.
    pub suppressions: Arc<Suppressions>,
}

impl Policy {
    /// Whether `ip` is in `[smtp] allowed_networks`.
    pub fn trusted(config: &Config, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        config.smtp.allowed_networks.iter().any(|n| n.contains(&ip))
    }

    /// Checks one recipient. `accepted` is how many the message already has.
    ///
    /// Everything before the DNS step is answered from memory; a flood of empty or
    /// malformed addresses never reaches the resolver or the disk.
    pub async fn check_rcpt(
        &self,
        config: &Config,
        who: Submitter,
        campaign: Option<&str>,
        accepted: usize,
        address: &str,
    ) -> Result<Mailbox, Reason> {
        if !who.may_relay() {
            return Err(Reason::RelayDenied);
        }
        if accepted >= config.smtp.max_recipients {
            return Err(Reason::TooManyRecipients);
        }
        let mailbox = address::parse(address)?;
        let local = mailbox.address.rsplit_once('@').map_or("", |(l, _)| l);
        if self
            .suppressions
            .check(local, &mailbox.domain, campaign)
            .is_some()
        {
            return Err(Reason::Suppressed);
        }
        self.check_open(campaign)?;
        let route = config.route_for(&mailbox.domain).ok_or(Reason::NoRoute)?;
        // Accepting mail for a disabled endpoint would only fail it later; a temporary
        // refusal keeps it with the sender until the operator re-enables (reloads).
        if route.transport == Transport::Webhook
            && route
                .url
                .as_deref()
                .is_some_and(|u| self.webhooks.contains(u))
        {
            return Err(Reason::DestinationDisabled);
        }
        if route.check_dns() {
            match self.dns.verdict(&mailbox.domain).await {
                Verdict::Mail(_) => {}
                Verdict::NullMx => return Err(Reason::NullMx),
                Verdict::NoSuchDomain => return Err(Reason::NoSuchDomain),
                Verdict::NoMailHost => return Err(Reason::NoMailHost),
                Verdict::Temporary => return Err(Reason::DnsTempfail),
            }
        }
        Ok(mailbox)
    }

    /// Whether `mailbox` is on the do-not-contact list, globally or for `campaign`. From
    /// memory: a few hash lookups, no I/O.
    pub fn suppressed(&self, mailbox: &Mailbox, campaign: Option<&str>) -> bool {
        let local = mailbox.address.rsplit_once('@').map_or("", |(l, _)| l);
        self.suppressions
            .check(local, &mailbox.domain, campaign)
            .is_some()
    }

    /// Whether intake is open for `campaign` now: intake not paused, campaign not paused
    /// or blocked.
    pub fn check_open(&self, campaign: Option<&str>) -> Result<(), Reason> {
        if self.campaigns.intake_paused() {
            return Err(Reason::IntakePaused);
        }
        if self.campaigns.is_held(campaign, self.clock.now_ms()) {
            return Err(Reason::CampaignPaused);
        }
        Ok(())
    }
}

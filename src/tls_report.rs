//! SMTP TLS reporting (RFC 8460) as a sender: every minute the TLS-RPT counters that
//! delivery keeps in memory (`deliver::sts`) are written to sts.db; once a UTC day is
//! over, each receiving domain that publishes `_smtp._tls` with a `rua` gets that day's
//! report, gzipped JSON, by HTTPS POST or as a mail queued like a DSN (DKIM-signed, from
//! the null sender so that it can never bounce back). Each (day, domain) is reported once,
//! whatever the outcome (recorded, shown by `ctl tls-report`); counters and records
//! older than `[tls_report] retention` are deleted.

pub mod report;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::deliver::sts::{Sts, store, utc_day};
use crate::dkim::Signing;
use crate::dns::MailDns;
use crate::mta_sts::{ReportTo, parse_tlsrpt_record};
use crate::queue::{NewMessage, NewRecipient, Queue, QueueId, Source};
use report::Submitter;

/// How often counters are flushed and due reports looked for.
const TICK: Duration = Duration::from_secs(60);
/// Most (day, domain) reports handled per pass.
const MAX_PER_PASS: usize = 200;
/// Most counter rows read for one report (a domain's results × MX hosts × addresses).
const MAX_ROWS: usize = 10_000;
/// Time for one HTTPS report POST.
const POST_TIMEOUT: Duration = Duration::from_secs(30);

/// Since start: the `/metrics` counters.
#[derive(Debug, Default)]
pub struct ReportStats {
    /// Reports delivered to an `https:` rua or queued for a `mailto:` one.
    pub sent: AtomicU64,
    /// Report deliveries that failed (HTTPS error or refusal, queueing failed).
    pub failed: AtomicU64,
}

/// What became of one day's report for one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub day: String,
    pub domain: String,
    /// `sent https://...`, `queued mailto:...`, `failed ...: why`, or `no rua published`.
    pub outcome: String,
}

pub struct TlsReports {
    pub sts: Arc<Sts>,
    config: Arc<ArcSwap<Config>>,
    dns: Arc<MailDns>,
    queue: Queue,
    signing: Arc<Signing>,
    wake: Arc<Notify>,
    pub stats: ReportStats,
    /// One pass at a time (the minute tick and an operator's `ctl tls-report --send`).
    pass: tokio::sync::Mutex<()>,
}

impl TlsReports {
    pub fn new(
        sts: Arc<Sts>,
        config: Arc<ArcSwap<Config>>,
        dns: Arc<MailDns>,
        queue: Queue,
        signing: Arc<Signing>,
        wake: Arc<Notify>,
    ) -> TlsReports {
        TlsReports {
            sts,
            config,
            dns,
            queue,
            signing,
            wake,
            stats: ReportStats::default(),
            pass: tokio::sync::Mutex::new(()),
        }
    }

    /// The supervised task: flush, report what is due, prune; a last flush at shutdown.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => {
                    if let Err(e) = self.sts.flush().await {
                        tracing::warn!(error = %e, "TLS-RPT counters not flushed at shutdown");
                    }
                    return;
                }
            }
            if self.config.load().tls_report.enabled {
                self.send_due().await;
            } else if let Err(e) = self.sts.flush().await {
                tracing::warn!(error = %e, "TLS-RPT counters not flushed");
            }
            self.prune().await;
        }
    }

    /// Flushes the counters and sends every report due (days before today not reported
    /// yet); returns what became of each.
    pub async fn send_due(&self) -> Vec<Sent> {
        let _one = self.pass.lock().await;
        if let Err(e) = self.sts.flush().await {
            tracing::warn!(error = %e, "TLS-RPT counters not flushed");
        }
        let today = utc_day(self.sts.clock().now_ms());
        let due = match self
            .sts
            .with_db(move |c| store::unreported(c, &today, MAX_PER_PASS))
            .await
        {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "TLS reports: sts.db unreadable");
                return Vec::new();
            }
        };
        let mut done = Vec::new();
        for (day, domain) in due {
            if let Some(outcome) = self.report(&day, &domain).await {
                let (d, dom, o) = (day.clone(), domain.clone(), outcome.clone());
                let now = self.sts.clock().now_ms();
                if let Err(e) = self
                    .sts
                    .with_db(move |c| store::mark_reported(c, &d, &dom, now, &o))
                    .await
                {
                    tracing::warn!(error = %e, "TLS report not recorded as sent");
                }
                done.push(Sent {
                    day,
                    domain,
                    outcome,
                });
            }
        }
        done
    }

    /// Sends `domain`'s report of `day` to every `rua`; `None` when its `_smtp._tls`
    /// record cannot be looked up now (the next pass tries again).
    async fn report(&self, day: &str, domain: &str) -> Option<String> {
        let ruas = match self
            .dns
            .resolver()
            .txt(&format!("_smtp._tls.{domain}"))
            .await
        {
            Ok(r) => r.items.iter().find_map(|t| parse_tlsrpt_record(t)),
            Err(crate::dns::LookupError::Temporary(e)) => {
                tracing::info!(domain, error = %e, "_smtp._tls lookup failed; retrying later");
                return None;
            }
            Err(_) => None,
        };
        let Some(ruas) = ruas else {
            return Some("no rua published".into());
        };
        let (d, dom) = (day.to_owned(), domain.to_owned());
        let rows = self
            .sts
            .with_db(move |c| store::counts(c, Some(&dom), Some(&d), MAX_ROWS))
            .await
            .ok()?;
        let config = self.config.load_full();
        let hostname = &config.server.hostname;
        let contact = config.tls_report.contact(hostname);
        let who = Submitter {
            organization: config.tls_report.organization(hostname),
            contact: &contact,
            hostname,
        };
        let policy = self.sts.cached_policy(domain);
        let json = report::json(&who, domain, day, &rows, policy.as_deref());
        let gzipped = report::gzip(&json);
        let mut outcomes = Vec::new();
        for rua in ruas {
            let outcome = match &rua {
                ReportTo::Https(url) => self.post(&config, domain, url, &gzipped).await,
                ReportTo::Mailto(to) => self.mail(&config, &who, to, domain, day, &gzipped).await,
            };
            match &outcome {
                Ok(_) => self.stats.sent.fetch_add(1, Ordering::Relaxed),
                Err(_) => self.stats.failed.fetch_add(1, Ordering::Relaxed),
            };
            let text = outcome.unwrap_or_else(|e| e);
            tracing::info!(domain, day, "TLS report: {text}");
            outcomes.push(text);
        }
        Some(outcomes.join("; "))
    }

    async fn post(
        &self,
        config: &Config,
        domain: &str,
        url: &str,
        gzipped: &[u8],
    ) -> Result<String, String> {
        let shown = crate::net::client::redact(url);
        let fail = |why: String| format!("failed {shown}: {why}");
        let host = url
            .parse::<hyper::Uri>()
            .ok()
            .and_then(|u| u.host().map(str::to_owned))
            .ok_or_else(|| fail("not a URL".into()))?;
        let ip = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => ip,
            Err(_) => self
                .dns
                .resolver()
                .ips(&host)
                .await
                .ok()
                .and_then(|r| r.items.first().copied())
                .ok_or_else(|| fail(format!("no address for {host}")))?,
        };
        // Verified like the domain's MTA-STS policy host: against its route's tls_ca, or
        // the web roots.
        let ca = config.route_for(domain).and_then(|r| r.tls_ca.clone());
        let client = self.sts.https_client(ca.as_deref()).map_err(fail)?;
        let response = client
            .request_at(
                hyper::Method::POST,
                url,
                Some(ip),
                &[("content-type", "application/tlsrpt+gzip".to_owned())],
                Bytes::copy_from_slice(gzipped),
                POST_TIMEOUT,
            )
            .await
            .map_err(|e| fail(e.to_string()))?;
        if (200..300).contains(&response.status) {
            Ok(format!("sent {shown}"))
        } else {
            Err(fail(format!("HTTP {}", response.status)))
        }
    }

    async fn mail(
        &self,
        config: &Config,
        who: &Submitter<'_>,
        to: &str,
        domain: &str,
        day: &str,
        gzipped: &[u8],
    ) -> Result<String, String> {
        let fail = |why: String| format!("failed mailto:{to}: {why}");
        let rcpt = crate::address::parse(to).map_err(|r| fail(r.to_string()))?;
        let from = config.tls_report.from(&config.server.hostname);
        let now = self.sts.clock().now_ms();
        let body = report::message(who, &from, to, domain, day, gzipped, now);
        let msg = NewMessage {
            queue_id: QueueId::generate(self.queue.clock().now_us()),
            // The null sender, as for DSNs: a report that cannot be delivered is dropped,
            // never bounced back to a mailbox nobody reads.
            sender: String::new(),
            campaign: None,
            source: Source::Report,
            client: "tls-report".into(),
            identity: None,
            body: self.signing.sign(body).await,
            recipients: vec![NewRecipient {
                address: rcpt.address,
                domain: rcpt.domain,
            }],
            smtputf8: false,
        };
        self.queue
            .enqueue(msg)
            .await
            .map_err(|e| fail(e.to_string()))?;
        self.wake.notify_one();
        Ok(format!("queued mailto:{to}"))
    }

    async fn prune(&self) {
        let retention = self.config.load().tls_report.retention.0;
        let now = self.sts.clock().now_ms();
        let before = utc_day(now - retention.as_millis() as i64);
        match self
            .sts
            .with_db(move |c| store::prune(c, &before, now))
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::debug!(rows = n, "TLS-RPT retention"),
            Err(e) => tracing::warn!(error = %e, "TLS-RPT retention failed"),
        }
    }
}

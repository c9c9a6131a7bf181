//! `/metrics` in the Prometheus text format: intake, refusals by reason, queue depth by
//! state, deliveries, failure-log writes, queue write transactions, guard trips and the
//! SMTP door (connections, AUTH gate).
//!
//! One table, [`METRICS`], names every series with its type, help and a function reading
//! its samples from a [`Snapshot`]; [`render`] takes the snapshot (the only awaits) and
//! writes the table in one loop.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use hyper::{Response, StatusCode};

use super::Body;
use super::daemon::Admin;
use crate::campaign::Campaign;
use crate::canary::{BUCKETS_MS, ProbeStats, StageStats};
use crate::config::FailLogMode;
use crate::deliver::sts::{StsStats, TlsResult};
use crate::deliver::webhook::EndpointStatus;
use crate::faillog::FailLogCounters;
use crate::queue::RecipientState;
use crate::queue::Totals;
use crate::reason::Reason;

mod cluster;

/// Campaigns listed by name in per-campaign series; the rest only count in the totals,
/// so a flood of campaign names cannot blow up the scrape.
const TOP_CAMPAIGNS: usize = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    /// Samples are `_bucket` (with `le`), `_sum` and `_count` lines.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One line of a series: its label, if any (`name="value"`, escaped on output), and value.
struct Sample {
    label: Option<(&'static str, String)>,
    value: u64,
    /// A histogram's line: `_bucket`, `_sum` or `_count` after the name; empty otherwise.
    suffix: &'static str,
    /// A second label: a histogram bucket's `le`, or another dimension.
    second: Option<(&'static str, String)>,
}

/// The samples of a series; `None` leaves the series out entirely (its part of the daemon
/// is not running), `Some(vec![])` writes its HELP and TYPE without samples.
type Samples = Option<Vec<Sample>>;

struct Metric {
    name: &'static str,
    kind: Kind,
    help: &'static str,
    samples: fn(&Snapshot) -> Samples,
}

/// What the table reads, gathered once per scrape.
struct Snapshot<'a> {
    admin: &'a Admin,
    campaigns: Vec<Arc<Campaign>>,
    live: Vec<(RecipientState, u64)>,
    totals: Option<Totals>,
    faillog: (FailLogCounters, FailLogMode),
    webhooks: Vec<EndpointStatus>,
    canary: Vec<(String, ProbeStats)>,
    canary_stages: Vec<(&'static str, StageStats)>,
}

impl Snapshot<'_> {
    fn sum(&self, f: impl Fn(&Campaign) -> u64) -> u64 {
        self.campaigns.iter().map(|c| f(c)).sum()
    }

    fn faillog(&self, f: impl Fn(&FailLogCounters) -> u64) -> Samples {
        Some(vec![unlabeled(f(&self.faillog.0))])
    }

    fn webhook(&self, f: impl Fn(&EndpointStatus) -> bool) -> Samples {
        Some(
            self.webhooks
                .iter()
                .map(|ep| labeled("url", ep.url.clone(), u64::from(f(ep))))
                .collect(),
        )
    }

    fn totals(&self, pairs: impl Fn(&Totals) -> [(&'static str, String, u64); 2]) -> Samples {
        self.totals.as_ref().map(|t| {
            pairs(t)
                .into_iter()
                .map(|(key, label, value)| labeled(key, label, value))
                .collect()
        })
    }
}

fn unlabeled(value: u64) -> Sample {
    Sample {
        label: None,
        value,
        suffix: "",
        second: None,
    }
}

fn labeled(key: &'static str, label: String, value: u64) -> Sample {
    Sample {
        label: Some((key, label)),
        value,
        suffix: "",
        second: None,
    }
}

/// One histogram's lines for `label`: cumulative buckets per bound of `bounds` and
/// `+Inf`, from per-bucket counts (one more than `bounds`), then `_sum` and `_count`.
fn histogram(
    key: &'static str,
    label: &str,
    bounds: &[u64],
    counts: &[u64],
    sum: u64,
) -> Vec<Sample> {
    let mut out = Vec::with_capacity(bounds.len() + 3);
    let mut total = 0;
    for (i, n) in counts.iter().enumerate() {
        total += n;
        let le = bounds.get(i).map_or("+Inf".to_owned(), u64::to_string);
        out.push(Sample {
            suffix: "_bucket",
            second: Some(("le", le)),
            ..labeled(key, label.to_owned(), total)
        });
    }
    out.push(Sample {
        suffix: "_sum",
        ..labeled(key, label.to_owned(), sum)
    });
    out.push(Sample {
        suffix: "_count",
        ..labeled(key, label.to_owned(), total)
    });
    out
}

fn one(value: u64) -> Samples {
    Some(vec![unlabeled(value)])
}

fn load(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// An SMTP door series.
fn smtp(snap: &Snapshot, f: impl Fn(&crate::smtp::server::Server) -> u64) -> Samples {
    Some(vec![unlabeled(f(&snap.admin.smtp))])
}

fn suppressions<'a>(snap: &'a Snapshot) -> &'a crate::suppression::Suppressions {
    &snap.admin.intake.policy.suppressions
}

/// Every series, in the order of the scrape.
const METRICS: &[Metric] = &[
    Metric {
        name: "floodgate_recipients_accepted_total",
        kind: Kind::Counter,
        help: "Recipients accepted and queued.",
        samples: |s| one(s.sum(|c| load(&c.accepted))),
    },
    Metric {
        name: "floodgate_deliveries_total",
        kind: Kind::Counter,
        help: "Recipients delivered.",
        samples: |s| one(s.sum(|c| load(&c.delivered))),
    },
    Metric {
        name: "floodgate_failures_total",
        kind: Kind::Counter,
        help: "Failed recipients by reason (intake refusals and relay failures; deferrals apart).",
        samples: |s| {
            let reasons = Reason::ALL.iter().filter(|r| **r != Reason::Deferred);
            Some(
                reasons
                    .map(|r| labeled("reason", r.as_str().into(), s.sum(|c| c.failures(*r))))
                    .collect(),
            )
        },
    },
    Metric {
        name: "floodgate_deferrals_total",
        kind: Kind::Counter,
        help: "Delivery attempts deferred by the destination (temporary; retried).",
        samples: |s| one(s.sum(|c| c.failures(Reason::Deferred))),
    },
    Metric {
        name: "floodgate_campaign_failures_total",
        kind: Kind::Counter,
        help: "Failures per campaign (the top campaigns by failures).",
        samples: |s| {
            let mut top: Vec<_> = s
                .campaigns
                .iter()
                .map(|c| (c.total_failures(), c))
                .filter(|(n, _)| *n > 0)
                .collect();
            top.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
            let top = top.into_iter().take(TOP_CAMPAIGNS);
            Some(
                top.map(|(n, c)| labeled("campaign", c.name.to_string(), n))
                    .collect(),
            )
        },
    },
    Metric {
        name: "floodgate_campaign_paused",
        kind: Kind::Gauge,
        help: "1 for each paused campaign.",
        samples: |s| {
            let paused = s.campaigns.iter().filter(|c| c.is_paused());
            Some(
                paused
                    .map(|c| labeled("campaign", c.name.to_string(), 1))
                    .collect(),
            )
        },
    },
    Metric {
        name: "floodgate_intake_paused",
        kind: Kind::Gauge,
        help: "1 while intake is paused.",
        samples: |s| one(u64::from(s.admin.intake.campaigns().intake_paused())),
    },
    Metric {
        name: "floodgate_queue_recipients",
        kind: Kind::Gauge,
        help: "Recipients waiting in queue.db, by state (scheduled, held).",
        samples: |s| {
            let live = s.live.iter();
            Some(
                live.map(|(st, n)| labeled("state", st.as_str().into(), *n))
                    .collect(),
            )
        },
    },
    Metric {
        name: "floodgate_queue_finished_total",
        kind: Kind::Counter,
        help: "Recipients ever finished, by state; kept across restarts and retention.",
        samples: |s| {
            s.totals(|t| {
                [
                    ("state", "delivered".into(), t.delivered),
                    ("state", "failed".into(), t.failed),
                ]
            })
        },
    },
    Metric {
        name: "floodgate_queue_pruned_total",
        kind: Kind::Counter,
        help: "Finished rows deleted by [queue] retention.",
        samples: |s| {
            s.totals(|t| {
                [
                    ("table", "recipients".into(), t.pruned_recipients),
                    ("table", "messages".into(), t.pruned_messages),
                ]
            })
        },
    },
    Metric {
        name: "floodgate_queue_transactions_total",
        kind: Kind::Counter,
        help: "Group-commit transactions on queue.db.",
        samples: |s| one(load(&s.admin.intake.queue.writer_stats().transactions)),
    },
    Metric {
        name: "floodgate_queue_operations_total",
        kind: Kind::Counter,
        help: "Operations carried by those transactions.",
        samples: |s| one(load(&s.admin.intake.queue.writer_stats().operations)),
    },
    Metric {
        name: "floodgate_queue_failed_transactions_total",
        kind: Kind::Counter,
        help: "Failed queue.db transactions (disk full, locked).",
        samples: |s| {
            one(load(
                &s.admin.intake.queue.writer_stats().failed_transactions,
            ))
        },
    },
    Metric {
        name: "floodgate_dns_lookups_total",
        kind: Kind::Counter,
        help: "Domain verdicts looked up in DNS (cache misses).",
        samples: |s| one(load(&s.admin.intake.policy.dns.stats.lookups)),
    },
    Metric {
        name: "floodgate_dns_cache_hits_total",
        kind: Kind::Counter,
        help: "Domain verdicts answered from the cache.",
        samples: |s| one(load(&s.admin.intake.policy.dns.stats.cache_hits)),
    },
    Metric {
        name: "floodgate_faillog_recorded_total",
        kind: Kind::Counter,
        help: "Failures counted in the failure log's aggregates.",
        samples: |s| s.faillog(|c| c.recorded),
    },
    Metric {
        name: "floodgate_faillog_rows_written_total",
        kind: Kind::Counter,
        help: "Event rows written to failures.db.",
        samples: |s| s.faillog(|c| c.rows_written),
    },
    Metric {
        name: "floodgate_faillog_suppressed_total",
        kind: Kind::Counter,
        help: "Event rows refused by the per-campaign rate.",
        samples: |s| s.faillog(|c| c.suppressed),
    },
    Metric {
        name: "floodgate_faillog_sampled_out_total",
        kind: Kind::Counter,
        help: "Event rows passed over by sampling.",
        samples: |s| s.faillog(|c| c.sampled_out),
    },
    Metric {
        name: "floodgate_faillog_dropped_total",
        kind: Kind::Counter,
        help: "Event rows dropped because the writer's channel was full.",
        samples: |s| s.faillog(|c| c.dropped),
    },
    Metric {
        name: "floodgate_faillog_lost_rows_total",
        kind: Kind::Counter,
        help: "Event rows lost in failed transactions.",
        samples: |s| s.faillog(|c| c.lost_rows),
    },
    Metric {
        name: "floodgate_faillog_transactions_total",
        kind: Kind::Counter,
        help: "Transactions on failures.db.",
        samples: |s| s.faillog(|c| c.transactions),
    },
    Metric {
        name: "floodgate_faillog_failed_transactions_total",
        kind: Kind::Counter,
        help: "Failed transactions on failures.db.",
        samples: |s| s.faillog(|c| c.failed_transactions),
    },
    Metric {
        name: "floodgate_faillog_mode",
        kind: Kind::Gauge,
        help: "The failure log's mode (1 for the current one).",
        samples: |s| {
            let (_, mode) = &s.faillog;
            Some(vec![labeled("mode", mode.as_str().into(), 1)])
        },
    },
    Metric {
        name: "floodgate_webhook_endpoint_disabled",
        kind: Kind::Gauge,
        help: "1 for each webhook endpoint disabled by a 410 (until reload).",
        samples: |s| s.webhook(|ep| ep.disabled),
    },
    Metric {
        name: "floodgate_webhook_circuit_open",
        kind: Kind::Gauge,
        help: "1 for each webhook endpoint whose circuit breaker is open.",
        samples: |s| s.webhook(|ep| ep.circuit != "closed"),
    },
    Metric {
        name: "floodgate_events_dropped_total",
        kind: Kind::Counter,
        help: "Delivery events dropped because too many were pending.",
        samples: |s| one(s.admin.events.dropped()),
    },
    Metric {
        name: "floodgate_guard_trips_total",
        kind: Kind::Counter,
        help: "Campaigns whose failure ratio tripped the guard.",
        samples: |s| one(load(&s.admin.guard.stats.trips)),
    },
    Metric {
        name: "floodgate_guard_pauses_total",
        kind: Kind::Counter,
        help: "Campaigns the guard paused.",
        samples: |s| one(load(&s.admin.guard.stats.pauses)),
    },
    Metric {
        name: "floodgate_alerts_total",
        kind: Kind::Counter,
        help: "Alerts raised.",
        samples: |s| one(load(&s.admin.guard.stats.alerts)),
    },
    Metric {
        name: "floodgate_smtp_connections",
        kind: Kind::Gauge,
        help: "SMTP sessions open now.",
        samples: |s| smtp(s, |d| d.connections.total() as u64),
    },
    Metric {
        name: "floodgate_smtp_connections_refused_total",
        kind: Kind::Counter,
        help: "SMTP connections refused: table or address share full, nobody idle to evict.",
        samples: |s| smtp(s, |d| load(&d.connections.stats.refused)),
    },
    Metric {
        name: "floodgate_smtp_sessions_evicted_total",
        kind: Kind::Counter,
        help: "Idle SMTP sessions closed to admit a new client.",
        samples: |s| smtp(s, |d| load(&d.connections.stats.evicted)),
    },
    Metric {
        name: "floodgate_smtp_auth_verifications_total",
        kind: Kind::Counter,
        help: "AUTH password verifications run.",
        samples: |s| smtp(s, |d| load(&d.auth.stats.verifications)),
    },
    Metric {
        name: "floodgate_smtp_auth_failures_total",
        kind: Kind::Counter,
        help: "AUTH verifications that failed.",
        samples: |s| smtp(s, |d| load(&d.auth.stats.failures)),
    },
    Metric {
        name: "floodgate_smtp_auth_limited_total",
        kind: Kind::Counter,
        help: "AUTH attempts refused unverified: the address is over its failure limit.",
        samples: |s| smtp(s, |d| load(&d.auth.stats.limited)),
    },
    Metric {
        name: "floodgate_smtp_auth_busy_total",
        kind: Kind::Counter,
        help: "AUTH attempts refused unverified: workers busy and queue full.",
        samples: |s| smtp(s, |d| load(&d.auth.stats.busy)),
    },
    Metric {
        name: "floodgate_smtp_auth_running",
        kind: Kind::Gauge,
        help: "AUTH verifications running now.",
        samples: |s| smtp(s, |d| d.auth.stats.running.load(Ordering::Relaxed) as u64),
    },
    Metric {
        name: "floodgate_smtp_auth_running_peak",
        kind: Kind::Gauge,
        help: "The most AUTH verifications seen running at once.",
        samples: |s| smtp(s, |d| d.auth.stats.peak.load(Ordering::Relaxed) as u64),
    },
    Metric {
        name: "floodgate_smtp_auth_workers",
        kind: Kind::Gauge,
        help: "AUTH verification workers (the pool size).",
        samples: |s| smtp(s, |d| d.auth.workers as u64),
    },
    Metric {
        name: "floodgate_dkim_signed_total",
        kind: Kind::Counter,
        help: "Messages queued with at least one DKIM signature.",
        samples: |s| one(load(&s.admin.intake.signing.stats().signed)),
    },
    Metric {
        name: "floodgate_dkim_unsigned_total",
        kind: Kind::Counter,
        help: "Messages queued unsigned: no [[dkim]] key covers their From: domain.",
        samples: |s| one(load(&s.admin.intake.signing.stats().unsigned)),
    },
    Metric {
        name: "floodgate_dkim_failures_total",
        kind: Kind::Counter,
        help: "Messages a key covered but signing failed (queued unsigned, logged).",
        samples: |s| one(load(&s.admin.intake.signing.stats().failed)),
    },
    Metric {
        name: "floodgate_mta_sts_policies_fetched_total",
        kind: Kind::Counter,
        help: "MTA-STS policies fetched (a new TXT id, or the cached policy expired).",
        samples: |s| one(load(&sts(s).fetched)),
    },
    Metric {
        name: "floodgate_mta_sts_fetch_failures_total",
        kind: Kind::Counter,
        help: "MTA-STS policy fetches that failed (no address, TLS, HTTP, invalid policy).",
        samples: |s| one(load(&sts(s).fetch_failed)),
    },
    Metric {
        name: "floodgate_mta_sts_cache_fallbacks_total",
        kind: Kind::Counter,
        help: "Deliveries that used the cached MTA-STS policy because a refetch failed.",
        samples: |s| one(load(&sts(s).cache_fallbacks)),
    },
    Metric {
        name: "floodgate_mta_sts_policies_cached",
        kind: Kind::Gauge,
        help: "MTA-STS policies held in memory.",
        samples: |s| one(s.admin.tls_reports.sts.cached() as u64),
    },
    Metric {
        name: "floodgate_mta_sts_deferred_total",
        kind: Kind::Counter,
        help: "Recipients deferred because their domain's MTA-STS policy (enforce) was not met.",
        samples: |s| one(load(&sts(s).deferred)),
    },
    Metric {
        name: "floodgate_mta_sts_testing_failures_total",
        kind: Kind::Counter,
        help: "Sessions that did not meet an MTA-STS policy in testing, delivered anyway.",
        samples: |s| one(load(&sts(s).testing_failures)),
    },
    Metric {
        name: "floodgate_tls_sessions_total",
        kind: Kind::Counter,
        help: "Outbound MX sessions by TLS-RPT result (success or an RFC 8460 failure type).",
        samples: |s| {
            let stats = sts(s);
            Some(
                TlsResult::ALL
                    .iter()
                    .zip(&stats.results)
                    .map(|(r, n)| labeled("result", r.as_str().to_owned(), load(n)))
                    .collect(),
            )
        },
    },
    Metric {
        name: "floodgate_tls_session_counters_dropped_total",
        kind: Kind::Counter,
        help: "Sessions not counted for TLS reports: too many distinct counters awaited a flush.",
        samples: |s| one(load(&sts(s).dropped)),
    },
    Metric {
        name: "floodgate_tls_reports_sent_total",
        kind: Kind::Counter,
        help: "TLS reports POSTed to an https: rua or queued for a mailto: one.",
        samples: |s| one(load(&s.admin.tls_reports.stats.sent)),
    },
    Metric {
        name: "floodgate_canary_latency_milliseconds",
        kind: Kind::Histogram,
        help: "End-to-end latency of delivered canary probes, submission to delivery, per probe address.",
        samples: |s| {
            Some(
                s.canary
                    .iter()
                    .flat_map(|(a, p)| {
                        histogram("probe", a, &BUCKETS_MS, &p.buckets, p.latency_sum_ms)
                    })
                    .collect(),
            )
        },
    },
    Metric {
        name: "floodgate_canary_stage_milliseconds",
        kind: Kind::Histogram,
        help: "Time canary probes spent reaching each stage from the one before: committed (from submission), claimed (by the scheduler), handed (to the courier), delivered or failed.",
        samples: |s| {
            Some(
                s.canary_stages
                    .iter()
                    .flat_map(|(stage, p)| {
                        histogram("stage", stage, &BUCKETS_MS, &p.buckets, p.sum_ms)
                    })
                    .collect(),
            )
        },
    },
    Metric {
        name: "floodgate_canary_probes_total",
        kind: Kind::Counter,
        help: "Canary probes finished, per probe address and result (delivered, slow, failed: failed, timed out or refused; slow ones also count as delivered).",
        samples: |s| {
            Some(
                s.canary
                    .iter()
                    .flat_map(|(a, p)| {
                        [
                            ("delivered", p.delivered),
                            ("slow", p.slow),
                            ("failed", p.failed),
                        ]
                        .map(|(result, n)| Sample {
                            second: Some(("result", result.to_owned())),
                            ..labeled("probe", a.clone(), n)
                        })
                    })
                    .collect(),
            )
        },
    },
    Metric {
        name: "floodgate_tls_reports_failed_total",
        kind: Kind::Counter,
        help: "TLS report deliveries that failed (HTTPS error or refusal, queueing failed).",
        samples: |s| one(load(&s.admin.tls_reports.stats.failed)),
    },
    Metric {
        name: "floodgate_batches_created_total",
        kind: Kind::Counter,
        help: "Batch sends created (POST /v1/batches answered 201).",
        samples: |s| one(load(&s.admin.intake.batches.created)),
    },
    Metric {
        name: "floodgate_batch_chunks_total",
        kind: Kind::Counter,
        help: "Recipient-list uploads read to their end and answered (replays of a finished chunk not included).",
        samples: |s| one(load(&s.admin.intake.batches.chunks)),
    },
    Metric {
        name: "floodgate_batch_chunks_refused_total",
        kind: Kind::Counter,
        help: "Chunk retries refused with 422: their lines differ from those stored under the same Idempotency-Key.",
        samples: |s| one(load(&s.admin.intake.batches.chunks_refused)),
    },
    Metric {
        name: "floodgate_batch_upload_bytes_total",
        kind: Kind::Counter,
        help: "Bytes of recipient lists received.",
        samples: |s| one(load(&s.admin.intake.batches.upload_bytes)),
    },
    Metric {
        name: "floodgate_batch_rows_received_total",
        kind: Kind::Counter,
        help: "Batch rows read and committed, accepted or rejected (a resumed chunk's earlier lines are not counted again).",
        samples: |s| one(load(&s.admin.intake.batches.rows_received)),
    },
    Metric {
        name: "floodgate_batch_rows_accepted_total",
        kind: Kind::Counter,
        help: "Batch rows accepted at the door and queued.",
        samples: |s| one(load(&s.admin.intake.batches.rows_accepted)),
    },
    Metric {
        name: "floodgate_batch_renders_total",
        kind: Kind::Counter,
        help: "Batch messages rendered at delivery.",
        samples: |s| one(load(&s.admin.intake.batches.renders)),
    },
    Metric {
        name: "floodgate_batch_rendered_bytes_total",
        kind: Kind::Counter,
        help: "Bytes of batch messages rendered at delivery (before signing).",
        samples: |s| one(load(&s.admin.intake.batches.rendered_bytes)),
    },
    Metric {
        name: "floodgate_batch_render_failures_total",
        kind: Kind::Counter,
        help: "Batch messages that did not render (failed with class template).",
        samples: |s| one(load(&s.admin.intake.batches.render_failures)),
    },
    Metric {
        name: "floodgate_suppressions",
        kind: Kind::Gauge,
        help: "Do-not-contact entries held in memory for the door.",
        samples: |s| one(suppressions(s).in_memory().0 as u64),
    },
    Metric {
        name: "floodgate_suppression_memory_bytes",
        kind: Kind::Gauge,
        help: "Bytes the in-memory suppression index takes.",
        samples: |s| one(suppressions(s).in_memory().1 as u64),
    },
    Metric {
        name: "floodgate_suppression_door_hits_total",
        kind: Kind::Counter,
        help: "Recipients refused at the door because they are suppressed.",
        samples: |s| one(load(&suppressions(s).stats.door_hits)),
    },
    Metric {
        name: "floodgate_suppression_added_total",
        kind: Kind::Counter,
        help: "Suppression entries written to suppressions.db.",
        samples: |s| one(load(&suppressions(s).stats.added)),
    },
    Metric {
        name: "floodgate_suppression_unpersisted_total",
        kind: Kind::Counter,
        help: "Entries learnt from bounces that found the writer's channel full (in memory only).",
        samples: |s| one(load(&suppressions(s).stats.unpersisted)),
    },
    Metric {
        name: "floodgate_destinations_suspended",
        kind: Kind::Gauge,
        help: "Destinations suspended for being unreachable, waiting for their next probe.",
        samples: |s| one(s.admin.suspensions.count() as u64),
    },
    Metric {
        name: "floodgate_destination_suspensions_total",
        kind: Kind::Counter,
        help: "Times a destination that was up was suspended: none of its hosts took a connection.",
        samples: |s| one(load(&s.admin.suspensions.stats.suspended)),
    },
    Metric {
        name: "floodgate_destination_probes_total",
        kind: Kind::Counter,
        help: "Probe attempts at suspended destinations (one per backoff period each).",
        samples: |s| one(load(&s.admin.suspensions.stats.probes)),
    },
    Metric {
        name: "floodgate_destination_resumes_total",
        kind: Kind::Counter,
        help: "Suspended destinations that took a connection again and were resumed.",
        samples: |s| one(load(&s.admin.suspensions.stats.resumed)),
    },
    Metric {
        name: "floodgate_suspended_deferrals_total",
        kind: Kind::Counter,
        help: "Recipients deferred to a suspended destination's next probe without a connection.",
        samples: |s| one(load(&s.admin.suspensions.stats.deferred)),
    },
];

fn sts<'a>(s: &'a Snapshot<'_>) -> &'a StsStats {
    &s.admin.tls_reports.sts.stats
}

pub async fn render(admin: &Admin) -> Response<Body> {
    // Both queue reads cost O(live rows): a partial index over waiting recipients, and the
    // counters table for everything that finished (retention deletes those rows).
    let snapshot = Snapshot {
        admin,
        campaigns: admin.intake.campaigns().all(),
        live: admin.intake.queue.live_by_state().await.unwrap_or_default(),
        totals: admin.intake.queue.totals().await.ok(),
        faillog: (admin.faillog.counters(), admin.faillog.settings().mode),
        webhooks: admin.webhook.status(),
        canary: admin.canary.stats(),
        canary_stages: admin.canary.stage_stats(),
    };
    super::text(
        StatusCode::OK,
        "text/plain; version=0.0.4",
        write(METRICS, &snapshot) + &write(cluster::METRICS, &snapshot),
    )
}

fn write(metrics: &[Metric], snapshot: &Snapshot) -> String {
    let mut out = String::with_capacity(8 * 1024);
    for m in metrics {
        let Some(samples) = (m.samples)(snapshot) else {
            continue;
        };
        let name = m.name;
        let _ = writeln!(
            out,
            "# HELP {name} {}\n# TYPE {name} {}",
            m.help,
            m.kind.as_str()
        );
        for s in samples {
            let mut labels: Vec<String> = Vec::new();
            if let Some((key, value)) = &s.label {
                labels.push(format!("{key}=\"{}\"", escape(value)));
            }
            if let Some((key, value)) = &s.second {
                labels.push(format!("{key}=\"{}\"", escape(value)));
            }
            let suffix = s.suffix;
            let _ = match labels.is_empty() {
                true => writeln!(out, "{name}{suffix} {}", s.value),
                false => writeln!(out, "{name}{suffix}{{{}}} {}", labels.join(","), s.value),
            };
        }
    }
    out
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_named_once_and_typed_by_its_suffix() {
        let all = || METRICS.iter().chain(cluster::METRICS);
        let mut names: Vec<&str> = all().map(|m| m.name).collect();
        names.sort_unstable();
        let len = names.len();
        names.dedup();
        assert_eq!(names.len(), len, "a metric is defined twice");
        for m in all() {
            assert!(m.name.starts_with("floodgate_"), "{}", m.name);
            assert_eq!(
                m.name.ends_with("_total"),
                m.kind == Kind::Counter,
                "{}: counters and only counters end in _total",
                m.name
            );
        }
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}

//! `/metrics` in the Prometheus text format: intake, refusals by reason, queue depth by
//! state, deliveries, failure-log writes, queue write transactions and guard trips.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use hyper::{Response, StatusCode};

use super::Body;
use super::admin::Admin;
use crate::reason::Reason;

/// Campaigns listed by name in per-campaign series; the rest only count in the totals,
/// so a flood of campaign names cannot blow up the scrape.
const TOP_CAMPAIGNS: usize = 50;

pub async fn render(admin: &Admin) -> Response<Body> {
    let mut out = String::with_capacity(8 * 1024);
    let campaigns = admin.intake.campaigns().all();
    metric(
        &mut out,
        "floodgate_recipients_accepted_total",
        "counter",
        "Recipients accepted and queued.",
    );
    let accepted: u64 = campaigns
        .iter()
        .map(|c| c.accepted.load(Ordering::Relaxed))
        .sum();
    let delivered: u64 = campaigns
        .iter()
        .map(|c| c.delivered.load(Ordering::Relaxed))
        .sum();
    let _ = writeln!(out, "floodgate_recipients_accepted_total {accepted}");
    metric(
        &mut out,
        "floodgate_deliveries_total",
        "counter",
        "Recipients delivered.",
    );
    let _ = writeln!(out, "floodgate_deliveries_total {delivered}");
    metric(
        &mut out,
        "floodgate_failures_total",
        "counter",
        "Failed recipients by reason (intake refusals and relay failures; deferrals apart).",
    );
    for reason in Reason::ALL.iter().filter(|r| **r != Reason::Deferred) {
        let n: u64 = campaigns.iter().map(|c| c.failures(*reason)).sum();
        let _ = writeln!(
            out,
            "floodgate_failures_total{{reason=\"{}\"}} {n}",
            reason.as_str()
        );
    }
    metric(
        &mut out,
        "floodgate_deferrals_total",
        "counter",
        "Delivery attempts deferred by the destination (temporary; retried).",
    );
    let deferred: u64 = campaigns.iter().map(|c| c.failures(Reason::Deferred)).sum();
    let _ = writeln!(out, "floodgate_deferrals_total {deferred}");
    metric(
        &mut out,
        "floodgate_campaign_failures_total",
        "counter",
        "Failures per campaign (the top campaigns by failures).",
    );
    let mut top: Vec<_> = campaigns
        .iter()
        .map(|c| (c.total_failures(), c))
        .filter(|(n, _)| *n > 0)
        .collect();
    top.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    for (n, c) in top.iter().take(TOP_CAMPAIGNS) {
        let _ = writeln!(
            out,
            "floodgate_campaign_failures_total{{campaign=\"{}\"}} {n}",
            escape(&c.name)
        );
    }
    metric(
        &mut out,
        "floodgate_campaign_paused",
        "gauge",
        "1 for each paused campaign.",
    );
    for c in campaigns.iter().filter(|c| c.is_paused()) {
        let _ = writeln!(
            out,
            "floodgate_campaign_paused{{campaign=\"{}\"}} 1",
            escape(&c.name)
        );
    }
    metric(
        &mut out,
        "floodgate_intake_paused",
        "gauge",
        "1 while intake is paused.",
    );
    let _ = writeln!(
        out,
        "floodgate_intake_paused {}",
        u8::from(admin.intake.campaigns().intake_paused())
    );
    metric(
        &mut out,
        "floodgate_queue_recipients",
        "gauge",
        "Recipients waiting in queue.db, by state (scheduled, held).",
    );
    // Both reads cost O(live rows): a partial index over waiting recipients, and the
    // counters table for everything that finished (retention deletes those rows).
    if let Ok(states) = admin.intake.queue.live_by_state().await {
        for (state, n) in states {
            let _ = writeln!(
                out,
                "floodgate_queue_recipients{{state=\"{}\"}} {n}",
                state.as_str()
            );
        }
    }
    if let Ok(t) = admin.intake.queue.totals().await {
        metric(
            &mut out,
            "floodgate_queue_finished_total",
            "counter",
            "Recipients ever finished, by state; kept across restarts and retention.",
        );
        let _ = writeln!(
            out,
            "floodgate_queue_finished_total{{state=\"delivered\"}} {}",
            t.delivered
        );
        let _ = writeln!(
            out,
            "floodgate_queue_finished_total{{state=\"failed\"}} {}",
            t.failed
        );
        metric(
            &mut out,
            "floodgate_queue_pruned_total",
            "counter",
            "Finished rows deleted by [queue] retention.",
        );
        let _ = writeln!(
            out,
            "floodgate_queue_pruned_total{{table=\"recipients\"}} {}",
            t.pruned_recipients
        );
        let _ = writeln!(
            out,
            "floodgate_queue_pruned_total{{table=\"messages\"}} {}",
            t.pruned_messages
        );
    }
    let w = admin.intake.queue.writer_stats();
    metric(
        &mut out,
        "floodgate_queue_transactions_total",
        "counter",
        "Group-commit transactions on queue.db.",
    );
    let _ = writeln!(
        out,
        "floodgate_queue_transactions_total {}",
        w.transactions.load(Ordering::Relaxed)
    );
    metric(
        &mut out,
        "floodgate_queue_operations_total",
        "counter",
        "Operations carried by those transactions.",
    );
    let _ = writeln!(
        out,
        "floodgate_queue_operations_total {}",
        w.operations.load(Ordering::Relaxed)
    );
    metric(
        &mut out,
        "floodgate_queue_failed_transactions_total",
        "counter",
        "Failed queue.db transactions (disk full, locked).",
    );
    let _ = writeln!(
        out,
        "floodgate_queue_failed_transactions_total {}",
        w.failed_transactions.load(Ordering::Relaxed)
    );
    let dns = &admin.intake.policy.dns.stats;
    metric(
        &mut out,
        "floodgate_dns_lookups_total",
        "counter",
        "Domain verdicts looked up in DNS (cache misses).",
    );
    let _ = writeln!(
        out,
        "floodgate_dns_lookups_total {}",
        dns.lookups.load(Ordering::Relaxed)
    );
    metric(
        &mut out,
        "floodgate_dns_cache_hits_total",
        "counter",
        "Domain verdicts answered from the cache.",
    );
    let _ = writeln!(
        out,
        "floodgate_dns_cache_hits_total {}",
        dns.cache_hits.load(Ordering::Relaxed)
    );
    if let Some(f) = &admin.faillog {
        let c = f.counters();
        for (name, value, help) in [
            (
                "floodgate_faillog_recorded_total",
                c.recorded,
                "Failures counted in the failure log's aggregates.",
            ),
            (
                "floodgate_faillog_rows_written_total",
                c.rows_written,
                "Event rows written to failures.db.",
            ),
            (
                "floodgate_faillog_suppressed_total",
                c.suppressed,
                "Event rows refused by the per-campaign rate.",
            ),
            (
                "floodgate_faillog_sampled_out_total",
                c.sampled_out,
                "Event rows passed over by sampling.",
            ),
            (
                "floodgate_faillog_dropped_total",
                c.dropped,
                "Event rows dropped because the writer's channel was full.",
            ),
            (
                "floodgate_faillog_lost_rows_total",
                c.lost_rows,
                "Event rows lost in failed transactions.",
            ),
            (
                "floodgate_faillog_transactions_total",
                c.transactions,
                "Transactions on failures.db.",
            ),
            (
                "floodgate_faillog_failed_transactions_total",
                c.failed_transactions,
                "Failed transactions on failures.db.",
            ),
        ] {
            metric(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {value}");
        }
        metric(
            &mut out,
            "floodgate_faillog_mode",
            "gauge",
            "The failure log's mode (1 for the current one).",
        );
        let _ = writeln!(
            out,
            "floodgate_faillog_mode{{mode=\"{}\"}} 1",
            f.settings().mode.as_str()
        );
    }
    if let Some(webhook) = &admin.webhook {
        metric(
            &mut out,
            "floodgate_webhook_endpoint_disabled",
            "gauge",
            "1 for each webhook endpoint disabled by a 410 (until reload).",
        );
        metric(
            &mut out,
            "floodgate_webhook_circuit_open",
            "gauge",
            "1 for each webhook endpoint whose circuit breaker is open.",
        );
        for ep in webhook.status() {
            let url = escape(&ep.url);
            let _ = writeln!(
                out,
                "floodgate_webhook_endpoint_disabled{{url=\"{url}\"}} {}",
                u8::from(ep.disabled)
            );
            let _ = writeln!(
                out,
                "floodgate_webhook_circuit_open{{url=\"{url}\"}} {}",
                u8::from(ep.circuit != "closed")
            );
        }
    }
    if let Some(events) = &admin.events {
        metric(
            &mut out,
            "floodgate_events_dropped_total",
            "counter",
            "Delivery events dropped because too many were pending.",
        );
        let _ = writeln!(out, "floodgate_events_dropped_total {}", events.dropped());
    }
    let g = &admin.guard.stats;
    metric(
        &mut out,
        "floodgate_guard_trips_total",
        "counter",
        "Campaigns whose failure ratio tripped the guard.",
    );
    let _ = writeln!(
        out,
        "floodgate_guard_trips_total {}",
        g.trips.load(Ordering::Relaxed)
    );
    metric(
        &mut out,
        "floodgate_guard_pauses_total",
        "counter",
        "Campaigns the guard paused.",
    );
    let _ = writeln!(
        out,
        "floodgate_guard_pauses_total {}",
        g.pauses.load(Ordering::Relaxed)
    );
    metric(
        &mut out,
        "floodgate_alerts_total",
        "counter",
        "Alerts raised.",
    );
    let _ = writeln!(
        out,
        "floodgate_alerts_total {}",
        g.alerts.load(Ordering::Relaxed)
    );
    if let Some(smtp) = &admin.smtp {
        smtp.write_metrics(&mut out);
    }
    admin.intake.signing.write_metrics(&mut out);
    super::text(StatusCode::OK, "text/plain; version=0.0.4", out)
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

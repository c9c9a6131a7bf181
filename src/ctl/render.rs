//! How `floodgate ctl` prints the admin API's answers for people: aligned tables, states in
//! words, the worst campaign on the first line. `--json` bypasses all of this.

use std::fmt::Write as _;

use std::collections::BTreeMap;

use crate::admin_api::{
    Alert, BatchView, CampaignState, CampaignView, FailLogView, FailuresResponse, ImportReport,
    QueueResponse, StatusResponse, SuppressionsResponse, TlsReportResponse, TlsReportSendResponse,
    WebhooksResponse,
};

/// Columns aligned by width; a column whose header is right-aligned holds numbers.
pub struct Table {
    headers: Vec<(&'static str, bool)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// `headers`: name and whether the column is numeric (right-aligned).
    pub fn new(headers: &[(&'static str, bool)]) -> Table {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|(h, _)| h.len()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|(h, _)| h.to_string()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                let (w, numeric) = (widths[i], self.headers[i].1);
                let pad = w.saturating_sub(cell.chars().count());
                let last = i + 1 == row.len();
                if numeric {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    if !last {
                        line.push_str(&" ".repeat(pad));
                    }
                }
                if !last {
                    line.push_str("  ");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn utc(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| ms.to_string())
}

fn uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h}h {m:02}m")
    } else {
        format!("{h}h {m:02}m {s:02}s")
    }
}

/// `{"no_such_domain": 5000, "malformed_address": 12}` as `no_such_domain 5000, malformed_address 12`,
/// the largest first.
fn top_reasons(reasons: &BTreeMap<String, u64>, n: usize) -> String {
    let mut list: Vec<(&str, u64)> = reasons.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    list.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    if list.is_empty() {
        return "-".into();
    }
    list.iter()
        .take(n)
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A campaign's state in words, with the end of a purge block (which a pause hides in the
/// API's one-word state, and which `resume` lifts too).
pub fn state(c: &CampaignView) -> String {
    let until = c.blocked_until_ms;
    match c.state {
        CampaignState::Blocked => format!("blocked until {} UTC", utc(until)),
        CampaignState::Paused if until > chrono::Utc::now().timestamp_millis() => {
            format!("paused, and blocked until {} UTC", utc(until))
        }
        other => other.as_str().to_owned(),
    }
}

/// As [`state`], short enough for a table column: `paused, blocked to 06:02 UTC`.
fn state_short(c: &CampaignView) -> String {
    let until = c.blocked_until_ms;
    let word = c.state.as_str();
    if until > chrono::Utc::now().timestamp_millis() {
        let hm = chrono::DateTime::from_timestamp_millis(until)
            .map(|t| t.format("%H:%M").to_string())
            .unwrap_or_default();
        match c.state {
            CampaignState::Blocked => format!("blocked to {hm} UTC"),
            _ => format!("{word}, blocked to {hm} UTC"),
        }
    } else {
        word.to_owned()
    }
}

/// `GET /admin/v1/campaigns`: the API sorts by failures, the worst first; keep that order.
pub fn campaigns(items: &[CampaignView]) -> String {
    if items.is_empty() {
        return "no campaigns yet: nothing has been submitted since the daemon started\n".into();
    }
    let mut t = Table::new(&[
        ("CAMPAIGN", false),
        ("STATE", false),
        ("ACCEPTED", true),
        ("FAILED", true),
        ("RATIO", true),
        ("TOP REASONS", false),
    ]);
    for c in items {
        t.row(vec![
            c.name.clone(),
            state_short(c),
            c.accepted.to_string(),
            c.failed.to_string(),
            format!("{:.1}%", c.failure_ratio * 100.0),
            top_reasons(&c.reasons, 3),
        ]);
    }
    t.render()
}

/// `GET /admin/v1/status`.
pub fn status(addr: &str, v: &StatusResponse) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "floodgate at {addr}, up {}", uptime(v.uptime_secs));
    let intake = if v.intake_paused {
        "PAUSED: new mail is answered 451 4.7.1 (floodgate ctl intake resume)"
    } else {
        "accepting"
    };
    let _ = writeln!(out, "intake        {intake}");
    let queue = v
        .queue
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let queue = if queue.is_empty() {
        "empty".into()
    } else {
        queue
    };
    let _ = writeln!(out, "queue         {queue}");
    let _ = writeln!(
        out,
        "recipients    accepted {}, delivered {}, failed {} (refusals and failures of every kind: {})",
        v.accepted_total, v.delivered_total, v.failed_total, v.failures_total,
    );
    let held = if v.paused_campaigns.is_empty() {
        "none paused".to_owned()
    } else {
        format!("paused or blocked: {}", v.paused_campaigns.join(", "))
    };
    let _ = writeln!(out, "campaigns     {}, {held}", v.campaigns);
    let _ = writeln!(out, "failure log   {}", faillog_line(&v.faillog));
    let _ = writeln!(out, "alerts        {} (floodgate ctl alerts)", v.alerts);
    if let Some(c) = &v.cluster {
        cluster_lines(&mut out, c);
    }
    for p in &v.canary {
        let took = p.stages.last().map(|s| s.after_ms).unwrap_or(0);
        let slow = if p.slow { ", slow" } else { "" };
        let _ = writeln!(
            out,
            "canary        {}: {} in {took} ms{slow} (floodgate ctl probe)",
            p.address, p.result
        );
    }
    for d in &v.suspended {
        let _ = writeln!(
            out,
            "suspended     {}: unreachable ({} in a row), next probe {}; last: {}",
            d.destination,
            d.failures,
            utc(d.probe_at_ms),
            d.last_reply
        );
    }
    out
}

/// The cluster block of `ctl status`: one line, then a line per node.
fn cluster_lines(out: &mut String, c: &crate::admin_api::ClusterStatus) {
    let link = if c.connected {
        "connected".to_owned()
    } else {
        format!("DISCONNECTED, rates divided by {}", c.fallback_divisor)
    };
    let live = c.nodes.iter().filter(|n| n.alive).count();
    let _ = writeln!(
        out,
        "cluster       node {}, {link}; {live} of {} nodes live, {:.1} accepted/s, {:.1} delivered/s, {} queued",
        c.node,
        c.nodes.len(),
        c.accepted_per_sec,
        c.delivered_per_sec,
        c.queued
    );
    for n in &c.nodes {
        let state = if n.alive { "live" } else { "gone" };
        let _ = writeln!(
            out,
            "  {:<12}{state}, heartbeat at {} ms, {:.1} accepted/s, {:.1} delivered/s, {} queued",
            n.node, n.last_heartbeat_ms, n.accepted_per_sec, n.delivered_per_sec, n.queued
        );
    }
}

fn faillog_line(f: &FailLogView) -> String {
    let Some(settings) = &f.settings else {
        return "not running".into();
    };
    let counters = f.counters.unwrap_or_default();
    format!(
        "mode {}, writing {:.1} rows/s, {} rows written, {} dropped",
        settings.mode.as_str(),
        f.rows_per_sec.unwrap_or(0.0),
        counters.rows_written,
        counters.dropped,
    )
}

/// `GET|PUT /admin/v1/faillog`.
pub fn faillog(f: &FailLogView) -> String {
    let Some(settings) = &f.settings else {
        return "failure log: not running\n".into();
    };
    let c = f.counters.unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(out, "mode          {}", settings.mode.as_str());
    let _ = writeln!(
        out,
        "sample rate   1 in {} (mode sampled)",
        settings.sample_rate.max(1)
    );
    let _ = writeln!(
        out,
        "row cap       {} rows/s per campaign, burst {} (modes full and sampled)",
        settings.rows_per_sec, settings.burst
    );
    let _ = writeln!(
        out,
        "write rate    {:.1} rows/s",
        f.rows_per_sec.unwrap_or(0.0)
    );
    let _ = writeln!(
        out,
        "since start   {} failures counted, {} rows written, {} suppressed by the cap, {} sampled out, {} dropped",
        c.recorded, c.rows_written, c.suppressed, c.sampled_out, c.dropped,
    );
    out
}

/// `GET /admin/v1/queue`: recipients by state, then the busiest domains and campaigns.
pub fn queue(v: &QueueResponse) -> String {
    let mut out = String::new();
    let mut t = Table::new(&[("STATE", false), ("RECIPIENTS", true)]);
    for (k, n) in &v.by_state {
        t.row(vec![k.clone(), n.to_string()]);
    }
    out.push_str(&t.render());
    for (pairs, header) in [(&v.by_domain, "DOMAIN"), (&v.by_campaign, "CAMPAIGN")] {
        out.push('\n');
        let mut t = Table::new(&[(header, false), ("QUEUED", true)]);
        for (name, n) in pairs {
            t.row(vec![name.clone(), n.to_string()]);
        }
        if pairs.is_empty() {
            t.row(vec!["(nothing queued)".into(), String::new()]);
        }
        out.push_str(&t.render());
    }
    out
}

/// `GET /admin/v1/failures`: newest first.
pub fn failures(v: &FailuresResponse) -> String {
    if v.failures.is_empty() {
        return "no failure rows (in mode aggregate or off only counts are kept: floodgate ctl campaigns)\n".into();
    }
    let mut t = Table::new(&[
        ("TIME (UTC)", false),
        ("STAGE", false),
        ("REASON", false),
        ("CLASS", false),
        ("RECIPIENT", false),
        ("DETAIL", false),
    ]);
    for r in &v.failures {
        t.row(vec![
            utc(r.at_ms),
            r.stage.clone(),
            r.reason.clone(),
            r.class.clone().unwrap_or_else(|| "-".to_owned()),
            match r.recipient.as_str() {
                "" => "<>".to_owned(),
                other => other.to_owned(),
            },
            r.detail.clone(),
        ]);
    }
    t.render()
}

/// `GET /admin/v1/suppressions` (and the answer of an add).
pub fn suppressions(v: &SuppressionsResponse) -> String {
    if v.suppressions.is_empty() {
        return "no suppressions\n".into();
    }
    let mut t = Table::new(&[
        ("ADDRESS", false),
        ("CAMPAIGN", false),
        ("REASON", false),
        ("SOURCE", false),
        ("CREATED (UTC)", false),
        ("EXPIRES (UTC)", false),
    ]);
    for e in &v.suppressions {
        t.row(vec![
            e.address.clone(),
            e.campaign.clone().unwrap_or_else(|| "(all)".to_owned()),
            e.reason.clone(),
            e.source.clone(),
            utc(e.created_at_ms),
            e.expires_at_ms.map_or_else(|| "never".to_owned(), utc),
        ]);
    }
    let mut out = t.render();
    if let Some(c) = v.next_cursor {
        out.push_str(&format!("more: --cursor {c}\n"));
    }
    out
}

/// What an import did.
pub fn import(r: &ImportReport) -> String {
    let mut out = format!(
        "{} lines: {} suppressions imported, {} rejected\n",
        r.lines, r.accepted, r.invalid
    );
    for e in &r.errors {
        out.push_str(&format!("  line {}: {}\n", e.line, e.error));
    }
    out
}

/// `GET /admin/v1/webhooks`: one row per endpoint the courier has used.
pub fn webhooks(v: &WebhooksResponse) -> String {
    let mut out = String::new();
    let mut t = Table::new(&[
        ("ENDPOINT", false),
        ("STATE", false),
        ("CIRCUIT", false),
        ("FAILURES", true),
    ]);
    for r in &v.endpoints {
        t.row(vec![
            r.url.clone(),
            if r.disabled {
                "disabled (410)"
            } else {
                "enabled"
            }
            .to_owned(),
            r.circuit.as_str().to_owned(),
            r.consecutive_failures.to_string(),
        ]);
    }
    if v.endpoints.is_empty() {
        t.row(vec![
            "(no webhook used yet)".into(),
            String::new(),
            String::new(),
            String::new(),
        ]);
    }
    out.push_str(&t.render());
    if v.endpoints.iter().any(|r| r.disabled) {
        out.push_str("\ndisabled endpoints' domains are answered 451 4.3.2 until the config is reloaded (SIGHUP)\n");
    }
    out
}

/// `GET /admin/v1/tls-report`: one row per domain and day, successes and failures by
/// type, then the reports handled.
pub fn tls_report(v: &TlsReportResponse) -> String {
    let mut out = format!(
        "MTA-STS {}; TLS reports {}\n\n",
        v.mta_sts,
        if v.enabled {
            "sent daily"
        } else {
            "not sent ([tls_report] enabled = false)"
        }
    );
    let mut days: BTreeMap<(String, String), (u64, BTreeMap<String, u64>)> = BTreeMap::new();
    for c in &v.counts {
        let entry = days.entry((c.day.clone(), c.domain.clone())).or_default();
        if c.result == "success" {
            entry.0 += c.sessions;
        } else {
            *entry.1.entry(c.result.clone()).or_default() += c.sessions;
        }
    }
    let mut t = Table::new(&[
        ("DAY", false),
        ("DOMAIN", false),
        ("TLS OK", true),
        ("FAILED", true),
        ("FAILURES", false),
    ]);
    for ((day, domain), (ok, failures)) in days.iter().rev() {
        let failed: u64 = failures.values().sum();
        let list: Vec<String> = failures.iter().map(|(k, n)| format!("{k} {n}")).collect();
        t.row(vec![
            day.clone(),
            domain.clone(),
            ok.to_string(),
            failed.to_string(),
            list.join(", "),
        ]);
    }
    if days.is_empty() {
        t.row(vec![
            "(no sessions counted)".into(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ]);
    }
    out.push_str(&t.render());
    if !v.reports.is_empty() {
        out.push_str("\nreports:\n");
        for r in &v.reports {
            let _ = writeln!(out, "  {} {}: {}", r.day, r.domain, r.outcome);
        }
    }
    out
}

/// `POST /admin/v1/tls-report/send`.
pub fn tls_reports_sent(v: &TlsReportSendResponse) -> String {
    if v.sent.is_empty() {
        return "no TLS report due\n".into();
    }
    v.sent
        .iter()
        .map(|r| format!("{} {}: {}\n", r.day, r.domain, r.outcome))
        .collect()
}

/// `GET /admin/v1/alerts`: newest first.
pub fn alerts(list: &[Alert]) -> String {
    if list.is_empty() {
        return "no alerts\n".into();
    }
    let mut list = list.to_vec();
    list.sort_by_key(|a| std::cmp::Reverse(a.at_ms));
    let mut t = Table::new(&[
        ("TIME (UTC)", false),
        ("KIND", false),
        ("CAMPAIGN", false),
        ("ACTION", false),
        ("MESSAGE", false),
    ]);
    for a in &list {
        t.row(vec![
            utc(a.at_ms),
            a.kind.clone(),
            a.campaign.clone().unwrap_or_else(|| "-".into()),
            a.action.clone().unwrap_or_else(|| "-".into()),
            a.message.clone(),
        ]);
    }
    t.render()
}

/// `GET /admin/v1/batches`: one row per batch, newest first.
/// Each probe: its result, then one line per stage with its time after submission.
pub fn probes(v: &[crate::admin_api::ProbeReport]) -> String {
    let mut out = String::new();
    for p in v {
        let slow = if p.slow { " (slow)" } else { "" };
        let route = p
            .route
            .as_ref()
            .map_or(String::new(), |r| format!("  route {r}"));
        let _ = writeln!(
            out,
            "{}: {}{slow}  queue id {}{route}",
            p.address, p.result, p.queue_id
        );
        for s in &p.stages {
            let _ = writeln!(out, "  {:<10} {:>8} ms", s.stage, s.after_ms);
        }
        if let Some(reply) = &p.reply {
            // The receiver's words: no control character reaches the terminal.
            let reply: String = reply
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            let _ = writeln!(out, "  last reply: {reply}");
        }
    }
    out
}

pub fn batches(v: &[BatchView]) -> String {
    let mut t = Table::new(&[
        ("BATCH", false),
        ("CAMPAIGN", false),
        ("STATE", false),
        ("RECEIVED", true),
        ("ACCEPTED", true),
        ("REJECTED", true),
        ("DELIVERED", true),
        ("FAILED", true),
        ("QUEUED", true),
    ]);
    for b in v {
        t.row(vec![
            b.id.clone(),
            b.campaign.clone().unwrap_or_default(),
            b.state.as_str().to_owned(),
            b.received.to_string(),
            b.accepted.to_string(),
            b.rejected.values().sum::<u64>().to_string(),
            b.delivered.to_string(),
            b.failed.to_string(),
            b.queued.to_string(),
        ]);
    }
    if v.is_empty() {
        return "no batches\n".to_owned();
    }
    t.render()
}

/// `GET /admin/v1/batches/{id}`: its progress, then its rejections by reason.
pub fn batch(b: &BatchView) -> String {
    let mut out = format!(
        "batch {} (campaign {}): {}\n",
        b.id,
        b.campaign.as_deref().unwrap_or("-"),
        b.state.as_str()
    );
    let _ = writeln!(
        out,
        "received {} · accepted {} · delivered {} · deferred {} · failed {} (template {}) · queued {}",
        b.received, b.accepted, b.delivered, b.deferred, b.failed, b.failed_template, b.queued
    );
    if !b.rejected.is_empty() {
        let mut t = Table::new(&[("REJECTED", false), ("ROWS", true)]);
        for (reason, n) in &b.rejected {
            t.row(vec![reason.clone(), n.to_string()]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn campaign(name: &str, state: CampaignState, accepted: u64, failed: u64) -> CampaignView {
        CampaignView {
            name: name.into(),
            state,
            accepted,
            delivered: 0,
            failed,
            failure_ratio: if failed > 0 { 1.0 } else { 0.0 },
            deferred: 0,
            reasons: if failed > 0 {
                [("no_such_domain".to_owned(), failed)].into()
            } else {
                BTreeMap::new()
            },
            classes: BTreeMap::new(),
            blocked_until_ms: 0,
        }
    }

    #[test]
    fn campaigns_table_is_aligned_and_keeps_the_api_order() {
        let out = campaigns(&[
            campaign("flood0@client.test", CampaignState::Paused, 0, 5000),
            campaign("good", CampaignState::Active, 120, 0),
        ]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            [
                "CAMPAIGN            STATE   ACCEPTED  FAILED   RATIO  TOP REASONS",
                "flood0@client.test  paused         0    5000  100.0%  no_such_domain 5000",
                "good                active       120       0    0.0%  -",
            ]
        );
    }

    #[test]
    fn blocked_state_names_its_end() {
        let c = campaign("x", CampaignState::Blocked, 0, 0);
        assert_eq!(state(&c), "blocked until 1970-01-01 00:00:00 UTC");
    }
}

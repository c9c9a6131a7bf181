//! What the admin API shows: the daemon's state converted into the typed answers of
//! [`crate::admin_api`]. Read-only; the actions live in `actions.rs`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use hyper::{Response, StatusCode};

use super::Admin;
use crate::admin_api as api;
use crate::bounce::BounceClass;
use crate::campaign::Campaign;
use crate::deliver::sts::store;
use crate::faillog::{FailureQuery, FailureRow};
use crate::http::api::batch;
use crate::http::{Body, error, json, query_pairs};
use crate::reason::Reason;

/// Batches `GET /admin/v1/batches` lists (the most recent).
const BATCHES_LISTED: usize = 100;

/// A campaign's one-word state at `now_ms`.
pub fn campaign_state(c: &Campaign, now_ms: i64) -> api::CampaignState {
    if c.is_paused() {
        api::CampaignState::Paused
    } else if c.blocked_until() > now_ms {
        api::CampaignState::Blocked
    } else {
        api::CampaignState::Active
    }
}

pub fn campaign_view(c: &Campaign, now_ms: i64) -> api::CampaignView {
    let reasons = Reason::ALL
        .iter()
        .map(|r| (r.as_str().to_owned(), c.failures(*r)))
        .filter(|(_, n)| *n > 0)
        .collect();
    let tally = c.tally();
    api::CampaignView {
        name: c.name.to_string(),
        state: campaign_state(c, now_ms),
        accepted: c.accepted.load(Ordering::Relaxed),
        delivered: c.delivered.load(Ordering::Relaxed),
        failed: tally.failed,
        failure_ratio: tally.ratio(),
        deferred: c.failures(Reason::Deferred),
        reasons,
        classes: BounceClass::ALL
            .iter()
            .map(|k| (k.as_str().to_owned(), c.attempts_of(*k)))
            .filter(|(_, n)| *n > 0)
            .collect(),
        blocked_until_ms: c.blocked_until(),
    }
}

fn failure_row(r: FailureRow) -> api::FailureRow {
    api::FailureRow {
        id: r.id,
        at_ms: r.at_ms,
        campaign: r.campaign,
        stage: r.stage.as_str().to_owned(),
        reason: r.reason.as_str().to_owned(),
        class: r.class.map(|c| c.as_str().to_owned()),
        recipient: r.recipient,
        detail: r.detail,
    }
}

/// The courier reports its circuit as one of three words (`closed`, `open`, `half-open`:
/// `EndpointStatus::circuit`); this is the one place that turns them into the wire enum.
fn circuit(word: &str) -> api::CircuitState {
    match word {
        "closed" => api::CircuitState::Closed,
        "open" => api::CircuitState::Open,
        _ => api::CircuitState::HalfOpen,
    }
}

fn alert(a: crate::guard::Alert) -> api::Alert {
    api::Alert {
        at_ms: a.at_ms,
        kind: a.kind.to_owned(),
        campaign: a.campaign,
        message: a.message,
        action: a.action.map(str::to_owned),
    }
}

/// Parses the query of `GET /admin/v1/failures`; `Err` is the message of a 400.
fn failure_query(query: Option<&str>) -> Result<FailureQuery, String> {
    let mut q = FailureQuery {
        limit: 100,
        ..Default::default()
    };
    for (key, value) in query_pairs(query) {
        match key.as_str() {
            "campaign" => q.campaign = Some(value),
            "reason" => match Reason::parse(&value) {
                Some(r) => q.reason = Some(r),
                None => return Err(format!("unknown reason `{value}`")),
            },
            "since" => {
                q.since_ms = Some(
                    value
                        .parse()
                        .map_err(|_| "since: milliseconds since the epoch")?,
                );
            }
            "before" => q.before_id = Some(value.parse().map_err(|_| "before: a row id")?),
            "limit" => q.limit = value.parse().map_err(|_| "limit: a number")?,
            other => return Err(format!("unknown parameter `{other}`")),
        }
    }
    Ok(q)
}

impl Admin {
    pub(super) fn now(&self) -> i64 {
        self.intake.clock.now_ms()
    }

    /// Every campaign, the worst first.
    pub fn campaign_views(&self) -> Vec<api::CampaignView> {
        let now = self.now();
        let mut views: Vec<api::CampaignView> = self
            .intake
            .campaigns()
            .all()
            .iter()
            .map(|c| campaign_view(c, now))
            .collect();
        views.sort_by(|a, b| b.failed.cmp(&a.failed).then_with(|| a.name.cmp(&b.name)));
        views
    }

    pub(super) fn faillog_view(&self) -> api::FailLogView {
        let f = &self.faillog;
        api::FailLogView {
            settings: Some(f.settings()),
            counters: Some(f.counters()),
            rows_per_sec: Some(f.rows_per_sec_recent()),
        }
    }

    pub(super) fn alerts(&self) -> Vec<api::Alert> {
        self.guard.alerts().into_iter().map(alert).collect()
    }

    pub(super) fn webhooks(&self) -> api::WebhooksResponse {
        let endpoints = self.webhook.status();
        api::WebhooksResponse {
            endpoints: endpoints
                .into_iter()
                .map(|e| api::WebhookEndpoint {
                    url: e.url,
                    disabled: e.disabled,
                    circuit: circuit(e.circuit),
                    consecutive_failures: e.consecutive_failures,
                })
                .collect(),
            events_dropped: self.events.dropped(),
        }
    }

    pub(super) async fn failures(&self, query: Option<&str>) -> Response<Body> {
        let faillog = &self.faillog;
        let q = match failure_query(query) {
            Ok(q) => q,
            Err(message) => return error(StatusCode::BAD_REQUEST, &message),
        };
        match faillog.failures(q).await {
            Ok(rows) => {
                let next_before = rows.last().map(|r| r.id);
                let failures = rows.into_iter().map(failure_row).collect();
                json(
                    StatusCode::OK,
                    &api::FailuresResponse {
                        failures,
                        next_before,
                    },
                )
            }
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        }
    }

    /// The most recent batch sends, newest first.
    pub(super) async fn batches(&self) -> Response<Body> {
        match self.intake.queue.batches(BATCHES_LISTED).await {
            Ok(list) => {
                let views: Vec<api::BatchView> = list
                    .iter()
                    .map(|b| {
                        batch::view(
                            b,
                            batch::campaign_state(&self.intake, b.campaign.as_deref()),
                        )
                    })
                    .collect();
                json(StatusCode::OK, &views)
            }
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        }
    }

    pub(super) async fn batch(&self, id: &str) -> Response<Body> {
        match self.intake.queue.batch(id).await {
            Ok(Some(b)) => json(
                StatusCode::OK,
                &batch::view(
                    &b,
                    batch::campaign_state(&self.intake, b.campaign.as_deref()),
                ),
            ),
            Ok(None) => error(StatusCode::NOT_FOUND, "no such batch"),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        }
    }

    pub(super) async fn queue(&self) -> Response<Body> {
        match self.intake.queue.summary().await {
            Ok(s) => json(
                StatusCode::OK,
                &api::QueueResponse {
                    by_state: s
                        .by_state
                        .iter()
                        .map(|(st, n)| (st.as_str().to_owned(), *n))
                        .collect(),
                    by_domain: s.by_domain,
                    by_campaign: s.by_campaign,
                },
            ),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        }
    }

    pub(super) async fn status(&self) -> api::StatusResponse {
        let queue: BTreeMap<String, u64> = self
            .intake
            .queue
            .count_by_state()
            .await
            .map(|v| {
                v.into_iter()
                    .map(|(s, n)| (s.as_str().to_owned(), n))
                    .collect()
            })
            .unwrap_or_default();
        let campaigns = self.campaign_views();
        let all = self.intake.campaigns().all();
        let total = |f: &dyn Fn(&Campaign) -> u64| all.iter().map(|c| f(c)).sum::<u64>();
        api::StatusResponse {
            uptime_secs: self.started.elapsed().as_secs(),
            accepted_total: total(&|c| c.accepted.load(Ordering::Relaxed)),
            delivered_total: total(&|c| c.delivered.load(Ordering::Relaxed)),
            failures_total: total(&|c| c.total_failures()),
            failed_total: campaigns.iter().map(|c| c.failed).sum(),
            intake_paused: self.intake.campaigns().intake_paused(),
            queue,
            campaigns: campaigns.len() as u64,
            paused_campaigns: campaigns
                .iter()
                .filter(|c| c.state != api::CampaignState::Active)
                .map(|c| c.name.clone())
                .collect(),
            faillog: self.faillog_view(),
            alerts: self.guard.alerts().len() as u64,
            canary: self
                .canary
                .stats()
                .into_iter()
                .filter_map(|(_, s)| s.last)
                .collect(),
            suspended: self.suspensions.snapshot(),
            cluster: self.intake.cluster.as_ref().map(|c| c.status(self.now())),
        }
    }
}

/// Most counter rows and report records one `GET /admin/v1/tls-report` returns.
const TLS_REPORT_ROWS: usize = 1000;

impl Admin {
    pub(super) async fn tls_report(&self, query: Option<&str>) -> Response<Body> {
        let mut domain = None;
        for (key, value) in query_pairs(query) {
            match key.as_str() {
                "domain" => domain = Some(value.to_ascii_lowercase()),
                other => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!("unknown parameter `{other}`"),
                    );
                }
            }
        }
        let sts = &self.tls_reports.sts;
        if let Err(e) = sts.flush().await {
            return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
        }
        let read = sts
            .with_db(move |c| {
                let counts = store::counts(c, domain.as_deref(), None, TLS_REPORT_ROWS)?;
                let reports = store::reports(c, domain.as_deref(), TLS_REPORT_ROWS)?;
                Ok((counts, reports))
            })
            .await;
        let (counts, reports) = match read {
            Ok(r) => r,
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        };
        let config = self.intake.config.load();
        json(
            StatusCode::OK,
            &api::TlsReportResponse {
                enabled: config.tls_report.enabled,
                mta_sts: config.delivery.mta_sts.as_str().to_owned(),
                counts: counts
                    .into_iter()
                    .map(|r| api::TlsCount {
                        day: r.day,
                        domain: r.domain,
                        policy_type: r.policy_type,
                        result: r.result,
                        mx: r.mx,
                        ip: r.ip,
                        sessions: r.sessions,
                    })
                    .collect(),
                reports: reports
                    .into_iter()
                    .map(|(day, domain, sent_at_ms, outcome)| api::TlsReportRecord {
                        day,
                        domain,
                        sent_at_ms,
                        outcome,
                    })
                    .collect(),
            },
        )
    }
}

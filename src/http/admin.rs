//! The admin API on `[admin] listen`: what operators needed on the day of the incident —
//! which campaigns are failing, pause / resume / purge them, pause intake, switch the
//! failure log — plus health probes and `/metrics`. Everything but the probes needs the
//! bearer token.

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::{Body, error, json, percent_decode, query_pairs, read_body};
use crate::campaign::Campaign;
use crate::config::{FailLogMode, duration};
use crate::faillog::{FailLog, FailLogSettings, FailureQuery};
use crate::guard::Guard;
use crate::intake::Intake;
use crate::queue::CampaignState;
use crate::reason::Reason;

pub struct Admin {
    pub intake: Arc<Intake>,
    pub faillog: Option<FailLog>,
    pub guard: Arc<Guard>,
    /// Webhook endpoints' circuit and disabled state, for operators.
    pub webhook: Option<Arc<crate::deliver::webhook::WebhookCourier>>,
    pub events: Option<crate::events::Events>,
    /// The SMTP door's counters (connections, evictions, AUTH), for `/metrics`.
    pub smtp: Option<Arc<crate::smtp::server::Server>>,
    /// Supervised tasks: `/readyz` fails once one has died.
    pub supervisor: crate::supervise::Supervisor,
    pub started: std::time::Instant,
}

#[derive(Serialize)]
pub struct CampaignView {
    pub name: String,
    /// `active`, `paused` or `blocked` (purged, refusing new mail for a while).
    pub state: &'static str,
    pub accepted: u64,
    pub delivered: u64,
    /// Failures that count against the campaign (see the guard).
    pub failed: u64,
    pub failure_ratio: f64,
    pub deferred: u64,
    pub reasons: std::collections::BTreeMap<&'static str, u64>,
    pub blocked_until_ms: i64,
}

impl CampaignView {
    pub fn of(c: &Campaign, now_ms: i64) -> CampaignView {
        let reasons: std::collections::BTreeMap<&'static str, u64> = Reason::ALL
            .iter()
            .map(|r| (r.as_str(), c.failures(*r)))
            .filter(|(_, n)| *n > 0)
            .collect();
        let tally = c.tally();
        let accepted = c.accepted.load(std::sync::atomic::Ordering::Relaxed);
        CampaignView {
            name: c.name.to_string(),
            state: if c.is_paused() {
                "paused"
            } else if c.blocked_until() > now_ms {
                "blocked"
            } else {
                "active"
            },
            accepted,
            delivered: c.delivered.load(std::sync::atomic::Ordering::Relaxed),
            failed: tally.failed,
            failure_ratio: tally.ratio(),
            deferred: c.failures(Reason::Deferred),
            reasons,
            blocked_until_ms: c.blocked_until(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    /// Refuse the campaign's new submissions for this long after the purge (`"10m"`).
    block_for: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailLogUpdate {
    mode: Option<FailLogMode>,
    sample_rate: Option<u32>,
    rows_per_sec: Option<u32>,
    burst: Option<u32>,
}

impl Admin {
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        match (req.method(), path.as_str()) {
            (&Method::GET, "/healthz") => return super::text(StatusCode::OK, "text/plain", "ok\n"),
            (&Method::GET, "/readyz") => return self.readyz().await,
            _ => {}
        }
        // The dashboard's page and assets carry no data; the page asks for the token.
        if let Some(asset) = super::dashboard::asset(req.method(), &path) {
            return asset;
        }
        if !self.authorized(&req) {
            let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
            r.headers_mut().insert(
                "www-authenticate",
                hyper::header::HeaderValue::from_static("Bearer"),
            );
            return r;
        }
        let segments: Vec<String> = path
            .trim_matches('/')
            .split('/')
            .map(|s| percent_decode(s, false))
            .collect();
        let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
        match (req.method().clone(), segs.as_slice()) {
            (Method::GET, ["metrics"]) => super::metrics::render(&self).await,
            (Method::GET, ["admin", "v1", "status"]) => self.status().await,
            (Method::GET, ["admin", "v1", "campaigns"]) => self.campaigns(),
            (Method::POST, ["admin", "v1", "campaigns", name, action]) => {
                let (name, action) = (name.to_string(), action.to_string());
                self.campaign_action(&name, &action, req).await
            }
            (Method::POST, ["admin", "v1", "intake", action]) => self.intake_switch(action),
            (Method::GET, ["admin", "v1", "faillog"]) => self.faillog_get(),
            (Method::PUT, ["admin", "v1", "faillog"]) => self.faillog_put(req).await,
            (Method::GET, ["admin", "v1", "failures"]) => self.failures(req.uri().query()).await,
            (Method::GET, ["admin", "v1", "queue"]) => self.queue().await,
            (Method::GET, ["admin", "v1", "alerts"]) => json(StatusCode::OK, &self.guard.alerts()),
            (Method::GET, ["admin", "v1", "webhooks"]) => json(
                StatusCode::OK,
                &serde_json::json!({
                    "endpoints": self.webhook.as_ref().map(|w| w.status()).unwrap_or_default(),
                    "events_dropped": self.events.as_ref().map_or(0, |e| e.dropped()),
                }),
            ),
            _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
        }
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let token = self.intake.config.load().admin.token.clone();
        let given = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        !token.is_empty() && bool::from(given.as_bytes().ct_eq(token.as_bytes()))
    }

    async fn readyz(&self) -> Response<Body> {
        match self
            .supervisor
            .check(&self.intake.queue, Duration::from_secs(2))
            .await
        {
            Ok(()) => super::text(StatusCode::OK, "text/plain", "ready\n"),
            Err(e) => super::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{e}\n"),
            ),
        }
    }

    fn now(&self) -> i64 {
        self.intake.clock.now_ms()
    }

    /// Every campaign, the worst first.
    pub fn campaign_views(&self) -> Vec<CampaignView> {
        let now = self.now();
        let mut views: Vec<CampaignView> = self
            .intake
            .campaigns()
            .all()
            .iter()
            .map(|c| CampaignView::of(c, now))
            .collect();
        views.sort_by(|a, b| b.failed.cmp(&a.failed).then_with(|| a.name.cmp(&b.name)));
        views
    }

    fn campaigns(&self) -> Response<Body> {
        json(StatusCode::OK, &self.campaign_views())
    }

    async fn campaign_action(
        &self,
        name: &str,
        action: &str,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let campaigns = self.intake.campaigns();
        let campaign = campaigns.get(Some(name));
        let mut purged = None;
        match action {
            "pause" => {
                campaign.set_paused(true);
                self.intake.queue.hold_in_background(name.to_owned());
            }
            "resume" => {
                campaign.set_paused(false);
                campaign.block_until(0);
                self.intake
                    .queue
                    .release_in_background(name.to_owned(), self.intake.wake.clone());
            }
            "purge" => {
                let body = match read_body(req, 4096).await {
                    Ok(b) => b,
                    Err(r) => return r,
                };
                let request: PurgeRequest = if body.iter().all(u8::is_ascii_whitespace) {
                    PurgeRequest::default()
                } else {
                    match serde_json::from_slice(&body) {
                        Ok(r) => r,
                        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("body: {e}")),
                    }
                };
                if let Some(text) = &request.block_for {
                    match duration::parse(text) {
                        Ok(d) => campaign.block_until(self.now() + d.as_millis() as i64),
                        Err(e) => {
                            return error(StatusCode::BAD_REQUEST, &format!("block_for: {e}"));
                        }
                    }
                }
                match self.intake.queue.purge(name).await {
                    Ok(n) => purged = Some(n),
                    Err(e) => {
                        return error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            &format!("purge failed: {e}"),
                        );
                    }
                }
            }
            _ => {
                return error(
                    StatusCode::NOT_FOUND,
                    "action must be pause, resume or purge",
                );
            }
        }
        let state = CampaignState {
            name: name.to_owned(),
            paused: campaign.is_paused(),
            blocked_until: campaign.blocked_until(),
        };
        if let Err(e) = self.intake.queue.save_campaign(state).await {
            tracing::error!(error = %e, campaign = name, "cannot persist campaign state");
        }
        self.intake.wake.notify_one();
        tracing::warn!(campaign = name, action, purged, "operator action");
        let mut view =
            serde_json::to_value(CampaignView::of(&campaign, self.now())).unwrap_or_default();
        if let Some(n) = purged {
            view["purged"] = n.into();
        }
        json(StatusCode::OK, &view)
    }

    fn intake_switch(&self, action: &str) -> Response<Body> {
        let paused = match action {
            "pause" => true,
            "resume" => false,
            _ => return error(StatusCode::NOT_FOUND, "action must be pause or resume"),
        };
        self.intake.campaigns().set_intake_paused(paused);
        tracing::warn!(paused, "operator switched intake");
        json(
            StatusCode::OK,
            &serde_json::json!({ "intake_paused": paused }),
        )
    }

    fn faillog_view(&self) -> serde_json::Value {
        match &self.faillog {
            Some(f) => serde_json::json!({
                "settings": f.settings(),
                "counters": f.counters(),
                "rows_per_sec": f.rows_per_sec_recent(),
            }),
            None => serde_json::json!({ "settings": null }),
        }
    }

    fn faillog_get(&self) -> Response<Body> {
        json(StatusCode::OK, &self.faillog_view())
    }

    async fn faillog_put(&self, req: Request<Incoming>) -> Response<Body> {
        let Some(faillog) = &self.faillog else {
            return error(StatusCode::SERVICE_UNAVAILABLE, "failure log not running");
        };
        let body = match read_body(req, 4096).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let update: FailLogUpdate = match serde_json::from_slice(&body) {
            Ok(u) => u,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("body: {e}")),
        };
        let mut settings: FailLogSettings = faillog.settings();
        settings.mode = update.mode.unwrap_or(settings.mode);
        settings.sample_rate = update.sample_rate.unwrap_or(settings.sample_rate);
        settings.rows_per_sec = update.rows_per_sec.unwrap_or(settings.rows_per_sec);
        settings.burst = update.burst.unwrap_or(settings.burst);
        faillog.set_settings(settings);
        tracing::warn!(
            mode = settings.mode.as_str(),
            sample_rate = settings.sample_rate,
            rows_per_sec = settings.rows_per_sec,
            "operator switched the failure log"
        );
        json(StatusCode::OK, &self.faillog_view())
    }

    async fn failures(&self, query: Option<&str>) -> Response<Body> {
        let Some(faillog) = &self.faillog else {
            return error(StatusCode::SERVICE_UNAVAILABLE, "failure log not running");
        };
        let mut q = FailureQuery {
            limit: 100,
            ..Default::default()
        };
        for (key, value) in query_pairs(query) {
            match key.as_str() {
                "campaign" => q.campaign = Some(value),
                "reason" => match Reason::parse(&value) {
                    Some(r) => q.reason = Some(r),
                    None => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            &format!("unknown reason `{value}`"),
                        );
                    }
                },
                "since" => match value.parse() {
                    Ok(ms) => q.since_ms = Some(ms),
                    Err(_) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "since: milliseconds since the epoch",
                        );
                    }
                },
                "before" => match value.parse() {
                    Ok(id) => q.before_id = Some(id),
                    Err(_) => return error(StatusCode::BAD_REQUEST, "before: a row id"),
                },
                "limit" => match value.parse() {
                    Ok(n) => q.limit = n,
                    Err(_) => return error(StatusCode::BAD_REQUEST, "limit: a number"),
                },
                other => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!("unknown parameter `{other}`"),
                    );
                }
            }
        }
        match faillog.failures(q).await {
            Ok(rows) => {
                let next = rows.last().map(|r| r.id);
                json(
                    StatusCode::OK,
                    &serde_json::json!({ "failures": rows, "next_before": next }),
                )
            }
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        }
    }

    async fn queue(&self) -> Response<Body> {
        match self.intake.queue.summary().await {
            Ok(s) => json(
                StatusCode::OK,
                &serde_json::json!({
                    "by_state": s.by_state.iter().map(|(st, n)| (st.as_str(), *n)).collect::<std::collections::BTreeMap<_, _>>(),
                    "by_domain": s.by_domain,
                    "by_campaign": s.by_campaign,
                }),
            ),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        }
    }

    async fn status(&self) -> Response<Body> {
        let by_state = self
            .intake
            .queue
            .count_by_state()
            .await
            .map(|v| {
                v.into_iter()
                    .map(|(s, n)| (s.as_str(), n))
                    .collect::<std::collections::BTreeMap<_, _>>()
            })
            .unwrap_or_default();
        let campaigns = self.campaign_views();
        // Totals since start, so that clients (dashboard, ctl) compute rates from samples.
        let all = self.intake.campaigns().all();
        let total = |f: &dyn Fn(&Campaign) -> u64| all.iter().map(|c| f(c)).sum::<u64>();
        json(
            StatusCode::OK,
            &serde_json::json!({
                "uptime_secs": self.started.elapsed().as_secs(),
                "accepted_total": total(&|c| c.accepted.load(std::sync::atomic::Ordering::Relaxed)),
                "delivered_total": total(&|c| c.delivered.load(std::sync::atomic::Ordering::Relaxed)),
                "failures_total": total(&|c| c.total_failures()),
                "failed_total": campaigns.iter().map(|c| c.failed).sum::<u64>(),
                "intake_paused": self.intake.campaigns().intake_paused(),
                "queue": by_state,
                "campaigns": campaigns.len(),
                "paused_campaigns": campaigns.iter().filter(|c| c.state != "active").map(|c| c.name.clone()).collect::<Vec<_>>(),
                "faillog": self.faillog_view(),
                "alerts": self.guard.alerts().len(),
            }),
        )
    }
}

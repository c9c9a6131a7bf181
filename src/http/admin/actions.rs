//! What the admin API changes: a campaign's pause, resume and purge, the intake switch and
//! the failure log's mode. Each action persists what must survive a restart and logs who
//! did what, then answers with the typed view of the result.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::Admin;
use super::views::campaign_view;
use crate::admin_api as api;
use crate::campaign::Campaign;
use crate::cluster::Setting;
use crate::config::duration;
use crate::http::{Body, error, json, read_body};
use crate::queue::CampaignState;

/// A campaign action named in the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CampaignAction {
    Pause,
    Resume,
    Purge,
}

impl CampaignAction {
    pub fn parse(word: &str) -> Option<CampaignAction> {
        match word {
            "pause" => Some(CampaignAction::Pause),
            "resume" => Some(CampaignAction::Resume),
            "purge" => Some(CampaignAction::Purge),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            CampaignAction::Pause => "pause",
            CampaignAction::Resume => "resume",
            CampaignAction::Purge => "purge",
        }
    }
}

impl Admin {
    pub(super) async fn campaign_action(
        &self,
        name: &str,
        action: &str,
        req: Request<Incoming>,
    ) -> Response<Body> {
        // The campaign is looked up (and so listed) before the action is checked, as it
        // always was.
        let campaigns = self.intake.campaigns();
        let campaign = campaigns.get(Some(name));
        let Some(action) = CampaignAction::parse(action) else {
            return error(
                StatusCode::NOT_FOUND,
                "action must be pause, resume or purge",
            );
        };
        let mut purged = None;
        match action {
            CampaignAction::Pause => {
                campaign.set_paused(true);
                self.intake.queue.hold_in_background(name.to_owned());
            }
            CampaignAction::Resume => {
                campaign.set_paused(false);
                campaign.block_until(0);
                self.intake
                    .queue
                    .release_in_background(name.to_owned(), self.intake.wake.clone());
            }
            CampaignAction::Purge => match self.purge(name, &campaign, req).await {
                Ok(n) => purged = Some(n),
                Err(r) => return r,
            },
        }
        let state = CampaignState {
            name: name.to_owned(),
            paused: campaign.is_paused(),
            blocked_until: campaign.blocked_until(),
        };
        if let Some(cluster) = &self.intake.cluster {
            let setting = Setting::Campaign {
                name: state.name.clone(),
                paused: state.paused,
                blocked_until: state.blocked_until,
            };
            cluster.publish(setting, self.now());
        }
        if let Err(e) = self.intake.queue.save_campaign(state).await {
            tracing::error!(error = %e, campaign = name, "cannot persist campaign state");
        }
        self.intake.wake.notify_one();
        tracing::warn!(
            campaign = name,
            action = action.as_str(),
            purged,
            "operator action"
        );
        json(
            StatusCode::OK,
            &api::CampaignActionResponse {
                campaign: campaign_view(&campaign, self.now()),
                purged,
            },
        )
    }

    /// Blocks the campaign for the body's `block_for`, if any, then deletes its queue.
    async fn purge(
        &self,
        name: &str,
        campaign: &Campaign,
        req: Request<Incoming>,
    ) -> Result<u64, Response<Body>> {
        let body = read_body(req, 4096).await?;
        let request: api::PurgeRequest = if body.iter().all(u8::is_ascii_whitespace) {
            api::PurgeRequest::default()
        } else {
            serde_json::from_slice(&body)
                .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("body: {e}")))?
        };
        if let Some(text) = &request.block_for {
            let d = duration::parse(text)
                .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("block_for: {e}")))?;
            campaign.block_until(self.now() + d.as_millis() as i64);
        }
        self.intake
            .queue
            .purge(name, request.through)
            .await
            .map_err(|e| {
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("purge failed: {e}"),
                )
            })
    }

    pub(super) fn intake_switch(&self, action: &str) -> Response<Body> {
        let paused = match action {
            "pause" => true,
            "resume" => false,
            _ => return error(StatusCode::NOT_FOUND, "action must be pause or resume"),
        };
        self.intake.campaigns().set_intake_paused(paused);
        if let Some(cluster) = &self.intake.cluster {
            cluster.publish(Setting::Intake { paused }, self.now());
        }
        tracing::warn!(paused, "operator switched intake");
        json(
            StatusCode::OK,
            &api::IntakeResponse {
                intake_paused: paused,
            },
        )
    }

    pub(super) async fn faillog_put(&self, req: Request<Incoming>) -> Response<Body> {
        let faillog = &self.faillog;
        let body = match read_body(req, 4096).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let update: api::FailLogUpdate = match serde_json::from_slice(&body) {
            Ok(u) => u,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("body: {e}")),
        };
        let mut settings = faillog.settings();
        settings.mode = update.mode.unwrap_or(settings.mode);
        settings.sample_rate = update.sample_rate.unwrap_or(settings.sample_rate);
        settings.rows_per_sec = update.rows_per_sec.unwrap_or(settings.rows_per_sec);
        settings.burst = update.burst.unwrap_or(settings.burst);
        faillog.set_settings(settings);
        if let Some(cluster) = &self.intake.cluster {
            cluster.publish(Setting::FailLog { settings }, self.now());
        }
        tracing::warn!(
            mode = settings.mode.as_str(),
            sample_rate = settings.sample_rate,
            rows_per_sec = settings.rows_per_sec,
            "operator switched the failure log"
        );
        json(StatusCode::OK, &self.faillog_view())
    }
}

impl Admin {
    /// Sends the TLS reports due now (what the minute's pass would do next).
    /// `POST /admin/v1/probe[?address=A|?route=NAME]`: one canary probe now, to
    /// `address`, to the `[canary] probes` addresses that route `NAME` serves, or to every
    /// configured probe address at once; answers when each has a result.
    pub(super) async fn probe(&self, query: Option<&str>) -> Response<Body> {
        let pairs = crate::http::query_pairs(query);
        let given = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        let config = self.intake.config.load_full();
        let addresses: Vec<String> = match (given("address"), given("route")) {
            (Some(a), _) => vec![a.clone()],
            (None, Some(name)) => match probes_of_route(&config, name) {
                Ok(addresses) => addresses,
                Err((status, why)) => return error(status, &why),
            },
            (None, None) => config.canary.probes.clone(),
        };
        if !self.intake.config.load().delivery.enabled {
            return error(
                StatusCode::CONFLICT,
                "delivery is off ([delivery] enabled = false): a probe cannot pass",
            );
        }
        if addresses.is_empty() {
            return error(
                StatusCode::BAD_REQUEST,
                "no probe address: give ?address= or set [canary] probes",
            );
        }
        if let Some(bad) = addresses.iter().find(|a| crate::address::parse(a).is_err()) {
            return error(StatusCode::BAD_REQUEST, &format!("not an address: {bad}"));
        }
        let mut probes = tokio::task::JoinSet::new();
        for (i, a) in addresses.into_iter().enumerate() {
            let canary = self.canary.clone();
            probes.spawn(async move { (i, canary.probe(&a).await) });
        }
        let mut reports: Vec<(usize, api::ProbeReport)> = probes.join_all().await;
        reports.sort_by_key(|(i, _)| *i);
        let reports: Vec<api::ProbeReport> = reports.into_iter().map(|(_, r)| r).collect();
        json(StatusCode::OK, &reports)
    }

    pub(super) async fn tls_report_send(&self) -> Response<Body> {
        let now = self.intake.clock.now_ms();
        let sent = self
            .tls_reports
            .send_due()
            .await
            .into_iter()
            .map(|s| api::TlsReportRecord {
                day: s.day,
                domain: s.domain,
                sent_at_ms: now,
                outcome: s.outcome,
            })
            .collect();
        json(StatusCode::OK, &api::TlsReportSendResponse { sent })
    }
}

/// The configured probe addresses whose domain route `name` serves.
fn probes_of_route(
    config: &crate::config::Config,
    name: &str,
) -> Result<Vec<String>, (StatusCode, String)> {
    let Some(route) = crate::config::route::named(&config.routes, name) else {
        return Err((StatusCode::NOT_FOUND, format!("no route is named {name:?}")));
    };
    let served: Vec<String> = config
        .canary
        .probes
        .iter()
        .filter(|a| {
            crate::address::parse(a).is_ok_and(|a| {
                crate::config::route::find(&config.routes, &a.domain)
                    .is_some_and(|(_, r)| std::ptr::eq(r, route))
            })
        })
        .cloned()
        .collect();
    match served.is_empty() {
        true => Err((
            StatusCode::BAD_REQUEST,
            format!("no [canary] probes address goes through route {name:?}: give ?address="),
        )),
        false => Ok(served),
    }
}

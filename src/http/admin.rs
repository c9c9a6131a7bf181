//! The admin API on `[admin] listen`: what operators needed on the day of the incident —
//! which campaigns are failing, pause / resume / purge them, pause intake, switch the
//! failure log — plus health probes and `/metrics`. Everything but the probes needs the
//! bearer token.
//!
//! This file routes; `views.rs` builds the typed answers of [`crate::admin_api`] and
//! `actions.rs` changes the daemon's state.

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use subtle::ConstantTimeEq;

use super::{Body, error, json, percent_decode};

mod actions;
mod mail;
mod suppressions;
pub(crate) mod views;

pub use super::daemon::Admin;

/// Every admin route: method and path pattern (`{name}` and `{action}` are one segment).
/// `tests/openapi.rs` checks that each appears in `docs/openapi.yaml`.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/"),
    ("GET", "/index.html"),
    ("GET", "/assets/app.js"),
    ("GET", "/assets/style.css"),
    ("GET", "/metrics"),
    ("GET", "/admin/v1/status"),
    ("GET", "/admin/v1/campaigns"),
    ("POST", "/admin/v1/campaigns/{name}/{action}"),
    ("POST", "/admin/v1/intake/{action}"),
    ("GET", "/admin/v1/faillog"),
    ("PUT", "/admin/v1/faillog"),
    ("GET", "/admin/v1/failures"),
    ("GET", "/admin/v1/queue"),
    ("GET", "/admin/v1/alerts"),
    ("GET", "/admin/v1/webhooks"),
    ("GET", "/admin/v1/tls-report"),
    ("POST", "/admin/v1/tls-report/send"),
    ("GET", "/admin/v1/messages"),
    ("GET", "/admin/v1/messages/{id}"),
    ("POST", "/admin/v1/queue/{action}"),
    ("GET", "/admin/v1/domains"),
    ("POST", "/admin/v1/domains/{name}/{action}"),
    ("GET", "/admin/v1/export"),
    ("POST", "/admin/v1/requeue"),
    ("POST", "/admin/v1/backup"),
    ("GET", "/admin/v1/batches"),
    ("GET", "/admin/v1/batches/{id}"),
    ("GET", "/admin/v1/suppressions"),
    ("POST", "/admin/v1/suppressions"),
    ("POST", "/admin/v1/suppressions/import"),
    ("GET", "/admin/v1/suppressions/{address}"),
    ("DELETE", "/admin/v1/suppressions/{address}"),
    ("POST", "/admin/v1/probe"),
];

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
            (Method::GET, ["admin", "v1", "status"]) => json(StatusCode::OK, &self.status().await),
            (Method::GET, ["admin", "v1", "campaigns"]) => {
                json(StatusCode::OK, &self.campaign_views())
            }
            (Method::POST, ["admin", "v1", "campaigns", name, action]) => {
                let (name, action) = (name.to_string(), action.to_string());
                self.campaign_action(&name, &action, req).await
            }
            (Method::POST, ["admin", "v1", "intake", action]) => self.intake_switch(action),
            (Method::GET, ["admin", "v1", "faillog"]) => json(StatusCode::OK, &self.faillog_view()),
            (Method::PUT, ["admin", "v1", "faillog"]) => self.faillog_put(req).await,
            (Method::GET, ["admin", "v1", "failures"]) => self.failures(req.uri().query()).await,
            (Method::GET, ["admin", "v1", "queue"]) => self.queue().await,
            (Method::GET, ["admin", "v1", "alerts"]) => json(StatusCode::OK, &self.alerts()),
            (Method::GET, ["admin", "v1", "webhooks"]) => json(StatusCode::OK, &self.webhooks()),
            (Method::GET, ["admin", "v1", "tls-report"]) => {
                self.tls_report(req.uri().query()).await
            }
            (Method::POST, ["admin", "v1", "tls-report", "send"]) => self.tls_report_send().await,
            (Method::GET, ["admin", "v1", "messages"]) => {
                self.find_messages(req.uri().query()).await
            }
            (Method::GET, ["admin", "v1", "messages", id]) => self.message_trace(id).await,
            (Method::POST, ["admin", "v1", "queue", op]) => {
                let op = op.to_string();
                self.queue_op(&op, req).await
            }
            (Method::GET, ["admin", "v1", "domains"]) => self.domain_holds().await,
            (Method::POST, ["admin", "v1", "domains", domain, action]) => {
                self.domain_action(domain, action).await
            }
            (Method::GET, ["admin", "v1", "export"]) => self.export(req.uri().query()).await,
            (Method::POST, ["admin", "v1", "requeue"]) => self.requeue(req).await,
            (Method::POST, ["admin", "v1", "backup"]) => self.backup(req).await,
            (Method::GET, ["admin", "v1", "batches"]) => self.batches().await,
            (Method::GET, ["admin", "v1", "batches", id]) => self.batch(id).await,
            (Method::GET, ["admin", "v1", "suppressions"]) => {
                self.suppressions_list(req.uri().query()).await
            }
            (Method::POST, ["admin", "v1", "suppressions"]) => self.suppression_add(req).await,
            (Method::POST, ["admin", "v1", "suppressions", "import"]) => {
                self.suppression_import(req).await
            }
            (Method::GET, ["admin", "v1", "suppressions", address]) => {
                self.suppression_get(address).await
            }
            (Method::DELETE, ["admin", "v1", "suppressions", address]) => {
                let address = address.to_string();
                self.suppression_remove(&address, req.uri().query()).await
            }
            (Method::POST, ["admin", "v1", "probe"]) => self.probe(req.uri().query()).await,
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
            // Alive but not delivering: a failing or slow canary.
            Ok(()) => match self.canary.degraded() {
                None => super::text(StatusCode::OK, "text/plain", "ready\n"),
                Some(why) => super::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("{why}\n"),
                ),
            },
            Err(e) => super::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{e}\n"),
            ),
        }
    }
}

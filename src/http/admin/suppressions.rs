//! The do-not-contact list over the admin API: list with filters and a cursor, get one
//! address, add, remove, and a streamed bulk import (NDJSON or CSV) that holds one batch
//! and one partial line of the body, never the body.

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::Admin;
use crate::admin_api as api;
use crate::http::{Body, error, json, query_pairs, read_body};
use crate::suppression::import::{Format, Importer};
use crate::suppression::{Entry, Filter, NewEntry, Reason, Scope, SuppressionError, Target};

/// Most entries one page of a listing returns.
const MAX_PAGE: usize = 10_000;
/// Entries an import hands the writer at once: one transaction each.
const IMPORT_BATCH: usize = 10_000;

fn view(e: Entry) -> api::Suppression {
    api::Suppression {
        id: e.id,
        address: e.target.as_column(),
        campaign: e.scope.campaign().map(str::to_owned),
        reason: e.reason.as_str().to_owned(),
        source: e.source,
        created_at_ms: e.created_ms,
        expires_at_ms: e.expires_ms,
    }
}

fn unavailable(e: SuppressionError) -> Response<Body> {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("suppression list: {e}"),
    )
}

fn scope_of(campaign: Option<&str>) -> Scope {
    match campaign {
        None | Some("") => Scope::Global,
        Some(c) => Scope::Campaign(c.to_owned()),
    }
}

/// Parses the query of `GET /admin/v1/suppressions`; `Err` is the message of a 400.
fn filter(query: Option<&str>) -> Result<Filter, String> {
    let mut f = Filter {
        limit: 100,
        ..Filter::default()
    };
    for (key, value) in query_pairs(query) {
        match key.as_str() {
            "address" => {
                f.target = Some(Target::parse(&value).ok_or("address: not an address")?);
            }
            "domain" => match Target::parse(&format!("@{value}")) {
                Some(t) => f.domain = Some(t.domain().to_owned()),
                None => return Err("domain: not a domain".into()),
            },
            "reason" => {
                f.reason = Some(Reason::parse(&value).ok_or(format!("unknown reason `{value}`"))?);
            }
            "campaign" => f.scope = Some(scope_of(Some(&value))),
            "global" => f.scope = Some(Scope::Global),
            "cursor" => f.cursor = Some(value.parse().map_err(|_| "cursor: an entry id")?),
            "limit" => f.limit = value.parse().map_err(|_| "limit: a number")?,
            other => return Err(format!("unknown parameter `{other}`")),
        }
    }
    f.limit = f.limit.clamp(1, MAX_PAGE);
    Ok(f)
}

impl Admin {
    pub(super) async fn suppressions_list(&self, query: Option<&str>) -> Response<Body> {
        let f = match filter(query) {
            Ok(f) => f,
            Err(why) => return error(StatusCode::BAD_REQUEST, &why),
        };
        let limit = f.limit;
        match self.intake.policy.suppressions.list(f).await {
            Ok(entries) => {
                let next_cursor = (entries.len() == limit)
                    .then(|| entries.last().map(|e| e.id))
                    .flatten();
                let suppressions = entries.into_iter().map(view).collect();
                json(
                    StatusCode::OK,
                    &api::SuppressionsResponse {
                        suppressions,
                        next_cursor,
                    },
                )
            }
            Err(e) => unavailable(e),
        }
    }

    pub(super) async fn suppression_get(&self, address: &str) -> Response<Body> {
        let Some(target) = Target::parse(address) else {
            return error(StatusCode::BAD_REQUEST, "not an address or @domain");
        };
        self.entries_of(target, true).await
    }

    /// Every entry naming `target`, in any scope; none is a 404 when `missing_is_404`.
    async fn entries_of(&self, target: Target, missing_is_404: bool) -> Response<Body> {
        match self.intake.policy.suppressions.get(target).await {
            Ok(entries) if missing_is_404 && entries.is_empty() => {
                error(StatusCode::NOT_FOUND, "not suppressed")
            }
            Ok(entries) => json(
                StatusCode::OK,
                &api::SuppressionsResponse {
                    suppressions: entries.into_iter().map(view).collect(),
                    next_cursor: None,
                },
            ),
            Err(e) => unavailable(e),
        }
    }

    pub(super) async fn suppression_add(&self, req: Request<Incoming>) -> Response<Body> {
        let body = match read_body(req, 8192).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let add: api::SuppressionAdd = match serde_json::from_slice(&body) {
            Ok(a) => a,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("body: {e}")),
        };
        let Some(target) = Target::parse(&add.address) else {
            return error(
                StatusCode::BAD_REQUEST,
                "address: not an address or @domain",
            );
        };
        let reason = match add.reason.as_deref().map(Reason::parse) {
            None => Reason::Manual,
            Some(Some(r)) => r,
            Some(None) => return error(StatusCode::BAD_REQUEST, "reason: unknown"),
        };
        let Some(scope) = Scope::for_campaign(add.campaign.as_deref()) else {
            return error(StatusCode::BAD_REQUEST, "campaign: not a valid name");
        };
        let now = self.now();
        let expires_ms = add
            .expires_at_ms
            .or_else(|| self.intake.config.load().suppression.expiry(reason, now));
        let entry = NewEntry {
            target: target.clone(),
            scope,
            reason,
            source: "api".into(),
            expires_ms,
        };
        let suppressions = &self.intake.policy.suppressions;
        if let Err(e) = suppressions.add(vec![entry]).await {
            return unavailable(e);
        }
        tracing::info!(address = %target.as_column(), campaign = add.campaign, %reason, "suppression added");
        self.entries_of(target, false).await
    }

    pub(super) async fn suppression_remove(
        &self,
        address: &str,
        query: Option<&str>,
    ) -> Response<Body> {
        let Some(target) = Target::parse(address) else {
            return error(StatusCode::BAD_REQUEST, "not an address or @domain");
        };
        let mut campaign = None;
        for (key, value) in query_pairs(query) {
            match key.as_str() {
                "campaign" => campaign = Some(value),
                other => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!("unknown parameter `{other}`"),
                    );
                }
            }
        }
        let scope = scope_of(campaign.as_deref());
        match self
            .intake
            .policy
            .suppressions
            .remove(scope, target.clone())
            .await
        {
            Ok(removed) => {
                tracing::info!(address = %target.as_column(), campaign, removed, "suppression removed");
                let status = if removed {
                    StatusCode::OK
                } else {
                    StatusCode::NOT_FOUND
                };
                json(status, &api::SuppressionRemoved { removed })
            }
            Err(e) => unavailable(e),
        }
    }

    /// Streams the body through the import parser, handing the writer one batch at a time
    /// (each durable before the next is read), and answers with the exact counts.
    pub(super) async fn suppression_import(&self, req: Request<Incoming>) -> Response<Body> {
        let csv = req
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("text/csv"));
        let format = if csv { Format::Csv } else { Format::Ndjson };
        let mut importer = Importer::new(format, "import");
        let mut batch: Vec<NewEntry> = Vec::new();
        let suppressions = &self.intake.policy.suppressions;
        let mut body = req.into_body();
        while let Some(frame) = body.frame().await {
            let frame = match frame {
                Ok(f) => f,
                Err(e) => return error(StatusCode::BAD_REQUEST, &format!("body: {e}")),
            };
            let Ok(chunk) = frame.into_data() else {
                continue;
            };
            importer.feed(&chunk, &mut batch);
            if batch.len() >= IMPORT_BATCH
                && let Err(e) = suppressions.add(std::mem::take(&mut batch)).await
            {
                return unavailable(e);
            }
        }
        let report = importer.finish(&mut batch);
        if !batch.is_empty()
            && let Err(e) = suppressions.add(batch).await
        {
            return unavailable(e);
        }
        tracing::info!(
            lines = report.lines,
            accepted = report.accepted,
            invalid = report.invalid,
            "suppressions imported"
        );
        json(
            StatusCode::OK,
            &api::ImportReport {
                lines: report.lines,
                accepted: report.accepted,
                invalid: report.invalid,
                errors: report
                    .errors
                    .into_iter()
                    .map(|(line, error)| api::ImportError { line, error })
                    .collect(),
            },
        )
    }
}

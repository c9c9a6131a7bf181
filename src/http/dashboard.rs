//! The operator dashboard: one page, its script and its stylesheet, compiled into the
//! binary and served by the admin listener without the token.
//!
//! The files hold no data — the page asks for the token and calls the admin API with it —
//! so serving them openly leaks nothing, and embedding them means the appliance needs no
//! web root, no build step and no outside host (no CDN, no web fonts).

use hyper::{Method, Response, StatusCode};

use super::Body;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const STYLE_CSS: &str = include_str!("dashboard/style.css");

/// Only our own files may run or load, and the page can talk only to the admin API it was
/// served from: a hostile campaign name shown on the page cannot pull in a script.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; form-action 'none'; \
     frame-ancestors 'none'; base-uri 'none'";

/// The dashboard's file for `path`, or `None` if `path` is not one of them.
///
/// Cheap: a match on the path and a copy of a static string; called before the token check.
pub fn asset(method: &Method, path: &str) -> Option<Response<Body>> {
    if method != Method::GET && method != Method::HEAD {
        return None;
    }
    let (content_type, body) = match path {
        "/" | "/index.html" => ("text/html; charset=utf-8", INDEX_HTML),
        "/assets/app.js" => ("text/javascript; charset=utf-8", APP_JS),
        "/assets/style.css" => ("text/css; charset=utf-8", STYLE_CSS),
        _ => return None,
    };
    let mut response = super::text(StatusCode::OK, content_type, body);
    let headers = response.headers_mut();
    for (name, value) in [
        ("content-security-policy", CSP),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        // A new binary brings new files; never run yesterday's script against today's API.
        ("cache-control", "no-cache"),
    ] {
        headers.insert(name, hyper::header::HeaderValue::from_static(value));
    }
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_the_three_files_and_nothing_else() {
        for path in ["/", "/assets/app.js", "/assets/style.css"] {
            let r = asset(&Method::GET, path).expect(path);
            assert_eq!(r.status(), StatusCode::OK);
            assert!(r.headers().contains_key("content-security-policy"));
        }
        assert!(asset(&Method::GET, "/assets/../admin").is_none());
        assert!(asset(&Method::POST, "/").is_none());
        assert!(asset(&Method::GET, "/metrics").is_none());
    }

    #[test]
    fn the_page_loads_nothing_from_outside() {
        for text in [INDEX_HTML, APP_JS, STYLE_CSS] {
            // The SVG namespace is a name, not a request.
            let text = text.replace("http://www.w3.org/2000/svg", "");
            assert!(!text.contains("http://"), "outside URL in a dashboard file");
            assert!(
                !text.contains("https://"),
                "outside URL in a dashboard file"
            );
        }
    }

    /// Decodes `sample` into the admin API type the dashboard is served and encodes it
    /// again: a field the type lacks is gone from the result.
    fn served<T: serde::Serialize + serde::de::DeserializeOwned>(
        sample: serde_json::Value,
    ) -> serde_json::Value {
        let typed: T = serde_json::from_value(sample).expect("sample decodes");
        serde_json::to_value(typed).unwrap()
    }

    /// Every field `app.js` reads is a field of the typed answer it reads it from.
    #[test]
    fn the_fields_the_script_reads_are_in_the_typed_api() {
        use crate::admin_api as api;
        use serde_json::json;
        let campaign = json!({"name": "c", "state": "blocked", "accepted": 1, "delivered": 0,
            "failed": 1, "failure_ratio": 0.5, "deferred": 0, "reasons": {"rejected": 1},
            "blocked_until_ms": 1});
        let faillog = json!({"settings": {"mode": "full", "sample_rate": 1, "rows_per_sec": 1,
            "burst": 1}, "counters": {"recorded": 0, "off_skipped": 0, "closed_skipped": 0,
            "queued": 0, "rows_written": 0, "suppressed": 0, "sampled_out": 0, "dropped": 0,
            "lost_rows": 0, "lost_aggregates": 0, "transactions": 0, "failed_transactions": 0,
            "pruned_rows": 0, "pruned_stats": 0, "prune_runs": 0, "pending_aggregate_keys": 0},
            "rows_per_sec": 0.0});
        let status = json!({"uptime_secs": 1, "accepted_total": 1, "delivered_total": 1,
            "failures_total": 1, "failed_total": 1, "intake_paused": false,
            "queue": {"scheduled": 1}, "campaigns": 1, "paused_campaigns": [],
            "faillog": faillog, "alerts": 0});
        let mut purged = campaign.clone();
        purged["purged"] = 3.into();
        let alert = json!({"at_ms": 1, "kind": "k", "campaign": "c", "message": "m",
            "action": "paused"});
        let webhooks = json!({"endpoints": [{"url": "u", "disabled": true, "circuit": "open",
            "consecutive_failures": 1}], "events_dropped": 0});
        let queue = json!({"by_state": {}, "by_domain": [["mx.test", 1]], "by_campaign": []});
        let reads: [(serde_json::Value, &[&str]); 6] = [
            (
                served::<api::StatusResponse>(status),
                &[
                    "/accepted_total",
                    "/delivered_total",
                    "/failed_total",
                    "/failures_total",
                    "/intake_paused",
                    "/queue",
                    "/faillog/settings/mode",
                    "/faillog/counters/dropped",
                    "/faillog/counters/suppressed",
                    "/faillog/counters/rows_written",
                ],
            ),
            (
                served::<api::CampaignView>(campaign),
                &[
                    "/name",
                    "/state",
                    "/failed",
                    "/failure_ratio",
                    "/accepted",
                    "/reasons",
                    "/blocked_until_ms",
                ],
            ),
            (served::<api::CampaignActionResponse>(purged), &["/purged"]),
            (
                served::<api::Alert>(alert),
                &["/at_ms", "/kind", "/campaign", "/action", "/message"],
            ),
            (
                served::<api::WebhooksResponse>(webhooks),
                &["/endpoints/0/disabled", "/endpoints/0/url"],
            ),
            (served::<api::QueueResponse>(queue), &["/by_domain/0/0"]),
        ];
        for (value, pointers) in reads {
            for pointer in pointers {
                assert!(value.pointer(pointer).is_some(), "{pointer} not in {value}");
                let field = pointer
                    .rsplit('/')
                    .find(|s| s.parse::<usize>().is_err())
                    .unwrap();
                assert!(
                    APP_JS.contains(&format!(".{field}")),
                    "app.js reads no .{field}"
                );
            }
        }
    }
}

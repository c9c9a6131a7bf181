//! The public one-click unsubscribe listener (RFC 8058): `POST /u/TOKEN` suppresses the
//! token's recipient and sends an `unsubscribed` event; `GET /u/TOKEN` only shows a page
//! with a button, so that link scanners that fetch every URL unsubscribe nobody. Tokens
//! are verified by their HMAC, without a lookup; a forged one is refused.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};

use super::{Body, read_body, text};
use crate::config::suppression::UnsubscribeScope;
use crate::events::Events;
use crate::intake::Intake;
use crate::suppression::{NewEntry, Reason, Scope, Target};
use crate::unsubscribe::Signer;

/// Largest body read from a POST (RFC 8058's is `List-Unsubscribe=One-Click`).
const MAX_BODY: usize = 4096;

pub struct Unsubscribe {
    pub intake: Arc<Intake>,
    pub events: Events,
    pub signer: Arc<Signer>,
}

fn page(status: StatusCode, body: &str) -> Response<Body> {
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Unsubscribe</title></head><body>{body}</body></html>\n"
    );
    let mut r = text(status, "text/html; charset=utf-8", html);
    r.headers_mut().insert(
        "content-security-policy",
        hyper::header::HeaderValue::from_static("default-src 'none'; form-action 'self'"),
    );
    r
}

impl Unsubscribe {
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let Some(token) = path.strip_prefix("/u/").filter(|t| !t.contains('/')) else {
            return page(StatusCode::NOT_FOUND, "<p>Not found.</p>");
        };
        let Ok(who) = self.signer.verify(token) else {
            return page(
                StatusCode::NOT_FOUND,
                "<p>This unsubscribe link is not valid.</p>",
            );
        };
        match *req.method() {
            // The token is base64url and a dot: safe inside the attribute as it is.
            Method::GET => page(
                StatusCode::OK,
                &format!(
                    "<form method=\"post\" action=\"/u/{token}\"><p>Stop receiving this mail?</p><button type=\"submit\" name=\"List-Unsubscribe\" value=\"One-Click\">Unsubscribe</button></form>"
                ),
            ),
            Method::POST => {
                if let Err(r) = read_body(req, MAX_BODY).await {
                    return r;
                }
                self.suppress(&who.recipient, &who.campaign).await
            }
            _ => page(StatusCode::METHOD_NOT_ALLOWED, "<p>Use the button.</p>"),
        }
    }

    async fn suppress(&self, recipient: &str, campaign: &str) -> Response<Body> {
        let Some(target) = Target::parse(recipient) else {
            return page(StatusCode::NOT_FOUND, "<p>Not found.</p>");
        };
        let config = self.intake.config.load();
        let scope = match config.suppression.unsubscribe.scope {
            // A token without a campaign came from an API key's unattributed mail.
            UnsubscribeScope::Campaign if !campaign.is_empty() => {
                Scope::Campaign(campaign.to_owned())
            }
            UnsubscribeScope::Campaign => Scope::Global,
            UnsubscribeScope::Global => Scope::Global,
        };
        let entry = NewEntry {
            target,
            scope,
            reason: Reason::Unsubscribed,
            source: "unsubscribe".into(),
            expires_ms: config
                .suppression
                .expiry(Reason::Unsubscribed, self.intake.clock.now_ms()),
        };
        if let Err(e) = self.intake.policy.suppressions.add(vec![entry]).await {
            tracing::warn!(error = %e, "unsubscribe not recorded");
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                "<p>Please try again in a minute.</p>",
            );
        }
        self.events.unsubscribed(recipient, campaign);
        tracing::info!(campaign, "recipient unsubscribed");
        page(StatusCode::OK, "<p>You are unsubscribed.</p>")
    }
}

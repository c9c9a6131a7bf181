//! Delivery of the guard's alerts to `[guard] alert_webhook`: signed JSON (Standard
//! Webhooks) when there is a secret, at most `alert_webhook_per_minute`, so that a flood
//! of alerts does not become a flood of requests. One attempt per alert; the outcome is
//! counted in [`GuardStats`](super::GuardStats).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Alert, Guard};
use crate::net::signed::{self, Answer, SignedPost};
use crate::signing::Secret;

/// The most of one alert's answer that is read.
const MAX_RESPONSE_BODY: usize = 64 * 1024;
/// How long one alert POST may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Sends alerts from `rx` until shutdown or until the guard is gone.
pub(super) async fn send(
    guard: Arc<Guard>,
    mut rx: mpsc::Receiver<Alert>,
    shutdown: CancellationToken,
) {
    let client = signed::web_client(MAX_RESPONSE_BODY);
    // Rebuilt when a reload changes the rate.
    let mut limiter: Option<(u32, DefaultDirectRateLimiter)> = None;
    loop {
        let alert = tokio::select! {
            a = rx.recv() => match a { Some(a) => a, None => return },
            () = shutdown.cancelled() => return,
        };
        let config = guard.config.load_full();
        let rule = &config.guard;
        let Some(url) = rule.alert_webhook.as_deref() else {
            continue;
        };
        let per_minute = rule.alert_webhook_per_minute.max(1);
        if limiter.as_ref().is_none_or(|(n, _)| *n != per_minute) {
            let quota = Quota::per_minute(NonZeroU32::new(per_minute).expect("at least 1"));
            limiter = Some((per_minute, RateLimiter::direct(quota)));
        }
        if limiter.as_ref().is_some_and(|(_, l)| l.check().is_err()) {
            guard.stats.webhook_skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let body =
            serde_json::to_vec(&serde_json::json!({ "type": "floodgate.alert", "alert": alert }))
                .unwrap_or_default();
        let id = format!(
            "alert_{}_{}",
            alert.at_ms,
            guard.stats.alerts.load(Ordering::Relaxed)
        );
        let secret = rule
            .alert_webhook_secret
            .as_deref()
            .and_then(|s| Secret::parse(s).ok());
        let post = SignedPost {
            url,
            secret: secret.as_ref(),
            id: &id,
            timestamp: alert.at_ms / 1000,
            body: body.into(),
            timeout: TIMEOUT,
        };
        match signed::post(&client, post).await {
            Answer::Accepted(_) => {
                guard.stats.webhook_sent.fetch_add(1, Ordering::Relaxed);
            }
            Answer::Refused(r) => {
                guard.stats.webhook_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(status = r.status, "alert webhook refused the alert");
            }
            Answer::Failed(e) => {
                guard.stats.webhook_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "alert webhook unreachable");
            }
        }
    }
}

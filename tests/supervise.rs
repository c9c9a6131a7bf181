//! A long-running task that dies outside shutdown makes the daemon unhealthy: `/readyz`
//! answers 503 naming it, and the check behind the systemd watchdog fails, so that
//! systemd restarts the daemon instead of leaving it running without that task.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::floodgate::{TestApp, http};
use floodgate::supervise::Unhealthy;

async fn app() -> (TestDns, TestApp) {
    let dns = TestDns::start(Zone::new().a("mx.test", Ipv4Addr::LOCALHOST)).await;
    let t = TestApp::start("", "", dns.addr).await;
    (dns, t)
}

async fn readyz(t: &TestApp) -> (u16, String) {
    http(t.app.admin_addr.unwrap(), "GET", "/readyz", None, None).await
}

/// Waits until the supervisor has noticed a death (it does so as the task unwinds).
async fn wait_unhealthy(t: &TestApp) -> Unhealthy {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Err(e) = t.app.health(Duration::from_secs(2)).await {
            return e;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "death never noticed"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_task_fails_readiness_and_the_watchdog_check() {
    let (_dns, t) = app().await;
    assert_eq!(readyz(&t).await, (200, "ready\n".into()));
    assert_eq!(t.app.health(Duration::from_secs(2)).await, Ok(()));

    let (go, wait) = tokio::sync::oneshot::channel::<()>();
    t.app.supervisor().spawn("route refresher", async move {
        let _ = wait.await;
        let labels: Vec<&str> = "xé.test".split('.').collect();
        // A real fault: slicing a domain by byte index inside a multi-byte character.
        let tail = &labels[0][..2];
        panic!("unreachable: {tail}");
    });
    go.send(()).unwrap();

    let e = wait_unhealthy(&t).await;
    assert_eq!(e, Unhealthy::TaskDied(vec!["route refresher".into()]));
    let (status, body) = readyz(&t).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("route refresher"), "{body}");
    // The rest of the daemon still answers: only readiness says it must be restarted.
    assert_eq!(
        http(t.app.admin_addr.unwrap(), "GET", "/healthz", None, None)
            .await
            .0,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_that_returns_outside_shutdown_is_a_death_too() {
    let (_dns, t) = app().await;
    t.app.supervisor().spawn("one-shot", async {});
    let e = wait_unhealthy(&t).await;
    assert_eq!(e, Unhealthy::TaskDied(vec!["one-shot".into()]));
    assert_eq!(readyz(&t).await.0, 503);
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_ends_every_task_without_a_death() {
    let (_dns, t) = app().await;
    let supervisor = t.app.supervisor().clone();
    t.app.shutdown().await;
    assert!(supervisor.dead().is_empty(), "{:?}", supervisor.dead());
}

//! Live reload says only what is true: each key family below changes the running daemon
//! (lanes already in use, the scheduler itself, the queue writer, the failure log's
//! writer), and the report names the changed keys precisely.

mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::floodgate::{TestApp, config_text_with_queue, message, parse_config};
use common::sink::{Sink, SinkConfig};
use floodgate::clock::{Clock, ShiftedClock, SystemClock};
use floodgate::queue::RecipientState;

const WAIT: Duration = Duration::from_secs(15);

async fn zone() -> TestDns {
    TestDns::start(
        Zone::new()
            .mx("mx.test", 10, "mail.mx.test")
            .a("mail.mx.test", Ipv4Addr::LOCALHOST),
    )
    .await
}

/// Delivery to `port` with `delivery` keys, or delivery off when `port` is `None`.
fn relay(port: Option<u16>, delivery: &str, more: &str) -> String {
    match port {
        Some(port) => format!(
            "[delivery]\nenabled = true\ncommand_timeout = \"30s\"\n{delivery}\n\n[[route]]\ndomains = [\"*\"]\ntransport = \"mx\"\nport = {port}\n{more}"
        ),
        None => format!("[delivery]\nenabled = false\n{delivery}\n\n{more}"),
    }
}

struct Setup {
    t: TestApp,
    dns: TestDns,
}

impl Setup {
    async fn start(queue_extra: &str, extra: &str, clock: Arc<dyn Clock>) -> Setup {
        let dns = zone().await;
        let t = TestApp::start_full("", queue_extra, extra, dns.addr, clock).await;
        Setup { t, dns }
    }

    /// Reloads with the same test config but `queue_extra` and `extra`; returns the keys
    /// reported as applied.
    fn reload(&mut self, queue_extra: &str, extra: &str) -> Vec<String> {
        let text = config_text_with_queue(self.t.dir.path(), self.dns.addr, "", queue_extra, extra);
        let r = self
            .t
            .app
            .reload(parse_config(self.t.dir.path(), &text))
            .expect("reload");
        assert!(r.needs_restart.is_empty(), "{r:?}");
        r.applied
    }

    async fn send(&self, n: usize) -> Vec<String> {
        let mut c = self.t.client().await;
        c.ehlo().await;
        let mut ids = Vec::new();
        for i in 0..n {
            ids.push(
                c.send_mail(
                    "a@client.test",
                    &["u@mx.test"],
                    &message(&format!("m{i}"), ""),
                )
                .await,
            );
        }
        ids
    }
}

async fn wait_connections(sink: &Sink, n: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while sink.connections() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} connections, expected {n}",
            sink.connections()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A sink that greets and then says nothing for a minute: every delivery to it holds
/// its connection (and its concurrency permit) for the whole test.
async fn stalling_sink() -> Sink {
    Sink::start_with(SinkConfig {
        stall_after_greeting: Some(Duration::from_secs(60)),
        ..Default::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_rate_reaches_a_lane_already_waiting_on_the_old_one() {
    let sink = Sink::start().await;
    let port = Some(sink.addr.port());
    let mut s = Setup::start(
        "",
        &relay(port, "rate = \"1/h\"", ""),
        Arc::new(SystemClock),
    )
    .await;
    s.send(2).await;
    // The first goes at once; the second waits an hour for the lane's next cell.
    sink.wait_for(1, WAIT).await;
    let applied = s.reload("", &relay(port, "rate = \"100/s\"", ""));
    assert_eq!(applied, ["delivery.rate"]);
    sink.wait_for(2, WAIT).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_concurrency_reaches_a_lane_in_use() {
    let sink = stalling_sink().await;
    let port = Some(sink.addr.port());
    let mut s = Setup::start(
        "",
        &relay(port, "concurrency = 1", ""),
        Arc::new(SystemClock),
    )
    .await;
    s.send(3).await;
    wait_connections(&sink, 1).await;
    let applied = s.reload("", &relay(port, "concurrency = 3", ""));
    assert_eq!(applied, ["delivery.concurrency"]);
    wait_connections(&sink, 3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_global_cap_applies_to_the_running_scheduler() {
    let sink = stalling_sink().await;
    let port = Some(sink.addr.port());
    let mut s = Setup::start(
        "",
        &relay(port, "max_concurrency = 1", ""),
        Arc::new(SystemClock),
    )
    .await;
    s.send(3).await;
    wait_connections(&sink, 1).await;
    let applied = s.reload("", &relay(port, "max_concurrency = 3", ""));
    assert_eq!(applied, ["delivery.max_concurrency"]);
    wait_connections(&sink, 3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn delivery_can_be_switched_on_and_off_by_reload() {
    let sink = Sink::start().await;
    let port = sink.addr.port();
    let routes = format!("[[route]]\ndomains = [\"*\"]\ntransport = \"mx\"\nport = {port}\n");
    let mut s = Setup::start("", &relay(None, "", &routes), Arc::new(SystemClock)).await;
    let first = s.send(1).await.remove(0);
    // On: the scheduler starts and delivers what waited.
    let applied = s.reload("", &relay(Some(port), "", ""));
    assert_eq!(applied, ["delivery.enabled", "delivery.command_timeout"]);
    sink.wait_for(1, WAIT).await;
    // The outcome is recorded just after the sink's reply: wait for it, so that the
    // scheduler stopped below has nothing left in flight.
    let deadline = tokio::time::Instant::now() + WAIT;
    while s
        .t
        .app
        .queue()
        .message(&first)
        .await
        .unwrap()
        .unwrap()
        .recipients[0]
        .state
        != RecipientState::Delivered
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never recorded as delivered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Off: the scheduler stops (and is not counted as a death).
    s.reload("", &relay(None, "", &routes));
    assert!(
        s.t.app.supervisor().join("scheduler", WAIT).await,
        "scheduler still running"
    );
    assert_eq!(s.t.app.health(Duration::from_secs(2)).await, Ok(()));
    let held = s.send(1).await.remove(0);
    s.t.app.wake_scheduler();
    let msg = s.t.app.queue().message(&held).await.unwrap().unwrap();
    assert_eq!(msg.recipients[0].attempts, 0);
    // And on again.
    s.reload("", &relay(Some(port), "", ""));
    sink.wait_for(2, WAIT).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_queue_writer_takes_a_new_batch_size() {
    let mut s = Setup::start("max_batch = 1024", "", Arc::new(SystemClock)).await;
    assert_eq!(s.reload("max_batch = 1", ""), ["queue.max_batch"]);
    let stats = s.t.app.queue().writer_stats();
    let (tx0, ops0) = (
        stats.transactions.load(Ordering::SeqCst),
        stats.operations.load(Ordering::SeqCst),
    );
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let q = s.t.app.queue().clone();
        set.spawn(async move { q.ping().await.unwrap() });
    }
    set.join_all().await;
    let tx = stats.transactions.load(Ordering::SeqCst) - tx0;
    let ops = stats.operations.load(Ordering::SeqCst) - ops0;
    assert!(ops >= 200, "{ops}");
    assert_eq!(tx, ops, "every transaction carries one operation");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_size_cap_can_be_set_and_lifted_live() {
    let mut s = Setup::start("", "", Arc::new(SystemClock)).await;
    let line = format!("{}\r\n", "f".repeat(900));
    let body = format!("Subject: filler\r\n\r\n{}", line.repeat(1700));
    let mut c = s.t.client().await;
    c.ehlo().await;
    assert_eq!(s.reload("max_size_mb = 1", ""), ["queue.max_size_mb"]);
    c.cmd("MAIL FROM:<a@client.test>", "250").await;
    c.rcpt("u@mx.test", "250").await;
    let reply = c.data(&body).await;
    assert!(reply.starts_with("452 4.3.1"), "{reply}");
    assert_eq!(s.reload("max_size_mb = 0", ""), ["queue.max_size_mb"]);
    c.send_mail("a@client.test", &["u@mx.test"], &body).await;
}

async fn refuse_one(t: &TestApp) {
    let mut c = t.client().await;
    c.ehlo().await;
    c.cmd("MAIL FROM:<a@client.test>", "250").await;
    c.rcpt("not an address", "501").await;
    // Refusals are counted once the transaction ends.
    c.cmd("RSET", "250").await;
}

async fn wait_rows_written(t: &TestApp, n: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while t.app.faillog.counters().rows_written < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            t.app.faillog.counters()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_failure_log_writer_takes_new_batch_flush_and_retention() {
    let clock = Arc::new(ShiftedClock::default());
    let slow = "[faillog]\nflush_interval = \"1h\"\nbatch_rows = 100000\n";
    let mut s = Setup::start("", slow, clock.clone()).await;
    // A batch of one: the next failure is written at once, though the tick is an hour.
    let applied = s.reload("", "[faillog]\nflush_interval = \"1h\"\nbatch_rows = 1\n");
    assert_eq!(applied, ["faillog.batch_rows"]);
    refuse_one(&s.t).await;
    wait_rows_written(&s.t, 1).await;
    // A short tick: a row waiting in a big batch is flushed within it.
    s.reload("", slow);
    refuse_one(&s.t).await;
    let queued = s.t.app.faillog.counters().queued;
    assert_eq!(queued, 2);
    let applied = s.reload(
        "",
        "[faillog]\nflush_interval = \"100ms\"\nbatch_rows = 100000\n",
    );
    assert_eq!(applied, ["faillog.flush_interval"]);
    wait_rows_written(&s.t, 2).await;
    // Retention: both rows are an hour old once the clock moves; a 1-minute retention
    // deletes them at the next pass.
    clock.advance(Duration::from_secs(3600));
    let applied = s.reload(
        "",
        "[faillog]\nflush_interval = \"100ms\"\nbatch_rows = 100000\nretention = \"1m\"\n",
    );
    assert_eq!(applied, ["faillog.retention"]);
    let deadline = tokio::time::Instant::now() + WAIT;
    while s.t.app.faillog.counters().pruned_rows < 2 {
        s.t.app.faillog.prune_now();
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            s.t.app.faillog.counters()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_report_names_the_changed_key() {
    let s = Setup::start("", "", Arc::new(SystemClock)).await;
    let dir = s.t.dir.path().to_owned();
    let text = config_text_with_queue(
        &dir,
        s.dns.addr,
        "allowed_networks = [\"127.0.0.0/8\", \"10.0.0.0/8\"]",
        "",
        "",
    );
    let r = s.t.app.reload(parse_config(&dir, &text)).unwrap();
    assert_eq!(r.applied, ["smtp.allowed_networks"]);
    assert!(r.needs_restart.is_empty());
    // Keys read only at start are reported as such, and keep their running value.
    let moved = text.replace(
        &format!("dir = \"{}\"", dir.join("queue").display()),
        &format!("dir = \"{}\"", dir.join("elsewhere").display()),
    );
    let r = s.t.app.reload(parse_config(&dir, &moved)).unwrap();
    assert_eq!(r.needs_restart, ["queue.dir"]);
    assert!(r.applied.is_empty(), "{r:?}");
    assert_eq!(s.t.app.intake.config.load().queue.dir, dir.join("queue"));
}

//! The failure log against real failures.db files: a flood costs aggregates, not rows;
//! live mode switches; sampling; a database locked by another process, a full file and an
//! overflowing channel never block `record` and never make the aggregates inexact;
//! retention bounds the table; the admin reads page newest first.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use floodgate::clock::{Clock, SystemClock};
use floodgate::config::{Dur, FailLogConfig, FailLogMode};
use floodgate::faillog::{FailLog, FailLogLimits, FailLogSettings, FailureEvent, FailureQuery};
use floodgate::reason::{Reason, Stage};
use rusqlite::Connection;

const REASONS: [Reason; 4] = [
    Reason::NoSuchDomain,
    Reason::MalformedAddress,
    Reason::EmptyAddress,
    Reason::NullMx,
];

/// A config that flushes often, so that tests finish fast.
fn config(change: impl FnOnce(&mut FailLogConfig)) -> FailLogConfig {
    let mut c = FailLogConfig {
        flush_interval: Dur::millis(20),
        rows_per_sec: 100_000,
        burst: 100_000,
        ..FailLogConfig::default()
    };
    change(&mut c);
    c
}

fn open(dir: &Path, config: &FailLogConfig) -> (FailLog, JoinHandle<()>, PathBuf) {
    let path = dir.join("failures.db");
    let (log, handle) =
        FailLog::open(&path, config, Arc::new(SystemClock)).expect("open failures.db");
    (log, handle, path)
}

fn ev(campaign: &str, i: usize, detail: &str) -> FailureEvent {
    FailureEvent {
        at_ms: SystemClock.now_ms(),
        campaign: Some(campaign.to_owned()),
        stage: Stage::Intake,
        reason: REASONS[i % REASONS.len()],
        class: None,
        recipient: format!("user{i}@nx.test"),
        detail: detail.to_owned(),
    }
}

fn finish(log: FailLog, handle: JoinHandle<()>) -> floodgate::faillog::FailLogCounters {
    log.close();
    handle.join().expect("writer thread");
    log.counters()
}

fn scalar(path: &Path, sql: &str) -> i64 {
    let conn = Connection::open(path).unwrap();
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

fn stats_sum(path: &Path) -> i64 {
    scalar(path, "SELECT coalesce(sum(count), 0) FROM failure_stats")
}

fn rows(path: &Path) -> i64 {
    scalar(path, "SELECT count(*) FROM failures")
}

/// Polls `cond` until it holds; panics after a generous bound (never asserts speed).
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_costs_aggregates_not_rows() {
    const CAMPAIGNS: usize = 8;
    const PER_CAMPAIGN: usize = 5_000;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(|c| {
        c.mode = FailLogMode::Full;
        c.rows_per_sec = 50;
        c.burst = 100;
        c.flush_interval = Dur::millis(100);
    });
    let opened = Instant::now();
    let (log, handle, path) = open(dir.path(), &cfg);

    let started = Instant::now();
    let tasks: Vec<_> = (0..CAMPAIGNS)
        .map(|c| {
            let log = log.clone();
            tokio::spawn(async move {
                let name = format!("campaign-{c}");
                for i in 0..PER_CAMPAIGN {
                    log.record(ev(&name, i, "550 5.1.2 Recipient domain does not exist"));
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let recording = started.elapsed();
    let c = tokio::task::spawn_blocking(move || finish(log, handle))
        .await
        .unwrap();
    let elapsed = opened.elapsed().as_secs_f64();

    let total = (CAMPAIGNS * PER_CAMPAIGN) as i64;
    assert_eq!(c.recorded, total as u64);
    assert_eq!(
        stats_sum(&path),
        total,
        "every failure counted exactly once"
    );
    let conn = Connection::open(&path).unwrap();
    let mut per_campaign = conn
        .prepare("SELECT campaign, sum(count) FROM failure_stats GROUP BY campaign")
        .unwrap();
    let per_campaign: Vec<(String, i64)> = per_campaign
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(per_campaign.len(), CAMPAIGNS);
    assert!(
        per_campaign.iter().all(|(_, n)| *n == PER_CAMPAIGN as i64),
        "{per_campaign:?}"
    );
    for reason in REASONS {
        let n: i64 = conn
            .query_row(
                "SELECT sum(count) FROM failure_stats WHERE reason = ?1",
                [reason.as_str()],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, total / REASONS.len() as i64, "{reason}");
    }

    // Rows are bounded by the governor's budget, not by the volume.
    let written = rows(&path);
    let budget_per_campaign = 100.0 + 50.0 * elapsed + 2.0;
    assert!(
        written as f64 <= CAMPAIGNS as f64 * budget_per_campaign,
        "{written} rows in {elapsed:.2}s"
    );
    assert!(
        written >= (CAMPAIGNS * 100) as i64,
        "each campaign gets at least its burst"
    );
    assert_eq!(written as u64, c.rows_written);
    assert_eq!(c.queued, c.rows_written + c.lost_rows);
    assert_eq!(c.queued + c.suppressed + c.dropped, total as u64);
    assert_eq!(
        (c.failed_transactions, c.lost_rows, c.lost_aggregates),
        (0, 0, 0)
    );
    // Group commit: one transaction per tick, not per failure.
    assert!(
        (c.transactions as f64) <= elapsed / 0.1 + 5.0,
        "{} transactions in {elapsed:.2}s",
        c.transactions
    );
    let max_rows_per_minute = scalar(
        &path,
        "SELECT max(n) FROM (SELECT count(*) AS n FROM failure_stats GROUP BY minute)",
    );
    assert!(max_rows_per_minute <= (CAMPAIGNS * REASONS.len()) as i64);
    eprintln!(
        "flood: {total} events recorded in {:.1} ms ({:.0} events/s), {written} event rows, \
         {} aggregate rows, {} transactions, {} suppressed, {:.2}s open-to-join",
        recording.as_secs_f64() * 1000.0,
        total as f64 / recording.as_secs_f64(),
        scalar(&path, "SELECT count(*) FROM failure_stats"),
        c.transactions,
        c.suppressed,
        elapsed,
    );
}

#[test]
fn mode_switches_apply_to_the_next_record() {
    let dir = tempfile::tempdir().unwrap();
    let (log, handle, path) = open(dir.path(), &config(|_| {}));
    let base = log.settings();
    assert_eq!(base.mode, FailLogMode::Full);
    let phases = [
        ("full-1", FailLogMode::Full),
        ("aggregate", FailLogMode::Aggregate),
        ("off", FailLogMode::Off),
        ("full-2", FailLogMode::Full),
    ];
    for (phase, mode) in phases {
        log.set_settings(FailLogSettings { mode, ..base });
        assert_eq!(log.settings().mode, mode);
        for i in 0..100 {
            log.record(ev("c", i, phase));
        }
    }
    let json = serde_json::to_value(log.settings()).unwrap();
    assert_eq!(json["mode"], "full");
    let c = finish(log, handle);

    let conn = Connection::open(&path).unwrap();
    let rows_of = |phase: &str| -> i64 {
        conn.query_row(
            "SELECT count(*) FROM failures WHERE detail = ?1",
            [phase],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(rows_of("full-1"), 100);
    assert_eq!(
        rows_of("aggregate"),
        0,
        "aggregate mode writes no event rows"
    );
    assert_eq!(rows_of("off"), 0, "off writes nothing");
    assert_eq!(rows_of("full-2"), 100, "back to full, rows again");
    assert_eq!(
        stats_sum(&path),
        300,
        "off is not counted in the aggregates"
    );
    assert_eq!((c.recorded, c.off_skipped), (300, 100));
}

#[test]
fn sampled_keeps_exactly_one_in_n_per_campaign() {
    const N: usize = 7;
    const EACH: usize = 1_000;
    let dir = tempfile::tempdir().unwrap();
    let (log, handle, path) = open(
        dir.path(),
        &config(|c| {
            c.mode = FailLogMode::Sampled;
            c.sample_rate = N as u32;
        }),
    );
    for i in 0..EACH {
        for campaign in ["a", "b", "c"] {
            log.record(ev(campaign, i, &i.to_string()));
        }
    }
    let counters = log.counters();
    // Dropping every handle (instead of close) also ends the writer after a final flush.
    drop(log);
    handle.join().unwrap();

    let kept = EACH.div_ceil(N);
    let conn = Connection::open(&path).unwrap();
    for campaign in ["a", "b", "c"] {
        let mut stmt = conn
            .prepare("SELECT detail FROM failures WHERE campaign = ?1 ORDER BY id")
            .unwrap();
        let indices: Vec<usize> = stmt
            .query_map([campaign], |r| r.get::<_, String>(0))
            .unwrap()
            .map(|d| d.unwrap().parse().unwrap())
            .collect();
        let expected: Vec<usize> = (0..EACH).step_by(N).collect();
        assert_eq!(indices.len(), kept);
        assert_eq!(indices, expected, "the 1st, (N+1)th, ... of {campaign}");
    }
    assert_eq!(counters.sampled_out, (3 * (EACH - kept)) as u64);
    assert_eq!(stats_sum(&path), (3 * EACH) as i64);
}

#[test]
fn locked_database_never_blocks_record_and_aggregates_catch_up() {
    const EVENTS: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let (log, handle, path) = open(
        dir.path(),
        &config(|c| {
            c.batch_rows = 100;
            c.channel_capacity = 1_000;
        }),
    );
    // Another process holds the write lock on failures.db.
    let other = Connection::open(&path).unwrap();
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();

    for i in 0..EVENTS {
        log.record(ev(&format!("c{}", i % 4), i, "550 5.1.2"));
    }
    // Every record() returned while the lock is still held; the writer's failures are
    // counted, not felt.
    wait_until("a failed transaction", || {
        log.counters().failed_transactions > 0
    });
    assert!(
        !other.is_autocommit(),
        "the other process still holds its lock"
    );
    assert_eq!(log.counters().recorded, EVENTS as u64);
    other.execute_batch("ROLLBACK").unwrap();

    // Once released, the merged-back aggregates reach the file (before shutdown, too).
    wait_until("aggregates written after release", || {
        stats_sum(&path) == EVENTS as i64
    });
    let c = finish(log, handle);
    assert_eq!(
        stats_sum(&path),
        EVENTS as i64,
        "exact: merged back, never doubled"
    );
    assert!(
        c.lost_rows > 0,
        "rows of the failed transactions are lost and counted"
    );
    assert_eq!(rows(&path) as u64, c.rows_written);
    assert_eq!(c.queued, c.rows_written + c.lost_rows);
    assert_eq!(c.queued + c.dropped + c.suppressed, EVENTS as u64);
    assert_eq!(c.lost_aggregates, 0);
}

#[test]
fn full_file_loses_rows_but_keeps_counting() {
    const EVENTS: usize = 600;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("failures.db");
    let cfg = config(|c| c.batch_rows = 20);
    let (log, handle) = FailLog::open_with_limits(
        &path,
        &cfg,
        FailLogLimits { max_size_mb: 1 },
        Arc::new(SystemClock),
    )
    .unwrap();
    // About a page per row: a 1 MiB file is full after ~250 of them.
    let detail = "x".repeat(3_000);
    let at_ms = SystemClock.now_ms();
    for i in 0..EVENTS {
        let mut e = ev("c", 0, &detail);
        e.recipient = format!("user{i}@nx.test");
        e.at_ms = at_ms;
        log.record(e);
    }
    let c = finish(log, handle);
    assert!(c.failed_transactions > 0, "{c:?}");
    assert!(c.lost_rows > 0);
    assert_eq!(rows(&path) as u64, c.rows_written);
    assert_eq!(c.queued, c.rows_written + c.lost_rows);
    assert_eq!(
        stats_sum(&path),
        EVENTS as i64,
        "aggregates still exact on a full file"
    );
    assert_eq!(c.lost_aggregates, 0);
}

#[test]
fn channel_overflow_drops_rows_not_counts() {
    const EVENTS: usize = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let (log, handle, path) = open(
        dir.path(),
        &config(|c| {
            c.channel_capacity = 8;
            c.batch_rows = 4;
        }),
    );
    // A slow database (here: locked elsewhere) keeps the writer busy while the burst lands.
    let other = Connection::open(&path).unwrap();
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();
    for i in 0..EVENTS {
        log.record(ev("c", i, "550"));
    }
    other.execute_batch("ROLLBACK").unwrap();
    let c = finish(log, handle);
    assert!(c.dropped > 0, "{c:?}");
    assert_eq!(c.queued + c.dropped + c.suppressed, EVENTS as u64);
    assert_eq!(c.queued, c.rows_written + c.lost_rows);
    assert_eq!(
        stats_sum(&path),
        EVENTS as i64,
        "dropped rows are still counted"
    );
}

#[test]
fn retention_bounds_rows_and_stats() {
    let dir = tempfile::tempdir().unwrap();
    let (log, handle, path) = open(
        dir.path(),
        &config(|c| {
            c.retention = Dur::secs(3_600);
            c.max_rows = 50;
            c.stats_retention = Dur::secs(86_400);
        }),
    );
    let now = SystemClock.now_ms();
    let aged = |age_ms: i64, n: usize, detail: &str| {
        for i in 0..n {
            let mut e = ev("c", 0, detail);
            e.recipient = format!("{detail}{i}@nx.test");
            e.at_ms = now - age_ms;
            log.record(e);
        }
    };
    aged(2 * 86_400_000, 10, "two-days");
    aged(2 * 3_600_000, 30, "two-hours");
    aged(0, 100, "now");
    wait_until("rows written", || log.counters().rows_written == 140);
    let before = log.counters().prune_runs;
    log.prune_now();
    wait_until("a retention pass", || log.counters().prune_runs > before);
    let c = finish(log, handle);

    assert_eq!(rows(&path), 50, "bounded by max_rows");
    assert_eq!(
        scalar(&path, "SELECT count(*) FROM failures WHERE detail <> 'now'"),
        0,
        "rows past retention are gone"
    );
    assert_eq!(
        scalar(&path, "SELECT min(id) FROM failures"),
        scalar(&path, "SELECT max(id) FROM failures") - 49,
        "the newest rows are the ones kept"
    );
    assert_eq!(
        stats_sum(&path),
        130,
        "aggregates older than stats_retention are gone"
    );
    assert_eq!((c.pruned_rows, c.pruned_stats), (90, 1));
}

#[tokio::test]
async fn admin_reads_page_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let (log, handle, _path) = open(dir.path(), &config(|_| {}));
    for i in 0..25 {
        log.record(ev("a", i, &format!("a{i}")));
    }
    let mut unattributed = ev("-", 0, "none");
    unattributed.campaign = None;
    log.record(unattributed);
    let log2 = log.clone();
    let c = tokio::task::spawn_blocking(move || finish(log2, handle))
        .await
        .unwrap();
    assert_eq!(c.rows_written, 26);

    let page = |before_id| FailureQuery {
        campaign: Some("a".into()),
        before_id,
        limit: 10,
        ..FailureQuery::default()
    };
    let first = log.failures(page(None)).await.unwrap();
    assert_eq!(first.len(), 10);
    assert_eq!(first[0].detail, "a24", "newest first");
    let second = log.failures(page(Some(first[9].id))).await.unwrap();
    assert_eq!(second[0].detail, "a14");
    assert!(second.iter().all(|r| r.id < first[9].id));

    let nulls = log
        .failures(FailureQuery {
            reason: Some(Reason::NoSuchDomain),
            limit: 100,
            ..FailureQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(nulls.len(), 8, "a0, a4, ... a24 and the unattributed one");
    assert!(nulls.iter().any(|r| r.campaign == "-"));
    let json = serde_json::to_value(&nulls[0]).unwrap();
    assert_eq!(json["reason"], "no_such_domain");
    assert_eq!(json["stage"], "intake");

    let stats = log.stats(0).await.unwrap();
    assert_eq!(stats.iter().map(|s| s.count).sum::<u64>(), 26);
    assert!(stats.iter().any(|s| s.campaign == "-" && s.count == 1));
}

//! The failure log's single writer thread: collects event rows from the channel, and at
//! each tick (or when a batch is full) writes them with the aggregate upserts in ONE
//! transaction; runs retention between flushes. A failed write is counted, never retried
//! into a stall, and never felt by `record`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use rusqlite::ffi::ErrorCode;

use super::{AggKey, FailureEvent, Msg, Shared, store};
use crate::config::FailLogConfig;

/// Longest flush tick honoured: aggregates wait in memory at most this long.
const MAX_FLUSH_INTERVAL: Duration = Duration::from_secs(3600);
/// Retention runs at most this often, unless asked (`prune_now`) or unfinished.
const PRUNE_EVERY: Duration = Duration::from_secs(30);
/// One retention pass stops after this, so that flushing resumes promptly.
const PRUNE_BUDGET: Duration = Duration::from_millis(200);
/// At most one warning of each kind per this long, carrying how many it stands for.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// The write rate reported to the guard is measured over this window.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// At shutdown the final flush is retried this many times (a lock held elsewhere may be
/// released) before its counts are given up.
const FINAL_ATTEMPTS: u32 = 5;
const FINAL_PAUSE: Duration = Duration::from_millis(100);

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn kind(e: &rusqlite::Error) -> &'static str {
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => "full",
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => "busy",
        Some(ErrorCode::SystemIoFailure) => "io",
        _ => "other",
    }
}

/// Lets one log line through per period and counts the ones it held back.
struct Throttle {
    last: Option<Instant>,
    held: u64,
}

impl Throttle {
    fn new() -> Throttle {
        Throttle {
            last: None,
            held: 0,
        }
    }

    /// `Some(n)` when a line may be logged now, standing for `n` occurrences.
    fn ready(&mut self, now: Instant) -> Option<u64> {
        self.held += 1;
        match self.last {
            Some(t) if now.duration_since(t) < WARN_EVERY => None,
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held))
            }
        }
    }
}

pub(super) struct Writer {
    conn: Connection,
    rx: Receiver<Msg>,
    shared: Arc<Shared>,
    batch_rows: usize,
    flush_every: Duration,
    retention: Duration,
    max_rows: u64,
    stats_retention: Duration,
    /// The config the fields above were taken from.
    tuned: Arc<FailLogConfig>,
    rows: Vec<FailureEvent>,
    write_warn: Throttle,
    drop_warn: Throttle,
    dropped_seen: u64,
    rate_window: VecDeque<(Instant, u64)>,
}

impl Writer {
    pub(super) fn new(conn: Connection, rx: Receiver<Msg>, shared: Arc<Shared>) -> Writer {
        let config = shared.config.load_full();
        let mut writer = Writer {
            conn,
            rx,
            shared,
            batch_rows: 1,
            flush_every: MAX_FLUSH_INTERVAL,
            retention: Duration::ZERO,
            max_rows: 0,
            stats_retention: Duration::ZERO,
            tuned: config.clone(),
            rows: Vec::new(),
            write_warn: Throttle::new(),
            drop_warn: Throttle::new(),
            dropped_seen: 0,
            rate_window: VecDeque::new(),
        };
        writer.tune(&config);
        writer
    }

    fn tune(&mut self, config: &FailLogConfig) {
        self.batch_rows = config.batch_rows.max(1);
        // A zero interval would spin, and an absurd one would overflow `Instant`
        // arithmetic; neither bound is anywhere near a useful tick.
        self.flush_every = config
            .flush_interval
            .0
            .clamp(Duration::from_millis(1), MAX_FLUSH_INTERVAL);
        self.retention = config.retention.0;
        self.max_rows = config.max_rows;
        self.stats_retention = config.stats_retention.0;
    }

    /// Picks up a reloaded config; true when the flush interval changed.
    fn retune(&mut self) -> bool {
        let config = self.shared.config.load_full();
        if Arc::ptr_eq(&config, &self.tuned) {
            return false;
        }
        let before = self.flush_every;
        self.tune(&config);
        self.tuned = config;
        before != self.flush_every
    }

    pub(super) fn run(mut self) {
        let mut next_flush = self.shared.clock.now_instant() + self.flush_every;
        let mut next_prune = self.shared.clock.now_instant() + PRUNE_EVERY;
        loop {
            let wait = next_flush
                .min(next_prune)
                .saturating_duration_since(self.shared.clock.now_instant());
            match self.rx.recv_timeout(wait) {
                Ok(msg) => {
                    self.take(msg);
                    while self.rows.len() < self.batch_rows {
                        match self.rx.try_recv() {
                            Ok(msg) => self.take(msg),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if self.shared.closed.load(Ordering::Acquire) {
                break;
            }
            let now = self.shared.clock.now_instant();
            if self.retune() {
                next_flush = next_flush.min(now + self.flush_every);
            }
            let prune = self.shared.prune_requested.swap(false, Ordering::AcqRel);
            if self.rows.len() >= self.batch_rows || now >= next_flush || prune {
                self.flush();
                next_flush = now + self.flush_every;
            }
            if prune || now >= next_prune {
                let unfinished = self.prune();
                next_prune = now
                    + if unfinished {
                        self.flush_every
                    } else {
                        PRUNE_EVERY
                    };
            }
        }
        self.finish();
    }

    fn take(&mut self, msg: Msg) {
        if let Msg::Row(ev) = msg {
            self.rows.push(ev);
        }
    }

    /// One transaction with the waiting rows and every aggregate counted since the last
    /// flush. On failure the rows are lost (counted) and the aggregates go back into the
    /// tally, so that the next flush writes them: counts are never lost nor doubled.
    fn flush(&mut self) {
        let c = &self.shared.counters;
        let aggs = self.shared.tally.take();
        if !self.rows.is_empty() || !aggs.is_empty() {
            let n = self.rows.len() as u64;
            match store::write_batch(&mut self.conn, &self.rows, &aggs) {
                Ok(()) => {
                    add(&c.transactions, 1);
                    add(&c.rows_written, n);
                }
                Err(e) => {
                    add(&c.failed_transactions, 1);
                    add(&c.lost_rows, n);
                    let full = kind(&e) == "full";
                    self.warn_failed(&e, n);
                    // A full file refuses new rows but usually still takes updates of the
                    // aggregate rows it already holds: keep the counts flowing.
                    if full && n > 0 && !aggs.is_empty() {
                        self.write_aggregates(aggs);
                    } else {
                        self.shared.tally.merge(aggs);
                    }
                }
            }
            self.rows.clear();
        }
        self.warn_dropped();
        self.update_rate();
    }

    fn write_aggregates(&mut self, aggs: Vec<(AggKey, u64)>) {
        let c = &self.shared.counters;
        match store::write_batch(&mut self.conn, &[], &aggs) {
            Ok(()) => add(&c.transactions, 1),
            Err(e) => {
                add(&c.failed_transactions, 1);
                self.warn_failed(&e, 0);
                self.shared.tally.merge(aggs);
            }
        }
    }

    fn warn_failed(&mut self, e: &rusqlite::Error, rows: u64) {
        if let Some(failures) = self.write_warn.ready(self.shared.clock.now_instant()) {
            let lost_rows = self.shared.counters.lost_rows.load(Ordering::Relaxed);
            tracing::warn!(
                error = %e,
                kind = kind(e),
                rows,
                failures,
                lost_rows,
                "failures.db write failed; aggregates kept for the next flush"
            );
        }
    }

    fn warn_dropped(&mut self) {
        let dropped = self.shared.counters.dropped.load(Ordering::Relaxed);
        if dropped > self.dropped_seen
            && self
                .drop_warn
                .ready(self.shared.clock.now_instant())
                .is_some()
        {
            tracing::warn!(
                dropped = dropped - self.dropped_seen,
                total = dropped,
                "failure log channel full; event rows dropped (aggregates kept)"
            );
            self.dropped_seen = dropped;
        }
    }

    fn update_rate(&mut self) {
        let now = self.shared.clock.now_instant();
        let written = self.shared.counters.rows_written.load(Ordering::Relaxed);
        self.rate_window.push_back((now, written));
        while self.rate_window.len() > 2
            && self
                .rate_window
                .get(1)
                .is_some_and(|(t, _)| now.duration_since(*t) >= RATE_WINDOW)
        {
            self.rate_window.pop_front();
        }
        let rate = match self.rate_window.front() {
            Some((t, w)) if now > *t => (written - w) as f64 / now.duration_since(*t).as_secs_f64(),
            _ => 0.0,
        };
        self.shared
            .counters
            .rows_per_sec
            .store(rate.to_bits(), Ordering::Relaxed);
    }

    /// Returns whether the pass ran out of time (so the next one comes soon).
    fn prune(&mut self) -> bool {
        let c = &self.shared.counters;
        // Forget governor cells of campaigns that have been quiet long enough to be back
        // at a full burst: keeps its memory bounded by recently active campaigns.
        if let Some(limiter) = &self.shared.gate.load().limiter {
            limiter.retain_recent();
        }
        let now_ms = self.shared.clock.now_ms();
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let rows_before = now_ms.saturating_sub(ms(self.retention));
        let stats_before = now_ms
            .saturating_sub(ms(self.stats_retention))
            .div_euclid(60_000);
        let result = store::prune(
            &self.conn,
            rows_before,
            self.max_rows,
            stats_before,
            PRUNE_BUDGET,
        );
        add(&c.prune_runs, 1);
        match result {
            Ok(p) => {
                add(&c.pruned_rows, p.rows);
                add(&c.pruned_stats, p.stats);
                if p.rows + p.stats > 0 {
                    tracing::debug!(
                        rows = p.rows,
                        stats = p.stats,
                        unfinished = p.unfinished,
                        "failure log pruned"
                    );
                }
                p.unfinished
            }
            Err(e) => {
                self.warn_failed(&e, 0);
                false
            }
        }
    }

    /// The last flush. `closed` is set first, so that `record` stops counting before the
    /// tally is taken (it checks under the same shard lock): the final counts are exact.
    fn finish(mut self) {
        self.shared.closed.store(true, Ordering::Release);
        let mut aggs = self.shared.tally.take();
        // Rows sent before close; anything sent later is dropped with the receiver.
        while let Ok(msg) = self.rx.try_recv() {
            self.take(msg);
        }
        let c = &self.shared.counters;
        let mut rows = std::mem::take(&mut self.rows);
        for attempt in 1..=FINAL_ATTEMPTS {
            if rows.is_empty() && aggs.is_empty() {
                break;
            }
            match store::write_batch(&mut self.conn, &rows, &aggs) {
                Ok(()) => {
                    add(&c.transactions, 1);
                    add(&c.rows_written, rows.len() as u64);
                    rows.clear();
                    aggs.clear();
                }
                Err(e) => {
                    add(&c.failed_transactions, 1);
                    tracing::warn!(error = %e, kind = kind(&e), attempt, rows = rows.len(), "failure log final flush failed");
                    if kind(&e) == "full" {
                        add(&c.lost_rows, rows.len() as u64);
                        rows.clear();
                    }
                    if attempt < FINAL_ATTEMPTS {
                        std::thread::sleep(FINAL_PAUSE);
                    }
                }
            }
        }
        if !rows.is_empty() || !aggs.is_empty() {
            let lost: u64 = aggs.iter().map(|(_, n)| n).sum();
            add(&c.lost_rows, rows.len() as u64);
            add(&c.lost_aggregates, lost);
            tracing::warn!(
                rows = rows.len(),
                aggregates = lost,
                "failure log gave up its final flush"
            );
        }
        tracing::debug!("failure log writer stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::config::FailLogMode;
    use crate::reason::{Reason, Stage};

    fn writer(conn: Connection) -> Writer {
        let config = FailLogConfig {
            mode: FailLogMode::Full,
            sample_rate: 1,
            rows_per_sec: 1000,
            burst: 1000,
            ..FailLogConfig::default()
        };
        let shared = Arc::new(Shared::new("unused".into(), Arc::new(SystemClock), &config));
        let (_tx, rx) = std::sync::mpsc::sync_channel(8);
        Writer::new(conn, rx, shared)
    }

    fn ev(i: i64) -> FailureEvent {
        FailureEvent {
            at_ms: 60_000 * (i % 2),
            campaign: Some("c".into()),
            stage: Stage::Relay,
            reason: Reason::Rejected,
            class: None,
            recipient: format!("{i}@x.test"),
            detail: "550 no".into(),
        }
    }

    fn stats_sum(conn: &Connection) -> i64 {
        conn.query_row(
            "SELECT coalesce(sum(count), 0) FROM failure_stats",
            [],
            |r| r.get(0),
        )
        .unwrap()
    }

    #[test]
    fn failed_flush_merges_aggregates_back_and_counts_lost_rows() {
        let conn = Connection::open_in_memory().unwrap();
        store::migrate(&conn).unwrap();
        let mut w = writer(conn);
        for i in 0..5 {
            let e = ev(i);
            w.shared.tally.count(&e, || false);
            w.rows.push(e);
        }
        // Make the upsert fail mid-transaction, after the rows were inserted.
        w.conn
            .execute_batch("ALTER TABLE failure_stats RENAME TO hidden")
            .unwrap();
        w.flush();
        let c = &w.shared.counters;
        assert_eq!(c.failed_transactions.load(Ordering::Relaxed), 1);
        assert_eq!(c.lost_rows.load(Ordering::Relaxed), 5);
        assert_eq!(w.shared.tally.pending_keys(), 2, "both minutes merged back");
        w.conn
            .execute_batch("ALTER TABLE hidden RENAME TO failure_stats")
            .unwrap();
        let rows: i64 = w
            .conn
            .query_row("SELECT count(*) FROM failures", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0, "the failed transaction's rows rolled back");

        w.shared.tally.count(&ev(7), || false);
        w.flush();
        assert_eq!(stats_sum(&w.conn), 6, "5 merged back + 1 new, written once");
        assert_eq!(w.shared.counters.transactions.load(Ordering::Relaxed), 1);
        assert_eq!(w.shared.tally.pending_keys(), 0);
        w.flush();
        assert_eq!(stats_sum(&w.conn), 6, "an empty flush writes nothing");
        assert_eq!(w.shared.counters.transactions.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn throttle_lets_one_line_through_per_period() {
        let mut t = Throttle::new();
        let t0 = Instant::now();
        assert_eq!(t.ready(t0), Some(1));
        assert_eq!(t.ready(t0 + Duration::from_secs(1)), None);
        assert_eq!(t.ready(t0 + Duration::from_secs(2)), None);
        assert_eq!(t.ready(t0 + WARN_EVERY), Some(3));
    }
}

//! The scheduler decides *when*: one task claims due recipients in batches under a lease,
//! groups them per message and destination, and hands them to lanes. A lane per
//! destination decides *how fast*: its governor rate and concurrency cap, under a global
//! cap. Outcomes go back to the queue in batches, with retries on the backoff schedule.
//! Permanent failures are notified to the sender (`bounce`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::{DefaultDirectRateLimiter, RateLimiter};
use parking_lot::Mutex;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bounce::{BounceClass, Classifier};
use crate::campaign::Campaigns;
use crate::cluster::Cluster;
use crate::config::{Config, DeliveryConfig, Rate, Transport};
use crate::deliver::{Courier, Destination, Enhanced, FailureSink, Job, Outcome, Reply};
use crate::dkim::Signing;
use crate::queue::{Claimed, Queue, QueueId, Target, Update};
use crate::reason::Reason;

pub(crate) mod bounce;
pub mod outcome_log;
pub mod suspend;

use outcome_log::{Kind, OutcomeLog};
use suspend::{Gate, Recorded, Suspensions};

/// Longest sleep between two passes. Everything that makes work due at once rings
/// `wake` (intake, resume, release, a lane with room again, a reload; tests after moving
/// their clock), and otherwise the sleep runs until `next_due`. The cap remains for what
/// nothing rings: `next_due` counts only scheduled rows, so a lease that expires (a
/// delivery abandoned by a stopped scheduler) or a campaign block that lapses is only
/// seen by the next pass; and due times are wall-clock while the sleep is monotonic, so
/// a stepped wall clock (NTP, a resumed VM) is caught up within it.
const MAX_IDLE: Duration = Duration::from_secs(1);

/// When the last claim that skipped full lanes' domains ran, and whether it found any.
///
/// Such a claim walks every due row of the skipped domains to reach the others': 330 ms
/// for 370,000 rows of a batch to one destination, against 4 ms for a claim that skips
/// none. Its lane refills 500 jobs at a time, so a claim ran while it was full once per
/// refill, and that walk was most of the queue writer's time. A claim that skips and
/// finds nothing therefore waits `MAX_IDLE` before the next one: other domains' mail
/// waits at most that long behind a full lane, and a lane with room claims at once.
#[derive(Default)]
struct SkipClaims {
    last: Option<std::time::Instant>,
    found: bool,
}

impl SkipClaims {
    fn allowed(&self) -> bool {
        self.found || self.last.is_none_or(|t| t.elapsed() >= MAX_IDLE)
    }

    fn ran(&mut self, claimed: usize) {
        self.last = Some(std::time::Instant::now());
        self.found = claimed > 0;
    }
}

#[derive(Default)]
struct Passes {
    started: AtomicU64,
    finished: AtomicU64,
}

/// A snapshot of the scheduler's counters (see [`Scheduler::progress`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub passes_started: u64,
    pub passes_finished: u64,
    /// Recipients' jobs queued in lanes or being delivered.
    pub in_flight: usize,
}

/// The couriers by transport, and the bounce rules that read their replies (swapped
/// whole by a reload).
pub struct Couriers {
    pub smtp: Arc<dyn Courier>,
    pub webhook: Arc<dyn Courier>,
    /// Renders each batch recipient's message before its courier takes it.
    pub render: Arc<dyn Render>,
    pub rules: Arc<ArcSwap<Classifier>>,
}

/// The wait before retry number `attempt` (1-based): the schedule's entry, the last one
/// repeating, plus up to 10% jitter so retries of a burst do not arrive as a burst.
pub fn backoff(schedule: &[Duration], attempt: u32, jitter: f64) -> Duration {
    let base = schedule[(attempt.max(1) as usize - 1).min(schedule.len() - 1)];
    base + base.mul_f64(jitter.clamp(0.0, 1.0) * 0.1)
}

struct Lane {
    /// The destination's key (its rate's name, and its shared bucket in cluster mode).
    key: String,
    jobs: Mutex<VecDeque<Job>>,
    /// Replaced when a reload changes the destination's rate; `changed` wakes a lane
    /// waiting on the old one.
    limiter: ArcSwap<DefaultDirectRateLimiter>,
    rate: Mutex<Rate>,
    changed: Notify,
    concurrency: Arc<Semaphore>,
    /// The concurrency the semaphore currently stands for.
    concurrency_cap: AtomicUsize,
    running: Mutex<bool>,
    backlog: AtomicUsize,
    cap: AtomicUsize,
}

impl Lane {
    fn new(delivery: &DeliveryConfig, key: &str) -> Lane {
        let rate = delivery.rate_for(key);
        Lane {
            key: key.to_owned(),
            jobs: Mutex::default(),
            limiter: ArcSwap::from_pointee(RateLimiter::direct(rate.quota())),
            rate: Mutex::new(rate),
            changed: Notify::new(),
            concurrency: Arc::new(Semaphore::new(delivery.concurrency)),
            concurrency_cap: AtomicUsize::new(delivery.concurrency),
            running: Mutex::new(false),
            backlog: AtomicUsize::new(0),
            cap: AtomicUsize::new(backlog_cap(delivery, rate)),
        }
    }

    /// Applies the destination's rate and concurrency from a reloaded config.
    fn reconfigure(&self, delivery: &DeliveryConfig, key: &str) {
        let rate = delivery.rate_for(key);
        let mut current = self.rate.lock();
        if *current != rate {
            *current = rate;
            self.limiter
                .store(Arc::new(RateLimiter::direct(rate.quota())));
            self.changed.notify_waiters();
        }
        self.cap
            .store(backlog_cap(delivery, rate), Ordering::Relaxed);
        resize(
            &self.concurrency,
            &self.concurrency_cap,
            delivery.concurrency,
        );
    }

    /// Waits for the lane's rate to allow one more transaction, following a reload
    /// that swaps the limiter while it waits; in cluster mode then for the cluster's
    /// share of it too.
    async fn rate_ready(&self, cluster: Option<&Cluster>) {
        self.local_rate_ready().await;
        if let Some(cluster) = cluster {
            let rate = *self.rate.lock();
            cluster
                .pace(&self.key, rate, self.backlog.load(Ordering::Relaxed))
                .await;
        }
    }

    async fn local_rate_ready(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let limiter = self.limiter.load_full();
            tokio::select! {
                r = limiter.until_n_ready(NonZeroU32::MIN) => {
                    r.expect("one cell fits any quota");
                    return;
                }
                () = changed => {}
            }
        }
    }
}

/// Enough work to keep a lane busy for about 30 s, so that nothing claimed waits anywhere
/// near its lease.
fn backlog_cap(delivery: &DeliveryConfig, rate: Rate) -> usize {
    let per_sec = (rate.count as f64 / rate.per.as_secs_f64()).ceil() as usize;
    (per_sec * 30).clamp(delivery.concurrency * 2, delivery.batch.max(1))
}

/// Makes `sem` stand for `to` permits: adds the difference, or takes it out of
/// circulation as permits come back (transactions under way finish undisturbed).
fn resize(sem: &Arc<Semaphore>, cap: &AtomicUsize, to: usize) {
    let from = cap.swap(to, Ordering::AcqRel);
    if to > from {
        sem.add_permits(to - from);
    } else if to < from {
        let sem = sem.clone();
        let n = u32::try_from(from - to).unwrap_or(u32::MAX);
        tokio::spawn(async move {
            if let Ok(permits) = sem.acquire_many_owned(n).await {
                permits.forget();
            }
        });
    }
}

/// Renders a batch recipient's message when it is delivered: the template is stored
/// once per batch, and the door that compiled it renders it (the HTTP API builds the
/// MIME); the scheduler signs the result like any message.
pub trait Render: Send + Sync {
    fn render<'a>(
        &'a self,
        r: &'a Claimed,
    ) -> crate::future::BoxFuture<'a, Result<Vec<u8>, RenderFailure>>;
}

/// Why a batch recipient's message was not rendered.
#[derive(Debug, Clone)]
pub enum RenderFailure {
    /// The template does not render with this recipient's variables (an undefined
    /// variable in a strict batch, a header value with a line break): a permanent
    /// failure of class `template`.
    Template(String),
    /// The batch could not be read now: tried again after the lease.
    Unavailable(String),
}

pub struct Scheduler {
    pub queue: Queue,
    pub config: Arc<ArcSwap<Config>>,
    pub campaigns: Arc<Campaigns>,
    pub couriers: Couriers,
    pub sink: Arc<dyn FailureSink>,
    /// Every outcome's log line, governed per campaign.
    pub outcomes: Arc<OutcomeLog>,
    /// Rung by intake after each enqueue and by operators' resume: work may be due.
    pub wake: Arc<Notify>,
    /// DKIM keys: the DSNs the scheduler writes are signed like every other message.
    signing: Arc<Signing>,
    /// Where canary probes' claim and hand-over times go (see `canary::Stamps`).
    canary: Arc<crate::canary::Stamps>,
    /// Destinations that cannot be reached, waiting for their probe.
    pub suspensions: Arc<Suspensions>,
    lanes: Mutex<HashMap<Destination, Arc<Lane>>>,
    global: Arc<Semaphore>,
    global_cap: AtomicUsize,
    in_flight: AtomicUsize,
    passes: Passes,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// Shares destination rates with the other nodes, when `[cluster]` is set.
    cluster: Option<Arc<Cluster>>,
}

impl Scheduler {
    pub fn new(
        queue: Queue,
        config: Arc<ArcSwap<Config>>,
        campaigns: Arc<Campaigns>,
        couriers: Couriers,
        sink: Arc<dyn FailureSink>,
        wake: Arc<Notify>,
        signing: Arc<Signing>,
    ) -> Scheduler {
        let max = config.load().delivery.max_concurrency;
        let outcomes = Arc::new(OutcomeLog::new(&config.load().log));
        let suspensions = Arc::new(Suspensions::new(queue.delays().clone()));
        Scheduler {
            queue,
            config,
            campaigns,
            couriers,
            sink,
            outcomes,
            wake,
            signing,
            canary: Arc::default(),
            suspensions,
            lanes: Mutex::default(),
            global: Arc::new(Semaphore::new(max)),
            global_cap: AtomicUsize::new(max),
            in_flight: AtomicUsize::new(0),
            passes: Passes::default(),
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            cluster: None,
        }
    }

    /// Paces every destination at its cluster-wide rate.
    pub fn with_cluster(mut self, cluster: Option<Arc<Cluster>>) -> Scheduler {
        self.cluster = cluster;
        self
    }

    /// Logs outcomes through `outcomes` (the daemon's, which outlives a scheduler that a
    /// reload stops and starts again) instead of a log of its own.
    pub fn with_outcomes(mut self, outcomes: Arc<OutcomeLog>) -> Scheduler {
        self.outcomes = outcomes;
        self
    }

    /// Stamps the claim and hand-over of canary probes into `stamps` (the daemon's
    /// canary's, which outlives a scheduler that a reload restarts).
    pub fn with_canary(mut self, stamps: Arc<crate::canary::Stamps>) -> Scheduler {
        self.canary = stamps;
        self
    }

    /// Keeps suspended destinations in `suspensions` (the daemon's, so that a reload's
    /// new scheduler does not forget them and `/metrics` counts on).
    pub fn with_suspensions(mut self, suspensions: Arc<Suspensions>) -> Scheduler {
        self.suspensions = suspensions;
        self
    }

    /// Stops claiming; lanes drop the jobs they have not started (they stay leased and
    /// are due again after a restart).
    pub fn stop(&self) {
        self.shutdown.cancel();
    }

    /// Applies `[delivery]` rates, concurrencies and the global cap from a reloaded
    /// config to the lanes already running; new lanes read the config when made.
    pub fn reconfigure(&self, delivery: &DeliveryConfig) {
        resize(&self.global, &self.global_cap, delivery.max_concurrency);
        for (dest, lane) in self.lanes.lock().iter() {
            lane.reconfigure(delivery, &dest.key);
        }
    }

    /// Runs until `shutdown`, then waits for deliveries under way to record their
    /// outcomes (anything not recorded stays leased and is retried after restart).
    /// Leases of an earlier process are released by whoever starts the daemon, once:
    /// a scheduler started again by a reload must not free its predecessor's leases.
    pub async fn run(self: Arc<Self>) {
        let shutdown = self.shutdown.clone();
        let mut skips = SkipClaims::default();
        while !shutdown.is_cancelled() {
            self.passes.started.fetch_add(1, Ordering::Relaxed);
            let claimed = self.pass(&mut skips).await;
            self.passes.finished.fetch_add(1, Ordering::Release);
            if claimed == 0 {
                let sleep = self.idle_time().await;
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep(sleep) => {}
                }
            }
        }
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Claim passes and deliveries under way, for whoever needs to know that the
    /// scheduler has looked at the queue since some moment (a test that moved its clock
    /// waits for a pass begun after that instead of sleeping).
    pub fn progress(&self) -> Progress {
        Progress {
            passes_started: self.passes.started.load(Ordering::Relaxed),
            passes_finished: self.passes.finished.load(Ordering::Acquire),
            in_flight: self.in_flight.load(Ordering::Acquire),
        }
    }

    async fn idle_time(&self) -> Duration {
        let now = self.queue.clock().now_ms();
        match self.queue.next_due().await {
            Ok(Some(due)) if due > now => Duration::from_millis((due - now) as u64).min(MAX_IDLE),
            _ => MAX_IDLE,
        }
    }

    /// One claim-and-dispatch pass; returns how many recipients it claimed.
    async fn pass(self: &Arc<Self>, skips: &mut SkipClaims) -> usize {
        let config = self.config.load_full();
        let delivery = &config.delivery;
        if self.in_flight.load(Ordering::Relaxed) >= delivery.max_concurrency * 4 {
            return 0;
        }
        let saturated = self.saturated_domains();
        let skipping = !saturated.is_empty();
        if skipping && !skips.allowed() {
            return 0;
        }
        let now = self.queue.clock().now_ms();
        let held: Vec<String> = self
            .campaigns
            .all()
            .into_iter()
            .filter(|c| c.is_paused())
            .map(|c| c.name.to_string())
            .collect();
        let claimed = match self
            .queue
            .claim(delivery.batch, config.queue.lease.0, held, saturated)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "claiming due recipients failed");
                return 0;
            }
        };
        let count = claimed.len();
        if skipping {
            skips.ran(count);
        }
        let claimed_at = self.queue.clock().now_ms();
        for r in claimed
            .iter()
            .filter(|r| crate::campaign::is_canary(r.campaign.as_deref()))
        {
            self.canary.claimed(&r.queue_id, claimed_at);
        }
        let mut no_route = Vec::new();
        for (dest, route_index, recipients) in group(&config, claimed, &mut no_route) {
            let route = config.routes[route_index].clone();
            let first = &recipients[0];
            let job = Job {
                message_id: first.message_id,
                queue_id: first.queue_id.clone(),
                sender: first.sender.clone(),
                smtputf8: first.smtputf8,
                body: Arc::new(Vec::new()),
                recipients,
                route,
                destination: dest.clone(),
            };
            self.enqueue_job(&config, dest, job);
        }
        if !no_route.is_empty() {
            let outcomes =
                vec![
                    Outcome::permanent(Reason::NoRoute, "550 5.7.1 no route for recipient domain");
                    no_route.len()
                ];
            self.finish(&config, &no_route, outcomes, now, None).await;
        }
        count
    }

    /// The domains of full lanes, each once: a full lane holds thousands of jobs of a
    /// handful of domains, so they are gathered borrowed and copied only once each.
    fn saturated_domains(&self) -> Vec<String> {
        let lanes = self.lanes.lock();
        let mut saturated = Vec::new();
        for lane in lanes.values() {
            if lane.backlog.load(Ordering::Relaxed) >= lane.cap.load(Ordering::Relaxed) {
                let jobs = lane.jobs.lock();
                let mut domains: HashSet<&str> = HashSet::new();
                for job in jobs.iter() {
                    domains.extend(job.recipients.iter().map(|r| r.domain.as_str()));
                }
                saturated.extend(domains.into_iter().map(str::to_owned));
            }
        }
        saturated.sort_unstable();
        saturated.dedup();
        saturated
    }

    fn lane(&self, delivery: &DeliveryConfig, dest: &Destination) -> Arc<Lane> {
        let mut lanes = self.lanes.lock();
        lanes
            .entry(dest.clone())
            .or_insert_with(|| Arc::new(Lane::new(delivery, &dest.key)))
            .clone()
    }

    fn enqueue_job(self: &Arc<Self>, config: &Config, dest: Destination, job: Job) {
        let lane = self.lane(&config.delivery, &dest);
        lane.backlog.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        lane.jobs.lock().push_back(job);
        let mut running = lane.running.lock();
        if !*running {
            *running = true;
            let this = self.clone();
            let lane = lane.clone();
            self.tracker
                .spawn(async move { this.drive_lane(lane).await });
        }
    }

    /// Feeds a lane's jobs to couriers at its rate and concurrency. Exits when the lane
    /// is empty; `enqueue_job` starts it again.
    async fn drive_lane(self: Arc<Self>, lane: Arc<Lane>) {
        loop {
            let job = {
                let mut running = lane.running.lock();
                let mut jobs = lane.jobs.lock();
                if self.shutdown.is_cancelled() {
                    let dropped = jobs.len();
                    jobs.clear();
                    lane.backlog.fetch_sub(dropped, Ordering::Relaxed);
                    self.in_flight.fetch_sub(dropped, Ordering::Relaxed);
                }
                match jobs.pop_front() {
                    Some(job) => job,
                    None => {
                        *running = false;
                        return;
                    }
                }
            };
            let now = self.queue.clock().now_ms();
            let schedule = schedule(&self.config.load().delivery);
            let gate = self.suspensions.gate(&job.destination, now, &schedule);
            if let Gate::Suspended { until_ms, reply } = gate {
                let this = self.clone();
                let lane_ref = lane.clone();
                self.tracker.spawn(async move {
                    this.defer_suspended(job, until_ms, &reply).await;
                    this.job_done(&lane_ref);
                });
                continue;
            }
            let ready = async {
                let local = lane.concurrency.clone().acquire_owned().await;
                let global = self.global.clone().acquire_owned().await;
                lane.rate_ready(self.cluster.as_deref()).await;
                (local, global)
            };
            let (local, global) = tokio::select! {
                permits = ready => permits,
                () = self.shutdown.cancelled() => {
                    lane.backlog.fetch_sub(1, Ordering::Relaxed);
                    self.in_flight.fetch_sub(1, Ordering::Relaxed);
                    continue;
                }
            };
            let (Ok(local), Ok(global)) = (local, global) else {
                return;
            };
            if gate == Gate::Probe {
                // Alone: the lane's other jobs wait for its answer, and follow it if the
                // destination is back or are deferred to the next probe if not.
                self.deliver(job).await;
                drop((local, global));
                self.job_done(&lane);
                continue;
            }
            let this = self.clone();
            let lane_ref = lane.clone();
            self.tracker.spawn(async move {
                this.deliver(job).await;
                drop((local, global));
                this.job_done(&lane_ref);
            });
        }
    }

    /// Counts a lane's job as finished (delivered, deferred or dropped).
    fn job_done(&self, lane: &Lane) {
        let backlog = lane.backlog.fetch_sub(1, Ordering::Relaxed);
        let in_flight = self.in_flight.fetch_sub(1, Ordering::Relaxed);
        // A lane or the whole scheduler that was full stopped claiming; now that there
        // is room, claim again at once rather than at the next idle tick.
        let global_cap = self.config.load().delivery.max_concurrency * 4;
        if backlog == lane.cap.load(Ordering::Relaxed) || in_flight == global_cap {
            self.wake.notify_one();
        }
    }

    /// A job for a suspended destination: deferred to its probe without a connection
    /// (like any deferral it counts as an attempt and can expire the recipient).
    async fn defer_suspended(&self, job: Job, until_ms: i64, reply: &str) {
        let config = self.config.load_full();
        let now = self.queue.clock().now_ms();
        self.suspensions.deferred(&job);
        let o = Outcome::Transient {
            reply: Reply::local(&format!(
                "451 4.4.1 delivery to {} suspended until its next probe; last: {reply}",
                job.destination.key
            )),
            retry_after: Some(Duration::from_millis((until_ms - now).max(0) as u64)),
        };
        let outcomes = vec![o; job.recipients.len()];
        // No body loaded: a notification (on expiry) reads it from the queue.
        self.finish(&config, &job.recipients, outcomes, now, None)
            .await;
    }

    /// Whether the destination took a connection: an unreachable one is suspended and
    /// its deferred recipients wait for the probe; one that answers again is resumed
    /// and its deferred recipients are due at once.
    fn reachability(&self, job: &Job, reached: bool, outcomes: &mut [Outcome], now: i64) {
        if reached && self.suspensions.count() == 0 {
            return;
        }
        let reply = match reached {
            true => String::new(),
            false => outcomes
                .first()
                .map(|o| o.reply().to_string())
                .unwrap_or_default(),
        };
        let schedule = schedule(&self.config.load().delivery);
        match self
            .suspensions
            .record(job, reached, &reply, now, &schedule)
        {
            Recorded::Up => {}
            Recorded::Suspended { until_ms } => {
                let wait = Duration::from_millis((until_ms - now).max(0) as u64);
                for o in outcomes {
                    if let Outcome::Transient { retry_after, .. } = o {
                        *retry_after = Some(retry_after.unwrap_or_default().max(wait));
                    }
                }
            }
            Recorded::Resumed { domains } => {
                let (queue, wake) = (self.queue.clone(), self.wake.clone());
                self.tracker.spawn(async move {
                    for d in domains {
                        if let Err(e) = queue.retry(Target::Domain(d)).await {
                            tracing::warn!(error = %e, "deferred recipients of a resumed destination wait for their retry");
                        }
                    }
                    wake.notify_one();
                });
            }
        }
    }

    async fn deliver(&self, mut job: Job) {
        let config = self.config.load_full();
        let started = self.queue.clock().now_ms();
        if job.recipients[0].vars.is_some() {
            return self.deliver_rendered(&config, job, started).await;
        }
        let body = match self.queue.body(job.message_id).await {
            Ok(Some(body)) => body,
            Ok(None) => {
                tracing::error!(queue_id = %job.queue_id, "message body missing; failing its recipients");
                let o = Outcome::permanent(Reason::Rejected, "554 5.3.0 message body lost");
                let outcomes = vec![o; job.recipients.len()];
                self.finish(&config, &job.recipients, outcomes, started, None)
                    .await;
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read message body; retrying after the lease");
                return;
            }
        };
        job.body = Arc::new(body);
        self.hand_over(&config, job).await;
    }

    /// A batch recipient (alone in its job): its message rendered from the batch's
    /// template and its variables, then signed, then handed to the courier.
    async fn deliver_rendered(&self, config: &Config, mut job: Job, started: i64) {
        match self.couriers.render.render(&job.recipients[0]).await {
            Ok(body) => {
                job.body = Arc::new(self.signing.sign(body).await);
                self.hand_over(config, job).await;
            }
            Err(RenderFailure::Template(why)) => {
                let o = Outcome::permanent(Reason::Template, format!("554 5.6.0 {why}"));
                self.finish(config, &job.recipients, vec![o], started, None)
                    .await;
            }
            Err(RenderFailure::Unavailable(why)) => {
                tracing::warn!(error = %why, "cannot render a batch message; retrying after the lease");
            }
        }
    }

    async fn hand_over(&self, config: &Config, job: Job) {
        let courier = match job.route.transport {
            Transport::Webhook => &self.couriers.webhook,
            _ => &self.couriers.smtp,
        };
        if crate::campaign::is_canary(job.recipients[0].campaign.as_deref()) {
            self.canary
                .handed(&job.queue_id, self.queue.clock().now_ms());
        }
        let attempt = courier.deliver(&job).await;
        let now = self.queue.clock().now_ms();
        let mut outcomes = attempt.outcomes;
        self.reachability(&job, attempt.reached, &mut outcomes, now);
        self.finish(config, &job.recipients, outcomes, now, Some(&job))
            .await;
    }

    /// Turns outcomes into queue updates and reports; sends a bounce when asked to.
    async fn finish(
        &self,
        config: &Config,
        recipients: &[Claimed],
        outcomes: Vec<Outcome>,
        now: i64,
        job: Option<&Job>,
    ) {
        let delivery = &config.delivery;
        let rules = self.couriers.rules.load();
        let mut updates = Vec::with_capacity(recipients.len());
        let mut failed = Vec::new();
        for (r, outcome) in recipients.iter().zip(outcomes) {
            let update = match outcome {
                Outcome::Delivered { reply } => {
                    self.outcomes
                        .record(&config.log, r, Kind::Delivered, None, &reply);
                    let reply = reply.to_string();
                    self.sink.relay_delivered(r, &reply);
                    Update::Delivered { reply }
                }
                Outcome::Transient { reply, retry_after } => {
                    let class = reply.class(&rules);
                    let expired = now - r.received_at >= delivery.max_age.0.as_millis() as i64;
                    let kind = match expired {
                        true => Kind::Failed(Reason::Expired),
                        false => Kind::Deferred,
                    };
                    self.outcomes
                        .record(&config.log, r, kind, Some(class), &reply);
                    let reply = reply.to_string();
                    if expired {
                        self.sink.relay_failed(r, Reason::Expired, class, &reply);
                        // Given up on: a permanent failure in the notification (RFC 3463 4.4.7).
                        let given_up = Reply {
                            code: Some(550),
                            enhanced: Some(Enhanced::new(5, 4, 7)),
                            text: format!("delivery time expired; last reply: {reply}"),
                        };
                        failed.push((r.address.clone(), given_up));
                        Update::Failed {
                            reason: Reason::Expired.as_str().into(),
                            class,
                            reply,
                        }
                    } else {
                        self.sink.relay_deferred(r, class, &reply);
                        let wait =
                            backoff(&schedule(delivery), r.attempts + 1, rand::random::<f64>())
                                .max(retry_after.unwrap_or_default());
                        Update::Retry {
                            next_attempt: now + wait.as_millis() as i64,
                            class,
                            reply,
                        }
                    }
                }
                Outcome::Permanent { reason, reply } => {
                    // A render failure is ours, not the receiver's: no rule reads it.
                    let class = match reason {
                        Reason::Template => BounceClass::Template,
                        _ => reply.class(&rules),
                    };
                    self.outcomes
                        .record(&config.log, r, Kind::Failed(reason), Some(class), &reply);
                    let shown = reply.to_string();
                    self.sink.relay_failed(r, reason, class, &shown);
                    failed.push((r.address.clone(), reply));
                    Update::Failed {
                        reason: reason.as_str().into(),
                        class,
                        reply: shown,
                    }
                }
            };
            updates.push((r.id, update));
        }
        if let Err(e) = self.queue.apply(updates).await {
            // The leases expire and these recipients are tried again: at least once.
            tracing::error!(error = %e, "recording delivery outcomes failed");
            return;
        }
        if delivery.bounces && !failed.is_empty() {
            self.bounce(config, recipients, job, &failed, now).await;
        }
    }

    /// One delivery status notification per message and destination batch, never for
    /// the null sender.
    async fn bounce(
        &self,
        config: &Config,
        recipients: &[Claimed],
        job: Option<&Job>,
        failed: &[(String, Reply)],
        now: i64,
    ) {
        let Some(first) = recipients.first() else {
            return;
        };
        if crate::address::parse(&first.sender).is_err() {
            return;
        }
        let original: Vec<u8> = match job {
            Some(j) => j.body.to_vec(),
            None => self
                .queue
                .body(first.message_id)
                .await
                .ok()
                .flatten()
                .unwrap_or_default(),
        };
        let id = QueueId::generate(self.queue.clock().now_us());
        let Some(mut msg) = bounce::notification(config, first, &original, failed, id, now) else {
            return;
        };
        msg.body = self.signing.sign(std::mem::take(&mut msg.body)).await;
        match self.queue.enqueue(msg).await {
            Ok(()) => self.wake.notify_one(),
            Err(e) => tracing::warn!(error = %e, queue_id = %first.queue_id, "bounce not queued"),
        }
    }
}

/// The delivery backoff schedule.
fn schedule(delivery: &DeliveryConfig) -> Vec<Duration> {
    delivery.backoff.iter().map(|d| d.0).collect()
}

/// Groups claimed recipients into one batch per (message, destination); a batch
/// recipient has its own message, so its own job. Recipients whose domain has no route
/// any more go to `no_route`.
fn group(
    config: &Config,
    claimed: Vec<Claimed>,
    no_route: &mut Vec<Claimed>,
) -> Vec<(Destination, usize, Vec<Claimed>)> {
    let mut groups: Vec<(Destination, usize, Vec<Claimed>)> = Vec::new();
    let mut index: HashMap<(i64, Option<i64>, Destination), usize> = HashMap::new();
    for r in claimed {
        let Some((route_index, route)) = crate::config::route::find(&config.routes, &r.domain)
        else {
            no_route.push(r);
            continue;
        };
        let dest = Destination::of(route_index, route, &r.domain);
        let own = r.vars.as_ref().map(|_| r.id);
        match index.get(&(r.message_id, own, dest.clone())) {
            Some(&i) => groups[i].2.push(r),
            None => {
                index.insert((r.message_id, own, dest.clone()), groups.len());
                groups.push((dest, route_index, vec![r]));
            }
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_schedule_with_jitter() {
        let s: Vec<Duration> = [60, 300, 900]
            .into_iter()
            .map(Duration::from_secs)
            .collect();
        assert_eq!(backoff(&s, 1, 0.0), Duration::from_secs(60));
        assert_eq!(backoff(&s, 2, 0.0), Duration::from_secs(300));
        assert_eq!(backoff(&s, 3, 0.0), Duration::from_secs(900));
        // The last wait repeats.
        assert_eq!(backoff(&s, 9, 0.0), Duration::from_secs(900));
        // Jitter adds at most 10%.
        assert_eq!(backoff(&s, 1, 1.0), Duration::from_secs(66));
        assert!(backoff(&s, 1, 0.5) > Duration::from_secs(60));
    }
}

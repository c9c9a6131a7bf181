//! Builds every part of the daemon from its config, wires them together, and owns
//! start-up, live reload and bounded graceful shutdown. Tests run the real stack through
//! it, passing their own resolver and clock.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bounce::{Classifier, RulesError};
use crate::campaign::Campaigns;
use crate::canary::Canary;
use crate::clock::{Clock, SystemClock};
use crate::cluster::Cluster;
use crate::config::{Config, TlsConfig, token};
use crate::deliver::smtp::SmtpCourier;
use crate::deliver::sts::Sts;
use crate::deliver::webhook::{DisabledEndpoints, WebhookCourier};
use crate::dkim::{DkimError, Signers, Signing};
use crate::dns::{Hickory, MailDns, Resolver};
use crate::events::{Events, EventsTask, Reporting};
use crate::faillog::{FailLog, FailLogError};
use crate::guard::Guard;
use crate::http::admin::Admin;
use crate::intake::Intake;
use crate::policy::Policy;
use crate::queue::{Queue, QueueError};
use crate::scheduler::outcome_log::OutcomeLog;
use crate::scheduler::{Couriers, Scheduler};
use crate::smtp::server::Server;
use crate::smtp::tls::{self, TlsError};
use crate::supervise::{Supervisor, Unhealthy};
use crate::suppression::{SuppressionError, Suppressions};
use crate::tls_report::TlsReports;

mod reload;

pub use reload::Reloaded;

/// Most distinct campaigns tracked in memory before the rest share one bucket.
const MAX_CAMPAIGNS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot open the queue: {0}")]
    Queue(#[from] QueueError),
    #[error("cannot open the failure log: {0}")]
    FailLog(#[from] FailLogError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("DNS resolver: {0}")]
    Dns(String),
    #[error("admin token: {0}")]
    Token(#[from] token::TokenError),
    #[error("DKIM key: {0}")]
    Dkim(#[from] DkimError),
    #[error("cannot open sts.db: {0}")]
    Sts(#[from] crate::sqlite::OpenError),
    #[error("bounce rules: {0}")]
    BounceRules(#[from] RulesError),
    #[error("cannot open the suppression list: {0}")]
    Suppressions(#[from] SuppressionError),
    #[error("[cluster]: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
}

/// What the daemon takes from outside; tests pass their own.
pub struct Deps {
    pub resolver: Resolvers,
    pub clock: Arc<dyn Clock>,
}

impl Default for Deps {
    fn default() -> Self {
        Deps {
            resolver: Resolvers::FromConfig,
            clock: Arc::new(SystemClock),
        }
    }
}

/// Where the daemon's DNS resolver comes from, at start and at every reload that
/// changes `[dns]` (the verdict cache and its TTL bounds follow `[dns]` either way).
pub enum Resolvers {
    /// Hickory, built from `[dns]`.
    FromConfig,
    /// This one, for the life of the daemon.
    Given(Arc<dyn Resolver>),
}

impl Resolvers {
    fn build(&self, config: &Config) -> Result<Arc<dyn Resolver>, AppError> {
        match self {
            Resolvers::FromConfig => hickory(config),
            Resolvers::Given(resolver) => Ok(resolver.clone()),
        }
    }
}

pub struct App {
    pub smtp_addrs: Vec<SocketAddr>,
    pub http_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    /// The public one-click unsubscribe listener, when enabled.
    pub unsubscribe_addr: Option<SocketAddr>,
    pub faillog: FailLog,
    pub guard: Arc<Guard>,
    /// Webhook endpoints' state (disabled by 410, circuit breakers).
    pub webhook: Arc<WebhookCourier>,
    pub events: Events,
    events_task: Option<EventsTask>,
    background: CancellationToken,
    pub intake: Arc<Intake>,
    server: Arc<Server>,
    supervisor: Supervisor,
    resolvers: Resolvers,
    dns: Arc<MailDns>,
    /// The running scheduler; `None` while `[delivery] enabled = false`.
    scheduler: Mutex<Option<Arc<Scheduler>>>,
    /// MTA-STS policies, TLS-RPT counters and the daily reports.
    pub tls_reports: Arc<TlsReports>,
    /// The bounce rules (`[delivery] bounce_rules` and the shipped ones); a reload swaps
    /// them whole.
    bounce_rules: Arc<ArcSwap<Classifier>>,
    /// Delivery outcome lines, governed per campaign; outlives a scheduler restarted by
    /// a reload, so that the budget and the skipped counts carry over.
    outcomes: Arc<OutcomeLog>,
    /// The end-to-end canary (idle unless `[canary] enabled`).
    canary: Arc<Canary>,
    /// Destinations suspended for being unreachable; outlives a reloaded scheduler.
    suspensions: Arc<crate::scheduler::suspend::Suspensions>,
}

/// Supervised task names (see [`Supervisor`]).
const SCHEDULER: &str = "scheduler";
const QUEUE_WRITER: &str = "queue writer";
const FAILLOG_WRITER: &str = "failure log writer";
const SUPPRESSION_WRITER: &str = "suppression writer";
const SMTP_LISTENER: &str = "smtp listener";
const HTTP_LISTENER: &str = "http listener";
const ADMIN_LISTENER: &str = "admin listener";
const TLS_REPORTS: &str = "tls reports";
const UNSUBSCRIBE_LISTENER: &str = "unsubscribe listener";
const OUTCOME_LOG: &str = "outcome log summary";
const CANARY: &str = "canary";

/// Checks what `check-config` can check beyond parsing: TLS material loads.
pub fn preflight(config: &Config) -> Result<(), AppError> {
    load_tls(config.smtp.tls.as_ref())?;
    Signers::load(&config.dkim)?;
    Classifier::load(config.delivery.bounce_rules.as_deref())?;
    Ok(())
}

fn load_tls(tls: Option<&TlsConfig>) -> Result<Option<TlsAcceptor>, TlsError> {
    tls.map(|t| tls::acceptor(t.cert.get_ref(), t.key.get_ref()))
        .transpose()
}

/// The smallest listen backlog: the kernel's accept queue. A burst of connections larger
/// than it is not refused but silently delayed (the kernel drops the handshake's last ACK
/// and the client's SYN-ACK retransmits back off for seconds), so it is sized for the
/// connection limit.
const MIN_BACKLOG: u32 = 4096;

fn bind(addr: SocketAddr, backlog: usize) -> Result<TcpListener, AppError> {
    let listen = || -> std::io::Result<TcpListener> {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        // As std and tokio do: a restarted daemon rebinds while old sockets linger.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        // The kernel caps it at net.core.somaxconn.
        socket.listen(u32::try_from(backlog).unwrap_or(u32::MAX).max(MIN_BACKLOG))
    };
    listen().map_err(|source| AppError::Listen { addr, source })
}

fn hickory(config: &Config) -> Result<Arc<dyn Resolver>, AppError> {
    Hickory::new(&config.dns)
        .map(|h| Arc::new(h) as Arc<dyn Resolver>)
        .map_err(|e| AppError::Dns(e.to_string()))
}

/// With no `[admin] token`, the one in the state directory (generated at first start).
fn admin_token(config: &Config) -> Result<String, AppError> {
    if !config.admin.token.is_empty() || config.admin.listen.is_none() {
        return Ok(config.admin.token.clone());
    }
    let (token, created) = token::load_or_create(&config.queue.dir)?;
    let path = token::path(&config.queue.dir);
    if created {
        tracing::info!(path = %path.display(), "generated an admin token (`floodgate ctl` reads it from there)");
    } else {
        tracing::info!(path = %path.display(), "admin token read from the state directory");
    }
    Ok(token)
}

/// Every listener, bound before anything is served so that a taken port fails start-up.
struct Listeners {
    smtp: Vec<TcpListener>,
    http: Option<TcpListener>,
    admin: Option<TcpListener>,
    unsubscribe: Option<TcpListener>,
}

impl Listeners {
    async fn bind(config: &Config) -> Result<Listeners, AppError> {
        let mut smtp = Vec::new();
        let backlog = config.smtp.max_connections;
        for addr in &config.smtp.listen {
            smtp.push(bind(*addr, backlog)?);
        }
        let http = match config.http.listen {
            Some(addr) => Some(bind(addr, MIN_BACKLOG as usize)?),
            None => None,
        };
        let admin = match config.admin.listen {
            Some(addr) => Some(bind(addr, MIN_BACKLOG as usize)?),
            None => None,
        };
        let u = &config.suppression.unsubscribe;
        let unsubscribe = match u.listen.filter(|_| u.enabled) {
            Some(addr) => Some(bind(addr, MIN_BACKLOG as usize)?),
            None => None,
        };
        Ok(Listeners {
            smtp,
            http,
            admin,
            unsubscribe,
        })
    }
}

impl App {
    /// Opens the queue, binds every listener and starts serving. When this returns the
    /// daemon is ready (the moment to tell systemd).
    pub async fn start(mut config: Config, deps: Deps) -> Result<App, AppError> {
        let tls = load_tls(config.smtp.tls.as_ref())?;
        let signers = Signers::load(&config.dkim)?;
        let bounce_rules = Classifier::load(config.delivery.bounce_rules.as_deref())?;
        let resolver = deps.resolver.build(&config)?;
        config.admin.token = admin_token(&config)?;
        let supervisor = Supervisor::new();
        let (queue, faillog) = open_stores(&config, &deps.clock, &supervisor)?;
        let (suppressions, suppression_writer) =
            Suppressions::open(&config.queue.dir, deps.clock.clone())?;
        supervisor.watch_thread(SUPPRESSION_WRITER, suppression_writer);
        let listeners = Listeners::bind(&config).await?;
        let dns = Arc::new(MailDns::new(resolver, &config.dns, deps.clock.clone()));
        let sts = Arc::new(Sts::open(
            &config.sts_db(),
            dns.clone(),
            deps.clock.clone(),
        )?);
        let campaigns = load_campaigns(&queue).await?;
        // This daemon is the queue's only user: what an earlier process had in flight is
        // due again. Once, here, never when a reload starts the scheduler again.
        match queue.release_leases().await? {
            0 => {}
            n => tracing::info!(recipients = n, "released leases of an earlier run"),
        }
        let delivery_enabled = config.delivery.enabled;
        let unsubscribe = unsubscribe_signer(&config);
        let disabled_webhooks = Arc::new(DisabledEndpoints::default());
        let cluster = match &config.cluster {
            Some(c) => Some(Cluster::new(c)?),
            None => None,
        };
        let intake = Arc::new(Intake {
            config: Arc::new(ArcSwap::from_pointee(config)),
            policy: Policy {
                dns: dns.clone(),
                campaigns: campaigns.clone(),
                clock: deps.clock.clone(),
                webhooks: disabled_webhooks.clone(),
                suppressions,
            },
            queue,
            clock: deps.clock,
            wake: Arc::default(),
            faillog: faillog.clone(),
            signing: Arc::new(Signing::new(signers)),
            unsubscribe,
            batches: Arc::default(),
            cluster,
        });
        let background = CancellationToken::new();
        let tls_reports = Arc::new(TlsReports::new(
            sts,
            intake.config.clone(),
            dns.clone(),
            intake.queue.clone(),
            intake.signing.clone(),
            intake.wake.clone(),
        ));
        supervisor.spawn(TLS_REPORTS, tls_reports.clone().run(background.clone()));
        let outcomes = Arc::new(OutcomeLog::new(&intake.config.load().log));
        supervisor.spawn(
            OUTCOME_LOG,
            outcomes
                .clone()
                .run(intake.config.clone(), background.clone()),
        );
        let Background {
            guard,
            events,
            events_task,
        } = Background::start(&intake, campaigns, &faillog, &background, &supervisor);
        if let Some(cluster) = &intake.cluster {
            // Before any listener serves: the pauses made elsewhere apply to the first
            // message (bounded by the connect timeout when Redis is away).
            let alerts = guard.clone();
            let applier = Arc::new(crate::cluster::Applier {
                campaigns: intake.campaigns().clone(),
                queue: intake.queue.clone(),
                wake: intake.wake.clone(),
                clock: intake.clock.clone(),
                faillog: faillog.clone(),
                suppressions: intake.policy.suppressions.clone(),
                alert: Box::new(move |now, message| alerts.cluster_alert(now, message)),
            });
            cluster
                .start(applier, &supervisor, background.clone())
                .await;
        }
        let canary = Arc::new(Canary::new(intake.clone(), guard.clone()));
        let queue_delays = intake.queue.delays().clone();
        supervisor.spawn(CANARY, canary.clone().run(background.clone()));
        let mut app = App {
            smtp_addrs: Vec::new(),
            http_addr: None,
            admin_addr: None,
            unsubscribe_addr: None,
            faillog,
            guard,
            webhook: Arc::new(WebhookCourier::new(intake.clock.clone(), disabled_webhooks)),
            events,
            events_task: Some(events_task),
            background,
            server: smtp_server(intake.clone(), tls),
            intake,
            supervisor,
            resolvers: deps.resolver,
            dns,
            scheduler: Mutex::default(),
            tls_reports,
            bounce_rules: Arc::new(ArcSwap::from_pointee(bounce_rules)),
            outcomes,
            canary,
            suspensions: Arc::new(crate::scheduler::suspend::Suspensions::new(queue_delays)),
        };
        if delivery_enabled {
            app.start_scheduler();
        }
        app.serve(listeners);
        Ok(app)
    }

    /// Starts the accept loops, each supervised.
    fn serve(&mut self, listeners: Listeners) {
        self.supervisor.spawn(
            "smtp auth limiter",
            self.server.auth.clone().run(self.background.clone()),
        );
        for listener in listeners.smtp {
            let Ok(addr) = listener.local_addr() else {
                continue;
            };
            tracing::info!(%addr, "smtp listening");
            self.smtp_addrs.push(addr);
            self.supervisor
                .spawn(SMTP_LISTENER, self.server.clone().run(listener));
        }
        if let Some(listener) = listeners.http {
            self.http_addr = listener.local_addr().ok();
            let api = Arc::new(crate::http::api::Api::new(self.intake.clone()));
            tracing::info!(addr = %self.http_addr.map(|a| a.to_string()).unwrap_or_default(), "http listening");
            self.supervisor.spawn(
                HTTP_LISTENER,
                crate::http::serve(
                    listener,
                    move |req| api.clone().handle(req),
                    self.server.shutdown.clone(),
                    // With the SMTP sessions: shutdown waits for requests in flight within
                    // `shutdown_grace`, so a committed message gets its 202.
                    crate::http::Drain::new(self.server.tracker.clone(), self.server.abort.clone()),
                ),
            );
        }
        if let Some(listener) = listeners.unsubscribe {
            self.serve_unsubscribe(listener);
        }
        if let Some(listener) = listeners.admin {
            self.admin_addr = listener.local_addr().ok();
            let admin = Arc::new(Admin {
                intake: self.intake.clone(),
                faillog: self.faillog.clone(),
                guard: self.guard.clone(),
                webhook: self.webhook.clone(),
                events: self.events.clone(),
                supervisor: self.supervisor.clone(),
                smtp: self.server.clone(),
                tls_reports: self.tls_reports.clone(),
                started: std::time::Instant::now(),
                canary: self.canary.clone(),
                suspensions: self.suspensions.clone(),
            });
            tracing::info!(addr = %self.admin_addr.map(|a| a.to_string()).unwrap_or_default(), "admin listening");
            self.supervisor.spawn(
                ADMIN_LISTENER,
                crate::http::serve(
                    listener,
                    move |req| admin.clone().handle(req),
                    self.background.clone(),
                    TaskTracker::new(),
                ),
            );
        }
    }

    /// The public unsubscribe listener, on its own address, apart from the admin API.
    fn serve_unsubscribe(&mut self, listener: TcpListener) {
        let Some(signer) = self.intake.unsubscribe.clone() else {
            return;
        };
        self.unsubscribe_addr = listener.local_addr().ok();
        let handler = Arc::new(crate::http::unsubscribe::Unsubscribe {
            intake: self.intake.clone(),
            events: self.events.clone(),
            signer,
        });
        tracing::info!(addr = %self.unsubscribe_addr.map(|a| a.to_string()).unwrap_or_default(), "unsubscribe listening");
        self.supervisor.spawn(
            UNSUBSCRIBE_LISTENER,
            crate::http::serve(
                listener,
                move |req| handler.clone().handle(req),
                self.background.clone(),
                TaskTracker::new(),
            ),
        );
    }

    /// Starts a scheduler (at start, or when a reload turns delivery on).
    fn start_scheduler(&self) {
        let mut running = self.scheduler.lock();
        if running.is_some() {
            return;
        }
        let intake = &self.intake;
        let couriers = Couriers {
            smtp: Arc::new(SmtpCourier::new(
                intake.config.clone(),
                self.dns.clone(),
                intake.clock.clone(),
                self.tls_reports.sts.clone(),
            )),
            webhook: self.webhook.clone(),
            render: Arc::new(
                crate::http::api::batch::Renderer::new(
                    intake.queue.clone(),
                    intake.config.clone(),
                    intake.unsubscribe.clone(),
                )
                .with_stats(intake.batches.clone()),
            ),
            rules: self.bounce_rules.clone(),
        };
        let sink = Arc::new(Reporting {
            inner: intake.clone(),
            events: self.events.clone(),
        });
        let scheduler = Arc::new(
            Scheduler::new(
                intake.queue.clone(),
                intake.config.clone(),
                intake.campaigns().clone(),
                couriers,
                sink,
                intake.wake.clone(),
                intake.signing.clone(),
            )
            .with_outcomes(self.outcomes.clone())
            .with_canary(self.canary.stamps())
            .with_suspensions(self.suspensions.clone())
            .with_cluster(intake.cluster.clone()),
        );
        self.supervisor.spawn(SCHEDULER, scheduler.clone().run());
        *running = Some(scheduler);
    }

    /// Stops claiming (a reload turned delivery off); deliveries under way finish and
    /// record their outcomes.
    fn stop_scheduler(&self) {
        if let Some(scheduler) = self.scheduler.lock().take() {
            self.supervisor.retire(SCHEDULER);
            scheduler.stop();
        }
    }

    /// The running scheduler, if delivery is on.
    fn running_scheduler(&self) -> Option<Arc<Scheduler>> {
        self.scheduler.lock().clone()
    }

    /// The supervisor of the daemon's long-running tasks; parts started later (and
    /// tests) spawn theirs through it.
    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// What `/readyz` and the systemd watchdog ask: every supervised task alive and the
    /// queue writer committing within `limit`.
    pub async fn health(&self, limit: Duration) -> Result<(), Unhealthy> {
        self.supervisor.check(self.queue(), limit).await
    }

    pub fn queue(&self) -> &Queue {
        &self.intake.queue
    }

    pub fn campaigns(&self) -> &Arc<Campaigns> {
        self.intake.campaigns()
    }

    /// Wakes the scheduler (after moving a test clock, or resuming a campaign).
    pub fn wake_scheduler(&self) {
        self.intake.wake.notify_one();
    }

    /// The running scheduler's passes and deliveries under way; `None` while delivery is
    /// off.
    pub fn scheduler_progress(&self) -> Option<crate::scheduler::Progress> {
        self.running_scheduler().map(|s| s.progress())
    }

    /// Stops accepting, lets sessions finish for up to `[server] shutdown_grace`, drops
    /// the rest, and waits for the queue writer to commit what it holds.
    pub async fn shutdown(mut self) {
        let grace: Duration = self.intake.config.load().server.shutdown_grace.0;
        let supervisor = self.supervisor.clone();
        supervisor.stopping();
        self.server.shutdown.cancel();
        self.background.cancel();
        for listener in [
            SMTP_LISTENER,
            HTTP_LISTENER,
            ADMIN_LISTENER,
            UNSUBSCRIBE_LISTENER,
        ] {
            supervisor.join(listener, Duration::MAX).await;
        }
        self.server.tracker.close();
        if tokio::time::timeout(grace, self.server.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.server.connections.total(),
                "grace period over, closing remaining sessions"
            );
            self.server.abort.cancel();
            self.server.tracker.wait().await;
        }
        if let Some(scheduler) = self.scheduler.get_mut().take() {
            scheduler.stop();
        }
        // Deliveries under way get the grace period to record their outcomes; the rest
        // stay leased and are retried after restart.
        if !supervisor.join(SCHEDULER, grace).await {
            tracing::warn!("deliveries still under way at shutdown; they will be retried");
            supervisor.abort(SCHEDULER);
        }
        // The skipped counts of the last deliveries (the summary task stopped before them).
        self.outcomes.summarize();
        // The TLS-RPT counters of the last deliveries (the reporter's own last flush ran
        // when the background tasks were cancelled, before deliveries finished).
        if let Err(e) = self.tls_reports.sts.flush().await {
            tracing::warn!(error = %e, "TLS-RPT counters not flushed at shutdown");
        }
        if let Some(events) = self.events_task.take() {
            // After the scheduler: the last outcomes recorded are in the final batch.
            events.close(Duration::from_secs(5)).await;
        }
        self.faillog.close();
        drop(self);
        // The failure log flushes its last aggregates before it exits.
        if !supervisor
            .join(FAILLOG_WRITER, Duration::from_secs(5))
            .await
        {
            tracing::warn!("failure log writer did not finish its last flush in time");
        }
        // The writer ends once the last queue handle is gone, after its final commit. A
        // delivery stuck past the grace period may still hold a handle; everything
        // acknowledged is already committed, so do not wait on it forever.
        if !supervisor.join(QUEUE_WRITER, Duration::from_secs(5)).await {
            tracing::warn!("queue writer still held by a delivery; exiting without joining it");
        }
        // Entries learnt from the last deliveries are committed before the process ends.
        if !supervisor
            .join(SUPPRESSION_WRITER, Duration::from_secs(5))
            .await
        {
            tracing::warn!("suppression writer did not finish in time");
        }
        tracing::info!("stopped");
    }
}

fn smtp_server(intake: Arc<Intake>, tls: Option<TlsAcceptor>) -> Arc<Server> {
    let auth = Arc::new(crate::smtp::authgate::AuthGate::new(
        &intake.config.load().smtp,
        intake.clock.clone(),
    ));
    let connections = Arc::new(crate::smtp::stress::Table::new(intake.clock.clone()));
    Arc::new(Server {
        intake,
        tls: Arc::new(ArcSwapOption::from(tls.map(Arc::new))),
        connections,
        auth,
        shutdown: CancellationToken::new(),
        abort: CancellationToken::new(),
        tracker: TaskTracker::new(),
    })
}

/// The queue and the failure log, their writer threads supervised.
fn open_stores(
    config: &Config,
    clock: &Arc<dyn Clock>,
    supervisor: &Supervisor,
) -> Result<(Queue, FailLog), AppError> {
    let (queue, writer) = Queue::open(&config.queue, clock.clone())?;
    supervisor.watch_thread(QUEUE_WRITER, writer);
    let (faillog, faillog_thread) =
        FailLog::open(&config.failures_db(), &config.faillog, clock.clone())?;
    supervisor.watch_thread(FAILLOG_WRITER, faillog_thread);
    Ok((queue, faillog))
}

/// The tasks that watch and report rather than carry mail: the guard, queue retention
/// and delivery events.
struct Background {
    guard: Arc<Guard>,
    events: Events,
    events_task: EventsTask,
}

impl Background {
    fn start(
        intake: &Arc<Intake>,
        campaigns: Arc<Campaigns>,
        faillog: &FailLog,
        background: &CancellationToken,
        supervisor: &Supervisor,
    ) -> Background {
        let guard = Arc::new(
            Guard::new(
                campaigns.clone(),
                intake.config.clone(),
                intake.queue.clone(),
                faillog.clone(),
            )
            .with_cluster(intake.cluster.clone()),
        );
        supervisor.spawn(
            "guard",
            guard.clone().run(background.clone(), supervisor.clone()),
        );
        supervisor.spawn(
            "queue retention",
            retention_task(
                intake.queue.clone(),
                intake.config.clone(),
                background.clone(),
            ),
        );
        let (events, events_task) = Events::start(
            intake.config.clone(),
            campaigns,
            intake.clock.clone(),
            supervisor,
        );
        Background {
            guard,
            events,
            events_task,
        }
    }
}

/// The token key of `[suppression.unsubscribe]` (checked by the config), when enabled.
fn unsubscribe_signer(config: &Config) -> Option<Arc<crate::unsubscribe::Signer>> {
    let u = &config.suppression.unsubscribe;
    if !u.enabled {
        return None;
    }
    let secret = crate::signing::Secret::parse(&u.secret).ok()?;
    Some(Arc::new(crate::unsubscribe::Signer::new(secret.key())))
}

async fn load_campaigns(queue: &Queue) -> Result<Arc<Campaigns>, AppError> {
    let campaigns = Arc::new(Campaigns::new(MAX_CAMPAIGNS));
    for state in queue.load_campaigns().await? {
        let c = campaigns.get(Some(&state.name));
        c.set_paused(state.paused);
        c.block_until(state.blocked_until);
    }
    Ok(campaigns)
}

async fn retention_task(queue: Queue, config: Arc<ArcSwap<Config>>, shutdown: CancellationToken) {
    if let Err(e) = crate::queue::retention::run(queue, config, shutdown).await {
        tracing::error!(error = %e, "queue retention stopped");
    }
}

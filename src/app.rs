//! Builds every part of the daemon from its config, wires them together, and owns
//! start-up, live reload and bounded graceful shutdown. Tests run the real stack through
//! it, passing their own resolver and clock.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::campaign::Campaigns;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, TlsConfig};
use crate::deliver::smtp::SmtpCourier;
use crate::deliver::webhook::{DisabledEndpoints, WebhookCourier};
use crate::dns::{Hickory, MailDns, Resolver};
use crate::events::{Events, EventsTask, Reporting};
use crate::faillog::{FailLog, FailLogError, FailLogSettings};
use crate::guard::Guard;
use crate::http::admin::Admin;
use crate::intake::Intake;
use crate::policy::Policy;
use crate::queue::{Queue, QueueError};
use crate::scheduler::{Couriers, Scheduler};
use crate::smtp::server::{Connections, Server};
use crate::smtp::tls::{self, TlsError};

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
}

/// What the daemon takes from outside; tests pass their own.
pub struct Deps {
    /// `None`: hickory with `[dns]` settings.
    pub resolver: Option<Arc<dyn Resolver>>,
    pub clock: Arc<dyn Clock>,
}

impl Default for Deps {
    fn default() -> Self {
        Deps {
            resolver: None,
            clock: Arc::new(SystemClock),
        }
    }
}

pub struct App {
    pub smtp_addrs: Vec<SocketAddr>,
    pub http_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub faillog: FailLog,
    pub guard: Arc<Guard>,
    /// Webhook endpoints' state (disabled by 410, circuit breakers).
    pub webhook: Arc<WebhookCourier>,
    pub events: Events,
    events_task: Option<EventsTask>,
    faillog_thread: Option<JoinHandle<()>>,
    background: CancellationToken,
    pub intake: Arc<Intake>,
    server: Arc<Server>,
    tracker: TaskTracker,
    writer: Option<JoinHandle<()>>,
    injected_resolver: bool,
    scheduler: Option<(Arc<Scheduler>, tokio::task::JoinHandle<()>)>,
}

/// Checks what `check-config` can check beyond parsing: TLS material loads.
pub fn preflight(config: &Config) -> Result<(), AppError> {
    load_tls(config.smtp.tls.as_ref())?;
    Ok(())
}

fn load_tls(tls: Option<&TlsConfig>) -> Result<Option<TlsAcceptor>, TlsError> {
    tls.map(|t| tls::acceptor(t.cert.get_ref(), t.key.get_ref()))
        .transpose()
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Listen { addr, source })
}

fn hickory(config: &Config) -> Result<Arc<dyn Resolver>, AppError> {
    Hickory::new(&config.dns)
        .map(|h| Arc::new(h) as Arc<dyn Resolver>)
        .map_err(|e| AppError::Dns(e.to_string()))
}

impl App {
    /// Opens the queue, binds every listener and starts serving. When this returns the
    /// daemon is ready (the moment to tell systemd).
    pub async fn start(config: Config, deps: Deps) -> Result<App, AppError> {
        let tls = load_tls(config.smtp.tls.as_ref())?;
        let injected_resolver = deps.resolver.is_some();
        let resolver = match deps.resolver {
            Some(r) => r,
            None => hickory(&config)?,
        };
        let (queue, writer) = Queue::open(&config.queue, deps.clock.clone())?;
        let (faillog, faillog_thread) =
            FailLog::open(&config.failures_db(), &config.faillog, deps.clock.clone())?;
        let mut listeners = Vec::new();
        for addr in &config.smtp.listen {
            let listener = bind(*addr).await?;
            listeners.push(listener);
        }
        let smtp_addrs: Vec<SocketAddr> = listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        let http_listener = match config.http.listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let admin_listener = match config.admin.listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let dns = Arc::new(MailDns::new(resolver, &config.dns));
        let campaigns = Arc::new(Campaigns::new(MAX_CAMPAIGNS));
        for state in queue.load_campaigns().await? {
            let c = campaigns.get(Some(&state.name));
            c.set_paused(state.paused);
            c.block_until(state.blocked_until);
        }
        let delivery_enabled = config.delivery.enabled;
        let disabled_webhooks = Arc::new(DisabledEndpoints::default());
        let intake = Arc::new(Intake {
            config: Arc::new(ArcSwap::from_pointee(config)),
            policy: Policy {
                dns: dns.clone(),
                campaigns: campaigns.clone(),
                clock: deps.clock.clone(),
                webhooks: disabled_webhooks.clone(),
            },
            queue: queue.clone(),
            clock: deps.clock,
            wake: Arc::default(),
            faillog: Some(faillog.clone()),
        });
        let background = CancellationToken::new();
        let guard = Arc::new(Guard::new(
            campaigns.clone(),
            intake.config.clone(),
            queue.clone(),
            Some(faillog.clone()),
        ));
        tokio::spawn(guard.clone().run(background.clone()));
        let (events, events_task) = Events::start(
            intake.config.clone(),
            campaigns.clone(),
            intake.clock.clone(),
        );
        let webhook = Arc::new(WebhookCourier::new(intake.clock.clone(), disabled_webhooks));
        let scheduler = delivery_enabled.then(|| {
            let couriers = Couriers {
                smtp: Arc::new(SmtpCourier::new(intake.config.clone(), dns)),
                webhook: Some(webhook.clone()),
            };
            let sink = Arc::new(Reporting {
                inner: intake.clone(),
                events: events.clone(),
            });
            let scheduler = Arc::new(Scheduler::new(
                queue,
                intake.config.clone(),
                campaigns,
                couriers,
                sink,
                intake.wake.clone(),
            ));
            let task = tokio::spawn(scheduler.clone().run());
            (scheduler, task)
        });
        let tracker = TaskTracker::new();
        let server = Arc::new(Server {
            intake: intake.clone(),
            tls: Arc::new(ArcSwapOption::from(tls.map(Arc::new))),
            connections: Arc::new(Connections::default()),
            shutdown: CancellationToken::new(),
            abort: CancellationToken::new(),
            tracker: TaskTracker::new(),
        });
        for (listener, addr) in listeners.into_iter().zip(&smtp_addrs) {
            tracing::info!(%addr, "smtp listening");
            tracker.spawn(server.clone().run(listener));
        }
        let http_addr = http_listener.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(listener) = http_listener {
            let api = Arc::new(crate::http::api::Api::new(intake.clone()));
            tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "http listening");
            tracker.spawn(crate::http::serve(
                listener,
                move |req| api.clone().handle(req),
                server.shutdown.clone(),
                TaskTracker::new(),
            ));
        }
        let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(listener) = admin_listener {
            let admin = Arc::new(Admin {
                intake: intake.clone(),
                faillog: Some(faillog.clone()),
                guard: guard.clone(),
                webhook: Some(webhook.clone()),
                events: Some(events.clone()),
                started: std::time::Instant::now(),
            });
            tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin listening");
            tracker.spawn(crate::http::serve(
                listener,
                move |req| admin.clone().handle(req),
                background.clone(),
                TaskTracker::new(),
            ));
        }
        Ok(App {
            smtp_addrs,
            http_addr,
            admin_addr,
            faillog,
            guard,
            webhook,
            events,
            events_task: Some(events_task),
            faillog_thread: Some(faillog_thread),
            background,
            intake,
            server,
            tracker,
            writer: Some(writer),
            injected_resolver,
            scheduler,
        })
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

    /// Applies a new config live (SIGHUP). Returns what changed; settings that need a
    /// restart are named and left as they were. On error nothing changes.
    pub fn reload(&self, mut new: Config) -> Result<Vec<String>, AppError> {
        let old = self.intake.config.load_full();
        let tls = load_tls(new.smtp.tls.as_ref())?;
        let mut changed = Vec::new();
        for key in old.restart_only_changes(&new) {
            tracing::warn!(
                key,
                "changed in the config file but needs a restart; keeping the old value"
            );
        }
        // Keep the settings that only a restart can change, so the live config always
        // describes what is actually running.
        new.smtp.listen = old.smtp.listen.clone();
        new.http.listen = old.http.listen;
        new.admin.listen = old.admin.listen;
        new.queue.dir = old.queue.dir.clone();
        new.queue.synchronous = old.queue.synchronous;
        if format!("{:?}", old.dns) != format!("{:?}", new.dns) {
            if !self.injected_resolver {
                self.intake.policy.dns.reconfigure(hickory(&new)?, &new.dns);
            }
            changed.push("dns".to_owned());
        }
        if format!("{:?}", old.smtp.tls) != format!("{:?}", new.smtp.tls) {
            changed.push("smtp.tls".to_owned());
        }
        self.server.tls.store(tls.map(Arc::new));
        if format!("{:?}", old.faillog) != format!("{:?}", new.faillog) {
            self.faillog
                .set_settings(FailLogSettings::from(&new.faillog));
            changed.push("faillog".to_owned());
        }
        for (name, a, b) in [
            (
                "server",
                format!("{:?}", old.server),
                format!("{:?}", new.server),
            ),
            ("smtp", format!("{:?}", old.smtp), format!("{:?}", new.smtp)),
            (
                "queue",
                format!("{:?}", old.queue),
                format!("{:?}", new.queue),
            ),
            (
                "delivery",
                format!("{:?}", old.delivery),
                format!("{:?}", new.delivery),
            ),
            (
                "route",
                format!("{:?}", old.routes),
                format!("{:?}", new.routes),
            ),
            (
                "admin",
                format!("{:?}", old.admin),
                format!("{:?}", new.admin),
            ),
            (
                "events",
                format!("{:?}", old.events),
                format!("{:?}", new.events),
            ),
        ] {
            if a != b && !changed.iter().any(|c| c.starts_with(name)) {
                changed.push(name.to_owned());
            }
        }
        if self.webhook.enable_all() > 0 {
            changed.push("webhook endpoints re-enabled".to_owned());
        }
        self.intake.config.store(Arc::new(new));
        Ok(changed)
    }

    /// Stops accepting, lets sessions finish for up to `[server] shutdown_grace`, drops
    /// the rest, and waits for the queue writer to commit what it holds.
    pub async fn shutdown(mut self) {
        let grace: Duration = self.intake.config.load().server.shutdown_grace.0;
        self.server.shutdown.cancel();
        self.background.cancel();
        self.tracker.close();
        self.tracker.wait().await;
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
        if let Some((scheduler, mut task)) = self.scheduler.take() {
            scheduler.stop();
            // Deliveries under way get the grace period to record their outcomes; the
            // rest stay leased and are retried after restart.
            tokio::select! {
                _ = &mut task => {}
                () = tokio::time::sleep(grace) => {
                    tracing::warn!("deliveries still under way at shutdown; they will be retried");
                    task.abort();
                }
            }
        }
        if let Some(events) = self.events_task.take() {
            // After the scheduler: the last outcomes recorded are in the final batch.
            events.close(Duration::from_secs(5)).await;
        }
        let writer = self.writer.take();
        let faillog_thread = self.faillog_thread.take();
        self.faillog.close();
        drop(self);
        if let Some(handle) = faillog_thread {
            // The failure log flushes its last aggregates before it exits.
            let join = tokio::task::spawn_blocking(move || handle.join());
            if tokio::time::timeout(Duration::from_secs(5), join)
                .await
                .is_err()
            {
                tracing::warn!("failure log writer did not finish its last flush in time");
            }
        }
        if let Some(handle) = writer {
            // The writer ends once the last queue handle is gone, after its final commit.
            // A delivery stuck past the grace period may still hold a handle; everything
            // acknowledged is already committed, so do not wait on it forever.
            let join = tokio::task::spawn_blocking(move || handle.join());
            if tokio::time::timeout(Duration::from_secs(5), join)
                .await
                .is_err()
            {
                tracing::warn!("queue writer still held by a delivery; exiting without joining it");
            }
        }
        tracing::info!("stopped");
    }
}

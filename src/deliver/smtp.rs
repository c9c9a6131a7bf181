//! The SMTP courier: finds the hosts of a destination (MX by preference, implicit MX, or
//! the smarthost), falls through to the next host when one cannot be reached, applies
//! the route's TLS and AUTH, and keeps idle connections for the next message.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustls::ClientConfig;

use super::client::{ClientError, Connection, SendError, Timeouts, Transaction};
use super::{Courier, Job, Outcome};
use crate::clock::Clock;
use crate::config::{Config, Route, TlsMode, Transport};
use crate::dns::{MailDns, Verdict};
use crate::future::BoxFuture;
use crate::net::tls;
use crate::reason::Reason;

/// One host to try, with its addresses.
struct Host {
    name: String,
    addrs: Vec<IpAddr>,
}

pub struct SmtpCourier {
    config: Arc<ArcSwap<Config>>,
    dns: Arc<MailDns>,
    opportunistic: Arc<ClientConfig>,
    verified: Mutex<HashMap<Option<std::path::PathBuf>, Arc<ClientConfig>>>,
    pool: Mutex<HashMap<String, Vec<(Connection, Instant)>>>,
    /// Ages idle pooled connections against `[delivery]`'s idle limit.
    clock: Arc<dyn Clock>,
}

impl SmtpCourier {
    pub fn new(
        config: Arc<ArcSwap<Config>>,
        dns: Arc<MailDns>,
        clock: Arc<dyn Clock>,
    ) -> SmtpCourier {
        SmtpCourier {
            config,
            dns,
            clock,
            opportunistic: tls::opportunistic(),
            verified: Mutex::default(),
            pool: Mutex::default(),
        }
    }

    fn timeouts(config: &Config) -> Timeouts {
        Timeouts {
            connect: config.delivery.connect_timeout.0,
            command: config.delivery.command_timeout.0,
            data: config.delivery.data_timeout.0,
        }
    }

    /// The TLS client config for a route: verified for smarthosts (unless turned off),
    /// opportunistic for MX.
    fn tls_config(&self, route: &Route) -> Result<Arc<ClientConfig>, String> {
        let verify = route
            .tls_verify
            .unwrap_or(matches!(route.transport, Transport::Smarthost));
        if !verify {
            return Ok(self.opportunistic.clone());
        }
        let mut cache = self.verified.lock();
        if let Some(c) = cache.get(&route.tls_ca) {
            return Ok(c.clone());
        }
        let c = tls::verified(route.tls_ca.as_deref())?;
        cache.insert(route.tls_ca.clone(), c.clone());
        Ok(c)
    }

    /// The hosts to try, best first. An `Err` is the outcome for every recipient.
    async fn hosts(&self, job: &Job) -> Result<Vec<Host>, Outcome> {
        let names: Vec<String> = match job.route.transport {
            Transport::Smarthost => vec![job.route.host.clone().unwrap_or_default()],
            _ => match self.dns.verdict(&job.destination.key).await {
                Verdict::Mail(hosts) => hosts.iter().map(|h| h.exchange.clone()).collect(),
                Verdict::NullMx => {
                    return Err(permanent(
                        Reason::NullMx,
                        "556 5.1.10 domain accepts no mail (null MX)",
                    ));
                }
                Verdict::NoSuchDomain => {
                    return Err(permanent(
                        Reason::NoSuchDomain,
                        "550 5.1.2 domain does not exist",
                    ));
                }
                Verdict::NoMailHost => {
                    return Err(permanent(
                        Reason::NoMailHost,
                        "550 5.1.2 domain has no mail host",
                    ));
                }
                Verdict::Temporary => {
                    return Err(Outcome::transient("451 4.4.3 DNS lookup failed"));
                }
            },
        };
        let resolver = self.dns.resolver();
        let mut hosts = Vec::with_capacity(names.len());
        for name in names {
            let addrs = match name.parse::<IpAddr>() {
                Ok(ip) => vec![ip],
                Err(_) => match resolver.ips(&name).await {
                    Ok(r) => r.items,
                    Err(e) => {
                        tracing::debug!(host = %name, error = %e, "no address for host");
                        continue;
                    }
                },
            };
            hosts.push(Host { name, addrs });
        }
        if hosts.is_empty() {
            return Err(Outcome::transient("451 4.4.4 no address for any mail host"));
        }
        Ok(hosts)
    }

    /// Opens a ready connection (TLS and AUTH done) to the first host that answers.
    async fn connect(&self, job: &Job, config: &Config) -> Result<Connection, Outcome> {
        let route = &job.route;
        let port = route.port.unwrap_or(25);
        let mode = route.tls.unwrap_or_default();
        let tls_config = self
            .tls_config(route)
            .map_err(|e| Outcome::transient(format!("451 4.7.5 TLS setup: {e}")))?;
        let timeouts = Self::timeouts(config);
        let helo = &config.server.hostname;
        let mut last = Outcome::transient("451 4.4.1 no host reachable");
        for host in self.hosts(job).await? {
            for ip in &host.addrs {
                let addr = SocketAddr::new(*ip, port);
                let implicit = matches!(mode, TlsMode::Tls).then(|| tls_config.clone());
                let conn = match Connection::open(addr, &host.name, helo, implicit, timeouts).await
                {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::info!(host = %host.name, %addr, error = %e, "host unreachable, trying the next");
                        last = transient_from(&e);
                        continue;
                    }
                };
                match self
                    .secure(
                        conn,
                        &host.name,
                        route,
                        mode,
                        &tls_config,
                        addr,
                        helo,
                        timeouts,
                    )
                    .await
                {
                    Ok(c) => return Ok(c),
                    Err(outcome) => last = outcome,
                }
            }
        }
        Err(last)
    }

    /// STARTTLS and AUTH as the route asks.
    #[allow(clippy::too_many_arguments)]
    async fn secure(
        &self,
        conn: Connection,
        name: &str,
        route: &Route,
        mode: TlsMode,
        tls_config: &Arc<ClientConfig>,
        addr: SocketAddr,
        helo: &str,
        timeouts: Timeouts,
    ) -> Result<Connection, Outcome> {
        let mut conn = match mode {
            TlsMode::Starttls if !conn.caps.starttls => {
                return Err(Outcome::transient(
                    "454 4.7.0 STARTTLS required but not offered",
                ));
            }
            TlsMode::Starttls | TlsMode::Opportunistic if conn.caps.starttls => {
                match conn.starttls(name, tls_config.clone()).await {
                    Ok(c) => c,
                    Err(e) if mode == TlsMode::Opportunistic => {
                        // Opportunistic: a failed handshake falls back to plain text on a
                        // fresh connection rather than not delivering at all.
                        tracing::info!(host = %name, error = %e, "STARTTLS failed, continuing without TLS");
                        Connection::open(addr, name, helo, None, timeouts)
                            .await
                            .map_err(|e| transient_from(&e))?
                    }
                    Err(e) => return Err(transient_from(&e)),
                }
            }
            _ => conn,
        };
        if let (Some(user), Some(password)) = (&route.auth_user, &route.auth_password) {
            if !conn.tls && mode != TlsMode::None {
                return Err(Outcome::transient(
                    "454 4.7.0 refusing to send credentials without TLS",
                ));
            }
            conn.auth(user, password)
                .await
                .map_err(|e| transient_from(&e))?;
        }
        Ok(conn)
    }

    fn take_pooled(&self, key: &str, idle: Duration) -> Option<Connection> {
        let mut pool = self.pool.lock();
        let conns = pool.get_mut(key)?;
        let now = self.clock.now_instant();
        while let Some((conn, since)) = conns.pop() {
            if now.saturating_duration_since(since) < idle {
                return Some(conn);
            }
        }
        None
    }

    fn put_pooled(&self, key: String, conn: Connection, cap: usize) {
        let mut pool = self.pool.lock();
        let conns = pool.entry(key).or_default();
        if conns.len() < cap {
            conns.push((conn, self.clock.now_instant()));
        }
    }

    async fn run(&self, job: &Job) -> Vec<Outcome> {
        let config = self.config.load_full();
        let n = job.recipients.len();
        let recipients: Vec<&str> = job.recipients.iter().map(|r| r.address.as_str()).collect();
        let tx = Transaction {
            sender: &job.sender,
            recipients: &recipients,
            body: &job.body,
            smtputf8: job.smtputf8,
        };
        let key = format!("{}#{}", job.destination.route, job.destination.key);
        if let Some(mut conn) = self.take_pooled(&key, config.delivery.idle_connection.0) {
            match conn.send(&tx).await {
                Ok(outcomes) => {
                    self.put_pooled(key, conn, config.delivery.concurrency);
                    return outcomes;
                }
                // The final dot went out and its reply never came: the server may have
                // the message. Resending now would deliver it twice; the scheduler
                // retries after the backoff instead (a duplicate then is the accepted
                // SMTP trade-off, RFC 1047).
                Err(e) if e.handed_over() => return deferred(e),
                // A pooled connection may have been closed by the peer while idle; a
                // failure before the message went out is not the destination's fault,
                // so retry once on a fresh connection.
                Err(e) => {
                    tracing::debug!(queue_id = %job.queue_id, error = %e, "pooled connection failed; retrying on a fresh one");
                }
            }
        }
        let mut conn = match self.connect(job, &config).await {
            Ok(c) => c,
            Err(outcome) => return vec![outcome; n],
        };
        match conn.send(&tx).await {
            Ok(outcomes) => {
                self.put_pooled(key, conn, config.delivery.concurrency);
                outcomes
            }
            Err(e) => deferred(e),
        }
    }
}

/// The outcomes after a connection failed mid-transaction: answers already given stand,
/// every other recipient is deferred with what happened and when.
fn deferred(e: SendError) -> Vec<Outcome> {
    let reply = if e.handed_over() {
        format!(
            "451 4.4.2 no reply to the end of DATA, the message may have been delivered: {}",
            e.error
        )
    } else {
        format!("451 4.4.1 {e}")
    };
    let o = Outcome::transient(&reply);
    e.known
        .into_iter()
        .map(|k| k.unwrap_or_else(|| o.clone()))
        .collect()
}

impl Courier for SmtpCourier {
    fn deliver<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(self.run(job))
    }
}

fn permanent(reason: Reason, reply: &str) -> Outcome {
    Outcome::permanent(reason, reply)
}

/// Network trouble is always worth another try; a refusal keeps its class.
fn transient_from(e: &ClientError) -> Outcome {
    match e {
        ClientError::Refused(code, text) if (500..600).contains(code) => {
            // A 5xx greeting or EHLO is a host that will not talk to us now; another
            // host, or later, may. Only replies about the message itself are final.
            Outcome::transient(format!("451 4.4.0 host refused: {code} {text}"))
        }
        ClientError::Refused(code, text) => Outcome::transient(format!("{code} {text}")),
        other => Outcome::transient(format!("451 4.4.1 {other}")),
    }
}

//! The SMTP courier: finds the hosts of a destination (MX by preference, implicit MX, or
//! the smarthost), falls through to the next host when one cannot be reached, applies
//! the route's TLS and AUTH, and keeps idle connections for the next message.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustls::ClientConfig;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::UnixTime;

use super::client::{ClientError, Connection, SendError, Timeouts, Transaction};
use super::sts::{Cached, Fetch, Sts, TlsResult};
use super::{Attempt, Courier, Job, Outcome};
use crate::clock::Clock;
use crate::config::{Config, Route, StsMode, TlsMode, Transport};
use crate::dns::{MailDns, Verdict};
use crate::future::BoxFuture;
use crate::mta_sts::Mode as StsPolicyMode;
use crate::net::tls;
use crate::reason::Reason;

/// A recipient domain's MTA-STS policy, for one delivery.
struct Guard {
    domain: String,
    policy: Arc<Cached>,
    /// The policy is in enforce and so is Floodgate: refuse what does not meet it.
    enforce: bool,
}

/// The deferral of a recipient whose domain's MTA-STS policy (in enforce) no host met:
/// 4xx, so the scheduler retries, and worded so that the bounce classifier calls it `tls`.
fn sts_deferral(domain: &str, result: TlsResult, why: &str) -> Outcome {
    Outcome::transient(format!(
        "451 4.7.5 MTA-STS policy of {domain} not met ({}): {why}; not sent without verified TLS",
        result.as_str()
    ))
}

/// Whether `outcome` is a deferral for an MTA-STS policy not met.
fn is_sts_deferral(outcome: &Outcome) -> bool {
    outcome.reply().text.starts_with("MTA-STS policy")
}

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
    /// MTA-STS policies and TLS-RPT counters.
    sts: Arc<Sts>,
    chain_verifiers: Mutex<HashMap<Option<std::path::PathBuf>, Arc<dyn ServerCertVerifier>>>,
    /// Ages idle pooled connections against `[delivery]`'s idle limit.
    clock: Arc<dyn Clock>,
}

impl SmtpCourier {
    pub fn new(
        config: Arc<ArcSwap<Config>>,
        dns: Arc<MailDns>,
        clock: Arc<dyn Clock>,
        sts: Arc<Sts>,
    ) -> SmtpCourier {
        SmtpCourier {
            config,
            dns,
            clock,
            sts,
            chain_verifiers: Mutex::default(),
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

    /// Opens a ready connection (TLS and AUTH done) to the first host that answers and,
    /// under an MTA-STS policy in enforce, meets it. An `Err` says whether any host took
    /// a connection at all (`false`: the destination is unreachable).
    async fn connect(
        &self,
        job: &Job,
        config: &Config,
        guard: Option<&Guard>,
    ) -> Result<Connection, (Outcome, bool)> {
        let route = &job.route;
        let port = route.port.unwrap_or(25);
        let mut mode = route.tls.unwrap_or_default();
        if guard.is_some_and(|g| g.enforce) && mode != TlsMode::Tls {
            // No plain-text fallback: a failed handshake is a failed host.
            mode = TlsMode::Starttls;
        }
        let tls_config = self.tls_config(route).map_err(|e| {
            (
                Outcome::transient(format!("451 4.7.5 TLS setup: {e}")),
                true,
            )
        })?;
        let timeouts = Self::timeouts(config);
        let helo = &config.server.hostname;
        let mut last = Outcome::transient("451 4.4.1 no host reachable");
        // Only hosts that all refused the connection itself say the destination is down:
        // a policy skip or a failed handshake is not the next hop being down.
        let mut reached = false;
        for host in self.hosts(job).await.map_err(|o| (o, true))? {
            if let Some(g) = guard
                && !g.policy.policy.allows(&host.name)
            {
                let why = format!("MX host {} is not in its policy", host.name);
                if let Some(refusal) =
                    self.policy_failure(g, TlsResult::ValidationFailure, &host.name, None, &why)
                {
                    last = refusal;
                    reached = true;
                    continue;
                }
            }
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
                reached = true;
                // Enforce: no STARTTLS is the end of this host (in testing, `check_tls`
                // counts it once the session is set up as without a policy).
                if let Some(g) = guard.filter(|g| g.enforce)
                    && !conn.tls
                    && !conn.caps.starttls
                {
                    let why = format!("{} does not offer STARTTLS", host.name);
                    if let Some(refusal) = self.policy_failure(
                        g,
                        TlsResult::StarttlsNotSupported,
                        &host.name,
                        Some(*ip),
                        &why,
                    ) {
                        conn.quit().await;
                        last = refusal;
                        continue;
                    }
                }
                let secured = self
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
                    .await;
                let conn = match (secured, guard) {
                    (Ok(c), _) => c,
                    (Err((outcome, Some(e))), Some(g)) => {
                        let result = e
                            .get_ref()
                            .and_then(|i| i.downcast_ref::<rustls::Error>())
                            .map_or(TlsResult::ValidationFailure, TlsResult::of_certificate);
                        let why = format!("TLS with {} failed: {e}", host.name);
                        last = self
                            .policy_failure(g, result, &host.name, Some(*ip), &why)
                            .unwrap_or(outcome);
                        continue;
                    }
                    (Err((outcome, _)), _) => {
                        last = outcome;
                        continue;
                    }
                };
                match self.check_tls(job, guard, &conn, &host.name, *ip) {
                    Ok(()) => return Ok(conn),
                    Err(refusal) => {
                        conn.quit().await;
                        last = refusal;
                    }
                }
            }
        }
        Err((last, reached))
    }

    /// After TLS (or without it): counts the session for TLS-RPT and, under a policy,
    /// checks the certificate the host presented against its name. An `Err` is a policy
    /// in enforce not met: nothing may be sent on this connection.
    fn check_tls(
        &self,
        job: &Job,
        guard: Option<&Guard>,
        conn: &Connection,
        host: &str,
        ip: IpAddr,
    ) -> Result<(), Outcome> {
        let Some(g) = guard else {
            if self.config.load().sts_mode(&job.route) != StsMode::Off {
                let result = if conn.tls {
                    TlsResult::Success
                } else {
                    TlsResult::StarttlsNotSupported
                };
                self.sts
                    .count(&job.destination.key, false, result, host, Some(ip));
            }
            return Ok(());
        };
        if !conn.tls {
            // Testing only: enforce never gets here without TLS.
            let why = format!("{host} does not offer STARTTLS");
            return self
                .policy_failure(g, TlsResult::StarttlsNotSupported, host, Some(ip), &why)
                .map_or(Ok(()), Err);
        }
        let checked = match self.chain_verifier(job.route.tls_ca.as_deref()) {
            Ok(verifier) => {
                let now = UnixTime::since_unix_epoch(Duration::from_millis(
                    self.clock.now_ms().max(0) as u64,
                ));
                let chain = conn.peer_certificates().unwrap_or_default();
                tls::check_chain(verifier.as_ref(), chain, host, now)
                    .map_err(|e| (TlsResult::of_certificate(&e), e.to_string()))
            }
            Err(e) => Err((TlsResult::CertificateNotTrusted, e)),
        };
        match checked {
            Ok(()) => {
                self.sts
                    .count(&g.domain, true, TlsResult::Success, host, Some(ip));
                Ok(())
            }
            Err((result, e)) => {
                let why = format!("certificate of {host}: {e}");
                self.policy_failure(g, result, host, Some(ip), &why)
                    .map_or(Ok(()), Err)
            }
        }
    }

    /// Counts a session that does not meet `g`'s policy. In enforce, returns the deferral
    /// for the recipients (the caller tries the next host or gives it back); in testing,
    /// `None`: delivery goes on as without a policy.
    fn policy_failure(
        &self,
        g: &Guard,
        result: TlsResult,
        host: &str,
        ip: Option<IpAddr>,
        why: &str,
    ) -> Option<Outcome> {
        self.sts.count(&g.domain, true, result, host, ip);
        if !g.enforce {
            self.sts
                .stats
                .testing_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(domain = %g.domain, %host, result = result.as_str(), "MTA-STS testing: this session would have failed: {why}");
            return None;
        }
        tracing::info!(domain = %g.domain, %host, result = result.as_str(), "MTA-STS enforce: host refused: {why}");
        Some(sts_deferral(&g.domain, result, why))
    }

    fn chain_verifier(
        &self,
        ca: Option<&std::path::Path>,
    ) -> Result<Arc<dyn ServerCertVerifier>, String> {
        let key = ca.map(std::path::Path::to_path_buf);
        let mut cache = self.chain_verifiers.lock();
        if let Some(v) = cache.get(&key) {
            return Ok(v.clone());
        }
        let v = tls::chain_verifier(ca)?;
        cache.insert(key, v.clone());
        Ok(v)
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
    ) -> Result<Connection, (Outcome, Option<std::io::Error>)> {
        let mut conn = match mode {
            TlsMode::Starttls if !conn.caps.starttls => {
                return Err((
                    Outcome::transient("454 4.7.0 STARTTLS required but not offered"),
                    None,
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
                            .map_err(|e| (transient_from(&e), None))?
                    }
                    Err(e) => {
                        // The handshake's own error goes with the outcome: under MTA-STS
                        // it says which RFC 8460 failure this was.
                        let outcome = transient_from(&e);
                        let io = match e {
                            ClientError::Tls(io) => Some(io),
                            _ => None,
                        };
                        return Err((outcome, io));
                    }
                }
            }
            _ => conn,
        };
        if let (Some(user), Some(password)) = (&route.auth_user, &route.auth_password) {
            if !conn.tls && mode != TlsMode::None {
                return Err((
                    Outcome::transient("454 4.7.0 refusing to send credentials without TLS"),
                    None,
                ));
            }
            conn.auth(user, password)
                .await
                .map_err(|e| (transient_from(&e), None))?;
        }
        Ok(conn)
    }

    /// The MTA-STS policy `job`'s domain holds us to, if any.
    async fn guard(&self, job: &Job, config: &Config) -> Option<Guard> {
        let mode = config.sts_mode(&job.route);
        if mode == StsMode::Off {
            return None;
        }
        let domain = &job.destination.key;
        let fetch = Fetch {
            port: config.delivery.mta_sts_port,
            ca: job.route.tls_ca.as_deref(),
            timeout: config.delivery.connect_timeout.0,
        };
        let policy = self.sts.policy(domain, fetch).await?;
        let enforce = mode == StsMode::Enforce && policy.policy.mode == StsPolicyMode::Enforce;
        Some(Guard {
            domain: domain.clone(),
            policy,
            enforce,
        })
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

    async fn run(&self, job: &Job) -> Attempt {
        let config = self.config.load_full();
        let n = job.recipients.len();
        let recipients: Vec<&str> = job.recipients.iter().map(|r| r.address.as_str()).collect();
        let tx = Transaction {
            sender: &job.sender,
            recipients: &recipients,
            body: &job.body,
            smtputf8: job.smtputf8,
        };
        let guard = self.guard(job, &config).await;
        // Connections opened under a policy in enforce were checked against it; only
        // they may carry mail that needs it, so they pool apart.
        let key = format!(
            "{}#{}{}",
            job.destination.route,
            job.destination.key,
            if guard.as_ref().is_some_and(|g| g.enforce) {
                "#sts"
            } else {
                ""
            }
        );
        if let Some(mut conn) = self.take_pooled(&key, config.delivery.idle_connection.0) {
            match conn.send(&tx).await {
                Ok(outcomes) => {
                    self.put_pooled(key, conn, config.delivery.concurrency);
                    return Attempt::reached(outcomes);
                }
                // The final dot went out and its reply never came: the server may have
                // the message. Resending now would deliver it twice; the scheduler
                // retries after the backoff instead (a duplicate then is the accepted
                // SMTP trade-off, RFC 1047).
                Err(e) if e.handed_over() => return Attempt::reached(deferred(e)),
                // A pooled connection may have been closed by the peer while idle; a
                // failure before the message went out is not the destination's fault,
                // so retry once on a fresh connection.
                Err(e) => {
                    tracing::debug!(queue_id = %job.queue_id, error = %e, "pooled connection failed; retrying on a fresh one");
                }
            }
        }
        let mut conn = match self.connect(job, &config, guard.as_ref()).await {
            Ok(c) => c,
            Err((outcome, reached)) => {
                if guard.as_ref().is_some_and(|g| g.enforce) && is_sts_deferral(&outcome) {
                    self.sts
                        .stats
                        .deferred
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                return Attempt {
                    outcomes: vec![outcome; n],
                    reached,
                };
            }
        };
        match conn.send(&tx).await {
            Ok(outcomes) => {
                self.put_pooled(key, conn, config.delivery.concurrency);
                Attempt::reached(outcomes)
            }
            Err(e) => Attempt::reached(deferred(e)),
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
    fn deliver<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Attempt> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bounce::{BounceClass, Classifier};

    #[test]
    fn mta_sts_deferrals_are_transient_and_classed_tls() {
        let classifier = Classifier::shipped();
        for result in TlsResult::ALL
            .into_iter()
            .filter(|r| *r != TlsResult::Success)
        {
            let outcome = sts_deferral(
                "a.test",
                result,
                "MX host mx.evil.test is not in its policy",
            );
            assert!(matches!(outcome, Outcome::Transient { .. }), "{outcome:?}");
            assert!(is_sts_deferral(&outcome));
            let line = outcome.reply().to_string();
            assert!(
                line.starts_with("451 4.7.5 MTA-STS policy of a.test"),
                "{line}"
            );
            assert_eq!(classifier.classify_line(&line), BounceClass::Tls, "{line}");
        }
        assert!(!is_sts_deferral(&Outcome::transient(
            "451 4.4.1 no host reachable"
        )));
    }
}

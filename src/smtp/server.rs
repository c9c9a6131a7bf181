//! The SMTP listener: accepts connections within the total and per-client limits (making
//! room by evicting the idlest session when the table is full) and hands each to its own
//! task; on shutdown stops accepting and lets sessions drain.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::authgate::AuthGate;
use super::conn;
use super::reply::fixed;
use super::stress::{Caps, Table};
use crate::intake::Intake;

pub struct Server {
    pub intake: Arc<Intake>,
    pub tls: Arc<ArcSwapOption<TlsAcceptor>>,
    pub connections: Arc<Table>,
    pub auth: Arc<AuthGate>,
    /// Sessions stop at their next command wait.
    pub shutdown: CancellationToken,
    /// Sessions still running after the grace period are dropped.
    pub abort: CancellationToken,
    pub tracker: TaskTracker,
}

impl Server {
    /// Accepts on `listener` until shutdown.
    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                () = self.shutdown.cancelled() => break,
            };
            match accepted {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn admit(&self, stream: TcpStream, peer: SocketAddr) {
        let config = self.intake.config.load();
        let ip = peer.ip().to_canonical();
        let caps = Caps {
            max_total: config.smtp.max_connections,
            max_per_ip: config.smtp.max_connections_per_ip,
            stress_threshold: config.smtp.stress_threshold,
        };
        let Some(slot) = self.connections.try_take(ip, caps) else {
            tracing::info!(%peer, "connection refused: limit reached");
            self.tracker
                .spawn(conn::refuse(stream, fixed::TOO_MANY_CONNECTIONS));
            return;
        };
        let ctx = conn::Context {
            intake: self.intake.clone(),
            tls: self.tls.load_full().map(|t| (*t).clone()),
            auth: self.auth.clone(),
            slot,
            shutdown: self.shutdown.clone(),
        };
        let abort = self.abort.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                () = conn::serve(ctx, stream, peer) => {}
                () = abort.cancelled() => tracing::info!(%peer, "session dropped at shutdown"),
            }
        });
    }
}

//! The SMTP listener: accepts connections within the total and per-client limits and
//! hands each to its own task; on shutdown stops accepting and lets sessions drain.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::conn;
use super::reply::fixed;
use crate::intake::Intake;

/// Open connections, in total and per client address.
#[derive(Default)]
pub struct Connections {
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Releases a connection's slot when the session ends, however it ends.
struct Slot {
    connections: Arc<Connections>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.connections.per_ip.lock().expect("connections lock");
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

impl Connections {
    pub fn total(&self) -> usize {
        self.per_ip.lock().expect("connections lock").values().sum()
    }

    fn try_take(self: &Arc<Self>, ip: IpAddr, max_total: usize, max_per_ip: usize) -> Option<Slot> {
        let mut map = self.per_ip.lock().expect("connections lock");
        let total: usize = map.values().sum();
        let mine = map.get(&ip).copied().unwrap_or(0);
        if total >= max_total || mine >= max_per_ip {
            return None;
        }
        *map.entry(ip).or_insert(0) += 1;
        Some(Slot {
            connections: self.clone(),
            ip,
        })
    }
}

pub struct Server {
    pub intake: Arc<Intake>,
    pub tls: Arc<ArcSwapOption<TlsAcceptor>>,
    pub connections: Arc<Connections>,
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
        let Some(slot) = self.connections.try_take(
            ip,
            config.smtp.max_connections,
            config.smtp.max_connections_per_ip,
        ) else {
            tracing::info!(%peer, "connection refused: limit reached");
            self.tracker
                .spawn(conn::refuse(stream, fixed::TOO_MANY_CONNECTIONS));
            return;
        };
        let intake = self.intake.clone();
        let tls = self.tls.load_full().map(|t| (*t).clone());
        let shutdown = self.shutdown.clone();
        let abort = self.abort.clone();
        self.tracker.spawn(async move {
            let _slot = slot;
            tokio::select! {
                () = conn::serve(intake, tls, stream, peer, shutdown) => {}
                () = abort.cancelled() => tracing::info!(%peer, "session dropped at shutdown"),
            }
        });
    }
}

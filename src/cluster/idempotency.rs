//! Idempotency keys across nodes: a key is reserved in Redis before the local commit,
//! so that a retry through the load balancer to another node replays the first node's
//! response, or gets `409` while the first node still works on it. The local store
//! stays the record; Redis only carries the response to the other nodes.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Cluster;
use crate::queue::Remembered;

/// How long a reservation holds without its response: longer than any request takes.
const IN_FLIGHT: Duration = Duration::from_secs(60);
const PENDING: &str = "pending:";

/// Reserves `KEYS[1]` for `ARGV[1]` unless taken; returns what holds it, or nil.
const RESERVE_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
";

/// Drops `KEYS[1]` if it is still `ARGV[1]`'s reservation.
const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// What the cluster says about an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// Ours: go on, then [`Cluster::settle`].
    Reserved,
    /// Another node answered it: replay this.
    Replay(Remembered),
    /// Another node is working on it now.
    InFlight,
    /// Redis cannot say now: go on with the local store alone.
    Unavailable,
}

/// A remembered response as it travels between nodes.
#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    status: u16,
    body: String,
    request_sha256: String,
}

/// What the stored value of a key means.
fn read(value: &str) -> Reservation {
    if value.starts_with(PENDING) {
        return Reservation::InFlight;
    }
    match serde_json::from_str::<Wire>(value) {
        Ok(w) => Reservation::Replay(Remembered {
            status: w.status,
            body: w.body,
            request_sha256: w.request_sha256,
        }),
        // Not ours to interpret; the local store decides.
        Err(_) => Reservation::Unavailable,
    }
}

impl Cluster {
    /// Reserves `key` cluster-wide. One round trip, bounded by the command timeout.
    pub async fn reserve(&self, key: &str) -> Reservation {
        if !self.is_connected() {
            return Reservation::Unavailable;
        }
        let rkey = self.keys.idempotency(key);
        let mine = format!("{PENDING}{}", self.node);
        let arg = mine.clone();
        let held: Result<Option<String>, _> = self
            .call(|mut c| async move {
                redis::Script::new(RESERVE_SCRIPT)
                    .key(rkey)
                    .arg(arg)
                    .arg(IN_FLIGHT.as_millis() as u64)
                    .invoke_async(&mut c)
                    .await
            })
            .await;
        let r = match held {
            Ok(None) => Reservation::Reserved,
            // This node's own reservation, left by a run that stopped mid-request: the
            // local in-flight set already keeps concurrent duplicates apart here.
            Ok(Some(value)) if value == mine => Reservation::Reserved,
            Ok(Some(value)) => read(&value),
            Err(_) => Reservation::Unavailable,
        };
        match r {
            Reservation::Replay(_) => self
                .stats
                .idempotency_replays
                .fetch_add(1, Ordering::Relaxed),
            Reservation::InFlight => self
                .stats
                .idempotency_in_flight
                .fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        r
    }

    /// After the request: the response the local store remembered under `key` goes to
    /// Redis for `ttl`; with none (nothing final was answered) the reservation is
    /// dropped so that a retry may try again.
    pub async fn settle(&self, key: &str, remembered: Option<Remembered>, ttl: Duration) {
        let rkey = self.keys.idempotency(key);
        let done = match remembered {
            Some(r) => {
                let wire = serde_json::to_string(&Wire {
                    status: r.status,
                    body: r.body,
                    request_sha256: r.request_sha256,
                })
                .expect("a response serialises");
                let ms = ttl.as_millis().max(1) as u64;
                self.call(|mut c| async move {
                    redis::cmd("SET")
                        .arg(rkey)
                        .arg(wire)
                        .arg("PX")
                        .arg(ms)
                        .query_async::<()>(&mut c)
                        .await
                })
                .await
            }
            None => {
                let mine = format!("{PENDING}{}", self.node);
                self.call(|mut c| async move {
                    redis::Script::new(RELEASE_SCRIPT)
                        .key(rkey)
                        .arg(mine)
                        .invoke_async::<()>(&mut c)
                        .await
                })
                .await
            }
        };
        if let Err(e) = done {
            // The reservation expires by itself; the local store holds the answer.
            tracing::debug!(error = %e, "idempotency key not settled in Redis");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_back() {
        assert_eq!(read("pending:mx1"), Reservation::InFlight);
        assert_eq!(read("garbage"), Reservation::Unavailable);
        let r = read(r#"{"status":202,"body":"{}","request_sha256":"ab"}"#);
        assert_eq!(
            r,
            Reservation::Replay(Remembered {
                status: 202,
                body: "{}".into(),
                request_sha256: "ab".into()
            })
        );
    }
}

//! One suppression list for the cluster. Each node's `suppressions.db` stays the door's
//! fast path and its durable copy; what a node adds or removes (API, imports,
//! unsubscribes, bounces) is appended to a capped Redis stream, and every node applies
//! the others' entries from it, remembering in Redis how far it has read. A node that
//! was away (or Redis that was) catches up from its position, as far as the cap reaches.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Cluster, ClusterError};
use crate::suppression::{NewEntry, Reason, Scope, Shared, Suppressions, Target};

/// Changes kept in the stream (approximately: Redis trims in whole nodes).
const STREAM_CAP: usize = 100_000;
/// Changes a node holds while Redis is away; older ones beyond it are counted, unshared.
const HELD: usize = 10_000;
/// Stream entries read per heartbeat.
const READ: usize = 1_000;
/// Room in the channel from the suppression list.
pub const CHANNEL: usize = 4_096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct WireEntry {
    target: String,
    /// Empty for a global entry.
    scope: String,
    reason: String,
    source: String,
    expires_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Wire {
    Add { entries: Vec<WireEntry> },
    Remove { target: String, scope: String },
}

fn scope_text(s: &Scope) -> String {
    s.campaign().unwrap_or("").to_owned()
}

fn scope_of(text: &str) -> Option<Scope> {
    Scope::for_campaign(Some(text))
}

pub fn encode(change: &Shared) -> String {
    let wire = match change {
        Shared::Add(entries) => Wire::Add {
            entries: entries
                .iter()
                .map(|e| WireEntry {
                    target: e.target.as_column(),
                    scope: scope_text(&e.scope),
                    reason: e.reason.as_str().to_owned(),
                    source: e.source.clone(),
                    expires_ms: e.expires_ms,
                })
                .collect(),
        },
        Shared::Remove(scope, target) => Wire::Remove {
            target: target.as_column(),
            scope: scope_text(scope),
        },
    };
    serde_json::to_string(&wire).expect("a change serialises")
}

/// Reads a change back; entries that do not parse are left out, a change that does not
/// is `None`.
pub fn decode(payload: &[u8]) -> Option<Shared> {
    if payload.len() > 64 * 1024 * 1024 {
        return None;
    }
    match serde_json::from_slice::<Wire>(payload).ok()? {
        Wire::Add { entries } => Some(Shared::Add(
            entries
                .into_iter()
                .filter_map(|e| {
                    Some(NewEntry {
                        target: Target::parse(&e.target)?,
                        scope: scope_of(&e.scope)?,
                        reason: Reason::parse(&e.reason)?,
                        source: e.source,
                        expires_ms: e.expires_ms,
                    })
                })
                .collect(),
        )),
        Wire::Remove { target, scope } => {
            Some(Shared::Remove(scope_of(&scope)?, Target::parse(&target)?))
        }
    }
}

impl Cluster {
    fn stream(&self) -> String {
        format!("{}:suppressions", self.keys.prefix)
    }

    fn position(&self) -> String {
        format!("{}:suppressions:read:{}", self.keys.prefix, self.node)
    }

    /// Shares this node's changes and applies the others' until shutdown.
    pub async fn share_suppressions(
        self: Arc<Self>,
        list: Arc<Suppressions>,
        mut rx: mpsc::Receiver<Shared>,
        shutdown: CancellationToken,
    ) {
        let mut held: VecDeque<Shared> = VecDeque::new();
        let mut tick = tokio::time::interval(self.config.heartbeat.0);
        let mut position: Option<String> = None;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                change = rx.recv() => match change {
                    Some(change) => {
                        if held.len() == HELD {
                            held.pop_front();
                            self.stats.suppressions_unshared.fetch_add(1, Ordering::Relaxed);
                        }
                        held.push_back(change);
                        if self.is_connected() {
                            self.append(&mut held).await;
                        }
                    }
                    None => return,
                },
                _ = tick.tick() => {
                    if !self.is_connected() {
                        continue;
                    }
                    self.append(&mut held).await;
                    if let Err(e) = self.catch_up(&list, &mut position).await {
                        tracing::debug!(error = %e, "suppression stream not read");
                    }
                }
            }
        }
    }

    /// Appends what is held, oldest first, stopping at the first failure.
    async fn append(&self, held: &mut VecDeque<Shared>) {
        while let Some(change) = held.front() {
            let (stream, node, json) = (self.stream(), self.node.clone(), encode(change));
            let added = self
                .call(|mut c| async move {
                    redis::cmd("XADD")
                        .arg(stream)
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(STREAM_CAP)
                        .arg("*")
                        .arg("node")
                        .arg(node)
                        .arg("change")
                        .arg(json)
                        .query_async::<String>(&mut c)
                        .await
                })
                .await;
            if added.is_err() {
                return;
            }
            self.stats
                .suppressions_shared
                .fetch_add(1, Ordering::Relaxed);
            held.pop_front();
        }
    }

    /// Applies the other nodes' changes after this node's read position.
    async fn catch_up(
        &self,
        list: &Suppressions,
        position: &mut Option<String>,
    ) -> Result<(), ClusterError> {
        if position.is_none() {
            let key = self.position();
            let stored: Option<String> = self
                .call(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
                .await?;
            *position = Some(stored.unwrap_or_else(|| "0-0".to_owned()));
        }
        let after = position.clone().unwrap_or_default();
        let stream = self.stream();
        type Entries = Vec<(String, Vec<(String, Vec<u8>)>)>;
        let entries: Entries = self
            .call(|mut c| async move {
                redis::cmd("XRANGE")
                    .arg(stream)
                    .arg(format!("({after}"))
                    .arg("+")
                    .arg("COUNT")
                    .arg(READ)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let Some((last, _)) = entries.last() else {
            return Ok(());
        };
        let last = last.clone();
        for (_, fields) in entries {
            let from = fields
                .iter()
                .find(|(k, _)| k == "node")
                .map(|(_, v)| v.as_slice());
            if from == Some(self.node.as_bytes()) {
                continue;
            }
            let Some(change) = fields
                .iter()
                .find(|(k, _)| k == "change")
                .and_then(|(_, v)| decode(v))
            else {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if let Err(e) = list.apply(change).await {
                tracing::warn!(error = %e, "a shared suppression change was not applied");
                return Ok(());
            }
            self.stats
                .suppressions_applied
                .fetch_add(1, Ordering::Relaxed);
        }
        let key = self.position();
        let at = last.clone();
        self.call(|mut c| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(at)
                .query_async::<()>(&mut c)
                .await
        })
        .await?;
        *position = Some(last);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(target: &str, scope: Scope) -> NewEntry {
        NewEntry {
            target: Target::parse(target).unwrap(),
            scope,
            reason: Reason::Unsubscribed,
            source: "api".into(),
            expires_ms: Some(5),
        }
    }

    #[test]
    fn changes_round_trip() {
        let add = Shared::Add(vec![
            entry("u@example.com", Scope::Global),
            entry("@example.org", Scope::Campaign("spring".into())),
        ]);
        assert_eq!(decode(encode(&add).as_bytes()), Some(add));
        let remove = Shared::Remove(Scope::Global, Target::parse("u@example.com").unwrap());
        assert_eq!(decode(encode(&remove).as_bytes()), Some(remove));
        assert_eq!(decode(b"{}"), None);
        // An entry that does not parse is left out, the rest applies.
        let odd = br#"{"op":"add","entries":[{"target":"","scope":"","reason":"manual","source":"x","expires_ms":null},{"target":"a@b.test","scope":"","reason":"manual","source":"x","expires_ms":null}]}"#;
        let Some(Shared::Add(kept)) = decode(odd) else {
            panic!()
        };
        assert_eq!(kept.len(), 1);
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn mailboxes_round_trip(local in "[a-z0-9]{1,20}", domain in "[a-z]{1,20}\\.test", campaign in "[a-z]{0,10}") {
            let scope = Scope::for_campaign(Some(&campaign)).unwrap();
            let add = Shared::Add(vec![entry(&format!("{local}@{domain}"), scope)]);
            prop_assert_eq!(decode(encode(&add).as_bytes()), Some(add));
        }
    }
}

//! `/metrics` series of cluster mode; absent from the scrape when `[cluster]` is not set.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{Kind, Metric, Samples, Snapshot, labeled, one};
use crate::cluster::{Cluster, Stats};

fn cluster<'a>(s: &'a Snapshot<'_>) -> Option<&'a Cluster> {
    s.admin.intake.cluster.as_deref()
}

fn counter(s: &Snapshot, f: impl Fn(&Stats) -> &AtomicU64) -> Samples {
    cluster(s).and_then(|c| one(f(&c.stats).load(Ordering::Relaxed)))
}

pub(super) const METRICS: &[Metric] = &[
    Metric {
        name: "floodgate_cluster_connected",
        kind: Kind::Gauge,
        help: "1 while the last heartbeat reached Redis; 0 while the node runs on local state.",
        samples: |s| cluster(s).and_then(|c| one(u64::from(c.is_connected()))),
    },
    Metric {
        name: "floodgate_cluster_nodes",
        kind: Kind::Gauge,
        help: "Live nodes at the last heartbeat (this one included).",
        samples: |s| cluster(s).and_then(|c| one(u64::from(c.node_count()))),
    },
    Metric {
        name: "floodgate_cluster_node_queued",
        kind: Kind::Gauge,
        help: "Recipients in each node's spool, as that node last reported it.",
        samples: |s| {
            cluster(s).map(|c| {
                c.registry()
                    .into_iter()
                    .map(|n| labeled("node", n.node, n.queued))
                    .collect()
            })
        },
    },
    Metric {
        name: "floodgate_cluster_round_trips_total",
        kind: Kind::Counter,
        help: "Commands, pipelines and scripts sent to Redis.",
        samples: |s| counter(s, |st| &st.round_trips),
    },
    Metric {
        name: "floodgate_cluster_errors_total",
        kind: Kind::Counter,
        help: "Redis calls that failed or timed out (the caller went on with local state).",
        samples: |s| counter(s, |st| &st.errors),
    },
    Metric {
        name: "floodgate_cluster_reconnects_total",
        kind: Kind::Counter,
        help: "Times the node found Redis again after losing it (the first connection included).",
        samples: |s| counter(s, |st| &st.reconnects),
    },
    Metric {
        name: "floodgate_cluster_rate_leases_total",
        kind: Kind::Counter,
        help: "Rate leases taken from the shared per-destination buckets.",
        samples: |s| counter(s, |st| &st.leases),
    },
    Metric {
        name: "floodgate_cluster_rate_slots_total",
        kind: Kind::Counter,
        help: "Send slots those leases held.",
        samples: |s| counter(s, |st| &st.leased_slots),
    },
    Metric {
        name: "floodgate_cluster_fallback_sends_total",
        kind: Kind::Counter,
        help: "Transactions paced at the local share of the rate because Redis was away.",
        samples: |s| counter(s, |st| &st.fallback_sends),
    },
    Metric {
        name: "floodgate_cluster_changes_published_total",
        kind: Kind::Counter,
        help: "Shared settings (pauses, intake, failure log mode) this node wrote to Redis.",
        samples: |s| counter(s, |st| &st.published),
    },
    Metric {
        name: "floodgate_cluster_changes_applied_total",
        kind: Kind::Counter,
        help: "Shared settings made on other nodes and applied here.",
        samples: |s| counter(s, |st| &st.applied),
    },
    Metric {
        name: "floodgate_cluster_changes_refused_total",
        kind: Kind::Counter,
        help: "Payloads on the channel or in the state hash that were not a valid change.",
        samples: |s| counter(s, |st| &st.refused),
    },
    Metric {
        name: "floodgate_cluster_idempotency_replays_total",
        kind: Kind::Counter,
        help: "Requests answered with the response another node remembered for their Idempotency-Key.",
        samples: |s| counter(s, |st| &st.idempotency_replays),
    },
    Metric {
        name: "floodgate_cluster_idempotency_in_flight_total",
        kind: Kind::Counter,
        help: "Requests refused with 409 because another node held their Idempotency-Key.",
        samples: |s| counter(s, |st| &st.idempotency_in_flight),
    },
    Metric {
        name: "floodgate_cluster_suppressions_shared_total",
        kind: Kind::Counter,
        help: "Suppression changes made here and appended to the cluster's stream.",
        samples: |s| counter(s, |st| &st.suppressions_shared),
    },
    Metric {
        name: "floodgate_cluster_suppressions_applied_total",
        kind: Kind::Counter,
        help: "Suppression changes made on other nodes and applied to this node's list.",
        samples: |s| counter(s, |st| &st.suppressions_applied),
    },
    Metric {
        name: "floodgate_cluster_suppressions_unshared_total",
        kind: Kind::Counter,
        help: "Suppression changes dropped unshared: more than 10,000 held while Redis was away.",
        samples: |s| counter(s, |st| &st.suppressions_unshared),
    },
];

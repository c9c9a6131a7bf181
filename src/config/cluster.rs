//! `[cluster]`: the Redis (or Valkey) that several nodes share their rates, pauses,
//! guard counts, idempotency keys and suppressions through. Absent, the daemon is a
//! single node and needs no Redis.

use serde::Deserialize;

use super::Dur;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `redis://[:password@]host:port/db` or `rediss://` for TLS.
    pub redis: String,
    /// This node's name in the registry; empty means the machine's hostname.
    pub node: String,
    /// How long the first connection and each reconnection may take.
    pub connect_timeout: Dur,
    /// How long one command may take before the caller goes on with local state: the
    /// longest Redis can ever add to an SMTP or HTTP answer.
    pub command_timeout: Dur,
    /// How often the node writes its heartbeat, guard counts and rates.
    pub heartbeat: Dur,
    /// A node whose heartbeat is older than this is left out of the node count.
    pub node_ttl: Dur,
    /// How far ahead one rate lease reaches: a node takes at most this much of a
    /// destination's rate per round trip.
    pub lease: Dur,
    /// While Redis is unreachable each node delivers at the destination's rate divided
    /// by this; 0 means by the last node count seen.
    pub fallback_divisor: u32,
    /// Prefix of every key and channel, so that two clusters can share one Redis.
    pub prefix: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            redis: String::new(),
            node: String::new(),
            connect_timeout: Dur::secs(2),
            command_timeout: Dur::millis(250),
            heartbeat: Dur::secs(1),
            node_ttl: Dur::secs(5),
            lease: Dur::secs(1),
            fallback_divisor: 0,
            prefix: "floodgate".into(),
        }
    }
}

impl ClusterConfig {
    pub fn validate(&self) -> Result<(), &'static str> {
        if !(self.redis.starts_with("redis://") || self.redis.starts_with("rediss://")) {
            return Err("redis must be a redis:// or rediss:// URL");
        }
        if self.command_timeout.0.is_zero()
            || self.connect_timeout.0.is_zero()
            || self.heartbeat.0.is_zero()
            || self.lease.0.is_zero()
        {
            return Err("timeouts, heartbeat and lease must be above 0");
        }
        if self.node_ttl.0 <= self.heartbeat.0 {
            return Err("node_ttl must be longer than heartbeat");
        }
        if self.prefix.is_empty() || self.prefix.contains(char::is_whitespace) {
            return Err("prefix must be a non-empty word");
        }
        if self
            .node
            .contains(|c: char| c.is_whitespace() || c.is_control())
        {
            return Err("node must have no spaces or control characters");
        }
        Ok(())
    }

    /// The node's name: `node`, or the hostname the kernel reports.
    pub fn node_name(&self) -> String {
        if !self.node.is_empty() {
            return self.node.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "floodgate".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("/etc/floodgate/test.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn absent_means_single_node() {
        assert_eq!(parse("").unwrap().cluster, None);
    }

    #[test]
    fn defaults_and_refusals() {
        let c = parse("[cluster]\nredis = \"rediss://:secret@10.0.0.5:6380/0\"\nnode = \"mx1\"\n")
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(c.node_name(), "mx1");
        assert_eq!(c.command_timeout.0, std::time::Duration::from_millis(250));
        assert_eq!(c.fallback_divisor, 0);
        for (bad, why) in [
            ("redis = \"http://x\"", "redis://"),
            ("redis = \"redis://x\"\nnode_ttl = \"1s\"", "node_ttl"),
            ("redis = \"redis://x\"\ncommand_timeout = \"0s\"", "above 0"),
            ("redis = \"redis://x\"\nnode = \"a b\"", "node"),
            ("redis = \"redis://x\"\nprefix = \"\"", "prefix"),
        ] {
            let e = parse(&format!("[cluster]\n{bad}\n")).unwrap_err();
            assert!(e.contains("cluster") && e.contains(why), "{bad}: {e}");
        }
        assert!(
            parse("[cluster]\nredis = \"redis://x\"\nbogus = 1\n").is_err(),
            "unknown keys are errors"
        );
    }
}

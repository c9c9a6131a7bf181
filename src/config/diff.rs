//! What changed between two configs, key by key (`smtp.allowed_networks`), compared with
//! the structs' derived `PartialEq`; and which keys only a restart can change.

use super::Config;

/// Keys read once at start: a reload reports them and keeps the running value.
pub const RESTART_ONLY: &[&str] = &[
    "smtp.listen",
    "http.listen",
    "admin.listen",
    "queue.dir",
    "queue.synchronous",
    // Channel capacities are fixed when the channels are made.
    "faillog.channel_capacity",
    // The log subscriber is installed once, before the config's other parts start.
    "log.format",
    "events.max_pending",
    // The AUTH pool and its failure limiter are built once, at start.
    "smtp.auth_workers",
    "smtp.auth_queue",
    "smtp.auth_fail_burst",
    "smtp.auth_fail_interval",
    // The public listener and the token key are set up once, at start.
    "suppression.unsubscribe",
];

/// Pushes `section.field` for every listed field that differs; if the section differs
/// in a field not listed, the section's name alone, so that no change goes unreported.
macro_rules! diff {
    ($out:ident, $old:expr, $new:expr, $section:literal, [$($field:ident),* $(,)?]) => {{
        let (old, new) = (&$old, &$new);
        let before = $out.len();
        $(
            if old.$field != new.$field {
                $out.push(concat!($section, ".", stringify!($field)).to_owned());
            }
        )*
        if $out.len() == before && old != new {
            $out.push($section.to_owned());
        }
    }};
}

impl Config {
    /// Every key whose value differs between `self` and `new`, as `section.key`
    /// (`route` for any change to the `[[route]]` list).
    pub fn changed_keys(&self, new: &Config) -> Vec<String> {
        let mut out = Vec::new();
        self.changed_intake_keys(new, &mut out);
        self.changed_delivery_keys(new, &mut out);
        if self.routes != new.routes {
            out.push("route".to_owned());
        }
        if self.dkim != new.dkim {
            out.push("dkim".to_owned());
        }
        diff!(
            out,
            self.tls_report,
            new.tls_report,
            "tls_report",
            [enabled, organization, contact, from, retention]
        );
        diff!(
            out,
            self.suppression,
            new.suppression,
            "suppression",
            [expire_after]
        );
        diff!(
            out,
            self.log,
            new.log,
            "log",
            [format, outcomes_per_sec, outcomes_burst, summary_interval]
        );
        diff!(
            out,
            self.canary,
            new.canary,
            "canary",
            [enabled, interval, timeout, slow, probes]
        );
        if self.cluster != new.cluster {
            out.push("cluster".to_owned());
        }
        out
    }

    /// `[server]`, `[smtp]`, `[http]`, `[admin]`, `[queue]` and `[dns]`.
    fn changed_intake_keys(&self, new: &Config, out: &mut Vec<String>) {
        diff!(
            out,
            self.server,
            new.server,
            "server",
            [hostname, shutdown_grace]
        );
        diff!(
            out,
            self.smtp,
            new.smtp,
            "smtp",
            [
                listen,
                max_connections,
                max_connections_per_ip,
                max_message_size,
                max_recipients,
                max_bad_commands,
                idle_timeout,
                data_timeout,
                allowed_networks,
                auth_without_tls_on_loopback,
                campaign_from,
                tls,
                users,
                data_min_rate,
                session_lifetime,
                stress_threshold,
                stress_idle_timeout,
                stress_data_timeout,
                auth_workers,
                auth_queue,
                auth_fail_burst,
                auth_fail_interval,
            ]
        );
        diff!(
            out,
            self.http,
            new.http,
            "http",
            [listen, max_request_size, idempotency_ttl, api_keys]
        );
        diff!(out, self.admin, new.admin, "admin", [listen, token]);
        diff!(
            out,
            self.queue,
            new.queue,
            "queue",
            [
                dir,
                synchronous,
                max_batch,
                max_size_mb,
                lease,
                retention,
                backup_dir
            ]
        );
        diff!(
            out,
            self.dns,
            new.dns,
            "dns",
            [
                nameservers,
                timeout,
                attempts,
                cache_size,
                min_ttl,
                max_ttl,
                temp_fail_ttl
            ]
        );
    }

    /// `[delivery]`, `[faillog]`, `[guard]` and `[events]`.
    fn changed_delivery_keys(&self, new: &Config, out: &mut Vec<String>) {
        diff!(
            out,
            self.delivery,
            new.delivery,
            "delivery",
            [
                enabled,
                rate,
                rates,
                concurrency,
                max_concurrency,
                batch,
                backoff,
                max_age,
                bounces,
                connect_timeout,
                command_timeout,
                data_timeout,
                idle_connection,
                mta_sts,
                mta_sts_port,
                bounce_rules,
            ]
        );
        diff!(
            out,
            self.faillog,
            new.faillog,
            "faillog",
            [
                mode,
                sample_rate,
                rows_per_sec,
                burst,
                channel_capacity,
                batch_rows,
                flush_interval,
                retention,
                max_rows,
                stats_retention,
            ]
        );
        diff!(
            out,
            self.guard,
            new.guard,
            "guard",
            [
                enabled,
                window,
                min_events,
                failure_ratio,
                action,
                faillog_rows_per_sec_alert,
                alert_webhook,
                alert_webhook_secret,
                alert_webhook_per_minute,
            ]
        );
        diff!(
            out,
            self.events,
            new.events,
            "events",
            [
                urls,
                secret,
                batch_max,
                flush_interval,
                max_pending,
                retry,
                timeout
            ]
        );
    }

    /// Puts the running values of [`RESTART_ONLY`] keys back into `self` (a config
    /// about to be applied), so that the live config describes what actually runs.
    pub fn keep_restart_only(&mut self, running: &Config) {
        self.smtp.listen = running.smtp.listen.clone();
        self.http.listen = running.http.listen;
        self.admin.listen = running.admin.listen;
        self.queue.dir = running.queue.dir.clone();
        self.queue.synchronous = running.queue.synchronous;
        self.faillog.channel_capacity = running.faillog.channel_capacity;
        self.events.max_pending = running.events.max_pending;
        self.smtp.auth_workers = running.smtp.auth_workers;
        self.smtp.auth_queue = running.smtp.auth_queue;
        self.smtp.auth_fail_burst = running.smtp.auth_fail_burst;
        self.suppression.unsubscribe = running.suppression.unsubscribe.clone();
        self.smtp.auth_fail_interval = running.smtp.auth_fail_interval;
        self.log.format = running.log.format;
        // The connection and its tasks are built once, at start.
        self.cluster = running.cluster.clone();
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text, Path::new("/etc/floodgate/test.toml")).unwrap()
    }

    #[test]
    fn keys_are_named_precisely() {
        let a = parse("[smtp]\nallowed_networks = [\"127.0.0.0/8\"]\n");
        let b = parse("[smtp]\nallowed_networks = [\"10.0.0.0/8\"]\n");
        assert_eq!(a.changed_keys(&b), ["smtp.allowed_networks"]);
        let c = parse("[delivery]\nrate = \"5/s\"\n[faillog]\nbatch_rows = 10\n");
        assert_eq!(
            a.changed_keys(&c),
            [
                "smtp.allowed_networks",
                "delivery.rate",
                "faillog.batch_rows"
            ]
        );
        assert!(a.changed_keys(&a.clone()).is_empty());
    }

    #[test]
    fn keeping_restart_only_keys_leaves_only_live_changes() {
        let a = parse("[queue]\ndir = \"/a\"\n[smtp]\nlisten = [\"127.0.0.1:25\"]\n");
        let mut b = parse("[queue]\ndir = \"/b\"\nmax_batch = 5\n");
        let changed = a.changed_keys(&b);
        assert!(changed.iter().any(|k| k == "queue.dir"), "{changed:?}");
        b.keep_restart_only(&a);
        assert_eq!(a.changed_keys(&b), ["queue.max_batch"]);
    }

    #[test]
    fn the_log_format_needs_a_restart_and_its_budget_does_not() {
        let a = parse("[log]\nformat = \"text\"\n");
        let mut b = parse("[log]\nformat = \"json\"\noutcomes_per_sec = 5\n");
        assert_eq!(a.changed_keys(&b), ["log.format", "log.outcomes_per_sec"]);
        assert!(RESTART_ONLY.contains(&"log.format"));
        b.keep_restart_only(&a);
        assert_eq!(a.changed_keys(&b), ["log.outcomes_per_sec"]);
    }
}

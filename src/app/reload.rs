//! Live reload (SIGHUP): every changed key is either applied to the running parts or
//! reported as needing a restart, never claimed as applied when it was not.

use std::sync::Arc;

use super::{App, AppError, admin_token, load_tls};
use crate::bounce::Classifier;
use crate::config::Config;
use crate::config::diff::RESTART_ONLY;
use crate::dkim::Signers;

/// What a reload did, key by key (`section.key`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Keys whose new value is in force.
    pub applied: Vec<String>,
    /// Keys that changed in the file but keep their running value until a restart.
    pub needs_restart: Vec<String>,
}

impl App {
    /// Applies a new config live. On error nothing changes.
    pub fn reload(&self, mut new: Config) -> Result<Reloaded, AppError> {
        let old = self.intake.config.load_full();
        let tls = load_tls(new.smtp.tls.as_ref())?;
        // A generated token lives in the running state directory (`[queue] dir` and the
        // admin listener need a restart).
        let mut running = new.clone();
        running.keep_restart_only(&old);
        new.admin.token = admin_token(&running)?;
        let mut out = Reloaded::default();
        for key in old.changed_keys(&new) {
            if RESTART_ONLY.contains(&key.as_str()) {
                tracing::warn!(
                    key,
                    "changed in the config file but needs a restart; keeping the old value"
                );
                out.needs_restart.push(key);
            } else {
                out.applied.push(key);
            }
        }
        new.keep_restart_only(&old);
        let changed = |prefix: &str| {
            out.applied
                .iter()
                .any(|k| k == prefix || k.starts_with(&format!("{prefix}.")))
        };
        if changed("dns") {
            let resolver = self.resolvers.build(&new)?;
            self.intake.policy.dns.reconfigure(resolver, &new.dns);
        }
        // Keys are read before anything is applied: an unreadable key fails the reload.
        let signers = if changed("dkim") {
            Some(Signers::load(&new.dkim)?)
        } else {
            None
        };
        // Read at every reload, changed path or not: the operator edits the file and
        // sends SIGHUP. A file that does not compile refuses the reload.
        let bounce_rules = Classifier::load(new.delivery.bounce_rules.as_deref())?;
        // Nothing can fail from here on: apply.
        self.server.tls.store(tls.map(Arc::new));
        if let Some(signers) = signers {
            self.intake.signing.replace(signers);
        }
        self.bounce_rules.store(Arc::new(bounce_rules));
        if changed("faillog") {
            self.faillog.set_config(&new.faillog);
        }
        let queue = &self.intake.queue;
        queue.set_max_batch(new.queue.max_batch);
        queue.set_max_size(new.queue.max_size_mb);
        let enabled = new.delivery.enabled;
        let delivery = new.delivery.clone();
        // Stored before the scheduler is touched: a scheduler started now reads it.
        self.intake.config.store(Arc::new(new));
        match (old.delivery.enabled, enabled) {
            (false, true) => self.start_scheduler(),
            (true, false) => self.stop_scheduler(),
            _ => {}
        }
        if let Some(scheduler) = self.running_scheduler() {
            scheduler.reconfigure(&delivery);
            scheduler.wake.notify_one();
        }
        if self.webhook.enable_all() > 0 {
            out.applied.push("webhook endpoints re-enabled".to_owned());
        }
        Ok(out)
    }
}

//! Reload (SIGHUP, [`Gateway::reload`]): the new config and mapping are loaded and validated first;
//! an invalid one is refused (every issue logged) and the running one stays. A valid one replaces the
//! *field side* only: the buses and the recorder are stopped as in [`Gateway::stop`]'s first stages
//! and started again with the new config. The store (same sled handle, never reopened), the sender
//! and the admin API keep running, and queued records keep the BizData rendered when they were
//! detected. What cannot change live (`[site] state_dir` and `timezone`, `[admin]`, `[panda]`,
//! `[outbox]`) keeps its running value, and the log says a restart is needed. Bus counters of buses
//! that keep their name, and the live view when the meter list is the same, carry over.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::modbus::stats::BusStats;
use crate::recorder::live::Live;

use super::field::spawn_field;
use super::{running_status, watch_list, Gateway};

impl Gateway {
    /// Reload the config file at `path` (and the mapping it names), as on SIGHUP. An invalid file is
    /// refused: every issue is logged at error level, the running configuration stays, and the
    /// error is returned. A valid one restarts the buses and the recorder with it (see the module
    /// docs for what is kept and what needs a restart).
    pub async fn reload(&mut self, path: &Path) -> Result<(), ConfigError> {
        self.notifier.reloading();
        tracing::info!(message = "Reloading the configuration.", path = %path.display());
        let load_path = path.to_path_buf();
        let loaded = tokio::task::spawn_blocking(move || crate::config::load(&load_path))
            .await
            .unwrap_or_else(|e| {
                Err(ConfigError {
                    issues: vec![crate::config::ConfigIssue {
                        file: path.to_path_buf(),
                        line: None,
                        field: String::new(),
                        message: format!("the loader failed: {e}"),
                    }],
                })
            });
        match loaded {
            Ok(cfg) => {
                self.apply(cfg).await;
                Ok(())
            }
            Err(e) => {
                for issue in &e.issues {
                    tracing::error!(message = "Invalid configuration.", issue = %issue);
                }
                tracing::error!(
                    message = "Reload refused; the running configuration stays.",
                    path = %path.display(),
                    errors = e.issues.len(),
                );
                self.notifier.ready(&format!(
                    "{} Last reload refused: {} error(s) in {}.",
                    running_status(&self.cfg, &self.outbox),
                    e.issues.len(),
                    path.display()
                ));
                Err(e)
            }
        }
    }

    /// Apply a validated config: restart the field side with it, keep everything else.
    async fn apply(&mut self, new: Config) {
        let new = Arc::new(keep_what_needs_a_restart(&self.cfg, new));
        // Counters of buses that keep their name go on (monotonic for the admin API and metrics).
        let bus_stats: Vec<Arc<BusStats>> = new
            .buses
            .iter()
            .map(|b| {
                self.cfg
                    .buses
                    .iter()
                    .position(|old| old.name == b.name)
                    .and_then(|i| self.bus_stats.get(i).cloned())
                    .unwrap_or_default()
            })
            .collect();
        // The live view is indexed by meter: keep it when the meter list is the same.
        let same_meters = self.cfg.meters.len() == new.meters.len()
            && self
                .cfg
                .meters
                .iter()
                .zip(&new.meters)
                .all(|(a, b)| a.meter_no == b.meter_no);
        let live = if same_meters {
            self.live.clone()
        } else {
            let fresh = Live::with_clock(new.meters.len(), self.live.clock.clone());
            // `fieldgate_transitions_total` stays monotonic across a reload.
            fresh
                .transitions
                .store(self.live.transitions.load(Ordering::Relaxed), Ordering::Relaxed);
            fresh
        };

        if let Some(field) = self.field.take() {
            field.stop(self.grace).await;
        }
        self.liveness.watch(watch_list(&new, &bus_stats, self.stall_slack));
        self.field = Some(spawn_field(
            &new,
            &self.outbox,
            &self.wake,
            &live,
            &bus_stats,
            &self.recorders,
            self.liveness.station(),
        ));
        *self.admin_field.write().unwrap_or_else(|e| e.into_inner()) = crate::ops::sources::FieldView {
            cfg: new.clone(),
            live: live.clone(),
            buses: bus_stats.clone(),
        };
        self.cfg = new;
        self.bus_stats = bus_stats;
        self.live = live;
        tracing::info!(
            message = "Configuration reloaded.",
            buses = self.cfg.buses.len(),
            meters = self.cfg.meters.len(),
            mapping_rows = self.cfg.mapping.len(),
            events = self.cfg.events.len(),
            queued = self.outbox.len(),
        );
        self.notifier.ready(&running_status(&self.cfg, &self.outbox));
    }
}

/// `new`, with the parts that cannot change in a running gateway set back to their running values;
/// each such change is logged with "restart needed".
fn keep_what_needs_a_restart(old: &Config, mut new: Config) -> Config {
    let mut kept = Vec::new();
    if new.site.state_dir != old.site.state_dir {
        kept.push("[site] state_dir");
        new.site.state_dir = old.site.state_dir.clone();
    }
    if new.site.timezone != old.site.timezone {
        kept.push("[site] timezone");
        new.site.timezone = old.site.timezone;
    }
    if new.admin.listen != old.admin.listen || new.admin.allow_remote != old.admin.allow_remote {
        kept.push("[admin]");
        new.admin = old.admin.clone();
    }
    if panda_differs(&old.panda, &new.panda) {
        kept.push("[panda]");
        new.panda = old.panda.clone();
    }
    if format!("{:?}", old.outbox) != format!("{:?}", new.outbox) {
        kept.push("[outbox]");
        new.outbox = old.outbox.clone();
    }
    if !kept.is_empty() {
        tracing::warn!(
            message = "These settings changed but cannot be applied to a running gateway; they keep their running values until a restart (systemctl restart fieldgate).",
            sections = %kept.join(", "),
        );
    }
    new
}

/// Whether two `[panda]` sections differ, password included (its Debug form is redacted).
fn panda_differs(a: &crate::config::PandaConfig, b: &crate::config::PandaConfig) -> bool {
    use crate::config::Auth;
    let password = |p: &crate::config::PandaConfig| match &p.auth {
        Auth::Token { password, .. } => Some(password.clone()),
        Auth::None => None,
    };
    format!("{a:?}") != format!("{b:?}") || password(a) != password(b)
}

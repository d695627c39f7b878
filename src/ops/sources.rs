//! What the operator's views read: [`AdminState`], the handles on the running daemon (its store, the
//! sender's counters, the buses and meters, more health sources) that the admin API, `/healthz` and
//! `/metrics` are computed from.
//!
//! Invariants: the handles are the daemon's own (nothing here opens a store or starts a task), and the
//! field view is shared with the daemon, which swaps it on reload (`SharedField`).
//!
//! Never: decides health ([`crate::ops::health`]) or serves a route ([`crate::ops::admin`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::Notify;

use crate::config::Config;
use crate::delivery::sender::stats::SenderStats;
use crate::modbus::stats::BusStats;
use crate::ops::api::{DeliveryView, Finding};
use crate::recorder::live::Live;
use crate::store::Store;

/// Something that contributes health findings (buses, meters, …), added with [`AdminState::with_check`].
pub(crate) trait HealthCheck: Send + Sync {
    /// The current findings; empty when all is well.
    fn findings(&self) -> Vec<Finding>;
}

/// The field side as the admin API sees it: names from the configuration, the live meter view and the
/// bus counters. Without it (e.g. an outbox-only admin in tests) `/buses` and `/meters` are empty and
/// health has no bus or meter findings.
#[derive(Clone)]
pub(crate) struct FieldView {
    /// The configuration the buses and the recorder run with (bus and meter names, units, reading fields).
    pub(crate) cfg: Arc<Config>,
    /// Live meter view, indexed like `cfg.meters`.
    pub(crate) live: Arc<Live>,
    /// Bus counters, indexed like `cfg.buses`.
    pub(crate) buses: Vec<Arc<BusStats>>,
}

/// What the admin API serves from. Cheap to clone.
#[derive(Clone)]
pub struct AdminState {
    /// The daemon's store.
    pub(crate) outbox: Store,
    pub(crate) sender: Arc<SenderStats>,
    /// `site.name`.
    pub(crate) site: String,
    /// Notified after a requeue, so the sender does not wait for its idle tick.
    pub(crate) wake: Option<Arc<Notify>>,
    /// More health sources.
    pub(crate) checks: Vec<Arc<dyn HealthCheck>>,
    /// Buses and meters, when the daemon runs them. Shared with the daemon, which swaps it on reload.
    field: Option<SharedField>,
    /// The admin API listens on a loopback address (what a state-changing request's `Host` must then
    /// name, see `crate::ops::same_origin`).
    pub(crate) loopback: bool,
}

/// A [`FieldView`] the daemon replaces when a reload changes buses or meters.
pub(crate) type SharedField = Arc<std::sync::RwLock<FieldView>>;

impl AdminState {
    /// State with the outbox, the sender's counters and the site name.
    pub fn new(outbox: Store, sender: Arc<SenderStats>, site: impl Into<String>) -> AdminState {
        AdminState {
            outbox,
            sender,
            site: site.into(),
            wake: None,
            checks: Vec::new(),
            field: None,
            loopback: true,
        }
    }

    /// Whether the admin API listens on a loopback address (set by the server when it starts).
    pub(crate) fn on_loopback(mut self, loopback: bool) -> AdminState {
        self.loopback = loopback;
        self
    }

    /// Serve buses and meters from a view the daemon keeps current across reloads.
    pub(crate) fn with_shared_field(mut self, field: SharedField) -> AdminState {
        self.field = Some(field);
        self
    }

    /// The current field view (a copy of its handles).
    pub(crate) fn field_view(&self) -> Option<FieldView> {
        self.field
            .as_ref()
            .map(|f| f.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Wake the sender with this after a requeue.
    pub fn with_wake(mut self, wake: Arc<Notify>) -> AdminState {
        self.wake = Some(wake);
        self
    }

    /// Add a health source.
    pub(crate) fn with_check(mut self, check: Arc<dyn HealthCheck>) -> AdminState {
        self.checks.push(check);
        self
    }

    /// The work orders delivered last, newest first (`GET /deliveries`).
    pub(crate) fn recent_deliveries(&self) -> Vec<DeliveryView> {
        self.sender
            .recent
            .newest_first()
            .iter()
            .map(DeliveryView::from)
            .collect()
    }

    /// Valve transitions committed since start (0 without a field view).
    pub(crate) fn transitions(&self) -> u64 {
        self.field_view()
            .map_or(0, |f| f.live.transitions.load(Ordering::Relaxed))
    }
}

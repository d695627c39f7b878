//! Wiring of the daemon: open the store, start one task per bus, the station and the sender, and
//! stop them in an order that loses nothing.
//!
//! Shutdown order: buses stop first (a request in flight finishes or times out); the station then
//! applies every cycle still in the channel and syncs; last the sender stops (an in-flight request
//! may finish; if abandoned, its records stay queued and are sent again next start).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{AdminError, AdminState};
use crate::bus::{run_bus, BusStats};
use crate::config::Config;
use crate::outbox::{Limits, Outbox, OutboxError};
use crate::panda::{PandaClient, PandaError};
use crate::sender::{run_sender, SenderConfig, SenderStats};
use crate::station::{Live, Station};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The state database.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// The Panda client.
    #[error(transparent)]
    Panda(#[from] PandaError),
    /// The admin API.
    #[error(transparent)]
    Admin(#[from] AdminError),
}

/// A running gateway.
pub struct Gateway {
    /// The validated configuration it runs with.
    pub cfg: Arc<Config>,
    /// The store (shared with the tasks).
    pub outbox: Outbox,
    /// Live view of the meters.
    pub live: Arc<Live>,
    /// Per-bus counters, indexed like `cfg.buses`.
    pub bus_stats: Vec<Arc<BusStats>>,
    /// Delivery counters.
    pub sender_stats: Arc<SenderStats>,
    /// Where the admin API listens (the bound address, useful with port 0).
    pub admin_addr: Option<std::net::SocketAddr>,
    stop_admin: CancellationToken,
    admin: JoinHandle<()>,
    stop_buses: CancellationToken,
    stop_sender: CancellationToken,
    buses: Vec<JoinHandle<()>>,
    station: JoinHandle<()>,
    sender: JoinHandle<()>,
}

/// Open the store and start every task.
pub async fn start(cfg: Config) -> Result<Gateway, StartError> {
    let cfg = Arc::new(cfg);
    let limits = Limits {
        max_records: cfg.outbox.max_records,
        max_bytes: cfg.outbox.max_bytes,
    };
    let dir = cfg.site.state_dir.clone();
    let outbox = tokio::task::spawn_blocking(move || Outbox::open(&dir, limits))
        .await
        .map_err(|e| OutboxError::Sync {
            path: cfg.site.state_dir.clone(),
            source: std::io::Error::other(e),
        })??;
    let client = PandaClient::new(&cfg.panda, cfg.site.timezone)?;
    // Bound before any task starts, so a bad [admin] listen fails the start cleanly.
    let admin_listener = crate::admin::bind(&cfg.admin).await?;
    let admin_addr = admin_listener.local_addr().ok();
    let live = Live::new(cfg.meters.len());
    let wake = Arc::new(Notify::new());
    let stop_buses = CancellationToken::new();
    let stop_sender = CancellationToken::new();

    // Bounded: a slow disk makes bus tasks wait instead of piling up samples.
    let (tx, rx) = mpsc::channel(4 * cfg.buses.len().max(1));
    let station = Station::new(cfg.clone(), outbox.clone(), wake.clone(), live.clone());
    let station = tokio::spawn(station.run(rx));

    let mut bus_stats = Vec::new();
    let mut buses = Vec::new();
    for i in 0..cfg.buses.len() {
        let stats = Arc::new(BusStats::default());
        bus_stats.push(stats.clone());
        buses.push(tokio::spawn(supervise_bus(
            cfg.clone(),
            i,
            tx.clone(),
            stop_buses.clone(),
            stats,
        )));
    }
    drop(tx);

    let sender_stats = Arc::new(SenderStats::default());
    let stop_admin = CancellationToken::new();
    let admin_state = AdminState::new(outbox.clone(), sender_stats.clone(), cfg.site.name.clone())
        .with_wake(wake.clone())
        .with_field(cfg.clone(), live.clone(), bus_stats.clone());
    let admin = tokio::spawn({
        let stop = stop_admin.clone();
        async move {
            if let Err(e) = crate::admin::serve_admin(admin_listener, admin_state, stop).await {
                tracing::error!(message = "Admin API failed.", error = %e);
            }
        }
    });
    let sender = tokio::spawn(run_sender(
        outbox.clone(),
        client,
        SenderConfig::from_config(&cfg),
        wake,
        stop_sender.clone(),
        sender_stats.clone(),
    ));
    tracing::info!(
        message = "Gateway started.",
        site = %cfg.site.name,
        buses = cfg.buses.len(),
        meters = cfg.meters.len(),
        queued = outbox.len(),
    );
    Ok(Gateway {
        cfg,
        outbox,
        live,
        bus_stats,
        sender_stats,
        admin_addr,
        stop_admin,
        admin,
        stop_buses,
        stop_sender,
        buses,
        station,
        sender,
    })
}

impl Gateway {
    /// Stop in order (buses, station, sender) and make everything durable. Bounded: each stage
    /// gets `grace`; a stage that overruns is abandoned, which loses nothing already committed.
    /// Returns the number of records still queued.
    pub async fn stop(self, grace: Duration) -> u64 {
        self.stop_buses.cancel();
        for b in self.buses {
            if tokio::time::timeout(grace, b).await.is_err() {
                tracing::warn!(message = "A bus task did not stop in time; abandoned.");
            }
        }
        if tokio::time::timeout(grace, self.station).await.is_err() {
            tracing::warn!(message = "The station did not finish in time; abandoned.");
        }
        self.stop_sender.cancel();
        if tokio::time::timeout(grace, self.sender).await.is_err() {
            tracing::warn!(message = "The sender did not stop in time; its in-flight batch stays queued.");
        }
        // Last, so health stays readable while everything else drains.
        self.stop_admin.cancel();
        if tokio::time::timeout(grace, self.admin).await.is_err() {
            tracing::warn!(message = "The admin API did not stop in time; abandoned.");
        }
        if let Err(e) = self.outbox.sync().await {
            tracing::error!(message = "Final sync failed.", error = %e);
        }
        let queued = self.outbox.len();
        tracing::info!(message = "Gateway stopped.", queued);
        queued
    }
}

/// Run a bus task; if it ever panics (a bug, never expected), log it and start it again after a
/// pause, so one bad bus can never stop the others or the station.
async fn supervise_bus(
    cfg: Arc<Config>,
    bus: usize,
    cycles: mpsc::Sender<crate::station::Cycle>,
    shutdown: CancellationToken,
    stats: Arc<BusStats>,
) {
    loop {
        let task = tokio::spawn(run_bus(
            cfg.clone(),
            bus,
            cycles.clone(),
            shutdown.clone(),
            stats.clone(),
        ));
        match task.await {
            Ok(()) => return,
            Err(e) => {
                let name = cfg.buses.get(bus).map_or("?", |b| b.name.as_str());
                tracing::error!(message = "Bus task failed; restarting it.", bus = %name, error = %e);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Run until SIGTERM or Ctrl-C, then stop cleanly.
pub async fn run(cfg: Config) -> Result<(), StartError> {
    let grace = cfg.panda.timeout.max(Duration::from_secs(2));
    let gw = start(cfg).await?;
    shutdown_signal().await;
    tracing::info!(message = "Shutdown requested.");
    gw.stop(grace).await;
    Ok(())
}

/// Resolves on SIGTERM, SIGINT or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

//! Wiring of the daemon: open the store, start one task per bus, the recorder and the sender, the admin
//! API and the watchdog, and stop them in an order that loses nothing.
//!
//! Shutdown order ([`Gateway::stop`]): STOPPING=1, and the watchdog stops pinging; the buses stop first
//! (a Modbus request in flight finishes or times out); the recorder then applies every cycle still in
//! the channel and syncs; then the sender stops (an in-flight request may finish; if abandoned, its
//! records stay queued and are sent again next start); the admin API last, so health stays readable
//! while everything else drains; then a final sync. Each stage gets the grace period. A bus task, the
//! sender or the admin API that overruns it is abandoned; a recorder that overruns it is shut out by
//! its gate, which waits for the cycle it is applying. Nothing committed is lost (a commit is one atomic
//! batch), and a cycle not applied was not committed: the next polls see the same values.
//!
//! Under systemd (`Type=notify`, see [`crate::ops::notify`]): READY=1 once the state dir is open and every
//! task runs, STOPPING=1 when shutdown begins, and WATCHDOG=1 pings only while every bus task makes
//! progress ([`crate::ops::watchdog`]).
//!
//! Owns no data of its own: it only starts, wires and stops the other layers; it never detects, stores
//! or delivers anything itself.
//!
//! - this file: [`Gateway`], [`start`]/[`start_with`], `run`, the shutdown order.
//! - `field.rs`: the field side (bus tasks and the recorder they feed), started and stopped as one
//!   generation; a bus task that panics is started again.
//! - [`recorder_thread`]: the recorder on its blocking thread: its gate, one recorder at a time across
//!   generations ([`Recorders`]), the restart after a panic, the test hooks
//!   ([`recorder_thread::RecorderHooks`]).
//! - `reload.rs`: SIGHUP: validate the new configuration, then restart the field side with it.
//! - `signals.rs`: SIGTERM, SIGINT and SIGHUP.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::delivery::panda::{PandaClient, PandaError};
use crate::delivery::sender::stats::SenderStats;
use crate::delivery::sender::{run_sender, SenderConfig};
use crate::modbus::stats::BusStats;
use crate::ops::admin::AdminError;
use crate::ops::notify::Notifier;
use crate::ops::sources::AdminState;
use crate::ops::watchdog::{run_watchdog, stall_bound, Liveness, DEFAULT_STALL_SLACK};
use crate::recorder::live::Live;
use crate::store::{Store, StoreError};

mod field;
pub mod recorder_thread;
mod reload;
pub(crate) mod signals;

use field::{spawn_field, Field};
use recorder_thread::Recorders;
use signals::{Signal, Signals};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The state database.
    #[error(transparent)]
    Store(#[from] StoreError),
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
    pub outbox: Store,
    /// Live view of the meters.
    pub live: Arc<Live>,
    /// Per-bus counters, indexed like `cfg.buses`.
    pub bus_stats: Vec<Arc<BusStats>>,
    /// Delivery counters.
    pub sender_stats: Arc<SenderStats>,
    /// Where the admin API listens (the bound address, useful with port 0).
    pub admin_addr: Option<std::net::SocketAddr>,
    /// How long each stage of a stop (or of a reload) may take.
    grace: Duration,
    notifier: Notifier,
    liveness: Arc<Liveness>,
    /// What the admin API shows of buses and meters; replaced on reload.
    admin_field: crate::ops::sources::SharedField,
    stall_slack: Duration,
    /// Wakes the sender; the recorder of every generation gets it.
    wake: Arc<Notify>,
    stop_admin: CancellationToken,
    admin: JoinHandle<()>,
    stop_watchdog: CancellationToken,
    watchdog: JoinHandle<()>,
    /// `None` only while a reload swaps it.
    field: Option<Field>,
    /// The recorder threads of every generation of the field side.
    recorders: Arc<Recorders>,
    stop_sender: CancellationToken,
    sender: JoinHandle<()>,
}

/// How the gateway reports to its supervisor (systemd).
#[derive(Debug, Clone)]
pub struct Supervision {
    /// Where READY/STOPPING/WATCHDOG go; disabled outside systemd.
    pub notifier: Notifier,
    /// Added to every bus's stall bound (`crate::ops::watchdog::stall_bound`).
    pub stall_slack: Duration,
}

impl Default for Supervision {
    /// Nothing is sent; the production slack.
    fn default() -> Supervision {
        Supervision {
            notifier: Notifier::disabled(),
            stall_slack: DEFAULT_STALL_SLACK,
        }
    }
}

impl Supervision {
    /// From `$NOTIFY_SOCKET` / `$WATCHDOG_USEC`, as systemd sets them.
    fn from_env() -> Supervision {
        Supervision {
            notifier: Notifier::from_env(),
            ..Supervision::default()
        }
    }
}

/// Open the store and start every task (no systemd notifications).
pub async fn start(cfg: Config) -> Result<Gateway, StartError> {
    start_with(cfg, Supervision::default()).await
}

/// Open the store and start every task; then tell `sup.notifier` READY=1 and start the watchdog if
/// systemd asked for one.
pub async fn start_with(cfg: Config, sup: Supervision) -> Result<Gateway, StartError> {
    let cfg = Arc::new(cfg);
    let limits = cfg.outbox.limits();
    let dir = cfg.site.state_dir.clone();
    let outbox = tokio::task::spawn_blocking(move || Store::open_or_failed(&dir, limits))
        .await
        .map_err(|e| StoreError::Sync {
            path: cfg.site.state_dir.clone(),
            source: std::io::Error::other(e),
        })??;
    let client = PandaClient::new(&cfg.panda, cfg.site.timezone)?;
    // Bound before any task starts, so a bad [admin] listen fails the start cleanly.
    let admin_listener = crate::ops::admin::bind(&cfg.admin).await?;
    let admin_addr = admin_listener.local_addr().ok();
    let live = Live::new(cfg.meters.len());
    let wake = Arc::new(Notify::new());
    let stop_sender = CancellationToken::new();

    let bus_stats: Vec<Arc<BusStats>> = cfg.buses.iter().map(|_| Arc::new(BusStats::default())).collect();
    let liveness = Liveness::new();
    liveness.watch(watch_list(&cfg, &bus_stats, sup.stall_slack));
    let recorders = Arc::new(Recorders::default());
    let field = spawn_field(&cfg, &outbox, &wake, &live, &bus_stats, &recorders, liveness.station());

    let sender_stats = Arc::new(SenderStats::default());
    let stop_admin = CancellationToken::new();
    let admin_field: crate::ops::sources::SharedField =
        Arc::new(std::sync::RwLock::new(crate::ops::sources::FieldView {
            cfg: cfg.clone(),
            live: live.clone(),
            buses: bus_stats.clone(),
        }));
    let admin_state = AdminState::new(outbox.clone(), sender_stats.clone(), cfg.site.name.clone())
        .with_wake(wake.clone())
        .with_shared_field(admin_field.clone())
        .with_check(liveness.station().clone());
    let admin = tokio::spawn({
        let stop = stop_admin.clone();
        async move {
            if let Err(e) = crate::ops::admin::serve_admin(admin_listener, admin_state, stop).await {
                tracing::error!(message = "Admin API failed.", error = %e);
            }
        }
    });
    let sender = tokio::spawn(run_sender(
        outbox.clone(),
        client,
        SenderConfig::from_config(&cfg),
        wake.clone(),
        stop_sender.clone(),
        sender_stats.clone(),
    ));
    tracing::info!(
        message = "Gateway started.",
        site = %cfg.site.name,
        buses = cfg.buses.len(),
        meters = cfg.meters.len(),
        queued = outbox.len(),
        watchdog = ?sup.notifier.watchdog_timeout(),
    );
    // READY=1 goes out before the watchdog task exists: its first tick is immediate, and a ping
    // racing ahead of READY would tell systemd about a service it still counts as starting.
    sup.notifier.ready(&running_status(&cfg, &outbox));
    let stop_watchdog = CancellationToken::new();
    let watchdog = tokio::spawn(run_watchdog(
        sup.notifier.clone(),
        liveness.clone(),
        stop_watchdog.clone(),
    ));
    Ok(Gateway {
        grace: cfg.panda.timeout.max(Duration::from_secs(2)),
        cfg,
        outbox,
        live,
        bus_stats,
        sender_stats,
        admin_addr,
        notifier: sup.notifier,
        liveness,
        admin_field,
        stall_slack: sup.stall_slack,
        wake,
        stop_admin,
        admin,
        stop_watchdog,
        watchdog,
        field: Some(field),
        recorders,
        stop_sender,
        sender,
    })
}

/// The STATUS= line while running.
fn running_status(cfg: &Config, outbox: &Store) -> String {
    format!(
        "Polling {} bus(es), {} meter(s); {} record(s) queued.",
        cfg.buses.len(),
        cfg.meters.len(),
        outbox.len()
    )
}

/// What the watchdog watches: every bus of `cfg` with its counters and stall bound.
fn watch_list(cfg: &Config, stats: &[Arc<BusStats>], slack: Duration) -> Vec<(String, Arc<BusStats>, Duration)> {
    cfg.buses
        .iter()
        .zip(stats)
        .enumerate()
        .map(|(i, (b, s))| (b.name.clone(), s.clone(), stall_bound(cfg, i, slack)))
        .collect()
}

impl Gateway {
    /// Stop in order (buses, recorder, sender) and make everything durable. Bounded: each stage
    /// gets `grace`; a stage that overruns is abandoned, which loses nothing already committed.
    /// Returns the number of records still queued.
    pub async fn stop(self, grace: Duration) -> u64 {
        self.notifier.stopping();
        self.stop_watchdog.cancel();
        let _ = self.watchdog.await;
        if let Some(field) = self.field {
            field.stop(grace).await;
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

impl Gateway {
    /// The registry the watchdog reads; tests use its [`Liveness::freeze`] hook.
    pub fn liveness(&self) -> &Arc<Liveness> {
        &self.liveness
    }

    /// The recorder threads: cycles applied per generation, the one-recorder-at-a-time check, and the
    /// test hooks ([`recorder_thread::RecorderHooks`]).
    pub fn stations(&self) -> &Arc<Recorders> {
        &self.recorders
    }
}

/// Run until SIGTERM or Ctrl-C, then stop cleanly; SIGHUP reloads the config file `cfg.path`. Under
/// systemd, notifies READY/STOPPING and pings the watchdog (from the environment systemd sets).
pub(crate) async fn run(cfg: Config) -> Result<(), StartError> {
    run_with(cfg, Supervision::from_env()).await
}

/// [`run`] with an explicit supervisor.
async fn run_with(cfg: Config, sup: Supervision) -> Result<(), StartError> {
    let path = cfg.path.clone();
    // Listen before starting: an early SIGHUP would otherwise kill the process (its default action).
    let mut signals = Signals::new();
    let mut gw = start_with(cfg, sup).await?;
    loop {
        match signals.next().await {
            Signal::Shutdown => break,
            Signal::Reload => {
                // Refusals are logged inside; the running configuration stays.
                let _ = gw.reload(&path).await;
            }
        }
    }
    tracing::info!(message = "Shutdown requested.");
    let grace = gw.grace;
    gw.stop(grace).await;
    Ok(())
}

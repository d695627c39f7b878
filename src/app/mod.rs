//! Wiring of the daemon: open the store, start one task per bus, the station and the sender, and
//! stop them in an order that loses nothing.
//!
//! Shutdown order: buses stop first (a request in flight finishes or times out); the station then
//! applies every cycle still in the channel and syncs; last the sender stops (an in-flight request
//! may finish; if abandoned, its records stay queued and are sent again next start).
//!
//! Under systemd (`Type=notify`, see [`crate::ops::notify`]): READY=1 once the state dir is open and every
//! task runs, STOPPING=1 when shutdown begins, and WATCHDOG=1 pings only while every bus task makes
//! progress ([`crate::ops::watchdog`]).
//!
//! Reload (SIGHUP, [`Gateway::reload`]): the new config and mapping are loaded and validated first;
//! an invalid one is refused (every issue logged) and the running one stays. A valid one replaces the
//! *field side* only: the buses and the station are stopped as in [`Gateway::stop`]'s first stages
//! and started again with the new config. The outbox (same sled handle, never reopened), the sender
//! and the admin API keep running, and queued records keep the BizData rendered when they were
//! detected. What cannot change live (`[site] state_dir` and `timezone`, `[admin]`, `[panda]`,
//! `[outbox]`) keeps its running value, and the log says a restart is needed.
//!
//! One station at a time: each start of the field side is a *generation* with its own channel and
//! its own gate. A station applies a cycle only while holding its gate, and the next generation is
//! started only once the previous gate is closed, which waits for a cycle being applied. A station
//! that does not finish within the grace period (a slow disk) therefore applies no further cycle, and
//! the one it is applying completes before its successor starts: no cycle is applied by two stations
//! and no state is written by an old station after a new one (checked on every cycle:
//! [`Recorders::violations`]). A cycle left in an abandoned channel is not lost: it was not
//! committed, so the next polls see the same values and the new station detects them.
//!
//! The station thread ([`Recorder`] on a blocking thread): a panic in it (a bug) is caught; whatever
//! the failed cycle had committed is synced, the station is dropped and, after a pause, a new one is
//! started on the **same channel**, so the buses never see the station gone (they would stop polling).
//! What the old one kept in memory is gone: its states are read back from the store (the only copy
//! that counts), a pending `confirm` count starts again, and the meters the bus had reported offline
//! are told to the new one again from the live view (the bus reports a link only when it changes), so a
//! `离线` rule's `for` runs on. The cycle that panicked is dropped (applying it again could panic again);
//! what it would have committed is detected again by the next polls. `/healthz` shows
//! `station_restarted` (degraded), or `station_failing` (critical) after a burst of panics, when the
//! watchdog also stops pinging ([`crate::ops::watchdog::RecorderHealth`]).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::delivery::panda::{PandaClient, PandaError};
use crate::delivery::sender::{run_sender, SenderConfig, SenderStats};
use crate::modbus::bus::{run_bus, BusStats};
use crate::modbus::cycle::Cycle;
use crate::ops::admin::AdminError;
use crate::ops::notify::Notifier;
use crate::ops::sources::{AdminState, FieldView, SharedField};
use crate::ops::watchdog::{run_watchdog, stall_bound, Liveness, RecorderHealth, DEFAULT_STALL_SLACK};
use crate::recorder::{Live, Recorder};
use crate::store::{Store, StoreError};

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
    admin_field: SharedField,
    stall_slack: Duration,
    /// Wakes the sender; the station of every generation gets it.
    wake: Arc<Notify>,
    stop_admin: CancellationToken,
    admin: JoinHandle<()>,
    stop_watchdog: CancellationToken,
    watchdog: JoinHandle<()>,
    /// `None` only while a reload swaps it.
    field: Option<Field>,
    /// The station threads of every generation of the field side.
    stations: Arc<Recorders>,
    stop_sender: CancellationToken,
    sender: JoinHandle<()>,
}

/// The field side, which a reload replaces: the bus tasks and the station they feed.
struct Field {
    stop_buses: CancellationToken,
    buses: Vec<JoinHandle<()>>,
    /// The station's thread ([`RecorderThread::run`]) and the gate it applies cycles through.
    station: JoinHandle<()>,
    gate: Arc<Gate>,
    stations: Arc<Recorders>,
}

/// How the gateway reports to its supervisor (systemd).
#[derive(Debug, Clone)]
pub struct Supervision {
    /// Where READY/STOPPING/WATCHDOG go; disabled outside systemd.
    pub notifier: Notifier,
    /// Added to every bus's stall bound ([`crate::ops::watchdog::stall_bound`]).
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
    pub fn from_env() -> Supervision {
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
    let stations = Arc::new(Recorders::default());
    let field = spawn_field(&cfg, &outbox, &wake, &live, &bus_stats, &stations, liveness.station());

    let sender_stats = Arc::new(SenderStats::default());
    let stop_admin = CancellationToken::new();
    let admin_field: SharedField = Arc::new(std::sync::RwLock::new(FieldView {
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
        stations,
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

/// Start the station (the next generation) and one (supervised) task per bus; `stats` is indexed like
/// `cfg.buses`. The previous generation must have been stopped ([`Field::stop`]).
fn spawn_field(
    cfg: &Arc<Config>,
    outbox: &Store,
    wake: &Arc<Notify>,
    live: &Arc<Live>,
    stats: &[Arc<BusStats>],
    stations: &Arc<Recorders>,
    health: &Arc<RecorderHealth>,
) -> Field {
    let stop_buses = CancellationToken::new();
    // Bounded: a slow disk makes bus tasks wait instead of piling up samples.
    let (tx, rx) = mpsc::channel(4 * cfg.buses.len().max(1));
    let gate = Arc::new(Gate::default());
    let thread = RecorderThread {
        generation: stations.next_generation(),
        cfg: cfg.clone(),
        outbox: outbox.clone(),
        wake: wake.clone(),
        live: live.clone(),
        gate: gate.clone(),
        stations: stations.clone(),
        health: health.clone(),
    };
    let station = tokio::task::spawn_blocking(move || thread.run(rx));
    let buses = stats
        .iter()
        .enumerate()
        .map(|(i, s)| tokio::spawn(supervise_bus(cfg.clone(), i, tx.clone(), stop_buses.clone(), s.clone())))
        .collect();
    Field {
        stop_buses,
        buses,
        station,
        gate,
        stations: stations.clone(),
    }
}

impl Field {
    /// Buses first, then the station (which applies every cycle left in the channel and syncs).
    /// A bus task that overruns `grace` is aborted. A station that overruns it is shut out: its gate
    /// is closed, which waits for the cycle it may be applying (however long a slow disk takes), so
    /// when this returns no cycle of this generation is being applied or ever will be, and the next
    /// generation can start. That loses nothing committed (a commit is one atomic batch; the sync is
    /// repeated by the next cycle); cycles left in the channel are seen again by the next polls.
    async fn stop(mut self, grace: Duration) {
        self.stop_buses.cancel();
        for b in self.buses {
            let abort = b.abort_handle();
            if tokio::time::timeout(grace, b).await.is_err() {
                tracing::warn!(message = "A bus task did not stop in time; abandoned.");
                abort.abort();
            }
        }
        if tokio::time::timeout(grace, &mut self.station).await.is_ok() {
            return;
        }
        tracing::warn!(message = "The station did not finish in time; it applies no further cycle.");
        self.stations.waiting.store(true, Ordering::SeqCst);
        let gate = self.gate.clone();
        let mut closing = tokio::task::spawn_blocking(move || gate.close());
        if tokio::time::timeout(grace, &mut closing).await.is_err() {
            tracing::warn!(
                message =
                    "The station is still applying a cycle (a slow disk?); its successor starts once it has finished."
            );
            let _ = closing.await;
        }
        self.stations.waiting.store(false, Ordering::SeqCst);
    }
}

/// Lets one station generation apply cycles until it is closed. A cycle is applied while the gate is
/// held, so [`Gate::close`] returns only once no cycle of this generation is being applied, and none
/// will be after it.
#[derive(Debug, Default)]
struct Gate {
    closed: Mutex<bool>,
    changed: Condvar,
}

impl Gate {
    /// Hold the gate to apply a cycle; `None` once it is closed.
    fn enter(&self) -> Option<MutexGuard<'_, bool>> {
        let held = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        (!*held).then_some(held)
    }

    /// Close it: waits for a cycle being applied. Blocking.
    fn close(&self) {
        *self.closed.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.changed.notify_all();
    }

    /// Wait up to `d` for the gate to be closed; whether it is. Blocking.
    fn wait_closed(&self, d: Duration) -> bool {
        let held = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        let (held, _) = self
            .changed
            .wait_timeout_while(held, d, |closed| !*closed)
            .unwrap_or_else(|e| e.into_inner());
        *held
    }
}

/// How many generations [`Recorders::applied`] remembers.
const GENERATIONS_KEPT: usize = 64;

/// Pause before a station that panicked is started again (as for a bus task).
pub const STATION_RESTART_PAUSE: Duration = Duration::from_secs(1);

/// The station threads of a gateway, generation after generation (the start and every reload of the
/// field side make one): how many cycles each applied, a check on every cycle that no two ever apply
/// at once or an old one after a newer one, and test hooks. Shared by the gateway and its station
/// threads.
#[derive(Debug, Default)]
pub struct Recorders {
    /// The last generation started.
    generation: AtomicU64,
    /// The generation applying a cycle now (0: none).
    applying: AtomicU64,
    /// The newest generation that has begun applying a cycle.
    newest: AtomicU64,
    /// Cycles applied beside another generation's, or after a newer one's.
    violations: AtomicU64,
    /// (generation, cycles applied), oldest first, the last [`GENERATIONS_KEPT`].
    applied: Mutex<VecDeque<(u64, u64)>>,
    /// A stop or reload waits for a station that overran its grace period to finish its cycle.
    waiting: AtomicBool,
    hooks: RecorderHooks,
}

impl Recorders {
    fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The generation of the running station (1 at start, one more for each reload).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Cycles applied by each recent generation: (generation, cycles), oldest first.
    pub fn applied(&self) -> Vec<(u64, u64)> {
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect()
    }

    /// Times a station began a cycle while another generation was applying one, or after a newer
    /// generation had begun. Zero, or states were written backwards (each is logged at error level).
    pub fn violations(&self) -> u64 {
        self.violations.load(Ordering::SeqCst)
    }

    /// Whether a stop or reload is waiting, past its grace period, for the old station to finish the
    /// cycle it is applying (the next station starts only then).
    pub fn waiting_for_old(&self) -> bool {
        self.waiting.load(Ordering::SeqCst)
    }

    /// The test hooks.
    pub fn hooks(&self) -> &RecorderHooks {
        &self.hooks
    }

    fn begin(&self, generation: u64) {
        let other = self.applying.swap(generation, Ordering::SeqCst);
        let newest = self.newest.fetch_max(generation, Ordering::SeqCst);
        if other != 0 || newest > generation {
            self.violations.fetch_add(1, Ordering::SeqCst);
            tracing::error!(
                message = "A station applies a cycle beside another one or after its successor; states may be written backwards. This is a bug.",
                generation,
                other,
                newest,
            );
        }
    }

    fn end(&self, generation: u64, cycles: u64) {
        let _ = self
            .applying
            .compare_exchange(generation, 0, Ordering::SeqCst, Ordering::SeqCst);
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        match applied.iter_mut().rev().find(|(g, _)| *g == generation) {
            Some((_, n)) => *n += cycles,
            None => {
                applied.push_back((generation, cycles));
                if applied.len() > GENERATIONS_KEPT {
                    applied.pop_front();
                }
            }
        }
    }
}

/// **Test hooks** into the station threads, inert unless a test arms them (like
/// [`Liveness::freeze`]): a station cannot be made to panic or to stall from outside otherwise.
#[derive(Debug, Default)]
pub struct RecorderHooks {
    panic_next: AtomicBool,
    hold: Mutex<Hold>,
    hold_changed: Condvar,
}

#[derive(Debug, Default)]
struct Hold {
    armed: bool,
    holding: bool,
}

impl RecorderHooks {
    /// The station panics on its next cycle, before applying it (as a bug in a rule would).
    pub fn panic_next(&self) {
        self.panic_next.store(true, Ordering::SeqCst);
    }

    /// Whether an armed [`RecorderHooks::panic_next`] has not fired yet.
    pub fn panic_pending(&self) -> bool {
        self.panic_next.load(Ordering::SeqCst)
    }

    /// The station stops in its next cycle, holding its gate (as in a commit or fsync on a very slow
    /// disk), until [`RecorderHooks::release`].
    pub fn hold(&self) {
        self.hold.lock().unwrap_or_else(|e| e.into_inner()).armed = true;
    }

    /// Whether a station is stopped by [`RecorderHooks::hold`] now.
    pub fn holding(&self) -> bool {
        self.hold.lock().unwrap_or_else(|e| e.into_inner()).holding
    }

    /// Let a held station go on.
    pub fn release(&self) {
        self.hold.lock().unwrap_or_else(|e| e.into_inner()).armed = false;
        self.hold_changed.notify_all();
    }

    /// Run by the station thread before each cycle (inside the gate).
    fn on_cycle(&self) {
        if self.panic_next.swap(false, Ordering::SeqCst) {
            panic!("test hook: the station panics on this cycle");
        }
        let mut hold = self.hold.lock().unwrap_or_else(|e| e.into_inner());
        if hold.armed {
            hold.holding = true;
            while hold.armed {
                hold = self.hold_changed.wait(hold).unwrap_or_else(|e| e.into_inner());
            }
            hold.holding = false;
        }
    }
}

/// One generation's station thread: what it needs besides its channel.
struct RecorderThread {
    generation: u64,
    cfg: Arc<Config>,
    outbox: Store,
    wake: Arc<Notify>,
    live: Arc<Live>,
    gate: Arc<Gate>,
    stations: Arc<Recorders>,
    health: Arc<RecorderHealth>,
}

impl RecorderThread {
    fn station(&self) -> Recorder {
        Recorder::new(
            self.cfg.clone(),
            self.outbox.clone(),
            self.wake.clone(),
            self.live.clone(),
        )
    }

    /// Apply cycles until every bus has dropped its sender (so no cycle is left behind at shutdown),
    /// then sync; or until the gate is closed. Blocking, on a thread of its own (`spawn_blocking`):
    /// the station's work is the disk's, one commit and one fsync per cycle.
    fn run(self, mut cycles: mpsc::Receiver<Cycle>) {
        let mut station = self.station();
        while let Some(cycle) = cycles.blocking_recv() {
            let Some(open) = self.gate.enter() else {
                tracing::warn!(
                    message = "Recorder stopped by a reload or shutdown; the states of cycles not applied are read again by the next polls."
                );
                return;
            };
            let panicked = self.apply(&mut station, vec![cycle]).err();
            drop(open);
            if let Some(message) = panicked {
                if !self.restart(&mut station, message) {
                    return;
                }
            }
        }
        if let Err(e) = self.outbox.sync_blocking() {
            tracing::error!(message = "Final sync of the state database failed.", error = %e);
        }
    }

    /// Apply `cycles` in order (the gate held); the message of a panic, if one happened (the cycles
    /// after it are dropped).
    fn apply(&self, station: &mut Recorder, cycles: Vec<Cycle>) -> Result<(), String> {
        let n = cycles.len() as u64;
        self.stations.begin(self.generation);
        // The station is dropped after a panic, so no broken invariant of it survives the unwind.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for cycle in cycles {
                self.stations.hooks.on_cycle();
                station.apply(cycle);
            }
        }));
        self.stations.end(self.generation, n);
        result.map_err(|p| panic_message(p.as_ref()))
    }

    /// After a panic: sync what the failed cycle committed, pause, start a new station on the same
    /// channel and tell it the meters that are offline. Returns false if the gate was closed meanwhile.
    fn restart(&self, station: &mut Recorder, mut message: String) -> bool {
        loop {
            let restarts = self.health.panicked(&message);
            tracing::error!(
                message = "The station panicked; it is started again with its states read back from the store.",
                panic = %message,
                restarts,
            );
            // Whatever the failed cycle committed before the panic becomes durable and visible.
            if let Err(e) = self.outbox.sync_blocking() {
                tracing::debug!(message = "Cannot sync the state database to disk.", error = %e);
            }
            self.wake.notify_one();
            if self.gate.wait_closed(STATION_RESTART_PAUSE) {
                return false;
            }
            *station = self.station();
            let replay = offline_links(&self.cfg, &self.live);
            if replay.is_empty() {
                return true;
            }
            let Some(open) = self.gate.enter() else {
                return false;
            };
            let result = self.apply(station, replay);
            drop(open);
            match result {
                Ok(()) => return true,
                Err(m) => message = m,
            }
        }
    }
}

/// One cycle per bus reporting its meters that the live view shows offline (nothing for a bus whose
/// meters all answer): what a new station must be told, since a bus reports a link only when it changes.
fn offline_links(cfg: &Config, live: &Live) -> Vec<Cycle> {
    let mut links: Vec<Vec<(usize, bool)>> = vec![Vec::new(); cfg.buses.len()];
    for (i, (meter, view)) in cfg.meters.iter().zip(live.snapshot()).enumerate() {
        if let (false, Some(l)) = (view.online, links.get_mut(meter.bus)) {
            l.push((i, false));
        }
    }
    links
        .into_iter()
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(bus, links)| Cycle {
            bus,
            samples: Vec::new(),
            links,
        })
        .collect()
}

/// The message a panic was raised with.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

impl Gateway {
    /// Stop in order (buses, station, sender) and make everything durable. Bounded: each stage
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

    /// The station threads: cycles applied per generation, the one-station-at-a-time check, and the
    /// test hooks ([`RecorderHooks`]).
    pub fn stations(&self) -> &Arc<Recorders> {
        &self.stations
    }

    /// Reload the config file at `path` (and the mapping it names), as on SIGHUP. An invalid file is
    /// refused: every issue is logged at error level, the running configuration stays, and the
    /// error is returned. A valid one restarts the buses and the station with it (see the module
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
    pub async fn apply(&mut self, new: Config) {
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
            &self.stations,
            self.liveness.station(),
        ));
        *self.admin_field.write().unwrap_or_else(|e| e.into_inner()) = FieldView {
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

/// Run a bus task; if it ever panics (a bug, never expected), log it and start it again after a
/// pause, so one bad bus can never stop the others or the station.
async fn supervise_bus(
    cfg: Arc<Config>,
    bus: usize,
    cycles: mpsc::Sender<crate::modbus::cycle::Cycle>,
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
        // Aborting this supervisor (a stop that gave up waiting) aborts the bus task too: otherwise
        // it would poll on, holding a sender of a channel no station reads any more.
        let _abort = AbortOnDrop(task.abort_handle());
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

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Run until SIGTERM or Ctrl-C, then stop cleanly; SIGHUP reloads the config file `cfg.path`. Under
/// systemd, notifies READY/STOPPING and pings the watchdog (from the environment systemd sets).
pub async fn run(cfg: Config) -> Result<(), StartError> {
    run_with(cfg, Supervision::from_env()).await
}

/// [`run`] with an explicit supervisor.
pub async fn run_with(cfg: Config, sup: Supervision) -> Result<(), StartError> {
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

/// What a signal asks for.
enum Signal {
    Shutdown,
    Reload,
}

/// SIGTERM / SIGINT (shutdown) and SIGHUP (reload), registered once for the life of the daemon.
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let listen = |kind: SignalKind, name: &str| match signal(kind) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!(message = "Cannot listen for a signal.", signal = name, error = %e);
                    None
                }
            };
            Signals {
                term: listen(SignalKind::terminate(), "SIGTERM"),
                hup: listen(SignalKind::hangup(), "SIGHUP"),
            }
        }
        #[cfg(not(unix))]
        {
            Signals {}
        }
    }

    async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        {
            let term = async {
                match &mut self.term {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let hup = async {
                match &mut self.hup {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = term => Signal::Shutdown,
                _ = tokio::signal::ctrl_c() => Signal::Shutdown,
                () = hup => Signal::Reload,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Signal::Shutdown
        }
    }
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

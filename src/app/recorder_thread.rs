//! The recorder thread: the [`Recorder`] of one generation of the field side, on a blocking thread of
//! its own, applying cycles through its gate; and the registry of every generation ([`Recorders`]).
//!
//! One recorder at a time: each start of the field side is a *generation* with its own channel and
//! its own gate. A recorder applies a cycle only while holding its gate, and the next generation is
//! started only once the previous gate is closed, which waits for a cycle being applied. A recorder
//! that does not finish within the grace period (a slow disk) therefore applies no further cycle, and
//! the one it is applying completes before its successor starts: no cycle is applied by two recorders
//! and no state is written by an old recorder after a new one (checked on every cycle:
//! [`Recorders::violations`]). A cycle left in an abandoned channel is not lost: it was not
//! committed, so the next polls see the same values and the new recorder detects them.
//!
//! The recorder thread ([`Recorder`] on a blocking thread): a panic in it (a bug) is caught; whatever
//! the failed cycle had committed is synced, the recorder is dropped and, after a pause, a new one is
//! started on the **same channel**, so the buses never see the recorder gone (they would stop polling).
//! What the old one kept in memory is gone: its states are read back from the store (the only copy
//! that counts), a pending `confirm` count starts again, and the meters the bus had reported offline
//! are told to the new one again from the live view (the bus reports a link only when it changes), so a
//! `离线` rule's `for` runs on. The cycle that panicked is dropped (applying it again could panic again);
//! what it would have committed is detected again by the next polls. `/healthz` shows
//! `station_restarted` (degraded), or `station_failing` (critical) after a burst of panics, when the
//! watchdog also stops pinging ([`crate::ops::watchdog::RecorderHealth`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use crate::config::Config;
use crate::modbus::cycle::Cycle;
use crate::ops::watchdog::RecorderHealth;
use crate::recorder::live::Live;
use crate::recorder::Recorder;
use crate::store::Store;

/// Lets one recorder generation apply cycles until it is closed. A cycle is applied while the gate is
/// held, so [`Gate::close`] returns only once no cycle of this generation is being applied, and none
/// will be after it.
#[derive(Debug, Default)]
pub(super) struct Gate {
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
    pub(super) fn close(&self) {
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

/// Pause before a recorder that panicked is started again (as for a bus task).
const RECORDER_RESTART_PAUSE: Duration = Duration::from_secs(1);

/// The recorder threads of a gateway, generation after generation (the start and every reload of the
/// field side make one): how many cycles each applied, a check on every cycle that no two ever apply
/// at once or an old one after a newer one, and test hooks. Shared by the gateway and its recorder
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
    /// A stop or reload waits for a recorder that overran its grace period to finish its cycle.
    pub(super) waiting: AtomicBool,
    hooks: RecorderHooks,
}

impl Recorders {
    pub(super) fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The generation of the running recorder (1 at start, one more for each reload).
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

    /// Times a recorder began a cycle while another generation was applying one, or after a newer
    /// generation had begun. Zero, or states were written backwards (each is logged at error level).
    pub fn violations(&self) -> u64 {
        self.violations.load(Ordering::SeqCst)
    }

    /// Whether a stop or reload is waiting, past its grace period, for the old recorder to finish the
    /// cycle it is applying (the next recorder starts only then).
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

/// **Test hooks** into the recorder threads, inert unless a test arms them (like
/// [`Liveness::freeze`](crate::ops::watchdog::Liveness::freeze)): a recorder cannot be made to panic or to stall from outside otherwise.
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
    /// The recorder panics on its next cycle, before applying it (as a bug in a rule would).
    pub fn panic_next(&self) {
        self.panic_next.store(true, Ordering::SeqCst);
    }

    /// The recorder stops in its next cycle, holding its gate (as in a commit or fsync on a very slow
    /// disk), until [`RecorderHooks::release`].
    pub fn hold(&self) {
        self.hold.lock().unwrap_or_else(|e| e.into_inner()).armed = true;
    }

    /// Whether a recorder is stopped by [`RecorderHooks::hold`] now.
    pub fn holding(&self) -> bool {
        self.hold.lock().unwrap_or_else(|e| e.into_inner()).holding
    }

    /// Let a held recorder go on.
    pub fn release(&self) {
        self.hold.lock().unwrap_or_else(|e| e.into_inner()).armed = false;
        self.hold_changed.notify_all();
    }

    /// Run by the recorder thread before each cycle (inside the gate).
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

/// One generation's recorder thread: what it needs besides its channel.
pub(super) struct RecorderThread {
    pub(super) generation: u64,
    pub(super) cfg: Arc<Config>,
    pub(super) outbox: Store,
    pub(super) wake: Arc<Notify>,
    pub(super) live: Arc<Live>,
    pub(super) gate: Arc<Gate>,
    pub(super) recorders: Arc<Recorders>,
    pub(super) health: Arc<RecorderHealth>,
}

impl RecorderThread {
    fn recorder(&self) -> Recorder {
        Recorder::new(
            self.cfg.clone(),
            self.outbox.clone(),
            self.wake.clone(),
            self.live.clone(),
        )
    }

    /// Apply cycles until every bus has dropped its sender (so no cycle is left behind at shutdown),
    /// then sync; or until the gate is closed. Blocking, on a thread of its own (`spawn_blocking`):
    /// the recorder's work is the disk's, one commit and one fsync per cycle.
    pub(super) fn run(self, mut cycles: mpsc::Receiver<Cycle>) {
        let mut recorder = self.recorder();
        while let Some(cycle) = cycles.blocking_recv() {
            let Some(open) = self.gate.enter() else {
                tracing::warn!(
                    message = "Recorder stopped by a reload or shutdown; the states of cycles not applied are read again by the next polls."
                );
                return;
            };
            let panicked = self.apply(&mut recorder, vec![cycle]).err();
            drop(open);
            if let Some(message) = panicked {
                if !self.restart(&mut recorder, message) {
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
    fn apply(&self, recorder: &mut Recorder, cycles: Vec<Cycle>) -> Result<(), String> {
        let n = cycles.len() as u64;
        self.recorders.begin(self.generation);
        // The recorder is dropped after a panic, so no broken invariant of it survives the unwind.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for cycle in cycles {
                self.recorders.hooks.on_cycle();
                recorder.apply(cycle);
            }
        }));
        self.recorders.end(self.generation, n);
        result.map_err(|p| panic_message(p.as_ref()))
    }

    /// After a panic: sync what the failed cycle committed, pause, start a new recorder on the same
    /// channel and tell it the meters that are offline. Returns false if the gate was closed meanwhile.
    fn restart(&self, recorder: &mut Recorder, mut message: String) -> bool {
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
            if self.gate.wait_closed(RECORDER_RESTART_PAUSE) {
                return false;
            }
            *recorder = self.recorder();
            let replay = offline_links(&self.cfg, &self.live);
            if replay.is_empty() {
                return true;
            }
            let Some(open) = self.gate.enter() else {
                return false;
            };
            let result = self.apply(recorder, replay);
            drop(open);
            match result {
                Ok(()) => return true,
                Err(m) => message = m,
            }
        }
    }
}

/// One cycle per bus reporting its meters that the live view shows offline (nothing for a bus whose
/// meters all answer): what a new recorder must be told, since a bus reports a link only when it changes.
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

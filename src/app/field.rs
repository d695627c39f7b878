//! The field side, which a reload replaces: one task per bus and the recorder thread they feed, started
//! together as one *generation* with its own channel and gate, and stopped buses first.
//!
//! Invariant: the next generation starts only once [`Field::stop`] has returned, and then no cycle of the
//! previous one is being applied or ever will be (see [`super::recorder_thread`]). A bus task that
//! panics (a bug) is started again after a pause, so one bad bus never stops the others or the recorder.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::modbus::bus::run_bus;
use crate::modbus::stats::BusStats;
use crate::ops::watchdog::RecorderHealth;
use crate::recorder::live::Live;
use crate::store::Store;

use super::recorder_thread::{Gate, RecorderThread, Recorders};

/// The field side, which a reload replaces: the bus tasks and the recorder they feed.
pub(super) struct Field {
    stop_buses: CancellationToken,
    buses: Vec<JoinHandle<()>>,
    /// The recorder's thread ([`RecorderThread::run`]) and the gate it applies cycles through.
    recorder: JoinHandle<()>,
    gate: Arc<Gate>,
    recorders: Arc<Recorders>,
}

/// Start the recorder (the next generation) and one (supervised) task per bus; `stats` is indexed like
/// `cfg.buses`. The previous generation must have been stopped ([`Field::stop`]).
pub(super) fn spawn_field(
    cfg: &Arc<Config>,
    outbox: &Store,
    wake: &Arc<Notify>,
    live: &Arc<Live>,
    stats: &[Arc<BusStats>],
    recorders: &Arc<Recorders>,
    health: &Arc<RecorderHealth>,
) -> Field {
    let stop_buses = CancellationToken::new();
    // Bounded: a slow disk makes bus tasks wait instead of piling up samples.
    let (tx, rx) = mpsc::channel(4 * cfg.buses.len().max(1));
    let gate = Arc::new(Gate::default());
    let thread = RecorderThread {
        generation: recorders.next_generation(),
        cfg: cfg.clone(),
        outbox: outbox.clone(),
        wake: wake.clone(),
        live: live.clone(),
        gate: gate.clone(),
        recorders: recorders.clone(),
        health: health.clone(),
    };
    let recorder = tokio::task::spawn_blocking(move || thread.run(rx));
    let buses = stats
        .iter()
        .enumerate()
        .map(|(i, s)| tokio::spawn(supervise_bus(cfg.clone(), i, tx.clone(), stop_buses.clone(), s.clone())))
        .collect();
    Field {
        stop_buses,
        buses,
        recorder,
        gate,
        recorders: recorders.clone(),
    }
}

impl Field {
    /// Buses first, then the recorder (which applies every cycle left in the channel and syncs).
    /// A bus task that overruns `grace` is aborted. A recorder that overruns it is shut out: its gate
    /// is closed, which waits for the cycle it may be applying (however long a slow disk takes), so
    /// when this returns no cycle of this generation is being applied or ever will be, and the next
    /// generation can start. That loses nothing committed (a commit is one atomic batch; the sync is
    /// repeated by the next cycle); cycles left in the channel are seen again by the next polls.
    pub(super) async fn stop(mut self, grace: Duration) {
        self.stop_buses.cancel();
        for b in self.buses {
            let abort = b.abort_handle();
            if tokio::time::timeout(grace, b).await.is_err() {
                tracing::warn!(message = "A bus task did not stop in time; abandoned.");
                abort.abort();
            }
        }
        if tokio::time::timeout(grace, &mut self.recorder).await.is_ok() {
            return;
        }
        tracing::warn!(message = "The station did not finish in time; it applies no further cycle.");
        self.recorders.waiting.store(true, Ordering::SeqCst);
        let gate = self.gate.clone();
        let mut closing = tokio::task::spawn_blocking(move || gate.close());
        if tokio::time::timeout(grace, &mut closing).await.is_err() {
            tracing::warn!(
                message =
                    "The station is still applying a cycle (a slow disk?); its successor starts once it has finished."
            );
            let _ = closing.await;
        }
        self.recorders.waiting.store(false, Ordering::SeqCst);
    }
}

/// Run a bus task; if it ever panics (a bug, never expected), log it and start it again after a
/// pause, so one bad bus can never stop the others or the recorder.
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
        // it would poll on, holding a sender of a channel no recorder reads any more.
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

//! Liveness of the bus tasks, and the systemd watchdog that depends on it.
//!
//! Owns: [`Liveness`], a registry of the running bus tasks, and [`run_watchdog`], the task that sends
//! `WATCHDOG=1` every `WatchdogSec/2` **only while every bus task is making progress**. Progress is a
//! completed poll round (`BusStats::rounds` advancing, bumped by the bus loop every round). A round in
//! which every meter is offline, or the port cannot be opened, still completes, so it is progress; a
//! bus task stuck forever in an await completes no round, so the pings stop and systemd restarts the
//! service `WatchdogSec` later.
//!
//! How long a round may take without counting as stuck ([`stall_bound`]) is derived from the bus's
//! config: `poll_interval`, plus for every request of a round (and one open) twice the `timeout` (an
//! open and the request) with `guard` and `frame_gap`, plus a slack for the station's fsync (a bus
//! waits on a full channel while the station syncs).
//!
//! Never: pings while a bus is stalled, or stops the gateway itself (systemd does that).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::bus::{plan_reads, BusStats};
use crate::config::Config;
use crate::notify::Notifier;

/// Slack added to every stall bound in production: room for the station's fsync on a slow SD card.
pub const DEFAULT_STALL_SLACK: Duration = Duration::from_secs(10);

/// The longest a round of `cfg.buses[bus]` may take before its task counts as stuck.
pub fn stall_bound(cfg: &Config, bus: usize, slack: Duration) -> Duration {
    let Some(b) = cfg.buses.get(bus) else {
        return slack;
    };
    let requests: u32 = cfg
        .meters
        .iter()
        .filter(|m| m.bus == bus)
        .map(|m| u32::try_from(plan_reads(m).blocks.len()).unwrap_or(u32::MAX))
        .fold(1u32, u32::saturating_add); // + 1: the probe of a bus that is down
    let per_request = b
        .timeout
        .saturating_mul(2)
        .saturating_add(b.guard)
        .saturating_add(b.frame_gap);
    b.poll_interval
        .saturating_add(per_request.saturating_mul(requests))
        .saturating_add(slack)
}

/// A bus whose task has completed no round for longer than its bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stall {
    /// The bus name.
    pub bus: String,
    /// Time since its last completed round (or since it was registered).
    pub quiet_for: Duration,
    /// Its bound.
    pub bound: Duration,
}

impl std::fmt::Display for Stall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "bus {} completed no poll round for {} (bound {})",
            self.bus,
            humantime::format_duration(round_ms(self.quiet_for)),
            humantime::format_duration(round_ms(self.bound))
        )
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[derive(Debug)]
struct Watched {
    name: String,
    stats: Arc<BusStats>,
    bound: Duration,
    /// `rounds` when it last changed, and when that was.
    seen: u64,
    since: Instant,
    /// Test hook: the counter is read as if it never advanced again.
    frozen: bool,
}

/// The running bus tasks and when each last completed a round. Shared by the gateway (which
/// replaces the set on reload) and the watchdog task (which asks [`Liveness::stalls`]).
#[derive(Debug, Default)]
pub struct Liveness {
    buses: Mutex<Vec<Watched>>,
    /// Watchdog ticks that sent WATCHDOG=1 (a counter, for metrics and tests).
    pings: AtomicU64,
    /// Watchdog ticks that sent nothing because a bus was stalled.
    withheld: AtomicU64,
}

impl Liveness {
    /// An empty registry (no bus: never stalled).
    pub fn new() -> Arc<Liveness> {
        Arc::new(Liveness::default())
    }

    /// Watch these buses from now on, instead of the previous ones: (name, counters, bound). Each
    /// starts fresh, so a reload does not count as a stall.
    pub fn watch(&self, buses: Vec<(String, Arc<BusStats>, Duration)>) {
        let now = Instant::now();
        let watched = buses
            .into_iter()
            .map(|(name, stats, bound)| Watched {
                seen: stats.rounds.load(Ordering::Relaxed),
                name,
                stats,
                bound,
                since: now,
                frozen: false,
            })
            .collect();
        if let Ok(mut b) = self.buses.lock() {
            *b = watched;
        }
    }

    /// The buses that completed no round within their bound (empty: every bus makes progress).
    pub fn stalls(&self) -> Vec<Stall> {
        self.stalls_at(Instant::now())
    }

    /// [`Liveness::stalls`] as seen at `now` (not earlier than the last call).
    fn stalls_at(&self, now: Instant) -> Vec<Stall> {
        let Ok(mut buses) = self.buses.lock() else {
            // Poisoned only if a holder panicked; report it as a stall so the watchdog stops.
            return vec![Stall {
                bus: "?".into(),
                quiet_for: Duration::ZERO,
                bound: Duration::ZERO,
            }];
        };
        let mut stalls = Vec::new();
        for w in buses.iter_mut() {
            let rounds = w.stats.rounds.load(Ordering::Relaxed);
            if rounds != w.seen && !w.frozen {
                w.seen = rounds;
                w.since = now;
            }
            let quiet_for = now.saturating_duration_since(w.since);
            if quiet_for > w.bound {
                stalls.push(Stall {
                    bus: w.name.clone(),
                    quiet_for,
                    bound: w.bound,
                });
            }
        }
        stalls
    }

    /// Watchdog pings sent so far.
    pub fn pings_sent(&self) -> u64 {
        self.pings.load(Ordering::Relaxed)
    }

    /// Watchdog ticks so far that sent no ping because a bus was stalled.
    pub fn pings_withheld(&self) -> u64 {
        self.withheld.load(Ordering::Relaxed)
    }

    /// **Test hook.** From now on, treat bus `name`'s round counter as if it never advanced again,
    /// which is what a bus task stuck forever in an await looks like. (The real bus task cannot be
    /// made to hang: every await in it is bounded.) Returns whether such a bus is watched. A reload
    /// replaces the registry and so unfreezes.
    pub fn freeze(&self, name: &str) -> bool {
        let Ok(mut buses) = self.buses.lock() else {
            return false;
        };
        let mut found = false;
        for w in buses.iter_mut().filter(|w| w.name == name) {
            w.frozen = true;
            found = true;
        }
        found
    }
}

/// Ping systemd every `notifier.ping_interval()` while no bus is stalled, until `stop`. Logs once when
/// pings stop (with the stalled buses) and once when they resume. Returns at once if systemd asked
/// for no watchdog.
pub async fn run_watchdog(notifier: Notifier, liveness: Arc<Liveness>, stop: CancellationToken) {
    let Some(every) = notifier.ping_interval() else {
        return;
    };
    let mut stalled = false;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let stalls = liveness.stalls();
        if stalls.is_empty() {
            if stalled {
                tracing::warn!(message = "Every bus makes progress again; watchdog pings resume.");
                stalled = false;
            }
            notifier.watchdog();
            liveness.pings.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        liveness.withheld.fetch_add(1, Ordering::Relaxed);
        if !stalled {
            stalled = true;
            let why: Vec<String> = stalls.iter().map(ToString::to_string).collect();
            tracing::error!(
                message = "A bus task makes no progress; watchdog pings stop, systemd will restart the service.",
                stalls = %why.join("; "),
            );
            notifier.status(&format!("Stalled: {}", why.join("; ")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watched(l: &Liveness, bound: Duration) -> Arc<BusStats> {
        let stats = Arc::new(BusStats::default());
        l.watch(vec![("a".into(), stats.clone(), bound)]);
        stats
    }

    #[test]
    fn a_bus_whose_rounds_advance_is_never_stalled() {
        let l = Liveness::new();
        let stats = watched(&l, Duration::from_secs(2));
        let t0 = Instant::now();
        for s in 1..=10 {
            stats.rounds.fetch_add(1, Ordering::Relaxed);
            assert!(l.stalls_at(t0 + Duration::from_secs(s)).is_empty());
        }
    }

    #[test]
    fn a_bus_with_no_round_for_longer_than_its_bound_is_stalled() {
        let l = Liveness::new();
        let stats = watched(&l, Duration::from_secs(2));
        let t0 = Instant::now();
        assert!(l.stalls_at(t0 + Duration::from_secs(1)).is_empty());
        let stalls = l.stalls_at(t0 + Duration::from_secs(3));
        assert_eq!(stalls.len(), 1);
        assert_eq!(stalls[0].bus, "a");
        assert!(
            stalls[0].to_string().contains("completed no poll round"),
            "{}",
            stalls[0]
        );
        stats.rounds.fetch_add(1, Ordering::Relaxed);
        assert!(l.stalls_at(t0 + Duration::from_secs(4)).is_empty(), "a round clears it");
    }

    #[test]
    fn a_frozen_bus_stalls_although_its_counter_moves() {
        let l = Liveness::new();
        let stats = watched(&l, Duration::from_secs(2));
        assert!(l.freeze("a"));
        assert!(!l.freeze("b"));
        stats.rounds.fetch_add(1, Ordering::Relaxed);
        let stalls = l.stalls_at(Instant::now() + Duration::from_secs(3));
        assert_eq!(stalls.len(), 1);
    }

    #[test]
    fn watching_anew_starts_every_bus_fresh() {
        let l = Liveness::new();
        let _stats = watched(&l, Duration::from_secs(2));
        assert!(l.freeze("a"));
        let _stats = watched(&l, Duration::from_secs(2));
        assert!(l.stalls_at(Instant::now() + Duration::from_secs(1)).is_empty());
    }
}

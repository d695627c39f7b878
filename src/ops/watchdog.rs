//! Liveness of the bus tasks and of the recorder, and the systemd watchdog that depends on them.
//!
//! Owns: [`Liveness`], a registry of the running bus tasks, [`RecorderHealth`], the record of the
//! recorder thread's panics and restarts, and `run_watchdog`, the task that sends `WATCHDOG=1` every
//! `WatchdogSec/2` **only while every bus task is making progress and the recorder is not failing**.
//! Progress of a bus is a completed poll round (`BusStats::rounds` advancing, bumped by the bus loop
//! every round). A round in which every meter is offline, or the port cannot be opened, still
//! completes, so it is progress; a bus task stuck forever in an await completes no round, so the pings
//! stop and systemd restarts the service `WatchdogSec` later.
//!
//! How long a round may take without counting as stuck (`stall_bound`) is derived from the bus's
//! config: `poll_interval`, plus for every request of a round (and one open) twice the `timeout` (an
//! open and the request) with `guard` and `frame_gap`, plus a slack for the recorder's fsync (a bus
//! waits on a full channel while the recorder syncs).
//!
//! The recorder thread is restarted in process after a panic (`crate::app`); one panic is a bug to
//! report (`/healthz` `degraded`, `station_restarted`, for `STATION_PANIC_SHOWN`), but
//! [`STATION_PANICS_FAILING`] panics within `STATION_PANIC_WINDOW` mean it cannot do its job in this
//! process: `/healthz` `critical` (`station_failing`) and the pings stop, so systemd restarts the
//! whole service. The finding codes, their messages, the `STATION_*` constants and [`Liveness::station`]
//! keep the component's former name: they are wire names, or named by the tests.
//!
//! Never: pings while a bus is stalled or the recorder is failing, or stops the gateway itself
//! (systemd does that).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::modbus::plan::plan_reads;
use crate::modbus::stats::BusStats;
use crate::ops::api::{Finding, Status};
use crate::ops::notify::Notifier;
use crate::ops::sources::HealthCheck;

/// Slack added to every stall bound in production: room for the recorder's fsync on a slow SD card.
pub(crate) const DEFAULT_STALL_SLACK: Duration = Duration::from_secs(10);

/// The longest a round of `cfg.buses[bus]` may take before its task counts as stuck.
pub(crate) fn stall_bound(cfg: &Config, bus: usize, slack: Duration) -> Duration {
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
    bus: String,
    /// Time since its last completed round (or since it was registered).
    quiet_for: Duration,
    bound: Duration,
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

/// The running bus tasks and when each last completed a round, and the recorder's panics. Shared by
/// the gateway (which replaces the set of buses on reload) and the watchdog task (which asks
/// [`Liveness::stalls`] and `RecorderHealth::failing`).
#[derive(Debug, Default)]
pub struct Liveness {
    buses: Mutex<Vec<Watched>>,
    /// The recorder thread's panics; kept across reloads (its counts only grow).
    recorder: Arc<RecorderHealth>,
    /// Watchdog ticks that sent nothing because a bus was stalled or the recorder failing.
    withheld: AtomicU64,
}

impl Liveness {
    /// An empty registry (no bus: never stalled).
    pub(crate) fn new() -> Arc<Liveness> {
        Arc::new(Liveness::default())
    }

    /// Watch these buses from now on, instead of the previous ones: (name, counters, bound). Each
    /// starts fresh, so a reload does not count as a stall.
    pub(crate) fn watch(&self, buses: Vec<(String, Arc<BusStats>, Duration)>) {
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

    /// The recorder thread's panics and restarts (also a `HealthCheck` for `/healthz`).
    pub fn station(&self) -> &Arc<RecorderHealth> {
        &self.recorder
    }

    /// What keeps the watchdog from pinging now, in words (empty: nothing).
    fn blockers(&self) -> Vec<String> {
        let mut why: Vec<String> = self.stalls().iter().map(ToString::to_string).collect();
        why.extend(self.recorder.failing());
        why
    }

    /// Watchdog ticks so far that sent no ping because a bus was stalled or the recorder failing.
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

/// Ping systemd every `notifier.ping_interval()` while no bus is stalled and the recorder is not
/// failing ([`Liveness::blockers`]), until `stop`. Logs once when pings stop (with the reasons) and once
/// when they resume. Returns at once if systemd asked for no watchdog.
pub(crate) async fn run_watchdog(notifier: Notifier, liveness: Arc<Liveness>, stop: CancellationToken) {
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
        let why = liveness.blockers();
        if why.is_empty() {
            if stalled {
                tracing::warn!(
                    message = "Every bus makes progress again and the station works; watchdog pings resume."
                );
                stalled = false;
            }
            notifier.watchdog();
            continue;
        }
        liveness.withheld.fetch_add(1, Ordering::Relaxed);
        if !stalled {
            stalled = true;
            tracing::error!(
                message = "The gateway makes no progress; watchdog pings stop, systemd will restart the service.",
                reasons = %why.join("; "),
            );
            notifier.status(&format!("Stalled: {}", why.join("; ")));
        }
    }
}

/// This many recorder panics within `STATION_PANIC_WINDOW` make the recorder `failing`: `/healthz`
/// critical and no more watchdog pings (systemd restarts the service).
pub const STATION_PANICS_FAILING: usize = 3;

/// The window in which [`STATION_PANICS_FAILING`] panics count together.
const STATION_PANIC_WINDOW: Duration = Duration::from_secs(10 * 60);

/// How long after its last panic a restarted recorder is reported (`station_restarted`, degraded).
const STATION_PANIC_SHOWN: Duration = Duration::from_secs(60 * 60);

/// The recorder thread's panics, each followed by a restart in the same process (`crate::app`).
#[derive(Debug, Default)]
pub struct RecorderHealth {
    record: Mutex<PanicRecord>,
}

#[derive(Debug, Default)]
struct PanicRecord {
    /// Panics (= restarts) since the gateway started.
    total: u64,
    /// The last one: when, and its message.
    last: Option<(Instant, String)>,
    /// When the panics within the window happened (at most [`STATION_PANICS_FAILING`] kept).
    recent: VecDeque<Instant>,
}

impl RecorderHealth {
    /// The recorder panicked with `message` (it is restarted); returns the panics since start.
    pub(crate) fn panicked(&self, message: &str) -> u64 {
        self.panicked_at(Instant::now(), message)
    }

    fn panicked_at(&self, at: Instant, message: &str) -> u64 {
        let mut r = self.record.lock().unwrap_or_else(|e| e.into_inner());
        r.total += 1;
        r.last = Some((at, message.to_string()));
        r.recent.push_back(at);
        while r.recent.len() > STATION_PANICS_FAILING {
            r.recent.pop_front();
        }
        r.total
    }

    /// Panics (each followed by a restart) since the gateway started.
    pub fn restarts(&self) -> u64 {
        self.record.lock().unwrap_or_else(|e| e.into_inner()).total
    }

    /// Why the recorder counts as failing (too many panics in a short time), if it does.
    fn failing(&self) -> Option<String> {
        self.failing_at(Instant::now())
    }

    fn failing_at(&self, now: Instant) -> Option<String> {
        let r = self.record.lock().unwrap_or_else(|e| e.into_inner());
        // A burst (N panics within the window) that is still recent (the last one within the window).
        let (first, last) = (*r.recent.front()?, *r.recent.back()?);
        let burst = r.recent.len() >= STATION_PANICS_FAILING
            && last.saturating_duration_since(first) <= STATION_PANIC_WINDOW
            && now.saturating_duration_since(last) <= STATION_PANIC_WINDOW;
        if !burst {
            return None;
        }
        let last = r.last.as_ref().map_or("", |(_, m)| m.as_str());
        Some(format!(
            "the station panicked {} times within {} ({} since start; last: {last})",
            r.recent.len(),
            humantime::format_duration(STATION_PANIC_WINDOW),
            r.total
        ))
    }

    fn findings_at(&self, now: Instant) -> Vec<Finding> {
        if let Some(why) = self.failing_at(now) {
            return vec![Finding {
                status: Status::Critical,
                code: "station_failing".into(),
                message: format!(
                    "{why}: valve changes may not be recorded; it is restarted each time, and watchdog pings stop so that systemd restarts the service. A bug: report it with `journalctl -u fieldgate`"
                ),
            }];
        }
        let r = self.record.lock().unwrap_or_else(|e| e.into_inner());
        let Some((at, message)) = &r.last else {
            return Vec::new();
        };
        let ago = now.saturating_duration_since(*at);
        if ago > STATION_PANIC_SHOWN {
            return Vec::new();
        }
        vec![Finding {
            status: Status::Degraded,
            code: "station_restarted".into(),
            message: format!(
                "the station panicked {} ago ({message}) and was restarted ({} restart(s) since start): it read its states back from the store, nothing committed was lost, and what the failed cycle held is detected again by the next polls. A bug: report it with `journalctl -u fieldgate`",
                humantime::format_duration(Duration::from_secs(ago.as_secs())),
                r.total
            ),
        }]
    }
}

impl HealthCheck for RecorderHealth {
    /// `station_failing` (critical) or `station_restarted` (degraded), or nothing.
    fn findings(&self) -> Vec<Finding> {
        self.findings_at(Instant::now())
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
    fn one_station_panic_degrades_health_for_an_hour_and_keeps_the_pings() {
        let h = RecorderHealth::default();
        let t0 = Instant::now();
        assert!(h.findings_at(t0).is_empty());
        assert_eq!(h.panicked_at(t0, "index out of bounds"), 1);
        let f = h.findings_at(t0 + Duration::from_secs(90));
        assert_eq!(f.len(), 1);
        assert_eq!(
            (f[0].status, f[0].code.as_str()),
            (Status::Degraded, "station_restarted")
        );
        assert!(
            f[0].message.contains("index out of bounds") && f[0].message.contains("1 restart(s)"),
            "{}",
            f[0].message
        );
        assert_eq!(
            h.failing_at(t0 + Duration::from_secs(1)),
            None,
            "one panic is no reason to stop pinging"
        );
        assert!(h
            .findings_at(t0 + STATION_PANIC_SHOWN + Duration::from_secs(1))
            .is_empty());
    }

    #[test]
    fn station_panics_in_a_burst_make_it_failing_and_stop_the_pings() {
        let l = Liveness::new();
        let t0 = Instant::now();
        for k in 0..STATION_PANICS_FAILING as u64 {
            assert_eq!(l.station().failing_at(t0 + Duration::from_secs(k)), None);
            l.station().panicked_at(t0 + Duration::from_secs(k), "boom");
        }
        let now = t0 + Duration::from_secs(10);
        let why = l.station().failing_at(now).expect("failing");
        assert!(
            why.contains("panicked 3 times within 10m") && why.contains("boom"),
            "{why}"
        );
        let f = l.station().findings_at(now);
        assert_eq!((f[0].status, f[0].code.as_str()), (Status::Critical, "station_failing"));
        assert!(!l.blockers().is_empty(), "the watchdog withholds its pings");
        // Spread over more than the window, the same number of panics is not a failing recorder.
        let h = RecorderHealth::default();
        for k in 0..STATION_PANICS_FAILING as u32 {
            h.panicked_at(t0 + STATION_PANIC_WINDOW * k, "boom");
        }
        assert_eq!(h.failing_at(t0 + STATION_PANIC_WINDOW * 2), None);
        assert_eq!(h.restarts(), STATION_PANICS_FAILING as u64);
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

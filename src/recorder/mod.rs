//! The station: takes each poll cycle from every bus, applies the rules of [`crate::events::detect`] to the
//! stored state of each meter (valve, link, rule memory), turns what fires into records (BizData from
//! the mapping row, the same poll's readings and the event's fixed fields), commits the meter's new
//! state + its records in one transaction, and makes each cycle durable (one flush + fsync) before
//! it wakes the sender.
//!
//! Event rules and where they are evaluated:
//! - valve rules: on the sample that makes a transition accepted (after `confirm`).
//! - reading rules (threshold, `rises_by`): on every sample of a meter that reads the field; an
//!   offline meter sends no samples, and an undecodable reading never fires.
//! - link rules: `离线` when the bus reports the meter offline and then on every cycle of its bus
//!   while it stays offline (that is the clock of a `for`), `在线` on the first sample after an
//!   outage. The outage's start is persisted, so a `for` runs across restarts; but after a restart an
//!   outage is only reported once the bus has confirmed it again (the meter may have come back while
//!   the gateway was down).
//!
//! The memory is read from the store (or from this cycle's not yet committed change of the meter) for
//! every evaluation and written only when it changed, so what
//! the rules know is exactly what is on disk: a refused commit (outbox full) is seen again. All changes
//! of one cycle are committed in ONE transaction (per meter all-or-nothing), then flushed and fsynced once.
//!
//! Also keeps the live view of every meter (online, state, readings) for the admin API and tests.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, SecondsFormat, Utc};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::clock::{BootStamp, WallClock};
use crate::config::{Config, EventKind, EventRule, OFFLINE, ONLINE};
use crate::events::detect::{self, decide, Decision, Pending};
use crate::events::record::{render_event_biz_data, BizTemplate, Draft, Record};
use crate::modbus::cycle::{Cycle, Sample};
use crate::store::{Store, StoreError, StoredState};

/// Live view of one meter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeterView {
    /// Answering (false after `offline_after` failures in a row).
    pub online: bool,
    /// The current valve label, if ever read.
    pub state: Option<String>,
    /// Latest readings, rendered.
    pub readings: Vec<String>,
    /// When it last answered.
    pub last_sample: Option<Instant>,
}

/// Shared live view of all meters, indexed like [`Config::meters`].
#[derive(Debug, Default)]
pub struct Live {
    meters: Mutex<Vec<MeterView>>,
    /// Valve transitions committed since start (for `/metrics`).
    pub transitions: AtomicU64,
    /// The wall clock the station labels what it detects with: shared here with whoever watches the
    /// station, so that tests can step it (a board's clock stepped by NTP) without the system's.
    pub clock: WallClock,
}

impl Live {
    /// A view of `n` meters, all online until told otherwise.
    pub fn new(n: usize) -> Arc<Live> {
        Live::with_clock(n, WallClock::default())
    }

    /// [`Live::new`], labelling with `clock` (a reload keeps the gateway's clock).
    pub fn with_clock(n: usize, clock: WallClock) -> Arc<Live> {
        Arc::new(Live {
            meters: Mutex::new(vec![
                MeterView {
                    online: true,
                    ..MeterView::default()
                };
                n
            ]),
            transitions: AtomicU64::new(0),
            clock,
        })
    }

    /// A copy of the view.
    pub fn snapshot(&self) -> Vec<MeterView> {
        // A panic while the lock was held (the station is restarted after one) leaves a usable view.
        self.meters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn update(&self, f: impl FnOnce(&mut Vec<MeterView>)) {
        f(&mut self.meters.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    }
}

/// Applies cycles to the store.
pub struct Recorder {
    cfg: Arc<Config>,
    outbox: Store,
    pending: Vec<Pending>,
    sender_wake: Arc<Notify>,
    live: Arc<Live>,
    full_logged: bool,
    /// Meters the bus has reported offline in this run, by meter index. A `离线` rule fires only for
    /// these: an outage persisted before a restart must be confirmed by the bus again.
    confirmed_offline: Vec<bool>,
    /// The latest readings of each meter in this run: the readings of a `离线` work order.
    last_readings: Vec<Option<Vec<String>>>,
    /// Meter indices of each bus, for the timer pass.
    by_bus: Vec<Vec<usize>>,
    /// Whether any link rule is configured (otherwise link changes are not persisted at all).
    link_rules: bool,
    /// Whether any `离线` rule is configured (otherwise `在线` rules report every return).
    offline_rules: bool,
    /// This cycle's changes, one per meter, in the order first touched; committed together by
    /// [`Recorder::flush_cycle`] in ONE transaction (one commit per cycle instead of one per meter).
    staged: Vec<Staged>,
    /// Where each meter's current outage began as the bus reported it in this run (label, boot clock):
    /// the start of an outage whose first commit was refused.
    offline_at: Vec<Option<(DateTime<Utc>, BootStamp)>>,
    /// Wall clock minus boot clock at the last cycle, ms: a jump is a step of the system clock.
    wall_offset_ms: Option<i64>,
    /// Each meter's state as last committed, by meter index, once read (`None`: not read yet). The
    /// station is the only writer of states, so after the first read of a meter its state comes from
    /// here instead of a store read and JSON decode per sample (BENCHMARKS.md row 2).
    stored: Vec<Option<Option<StoredState>>>,
    /// [`Store::generation`] when `stored` was filled: a reopened store may have lost what sat in
    /// sled's failed buffer, so the states are read from it again.
    generation: u64,
    /// BizData templates by (meter index, rule index), made on a meter's first record for a rule. At
    /// most meters × rules (~1 KiB each); a reload starts a new station, so a changed mapping or rule
    /// gets new ones.
    templates: RefCell<HashMap<(usize, usize), BizTemplate>>,
    /// BizData buffers of committed records, rendered into again: a cycle's records are all alive
    /// until its commit, too many for the allocator's per-size cache, so each new one cost a slow
    /// allocation (BENCHMARKS.md row 2). At most [`SPARE_BIZ`] are kept (~600 B each).
    spare_biz: RefCell<Vec<String>>,
    /// The last second [`Recorder::stamp`] formatted, and its text.
    last_stamp: RefCell<(Option<i64>, String)>,
    /// Whether the kernel said the system clock was not synchronized when that second was formatted.
    unsynced: std::cell::Cell<bool>,
}

/// A jump of the wall clock against the boot clock this large between two cycles is a step.
const CLOCK_STEP_MS: i64 = 2_000;

/// Appended to a detection time labelled while the kernel said the system clock was not synchronized:
/// such a time may be decades off (a board without a battery-backed clock) and is shown as such.
pub const UNSYNCED_MARK: &str = " (clock not synchronized)";

/// Most BizData buffers kept for reuse: one commit chunk's worth.
const SPARE_BIZ: usize = 256;

/// A meter's changes within one cycle, merged: the state it had when the cycle started, the state it
/// ends with, and every record made on the way. Merging keeps a meter all-or-nothing: if its records
/// do not fit in the outbox, none of its state moves either, so nothing is detected without a record.
struct Staged {
    meter: usize,
    /// The valve value committed before this cycle (for the transitions counter).
    before_raw: Option<i64>,
    after: StoredState,
    drafts: Vec<Draft>,
}

/// What applying something to one meter did: (wrote to the store, records queued).
type Applied = Result<(bool, usize), StoreError>;

impl Recorder {
    /// A station over `outbox` that wakes `sender_wake` after each durable cycle with records.
    pub fn new(cfg: Arc<Config>, outbox: Store, sender_wake: Arc<Notify>, live: Arc<Live>) -> Recorder {
        let n = cfg.meters.len();
        let mut by_bus = vec![Vec::new(); cfg.buses.len()];
        for (i, m) in cfg.meters.iter().enumerate() {
            if let Some(b) = by_bus.get_mut(m.bus) {
                b.push(i);
            }
        }
        let link = |online: bool| {
            cfg.events
                .iter()
                .any(|e| matches!(e.kind, EventKind::Link { online: o, .. } if o == online))
        };
        let (link_rules, offline_rules) = (link(true) || link(false), link(false));
        let generation = outbox.generation();
        Recorder {
            pending: vec![Pending::default(); n],
            confirmed_offline: vec![false; n],
            last_readings: vec![None; n],
            by_bus,
            link_rules,
            offline_rules,
            cfg,
            outbox,
            sender_wake,
            live,
            full_logged: false,
            staged: Vec::new(),
            stored: vec![None; n],
            offline_at: vec![None; n],
            wall_offset_ms: None,
            generation,
            templates: RefCell::default(),
            spare_biz: RefCell::default(),
            last_stamp: RefCell::default(),
            unsynced: std::cell::Cell::new(false),
        }
    }

    /// Apply cycles until every bus has dropped its sender (so no cycle is left behind at
    /// shutdown), then sync. Stops before the next cycle once `abandon` is cancelled (a shutdown or
    /// reload that gave up waiting for it: it must not commit beside its successor).
    ///
    /// Blocking, on a thread of its own (`spawn_blocking`): the station's work is the disk's, one
    /// commit and one fsync per cycle, and handing each sync to the blocking pool and back cost ~5 %
    /// of the durable transition rate (BENCHMARKS.md row 2).
    pub fn run_blocking(mut self, mut cycles: mpsc::Receiver<Cycle>, abandon: CancellationToken) {
        while let Some(cycle) = cycles.blocking_recv() {
            if abandon.is_cancelled() {
                tracing::warn!(
                    message = "Recorder abandoned; the states of cycles not applied are read again by the next polls."
                );
                return;
            }
            self.apply(cycle);
        }
        if let Err(e) = self.outbox.sync_blocking() {
            tracing::error!(message = "Final sync of the state database failed.", error = %e);
        }
    }

    /// Apply one cycle; returns how many records it queued (durably). Blocking (one commit, one fsync).
    ///
    /// While the store is failed the cycle only updates the live view (polling goes on): its states
    /// are not evaluated, so what it would have detected is detected again from the stored states
    /// once the store works. Each cycle tries to heal the store (at most as often as its backoff lets).
    pub fn apply(&mut self, cycle: Cycle) -> usize {
        let now = self.live.clock.now();
        self.notice_clock_step(now);
        let mut wrote = false;
        let mut queued = 0;
        for &(meter, online) in &cycle.links {
            self.live.update(|v| {
                if let Some(m) = v.get_mut(meter) {
                    m.online = online;
                }
            });
            if let Some(c) = self.confirmed_offline.get_mut(meter) {
                *c = !online;
            }
            if let Some(at) = self.offline_at.get_mut(meter) {
                *at = (!online).then(|| (now, BootStamp::now()));
            }
        }
        for sample in &cycle.samples {
            self.observe(sample);
        }
        if !self.store_works() {
            return 0;
        }
        for &(meter, online) in &cycle.links {
            if !online {
                let r = self.offline_cycle(meter, now);
                self.settle(meter, r, &mut wrote, &mut queued);
            }
        }
        for sample in &cycle.samples {
            let r = self.apply_sample(sample, now);
            self.settle(sample.meter, r, &mut wrote, &mut queued);
        }
        // The clock of `for`: every cycle of a bus re-evaluates its meters that are still offline.
        if self.offline_rules {
            let offline: Vec<usize> = self
                .by_bus
                .get(cycle.bus)
                .map(|ms| {
                    ms.iter()
                        .copied()
                        .filter(|&m| self.confirmed_offline.get(m).copied().unwrap_or(false))
                        .collect()
                })
                .unwrap_or_default();
            for meter in offline {
                let r = self.offline_cycle(meter, now);
                self.settle(meter, r, &mut wrote, &mut queued);
            }
        }
        let (w, q) = self.flush_cycle();
        wrote |= w;
        queued += q;
        if wrote {
            match self.outbox.sync_blocking() {
                Ok(()) => {
                    if queued > 0 {
                        self.sender_wake.notify_one();
                    }
                }
                // The store is failed now and logged it; this cycle's records stay invisible to the
                // sender until a reopen has made them durable (or lost them with their states).
                Err(e) => tracing::debug!(message = "Cannot sync the state database to disk.", error = %e),
            }
        } else {
            self.outbox.check_blocking();
        }
        queued
    }

    /// Log a step of the wall clock (NTP setting a board's clock that booted in 1970), once per step:
    /// the detection times on either side of it are on different clocks. Nothing is decided on it.
    fn notice_clock_step(&mut self, now: DateTime<Utc>) {
        let offset = now.timestamp_millis() - (crate::clock::boot_ns() / 1_000_000) as i64;
        if let Some(before) = self.wall_offset_ms.replace(offset) {
            let step = offset - before;
            if step.abs() >= CLOCK_STEP_MS {
                tracing::warn!(
                    message = "The system clock stepped; detection times before the step are on the old clock (rules and durations are not affected).",
                    step_seconds = step / 1000,
                    now = %now.to_rfc3339_opts(SecondsFormat::Secs, true),
                    clock = ?crate::clock::sync_state()
                );
            }
        }
    }

    /// Whether the store works (healing it when it is failed and its backoff allows). After a reopen
    /// the states are read from the store again, and the sender is woken for what the reopen made
    /// durable.
    fn store_works(&mut self) -> bool {
        if !self.outbox.heal_blocking() {
            return false;
        }
        self.reopened();
        true
    }

    /// Whether the store was opened again since the states in memory were read; if so they are
    /// forgotten (what sat in sled's failed buffer is gone: they are read back) and the sender is woken
    /// for what the reopen made durable.
    fn reopened(&mut self) -> bool {
        let generation = self.outbox.generation();
        if generation == self.generation {
            return false;
        }
        self.generation = generation;
        self.stored.iter_mut().for_each(|s| *s = None);
        self.sender_wake.notify_one();
        true
    }

    fn settle(&mut self, meter: usize, r: Applied, wrote: &mut bool, queued: &mut usize) {
        match r {
            Ok((w, n)) => {
                *wrote |= w;
                *queued += n;
            }
            Err(StoreError::Full { .. }) if self.full_logged => {}
            Err(e @ StoreError::Full { .. }) => {
                self.full_logged = true;
                tracing::error!(message = "Outbox full: new states are not committed until records are delivered.", error = %e);
            }
            // Logged once per change by the outbox (free space, store failure).
            Err(StoreError::NoSpace(_) | StoreError::Failed { .. }) => {}
            Err(_) if self.outbox.is_failed() => {}
            Err(e) => {
                tracing::error!(message = "Cannot store a meter state.", meter = %self.meter_no(meter), error = %e)
            }
        }
    }

    fn meter_no(&self, meter: usize) -> &str {
        self.cfg.meters.get(meter).map_or("?", |m| m.meter_no.as_str())
    }

    fn stamp(&self, t: DateTime<Utc>) -> String {
        // The samples of a cycle mostly fall in one second: format it once.
        let mut last = self.last_stamp.borrow_mut();
        if last.0 != Some(t.timestamp()) {
            let text = t
                .with_timezone(&self.cfg.site.timezone)
                .to_rfc3339_opts(SecondsFormat::Secs, false);
            // Asked once a second at most: a board that boots in 1970 labels with 1970 until NTP.
            self.unsynced
                .set(crate::clock::sync_state() == crate::clock::ClockSync::Unsynchronized);
            *last = (Some(t.timestamp()), text);
        }
        last.1.clone()
    }

    /// A cycle with `meter` offline (the bus reported it after `offline_after` failures, in this cycle
    /// or before): start the outage unless one is stored (a restart mid-outage keeps its start), then
    /// evaluate the link rules (a pending `for` may have run out). The outage starts when the bus
    /// reported it, also when that cycle's commit was refused (outbox full, no room on disk, store
    /// failed): the next cycle starts it again, with the same start, and its work order fires then.
    fn offline_cycle(&mut self, meter: usize, now: DateTime<Utc>) -> Applied {
        if !self.link_rules {
            return Ok((false, 0));
        }
        let cfg = Arc::clone(&self.cfg);
        let Some(m) = cfg.meters.get(meter) else {
            return Ok((false, 0));
        };
        let mut st = self.state_of(meter)?.unwrap_or(StoredState {
            valve_unknown: true,
            ..StoredState::default()
        });
        if st.offline_since.is_none() {
            let (since, boot) = self
                .offline_at
                .get(meter)
                .cloned()
                .flatten()
                .unwrap_or_else(|| (now, BootStamp::now()));
            st.offline_since = Some(since);
            st.offline_boot = Some(boot);
            st.back_since = None;
            st.back_boot = None;
            tracing::info!(message = "Meter counted offline for the link rules.", meter = %m.meter_no);
        }
        let drafts = self.link_drafts(meter, &mut st, now, None);
        self.commit(meter, st, drafts)
    }

    /// What a sample shows whether or not the store works: the live view, the latest readings, and
    /// that the meter answers.
    fn observe(&mut self, s: &Sample) {
        let Some(meter) = self.cfg.meters.get(s.meter) else {
            return;
        };
        let label = meter.valve.label(s.valve_raw);
        // `clone_from` reuses the strings already there: this runs for every sample of every meter.
        self.live.update(|v| {
            if let Some(m) = v.get_mut(s.meter) {
                m.online = true;
                if m.state.as_deref() != Some(&*label) {
                    m.state = Some(label.to_string());
                }
                m.readings.clone_from(&s.readings);
                m.last_sample = Some(Instant::now());
            }
        });
        match self.last_readings.get_mut(s.meter) {
            Some(Some(r)) => r.clone_from(&s.readings),
            Some(r) => *r = Some(s.readings.clone()),
            None => {}
        }
        if let Some(c) = self.confirmed_offline.get_mut(s.meter) {
            *c = false;
        }
    }

    /// One sample (already [`Recorder::observe`]d): link (back online?), valve (baseline /
    /// transition), then the reading rules.
    fn apply_sample(&mut self, s: &Sample, now: DateTime<Utc>) -> Applied {
        let cfg = Arc::clone(&self.cfg);
        let Some(meter) = cfg.meters.get(s.meter) else {
            return Ok((false, 0));
        };
        let label = meter.valve.label(s.valve_raw);
        // One copy, changed below; `commit` compares it with the state it came from.
        let before = self.state_of(s.meter)?;
        let stored_valve = before.as_ref().filter(|st| !st.valve_unknown).map(|st| st.raw);
        let at = self.stamp(now);
        let Some(pending) = self.pending.get_mut(s.meter) else {
            return Ok((false, 0));
        };
        let decision = decide(stored_valve, pending, s.valve_raw, meter.confirm);
        let mut st = before.unwrap_or_default();

        // The outage, if one is stored, is over; an `在线` rule reports it if it counts.
        let outage = st.offline_since.take();
        st.offline_boot = None;
        if let Some(start) = outage {
            let reported = self.cfg.events.iter().any(|e| {
                matches!(e.kind, EventKind::Link { online: false, .. })
                    && st.rules.get(&e.key).is_some_and(|m| m.fired_for == Some(start))
            });
            let counts = reported || !self.offline_rules;
            st.back_since = counts.then_some(now);
            st.back_boot = counts.then(BootStamp::now);
            tracing::info!(message = "Meter answers again after an outage.", meter = %meter.meter_no, reported);
        }

        let mut valve_drafts = Vec::new();
        match decision {
            Decision::Unchanged | Decision::Pending => {}
            Decision::Baseline => {
                tracing::info!(message = "Baseline valve state stored.", meter = %meter.meter_no, state = %label);
                st.raw = s.valve_raw;
                st.label = label.to_string();
                st.since = at.clone();
                st.valve_unknown = false;
            }
            Decision::Transition => {
                let from = std::mem::replace(&mut st.label, label.to_string());
                st.raw = s.valve_raw;
                st.since = at.clone();
                // Usually one rule matches: room for one draft (120 B) is a small allocation, where a
                // first `push` reserves four (480 B: glibc's slow path while a cycle's 50 are alive).
                valve_drafts.reserve_exact(1);
                for rule in self
                    .cfg
                    .events
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| e.matches(&from, &label))
                {
                    valve_drafts.push(self.draft(s.meter, rule, &at, &from, &label, &label, &s.readings));
                }
                if valve_drafts.is_empty() {
                    tracing::info!(message = "Valve moved; no event matches.", meter = %meter.meter_no, from = %from, to = %label);
                }
            }
        }

        let mut drafts = self.link_drafts(s.meter, &mut st, now, Some(&s.readings));
        // Usually there are no link records: take the valve's list rather than copy it into a new one.
        if drafts.is_empty() {
            drafts = valve_drafts;
        } else {
            drafts.append(&mut valve_drafts);
        }
        drafts.extend(self.reading_drafts(s, &mut st, &at));
        self.commit(s.meter, st, drafts)
    }

    /// Evaluate every link rule against `st` at `now`; `readings` are the sample's, if there is one.
    fn link_drafts(
        &self,
        meter: usize,
        st: &mut StoredState,
        now: DateTime<Utc>,
        readings: Option<&[String]>,
    ) -> Vec<Draft> {
        let confirmed = self.confirmed_offline.get(meter).copied().unwrap_or(false);
        let last = self
            .last_readings
            .get(meter)
            .and_then(Option::as_ref)
            .map(Vec::as_slice);
        let blank: Vec<String>;
        let readings: &[String] = match (readings, last) {
            (Some(r), _) | (None, Some(r)) => r,
            (None, None) => {
                let n = self.cfg.meters.get(meter).map_or(0, |m| m.readings.len());
                blank = vec![String::new(); n];
                &blank
            }
        };
        let label = if st.valve_unknown {
            "未知".to_string()
        } else {
            st.label.clone()
        };
        let mut out = Vec::new();
        for (r, e) in self.cfg.events.iter().enumerate() {
            let EventKind::Link { online, after } = e.kind else {
                continue;
            };
            let since = if online {
                st.back_since.map(|t| (t, lasted(&mut st.back_boot)))
            } else {
                st.offline_since
                    .filter(|_| confirmed)
                    .map(|t| (t, lasted(&mut st.offline_boot)))
            };
            let mem = st.rules.entry(e.key.clone()).or_default();
            if detect::link(after, mem, since) {
                let (from, to) = if online { (OFFLINE, ONLINE) } else { (ONLINE, OFFLINE) };
                out.push(self.draft(meter, (r, e), &self.stamp(now), from, to, &label, readings));
            }
        }
        out
    }

    /// Evaluate the threshold and `rises_by` rules on a sample (the valve state in `st` is the accepted one).
    fn reading_drafts(&self, s: &Sample, st: &mut StoredState, at: &str) -> Vec<Draft> {
        let Some(meter) = self.cfg.meters.get(s.meter) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (r, e) in self.cfg.events.iter().enumerate() {
            let (field, fired, shown_from) = match &e.kind {
                EventKind::Threshold { field, rule } => {
                    let Some(rendered) = reading(meter, s, field) else {
                        continue;
                    };
                    let mem = st.rules.entry(e.key.clone()).or_default();
                    (
                        field,
                        detect::threshold(rule, mem, detect::reading_value(rendered)),
                        String::new(),
                    )
                }
                EventKind::RisesBy { field, by, while_valve } => {
                    let Some(rendered) = reading(meter, s, field) else {
                        continue;
                    };
                    let in_state = !st.valve_unknown && st.label == *while_valve;
                    if in_state && meter.valve.label(s.valve_raw) != *while_valve {
                        // The valve reads another state that `confirm` has not accepted yet: the flow
                        // of a valve being opened is no leak. Wait, keeping the baseline (a glitch
                        // must not hide a leak in progress).
                        continue;
                    }
                    let mem = st.rules.entry(e.key.clone()).or_default();
                    let fired = detect::rises_by(*by, mem, in_state, detect::reading_value(rendered));
                    let base = mem.baseline.map(|b| b.to_string()).unwrap_or_default();
                    (field, fired, base)
                }
                _ => continue,
            };
            if fired {
                let value = reading(meter, s, field).unwrap_or_default();
                let to = format!("{field}={value}");
                out.push(self.draft(s.meter, (r, e), at, &shown_from, &to, &st.label, &s.readings));
            }
        }
        out
    }

    /// A record's draft for `rule` (its index in the config, and itself).
    #[allow(clippy::too_many_arguments)]
    fn draft(
        &self,
        meter: usize,
        (index, rule): (usize, &EventRule),
        at: &str,
        from: &str,
        to: &str,
        valve_label: &str,
        readings: &[String],
    ) -> Draft {
        let m = self.cfg.meters.get(meter);
        let meter_no = m.map_or("?", |m| m.meter_no.as_str());
        // Looked up only to make a template (or in the rare full render below).
        let row = || m.and_then(|m| self.cfg.mapping.get(&m.meter_no)).unwrap_or_default();
        let fields = || m.map_or(Vec::new(), |m| m.readings.iter().map(|r| r.field.as_str()).collect());
        // From the meter's template for this rule (made on its first record), else rendered in full.
        let mut biz_data = self.spare_biz.borrow_mut().pop().unwrap_or_default();
        let templated = self
            .templates
            .borrow_mut()
            .entry((meter, index))
            .or_insert_with(|| BizTemplate::new(&row(), meter_no, &fields(), &rule.fields))
            .render_into(&mut biz_data, valve_label, readings);
        if !templated {
            let readings = fields().into_iter().zip(readings.iter().map(String::as_str));
            biz_data = render_event_biz_data(&row(), meter_no, valve_label, readings, &rule.fields);
        }
        Draft {
            event_name: rule.name.clone(),
            detected_at: if self.unsynced.get() {
                format!("{at}{UNSYNCED_MARK}")
            } else {
                at.to_string()
            },
            from: from.to_string(),
            to: to.to_string(),
            biz_data,
        }
    }

    /// The state of a meter as this cycle has left it so far (staged, else committed), if known in
    /// memory: always after [`Recorder::state_of`] succeeded for it.
    fn current_state(&self, meter: usize) -> Option<&StoredState> {
        match self.staged.iter().find(|c| c.meter == meter) {
            Some(c) => Some(&c.after),
            None => self.stored.get(meter).and_then(|s| s.as_ref()).and_then(Option::as_ref),
        }
    }

    /// The state of a meter as this cycle has left it so far: staged, else committed.
    fn state_of(&mut self, meter: usize) -> Result<Option<StoredState>, StoreError> {
        let known = self.staged.iter().any(|c| c.meter == meter) || matches!(self.stored.get(meter), Some(Some(_)));
        if !known {
            let st = self.outbox.state(self.meter_no(meter))?;
            match self.stored.get_mut(meter) {
                Some(slot) => *slot = Some(st),
                None => return Ok(st),
            }
        }
        Ok(self.current_state(meter).cloned())
    }

    /// Stage `after` with `drafts` for this cycle's commit, unless nothing changed. Memory of rules no
    /// longer configured is dropped here. Returns (something staged, 0): records are counted when the
    /// cycle is committed.
    fn commit(&mut self, meter: usize, mut after: StoredState, drafts: Vec<Draft>) -> Applied {
        let cfg = Arc::clone(&self.cfg);
        after.rules.retain(|k, _| cfg.events.iter().any(|e| &e.key == k));
        // Memory that is still all defaults need not be stored.
        after.rules.retain(|_, m| *m != detect::RuleMemory::default());
        let before = self.current_state(meter);
        if drafts.is_empty() && before == Some(&after) {
            return Ok((false, 0));
        }
        let before_raw = before.map(|b| b.raw);
        match self.staged.iter_mut().find(|c| c.meter == meter) {
            Some(c) => {
                c.after = after;
                c.drafts.extend(drafts);
            }
            None => self.staged.push(Staged {
                meter,
                before_raw,
                after,
                drafts,
            }),
        }
        Ok((false, 0))
    }

    /// Commit every staged change of this cycle in one atomic batch. Returns (wrote, records queued).
    fn flush_cycle(&mut self) -> (bool, usize) {
        if self.staged.is_empty() {
            return (false, 0);
        }
        if self.reopened() {
            // The sender reopened the store during this cycle: what it was evaluated against may be
            // gone. Drop it; the next cycle reads the states back and sees the changes again.
            self.staged.clear();
            return (false, 0);
        }
        // Taken and given back empty: the list keeps its capacity for the next cycle.
        let mut staged = std::mem::take(&mut self.staged);
        let result = self.commit_staged(&mut staged);
        staged.clear();
        self.staged = staged;
        result
    }

    fn commit_staged(&mut self, staged: &mut Vec<Staged>) -> (bool, usize) {
        // Borrowed, not copied: the states are kept below once committed.
        let changes = staged
            .iter_mut()
            .map(|c| (self.meter_no(c.meter), &c.after, std::mem::take(&mut c.drafts)))
            .collect();
        let results = match self.outbox.commit_batch(changes) {
            Ok(r) => r,
            Err(e) => {
                // A storage error fails the store, which logs it once; its states are seen again.
                tracing::debug!(message = "Cannot store this cycle's meter states; they are seen again next cycle.", meters = staged.len(), error = %e);
                // Read these meters back from the store: it, not this process, knows what is committed.
                for c in staged.iter() {
                    if let Some(slot) = self.stored.get_mut(c.meter) {
                        *slot = None;
                    }
                }
                return (false, 0);
            }
        };
        let (mut wrote, mut queued) = (false, 0);
        for (c, result) in staged.drain(..).zip(results) {
            let records = match result {
                Ok(records) => records,
                Err(e) => {
                    self.settle(c.meter, Err(e), &mut wrote, &mut queued);
                    continue;
                }
            };
            wrote = true;
            queued += records.len();
            self.full_logged = false;
            if c.before_raw.is_some_and(|raw| raw != c.after.raw) {
                self.live.transitions.fetch_add(1, Ordering::Relaxed);
            }
            self.log_queued(&records);
            self.keep_spare(records);
            if let Some(slot) = self.stored.get_mut(c.meter) {
                *slot = Some(Some(c.after));
            }
        }
        (wrote, queued)
    }

    /// Keep committed records' BizData buffers for the next drafts (up to [`SPARE_BIZ`]).
    fn keep_spare(&self, records: Vec<Record>) {
        let mut spare = self.spare_biz.borrow_mut();
        let room = SPARE_BIZ.saturating_sub(spare.len());
        spare.extend(records.into_iter().take(room).map(|r| r.biz_data));
    }

    fn log_queued(&self, records: &[Record]) {
        for r in records {
            // "Valve transition queued." is the message operators and tests/ops.rs know; keep it for valves.
            if self
                .cfg
                .events
                .iter()
                .any(|e| e.name == r.event_name && matches!(e.kind, EventKind::Valve { .. }))
            {
                tracing::info!(message = "Valve transition queued.", id = r.id, meter = %r.meter_no, event = %r.event_name, from = %r.from, to = %r.to);
            } else {
                tracing::info!(message = "Work order queued.", id = r.id, meter = %r.meter_no, event = %r.event_name, from = %r.from, to = %r.to);
            }
        }
    }
}

/// How long a stretch timed by `stamp` has lasted, on the boot clock. A stretch without a stamp of this
/// boot (a state written before stamps existed, or before a power cut: the boot clock restarted, and
/// the wall clock cannot say how long the gateway was down) counts from now, and gets a stamp.
fn lasted(stamp: &mut Option<BootStamp>) -> std::time::Duration {
    match stamp.as_ref().and_then(BootStamp::elapsed) {
        Some(d) => d,
        None => {
            *stamp = Some(BootStamp::now());
            std::time::Duration::ZERO
        }
    }
}

/// The rendered reading `field` of a sample, if the meter reads it.
fn reading<'a>(meter: &crate::config::MeterConfig, s: &'a Sample, field: &str) -> Option<&'a str> {
    let k = meter.readings.iter().position(|r| r.field == field)?;
    s.readings.get(k).map(String::as_str)
}

//! The recorder: takes each poll cycle from every bus, applies the rules of [`crate::events::detect`]
//! to the stored state of each meter (valve, link, rule memory), turns what fires into records (BizData
//! from the mapping row, the same poll's readings and the event's fixed fields), commits the meter's new
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
//! every evaluation and written only when it changed, so what the rules know is exactly what is on
//! disk: a refused commit (outbox full) is seen again. All changes of one cycle are committed in ONE
//! transaction (per meter all-or-nothing), then flushed and fsynced once. While the store is failed a
//! cycle only updates the live view: nothing is evaluated against states that may not be on disk.
//!
//! Its work is the disk's and its own allocations, at the rate transitions are made durable. So it
//! runs on a thread of its own (handing each sync to the blocking pool and back was a measurable share
//! of that rate); it is the only writer of meter states, so it keeps each one in memory after the first
//! read instead of reading and decoding it per sample; and it reuses BizData templates and buffers and
//! sizes small lists exactly, because a cycle's records all stay alive until its commit, too many for
//! the allocator's per-size cache, so fresh allocations take its slow path.
//!
//! Files:
//! - `mod.rs`: [`Recorder`]: applying a cycle (links, samples, the `for` clock of offline meters),
//!   valve transitions (baseline, debounce) and the start and end of outages.
//! - `rules`: the `[[event]]` rules (link, threshold, `rises_by`) against a meter's state, and the
//!   drafts of the work orders that fire (detection time, BizData).
//! - `commit`: staging each meter's change, one transaction per cycle, the committed states kept in
//!   memory, and what a refused commit or a reopened store means.
//! - [`live`]: the live view of the meters for the admin API.

mod commit;
pub mod live;
mod rules;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, SecondsFormat, Utc};
use tokio::sync::Notify;

use crate::clock::BootStamp;
use crate::config::{Config, EventKind};
use crate::events::detect::{decide, Decision, Pending};
use crate::events::record::BizTemplate;
use crate::modbus::cycle::{Cycle, Sample};
use crate::store::{Store, StoreError, StoredState};

use self::commit::Staged;
use self::live::Live;

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
    /// recorder is the only writer of states, so after the first read of a meter its state comes from
    /// here instead of a store read and JSON decode per sample.
    stored: Vec<Option<Option<StoredState>>>,
    /// [`Store::generation`] when `stored` was filled: a reopened store may have lost what sat in
    /// sled's failed buffer, so the states are read from it again.
    generation: u64,
    /// BizData templates by (meter index, rule index), made on a meter's first record for a rule. At
    /// most meters × rules (~1 KiB each); a reload starts a new recorder, so a changed mapping or rule
    /// gets new ones.
    templates: RefCell<HashMap<(usize, usize), BizTemplate>>,
    /// BizData buffers of committed records, rendered into again (see the module doc for why). At most
    /// [`commit::SPARE_BIZ`] are kept (~600 B each).
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
pub(crate) const UNSYNCED_MARK: &str = " (clock not synchronized)";

/// What applying something to one meter did: (wrote to the store, records queued).
type Applied = Result<(bool, usize), StoreError>;

impl Recorder {
    /// A recorder over `outbox` that wakes `sender_wake` after each durable cycle with records.
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

    fn meter_no(&self, meter: usize) -> &str {
        self.cfg.meters.get(meter).map_or("?", |m| m.meter_no.as_str())
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
                // Usually one rule matches: room for one draft, where a first `push` reserves four
                // (module doc: allocations while a cycle's records are alive).
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
}

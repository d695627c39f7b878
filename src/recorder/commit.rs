//! One transaction per cycle: each meter's changes are staged as the cycle is applied, then committed
//! together, then the committed states are kept in memory.
//!
//! Invariants: a meter's state and its records are committed together or not at all (a refused meter
//! moves neither, so nothing is detected without a record); the states in memory are exactly what is
//! committed, and are forgotten (read back from the store) after a failed commit or a reopened store.
//! Never commits a cycle evaluated against a store that was reopened meanwhile.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::config::EventKind;
use crate::events::detect;
use crate::events::record::{Draft, Record};
use crate::recorder::{Applied, Recorder};
use crate::store::{StoreError, StoredState};

/// Most BizData buffers kept for reuse: one commit chunk's worth.
pub(super) const SPARE_BIZ: usize = 256;

/// A meter's changes within one cycle, merged: the state it had when the cycle started, the state it
/// ends with, and every record made on the way. Merging keeps a meter all-or-nothing: if its records
/// do not fit in the outbox, none of its state moves either, so nothing is detected without a record.
pub(super) struct Staged {
    meter: usize,
    /// The valve value committed before this cycle (for the transitions counter).
    before_raw: Option<i64>,
    after: StoredState,
    drafts: Vec<Draft>,
}

impl Recorder {
    /// Whether the store works (healing it when it is failed and its backoff allows). After a reopen
    /// the states are read from the store again, and the sender is woken for what the reopen made
    /// durable.
    pub(super) fn store_works(&mut self) -> bool {
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

    pub(super) fn settle(&mut self, meter: usize, r: Applied, wrote: &mut bool, queued: &mut usize) {
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

    /// The state of a meter as this cycle has left it so far (staged, else committed), if known in
    /// memory: always after [`Recorder::state_of`] succeeded for it.
    fn current_state(&self, meter: usize) -> Option<&StoredState> {
        match self.staged.iter().find(|c| c.meter == meter) {
            Some(c) => Some(&c.after),
            None => self.stored.get(meter).and_then(|s| s.as_ref()).and_then(Option::as_ref),
        }
    }

    /// The state of a meter as this cycle has left it so far: staged, else committed.
    pub(super) fn state_of(&mut self, meter: usize) -> Result<Option<StoredState>, StoreError> {
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
    pub(super) fn commit(&mut self, meter: usize, mut after: StoredState, drafts: Vec<Draft>) -> Applied {
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
    pub(super) fn flush_cycle(&mut self) -> (bool, usize) {
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

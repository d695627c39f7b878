//! The simulator's faults: what a request to a unit can meet besides a plain answer. A [`Fault`] queued
//! for the next request ([`Plant::inject`]), a dead unit ([`Plant::silence`]), a [`Flaky`] unit failing a
//! share of its requests at random ([`Plant::set_flaky`]). Here they are only recorded in the plant;
//! `answer.rs` applies them to a request, `service.rs` on the wire.
//!
//! Invariant: a flaky unit's draws come from a generator seeded per unit, so the same seed and the same
//! requests fail the same way again. Never: changes a unit's tables.

use std::collections::VecDeque;
use std::time::Duration;

use rand::SeedableRng as _;

use super::Plant;

/// A fault injected into the next request to a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer after this delay (a late answer).
    Late(Duration),
    /// Answer a read with one item fewer than asked.
    WrongCount,
    /// Replace the answer's bytes on the wire by garbage of the same length.
    Garbage,
}

/// A unit that fails a share of its requests at random ([`Plant::set_flaky`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Flaky {
    /// Share of the requests that fail, `0.0..=1.0`.
    pub rate: f64,
    /// A failing request is answered after this delay or not at all, at random half and half; `None`:
    /// failing requests are never answered.
    pub late: Option<Duration>,
    /// Seed of the unit's draws (mixed with the unit id, so units of one seed differ).
    pub seed: u64,
}

impl Plant {
    /// Make `unit` dead (`true`: no answers at all) or alive again.
    pub fn silence(&self, unit: u8, silent: bool) {
        self.lock().silent.insert(unit, silent);
    }

    /// Make `unit` fail a share of its requests at random (`None`: answer every request again).
    /// Counts of failures so far are kept.
    pub fn set_flaky(&self, unit: u8, flaky: Option<Flaky>) {
        let mut p = self.lock();
        match flaky {
            Some(f) => {
                let rng = rand::rngs::StdRng::seed_from_u64(f.seed ^ (u64::from(unit) << 56));
                p.flaky.insert(unit, (f, rng));
            }
            None => {
                p.flaky.remove(&unit);
            }
        }
    }

    /// Requests of `unit` failed at random so far (late or unanswered).
    pub fn flaky_failures(&self, unit: u8) -> u64 {
        self.lock().flaky_failures.get(&unit).copied().unwrap_or(0)
    }

    /// Queue a fault for the next request to `unit`.
    pub fn inject(&self, unit: u8, fault: Fault) {
        self.lock().faults.entry(unit).or_default().push_back(fault);
    }

    /// Faults still queued for `unit`.
    pub fn pending_faults(&self, unit: u8) -> usize {
        self.lock().faults.get(&unit).map_or(0, VecDeque::len)
    }
}

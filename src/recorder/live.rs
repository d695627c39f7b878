//! The live view of every meter (online, valve state, latest readings, last answer) for the admin API
//! and tests, and the wall clock the recorder labels with.
//!
//! The recorder writes it for every sample and link change, whether or not the store works; everyone
//! else only reads a copy ([`Live::snapshot`]). It is a view, never a source of truth: nothing is
//! decided on it, and a panic while its lock was held leaves it usable.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::clock::WallClock;

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
    pub(crate) last_sample: Option<Instant>,
}

/// Shared live view of all meters, indexed like [`crate::config::Config::meters`].
#[derive(Debug, Default)]
pub struct Live {
    meters: Mutex<Vec<MeterView>>,
    /// Valve transitions committed since start (for `/metrics`).
    pub(crate) transitions: AtomicU64,
    /// The wall clock the recorder labels what it detects with: shared here with whoever watches the
    /// recorder, so that tests can step it (a board's clock stepped by NTP) without the system's.
    pub clock: WallClock,
}

impl Live {
    /// A view of `n` meters, all online until told otherwise.
    pub fn new(n: usize) -> Arc<Live> {
        Live::with_clock(n, WallClock::default())
    }

    /// [`Live::new`], labelling with `clock` (a reload keeps the gateway's clock).
    pub(crate) fn with_clock(n: usize, clock: WallClock) -> Arc<Live> {
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
        // A panic while the lock was held (the recorder is restarted after one) leaves a usable view.
        self.meters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut Vec<MeterView>)) {
        f(&mut self.meters.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    }
}

//! The station: takes each poll cycle from every bus, applies the transition rules to the stored
//! valve states, turns accepted transitions into records (BizData from the mapping row and the same
//! poll's readings), commits state + records in one transaction, and makes each cycle durable (one
//! flush + fsync) before it wakes the sender.
//!
//! Also keeps the live view of every meter (online, state, readings) for the admin API and tests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, SecondsFormat, Utc};
use tokio::sync::{mpsc, Notify};

use crate::config::Config;
use crate::detect::{decide, Decision, Pending};
use crate::outbox::{Draft, Outbox, OutboxError, StoredState};
use crate::record::render_biz_data;

/// One successful read of a meter: its valve's raw value and its readings, rendered.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Index into [`Config::meters`].
    pub meter: usize,
    /// The valve's raw value.
    pub valve_raw: i64,
    /// One rendered string per [`crate::config::MeterConfig::readings`], same order.
    pub readings: Vec<String>,
    /// When it was read.
    pub at: DateTime<Utc>,
}

/// What one round over a bus produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cycle {
    /// Index into [`Config::buses`].
    pub bus: usize,
    /// Meters read in this round.
    pub samples: Vec<Sample>,
    /// Meters whose link changed in this round: (meter index, online now).
    pub links: Vec<(usize, bool)>,
}

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
}

impl Live {
    /// A view of `n` meters, all online until told otherwise.
    pub fn new(n: usize) -> Arc<Live> {
        Arc::new(Live {
            meters: Mutex::new(vec![
                MeterView {
                    online: true,
                    ..MeterView::default()
                };
                n
            ]),
            transitions: AtomicU64::new(0),
        })
    }

    /// A copy of the view.
    pub fn snapshot(&self) -> Vec<MeterView> {
        self.meters.lock().map(|m| m.clone()).unwrap_or_default()
    }

    fn update(&self, f: impl FnOnce(&mut Vec<MeterView>)) {
        if let Ok(mut m) = self.meters.lock() {
            f(&mut m);
        }
    }
}

/// Applies cycles to the store.
pub struct Station {
    cfg: Arc<Config>,
    outbox: Outbox,
    pending: Vec<Pending>,
    sender_wake: Arc<Notify>,
    live: Arc<Live>,
    full_logged: bool,
}

impl Station {
    /// A station over `outbox` that wakes `sender_wake` after each durable cycle with records.
    pub fn new(cfg: Arc<Config>, outbox: Outbox, sender_wake: Arc<Notify>, live: Arc<Live>) -> Station {
        let n = cfg.meters.len();
        Station {
            cfg,
            outbox,
            pending: vec![Pending::default(); n],
            sender_wake,
            live,
            full_logged: false,
        }
    }

    /// Apply cycles until every bus has dropped its sender (so no cycle is left behind at
    /// shutdown), then sync.
    pub async fn run(mut self, mut cycles: mpsc::Receiver<Cycle>) {
        while let Some(cycle) = cycles.recv().await {
            self.apply(cycle).await;
        }
        if let Err(e) = self.outbox.sync().await {
            tracing::error!(message = "Final sync of the state database failed.", error = %e);
        }
    }

    /// Apply one cycle; returns how many records it queued (durably).
    pub async fn apply(&mut self, cycle: Cycle) -> usize {
        for (meter, online) in &cycle.links {
            self.live.update(|v| {
                if let Some(m) = v.get_mut(*meter) {
                    m.online = *online;
                }
            });
        }
        let mut wrote = false;
        let mut queued = 0;
        for sample in &cycle.samples {
            match self.apply_sample(sample) {
                Ok((w, n)) => {
                    wrote |= w;
                    queued += n;
                }
                Err(OutboxError::Full { .. }) if self.full_logged => {}
                Err(e @ OutboxError::Full { .. }) => {
                    self.full_logged = true;
                    tracing::error!(message = "Outbox full: new valve states are not committed until records are delivered.", error = %e);
                }
                Err(e) => {
                    tracing::error!(message = "Cannot store a valve state.", meter = %self.meter_no(sample.meter), error = %e)
                }
            }
        }
        if wrote {
            match self.outbox.sync().await {
                Ok(()) => {
                    if queued > 0 {
                        self.sender_wake.notify_one();
                    }
                }
                Err(e) => tracing::error!(message = "Cannot sync the state database to disk.", error = %e),
            }
        }
        queued
    }

    fn meter_no(&self, meter: usize) -> &str {
        self.cfg.meters.get(meter).map_or("?", |m| m.meter_no.as_str())
    }

    /// Returns (wrote to the store, records queued).
    fn apply_sample(&mut self, s: &Sample) -> Result<(bool, usize), OutboxError> {
        let Some(meter) = self.cfg.meters.get(s.meter) else {
            return Ok((false, 0));
        };
        let label = meter.valve.label(s.valve_raw);
        self.live.update(|v| {
            if let Some(m) = v.get_mut(s.meter) {
                m.online = true;
                m.state = Some(label.clone());
                m.readings = s.readings.clone();
                m.last_sample = Some(Instant::now());
            }
        });
        let stored = self.outbox.state(&meter.meter_no)?;
        let at =
            s.at.with_timezone(&self.cfg.site.timezone)
                .to_rfc3339_opts(SecondsFormat::Secs, false);
        let new_state = StoredState {
            raw: s.valve_raw,
            label: label.clone(),
            since: at.clone(),
        };
        let Some(pending) = self.pending.get_mut(s.meter) else {
            return Ok((false, 0));
        };
        match decide(stored.as_ref().map(|st| st.raw), pending, s.valve_raw, meter.confirm) {
            Decision::Unchanged | Decision::Pending => Ok((false, 0)),
            Decision::Baseline => {
                self.outbox.set_baseline(&meter.meter_no, &new_state)?;
                tracing::info!(message = "Baseline valve state stored.", meter = %meter.meter_no, state = %label);
                Ok((true, 0))
            }
            Decision::Transition => {
                let from = stored.map(|st| st.label).unwrap_or_default();
                let drafts = self.drafts(s, &from, &label, &at);
                let n = drafts.len();
                let records = self.outbox.commit(&meter.meter_no, &new_state, drafts)?;
                self.live.transitions.fetch_add(1, Ordering::Relaxed);
                self.full_logged = false;
                for r in &records {
                    tracing::info!(message = "Valve transition queued.", id = r.id, meter = %r.meter_no, event = %r.event_name, from = %from, to = %label);
                }
                if n == 0 {
                    tracing::info!(message = "Valve moved; no event matches.", meter = %meter.meter_no, from = %from, to = %label);
                }
                Ok((true, n))
            }
        }
    }

    fn drafts(&self, s: &Sample, from: &str, to: &str, at: &str) -> Vec<Draft> {
        let Some(meter) = self.cfg.meters.get(s.meter) else {
            return Vec::new();
        };
        let row = self.cfg.mapping.get(&meter.meter_no).unwrap_or_default();
        let readings = meter
            .readings
            .iter()
            .map(|r| r.field.as_str())
            .zip(s.readings.iter().map(String::as_str));
        let biz_data = render_biz_data(&row, &meter.meter_no, to, readings);
        self.cfg
            .events
            .iter()
            .filter(|e| e.matches(from, to))
            .map(|e| Draft {
                event_name: e.name.clone(),
                detected_at: at.to_string(),
                from: from.to_string(),
                to: to.to_string(),
                biz_data: biz_data.clone(),
            })
            .collect()
    }
}

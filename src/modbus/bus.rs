//! The bus task: one per `[[bus]]` ([`run_bus`]), it polls its meters in rounds over the bus's
//! `Link` and sends one `Cycle` per round to the recorder.
//!
//! Owns the online/offline state of each meter, the retry schedule of offline meters, the rounds and
//! their pacing, and the publishing of each meter's figures to [`BusStats`]. Invariants: a meter's
//! sample is sent only when every block of it was read in the same pass; a meter's link change is
//! sent once per change; while a meter is offline every round is sent, even empty (the recorder's
//! `for` timers of link events run on the cycles of their bus). Every duration here is measured on
//! the monotonic clock (`tokio::time::Instant`); the wall clock only labels samples.
//!
//! # Offline meters: retries with backoff
//!
//! A meter that fails `offline_after` reads in a row is reported offline (one link change to the
//! recorder). It is not given up on: a meter that fails a quarter of its reads at random fails three in a
//! row now and then, and a transition it shows meanwhile must not be missed. Its retry period (see
//! `retry_period`) is one poll round for its first `offline_after` retries, then doubles with every
//! failed retry (2, 4, 8 … rounds) up to `offline_retry`; any answer resets it. Retries are due by
//! round: a period of one round means "in the next round". So a dead meter costs one failed request
//! (timeout, plus `guard` on RTU) per round for a few rounds, then at most one per `offline_retry`.
//!
//! A round that overran its interval starts the next one at once, without waiting on the timer:
//! waiting on a deadline already past still costs a turn of the timer wheel, which ticks in whole
//! milliseconds.
//!
//! Never: panics on anything a device sends, exits before shutdown, logs once per poll (state changes
//! only), or slows the online meters down for an offline one more than one try per `offline_retry`
//! once its backoff has grown.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_modbus::prelude::ExceptionCode;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument as _};

use crate::config::point::PointSpec;
use crate::config::Config;
use crate::modbus::cycle::{Cycle, Sample};
use crate::modbus::link::{Data, Failure, Link};
use crate::modbus::plan::{plan_reads, ReadPlan, Slot};
use crate::modbus::point::{self, Raw};
use crate::modbus::stats::{bump, BusStats, LastFailure, Observed, Seen};

/// The retry period of an offline meter after `failed` failed retries (0: it has just gone offline):
/// one round (`poll`) for the first `one_round` retries, then doubling (2, 4, 8 … rounds) up to
/// `longest` (`offline_retry`). Never zero (a zero `poll` counts as 1 ms), never above `longest`
/// unless `longest` is shorter than a round (then every round).
fn retry_period(poll: Duration, longest: Duration, one_round: u32, failed: u32) -> Duration {
    let round = poll.max(Duration::from_millis(1));
    // Failed retries 0..one_round: one round; then one doubling per failed retry.
    let doublings = failed.saturating_add(1).saturating_sub(one_round).min(31);
    round.saturating_mul(1 << doublings).min(longest).max(round)
}

/// What the bus task knows about one meter.
struct MeterState {
    /// Index into [`Config::meters`].
    index: usize,
    meter_no: String,
    unit: u8,
    plan: ReadPlan,
    /// `render_decimals()` of each reading, same order (derived from the scale by formatting it, so
    /// once, not per poll).
    decimals: Vec<Option<u32>>,
    online: bool,
    /// Failed reads in a row.
    failures: u32,
    /// While offline: failed retries since it went offline (drives [`retry_period`]).
    failed_retries: u32,
    /// While offline: the current retry period.
    retry_every: Duration,
    /// When an offline meter is tried next: it is read in the first round that starts at or after it.
    next_try: Instant,
    /// The exception last logged, so a repeating one is logged once.
    logged_exception: Option<ExceptionCode>,
    /// Answer times and late answers.
    observed: Observed,
}

struct BusTask {
    cfg: Arc<Config>,
    bus: usize,
    link: Link,
    meters: Vec<MeterState>,
    poll_interval: Duration,
    offline_after: u32,
    offline_retry: Duration,
    stats: Arc<BusStats>,
}

/// Poll the meters of `cfg.buses[bus]` until `shutdown`: one round every `poll_interval`, one [`Cycle`]
/// per round that read a meter, changed a meter's link, or ended with a meter offline (also when
/// the port cannot be opened: its meters go offline after `offline_after` rounds). Never returns before shutdown and never
/// panics; a closed `cycles` channel is logged once, then the task waits for shutdown.
pub async fn run_bus(
    cfg: Arc<Config>,
    bus: usize,
    cycles: mpsc::Sender<Cycle>,
    shutdown: CancellationToken,
    stats: Arc<BusStats>,
) {
    let Some(bus_cfg) = cfg.buses.get(bus).cloned() else {
        error!(message = "No such bus; this bus task does nothing.", bus_index = bus);
        shutdown.cancelled().await;
        return;
    };
    let span = info_span!("bus", bus = %bus_cfg.name);
    async move {
        let now = Instant::now();
        let meters = cfg
            .meters
            .iter()
            .enumerate()
            .filter(|(_, m)| m.bus == bus)
            .map(|(index, m)| MeterState {
                index,
                meter_no: m.meter_no.clone(),
                unit: m.unit,
                plan: plan_reads(m),
                decimals: m.readings.iter().map(|r| r.point.render_decimals()).collect(),
                online: true,
                failures: 0,
                failed_retries: 0,
                retry_every: bus_cfg.poll_interval,
                next_try: now,
                logged_exception: None,
                observed: Observed::new(&bus_cfg),
            })
            .collect::<Vec<_>>();
        // Figures start afresh with this run (a reload may have changed the meters or the timeout).
        *stats.meters.lock().unwrap_or_else(|e| e.into_inner()) =
            meters.iter().map(|m| (m.meter_no.clone(), m.observed.link)).collect();
        let mut task = BusTask {
            link: Link::new(&bus_cfg, Arc::clone(&stats)),
            bus,
            meters,
            poll_interval: bus_cfg.poll_interval,
            offline_after: bus_cfg.offline_after.max(1),
            offline_retry: bus_cfg.offline_retry,
            stats,
            cfg,
        };
        info!(message = "Bus task started.", endpoint = %bus_cfg.transport.endpoint(), meters = task.meters.len());
        loop {
            let start = Instant::now();
            let cycle = tokio::select! {
                c = task.round(start) => c,
                () = shutdown.cancelled() => break,
            };
            let took = start.elapsed();
            task.stats
                .last_round_micros
                .store(took.as_micros() as u64, Ordering::Relaxed);
            bump(&task.stats.rounds);
            // While a meter is offline every round is sent, even empty: the recorder's `for` timers of
            // link events run on the cycles of their bus.
            let any_offline = task.meters.iter().any(|m| !m.online);
            if !cycle.samples.is_empty() || !cycle.links.is_empty() || any_offline {
                let sent = tokio::select! {
                    r = cycles.send(cycle) => r.is_ok(),
                    () = shutdown.cancelled() => break,
                };
                if !sent {
                    error!(message = "The station stopped taking cycles; polling stops until shutdown.");
                    shutdown.cancelled().await;
                    break;
                }
            }
            // A round that overran its interval starts the next one at once, without a turn of the
            // timer wheel (module doc).
            let next = start + bus_cfg.poll_interval;
            if Instant::now() < next {
                tokio::select! {
                    () = sleep_until(next) => {}
                    () = shutdown.cancelled() => break,
                }
            } else if shutdown.is_cancelled() {
                break;
            }
        }
        info!(message = "Bus task stopped.");
    }
    .instrument(span)
    .await;
}

impl BusTask {
    /// One pass over the meters that are due; `start`: when the round started (offline meters are
    /// due by round, so a retry period of one round means the next round, however long this one takes).
    async fn round(&mut self, start: Instant) -> Cycle {
        let mut cycle = Cycle {
            bus: self.bus,
            ..Cycle::default()
        };
        self.link.probe().await;
        for k in 0..self.meters.len() {
            if self.link.came_up {
                // The bus was down and is back: do not wait out the backoff to find the meters again.
                self.link.came_up = false;
                for m in self.meters.iter_mut().filter(|m| !m.online) {
                    m.next_try = start;
                    m.failed_retries = 0;
                }
            }
            let m = &self.meters[k];
            if !m.online && start < m.next_try {
                continue;
            }
            self.link.seen = Seen::default();
            let result = self.read_meter(k).await;
            let seen = std::mem::take(&mut self.link.seen);
            self.settle(k, start, result, &mut cycle);
            let m = &mut self.meters[k];
            m.observed.add(&seen);
            m.observed.link.retry_every = (!m.online).then_some(m.retry_every);
            self.stats.publish(&m.meter_no, m.observed.link);
        }
        cycle
    }

    async fn read_meter(&mut self, k: usize) -> Result<Sample, Failure> {
        let m = &self.meters[k];
        let (unit, index, n) = (m.unit, m.index, m.plan.blocks.len());
        let mut data = Vec::with_capacity(n);
        // Blocks are `Copy`: index them instead of cloning the plan's list on every poll.
        for b in 0..n {
            let block = self.meters[k].plan.blocks[b];
            data.push(self.link.read(unit, block).await?);
        }
        let Some(meter) = self.cfg.meters.get(index) else {
            return Err(Failure::Decode("meter index outside the config".to_string()));
        };
        let m = &self.meters[k];
        let valve = raw_at(&meter.valve.point, m.plan.valve, &data)?;
        let valve_raw = point::as_state(valve).ok_or_else(|| Failure::Decode(format!("valve value {valve:?}")))?;
        let mut readings = Vec::with_capacity(meter.readings.len());
        for ((spec, slot), decimals) in meter.readings.iter().zip(&m.plan.readings).zip(&m.decimals) {
            readings.push(point::render_with(
                &spec.point,
                raw_at(&spec.point, *slot, &data)?,
                *decimals,
            ));
        }
        Ok(Sample {
            meter: index,
            valve_raw,
            readings,
            at: Utc::now(),
        })
    }

    /// Apply one read's result to the meter's state; log only state changes. `start`: the round's start.
    fn settle(&mut self, k: usize, start: Instant, result: Result<Sample, Failure>, cycle: &mut Cycle) {
        let (poll, offline_after, offline_retry) = (self.poll_interval, self.offline_after, self.offline_retry);
        let m = &mut self.meters[k];
        match result {
            Ok(sample) => {
                if !m.online {
                    m.online = true;
                    info!(message = "Meter back online.", meter = %m.meter_no, unit = m.unit);
                    cycle.links.push((m.index, true));
                }
                m.failures = 0;
                m.failed_retries = 0;
                m.logged_exception = None;
                cycle.samples.push(sample);
            }
            Err(failure) => {
                m.failures = m.failures.saturating_add(1);
                m.observed.link.last_failure = Some(LastFailure {
                    kind: failure.kind(),
                    exception: match &failure {
                        Failure::Exception(code) => Some(u8::from(*code)),
                        _ => None,
                    },
                    at: Instant::now(),
                });
                match &failure {
                    Failure::Exception(code) if m.logged_exception != Some(*code) => {
                        m.logged_exception = Some(*code);
                        warn!(
                            message = "Meter answers with an exception: check unit, table and address.",
                            meter = %m.meter_no,
                            unit = m.unit,
                            exception = ?code,
                        );
                    }
                    _ => {
                        debug!(message = "Meter read failed.", meter = %m.meter_no, unit = m.unit, kind = failure.kind(), error = %failure)
                    }
                }
                if m.online && m.failures >= offline_after {
                    m.online = false;
                    m.failed_retries = 0;
                    warn!(
                        message = "Meter offline; retrying every round at first, then less often.",
                        meter = %m.meter_no,
                        unit = m.unit,
                        failures = m.failures,
                        retry_at_most_every = %humantime::format_duration(offline_retry),
                        error = %failure,
                    );
                    cycle.links.push((m.index, false));
                } else if !m.online {
                    m.failed_retries = m.failed_retries.saturating_add(1);
                }
                if !m.online {
                    m.retry_every = retry_period(poll, offline_retry, offline_after, m.failed_retries);
                    m.next_try = start + m.retry_every;
                }
            }
        }
    }
}

/// The raw value of a point from the blocks read.
fn raw_at(spec: &PointSpec, slot: Slot, data: &[Data]) -> Result<Raw, Failure> {
    let off = usize::from(slot.offset);
    let missing = || Failure::Protocol(format!("point {} {} outside the block read", spec.table, spec.address));
    match data.get(slot.block).ok_or_else(missing)? {
        Data::Bits(bits) => bits.get(off).map(|&b| Raw::Int(i128::from(b))).ok_or_else(missing),
        Data::Words(words) => {
            let words = words.get(off..off + usize::from(spec.count())).ok_or_else(missing)?;
            point::decode_registers(spec, words).map_err(|e| Failure::Protocol(e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offline_meter_is_retried_every_round_at_first_then_doubling_up_to_offline_retry() {
        let poll = Duration::from_secs(1);
        let longest = Duration::from_secs(30);
        let periods: Vec<u64> = (0..10).map(|k| retry_period(poll, longest, 3, k).as_secs()).collect();
        assert_eq!(periods, [1, 1, 1, 2, 4, 8, 16, 30, 30, 30]);
        // No overflow however long it stays dead.
        assert_eq!(retry_period(poll, longest, 3, u32::MAX), longest);
        // offline_retry shorter than a round: every round.
        assert_eq!(retry_period(poll, Duration::from_millis(300), 3, 7), poll);
        // offline_after = 1: one retry at one round, then doubling.
        let periods: Vec<u64> = (0..4).map(|k| retry_period(poll, longest, 1, k).as_secs()).collect();
        assert_eq!(periods, [1, 2, 4, 8]);
    }

    /// Compiles only if the bus task can be `tokio::spawn`ed (the tokio-modbus context is not `Sync`, so
    /// no `&Link` may live across an await).
    #[allow(dead_code)]
    fn the_bus_task_is_send(cfg: Arc<Config>, tx: mpsc::Sender<Cycle>, stop: CancellationToken, st: Arc<BusStats>) {
        fn assert_send<T: Send>(_: T) {}
        assert_send(run_bus(cfg, 0, tx, stop, st));
    }
}

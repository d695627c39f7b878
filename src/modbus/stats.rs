//! The bus counters and what the bus task observed of each meter.
//!
//! Owns [`BusStats`] (one per bus, shared with the admin API, `/metrics`, the watchdog and tests) and,
//! per meter, [`MeterLink`]: answer times, timeouts, late answers, the retry period while offline, and
//! the hint ([`MeterLink::hint`]) to raise the bus `timeout`. Only the link and the bus task write here;
//! the watchdog reads `rounds` as the bus's progress, everyone else only displays. Counters only grow,
//! except the gauges `last_round_micros` and `up`. Never blocks a writer for long: atomics, and one
//! short lock per meter read.
//!
//! # Answer times and late answers
//!
//! The *answer time* of a request is the time from handing it to the connection (tokio-modbus writes it
//! at once) to having its whole answer decoded, on the monotonic clock. It includes the device's own
//! processing, both frames on the wire, a device server's or USB adapter's latency, and the gateway's
//! scheduling (a few ms on a busy gateway); it excludes opening the port and the frame gap. Every
//! answer counts, data or exception. A meter read of several blocks gives one answer time per block.
//!
//! A *late answer* is an answer that arrives after the timeout. On RTU (serial and over TCP) the link
//! keeps listening during the `guard` it stays silent anyway, so a late answer that comes within the
//! guard is seen, counted and timed, then discarded with the port. On Modbus TCP the connection is closed
//! at the timeout (that is what keeps a late answer from being taken for the next one), so a late TCP
//! answer is not seen: it is a timeout; `fieldgate probe` with a long `--timeout` measures such a meter.
//!
//! Per meter ([`MeterLink`], shown by `/meters` and `fieldgate status`): the last answer time, the
//! slowest of the last `ANSWER_WINDOW` answers, the counts of timeouts and late answers, the last late
//! answer's time, the kind of its last failed read ([`LastFailure`]), and a hint
//! ([`MeterLink::hint`]) to raise the bus `timeout` when answers come near it (the slowest recent one
//! at `NEAR_TIMEOUT_PERCENT` % of it or more) or past it (a late answer within the last `LATE_WINDOW`
//! requests). The figures start afresh with every start of the bus task (daemon start and each
//! reload), so a raised timeout clears the hint.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::config::BusConfig;

/// Counters of one bus, shared with the admin API and tests. Monotonic unless said otherwise.
#[derive(Debug, Default)]
pub struct BusStats {
    /// Requests sent.
    pub requests: AtomicU64,
    /// Requests answered with the expected data.
    pub(super) ok: AtomicU64,
    /// Requests answered with a Modbus exception.
    pub(super) exceptions: AtomicU64,
    /// Requests that got no answer within `timeout`.
    pub(super) timeouts: AtomicU64,
    /// Answers that did not fit the request: wrong length, function, unit or transaction, undecodable bytes.
    pub(super) protocol_errors: AtomicU64,
    /// Requests that failed in the transport (closed socket, device gone).
    pub(super) transport_errors: AtomicU64,
    /// Successful opens of the port or connection.
    pub(super) connects: AtomicU64,
    /// Successful opens after the first (each follows a poisoned context or a lost bus).
    pub(super) reconnects: AtomicU64,
    /// Failed opens of the port or connection.
    pub(super) connect_failures: AtomicU64,
    /// Rounds completed.
    pub rounds: AtomicU64,
    /// Duration of the last round, in microseconds (a gauge).
    pub(super) last_round_micros: AtomicU64,
    /// Whether the port or connection could be opened the last time it was tried (a gauge).
    pub(super) up: AtomicBool,
    /// Answer times, late answers and retry period of each meter of the bus, by `meter_no`; replaced
    /// when the bus task starts (daemon start, reload).
    pub(super) meters: Mutex<BTreeMap<String, MeterLink>>,
    /// Why the last open failed, in words (`None` once an open succeeds): health and `/buses` show it.
    open_error: Mutex<Option<String>>,
}

/// A plain copy of [`BusStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)] // Fields mirror BusStats one to one.
pub struct BusStatsSnapshot {
    pub(crate) requests: u64,
    pub(crate) ok: u64,
    pub exceptions: u64,
    pub timeouts: u64,
    pub protocol_errors: u64,
    pub transport_errors: u64,
    pub connects: u64,
    pub reconnects: u64,
    pub connect_failures: u64,
    pub rounds: u64,
    pub(crate) last_round_micros: u64,
    pub up: bool,
}

impl BusStats {
    /// The figures of one meter of this bus; `None` before the bus task has started with it.
    pub fn meter_link(&self, meter_no: &str) -> Option<MeterLink> {
        self.meters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(meter_no)
            .copied()
    }

    pub(super) fn publish(&self, meter_no: &str, link: MeterLink) {
        let mut meters = self.meters.lock().unwrap_or_else(|e| e.into_inner());
        match meters.get_mut(meter_no) {
            Some(m) => *m = link,
            None => {
                meters.insert(meter_no.to_string(), link);
            }
        }
    }

    /// Why the port or connection could not be opened the last time it was tried; `None` while it is up
    /// (or before the first try).
    pub(crate) fn open_error(&self) -> Option<String> {
        self.open_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Set on a failed open (written only when it changes: a bus down retries with backoff).
    pub(super) fn set_open_error(&self, error: Option<&str>) {
        let mut slot = self.open_error.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_deref() != error {
            *slot = error.map(str::to_string);
        }
    }

    /// A consistent-enough copy for display and tests.
    pub fn snapshot(&self) -> BusStatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BusStatsSnapshot {
            requests: g(&self.requests),
            ok: g(&self.ok),
            exceptions: g(&self.exceptions),
            timeouts: g(&self.timeouts),
            protocol_errors: g(&self.protocol_errors),
            transport_errors: g(&self.transport_errors),
            connects: g(&self.connects),
            reconnects: g(&self.reconnects),
            connect_failures: g(&self.connect_failures),
            rounds: g(&self.rounds),
            last_round_micros: g(&self.last_round_micros),
            up: self.up.load(Ordering::Relaxed),
        }
    }
}

pub(super) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Answers over which [`MeterLink::answer_max`] is taken.
const ANSWER_WINDOW: usize = 20;

/// Requests to a meter after a late answer during which [`MeterLink::late_recent`] stays set.
const LATE_WINDOW: u32 = 100;

/// An answer this close to the timeout (in percent of it) or slower makes [`MeterLink::hint`] ask for a
/// longer timeout: a little more delay on the line and it would be a timeout.
const NEAR_TIMEOUT_PERCENT: u32 = 80;

/// What the bus task observed of one meter (see the module doc for what each time means). All times
/// come from the monotonic clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeterLink {
    /// The answer time of the meter's last answered request.
    pub answer_last: Option<Duration>,
    /// The slowest answer time of its last `ANSWER_WINDOW` answered requests.
    pub answer_max: Option<Duration>,
    /// Requests answered within the timeout (data or exception).
    answers: u64,
    /// Requests not answered within the timeout.
    pub timeouts: u64,
    /// Of those, answers seen after the timeout (RTU only, during the guard).
    pub late_answers: u64,
    /// When the last late answer came, counted from its request.
    pub late_last: Option<Duration>,
    /// A late answer came within the last [`LATE_WINDOW`] requests to the meter.
    late_recent: bool,
    /// The bus `timeout`.
    pub timeout: Duration,
    /// The bus `guard` (RTU; zero on TCP).
    guard: Duration,
    /// Whether this bus can see late answers at all (RTU: during the guard; TCP: no).
    pub sees_late: bool,
    /// While the meter is offline: its current retry period. `None` while online.
    pub retry_every: Option<Duration>,
    /// The meter's last failed read (kept after it answers again; its time tells how long ago).
    pub last_failure: Option<LastFailure>,
}

/// A meter's last failed read: what kind of failure (a bounded name: `timeout`, `exception`,
/// `protocol`, `transport`, `bus_down`, `decode`; the details are in the log) and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastFailure {
    /// The kind.
    pub kind: &'static str,
    /// The exception code, for `exception`.
    pub exception: Option<u8>,
    /// When, on the monotonic clock.
    pub at: tokio::time::Instant,
}

impl MeterLink {
    /// Advice when answers come near or after the timeout: raise it, to a value with room above the
    /// slowest answer seen (1.5 × it, rounded up to 50 ms). `None` when answers are comfortably fast.
    pub fn hint(&self) -> Option<String> {
        let ms = |d: Duration| d.as_millis();
        let suggest = |slowest: Duration| {
            let want = slowest.as_millis() * 3 / 2;
            want.div_ceil(50).max(1) * 50
        };
        let guard_too = if self.sees_late {
            " (on RTU also `guard`, if it is set: a late answer must end within it)"
        } else {
            ""
        };
        if let (true, Some(late)) = (self.late_recent, self.late_last) {
            return Some(format!(
                "answers arrive after the {} ms timeout (the last late one after {} ms): raise the bus `timeout` to {} ms or more{guard_too}",
                ms(self.timeout),
                ms(late),
                suggest(late.max(self.answer_max.unwrap_or_default())),
            ));
        }
        let slowest = self.answer_max?;
        let near = self.timeout.as_micros() * u128::from(NEAR_TIMEOUT_PERCENT) / 100;
        (slowest.as_micros() >= near && !self.timeout.is_zero()).then(|| {
            format!(
                "answers take up to {} ms of the {} ms timeout: raise the bus `timeout` to {} ms or more{guard_too}",
                ms(slowest),
                ms(self.timeout),
                suggest(slowest),
            )
        })
    }
}

/// What one meter read observed of the line, collected by the link for the bus task.
#[derive(Debug, Default)]
pub(super) struct Seen {
    /// Answer time of each request answered within the timeout, in order.
    pub(super) answers: Vec<Duration>,
    pub(super) timeouts: u32,
    /// The time of a late answer seen during the guard.
    pub(super) late: Option<Duration>,
}

/// A meter's figures and the window they are computed over.
#[derive(Debug, Default)]
pub(super) struct Observed {
    /// The last [`ANSWER_WINDOW`] answer times, oldest first.
    recent: VecDeque<Duration>,
    /// Requests since the last late answer (`None`: none seen).
    since_late: Option<u32>,
    pub(super) link: MeterLink,
}

impl Observed {
    pub(super) fn new(bus: &BusConfig) -> Observed {
        let sees_late = bus.transport.is_rtu() && !bus.guard.is_zero();
        Observed {
            link: MeterLink {
                timeout: bus.timeout,
                guard: if bus.transport.is_rtu() {
                    bus.guard
                } else {
                    Duration::ZERO
                },
                sees_late,
                ..MeterLink::default()
            },
            ..Observed::default()
        }
    }

    pub(super) fn add(&mut self, seen: &Seen) {
        let requests = seen.answers.len() as u32 + seen.timeouts;
        for &t in &seen.answers {
            if self.recent.len() == ANSWER_WINDOW {
                self.recent.pop_front();
            }
            self.recent.push_back(t);
            self.link.answer_last = Some(t);
        }
        self.link.answers += seen.answers.len() as u64;
        self.link.timeouts += u64::from(seen.timeouts);
        self.link.answer_max = self.recent.iter().max().copied();
        self.since_late = self.since_late.map(|n| n.saturating_add(requests));
        if let Some(late) = seen.late {
            self.link.late_answers += 1;
            self.link.late_last = Some(late);
            self.since_late = Some(0);
        }
        self.link.late_recent = self.since_late.is_some_and(|n| n < LATE_WINDOW);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(timeout_ms: u64) -> MeterLink {
        MeterLink {
            timeout: Duration::from_millis(timeout_ms),
            ..MeterLink::default()
        }
    }

    #[test]
    fn fast_answers_need_no_hint_and_answers_near_or_after_the_timeout_do() {
        let ms = Duration::from_millis;
        let mut o = Observed {
            link: link(300),
            ..Observed::default()
        };
        o.add(&Seen {
            answers: vec![ms(12), ms(40)],
            ..Seen::default()
        });
        assert_eq!((o.link.answer_last, o.link.answer_max), (Some(ms(40)), Some(ms(40))));
        assert_eq!(o.link.hint(), None);
        // 250 ms of a 300 ms timeout: near it (80 % or more). 1.5 × 250 = 375 → 400 ms.
        o.add(&Seen {
            answers: vec![ms(250)],
            ..Seen::default()
        });
        let hint = o.link.hint().expect("near the timeout");
        assert!(
            hint.contains("up to 250 ms of the 300 ms timeout") && hint.contains("400 ms or more"),
            "{hint}"
        );
        // The slow answer ages out of the window.
        for _ in 0..ANSWER_WINDOW {
            o.add(&Seen {
                answers: vec![ms(5)],
                ..Seen::default()
            });
        }
        assert_eq!(o.link.answer_max, Some(ms(5)));
        assert_eq!(o.link.hint(), None);
        // A late answer: after the timeout, seen during the guard.
        o.add(&Seen {
            timeouts: 1,
            late: Some(ms(420)),
            ..Seen::default()
        });
        assert_eq!(
            (o.link.timeouts, o.link.late_answers, o.link.late_last),
            (1, 1, Some(ms(420)))
        );
        let hint = o.link.hint().expect("after the timeout");
        assert!(
            hint.contains("after the 300 ms timeout") && hint.contains("650 ms or more"),
            "{hint}"
        );
        // It stays for LATE_WINDOW requests, then goes.
        for i in 0..LATE_WINDOW {
            assert!(o.link.late_recent, "request {i}");
            o.add(&Seen {
                answers: vec![ms(5)],
                ..Seen::default()
            });
        }
        assert!(!o.link.late_recent);
        assert_eq!(o.link.hint(), None);
        assert_eq!(o.link.late_answers, 1, "the count stays");
    }
}

//! The field side: one task per `[[bus]]` ([`run_bus`]) that polls its meters over Modbus TCP, RTU on a
//! serial device, or RTU over TCP, and sends one [`Cycle`] per round to the station.
//!
//! Owns: the read plan of every meter ([`plan_reads`]: points merged into as few requests as the tables
//! allow), the connection to the bus and its recovery, the online/offline state of each meter, and the
//! bus counters ([`BusStats`]).
//!
//! Invariants, because a silently wrong register value makes false or missed work orders
//! (`shared/notes/tokio-modbus.md` is the evidence for each):
//! - One request at a time, each (and each connect) under `tokio::time::timeout(bus.timeout)`.
//! - Every answer is checked against its request: function, and exact item count. The typed tokio-modbus
//!   helpers are not used, because their `debug_assert!`s panic on a short answer in debug builds.
//! - After a timeout, a transport error, a header or length mismatch, or an undecodable answer, the
//!   context is *poisoned* (a late answer would become the next request's answer) and is dropped:
//!   TCP reconnects on next use; RTU (serial and over TCP) first stays silent for `guard`, then reopens
//!   (serial: and discards the kernel input buffer). An exception answer keeps the context.
//! - RTU waits `frame_gap` after every answer (tokio-modbus does not keep the 3.5-character gap).
//! - A meter's sample is sent only when every block of it was read in the same pass.
//! - Opening, clearing and closing a serial port are blocking system calls (open, ioctl, termios; a USB
//!   adapter's driver talks to the adapter in them, and a tty close may wait for output to drain): they
//!   run in `spawn_blocking`, never on an async worker. TCP connects are asynchronous already.
//!
//! # Offline meters: retries with backoff
//!
//! A meter that fails `offline_after` reads in a row is reported offline (one link change to the
//! station). It is not given up on: a meter that fails a quarter of its reads at random fails three in a
//! row now and then, and a transition it shows meanwhile must not be missed. Its retry period (see
//! [`retry_period`]) is one poll round for its first `offline_after` retries, then doubles with every
//! failed retry (2, 4, 8 … rounds) up to `offline_retry`; any answer resets it. Retries are due by
//! round: a period of one round means "in the next round". So a dead meter costs one failed request
//! (timeout, plus `guard` on RTU) per round for a few rounds, then at most one per `offline_retry`.
//! Every duration here is measured on the monotonic clock (`tokio::time::Instant`); the wall clock only
//! labels samples.
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
//! slowest of the last [`ANSWER_WINDOW`] answers, the counts of timeouts and late answers, the last late
//! answer's time, and a hint ([`MeterLink::hint`]) to raise the bus `timeout` when answers come near
//! it (the slowest recent one at [`NEAR_TIMEOUT_PERCENT`] % of it or more) or past it (a late answer
//! within the last [`LATE_WINDOW`] requests). The figures start afresh with every start of the bus task
//! (daemon start and each reload), so a raised timeout clears the hint.
//!
//! Never: panics on anything a device sends, exits before shutdown, logs once per poll (state changes
//! only), or slows the online meters down for an offline one more than one try per `offline_retry`
//! once its backoff has grown.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::mpsc;
use tokio::time::{sleep, sleep_until, timeout, Instant, Sleep};
use tokio_modbus::client::{rtu, tcp, Client as _, Context};
use tokio_modbus::prelude::{ExceptionCode, Request, Response, Slave, SlaveContext as _};
use tokio_serial::SerialPort as _;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument as _};

use crate::backoff::Backoff;
use crate::config::point::{PointSpec, Table};
use crate::config::{BusConfig, Config, MeterConfig, Parity, Transport};
use crate::modbus::cycle::{Cycle, Sample};
use crate::modbus::point::{self, Raw};

// === read planning ===

/// One read request: `count` items of `table` from `address`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// The table read.
    pub table: Table,
    /// First address.
    pub address: u16,
    /// Items (bits or registers); at most [`Table::max_count`].
    pub count: u16,
}

impl Block {
    fn end(&self) -> u32 {
        u32::from(self.address) + u32::from(self.count)
    }
}

/// Where a point's items sit in the planned blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Index into [`ReadPlan::blocks`].
    pub block: usize,
    /// Offset of the point's first item inside that block.
    pub offset: u16,
}

/// The requests that read one meter, and where each of its points is found in the answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadPlan {
    /// Requests, ordered by table then address.
    pub blocks: Vec<Block>,
    /// The valve.
    pub valve: Slot,
    /// One per [`MeterConfig::readings`], same order.
    pub readings: Vec<Slot>,
}

/// Plan the reads of a meter: its points (valve and readings) grouped by table, and points whose address
/// ranges touch or overlap merged into one request, as long as the request stays within
/// [`Table::max_count`]. Points that do not touch are never bridged (a gap may hold addresses the device
/// refuses).
pub fn plan_reads(meter: &MeterConfig) -> ReadPlan {
    let points: Vec<&PointSpec> = std::iter::once(&meter.valve.point)
        .chain(meter.readings.iter().map(|r| &r.point))
        .collect();
    let (blocks, mut slots) = plan_points(&points);
    let valve = slots.remove(0);
    ReadPlan {
        blocks,
        valve,
        readings: slots,
    }
}

/// The planner proper: one slot per point, same order as `points` (non-empty).
fn plan_points(points: &[&PointSpec]) -> (Vec<Block>, Vec<Slot>) {
    let mut order: Vec<(usize, &PointSpec)> = points.iter().copied().enumerate().collect();
    order.sort_by_key(|(_, p)| (p.table, p.address, std::cmp::Reverse(p.count())));
    let mut blocks: Vec<Block> = Vec::new();
    let mut slots = vec![Slot { block: 0, offset: 0 }; points.len()];
    for (i, p) in order {
        let start = u32::from(p.address);
        let end = start + u32::from(p.count());
        let limit = u32::from(p.table.max_count());
        match blocks.last_mut() {
            // Sorted by address, so `start >= b.address`; merge when touching or overlapping.
            Some(b) if b.table == p.table && start <= b.end() && end.max(b.end()) - u32::from(b.address) <= limit => {
                // Fits in u16: bounded by `limit` (at most 2000).
                b.count = (end.max(b.end()) - u32::from(b.address)) as u16;
            }
            _ => blocks.push(Block {
                table: p.table,
                address: p.address,
                count: p.count(),
            }),
        }
        let block = blocks.len() - 1;
        slots[i] = Slot {
            block,
            offset: p.address - blocks[block].address,
        };
    }
    (blocks, slots)
}

// === counters ===

/// Counters of one bus, shared with the admin API and tests. Monotonic unless said otherwise.
#[derive(Debug, Default)]
pub struct BusStats {
    /// Requests sent.
    pub requests: AtomicU64,
    /// Requests answered with the expected data.
    pub ok: AtomicU64,
    /// Requests answered with a Modbus exception.
    pub exceptions: AtomicU64,
    /// Requests that got no answer within `timeout`.
    pub timeouts: AtomicU64,
    /// Answers that did not fit the request: wrong length, function, unit or transaction, undecodable bytes.
    pub protocol_errors: AtomicU64,
    /// Requests that failed in the transport (closed socket, device gone).
    pub transport_errors: AtomicU64,
    /// Successful opens of the port or connection.
    pub connects: AtomicU64,
    /// Successful opens after the first (each follows a poisoned context or a lost bus).
    pub reconnects: AtomicU64,
    /// Failed opens of the port or connection.
    pub connect_failures: AtomicU64,
    /// Rounds completed.
    pub rounds: AtomicU64,
    /// Duration of the last round, in microseconds (a gauge).
    pub last_round_micros: AtomicU64,
    /// Whether the port or connection could be opened the last time it was tried (a gauge).
    pub up: AtomicBool,
    /// Answer times, late answers and retry period of each meter of the bus, by `meter_no`; replaced
    /// when the bus task starts (daemon start, reload).
    pub meters: Mutex<BTreeMap<String, MeterLink>>,
}

/// A plain copy of [`BusStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)] // Fields mirror BusStats one to one.
pub struct BusStatsSnapshot {
    pub requests: u64,
    pub ok: u64,
    pub exceptions: u64,
    pub timeouts: u64,
    pub protocol_errors: u64,
    pub transport_errors: u64,
    pub connects: u64,
    pub reconnects: u64,
    pub connect_failures: u64,
    pub rounds: u64,
    pub last_round_micros: u64,
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

    fn publish(&self, meter_no: &str, link: MeterLink) {
        let mut meters = self.meters.lock().unwrap_or_else(|e| e.into_inner());
        match meters.get_mut(meter_no) {
            Some(m) => *m = link,
            None => {
                meters.insert(meter_no.to_string(), link);
            }
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

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

// === per meter: answer times, late answers, retry period ===

/// Answers over which [`MeterLink::answer_max`] is taken.
pub const ANSWER_WINDOW: usize = 20;

/// Requests to a meter after a late answer during which [`MeterLink::late_recent`] stays set.
pub const LATE_WINDOW: u32 = 100;

/// An answer this close to the timeout (in percent of it) or slower makes [`MeterLink::hint`] ask for a
/// longer timeout: a little more delay on the line and it would be a timeout.
pub const NEAR_TIMEOUT_PERCENT: u32 = 80;

/// What the bus task observed of one meter (see the module doc for what each time means). All times
/// come from the monotonic clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeterLink {
    /// The answer time of the meter's last answered request.
    pub answer_last: Option<Duration>,
    /// The slowest answer time of its last [`ANSWER_WINDOW`] answered requests.
    pub answer_max: Option<Duration>,
    /// Requests answered within the timeout (data or exception).
    pub answers: u64,
    /// Requests not answered within the timeout.
    pub timeouts: u64,
    /// Of those, answers seen after the timeout (RTU only, during the guard).
    pub late_answers: u64,
    /// When the last late answer came, counted from its request.
    pub late_last: Option<Duration>,
    /// A late answer came within the last [`LATE_WINDOW`] requests to the meter.
    pub late_recent: bool,
    /// The bus `timeout`.
    pub timeout: Duration,
    /// The bus `guard` (RTU; zero on TCP).
    pub guard: Duration,
    /// Whether this bus can see late answers at all (RTU: during the guard; TCP: no).
    pub sees_late: bool,
    /// While the meter is offline: its current retry period. `None` while online.
    pub retry_every: Option<Duration>,
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

/// The retry period of an offline meter after `failed` failed retries (0: it has just gone offline):
/// one round (`poll`) for the first `one_round` retries, then doubling (2, 4, 8 … rounds) up to
/// `longest` (`offline_retry`). Never zero (a zero `poll` counts as 1 ms), never above `longest`
/// unless `longest` is shorter than a round (then every round).
pub fn retry_period(poll: Duration, longest: Duration, one_round: u32, failed: u32) -> Duration {
    let round = poll.max(Duration::from_millis(1));
    // Failed retries 0..one_round: one round; then one doubling per failed retry.
    let doublings = failed.saturating_add(1).saturating_sub(one_round).min(31);
    round.saturating_mul(1 << doublings).min(longest).max(round)
}

/// What one meter read observed of the line, collected by the link for the bus task.
#[derive(Debug, Default)]
struct Seen {
    /// Answer time of each request answered within the timeout, in order.
    answers: Vec<Duration>,
    timeouts: u32,
    /// The time of a late answer seen during the guard.
    late: Option<Duration>,
}

/// A meter's figures and the window they are computed over.
#[derive(Debug, Default)]
struct Observed {
    /// The last [`ANSWER_WINDOW`] answer times, oldest first.
    recent: VecDeque<Duration>,
    /// Requests since the last late answer (`None`: none seen).
    since_late: Option<u32>,
    link: MeterLink,
}

impl Observed {
    fn new(bus: &BusConfig) -> Observed {
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

    fn add(&mut self, seen: &Seen) {
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

// === failures ===

/// Why a meter read failed. Only [`Failure::Exception`] and [`Failure::Decode`] leave the context in use.
#[derive(Debug, Clone, PartialEq)]
enum Failure {
    /// The device answered with a Modbus exception (context still in sync).
    Exception(ExceptionCode),
    /// No answer within the timeout.
    Timeout,
    /// An answer that does not fit the request.
    Protocol(String),
    /// The transport failed.
    Transport(String),
    /// The port or connection cannot be opened (waiting for the next try).
    BusDown(String),
    /// The answer fitted, but a value cannot be a valve state (e.g. a fractional float).
    Decode(String),
}

impl Failure {
    /// A bounded name for logs.
    fn kind(&self) -> &'static str {
        match self {
            Failure::Exception(_) => "exception",
            Failure::Timeout => "timeout",
            Failure::Protocol(_) => "protocol",
            Failure::Transport(_) => "transport",
            Failure::BusDown(_) => "bus_down",
            Failure::Decode(_) => "decode",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Exception(code) => write!(f, "the device answered with exception {code:?}"),
            Failure::Timeout => f.write_str("no answer within the timeout"),
            Failure::Protocol(why) => write!(f, "bad answer: {why}"),
            Failure::Transport(why) => write!(f, "transport error: {why}"),
            Failure::BusDown(why) => write!(f, "bus not connected: {why}"),
            Failure::Decode(why) => write!(f, "value not usable: {why}"),
        }
    }
}

/// Why an open failed: a bounded kind (a change of kind is a state change worth a log line) and words.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OpenError {
    kind: &'static str,
    message: String,
}

// === the link: one port or connection, with recovery ===

/// What a Modbus call returned, before the checks.
type CallResult = Result<Result<Response, ExceptionCode>, tokio_modbus::Error>;

/// What one block read returned.
enum Data {
    Bits(Vec<bool>),
    Words(Vec<u16>),
}

/// The connection to a bus. `ctx` is `None` when closed or poisoned; it is reopened on next use.
struct Link {
    name: String,
    transport: Transport,
    timeout: Duration,
    frame_gap: Duration,
    guard: Duration,
    ctx: Option<Context>,
    /// The timer of the requests' timeouts, one per link: see [`Link::call`].
    timer: Option<Pin<Box<Sleep>>>,
    /// No open is tried before this instant (after a failed open).
    retry_at: Option<Instant>,
    backoff: Backoff,
    /// `None` before the first open; logs go out when this or the failure kind changes.
    up: Option<bool>,
    down_kind: Option<&'static str>,
    /// Set when an open succeeds after failed ones; the bus task then retries offline meters at once.
    came_up: bool,
    stats: Arc<BusStats>,
    /// What the requests of the current meter read observed; the bus task takes it after each read.
    seen: Seen,
    /// After a timeout on RTU: the end of the guard, counted from the timeout (the link listened for a
    /// late answer until then, or until one came).
    quiet_until: Option<Instant>,
}

/// How a call ended.
enum Called {
    /// Something came back within the timeout, after this long.
    Done(CallResult, Duration),
    /// Nothing within the timeout; `late`: an answer that came during the guard, after this long
    /// (counted from the request).
    TimedOut { late: Option<Duration> },
}

impl Link {
    fn new(bus: &BusConfig, stats: Arc<BusStats>) -> Link {
        Link::with(&bus.name, &bus.transport, bus.timeout, bus.frame_gap, bus.guard, stats)
    }

    /// A link with explicit timings (`frame_gap` and `guard` apply to RTU only).
    fn with(
        name: &str,
        transport: &Transport,
        timeout: Duration,
        frame_gap: Duration,
        guard: Duration,
        stats: Arc<BusStats>,
    ) -> Link {
        let rtu = transport.is_rtu();
        Link {
            name: name.to_string(),
            transport: transport.clone(),
            timeout,
            frame_gap: if rtu { frame_gap } else { Duration::ZERO },
            guard: if rtu { guard } else { Duration::ZERO },
            ctx: None,
            timer: None,
            retry_at: None,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
            up: None,
            down_kind: None,
            came_up: false,
            stats,
            seen: Seen::default(),
            quiet_until: None,
        }
    }

    /// The open context, opening it if needed and allowed by the backoff.
    async fn context(&mut self) -> Result<Context, Failure> {
        if let Some(ctx) = self.ctx.take() {
            return Ok(ctx);
        }
        if let Some(at) = self.retry_at {
            if Instant::now() < at {
                return Err(Failure::BusDown(self.down_kind.unwrap_or("closed").to_string()));
            }
        }
        match open(&self.transport, self.timeout).await {
            Ok(ctx) => {
                let n = self.stats.connects.fetch_add(1, Ordering::Relaxed);
                if n > 0 {
                    bump(&self.stats.reconnects);
                }
                self.stats.up.store(true, Ordering::Relaxed);
                self.retry_at = None;
                self.backoff.reset();
                if self.up != Some(true) {
                    info!(message = "Bus connected.", bus = %self.name, endpoint = %self.transport.endpoint());
                }
                if self.up == Some(false) {
                    self.came_up = true;
                }
                self.up = Some(true);
                self.down_kind = None;
                Ok(ctx)
            }
            Err(e) => {
                bump(&self.stats.connect_failures);
                self.stats.up.store(false, Ordering::Relaxed);
                let delay = self.backoff.next_delay();
                self.retry_at = Some(Instant::now() + delay);
                if self.up != Some(false) || self.down_kind != Some(e.kind) {
                    warn!(
                        message = "Bus cannot be opened; retrying with backoff.",
                        bus = %self.name,
                        endpoint = %self.transport.endpoint(),
                        reason = e.kind,
                        error = %e.message,
                    );
                }
                self.up = Some(false);
                self.down_kind = Some(e.kind);
                Err(Failure::BusDown(e.message))
            }
        }
    }

    /// Try to open a bus that is down when its backoff allows, so a bus whose meters are all offline
    /// notices a replugged adapter without waiting for `offline_retry`.
    async fn probe(&mut self) {
        let due = self.retry_at.is_some_and(|at| Instant::now() >= at);
        if self.ctx.is_none() && self.up == Some(false) && due {
            if let Ok(ctx) = self.context().await {
                self.ctx = Some(ctx);
            }
        }
    }

    /// Drop a poisoned context; on RTU stay silent for `guard` first (counted from the timeout when
    /// [`Link::call`] already listened through part of it), so a late frame has arrived (and is
    /// discarded on reopen) before the next request goes out.
    async fn poison(&mut self, ctx: Context) {
        self.ctx = None;
        let quiet_until = self.quiet_until.take();
        if !self.guard.is_zero() {
            sleep_until(quiet_until.unwrap_or_else(|| Instant::now() + self.guard)).await;
        }
        close(ctx, &self.transport).await;
    }

    /// `ctx.call(request)`, given up after the link's `timeout`.
    ///
    /// Same result as `tokio::time::timeout`, but one timer serves every request of the link and is
    /// moved only when it fires: a request's deadline is always later than the timer's (deadlines
    /// only grow), so the timer firing early is the only case, and it is then moved to this request's
    /// deadline. A timer registered per request cost ~3 % of the poll rate (BENCHMARKS.md row 1).
    ///
    /// On RTU the call is not dropped at the timeout: the link stays silent for `guard` anyway, and
    /// listens meanwhile, so a late answer is seen and timed ([`Called::TimedOut`]); the guard still
    /// ends `guard` after the timeout ([`Link::poison`] waits for the rest of it).
    async fn call(&mut self, ctx: &mut Context, request: Request<'static>) -> Called {
        let sent = Instant::now();
        let deadline = sent + self.timeout;
        let listen_until = deadline + self.guard;
        let timer = self.timer.get_or_insert_with(|| Box::pin(sleep_until(deadline)));
        let mut call = ctx.call(request);
        let mut timed_out = false;
        loop {
            tokio::select! {
                biased;
                r = &mut call => {
                    let took = sent.elapsed();
                    if !timed_out {
                        return Called::Done(r, took);
                    }
                    // An exception is an answer too; an undecodable or mismatched frame is not.
                    return Called::TimedOut { late: r.is_ok().then_some(took) };
                }
                () = timer.as_mut() => {
                    let now = Instant::now();
                    if now < deadline {
                        timer.as_mut().reset(deadline);
                    } else if now < listen_until {
                        // Timed out; on RTU listen through the guard.
                        timed_out = true;
                        self.quiet_until = Some(listen_until);
                        timer.as_mut().reset(listen_until);
                    } else {
                        return Called::TimedOut { late: None };
                    }
                }
            }
        }
    }

    /// Read one block from `unit`: Ok only with exactly the items asked for.
    async fn read(&mut self, unit: u8, block: Block) -> Result<Data, Failure> {
        let mut ctx = self.context().await?;
        ctx.set_slave(Slave(unit));
        let (a, n) = (block.address, block.count);
        let request = match block.table {
            Table::Coil => Request::ReadCoils(a, n),
            Table::Discrete => Request::ReadDiscreteInputs(a, n),
            Table::Holding => Request::ReadHoldingRegisters(a, n),
            Table::Input => Request::ReadInputRegisters(a, n),
        };
        bump(&self.stats.requests);
        self.quiet_until = None;
        let result = match self.call(&mut ctx, request).await {
            Called::Done(result, took) => {
                if result.is_ok() {
                    self.seen.answers.push(took);
                }
                Ok(result)
            }
            Called::TimedOut { late } => {
                self.seen.timeouts += 1;
                if late.is_some() {
                    self.seen.late = late;
                }
                Err(())
            }
        };
        let failure = match result {
            Ok(Ok(Ok(response))) => match check(block, response) {
                Ok(data) => {
                    bump(&self.stats.ok);
                    self.ctx = Some(ctx);
                    pause(self.frame_gap).await;
                    return Ok(data);
                }
                Err(why) => {
                    bump(&self.stats.protocol_errors);
                    Failure::Protocol(why)
                }
            },
            Ok(Ok(Err(code))) => {
                // The device answered: the context is in sync and stays.
                bump(&self.stats.exceptions);
                self.ctx = Some(ctx);
                pause(self.frame_gap).await;
                return Err(Failure::Exception(code));
            }
            Ok(Err(tokio_modbus::Error::Protocol(e))) => {
                bump(&self.stats.protocol_errors);
                Failure::Protocol(e.to_string())
            }
            // For the counters only: the codec reports undecodable bytes as these kinds. Recovery does
            // not depend on the kind (notes §0 rule 9): every outer error poisons.
            Ok(Err(tokio_modbus::Error::Transport(e)))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
                ) =>
            {
                bump(&self.stats.protocol_errors);
                Failure::Protocol(format!("undecodable answer: {e}"))
            }
            Ok(Err(tokio_modbus::Error::Transport(e))) => {
                bump(&self.stats.transport_errors);
                Failure::Transport(e.to_string())
            }
            Err(()) => {
                bump(&self.stats.timeouts);
                Failure::Timeout
            }
        };
        self.poison(ctx).await;
        Err(failure)
    }
}

/// Sleep unless zero. (A free function: a `&Link` held across an await would make the task `!Send`.)
async fn pause(d: Duration) {
    if !d.is_zero() {
        sleep(d).await;
    }
}

/// Open the bus's port or connection (a connect is bounded by `limit`).
///
/// A free function, so no `&Link` (which holds a non-`Sync` context) lives across its awaits.
async fn open(transport: &Transport, limit: Duration) -> Result<Context, OpenError> {
    match transport {
        Transport::Tcp(addr) => {
            let stream = connect_tcp(addr, limit).await?;
            Ok(tcp::attach_slave(stream, Slave(1)))
        }
        Transport::RtuOverTcp(addr) => {
            let stream = connect_tcp(addr, limit).await?;
            Ok(rtu::attach_slave(stream, Slave(1)))
        }
        Transport::Serial {
            path,
            baud,
            parity,
            data_bits,
            stop_bits,
        } => {
            let builder = tokio_serial::new(path.as_str(), *baud)
                .parity(match parity {
                    Parity::None => tokio_serial::Parity::None,
                    Parity::Even => tokio_serial::Parity::Even,
                    Parity::Odd => tokio_serial::Parity::Odd,
                })
                .data_bits(if *data_bits == 7 {
                    tokio_serial::DataBits::Seven
                } else {
                    tokio_serial::DataBits::Eight
                })
                .stop_bits(if *stop_bits == 2 {
                    tokio_serial::StopBits::Two
                } else {
                    tokio_serial::StopBits::One
                });
            let owned = path.clone();
            // Blocking system calls: off the async workers (module doc). The blocking pool has the
            // runtime's context, so the stream registers with its reactor there.
            let port = tokio::task::spawn_blocking(move || open_serial(&builder, &owned))
                .await
                .map_err(|e| OpenError {
                    kind: "serial",
                    message: format!("opening {path} failed: {e}"),
                })??;
            Ok(rtu::attach_slave(port, Slave(1)))
        }
    }
}

/// Open a serial port and discard its input buffer. Blocking: call it in `spawn_blocking`.
fn open_serial(builder: &tokio_serial::SerialPortBuilder, path: &str) -> Result<tokio_serial::SerialStream, OpenError> {
    let port = tokio_serial::SerialStream::open(builder).map_err(|e| serial_open_error(path, &e))?;
    // Stale bytes survive close and reopen (notes §4.3): discard them before the first request.
    port.clear(tokio_serial::ClearBuffer::Input).map_err(|e| OpenError {
        kind: "clear",
        message: format!("cannot discard the input buffer of {path}: {e}"),
    })?;
    Ok(port)
}

/// Close a context. Closing a serial port is a blocking system call (a tty may wait for its output to
/// drain), so it runs in `spawn_blocking`, awaited: the port's exclusive lock is gone before any reopen.
async fn close(ctx: Context, transport: &Transport) {
    if matches!(transport, Transport::Serial { .. }) {
        let _ = tokio::task::spawn_blocking(move || drop(ctx)).await;
    } else {
        drop(ctx);
    }
}

/// Connect a TCP stream (host names resolved) within `limit`.
async fn connect_tcp(addr: &str, limit: Duration) -> Result<tokio::net::TcpStream, OpenError> {
    match timeout(limit, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            // Requests are single small writes; never let Nagle hold one back.
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(OpenError {
            kind: match e.kind() {
                std::io::ErrorKind::ConnectionRefused => "refused",
                _ => "connect",
            },
            message: format!("cannot connect to {addr}: {e}"),
        }),
        Err(_) => Err(OpenError {
            kind: "connect_timeout",
            message: format!("no connection to {addr} within {}", humantime::format_duration(limit)),
        }),
    }
}

/// A serial open error in words an installer can act on.
fn serial_open_error(path: &str, e: &tokio_serial::Error) -> OpenError {
    use std::io::ErrorKind as Io;
    use tokio_serial::ErrorKind as K;
    match e.kind {
        K::Io(Io::NotFound) => OpenError {
            kind: "missing",
            message: format!(
                "serial device {path} does not exist: is the USB adapter plugged in? \
                 Configure a stable name from /dev/serial/by-id/ (ls -l /dev/serial/by-id/)"
            ),
        },
        K::Io(Io::PermissionDenied) => OpenError {
            kind: "permission",
            message: format!(
                "permission denied on {path}: add the fieldgate user to the dialout group \
                 (usermod -aG dialout fieldgate) and restart the service"
            ),
        },
        K::NoDevice => OpenError {
            kind: "busy",
            message: format!(
                "cannot use {path}: {} (another program may hold the port, or the device is gone)",
                e.description
            ),
        },
        _ => OpenError {
            kind: "serial",
            message: format!("cannot open {path}: {}", e.description),
        },
    }
}

/// Check an answer against its request; anything else is a protocol error (and poisons the context).
fn check(block: Block, response: Response) -> Result<Data, String> {
    let want = usize::from(block.count);
    match (block.table, response) {
        (Table::Coil, Response::ReadCoils(mut bits)) | (Table::Discrete, Response::ReadDiscreteInputs(mut bits)) => {
            // Bits come in whole bytes: exactly ceil(count / 8) bytes is right, anything else is not.
            if bits.len() >= want && bits.len() - want < 8 {
                bits.truncate(want);
                Ok(Data::Bits(bits))
            } else {
                Err(format!("{} bits for {want} asked", bits.len()))
            }
        }
        (Table::Holding, Response::ReadHoldingRegisters(words))
        | (Table::Input, Response::ReadInputRegisters(words)) => {
            if words.len() == want {
                Ok(Data::Words(words))
            } else {
                Err(format!("{} registers for {want} asked", words.len()))
            }
        }
        (table, other) => Err(format!("answer {other:?} to a {table} read")),
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

// === one read, for `fieldgate probe` ===

/// What [`read_once`] read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readout {
    /// Coils or discrete inputs, one per address.
    Bits(Vec<bool>),
    /// Holding or input registers, one per address.
    Registers(Vec<u16>),
}

/// Why [`read_once`] failed; each variant carries what the engineer needs to act on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// The request itself is impossible (no I/O was done).
    #[error("cannot read {count} {table} item(s) from address {address}: {why}")]
    Range {
        /// The table asked.
        table: Table,
        /// First address.
        address: u16,
        /// Items asked.
        count: u16,
        /// What is wrong.
        why: String,
    },
    /// The port or connection cannot be opened.
    #[error("{message}")]
    Open {
        /// A bounded kind: `missing`, `permission`, `busy`, `serial`, `clear`, `refused`, `connect`,
        /// `connect_timeout`.
        kind: &'static str,
        /// What failed, in words.
        message: String,
    },
    /// The device answered with a Modbus exception.
    #[error("the device answered with exception {code:#04x} ({})", exception_name(*code))]
    Exception {
        /// The exception code.
        code: u8,
    },
    /// No answer within the timeout.
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// An answer that does not fit the request (length, function, undecodable bytes).
    #[error("bad answer: {0}")]
    Protocol(String),
    /// The transport failed after opening.
    #[error("transport error: {0}")]
    Transport(String),
}

impl ProbeError {
    /// A bounded label.
    pub fn error_code(&self) -> &'static str {
        match self {
            ProbeError::Range { .. } => "range",
            ProbeError::Open { .. } => "open",
            ProbeError::Exception { .. } => "exception",
            ProbeError::Timeout(_) => "timeout",
            ProbeError::Protocol(_) => "protocol",
            ProbeError::Transport(_) => "transport",
        }
    }
}

/// The name the Modbus application protocol gives an exception code.
pub fn exception_name(code: u8) -> &'static str {
    match code {
        0x01 => "illegal function",
        0x02 => "illegal data address",
        0x03 => "illegal data value",
        0x04 => "server device failure",
        0x05 => "acknowledge",
        0x06 => "server device busy",
        0x08 => "memory parity error",
        0x0A => "gateway path unavailable",
        0x0B => "gateway target device failed to respond",
        _ => "unknown exception",
    }
}

/// Read `count` items of `table` from `address` of `unit` once, with the same open, timeout and answer
/// checks as the bus task (an answer of the wrong length or function is an error, never data). Opens the
/// port or connection, reads, and closes it again. For commissioning (`fieldgate probe`): do not use it on
/// a bus the daemon is polling at the same time (a serial port has one user; a TCP device may allow
/// only one connection). Also returns the answer time (module doc).
pub async fn read_once(
    transport: &Transport,
    limit: Duration,
    unit: u8,
    table: Table,
    address: u16,
    count: u16,
) -> Result<(Readout, Duration), ProbeError> {
    let range = |why: String| ProbeError::Range {
        table,
        address,
        count,
        why,
    };
    if count == 0 || count > table.max_count() {
        return Err(range(format!("count must be 1..={} for {table}", table.max_count())));
    }
    if u32::from(address) + u32::from(count) > 65536 {
        return Err(range("the range passes address 65535".to_string()));
    }
    let ctx = open(transport, limit).await.map_err(|e| ProbeError::Open {
        kind: e.kind,
        message: e.message,
    })?;
    // One read, then the link is dropped: no frame gap or guard time is needed after it.
    let mut link = Link::with(
        "probe",
        transport,
        limit,
        Duration::ZERO,
        Duration::ZERO,
        Arc::new(BusStats::default()),
    );
    link.ctx = Some(ctx);
    let result = link.read(unit, Block { table, address, count }).await;
    let took = link.seen.answers.last().copied().unwrap_or_default();
    if let Some(ctx) = link.ctx.take() {
        close(ctx, transport).await;
    }
    match result {
        Ok(Data::Bits(bits)) => Ok((Readout::Bits(bits), took)),
        Ok(Data::Words(words)) => Ok((Readout::Registers(words), took)),
        Err(Failure::Exception(code)) => Err(ProbeError::Exception { code: u8::from(code) }),
        Err(Failure::Timeout) => Err(ProbeError::Timeout(limit)),
        Err(Failure::Protocol(why) | Failure::Decode(why)) => Err(ProbeError::Protocol(why)),
        Err(Failure::Transport(why)) => Err(ProbeError::Transport(why)),
        Err(Failure::BusDown(why)) => Err(ProbeError::Open {
            kind: "connect",
            message: why,
        }),
    }
}

// === the bus task ===

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
            // While a meter is offline every round is sent, even empty: the station's `for` timers of
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
            // A round that overran its interval starts the next one at once. Waiting on a deadline
            // already past still costs a turn of the timer wheel, which ticks in whole milliseconds
            // (up to 1 ms idle per round; profile in BENCHMARKS.md, row 1).
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::point::{ByteOrder, ValueType, WordOrder};

    fn p(table: Table, address: u16, kind: ValueType) -> PointSpec {
        PointSpec {
            table,
            address,
            kind,
            word_order: WordOrder::Big,
            byte_order: ByteOrder::Big,
            scale: None,
            decimals: None,
        }
    }

    fn plan(points: &[PointSpec]) -> (Vec<Block>, Vec<Slot>) {
        let refs: Vec<&PointSpec> = points.iter().collect();
        plan_points(&refs)
    }

    fn block(table: Table, address: u16, count: u16) -> Block {
        Block { table, address, count }
    }

    #[test]
    fn points_that_touch_or_overlap_share_one_request() {
        use ValueType::*;
        // 0..2 (u32), 2 (u16) touches, 1 (u16) overlaps.
        let (blocks, slots) = plan(&[
            p(Table::Holding, 0, U32),
            p(Table::Holding, 2, U16),
            p(Table::Holding, 1, U16),
        ]);
        assert_eq!(blocks, [block(Table::Holding, 0, 3)]);
        assert_eq!(
            slots.iter().map(|s| (s.block, s.offset)).collect::<Vec<_>>(),
            [(0, 0), (0, 2), (0, 1)]
        );
    }

    #[test]
    fn a_gap_between_points_makes_two_requests() {
        let (blocks, slots) = plan(&[
            p(Table::Holding, 10, ValueType::U16),
            p(Table::Holding, 0, ValueType::U32),
        ]);
        assert_eq!(blocks, [block(Table::Holding, 0, 2), block(Table::Holding, 10, 1)]);
        assert_eq!(slots, [Slot { block: 1, offset: 0 }, Slot { block: 0, offset: 0 }]);
    }

    #[test]
    fn tables_are_never_mixed_and_come_in_table_order() {
        let (blocks, slots) = plan(&[
            p(Table::Input, 0, ValueType::U16),
            p(Table::Holding, 0, ValueType::U16),
            p(Table::Coil, 0, ValueType::U16),
            p(Table::Discrete, 1, ValueType::U16),
            p(Table::Coil, 1, ValueType::U16),
        ]);
        assert_eq!(
            blocks,
            [
                block(Table::Coil, 0, 2),
                block(Table::Discrete, 1, 1),
                block(Table::Holding, 0, 1),
                block(Table::Input, 0, 1),
            ]
        );
        assert_eq!(slots[0], Slot { block: 3, offset: 0 });
        assert_eq!(slots[4], Slot { block: 0, offset: 1 });
    }

    #[test]
    fn a_request_never_exceeds_the_table_limit() {
        // 125 registers is the most one read may ask for: a run of touching points covering 0..125
        // is one request, the touching point at 125 starts the next one.
        let mut points: Vec<PointSpec> = (0..31).map(|i| p(Table::Holding, i * 4, ValueType::U64)).collect();
        points.push(p(Table::Holding, 124, ValueType::U16));
        points.push(p(Table::Holding, 125, ValueType::U32));
        let (blocks, slots) = plan(&points);
        assert_eq!(blocks, [block(Table::Holding, 0, 125), block(Table::Holding, 125, 2)]);
        assert_eq!(slots[31], Slot { block: 0, offset: 124 });
        assert_eq!(slots[32], Slot { block: 1, offset: 0 });
        // Coils: 2000 bits.
        let bits: Vec<PointSpec> = (0..2001).map(|i| p(Table::Coil, i, ValueType::U16)).collect();
        let (blocks, _) = plan(&bits);
        assert_eq!(blocks, [block(Table::Coil, 0, 2000), block(Table::Coil, 2000, 1)]);
    }

    #[test]
    fn the_same_point_twice_is_read_once() {
        let (blocks, slots) = plan(&[p(Table::Coil, 5, ValueType::U16), p(Table::Coil, 5, ValueType::U16)]);
        assert_eq!(blocks, [block(Table::Coil, 5, 1)]);
        assert_eq!(slots, [Slot { block: 0, offset: 0 }; 2]);
    }

    #[test]
    fn points_at_the_top_of_the_address_space_do_not_overflow() {
        let (blocks, _) = plan(&[
            p(Table::Holding, 65532, ValueType::U64),
            p(Table::Holding, 65535, ValueType::U16),
        ]);
        assert_eq!(blocks, [block(Table::Holding, 65532, 4)]);
    }

    #[test]
    fn answers_of_the_wrong_length_or_kind_are_refused() {
        let b = block(Table::Holding, 0, 3);
        assert!(check(b, Response::ReadHoldingRegisters(vec![1, 2, 3])).is_ok());
        assert!(check(b, Response::ReadHoldingRegisters(vec![1, 2])).is_err());
        assert!(check(b, Response::ReadHoldingRegisters(vec![1, 2, 3, 4])).is_err());
        assert!(check(b, Response::ReadInputRegisters(vec![1, 2, 3])).is_err());
        let c = block(Table::Coil, 0, 3);
        assert!(matches!(check(c, Response::ReadCoils(vec![true; 8])), Ok(Data::Bits(v)) if v.len() == 3));
        assert!(check(c, Response::ReadCoils(vec![])).is_err());
        assert!(check(c, Response::ReadCoils(vec![true; 16])).is_err());
    }

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

    /// The link's one timer was armed by an earlier request: a later request must still get its whole
    /// timeout (the timer fires early, is moved, and only this request's deadline counts).
    #[tokio::test]
    async fn a_request_gets_its_whole_timeout_after_earlier_quick_ones() {
        let plant = crate::tools::simulator::Plant::with_meters(1);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let _server = crate::tools::simulator::serve_tcp(listener, plant.clone());
        let limit = Duration::from_millis(300);
        let mut link = Link::with(
            "t",
            &Transport::Tcp(addr),
            limit,
            Duration::ZERO,
            Duration::ZERO,
            Arc::new(BusStats::default()),
        );
        let coil = Block {
            table: Table::Coil,
            address: 0,
            count: 1,
        };
        // Quick answers for half a timeout: the timer now has a deadline half a timeout away.
        let first = std::time::Instant::now();
        let mut answered = 0;
        while first.elapsed() < limit / 2 {
            assert!(link.read(1, coil).await.is_ok(), "a live unit answers");
            answered += 1;
        }
        plant.silence(1, true);
        let start = std::time::Instant::now();
        let r = link.read(1, coil).await;
        let waited = start.elapsed();
        assert!(
            matches!(r, Err(Failure::Timeout)),
            "after {answered} answers: {:?}",
            r.err()
        );
        assert!(
            waited >= limit,
            "gave up after {waited:?}, before its own timeout of {limit:?}"
        );
        // And the link recovers: the unit answers again on a fresh connection.
        plant.silence(1, false);
        assert!(link.read(1, coil).await.is_ok());
    }

    /// Compiles only if the bus task can be `tokio::spawn`ed (the tokio-modbus context is not `Sync`, so
    /// no `&Link` may live across an await).
    #[allow(dead_code)]
    fn the_bus_task_is_send(cfg: Arc<Config>, tx: mpsc::Sender<Cycle>, stop: CancellationToken, st: Arc<BusStats>) {
        fn assert_send<T: Send>(_: T) {}
        assert_send(run_bus(cfg, 0, tx, stop, st));
    }
}

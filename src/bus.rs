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
//!
//! Never: panics on anything a device sends, exits before shutdown, logs once per poll (state changes
//! only), or slows the online meters down for an offline one more than one try per `offline_retry`.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
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
use crate::config::{BusConfig, Config, MeterConfig, Parity, Transport};
use crate::point::{self, PointSpec, Raw, Table};
use crate::station::{Cycle, Sample};

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

    /// Drop a poisoned context; on RTU stay silent for `guard` first, so a late frame has arrived (and
    /// is discarded on reopen) before the next request goes out.
    async fn poison(&mut self, ctx: Context) {
        drop(ctx);
        self.ctx = None;
        if !self.guard.is_zero() {
            sleep(self.guard).await;
        }
    }

    /// `ctx.call(request)`, given up after the link's `timeout` (`Err(())`).
    ///
    /// Same result as `tokio::time::timeout`, but one timer serves every request of the link and is
    /// moved only when it fires: a request's deadline is always later than the timer's (deadlines
    /// only grow), so the timer firing early is the only case, and it is then moved to this request's
    /// deadline. A timer registered per request cost ~3 % of the poll rate (BENCHMARKS.md row 1).
    async fn call(&mut self, ctx: &mut Context, request: Request<'static>) -> Result<CallResult, ()> {
        let deadline = Instant::now() + self.timeout;
        let timer = self.timer.get_or_insert_with(|| Box::pin(sleep_until(deadline)));
        let mut call = ctx.call(request);
        loop {
            tokio::select! {
                biased;
                r = &mut call => return Ok(r),
                () = timer.as_mut() => {
                    if Instant::now() >= deadline {
                        return Err(());
                    }
                    timer.as_mut().reset(deadline);
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
        let failure = match self.call(&mut ctx, request).await {
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
            let port = tokio_serial::SerialStream::open(&builder).map_err(|e| serial_open_error(path, &e))?;
            // Stale bytes survive close and reopen (notes §4.3): discard them before the first request.
            port.clear(tokio_serial::ClearBuffer::Input).map_err(|e| OpenError {
                kind: "clear",
                message: format!("cannot discard the input buffer of {path}: {e}"),
            })?;
            Ok(rtu::attach_slave(port, Slave(1)))
        }
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
/// only one connection).
pub async fn read_once(
    transport: &Transport,
    limit: Duration,
    unit: u8,
    table: Table,
    address: u16,
    count: u16,
) -> Result<Readout, ProbeError> {
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
    match link.read(unit, Block { table, address, count }).await {
        Ok(Data::Bits(bits)) => Ok(Readout::Bits(bits)),
        Ok(Data::Words(words)) => Ok(Readout::Registers(words)),
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
    failures: u32,
    /// When an offline meter is tried next.
    next_try: Instant,
    /// The exception last logged, so a repeating one is logged once.
    logged_exception: Option<ExceptionCode>,
}

struct BusTask {
    cfg: Arc<Config>,
    bus: usize,
    link: Link,
    meters: Vec<MeterState>,
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
                next_try: now,
                logged_exception: None,
            })
            .collect();
        let mut task = BusTask {
            link: Link::new(&bus_cfg, Arc::clone(&stats)),
            bus,
            meters,
            offline_after: bus_cfg.offline_after.max(1),
            offline_retry: bus_cfg.offline_retry,
            stats,
            cfg,
        };
        info!(message = "Bus task started.", endpoint = %bus_cfg.transport.endpoint(), meters = task.meters.len());
        loop {
            let start = Instant::now();
            let cycle = tokio::select! {
                c = task.round() => c,
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
    /// One pass over the meters that are due.
    async fn round(&mut self) -> Cycle {
        let mut cycle = Cycle {
            bus: self.bus,
            ..Cycle::default()
        };
        self.link.probe().await;
        for k in 0..self.meters.len() {
            if self.link.came_up {
                // The bus was down and is back: do not wait `offline_retry` to find the meters again.
                self.link.came_up = false;
                let now = Instant::now();
                for m in self.meters.iter_mut().filter(|m| !m.online) {
                    m.next_try = now;
                }
            }
            let m = &self.meters[k];
            if !m.online && Instant::now() < m.next_try {
                continue;
            }
            let result = self.read_meter(k).await;
            self.settle(k, result, &mut cycle);
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

    /// Apply one read's result to the meter's state; log only state changes.
    fn settle(&mut self, k: usize, result: Result<Sample, Failure>, cycle: &mut Cycle) {
        let (offline_after, offline_retry) = (self.offline_after, self.offline_retry);
        let m = &mut self.meters[k];
        match result {
            Ok(sample) => {
                if !m.online {
                    m.online = true;
                    info!(message = "Meter back online.", meter = %m.meter_no, unit = m.unit);
                    cycle.links.push((m.index, true));
                }
                m.failures = 0;
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
                    warn!(
                        message = "Meter offline.",
                        meter = %m.meter_no,
                        unit = m.unit,
                        failures = m.failures,
                        retry_every = %humantime::format_duration(offline_retry),
                        error = %failure,
                    );
                    cycle.links.push((m.index, false));
                }
                if !m.online {
                    m.next_try = Instant::now() + offline_retry;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::point::{ByteOrder, ValueType, WordOrder};

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

    /// The link's one timer was armed by an earlier request: a later request must still get its whole
    /// timeout (the timer fires early, is moved, and only this request's deadline counts).
    #[tokio::test]
    async fn a_request_gets_its_whole_timeout_after_earlier_quick_ones() {
        let plant = crate::simulator::Plant::with_meters(1);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let _server = crate::simulator::serve_tcp(listener, plant.clone());
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

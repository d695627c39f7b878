//! A Modbus slave simulator: a [`Plant`] of units (simulated meters) served over Modbus TCP, RTU over TCP,
//! or RTU on a serial device, with fault injection. Used by `fieldgate simulate` (commissioning without
//! hardware), the demo, and the integration tests.
//!
//! Owns: the simulated register tables, the tokio-modbus `Service` that answers from them, the transports
//! it serves on, and the user-facing `simulate` command ([`SimulateArgs`], [`simulate_main`]) with its
//! small admin HTTP API and stdin commands.
//!
//! # The standard simulated meter
//!
//! Every unit created by [`Plant::with_meters`] has 64 coils, discrete inputs, holding and input registers,
//! all zero except:
//!
//! | table   | address | meaning                                   | initial value                   |
//! |---------|---------|-------------------------------------------|---------------------------------|
//! | coil    | 0       | valve: 0 = 关闭, 1 = 开启                  | 0 (closed)                      |
//! | holding | 0–1     | 累计流量, u32 big-endian (high word first), ×0.01 m³ | `unit × 10000 + 1234` (e.g. unit 1: 112.34 m³) |
//! | holding | 2       | 电池电压, u16, ×0.01 V                      | `350 + unit` (e.g. unit 1: 3.51 V) |
//! | holding | 3       | valve status: 0 = 关闭, 1 = 开启, 2 = 故障   | 0 (closed)                      |
//!
//! Every valve flip ([`Plant::flip_valve`]) adds 1.23 m³ (raw 123) to 累计流量, so a flip is visible in the
//! reading too, and sets the valve status register to the new position (clearing a fault).
//! [`Plant::fault_valve`] sets the status register to 2 (a coil cannot hold a fault);
//! [`Plant::set_battery`] and [`Plant::add_flow`] script a falling battery and water flowing through a
//! shut valve. Values differ per unit, so an answer attributed to the wrong unit is visible.
//!
//! A matching config: `valve = { table = "coil", address = 0, states = { 0 = "关闭", 1 = "开启" } }`
//! (or, to see faults, `valve = { table = "holding", address = 3, states = { 0 = "关闭", 1 = "开启",
//! 2 = "故障" } }`), readings `{ field = "累计流量", table = "holding", address = 0, type = "u32",
//! scale = 0.01 }` and `{ field = "电池电压", table = "holding", address = 2, scale = 0.01 }`.
//!
//! # Faults
//!
//! [`Plant::inject`] queues a [`Fault`] for a unit; each request to that unit consumes one:
//! - [`Fault::Late`]: the answer (computed when the request arrived) is sent after the delay. On Modbus TCP
//!   it holds up that connection. On an RTU line it does not hold up the other units (a slow slave on
//!   RS-485 does not stop the others): a timer writes the RTU frame onto the line later.
//! - [`Fault::WrongCount`]: a read answers one item fewer than asked.
//! - [`Fault::Garbage`]: the bytes of the answer on the wire are replaced by zero bytes of the same length.
//!
//! Both work by wrapping the server's transport ([`Garble`]).
//!
//! # RTU: one simulated line
//!
//! The RTU server of tokio-modbus 0.17 takes a concrete `SerialStream` and cannot be wrapped, and its
//! `serve_forever` returns on the first undecodable request. So every RTU transport goes through a
//! simulated *line*: a persistent connection to an internal RTU-over-TCP frame server on `127.0.0.1:0`.
//! - A serial device ([`serve_rtu`], [`serve_rtu_path`]) is pumped to and from the line.
//! - RTU over TCP ([`serve_rtu_over_tcp`]) works like an RS-485 device server. Every client's bytes go to the
//!   one line, the newest client wins, and what the line sends goes to the client connected at that
//!   moment, or is lost when none is.
//!
//! The line outlives reopened ports and reconnected clients, so a late answer arrives after a reopen, as
//! on real hardware. That is what the gateway's guard time is for. A request the frame server cannot
//! decode only ends the internal connection, which is then reopened.
//!
//! [`Plant::silence`] makes a unit dead: requests to it get no answer at all, like unknown units.
//!
//! [`Plant::set_flaky`] makes a unit fail a share of its requests at random ([`Flaky`]): each failing
//! request is answered late (after [`Flaky::late`]) or not at all, half and half. The draws come from a
//! random generator seeded per unit, one pair of draws per request, so the same seed and the same
//! sequence of requests fail the same requests again (a failing test can be rerun with its seed).
//!
//! The plant's lock is a std `Mutex`, held only to read or change the tables, never across an await.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Duration;

use anyhow::Context as _;
use rand::{Rng as _, SeedableRng as _};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_modbus::prelude::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_serial::SerialStream;
use tracing::{debug, info, warn};

/// Items per table of a standard simulated unit.
pub const UNIT_SIZE: usize = 64;

/// Raw 累计流量 added by every valve flip (1.23 m³ at scale 0.01).
pub const FLOW_PER_FLIP: u32 = 123;

/// Holding register of the valve status (0 = 关闭, 1 = 开启, 2 = 故障).
pub const VALVE_STATUS: u16 = 3;

/// The valve status value of a fault.
pub const VALVE_FAULT: u16 = 2;

// === plant ===

/// The four tables of one unit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Unit {
    /// Coils (fc 1, 5, 15).
    pub coils: Vec<bool>,
    /// Discrete inputs (fc 2).
    pub discrete: Vec<bool>,
    /// Holding registers (fc 3, 6, 16).
    pub holding: Vec<u16>,
    /// Input registers (fc 4).
    pub input: Vec<u16>,
}

impl Unit {
    /// A standard simulated meter (see the module doc) for `unit`.
    pub fn meter(unit: u8) -> Unit {
        let mut u = Unit {
            coils: vec![false; UNIT_SIZE],
            discrete: vec![false; UNIT_SIZE],
            holding: vec![0; UNIT_SIZE],
            input: vec![0; UNIT_SIZE],
        };
        let flow = u32::from(unit) * 10_000 + 1234;
        u.holding[0] = (flow >> 16) as u16;
        u.holding[1] = flow as u16;
        u.holding[2] = 350 + u16::from(unit);
        u
    }

    fn flow(&self) -> Option<u32> {
        let hi = *self.holding.first()?;
        let lo = *self.holding.get(1)?;
        Some((u32::from(hi) << 16) | u32::from(lo))
    }

    fn add_flow(&mut self, raw: u32) {
        if let Some(flow) = self.flow() {
            let flow = flow.wrapping_add(raw);
            if let Some(w) = self.holding.get_mut(0..2) {
                w[0] = (flow >> 16) as u16;
                w[1] = flow as u16;
            }
        }
    }
}

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

/// One unit as shown by `status` and `GET /units`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UnitStatus {
    /// Unit id.
    pub unit: u8,
    /// Coil 0.
    pub valve_open: bool,
    /// Holding 0–1, raw (×0.01 m³).
    pub flow_raw: u32,
    /// Holding 2, raw (×0.01 V).
    pub battery_raw: u16,
    /// Holding 3: 0 = closed, 1 = open, 2 = fault.
    pub valve_status: u16,
    /// Dead (no answers).
    pub silenced: bool,
    /// Faults still queued.
    pub pending_faults: usize,
    /// Requests seen for this unit.
    pub requests: u64,
    /// Share of the requests failed at random, in percent (0: not flaky).
    pub flaky_percent: f64,
    /// Requests failed at random so far (late or unanswered).
    pub flaky_failures: u64,
}

#[derive(Debug, Default)]
struct PlantState {
    units: BTreeMap<u8, Unit>,
    silent: BTreeMap<u8, bool>,
    faults: HashMap<u8, VecDeque<Fault>>,
    requests: HashMap<u8, u64>,
    flaky: HashMap<u8, (Flaky, rand::rngs::StdRng)>,
    flaky_failures: HashMap<u8, u64>,
}

/// How the service answers one request.
enum Answer {
    /// Send nothing.
    Silent,
    /// Answer at once.
    Now(Result<Response, ExceptionCode>),
    /// Answer after a delay (function code of the request, for framing it on an RTU line).
    Late(Duration, u8, Result<Response, ExceptionCode>),
    /// Answer at once, garbled on the wire.
    Garbled(Result<Response, ExceptionCode>),
}

/// A shared, cloneable handle to the simulated units.
#[derive(Debug, Clone, Default)]
pub struct Plant {
    inner: Arc<Mutex<PlantState>>,
}

impl Plant {
    /// An empty plant (answers nothing).
    pub fn new() -> Plant {
        Plant::default()
    }

    /// A plant of standard meters with units `1..=n`.
    pub fn with_meters(n: u8) -> Plant {
        let plant = Plant::new();
        for unit in 1..=n {
            plant.add_unit(unit, Unit::meter(unit));
        }
        plant
    }

    fn lock(&self) -> MutexGuard<'_, PlantState> {
        // A panic elsewhere while holding the lock leaves plain tables behind; they are still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Add or replace a unit.
    pub fn add_unit(&self, unit: u8, tables: Unit) {
        self.lock().units.insert(unit, tables);
    }

    /// Unit ids, ascending.
    pub fn units(&self) -> Vec<u8> {
        self.lock().units.keys().copied().collect()
    }

    /// Flip the valve (coil 0) of `unit`, set the valve status register (holding 3) to the new
    /// position and add [`FLOW_PER_FLIP`] to its flow; the new valve state, or `None` for an unknown unit.
    pub fn flip_valve(&self, unit: u8) -> Option<bool> {
        let mut p = self.lock();
        let u = p.units.get_mut(&unit)?;
        let valve = u.coils.first_mut()?;
        *valve = !*valve;
        let open = *valve;
        if let Some(status) = u.holding.get_mut(usize::from(VALVE_STATUS)) {
            *status = u16::from(open);
        }
        u.add_flow(FLOW_PER_FLIP);
        Some(open)
    }

    /// Make the valve of `unit` report a fault: status register (holding 3) = 2; the coil keeps its
    /// position. Cleared by the next flip. False for an unknown unit.
    pub fn fault_valve(&self, unit: u8) -> bool {
        self.set_holding(unit, VALVE_STATUS, VALVE_FAULT)
    }

    /// Set the 电池电压 register (holding 2, ×0.01 V) of `unit`; false for an unknown unit.
    pub fn set_battery(&self, unit: u8, raw: u16) -> bool {
        self.set_holding(unit, 2, raw)
    }

    /// Add `raw` (×0.01 m³) to the 累计流量 of `unit` without touching the valve (a leak, or a
    /// tampered valve); the new raw flow, or `None` for an unknown unit.
    pub fn add_flow(&self, unit: u8, raw: u32) -> Option<u32> {
        let mut p = self.lock();
        let u = p.units.get_mut(&unit)?;
        u.add_flow(raw);
        u.flow()
    }

    /// The valve (coil 0) of `unit`.
    pub fn valve(&self, unit: u8) -> Option<bool> {
        self.lock().units.get(&unit)?.coils.first().copied()
    }

    /// Set a coil; false if the unit or address does not exist.
    pub fn set_coil(&self, unit: u8, address: u16, value: bool) -> bool {
        let mut p = self.lock();
        match p
            .units
            .get_mut(&unit)
            .and_then(|u| u.coils.get_mut(usize::from(address)))
        {
            Some(c) => {
                *c = value;
                true
            }
            None => false,
        }
    }

    /// Set a holding register; false if the unit or address does not exist.
    pub fn set_holding(&self, unit: u8, address: u16, value: u16) -> bool {
        let mut p = self.lock();
        match p
            .units
            .get_mut(&unit)
            .and_then(|u| u.holding.get_mut(usize::from(address)))
        {
            Some(r) => {
                *r = value;
                true
            }
            None => false,
        }
    }

    /// A holding register.
    pub fn holding(&self, unit: u8, address: u16) -> Option<u16> {
        self.lock().units.get(&unit)?.holding.get(usize::from(address)).copied()
    }

    /// 累计流量 raw (holding 0–1).
    pub fn flow(&self, unit: u8) -> Option<u32> {
        self.lock().units.get(&unit)?.flow()
    }

    /// A copy of a unit's tables.
    pub fn unit(&self, unit: u8) -> Option<Unit> {
        self.lock().units.get(&unit).cloned()
    }

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

    /// Requests seen for `unit` (answered or not).
    pub fn requests(&self, unit: u8) -> u64 {
        self.lock().requests.get(&unit).copied().unwrap_or(0)
    }

    /// Every unit's status, by unit id.
    pub fn status(&self) -> Vec<UnitStatus> {
        let p = self.lock();
        p.units
            .iter()
            .map(|(&unit, u)| UnitStatus {
                unit,
                valve_open: u.coils.first().copied().unwrap_or(false),
                flow_raw: u.flow().unwrap_or(0),
                battery_raw: u.holding.get(2).copied().unwrap_or(0),
                valve_status: u.holding.get(usize::from(VALVE_STATUS)).copied().unwrap_or(0),
                silenced: p.silent.get(&unit).copied().unwrap_or(false),
                pending_faults: p.faults.get(&unit).map_or(0, VecDeque::len),
                requests: p.requests.get(&unit).copied().unwrap_or(0),
                flaky_percent: p.flaky.get(&unit).map_or(0.0, |(f, _)| f.rate * 100.0),
                flaky_failures: p.flaky_failures.get(&unit).copied().unwrap_or(0),
            })
            .collect()
    }

    /// Decide the answer to one request: under the lock, so the tables are read (or written) at once.
    fn answer(&self, slave: u8, request: Request<'_>) -> Answer {
        let mut p = self.lock();
        *p.requests.entry(slave).or_default() += 1;
        if p.silent.get(&slave).copied().unwrap_or(false) {
            return Answer::Silent;
        }
        // Two draws for every request, failing or not, so a seed always fails the same requests.
        let flaky = p.flaky.get_mut(&slave).and_then(|(f, rng)| {
            let (fail, late) = (rng.random::<f64>() < f.rate, rng.random::<bool>());
            fail.then_some(if late { f.late } else { None })
        });
        let fault = p.faults.get_mut(&slave).and_then(VecDeque::pop_front);
        let fault = match (fault, flaky) {
            (Some(f), _) => Some(f),
            (None, None) => None,
            (None, Some(late)) => {
                *p.flaky_failures.entry(slave).or_default() += 1;
                match late {
                    Some(d) => Some(Fault::Late(d)),
                    None => return Answer::Silent,
                }
            }
        };
        let Some(u) = p.units.get_mut(&slave) else {
            return Answer::Silent;
        };
        let fc = read_function(&request);
        let mut result = apply(u, request);
        match fault {
            None => Answer::Now(result),
            Some(Fault::Late(d)) => Answer::Late(d, fc, result),
            Some(Fault::Garbage) => Answer::Garbled(result),
            Some(Fault::WrongCount) => {
                if let Ok(Response::ReadCoils(v) | Response::ReadDiscreteInputs(v)) = &mut result {
                    v.pop();
                }
                if let Ok(Response::ReadHoldingRegisters(v) | Response::ReadInputRegisters(v)) = &mut result {
                    v.pop();
                }
                Answer::Now(result)
            }
        }
    }
}

/// The function code of a read request (0 for others).
fn read_function(request: &Request<'_>) -> u8 {
    match request {
        Request::ReadCoils(..) => 1,
        Request::ReadDiscreteInputs(..) => 2,
        Request::ReadHoldingRegisters(..) => 3,
        Request::ReadInputRegisters(..) => 4,
        _ => 0,
    }
}

/// Items `address..address + count` of a table, or the exception a device gives.
fn range<T: Clone>(table: &[T], address: u16, count: u16, max: u16) -> Result<Vec<T>, ExceptionCode> {
    if count == 0 || count > max {
        return Err(ExceptionCode::IllegalDataValue);
    }
    let start = usize::from(address);
    table
        .get(start..start + usize::from(count))
        .map(<[T]>::to_vec)
        .ok_or(ExceptionCode::IllegalDataAddress)
}

fn write<T: Clone>(table: &mut [T], address: u16, values: &[T]) -> Result<(), ExceptionCode> {
    let start = usize::from(address);
    let dst = table
        .get_mut(start..start + values.len())
        .ok_or(ExceptionCode::IllegalDataAddress)?;
    dst.clone_from_slice(values);
    Ok(())
}

/// Run one request against a unit's tables.
fn apply(u: &mut Unit, request: Request<'_>) -> Result<Response, ExceptionCode> {
    Ok(match request {
        Request::ReadCoils(a, n) => Response::ReadCoils(range(&u.coils, a, n, 2000)?),
        Request::ReadDiscreteInputs(a, n) => Response::ReadDiscreteInputs(range(&u.discrete, a, n, 2000)?),
        Request::ReadHoldingRegisters(a, n) => Response::ReadHoldingRegisters(range(&u.holding, a, n, 125)?),
        Request::ReadInputRegisters(a, n) => Response::ReadInputRegisters(range(&u.input, a, n, 125)?),
        Request::WriteSingleCoil(a, v) => {
            write(&mut u.coils, a, &[v])?;
            Response::WriteSingleCoil(a, v)
        }
        Request::WriteSingleRegister(a, v) => {
            write(&mut u.holding, a, &[v])?;
            Response::WriteSingleRegister(a, v)
        }
        Request::WriteMultipleCoils(a, vs) => {
            write(&mut u.coils, a, &vs)?;
            Response::WriteMultipleCoils(a, vs.len() as u16)
        }
        Request::WriteMultipleRegisters(a, vs) => {
            write(&mut u.holding, a, &vs)?;
            Response::WriteMultipleRegisters(a, vs.len() as u16)
        }
        _ => return Err(ExceptionCode::IllegalFunction),
    })
}

// === service and transport wrapper ===

/// The tokio-modbus service of one connection: answers from the plant, arms its connection's [`Garble`].
#[derive(Clone)]
struct PlantService {
    plant: Plant,
    garble: Arc<AtomicBool>,
    /// On an RTU line, late answers are written by a timer task (see [`Garble`]), so one slow unit does
    /// not hold up the others; `None` on Modbus TCP, where a late answer delays its connection.
    late: Option<Arc<LateFrames>>,
}

type AnswerFuture = Pin<Box<dyn Future<Output = Result<Option<Response>, ExceptionCode>> + Send>>;

impl tokio_modbus::server::Service for PlantService {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = AnswerFuture;

    fn call(&self, req: Self::Request) -> Self::Future {
        let SlaveRequest { slave, request } = req;
        let answer = self.plant.answer(slave, request);
        if let (Answer::Late(delay, fc, result), Some(late)) = (&answer, &self.late) {
            if let Some(frame) = rtu_frame(slave, *fc, result) {
                let (delay, late) = (*delay, Arc::clone(late));
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    late.push(frame);
                });
                return Box::pin(std::future::ready(Ok(None)));
            }
        }
        match answer {
            Answer::Silent => Box::pin(std::future::ready(Ok(None))),
            Answer::Now(r) => Box::pin(std::future::ready(r.map(Some))),
            Answer::Garbled(r) => {
                self.garble.store(true, Ordering::SeqCst);
                Box::pin(std::future::ready(r.map(Some)))
            }
            Answer::Late(delay, _, r) => Box::pin(async move {
                tokio::time::sleep(delay).await;
                r.map(Some)
            }),
        }
    }
}

/// RTU frames to be written onto the wire outside the server's request/answer cycle (late answers).
#[derive(Debug, Default)]
struct LateFrames {
    frames: Mutex<VecDeque<Vec<u8>>>,
    /// The connection task, parked in a read while the server waits for the next request.
    waker: Mutex<Option<Waker>>,
}

impl LateFrames {
    fn push(&self, frame: Vec<u8>) {
        self.frames.lock().unwrap_or_else(|e| e.into_inner()).push_back(frame);
        if let Some(w) = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            w.wake();
        }
    }

    fn pop(&self) -> Option<Vec<u8>> {
        self.frames.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
    }

    fn park(&self, waker: &Waker) {
        *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker.clone());
    }
}

/// A server transport wrapper for fault injection:
/// - when `armed`, the bytes of the next write (one whole answer frame: tokio-modbus writes a frame with
///   one buffer) are replaced by zero bytes of the same length ([`Fault::Garbage`]);
/// - late RTU frames are written whenever the server polls for its next request, which it always does
///   while idle ([`Fault::Late`] on an RTU line).
pub struct Garble<T> {
    inner: T,
    armed: Arc<AtomicBool>,
    /// Bytes of the current frame still to be replaced.
    garbling: usize,
    late: Arc<LateFrames>,
    /// A late frame being written.
    out: Vec<u8>,
}

impl<T> Garble<T> {
    /// Wrap `inner`; storing `true` in `armed` garbles the next frame written.
    pub fn new(inner: T, armed: Arc<AtomicBool>) -> Garble<T> {
        Garble {
            inner,
            armed,
            garbling: 0,
            late: Arc::default(),
            out: Vec::new(),
        }
    }
}

impl<T: AsyncWrite + Unpin> Garble<T> {
    /// Write queued late frames; `Ready(Ok)` once none is left half written.
    fn poll_late(&mut self, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.out.is_empty() {
                match self.late.pop() {
                    Some(frame) => self.out = frame,
                    None => return Poll::Ready(Ok(())),
                }
            }
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.drain(..n.min(self.out.len()));
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Garble<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        me.late.park(cx.waker());
        if let Poll::Ready(Err(e)) = me.poll_late(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Garble<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        // Never interleave: a late frame half written goes out first.
        std::task::ready!(me.poll_late(cx))?;
        if me.garbling == 0 && me.armed.swap(false, Ordering::SeqCst) {
            me.garbling = buf.len();
        }
        if me.garbling == 0 {
            return Pin::new(&mut me.inner).poll_write(cx, buf);
        }
        let n = me.garbling.min(buf.len());
        let zeros = vec![0u8; n];
        let written = std::task::ready!(Pin::new(&mut me.inner).poll_write(cx, &zeros))?;
        me.garbling -= written.min(me.garbling);
        Poll::Ready(Ok(written))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An RTU answer frame (address, PDU, CRC) for a read answer or an exception; `None` for other answers.
fn rtu_frame(slave: u8, fc: u8, result: &Result<Response, ExceptionCode>) -> Option<Vec<u8>> {
    let mut f = vec![slave];
    match result {
        Ok(Response::ReadCoils(bits) | Response::ReadDiscreteInputs(bits)) if fc != 0 => {
            let bytes: Vec<u8> = bits
                .chunks(8)
                .map(|c| c.iter().enumerate().fold(0u8, |b, (i, &on)| b | (u8::from(on) << i)))
                .collect();
            f.push(fc);
            f.push(u8::try_from(bytes.len()).ok()?);
            f.extend(bytes);
        }
        Ok(Response::ReadHoldingRegisters(words) | Response::ReadInputRegisters(words)) if fc != 0 => {
            f.push(fc);
            f.push(u8::try_from(words.len() * 2).ok()?);
            f.extend(words.iter().flat_map(|w| w.to_be_bytes()));
        }
        Err(code) if fc != 0 => {
            f.push(fc | 0x80);
            f.push(u8::from(*code));
        }
        _ => return None,
    }
    let crc = crc16(&f);
    f.extend(crc.to_le_bytes());
    Some(f)
}

/// CRC-16/MODBUS.
fn crc16(data: &[u8]) -> u16 {
    data.iter().fold(0xFFFF, |crc, &b| {
        (0..8).fold(
            crc ^ u16::from(b),
            |c, _| if c & 1 != 0 { (c >> 1) ^ 0xA001 } else { c >> 1 },
        )
    })
}

/// The service and wrapped transport of one connection; `rtu_line`: late answers do not block others.
fn connection(plant: &Plant, stream: TcpStream, rtu_line: bool) -> (PlantService, Garble<TcpStream>) {
    let _ = stream.set_nodelay(true);
    let armed = Arc::new(AtomicBool::new(false));
    let transport = Garble::new(stream, Arc::clone(&armed));
    let service = PlantService {
        plant: plant.clone(),
        garble: armed,
        late: rtu_line.then(|| Arc::clone(&transport.late)),
    };
    (service, transport)
}

// === serving ===

/// Serve the plant as Modbus TCP on `listener` until the handle is aborted; aborting also closes every
/// open connection (so a test can "restart" the server by binding the same address again).
pub fn serve_tcp(listener: TcpListener, plant: Plant) -> JoinHandle<()> {
    tokio::spawn(async move {
        let server = tokio_modbus::server::tcp::Server::new(listener);
        let on_connected = move |stream: TcpStream, _peer: SocketAddr| {
            let conn = connection(&plant, stream, false);
            async move { io::Result::Ok(Some(conn)) }
        };
        loop {
            if let Err(error) = server.serve(&on_connected, on_process_error).await {
                warn!(message = "Simulator stopped accepting; retrying.", %error);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    })
}

/// Serve the plant as Modbus RTU over TCP on `listener`, the way an RS-485 device server does: every
/// client's bytes go to one shared RTU line (the newest client wins), and what the line sends goes to the
/// client connected at that moment, or nowhere when none is. So a late answer reaches a client that
/// reconnected too soon, as on real hardware. Runs until the handle is aborted.
pub fn serve_rtu_over_tcp(listener: TcpListener, plant: Plant) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Some(mut line) = Line::start(plant).await else {
            return;
        };
        let mut client: Option<TcpStream> = None;
        let mut from_client = [0u8; 512];
        let mut from_line = [0u8; 512];
        loop {
            let conn = line.get().await;
            let event = match client.as_mut() {
                None => tokio::select! {
                    r = listener.accept() => Event::Accepted(r.map(|(s, _)| s)),
                    r = conn.read(&mut from_line) => Event::FromLine(r),
                },
                Some(c) => tokio::select! {
                    r = listener.accept() => Event::Accepted(r.map(|(s, _)| s)),
                    r = c.read(&mut from_client) => Event::FromDevice(r),
                    r = conn.read(&mut from_line) => Event::FromLine(r),
                },
            };
            match event {
                Event::Accepted(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    client = Some(s);
                }
                Event::Accepted(Err(error)) => {
                    debug!(message = "Simulator accept failed.", %error);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Event::FromDevice(Ok(0) | Err(_)) => client = None,
                Event::FromDevice(Ok(n)) => line.send(&from_client[..n]).await,
                Event::FromLine(Ok(0) | Err(_)) => line.reset(),
                Event::FromLine(Ok(n)) => {
                    // No client: the bytes are lost, as on a device server.
                    if let Some(c) = client.as_mut() {
                        if c.write_all(&from_line[..n]).await.is_err() {
                            client = None;
                        }
                    }
                }
            }
        }
    })
}

/// One of the inputs a bridge waits on.
enum Event<T> {
    Accepted(io::Result<T>),
    FromDevice(io::Result<usize>),
    FromLine(io::Result<usize>),
}

/// Serve the RTU frames on each connection to `listener` with the plant (tokio-modbus's RTU-over-TCP
/// server, transport wrapped in [`Garble`]). This is the simulated line's far end.
fn serve_rtu_frames(listener: TcpListener, plant: Plant) -> JoinHandle<()> {
    tokio::spawn(async move {
        let server = tokio_modbus::server::rtu_over_tcp::Server::new(listener);
        let on_connected = move |stream: TcpStream, _peer: SocketAddr| {
            let conn = connection(&plant, stream, true);
            async move { io::Result::Ok(Some(conn)) }
        };
        loop {
            if let Err(error) = server.serve(&on_connected, on_process_error).await {
                warn!(message = "Simulator stopped accepting; retrying.", %error);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    })
}

fn on_process_error(error: io::Error) {
    debug!(message = "Simulator connection ended.", %error);
}

/// Aborts a task when dropped, so aborting the outer task stops the inner one too.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The simulated RS-485 line: one persistent connection to an internal RTU frame server on
/// `127.0.0.1:0`. It outlives the serial device or client on the other side, so an answer still in flight
/// arrives after a reopen, as on a real line. Reopened only when the frame server ends it (it does on a
/// request it cannot decode).
struct Line {
    addr: SocketAddr,
    conn: Option<TcpStream>,
    _server: AbortOnDrop,
}

impl Line {
    async fn start(plant: Plant) -> Option<Line> {
        let listener = match TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(error) => {
                warn!(message = "Simulator cannot bind its internal RTU line.", %error);
                return None;
            }
        };
        let addr = listener.local_addr().ok()?;
        Some(Line {
            addr,
            conn: None,
            _server: AbortOnDrop(serve_rtu_frames(listener, plant)),
        })
    }

    /// The connection, (re)connecting until it succeeds.
    async fn get(&mut self) -> &mut TcpStream {
        while self.conn.is_none() {
            match TcpStream::connect(self.addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    self.conn = Some(s);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        self.conn
            .get_or_insert_with(|| unreachable!("connected by the loop above"))
    }

    async fn send(&mut self, bytes: &[u8]) {
        if self.get().await.write_all(bytes).await.is_err() {
            self.reset();
        }
    }

    fn reset(&mut self) {
        self.conn = None;
    }
}

/// Serve the plant as Modbus RTU on an open serial stream (a real port, or one end of
/// `SerialStream::pair()`), until the handle is aborted. Errors on the stream are waited out, not fatal:
/// on a pty master they only mean that the other end is closed for the moment (a gateway reopening its
/// port). Use [`serve_rtu_path`] for a device that can go away and come back.
pub fn serve_rtu(stream: SerialStream, plant: Plant) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Some(mut line) = Line::start(plant).await else {
            return;
        };
        let mut stream = stream;
        loop {
            let error = pump(&mut stream, &mut line, None).await;
            debug!(message = "Simulator serial stream not usable; waiting.", %error);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// Serve the plant as Modbus RTU on the serial device at `path` (e.g. a `socat` pty link), reopening it
/// whenever it fails or is missing, until the handle is aborted.
pub fn serve_rtu_path(path: String, baud: u32, plant: Plant) -> JoinHandle<()> {
    serve_rtu_path_paced(path, baud, None, plant)
}

/// [`serve_rtu_path`], optionally pacing the bytes at the line rate of `pace` (see [`Pace`]).
pub fn serve_rtu_path_paced(path: String, baud: u32, pace: Option<Pace>, plant: Plant) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Some(mut line) = Line::start(plant).await else {
            return;
        };
        let mut logged = false;
        loop {
            // Opening a tty is blocking system calls (open, ioctl, termios): off the async workers.
            let builder = tokio_serial::new(path.as_str(), baud);
            let opened = tokio::task::spawn_blocking(move || SerialStream::open(&builder))
                .await
                .unwrap_or_else(|e| {
                    Err(tokio_serial::Error::new(
                        tokio_serial::ErrorKind::Unknown,
                        e.to_string(),
                    ))
                });
            match opened {
                Ok(mut stream) => {
                    info!(message = "Simulator serial device open.", %path);
                    logged = false;
                    let error = pump(&mut stream, &mut line, pace).await;
                    info!(message = "Simulator serial device lost; reopening.", %path, %error);
                }
                Err(error) if !logged => {
                    logged = true;
                    warn!(message = "Simulator cannot open the serial device; retrying.", %path, %error);
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// Line-rate pacing for a serial device that has no baud rate of its own (a pty): bytes take their wire
/// time, 10 bits a character (8N1). A request is handed to the slave one wire time plus 3.5 characters
/// of silence (the end-of-frame gap a real slave waits for) after it arrived; an answer is written once
/// its last byte would have left the line. For benchmarks (`fieldgate simulate --pace-baud 9600`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pace {
    /// Time of one character on the wire.
    char_time: Duration,
}

impl Pace {
    /// Pacing at `baud`, 8N1 (10 bits a character); `None` for 0.
    pub fn baud(baud: u32) -> Option<Pace> {
        (baud > 0).then(|| Pace {
            char_time: Duration::from_secs_f64(10.0 / f64::from(baud)),
        })
    }

    /// The wire time of `n` characters.
    pub fn wire(&self, n: usize) -> Duration {
        self.char_time.mul_f64(n as f64)
    }

    /// 3.5 characters of silence.
    pub fn gap(&self) -> Duration {
        self.char_time.mul_f64(3.5)
    }
}

/// Wait until `deadline`: sleep most of it, then yield until it has passed. tokio's timer rounds up
/// to whole milliseconds, which would add up to 1 ms to every frame (4 % of a 9600-baud request).
async fn wait_until(deadline: std::time::Instant) {
    let now = std::time::Instant::now();
    if deadline > now + Duration::from_millis(2) {
        tokio::time::sleep(deadline - now - Duration::from_millis(1)).await;
    }
    while std::time::Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
}

/// Pump bytes between a serial stream and the line until the stream fails (the line stays).
async fn pump(serial: &mut SerialStream, line: &mut Line, pace: Option<Pace>) -> io::Error {
    let mut from_serial = [0u8; 512];
    let mut from_line = [0u8; 512];
    // When the simulated wire is next free (pacing only).
    let mut wire_free = std::time::Instant::now();
    loop {
        let conn = line.get().await;
        let event: Event<()> = tokio::select! {
            r = serial.read(&mut from_serial) => Event::FromDevice(r),
            r = conn.read(&mut from_line) => Event::FromLine(r),
        };
        match event {
            Event::FromDevice(Ok(0)) => return io::Error::new(io::ErrorKind::UnexpectedEof, "serial end of file"),
            Event::FromDevice(Err(e)) => return e,
            Event::FromDevice(Ok(n)) => {
                if let Some(p) = pace {
                    wire_free = wire_free.max(std::time::Instant::now()) + p.wire(n);
                    wait_until(wire_free + p.gap()).await;
                }
                line.send(&from_serial[..n]).await
            }
            Event::FromLine(Ok(0) | Err(_)) => line.reset(),
            Event::FromLine(Ok(n)) => {
                if let Some(p) = pace {
                    wire_free = wire_free.max(std::time::Instant::now()) + p.wire(n);
                    wait_until(wire_free).await;
                }
                if let Err(e) = serial.write_all(&from_line[..n]).await {
                    return e;
                }
            }
            Event::Accepted(_) => {}
        }
    }
}

// === the `simulate` command ===

/// `fieldgate simulate`: serve simulated meters for commissioning and demos.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Serve Modbus TCP on this address, e.g. 127.0.0.1:5020.
    #[arg(long, value_name = "ADDR")]
    pub tcp: Option<SocketAddr>,
    /// Serve Modbus RTU over TCP (like an RS-485 device server) on this address.
    #[arg(long, value_name = "ADDR")]
    pub rtu_over_tcp: Option<SocketAddr>,
    /// Serve Modbus RTU on this serial device, e.g. a socat pty link.
    #[arg(long, value_name = "PATH")]
    pub serial: Option<String>,
    /// Baud rate for --serial.
    #[arg(long, value_name = "N", default_value_t = 9600)]
    pub baud: u32,
    /// Pace the serial bytes at this line rate (8N1), for a pty that has no baud rate of its own:
    /// answers take their wire time, requests their wire time plus 3.5 characters. Benchmarks only.
    #[arg(long, value_name = "BAUD")]
    pub pace_baud: Option<u32>,
    /// Simulate meters with units 1..=N.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=247))]
    pub meters: u8,
    /// Flip one valve (round robin over the units) this often, e.g. "10s".
    #[arg(long, value_name = "DUR", value_parser = humantime::parse_duration)]
    pub flip_every: Option<Duration>,
    /// Serve the admin HTTP API here: POST /units/{unit}/flip|fault|silence|wake,
    /// POST /units/{unit}/battery/{volts}, POST /units/{unit}/flow/{m3},
    /// POST /units/{unit}/flaky/{percent}?late_ms=MS&seed=N, GET /units.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
}

/// Run the simulator until Ctrl-C (or SIGTERM).
pub async fn simulate_main(args: SimulateArgs) -> anyhow::Result<()> {
    let chosen = [args.tcp.is_some(), args.rtu_over_tcp.is_some(), args.serial.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if chosen != 1 {
        anyhow::bail!("give exactly one of --tcp ADDR, --rtu-over-tcp ADDR or --serial PATH");
    }
    let plant = Plant::with_meters(args.meters);
    let mut tasks: Vec<AbortOnDrop> = Vec::new();
    if let Some(addr) = args.tcp {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        println!("Serving Modbus TCP on {addr}, units 1..={}.", args.meters);
        tasks.push(AbortOnDrop(serve_tcp(listener, plant.clone())));
    }
    if let Some(addr) = args.rtu_over_tcp {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        println!("Serving Modbus RTU over TCP on {addr}, units 1..={}.", args.meters);
        tasks.push(AbortOnDrop(serve_rtu_over_tcp(listener, plant.clone())));
    }
    if let Some(path) = &args.serial {
        // Fail early on an obvious mistake; the server itself keeps reopening the device.
        drop(
            SerialStream::open(&tokio_serial::new(path.as_str(), args.baud))
                .with_context(|| format!("cannot open serial device {path}"))?,
        );
        println!(
            "Serving Modbus RTU on {path} at {} baud, units 1..={}.",
            args.baud, args.meters
        );
        let pace = args.pace_baud.and_then(Pace::baud);
        tasks.push(AbortOnDrop(serve_rtu_path_paced(
            path.clone(),
            args.baud,
            pace,
            plant.clone(),
        )));
    }
    if let Some(addr) = args.admin {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for the admin API"))?;
        println!("Admin API on http://{addr}/units");
        let app = admin_router(plant.clone());
        tasks.push(AbortOnDrop(tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                warn!(message = "Simulator admin API stopped.", %error);
            }
        })));
    }
    if let Some(every) = args.flip_every {
        let plant = plant.clone();
        tasks.push(AbortOnDrop(tokio::spawn(async move {
            let mut next = 0usize;
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let units = plant.units();
                if let Some(&unit) = units.get(next % units.len().max(1)) {
                    if let Some(open) = plant.flip_valve(unit) {
                        println!("unit {unit}: valve {} (periodic flip)", valve_word(open));
                    }
                }
                next = next.wrapping_add(1);
            }
        })));
    }
    let stdin_plant = plant.clone();
    tasks.push(AbortOnDrop(tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        // EOF (no terminal, e.g. under systemd) just ends the command reader, not the simulator.
        while let Ok(Some(line)) = lines.next_line().await {
            if !line.trim().is_empty() {
                println!("{}", command(&stdin_plant, &line));
            }
        }
    })));
    println!("Type `help` for commands; Ctrl-C stops.");
    shutdown_signal().await;
    println!("Stopping.");
    drop(tasks);
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn valve_word(open: bool) -> &'static str {
    if open {
        "开启 (open)"
    } else {
        "关闭 (closed)"
    }
}

const HELP: &str = "commands:
  flip U               flip the valve of unit U (adds 1.23 m³ to its flow; clears a fault)
  fault U              the valve of unit U reports a fault (holding 3 = 2)
  battery U VOLTS      set the battery voltage of unit U, e.g. battery 2 3.2
  flow U M3            add M3 m³ to the flow of unit U without moving its valve, e.g. flow 3 0.05
  silence U            unit U stops answering
  wake U               unit U answers again
  set U holding A V    set holding register A of unit U to V
  late U MS            answer the next request to U after MS milliseconds
  garbage U            garble the next answer of U
  wrong-count U        answer the next read of U with one item fewer
  flaky U PCT [MS] [SEED]
                       unit U fails PCT % of its requests at random: half answered MS ms late
                       (default 1000), half not at all; the same SEED fails the same requests;
                       `flaky U 0` ends it
  status               show every unit
  help                 this text";

/// Run one stdin command against the plant; the text says what was done.
pub fn command(plant: &Plant, line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let unit_arg = |i: usize| -> Result<u8, String> {
        let w = words.get(i).ok_or("missing unit")?;
        let u: u8 = w.parse().map_err(|_| format!("`{w}` is not a unit id"))?;
        if plant.unit(u).is_none() {
            return Err(format!("no unit {u}"));
        }
        Ok(u)
    };
    let result: Result<String, String> = match words.first().copied().unwrap_or("") {
        "flip" => unit_arg(1).map(|u| match plant.flip_valve(u) {
            Some(open) => format!("unit {u}: valve {}", valve_word(open)),
            None => format!("unit {u} has no valve coil"),
        }),
        "fault" => unit_arg(1).map(|u| {
            plant.fault_valve(u);
            format!("unit {u}: valve reports 故障 (fault)")
        }),
        "battery" => (|| {
            let u = unit_arg(1)?;
            let raw = words
                .get(2)
                .and_then(|w| hundredths(w))
                .and_then(|r| u16::try_from(r).ok())
                .ok_or("VOLTS must be a number 0..655.35, e.g. 3.2")?;
            plant.set_battery(u, raw);
            Ok(format!("unit {u}: 电池电压 {}.{:02} V", raw / 100, raw % 100))
        })(),
        "flow" => (|| {
            let u = unit_arg(1)?;
            let raw = words
                .get(2)
                .and_then(|w| hundredths(w))
                .and_then(|r| u32::try_from(r).ok())
                .ok_or("M3 must be a positive number, e.g. 0.05")?;
            let flow = plant.add_flow(u, raw).unwrap_or(0);
            Ok(format!(
                "unit {u}: 累计流量 {}.{:02} m³ (+{}.{:02}, valve not moved)",
                flow / 100,
                flow % 100,
                raw / 100,
                raw % 100
            ))
        })(),
        "silence" => unit_arg(1).map(|u| {
            plant.silence(u, true);
            format!("unit {u}: silenced (no answers)")
        }),
        "wake" => unit_arg(1).map(|u| {
            plant.silence(u, false);
            format!("unit {u}: answering again")
        }),
        "set" => (|| {
            let u = unit_arg(1)?;
            if words.get(2) != Some(&"holding") {
                return Err("usage: set U holding A V".to_string());
            }
            let a: u16 = words.get(3).and_then(|w| w.parse().ok()).ok_or("A must be 0..65535")?;
            let v: u16 = words.get(4).and_then(|w| w.parse().ok()).ok_or("V must be 0..65535")?;
            if plant.set_holding(u, a, v) {
                Ok(format!("unit {u}: holding {a} = {v}"))
            } else {
                Err(format!("unit {u} has no holding register {a}"))
            }
        })(),
        "late" => (|| {
            let u = unit_arg(1)?;
            let ms: u64 = words.get(2).and_then(|w| w.parse().ok()).ok_or("MS must be a number")?;
            plant.inject(u, Fault::Late(Duration::from_millis(ms)));
            Ok(format!("unit {u}: next answer {ms} ms late"))
        })(),
        "flaky" => (|| {
            let u = unit_arg(1)?;
            let pct: f64 = words
                .get(2)
                .and_then(|w| w.parse().ok())
                .filter(|p| (0.0..=100.0).contains(p))
                .ok_or("PCT must be a number 0..100")?;
            let ms: u64 = match words.get(3) {
                Some(w) => w.parse().map_err(|_| "MS must be a number of milliseconds")?,
                None => 1000,
            };
            let seed: u64 = match words.get(4) {
                Some(w) => w.parse().map_err(|_| "SEED must be a number")?,
                None => rand::random(),
            };
            if pct == 0.0 {
                plant.set_flaky(u, None);
                return Ok(format!("unit {u}: answers every request again"));
            }
            plant.set_flaky(u, Some(flaky(pct, ms, seed)));
            Ok(format!(
                "unit {u}: fails {pct} % of its requests at random (half answered {ms} ms late, half not at all), seed {seed}"
            ))
        })(),
        "garbage" => unit_arg(1).map(|u| {
            plant.inject(u, Fault::Garbage);
            format!("unit {u}: next answer garbled")
        }),
        "wrong-count" => unit_arg(1).map(|u| {
            plant.inject(u, Fault::WrongCount);
            format!("unit {u}: next read answered one item short")
        }),
        "status" => Ok(plant
            .status()
            .iter()
            .map(|s| {
                format!(
                    "unit {}: valve {}{}, 累计流量 {}.{:02} m³, 电池电压 {}.{:02} V{}{}{}",
                    s.unit,
                    valve_word(s.valve_open),
                    if s.valve_status == VALVE_FAULT {
                        ", reports 故障"
                    } else {
                        ""
                    },
                    s.flow_raw / 100,
                    s.flow_raw % 100,
                    s.battery_raw / 100,
                    s.battery_raw % 100,
                    if s.silenced { ", SILENCED" } else { "" },
                    if s.flaky_percent > 0.0 {
                        format!(", flaky {} % ({} failed)", s.flaky_percent, s.flaky_failures)
                    } else {
                        String::new()
                    },
                    if s.pending_faults > 0 {
                        format!(", {} fault(s) queued", s.pending_faults)
                    } else {
                        String::new()
                    },
                )
            })
            .collect::<Vec<_>>()
            .join("\n")),
        "help" => Ok(HELP.to_string()),
        other => Err(format!("unknown command `{other}`; type help")),
    };
    result.unwrap_or_else(|e| format!("error: {e}"))
}

/// A [`Flaky`] failing `percent` % of the requests, late ones `late_ms` late (0: never answered).
fn flaky(percent: f64, late_ms: u64, seed: u64) -> Flaky {
    Flaky {
        rate: percent / 100.0,
        late: (late_ms > 0).then(|| Duration::from_millis(late_ms)),
        seed,
    }
}

/// A non-negative decimal with at most two decimals, in hundredths: "3.2" → 320.
fn hundredths(s: &str) -> Option<u64> {
    let v: f64 = s.trim().parse().ok()?;
    if !(0.0..=4.0e7).contains(&v) {
        return None;
    }
    Some((v * 100.0).round() as u64)
}

// === admin HTTP ===

fn admin_router(plant: Plant) -> axum::Router {
    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    use axum::routing::{get, post};
    use axum::Json;

    type Reply = (StatusCode, Json<serde_json::Value>);

    fn unknown(unit: u8) -> Reply {
        (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "error": format!("no unit {unit}") })),
        )
    }

    async fn units(State(plant): State<Plant>) -> Json<Vec<UnitStatus>> {
        Json(plant.status())
    }

    async fn flip(State(plant): State<Plant>, Path(unit): Path<u8>) -> Reply {
        match plant.flip_valve(unit) {
            Some(open) => {
                println!("unit {unit}: valve {} (admin API)", valve_word(open));
                (
                    StatusCode::OK,
                    Json(serde_json::json!({ "unit": unit, "valve_open": open })),
                )
            }
            None => unknown(unit),
        }
    }

    async fn set_silent(plant: Plant, unit: u8, silent: bool) -> Reply {
        if plant.unit(unit).is_none() {
            return unknown(unit);
        }
        plant.silence(unit, silent);
        println!(
            "unit {unit}: {} (admin API)",
            if silent { "silenced" } else { "answering again" }
        );
        (
            StatusCode::OK,
            Json(serde_json::json!({ "unit": unit, "silenced": silent })),
        )
    }

    async fn fault(State(plant): State<Plant>, Path(unit): Path<u8>) -> Reply {
        if !plant.fault_valve(unit) {
            return unknown(unit);
        }
        println!("unit {unit}: valve reports 故障 (admin API)");
        (
            StatusCode::OK,
            Json(serde_json::json!({ "unit": unit, "valve_status": VALVE_FAULT })),
        )
    }

    fn bad(what: &str) -> Reply {
        (StatusCode::BAD_REQUEST, Json(serde_json::json!({ "error": what })))
    }

    async fn battery(State(plant): State<Plant>, Path((unit, volts)): Path<(u8, String)>) -> Reply {
        let Some(raw) = hundredths(&volts).and_then(|r| u16::try_from(r).ok()) else {
            return bad("volts must be a number 0..655.35, e.g. 3.2");
        };
        if !plant.set_battery(unit, raw) {
            return unknown(unit);
        }
        println!("unit {unit}: 电池电压 {}.{:02} V (admin API)", raw / 100, raw % 100);
        (
            StatusCode::OK,
            Json(serde_json::json!({ "unit": unit, "battery_raw": raw })),
        )
    }

    async fn flow(State(plant): State<Plant>, Path((unit, m3)): Path<(u8, String)>) -> Reply {
        let Some(raw) = hundredths(&m3).and_then(|r| u32::try_from(r).ok()) else {
            return bad("m3 must be a positive number, e.g. 0.05");
        };
        match plant.add_flow(unit, raw) {
            Some(flow) => {
                println!("unit {unit}: 累计流量 +{m3} m³, valve not moved (admin API)");
                (
                    StatusCode::OK,
                    Json(serde_json::json!({ "unit": unit, "flow_raw": flow })),
                )
            }
            None => unknown(unit),
        }
    }

    #[derive(serde::Deserialize)]
    struct FlakyQuery {
        late_ms: Option<u64>,
        seed: Option<u64>,
    }

    async fn set_flaky(
        State(plant): State<Plant>,
        Path((unit, percent)): Path<(u8, String)>,
        axum::extract::Query(q): axum::extract::Query<FlakyQuery>,
    ) -> Reply {
        let Some(pct) = percent.parse::<f64>().ok().filter(|p| (0.0..=100.0).contains(p)) else {
            return bad("percent must be a number 0..100, e.g. 25");
        };
        if plant.unit(unit).is_none() {
            return unknown(unit);
        }
        let seed = q.seed.unwrap_or_else(rand::random);
        let late_ms = q.late_ms.unwrap_or(1000);
        plant.set_flaky(unit, (pct > 0.0).then(|| flaky(pct, late_ms, seed)));
        println!("unit {unit}: flaky {pct} %, late {late_ms} ms, seed {seed} (admin API)");
        (
            StatusCode::OK,
            Json(serde_json::json!({ "unit": unit, "flaky_percent": pct, "late_ms": late_ms, "seed": seed })),
        )
    }

    axum::Router::new()
        .route("/units", get(units))
        .route("/units/{unit}/flaky/{percent}", post(set_flaky))
        .route("/units/{unit}/flip", post(flip))
        .route("/units/{unit}/fault", post(fault))
        .route("/units/{unit}/battery/{volts}", post(battery))
        .route("/units/{unit}/flow/{m3}", post(flow))
        .route(
            "/units/{unit}/silence",
            post(|State(p): State<Plant>, Path(u): Path<u8>| set_silent(p, u, true)),
        )
        .route(
            "/units/{unit}/wake",
            post(|State(p): State<Plant>, Path(u): Path<u8>| set_silent(p, u, false)),
        )
        .with_state(plant)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standard_meter_has_the_documented_layout() {
        let u = Unit::meter(2);
        assert!(!u.coils[0]);
        assert_eq!(u.flow(), Some(21_234));
        assert_eq!(u.holding[2], 352);
    }

    #[test]
    fn a_flip_toggles_the_valve_and_adds_flow() {
        let p = Plant::with_meters(1);
        assert_eq!(p.flip_valve(1), Some(true));
        assert_eq!(p.flow(1), Some(11_234 + FLOW_PER_FLIP));
        assert_eq!(p.flip_valve(1), Some(false));
        assert_eq!(p.flip_valve(9), None);
    }

    #[test]
    fn a_fault_shows_in_the_status_register_until_the_next_flip() {
        let p = Plant::with_meters(1);
        assert_eq!(p.holding(1, VALVE_STATUS), Some(0));
        assert!(p.fault_valve(1));
        assert_eq!(p.holding(1, VALVE_STATUS), Some(VALVE_FAULT));
        assert_eq!(p.valve(1), Some(false), "the coil cannot hold a fault");
        assert_eq!(p.flip_valve(1), Some(true));
        assert_eq!(p.holding(1, VALVE_STATUS), Some(1));
        assert!(!p.fault_valve(9));
    }

    #[test]
    fn battery_and_flow_commands_script_the_readings() {
        let p = Plant::with_meters(3);
        assert_eq!(command(&p, "battery 2 3.2"), "unit 2: 电池电压 3.20 V");
        assert_eq!(p.holding(2, 2), Some(320));
        assert_eq!(
            command(&p, "flow 3 0.05"),
            "unit 3: 累计流量 312.39 m³ (+0.05, valve not moved)"
        );
        assert_eq!(p.valve(3), Some(false));
        assert_eq!(command(&p, "fault 1"), "unit 1: valve reports 故障 (fault)");
        assert!(command(&p, "status").contains("unit 1: valve 关闭 (closed), reports 故障"));
        assert!(command(&p, "battery 2 x").starts_with("error:"));
        assert!(command(&p, "flow 2 -1").starts_with("error:"));
        assert!(command(&p, "fault 9").starts_with("error: no unit 9"));
    }

    #[test]
    fn out_of_range_reads_are_exceptions_and_unknown_units_are_silent() {
        let p = Plant::with_meters(1);
        assert!(matches!(
            p.answer(1, Request::ReadHoldingRegisters(63, 2)),
            Answer::Now(Err(ExceptionCode::IllegalDataAddress))
        ));
        assert!(matches!(
            p.answer(1, Request::ReadHoldingRegisters(0, 0)),
            Answer::Now(Err(ExceptionCode::IllegalDataValue))
        ));
        assert!(matches!(p.answer(7, Request::ReadCoils(0, 1)), Answer::Silent));
        p.silence(1, true);
        assert!(matches!(p.answer(1, Request::ReadCoils(0, 1)), Answer::Silent));
    }

    #[test]
    fn faults_are_consumed_one_per_request() {
        let p = Plant::with_meters(1);
        p.inject(1, Fault::WrongCount);
        p.inject(1, Fault::Garbage);
        assert!(matches!(
            p.answer(1, Request::ReadHoldingRegisters(0, 3)),
            Answer::Now(Ok(Response::ReadHoldingRegisters(v))) if v.len() == 2
        ));
        assert!(matches!(p.answer(1, Request::ReadCoils(0, 1)), Answer::Garbled(Ok(_))));
        assert!(matches!(p.answer(1, Request::ReadCoils(0, 1)), Answer::Now(Ok(_))));
        assert_eq!(p.pending_faults(1), 0);
        assert_eq!(p.requests(1), 3);
    }

    /// The kind of each of `n` answers of `unit`: 'n' now, 'l' late (after `late`), 's' silent.
    fn pattern(p: &Plant, unit: u8, n: usize, late: Duration) -> String {
        (0..n)
            .map(|_| match p.answer(unit, Request::ReadHoldingRegisters(0, 4)) {
                Answer::Now(Ok(_)) => 'n',
                Answer::Late(d, 3, Ok(_)) if d == late => 'l',
                Answer::Silent => 's',
                _ => '?',
            })
            .collect()
    }

    #[test]
    fn a_flaky_unit_fails_a_share_of_requests_the_same_way_for_the_same_seed() {
        let late = Duration::from_millis(80);
        let flaky = Flaky {
            rate: 0.25,
            late: Some(late),
            seed: 7,
        };
        let (a, b) = (Plant::with_meters(2), Plant::with_meters(2));
        a.set_flaky(1, Some(flaky));
        b.set_flaky(1, Some(flaky));
        let pa = pattern(&a, 1, 400, late);
        assert_eq!(pa, pattern(&b, 1, 400, late), "same seed, same failures");
        let failed = pa.chars().filter(|c| *c != 'n').count();
        assert!((60..=140).contains(&failed), "about 25 % of 400: {failed}");
        assert!(pa.contains('l') && pa.contains('s') && !pa.contains('?'), "{pa}");
        assert_eq!(a.flaky_failures(1), failed as u64);
        assert_eq!(a.status()[0].flaky_percent, 25.0);
        // Other units, and the same unit once it is no longer flaky, answer every request.
        assert_eq!(pattern(&a, 2, 50, late), "n".repeat(50));
        a.set_flaky(1, None);
        assert_eq!(pattern(&a, 1, 50, late), "n".repeat(50));
        // A queued fault comes first; the draws go on underneath it.
        b.inject(1, Fault::WrongCount);
        assert!(matches!(
            b.answer(1, Request::ReadHoldingRegisters(0, 4)),
            Answer::Now(Ok(Response::ReadHoldingRegisters(v))) if v.len() == 3
        ));
    }

    #[test]
    fn the_flaky_command_sets_and_ends_the_fault() {
        let p = Plant::with_meters(2);
        assert_eq!(
            command(&p, "flaky 2 25 400 9"),
            "unit 2: fails 25 % of its requests at random (half answered 400 ms late, half not at all), seed 9"
        );
        assert!(command(&p, "status")
            .contains("unit 2: valve 关闭 (closed), 累计流量 212.34 m³, 电池电压 3.52 V, flaky 25 % (0 failed)"));
        assert_eq!(command(&p, "flaky 2 0"), "unit 2: answers every request again");
        assert_eq!(p.status()[1].flaky_percent, 0.0);
        assert!(command(&p, "flaky 2 101").starts_with("error:"));
        assert!(command(&p, "flaky 2 25 x").starts_with("error:"));
        assert!(command(&p, "flaky 9 25").starts_with("error: no unit 9"));
    }

    #[tokio::test]
    async fn the_admin_api_flips_silences_scripts_and_lists_units() {
        let plant = Plant::with_meters(2);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("bound");
        let app = admin_router(plant.clone());
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let http = reqwest::Client::new();
        let post = |path: &str| http.post(format!("http://{addr}{path}")).send();
        assert_eq!(post("/units/1/flip").await.expect("flip").status(), 200);
        assert_eq!(plant.valve(1), Some(true));
        assert_eq!(post("/units/2/silence").await.expect("silence").status(), 200);
        assert_eq!(post("/units/9/flip").await.expect("flip 9").status(), 404);
        assert_eq!(post("/units/x/flip").await.expect("flip x").status(), 400);
        let units: serde_json::Value = http
            .get(format!("http://{addr}/units"))
            .send()
            .await
            .expect("list")
            .json()
            .await
            .expect("json");
        assert_eq!(units[0]["valve_open"], true);
        assert_eq!(units[1]["silenced"], true);
        assert_eq!(post("/units/2/wake").await.expect("wake").status(), 200);
        assert!(!plant.status()[1].silenced);
        assert_eq!(post("/units/1/fault").await.expect("fault").status(), 200);
        assert_eq!(plant.status()[0].valve_status, VALVE_FAULT);
        assert_eq!(post("/units/2/battery/3.2").await.expect("battery").status(), 200);
        assert_eq!(plant.holding(2, 2), Some(320));
        assert_eq!(post("/units/2/battery/abc").await.expect("battery").status(), 400);
        let before = plant.flow(2).unwrap_or_default();
        assert_eq!(post("/units/2/flow/0.05").await.expect("flow").status(), 200);
        assert_eq!(plant.flow(2), Some(before + 5));
        assert_eq!(post("/units/9/fault").await.expect("fault 9").status(), 404);
        assert_eq!(
            post("/units/1/flaky/25?late_ms=100&seed=3")
                .await
                .expect("flaky")
                .status(),
            200
        );
        assert_eq!(plant.status()[0].flaky_percent, 25.0);
        assert_eq!(post("/units/1/flaky/abc").await.expect("flaky abc").status(), 400);
        assert_eq!(post("/units/1/flaky/0").await.expect("flaky off").status(), 200);
        assert_eq!(plant.status()[0].flaky_percent, 0.0);
        server.abort();
    }

    #[test]
    fn pacing_at_9600_baud_takes_ten_bits_a_character() {
        let p = Pace::baud(9600).unwrap();
        assert!(
            (p.wire(96).as_secs_f64() - 0.1).abs() < 1e-6,
            "96 characters of 10 bits at 9600 bit/s are 100 ms"
        );
        assert!((p.gap().as_secs_f64() - 0.003_645_8).abs() < 1e-6);
        assert_eq!(Pace::baud(0), None);
    }

    #[test]
    fn rtu_frames_carry_the_modbus_crc() {
        // The read request 01 03 00 00 00 0A has CRC C5 CD (low byte first), as in the serial line spec.
        assert_eq!(crc16(&[0x01, 0x03, 0x00, 0x00, 0x00, 0x0A]).to_le_bytes(), [0xC5, 0xCD]);
        let f = rtu_frame(1, 3, &Ok(Response::ReadHoldingRegisters(vec![0x1234]))).expect("a read answer");
        assert_eq!(f[..5], [1, 3, 2, 0x12, 0x34]);
        assert_eq!(crc16(&f), 0, "a frame with its CRC checks to zero");
        let f = rtu_frame(2, 1, &Ok(Response::ReadCoils(vec![true, false, true]))).expect("a read answer");
        assert_eq!(f[..4], [2, 1, 1, 0b101]);
        let f = rtu_frame(2, 4, &Err(ExceptionCode::IllegalDataAddress)).expect("an exception");
        assert_eq!(f[..3], [2, 0x84, 2]);
    }

    #[test]
    fn commands_say_what_they_did_and_refuse_bad_input() {
        let p = Plant::with_meters(2);
        assert_eq!(command(&p, "flip 1"), "unit 1: valve 开启 (open)");
        assert_eq!(command(&p, "set 2 holding 2 999"), "unit 2: holding 2 = 999");
        assert_eq!(p.holding(2, 2), Some(999));
        assert!(command(&p, "flip 9").starts_with("error: no unit 9"));
        assert!(command(&p, "set 1 holding 9999 1").starts_with("error:"));
        assert!(command(&p, "set 1 holding").starts_with("error:"));
        assert!(command(&p, "frobnicate").starts_with("error: unknown command"));
        assert!(command(&p, "status").contains("unit 2: valve 关闭 (closed), 累计流量 212.34 m³, 电池电压 9.99 V"));
    }
}

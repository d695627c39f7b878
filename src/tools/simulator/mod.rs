//! A Modbus slave simulator: a [`Plant`] of units (simulated meters) served over Modbus TCP, RTU over TCP,
//! or RTU on a serial device, with fault injection. Used by `fieldgate simulate` (commissioning without
//! hardware), the demo, and the integration tests.
//!
//! Owns: the simulated register tables, the tokio-modbus `Service` that answers from them, the transports
//! it serves on, and the user-facing `simulate` command with its small admin HTTP API and stdin commands.
//! Never: uses the gateway's own code (it is the far end of the wire, built on tokio-modbus's server
//! side only), or holds the plant's lock (a std `Mutex`, held only to read or change the tables) across
//! an await.
//!
//! Files:
//! - `mod.rs`: the [`Plant`], its units' tables and their status.
//! - `answer.rs`: one request against the plant: the tables' Modbus semantics, then the faults.
//! - `faults.rs`: the faults ([`Fault`], [`Flaky`], dead units) and how they are injected.
//! - `service.rs`: the tokio-modbus service of one connection and its fault-injecting transport wrapper.
//! - `serve.rs`: the transports: Modbus TCP, RTU over TCP and serial devices, through one simulated line.
//! - `command.rs`: `fieldgate simulate` and its stdin commands.
//! - `admin.rs`: its admin HTTP API.
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
//! Both work by wrapping the server's transport (`service.rs`).
//!
//! [`Plant::silence`] makes a unit dead: requests to it get no answer at all, like unknown units.
//!
//! [`Plant::set_flaky`] makes a unit fail a share of its requests at random ([`Flaky`]): each failing
//! request is answered late (after [`Flaky::late`]) or not at all, half and half. The draws come from a
//! random generator seeded per unit, one pair of draws per request, so the same seed and the same
//! sequence of requests fail the same requests again (a failing test can be rerun with its seed).
//!
//! # RTU: one simulated line
//!
//! Every RTU transport ([`serve_rtu`], [`serve_rtu_path`], [`serve_rtu_over_tcp`]) goes through one
//! simulated RS-485 line that outlives reopened ports and reconnected clients, so a late answer arrives
//! after a reopen, as on real hardware (see `serve.rs`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

mod admin;
mod answer;
mod command;
mod faults;
mod serve;
mod service;

pub(crate) use command::{simulate_main, SimulateArgs};
pub use faults::{Fault, Flaky};
pub use serve::{serve_rtu, serve_rtu_over_tcp, serve_rtu_path, serve_tcp};

/// Items per table of a standard simulated unit.
const UNIT_SIZE: usize = 64;

/// Raw 累计流量 added by every valve flip (1.23 m³ at scale 0.01).
pub const FLOW_PER_FLIP: u32 = 123;

/// Holding register of the valve status (0 = 关闭, 1 = 开启, 2 = 故障).
const VALVE_STATUS: u16 = 3;

/// The valve status value of a fault.
const VALVE_FAULT: u16 = 2;

/// The four tables of one unit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Unit {
    /// Coils (fc 1, 5, 15).
    coils: Vec<bool>,
    /// Discrete inputs (fc 2).
    discrete: Vec<bool>,
    /// Holding registers (fc 3, 6, 16).
    holding: Vec<u16>,
    /// Input registers (fc 4).
    input: Vec<u16>,
}

impl Unit {
    /// A standard simulated meter (see the module doc) for `unit`.
    fn meter(unit: u8) -> Unit {
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

/// One unit as shown by `status` and `GET /units`.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct UnitStatus {
    unit: u8,
    /// Coil 0.
    valve_open: bool,
    /// Holding 0–1, raw (×0.01 m³).
    flow_raw: u32,
    /// Holding 2, raw (×0.01 V).
    battery_raw: u16,
    /// Holding 3: 0 = closed, 1 = open, 2 = fault.
    valve_status: u16,
    /// Dead (no answers).
    silenced: bool,
    /// Faults still queued.
    pending_faults: usize,
    /// Requests seen for this unit.
    requests: u64,
    /// Share of the requests failed at random, in percent (0: not flaky).
    flaky_percent: f64,
    /// Requests failed at random so far (late or unanswered).
    flaky_failures: u64,
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

/// A shared, cloneable handle to the simulated units.
#[derive(Debug, Clone, Default)]
pub struct Plant {
    inner: Arc<Mutex<PlantState>>,
}

impl Plant {
    /// An empty plant (answers nothing).
    fn new() -> Plant {
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
    fn add_unit(&self, unit: u8, tables: Unit) {
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
    fn unit(&self, unit: u8) -> Option<Unit> {
        self.lock().units.get(&unit).cloned()
    }

    /// Requests seen for `unit` (answered or not).
    pub fn requests(&self, unit: u8) -> u64 {
        self.lock().requests.get(&unit).copied().unwrap_or(0)
    }

    /// Every unit's status, by unit id.
    fn status(&self) -> Vec<UnitStatus> {
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
}

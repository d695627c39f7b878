//! fieldgate: an edge gateway for water pump stations.
//!
//! It polls valves and water meters over Modbus (RTU on serial lines, Modbus TCP, RTU over TCP),
//! notices when a valve opens, closes or faults, when a meter goes offline, when a reading crosses a
//! limit and when water flows through a shut valve, fills in the customer from the site's mapping file, keeps
//! each such event in a crash-safe outbox, and delivers it to the Panda WorkFlow API as a work order.
//!
//! # Layout, in the order data flows
//! - [`config`]: the site TOML and the meter → customer mapping, validated into [`config::Config`]; every
//!   error located; the points and rules as configured.
//! - [`modbus`]: the field side: one task per bus polls its meters and sends one cycle per round.
//! - [`events`]: the pure rules (valve transitions, `[[event]]` rules) and the work orders they produce.
//! - [`store`]: the sled state database: meter states, the outbox, dead letters, entries set aside; commit
//!   + fsync; the disk's faults.
//! - [`recorder`]: applies each cycle to the stored states and commits what fires, then wakes the sender.
//! - [`delivery`]: the Panda WorkFlow client and the sender loop (ack only on `code: 0`).
//! - [`ops`]: the admin API, health, metrics, systemd notification and watchdog.
//! - [`app`]: the daemon's wiring and its shutdown order.
//! - [`cli`]: the command line and its clients of the admin API.
//! - [`tools`]: the simulator, the mock Panda server and the demo.
//!
//! Shared by every layer: [`clock`] (the wall clock only labels; durations come from monotonic clocks)
//! and [`backoff`] (exponential backoff with full jitter).
//!
//! Imports run one way: a folder uses the folders above it in this list, never one below.
// One exception, read-only `adjtimex` in `clock` (no safe wrapper exists), allowed where it stands.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod backoff;
pub mod clock;

pub mod app;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod events;
pub mod modbus;
pub mod ops;
pub mod recorder;
pub mod store;
pub mod tools;

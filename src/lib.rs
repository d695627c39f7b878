//! fieldgate: an edge gateway for water pump stations.
//!
//! It polls valves and water meters over Modbus (RTU on serial lines, Modbus TCP, RTU over TCP),
//! notices when a valve opens, closes or faults, when a meter goes offline, when a reading crosses a
//! limit and when water flows through a shut valve, fills in the customer from the site's mapping file, keeps
//! each such event in a crash-safe outbox, and delivers it to the Panda WorkFlow API as a work order.
//!
//! # Layout
//! - [`config`]: the site TOML, validated into [`config::Config`]; every error located.
//! - [`mapping`]: the meter → customer CSV (UTF-8, BOM, GB18030).
//! - [`point`]: where a value sits in a Modbus table and how registers decode and render.
//! - [`detect`]: the pure rules: valve transitions (baseline, debounce) and the `[[event]]` rules
//!   (link `for`, thresholds with hysteresis, `rises_by`), each with its persisted memory.
//! - [`record`]: a queued work order and its BizData.
//! - [`outbox`]: the sled store: states, outbox, dead letters; commit + fsync.
//! - [`app`]: wiring of the daemon and its shutdown order.
//! - [`cli`]: the command line (`run`, `check`, `demo`, `simulate`, `mock-panda`).
//! - [`demo`]: `fieldgate demo`, the whole product in one process.
//! - [`station`]: applies poll cycles to the store and wakes the sender.
//! - [`panda`]: the Panda WorkFlow client: token, PostFlowNodeData, classification of every answer.
//! - [`sender`]: the delivery loop: outbox batch → Panda → ack on `code: 0`; jittered backoff; counters.
//! - [`mock_panda`]: a strict in-process Panda server for tests, the demo and `fieldgate mock-panda`,
//!   with fault injection.
//! - [`admin`]: the admin HTTP API: health, outbox, dead letters, requeue.
//! - [`outbox_cli`]: `fieldgate outbox dead|requeue`, on a stopped state dir or through the admin API.
//! - [`bus`]: one task per bus: read plan, Modbus polling with timeouts and recovery, offline meters.
//! - [`simulator`]: simulated Modbus meters with fault injection (`fieldgate simulate`, demo, tests).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod app;
pub mod bus;
pub mod cli;
pub mod config;
pub mod demo;
pub mod detect;
pub mod mapping;
pub mod mock_panda;
pub mod outbox;
pub mod outbox_cli;
pub mod panda;
pub mod point;
pub mod record;
pub mod sender;
pub mod simulator;
pub mod station;

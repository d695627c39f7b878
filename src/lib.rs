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
//! - [`outbox`]: the sled store: states, outbox, dead letters, entries set aside; commit + fsync; the
//!   disk's faults (free-space reserve, a failed store reopened by itself).
//! - [`clock`]: the two clocks: the wall clock only labels, durations come from monotonic clocks.
//! - [`backoff`]: exponential backoff with full jitter, for every retry loop.
//! - [`app`]: wiring of the daemon and its shutdown order.
//! - [`cli`]: the command line (`run`, `check`, `status`, `probe`, `outbox`, `demo`, `simulate`, `mock-panda`).
//! - [`demo`]: `fieldgate demo`, the whole product in one process.
//! - [`station`]: applies poll cycles to the store and wakes the sender.
//! - [`panda`]: the Panda WorkFlow client: token, PostFlowNodeData, classification of every answer.
//! - [`sender`]: the delivery loop: outbox batch → Panda → ack on `code: 0`; jittered backoff; counters.
//! - [`mock_panda`]: a strict in-process Panda server for tests, the demo and `fieldgate mock-panda`,
//!   with fault injection.
//! - [`admin`]: the admin HTTP API: health, metrics, buses, meters, outbox, dead letters, requeue.
//! - [`metrics`]: `GET /metrics`, the Prometheus text format, written by hand.
//! - [`outbox_cli`]: `fieldgate outbox stats|list|dead|corrupt|requeue`, on a stopped state dir or through the admin API.
//! - [`admin_client`]: the CLI's client of the admin API, and `[admin] listen` from a config file.
//! - [`probe`]: `fieldgate probe`, one read printed in every word and byte order, with advice on failure.
//! - [`status`]: `fieldgate status`, tables of the running daemon from its admin API.
//! - [`bus`]: one task per bus: read plan, Modbus polling with timeouts and recovery, offline meters.
//! - [`notify`]: the systemd notification protocol (READY, STOPPING, WATCHDOG) over `$NOTIFY_SOCKET`.
//! - [`watchdog`]: liveness of the bus tasks and the station; WATCHDOG=1 only while every bus makes
//!   progress and the station is not panicking again and again.
//! - [`simulator`]: simulated Modbus meters with fault injection (`fieldgate simulate`, demo, tests).
// One exception, read-only `adjtimex` in `clock` (no safe wrapper exists), allowed where it stands.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod admin_client;
pub mod app;
pub mod backoff;
pub mod bus;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod detect;
pub mod durable;
pub mod mapping;
pub mod metrics;
pub mod mock_panda;
pub mod notify;
pub mod outbox;
pub mod outbox_cli;
pub mod panda;
pub mod point;
pub mod probe;
pub mod record;
pub mod sender;
pub mod simulator;
pub mod station;
pub mod status;
pub mod stored_record;
pub mod watchdog;

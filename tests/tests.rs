//! The integration tests, compiled into one binary (see Cargo.toml `[[test]]`).

mod util;

/// `run_bus` against the in-process simulator over sockets and ptys (one test needs `socat`).
mod bus;
/// Config and mapping files: every error class, encodings, profiles; `fieldgate check`.
mod config;
/// `fieldgate run` killed with SIGKILL at random moments.
mod crash;
/// Simulator → gateway → mock Panda, in-process, over TCP and loopback HTTP.
mod e2e;
/// Event rules end to end: valve fault, link offline/online with `for`, thresholds, `rises_by`.
mod events;
/// The outbox against an in-memory model (proptest): no record lost, duplicated or reordered.
mod outbox_model;
/// The sender against the strict mock Panda over real HTTP, with a real sled outbox.
mod sender;

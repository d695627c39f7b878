//! The integration tests, compiled into one binary (see Cargo.toml `[[test]]`).

mod util;

/// Config and mapping files: every error class, encodings, profiles; `fieldgate check`.
mod config;
/// The sender against the strict mock Panda over real HTTP, with a real sled outbox.
mod sender;
/// Simulator → gateway → mock Panda, in-process, over TCP and loopback HTTP.
mod e2e;
/// `fieldgate run` killed with SIGKILL at random moments.
mod crash;
/// The outbox against an in-memory model (proptest): no record lost, duplicated or reordered.
mod outbox_model;

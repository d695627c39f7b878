//! Operating the running daemon: what an operator, systemd and Prometheus see.
//!
//! - [`admin`]: the admin HTTP API (loopback only unless `allow_remote`).
//! - [`metrics`]: `GET /metrics` in the Prometheus text format.
//! - [`notify`]: the systemd notification protocol.
//! - [`watchdog`]: liveness of the buses and the recorder, and the systemd watchdog that depends on it.
//!
//! Reads the data path's counters and views; changes nothing on it except an operator's requeue.

pub mod admin;
pub mod metrics;
pub mod notify;
pub mod watchdog;

//! Operating the running daemon: what an operator, systemd and Prometheus see.
//!
//! Reads the data path's counters and views through the daemon's own handles; changes nothing on it
//! except an operator's requeue. Never opens the state database itself, and never stops the gateway
//! (systemd does, when the watchdog's pings stop). The wire types are shared with the command line
//! ([`crate::cli`]), which imports [`api`] (and `health::outbox_counts` for a stopped daemon's
//! directory), never the server.
//!
//! Imports run one way: `api` ← `sources` ← `health` ← `metrics` ← `admin`; `watchdog` uses `api`,
//! `sources` and `notify`; `page` and `same_origin` are used by `admin` only.
//!
//! - [`api`]: the wire types of the admin API (the JSON answers and requests) and its listing bounds.
//! - [`sources`]: [`sources::AdminState`], the daemon's handles the views read, and `sources::HealthCheck`.
//! - [`health`]: the health rules: what is ok, degraded or critical, and why, in words.
//! - `metrics`: `GET /metrics` in the Prometheus text format.
//! - [`admin`]: the admin HTTP API: routes, handlers, the server (loopback only unless `allow_remote`).
//! - `page`: the status page (`GET /`: HTML, CSS and JS embedded, refreshing from the JSON routes).
//! - `same_origin`: what a state-changing request must show (JSON, same origin, loopback host).
//! - [`notify`]: the systemd notification protocol.
//! - [`watchdog`]: liveness of the buses and the recorder, and the systemd watchdog that depends on it.

pub mod admin;
pub mod api;
pub mod health;
pub(crate) mod metrics;
pub mod notify;
mod page;
mod same_origin;
pub mod sources;
pub mod watchdog;

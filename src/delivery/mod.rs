//! From the store's outbox to the Panda WorkFlow server.
//!
//! Owns the HTTP exchange with Panda and the loop that drains the outbox. Invariant: a record leaves the
//! outbox only when the server answered `code: 0` for it (or it was refused alone `dead_after` times and
//! moved to the dead letters), and what the sender writes about an answer is stored before anything more
//! is sent. Never follows a redirect, never logs the password or the token, never detects events.
//!
//! - [`panda`]: the client.
//!   - `panda/mod.rs`: [`panda::PandaClient`]: the URLs of both auth modes, PostFlowNodeData, reading a
//!     response (bounded, never redirected).
//!   - `panda/answer.rs`: what every answer means ([`panda::answer::DeliveryError`]), pure.
//!   - `panda/token.rs`: the token: single-flight GenerateToken, lifetime on the monotonic clock.
//! - [`sender`]: the delivery loop.
//!   - `sender/mod.rs`: [`sender::run_sender`], the rounds (a batch, split on a refusal), the backoff.
//!   - `sender/outcome.rs`: the acknowledgement and failure notes, stored before anything more is sent.
//!   - `sender/hold.rs`: the hold list of records refused alone, burial at `dead_after`.
//!   - `sender/stats.rs`: [`sender::stats::SenderStats`] and
//!     [`sender::stats::SenderSnapshot`].
//!   - `sender/failure_log.rs`: when a failure is logged.
//!   - `sender/recent.rs`: the last work orders delivered (bounded, in memory), for the status page.

pub mod panda;
pub mod sender;

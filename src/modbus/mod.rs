//! The field side: from a Modbus line to one [`cycle::Cycle`] per round.
//!
//! - [`point`]: decoding raw registers or bits into a number and its decimal string (pure).
//! - [`bus`]: one task per `[[bus]]`: read plan, connection and its recovery, offline meters, and
//!   `read_once` for `fieldgate probe`.
//! - [`cycle`]: what a round produces, handed to the recorder.
//!
//! Never touches the store and never decides an event: it reports what the meters said.

pub mod bus;
pub mod cycle;
pub mod point;

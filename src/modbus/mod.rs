//! The field side: from a Modbus line to one [`cycle::Cycle`] per round.
//!
//! Owns everything between the wire and the recorder: which requests read a meter, the connection and
//! its recovery, the rounds of each bus, and decoding. Invariant: a value is reported only if the
//! answer it came from was checked against its request (a wrong register value makes false or missed
//! work orders). Never touches the store and never decides an event: it reports what the meters said.
//!
//! Files, in the order a value travels:
//! - `plan`: the read planner: a meter's points merged into as few requests as the tables allow.
//! - `link`: the connection to a bus (TCP, RTU serial, RTU over TCP): opening it, one request with its
//!   timeout and answer checks, and when a connection is poisoned and reopened.
//! - `rs485`: the kernel's RS-485 mode of an on-board UART (`TIOCSRS485`), set by `link` on every open.
//! - `point`: decoding raw registers or bits into a number and its decimal string (pure).
//! - [`bus`]: the task of one `[[bus]]`: rounds, offline meters and their retry backoff.
//! - [`stats`]: the bus counters and each meter's answer times and late answers.
//! - [`cycle`]: what a round produces, handed to the recorder.
//! - [`probe`]: `read_once` for `fieldgate probe`, through the same link.
//! - `scan`: one try of one unit for `fieldgate scan` (answer, exception, late, garbage or silence) on a
//!   line kept open between tries, through the same link; the timeout from the wire time.

pub mod bus;
pub mod cycle;
pub(crate) mod link;
pub(crate) mod plan;
pub(crate) mod point;
pub mod probe;
pub(crate) mod rs485;
pub(crate) mod scan;
pub mod stats;

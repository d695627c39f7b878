//! Tools around the product, for commissioning, trying it out and testing: nothing here runs in a
//! gateway's daemon, and the daemon never uses them.
//!
//! Invariant: the simulator and the mock Panda stand for the far ends of the two wires (Modbus slaves,
//! the Panda server) and share no logic with the gateway (the mock only borrows a BizData key name to
//! print orders), so a test against them checks the gateway against the protocol, not against itself.
//!
//! - [`simulator`]: simulated Modbus meters with fault injection (`fieldgate simulate`): the plant of
//!   units, the service answering from it, its faults, the TCP / RTU-over-TCP / serial transports, the
//!   command with its stdin commands and admin API.
//! - [`mock_panda`]: a strict Panda WorkFlow server with fault injection (`fieldgate mock-panda`): its
//!   state, routes, faults, the strict checks of what a client sends, its replies, the command.
//! - `demo`: `fieldgate demo`, the whole product in one process (the simulator, the mock Panda and
//!   the real gateway).

pub(crate) mod demo;
pub mod mock_panda;
pub mod simulator;

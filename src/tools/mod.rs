//! Tools around the product, for commissioning, trying it out and testing: nothing here runs in a
//! gateway's daemon.
//!
//! - [`simulator`]: simulated Modbus meters with fault injection (`fieldgate simulate`).
//! - [`mock_panda`]: a strict Panda WorkFlow server with fault injection (`fieldgate mock-panda`).
//! - [`demo`]: `fieldgate demo`, the whole product in one process.

pub mod demo;
pub mod mock_panda;
pub mod simulator;

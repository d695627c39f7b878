//! From the outbox to the Panda WorkFlow server.
//!
//! - [`panda`]: the HTTP client (token, PostFlowNodeData) and the classification of every answer.
//! - [`sender`]: the loop that sends the oldest records, and acknowledges them only on `code: 0`.
//!
//! A record leaves the outbox only when the server answered `code: 0` for it, or an operator said so.

pub mod panda;
pub mod sender;

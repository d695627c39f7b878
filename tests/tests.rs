//! The integration tests, compiled into one binary.

/// `run_bus` against the in-process simulator over sockets and ptys (one test needs `socat`).
mod bus;

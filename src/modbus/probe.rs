//! One read for `fieldgate probe` (`read_once`): open the line, read one block, close it again.
//!
//! The read goes through the same `Link` as the bus task, so it opens, times out and checks an
//! answer exactly as polling does: an answer of the wrong length or function is an error, never data.
//! [`ProbeError`] says what failed in terms an engineer can act on. Never keeps the line open. It
//! cannot tell whether the daemon polls the same bus: the caller must not probe such a bus (a serial
//! port has one user; a TCP device may allow only one connection).

use std::sync::Arc;
use std::time::Duration;

use crate::config::point::Table;
use crate::config::Transport;
use crate::modbus::link::{close, open, Data, Failure, Link};
use crate::modbus::plan::Block;
use crate::modbus::stats::BusStats;

/// What [`read_once`] read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Readout {
    /// Coils or discrete inputs, one per address.
    Bits(Vec<bool>),
    /// Holding or input registers, one per address.
    Registers(Vec<u16>),
}

/// Why `read_once` failed; each variant carries what the engineer needs to act on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// The request itself is impossible (no I/O was done).
    #[error("cannot read {count} {table} item(s) from address {address}: {why}")]
    Range {
        /// The table asked.
        table: Table,
        /// First address.
        address: u16,
        /// Items asked.
        count: u16,
        /// What is wrong.
        why: String,
    },
    /// The port or connection cannot be opened.
    #[error("{message}")]
    Open {
        /// A bounded kind: `missing`, `permission`, `busy`, `serial`, `clear`, `rs485` (the port refused
        /// RS-485 mode), `refused`, `connect`, `connect_timeout`.
        kind: &'static str,
        /// What failed, in words.
        message: String,
    },
    /// The device answered with a Modbus exception.
    #[error("the device answered with exception {code:#04x} ({})", exception_name(*code))]
    Exception {
        /// The exception code.
        code: u8,
    },
    /// No answer within the timeout.
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// An answer that does not fit the request (length, function, undecodable bytes).
    #[error("bad answer: {0}")]
    Protocol(String),
    /// The transport failed after opening.
    #[error("transport error: {0}")]
    Transport(String),
}

impl ProbeError {
    /// A bounded label.
    pub(crate) fn error_code(&self) -> &'static str {
        match self {
            ProbeError::Range { .. } => "range",
            ProbeError::Open { .. } => "open",
            ProbeError::Exception { .. } => "exception",
            ProbeError::Timeout(_) => "timeout",
            ProbeError::Protocol(_) => "protocol",
            ProbeError::Transport(_) => "transport",
        }
    }
}

/// The name the Modbus application protocol gives an exception code.
pub(crate) fn exception_name(code: u8) -> &'static str {
    match code {
        0x01 => "illegal function",
        0x02 => "illegal data address",
        0x03 => "illegal data value",
        0x04 => "server device failure",
        0x05 => "acknowledge",
        0x06 => "server device busy",
        0x08 => "memory parity error",
        0x0A => "gateway path unavailable",
        0x0B => "gateway target device failed to respond",
        _ => "unknown exception",
    }
}

/// Read `count` items of `table` from `address` of `unit` once, with the same open, timeout and answer
/// checks as the bus task (an answer of the wrong length or function is an error, never data). Opens the
/// port or connection, reads, and closes it again. For commissioning (`fieldgate probe`): do not use it on
/// a bus the daemon is polling at the same time (a serial port has one user; a TCP device may allow
/// only one connection). Also returns the answer time (as defined in [`crate::modbus::stats`]).
pub(crate) async fn read_once(
    transport: &Transport,
    limit: Duration,
    unit: u8,
    table: Table,
    address: u16,
    count: u16,
) -> Result<(Readout, Duration), ProbeError> {
    let range = |why: String| ProbeError::Range {
        table,
        address,
        count,
        why,
    };
    if count == 0 || count > table.max_count() {
        return Err(range(format!("count must be 1..={} for {table}", table.max_count())));
    }
    if u32::from(address) + u32::from(count) > 65536 {
        return Err(range("the range passes address 65535".to_string()));
    }
    let ctx = open(transport, limit).await.map_err(|e| ProbeError::Open {
        kind: e.kind,
        message: e.message,
    })?;
    // One read, then the link is dropped: no frame gap or guard time is needed after it.
    let mut link = Link::with(
        "probe",
        transport,
        limit,
        Duration::ZERO,
        Duration::ZERO,
        Arc::new(BusStats::default()),
    );
    link.ctx = Some(ctx);
    let result = link.read(unit, Block { table, address, count }).await;
    let took = link.seen.answers.last().copied().unwrap_or_default();
    if let Some(ctx) = link.ctx.take() {
        close(ctx, transport).await;
    }
    match result {
        Ok(Data::Bits(bits)) => Ok((Readout::Bits(bits), took)),
        Ok(Data::Words(words)) => Ok((Readout::Registers(words), took)),
        Err(Failure::Exception(code)) => Err(ProbeError::Exception { code: u8::from(code) }),
        Err(Failure::Timeout) => Err(ProbeError::Timeout(limit)),
        Err(Failure::Protocol(why) | Failure::Decode(why)) => Err(ProbeError::Protocol(why)),
        Err(Failure::Transport(why)) => Err(ProbeError::Transport(why)),
        Err(Failure::BusDown(why)) => Err(ProbeError::Open {
            kind: "connect",
            message: why,
        }),
    }
}

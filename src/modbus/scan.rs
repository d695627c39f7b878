//! One try of one unit for `fieldgate scan`: a [`ScanLine`] is a line opened at one setting (a baud
//! rate, parity and stop bits on a serial port, or a TCP connection), kept open between tries, and
//! [`ScanLine::try_unit`] reads one item of one unit through the bus task's own [`Link`] and says what
//! came back ([`Heard`]): an answer, an exception, a late answer, garbage, silence, or a broken line.
//! [`Timing::auto`] chooses the timeout of a try from the wire time at the baud rate.
//!
//! Invariants:
//! - Opening, the timeout, the guard and the answer checks are the [`Link`]'s: one implementation for
//!   the bus task, `probe` and `scan`. After a timeout, garbage or a broken line the link has dropped its
//!   context (tokio-modbus never discards a late answer, `shared/notes/tokio-modbus.md` §0 rule 2),
//!   listened through the guard and closed the port; the next try reopens it (serial: and discards the
//!   kernel's input buffer). An answer or an exception keeps the line open.
//! - Garbage is told from silence by counting the bytes that come back ([`Counted`]): the RTU decoder
//!   swallows bytes with a bad CRC and then only times out, so without the count a wrong baud rate
//!   would look like an empty line.
//!
//! Never: decides what a scan tries next or gives up on (the command does, `cli/scan.rs`), prints,
//! or opens a line any other way than [`link::open_port`].

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_modbus::client::Context;

use crate::config::point::Table;
use crate::config::{frame_gap_for, Parity, Transport};
use crate::modbus::link::{self, close, Data, Failure, Link, Port};
use crate::modbus::plan::Block;
use crate::modbus::probe::{ProbeError, Readout};
use crate::modbus::stats::{BusStats, Seen};

/// Bytes of a one-item read request: unit, function, address (2), count (2), CRC (2).
const REQUEST_BYTES: u32 = 8;

/// Bytes of the longest answer to a one-item read: unit, function, byte count, one register (2), CRC
/// (2). One bit answers in 6 bytes, an exception in 5.
const ANSWER_BYTES: u32 = 7;

/// What a device may take between the end of a request and the start of its answer, with a USB
/// adapter's latency timer (16 ms on FTDI chips) and the scheduler. Meters answer in a few ms to a few
/// tens of ms; a slower one is still found, as late, within the guard (see [`Timing`]).
pub(crate) const TURNAROUND: Duration = Duration::from_millis(30);

/// The timeout of a try on Modbus TCP and RTU over TCP, where no baud rate is known: a network round
/// trip on a station's LAN is a few ms, and a device server's serial side at 9600 baud answers one
/// item in about 50 ms (the serial figure of [`Timing::auto`]).
pub(crate) const NETWORK_TIMEOUT: Duration = Duration::from_millis(100);

/// The frame gap on RTU over TCP, as a `[[bus]]` has it by default (the device server's baud rate is
/// unknown: t3.5 at 9600 baud, rounded).
const RTU_OVER_TCP_GAP: Duration = Duration::from_millis(4);

/// The timing of one try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timing {
    /// How long a try waits for an answer.
    pub(crate) timeout: Duration,
    /// RTU: after a timeout, the line stays silent this long, listening (an answer that comes then is
    /// a late one: the unit is there, but slow), before the port is reopened. Equal to the timeout, so
    /// a unit answering within twice the timeout is still found. Zero on Modbus TCP (a reconnect
    /// drops a late answer with the old connection).
    pub(crate) guard: Duration,
    /// RTU: silence after every answer (t3.5; tokio-modbus does not keep it).
    pub(crate) frame_gap: Duration,
}

impl Timing {
    /// The timing of a try on `transport`: on a serial line from the wire time at its baud rate
    /// ([`serial_timeout`]); on TCP [`NETWORK_TIMEOUT`]. `timeout` overrides the timeout (and so the
    /// guard).
    pub(crate) fn auto(transport: &Transport, timeout: Option<Duration>) -> Timing {
        let (auto, frame_gap) = match transport {
            Transport::Serial {
                baud,
                parity,
                data_bits,
                stop_bits,
                ..
            } => (
                serial_timeout(*baud, char_bits(*parity, *data_bits, *stop_bits)),
                frame_gap_for(*baud),
            ),
            Transport::RtuOverTcp(_) => (NETWORK_TIMEOUT, RTU_OVER_TCP_GAP),
            Transport::Tcp(_) => (NETWORK_TIMEOUT, Duration::ZERO),
        };
        let timeout = timeout.unwrap_or(auto);
        Timing {
            timeout,
            guard: if transport.is_rtu() { timeout } else { Duration::ZERO },
            frame_gap,
        }
    }

    /// What a try of an absent unit costs: the timeout, then the guard (the reopen after it takes
    /// tens of µs on a pty, a TCP connect on loopback a few hundred).
    pub(crate) fn absent_cost(&self) -> Duration {
        self.timeout + self.guard
    }
}

/// Bits of one character on the wire: start, data, parity (if any), stop. 8N1 is 10, 8E1 and 8N2 11.
pub(crate) fn char_bits(parity: Parity, data_bits: u8, stop_bits: u8) -> u32 {
    let parity = match parity {
        Parity::None => 0,
        Parity::Even | Parity::Odd => 1,
    };
    1 + u32::from(data_bits) + parity + u32::from(stop_bits)
}

/// The timeout of a one-item read at `baud` with characters of `char_bits`: the wire time of the
/// request and of the longest answer, the t3.5 gap the device waits for before it takes the request
/// as whole ([`frame_gap_for`]), and the device's [`TURNAROUND`]. At 9600 baud 8N1: 15 characters ×
/// 1.0417 ms = 15.625 ms, + 4.011 ms, + 30 ms = 49.6 ms.
pub(crate) fn serial_timeout(baud: u32, char_bits: u32) -> Duration {
    let chars = REQUEST_BYTES + ANSWER_BYTES;
    let wire = Duration::from_secs_f64(f64::from(chars * char_bits) / f64::from(baud.max(1)));
    wire + frame_gap_for(baud) + TURNAROUND
}

/// What one try of one unit heard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Heard {
    /// An answer that fits the request: the unit is there.
    Answer {
        /// What it read.
        readout: Readout,
        /// From sending the request to its decoded answer.
        took: Duration,
    },
    /// A Modbus exception: the unit is there (it understood the request).
    Exception {
        /// The exception code.
        code: u8,
        /// From sending the request to its decoded answer.
        took: Duration,
    },
    /// A valid answer after the timeout, within the guard (RTU only): the unit is there, but slow.
    Late {
        /// From sending the request to the answer.
        took: Duration,
    },
    /// Bytes came back, but no answer to this request: a bad CRC, undecodable bytes, another unit's
    /// frame, an answer of the wrong length. Every answer garbled is what a wrong baud rate, parity or
    /// framing looks like.
    Garbage {
        /// What was wrong, in words.
        why: String,
    },
    /// Nothing came back.
    Silent,
    /// The transport failed during the try (e.g. the connection was closed); the line is reopened.
    Broken {
        /// What failed, in words.
        why: String,
    },
}

/// A line opened at one setting for a scan, kept open between tries.
pub(crate) struct ScanLine {
    transport: Transport,
    timing: Timing,
    link: Link,
    /// Bytes read from the port since the last try began (see [`Counted`]).
    heard: Arc<AtomicU64>,
}

impl ScanLine {
    /// Open `transport` (a connect is bounded by the timeout).
    pub(crate) async fn open(transport: &Transport, timing: Timing) -> Result<ScanLine, ProbeError> {
        let heard = Arc::new(AtomicU64::new(0));
        let ctx = open_counted(transport, timing.timeout, &heard).await?;
        let mut link = Link::with(
            "scan",
            transport,
            timing.timeout,
            timing.frame_gap,
            timing.guard,
            Arc::new(BusStats::default()),
        );
        link.ctx = Some(ctx);
        Ok(ScanLine {
            transport: transport.clone(),
            timing,
            link,
            heard,
        })
    }

    /// Read one item of `table` at `address` from `unit` once and say what came back. An error only
    /// when the line, dropped after an earlier failure, cannot be opened again.
    pub(crate) async fn try_unit(&mut self, unit: u8, table: Table, address: u16) -> Result<Heard, ProbeError> {
        if self.link.ctx.is_none() {
            // Reopened here, counted, before the link would reopen it uncounted.
            self.link.ctx = Some(open_counted(&self.transport, self.timing.timeout, &self.heard).await?);
        }
        self.link.seen = Seen::default();
        self.heard.store(0, Ordering::Relaxed);
        let block = Block {
            table,
            address,
            count: 1,
        };
        let result = self.link.read(unit, block).await;
        let seen = std::mem::take(&mut self.link.seen);
        let took = seen.answers.last().copied().unwrap_or_default();
        let bytes = self.heard.load(Ordering::Relaxed);
        Ok(match result {
            Ok(Data::Words(words)) => Heard::Answer {
                readout: Readout::Registers(words),
                took,
            },
            Ok(Data::Bits(bits)) => Heard::Answer {
                readout: Readout::Bits(bits),
                took,
            },
            Err(Failure::Exception(code)) => Heard::Exception {
                code: u8::from(code),
                took,
            },
            Err(Failure::Timeout) => match seen.late {
                Some(took) => Heard::Late { took },
                None if bytes > 0 => Heard::Garbage {
                    why: format!("{bytes} byte(s) that make no valid answer (bad CRC or framing)"),
                },
                None => Heard::Silent,
            },
            Err(Failure::Protocol(why) | Failure::Decode(why)) => Heard::Garbage { why },
            Err(Failure::Transport(why)) => Heard::Broken { why },
            // The line was reopened above, so the link never finds it down; kept total all the same.
            Err(Failure::BusDown(why)) => Heard::Broken { why },
        })
    }

    /// Close the line (a serial port off the async workers, awaited: the port is free afterwards).
    pub(crate) async fn close(mut self) {
        if let Some(ctx) = self.link.ctx.take() {
            close(ctx, &self.transport).await;
        }
    }
}

/// Open the line with a byte counter on its input.
async fn open_counted(transport: &Transport, limit: Duration, heard: &Arc<AtomicU64>) -> Result<Context, ProbeError> {
    let port = link::open_port(transport, limit).await.map_err(|e| ProbeError::Open {
        kind: e.kind,
        message: e.message,
    })?;
    Ok(link::attach(
        transport,
        Counted {
            port,
            heard: Arc::clone(heard),
        },
    ))
}

/// A port that counts the bytes read from it (writes pass through). One type for both kinds of port,
/// so tokio-modbus's client is compiled once more for it, not once per kind (binary size: BENCHMARKS
/// row 7).
#[derive(Debug)]
struct Counted {
    port: Port,
    heard: Arc<AtomicU64>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = match &mut self.port {
            Port::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Port::Serial(s) => Pin::new(s).poll_read(cx, buf),
        };
        if let Poll::Ready(Ok(())) = polled {
            let n = buf.filled().len().saturating_sub(before);
            self.heard.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match &mut self.port {
            Port::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Port::Serial(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.port {
            Port::Tcp(s) => Pin::new(s).poll_flush(cx),
            Port::Serial(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.port {
            Port::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Port::Serial(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serial(baud: u32, parity: Parity, stop_bits: u8) -> Transport {
        Transport::Serial {
            path: "/dev/ttyUSB0".into(),
            baud,
            parity,
            data_bits: 8,
            stop_bits,
            rs485: None,
        }
    }

    fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1e3
    }

    #[test]
    fn characters_are_ten_bits_for_8n1_and_eleven_with_parity_or_two_stop_bits() {
        assert_eq!(char_bits(Parity::None, 8, 1), 10);
        assert_eq!(char_bits(Parity::Even, 8, 1), 11);
        assert_eq!(char_bits(Parity::Odd, 8, 1), 11);
        assert_eq!(char_bits(Parity::None, 8, 2), 11);
    }

    /// The arithmetic the README and `--help` give: at 9600 baud 8N1 the request (8 bytes) and the
    /// longest answer (7 bytes) are 15 characters of 10 bits = 15.625 ms on the wire; with t3.5
    /// (4.011 ms, 11-bit characters as the `[[bus]]` default) and 30 ms for the device a try waits
    /// 49.6 ms. An absent unit costs that and as long again listening for a late answer (99.3 ms), so
    /// 247 absent units take 24.5 s: well under a minute.
    #[test]
    fn a_full_scan_of_absent_units_at_9600_baud_takes_well_under_a_minute() {
        let t = Timing::auto(&serial(9600, Parity::None, 1), None);
        assert!((ms(t.timeout) - 49.636).abs() < 0.01, "{:?}", t.timeout);
        assert_eq!(t.guard, t.timeout);
        assert_eq!(t.frame_gap, Duration::from_micros(4011));
        let full = t.absent_cost() * 247;
        assert!((full.as_secs_f64() - 24.52).abs() < 0.01, "{full:?}");
        assert!(full < Duration::from_secs(30));
        // 8E1: 11-bit characters, 1.6 ms more.
        let even = Timing::auto(&serial(9600, Parity::Even, 1), None);
        assert!((ms(even.timeout) - 51.198).abs() < 0.01, "{:?}", even.timeout);
        assert!(even.absent_cost() * 247 < Duration::from_secs(30));
    }

    #[test]
    fn slower_lines_wait_longer_and_faster_ones_less() {
        // 1200 baud: 125 ms on the wire + 32.083 ms t3.5 + 30 ms.
        let slow = Timing::auto(&serial(1200, Parity::None, 1), None);
        assert!((ms(slow.timeout) - 187.083).abs() < 0.01, "{:?}", slow.timeout);
        // 115200 baud: 1.302 ms + 1.75 ms (fixed above 19200) + 30 ms.
        let fast = Timing::auto(&serial(115_200, Parity::None, 1), None);
        assert!((ms(fast.timeout) - 33.052).abs() < 0.01, "{:?}", fast.timeout);
    }

    #[test]
    fn tcp_has_one_fixed_timeout_and_no_guard_and_an_override_wins() {
        let tcp = Timing::auto(&Transport::Tcp("h:502".into()), None);
        assert_eq!(
            (tcp.timeout, tcp.guard, tcp.frame_gap),
            (NETWORK_TIMEOUT, Duration::ZERO, Duration::ZERO)
        );
        let rtu = Timing::auto(&Transport::RtuOverTcp("h:4001".into()), None);
        assert_eq!((rtu.timeout, rtu.guard), (NETWORK_TIMEOUT, NETWORK_TIMEOUT));
        let given = Timing::auto(&serial(9600, Parity::None, 1), Some(Duration::from_millis(500)));
        assert_eq!(
            (given.timeout, given.guard),
            (Duration::from_millis(500), Duration::from_millis(500))
        );
    }

    #[tokio::test]
    async fn a_try_tells_an_answer_an_exception_garbage_and_silence_apart_over_tcp() {
        use crate::tools::simulator::{serve_tcp, Fault, Plant};
        let plant = Plant::with_meters(2);
        plant.silence(2, true);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let _server = serve_tcp(listener, plant.clone());
        let transport = Transport::Tcp(addr);
        let mut line = ScanLine::open(&transport, Timing::auto(&transport, Some(Duration::from_millis(300))))
            .await
            .unwrap();
        let heard = line.try_unit(1, Table::Holding, 2).await.unwrap();
        assert!(
            matches!(&heard, Heard::Answer { readout: Readout::Registers(w), .. } if w == &[351]),
            "{heard:?}"
        );
        let heard = line.try_unit(1, Table::Holding, 100).await.unwrap();
        assert!(matches!(heard, Heard::Exception { code: 2, .. }), "{heard:?}");
        assert_eq!(line.try_unit(2, Table::Holding, 0).await.unwrap(), Heard::Silent);
        plant.inject(1, Fault::Garbage);
        let heard = line.try_unit(1, Table::Holding, 0).await.unwrap();
        assert!(matches!(heard, Heard::Garbage { .. }), "{heard:?}");
        // Reopened after the garbage: the next try is a clean answer.
        let heard = line.try_unit(1, Table::Coil, 0).await.unwrap();
        assert!(
            matches!(&heard, Heard::Answer { readout: Readout::Bits(b), .. } if b == &[false]),
            "{heard:?}"
        );
        line.close().await;
    }
}

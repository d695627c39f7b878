//! The link: one port or connection to a bus (Modbus TCP, RTU on a serial device, RTU over TCP), a
//! request with its timeout and answer checks, and the rules for when the connection is poisoned and
//! reopened. [`Link::read`] is the one way the bus task, `fieldgate probe` and `fieldgate scan` read a block.
//!
//! Invariants, because a silently wrong register value makes false or missed work orders
//! (`shared/notes/tokio-modbus.md` is the evidence for each):
//! - One request at a time, each (and each connect) under the link's `timeout`.
//! - Every answer is checked against its request: function, and exact item count. The typed tokio-modbus
//!   helpers are not used, because their `debug_assert!`s panic on a short answer in debug builds.
//! - After a timeout, a transport error, a header or length mismatch, or an undecodable answer, the
//!   context is *poisoned* (a late answer would become the next request's answer) and is dropped:
//!   TCP reconnects on next use; RTU (serial and over TCP) first stays silent for `guard`, then reopens
//!   (serial: and discards the kernel input buffer). An exception answer keeps the context.
//! - RTU waits `frame_gap` after every answer (tokio-modbus does not keep the 3.5-character gap).
//! - A failed open is retried with backoff, no sooner; an open that succeeds after failed ones tells
//!   the bus task (`came_up`) so it retries its offline meters at once.
//! - A serial bus with `rs485` gets the kernel's RS-485 mode right after every open (`rs485.rs`); a port
//!   that refuses it is a failed open, like a missing device.
//! - Opening, clearing and closing a serial port are blocking system calls (open, ioctl, termios; a USB
//!   adapter's driver talks to the adapter in them, and a tty close may wait for output to drain): they
//!   run in `spawn_blocking`, never on an async worker. TCP connects are asynchronous already.
//!
//! One timer serves every request's timeout (see [`Link::call`]) because a timer registered per
//! request was a measurable share of the poll rate of a busy bus.
//!
//! Never: panics on anything a device sends, retries a request on a poisoned context, or logs once per
//! request (state changes of the bus only).

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{sleep, sleep_until, timeout, Instant, Sleep};
use tokio_modbus::client::{rtu, tcp, Client as _, Context};
use tokio_modbus::prelude::{ExceptionCode, Request, Response, Slave, SlaveContext as _};
use tokio_serial::SerialPort as _;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::config::point::Table;
use crate::config::{BusConfig, Parity, Rs485, Transport};
use crate::modbus::plan::Block;
use crate::modbus::stats::{bump, BusStats, Seen};

/// Why a meter read failed. Only [`Failure::Exception`] and [`Failure::Decode`] leave the context in use.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Failure {
    /// The device answered with a Modbus exception (context still in sync).
    Exception(ExceptionCode),
    /// No answer within the timeout.
    Timeout,
    /// An answer that does not fit the request.
    Protocol(String),
    /// The transport failed.
    Transport(String),
    /// The port or connection cannot be opened (waiting for the next try).
    BusDown(String),
    /// The answer fitted, but a value cannot be a valve state (e.g. a fractional float).
    Decode(String),
}

impl Failure {
    /// A bounded name for logs.
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Failure::Exception(_) => "exception",
            Failure::Timeout => "timeout",
            Failure::Protocol(_) => "protocol",
            Failure::Transport(_) => "transport",
            Failure::BusDown(_) => "bus_down",
            Failure::Decode(_) => "decode",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Exception(code) => write!(f, "the device answered with exception {code:?}"),
            Failure::Timeout => f.write_str("no answer within the timeout"),
            Failure::Protocol(why) => write!(f, "bad answer: {why}"),
            Failure::Transport(why) => write!(f, "transport error: {why}"),
            Failure::BusDown(why) => write!(f, "bus not connected: {why}"),
            Failure::Decode(why) => write!(f, "value not usable: {why}"),
        }
    }
}

/// Why an open failed: a bounded kind (a change of kind is a state change worth a log line) and words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OpenError {
    pub(super) kind: &'static str,
    pub(super) message: String,
}

/// What a Modbus call returned, before the checks.
type CallResult = Result<Result<Response, ExceptionCode>, tokio_modbus::Error>;

/// What one block read returned.
pub(super) enum Data {
    Bits(Vec<bool>),
    Words(Vec<u16>),
}

/// The connection to a bus. `ctx` is `None` when closed or poisoned; it is reopened on next use.
pub(super) struct Link {
    name: String,
    transport: Transport,
    timeout: Duration,
    frame_gap: Duration,
    guard: Duration,
    pub(super) ctx: Option<Context>,
    /// The timer of the requests' timeouts, one per link: see [`Link::call`].
    timer: Option<Pin<Box<Sleep>>>,
    /// No open is tried before this instant (after a failed open).
    retry_at: Option<Instant>,
    backoff: Backoff,
    /// `None` before the first open; logs go out when this or the failure kind changes.
    up: Option<bool>,
    down_kind: Option<&'static str>,
    /// Set when an open succeeds after failed ones; the bus task then retries offline meters at once.
    pub(super) came_up: bool,
    stats: Arc<BusStats>,
    /// What the requests of the current meter read observed; the bus task takes it after each read.
    pub(super) seen: Seen,
    /// After a timeout on RTU: the end of the guard, counted from the timeout (the link listened for a
    /// late answer until then, or until one came).
    quiet_until: Option<Instant>,
}

/// How a call ended.
enum Called {
    /// Something came back within the timeout, after this long.
    Done(CallResult, Duration),
    /// Nothing within the timeout; `late`: an answer that came during the guard, after this long
    /// (counted from the request).
    TimedOut { late: Option<Duration> },
}

impl Link {
    pub(super) fn new(bus: &BusConfig, stats: Arc<BusStats>) -> Link {
        Link::with(&bus.name, &bus.transport, bus.timeout, bus.frame_gap, bus.guard, stats)
    }

    /// A link with explicit timings (`frame_gap` and `guard` apply to RTU only).
    pub(super) fn with(
        name: &str,
        transport: &Transport,
        timeout: Duration,
        frame_gap: Duration,
        guard: Duration,
        stats: Arc<BusStats>,
    ) -> Link {
        let rtu = transport.is_rtu();
        Link {
            name: name.to_string(),
            transport: transport.clone(),
            timeout,
            frame_gap: if rtu { frame_gap } else { Duration::ZERO },
            guard: if rtu { guard } else { Duration::ZERO },
            ctx: None,
            timer: None,
            retry_at: None,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
            up: None,
            down_kind: None,
            came_up: false,
            stats,
            seen: Seen::default(),
            quiet_until: None,
        }
    }

    /// The open context, opening it if needed and allowed by the backoff.
    async fn context(&mut self) -> Result<Context, Failure> {
        if let Some(ctx) = self.ctx.take() {
            return Ok(ctx);
        }
        if let Some(at) = self.retry_at {
            if Instant::now() < at {
                return Err(Failure::BusDown(self.down_kind.unwrap_or("closed").to_string()));
            }
        }
        match open(&self.transport, self.timeout).await {
            Ok(ctx) => {
                let n = self.stats.connects.fetch_add(1, Ordering::Relaxed);
                if n > 0 {
                    bump(&self.stats.reconnects);
                }
                self.stats.up.store(true, Ordering::Relaxed);
                self.stats.set_open_error(None);
                self.retry_at = None;
                self.backoff.reset();
                if self.up != Some(true) {
                    info!(message = "Bus connected.", bus = %self.name, endpoint = %self.transport.endpoint());
                }
                if self.up == Some(false) {
                    self.came_up = true;
                }
                self.up = Some(true);
                self.down_kind = None;
                Ok(ctx)
            }
            Err(e) => {
                bump(&self.stats.connect_failures);
                self.stats.up.store(false, Ordering::Relaxed);
                self.stats.set_open_error(Some(&e.message));
                let delay = self.backoff.next_delay();
                self.retry_at = Some(Instant::now() + delay);
                if self.up != Some(false) || self.down_kind != Some(e.kind) {
                    warn!(
                        message = "Bus cannot be opened; retrying with backoff.",
                        bus = %self.name,
                        endpoint = %self.transport.endpoint(),
                        reason = e.kind,
                        error = %e.message,
                    );
                }
                self.up = Some(false);
                self.down_kind = Some(e.kind);
                Err(Failure::BusDown(e.message))
            }
        }
    }

    /// Try to open a bus that is down when its backoff allows, so a bus whose meters are all offline
    /// notices a replugged adapter without waiting for `offline_retry`.
    pub(super) async fn probe(&mut self) {
        let due = self.retry_at.is_some_and(|at| Instant::now() >= at);
        if self.ctx.is_none() && self.up == Some(false) && due {
            if let Ok(ctx) = self.context().await {
                self.ctx = Some(ctx);
            }
        }
    }

    /// Drop a poisoned context; on RTU stay silent for `guard` first (counted from the timeout when
    /// [`Link::call`] already listened through part of it), so a late frame has arrived (and is
    /// discarded on reopen) before the next request goes out.
    async fn poison(&mut self, ctx: Context) {
        self.ctx = None;
        let quiet_until = self.quiet_until.take();
        if !self.guard.is_zero() {
            sleep_until(quiet_until.unwrap_or_else(|| Instant::now() + self.guard)).await;
        }
        close(ctx, &self.transport).await;
    }

    /// `ctx.call(request)`, given up after the link's `timeout`.
    ///
    /// Same result as `tokio::time::timeout`, but one timer serves every request of the link and is
    /// moved only when it fires: a request's deadline is always later than the timer's (deadlines
    /// only grow), so the timer firing early is the only case, and it is then moved to this request's
    /// deadline (why one timer: module doc).
    ///
    /// On RTU the call is not dropped at the timeout: the link stays silent for `guard` anyway, and
    /// listens meanwhile, so a late answer is seen and timed ([`Called::TimedOut`]); the guard still
    /// ends `guard` after the timeout ([`Link::poison`] waits for the rest of it).
    async fn call(&mut self, ctx: &mut Context, request: Request<'static>) -> Called {
        let sent = Instant::now();
        let deadline = sent + self.timeout;
        let listen_until = deadline + self.guard;
        let timer = self.timer.get_or_insert_with(|| Box::pin(sleep_until(deadline)));
        let mut call = ctx.call(request);
        let mut timed_out = false;
        loop {
            tokio::select! {
                biased;
                r = &mut call => {
                    let took = sent.elapsed();
                    if !timed_out {
                        return Called::Done(r, took);
                    }
                    // An exception is an answer too; an undecodable or mismatched frame is not.
                    return Called::TimedOut { late: r.is_ok().then_some(took) };
                }
                () = timer.as_mut() => {
                    let now = Instant::now();
                    if now < deadline {
                        timer.as_mut().reset(deadline);
                    } else if now < listen_until {
                        // Timed out; on RTU listen through the guard.
                        timed_out = true;
                        self.quiet_until = Some(listen_until);
                        timer.as_mut().reset(listen_until);
                    } else {
                        return Called::TimedOut { late: None };
                    }
                }
            }
        }
    }

    /// Read one block from `unit`: Ok only with exactly the items asked for.
    pub(super) async fn read(&mut self, unit: u8, block: Block) -> Result<Data, Failure> {
        let mut ctx = self.context().await?;
        ctx.set_slave(Slave(unit));
        let (a, n) = (block.address, block.count);
        let request = match block.table {
            Table::Coil => Request::ReadCoils(a, n),
            Table::Discrete => Request::ReadDiscreteInputs(a, n),
            Table::Holding => Request::ReadHoldingRegisters(a, n),
            Table::Input => Request::ReadInputRegisters(a, n),
        };
        bump(&self.stats.requests);
        self.quiet_until = None;
        let result = match self.call(&mut ctx, request).await {
            Called::Done(result, took) => {
                if result.is_ok() {
                    self.seen.answers.push(took);
                }
                Ok(result)
            }
            Called::TimedOut { late } => {
                self.seen.timeouts += 1;
                if late.is_some() {
                    self.seen.late = late;
                }
                Err(())
            }
        };
        let failure = match result {
            Ok(Ok(Ok(response))) => match check(block, response) {
                Ok(data) => {
                    bump(&self.stats.ok);
                    self.ctx = Some(ctx);
                    pause(self.frame_gap).await;
                    return Ok(data);
                }
                Err(why) => {
                    bump(&self.stats.protocol_errors);
                    Failure::Protocol(why)
                }
            },
            Ok(Ok(Err(code))) => {
                // The device answered: the context is in sync and stays.
                bump(&self.stats.exceptions);
                self.ctx = Some(ctx);
                pause(self.frame_gap).await;
                return Err(Failure::Exception(code));
            }
            Ok(Err(tokio_modbus::Error::Protocol(e))) => {
                bump(&self.stats.protocol_errors);
                Failure::Protocol(e.to_string())
            }
            // For the counters only: the codec reports undecodable bytes as these kinds. Recovery does
            // not depend on the kind (notes §0 rule 9): every outer error poisons.
            Ok(Err(tokio_modbus::Error::Transport(e)))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
                ) =>
            {
                bump(&self.stats.protocol_errors);
                Failure::Protocol(format!("undecodable answer: {e}"))
            }
            Ok(Err(tokio_modbus::Error::Transport(e))) => {
                bump(&self.stats.transport_errors);
                Failure::Transport(e.to_string())
            }
            Err(()) => {
                bump(&self.stats.timeouts);
                Failure::Timeout
            }
        };
        self.poison(ctx).await;
        Err(failure)
    }
}

/// Sleep unless zero. (A free function: a `&Link` held across an await would make the task `!Send`.)
async fn pause(d: Duration) {
    if !d.is_zero() {
        sleep(d).await;
    }
}

/// Open the bus's port or connection (a connect is bounded by `limit`).
///
/// A free function, so no `&Link` (which holds a non-`Sync` context) lives across its awaits.
pub(super) async fn open(transport: &Transport, limit: Duration) -> Result<Context, OpenError> {
    Ok(match open_port(transport, limit).await? {
        Port::Tcp(stream) => attach(transport, stream),
        Port::Serial(port) => attach(transport, port),
    })
}

/// An opened port or connection, before the Modbus framing is put on it (`fieldgate scan` wraps it
/// to count the bytes that come back, so that garbage is told from silence).
#[derive(Debug)]
pub(super) enum Port {
    Tcp(tokio::net::TcpStream),
    Serial(tokio_serial::SerialStream),
}

/// Put the transport's framing on an opened port: Modbus TCP, or RTU (serial and RTU over TCP).
pub(super) fn attach<T>(transport: &Transport, stream: T) -> Context
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + std::fmt::Debug + Unpin + Send + 'static,
{
    match transport {
        Transport::Tcp(_) => tcp::attach_slave(stream, Slave(1)),
        Transport::RtuOverTcp(_) | Transport::Serial { .. } => rtu::attach_slave(stream, Slave(1)),
    }
}

/// Open the port or connection of `transport` (a connect is bounded by `limit`); see [`open`].
pub(super) async fn open_port(transport: &Transport, limit: Duration) -> Result<Port, OpenError> {
    match transport {
        Transport::Tcp(addr) | Transport::RtuOverTcp(addr) => Ok(Port::Tcp(connect_tcp(addr, limit).await?)),
        Transport::Serial {
            path,
            baud,
            parity,
            data_bits,
            stop_bits,
            rs485,
        } => {
            let builder = tokio_serial::new(path.as_str(), *baud)
                .parity(match parity {
                    Parity::None => tokio_serial::Parity::None,
                    Parity::Even => tokio_serial::Parity::Even,
                    Parity::Odd => tokio_serial::Parity::Odd,
                })
                .data_bits(if *data_bits == 7 {
                    tokio_serial::DataBits::Seven
                } else {
                    tokio_serial::DataBits::Eight
                })
                .stop_bits(if *stop_bits == 2 {
                    tokio_serial::StopBits::Two
                } else {
                    tokio_serial::StopBits::One
                });
            let (owned, rs485) = (path.clone(), *rs485);
            // Blocking system calls: off the async workers (module doc). The blocking pool has the
            // runtime's context, so the stream registers with its reactor there.
            let port = tokio::task::spawn_blocking(move || open_serial(&builder, &owned, rs485.as_ref()))
                .await
                .map_err(|e| OpenError {
                    kind: "serial",
                    message: format!("opening {path} failed: {e}"),
                })??;
            Ok(Port::Serial(port))
        }
    }
}

/// Open a serial port, put it in RS-485 mode if the bus says so, and discard its input buffer.
/// Blocking: call it in `spawn_blocking`. A port that refuses RS-485 mode is a failed open (kind
/// `rs485`, retried with backoff like a missing device): on a real UART the bus would stay silent.
fn open_serial(
    builder: &tokio_serial::SerialPortBuilder,
    path: &str,
    rs485: Option<&Rs485>,
) -> Result<tokio_serial::SerialStream, OpenError> {
    let port = tokio_serial::SerialStream::open(builder).map_err(|e| serial_open_error(path, &e))?;
    if let Some(cfg) = rs485 {
        crate::modbus::rs485::apply(&port, path, cfg).map_err(|e| OpenError {
            kind: "rs485",
            message: e.to_string(),
        })?;
    }
    // Stale bytes survive close and reopen (notes §4.3): discard them before the first request.
    port.clear(tokio_serial::ClearBuffer::Input).map_err(|e| OpenError {
        kind: "clear",
        message: format!("cannot discard the input buffer of {path}: {e}"),
    })?;
    Ok(port)
}

/// Close a context. Closing a serial port is a blocking system call (a tty may wait for its output to
/// drain), so it runs in `spawn_blocking`, awaited: the port's exclusive lock is gone before any reopen.
pub(super) async fn close(ctx: Context, transport: &Transport) {
    if matches!(transport, Transport::Serial { .. }) {
        let _ = tokio::task::spawn_blocking(move || drop(ctx)).await;
    } else {
        drop(ctx);
    }
}

/// Connect a TCP stream (host names resolved) within `limit`.
async fn connect_tcp(addr: &str, limit: Duration) -> Result<tokio::net::TcpStream, OpenError> {
    match timeout(limit, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            // Requests are single small writes; never let Nagle hold one back.
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(OpenError {
            kind: match e.kind() {
                std::io::ErrorKind::ConnectionRefused => "refused",
                _ => "connect",
            },
            message: format!("cannot connect to {addr}: {e}"),
        }),
        Err(_) => Err(OpenError {
            kind: "connect_timeout",
            message: format!("no connection to {addr} within {}", humantime::format_duration(limit)),
        }),
    }
}

/// A serial open error in words an installer can act on.
fn serial_open_error(path: &str, e: &tokio_serial::Error) -> OpenError {
    use std::io::ErrorKind as Io;
    use tokio_serial::ErrorKind as K;
    match e.kind {
        K::Io(Io::NotFound) => OpenError {
            kind: "missing",
            message: format!(
                "serial device {path} does not exist: is the USB adapter plugged in? \
                 Configure a stable name from /dev/serial/by-id/ (ls -l /dev/serial/by-id/)"
            ),
        },
        K::Io(Io::PermissionDenied) => OpenError {
            kind: "permission",
            message: format!(
                "permission denied on {path}: add the fieldgate user to the dialout group \
                 (usermod -aG dialout fieldgate) and restart the service"
            ),
        },
        K::NoDevice => OpenError {
            kind: "busy",
            message: format!(
                "cannot use {path}: {} (another program may hold the port, or the device is gone)",
                e.description
            ),
        },
        _ => OpenError {
            kind: "serial",
            message: format!("cannot open {path}: {}", e.description),
        },
    }
}

/// Check an answer against its request; anything else is a protocol error (and poisons the context).
fn check(block: Block, response: Response) -> Result<Data, String> {
    let want = usize::from(block.count);
    match (block.table, response) {
        (Table::Coil, Response::ReadCoils(mut bits)) | (Table::Discrete, Response::ReadDiscreteInputs(mut bits)) => {
            // Bits come in whole bytes: exactly ceil(count / 8) bytes is right, anything else is not.
            if bits.len() >= want && bits.len() - want < 8 {
                bits.truncate(want);
                Ok(Data::Bits(bits))
            } else {
                Err(format!("{} bits for {want} asked", bits.len()))
            }
        }
        (Table::Holding, Response::ReadHoldingRegisters(words))
        | (Table::Input, Response::ReadInputRegisters(words)) => {
            if words.len() == want {
                Ok(Data::Words(words))
            } else {
                Err(format!("{} registers for {want} asked", words.len()))
            }
        }
        (table, other) => Err(format!("answer {other:?} to a {table} read")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(table: Table, address: u16, count: u16) -> Block {
        Block { table, address, count }
    }

    #[test]
    fn answers_of_the_wrong_length_or_kind_are_refused() {
        let b = block(Table::Holding, 0, 3);
        assert!(check(b, Response::ReadHoldingRegisters(vec![1, 2, 3])).is_ok());
        assert!(check(b, Response::ReadHoldingRegisters(vec![1, 2])).is_err());
        assert!(check(b, Response::ReadHoldingRegisters(vec![1, 2, 3, 4])).is_err());
        assert!(check(b, Response::ReadInputRegisters(vec![1, 2, 3])).is_err());
        let c = block(Table::Coil, 0, 3);
        assert!(matches!(check(c, Response::ReadCoils(vec![true; 8])), Ok(Data::Bits(v)) if v.len() == 3));
        assert!(check(c, Response::ReadCoils(vec![])).is_err());
        assert!(check(c, Response::ReadCoils(vec![true; 16])).is_err());
    }

    /// The link's one timer was armed by an earlier request: a later request must still get its whole
    /// timeout (the timer fires early, is moved, and only this request's deadline counts).
    #[tokio::test]
    async fn a_request_gets_its_whole_timeout_after_earlier_quick_ones() {
        let plant = crate::tools::simulator::Plant::with_meters(1);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let _server = crate::tools::simulator::serve_tcp(listener, plant.clone());
        let limit = Duration::from_millis(300);
        let mut link = Link::with(
            "t",
            &Transport::Tcp(addr),
            limit,
            Duration::ZERO,
            Duration::ZERO,
            Arc::new(BusStats::default()),
        );
        let coil = Block {
            table: Table::Coil,
            address: 0,
            count: 1,
        };
        // Quick answers for half a timeout: the timer now has a deadline half a timeout away.
        let first = std::time::Instant::now();
        let mut answered = 0;
        while first.elapsed() < limit / 2 {
            assert!(link.read(1, coil).await.is_ok(), "a live unit answers");
            answered += 1;
        }
        plant.silence(1, true);
        let start = std::time::Instant::now();
        let r = link.read(1, coil).await;
        let waited = start.elapsed();
        assert!(
            matches!(r, Err(Failure::Timeout)),
            "after {answered} answers: {:?}",
            r.err()
        );
        assert!(
            waited >= limit,
            "gave up after {waited:?}, before its own timeout of {limit:?}"
        );
        // And the link recovers: the unit answers again on a fresh connection.
        plant.silence(1, false);
        assert!(link.read(1, coil).await.is_ok());
    }
}

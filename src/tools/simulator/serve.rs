//! The transports the plant is served on: Modbus TCP, RTU over TCP and RTU on a serial device. Each
//! runs as a spawned task until its handle is aborted.
//!
//! # RTU: one simulated line
//!
//! The RTU server of tokio-modbus 0.17 takes a concrete `SerialStream` and cannot be wrapped, and its
//! `serve_forever` returns on the first undecodable request. So every RTU transport goes through a
//! simulated *line*: a persistent connection to an internal RTU-over-TCP frame server on `127.0.0.1:0`.
//! - A serial device ([`serve_rtu`], [`serve_rtu_path`]) is pumped to and from the line.
//! - RTU over TCP ([`serve_rtu_over_tcp`]) works like an RS-485 device server. Every client's bytes go to the
//!   one line, the newest client wins, and what the line sends goes to the client connected at that
//!   moment, or is lost when none is.
//!
//! The line outlives reopened ports and reconnected clients, so a late answer arrives after a reopen, as
//! on real hardware. That is what the gateway's guard time is for. A request the frame server cannot
//! decode only ends the internal connection, which is then reopened.
//!
//! Never: a failing device or client ends the server; errors are waited out and the device reopened.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_serial::SerialStream;
use tracing::{debug, info, warn};

use super::service::connection;
use super::Plant;

/// Serve the plant as Modbus TCP on `listener` until the handle is aborted; aborting also closes every
/// open connection (so a test can "restart" the server by binding the same address again).
pub fn serve_tcp(listener: TcpListener, plant: Plant) -> JoinHandle<()> {
    tokio::spawn(async move {
        let server = tokio_modbus::server::tcp::Server::new(listener);
        let on_connected = move |stream: TcpStream, _peer: SocketAddr| {
            let conn = connection(&plant, stream, false);
            async move { io::Result::Ok(Some(conn)) }
        };
        loop {
            if let Err(error) = server.serve(&on_connected, on_process_error).await {
                warn!(message = "Simulator stopped accepting; retrying.", %error);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    })
}

/// Serve the plant as Modbus RTU over TCP on `listener`, the way an RS-485 device server does: every
/// client's bytes go to one shared RTU line (the newest client wins), and what the line sends goes to the
/// client connected at that moment, or nowhere when none is. So a late answer reaches a client that
/// reconnected too soon, as on real hardware. Runs until the handle is aborted.
pub fn serve_rtu_over_tcp(listener: TcpListener, plant: Plant) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Some(mut line) = Line::start(plant).await else {
            return;
        };
        let mut client: Option<TcpStream> = None;
        let mut from_client = [0u8; 512];
        let mut from_line = [0u8; 512];
        loop {
            let conn = line.get().await;
            let event = match client.as_mut() {
                None => tokio::select! {
                    r = listener.accept() => Event::Accepted(r.map(|(s, _)| s)),
                    r = conn.read(&mut from_line) => Event::FromLine(r),
                },
                Some(c) => tokio::select! {
                    r = listener.accept() => Event::Accepted(r.map(|(s, _)| s)),
                    r = c.read(&mut from_client) => Event::FromDevice(r),
                    r = conn.read(&mut from_line) => Event::FromLine(r),
                },
            };
            match event {
                Event::Accepted(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    client = Some(s);
                }
                Event::Accepted(Err(error)) => {
                    debug!(message = "Simulator accept failed.", %error);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Event::FromDevice(Ok(0) | Err(_)) => client = None,
                Event::FromDevice(Ok(n)) => line.send(&from_client[..n]).await,
                Event::FromLine(Ok(0) | Err(_)) => line.reset(),
                Event::FromLine(Ok(n)) => {
                    // No client: the bytes are lost, as on a device server.
                    if let Some(c) = client.as_mut() {
                        if c.write_all(&from_line[..n]).await.is_err() {
                            client = None;
                        }
                    }
                }
            }
        }
    })
}

/// One of the inputs a bridge waits on.
enum Event<T> {
    Accepted(io::Result<T>),
    FromDevice(io::Result<usize>),
    FromLine(io::Result<usize>),
}

/// Serve the RTU frames on each connection to `listener` with the plant (tokio-modbus's RTU-over-TCP
/// server, transport wrapped in [`Garble`]). This is the simulated line's far end.
fn serve_rtu_frames(listener: TcpListener, plant: Plant) -> JoinHandle<()> {
    tokio::spawn(async move {
        let server = tokio_modbus::server::rtu_over_tcp::Server::new(listener);
        let on_connected = move |stream: TcpStream, _peer: SocketAddr| {
            let conn = connection(&plant, stream, true);
            async move { io::Result::Ok(Some(conn)) }
        };
        loop {
            if let Err(error) = server.serve(&on_connected, on_process_error).await {
                warn!(message = "Simulator stopped accepting; retrying.", %error);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    })
}

fn on_process_error(error: io::Error) {
    debug!(message = "Simulator connection ended.", %error);
}

/// Aborts a task when dropped, so aborting the outer task stops the inner one too.
pub(super) struct AbortOnDrop(pub(super) JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The simulated RS-485 line: one persistent connection to an internal RTU frame server on
/// `127.0.0.1:0`. It outlives the serial device or client on the other side, so an answer still in flight
/// arrives after a reopen, as on a real line. Reopened only when the frame server ends it (it does on a
/// request it cannot decode).
struct Line {
    addr: SocketAddr,
    conn: Option<TcpStream>,
    _server: AbortOnDrop,
}

impl Line {
    async fn start(plant: Plant) -> Option<Line> {
        let listener = match TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(error) => {
                warn!(message = "Simulator cannot bind its internal RTU line.", %error);
                return None;
            }
        };
        let addr = listener.local_addr().ok()?;
        Some(Line {
            addr,
            conn: None,
            _server: AbortOnDrop(serve_rtu_frames(listener, plant)),
        })
    }

    /// The connection, (re)connecting until it succeeds.
    async fn get(&mut self) -> &mut TcpStream {
        while self.conn.is_none() {
            match TcpStream::connect(self.addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    self.conn = Some(s);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        self.conn
            .get_or_insert_with(|| unreachable!("connected by the loop above"))
    }

    async fn send(&mut self, bytes: &[u8]) {
        if self.get().await.write_all(bytes).await.is_err() {
            self.reset();
        }
    }

    fn reset(&mut self) {
        self.conn = None;
    }
}

/// Serve the plant as Modbus RTU on an open serial stream (a real port, or one end of
/// `SerialStream::pair()`), until the handle is aborted. Errors on the stream are waited out, not fatal:
/// on a pty master they only mean that the other end is closed for the moment (a gateway reopening its
/// port). Use [`serve_rtu_path`] for a device that can go away and come back.
pub fn serve_rtu(stream: SerialStream, plant: Plant) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Some(mut line) = Line::start(plant).await else {
            return;
        };
        let mut stream = stream;
        loop {
            let error = pump(&mut stream, &mut line, None).await;
            debug!(message = "Simulator serial stream not usable; waiting.", %error);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// Serve the plant as Modbus RTU on the serial device at `path` (e.g. a `socat` pty link), reopening it
/// whenever it fails or is missing, until the handle is aborted.
pub fn serve_rtu_path(path: String, baud: u32, plant: Plant) -> JoinHandle<()> {
    serve_rtu_path_paced(path, baud, None, plant)
}

/// [`serve_rtu_path`], optionally pacing the bytes at the line rate of `pace` (see [`Pace`]).
pub(super) fn serve_rtu_path_paced(path: String, baud: u32, pace: Option<Pace>, plant: Plant) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Some(mut line) = Line::start(plant).await else {
            return;
        };
        let mut logged = false;
        loop {
            // Opening a tty is blocking system calls (open, ioctl, termios): off the async workers.
            let builder = tokio_serial::new(path.as_str(), baud);
            let opened = tokio::task::spawn_blocking(move || SerialStream::open(&builder))
                .await
                .unwrap_or_else(|e| {
                    Err(tokio_serial::Error::new(
                        tokio_serial::ErrorKind::Unknown,
                        e.to_string(),
                    ))
                });
            match opened {
                Ok(mut stream) => {
                    info!(message = "Simulator serial device open.", %path);
                    logged = false;
                    let error = pump(&mut stream, &mut line, pace).await;
                    info!(message = "Simulator serial device lost; reopening.", %path, %error);
                }
                Err(error) if !logged => {
                    logged = true;
                    warn!(message = "Simulator cannot open the serial device; retrying.", %path, %error);
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// Line-rate pacing for a serial device that has no baud rate of its own (a pty): bytes take their wire
/// time, 10 bits a character (8N1). A request is handed to the slave one wire time plus 3.5 characters
/// of silence (the end-of-frame gap a real slave waits for) after it arrived; an answer is written once
/// its last byte would have left the line. For benchmarks (`fieldgate simulate --pace-baud 9600`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Pace {
    /// Time of one character on the wire.
    char_time: Duration,
}

impl Pace {
    /// Pacing at `baud`, 8N1 (10 bits a character); `None` for 0.
    pub(super) fn baud(baud: u32) -> Option<Pace> {
        (baud > 0).then(|| Pace {
            char_time: Duration::from_secs_f64(10.0 / f64::from(baud)),
        })
    }

    /// The wire time of `n` characters.
    fn wire(&self, n: usize) -> Duration {
        self.char_time.mul_f64(n as f64)
    }

    /// 3.5 characters of silence.
    fn gap(&self) -> Duration {
        self.char_time.mul_f64(3.5)
    }
}

/// Wait until `deadline`: sleep most of it, then yield until it has passed. tokio's timer rounds up
/// to whole milliseconds, which would add up to 1 ms to every frame (4 % of a 9600-baud request).
async fn wait_until(deadline: std::time::Instant) {
    let now = std::time::Instant::now();
    if deadline > now + Duration::from_millis(2) {
        tokio::time::sleep(deadline - now - Duration::from_millis(1)).await;
    }
    while std::time::Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
}

/// Pump bytes between a serial stream and the line until the stream fails (the line stays).
async fn pump(serial: &mut SerialStream, line: &mut Line, pace: Option<Pace>) -> io::Error {
    let mut from_serial = [0u8; 512];
    let mut from_line = [0u8; 512];
    // When the simulated wire is next free (pacing only).
    let mut wire_free = std::time::Instant::now();
    loop {
        let conn = line.get().await;
        let event: Event<()> = tokio::select! {
            r = serial.read(&mut from_serial) => Event::FromDevice(r),
            r = conn.read(&mut from_line) => Event::FromLine(r),
        };
        match event {
            Event::FromDevice(Ok(0)) => return io::Error::new(io::ErrorKind::UnexpectedEof, "serial end of file"),
            Event::FromDevice(Err(e)) => return e,
            Event::FromDevice(Ok(n)) => {
                if let Some(p) = pace {
                    wire_free = wire_free.max(std::time::Instant::now()) + p.wire(n);
                    wait_until(wire_free + p.gap()).await;
                }
                line.send(&from_serial[..n]).await
            }
            Event::FromLine(Ok(0) | Err(_)) => line.reset(),
            Event::FromLine(Ok(n)) => {
                if let Some(p) = pace {
                    wire_free = wire_free.max(std::time::Instant::now()) + p.wire(n);
                    wait_until(wire_free).await;
                }
                if let Err(e) = serial.write_all(&from_line[..n]).await {
                    return e;
                }
            }
            Event::Accepted(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_at_9600_baud_takes_ten_bits_a_character() {
        let p = Pace::baud(9600).unwrap();
        assert!(
            (p.wire(96).as_secs_f64() - 0.1).abs() < 1e-6,
            "96 characters of 10 bits at 9600 bit/s are 100 ms"
        );
        assert!((p.gap().as_secs_f64() - 0.003_645_8).abs() < 1e-6);
        assert_eq!(Pace::baud(0), None);
    }
}

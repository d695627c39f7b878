//! The tokio-modbus service of one connection and its transport wrapper: the service answers from the
//! plant (`Plant::answer`) and carries out the faults that show on the wire: a late answer (a delayed
//! future on Modbus TCP, a timer writing an RTU frame on a line), garbage (the next frame written
//! replaced by zeros).
//!
//! Invariant: a late RTU frame is never interleaved with another frame on the wire. Never: decides an
//! answer itself.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_modbus::prelude::{ExceptionCode, Response, SlaveRequest};

use super::answer::Answer;
use super::Plant;

/// The tokio-modbus service of one connection: answers from the plant, arms its connection's [`Garble`].
#[derive(Clone)]
pub(super) struct PlantService {
    plant: Plant,
    garble: Arc<AtomicBool>,
    /// On an RTU line, late answers are written by a timer task (see [`Garble`]), so one slow unit does
    /// not hold up the others; `None` on Modbus TCP, where a late answer delays its connection.
    late: Option<Arc<LateFrames>>,
}

type AnswerFuture = Pin<Box<dyn Future<Output = Result<Option<Response>, ExceptionCode>> + Send>>;

impl tokio_modbus::server::Service for PlantService {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = AnswerFuture;

    fn call(&self, req: Self::Request) -> Self::Future {
        let SlaveRequest { slave, request } = req;
        let answer = self.plant.answer(slave, request);
        if let (Answer::Late(delay, fc, result), Some(late)) = (&answer, &self.late) {
            if let Some(frame) = rtu_frame(slave, *fc, result) {
                let (delay, late) = (*delay, Arc::clone(late));
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    late.push(frame);
                });
                return Box::pin(std::future::ready(Ok(None)));
            }
        }
        match answer {
            Answer::Silent => Box::pin(std::future::ready(Ok(None))),
            Answer::Now(r) => Box::pin(std::future::ready(r.map(Some))),
            Answer::Garbled(r) => {
                self.garble.store(true, Ordering::SeqCst);
                Box::pin(std::future::ready(r.map(Some)))
            }
            Answer::Late(delay, _, r) => Box::pin(async move {
                tokio::time::sleep(delay).await;
                r.map(Some)
            }),
        }
    }
}

/// RTU frames to be written onto the wire outside the server's request/answer cycle (late answers).
#[derive(Debug, Default)]
struct LateFrames {
    frames: Mutex<VecDeque<Vec<u8>>>,
    /// The connection task, parked in a read while the server waits for the next request.
    waker: Mutex<Option<Waker>>,
}

impl LateFrames {
    fn push(&self, frame: Vec<u8>) {
        self.frames.lock().unwrap_or_else(|e| e.into_inner()).push_back(frame);
        if let Some(w) = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            w.wake();
        }
    }

    fn pop(&self) -> Option<Vec<u8>> {
        self.frames.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
    }

    fn park(&self, waker: &Waker) {
        *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker.clone());
    }
}

/// A server transport wrapper for fault injection:
/// - when `armed`, the bytes of the next write (one whole answer frame: tokio-modbus writes a frame with
///   one buffer) are replaced by zero bytes of the same length ([`Fault::Garbage`](super::Fault::Garbage));
/// - late RTU frames are written whenever the server polls for its next request, which it always does
///   while idle ([`Fault::Late`](super::Fault::Late) on an RTU line).
pub(super) struct Garble<T> {
    inner: T,
    armed: Arc<AtomicBool>,
    /// Bytes of the current frame still to be replaced.
    garbling: usize,
    late: Arc<LateFrames>,
    /// A late frame being written.
    out: Vec<u8>,
}

impl<T> Garble<T> {
    /// Wrap `inner`; storing `true` in `armed` garbles the next frame written.
    fn new(inner: T, armed: Arc<AtomicBool>) -> Garble<T> {
        Garble {
            inner,
            armed,
            garbling: 0,
            late: Arc::default(),
            out: Vec::new(),
        }
    }
}

impl<T: AsyncWrite + Unpin> Garble<T> {
    /// Write queued late frames; `Ready(Ok)` once none is left half written.
    fn poll_late(&mut self, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.out.is_empty() {
                match self.late.pop() {
                    Some(frame) => self.out = frame,
                    None => return Poll::Ready(Ok(())),
                }
            }
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.drain(..n.min(self.out.len()));
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Garble<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        me.late.park(cx.waker());
        if let Poll::Ready(Err(e)) = me.poll_late(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Garble<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        // Never interleave: a late frame half written goes out first.
        std::task::ready!(me.poll_late(cx))?;
        if me.garbling == 0 && me.armed.swap(false, Ordering::SeqCst) {
            me.garbling = buf.len();
        }
        if me.garbling == 0 {
            return Pin::new(&mut me.inner).poll_write(cx, buf);
        }
        let n = me.garbling.min(buf.len());
        let zeros = vec![0u8; n];
        let written = std::task::ready!(Pin::new(&mut me.inner).poll_write(cx, &zeros))?;
        me.garbling -= written.min(me.garbling);
        Poll::Ready(Ok(written))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An RTU answer frame (address, PDU, CRC) for a read answer or an exception; `None` for other answers.
fn rtu_frame(slave: u8, fc: u8, result: &Result<Response, ExceptionCode>) -> Option<Vec<u8>> {
    let mut f = vec![slave];
    match result {
        Ok(Response::ReadCoils(bits) | Response::ReadDiscreteInputs(bits)) if fc != 0 => {
            let bytes: Vec<u8> = bits
                .chunks(8)
                .map(|c| c.iter().enumerate().fold(0u8, |b, (i, &on)| b | (u8::from(on) << i)))
                .collect();
            f.push(fc);
            f.push(u8::try_from(bytes.len()).ok()?);
            f.extend(bytes);
        }
        Ok(Response::ReadHoldingRegisters(words) | Response::ReadInputRegisters(words)) if fc != 0 => {
            f.push(fc);
            f.push(u8::try_from(words.len() * 2).ok()?);
            f.extend(words.iter().flat_map(|w| w.to_be_bytes()));
        }
        Err(code) if fc != 0 => {
            f.push(fc | 0x80);
            f.push(u8::from(*code));
        }
        _ => return None,
    }
    let crc = crc16(&f);
    f.extend(crc.to_le_bytes());
    Some(f)
}

/// CRC-16/MODBUS.
fn crc16(data: &[u8]) -> u16 {
    data.iter().fold(0xFFFF, |crc, &b| {
        (0..8).fold(
            crc ^ u16::from(b),
            |c, _| if c & 1 != 0 { (c >> 1) ^ 0xA001 } else { c >> 1 },
        )
    })
}

/// The service and wrapped transport of one connection; `rtu_line`: late answers do not block others.
pub(super) fn connection(plant: &Plant, stream: TcpStream, rtu_line: bool) -> (PlantService, Garble<TcpStream>) {
    let _ = stream.set_nodelay(true);
    let armed = Arc::new(AtomicBool::new(false));
    let transport = Garble::new(stream, Arc::clone(&armed));
    let service = PlantService {
        plant: plant.clone(),
        garble: armed,
        late: rtu_line.then(|| Arc::clone(&transport.late)),
    };
    (service, transport)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtu_frames_carry_the_modbus_crc() {
        // The read request 01 03 00 00 00 0A has CRC C5 CD (low byte first), as in the serial line spec.
        assert_eq!(crc16(&[0x01, 0x03, 0x00, 0x00, 0x00, 0x0A]).to_le_bytes(), [0xC5, 0xCD]);
        let f = rtu_frame(1, 3, &Ok(Response::ReadHoldingRegisters(vec![0x1234]))).expect("a read answer");
        assert_eq!(f[..5], [1, 3, 2, 0x12, 0x34]);
        assert_eq!(crc16(&f), 0, "a frame with its CRC checks to zero");
        let f = rtu_frame(2, 1, &Ok(Response::ReadCoils(vec![true, false, true]))).expect("a read answer");
        assert_eq!(f[..4], [2, 1, 1, 0b101]);
        let f = rtu_frame(2, 4, &Err(ExceptionCode::IllegalDataAddress)).expect("an exception");
        assert_eq!(f[..3], [2, 0x84, 2]);
    }
}

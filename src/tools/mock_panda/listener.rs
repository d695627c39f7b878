//! The mock Panda's listener: every connection it accepts fails on its next read or write once the mock
//! is stopped, or once that connection alone is killed ([`Fault::Reset`](super::Fault::Reset)), so
//! clients see reset connections as with a real server going down, keep-alive ones included.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// A TCP listener whose connections all fail once `stop` is cancelled, so that stopping the mock also
/// ends keep-alive connections that axum's per-connection tasks would otherwise keep serving.
pub(super) struct StoppableListener {
    pub(super) inner: TcpListener,
    pub(super) stop: CancellationToken,
}

impl axum::serve::Listener for StoppableListener {
    type Io = StoppableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    // Cancelled with the whole server, or alone by a Reset fault.
                    let kill = self.stop.child_token();
                    let stopped = Box::pin(kill.clone().cancelled_owned());
                    return (
                        StoppableStream {
                            inner: stream,
                            stopped,
                            kill,
                        },
                        addr,
                    );
                }
                // Out of file descriptors and the like: wait a little, as axum's own listener does.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection that errors on every read and write after the mock is stopped or the connection is
/// killed (the [`Fault::Reset`] fault).
pub(super) struct StoppableStream {
    inner: TcpStream,
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
    kill: CancellationToken,
}

/// What a handler knows of its connection: the switch that kills it.
#[derive(Clone)]
pub(super) struct Conn {
    pub(super) kill: CancellationToken,
}

impl Connected<axum::serve::IncomingStream<'_, StoppableListener>> for Conn {
    fn connect_info(stream: axum::serve::IncomingStream<'_, StoppableListener>) -> Conn {
        Conn {
            kill: stream.io().kill.clone(),
        }
    }
}

impl StoppableStream {
    fn stopped(&mut self, cx: &mut Context<'_>) -> bool {
        self.stopped.as_mut().poll(cx).is_ready()
    }
}

fn stopped_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "mock Panda stopped")
}

impl AsyncRead for StoppableStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.stopped(cx) {
            return Poll::Ready(Err(stopped_error()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for StoppableStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.stopped(cx) {
            return Poll::Ready(Err(stopped_error()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

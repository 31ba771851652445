//! A TCP listener that serves at most N connections at once: each accepted stream carries a
//! semaphore permit, released when the connection closes. Connections beyond N wait in the
//! kernel's accept queue, so many idle or slow clients cannot exhaust memory or descriptors.
//!
//! A connection on which nothing moves in either direction for the idle timeout, while the
//! server waits to read or to write, is closed: an idle keep-alive connection, a client that
//! never finishes its request, or one that stops reading its SSE stream. A healthy SSE stream
//! writes every second and is never idle.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Pause after a failed accept (e.g. out of descriptors) so the loop cannot spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

pub(crate) struct Limited {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    idle_timeout: Duration,
}

impl Limited {
    pub(crate) fn new(inner: TcpListener, max_connections: usize, idle_timeout: Duration) -> Self {
        assert!(max_connections > 0);
        Self {
            inner,
            permits: Arc::new(Semaphore::new(max_connections)),
            idle_timeout,
        }
    }
}

pub(crate) struct LimitedStream {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    idle_timeout: Duration,
    /// Fires `idle_timeout` after the last byte moved.
    idle: Pin<Box<Sleep>>,
}

impl LimitedStream {
    fn moved(&mut self) {
        let deadline = Instant::now() + self.idle_timeout;
        self.idle.as_mut().reset(deadline);
    }

    /// The inner operation is pending: fail it if the connection has been idle too long
    /// (the timer's waker is registered otherwise).
    fn check_idle<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match self.idle.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "web: connection idle too long",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl axum::serve::Listener for Limited {
    type Io = LimitedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let idle = Box::pin(tokio::time::sleep(self.idle_timeout));
                    return (
                        LimitedStream {
                            stream,
                            _permit: permit,
                            idle_timeout: self.idle_timeout,
                            idle,
                        },
                        addr,
                    );
                }
                Err(e) => {
                    tracing::debug!("web: accept failed: {e}");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Pending => self.check_idle(cx),
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.moved();
                }
                Poll::Ready(r)
            }
        }
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.stream).poll_write(cx, buf) {
            Poll::Pending => self.check_idle(cx),
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    self.moved();
                }
                Poll::Ready(r)
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.stream).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.check_idle(cx),
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    self.moved();
                }
                Poll::Ready(r)
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn idle_connections_are_closed_and_permits_bound_connections() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let mut limited = Limited::new(l, 1, Duration::from_millis(200));
            let mut c1 = TcpStream::connect(addr).await.unwrap();
            let (mut s1, _) = limited.accept().await;
            // Traffic keeps it alive.
            c1.write_all(b"ping").await.unwrap();
            let mut b = [0u8; 4];
            s1.read_exact(&mut b).await.unwrap();
            let last_activity = std::time::Instant::now();
            // The second connection waits for the first one's permit.
            let _c2 = TcpStream::connect(addr).await.unwrap();
            let second = tokio::time::timeout(Duration::from_millis(100), limited.accept()).await;
            assert!(second.is_err(), "only one connection at a time");
            // Nothing moves: the read fails after the idle timeout.
            let e = s1.read(&mut b).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::TimedOut);
            assert!(last_activity.elapsed() >= Duration::from_millis(190));
            drop(s1);
            let second = tokio::time::timeout(Duration::from_secs(5), limited.accept()).await;
            assert!(second.is_ok(), "the permit came back");
        });
    }
}

//! A TCP listener that bounds connections and keeps room for clients holding the token.
//!
//! - At most `max_connections` connections are served at once.
//! - A connection starts *unauthenticated* and becomes *authenticated* when a request on it
//!   presents a valid token ([`ConnHandle::authenticated`]). Unauthenticated connections may
//!   hold at most `max_unauthenticated` of the slots. When that share (or the whole table) is
//!   full, a new connection closes the **oldest** unauthenticated one instead of waiting. So
//!   idle or slow clients without a token can never lock a token holder out: they only push
//!   each other out, and a client that sends its request at once is served long before
//!   `max_unauthenticated` newer connections arrive. Waiting in the kernel's accept queue
//!   instead (the alternative) would let a few hundred idle sockets block everyone for as long
//!   as they stay open. Accepting waits only when every slot holds an authenticated connection.
//! - A connection on which nothing moves in either direction for the idle timeout, while the
//!   server waits to read or to write, is closed: a client that stops sending its body, or one
//!   that stops reading its SSE stream. A healthy SSE stream writes every second and is never
//!   idle. (The request head's deadline, which also ends an idle keep-alive connection, is
//!   hyper's `header_read_timeout`, see `serve_connection` in the crate root.)

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

/// Pause after a failed accept (e.g. out of descriptors) so the loop cannot spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// Connections closed to make room whose tasks have not yet let go of them. Accepting waits
/// beyond this, so descriptors stay bounded even if those tasks are slow to run.
const MAX_CLOSING: usize = 64;
/// At most one warning about closed unauthenticated connections per this interval.
const EVICTION_WARN_INTERVAL: Duration = Duration::from_secs(60);

/// How many connections, of which kind, and for how long.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) max_connections: usize,
    /// At most this many connections without a valid token (< `max_connections`).
    pub(crate) max_unauthenticated: usize,
    pub(crate) idle_timeout: Duration,
}

struct Shared {
    table: Mutex<Table>,
    /// A connection went away.
    closed: Notify,
}

struct Table {
    next_id: u64,
    /// Streams not yet dropped, including those being closed.
    open: usize,
    /// Streams told to close that have not been dropped yet.
    closing: usize,
    /// Unauthenticated connections by age (ids grow).
    unauthenticated: BTreeMap<u64, Arc<Slot>>,
    evicted_since_warning: u64,
    last_warning: Option<Instant>,
}

/// One connection's entry; shared by its stream and its requests.
pub(crate) struct Slot {
    id: u64,
    shared: Weak<Shared>,
    /// Set once, under the table's lock.
    authenticated: AtomicBool,
    /// Set once, under the table's lock; the stream's reads and writes fail from then on.
    evicted: AtomicBool,
    /// The tasks to wake when the connection is evicted.
    wakers: Mutex<[Option<Waker>; 2]>,
}

const READ: usize = 0;
const WRITE: usize = 1;

impl Slot {
    fn register(&self, which: usize, waker: &Waker) {
        let mut w = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        match &mut w[which] {
            Some(old) if old.will_wake(waker) => {}
            slot => *slot = Some(waker.clone()),
        }
    }

    fn evict(&self) {
        self.evicted.store(true, Ordering::Release);
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|p| p.into_inner()));
        for w in wakers.into_iter().flatten() {
            w.wake();
        }
    }
}

/// A request's view of its connection (a request extension).
#[derive(Clone)]
pub(crate) struct ConnHandle(Arc<Slot>);

impl ConnHandle {
    /// A request on this connection presented a valid token: it no longer counts against the
    /// unauthenticated share and is never closed to make room.
    pub(crate) fn authenticated(&self) {
        let slot = &self.0;
        if slot.authenticated.load(Ordering::Acquire) {
            return;
        }
        let Some(shared) = slot.shared.upgrade() else {
            return;
        };
        let mut t = shared.table.lock().unwrap_or_else(|p| p.into_inner());
        if slot.evicted.load(Ordering::Acquire) {
            return;
        }
        slot.authenticated.store(true, Ordering::Release);
        t.unauthenticated.remove(&slot.id);
    }
}

pub(crate) struct Limited {
    inner: TcpListener,
    shared: Arc<Shared>,
    limits: Limits,
}

impl Limited {
    pub(crate) fn new(inner: TcpListener, limits: Limits) -> Self {
        assert!(
            limits.max_unauthenticated > 0 && limits.max_unauthenticated < limits.max_connections
        );
        Self {
            inner,
            shared: Arc::new(Shared {
                table: Mutex::new(Table {
                    next_id: 0,
                    open: 0,
                    closing: 0,
                    unauthenticated: BTreeMap::new(),
                    evicted_since_warning: 0,
                    last_warning: None,
                }),
                closed: Notify::new(),
            }),
            limits,
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.shared.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a new connection can be admitted (possibly by closing an unauthenticated one).
    fn has_room(&self) -> bool {
        let t = self.table();
        t.closing < MAX_CLOSING
            && (t.open - t.closing < self.limits.max_connections || !t.unauthenticated.is_empty())
    }

    /// The next connection, once there is room for it.
    pub(crate) async fn accept(&mut self) -> (LimitedStream, SocketAddr) {
        loop {
            loop {
                // `notify_one` keeps a permit when nobody waits: no wake-up is lost between
                // the check and the wait.
                if self.has_room() {
                    break;
                }
                self.shared.closed.notified().await;
            }
            let (stream, addr) = match self.inner.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!("web: accept failed: {e}");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let mut t = self.table();
            let full = t.open - t.closing >= self.limits.max_connections
                || t.unauthenticated.len() >= self.limits.max_unauthenticated;
            if full {
                match t.unauthenticated.pop_first() {
                    Some((_, oldest)) => {
                        t.closing += 1;
                        oldest.evict();
                        t.evicted_since_warning += 1;
                        let now = Instant::now();
                        if t.last_warning
                            .is_none_or(|w| now.duration_since(w) >= EVICTION_WARN_INTERVAL)
                        {
                            tracing::warn!(
                                "web: {} connection(s) without a valid token closed to admit newer ones ({} at most at once)",
                                t.evicted_since_warning,
                                self.limits.max_unauthenticated
                            );
                            t.last_warning = Some(now);
                            t.evicted_since_warning = 0;
                        }
                    }
                    // Every slot became authenticated while we accepted: refuse this one.
                    None => continue,
                }
            }
            let id = t.next_id;
            t.next_id += 1;
            t.open += 1;
            let slot = Arc::new(Slot {
                id,
                shared: Arc::downgrade(&self.shared),
                authenticated: AtomicBool::new(false),
                evicted: AtomicBool::new(false),
                wakers: Mutex::new([None, None]),
            });
            t.unauthenticated.insert(id, slot.clone());
            drop(t);
            let idle = Box::pin(tokio::time::sleep(self.limits.idle_timeout));
            return (
                LimitedStream {
                    stream,
                    slot,
                    idle_timeout: self.limits.idle_timeout,
                    idle,
                },
                addr,
            );
        }
    }
}

pub(crate) struct LimitedStream {
    stream: TcpStream,
    slot: Arc<Slot>,
    idle_timeout: Duration,
    /// Fires `idle_timeout` after the last byte moved.
    idle: Pin<Box<Sleep>>,
}

impl LimitedStream {
    /// The handle requests on this connection carry.
    pub(crate) fn handle(&self) -> ConnHandle {
        ConnHandle(self.slot.clone())
    }

    fn moved(&mut self) {
        let deadline = Instant::now() + self.idle_timeout;
        self.idle.as_mut().reset(deadline);
    }

    fn evicted_error() -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "web: connection without a valid token closed to admit a newer one",
        )
    }

    /// The inner operation is pending: fail it if the connection was evicted or has been
    /// idle too long (wakers are registered for both otherwise).
    fn pending<T>(&mut self, which: usize, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if !self.slot.authenticated.load(Ordering::Acquire) {
            // Register before checking, so an eviction in between still wakes this task.
            self.slot.register(which, cx.waker());
            if self.slot.evicted.load(Ordering::Acquire) {
                return Poll::Ready(Err(Self::evicted_error()));
            }
        }
        match self.idle.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "web: connection idle too long",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn check_evicted(&self) -> io::Result<()> {
        if self.slot.evicted.load(Ordering::Acquire) {
            return Err(Self::evicted_error());
        }
        Ok(())
    }
}

impl Drop for LimitedStream {
    fn drop(&mut self) {
        let Some(shared) = self.slot.shared.upgrade() else {
            return;
        };
        {
            let mut t = shared.table.lock().unwrap_or_else(|p| p.into_inner());
            t.open -= 1;
            if self.slot.evicted.load(Ordering::Acquire) {
                t.closing -= 1;
            } else {
                t.unauthenticated.remove(&self.slot.id);
            }
        }
        shared.closed.notify_one();
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check_evicted()?;
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Pending => self.pending(READ, cx),
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
        self.check_evicted()?;
        match Pin::new(&mut self.stream).poll_write(cx, buf) {
            Poll::Pending => self.pending(WRITE, cx),
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
        self.check_evicted()?;
        match Pin::new(&mut self.stream).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.pending(WRITE, cx),
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn idle_connections_are_closed() {
        rt().block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let mut limited = Limited::new(
                l,
                Limits {
                    max_connections: 2,
                    max_unauthenticated: 1,
                    idle_timeout: Duration::from_millis(200),
                },
            );
            let mut c1 = TcpStream::connect(addr).await.unwrap();
            let (mut s1, _) = limited.accept().await;
            // Traffic keeps it alive.
            c1.write_all(b"ping").await.unwrap();
            let mut b = [0u8; 4];
            s1.read_exact(&mut b).await.unwrap();
            let last_activity = std::time::Instant::now();
            // Nothing moves: the read fails after the idle timeout.
            let e = s1.read(&mut b).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::TimedOut);
            assert!(last_activity.elapsed() >= Duration::from_millis(190));
        });
    }

    #[test]
    fn unauthenticated_connections_make_room_and_authenticated_ones_stay() {
        rt().block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let mut limited = Limited::new(
                l,
                Limits {
                    max_connections: 3,
                    max_unauthenticated: 2,
                    idle_timeout: Duration::from_secs(600),
                },
            );
            let _c1 = TcpStream::connect(addr).await.unwrap();
            let (mut s1, _) = limited.accept().await;
            let _c2 = TcpStream::connect(addr).await.unwrap();
            let (s2, _) = limited.accept().await;
            s2.handle().authenticated();
            let _c3 = TcpStream::connect(addr).await.unwrap();
            let (mut s3, _) = limited.accept().await;
            // A fourth: the table is full, so the oldest unauthenticated one (s1) is closed.
            let _c4 = TcpStream::connect(addr).await.unwrap();
            let (_s4, _) = limited.accept().await;
            let mut b = [0u8; 1];
            let e = tokio::time::timeout(Duration::from_secs(30), s1.read(&mut b))
                .await
                .expect("the evicted connection's read ends")
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
            drop(s1);
            // s3 is alive (nothing to read yet), the authenticated s2 too.
            let r = tokio::time::timeout(Duration::from_millis(50), s3.read(&mut b)).await;
            assert!(r.is_err(), "s3 still open: {r:?}");
            {
                let t = limited.table();
                assert_eq!(t.open, 3);
                assert_eq!(t.closing, 0);
                assert_eq!(t.unauthenticated.len(), 2);
            }
            drop(s2);
            assert_eq!(limited.table().open, 2);
        });
    }
}

//! ringblock management plane: a JSON API under `/api` (with an OpenAPI document), a live
//! stats stream (server-sent events), Prometheus `/metrics`, and a small embedded dashboard.
//!
//! The server runs on its own thread with a single-threaded tokio runtime. It reads the
//! engine's statistics through lock-free snapshots (atomic counters and histograms) and runs
//! commands (create/delete/grow a volume through the engine's control API, start/stop a ublk
//! export through the daemon's [`UblkControl`], promote/demote/suspend/resume/resolve through
//! its [`ReplicationControl`]) on tokio's blocking pool, so neither a slow HTTP
//! client nor a slow command ever runs on a reactor or holds one up. Every API call needs the
//! bearer token (see [`token`]); state-changing calls also check `Host` and `Origin` (see
//! [`auth`]).
//!
//! The daemon binary wires it up: it binds the address ([`WebServer::bind`]) and opens the token
//! store before the engine starts (clear errors early), then [`WebServer::start`]s it once the
//! exports are up, and [`WebServer::stop`]s it before the engine shuts down (the server then
//! holds no engine reference any more).

pub mod api;
pub mod auth;
pub mod client;
pub mod config;
pub mod error;
pub mod metrics;
mod metrics_replication;
pub mod openapi;
pub mod replication;
pub mod replication_api;
pub mod replication_verify;
pub mod replication_view;
pub mod size;
pub mod stats;
pub mod token;

mod listener;
#[cfg(test)]
mod replication_routes_tests;
mod routes;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ringblock_engine::Engine;
use tokio::sync::{oneshot, watch};

pub use api::{NbdClient, NbdStatus, UblkControl, UblkControlError, UblkExport};
pub use config::{default_state_dir, WebConfig, DEFAULT_WEB_LISTEN};
pub use replication::{ReplicationControl, ReplicationControlError, ReplicationStatus};
pub use routes::route_table;
pub use token::TokenStore;

/// Connections served at once (see `listener`).
pub const MAX_CONNECTIONS: usize = 256;
/// Connections that have not yet presented a valid token may hold at most this many of the
/// [`MAX_CONNECTIONS`] slots; beyond it a new connection closes the oldest of them. The rest
/// is kept for token holders.
pub const MAX_UNAUTHENTICATED_CONNECTIONS: usize = 192;
/// A request's head (request line and headers) must arrive within this time of the server
/// starting to wait for it: after the connection is accepted, or after the previous response
/// on a keep-alive connection (so it is also the idle timeout between requests).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection on which nothing moves for this long, while a request or response is under
/// way, is closed (see `listener`).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// SSE streams (`/api/events`) open at once; beyond it 503 with `Retry-After`.
pub const MAX_SSE_STREAMS: usize = 32;
/// `Retry-After` (seconds) of a refused SSE stream.
pub const SSE_RETRY_AFTER_S: u64 = 10;
/// Largest request body accepted (larger → 413).
pub const MAX_BODY_BYTES: usize = 64 << 10;
/// Interval of the stats sampler (rates, SSE events).
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Samples kept for a dashboard that just connected (two minutes of charts).
pub const HISTORY_SAMPLES: usize = 120;
/// Threads that may run engine commands at once.
pub const MAX_BLOCKING_THREADS: usize = 4;
/// How long [`WebServer::stop`] waits for engine commands still running.
const STOP_WAIT: Duration = Duration::from_secs(30);

/// Everything a request handler may use. Cloned per request (an `Arc`).
#[derive(Clone)]
pub struct AppState(pub(crate) Arc<Inner>);

pub(crate) struct Inner {
    pub(crate) engine: Arc<Engine>,
    pub(crate) nbd: Arc<dyn NbdStatus>,
    pub(crate) ublk: Arc<dyn UblkControl>,
    /// The daemon's replication (None: it has no replicated volume).
    pub(crate) replication: Option<Arc<dyn ReplicationControl>>,
    pub(crate) tokens: TokenStore,
    pub(crate) hosts: auth::HostPolicy,
    pub(crate) started: Instant,
    /// The latest sample; SSE streams subscribe to it.
    pub(crate) samples: watch::Sender<Arc<stats::Sample>>,
    /// The last [`HISTORY_SAMPLES`] samples, oldest first.
    pub(crate) history: Mutex<VecDeque<Arc<stats::Sample>>>,
    /// SSE streams open now (at most [`MAX_SSE_STREAMS`]).
    pub(crate) sse_streams: AtomicUsize,
}

/// One of the [`MAX_SSE_STREAMS`] places, held by an open SSE stream.
pub(crate) struct SseSlot(AppState);

impl Drop for SseSlot {
    fn drop(&mut self) {
        self.0 .0.sse_streams.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AppState {
    /// The newest stats sample (all zero rates until the sampler has run twice).
    pub(crate) fn latest(&self) -> Arc<stats::Sample> {
        self.0.samples.borrow().clone()
    }

    /// A place for one more SSE stream, if fewer than [`MAX_SSE_STREAMS`] are open.
    pub(crate) fn sse_slot(&self) -> Option<SseSlot> {
        self.0
            .sse_streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_SSE_STREAMS).then_some(n + 1)
            })
            .ok()
            .map(|_| SseSlot(self.clone()))
    }
}

/// A bound but not yet serving web server address (bind early, serve later).
pub struct BoundWeb {
    listener: std::net::TcpListener,
    addr: SocketAddr,
}

impl BoundWeb {
    /// The bound address (with the actual port when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// The running web server.
pub struct WebServer {
    addr: SocketAddr,
    stop_tx: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl WebServer {
    /// Bind `addr` (port 0 picks a free port). Spawns nothing.
    pub fn bind(addr: SocketAddr) -> std::io::Result<BoundWeb> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        Ok(BoundWeb { listener, addr })
    }

    /// Serve on `bound` from a new thread. The server keeps `engine`, `nbd`, `ublk` and
    /// `replication` (None: the daemon has no replicated volume) until [`WebServer::stop`].
    pub fn start(
        bound: BoundWeb,
        tokens: TokenStore,
        allowed_hosts: &[String],
        engine: Arc<Engine>,
        nbd: Arc<dyn NbdStatus>,
        ublk: Arc<dyn UblkControl>,
        replication: Option<Arc<dyn ReplicationControl>>,
    ) -> std::io::Result<WebServer> {
        let addr = bound.addr;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(MAX_BLOCKING_THREADS)
            .thread_name("web-blocking")
            .build()?;
        let (samples, _) = watch::channel(Arc::new(stats::Sample::default()));
        let state = AppState(Arc::new(Inner {
            engine,
            nbd,
            ublk,
            replication,
            tokens,
            hosts: auth::HostPolicy::new(addr, allowed_hosts),
            started: Instant::now(),
            samples,
            history: Mutex::new(VecDeque::with_capacity(HISTORY_SAMPLES)),
            sse_streams: AtomicUsize::new(0),
        }));
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let std_listener = bound.listener;
        let thread = std::thread::Builder::new()
            .name("web".into())
            .spawn(move || {
                runtime.block_on(serve(std_listener, state, stop_rx));
                // Cancels every connection task (SSE streams never end by themselves) and
                // waits, bounded, for engine commands still running on the blocking pool.
                runtime.shutdown_timeout(STOP_WAIT);
            })?;
        Ok(WebServer {
            addr,
            stop_tx: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The address being served (with the actual port when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop serving, drop every connection, and release the engine. Idempotent.
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("web server thread panicked");
            }
        }
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve(std_listener: std::net::TcpListener, state: AppState, stop: oneshot::Receiver<()>) {
    let listener = match tokio::net::TcpListener::from_std(std_listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("web: cannot use the listening socket: {e}");
            return;
        }
    };
    let mut listener = listener::Limited::new(
        listener,
        listener::Limits {
            max_connections: MAX_CONNECTIONS,
            max_unauthenticated: MAX_UNAUTHENTICATED_CONNECTIONS,
            idle_timeout: IDLE_TIMEOUT,
        },
    );
    let app = routes::router(state.clone());
    let sampler = stats::run_sampler(state);
    let accept = async {
        loop {
            let (io, _) = listener.accept().await;
            tokio::spawn(serve_connection(io, app.clone()));
        }
    };
    tokio::select! {
        () = accept => {}
        _ = sampler => {}
        _ = stop => {}
    }
}

/// HTTP/1.1 on one connection, with a deadline for each request head ([`HEADER_READ_TIMEOUT`];
/// axum's own `serve` sets none). Each request carries the connection's handle, so the token
/// check can mark the connection authenticated.
async fn serve_connection(io: listener::LimitedStream, app: axum::Router) {
    let conn = io.handle();
    let service =
        hyper::service::service_fn(move |mut req: axum::http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(conn.clone());
            let mut app = app.clone();
            tower_service::Service::call(&mut app, req)
        });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    if let Err(e) = builder
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await
    {
        tracing::debug!("web: connection ended: {e}");
    }
}

//! ringblock management plane: a JSON API under `/api` (with an OpenAPI document), a live
//! stats stream (server-sent events), Prometheus `/metrics`, and a small embedded dashboard.
//!
//! The server runs on its own thread with a single-threaded tokio runtime. It reads the
//! engine's statistics through lock-free snapshots (atomic counters and histograms) and runs
//! commands (create/delete/grow a volume through the engine's control API, start/stop a ublk
//! export through the daemon's [`UblkControl`]) on tokio's blocking pool, so neither a slow HTTP
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
pub mod openapi;
pub mod size;
pub mod stats;
pub mod token;

mod listener;
mod routes;

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ringblock_engine::Engine;
use tokio::sync::{oneshot, watch};

pub use api::{NbdClient, NbdStatus, UblkControl, UblkControlError, UblkExport};
pub use config::{default_state_dir, WebConfig, DEFAULT_WEB_LISTEN};
pub use routes::route_table;
pub use token::TokenStore;

/// Connections served at once; more wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 256;
/// A connection on which nothing moves for this long is closed (see `listener`).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
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
    pub(crate) tokens: TokenStore,
    pub(crate) hosts: auth::HostPolicy,
    pub(crate) started: Instant,
    /// The latest sample; SSE streams subscribe to it.
    pub(crate) samples: watch::Sender<Arc<stats::Sample>>,
    /// The last [`HISTORY_SAMPLES`] samples, oldest first.
    pub(crate) history: Mutex<VecDeque<Arc<stats::Sample>>>,
}

impl AppState {
    /// The newest stats sample (all zero rates until the sampler has run twice).
    pub(crate) fn latest(&self) -> Arc<stats::Sample> {
        self.0.samples.borrow().clone()
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

    /// Serve on `bound` from a new thread. The server keeps `engine`, `nbd` and `ublk` until
    /// [`WebServer::stop`].
    pub fn start(
        bound: BoundWeb,
        tokens: TokenStore,
        allowed_hosts: &[String],
        engine: Arc<Engine>,
        nbd: Arc<dyn NbdStatus>,
        ublk: Arc<dyn UblkControl>,
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
            tokens,
            hosts: auth::HostPolicy::new(addr, allowed_hosts),
            started: Instant::now(),
            samples,
            history: Mutex::new(VecDeque::with_capacity(HISTORY_SAMPLES)),
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
    let listener = listener::Limited::new(listener, MAX_CONNECTIONS, IDLE_TIMEOUT);
    let app = routes::router(state.clone());
    let sampler = stats::run_sampler(state);
    let server = axum::serve(listener, app);
    tokio::select! {
        r = server.into_future() => {
            if let Err(e) = r {
                tracing::error!("web server failed: {e}");
            }
        }
        _ = sampler => {}
        _ = stop => {}
    }
}

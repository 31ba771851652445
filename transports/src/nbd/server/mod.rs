//! The NBD listeners: TCP addresses, a Unix socket, and sockets handed over by systemd socket
//! activation (`LISTEN_FDS`), so `nbdinfo -- ringblock serve` style captive launching works.
//!
//! One acceptor thread per listener blocks in `accept`. A TCP client outside
//! [`ServerConfig::allowed_clients`] is closed before any byte is sent. Each other connection
//! gets a short-lived handshake thread that runs [`negotiate`] with blocking IO, a per-read/write
//! timeout and a short overall deadline. A client that entered transmission is handed to
//! [`conn::spawn`], which serves it on a reactor. A failing or hostile client only ever loses
//! its own connection.
//!
//! Limits against idle, slow and hostile clients:
//! - Connections (handshakes and transmission together) are counted at accept, in all and per
//!   client address. Within the limits a connection also takes its reactor task slot then, so a
//!   client the server negotiated with always gets one. Beyond them the client still gets the
//!   greeting, and every option it sends is answered `REP_ERR_POLICY` with "too many
//!   connections (limit N)": it learns why instead of being dropped after a successful
//!   handshake.
//! - Unfinished handshakes: at most [`ServerConfig::max_handshakes_per_address`] per client
//!   address (more from it are closed at once); when [`ServerConfig::max_handshakes`] are in
//!   progress, the oldest is cut off to make room for the newcomer. A client that opens
//!   handshakes and never finishes them (slowloris) thus only delays its own, and a real
//!   client's handshake — milliseconds long — is almost never the oldest.
//! - Connections idle for [`ServerConfig::idle_timeout`] with nothing in flight are closed
//!   (off by default: the kernel's client keeps idle connections of a mounted file system).
//! - Refusals are logged at most once per second per kind, with a count.
//!
//! [`NbdServer::stop`] shuts the listening sockets down (which unblocks `accept`), joins the
//! acceptors, shuts down every socket still in its handshake and waits for those threads to
//! finish, so afterwards the server holds its engine reference only through the value itself.
//!
//! [`negotiate`]: super::handshake::negotiate

mod accept;
mod limits;
mod registry;
mod socket;
mod systemd;
#[cfg(test)]
mod tests;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ringblock_engine::Engine;

use super::cidr::IpNetwork;
use super::conn::{self, BufferBudget};
use super::handshake::HandshakeConfig;
use super::ExportCatalog;

pub use crate::socket::Listener;
use crate::socket::{bind_unix, remove_socket_file, LogLimit};
use accept::accept_loop;
use limits::{ConnCounts, Handshakes};
use registry::idle_loop;
pub use registry::{ClientInfo, ClientRegistry};
use socket::bound_addr;
pub use socket::BoundAddr;
pub use systemd::take_systemd_listeners;

/// Timeout of each read or write during the handshake.
pub const HANDSHAKE_IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has for the whole handshake (real clients take milliseconds).
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; a newcomer beyond cuts off the oldest.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 64;
/// Handshakes in progress from one client address; more from it are closed at once.
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = 8;
/// Connections (in handshake or transmission) at once, by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 128;
/// Time a refused client has to read why.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(2);
/// Longest time between two scans for idle connections.
const IDLE_SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// Connected clients remembered for status pages (the oldest are forgotten first).
pub const MAX_TRACKED_CLIENTS: usize = 4096;
/// Most sockets accepted from systemd.
pub const MAX_SYSTEMD_FDS: usize = 64;
/// Permissions of a Unix socket the server creates.
pub const UNIX_SOCKET_MODE: u32 = 0o660;
/// How long [`NbdServer::stop`] waits for handshake threads after shutting their sockets down.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// What to listen on and how to treat clients.
pub struct ServerConfig {
    /// TCP addresses to bind (port 0 picks a free port; see [`NbdServer::addrs`]).
    pub tcp: Vec<SocketAddr>,
    /// Unix socket to create (a stale socket file is replaced; anything else is an error).
    pub unix: Option<PathBuf>,
    /// Already listening sockets, e.g. from [`take_systemd_listeners`].
    pub inherited: Vec<Listener>,
    /// Handshake policy (its `stopping` flag is set by the server).
    pub handshake: HandshakeConfig,
    /// Timeout of each handshake read or write.
    pub handshake_timeout: Duration,
    /// Time for the whole handshake.
    pub handshake_deadline: Duration,
    /// Handshakes in progress at once.
    pub max_handshakes: usize,
    /// Handshakes in progress from one client address.
    pub max_handshakes_per_address: usize,
    /// Connections at once (handshakes and transmission).
    pub max_connections: usize,
    /// Connections at once from one client address; 0: only `max_connections` applies.
    pub max_connections_per_address: usize,
    /// Close a connection with nothing in flight after this long without a request; None:
    /// never.
    pub idle_timeout: Option<Duration>,
    /// TCP clients allowed to connect; empty: any. Unix socket clients are not checked (the
    /// socket file's permissions decide).
    pub allowed_clients: Vec<IpNetwork>,
    /// Reply and request buffer memory of all connections together (see [`BufferBudget`]).
    pub buffer_budget_bytes: u64,
    /// Receive requests with one multishot `recv` into provided buffers where the kernel can
    /// (6.0+), rather than one `recv` per arrival.
    pub multishot_recv: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            tcp: Vec::new(),
            unix: None,
            inherited: Vec::new(),
            handshake: HandshakeConfig::default(),
            handshake_timeout: HANDSHAKE_IO_TIMEOUT,
            handshake_deadline: HANDSHAKE_DEADLINE,
            max_handshakes: MAX_CONCURRENT_HANDSHAKES,
            max_handshakes_per_address: MAX_HANDSHAKES_PER_ADDRESS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_address: 0,
            idle_timeout: None,
            allowed_clients: Vec::new(),
            buffer_budget_bytes: conn::DEFAULT_BUFFER_BUDGET_BYTES,
            multishot_recv: true,
        }
    }
}

struct Inner {
    engine: Arc<Engine>,
    catalog: Arc<dyn ExportCatalog>,
    handshake: HandshakeConfig,
    stopping: Arc<AtomicBool>,
    handshake_timeout: Duration,
    handshake_deadline: Duration,
    max_handshakes: usize,
    max_handshakes_per_address: usize,
    max_connections: usize,
    max_connections_per_address: usize,
    idle_timeout: Option<Duration>,
    allowed_clients: Vec<IpNetwork>,
    budget: Arc<BufferBudget>,
    multishot_recv: bool,
    handshakes: Arc<Handshakes>,
    connections: Arc<Mutex<ConnCounts>>,
    registry: Arc<ClientRegistry>,
    next_id: AtomicU64,
    log_full: LogLimit,
    log_not_allowed: LogLimit,
    log_handshakes: LogLimit,
}

struct Bound {
    listener: Arc<Listener>,
    addr: BoundAddr,
    /// A Unix socket file this server created, with its inode, removed at stop.
    created: Option<(PathBuf, u64)>,
}

/// A running NBD server.
pub struct NbdServer {
    inner: Arc<Inner>,
    bound: Vec<Bound>,
    acceptors: Mutex<Vec<JoinHandle<()>>>,
    stopped: AtomicBool,
}

impl NbdServer {
    /// Bind every configured address, then start accepting. Fails (and binds nothing) if any
    /// address cannot be used.
    pub fn start(
        engine: Arc<Engine>,
        catalog: Arc<dyn ExportCatalog>,
        mut config: ServerConfig,
    ) -> io::Result<NbdServer> {
        let mut bound = Vec::new();
        for l in std::mem::take(&mut config.inherited) {
            let addr = bound_addr(&l)?;
            bound.push(Bound {
                listener: Arc::new(l),
                addr,
                created: None,
            });
        }
        let result = Self::bind_all(&config, &mut bound);
        if let Err(e) = result {
            remove_created(&bound);
            return Err(e);
        }
        let stopping = Arc::new(AtomicBool::new(false));
        let mut handshake = config.handshake;
        handshake.stopping = Some(stopping.clone());
        let inner = Arc::new(Inner {
            engine,
            catalog,
            handshake,
            stopping,
            handshake_timeout: config.handshake_timeout,
            multishot_recv: config.multishot_recv,
            handshake_deadline: config.handshake_deadline,
            max_handshakes: config.max_handshakes.max(1),
            max_handshakes_per_address: config.max_handshakes_per_address.max(1),
            max_connections: config.max_connections.max(1),
            max_connections_per_address: config.max_connections_per_address,
            idle_timeout: config.idle_timeout.filter(|t| !t.is_zero()),
            allowed_clients: config.allowed_clients,
            budget: BufferBudget::new(config.buffer_budget_bytes),
            handshakes: Arc::default(),
            connections: Arc::default(),
            registry: Arc::default(),
            next_id: AtomicU64::new(1),
            log_full: LogLimit::default(),
            log_not_allowed: LogLimit::default(),
            log_handshakes: LogLimit::default(),
        });
        let server = NbdServer {
            inner,
            bound,
            acceptors: Mutex::new(Vec::new()),
            stopped: AtomicBool::new(false),
        };
        for b in &server.bound {
            let inner = server.inner.clone();
            let listener = b.listener.clone();
            let label = b.addr.to_string();
            let spawned = std::thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || accept_loop(&inner, &listener, &label));
            match spawned {
                Ok(t) => server.acceptors.lock().expect("acceptors").push(t),
                Err(e) => {
                    server.stop();
                    return Err(e);
                }
            }
        }
        if let Some(idle) = server.inner.idle_timeout {
            let inner = server.inner.clone();
            let spawned = std::thread::Builder::new()
                .name("nbd-idle".into())
                .spawn(move || idle_loop(&inner, idle));
            match spawned {
                Ok(t) => server.acceptors.lock().expect("acceptors").push(t),
                Err(e) => {
                    server.stop();
                    return Err(e);
                }
            }
        }
        Ok(server)
    }

    /// Reply and request buffer memory the connections hold now, and its limit.
    pub fn buffer_budget(&self) -> &BufferBudget {
        &self.inner.budget
    }

    fn bind_all(config: &ServerConfig, bound: &mut Vec<Bound>) -> io::Result<()> {
        for addr in &config.tcp {
            let l = TcpListener::bind(addr).map_err(|e| {
                io::Error::new(e.kind(), format!("nbd: cannot listen on {addr}: {e}"))
            })?;
            let addr = BoundAddr::Tcp(l.local_addr()?);
            bound.push(Bound {
                listener: Arc::new(Listener::Tcp(l)),
                addr,
                created: None,
            });
        }
        if let Some(path) = &config.unix {
            let l = bind_unix(path, UNIX_SOCKET_MODE).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("nbd: cannot listen on {}: {e}", path.display()),
                )
            })?;
            let inode = std::fs::symlink_metadata(path)?.ino();
            bound.push(Bound {
                listener: Arc::new(Listener::Unix(l)),
                addr: BoundAddr::Unix(Some(path.clone())),
                created: Some((path.clone(), inode)),
            });
        }
        Ok(())
    }

    /// The addresses being listened on (with the actual ports when port 0 was asked for).
    pub fn addrs(&self) -> Vec<BoundAddr> {
        self.bound.iter().map(|b| b.addr.clone()).collect()
    }

    /// Clients currently in the transmission phase.
    pub fn clients(&self) -> Vec<ClientInfo> {
        self.inner.registry.clients()
    }

    /// The client registry, to hand to status pages (it holds no engine reference).
    pub fn registry(&self) -> Arc<ClientRegistry> {
        self.inner.registry.clone()
    }

    /// Stop accepting: close the listeners, abort handshakes in progress and wait for their
    /// threads. Connections already in transmission are left to the engine. Idempotent.
    pub fn stop(&self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        self.inner.stopping.store(true, Ordering::Release);
        for b in &self.bound {
            // Wakes a thread blocked in accept (it then sees `stopping`). The fd stays valid:
            // we hold an Arc of its listener.
            let _ =
                nix::sys::socket::shutdown(b.listener.raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        let acceptors = std::mem::take(&mut *self.acceptors.lock().expect("acceptors"));
        for t in acceptors {
            if t.join().is_err() {
                tracing::error!("nbd acceptor thread panicked");
            }
        }
        let hs = &self.inner.handshakes;
        let mut st = hs.state.lock().expect("handshakes");
        for s in st.sockets.values() {
            s.shutdown();
        }
        let until = Instant::now() + STOP_WAIT;
        while st.count > 0 {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    handshakes = st.count,
                    "nbd: handshake threads still running at stop"
                );
                break;
            }
            st = hs.idle.wait_timeout(st, left).expect("handshakes").0;
        }
        drop(st);
        remove_created(&self.bound);
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn remove_created(bound: &[Bound]) {
    for b in bound {
        if let Some((path, inode)) = &b.created {
            remove_socket_file(path, *inode);
        }
    }
}

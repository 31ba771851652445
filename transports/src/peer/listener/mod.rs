//! The peer listener: where other nodes connect to replicate volumes.
//!
//! One acceptor thread per listening socket (TCP, or a Unix socket for tests) blocks in
//! `accept`, like the NBD server's. Each connection gets a short-lived handshake thread that
//! runs the sans-IO [`Acceptor`] with blocking IO, a timeout on every read and write and an
//! overall deadline: a slow or silent peer is dropped when the deadline passes, so it never
//! holds a handshake slot for longer than that. An established connection is handed, with its
//! [`Session`] and its place among the connections, to the `on_established` callback (the
//! runtime starts a reactor task with it); the socket is at a frame boundary, nothing past the
//! handshake has been read.
//!
//! Bounds against slow and hostile peers:
//! - handshakes in progress: [`ListenerConfig::max_handshakes`] in all,
//!   [`ListenerConfig::max_handshakes_per_address`] from one address; a newcomer beyond either
//!   cuts off the oldest of that bound (see `table.rs`), so a flood never locks out a peer
//!   whose handshake takes milliseconds;
//! - established connections: [`ListenerConfig::max_connections`]; a handshake that would go
//!   beyond is closed before its Welcome is sent, so nothing is established;
//! - a handshake frame is at most [`MAX_HANDSHAKE_FRAME_BYTES`]; a header announcing more is
//!   refused at once.
//!
//! A refused peer gets what the handshake's Refuse frame says and nothing else; every refusal
//! is logged with its exact reason, at most once per second per reason with a count, so a
//! flood cannot flood the log.
//!
//! [`MAX_HANDSHAKE_FRAME_BYTES`]: super::exchange::MAX_HANDSHAKE_FRAME_BYTES

mod accept;
mod table;

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::handshake::{AcceptorConfig, Session, VolumeLookup};
use crate::socket::{bind_unix, remove_socket_file, Conn, Listener, LogLimit};
pub use table::ConnectionPermit;
use table::{ConnectionLimit, HandshakeTable};

/// Where peers connect by default: loopback only, until an operator opens it up.
pub const DEFAULT_PEER_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10810));
/// Time a peer has for the whole handshake, by default (a handshake takes milliseconds).
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// Timeout of each handshake read or write, by default.
pub const HANDSHAKE_IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes in progress at once, by default.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 16;
/// Handshakes in progress from one address, by default.
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = 4;
/// Established peer connections at once, by default (a node has one per replicated volume and
/// peer).
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Permissions of a Unix socket the listener creates: the daemon's user only.
pub const UNIX_SOCKET_MODE: u32 = 0o600;
/// How long [`PeerListener::stop`] waits for handshake threads after cutting them off.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// What to listen on and how to treat peers.
#[derive(Clone, Debug)]
pub struct ListenerConfig {
    /// TCP addresses to bind (port 0 picks a free port; see [`PeerListener::tcp_addrs`]).
    pub tcp: Vec<SocketAddr>,
    /// Unix socket to create (a stale socket file is replaced; anything else is an error).
    pub unix: Option<PathBuf>,
    /// Who this node is, and the cluster secret.
    pub acceptor: AcceptorConfig,
    /// Time a peer has for the whole handshake.
    pub handshake_deadline: Duration,
    /// Timeout of each handshake read or write.
    pub io_timeout: Duration,
    pub max_handshakes: usize,
    pub max_handshakes_per_address: usize,
    pub max_connections: usize,
}

impl ListenerConfig {
    /// The defaults: [`DEFAULT_PEER_LISTEN`] and the limits above.
    pub fn new(acceptor: AcceptorConfig) -> ListenerConfig {
        ListenerConfig {
            tcp: vec![DEFAULT_PEER_LISTEN],
            unix: None,
            acceptor,
            handshake_deadline: HANDSHAKE_DEADLINE,
            io_timeout: HANDSHAKE_IO_TIMEOUT,
            max_handshakes: MAX_CONCURRENT_HANDSHAKES,
            max_handshakes_per_address: MAX_HANDSHAKES_PER_ADDRESS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// A connection whose handshake succeeded.
#[derive(Debug)]
pub struct Established {
    /// The socket, blocking, with no timeouts, at a frame boundary.
    pub fd: OwnedFd,
    pub session: Session,
    /// The peer's address, for logs.
    pub peer: String,
    /// The connection's place among the listener's connections: hold it as long as the
    /// connection lives.
    pub permit: ConnectionPermit,
}

/// The volumes this node holds copies of, shared by every handshake.
pub type SharedLookup = Arc<dyn VolumeLookup + Send + Sync>;
/// Takes each established connection (runs on the handshake thread: hand it on quickly).
pub type OnEstablished = Arc<dyn Fn(Established) + Send + Sync>;

/// What the listener has seen since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerCounts {
    pub accepted: u64,
    pub established: u64,
    /// Handshakes that failed a check (ours, or the peer's Refuse).
    pub refused: u64,
    /// Handshakes dropped at their deadline.
    pub timed_out: u64,
    /// Handshakes cut off to make room for newer ones, or turned away at once.
    pub cut_off: u64,
    /// Handshakes closed before their Welcome because the connections were all taken.
    pub over_limit: u64,
    /// Peers that left, or whose socket failed, mid-handshake.
    pub closed: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    established: AtomicU64,
    refused: AtomicU64,
    timed_out: AtomicU64,
    cut_off: AtomicU64,
    over_limit: AtomicU64,
    closed: AtomicU64,
}

/// Rate limits of the log lines, one per kind of event (refusals one per reason).
#[derive(Default)]
struct Logs {
    refusals: [LogLimit; accept::REFUSAL_KINDS],
    timed_out: LogLimit,
    cut_off: LogLimit,
    over_limit: LogLimit,
}

struct Inner {
    acceptor: AcceptorConfig,
    volumes: SharedLookup,
    on_established: OnEstablished,
    handshake_deadline: Duration,
    io_timeout: Duration,
    handshakes: Mutex<HandshakeTable<Conn>>,
    /// Signalled when the last handshake thread finishes.
    idle: Condvar,
    connections: Arc<ConnectionLimit>,
    stopping: AtomicBool,
    next_id: AtomicU64,
    counters: Counters,
    logs: Logs,
}

impl Inner {
    fn handshakes(&self) -> std::sync::MutexGuard<'_, HandshakeTable<Conn>> {
        self.handshakes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Bound {
    listener: Arc<Listener>,
    label: String,
    /// A Unix socket file this listener created, with its inode, removed at stop.
    created: Option<(PathBuf, u64)>,
}

/// A running peer listener.
pub struct PeerListener {
    inner: Arc<Inner>,
    bound: Vec<Bound>,
    acceptors: Mutex<Vec<JoinHandle<()>>>,
    stopped: AtomicBool,
}

impl fmt::Debug for PeerListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let labels: Vec<&str> = self.bound.iter().map(|b| b.label.as_str()).collect();
        f.debug_struct("PeerListener")
            .field("listening", &labels)
            .finish_non_exhaustive()
    }
}

impl PeerListener {
    /// Binds every configured address, then starts accepting. Fails (and binds nothing) if any
    /// address cannot be used.
    pub fn start(
        config: ListenerConfig,
        volumes: SharedLookup,
        on_established: OnEstablished,
    ) -> io::Result<PeerListener> {
        let bound = bind_all(&config)?;
        let inner = Arc::new(Inner {
            acceptor: config.acceptor,
            volumes,
            on_established,
            handshake_deadline: config.handshake_deadline,
            io_timeout: config.io_timeout.max(Duration::from_millis(1)),
            handshakes: Mutex::new(HandshakeTable::new(
                config.max_handshakes,
                config.max_handshakes_per_address,
            )),
            idle: Condvar::new(),
            connections: ConnectionLimit::new(config.max_connections),
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            counters: Counters::default(),
            logs: Logs::default(),
        });
        let listener = PeerListener {
            inner,
            bound,
            acceptors: Mutex::new(Vec::new()),
            stopped: AtomicBool::new(false),
        };
        for b in &listener.bound {
            let inner = listener.inner.clone();
            let socket = b.listener.clone();
            let label = b.label.clone();
            let spawned = std::thread::Builder::new()
                .name("peer-accept".into())
                .spawn(move || accept::accept_loop(&inner, &socket, &label));
            match spawned {
                Ok(t) => listener
                    .acceptors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(t),
                Err(e) => {
                    listener.stop();
                    return Err(e);
                }
            }
        }
        for b in &listener.bound {
            tracing::info!(listener = %b.label, "peer: listening");
        }
        Ok(listener)
    }

    /// The TCP addresses being listened on (with the actual ports when port 0 was asked for).
    pub fn tcp_addrs(&self) -> Vec<SocketAddr> {
        self.bound
            .iter()
            .filter_map(|b| match &*b.listener {
                Listener::Tcp(l) => l.local_addr().ok(),
                Listener::Unix(_) => None,
            })
            .collect()
    }

    /// Established connections whose permit is still held.
    pub fn connections(&self) -> usize {
        self.inner.connections.count()
    }

    /// Handshake threads running (in progress, or cut off and winding down).
    pub fn handshakes(&self) -> usize {
        self.inner.handshakes().threads()
    }

    /// What the listener has seen since it started.
    pub fn counts(&self) -> ListenerCounts {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ListenerCounts {
            accepted: get(&c.accepted),
            established: get(&c.established),
            refused: get(&c.refused),
            timed_out: get(&c.timed_out),
            cut_off: get(&c.cut_off),
            over_limit: get(&c.over_limit),
            closed: get(&c.closed),
        }
    }

    /// Stops accepting: closes the listening sockets, cuts off handshakes in progress and waits
    /// for their threads. Established connections are the runtime's. Idempotent.
    pub fn stop(&self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        self.inner.stopping.store(true, Ordering::Release);
        for b in &self.bound {
            // Wakes the thread blocked in accept (it then sees `stopping`). The fd stays valid:
            // we hold an Arc of its listener.
            let _ =
                nix::sys::socket::shutdown(b.listener.raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        let acceptors =
            std::mem::take(&mut *self.acceptors.lock().unwrap_or_else(|e| e.into_inner()));
        for t in acceptors {
            if t.join().is_err() {
                tracing::error!("peer acceptor thread panicked");
            }
        }
        let mut table = self.inner.handshakes();
        for s in table.sockets() {
            s.shutdown();
        }
        let until = Instant::now() + STOP_WAIT;
        while table.threads() > 0 {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    handshakes = table.threads(),
                    "peer: handshake threads still running at stop"
                );
                break;
            }
            table = self
                .inner
                .idle
                .wait_timeout(table, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(table);
        remove_created(&self.bound);
    }
}

impl Drop for PeerListener {
    fn drop(&mut self) {
        self.stop();
    }
}

fn bind_all(config: &ListenerConfig) -> io::Result<Vec<Bound>> {
    let mut bound = Vec::new();
    let result = (|| {
        for addr in &config.tcp {
            let l = TcpListener::bind(addr).map_err(|e| {
                io::Error::new(e.kind(), format!("peer: cannot listen on {addr}: {e}"))
            })?;
            let label = format!("tcp {}", l.local_addr()?);
            bound.push(Bound {
                listener: Arc::new(Listener::Tcp(l)),
                label,
                created: None,
            });
        }
        if let Some(path) = &config.unix {
            let cannot = |e: io::Error| {
                io::Error::new(
                    e.kind(),
                    format!("peer: cannot listen on {}: {e}", path.display()),
                )
            };
            let l = bind_unix(path, UNIX_SOCKET_MODE).map_err(cannot)?;
            let inode = std::fs::symlink_metadata(path).map_err(cannot)?.ino();
            bound.push(Bound {
                listener: Arc::new(Listener::Unix(l)),
                label: format!("unix {}", path.display()),
                created: Some((path.clone(), inode)),
            });
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(bound),
        Err(e) => {
            remove_created(&bound);
            Err(e)
        }
    }
}

fn remove_created(bound: &[Bound]) {
    for b in bound {
        if let Some((path, inode)) = &b.created {
            remove_socket_file(path, *inode);
        }
    }
}

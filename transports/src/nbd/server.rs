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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use ringblock_engine::Engine;

use super::cidr::IpNetwork;
use super::conn::{self, BufferBudget};
use super::handshake::{negotiate, refuse, HandshakeConfig};
use super::ExportCatalog;

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
/// Shortest time between two log lines of one kind of refusal.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);
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
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop cannot spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// First file descriptor of systemd socket activation.
const SD_LISTEN_FDS_START: RawFd = 3;

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn addr(&self) -> io::Result<BoundAddr> {
        Ok(match self {
            Listener::Tcp(l) => BoundAddr::Tcp(l.local_addr()?),
            Listener::Unix(l) => {
                BoundAddr::Unix(l.local_addr()?.as_pathname().map(Path::to_path_buf))
            }
        })
    }

    fn accept(&self) -> io::Result<Conn> {
        Ok(match self {
            Listener::Tcp(l) => Conn::Tcp(l.accept()?.0),
            Listener::Unix(l) => Conn::Unix(l.accept()?.0),
        })
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        }
    }
}

/// Where a listener is reachable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BoundAddr {
    Tcp(SocketAddr),
    /// A Unix socket; `None` if it has no path (unnamed or abstract, e.g. from systemd).
    Unix(Option<PathBuf>),
}

impl BoundAddr {
    /// An NBD URI for `export` on this address (`nbd://HOST:PORT/EXPORT`,
    /// `nbd+unix:///EXPORT?socket=PATH`).
    pub fn uri(&self, export: &str) -> String {
        match self {
            BoundAddr::Tcp(a) => format!("nbd://{a}/{export}"),
            BoundAddr::Unix(Some(p)) => format!("nbd+unix:///{export}?socket={}", p.display()),
            BoundAddr::Unix(None) => format!("nbd+unix:///{export}"),
        }
    }
}

impl fmt::Display for BoundAddr {
    /// `127.0.0.1:10809` for TCP, `nbd+unix:///?socket=PATH` for a Unix socket.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BoundAddr::Tcp(a) => write!(f, "{a}"),
            BoundAddr::Unix(Some(p)) => write!(f, "nbd+unix:///?socket={}", p.display()),
            BoundAddr::Unix(None) => write!(f, "nbd+unix (unnamed socket)"),
        }
    }
}

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

/// A client that entered the transmission phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientInfo {
    /// Connection number, unique per server.
    pub id: u64,
    /// `ADDR:PORT` for TCP, `unix:pid=…,uid=…` for Unix sockets.
    pub peer: String,
    pub export: String,
    /// The listener it came through.
    pub listener: String,
    pub since: SystemTime,
    pub structured_replies: bool,
    pub extended_headers: bool,
    /// Requests served so far (a snapshot taken by [`ClientRegistry::clients`]).
    pub requests: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
}

/// The connected clients, for status pages (control path only: a mutex is fine here).
///
/// Each entry shares the connection's [`conn::ConnStats`]; once the transmission task is gone
/// (the client disconnected) the registry holds the only reference and the entry is dropped.
#[derive(Default)]
pub struct ClientRegistry {
    entries: Mutex<VecDeque<ClientEntry>>,
}

struct ClientEntry {
    info: ClientInfo,
    stats: Arc<conn::ConnStats>,
    /// A duplicate of the socket, to end the connection when idle (only with an idle timeout).
    socket: Option<Conn>,
    /// Requests seen at the last scan, and since when nothing changed.
    seen_requests: u64,
    quiet_since: Instant,
}

impl ClientRegistry {
    fn add(&self, info: ClientInfo, stats: Arc<conn::ConnStats>, socket: Option<Conn>) {
        let mut entries = self.entries.lock().expect("client registry");
        entries.retain(|e| Arc::strong_count(&e.stats) > 1);
        if entries.len() >= MAX_TRACKED_CLIENTS {
            entries.pop_front();
        }
        entries.push_back(ClientEntry {
            info,
            stats,
            socket,
            seen_requests: 0,
            quiet_since: Instant::now(),
        });
    }

    /// End connections that had nothing in flight and sent no request for `idle`: shut their
    /// socket down for reading, so the connection finishes what it has and closes.
    fn close_idle(&self, idle: Duration) {
        let now = Instant::now();
        let mut entries = self.entries.lock().expect("client registry");
        entries.retain(|e| Arc::strong_count(&e.stats) > 1);
        for e in entries.iter_mut() {
            let Some(socket) = &e.socket else { continue };
            let requests = e.stats.requests.load(Ordering::Relaxed);
            if requests != e.seen_requests || e.stats.busy.load(Ordering::Relaxed) {
                e.seen_requests = requests;
                e.quiet_since = now;
            } else if now.duration_since(e.quiet_since) >= idle {
                tracing::info!(peer = %e.info.peer, export = %e.info.export,
                    idle_s = idle.as_secs(), "nbd: closing idle connection");
                socket.shutdown_read();
                e.socket = None;
            }
        }
    }

    /// Clients whose connection is still open, oldest first, with their counters now.
    pub fn clients(&self) -> Vec<ClientInfo> {
        let mut entries = self.entries.lock().expect("client registry");
        entries.retain(|e| Arc::strong_count(&e.stats) > 1);
        entries
            .iter()
            .map(
                |ClientEntry {
                     info: c, stats: s, ..
                 }| ClientInfo {
                    requests: s.requests.load(Ordering::Relaxed),
                    bytes_read: s.bytes_read.load(Ordering::Relaxed),
                    bytes_written: s.bytes_written.load(Ordering::Relaxed),
                    errors: s.errors.load(Ordering::Relaxed),
                    ..c.clone()
                },
            )
            .collect()
    }
}

/// Handshakes in progress: their count, and a duplicate of each socket so `stop` can shut
/// them down.
#[derive(Default)]
struct Handshakes {
    state: Mutex<HandshakeState>,
    idle: Condvar,
}

#[derive(Default)]
struct HandshakeState {
    count: usize,
    /// By connection number: the oldest first. Those not handed on yet.
    sockets: BTreeMap<u64, Conn>,
    per_address: HashMap<IpAddr, usize>,
}

/// Releases a handshake slot when dropped (also if the thread could not be spawned).
struct Slot {
    handshakes: Arc<Handshakes>,
    id: u64,
    addr: Option<IpAddr>,
}

impl Slot {
    /// Forget the duplicate socket before the connection is handed on, so it cannot keep the
    /// connection open behind the transmission phase's back.
    fn release_socket(&self) {
        let mut st = self.handshakes.state.lock().expect("handshakes");
        st.sockets.remove(&self.id);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.handshakes.state.lock().expect("handshakes");
        st.sockets.remove(&self.id);
        st.count -= 1;
        if let Some(addr) = self.addr {
            if let Some(n) = st.per_address.get_mut(&addr) {
                *n -= 1;
                if *n == 0 {
                    st.per_address.remove(&addr);
                }
            }
        }
        if st.count == 0 {
            self.handshakes.idle.notify_all();
        }
    }
}

/// An accepted connection.
#[derive(Debug)]
enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Conn::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(t),
            Conn::Unix(s) => s.set_read_timeout(t),
        }
    }

    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_write_timeout(t),
            Conn::Unix(s) => s.set_write_timeout(t),
        }
    }

    fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn shutdown_read(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Read),
            Conn::Unix(s) => s.shutdown(Shutdown::Read),
        };
    }

    /// The client's IP address (IPv4 clients of an IPv6 socket as IPv4); None for Unix sockets.
    fn peer_ip(&self) -> Option<IpAddr> {
        match self {
            Conn::Tcp(s) => s.peer_addr().ok().map(|a| a.ip().to_canonical()),
            Conn::Unix(_) => None,
        }
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => (&*s).read(buf),
            Conn::Unix(s) => (&*s).read(buf),
        }
    }

    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => (&*s).write(buf),
            Conn::Unix(s) => (&*s).write(buf),
        }
    }

    /// `ADDR:PORT` for TCP, `unix:pid=…,uid=…` for Unix sockets.
    fn peer(&self) -> String {
        match self {
            Conn::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "tcp:unknown".into(), |a| a.to_string()),
            Conn::Unix(s) => {
                match nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::PeerCredentials) {
                    Ok(c) => format!("unix:pid={},uid={}", c.pid(), c.uid()),
                    Err(_) => "unix".into(),
                }
            }
        }
    }

    fn into_fd(self) -> OwnedFd {
        match self {
            Conn::Tcp(s) => s.into(),
            Conn::Unix(s) => s.into(),
        }
    }
}

/// The handshake's view of a connection: each read/write times out after the per-operation
/// timeout or at the overall deadline, whichever comes first.
struct DeadlineStream<'a> {
    conn: &'a Conn,
    deadline: Instant,
    per_op: Duration,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

impl DeadlineStream<'_> {
    fn timeout(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake deadline passed",
            ));
        }
        Ok(left.min(self.per_op))
    }
}

impl Read for DeadlineStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let t = self.timeout()?;
        if self.read_timeout != Some(t) {
            self.conn.set_read_timeout(Some(t))?;
            self.read_timeout = Some(t);
        }
        self.conn.read(buf)
    }
}

impl Write for DeadlineStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let t = self.timeout()?;
        if self.write_timeout != Some(t) {
            self.conn.set_write_timeout(Some(t))?;
            self.write_timeout = Some(t);
        }
        self.conn.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
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

/// Connections counted against the limits: in all, and per client address.
#[derive(Default)]
struct ConnCounts {
    total: usize,
    per_address: HashMap<IpAddr, usize>,
}

/// A connection's place in the limits (and its reactor task slot, until the connection
/// reaches the reactor); released when the connection ends.
struct ConnPermit {
    counts: Arc<Mutex<ConnCounts>>,
    addr: Option<IpAddr>,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut c = self.counts.lock().expect("connection counts");
        c.total -= 1;
        if let Some(addr) = self.addr {
            if let Some(n) = c.per_address.get_mut(&addr) {
                *n -= 1;
                if *n == 0 {
                    c.per_address.remove(&addr);
                }
            }
        }
    }
}

/// What a handshake thread does with its client.
enum Admission {
    Accepted {
        permit: ConnPermit,
        task_slot: ringblock_engine::TaskSlot,
    },
    /// Turned away, with this message in every option reply.
    Refused(String),
}

/// At most one log line per [`REFUSAL_LOG_INTERVAL`], counting what it stood for.
#[derive(Default)]
struct LogLimit {
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimit {
    /// Count an event; Some(events since the last line, this one included) when a line is due.
    fn note(&self) -> Option<u64> {
        let mut st = self.state.lock().expect("log limit");
        st.1 += 1;
        let now = Instant::now();
        if st
            .0
            .is_some_and(|t| now.duration_since(t) < REFUSAL_LOG_INTERVAL)
        {
            return None;
        }
        st.0 = Some(now);
        Some(std::mem::take(&mut st.1))
    }
}

impl Inner {
    /// Take a connection's place in the limits and a reactor task slot, or say why not.
    fn admit(&self, engine: &Engine, addr: Option<IpAddr>) -> Admission {
        let mut c = self.connections.lock().expect("connection counts");
        if c.total >= self.max_connections {
            return Admission::Refused(format!(
                "too many connections (limit {})",
                self.max_connections
            ));
        }
        if let Some(a) = addr {
            let mine = c.per_address.get(&a).copied().unwrap_or(0);
            if self.max_connections_per_address > 0 && mine >= self.max_connections_per_address {
                return Admission::Refused(format!(
                    "too many connections from {a} (limit {} per address)",
                    self.max_connections_per_address
                ));
            }
        }
        let Some(task_slot) = engine.reserve_task_slot() else {
            return Admission::Refused(
                "too many connections (the reactors' task tables are full)".into(),
            );
        };
        c.total += 1;
        if let Some(a) = addr {
            *c.per_address.entry(a).or_insert(0) += 1;
        }
        Admission::Accepted {
            permit: ConnPermit {
                counts: self.connections.clone(),
                addr,
            },
            task_slot,
        }
    }
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
            let addr = l.addr()?;
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
            let l = bind_unix(path).map_err(|e| {
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
            // Only remove the file if it is still ours.
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.ino() == *inode) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Create a Unix listening socket at `path`, replacing a stale socket file (one nobody
/// listens on) but never anything else.
fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another server is listening on this socket",
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; refusing to replace it",
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(UNIX_SOCKET_MODE))?;
    Ok(l)
}

fn accept_loop(inner: &Arc<Inner>, listener: &Listener, label: &str) {
    tracing::debug!(listener = label, "nbd acceptor running");
    loop {
        let accepted = listener.accept();
        if inner.stopping.load(Ordering::Acquire) {
            return;
        }
        match accepted {
            Ok(conn) => on_accept(inner, conn, label),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(e) => {
                // Out of file descriptors or memory: back off rather than spin.
                tracing::warn!(listener = label, error = %e, "nbd: accept failed");
                std::thread::sleep(ACCEPT_ERROR_PAUSE);
            }
        }
    }
}

/// Scan for idle connections until the server stops.
fn idle_loop(inner: &Inner, idle: Duration) {
    let scan_every = (idle / 4).clamp(Duration::from_millis(50), IDLE_SCAN_INTERVAL);
    let mut next_scan = Instant::now() + scan_every;
    // Bounded by the server's life: `stop` sets `stopping` and joins this thread.
    while !inner.stopping.load(Ordering::Acquire) {
        std::thread::sleep(scan_every.min(Duration::from_millis(100)));
        if Instant::now() >= next_scan {
            inner.registry.close_idle(idle);
            next_scan = Instant::now() + scan_every;
        }
    }
}

fn on_accept(inner: &Arc<Inner>, conn: Conn, label: &str) {
    let addr = conn.peer_ip();
    if let Some(ip) = addr {
        if !inner.allowed_clients.is_empty()
            && !inner.allowed_clients.iter().any(|n| n.contains(ip))
        {
            if let Some(n) = inner.log_not_allowed.note() {
                tracing::warn!(client = %ip, refused = n,
                    "nbd: client address not in [nbd] allowed_clients; closing");
            }
            return; // closed before any byte is sent
        }
    }
    if let Conn::Tcp(s) = &conn {
        let _ = s.set_nodelay(true);
        let _ = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::KeepAlive, &true);
    }
    let peer = conn.peer();
    let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
    let dup = match conn.try_clone() {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "nbd: cannot duplicate socket; closing");
            return;
        }
    };
    {
        let mut st = inner.handshakes.state.lock().expect("handshakes");
        let from_addr = addr.map_or(0, |a| st.per_address.get(&a).copied().unwrap_or(0));
        // Evicted handshakes leave within moments; this bounds the threads meanwhile.
        let hard_limit = 2 * inner.max_handshakes;
        if from_addr >= inner.max_handshakes_per_address || st.count >= hard_limit {
            drop(st);
            if let Some(n) = inner.log_handshakes.note() {
                tracing::warn!(%peer, refused = n, per_address = inner.max_handshakes_per_address,
                    "nbd: too many unfinished handshakes; closing new connection");
            }
            return;
        }
        if st.sockets.len() >= inner.max_handshakes {
            // Make room by cutting off the oldest unfinished handshake: a slow client holds a
            // slot for at most the time others take to arrive, never locks them out.
            if let Some((_, oldest)) = st.sockets.pop_first() {
                oldest.shutdown();
                if let Some(n) = inner.log_handshakes.note() {
                    tracing::warn!(
                        cut_off = n,
                        limit = inner.max_handshakes,
                        "nbd: handshake table full; cutting off the oldest unfinished handshake"
                    );
                }
            }
        }
        st.count += 1;
        st.sockets.insert(id, dup);
        if let Some(a) = addr {
            *st.per_address.entry(a).or_insert(0) += 1;
        }
    }
    let slot = Slot {
        handshakes: inner.handshakes.clone(),
        id,
        addr,
    };
    let admission = inner.admit(&inner.engine, addr);
    if let Admission::Refused(why) = &admission {
        if let Some(n) = inner.log_full.note() {
            tracing::warn!(%peer, refused = n, "nbd: refusing connection: {why}");
        }
    }
    let thread_inner = inner.clone();
    let label = label.to_string();
    let spawned = std::thread::Builder::new()
        .name("nbd-handshake".into())
        .spawn(move || {
            handshake_thread(&thread_inner, conn, id, peer, label, admission, &slot);
            // Let go of the engine before the slot says this thread is done, so a stopped
            // server holds the only references.
            drop(thread_inner);
            drop(slot);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "nbd: cannot start handshake thread; closing connection");
    }
}

fn handshake_thread(
    inner: &Inner,
    conn: Conn,
    id: u64,
    peer: String,
    listener: String,
    admission: Admission,
    slot: &Slot,
) {
    let (permit, task_slot) = match admission {
        Admission::Accepted { permit, task_slot } => (permit, task_slot),
        Admission::Refused(why) => {
            let mut stream = DeadlineStream {
                conn: &conn,
                deadline: Instant::now() + REFUSAL_DEADLINE.min(inner.handshake_deadline),
                per_op: inner.handshake_timeout,
                read_timeout: None,
                write_timeout: None,
            };
            if let Err(e) = refuse(&mut stream, &why) {
                tracing::debug!(%peer, error = %e, "nbd: refused client");
            }
            return;
        }
    };
    let mut stream = DeadlineStream {
        conn: &conn,
        deadline: Instant::now() + inner.handshake_deadline,
        per_op: inner.handshake_timeout,
        read_timeout: None,
        write_timeout: None,
    };
    let negotiated = match negotiate(&mut stream, &*inner.catalog, &inner.handshake) {
        Ok(Some(n)) => n,
        Ok(None) => {
            tracing::debug!(%peer, "nbd: client ended the handshake");
            return;
        }
        Err(e) if e.is_disconnect() => {
            tracing::debug!(%peer, error = %e, "nbd: client left during the handshake");
            return;
        }
        Err(e) => {
            tracing::info!(%peer, error = %e, "nbd: handshake failed");
            return;
        }
    };
    if inner.stopping.load(Ordering::Acquire) {
        tracing::debug!(%peer, "nbd: server stopping; dropping negotiated connection");
        return;
    }
    if let Err(e) = conn.set_timeouts(None) {
        tracing::debug!(%peer, error = %e, "nbd: cannot clear socket timeouts; closing");
        return;
    }
    slot.release_socket();
    let info = ClientInfo {
        id,
        peer: peer.clone(),
        export: negotiated.info.name.clone(),
        listener,
        since: SystemTime::now(),
        structured_replies: negotiated.structured_replies,
        extended_headers: negotiated.extended_headers,
        requests: 0,
        bytes_read: 0,
        bytes_written: 0,
        errors: 0,
    };
    // For the idle scan: a duplicate to shut the socket down with, never to close it.
    let idle_socket = match inner.idle_timeout {
        Some(_) => match conn.try_clone() {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!(%peer, error = %e, "nbd: cannot duplicate socket; closing");
                return;
            }
        },
        None => None,
    };
    let fd = conn.into_fd();
    tracing::info!(%peer, export = %info.export, structured = info.structured_replies,
        extended = info.extended_headers, "nbd: client connected");
    let stats = conn::spawn(
        &inner.engine,
        fd,
        negotiated,
        peer,
        conn::Setup {
            multishot: inner.multishot_recv,
            budget: inner.budget.clone(),
            task_slot: Some(task_slot),
            keep_alive: Some(Box::new(permit)),
        },
    );
    inner.registry.add(info, stats, idle_socket);
}

/// Take the listening sockets systemd (or a client such as `nbdinfo -- CMD`) handed over
/// through `LISTEN_PID`/`LISTEN_FDS`, and remove those variables from the environment.
///
/// Call it once, early, before other threads start (it edits the environment). Returns an
/// empty list when the variables are absent or meant for another process.
pub fn take_systemd_listeners() -> io::Result<Vec<Listener>> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Vec::new());
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(Vec::new());
    }
    let bad = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
    let n: usize = fds
        .trim()
        .parse()
        .map_err(|_| bad(format!("LISTEN_FDS={fds:?} is not a number")))?;
    if n > MAX_SYSTEMD_FDS {
        return Err(bad(format!(
            "LISTEN_FDS={n}: at most {MAX_SYSTEMD_FDS} sockets are supported"
        )));
    }
    let mut listeners = Vec::with_capacity(n);
    for i in 0..n {
        let fd = SD_LISTEN_FDS_START + i as RawFd;
        listeners.push(adopt_listener(fd)?);
    }
    Ok(listeners)
}

fn adopt_listener(fd: RawFd) -> io::Result<Listener> {
    use nix::sys::socket::{
        getsockname, getsockopt, sockopt, AddressFamily, SockaddrLike, SockaddrStorage,
    };
    let bad = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
    let st = nix::sys::stat::fstat(fd).map_err(|e| bad(format!("LISTEN_FDS: fd {fd}: {e}")))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(bad(format!("LISTEN_FDS: fd {fd} is not a socket")));
    }
    // SAFETY: socket activation hands these descriptors to this process; nothing else in it
    // uses them, and `take_systemd_listeners` removes the variables so they are adopted once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let listening = getsockopt(&owned, sockopt::AcceptConn)
        .map_err(|e| bad(format!("LISTEN_FDS: fd {fd}: {e}")))?;
    if !listening {
        return Err(bad(format!(
            "LISTEN_FDS: fd {fd} is not a listening socket (Accept=yes is not supported)"
        )));
    }
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| bad(format!("LISTEN_FDS: fd {fd}: {e}")))?;
    let addr: SockaddrStorage =
        getsockname(fd).map_err(|e| bad(format!("LISTEN_FDS: fd {fd}: {e}")))?;
    let listener = match addr.family() {
        Some(AddressFamily::Inet | AddressFamily::Inet6) => Listener::Tcp(TcpListener::from(owned)),
        Some(AddressFamily::Unix) => Listener::Unix(UnixListener::from(owned)),
        other => {
            return Err(bad(format!(
                "LISTEN_FDS: fd {fd} has unsupported address family {other:?}"
            )))
        }
    };
    match &listener {
        Listener::Tcp(l) => l.set_nonblocking(false)?,
        Listener::Unix(l) => l.set_nonblocking(false)?,
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::wire::{
        ClientOption, Greeting, OptionReply, FLAG_C_FIXED_NEWSTYLE, GREETING_LEN,
        OPTION_REPLY_HEADER_LEN,
    };
    use crate::nbd::EngineCatalog;
    use ringblock_engine::{DeviceConfig, EngineConfig};
    use std::sync::OnceLock;

    fn engine() -> Arc<Engine> {
        static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
        ENGINE
            .get_or_init(|| {
                let engine = Engine::start(&EngineConfig {
                    devices: vec![DeviceConfig::ram("r", 64 << 20)],
                    cores: vec![0],
                    ..Default::default()
                })
                .expect("engine starts");
                engine.create_volume("r", "v", 32 << 20).expect("volume");
                Arc::new(engine)
            })
            .clone()
    }

    fn start(config: ServerConfig) -> NbdServer {
        let engine = engine();
        let catalog = Arc::new(EngineCatalog {
            engine: engine.clone(),
            read_only: vec![],
        });
        NbdServer::start(engine, catalog, config).expect("server starts")
    }

    fn localhost() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    fn tcp_addr(server: &NbdServer) -> SocketAddr {
        match server.addrs()[0] {
            BoundAddr::Tcp(a) => a,
            ref other => panic!("{other:?}"),
        }
    }

    /// Greeting, flags, OPT_LIST: returns the export names.
    fn list<S: Read + Write>(s: &mut S) -> Vec<String> {
        let mut g = [0u8; GREETING_LEN];
        s.read_exact(&mut g).unwrap();
        Greeting::decode(&g).unwrap();
        s.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
        let mut v = Vec::new();
        ClientOption::List.encode(&mut v);
        s.write_all(&v).unwrap();
        let mut names = Vec::new();
        for _ in 0..16 {
            let mut buf = vec![0u8; OPTION_REPLY_HEADER_LEN];
            s.read_exact(&mut buf).unwrap();
            let len = u32::from_be_bytes(buf[16..20].try_into().unwrap()) as usize;
            buf.resize(OPTION_REPLY_HEADER_LEN + len, 0);
            s.read_exact(&mut buf[OPTION_REPLY_HEADER_LEN..]).unwrap();
            match OptionReply::decode(&buf).unwrap().1 {
                OptionReply::Server { name, .. } => names.push(name.to_string()),
                OptionReply::Ack => return names,
                other => panic!("unexpected reply {other:?}"),
            }
        }
        panic!("no ACK");
    }

    #[test]
    fn tcp_and_unix_listeners_serve_handshakes_and_stop() {
        let dir = tempfile_dir();
        let path = dir.join("nbd.sock");
        let server = start(ServerConfig {
            tcp: vec![localhost()],
            unix: Some(path.clone()),
            ..Default::default()
        });
        let addrs = server.addrs();
        assert_eq!(addrs.len(), 2);
        let tcp = tcp_addr(&server);
        assert_ne!(tcp.port(), 0);
        assert_eq!(addrs[1], BoundAddr::Unix(Some(path.clone())));
        assert_eq!(
            addrs[1].to_string(),
            format!("nbd+unix:///?socket={}", path.display())
        );
        assert_eq!(addrs[0].uri("v"), format!("nbd://{tcp}/v"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, UNIX_SOCKET_MODE);

        let mut t = TcpStream::connect(tcp).unwrap();
        t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(list(&mut t), vec!["v".to_string()]);
        let mut u = UnixStream::connect(&path).unwrap();
        u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(list(&mut u), vec!["v".to_string()]);

        // Stopping aborts the two handshakes in progress, closes the listeners and removes
        // the socket file.
        server.stop();
        let mut rest = Vec::new();
        assert_eq!(t.read_to_end(&mut rest).unwrap_or(0), 0);
        assert!(!path.exists());
        assert!(TcpStream::connect(tcp).is_err());
        server.stop();
        drop(server);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unix_socket_path_rules() {
        let dir = tempfile_dir();
        // A stale socket file is replaced.
        let stale = dir.join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        let server = start(ServerConfig {
            unix: Some(stale.clone()),
            ..Default::default()
        });
        // A live one is not.
        let engine = engine();
        let catalog = Arc::new(EngineCatalog {
            engine: engine.clone(),
            read_only: vec![],
        });
        let e = NbdServer::start(
            engine.clone(),
            catalog.clone(),
            ServerConfig {
                unix: Some(stale.clone()),
                ..Default::default()
            },
        )
        .err()
        .expect("second server on a live socket fails");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        drop(server);
        assert!(!stale.exists());
        // A regular file is never replaced.
        let file = dir.join("file");
        std::fs::write(&file, b"keep me").unwrap();
        let e = NbdServer::start(
            engine.clone(),
            catalog.clone(),
            ServerConfig {
                tcp: vec![localhost()],
                unix: Some(file.clone()),
                ..Default::default()
            },
        )
        .err()
        .expect("refuses a regular file");
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn slow_clients_time_out_and_a_full_handshake_table_cuts_off_the_oldest() {
        let server = start(ServerConfig {
            tcp: vec![localhost()],
            handshake_timeout: Duration::from_millis(300),
            handshake_deadline: Duration::from_secs(5),
            max_handshakes: 2,
            ..Default::default()
        });
        let addr = tcp_addr(&server);
        // Two silent clients take both slots.
        let mut silent: Vec<TcpStream> =
            (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
        for s in &mut silent {
            let mut g = [0u8; GREETING_LEN];
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.read_exact(&mut g).unwrap();
        }
        // A third is served: the oldest silent client makes room (or has timed out already).
        let mut third = TcpStream::connect(addr).unwrap();
        third
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(list(&mut third), vec!["v".to_string()]);
        // The silent clients are dropped (cut off, or after the timeout).
        for s in &mut silent {
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            assert!(rest.is_empty());
        }
        // And the server still serves.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut t = TcpStream::connect(addr).unwrap();
            t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut g = [0u8; GREETING_LEN];
            if t.read_exact(&mut g).is_ok() {
                assert_eq!(list_after_greeting(&mut t), vec!["v".to_string()]);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "server never freed its handshake slots"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn list_after_greeting(s: &mut TcpStream) -> Vec<String> {
        // `list` expects to read the greeting itself: replay it through a chained reader.
        struct Replay<'a> {
            head: std::io::Cursor<Vec<u8>>,
            s: &'a mut TcpStream,
        }
        impl Read for Replay<'_> {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                let n = self.head.read(b)?;
                if n > 0 {
                    return Ok(n);
                }
                self.s.read(b)
            }
        }
        impl Write for Replay<'_> {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.s.write(b)
            }
            fn flush(&mut self) -> io::Result<()> {
                self.s.flush()
            }
        }
        let greeting = Greeting {
            flags: crate::nbd::handshake::SERVER_HANDSHAKE_FLAGS,
        }
        .to_bytes()
        .to_vec();
        list(&mut Replay {
            head: std::io::Cursor::new(greeting),
            s,
        })
    }

    #[test]
    fn refusal_log_lines_are_rate_limited_with_a_count() {
        let limit = LogLimit::default();
        assert_eq!(limit.note(), Some(1));
        // Within the interval: counted, not logged (bounded loop; the interval is a second).
        let mut logged = 0;
        for _ in 0..1000 {
            logged += usize::from(limit.note().is_some());
        }
        assert!(
            logged <= 1,
            "{logged} lines for 1000 refusals within a second or so"
        );
        // After the interval, the next line carries the count.
        limit.state.lock().unwrap().0 = Some(Instant::now() - REFUSAL_LOG_INTERVAL);
        assert!(limit.note().is_some_and(|n| n >= 1));
    }

    #[test]
    fn garbage_clients_lose_only_their_connection() {
        let server = start(ServerConfig {
            tcp: vec![localhost()],
            ..Default::default()
        });
        let addr = tcp_addr(&server);
        for garbage in [&b"GET / HTTP/1.1\r\n\r\n"[..], &[0xff; 64], &[0u8; 4]] {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = s.write_all(garbage);
            let _ = s.shutdown(Shutdown::Write);
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            let mut t = TcpStream::connect(addr).unwrap();
            t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            assert_eq!(list(&mut t), vec!["v".to_string()]);
        }
    }

    fn tempfile_dir() -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ringblock-nbd-server-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}

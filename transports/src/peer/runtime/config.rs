//! What the peer runtime is started with (checked by the daemon's configuration first) and
//! the one error type of its operations.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ringblock_engine::replication::{NodeId, Role};

use crate::peer::PeerAddress;

/// Where the peer listener listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddress {
    Tcp(SocketAddr),
    /// A Unix socket (tests, or peers on one machine).
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddress::Tcp(a) => write!(f, "{a}"),
            ListenAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// How a replica acknowledges writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PeerMode {
    /// A write completes once the replica has it too.
    #[default]
    Sync,
    /// A write completes after the local copy; the replica is sent a copy from a bounded
    /// queue ([`PeerSpec::queue_limit_bytes`]) and falls behind when it fills.
    Async,
}

/// An async replica's queue bound when the configuration names none.
pub const DEFAULT_ASYNC_QUEUE_BYTES: u64 = 64 << 20;

impl PeerMode {
    pub fn name(self) -> &'static str {
        match self {
            PeerMode::Sync => "sync",
            PeerMode::Async => "async",
        }
    }
}

/// One other copy of a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    pub node: NodeId,
    pub address: PeerAddress,
    pub mode: PeerMode,
    /// An async replica's queue bound: bytes of writes copied for it and not acknowledged
    /// (unused for a sync replica).
    pub queue_limit_bytes: u64,
}

impl PeerSpec {
    /// How the fan-out treats this peer's link.
    pub fn link_mode(&self) -> ringblock_engine::replication::LinkMode {
        match self.mode {
            PeerMode::Sync => ringblock_engine::replication::LinkMode::Sync,
            PeerMode::Async => ringblock_engine::replication::LinkMode::Async {
                queue_limit_bytes: self.queue_limit_bytes,
            },
        }
    }
}

/// One replicated volume as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicatedVolume {
    pub name: String,
    /// The role a new replication record gets; a persisted record's role wins.
    pub role: Role,
    pub peers: Vec<PeerSpec>,
}

/// Pacing of reconnects and bounded waits.
#[derive(Clone, Debug)]
pub struct RuntimeTiming {
    /// First reconnect delay ceiling, doubling up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Time between attempts while the copies are diverged (nothing moves until `resolve`).
    pub diverged_retry: Duration,
    /// Longest wait for a task or thread to end when told to.
    pub stop_wait: Duration,
    /// Time between activity-log eviction cycles on a primary copy.
    pub evict_interval: Duration,
}

impl Default for RuntimeTiming {
    fn default() -> Self {
        RuntimeTiming {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            diverged_retry: Duration::from_secs(60),
            stop_wait: Duration::from_secs(15),
            evict_interval: Duration::from_secs(10),
        }
    }
}

/// Says whether a volume is exported here (NBD clients connected, a ublk device), and how;
/// demote is refused while it is.
pub type ExportProbe = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Everything the runtime needs.
#[derive(Clone)]
pub struct RuntimeConfig {
    pub node: NodeId,
    /// The cluster id as configured (the wire ids are hashed from it, see `peer::ids`).
    pub cluster: String,
    pub secret: Vec<u8>,
    pub listen: ListenAddress,
    pub volumes: Vec<ReplicatedVolume>,
    pub timing: RuntimeTiming,
    pub exports: Option<ExportProbe>,
    /// Where the peers added, removed and suspended at runtime are kept (the daemon's state
    /// directory); None keeps them in memory only.
    pub membership_file: Option<PathBuf>,
}

impl std::fmt::Debug for RuntimeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeConfig")
            .field("node", &self.node)
            .field("cluster", &self.cluster)
            .field("listen", &self.listen)
            .field("volumes", &self.volumes)
            .field("membership_file", &self.membership_file)
            .finish_non_exhaustive()
    }
}

/// Why the runtime did not start, or an operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No such replicated volume or peer.
    #[error("{0}")]
    NotFound(String),
    /// Refused in the current state.
    #[error("{0}")]
    Conflict(String),
    /// The configuration or request cannot be right.
    #[error("{0}")]
    Invalid(String),
    /// The change could not be made durable, or a socket or thread could not be set up.
    #[error("{0}")]
    Failed(String),
}

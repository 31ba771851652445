//! Replication settings: `[peer]` (this node's side of the peer protocol) and each volume's
//! `[[volume.replica]]`, checked into a [`ReplicationConfig`] the peer runtime consumes.
//!
//! ```toml
//! [peer]
//! cluster_id = "lab"                       # the same on every node of the cluster
//! listen = "127.0.0.1:10810"
//! secret_file = "/etc/ringblock/cluster.secret"
//! node_name = "left"                       # optional: shown in status
//!
//! [[volume]]
//! name = "db"
//! device = "nvme0"
//! size_bytes = 10737418240
//! role = "primary"                         # or "replica"; required with replicas
//! [[volume.replica]]
//! node = "0123456789abcdef0123456789abcdef" # the other node's id (32 hex digits)
//! address = "10.0.0.2:10810"
//! mode = "sync"                            # or "async"
//! queue_limit_mib = 64                     # async only: the bound of its queue
//! ```

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ringblock_engine::replication::{NodeId, MAX_REPLICAS};
use serde::{Deserialize, Serialize};

use crate::config::DaemonConfig;

pub const DEFAULT_PEER_LISTEN: &str = "127.0.0.1:10810";
/// Longest cluster id and node name, in bytes.
const MAX_NAME_BYTES: usize = 64;
/// Largest secret file read.
const MAX_SECRET_BYTES: u64 = 4096;

/// `[peer]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Address peers connect to.
    #[serde(default = "default_peer_listen")]
    pub listen: String,
    /// The cluster's shared secret (the same file content on every node; never sent).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Names the cluster: peers of another cluster are refused.
    #[serde(default)]
    pub cluster_id: Option<String>,
    /// This node's name, which other nodes' `[[volume.replica]] node` may use for it.
    #[serde(default)]
    pub node_name: Option<String>,
}

fn default_peer_listen() -> String {
    DEFAULT_PEER_LISTEN.to_string()
}

impl Default for PeerConfig {
    fn default() -> Self {
        Self {
            listen: default_peer_listen(),
            secret_file: None,
            cluster_id: None,
            node_name: None,
        }
    }
}

/// How a replica acknowledges writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaMode {
    /// A write completes once this replica has it too (DRBD protocol C).
    #[default]
    Sync,
    /// A write completes locally; the replica catches up from a bounded queue (protocol A).
    Async,
}

/// `[[volume]] role`: which copy serves clients. Applies when the volume's replication record
/// is first made; afterwards the persisted role wins (`ringblock volume promote/demote`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeRole {
    /// Serves clients and sends every write to its replicas.
    Primary,
    /// Follows a primary; not exported.
    Replica,
}

impl VolumeRole {
    pub fn name(self) -> &'static str {
        match self {
            VolumeRole::Primary => "primary",
            VolumeRole::Replica => "replica",
        }
    }
}

/// `[[volume.replica]]`, as written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    /// The other copy's node id (32 hex digits; `ringblock check-config` there prints it).
    pub node: String,
    /// Where its peer listener is: `host:port`.
    pub address: String,
    #[serde(default)]
    pub mode: ReplicaMode,
    /// An async replica's queue bound, in MiB (default 64).
    #[serde(default)]
    pub queue_limit_mib: Option<u64>,
}

/// An async replica's queue bound when none is configured, and the largest one allowed.
pub const DEFAULT_QUEUE_LIMIT_MIB: u64 = 64;
const MAX_QUEUE_LIMIT_MIB: u64 = 4096;

/// One checked replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replica {
    pub node: NodeId,
    pub address: String,
    pub mode: ReplicaMode,
    /// The async queue's bound (unused for a sync replica).
    pub queue_limit_bytes: u64,
}

/// A volume's checked replica set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeReplicas {
    pub volume: String,
    pub role: VolumeRole,
    pub replicas: Vec<Replica>,
}

/// Everything the peer runtime needs, checked: present only when a volume has replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicationConfig {
    pub node_id: NodeId,
    pub node_name: Option<String>,
    pub cluster_id: String,
    pub listen: SocketAddr,
    pub secret_file: PathBuf,
    pub volumes: Vec<VolumeReplicas>,
    /// The daemon's state directory: the membership file of the replicas added, removed and
    /// suspended at runtime lives there (None: they last until the daemon stops).
    pub state_dir: Option<PathBuf>,
}

/// Cluster ids and node names: plain, short, printable.
fn check_name(what: &str, name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !ok {
        bail!("{what} {name:?} must be 1-{MAX_NAME_BYTES} characters of A-Z a-z 0-9 - _ .");
    }
    Ok(())
}

/// `host:port` with a port that is not 0; the host is an IP address (IPv6 in brackets) or a
/// DNS name. Not resolved here: a name may only resolve where the daemon runs.
pub fn check_address(address: &str) -> Result<(), String> {
    if address.parse::<SocketAddr>().is_ok_and(|a| a.port() != 0) {
        return Ok(());
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err("has no :port".into());
    };
    match port.parse::<u16>() {
        Ok(p) if p != 0 => {}
        _ => return Err(format!("port {port:?} is not 1-65535")),
    }
    let name_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !name_ok {
        return Err(format!(
            "host {host:?} is neither an IP address (IPv6 in [brackets]) nor a DNS name"
        ));
    }
    Ok(())
}

/// A replica's node id. Node names are not resolved (the record and the handshake carry
/// ids): a name is refused with the fix.
/// The async queue's bound in MiB: only an async replica has one, within 1..=4096 MiB.
fn check_queue_limit(r: &ReplicaConfig) -> anyhow::Result<u64> {
    match (r.mode, r.queue_limit_mib) {
        (ReplicaMode::Sync, Some(_)) => bail!(
            "queue_limit_mib is for mode = \"async\" (a sync replica's writes wait for it and \
             queue nothing)"
        ),
        (_, Some(mib)) if !(1..=MAX_QUEUE_LIMIT_MIB).contains(&mib) => {
            bail!("queue_limit_mib = {mib} is outside 1..={MAX_QUEUE_LIMIT_MIB}")
        }
        (_, limit) => Ok(limit.unwrap_or(DEFAULT_QUEUE_LIMIT_MIB)),
    }
}

fn parse_node(node: &str) -> anyhow::Result<NodeId> {
    if node.len() == 32 && node.bytes().all(|b| b.is_ascii_hexdigit()) {
        return node.parse::<NodeId>().map_err(anyhow::Error::msg);
    }
    bail!(
        "node {node:?} is not a node id: replicas are named by node id (32 hex digits); \
         `ringblock check-config` on that node prints its id"
    )
}

impl DaemonConfig {
    /// Whether any volume has replicas.
    pub fn has_replicas(&self) -> bool {
        self.volumes.iter().any(|v| !v.replicas.is_empty())
    }

    /// Checks of `[peer]` and `[[volume.replica]]` that need nothing but the file.
    pub(crate) fn validate_replication_static(&self) -> anyhow::Result<()> {
        self.replica_sets(None).map(|_| ())?;
        if let Some(v) = self
            .volumes
            .iter()
            .find(|v| v.replicas.is_empty() && v.role.is_some())
        {
            bail!(
                "[[volume]] {:?} sets a role but has no [[volume.replica]]: a role applies only \
                 to a replicated volume",
                v.name
            );
        }
        self.peer.listen.parse::<SocketAddr>().with_context(|| {
            format!(
                "[peer] listen = {:?} is not an address:port",
                self.peer.listen
            )
        })?;
        if let Some(id) = &self.peer.cluster_id {
            check_name("[peer] cluster_id", id)?;
        }
        if let Some(name) = &self.peer.node_name {
            check_name("[peer] node_name", name)?;
        }
        if self.has_replicas() {
            if self.peer.cluster_id.is_none() {
                bail!("[peer] cluster_id is required when a volume has replicas (the same on every node)");
            }
            if self.peer.secret_file.is_none() {
                bail!("[peer] secret_file is required when a volume has replicas (the cluster's shared secret)");
            }
        }
        Ok(())
    }

    /// Checks that look at the machine: the secret file.
    pub(crate) fn validate_replication(&self) -> anyhow::Result<()> {
        match &self.peer.secret_file {
            Some(path) if self.has_replicas() => check_secret_file(path),
            _ => Ok(()),
        }
    }

    /// Each volume's checked replicas; `own` is this node's id when known (its own id or
    /// name as a replica is an error).
    fn replica_sets(&self, own: Option<NodeId>) -> anyhow::Result<Vec<VolumeReplicas>> {
        let mut out = Vec::new();
        for v in self.volumes.iter().filter(|v| !v.replicas.is_empty()) {
            let at = |i: usize| format!("[[volume]] {:?}: replica {}", v.name, i + 1);
            if v.replicas.len() > MAX_REPLICAS {
                bail!(
                    "[[volume]] {:?} has {} replicas; a volume may have at most {MAX_REPLICAS}",
                    v.name,
                    v.replicas.len()
                );
            }
            let Some(role) = v.role else {
                bail!(
                    "[[volume]] {:?} has replicas: set role = \"primary\" (this copy serves \
                     clients) or role = \"replica\" (it follows the primary)",
                    v.name
                );
            };
            let mut replicas: Vec<Replica> = Vec::new();
            for (i, r) in v.replicas.iter().enumerate() {
                let node = parse_node(&r.node).with_context(|| at(i))?;
                if replicas.iter().any(|x| x.node == node) {
                    bail!("{}: node {node} is a replica of this volume twice", at(i));
                }
                if Some(node) == own {
                    bail!(
                        "{}: node {node} is this node; a replica must be another node",
                        at(i)
                    );
                }
                check_address(&r.address)
                    .map_err(|e| anyhow::anyhow!("{}: address {:?} {e}", at(i), r.address))?;
                let queue_limit_mib = check_queue_limit(r).with_context(|| at(i))?;
                replicas.push(Replica {
                    node,
                    address: r.address.clone(),
                    mode: r.mode,
                    queue_limit_bytes: queue_limit_mib << 20,
                });
            }
            out.push(VolumeReplicas {
                volume: v.name.clone(),
                role,
                replicas,
            });
        }
        Ok(out)
    }

    /// The checked replication settings for node `own`; None when no volume has replicas.
    pub fn replication(&self, own: NodeId) -> anyhow::Result<Option<ReplicationConfig>> {
        if !self.has_replicas() {
            return Ok(None);
        }
        let volumes = self.replica_sets(Some(own))?;
        let listen = self
            .peer
            .listen
            .parse()
            .with_context(|| format!("[peer] listen = {:?}", self.peer.listen))?;
        let (Some(cluster_id), Some(secret_file)) =
            (self.peer.cluster_id.clone(), self.peer.secret_file.clone())
        else {
            bail!("[peer] cluster_id and secret_file are required when a volume has replicas");
        };
        check_secret_file(&secret_file)?;
        Ok(Some(ReplicationConfig {
            node_id: own,
            node_name: self.peer.node_name.clone(),
            cluster_id,
            listen,
            secret_file,
            volumes,
            state_dir: None,
        }))
    }
}

/// The cluster secret must exist, hold something, belong to the daemon's user and be neither
/// writable by group or others (the token file's rule) nor readable by others.
pub fn check_secret_file(path: &Path) -> anyhow::Result<()> {
    let shown = path.display();
    let meta = std::fs::metadata(path).with_context(|| format!("[peer] secret_file {shown}"))?;
    if !meta.is_file() {
        bail!("[peer] secret_file {shown} is not a regular file");
    }
    if let Some((problem, fix)) =
        ringblock_web::token::ownership_problem(path, &meta, ringblock_web::token::euid())
    {
        bail!("[peer] secret_file {shown}: {problem}; fix: {fix}");
    }
    if meta.mode() & 0o004 != 0 {
        bail!(
            "[peer] secret_file {shown} has mode {:04o}: any local user can read the cluster \
             secret; fix: `chmod 600 {shown}`",
            meta.mode() & 0o7777
        );
    }
    if meta.len() > MAX_SECRET_BYTES {
        bail!(
            "[peer] secret_file {shown} is {} bytes; a secret is at most {MAX_SECRET_BYTES}",
            meta.len()
        );
    }
    let secret = std::fs::read(path).with_context(|| format!("[peer] secret_file {shown}"))?;
    if secret.iter().all(|b| b.is_ascii_whitespace()) {
        bail!("[peer] secret_file {shown} is empty; put the cluster's shared secret in it (e.g. `head -c 32 /dev/urandom | base64 > {shown}` on one node, copied to the others)");
    }
    Ok(())
}

/// Lines `check-config` prints about replication.
pub fn describe(cfg: &DaemonConfig, node: Option<NodeId>) -> Vec<String> {
    let mut lines = Vec::new();
    let id = node.map_or("none yet (made at the first start)".to_string(), |n| {
        n.to_string()
    });
    lines.push(format!(
        "node id {id}{}",
        cfg.peer
            .node_name
            .as_ref()
            .map(|n| format!(", name {n}"))
            .unwrap_or_default()
    ));
    if !cfg.has_replicas() {
        lines.push("replication: no volume has replicas".into());
        return lines;
    }
    lines.push(format!(
        "peer: cluster {}, listen {}, secret {}",
        cfg.peer.cluster_id.as_deref().unwrap_or("?"),
        cfg.peer.listen,
        cfg.peer
            .secret_file
            .as_ref()
            .map_or("?".into(), |p| p.display().to_string())
    ));
    for v in cfg.volumes.iter().filter(|v| !v.replicas.is_empty()) {
        lines.push(format!(
            "volume {}: role {}",
            v.name,
            v.role.map_or("?", VolumeRole::name)
        ));
        for r in &v.replicas {
            lines.push(format!(
                "volume {}: copy on node {} at {} ({})",
                v.name,
                r.node,
                r.address,
                match r.mode {
                    ReplicaMode::Sync => "sync",
                    ReplicaMode::Async => "async",
                }
            ));
        }
    }
    lines
}

#[cfg(test)]
#[path = "replication_tests.rs"]
mod tests;

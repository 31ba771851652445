//! The peers changed at runtime, kept in the daemon's state directory: the configuration file
//! stays the operator's, and this file says what `ringblock replica add|remove|suspend|resume`
//! changed since. At start the runtime merges it with the configuration ([`Membership::merge`]).
//!
//! The file is text, one fact per line, fields separated by tabs:
//!
//! ```text
//! ringblock-replication-membership 1
//! add     VOLUME  NODE  MODE  ADDRESS
//! remove  VOLUME  NODE
//! suspend VOLUME  NODE
//! ```
//!
//! It is replaced atomically (a temporary file, fsync, rename, fsync of the directory), so a
//! crash leaves the old or the new file, never a mix. A file that does not parse stops the
//! daemon with the line and the fix; it is never guessed at.

use std::io::Write;
use std::path::{Path, PathBuf};

use ringblock_engine::replication::NodeId;

use super::config::{PeerMode, PeerSpec, RuntimeError, DEFAULT_ASYNC_QUEUE_BYTES};
use crate::peer::PeerAddress;

/// The first line: the format and its version.
const MAGIC: &str = "ringblock-replication-membership";
const VERSION: u32 = 1;
/// A larger file is not one this daemon wrote (a few lines per volume and peer).
const MAX_FILE_BYTES: u64 = 1 << 20;

/// What changed at runtime, for every volume (the order of the file).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Membership {
    /// (volume, peer) added with `replica add` and not in the configuration at the time.
    pub added: Vec<(String, PeerSpec)>,
    /// (volume, node) removed with `replica remove`.
    pub removed: Vec<(String, NodeId)>,
    /// (volume, node) suspended with `replica suspend`.
    pub suspended: Vec<(String, NodeId)>,
}

impl Membership {
    /// The file at `path`, or an empty membership when there is none.
    pub fn load(path: &Path) -> Result<Membership, RuntimeError> {
        let shown = path.display();
        let bad = |what: String| {
            RuntimeError::Invalid(format!(
                "replication membership file {shown}: {what}; it holds the replicas added, \
                 removed and suspended at runtime: restore it from a backup, or delete it and \
                 redo those changes with `ringblock replica add|remove|suspend`"
            ))
        };
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Membership::default()),
            Err(e) => return Err(bad(e.to_string())),
        };
        if meta.len() > MAX_FILE_BYTES {
            return Err(bad(format!("{} bytes is too large", meta.len())));
        }
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        Membership::parse(&text).map_err(bad)
    }

    /// Parse the file's text (see the module).
    pub fn parse(text: &str) -> Result<Membership, String> {
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, first)) if first == format!("{MAGIC} {VERSION}") => {}
            Some((_, first)) if first.starts_with(MAGIC) => {
                return Err(format!(
                    "unsupported version ({first:?}; this build reads {VERSION})"
                ))
            }
            _ => return Err("not a membership file (no header line)".into()),
        }
        let mut m = Membership::default();
        for (i, line) in lines {
            if line.is_empty() {
                continue;
            }
            let at = |what: &str| format!("line {}: {what}", i + 1);
            let fields: Vec<&str> = line.split('\t').collect();
            let node = |f: &str| f.parse::<NodeId>().map_err(|e| at(&e));
            match fields.as_slice() {
                ["add", volume, n, mode, address] if !volume.is_empty() => {
                    let mode = match *mode {
                        "sync" => PeerMode::Sync,
                        "async" => PeerMode::Async,
                        other => return Err(at(&format!("mode {other:?} is not sync or async"))),
                    };
                    let address = parse_address(address).map_err(|e| at(&e))?;
                    let spec = PeerSpec {
                        node: node(n)?,
                        address,
                        mode,
                        // The API and the file name no bound: the default one.
                        queue_limit_bytes: DEFAULT_ASYNC_QUEUE_BYTES,
                    };
                    m.added.push((volume.to_string(), spec));
                }
                ["remove", volume, n] if !volume.is_empty() => {
                    m.removed.push((volume.to_string(), node(n)?))
                }
                ["suspend", volume, n] if !volume.is_empty() => {
                    m.suspended.push((volume.to_string(), node(n)?))
                }
                _ => return Err(at(&format!("{line:?} is not add, remove or suspend"))),
            }
        }
        Ok(m)
    }

    /// The file's text.
    pub fn encode(&self) -> Result<String, RuntimeError> {
        let field = |f: &str| {
            if f.is_empty() || f.contains(['\t', '\n', '\r']) {
                Err(RuntimeError::Invalid(format!(
                    "{f:?} cannot be kept in the membership file (empty, or a tab or newline)"
                )))
            } else {
                Ok(())
            }
        };
        let mut out = format!("{MAGIC} {VERSION}\n");
        for (volume, p) in &self.added {
            let address = p.address.to_string();
            field(volume)?;
            field(&address)?;
            out.push_str(&format!(
                "add\t{volume}\t{}\t{}\t{address}\n",
                p.node,
                p.mode.name()
            ));
        }
        for (kind, list) in [("remove", &self.removed), ("suspend", &self.suspended)] {
            for (volume, node) in list {
                field(volume)?;
                out.push_str(&format!("{kind}\t{volume}\t{node}\n"));
            }
        }
        Ok(out)
    }

    /// Replace the file at `path` atomically (see the module).
    pub fn store(&self, path: &Path) -> Result<(), RuntimeError> {
        let text = self.encode()?;
        write_atomically(path, text.as_bytes()).map_err(|e| {
            RuntimeError::Failed(format!(
                "cannot write the replication membership file {}: {e}",
                path.display()
            ))
        })
    }

    /// `volume`'s peers: the configured ones less those removed at runtime, then those added
    /// at runtime that the configuration does not list. Each configured peer removed at
    /// runtime is returned too (the caller warns: its entry is ignored).
    pub fn merge(&self, volume: &str, configured: &[PeerSpec]) -> (Vec<PeerSpec>, Vec<NodeId>) {
        let removed = self.removed_of(volume);
        let (ignored, mut peers): (Vec<PeerSpec>, Vec<PeerSpec>) = configured
            .iter()
            .cloned()
            .partition(|p| removed.contains(&p.node));
        for (v, p) in &self.added {
            if v == volume && !peers.iter().any(|c| c.node == p.node) && !removed.contains(&p.node)
            {
                peers.push(p.clone());
            }
        }
        (peers, ignored.into_iter().map(|p| p.node).collect())
    }

    pub fn removed_of(&self, volume: &str) -> Vec<NodeId> {
        of(&self.removed, volume)
    }

    pub fn suspended_of(&self, volume: &str) -> Vec<NodeId> {
        of(&self.suspended, volume)
    }

    /// `spec` is added to `volume` at runtime (and no longer removed or suspended).
    pub fn record_add(&mut self, volume: &str, spec: PeerSpec) {
        self.forget(volume, spec.node);
        self.added.push((volume.to_string(), spec));
    }

    /// `node` is removed from `volume` at runtime.
    pub fn record_remove(&mut self, volume: &str, node: NodeId) {
        self.forget(volume, node);
        self.removed.push((volume.to_string(), node));
    }

    /// `node` of `volume` is suspended, or not.
    pub fn record_suspended(&mut self, volume: &str, node: NodeId, suspended: bool) {
        self.suspended.retain(|(v, n)| !(v == volume && *n == node));
        if suspended {
            self.suspended.push((volume.to_string(), node));
        }
    }

    fn forget(&mut self, volume: &str, node: NodeId) {
        let other = |v: &String, n: NodeId| !(v == volume && n == node);
        self.added.retain(|(v, p)| other(v, p.node));
        self.removed.retain(|(v, n)| other(v, *n));
        self.suspended.retain(|(v, n)| other(v, *n));
    }
}

fn of(list: &[(String, NodeId)], volume: &str) -> Vec<NodeId> {
    list.iter()
        .filter(|(v, _)| v == volume)
        .map(|(_, n)| *n)
        .collect()
}

/// `host:port`, or `unix:PATH` (tests, or peers on one machine).
pub fn parse_address(text: &str) -> Result<PeerAddress, String> {
    if let Some(path) = text.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("unix: needs a socket path".into());
        }
        return Ok(PeerAddress::Unix(PathBuf::from(path)));
    }
    let port = text
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty())
        .and_then(|(_, port)| port.parse::<u16>().ok())
        .filter(|&p| p != 0);
    match port {
        Some(_) if !text.contains(char::is_whitespace) => Ok(PeerAddress::Tcp(text.to_string())),
        _ => Err(format!(
            "address {text:?} is not host:port (a port from 1 to 65535)"
        )),
    }
}

/// Write `bytes` to `path` so that a crash leaves the old file or the new one: a temporary
/// file in the same directory, fsync, rename over `path`, fsync of the directory.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u128) -> NodeId {
        NodeId::new(n).unwrap()
    }

    fn spec(n: u128, address: &str) -> PeerSpec {
        PeerSpec {
            node: node(n),
            address: parse_address(address).unwrap(),
            mode: PeerMode::Sync,
            queue_limit_bytes: DEFAULT_ASYNC_QUEUE_BYTES,
        }
    }

    #[test]
    fn a_membership_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replication-membership");
        assert_eq!(Membership::load(&path).unwrap(), Membership::default());
        let mut m = Membership::default();
        m.record_add("db", spec(7, "10.0.0.3:10810"));
        m.record_add("db", spec(8, "unix:/run/peer.sock"));
        m.record_remove("db", node(9));
        m.record_suspended("logs", node(7), true);
        m.store(&path).unwrap();
        let back = Membership::load(&path).unwrap();
        assert_eq!(back, m);
        assert!(!dir.path().join("replication-membership.tmp").exists());
        // Removing an added peer forgets the add; adding a removed one forgets the remove.
        let mut m = back;
        m.record_remove("db", node(7));
        assert_eq!(m.added.len(), 1);
        m.record_add("db", spec(9, "h:1"));
        assert_eq!(m.removed_of("db"), vec![node(7)]);
        assert_eq!(m.suspended_of("logs"), vec![node(7)]);
    }

    #[test]
    fn merging_drops_the_removed_and_adds_the_added() {
        let mut m = Membership::default();
        m.record_add("db", spec(3, "c:1"));
        m.record_add("db", spec(1, "elsewhere:1"));
        m.record_remove("db", node(2));
        m.record_add("other", spec(4, "d:1"));
        let configured = vec![spec(1, "a:1"), spec(2, "b:1")];
        let (peers, ignored) = m.merge("db", &configured);
        // The configuration's entry wins for a node it lists.
        assert_eq!(peers, vec![spec(1, "a:1"), spec(3, "c:1")]);
        assert_eq!(ignored, vec![node(2)]);
    }

    #[test]
    fn a_damaged_file_is_a_clear_error() {
        for (text, says) in [
            ("", "no header"),
            ("something else\n", "no header"),
            ("ringblock-replication-membership 9\n", "unsupported version"),
            ("ringblock-replication-membership 1\nadd\tdb\n", "line 2"),
            (
                "ringblock-replication-membership 1\nremove\tdb\txyz\n",
                "not a node id",
            ),
            (
                "ringblock-replication-membership 1\nremove\tdb\t00000000000000000000000000000000\n",
                "not all zero",
            ),
            (
                "ringblock-replication-membership 1\nadd\tdb\t00000000000000000000000000000001\tfast\th:1\n",
                "mode",
            ),
            (
                "ringblock-replication-membership 1\nadd\tdb\t00000000000000000000000000000001\tsync\tnoport\n",
                "host:port",
            ),
        ] {
            let e = Membership::parse(text).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        std::fs::write(&path, b"\xff\xfe garbage").unwrap();
        let e = Membership::load(&path).unwrap_err().to_string();
        assert!(e.contains("replica add|remove|suspend"), "{e}");
    }

    #[test]
    fn a_field_with_a_tab_is_refused_on_write() {
        let mut m = Membership::default();
        m.record_remove("bad\tname", node(1));
        assert!(m.encode().is_err());
    }
}

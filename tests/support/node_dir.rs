//! A daemon node's directory for the replication tests: its state directory with the node id,
//! and the cluster secret, with the modes the daemon insists on.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Make `root/name` a node's directory: `state/` (0700) holding `node-id` with `id` (0600),
/// and `cluster.secret` holding `secret` (0600). Returns the directory.
pub fn create(root: &Path, name: &str, id: &str, secret: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(dir.join("state")).unwrap();
    std::fs::set_permissions(dir.join("state"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let idf = dir.join("state/node-id");
    std::fs::write(&idf, format!("{id}\n")).unwrap();
    std::fs::set_permissions(&idf, std::fs::Permissions::from_mode(0o600)).unwrap();
    let secret_file = dir.join("cluster.secret");
    std::fs::write(&secret_file, secret).unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    dir
}

//! This node's identity: a random 128-bit id, made once in the daemon's state directory
//! (`node-id`, one line of 32 hex digits, mode 0600) beside the token and the device records.
//! Peers know a node by it and replication records name replicas by it, so it is never made
//! again behind the operator's back: a damaged or foreign file stops the daemon with what to
//! do, and only a missing file is created.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rand::RngCore;
use ringblock_engine::replication::NodeId;

pub const NODE_ID_FILE: &str = "node-id";
/// One id and a newline; anything much larger is not ours.
const MAX_FILE_BYTES: u64 = 64;

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(NODE_ID_FILE)
}

/// The node id recorded in `state_dir`, None when there is none yet. Reads only.
pub fn read(state_dir: &Path) -> anyhow::Result<Option<NodeId>> {
    let file = path(state_dir);
    let meta = match std::fs::symlink_metadata(&file) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "node id {} (in the state directory: set [web] state_dir or --state-dir to \
                     a usable directory)",
                    file.display()
                )
            })
        }
    };
    if !meta.file_type().is_file() {
        bail!(
            "node id {} is not a regular file; move it away (the daemon makes a new id only \
             where there is none)",
            file.display()
        );
    }
    if let Some((problem, fix)) =
        ringblock_web::token::ownership_problem(&file, &meta, ringblock_web::token::euid())
    {
        bail!(
            "node id {}: {problem}: another local user could change this node's identity; \
             fix: {fix}",
            file.display()
        );
    }
    let damaged = |why: &str| {
        anyhow::anyhow!(
            "node id {} is damaged ({why}). It is this node's identity for its peers and is \
             never made again by itself: restore the file from a backup, or remove it to give \
             this node a new identity (every peer must then be told the new id)",
            file.display()
        )
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(damaged(&format!("{} bytes", meta.len())));
    }
    let text = std::fs::read_to_string(&file).map_err(|e| damaged(&format!("unreadable: {e}")))?;
    text.trim_end_matches('\n')
        .parse::<NodeId>()
        .map(Some)
        .map_err(|e| damaged(&e))
}

/// The node id of `state_dir`, made (and written durably) if there is none. True when made.
pub fn load_or_create(state_dir: &Path) -> anyhow::Result<(NodeId, bool)> {
    if let Some(id) = read(state_dir)? {
        return Ok((id, false));
    }
    ringblock_web::token::create_private_dir(state_dir)
        .with_context(|| format!("state directory {}", state_dir.display()))?;
    let dir_meta = std::fs::metadata(state_dir)
        .with_context(|| format!("state directory {}", state_dir.display()))?;
    if let Some((problem, fix)) =
        ringblock_web::token::ownership_problem(state_dir, &dir_meta, ringblock_web::token::euid())
    {
        bail!(
            "state directory {}: {problem}: another local user could plant this node's \
             identity; fix: {fix}",
            state_dir.display()
        );
    }
    let id = loop {
        let mut bytes = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        if let Some(id) = NodeId::new(u128::from_le_bytes(bytes)) {
            break id;
        }
    };
    let file = path(state_dir);
    let tmp = state_dir.join(format!("{NODE_ID_FILE}.tmp.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(format!("{id}\n").as_bytes())?;
            f.sync_all()?;
        }
        // A link never replaces: if another process made an id meanwhile, its id stands.
        let linked = std::fs::hard_link(&tmp, &file);
        std::fs::remove_file(&tmp)?;
        linked?;
        std::fs::File::open(state_dir)?.sync_all()
    };
    match write() {
        Ok(()) => Ok((id, true)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let id = read(state_dir)?.context("node id file vanished while being made")?;
            Ok((id, false))
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e).with_context(|| format!("writing node id {}", file.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    #[test]
    fn made_once_private_and_then_kept() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        assert!(read(&state).unwrap().is_none());
        let (id, made) = load_or_create(&state).unwrap();
        assert!(made);
        let mode = std::fs::metadata(path(&state))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let owner = std::fs::metadata(path(&state)).unwrap().uid();
        assert_eq!(owner, ringblock_web::token::euid());
        assert_eq!(load_or_create(&state).unwrap(), (id, false));
        assert_eq!(read(&state).unwrap(), Some(id));
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [NODE_ID_FILE]);
    }

    #[test]
    fn a_damaged_file_is_refused_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let file = path(dir.path());
        for bad in [
            "",
            "not hex\n",
            "00000000000000000000000000000000\n",
            "0123456789abcdef0123456789abcdef0\n",
        ] {
            std::fs::write(&file, bad).unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
            let e = load_or_create(dir.path()).unwrap_err();
            assert!(format!("{e:#}").contains("is damaged"), "{bad:?}: {e:#}");
            assert_eq!(
                std::fs::read_to_string(&file).unwrap(),
                bad,
                "left as it was"
            );
        }
        std::fs::write(&file, vec![b'a'; 100]).unwrap();
        assert!(format!("{:#}", read(dir.path()).unwrap_err()).contains("100 bytes"));
    }

    #[test]
    fn no_id_is_made_in_a_directory_others_may_write() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let e = format!("{:#}", load_or_create(dir.path()).unwrap_err());
        assert!(
            e.contains("writable by group or others") && e.contains("chmod 700"),
            "{e}"
        );
        assert!(!path(dir.path()).exists());
    }

    #[test]
    fn a_file_others_may_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, _) = load_or_create(dir.path()).unwrap();
        let file = path(dir.path());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = format!("{:#}", read(dir.path()).unwrap_err());
        assert!(
            e.contains("writable by group or others") && e.contains("chmod 600"),
            "{e}"
        );
    }
}

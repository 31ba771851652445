//! The API token: 32 random bytes from the OS, shown once as hex, stored only as its SHA-256
//! hash in `STATE_DIR/api-token.sha256` (mode 0600, written atomically).
//!
//! The state directory and the token file must belong to the daemon's user and must not be
//! writable by group or others (else another local user could put in a hash of their own
//! token): both are checked at every open and re-read, and refused with the fix otherwise.
//!
//! The new token of a first start goes to the terminal, or, when the daemon's output is not a
//! terminal (a service whose output is kept in the journal), to `STATE_DIR/api-token.first`
//! (mode 0600, see [`write_first_token`]); `ringblock token reset` removes that file.
//!
//! A presented token is hashed and compared with the stored hash in constant time. The store
//! re-reads the file when it changes (`ringblock token reset` on a running daemon takes
//! effect at the next request, without a restart).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rand::RngCore;
use sha2::{Digest, Sha256};

/// File (in the state directory) holding `sha256:HEX` of the token.
pub const TOKEN_FILE: &str = "api-token.sha256";
/// File (in the state directory) holding the token made at the first start when it could not
/// be shown on a terminal.
pub const FIRST_TOKEN_FILE: &str = "api-token.first";
/// Random bytes in a token.
pub const TOKEN_BYTES: usize = 32;
/// Longest token accepted for hashing (longer is refused without work).
const MAX_PRESENTED_BYTES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {problem}: another local user could replace the API token; fix: {fix}")]
    Insecure {
        path: PathBuf,
        problem: String,
        fix: String,
    },
    #[error("{path}: not a token hash (expected one line `sha256:<64 hex digits>`); remove it or run `ringblock token reset`")]
    Corrupt { path: PathBuf },
}

/// Identity of the file's current version, to notice a reset.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    ino: u64,
    mtime_ns: i128,
    len: u64,
}

struct Cached {
    stamp: Stamp,
    hash: [u8; 32],
}

/// The stored token hash of one state directory.
pub struct TokenStore {
    path: PathBuf,
    cached: Mutex<Cached>,
}

impl TokenStore {
    /// Load the stored hash, or create a token if there is none. Returns the new token (to be
    /// shown once) when one was created.
    pub fn open_or_create(dir: &Path) -> Result<(TokenStore, Option<String>), TokenError> {
        open_state_dir(dir)?;
        let path = dir.join(TOKEN_FILE);
        let created = match fs::symlink_metadata(&path) {
            Ok(_) => None,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Some(Self::reset(dir)?),
            Err(source) => return Err(TokenError::Io { path, source }),
        };
        let (hash, stamp) = read_hash(&path)?;
        let store = TokenStore {
            path,
            cached: Mutex::new(Cached { stamp, hash }),
        };
        Ok((store, created))
    }

    /// Make a new token, store its hash in `dir` (created 0700 if missing), return the token.
    pub fn reset(dir: &Path) -> Result<String, TokenError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TokenError::Io { path, source }
        };
        open_state_dir(dir)?;
        let token = generate();
        let path = dir.join(TOKEN_FILE);
        let tmp = dir.join(format!(".{TOKEN_FILE}.tmp-{}", std::process::id()));
        let line = format!("sha256:{}\n", hex(&sha256(token.as_bytes())));
        let write = || -> io::Result<()> {
            let _ = fs::remove_file(&tmp);
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(line.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            // A token written down at the first start no longer works.
            match fs::remove_file(dir.join(FIRST_TOKEN_FILE)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            fs::File::open(dir)?.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(&path)(e));
        }
        Ok(token)
    }

    /// Where the hash is stored.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `presented` is the token. Constant time in the comparison of the hashes.
    pub fn verify(&self, presented: &str) -> bool {
        if presented.is_empty() || presented.len() > MAX_PRESENTED_BYTES {
            return false;
        }
        let want = self.current_hash();
        ct_eq(&sha256(presented.as_bytes()), &want)
    }

    /// The stored hash, re-read if the file changed since last time. If the file became
    /// unreadable or corrupt, the previous hash stays in force (and a warning is logged).
    fn current_hash(&self) -> [u8; 32] {
        let mut c = self.cached.lock().expect("token cache");
        let now = fs::metadata(&self.path).ok().map(|m| stamp(&m));
        if now.is_some_and(|now| now != c.stamp) {
            match read_hash(&self.path) {
                Ok((hash, s)) => {
                    c.hash = hash;
                    c.stamp = s;
                    tracing::info!(path = %self.path.display(), "API token changed");
                }
                Err(e) => {
                    tracing::warn!("API token file unusable, keeping the previous token: {e}")
                }
            }
        }
        c.hash
    }
}

/// Write the token made at a first start to `dir/`[`FIRST_TOKEN_FILE`] (mode 0600, replacing
/// an older one) and return its path.
pub fn write_first_token(dir: &Path, token: &str) -> Result<PathBuf, TokenError> {
    let path = dir.join(FIRST_TOKEN_FILE);
    let write = || -> io::Result<()> {
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(format!("{token}\n").as_bytes())?;
        f.sync_all()
    };
    write().map_err(|source| TokenError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions, touches no memory and cannot fail.
    unsafe { libc::geteuid() }
}

/// Create `dir` if missing (0700) and check that it is a private directory of this user.
fn open_state_dir(dir: &Path) -> Result<(), TokenError> {
    let io_err = |source| TokenError::Io {
        path: dir.to_path_buf(),
        source,
    };
    create_private_dir(dir).map_err(io_err)?;
    let meta = fs::metadata(dir).map_err(io_err)?;
    check_private(dir, &meta, euid())
}

/// Refuse `path` (a state directory or token file) unless `uid` owns it and neither group nor
/// others may write it.
fn check_private(path: &Path, meta: &fs::Metadata, uid: u32) -> Result<(), TokenError> {
    match ownership_problem(path, meta, uid) {
        None => Ok(()),
        Some((problem, fix)) => Err(TokenError::Insecure {
            path: path.to_path_buf(),
            problem,
            fix,
        }),
    }
}

/// What is wrong with `path` (a state directory or a file of it) for a daemon running as
/// `uid`, and the fix: None when `uid` owns it and neither group nor others may write it. The
/// check of the token and its directory, shared with the daemon's other private files (node
/// id, cluster secret).
pub fn ownership_problem(path: &Path, meta: &fs::Metadata, uid: u32) -> Option<(String, String)> {
    let shown = path.display();
    let mode = meta.mode() & 0o7777;
    let (what, private_mode) = if meta.is_dir() {
        ("directory", "700")
    } else {
        ("file", "600")
    };
    if meta.uid() != uid {
        return Some((
            format!(
                "the {what} is owned by uid {} but the daemon runs as uid {uid}",
                meta.uid()
            ),
            format!("`chown {uid} {shown}`, or set [web] state_dir / --state-dir to a directory of this user"),
        ));
    }
    if mode & 0o022 != 0 {
        return Some((
            format!("the {what} has mode {mode:04o}, writable by group or others"),
            format!("`chmod {private_mode} {shown}`"),
        ));
    }
    None
}

/// Create `dir` (and parents) if missing; a new last component gets mode 0700.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn stamp(m: &fs::Metadata) -> Stamp {
    Stamp {
        ino: m.ino(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        len: m.len(),
    }
}

fn read_hash(path: &Path) -> Result<([u8; 32], Stamp), TokenError> {
    let io_err = |source| TokenError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = fs::metadata(path).map_err(io_err)?;
    check_private(path, &meta, euid())?;
    if meta.len() > 1024 {
        return Err(TokenError::Corrupt {
            path: path.to_path_buf(),
        });
    }
    let text = fs::read_to_string(path).map_err(io_err)?;
    let hash = text
        .trim()
        .strip_prefix("sha256:")
        .and_then(unhex32)
        .ok_or_else(|| TokenError::Corrupt {
            path: path.to_path_buf(),
        })?;
    Ok((hash, stamp(&meta)))
}

/// 32 bytes from the OS's random source, as 64 lowercase hex digits.
pub fn generate() -> String {
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex(&bytes)
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Equality without an early exit: the time does not depend on where the bytes differ.
pub fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold back into an early-exit compare.
    std::hint::black_box(diff) == 0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn create_verify_reset() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let (store, token) = TokenStore::open_or_create(&state).unwrap();
        let token = token.expect("a new token at first start");
        assert_eq!(token.len(), 2 * TOKEN_BYTES);
        assert!(store.verify(&token));
        assert!(!store.verify(""));
        assert!(!store.verify(&token[1..]));
        assert!(!store.verify(&"x".repeat(10_000)));
        // Only the hash is stored, privately.
        let text = fs::read_to_string(state.join(TOKEN_FILE)).unwrap();
        assert!(!text.contains(&token));
        assert_eq!(
            text.trim(),
            format!("sha256:{}", hex(&sha256(token.as_bytes())))
        );
        let mode = fs::metadata(state.join(TOKEN_FILE)).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::metadata(&state).unwrap().mode() & 0o777, 0o700);
        // Second start: no new token.
        let (store2, again) = TokenStore::open_or_create(&state).unwrap();
        assert!(again.is_none());
        assert!(store2.verify(&token));
        // A reset is picked up by a running store.
        let new = TokenStore::reset(&state).unwrap();
        assert_ne!(new, token);
        assert!(store.verify(&new));
        assert!(!store.verify(&token));
    }

    #[test]
    fn corrupt_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(TOKEN_FILE), "hello\n").unwrap();
        let e = TokenStore::open_or_create(dir.path()).err().unwrap();
        assert!(e.to_string().contains("token reset"), "{e}");
    }

    #[test]
    fn a_state_dir_or_token_file_others_can_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let (_, token) = TokenStore::open_or_create(&state).unwrap();
        assert!(token.is_some());
        let set_mode = |p: &Path, m: u32| {
            fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
        };
        // A directory group or others can write (e.g. one created first by someone else).
        for mode in [0o777, 0o770, 0o1777, 0o702] {
            set_mode(&state, mode);
            let e = TokenStore::open_or_create(&state).err().expect("refused");
            let text = e.to_string();
            assert!(
                text.contains(&state.display().to_string())
                    && text.contains(&format!("{mode:04o}"))
                    && text.contains(&format!("chmod 700 {}", state.display())),
                "{text}"
            );
            let e = TokenStore::reset(&state).expect_err("refused");
            assert!(e.to_string().contains("chmod 700"), "{e}");
        }
        set_mode(&state, 0o700);
        // A token file group or others can write.
        let file = state.join(TOKEN_FILE);
        set_mode(&file, 0o666);
        let e = TokenStore::open_or_create(&state).err().expect("refused");
        assert!(
            e.to_string()
                .contains(&format!("chmod 600 {}", file.display())),
            "{e}"
        );
        // Readable is fine (it holds only a hash); the usual modes are accepted.
        set_mode(&file, 0o644);
        set_mode(&state, 0o755);
        TokenStore::open_or_create(&state).unwrap();
    }

    #[test]
    fn a_running_store_ignores_a_token_file_made_writable_by_others() {
        let dir = tempfile::tempdir().unwrap();
        let (store, token) = TokenStore::open_or_create(dir.path()).unwrap();
        let token = token.unwrap();
        let file = dir.path().join(TOKEN_FILE);
        // Replaced by a hash of another token and left writable by others: not taken.
        fs::write(&file, format!("sha256:{}\n", hex(&sha256(b"other")))).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o666)).unwrap();
        assert!(store.verify(&token));
        assert!(!store.verify("other"));
    }

    #[test]
    fn files_of_another_user_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let meta = fs::metadata(dir.path()).unwrap();
        check_private(dir.path(), &meta, meta.uid()).unwrap();
        let other = meta.uid().wrapping_add(1);
        let e = check_private(dir.path(), &meta, other)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("owned by uid {}", meta.uid()))
                && e.contains(&format!("runs as uid {other}"))
                && e.contains("chown")
                && e.contains("state_dir"),
            "{e}"
        );
    }

    #[test]
    fn first_token_file_is_private_and_reset_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let (store, token) = TokenStore::open_or_create(dir.path()).unwrap();
        let token = token.unwrap();
        let path = write_first_token(dir.path(), &token).unwrap();
        assert_eq!(path, dir.path().join(FIRST_TOKEN_FILE));
        assert_eq!(fs::read_to_string(&path).unwrap().trim(), token);
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert!(store.verify(&token));
        // Written again (a replaced one is never reused in place).
        write_first_token(dir.path(), &token).unwrap();
        TokenStore::reset(dir.path()).unwrap();
        assert!(!path.exists(), "a reset token makes the first one stale");
    }

    #[test]
    fn constant_time_compare() {
        let a = sha256(b"a");
        let mut b = a;
        assert!(ct_eq(&a, &b));
        b[31] ^= 1;
        assert!(!ct_eq(&a, &b));
        assert_eq!(unhex32(&hex(&a)), Some(a));
        assert_eq!(unhex32("zz"), None);
    }
}

//! The API token: 32 random bytes from the OS, shown once as hex, stored only as its SHA-256
//! hash in `STATE_DIR/api-token.sha256` (mode 0600, written atomically).
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
/// Random bytes in a token.
pub const TOKEN_BYTES: usize = 32;
/// Longest token accepted for hashing (longer is refused without work).
const MAX_PRESENTED_BYTES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
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
        create_private_dir(dir).map_err(io_err(dir))?;
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

/// Create `dir` (and parents) if missing; a new last component gets mode 0700.
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
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

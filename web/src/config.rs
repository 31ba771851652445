//! The `[web]` section of the daemon's configuration.

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the web UI listens unless told otherwise (loopback only).
pub const DEFAULT_WEB_LISTEN: &str = "127.0.0.1:8080";
/// The state directory of a daemon run by root (see [`default_state_dir`]).
pub const SYSTEM_STATE_DIR: &str = "/var/lib/ringblock";

/// `[web]`: the management API and dashboard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebConfig {
    /// Serve the API and dashboard at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `ADDR:PORT` to listen on. Unset: [`DEFAULT_WEB_LISTEN`], and if that port is taken the
    /// daemon runs without the web UI (with a warning). Set: failing to listen is an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Directory of the API token's hash. Unset: see [`default_state_dir`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// Extra `Host` header values accepted on state-changing calls (e.g. `ringblock.lan:8080`
    /// behind a reverse proxy). The listen address and `localhost` are always accepted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_hosts: Vec<String>,
}

fn yes() -> bool {
    true
}

impl Default for WebConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: None,
            state_dir: None,
            allowed_hosts: Vec::new(),
        }
    }
}

impl WebConfig {
    /// Check what can be checked without touching the system.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(l) = &self.listen {
            l.parse::<std::net::SocketAddr>()
                .map_err(|_| format!("[web] listen = {l:?} is not an address:port"))?;
        }
        for h in &self.allowed_hosts {
            if h.is_empty() || h.bytes().any(|b| b.is_ascii_whitespace() || b == b'/') {
                return Err(format!(
                    "[web] allowed_hosts entry {h:?} is not a host[:port]"
                ));
            }
        }
        Ok(())
    }
}

/// No default state directory could be used.
#[derive(Debug, thiserror::Error)]
#[error("no state directory for the web API token ({tried}); set [web] state_dir or --state-dir to a directory of this user (it is created with mode 0700)")]
pub struct NoStateDir {
    /// What was tried, and why each failed.
    tried: String,
}

/// The state directory when none is configured; never a shared temporary directory (another
/// user could create it first).
///
/// - root: [`SYSTEM_STATE_DIR`] (created 0700 if missing).
/// - another user: [`SYSTEM_STATE_DIR`] if it exists and belongs to this user (a service
///   user with systemd's `StateDirectory=`), else `$XDG_STATE_HOME/ringblock`, else
///   `~/.local/state/ringblock` (created 0700 if missing).
///
/// The token store then checks the directory's owner and mode.
pub fn default_state_dir() -> Result<PathBuf, NoStateDir> {
    default_state_dir_in(
        crate::token::euid(),
        Path::new(SYSTEM_STATE_DIR),
        std::env::var_os("XDG_STATE_HOME"),
        std::env::var_os("HOME"),
    )
}

fn default_state_dir_in(
    euid: u32,
    system: &Path,
    xdg_state_home: Option<OsString>,
    home: Option<OsString>,
) -> Result<PathBuf, NoStateDir> {
    let mut tried = Vec::new();
    if euid == 0 {
        match crate::token::create_private_dir(system) {
            Ok(()) => return Ok(system.to_path_buf()),
            Err(e) => tried.push(format!("{}: {e}", system.display())),
        }
    } else if std::fs::metadata(system).is_ok_and(|m| m.is_dir() && m.uid() == euid) {
        return Ok(system.to_path_buf());
    }
    // Relative values are ignored, as the XDG base directory specification asks.
    let absolute = |v: Option<OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
    let mut candidates = Vec::new();
    match absolute(xdg_state_home) {
        Some(x) => candidates.push(x.join("ringblock")),
        None => tried.push("$XDG_STATE_HOME is not set".into()),
    }
    match absolute(home) {
        Some(h) => candidates.push(h.join(".local/state/ringblock")),
        None => tried.push("$HOME is not set".into()),
    }
    for dir in candidates {
        match crate::token::create_private_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) => tried.push(format!("{}: {e}", dir.display())),
        }
    }
    Err(NoStateDir {
        tried: tried.join("; "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_validate() {
        let c: WebConfig =
            toml::from_str("listen = \"127.0.0.1:0\"\nstate_dir = \"/tmp/x\"\n").expect("parses");
        assert!(c.enabled);
        c.validate().unwrap();
        let bad = WebConfig {
            listen: Some("localhost".into()),
            ..WebConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("address:port"));
        assert!(toml::from_str::<WebConfig>("lisen = \"x\"").is_err());
    }

    #[test]
    fn default_state_dir_is_never_shared() {
        let t = tempfile::tempdir().unwrap();
        let system = t.path().join("var-lib-ringblock");
        let xdg = t.path().join("xdg");
        let home = t.path().join("home");
        let os = |p: &Path| Some(p.as_os_str().to_os_string());
        // root: the system directory, created private.
        let d = default_state_dir_in(0, &system, os(&xdg), os(&home)).unwrap();
        assert_eq!(d, system);
        assert_eq!(std::fs::metadata(&system).unwrap().mode() & 0o777, 0o700);
        // Another user: XDG_STATE_HOME, else HOME; the system directory of someone else is
        // not used (here it belongs to the test's user, so use a uid it does not have).
        let me = crate::token::euid();
        let other = me.wrapping_add(1).max(1);
        let d = default_state_dir_in(other, &system, os(&xdg), os(&home)).unwrap();
        assert_eq!(d, xdg.join("ringblock"));
        let d = default_state_dir_in(other, &system, None, os(&home)).unwrap();
        assert_eq!(d, home.join(".local/state/ringblock"));
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        // A system directory that belongs to this (non-root) user is used.
        if me != 0 {
            let d = default_state_dir_in(me, &system, os(&xdg), os(&home)).unwrap();
            assert_eq!(d, system);
        }
        // XDG_STATE_HOME unusable (a file): HOME.
        let file = t.path().join("plain");
        std::fs::write(&file, "x").unwrap();
        let d = default_state_dir_in(other, &system, os(&file), os(&home)).unwrap();
        assert_eq!(d, home.join(".local/state/ringblock"));
        // Nothing usable (and relative values ignored): a clear error, no /tmp fallback.
        let e = default_state_dir_in(other, &system, Some("rel".into()), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[web] state_dir") && e.contains("--state-dir") && e.contains("HOME"),
            "{e}"
        );
        let e = default_state_dir_in(0, &file.join("sub"), None, os(&file))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&file.display().to_string()), "{e}");
    }
}

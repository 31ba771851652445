//! The `[web]` section of the daemon's configuration.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the web UI listens unless told otherwise (loopback only).
pub const DEFAULT_WEB_LISTEN: &str = "127.0.0.1:8080";
/// The system-wide state directory, used when it is writable.
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

/// `/var/lib/ringblock` if it is (or can be made) writable, else `$XDG_STATE_HOME/ringblock`,
/// else `~/.local/state/ringblock`, else a directory under the system's temporary directory.
pub fn default_state_dir() -> PathBuf {
    let system = Path::new(SYSTEM_STATE_DIR);
    if writable_dir(system) {
        return system.to_path_buf();
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("ringblock");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h).join(".local/state/ringblock");
    }
    std::env::temp_dir().join("ringblock-state")
}

/// Whether `dir` exists or can be created, and a file can be created in it.
fn writable_dir(dir: &Path) -> bool {
    if crate::token::create_private_dir(dir).is_err() {
        return false;
    }
    let probe = dir.join(format!(".write-probe-{}", std::process::id()));
    let ok = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
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
}

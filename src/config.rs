//! The daemon's configuration file (TOML). Unknown keys are errors: a typo must never silently
//! fall back to a default on a storage appliance.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ringblock_engine::{DeviceConfig, EngineConfig};
use serde::{Deserialize, Serialize};

/// Size of the embedded default's RAM device and volume.
pub const DEFAULT_VOLUME_BYTES: u64 = 1 << 30;
pub const DEFAULT_NBD_ADDR: &str = "127.0.0.1:10809";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub name: String,
    pub device: String,
    /// Created with this size if missing; grown if it is smaller.
    pub size_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdConfig {
    /// TCP addresses to listen on.
    #[serde(default = "default_nbd_listen")]
    pub listen: Vec<String>,
    /// Unix socket path to listen on.
    #[serde(default)]
    pub unix: Option<PathBuf>,
    /// Volumes exported read-only.
    #[serde(default)]
    pub read_only: Vec<String>,
}

fn default_nbd_listen() -> Vec<String> {
    vec![DEFAULT_NBD_ADDR.to_string()]
}

impl Default for NbdConfig {
    fn default() -> Self {
        Self {
            listen: default_nbd_listen(),
            unix: None,
            read_only: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// CPU ids for reactors; empty = all cores.
    #[serde(default)]
    pub cores: Vec<usize>,
    #[serde(default)]
    pub poll_idle_us: Option<u64>,
    #[serde(default)]
    pub queue_depth: Option<usize>,
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceConfig>,
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeConfig>,
    #[serde(default)]
    pub nbd: NbdConfig,
}

impl DaemonConfig {
    /// One RAM device holding one volume named `default`, exported over NBD on 127.0.0.1.
    pub fn embedded_default() -> Self {
        let overhead = 64 << 20; // label, metadata slots and chunk rounding
        Self {
            devices: vec![DeviceConfig::ram("ram0", DEFAULT_VOLUME_BYTES + overhead)],
            volumes: vec![VolumeConfig {
                name: "default".into(),
                device: "ram0".into(),
                size_bytes: DEFAULT_VOLUME_BYTES,
            }],
            ..Self::default()
        }
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("config {}: cannot read", path.display()))?;
        Self::parse(&text).with_context(|| format!("config {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let cfg: DaemonConfig =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.devices.is_empty() {
            bail!("no [[device]] configured");
        }
        for v in &self.volumes {
            if !self.devices.iter().any(|d| d.name == v.device) {
                bail!(
                    "[[volume]] {:?} names device {:?}, which is not configured",
                    v.name,
                    v.device
                );
            }
        }
        let mut names: Vec<&str> = self.volumes.iter().map(|v| v.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            bail!("[[volume]] {:?} is configured twice", w[0]);
        }
        for addr in &self.nbd.listen {
            addr.parse::<std::net::SocketAddr>()
                .with_context(|| format!("[nbd] listen = {addr:?} is not an address:port"))?;
        }
        Ok(())
    }

    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            cores: self.cores.clone(),
            devices: self.devices.clone(),
            poll_idle_us: self.poll_idle_us,
            queue_depth: self.queue_depth,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let d = DaemonConfig::embedded_default();
        d.validate().unwrap();
        let text = toml::to_string(&d).unwrap();
        assert_eq!(DaemonConfig::parse(&text).unwrap(), d);
    }

    #[test]
    fn unknown_key_names_the_key() {
        let e = DaemonConfig::parse("[[device]]\nname='a'\nkind='ram'\nsize_bytes=1\nbogus=1\n")
            .unwrap_err();
        assert!(format!("{e:#}").contains("bogus"), "{e:#}");
    }

    #[test]
    fn volume_on_unknown_device() {
        let e = DaemonConfig::parse("[[device]]\nname='a'\nkind='ram'\nsize_bytes=1\n[[volume]]\nname='v'\ndevice='b'\nsize_bytes=1\n").unwrap_err();
        assert!(e.to_string().contains("not configured"), "{e}");
    }
}

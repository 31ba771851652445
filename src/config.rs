//! The daemon's configuration file (TOML). Unknown keys are errors: a typo must never silently
//! fall back to a default on a storage appliance.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ringblock_engine::{DeviceConfig, EngineConfig};
use ringblock_transports::nbd::cidr::IpNetwork;
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
    /// "primary" or "replica": required when the volume has replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<crate::replication::VolumeRole>,
    /// `[[volume.replica]]`: copies on other nodes.
    #[serde(default, rename = "replica", skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<crate::replication::ReplicaConfig>,
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
    /// Receive requests with one multishot receive into provided buffers (Linux 6.0+; older
    /// kernels fall back by themselves). `false`: one receive per arrival.
    #[serde(default = "default_true")]
    pub multishot_receive: bool,
    /// Connections at once (in handshake or transmission); beyond, a client is told "too many
    /// connections" during its handshake.
    #[serde(default = "default_nbd_max_connections")]
    pub max_connections: usize,
    /// Connections at once from one client address (0: only `max_connections` applies).
    #[serde(default)]
    pub max_connections_per_address: usize,
    /// Seconds a client has for its whole handshake.
    #[serde(default = "default_nbd_handshake_timeout_s")]
    pub handshake_timeout_s: u64,
    /// Close a connection with nothing in flight after this many seconds without a request
    /// (0: never; the kernel's client keeps idle connections of a mounted file system).
    #[serde(default)]
    pub idle_timeout_s: u64,
    /// TCP client networks allowed to connect ("10.0.0.0/24", "::1/128", or an address);
    /// empty: any. Unix socket clients are governed by the socket file's permissions.
    #[serde(default)]
    pub allowed_clients: Vec<String>,
    /// Reply and request buffer memory of all connections together, in bytes.
    #[serde(default = "default_nbd_buffer_budget_bytes")]
    pub buffer_budget_bytes: u64,
}

/// Largest `[nbd] max_connections` for one reactor; the rest of its task table is left to
/// other tasks (ublk queues).
pub const NBD_CONNECTIONS_PER_REACTOR: usize = ringblock_engine::task::MAX_TASKS_PER_REACTOR - 32;

fn default_nbd_max_connections() -> usize {
    ringblock_transports::nbd::server::DEFAULT_MAX_CONNECTIONS
}

fn default_nbd_handshake_timeout_s() -> u64 {
    ringblock_transports::nbd::server::HANDSHAKE_DEADLINE.as_secs()
}

fn default_nbd_buffer_budget_bytes() -> u64 {
    ringblock_transports::nbd::conn::DEFAULT_BUFFER_BUDGET_BYTES
}

impl NbdConfig {
    /// `allowed_clients`, parsed (validated with the config).
    pub fn allowed_networks(&self) -> anyhow::Result<Vec<IpNetwork>> {
        self.allowed_clients
            .iter()
            .map(|n| {
                n.parse::<IpNetwork>()
                    .with_context(|| format!("[nbd] allowed_clients: {n:?}"))
            })
            .collect()
    }

    /// `cores`: the configured reactor cores (empty: all, known only once the engine runs).
    fn validate(&self, cores: &[usize]) -> anyhow::Result<()> {
        for addr in &self.listen {
            addr.parse::<std::net::SocketAddr>()
                .with_context(|| format!("[nbd] listen = {addr:?} is not an address:port"))?;
        }
        if self.max_connections == 0 {
            bail!("[nbd] max_connections must be at least 1");
        }
        if self.handshake_timeout_s == 0 || self.handshake_timeout_s > 3600 {
            bail!(
                "[nbd] handshake_timeout_s = {} must be between 1 and 3600",
                self.handshake_timeout_s
            );
        }
        if self.buffer_budget_bytes < u64::from(ringblock_transports::nbd::MAX_BLOCK_BYTES) {
            bail!(
                "[nbd] buffer_budget_bytes = {} must be at least {} (one largest request)",
                self.buffer_budget_bytes,
                ringblock_transports::nbd::MAX_BLOCK_BYTES
            );
        }
        self.allowed_networks()?;
        if !cores.is_empty() {
            self.check_connections(cores.len())?;
        }
        Ok(())
    }

    /// `max_connections` against the task tables of `reactors` reactors (known once the engine
    /// runs).
    pub fn check_connections(&self, reactors: usize) -> anyhow::Result<()> {
        let capacity = reactors * NBD_CONNECTIONS_PER_REACTOR;
        if self.max_connections > capacity {
            bail!(
                "[nbd] max_connections = {} is more than {reactors} reactor(s) can host                  ({NBD_CONNECTIONS_PER_REACTOR} each): lower it to at most {capacity}",
                self.max_connections
            );
        }
        Ok(())
    }
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
            multishot_receive: true,
            max_connections: default_nbd_max_connections(),
            max_connections_per_address: 0,
            handshake_timeout_s: default_nbd_handshake_timeout_s(),
            idle_timeout_s: 0,
            allowed_clients: Vec::new(),
            buffer_budget_bytes: default_nbd_buffer_budget_bytes(),
        }
    }
}

/// What an `[[export]]` exposes a volume as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportKind {
    /// A local block device `/dev/ublkbN` (kernel ublk driver).
    Ublk,
}

/// `[[export]]`: a volume made available beyond NBD (which exports every volume anyway).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    pub kind: ExportKind,
    pub volume: String,
    /// ublk: tags per queue (default: the device profile's queue depth, at most 128).
    #[serde(default)]
    pub queue_depth: Option<u16>,
    /// ublk: largest request in bytes (default: the profile's max transfer, at most 512 KiB).
    #[serde(default)]
    pub max_io_bytes: Option<u32>,
}

/// `[ublk]`: settings shared by every ublk export.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UblkConfig {
    /// Where each export records its device id, so a restarted daemon recovers the device.
    #[serde(default = "default_ublk_state_dir")]
    pub state_dir: PathBuf,
    /// Keep `/dev/ublkbN` across a daemon crash/restart (USER_RECOVERY).
    #[serde(default = "default_true")]
    pub recovery: bool,
    /// Let the daemon copy request data itself (USER_COPY, Linux 6.5+) where the driver
    /// offers it: one copy per request instead of two. A recovered device keeps its mode.
    #[serde(default = "default_true")]
    pub user_copy: bool,
}

fn default_ublk_state_dir() -> PathBuf {
    PathBuf::from(ringblock_transports::ublk::DEFAULT_STATE_DIR)
}

fn default_true() -> bool {
    true
}

impl Default for UblkConfig {
    fn default() -> Self {
        Self {
            state_dir: default_ublk_state_dir(),
            recovery: true,
            user_copy: true,
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
    /// `false`: sends to peers copy even where the kernel has zero-copy sends (default: use
    /// them where the start-up probe finds them).
    #[serde(default)]
    pub zero_copy_sends: Option<bool>,
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceConfig>,
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeConfig>,
    #[serde(default)]
    pub nbd: NbdConfig,
    #[serde(default, rename = "export")]
    pub exports: Vec<ExportConfig>,
    #[serde(default)]
    pub ublk: UblkConfig,
    /// Management API and dashboard.
    #[serde(default)]
    pub web: ringblock_web::WebConfig,
    /// This node's side of replication.
    #[serde(default)]
    pub peer: crate::replication::PeerConfig,
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
                role: None,
                replicas: Vec::new(),
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
        cfg.validate_static()?;
        Ok(cfg)
    }

    /// Every check `serve` makes before it starts anything, and all that `check-config`
    /// makes: the file's own consistency, then the engine's checks of cores and devices
    /// (read-only: nothing is created, written or locked), then each volume against its
    /// device's capacity where that is known.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.validate_static()?;
        self.validate_replication()?;
        let probes = self.engine_config().validate()?;
        for v in &self.volumes {
            let Some(i) = self.devices.iter().position(|d| d.name == v.device) else {
                continue; // reported by validate_static
            };
            if let Some(capacity) = probes.get(i).and_then(|p| p.capacity_bytes) {
                if v.size_bytes > capacity {
                    bail!(
                        "[[volume]] {:?}: size_bytes = {} is larger than device {:?} can hold \
                         ({capacity} bytes after its label and metadata)",
                        v.name,
                        v.size_bytes,
                        v.device
                    );
                }
            }
        }
        Ok(())
    }

    /// Checks of the file alone, without looking at the machine.
    fn validate_static(&self) -> anyhow::Result<()> {
        if self.devices.is_empty() {
            bail!("no [[device]] configured");
        }
        for v in &self.volumes {
            ringblock_engine::validate_volume_name(&v.name)
                .map_err(|e| anyhow::anyhow!("[[volume]] {e}"))?;
            if v.size_bytes == 0 {
                bail!("[[volume]] {:?}: size_bytes must not be 0", v.name);
            }
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
        let mut exported: Vec<(ExportKind, &str)> = Vec::new();
        for e in &self.exports {
            if exported.contains(&(e.kind, e.volume.as_str())) {
                bail!(
                    "[[export]] kind = \"ublk\" volume = {:?} is configured twice",
                    e.volume
                );
            }
            exported.push((e.kind, &e.volume));
            if e.queue_depth == Some(0) {
                bail!(
                    "[[export]] volume = {:?}: queue_depth must be at least 1",
                    e.volume
                );
            }
        }
        self.nbd.validate(&self.cores)?;
        self.web.validate().map_err(anyhow::Error::msg)?;
        self.validate_replication_static()?;
        Ok(())
    }

    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            cores: self.cores.clone(),
            devices: self.devices.clone(),
            poll_idle_us: self.poll_idle_us,
            queue_depth: self.queue_depth,
            zero_copy_sends: self.zero_copy_sends,
            state_dir: None,
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
        d.validate_static().unwrap();
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
    fn zero_copy_sends_reach_the_engine() {
        let base = "[[device]]\nname='a'\nkind='ram'\nsize_bytes=1\n";
        let c = DaemonConfig::parse(base).unwrap();
        assert_eq!(c.engine_config().zero_copy_sends, None);
        let c = DaemonConfig::parse(&format!("zero_copy_sends = false\n{base}")).unwrap();
        assert_eq!(c.engine_config().zero_copy_sends, Some(false));
    }

    #[test]
    fn ublk_exports() {
        let base = "[[device]]\nname='a'\nkind='ram'\nsize_bytes=1\n";
        let c = DaemonConfig::parse(&format!(
            "{base}[[export]]\nkind='ublk'\nvolume='v'\n[ublk]\nstate_dir='/tmp/x'\n"
        ))
        .unwrap();
        assert_eq!(c.exports[0].kind, ExportKind::Ublk);
        assert_eq!(c.ublk.state_dir, PathBuf::from("/tmp/x"));
        assert!(c.ublk.recovery);
        let e = DaemonConfig::parse(&format!("{base}[[export]]\nkind='iscsi'\nvolume='v'\n"))
            .unwrap_err();
        assert!(format!("{e:#}").contains("iscsi"), "{e:#}");
        let e = DaemonConfig::parse(&format!(
            "{base}[[export]]\nkind='ublk'\nvolume='v'\n[[export]]\nkind='ublk'\nvolume='v'\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }

    #[test]
    fn web_section() {
        let base = "[[device]]\nname='a'\nkind='ram'\nsize_bytes=1\n";
        let c = DaemonConfig::parse(&format!("{base}[web]\nlisten = '127.0.0.1:9090'\nstate_dir = '/tmp/rb'\nallowed_hosts = ['ui.lan:9090']\n")).unwrap();
        assert_eq!(c.web.listen.as_deref(), Some("127.0.0.1:9090"));
        assert!(c.web.enabled);
        let e = DaemonConfig::parse(&format!("{base}[web]\nlisten = 'nope'\n")).unwrap_err();
        assert!(format!("{e:#}").contains("[web] listen"), "{e:#}");
        let e = DaemonConfig::parse(&format!("{base}[web]\nport = 1\n")).unwrap_err();
        assert!(format!("{e:#}").contains("port"), "{e:#}");
    }

    #[test]
    fn nbd_limits() {
        let base = "[[device]]\nname='a'\nkind='ram'\nsize_bytes=1\n";
        let c = DaemonConfig::parse(&format!(
            "{base}[nbd]\nmax_connections = 300\nidle_timeout_s = 600\n\
             allowed_clients = ['10.0.0.0/24', '::1/128', '192.168.1.7']\n"
        ))
        .unwrap();
        assert_eq!(c.nbd.allowed_networks().unwrap().len(), 3);
        assert_eq!(c.nbd.idle_timeout_s, 600);
        assert!(c.nbd.check_connections(2).is_ok());
        let e = c.nbd.check_connections(1).unwrap_err();
        assert!(e.to_string().contains("max_connections = 300"), "{e}");
        let e = DaemonConfig::parse(&format!(
            "cores = [0]\n{base}[nbd]\nmax_connections = 300\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("at most 224"), "{e}");
        for (bad, says) in [
            ("allowed_clients = ['10.0.0.1/24']", "10.0.0.0/24"),
            ("allowed_clients = ['lan']", "allowed_clients"),
            ("max_connections = 0", "max_connections"),
            ("handshake_timeout_s = 0", "handshake_timeout_s"),
            ("buffer_budget_bytes = 1", "buffer_budget_bytes"),
        ] {
            let e = DaemonConfig::parse(&format!("{base}[nbd]\n{bad}\n")).unwrap_err();
            assert!(format!("{e:#}").contains(says), "{bad}: {e:#}");
        }
    }

    #[test]
    fn volume_on_unknown_device() {
        let e = DaemonConfig::parse("[[device]]\nname='a'\nkind='ram'\nsize_bytes=1\n[[volume]]\nname='v'\ndevice='b'\nsize_bytes=1\n").unwrap_err();
        assert!(e.to_string().contains("not configured"), "{e}");
    }

    fn check(text: &str) -> String {
        match DaemonConfig::parse(text).and_then(|c| c.validate()) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => format!("{e:#}"),
        }
    }

    const RAM: &str = "[[device]]\nname='a'\nkind='ram'\nsize_bytes=67108864\n";

    #[test]
    fn validate_refuses_what_serve_refuses() {
        let dup = format!("{RAM}{}", RAM.replace("67108864", "33554432"));
        assert!(
            check(&dup).contains("\"a\" is used twice"),
            "{}",
            check(&dup)
        );
        for chunk in ["0", "3000", "2048", "2147483648"] {
            let e = check(&format!("{RAM}chunk_size_bytes={chunk}\n"));
            assert!(e.contains("power of two between 4096 and 1 GiB"), "{e}");
        }
        let e = check(&format!("cores=[100000]\n{RAM}"));
        assert!(e.contains("core 100000 is not available"), "{e}");
        let e = check(&format!("cores=[0,0]\n{RAM}"));
        assert!(e.contains("twice"), "{e}");
        let e = check(&format!(
            "{RAM}[[volume]]\nname='v'\ndevice='a'\nsize_bytes=1073741824\n"
        ));
        assert!(e.contains("larger than device \"a\" can hold"), "{e}");
        for bad in ["a b", ".hidden", "x/y", "tab\\tname"] {
            let e = check(&format!(
                "{RAM}[[volume]]\nname={bad:?}\ndevice='a'\nsize_bytes=4096\n"
            ));
            assert!(e.contains("must be 1-128 characters"), "{bad:?}: {e}");
        }
        let e = check(&format!(
            "{RAM}[[volume]]\nname='v'\ndevice='a'\nsize_bytes=0\n"
        ));
        assert!(e.contains("must not be 0"), "{e}");
        let e = check("[[device]]\nname='a'\nkind='ram'\nsize_bytes=4096\n");
        assert!(e.contains("too small"), "{e}");
        let e = check(&format!("queue_depth=0\n{RAM}"));
        assert!(e.contains("queue_depth"), "{e}");
    }

    #[test]
    fn validate_refuses_one_file_twice_and_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let link = dir.path().join("link.img");
        std::os::unix::fs::symlink(&img, &link).unwrap();
        let dev = |name: &str, p: &std::path::Path| {
            format!(
                "[[device]]\nname='{name}'\nkind='file'\npath='{}'\n",
                p.display()
            )
        };
        let e = check(&format!("{}{}", dev("a", &img), dev("b", &link)));
        assert!(e.contains("devices a and b are the same device"), "{e}");
        let foreign = dir.path().join("foreign.img");
        std::fs::write(&foreign, vec![0xAB; 8 << 20]).unwrap();
        let e = check(&dev("a", &foreign));
        assert!(e.contains("refusing to overwrite"), "{e}");
        // Read-only: nothing was created or changed.
        assert!(std::fs::read(&foreign).unwrap().iter().all(|&b| b == 0xAB));
        let new = dir.path().join("new.img");
        DaemonConfig::parse(&format!("{}size_bytes=67108864\n", dev("a", &new)))
            .unwrap()
            .validate()
            .unwrap();
        assert!(!new.exists());
    }
}

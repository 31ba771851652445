//! The targets of a run: raw fio on the backing file, ringblock over NBD (RAM and file
//! devices, Unix socket and TCP, emulated firmware profiles) and its peers (nbdkit memory and
//! file, qemu-nbd, nbd-server). Each is started here, checked with an NBD handshake, and
//! stopped by its [`Server`] guard. A peer that is not installed is reported as skipped with
//! the reason.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::matrix::Tier;
use crate::nbd_load::{self, Endpoint};
use crate::procs::{self, Server};

/// Export (volume) name every target serves.
pub const EXPORT: &str = "bench";

/// Which ringblock device backs a ringblock target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RbDevice {
    /// A `ram` device (the default profile).
    Ram,
    /// The prepared backing file (O_DIRECT `file` device).
    File,
    /// A `ram` device opened with this firmware profile and `emulate_profile_latency`.
    Profile(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Unix,
    Tcp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Kind {
    /// fio io_uring O_DIRECT on the backing file: the limit.
    Raw,
    /// The ringblock engine on the backing file, in process, no transport (the engine step).
    Engine,
    Ringblock {
        device: RbDevice,
        transport: Transport,
    },
    NbdkitMemory {
        transport: Transport,
    },
    NbdkitFile,
    QemuNbd,
    NbdServer,
}

/// A target of the run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TargetSpec {
    /// Stable name (`--targets`, keys, `--compare`).
    pub id: String,
    pub label: String,
    pub kind: Kind,
    pub tier: Tier,
    /// How it serves data, for the report (cache, device, transport).
    pub note: String,
}

impl TargetSpec {
    fn new(id: &str, label: &str, kind: Kind, tier: Tier, note: &str) -> Self {
        Self {
            id: id.into(),
            label: label.into(),
            kind,
            tier,
            note: note.into(),
        }
    }

    pub fn is_nbd(&self) -> bool {
        !matches!(self.kind, Kind::Raw | Kind::Engine)
    }

    /// Whether the target's data lives in memory (prefilled after each start).
    pub fn needs_prefill(&self) -> bool {
        matches!(
            self.kind,
            Kind::Ringblock {
                device: RbDevice::Ram | RbDevice::Profile(_),
                ..
            } | Kind::NbdkitMemory { .. }
        )
    }
}

/// Every target id in run order; `profiles` adds one ringblock target per firmware profile.
pub fn all_targets(profiles: &[String]) -> Vec<TargetSpec> {
    use Transport::{Tcp, Unix};
    let mut v = vec![
        TargetSpec::new(
            "raw",
            "raw fio io_uring",
            Kind::Raw,
            Tier::Raw,
            "fio --ioengine=io_uring --direct=1 on the ringblock data region of the backing file",
        ),
        TargetSpec::new(
            "engine",
            "ringblock engine (local)",
            Kind::Engine,
            Tier::Raw,
            "the engine in process on the backing file (O_DIRECT), one reactor, 4k random read \
             QD32, no transport; alternated with raw fio in rounds",
        ),
        TargetSpec::new(
            "ringblock",
            "ringblock (unix)",
            Kind::Ringblock {
                device: RbDevice::Ram,
                transport: Unix,
            },
            Tier::Headline,
            "ram device, Unix socket",
        ),
        TargetSpec::new(
            "nbdkit-memory",
            "nbdkit memory (unix)",
            Kind::NbdkitMemory { transport: Unix },
            Tier::Headline,
            "nbdkit memory plugin, Unix socket",
        ),
        TargetSpec::new(
            "qemu-nbd",
            "qemu-nbd (unix)",
            Kind::QemuNbd,
            Tier::Headline,
            "raw file on the same file system, page cache (qemu's default cache=writeback), Unix socket",
        ),
        TargetSpec::new(
            "ringblock-tcp",
            "ringblock (tcp)",
            Kind::Ringblock {
                device: RbDevice::Ram,
                transport: Tcp,
            },
            Tier::Secondary,
            "ram device, TCP 127.0.0.1",
        ),
        TargetSpec::new(
            "nbdkit-memory-tcp",
            "nbdkit memory (tcp)",
            Kind::NbdkitMemory { transport: Tcp },
            Tier::Secondary,
            "nbdkit memory plugin, TCP 127.0.0.1",
        ),
        TargetSpec::new(
            "ringblock-file",
            "ringblock file (unix)",
            Kind::Ringblock {
                device: RbDevice::File,
                transport: Unix,
            },
            Tier::Secondary,
            "file device on the backing file (O_DIRECT, no page cache), Unix socket",
        ),
        TargetSpec::new(
            "nbdkit-file",
            "nbdkit file (unix)",
            Kind::NbdkitFile,
            Tier::Secondary,
            "nbdkit file plugin, page cache, Unix socket",
        ),
        TargetSpec::new(
            "nbd-server",
            "nbd-server (unix)",
            Kind::NbdServer,
            Tier::Secondary,
            "nbd-server 3.x, page cache, Unix socket, a forked process per connection",
        ),
    ];
    for p in profiles {
        v.push(TargetSpec {
            id: format!("ringblock-{p}"),
            label: format!("ringblock as {p}"),
            kind: Kind::Ringblock {
                device: RbDevice::Profile(p.clone()),
                transport: Unix,
            },
            tier: Tier::Profile,
            note: format!(
                "ram device with profile \"{p}\" and emulate_profile_latency = true, Unix socket"
            ),
        });
    }
    v
}

/// Default target ids of a run (every one; `nbdkit-memory-tcp` only in `complete`).
pub fn default_target_ids(complete: bool) -> Vec<String> {
    all_targets(&[])
        .into_iter()
        .filter(|t| complete || t.id != "nbdkit-memory-tcp")
        .map(|t| t.id)
        .collect()
}

/// `name` on `PATH`, if present.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Everything the targets share.
#[derive(Clone, Debug)]
pub struct Env {
    /// The `ringblock` binary, if found.
    pub ringblock: Option<PathBuf>,
    /// Whether `ringblock serve` knows `--no-web`.
    pub ringblock_no_web: bool,
    /// Reactor cores for ringblock (`--cores`).
    pub rb_cores: String,
    /// ringblock's `poll_idle_us` (reactors' busy-poll window before parking), if set.
    pub rb_poll_idle_us: Option<u64>,
    /// Short directory for sockets, configs, pid files and logs.
    pub run_dir: PathBuf,
    /// ringblock-formatted backing file (label + volume `bench` filling every chunk).
    pub device_file: PathBuf,
    pub device_file_bytes: u64,
    /// Length of the data region of `device_file` (= every export's size).
    pub region_bytes: u64,
    /// A plain file of `region_bytes` with data, for the file-serving peers.
    pub peer_file: PathBuf,
    /// Region of the profile targets (smaller: emulated devices are slow to prefill).
    pub profile_region_bytes: u64,
}

/// Why a target cannot run here, or `None` when it can.
pub fn unavailable(spec: &TargetSpec, env: &Env) -> Option<String> {
    let need = |bin: &str| {
        which(bin)
            .is_none()
            .then(|| format!("`{bin}` is not installed (not on PATH)"))
    };
    match &spec.kind {
        Kind::Raw => need("fio"),
        Kind::Engine => None,
        Kind::Ringblock { .. } => env.ringblock.is_none().then(|| {
            "the ringblock binary was not found next to ringblock-bench: build it with \
             `cargo build --release -p ringblock` or pass --ringblock PATH"
                .to_string()
        }),
        Kind::NbdkitMemory { .. } | Kind::NbdkitFile => need("nbdkit").or_else(|| {
            let plugin = if matches!(spec.kind, Kind::NbdkitFile) {
                "file"
            } else {
                "memory"
            };
            let ok = Command::new("nbdkit")
                .args(["--dump-plugin", plugin])
                .output()
                .is_ok_and(|o| o.status.success());
            (!ok).then(|| format!("nbdkit has no {plugin} plugin"))
        }),
        Kind::QemuNbd => need("qemu-nbd"),
        Kind::NbdServer => need("nbd-server"),
    }
}

/// A free TCP port on 127.0.0.1 (the kernel's pick; released before the server binds it).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A started target: where to reach it, and the server guard (none for raw/engine).
pub struct Running {
    pub spec: TargetSpec,
    pub server: Option<Server>,
    pub endpoint: Option<Endpoint>,
    /// fio's `--uri` for its nbd engine.
    pub fio_uri: Option<String>,
    /// Bytes every workload may touch.
    pub region_bytes: u64,
    /// The command line that started the server, for the report.
    pub command: String,
}

pub fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn ringblock_config(spec: &TargetSpec, env: &Env, region: u64) -> String {
    let ram_bytes = region + (64 << 20);
    let head = env
        .rb_poll_idle_us
        .map_or(String::new(), |us| format!("poll_idle_us = {us}\n\n"));
    let (dev, device) = match &spec.kind {
        Kind::Ringblock {
            device: RbDevice::File,
            ..
        } => {
            let dev = crate::engine_bench::DEVICE_NAME;
            let device = format!(
                "kind = \"file\"\npath = \"{}\"\nsize_bytes = {}\nformat = \"never\"\n",
                env.device_file.display(),
                env.device_file_bytes
            );
            (dev, device)
        }
        Kind::Ringblock {
            device: RbDevice::Profile(p),
            ..
        } => (
            "ram0",
            format!(
                "kind = \"ram\"\nsize_bytes = {ram_bytes}\nprofile = \"{p}\"\n\
                 emulate_profile_latency = true\n"
            ),
        ),
        _ => (
            "ram0",
            format!("kind = \"ram\"\nsize_bytes = {ram_bytes}\n"),
        ),
    };
    format!(
        "{head}[[device]]\nname = \"{dev}\"\n{device}\n\
         [[volume]]\nname = \"{EXPORT}\"\ndevice = \"{dev}\"\nsize_bytes = {region}\n"
    )
}

/// Start `spec` and wait until it answers an NBD handshake (at most `timeout`).
pub fn start(spec: &TargetSpec, env: &Env, timeout: Duration) -> Result<Running> {
    let region = match spec.kind {
        Kind::Ringblock {
            device: RbDevice::Profile(_),
            ..
        } => env.profile_region_bytes,
        _ => env.region_bytes,
    };
    let mut running = Running {
        spec: spec.clone(),
        server: None,
        endpoint: None,
        fio_uri: None,
        region_bytes: region,
        command: String::new(),
    };
    if matches!(spec.kind, Kind::Raw | Kind::Engine) {
        return Ok(running);
    }
    let (server, (endpoint, uri), command) = launch(spec, env, region)?;
    running.server = Some(server);
    running.endpoint = Some(endpoint);
    running.fio_uri = Some(uri);
    running.command = command;
    wait_ready(&mut running, timeout)?;
    Ok(running)
}

/// A started server, where it listens (the lean client's endpoint, fio's URI), and its
/// command line.
type Launched = (Server, (Endpoint, String), String);

fn unix_endpoint(sock: &Path) -> (Endpoint, String) {
    (
        Endpoint::Unix(sock.to_path_buf()),
        format!("nbd+unix:///{EXPORT}?socket={}", sock.display()),
    )
}

fn tcp_endpoint(port: u16) -> (Endpoint, String) {
    (
        Endpoint::Tcp(format!("127.0.0.1:{port}")),
        format!("nbd://127.0.0.1:{port}/{EXPORT}"),
    )
}

/// Spawn the server of an NBD target, its socket and log in the run directory.
fn launch(spec: &TargetSpec, env: &Env, region: u64) -> Result<Launched> {
    let dir = &env.run_dir;
    let sock = dir.join(format!("{}.sock", spec.id));
    let log = dir.join(format!("{}.log", spec.id));
    let _ = std::fs::remove_file(&sock);
    let (cmd, ep) = match &spec.kind {
        Kind::Raw | Kind::Engine => bail!("{} has no server", spec.id),
        Kind::Ringblock { transport, .. } => {
            ringblock_command(spec, env, region, &sock, transport)?
        }
        Kind::NbdkitMemory { transport } => {
            let mut cmd = Command::new("nbdkit");
            cmd.args(["-f", "--exit-with-parent", "-e", EXPORT]);
            let ep = match transport {
                Transport::Unix => {
                    cmd.arg("-U").arg(&sock);
                    unix_endpoint(&sock)
                }
                Transport::Tcp => {
                    let port = free_port()?;
                    cmd.args(["-i", "127.0.0.1", "-p", &port.to_string()]);
                    tcp_endpoint(port)
                }
            };
            cmd.arg("memory").arg(region.to_string());
            (cmd, ep)
        }
        Kind::NbdkitFile => {
            let mut cmd = Command::new("nbdkit");
            cmd.args(["-f", "--exit-with-parent", "-e", EXPORT, "-U"])
                .arg(&sock)
                .arg("file")
                .arg(&env.peer_file);
            (cmd, unix_endpoint(&sock))
        }
        Kind::QemuNbd => {
            let mut cmd = Command::new("qemu-nbd");
            // -t: keep serving after a client leaves; -e: clients at once (default 1).
            cmd.args(["-f", "raw", "-x", EXPORT, "-t", "-e", "64"])
                .arg(format!("--socket={}", sock.display()))
                .arg(&env.peer_file);
            (cmd, unix_endpoint(&sock))
        }
        Kind::NbdServer => return launch_nbd_server(spec, env, &sock, &log),
    };
    let line = command_line(&cmd);
    Ok((Server::spawn(&spec.id, cmd, &log)?, ep, line))
}

/// `ringblock serve` with a config of its own, always on a TCP port of its own (never the
/// default port another daemon may hold), and on `sock` for the Unix transport.
fn ringblock_command(
    spec: &TargetSpec,
    env: &Env,
    region: u64,
    sock: &Path,
    transport: &Transport,
) -> Result<(Command, (Endpoint, String))> {
    let bin = env.ringblock.as_ref().context("no ringblock binary")?;
    let cfg_path = env.run_dir.join(format!("{}.toml", spec.id));
    std::fs::write(&cfg_path, ringblock_config(spec, env, region))?;
    let port = free_port()?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .arg("--config")
        .arg(&cfg_path)
        .arg("--cores")
        .arg(&env.rb_cores)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"));
    if env.ringblock_no_web {
        cmd.arg("--no-web");
    }
    let ep = match transport {
        Transport::Unix => {
            cmd.arg("--unix").arg(sock);
            unix_endpoint(sock)
        }
        Transport::Tcp => tcp_endpoint(port),
    };
    Ok((cmd, ep))
}

/// nbd-server -d serves one connection only, so it runs as the daemon it is and is adopted (we
/// are its subreaper) through its pid file.
fn launch_nbd_server(spec: &TargetSpec, env: &Env, sock: &Path, log: &Path) -> Result<Launched> {
    let conf = env.run_dir.join("nbd-server.conf");
    let pid_file = env.run_dir.join("nbd-server.pid");
    std::fs::write(
        &conf,
        format!(
            "[generic]\n    unixsock = {}\n    listenaddr = 127.0.0.1\n    port = {}\n\n\
             [{EXPORT}]\n    exportname = {}\n",
            sock.display(),
            free_port()?,
            env.peer_file.display()
        ),
    )?;
    procs::become_subreaper();
    let mut cmd = Command::new("nbd-server");
    cmd.arg("-C").arg(&conf).arg("-p").arg(&pid_file);
    let line = command_line(&cmd);
    Ok((
        Server::adopt_daemon(&spec.id, cmd, &pid_file, log)?,
        unix_endpoint(sock),
        line,
    ))
}

/// Poll with NBD handshakes until the server answers with an export of the expected size.
fn wait_ready(r: &mut Running, timeout: Duration) -> Result<()> {
    let until = Instant::now() + timeout;
    let endpoint = r.endpoint.clone().context("no endpoint")?;
    let mut last_err;
    loop {
        crate::interrupt::check()?;
        let server = r.server.as_mut().context("no server")?;
        if !server.alive() {
            bail!(
                "{} exited during start-up:\n{}",
                r.spec.id,
                server.log_tail(15)
            );
        }
        match nbd_load::probe(&endpoint, EXPORT) {
            Ok(size) if size >= r.region_bytes => return Ok(()),
            Ok(size) => bail!(
                "{} exports {size} bytes, expected at least {}",
                r.spec.id,
                r.region_bytes
            ),
            Err(e) => last_err = e,
        }
        if Instant::now() > until {
            bail!(
                "{} did not answer an NBD handshake within {timeout:?} ({:#}):\n{}",
                r.spec.id,
                last_err,
                server.log_tail(15)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_have_unique_ids_and_tiers() {
        let all = all_targets(&["nvme".into(), "flash".into()]);
        let mut ids: Vec<&str> = all.iter().map(|t| t.id.as_str()).collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n);
        assert!(all
            .iter()
            .any(|t| t.id == "ringblock-nvme" && t.tier == Tier::Profile));
        let quick = default_target_ids(false);
        assert!(!quick.contains(&"nbdkit-memory-tcp".to_string()));
        assert!(default_target_ids(true).contains(&"nbdkit-memory-tcp".to_string()));
        assert!(all
            .iter()
            .filter(|t| t.needs_prefill())
            .all(|t| t.id.starts_with("ringblock") || t.id.starts_with("nbdkit-memory")));
    }

    #[test]
    fn missing_binaries_are_reported() {
        let env = Env {
            ringblock: None,
            ringblock_no_web: false,
            rb_cores: "0".into(),
            rb_poll_idle_us: None,
            run_dir: PathBuf::from("/nonexistent"),
            device_file: PathBuf::new(),
            device_file_bytes: 0,
            region_bytes: 0,
            peer_file: PathBuf::new(),
            profile_region_bytes: 0,
        };
        let rb = all_targets(&[])
            .into_iter()
            .find(|t| t.id == "ringblock")
            .unwrap();
        assert!(unavailable(&rb, &env).unwrap().contains("--ringblock"));
        assert!(which("sh").is_some());
        assert!(which("surely-not-a-program-here").is_none());
    }

    #[test]
    fn ringblock_configs_are_complete() {
        let env = Env {
            ringblock: None,
            ringblock_no_web: false,
            rb_cores: "0".into(),
            rb_poll_idle_us: None,
            run_dir: PathBuf::from("/r"),
            device_file: PathBuf::from("/d/device.img"),
            device_file_bytes: 300 << 20,
            region_bytes: 256 << 20,
            peer_file: PathBuf::from("/d/peer.img"),
            profile_region_bytes: 64 << 20,
        };
        let all = all_targets(&["flash".into()]);
        let get = |id: &str| all.iter().find(|t| t.id == id).unwrap();
        let ram = ringblock_config(get("ringblock"), &env, 256 << 20);
        assert!(ram.contains("kind = \"ram\"") && ram.contains("name = \"bench\""));
        let file = ringblock_config(get("ringblock-file"), &env, 256 << 20);
        assert!(file.contains("path = \"/d/device.img\"") && file.contains("format = \"never\""));
        let flash = ringblock_config(get("ringblock-flash"), &env, 64 << 20);
        assert!(flash.contains("profile = \"flash\"") && flash.contains("emulate_profile_latency"));
        let polled = Env {
            rb_poll_idle_us: Some(0),
            ..env
        };
        assert!(
            ringblock_config(get("ringblock"), &polled, 1 << 30).starts_with("poll_idle_us = 0\n")
        );
    }
}

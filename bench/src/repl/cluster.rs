//! Replicated set-ups on loopback for the replication step and the resync screenshot: a
//! primary daemon with a RAM volume exported over NBD (TCP) and none, one sync or one async
//! replica in a second daemon, each with its own state directory, node id, shared secret,
//! ports and log. The daemons are reached through their API (status, suspend, resume,
//! `/metrics`) with the token each writes at its first start.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ringblock_web::client::ApiClient;
use ringblock_web::replication::{PeerReplicationStatus, ReplicationStatus};

use crate::nbd_load::{self, Endpoint};
use crate::procs::Server;

/// The replicated volume every set-up serves.
pub const VOLUME: &str = "bench";
const PRIMARY_ID: &str = "0123456789abcdef0123456789abcdef";
const REPLICA_ID: &str = "fedcba9876543210fedcba9876543210";

/// What a set-up's primary replicates to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Replica {
    None,
    Sync,
    Async,
}

impl Replica {
    pub fn name(self) -> &'static str {
        match self {
            Replica::None => "none",
            Replica::Sync => "sync",
            Replica::Async => "async",
        }
    }
}

/// How to build a set-up.
#[derive(Clone, Debug)]
pub struct SetupSpec {
    /// Names its directory and logs.
    pub id: String,
    pub replica: Replica,
    pub volume_bytes: u64,
    /// `zero_copy_sends` of both daemons (`None`: the daemon's default).
    pub zero_copy_sends: Option<bool>,
    /// The replica's RAM device emulates this firmware profile's latency (slows a resync).
    pub replica_profile: Option<String>,
    /// `--cores` of the primary and of the replica.
    pub primary_cores: String,
    pub replica_cores: String,
}

/// A free TCP port on 127.0.0.1 (the kernel's pick; released before the daemon binds it).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// One daemon of a set-up: its directory, ports, process and API.
pub struct Daemon {
    pub dir: PathBuf,
    pub web: String,
    pub nbd_port: u16,
    pub server: Server,
    pub command: String,
    api: Option<ApiClient>,
    token: Option<String>,
}

impl Daemon {
    /// The API client (once the daemon wrote its token).
    pub fn api(&self) -> Result<&ApiClient> {
        self.api.as_ref().context("the daemon's API is not up")
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// `/metrics`, as text.
    pub fn metrics(&self) -> Result<String> {
        let token = self.token.as_deref().context("no token")?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .proxy(None)
            .build()
            .into();
        let mut resp = agent
            .get(format!("http://{}/metrics", self.web))
            .header("Authorization", format!("Bearer {token}"))
            .call()
            .with_context(|| format!("GET http://{}/metrics", self.web))?;
        Ok(resp.body_mut().read_to_string()?)
    }
}

/// A primary and, unless [`Replica::None`], its replica.
pub struct Setup {
    pub spec: SetupSpec,
    pub primary: Daemon,
    pub replica: Option<Daemon>,
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// The config of one node of `spec`: a RAM device and the volume, and with a replica the peer
/// section and the other node. `peer`: (this node's peer port, the other's id and peer port).
fn node_config(
    spec: &SetupSpec,
    dir: &Path,
    role: &str,
    peer: Option<(u16, &str, u16)>,
    profile: Option<&str>,
) -> String {
    let ram_bytes = spec.volume_bytes + (64 << 20);
    let mut cfg = String::new();
    if let Some(zc) = spec.zero_copy_sends {
        cfg.push_str(&format!("zero_copy_sends = {zc}\n\n"));
    }
    if let Some((listen, _, _)) = peer {
        cfg.push_str(&format!(
            "[peer]\ncluster_id = \"bench\"\nlisten = \"127.0.0.1:{listen}\"\nsecret_file = \"{}\"\n\n",
            dir.join("cluster.secret").display()
        ));
    }
    cfg.push_str(&format!(
        "[[device]]\nname = \"ram0\"\nkind = \"ram\"\nsize_bytes = {ram_bytes}\n"
    ));
    if let Some(p) = profile {
        cfg.push_str(&format!(
            "profile = \"{p}\"\nemulate_profile_latency = true\n"
        ));
    }
    cfg.push_str(&format!(
        "\n[[volume]]\nname = \"{VOLUME}\"\ndevice = \"ram0\"\nsize_bytes = {}\n",
        spec.volume_bytes
    ));
    if let Some((_, other, other_port)) = peer {
        cfg.push_str(&format!(
            "role = \"{role}\"\n\n[[volume.replica]]\nnode = \"{other}\"\naddress = \"127.0.0.1:{other_port}\"\nmode = \"{}\"\n",
            match spec.replica {
                Replica::Async => "async",
                _ => "sync",
            }
        ));
    }
    cfg
}

/// A node's directory: state directory with its node id, the shared secret.
fn node_dir(root: &Path, name: &str, id: &str) -> Result<PathBuf> {
    let dir = root.join(name);
    let state = dir.join("state");
    std::fs::create_dir_all(&state)?;
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700))?;
    write_private(&state.join("node-id"), &format!("{id}\n"))?;
    write_private(
        &dir.join("cluster.secret"),
        "ringblock-bench cluster secret\n",
    )?;
    Ok(dir)
}

fn spawn_daemon(bin: &Path, dir: &Path, name: &str, cfg: &str, cores: &str) -> Result<Daemon> {
    let cfg_path = dir.join("ringblock.toml");
    std::fs::write(&cfg_path, cfg)?;
    let (nbd_port, web_port) = (free_port()?, free_port()?);
    let web = format!("127.0.0.1:{web_port}");
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .arg("--config")
        .arg(&cfg_path)
        .args(["--cores", cores])
        .arg("--listen")
        .arg(format!("127.0.0.1:{nbd_port}"))
        .args(["--web-listen", &web])
        .arg("--state-dir")
        .arg(dir.join("state"));
    let command = crate::targets::command_line(&cmd);
    let server = Server::spawn(name, cmd, &dir.join("daemon.log"))?;
    Ok(Daemon {
        dir: dir.to_path_buf(),
        web,
        nbd_port,
        server,
        command,
        api: None,
        token: None,
    })
}

/// Wait until the daemon wrote its first token and its API answers.
fn wait_api(d: &mut Daemon, until: Instant) -> Result<()> {
    let first = d
        .dir
        .join("state")
        .join(ringblock_web::token::FIRST_TOKEN_FILE);
    loop {
        crate::interrupt::check()?;
        if !d.server.alive() {
            bail!(
                "the daemon exited during start-up:\n{}",
                d.server.log_tail(15)
            );
        }
        if let Ok(t) = std::fs::read_to_string(&first) {
            let api = ApiClient::new(&format!("http://{}", d.web), Some(t.trim().to_string()))?;
            if api.status().is_ok() {
                d.token = Some(t.trim().to_string());
                d.api = Some(api);
                return Ok(());
            }
        }
        if Instant::now() > until {
            bail!(
                "the daemon's API did not answer in time:\n{}",
                d.server.log_tail(15)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Setup {
    /// Start the set-up in `root` and wait until the primary answers an NBD handshake and its
    /// replica (if any) is up to date.
    pub fn start(bin: &Path, root: &Path, spec: SetupSpec, timeout: Duration) -> Result<Setup> {
        let until = Instant::now() + timeout;
        let base = root.join(&spec.id);
        // A set-up started again (the zero-copy-off one, per repeat) starts from nothing: its
        // RAM devices are new, so no record of the last one may stay.
        if base.exists() {
            std::fs::remove_dir_all(&base)
                .with_context(|| format!("removing {}", base.display()))?;
        }
        let pdir = node_dir(&base, "primary", PRIMARY_ID)?;
        let (replica, pcfg) = if spec.replica == Replica::None {
            (None, node_config(&spec, &pdir, "primary", None, None))
        } else {
            let rdir = node_dir(&base, "replica", REPLICA_ID)?;
            let (pp, rp) = (free_port()?, free_port()?);
            let rcfg = node_config(
                &spec,
                &rdir,
                "replica",
                Some((rp, PRIMARY_ID, pp)),
                spec.replica_profile.as_deref(),
            );
            let mut r = spawn_daemon(
                bin,
                &rdir,
                &format!("{}-replica", spec.id),
                &rcfg,
                &spec.replica_cores,
            )?;
            wait_api(&mut r, until).context("the replica")?;
            let pcfg = node_config(&spec, &pdir, "primary", Some((pp, REPLICA_ID, rp)), None);
            (Some(r), pcfg)
        };
        let mut primary = spawn_daemon(
            bin,
            &pdir,
            &format!("{}-primary", spec.id),
            &pcfg,
            &spec.primary_cores,
        )?;
        wait_api(&mut primary, until).context("the primary")?;
        let setup = Setup {
            spec,
            primary,
            replica,
        };
        setup.wait_nbd(until)?;
        if setup.replica.is_some() {
            setup.wait_peer("up-to-date", until)?;
        }
        Ok(setup)
    }

    /// fio's `--uri` of the primary's export.
    pub fn fio_uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/{VOLUME}", self.primary.nbd_port)
    }

    fn wait_nbd(&self, until: Instant) -> Result<()> {
        let ep = Endpoint::Tcp(format!("127.0.0.1:{}", self.primary.nbd_port));
        loop {
            crate::interrupt::check()?;
            match nbd_load::probe(&ep, VOLUME) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > until => {
                    bail!("the primary did not answer an NBD handshake in time: {e:#}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The primary's replication status.
    pub fn status(&self) -> Result<ReplicationStatus> {
        Ok(self.primary.api()?.replication()?)
    }

    /// The primary's view of its peer (the one replica).
    pub fn peer(&self) -> Result<PeerReplicationStatus> {
        let s = self.status()?;
        s.volumes
            .iter()
            .find(|v| v.volume == VOLUME)
            .and_then(|v| v.peers.first().cloned())
            .with_context(|| format!("no peer of volume {VOLUME} in the primary's status"))
    }

    /// Wait until the peer's state is `state`.
    pub fn wait_peer(&self, state: &str, until: Instant) -> Result<PeerReplicationStatus> {
        loop {
            crate::interrupt::check()?;
            let p = self.peer()?;
            if p.state == state {
                return Ok(p);
            }
            if Instant::now() > until {
                bail!(
                    "the replica is {} (reason: {}), not {state}, after waiting",
                    p.state,
                    p.reason.as_deref().unwrap_or("-")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn suspend(&self) -> Result<String> {
        Ok(self.primary.api()?.suspend_replica(VOLUME, REPLICA_ID)?)
    }

    pub fn resume(&self) -> Result<String> {
        Ok(self.primary.api()?.resume_replica(VOLUME, REPLICA_ID)?)
    }

    /// Whether a daemon of the set-up died, with its log's tail.
    pub fn died(&mut self) -> Option<String> {
        let mut out = None;
        for d in std::iter::once(&mut self.primary).chain(self.replica.as_mut()) {
            if !d.server.alive() {
                out = Some(format!(
                    "{} died:\n{}",
                    d.server_name(),
                    d.server.log_tail(15)
                ));
            }
        }
        out
    }

    /// Stop both daemons (the replica last, so the primary's last writes reach it).
    pub fn stop(mut self) {
        for d in std::iter::once(&mut self.primary).chain(self.replica.as_mut()) {
            if let Err(e) = d.server.stop() {
                eprintln!("  stopping: {e:#}");
            }
        }
    }
}

impl Daemon {
    fn server_name(&self) -> String {
        self.dir
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    }
}

/// Zero-copy send counters summed over a daemon's reactors (its `/metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SendTotals {
    pub zero_copy: u64,
    pub kernel_copied: u64,
    pub copied_small: u64,
    pub copied_unsupported: u64,
}

impl SendTotals {
    /// Sum the per-reactor counters out of `/metrics` text.
    pub fn parse(metrics: &str) -> SendTotals {
        let mut t = SendTotals::default();
        for line in metrics.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(v) = value.trim().parse::<f64>() else {
                continue;
            };
            let v = v as u64;
            let name = series.split('{').next().unwrap_or("");
            match name {
                "ringblock_reactor_zero_copy_sends_total" => t.zero_copy += v,
                "ringblock_reactor_zero_copy_kernel_copied_total" => t.kernel_copied += v,
                "ringblock_reactor_copied_sends_total" if series.contains("reason=\"small\"") => {
                    t.copied_small += v
                }
                "ringblock_reactor_copied_sends_total" => t.copied_unsupported += v,
                _ => {}
            }
        }
        t
    }

    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &SendTotals) -> SendTotals {
        SendTotals {
            zero_copy: self.zero_copy.saturating_sub(earlier.zero_copy),
            kernel_copied: self.kernel_copied.saturating_sub(earlier.kernel_copied),
            copied_small: self.copied_small.saturating_sub(earlier.copied_small),
            copied_unsupported: self
                .copied_unsupported
                .saturating_sub(earlier.copied_unsupported),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_totals_sum_reactors_and_split_reasons() {
        let text = "# TYPE ringblock_reactor_zero_copy_sends_total counter\n\
            ringblock_reactor_zero_copy_sends_total{reactor=\"0\",core=\"0\"} 5\n\
            ringblock_reactor_zero_copy_sends_total{reactor=\"1\",core=\"1\"} 2\n\
            ringblock_reactor_zero_copy_kernel_copied_total{reactor=\"0\",core=\"0\"} 4\n\
            ringblock_reactor_copied_sends_total{reactor=\"0\",core=\"0\",reason=\"small\"} 9\n\
            ringblock_reactor_copied_sends_total{reactor=\"0\",core=\"0\",reason=\"unsupported\"} 3\n";
        let t = SendTotals::parse(text);
        assert_eq!(
            t,
            SendTotals {
                zero_copy: 7,
                kernel_copied: 4,
                copied_small: 9,
                copied_unsupported: 3
            }
        );
        assert_eq!(t.since(&t), SendTotals::default());
    }

    #[test]
    fn configs_name_the_other_node_and_the_mode() {
        let spec = SetupSpec {
            id: "a".into(),
            replica: Replica::Async,
            volume_bytes: 1 << 30,
            zero_copy_sends: Some(false),
            replica_profile: None,
            primary_cores: "0".into(),
            replica_cores: "1".into(),
        };
        let c = node_config(
            &spec,
            Path::new("/n"),
            "primary",
            Some((1, REPLICA_ID, 2)),
            None,
        );
        assert!(c.starts_with("zero_copy_sends = false\n"), "{c}");
        assert!(
            c.contains("mode = \"async\"") && c.contains(REPLICA_ID),
            "{c}"
        );
        assert!(c.contains("address = \"127.0.0.1:2\"") && c.contains("role = \"primary\""));
        let none = node_config(
            &SetupSpec {
                replica: Replica::None,
                zero_copy_sends: None,
                ..spec
            },
            Path::new("/n"),
            "primary",
            None,
            None,
        );
        assert!(!none.contains("[peer]") && !none.contains("role"), "{none}");
    }
}

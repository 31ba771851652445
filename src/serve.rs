//! `ringblock serve`: start the engine and the exports, wait for SIGINT/SIGTERM, drain, flush.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use nix::sys::signal::{SigSet, Signal};
use ringblock_engine::{Engine, EngineError};
use ringblock_transports::nbd::server::{
    take_systemd_listeners, BoundAddr, Listener, NbdServer, ServerConfig,
};
use ringblock_transports::nbd::EngineCatalog;

use crate::config::{DaemonConfig, ExportConfig, ExportKind};

#[derive(clap::Args, Default)]
pub struct ServeArgs {
    /// Configuration file (TOML). Without it: one RAM-backed volume `default` over NBD on 127.0.0.1.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Reactor cores, e.g. `0,1` (overrides the file).
    #[arg(long, value_delimiter = ',')]
    pub cores: Option<Vec<usize>>,
    /// NBD TCP address to listen on, e.g. `127.0.0.1:10809` (repeatable; replaces `[nbd] listen`).
    #[arg(long = "listen", value_name = "ADDR")]
    pub listen: Vec<String>,
    /// NBD Unix socket to create (replaces `[nbd] unix`).
    #[arg(long, value_name = "PATH")]
    pub unix: Option<PathBuf>,
    /// Also export VOLUME as a local block device /dev/ublkbN (adds to `[[export]]`; repeatable).
    #[arg(long = "ublk", value_name = "VOLUME")]
    pub ublk: Vec<String>,
    #[command(flatten)]
    pub web: crate::web::WebArgs,
}

/// Why the daemon stopped with an error: the operator's input, or the machine.
pub enum Failure {
    Config(anyhow::Error),
    Runtime(anyhow::Error),
}

impl From<EngineError> for Failure {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Profile { .. }
            | EngineError::Config(_)
            | EngineError::Volume { .. }
            | EngineError::Device { .. }
            | EngineError::Metadata { .. } => Failure::Config(e.into()),
            EngineError::DeviceIo { .. } | EngineError::Ring(_) | EngineError::Shutdown => {
                Failure::Runtime(e.into())
            }
        }
    }
}

pub fn run(args: ServeArgs) -> Result<(), Failure> {
    // Sockets from systemd socket activation (or from a client launching us captive, e.g.
    // `nbdinfo -- ringblock serve`). Taken first: it edits the environment, so no other
    // thread may run yet.
    let inherited = take_systemd_listeners()
        .context("systemd socket activation")
        .map_err(Failure::Config)?;
    let activated = !inherited.is_empty();
    // Under socket activation stdout may belong to the client that launched us (nbdinfo
    // prints its JSON there), so status lines go to stderr instead.
    let say = |line: String| {
        if activated {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    let cfg = load_config(&args)?;
    let replication = replication_config(&cfg, &args.web.state_dir)?;
    let tcp = nbd_tcp_addresses(&args, &cfg, activated)?;
    let unix = args.unix.clone().or_else(|| {
        if activated {
            None
        } else {
            cfg.nbd.unix.clone()
        }
    });
    let web = crate::web::prepare(&args.web, &cfg, activated, &say)?;
    // Block the stop signals before any thread starts, so every thread inherits the mask and
    // only the sigwait below sees them.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGINT);
    stop.add(Signal::SIGTERM);
    stop.thread_block()
        .context("blocking signals")
        .map_err(Failure::Runtime)?;

    let mut engine_config = cfg.engine_config();
    // Device state records live next to the web token.
    engine_config.state_dir = match crate::web::state_dir(&args.web.state_dir, &cfg) {
        Ok(dir) => Some(dir),
        // Without persistent devices there is nothing to record.
        Err(_) if !cfg.devices.iter().any(|d| d.kind.persistent()) => None,
        Err(e) => return Err(e),
    };
    let engine = Engine::start(&engine_config)?;
    cfg.nbd
        .check_connections(engine.reactor_count() as usize)
        .map_err(Failure::Config)?;
    ensure_volumes(&engine, &cfg)?;
    announce(&engine, &cfg, &say);
    let engine = Arc::new(engine);
    // Before any export: a replica copy has its role (and refuses export) from the start.
    let nbd_clients = crate::peer_control::NbdClients::default();
    let peers = start_replication(&engine, replication, nbd_clients.clone(), &say)?;
    let server = match start_nbd(&engine, &cfg, tcp, unix, inherited) {
        Ok(s) => s,
        Err(e) => {
            stop_replication(peers);
            return Err(e);
        }
    };
    let _ = nbd_clients.set(server.registry());
    announce_listeners(&server, &cfg, activated, &say);
    if let Err(e) = start_exports(&engine, &cfg, &say) {
        stop_exports();
        server.stop();
        stop_replication(peers);
        return Err(e);
    }
    // After the signal mask is set: the web server's threads inherit it.
    let web = match web.map(|w| {
        crate::web::start(
            w,
            &engine,
            &server,
            &cfg,
            peers.as_ref().map(|p| p.control.clone()),
            &say,
        )
    }) {
        Some(Err(e)) => {
            stop_exports();
            server.stop();
            stop_replication(peers);
            return Err(e);
        }
        Some(Ok(w)) => Some(w),
        None => None,
    };
    say(format!(
        "ringblock: engine running on {} reactor(s)",
        engine.reactor_count()
    ));
    say("ringblock: ready".into());
    let signal = stop
        .wait()
        .context("waiting for signals")
        .map_err(Failure::Runtime)?;
    tracing::info!(?signal, "stopping: draining and flushing");
    stop_everything(web, server, peers, engine)?;
    say("ringblock: stopped cleanly".into());
    Ok(())
}

/// The configuration file (or the embedded default) with the command line's overrides, checked
/// as `check-config` checks it.
fn load_config(args: &ServeArgs) -> Result<DaemonConfig, Failure> {
    let mut cfg = match &args.config {
        Some(path) => DaemonConfig::load(path).map_err(Failure::Config)?,
        None => DaemonConfig::embedded_default(),
    };
    if let Some(cores) = args.cores.clone() {
        cfg.cores = cores;
    }
    for volume in &args.ublk {
        if !cfg
            .exports
            .iter()
            .any(|e| e.kind == ExportKind::Ublk && &e.volume == volume)
        {
            cfg.exports.push(ExportConfig {
                kind: ExportKind::Ublk,
                volume: volume.clone(),
                queue_depth: None,
                max_io_bytes: None,
            });
        }
    }
    // The same checks as `check-config`, after the command line's overrides.
    cfg.validate().map_err(Failure::Config)?;
    Ok(cfg)
}

/// The NBD TCP addresses to listen on.
fn nbd_tcp_addresses(
    args: &ServeArgs,
    cfg: &DaemonConfig,
    activated: bool,
) -> Result<Vec<SocketAddr>, Failure> {
    // Addresses given on the command line always apply; the configured ones only without
    // socket activation.
    let tcp_text = if !args.listen.is_empty() {
        args.listen.clone()
    } else if activated {
        Vec::new()
    } else {
        cfg.nbd.listen.clone()
    };
    let mut tcp = Vec::new();
    for a in &tcp_text {
        tcp.push(a.parse::<SocketAddr>().map_err(|_| {
            Failure::Config(anyhow::anyhow!(
                "nbd listen address {a:?} is not an address:port"
            ))
        })?);
    }
    Ok(tcp)
}

/// Create the configured volumes that do not exist yet and grow those configured larger.
fn ensure_volumes(engine: &Engine, cfg: &DaemonConfig) -> Result<(), Failure> {
    for v in &cfg.volumes {
        match engine.volume(&v.name) {
            None => {
                engine.create_volume(&v.device, &v.name, v.size_bytes)?;
            }
            Some(existing) if existing.device.name != v.device => {
                return Err(Failure::Config(anyhow::anyhow!(
                    "[[volume]] {:?} is configured on device {:?} but exists on {:?}",
                    v.name,
                    v.device,
                    existing.device.name
                )));
            }
            Some(existing) if existing.size_bytes() < v.size_bytes => {
                engine.grow_volume(&v.name, v.size_bytes)?
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Say what the engine holds, and warn about settings that name nothing.
fn announce(engine: &Engine, cfg: &DaemonConfig, say: &dyn Fn(String)) {
    for d in engine.devices() {
        say(format!(
            "ringblock: device {} ({}, profile {}): {} bytes, {} chunks of {} bytes, {} in use, block {}/{} bytes",
            d.name,
            d.kind,
            d.profile.name,
            d.size_bytes,
            d.total_chunks(),
            d.chunk_size_bytes(),
            d.used_chunks(),
            d.profile.logical_block_size_bytes,
            d.profile.physical_block_size_bytes
        ));
    }
    for v in engine.volumes() {
        say(format!(
            "ringblock: volume {} on {} ({} bytes, {} of {} chunks allocated)",
            v.name,
            v.device.name,
            v.size_bytes(),
            v.allocated_chunks(),
            v.size_bytes().div_ceil(v.chunk_size_bytes())
        ));
    }
    for name in &cfg.nbd.read_only {
        if engine.volume(name).is_none() {
            tracing::warn!(volume = %name, "[nbd] read_only names a volume that does not exist");
        }
    }
}

/// The NBD server over the engine, on the given sockets, with the configured limits.
fn start_nbd(
    engine: &Arc<Engine>,
    cfg: &DaemonConfig,
    tcp: Vec<SocketAddr>,
    unix: Option<PathBuf>,
    inherited: Vec<Listener>,
) -> Result<NbdServer, Failure> {
    let catalog = Arc::new(EngineCatalog {
        engine: engine.clone(),
        read_only: cfg.nbd.read_only.clone(),
    });
    NbdServer::start(
        engine.clone(),
        catalog,
        ServerConfig {
            tcp,
            unix,
            inherited,
            multishot_recv: cfg.nbd.multishot_receive,
            max_connections: cfg.nbd.max_connections,
            max_connections_per_address: cfg.nbd.max_connections_per_address,
            handshake_deadline: std::time::Duration::from_secs(cfg.nbd.handshake_timeout_s),
            idle_timeout: Some(std::time::Duration::from_secs(cfg.nbd.idle_timeout_s)),
            allowed_clients: cfg.nbd.allowed_networks().map_err(Failure::Config)?,
            buffer_budget_bytes: cfg.nbd.buffer_budget_bytes,
            ..ServerConfig::default()
        },
    )
    .map_err(|e| Failure::Config(e.into()))
}

/// Say where NBD listens, and warn loudly when that is beyond loopback.
fn announce_listeners(
    server: &NbdServer,
    cfg: &DaemonConfig,
    activated: bool,
    say: &dyn Fn(String),
) {
    for addr in server.addrs() {
        let how = if activated {
            " (socket activation)"
        } else {
            ""
        };
        say(format!("ringblock: nbd listening on {addr}{how}"));
        if matches!(addr, BoundAddr::Tcp(a) if !a.ip().to_canonical().is_loopback()) {
            let who = if cfg.nbd.allowed_clients.is_empty() {
                "any client that reaches it".to_string()
            } else {
                format!("clients in {:?}", cfg.nbd.allowed_clients)
            };
            tracing::warn!(%addr, "nbd listens beyond loopback without TLS or authentication: {who} can read and write every exported volume (see [nbd] allowed_clients and read_only)");
            say(format!("ringblock: warning: nbd on {addr} has no TLS or authentication; {who} can use every export"));
        }
    }
}

/// The peer runtime and the control the web layer uses over it, while replication runs.
struct Replication {
    runtime: Arc<ringblock_transports::peer::PeerRuntime>,
    /// What the web layer's replication routes use (`None` without replicated volumes).
    control: Arc<dyn ringblock_web::ReplicationControl>,
}

/// Start the peer runtime when a volume has replicas. A volume that carries a replication
/// record without being configured as replicated is refused either way.
fn start_replication(
    engine: &Arc<Engine>,
    replication: Option<crate::replication::ReplicationConfig>,
    nbd: crate::peer_control::NbdClients,
    say: &dyn Fn(String),
) -> Result<Option<Replication>, Failure> {
    let configured: Vec<&str> = replication
        .as_ref()
        .map(|r| r.volumes.iter().map(|v| v.volume.as_str()).collect())
        .unwrap_or_default();
    ringblock_transports::peer::runtime::check_unconfigured_records(engine, &configured)
        .map_err(|e| Failure::Config(e.into()))?;
    let Some(config) = replication else {
        return Ok(None);
    };
    let runtime = crate::peer_control::start(engine, &config, nbd).map_err(Failure::Config)?;
    say(format!(
        "ringblock: peer listening on {} as node {}",
        runtime.listening(),
        config.node_id
    ));
    for v in runtime.volumes() {
        say(format!(
            "ringblock: volume {} is replicated here as {}",
            v.name,
            match v.replication.role() {
                ringblock_engine::replication::Role::Primary => "the primary",
                ringblock_engine::replication::Role::Replica => "a replica (not exported)",
            }
        ));
    }
    let control = Arc::new(crate::peer_control::RuntimeControl {
        runtime: runtime.clone(),
        config,
    });
    Ok(Some(Replication { runtime, control }))
}

/// Stop the peer runtime (its listener, connectors and link tasks) and let go of the engine.
fn stop_replication(replication: Option<Replication>) {
    if let Some(r) = replication {
        r.runtime.stop();
    }
}

/// Stop in order: the web server, the ublk exports, the NBD server, the peer runtime, then
/// the engine (which drains and flushes).
fn stop_everything(
    mut web: Option<ringblock_web::WebServer>,
    server: NbdServer,
    peers: Option<Replication>,
    engine: Arc<Engine>,
) -> Result<(), Failure> {
    // The web server drops its engine reference (and any command in progress finishes).
    if let Some(w) = web.as_mut() {
        w.stop();
    }
    drop(web);
    // ublk queues live on the reactors: remove the devices before the engine stops.
    stop_exports();
    // Stop accepting first; afterwards the server holds the only other engine reference.
    server.stop();
    drop(server);
    stop_replication(peers);
    match Arc::try_unwrap(engine) {
        Ok(engine) => engine
            .shutdown()
            .context("flushing at shutdown")
            .map_err(Failure::Runtime)?,
        Err(engine) => {
            tracing::warn!("engine still referenced at shutdown; flushing only");
            engine
                .flush_all()
                .context("flushing at shutdown")
                .map_err(Failure::Runtime)?;
        }
    }
    Ok(())
}

/// This node's id (made at the first start) and, when a volume has replicas, the checked
/// replication settings. A damaged node id file stops the daemon either way: it is never
/// replaced by a new identity.
fn replication_config(
    cfg: &DaemonConfig,
    state_dir_arg: &Option<PathBuf>,
) -> Result<Option<crate::replication::ReplicationConfig>, Failure> {
    let dir = match crate::web::state_dir(state_dir_arg, cfg) {
        Ok(dir) => dir,
        Err(_) if !cfg.has_replicas() => return Ok(None),
        Err(e) => return Err(e),
    };
    if crate::node_id::read(&dir)
        .map_err(Failure::Config)?
        .is_none()
        && !cfg.has_replicas()
    {
        // Made now so that the node keeps one identity from its first start on; a state
        // directory that cannot take it matters only once replication does.
        if let Err(e) = crate::node_id::load_or_create(&dir) {
            tracing::warn!("no node id yet: {e:#}");
            return Ok(None);
        }
    }
    let (node_id, made) = crate::node_id::load_or_create(&dir).map_err(Failure::Config)?;
    if made {
        tracing::info!(%node_id, dir = %dir.display(), "made this node's id");
    }
    let mut replication = cfg.replication(node_id).map_err(Failure::Config)?;
    if let Some(r) = replication.as_mut() {
        r.state_dir = Some(dir);
    }
    Ok(replication)
}

/// Start the configured `[[export]]`s. A volume that does not exist, or a kernel without ublk,
/// stops the daemon with a clear error.
fn start_exports(engine: &Engine, cfg: &DaemonConfig, say: &dyn Fn(String)) -> Result<(), Failure> {
    use ringblock_transports::ublk::{self, UblkError, UblkOptions};
    for e in &cfg.exports {
        match e.kind {
            ExportKind::Ublk => {
                if engine.volume(&e.volume).is_none() {
                    return Err(Failure::Config(anyhow::anyhow!(
                        "[[export]] kind = \"ublk\" names volume {:?}, which does not exist",
                        e.volume
                    )));
                }
                let opts = UblkOptions {
                    state_dir: cfg.ublk.state_dir.clone(),
                    queue_depth: e.queue_depth,
                    max_io_bytes: e.max_io_bytes,
                    recovery: cfg.ublk.recovery,
                    user_copy: cfg.ublk.user_copy,
                };
                let dev = ublk::start_ublk_export(engine, &e.volume, &opts).map_err(|err| {
                    let config = matches!(err, UblkError::Volume(_));
                    let err = anyhow::anyhow!("ublk export of volume {:?}: {err}", e.volume);
                    if config {
                        Failure::Config(err)
                    } else {
                        Failure::Runtime(err)
                    }
                })?;
                let i = dev.info();
                say(format!(
                    "ringblock: ublk {} serves volume {} ({} queue(s) x {} tags, max io {} bytes, copy {}{})",
                    i.path,
                    i.volume,
                    i.queues,
                    i.queue_depth,
                    i.max_io_bytes,
                    i.copy_mode,
                    if i.recovered {
                        ", recovered from the previous daemon"
                    } else {
                        ""
                    }
                ));
            }
        }
    }
    let configured: Vec<&str> = cfg
        .exports
        .iter()
        .filter(|e| e.kind == ExportKind::Ublk)
        .map(|e| e.volume.as_str())
        .collect();
    let opts = UblkOptions {
        state_dir: cfg.ublk.state_dir.clone(),
        queue_depth: None,
        max_io_bytes: None,
        recovery: cfg.ublk.recovery,
        user_copy: cfg.ublk.user_copy,
    };
    for left in ublk::resume_leftovers(engine, &opts, &configured) {
        match left {
            ublk::Leftover::Recovered(dev) => say(format!(
                "ringblock: ublk {} serves volume {} (started at runtime before a crash; recovered from the previous daemon)",
                dev.path().display(),
                dev.volume()
            )),
            ublk::Leftover::Deleted { volume, device } => say(format!(
                "ringblock: deleted {device}, left by a previous daemon for volume {volume}"
            )),
            ublk::Leftover::Failed { volume, error } => {
                tracing::error!(volume = %volume, "ublk device left by a previous daemon: {error}")
            }
        }
    }
    Ok(())
}

fn stop_exports() {
    for (volume, e) in ringblock_transports::ublk::stop_all() {
        tracing::error!(volume = %volume, "stopping ublk export: {e}");
    }
}

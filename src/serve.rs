//! `ringblock serve`: start the engine and the exports, wait for SIGINT/SIGTERM, drain, flush.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use nix::sys::signal::{SigSet, Signal};
use ringblock_engine::{Engine, EngineError};
use ringblock_transports::nbd::server::{take_systemd_listeners, NbdServer, ServerConfig};
use ringblock_transports::nbd::EngineCatalog;

use crate::config::DaemonConfig;

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
    let mut cfg = match &args.config {
        Some(path) => DaemonConfig::load(path).map_err(Failure::Config)?,
        None => DaemonConfig::embedded_default(),
    };
    if let Some(cores) = args.cores {
        cfg.cores = cores;
    }
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
    let unix = args.unix.clone().or_else(|| {
        if activated {
            None
        } else {
            cfg.nbd.unix.clone()
        }
    });
    // Block the stop signals before any thread starts, so every thread inherits the mask and
    // only the sigwait below sees them.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGINT);
    stop.add(Signal::SIGTERM);
    stop.thread_block()
        .context("blocking signals")
        .map_err(Failure::Runtime)?;

    let engine = Engine::start(&cfg.engine_config())?;
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
    let engine = Arc::new(engine);
    let catalog = Arc::new(EngineCatalog {
        engine: engine.clone(),
        read_only: cfg.nbd.read_only.clone(),
    });
    let server = NbdServer::start(
        engine.clone(),
        catalog,
        ServerConfig {
            tcp,
            unix,
            inherited,
            ..ServerConfig::default()
        },
    )
    .map_err(|e| Failure::Config(e.into()))?;
    for addr in server.addrs() {
        let how = if activated {
            " (socket activation)"
        } else {
            ""
        };
        say(format!("ringblock: nbd listening on {addr}{how}"));
    }
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
    // Stop accepting first; afterwards the server holds the only other engine reference.
    server.stop();
    drop(server);
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
    say("ringblock: stopped cleanly".into());
    Ok(())
}

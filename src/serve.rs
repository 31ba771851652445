//! `ringblock serve`: start the engine and the exports, wait for SIGINT/SIGTERM, drain, flush.

use std::path::PathBuf;

use anyhow::Context;
use nix::sys::signal::{SigSet, Signal};
use ringblock_engine::{Engine, EngineError};

use crate::config::DaemonConfig;

#[derive(clap::Args, Default)]
pub struct ServeArgs {
    /// Configuration file (TOML). Without it: one RAM-backed volume `default` over NBD on 127.0.0.1.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Reactor cores, e.g. `0,1` (overrides the file).
    #[arg(long, value_delimiter = ',')]
    pub cores: Option<Vec<usize>>,
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
    let mut cfg = match &args.config {
        Some(path) => DaemonConfig::load(path).map_err(Failure::Config)?,
        None => DaemonConfig::embedded_default(),
    };
    if let Some(cores) = args.cores {
        cfg.cores = cores;
    }
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
        println!(
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
        );
    }
    for v in engine.volumes() {
        println!(
            "ringblock: volume {} on {} ({} bytes, {} of {} chunks allocated)",
            v.name,
            v.device.name,
            v.size_bytes(),
            v.allocated_chunks(),
            v.size_bytes().div_ceil(v.chunk_size_bytes())
        );
    }
    println!(
        "ringblock: engine running on {} reactor(s)",
        engine.reactor_count()
    );
    println!("ringblock: ready");
    let signal = stop
        .wait()
        .context("waiting for signals")
        .map_err(Failure::Runtime)?;
    tracing::info!(?signal, "stopping: draining and flushing");
    engine
        .shutdown()
        .context("flushing at shutdown")
        .map_err(Failure::Runtime)?;
    println!("ringblock: stopped cleanly");
    Ok(())
}

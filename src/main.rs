//! `ringblock`: the daemon and its command line.

mod config;
mod doctor;
mod export_cmd;
mod node_id;
mod peer_control;
mod replica_cmd;
mod replication;
mod serve;
mod verify_cmd;
mod web;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringblock_engine::profile;

#[derive(Parser)]
#[command(
    name = "ringblock",
    version,
    about = "Polled-mode storage appliance on io_uring"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default when no command is given).
    Serve(serve::ServeArgs),
    /// Firmware profiles of device classes.
    Profile {
        #[command(subcommand)]
        command: ProfileCommand,
    },
    /// Check a configuration file without starting anything.
    CheckConfig { file: PathBuf },
    /// Print this node's id (what other nodes' `[[volume.replica]] node` names), made in the
    /// state directory if there is none yet, exactly as `serve` would make it.
    NodeId {
        /// State directory (default: `[web] state_dir` of --config, else the per-user one).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Configuration file whose `[web] state_dir` to use.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Manage volumes of a running daemon through its web API.
    Volume {
        #[command(flatten)]
        api: web::ApiArgs,
        #[command(subcommand)]
        command: web::VolumeCommand,
    },
    /// Show a running daemon's reactors, devices, volumes, replication and clients (through its
    /// web API).
    Status {
        #[command(flatten)]
        api: web::ApiArgs,
    },
    /// The web API token.
    Token {
        #[command(subcommand)]
        command: web::TokenCommand,
    },
    /// Say what this kernel offers (io_uring, ublk, nbd) and what to load.
    Doctor,
    /// Manage a running daemon's ublk exports (/dev/ublkbN) through its web API.
    Export {
        #[command(flatten)]
        api: web::ApiArgs,
        #[command(subcommand)]
        command: export_cmd::ExportCommand,
    },
    /// See and drive the copies of replicated volumes on other nodes (through the web API).
    Replica {
        #[command(flatten)]
        api: web::ApiArgs,
        #[command(subcommand)]
        command: replica_cmd::ReplicaCommand,
    },
}

#[derive(Subcommand)]
enum ProfileCommand {
    /// List the builtin profiles.
    List,
    /// Print a profile (builtin name or path to a TOML file).
    Show { name: String },
}

/// `check-config`: every check `serve` makes, then what replication is set up (with this
/// node's id if it has one; nothing is created).
fn check_replication(cfg: config::DaemonConfig) -> anyhow::Result<Vec<String>> {
    cfg.validate()?;
    let node = match web::state_dir(&None, &cfg) {
        Ok(dir) => node_id::read(&dir)?,
        Err(_) => None,
    };
    if let Some(own) = node {
        cfg.replication(own)?;
    }
    Ok(replication::describe(&cfg, node))
}

/// `node-id`: this node's id, made if there is none.
fn print_node_id(
    state_dir: Option<PathBuf>,
    config: Option<PathBuf>,
) -> Result<(), serve::Failure> {
    let cfg = match config {
        Some(path) => config::DaemonConfig::load(&path).map_err(serve::Failure::Config)?,
        None => config::DaemonConfig::embedded_default(),
    };
    let dir = web::state_dir(&state_dir, &cfg)?;
    let (id, made) = node_id::load_or_create(&dir).map_err(serve::Failure::Config)?;
    if made {
        eprintln!("made this node's id in {}", node_id::path(&dir).display());
    }
    println!("{id}");
    Ok(())
}

#[cfg(test)]
mod cli_tests;

/// Exit codes: 0 fine, 1 failure while running, 2 bad usage or configuration.
const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli
        .command
        .unwrap_or(Command::Serve(serve::ServeArgs::default()))
    {
        Command::Serve(args) => serve::run(args),
        Command::Profile {
            command: ProfileCommand::List,
        } => {
            for name in profile::builtin_names() {
                match profile::builtin(name) {
                    Ok(p) => println!("{name:8} {}", p.description),
                    Err(e) => println!("{name:8} (invalid: {e})"),
                }
            }
            Ok(())
        }
        Command::Profile {
            command: ProfileCommand::Show { name },
        } => match profile::resolve(&name) {
            Ok(p) => {
                print!("{}", toml::to_string(&p).expect("profile serializes"));
                Ok(())
            }
            Err(e) => Err(serve::Failure::Config(e.into())),
        },
        Command::Doctor => doctor::run(),
        Command::Export { api, command } => export_cmd::run(&api, command),
        Command::Replica { api, command } => replica_cmd::run(&api, command),
        Command::Volume { api, command } => web::run_volume(&api, command),
        Command::Status { api } => web::run_status(&api),
        Command::Token { command } => web::run_token(command),
        Command::NodeId { state_dir, config } => print_node_id(state_dir, config),
        Command::CheckConfig { file } => {
            match config::DaemonConfig::load(&file).and_then(check_replication) {
                Ok(lines) => {
                    for line in lines {
                        println!("{line}");
                    }
                    println!("{}: ok", file.display());
                    Ok(())
                }
                Err(e) => Err(serve::Failure::Config(e)),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(serve::Failure::Config(e)) => {
            eprintln!("ringblock: error: {e:#}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(serve::Failure::Runtime(e)) => {
            eprintln!("ringblock: error: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

//! ringblock-bench: benchmarks of ringblock against the raw device and its peers, run in one
//! invocation on one machine and reported as ratios (see DESIGN.md section 6).

mod driver;
mod engine_bench;
mod engine_cmd;
mod fio;
mod load_cmd;
mod nbd_load;
mod report;
mod stats;
mod sys;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "ringblock-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The engine's random read on a file against raw fio io_uring O_DIRECT on the same file.
    Engine(engine_cmd::EngineArgs),
    /// Drive an NBD server with the lean pipelined client (many connections, batched io_uring).
    Load(load_cmd::LoadArgs),
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Engine(args) => engine_cmd::run(&args),
        Command::Load(args) => load_cmd::run(&args),
    }
}

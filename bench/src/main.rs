//! ringblock-bench: benchmarks of ringblock against the raw device and its peers, run in one
//! invocation on one machine and reported as ratios (see README.md).
//!
//! The shape: `run` is one pipeline, plan → prepare → steps → summarise ([`run`]), and every
//! measurement lands in one result model ([`results`]: samples per point and repeat, their
//! summaries, paired ratios, the headline), which `summary.json` serialises and `report`,
//! `compare` and the plots read back. `engine` is `run --targets raw,engine`. Around it:
//! - what is measured: [`targets`] (start, check, stop), [`matrix`] (workloads and presets),
//!   [`fio`] (jobs and their JSON), [`nbd_load`] (the lean NBD client), [`engine_bench`] (the
//!   engine in process on a file);
//! - the host: [`host`] (CPUs, CPU time, steal, idle policy, wake-up cost, interrupt CPU),
//!   [`procs`] (process groups, their CPU, everyone else's), [`interrupt`] (Ctrl-C);
//! - the output: [`run_report`] and [`plot`] (Markdown and SVG), [`compare`], [`stats`].

mod compare;
mod engine_bench;
mod fio;
mod host;
mod interrupt;
mod load_cmd;
mod matrix;
mod nbd_load;
mod plot;
mod procs;
mod repl;
mod results;
mod run;
mod run_report;
mod stats;
mod targets;
mod zc_threshold;

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
    /// `run --targets raw,engine`: the engine in process on a file against raw fio io_uring
    /// O_DIRECT on the same region of the same file (every `run` option applies).
    Engine(run::RunArgs),
    /// Drive an NBD server with the lean pipelined client (many connections, batched io_uring).
    Load(load_cmd::LoadArgs),
    /// ringblock against its peers and the raw device in one run: starts every target, runs
    /// the fio + lean-client matrix, writes a report (Markdown, JSON, SVG plots).
    Run(run::RunArgs),
    /// Print the change between two runs' summary.json.
    Compare(compare::CompareArgs),
    /// Write a run's report.md and plots again from its summary.json.
    Report(run_report::ReportArgs),
    /// Zero-copy against copying sends by payload size, on loopback TCP and a Unix socket
    /// pair: CPU per KiB and the kernel's copy reports (docs/performance.md, "Zero-copy
    /// sends").
    ZcThreshold(zc_threshold::ZcArgs),
    /// The dashboard during a real resync between two daemons, as a PNG (headless Chromium):
    /// docs/replication-resync.png.
    ReplScreenshot(repl::screenshot::ScreenshotArgs),
}

/// `ringblock-bench --quick` (options, no subcommand) means `ringblock-bench run --quick`.
fn with_default_subcommand(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> Vec<std::ffi::OsString> {
    let mut v: Vec<std::ffi::OsString> = args.into_iter().collect();
    let first = v.get(1).and_then(|a| a.to_str()).unwrap_or("");
    if first.starts_with("--") && !["--help", "--version"].contains(&first) {
        v.insert(1, "run".into());
    }
    v
}

/// `engine [OPTIONS]` is `run --targets raw,engine [OPTIONS]`.
fn engine_alias(mut args: run::RunArgs) -> run::RunArgs {
    args.targets = vec!["raw".into(), "engine".into()];
    args
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse_from(with_default_subcommand(std::env::args_os())).command {
        Command::Engine(args) => run::run(&engine_alias(args)),
        Command::Load(args) => load_cmd::run(&args),
        Command::Run(args) => run::run(&args),
        Command::Compare(args) => compare::run(&args),
        Command::Report(args) => run_report::rerun(&args),
        Command::ZcThreshold(args) => zc_threshold::run(&args),
        Command::ReplScreenshot(args) => repl::screenshot::run(&args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_without_a_subcommand_mean_run() {
        let args = |v: &[&str]| {
            with_default_subcommand(v.iter().map(std::ffi::OsString::from))
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(args(&["b", "--quick"]), ["b", "run", "--quick"]);
        assert_eq!(
            args(&["b", "--full", "--plan"]),
            ["b", "run", "--full", "--plan"]
        );
        assert_eq!(
            args(&["b", "engine", "--repeat", "1"]),
            ["b", "engine", "--repeat", "1"]
        );
        assert_eq!(args(&["b", "--help"]), ["b", "--help"]);
        assert_eq!(args(&["b"]), ["b"]);
        let cli = Cli::try_parse_from(args(&["b", "--quick", "--plan"])).unwrap();
        assert!(matches!(cli.command, Command::Run(ref r) if r.quick && r.plan));
        let cli = Cli::try_parse_from(["b", "engine", "--repeat", "2"]).unwrap();
        let Command::Engine(e) = cli.command else {
            panic!("engine")
        };
        let e = engine_alias(e);
        assert_eq!(
            (e.targets, e.repeat),
            (vec!["raw".into(), "engine".into()], Some(2))
        );
    }
}

//! `ringblock-bench load`: run the lean NBD client against any NBD server and print the result.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::nbd_load::{self, Endpoint, LoadConfig};

#[derive(clap::Args, Debug)]
pub struct LoadArgs {
    /// TCP address of the server, e.g. 127.0.0.1:10809.
    #[arg(long, conflicts_with = "unix")]
    pub tcp: Option<String>,
    /// Unix socket of the server.
    #[arg(long)]
    pub unix: Option<PathBuf>,
    /// Export name.
    #[arg(long, default_value = "")]
    pub export: String,
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 32)]
    pub qd: usize,
    #[arg(long, default_value_t = 4096)]
    pub bs: usize,
    /// Share of reads in percent (100 = read only, 0 = write only).
    #[arg(long, default_value_t = 100)]
    pub read_percent: u8,
    /// Sequential offsets instead of random ones.
    #[arg(long)]
    pub sequential: bool,
    #[arg(long, default_value_t = 10)]
    pub runtime_s: u64,
    /// Use only the first N MiB of the export.
    #[arg(long)]
    pub range_mib: Option<u64>,
    /// Check every read against what was written (fails on any mismatch).
    #[arg(long)]
    pub verify: bool,
    /// With --verify: the export is new, so blocks not yet written must read as zeros.
    #[arg(long)]
    pub fresh: bool,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Issue requests at this fixed rate (IOPS) instead of as fast as the server answers.
    #[arg(long)]
    pub rate_iops: Option<f64>,
    /// Warm-up seconds before the measured runtime (not counted).
    #[arg(long, default_value_t = 0.0)]
    pub ramp_s: f64,
    /// Print JSON instead of a line of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &LoadArgs) -> Result<()> {
    let endpoint = match (&args.tcp, &args.unix) {
        (Some(t), None) => Endpoint::Tcp(t.clone()),
        (None, Some(u)) => Endpoint::Unix(u.clone()),
        _ => bail!("give exactly one of --tcp ADDR or --unix PATH"),
    };
    let cfg = LoadConfig {
        endpoint,
        export: args.export.clone(),
        connections: args.connections,
        queue_depth: args.qd,
        block_bytes: args.bs,
        read_percent: args.read_percent.min(100),
        random: !args.sequential,
        runtime: Duration::from_secs(args.runtime_s),
        range_bytes: args.range_mib.map(|m| m << 20),
        verify: args.verify,
        fresh_export: args.fresh,
        seed: args.seed,
        rate_iops: args.rate_iops,
        ramp: Duration::from_secs_f64(args.ramp_s.max(0.0)),
        cancel: Some(crate::interrupt::flag()),
    };
    crate::interrupt::install()?;
    let r = nbd_load::run(&cfg)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{:.0} IOPS, {:.1} MiB/s, p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, p99.99 {:.1} us ({} ops, {} errors, {} verify failures, client CPU {:.2} us/IO)",
            r.iops, r.mib_s, r.lat_p50_us, r.lat_p99_us, r.lat_p999_us, r.lat_p9999_us, r.ops, r.errors, r.verify_failures,
            r.client_cpu_s * 1e6 / r.ops.max(1) as f64
        );
    }
    if r.verify_failures > 0 || r.errors > 0 {
        bail!("{} verify failures, {} errors", r.verify_failures, r.errors);
    }
    Ok(())
}

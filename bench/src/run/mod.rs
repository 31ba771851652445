//! `ringblock-bench run`: ringblock against its peers and the raw device, in one run, as one
//! pipeline:
//!
//! 1. [`plan`]: settings from the preset and options, the targets and their points, the
//!    estimate (`--plan` prints it and stops);
//! 2. [`prepare`]: the results folder, the host record, the backing files (a
//!    ringblock-formatted one, written once, and a plain one for the file-serving peers), the
//!    targets' environment and which of them can run here;
//! 3. [`steps`]: per repeat, every target in turn (start, prefill, verify, idle CPU, points,
//!    stop; the engine in rounds alternated with raw fio, [`engine_step`]), then the
//!    fixed-rate points side by side, filling the one result model
//!    ([`crate::results`]);
//! 4. [`summarise`]: medians, paired ratios and the headline into `summary.json`, `report.md`
//!    and SVG plots, with every raw fio JSON and lean-client result beside them.
//!
//! Everything started is stopped by its guard, also on error and on Ctrl-C; after Ctrl-C the
//! run still summarises what it measured.

mod engine_step;
mod plan;
mod prepare;
pub(crate) mod steps;
mod summarise;

use anyhow::Result;

use crate::interrupt;

pub use plan::RunArgs;

pub fn run(args: &RunArgs) -> Result<()> {
    interrupt::install()?;
    let mut plan = plan::plan(args)?;
    plan.print();
    if args.plan {
        return Ok(());
    }
    let (ctx, statuses) = prepare::prepare(args, &mut plan)?;
    let mut measured = steps::Measured::new(&plan, statuses);
    if let Err(e) = steps::run(&ctx, &plan, &mut measured) {
        if !interrupt::requested() {
            return Err(e);
        }
        eprintln!("{e:#}; writing what was measured so far");
    }
    summarise::summarise(args, &plan, ctx, measured)
}

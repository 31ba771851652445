//! Summarise: medians, spreads and paired ratios of every point, each target's final status,
//! the headline; written as `summary.json`, `report.md` and SVG plots, with the headline printed
//! and, with `--compare`, the change from an earlier run.

use anyhow::{bail, Result};

use crate::host;
use crate::interrupt;
use crate::results::{self, IdleResult, RunSummary, SCHEMA};
use crate::run_report;
use crate::stats::Spread;

use super::plan::Plan;
use super::prepare::Ctx;
use super::steps::Measured;
use super::RunArgs;

/// The run's summary of what the steps measured.
fn summary(plan: &Plan, ctx: &Ctx, mut m: Measured) -> Result<RunSummary> {
    for p in &mut m.points {
        p.summarise();
    }
    for st in &mut m.statuses {
        if st.status == "ran"
            && !m
                .points
                .iter()
                .any(|p| p.target == st.id && !p.samples.is_empty())
        {
            if interrupt::requested() && st.reason.is_none() {
                st.status = "interrupted".into();
                st.reason =
                    Some("the run was interrupted (Ctrl-C) before a point of it finished".into());
            } else {
                st.status = "failed".into();
                st.reason
                    .get_or_insert_with(|| "no point produced a sample".into());
            }
        }
    }
    let mut summary = RunSummary {
        schema: SCHEMA.into(),
        started_utc: host::utc_stamp(plan.started),
        elapsed_s: plan.t_start.elapsed().as_secs_f64(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        preset: format!("{:?}", plan.preset).to_lowercase(),
        settings: serde_json::to_value(&plan.settings)?,
        host: ctx.host.clone(),
        targets: m.statuses,
        points: m.points,
        verify: m.verifies,
        idle: m
            .idles
            .into_iter()
            .filter_map(|(target, v)| {
                Some(IdleResult {
                    target,
                    window_s: ctx.idle.as_secs_f64(),
                    cpu_pct: Spread::of(&v)?,
                })
            })
            .collect(),
        headline: Vec::new(),
        plots: Vec::new(),
        replication: m.replication,
    };
    summary.headline = results::headline(&summary, plan.settings.rate_iops);
    Ok(summary)
}

/// Write the summary, the report and the plots; keep the files if asked; print the headline
/// and the comparison. Fails after writing when the run was interrupted.
pub fn summarise(args: &RunArgs, plan: &Plan, ctx: Ctx, m: Measured) -> Result<()> {
    let out_dir = &ctx.out_dir;
    let mut summary = summary(plan, &ctx, m)?;
    summary.plots = run_report::write_plots(&summary, out_dir)?;
    std::fs::write(out_dir.join("report.md"), run_report::markdown(&summary))?;
    results::write_json(out_dir, "summary.json", &summary)?;
    if args.keep_files {
        interrupt::unregister_paths();
        let logs = out_dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        for e in std::fs::read_dir(ctx.run_tmp.path())?.flatten() {
            let _ = std::fs::copy(e.path(), logs.join(e.file_name()));
        }
        let kept = ctx.data_tmp.keep();
        eprintln!("kept backing files in {}", kept.display());
    }
    println!("{}", run_report::headline_markdown(&summary));
    eprintln!(
        "wrote {} (report.md, summary.json, {} plots, raw/) in {:.0} s",
        out_dir.display(),
        summary.plots.len(),
        summary.elapsed_s
    );
    if let Some(old) = &args.compare {
        let text = crate::compare::compare_files(old, &out_dir.join("summary.json"))?;
        std::fs::write(out_dir.join("compare.md"), &text)?;
        println!("{text}");
    }
    if interrupt::requested() {
        bail!("interrupted: the report holds what was measured before Ctrl-C");
    }
    Ok(())
}

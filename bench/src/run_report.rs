//! The run's Markdown report and SVG plots, made from its [`RunSummary`].

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use crate::matrix::WORKLOADS;
use crate::plot::{self, Chart};
use crate::results::{Metric, PointResult, Ratio, RunSummary};
use crate::stats::Spread;

fn k(x: f64) -> String {
    if x >= 10_000.0 {
        format!("{:.1}k", x / 1000.0)
    } else if x >= 1000.0 {
        format!("{:.2}k", x / 1000.0)
    } else {
        format!("{x:.0}")
    }
}

fn num(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn opt(x: Option<Spread>, f: fn(f64) -> String) -> String {
    x.map_or("—".into(), |s| f(s.median))
}

fn ratio_text(r: &Ratio) -> String {
    match (r.paired, r.of_medians) {
        (Some(p), _) if p.n > 1 => format!("**{:.2}** ({:.2}–{:.2})", p.median, p.min, p.max),
        (Some(p), _) => format!("**{:.2}**", p.median),
        (None, Some(m)) => format!("**{m:.2}** (of medians)"),
        _ => "—".into(),
    }
}

fn metric_value(m: Metric, x: f64) -> String {
    match m {
        Metric::Iops => format!("{} IOPS", k(x)),
        Metric::MibS => format!("{} MiB/s", num(x)),
        Metric::ServerCpuUsPerIo => format!("{} µs/IO", num(x)),
        Metric::P50Us | Metric::P99Us => format!("{} µs", num(x)),
    }
}

fn label(s: &RunSummary, id: &str) -> String {
    s.target(id).map_or(id.to_string(), |t| t.label.clone())
}

/// The ringblock target a row is compared with: the same transport for the peers, and for raw
/// fio on the backing file, ringblock's file device on that same file (over NBD).
fn ringblock_for(target: &str) -> Option<&'static str> {
    if target.starts_with("ringblock") || target == "engine" {
        None
    } else if target == "raw" {
        Some("ringblock-file")
    } else if target.ends_with("-tcp") {
        Some("ringblock-tcp")
    } else {
        Some("ringblock")
    }
}

/// Other processes' CPU (cores) above which a sample counts as disturbed.
const DISTURBED_CORES: f64 = 0.25;
/// Hypervisor steal (percent) above which a sample counts as disturbed. Not lower: on a VM
/// heavy IO to the virtual disk itself shows as 5–12 % steal (the host's IO emulation shares
/// the physical cores), which says little about other tenants.
const DISTURBED_STEAL_PCT: f64 = 15.0;

fn disturbed(s: &crate::results::Sample) -> bool {
    s.others_cpu_cores.is_some_and(|c| c > DISTURBED_CORES)
        || s.steal_pct.is_some_and(|x| x > DISTURBED_STEAL_PCT)
}

/// (target, point key, sample) of every disturbed sample.
fn disturbed_samples(s: &RunSummary) -> Vec<(&PointResult, &crate::results::Sample)> {
    s.points
        .iter()
        .flat_map(|p| p.samples.iter().map(move |x| (p, x)))
        .filter(|(_, x)| disturbed(x))
        .collect()
}

/// The headline section: ratio table, idle CPU and verify verdicts.
pub fn headline_markdown(s: &RunSummary) -> String {
    let mut md = String::from("## Headline\n\n");
    md.push_str(
        "| comparison | ringblock | peer | ratio (median, min–max of the paired runs) | goal | status |\n\
         |---|---:|---:|---:|---:|---|\n",
    );
    for h in &s.headline {
        let (a, b, r) = match &h.ratio {
            Some(r) => (
                r.num_median
                    .map_or("—".into(), |x| metric_value(h.metric, x)),
                r.den_median
                    .map_or("—".into(), |x| metric_value(h.metric, x)),
                ratio_text(r),
            ),
            None => ("—".into(), "—".into(), "—".into()),
        };
        let goal = match h.aim {
            Some(aim) => format!("{} (aim {aim})", h.goal.text()),
            None => h.goal.text(),
        };
        let status = match h.status.as_str() {
            "met" => "met".to_string(),
            "NOT met" => "**NOT met**".to_string(),
            other => other.replace('\n', " "),
        };
        let _ = writeln!(md, "| {} | {a} | {b} | {r} | {goal} | {status} |", h.what);
    }
    md.push('\n');
    for i in &s.idle {
        let _ = writeln!(
            md,
            "- Idle CPU of {}: **{:.2} %** of one core over {:.0} s ({}){}",
            label(s, &i.target),
            i.cpu_pct.median,
            i.window_s,
            if i.cpu_pct.n > 1 {
                format!("min–max {:.2}–{:.2} %", i.cpu_pct.min, i.cpu_pct.max)
            } else {
                "one measurement".into()
            },
            if i.target == "ringblock" {
                if i.cpu_pct.median < 2.0 {
                    "; goal < 2 %: met"
                } else {
                    "; goal < 2 %: **NOT met**"
                }
            } else {
                ""
            }
        );
    }
    verify_and_disturbance_lines(s, &mut md);
    lean_vs_fio_line(s, &mut md);
    md
}

/// The verify verdict and whether other processes disturbed the runs.
fn verify_and_disturbance_lines(s: &RunSummary, md: &mut String) {
    if !s.verify.is_empty() {
        let bad: Vec<&str> = s
            .verify
            .iter()
            .filter(|v| !v.ok)
            .map(|v| v.target.as_str())
            .collect();
        let _ = writeln!(
            md,
            "- Byte-for-byte verify (lean client): {}",
            if bad.is_empty() {
                format!("passed on all {} NBD targets", s.verify.len())
            } else {
                format!("**FAILED** on {}", bad.join(", "))
            }
        );
    }
    let measured = s
        .points
        .iter()
        .flat_map(|p| &p.samples)
        .filter(|x| x.others_cpu_cores.is_some())
        .count();
    if measured > 0 {
        let d = disturbed_samples(s);
        let _ = writeln!(
            md,
            "- Disturbance: {}",
            if d.is_empty() {
                format!(
                    "none seen (other processes used less than {DISTURBED_CORES} of a core, and \
                     the hypervisor took at most {DISTURBED_STEAL_PCT} %, during all {measured} \
                     measured runs)"
                )
            } else {
                format!(
                    "**{} of {measured} runs ran while other processes used more than \
                     {DISTURBED_CORES} of a core or the hypervisor took more than \
                     {DISTURBED_STEAL_PCT} %** (marked ⚠; see Disturbed runs): their numbers \
                     are suspect",
                    d.len()
                )
            }
        );
    }
}

/// Whether the lean client drives every NBD target at least as hard as fio.
fn lean_vs_fio_line(s: &RunSummary, md: &mut String) {
    let lean_vs_fio = lean_vs_fio_rows(s);
    if !lean_vs_fio.is_empty() {
        // Below 0.9 is a finding; between 0.9 and 1 both clients are at the server's limit
        // and the difference is run-to-run noise (shown, not flagged).
        let below = |lo: f64, hi: f64| -> Vec<String> {
            lean_vs_fio
                .iter()
                .filter_map(|(t, _, _, r)| {
                    r.filter(|r| (lo..hi).contains(r))
                        .map(|r| format!("{} {r:.2}", label(s, t)))
                })
                .collect()
        };
        let (weaker, close) = (below(0.0, 0.9), below(0.9, 1.0));
        let _ = writeln!(
            md,
            "- Lean client ÷ fio (4k random read QD32, one connection): {}{}",
            if weaker.is_empty() {
                "the lean client drives every NBD target at least as hard as fio".to_string()
            } else {
                format!("**below fio on {}**", weaker.join(", "))
            },
            if close.is_empty() {
                String::new()
            } else {
                format!(
                    " (within 10 % of fio, where the server itself is the limit: {})",
                    close.join(", ")
                )
            }
        );
    }
}

/// (target, fio IOPS, lean IOPS, lean ÷ fio) at 4k random read QD32, one job.
type LeanVsFio = (String, Option<f64>, Option<f64>, Option<f64>);

fn lean_vs_fio_rows(s: &RunSummary) -> Vec<LeanVsFio> {
    s.targets
        .iter()
        .filter_map(|t| {
            let f = s.point(&t.id, "randread-4k-qd32|fio|x1")?;
            let l = s.point(&t.id, "randread-4k-qd32|lean|x1")?;
            let r = Ratio::between(&l.samples, &f.samples, Metric::Iops);
            Some((t.id.clone(), r.den_median, r.num_median, r.value()))
        })
        .collect()
}

fn point_row(s: &RunSummary, p: &PointResult) -> Option<String> {
    let sum = p.summary.as_ref()?;
    let vs = ringblock_for(&p.target)
        .and_then(|rb| s.ratio((rb, &p.key), (&p.target, &p.key), Metric::Iops))
        .and_then(|r| r.value())
        .map_or("—".into(), |x| format!("{x:.2}"));
    let mark = if p.samples.iter().any(disturbed) {
        " ⚠"
    } else {
        ""
    };
    Some(format!(
        "| {}{mark} | {} | {} | {} | {}–{} | {:.0}% | {} | {} | {} | {} | {} | {} | {} | {} |",
        label(s, &p.target),
        p.client,
        p.jobs,
        k(sum.iops.median),
        k(sum.iops.min),
        k(sum.iops.max),
        sum.iops.spread_pct,
        num(sum.mib_s.median),
        opt(sum.p50_us, num),
        opt(sum.p99_us, num),
        opt(sum.p99_9_us, num),
        opt(sum.p99_99_us, num),
        opt(sum.server_cpu_us_per_io, num),
        opt(sum.client_cpu_us_per_io, num),
        vs,
    ))
}

/// `; a sleep-and-wake round trip costs 46.1 µs of CPU across CPUs 0 and 1, 6.0 µs on one`, from
/// the host record; empty where it was not measured (older summaries).
fn wake_cost_text(w: &serde_json::Value) -> String {
    let us = |v: &serde_json::Value| v["cpu_ns"].as_f64().map(|ns| ns / 1e3);
    let cpus = (w["cpus"][0].as_u64(), w["cpus"][1].as_u64());
    match (us(&w["across_cpus"]), us(&w["same_cpu"]), cpus) {
        (Some(across), Some(same), (Some(a), Some(b))) => format!(
            "; a sleep-and-wake round trip costs {across:.1} µs of CPU across CPUs {a} and {b}, \
             {same:.1} µs on one"
        ),
        (None, Some(same), _) => {
            format!("; a sleep-and-wake round trip costs {same:.1} µs of CPU on one CPU")
        }
        _ => String::new(),
    }
}

/// The whole report.
pub fn markdown(s: &RunSummary) -> String {
    let mut md = host_line(s);
    md.push_str(&headline_markdown(s));
    if s.plots.iter().any(|p| p == "headline.svg") {
        md.push_str("\n![4k random read QD32 by client](headline.svg)\n");
    }
    for section in [
        targets_table,
        lean_vs_fio_table,
        verify_table,
        workload_tables,
        fixed_rate_table,
        idle_table,
        profiles_table,
        disturbed_table,
        replication_section,
        plots_and_how_to_read,
    ] {
        section(s, &mut md);
    }
    md
}

/// The replication step's section, when it ran.
fn replication_section(s: &RunSummary, md: &mut String) {
    if let Some(r) = &s.replication {
        crate::repl::report::markdown(r, md);
    }
}

/// The title and the host line.
fn host_line(s: &RunSummary) -> String {
    let mut md = String::new();
    let settings = &s.settings;
    let _ = writeln!(
        md,
        "# ringblock-bench run {} ({} preset)\n",
        s.started_utc, s.preset
    );
    // Older summaries have no idle policy.
    let idle = s.host["idle"]
        .as_str()
        .unwrap_or("idle policy not recorded");
    let wake = wake_cost_text(&s.host["wake_cost"]);
    let _ = writeln!(
        md,
        "`{}` — {} repeat(s), {} s per point (+{} s warm-up), {} MiB data region, {} in {:.0} s. \
         Host: CPUs {}, kernel {} ({}{}), {}, load average at the end {}.\n",
        s.command,
        settings["repeat"],
        settings["runtime_s"],
        settings["ramp_s"],
        settings["region_bytes"].as_u64().unwrap_or(0) >> 20,
        s.preset,
        s.elapsed_s,
        s.host["cpus"],
        s.host["kernel"].as_str().unwrap_or("?"),
        idle,
        wake,
        s.host["fio"].as_str().unwrap_or("fio ?"),
        s.host["load_average"].as_str().unwrap_or("?"),
    );
    md
}

/// Every target: whether it ran, how it serves, its command or why it did not run.
fn targets_table(s: &RunSummary, md: &mut String) {
    md.push_str("\n## Targets\n\n| target | status | how it serves | command or reason |\n|---|---|---|---|\n");
    for t in &s.targets {
        let how = t.reason.clone().or(t.command.clone()).unwrap_or_default();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            t.label,
            if t.status == "ran" {
                "ran".to_string()
            } else {
                format!("**{}**", t.status)
            },
            t.note,
            format!("`{}`", how.replace('\n', " ").replace('|', "\\|")).replace("``", "")
        );
    }
}

/// Lean client vs fio on each NBD target.
fn lean_vs_fio_table(s: &RunSummary, md: &mut String) {
    let lvf = lean_vs_fio_rows(s);
    if !lvf.is_empty() {
        md.push_str(
            "\n## Lean client vs fio\n\n4k random read QD32, one job / one connection. fio's nbd \
             engine makes a syscall per request and saturates its core first; the lean client \
             pipelines over one io_uring.\n\n| target | fio IOPS | lean IOPS | lean ÷ fio |\n|---|---:|---:|---:|\n",
        );
        for (t, f, l, r) in &lvf {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                label(s, t),
                f.map_or("—".into(), k),
                l.map_or("—".into(), k),
                r.map_or("—".into(), |x| format!("{x:.2}"))
            );
        }
    }
}

/// The verify pass on each NBD target.
fn verify_table(s: &RunSummary, md: &mut String) {
    if !s.verify.is_empty() {
        md.push_str("\n## Verify (lean client, every read checked byte for byte)\n\n| target | result | reads | writes | errors | mismatches | detail |\n|---|---|---:|---:|---:|---:|---|\n");
        for v in &s.verify {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                label(s, &v.target),
                if v.ok { "pass" } else { "**FAIL**" },
                v.reads,
                v.writes,
                v.errors,
                v.verify_failures,
                v.detail.replace('\n', " ").replace('|', "\\|")
            );
        }
    }
}

/// One table per workload: every target's medians, spreads and ratio to ringblock.
fn workload_tables(s: &RunSummary, md: &mut String) {
    md.push_str(
        "\n## Results by workload\n\nMedians over the repeats; min–max and spread of IOPS. \
         Latency: submit to completion, µs (mixed workloads: reads). Server CPU: the server's \
         process group over the steady middle of the run, µs per IO (= CPU seconds per million \
         IOs). Client CPU: fio's usr+sys or the lean client's thread. Last column: ringblock \
         (same transport) ÷ this target, paired by repeat; on the raw fio row, ringblock's \
         file device over NBD on the same file ÷ raw (the engine's own ratio is in the \
         headline).\n",
    );
    let head = "| target | client | jobs | IOPS | min–max | spread | MiB/s | p50 | p99 | p99.9 | p99.99 | server CPU µs/IO | client CPU µs/IO | ringblock ÷ this |\n\
                |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for w in &WORKLOADS {
        let rows: Vec<String> = s
            .points
            .iter()
            .filter(|p| p.workload == w.id && p.rate_iops.is_none() && !is_profile(s, &p.target))
            .filter_map(|p| point_row(s, p))
            .collect();
        if rows.is_empty() {
            continue;
        }
        let _ = write!(md, "\n### {}\n\n{head}", w.label);
        for r in rows {
            md.push_str(&r);
            md.push('\n');
        }
    }
}

/// The fixed-rate points: server CPU per IO when not saturated.
fn fixed_rate_table(s: &RunSummary, md: &mut String) {
    let rated: Vec<&PointResult> = s
        .points
        .iter()
        .filter(|p| p.rate_iops.is_some() && !p.samples.is_empty())
        .collect();
    if !rated.is_empty() {
        let rate = rated[0].rate_iops.unwrap_or(0);
        let _ = write!(
            md,
            "\n## Fixed rate: {rate} IOPS, 4k random read\n\nWhat a server spends when it is not \
             saturated: a polling server must not burn a core for a light load. When several \
             targets have these points, they run side by side in a step of their own and take \
             turns point by point, twice per repeat, the second time in reverse order (ratios \
             pair the same round): measured minutes apart, two servers' CPU per IO also \
             differed by the host's drift.\n\n\
             | target | client | IOPS | server CPU (cores) | server CPU µs/IO | p50 µs | p99 µs | ringblock ÷ this (CPU/IO) |\n\
             |---|---|---:|---:|---:|---:|---:|---:|\n"
        );
        for p in rated {
            let Some(sum) = &p.summary else { continue };
            let vs = ringblock_for(&p.target)
                .and_then(|rb| s.ratio((rb, &p.key), (&p.target, &p.key), Metric::ServerCpuUsPerIo))
                .and_then(|r| r.value())
                .map_or("—".into(), |x| format!("{x:.2}"));
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {vs} |",
                label(s, &p.target),
                p.client,
                k(sum.iops.median),
                opt(sum.server_cpu_cores, |x| format!("{x:.3}")),
                opt(sum.server_cpu_us_per_io, num),
                opt(sum.p50_us, num),
                opt(sum.p99_us, num),
            );
        }
    }
}

/// Idle CPU per target.
fn idle_table(s: &RunSummary, md: &mut String) {
    if !s.idle.is_empty() {
        md.push_str("\n## Idle CPU\n\n| target | % of one core (median) | min–max | window |\n|---|---:|---:|---:|\n");
        for i in &s.idle {
            let _ = writeln!(
                md,
                "| {} | {:.2} | {:.2}–{:.2} | {:.0} s |",
                label(s, &i.target),
                i.cpu_pct.median,
                i.cpu_pct.min,
                i.cpu_pct.max,
                i.window_s
            );
        }
    }
}

/// Runs during which others used the machine.
fn disturbed_table(s: &RunSummary, md: &mut String) {
    let d = disturbed_samples(s);
    if !d.is_empty() {
        let _ = write!(
            md,
            "\n## Disturbed runs\n\nRuns during which other processes on the machine (not \
             the bench, not what it started) used more than {DISTURBED_CORES} of a core, or the \
             hypervisor took more than {DISTURBED_STEAL_PCT} % of the CPU time, over the steady \
             middle of the run.\n\n| target | point | repeat | IOPS | others (cores) | steal % | busiest others (cores) |\n\
             |---|---|---:|---:|---:|---:|---|\n"
        );
        for (p, x) in d {
            let _ = writeln!(
                md,
                "| {} | {} | {}{} | {} | {} | {} | {} |",
                label(s, &p.target),
                p.key.replace('|', " "),
                x.repeat,
                x.round.map_or(String::new(), |r| format!(" (round {r})")),
                k(x.iops),
                x.others_cpu_cores.map_or("—".into(), |c| format!("{c:.2}")),
                x.steal_pct.map_or("—".into(), |c| format!("{c:.1}")),
                x.others_top.join(", ").replace('|', "\\|"),
            );
        }
    }
}

/// The plots, and how to read the report.
fn plots_and_how_to_read(s: &RunSummary, md: &mut String) {
    if !s.plots.is_empty() {
        md.push_str("\n## Plots\n\n");
        for p in &s.plots {
            let _ = writeln!(md, "![{p}]({p})\n");
        }
    }
    md.push_str(
        "\n## How to read this\n\n\
         - All targets ran one after another on the same machine in this one run; compare ratios, \
         not absolute numbers across runs (a shared 2-core VM moves by 15 % or more).\n\
         - Targets are started by the bench, in a process group of their own, and stopped after \
         their points; memory-backed ones are written once (1 MiB sequential) before measuring, \
         so reads hit data. The file-serving peers (nbdkit file, qemu-nbd, nbd-server) read \
         through the page cache; ringblock's file device and raw fio use O_DIRECT.\n\
         - The client and the server share the machine's CPUs: a client that burns a core \
         (fio's nbd engine) takes it from the server.\n\
         - Raw fio JSON and lean-client results of every run are under `raw/`.\n",
    );
}

fn is_profile(s: &RunSummary, target: &str) -> bool {
    s.settings["profiles"].as_array().is_some_and(|v| {
        v.iter()
            .any(|p| p.as_str().map(|p| format!("ringblock-{p}")) == Some(target.to_string()))
    })
}

/// The keys of the points measured on any of `ids`, each once, in the order of the run.
fn point_keys(s: &RunSummary, ids: &[String]) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for p in s.points.iter().filter(|p| ids.contains(&p.target)) {
        if !keys.contains(&p.key) {
            keys.push(p.key.clone());
        }
    }
    keys
}

fn profile_ids(s: &RunSummary) -> Vec<String> {
    s.settings["profiles"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|p| p.as_str().map(|p| format!("ringblock-{p}")))
                .filter(|id| {
                    s.points
                        .iter()
                        .any(|p| &p.target == id && !p.samples.is_empty())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The firmware profiles side by side with ringblock's plain RAM device.
fn profiles_table(s: &RunSummary, md: &mut String) {
    let ids = profile_ids(s);
    if ids.is_empty() {
        return;
    }
    md.push_str(
        "\n## Firmware profiles\n\nringblock on a RAM device opened with each profile and \
         `emulate_profile_latency = true` (the delay wrapper adds the profile's service time and \
         bandwidth), lean client, one connection. Cells: IOPS / p50 µs / p99 µs; the first \
         column is ringblock's plain RAM device.",
    );
    let mib = |key: &str| s.settings[key].as_u64().map(|b| b >> 20);
    if let (Some(p), Some(r)) = (mib("profile_region_bytes"), mib("region_bytes")) {
        if p != r {
            let _ = write!(
                md,
                " The profile targets use a {p} MiB region (emulated slow devices are slow to \
                 prefill), the RAM device {r} MiB: random IO over a smaller region is kinder to \
                 caches and TLBs, so compare the profiles with each other more than with the \
                 first column."
            );
        }
    }
    md.push_str("\n\n| workload | ringblock (ram) |");
    for id in &ids {
        let _ = write!(md, " {} |", label(s, id));
    }
    md.push_str("\n|---|---:|");
    for _ in &ids {
        md.push_str("---:|");
    }
    md.push('\n');
    let keys = point_keys(s, &ids);
    let cell = |t: &str, key: &str| {
        s.point(t, key)
            .and_then(|p| p.summary.as_ref())
            .map_or("—".into(), |x| {
                format!(
                    "{} / {} / {}",
                    k(x.iops.median),
                    opt(x.p50_us, num),
                    opt(x.p99_us, num)
                )
            })
    };
    for key in keys {
        let wl = key.split('|').next().unwrap_or("");
        let name = crate::matrix::workload(wl).map_or(wl, |w| w.label);
        let _ = write!(md, "| {name} | {} |", cell("ringblock", &key));
        for id in &ids {
            let _ = write!(md, " {} |", cell(id, &key));
        }
        md.push('\n');
    }
}

/// NBD and raw targets that ran, in run order, excluding profile targets.
fn main_targets(s: &RunSummary) -> Vec<String> {
    s.targets
        .iter()
        .filter(|t| t.id != "engine" && !is_profile(s, &t.id))
        .filter(|t| {
            s.points
                .iter()
                .any(|p| p.target == t.id && !p.samples.is_empty())
        })
        .map(|t| t.id.clone())
        .collect()
}

/// A workload's name short enough for a chart's category axis (about 10 characters).
fn short_label(id: &str) -> String {
    match id {
        "randread-4k-qd1" => "rd 4k q1",
        "randread-4k-qd32" => "rd 4k q32",
        "randwrite-4k-qd1" => "wr 4k q1",
        "randwrite-4k-qd32" => "wr 4k q32",
        "randrw70-4k-qd32" => "70/30 q32",
        "read-128k-qd8" => "seq rd 128k",
        "write-128k-qd8" => "seq wr 128k",
        "read-1m-qd8" => "seq rd 1M",
        "write-1m-qd8" => "seq wr 1M",
        other => other,
    }
    .to_string()
}

fn median_of(
    s: &RunSummary,
    target: &str,
    key: &str,
    f: fn(&crate::results::Summary) -> Option<f64>,
) -> Option<f64> {
    s.point(target, key)
        .and_then(|p| p.summary.as_ref())
        .and_then(f)
}

/// A chart file: its name, the chart, and whether it is drawn as bars (else lines).
type NamedChart = (String, Chart, bool);

/// A series per target (its label, a value per category), leaving out targets with none.
fn series_of(
    s: &RunSummary,
    targets: &[String],
    values: impl Fn(&str) -> Vec<Option<f64>>,
) -> Vec<(String, Vec<Option<f64>>)> {
    targets
        .iter()
        .map(|t| (label(s, t), values(t)))
        .filter(|(_, v)| v.iter().any(Option::is_some))
        .collect()
}

fn iops(x: &crate::results::Summary) -> Option<f64> {
    Some(x.iops.median)
}

/// The charts of a run.
pub fn charts(s: &RunSummary) -> Vec<NamedChart> {
    let targets = main_targets(s);
    let mut out = vec![headline_chart(s, &targets), workload_chart(s, &targets)];
    out.extend(latency_charts(s, &targets));
    out.push(cpu_chart(s, &targets));
    out.extend(profiles_chart(s));
    out
}

/// 4k random read QD32 by client and connections.
fn headline_chart(s: &RunSummary, targets: &[String]) -> NamedChart {
    let cats = [
        ("fio x1", "randread-4k-qd32|fio|x1"),
        ("lean x1", "randread-4k-qd32|lean|x1"),
        ("lean x2", "randread-4k-qd32|lean|x2"),
        ("lean x4", "randread-4k-qd32|lean|x4"),
    ];
    let present: Vec<&(&str, &str)> = cats
        .iter()
        .filter(|(_, key)| {
            targets
                .iter()
                .any(|t| s.point(t, key).is_some_and(|p| !p.samples.is_empty()))
        })
        .collect();
    let nbd: Vec<String> = targets.iter().filter(|t| *t != "raw").cloned().collect();
    let chart = Chart {
        title: "4k random read QD32: IOPS by client and connections".into(),
        y_label: "IOPS".into(),
        categories: present.iter().map(|(c, _)| c.to_string()).collect(),
        series: series_of(s, &nbd, |t| {
            present
                .iter()
                .map(|(_, key)| median_of(s, t, key, iops))
                .collect()
        }),
        log_y: false,
    };
    ("headline.svg".to_string(), chart, true)
}

/// IOPS by workload, fio one job.
fn workload_chart(s: &RunSummary, targets: &[String]) -> NamedChart {
    let wls: Vec<&crate::matrix::Workload> = WORKLOADS
        .iter()
        .filter(|w| {
            let key = format!("{}|fio|x1", w.id);
            targets
                .iter()
                .any(|t| s.point(t, &key).is_some_and(|p| !p.samples.is_empty()))
        })
        .collect();
    let chart = Chart {
        title: "IOPS by workload per target (fio, one job; rd/wr 4k: random; log scale)".into(),
        y_label: "IOPS".into(),
        categories: wls.iter().map(|w| short_label(w.id)).collect(),
        series: series_of(s, targets, |t| {
            wls.iter()
                .map(|w| median_of(s, t, &format!("{}|fio|x1", w.id), iops))
                .collect()
        }),
        log_y: true,
    };
    ("iops-by-workload.svg".to_string(), chart, true)
}

/// Latency percentiles at QD1 (fio) and QD32 (lean client).
fn latency_charts(s: &RunSummary, targets: &[String]) -> Vec<NamedChart> {
    [
        (
            "latency-qd1.svg",
            "randread-4k-qd1|fio|x1",
            "Latency percentiles, 4k random read QD1 (fio), µs, log scale",
        ),
        (
            "latency-qd32.svg",
            "randread-4k-qd32|lean|x1",
            "Latency percentiles, 4k random read QD32 (lean client, 1 connection), µs, log scale",
        ),
    ]
    .into_iter()
    .map(|(name, key, title)| {
        let series: Vec<(String, Vec<Option<f64>>)> = targets
            .iter()
            .filter_map(|t| {
                let x = s.point(t, key)?.summary.as_ref()?;
                Some((
                    label(s, t),
                    [x.p50_us, x.p99_us, x.p99_9_us, x.p99_99_us]
                        .iter()
                        .map(|v| v.map(|v| v.median))
                        .collect(),
                ))
            })
            .collect();
        let chart = Chart {
            title: title.into(),
            y_label: "µs".into(),
            categories: ["p50", "p99", "p99.9", "p99.99"].map(String::from).to_vec(),
            series,
            log_y: true,
        };
        (name.to_string(), chart, false)
    })
    .collect()
}

/// Server CPU per IO at the fixed rate.
fn cpu_chart(s: &RunSummary, targets: &[String]) -> NamedChart {
    let rate = s.settings["rate_iops"].as_u64().unwrap_or(20_000);
    let cats = ["fio", "lean"].map(|client| {
        (
            format!("{client} at {rate} IOPS"),
            format!("randread-4k-qd32|{client}|x1|rate={rate}"),
        )
    });
    let cpu = |x: &crate::results::Summary| x.server_cpu_us_per_io.map(|c| c.median);
    let chart = Chart {
        title: format!("Server CPU per IO at {rate} IOPS (µs = CPU s per million IOs)"),
        y_label: "µs per IO".into(),
        categories: cats.iter().map(|(c, _)| c.clone()).collect(),
        series: series_of(s, targets, |t| {
            cats.iter()
                .map(|(_, key)| median_of(s, t, key, cpu))
                .collect()
        }),
        log_y: false,
    };
    ("cpu-at-rate.svg".to_string(), chart, true)
}

/// ringblock on each emulated firmware profile, next to its plain RAM device.
fn profiles_chart(s: &RunSummary) -> Option<NamedChart> {
    let ids = profile_ids(s);
    if ids.is_empty() {
        return None;
    }
    let keys = point_keys(s, &ids);
    let mut all = vec!["ringblock".to_string()];
    all.extend(ids);
    let series = all
        .iter()
        .map(|t| {
            (
                if t == "ringblock" {
                    "ringblock (ram, no emulation)".to_string()
                } else {
                    label(s, t)
                },
                keys.iter().map(|key| median_of(s, t, key, iops)).collect(),
            )
        })
        .collect();
    let chart = Chart {
        title: "ringblock on emulated firmware profiles (lean client; log scale)".into(),
        y_label: "IOPS".into(),
        categories: keys
            .iter()
            .map(|k| short_label(k.split('|').next().unwrap_or("")))
            .collect(),
        series,
        log_y: true,
    };
    Some(("profiles.svg".to_string(), chart, true))
}

#[derive(clap::Args, Debug, Clone)]
pub struct ReportArgs {
    /// A results folder holding summary.json.
    pub dir: std::path::PathBuf,
}

/// `ringblock-bench report DIR`: write report.md and the plots again from summary.json
/// (after a change to the report, or to re-read an old run).
pub fn rerun(args: &ReportArgs) -> Result<()> {
    use anyhow::Context;
    let path = args.dir.join("summary.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut s: RunSummary =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    s.plots = write_plots(&s, &args.dir)?;
    std::fs::write(args.dir.join("report.md"), markdown(&s))?;
    crate::results::write_json(&args.dir, "summary.json", &s)?;
    println!("{}", headline_markdown(&s));
    Ok(())
}

/// Write every chart that has data as an SVG in `dir`; returns the file names.
pub fn write_plots(s: &RunSummary, dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for (name, chart, bars) in charts(s) {
        if chart.is_empty() {
            continue;
        }
        let path = dir.join(&name);
        if bars {
            plot::bars_svg(&chart, &path)?;
        } else {
            plot::lines_svg(&chart, &path)?;
        }
        names.push(name);
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::tests::{point, sample, status, summary};
    use crate::results::{headline, IdleResult, VerifyResult};

    fn run() -> RunSummary {
        let rr = "randread-4k-qd32";
        let mut pts = Vec::new();
        for (t, f) in [("ringblock", 2.0), ("nbdkit-memory", 1.0), ("raw", 1.5)] {
            pts.push(point(
                t,
                &format!("{rr}|fio|x1"),
                vec![sample(1, 40_000.0 * f, None), sample(2, 42_000.0 * f, None)],
            ));
            if t != "raw" {
                pts.push(point(
                    t,
                    &format!("{rr}|lean|x1"),
                    vec![
                        sample(1, 100_000.0 * f, None),
                        sample(2, 90_000.0 * f, None),
                    ],
                ));
                let mut p = point(
                    t,
                    &format!("{rr}|fio|x1|rate=20000"),
                    vec![sample(1, 20_000.0, Some(2.0 / f))],
                );
                p.rate_iops = Some(20_000);
                pts.push(p);
            }
        }
        pts.push(point(
            "ringblock-nvme",
            "randread-4k-qd1|lean|x1",
            vec![sample(1, 9_000.0, None)],
        ));
        let mut s = summary(
            pts,
            vec![
                status("raw", "ran"),
                status("ringblock", "ran"),
                status("nbdkit-memory", "ran"),
                status("qemu-nbd", "skipped"),
                status("ringblock-nvme", "ran"),
            ],
        );
        s.settings = serde_json::json!({"rate_iops": 20000, "profiles": ["nvme"], "repeat": 2,
            "runtime_s": 1.5, "ramp_s": 0.0, "region_bytes": 268435456u64});
        s.idle.push(IdleResult {
            target: "ringblock".into(),
            window_s: 2.0,
            cpu_pct: Spread::of(&[0.5]).unwrap(),
        });
        s.verify.push(VerifyResult {
            target: "ringblock".into(),
            ok: true,
            ops: 10,
            reads: 5,
            writes: 5,
            errors: 0,
            verify_failures: 0,
            detail: "x".into(),
        });
        s.headline = headline(&s, 20_000);
        s
    }

    #[test]
    fn report_has_a_headline_first_and_tables() {
        let s = run();
        let md = markdown(&s);
        let headline_at = md.find("## Headline").unwrap();
        assert!(headline_at < md.find("## Targets").unwrap());
        assert!(md.contains(
            "| ringblock ÷ nbdkit memory: 4k random read QD32, lean client, 1 connection | 190.0k IOPS | 95.0k IOPS | **2.00** (2.00–2.00) | ≥ 1.5 (aim 2) | met |"
        ), "{md}");
        assert!(md.contains("qemu-nbd skipped: `x` is not installed"));
        assert!(md.contains("Idle CPU of ringblock: **0.50 %**"));
        assert!(md.contains("passed on all 1 NBD targets"));
        assert!(md.contains("### 4k random read QD32"));
        // The nbdkit row of the per-workload table, with ringblock ÷ nbdkit = 2.00.
        let row = md
            .lines()
            .find(|l| l.starts_with("| nbdkit-memory | lean | 1 |"))
            .unwrap();
        assert!(row.ends_with("| 2.00 |"), "{row}");
        // Raw fio is compared with ringblock's file device (not in this run), not its RAM one.
        let raw = md
            .lines()
            .find(|l| l.starts_with("| raw | fio | 1 |"))
            .unwrap();
        assert!(raw.ends_with("| — |"), "{raw}");
        assert!(md.contains("## Fixed rate: 20000 IOPS"));
        assert!(md.contains("## Firmware profiles"));
        assert!(
            md.contains("| 4k random read QD1 | — | 9.00k / 100 / 300 |"),
            "{md}"
        );
        assert_tables_well_formed(&md);
    }

    /// Every table row has as many cells as its header, and so has the separator under it.
    fn assert_tables_well_formed(md: &str) {
        let mut cols = 0;
        for l in md.lines() {
            if l.starts_with("|---") {
                assert_eq!(l.matches('|').count() - 1, cols, "separator {l:?}");
            } else if l.starts_with('|') {
                let n = l.matches(" |").count();
                if cols == 0 {
                    cols = n;
                }
                assert_eq!(n, cols, "row {l:?}");
            } else {
                cols = 0;
            }
        }
    }

    #[test]
    fn the_host_line_gives_the_wake_up_cost_when_it_was_measured() {
        let mut s = run();
        s.host = serde_json::json!({"kernel": "6.18", "idle": "cpuidle haltpoll, guest halt polling 0 ns (off)"});
        let md = markdown(&s);
        assert!(
            md.contains("(cpuidle haltpoll, guest halt polling 0 ns (off)),"),
            "{md}"
        );
        assert!(!md.contains("sleep-and-wake"), "{md}");
        s.host["wake_cost"] = serde_json::json!({"cpus": [0, 1],
            "across_cpus": {"cpu_ns": 46_120.0, "wall_ns": 60_000.0},
            "same_cpu": {"cpu_ns": 5_960.0, "wall_ns": 6_000.0}});
        let md = markdown(&s);
        assert!(md.contains("(cpuidle haltpoll, guest halt polling 0 ns (off); a sleep-and-wake round trip costs 46.1 µs of CPU across CPUs 0 and 1, 6.0 µs on one),"), "{md}");
        s.host["wake_cost"]["across_cpus"] = serde_json::Value::Null;
        assert!(markdown(&s).contains("costs 6.0 µs of CPU on one CPU)"));
    }

    #[test]
    fn disturbed_runs_are_marked() {
        let mut s = run();
        let md = markdown(&s);
        assert!(!md.contains("Disturbance:"), "nothing measured it");
        for p in &mut s.points {
            for x in &mut p.samples {
                x.others_cpu_cores = Some(0.05);
                x.steal_pct = Some(0.0);
            }
        }
        assert!(markdown(&s).contains("- Disturbance: none seen"));
        let p = s
            .points
            .iter_mut()
            .find(|p| p.target == "nbdkit-memory" && p.key == "randread-4k-qd32|lean|x1")
            .unwrap();
        p.samples[1].others_cpu_cores = Some(0.9);
        p.samples[1].others_top = vec!["rustc 0.80".into(), "cc 0.10".into()];
        let md = markdown(&s);
        assert!(md.contains("**1 of "), "{md}");
        assert!(md.contains("| nbdkit-memory ⚠ | lean | 1 |"), "{md}");
        assert!(md.contains("## Disturbed runs"));
        assert!(
            md.contains("| nbdkit-memory | randread-4k-qd32 lean x1 | 2 | 90.0k | 0.90 | 0.0 | rustc 0.80, cc 0.10 |"),
            "{md}"
        );
        assert_tables_well_formed(&md);
    }

    #[test]
    fn plots_are_written_for_what_was_measured() {
        let s = run();
        let dir = tempfile::tempdir().unwrap();
        let names = write_plots(&s, dir.path()).unwrap();
        for want in [
            "headline.svg",
            "iops-by-workload.svg",
            "latency-qd32.svg",
            "cpu-at-rate.svg",
            "profiles.svg",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
            let text = std::fs::read_to_string(dir.path().join(want)).unwrap();
            assert!(text.starts_with("<svg"), "{want}");
        }
        assert!(
            !names.iter().any(|n| n == "latency-qd1.svg"),
            "no QD1 fio data"
        );
        // The SVGs are well-formed XML as far as a reader can tell: one root, balanced tags.
        for name in &names {
            let text = std::fs::read_to_string(dir.path().join(name)).unwrap();
            assert!(text.trim_end().ends_with("</svg>"), "{name}");
            assert_eq!(text.matches("<svg").count(), 1, "{name}");
            assert_eq!(
                text.matches("<text").count(),
                text.matches("</text>").count(),
                "{name}"
            );
        }
        let charts = charts(&s);
        let (_, h, _) = charts.iter().find(|(n, ..)| n == "headline.svg").unwrap();
        assert_eq!(h.categories, vec!["fio x1", "lean x1"]);
        // Every workload has a short name for the category axis.
        for w in &WORKLOADS {
            assert!(short_label(w.id).len() <= 11, "{}", w.id);
        }
        assert_eq!(h.series.len(), 2, "raw has no NBD client point");
    }
}

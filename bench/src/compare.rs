//! `--compare OLD.json` (and `ringblock-bench compare OLD NEW`): what changed between two runs'
//! `summary.json`, point by point (IOPS, p99, server CPU per IO) and in the headline ratios.
//!
//! Read as plain JSON so a summary from an older bench still compares as far as it can.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde_json::Value;

#[derive(clap::Args, Debug, Clone)]
pub struct CompareArgs {
    /// The earlier run's summary.json (or its results folder).
    pub old: PathBuf,
    /// The later run's summary.json (or its results folder).
    pub new: PathBuf,
}

fn load(path: &Path) -> Result<Value> {
    let file = if path.is_dir() {
        path.join("summary.json")
    } else {
        path.to_path_buf()
    };
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    ensure!(
        v["schema"]
            .as_str()
            .is_some_and(|s| s.starts_with("ringblock-bench-run/")),
        "{} is not a ringblock-bench run summary",
        file.display()
    );
    Ok(v)
}

/// (target|key) → (iops, p99 µs, server CPU µs/IO) medians.
type Medians = (Option<f64>, Option<f64>, Option<f64>);

fn medians(v: &Value) -> BTreeMap<String, Medians> {
    let mut m = BTreeMap::new();
    for p in v["points"].as_array().into_iter().flatten() {
        let s = &p["summary"];
        if s.is_null() {
            continue;
        }
        let med = |f: &str| s[f]["median"].as_f64();
        m.insert(
            format!(
                "{}|{}",
                p["target"].as_str().unwrap_or("?"),
                p["key"].as_str().unwrap_or("?")
            ),
            (med("iops"), med("p99_us"), med("server_cpu_us_per_io")),
        );
    }
    m
}

fn headline_values(v: &Value) -> BTreeMap<String, (String, Option<f64>)> {
    v["headline"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| {
            let r = &h["ratio"];
            let value = r["paired"]["median"].as_f64().or(r["of_medians"].as_f64());
            Some((
                h["id"].as_str()?.to_string(),
                (h["what"].as_str().unwrap_or("").to_string(), value),
            ))
        })
        .collect()
}

fn change(old: Option<f64>, new: Option<f64>) -> String {
    match (old, new) {
        (Some(a), Some(b)) if a != 0.0 => format!("{:+.1}%", (b - a) / a * 100.0),
        _ => "—".into(),
    }
}

fn cell(x: Option<f64>) -> String {
    match x {
        Some(x) if x >= 1000.0 => format!("{:.1}k", x / 1000.0),
        Some(x) => format!("{x:.2}"),
        None => "—".into(),
    }
}

/// Wake-up costs further apart than this factor make two hosts differ.
const WAKE_COST_ALIKE: f64 = 1.25;

/// How the two runs' hosts differ in what moves the numbers: kernel, CPUs, how idle CPUs wait,
/// and what a sleep and wake-up costs. Empty when they look alike, or were not recorded.
fn host_differences(old: &Value, new: &Value) -> Vec<String> {
    let (ho, hn) = (&old["host"], &new["host"]);
    let mut lines = Vec::new();
    for (field, name) in [
        ("kernel", "kernel"),
        ("cpus", "CPUs"),
        ("idle", "idle CPUs"),
    ] {
        let (a, b) = (&ho[field], &hn[field]);
        if !a.is_null() && !b.is_null() && a != b {
            let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_string);
            lines.push(format!("{name}: {} → {}", text(a), text(b)));
        }
    }
    for (field, name) in [("across_cpus", "across CPUs"), ("same_cpu", "on one CPU")] {
        let cost = |h: &Value| {
            h["wake_cost"][field]["cpu_ns"]
                .as_f64()
                .filter(|c| *c > 0.0)
        };
        if let (Some(a), Some(b)) = (cost(ho), cost(hn)) {
            if a.max(b) / a.min(b) > WAKE_COST_ALIKE {
                lines.push(format!(
                    "a sleep-and-wake round trip {name}: {:.1} µs → {:.1} µs of CPU",
                    a / 1e3,
                    b / 1e3
                ));
            }
        }
    }
    lines
}

/// A Markdown comparison of two summaries.
pub fn compare(old: &Value, new: &Value) -> String {
    let mut md = format!(
        "## Change from {} to {}\n\n",
        old["started_utc"].as_str().unwrap_or("?"),
        new["started_utc"].as_str().unwrap_or("?")
    );
    let hosts = host_differences(old, new);
    if !hosts.is_empty() {
        md.push_str(
            "**The hosts differ**, so changes in CPU per IO and latency may come from the host \
             rather than the code:\n",
        );
        for l in &hosts {
            let _ = writeln!(md, "- {l}");
        }
        md.push('\n');
    }
    let (ho, hn) = (headline_values(old), headline_values(new));
    if !hn.is_empty() {
        md.push_str("| headline | before | after | change |\n|---|---:|---:|---:|\n");
        for (id, (what, after)) in &hn {
            let before = ho.get(id).and_then(|(_, v)| *v);
            let _ = writeln!(
                md,
                "| {what} | {} | {} | {} |",
                cell(before),
                cell(*after),
                change(before, *after)
            );
        }
        md.push('\n');
    }
    let (mo, mn) = (medians(old), medians(new));
    md.push_str(
        "| target | point | IOPS before | IOPS after | change | p99 µs before | p99 µs after | change | server µs/IO before | after | change |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut only_old = 0;
    for (key, (i1, l1, c1)) in &mn {
        let (target, point) = key.split_once('|').unwrap_or((key, ""));
        let (i0, l0, c0) = mo.get(key).copied().unwrap_or((None, None, None));
        let _ = writeln!(
            md,
            "| {target} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            point.replace('|', " "),
            cell(i0),
            cell(*i1),
            change(i0, *i1),
            cell(l0),
            cell(*l1),
            change(l0, *l1),
            cell(c0),
            cell(*c1),
            change(c0, *c1)
        );
    }
    for key in mo.keys() {
        if !mn.contains_key(key) {
            only_old += 1;
        }
    }
    if only_old > 0 {
        let _ = writeln!(
            md,
            "\n{only_old} point(s) of the earlier run are not in this one."
        );
    }
    md
}

/// Compare two summary files (or results folders).
pub fn compare_files(old: &Path, new: &Path) -> Result<String> {
    Ok(compare(&load(old)?, &load(new)?))
}

pub fn run(args: &CompareArgs) -> Result<()> {
    println!("{}", compare_files(&args.old, &args.new)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::headline;
    use crate::results::tests::{point, sample, status, summary};

    #[test]
    fn compares_points_and_headline() {
        let key = "randread-4k-qd32|lean|x1";
        let mk = |rb: f64| {
            let mut s = summary(
                vec![
                    point("ringblock", key, vec![sample(1, rb, None)]),
                    point("nbdkit-memory", key, vec![sample(1, 100_000.0, None)]),
                ],
                vec![status("ringblock", "ran"), status("nbdkit-memory", "ran")],
            );
            s.headline = headline(&s, 20_000);
            serde_json::to_value(&s).unwrap()
        };
        let (old, new) = (mk(150_000.0), mk(200_000.0));
        let md = compare(&old, &new);
        assert!(
            md.contains("| ringblock | randread-4k-qd32 lean x1 | 150.0k | 200.0k | +33.3% |"),
            "{md}"
        );
        assert!(
            md.contains("lean client, 1 connection | 1.50 | 2.00 | +33.3% |"),
            "{md}"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("summary.json"), old.to_string()).unwrap();
        let f = dir.path().join("new.json");
        std::fs::write(&f, new.to_string()).unwrap();
        assert_eq!(compare_files(dir.path(), &f).unwrap(), md);
        std::fs::write(&f, "{\"schema\": \"other\"}").unwrap();
        assert!(compare_files(&f, &f).is_err());
    }

    #[test]
    fn hosts_that_differ_are_named_before_the_numbers() {
        let s = summary(vec![], vec![]);
        let mut old = serde_json::to_value(&s).unwrap();
        old["host"] = serde_json::json!({"kernel": "6.18", "cpus": [0, 1],
            "idle": "cpuidle haltpoll, guest halt polling 0 ns (off)",
            "wake_cost": {"cpus": [0, 1], "across_cpus": {"cpu_ns": 40_000.0, "wall_ns": 1.0},
                "same_cpu": {"cpu_ns": 11_600.0, "wall_ns": 1.0}}});
        let mut new = old.clone();
        assert!(!compare(&old, &new).contains("hosts differ"));
        // Within the tolerance: alike.
        new["host"]["wake_cost"]["across_cpus"]["cpu_ns"] = serde_json::json!(34_000.0);
        assert!(!compare(&old, &new).contains("hosts differ"));
        new["host"]["wake_cost"]["across_cpus"]["cpu_ns"] = serde_json::json!(9_000.0);
        new["host"]["idle"] = serde_json::json!("cpuidle haltpoll, guest halt polling 200000 ns");
        let md = compare(&old, &new);
        let at = md.find("**The hosts differ**").expect(&md);
        assert!(at < md.find("| target |").unwrap(), "{md}");
        assert!(
            md.contains("- idle CPUs: cpuidle haltpoll, guest halt polling 0 ns (off) → cpuidle haltpoll, guest halt polling 200000 ns\n"),
            "{md}"
        );
        assert!(
            md.contains("- a sleep-and-wake round trip across CPUs: 40.0 µs → 9.0 µs of CPU\n"),
            "{md}"
        );
        assert!(
            !md.contains("kernel:") && !md.contains("on one CPU:"),
            "{md}"
        );
        // An older summary without the host fields compares without the section.
        new["host"] = serde_json::json!({});
        assert!(!compare(&old, &new).contains("hosts differ"));
    }

    #[test]
    fn points_only_in_one_run_are_shown_as_such() {
        let key = "randread-4k-qd32|lean|x1";
        let old = summary(
            vec![
                point("ringblock", key, vec![sample(1, 100.0, None)]),
                point("qemu-nbd", key, vec![sample(1, 10.0, None)]),
            ],
            vec![status("ringblock", "ran"), status("qemu-nbd", "ran")],
        );
        let new = summary(
            vec![
                point("ringblock", key, vec![sample(1, 90.0, Some(2.0))]),
                point("nbd-server", key, vec![sample(1, 5.0, None)]),
            ],
            vec![status("ringblock", "ran"), status("nbd-server", "ran")],
        );
        let md = compare(
            &serde_json::to_value(&old).unwrap(),
            &serde_json::to_value(&new).unwrap(),
        );
        assert!(
            md.contains("| ringblock | randread-4k-qd32 lean x1 | 100.00 | 90.00 | -10.0% |"),
            "{md}"
        );
        assert!(
            md.contains("| nbd-server | randread-4k-qd32 lean x1 | — | 5.00 | — |"),
            "{md}"
        );
        assert!(
            md.contains("1 point(s) of the earlier run are not in this one."),
            "{md}"
        );
        // Every row has the header's number of cells.
        for l in md
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| headline"))
        {
            assert_eq!(l.matches(" |").count(), 11, "{l}");
        }
    }
}

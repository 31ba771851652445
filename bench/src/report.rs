//! Summaries of repeated runs: a row per target with medians and spreads, its ratio to a
//! baseline, rendered as a Markdown table and written as JSON.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::fio::Percentiles;
use crate::stats::{paired_ratios, ratio, Spread};

/// One measurement of one target in one repeat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Sample {
    pub iops: f64,
    pub lat: Percentiles,
    pub cpu_us_per_io: Option<f64>,
    /// Percent of the machine's CPU time stolen by the hypervisor during the run.
    pub steal_pct: Option<f64>,
    /// Mean block-layer + device time of a read during the run, in µs.
    pub device_us_per_read: Option<f64>,
}

/// A target's summary over the repeats.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    pub label: String,
    pub iops: Spread,
    pub p50_ns: Spread,
    pub p99_ns: Spread,
    pub p99_9_ns: Spread,
    pub p99_99_ns: Spread,
    pub cpu_us_per_io: Option<Spread>,
    pub steal_pct: Option<Spread>,
    pub device_us_per_read: Option<Spread>,
    /// median(IOPS) / median(baseline IOPS).
    pub ratio_of_medians: Option<f64>,
    /// IOPS / baseline IOPS of the same repeat, summarised (robust to drift between repeats).
    pub paired_ratio: Option<Spread>,
}

impl Row {
    /// Summarise `samples`; `baseline` (same repeats, same order) gives the ratios.
    pub fn new(label: &str, samples: &[Sample], baseline: Option<&[Sample]>) -> Option<Row> {
        let col = |f: &dyn Fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<f64>>();
        let iops = col(&|s| s.iops);
        let opt = |f: &dyn Fn(&Sample) -> Option<f64>| {
            Spread::of(&samples.iter().filter_map(f).collect::<Vec<f64>>())
        };
        let iops_spread = Spread::of(&iops)?;
        let (ratio_of_medians, paired_ratio) = match baseline {
            Some(base) => {
                let b: Vec<f64> = base.iter().map(|s| s.iops).collect();
                (
                    Spread::of(&b).and_then(|bs| ratio(iops_spread.median, bs.median)),
                    Spread::of(&paired_ratios(&iops, &b)),
                )
            }
            None => (None, None),
        };
        Some(Row {
            label: label.to_string(),
            iops: iops_spread,
            p50_ns: Spread::of(&col(&|s| s.lat.p50_ns as f64))?,
            p99_ns: Spread::of(&col(&|s| s.lat.p99_ns as f64))?,
            p99_9_ns: Spread::of(&col(&|s| s.lat.p99_9_ns as f64))?,
            p99_99_ns: Spread::of(&col(&|s| s.lat.p99_99_ns as f64))?,
            cpu_us_per_io: opt(&|s| s.cpu_us_per_io),
            steal_pct: opt(&|s| s.steal_pct),
            device_us_per_read: opt(&|s| s.device_us_per_read),
            ratio_of_medians,
            paired_ratio,
        })
    }
}

fn us(ns: f64) -> String {
    let us = ns / 1000.0;
    if us >= 100.0 {
        format!("{us:.0}")
    } else {
        format!("{us:.1}")
    }
}

fn kilo(x: f64) -> String {
    format!("{:.1}k", x / 1000.0)
}

/// A Markdown table of `rows`: medians, IOPS range, and the ratio to the baseline.
pub fn markdown_table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| target | IOPS (median) | IOPS min–max | spread | p50 µs | p99 µs | p99.9 µs | p99.99 µs | CPU µs/IO | steal % | dev µs/rd | ratio (medians) | ratio (paired, min–max) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let ratio = r
            .ratio_of_medians
            .map_or("—".to_string(), |x| format!("{x:.3}"));
        let paired = r.paired_ratio.map_or("—".to_string(), |p| {
            format!("{:.3} ({:.3}–{:.3})", p.median, p.min, p.max)
        });
        let med = |x: Option<Spread>, digits: usize| {
            x.map_or("—".to_string(), |c| format!("{:.*}", digits, c.median))
        };
        s.push_str(&format!(
            "| {} | {} | {}–{} | {:.1}% | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.label,
            kilo(r.iops.median),
            kilo(r.iops.min),
            kilo(r.iops.max),
            r.iops.spread_pct,
            us(r.p50_ns.median),
            us(r.p99_ns.median),
            us(r.p99_9_ns.median),
            us(r.p99_99_ns.median),
            med(r.cpu_us_per_io, 2),
            med(r.steal_pct, 1),
            med(r.device_us_per_read, 0),
            ratio,
            paired,
        ));
    }
    s
}

/// Write `value` as pretty JSON to `dir/name`, creating `dir`. Returns the file's path.
pub fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(name);
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(iops: f64, p50: u64) -> Sample {
        Sample {
            iops,
            lat: Percentiles {
                p50_ns: p50,
                p99_ns: p50 * 3,
                p99_9_ns: p50 * 10,
                p99_99_ns: p50 * 20,
            },
            cpu_us_per_io: Some(5.0),
            steal_pct: None,
            device_us_per_read: Some(40.0),
        }
    }

    #[test]
    fn rows_compare_with_the_baseline_by_repeat() {
        let raw = [
            sample(100_000.0, 300_000),
            sample(120_000.0, 250_000),
            sample(110_000.0, 280_000),
        ];
        let eng = [
            sample(95_000.0, 320_000),
            sample(108_000.0, 290_000),
            sample(110_000.0, 300_000),
        ];
        let base = Row::new("raw", &raw, None).unwrap();
        assert_eq!(base.iops.median, 110_000.0);
        assert_eq!(base.ratio_of_medians, None);
        let r = Row::new("engine", &eng, Some(&raw)).unwrap();
        assert_eq!(r.iops.median, 108_000.0);
        assert!((r.ratio_of_medians.unwrap() - 108.0 / 110.0).abs() < 1e-12);
        let p = r.paired_ratio.unwrap();
        // Pairs: 0.95, 0.9, 1.0.
        assert!((p.median - 0.95).abs() < 1e-12);
        assert!((p.min - 0.9).abs() < 1e-12 && (p.max - 1.0).abs() < 1e-12);
        assert_eq!(r.p50_ns.median, 300_000.0);
        assert_eq!(Row::new("none", &[], None), None);

        let table = markdown_table(&[base, r]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[2].starts_with("| raw | 110.0k | 100.0k–120.0k | 18.2% | 280 |"));
        assert!(lines[2].contains("| 5.00 | — | 40 |"), "{}", lines[2]);
        assert!(
            lines[3].contains("| 0.982 | 0.950 (0.900–1.000) |"),
            "{}",
            lines[3]
        );
    }

    #[test]
    fn writes_json_into_a_new_directory() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a/b");
        let p = write_json(&out, "x.json", &serde_json::json!({"k": 1})).unwrap();
        let back: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        assert_eq!(back["k"], 1);
    }
}

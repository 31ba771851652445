//! The replication section of `report.md`.

use std::fmt::Write;

use super::ReplicationResult;
use crate::results::Ratio;

fn us(x: Option<f64>) -> String {
    x.map_or("—".into(), |v| format!("{v:.1}"))
}

fn ratio_text(r: Option<&Ratio>) -> String {
    let Some(r) = r else { return "—".into() };
    match (r.value(), r.paired) {
        (Some(v), Some(p)) if p.n > 1 => format!("{v:.3} ({:.3}–{:.3})", p.min, p.max),
        (Some(v), _) => format!("{v:.3}"),
        _ => "—".into(),
    }
}

/// The section: the set-ups and their points, the goals, the resyncs, the sends.
pub fn markdown(r: &ReplicationResult, md: &mut String) {
    let _ = writeln!(
        md,
        "\n## Replication (loopback)\n\n\
         A primary daemon with a RAM volume over NBD (TCP) and no replica, one sync replica, or \
         one async replica (a second daemon on the same host); fio's nbd engine, 4k random \
         writes; the set-ups run side by side and take turns (two rounds per repeat, the second \
         in reverse order). The mode is what the primary's `GET /api/replication` reports.\n\n\
         | replica | reported mode | QD1 p50 µs | QD1 p99 µs | QD1 IOPS | QD32 IOPS | QD32 p99 µs | primary CPU µs/IO (QD32) |\n\
         |---|---|---|---|---|---|---|---|"
    );
    for s in &r.setups {
        let sum = |i: usize| s.points.get(i).and_then(|p| p.summary.as_ref());
        let (q1, q32) = (sum(0), sum(1));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            s.id,
            s.reported_mode.as_deref().unwrap_or("—"),
            us(q1.and_then(|x| x.p50_us).map(|x| x.median)),
            us(q1.and_then(|x| x.p99_us).map(|x| x.median)),
            q1.map_or("—".into(), |x| format!("{:.0}", x.iops.median)),
            q32.map_or("—".into(), |x| format!("{:.0}", x.iops.median)),
            us(q32.and_then(|x| x.p99_us).map(|x| x.median)),
            us(q32.and_then(|x| x.server_cpu_us_per_io).map(|x| x.median)),
        );
    }
    disturbance_line(r, md);
    for s in r.setups.iter().filter(|s| s.mode_note.is_some()) {
        let _ = writeln!(
            md,
            "\nThe {} primary's log: `{}`",
            s.id,
            s.mode_note.as_deref().unwrap_or_default()
        );
    }
    let _ = writeln!(
        md,
        "\n| ratio against no replica | paired median (min–max) | goal | |\n|---|---|---|---|"
    );
    for g in &r.goals {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            g.what,
            ratio_text(g.ratio.as_ref()),
            g.goal.text(),
            g.status
        );
    }
    resync_table(r, md);
    sends_table(r, md);
    if !r.failures.is_empty() {
        let _ = writeln!(md, "\nNot measured:\n");
        for f in &r.failures {
            let _ = writeln!(md, "- {}", f.replace('\n', " "));
        }
    }
    for s in &r.setups {
        let _ = writeln!(md, "\n`{}` primary: `{}`", s.id, s.primary_command);
    }
}

/// The resyncs, with the primary's sends over each.
fn resync_table(r: &ReplicationResult, md: &mut String) {
    if !r.resyncs.is_empty() {
        let _ = writeln!(
            md,
            "\nResync: the sync replica suspended, the bytes written (1 MiB sequential, QD8), \
             resumed; time and bytes from the primary's `last_resync`; the primary's sends \
             over the resync from its `/metrics` (summed over reactors).\n\n\
             | repeat | zero_copy_sends | written MiB | resynced MiB | seconds | MiB/s | zero-copy sends | kernel copied | copied (small) | copied (unsupported) |\n\
             |---|---|---|---|---|---|---|---|---|---|"
        );
        for x in &r.resyncs {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {:.2} | {:.0} | {} | {} | {} | {} |",
                x.repeat,
                x.zero_copy_sends,
                x.written_bytes >> 20,
                x.done_bytes >> 20,
                x.seconds,
                x.mib_s,
                x.sends.zero_copy,
                x.sends.kernel_copied,
                x.sends.copied_small,
                x.sends.copied_unsupported
            );
        }
        let median = |zc: bool| {
            let v: Vec<f64> = r
                .resyncs
                .iter()
                .filter(|x| x.zero_copy_sends == zc)
                .map(|x| x.mib_s)
                .collect();
            crate::stats::Spread::of(&v).map(|s| s.median)
        };
        if let (Some(on), Some(off)) = (median(true), median(false)) {
            let _ = writeln!(
                md,
                "\nResync median: {on:.0} MiB/s with zero-copy sends, {off:.0} MiB/s without \
                 (on ÷ off {:.2}).",
                on / off
            );
        }
    }
}

/// The primary's sends over the QD32 points.
fn sends_table(r: &ReplicationResult, md: &mut String) {
    if !r.sends.is_empty() {
        let _ = writeln!(
            md,
            "\nThe primary's sends over a QD32 point, as its zero-copy counters see them (they \
             count only frames whose payload reaches the zero-copy threshold; 4 KiB writes are \
             under it and go with plain sends, counted nowhere; on loopback the kernel copies \
             even zero-copy sends):\n\n\
             | replica | during | zero-copy sends | kernel copied | copied (small) | copied (unsupported) |\n\
             |---|---|---|---|---|---|"
        );
        for x in &r.sends {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                x.setup,
                x.what,
                x.sends.zero_copy,
                x.sends.kernel_copied,
                x.sends.copied_small,
                x.sends.copied_unsupported
            );
        }
    }
}

/// Other processes' CPU and the steal over the points: on a shared machine, whether to trust
/// them (the bench marks a run where others took more than 0.25 of a core, or steal exceeded
/// 15 %, as disturbed).
fn disturbance_line(r: &ReplicationResult, md: &mut String) {
    let samples = || {
        r.setups
            .iter()
            .flat_map(|s| &s.points)
            .flat_map(|p| &p.samples)
    };
    let others: Vec<f64> = samples().filter_map(|x| x.others_cpu_cores).collect();
    let steal: Vec<f64> = samples().filter_map(|x| x.steal_pct).collect();
    let Some(o) = crate::stats::Spread::of(&others) else {
        return;
    };
    let disturbed =
        others.iter().filter(|&&c| c > 0.25).count() + steal.iter().filter(|&&p| p > 15.0).count();
    let _ = writeln!(
        md,
        "\nOther processes over the points: median {:.2}, max {:.2} of a core; steal max {:.1} %{}",
        o.median,
        o.max,
        steal.iter().copied().fold(0.0, f64::max),
        if disturbed > 0 {
            format!(" — ⚠ {disturbed} point run(s) disturbed: rerun on a quieter machine before quoting")
        } else {
            String::new()
        }
    );
}

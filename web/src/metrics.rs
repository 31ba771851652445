//! `/metrics` in the Prometheus text exposition format (0.0.4). Counters come straight from
//! the engine's atomics; latency histograms from its power-of-two buckets, with `le` in
//! seconds.

use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use ringblock_engine::io::zero_copy::SendCounts;
use ringblock_engine::stats::LatencySnapshot;
use ringblock_engine::Engine;

use crate::api::NbdClient;
use crate::metrics_replication::{replication_metrics, Replicated};
use crate::replication::ReplicationStatus;

/// Smallest and largest histogram bucket exported: 2^10 ns (~1 µs) … 2^36 ns (~69 s). Faster
/// operations fall in the first bucket, slower ones only in `+Inf`.
const FIRST_BUCKET: usize = 10;
const LAST_BUCKET: usize = 36;

pub(crate) struct Out(pub(crate) String);

impl Out {
    pub(crate) fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    pub(crate) fn line(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        value: impl std::fmt::Display,
    ) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// Label values: backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

pub(crate) fn histogram(out: &mut Out, name: &str, labels: &[(&str, &str)], h: &LatencySnapshot) {
    let mut cumulative = 0u64;
    let bounds_ns = LatencySnapshot::bucket_bounds_ns();
    for ((i, c), bound_ns) in h.counts.iter().enumerate().zip(bounds_ns) {
        cumulative += c;
        if (FIRST_BUCKET..=LAST_BUCKET).contains(&i) {
            let le = format!("{}", seconds(bound_ns));
            let mut l = labels.to_vec();
            l.push(("le", &le));
            out.line(&format!("{name}_bucket"), &l, cumulative);
        }
    }
    let mut l = labels.to_vec();
    l.push(("le", "+Inf"));
    out.line(&format!("{name}_bucket"), &l, h.count());
    out.line(&format!("{name}_sum"), labels, seconds(h.sum_ns));
    out.line(&format!("{name}_count"), labels, h.count());
}

/// A reactor counter of zero-copy sends: name, help (empty: under the previous line's), the
/// `reason` label if any, and its value.
type SendMetric = (
    &'static str,
    &'static str,
    Option<&'static str>,
    fn(&SendCounts) -> u64,
);

/// How each reactor's zero-copy sends went out (docs/performance.md, "Zero-copy sends").
fn send_metrics(
    o: &mut Out,
    reactors: &[ringblock_engine::ReactorSnapshot],
    core_label: impl Fn(Option<usize>) -> String,
) {
    let counters: [SendMetric; 4] = [
        (
            "ringblock_reactor_zero_copy_sends_total",
            "Sends that went out zero-copy (IORING_OP_SEND_ZC / SENDMSG_ZC).",
            None,
            |s| s.zero_copy,
        ),
        (
            "ringblock_reactor_zero_copy_kernel_copied_total",
            "Zero-copy sends the kernel reported it copied anyway (always on loopback).",
            None,
            |s| s.kernel_copied,
        ),
        (
            "ringblock_reactor_copied_sends_total",
            "Sends asked for zero-copy that went out by copying: the payload was under the \
             zero-copy threshold (reason=small), or the kernel has no zero-copy sends \
             (reason=unsupported).",
            Some("small"),
            |s| s.copied_small,
        ),
        (
            "ringblock_reactor_copied_sends_total",
            "",
            Some("unsupported"),
            |s| s.copied_unsupported,
        ),
    ];
    for (name, help, reason, get) in counters {
        if !help.is_empty() {
            o.head(name, "counter", help);
        }
        for r in reactors {
            let id = r.id.to_string();
            let core = core_label(r.core);
            let mut labels = vec![("reactor", id.as_str()), ("core", core.as_str())];
            labels.extend(reason.map(|r| ("reason", r)));
            o.line(name, &labels, get(&r.sends));
        }
    }
}

pub fn render(
    engine: &Engine,
    clients: &[NbdClient],
    uptime: Duration,
    replication: Option<&ReplicationStatus>,
) -> String {
    let mut o = Out(String::with_capacity(16 << 10));
    o.head(
        "ringblock_build_info",
        "gauge",
        "Version of the running daemon.",
    );
    o.line(
        "ringblock_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );
    o.head(
        "ringblock_uptime_seconds",
        "gauge",
        "Seconds since the web server started.",
    );
    o.line(
        "ringblock_uptime_seconds",
        &[],
        format!("{:.3}", uptime.as_secs_f64()),
    );

    let volumes = engine.volumes();
    type Counter = fn(&ringblock_engine::VolumeStats) -> u64;
    let counters: [(&str, &str, Counter); 7] = [
        ("reads", "Read requests completed.", |s| {
            s.reads.load(Relaxed)
        }),
        ("writes", "Write requests completed.", |s| {
            s.writes.load(Relaxed)
        }),
        ("read_bytes", "Bytes read.", |s| s.read_bytes.load(Relaxed)),
        ("write_bytes", "Bytes written.", |s| {
            s.write_bytes.load(Relaxed)
        }),
        ("flushes", "Flushes completed.", |s| s.flushes.load(Relaxed)),
        ("trims", "Trims and write-zeroes completed.", |s| {
            s.trims.load(Relaxed)
        }),
        ("errors", "Requests that failed.", |s| {
            s.errors.load(Relaxed)
        }),
    ];
    for (what, help, get) in counters {
        let name = format!("ringblock_volume_{what}_total");
        o.head(&name, "counter", help);
        for v in &volumes {
            o.line(&name, &[("volume", &v.name)], get(&v.stats));
        }
    }
    o.head("ringblock_volume_size_bytes", "gauge", "Volume size.");
    for v in &volumes {
        o.line(
            "ringblock_volume_size_bytes",
            &[("volume", &v.name)],
            v.size_bytes(),
        );
    }
    o.head(
        "ringblock_volume_allocated_bytes",
        "gauge",
        "Bytes of the volume backed by device chunks (thin provisioning).",
    );
    for v in &volumes {
        o.line(
            "ringblock_volume_allocated_bytes",
            &[("volume", &v.name)],
            v.allocated_chunks() * v.chunk_size_bytes(),
        );
    }
    let name = "ringblock_volume_latency_seconds";
    o.head(
        name,
        "histogram",
        "Request latency, submission to completion, by operation.",
    );
    for v in &volumes {
        for (op, h) in [
            ("read", &v.stats.read_latency),
            ("write", &v.stats.write_latency),
            ("flush", &v.stats.flush_latency),
        ] {
            histogram(
                &mut o,
                name,
                &[("volume", &v.name), ("op", op)],
                &h.snapshot(),
            );
        }
    }

    let reactors = engine.reactor_stats();
    let core_label = |c: Option<usize>| c.map_or_else(|| "none".to_string(), |c| c.to_string());
    type RGet = fn(&ringblock_engine::ReactorSnapshot) -> String;
    let rmetrics: [(&str, &str, &str, RGet); 7] = [
        (
            "ringblock_reactor_busy_seconds_total",
            "counter",
            "Time not parked (working or polling).",
            |r| seconds(r.busy_ns).to_string(),
        ),
        (
            "ringblock_reactor_idle_seconds_total",
            "counter",
            "Time parked in the kernel waiting for work.",
            |r| seconds(r.idle_ns).to_string(),
        ),
        (
            "ringblock_reactor_parks_total",
            "counter",
            "Times the reactor parked.",
            |r| r.parks.to_string(),
        ),
        (
            "ringblock_reactor_work_total",
            "counter",
            "Units of work done (messages, completions, task polls).",
            |r| r.messages.to_string(),
        ),
        (
            "ringblock_reactor_completions_total",
            "counter",
            "io_uring completions reaped.",
            |r| r.completions.to_string(),
        ),
        (
            "ringblock_reactor_ops_in_flight",
            "gauge",
            "Device operations in flight.",
            |r| r.ops_in_flight.to_string(),
        ),
        (
            "ringblock_reactor_parked",
            "gauge",
            "1 while the reactor is parked.",
            |r| u8::from(r.parked).to_string(),
        ),
    ];
    for (name, kind, help, get) in rmetrics {
        o.head(name, kind, help);
        for r in &reactors {
            let id = r.id.to_string();
            let core = core_label(r.core);
            o.line(name, &[("reactor", &id), ("core", &core)], get(r));
        }
    }
    send_metrics(&mut o, &reactors, core_label);

    let devices = engine.devices();
    type DGet = fn(&ringblock_engine::DeviceState) -> u64;
    let dmetrics: [(&str, &str, &str, DGet); 8] = [
        (
            "ringblock_device_size_bytes",
            "gauge",
            "Device size.",
            |d| d.size_bytes,
        ),
        (
            "ringblock_device_chunks",
            "gauge",
            "Data chunks on the device.",
            |d| u64::from(d.total_chunks()),
        ),
        (
            "ringblock_device_chunks_used",
            "gauge",
            "Data chunks allocated to volumes.",
            |d| d.used_chunks(),
        ),
        (
            "ringblock_device_read_errors_total",
            "counter",
            "Read errors the device returned.",
            |d| d.health.read_errors.load(Relaxed),
        ),
        (
            "ringblock_device_write_errors_total",
            "counter",
            "Write errors the device returned.",
            |d| d.health.write_errors.load(Relaxed),
        ),
        (
            "ringblock_device_flush_errors_total",
            "counter",
            "Flush errors the device returned.",
            |d| d.health.flush_errors.load(Relaxed),
        ),
        (
            "ringblock_device_metadata_failing",
            "gauge",
            "1 while metadata cannot be persisted.",
            |d| u64::from(d.health.metadata_failing.load(Relaxed)),
        ),
        (
            "ringblock_device_healthy",
            "gauge",
            "1 if the device reports no errors and its metadata persists.",
            |d| u64::from(crate::api::health(d).status == "ok"),
        ),
    ];
    for (name, kind, help, get) in dmetrics {
        o.head(name, kind, help);
        for d in devices {
            o.line(
                name,
                &[
                    ("device", &d.name),
                    ("kind", &d.kind),
                    ("profile", &d.profile.name),
                ],
                get(d),
            );
        }
    }

    o.head(
        "ringblock_nbd_clients",
        "gauge",
        "NBD clients connected, by export.",
    );
    let mut per_export: Vec<(&str, usize)> = volumes.iter().map(|v| (v.name.as_str(), 0)).collect();
    for c in clients {
        if let Some(e) = per_export.iter_mut().find(|(n, _)| *n == c.export) {
            e.1 += 1;
        }
    }
    for (export, n) in per_export {
        o.line("ringblock_nbd_clients", &[("export", export)], n);
    }

    let states: Vec<_> = volumes
        .iter()
        .filter_map(|v| Some((v, v.replication()?)))
        .collect();
    let replicated: Vec<Replicated<'_>> = states
        .iter()
        .map(|(v, r)| Replicated {
            volume: &v.name,
            size_bytes: v.size_bytes(),
            replication: r,
        })
        .collect();
    replication_metrics(&mut o, &replicated, replication);
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_with_seconds() {
        let mut counts = vec![0u64; 64];
        counts[3] = 5; // below the first exported bucket: counted in it
        counts[12] = 2;
        counts[40] = 1; // above the last: only in +Inf
        let h = LatencySnapshot {
            counts,
            sum_ns: 3_000_000_000,
        };
        let mut o = Out(String::new());
        histogram(&mut o, "x", &[("volume", "a\"b")], &h);
        let text = o.0;
        assert!(
            text.contains("x_bucket{volume=\"a\\\"b\",le=\"0.000001024\"} 5\n"),
            "{text}"
        );
        assert!(
            text.contains("x_bucket{volume=\"a\\\"b\",le=\"0.000004096\"} 7\n"),
            "{text}"
        );
        assert!(text.contains("le=\"68.719476736\"} 7\n"), "{text}");
        assert!(
            text.contains("x_bucket{volume=\"a\\\"b\",le=\"+Inf\"} 8\n"),
            "{text}"
        );
        assert!(text.contains("x_sum{volume=\"a\\\"b\"} 3\n"), "{text}");
        assert!(text.contains("x_count{volume=\"a\\\"b\"} 8\n"), "{text}");
    }

    #[test]
    fn send_counters_have_one_line_each_per_reactor() {
        let reactor = |id: u32, sends: SendCounts| ringblock_engine::ReactorSnapshot {
            id,
            core: Some(id as usize),
            busy_ns: 0,
            idle_ns: 0,
            parks: 0,
            messages: 0,
            completions: 0,
            ops_in_flight: 0,
            parked: false,
            sends,
        };
        let reactors = [
            reactor(
                0,
                SendCounts {
                    zero_copy: 5,
                    kernel_copied: 4,
                    copied_small: 3,
                    copied_unsupported: 0,
                },
            ),
            reactor(1, SendCounts::default()),
        ];
        let mut o = Out(String::new());
        send_metrics(&mut o, &reactors, |c| {
            c.map_or("none".into(), |c| c.to_string())
        });
        let text = o.0;
        for line in [
            "ringblock_reactor_zero_copy_sends_total{reactor=\"0\",core=\"0\"} 5\n",
            "ringblock_reactor_zero_copy_kernel_copied_total{reactor=\"0\",core=\"0\"} 4\n",
            "ringblock_reactor_copied_sends_total{reactor=\"0\",core=\"0\",reason=\"small\"} 3\n",
            "ringblock_reactor_copied_sends_total{reactor=\"0\",core=\"0\",reason=\"unsupported\"} 0\n",
            "ringblock_reactor_zero_copy_sends_total{reactor=\"1\",core=\"1\"} 0\n",
        ] {
            assert!(text.contains(line), "{line:?} missing:\n{text}");
        }
        // One HELP and TYPE per metric name, the two reasons under one.
        assert_eq!(text.matches("# TYPE ").count(), 3, "{text}");
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 8);
    }
}

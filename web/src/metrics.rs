//! `/metrics` in the Prometheus text exposition format (0.0.4). Counters come straight from
//! the engine's atomics; latency histograms from its power-of-two buckets, with `le` in
//! seconds.

use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use ringblock_engine::io::zero_copy::SendCounts;
use ringblock_engine::replication::{status::unix_ms, PeerState, Role, VolumeReplication};
use ringblock_engine::stats::LatencySnapshot;
use ringblock_engine::Engine;

use crate::api::NbdClient;
use crate::replication::ReplicationStatus;
use crate::replication_api::{peer_dirty_bytes, role_name};

/// Smallest and largest histogram bucket exported: 2^10 ns (~1 µs) … 2^36 ns (~69 s). Faster
/// operations fall in the first bucket, slower ones only in `+Inf`.
const FIRST_BUCKET: usize = 10;
const LAST_BUCKET: usize = 36;

struct Out(String);

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn line(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
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

fn histogram(out: &mut Out, name: &str, labels: &[(&str, &str)], h: &LatencySnapshot) {
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

/// A replicated volume as the replication metrics see it: name, size, state.
struct Replicated<'a> {
    volume: &'a str,
    size_bytes: u64,
    replication: &'a VolumeReplication,
}

/// Replication: roles, peer states, dirty bytes and resync progress straight from the
/// engine's volumes (atomics, like every other metric here, and present whether or not the
/// daemon passes a control); the unacknowledged bytes from the control's `status`, the only
/// place that knows them (a peer it does not report has no `lag_bytes` line).
fn replication_metrics(
    o: &mut Out,
    volumes: &[Replicated<'_>],
    status: Option<&ReplicationStatus>,
) {
    let name = "ringblock_volume_replication_role";
    o.head(
        name,
        "gauge",
        "1 for the volume's replication role on this node (primary or replica), 0 for the other.",
    );
    for v in volumes {
        let role = v.replication.role();
        for r in [Role::Primary, Role::Replica] {
            o.line(
                name,
                &[("volume", v.volume), ("role", role_name(r))],
                u8::from(r == role),
            );
        }
    }
    let name = "ringblock_replica_state";
    o.head(
        name,
        "gauge",
        "1 for each peer's current state (connecting, up-to-date, behind, resyncing, diverged, suspended), 0 for the others.",
    );
    for v in volumes {
        for p in v.replication.replicas() {
            let node = p.node.to_string();
            let state = p.status.state();
            for s in PeerState::ALL {
                o.line(
                    name,
                    &[("volume", v.volume), ("node", &node), ("state", s.name())],
                    u8::from(s == state),
                );
            }
        }
    }
    let now_ms = unix_ms();
    type PGet = fn(&Replicated<'_>, &ringblock_engine::replication::ReplicaState, u64) -> u64;
    let per_peer: [(&str, &str, PGet); 3] = [
        (
            "ringblock_replica_dirty_bytes",
            "Bytes of regions the peer lacks (its dirty bitmap; 0 on a replica copy, which does not track what its primary lacks).",
            |v, p, _| peer_dirty_bytes(v.replication, p, v.size_bytes),
        ),
        (
            "ringblock_replica_resync_done_bytes",
            "Bytes the current (or last) resync to the peer copied and had acknowledged.",
            |_, p, now| p.status.resync.snapshot(now).done_bytes,
        ),
        (
            "ringblock_replica_resync_total_bytes",
            "Bytes the current (or last) resync to the peer set out to copy.",
            |_, p, now| p.status.resync.snapshot(now).total_bytes,
        ),
    ];
    for (name, help, get) in per_peer {
        o.head(name, "gauge", help);
        for v in volumes {
            for p in v.replication.replicas() {
                let node = p.node.to_string();
                o.line(
                    name,
                    &[("volume", v.volume), ("node", &node)],
                    get(v, p, now_ms),
                );
            }
        }
    }
    let name = "ringblock_replica_lag_bytes";
    o.head(
        name,
        "gauge",
        "Bytes sent to the peer and not yet acknowledged (queued for an async peer included).",
    );
    for v in status.map_or(&[][..], |s| &s.volumes) {
        for p in &v.peers {
            o.line(
                name,
                &[("volume", &v.volume), ("node", &p.node)],
                p.lag_bytes,
            );
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

    /// One sample of the text format: name, labels, value.
    type Sample = (String, Vec<(String, String)>, f64);

    /// A strict enough reader of the exposition format: every sample's family has a `# TYPE`
    /// before it, label values are quoted and unescaped, values are numbers.
    fn parse(text: &str) -> Vec<Sample> {
        let mut typed: Vec<String> = Vec::new();
        let mut out = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert!(["gauge", "counter", "histogram"].contains(&kind), "{line}");
                typed.push(name.to_string());
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("series value");
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), Vec::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("closing brace");
                    let mut labels = Vec::new();
                    let mut chars = body.chars().peekable();
                    while chars.peek().is_some() {
                        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
                        assert_eq!(chars.next(), Some('"'), "{line}");
                        let mut val = String::new();
                        loop {
                            match chars.next().expect("unterminated label value") {
                                '\\' => val.push(match chars.next().unwrap() {
                                    'n' => '\n',
                                    c => c,
                                }),
                                '"' => break,
                                c => val.push(c),
                            }
                        }
                        labels.push((key, val));
                        if chars.peek() == Some(&',') {
                            chars.next();
                        }
                    }
                    (name.to_string(), labels)
                }
            };
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| typed.iter().any(|t| t == f))
                })
                .unwrap_or(&name);
            assert!(typed.iter().any(|t| t == family), "no TYPE before {line}");
            out.push((name, labels, value));
        }
        out
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        samples.iter().find_map(|(n, l, v)| {
            (n == name
                && l.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, x)| l.iter().any(|(a, b)| a == k && b == x)))
            .then_some(*v)
        })
    }

    #[test]
    fn replication_metrics_parse_and_say_each_peer_state() {
        use crate::replication::{PeerReplicationStatus, VolumeReplicationStatus};
        use ringblock_engine::replication::NodeId;

        const MIB: u64 = 1 << 20;
        let (a, b) = (NodeId::new(0xa).unwrap(), NodeId::new(0xb).unwrap());
        let r = VolumeReplication::new(Role::Primary, 64 * MIB, 20, &[a, b]).unwrap();
        r.mark_dirty(&[a], 0, 3 * MIB);
        let peer_b = r.replica(b).unwrap();
        peer_b.status.set(PeerState::Resyncing, None);
        peer_b.status.resync.start(8 * MIB, unix_ms());
        peer_b.status.resync.add_done(2 * MIB);
        let status = ReplicationStatus {
            volumes: vec![VolumeReplicationStatus {
                volume: "v\"1".into(),
                role: "primary".into(),
                generation: None,
                history_len: 1,
                region_size_bytes: MIB,
                exportable: true,
                not_exportable_reason: None,
                peers: vec![PeerReplicationStatus {
                    node: a.to_string(),
                    address: "192.0.2.1:7900".into(),
                    mode: "sync".into(),
                    state: "connecting".into(),
                    reason: None,
                    connected_since_unix_ms: None,
                    dirty_bytes: 3 * MIB,
                    lag_bytes: 4096,
                    lag_ms: Some(3),
                    resync: None,
                }],
            }],
            ..Default::default()
        };
        let mut o = Out(String::new());
        let vols = [Replicated {
            volume: "v\"1",
            size_bytes: 64 * MIB,
            replication: &r,
        }];
        replication_metrics(&mut o, &vols, Some(&status));
        let samples = parse(&o.0);
        let (na, nb) = (a.to_string(), b.to_string());
        let v = "v\"1";
        let role = |r| {
            value(
                &samples,
                "ringblock_volume_replication_role",
                &[("volume", v), ("role", r)],
            )
        };
        assert_eq!((role("primary"), role("replica")), (Some(1.0), Some(0.0)));
        for (node, current) in [(&na, "connecting"), (&nb, "resyncing")] {
            for s in PeerState::ALL {
                let got = value(
                    &samples,
                    "ringblock_replica_state",
                    &[("volume", v), ("node", node), ("state", s.name())],
                );
                assert_eq!(
                    got,
                    Some(f64::from(u8::from(s.name() == current))),
                    "{node} {s}"
                );
            }
        }
        let peer = |name, node: &str| value(&samples, name, &[("volume", v), ("node", node)]);
        assert_eq!(
            peer("ringblock_replica_dirty_bytes", &na),
            Some((3 * MIB) as f64)
        );
        assert_eq!(peer("ringblock_replica_dirty_bytes", &nb), Some(0.0));
        assert_eq!(
            peer("ringblock_replica_resync_done_bytes", &nb),
            Some((2 * MIB) as f64)
        );
        assert_eq!(
            peer("ringblock_replica_resync_total_bytes", &nb),
            Some((8 * MIB) as f64)
        );
        assert_eq!(peer("ringblock_replica_lag_bytes", &na), Some(4096.0));
        assert_eq!(
            peer("ringblock_replica_lag_bytes", &nb),
            None,
            "not in the status"
        );
        // 2 roles + 2 peers × (6 states + dirty + done + total) + 1 lag.
        assert_eq!(samples.len(), 2 + 2 * 9 + 1, "{}", o.0);

        // Without replicated volumes: the families are declared, with no samples.
        let mut o = Out(String::new());
        replication_metrics(&mut o, &[], None);
        assert!(parse(&o.0).is_empty());
        assert_eq!(o.0.matches("# TYPE ").count(), 6, "{}", o.0);
    }

    #[test]
    fn a_replica_copy_reports_its_role_and_no_dirty_bytes() {
        use ringblock_engine::replication::NodeId;

        let primary = NodeId::new(0xa).unwrap();
        let r = VolumeReplication::new(Role::Replica, 64 << 20, 20, &[primary]).unwrap();
        // What its activity log folds in after a crash: not what the primary lacks.
        r.mark_dirty(&[primary], 0, 4 << 20);
        let mut o = Out(String::new());
        let vols = [Replicated {
            volume: "r",
            size_bytes: 64 << 20,
            replication: &r,
        }];
        replication_metrics(&mut o, &vols, None);
        let samples = parse(&o.0);
        let node = primary.to_string();
        let role = |r| {
            value(
                &samples,
                "ringblock_volume_replication_role",
                &[("volume", "r"), ("role", r)],
            )
        };
        assert_eq!((role("primary"), role("replica")), (Some(0.0), Some(1.0)));
        assert_eq!(
            value(
                &samples,
                "ringblock_replica_dirty_bytes",
                &[("volume", "r"), ("node", &node)]
            ),
            Some(0.0)
        );
        assert_eq!(
            value(
                &samples,
                "ringblock_replica_state",
                &[("volume", "r"), ("node", &node), ("state", "connecting")]
            ),
            Some(1.0)
        );
    }

    #[test]
    fn the_parser_reads_the_other_families_too() {
        let mut counts = vec![0u64; 64];
        counts[12] = 2;
        let h = LatencySnapshot {
            counts,
            sum_ns: 1_000,
        };
        let mut o = Out(String::new());
        o.head("x", "histogram", "h");
        histogram(&mut o, "x", &[("volume", "a\\b\nc")], &h);
        let samples = parse(&o.0);
        assert_eq!(
            value(&samples, "x_count", &[("volume", "a\\b\nc")]),
            Some(2.0)
        );
    }
}

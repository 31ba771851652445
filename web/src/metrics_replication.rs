//! The replication families of `/metrics`: each replicated volume's role, and per peer its
//! state, dirty bytes, resync progress, regions verifies found different and unacknowledged
//! bytes.

use ringblock_engine::replication::{status::unix_ms, PeerState, Role, VolumeReplication};

use crate::metrics::Out;
use crate::replication::ReplicationStatus;
use crate::replication_api::{peer_dirty_bytes, role_name};

/// A replicated volume as the replication metrics see it: name, size, state.
pub(crate) struct Replicated<'a> {
    pub(crate) volume: &'a str,
    pub(crate) size_bytes: u64,
    pub(crate) replication: &'a VolumeReplication,
}

/// Replication: roles, peer states, dirty bytes and resync progress straight from the
/// engine's volumes (atomics, like every other metric here, and present whether or not the
/// daemon passes a control); the unacknowledged bytes from the control's `status`, the only
/// place that knows them (a peer it does not report has no `lag_bytes` line).
pub(crate) fn replication_metrics(
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
    type SGet = fn(&crate::replication::PeerReplicationStatus) -> Option<u64>;
    let per_peer: [(&str, &str, &str, PGet); 4] = [
        (
            "ringblock_replica_dirty_bytes",
            "gauge",
            "Bytes of regions the peer lacks (its dirty bitmap; 0 on a replica copy, which does not track what its primary lacks).",
            |v, p, _| peer_dirty_bytes(v.replication, p, v.size_bytes),
        ),
        (
            "ringblock_replica_resync_done_bytes",
            "gauge",
            "Bytes the current (or last) resync to the peer copied and had acknowledged.",
            |_, p, now| p.status.resync.snapshot(now).done_bytes,
        ),
        (
            "ringblock_replica_resync_total_bytes",
            "gauge",
            "Bytes the current (or last) resync to the peer set out to copy.",
            |_, p, now| p.status.resync.snapshot(now).total_bytes,
        ),
        (
            "ringblock_replica_verify_mismatched_regions_total",
            "counter",
            "Regions online verifies (`ringblock replica verify`) found different on the peer since the daemon started.",
            |_, p, _| p.status.verify_mismatches(),
        ),
    ];
    for (name, kind, help, get) in per_peer {
        o.head(name, kind, help);
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
    // What only the runtime's status knows: a peer it does not report has no series.
    let from_status: [(&str, &str, SGet); 2] = [
        (
            "ringblock_replica_lag_bytes",
            "Bytes the peer lacks: its dirty regions, and writes queued for an async peer and not yet acknowledged.",
            |p| Some(p.lag_bytes),
        ),
        (
            "ringblock_replica_lag_ms",
            "How long the oldest write the connected peer has not acknowledged has waited (async peers).",
            |p| p.lag_ms,
        ),
    ];
    for (name, help, get) in from_status {
        o.head(name, "gauge", help);
        for v in status.map_or(&[][..], |s| &s.volumes) {
            for p in &v.peers {
                if let Some(value) = get(p) {
                    o.line(name, &[("volume", &v.volume), ("node", &p.node)], value);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::histogram;
    use ringblock_engine::stats::LatencySnapshot;

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
                    last_resync: None,
                }],
            }],
            ..Default::default()
        };
        for _ in 0..2 {
            r.replica(a).unwrap().status.add_verify_mismatch();
        }
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
        assert_eq!(peer("ringblock_replica_lag_ms", &na), Some(3.0));
        assert_eq!(
            peer("ringblock_replica_verify_mismatched_regions_total", &na),
            Some(2.0)
        );
        assert_eq!(
            peer("ringblock_replica_verify_mismatched_regions_total", &nb),
            Some(0.0)
        );
        // 2 roles + 2 peers × (6 states + dirty + done + total + verify) + 1 lag in bytes
        // and ms.
        assert_eq!(samples.len(), 2 + 2 * 10 + 2, "{}", o.0);

        // Without replicated volumes: the families are declared, with no samples.
        let mut o = Out(String::new());
        replication_metrics(&mut o, &[], None);
        assert!(parse(&o.0).is_empty());
        assert_eq!(o.0.matches("# TYPE ").count(), 8, "{}", o.0);
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

//! Replication status as text for the command line: `ringblock replica list` (a table) and
//! the replication lines of `ringblock status`.

use crate::client::table;
use crate::replication::{PeerReplicationStatus, ReplicationStatus, ResyncStatus};
use crate::size::format_size;

/// `95` → `1m35s`, `4000` → `1h06m`; under a minute in seconds.
pub fn format_duration_s(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "?".into();
    }
    let s = s.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// `42.0% 120 MiB/s ETA 1m30s` (rate and ETA once known).
pub fn resync_text(r: &ResyncStatus) -> String {
    let pct = if r.total_bytes == 0 {
        100.0
    } else {
        100.0 * r.done_bytes as f64 / r.total_bytes as f64
    };
    let mut out = format!("{pct:.1}%");
    if r.rate_bytes_per_s > 0.0 {
        out.push_str(&format!(" {}/s", format_size(r.rate_bytes_per_s as u64)));
    }
    if let Some(eta) = r.eta_s {
        out.push_str(&format!(" ETA {}", format_duration_s(eta)));
    }
    out
}

fn peer_row(volume: &str, role: &str, p: &PeerReplicationStatus) -> Vec<String> {
    vec![
        volume.to_string(),
        role.to_string(),
        p.node.clone(),
        p.mode.clone(),
        p.state.clone(),
        format_size(p.dirty_bytes),
        p.resync.as_ref().map_or_else(|| "-".into(), resync_text),
        p.reason.clone().unwrap_or_else(|| "-".into()),
    ]
}

/// One row per peer of every replicated volume (or of `volume` only); a volume without peers
/// gets a row of its own. `None` when `volume` is given and not replicated here.
pub fn replica_table(status: &ReplicationStatus, volume: Option<&str>) -> Option<String> {
    let vols: Vec<_> = status
        .volumes
        .iter()
        .filter(|v| volume.is_none_or(|n| v.volume == n))
        .collect();
    if volume.is_some() && vols.is_empty() {
        return None;
    }
    let mut rows = Vec::new();
    for v in vols {
        if v.peers.is_empty() {
            let mut row = vec!["-".to_string(); 8];
            row[0] = v.volume.clone();
            row[1] = v.role.clone();
            rows.push(row);
        }
        rows.extend(v.peers.iter().map(|p| peer_row(&v.volume, &v.role, p)));
    }
    Some(table(
        &[
            "VOLUME", "ROLE", "PEER", "MODE", "STATE", "DIRTY", "RESYNC", "REASON",
        ],
        &rows,
    ))
}

/// `ringblock status`: a line for this node, then one per replicated volume, e.g.
/// `replication vol1: primary, gen 00ab…; 1f2e… up-to-date, 9c8d… resyncing 42.0% ETA 1m30s`.
/// Nothing when no volume is replicated.
pub fn status_lines(status: &ReplicationStatus) -> Vec<String> {
    if status.volumes.is_empty() {
        return Vec::new();
    }
    let name = status
        .node_name
        .as_ref()
        .map_or_else(String::new, |n| format!(" ({n})"));
    let mut lines = vec![format!(
        "replication: node {}{name}, cluster {}, peers connect to {}",
        status.node_id, status.cluster, status.listen
    )];
    for v in &status.volumes {
        let mut line = format!("replication {}: {}", v.volume, v.role);
        if let Some(g) = &v.generation {
            line.push_str(&format!(", generation {g}"));
        }
        if let Some(why) = &v.not_exportable_reason {
            line.push_str(&format!(", not exportable ({why})"));
        }
        let peers: Vec<String> = v
            .peers
            .iter()
            .map(|p| {
                let mut s = format!("{} {}", p.node, p.state);
                if let Some(r) = &p.resync {
                    s.push_str(&format!(" {}", resync_text(r)));
                } else if p.dirty_bytes > 0 {
                    s.push_str(&format!(" ({} dirty)", format_size(p.dirty_bytes)));
                }
                if let Some(why) = &p.reason {
                    s.push_str(&format!(" ({why})"));
                }
                s
            })
            .collect();
        if peers.is_empty() {
            line.push_str("; no peers");
        } else {
            line.push_str(&format!("; {}", peers.join(", ")));
        }
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::VolumeReplicationStatus;

    const NODE: &str = "0000000000000000000000000000000b";

    fn status() -> ReplicationStatus {
        ReplicationStatus {
            node_id: "0000000000000000000000000000000a".into(),
            node_name: Some("left".into()),
            cluster: "lab".into(),
            listen: "0.0.0.0:7900".into(),
            volumes: vec![
                VolumeReplicationStatus {
                    volume: "db".into(),
                    role: "primary".into(),
                    generation: Some("00000000000000ab".into()),
                    history_len: 2,
                    region_size_bytes: 1 << 20,
                    exportable: true,
                    not_exportable_reason: None,
                    peers: vec![PeerReplicationStatus {
                        node: NODE.into(),
                        address: "192.0.2.2:7900".into(),
                        mode: "sync".into(),
                        state: "resyncing".into(),
                        reason: Some("came back".into()),
                        connected_since_unix_ms: Some(1),
                        dirty_bytes: 3 << 30,
                        lag_bytes: 0,
                        lag_ms: None,
                        resync: Some(ResyncStatus {
                            total_bytes: 4 << 30,
                            done_bytes: 1 << 30,
                            started_unix_ms: 1,
                            finished_unix_ms: None,
                            rate_bytes_per_s: (100 << 20) as f64,
                            eta_s: Some(95.0),
                        }),
                        last_resync: Some(ResyncStatus {
                            total_bytes: 4 << 30,
                            done_bytes: 1 << 30,
                            started_unix_ms: 1,
                            finished_unix_ms: None,
                            rate_bytes_per_s: (100 << 20) as f64,
                            eta_s: Some(95.0),
                        }),
                    }],
                },
                VolumeReplicationStatus {
                    volume: "logs".into(),
                    role: "replica".into(),
                    generation: None,
                    history_len: 0,
                    region_size_bytes: 1 << 20,
                    exportable: false,
                    not_exportable_reason: Some("a replica".into()),
                    peers: vec![],
                },
            ],
        }
    }

    #[test]
    fn the_table_has_a_row_per_peer_and_filters_by_volume() {
        let s = status();
        let all = replica_table(&s, None).unwrap();
        let lines: Vec<&str> = all.lines().collect();
        assert_eq!(lines.len(), 3, "{all}");
        assert!(lines[0].starts_with("VOLUME"), "{all}");
        for cell in [
            "db",
            "primary",
            NODE,
            "sync",
            "resyncing",
            "3 GiB",
            "25.0% 100 MiB/s ETA 1m35s",
            "came back",
        ] {
            assert!(lines[1].contains(cell), "{cell:?} not in {:?}", lines[1]);
        }
        assert!(lines[2].starts_with("logs") && lines[2].contains("replica"));
        let one = replica_table(&s, Some("logs")).unwrap();
        assert_eq!(one.lines().count(), 2, "{one}");
        assert_eq!(replica_table(&s, Some("nope")), None);
    }

    #[test]
    fn status_lines_name_each_volume_and_peer() {
        let lines = status_lines(&status());
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].contains("node 0000000000000000000000000000000a (left)"));
        assert_eq!(
            lines[1],
            format!("replication db: primary, generation 00000000000000ab; {NODE} resyncing 25.0% 100 MiB/s ETA 1m35s (came back)")
        );
        assert_eq!(
            lines[2],
            "replication logs: replica, not exportable (a replica); no peers"
        );
        assert!(status_lines(&ReplicationStatus::default()).is_empty());
    }

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(format_duration_s(0.4), "0s");
        assert_eq!(format_duration_s(59.0), "59s");
        assert_eq!(format_duration_s(95.0), "1m35s");
        assert_eq!(format_duration_s(4000.0), "1h06m");
        assert_eq!(format_duration_s(f64::NAN), "?");
    }
}

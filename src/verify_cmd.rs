//! `ringblock replica verify VOLUME [--repair]`: start an online verify on the primary
//! (`POST /api/volumes/{name}/verify`), poll `GET` the same path until it ends, and report per
//! replica the regions and bytes checked and the byte ranges that differ. Exit status 0 when
//! every verified replica matched (or was repaired), 1 when a region differs and was not
//! repaired, a replica's verify failed, or the wait timed out (the verify goes on in the
//! daemon; `GET /api/volumes/{name}/verify` shows it).

use std::time::{Duration, Instant};

use ringblock_web::replication::{VerifyReplicaStatus, VerifyStatus};
use ringblock_web::size::format_size;

use crate::serve::Failure;
use crate::web::{client_failure, connect, print_json, ApiArgs};

/// How often the CLI asks for progress.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

pub fn run(api: &ApiArgs, volume: &str, repair: bool, timeout_s: u64) -> Result<(), Failure> {
    let (c, _) = connect(api)?;
    let message = c.start_verify(volume, repair).map_err(client_failure)?;
    if !api.json {
        eprintln!("{message}");
    }
    let until = Instant::now() + Duration::from_secs(timeout_s);
    let status = loop {
        let status = c.verify_status(volume).map_err(client_failure)?;
        if !status.running {
            break status;
        }
        if Instant::now() >= until {
            return Err(Failure::Runtime(anyhow::anyhow!(
                "volume {volume}: the verify still runs after {timeout_s} s; `GET \
                 /api/volumes/{volume}/verify` shows it"
            )));
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    if api.json {
        print_json(&status);
    } else {
        print!("{}", report_text(&status));
    }
    match problems(&status) {
        None => Ok(()),
        Some(p) => Err(Failure::Runtime(anyhow::anyhow!("volume {volume}: {p}"))),
    }
}

fn ranges_text(r: &VerifyReplicaStatus) -> String {
    let mut parts: Vec<String> = r
        .mismatched
        .iter()
        .map(|m| format!("{}+{}", m.offset_bytes, format_size(m.len_bytes)))
        .collect();
    let listed_regions = r.mismatched.len() as u64;
    if r.mismatched_regions > listed_regions && parts.len() == 64 {
        parts.push("…".into());
    }
    parts.join(", ")
}

/// The report, one line per replica (and one per list of mismatched ranges).
pub fn report_text(s: &VerifyStatus) -> String {
    let mut out = format!(
        "volume {}: verify {}{}\n",
        s.volume,
        if s.running { "running" } else { "ended" },
        if s.repair { " (repair)" } else { "" }
    );
    for r in &s.replicas {
        let line = match r.state.as_str() {
            "skipped" => format!("skipped: {}", r.skipped.as_deref().unwrap_or("-")),
            state => {
                let mut line = format!(
                    "{state}: {}/{} regions ({}) checked, {} mismatched",
                    r.regions_checked,
                    r.regions_total,
                    format_size(r.bytes_checked),
                    r.mismatched_regions
                );
                if r.busy_regions > 0 {
                    line.push_str(&format!(
                        ", {} could not verify: busy (written during every attempt)",
                        r.busy_regions
                    ));
                }
                if r.repaired {
                    line.push_str("; repaired: the link reconnects and resyncs them");
                }
                if let Some(e) = &r.error {
                    line.push_str(&format!("; {e}"));
                }
                line
            }
        };
        out.push_str(&format!("  node {}: {line}\n", r.node));
        if r.mismatched_regions > 0 {
            out.push_str(&format!(
                "    differ at (offset+length): {}\n",
                ranges_text(r)
            ));
        }
    }
    out
}

/// What makes the command fail: regions that differ and were not repaired, a failed verify.
fn problems(s: &VerifyStatus) -> Option<String> {
    let mut p = Vec::new();
    for r in &s.replicas {
        if r.state == "failed" {
            p.push(format!(
                "the verify of node {} failed: {}",
                r.node,
                r.error.as_deref().unwrap_or("-")
            ));
        } else if r.mismatched_regions > 0 && !r.repaired {
            p.push(format!(
                "{} region(s) differ on node {} (--repair resyncs them)",
                r.mismatched_regions, r.node
            ));
        }
    }
    (!p.is_empty()).then(|| p.join("; "))
}

#[cfg(test)]
mod tests {
    use ringblock_web::replication::ByteRange;

    use super::*;

    #[test]
    fn the_report_lists_ranges_and_fails_only_on_unrepaired_differences() {
        let replica = |mismatched_regions, repaired| VerifyReplicaStatus {
            node: "ab".into(),
            state: "done".into(),
            regions_total: 16,
            regions_checked: 16,
            bytes_checked: 16 << 20,
            mismatched_regions,
            mismatched: (0..mismatched_regions)
                .map(|i| ByteRange {
                    offset_bytes: i << 21,
                    len_bytes: 1 << 20,
                })
                .collect(),
            repaired,
            ..VerifyReplicaStatus::default()
        };
        let mut s = VerifyStatus {
            volume: "db".into(),
            replicas: vec![replica(2, false)],
            ..VerifyStatus::default()
        };
        let text = report_text(&s);
        assert!(
            text.contains("16/16 regions (16 MiB) checked, 2 mismatched"),
            "{text}"
        );
        assert!(text.contains("0+1 MiB, 2097152+1 MiB"), "{text}");
        assert!(problems(&s)
            .unwrap()
            .contains("2 region(s) differ on node ab"));
        s.replicas = vec![replica(2, true)];
        assert_eq!(problems(&s), None);
        s.replicas = vec![replica(0, false)];
        assert_eq!(problems(&s), None);
        s.replicas[0].state = "failed".into();
        s.replicas[0].error = Some("the link failed".into());
        assert!(problems(&s).unwrap().contains("the link failed"));
    }
}

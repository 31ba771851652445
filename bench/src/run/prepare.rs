//! Prepare: the results folder, the host record, the backing files (a ringblock-formatted one
//! for raw, engine and ringblock-file; a plain one for the file-serving peers), the
//! environment targets start in, and which targets can run here.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::engine_bench::{self, Prepared};
use crate::host;
use crate::interrupt;
use crate::matrix::Preset;
use crate::results::TargetStatus;
use crate::targets::{self, Env, Kind};

use super::plan::Plan;

/// What one run of the whole thing needs in hand.
pub struct Ctx {
    pub env: Env,
    pub prep: Option<Prepared>,
    pub out_dir: PathBuf,
    pub runtime: Duration,
    pub ramp: Duration,
    pub verify: Duration,
    pub idle: Duration,
    /// Where the engine step runs raw fio and the engine's reactor, and why there.
    pub engine_cpu: (usize, String),
    /// The host record of the summary.
    pub host: serde_json::Value,
    /// Backing files, and sockets, configs and logs: removed when dropped.
    pub data_tmp: tempfile::TempDir,
    pub run_tmp: tempfile::TempDir,
}

/// Temporary directories for the backing files (under `--data-dir`, else the results folder)
/// and for sockets and logs; a second Ctrl-C removes them itself.
fn temp_dirs(data_dir: &Path) -> Result<(tempfile::TempDir, tempfile::TempDir)> {
    std::fs::create_dir_all(data_dir)?;
    let data_tmp = tempfile::Builder::new()
        .prefix(".ringblock-bench-data-")
        .tempdir_in(data_dir)
        .with_context(|| format!("creating a data directory in {}", data_dir.display()))?;
    let run_tmp = tempfile::Builder::new()
        .prefix("rbb-")
        .tempdir()
        .context("creating a run directory for sockets and logs")?;
    for f in ["device.img", "peer.img"] {
        interrupt::register_path(&data_tmp.path().join(f));
    }
    interrupt::register_path(data_tmp.path());
    interrupt::register_path(run_tmp.path());
    Ok((data_tmp, run_tmp))
}

/// The backing files the plan's targets need.
fn backing_files(plan: &Plan, device_file: &Path, peer_file: &Path) -> Result<Option<Prepared>> {
    let needs_device = plan.has(|k| {
        matches!(
            k,
            Kind::Raw
                | Kind::Engine
                | Kind::Ringblock {
                    device: targets::RbDevice::File,
                    ..
                }
        )
    });
    let needs_peer_file =
        plan.has(|k| matches!(k, Kind::NbdkitFile | Kind::QemuNbd | Kind::NbdServer));
    let size_mib = plan.settings.size_mib;
    let prep = if needs_device {
        eprintln!(
            "preparing {} ({size_mib} MiB): format, one volume over every chunk, fill ...",
            device_file.display()
        );
        Some(engine_bench::prepare(device_file, size_mib << 20)?)
    } else {
        None
    };
    if needs_peer_file {
        let region_bytes = prep.as_ref().map_or(size_mib << 20, |p| p.region_bytes);
        write_peer_file(peer_file, region_bytes)?;
    }
    Ok(prep)
}

/// Everything the steps need, made ready, and each target's fate so far (skipped when it
/// cannot run here).
pub fn prepare(args: &super::RunArgs, plan: &mut Plan) -> Result<(Ctx, Vec<TargetStatus>)> {
    ensure!(
        targets::which("fio").is_some(),
        "fio is not installed: the matrix runs fio (apt-get install fio)"
    );
    let out_dir = plan.out_dir.clone();
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let fio_version = crate::fio::version()?;
    // What a sleep and wake-up costs here, measured before anything starts: it sets the CPU
    // per IO of every server that sleeps between requests (the fixed-rate points).
    let wake_cost = host::measure_wake_cost(&plan.cpus);
    let (data_tmp, run_tmp) = temp_dirs(args.data_dir.as_deref().unwrap_or(&out_dir))?;
    let device_file = data_tmp.path().join("device.img");
    let peer_file = data_tmp.path().join("peer.img");
    let prep = backing_files(plan, &device_file, &peer_file)?;
    let s = &mut plan.settings;
    s.region_bytes = prep.as_ref().map_or(s.size_mib << 20, |p| p.region_bytes);
    s.profile_region_bytes = s.region_bytes.min(if s.preset == Preset::Quick {
        64 << 20
    } else {
        256 << 20
    });
    let env = Env {
        ringblock_no_web: s.ringblock.as_deref().is_some_and(no_web_flag),
        ringblock: s.ringblock.clone(),
        rb_cores: s.rb_cores.clone(),
        rb_poll_idle_us: s.rb_poll_idle_us,
        run_dir: run_tmp.path().to_path_buf(),
        device_file,
        device_file_bytes: prep.as_ref().map_or(0, |p| p.device_size_bytes),
        region_bytes: s.region_bytes,
        peer_file,
        profile_region_bytes: s.profile_region_bytes,
    };
    let engine_cpu = match &prep {
        Some(p) => host::comparison_cpu(&p.device_path, &plan.cpus),
        None => (plan.cpus.last().copied().unwrap_or(0), String::new()),
    };
    let host = host::record(&plan.cpus, &engine_cpu, wake_cost, fio_version);
    let statuses = statuses(plan, &env);
    let ctx = Ctx {
        env,
        prep,
        out_dir,
        runtime: plan.runtime,
        ramp: plan.ramp,
        verify: plan.verify,
        idle: plan.idle,
        engine_cpu,
        host,
        data_tmp,
        run_tmp,
    };
    Ok((ctx, statuses))
}

/// Who can run: a target whose program or binary is missing is skipped, with the reason.
fn statuses(plan: &Plan, env: &Env) -> Vec<TargetStatus> {
    let statuses: Vec<TargetStatus> = plan
        .targets
        .iter()
        .map(|(s, _)| {
            let reason = targets::unavailable(s, env);
            TargetStatus {
                id: s.id.clone(),
                label: s.label.clone(),
                note: s.note.clone(),
                status: if reason.is_some() { "skipped" } else { "ran" }.into(),
                reason,
                command: None,
            }
        })
        .collect();
    for st in statuses.iter().filter(|s| s.status == "skipped") {
        eprintln!("skipping {}: {}", st.id, st.reason.as_deref().unwrap_or(""));
    }
    statuses
}

fn no_web_flag(ringblock: &Path) -> bool {
    Command::new(ringblock)
        .args(["serve", "--help"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--no-web"))
}

/// A plain file of `bytes` holding non-zero data (no holes), for the file-serving peers.
fn write_peer_file(path: &Path, bytes: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut block = vec![0u8; 1 << 20];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for w in block.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
    let mut left = bytes;
    let mut i = 0u64;
    while left > 0 {
        block[..8].copy_from_slice(&i.to_le_bytes());
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n])?;
        left -= n as u64;
        i += 1;
    }
    f.flush()?;
    f.get_ref().sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_files_hold_data_everywhere() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("peer.img");
        write_peer_file(&p, (3 << 20) + 4096).unwrap();
        let data = std::fs::read(&p).unwrap();
        assert_eq!(data.len(), (3 << 20) + 4096);
        assert!(data.chunks(4096).all(|c| c.iter().any(|&b| b != 0)));
        assert_ne!(
            data[..4096],
            data[1 << 20..(1 << 20) + 4096],
            "blocks differ"
        );
    }
}

//! Kernel paths, tested in a VM (`tests/vm/harness`: Debian's 6.12 kernel under qemu, with this
//! machine's root filesystem read-only as the guest's `/`): ublk devices backed by ringblock
//! volumes, and the kernel's NBD client against ringblock's NBD server running on this host.
//!
//! The guest runs this build's `ringblock` binary and the scripts in `tests/vm/`; results come
//! back through the exit status and a share directory. When the harness cannot be set up here
//! (not root on a machine without qemu, no apt to fetch the guest kernel), these tests skip with
//! the reason; under `scripts/test-all` that is a failure (`RINGBLOCK_TESTS_REQUIRED`). They run
//! one at a time (each VM uses both cores).

mod common;
#[path = "support/required.rs"]
mod required;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

/// One VM at a time: TCG is CPU-bound and the machine has two cores.
static VM: Mutex<()> = Mutex::new(());
/// Boot + test, per VM run (measured: 30-60 s on a 2-core machine; CI machines may be slower).
const VM_TIMEOUT_S: u32 = 900;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The harness's run.sh once setup.sh succeeded; None (after `required::skip`) otherwise.
fn harness(test: &str) -> Option<PathBuf> {
    let dir = repo().join("tests/vm/harness");
    // Idempotent; on a fresh machine it installs qemu and fetches the guest kernel.
    let t0 = Instant::now();
    match Command::new(dir.join("setup.sh")).output() {
        Ok(o) if o.status.success() => {
            let s = t0.elapsed().as_secs_f64();
            if s > 1.0 {
                println!("vm harness set up in {s:.1} s");
            }
            Some(dir.join("run.sh"))
        }
        Ok(o) => {
            let stderr = String::from_utf8_lossy(&o.stderr);
            let last: Vec<&str> = stderr.lines().rev().take(5).collect();
            required::skip(
                test,
                &format!(
                    "the VM harness cannot be set up here: tests/vm/harness/setup.sh failed \
                     ({}): {}",
                    o.status,
                    last.into_iter().rev().collect::<Vec<_>>().join(" | ")
                ),
            );
            None
        }
        Err(e) => {
            required::skip(test, &format!("cannot run tests/vm/harness/setup.sh: {e}"));
            None
        }
    }
}

/// Run `tests/vm/SCRIPT ARGS` in the guest; panics (with the console) unless it exits 0.
fn run_guest(run: &Path, script: &str, args: &[&str], share: &Path) {
    let t0 = Instant::now();
    let out = Command::new(run)
        .arg("--timeout")
        .arg(VM_TIMEOUT_S.to_string())
        .arg("--share")
        .arg(share)
        // The binary, wherever the target dir is (a tmp dir is the guest's own otherwise).
        .arg("--show")
        .arg(
            Path::new(env!("CARGO_BIN_EXE_ringblock"))
                .parent()
                .unwrap_or(Path::new("/")),
        )
        .arg(repo().join("tests/vm").join(script))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("run the VM");
    let console = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{console}");
    if !stderr.trim().is_empty() {
        println!("stderr: {stderr}");
    }
    println!(
        "{script}: {} after {:.1} s",
        out.status,
        t0.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success(),
        "{script} failed in the VM ({}); console above. Last lines:\n{}",
        out.status,
        console
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    VM.lock().unwrap_or_else(|e| e.into_inner())
}

/// ext4 on /dev/ublkbN (RAM volume, two queues on two reactors): files round-trip through
/// unmount + cache drop + remount, fsck clean, discard/write-zeroes read as zeros, fio
/// io_uring crc32c verify, SIGTERM removes the device. Also runs `ringblock doctor` in the
/// guest (everything present). Then, on a daemon without `[[export]]`, the runtime path of the
/// API and the CLI: `ringblock export ublk` creates the device, `export list` and
/// `GET /api/ublk` (the dashboard's source) show it, data written through it reads back,
/// `export stop` removes it, and an export started this way is removed at SIGTERM too.
#[test]
fn ublk_filesystem_and_fio_verify() {
    const TEST: &str = "ublk_filesystem_and_fio_verify";
    let _g = lock();
    let Some(run) = harness(TEST) else { return };
    let share = tempfile::tempdir().unwrap();
    run_guest(
        &run,
        "ublk-fs.sh",
        &[env!("CARGO_BIN_EXE_ringblock")],
        share.path(),
    );
}

/// kill -9 of the daemon (twice) while fio writes with verify to /dev/ublkbN on a persistent
/// (bbram) volume; each restart recovers the same device (USER_RECOVERY + REISSUE), fio
/// completes and verifies, the kernel logs no IO error; after a clean restart a verify-only
/// pass finds the data. Then the leftovers: after a kill, a restart without the `[[export]]`
/// still recovers the device (an export started at runtime), and with `recovery = false`
/// deletes it.
#[test]
fn ublk_survives_kill_9_under_fio_verify() {
    const TEST: &str = "ublk_survives_kill_9_under_fio_verify";
    let _g = lock();
    let Some(run) = harness(TEST) else { return };
    let share = tempfile::tempdir().unwrap();
    run_guest(
        &run,
        "ublk-recovery.sh",
        &[env!("CARGO_BIN_EXE_ringblock")],
        share.path(),
    );
}

/// The kernel's nbd client in the guest against the daemon on this host (10.0.2.2 is the
/// host's loopback): ext4, files across a reconnect, fio verify, a device-wide discard (which
/// the kernel sends as one TRIM). Then this host reads the same file out of the volume.
#[test]
fn kernel_nbd_client_against_host_daemon() {
    const TEST: &str = "kernel_nbd_client_against_host_daemon";
    let _g = lock();
    let Some(run) = harness(TEST) else { return };
    for tool in ["nbdcopy", "debugfs"] {
        if !common::have_tool(tool) {
            return required::skip(TEST, &format!("{tool} is not installed"));
        }
    }
    let d = common::Daemon::start(&["--listen", "127.0.0.1:0"]);
    let addr = d
        .stdout_lines
        .iter()
        .find_map(|l| l.strip_prefix("ringblock: nbd listening on "))
        .expect("listening line")
        .to_string();
    let port = addr.rsplit(':').next().unwrap().to_string();
    let share = tempfile::tempdir().unwrap();
    run_guest(&run, "nbd-client.sh", &[&port, "default"], share.path());
    // The file the guest wrote, read by this host straight out of the volume.
    let img = share.path().join("disk.img");
    let out = Command::new("nbdcopy")
        .arg(format!("nbd://{addr}/default"))
        .arg(&img)
        .output()
        .unwrap();
    assert!(out.status.success(), "nbdcopy: {out:?}");
    let cat = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "debugfs -R 'cat /big2' {} 2>/dev/null | sha256sum | cut -d' ' -f1",
            img.display()
        ))
        .output()
        .unwrap();
    let host_sum = String::from_utf8_lossy(&cat.stdout).trim().to_string();
    let guest_sum = std::fs::read_to_string(share.path().join("big2.sha256")).unwrap();
    assert_eq!(
        host_sum,
        guest_sum.trim(),
        "the host reads a different file out of the volume"
    );
    d.stop();
}

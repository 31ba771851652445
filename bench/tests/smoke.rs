//! Smoke test of `ringblock-bench run`: the quick preset against ringblock and nbdkit memory
//! with tiny sizes and runtimes, then checks that the report files are well formed, that the
//! lean client's verify pass ran on both, and that nothing it started is left running and its
//! temporary files are gone — also after a Ctrl-C in the middle of a run; and that a peer
//! missing from PATH is reported as skipped with the reason. No test asserts a speed.
//!
//! Needs fio and nbdkit (scripts/test-all installs them). Without them a test prints
//! `SKIPPED ...` and passes, unless `RINGBLOCK_TESTS_REQUIRED` is set (not `0`): then it fails.

#[path = "../../tests/support/required.rs"]
mod required;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BENCH: &str = env!("CARGO_BIN_EXE_ringblock-bench");

/// One bench run at a time: they share the machine's CPUs (and the Ctrl-C test's timing).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// The ringblock daemon next to the bench binary (`cargo test --workspace` builds it); built
/// here when missing (`cargo test -p ringblock-bench` alone does not build it).
fn ringblock() -> PathBuf {
    if let Some(p) = std::env::var_os("RINGBLOCK_BIN") {
        return PathBuf::from(p);
    }
    let dir = Path::new(BENCH).parent().unwrap().to_path_buf();
    let bin = dir.join("ringblock");
    if !bin.is_file() {
        let target_dir = dir.parent().unwrap();
        let release = dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(option_env!("CARGO").unwrap_or("cargo"));
        cmd.args(["build", "-p", "ringblock", "--target-dir"])
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if release {
            cmd.arg("--release");
        }
        eprintln!("building the ringblock daemon for the smoke test: {cmd:?}");
        assert!(cmd.status().unwrap().success(), "building ringblock failed");
    }
    assert!(bin.is_file(), "{} missing", bin.display());
    bin
}

/// `name` on PATH (the bench finds its tools there too).
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

/// Whether every tool is installed. If one is not, the test says why and is skipped, unless
/// skips are forbidden (`RINGBLOCK_TESTS_REQUIRED`, set by scripts/test-all, which installs
/// them all): then a missing tool fails it.
fn tools(test: &str, names: &[&str]) -> bool {
    for n in names {
        if !on_path(n) {
            required::skip(
                test,
                &format!(
                    "{n} is not installed (apt-get install fio nbdkit, or run scripts/test-all)"
                ),
            );
            return false;
        }
    }
    true
}

/// Entries of `dir` whose name starts with `prefix`.
fn entries_starting(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// The run's temporary directories (sockets and logs under TMPDIR, backing files in the
/// results folder) are gone.
fn assert_temp_dirs_removed(tmp: &Path, out: &Path) {
    let left: Vec<PathBuf> = entries_starting(tmp, "rbb-")
        .into_iter()
        .chain(entries_starting(out, ".ringblock-bench-data-"))
        .collect();
    assert!(left.is_empty(), "temporary directories left: {left:?}");
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if e.file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
            .is_none()
        {
            continue;
        }
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let line = String::from_utf8_lossy(&raw).replace('\0', " ");
        if line.contains(needle) {
            v.push(format!("{}: {line}", e.file_name().to_string_lossy()));
        }
    }
    v
}

fn bench(tmp: &Path) -> Command {
    let mut cmd = Command::new(BENCH);
    // Sockets, configs and logs go under TMPDIR: the leak checks look for it.
    cmd.env("TMPDIR", tmp).env("RUST_BACKTRACE", "0");
    cmd
}

fn quick_args(out: &Path, rb: &Path) -> Vec<String> {
    [
        "run",
        "--quick",
        "--targets",
        "ringblock,nbdkit-memory",
        "--profiles",
        "none",
        "--runtime-s",
        "0.4",
        "--size-mib",
        "96",
        "--verify-s",
        "0.3",
        "--idle-s",
        "0.5",
        "--rate-iops",
        "5000",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--out".into(),
        out.display().to_string(),
        "--ringblock".into(),
        rb.display().to_string(),
    ])
    .collect()
}

#[test]
fn quick_run_writes_a_well_formed_report() {
    if !tools("quick_run_writes_a_well_formed_report", &["fio", "nbdkit"]) {
        return;
    }
    let _one = one_at_a_time();
    let rb = ringblock();
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let out = tmp.path().join("out");
    let t0 = Instant::now();
    let o = bench(tmp.path())
        .args(quick_args(&out, &rb))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "run failed: {stderr}");
    eprintln!("quick run took {:.1} s", t0.elapsed().as_secs_f64());
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("## Headline"), "{stdout}");

    // summary.json parses and says what ran.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["schema"], "ringblock-bench-run/1");
    for t in ["ringblock", "nbdkit-memory"] {
        let st = summary["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == t)
            .unwrap_or_else(|| panic!("{t} missing"));
        assert_eq!(st["status"], "ran", "{t}: {st}");
        let v = summary["verify"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["target"] == t)
            .unwrap_or_else(|| panic!("no verify pass on {t}"));
        assert_eq!(v["ok"], true, "verify on {t}: {v}");
        assert!(v["reads"].as_u64().unwrap() > 0 && v["verify_failures"] == 0);
        let point = |key: &str| {
            summary["points"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["target"] == t && p["key"] == key)
                .unwrap_or_else(|| panic!("{t}: no point {key}"))
        };
        let lean = point("randread-4k-qd32|lean|x1");
        assert!(lean["summary"]["iops"]["median"].as_f64().unwrap() > 0.0);
        // The fixed-rate points ran, in their own step with both servers side by side, in two
        // rounds. (0.4 s points are too short for a CPU window: only the rate is checked.)
        let rated = point("randread-4k-qd32|fio|x1|rate=5000");
        let rounds: Vec<_> = rated["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["round"].as_u64(), s["iops"].as_f64().unwrap_or(0.0) > 0.0))
            .collect();
        assert_eq!(rounds, [(Some(1), true), (Some(2), true)], "{t}: {rated}");
    }
    assert!(
        stderr.contains("fixed-rate points, targets side by side"),
        "{stderr}"
    );
    let headline = summary["headline"].as_array().unwrap();
    assert!(headline
        .iter()
        .any(|h| h["num_target"] == "ringblock" && h["den_target"] == "nbdkit-memory"));
    // A peer that was not asked for is "not measured", with the reason.
    assert!(headline.iter().any(|h| h["den_target"] == "qemu-nbd"
        && h["status"].as_str().unwrap().starts_with("not measured")));

    // report.md: the headline first, then the tables.
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let h = md.find("## Headline").expect("headline section");
    assert!(h < md.find("## Results by workload").unwrap());
    assert!(md.contains("| comparison | ringblock | peer |"));
    assert!(md.contains("### 4k random read QD32"));
    assert!(md.contains("| target | client | jobs | IOPS |"));
    // Every table row has as many cells as its header.
    let mut cols = 0;
    for l in md.lines() {
        if l.starts_with('|') && !l.starts_with("|---") {
            let n = l.matches(" |").count();
            if cols == 0 {
                cols = n;
            }
            assert_eq!(n, cols, "row {l:?} in\n{md}");
        } else if !l.starts_with("|---") {
            cols = 0;
        }
    }
    // Images the report shows exist.
    for l in md.lines().filter(|l| l.starts_with("![")) {
        let file = l.rsplit_once('(').unwrap().1.trim_end_matches(')');
        assert!(out.join(file).is_file(), "{file} missing");
    }

    // Plots are SVG.
    let plots = summary["plots"].as_array().unwrap();
    assert!(plots.iter().any(|p| p == "headline.svg"), "{plots:?}");
    for p in plots {
        let text = std::fs::read_to_string(out.join(p.as_str().unwrap())).unwrap();
        assert!(text.starts_with("<svg"), "{p}");
        assert!(text.trim_end().ends_with("</svg>"), "{p}");
    }

    // Raw fio output is kept and is fio's JSON.
    let raw = out.join("raw/ringblock/randread-4k-qd32-fio-x1-r1.json");
    let fio: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(raw).unwrap())
        .expect("raw fio output is JSON");
    assert!(fio["fio version"].as_str().unwrap().starts_with("fio-"));

    // --compare against itself: every change is +0.0 %.
    let c = Command::new(BENCH)
        .args(["compare"])
        .arg(&out)
        .arg(out.join("summary.json"))
        .output()
        .unwrap();
    assert!(c.status.success());
    let text = String::from_utf8_lossy(&c.stdout);
    assert!(text.contains("+0.0%") && !text.contains("-0."), "{text}");

    // Nothing the run started is still running, and its temporary files are gone.
    let left = processes_mentioning(&tmp.path().display().to_string());
    assert!(left.is_empty(), "left running: {left:?}");
    assert_temp_dirs_removed(tmp.path(), &out);
}

#[test]
fn ctrl_c_stops_everything_it_started() {
    if !tools("ctrl_c_stops_everything_it_started", &["fio", "nbdkit"]) {
        return;
    }
    let _one = one_at_a_time();
    let rb = ringblock();
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let out = tmp.path().join("out");
    let mut args = quick_args(&out, &rb);
    // Long enough points that the signal lands mid-run.
    let at = args.iter().position(|a| a == "--runtime-s").unwrap();
    args[at + 1] = "5".into();
    let mut child = bench(tmp.path())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until a server runs (its socket path mentions our TMPDIR), then interrupt.
    let needle = tmp.path().display().to_string();
    let until = Instant::now() + Duration::from_secs(30);
    while processes_mentioning(&needle)
        .iter()
        .all(|p| !p.contains(".sock"))
    {
        assert!(Instant::now() < until, "no server started within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let until = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < until,
            "the bench did not stop within 20 s of Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "an interrupted run reports failure");
    assert!(err.contains("interrupted"), "{err}");
    let left = processes_mentioning(&needle);
    assert!(left.is_empty(), "left running after Ctrl-C: {left:?}");
    assert_temp_dirs_removed(tmp.path(), &out);
    // What was measured before the signal is still reported.
    assert!(out.join("summary.json").is_file(), "{err}");
}

/// A peer that is not installed is reported as skipped, with the reason, and the run goes on.
#[test]
fn a_missing_peer_is_skipped_with_the_reason() {
    if !tools("a_missing_peer_is_skipped_with_the_reason", &["fio"]) {
        return;
    }
    let _one = one_at_a_time();
    let rb = ringblock();
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let out = tmp.path().join("out");
    // A PATH holding fio and nothing else: no nbdkit.
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let fio = std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|d| d.join("fio"))
        .find(|p| p.is_file())
        .unwrap();
    std::os::unix::fs::symlink(fio, bin.join("fio")).unwrap();
    let mut args = quick_args(&out, &rb);
    let at = args.iter().position(|a| a == "--runtime-s").unwrap();
    args[at + 1] = "0.2".into();
    let o = bench(tmp.path())
        .env("PATH", &bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "run failed: {stderr}");
    assert!(
        stderr.contains("skipping nbdkit-memory: `nbdkit` is not installed"),
        "{stderr}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let status = |id: &str| {
        summary["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == id)
            .unwrap_or_else(|| panic!("{id} missing from {summary}"))
            .clone()
    };
    assert_eq!(status("ringblock")["status"], "ran");
    let nk = status("nbdkit-memory");
    assert_eq!(nk["status"], "skipped", "{nk}");
    assert!(
        nk["reason"].as_str().unwrap().contains("not installed"),
        "{nk}"
    );
    assert!(
        !summary["points"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["target"] == "nbdkit-memory" && !p["samples"].as_array().unwrap().is_empty()),
        "a skipped target has no samples"
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("| nbdkit memory (unix) | **skipped** |"),
        "{md}"
    );
    assert!(
        md.contains("nbdkit-memory skipped: `nbdkit` is not installed"),
        "{md}"
    );
    assert_temp_dirs_removed(tmp.path(), &out);
}

/// The replication step alone, tiny: no, sync and async replica side by side, each with its
/// points measured; the async set-up labelled from the daemon's own status; a resync with
/// zero-copy sends on and off that copied at least what was written while suspended, with
/// the primary's send counters; the goals listed; the section in report.md; nothing left
/// running.
#[test]
fn replication_step_measures_three_setups_and_a_resync() {
    if !tools(
        "replication_step_measures_three_setups_and_a_resync",
        &["fio"],
    ) {
        return;
    }
    let _one = one_at_a_time();
    let rb = ringblock();
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let out = tmp.path().join("out");
    let o = bench(tmp.path())
        .args([
            "run",
            "--quick",
            "--targets",
            "replication",
            "--runtime-s",
            "0.3",
            "--size-mib",
            "96",
            "--repl-resync-mib",
            "16",
            "--out",
        ])
        .arg(&out)
        .arg("--ringblock")
        .arg(&rb)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "run failed: {stderr}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let r = &summary["replication"];
    let setups = r["setups"].as_array().unwrap_or_else(|| panic!("{r}"));
    let ids: Vec<&str> = setups.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["none", "sync", "async"], "{r}");
    for s in setups {
        for p in s["points"].as_array().unwrap() {
            // Two rounds per repeat.
            assert_eq!(
                p["samples"].as_array().unwrap().len(),
                2,
                "{}: {p}",
                s["id"]
            );
            assert!(p["samples"][0]["iops"].as_f64().unwrap() > 0.0, "{p}");
        }
    }
    assert!(setups[0]["reported_mode"].is_null());
    assert_eq!(setups[1]["reported_mode"], "sync");
    assert_eq!(setups[2]["reported_mode"], "async");
    let resyncs = r["resyncs"].as_array().unwrap();
    assert_eq!(resyncs.len(), 2, "{r}");
    for (x, zc) in resyncs.iter().zip([true, false]) {
        assert_eq!(x["zero_copy_sends"], zc, "{x}");
        assert!(x["done_bytes"].as_u64().unwrap() >= 16 << 20, "{x}");
        let sends = &x["sends"];
        if zc {
            // Zero-copy where the kernel has it, else the counted fallback.
            let n = sends["zero_copy"].as_u64().unwrap()
                + sends["copied_unsupported"].as_u64().unwrap();
            assert!(n > 0, "{x}");
        } else {
            assert_eq!(sends["zero_copy"], 0, "{x}");
            assert!(sends["copied_unsupported"].as_u64().unwrap() > 0, "{x}");
        }
    }
    let goals = r["goals"].as_array().unwrap();
    assert!(goals.iter().all(|g| g["status"] != "not measured"), "{r}");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("## Replication (loopback)"), "{md}");
    assert!(
        entries_starting(tmp.path(), "rbb-").is_empty(),
        "temporary directories left"
    );
}

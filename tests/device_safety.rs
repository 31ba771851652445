//! Damaged, shared, deleted and misconfigured device files, against the real daemon: it
//! refuses with a clear message (exit code 2) and never grows, reformats or silently loses a
//! device's data.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::{
    http_auth, nbd_connect, nbd_endpoints, run_tool, start_with_web, wait_for, write_file, Daemon,
    ToolOutput, BIN,
};
use ringblock_transports::nbd::wire::{CMD_FLAG_FUA, EIO};

const MIB: u64 = 1 << 20;
const DEVICE_BYTES: u64 = 64 * MIB;
const VOLUME_BYTES: u64 = 32 * MIB;
/// A `serve` that should refuse to start; one that starts instead is stopped by the limit.
const SERVE_LIMIT_S: u64 = 30;
const EXIT_CONFIG: i32 = 2;

fn device_config(dir: &Path, name: &str, img: &Path, size_bytes: Option<u64>) -> String {
    let size = size_bytes
        .map(|s| format!("size_bytes = {s}\n"))
        .unwrap_or_default();
    write_file(
        dir,
        name,
        &format!(
            "[[device]]\nname = \"d0\"\nkind = \"file\"\npath = \"{}\"\n{size}\
             [[volume]]\nname = \"v\"\ndevice = \"d0\"\nsize_bytes = {VOLUME_BYTES}\n",
            img.display()
        ),
    )
}

fn serve_args<'a>(cfg: &'a str, state: &'a str) -> Vec<&'a str> {
    vec![
        "--config",
        cfg,
        "--listen",
        "127.0.0.1:0",
        "--no-web",
        "--state-dir",
        state,
    ]
}

fn start(cfg: &str, state: &Path) -> Daemon {
    Daemon::start(&serve_args(cfg, state.to_str().unwrap()))
}

/// `ringblock serve` expected to refuse: bounded in time.
fn serve_refused(cfg: &str, state: &Path) -> ToolOutput {
    let mut args = vec!["serve"];
    args.extend(serve_args(cfg, state.to_str().unwrap()));
    let out = run_tool(SERVE_LIMIT_S, BIN, &args, &[]);
    assert_eq!(
        out.code, EXIT_CONFIG,
        "serve should refuse with exit code 2: {out:?}"
    );
    out
}

fn pattern(i: u64) -> Vec<u8> {
    (0..4096u64).map(|b| (i * 31 + b) as u8 | 1).collect()
}

/// Write a 4 KiB pattern at the start of every MiB of the volume, then flush.
fn write_patterns(d: &Daemon) {
    let (addr, _) = nbd_endpoints(d);
    let mut c = nbd_connect(&addr.expect("nbd tcp address"), "v");
    for i in 0..VOLUME_BYTES / MIB {
        c.write(i * MIB, &pattern(i), 0).unwrap();
    }
    c.flush().unwrap();
    c.disconnect();
}

fn check_patterns(d: &Daemon) {
    let (addr, _) = nbd_endpoints(d);
    let mut c = nbd_connect(&addr.expect("nbd tcp address"), "v");
    for i in 0..VOLUME_BYTES / MIB {
        let data = c.read(i * MIB, 4096).unwrap();
        assert!(data == pattern(i), "MiB {i} of the volume lost its data");
    }
    c.disconnect();
}

fn set_len(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

#[test]
fn a_shrunk_device_file_is_refused_never_grown_or_reformatted() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let img = dir.path().join("d0.img");
    let cfg = device_config(dir.path(), "sized.toml", &img, Some(DEVICE_BYTES));
    let no_size = device_config(dir.path(), "no-size.toml", &img, None);
    let d = start(&cfg, &state);
    write_patterns(&d);
    d.stop();
    let mode = std::fs::metadata(&img).unwrap().permissions().mode() & 0o777;
    let backup = dir.path().join("backup.img");
    std::fs::copy(&img, &backup).unwrap();
    let path = img.display().to_string();
    for len in [40 * MIB, 30 << 10, 0] {
        set_len(&img, len);
        let out = serve_refused(&cfg, &state);
        let want = format!("device d0 ({path}) is {len} bytes but size_bytes = {DEVICE_BYTES}");
        assert!(
            out.stderr.contains(&want) && out.stderr.contains("restore"),
            "{want:?} not in {:?}",
            out.stderr
        );
        assert_eq!(std::fs::metadata(&img).unwrap().len(), len, "never grown");
        // Without size_bytes the label (or the lack of room for one) says it.
        let out = serve_refused(&no_size, &state);
        let want = if len >= 4096 {
            format!("device d0 ({path}) is {len} bytes but its label says it holds")
        } else {
            format!("device d0 ({path}) is {len} bytes, too small to hold a ringblock label")
        };
        assert!(
            out.stderr.contains(&want),
            "{want:?} not in {:?}",
            out.stderr
        );
        assert_eq!(std::fs::metadata(&img).unwrap().len(), len, "never grown");
    }
    std::fs::copy(&backup, &img).unwrap();
    let d = start(&cfg, &state);
    check_patterns(&d);
    d.stop();
    // Created private: any local user could read every volume otherwise.
    assert_eq!(mode, 0o600, "device file created with mode {mode:o}");
}

#[test]
fn a_second_daemon_on_the_same_device_is_refused_with_the_holders_pid() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d0.img");
    let cfg = device_config(dir.path(), "d.toml", &img, Some(DEVICE_BYTES));
    let first = start(&cfg, &dir.path().join("state1"));
    let out = serve_refused(&cfg, &dir.path().join("state2"));
    let want = format!(
        "device d0 ({}) is in use by pid {}",
        img.display(),
        first.pid()
    );
    assert!(
        out.stderr.contains(&want),
        "{want:?} not in {:?}",
        out.stderr
    );
    // Through a symlink it is the same file, and the same lock.
    let link = dir.path().join("link.img");
    std::os::unix::fs::symlink(&img, &link).unwrap();
    let by_link = device_config(dir.path(), "link.toml", &link, None);
    let out = serve_refused(&by_link, &dir.path().join("state2"));
    assert!(
        out.stderr
            .contains(&format!("is in use by pid {}", first.pid())),
        "{:?}",
        out.stderr
    );
    first.stop();
    let second = start(&cfg, &dir.path().join("state2"));
    second.stop();
}

#[test]
fn a_zeroed_label_or_stray_data_is_not_formatted_over() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let img = dir.path().join("d0.img");
    let cfg = device_config(dir.path(), "d.toml", &img, Some(DEVICE_BYTES));
    let d = start(&cfg, &state);
    write_patterns(&d);
    d.stop();
    let before = std::fs::read(&img).unwrap();
    // `dd if=/dev/zero of=img bs=4096 count=1 conv=notrunc`
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&[0u8; 4096], 0).unwrap();
    }
    let out = serve_refused(&cfg, &state);
    let checked = run_tool(SERVE_LIMIT_S, BIN, &["check-config", &cfg], &[]);
    assert_eq!(checked.code, EXIT_CONFIG, "{checked:?}");
    for want in [
        format!(
            "device d0 ({}) has no ringblock label but is not blank",
            img.display()
        ),
        "metadata slot 1 (at byte".to_string(),
        "with 1 volume(s)".to_string(),
        "restore it from a backup".to_string(),
        "format = \"always\"".to_string(),
    ] {
        assert!(
            out.stderr.contains(&want),
            "{want:?} not in {:?}",
            out.stderr
        );
        assert!(
            checked.stderr.contains(&want),
            "check-config: {want:?} not in {:?}",
            checked.stderr
        );
    }
    let after = std::fs::read(&img).unwrap();
    assert!(
        after[4096..] == before[4096..],
        "nothing past the label was written"
    );
    std::fs::write(&img, &before).unwrap();
    let d = start(&cfg, &state);
    check_patterns(&d);
    d.stop();

    // A file that never held a label, with data far from its start, is not blank either.
    let other = dir.path().join("other.img");
    let f = std::fs::File::create(&other).unwrap();
    f.set_len(DEVICE_BYTES).unwrap();
    {
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"precious", 50 * MIB + 7).unwrap();
    }
    let cfg = device_config(dir.path(), "other.toml", &other, Some(DEVICE_BYTES));
    let out = serve_refused(&cfg, &state);
    let want = format!("non-zero data at byte {}", 50 * MIB + 7);
    assert!(
        out.stderr.contains(&want),
        "{want:?} not in {:?}",
        out.stderr
    );
}

#[test]
fn a_device_file_deleted_while_running_is_noticed_and_not_reformatted() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let img = dir.path().join("d0.img");
    let cfg = device_config(dir.path(), "d.toml", &img, Some(DEVICE_BYTES));
    let (d, web, token) = start_with_web(Some(&cfg), &state);
    write_patterns(&d);
    std::fs::remove_file(&img).unwrap();
    let health = wait_for(
        Duration::from_secs(30),
        "device health to turn error",
        || {
            let devs = http_auth(&web, &token, "GET", "/api/devices", &[], None).json();
            let h = devs
                .as_array()
                .and_then(|a| a.first())
                .map(|d| d["health"].clone())?;
            (h["status"] == "error").then_some(h)
        },
    );
    assert_eq!(health["backing_deleted"], true, "{health}");
    // What is written now cannot survive a restart: flush and FUA say so.
    let (addr, _) = nbd_endpoints(&d);
    let mut c = nbd_connect(&addr.unwrap(), "v");
    c.write(0, &pattern(99), 0).unwrap();
    assert_eq!(c.flush().unwrap_err().errno(), Some(EIO));
    let fua = c.write(MIB, &pattern(98), CMD_FLAG_FUA).unwrap_err();
    assert_eq!(fua.errno(), Some(EIO));
    c.disconnect();
    d.kill();
    // The next start finds no file: it would create and format a blank one, but the state
    // record says the device held a volume.
    let out = serve_refused(&cfg, &state);
    let record = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("device-")
        })
        .expect("a device state record");
    let mode = std::fs::metadata(&record).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    for want in [
        format!("device d0 ({})", img.display()),
        format!("state record {}", record.display()),
        "held 1 volume(s)".to_string(),
        "remove the record".to_string(),
    ] {
        assert!(
            out.stderr.contains(&want),
            "{want:?} not in {:?}",
            out.stderr
        );
    }
    assert!(
        !img.exists(),
        "the file made by the refused start is removed"
    );
    // The operator's decision: the data is lost, start over.
    std::fs::remove_file(&record).unwrap();
    let d = start(&cfg, &state);
    d.stop();
}

/// `check-config` refuses what `serve` refuses, with the same message and exit code 2.
#[test]
fn check_config_and_serve_refuse_the_same_bad_configs() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let p = |name: &str| dir.path().join(name).display().to_string();
    let img = dir.path().join("d.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(DEVICE_BYTES)
        .unwrap();
    std::os::unix::fs::symlink(&img, dir.path().join("link.img")).unwrap();
    std::fs::hard_link(&img, dir.path().join("hard.img")).unwrap();
    std::fs::write(dir.path().join("foreign.img"), vec![0xAB; 8 << 20]).unwrap();
    let file = |name: &str, path: &str, extra: &str| {
        format!("[[device]]\nname = \"{name}\"\nkind = \"file\"\npath = \"{path}\"\n{extra}")
    };
    let ram = |name: &str, extra: &str| {
        format!(
            "[[device]]\nname = \"{name}\"\nkind = \"ram\"\nsize_bytes = {DEVICE_BYTES}\n{extra}"
        )
    };
    let volume = |name: &str, size: u64| {
        format!("[[volume]]\nname = {name:?}\ndevice = \"a\"\nsize_bytes = {size}\n")
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "dup-name",
            format!("{}{}", ram("a", ""), ram("a", "")),
            "\"a\" is used twice",
        ),
        (
            "dup-symlink",
            format!(
                "{}{}",
                file("a", &p("d.img"), ""),
                file("b", &p("link.img"), "")
            ),
            "devices a and b are the same device",
        ),
        (
            "dup-hardlink",
            format!(
                "{}{}",
                file("a", &p("d.img"), ""),
                file("b", &p("hard.img"), "")
            ),
            "devices a and b are the same device",
        ),
        (
            "chunk-0",
            ram("a", "chunk_size_bytes = 0\n"),
            "power of two",
        ),
        (
            "chunk-3000",
            ram("a", "chunk_size_bytes = 3000\n"),
            "power of two",
        ),
        (
            "chunk-2g",
            ram("a", "chunk_size_bytes = 2147483648\n"),
            "power of two",
        ),
        (
            "cores",
            format!("cores = [100000]\n{}", ram("a", "")),
            "core 100000 is not available",
        ),
        (
            "volume-too-big",
            format!("{}{}", ram("a", ""), volume("v", 4 * DEVICE_BYTES)),
            "larger than device \"a\" can hold",
        ),
        (
            "volume-too-big-for-file",
            format!(
                "{}{}",
                file("a", &p("d.img"), ""),
                volume("v", 2 * DEVICE_BYTES)
            ),
            "larger than device \"a\" can hold",
        ),
        (
            "volume-name",
            format!("{}{}", ram("a", ""), volume("no spaces", MIB)),
            "must be 1-128 characters",
        ),
        (
            "foreign",
            file("a", &p("foreign.img"), ""),
            "refusing to overwrite",
        ),
        (
            "size-0",
            file("a", &p("new0.img"), "size_bytes = 0\n"),
            "size_bytes = 0 is too small",
        ),
        (
            "size-4k",
            file("a", &p("new4k.img"), "size_bytes = 4096\n"),
            "size_bytes = 4096 is too small",
        ),
        (
            "short-file",
            file(
                "a",
                &p("d.img"),
                &format!("size_bytes = {}\n", 2 * DEVICE_BYTES),
            ),
            "never grown",
        ),
    ];
    for (name, text, want) in &cases {
        let cfg = write_file(dir.path(), &format!("{name}.toml"), text);
        let out = run_tool(SERVE_LIMIT_S, BIN, &["check-config", &cfg], &[]);
        assert_eq!(out.code, EXIT_CONFIG, "check-config {name}: {out:?}");
        assert!(
            out.stderr.contains(want),
            "check-config {name}: {want:?} not in {:?}",
            out.stderr
        );
        let out = serve_refused(&cfg, &state);
        assert!(
            out.stderr.contains(want),
            "serve {name}: {want:?} not in {:?}",
            out.stderr
        );
    }
    assert!(!dir.path().join("new0.img").exists(), "size 0 left a file");
    assert!(
        !dir.path().join("new4k.img").exists(),
        "size 4096 left a file"
    );
    assert_eq!(std::fs::metadata(&img).unwrap().len(), DEVICE_BYTES);
    assert!(std::fs::read(dir.path().join("foreign.img"))
        .unwrap()
        .iter()
        .all(|&b| b == 0xAB));
    // And a good one passes both (serve is not run: it would keep running).
    let good = write_file(
        dir.path(),
        "good.toml",
        &format!(
            "{}{}",
            file("a", &p("d.img"), ""),
            volume("v", VOLUME_BYTES)
        ),
    );
    let out = run_tool(SERVE_LIMIT_S, BIN, &["check-config", &good], &[]);
    assert!(out.ok(), "{out:?}");
}

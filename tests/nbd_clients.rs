//! Interoperability with real NBD clients against the real daemon: nbdinfo, nbdsh (libnbd's
//! Python shell), qemu-io, qemu-img, nbdcopy, fio's nbd engine and nbdfuse + a loop device +
//! ext4. Every tool runs under a time limit; nothing asserts on speed.
//!
//! A tool that is missing, or a piece the sandbox cannot provide (FUSE, loop devices, mount),
//! prints `SKIPPED <test>: <reason>` instead of passing silently; under `scripts/test-all`
//! (`RINGBLOCK_TESTS_REQUIRED=1`) it fails the test.

mod common;
#[path = "support/required.rs"]
mod required;

use std::path::Path;

use common::{have_tool, run_tool, start_on_tcp_and_unix, Daemon, ToolOutput, BIN};

const MIB: u64 = 1 << 20;

/// One daemon per test: volumes `disk` (1 GiB), `small` (64 MiB) and read-only `ro` (16 MiB)
/// on a RAM device, on a free TCP port and a Unix socket.
struct Fixture {
    dir: tempfile::TempDir,
    daemon: Option<Daemon>,
    tcp: String,
    unix: String,
}

impl Fixture {
    fn start() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (daemon, tcp, unix) = start_on_tcp_and_unix(
            dir.path(),
            "clients.toml",
            "[[device]]\nname = \"ram0\"\nkind = \"ram\"\nsize_bytes = 1409286144\n\
             [[volume]]\nname = \"disk\"\ndevice = \"ram0\"\nsize_bytes = 1073741824\n\
             [[volume]]\nname = \"small\"\ndevice = \"ram0\"\nsize_bytes = 67108864\n\
             [[volume]]\nname = \"ro\"\ndevice = \"ram0\"\nsize_bytes = 16777216\n\
             [nbd]\nread_only = [\"ro\"]\n",
        );
        Fixture {
            dir,
            daemon: Some(daemon),
            tcp,
            unix,
        }
    }

    fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.tcp)
    }

    fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.unix)
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    /// SIGTERM; the daemon must stop cleanly even with clients having come and gone.
    fn stop(mut self) {
        let rest = self.daemon.take().unwrap().stop();
        assert!(
            rest.iter().any(|l| l.contains("stopped cleanly")),
            "{rest:?}"
        );
    }
}

fn check(out: &ToolOutput, what: &str) {
    assert!(
        out.ok(),
        "{what} failed with exit code {}\n--- stdout\n{}\n--- stderr\n{}",
        out.code,
        out.stdout,
        out.stderr
    );
}

/// Whether every tool is installed; skips the test otherwise (see `required::skip`).
fn tools(test: &str, names: &[&str]) -> bool {
    for n in names {
        if !have_tool(n) {
            required::skip(test, &format!("{n} is not installed"));
            return false;
        }
    }
    true
}

fn json(text: &str) -> serde_json::Value {
    // fio prints a line before its JSON; start at the first brace or bracket.
    let start = text
        .find(['{', '['])
        .unwrap_or_else(|| panic!("no JSON in {text}"));
    serde_json::from_str(&text[start..]).unwrap_or_else(|e| panic!("bad JSON ({e}): {text}"))
}

fn nbdsh(script: &str, envs: &[(&str, &str)]) -> ToolOutput {
    let code = format!("{PY_COMMON}\n{script}");
    run_tool(180, "nbdsh", &["-c", &code], envs)
}

/// A file of `size_bytes` with random data at a few places and holes elsewhere.
fn make_input(path: &str, size_bytes: u64, blocks: &[(u64, u64)]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(size_bytes).unwrap();
    let mut x = 0x1234_5678_9abc_def1u64;
    for &(off, len) in blocks {
        let data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&data).unwrap();
    }
    f.sync_all().unwrap();
}

fn sha256(path: &str) -> String {
    let out = run_tool(300, "sha256sum", &[path], &[]);
    check(&out, "sha256sum");
    out.stdout.split_whitespace().next().unwrap().to_string()
}

#[test]
fn nbdinfo_reports_sizes_block_sizes_flags_and_lists_exports() {
    if !tools(
        "nbdinfo_reports_sizes_block_sizes_flags_and_lists_exports",
        &["nbdinfo"],
    ) {
        return;
    }
    let f = Fixture::start();
    for uri in [f.tcp_uri("small"), f.unix_uri("small")] {
        let out = run_tool(60, "nbdinfo", &["--json", &uri], &[]);
        check(&out, "nbdinfo --json");
        let v = json(&out.stdout);
        assert_eq!(v["protocol"], "newstyle-fixed", "{v}");
        assert_eq!(v["structured"], true, "{v}");
        let e = &v["exports"][0];
        assert_eq!(e["export-name"], "small", "{e}");
        assert_eq!(e["export-size"], 64 * MIB, "{e}");
        assert_eq!(e["block_size_minimum"], 512, "{e}");
        assert_eq!(e["block_size_preferred"], 4096, "{e}");
        assert_eq!(e["block_size_maximum"], 32 * MIB, "{e}");
        assert_eq!(e["is_read_only"], false, "{e}");
        for flag in [
            "can_flush",
            "can_fua",
            "can_trim",
            "can_zero",
            "can_fast_zero",
            "can_cache",
            "can_df",
            "can_multi_conn",
        ] {
            assert_eq!(e[flag], true, "{flag}: {e}");
        }
        assert!(
            e["contexts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c == "base:allocation"),
            "{e}"
        );
        assert!(e["description"].as_str().unwrap().contains("small"), "{e}");
    }
    // The read-only export.
    let out = run_tool(60, "nbdinfo", &["--json", &f.tcp_uri("ro")], &[]);
    check(&out, "nbdinfo --json (read-only)");
    let e = &json(&out.stdout)["exports"][0];
    assert_eq!(e["is_read_only"], true, "{e}");
    for flag in ["can_trim", "can_zero", "can_fua", "can_fast_zero"] {
        assert_eq!(e[flag], false, "{flag} on a read-only export: {e}");
    }
    for flag in ["can_flush", "can_cache", "can_multi_conn"] {
        assert_eq!(e[flag], true, "{flag} on a read-only export: {e}");
    }
    check(
        &run_tool(
            60,
            "nbdinfo",
            &["--is", "read-only", &f.unix_uri("ro")],
            &[],
        ),
        "nbdinfo --is read-only",
    );
    check(
        &run_tool(60, "nbdinfo", &["--can", "trim", &f.unix_uri("small")], &[]),
        "nbdinfo --can trim",
    );
    check(
        &run_tool(
            60,
            "nbdinfo",
            &["--can", "multi-conn", &f.tcp_uri("disk")],
            &[],
        ),
        "nbdinfo --can multi-conn",
    );
    let out = run_tool(60, "nbdinfo", &["--can", "trim", &f.tcp_uri("ro")], &[]);
    assert_eq!(out.code, 2, "--can trim on a read-only export: {out:?}");
    let out = run_tool(60, "nbdinfo", &["--size", &f.tcp_uri("disk")], &[]);
    check(&out, "nbdinfo --size");
    assert_eq!(out.stdout.trim(), (1u64 << 30).to_string());
    // Unknown export: a clean error.
    let out = run_tool(60, "nbdinfo", &[&f.tcp_uri("nonesuch")], &[]);
    assert!(!out.ok(), "nbdinfo of an unknown export succeeded: {out:?}");
    // --list shows every export, with descriptions.
    for uri in [f.unix_uri(""), f.tcp_uri("")] {
        let out = run_tool(60, "nbdinfo", &["--list", "--json", &uri], &[]);
        check(&out, "nbdinfo --list --json");
        let v = json(&out.stdout);
        let mut names: Vec<String> = v["exports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["export-name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["disk", "ro", "small"], "{v}");
        for e in v["exports"].as_array().unwrap() {
            assert!(
                e["description"]
                    .as_str()
                    .unwrap()
                    .contains("ringblock volume"),
                "{e}"
            );
            assert_eq!(e["is_read_only"], e["export-name"] == "ro", "{e}");
        }
    }
    f.stop();
}

#[test]
fn nbdinfo_map_shows_holes_then_data() {
    if !tools("nbdinfo_map_shows_holes_then_data", &["nbdinfo", "nbdsh"]) {
        return;
    }
    let f = Fixture::start();
    let uri = f.tcp_uri("small");
    let map = |uri: &str| -> Vec<(u64, u64, u64)> {
        let out = run_tool(60, "nbdinfo", &["--map", "--json", uri], &[]);
        check(&out, "nbdinfo --map --json");
        json(&out.stdout)
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["offset"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["type"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let before = map(&uri);
    assert!(!before.is_empty());
    assert!(
        before.iter().all(|&(_, _, t)| t == 3),
        "a fresh volume is hole+zero: {before:?}"
    );
    assert_eq!(before.iter().map(|&(_, l, _)| l).sum::<u64>(), 64 * MIB);
    // Write 64 KiB at 5 MiB.
    let out = nbdsh("h.connect_uri(os.environ['URI'])\nh.pwrite(b'\\x5a' * 65536, 5 << 20)\nh.flush()\nh.shutdown()", &[("URI", &uri)]);
    check(&out, "nbdsh write");
    let after = map(&f.unix_uri("small"));
    assert_eq!(
        after.iter().map(|&(_, l, _)| l).sum::<u64>(),
        64 * MIB,
        "{after:?}"
    );
    let covering = after
        .iter()
        .find(|&&(o, l, _)| o <= 5 * MIB && 5 * MIB < o + l)
        .unwrap();
    assert_eq!(
        covering.2 & 1,
        0,
        "the written range is still a hole: {after:?}"
    );
    assert!(
        after.iter().any(|&(o, _, t)| t == 3 && o >= 6 * MIB),
        "the rest should stay holes: {after:?}"
    );
    // The plain-text map too.
    let out = run_tool(60, "nbdinfo", &["--map", &uri], &[]);
    check(&out, "nbdinfo --map");
    assert!(
        out.stdout.contains("data") && out.stdout.contains("hole,zero"),
        "{}",
        out.stdout
    );
    let out = run_tool(60, "nbdinfo", &["--map", "--totals", &uri], &[]);
    check(&out, "nbdinfo --map --totals");
    f.stop();
}

#[test]
fn socket_activation_with_nbdinfo_and_nbdsh() {
    if !tools(
        "socket_activation_with_nbdinfo_and_nbdsh",
        &["nbdinfo", "nbdsh"],
    ) {
        return;
    }
    // libnbd starts the daemon itself ([ CMD ARGS ]), hands it a listening Unix socket through
    // LISTEN_FDS, and stops it with SIGTERM when done. stdout must stay clean JSON.
    let out = run_tool(120, "nbdinfo", &["--json", "[", BIN, "serve", "]"], &[]);
    check(&out, "nbdinfo --json [ ringblock serve ]");
    let v = json(&out.stdout);
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "default", "{v}");
    assert_eq!(e["export-size"], 1u64 << 30, "{v}");
    assert_eq!(e["can_multi_conn"], true, "{v}");
    assert!(out.stderr.contains("(socket activation)"), "{}", out.stderr);
    assert!(
        out.stderr.contains("ringblock: stopped cleanly"),
        "the captive daemon did not stop cleanly: {}",
        out.stderr
    );
    let out = nbdsh(PY_ACTIVATION, &[("BIN", BIN)]);
    check(&out, "nbdsh connect_systemd_socket_activation");
    assert!(
        out.stdout.contains("socket activation ok"),
        "{}",
        out.stdout
    );
}

#[test]
fn nbdsh_every_command_flag_and_error() {
    if !tools("nbdsh_every_command_flag_and_error", &["nbdsh"]) {
        return;
    }
    let f = Fixture::start();
    let out = nbdsh(PY_COMMANDS, &[("URI", &f.tcp_uri("small"))]);
    check(&out, "nbdsh commands");
    println!("{}", out.stdout.trim());
    let out = nbdsh(PY_READONLY, &[("URI", &f.unix_uri("ro"))]);
    check(&out, "nbdsh read-only");
    // Without structured replies: simple replies for everything.
    let out = nbdsh(PY_SIMPLE, &[("URI", &f.unix_uri("disk"))]);
    check(&out, "nbdsh without structured replies");
    f.stop();
}

#[test]
fn nbdsh_option_haggling() {
    if !tools("nbdsh_option_haggling", &["nbdsh"]) {
        return;
    }
    let f = Fixture::start();
    for uri in [f.tcp_uri(""), f.unix_uri("")] {
        let out = nbdsh(PY_OPTMODE, &[("URI", &uri)]);
        check(&out, "nbdsh option mode");
        assert!(out.stdout.contains("option mode ok"), "{}", out.stdout);
    }
    f.stop();
}

#[test]
fn multi_conn_flush_covers_writes_of_other_connections() {
    if !tools(
        "multi_conn_flush_covers_writes_of_other_connections",
        &["nbdsh"],
    ) {
        return;
    }
    let f = Fixture::start();
    let out = nbdsh(PY_MULTICONN, &[("URI", &f.tcp_uri("disk"))]);
    check(&out, "nbdsh multi-conn");
    assert!(out.stdout.contains("multi-conn ok"), "{}", out.stdout);
    f.stop();
}

#[test]
fn qemu_io_writes_and_reads_patterns() {
    if !tools("qemu_io_writes_and_reads_patterns", &["qemu-io"]) {
        return;
    }
    let f = Fixture::start();
    for (uri, p) in [(f.tcp_uri("small"), "0xab"), (f.unix_uri("small"), "0xcd")] {
        let w = format!("write -P {p} 0 1M");
        let r = format!("read -P {p} 0 1M");
        let fua = format!("write -f -P {p} 4M 64k");
        let rfua = format!("read -P {p} 4M 64k");
        let out = run_tool(
            120,
            "qemu-io",
            &[
                "-f",
                "raw",
                &uri,
                "-c",
                &w,
                "-c",
                &r,
                "-c",
                "write -z 1M 1M",
                "-c",
                "read -P 0 1M 1M",
                "-c",
                &fua,
                "-c",
                &rfua,
                "-c",
                "discard 8M 1M",
                "-c",
                "flush",
                "-c",
                "read -P 0 16M 4k",
            ],
            &[],
        );
        check(&out, "qemu-io");
        let text = format!("{}{}", out.stdout, out.stderr);
        assert!(
            !text.contains("failed") && !text.contains("error"),
            "qemu-io on {uri}:\n{text}"
        );
        assert_eq!(text.matches("read ").count(), 4, "{text}");
    }
    f.stop();
}

#[test]
fn qemu_img_convert_compare_and_map() {
    if !tools("qemu_img_convert_compare_and_map", &["qemu-img"]) {
        return;
    }
    let f = Fixture::start();
    let input = f.path("in.raw");
    let output = f.path("out.raw");
    make_input(
        &input,
        64 * MIB,
        &[
            (0, MIB),
            (3 * MIB, 2 * MIB),
            (40 * MIB, 512 << 10),
            (63 * MIB, MIB),
        ],
    );
    let uri = f.tcp_uri("small");
    check(
        &run_tool(
            300,
            "qemu-img",
            &["convert", "-n", "-f", "raw", "-O", "raw", &input, &uri],
            &[],
        ),
        "qemu-img convert in",
    );
    let out = run_tool(
        300,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &input, &uri],
        &[],
    );
    check(&out, "qemu-img compare");
    assert!(out.stdout.contains("identical"), "{}", out.stdout);
    check(
        &run_tool(
            300,
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                &f.unix_uri("small"),
                &output,
            ],
            &[],
        ),
        "qemu-img convert out",
    );
    assert_eq!(
        sha256(&input),
        sha256(&output),
        "round trip through qemu-img changed the data"
    );
    let out = run_tool(
        120,
        "qemu-img",
        &["map", "-f", "raw", "--output=json", &uri],
        &[],
    );
    check(&out, "qemu-img map");
    let map = json(&out.stdout);
    let data_at = |off: u64| {
        map.as_array()
            .unwrap()
            .iter()
            .find(|e| {
                let s = e["start"].as_u64().unwrap();
                s <= off && off < s + e["length"].as_u64().unwrap()
            })
            .map(|e| e["data"] == true)
            .unwrap()
    };
    for off in [0, 3 * MIB, 4 * MIB, 40 * MIB, 63 * MIB] {
        assert!(data_at(off), "no data at {off}: {map}");
    }
    for off in [2 * MIB, 20 * MIB, 50 * MIB] {
        assert!(
            !data_at(off),
            "data at {off}, which was never written: {map}"
        );
    }
    // A second compare through the Unix socket after the map.
    check(
        &run_tool(
            300,
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                &output,
                &f.unix_uri("small"),
            ],
            &[],
        ),
        "qemu-img compare (unix)",
    );
    f.stop();
}

#[test]
fn nbdcopy_one_gib_in_and_out() {
    if !tools("nbdcopy_one_gib_in_and_out", &["nbdcopy", "sha256sum"]) {
        return;
    }
    let f = Fixture::start();
    let input = f.path("in.raw");
    let output = f.path("out.raw");
    let blocks: Vec<(u64, u64)> = (0..16)
        .map(|i| (i * 64 * MIB + (i % 5) * MIB, 8 * MIB))
        .chain([(1023 * MIB, MIB)])
        .collect();
    make_input(&input, 1 << 30, &blocks);
    check(
        &run_tool(
            600,
            "nbdcopy",
            &["--flush", &input, &f.tcp_uri("disk")],
            &[],
        ),
        "nbdcopy in",
    );
    check(
        &run_tool(600, "nbdcopy", &[&f.unix_uri("disk"), &output], &[]),
        "nbdcopy out",
    );
    assert_eq!(std::fs::metadata(&output).unwrap().len(), 1 << 30);
    assert_eq!(
        sha256(&input),
        sha256(&output),
        "1 GiB round trip through nbdcopy changed the data"
    );
    f.stop();
}

#[test]
fn fio_nbd_engine_randwrite_verify() {
    if !tools("fio_nbd_engine_randwrite_verify", &["fio"]) {
        return;
    }
    let f = Fixture::start();
    let uri = format!("--uri={}", f.tcp_uri("small"));
    let out = run_tool(
        300,
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--size=32m",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ],
        &[],
    );
    check(&out, "fio randwrite verify");
    let v = json(&out.stdout);
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert_eq!(job["write"]["io_bytes"], 32 * MIB, "{job}");
    assert_eq!(
        job["read"]["io_bytes"],
        32 * MIB,
        "verify read everything back: {job}"
    );
    // Mixed 4k/64k random IO with verify over the Unix socket.
    let uri = format!("--uri={}", f.unix_uri("disk"));
    let out = run_tool(
        300,
        "fio",
        &[
            "--name=mixed",
            "--ioengine=nbd",
            &uri,
            "--rw=randrw",
            "--bsrange=4k-64k",
            "--size=64m",
            "--iodepth=8",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ],
        &[],
    );
    check(&out, "fio randrw verify");
    assert_eq!(json(&out.stdout)["jobs"][0]["error"], 0);
    f.stop();
}

/// nbdfuse exposes the export as a file, a loop device makes it a block device, ext4 goes on
/// top; files survive unmount and a fresh nbdfuse mount.
#[test]
fn nbdfuse_loop_ext4_files_survive_remount() {
    const T: &str = "nbdfuse_loop_ext4_files_survive_remount";
    if !tools(T, &["nbdfuse", "losetup", "mkfs.ext4", "mount", "umount"]) {
        return;
    }
    if !Path::new("/dev/fuse").exists() {
        return required::skip(T, "/dev/fuse does not exist");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return required::skip(T, "needs root for losetup and mount");
    }
    let f = Fixture::start();
    let fuse_dir = f.path("fuse");
    let fs_dir = f.path("fs");
    std::fs::create_dir_all(&fuse_dir).unwrap();
    std::fs::create_dir_all(&fs_dir).unwrap();
    let image = format!("{fuse_dir}/disk");
    let uri = f.unix_uri("small");

    /// Unmounts and detaches whatever is still set up, also when the test fails.
    struct Cleanup {
        fs_dir: String,
        fuse_dir: String,
        loop_dev: Option<String>,
        nbdfuse: Option<std::process::Child>,
    }
    impl Cleanup {
        fn down(&mut self) {
            let _ = run_tool(30, "umount", &[&self.fs_dir], &[]);
            if let Some(l) = self.loop_dev.take() {
                let _ = run_tool(30, "losetup", &["-d", &l], &[]);
            }
            if let Some(mut c) = self.nbdfuse.take() {
                let _ = run_tool(30, "umount", &[&self.fuse_dir], &[]);
                for _ in 0..100 {
                    if let Ok(Some(_)) = c.try_wait() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    impl Drop for Cleanup {
        fn drop(&mut self) {
            self.down();
        }
    }
    let mut cleanup = Cleanup {
        fs_dir: fs_dir.clone(),
        fuse_dir: fuse_dir.clone(),
        loop_dev: None,
        nbdfuse: None,
    };

    let mount_fuse = |cleanup: &mut Cleanup| -> bool {
        let pidfile = f.path("nbdfuse.pid");
        let _ = std::fs::remove_file(&pidfile);
        let child = std::process::Command::new("timeout")
            .args(["-k", "5", "600", "nbdfuse", "-P", &pidfile, &image, &uri])
            .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
            .spawn()
            .expect("start nbdfuse");
        cleanup.nbdfuse = Some(child);
        for _ in 0..200 {
            if std::fs::metadata(&pidfile)
                .map(|m| m.len() > 0)
                .unwrap_or(false)
            {
                return std::fs::metadata(&image)
                    .map(|m| m.len() == 64 * MIB)
                    .unwrap_or(false);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        false
    };
    if !mount_fuse(&mut cleanup) {
        return required::skip(T, "nbdfuse could not mount here");
    }
    let out = run_tool(60, "losetup", &["-f", "--show", &image], &[]);
    if !out.ok() {
        return required::skip(
            T,
            &format!(
                "losetup cannot attach a loop device here: {}",
                out.stderr.trim()
            ),
        );
    }
    cleanup.loop_dev = Some(out.stdout.trim().to_string());
    let dev = out.stdout.trim().to_string();
    check(
        &run_tool(300, "mkfs.ext4", &["-q", "-F", &dev], &[]),
        "mkfs.ext4",
    );
    let out = run_tool(60, "mount", &[&dev, &fs_dir], &[]);
    if !out.ok() {
        return required::skip(
            T,
            &format!("mount is not permitted here: {}", out.stderr.trim()),
        );
    }
    let mut files = Vec::new();
    for i in 0..20u64 {
        let data: Vec<u8> = (0..(i + 1) * 37_000).map(|j| (j * 31 + i) as u8).collect();
        std::fs::write(format!("{fs_dir}/file{i}"), &data).unwrap();
        files.push(data);
    }
    check(&run_tool(60, "sync", &[], &[]), "sync");
    cleanup.down();
    // Everything down; mount again from scratch and read the files back.
    assert!(mount_fuse(&mut cleanup), "nbdfuse did not come back");
    let out = run_tool(60, "losetup", &["-f", "--show", &image], &[]);
    check(&out, "losetup (again)");
    cleanup.loop_dev = Some(out.stdout.trim().to_string());
    let dev = out.stdout.trim().to_string();
    check(
        &run_tool(120, "mount", &[&dev, &fs_dir], &[]),
        "mount (again)",
    );
    for (i, data) in files.iter().enumerate() {
        let back = std::fs::read(format!("{fs_dir}/file{i}")).unwrap();
        assert!(&back == data, "file{i} changed across remount");
    }
    check(&run_tool(60, "umount", &[&fs_dir], &[]), "umount");
    if have_tool("e2fsck") {
        check(&run_tool(300, "e2fsck", &["-n", "-f", &dev], &[]), "e2fsck");
    }
    cleanup.down();
    drop(cleanup);
    f.stop();
}

// ---------------------------------------------------------------------------------------------
// nbdsh scripts. nbdsh provides `nbd` and an unconnected handle `h`; URIs come from the
// environment.
// ---------------------------------------------------------------------------------------------

const PY_COMMON: &str = r#"
import errno, os

def expect_err(what, codes, fn):
    try:
        fn()
    except nbd.Error as e:
        assert e.errnum in codes, "%s: got %s (%s), want one of %s" % (what, e.errno, e, [errno.errorcode[c] for c in codes])
        return e.errno
    raise AssertionError("%s: succeeded, expected an error" % what)
"#;

const PY_COMMANDS: &str = r#"
URI = os.environ["URI"]
h.add_meta_context("base:allocation")
h.connect_uri(URI)
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")
size = h.get_size()
assert size == 64 << 20, size
assert h.get_block_size(nbd.SIZE_MINIMUM) == 512
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20
for f in ("flush", "fua", "trim", "zero", "fast_zero", "cache", "df", "multi_conn"):
    assert getattr(h, "can_" + f)(), f
assert not h.is_read_only()

def extents(off, length, flags=0):
    out = []
    def cb(ctx, offset, entries, err):
        assert ctx == "base:allocation", ctx
        out.extend(zip(entries[0::2], entries[1::2]))
        return 0
    h.block_status(length, off, cb, flags)
    return out

# A fresh volume is one hole that reads as zeroes.
e = extents(0, size)
assert e[0] == (size, nbd.STATE_HOLE | nbd.STATE_ZERO), e
assert h.pread(65536, 0) == bytes(65536)

data = bytes(range(256)) * 256  # 64 KiB
h.pwrite(data, 0)
h.pwrite(data, 1 << 20, nbd.CMD_FLAG_FUA)
assert h.pread(65536, 0) == data
assert h.pread(65536, 1 << 20) == data
h.flush()
e = extents(0, 2 << 20)
assert e[0][1] & nbd.STATE_HOLE == 0, e
e = extents(0, 4096, nbd.CMD_FLAG_REQ_ONE)
assert len(e) == 1 and 0 < e[0][0] <= 4096, e

# Structured reads: chunks cover the request exactly; with DF, in one chunk.
seen = []
def chunk(buf, offset, status, err):
    seen.append((offset, len(buf), status))
    return 0
buf = h.pread_structured(131072, 0, chunk)
assert buf[:65536] == data and buf[65536:] == bytes(65536)
assert sum(n for _, n, _ in seen) == 131072, seen
seen.clear()
buf = h.pread_structured(131072, 0, chunk, nbd.CMD_FLAG_DF)
assert len(seen) == 1 and seen[0][1] == 131072, seen
assert buf[:65536] == data

# Zeroes, trim, cache.
h.zero(65536, 0)
assert h.pread(65536, 0) == bytes(65536)
h.pwrite(data, 0)
h.zero(4096, 4096, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(4096, 4096) == bytes(4096)
assert h.pread(4096, 0) == data[:4096]
h.zero(4096, 8192, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 8192) == bytes(4096)
try:
    h.zero(4 << 20, 8 << 20, nbd.CMD_FLAG_FAST_ZERO)
    fast = "done"
except nbd.Error as ex:
    assert ex.errnum == errno.ENOTSUP, ex
    fast = "ENOTSUP"
h.trim(1 << 20, 2 << 20)
h.trim(4096, 3 << 20, nbd.CMD_FLAG_FUA)
h.cache(65536, 0)
h.flush()
assert h.pread(4096, 0) == data[:4096]

# Errors: let through what libnbd would refuse on its own.
h.set_strict_mode(0)
expect_err("read past the end", [errno.EINVAL], lambda: h.pread(4096, size))
expect_err("read crossing the end", [errno.EINVAL], lambda: h.pread(8192, size - 4096))
wpe = expect_err("write past the end", [errno.EINVAL, errno.ENOSPC], lambda: h.pwrite(data[:4096], size))
expect_err("trim past the end", [errno.EINVAL, errno.ENOSPC], lambda: h.trim(4096, size))
expect_err("zero past the end", [errno.EINVAL, errno.ENOSPC], lambda: h.zero(4096, size))
expect_err("block status past the end", [errno.EINVAL], lambda: extents(size, 4096))
expect_err("misaligned read offset", [errno.EINVAL], lambda: h.pread(512, 100))
expect_err("misaligned read length", [errno.EINVAL], lambda: h.pread(100, 0))
expect_err("misaligned write", [errno.EINVAL], lambda: h.pwrite(b"x" * 100, 512))
expect_err("misaligned trim", [errno.EINVAL], lambda: h.trim(100, 0))
expect_err("unknown command flag", [errno.EINVAL], lambda: h.pread(4096, 0, 1 << 9))
# Zero-length requests are odd, but must not break the connection.
for fn in (lambda: h.pread(0, 0), lambda: h.pwrite(b"", 0), lambda: h.trim(0, 0), lambda: h.zero(0, 0), lambda: h.cache(0, 0)):
    try:
        fn()
    except nbd.Error as ex:
        assert ex.errnum == errno.EINVAL, ex
# The connection survived every error, and the data is intact.
assert h.pread(4096, 0) == data[:4096]
assert h.pread(65536, 1 << 20) == data
h.shutdown()
print("commands ok; fast zero:", fast, "; write past the end:", wpe)
"#;

const PY_READONLY: &str = r#"
h.connect_uri(os.environ["URI"])
assert h.is_read_only()
assert not h.can_trim() and not h.can_zero() and not h.can_fua() and not h.can_fast_zero()
assert h.can_flush() and h.can_multi_conn() and h.can_cache()
assert h.pread(4096, 0) == bytes(4096)
h.set_strict_mode(0)
expect_err("write on a read-only export", [errno.EPERM], lambda: h.pwrite(b"\xee" * 4096, 0))
expect_err("trim on a read-only export", [errno.EPERM], lambda: h.trim(4096, 0))
expect_err("zero on a read-only export", [errno.EPERM], lambda: h.zero(4096, 0))
expect_err("FUA write on a read-only export", [errno.EPERM], lambda: h.pwrite(b"\xee" * 4096, 0, nbd.CMD_FLAG_FUA))
h.flush()
h.cache(4096, 0)
assert h.pread(4096, 0) == bytes(4096)
h.shutdown()
print("read-only ok")
"#;

const PY_SIMPLE: &str = r#"
h.set_request_structured_replies(False)
h.connect_uri(os.environ["URI"])
assert not h.get_structured_replies_negotiated()
assert not h.can_df() and not h.can_meta_context("base:allocation")
assert h.can_trim() and h.can_zero() and h.can_fua() and h.can_flush()
data = b"\xa5" * 8192
h.pwrite(data, 8192)
h.pwrite(data, 16384, nbd.CMD_FLAG_FUA)
assert h.pread(8192, 8192) == data and h.pread(8192, 16384) == data
h.flush()
h.trim(1 << 20, 4 << 20)
h.zero(8192, 16384)
assert h.pread(8192, 16384) == bytes(8192)
h.cache(4096, 0)
h.set_strict_mode(0)
expect_err("read past the end (simple reply)", [errno.EINVAL], lambda: h.pread(4096, h.get_size()))
expect_err("misaligned read (simple reply)", [errno.EINVAL], lambda: h.pread(100, 0))
assert h.pread(8192, 8192) == data
h.shutdown()
print("simple replies ok")
"#;

const PY_OPTMODE: &str = r#"
URI = os.environ["URI"]
h.set_opt_mode(True)
h.set_full_info(True)
h.connect_uri(URI)
assert h.aio_is_negotiating()
exports = []
n = h.opt_list(lambda name, desc: exports.append((name, desc)))
names = sorted(x for x, _ in exports)
assert names == ["disk", "ro", "small"], exports
for name, desc in exports:
    assert desc, exports
    h.set_export_name(name)
    h.opt_info()
    assert h.get_canonical_export_name() == name
    assert h.get_export_description() == desc, (h.get_export_description(), desc)
    assert h.is_read_only() == (name == "ro")
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 512
h.set_export_name("disk")
h.opt_info()
assert h.get_size() == 1 << 30
h.set_export_name("nonesuch")
expect_err("opt_info of an unknown export", [errno.ENOENT, errno.EINVAL], h.opt_info)
assert h.aio_is_negotiating()
h.set_export_name("small")
contexts = []
h.opt_list_meta_context(lambda ctx: contexts.append(ctx))
assert contexts == ["base:allocation"], contexts
h.add_meta_context("base:allocation")
h.add_meta_context("x-unknown:thing")
contexts.clear()
h.opt_list_meta_context(lambda ctx: contexts.append(ctx))
assert contexts == ["base:allocation"], contexts
h.opt_go()
assert h.aio_is_ready(), h.connection_state()
assert h.get_size() == 64 << 20
assert h.can_meta_context("base:allocation") and not h.can_meta_context("x-unknown:thing")
h.pread(4096, 0)
h.shutdown()
# The empty name is the default export.
d = nbd.NBD()
d.set_opt_mode(True)
d.connect_uri(URI)
d.set_export_name("")
d.set_full_info(True)
d.opt_info()
assert d.get_canonical_export_name() in ("disk", "small", "ro")
d.opt_abort()
assert d.aio_is_closed()
print("option mode ok")
"#;

const PY_MULTICONN: &str = r#"
URI = os.environ["URI"]
hs = [nbd.NBD() for _ in range(3)]
for x in hs:
    x.connect_uri(URI)
    assert x.can_multi_conn()
pattern = os.urandom(1 << 20)
hs[0].pwrite(pattern, 4 << 20)
hs[1].flush()
assert hs[2].pread(1 << 20, 4 << 20) == pattern
# Writes in flight on all three connections at once, a flush on one, reads on another.
blocks = {}
bufs = []
for i, x in enumerate(hs):
    for j in range(16):
        off = (8 << 20) + (i * 16 + j) * 65536
        b = os.urandom(65536)
        blocks[off] = b
        buf = nbd.Buffer.from_bytearray(bytearray(b))
        bufs.append(buf)
        x.aio_pwrite(buf, off)
for x in hs:
    for _ in range(100000):
        if x.aio_in_flight() == 0:
            break
        x.poll(1000)
    assert x.aio_in_flight() == 0
hs[2].flush()
for off, b in blocks.items():
    assert hs[(off >> 16) % 3].pread(65536, off) == b, off
for x in hs:
    x.shutdown()
print("multi-conn ok")
"#;

const PY_ACTIVATION: &str = r#"
h.connect_systemd_socket_activation([os.environ["BIN"], "serve"])
assert h.get_size() == 1 << 30
h.pwrite(b"\x42" * 4096, 0)
h.flush()
assert h.pread(4096, 0) == b"\x42" * 4096
h.shutdown()
print("socket activation ok")
"#;

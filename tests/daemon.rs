//! The daemon binary end to end: configuration errors, idle CPU, and data across restarts.

mod common;

use common::{cpu_ticks, run, write_file, Daemon};

fn assert_config_error(args: &[&str], needle: &str) {
    let (code, _out, err) = run(args);
    assert_eq!(code, 2, "exit code for {args:?}; stderr: {err}");
    assert!(
        err.contains(needle),
        "stderr for {args:?} should mention {needle:?}: {err}"
    );
    assert!(!err.contains("panicked"), "panic on bad input: {err}");
}

#[test]
fn bad_configurations_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let unknown = write_file(
        dir.path(),
        "unknown.toml",
        "[[device]]\nname = \"d\"\nkind = \"ram\"\nsize_bytes = 67108864\nfrobnicate = true\n",
    );
    assert_config_error(&["serve", "--config", &unknown], "frobnicate");

    let missing = write_file(
        dir.path(),
        "missing.toml",
        &format!(
            "[[device]]\nname = \"d\"\nkind = \"file\"\npath = \"{}/nope.img\"\n",
            dir.path().display()
        ),
    );
    assert_config_error(&["serve", "--config", &missing], "does not exist");

    let profile = write_file(
        dir.path(),
        "bad-profile.toml",
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/firmware-profiles/nvme.toml"
        ))
        .unwrap()
        .replace(
            "logical_block_size_bytes = 4096",
            "logical_block_size_bytes = 3000",
        ),
    );
    let with_profile = write_file(dir.path(), "uses-profile.toml", &format!("[[device]]\nname = \"d\"\nkind = \"ram\"\nsize_bytes = 67108864\nprofile = \"{profile}\"\n"));
    assert_config_error(
        &["serve", "--config", &with_profile],
        "logical_block_size_bytes",
    );

    let too_big = write_file(
        dir.path(),
        "too-big.toml",
        "[[device]]\nname = \"d\"\nkind = \"ram\"\nsize_bytes = 67108864\n[[volume]]\nname = \"v\"\ndevice = \"d\"\nsize_bytes = 1073741824\n",
    );
    assert_config_error(&["serve", "--config", &too_big], "larger than device");

    let syntax = write_file(dir.path(), "syntax.toml", "[[device]\nname = ");
    assert_config_error(&["serve", "--config", &syntax], "syntax.toml");
    assert_config_error(
        &["serve", "--config", "/nonexistent/ringblock.toml"],
        "cannot read",
    );
    assert_config_error(&["profile", "show", "no-such-profile"], "no-such-profile");

    // A file that holds something else is never overwritten.
    let foreign = dir.path().join("foreign.img");
    std::fs::write(&foreign, vec![0xAB; 8 << 20]).unwrap();
    let cfg = write_file(
        dir.path(),
        "foreign.toml",
        &format!(
            "[[device]]\nname = \"d\"\nkind = \"file\"\npath = \"{}\"\n",
            foreign.display()
        ),
    );
    assert_config_error(&["serve", "--config", &cfg], "refusing to overwrite");
    assert!(std::fs::read(&foreign).unwrap().iter().all(|&b| b == 0xAB));
}

#[test]
fn a_replicated_primary_serves_and_the_node_id_is_kept() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let secret = write_file(
        dir.path(),
        "cluster.secret",
        "a cluster secret of more than sixteen bytes\n",
    );
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let other = "0123456789abcdef0123456789abcdef";
    let base = format!(
        "[[device]]\nname = \"d\"\nkind = \"ram\"\nsize_bytes = 67108864\n\
         [[volume]]\nname = \"v\"\ndevice = \"d\"\nsize_bytes = 1048576\n\
         [web]\nstate_dir = \"{}\"\n",
        state.display()
    );
    let replicated_text = format!(
        "[[device]]\nname = \"d\"\nkind = \"ram\"\nsize_bytes = 67108864\n\
         [[volume]]\nname = \"v\"\ndevice = \"d\"\nsize_bytes = 1048576\nrole = \"primary\"\n\
         [[volume.replica]]\nnode = \"{other}\"\naddress = \"127.0.0.1:9\"\nmode = \"sync\"\n\
         [web]\nstate_dir = \"{}\"\n\
         [peer]\ncluster_id = \"lab\"\nsecret_file = \"{secret}\"\nlisten = \"127.0.0.1:0\"\n",
        state.display()
    );
    let replicated = write_file(dir.path(), "replicated.toml", &replicated_text);
    // check-config shows the replica set and creates nothing.
    let (code, out, err) = run(&["check-config", &replicated]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("copy on node {other} at 127.0.0.1:9 (sync)")),
        "{out}"
    );
    assert!(out.contains("volume v: role primary"), "{out}");
    assert!(out.contains("made at the first start"), "{out}");
    assert!(!state.join("node-id").exists());
    // A replica named by a node name is refused with the fix.
    let named = write_file(
        dir.path(),
        "named.toml",
        &replicated_text.replace(other, "right"),
    );
    assert_config_error(&["check-config", &named], "replicas are named by node id");
    // serve makes the node id and serves the primary copy; its replica is not reachable, so
    // the link keeps trying while the daemon runs.
    let d = Daemon::start(&[
        "--config",
        &replicated,
        "--no-web",
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(
        d.stdout_lines
            .iter()
            .any(|l| l.contains("volume v is replicated here as the primary")),
        "{:?}",
        d.stdout_lines
    );
    assert!(
        d.stdout_lines
            .iter()
            .any(|l| l.contains("peer listening on 127.0.0.1:")),
        "{:?}",
        d.stdout_lines
    );
    let rest = d.stop();
    assert!(
        rest.iter().any(|l| l.contains("stopped cleanly")),
        "{rest:?}"
    );
    let id = std::fs::read_to_string(state.join("node-id")).unwrap();
    assert_eq!(id.trim().len(), 32, "{id:?}");
    let mode = std::fs::metadata(state.join("node-id"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let (code, out, _) = run(&["check-config", &replicated]);
    assert_eq!(code, 0);
    assert!(out.contains(&format!("node id {}", id.trim())), "{out}");
    // Naming this node as its own replica is refused.
    let own = write_file(
        dir.path(),
        "own.toml",
        &replicated_text.replace(other, id.trim()),
    );
    assert_config_error(&["check-config", &own], "is this node");
    let plain = write_file(dir.path(), "plain.toml", &base);
    // A damaged node id stops the daemon even without replicas, and is left as it was.
    std::fs::write(state.join("node-id"), "garbage\n").unwrap();
    assert_config_error(&["serve", "--config", &plain, "--no-web"], "is damaged");
    assert_eq!(
        std::fs::read_to_string(state.join("node-id")).unwrap(),
        "garbage\n"
    );
}

#[test]
fn cli_basics() {
    let (code, out, _) = run(&["--version"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("ringblock "));
    let (code, out, _) = run(&["profile", "list"]);
    assert_eq!(code, 0);
    for p in ["nvme", "flash", "bbram"] {
        assert!(out.contains(p), "{out}");
    }
    let (code, out, _) = run(&["profile", "show", "nvme"]);
    assert_eq!(code, 0);
    assert!(out.contains("queue_depth"), "{out}");
}

#[test]
fn idle_daemon_uses_under_two_percent_of_a_core() {
    // The embedded default, on a free port (the default port is the next test's).
    let d = Daemon::start(&["--listen", "127.0.0.1:0"]);
    assert!(
        d.stdout_lines
            .iter()
            .any(|l| l.contains("volume default on ram0")),
        "{:?}",
        d.stdout_lines
    );
    // Let start-up settle, then measure over a bounded window. A resource check, not a speed one.
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let before = cpu_ticks(d.pid());
    let window = std::time::Duration::from_secs(5);
    std::thread::sleep(window);
    let used_s = (cpu_ticks(d.pid()) - before) as f64 / ticks_per_s;
    let share = used_s / window.as_secs_f64();
    assert!(
        share < 0.02,
        "idle daemon used {:.1}% of a core",
        share * 100.0
    );
    let rest = d.stop();
    assert!(
        rest.iter().any(|l| l.contains("stopped cleanly")),
        "{rest:?}"
    );
}

#[test]
fn file_volume_is_found_again_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_file(
        dir.path(),
        "file.toml",
        &format!(
            "cores = [0]\n[[device]]\nname = \"disk0\"\nkind = \"file\"\npath = \"{}/disk0.img\"\nsize_bytes = 268435456\nprofile = \"nvme\"\n[[volume]]\nname = \"vol1\"\ndevice = \"disk0\"\nsize_bytes = 134217728\n",
            dir.path().display()
        ),
    );
    let d = Daemon::start(&["--config", &cfg, "--listen", "127.0.0.1:0"]);
    d.stop();
    let d = Daemon::start(&["--config", &cfg, "--listen", "127.0.0.1:0"]);
    assert!(
        d.stdout_lines
            .iter()
            .any(|l| l.contains("volume vol1 on disk0 (134217728 bytes")),
        "{:?}",
        d.stdout_lines
    );
    d.stop();
}

/// The one test that uses the default port: `ringblock` with no arguments exports `default`
/// on 127.0.0.1:10809.
#[test]
fn embedded_default_exports_default_on_10809() {
    let d = Daemon::start(&[]);
    assert!(
        d.stdout_lines
            .iter()
            .any(|l| l == "ringblock: nbd listening on 127.0.0.1:10809"),
        "{:?}",
        d.stdout_lines
    );
    let out = common::run_tool(
        60,
        "nbdinfo",
        &["--size", "nbd://127.0.0.1:10809/default"],
        &[],
    );
    assert!(out.ok(), "nbdinfo failed: {out:?}");
    assert_eq!(out.stdout.trim(), "1073741824");
    d.stop();
}

/// Patterns written over NBD to a file-backed volume (flushed) read back after a restart of the
/// daemon, and after a `kill -9` for writes that were flushed before it.
#[test]
fn nbd_writes_survive_daemon_restart_and_kill() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_file(
        dir.path(),
        "file.toml",
        &format!(
            "[[device]]\nname = \"disk0\"\nkind = \"file\"\npath = \"{}/disk0.img\"\nsize_bytes = 268435456\n[[volume]]\nname = \"vol1\"\ndevice = \"disk0\"\nsize_bytes = 134217728\n",
            dir.path().display()
        ),
    );
    let sock = dir.path().join("nbd.sock");
    let sock = sock.to_str().unwrap();
    let uri = format!("nbd+unix:///vol1?socket={sock}");
    let qemu_io = |cmds: &[&str]| {
        let mut args = vec!["-f", "raw"];
        for c in cmds {
            args.push("-c");
            args.push(c);
        }
        args.push(&uri);
        let out = common::run_tool(120, "qemu-io", &args, &[]);
        assert!(
            out.ok()
                && !out.stdout.contains("failed")
                && !out.stdout.contains("Pattern verification failed"),
            "qemu-io {cmds:?}: {out:?}"
        );
    };
    let d = Daemon::start(&["--config", &cfg, "--listen", "127.0.0.1:0", "--unix", sock]);
    qemu_io(&[
        "write -P 0x11 0 1M",
        "write -P 0x22 5M 64k",
        "write -P 0x33 100M 4k",
        "flush",
    ]);
    d.stop();
    let d = Daemon::start(&["--config", &cfg, "--listen", "127.0.0.1:0", "--unix", sock]);
    qemu_io(&[
        "read -P 0x11 0 1M",
        "read -P 0x22 5M 64k",
        "read -P 0x33 100M 4k",
        "read -P 0 2M 1M",
    ]);
    // Flushed before a crash of the daemon: still there after it.
    qemu_io(&["write -P 0x44 7M 128k", "flush"]);
    d.kill();
    let d = Daemon::start(&["--config", &cfg, "--listen", "127.0.0.1:0", "--unix", sock]);
    qemu_io(&["read -P 0x44 7M 128k", "read -P 0x11 0 1M"]);
    d.stop();
}

/// A replica copy on a file device: never exported (a real NBD client is told why), its
/// persisted role wins over the configuration's (with a warning naming the command), and
/// its replication record is never served as a plain volume.
#[test]
fn a_replica_copy_keeps_its_role_and_is_never_exported() {
    use ringblock_transports::nbd::client::{Client, ClientError, Options};
    use ringblock_transports::nbd::wire::REP_ERR_POLICY;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let secret = write_file(
        dir.path(),
        "cluster.secret",
        "a secret of at least sixteen bytes",
    );
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let volume = format!(
        "cores = [0]\n[[device]]\nname = \"disk0\"\nkind = \"file\"\npath = \"{}/disk0.img\"\n\
         size_bytes = 268435456\n[[volume]]\nname = \"v\"\ndevice = \"disk0\"\n\
         size_bytes = 16777216\n",
        dir.path().display()
    );
    let web = format!("[web]\nstate_dir = \"{}/state\"\n", dir.path().display());
    let plain = format!("{volume}{web}");
    let replicated = |role: &str| {
        format!(
            "{volume}role = \"{role}\"\n\
             [[volume.replica]]\nnode = \"0123456789abcdef0123456789abcdef\"\n\
             address = \"127.0.0.1:9\"\n\
             [peer]\ncluster_id = \"lab\"\nsecret_file = \"{secret}\"\nlisten = \"127.0.0.1:0\"\n\
             {web}"
        )
    };
    let as_replica = write_file(dir.path(), "replica.toml", &replicated("replica"));
    let d = Daemon::start(&[
        "--config",
        &as_replica,
        "--no-web",
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(
        d.stdout_lines
            .iter()
            .any(|l| l.contains("volume v is replicated here as a replica (not exported)")),
        "{:?}",
        d.stdout_lines
    );
    let (tcp, _) = common::nbd_endpoints(&d);
    let tcp = tcp.expect("an NBD TCP address");
    let tcp = tcp.trim_start_matches("nbd://").trim_end_matches('/');
    match Client::connect_tcp(tcp, "v", Options::default()) {
        Err(ClientError::Refused { reply, message, .. }) => {
            assert_eq!(reply, REP_ERR_POLICY);
            assert!(message.contains("replica copy"), "{message}");
        }
        other => panic!("a replica copy was exported: {other:?}"),
    }
    d.stop();
    // The configuration now says primary: the persisted role wins, with a warning.
    let as_primary = write_file(dir.path(), "primary.toml", &replicated("primary"));
    let log = dir.path().join("stderr.log");
    let d = Daemon::start_with_stderr(
        &[
            "--config",
            &as_primary,
            "--no-web",
            "--listen",
            "127.0.0.1:0",
        ],
        std::fs::File::create(&log).unwrap().into(),
    );
    assert!(
        d.stdout_lines
            .iter()
            .any(|l| l.contains("volume v is replicated here as a replica")),
        "{:?}",
        d.stdout_lines
    );
    d.stop();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(stderr.contains("ringblock volume promote"), "{stderr}");
    // Without its [[volume.replica]] entries the volume is refused, not served plainly.
    let without = write_file(dir.path(), "plain.toml", &plain);
    assert_config_error(
        &[
            "serve",
            "--config",
            &without,
            "--no-web",
            "--listen",
            "127.0.0.1:0",
        ],
        "has a replication record",
    );
}

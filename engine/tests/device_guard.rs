//! The engine guards its device files: a deleted backing file is noticed and fails flushes, and
//! a device whose state record says it held volumes is never formatted when it comes back
//! blank or missing.

use std::path::Path;
use std::sync::atomic::Ordering;

use ringblock_engine::{DeviceConfig, DeviceKind, Engine, EngineConfig, FormatPolicy};

const MIB: u64 = 1 << 20;

fn config(img: &Path, state_dir: &Path) -> EngineConfig {
    EngineConfig {
        cores: vec![],
        devices: vec![DeviceConfig {
            name: "d0".into(),
            kind: DeviceKind::File,
            path: Some(img.to_path_buf()),
            size_bytes: Some(32 * MIB),
            profile: None,
            chunk_size_bytes: MIB,
            format: FormatPolicy::IfBlank,
            emulate_profile_latency: false,
            fault: None,
        }],
        poll_idle_us: Some(20),
        queue_depth: Some(64),
        zero_copy_sends: None,
        state_dir: Some(state_dir.to_path_buf()),
    }
}

#[test]
fn a_deleted_backing_file_fails_every_flush_from_then_on() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d0.img");
    let engine = Engine::start(&config(&img, &dir.path().join("state"))).unwrap();
    engine.create_volume("d0", "v", 8 * MIB).unwrap();
    engine.flush_all().unwrap();
    std::fs::remove_file(&img).unwrap();
    // flush_all checks before it flushes (the watchdog would notice within a second too).
    let e = engine.flush_all().unwrap_err().to_string();
    assert!(e.contains("flush failed"), "{e}");
    let health = &engine.devices()[0].health;
    assert!(health.backing_deleted.load(Ordering::Acquire));
    assert!(health.flush_errors.load(Ordering::Acquire) > 0);
    // A metadata change cannot be made durable either.
    assert!(engine.create_volume("d0", "w", MIB).is_err());
    assert!(engine.flush_all().is_err(), "stays failed");
}

#[test]
fn a_device_that_held_volumes_is_not_formatted_when_it_comes_back_empty() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d0.img");
    let state = dir.path().join("state");
    let cfg = config(&img, &state);
    let engine = Engine::start(&cfg).unwrap();
    engine.create_volume("d0", "v", 8 * MIB).unwrap();
    engine.shutdown().unwrap();
    // Missing: the start creates a file, refuses to format it, and removes it again.
    std::fs::remove_file(&img).unwrap();
    let e = Engine::start(&cfg).err().expect("refused").to_string();
    assert!(
        e.contains("state record") && e.contains("held 1 volume(s)"),
        "{e}"
    );
    assert!(!img.exists(), "the file this start created is removed");
    // Blank (an empty file of the right size): refused too, and left as it was.
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    let e = Engine::start(&cfg).err().expect("refused").to_string();
    assert!(e.contains("is blank, but"), "{e}");
    assert!(img.exists(), "a file this start did not create stays");
    // format = "always" is the operator's explicit decision to start over.
    let mut always = cfg.clone();
    always.devices[0].format = FormatPolicy::Always;
    let engine = Engine::start(&always).unwrap();
    assert!(engine.volumes().is_empty());
    engine.shutdown().unwrap();
    // The record now says the device holds no volumes: if-blank works again.
    let engine = Engine::start(&cfg).unwrap();
    engine.shutdown().unwrap();
}

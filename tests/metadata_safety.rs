//! The real daemon on a file device whose newest metadata slot is damaged after an
//! acknowledged change: the change survives (every metadata round writes both slots before it
//! answers), the daemon warns naming both generations, the device's health says so, and the
//! next metadata round repairs the slot and clears the warning.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Stdio;

use common::{http_auth, start_with_web, web_endpoint, write_file, Daemon};
use serde_json::json;

const MIB: u64 = 1 << 20;

/// Where the label (meta.rs) says slot `i` is: the label is 4 KiB; `slot_bytes` is the u64 at
/// byte 40 of it; slot i starts at 4096 + i * slot_bytes.
fn slot_offset(image: &File, slot: u64) -> u64 {
    let mut label = [0u8; 64];
    image.read_exact_at(&mut label, 0).unwrap();
    assert_eq!(&label[..8], b"RBLABEL1", "not a ringblock device");
    let slot_bytes = u64::from_le_bytes(label[40..48].try_into().unwrap());
    4096 + slot * slot_bytes
}

/// A slot's generation (u64 at byte 16 of its header).
fn slot_generation(image: &File, slot: u64) -> u64 {
    let mut header = [0u8; 32];
    image
        .read_exact_at(&mut header, slot_offset(image, slot))
        .unwrap();
    assert_eq!(&header[..8], b"RBMETA01", "slot {slot} has no slot header");
    u64::from_le_bytes(header[16..24].try_into().unwrap())
}

/// The log without terminal colours.
fn read_log(path: &Path) -> String {
    let raw = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip a CSI sequence: ESC [ ... final byte in @..~.
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn volume_names(addr: &str, token: &str) -> Vec<String> {
    let r = http_auth(addr, token, "GET", "/api/volumes", &[], None);
    assert_eq!(r.status, 200, "{r:?}");
    r.json()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

fn device_health(addr: &str, token: &str) -> serde_json::Value {
    let r = http_auth(addr, token, "GET", "/api/devices", &[], None);
    assert_eq!(r.status, 200, "{r:?}");
    r.json()[0]["health"].clone()
}

#[test]
fn a_corrupt_newest_slot_does_not_undo_an_acknowledged_delete() {
    let dir = tempfile::tempdir().unwrap();
    let image_path = dir.path().join("d0.img");
    let cfg = write_file(
        dir.path(),
        "meta.toml",
        &format!(
            "[[device]]\nname = \"d0\"\nkind = \"file\"\npath = \"{}\"\nsize_bytes = 67108864\n",
            image_path.display()
        ),
    );
    let state = dir.path().join("state");
    let (daemon, addr, token) = start_with_web(Some(&cfg), &state);
    let create = |name: &str| {
        let body = json!({"name": name, "device": "d0", "size_bytes": 8 * MIB}).to_string();
        let r = http_auth(
            &addr,
            &token,
            "POST",
            "/api/volumes",
            &[],
            Some(body.as_bytes()),
        );
        assert_eq!(r.status, 201, "{r:?}");
    };
    create("keeper");
    create("doomed");
    let r = http_auth(&addr, &token, "DELETE", "/api/volumes/doomed", &[], None);
    assert_eq!(r.status, 204, "{r:?}");
    // A crash right after the answer.
    daemon.kill();

    let image = File::options()
        .read(true)
        .write(true)
        .open(&image_path)
        .unwrap();
    let generations = [slot_generation(&image, 0), slot_generation(&image, 1)];
    let newest = u64::from(generations[1] > generations[0]);
    let (new_gen, old_gen) = (
        generations[newest as usize],
        generations[newest as usize ^ 1],
    );
    // One byte of the newest slot's payload (the volume count, just after the 32-byte header).
    let at = slot_offset(&image, newest) + 32;
    let mut byte = [0u8; 1];
    image.read_exact_at(&mut byte, at).unwrap();
    image.write_all_at(&[byte[0] ^ 0x04], at).unwrap();
    image.sync_all().unwrap();
    drop(image);

    let log_path = dir.path().join("restart.log");
    let log = File::create(&log_path).unwrap();
    let args = [
        "--config",
        &cfg,
        "--listen",
        "127.0.0.1:0",
        "--web-listen",
        "127.0.0.1:0",
        "--state-dir",
        state.to_str().unwrap(),
    ];
    let daemon = Daemon::start_with_stderr(&args, Stdio::from(log));
    let (addr, _) = web_endpoint(&daemon);
    let names = volume_names(&addr, &token);
    assert!(
        !names.contains(&"doomed".to_string()),
        "the acknowledged delete was undone: {names:?}"
    );
    assert!(names.contains(&"keeper".to_string()), "{names:?}");
    let log = read_log(&log_path);
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("metadata slot"))
        .unwrap_or_else(|| panic!("no metadata warning in the log:\n{log}"));
    assert!(
        warning.contains(&format!("slot {newest} (generation {new_gen})"))
            && warning.contains(&format!("generation {old_gen}"))
            && warning.contains("checksum mismatch"),
        "the warning must name both generations and the reason: {warning}"
    );
    let health = device_health(&addr, &token);
    assert_eq!(health["status"], "warning", "{health}");
    assert!(
        health["metadata_warning"]
            .as_str()
            .is_some_and(|w| w.contains(&format!("generation {new_gen}"))),
        "{health}"
    );

    // The next metadata round rewrites both slots: the warning clears, and says so.
    let body = json!({"name": "after", "device": "d0", "size_bytes": 8 * MIB}).to_string();
    let r = http_auth(
        &addr,
        &token,
        "POST",
        "/api/volumes",
        &[],
        Some(body.as_bytes()),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let health = device_health(&addr, &token);
    assert_eq!(health["status"], "ok", "{health}");
    assert!(health["metadata_warning"].is_null(), "{health}");
    daemon.stop_clean();
    let log = read_log(&log_path);
    assert!(
        log.lines()
            .any(|l| l.contains("INFO") && l.contains("metadata warning cleared")),
        "{log}"
    );
    let image = File::open(&image_path).unwrap();
    let (g0, g1) = (slot_generation(&image, 0), slot_generation(&image, 1));
    assert_eq!(g0.abs_diff(g1), 1, "both slots rewritten: {g0}, {g1}");

    // A clean start: no warning.
    let log_path = dir.path().join("third.log");
    let log = File::create(&log_path).unwrap();
    let daemon = Daemon::start_with_stderr(&args, Stdio::from(log));
    let (addr, _) = web_endpoint(&daemon);
    let names = volume_names(&addr, &token);
    assert!(names.contains(&"after".to_string()) && !names.contains(&"doomed".to_string()));
    assert_eq!(device_health(&addr, &token)["status"], "ok");
    daemon.stop_clean();
    let log = read_log(&log_path);
    assert!(!log.contains("metadata slot"), "{log}");
}

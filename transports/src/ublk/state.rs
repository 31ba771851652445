//! A small per-volume state file recording which ublk device serves the volume, so that a
//! restarted daemon finds the device again (USER_RECOVERY). Lives under the state directory
//! (default `/run/ringblock`, a tmpfs: ublk devices do not outlive a reboot either).
//!
//! Format: `key=value` lines, written to a temporary file and renamed into place.

use std::path::{Path, PathBuf};

/// Longest state file we read (they are ~100 bytes).
const MAX_STATE_BYTES: u64 = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportState {
    pub volume: String,
    pub dev_id: u32,
    /// The marker we stored in the device's `ublksrv_flags`.
    pub marker: u64,
}

pub fn path(state_dir: &Path, volume: &str) -> PathBuf {
    state_dir.join(format!("ublk-{volume}.state"))
}

pub fn load(path: &Path) -> Option<ExportState> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_STATE_BYTES)
        .read_to_string(&mut text)
        .ok()?;
    parse(&text)
}

fn parse(text: &str) -> Option<ExportState> {
    let (mut volume, mut dev_id, mut marker) = (None, None, None);
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        match k.trim() {
            "volume" => volume = Some(v.trim().to_string()),
            "dev_id" => dev_id = v.trim().parse().ok(),
            "marker" => marker = u64::from_str_radix(v.trim().trim_start_matches("0x"), 16).ok(),
            _ => {}
        }
    }
    Some(ExportState {
        volume: volume?,
        dev_id: dev_id?,
        marker: marker?,
    })
}

pub fn save(path: &Path, st: &ExportState) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("state.tmp");
    let text = format!(
        "# ringblock ublk export: /dev/ublkb{} serves volume {}; read at start to recover the device\nvolume={}\ndev_id={}\nmarker={:#x}\n",
        st.dev_id, st.volume, st.volume, st.dev_id, st.marker
    );
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

pub fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = std::env::temp_dir().join(format!("rb-ublk-state-{}", std::process::id()));
        let p = path(&dir, "vol1");
        let st = ExportState {
            volume: "vol1".into(),
            dev_id: 7,
            marker: 0x5242_4c4b_0000_0003,
        };
        save(&p, &st).unwrap();
        assert_eq!(load(&p), Some(st));
        remove(&p);
        assert_eq!(load(&p), None);
        let _ = std::fs::remove_dir(&dir);
        assert_eq!(parse("volume=x\ndev_id=nope\nmarker=0x1\n"), None);
    }
}

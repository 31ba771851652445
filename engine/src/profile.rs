//! Firmware profiles: what a class of device looks like and how it behaves.
//!
//! A profile describes geometry (block sizes, maximum transfer, queue depth), durability
//! (volatile write cache, power-loss protection, FUA), optional commands (discard,
//! write-zeroes), service times used by the `delay` wrapper to emulate the class on a RAM or
//! file device, and reactor advice (busy-poll window, submission batching). Keys for ring
//! setups ringblock does not use yet (`iopoll`, `sqpoll`, `registered_buffers`) are accepted
//! and ignored with a warning ([`FirmwareProfile::unused_keys`]).
//!
//! Profiles live in `firmware-profiles/*.toml`; the ones shipped with ringblock are compiled
//! into the binary ([`builtin`]). Every field is explained in `firmware-profiles/README.md`.
//! Parsing never panics: bad input comes back as [`EngineError::Profile`] naming the source
//! and the offending key.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::EngineError;

/// Smallest accepted logical block size.
pub const BLOCK_SIZE_MIN_BYTES: u32 = 512;
/// Largest accepted logical or physical block size.
pub const BLOCK_SIZE_MAX_BYTES: u32 = 65536;
/// Largest accepted `max_transfer_bytes` (64 MiB).
pub const MAX_TRANSFER_LIMIT_BYTES: u32 = 64 * 1024 * 1024;
/// Largest accepted `queue_depth`.
pub const QUEUE_DEPTH_MAX: u32 = 4096;
/// Largest accepted `poll_idle_us` (one second).
pub const POLL_IDLE_MAX_US: u32 = 1_000_000;
/// Largest accepted latency figure (ten seconds): larger values are almost surely a unit
/// mistake (nanoseconds written as microseconds).
pub const LATENCY_MAX_US: u32 = 10_000_000;
/// Longest accepted profile name.
pub const NAME_MAX_BYTES: usize = 64;
/// Longest accepted description.
pub const DESCRIPTION_MAX_BYTES: usize = 1024;
/// Largest profile file [`FirmwareProfile::load`] reads; real profiles are ~2 KiB.
pub const FILE_MAX_BYTES: u64 = 1024 * 1024;

const NS_PER_US: u64 = 1_000;
const NS_PER_S: u128 = 1_000_000_000;
const BYTES_PER_MIB: u128 = 1024 * 1024;

/// A device-class profile. Field meanings, units and uses: `firmware-profiles/README.md`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FirmwareProfile {
    /// Short identifier, e.g. "nvme"; ASCII letters, digits, '-', '_', '.'.
    pub name: String,
    /// One line for humans (dashboard, `doctor`).
    pub description: String,
    /// Smallest addressable unit; power of two, 512..=65536. Requests must be aligned to it.
    pub logical_block_size_bytes: u32,
    /// Internal write unit; power of two, logical..=65536. Preferred alignment.
    pub physical_block_size_bytes: u32,
    /// Largest single request; multiple of logical, logical..=64 MiB. Larger ones are split.
    pub max_transfer_bytes: u32,
    /// Operations in flight per device ring; 1..=4096.
    pub queue_depth: u32,
    /// The device acknowledges writes from a cache that power loss can erase.
    pub volatile_write_cache: bool,
    /// Power loss cannot lose acknowledged writes (capacitors, battery).
    pub power_loss_protection: bool,
    /// The device honours Force Unit Access on individual writes.
    pub fua: bool,
    /// Discard (TRIM) unit; 0 = no discard, else a multiple of logical.
    pub discard_granularity_bytes: u32,
    /// The device has a native write-zeroes command.
    pub write_zeroes: bool,
    /// Fixed service time of one read, µs (delay wrapper); <= 10 s.
    pub read_latency_us: u32,
    /// Fixed service time of one write, µs (delay wrapper); <= 10 s.
    pub write_latency_us: u32,
    /// Service time of one FLUSH, µs (delay wrapper); <= 10 s.
    pub flush_latency_us: u32,
    /// Read streaming rate, MiB/s; 0 = unlimited.
    pub read_bandwidth_mib_s: u32,
    /// Write streaming rate, MiB/s; 0 = unlimited.
    pub write_bandwidth_mib_s: u32,
    /// How long an idle reactor busy-polls before parking, µs; <= 1 s.
    pub poll_idle_us: u32,
    /// Device operations a reactor queues before it enters the kernel to submit them: 1 =
    /// each at once, N = in groups of N, 0 (the default) = once per reactor loop turn;
    /// <= 4096.
    #[serde(default)]
    pub submit_batch: u32,
    // Ring setups ringblock does not use yet (polled completions, a kernel SQ thread, fixed
    // buffers per profile: every reactor registers its pool anyway). Accepted so profiles
    // that carry them still load; read only to warn that they are ignored; never written.
    #[serde(default, skip_serializing)]
    iopoll: Option<bool>,
    #[serde(default, skip_serializing)]
    sqpoll: Option<bool>,
    #[serde(default, skip_serializing)]
    registered_buffers: Option<bool>,
}

impl FirmwareProfile {
    /// Parse and validate; `source` names the file (or "builtin:nvme") in every error.
    pub fn from_toml_str(source: &str, text: &str) -> Result<Self, EngineError> {
        let profile: FirmwareProfile =
            toml::from_str(text).map_err(|e| profile_error(source, e.to_string()))?;
        profile.validate(source)?;
        let unused = profile.unused_keys();
        if !unused.is_empty() {
            tracing::warn!(
                "firmware profile {source}: {} not used by ringblock yet, ignored (remove to \
                 silence this)",
                unused.join(", ")
            );
        }
        Ok(profile)
    }

    /// The keys this profile sets that ringblock accepts but does not use yet.
    pub fn unused_keys(&self) -> Vec<&'static str> {
        [
            ("iopoll", self.iopoll.is_some()),
            ("sqpoll", self.sqpoll.is_some()),
            ("registered_buffers", self.registered_buffers.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect()
    }

    /// Read a profile file (at most [`FILE_MAX_BYTES`]), parse and validate it.
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        let source = path.display().to_string();
        let file = std::fs::File::open(path)
            .map_err(|e| profile_error(&source, format!("cannot open: {e}")))?;
        let mut text = String::new();
        file.take(FILE_MAX_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| profile_error(&source, format!("cannot read: {e}")))?;
        if text.len() as u64 > FILE_MAX_BYTES {
            return Err(profile_error(
                &source,
                format!("file is larger than {FILE_MAX_BYTES} bytes"),
            ));
        }
        Self::from_toml_str(&source, &text)
    }

    /// Check every limit and cross-field rule. All violations are reported in one error, each
    /// naming its key, separated by "; ".
    pub fn validate(&self, source: &str) -> Result<(), EngineError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(profile_error(source, problems.join("; ")))
        }
    }

    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();

        if self.name.is_empty()
            || self.name.len() > NAME_MAX_BYTES
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            out.push(format!(
                "name = {:?} must be 1 to {NAME_MAX_BYTES} ASCII letters, digits, '-', '_' or '.'",
                self.name
            ));
        }
        if self.description.len() > DESCRIPTION_MAX_BYTES {
            out.push(format!(
                "description is {} bytes long, more than {DESCRIPTION_MAX_BYTES}",
                self.description.len()
            ));
        }

        let logical = self.logical_block_size_bytes;
        let logical_ok = logical.is_power_of_two()
            && (BLOCK_SIZE_MIN_BYTES..=BLOCK_SIZE_MAX_BYTES).contains(&logical);
        if !logical_ok {
            out.push(format!(
                "logical_block_size_bytes = {logical} is not a power of two between \
                 {BLOCK_SIZE_MIN_BYTES} and {BLOCK_SIZE_MAX_BYTES}"
            ));
        }

        let physical = self.physical_block_size_bytes;
        if !physical.is_power_of_two()
            || !(BLOCK_SIZE_MIN_BYTES..=BLOCK_SIZE_MAX_BYTES).contains(&physical)
        {
            out.push(format!(
                "physical_block_size_bytes = {physical} is not a power of two between \
                 {BLOCK_SIZE_MIN_BYTES} and {BLOCK_SIZE_MAX_BYTES}"
            ));
        } else if logical_ok && physical < logical {
            out.push(format!(
                "physical_block_size_bytes = {physical} is smaller than \
                 logical_block_size_bytes = {logical}"
            ));
        }

        let max_transfer = self.max_transfer_bytes;
        if max_transfer > MAX_TRANSFER_LIMIT_BYTES {
            out.push(format!(
                "max_transfer_bytes = {max_transfer} is larger than {MAX_TRANSFER_LIMIT_BYTES} \
                 (64 MiB)"
            ));
        }
        // `logical` is a power of two here, so the mask tests divisibility (and `is_multiple_of`
        // would need Rust 1.87, above the workspace's rust-version).
        if logical_ok && (max_transfer < logical || max_transfer & (logical - 1) != 0) {
            out.push(format!(
                "max_transfer_bytes = {max_transfer} is not a non-zero multiple of \
                 logical_block_size_bytes = {logical}"
            ));
        }

        if !(1..=QUEUE_DEPTH_MAX).contains(&self.queue_depth) {
            out.push(format!(
                "queue_depth = {} is not between 1 and {QUEUE_DEPTH_MAX}",
                self.queue_depth
            ));
        }

        let discard = self.discard_granularity_bytes;
        if logical_ok && discard & (logical - 1) != 0 {
            out.push(format!(
                "discard_granularity_bytes = {discard} is not 0 (no discard) or a multiple of \
                 logical_block_size_bytes = {logical}"
            ));
        }

        for (key, value) in [
            ("read_latency_us", self.read_latency_us),
            ("write_latency_us", self.write_latency_us),
            ("flush_latency_us", self.flush_latency_us),
        ] {
            if value > LATENCY_MAX_US {
                out.push(format!(
                    "{key} = {value} is more than {LATENCY_MAX_US} µs (10 s); \
                     the unit is microseconds"
                ));
            }
        }

        if self.poll_idle_us > POLL_IDLE_MAX_US {
            out.push(format!(
                "poll_idle_us = {} is more than {POLL_IDLE_MAX_US} µs (1 s)",
                self.poll_idle_us
            ));
        }

        if self.submit_batch > QUEUE_DEPTH_MAX {
            out.push(format!(
                "submit_batch = {} is more than {QUEUE_DEPTH_MAX} (0 = once per loop turn)",
                self.submit_batch
            ));
        }

        out
    }

    /// Whether a FLUSH must reach stable media (false when there is no volatile cache or PLP
    /// covers it).
    pub fn flush_needs_sync(&self) -> bool {
        self.volatile_write_cache && !self.power_loss_protection
    }

    /// Service time in ns the delay wrapper adds for a read of `len` bytes
    /// (latency + len/bandwidth, rounded down, saturating).
    pub fn read_delay_ns(&self, len: u64) -> u64 {
        self.read_service(len).total_ns()
    }

    /// Service time in ns the delay wrapper adds for a write of `len` bytes
    /// (latency + len/bandwidth, rounded down, saturating).
    pub fn write_delay_ns(&self, len: u64) -> u64 {
        self.write_service(len).total_ns()
    }

    /// Service time in ns the delay wrapper adds for a FLUSH.
    pub fn flush_delay_ns(&self) -> u64 {
        u64::from(self.flush_latency_us) * NS_PER_US
    }

    /// A read's service time split into its parts (see [`ServiceTime`]).
    pub fn read_service(&self, len: u64) -> ServiceTime {
        ServiceTime::new(self.read_latency_us, self.read_bandwidth_mib_s, len)
    }

    /// A write's service time split into its parts (see [`ServiceTime`]).
    pub fn write_service(&self, len: u64) -> ServiceTime {
        ServiceTime::new(self.write_latency_us, self.write_bandwidth_mib_s, len)
    }
}

/// How long an emulated device takes for one op. A real drive overlaps the latency of many
/// queued commands (NAND dies, channels) but shares one link: the delay wrapper runs the
/// `latency_ns` of queued ops in parallel and the `transfer_ns` one after another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceTime {
    pub latency_ns: u64,
    pub transfer_ns: u64,
}

impl ServiceTime {
    fn new(latency_us: u32, bandwidth_mib_s: u32, len: u64) -> ServiceTime {
        let latency_ns = u64::from(latency_us) * NS_PER_US;
        let transfer_ns = if bandwidth_mib_s == 0 {
            0
        } else {
            // u64::MAX * 1e9 < 2^94: no overflow in u128.
            let ns = u128::from(len) * NS_PER_S / (u128::from(bandwidth_mib_s) * BYTES_PER_MIB);
            u64::try_from(ns).unwrap_or(u64::MAX)
        };
        ServiceTime {
            latency_ns,
            transfer_ns,
        }
    }

    pub fn total_ns(self) -> u64 {
        self.latency_ns.saturating_add(self.transfer_ns)
    }
}

fn profile_error(source: &str, message: String) -> EngineError {
    EngineError::Profile {
        file: PathBuf::from(source),
        message: message.trim_end().to_string(),
    }
}

/// Builtin profiles, sorted by name: (name, TOML text).
const BUILTINS: [(&str, &str); 3] = [
    ("bbram", include_str!("../../firmware-profiles/bbram.toml")),
    ("flash", include_str!("../../firmware-profiles/flash.toml")),
    ("nvme", include_str!("../../firmware-profiles/nvme.toml")),
];

const BUILTIN_NAMES: [&str; 3] = [BUILTINS[0].0, BUILTINS[1].0, BUILTINS[2].0];

/// Names of the profiles compiled into the binary, sorted.
pub fn builtin_names() -> &'static [&'static str] {
    &BUILTIN_NAMES
}

/// A profile compiled into the binary; an unknown name is an error listing the known names.
pub fn builtin(name: &str) -> Result<FirmwareProfile, EngineError> {
    let source = format!("builtin:{name}");
    let Some((_, text)) = BUILTINS.iter().find(|(n, _)| *n == name) else {
        return Err(profile_error(
            &source,
            format!(
                "no builtin profile named {name:?}; known: {}",
                builtin_names().join(", ")
            ),
        ));
    };
    let profile = FirmwareProfile::from_toml_str(&source, text)?;
    if profile.name != name {
        return Err(profile_error(
            &source,
            format!("name = {:?} does not match the builtin name", profile.name),
        ));
    }
    Ok(profile)
}

/// Look up by builtin name, or if `name_or_path` contains '/' or ends with .toml, load that
/// file.
pub fn resolve(name_or_path: &str) -> Result<FirmwareProfile, EngineError> {
    if name_or_path.contains('/') || name_or_path.ends_with(".toml") {
        FirmwareProfile::load(Path::new(name_or_path))
    } else {
        builtin(name_or_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn message(err: EngineError) -> (PathBuf, String) {
        #[allow(irrefutable_let_patterns)]
        let EngineError::Profile { file, message } = err
        else {
            panic!("expected a profile error, got {err:?}");
        };
        (file, message)
    }

    fn nvme_text() -> &'static str {
        BUILTINS[2].1
    }

    /// The nvme builtin with one `key = value` line replaced.
    fn nvme_with(key: &str, value: &str) -> String {
        let mut found = false;
        let text: Vec<String> = nvme_text()
            .lines()
            .map(|line| {
                if line.split('=').next().map(str::trim) == Some(key) {
                    found = true;
                    format!("{key} = {value}")
                } else {
                    line.to_string()
                }
            })
            .collect();
        assert!(found, "nvme.toml has no key {key}");
        text.join("\n")
    }

    fn rejected(key: &str, value: &str) -> String {
        let text = nvme_with(key, value);
        let (file, msg) = message(FirmwareProfile::from_toml_str("test.toml", &text).unwrap_err());
        assert_eq!(file, PathBuf::from("test.toml"));
        msg
    }

    #[test]
    fn every_builtin_parses_and_validates() {
        assert_eq!(builtin_names(), &["bbram", "flash", "nvme"]);
        let mut sorted = builtin_names().to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, builtin_names());
        for name in builtin_names() {
            let p = builtin(name).unwrap();
            assert_eq!(&p.name, name);
            assert!(!p.description.is_empty());
            p.validate(name).unwrap();
            assert_eq!(resolve(name).unwrap(), p);
        }
    }

    #[test]
    fn builtin_semantics() {
        let nvme = builtin("nvme").unwrap();
        assert!(!nvme.flush_needs_sync());
        assert_eq!(nvme.queue_depth, 1024);
        assert_eq!(nvme.logical_block_size_bytes, 4096);
        let flash = builtin("flash").unwrap();
        assert!(flash.flush_needs_sync());
        assert!(flash.fua);
        assert!(flash.read_latency_us > nvme.read_latency_us);
        assert!(flash.read_bandwidth_mib_s < nvme.read_bandwidth_mib_s);
        let bbram = builtin("bbram").unwrap();
        assert!(!bbram.flush_needs_sync());
        assert!(!bbram.volatile_write_cache);
        assert!(bbram.write_latency_us < nvme.write_latency_us);
    }

    #[test]
    fn flush_needs_sync_truth_table() {
        let mut p = builtin("nvme").unwrap();
        for (vwc, plp, needs) in [
            (false, false, false),
            (false, true, false),
            (true, true, false),
            (true, false, true),
        ] {
            p.volatile_write_cache = vwc;
            p.power_loss_protection = plp;
            assert_eq!(p.flush_needs_sync(), needs, "vwc={vwc} plp={plp}");
        }
    }

    #[test]
    fn unknown_builtin_lists_known_names() {
        let (file, msg) = message(builtin("tape").unwrap_err());
        assert_eq!(file, PathBuf::from("builtin:tape"));
        assert!(msg.contains("tape"), "{msg}");
        assert!(msg.contains("bbram, flash, nvme"), "{msg}");
        let (_, msg) = message(resolve("").unwrap_err());
        assert!(msg.contains("known"), "{msg}");
    }

    #[test]
    fn keys_not_used_yet_are_accepted_and_named() {
        for p in builtin_names() {
            assert!(builtin(p).unwrap().unused_keys().is_empty(), "{p}");
        }
        let text = format!(
            "{}\niopoll = true\nregistered_buffers = false\n",
            nvme_text()
        );
        let p = FirmwareProfile::from_toml_str("old.toml", &text).unwrap();
        assert_eq!(p.unused_keys(), ["iopoll", "registered_buffers"]);
        let written = toml::to_string(&p).unwrap();
        assert!(!written.contains("iopoll"), "{written}");
        assert!(rejected("submit_batch", "1\nsqpoll = 1").contains("bool"));
    }

    #[test]
    fn unknown_key_rejected_by_name() {
        let text = format!("{}\nturbo_mode = true\n", nvme_text());
        let (file, msg) = message(FirmwareProfile::from_toml_str("x.toml", &text).unwrap_err());
        assert_eq!(file, PathBuf::from("x.toml"));
        assert!(msg.contains("turbo_mode"), "{msg}");
        assert!(msg.contains("line"), "{msg}");
    }

    #[test]
    fn missing_key_and_bad_types_rejected() {
        let text: String = nvme_text()
            .lines()
            .filter(|l| !l.starts_with("queue_depth"))
            .map(|l| format!("{l}\n"))
            .collect();
        let (_, msg) = message(FirmwareProfile::from_toml_str("x", &text).unwrap_err());
        assert!(msg.contains("queue_depth"), "{msg}");
        assert!(rejected("queue_depth", "-1").contains("u32"));
        assert!(rejected("queue_depth", "\"deep\"").contains("string"));
        assert!(rejected("fua", "1").contains("bool"));
        let msg = rejected("read_latency_us", "99999999999999999999");
        assert!(msg.contains("line"), "{msg}");
    }

    #[test]
    fn syntax_error_names_line() {
        let (_, msg) = message(
            FirmwareProfile::from_toml_str("x", "name = \"a\"\nqueue_depth = \n").unwrap_err(),
        );
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn impossible_geometry_rejected_naming_key() {
        let msg = rejected("logical_block_size_bytes", "3000");
        assert!(
            msg.contains(
                "logical_block_size_bytes = 3000 is not a power of two between 512 and 65536"
            ),
            "{msg}"
        );
        let msg = rejected("logical_block_size_bytes", "256");
        assert!(msg.contains("logical_block_size_bytes = 256"), "{msg}");
        let msg = rejected("logical_block_size_bytes", "131072");
        assert!(msg.contains("logical_block_size_bytes = 131072"), "{msg}");
        let msg = rejected("physical_block_size_bytes", "512");
        assert!(
            msg.contains(
                "physical_block_size_bytes = 512 is smaller than logical_block_size_bytes = 4096"
            ),
            "{msg}"
        );
        let msg = rejected("physical_block_size_bytes", "6000");
        assert!(msg.contains("physical_block_size_bytes = 6000"), "{msg}");
        let msg = rejected("max_transfer_bytes", "6144");
        assert!(msg.contains("max_transfer_bytes = 6144 is not"), "{msg}");
        let msg = rejected("max_transfer_bytes", "0");
        assert!(msg.contains("max_transfer_bytes = 0"), "{msg}");
        let msg = rejected("max_transfer_bytes", "134217728");
        assert!(
            msg.contains("max_transfer_bytes = 134217728 is larger"),
            "{msg}"
        );
        let msg = rejected("queue_depth", "0");
        assert!(msg.contains("queue_depth = 0"), "{msg}");
        let msg = rejected("queue_depth", "4097");
        assert!(msg.contains("queue_depth = 4097"), "{msg}");
        let msg = rejected("discard_granularity_bytes", "1000");
        assert!(msg.contains("discard_granularity_bytes = 1000"), "{msg}");
        let msg = rejected("poll_idle_us", "1000001");
        assert!(msg.contains("poll_idle_us = 1000001"), "{msg}");
        let msg = rejected("submit_batch", "4097");
        assert!(msg.contains("submit_batch = 4097"), "{msg}");
        let msg = rejected("flush_latency_us", "20000000");
        assert!(msg.contains("flush_latency_us = 20000000"), "{msg}");
        let msg = rejected("name", "\"\"");
        assert!(msg.contains("name = \"\""), "{msg}");
        let msg = rejected("name", "\"a b\"");
        assert!(msg.contains("name = \"a b\""), "{msg}");
        // No discard is fine.
        FirmwareProfile::from_toml_str("x", &nvme_with("discard_granularity_bytes", "0")).unwrap();
    }

    #[test]
    fn all_problems_reported_together() {
        let mut p = builtin("nvme").unwrap();
        p.logical_block_size_bytes = 3000;
        p.queue_depth = 0;
        p.poll_idle_us = u32::MAX;
        let (file, msg) = message(p.validate("builtin:nvme").unwrap_err());
        assert_eq!(file, PathBuf::from("builtin:nvme"));
        assert!(msg.contains("logical_block_size_bytes = 3000"), "{msg}");
        assert!(msg.contains("queue_depth = 0"), "{msg}");
        assert!(msg.contains("poll_idle_us = 4294967295"), "{msg}");
    }

    #[test]
    fn delay_maths() {
        let mut p = builtin("nvme").unwrap();
        p.read_latency_us = 80;
        p.write_latency_us = 20;
        p.flush_latency_us = 5;
        p.read_bandwidth_mib_s = 1024;
        p.write_bandwidth_mib_s = 1;
        // Zero length: latency only.
        assert_eq!(p.read_delay_ns(0), 80_000);
        assert_eq!(p.write_delay_ns(0), 20_000);
        // 1 MiB at 1024 MiB/s = 1/1024 s = 976_562.5 ns, rounded down.
        assert_eq!(p.read_delay_ns(1 << 20), 80_000 + 976_562);
        // 1 GiB at 1024 MiB/s = 1 s.
        assert_eq!(p.read_delay_ns(1 << 30), 80_000 + 1_000_000_000);
        // 4 KiB at 1 MiB/s = 3_906_250 ns.
        assert_eq!(p.write_delay_ns(4096), 20_000 + 3_906_250);
        assert_eq!(p.flush_delay_ns(), 5_000);
        // Unlimited bandwidth.
        p.read_bandwidth_mib_s = 0;
        assert_eq!(p.read_delay_ns(u64::MAX), 80_000);
        // Saturates instead of overflowing.
        assert_eq!(p.write_delay_ns(u64::MAX), u64::MAX);
        p.write_latency_us = u32::MAX;
        p.write_bandwidth_mib_s = u32::MAX;
        assert_eq!(p.write_delay_ns(0), u64::from(u32::MAX) * 1000);
        // Builtins: a 4 KiB op costs latency plus a little.
        let flash = builtin("flash").unwrap();
        let d = flash.write_delay_ns(4096);
        assert!(d > 500_000 && d < 520_000, "{d}");
    }

    #[test]
    fn load_and_resolve_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mine.toml");
        std::fs::write(&path, nvme_with("name", "\"mine\"")).unwrap();
        let p = resolve(path.to_str().unwrap()).unwrap();
        assert_eq!(p.name, "mine");
        assert_eq!(FirmwareProfile::load(&path).unwrap(), p);

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, nvme_with("logical_block_size_bytes", "3000")).unwrap();
        let (file, msg) = message(resolve(bad.to_str().unwrap()).unwrap_err());
        assert_eq!(file, bad);
        assert!(msg.contains("logical_block_size_bytes = 3000"), "{msg}");

        let missing = dir.path().join("missing.toml");
        let (file, msg) = message(resolve(missing.to_str().unwrap()).unwrap_err());
        assert_eq!(file, missing);
        assert!(msg.contains("cannot open"), "{msg}");

        // A bare name ending in .toml is a path, not a builtin.
        let (file, _) = message(resolve("nvme.toml-does-not-exist.toml").unwrap_err());
        assert_eq!(file, PathBuf::from("nvme.toml-does-not-exist.toml"));

        let binary = dir.path().join("binary.toml");
        std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
        let (_, msg) = message(FirmwareProfile::load(&binary).unwrap_err());
        assert!(msg.contains("cannot read"), "{msg}");

        let huge = dir.path().join("huge.toml");
        std::fs::write(&huge, "#".repeat(FILE_MAX_BYTES as usize + 10)).unwrap();
        let (_, msg) = message(FirmwareProfile::load(&huge).unwrap_err());
        assert!(msg.contains("larger than"), "{msg}");
    }

    fn valid_profile() -> impl Strategy<Value = FirmwareProfile> {
        let geometry = (9u32..=16)
            .prop_flat_map(|log_shift| (Just(log_shift), log_shift..=16u32))
            .prop_flat_map(|(log_shift, phys_shift)| {
                let logical = 1u32 << log_shift;
                (
                    Just(logical),
                    Just(1u32 << phys_shift),
                    1..=MAX_TRANSFER_LIMIT_BYTES / logical,
                    prop_oneof![Just(0u32), 1..=1024u32],
                )
            })
            .prop_map(|(logical, physical, transfer_blocks, discard_blocks)| {
                (
                    logical,
                    physical,
                    transfer_blocks * logical,
                    discard_blocks * logical,
                )
            });
        let text = ("[A-Za-z0-9._-]{1,64}", any::<String>());
        let flags = (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>());
        let numbers = (
            1..=QUEUE_DEPTH_MAX,
            0..=LATENCY_MAX_US,
            0..=LATENCY_MAX_US,
            0..=LATENCY_MAX_US,
            any::<u32>(),
            any::<u32>(),
            0..=POLL_IDLE_MAX_US,
            0..=QUEUE_DEPTH_MAX,
        );
        (text, geometry, flags, numbers).prop_map(
            |(
                (name, description),
                (logical, physical, max_transfer, discard),
                (vwc, plp, fua, wz),
                (qd, rlat, wlat, flat, rbw, wbw, poll, batch),
            )| FirmwareProfile {
                name,
                description: description.chars().take(200).collect(),
                logical_block_size_bytes: logical,
                physical_block_size_bytes: physical,
                max_transfer_bytes: max_transfer,
                queue_depth: qd,
                volatile_write_cache: vwc,
                power_loss_protection: plp,
                fua,
                discard_granularity_bytes: discard,
                write_zeroes: wz,
                read_latency_us: rlat,
                write_latency_us: wlat,
                flush_latency_us: flat,
                read_bandwidth_mib_s: rbw,
                write_bandwidth_mib_s: wbw,
                poll_idle_us: poll,
                submit_batch: batch,
                iopoll: None,
                sqpoll: None,
                registered_buffers: None,
            },
        )
    }

    const KEYS: [&str; 18] = [
        "name",
        "description",
        "logical_block_size_bytes",
        "physical_block_size_bytes",
        "max_transfer_bytes",
        "queue_depth",
        "volatile_write_cache",
        "power_loss_protection",
        "fua",
        "discard_granularity_bytes",
        "write_zeroes",
        "read_latency_us",
        "write_latency_us",
        "flush_latency_us",
        "read_bandwidth_mib_s",
        "write_bandwidth_mib_s",
        "poll_idle_us",
        "submit_batch",
    ];

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_text(text in any::<String>()) {
            let _ = FirmwareProfile::from_toml_str("fuzz", &text);
        }

        #[test]
        fn never_panics_on_toml_like_text(text in "([a-z_]{1,30} = [-0-9a-z\".\\[\\]{}]{0,25}\n){0,30}") {
            let _ = FirmwareProfile::from_toml_str("fuzz", &text);
        }

        #[test]
        fn one_bad_value_is_caught_or_valid(
            key in proptest::sample::select(KEYS.to_vec()),
            value in prop_oneof![
                any::<i64>().prop_map(|v| v.to_string()),
                any::<u32>().prop_map(|v| v.to_string()),
                any::<bool>().prop_map(|v| v.to_string()),
                "\"[^\"\\\\\n]{0,80}\"",
                ".{0,20}",
            ],
        ) {
            let text = nvme_with(key, &value);
            match FirmwareProfile::from_toml_str("fuzz", &text) {
                Ok(p) => prop_assert!(p.validate("fuzz").is_ok()),
                Err(err) => {
                    let (file, msg) = message(err);
                    prop_assert_eq!(file, PathBuf::from("fuzz"));
                    prop_assert!(!msg.is_empty());
                }
            }
        }

        #[test]
        fn valid_profiles_round_trip(p in valid_profile()) {
            p.validate("gen").unwrap();
            let text = toml::to_string(&p).unwrap();
            let back = FirmwareProfile::from_toml_str("gen", &text).unwrap();
            prop_assert_eq!(back, p);
        }

        #[test]
        fn delay_is_monotonic_in_length(p in valid_profile(), a in any::<u64>(), b in any::<u64>()) {
            let (short, long) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(p.read_delay_ns(short) <= p.read_delay_ns(long));
            prop_assert!(p.write_delay_ns(short) <= p.write_delay_ns(long));
            prop_assert!(p.read_delay_ns(short) >= u64::from(p.read_latency_us) * 1000);
        }
    }
}

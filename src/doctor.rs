//! `ringblock doctor`: what this kernel offers ringblock, and what to do about what it lacks.

use std::path::Path;

use ringblock_transports::ublk::{self, sys};

/// One finding: ok or not, what it is, and what to do when it is not.
struct Check {
    ok: bool,
    /// Informational only: never counts as missing.
    info: bool,
    what: String,
    fix: Option<String>,
}

impl Default for Check {
    fn default() -> Self {
        Self {
            ok: true,
            info: false,
            what: String::new(),
            fix: None,
        }
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn io_uring_check() -> Check {
    let sysctl = read_trimmed("/proc/sys/kernel/io_uring_disabled");
    let ring = ringblock_engine::io_uring::IoUring::new(4);
    match (sysctl.as_deref(), ring) {
        (_, Ok(_)) => Check {
            ok: true,
            what: format!(
                "io_uring: works (kernel.io_uring_disabled = {})",
                sysctl.as_deref().unwrap_or("n/a")
            ),
            ..Check::default()
        },
        (s, Err(e)) => Check {
            ok: false,
            what: format!(
                "io_uring: cannot set up a ring: {e} (kernel.io_uring_disabled = {})",
                s.unwrap_or("n/a")
            ),
            fix: Some(
                "sysctl -w kernel.io_uring_disabled=0 (2 disables io_uring for everyone; 1 allows only members of kernel.io_uring_group); needs Linux 5.19+"
                    .into(),
            ),
            ..Check::default()
        },
    }
}

fn ublk_checks() -> Vec<Check> {
    let k = ublk::probe_kernel();
    let mut out = Vec::new();
    if !k.control_present {
        out.push(Check {
            ok: false,
            what: format!(
                "ublk: {} is missing ({})",
                ublk::CONTROL_PATH,
                if k.module_loaded {
                    "ublk_drv is loaded but the node is not there: check udev/devtmpfs"
                } else {
                    "the ublk_drv module is not loaded"
                }
            ),
            fix: Some("modprobe ublk_drv   (Linux 6.0+, CONFIG_BLK_DEV_UBLK; `[[export]] kind = \"ublk\"` needs it)".into()),
            ..Check::default()
        });
        return out;
    }
    match &k.features {
        Ok(f) => {
            out.push(Check {
                ok: true,
                what: format!(
                    "ublk: {} present, ublk_drv {}; driver features: {}",
                    ublk::CONTROL_PATH,
                    if k.module_loaded {
                        "loaded"
                    } else {
                        "built in"
                    },
                    sys::feature_names(*f).join(" ")
                ),
                ..Check::default()
            });
            for (bit, why) in ublk::WANTED_FEATURES {
                let have = f & bit != 0;
                out.push(Check {
                    ok: have,
                    what: format!(
                        "ublk {}: {}",
                        sys::feature_names(*bit).join(""),
                        if have { "yes" } else { "MISSING" }
                    ),
                    fix: (!have).then(|| format!("without it: {why}; a newer kernel has it")),
                    ..Check::default()
                });
            }
            let user_copy = k.copy_mode() == Some(ublk::CopyMode::UserCopy);
            out.push(Check {
                info: true,
                what: if user_copy {
                    "ublk copy mode: user_copy (USER_COPY: the daemon moves each request's data \
                     itself, straight between the request and RAM chunks, one copy per IO; \
                     `[ublk] user_copy = false` turns it off)"
                        .into()
                } else {
                    "ublk copy mode: tag_buffer (no USER_COPY in this kernel, 6.5+ has it: the \
                     driver copies through per-tag buffers, two copies per IO)"
                        .into()
                },
                ..Check::default()
            });
            for (bit, why) in ublk::OPTIONAL_FEATURES {
                out.push(Check {
                    info: true,
                    what: format!(
                        "ublk {}: {} ({why})",
                        sys::feature_names(*bit).join(""),
                        if f & bit != 0 {
                            "available, not used yet"
                        } else {
                            "not in this kernel"
                        }
                    ),
                    ..Check::default()
                });
            }
        }
        Err(e) => out.push(Check {
            ok: false,
            what: format!(
                "ublk: {} present but GET_FEATURES failed: {e}",
                ublk::CONTROL_PATH
            ),
            fix: Some(
                "run as root (ublk needs CAP_SYS_ADMIN); GET_FEATURES needs Linux 6.5+".into(),
            ),
            ..Check::default()
        }),
    }
    out
}

fn nbd_check() -> Check {
    let module = Path::new("/sys/module/nbd").exists();
    let dev = Path::new("/dev/nbd0").exists();
    Check {
        ok: module && dev,
        what: format!(
            "nbd (kernel client, to attach volumes locally with nbd-client): module {}, /dev/nbd0 {}",
            if module { "loaded" } else { "not loaded" },
            if dev { "present" } else { "missing" }
        ),
        fix: (!(module && dev)).then(|| {
            "modprobe nbd   (only needed on hosts that attach volumes with nbd-client; the NBD server needs nothing)".into()
        }),
        ..Check::default()
    }
}

/// Print the findings; Err when something is missing (exit status 1).
pub fn run() -> Result<(), crate::serve::Failure> {
    let kernel = read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".into());
    println!("ringblock doctor: kernel {kernel}");
    let mut checks = vec![io_uring_check()];
    checks.extend(ublk_checks());
    checks.push(nbd_check());
    let mut missing = 0;
    for c in &checks {
        let tag = match (c.info, c.ok) {
            (true, _) => "info ",
            (false, true) => "ok   ",
            (false, false) => "MISS ",
        };
        println!("  {tag} {}", c.what);
        if let Some(fix) = &c.fix {
            println!("         -> {fix}");
        }
        missing += usize::from(!c.ok && !c.info);
    }
    if missing == 0 {
        println!("ringblock doctor: everything ringblock can use is available");
        Ok(())
    } else {
        Err(crate::serve::Failure::Runtime(anyhow::anyhow!(
            "{missing} finding(s) above need attention"
        )))
    }
}

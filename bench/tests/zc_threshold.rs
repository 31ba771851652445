//! Smoke test of `ringblock-bench zc-threshold` with tiny sizes: it runs, every byte sent
//! reaches the reader (the bench fails otherwise), and it reports each transport and size. No
//! test asserts a speed.

use std::process::Command;

const BENCH: &str = env!("CARGO_BIN_EXE_ringblock-bench");

#[test]
fn zc_threshold_reports_each_transport_and_size() {
    let o = Command::new(BENCH)
        .args(["zc-threshold", "--mib", "1", "--repeat", "1"])
        .args(["--sizes-kib", "4,16", "--depth", "4"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for transport in ["Tcp:", "Unix:"] {
        let section = out
            .split(transport)
            .nth(1)
            .unwrap_or_else(|| panic!("no {transport} section:\n{out}"));
        for kib in ["4", "16"] {
            assert!(
                section
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(kib)),
                "{transport} lacks the {kib} KiB row:\n{out}"
            );
        }
    }
    // Unix sockets refuse zero-copy; the bench says so rather than failing.
    let unix = out.split("Unix:").nth(1).unwrap();
    assert!(unix.contains("zero-copy send fails"), "{out}");
}

#[test]
fn zc_threshold_refuses_a_zero_size() {
    let o = Command::new(BENCH)
        .args(["zc-threshold", "--sizes-kib", "0"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("at least 1"));
}

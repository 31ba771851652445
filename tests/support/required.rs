//! Skipping a test whose real part is missing here (a tool, `/dev/fuse`, loop devices, qemu).
//!
//! Run by hand, such a test prints `SKIPPED <test>: <reason>` and passes, so one test can be
//! tried on a machine without everything. `scripts/test-all` sets `RINGBLOCK_TESTS_REQUIRED=1`:
//! then every skip is a failure, and a full run proves that every test ran its real part.

/// The switch: set to anything but empty or `0`, a skip fails the test.
pub const TESTS_REQUIRED_ENV: &str = "RINGBLOCK_TESTS_REQUIRED";

/// Whether this run forbids skips.
pub fn tests_required() -> bool {
    std::env::var(TESTS_REQUIRED_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `test` cannot run its real part because of `reason`: says so and returns (the caller then
/// returns too), or panics when [`TESTS_REQUIRED_ENV`] forbids skips.
pub fn skip(test: &str, reason: &str) {
    let msg = format!("SKIPPED {test}: {reason}");
    if tests_required() {
        panic!(
            "{msg}; {TESTS_REQUIRED_ENV} is set, so this test must run for real \
             (scripts/test-all installs what the tests need on Debian)"
        );
    }
    println!("{msg}");
}

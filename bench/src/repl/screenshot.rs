//! `ringblock-bench repl-screenshot`: the dashboard during a real resync, in headless
//! Chromium. A primary and a sync replica on loopback; the replica suspended, `--write-mib`
//! written, resumed; once the primary reports the resync under way, Chromium loads the
//! dashboard (the token in the URL fragment, as an operator's link carries it) and saves a
//! screenshot. The resync must still run when the screenshot is taken: the command checks
//! that and fails otherwise (write more, or slow the replica with `--replica-profile`).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use super::cluster::{Replica, Setup, SetupSpec};
use crate::fio::FioJob;

#[derive(clap::Args, Debug, Clone)]
pub struct ScreenshotArgs {
    /// Where the PNG goes.
    #[arg(long, default_value = "docs/replication-resync.png")]
    pub out: PathBuf,
    /// MiB written while the replica is suspended (the resync copies them).
    #[arg(long, default_value_t = 1024)]
    pub write_mib: u64,
    /// A firmware profile whose latency the replica's RAM device emulates: on loopback a RAM
    /// replica resyncs a GiB in about two seconds, the emulated flash in about ten, so the
    /// bar stays on screen (`none` for none).
    #[arg(long, default_value = "flash")]
    pub replica_profile: String,
    /// Take the screenshot once the resync is this far (percent).
    #[arg(long, default_value_t = 40.0)]
    pub at_percent: f64,
    /// Browser window, WIDTHxHEIGHT.
    #[arg(long, default_value = "1280x1000")]
    pub window: String,
    /// The ringblock binary (default: next to this one).
    #[arg(long)]
    pub ringblock: Option<PathBuf>,
    /// The browser.
    #[arg(long, default_value = "chromium")]
    pub chromium: String,
}

fn ringblock_bin(given: Option<&PathBuf>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.clone());
    }
    let me = std::env::current_exe()?;
    let p = me.with_file_name("ringblock");
    ensure!(
        p.is_file(),
        "no ringblock binary next to {} (build it with `cargo build --release -p ringblock` or \
         pass --ringblock)",
        me.display()
    );
    Ok(p)
}

pub fn run(args: &ScreenshotArgs) -> Result<()> {
    crate::interrupt::install()?;
    ensure!(
        crate::targets::which(&args.chromium).is_some(),
        "`{}` is not installed (apt-get install chromium)",
        args.chromium
    );
    ensure!(
        crate::targets::which("fio").is_some(),
        "fio is not installed"
    );
    let bin = ringblock_bin(args.ringblock.as_ref())?;
    let dir = tempfile::Builder::new().prefix("rbb-shot-").tempdir()?;
    crate::interrupt::register_path(dir.path());
    let write_bytes = args.write_mib << 20;
    let spec = SetupSpec {
        id: "shot".into(),
        replica: Replica::Sync,
        volume_bytes: write_bytes.max(256 << 20),
        zero_copy_sends: None,
        replica_profile: (args.replica_profile != "none").then(|| args.replica_profile.clone()),
        primary_cores: "0".into(),
        replica_cores: "0".into(),
    };
    eprintln!("starting a primary and a sync replica ...");
    let setup = Setup::start(&bin, dir.path(), spec, Duration::from_secs(120))?;
    let res = shoot(args, &setup, write_bytes);
    setup.stop();
    res
}

fn shoot(args: &ScreenshotArgs, setup: &Setup, write_bytes: u64) -> Result<()> {
    setup.suspend()?;
    setup.wait_peer("suspended", Instant::now() + Duration::from_secs(60))?;
    eprintln!("replica suspended; writing {} MiB ...", write_bytes >> 20);
    let job = FioJob::new("shot-write")
        .ioengine("nbd")
        .rw("write")
        .bs_bytes(1 << 20)
        .iodepth(8)
        .runtime(None)
        .size_bytes(write_bytes)
        .direct(false)
        .extra(format!("--uri={}", setup.fio_uri()));
    job.run_raw()?;
    setup.resume()?;
    eprintln!(
        "resumed; waiting for the resync to reach {} % ...",
        args.at_percent
    );
    let until = Instant::now() + Duration::from_secs(300);
    loop {
        crate::interrupt::check()?;
        let p = setup.peer()?;
        if let Some(r) = &p.resync {
            if r.total_bytes > 0
                && r.done_bytes as f64 * 100.0 / r.total_bytes as f64 >= args.at_percent
            {
                break;
            }
        } else if p.state == "up-to-date" {
            bail!(
                "the resync ended before the screenshot: write more (--write-mib) or slow the \
                 replica (--replica-profile flash)"
            );
        }
        ensure!(
            Instant::now() < until,
            "no resync under way after 300 s ({})",
            p.state
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let token = setup.primary.token().context("no token")?;
    let url = format!("http://{}/#token={token}", setup.primary.web);
    let profile = tempfile::tempdir()?;
    let out = std::path::absolute(&args.out)?;
    let status = Command::new(&args.chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--virtual-time-budget=4000",
            &format!("--window-size={}", args.window.replace('x', ",")),
            &format!("--user-data-dir={}", profile.path().display()),
            &format!("--screenshot={}", out.display()),
            &url,
        ])
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running chromium")?;
    ensure!(status.success(), "chromium failed: {status}");
    let p = setup.peer()?;
    ensure!(
        p.resync.is_some(),
        "the resync ended before Chromium took the screenshot: write more (--write-mib) or \
         slow the replica (--replica-profile flash)"
    );
    eprintln!(
        "wrote {} (the resync at {} after it)",
        out.display(),
        p.resync
            .as_ref()
            .map_or_else(String::new, ringblock_web::replication_view::resync_text)
    );
    Ok(())
}

//! Lean random-read drivers of a volume: `iodepth` requests always in flight, each buffer
//! resubmitted as soon as its completion comes back.
//!
//! The same [`ReadLoop`] runs in two places:
//! - [`drive_on_thread`]: a thread of its own, submitting through [`VolumeHandle::submit`] and
//!   woken through its [`Port`] ([`PortWaker::Thread`]) after a short spin;
//! - [`ReadTask`]: a [`ReactorTask`] hosted on a reactor, as transports run, submitting through
//!   [`TaskCtx::submit`] (parts for chunks that reactor owns start inline, no core crossing).

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use ringblock_engine::task::{ReactorTask, RingCompletion, TaskCtx};
use ringblock_engine::{
    AlignedBuf, Completion, IoBuf, Port, PortWaker, RegisteredPool, Request, RequestKind,
    VolumeHandle,
};

/// Longest a request may take before a driver gives up (a stuck engine must not hang).
pub const STUCK_AFTER: Duration = Duration::from_secs(30);

/// Where read buffers come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Buffers {
    /// `IoBuf::owned(AlignedBuf)`: plain heap memory (the kernel pins its page per IO).
    Owned,
    /// Leases from a reactor's registered pool (the engine reads into them with ReadFixed).
    Registered,
}

/// The request stream and its bookkeeping, independent of who runs it.
pub struct ReadLoop {
    block_bytes: u64,
    blocks: u64,
    rng: SmallRng,
    started: Vec<Instant>,
    pub measure_from: Instant,
    pub deadline: Instant,
    in_flight: usize,
    stop: bool,
    /// Completions inside `[measure_from, deadline)`.
    pub ios: u64,
    /// Submit-to-completion latency of those completions, in ns.
    pub hist: Histogram<u64>,
}

impl ReadLoop {
    pub fn new(
        region_bytes: u64,
        block_bytes: usize,
        iodepth: usize,
        seed: u64,
        measure_from: Instant,
        deadline: Instant,
    ) -> Result<Self> {
        let block_bytes = block_bytes as u64;
        let blocks = region_bytes / block_bytes;
        ensure!(iodepth > 0 && blocks > 0, "nothing to drive");
        Ok(Self {
            block_bytes,
            blocks,
            rng: SmallRng::seed_from_u64(seed),
            started: vec![Instant::now(); iodepth],
            measure_from,
            deadline,
            in_flight: 0,
            stop: false,
            ios: 0,
            hist: Histogram::new_with_bounds(1, 60_000_000_000, 3)?,
        })
    }

    pub fn iodepth(&self) -> usize {
        self.started.len()
    }

    /// A read of a random block into `buf`, tagged `tag`, counted as in flight from `now`.
    pub fn request(&mut self, tag: usize, buf: IoBuf, now: Instant) -> Request {
        self.started[tag] = now;
        self.in_flight += 1;
        Request {
            kind: RequestKind::Read,
            offset_bytes: self.rng.gen_range(0..self.blocks) * self.block_bytes,
            len_bytes: self.block_bytes,
            fua: false,
            buf: Some(buf),
            mover: None,
            tag: tag as u64,
        }
    }

    /// Account a completion seen at `now`; returns its tag and buffer to go again, or `None`
    /// once the run is over.
    pub fn complete(&mut self, c: Completion, now: Instant) -> Result<Option<(usize, IoBuf)>> {
        self.in_flight -= 1;
        if let Err(e) = c.result {
            bail!("read failed: {e}");
        }
        let buf = c.buf.context("read buffer not returned")?;
        let tag = c.tag as usize;
        if now >= self.measure_from && now < self.deadline {
            let ns = now.duration_since(self.started[tag]).as_nanos() as u64;
            self.hist.record(ns.max(1))?;
            self.ios += 1;
        }
        if self.stop || now >= self.deadline {
            return Ok(None);
        }
        Ok(Some((tag, buf)))
    }

    /// Submit nothing more.
    pub fn stop(&mut self) {
        self.stop = true;
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Past the deadline (or stopped) and drained.
    pub fn done(&self, now: Instant) -> bool {
        (self.stop || now >= self.deadline) && self.in_flight == 0
    }

    /// Longest wait of a request in flight.
    pub fn oldest_wait(&self, now: Instant) -> Duration {
        if self.in_flight == 0 {
            return Duration::ZERO;
        }
        self.started
            .iter()
            .map(|s| now.saturating_duration_since(*s))
            .max()
            .unwrap_or_default()
    }
}

fn new_buffer(pool: Option<&Arc<RegisteredPool>>, block_bytes: usize) -> IoBuf {
    pool.and_then(|p| p.take(block_bytes))
        .unwrap_or_else(|| IoBuf::owned(AlignedBuf::zeroed(block_bytes)))
}

/// What the thread driver saw besides the loop's own counts.
pub struct ThreadDriven {
    /// Times it found its port empty after spinning and parked.
    pub parks: u64,
}

/// Run `lp` on the calling thread until done. `at_window` is called once when the measured
/// window opens and once when it closes (for CPU and scheduler marks).
pub fn drive_on_thread(
    handle: &VolumeHandle,
    lp: &mut ReadLoop,
    pool: Option<&Arc<RegisteredPool>>,
    block_bytes: usize,
    spin: Duration,
    mut at_window: impl FnMut() -> Result<()>,
) -> Result<ThreadDriven> {
    let qd = lp.iodepth();
    let port: Arc<Port> = Port::new(qd, PortWaker::Thread(std::thread::current()));
    let submit = |req: Request| {
        handle
            .submit(req, &port)
            .map_err(|(_, e)| anyhow::anyhow!("read refused: {e}"))
    };
    for tag in 0..qd {
        let req = lp.request(tag, new_buffer(pool, block_bytes), Instant::now());
        submit(req)?;
    }
    let (mut opened, mut closed) = (false, false);
    let mut parks = 0u64;
    let mut last_progress = Instant::now();
    loop {
        let mut got = 0usize;
        while let Some(c) = port.pop() {
            let now = Instant::now();
            got += 1;
            if let Some((tag, buf)) = lp.complete(c, now)? {
                submit(lp.request(tag, buf, now))?;
            }
        }
        let now = Instant::now();
        if !opened && now >= lp.measure_from {
            opened = true;
            at_window()?;
        }
        if !closed && now >= lp.deadline {
            closed = true;
            at_window()?;
        }
        if lp.done(now) {
            break;
        }
        if got > 0 {
            last_progress = now;
            continue;
        }
        ensure!(
            lp.oldest_wait(now) < STUCK_AFTER,
            "no completion for {STUCK_AFTER:?} with {} reads in flight",
            lp.in_flight()
        );
        if now.duration_since(last_progress) < spin {
            std::hint::spin_loop();
            continue;
        }
        // The port unparks us on every delivery; the timeout only bounds a lost race.
        parks += 1;
        std::thread::park_timeout(Duration::from_millis(1));
    }
    Ok(ThreadDriven { parks })
}

/// The read loop as a reactor task. Its result goes to `done` when it finishes.
pub struct ReadTask {
    handle: VolumeHandle,
    lp: Option<ReadLoop>,
    buffers: Buffers,
    block_bytes: usize,
    port: Option<Arc<Port>>,
    done: mpsc::Sender<Result<ReadLoop>>,
    finished: bool,
}

impl ReadTask {
    pub fn new(
        handle: VolumeHandle,
        lp: ReadLoop,
        buffers: Buffers,
        block_bytes: usize,
        done: mpsc::Sender<Result<ReadLoop>>,
    ) -> Self {
        Self {
            handle,
            lp: Some(lp),
            buffers,
            block_bytes,
            port: None,
            done,
            finished: false,
        }
    }

    fn finish(&mut self, r: Result<ReadLoop>) {
        let _ = self.done.send(r);
        self.finished = true;
    }

    fn step(&mut self, ctx: &mut TaskCtx<'_>, lp: &mut ReadLoop) -> Result<usize> {
        let port = match &self.port {
            Some(p) => p.clone(),
            None => {
                let port = Port::new(lp.iodepth(), ctx.port_waker());
                self.port = Some(port.clone());
                for tag in 0..lp.iodepth() {
                    let buf = match self.buffers {
                        Buffers::Registered => ctx.take_buffer(self.block_bytes),
                        Buffers::Owned => None,
                    }
                    .unwrap_or_else(|| IoBuf::owned(AlignedBuf::zeroed(self.block_bytes)));
                    let req = lp.request(tag, buf, Instant::now());
                    ctx.submit(&self.handle, req, &port)
                        .map_err(|(_, e)| anyhow::anyhow!("read refused: {e}"))?;
                }
                port
            }
        };
        let mut work = 0;
        // Bounded: the port holds at most `iodepth` completions.
        while let Some(c) = port.pop() {
            let now = Instant::now();
            work += 1;
            if let Some((tag, buf)) = lp.complete(c, now)? {
                let req = lp.request(tag, buf, now);
                ctx.submit(&self.handle, req, &port)
                    .map_err(|(_, e)| anyhow::anyhow!("read refused: {e}"))?;
            }
        }
        let now = Instant::now();
        ensure!(
            lp.oldest_wait(now) < STUCK_AFTER,
            "no completion for {STUCK_AFTER:?} with {} reads in flight",
            lp.in_flight()
        );
        Ok(work)
    }
}

impl ReactorTask for ReadTask {
    fn poll(&mut self, ctx: &mut TaskCtx<'_>) -> usize {
        let Some(mut lp) = self.lp.take() else {
            return 0;
        };
        match self.step(ctx, &mut lp) {
            Ok(work) => {
                if lp.done(Instant::now()) {
                    self.finish(Ok(lp));
                } else {
                    self.lp = Some(lp);
                }
                work
            }
            Err(e) if lp.in_flight() == 0 => {
                self.finish(Err(e));
                1
            }
            Err(e) => {
                // Stop submitting, drain what is in flight, then report the error.
                tracing::error!("read task: {e:#}");
                lp.stop();
                self.lp = Some(lp);
                1
            }
        }
    }

    fn on_ring(&mut self, _ctx: &mut TaskCtx<'_>, c: RingCompletion) {
        tracing::error!(
            tag = c.tag,
            "read task got a ring completion it never asked for"
        );
    }

    fn stop(&mut self, _ctx: &mut TaskCtx<'_>) {
        if let Some(lp) = self.lp.as_mut() {
            lp.stop();
        }
    }

    fn has_ready(&self) -> bool {
        self.port.as_ref().is_some_and(|p| !p.is_empty())
    }

    fn finished(&self) -> bool {
        self.finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringblock_engine::Errno;

    fn loop_for(ms_from: u64, ms_to: u64) -> (ReadLoop, Instant) {
        let t0 = Instant::now();
        let lp = ReadLoop::new(
            1 << 20,
            4096,
            2,
            7,
            t0 + Duration::from_millis(ms_from),
            t0 + Duration::from_millis(ms_to),
        )
        .unwrap();
        (lp, t0)
    }

    fn completion(req: Request, result: Result<(), Errno>) -> Completion {
        Completion {
            tag: req.tag,
            result,
            buf: req.buf,
        }
    }

    #[test]
    fn counts_only_the_window_and_stops_at_the_deadline() {
        let (mut lp, t0) = loop_for(10, 20);
        let buf = || IoBuf::owned(AlignedBuf::zeroed(4096));
        let r0 = lp.request(0, buf(), t0);
        let r1 = lp.request(1, buf(), t0);
        assert!(r0.offset_bytes.is_multiple_of(4096) && r0.offset_bytes < 1 << 20);
        assert_eq!(r1.tag, 1);
        assert_eq!(lp.in_flight(), 2);
        // Before the window: not counted, goes again.
        let again = lp.complete(completion(r0, Ok(())), t0 + Duration::from_millis(5));
        let (tag, b) = again.unwrap().unwrap();
        assert_eq!((tag, lp.ios), (0, 0));
        let r0 = lp.request(tag, b, t0 + Duration::from_millis(5));
        // Inside the window: counted with its latency.
        let again = lp.complete(completion(r1, Ok(())), t0 + Duration::from_millis(12));
        assert!(again.unwrap().is_some());
        assert_eq!(lp.ios, 1);
        assert!(lp.hist.max() >= 12_000_000);
        // After the deadline: counted no more, not resubmitted; done once drained.
        let after = t0 + Duration::from_millis(25);
        assert!(lp
            .complete(completion(r0, Ok(())), after)
            .unwrap()
            .is_none());
        assert_eq!(lp.ios, 1);
        // Tag 1 was handed back above and (in this test) not resubmitted.
        assert_eq!(lp.in_flight(), 0);
        assert!(lp.done(after));
    }

    #[test]
    fn errors_and_missing_buffers_fail_the_run() {
        let (mut lp, t0) = loop_for(0, 10);
        let r = lp.request(0, IoBuf::owned(AlignedBuf::zeroed(4096)), t0);
        assert!(lp.complete(completion(r, Err(Errno::EIO)), t0).is_err());
        let r = lp.request(1, IoBuf::owned(AlignedBuf::zeroed(4096)), t0);
        let c = Completion {
            tag: r.tag,
            result: Ok(()),
            buf: None,
        };
        assert!(lp.complete(c, t0).is_err());
        assert!(lp.done(t0 + Duration::from_millis(11)));
    }
}

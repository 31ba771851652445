//! The loop of one reactor thread: drain the inbox, reap the ring, run the hosted tasks, and
//! when nothing is left to do spin or park as [`IdlePolicy`] decides.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::idle::{IdleDecision, IdlePolicy};
use super::mesh::{ReactorShared, Shared};
use super::task::{TaskTable, MAX_RAW_OPS_PER_REACTOR, MAX_TASKS_PER_REACTOR};
use super::{Home, Msg, ReactorCore, Router};
use crate::device::OpenDevice;
use crate::error::EngineError;
use crate::ids::ReactorId;
use crate::io::delay::MonotonicClock;
use crate::io::uring::{RingConfig, UringIo};
use crate::io::{decorate, Io, ReactorIo};

/// Messages taken from the inbox per loop turn, so completions are reaped between drains.
const INBOX_BATCH: usize = 256;

/// What every reactor's ring and loop are set up with.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ReactorOptions {
    pub queue_depth: usize,
    pub poll_idle_us: u64,
    /// Whether tasks' zero-copy sends may go out zero-copy (where the ring's probe allows).
    pub zero_copy_sends: bool,
}

/// Start one reactor thread per entry of `homes` (the devices each is the home of) and wait
/// until each has set up its ring. Returns the threads and the first error a reactor met
/// while starting (the caller stops them all then).
pub(crate) fn spawn_reactors(
    shared: &Arc<Shared>,
    devices: &[Arc<OpenDevice>],
    homes: Vec<Vec<Home>>,
    opts: ReactorOptions,
) -> Result<(Vec<JoinHandle<()>>, Option<EngineError>), EngineError> {
    let n = homes.len();
    let mut threads = Vec::new();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), EngineError>>();
    for (i, home) in homes.into_iter().enumerate() {
        let shared2 = shared.clone();
        let opens = devices.to_vec();
        let tx = ready_tx.clone();
        let t = std::thread::Builder::new()
            .name(format!("reactor-{i}"))
            .spawn(move || {
                ReactorThread {
                    id: ReactorId(i as u32),
                    shared: shared2,
                    devices: opens,
                    homes: home,
                    opts,
                    ready: tx,
                }
                .run()
            })
            .map_err(|e| EngineError::Config(format!("cannot spawn reactor thread: {e}")))?;
        threads.push(t);
    }
    drop(ready_tx);
    let mut first_err = None;
    for _ in 0..n {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => first_err = first_err.or(Some(e)),
            Err(_) => {
                first_err = first_err.or(Some(EngineError::Config(
                    "a reactor died while starting".into(),
                )))
            }
        }
    }
    Ok((threads, first_err))
}

/// What a reactor thread starts from.
pub(crate) struct ReactorThread {
    pub id: ReactorId,
    pub shared: Arc<Shared>,
    /// Every open device (the ring registers them), indexed by device id.
    pub devices: Vec<Arc<OpenDevice>>,
    /// The devices this reactor is the home of.
    pub homes: Vec<Home>,
    pub opts: ReactorOptions,
    /// Told once whether the ring could be set up.
    pub ready: mpsc::Sender<Result<(), EngineError>>,
}

impl ReactorThread {
    /// Pin to the core, set up the ring, say so on `ready`, and run until the engine stops
    /// and everything in flight is done.
    pub(crate) fn run(self) {
        let ReactorThread {
            id,
            shared,
            devices,
            homes,
            opts,
            ready,
        } = self;
        let ReactorOptions {
            queue_depth,
            poll_idle_us,
            zero_copy_sends,
        } = opts;
        let me = &shared.reactors[id.0 as usize];
        if let Some(core) = me.core_id {
            if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                tracing::warn!(reactor = id.0, core, "could not pin reactor to its core");
            }
        }
        let ring = RingConfig {
            queue_depth,
            max_raw_owners: MAX_TASKS_PER_REACTOR,
            max_raw_ops: MAX_RAW_OPS_PER_REACTOR,
        };
        let mut uring =
            match UringIo::new(&devices, ring, me.wake_fd.clone(), Some(me.pool.clone())) {
                Ok(io) => io,
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
        if !zero_copy_sends {
            uring.disable_zero_copy_sends("zero_copy_sends = false in the configuration");
        }
        tracing::debug!(reactor = id.0, features = ?uring.features(), "reactor ring ready");
        if let Some(reason) = uring.zero_copy_unavailable() {
            tracing::info!(
                reactor = id.0,
                "zero-copy sends unavailable ({reason}); sends to peers copy"
            );
        }
        uring.count_sends_in(me.stats.sends.clone());
        let io = decorate(uring, MonotonicClock::new(), queue_depth, &devices);
        let router: Arc<dyn Router> = shared.clone();
        let mut core = ReactorCore::new(id, io, router, homes);
        core.set_bounce_pool(me.pool.clone());
        let _ = ready.send(Ok(()));
        drop(ready);
        let mut lp = Loop {
            me,
            shared: &shared,
            core,
            tasks: TaskTable::new(),
            idle: IdlePolicy::new(Duration::from_micros(poll_idle_us), Instant::now()),
        };
        lp.run();
    }
}

/// A running reactor's state.
struct Loop<'a> {
    me: &'a ReactorShared,
    shared: &'a Arc<Shared>,
    core: ReactorCore<ReactorIo>,
    tasks: TaskTable,
    idle: IdlePolicy,
}

impl Loop<'_> {
    fn run(&mut self) {
        loop {
            let (work, stopping) = self.turn();
            if work > 0 {
                self.idle.on_work();
                continue;
            }
            let now = Instant::now();
            let decision = self.idle.on_idle(now, self.tasks.wake_within_ns());
            if stopping
                && self.core.is_idle()
                && self.me.inbox.is_empty()
                && self.tasks.is_drained()
            {
                break;
            }
            match decision {
                IdleDecision::Spin => std::hint::spin_loop(),
                IdleDecision::Park {
                    busy_ns,
                    timeout_ns,
                } => self.park(now, busy_ns, timeout_ns),
            }
        }
    }

    /// One loop turn: the inbox, the ring, the tasks. Returns the work done and whether the
    /// engine is stopping.
    #[inline]
    fn turn(&mut self) -> (usize, bool) {
        let id = self.core.id;
        let mut work = self.drain_inbox();
        let reaped = match self.core.poll() {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(reactor = id.0, "ring failed: {e}");
                0
            }
        };
        work += reaped;
        work += self.tasks.dispatch_ring(&mut self.core, self.shared);
        // What the tasks just started on this reactor's memory devices is done already: hand
        // it to them now, so their replies and next receives go into the ring together.
        match self.core.poll_local() {
            Ok(n) => work += n,
            Err(e) => tracing::error!(reactor = id.0, "ring failed: {e}"),
        }
        let stopping = self.shared.stopping.load(Ordering::Acquire);
        work += self.tasks.poll_all(&mut self.core, self.shared, stopping);
        let stats = &self.me.stats;
        stats.messages.fetch_add(work as u64, Ordering::Relaxed);
        stats
            .completions
            .fetch_add(reaped as u64, Ordering::Relaxed);
        stats
            .ops_in_flight
            .store(self.core.ops_in_flight() as u64, Ordering::Relaxed);
        (work, stopping)
    }

    /// Take a bounded batch of messages from the inbox. Returns how many.
    #[inline]
    fn drain_inbox(&mut self) -> usize {
        let mut work = 0;
        for _ in 0..INBOX_BATCH {
            match self.me.inbox.pop() {
                Some(Msg::Task(t)) => {
                    work += 1;
                    if self.tasks.insert(t).is_err() {
                        // Only a task forced onto this reactor past its table gets here.
                        self.me.task_slots_used.fetch_sub(1, Ordering::AcqRel);
                        tracing::error!(
                            reactor = self.core.id.0,
                            "task table full; dropping a task"
                        );
                    }
                }
                Some(msg) => {
                    self.core.handle(msg);
                    work += 1;
                }
                None => break,
            }
        }
        work
    }

    /// Park: announce it, then re-check the inbox and the tasks' ports (a sender may have
    /// pushed before it saw the flag), then block in the ring until a completion, a wake or a
    /// timer, or `timeout_ns` (a task's wake-up) at most. `now`: the clock reading that
    /// decided to park.
    fn park(&mut self, now: Instant, busy_ns: Option<u64>, timeout_ns: Option<u64>) {
        let me = self.me;
        if let Some(ns) = busy_ns {
            me.stats.busy_ns.fetch_add(ns, Ordering::Relaxed);
        }
        me.parked.store(true, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        let ready = self.tasks.any_ready();
        if me.inbox.is_empty() && !ready && !self.shared.stopping.load(Ordering::SeqCst) {
            me.stats.parks.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.core.io.park(timeout_ns) {
                tracing::error!(reactor = self.core.id.0, "park failed: {e}");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        me.parked.store(false, Ordering::SeqCst);
        let idle_ns = self.idle.on_wake(now, Instant::now());
        me.stats.idle_ns.fetch_add(idle_ns, Ordering::Relaxed);
    }
}

//! The cross-reactor mesh: what each reactor shares with the others and with the control
//! plane (its bounded lock-free inbox, its parked flag and wake-up eventfd, its buffer pool and
//! live counters), and how a message reaches a reactor.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;

use super::task::TaskEnv;
use super::{Msg, Router};
use crate::buf::{IoBuf, RegisteredPool};
use crate::error::EngineError;
use crate::ids::ReactorId;
use crate::io::uring::{new_wake_fd, wake};
use crate::io::zero_copy::SendCounters;

/// Messages a reactor's inbox holds; a full inbox pushes back on submitters.
pub const INBOX_CAPACITY: usize = 4096;

/// Live counters of one reactor, readable by anyone.
#[derive(Debug, Default)]
pub struct ReactorStats {
    pub busy_ns: AtomicU64,
    pub idle_ns: AtomicU64,
    pub parks: AtomicU64,
    pub messages: AtomicU64,
    pub completions: AtomicU64,
    pub ops_in_flight: AtomicU64,
    /// How its tasks' zero-copy sends went out (the reactor's ring counts them).
    pub sends: Arc<SendCounters>,
}

/// Registered buffers per reactor: count and size of each.
pub const POOL_BUFFERS_PER_REACTOR: usize = 128;
pub const POOL_BUFFER_BYTES: usize = 64 << 10;

pub(crate) struct ReactorShared {
    pub(crate) pool: Arc<RegisteredPool>,
    pub(crate) inbox: ArrayQueue<Msg>,
    pub(crate) parked: AtomicBool,
    pub(crate) wake_fd: Arc<OwnedFd>,
    pub(crate) stats: ReactorStats,
    pub(crate) core_id: Option<usize>,
    /// Task table entries taken or promised (spawned, or reserved with
    /// [`crate::Engine::reserve_task_slot`]): never more than [`super::task::MAX_TASKS_PER_REACTOR`] unless a task
    /// is forced onto this reactor.
    pub(crate) task_slots_used: AtomicUsize,
}

pub(crate) struct Shared {
    pub(crate) reactors: Vec<ReactorShared>,
    pub(crate) stopping: AtomicBool,
}

impl Router for Shared {
    fn reactors(&self) -> u32 {
        self.reactors.len() as u32
    }
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
    fn try_send(&self, to: ReactorId, msg: Msg) -> Result<(), Msg> {
        let r = &self.reactors[to.0 as usize];
        r.inbox.push(msg)?;
        if r.parked.load(Ordering::SeqCst) {
            wake(&r.wake_fd);
        }
        Ok(())
    }
}

impl Shared {
    /// One reactor per entry of `cores` (pinned to that core when Some), none stopping.
    pub(crate) fn new(cores: &[Option<usize>]) -> Result<Self, EngineError> {
        let mut reactors = Vec::new();
        for &core in cores {
            reactors.push(ReactorShared {
                pool: RegisteredPool::new(POOL_BUFFERS_PER_REACTOR, POOL_BUFFER_BYTES),
                inbox: ArrayQueue::new(INBOX_CAPACITY),
                parked: AtomicBool::new(false),
                wake_fd: new_wake_fd()?,
                stats: ReactorStats::default(),
                core_id: core,
                task_slots_used: AtomicUsize::new(0),
            });
        }
        Ok(Self {
            reactors,
            stopping: AtomicBool::new(false),
        })
    }
}

impl TaskEnv for Arc<Shared> {
    fn take_buffer(&self, me: ReactorId, len: usize) -> Option<IoBuf> {
        self.reactors[me.0 as usize].pool.take(len)
    }

    fn port_waker(&self, me: ReactorId) -> crate::request::PortWaker {
        let shared = self.clone();
        let me = me.0 as usize;
        crate::request::PortWaker::Callback(Box::new(move || shared.wake_if_parked(me)))
    }

    fn task_dropped(&self, me: ReactorId) {
        self.reactors[me.0 as usize]
            .task_slots_used
            .fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shared {
    pub(crate) fn wake_if_parked(&self, reactor: usize) {
        // Pairs with the fence after the reactor announces it is parked.
        std::sync::atomic::fence(Ordering::SeqCst);
        let r = &self.reactors[reactor];
        if r.parked.load(Ordering::SeqCst) {
            wake(&r.wake_fd);
        }
    }

    /// Send from outside a reactor: waits (yielding) while the inbox is full.
    pub(crate) fn send_blocking(&self, to: ReactorId, msg: Msg) {
        send_blocking(self, to, msg)
    }
}

/// Send from outside a reactor through `router`: waits (yielding) while the inbox is full.
pub(crate) fn send_blocking(router: &dyn Router, to: ReactorId, mut msg: Msg) {
    loop {
        match router.try_send(to, msg) {
            Ok(()) => return,
            Err(m) => {
                msg = m;
                std::thread::yield_now();
            }
        }
    }
}

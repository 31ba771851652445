//! The `delay` decorator: holds each completion of an emulated device until the device the
//! firmware profile describes would have finished the op, plus any latency spike of the
//! device's fault config.
//!
//! The timing follows the profile's [`ServiceTime`]: transfers share the device's link one
//! after another, latencies (and spikes) overlap. An op's due time is set when the layer
//! below completes it, from the time it was pushed; until then the layer below counts it
//! against the device's queue depth, and from then on it waits here, where it still counts
//! in [`Io::in_flight`] and against the reactor's queue depth. The fault decorator sits
//! below this one, so an injected error waits like any completion.
//!
//! Time comes from a [`Clock`]: the monotonic clock on a reactor, the simulated clock in the
//! simulator. Devices without a delay pass straight through (one table look-up per push).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Instant;

use super::fault::FaultState;
use super::{Io, IoCompletion, IoKind, IoOp, MemAccess};
use crate::device::OpenDevice;
use crate::error::EngineError;
use crate::ids::DeviceId;
use crate::profile::{FirmwareProfile, ServiceTime};
use crate::request::Errno;

/// Nanoseconds since some fixed start, never going back.
pub trait Clock {
    fn now_ns(&self) -> u64;
}

/// The real clock: nanoseconds since the clock was made.
pub struct MonotonicClock {
    epoch: Instant,
}

impl MonotonicClock {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// How long one device's ops take.
#[derive(Clone, Debug, Default)]
pub struct DelayModel {
    /// The profile whose service times are emulated (`emulate_profile_latency`).
    pub profile: Option<FirmwareProfile>,
    /// The device's fault config, when it adds latency spikes.
    pub spikes: Option<Arc<FaultState>>,
}

impl DelayModel {
    /// The model of `device`, or None when its completions need no holding back.
    pub fn of(device: &OpenDevice) -> Option<Self> {
        let model = Self {
            profile: device.delay.clone(),
            spikes: device.fault.clone().filter(|f| f.spikes()),
        };
        model.is_timed().then_some(model)
    }

    fn is_timed(&self) -> bool {
        self.profile.is_some() || self.spikes.is_some()
    }

    fn service(&self, kind: IoKind, len_bytes: u64) -> ServiceTime {
        match (&self.profile, kind) {
            (Some(p), IoKind::Read) => p.read_service(len_bytes),
            (Some(p), IoKind::Write { .. } | IoKind::Zero { .. }) => p.write_service(len_bytes),
            // Charged even without a volatile cache: the command still travels to the device.
            (Some(p), IoKind::Sync) => ServiceTime {
                latency_ns: p.flush_delay_ns(),
                transfer_ns: 0,
            },
            (None, _) => ServiceTime {
                latency_ns: 0,
                transfer_ns: 0,
            },
        }
    }
}

struct TimedDevice {
    model: DelayModel,
    /// When the device's link is free for the next transfer.
    busy_until_ns: u64,
}

/// An op of a timed device, in the layer below.
struct Below {
    tag: u64,
    device: DeviceId,
    kind: IoKind,
    len_bytes: u64,
    submitted_ns: u64,
}

/// Marks the tag of an op this layer timed (the rest is its slot in `below`): the reactor's
/// tags are 32-bit.
const TIMED_TAG: u64 = 1 << 63;

/// [`Io`] `I` with the completions of some devices held back until they are due by `C`.
pub struct Delayed<I: Io, C: Clock = MonotonicClock> {
    inner: I,
    clock: C,
    /// Ops in flight at once, held ones included.
    queue_depth: usize,
    /// Indexed by device id: the devices whose completions are timed.
    devices: Vec<Option<TimedDevice>>,
    below: Vec<Option<Below>>,
    free_below: Vec<u32>,
    held: DelayQueue,
    /// Scratch for sorting one poll's completions.
    scratch: Vec<IoCompletion>,
}

impl<I: Io, C: Clock> Delayed<I, C> {
    /// Time the completions of `devices` by `clock`; every other device's ops go to `inner`
    /// untouched. At most `queue_depth` ops are in flight at once, held ones included.
    pub fn new(
        inner: I,
        clock: C,
        queue_depth: usize,
        devices: impl IntoIterator<Item = (DeviceId, DelayModel)>,
    ) -> Self {
        let mut table: Vec<Option<TimedDevice>> = Vec::new();
        for (id, model) in devices.into_iter().filter(|(_, m)| m.is_timed()) {
            let i = id.0 as usize;
            if table.len() <= i {
                table.resize_with(i + 1, || None);
            }
            table[i] = Some(TimedDevice {
                model,
                busy_until_ns: 0,
            });
        }
        Self {
            inner,
            clock,
            queue_depth,
            devices: table,
            below: Vec::new(),
            free_below: Vec::new(),
            held: DelayQueue::default(),
            scratch: Vec::new(),
        }
    }

    fn is_timed(&self, device: DeviceId) -> bool {
        matches!(self.devices.get(device.0 as usize), Some(Some(_)))
    }

    fn below_count(&self) -> usize {
        self.below.len() - self.free_below.len()
    }

    /// Take this layer's completions out of what the layer below added to `out` after
    /// `start`, hold each until due, and add every held completion that is due now.
    fn sort_completions(&mut self, out: &mut Vec<IoCompletion>, start: usize) {
        if self.below_count() > 0 && out.len() > start {
            let mut scratch = std::mem::take(&mut self.scratch);
            scratch.extend(out.drain(start..));
            for c in scratch.drain(..) {
                if c.tag & TIMED_TAG == 0 {
                    out.push(c);
                } else if let Some(c) = self.schedule(c) {
                    out.push(c);
                }
            }
            self.scratch = scratch;
        }
        if !self.held.is_empty() {
            let now_ns = self.clock.now_ns();
            self.held.release_due(now_ns, out);
        }
    }

    /// Hold back a completion of a timed op until it is due; it comes back when it is due
    /// already (no service time, no spike).
    fn schedule(&mut self, mut c: IoCompletion) -> Option<IoCompletion> {
        let slot = (c.tag & !TIMED_TAG) as usize;
        let below = self.below[slot].take().expect("completion of a live op");
        self.free_below.push(slot as u32);
        c.tag = below.tag;
        let device = self.devices[below.device.0 as usize]
            .as_mut()
            .expect("a timed op's device is timed");
        let spike_ns = device.model.spikes.as_ref().map_or(0, |f| f.spike_ns());
        let service = device.model.service(below.kind, below.len_bytes);
        if service.total_ns() == 0 && spike_ns == 0 {
            return Some(c);
        }
        let due_ns = schedule_delayed(
            &mut device.busy_until_ns,
            below.submitted_ns,
            service,
            spike_ns,
        );
        self.held.push(due_ns, c);
        None
    }
}

impl<I: Io, C: Clock> Io for Delayed<I, C> {
    fn push(&mut self, mut op: IoOp) -> Result<(), IoOp> {
        if self.in_flight() >= self.queue_depth {
            return Err(op);
        }
        debug_assert_eq!(
            op.tag & TIMED_TAG,
            0,
            "a submitter's tag uses the timed bit"
        );
        if !self.is_timed(op.device) {
            return self.inner.push(op);
        }
        let slot = match self.free_below.pop() {
            Some(s) => s as usize,
            None => {
                self.below.push(None);
                self.below.len() - 1
            }
        };
        let len_bytes = match op.kind {
            IoKind::Zero { len_bytes } => len_bytes,
            _ => op.buf.as_ref().map_or(0, |b| b.len() as u64),
        };
        self.below[slot] = Some(Below {
            tag: op.tag,
            device: op.device,
            kind: op.kind,
            len_bytes,
            submitted_ns: self.clock.now_ns(),
        });
        op.tag = TIMED_TAG | slot as u64;
        self.inner.push(op).map_err(|mut op| {
            let below = self.below[slot].take().expect("just filled");
            self.free_below.push(slot as u32);
            op.tag = below.tag;
            op
        })
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> Result<(), EngineError> {
        let start = out.len();
        self.inner.poll(out)?;
        self.sort_completions(out, start);
        Ok(())
    }

    fn poll_local(&mut self, out: &mut Vec<IoCompletion>) -> Result<(), EngineError> {
        let start = out.len();
        self.inner.poll_local(out)?;
        self.sort_completions(out, start);
        Ok(())
    }

    fn park(&mut self, timeout_ns: Option<u64>) -> Result<(), EngineError> {
        let due_in_ns = self
            .held
            .next_due_ns()
            .map(|due_ns| due_ns.saturating_sub(self.clock.now_ns()));
        let wait_ns = match (timeout_ns, due_in_ns) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if wait_ns == Some(0) {
            return Ok(());
        }
        self.inner.park(wait_ns)
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.held.len()
    }

    fn has_room(&self, device: DeviceId) -> bool {
        self.in_flight() < self.queue_depth && self.inner.has_room(device)
    }

    fn with_memory(
        &mut self,
        device: DeviceId,
        offset_bytes: u64,
        len: usize,
        access: MemAccess,
        f: &mut dyn FnMut(&mut [u8]) -> Result<(), Errno>,
    ) -> Option<Result<(), Errno>> {
        // A timed device's ops take the op path, where they are timed.
        if self.is_timed(device) {
            return None;
        }
        self.inner.with_memory(device, offset_bytes, len, access, f)
    }
}

/// The layer below, for what this decorator leaves alone (the ring's raw ops of tasks).
impl<I: Io, C: Clock> Deref for Delayed<I, C> {
    type Target = I;
    fn deref(&self) -> &I {
        &self.inner
    }
}

impl<I: Io, C: Clock> DerefMut for Delayed<I, C> {
    fn deref_mut(&mut self) -> &mut I {
        &mut self.inner
    }
}

/// When an op of the emulated device completes: its transfer waits for the link
/// (`busy_until_ns`, advanced here), its latency and any fault spike overlap with other ops.
fn schedule_delayed(
    busy_until_ns: &mut u64,
    submitted_ns: u64,
    service: ServiceTime,
    spike_ns: u64,
) -> u64 {
    let transfer_end_ns = (*busy_until_ns)
        .max(submitted_ns)
        .saturating_add(service.transfer_ns);
    *busy_until_ns = transfer_end_ns;
    transfer_end_ns
        .saturating_add(service.latency_ns)
        .saturating_add(spike_ns)
}

struct HeldCompletion {
    due_ns: u64,
    seq: u64,
    completion: IoCompletion,
}

impl PartialEq for HeldCompletion {
    fn eq(&self, other: &Self) -> bool {
        (self.due_ns, self.seq) == (other.due_ns, other.seq)
    }
}
impl Eq for HeldCompletion {}
impl PartialOrd for HeldCompletion {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for HeldCompletion {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due_ns, self.seq).cmp(&(other.due_ns, other.seq))
    }
}

/// Completions held back until they are due, in due order (then the order they came in).
#[derive(Default)]
struct DelayQueue {
    heap: BinaryHeap<Reverse<HeldCompletion>>,
    seq: u64,
}

impl DelayQueue {
    /// Hold `completion` back until `due_ns`.
    fn push(&mut self, due_ns: u64, completion: IoCompletion) {
        self.seq += 1;
        self.heap.push(Reverse(HeldCompletion {
            due_ns,
            seq: self.seq,
            completion,
        }));
    }

    fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    fn len(&self) -> usize {
        self.heap.len()
    }

    /// When the next completion is due.
    fn next_due_ns(&self) -> Option<u64> {
        self.heap.peek().map(|d| d.0.due_ns)
    }

    /// Move every completion due by `now_ns` to `out`.
    fn release_due(&mut self, now_ns: u64, out: &mut Vec<IoCompletion>) {
        while self.heap.peek().is_some_and(|d| d.0.due_ns <= now_ns) {
            let Reverse(d) = self.heap.pop().expect("peeked");
            out.push(d.completion);
        }
    }
}

#[cfg(test)]
#[path = "delay_tests.rs"]
mod tests;

//! The `fault` decorator: fails chosen ops of a device with EIO before they reach it, for
//! drills and tests. What fails follows the device's [`FaultConfig`] and its counters, which
//! every reactor shares (`fail_every_nth_write` counts the device's writes, not one
//! reactor's); one thread stepping the simulator therefore fails the same ops on every run.
//!
//! The config's latency spikes are a matter of time, not of outcome: the delay decorator
//! ([`super::delay`]) adds them to the due time it holds a completion for, asking
//! [`FaultState::spike_ns`].
//!
//! Devices without a fault config pass straight through (one table look-up per push).

use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{Io, IoCompletion, IoKind, IoOp, MemAccess};
use crate::device::FaultConfig;
use crate::error::EngineError;
use crate::ids::DeviceId;
use crate::request::Errno;

/// One device's fault config and the counters that pick its failing ops and spikes.
#[derive(Debug)]
pub struct FaultState {
    config: FaultConfig,
    writes: AtomicU64,
    ops: AtomicU64,
}

impl FaultState {
    pub fn new(config: FaultConfig) -> Self {
        Self {
            config,
            writes: AtomicU64::new(0),
            ops: AtomicU64::new(0),
        }
    }

    /// Whether the config adds latency spikes.
    pub fn spikes(&self) -> bool {
        self.config.spike_every_nth > 0
    }

    /// The error for an op of `len` bytes at `offset` (a write or zeroing when `is_write`),
    /// if it must fail. Counts the write.
    pub fn inject(&self, offset: u64, len: u64, is_write: bool) -> Option<Errno> {
        let hits = self
            .config
            .eio_ranges
            .iter()
            .any(|[s, e]| offset < *e && *s < offset.saturating_add(len.max(1)));
        if hits {
            return Some(Errno::EIO);
        }
        if is_write && self.config.fail_every_nth_write > 0 {
            let n = self.writes.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_multiple_of(self.config.fail_every_nth_write) {
                return Some(Errno::EIO);
            }
        }
        None
    }

    /// The extra latency of the op completing now (every `spike_every_nth`-th takes
    /// `spike_us` longer). Counts the op.
    pub fn spike_ns(&self) -> u64 {
        if self.config.spike_every_nth == 0 {
            return 0;
        }
        let n = self.ops.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(self.config.spike_every_nth) {
            self.config.spike_us.saturating_mul(1000)
        } else {
            0
        }
    }
}

/// [`Io`] `I` with the failing ops of some devices settled here, before they reach `I`.
pub struct Faulty<I: Io> {
    inner: I,
    /// Indexed by device id: the devices whose ops may fail.
    devices: Vec<Option<Arc<FaultState>>>,
    /// Failed ops, answered at the next poll.
    ready: VecDeque<IoCompletion>,
}

impl<I: Io> Faulty<I> {
    /// Fail ops of `devices` as their configs say; every other device's ops go to `inner`
    /// untouched.
    pub fn new(inner: I, devices: impl IntoIterator<Item = (DeviceId, Arc<FaultState>)>) -> Self {
        let mut table: Vec<Option<Arc<FaultState>>> = Vec::new();
        for (id, state) in devices {
            let i = id.0 as usize;
            if table.len() <= i {
                table.resize(i + 1, None);
            }
            table[i] = Some(state);
        }
        Self {
            inner,
            devices: table,
            ready: VecDeque::new(),
        }
    }

    fn drain_ready(&mut self, out: &mut Vec<IoCompletion>) {
        if !self.ready.is_empty() {
            out.extend(self.ready.drain(..));
        }
    }
}

impl<I: Io> Io for Faulty<I> {
    fn push(&mut self, mut op: IoOp) -> Result<(), IoOp> {
        let Some(Some(state)) = self.devices.get(op.device.0 as usize) else {
            return self.inner.push(op);
        };
        if op.kind == IoKind::Sync {
            return self.inner.push(op);
        }
        // An op the device has no room for now comes back untouched, to be counted (and
        // perhaps failed) when it is pushed again.
        if !self.inner.has_room(op.device) {
            return Err(op);
        }
        let len = match op.kind {
            IoKind::Zero { len_bytes } => len_bytes,
            _ => op.buf.as_ref().map_or(0, |b| b.len() as u64),
        };
        let is_write = matches!(op.kind, IoKind::Write { .. } | IoKind::Zero { .. });
        match state.inject(op.offset_bytes, len, is_write) {
            Some(errno) => {
                self.ready.push_back(IoCompletion {
                    tag: op.tag,
                    result: Err(errno),
                    buf: op.buf.take(),
                });
                Ok(())
            }
            None => self.inner.push(op),
        }
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> Result<(), EngineError> {
        self.inner.poll(out)?;
        self.drain_ready(out);
        Ok(())
    }

    fn poll_local(&mut self, out: &mut Vec<IoCompletion>) -> Result<(), EngineError> {
        self.inner.poll_local(out)?;
        self.drain_ready(out);
        Ok(())
    }

    fn park(&mut self, timeout_ns: Option<u64>) -> Result<(), EngineError> {
        if !self.ready.is_empty() {
            return Ok(());
        }
        self.inner.park(timeout_ns)
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.ready.len()
    }

    fn has_room(&self, device: DeviceId) -> bool {
        self.inner.has_room(device)
    }

    fn with_memory(
        &mut self,
        device: DeviceId,
        offset_bytes: u64,
        len: usize,
        access: MemAccess,
        f: &mut dyn FnMut(&mut [u8]) -> Result<(), Errno>,
    ) -> Option<Result<(), Errno>> {
        // A failing device's ops take the op path, where they can fail.
        if matches!(self.devices.get(device.0 as usize), Some(Some(_))) {
            return None;
        }
        self.inner.with_memory(device, offset_bytes, len, access, f)
    }
}

/// The layer below, for what this decorator leaves alone (the ring's raw ops of tasks).
impl<I: Io> Deref for Faulty<I> {
    type Target = I;
    fn deref(&self) -> &I {
        &self.inner
    }
}

impl<I: Io> DerefMut for Faulty<I> {
    fn deref_mut(&mut self) -> &mut I {
        &mut self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::test_io::{poll, read, write, InlineIo};

    fn faulty(config: FaultConfig) -> Faulty<InlineIo> {
        let state = Arc::new(FaultState::new(config));
        Faulty::new(InlineIo::default(), [(DeviceId(0), state)])
    }

    #[test]
    fn every_nth_write_fails_and_never_reaches_the_device() {
        let mut io = faulty(FaultConfig {
            fail_every_nth_write: 3,
            ..Default::default()
        });
        for tag in 1..=6 {
            io.push(write(0, tag * 4096, tag as u8, tag)).unwrap();
        }
        let failed: Vec<u64> = poll(&mut io)
            .into_iter()
            .filter(|(_, r)| r.is_err())
            .map(|(tag, r)| {
                assert_eq!(r, Err(Errno::EIO));
                tag
            })
            .collect();
        assert_eq!(failed, vec![3, 6]);
        assert!(!io.written.contains_key(&(0, 3 * 4096)));
        assert_eq!(io.written.len(), 4);
    }

    #[test]
    fn a_write_refused_for_room_is_counted_once() {
        let mut io = faulty(FaultConfig {
            fail_every_nth_write: 2,
            ..Default::default()
        });
        io.full = true;
        let op = io.push(write(0, 0, 1, 1)).unwrap_err();
        io.full = false;
        io.push(op).unwrap();
        io.push(write(0, 4096, 2, 2)).unwrap();
        assert_eq!(poll(&mut io), vec![(1, Ok(4096)), (2, Err(Errno::EIO))]);
    }

    #[test]
    fn ranges_fail_reads_and_writes_but_not_other_devices_or_syncs() {
        let mut io = faulty(FaultConfig {
            eio_ranges: vec![[8192, 12288]],
            ..Default::default()
        });
        io.push(read(0, 8192, 1)).unwrap();
        io.push(read(0, 0, 2)).unwrap();
        io.push(read(1, 8192, 3)).unwrap();
        io.push(IoOp {
            device: DeviceId(0),
            kind: IoKind::Sync,
            offset_bytes: 0,
            buf: None,
            tag: 4,
        })
        .unwrap();
        assert_eq!(io.in_flight(), 4);
        let mut got = poll(&mut io);
        got.sort_by_key(|(tag, _)| *tag);
        assert_eq!(
            got,
            vec![
                (1, Err(Errno::EIO)),
                (2, Ok(4096)),
                (3, Ok(4096)),
                (4, Ok(0))
            ]
        );
        let mut touch = |_: &mut [u8]| Ok(());
        assert!(io
            .with_memory(DeviceId(0), 0, 512, MemAccess::Read, &mut touch)
            .is_none());
        assert!(io
            .with_memory(DeviceId(1), 0, 512, MemAccess::Read, &mut touch)
            .is_some());
    }
}

//! A leaf [`Io`] for the decorators' unit tests: every op completes when pushed (like a memory
//! device), a write stores its first byte, and what the decorators ask of it is recorded.

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;

use super::delay::Clock;
use super::{Io, IoCompletion, IoKind, IoOp, MemAccess};
use crate::buf::{AlignedBuf, IoBuf};
use crate::error::EngineError;
use crate::ids::DeviceId;
use crate::request::Errno;

#[derive(Default)]
pub(crate) struct InlineIo {
    ready: Vec<IoCompletion>,
    /// First byte written at each (device, offset).
    pub written: HashMap<(u32, u64), u8>,
    /// Whether `push` takes ops (false: every op comes back).
    pub full: bool,
    /// The timeout of each `park`.
    pub parks: Vec<Option<u64>>,
}

impl Io for InlineIo {
    fn push(&mut self, mut op: IoOp) -> Result<(), IoOp> {
        if self.full {
            return Err(op);
        }
        let len = match op.kind {
            IoKind::Write { .. } => {
                let buf = op.buf.as_ref().expect("write buffer");
                self.written
                    .insert((op.device.0, op.offset_bytes), buf.as_slice()[0]);
                buf.len() as u32
            }
            IoKind::Read => op.buf.as_ref().map_or(0, |b| b.len() as u32),
            IoKind::Zero { .. } | IoKind::Sync => 0,
        };
        self.ready.push(IoCompletion {
            tag: op.tag,
            result: Ok(len),
            buf: op.buf.take(),
        });
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> Result<(), EngineError> {
        out.append(&mut self.ready);
        Ok(())
    }

    fn park(&mut self, timeout_ns: Option<u64>) -> Result<(), EngineError> {
        self.parks.push(timeout_ns);
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.ready.len()
    }

    fn has_room(&self, _device: DeviceId) -> bool {
        !self.full
    }

    fn with_memory(
        &mut self,
        _device: DeviceId,
        _offset_bytes: u64,
        len: usize,
        _access: MemAccess,
        f: &mut dyn FnMut(&mut [u8]) -> Result<(), Errno>,
    ) -> Option<Result<(), Errno>> {
        Some(f(&mut vec![0; len]))
    }
}

/// A clock the test sets.
#[derive(Clone, Default)]
pub(crate) struct ManualClock(pub Rc<Cell<u64>>);

impl ManualClock {
    pub fn set(&self, now_ns: u64) {
        self.0.set(now_ns);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.0.get()
    }
}

pub(crate) fn write(device: u32, offset_bytes: u64, byte: u8, tag: u64) -> IoOp {
    IoOp {
        device: DeviceId(device),
        kind: IoKind::Write { fua: false },
        offset_bytes,
        buf: Some(IoBuf::owned(AlignedBuf::from_slice(&[byte; 4096]))),
        tag,
    }
}

pub(crate) fn read(device: u32, offset_bytes: u64, tag: u64) -> IoOp {
    IoOp {
        device: DeviceId(device),
        kind: IoKind::Read,
        offset_bytes,
        buf: Some(IoBuf::owned(AlignedBuf::zeroed(4096))),
        tag,
    }
}

/// Poll once; the completions' (tag, result).
pub(crate) fn poll(io: &mut impl Io) -> Vec<(u64, Result<u32, Errno>)> {
    let mut out = Vec::new();
    io.poll(&mut out).unwrap();
    out.into_iter().map(|c| (c.tag, c.result)).collect()
}

//! A simple blocking client of a volume: one thread, up to `depth` requests in flight. Test
//! machinery (the `testing` feature); transports use [`VolumeHandle`] and [`Port`] directly.

use std::sync::Arc;

use crate::buf::{AlignedBuf, IoBuf};
use crate::engine::VolumeHandle;
use crate::request::{Completion, DataMover, Errno, Port, PortWaker, Request, RequestKind};

pub struct BlockingClient {
    handle: VolumeHandle,
    port: Arc<Port>,
    in_flight: usize,
}

impl BlockingClient {
    pub fn new(handle: VolumeHandle, depth: usize) -> Self {
        let port = Port::new(depth, PortWaker::Thread(std::thread::current()));
        Self {
            handle,
            port,
            in_flight: 0,
        }
    }

    pub fn handle(&self) -> &VolumeHandle {
        &self.handle
    }

    pub fn depth(&self) -> usize {
        self.port.capacity()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Submit without waiting; fails if `depth` requests are already in flight.
    pub fn submit(&mut self, req: Request) -> Result<(), (Request, Errno)> {
        if self.in_flight >= self.port.capacity() {
            return Err((req, Errno::EINVAL));
        }
        self.handle.submit(req, &self.port)?;
        self.in_flight += 1;
        Ok(())
    }

    /// Wait for the next completion (the caller must have something in flight).
    pub fn wait(&mut self) -> Completion {
        assert!(self.in_flight > 0, "wait with nothing in flight");
        loop {
            if let Some(c) = self.port.pop() {
                self.in_flight -= 1;
                return c;
            }
            std::thread::park();
        }
    }

    fn run(&mut self, req: Request) -> Result<Option<IoBuf>, Errno> {
        self.submit(req).map_err(|(_, e)| e)?;
        let c = self.wait();
        c.result.map(|()| c.buf)
    }

    pub fn read(&mut self, offset_bytes: u64, len_bytes: usize) -> Result<Vec<u8>, Errno> {
        let buf = IoBuf::owned(AlignedBuf::zeroed(len_bytes));
        let req = Request {
            kind: RequestKind::Read,
            offset_bytes,
            len_bytes: len_bytes as u64,
            fua: false,
            buf: Some(buf),
            mover: None,
            tag: 0,
        };
        Ok(self
            .run(req)?
            .expect("read returns its buffer")
            .as_slice()
            .to_vec())
    }

    pub fn write(&mut self, offset_bytes: u64, data: &[u8], fua: bool) -> Result<(), Errno> {
        let buf = IoBuf::owned(AlignedBuf::from_slice(data));
        let req = Request {
            kind: RequestKind::Write,
            offset_bytes,
            len_bytes: data.len() as u64,
            fua,
            buf: Some(buf),
            mover: None,
            tag: 0,
        };
        self.run(req).map(|_| ())
    }

    /// Read `len_bytes` at `offset_bytes` through `mover` (no buffer).
    pub fn read_moved(
        &mut self,
        offset_bytes: u64,
        len_bytes: u64,
        mover: Arc<dyn DataMover>,
    ) -> Result<(), Errno> {
        self.run_moved(RequestKind::Read, offset_bytes, len_bytes, false, mover)
    }

    /// Write `len_bytes` at `offset_bytes`, taken from `mover` (no buffer).
    pub fn write_moved(
        &mut self,
        offset_bytes: u64,
        len_bytes: u64,
        fua: bool,
        mover: Arc<dyn DataMover>,
    ) -> Result<(), Errno> {
        self.run_moved(RequestKind::Write, offset_bytes, len_bytes, fua, mover)
    }

    fn run_moved(
        &mut self,
        kind: RequestKind,
        offset_bytes: u64,
        len_bytes: u64,
        fua: bool,
        mover: Arc<dyn DataMover>,
    ) -> Result<(), Errno> {
        self.run(Request {
            kind,
            offset_bytes,
            len_bytes,
            fua,
            buf: None,
            mover: Some(mover),
            tag: 0,
        })
        .map(|_| ())
    }

    pub fn flush(&mut self) -> Result<(), Errno> {
        self.run(Request::flush(0)).map(|_| ())
    }

    pub fn trim(&mut self, offset_bytes: u64, len_bytes: u64) -> Result<(), Errno> {
        self.run(Request {
            kind: RequestKind::Trim,
            offset_bytes,
            len_bytes,
            fua: false,
            buf: None,
            mover: None,
            tag: 0,
        })
        .map(|_| ())
    }

    pub fn write_zeroes(&mut self, offset_bytes: u64, len_bytes: u64) -> Result<(), Errno> {
        self.run(Request {
            kind: RequestKind::WriteZeroes,
            offset_bytes,
            len_bytes,
            fua: false,
            buf: None,
            mover: None,
            tag: 0,
        })
        .map(|_| ())
    }
}

/// A [`DataMover`] over a plain byte vector standing for the request's memory, for tests and
/// tools: it records every call and can fail the calls that touch a chosen request offset.
pub struct VecMover {
    data: std::sync::Mutex<Vec<u8>>,
    /// Calls that touch this offset of the request fail with `fail_errno`.
    fail_at: Option<u64>,
    fail_errno: Errno,
    calls: std::sync::Mutex<Vec<(u64, usize)>>,
}

impl VecMover {
    /// A mover over `data` (a Write's source, or the zeroed space a Read fills).
    pub fn new(data: Vec<u8>) -> Arc<Self> {
        Arc::new(Self {
            data: std::sync::Mutex::new(data),
            fail_at: None,
            fail_errno: Errno::EIO,
            calls: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// A mover whose calls touching request offset `offset` fail with `errno`.
    pub fn failing_at(data: Vec<u8>, offset: u64, errno: Errno) -> Arc<Self> {
        Arc::new(Self {
            data: std::sync::Mutex::new(data),
            fail_at: Some(offset),
            fail_errno: errno,
            calls: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The bytes now (what a Read moved out).
    pub fn data(&self) -> Vec<u8> {
        self.data.lock().expect("mover data").clone()
    }

    /// Every call so far as (offset in request, length), sorted.
    pub fn calls(&self) -> Vec<(u64, usize)> {
        let mut c = self.calls.lock().expect("mover calls").clone();
        c.sort_unstable();
        c
    }

    fn check(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>, Errno> {
        self.calls.lock().expect("mover calls").push((offset, len));
        if self
            .fail_at
            .is_some_and(|f| offset <= f && f < offset + len as u64)
        {
            return Err(self.fail_errno);
        }
        let start = usize::try_from(offset).map_err(|_| Errno::EINVAL)?;
        let end = start.checked_add(len).ok_or(Errno::EINVAL)?;
        if end > self.data.lock().expect("mover data").len() {
            return Err(Errno::EINVAL);
        }
        Ok(start..end)
    }
}

impl DataMover for VecMover {
    fn copy_out(&self, offset_in_request: u64, src: &[u8]) -> Result<(), Errno> {
        let r = self.check(offset_in_request, src.len())?;
        self.data.lock().expect("mover data")[r].copy_from_slice(src);
        Ok(())
    }

    fn copy_in(&self, offset_in_request: u64, dst: &mut [u8]) -> Result<(), Errno> {
        let r = self.check(offset_in_request, dst.len())?;
        dst.copy_from_slice(&self.data.lock().expect("mover data")[r]);
        Ok(())
    }
}

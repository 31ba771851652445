//! A simple blocking client of a volume: one thread, up to `depth` requests in flight. Used by
//! tests, tools and the engine benchmark; transports use [`VolumeHandle`] and [`Port`] directly.

use std::sync::Arc;

use crate::buf::{AlignedBuf, IoBuf};
use crate::engine::VolumeHandle;
use crate::request::{Completion, Errno, Port, PortWaker, Request, RequestKind};

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
            tag: 0,
        };
        self.run(req).map(|_| ())
    }

    pub fn flush(&mut self) -> Result<(), Errno> {
        self.run(Request {
            kind: RequestKind::Flush,
            offset_bytes: 0,
            len_bytes: 0,
            fua: false,
            buf: None,
            tag: 0,
        })
        .map(|_| ())
    }

    pub fn trim(&mut self, offset_bytes: u64, len_bytes: u64) -> Result<(), Errno> {
        self.run(Request {
            kind: RequestKind::Trim,
            offset_bytes,
            len_bytes,
            fua: false,
            buf: None,
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
            tag: 0,
        })
        .map(|_| ())
    }
}

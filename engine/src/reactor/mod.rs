//! The reactor: one per core, each a thread with its own ring. Layers, bottom up:
//!
//! - [`core`]: the state machine that turns request parts into device ops, generic over
//!   [`crate::io::Io`] so the same logic runs on a real io_uring and on the simulator;
//! - [`round`]: a device's flush rounds, run by its home reactor;
//! - [`task`]: transport tasks (NBD connections…) hosted on a reactor's ring, through
//!   [`crate::io::task_ring::TaskRing`] so they run on the simulator too;
//! - [`mesh`]: what reactors share (inboxes, wake-ups, stats) and how they reach each other;
//! - [`idle`]: the pure spin-or-park decision of an idle reactor;
//! - [`placement`]: which cores the reactors run on;
//! - [`thread`]: the loop of one reactor thread, tying these together.
//!
//! Ownership replaces locks: chunk `i` of a volume is only read, written, allocated and
//! unmapped by its owner reactor. Each device has a home reactor that serialises its flush
//! rounds and writes its metadata.

pub(crate) mod core;
pub(crate) mod idle;
pub(crate) mod mesh;
pub(crate) mod placement;
mod round;
pub mod task;
pub(crate) mod thread;

use std::sync::Arc;

use crate::ids::{DeviceId, ReactorId, VolumeId};
use crate::request::{Errno, InFlight, Part};
use crate::volume::Volume;

pub(crate) use self::core::{Home, ReactorCore};

/// A reply to a control message, run on the reactor that finishes it.
pub(crate) type Reply = Box<dyn FnOnce(Result<(), Errno>) + Send>;

pub(crate) enum FlushWaiter {
    Request(Arc<InFlight>),
    Control(Reply),
    /// A write to regions not yet in the persisted activity log: sent on once the round
    /// persisting them completed (see `front::submit`).
    Activity(crate::front::ParkedWrite),
}

/// Control-plane messages; they go to the home reactor of the volume's device.
pub(crate) enum Control {
    Create {
        volume: Arc<Volume>,
        reply: Reply,
    },
    /// The caller guarantees no IO is in flight on the volume.
    Delete {
        id: VolumeId,
        reply: Reply,
    },
    Grow {
        id: VolumeId,
        size_bytes: u64,
        reply: Reply,
    },
}

pub(crate) enum Msg {
    Part(Part),
    Flush {
        device: DeviceId,
        waiter: FlushWaiter,
    },
    Control {
        device: DeviceId,
        control: Control,
    },
    /// A transport task to host (taken by the runtime before it reaches the core).
    Task(Box<dyn task::ReactorTask>),
}

/// How reactors reach each other.
pub(crate) trait Router: Send + Sync {
    fn reactors(&self) -> u32;
    fn try_send(&self, to: ReactorId, msg: Msg) -> Result<(), Msg>;
    /// The engine is stopping: new requests are refused.
    fn stopping(&self) -> bool {
        false
    }
}

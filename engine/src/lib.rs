//! ringblock engine: per-core io_uring reactors, device backends, firmware profiles and thin
//! volumes. The engine knows nothing of NBD, HTTP or sockets; transports turn wire requests
//! into [`Request`]s and receive [`Completion`]s.

pub mod alloc;
mod blank;
pub mod buf;
#[cfg(any(test, feature = "testing"))]
pub mod client;
pub mod device;
pub mod io;
pub mod irq;
pub mod loader;
pub mod meta;
pub mod profile;
pub mod provided;
pub mod replication;
#[cfg(any(test, feature = "testing"))]
pub mod sim_check;
#[cfg(any(test, feature = "testing"))]
pub mod sim_cluster;
pub mod staging;
pub mod state_record;
pub mod stats;

mod engine;
mod error;
mod front;
mod ids;
mod reactor;
mod request;
mod volume;
mod watchdog;

// The workspace's one skip switch, for unit tests whose real part this machine may lack.
#[cfg(test)]
#[path = "../../tests/support/required.rs"]
mod required;

pub use reactor::task;

pub use buf::{AlignedBuf, IoBuf, RegisteredPool};
pub use device::{DeviceConfig, DeviceKind, FaultConfig};
pub use engine::{Engine, EngineConfig, ReactorSnapshot, TaskSlot, VolumeHandle};
pub use error::{EngineError, VolumeErrorKind};
pub use front::{validate, MAX_REQUEST_BYTES};
pub use ids::*;
pub use io_uring;
pub use loader::{DeviceSpec, FormatPolicy};
pub use request::{Completion, DataMover, Errno, Port, PortWaker, Request, RequestKind};
pub use volume::{
    chunk_owner, validate_volume_name, DeviceHealth, DeviceState, Volume, VolumeStats,
};

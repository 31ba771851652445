//! ringblock engine: per-core io_uring reactors, device backends, firmware profiles and thin
//! volumes. The engine knows nothing of NBD, HTTP or sockets; transports turn wire requests
//! into [`Request`]s and receive [`Completion`]s.

pub mod profile;

mod error;
mod ids;

pub use error::EngineError;
pub use ids::*;

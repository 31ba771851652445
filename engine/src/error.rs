use std::path::PathBuf;

use crate::meta::MetaError;

/// Every error the engine reports. Variants carry enough context to be shown to an operator.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("firmware profile {file}: {message}")]
    Profile { file: PathBuf, message: String },
    /// A message that starts with the device's path in parentheses reads "device NAME (PATH)
    /// is ...".
    #[error("device {device}{}{message}", if message.starts_with('(') { " " } else { ": " })]
    Device { device: String, message: String },
    #[error("device {device}: {source}")]
    DeviceIo {
        device: String,
        source: std::io::Error,
    },
    #[error("device {device}: metadata: {source}")]
    Metadata { device: String, source: MetaError },
    #[error("volume {volume}: {message}")]
    Volume {
        volume: String,
        kind: VolumeErrorKind,
        message: String,
    },
    #[error("io_uring: {0}")]
    Ring(std::io::Error),
    #[error("engine is shutting down")]
    Shutdown,
    #[error("invalid engine configuration: {0}")]
    Config(String),
}

/// What went wrong with a volume operation, for callers that answer differently per kind
/// (the web API's status codes); the message says it for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeErrorKind {
    /// No volume (or device) by that name.
    NotFound,
    /// The request clashes with the current state: the name exists, the volume is in use,
    /// the device holds the maximum number of volumes.
    Conflict,
    /// The request itself is invalid (name, size, alignment, shrinking).
    Invalid,
    /// The change could not be made durable.
    NotPersisted,
}

use std::path::PathBuf;

use crate::meta::MetaError;

/// Every error the engine reports. Variants carry enough context to be shown to an operator.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("firmware profile {file}: {message}")]
    Profile { file: PathBuf, message: String },
    #[error("device {device}: {message}")]
    Device { device: String, message: String },
    #[error("device {device}: {source}")]
    DeviceIo {
        device: String,
        source: std::io::Error,
    },
    #[error("device {device}: metadata: {source}")]
    Metadata { device: String, source: MetaError },
    #[error("volume {volume}: {message}")]
    Volume { volume: String, message: String },
    #[error("io_uring: {0}")]
    Ring(std::io::Error),
    #[error("engine is shutting down")]
    Shutdown,
    #[error("invalid engine configuration: {0}")]
    Config(String),
}

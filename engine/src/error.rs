use std::path::PathBuf;

/// Every error the engine reports. Variants carry enough context to be shown to an operator.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("firmware profile {file}: {message}")]
    Profile { file: PathBuf, message: String },
}

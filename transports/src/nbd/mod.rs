//! NBD server.

pub mod wire;

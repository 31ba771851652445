//! ringblock transports: the NBD server, ublk devices and the peer protocol.

pub mod nbd;
pub mod peer;
pub mod replica_guard;
mod socket;
pub mod ublk;

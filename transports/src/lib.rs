//! ringblock transports: the NBD server, ublk devices and the peer protocol.

pub mod nbd;
pub mod peer;
mod socket;
pub mod ublk;

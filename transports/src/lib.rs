//! ringblock transports: the NBD server, ublk devices (and later the peer protocol).

pub mod nbd;
pub mod ublk;

//! ringblock transports: the NBD server (and later ublk and the peer protocol).

pub mod nbd;

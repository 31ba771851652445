//! Fixed-newstyle handshake (being written).

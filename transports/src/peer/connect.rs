//! Connecting to a peer: a socket within a timeout, then the [`Initiator`] over it within a
//! deadline, with blocking IO. The result is the connected socket, at a frame boundary, and the
//! [`Session`], or a typed error saying what failed. Retrying is the caller's, paced by a
//! [`Backoff`](super::backoff::Backoff).

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::exchange::{self, is_timeout, ExchangeError};
use super::handshake::{Initiator, InitiatorConfig, Refusal, Session};
use super::{Nonce, PeerError};
use crate::socket::{Conn, DeadlineStream};

/// Time to set up the socket to one address, by default.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for the whole handshake once connected, by default (a handshake takes milliseconds).
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Timeout of each handshake read or write, by default.
pub const HANDSHAKE_IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Most addresses a name is tried at (in the order the resolver gives them).
pub const MAX_ADDRESSES_TRIED: usize = 8;

/// Where a peer listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerAddress {
    /// `host:port`: an IP address (IPv6 in brackets) or a DNS name, resolved at each attempt.
    Tcp(String),
    /// A Unix socket (tests, or peers on one machine).
    Unix(PathBuf),
}

impl fmt::Display for PeerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddress::Tcp(a) => write!(f, "{a}"),
            PeerAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl From<SocketAddr> for PeerAddress {
    fn from(a: SocketAddr) -> PeerAddress {
        PeerAddress::Tcp(a.to_string())
    }
}

/// What to connect with.
#[derive(Clone, Debug)]
pub struct ConnectConfig {
    pub initiator: InitiatorConfig,
    /// Time to set up the socket, per address tried.
    pub connect_timeout: Duration,
    /// Time for the whole handshake, from the moment the socket is connected.
    pub handshake_deadline: Duration,
    /// Timeout of each handshake read or write.
    pub io_timeout: Duration,
}

impl ConnectConfig {
    /// The default timeouts.
    pub fn new(initiator: InitiatorConfig) -> ConnectConfig {
        ConnectConfig {
            initiator,
            connect_timeout: CONNECT_TIMEOUT,
            handshake_deadline: HANDSHAKE_DEADLINE,
            io_timeout: HANDSHAKE_IO_TIMEOUT,
        }
    }
}

/// Why a connection to a peer was not established.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve peer address {address}: {source}")]
    Resolve { address: String, source: io::Error },
    #[error("peer address {address} resolves to no address")]
    NoAddress { address: String },
    #[error("cannot connect to peer {address}: {source}")]
    Io { address: String, source: io::Error },
    #[error("connecting to peer {address} timed out after {timeout_ms} ms")]
    ConnectTimeout { address: String, timeout_ms: u128 },
    #[error("handshake with peer {address} did not finish within {deadline_ms} ms")]
    HandshakeTimeout { address: String, deadline_ms: u128 },
    #[error("peer {address} closed the connection during the handshake")]
    Closed { address: String },
    #[error("handshake with peer {address} refused: {refusal}")]
    Refused { address: String, refusal: Refusal },
    #[error("cannot start a handshake: {0}")]
    Random(PeerError),
}

impl ConnectError {
    /// The handshake's exact refusal (ours, or the peer's Refuse code), if that is what failed.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            ConnectError::Refused { refusal, .. } => Some(refusal),
            _ => None,
        }
    }
}

/// Connects to `address` and runs the handshake as the initiator.
pub fn connect(
    address: &PeerAddress,
    config: &ConnectConfig,
) -> Result<(OwnedFd, Session), ConnectError> {
    let conn = open(address, config.connect_timeout)?;
    let label = address.to_string();
    let nonce = Nonce::from_os_rng().map_err(ConnectError::Random)?;
    let (mut initiator, hello) = Initiator::start(config.initiator.clone(), nonce);
    let mut stream = DeadlineStream {
        conn: &conn,
        deadline: Instant::now() + config.handshake_deadline,
        per_op: config.io_timeout,
        read_timeout: None,
        write_timeout: None,
    };
    let session = match exchange::run(&mut stream, &mut initiator, Some(&hello)) {
        Ok((session, last)) => {
            debug_assert!(last.is_none(), "the initiator's last frame is its Response");
            session
        }
        Err(ExchangeError::Refused(refusal)) => {
            return Err(ConnectError::Refused {
                address: label,
                refusal,
            })
        }
        Err(ExchangeError::Closed) => return Err(ConnectError::Closed { address: label }),
        Err(ExchangeError::Io(e)) if is_timeout(&e) => {
            return Err(ConnectError::HandshakeTimeout {
                address: label,
                deadline_ms: config.handshake_deadline.as_millis(),
            })
        }
        Err(ExchangeError::Io(source)) => {
            return Err(ConnectError::Io {
                address: label,
                source,
            })
        }
    };
    conn.set_timeouts(None).map_err(|source| ConnectError::Io {
        address: address.to_string(),
        source,
    })?;
    Ok((conn.into_fd(), session))
}

/// A connected socket to `address`.
fn open(address: &PeerAddress, timeout: Duration) -> Result<Conn, ConnectError> {
    let label = || address.to_string();
    match address {
        PeerAddress::Unix(path) => {
            UnixStream::connect(path)
                .map(Conn::Unix)
                .map_err(|source| ConnectError::Io {
                    address: label(),
                    source,
                })
        }
        PeerAddress::Tcp(host_port) => {
            // A name is resolved at each attempt: the peer may have moved.
            let addrs = host_port
                .to_socket_addrs()
                .map_err(|source| ConnectError::Resolve {
                    address: label(),
                    source,
                })?;
            let mut last = None;
            for addr in addrs.take(MAX_ADDRESSES_TRIED) {
                match TcpStream::connect_timeout(&addr, timeout.max(Duration::from_millis(1))) {
                    Ok(s) => {
                        // Frames are small and latency matters: no Nagle delay.
                        let _ = s.set_nodelay(true);
                        super::abort_when_unacknowledged(&s);
                        return Ok(Conn::Tcp(s));
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(match last {
                None => ConnectError::NoAddress { address: label() },
                Some(e) if is_timeout(&e) => ConnectError::ConnectTimeout {
                    address: label(),
                    timeout_ms: timeout.as_millis(),
                },
                Some(source) => ConnectError::Io {
                    address: label(),
                    source,
                },
            })
        }
    }
}

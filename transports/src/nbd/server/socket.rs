//! Listening and accepted sockets, TCP or Unix, and the handshake's deadline-bound view of a
//! connection.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::UNIX_SOCKET_MODE;

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    pub(super) fn addr(&self) -> io::Result<BoundAddr> {
        Ok(match self {
            Listener::Tcp(l) => BoundAddr::Tcp(l.local_addr()?),
            Listener::Unix(l) => {
                BoundAddr::Unix(l.local_addr()?.as_pathname().map(Path::to_path_buf))
            }
        })
    }

    pub(super) fn accept(&self) -> io::Result<Conn> {
        Ok(match self {
            Listener::Tcp(l) => Conn::Tcp(l.accept()?.0),
            Listener::Unix(l) => Conn::Unix(l.accept()?.0),
        })
    }

    pub(super) fn raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        }
    }
}

/// Where a listener is reachable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BoundAddr {
    Tcp(SocketAddr),
    /// A Unix socket; `None` if it has no path (unnamed or abstract, e.g. from systemd).
    Unix(Option<PathBuf>),
}

impl BoundAddr {
    /// An NBD URI for `export` on this address (`nbd://HOST:PORT/EXPORT`,
    /// `nbd+unix:///EXPORT?socket=PATH`).
    pub fn uri(&self, export: &str) -> String {
        match self {
            BoundAddr::Tcp(a) => format!("nbd://{a}/{export}"),
            BoundAddr::Unix(Some(p)) => format!("nbd+unix:///{export}?socket={}", p.display()),
            BoundAddr::Unix(None) => format!("nbd+unix:///{export}"),
        }
    }
}

impl fmt::Display for BoundAddr {
    /// `127.0.0.1:10809` for TCP, `nbd+unix:///?socket=PATH` for a Unix socket.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BoundAddr::Tcp(a) => write!(f, "{a}"),
            BoundAddr::Unix(Some(p)) => write!(f, "nbd+unix:///?socket={}", p.display()),
            BoundAddr::Unix(None) => write!(f, "nbd+unix (unnamed socket)"),
        }
    }
}

/// An accepted connection.
#[derive(Debug)]
pub(super) enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    pub(super) fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Conn::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    pub(super) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(t),
            Conn::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub(super) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_write_timeout(t),
            Conn::Unix(s) => s.set_write_timeout(t),
        }
    }

    pub(super) fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    pub(super) fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    pub(super) fn shutdown_read(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Read),
            Conn::Unix(s) => s.shutdown(Shutdown::Read),
        };
    }

    /// The client's IP address (IPv4 clients of an IPv6 socket as IPv4); None for Unix sockets.
    pub(super) fn peer_ip(&self) -> Option<IpAddr> {
        match self {
            Conn::Tcp(s) => s.peer_addr().ok().map(|a| a.ip().to_canonical()),
            Conn::Unix(_) => None,
        }
    }

    pub(super) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => (&*s).read(buf),
            Conn::Unix(s) => (&*s).read(buf),
        }
    }

    pub(super) fn write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => (&*s).write(buf),
            Conn::Unix(s) => (&*s).write(buf),
        }
    }

    /// `ADDR:PORT` for TCP, `unix:pid=…,uid=…` for Unix sockets.
    pub(super) fn peer(&self) -> String {
        match self {
            Conn::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "tcp:unknown".into(), |a| a.to_string()),
            Conn::Unix(s) => {
                match nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::PeerCredentials) {
                    Ok(c) => format!("unix:pid={},uid={}", c.pid(), c.uid()),
                    Err(_) => "unix".into(),
                }
            }
        }
    }

    pub(super) fn into_fd(self) -> OwnedFd {
        match self {
            Conn::Tcp(s) => s.into(),
            Conn::Unix(s) => s.into(),
        }
    }
}

/// The handshake's view of a connection: each read/write times out after the per-operation
/// timeout or at the overall deadline, whichever comes first.
pub(super) struct DeadlineStream<'a> {
    pub(super) conn: &'a Conn,
    pub(super) deadline: Instant,
    pub(super) per_op: Duration,
    pub(super) read_timeout: Option<Duration>,
    pub(super) write_timeout: Option<Duration>,
}

impl DeadlineStream<'_> {
    fn timeout(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake deadline passed",
            ));
        }
        Ok(left.min(self.per_op))
    }
}

impl Read for DeadlineStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let t = self.timeout()?;
        if self.read_timeout != Some(t) {
            self.conn.set_read_timeout(Some(t))?;
            self.read_timeout = Some(t);
        }
        self.conn.read(buf)
    }
}

impl Write for DeadlineStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let t = self.timeout()?;
        if self.write_timeout != Some(t) {
            self.conn.set_write_timeout(Some(t))?;
            self.write_timeout = Some(t);
        }
        self.conn.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Create a Unix listening socket at `path`, replacing a stale socket file (one nobody
/// listens on) but never anything else.
pub(super) fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another server is listening on this socket",
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; refusing to replace it",
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(UNIX_SOCKET_MODE))?;
    Ok(l)
}

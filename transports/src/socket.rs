//! Listening and accepted sockets, TCP or Unix, the handshake's deadline-bound view of a
//! connection, and rate-limited refusal logging: what the NBD and peer listeners share.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    pub(crate) fn accept(&self) -> io::Result<Conn> {
        Ok(match self {
            Listener::Tcp(l) => Conn::Tcp(l.accept()?.0),
            Listener::Unix(l) => Conn::Unix(l.accept()?.0),
        })
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        }
    }

    /// Accept connections and hand each to `on_accept` until `stopping` is set (the stopper
    /// then wakes a blocked `accept`, e.g. with a shutdown of the socket). A failed accept
    /// other than an interruption or an aborted connection (out of file descriptors or
    /// memory) pauses the loop rather than let it spin. `service` and `label` name it in logs.
    pub(crate) fn accept_until(
        &self,
        stopping: &AtomicBool,
        service: &str,
        label: &str,
        mut on_accept: impl FnMut(Conn),
    ) {
        tracing::debug!(listener = label, "{service} acceptor running");
        loop {
            let accepted = self.accept();
            if stopping.load(Ordering::Acquire) {
                return;
            }
            match accepted {
                Ok(conn) => on_accept(conn),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    tracing::warn!(listener = label, error = %e, "{service}: accept failed");
                    std::thread::sleep(ACCEPT_ERROR_PAUSE);
                }
            }
        }
    }
}

/// Pause after a failed `accept` (e.g. out of file descriptors) so an accept loop cannot spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// An accepted connection.
#[derive(Debug)]
pub(crate) enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    pub(crate) fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
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

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(t),
            Conn::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_write_timeout(t),
            Conn::Unix(s) => s.set_write_timeout(t),
        }
    }

    pub(crate) fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    pub(crate) fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    pub(crate) fn shutdown_read(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Read),
            Conn::Unix(s) => s.shutdown(Shutdown::Read),
        };
    }

    /// The client's IP address (IPv4 clients of an IPv6 socket as IPv4); None for Unix sockets.
    pub(crate) fn peer_ip(&self) -> Option<IpAddr> {
        match self {
            Conn::Tcp(s) => s.peer_addr().ok().map(|a| a.ip().to_canonical()),
            Conn::Unix(_) => None,
        }
    }

    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => (&*s).read(buf),
            Conn::Unix(s) => (&*s).read(buf),
        }
    }

    pub(crate) fn write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => (&*s).write(buf),
            Conn::Unix(s) => (&*s).write(buf),
        }
    }

    /// `ADDR:PORT` for TCP, `unix:pid=…,uid=…` for Unix sockets.
    pub(crate) fn peer(&self) -> String {
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

    pub(crate) fn into_fd(self) -> OwnedFd {
        match self {
            Conn::Tcp(s) => s.into(),
            Conn::Unix(s) => s.into(),
        }
    }
}

/// The handshake's view of a connection: each read/write times out after the per-operation
/// timeout or at the overall deadline, whichever comes first.
pub(crate) struct DeadlineStream<'a> {
    pub(crate) conn: &'a Conn,
    pub(crate) deadline: Instant,
    pub(crate) per_op: Duration,
    pub(crate) read_timeout: Option<Duration>,
    pub(crate) write_timeout: Option<Duration>,
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

/// Create a Unix listening socket at `path` with permissions `mode`, replacing a stale socket
/// file (one nobody listens on) but never anything else.
pub(crate) fn bind_unix(path: &Path, mode: u32) -> io::Result<UnixListener> {
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
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(l)
}

/// Remove the socket file at `path` if it is still the one with `inode` (the one we created).
pub(crate) fn remove_socket_file(path: &Path, inode: u64) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.ino() == inode) {
        let _ = std::fs::remove_file(path);
    }
}

/// Shortest time between two log lines of one kind of refusal.
pub(crate) const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// At most one log line per [`REFUSAL_LOG_INTERVAL`], counting what it stood for: a flood of
/// hostile connections cannot flood the log.
#[derive(Default)]
pub(crate) struct LogLimit {
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimit {
    /// Count an event; Some(events since the last line, this one included) when a line is due.
    pub(crate) fn note(&self) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.1 += 1;
        let now = Instant::now();
        if st
            .0
            .is_some_and(|t| now.duration_since(t) < REFUSAL_LOG_INTERVAL)
        {
            return None;
        }
        st.0 = Some(now);
        Some(std::mem::take(&mut st.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_log_lines_are_rate_limited_with_a_count() {
        let limit = LogLimit::default();
        assert_eq!(limit.note(), Some(1));
        // Within the interval: counted, not logged (bounded loop; the interval is a second).
        let mut logged = 0;
        for _ in 0..1000 {
            logged += usize::from(limit.note().is_some());
        }
        assert!(
            logged <= 1,
            "{logged} lines for 1000 refusals within a second or so"
        );
        // After the interval, the next line carries the count.
        limit.state.lock().unwrap().0 = Some(Instant::now() - REFUSAL_LOG_INTERVAL);
        assert!(limit.note().is_some_and(|n| n >= 1));
    }
}

//! Listening sockets handed over by systemd socket activation (`LISTEN_FDS`).

use std::io;
use std::net::TcpListener;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;

use super::MAX_SYSTEMD_FDS;
use crate::socket::Listener;

/// First file descriptor of systemd socket activation.
const SD_LISTEN_FDS_START: RawFd = 3;

/// Take the listening sockets systemd (or a client such as `nbdinfo -- CMD`) handed over
/// through `LISTEN_PID`/`LISTEN_FDS`, and remove those variables from the environment.
///
/// Call it once, early, before other threads start (it edits the environment). Returns an
/// empty list when the variables are absent or meant for another process.
pub fn take_systemd_listeners() -> io::Result<Vec<Listener>> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Vec::new());
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(Vec::new());
    }
    let bad = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
    let n: usize = fds
        .trim()
        .parse()
        .map_err(|_| bad(format!("LISTEN_FDS={fds:?} is not a number")))?;
    if n > MAX_SYSTEMD_FDS {
        return Err(bad(format!(
            "LISTEN_FDS={n}: at most {MAX_SYSTEMD_FDS} sockets are supported"
        )));
    }
    let mut listeners = Vec::with_capacity(n);
    for i in 0..n {
        let fd = SD_LISTEN_FDS_START + i as RawFd;
        listeners.push(adopt_listener(fd)?);
    }
    Ok(listeners)
}

fn adopt_listener(fd: RawFd) -> io::Result<Listener> {
    use nix::sys::socket::{
        getsockname, getsockopt, sockopt, AddressFamily, SockaddrLike, SockaddrStorage,
    };
    let bad = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
    let st = nix::sys::stat::fstat(fd).map_err(|e| bad(format!("LISTEN_FDS: fd {fd}: {e}")))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(bad(format!("LISTEN_FDS: fd {fd} is not a socket")));
    }
    // SAFETY: socket activation hands these descriptors to this process; nothing else in it
    // uses them, and `take_systemd_listeners` removes the variables so they are adopted once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let listening = getsockopt(&owned, sockopt::AcceptConn)
        .map_err(|e| bad(format!("LISTEN_FDS: fd {fd}: {e}")))?;
    if !listening {
        return Err(bad(format!(
            "LISTEN_FDS: fd {fd} is not a listening socket (Accept=yes is not supported)"
        )));
    }
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| bad(format!("LISTEN_FDS: fd {fd}: {e}")))?;
    let addr: SockaddrStorage =
        getsockname(fd).map_err(|e| bad(format!("LISTEN_FDS: fd {fd}: {e}")))?;
    let listener = match addr.family() {
        Some(AddressFamily::Inet | AddressFamily::Inet6) => Listener::Tcp(TcpListener::from(owned)),
        Some(AddressFamily::Unix) => Listener::Unix(UnixListener::from(owned)),
        other => {
            return Err(bad(format!(
                "LISTEN_FDS: fd {fd} has unsupported address family {other:?}"
            )))
        }
    };
    match &listener {
        Listener::Tcp(l) => l.set_nonblocking(false)?,
        Listener::Unix(l) => l.set_nonblocking(false)?,
    }
    Ok(listener)
}

//! Where an NBD listener is reachable, as clients name it.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::socket::Listener;

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

pub(super) fn bound_addr(l: &Listener) -> io::Result<BoundAddr> {
    Ok(match l {
        Listener::Tcp(l) => BoundAddr::Tcp(l.local_addr()?),
        Listener::Unix(l) => BoundAddr::Unix(l.local_addr()?.as_pathname().map(Path::to_path_buf)),
    })
}

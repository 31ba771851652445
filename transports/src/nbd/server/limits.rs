//! Bounds on handshakes and connections: the handshake table and the connection counts with
//! their permits.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Condvar, Mutex};

use ringblock_engine::Engine;

use super::Inner;
use crate::socket::Conn;

/// Handshakes in progress: their count, and a duplicate of each socket so `stop` can shut
/// them down.
#[derive(Default)]
pub(super) struct Handshakes {
    pub(super) state: Mutex<HandshakeState>,
    pub(super) idle: Condvar,
}

#[derive(Default)]
pub(super) struct HandshakeState {
    pub(super) count: usize,
    /// By connection number: the oldest first. Those not handed on yet.
    pub(super) sockets: BTreeMap<u64, Conn>,
    pub(super) per_address: HashMap<IpAddr, usize>,
}

/// Releases a handshake slot when dropped (also if the thread could not be spawned).
pub(super) struct Slot {
    pub(super) handshakes: Arc<Handshakes>,
    pub(super) id: u64,
    pub(super) addr: Option<IpAddr>,
}

impl Slot {
    /// Forget the duplicate socket before the connection is handed on, so it cannot keep the
    /// connection open behind the transmission phase's back.
    pub(super) fn release_socket(&self) {
        let mut st = self.handshakes.state.lock().expect("handshakes");
        st.sockets.remove(&self.id);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.handshakes.state.lock().expect("handshakes");
        st.sockets.remove(&self.id);
        st.count -= 1;
        if let Some(addr) = self.addr {
            if let Some(n) = st.per_address.get_mut(&addr) {
                *n -= 1;
                if *n == 0 {
                    st.per_address.remove(&addr);
                }
            }
        }
        if st.count == 0 {
            self.handshakes.idle.notify_all();
        }
    }
}

/// Connections counted against the limits: in all, and per client address.
#[derive(Default)]
pub(super) struct ConnCounts {
    total: usize,
    per_address: HashMap<IpAddr, usize>,
}

/// A connection's place in the limits (and its reactor task slot, until the connection
/// reaches the reactor); released when the connection ends.
pub(super) struct ConnPermit {
    counts: Arc<Mutex<ConnCounts>>,
    addr: Option<IpAddr>,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut c = self.counts.lock().expect("connection counts");
        c.total -= 1;
        if let Some(addr) = self.addr {
            if let Some(n) = c.per_address.get_mut(&addr) {
                *n -= 1;
                if *n == 0 {
                    c.per_address.remove(&addr);
                }
            }
        }
    }
}

/// What a handshake thread does with its client.
pub(super) enum Admission {
    Accepted {
        permit: ConnPermit,
        task_slot: ringblock_engine::TaskSlot,
    },
    /// Turned away, with this message in every option reply.
    Refused(String),
}

impl Inner {
    /// Take a connection's place in the limits and a reactor task slot, or say why not.
    pub(super) fn admit(&self, engine: &Engine, addr: Option<IpAddr>) -> Admission {
        let mut c = self.connections.lock().expect("connection counts");
        if c.total >= self.max_connections {
            return Admission::Refused(format!(
                "too many connections (limit {})",
                self.max_connections
            ));
        }
        if let Some(a) = addr {
            let mine = c.per_address.get(&a).copied().unwrap_or(0);
            if self.max_connections_per_address > 0 && mine >= self.max_connections_per_address {
                return Admission::Refused(format!(
                    "too many connections from {a} (limit {} per address)",
                    self.max_connections_per_address
                ));
            }
        }
        let Some(task_slot) = engine.reserve_task_slot() else {
            return Admission::Refused(
                "too many connections (the reactors' task tables are full)".into(),
            );
        };
        c.total += 1;
        if let Some(a) = addr {
            *c.per_address.entry(a).or_insert(0) += 1;
        }
        Admission::Accepted {
            permit: ConnPermit {
                counts: self.connections.clone(),
                addr,
            },
            task_slot,
        }
    }
}

//! The listener's bounds: the table of handshakes in progress and the count of established
//! connections.
//!
//! Handshakes: at most `max` in the table, at most `max_per_address` of them from one address.
//! A newcomer beyond either bound cuts off the oldest handshake *of the bound it hit* (the
//! oldest from its own address when that is the one that is full), so a flood from one
//! address only churns its own slots and never locks others out, and a well-behaved peer,
//! whose handshake takes milliseconds, is almost never the oldest even behind the same
//! address. Cut-off handshakes leave within moments (their socket is shut down); meanwhile
//! their threads still count, up to twice `max_per_address` from one address and twice `max`
//! in all, and beyond that newcomers (from that address, or at all) are turned away: a flood
//! from one address can never use up the threads the others need.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// What happens to a new connection.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Admit<T> {
    /// Admitted; these handshakes were cut off to make room (shut their sockets down).
    Admitted { cut_off: Vec<T> },
    /// Turned away: too many handshake threads (from its address, or in all) are still
    /// winding down.
    Busy,
}

#[derive(Debug)]
struct Entry<T> {
    addr: Option<IpAddr>,
    socket: T,
}

/// Handshakes in progress, oldest first, with a handle on each socket (to cut it off).
#[derive(Debug)]
pub(super) struct HandshakeTable<T> {
    max: usize,
    max_per_address: usize,
    entries: BTreeMap<u64, Entry<T>>,
    per_address: HashMap<IpAddr, usize>,
    /// Handshake threads running: in the table, cut off or handed on but not finished.
    threads: usize,
    /// The same, by address.
    threads_per_address: HashMap<IpAddr, usize>,
}

impl<T> HandshakeTable<T> {
    pub(super) fn new(max: usize, max_per_address: usize) -> HandshakeTable<T> {
        let max = max.max(1);
        HandshakeTable {
            max,
            max_per_address: max_per_address.clamp(1, max),
            entries: BTreeMap::new(),
            per_address: HashMap::new(),
            threads: 0,
            threads_per_address: HashMap::new(),
        }
    }

    /// Handshake threads running.
    pub(super) fn threads(&self) -> usize {
        self.threads
    }

    /// Every socket still in the table (for stop).
    pub(super) fn sockets(&self) -> impl Iterator<Item = &T> {
        self.entries.values().map(|e| &e.socket)
    }

    /// A new connection `id` (larger than every earlier one) from `addr`.
    pub(super) fn admit(&mut self, id: u64, addr: Option<IpAddr>, socket: T) -> Admit<T> {
        if self.threads >= 2 * self.max {
            return Admit::Busy;
        }
        if let Some(a) = addr {
            if self.threads_per_address.get(&a).copied().unwrap_or(0) >= 2 * self.max_per_address {
                return Admit::Busy;
            }
        }
        let mut cut_off = Vec::new();
        if let Some(a) = addr {
            if self.per_address.get(&a).copied().unwrap_or(0) >= self.max_per_address {
                let oldest = self
                    .entries
                    .iter()
                    .find(|(_, e)| e.addr == Some(a))
                    .map(|(id, _)| *id);
                cut_off.extend(oldest.and_then(|id| self.remove(id)));
            }
        }
        if self.entries.len() >= self.max {
            let oldest = self.entries.keys().next().copied();
            cut_off.extend(oldest.and_then(|id| self.remove(id)));
        }
        debug_assert!(self
            .entries
            .keys()
            .next_back()
            .is_none_or(|last| *last < id));
        self.entries.insert(id, Entry { addr, socket });
        if let Some(a) = addr {
            *self.per_address.entry(a).or_insert(0) += 1;
            *self.threads_per_address.entry(a).or_insert(0) += 1;
        }
        self.threads += 1;
        debug_assert!(self.entries.len() <= self.max);
        Admit::Admitted { cut_off }
    }

    /// The handshake `id` ended or was handed on: its socket leaves the table (if still in it).
    pub(super) fn remove(&mut self, id: u64) -> Option<T> {
        let entry = self.entries.remove(&id)?;
        if let Some(a) = entry.addr {
            decrement(&mut self.per_address, a);
        }
        Some(entry.socket)
    }

    /// The thread of handshake `id`, from `addr`, finished.
    pub(super) fn finished(&mut self, id: u64, addr: Option<IpAddr>) {
        self.remove(id);
        debug_assert!(self.threads > 0);
        self.threads = self.threads.saturating_sub(1);
        if let Some(a) = addr {
            decrement(&mut self.threads_per_address, a);
        }
    }
}

fn decrement(counts: &mut HashMap<IpAddr, usize>, addr: IpAddr) {
    if let Some(n) = counts.get_mut(&addr) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(&addr);
        }
    }
}

/// Established connections: at most `max` at once.
#[derive(Debug)]
pub(super) struct ConnectionLimit {
    max: usize,
    count: Mutex<usize>,
}

impl ConnectionLimit {
    pub(super) fn new(max: usize) -> Arc<ConnectionLimit> {
        Arc::new(ConnectionLimit {
            max: max.max(1),
            count: Mutex::new(0),
        })
    }

    pub(super) fn max(&self) -> usize {
        self.max
    }

    pub(super) fn count(&self) -> usize {
        *self.count.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place among the connections, or None when all are taken.
    pub(super) fn admit(self: &Arc<Self>) -> Option<ConnectionPermit> {
        let mut n = self.count.lock().unwrap_or_else(|e| e.into_inner());
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ConnectionPermit {
            limit: self.clone(),
        })
    }
}

/// An established connection's place among the listener's connections; the connection task
/// holds it, and the place is free again when it is dropped.
#[derive(Debug)]
pub struct ConnectionPermit {
    limit: Arc<ConnectionLimit>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut n = self.limit.count.lock().unwrap_or_else(|e| e.into_inner());
        debug_assert!(*n > 0);
        *n = n.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn ip(n: u8) -> Option<IpAddr> {
        Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, n)))
    }

    #[test]
    fn a_full_table_cuts_off_its_oldest_handshake() {
        let mut t = HandshakeTable::new(3, 3);
        for id in 0..3 {
            assert_eq!(
                t.admit(id, ip(id as u8), id),
                Admit::Admitted { cut_off: vec![] }
            );
        }
        assert_eq!(t.admit(3, ip(9), 3), Admit::Admitted { cut_off: vec![0] });
        assert_eq!(t.sockets().copied().collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn one_address_over_its_share_cuts_off_its_own_oldest() {
        let mut t = HandshakeTable::new(8, 2);
        t.admit(0, ip(1), 0);
        t.admit(1, ip(2), 1);
        t.admit(2, ip(2), 2);
        // Address 2 is at its share: its own oldest goes, not address 1's older handshake.
        assert_eq!(t.admit(3, ip(2), 3), Admit::Admitted { cut_off: vec![1] });
        assert_eq!(t.sockets().copied().collect::<Vec<_>>(), [0, 2, 3]);
        // Unix sockets have no address: only the table's bound applies.
        assert_eq!(t.admit(4, None, 4), Admit::Admitted { cut_off: vec![] });
    }

    #[test]
    fn threads_winding_down_still_count_up_to_twice_the_table() {
        let mut t = HandshakeTable::new(2, 2);
        for id in 0..4 {
            assert!(matches!(t.admit(id, None, id), Admit::Admitted { .. }));
        }
        assert_eq!(t.threads(), 4);
        assert_eq!(t.admit(4, None, 4), Admit::Busy);
        t.finished(0, None);
        assert!(matches!(t.admit(5, None, 5), Admit::Admitted { .. }));
    }

    #[test]
    fn one_address_cannot_use_up_the_threads_of_others() {
        let mut t = HandshakeTable::new(8, 2);
        // Four from one address: two in the table, two cut off and still winding down.
        for id in 0..4 {
            assert!(matches!(t.admit(id, ip(1), id), Admit::Admitted { .. }));
        }
        assert_eq!(t.admit(4, ip(1), 4), Admit::Busy);
        // Another address is still let in.
        assert_eq!(t.admit(5, ip(2), 5), Admit::Admitted { cut_off: vec![] });
        // Once a thread of the first address finishes, it may try again.
        t.finished(0, ip(1));
        assert!(matches!(t.admit(6, ip(1), 6), Admit::Admitted { .. }));
    }

    #[test]
    fn handed_on_handshakes_leave_the_table_and_their_address() {
        let mut t = HandshakeTable::new(4, 1);
        t.admit(0, ip(1), 0);
        assert_eq!(t.remove(0), Some(0));
        assert_eq!(t.remove(0), None);
        // The address's share is free again.
        assert_eq!(t.admit(1, ip(1), 1), Admit::Admitted { cut_off: vec![] });
        t.finished(0, ip(1));
        t.finished(1, ip(1));
        assert_eq!(t.threads(), 0);
        assert!(t.threads_per_address.is_empty());
        assert_eq!(t.sockets().count(), 0);
    }

    #[test]
    fn connection_permits_are_bounded_and_given_back() {
        let limit = ConnectionLimit::new(2);
        let a = limit.admit().expect("first");
        let b = limit.admit().expect("second");
        assert!(limit.admit().is_none());
        drop(a);
        assert_eq!(limit.count(), 1);
        let c = limit.admit().expect("a place was given back");
        drop((b, c));
        assert_eq!(limit.count(), 0);
    }
}

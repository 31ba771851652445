//! The clients in transmission, for status pages, and the scan that closes idle ones.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::conn;
use super::{Inner, IDLE_SCAN_INTERVAL, MAX_TRACKED_CLIENTS};
use crate::socket::Conn;

/// A client that entered the transmission phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientInfo {
    /// Connection number, unique per server.
    pub id: u64,
    /// `ADDR:PORT` for TCP, `unix:pid=…,uid=…` for Unix sockets.
    pub peer: String,
    pub export: String,
    /// The listener it came through.
    pub listener: String,
    pub since: SystemTime,
    pub structured_replies: bool,
    pub extended_headers: bool,
    /// Requests served so far (a snapshot taken by [`ClientRegistry::clients`]).
    pub requests: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
}

/// The connected clients, for status pages (control path only: a mutex is fine here).
///
/// Each entry shares the connection's [`conn::ConnStats`]; once the transmission task is gone
/// (the client disconnected) the registry holds the only reference and the entry is dropped.
#[derive(Default)]
pub struct ClientRegistry {
    entries: Mutex<VecDeque<ClientEntry>>,
}

struct ClientEntry {
    info: ClientInfo,
    stats: Arc<conn::ConnStats>,
    /// A duplicate of the socket, to end the connection when idle (only with an idle timeout).
    socket: Option<Conn>,
    /// Requests seen at the last scan, and since when nothing changed.
    seen_requests: u64,
    quiet_since: Instant,
}

impl ClientRegistry {
    pub(super) fn add(&self, info: ClientInfo, stats: Arc<conn::ConnStats>, socket: Option<Conn>) {
        let mut entries = self.entries.lock().expect("client registry");
        entries.retain(|e| Arc::strong_count(&e.stats) > 1);
        if entries.len() >= MAX_TRACKED_CLIENTS {
            entries.pop_front();
        }
        entries.push_back(ClientEntry {
            info,
            stats,
            socket,
            seen_requests: 0,
            quiet_since: Instant::now(),
        });
    }

    /// End connections that had nothing in flight and sent no request for `idle`: shut their
    /// socket down for reading, so the connection finishes what it has and closes.
    pub(super) fn close_idle(&self, idle: Duration) {
        let now = Instant::now();
        let mut entries = self.entries.lock().expect("client registry");
        entries.retain(|e| Arc::strong_count(&e.stats) > 1);
        for e in entries.iter_mut() {
            let Some(socket) = &e.socket else { continue };
            let requests = e.stats.requests.load(Ordering::Relaxed);
            if requests != e.seen_requests || e.stats.busy.load(Ordering::Relaxed) {
                e.seen_requests = requests;
                e.quiet_since = now;
            } else if now.duration_since(e.quiet_since) >= idle {
                tracing::info!(peer = %e.info.peer, export = %e.info.export,
                    idle_s = idle.as_secs(), "nbd: closing idle connection");
                socket.shutdown_read();
                e.socket = None;
            }
        }
    }

    /// Clients whose connection is still open, oldest first, with their counters now.
    pub fn clients(&self) -> Vec<ClientInfo> {
        let mut entries = self.entries.lock().expect("client registry");
        entries.retain(|e| Arc::strong_count(&e.stats) > 1);
        entries
            .iter()
            .map(
                |ClientEntry {
                     info: c, stats: s, ..
                 }| ClientInfo {
                    requests: s.requests.load(Ordering::Relaxed),
                    bytes_read: s.bytes_read.load(Ordering::Relaxed),
                    bytes_written: s.bytes_written.load(Ordering::Relaxed),
                    errors: s.errors.load(Ordering::Relaxed),
                    ..c.clone()
                },
            )
            .collect()
    }
}

/// Scan for idle connections until the server stops.
pub(super) fn idle_loop(inner: &Inner, idle: Duration) {
    let scan_every = (idle / 4).clamp(Duration::from_millis(50), IDLE_SCAN_INTERVAL);
    let mut next_scan = Instant::now() + scan_every;
    // Bounded by the server's life: `stop` sets `stopping` and joins this thread.
    while !inner.stopping.load(Ordering::Acquire) {
        std::thread::sleep(scan_every.min(Duration::from_millis(100)));
        if Instant::now() >= next_scan {
            inner.registry.close_idle(idle);
            next_scan = Instant::now() + scan_every;
        }
    }
}

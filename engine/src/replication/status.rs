//! What an operator sees of one peer of a replicated volume: its state, the last reason it
//! is not up to date, and resync progress. Written by the peer runtime (connecting, diverged,
//! suspended), the link task (resyncing, up to date, behind) and read by the API, `/metrics`
//! and the dashboard. The data path reads only [`PeerStatus::lag`] (an async queue's bound);
//! the fan-out has its own [`super::LinkState`].

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

/// Longest reason kept, in bytes (a peer's refusal text is cut there).
pub const MAX_REASON_BYTES: usize = 256;

/// A peer's state as operators name it (DRBD's disk and connection states, folded into one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PeerState {
    /// Not connected; the runtime is trying (with backoff) or waiting for the peer to connect.
    Connecting = 0,
    /// Connected and holding every write.
    UpToDate = 1,
    /// Lacks writes (recorded in its dirty bitmap); not being caught up right now.
    Behind = 2,
    /// Being caught up from the dirty bitmap while new writes go to it too.
    Resyncing = 3,
    /// Both copies went on after a common generation: nothing moves until `resolve`.
    Diverged = 4,
    /// Stopped by the operator: writes only mark its bitmap until `resume`.
    Suspended = 5,
}

impl PeerState {
    pub fn name(self) -> &'static str {
        match self {
            PeerState::Connecting => "connecting",
            PeerState::UpToDate => "up-to-date",
            PeerState::Behind => "behind",
            PeerState::Resyncing => "resyncing",
            PeerState::Diverged => "diverged",
            PeerState::Suspended => "suspended",
        }
    }

    pub const ALL: [PeerState; 6] = [
        PeerState::Connecting,
        PeerState::UpToDate,
        PeerState::Behind,
        PeerState::Resyncing,
        PeerState::Diverged,
        PeerState::Suspended,
    ];

    fn from_u8(v: u8) -> PeerState {
        PeerState::ALL
            .get(v as usize)
            .copied()
            .unwrap_or(PeerState::Connecting)
    }
}

impl std::fmt::Display for PeerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A resync's progress: bytes it set out to copy (grows when writes dirty more regions
/// meanwhile), bytes copied and acknowledged, and when it started.
#[derive(Debug, Default)]
pub struct ResyncProgress {
    total_bytes: AtomicU64,
    done_bytes: AtomicU64,
    started_unix_ms: AtomicU64,
    /// When it ended (0: running, or none ever started).
    finished_unix_ms: AtomicU64,
}

/// A consistent-enough copy of [`ResyncProgress`] with the rate and ETA worked out.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ResyncSnapshot {
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub started_unix_ms: u64,
    /// When it ended (None while it runs).
    pub finished_unix_ms: Option<u64>,
    /// Bytes per second since the start (0 before a second has passed with progress).
    pub rate_bytes_per_s: f64,
    /// Seconds left at that rate (None while the rate is unknown).
    pub eta_s: Option<f64>,
}

impl ResyncProgress {
    /// A resync of `total_bytes` starts at `now_unix_ms`.
    pub fn start(&self, total_bytes: u64, now_unix_ms: u64) {
        self.done_bytes.store(0, Ordering::Relaxed);
        self.total_bytes.store(total_bytes, Ordering::Relaxed);
        self.started_unix_ms.store(now_unix_ms, Ordering::Relaxed);
        self.finished_unix_ms.store(0, Ordering::Relaxed);
    }

    /// The resync ended (the replica is up to date, or the link failed) at `now_unix_ms`.
    pub fn finish(&self, now_unix_ms: u64) {
        self.finished_unix_ms
            .store(now_unix_ms.max(1), Ordering::Relaxed);
    }

    /// Whether a resync ever started in this daemon's life.
    pub fn ever_started(&self) -> bool {
        self.started_unix_ms.load(Ordering::Relaxed) != 0
    }

    /// Writes dirtied `bytes` more while the resync ran.
    pub fn add_total(&self, bytes: u64) {
        self.total_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// `bytes` were copied and acknowledged.
    pub fn add_done(&self, bytes: u64) {
        self.done_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn snapshot(&self, now_unix_ms: u64) -> ResyncSnapshot {
        let total_bytes = self.total_bytes.load(Ordering::Relaxed);
        let done_bytes = self.done_bytes.load(Ordering::Relaxed);
        let started_unix_ms = self.started_unix_ms.load(Ordering::Relaxed);
        let finished_unix_ms = match self.finished_unix_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(ms),
        };
        let until_ms = finished_unix_ms.unwrap_or(now_unix_ms);
        let elapsed_s = until_ms.saturating_sub(started_unix_ms) as f64 / 1000.0;
        let rate_bytes_per_s = if started_unix_ms == 0 || elapsed_s < 1.0 {
            0.0
        } else {
            done_bytes as f64 / elapsed_s
        };
        let eta_s = (rate_bytes_per_s > 0.0 && finished_unix_ms.is_none())
            .then(|| total_bytes.saturating_sub(done_bytes) as f64 / rate_bytes_per_s);
        ResyncSnapshot {
            total_bytes,
            done_bytes,
            started_unix_ms,
            finished_unix_ms,
            rate_bytes_per_s,
            eta_s,
        }
    }
}

/// One peer's status (see the module). Every volume's replication state holds one per peer,
/// on primaries and replicas alike.
#[derive(Debug, Default)]
pub struct PeerStatus {
    state: AtomicU8,
    /// Why the peer is not up to date (a refusal, a timeout, "suspended by the operator").
    reason: Mutex<Option<String>>,
    /// When the current connection was established (0: not connected).
    connected_unix_ms: AtomicU64,
    pub resync: ResyncProgress,
    /// The replica's backlog. The only part of the status the data path reads: an async
    /// link's queue bound is charged here.
    pub lag: super::lag::ReplicaLag,
    /// Regions an online verify found different on this peer, since the daemon started.
    verify_mismatches: AtomicU64,
}

impl PeerStatus {
    pub fn state(&self) -> PeerState {
        PeerState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub fn set_state(&self, state: PeerState) {
        self.state.store(state as u8, Ordering::Release);
    }

    pub fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Set the state and say why (None clears the reason).
    pub fn set(&self, state: PeerState, reason: Option<&str>) {
        let reason = reason.map(|r| {
            let mut end = r.len().min(MAX_REASON_BYTES);
            while !r.is_char_boundary(end) {
                end -= 1;
            }
            r[..end].to_string()
        });
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = reason;
        self.set_state(state);
    }

    pub fn connected_unix_ms(&self) -> Option<u64> {
        match self.connected_unix_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(ms),
        }
    }

    /// An online verify found a region different on this peer.
    pub fn add_verify_mismatch(&self) {
        self.verify_mismatches.fetch_add(1, Ordering::Relaxed);
    }

    /// Regions online verifies found different on this peer since the daemon started.
    pub fn verify_mismatches(&self) -> u64 {
        self.verify_mismatches.load(Ordering::Relaxed)
    }

    pub fn set_connected(&self, now_unix_ms: Option<u64>) {
        self.connected_unix_ms
            .store(now_unix_ms.unwrap_or(0), Ordering::Relaxed);
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_reasons_are_bounded() {
        let s = PeerStatus::default();
        assert_eq!(s.state(), PeerState::Connecting);
        for st in PeerState::ALL {
            s.set(st, Some(&"é".repeat(300)));
            assert_eq!(s.state(), st);
            let r = s.reason().unwrap();
            assert!(r.len() <= MAX_REASON_BYTES && r.chars().all(|c| c == 'é'));
        }
        s.set(PeerState::UpToDate, None);
        assert_eq!(s.reason(), None);
    }

    #[test]
    fn progress_gives_a_rate_and_an_eta() {
        let p = ResyncProgress::default();
        p.start(1000, 10_000);
        assert_eq!(
            p.snapshot(10_500).eta_s,
            None,
            "under a second: no rate yet"
        );
        p.add_done(400);
        let s = p.snapshot(12_000);
        assert_eq!(s.rate_bytes_per_s, 200.0);
        assert_eq!(s.eta_s, Some(3.0));
        p.add_total(200);
        assert_eq!(p.snapshot(12_000).eta_s, Some(4.0));
        p.add_done(800);
        p.finish(14_000);
        let done = p.snapshot(60_000);
        assert_eq!((done.finished_unix_ms, done.eta_s), (Some(14_000), None));
        assert_eq!(done.rate_bytes_per_s, 300.0, "the rate stops at the end");
    }
}

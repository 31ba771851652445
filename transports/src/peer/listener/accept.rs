//! The acceptor loop and the handshake threads: admission to the handshake table, the
//! handshake itself under its deadline, and the hand-over of an established connection.

use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::super::exchange::{self, is_timeout, ExchangeError};
use super::super::handshake::{Acceptor, Refusal};
use super::super::{Nonce, ReplicatedVolumeId};
use super::table::Admit;
use super::{Established, Inner};
use crate::socket::{Conn, DeadlineStream, Listener};

/// Kinds of [`Refusal`], each with its own log rate limit: a flood of one kind never hides
/// another.
pub(super) const REFUSAL_KINDS: usize = 11;

fn refusal_kind(r: &Refusal) -> usize {
    match r {
        Refusal::Wire(_) => 0,
        Refusal::UnexpectedFrame { .. } => 1,
        Refusal::NoCommonVersion { .. } => 2,
        Refusal::WrongCluster { .. } => 3,
        Refusal::SameNode(_) => 4,
        Refusal::WrongVolume { .. } => 5,
        Refusal::BadProof => 6,
        Refusal::UnknownVolume(_) => 7,
        Refusal::RegionSizeMismatch { .. } => 8,
        Refusal::PeerRefused(_) => 9,
        Refusal::Finished => 10,
    }
}

pub(super) fn accept_loop(inner: &Arc<Inner>, listener: &Listener, label: &str) {
    listener.accept_until(&inner.stopping, "peer", label, |conn| {
        on_accept(inner, conn, label)
    });
}

fn on_accept(inner: &Arc<Inner>, conn: Conn, label: &str) {
    inner.counters.accepted.fetch_add(1, Ordering::Relaxed);
    if let Conn::Tcp(s) = &conn {
        let _ = s.set_nodelay(true);
        let _ = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::KeepAlive, &true);
        crate::peer::abort_when_unacknowledged(s);
    }
    let peer = conn.peer();
    let addr = conn.peer_ip();
    let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
    let dup = match conn.try_clone() {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(listener = label, %peer, error = %e,
                "peer: cannot duplicate socket; closing");
            return;
        }
    };
    let admitted = inner.handshakes().admit(id, addr, dup);
    match admitted {
        Admit::Busy => {
            inner.counters.cut_off.fetch_add(1, Ordering::Relaxed);
            if let Some(n) = inner.logs.cut_off.note() {
                tracing::warn!(listener = label, %peer, events = n,
                    "peer: too many handshakes winding down; closing new connection");
            }
            return;
        }
        Admit::Admitted { cut_off } => {
            for oldest in &cut_off {
                // Its thread sees the connection end and leaves; the slot is the newcomer's.
                oldest.shutdown();
                inner.counters.cut_off.fetch_add(1, Ordering::Relaxed);
                if let Some(n) = inner.logs.cut_off.note() {
                    tracing::warn!(listener = label, peer = %oldest.peer(), events = n,
                        "peer: handshake table full; cutting off the oldest unfinished handshake");
                }
            }
        }
    }
    let thread_inner = inner.clone();
    let label = label.to_string();
    let spawned = std::thread::Builder::new()
        .name("peer-handshake".into())
        .spawn(move || {
            handshake_thread(&thread_inner, conn, &peer, &label, id);
            finished(&thread_inner, id, addr);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "peer: cannot start handshake thread; closing connection");
        finished(inner, id, addr);
    }
}

/// The handshake thread of connection `id` is done (also if it never started).
fn finished(inner: &Inner, id: u64, addr: Option<IpAddr>) {
    let mut table = inner.handshakes();
    table.finished(id, addr);
    if table.threads() == 0 {
        inner.idle.notify_all();
    }
}

fn handshake_thread(inner: &Inner, conn: Conn, peer: &str, label: &str, id: u64) {
    let nonce = match Nonce::from_os_rng() {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(listener = label, %peer, error = %e, "peer: cannot start handshake");
            return;
        }
    };
    let volumes = inner.volumes.clone();
    let mut acceptor = Acceptor::new(
        inner.acceptor.clone(),
        move |v: ReplicatedVolumeId| volumes.lookup(v),
        nonce,
    );
    let mut stream = DeadlineStream {
        conn: &conn,
        deadline: Instant::now() + inner.handshake_deadline,
        per_op: inner.io_timeout,
        read_timeout: None,
        write_timeout: None,
    };
    let (session, welcome) = match exchange::run(&mut stream, &mut acceptor, None) {
        Ok(done) => done,
        Err(e) => return failed(inner, e, peer, label),
    };
    if inner.stopping.load(Ordering::Acquire) {
        return;
    }
    // The connection counts from here: before the Welcome, so a peer beyond the limit is
    // never told it is established.
    let Some(permit) = inner.connections.admit() else {
        inner.counters.over_limit.fetch_add(1, Ordering::Relaxed);
        if let Some(n) = inner.logs.over_limit.note() {
            tracing::warn!(listener = label, %peer, node = %session.peer_node,
                volume = %session.volume, events = n, limit = inner.connections.max(),
                "peer: too many peer connections; closing before the handshake completes");
        }
        return;
    };
    // The connection leaves the table before its Welcome: one cut off just now is never told
    // it is established, and one that was told is never shut down behind the runtime's back.
    if inner.handshakes().remove(id).is_none() {
        inner.counters.closed.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(listener = label, %peer, "peer: handshake cut off before its Welcome");
        return;
    }
    if let Some(bytes) = welcome {
        if let Err(e) = stream.write_all(&bytes) {
            inner.counters.closed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(listener = label, %peer, error = %e,
                "peer: cannot send the handshake's last frame");
            return;
        }
    }
    if let Err(e) = conn.set_timeouts(None) {
        tracing::warn!(listener = label, %peer, error = %e,
            "peer: cannot clear socket timeouts; closing");
        return;
    }
    inner.counters.established.fetch_add(1, Ordering::Relaxed);
    tracing::info!(listener = label, %peer, node = %session.peer_node, volume = %session.volume,
        version = session.version, "peer: connection established");
    (inner.on_established)(Established {
        fd: conn.into_fd(),
        session,
        peer: peer.to_string(),
        permit,
    });
}

/// Logs (rate-limited) and counts a handshake that ended without a session.
fn failed(inner: &Inner, error: ExchangeError, peer: &str, label: &str) {
    match error {
        ExchangeError::Refused(refusal) => {
            inner.counters.refused.fetch_add(1, Ordering::Relaxed);
            if let Some(n) = inner.logs.refusals[refusal_kind(&refusal)].note() {
                tracing::warn!(listener = label, %peer, reason = %refusal,
                    told = ?refusal.code(), events = n, "peer: handshake refused");
            }
        }
        ExchangeError::Io(e) if is_timeout(&e) => {
            inner.counters.timed_out.fetch_add(1, Ordering::Relaxed);
            if let Some(n) = inner.logs.timed_out.note() {
                tracing::warn!(listener = label, %peer, events = n,
                    deadline_ms = inner.handshake_deadline.as_millis(),
                    "peer: handshake deadline passed; dropping the connection");
            }
        }
        ExchangeError::Closed => {
            inner.counters.closed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(listener = label, %peer, "peer: peer left during the handshake");
        }
        ExchangeError::Io(e) => {
            inner.counters.closed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(listener = label, %peer, error = %e, "peer: handshake failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::{ClusterId, NodeId, PeerError, RefuseCode};

    #[test]
    fn every_refusal_has_its_own_log_limit() {
        let all = [
            Refusal::Wire(PeerError::SequenceExhausted),
            Refusal::UnexpectedFrame {
                expected: "Hello",
                found: crate::peer::FrameKind::Write,
            },
            Refusal::NoCommonVersion {
                ours_min: 1,
                ours_max: 1,
                theirs_min: 2,
                theirs_max: 2,
            },
            Refusal::WrongCluster {
                ours: ClusterId(1),
                theirs: ClusterId(2),
            },
            Refusal::SameNode(NodeId(1)),
            Refusal::WrongVolume {
                expected: ReplicatedVolumeId(1),
                found: ReplicatedVolumeId(2),
            },
            Refusal::BadProof,
            Refusal::UnknownVolume(ReplicatedVolumeId(1)),
            Refusal::RegionSizeMismatch { ours: 1, theirs: 2 },
            Refusal::PeerRefused(RefuseCode::Denied),
            Refusal::Finished,
        ];
        let mut kinds: Vec<usize> = all.iter().map(refusal_kind).collect();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds, (0..REFUSAL_KINDS).collect::<Vec<_>>());
    }
}

//! The acceptor loop and the handshake threads: admission, eviction of the oldest unfinished
//! handshake, and the hand-over of a negotiated connection to a reactor.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::super::conn;
use super::super::handshake::{negotiate, refuse};
use super::limits::{Admission, Slot};
use super::registry::ClientInfo;
use super::{Inner, REFUSAL_DEADLINE};
use crate::socket::{Conn, DeadlineStream, Listener};

pub(super) fn accept_loop(inner: &Arc<Inner>, listener: &Listener, label: &str) {
    listener.accept_until(&inner.stopping, "nbd", label, |conn| {
        on_accept(inner, conn, label)
    });
}

fn on_accept(inner: &Arc<Inner>, conn: Conn, label: &str) {
    let addr = conn.peer_ip();
    if let Some(ip) = addr {
        if !inner.allowed_clients.is_empty()
            && !inner.allowed_clients.iter().any(|n| n.contains(ip))
        {
            if let Some(n) = inner.log_not_allowed.note() {
                tracing::warn!(client = %ip, refused = n,
                    "nbd: client address not in [nbd] allowed_clients; closing");
            }
            return; // closed before any byte is sent
        }
    }
    if let Conn::Tcp(s) = &conn {
        let _ = s.set_nodelay(true);
        let _ = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::KeepAlive, &true);
    }
    let peer = conn.peer();
    let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
    let dup = match conn.try_clone() {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "nbd: cannot duplicate socket; closing");
            return;
        }
    };
    {
        let mut st = inner.handshakes.state.lock().expect("handshakes");
        let from_addr = addr.map_or(0, |a| st.per_address.get(&a).copied().unwrap_or(0));
        // Evicted handshakes leave within moments; this bounds the threads meanwhile.
        let hard_limit = 2 * inner.max_handshakes;
        if from_addr >= inner.max_handshakes_per_address || st.count >= hard_limit {
            drop(st);
            if let Some(n) = inner.log_handshakes.note() {
                tracing::warn!(%peer, refused = n, per_address = inner.max_handshakes_per_address,
                    "nbd: too many unfinished handshakes; closing new connection");
            }
            return;
        }
        if st.sockets.len() >= inner.max_handshakes {
            // Make room by cutting off the oldest unfinished handshake: a slow client holds a
            // slot for at most the time others take to arrive, never locks them out.
            if let Some((_, oldest)) = st.sockets.pop_first() {
                oldest.shutdown();
                if let Some(n) = inner.log_handshakes.note() {
                    tracing::warn!(
                        cut_off = n,
                        limit = inner.max_handshakes,
                        "nbd: handshake table full; cutting off the oldest unfinished handshake"
                    );
                }
            }
        }
        st.count += 1;
        st.sockets.insert(id, dup);
        if let Some(a) = addr {
            *st.per_address.entry(a).or_insert(0) += 1;
        }
    }
    let slot = Slot {
        handshakes: inner.handshakes.clone(),
        id,
        addr,
    };
    let admission = inner.admit(&inner.engine, addr);
    if let Admission::Refused(why) = &admission {
        if let Some(n) = inner.log_full.note() {
            tracing::warn!(%peer, refused = n, "nbd: refusing connection: {why}");
        }
    }
    let thread_inner = inner.clone();
    let label = label.to_string();
    let spawned = std::thread::Builder::new()
        .name("nbd-handshake".into())
        .spawn(move || {
            handshake_thread(&thread_inner, conn, id, peer, label, admission, &slot);
            // Let go of the engine before the slot says this thread is done, so a stopped
            // server holds the only references.
            drop(thread_inner);
            drop(slot);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "nbd: cannot start handshake thread; closing connection");
    }
}

fn handshake_thread(
    inner: &Inner,
    conn: Conn,
    id: u64,
    peer: String,
    listener: String,
    admission: Admission,
    slot: &Slot,
) {
    let (permit, task_slot) = match admission {
        Admission::Accepted { permit, task_slot } => (permit, task_slot),
        Admission::Refused(why) => {
            let mut stream = DeadlineStream {
                conn: &conn,
                deadline: Instant::now() + REFUSAL_DEADLINE.min(inner.handshake_deadline),
                per_op: inner.handshake_timeout,
                read_timeout: None,
                write_timeout: None,
            };
            if let Err(e) = refuse(&mut stream, &why) {
                tracing::debug!(%peer, error = %e, "nbd: refused client");
            }
            return;
        }
    };
    let mut stream = DeadlineStream {
        conn: &conn,
        deadline: Instant::now() + inner.handshake_deadline,
        per_op: inner.handshake_timeout,
        read_timeout: None,
        write_timeout: None,
    };
    let negotiated = match negotiate(&mut stream, &*inner.catalog, &inner.handshake) {
        Ok(Some(n)) => n,
        Ok(None) => {
            tracing::debug!(%peer, "nbd: client ended the handshake");
            return;
        }
        Err(e) if e.is_disconnect() => {
            tracing::debug!(%peer, error = %e, "nbd: client left during the handshake");
            return;
        }
        Err(e) => {
            tracing::info!(%peer, error = %e, "nbd: handshake failed");
            return;
        }
    };
    if inner.stopping.load(Ordering::Acquire) {
        tracing::debug!(%peer, "nbd: server stopping; dropping negotiated connection");
        return;
    }
    if let Err(e) = conn.set_timeouts(None) {
        tracing::debug!(%peer, error = %e, "nbd: cannot clear socket timeouts; closing");
        return;
    }
    slot.release_socket();
    let info = ClientInfo {
        id,
        peer: peer.clone(),
        export: negotiated.info.name.clone(),
        listener,
        since: SystemTime::now(),
        structured_replies: negotiated.structured_replies,
        extended_headers: negotiated.extended_headers,
        requests: 0,
        bytes_read: 0,
        bytes_written: 0,
        errors: 0,
    };
    // For the idle scan: a duplicate to shut the socket down with, never to close it.
    let idle_socket = match inner.idle_timeout {
        Some(_) => match conn.try_clone() {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!(%peer, error = %e, "nbd: cannot duplicate socket; closing");
                return;
            }
        },
        None => None,
    };
    let fd = conn.into_fd();
    tracing::info!(%peer, export = %info.export, structured = info.structured_replies,
        extended = info.extended_headers, "nbd: client connected");
    let stats = conn::spawn(
        &inner.engine,
        fd,
        negotiated,
        peer,
        conn::Setup {
            multishot: inner.multishot_recv,
            budget: inner.budget.clone(),
            task_slot: Some(task_slot),
            keep_alive: Some(Box::new(permit)),
        },
    );
    inner.registry.add(info, stats, idle_socket);
}

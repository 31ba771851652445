//! The replica's part of a resync (see the parent module): ask for its own dirty regions at
//! start, adopt the primary's history at its ResyncDone, record each Generation durably.

use ringblock_engine::replication::{GenerationId, PeerState};
use ringblock_engine::task::TaskCtx;
use ringblock_engine::RequestKind;

use super::super::body::Body;
use super::super::frame::FrameKind;
use super::super::RegionIndex as WireRegion;
use super::{request, Held, ReplicaServe};

/// Most ResyncRequests the start sends (the persisted runs are fewer; a longer list is
/// merged into ranges that cover it).
const MAX_REQUESTS: usize = 64;

impl ReplicaServe {
    /// What operators see of the primary on this node: resyncing from it until its
    /// ResyncDone, then up to date, behind once the connection ends.
    pub(super) fn set_status(&self, state: PeerState, reason: Option<&str>) {
        let replication = self.replication.as_ref();
        let peer = self
            .opts
            .primary_node
            .and_then(|n| replication.and_then(|r| r.replica(n)));
        if let Some(peer) = peer {
            peer.status.set(state, reason);
        }
    }

    /// Ask the primary for this copy's dirty regions for it (a crash left its activity log
    /// there: regions it may have written and the primary may not hold the same), then say
    /// that is all with a ResyncDone.
    pub(super) fn ask_for_own_dirty_regions(&mut self) -> Result<(), String> {
        let Some(replication) = self.replication.clone() else {
            // Not replicated here: nothing to ask for.
            return self.send_small(Body::ResyncDone {
                first: WireRegion(0),
                count: 1,
            });
        };
        let own = self
            .opts
            .primary_node
            .and_then(|node| replication.replica(node))
            .map(|r| r.dirty.runs())
            .unwrap_or_default();
        self.set_status(PeerState::Resyncing, None);
        let runs = ringblock_engine::replication::bitmap::coarsen(own, MAX_REQUESTS);
        for run in runs {
            let count = u32::try_from(run.end - run.start).unwrap_or(u32::MAX);
            self.send_small(Body::ResyncRequest {
                first: WireRegion(run.start),
                count,
            })?;
        }
        let regions = replication.activity.regions().clamp(1, u64::from(u32::MAX));
        self.send_small(Body::ResyncDone {
            first: WireRegion(0),
            count: regions as u32,
        })
    }

    /// Run the held frame once every request before it completed: a flush, after recording
    /// a Generation or adopting the primary's history.
    pub(super) fn submit_held(&mut self, ctx: &mut TaskCtx<'_>) -> Result<(), String> {
        let Some((seq, held)) = self.held else {
            return Ok(());
        };
        if !self.in_flight.is_empty() {
            return Ok(());
        }
        self.held = None;
        let kind = match held {
            Held::Flush => FrameKind::Flush,
            Held::Generation(id) => {
                self.follow_generation(id)?;
                FrameKind::Generation
            }
            Held::ResyncDone => {
                self.adopt_primary_history()?;
                FrameKind::ResyncDone
            }
        };
        let mut req = request(RequestKind::Flush, 0, 0, false, None);
        req.tag = seq.0;
        let port = self.port.as_ref().ok_or("port not made")?.clone();
        match ctx.submit(&self.handle, req, &port) {
            Ok(()) => {
                self.in_flight.insert(seq.0, (kind, 0..0));
                Ok(())
            }
            Err((_, e)) if kind == FrameKind::ResyncDone => {
                Err(format!("cannot persist the adopted history: {e}"))
            }
            Err((_, e)) => self.ack(kind, seq, Err(e)),
        }
    }

    /// The primary started generation `id`: remember it, and once this copy follows the
    /// primary, take it as its own (the flush after this persists it).
    fn follow_generation(&mut self, id: u64) -> Result<(), String> {
        let id = GenerationId::new(id).ok_or("generation id 0")?;
        if self.primary_history.current() == Some(id) {
            return Ok(()); // told twice: nothing new
        }
        self.primary_history
            .push(id)
            .map_err(|e| format!("generation from the primary: {e}"))?;
        if self.adopted {
            self.adopt(false)?;
        }
        Ok(())
    }

    /// The primary sent every region this copy lacked: its history becomes this copy's, and
    /// this copy's own dirty regions for it are resynced.
    fn adopt_primary_history(&mut self) -> Result<(), String> {
        if self.adopted {
            return Err("a second ResyncDone from the primary".into());
        }
        self.adopted = true;
        self.adopt(true)
    }

    fn adopt(&mut self, clear_own: bool) -> Result<(), String> {
        let Some(replication) = self.replication.clone() else {
            // A volume without replication state keeps no history to adopt.
            return Ok(());
        };
        replication.adopt_history(self.primary_history.clone());
        if clear_own {
            if let Some(r) = self.opts.primary_node.and_then(|n| replication.replica(n)) {
                r.dirty.clear_all();
            }
            self.set_status(PeerState::UpToDate, None);
        }
        self.handle.volume().replication_changed();
        tracing::info!(
            volume = %self.handle.volume().name,
            peer = %self.opts.peer,
            generation = ?self.primary_history.current(),
            "following the primary's generations"
        );
        Ok(())
    }
}

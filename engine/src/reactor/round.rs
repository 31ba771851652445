//! Flush rounds. Each device has a home reactor that serialises its rounds and writes its
//! metadata:
//!
//! 1. capture the metadata version, the allocator's quarantine and the chunk maps;
//! 2. sync the device (every write completed before the round began, and every chunk zeroing
//!    the captured maps rely on, becomes durable);
//! 3. write the captured metadata to the older slot (generation g+1) and sync, then the same
//!    metadata to the newer slot (g+2) and sync: only then is the change in every slot the
//!    loader could fall back to, so a later corruption of either slot loses nothing that was
//!    acknowledged;
//! 4. release the quarantine and answer every flush that joined the round.

use std::sync::atomic::Ordering;

use super::core::OpCtx;
use super::{Control, FlushWaiter, ReactorCore};
use crate::alloc::QuarantineSnapshot;
use crate::buf::{AlignedBuf, IoBuf};
use crate::ids::{ChunkIndex, DeviceId};
use crate::io::{Io, IoKind};
use crate::meta::MetaSnapshot;
use crate::request::Errno;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    SyncData,
    /// The older slot gets generation g+1.
    WriteFirst,
    SyncFirst,
    /// The newer slot gets the same metadata as generation g+2.
    WriteSecond,
    SyncSecond,
}

/// Metadata captured at the start of a round.
struct RoundMeta {
    version: u64,
    quarantine: QuarantineSnapshot,
    /// Slot images for the first (g+1) and second (g+2) write; taken when submitted.
    first: Option<AlignedBuf>,
    second: Option<AlignedBuf>,
}

pub(super) struct Round {
    waiters: Vec<FlushWaiter>,
    stage: Stage,
    meta: Option<RoundMeta>,
}

impl<I: Io> ReactorCore<I> {
    pub(super) fn control(&mut self, device: DeviceId, control: Control) {
        let home = self
            .homes
            .get_mut(&device)
            .expect("control routed to the device's home reactor");
        let reply = match control {
            Control::Create { volume, reply } => {
                home.volumes.push(volume);
                reply
            }
            Control::Delete { id, reply } => {
                if let Some(pos) = home.volumes.iter().position(|v| v.id == id) {
                    let volume = home.volumes.remove(pos);
                    let chunks = volume.size_bytes().div_ceil(volume.chunk_size_bytes());
                    for c in 0..chunks {
                        if let Some(p) = volume.mapping(ChunkIndex(c)) {
                            volume.set_mapping(ChunkIndex(c), None);
                            home.device.alloc.free(p);
                        }
                    }
                }
                reply
            }
            Control::Grow {
                id,
                size_bytes,
                reply,
            } => {
                if let Some(v) = home.volumes.iter().find(|v| v.id == id) {
                    v.set_size_bytes(size_bytes);
                }
                reply
            }
        };
        home.device.mark_meta_dirty();
        home.waiting.push(FlushWaiter::Control(reply));
        self.start_round(device);
    }

    pub(super) fn start_round(&mut self, device_id: DeviceId) {
        let home = self.homes.get_mut(&device_id).expect("home");
        if home.round.is_some() || home.waiting.is_empty() {
            return;
        }
        let device = home.device.clone();
        let waiters = std::mem::take(&mut home.waiting);
        if device.health.backing_deleted.load(Ordering::Acquire) {
            // Its backing file is gone: nothing can be made durable any more.
            device.health.flush_errors.fetch_add(1, Ordering::Relaxed);
            self.answer(waiters, Err(Errno::EIO));
            return;
        }
        let version = device.meta_version.load(Ordering::Acquire);
        let meta = if version != device.persisted_version.load(Ordering::Acquire) {
            let quarantine = device.alloc.snapshot_quarantine();
            let mut snapshot = MetaSnapshot {
                generation: home.generation + 1,
                volumes: home.volumes.iter().map(|v| v.record()).collect(),
            };
            let first = snapshot.encode(device.label.slot_bytes);
            snapshot.generation += 1;
            let second = snapshot.encode(device.label.slot_bytes);
            match (first, second) {
                (Ok(first), Ok(second)) => Some(RoundMeta {
                    version,
                    quarantine,
                    first: Some(AlignedBuf::from_slice(&first)),
                    second: Some(AlignedBuf::from_slice(&second)),
                }),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!(device = %device.name, "cannot encode metadata: {e}");
                    self.answer(waiters, Err(Errno::ENOSPC));
                    return;
                }
            }
        } else {
            None
        };
        if !device.persistent {
            // Nothing survives a restart: nothing to sync, and frees are final at once.
            if let Some(m) = meta {
                device.alloc.release(&m.quarantine);
                device
                    .persisted_version
                    .fetch_max(m.version, Ordering::AcqRel);
            }
            self.answer(waiters, Ok(()));
            return;
        }
        home.round = Some(Round {
            waiters,
            stage: Stage::SyncData,
            meta,
        });
        self.submit(
            device_id,
            IoKind::Sync,
            0,
            None,
            OpCtx::Round { device: device_id },
        );
    }

    pub(super) fn round_step(&mut self, device_id: DeviceId, result: Result<(), Errno>) {
        let home = self.homes.get_mut(&device_id).expect("home");
        let device = home.device.clone();
        let round = home.round.as_mut().expect("round in progress");
        if let Err(e) = result {
            device.health.flush_errors.fetch_add(1, Ordering::Relaxed);
            if round.stage != Stage::SyncData {
                device
                    .health
                    .metadata_failing
                    .store(true, Ordering::Relaxed);
            }
            if matches!(round.stage, Stage::WriteSecond | Stage::SyncSecond) {
                // The first slot's write is durable: it is the newest now, and the next round
                // writes the other (unknown) slot first. Nothing counts as persisted until a
                // round writes both slots.
                home.generation += 1;
                home.next_slot ^= 1;
            }
            tracing::error!(device = %device.name, stage = ?round.stage, "flush failed: {e}");
            let round = home.round.take().expect("round");
            self.answer(round.waiters, Err(Errno::EIO));
            self.start_round(device_id);
            return;
        }
        let sync = |core: &mut Self| {
            core.submit(
                device_id,
                IoKind::Sync,
                0,
                None,
                OpCtx::Round { device: device_id },
            )
        };
        let write_slot = |core: &mut Self, slot: u64, image: AlignedBuf| {
            core.submit(
                device_id,
                IoKind::Write { fua: false },
                device.label.slot_offset_bytes(slot),
                Some(IoBuf::owned(image)),
                OpCtx::Round { device: device_id },
            )
        };
        match (round.stage, round.meta.as_mut()) {
            (Stage::SyncData, Some(meta)) => {
                round.stage = Stage::WriteFirst;
                let image = meta.first.take().expect("first image");
                let slot = home.next_slot;
                write_slot(self, slot, image);
            }
            (Stage::WriteFirst, _) => {
                round.stage = Stage::SyncFirst;
                sync(self);
            }
            (Stage::SyncFirst, Some(meta)) => {
                round.stage = Stage::WriteSecond;
                let image = meta.second.take().expect("second image");
                let slot = home.next_slot ^ 1;
                write_slot(self, slot, image);
            }
            (Stage::WriteSecond, _) => {
                round.stage = Stage::SyncSecond;
                sync(self);
            }
            (Stage::SyncData, None) | (Stage::SyncSecond, _) => {
                let round = home.round.take().expect("round");
                if let Some(meta) = round.meta {
                    // Both slots hold the round's metadata; the older slot stays the one
                    // written first next time.
                    home.generation += 2;
                    device.alloc.release(&meta.quarantine);
                    device
                        .persisted_version
                        .fetch_max(meta.version, Ordering::AcqRel);
                    device
                        .health
                        .metadata_failing
                        .store(false, Ordering::Relaxed);
                    if let Some(was) = device.health.clear_metadata_warning() {
                        tracing::info!(
                            device = %device.name,
                            generations = %format!("{} and {}", home.generation - 1, home.generation),
                            "both metadata slots rewritten; metadata warning cleared (was: {was})"
                        );
                    }
                }
                self.answer(round.waiters, Ok(()));
                self.start_round(device_id);
            }
            (Stage::SyncFirst, None) => unreachable!("a round without metadata only syncs data"),
        }
    }

    fn answer(&mut self, waiters: Vec<FlushWaiter>, result: Result<(), Errno>) {
        for w in waiters {
            match w {
                FlushWaiter::Request(req) => {
                    if let Err(e) = result {
                        req.fail(e);
                    }
                    if req.part_done() {
                        req.complete();
                    }
                }
                FlushWaiter::Control(reply) => reply(result),
                FlushWaiter::Activity(parked) => {
                    crate::front::release_parked(parked, result, &mut |to, msg| self.send(to, msg));
                }
            }
        }
    }
}

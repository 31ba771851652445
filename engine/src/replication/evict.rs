//! Activity-log eviction: a region leaves the activity log once every replica durably holds
//! every write to it, or has it marked in its dirty bitmap. Without it the log only grows, and
//! a power cut of the primary resyncs every region written since it started.
//!
//! One **cycle** (run by the peer runtime now and then on an idle-enough volume):
//! 1. No region is *recent* any more ([`VolumeReplication::start_eviction_cycle`]). Every
//!    replicated write enters the write barrier, then marks its regions recent, then tests the
//!    persisted activity log (`front::submit`).
//! 2. Wait for a barrier ticket: every write that entered before it has completed. A write
//!    that entered after it marked its regions recent (after step 1's clear).
//! 3. Note each link's standing. A resyncing link, or one that fell behind and whose task has
//!    not yet marked what it lacks, ends the cycle.
//! 4. Flush the volume. A sync replica has every write of step 2 durably when it completes.
//!    Then wait until every up-to-date link had a Flush op acknowledged that was pushed after
//!    those writes' ops (ops go and are answered in order): an async replica's copy is durable
//!    too. A behind link's lacks are in its bitmap (marked at the fan-out, or by its task).
//! 5. A link whose standing changed ends the cycle.
//! 6. The candidates: regions in the persisted log and not recent. Their persisted bits are
//!    retired, so a write to one from now on waits for a metadata round (which puts it back).
//!    Wait for a second ticket: a write that tested a retired bit before it was retired
//!    entered the barrier before the ticket, and completes; it had marked the region recent.
//! 7. The candidates still not recent go to the next metadata round, which drops each from
//!    the log unless a write marked it recent meanwhile, and persists the log with the
//!    bitmaps in one record ([`VolumeReplication::record`]). A flush makes that round happen.
//!
//! Every wait is bounded; a cycle that cannot finish evicts nothing (retired persisted bits
//! only cost a write one metadata round).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fanout::{LinkStanding, LinkState, ReplicaLink};
use super::state::VolumeReplication;

/// How long each wait of a cycle may take.
#[derive(Clone, Copy, Debug)]
pub struct EvictTiming {
    pub wait: Duration,
}

impl Default for EvictTiming {
    fn default() -> Self {
        EvictTiming {
            wait: Duration::from_secs(30),
        }
    }
}

/// What a cycle did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CycleOutcome {
    /// The activity log is empty.
    Idle,
    /// This many regions left the activity log (0: every region was written meanwhile).
    Evicted(usize),
    /// The cycle stopped, evicting nothing, for this reason.
    Aborted(String),
}

/// What a cycle needs from its surroundings: a flush of the volume through the write path,
/// a way to mark the volume's metadata dirty, and a pause between looks while it waits (a
/// short sleep; on the simulator, a step).
pub trait EvictHost {
    fn flush(&mut self) -> Result<(), String>;
    fn metadata_changed(&mut self);
    fn pause(&mut self);
    /// True when the cycle should give up (the daemon stops).
    fn stopping(&self) -> bool;
}

/// Run one eviction cycle (see the module) over `links`, the volume's replica set.
pub fn run_cycle(
    replication: &VolumeReplication,
    links: &[Arc<ReplicaLink>],
    host: &mut dyn EvictHost,
    timing: EvictTiming,
) -> CycleOutcome {
    match cycle(replication, links, host, timing) {
        Ok(outcome) => outcome,
        Err(reason) => CycleOutcome::Aborted(reason),
    }
}

fn cycle(
    replication: &VolumeReplication,
    links: &[Arc<ReplicaLink>],
    host: &mut dyn EvictHost,
    timing: EvictTiming,
) -> Result<CycleOutcome, String> {
    if replication.activity.dirty_regions() == 0 {
        return Ok(CycleOutcome::Idle);
    }
    replication.start_eviction_cycle();
    let ticket = replication.barrier.ticket();
    wait(host, timing, "writes in flight", || {
        replication.barrier.passed(&ticket)
    })?;
    let before: Vec<LinkStanding> = links.iter().map(|l| l.standing()).collect();
    if let Some(s) = before.iter().find(|s| !steady(s)) {
        return Err(format!("a replica is {:?}", s.state));
    }
    host.flush()?;
    for (link, standing) in links.iter().zip(&before) {
        if standing.state != LinkState::UpToDate {
            continue;
        }
        let pushed = link.flushes().0;
        wait(host, timing, "a replica's flush", || {
            link.flushes().1 >= pushed || link.standing().transitions != standing.transitions
        })?;
    }
    let moved = links
        .iter()
        .zip(&before)
        .any(|(l, s)| l.standing().transitions != s.transitions);
    if moved {
        return Err("a replica changed state".into());
    }
    let candidates = replication.eviction_candidates();
    if candidates.is_empty() {
        return Ok(CycleOutcome::Evicted(0));
    }
    replication.retire_persisted(&candidates);
    let ticket = replication.barrier.ticket();
    wait(host, timing, "writes in flight", || {
        replication.barrier.passed(&ticket)
    })?;
    let queued = replication.queue_eviction(&candidates);
    host.metadata_changed();
    host.flush()?;
    Ok(CycleOutcome::Evicted(queued))
}

/// Up to date, or behind with every lack marked.
fn steady(s: &LinkStanding) -> bool {
    match s.state {
        LinkState::UpToDate => true,
        LinkState::Behind => s.failure_settled,
        LinkState::Resyncing => false,
    }
}

fn wait(
    host: &mut dyn EvictHost,
    timing: EvictTiming,
    what: &str,
    mut done: impl FnMut() -> bool,
) -> Result<(), String> {
    let until = Instant::now() + timing.wait;
    while !done() {
        if host.stopping() {
            return Err("stopping".into());
        }
        if Instant::now() >= until {
            return Err(format!("{what} took longer than {:?}", timing.wait));
        }
        host.pause();
    }
    Ok(())
}

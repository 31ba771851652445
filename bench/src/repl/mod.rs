//! Replication: what a replica costs the primary's writers, how fast a resync goes, and where
//! the primary's sends go zero-copy.
//!
//! - [`cluster`]: a primary daemon with a RAM volume over NBD and none, one sync or one async
//!   replica in a second daemon, on loopback; their API and `/metrics`.
//! - [`step`]: the `replication` step of `run` (the set-ups side by side, fio's nbd engine at
//!   4k random write QD1 and QD32, the resync with zero-copy sends on and off).
//! - [`report`]: its section of `report.md`.
//! - [`screenshot`]: `repl-screenshot`, the dashboard during a real resync in headless
//!   Chromium.

pub mod cluster;
pub mod report;
pub mod screenshot;
pub mod step;

use serde::{Deserialize, Serialize};

use crate::results::{HeadlineRow, PointResult};
use cluster::SendTotals;

/// What the replication step measured (`summary.json`'s `replication`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplicationResult {
    /// One per set-up (none, sync, async): what the daemon reported and its points.
    pub setups: Vec<SetupResult>,
    /// Ratios against the set-up without a replica, with their goals.
    pub goals: Vec<HeadlineRow>,
    pub resyncs: Vec<ResyncResult>,
    /// The primary's sends over the set-ups' QD32 points (first repeat, first round).
    pub sends: Vec<SendsResult>,
    /// Why a part was not measured.
    pub failures: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SetupResult {
    /// `none`, `sync`, `async`.
    pub id: String,
    /// The mode the primary's `GET /api/replication` reports for its peer (None: no replica).
    pub reported_mode: Option<String>,
    /// What the daemon's log says of that mode (e.g. that async is kept synchronously).
    pub mode_note: Option<String>,
    pub primary_command: String,
    pub points: Vec<PointResult>,
}

/// One resync: the replica suspended, `written_bytes` written, resumed, `last_resync` read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResyncResult {
    pub repeat: usize,
    /// `zero_copy_sends` of the daemons.
    pub zero_copy_sends: bool,
    pub written_bytes: u64,
    /// From `last_resync`.
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub seconds: f64,
    pub mib_s: f64,
    /// The daemon's own rate at the end.
    pub reported_mib_s: f64,
    /// The primary's sends during the resync.
    pub sends: SendTotals,
}

/// The primary's sends over one measurement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SendsResult {
    pub setup: String,
    pub what: String,
    pub sends: SendTotals,
}

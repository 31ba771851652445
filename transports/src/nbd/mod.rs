//! NBD server: the fixed-newstyle handshake runs with blocking IO on the acceptor thread (it is
//! short and rare); once the client enters the transmission phase the connection becomes a
//! task on a reactor, where its socket IO goes through that reactor's io_uring.

pub mod cidr;
pub mod client;
pub mod conn;
pub mod handshake;
pub mod server;
pub mod wire;

use std::sync::Arc;

use ringblock_engine::{Engine, VolumeHandle};

use crate::replica_guard::export_refusal;

/// Largest request payload we accept (the NBD recommendation; clients split larger IO).
pub const MAX_BLOCK_BYTES: u32 = 32 << 20;
/// Preferred request size we advertise.
pub const PREFERRED_BLOCK_BYTES: u32 = 4096;

/// What a client sees of one export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size_bytes: u64,
    pub read_only: bool,
    /// Smallest alignment of offsets and lengths (the device's logical block size).
    pub min_block_bytes: u32,
    pub preferred_block_bytes: u32,
    pub max_block_bytes: u32,
}

/// The exports a server offers; backed by the engine's volumes.
pub trait ExportCatalog: Send + Sync {
    fn list(&self) -> Vec<ExportInfo>;
    /// Open an export for IO. `None` if there is no such export.
    fn open(&self, name: &str) -> Option<(ExportInfo, VolumeHandle)>;
    /// The export used when a client asks for the empty name.
    fn default_export(&self) -> Option<String>;
    /// Why `name` exists but may not be exported here (the client is told), if so.
    fn refusal(&self, _name: &str) -> Option<String> {
        None
    }
}

/// Every engine volume is an export; `read_only` lists those exported read-only.
pub struct EngineCatalog {
    pub engine: Arc<Engine>,
    pub read_only: Vec<String>,
}

impl EngineCatalog {
    fn info(&self, v: &ringblock_engine::Volume) -> ExportInfo {
        ExportInfo {
            name: v.name.clone(),
            description: format!(
                "ringblock volume {} on device {} ({})",
                v.name, v.device.name, v.device.kind
            ),
            size_bytes: v.size_bytes(),
            read_only: self.read_only.iter().any(|r| r == &v.name),
            min_block_bytes: v.device.profile.logical_block_size_bytes,
            preferred_block_bytes: v
                .device
                .profile
                .physical_block_size_bytes
                .max(PREFERRED_BLOCK_BYTES),
            max_block_bytes: MAX_BLOCK_BYTES,
        }
    }
}

impl ExportCatalog for EngineCatalog {
    fn list(&self) -> Vec<ExportInfo> {
        self.engine
            .volumes()
            .iter()
            .filter(|v| export_refusal(v).is_none())
            .map(|v| self.info(v))
            .collect()
    }

    fn open(&self, name: &str) -> Option<(ExportInfo, VolumeHandle)> {
        let handle = self.engine.open(name).ok()?;
        if export_refusal(handle.volume()).is_some() {
            return None;
        }
        Some((self.info(handle.volume()), handle))
    }

    fn refusal(&self, name: &str) -> Option<String> {
        export_refusal(&*self.engine.volume(name)?)
    }

    fn default_export(&self) -> Option<String> {
        let vols: Vec<_> = self
            .engine
            .volumes()
            .into_iter()
            .filter(|v| export_refusal(v).is_none())
            .collect();
        vols.iter()
            .find(|v| v.name == "default")
            .or(vols.first())
            .map(|v| v.name.clone())
    }
}

/// What the handshake agreed on; everything the transmission phase needs.
pub struct Negotiated {
    pub info: ExportInfo,
    pub handle: VolumeHandle,
    /// Structured replies (READ as OFFSET_DATA/OFFSET_HOLE chunks, BLOCK_STATUS).
    pub structured_replies: bool,
    /// Extended headers: 64-bit lengths, every reply structured-extended.
    pub extended_headers: bool,
    /// Context id of `base:allocation`, if the client selected it.
    pub base_allocation_id: Option<u32>,
    /// The transmission flags sent to the client.
    pub transmission_flags: u16,
}

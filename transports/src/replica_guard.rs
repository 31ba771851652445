//! A replica copy of a volume is written only by its primary (through the peer link): no
//! export serves it, so no client can write it behind the primary's back.

use ringblock_engine::replication::Role;
use ringblock_engine::Volume;

/// Why `volume` may not be exported here, if it may not.
pub fn export_refusal(volume: &Volume) -> Option<String> {
    let replication = volume.replication()?;
    (replication.role() == Role::Replica).then(|| {
        format!(
            "volume {} is a replica copy on this node: it is served by its primary \
             (`ringblock volume promote {}` makes this copy the primary)",
            volume.name, volume.name
        )
    })
}

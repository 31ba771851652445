//! Cluster-wide names derived from configuration text: every node computes the same ids from
//! the same `cluster_id` and volume name, so nothing needs to be agreed on beforehand.
//!
//! - a [`ClusterId`] is the first 16 bytes of SHA-256("ringblock-cluster\0" || cluster_id);
//! - a [`ReplicatedVolumeId`] is the first 8 bytes (little-endian) of
//!   SHA-256("ringblock-volume\0" || cluster_id || "\0" || volume name).
//!
//! The NUL separators keep ("ab", "c") and ("a", "bc") apart; cluster ids and volume names
//! hold no NUL.

use sha2::{Digest, Sha256};

use super::{ClusterId, ReplicatedVolumeId};

/// The cluster's id on the wire.
pub fn cluster_id(cluster: &str) -> ClusterId {
    let digest = Sha256::new()
        .chain_update(b"ringblock-cluster\0")
        .chain_update(cluster.as_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    ClusterId(u128::from_le_bytes(bytes))
}

/// Volume `name`'s id on the wire, in cluster `cluster`.
pub fn volume_id(cluster: &str, name: &str) -> ReplicatedVolumeId {
    let digest = Sha256::new()
        .chain_update(b"ringblock-volume\0")
        .chain_update(cluster.as_bytes())
        .chain_update(b"\0")
        .chain_update(name.as_bytes())
        .finalize();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    ReplicatedVolumeId(u64::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_follow_the_documented_hash() {
        // SHA-256("ringblock-volume\0lab\0db"), first 8 bytes as little-endian.
        let digest = Sha256::digest(b"ringblock-volume\0lab\0db");
        let expected = u64::from_le_bytes(digest[..8].try_into().unwrap());
        assert_eq!(volume_id("lab", "db"), ReplicatedVolumeId(expected));
        let digest = Sha256::digest(b"ringblock-cluster\0lab");
        let expected = u128::from_le_bytes(digest[..16].try_into().unwrap());
        assert_eq!(cluster_id("lab"), ClusterId(expected));
        assert_eq!(volume_id("lab", "db"), volume_id("lab", "db"));
    }

    #[test]
    fn the_separator_keeps_names_apart() {
        assert_ne!(volume_id("ab", "c"), volume_id("a", "bc"));
        assert_ne!(volume_id("lab", "db"), volume_id("lab2", "db"));
        assert_ne!(cluster_id("lab"), cluster_id("lab2"));
    }
}

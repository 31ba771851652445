//! Mutual authentication with a shared cluster secret: each side proves it holds the secret by
//! an HMAC-SHA256 over the handshake transcript (both nonces, both node ids, the cluster, the
//! volume, the version, both generation histories) and a label naming the direction, so a proof
//! can be neither reflected back to its sender nor replayed into another handshake (the other
//! side's fresh nonce is in it). The secret itself never crosses the wire.

use std::fmt;
use std::sync::Arc;

use hmac::{Hmac, Mac as _};
use rand::RngCore;
use sha2::Sha256;

use super::body::{Challenge, GenerationHistory, Hello};
use super::{PeerError, ReplicatedVolumeId};

/// Bytes of a nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a proof (HMAC-SHA256).
pub const MAC_LEN: usize = 32;
/// Shortest cluster secret accepted: 128 bits.
pub const MIN_SECRET_BYTES: usize = 16;

/// Labels of the two proofs; they differ so the initiator's proof is never a valid acceptor
/// proof (reflection).
const INITIATOR_LABEL: &[u8] = b"ringblock peer v1: initiator proof";
const ACCEPTOR_LABEL: &[u8] = b"ringblock peer v1: acceptor proof";

type HmacSha256 = Hmac<Sha256>;

/// The secret every node of a cluster shares (cheap to clone: one per connection). Its bytes
/// are never printed.
#[derive(Clone)]
pub struct ClusterSecret(Arc<[u8]>);

impl ClusterSecret {
    /// A secret of at least [`MIN_SECRET_BYTES`] bytes.
    pub fn new(bytes: Vec<u8>) -> Result<ClusterSecret, PeerError> {
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(PeerError::WeakSecret {
                length: bytes.len(),
            });
        }
        Ok(ClusterSecret(bytes.into()))
    }

    fn hmac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length; new_from_slice cannot fail for it.
        match HmacSha256::new_from_slice(&self.0) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        }
    }
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterSecret({} bytes, redacted)", self.0.len())
    }
}

/// A handshake nonce: fresh from the OS random number generator for every handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Nonce(pub [u8; NONCE_LEN]);

impl Nonce {
    /// A nonce from the operating system's random number generator (getrandom).
    pub fn from_os_rng() -> Result<Nonce, PeerError> {
        let mut bytes = [0u8; NONCE_LEN];
        rand::rngs::OsRng
            .try_fill_bytes(&mut bytes)
            .map_err(|e| PeerError::Random {
                reason: e.to_string(),
            })?;
        Ok(Nonce(bytes))
    }
}

/// A proof: HMAC-SHA256 over a label and the transcript.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; MAC_LEN]);

/// What the acceptor adds to the transcript for its own proof.
#[derive(Clone, Copy, Debug)]
pub struct AcceptorPart<'a> {
    pub volume_size_bytes: u64,
    pub region_size_bytes: u32,
    pub history: &'a GenerationHistory,
}

/// The handshake as both sides saw it, the input of both proofs.
#[derive(Clone, Copy, Debug)]
pub struct Transcript<'a> {
    pub volume: ReplicatedVolumeId,
    pub hello: &'a Hello,
    pub challenge: &'a Challenge,
}

impl Transcript<'_> {
    fn feed(&self, m: &mut HmacSha256, label: &[u8]) {
        // Every variable-length item is preceded by its length, so no two transcripts feed the
        // same bytes.
        m.update(&(label.len() as u32).to_le_bytes());
        m.update(label);
        m.update(&self.volume.0.to_le_bytes());
        let h = self.hello;
        m.update(&[h.version_min, h.version_max]);
        m.update(&h.cluster.0.to_le_bytes());
        m.update(&h.node.0.to_le_bytes());
        m.update(&h.nonce.0);
        m.update(&h.volume_size_bytes.to_le_bytes());
        m.update(&h.region_size_bytes.to_le_bytes());
        feed_history(m, &h.history);
        let c = self.challenge;
        m.update(&[c.version]);
        m.update(&c.node.0.to_le_bytes());
        m.update(&c.nonce.0);
    }

    /// The initiator's proof.
    pub fn initiator_proof(&self, secret: &ClusterSecret) -> Mac {
        let mut m = secret.hmac();
        self.feed(&mut m, INITIATOR_LABEL);
        Mac(m.finalize().into_bytes().into())
    }

    /// True when `mac` is the initiator's proof, compared in constant time.
    pub fn verify_initiator(&self, secret: &ClusterSecret, mac: &Mac) -> bool {
        let mut m = secret.hmac();
        self.feed(&mut m, INITIATOR_LABEL);
        m.verify_slice(&mac.0).is_ok()
    }

    fn feed_acceptor(&self, m: &mut HmacSha256, part: &AcceptorPart<'_>) {
        self.feed(m, ACCEPTOR_LABEL);
        m.update(&part.volume_size_bytes.to_le_bytes());
        m.update(&part.region_size_bytes.to_le_bytes());
        feed_history(m, part.history);
    }

    /// The acceptor's proof, which also covers what its Welcome tells.
    pub fn acceptor_proof(&self, secret: &ClusterSecret, part: &AcceptorPart<'_>) -> Mac {
        let mut m = secret.hmac();
        self.feed_acceptor(&mut m, part);
        Mac(m.finalize().into_bytes().into())
    }

    /// True when `mac` is the acceptor's proof, compared in constant time.
    pub fn verify_acceptor(
        &self,
        secret: &ClusterSecret,
        part: &AcceptorPart<'_>,
        mac: &Mac,
    ) -> bool {
        let mut m = secret.hmac();
        self.feed_acceptor(&mut m, part);
        m.verify_slice(&mac.0).is_ok()
    }
}

fn feed_history(m: &mut HmacSha256, history: &GenerationHistory) {
    m.update(&(history.ids().len() as u32).to_le_bytes());
    for g in history.ids() {
        m.update(&g.to_le_bytes());
    }
}

//! The handshake as two sans-IO state machines, one per side. The caller decodes frames, feeds
//! them in, sends the bytes each [`Step`] returns, and stops at [`Progress::Established`] or
//! [`Progress::Refused`]. Timeouts are the caller's: it drops a handshake that takes too long.
//!
//! ```text
//! initiator                                   acceptor
//!   Hello(versions, cluster, node, volume,  →   check version overlap, cluster, not itself
//!         history, nonce_i)
//!                                           ←   Challenge(version, node, nonce_a)
//!   check version, not itself; prove        →   Response(HMAC_i)
//!                                               verify HMAC_i; look the volume up
//!                                           ←   Welcome(HMAC_a, volume size, region size,
//!   verify HMAC_a: established                          history): established
//! ```
//!
//! The initiator proves itself first: the acceptor listens to the network, so it shows nothing
//! keyed by the secret to a peer that has not proved it holds the secret. Failures get one
//! Refuse frame with a coarse [`RefuseCode`]: before the peer's proof only `Version` or `Denied`
//! (a wrong cluster, a failed proof and a node talking to itself look alike), after it also
//! `UnknownVolume` or `VolumeMismatch`, which help an operator and tell an authenticated peer
//! nothing it could not learn. The exact reason is the [`Refusal`] the caller logs.
//!
//! Every frame is checked for its sequence number (0, then 1, each way) and its volume id, so
//! a duplicated, replayed or reordered frame ends the handshake; a proof replayed from another
//! handshake fails because the other side's nonce is fresh.

use super::auth::{AcceptorPart, ClusterSecret, Nonce, Transcript};
use super::body::{encode_frame, Body, Challenge, Frame, GenerationHistory, Hello, RefuseCode};
use super::frame::FrameKind;
use super::{
    ClusterId, NodeId, PeerError, ReplicatedVolumeId, Seq, PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN,
};

/// What the initiator brings: who it is and which volume it replicates.
#[derive(Clone, Debug)]
pub struct InitiatorConfig {
    pub cluster: ClusterId,
    pub node: NodeId,
    pub secret: ClusterSecret,
    pub volume: ReplicatedVolumeId,
    pub volume_size_bytes: u64,
    pub region_size_bytes: u32,
    pub history: GenerationHistory,
}

/// What the acceptor brings: who it is. Volumes are looked up per handshake.
#[derive(Clone, Debug)]
pub struct AcceptorConfig {
    pub cluster: ClusterId,
    pub node: NodeId,
    pub secret: ClusterSecret,
}

/// This node's copy of a volume, as the acceptor tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalVolume {
    pub volume_size_bytes: u64,
    pub region_size_bytes: u32,
    pub history: GenerationHistory,
}

/// The acceptor's view of the volumes it holds copies of.
pub trait VolumeLookup {
    /// This node's copy of `volume`, or `None` when it has none.
    fn lookup(&self, volume: ReplicatedVolumeId) -> Option<LocalVolume>;
}

impl<F: Fn(ReplicatedVolumeId) -> Option<LocalVolume>> VolumeLookup for F {
    fn lookup(&self, volume: ReplicatedVolumeId) -> Option<LocalVolume> {
        self(volume)
    }
}

/// What an established connection knows about its peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub version: u8,
    pub volume: ReplicatedVolumeId,
    pub peer_node: NodeId,
    pub peer_history: GenerationHistory,
    pub peer_volume_size_bytes: u64,
    pub region_size_bytes: u32,
    /// Sequence number of our next frame (the handshake took the first ones).
    pub next_send: Seq,
    /// Sequence number the peer's next frame must carry.
    pub next_recv: Seq,
}

/// Why a handshake failed, exactly; for our log. The peer is told only [`Refusal::code`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("bad frame: {0}")]
    Wire(PeerError),
    #[error("unexpected {found:?} frame while waiting for {expected}")]
    UnexpectedFrame {
        expected: &'static str,
        found: FrameKind,
    },
    #[error("no common protocol version: we speak {ours_min}..={ours_max}, the peer {theirs_min}..={theirs_max}")]
    NoCommonVersion {
        ours_min: u8,
        ours_max: u8,
        theirs_min: u8,
        theirs_max: u8,
    },
    #[error("peer belongs to cluster {theirs}, we to {ours}")]
    WrongCluster { ours: ClusterId, theirs: ClusterId },
    #[error("peer claims our own node id {0} (a node connected to itself?)")]
    SameNode(NodeId),
    #[error("frame for volume {found} in a handshake for volume {expected}")]
    WrongVolume {
        expected: ReplicatedVolumeId,
        found: ReplicatedVolumeId,
    },
    #[error("peer's proof does not verify: it does not hold the cluster secret, or the handshake was tampered with or replayed")]
    BadProof,
    #[error("no copy of volume {0} on this node")]
    UnknownVolume(ReplicatedVolumeId),
    #[error("region sizes differ: ours {ours} bytes, the peer's {theirs} bytes")]
    RegionSizeMismatch { ours: u32, theirs: u32 },
    #[error("peer refused: {0:?}")]
    PeerRefused(RefuseCode),
    #[error("the handshake has already ended")]
    Finished,
}

impl Refusal {
    /// What the peer is told, if anything (a peer that refused, or a finished handshake, gets
    /// nothing more).
    pub fn code(&self) -> Option<RefuseCode> {
        Some(match self {
            Refusal::Wire(PeerError::UnsupportedVersion { .. })
            | Refusal::NoCommonVersion { .. } => RefuseCode::Version,
            Refusal::Wire(_) | Refusal::UnexpectedFrame { .. } | Refusal::WrongVolume { .. } => {
                RefuseCode::Protocol
            }
            Refusal::WrongCluster { .. } | Refusal::SameNode(_) | Refusal::BadProof => {
                RefuseCode::Denied
            }
            Refusal::UnknownVolume(_) => RefuseCode::UnknownVolume,
            Refusal::RegionSizeMismatch { .. } => RefuseCode::VolumeMismatch,
            Refusal::PeerRefused(_) | Refusal::Finished => return None,
        })
    }
}

/// Where a handshake is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Waiting for the peer's next frame.
    Pending,
    Established(Session),
    Refused(Refusal),
}

/// The result of feeding one frame: bytes to send (a whole frame), and where the handshake is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub send: Option<Vec<u8>>,
    pub progress: Progress,
}

/// Sequence numbers and the volume of one handshake, shared by both sides.
#[derive(Debug)]
struct Channel {
    volume: ReplicatedVolumeId,
    sent: u64,
    received: u64,
    done: bool,
}

impl Channel {
    fn frame(&mut self, body: Body<'_>) -> Vec<u8> {
        let frame = Frame::new(Seq(self.sent), self.volume, body);
        self.sent += 1;
        let mut out = Vec::with_capacity(frame.body.payload_len() + super::HEADER_LEN);
        encode_frame(&frame, &mut out);
        out
    }

    /// Checks a frame's sequence number and volume before its type and content.
    fn receive(&mut self, frame: &Frame<'_>) -> Result<(), Refusal> {
        if frame.seq != Seq(self.received) {
            return Err(Refusal::Wire(PeerError::OutOfSequence {
                expected: Seq(self.received),
                found: frame.seq,
            }));
        }
        if frame.volume != self.volume {
            return Err(Refusal::WrongVolume {
                expected: self.volume,
                found: frame.volume,
            });
        }
        self.received += 1;
        Ok(())
    }

    fn pending(&self, send: Vec<u8>) -> Step {
        Step {
            send: Some(send),
            progress: Progress::Pending,
        }
    }

    fn established(&mut self, send: Option<Vec<u8>>, session: Session) -> Step {
        self.done = true;
        Step {
            send,
            progress: Progress::Established(session),
        }
    }

    /// Ends the handshake: the peer gets a Refuse frame with the coarse code, if any.
    fn refuse(&mut self, refusal: Refusal) -> Step {
        if self.done {
            return Step {
                send: None,
                progress: Progress::Refused(Refusal::Finished),
            };
        }
        self.done = true;
        let send = refusal.code().map(|code| self.frame(Body::Refuse(code)));
        Step {
            send,
            progress: Progress::Refused(refusal),
        }
    }
}

/// The version both ranges share (the newest), if any.
fn common_version(theirs_min: u8, theirs_max: u8) -> Result<u8, Refusal> {
    let low = theirs_min.max(PROTOCOL_VERSION_MIN);
    let high = theirs_max.min(PROTOCOL_VERSION_MAX);
    if low <= high {
        Ok(high)
    } else {
        Err(Refusal::NoCommonVersion {
            ours_min: PROTOCOL_VERSION_MIN,
            ours_max: PROTOCOL_VERSION_MAX,
            theirs_min,
            theirs_max,
        })
    }
}

fn unexpected(expected: &'static str, frame: &Frame<'_>) -> Refusal {
    match frame.body {
        Body::Refuse(code) => Refusal::PeerRefused(code),
        _ => Refusal::UnexpectedFrame {
            expected,
            found: frame.body.kind(),
        },
    }
}

#[derive(Debug)]
enum InitiatorState {
    AwaitChallenge,
    AwaitWelcome(Challenge),
    Done,
}

/// The side that connects.
#[derive(Debug)]
pub struct Initiator {
    config: InitiatorConfig,
    hello: Hello,
    channel: Channel,
    state: InitiatorState,
}

impl Initiator {
    /// Starts a handshake with a fresh nonce (see [`Nonce::from_os_rng`]); returns the machine
    /// and the Hello frame to send.
    pub fn start(config: InitiatorConfig, nonce: Nonce) -> (Initiator, Vec<u8>) {
        let hello = Hello {
            version_min: PROTOCOL_VERSION_MIN,
            version_max: PROTOCOL_VERSION_MAX,
            cluster: config.cluster,
            node: config.node,
            nonce,
            volume_size_bytes: config.volume_size_bytes,
            region_size_bytes: config.region_size_bytes,
            history: config.history.clone(),
        };
        let mut channel = Channel {
            volume: config.volume,
            sent: 0,
            received: 0,
            done: false,
        };
        let bytes = channel.frame(Body::Hello(hello.clone()));
        let me = Initiator {
            config,
            hello,
            channel,
            state: InitiatorState::AwaitChallenge,
        };
        (me, bytes)
    }

    /// Feeds the acceptor's next frame.
    pub fn on_frame(&mut self, frame: &Frame<'_>) -> Step {
        match self.advance(frame) {
            Ok(step) => step,
            Err(refusal) => {
                self.state = InitiatorState::Done;
                self.channel.refuse(refusal)
            }
        }
    }

    /// The connection delivered bytes that do not decode: the handshake ends.
    pub fn on_wire_error(&mut self, error: PeerError) -> Step {
        self.state = InitiatorState::Done;
        self.channel.refuse(Refusal::Wire(error))
    }

    fn advance(&mut self, frame: &Frame<'_>) -> Result<Step, Refusal> {
        if matches!(self.state, InitiatorState::Done) {
            return Err(Refusal::Finished);
        }
        self.channel.receive(frame)?;
        match (&self.state, &frame.body) {
            (InitiatorState::AwaitChallenge, Body::Challenge(challenge)) => {
                let version = common_version(challenge.version, challenge.version)?;
                if challenge.node == self.config.node {
                    return Err(Refusal::SameNode(challenge.node));
                }
                let transcript = Transcript {
                    volume: self.config.volume,
                    hello: &self.hello,
                    challenge,
                };
                debug_assert_eq!(version, challenge.version);
                let mac = transcript.initiator_proof(&self.config.secret);
                let send = self.channel.frame(Body::Response(mac));
                self.state = InitiatorState::AwaitWelcome(challenge.clone());
                Ok(self.channel.pending(send))
            }
            (InitiatorState::AwaitWelcome(challenge), Body::Welcome(welcome)) => {
                if frame.version != challenge.version {
                    return Err(Refusal::Wire(PeerError::UnsupportedVersion {
                        found: frame.version,
                    }));
                }
                let transcript = Transcript {
                    volume: self.config.volume,
                    hello: &self.hello,
                    challenge,
                };
                let part = AcceptorPart {
                    volume_size_bytes: welcome.volume_size_bytes,
                    region_size_bytes: welcome.region_size_bytes,
                    history: &welcome.history,
                };
                if !transcript.verify_acceptor(&self.config.secret, &part, &welcome.mac) {
                    return Err(Refusal::BadProof);
                }
                if welcome.region_size_bytes != self.config.region_size_bytes {
                    return Err(Refusal::RegionSizeMismatch {
                        ours: self.config.region_size_bytes,
                        theirs: welcome.region_size_bytes,
                    });
                }
                let session = Session {
                    version: challenge.version,
                    volume: self.config.volume,
                    peer_node: challenge.node,
                    peer_history: welcome.history.clone(),
                    peer_volume_size_bytes: welcome.volume_size_bytes,
                    region_size_bytes: welcome.region_size_bytes,
                    next_send: Seq(self.channel.sent),
                    next_recv: Seq(self.channel.received),
                };
                self.state = InitiatorState::Done;
                Ok(self.channel.established(None, session))
            }
            (InitiatorState::AwaitChallenge, _) => Err(unexpected("Challenge", frame)),
            _ => Err(unexpected("Welcome", frame)),
        }
    }
}

#[derive(Debug)]
enum AcceptorState {
    AwaitHello,
    AwaitResponse(Box<(Hello, Challenge)>),
    Done,
}

/// The side that listens.
#[derive(Debug)]
pub struct Acceptor<L: VolumeLookup> {
    config: AcceptorConfig,
    volumes: L,
    nonce: Nonce,
    channel: Channel,
    state: AcceptorState,
}

impl<L: VolumeLookup> Acceptor<L> {
    /// Waits for a Hello; `nonce` must be fresh (see [`Nonce::from_os_rng`]).
    pub fn new(config: AcceptorConfig, volumes: L, nonce: Nonce) -> Acceptor<L> {
        Acceptor {
            config,
            volumes,
            nonce,
            channel: Channel {
                volume: ReplicatedVolumeId(0),
                sent: 0,
                received: 0,
                done: false,
            },
            state: AcceptorState::AwaitHello,
        }
    }

    /// Feeds the initiator's next frame.
    pub fn on_frame(&mut self, frame: &Frame<'_>) -> Step {
        match self.advance(frame) {
            Ok(step) => step,
            Err(refusal) => {
                self.state = AcceptorState::Done;
                self.channel.refuse(refusal)
            }
        }
    }

    /// The connection delivered bytes that do not decode: the handshake ends.
    pub fn on_wire_error(&mut self, error: PeerError) -> Step {
        self.state = AcceptorState::Done;
        self.channel.refuse(Refusal::Wire(error))
    }

    /// Takes the state out (a failure leaves `Done`); the next state is set on success.
    fn advance(&mut self, frame: &Frame<'_>) -> Result<Step, Refusal> {
        match std::mem::replace(&mut self.state, AcceptorState::Done) {
            AcceptorState::Done => Err(Refusal::Finished),
            AcceptorState::AwaitHello => {
                // The Hello names the volume the rest of the handshake is about.
                self.channel.volume = frame.volume;
                self.channel.receive(frame)?;
                let Body::Hello(hello) = &frame.body else {
                    return Err(unexpected("Hello", frame));
                };
                self.on_hello(hello)
            }
            AcceptorState::AwaitResponse(sent) => {
                self.channel.receive(frame)?;
                let Body::Response(mac) = &frame.body else {
                    return Err(unexpected("Response", frame));
                };
                let (hello, challenge) = *sent;
                if frame.version != challenge.version {
                    return Err(Refusal::Wire(PeerError::UnsupportedVersion {
                        found: frame.version,
                    }));
                }
                self.on_response(&hello, &challenge, mac)
            }
        }
    }

    fn on_hello(&mut self, hello: &Hello) -> Result<Step, Refusal> {
        let version = common_version(hello.version_min, hello.version_max)?;
        if hello.cluster != self.config.cluster {
            return Err(Refusal::WrongCluster {
                ours: self.config.cluster,
                theirs: hello.cluster,
            });
        }
        if hello.node == self.config.node {
            return Err(Refusal::SameNode(hello.node));
        }
        let challenge = Challenge {
            version,
            node: self.config.node,
            nonce: self.nonce,
        };
        let send = self.channel.frame(Body::Challenge(challenge.clone()));
        self.state = AcceptorState::AwaitResponse(Box::new((hello.clone(), challenge)));
        Ok(self.channel.pending(send))
    }

    fn on_response(
        &mut self,
        hello: &Hello,
        challenge: &Challenge,
        mac: &super::Mac,
    ) -> Result<Step, Refusal> {
        let volume = self.channel.volume;
        let transcript = Transcript {
            volume,
            hello,
            challenge,
        };
        if !transcript.verify_initiator(&self.config.secret, mac) {
            return Err(Refusal::BadProof);
        }
        // The peer has proved itself: it may learn whether we hold the volume.
        let local = self
            .volumes
            .lookup(volume)
            .ok_or(Refusal::UnknownVolume(volume))?;
        if local.region_size_bytes != hello.region_size_bytes {
            return Err(Refusal::RegionSizeMismatch {
                ours: local.region_size_bytes,
                theirs: hello.region_size_bytes,
            });
        }
        let part = AcceptorPart {
            volume_size_bytes: local.volume_size_bytes,
            region_size_bytes: local.region_size_bytes,
            history: &local.history,
        };
        let welcome = super::Welcome {
            mac: transcript.acceptor_proof(&self.config.secret, &part),
            volume_size_bytes: local.volume_size_bytes,
            region_size_bytes: local.region_size_bytes,
            history: local.history.clone(),
        };
        let send = self.channel.frame(Body::Welcome(welcome));
        let session = Session {
            version: challenge.version,
            volume,
            peer_node: hello.node,
            peer_history: hello.history.clone(),
            peer_volume_size_bytes: hello.volume_size_bytes,
            region_size_bytes: local.region_size_bytes,
            next_send: Seq(self.channel.sent),
            next_recv: Seq(self.channel.received),
        };
        Ok(self.channel.established(Some(send), session))
    }
}

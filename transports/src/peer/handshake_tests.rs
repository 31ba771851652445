//! Tests of the handshake state machines: the happy path, every refusal, and frames that are
//! duplicated, replayed, reordered or from the wrong side.

use super::*;

const CLUSTER: ClusterId = ClusterId(0xC1);
const VOLUME: ReplicatedVolumeId = ReplicatedVolumeId(42);
const REGION: u32 = 1 << 20;

fn secret(byte: u8) -> ClusterSecret {
    ClusterSecret::new(vec![byte; 32]).expect("long enough")
}

fn history(ids: &[u64]) -> GenerationHistory {
    GenerationHistory::new(ids.to_vec()).expect("valid history")
}

fn initiator_config() -> InitiatorConfig {
    InitiatorConfig {
        cluster: CLUSTER,
        node: NodeId(1),
        secret: secret(7),
        volume: VOLUME,
        volume_size_bytes: 1 << 30,
        region_size_bytes: REGION,
        history: history(&[10, 11, 12]),
    }
}

fn acceptor_config() -> AcceptorConfig {
    AcceptorConfig {
        cluster: CLUSTER,
        node: NodeId(2),
        secret: secret(7),
    }
}

/// The acceptor holds volume 42 with region size `REGION` and history [10, 11].
fn volumes(volume: ReplicatedVolumeId) -> Option<LocalVolume> {
    (volume == VOLUME).then(|| LocalVolume {
        volume_size_bytes: 2 << 30,
        region_size_bytes: REGION,
        history: history(&[10, 11]),
    })
}

type Lookup = fn(ReplicatedVolumeId) -> Option<LocalVolume>;

fn acceptor(config: AcceptorConfig, nonce: u8) -> Acceptor<Lookup> {
    Acceptor::new(config, volumes as Lookup, Nonce([nonce; 32]))
}

/// Decodes exactly one frame from `bytes`.
fn frame(bytes: &[u8]) -> Frame<'_> {
    match decode_frame(bytes).expect("our frames decode") {
        Decoded::Frame { frame, consumed } => {
            assert_eq!(consumed, bytes.len());
            frame
        }
        Decoded::Need(n) => panic!("incomplete frame, {n} bytes missing"),
    }
}

fn refusal(step: &Step) -> &Refusal {
    match &step.progress {
        Progress::Refused(r) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The Refuse code in `step`'s frame.
fn sent_code(step: &Step) -> Option<RefuseCode> {
    let bytes = step.send.as_ref()?;
    match frame(bytes).body {
        Body::Refuse(code) => Some(code),
        other => panic!("expected a Refuse frame, got {other:?}"),
    }
}

/// Runs a handshake between the two to its end; returns both outcomes.
fn run(initiator: InitiatorConfig, acceptor_side: &mut Acceptor<Lookup>) -> (Progress, Progress) {
    let (mut i, hello) = Initiator::start(initiator, Nonce([1; 32]));
    let mut to_acceptor = Some(hello);
    for _ in 0..4 {
        let Some(bytes) = to_acceptor.take() else {
            break;
        };
        let a = acceptor_side.on_frame(&frame(&bytes));
        let Some(reply) = a.send else {
            return (Progress::Pending, a.progress);
        };
        let step = i.on_frame(&frame(&reply));
        if !matches!(a.progress, Progress::Pending) {
            return (step.progress, a.progress);
        }
        match step.progress {
            Progress::Pending => to_acceptor = step.send,
            other => {
                // Deliver the initiator's Refuse, if any, to the acceptor too.
                let a = step
                    .send
                    .map(|b| acceptor_side.on_frame(&frame(&b)).progress)
                    .unwrap_or(Progress::Pending);
                return (other, a);
            }
        }
    }
    panic!("handshake did not end in 4 rounds");
}

#[test]
fn both_sides_establish_and_learn_each_other() {
    let mut a = acceptor(acceptor_config(), 9);
    let (i, acc) = run(initiator_config(), &mut a);
    let Progress::Established(i) = i else {
        panic!("initiator: {i:?}");
    };
    let Progress::Established(acc) = acc else {
        panic!("acceptor: {acc:?}");
    };
    assert_eq!(i.peer_node, NodeId(2));
    assert_eq!(i.peer_history, history(&[10, 11]));
    assert_eq!(i.peer_volume_size_bytes, 2 << 30);
    assert_eq!(acc.peer_node, NodeId(1));
    assert_eq!(acc.peer_history, history(&[10, 11, 12]));
    assert_eq!(acc.peer_volume_size_bytes, 1 << 30);
    for s in [&i, &acc] {
        assert_eq!(
            (s.version, s.volume, s.region_size_bytes),
            (1, VOLUME, REGION)
        );
        assert_eq!((s.next_send, s.next_recv), (Seq(2), Seq(2)));
    }
}

#[test]
fn wrong_secret_is_denied_without_detail() {
    let mut config = acceptor_config();
    config.secret = secret(8);
    let mut a = acceptor(config, 9);
    let (mut i, hello) = Initiator::start(initiator_config(), Nonce([1; 32]));
    let challenge = a.on_frame(&frame(&hello));
    let response = i.on_frame(&frame(challenge.send.as_ref().expect("a challenge")));
    let step = a.on_frame(&frame(response.send.as_ref().expect("a response")));
    assert_eq!(refusal(&step), &Refusal::BadProof);
    assert!(refusal(&step)
        .to_string()
        .contains("does not hold the cluster secret"));
    assert_eq!(sent_code(&step), Some(RefuseCode::Denied));
    let end = i.on_frame(&frame(step.send.as_ref().expect("a refuse")));
    assert_eq!(refusal(&end), &Refusal::PeerRefused(RefuseCode::Denied));
    assert_eq!(end.send, None, "nothing answers a Refuse");
}

#[test]
fn an_acceptor_without_the_secret_fails_the_initiators_check() {
    // A peer that does not hold the secret cannot forge the Welcome's proof.
    let (mut i, hello) = Initiator::start(initiator_config(), Nonce([1; 32]));
    let mut a = acceptor(acceptor_config(), 9);
    let challenge = a.on_frame(&frame(&hello)).send.expect("a challenge");
    let response = i.on_frame(&frame(&challenge)).send.expect("a response");
    let welcome = a.on_frame(&frame(&response)).send.expect("a welcome");
    let Body::Welcome(mut w) = frame(&welcome).body else {
        panic!("not a welcome");
    };
    w.mac.0[0] ^= 1;
    let mut forged = Vec::new();
    encode_frame(&Frame::new(Seq(1), VOLUME, Body::Welcome(w)), &mut forged);
    let step = i.on_frame(&frame(&forged));
    assert_eq!(refusal(&step), &Refusal::BadProof);
    assert_eq!(sent_code(&step), Some(RefuseCode::Denied));
}

#[test]
fn a_tampered_history_fails_the_proof() {
    let (mut i, hello) = Initiator::start(initiator_config(), Nonce([1; 32]));
    let mut a = acceptor(acceptor_config(), 9);
    let challenge = a.on_frame(&frame(&hello)).send.expect("a challenge");
    let response = i.on_frame(&frame(&challenge)).send.expect("a response");
    let welcome = a.on_frame(&frame(&response)).send.expect("a welcome");
    let Body::Welcome(mut w) = frame(&welcome).body else {
        panic!("not a welcome");
    };
    w.history = history(&[10, 11, 99]);
    let mut tampered = Vec::new();
    encode_frame(&Frame::new(Seq(1), VOLUME, Body::Welcome(w)), &mut tampered);
    assert_eq!(refusal(&i.on_frame(&frame(&tampered))), &Refusal::BadProof);
}

#[test]
fn wrong_cluster_and_same_node_are_denied() {
    let mut config = initiator_config();
    config.cluster = ClusterId(0xBAD);
    let mut a = acceptor(acceptor_config(), 9);
    let (i, acc) = run(config, &mut a);
    assert_eq!(
        acc,
        Progress::Refused(Refusal::WrongCluster {
            ours: CLUSTER,
            theirs: ClusterId(0xBAD)
        })
    );
    assert_eq!(
        i,
        Progress::Refused(Refusal::PeerRefused(RefuseCode::Denied))
    );

    let mut config = initiator_config();
    config.node = NodeId(2);
    let mut a = acceptor(acceptor_config(), 9);
    let (i, acc) = run(config, &mut a);
    assert_eq!(acc, Progress::Refused(Refusal::SameNode(NodeId(2))));
    assert_eq!(
        i,
        Progress::Refused(Refusal::PeerRefused(RefuseCode::Denied))
    );
}

#[test]
fn an_initiator_refuses_a_challenge_from_itself() {
    let (mut i, hello) = Initiator::start(initiator_config(), Nonce([1; 32]));
    let mut config = acceptor_config();
    config.node = NodeId(1);
    // The acceptor refuses first in practice; check the initiator's own guard directly.
    let challenge = Frame::new(
        Seq(0),
        VOLUME,
        Body::Challenge(Challenge {
            version: 1,
            node: NodeId(1),
            nonce: Nonce([5; 32]),
        }),
    );
    assert_eq!(frame(&hello).seq, Seq(0));
    let step = i.on_frame(&challenge);
    assert_eq!(refusal(&step), &Refusal::SameNode(NodeId(1)));
    assert_eq!(sent_code(&step), Some(RefuseCode::Denied));
    let mut a = acceptor(config, 9);
    let step = a.on_frame(&frame(&hello));
    assert_eq!(refusal(&step), &Refusal::SameNode(NodeId(1)));
}

#[test]
fn unknown_volume_and_region_mismatch_are_told_after_the_proof() {
    let mut config = initiator_config();
    config.volume = ReplicatedVolumeId(43);
    let mut a = acceptor(acceptor_config(), 9);
    let (i, acc) = run(config, &mut a);
    assert_eq!(
        acc,
        Progress::Refused(Refusal::UnknownVolume(ReplicatedVolumeId(43)))
    );
    assert_eq!(
        i,
        Progress::Refused(Refusal::PeerRefused(RefuseCode::UnknownVolume))
    );

    let mut config = initiator_config();
    config.region_size_bytes = 1 << 16;
    let mut a = acceptor(acceptor_config(), 9);
    let (i, acc) = run(config, &mut a);
    assert_eq!(
        acc,
        Progress::Refused(Refusal::RegionSizeMismatch {
            ours: REGION,
            theirs: 1 << 16
        })
    );
    assert_eq!(
        i,
        Progress::Refused(Refusal::PeerRefused(RefuseCode::VolumeMismatch))
    );
}

fn hello_frame(version_min: u8, version_max: u8) -> Vec<u8> {
    let config = initiator_config();
    let mut out = Vec::new();
    encode_frame(
        &Frame::new(
            Seq(0),
            VOLUME,
            Body::Hello(Hello {
                version_min,
                version_max,
                cluster: config.cluster,
                node: config.node,
                nonce: Nonce([1; 32]),
                volume_size_bytes: config.volume_size_bytes,
                region_size_bytes: config.region_size_bytes,
                history: config.history,
            }),
        ),
        &mut out,
    );
    out
}

#[test]
fn no_common_version_is_refused_as_version() {
    let mut a = acceptor(acceptor_config(), 9);
    let step = a.on_frame(&frame(&hello_frame(2, 5)));
    assert_eq!(
        refusal(&step),
        &Refusal::NoCommonVersion {
            ours_min: 1,
            ours_max: 1,
            theirs_min: 2,
            theirs_max: 5
        }
    );
    assert_eq!(sent_code(&step), Some(RefuseCode::Version));
    // A newer peer that also speaks version 1 is answered in version 1.
    let mut a = acceptor(acceptor_config(), 9);
    let step = a.on_frame(&frame(&hello_frame(1, 3)));
    let Body::Challenge(c) = frame(step.send.as_ref().expect("a challenge")).body else {
        panic!("not a challenge");
    };
    assert_eq!(c.version, 1);
    // A frame header of an unknown version does not decode; the acceptor answers Version.
    let mut a = acceptor(acceptor_config(), 9);
    let step = a.on_wire_error(PeerError::UnsupportedVersion { found: 2 });
    assert_eq!(sent_code(&step), Some(RefuseCode::Version));
}

#[test]
fn a_duplicated_hello_is_out_of_sequence() {
    let (_, hello) = Initiator::start(initiator_config(), Nonce([1; 32]));
    let mut a = acceptor(acceptor_config(), 9);
    assert!(a.on_frame(&frame(&hello)).send.is_some());
    let step = a.on_frame(&frame(&hello));
    assert_eq!(
        refusal(&step),
        &Refusal::Wire(PeerError::OutOfSequence {
            expected: Seq(1),
            found: Seq(0)
        })
    );
    assert_eq!(sent_code(&step), Some(RefuseCode::Protocol));
    // The acceptor's Refuse takes its next sequence number (it had sent the Challenge).
    assert_eq!(frame(step.send.as_ref().expect("a refuse")).seq, Seq(1));
}

#[test]
fn a_response_replayed_into_another_handshake_fails() {
    // Record a successful handshake's Response ...
    let (mut i, hello) = Initiator::start(initiator_config(), Nonce([1; 32]));
    let mut a = acceptor(acceptor_config(), 9);
    let challenge = a.on_frame(&frame(&hello)).send.expect("a challenge");
    let response = i.on_frame(&frame(&challenge)).send.expect("a response");
    // ... and replay Hello and Response to an acceptor with a fresh nonce.
    let mut fresh = acceptor(acceptor_config(), 10);
    assert!(matches!(
        fresh.on_frame(&frame(&hello)).progress,
        Progress::Pending
    ));
    let step = fresh.on_frame(&frame(&response));
    assert_eq!(refusal(&step), &Refusal::BadProof);
}

#[test]
fn out_of_order_and_foreign_frames_end_the_handshake() {
    let (mut i, hello) = Initiator::start(initiator_config(), Nonce([1; 32]));
    let mut a = acceptor(acceptor_config(), 9);
    let challenge = a.on_frame(&frame(&hello)).send.expect("a challenge");
    let response = i.on_frame(&frame(&challenge)).send.expect("a response");

    // A Response before any Hello.
    let mut b = acceptor(acceptor_config(), 9);
    let mut early = Vec::new();
    let Body::Response(mac) = frame(&response).body else {
        panic!("not a response");
    };
    encode_frame(&Frame::new(Seq(0), VOLUME, Body::Response(mac)), &mut early);
    let step = b.on_frame(&frame(&early));
    assert_eq!(
        refusal(&step),
        &Refusal::UnexpectedFrame {
            expected: "Hello",
            found: FrameKind::Response
        }
    );
    assert_eq!(sent_code(&step), Some(RefuseCode::Protocol));

    // A Write where the Response belongs.
    let data = [0u8; 512];
    let mut write = Vec::new();
    let body = Body::Write {
        offset_bytes: 0,
        fua: false,
        data: &data,
    };
    encode_frame(&Frame::new(Seq(1), VOLUME, body), &mut write);
    let step = a.on_frame(&frame(&write));
    assert_eq!(
        refusal(&step),
        &Refusal::UnexpectedFrame {
            expected: "Response",
            found: FrameKind::Write
        }
    );

    // A Response for another volume.
    let mut c = acceptor(acceptor_config(), 9);
    c.on_frame(&frame(&hello));
    let mut other = Vec::new();
    encode_frame(
        &Frame::new(Seq(1), ReplicatedVolumeId(5), Body::Response(mac)),
        &mut other,
    );
    assert_eq!(
        refusal(&c.on_frame(&frame(&other))),
        &Refusal::WrongVolume {
            expected: VOLUME,
            found: ReplicatedVolumeId(5)
        }
    );

    // The initiator gets its Challenge twice.
    let step = i.on_frame(&frame(&challenge));
    assert_eq!(
        refusal(&step),
        &Refusal::Wire(PeerError::OutOfSequence {
            expected: Seq(1),
            found: Seq(0)
        })
    );
    // And nothing after the end.
    let after = i.on_frame(&frame(&challenge));
    assert_eq!(refusal(&after), &Refusal::Finished);
    assert_eq!(after.send, None);
}

#[test]
fn an_initiator_expects_a_challenge_first_and_stops_on_wire_errors() {
    let (mut i, _) = Initiator::start(initiator_config(), Nonce([1; 32]));
    let hello = hello_frame(1, 1);
    let step = i.on_frame(&frame(&hello));
    assert_eq!(
        refusal(&step),
        &Refusal::UnexpectedFrame {
            expected: "Challenge",
            found: FrameKind::Hello
        }
    );
    let (mut i, _) = Initiator::start(initiator_config(), Nonce([1; 32]));
    let step = i.on_wire_error(PeerError::BadMagic { found: 0x4745_5420 });
    assert_eq!(sent_code(&step), Some(RefuseCode::Protocol));
    assert_eq!(frame(step.send.as_ref().expect("a refuse")).seq, Seq(1));
}

#[test]
fn an_established_acceptor_takes_no_more_handshake_frames() {
    let (mut i, hello) = Initiator::start(initiator_config(), Nonce([1; 32]));
    let mut a = acceptor(acceptor_config(), 9);
    let challenge = a.on_frame(&frame(&hello)).send.expect("a challenge");
    let response = i.on_frame(&frame(&challenge)).send.expect("a response");
    let done = a.on_frame(&frame(&response));
    assert!(matches!(done.progress, Progress::Established(_)));
    let again = a.on_frame(&frame(&response));
    assert_eq!(refusal(&again), &Refusal::Finished);
    assert_eq!(again.send, None);
}

#[test]
fn secrets_are_long_enough_and_never_printed() {
    assert_eq!(
        ClusterSecret::new(vec![1; 15]).err(),
        Some(PeerError::WeakSecret { length: 15 })
    );
    let s = ClusterSecret::new(b"correct horse battery staple".to_vec()).expect("long enough");
    assert!(!format!("{s:?}").contains("horse"));
}

#[test]
fn os_nonces_differ() {
    let a = Nonce::from_os_rng().expect("the OS RNG works");
    let b = Nonce::from_os_rng().expect("the OS RNG works");
    assert_ne!(a, b);
}

//! Runs a genuine initiator against a genuine acceptor while the fuzzer chooses, step by step,
//! to deliver the next genuine frame, an arbitrary frame of its own, or to drop one; both
//! sides are thus fed arbitrary frames in every state. Checks: nothing panics, every frame a
//! side sends decodes and takes the next sequence number, nothing but `Finished` follows the
//! end, and a side establishes only with the genuine peer (its node id and history).
//!
//! The first byte is a mode: with bit 0 set, the checksums of fuzzer frames are recomputed so
//! they reach the state machines instead of failing to decode.

#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;
use ringblock_transports::peer::*;

const VOLUME: ReplicatedVolumeId = ReplicatedVolumeId(42);
const REGION: u32 = 1 << 20;

fn history(ids: &[u64]) -> GenerationHistory {
    GenerationHistory::new(ids.to_vec()).expect("valid history")
}

fn secret() -> ClusterSecret {
    ClusterSecret::new(vec![7; 32]).expect("long enough")
}

fn lookup(volume: ReplicatedVolumeId) -> Option<LocalVolume> {
    (volume == VOLUME).then(|| LocalVolume {
        volume_size_bytes: 1 << 30,
        region_size_bytes: REGION,
        history: history(&[10, 11]),
    })
}

/// One side under test: what it has sent and whether it has ended.
#[derive(Default)]
struct Side {
    sent: u64,
    ended: bool,
    inbox: VecDeque<Vec<u8>>,
}

impl Side {
    /// Checks `step` and queues its frame for the other side.
    fn record(&mut self, step: Step, other: &mut Side, expected: (NodeId, &GenerationHistory)) {
        if self.ended {
            assert_eq!(step.progress, Progress::Refused(Refusal::Finished));
            assert!(step.send.is_none());
            return;
        }
        if let Some(bytes) = step.send {
            match decode_frame(&bytes) {
                Ok(Decoded::Frame { frame, consumed }) => {
                    assert_eq!(consumed, bytes.len());
                    assert_eq!(frame.seq, Seq(self.sent));
                }
                other => panic!("a side sent a frame that does not decode: {other:?}"),
            }
            self.sent += 1;
            other.inbox.push_back(bytes);
        }
        match step.progress {
            Progress::Pending => {}
            Progress::Established(session) => {
                assert_eq!(session.peer_node, expected.0);
                assert_eq!(&session.peer_history, expected.1);
                assert_eq!((session.next_send, session.next_recv), (Seq(2), Seq(2)));
                self.ended = true;
            }
            Progress::Refused(refusal) => {
                assert_ne!(refusal, Refusal::Finished);
                self.ended = true;
            }
        }
    }
}

/// The fuzzer's own frames: length-prefixed chunks of the input.
struct Input<'a> {
    data: &'a [u8],
    fix: bool,
}

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }

    fn chunk(&mut self) -> Vec<u8> {
        let len =
            usize::from(self.byte().unwrap_or(0)) * 4 + usize::from(self.byte().unwrap_or(0) % 4);
        let take = len.min(self.data.len());
        let mut chunk = self.data[..take].to_vec();
        self.data = &self.data[take..];
        if self.fix && chunk.len() >= HEADER_LEN {
            let payload_len = chunk.len() - HEADER_LEN;
            chunk[36..40].copy_from_slice(&(payload_len as u32).to_le_bytes());
            let crc = crc32c_of(&[&chunk[HEADER_LEN..]]);
            chunk[40..44].copy_from_slice(&crc.to_le_bytes());
            let crc = crc32c_of(&[&chunk[..44]]);
            chunk[44..48].copy_from_slice(&crc.to_le_bytes());
        }
        chunk
    }
}

/// What a connection makes of `bytes`: a frame, a wire error, or nothing yet.
fn decoded(bytes: &[u8]) -> Option<Result<Frame<'_>, PeerError>> {
    match decode_frame(bytes) {
        Ok(Decoded::Frame { frame, .. }) => Some(Ok(frame)),
        Ok(Decoded::Need(_)) => None,
        Err(e) => Some(Err(e)),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut input = Input {
        data: rest,
        fix: mode & 1 != 0,
    };
    let initiator_history = history(&[10, 11, 12]);
    let (mut initiator, hello) = Initiator::start(
        InitiatorConfig {
            cluster: ClusterId(0xC1),
            node: NodeId(1),
            secret: secret(),
            volume: VOLUME,
            volume_size_bytes: 1 << 30,
            region_size_bytes: REGION,
            history: initiator_history.clone(),
        },
        Nonce([1; 32]),
    );
    let mut acceptor = Acceptor::new(
        AcceptorConfig {
            cluster: ClusterId(0xC1),
            node: NodeId(2),
            secret: secret(),
        },
        lookup,
        Nonce([2; 32]),
    );
    let acceptor_history = history(&[10, 11]);
    let mut i_side = Side {
        sent: 1,
        ..Side::default()
    };
    let mut a_side = Side::default();
    a_side.inbox.push_back(hello);
    for _ in 0..32 {
        let Some(choice) = input.byte() else {
            return;
        };
        let to_acceptor = choice & 1 == 0;
        let bytes = match choice >> 1 & 3 {
            0 | 1 => {
                let inbox = if to_acceptor {
                    &mut a_side.inbox
                } else {
                    &mut i_side.inbox
                };
                match inbox.pop_front() {
                    Some(b) => b,
                    None => continue,
                }
            }
            2 => input.chunk(),
            _ => {
                // Drop the next genuine frame.
                let inbox = if to_acceptor {
                    &mut a_side.inbox
                } else {
                    &mut i_side.inbox
                };
                inbox.pop_front();
                continue;
            }
        };
        if to_acceptor {
            let step = decoded(&bytes).map(|d| match d {
                Ok(frame) => acceptor.on_frame(&frame),
                Err(e) => acceptor.on_wire_error(e),
            });
            if let Some(step) = step {
                a_side.record(step, &mut i_side, (NodeId(1), &initiator_history));
            }
        } else {
            let step = decoded(&bytes).map(|d| match d {
                Ok(frame) => initiator.on_frame(&frame),
                Err(e) => initiator.on_wire_error(e),
            });
            if let Some(step) = step {
                i_side.record(step, &mut a_side, (NodeId(2), &acceptor_history));
            }
        }
    }
});

//! Tests of the receive buffer's room keeping.

use super::*;

fn completion(n: usize) -> RingCompletion {
    RingCompletion {
        tag: 0,
        result: n as i32,
        flags: 0,
    }
}

/// Bytes "received" into the buffer's free end, as a receive completing would leave them.
fn receive(r: &mut RecvBuf, bytes: &[u8]) {
    r.buf[r.end..r.end + bytes.len()].copy_from_slice(bytes);
    r.on_complete(completion(bytes.len())).unwrap();
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// A whole largest frame the owner cannot take yet fills the buffer: there is no room for a
/// receive (a zero-byte receive would read as the peer's close, or never complete), and the
/// frame stays intact until it is consumed; then the buffer is empty again.
#[test]
fn a_full_buffer_has_no_room_until_its_frame_is_consumed() {
    let mut r = RecvBuf::new(Socket::Fd(-1), 0);
    let frame = pattern(MAX_FRAME_BYTES, 5);
    receive(&mut r, &frame[..100]);
    receive(&mut r, &frame[100..]);
    assert!(!r.make_room(), "a full buffer has no room");
    assert_eq!(r.data(), &frame[..], "the held frame is untouched");
    r.consume(MAX_FRAME_BYTES);
    assert!(r.make_room());
    assert!(r.data().is_empty());
    assert_eq!((r.start, r.end), (0, 0));
}

/// One frame and most of the next (largest) one fill the buffer to its end: once the
/// first is consumed, the rest moves to the front and the room left is exactly what the
/// second frame lacks.
#[test]
fn a_partial_frame_at_the_end_moves_to_the_front() {
    let mut r = RecvBuf::new(Socket::Fd(-1), 0);
    let first = pattern(4096, 1);
    let second = pattern(MAX_FRAME_BYTES, 2);
    let lacking = first.len();
    let mut bytes = first.clone();
    bytes.extend_from_slice(&second[..MAX_FRAME_BYTES - lacking]);
    receive(&mut r, &bytes);
    r.consume(first.len());
    assert!(r.make_room());
    assert_eq!(r.start, 0);
    assert_eq!(r.data(), &second[..MAX_FRAME_BYTES - lacking]);
    assert_eq!(r.buf.len() - r.end, lacking);
    receive(&mut r, &second[MAX_FRAME_BYTES - lacking..]);
    assert_eq!(r.data(), &second[..]);
    assert!(!r.make_room(), "the whole second frame fills the buffer");
}

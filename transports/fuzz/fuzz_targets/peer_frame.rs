//! Decodes a stream of untrusted peer frames as a connection does: every frame that decodes
//! encodes back to the same bytes, a partial frame asks for a bounded number of bytes, and the
//! in-flight window holds the peer to the protocol's bounds.
//!
//! The first byte is a mode: with bit 0 set, the checksums of each frame are recomputed before
//! it is decoded, so the fuzzer reaches the field checks behind them.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ringblock_transports::peer::*;

/// Writes correct checksums into the frame at the front of `buf`, where it is long enough.
fn fix_checksums(buf: &mut [u8]) {
    if buf.len() < HEADER_LEN {
        return;
    }
    let len = u32::from_le_bytes([buf[36], buf[37], buf[38], buf[39]]) as usize;
    if let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN.saturating_add(len)) {
        let crc = crc32c_of(&[payload]);
        buf[40..44].copy_from_slice(&crc.to_le_bytes());
    }
    let crc = crc32c_of(&[&buf[..44]]);
    buf[44..48].copy_from_slice(&crc.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut buf = rest.to_vec();
    let mut at = 0;
    let mut inbound: Option<InboundWindow> = None;
    let mut reencoded = Vec::new();
    while at < buf.len() {
        if mode & 1 != 0 {
            fix_checksums(&mut buf[at..]);
        }
        let frame = match decode_frame(&buf[at..]) {
            Ok(Decoded::Frame { frame, consumed }) => {
                assert!((HEADER_LEN..=MAX_FRAME_BYTES).contains(&consumed));
                reencoded.clear();
                encode_frame(&frame, &mut reencoded);
                assert_eq!(reencoded, &buf[at..at + consumed]);
                assert_eq!(
                    encode_data_header(&frame),
                    reencoded[..HEADER_LEN],
                    "a header alone matches the whole frame's"
                );
                at += consumed;
                frame
            }
            Ok(Decoded::Need(n)) => {
                assert!(n >= 1 && buf.len() - at + n <= MAX_FRAME_BYTES);
                return;
            }
            Err(_) => return,
        };
        // The first frame sets where the sequence starts; later ones must follow it.
        let window = inbound.get_or_insert_with(|| InboundWindow::new(frame.seq));
        if window.accept(&frame).is_err() {
            return;
        }
        if let Some(ack) = frame.body.kind().ack_kind() {
            // Answer every other frame so the window both fills and drains.
            if frame.seq.0 % 2 == 0 {
                window.answered(ack, frame.seq).expect("just accepted");
            }
        }
        assert!(window.outstanding_frames() <= MAX_WINDOW_FRAMES);
    }
});

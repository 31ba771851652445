use std::sync::Arc;

use super::*;
use crate::device::FaultConfig;
use crate::io::fault::{FaultState, Faulty};
use crate::io::test_io::{poll, read, write, InlineIo, ManualClock};
use crate::profile;

/// An NVMe-like device: 80 µs read latency, 3906 ns to transfer 4 KiB; 100 µs writes with no
/// transfer time.
fn model() -> DelayModel {
    let mut p = profile::builtin("nvme").unwrap();
    p.read_latency_us = 80;
    p.read_bandwidth_mib_s = 1000;
    p.write_latency_us = 100;
    p.write_bandwidth_mib_s = 0;
    DelayModel {
        profile: Some(p),
        spikes: None,
    }
}

fn delayed(queue_depth: usize) -> (Delayed<InlineIo, ManualClock>, ManualClock) {
    let clock = ManualClock::default();
    let io = Delayed::new(
        InlineIo::default(),
        clock.clone(),
        queue_depth,
        [(DeviceId(0), model())],
    );
    (io, clock)
}

#[test]
fn emulated_latency_overlaps_and_transfers_queue() {
    // 32 reads submitted together on an NVMe-like device: 80 µs latency, 1 µs transfer.
    let service = ServiceTime {
        latency_ns: 80_000,
        transfer_ns: 1_000,
    };
    let mut busy_until_ns = 0;
    let dues: Vec<u64> = (0..32)
        .map(|_| schedule_delayed(&mut busy_until_ns, 0, service, 0))
        .collect();
    // Latencies overlap: the last op finishes after 32 transfers + one latency, not 32 × 81 µs.
    assert_eq!(dues[0], 81_000);
    assert_eq!(dues[31], 32_000 + 80_000);
    assert!(dues.windows(2).all(|w| w[1] - w[0] == 1_000));
    // An idle link does not carry its past: a later op starts at its own submission.
    assert_eq!(
        schedule_delayed(&mut busy_until_ns, 1_000_000, service, 0),
        1_081_000
    );
    // A fault spike delays only its own op.
    assert_eq!(
        schedule_delayed(&mut busy_until_ns, 2_000_000, service, 5_000),
        2_086_000
    );
    assert_eq!(busy_until_ns, 2_001_000);
}

#[test]
fn completions_wait_until_due_and_count_in_flight() {
    let (mut io, clock) = delayed(8);
    for tag in 1..=3 {
        io.push(read(0, tag * 4096, tag)).unwrap();
    }
    assert_eq!(poll(&mut io), vec![], "the leaf is done, the device is not");
    assert_eq!(io.in_flight(), 3);
    // Transfers one after another (3906 ns each), then the 80 µs latency of each.
    clock.set(83_905);
    assert_eq!(poll(&mut io), vec![]);
    clock.set(83_906);
    assert_eq!(poll(&mut io), vec![(1, Ok(4096))]);
    clock.set(91_718);
    assert_eq!(poll(&mut io), vec![(2, Ok(4096)), (3, Ok(4096))]);
    assert_eq!(io.in_flight(), 0);
}

#[test]
fn held_completions_count_against_the_queue_depth() {
    let (mut io, clock) = delayed(2);
    io.push(read(0, 0, 1)).unwrap();
    io.push(read(0, 4096, 2)).unwrap();
    assert_eq!(poll(&mut io), vec![]);
    assert!(!io.has_room(DeviceId(0)));
    let refused = io.push(read(0, 8192, 3)).unwrap_err();
    assert_eq!(refused.tag, 3, "a refused op keeps its tag");
    clock.set(1_000_000);
    assert_eq!(poll(&mut io).len(), 2);
    io.push(refused).unwrap();
    assert_eq!(io.in_flight(), 1);
}

#[test]
fn an_injected_error_waits_and_a_spike_adds_to_the_due_time() {
    let clock = ManualClock::default();
    let fault = Arc::new(FaultState::new(FaultConfig {
        fail_every_nth_write: 2,
        spike_every_nth: 2,
        spike_us: 5,
        ..Default::default()
    }));
    let mut m = model();
    m.spikes = Some(fault.clone());
    let faulty = Faulty::new(InlineIo::default(), [(DeviceId(0), fault)]);
    let mut io = Delayed::new(faulty, clock.clone(), 8, [(DeviceId(0), m)]);
    io.push(write(0, 0, 0xaa, 1)).unwrap();
    io.push(write(0, 4096, 0xbb, 2)).unwrap();
    assert_eq!(
        io.written.len(),
        1,
        "the failed write never reached the device"
    );
    assert_eq!(poll(&mut io), vec![]);
    clock.set(100_000);
    assert_eq!(poll(&mut io), vec![(1, Ok(4096))]);
    // The second op completes with the 5 µs spike on top of the write's 100 µs.
    clock.set(104_999);
    assert_eq!(poll(&mut io), vec![]);
    clock.set(105_000);
    assert_eq!(poll(&mut io), vec![(2, Err(Errno::EIO))]);
}

#[test]
fn other_devices_pass_straight_through() {
    let (mut io, _clock) = delayed(8);
    io.push(read(1, 0, 7)).unwrap();
    io.push(read(0, 0, 8)).unwrap();
    assert_eq!(poll(&mut io), vec![(7, Ok(4096))]);
    let mut touch = |_: &mut [u8]| Ok(());
    assert!(io
        .with_memory(DeviceId(0), 0, 512, MemAccess::Read, &mut touch)
        .is_none());
    assert_eq!(
        io.with_memory(DeviceId(1), 0, 512, MemAccess::Read, &mut touch),
        Some(Ok(()))
    );
}

#[test]
fn park_waits_at_most_until_the_earliest_due_time() {
    let (mut io, clock) = delayed(8);
    io.push(read(0, 0, 1)).unwrap();
    assert_eq!(poll(&mut io), vec![]);
    clock.set(1_000);
    io.park(None).unwrap();
    io.park(Some(10)).unwrap();
    io.park(Some(1_000_000)).unwrap();
    assert_eq!(io.parks, vec![Some(82_906), Some(10), Some(82_906)]);
    clock.set(90_000);
    io.park(None).unwrap();
    assert_eq!(io.parks.len(), 3, "a due completion does not park");
}

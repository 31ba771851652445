use std::os::fd::AsRawFd;

use super::*;

const A: NodeId = NodeId(0);
const B: NodeId = NodeId(1);

fn opts() -> NetOptions {
    NetOptions {
        buffer_bytes: 1000,
        max_delay_ticks: 4,
        short_io_percent: 50,
        cut_per_million_ticks: 0,
    }
}

/// Read from `s` until `want` bytes came or `ticks` ticks passed.
fn read_for(net: &SimNet, s: &mut SimStream, want: usize, ticks: u32) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    for _ in 0..ticks {
        loop {
            match s.read(&mut buf) {
                Ok(0) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.0 == libc::EAGAIN => break,
                Err(e) => panic!("read: {e}"),
            }
        }
        if got.len() >= want {
            return got;
        }
        net.tick();
    }
    got
}

/// Write all of `data` to `s`, ticking while the pipe is full.
fn write_all(net: &SimNet, s: &mut SimStream, mut data: &[u8], ticks: u32) {
    for _ in 0..ticks {
        match s.write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.0 == libc::EAGAIN => net.tick(),
            Err(e) => panic!("write: {e}"),
        }
        if data.is_empty() {
            return;
        }
    }
    panic!("{} bytes never went", data.len());
}

/// The seed decides every delay and short transfer: the same seed gives the same trace, and
/// the bytes arrive whole and in order whatever the pieces were.
#[test]
fn a_seed_repeats_and_bytes_arrive_in_order() {
    let trace = |seed: u64| {
        let net = SimNet::new(seed, opts());
        let (a, b) = net.socket_pair(A, B).unwrap();
        let (mut a, mut b) = (net.stream(a), net.stream(b));
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let mut sent = 0;
        let mut got = Vec::new();
        let mut pieces = Vec::new();
        let mut buf = [0u8; 300];
        for _ in 0..10_000 {
            if sent < data.len() {
                if let Ok(n) = a.write(&data[sent..]) {
                    sent += n;
                    pieces.push(n);
                }
            }
            if let Ok(n) = b.read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
                pieces.push(n);
            }
            if got.len() == data.len() {
                break;
            }
            net.tick();
        }
        assert_eq!(got, data, "seed {seed}: the stream arrives whole, in order");
        (pieces, net.now_tick())
    };
    for seed in 0..20 {
        assert_eq!(trace(seed), trace(seed), "seed {seed} repeats");
    }
    assert_ne!(
        trace(1).0,
        trace(2).0,
        "other seeds cut the stream differently"
    );
}

/// A pipe holds at most `buffer_bytes`: a writer whose peer does not read is refused more.
#[test]
fn a_full_pipe_pushes_back() {
    let net = SimNet::new(
        7,
        NetOptions {
            short_io_percent: 0,
            ..opts()
        },
    );
    let (a, b) = net.socket_pair(A, B).unwrap();
    let (mut a, mut b) = (net.stream(a), net.stream(b));
    assert_eq!(a.write(&[1; 1500]), Ok(1000));
    assert_eq!(a.write(&[1; 10]), Err(Errno(libc::EAGAIN)));
    for _ in 0..10 {
        net.tick();
    }
    assert_eq!(
        a.write(&[1; 10]),
        Err(Errno(libc::EAGAIN)),
        "arrived, unread"
    );
    assert_eq!(read_for(&net, &mut b, 400, 1).len(), 1000);
    assert_eq!(a.write(&[1; 10]), Ok(10));
}

/// A partition holds delivery until it heals; sends still fill the pipe.
#[test]
fn a_partition_stops_delivery_until_healed() {
    let net = SimNet::new(3, opts());
    let (a, b) = net.socket_pair(A, B).unwrap();
    let (mut a, mut b) = (net.stream(a), net.stream(b));
    net.partition(B, A);
    write_all(&net, &mut a, b"hello", 10);
    assert!(
        read_for(&net, &mut b, 5, 50).is_empty(),
        "nothing crosses a partition"
    );
    net.heal(A, B);
    assert_eq!(read_for(&net, &mut b, 5, 50), b"hello");
}

/// A cut resets both ends: reads and writes fail with ECONNRESET. A shutdown is end-of-file
/// after the data, and writes after it fail with EPIPE.
#[test]
fn cuts_reset_and_shutdowns_end_the_stream() {
    let net = SimNet::new(5, opts());
    let (a, b) = net.socket_pair(A, B).unwrap();
    let (mut a, mut b) = (net.stream(a), net.stream(b));
    write_all(&net, &mut a, b"bye", 10);
    a.shutdown();
    assert_eq!(a.write(b"x"), Err(Errno(libc::EPIPE)));
    assert_eq!(read_for(&net, &mut b, 100, 50), b"bye", "then end-of-file");
    assert_eq!(b.read(&mut [0; 4]), Ok(0));

    let (c, d) = net.socket_pair(A, B).unwrap();
    let (mut c, mut d) = (net.stream(c), net.stream(d));
    write_all(&net, &mut c, b"lost", 10);
    d.cut();
    assert_eq!(c.write(b"x"), Err(Errno(libc::ECONNRESET)));
    assert_eq!(d.read(&mut [0; 4]), Err(Errno(libc::ECONNRESET)));
    assert_eq!(c.read(&mut [0; 4]), Err(Errno(libc::ECONNRESET)));
}

/// Closing a socket's descriptor is a close: the peer reads end-of-file (or a reset when
/// bytes the closer never read were thrown away), and the network forgets the socket.
#[test]
fn closing_the_descriptor_closes_the_socket() {
    let net = SimNet::new(9, opts());
    let (a, b) = net.socket_pair(A, B).unwrap();
    let mut b = net.stream(b);
    assert_eq!(net.open_sockets(), 2);
    drop(a);
    net.tick();
    assert_eq!(net.open_sockets(), 1);
    assert_eq!(read_for(&net, &mut b, 1, 10), b"");
    assert_eq!(b.write(b"x"), Err(Errno(libc::EPIPE)));

    let (c, d) = net.socket_pair(A, B).unwrap();
    let mut d = net.stream(d);
    write_all(&net, &mut d, b"unread", 10);
    for _ in 0..10 {
        net.tick();
    }
    drop(c);
    net.tick();
    assert_eq!(d.read(&mut [0; 8]), Err(Errno(libc::ECONNRESET)));
}

/// A crashed node's connections are reset; others carry on.
#[test]
fn a_crash_resets_the_nodes_connections() {
    let net = SimNet::new(11, opts());
    let (a, b) = net.socket_pair(A, B).unwrap();
    let (c, d) = net.socket_pair(NodeId(2), B).unwrap();
    let (mut a, mut d) = (net.stream(a), net.stream(d));
    let mut c = net.stream(c);
    let _b = b;
    net.crash_node(A);
    assert_eq!(a.write(b"x"), Err(Errno(libc::ECONNRESET)));
    write_all(&net, &mut c, b"fine", 10);
    assert_eq!(read_for(&net, &mut d, 4, 50), b"fine");
}

/// The ring side: a single-shot receive, a send of an iovec list, a multishot receive over
/// provided buffers that ends with ENOBUFS when none is free, fixed slots, and raw entries
/// refused.
#[test]
fn ring_ops_complete_from_the_network() {
    let net = SimNet::new(
        13,
        NetOptions {
            short_io_percent: 0,
            ..opts()
        },
    );
    let ring = net.new_ring();
    let (task_fd, client) = net.connect(A, B).unwrap();
    let mut client = net.stream(client.fd);
    let fd = task_fd.as_raw_fd();
    let slot = net.register_fd(ring, 1, fd).expect("a slot");
    let mut done = Vec::new();

    // Send "ab" + "cd" with sendmsg through the fixed slot.
    let (x, y) = (*b"ab", *b"cd");
    let iov = [
        libc::iovec {
            iov_base: x.as_ptr() as *mut libc::c_void,
            iov_len: 2,
        },
        libc::iovec {
            iov_base: y.as_ptr() as *mut libc::c_void,
            iov_len: 2,
        },
    ];
    // SAFETY: msghdr is plain old data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = 2;
    let op = SocketOp::SendMsg {
        socket: Socket::Fixed(slot),
        msg: &msg,
    };
    // SAFETY: msg, iov and the bytes outlive the op (it completes within this test's ticks).
    unsafe { net.push(ring, 1, op, 7) };
    net.tick();
    net.take_completions(ring, &mut done);
    assert_eq!(
        done,
        [(
            1,
            RingCompletion {
                tag: 7,
                result: 4,
                flags: 0
            }
        )]
    );
    assert_eq!(read_for(&net, &mut client, 4, 20), b"abcd");

    // A zero-copy send: its result (flagged MORE), then its notification.
    let z = *b"zc";
    let op = SocketOp::SendZc {
        socket: Socket::Fd(fd),
        buf: z.as_ptr(),
        len: 2,
    };
    // SAFETY: z outlives the op.
    unsafe { net.push(ring, 1, op, 11) };
    done.clear();
    // The notification follows the result a tick or more later.
    for _ in 0..opts().max_delay_ticks + 2 {
        net.tick();
        net.take_completions(ring, &mut done);
    }
    let got: Vec<_> = done
        .iter()
        .map(|(_, c)| (c.tag, c.result, c.more(), c.is_notification()))
        .collect();
    assert_eq!(got, [(11, 2, true, false), (11, 0, false, true)]);
    assert_eq!(read_for(&net, &mut client, 2, 20), b"zc");

    // A single-shot receive.
    let mut rbuf = [0u8; 16];
    let op = SocketOp::Recv {
        socket: Socket::Fd(fd),
        buf: rbuf.as_mut_ptr(),
        len: 16,
        poll_first: false,
    };
    // SAFETY: rbuf outlives the op.
    unsafe { net.push(ring, 1, op, 8) };
    write_all(&net, &mut client, b"hey", 10);
    done.clear();
    for _ in 0..20 {
        net.tick();
        net.take_completions(ring, &mut done);
        if !done.is_empty() {
            break;
        }
    }
    assert_eq!(
        done,
        [(
            1,
            RingCompletion {
                tag: 8,
                result: 3,
                flags: 0
            }
        )]
    );
    assert_eq!(&rbuf[..3], b"hey");

    // A multishot receive into two provided buffers of 4 bytes: 10 bytes fill both, then it
    // ends with ENOBUFS until a buffer comes back.
    let mut bufs = ProvidedBuffers::new(2, 4);
    // SAFETY: bufs outlives the registration (released below).
    let group = unsafe { net.register_buffers(ring, 1, &mut bufs) }.expect("a group");
    write_all(&net, &mut client, b"0123456789", 10);
    for _ in 0..10 {
        net.tick();
    }
    // SAFETY: the buffers stay registered until release_task below.
    unsafe {
        net.push(
            ring,
            1,
            SocketOp::RecvMulti {
                socket: Socket::Fd(fd),
                group,
            },
            9,
        )
    };
    net.tick();
    done.clear();
    net.take_completions(ring, &mut done);
    let got: Vec<_> = done
        .iter()
        .map(|(_, c)| (c.result, c.buffer(), c.more()))
        .collect();
    assert_eq!(
        got,
        [
            (4, Some(0), true),
            (4, Some(1), true),
            (-libc::ENOBUFS, None, false)
        ]
    );
    bufs.take(0);
    bufs.take(1);
    assert_eq!(bufs.bytes(0, 4), b"0123");
    assert_eq!(bufs.bytes(1, 4), b"4567");
    bufs.recycle(0);
    // SAFETY: as above.
    unsafe {
        net.push(
            ring,
            1,
            SocketOp::RecvMulti {
                socket: Socket::Fd(fd),
                group,
            },
            9,
        )
    };
    client.shutdown();
    done.clear();
    for _ in 0..10 {
        net.tick();
        net.take_completions(ring, &mut done);
    }
    let got: Vec<_> = done
        .iter()
        .map(|(_, c)| (c.result, c.buffer(), c.more()))
        .collect();
    assert_eq!(
        got,
        [(2, Some(0), true), (0, None, false)],
        "the rest, then end-of-file"
    );
    assert_eq!(net.pending_ops(), 0);
    net.release_task(ring, 1);
    drop(bufs);

    // An unknown socket fails like a bad descriptor.
    // SAFETY: nothing is pointed to.
    unsafe {
        net.push(
            ring,
            1,
            SocketOp::Send {
                socket: Socket::Fixed(slot),
                buf: std::ptr::null(),
                len: 0,
            },
            10,
        )
    };
    done.clear();
    net.take_completions(ring, &mut done);
    assert_eq!(done[0].1.errno(), Some(Errno(libc::EBADF)));
    net.drop_ring(ring);
}

/// The simulated ring refuses raw entries with EOPNOTSUPP.
#[test]
fn the_simulated_ring_refuses_raw_entries() {
    use crate::io::task_ring::TaskRing;
    let net = SimNet::new(1, opts());
    let clock = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut io = crate::io::sim::SimIo::new(Default::default(), clock, 1, 4, 4).with_net(&net);
    let entry = io_uring::opcode::Nop::new().build();
    // SAFETY: a NOP points at nothing.
    let r = unsafe { io.push_raw(0, entry, 0) };
    assert_eq!(r, Err(Errno(libc::EOPNOTSUPP)));
}

/// A zero-copy send delivers like a send; its result says a notification follows, which comes
/// (never "copied") one or more ticks later, by the seed, and the op is pending until then.
/// A small one, or any on a ring without zero-copy, is a copying send: one completion. The
/// ring counts each path.
#[test]
fn zero_copy_sends_are_notified_after_their_result() {
    use crate::io::sim::SimIo;
    use crate::io::task_ring::TaskRing;
    use crate::io::zero_copy::{SendCounts, ZERO_COPY_MIN_BYTES};

    let data: Vec<u8> = (0..ZERO_COPY_MIN_BYTES).map(|i| (i * 13) as u8).collect();
    let mut delays = BTreeSet::new();
    for seed in 0..20 {
        let net = SimNet::new(
            seed,
            NetOptions {
                buffer_bytes: 4 * ZERO_COPY_MIN_BYTES,
                short_io_percent: 0,
                ..opts()
            },
        );
        let clock = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut io = SimIo::new(Default::default(), clock, seed, 4, 4).with_net(&net);
        assert!(io.zero_copy_sends());
        let (task_fd, client) = net.connect(A, B).unwrap();
        let mut client = net.stream(client.fd);
        let socket = Socket::Fd(task_fd.as_raw_fd());
        let op = SocketOp::SendZc {
            socket,
            buf: data.as_ptr(),
            len: data.len() as u32,
        };
        // SAFETY: `data` outlives the op (its notification is awaited below).
        unsafe { io.push(1, op, 5) }.unwrap();
        let (mut result_tick, mut notified_tick) = (None, None);
        let mut done = Vec::new();
        for _ in 0..50 {
            net.tick();
            done.clear();
            io.take_completions(&mut done);
            for &(task, c) in &done {
                assert_eq!((task, c.tag), (1, 5));
                if c.is_notification() {
                    assert!(
                        result_tick.is_some(),
                        "seed {seed}: notified before the result"
                    );
                    assert!(!c.more() && !c.copied(), "seed {seed}: {c:?}");
                    notified_tick = Some(net.now_tick());
                } else {
                    assert_eq!(c.result, data.len() as i32, "seed {seed}");
                    assert!(
                        c.more(),
                        "seed {seed}: the result announces the notification"
                    );
                    result_tick = Some(net.now_tick());
                }
            }
            // In flight until the notification, not just until the result.
            assert_eq!(net.pending_ops(), usize::from(notified_tick.is_none()));
            if notified_tick.is_some() {
                break;
            }
        }
        let result_tick = result_tick.expect("a result");
        let notified_tick = notified_tick.expect("a notification");
        assert!(notified_tick > result_tick, "seed {seed}");
        assert!(notified_tick <= result_tick + opts().max_delay_ticks + 1);
        delays.insert(notified_tick - result_tick);
        assert_eq!(read_for(&net, &mut client, data.len(), 50), data);

        // Under the threshold: a copying send, one completion without `more`.
        let small = SocketOp::SendZc {
            socket,
            buf: data.as_ptr(),
            len: 100,
        };
        // SAFETY: as above; it completes within the ticks below.
        unsafe { io.push(1, small, 6) }.unwrap();
        net.tick();
        done.clear();
        io.take_completions(&mut done);
        assert_eq!(
            done,
            [(
                1,
                RingCompletion {
                    tag: 6,
                    result: 100,
                    flags: 0
                }
            )]
        );
        assert_eq!(net.pending_ops(), 0);
        assert_eq!(read_for(&net, &mut client, 100, 50), &data[..100]);
        assert_eq!(
            io.send_counters().snapshot(),
            SendCounts {
                zero_copy: 1,
                copied_small: 1,
                ..Default::default()
            }
        );
    }
    assert!(delays.len() > 1, "the seed picks the delay: {delays:?}");
}

/// A frame header and its pages in one zero-copy sendmsg arrive in order, notified after the
/// result; on a ring without zero-copy the same op is a copying sendmsg.
#[test]
fn zero_copy_sendmsg_sends_header_and_pages() {
    use crate::io::sim::SimIo;
    use crate::io::task_ring::TaskRing;
    use crate::io::zero_copy::ZERO_COPY_MIN_BYTES;

    let header = *b"HDR:";
    let pages: Vec<u8> = (0..ZERO_COPY_MIN_BYTES).map(|i| (i % 251) as u8).collect();
    let iov = [
        libc::iovec {
            iov_base: header.as_ptr() as *mut libc::c_void,
            iov_len: header.len(),
        },
        libc::iovec {
            iov_base: pages.as_ptr() as *mut libc::c_void,
            iov_len: pages.len(),
        },
    ];
    // SAFETY: msghdr is plain old data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = 2;
    let total = header.len() + pages.len();
    for zero_copy in [true, false] {
        let net = SimNet::new(
            3,
            NetOptions {
                buffer_bytes: 4 * ZERO_COPY_MIN_BYTES,
                short_io_percent: 0,
                ..opts()
            },
        );
        let clock = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut io = SimIo::new(Default::default(), clock, 3, 4, 4).with_net(&net);
        if !zero_copy {
            io = io.without_zero_copy();
        }
        let (task_fd, client) = net.connect(A, B).unwrap();
        let mut client = net.stream(client.fd);
        let op = SocketOp::SendMsgZc {
            socket: Socket::Fd(task_fd.as_raw_fd()),
            msg: &msg,
        };
        // SAFETY: msg, iov, header and pages outlive the op (awaited below).
        unsafe { io.push(2, op, 9) }.unwrap();
        let mut done = Vec::new();
        for _ in 0..20 {
            net.tick();
            io.take_completions(&mut done);
        }
        let got: Vec<_> = done
            .iter()
            .map(|(_, c)| (c.is_notification(), c.more()))
            .collect();
        if zero_copy {
            assert_eq!(got, [(false, true), (true, false)]);
        } else {
            assert_eq!(got, [(false, false)]);
        }
        assert_eq!(done[0].1.result, total as i32);
        let arrived = read_for(&net, &mut client, total, 50);
        assert_eq!(&arrived[..4], b"HDR:");
        assert_eq!(&arrived[4..], &pages[..]);
        let counts = io.send_counters().snapshot();
        assert_eq!(
            (counts.zero_copy, counts.copied_unsupported),
            (u64::from(zero_copy), u64::from(!zero_copy))
        );
    }
}

/// Seeded random cuts: the tick a connection is cut at repeats with its seed.
#[test]
fn random_cuts_come_from_the_seed() {
    let cut_tick = |seed: u64| {
        let net = SimNet::new(
            seed,
            NetOptions {
                cut_per_million_ticks: 20_000,
                ..opts()
            },
        );
        let (a, b) = net.socket_pair(A, B).unwrap();
        let (mut a, _b) = (net.stream(a), net.stream(b));
        for _ in 0..10_000 {
            net.tick();
            if a.write(b"x") == Err(Errno(libc::ECONNRESET)) {
                return net.now_tick();
            }
            let _ = a.read(&mut [0u8; 8]);
        }
        panic!("seed {seed}: never cut");
    };
    let ticks: Vec<u64> = (0..8).map(cut_tick).collect();
    assert_eq!(ticks, (0..8).map(cut_tick).collect::<Vec<_>>());
    assert!(ticks.iter().any(|&t| t != ticks[0]), "{ticks:?}");
}

/// A receive of no bytes completes with 0 at once, as the kernel's does, whether or not
/// bytes wait: it never hangs.
#[test]
fn a_zero_byte_receive_returns_zero_at_once() {
    let net = SimNet::new(3, opts());
    let ring = net.new_ring();
    let (task_fd, mut client) = net.connect(A, B).unwrap();
    let fd = task_fd.as_raw_fd();
    let mut done = Vec::new();
    let mut rbuf = [0u8; 1];
    for (tag, waiting) in [(1, false), (2, true)] {
        if waiting {
            write_all(&net, &mut client, b"x", 10);
            for _ in 0..opts().max_delay_ticks + 1 {
                net.tick();
            }
        }
        let op = SocketOp::Recv {
            socket: Socket::Fd(fd),
            buf: rbuf.as_mut_ptr(),
            len: 0,
            poll_first: false,
        };
        // SAFETY: rbuf outlives the op.
        unsafe { net.push(ring, 1, op, tag) };
        net.tick();
        done.clear();
        net.take_completions(ring, &mut done);
        let want = RingCompletion {
            tag,
            result: 0,
            flags: 0,
        };
        assert_eq!(done, [(1, want)], "waiting bytes: {waiting}");
    }
    assert_eq!(net.pending_ops(), 0);
}

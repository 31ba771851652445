//! Tasks on the simulator, talking across a simulated network between two engines (the
//! ground the replication tests stand on): a pinger on node 1 sends numbered frames to an echo
//! task on node 2 and checks what comes back, with a multishot receive over provided buffers
//! on one side and single-shot receives on the other. A partition stops the traffic until it
//! heals; a crash of node 2 resets the link, and the pinger ends with `ECONNRESET`; every
//! task table drains. A seed repeats exactly.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use ringblock_engine::io::sim_net::{NetOptions, NodeId, SimNet};
use ringblock_engine::provided::ProvidedBuffers;
use ringblock_engine::sim_cluster::{SimCluster, SimOptions};
use ringblock_engine::task::{ReactorTask, RingCompletion, Socket, SocketOp, TaskCtx};
use ringblock_engine::{Errno, ReactorId};

const FRAME: usize = 16;
const TAG_RECV: u32 = 0;
const TAG_SEND: u32 = 1;

/// What the pinger saw: echoes checked, and how it ended.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct PingState {
    echoes: u64,
    ended: Option<i32>,
}

fn frame(n: u64) -> [u8; FRAME] {
    let mut f = [0u8; FRAME];
    f[..8].copy_from_slice(&n.to_le_bytes());
    f[8..].copy_from_slice(&(!n).to_le_bytes());
    f
}

/// Sends frames 0, 1, 2… one send at a time and checks the echoes in order.
struct Pinger {
    fd: OwnedFd,
    rx: Option<ProvidedBuffers>,
    out: [u8; FRAME],
    next: u64,
    sent: usize,
    sending: bool,
    receiving: bool,
    partial: Vec<u8>,
    state: Arc<Mutex<PingState>>,
    done: bool,
}

impl Pinger {
    fn end(&mut self, result: i32) {
        self.done = true;
        self.state.lock().unwrap().ended.get_or_insert(result);
    }

    fn on_bytes(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        let mut st = self.state.lock().unwrap();
        while self.partial.len() >= FRAME {
            let got: Vec<u8> = self.partial.drain(..FRAME).collect();
            assert_eq!(got, frame(st.echoes), "echo {} out of order", st.echoes);
            st.echoes += 1;
        }
    }
}

impl ReactorTask for Pinger {
    fn poll(&mut self, ctx: &mut TaskCtx<'_>) -> usize {
        if self.rx.is_none() {
            let mut rx = ProvidedBuffers::new(4, 40);
            // SAFETY: `rx` lives in `self` until the reactor drops the task.
            unsafe { ctx.register_buffers(&mut rx) }.expect("the simulator lends buffers");
            self.rx = Some(rx);
        }
        if self.done {
            return 0;
        }
        let mut work = 0;
        if !self.sending {
            if self.sent == FRAME {
                self.next += 1;
                self.sent = 0;
            }
            self.out = frame(self.next);
            let op = SocketOp::Send {
                socket: Socket::Fd(self.fd.as_raw_fd()),
                buf: self.out[self.sent..].as_ptr(),
                len: (FRAME - self.sent) as u32,
            };
            // SAFETY: `out` is not touched while the send is in flight; the task outlives it.
            self.sending = unsafe { ctx.push(op, TAG_SEND) }.is_ok();
            work += 1;
        }
        if !self.receiving {
            let group = self.rx.as_ref().and_then(ProvidedBuffers::group).unwrap();
            let op = SocketOp::RecvMulti {
                socket: Socket::Fd(self.fd.as_raw_fd()),
                group,
            };
            // SAFETY: the buffers stay registered while the task lives.
            self.receiving = unsafe { ctx.push(op, TAG_RECV) }.is_ok();
            work += 1;
        }
        work
    }

    fn on_ring(&mut self, _ctx: &mut TaskCtx<'_>, c: RingCompletion) {
        match c.tag {
            TAG_SEND => {
                self.sending = false;
                match c.errno() {
                    None => self.sent += c.result as usize,
                    Some(e) => self.end(-e.0),
                }
            }
            _ => {
                if !c.more() {
                    self.receiving = false;
                }
                if let Some(bid) = c.buffer() {
                    let mut rx = self.rx.take().unwrap();
                    rx.take(bid);
                    self.on_bytes(rx.bytes(bid, c.result as usize));
                    rx.recycle(bid);
                    self.rx = Some(rx);
                } else if c.errno() != Some(Errno(libc::ENOBUFS)) {
                    self.end(c.result);
                }
            }
        }
    }

    fn stop(&mut self, _ctx: &mut TaskCtx<'_>) {
        self.end(0);
    }

    fn has_ready(&self) -> bool {
        false
    }

    fn finished(&self) -> bool {
        self.done && !self.sending && !self.receiving
    }
}

/// Sends back what it receives: one single-shot receive, then the send of its bytes.
struct Echo {
    fd: OwnedFd,
    buf: [u8; 24],
    have: usize,
    sent: usize,
    in_flight: bool,
    done: bool,
}

impl ReactorTask for Echo {
    fn poll(&mut self, ctx: &mut TaskCtx<'_>) -> usize {
        if self.in_flight || self.done {
            return 0;
        }
        let socket = Socket::Fd(self.fd.as_raw_fd());
        let op = if self.sent < self.have {
            SocketOp::Send {
                socket,
                buf: self.buf[self.sent..].as_ptr(),
                len: (self.have - self.sent) as u32,
            }
        } else {
            (self.have, self.sent) = (0, 0);
            SocketOp::Recv {
                socket,
                buf: self.buf.as_mut_ptr(),
                len: self.buf.len() as u32,
                poll_first: false,
            }
        };
        // SAFETY: `buf` is not touched while the op is in flight; the task outlives it.
        self.in_flight = unsafe { ctx.push(op, 0) }.is_ok();
        1
    }

    fn on_ring(&mut self, _ctx: &mut TaskCtx<'_>, c: RingCompletion) {
        self.in_flight = false;
        if c.result <= 0 {
            self.done = true;
        } else if self.have == 0 {
            self.have = c.result as usize;
        } else {
            self.sent += c.result as usize;
        }
    }

    fn stop(&mut self, _ctx: &mut TaskCtx<'_>) {
        self.done = true;
    }

    fn has_ready(&self) -> bool {
        false
    }

    fn finished(&self) -> bool {
        self.done && !self.in_flight
    }
}

/// Two engines on one network, ticked in rounds: the network once, then each engine.
fn round(net: &SimNet, a: &mut SimCluster, b: Option<&mut SimCluster>) {
    net.tick();
    a.step_reactors();
    if let Some(b) = b {
        b.step_reactors();
    }
}

fn run(seed: u64) -> Vec<u64> {
    let opts = SimOptions {
        reactors: 2,
        ..SimOptions::default()
    };
    let net = SimNet::new(
        seed,
        NetOptions {
            buffer_bytes: 100,
            max_delay_ticks: 3,
            short_io_percent: 40,
            cut_per_million_ticks: 0,
        },
    );
    let (n1, n2) = (NodeId(1), NodeId(2));
    let mut a = SimCluster::start_on(seed, opts, Vec::new(), &net, n1).unwrap();
    let mut b = SimCluster::start_on(seed + 1, opts, Vec::new(), &net, n2).unwrap();
    let (fa, fb) = net.socket_pair(n1, n2).unwrap();
    let state = Arc::new(Mutex::new(PingState::default()));
    let pinger = Pinger {
        fd: fa,
        rx: None,
        out: [0; FRAME],
        next: 0,
        sent: 0,
        sending: false,
        receiving: false,
        partial: Vec::new(),
        state: state.clone(),
        done: false,
    };
    let echo = Echo {
        fd: fb,
        buf: [0; 24],
        have: 0,
        sent: 0,
        in_flight: false,
        done: false,
    };
    assert!(a.spawn_task(ReactorId(1), Box::new(pinger)).is_ok());
    assert!(b.spawn_task(ReactorId(0), Box::new(echo)).is_ok());
    let echoes = || state.lock().unwrap().echoes;
    let mut trace = Vec::new();

    for _ in 0..300 {
        round(&net, &mut a, Some(&mut b));
    }
    let flowing = echoes();
    assert!(flowing > 10, "seed {seed}: echoes flow ({flowing})");
    trace.push(flowing);

    // A partition: what was in flight drains, then nothing moves.
    net.partition(n2, n1);
    for _ in 0..50 {
        round(&net, &mut a, Some(&mut b));
    }
    let held = echoes();
    for _ in 0..300 {
        round(&net, &mut a, Some(&mut b));
    }
    assert_eq!(echoes(), held, "seed {seed}: nothing crosses the partition");
    trace.push(held);

    net.heal_all();
    for _ in 0..300 {
        round(&net, &mut a, Some(&mut b));
    }
    assert!(
        echoes() > held,
        "seed {seed}: traffic resumes after the heal"
    );
    trace.push(echoes());

    // Node 2 loses power: the link resets, the pinger ends, every table drains.
    let images = b.crash(&[], seed);
    assert!(images.is_empty());
    for _ in 0..100 {
        round(&net, &mut a, None);
        if a.tasks() == 0 {
            break;
        }
    }
    assert_eq!(a.tasks(), 0, "seed {seed}: the pinger ends");
    assert!(a.tasks_drained());
    assert_eq!(state.lock().unwrap().ended, Some(-libc::ECONNRESET));
    round(&net, &mut a, None);
    assert_eq!(net.open_sockets(), 0, "seed {seed}: both sockets closed");
    assert_eq!(net.pending_ops(), 0);
    trace.push(net.now_tick());
    trace
}

#[test]
fn tasks_on_two_engines_talk_across_partitions_and_crashes() {
    for seed in 0..20 {
        assert_eq!(run(seed), run(seed), "seed {seed} repeats");
    }
}

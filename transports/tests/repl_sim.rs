//! The replicated write path on the simulator: a primary and one or two replica engines on
//! one seeded network, each replica sync or async (an async queue as small as 16 KiB, so
//! queues overflow and the replica is caught up from the bitmap). The primary's link tasks
//! and the replicas' serve tasks run on simulated socket pairs (the handshake is skipped:
//! both start from the sequence numbers it would leave). Random writes, FUA writes, trims,
//! write-zeroes and flushes are submitted on the primary, and per seed one fault hits one
//! replica's link: none, a cut connection, a partition, a power cut of the replica, or a
//! power cut of the primary.
//!
//! Invariants:
//! - every request succeeds (a failed link degrades the volume, it does not fail IO);
//! - the primary reads back every acknowledged write, and after a power cut every write
//!   acknowledged before an acknowledged flush (and every acknowledged FUA write);
//! - every sector of every replica holds data some write of the primary put there (nothing
//!   is written that the primary did not send);
//! - a replica whose link stays up equals the primary once quiet; after a link failed (a
//!   fault, or an async queue that overflowed) every sector where that replica differs lies
//!   in a region the primary's bitmap marks dirty for it;
//! - regions written after a link failed and covered by a later acknowledged flush are
//!   still marked after a power cut of the primary (the marks were durable);
//! - after any fault the network heals and new links resync the dirty regions while writes
//!   go on (now and then a second cut or a power cut of a replica hits the resync, and one
//!   more link finishes it): every link ends up to date and every replica equals the
//!   primary, which still holds every acknowledged write, and has the primary's history.
//!
//! `RINGBLOCK_SIM_SEEDS=N` runs N seeds (default 100).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ringblock_engine::io::sim::SimDisk;
use ringblock_engine::io::sim_net::{NetOptions, NodeId, SimNet};
use ringblock_engine::profile;
use ringblock_engine::replication::{
    run_cycle, CycleOutcome, EvictHost, EvictTiming, LinkMode, LinkState, NodeId as ReplicaNode,
    RegionIndex, ReplicaLink, ReplicaSet, Role, VolumeReplication,
};
use ringblock_engine::sim_check::{decode_sector, fill_sector, SectorLog};
use ringblock_engine::sim_cluster::{SimCluster, SimOptions};
use ringblock_engine::task::{ReactorTask, RingCompletion, TaskCtx};
use ringblock_engine::{
    AlignedBuf, DeviceId, DeviceSpec, FormatPolicy, IoBuf, Port, PortWaker, ReactorId, Request,
    RequestKind, VolumeId,
};
use ringblock_transports::peer::{
    LinkOptions, PrimaryLink, ReplicaServe, ReplicatedVolumeId, Seq, ServeOptions,
};

const SECTOR: u64 = 512;
const CHUNK: u64 = 16 * 1024;
const DEVICE_BYTES: u64 = 6 << 20;
const VOLUME_BYTES: u64 = 3 << 20;
const REGION_SHIFT: u8 = 16;
const MAX_QD: usize = 8;
const PRIMARY: NodeId = NodeId(0);
const REPLICA: NodeId = NodeId(1);
/// Ticks any one wait may take before the run counts as stuck.
const MAX_WAIT_TICKS: u64 = 100_000;

fn spec() -> DeviceSpec {
    let mut p = profile::builtin("flash").unwrap();
    p.logical_block_size_bytes = SECTOR as u32;
    DeviceSpec {
        id: DeviceId(0),
        name: "sim0".into(),
        kind: "sim".into(),
        size_bytes: DEVICE_BYTES,
        persistent: true,
        profile: p,
        chunk_size_bytes: CHUNK,
        format: FormatPolicy::IfBlank,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    Cut,
    Partition,
    ReplicaCrash,
    PrimaryCrash,
    /// A power cut of the primary while its links are up (async queues may hold writes, and
    /// eviction cycles ran): it restarts at once and the load goes on, degraded.
    PrimaryCrashLinked,
}

enum Pending {
    Write {
        offset: u64,
        len: u64,
        fua: bool,
        /// Per copy: submitted after its link failed.
        after_fail: Vec<bool>,
    },
    Flush {
        snaps: Vec<(u64, u64)>,
        /// Per copy: the regions written after its link failed and acknowledged before this
        /// flush was sent.
        marks: Vec<BTreeSet<u64>>,
    },
}

struct Node {
    disk: Arc<Mutex<SimDisk>>,
    cluster: Option<SimCluster>,
}

impl Node {
    fn c(&mut self) -> &mut SimCluster {
        self.cluster.as_mut().expect("running")
    }
}

/// One replica node, and what the test knows of its current link.
struct Copy {
    node: Node,
    net_id: NodeId,
    mode: LinkMode,
    /// The current link's task entered the fan-out (before that, writes only mark).
    link_entered: bool,
    link_fd: i32,
    /// The current link's primary task is alive (see [`Tracked`]).
    link_alive: Arc<AtomicBool>,
    /// Regions of writes submitted after the link failed, once acknowledged, and those a
    /// later flush made durable.
    marked_after_fail: BTreeSet<u64>,
    durable_marks: BTreeSet<u64>,
}

/// A primary link task that says when the reactor dropped it.
struct Tracked {
    task: PrimaryLink,
    alive: Arc<AtomicBool>,
}

impl ReactorTask for Tracked {
    fn poll(&mut self, ctx: &mut TaskCtx<'_>) -> usize {
        self.task.poll(ctx)
    }
    fn on_ring(&mut self, ctx: &mut TaskCtx<'_>, c: RingCompletion) {
        self.task.on_ring(ctx, c)
    }
    fn stop(&mut self, ctx: &mut TaskCtx<'_>) {
        self.task.stop(ctx)
    }
    fn has_ready(&self) -> bool {
        self.task.has_ready()
    }
    fn finished(&self) -> bool {
        self.task.finished()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::SeqCst);
    }
}

struct Run {
    seed: u64,
    rng: ChaCha8Rng,
    net: SimNet,
    opts: SimOptions,
    p: Node,
    copies: Vec<Copy>,
    /// The primary's links, one per copy: they outlive connections; a restarted primary
    /// makes new ones from the state it loaded.
    links: Vec<Arc<ReplicaLink>>,
    port: Arc<Port>,
    sectors: HashMap<u64, SectorLog>,
    /// Every value a sector ever got from the primary.
    written: HashMap<u64, BTreeSet<u64>>,
    next_value: u64,
    next_tag: u64,
    pending: BTreeMap<u64, Pending>,
    /// Regions activity-log eviction cycles dropped.
    evicted: usize,
}

/// An eviction cycle on the simulator: its waits step the nodes (and now and then issue a
/// write), its flushes go through the primary's write path.
struct SimEvictHost<'a> {
    run: &'a mut Run,
    port: Arc<Port>,
}

impl EvictHost for SimEvictHost<'_> {
    fn flush(&mut self) -> Result<(), String> {
        let volume = self.run.p.c().volume("a").expect("volume a");
        let req = Request::flush(0);
        let port = self.port.clone();
        if let Err((_, e)) = self.run.p.c().submit(&volume, req, &port) {
            return Err(e.to_string());
        }
        for _ in 0..MAX_WAIT_TICKS {
            self.run.step();
            if let Some(c) = self.port.pop() {
                return c.result.map_err(|e| e.to_string());
            }
        }
        Err("the flush never completed".into())
    }

    fn metadata_changed(&mut self) {
        self.run
            .p
            .c()
            .volume("a")
            .expect("volume a")
            .replication_changed();
    }

    fn pause(&mut self) {
        if self.run.rng.gen_bool(0.3) {
            self.run.issue();
        }
        self.run.step();
    }

    fn stopping(&self) -> bool {
        false
    }
}

fn start(
    seed: u64,
    opts: SimOptions,
    net: &SimNet,
    node: NodeId,
    disk: &Arc<Mutex<SimDisk>>,
) -> SimCluster {
    SimCluster::start_on(seed, opts, vec![(spec(), disk.clone())], net, node)
        .unwrap_or_else(|e| panic!("seed {seed}: start failed: {e}"))
}

impl Run {
    /// A power cut of the primary with its links up: requests in flight are lost (their
    /// values may or may not have landed, as the sector logs allow), the primary restarts
    /// and attaches its replica set at once (behind: writes mark the bitmaps), as the
    /// daemon does before it serves.
    fn crash_primary_linked(&mut self) {
        self.pending.clear();
        // Only the durable value is certain now: a later flush covers what is acknowledged
        // after the restart, not what was acknowledged before and lost.
        for log in self.sectors.values_mut() {
            log.acked = log.base;
        }
        self.restart(None, 2);
        self.ensure_links();
        for copy in &mut self.copies {
            copy.link_entered = false;
        }
    }

    /// Now and then (one step in 200), an activity-log eviction cycle while writes go on.
    fn maybe_evict(&mut self) {
        if !self.rng.gen_bool(0.005) {
            return;
        }
        let Some(replication) = self.links.first().map(|l| l.replication().clone()) else {
            return;
        };
        let links = self.links.clone();
        let mut host = SimEvictHost {
            run: self,
            port: Port::new(1, PortWaker::None),
        };
        let timing = EvictTiming {
            wait: std::time::Duration::from_secs(60),
        };
        if let CycleOutcome::Evicted(n) = run_cycle(&replication, &links, &mut host, timing) {
            self.evicted += n;
        }
    }

    fn step(&mut self) {
        self.net.tick();
        if let Some(c) = self.p.cluster.as_mut() {
            c.step_reactors();
        }
        for copy in &mut self.copies {
            if let Some(c) = copy.node.cluster.as_mut() {
                c.step_reactors();
            }
        }
        for (copy, link) in self.copies.iter_mut().zip(&self.links) {
            if link.in_fan_out() {
                copy.link_entered = true;
            }
        }
        while let Some(c) = self.port.pop() {
            let p = self.pending.remove(&c.tag).expect("a pending request");
            assert!(
                c.result.is_ok(),
                "seed {}: request failed: {:?}",
                self.seed,
                c.result
            );
            self.reap(p);
        }
    }

    /// Copy `i`'s current link entered the fan-out and left it.
    fn link_failed(&self, i: usize) -> bool {
        self.copies[i].link_entered
            && self
                .links
                .get(i)
                .is_some_and(|l| l.state() == LinkState::Behind)
    }

    fn failed_links(&self) -> Vec<usize> {
        (0..self.copies.len())
            .filter(|&i| self.link_failed(i))
            .collect()
    }

    fn reap(&mut self, p: Pending) {
        match p {
            Pending::Write {
                offset,
                len,
                fua,
                after_fail,
            } => {
                for s in offset / SECTOR..(offset + len) / SECTOR {
                    let log = self.sectors.get_mut(&s).expect("logged");
                    log.ack_newest();
                    if fua {
                        let acked = log.acked;
                        log.durable_from(acked);
                    }
                    for (copy, _) in self.copies.iter_mut().zip(&after_fail).filter(|c| *c.1) {
                        copy.marked_after_fail.insert((s * SECTOR) >> REGION_SHIFT);
                    }
                }
            }
            Pending::Flush { snaps, marks } => {
                // Everything acknowledged when the flush was sent is durable.
                for (s, acked) in snaps {
                    self.sectors
                        .get_mut(&s)
                        .expect("logged")
                        .durable_from(acked);
                }
                for (copy, marks) in self.copies.iter_mut().zip(marks) {
                    copy.durable_marks.extend(marks);
                }
            }
        }
    }

    fn busy(&self, offset: u64, len: u64) -> bool {
        self.pending.values().any(|p| match *p {
            Pending::Write {
                offset: o, len: l, ..
            } => offset < o + l && o < offset + len,
            _ => false,
        })
    }

    fn submit(&mut self, req: Request, pending: Pending) {
        let volume = self.p.c().volume("a").expect("volume a");
        let port = self.port.clone();
        let tag = req.tag;
        if let Err((_, e)) = self.p.c().submit(&volume, req, &port) {
            panic!("seed {}: submit refused: {e}", self.seed);
        }
        self.pending.insert(tag, pending);
    }

    fn issue(&mut self) {
        if self.pending.len() >= MAX_QD {
            return;
        }
        let sectors = VOLUME_BYTES / SECTOR;
        // Now and then a write larger than one frame's payload (1 MiB): several frames.
        let max_len = if self.rng.gen_bool(0.03) {
            3 << 19
        } else {
            3 * CHUNK
        };
        let len_sectors = self.rng.gen_range(1..=max_len / SECTOR);
        let first = self.rng.gen_range(0..=sectors - len_sectors);
        let (offset, len) = (first * SECTOR, len_sectors * SECTOR);
        self.next_tag += 1;
        let tag = self.next_tag;
        if self.rng.gen_bool(0.005) {
            // The primary starts a generation (as when another replica drops out): the
            // replicas follow it.
            if let Some(link) = self.links.first() {
                link.replication().start_generation();
                self.p
                    .c()
                    .volume("a")
                    .expect("volume a")
                    .replication_changed();
            }
        }
        let roll = self.rng.gen_range(0..100);
        if roll < 10 {
            let snaps = self.sectors.iter().map(|(&s, l)| (s, l.acked)).collect();
            let marks = self
                .copies
                .iter()
                .map(|c| c.marked_after_fail.clone())
                .collect();
            let req = Request::flush(tag);
            self.submit(req, Pending::Flush { snaps, marks });
            return;
        }
        if self.busy(offset, len) {
            return;
        }
        let (kind, fua) = match roll {
            10..=17 => (RequestKind::Trim, false),
            18..=25 => (RequestKind::WriteZeroes, false),
            _ => (RequestKind::Write, self.rng.gen_bool(0.15)),
        };
        let mut buf = None;
        let value = if kind == RequestKind::Write {
            self.next_value += 1;
            let mut data = AlignedBuf::zeroed(len as usize);
            for (i, sec) in data.as_mut_slice().chunks_mut(SECTOR as usize).enumerate() {
                fill_sector(sec, self.next_value, first + i as u64);
            }
            buf = Some(IoBuf::owned(data));
            self.next_value
        } else {
            0
        };
        for s in first..first + len_sectors {
            let log = self.sectors.entry(s).or_insert_with(|| SectorLog::new(0));
            log.push(value);
            self.written.entry(s).or_default().insert(value);
        }
        let req = Request {
            kind,
            offset_bytes: offset,
            len_bytes: len,
            fua,
            buf,
            mover: None,
            tag,
        };
        let after_fail = (0..self.copies.len())
            .map(|i| self.link_failed(i))
            .collect();
        self.submit(
            req,
            Pending::Write {
                offset,
                len,
                fua,
                after_fail,
            },
        );
    }

    /// Wait until every async link sent and had acknowledged everything queued for it (a
    /// sync link has nothing left once the requests completed), or fell behind.
    fn drain(&mut self, what: &str) {
        for link in self.links.clone() {
            let lag = &link.replication().replicas()[link.index()].status.lag;
            let drained = |l: &ReplicaLink| {
                l.state() == LinkState::Behind
                    || (l.inbox_len() == 0 && !lag.waiting() && lag.queued_bytes() == 0)
            };
            for _ in 0..MAX_WAIT_TICKS {
                if drained(&link) {
                    break;
                }
                self.step();
            }
            assert!(
                drained(&link),
                "seed {} {what}: an async queue never drained",
                self.seed
            );
        }
    }

    /// No request pending, nothing queued for a replica, and every link up to date: an async
    /// link whose queue overflowed (it fell behind) is connected again and resyncs.
    fn settle(&mut self, what: &str) {
        for _ in 0..4 {
            self.quiesce(what);
            self.drain(what);
            let failed = self.failed_links();
            if failed.is_empty() {
                return;
            }
            for i in failed {
                assert!(
                    matches!(self.copies[i].mode, LinkMode::Async { .. }),
                    "seed {} {what}: sync link {i} failed without a fault",
                    self.seed
                );
                self.wait_link_gone(i, what);
                self.spawn_link(i);
                self.wait_up_to_date(i, what);
            }
        }
        panic!("seed {} {what}: the links never settled", self.seed);
    }

    /// Step until copy `i`'s link is up to date (its resync ended) or it failed.
    fn wait_up_to_date(&mut self, i: usize, what: &str) {
        for _ in 0..MAX_WAIT_TICKS {
            if self.links[i].state() == LinkState::UpToDate || self.link_failed(i) {
                return;
            }
            self.step();
        }
        panic!(
            "seed {} {what}: link {i}'s resync never ended ({:?})",
            self.seed,
            self.links[i].state()
        );
    }

    fn quiesce(&mut self, what: &str) {
        for _ in 0..MAX_WAIT_TICKS {
            self.step();
            if self.pending.is_empty() {
                return;
            }
        }
        panic!("seed {} {what}: requests never completed", self.seed);
    }

    /// The whole volume of the primary (None) or of copy `i`, read through its engine.
    fn read_all(&mut self, copy: Option<usize>) -> Vec<u8> {
        let port = Port::new(1, PortWaker::None);
        let mut out = Vec::with_capacity(VOLUME_BYTES as usize);
        let mut offset = 0;
        while offset < VOLUME_BYTES {
            let len = 64 << 10;
            let node = match copy {
                None => &mut self.p,
                Some(i) => &mut self.copies[i].node,
            };
            let volume = node.c().volume("a").expect("volume a");
            let req = Request {
                kind: RequestKind::Read,
                offset_bytes: offset,
                len_bytes: len,
                fua: false,
                buf: Some(IoBuf::owned(AlignedBuf::zeroed(len as usize))),
                mover: None,
                tag: 0,
            };
            node.c().submit(&volume, req, &port).expect("read accepted");
            let mut done = None;
            for _ in 0..MAX_WAIT_TICKS {
                self.step();
                if let Some(c) = port.pop() {
                    done = Some(c);
                    break;
                }
            }
            let c = done.unwrap_or_else(|| panic!("seed {}: read stuck", self.seed));
            assert!(c.result.is_ok(), "seed {}: read failed", self.seed);
            out.extend_from_slice(c.buf.expect("read buffer").as_slice());
            offset += len;
        }
        out
    }

    fn check_primary(&mut self, crashed: bool, what: &str) -> Vec<u8> {
        let data = self.read_all(None);
        for (i, sec) in data.chunks(SECTOR as usize).enumerate() {
            let s = i as u64;
            let got =
                decode_sector(sec, s).unwrap_or_else(|e| panic!("seed {} {what}: {e}", self.seed));
            let Some(log) = self.sectors.get_mut(&s) else {
                assert_eq!(
                    got, 0,
                    "seed {} {what}: sector {s} never written",
                    self.seed
                );
                continue;
            };
            let from = if crashed {
                0
            } else {
                (log.acked - log.base) as usize
            };
            if !log.vals[from..].contains(&got) {
                panic!(
                    "seed {} {what}: sector {s} reads {got}, allowed {:?}",
                    self.seed,
                    &log.vals[from..]
                );
            }
            *log = SectorLog::new(got);
        }
        data
    }

    /// The primary's replica set, made once per primary life (a restarted primary loads its
    /// state and makes new links from it).
    fn ensure_links(&mut self) {
        let volume = self.p.c().volume("a").expect("volume a");
        let current = self.links.first().is_some_and(|l| {
            volume
                .replication()
                .is_some_and(|r| Arc::ptr_eq(&r, l.replication()))
        });
        if current {
            return;
        }
        let replication = match volume.replication() {
            Some(loaded) => loaded,
            None => {
                let nodes: Vec<ReplicaNode> = (0..self.copies.len())
                    .map(|i| ReplicaNode::new(7 + i as u128).unwrap())
                    .collect();
                let fresh = Arc::new(
                    VolumeReplication::new(
                        Role::Primary,
                        volume.max_size_bytes(),
                        REGION_SHIFT,
                        &nodes,
                    )
                    .unwrap(),
                );
                volume.set_replication(Some(fresh.clone()));
                fresh
            }
        };
        self.links = (0..self.copies.len())
            .map(|i| {
                let reactor = ReactorId(self.rng.gen_range(0..self.opts.reactors));
                let mode = self.copies[i].mode;
                ReplicaLink::with_mode(replication.clone(), i, reactor, mode).unwrap()
            })
            .collect();
        let set = ReplicaSet::new(self.links.clone()).unwrap();
        volume.attach_replicas(Some(Arc::new(set))).unwrap();
    }

    /// Connect copy `i`: its link task on the primary, its serve task on the copy.
    fn spawn_link(&mut self, i: usize) {
        self.ensure_links();
        let (fd_p, fd_r) = self
            .net
            .socket_pair(PRIMARY, self.copies[i].net_id)
            .unwrap();
        self.copies[i].link_fd = fd_p.as_raw_fd();
        let link = self.links[i].clone();
        // The link's task runs where its waker points (set by its first task).
        let p_reactor = link.reactor();
        let net = self.net.clone();
        let clock: ringblock_transports::peer::Clock = Arc::new(move || net.now_tick());
        let vol_id = ReplicatedVolumeId(42);
        let lopts = LinkOptions {
            volume: vol_id,
            send_seq: Seq(2),
            recv_seq: Seq(2),
            window_frames: self.rng.gen_range(2..=64),
            window_bytes: self.rng.gen_range(1u64..=8) << 20,
            zero_copy: self.rng.gen_bool(0.5),
            clock: clock.clone(),
            peer: format!("replica {i}"),
        };
        let handle = self.p.c().open("a").unwrap();
        let alive = Arc::new(AtomicBool::new(true));
        let task = Tracked {
            task: PrimaryLink::new(fd_p, handle, link.clone(), lopts),
            alive: alive.clone(),
        };
        assert!(self.p.c().spawn_task(p_reactor, Box::new(task)).is_ok());
        let sopts = ServeOptions {
            volume: vol_id,
            send_seq: Seq(2),
            recv_seq: Seq(2),
            max_in_flight: self.rng.gen_range(1..=16),
            clock,
            peer: "primary".into(),
            primary_node: ReplicaNode::new(1),
            primary_history: link.replication().history(),
            primary_size_bytes: VOLUME_BYTES,
        };
        let r_reactor = ReactorId(self.rng.gen_range(0..self.opts.reactors));
        let copy = &mut self.copies[i];
        let r_volume = copy.node.c().volume("a").expect("volume a");
        if r_volume.replication().is_none() {
            let replication = VolumeReplication::new(
                Role::Replica,
                r_volume.max_size_bytes(),
                REGION_SHIFT,
                &[ReplicaNode::new(1).unwrap()],
            )
            .unwrap();
            replication.adopt_history(Default::default());
            r_volume.set_replication(Some(Arc::new(replication)));
        }
        let handle = copy.node.c().open("a").unwrap();
        let task = ReplicaServe::new(fd_r, handle, sopts);
        assert!(copy.node.c().spawn_task(r_reactor, Box::new(task)).is_ok());
        copy.link_alive = alive;
        copy.link_entered = false;
    }

    /// Step until copy `i`'s link and serve tasks ended (the primary's flushed its marks;
    /// the copy's noticed the cut or the silence).
    fn wait_link_gone(&mut self, i: usize, what: &str) {
        for _ in 0..MAX_WAIT_TICKS {
            let copy = &self.copies[i];
            let serve_gone = copy.node.cluster.as_ref().is_none_or(|c| c.tasks() == 0);
            if serve_gone && !copy.link_alive.load(Ordering::SeqCst) {
                return;
            }
            self.step();
        }
        panic!(
            "seed {} {what}: link {i}'s old tasks never ended",
            self.seed
        );
    }

    /// Heal the network and connect `copies` again: their links resync the dirty regions
    /// while writes go on; now and then a second cut or a power cut of a copy hits the
    /// resync, and one more connection finishes it. Then every copy holds the primary's
    /// bytes.
    fn heal_and_resync(&mut self, copies: &[usize], cycle: u64) -> Vec<u8> {
        self.net.heal_all();
        for &i in copies {
            self.wait_link_gone(i, "after the fault");
            self.spawn_link(i);
        }
        let second = self.rng.gen_range(0..3);
        let hit = self.rng.gen_range(0..self.copies.len());
        let steps = self.rng.gen_range(1..400);
        let fault_at = self.rng.gen_range(0..steps);
        for step in 0..steps {
            self.issue();
            self.step();
            self.maybe_evict();
            if step == fault_at {
                match second {
                    1 => self.net.cut(self.copies[hit].link_fd),
                    2 => self.restart(Some(hit), cycle + 10),
                    _ => {}
                }
            }
        }
        self.quiesce("during the resync");
        if second != 0 {
            for _ in 0..MAX_WAIT_TICKS {
                if self.link_failed(hit) {
                    break;
                }
                self.step();
            }
            assert!(
                self.link_failed(hit),
                "seed {}: the resync's link fails",
                self.seed
            );
            self.wait_link_gone(hit, "after the second fault");
            self.spawn_link(hit);
        }
        for i in 0..self.copies.len() {
            self.wait_up_to_date(i, "the resync");
        }
        // Writes during the resync may have overflowed an async link's queue.
        self.settle("after the resync");
        for (i, link) in self.links.iter().enumerate() {
            assert_eq!(
                link.state(),
                LinkState::UpToDate,
                "seed {}: link {i}'s resync ends (second fault {second})",
                self.seed
            );
        }
        // A few more writes go to the up-to-date replicas.
        for _ in 0..self.rng.gen_range(0..100) {
            self.issue();
            self.step();
        }
        self.settle("after the resync");
        let pdata = self.check_primary(false, "after the resync");
        for i in 0..self.copies.len() {
            let rdata = self.read_all(Some(i));
            for (s, (a, b)) in pdata
                .chunks(SECTOR as usize)
                .zip(rdata.chunks(SECTOR as usize))
                .enumerate()
            {
                assert!(
                    a == b,
                    "seed {}: after the resync (second fault {second}) sector {s} of copy {i} differs",
                    self.seed
                );
            }
            assert_eq!(self.links[i].state(), LinkState::UpToDate);
            self.assert_follows(i, "after the resync");
        }
        pdata
    }

    /// Copy `i` took the primary's history (at the end of its resync) and every generation
    /// started since.
    fn assert_follows(&mut self, i: usize, what: &str) {
        let primary = self.links[i].replication().clone();
        let volume = self.copies[i].node.c().volume("a").expect("volume a");
        let replica = volume.replication().expect("replica state");
        for _ in 0..MAX_WAIT_TICKS {
            if replica.history() == primary.history() {
                return;
            }
            self.step();
        }
        panic!(
            "seed {} {what}: copy {i}'s history {:?} is not the primary's {:?}",
            self.seed,
            replica.history(),
            primary.history()
        );
    }

    /// A power cut of the primary (None) or of copy `i`, and a start from what its disk kept.
    fn restart(&mut self, copy: Option<usize>, cycle: u64) {
        let seed = self.seed;
        let (node, id, salt) = match copy {
            None => (&mut self.p, PRIMARY, 0),
            Some(i) => {
                let copy = &mut self.copies[i];
                (&mut copy.node, copy.net_id, i as u64)
            }
        };
        let old = node.cluster.take().expect("running");
        let images = old.crash(&[(spec(), node.disk.clone())], seed * 7 + cycle + salt);
        node.disk = Arc::new(Mutex::new(SimDisk::from_image(
            images.into_iter().next().unwrap(),
            true,
        )));
        node.cluster = Some(start(
            seed + 1000 * (cycle + 1) + salt,
            self.opts,
            &self.net,
            id,
            &node.disk,
        ));
    }
}

/// What one seed did, for the totals over seeds and the determinism check.
#[derive(Debug, PartialEq, Eq)]
struct SeedOutcome {
    /// Durable marks checked after a power cut of the primary.
    checked_marks: usize,
    ticks: u64,
    /// An async queue overflowed under the load (its link failed with no fault on it).
    overflowed: bool,
    copies: usize,
    /// Regions eviction cycles dropped from the activity log.
    evicted: usize,
}

/// Runs one seed (see the module).
fn run_seed(seed: u64) -> SeedOutcome {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let opts = SimOptions {
        reactors: rng.gen_range(1..=3),
        queue_depth: rng.gen_range(2..=32),
        max_latency_ticks: rng.gen_range(1..=12),
    };
    let net = SimNet::new(
        seed ^ 0x5245_504C,
        NetOptions {
            buffer_bytes: rng.gen_range(4096..=256 << 10),
            max_delay_ticks: rng.gen_range(0..=4),
            short_io_percent: rng.gen_range(0..=40),
            cut_per_million_ticks: 0,
        },
    );
    let fault = [
        Fault::None,
        Fault::None,
        Fault::Cut,
        Fault::Partition,
        Fault::ReplicaCrash,
        Fault::PrimaryCrash,
        Fault::PrimaryCrashLinked,
    ][rng.gen_range(0..7)];
    let copies = if rng.gen_bool(0.35) { 2 } else { 1 };
    let pdisk = Arc::new(Mutex::new(SimDisk::new(DEVICE_BYTES, true)));
    let mut p = start(seed, opts, &net, PRIMARY, &pdisk);
    p.create_volume(DeviceId(0), VolumeId(1), "a", VOLUME_BYTES)
        .unwrap();
    let copies: Vec<Copy> = (0..copies)
        .map(|i| {
            let mode = if rng.gen_bool(0.5) {
                LinkMode::Sync
            } else {
                LinkMode::Async {
                    queue_limit_bytes: rng.gen_range(16u64..=4096) << 10,
                }
            };
            let net_id = NodeId(1 + i as u32);
            let disk = Arc::new(Mutex::new(SimDisk::new(DEVICE_BYTES, true)));
            let mut c = start(seed ^ (0xFF - i as u64), opts, &net, net_id, &disk);
            c.create_volume(DeviceId(0), VolumeId(1), "a", VOLUME_BYTES)
                .unwrap();
            Copy {
                node: Node {
                    disk,
                    cluster: Some(c),
                },
                net_id,
                mode,
                link_entered: false,
                link_fd: -1,
                link_alive: Arc::new(AtomicBool::new(false)),
                marked_after_fail: BTreeSet::new(),
                durable_marks: BTreeSet::new(),
            }
        })
        .collect();
    let victim = rng.gen_range(0..copies.len());
    let mut run = Run {
        seed,
        rng: ChaCha8Rng::seed_from_u64(seed ^ 0xABCD),
        net,
        opts,
        p: Node {
            disk: pdisk,
            cluster: Some(p),
        },
        copies,
        links: Vec::new(),
        port: Port::new(MAX_QD, PortWaker::None),
        sectors: HashMap::new(),
        written: HashMap::new(),
        next_value: 0,
        next_tag: 0,
        pending: BTreeMap::new(),
        evicted: 0,
    };
    for i in 0..run.copies.len() {
        run.spawn_link(i);
    }
    let steps: u32 = run.rng.gen_range(300..1500);
    let fault_at = run.rng.gen_range(0..steps);
    for i in 0..steps {
        run.issue();
        run.step();
        run.maybe_evict();
        if i == fault_at {
            match fault {
                Fault::None => {}
                // A primary's power cut comes at the end, after the link failed here.
                Fault::Cut | Fault::PrimaryCrash => run.net.cut(run.copies[victim].link_fd),
                Fault::Partition => run.net.partition(PRIMARY, run.copies[victim].net_id),
                Fault::ReplicaCrash => run.restart(Some(victim), 1),
                Fault::PrimaryCrashLinked => run.crash_primary_linked(),
            }
        }
    }
    run.quiesce("after the load");
    run.drain("after the load");
    let hit = |i: usize| fault != Fault::None && i == victim;
    // An async link whose queue overflowed failed as if cut: the same checks follow.
    let overflowed: Vec<usize> = run
        .failed_links()
        .into_iter()
        .filter(|&i| !hit(i))
        .collect();
    for &i in &overflowed {
        assert!(
            matches!(run.copies[i].mode, LinkMode::Async { .. }),
            "seed {seed}: sync link {i} failed without a fault"
        );
        // Its task marks what the replica may lack on its way out.
        run.wait_link_gone(i, "after the overflow");
    }
    if fault == Fault::None && overflowed.is_empty() && run.rng.gen_bool(0.3) {
        // Idle longer than either side's timeout: heartbeats keep the links up.
        for _ in 0..2 * ringblock_transports::peer::serve::PEER_SILENCE_MS {
            run.step();
        }
        assert!(
            run.failed_links().is_empty(),
            "seed {seed}: an idle link stays up"
        );
    }
    if fault == Fault::Partition {
        // The link notices only by its timeout.
        for _ in 0..(2 * ringblock_transports::peer::link::ACK_TIMEOUT_MS) {
            if run.link_failed(victim) {
                break;
            }
            run.issue();
            run.step();
        }
        run.quiesce("after the partition");
        assert!(
            run.link_failed(victim),
            "seed {seed}: a partitioned link fails by its timeout"
        );
        run.net.heal_all();
    }
    let mut checked_marks = 0;
    let primary_crashed = matches!(fault, Fault::PrimaryCrash | Fault::PrimaryCrashLinked);
    if fault == Fault::PrimaryCrash {
        let marks_wanted: Vec<BTreeSet<u64>> =
            run.copies.iter().map(|c| c.durable_marks.clone()).collect();
        checked_marks = marks_wanted.iter().map(BTreeSet::len).sum();
        run.restart(None, 2);
        let volume = run.p.c().volume("a").expect("volume a survives");
        let replication = volume.replication().expect("replication state survives");
        for (i, marks) in marks_wanted.iter().enumerate() {
            let dirty = &replication.replicas()[i].dirty;
            for &region in marks {
                assert!(
                    dirty.is_dirty(RegionIndex(region)),
                    "seed {seed}: region {region} lost its durable mark for copy {i}"
                );
            }
        }
    }
    let pdata = run.check_primary(primary_crashed, "at the end");
    for i in 0..run.copies.len() {
        let rdata = run.read_all(Some(i));
        for (s, sec) in rdata.chunks(SECTOR as usize).enumerate() {
            let s = s as u64;
            let got = decode_sector(sec, s).unwrap_or_else(|e| panic!("seed {seed} copy {i}: {e}"));
            assert!(
                got == 0 || run.written.get(&s).is_some_and(|w| w.contains(&got)),
                "seed {seed}: copy {i}'s sector {s} holds {got}, which the primary never wrote there"
            );
        }
    }
    if primary_crashed {
        // The restarted primary's loaded bitmaps (its activity log folded in) bring every
        // copy back to it.
        let all: Vec<usize> = (0..run.copies.len()).collect();
        run.heal_and_resync(&all, 3);
    } else {
        let failed = run.failed_links();
        for i in (0..run.copies.len()).filter(|i| !failed.contains(i)) {
            check_link_stayed_up(&mut run, i);
        }
        for &i in &failed {
            check_marks_cover_differences(&mut run, i, &pdata, fault);
        }
        if !failed.is_empty() {
            run.heal_and_resync(&failed, 3);
        }
    }
    SeedOutcome {
        checked_marks,
        ticks: run.net.now_tick(),
        overflowed: !overflowed.is_empty(),
        copies: run.copies.len(),
        evicted: run.evicted,
    }
}

/// Copy `i`'s link had no fault: it ends its first resync (of what writes marked while it
/// entered the fan-out) once the load stops, and the copy equals the primary.
fn check_link_stayed_up(run: &mut Run, i: usize) {
    let seed = run.seed;
    let link = run.links[i].clone();
    for _ in 0..MAX_WAIT_TICKS {
        if link.state() != LinkState::Resyncing {
            break;
        }
        run.step();
    }
    run.drain("with no fault");
    assert_eq!(
        link.state(),
        LinkState::UpToDate,
        "seed {seed}: link {i} stays up (dirty regions {}, status {:?})",
        link.replication().replicas()[i].dirty.dirty_regions(),
        link.replication().replicas()[i].status.resync.snapshot(0),
    );
    let (pdata, rdata) = (run.read_all(None), run.read_all(Some(i)));
    assert!(pdata == rdata, "seed {seed}: copy {i} equals the primary");
    run.assert_follows(i, "with no fault");
}

/// Copy `i`'s link failed: every sector where the copy differs from the primary lies in a
/// region its bitmap marks, and so does every write submitted after the failure.
fn check_marks_cover_differences(run: &mut Run, i: usize, pdata: &[u8], fault: Fault) {
    let seed = run.seed;
    run.wait_link_gone(i, "before the marks are checked");
    let rdata = run.read_all(Some(i));
    let link = run.links[i].clone();
    let dirty = &link.replication().replicas()[i].dirty;
    for (s, (a, b)) in pdata
        .chunks(SECTOR as usize)
        .zip(rdata.chunks(SECTOR as usize))
        .enumerate()
    {
        let region = (s as u64 * SECTOR) >> REGION_SHIFT;
        assert!(
            a == b || dirty.is_dirty(RegionIndex(region)),
            "seed {seed} ({fault:?}): copy {i}'s sector {s} differs but region {region} is clean"
        );
    }
    for &region in &run.copies[i].marked_after_fail {
        assert!(
            dirty.is_dirty(RegionIndex(region)),
            "seed {seed} ({fault:?}): copy {i}'s region {region} written after the failure is clean"
        );
    }
}

#[test]
fn replication_survives_cuts_partitions_and_crashes_on_the_simulator() {
    let seeds: u64 = std::env::var("RINGBLOCK_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let first: u64 = std::env::var("RINGBLOCK_SIM_FIRST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (mut checked_marks, mut overflows, mut three_nodes, mut evicted) = (0, 0, 0, 0);
    for seed in first..first + seeds {
        let outcome = run_seed(seed);
        evicted += outcome.evicted;
        checked_marks += outcome.checked_marks;
        overflows += u32::from(outcome.overflowed);
        three_nodes += u32::from(outcome.copies == 2);
    }
    assert!(
        seeds < 20 || checked_marks > 0,
        "no seed checked a durable mark after a power cut"
    );
    assert!(
        seeds < 20 || overflows > 0,
        "no seed overflowed an async queue"
    );
    assert!(seeds < 20 || three_nodes > 0, "no seed ran three nodes");
    assert!(
        seeds < 20 || evicted > 0,
        "no eviction cycle dropped a region from the activity log"
    );
}

/// The seed decides everything: a run repeats exactly.
#[test]
fn a_seed_repeats_exactly() {
    for seed in [4, 9] {
        assert_eq!(run_seed(seed), run_seed(seed), "seed {seed}");
    }
}

/// A replica fed by a hostile "primary" (a test stream): a good write lands and is
/// acknowledged; then a frame with a flipped payload bit, an out-of-sequence frame, or a write
/// past the volume's end ends the connection with a Goodbye, and nothing of it is written.
#[test]
fn a_replica_refuses_bad_frames_and_writes_nothing_of_them() {
    use ringblock_transports::peer::{decode_frame, encode_frame, Body, Decoded, Frame, FrameKind};
    fn replies(got: &[u8]) -> Vec<Body<'static>> {
        let mut kinds = Vec::new();
        let mut at = 0;
        while let Ok(Decoded::Frame { frame, consumed }) = decode_frame(&got[at..]) {
            // Only payload-free replies come back: nothing borrows `got`.
            kinds.push(match frame.body {
                Body::WriteAck { seq, errno } => Body::WriteAck { seq, errno },
                Body::Goodbye(r) => Body::Goodbye(r),
                Body::ResyncDone { first, count } => Body::ResyncDone { first, count },
                other => panic!("unexpected reply {:?}", other.kind()),
            });
            at += consumed;
        }
        kinds
    }
    for (case, seed) in [(0u32, 1u64), (1, 2), (2, 3)] {
        let net = SimNet::new(seed, NetOptions::default());
        let opts = SimOptions {
            reactors: 1,
            queue_depth: 8,
            max_latency_ticks: 2,
        };
        let disk = Arc::new(Mutex::new(SimDisk::new(DEVICE_BYTES, true)));
        let mut r = start(seed, opts, &net, REPLICA, &disk);
        r.create_volume(DeviceId(0), VolumeId(1), "a", VOLUME_BYTES)
            .unwrap();
        let (fd, mut stream) = net.connect(REPLICA, PRIMARY).unwrap();
        let net2 = net.clone();
        let vol = ReplicatedVolumeId(9);
        let sopts = ServeOptions {
            volume: vol,
            send_seq: Seq(0),
            recv_seq: Seq(0),
            max_in_flight: 4,
            clock: Arc::new(move || net2.now_tick()),
            peer: "hostile".into(),
            primary_node: None,
            primary_history: Default::default(),
            primary_size_bytes: VOLUME_BYTES,
        };
        let task = ReplicaServe::new(fd, r.open("a").unwrap(), sopts);
        assert!(r.spawn_task(ReactorId(0), Box::new(task)).is_ok());
        let frame = |seq: u64, offset: u64, fill: u8| {
            let data = vec![fill; 4096];
            let mut out = Vec::new();
            let body = Body::Write {
                offset_bytes: offset,
                fua: false,
                data: &data,
            };
            encode_frame(&Frame::new(Seq(seq), vol, body), &mut out);
            out
        };
        let mut bytes = frame(0, 0, 0x11);
        let good_len = bytes.len();
        let bad = match case {
            0 => {
                let mut f = frame(1, 8192, 0x22);
                let at = f.len() - 100;
                f[at] ^= 0x04; // a payload bit flipped: its crc no longer matches
                f
            }
            1 => frame(5, 8192, 0x22),         // out of sequence
            _ => frame(1, VOLUME_BYTES, 0x22), // past the end
        };
        bytes.extend_from_slice(&bad);
        let mut sent = 0;
        let mut got = Vec::new();
        let mut closed = false;
        for _ in 0..MAX_WAIT_TICKS {
            r.step();
            // The bad frame goes once the good write's ack is back (the replica's
            // ResyncDone of the start comes first).
            let until = if !replies(&got)
                .iter()
                .any(|b| b.kind() == FrameKind::WriteAck)
            {
                good_len
            } else {
                bytes.len()
            };
            if sent < until {
                if let Ok(n) = stream.write(&bytes[sent..until]) {
                    sent += n;
                }
            }
            let mut buf = [0u8; 4096];
            match stream.read(&mut buf) {
                Ok(0) => closed = true,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
            if closed && r.tasks() == 0 && r.tasks_drained() {
                break;
            }
        }
        assert!(closed && r.tasks() == 0, "case {case}: the connection ends");
        // The replies: its ResyncDone, the good write's ack, then a Goodbye.
        let mut kinds = replies(&got);
        assert!(
            matches!(kinds.first(), Some(Body::ResyncDone { .. })),
            "case {case}: the replica says it asks for nothing: {kinds:?}"
        );
        kinds.remove(0);
        assert!(
            matches!(
                kinds.first(),
                Some(Body::WriteAck {
                    seq: Seq(0),
                    errno: 0
                })
            ),
            "case {case}: the good write is acknowledged: {kinds:?}"
        );
        assert!(
            matches!(kinds.last(), Some(Body::Goodbye(_))),
            "case {case}: a Goodbye ends it: {kinds:?}"
        );
        // The good write is there; nothing of the bad frame is.
        let volume = r.volume("a").unwrap();
        let port = Port::new(1, PortWaker::None);
        let req = Request {
            kind: RequestKind::Read,
            offset_bytes: 0,
            len_bytes: 16384,
            fua: false,
            buf: Some(IoBuf::owned(AlignedBuf::zeroed(16384))),
            mover: None,
            tag: 0,
        };
        r.submit(&volume, req, &port).unwrap();
        let mut data = None;
        for _ in 0..MAX_WAIT_TICKS {
            r.step();
            if let Some(c) = port.pop() {
                data = c.buf;
                break;
            }
        }
        let data = data.expect("read completes");
        let data = data.as_slice();
        assert!(
            data[..4096].iter().all(|&b| b == 0x11),
            "case {case}: good write"
        );
        assert!(
            data[4096..].iter().all(|&b| b == 0),
            "case {case}: nothing else"
        );
    }
}

/// Overlapping frames land on the replica in wire order: a test stream sends, back to back,
/// pairs of writes (and resync data) to overlapping ranges with different bytes; whatever
/// the disk's latencies, the replica ends with the later frame's bytes.
#[test]
fn a_replica_applies_overlapping_frames_in_wire_order() {
    use ringblock_transports::peer::RegionIndex as WireRegion;
    use ringblock_transports::peer::{decode_frame, encode_frame, Body, Decoded, Frame};
    for seed in 0..20u64 {
        let net = SimNet::new(seed, NetOptions::default());
        let opts = SimOptions {
            reactors: 1 + (seed % 3) as u32,
            queue_depth: 16,
            max_latency_ticks: 1 + seed % 12,
        };
        let disk = Arc::new(Mutex::new(SimDisk::new(DEVICE_BYTES, true)));
        let mut r = start(seed, opts, &net, REPLICA, &disk);
        r.create_volume(DeviceId(0), VolumeId(1), "a", VOLUME_BYTES)
            .unwrap();
        let volume = r.volume("a").unwrap();
        let replication = VolumeReplication::new(
            Role::Replica,
            volume.max_size_bytes(),
            REGION_SHIFT,
            &[ReplicaNode::new(1).unwrap()],
        )
        .unwrap();
        volume.set_replication(Some(Arc::new(replication)));
        let (fd, mut stream) = net.connect(REPLICA, PRIMARY).unwrap();
        let net2 = net.clone();
        let vol = ReplicatedVolumeId(9);
        let sopts = ServeOptions {
            volume: vol,
            send_seq: Seq(0),
            recv_seq: Seq(0),
            max_in_flight: 16,
            clock: Arc::new(move || net2.now_tick()),
            peer: "ordered".into(),
            primary_node: ReplicaNode::new(1),
            primary_history: Default::default(),
            primary_size_bytes: VOLUME_BYTES,
        };
        let task = ReplicaServe::new(fd, r.open("a").unwrap(), sopts);
        assert!(r.spawn_task(ReactorId(0), Box::new(task)).is_ok());
        let region = 1u64 << REGION_SHIFT;
        let mut seq = 0u64;
        let mut send_and_wait = |bytes: &[u8], frames: u64, r: &mut SimCluster| {
            let (mut sent, mut got, mut acks) = (0, Vec::new(), 0);
            for _ in 0..MAX_WAIT_TICKS {
                r.step();
                if sent < bytes.len() {
                    if let Ok(n) = stream.write(&bytes[sent..]) {
                        sent += n;
                    }
                }
                let mut buf = [0u8; 4096];
                if let Ok(n) = stream.read(&mut buf) {
                    got.extend_from_slice(&buf[..n]);
                }
                let mut at = 0;
                acks = 0;
                while let Ok(Decoded::Frame { frame, consumed }) = decode_frame(&got[at..]) {
                    match frame.body {
                        Body::WriteAck { errno: 0, .. } => acks += 1,
                        Body::ResyncDone { .. } => {}
                        other => panic!("seed {seed}: unexpected reply {:?}", other.kind()),
                    }
                    at += consumed;
                }
                if acks == frames {
                    break;
                }
            }
            assert_eq!(acks, frames, "seed {seed}: every frame is acknowledged");
        };
        // The chunks are allocated first, so that nothing below waits for an allocation.
        let mut bytes = Vec::new();
        let whole = vec![1u8; (16 * region) as usize];
        for piece in whole.chunks(1 << 20) {
            let body = Body::Write {
                offset_bytes: seq * (1 << 20),
                fua: false,
                data: piece,
            };
            encode_frame(&Frame::new(Seq(seq), vol, body), &mut bytes);
            seq += 1;
        }
        send_and_wait(&bytes, seq, &mut r);
        // Pairs at 8 places: a large write, then a small one inside it (or resync data of
        // the whole region, then a write inside it).
        let first_pair = seq;
        let mut bytes = Vec::new();
        let mut expect = whole.clone();
        for i in 0..8u64 {
            let at = i * 2 * region;
            let first = vec![0x10 + i as u8; region as usize];
            let body = if i % 2 == 0 {
                Body::Write {
                    offset_bytes: at,
                    fua: false,
                    data: &first,
                }
            } else {
                Body::ResyncData {
                    region: WireRegion(at / region),
                    offset_in_region_bytes: 0,
                    data: &first,
                }
            };
            encode_frame(&Frame::new(Seq(seq), vol, body), &mut bytes);
            seq += 1;
            expect[at as usize..(at + region) as usize].copy_from_slice(&first);
            let second = vec![0xA0 + i as u8; 8192];
            let inside = at + (i + 1) * 4096;
            let body = Body::Write {
                offset_bytes: inside,
                fua: false,
                data: &second,
            };
            encode_frame(&Frame::new(Seq(seq), vol, body), &mut bytes);
            seq += 1;
            expect[inside as usize..inside as usize + 8192].copy_from_slice(&second);
        }
        send_and_wait(&bytes, seq - first_pair, &mut r);
        let port = Port::new(1, PortWaker::None);
        let len = 16 * region;
        let req = Request {
            kind: RequestKind::Read,
            offset_bytes: 0,
            len_bytes: len,
            fua: false,
            buf: Some(IoBuf::owned(AlignedBuf::zeroed(len as usize))),
            mover: None,
            tag: 0,
        };
        r.submit(&volume, req, &port).unwrap();
        let mut data = None;
        for _ in 0..MAX_WAIT_TICKS {
            r.step();
            if let Some(c) = port.pop() {
                data = c.buf;
                break;
            }
        }
        let data = data.expect("read completes");
        for (i, (a, b)) in data
            .as_slice()
            .chunks(4096)
            .zip(expect.chunks(4096))
            .enumerate()
        {
            assert!(
                a == b,
                "seed {seed}: page {i} does not hold the later frame's bytes"
            );
        }
    }
}

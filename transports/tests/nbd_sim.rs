//! The real NBD connection task on the simulator, against a client built on the NBD client
//! codec, over the seeded simulated network, many seeds:
//! - pipelined WRITE (some FUA), READ, FLUSH, TRIM and WRITE_ZEROES; every read returns
//!   exactly the last acknowledged data;
//! - a power cut mid-session (the engine restarts from the disk images, the client connects
//!   again): every write acknowledged before an acknowledged FLUSH, and every acknowledged FUA
//!   write, reads back (unless a later write replaced it), and every sector holds exactly one
//!   write's data (the rules of the engine's `sim_crash` tests);
//! - a connection cut mid-request: the task ends, nothing of it stays (task table drained,
//!   sockets closed), the engine serves the next connection, and every acknowledged write
//!   reads back.
//!
//! Both receive modes run (multishot over provided buffers, one recv at a time), with compact,
//! structured and extended replies. `RINGBLOCK_SIM_SEEDS=N` runs N seeds (default 200).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ringblock_engine::io::sim::SimDisk;
use ringblock_engine::io::sim_net::{NetOptions, NodeId, SimNet, SimStream};
use ringblock_engine::profile;
use ringblock_engine::sim_check::{decode_sector, fill_sector, SectorLog};
use ringblock_engine::sim_cluster::{SimCluster, SimOptions};
use ringblock_engine::{DeviceId, DeviceSpec, Errno, FormatPolicy, ReactorId, VolumeId};
use ringblock_transports::nbd::client::{absorb, request_header, Parsed, Reply, ReplyParser};
use ringblock_transports::nbd::conn::Connection;
use ringblock_transports::nbd::wire::{
    Request, CMD_FLAG_FUA, CMD_FLAG_PAYLOAD_LEN, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE,
    CMD_WRITE_ZEROES, FLAG_HAS_FLAGS, FLAG_SEND_FLUSH, FLAG_SEND_FUA, FLAG_SEND_TRIM,
    FLAG_SEND_WRITE_ZEROES,
};
use ringblock_transports::nbd::{ExportInfo, Negotiated};

const SECTOR: u64 = 512;
const CHUNK: u64 = 16 * 1024;
const DEVICE_BYTES: u64 = 2 << 20;
const VOLUME_BYTES: u64 = 1 << 20;
const MAX_QD: usize = 8;
const SERVER: NodeId = NodeId(0);
const CLIENT: NodeId = NodeId(1);
/// Ticks any one wait may take before the run counts as stuck.
const MAX_WAIT_TICKS: u64 = 200_000;

#[derive(Default)]
struct Model {
    sectors: HashMap<u64, SectorLog>,
}

impl Model {
    fn log(&mut self, s: u64) -> &mut SectorLog {
        self.sectors.entry(s).or_insert_with(|| SectorLog::new(0))
    }

    /// Check a sector read back after a crash (`crashed`: any value from the durable one on)
    /// or a cut (the last acknowledged one or a later one), and note what it settles.
    fn settle(&mut self, s: u64, got: u64, crashed: bool, what: &str) {
        let log = self.log(s);
        let from = if crashed {
            0
        } else {
            (log.acked - log.base) as usize
        };
        let Some(i) = log.vals[from..].iter().rposition(|&v| v == got) else {
            panic!(
                "{what}: sector {s} reads write {got}; allowed {:?} (the first is durable)",
                &log.vals[from..]
            );
        };
        if crashed {
            // What a restarted engine reads, with nothing written since, is on the disk.
            *log = SectorLog::new(got);
        } else {
            // The writes after it never landed (their task is gone); durability is unchanged.
            log.vals.truncate(from + i + 1);
            log.acked = log.base + (from + i) as u64;
        }
    }
}

/// The test's NBD client over a simulated socket: pipelined requests, replies parsed with the
/// codec as bytes arrive.
struct SimClient {
    stream: SimStream,
    parser: ReplyParser,
    extended: bool,
    next_cookie: u64,
    out: Vec<u8>,
    rbuf: Vec<u8>,
    in_flight: BTreeMap<u64, (Request, Reply)>,
}

impl SimClient {
    fn new(stream: SimStream, structured: bool, extended: bool) -> Self {
        Self {
            stream,
            parser: ReplyParser::new(structured, extended),
            extended,
            next_cookie: 1,
            out: Vec::new(),
            rbuf: Vec::new(),
            in_flight: BTreeMap::new(),
        }
    }

    fn send(&mut self, kind: u16, flags: u16, offset: u64, length: u64, payload: &[u8]) -> u64 {
        let flags = if self.extended && kind == CMD_WRITE {
            flags | CMD_FLAG_PAYLOAD_LEN
        } else {
            flags
        };
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let req = Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        };
        let (header, len) = request_header(&req, self.extended).unwrap();
        self.out.extend_from_slice(&header[..len]);
        self.out.extend_from_slice(payload);
        let data_len = if kind == CMD_READ { length as usize } else { 0 };
        let reply = Reply {
            data: vec![0; data_len],
            ..Reply::default()
        };
        self.in_flight.insert(cookie, (req, reply));
        cookie
    }

    /// Write what the socket takes, read what arrived, and return the replies completed.
    /// Err: the connection ended (the errno, or 0 for end-of-file).
    fn pump(&mut self) -> Result<Vec<(u64, Reply)>, i32> {
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(n) => drop(self.out.drain(..n)),
                Err(Errno(libc::EAGAIN)) => break,
                Err(e) => return Err(e.0),
            }
        }
        let mut buf = [0u8; 16 << 10];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(0),
                Ok(n) => self.rbuf.extend_from_slice(&buf[..n]),
                Err(Errno(libc::EAGAIN)) => break,
                Err(e) => return Err(e.0),
            }
        }
        let mut done = Vec::new();
        loop {
            let in_flight = &self.in_flight;
            let parsed = self
                .parser
                .parse(&self.rbuf, |c| in_flight.get(&c).map(|(_, r)| r.data.len()))
                .unwrap_or_else(|e| panic!("the server broke the protocol: {e}"));
            let Parsed::Frame { frame, len } = parsed else {
                break;
            };
            let cookie = frame.cookie();
            let last = frame.is_last();
            let (req, reply) = self
                .in_flight
                .get_mut(&cookie)
                .expect("a reply to a request");
            absorb(reply, req, frame).unwrap_or_else(|e| panic!("bad reply: {e}"));
            self.rbuf.drain(..len);
            if last {
                let (_, reply) = self.in_flight.remove(&cookie).expect("present");
                done.push((cookie, reply));
            }
        }
        Ok(done)
    }
}

enum Pending {
    Read { offset: u64, len: u64 },
    Write { offset: u64, len: u64, fua: bool },
    Flush { snaps: Vec<(u64, u64)> },
}

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

/// One seeded run: a cluster on the network, its client, and the model of what was written.
struct Run {
    seed: u64,
    rng: ChaCha8Rng,
    net: SimNet,
    opts: SimOptions,
    disk: Arc<Mutex<SimDisk>>,
    /// None only while it restarts.
    cluster: Option<SimCluster>,
    model: Model,
    next_value: u64,
    pending: BTreeMap<u64, Pending>,
    /// Replies reaped, for the determinism check.
    replies: u64,
}

impl Run {
    fn cluster(&mut self) -> &mut SimCluster {
        self.cluster.as_mut().expect("a running cluster")
    }

    /// A new connection task for volume "a" on a random reactor, in random modes.
    fn connect(&mut self) -> SimClient {
        let (fd, stream) = self.net.connect(SERVER, CLIENT).unwrap();
        let structured = self.rng.gen_bool(0.5);
        let extended = self.rng.gen_bool(0.3);
        let info = ExportInfo {
            name: "a".into(),
            description: String::new(),
            size_bytes: VOLUME_BYTES,
            read_only: false,
            min_block_bytes: SECTOR as u32,
            preferred_block_bytes: 4096,
            max_block_bytes: 32 << 20,
        };
        let neg = Negotiated {
            info,
            handle: self.cluster().open("a").expect("volume a"),
            structured_replies: structured,
            extended_headers: extended,
            base_allocation_id: None,
            transmission_flags: FLAG_HAS_FLAGS
                | FLAG_SEND_FLUSH
                | FLAG_SEND_FUA
                | FLAG_SEND_TRIM
                | FLAG_SEND_WRITE_ZEROES,
        };
        let conn = Connection::new(fd, neg, format!("sim-client-{}", self.seed))
            .with_multishot(self.rng.gen_bool(0.5));
        let reactor = ReactorId(self.rng.gen_range(0..self.opts.reactors));
        if self.cluster().spawn_task(reactor, Box::new(conn)).is_err() {
            panic!("seed {}: no room for the connection task", self.seed);
        }
        SimClient::new(stream, structured, extended)
    }

    fn busy(&self, offset: u64, len: u64, is_read: bool) -> bool {
        self.pending.values().any(|p| match *p {
            Pending::Write {
                offset: o, len: l, ..
            } => offset < o + l && o < offset + len,
            Pending::Read { offset: o, len: l } if !is_read => offset < o + l && o < offset + len,
            _ => false,
        })
    }

    /// Issue one random request if the queue has room.
    fn issue(&mut self, client: &mut SimClient) {
        if self.pending.len() >= MAX_QD {
            return;
        }
        let sectors = VOLUME_BYTES / SECTOR;
        let len_sectors = self.rng.gen_range(1..=(3 * CHUNK / SECTOR));
        let start = self.rng.gen_range(0..=sectors - len_sectors);
        let (offset, len) = (start * SECTOR, len_sectors * SECTOR);
        let roll = self.rng.gen_range(0..100);
        if roll < 8 {
            let snaps = self
                .model
                .sectors
                .iter()
                .map(|(&s, l)| (s, l.acked))
                .collect();
            let cookie = client.send(CMD_FLUSH, 0, 0, 0, &[]);
            self.pending.insert(cookie, Pending::Flush { snaps });
        } else if roll < 28 {
            if self.busy(offset, len, true) {
                return;
            }
            let cookie = client.send(CMD_READ, 0, offset, len, &[]);
            self.pending.insert(cookie, Pending::Read { offset, len });
        } else {
            if self.busy(offset, len, false) {
                return;
            }
            let (kind, fua) = match roll {
                28..=33 => (CMD_TRIM, false),
                34..=39 => (CMD_WRITE_ZEROES, false),
                _ => (CMD_WRITE, self.rng.gen_bool(0.15)),
            };
            let mut data = Vec::new();
            let value = if kind == CMD_WRITE {
                self.next_value += 1;
                data = vec![0u8; len as usize];
                for (i, sec) in data.chunks_mut(SECTOR as usize).enumerate() {
                    fill_sector(sec, self.next_value, start + i as u64);
                }
                self.next_value
            } else {
                0
            };
            for s in start..start + len_sectors {
                self.model.log(s).push(value);
            }
            let flags = if fua { CMD_FLAG_FUA } else { 0 };
            let cookie = client.send(kind, flags, offset, len, &data);
            self.pending
                .insert(cookie, Pending::Write { offset, len, fua });
        }
    }

    /// Account for completed replies: reads must return the last acknowledged data.
    fn reap(&mut self, replies: Vec<(u64, Reply)>) {
        for (cookie, reply) in replies {
            let p = self
                .pending
                .remove(&cookie)
                .expect("a reply to a pending request");
            assert_eq!(
                reply.error, 0,
                "seed {}: request failed: {}",
                self.seed, reply.message
            );
            match p {
                Pending::Read { offset, .. } => {
                    for (i, sec) in reply.data.chunks(SECTOR as usize).enumerate() {
                        let s = offset / SECTOR + i as u64;
                        let got = decode_sector(sec, s).unwrap();
                        let want = self.model.log(s).acked_value();
                        assert_eq!(
                            got, want,
                            "seed {}: sector {s} read {got}, last acknowledged {want}",
                            self.seed
                        );
                    }
                }
                Pending::Write { offset, len, fua } => {
                    for s in offset / SECTOR..(offset + len) / SECTOR {
                        let log = self.model.log(s);
                        log.ack_newest();
                        if fua {
                            let cut = (log.acked - log.base) as usize;
                            log.vals.drain(..cut);
                            log.base = log.acked;
                        }
                    }
                }
                Pending::Flush { snaps } => {
                    // Everything acknowledged when the flush was sent is durable.
                    for (s, acked) in snaps {
                        let log = self.model.sectors.get_mut(&s).expect("logged");
                        if acked > log.base {
                            log.vals.drain(..(acked - log.base) as usize);
                            log.base = acked;
                        }
                    }
                }
            }
        }
    }

    /// Read the whole volume through a new connection and check it against the model.
    fn verify(&mut self, crashed: bool, what: &str) {
        let mut client = self.connect();
        let mut offset = 0;
        while offset < VOLUME_BYTES {
            let len = 64 << 10;
            let cookie = client.send(CMD_READ, 0, offset, len, &[]);
            let mut reply = None;
            for _ in 0..MAX_WAIT_TICKS {
                self.cluster().step();
                let mut done = client.pump().unwrap_or_else(|e| {
                    panic!("seed {}: verify connection ended ({e})", self.seed)
                });
                if let Some((c, r)) = done.pop() {
                    assert_eq!(c, cookie);
                    reply = Some(r);
                    break;
                }
            }
            let reply = reply.unwrap_or_else(|| panic!("seed {}: verify read stuck", self.seed));
            assert_eq!(reply.error, 0, "seed {}: verify read failed", self.seed);
            for (i, sec) in reply.data.chunks(SECTOR as usize).enumerate() {
                let s = offset / SECTOR + i as u64;
                let got = decode_sector(sec, s)
                    .unwrap_or_else(|e| panic!("seed {} {what}: {e}", self.seed));
                self.model
                    .settle(s, got, crashed, &format!("seed {} {what}", self.seed));
            }
            offset += len;
        }
        // Close it: the client shuts down and goes, the task drains and ends.
        client.stream.shutdown();
        drop(client);
        self.wait_for_no_tasks(what);
    }

    /// Step until every task has ended and its sockets are closed.
    fn wait_for_no_tasks(&mut self, what: &str) {
        for _ in 0..MAX_WAIT_TICKS {
            self.cluster().step();
            if self.cluster().tasks() == 0 && self.cluster().tasks_drained() {
                self.cluster().step(); // the network notices the closed descriptor
                let open = self.net.open_sockets();
                assert_eq!(open, 0, "seed {} {what}: sockets left open", self.seed);
                let volume = self.cluster().volume("a").expect("volume a");
                assert_eq!(
                    volume.open_handles(),
                    0,
                    "seed {} {what}: handle left open",
                    self.seed
                );
                return;
            }
        }
        panic!("seed {} {what}: the connection task never ended", self.seed);
    }

    fn crash_and_restart(&mut self, cycle: u64) {
        let old = self.cluster.take().expect("a running cluster");
        let images = old.crash(&[(spec(), self.disk.clone())], self.seed * 7 + cycle);
        self.disk = Arc::new(Mutex::new(SimDisk::from_image(
            images.into_iter().next().unwrap(),
            true,
        )));
        let cluster = SimCluster::start_on(
            self.seed + 1000 * (cycle + 1),
            self.opts,
            vec![(spec(), self.disk.clone())],
            &self.net,
            SERVER,
        )
        .unwrap_or_else(|e| panic!("seed {}: restart failed: {e}", self.seed));
        assert!(
            cluster.volume("a").is_some(),
            "seed {}: volume a survives",
            self.seed
        );
        self.cluster = Some(cluster);
    }
}

/// Runs one seed; returns what a repeat must reproduce: replies reaped and ticks taken.
fn run_seed(seed: u64) -> (u64, u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let opts = SimOptions {
        reactors: rng.gen_range(1..=3),
        queue_depth: rng.gen_range(2..=32),
        max_latency_ticks: rng.gen_range(1..=12),
    };
    let net = SimNet::new(
        seed ^ 0x4E42_4400,
        NetOptions {
            buffer_bytes: rng.gen_range(4096..=128 << 10),
            max_delay_ticks: rng.gen_range(0..=4),
            short_io_percent: rng.gen_range(0..=60),
            cut_per_million_ticks: 0,
        },
    );
    let disk = Arc::new(Mutex::new(SimDisk::new(DEVICE_BYTES, true)));
    let mut cluster =
        SimCluster::start_on(seed, opts, vec![(spec(), disk.clone())], &net, SERVER).unwrap();
    cluster
        .create_volume(DeviceId(0), VolumeId(1), "a", VOLUME_BYTES)
        .unwrap();
    let mut run = Run {
        seed,
        rng: ChaCha8Rng::seed_from_u64(seed ^ 0xABCD),
        net,
        opts,
        disk,
        cluster: Some(cluster),
        model: Model::default(),
        next_value: 0,
        pending: BTreeMap::new(),
        replies: 0,
    };
    for cycle in 0..3 {
        let mut client = run.connect();
        let steps: u32 = run.rng.gen_range(200..1000);
        for _ in 0..steps {
            run.issue(&mut client);
            run.cluster().step();
            let done = client
                .pump()
                .unwrap_or_else(|e| panic!("seed {seed}: connection ended ({e})"));
            run.reap(done);
        }
        // Unacknowledged requests may or may not have happened; the model keeps both.
        run.pending.clear();
        if run.rng.gen_bool(0.5) {
            run.crash_and_restart(cycle);
            assert!(matches!(client.pump(), Err(e) if e == libc::ECONNRESET));
            drop(client);
            run.verify(true, &format!("after the crash of cycle {cycle}"));
        } else {
            client.stream.cut();
            drop(client);
            run.wait_for_no_tasks("after a cut");
            run.verify(false, &format!("after the cut of cycle {cycle}"));
        }
    }
    (run.replies, run.net.now_tick())
}

#[test]
fn nbd_sessions_survive_crashes_and_cuts_on_the_simulator() {
    let seeds: u64 = std::env::var("RINGBLOCK_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    for seed in 0..seeds {
        run_seed(seed);
    }
}

/// The seed decides everything: a run repeats exactly.
#[test]
fn a_seed_repeats_exactly() {
    for seed in [3, 17] {
        assert_eq!(run_seed(seed), run_seed(seed), "seed {seed}");
    }
}

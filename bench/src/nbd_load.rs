//! A lean NBD load generator: many connections driven from one thread through one io_uring,
//! requests pipelined and sent in batches (one `send` for every request a batch of replies
//! freed), replies received into a large buffer and parsed in place.
//!
//! fio's nbd engine makes one syscall per request and, on 2 cores, becomes the bottleneck before
//! the server does; this client measures what a server can actually serve.
//!
//! Verify mode: every write carries a pattern derived from (block, generation); reads check the
//! block against the last generation written (no two requests touch one block at once). Blocks
//! this run has not written yet are not checked (the export may hold anything), unless
//! `fresh_export` says it reads as zeros.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use io_uring::{opcode, types, IoUring};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;

/// Where the server is.
#[derive(Clone, Debug)]
pub enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
}

#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub endpoint: Endpoint,
    pub export: String,
    pub connections: usize,
    /// Requests in flight per connection.
    pub queue_depth: usize,
    pub block_bytes: usize,
    /// Share of reads, 0..=100.
    pub read_percent: u8,
    pub random: bool,
    pub runtime: Duration,
    /// Limit the range used (default: the export size).
    pub range_bytes: Option<u64>,
    pub verify: bool,
    /// In verify mode: the export is new, so unwritten blocks must read as zeros.
    pub fresh_export: bool,
    pub seed: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct LoadResult {
    pub ops: u64,
    pub reads: u64,
    pub writes: u64,
    pub errors: u64,
    pub verify_failures: u64,
    pub elapsed_s: f64,
    pub iops: f64,
    pub mib_s: f64,
    pub lat_p50_us: f64,
    pub lat_p99_us: f64,
    pub lat_p999_us: f64,
    pub lat_p9999_us: f64,
}

/// Fixed-newstyle handshake with OPT_GO; returns the export size.
fn handshake<S: Read + Write>(s: &mut S, export: &str) -> Result<u64> {
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).context("reading the greeting")?;
    if u64::from_be_bytes(greet[0..8].try_into()?) != NBDMAGIC
        || u64::from_be_bytes(greet[8..16].try_into()?) != IHAVEOPT
    {
        bail!("not a fixed-newstyle NBD server");
    }
    let flags = u16::from_be_bytes(greet[16..18].try_into()?);
    let client_flags: u32 = 1 | if flags & 2 != 0 { 2 } else { 0 };
    let mut out = client_flags.to_be_bytes().to_vec();
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&OPT_GO.to_be_bytes());
    out.extend_from_slice(&((4 + export.len() + 2) as u32).to_be_bytes());
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&out)?;
    let mut size = None;
    for _ in 0..64 {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).context("reading an option reply")?;
        if u64::from_be_bytes(h[0..8].try_into()?) != OPT_REPLY_MAGIC {
            bail!("bad option reply magic");
        }
        let kind = u32::from_be_bytes(h[12..16].try_into()?);
        let len = u32::from_be_bytes(h[16..20].try_into()?) as usize;
        if len > 1 << 20 {
            bail!("option reply too long");
        }
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload)?;
        match kind {
            REP_ACK => return size.context("server sent no NBD_INFO_EXPORT"),
            REP_INFO if len >= 12 && u16::from_be_bytes(payload[0..2].try_into()?) == 0 => {
                size = Some(u64::from_be_bytes(payload[2..10].try_into()?));
            }
            REP_INFO => {}
            k if k & 0x8000_0000 != 0 => bail!(
                "server refused export {export:?}: {}",
                String::from_utf8_lossy(&payload)
            ),
            _ => {}
        }
    }
    bail!("too many option replies")
}

fn connect(cfg: &LoadConfig) -> Result<(OwnedFd, u64)> {
    match &cfg.endpoint {
        Endpoint::Tcp(addr) => {
            let mut s =
                TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
            s.set_nodelay(true)?;
            let size = handshake(&mut s, &cfg.export)?;
            Ok((s.into(), size))
        }
        Endpoint::Unix(path) => {
            let mut s = UnixStream::connect(path)
                .with_context(|| format!("connecting to {}", path.display()))?;
            let size = handshake(&mut s, &cfg.export)?;
            Ok((s.into(), size))
        }
    }
}

/// Append a compact NBD request header.
fn encode_request(out: &mut Vec<u8>, command: u16, cookie: u64, offset: u64, length: u32) {
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&command.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
}

fn pattern(block: u64, generation: u32, out: &mut [u8]) {
    let mut x = block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (u64::from(generation) << 32 | 0xA5A5);
    for w in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
}

#[derive(Clone, Copy)]
struct Slot {
    busy: bool,
    is_read: bool,
    block: u64,
    issued: Instant,
}

struct Conn {
    fd: OwnedFd,
    slots: Vec<Slot>,
    free: Vec<u16>,
    /// Requests encoded and not yet handed to the kernel, then the bytes of the send in flight.
    out: Vec<u8>,
    sending: Vec<u8>,
    sent: usize,
    send_in_flight: bool,
    rbuf: Vec<u8>,
    rlen: usize,
    recv_in_flight: bool,
    closed: bool,
}

/// Drive the load for `cfg.runtime` and return the totals.
pub fn run(cfg: &LoadConfig) -> Result<LoadResult> {
    if cfg.connections == 0
        || cfg.queue_depth == 0
        || cfg.queue_depth > 1024
        || cfg.block_bytes == 0
    {
        bail!("connections, queue depth (1..=1024) and block size must be positive");
    }
    let mut conns = Vec::new();
    let mut size = 0;
    for _ in 0..cfg.connections {
        let (fd, s) = connect(cfg)?;
        size = s;
        conns.push(Conn {
            fd,
            slots: vec![
                Slot {
                    busy: false,
                    is_read: true,
                    block: 0,
                    issued: Instant::now()
                };
                cfg.queue_depth
            ],
            free: (0..cfg.queue_depth as u16).rev().collect(),
            out: Vec::new(),
            sending: Vec::new(),
            sent: 0,
            send_in_flight: false,
            rbuf: vec![0; cfg.queue_depth * (16 + cfg.block_bytes) + (64 << 10)],
            rlen: 0,
            recv_in_flight: false,
            closed: false,
        });
    }
    let range = cfg.range_bytes.unwrap_or(size).min(size);
    let blocks = range / cfg.block_bytes as u64;
    if blocks == 0 {
        bail!("export of {size} bytes is smaller than one block");
    }
    // Verify bookkeeping: last generation written per block (0 = never) and a busy flag.
    let mut generation = if cfg.verify {
        vec![0u32; blocks as usize]
    } else {
        Vec::new()
    };
    let mut block_busy = if cfg.verify {
        vec![false; blocks as usize]
    } else {
        Vec::new()
    };
    let mut rng = SmallRng::seed_from_u64(cfg.seed);
    let mut seq_next = 0u64;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut ring = IoUring::new((cfg.connections * 2 + 8).next_power_of_two() as u32)?;
    let (mut reads, mut writes, mut errors, mut verify_failures) = (0u64, 0u64, 0u64, 0u64);
    let mut scratch = vec![0u8; cfg.block_bytes];
    let start = Instant::now();
    let deadline = start + cfg.runtime;
    let mut stopping = false;
    let mut completions: VecDeque<(usize, u64, i32)> = VecDeque::new();

    // Encode new requests into every connection's free slots.
    let fill = |c: &mut Conn,
                rng: &mut SmallRng,
                seq_next: &mut u64,
                generation: &mut Vec<u32>,
                block_busy: &mut Vec<bool>,
                scratch: &mut Vec<u8>| {
        while let Some(slot) = c.free.pop() {
            let mut block = if cfg.random {
                rng.gen_range(0..blocks)
            } else {
                let b = *seq_next % blocks;
                *seq_next += 1;
                b
            };
            if cfg.verify {
                // Bounded probe for a block nobody is using.
                let mut tries = 0;
                while block_busy[block as usize] && tries < 64 {
                    block = rng.gen_range(0..blocks);
                    tries += 1;
                }
                if block_busy[block as usize] {
                    c.free.push(slot);
                    break;
                }
                block_busy[block as usize] = true;
            }
            let is_read = rng.gen_range(0..100u8) < cfg.read_percent;
            let offset = block * cfg.block_bytes as u64;
            let command = if is_read { CMD_READ } else { CMD_WRITE };
            encode_request(
                &mut c.out,
                command,
                u64::from(slot),
                offset,
                cfg.block_bytes as u32,
            );
            if !is_read {
                if cfg.verify {
                    let g = generation[block as usize].wrapping_add(1).max(1);
                    generation[block as usize] = g;
                    pattern(block, g, scratch);
                } else {
                    pattern(block, 7, scratch);
                }
                c.out.extend_from_slice(scratch);
            }
            c.slots[slot as usize] = Slot {
                busy: true,
                is_read,
                block,
                issued: Instant::now(),
            };
        }
    };

    for c in conns.iter_mut() {
        fill(
            c,
            &mut rng,
            &mut seq_next,
            &mut generation,
            &mut block_busy,
            &mut scratch,
        );
    }
    loop {
        let now = Instant::now();
        if !stopping && now >= deadline {
            stopping = true;
        }
        let in_flight: usize = conns
            .iter()
            .map(|c| c.slots.iter().filter(|s| s.busy).count())
            .sum();
        if stopping && in_flight == 0 && conns.iter().all(|c| !c.send_in_flight) {
            break;
        }
        if stopping && now >= deadline + Duration::from_secs(30) {
            bail!("server did not answer {in_flight} requests within 30 s of the end");
        }
        // Queue sends and receives.
        for (i, c) in conns.iter_mut().enumerate() {
            if c.closed {
                continue;
            }
            if !c.send_in_flight && (c.sent < c.sending.len() || !c.out.is_empty()) {
                if c.sent == c.sending.len() {
                    std::mem::swap(&mut c.sending, &mut c.out);
                    c.out.clear();
                    c.sent = 0;
                }
                let e = opcode::Send::new(
                    types::Fd(c.fd.as_raw_fd()),
                    c.sending[c.sent..].as_ptr(),
                    (c.sending.len() - c.sent) as u32,
                )
                .flags(libc::MSG_NOSIGNAL)
                .build()
                .user_data((i as u64) << 1);
                // SAFETY: `sending` is not touched until this send completes.
                unsafe { ring.submission().push(&e) }
                    .map_err(|_| anyhow::anyhow!("submission queue full"))?;
                c.send_in_flight = true;
            }
            if !c.recv_in_flight && c.slots.iter().any(|s| s.busy) {
                let e = opcode::Recv::new(
                    types::Fd(c.fd.as_raw_fd()),
                    c.rbuf[c.rlen..].as_mut_ptr(),
                    (c.rbuf.len() - c.rlen) as u32,
                )
                .build()
                .user_data((i as u64) << 1 | 1);
                // SAFETY: `rbuf` is not resized or moved until this recv completes.
                unsafe { ring.submission().push(&e) }
                    .map_err(|_| anyhow::anyhow!("submission queue full"))?;
                c.recv_in_flight = true;
            }
        }
        ring.submit_and_wait(1)?;
        for cqe in ring.completion() {
            completions.push_back((
                (cqe.user_data() >> 1) as usize,
                cqe.user_data() & 1,
                cqe.result(),
            ));
        }
        while let Some((i, is_recv, res)) = completions.pop_front() {
            let c = &mut conns[i];
            if is_recv == 0 {
                c.send_in_flight = false;
                if res < 0 {
                    bail!("send: {}", std::io::Error::from_raw_os_error(-res));
                }
                c.sent += res as usize;
                continue;
            }
            c.recv_in_flight = false;
            if res <= 0 {
                bail!(
                    "connection {i} closed by the server ({})",
                    if res == 0 {
                        "EOF".into()
                    } else {
                        std::io::Error::from_raw_os_error(-res).to_string()
                    }
                );
            }
            c.rlen += res as usize;
            // Parse every complete reply in place.
            let mut at = 0;
            loop {
                let avail = &c.rbuf[at..c.rlen];
                if avail.len() < 16 {
                    break;
                }
                if u32::from_be_bytes(avail[0..4].try_into()?) != SIMPLE_REPLY_MAGIC {
                    bail!("bad reply magic from the server");
                }
                let err = u32::from_be_bytes(avail[4..8].try_into()?);
                let slot = u64::from_be_bytes(avail[8..16].try_into()?) as usize;
                let s = *c
                    .slots
                    .get(slot)
                    .filter(|s| s.busy)
                    .context("reply for an unknown cookie")?;
                let need = 16
                    + if s.is_read && err == 0 {
                        cfg.block_bytes
                    } else {
                        0
                    };
                if avail.len() < need {
                    break;
                }
                let elapsed = s.issued.elapsed().as_nanos() as u64;
                hist.record(elapsed.max(1)).ok();
                if err != 0 {
                    errors += 1;
                } else if s.is_read {
                    reads += 1;
                    if cfg.verify {
                        let g = generation[s.block as usize];
                        let data = &avail[16..need];
                        let ok = if g == 0 {
                            !cfg.fresh_export || data.iter().all(|&b| b == 0)
                        } else {
                            pattern(s.block, g, &mut scratch);
                            data == &scratch[..]
                        };
                        if !ok {
                            verify_failures += 1;
                        }
                    }
                } else {
                    writes += 1;
                }
                if cfg.verify {
                    block_busy[s.block as usize] = false;
                }
                c.slots[slot].busy = false;
                c.free.push(slot as u16);
                at += need;
            }
            c.rbuf.copy_within(at..c.rlen, 0);
            c.rlen -= at;
            if !stopping {
                fill(
                    c,
                    &mut rng,
                    &mut seq_next,
                    &mut generation,
                    &mut block_busy,
                    &mut scratch,
                );
            }
        }
    }
    let elapsed_s = start.elapsed().as_secs_f64();
    for c in conns.iter_mut() {
        // Best effort NBD_CMD_DISC; the server drains and closes.
        let mut disc = Vec::with_capacity(28);
        encode_request(&mut disc, CMD_DISC, 0, 0, 0);
        // SAFETY: a plain send of a local buffer on our socket.
        unsafe {
            libc::send(
                c.fd.as_raw_fd(),
                disc.as_ptr().cast(),
                disc.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        c.closed = true;
    }
    let ops = reads + writes;
    let q = |p: f64| hist.value_at_quantile(p) as f64 / 1000.0;
    Ok(LoadResult {
        ops,
        reads,
        writes,
        errors,
        verify_failures,
        elapsed_s,
        iops: ops as f64 / elapsed_s,
        mib_s: (ops * cfg.block_bytes as u64) as f64 / elapsed_s / (1 << 20) as f64,
        lat_p50_us: q(0.5),
        lat_p99_us: q(0.99),
        lat_p999_us: q(0.999),
        lat_p9999_us: q(0.9999),
    })
}

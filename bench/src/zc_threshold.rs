//! `zc-threshold`: what a zero-copy send (`IORING_OP_SEND_ZC`) costs against a copying send
//! (`IORING_OP_SEND`), by payload size, on one io_uring: over loopback TCP and a Unix socket
//! pair to a reader thread, and (`--udp-to`) as UDP datagrams to a device that sends from the
//! pages without copying them. It reports process CPU time per KiB (getrusage: sender and
//! reader together, the same receive work in both modes) and the sends the kernel reported it
//! copied anyway (`IORING_SEND_ZC_REPORT_USAGE`).
//!
//! On loopback the kernel copies anyway (a zero-copy skb delivered to a local socket is copied
//! first), so zero-copy only adds its overhead there; Unix sockets refuse it. Where it pays
//! shows on a device that takes the pages as they are: an `ifb` device in a private network
//! namespace (it drops what it is given, after the stack built the packet from the pages), or
//! a real NIC. The threshold is the smallest payload from which zero-copy costs less CPU per
//! byte, at that size and every larger one; docs/performance.md has the numbers.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};

use anyhow::{bail, Context, Result};
use io_uring::{cqueue, opcode, types, IoUring};
use ringblock_engine::io::zero_copy::{
    NOTIF_USAGE_ZC_COPIED, SEND_ZC_REPORT_USAGE, ZERO_COPY_MIN_BYTES,
};

use crate::host::cpu_times;

#[derive(clap::Args, Debug)]
pub struct ZcArgs {
    /// MiB sent per point.
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// Runs per point; the one with the median CPU time is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Payload sizes, KiB.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "4,8,12,16,24,32,48,63,128,256,1024"
    )]
    sizes_kib: Vec<usize>,
    /// Sends in flight at once.
    #[arg(long, default_value_t = 8)]
    depth: usize,
    /// Also send UDP datagrams (sizes up to 63 KiB) to this address, with no reader: the
    /// address of a peer behind a device that sends without copying (see
    /// docs/performance.md for the `ifb` set-up in a private network namespace).
    #[arg(long)]
    udp_to: Option<std::net::SocketAddr>,
}

/// Largest UDP payload (IPv4).
const MAX_DATAGRAM_BYTES: usize = 65_507;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Tcp,
    Unix,
    Udp(std::net::SocketAddr),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Copy,
    ZeroCopy,
}

/// One run of one point.
#[derive(Clone, Copy, Debug, Default)]
struct Point {
    cpu_ns: u64,
    bytes: u64,
    sends: u64,
    kernel_copied: u64,
    /// The first send's error (-errno), which ends the run.
    error: Option<i32>,
}

impl Point {
    fn cpu_ns_per_kib(&self) -> f64 {
        self.cpu_ns as f64 * 1024.0 / self.bytes.max(1) as f64
    }
}

pub fn run(args: &ZcArgs) -> Result<()> {
    if args.depth == 0 || args.repeat == 0 || args.sizes_kib.contains(&0) {
        bail!("--depth, --repeat and every size must be at least 1");
    }
    let total = args.mib << 20;
    println!(
        "zero-copy vs copying sends: {} MiB per point, {} in flight, median of {}",
        args.mib, args.depth, args.repeat
    );
    println!("engine threshold now: ZERO_COPY_MIN_BYTES = {ZERO_COPY_MIN_BYTES}");
    let udp = args.udp_to.map(Transport::Udp);
    for transport in [Transport::Tcp, Transport::Unix].into_iter().chain(udp) {
        println!("\n{transport:?}:");
        println!(
            "{:>8} {:>12} {:>12} {:>10} {:>16}",
            "KiB", "copy ns/KiB", "zc ns/KiB", "zc/copy", "kernel copied"
        );
        let mut threshold = None;
        for &kib in &args.sizes_kib {
            let size = kib << 10;
            if matches!(transport, Transport::Udp(_)) && size > MAX_DATAGRAM_BYTES {
                continue;
            }
            let copy = median(args.repeat, || {
                send_point(transport, Mode::Copy, size, total, args.depth)
            })?;
            let zc = median(args.repeat, || {
                send_point(transport, Mode::ZeroCopy, size, total, args.depth)
            })?;
            if let Some(e) = zc.error {
                let e = std::io::Error::from_raw_os_error(-e);
                println!(
                    "{kib:>8} {:>12.1} {:>12} (zero-copy send fails: {e})",
                    copy.cpu_ns_per_kib(),
                    "-"
                );
                continue;
            }
            let ratio = zc.cpu_ns_per_kib() / copy.cpu_ns_per_kib();
            println!(
                "{kib:>8} {:>12.1} {:>12.1} {:>10.2} {:>9}/{:<6}",
                copy.cpu_ns_per_kib(),
                zc.cpu_ns_per_kib(),
                ratio,
                zc.kernel_copied,
                zc.sends
            );
            // The smallest size from which every larger one costs less zero-copy.
            match (ratio < 1.0, threshold) {
                (true, None) => threshold = Some(kib),
                (false, _) => threshold = None,
                _ => {}
            }
        }
        match threshold {
            Some(kib) => println!("zero-copy pays from {kib} KiB"),
            None => println!("zero-copy pays at none of these sizes"),
        }
    }
    Ok(())
}

/// The run with the median CPU time of `n`.
fn median(n: usize, mut f: impl FnMut() -> Result<Point>) -> Result<Point> {
    let mut runs = (0..n).map(|_| f()).collect::<Result<Vec<_>>>()?;
    runs.sort_by_key(|p| p.cpu_ns);
    Ok(runs[n / 2])
}

/// A connected pair: the sender's socket, and a thread reading the other end to end-of-file
/// (none for UDP: the datagrams leave the machine, or are dropped by the device).
fn connect(transport: Transport) -> Result<(OwnedFd, Option<std::thread::JoinHandle<u64>>)> {
    let (ours, mut theirs): (OwnedFd, Box<dyn Read + Send>) = match transport {
        Transport::Udp(to) => {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").context("bind")?;
            s.connect(to).with_context(|| format!("udp connect {to}"))?;
            return Ok((s.into(), None));
        }
        Transport::Tcp => {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind")?;
            let out = std::net::TcpStream::connect(listener.local_addr()?).context("connect")?;
            out.set_nodelay(true)?;
            let (inn, _) = listener.accept().context("accept")?;
            (out.into(), Box::new(inn))
        }
        Transport::Unix => {
            let (a, b) = std::os::unix::net::UnixStream::pair().context("socketpair")?;
            (a.into(), Box::new(b))
        }
    };
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while let Ok(n) = theirs.read(&mut buf) {
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        got
    });
    Ok((ours, Some(reader)))
}

/// Send `total` bytes in sends of `size` bytes, `depth` at once, on one ring.
fn send_point(
    transport: Transport,
    mode: Mode,
    size: usize,
    total: u64,
    depth: usize,
) -> Result<Point> {
    let (sock, reader) = connect(transport)?;
    // Never written while sends are in flight, so every send may read it.
    let payload = vec![0x5au8; size];
    let mut ring = IoUring::new((2 * depth).next_power_of_two() as u32).context("io_uring")?;
    let fd = types::Fd(sock.as_raw_fd());
    let (user0, sys0) = cpu_times(libc::RUSAGE_SELF)?;
    let mut p = Point::default();
    // Bytes handed to sends that have not come back short; ops whose last completion is due.
    let (mut committed, mut in_flight) = (0u64, 0usize);
    loop {
        while p.error.is_none() && in_flight < depth && committed < total {
            let len = (total - committed).min(size as u64) as u32;
            let entry = match mode {
                Mode::Copy => opcode::Send::new(fd, payload.as_ptr(), len)
                    .flags(libc::MSG_NOSIGNAL)
                    .build(),
                Mode::ZeroCopy => opcode::SendZc::new(fd, payload.as_ptr(), len)
                    .flags(libc::MSG_NOSIGNAL)
                    .zc_flags(SEND_ZC_REPORT_USAGE)
                    .build(),
            }
            .user_data(u64::from(len));
            // SAFETY: `payload` outlives the ring's use of it: this loop reaps every op's
            // last completion before returning.
            unsafe { ring.submission().push(&entry) }.expect("sized for `depth`");
            committed += u64::from(len);
            in_flight += 1;
            p.sends += 1;
        }
        if in_flight == 0 {
            break;
        }
        ring.submit_and_wait(1).context("io_uring_enter")?;
        for cqe in ring.completion() {
            let (res, flags) = (cqe.result(), cqe.flags());
            if cqueue::notif(flags) {
                p.kernel_copied += u64::from(res as u32 & NOTIF_USAGE_ZC_COPIED != 0);
            } else if res < 0 {
                p.error = p.error.or(Some(res));
            } else {
                p.bytes += res as u64;
                // A short send: the rest is sent again by a later op.
                committed -= cqe.user_data() - res as u64;
            }
            if !cqueue::more(flags) {
                in_flight -= 1;
            }
        }
    }
    drop(sock);
    let received = reader.map(|r| r.join().expect("reader thread"));
    let (user1, sys1) = cpu_times(libc::RUSAGE_SELF)?;
    p.cpu_ns = ((user1 + sys1) - (user0 + sys0)).as_nanos() as u64;
    match received {
        Some(got) if p.error.is_none() && got != p.bytes => {
            bail!("sent {} bytes, the reader got {got}", p.bytes)
        }
        _ => Ok(p),
    }
}

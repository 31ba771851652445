//! Live rates: once a second the sampler snapshots the engine's counters (atomics, no locks on
//! the data path), turns the deltas into per-volume IOPS, MiB/s and interval latency
//! quantiles and per-reactor busy %, and publishes the result to the SSE streams, `/api/stats`
//! and the dashboard.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ringblock_engine::stats::LatencySnapshot;
use ringblock_engine::{Engine, ReactorSnapshot};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{AppState, HISTORY_SAMPLES, SAMPLE_INTERVAL};

const MIB: f64 = 1024.0 * 1024.0;

/// One second of activity. Rates are over `interval_s`; latencies are upper bounds of the
/// engine's power-of-two histogram buckets, over the same interval (`null` when no operation
/// of that kind completed in it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Sample {
    /// Sequence number, from 1; 0 means no sample was taken yet.
    pub seq: u64,
    /// When the sample was taken (milliseconds since the Unix epoch).
    pub time_unix_ms: u64,
    /// Seconds the rates cover (0 in the first sample: there is no earlier one).
    pub interval_s: f64,
    pub volumes: Vec<VolumeRates>,
    pub reactors: Vec<ReactorRates>,
    /// NBD clients connected now.
    pub nbd_clients: usize,
}

/// Rates of one volume over the sample's interval, plus its totals.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VolumeRates {
    pub name: String,
    pub read_iops: f64,
    pub write_iops: f64,
    pub flushes_per_s: f64,
    pub read_mib_s: f64,
    pub write_mib_s: f64,
    pub read_p50_us: Option<f64>,
    pub read_p99_us: Option<f64>,
    pub write_p50_us: Option<f64>,
    pub write_p99_us: Option<f64>,
    pub reads_total: u64,
    pub writes_total: u64,
    pub read_bytes_total: u64,
    pub write_bytes_total: u64,
    pub errors_total: u64,
}

/// One reactor over the sample's interval.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReactorRates {
    pub id: u32,
    /// CPU the reactor is pinned to, if any.
    pub core: Option<usize>,
    /// Share of the interval the reactor was not parked (polling counts as busy), 0–100.
    pub busy_percent: f64,
    pub ops_in_flight: u64,
    pub parks_per_s: f64,
    /// Units of work done (messages, completions, task polls) per second.
    pub work_per_s: f64,
    pub parked: bool,
}

/// The raw counters of one volume at one moment.
#[derive(Clone, Debug, Default)]
pub(crate) struct RawVolume {
    pub name: String,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub errors: u64,
    pub read_latency: LatencySnapshot,
    pub write_latency: LatencySnapshot,
}

/// Every counter the sampler needs, at one moment.
#[derive(Clone, Debug)]
pub(crate) struct Raw {
    pub at: Instant,
    /// By volume id (a volume deleted and created again under the same name starts afresh).
    pub volumes: Vec<(u32, RawVolume)>,
    pub reactors: Vec<ReactorSnapshot>,
}

impl Raw {
    pub(crate) fn take(engine: &Engine) -> Raw {
        use std::sync::atomic::Ordering::Relaxed;
        let volumes = engine
            .volumes()
            .iter()
            .map(|v| {
                let s = &v.stats;
                (
                    v.id.0,
                    RawVolume {
                        name: v.name.clone(),
                        reads: s.reads.load(Relaxed),
                        writes: s.writes.load(Relaxed),
                        flushes: s.flushes.load(Relaxed),
                        read_bytes: s.read_bytes.load(Relaxed),
                        write_bytes: s.write_bytes.load(Relaxed),
                        errors: s.errors.load(Relaxed),
                        read_latency: s.read_latency.snapshot(),
                        write_latency: s.write_latency.snapshot(),
                    },
                )
            })
            .collect();
        Raw {
            at: Instant::now(),
            volumes,
            reactors: engine.reactor_stats(),
        }
    }
}

/// Turns successive raw snapshots into samples.
#[derive(Default)]
pub(crate) struct Sampler {
    prev: Option<Raw>,
    seq: u64,
}

impl Sampler {
    pub(crate) fn next(&mut self, cur: Raw, nbd_clients: usize, time_unix_ms: u64) -> Sample {
        self.seq += 1;
        let prev = self.prev.take();
        let interval_s = prev
            .as_ref()
            .map_or(0.0, |p| cur.at.duration_since(p.at).as_secs_f64());
        let per_s = |d: u64| {
            if interval_s > 0.0 {
                d as f64 / interval_s
            } else {
                0.0
            }
        };
        let prev_vols: HashMap<u32, &RawVolume> = prev
            .as_ref()
            .map(|p| p.volumes.iter().map(|(id, v)| (*id, v)).collect())
            .unwrap_or_default();
        let volumes = cur
            .volumes
            .iter()
            .map(|(id, v)| {
                let empty = RawVolume::default();
                // Without an earlier sample of this volume, report no rates (not its lifetime).
                let p =
                    prev_vols
                        .get(id)
                        .copied()
                        .unwrap_or(if prev.is_some() { &empty } else { v });
                let d_read_lat = delta_hist(&v.read_latency, &p.read_latency);
                let d_write_lat = delta_hist(&v.write_latency, &p.write_latency);
                VolumeRates {
                    name: v.name.clone(),
                    read_iops: per_s(v.reads.saturating_sub(p.reads)),
                    write_iops: per_s(v.writes.saturating_sub(p.writes)),
                    flushes_per_s: per_s(v.flushes.saturating_sub(p.flushes)),
                    read_mib_s: per_s(v.read_bytes.saturating_sub(p.read_bytes)) / MIB,
                    write_mib_s: per_s(v.write_bytes.saturating_sub(p.write_bytes)) / MIB,
                    read_p50_us: quantile_us(&d_read_lat, 0.50),
                    read_p99_us: quantile_us(&d_read_lat, 0.99),
                    write_p50_us: quantile_us(&d_write_lat, 0.50),
                    write_p99_us: quantile_us(&d_write_lat, 0.99),
                    reads_total: v.reads,
                    writes_total: v.writes,
                    read_bytes_total: v.read_bytes,
                    write_bytes_total: v.write_bytes,
                    errors_total: v.errors,
                }
            })
            .collect();
        let reactors = cur
            .reactors
            .iter()
            .map(|r| {
                let p = prev
                    .as_ref()
                    .and_then(|p| p.reactors.iter().find(|x| x.id == r.id))
                    .unwrap_or(r);
                ReactorRates {
                    id: r.id,
                    core: r.core,
                    busy_percent: busy_percent(p, r),
                    ops_in_flight: r.ops_in_flight,
                    parks_per_s: per_s(r.parks.saturating_sub(p.parks)),
                    work_per_s: per_s(r.messages.saturating_sub(p.messages)),
                    parked: r.parked,
                }
            })
            .collect();
        self.prev = Some(cur);
        Sample {
            seq: self.seq,
            time_unix_ms,
            interval_s,
            volumes,
            reactors,
            nbd_clients,
        }
    }
}

/// The engine adds to `busy_ns` when a reactor parks and to `idle_ns` when it wakes, so over
/// an interval with park cycles busy/(busy+idle) is the share of time spent not parked. A
/// reactor that neither parked nor woke in the interval was either parked throughout (0%) or
/// running throughout (100% if it did work, else still spinning down: 0%).
fn busy_percent(p: &ReactorSnapshot, r: &ReactorSnapshot) -> f64 {
    let busy = r.busy_ns.saturating_sub(p.busy_ns) as f64;
    let idle = r.idle_ns.saturating_sub(p.idle_ns) as f64;
    if busy + idle > 0.0 {
        100.0 * busy / (busy + idle)
    } else if !r.parked && r.messages > p.messages {
        100.0
    } else {
        0.0
    }
}

fn delta_hist(cur: &LatencySnapshot, prev: &LatencySnapshot) -> LatencySnapshot {
    LatencySnapshot {
        counts: cur
            .counts
            .iter()
            .enumerate()
            .map(|(i, c)| c.saturating_sub(prev.counts.get(i).copied().unwrap_or(0)))
            .collect(),
        sum_ns: cur.sum_ns.saturating_sub(prev.sum_ns),
    }
}

/// Quantile `q` in µs, `None` without operations.
pub(crate) fn quantile_us(h: &LatencySnapshot, q: f64) -> Option<f64> {
    (h.count() > 0).then(|| h.quantile_ns(q) as f64 / 1000.0)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The sampler task: runs until the runtime stops.
pub(crate) async fn run_sampler(state: AppState) {
    let mut sampler = Sampler::default();
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let raw = Raw::take(&state.0.engine);
        let clients = state.0.nbd.clients().len();
        let sample = Arc::new(sampler.next(raw, clients, unix_ms()));
        {
            let mut h = state.0.history.lock().expect("history");
            if h.len() == HISTORY_SAMPLES {
                h.pop_front();
            }
            h.push_back(sample.clone());
        }
        state.0.samples.send_replace(sample);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn reactor(busy_ns: u64, idle_ns: u64, messages: u64, parked: bool) -> ReactorSnapshot {
        ReactorSnapshot {
            id: 0,
            core: Some(0),
            busy_ns,
            idle_ns,
            parks: 0,
            messages,
            completions: 0,
            ops_in_flight: 0,
            parked,
            sends: Default::default(),
        }
    }

    fn hist(entries: &[(usize, u64)]) -> LatencySnapshot {
        let mut counts = vec![0; 64];
        for &(i, c) in entries {
            counts[i] = c;
        }
        LatencySnapshot { counts, sum_ns: 0 }
    }

    #[test]
    fn rates_from_deltas() {
        let t0 = Instant::now();
        let vol = |reads, bytes, lat: LatencySnapshot| RawVolume {
            name: "v".into(),
            reads,
            read_bytes: bytes,
            read_latency: lat,
            ..RawVolume::default()
        };
        let mut s = Sampler::default();
        let first = s.next(
            Raw {
                at: t0,
                volumes: vec![(1, vol(1000, 1 << 30, hist(&[(10, 1000)])))],
                reactors: vec![reactor(0, 0, 0, true)],
            },
            0,
            0,
        );
        assert_eq!(first.seq, 1);
        assert_eq!(
            first.volumes[0].read_iops, 0.0,
            "no rate without an earlier sample"
        );
        assert_eq!(first.volumes[0].read_p50_us, None);
        let second = s.next(
            Raw {
                at: t0 + Duration::from_secs(2),
                // 2000 reads of 4 KiB in 2 s; 99% of them in bucket 13 (< 8.192 µs), 1% in
                // bucket 20 (< 1.048576 ms).
                volumes: vec![(
                    1,
                    vol(
                        3000,
                        (1 << 30) + 2000 * 4096,
                        hist(&[(10, 1000), (13, 1980), (20, 20)]),
                    ),
                )],
                reactors: vec![reactor(500_000_000, 1_500_000_000, 10, true)],
            },
            3,
            0,
        );
        let v = &second.volumes[0];
        assert_eq!(v.read_iops, 1000.0);
        assert!((v.read_mib_s - 2000.0 * 4096.0 / 2.0 / MIB).abs() < 1e-9);
        assert_eq!(v.read_p50_us, Some(8.192));
        assert_eq!(v.read_p99_us, Some(8.192));
        assert_eq!(v.write_p99_us, None);
        assert_eq!(v.reads_total, 3000);
        assert_eq!(second.reactors[0].busy_percent, 25.0);
        assert_eq!(second.nbd_clients, 3);
        // A new volume (new id) starts from zero, not from its lifetime counters.
        let third = s.next(
            Raw {
                at: t0 + Duration::from_secs(3),
                volumes: vec![(2, vol(7, 7, hist(&[])))],
                reactors: vec![reactor(500_000_000, 1_500_000_000, 99, false)],
            },
            0,
            0,
        );
        assert_eq!(third.volumes[0].read_iops, 7.0);
        assert_eq!(third.reactors[0].busy_percent, 100.0, "running throughout");
    }
}

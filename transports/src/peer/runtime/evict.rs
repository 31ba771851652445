//! The primary's activity-log evictor: one thread per primary copy runs an eviction cycle
//! (`ringblock_engine::replication::evict`) every `RuntimeTiming::evict_interval`, so the log
//! holds only the regions written lately and a power cut of the primary resyncs only those.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use ringblock_engine::replication::{run_cycle, CycleOutcome, EvictHost, EvictTiming};

use super::{connector, lock, ops, Shared, VolumeEntry};

/// A running evictor thread and its stop signal.
pub(super) struct Evictor {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: JoinHandle<()>,
}

impl Evictor {
    /// Start evicting `entry`'s activity log (a primary copy).
    pub(super) fn start(shared: &Arc<Shared>, entry: &Arc<VolumeEntry>) -> Option<Evictor> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let (shared2, entry2, stop2) = (shared.clone(), entry.clone(), stop.clone());
        let spawned = std::thread::Builder::new()
            .name("peer-evict".into())
            .spawn(move || run(&shared2, &entry2, &stop2));
        match spawned {
            Ok(thread) => Some(Evictor { stop, thread }),
            Err(e) => {
                // The log then only grows, as without eviction: correct, and said.
                tracing::warn!(volume = %entry.name, "peer: cannot start the activity-log evictor: {e}");
                None
            }
        }
    }

    pub(super) fn stop(self) {
        *lock(&self.stop.0) = true;
        self.stop.1.notify_all();
        if self.thread.join().is_err() {
            tracing::error!("peer: the activity-log evictor panicked");
        }
    }
}

struct Host<'a> {
    shared: &'a Shared,
    entry: &'a VolumeEntry,
    stop: &'a (Mutex<bool>, Condvar),
}

impl EvictHost for Host<'_> {
    fn flush(&mut self) -> Result<(), String> {
        ops::flush_volume(self.shared, self.entry).map_err(|e| e.to_string())
    }

    fn metadata_changed(&mut self) {
        self.entry.volume.replication_changed();
    }

    fn pause(&mut self) {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }

    fn stopping(&self) -> bool {
        *lock(&self.stop.0)
            || self
                .shared
                .stopping
                .load(std::sync::atomic::Ordering::Acquire)
    }
}

fn run(shared: &Shared, entry: &VolumeEntry, stop: &(Mutex<bool>, Condvar)) {
    let mut host = Host {
        shared,
        entry,
        stop,
    };
    loop {
        {
            let stopped = lock(&stop.0);
            let (stopped, _) = stop
                .1
                .wait_timeout_while(stopped, shared.timing.evict_interval, |s| !*s)
                .unwrap_or_else(|e| e.into_inner());
            if *stopped {
                return;
            }
        }
        if host.stopping() {
            return;
        }
        // The state of now: one with a replica added or removed shares every bitmap with it.
        let replication = lock(&entry.replication).clone();
        let links = connector::links(entry);
        match run_cycle(&replication, &links, &mut host, EvictTiming::default()) {
            CycleOutcome::Idle => {}
            CycleOutcome::Evicted(n) => {
                tracing::debug!(volume = %entry.name, regions = n, "peer: activity log evicted")
            }
            CycleOutcome::Aborted(reason) => {
                tracing::debug!(volume = %entry.name, "peer: activity-log eviction skipped: {reason}")
            }
        }
    }
}

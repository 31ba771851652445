//! The engine's public API: start the reactors (one thread per configured core, see
//! [`crate::reactor`]), open volumes for IO, host transport tasks, and the control plane
//! (volumes, flushes, stats).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use crate::buf::RegisteredPool;
use crate::device::{DeviceConfig, DeviceProbe, OpenDevice};
use crate::error::{EngineError, VolumeErrorKind};
use crate::ids::{DeviceId, ReactorId, VolumeId};
use crate::io::uring::wake;
use crate::io::zero_copy::SendCounts;
use crate::loader::{load_device_with, LoadOptions, LoadedDevice};
use crate::reactor::mesh::Shared;
use crate::reactor::placement::{device_irq_core, select_cores};
use crate::reactor::task::{ReactorTask, MAX_TASKS_PER_REACTOR};
use crate::reactor::thread::{spawn_reactors, ReactorOptions};
use crate::reactor::{Control, FlushWaiter, Home, Msg, Router};
use crate::request::{Errno, Port, Request};
use crate::state_record::{self, DeviceRecord};
use crate::volume::{checked_new_volume, DeviceState, Volume};
use crate::watchdog::{check_backing_files, spawn_watchdog, Watchdog};

/// Ring depth per reactor (bounded further per device by its profile).
pub const DEFAULT_REACTOR_QUEUE_DEPTH: usize = 256;
/// How long an idle reactor busy-polls before parking, unless a profile asks otherwise.
pub const DEFAULT_POLL_IDLE_US: u64 = 50;

/// Engine settings, usually from the daemon's configuration file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// CPU ids to run reactors on; empty = every core (one reactor on machines with ≤ 2 cores).
    #[serde(default)]
    pub cores: Vec<usize>,
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceConfig>,
    /// Busy-poll window before parking; default: the largest `poll_idle_us` of the profiles.
    #[serde(default)]
    pub poll_idle_us: Option<u64>,
    #[serde(default)]
    pub queue_depth: Option<usize>,
    /// Zero-copy sends to peers: `None` or `Some(true)` uses them where the start-up probe
    /// finds the kernel has them; `Some(false)` makes every send copy (to compare the two).
    #[serde(default)]
    pub zero_copy_sends: Option<bool>,
    /// The daemon's state directory: each persistent device's state record lives there
    /// (see `state_record`). None: no records (tests, embedded use).
    #[serde(skip)]
    pub state_dir: Option<PathBuf>,
}

impl EngineConfig {
    /// Every check [`Engine::start`] makes before it opens a device for writing: cores,
    /// queue depth, device names, settings and sizes, the same device configured twice, and
    /// for an existing device its label (read-only; nothing is created, written or locked).
    /// Returns what each device probe learnt, in configuration order.
    pub fn validate(&self) -> Result<Vec<DeviceProbe>, EngineError> {
        select_cores(&self.cores, None)?;
        if let Some(queue_depth) = self.queue_depth {
            if !(1..=4096).contains(&queue_depth) {
                return Err(EngineError::Config(format!(
                    "queue_depth = {queue_depth} must be between 1 and 4096"
                )));
            }
        }
        let mut probes: Vec<DeviceProbe> = Vec::new();
        for (i, dc) in self.devices.iter().enumerate() {
            if let Some(first) = self.devices[..i].iter().find(|d| d.name == dc.name) {
                return Err(EngineError::Config(format!(
                    "device name {:?} is used twice",
                    first.name
                )));
            }
            let probe = crate::device::probe(dc)?;
            if let Some(id) = &probe.identity {
                for (j, other) in probes.iter().enumerate() {
                    if other.identity.as_ref().is_some_and(|o| o.same_device(id)) {
                        return Err(EngineError::Config(format!(
                            "devices {} and {} are the same device ({}): two [[device]] \
                             entries on one file or block device overwrite each other's data; \
                             remove one",
                            self.devices[j].name,
                            dc.name,
                            id.resolved.display()
                        )));
                    }
                }
            }
            probes.push(probe);
        }
        Ok(probes)
    }
}

/// Files this start created: removed again if the start fails.
struct CreatedFiles {
    devices: Vec<Arc<OpenDevice>>,
    armed: bool,
}

impl Drop for CreatedFiles {
    fn drop(&mut self) {
        if self.armed {
            for d in &self.devices {
                d.remove_if_created();
            }
        }
    }
}

/// A task table entry promised by [`Engine::reserve_task_slot`]; given back when dropped
/// unused.
pub struct TaskSlot {
    shared: Arc<Shared>,
    reactor: ReactorId,
    used: bool,
}

impl TaskSlot {
    pub fn reactor(&self) -> ReactorId {
        self.reactor
    }
}

impl Drop for TaskSlot {
    fn drop(&mut self) {
        if !self.used {
            self.shared.reactors[self.reactor.0 as usize]
                .task_slots_used
                .fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl std::fmt::Debug for TaskSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskSlot")
            .field("reactor", &self.reactor)
            .finish()
    }
}

/// A volume opened for IO. While any handle is open the volume cannot be deleted.
pub struct VolumeHandle {
    volume: Arc<Volume>,
    /// The engine's reactors (or the simulator's).
    router: Arc<dyn Router>,
}

impl VolumeHandle {
    /// Open `volume` for IO through `router` (which counts it open until the handle drops).
    pub(crate) fn new(volume: Arc<Volume>, router: Arc<dyn Router>) -> Self {
        volume.open_handles.fetch_add(1, Ordering::AcqRel);
        Self { volume, router }
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    /// Submit a request; its completion arrives on `port`. A refused request comes back.
    pub fn submit(&self, req: Request, port: &Arc<Port>) -> Result<(), (Request, Errno)> {
        if self.router.stopping() {
            return Err((req, Errno::ESHUTDOWN));
        }
        let n = self.router.reactors();
        crate::front::submit(&self.volume, req, port, n, &mut |to, msg| {
            crate::reactor::mesh::send_blocking(&*self.router, to, msg)
        })
    }
}

impl Clone for VolumeHandle {
    fn clone(&self) -> Self {
        Self::new(self.volume.clone(), self.router.clone())
    }
}

impl Drop for VolumeHandle {
    fn drop(&mut self) {
        self.volume.open_handles.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A snapshot of one reactor, for status pages and metrics.
#[derive(Clone, Debug, Serialize)]
pub struct ReactorSnapshot {
    pub id: u32,
    pub core: Option<usize>,
    pub busy_ns: u64,
    pub idle_ns: u64,
    pub parks: u64,
    pub messages: u64,
    pub completions: u64,
    pub ops_in_flight: u64,
    pub parked: bool,
    /// How its tasks' zero-copy sends went out.
    pub sends: SendCounts,
}

pub struct Engine {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    devices: Vec<Arc<DeviceState>>,
    open_devices: Vec<Arc<OpenDevice>>,
    volumes: Mutex<Vec<Arc<Volume>>>,
    next_volume_id: AtomicU32,
    next_task_reactor: AtomicU32,
    state_dir: Option<PathBuf>,
    /// Per device (by id): its path with symlinks resolved, for its state record.
    record_paths: Vec<Option<PathBuf>>,
    /// Dropping the sender stops the watchdog.
    watchdog: Option<Watchdog>,
}

impl Engine {
    /// Open every device, load its metadata, and start the reactors.
    pub fn start(config: &EngineConfig) -> Result<Engine, EngineError> {
        let irq = device_irq_core(&config.devices);
        let cores = select_cores(&config.cores, irq.as_ref().map(|(core, _)| *core))?;
        if let (Some((core, name)), [Some(chosen)]) = (&irq, cores.as_slice()) {
            if core == chosen {
                tracing::info!(core, interrupt = %name, "one reactor, on the core that takes the device's interrupts");
            }
        }
        let n = cores.len() as u32;
        config.validate()?;
        let OpenedDevices {
            mut created,
            open_devices,
            loaded,
            record_paths,
        } = open_devices(config)?;
        let poll_idle_us = config.poll_idle_us.unwrap_or_else(|| {
            open_devices
                .iter()
                .map(|d| u64::from(d.spec.profile.poll_idle_us))
                .max()
                .unwrap_or(DEFAULT_POLL_IDLE_US)
        });
        let queue_depth = config.queue_depth.unwrap_or(DEFAULT_REACTOR_QUEUE_DEPTH);
        let shared = Arc::new(Shared::new(&cores)?);
        let devices: Vec<Arc<DeviceState>> = loaded.iter().map(|l| l.state.clone()).collect();
        let mut homes: Vec<Vec<Home>> = (0..n).map(|_| Vec::new()).collect();
        let mut volumes = Vec::new();
        let mut max_id = 0;
        for l in loaded {
            max_id = l
                .volumes
                .iter()
                .map(|v| v.id.0)
                .max()
                .unwrap_or(0)
                .max(max_id);
            volumes.extend(l.volumes.iter().cloned());
            let home = l.state.home_reactor(n);
            homes[home.0 as usize].push(Home::new(l.state, l.volumes, l.generation, l.slot));
        }
        let reactor_opts = ReactorOptions {
            queue_depth,
            poll_idle_us,
            zero_copy_sends: config.zero_copy_sends.unwrap_or(true),
        };
        let (threads, first_err) = spawn_reactors(&shared, &open_devices, homes, reactor_opts)?;
        let engine = Engine {
            shared,
            threads,
            devices,
            open_devices,
            volumes: Mutex::new(volumes),
            next_volume_id: AtomicU32::new(max_id + 1),
            next_task_reactor: AtomicU32::new(0),
            state_dir: config.state_dir.clone(),
            record_paths,
            watchdog: None,
        };
        if let Some(e) = first_err {
            engine.stop_threads();
            return Err(e);
        }
        let mut engine = engine;
        for d in &engine.devices {
            engine.write_record(d).map_err(|e| {
                EngineError::Config(format!(
                    "cannot write the state record of device {} in {}: {e} (the state \
                     directory must be writable: set [web] state_dir or --state-dir)",
                    d.name,
                    engine
                        .state_dir
                        .as_deref()
                        .unwrap_or(std::path::Path::new("?"))
                        .display()
                ))
            })?;
        }
        engine.watchdog = spawn_watchdog(engine.open_devices.clone(), engine.devices.clone())?;
        created.armed = false;
        tracing::info!(reactors = n, poll_idle_us, queue_depth, "engine started");
        Ok(engine)
    }

    /// Host a transport task on `reactor` (or the least loaded one).
    pub fn spawn_task(&self, reactor: Option<ReactorId>, task: Box<dyn ReactorTask>) -> ReactorId {
        let slot = match reactor {
            None => self.reserve_task_slot(),
            Some(_) => None,
        };
        if let Some(slot) = slot {
            return self.spawn_reserved(slot, task);
        }
        let to = reactor.unwrap_or_else(|| {
            let i = self.next_task_reactor.fetch_add(1, Ordering::Relaxed) % self.reactor_count();
            ReactorId(i)
        });
        self.shared.reactors[to.0 as usize]
            .task_slots_used
            .fetch_add(1, Ordering::AcqRel);
        self.shared.send_blocking(to, Msg::Task(task));
        to
    }

    /// Promise a task table entry on some reactor (round robin over those with room), for a
    /// task to be spawned later with [`Engine::spawn_reserved`]: e.g. an NBD connection takes
    /// one before its handshake, so a client the server negotiated with always gets a task.
    /// None when every reactor's table is full or promised. Dropping the slot unused gives it
    /// back.
    pub fn reserve_task_slot(&self) -> Option<TaskSlot> {
        let n = self.reactor_count();
        let start = self.next_task_reactor.fetch_add(1, Ordering::Relaxed);
        (0..n).find_map(|k| {
            let i = start.wrapping_add(k) % n;
            self.shared.reactors[i as usize]
                .task_slots_used
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                    (used < MAX_TASKS_PER_REACTOR).then_some(used + 1)
                })
                .ok()
                .map(|_| TaskSlot {
                    shared: self.shared.clone(),
                    reactor: ReactorId(i),
                    used: false,
                })
        })
    }

    /// Start `task` in the table entry `slot` promised.
    pub fn spawn_reserved(&self, mut slot: TaskSlot, task: Box<dyn ReactorTask>) -> ReactorId {
        slot.used = true;
        self.shared.send_blocking(slot.reactor, Msg::Task(task));
        slot.reactor
    }

    /// The registered buffer pool of `reactor`: IO on chunks that reactor owns is cheapest
    /// from these buffers.
    pub fn buffer_pool(&self, reactor: ReactorId) -> Option<Arc<RegisteredPool>> {
        self.shared
            .reactors
            .get(reactor.0 as usize)
            .map(|r| r.pool.clone())
    }

    pub fn reactor_count(&self) -> u32 {
        self.shared.reactors.len() as u32
    }

    pub fn devices(&self) -> &[Arc<DeviceState>] {
        &self.devices
    }

    pub fn device_path(&self, id: DeviceId) -> Option<std::path::PathBuf> {
        self.open_devices
            .get(id.0 as usize)
            .and_then(|d| d.path.clone())
    }

    pub fn volumes(&self) -> Vec<Arc<Volume>> {
        self.volumes.lock().expect("volume table").clone()
    }

    pub fn volume(&self, name: &str) -> Option<Arc<Volume>> {
        self.volumes
            .lock()
            .expect("volume table")
            .iter()
            .find(|v| v.name == name)
            .cloned()
    }

    /// Open a volume for IO.
    pub fn open(&self, name: &str) -> Result<VolumeHandle, EngineError> {
        let volume = self.volume(name).ok_or_else(|| EngineError::Volume {
            volume: name.into(),
            kind: VolumeErrorKind::NotFound,
            message: "no such volume".into(),
        })?;
        Ok(VolumeHandle::new(volume, self.shared.clone()))
    }

    fn control(&self, device: &DeviceState, control: Control) -> Result<(), Errno> {
        let home = device.home_reactor(self.reactor_count());
        let (tx, rx) = mpsc::sync_channel(1);
        let reply: crate::reactor::Reply = Box::new(move |r| {
            let _ = tx.send(r);
        });
        let control = match control {
            Control::Create { volume, .. } => Control::Create { volume, reply },
            Control::Delete { id, .. } => Control::Delete { id, reply },
            Control::Grow { id, size_bytes, .. } => Control::Grow {
                id,
                size_bytes,
                reply,
            },
        };
        self.shared.send_blocking(
            home,
            Msg::Control {
                device: device.id,
                control,
            },
        );
        rx.recv().unwrap_or(Err(Errno::ESHUTDOWN))
    }

    fn noop_reply() -> crate::reactor::Reply {
        Box::new(|_| {})
    }

    /// Create a thin volume on `device`; returns once its metadata is durable.
    pub fn create_volume(
        &self,
        device: &str,
        name: &str,
        size_bytes: u64,
    ) -> Result<Arc<Volume>, EngineError> {
        let verr = |kind: VolumeErrorKind, message: String| EngineError::Volume {
            volume: name.into(),
            kind,
            message,
        };
        let dev = self
            .devices
            .iter()
            .find(|d| d.name == device)
            .ok_or_else(|| {
                verr(
                    VolumeErrorKind::Invalid,
                    format!("no device named {device:?}"),
                )
            })?
            .clone();
        let mut table = self.volumes.lock().expect("volume table");
        if table.iter().any(|v| v.name == name) {
            return Err(verr(
                VolumeErrorKind::Conflict,
                "a volume with this name exists".into(),
            ));
        }
        if table.iter().filter(|v| v.device.id == dev.id).count()
            >= crate::meta::MAX_VOLUMES_PER_DEVICE
        {
            return Err(verr(
                VolumeErrorKind::Conflict,
                format!(
                    "device {device} holds the maximum of {} volumes",
                    crate::meta::MAX_VOLUMES_PER_DEVICE
                ),
            ));
        }
        let id = VolumeId(self.next_volume_id.fetch_add(1, Ordering::Relaxed));
        let volume = Arc::new(checked_new_volume(id, name, dev.clone(), size_bytes)?);
        self.control(
            &dev,
            Control::Create {
                volume: volume.clone(),
                reply: Self::noop_reply(),
            },
        )
        .map_err(|e| {
            verr(
                VolumeErrorKind::NotPersisted,
                format!("could not persist metadata: {e}"),
            )
        })?;
        table.push(volume.clone());
        self.write_record_logged(&dev, &table);
        tracing::info!(volume = name, device, size_bytes, "volume created");
        Ok(volume)
    }

    /// Delete a volume that no one has open; its chunks return to the device.
    pub fn delete_volume(&self, name: &str) -> Result<(), EngineError> {
        let verr = |kind: VolumeErrorKind, message: String| EngineError::Volume {
            volume: name.into(),
            kind,
            message,
        };
        let mut table = self.volumes.lock().expect("volume table");
        let pos = table
            .iter()
            .position(|v| v.name == name)
            .ok_or_else(|| verr(VolumeErrorKind::NotFound, "no such volume".into()))?;
        let volume = table[pos].clone();
        let open = volume.open_handles.load(Ordering::Acquire);
        if open > 0 {
            return Err(verr(
                VolumeErrorKind::Conflict,
                format!("in use ({open} open handle(s), e.g. an export or a connected client)"),
            ));
        }
        volume.deleted.store(true, Ordering::Release);
        self.control(
            &volume.device,
            Control::Delete {
                id: volume.id,
                reply: Self::noop_reply(),
            },
        )
        .map_err(|e| {
            verr(
                VolumeErrorKind::NotPersisted,
                format!("could not persist metadata: {e}"),
            )
        })?;
        table.remove(pos);
        self.write_record_logged(&volume.device, &table);
        tracing::info!(volume = name, "volume deleted");
        Ok(())
    }

    /// Grow a volume online. Shrinking is refused: it would destroy data.
    pub fn grow_volume(&self, name: &str, size_bytes: u64) -> Result<(), EngineError> {
        let verr = |kind: VolumeErrorKind, message: String| EngineError::Volume {
            volume: name.into(),
            kind,
            message,
        };
        let table = self.volumes.lock().expect("volume table");
        let volume = table
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| verr(VolumeErrorKind::NotFound, "no such volume".into()))?
            .clone();
        let current = volume.size_bytes();
        if size_bytes < current {
            return Err(verr(VolumeErrorKind::Invalid, format!("new size {size_bytes} is smaller than the current {current}; shrinking is not supported")));
        }
        let block = u64::from(volume.device.profile.logical_block_size_bytes);
        if !size_bytes.is_multiple_of(block) {
            return Err(verr(
                VolumeErrorKind::Invalid,
                format!("size {size_bytes} must be a multiple of the device block size {block}"),
            ));
        }
        if size_bytes > volume.max_size_bytes() {
            return Err(verr(
                VolumeErrorKind::Invalid,
                format!(
                    "size {size_bytes} is larger than device {} can hold ({} bytes)",
                    volume.device.name,
                    volume.max_size_bytes()
                ),
            ));
        }
        self.control(
            &volume.device,
            Control::Grow {
                id: volume.id,
                size_bytes,
                reply: Self::noop_reply(),
            },
        )
        .map_err(|e| {
            verr(
                VolumeErrorKind::NotPersisted,
                format!("could not persist metadata: {e}"),
            )
        })?;
        tracing::info!(volume = name, size_bytes, "volume grown");
        Ok(())
    }

    /// Flush every device (data and metadata), e.g. before stopping.
    pub fn flush_all(&self) -> Result<(), EngineError> {
        check_backing_files(&self.open_devices, &self.devices);
        let mut rxs = Vec::new();
        for d in &self.devices {
            let (tx, rx) = mpsc::sync_channel(1);
            let reply: crate::reactor::Reply = Box::new(move |r| {
                let _ = tx.send(r);
            });
            let home = d.home_reactor(self.reactor_count());
            self.shared.send_blocking(
                home,
                Msg::Flush {
                    device: d.id,
                    waiter: FlushWaiter::Control(reply),
                },
            );
            rxs.push((d.name.clone(), rx));
        }
        for (name, rx) in rxs {
            rx.recv()
                .unwrap_or(Err(Errno::ESHUTDOWN))
                .map_err(|e| EngineError::Device {
                    device: name,
                    message: format!("flush failed: {e}"),
                })?;
        }
        Ok(())
    }

    /// Write the state record of `device` (persistent devices, with a state directory).
    fn write_record(&self, device: &DeviceState) -> std::io::Result<()> {
        let table = self.volumes.lock().expect("volume table");
        self.write_record_with(device, &table)
    }

    fn write_record_with(
        &self,
        device: &DeviceState,
        table: &[Arc<Volume>],
    ) -> std::io::Result<()> {
        let (Some(dir), Some(Some(path))) =
            (&self.state_dir, self.record_paths.get(device.id.0 as usize))
        else {
            return Ok(());
        };
        let rec = DeviceRecord {
            name: device.name.clone(),
            path: path.clone(),
            uuid: format!("{:032x}", device.label.device_uuid),
            volumes: table.iter().filter(|v| v.device.id == device.id).count() as u64,
        };
        state_record::write(dir, &rec).map(|_| ())
    }

    /// After a volume change that is already durable on the device: a record that cannot be
    /// written is logged, not returned (the change itself stands).
    fn write_record_logged(&self, device: &DeviceState, table: &[Arc<Volume>]) {
        if let Err(e) = self.write_record_with(device, table) {
            tracing::error!(device = %device.name, "cannot update the device's state record: {e}");
        }
    }

    pub fn reactor_stats(&self) -> Vec<ReactorSnapshot> {
        self.shared
            .reactors
            .iter()
            .enumerate()
            .map(|(i, r)| ReactorSnapshot {
                id: i as u32,
                core: r.core_id,
                busy_ns: r.stats.busy_ns.load(Ordering::Relaxed),
                idle_ns: r.stats.idle_ns.load(Ordering::Relaxed),
                parks: r.stats.parks.load(Ordering::Relaxed),
                messages: r.stats.messages.load(Ordering::Relaxed),
                completions: r.stats.completions.load(Ordering::Relaxed),
                ops_in_flight: r.stats.ops_in_flight.load(Ordering::Relaxed),
                parked: r.parked.load(Ordering::Relaxed),
                sends: r.stats.sends.snapshot(),
            })
            .collect()
    }

    /// Drain, flush everything, stop the reactors.
    pub fn shutdown(mut self) -> Result<(), EngineError> {
        let flushed = self.flush_all();
        self.stop_threads();
        self.threads.clear();
        flushed
    }

    fn stop_threads(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for r in &self.shared.reactors {
            wake(&r.wake_fd);
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.watchdog.take() {
            drop(stop);
            let _ = thread.join();
        }
        self.stop_threads();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What [`open_devices`] opened and loaded, in configuration order.
struct OpenedDevices {
    created: CreatedFiles,
    open_devices: Vec<Arc<OpenDevice>>,
    loaded: Vec<LoadedDevice>,
    /// Per device: its path with symlinks resolved, for its state record.
    record_paths: Vec<Option<PathBuf>>,
}

/// Open every configured device and load its metadata, checked against its state record;
/// no volume name may be on two devices.
fn open_devices(config: &EngineConfig) -> Result<OpenedDevices, EngineError> {
    let mut created = CreatedFiles {
        devices: Vec::new(),
        armed: true,
    };
    let mut open_devices = Vec::new();
    let mut loaded = Vec::new();
    let mut record_paths = Vec::new();
    for (i, dc) in config.devices.iter().enumerate() {
        let dev = Arc::new(OpenDevice::open(DeviceId(i as u32), dc)?);
        if dev.created {
            created.devices.push(dev.clone());
        }
        let record_path = dev
            .path
            .as_deref()
            .filter(|_| dev.spec.persistent)
            .map(state_record::resolved_path);
        let mut opts = LoadOptions {
            path: dev.path.clone(),
            format_refusal: None,
        };
        let mut record = None;
        if let (Some(dir), Some(resolved)) = (&config.state_dir, &record_path) {
            let read = state_record::read(dir, resolved);
            if let Ok(Some(r)) = &read {
                record = Some(r.clone());
            }
            opts.format_refusal = match read {
                Ok(Some((file, rec))) if rec.volumes > 0 => Some(format!(
                    "the daemon's state record {} says it held {} volume(s) (label uuid \
                     {}): formatting it would drop them. Restore the device (file) from a \
                     backup; or, if its data is really lost, remove the record (or set \
                     format = \"always\") to start over with an empty device",
                    file.display(),
                    rec.volumes,
                    rec.uuid
                )),
                Ok(_) => None,
                Err(m) => Some(m),
            };
        }
        let l = load_device_with(&dev.spec, &mut dev.sync_access(), &opts)?;
        if let Some((file, rec)) = record {
            let uuid = format!("{:032x}", l.state.label.device_uuid);
            if rec.uuid != uuid && !l.formatted {
                tracing::warn!(device = %dc.name, record = %file.display(), recorded_uuid = %rec.uuid, uuid = %uuid, recorded_volumes = rec.volumes, volumes = l.volumes.len(), "the device's label is not the one its state record names: a different device image is at this path");
            }
        }
        tracing::info!(device = %dc.name, kind = %dev.spec.kind, size_bytes = dev.spec.size_bytes, volumes = l.volumes.len(), generation = l.generation, "device ready");
        open_devices.push(dev);
        loaded.push(l);
        record_paths.push(record_path);
    }
    let mut volume_names = HashMap::new();
    for l in &loaded {
        for v in &l.volumes {
            if let Some(other) = volume_names.insert(v.name.clone(), l.state.name.clone()) {
                return Err(EngineError::Config(format!(
                    "volume {:?} exists on devices {other} and {}",
                    v.name, l.state.name
                )));
            }
        }
    }
    Ok(OpenedDevices {
        created,
        open_devices,
        loaded,
        record_paths,
    })
}

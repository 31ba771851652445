//! A whole engine on simulated disks, stepped deterministically in one thread: reactors run
//! round-robin, one tick of the simulated clock per step. Reactors host tasks (NBD
//! connections…) whose sockets live on a simulated network ([`SimNet`]): every step ticks the
//! network, hands the tasks their ring completions and polls them, as a reactor thread's loop
//! does. Used by the crash tests and available to other crates' tests.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::buf::IoBuf;
use crate::device::FaultConfig;
use crate::engine::VolumeHandle;
use crate::error::EngineError;
use crate::ids::{DeviceId, ReactorId, VolumeId};
use crate::io::delay::{DelayModel, Delayed};
use crate::io::fault::{FaultState, Faulty};
use crate::io::sim::{SimClock, SimDisk, SimIo};
use crate::io::sim_net::{NetOptions, NodeId, SimNet};
use crate::loader::{load_device, DeviceSpec, SyncAccess};
use crate::reactor::task::{ReactorTask, TaskEnv, TaskTable};
use crate::reactor::{Control, Home, Msg, ReactorCore, Router};
use crate::request::{Errno, Port, PortWaker, Request};
use crate::volume::{DeviceState, Volume};

struct SimRouter {
    queues: Vec<Mutex<VecDeque<Msg>>>,
}

impl Router for SimRouter {
    fn reactors(&self) -> u32 {
        self.queues.len() as u32
    }
    fn try_send(&self, to: ReactorId, msg: Msg) -> Result<(), Msg> {
        self.queues[to.0 as usize]
            .lock()
            .expect("sim queue")
            .push_back(msg);
        Ok(())
    }
}

/// What simulated reactors give their tasks beside the core: no registered buffer pool (tasks
/// use their own buffers) and no wake-ups (nothing parks).
struct SimEnv;

impl TaskEnv for SimEnv {
    fn take_buffer(&self, _me: ReactorId, _len: usize) -> Option<IoBuf> {
        None
    }
    fn port_waker(&self, _me: ReactorId) -> PortWaker {
        PortWaker::None
    }
    fn task_dropped(&self, _me: ReactorId) {}
}

struct SimAccess<'a>(&'a Mutex<SimDisk>);

impl SyncAccess for SimAccess<'_> {
    fn read_at(&mut self, offset_bytes: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.lock().expect("sim disk").read(offset_bytes, buf);
        Ok(())
    }
    fn write_at(&mut self, offset_bytes: u64, data: &[u8]) -> std::io::Result<()> {
        let mut d = self.0.lock().expect("sim disk");
        let image = d.crash_free_image_mut();
        image[offset_bytes as usize..offset_bytes as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn sync(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Simulation knobs.
#[derive(Clone, Copy, Debug)]
pub struct SimOptions {
    pub reactors: u32,
    pub queue_depth: usize,
    pub max_latency_ticks: u64,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            reactors: 2,
            queue_depth: 16,
            max_latency_ticks: 8,
        }
    }
}

/// The `delay` and `fault` wrappers of one simulated disk, as a device's
/// `emulate_profile_latency` and `fault` settings: the same decorators as on a reactor, on the
/// simulated clock.
#[derive(Clone, Debug, Default)]
pub struct SimWrappers {
    pub emulate_profile_latency: bool,
    pub fault: Option<FaultConfig>,
}

type SimStack = Delayed<Faulty<SimIo>, SimClock>;

/// The answer to a control message, once the engine has given it.
#[derive(Clone)]
pub struct ControlReply(Arc<Mutex<Option<Result<(), Errno>>>>);

impl ControlReply {
    pub fn result(&self) -> Option<Result<(), Errno>> {
        *self.0.lock().expect("reply")
    }
}

pub struct SimCluster {
    /// Declared before `tasks`, so dropped first: a reactor's ring leaves the network (which
    /// forgets its ops) before the tasks that own those ops' buffers go.
    reactors: Vec<ReactorCore<SimStack>>,
    /// The tasks each reactor hosts.
    tasks: Vec<TaskTable>,
    /// Tasks are told to stop (once) on their next poll.
    stopping: bool,
    net: SimNet,
    node: NodeId,
    router: Arc<SimRouter>,
    clock: Arc<AtomicU64>,
    devices: Vec<Arc<DeviceState>>,
    volumes: Vec<Arc<Volume>>,
}

impl SimCluster {
    /// Load (or format) every disk and build the reactors, as node 0 of a network of its
    /// own ([`NetOptions::default`], seeded from `seed`; [`Self::step`] ticks it).
    pub fn start(
        seed: u64,
        opts: SimOptions,
        disks: Vec<(DeviceSpec, Arc<Mutex<SimDisk>>)>,
    ) -> Result<Self, EngineError> {
        let net = SimNet::new(seed ^ 0x5EED_0000_0000_0001, NetOptions::default());
        Self::start_with(seed, opts, disks, &net, NodeId(0), &[])
    }

    /// [`Self::start`], with some disks under the `delay` and `fault` wrappers.
    pub fn start_wrapped(
        seed: u64,
        opts: SimOptions,
        disks: Vec<(DeviceSpec, Arc<Mutex<SimDisk>>)>,
        wrappers: &[(DeviceId, SimWrappers)],
    ) -> Result<Self, EngineError> {
        let net = SimNet::new(seed ^ 0x5EED_0000_0000_0001, NetOptions::default());
        Self::start_with(seed, opts, disks, &net, NodeId(0), wrappers)
    }

    /// As [`Self::start`], as `node` of `net` (shared with clients, or other clusters: a
    /// cluster restarted after a crash on the same network finds its clients still there).
    pub fn start_on(
        seed: u64,
        opts: SimOptions,
        disks: Vec<(DeviceSpec, Arc<Mutex<SimDisk>>)>,
        net: &SimNet,
        node: NodeId,
    ) -> Result<Self, EngineError> {
        Self::start_with(seed, opts, disks, net, node, &[])
    }

    /// [`Self::start_on`], with some disks under the `delay` and `fault` wrappers.
    pub fn start_with(
        seed: u64,
        opts: SimOptions,
        disks: Vec<(DeviceSpec, Arc<Mutex<SimDisk>>)>,
        net: &SimNet,
        node: NodeId,
        wrappers: &[(DeviceId, SimWrappers)],
    ) -> Result<Self, EngineError> {
        let n = opts.reactors;
        assert!(n > 0);
        let router = Arc::new(SimRouter {
            queues: (0..n).map(|_| Mutex::new(VecDeque::new())).collect(),
        });
        let clock = Arc::new(AtomicU64::new(0));
        let mut devices = Vec::new();
        let mut volumes = Vec::new();
        let mut homes: Vec<Vec<Home>> = (0..n).map(|_| Vec::new()).collect();
        let mut disk_map = HashMap::new();
        for (spec, disk) in &disks {
            let loaded = load_device(spec, &mut SimAccess(disk))?;
            let home = loaded.state.home_reactor(n);
            homes[home.0 as usize].push(Home::new(
                loaded.state.clone(),
                loaded.volumes.clone(),
                loaded.generation,
                loaded.slot,
            ));
            devices.push(loaded.state);
            volumes.extend(loaded.volumes);
            disk_map.insert(spec.id, disk.clone());
        }
        // One fault state per device, shared by every reactor (as on a real engine).
        let faults: Vec<(DeviceId, Arc<FaultState>)> = wrappers
            .iter()
            .filter_map(|(id, w)| Some((*id, Arc::new(FaultState::new(w.fault.clone()?)))))
            .collect();
        let delays: Vec<(DeviceId, DelayModel)> = wrappers
            .iter()
            .map(|(id, w)| {
                let profile = disks
                    .iter()
                    .find(|(spec, _)| spec.id == *id)
                    .filter(|_| w.emulate_profile_latency)
                    .map(|(spec, _)| spec.profile.clone());
                let spikes = faults
                    .iter()
                    .find(|(f, state)| f == id && state.spikes())
                    .map(|(_, state)| state.clone());
                (*id, DelayModel { profile, spikes })
            })
            .collect();
        let reactors = homes
            .into_iter()
            .enumerate()
            .map(|(i, h)| {
                let io = SimIo::new(
                    disk_map.clone(),
                    clock.clone(),
                    seed.wrapping_mul(31).wrapping_add(i as u64),
                    opts.queue_depth,
                    opts.max_latency_ticks,
                )
                .with_net(net);
                let io = Delayed::new(
                    Faulty::new(io, faults.iter().cloned()),
                    SimClock::new(clock.clone()),
                    opts.queue_depth,
                    delays.iter().cloned(),
                );
                let r: Arc<dyn Router> = router.clone();
                ReactorCore::new(ReactorId(i as u32), io, r, h)
            })
            .collect();
        Ok(Self {
            reactors,
            tasks: (0..n).map(|_| TaskTable::new()).collect(),
            stopping: false,
            net: net.clone(),
            node,
            router,
            clock,
            devices,
            volumes,
        })
    }

    pub fn volume(&self, name: &str) -> Option<Arc<Volume>> {
        self.volumes.iter().find(|v| v.name == name).cloned()
    }

    pub fn device(&self, id: DeviceId) -> Option<Arc<DeviceState>> {
        self.devices.iter().find(|d| d.id == id).cloned()
    }

    /// The network this cluster's sockets are on, and its node there.
    pub fn net(&self) -> (&SimNet, NodeId) {
        (&self.net, self.node)
    }

    /// Open a volume for IO (a task's handle, as `Engine::open` gives).
    pub fn open(&self, name: &str) -> Option<VolumeHandle> {
        let router: Arc<dyn Router> = self.router.clone();
        self.volume(name).map(|v| VolumeHandle::new(v, router))
    }

    /// Host `task` on reactor `reactor`; handed back when its table is full.
    pub fn spawn_task(
        &mut self,
        reactor: ReactorId,
        task: Box<dyn ReactorTask>,
    ) -> Result<(), Box<dyn ReactorTask>> {
        match self.tasks.get_mut(reactor.0 as usize) {
            Some(table) => table.insert(task),
            None => Err(task),
        }
    }

    /// Tasks hosted, on all reactors.
    pub fn tasks(&self) -> usize {
        self.tasks.iter().map(TaskTable::len).sum()
    }

    /// No task left and none of their ring ops in flight.
    pub fn tasks_drained(&self) -> bool {
        self.tasks.iter().all(TaskTable::is_drained)
    }

    /// Tell every task to stop (as a stopping daemon does), on its next poll.
    pub fn stop_tasks(&mut self) {
        self.stopping = true;
    }

    /// One tick: the network moves, then every reactor handles its messages, its completions
    /// and its tasks.
    pub fn step(&mut self) {
        self.net.tick();
        self.step_reactors();
    }

    /// One tick of the reactors only: for several clusters on one network, whoever drives
    /// them ticks the network once per round ([`SimNet::tick`]) and steps each cluster so.
    pub fn step_reactors(&mut self) {
        self.clock.fetch_add(1, Ordering::Relaxed);
        for (r, tasks) in self.reactors.iter_mut().zip(&mut self.tasks) {
            // Bounded: only messages already queued at the start of this step.
            let queued = self.router.queues[r.id.0 as usize]
                .lock()
                .expect("sim queue")
                .len();
            for _ in 0..queued {
                let msg = self.router.queues[r.id.0 as usize]
                    .lock()
                    .expect("sim queue")
                    .pop_front();
                match msg {
                    Some(Msg::Task(t)) => {
                        if tasks.insert(t).is_err() {
                            tracing::error!(reactor = r.id.0, "task table full; dropping a task");
                        }
                    }
                    Some(m) => r.handle(m),
                    None => break,
                }
            }
            // The order of a reactor thread's turn: device completions, ring completions to
            // the tasks, what they started inline, then the tasks.
            r.poll().expect("sim poll cannot fail");
            tasks.dispatch_ring(r, &SimEnv);
            r.poll_local().expect("sim poll cannot fail");
            tasks.poll_all(r, &SimEnv, self.stopping);
        }
    }

    pub fn is_idle(&self) -> bool {
        self.reactors.iter().all(|r| r.is_idle())
            && self
                .router
                .queues
                .iter()
                .all(|q| q.lock().expect("q").is_empty())
    }

    /// Step until nothing is in flight; panics after `max_ticks` (a livelock is a bug).
    pub fn run_until_idle(&mut self, max_ticks: u64) {
        for _ in 0..max_ticks {
            self.step();
            if self.is_idle() {
                return;
            }
        }
        panic!("simulation did not settle in {max_ticks} ticks");
    }

    pub fn submit(
        &mut self,
        volume: &Arc<Volume>,
        req: Request,
        port: &Arc<Port>,
    ) -> Result<(), (Request, Errno)> {
        let n = self.reactors.len() as u32;
        let router = self.router.clone();
        crate::front::submit(volume, req, port, n, &mut |to, msg| {
            let _ = router.try_send(to, msg);
        })
    }

    /// Create a volume and wait (in simulated time) until its metadata is durable.
    pub fn create_volume(
        &mut self,
        device: DeviceId,
        id: VolumeId,
        name: &str,
        size_bytes: u64,
    ) -> Result<Arc<Volume>, EngineError> {
        let (volume, reply) = self.begin_create_volume(device, id, name, size_bytes)?;
        self.run_until_idle(1_000_000);
        let result = reply.result().expect("control answered");
        if result.is_err() {
            self.volumes.retain(|v| v.id != id);
        }
        result.map_err(|e| EngineError::Volume {
            volume: name.into(),
            kind: crate::VolumeErrorKind::NotPersisted,
            message: format!("metadata not persisted: {e}"),
        })?;
        Ok(volume)
    }

    /// Start creating a volume; its reply comes once its metadata is durable (or failed). The
    /// volume is known to [`Self::volume`] at once.
    pub fn begin_create_volume(
        &mut self,
        device: DeviceId,
        id: VolumeId,
        name: &str,
        size_bytes: u64,
    ) -> Result<(Arc<Volume>, ControlReply), EngineError> {
        let state = self
            .device(device)
            .ok_or_else(|| EngineError::Config(format!("no device {device}")))?;
        let volume = Arc::new(crate::volume::checked_new_volume(
            id,
            name,
            state.clone(),
            size_bytes,
        )?);
        let reply = self.send_control(
            &state,
            Control::Create {
                volume: volume.clone(),
                reply: Box::new(|_| {}),
            },
        );
        self.volumes.push(volume.clone());
        Ok((volume, reply))
    }

    /// Start deleting a volume with no IO in flight; its reply comes once the deletion is
    /// durable (or failed). The volume is gone from [`Self::volume`] at once.
    pub fn begin_delete_volume(&mut self, volume: &Arc<Volume>) -> ControlReply {
        self.volumes.retain(|v| v.id != volume.id);
        let state = volume.device.clone();
        self.send_control(
            &state,
            Control::Delete {
                id: volume.id,
                reply: Box::new(|_| {}),
            },
        )
    }

    fn send_control(&mut self, state: &Arc<DeviceState>, mut control: Control) -> ControlReply {
        let done = ControlReply(Arc::new(Mutex::new(None)));
        let d2 = done.0.clone();
        let reply: crate::reactor::Reply = Box::new(move |r| *d2.lock().expect("reply") = Some(r));
        match &mut control {
            Control::Create { reply: r, .. }
            | Control::Delete { reply: r, .. }
            | Control::Grow { reply: r, .. } => *r = reply,
        }
        let home = state.home_reactor(self.reactors.len() as u32);
        let _ = self.router.try_send(
            home,
            Msg::Control {
                device: state.id,
                control,
            },
        );
        done
    }

    /// Crash: the tasks vanish mid-flight, every connection with an end on this node is reset,
    /// and every disk keeps a random subset of its volatile state; returns the images.
    pub fn crash(self, disks: &[(DeviceSpec, Arc<Mutex<SimDisk>>)], seed: u64) -> Vec<Vec<u8>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        self.net.crash_node(self.node);
        drop(self);
        disks
            .iter()
            .map(|(_, d)| d.lock().expect("sim disk").crash(&mut rng))
            .collect()
    }
}

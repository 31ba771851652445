//! A task's timer on a real reactor (`TaskCtx::wake_within_ns`): on an otherwise idle engine,
//! whose reactor parks, the task is still polled once its deadline has passed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringblock_engine::task::{ReactorTask, RingCompletion, TaskCtx};
use ringblock_engine::{DeviceConfig, Engine, EngineConfig, ReactorId};

const DELAY: Duration = Duration::from_millis(300);

/// Asks to be polled again by its deadline (set at its first poll) until a poll comes at or
/// after it; then it says so and finishes.
struct Timer {
    deadline: Option<Instant>,
    fired: Arc<AtomicBool>,
}

impl ReactorTask for Timer {
    fn poll(&mut self, ctx: &mut TaskCtx<'_>) -> usize {
        let now = Instant::now();
        let deadline = *self.deadline.get_or_insert(now + DELAY);
        if now >= deadline {
            self.fired.store(true, Ordering::Release);
            return 1;
        }
        ctx.wake_within_ns((deadline - now).as_nanos() as u64);
        0
    }
    fn on_ring(&mut self, _ctx: &mut TaskCtx<'_>, _c: RingCompletion) {}
    fn stop(&mut self, _ctx: &mut TaskCtx<'_>) {}
    fn has_ready(&self) -> bool {
        false
    }
    fn finished(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }
}

#[test]
fn a_parked_reactor_polls_a_task_whose_timer_is_due() {
    let engine = Engine::start(&EngineConfig {
        devices: vec![DeviceConfig::ram("r", 64 << 20)],
        cores: vec![0],
        ..Default::default()
    })
    .unwrap();
    let fired = Arc::new(AtomicBool::new(false));
    engine.spawn_task(
        Some(ReactorId(0)),
        Box::new(Timer {
            deadline: None,
            fired: fired.clone(),
        }),
    );
    // Nothing else happens on the engine: only the timer can bring the reactor back.
    let give_up = Instant::now() + Duration::from_secs(10);
    while !fired.load(Ordering::Acquire) {
        assert!(
            Instant::now() < give_up,
            "the task was never polled after its deadline"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    engine.shutdown().unwrap();
}

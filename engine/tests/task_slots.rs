//! Reactor task slots promised ahead (`Engine::reserve_task_slot`): never more than the task
//! tables hold, given back when dropped unused or when the task they were spent on finishes.

use std::time::{Duration, Instant};

use ringblock_engine::task::{ReactorTask, RingCompletion, TaskCtx, MAX_TASKS_PER_REACTOR};
use ringblock_engine::{DeviceConfig, Engine, EngineConfig};

/// A task that finishes on its first poll.
struct Done;

impl ReactorTask for Done {
    fn poll(&mut self, _ctx: &mut TaskCtx<'_>) -> usize {
        0
    }
    fn on_ring(&mut self, _ctx: &mut TaskCtx<'_>, _c: RingCompletion) {}
    fn stop(&mut self, _ctx: &mut TaskCtx<'_>) {}
    fn has_ready(&self) -> bool {
        false
    }
    fn finished(&self) -> bool {
        true
    }
}

#[test]
fn reserved_slots_are_bounded_by_the_task_tables_and_come_back() {
    let engine = Engine::start(&EngineConfig {
        devices: vec![DeviceConfig::ram("r", 64 << 20)],
        cores: vec![0],
        ..Default::default()
    })
    .unwrap();
    let mut slots: Vec<_> = (0..MAX_TASKS_PER_REACTOR)
        .map(|i| {
            engine
                .reserve_task_slot()
                .unwrap_or_else(|| panic!("slot {i}"))
        })
        .collect();
    assert!(engine.reserve_task_slot().is_none(), "past the table");
    // Dropped unused: back at once.
    drop(slots.pop());
    let slot = engine.reserve_task_slot().expect("a slot given back");
    assert!(engine.reserve_task_slot().is_none());
    // Spent on a task that finishes: back once the reactor drops the task.
    engine.spawn_reserved(slot, Box::new(Done));
    let deadline = Instant::now() + Duration::from_secs(10);
    let again = loop {
        if let Some(s) = engine.reserve_task_slot() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the finished task's slot never came back"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    drop(again);
    drop(slots);
    engine.shutdown().unwrap();
}

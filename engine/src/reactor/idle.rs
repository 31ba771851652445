//! When an idle reactor spins and when it parks, and for how long: a pure decision from the
//! poll window, the recent idle gaps and the soonest wake-up a task asked for, fed the clock
//! readings the loop takes (it reads no clock itself).
//!
//! Adaptive polling: after work, spin for the poll window only while idle gaps are typically
//! shorter than the window (the next request is likely to arrive while we spin). At a steady
//! light load with longer gaps, spinning would only burn CPU: park at once instead.
//!
//! The loop reads the clock once per idle turn and once per wake-up, never in a turn that did
//! work: a request costs two reads, not one per loop turn. Work is dated by the last read
//! before it (the wake-up, or the last spin), which is when it arrived.

use std::time::{Duration, Instant};

/// What an idle loop turn does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IdleDecision {
    /// Spin: look for work again at once.
    Spin,
    /// Park until a completion or a wake-up, or `timeout_ns` (a task's timer) at most;
    /// `busy_ns` is the busy stretch that just ended (None when it was already counted).
    Park {
        busy_ns: Option<u64>,
        timeout_ns: Option<u64>,
    },
}

/// The spin-or-park state of one reactor.
#[derive(Debug)]
pub(crate) struct IdlePolicy {
    poll_idle: Duration,
    /// Average idle gap between bursts of work, weighted 1/4 to the newest.
    gap_ewma_ns: u64,
    /// Start of the current idle gap (the first idle turn after work).
    idle_since: Option<Instant>,
    /// The last clock reading.
    last_read: Instant,
    /// Start of the spin window: when the work ran out, or the last wake-up.
    idle_from: Instant,
    /// Some turn did work since the last idle turn.
    worked: bool,
    /// Start of the current busy stretch, not yet counted.
    busy_since: Option<Instant>,
}

impl IdlePolicy {
    pub(crate) fn new(poll_idle: Duration, now: Instant) -> Self {
        Self {
            poll_idle,
            gap_ewma_ns: 0,
            idle_since: None,
            last_read: now,
            idle_from: now,
            worked: false,
            busy_since: None,
        }
    }

    /// A loop turn did work (no clock read: it is dated by the last reading).
    #[inline]
    pub(crate) fn on_work(&mut self) {
        if let Some(t) = self.idle_since.take() {
            let gap = self.last_read.duration_since(t).as_nanos() as u64;
            self.gap_ewma_ns = (3 * self.gap_ewma_ns + gap) / 4;
        }
        self.worked = true;
        self.busy_since.get_or_insert(self.last_read);
    }

    /// A loop turn found nothing to do at `now`: spin on, or park. `task_wake_ns`: the soonest
    /// a task asked to be polled again by, from this turn. A wake-up due within the poll
    /// window spins (parking for less is not worth the system call); a later one bounds the
    /// park.
    #[inline]
    pub(crate) fn on_idle(&mut self, now: Instant, task_wake_ns: Option<u64>) -> IdleDecision {
        self.last_read = now;
        if std::mem::take(&mut self.worked) {
            self.idle_from = now; // the spin window starts when the work ran out
        }
        self.idle_since.get_or_insert(now);
        let spin = self.gap_ewma_ns < self.poll_idle.as_nanos() as u64;
        if spin && now.duration_since(self.idle_from) < self.poll_idle {
            return IdleDecision::Spin;
        }
        if task_wake_ns.is_some_and(|ns| ns < self.poll_idle.as_nanos() as u64) {
            return IdleDecision::Spin;
        }
        IdleDecision::Park {
            busy_ns: self
                .busy_since
                .take()
                .map(|since| now.duration_since(since).as_nanos() as u64),
            timeout_ns: task_wake_ns,
        }
    }

    /// The reactor parked at `parked_at` (the reading [`Self::on_idle`] decided on) and woke at
    /// `now`: the spin window starts again. Returns the time parked, in ns.
    #[inline]
    pub(crate) fn on_wake(&mut self, parked_at: Instant, now: Instant) -> u64 {
        // One clock read serves the idle time, the spin window and the gap (once per wake-up).
        self.last_read = now;
        self.idle_from = now;
        now.duration_since(parked_at).as_nanos() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_micros(50);

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn spins_through_the_window_after_work_then_parks() {
        let t0 = Instant::now();
        let mut p = IdlePolicy::new(WINDOW, t0);
        p.on_work();
        assert_eq!(p.on_idle(t0 + us(1), None), IdleDecision::Spin);
        assert_eq!(p.on_idle(t0 + us(50), None), IdleDecision::Spin);
        // The window counts from the first idle turn (t0 + 1 µs), not from the work.
        // The busy stretch ran from the work (dated t0, the last reading) to the park.
        assert_eq!(
            p.on_idle(t0 + us(52), None),
            IdleDecision::Park {
                busy_ns: Some(52_000),
                timeout_ns: None,
            }
        );
    }

    #[test]
    fn a_busy_stretch_is_counted_once_from_its_first_work() {
        let t0 = Instant::now();
        let mut p = IdlePolicy::new(WINDOW, t0);
        let wake = t0 + us(10);
        assert_eq!(p.on_wake(t0, wake), 10_000);
        p.on_work();
        p.on_work();
        assert_eq!(p.on_idle(wake + us(100), None), IdleDecision::Spin);
        assert_eq!(
            p.on_idle(wake + us(151), None),
            IdleDecision::Park {
                busy_ns: Some(151_000),
                timeout_ns: None,
            }
        );
        // Parked again without work in between: nothing more to count.
        assert_eq!(
            p.on_idle(wake + us(300), None),
            IdleDecision::Park {
                busy_ns: None,
                timeout_ns: None
            }
        );
    }

    #[test]
    fn long_idle_gaps_park_at_once_and_short_ones_spin_again() {
        let t0 = Instant::now();
        let mut p = IdlePolicy::new(WINDOW, t0);
        let mut now = t0;
        // A steady light load: work every 10 ms, parked in between.
        for _ in 0..8 {
            p.on_work();
            assert!(matches!(
                p.on_idle(now, None),
                IdleDecision::Spin | IdleDecision::Park { .. }
            ));
            now += Duration::from_millis(10);
            p.on_wake(now - Duration::from_millis(10), now);
        }
        p.on_work();
        // The gaps average far above the window: no spinning right after work.
        assert!(matches!(p.on_idle(now, None), IdleDecision::Park { .. }));
        // A burst of short gaps brings the average under the window: spinning again.
        for _ in 0..32 {
            now += us(2);
            p.on_wake(now - us(2), now);
            p.on_work();
            now += us(1);
            let _ = p.on_idle(now, None);
        }
        now += us(1);
        p.on_work();
        assert_eq!(p.on_idle(now, None), IdleDecision::Spin);
    }

    #[test]
    fn a_task_wake_up_bounds_the_park_or_keeps_the_reactor_spinning() {
        let t0 = Instant::now();
        let mut p = IdlePolicy::new(WINDOW, t0);
        // Past the spin window: a heartbeat due in 1 s bounds the park.
        assert_eq!(
            p.on_idle(t0 + us(100), Some(1_000_000_000)),
            IdleDecision::Park {
                busy_ns: None,
                timeout_ns: Some(1_000_000_000)
            }
        );
        // Due within the window (or overdue): spin rather than park for so short a time.
        assert_eq!(p.on_idle(t0 + us(200), Some(10_000)), IdleDecision::Spin);
        assert_eq!(p.on_idle(t0 + us(300), Some(0)), IdleDecision::Spin);
        // No timer asked for: park until something arrives.
        assert_eq!(
            p.on_idle(t0 + us(400), None),
            IdleDecision::Park {
                busy_ns: None,
                timeout_ns: None
            }
        );
    }
}

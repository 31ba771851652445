//! A reactor task the runtime can tell to end and learn the end of: [`Watched`] wraps a link
//! or serve task; its [`TaskControl`] asks it to stop (the task's own `stop`, as at daemon
//! shutdown: a Goodbye, and on a primary the failure path that marks what the replica may
//! lack) and says when the reactor dropped it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ringblock_engine::task::{ReactorTask, RingCompletion, TaskCtx};
use ringblock_engine::PortWaker;

/// Runs on the reactor thread when the task is dropped: keep it short.
pub(super) type OnExit = Box<dyn FnOnce() + Send>;

/// The runtime's side of one watched task.
pub(super) struct TaskControl {
    end: AtomicBool,
    waker: OnceLock<PortWaker>,
    exited: Mutex<bool>,
    cv: Condvar,
    on_exit: Mutex<Option<OnExit>>,
}

impl TaskControl {
    pub(super) fn new(on_exit: Option<OnExit>) -> TaskControl {
        TaskControl {
            end: AtomicBool::new(false),
            waker: OnceLock::new(),
            exited: Mutex::new(false),
            cv: Condvar::new(),
            on_exit: Mutex::new(on_exit),
        }
    }

    /// Ask the task to end (idempotent); its reactor is woken to see it.
    pub(super) fn request_end(&self) {
        self.end.store(true, Ordering::Release);
        match self.waker.get() {
            Some(PortWaker::Thread(t)) => t.unpark(),
            Some(PortWaker::Callback(f)) => f(),
            Some(PortWaker::None) | None => {}
        }
    }

    pub(super) fn exited(&self) -> bool {
        *self.exited.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait until the task is dropped, at most `timeout`. True when it was.
    pub(super) fn wait_exit(&self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        let mut exited = self.exited.lock().unwrap_or_else(|e| e.into_inner());
        while !*exited {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            exited = self
                .cv
                .wait_timeout(exited, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Ask the task to end and wait for it, at most `timeout`.
    pub(super) fn end_and_wait(&self, timeout: Duration) -> bool {
        self.request_end();
        self.wait_exit(timeout)
    }

    fn mark_exited(&self) {
        let on_exit = self
            .on_exit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(f) = on_exit {
            f();
        }
        *self.exited.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }
}

/// A task whose end the runtime can ask for and learn of.
pub(super) struct Watched<T: ReactorTask> {
    inner: T,
    control: std::sync::Arc<TaskControl>,
    stopped: bool,
}

impl<T: ReactorTask> Watched<T> {
    pub(super) fn new(inner: T, control: std::sync::Arc<TaskControl>) -> Watched<T> {
        Watched {
            inner,
            control,
            stopped: false,
        }
    }

    fn requested(&self) -> bool {
        !self.stopped && self.control.end.load(Ordering::Acquire)
    }
}

impl<T: ReactorTask> ReactorTask for Watched<T> {
    fn poll(&mut self, ctx: &mut TaskCtx<'_>) -> usize {
        if self.control.waker.get().is_none() {
            let _ = self.control.waker.set(ctx.port_waker());
        }
        let mut work = 0;
        if self.requested() {
            self.stopped = true;
            self.inner.stop(ctx);
            work += 1;
        }
        work + self.inner.poll(ctx)
    }

    fn on_ring(&mut self, ctx: &mut TaskCtx<'_>, c: RingCompletion) {
        self.inner.on_ring(ctx, c);
    }

    fn stop(&mut self, ctx: &mut TaskCtx<'_>) {
        if !self.stopped {
            self.stopped = true;
            self.inner.stop(ctx);
        }
    }

    fn has_ready(&self) -> bool {
        self.requested() || self.inner.has_ready()
    }

    fn finished(&self) -> bool {
        self.inner.finished()
    }
}

impl<T: ReactorTask> Drop for Watched<T> {
    fn drop(&mut self) {
        self.control.mark_exited();
    }
}

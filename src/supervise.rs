//! Supervision of the daemon's long-running tasks and threads: a task that ends or
//! panics outside shutdown is logged at error with its name, and from then on the
//! daemon reports itself unhealthy (`/readyz` 503 naming it, no systemd watchdog ping),
//! so that systemd restarts it instead of it limping on without, say, its scheduler.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::AbortHandle;

/// A part whose liveness the health check includes besides the tasks (the queue writer,
/// which every acknowledgement waits on). Kept a trait so that supervision is a leaf the
/// rest of the daemon reports to.
pub trait Heartbeat {
    /// Whether it answers; the check bounds how long it may take.
    fn answers(&self) -> impl Future<Output = bool> + Send;
}

/// Why the daemon is not healthy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unhealthy {
    #[error("task died: {}", .0.join(", "))]
    TaskDied(Vec<String>),
    #[error("queue writer not answering")]
    WriterSilent,
}

/// How a supervised task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Returned,
    Panicked,
    Cancelled,
}

impl Ending {
    fn as_str(self) -> &'static str {
        match self {
            Ending::Returned => "returned",
            Ending::Panicked => "panicked",
            Ending::Cancelled => "was cancelled",
        }
    }
}

struct Entry {
    name: String,
    done: watch::Receiver<bool>,
    abort: Option<AbortHandle>,
    /// Set when this task is meant to end (its feature was switched off by a reload).
    retired: Arc<AtomicBool>,
}

#[derive(Default)]
struct Inner {
    stopping: AtomicBool,
    dead: Mutex<Vec<String>>,
    entries: Mutex<Vec<Entry>>,
}

impl Inner {
    fn ended(&self, name: &str, how: Ending, retired: &AtomicBool) {
        if self.stopping.load(Ordering::Acquire) || retired.load(Ordering::Acquire) {
            tracing::debug!(task = name, how = how.as_str(), "task stopped");
            return;
        }
        tracing::error!(
            task = name,
            how = how.as_str(),
            "long-running task ended outside shutdown; the daemon reports itself unhealthy"
        );
        self.dead.lock().push(name.to_owned());
    }
}

/// Reports the end of the task it lives in when dropped: after the task's future
/// completed (`returned`), while unwinding from a panic, or when it was aborted.
struct Watch {
    name: String,
    inner: Arc<Inner>,
    retired: Arc<AtomicBool>,
    done: watch::Sender<bool>,
    /// Known when the task said how it ended; otherwise inferred at drop.
    how: Option<Ending>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let how = self.how.unwrap_or(if std::thread::panicking() {
            Ending::Panicked
        } else {
            Ending::Cancelled
        });
        self.inner.ended(&self.name, how, &self.retired);
        self.done.send_replace(true);
    }
}

/// Cheap to clone; every part that starts a long-running task holds one.
#[derive(Clone, Default)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

impl Supervisor {
    pub fn new() -> Supervisor {
        Supervisor::default()
    }

    fn register(&self, name: &str, abort: Option<AbortHandle>) -> Watch {
        let (done, rx) = watch::channel(false);
        let retired = Arc::new(AtomicBool::new(false));
        self.inner.entries.lock().push(Entry {
            name: name.to_owned(),
            done: rx,
            abort,
            retired: retired.clone(),
        });
        Watch {
            name: name.to_owned(),
            inner: self.inner.clone(),
            retired,
            done,
            how: None,
        }
    }

    /// Spawns `fut` on the runtime under supervision.
    pub fn spawn<F>(&self, name: &str, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (start, started) = tokio::sync::oneshot::channel::<Watch>();
        let handle = tokio::spawn(async move {
            // The watch lives in the task, so that a panic drops it while unwinding.
            let Ok(mut watch) = started.await else {
                return;
            };
            fut.await;
            watch.how = Some(Ending::Returned);
        });
        let watch = self.register(name, Some(handle.abort_handle()));
        // The task holds the receiver until it gets its watch; it cannot be gone yet.
        let _ = start.send(watch);
    }

    /// Supervises a thread: its end (return or panic) is noticed by a blocking waiter.
    pub fn watch_thread(&self, name: &str, handle: std::thread::JoinHandle<()>) {
        let watch = self.register(name, None);
        tokio::task::spawn_blocking(move || {
            let mut watch = watch;
            // `panicking()` is false on this waiter: say explicitly how the thread ended.
            watch.how = Some(match handle.join() {
                Ok(()) => Ending::Returned,
                Err(_) => Ending::Panicked,
            });
        });
    }

    /// From now on every task may end: shutdown has begun.
    pub fn stopping(&self) {
        self.inner.stopping.store(true, Ordering::Release);
    }

    /// Marks `name` as meant to end (a reload switched its feature off).
    pub fn retire(&self, name: &str) {
        let mut entries = self.inner.entries.lock();
        for e in entries.iter().filter(|e| e.name == name) {
            e.retired.store(true, Ordering::Release);
        }
        entries.retain(|e| e.name != name || !*e.done.borrow());
    }

    /// Waits up to `limit` for every task named `name` to end; false if one is still
    /// running.
    pub async fn join(&self, name: &str, limit: Duration) -> bool {
        let waits: Vec<watch::Receiver<bool>> = self
            .inner
            .entries
            .lock()
            .iter()
            .filter(|e| e.name == name)
            .map(|e| e.done.clone())
            .collect();
        let all = async {
            for mut done in waits {
                let _ = done.wait_for(|d| *d).await;
            }
        };
        tokio::time::timeout(limit, all).await.is_ok()
    }

    /// Aborts every task named `name`.
    pub fn abort(&self, name: &str) {
        for e in self.inner.entries.lock().iter() {
            if let (true, Some(a)) = (e.name == name, &e.abort) {
                a.abort();
            }
        }
    }

    /// Names of the tasks that ended outside shutdown, in the order they did.
    pub fn dead(&self) -> Vec<String> {
        self.inner.dead.lock().clone()
    }

    /// The daemon's health, as `/readyz` and the systemd watchdog see it: no supervised
    /// task has died, and `writer` (the queue writer) answers within `limit`.
    pub async fn check<H: Heartbeat>(&self, writer: &H, limit: Duration) -> Result<(), Unhealthy> {
        let dead = self.dead();
        if !dead.is_empty() {
            return Err(Unhealthy::TaskDied(dead));
        }
        match tokio::time::timeout(limit, writer.answers()).await {
            Ok(true) => Ok(()),
            _ => Err(Unhealthy::WriterSilent),
        }
    }
}

//! Shutdown signalling, after tokio's mini-redis: one sender, a receiver
//! per task, and `recv()` returns once shutdown has begun (also for a task
//! that subscribes late).

use tokio::sync::watch;

/// Held by the owner of the tasks; dropping it also signals shutdown.
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// Held by each task.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// Waits until shutdown has been triggered.
    pub async fn recv(&mut self) {
        // An error means the trigger was dropped, which also means "stop".
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

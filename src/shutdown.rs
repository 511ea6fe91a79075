//! One shutdown signal, broadcast to every task.
//!
//! The application holds the [`ShutdownTrigger`]; each long-running task (the servers' stopper,
//! the relay, the sweeper) holds a [`Shutdown`] and checks it at its await points, so that a
//! stop request reaches everyone, and each task drains in its own way before returning.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

/// Fires the shutdown; cheap to clone (the binary's signal handler and tests each hold one).
#[derive(Clone, Debug)]
pub struct ShutdownTrigger {
    sender: watch::Sender<bool>,
    fired: Arc<AtomicBool>,
}

/// A task's view of the shutdown signal.
#[derive(Clone, Debug)]
pub struct Shutdown {
    receiver: watch::Receiver<bool>,
    /// Set before the channel sends: what every webhook request checks. A load of it writes
    /// nothing, where a read of the channel takes its lock, which both HTTP workers wrote for
    /// every request (perf, README).
    fired: Arc<AtomicBool>,
}

/// A new, untriggered signal.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (sender, receiver) = watch::channel(false);
    let fired = Arc::new(AtomicBool::new(false));
    (
        ShutdownTrigger {
            sender,
            fired: fired.clone(),
        },
        Shutdown { receiver, fired },
    )
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.fired.store(true, Ordering::Release);
        self.sender.send_replace(true);
    }
}

impl Shutdown {
    pub fn is_triggered(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// Resolves once shutdown has been triggered (at once if it already was).
    pub async fn recv(&mut self) {
        // An error means every trigger is gone: nobody can stop us any more, so treat it as
        // a stop too rather than waiting forever.
        let _ = self.receiver.wait_for(|stop| *stop).await;
    }
}

/// Waits for SIGTERM or SIGINT (Ctrl-C).
pub async fn os_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

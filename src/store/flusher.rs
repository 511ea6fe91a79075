//! Group commit: one thread makes the store durable for everyone who is waiting.
//!
//! Writers commit to sled's memory, note the sequence number they wrote, nudge this thread and
//! wait on a watch channel until the durable watermark passes their number. The thread takes
//! the highest committed number, calls `flush()` once, then `fdatasync`s sled's log file through
//! a handle of its own (sled's `flush` on Linux is `sync_file_range`, which neither empties the
//! device cache nor records the file's size), and publishes the new watermark: every writer
//! whose number is at or below it wakes with one fsync shared among them all.
//!
//! One thread, not `flush_async` from each request: `flush_async` from seven or more tasks at
//! once hangs on sled 0.34.7 (sled issue #1308).

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// What the flusher has made durable so far; writers wait on changes of this.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Durability {
    /// Every sequence number at or below this is on disk.
    pub durable: u64,
    /// The last failed flush: it covered numbers up to `.0` and failed with `.1`.
    pub failed: Option<(u64, Arc<str>)>,
}

/// A message to the flusher thread.
pub(super) enum Nudge {
    /// Something new was committed.
    Flush,
    /// Flush what is left and exit.
    Stop,
}

/// State shared between writers and the flusher.
pub(super) struct Shared {
    pub db: sled::Db,
    /// The sled log file, opened by us so that we can `fdatasync` it.
    pub log_file: File,
    /// Highest sequence number whose transaction has completed.
    pub committed: AtomicU64,
    /// False after a failed flush, true again after the next good one.
    pub writable: AtomicBool,
    pub durability: watch::Sender<Durability>,
    /// Duration of the last flush batch, in microseconds (for the metrics).
    pub last_batch_micros: AtomicU64,
}

/// The flusher's loop; returns after a `Stop`, once everything committed is durable.
pub(super) fn run(shared: Arc<Shared>, nudges: Receiver<Nudge>) {
    loop {
        let stop = match nudges.recv_timeout(Duration::from_millis(200)) {
            Ok(Nudge::Flush) => false,
            Ok(Nudge::Stop) | Err(RecvTimeoutError::Disconnected) => true,
            // A quiet period: retry a failed batch so that the store recovers on its own.
            Err(RecvTimeoutError::Timeout) => false,
        };
        flush_until_caught_up(&shared);
        if stop {
            return;
        }
    }
}

fn flush_until_caught_up(shared: &Shared) {
    loop {
        let target = shared.committed.load(Ordering::Acquire);
        let current = shared.durability.borrow().clone();
        if target <= current.durable && current.failed.is_none() {
            return;
        }
        let started = Instant::now();
        let result = shared
            .db
            .flush()
            .map_err(|e| e.to_string())
            .and_then(|_| shared.log_file.sync_data().map_err(|e| e.to_string()));
        shared
            .last_batch_micros
            .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        match result {
            Ok(()) => {
                shared.writable.store(true, Ordering::Release);
                shared.durability.send_modify(|d| {
                    d.durable = target;
                    d.failed = None;
                });
            }
            Err(reason) => {
                tracing::error!(%reason, "store flush failed; answering 503 until it succeeds");
                shared.writable.store(false, Ordering::Release);
                shared
                    .durability
                    .send_modify(|d| d.failed = Some((target, Arc::from(reason.as_str()))));
                // Let the disk recover; the loop retries on the next nudge or timeout.
                std::thread::sleep(Duration::from_millis(100));
                return;
            }
        }
    }
}

//! Group commit: one thread writes and makes durable everything that is waiting.
//!
//! Requests hand their record to this thread and wait for the answer. The thread takes
//! whatever has queued up (up to [`MAX_BATCH`]), writes the whole batch in **one sled
//! transaction** (dedup check, dedup key, time index, outbox record for each event), calls
//! sled's `flush()` once, then syncs what sled wrote (sled's `flush` on Linux is
//! `sync_file_range`, and sled never syncs its blob files or any directory: see
//! [`disk`](super::disk) for what a sync covers), and only then answers the whole batch.
//! While it syncs, the next batch gathers: the busier the service, the more requests share one sync.
//!
//! **A failed write or sync retires the database.** After a failed sync the kernel may have
//! dropped what it could not write while still returning it to reads, so nothing more is
//! answered from that database, not even a duplicate: it is taken out of service at once
//! (readers get `Unwritable`, so 503), and the next job reopens it from what the disk holds,
//! which counts as durable only once the sync after that open succeeds.
//!
//! Writing and syncing are not overlapped on purpose: measured here, a second thread syncing
//! while the writer wrote halved the throughput (sled's flush and concurrent writes slow each
//! other down, and the batches shrink). Overlapping one batch's body-log sync with the sled
//! sync of the batch before would not pay either: this VM's disk serves two `fdatasync`s of
//! different files at once in 74–96 % of the time it takes for them in turn
//! (`benches/sync-overlap.py`): 0.06–0.4 ms of the ≈ 3 ms a batch of 41 costs, for a second
//! thread and a second batch in flight.
//!
//! One writer thread, not a lock and `flush_async` per request: the HTTP workers never block
//! on sled, sequence numbers are assigned in commit order without a lock, and
//! `flush_async` from seven or more tasks at once hangs on sled 0.34.7 (sled issue #1308).

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

mod commit;
mod put_back;

use commit::commit;
use put_back::put_back;

use super::database::{open_database, Database, Slot};
use super::error::StoreError;
use super::record::OutboxRecord;

/// Most requests written in one transaction and covered by one fsync.
const MAX_BATCH: usize = 1024;

/// How a new event was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// First time this key was seen: the event is durably in the outbox.
    New,
    /// The key was seen before (within retention); nothing was written.
    Duplicate,
}

/// What putting one archived event back did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redelivery {
    /// Back in the outbox under this sequence number, durable.
    Queued(u64),
    /// Still in the outbox: it will be published anyway.
    Pending,
    /// Neither in the outbox nor in the archive (swept, or never stored).
    Missing,
}

/// Where an event put back into the outbox comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shelf {
    /// Published and kept for `archive_retention`.
    Archive,
    /// Set aside by the relay, which could not publish it.
    Quarantine,
}

/// A message to the writer thread.
enum Job {
    Accept {
        record: Box<OutboxRecord>,
        reply: oneshot::Sender<Result<Stored, StoreError>>,
    },
    /// Put archived or quarantined events back into the outbox (redeliver, redrive).
    Redeliver {
        seqs: Vec<u64>,
        from: Shelf,
        reply: oneshot::Sender<Result<Vec<Redelivery>, StoreError>>,
    },
    /// Reopen the database if a disk error left it unwritable.
    Recover,
    /// Answer what is queued, flush, and exit.
    Stop,
}

/// The writer thread, reached only through this handle. Stopping it (or dropping the handle)
/// answers what is queued, makes it durable and joins the thread.
pub struct Writer {
    jobs: mpsc::Sender<Job>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Asks the writer to reopen an unwritable database; held by the maintenance thread.
#[derive(Clone)]
pub struct RecoverRequest(mpsc::Sender<Job>);

impl RecoverRequest {
    /// Cheap and never blocks: a full queue means the writer is busy and will try anyway.
    pub fn send(&self) {
        let _ = self.0.try_send(Job::Recover);
    }
}

impl Writer {
    pub fn start(slot: Arc<Slot>) -> Result<Self, StoreError> {
        let (jobs, queue) = mpsc::channel(4 * MAX_BATCH);
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run(slot, queue))
            .map_err(|e| StoreError::Unwritable(format!("cannot start the writer: {e}")))?;
        Ok(Self {
            jobs,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Stores `record` under its dedup key, once, and returns when that is durable.
    pub async fn accept(&self, record: OutboxRecord) -> Result<Stored, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Accept {
            record: Box::new(record),
            reply,
        })
        .await?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Puts archived or quarantined events back into the outbox, durably; one outcome per
    /// sequence number.
    pub async fn redeliver(
        &self,
        seqs: Vec<u64>,
        from: Shelf,
    ) -> Result<Vec<Redelivery>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Redeliver { seqs, from, reply }).await?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    pub fn recover_request(&self) -> RecoverRequest {
        RecoverRequest(self.jobs.clone())
    }

    async fn send(&self, job: Job) -> Result<(), StoreError> {
        self.jobs.send(job).await.map_err(|_| StoreError::Closed)
    }

    /// Answers what is queued, makes everything durable and joins the thread; later calls
    /// get [`StoreError::Closed`].
    pub fn stop(&self) {
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            // A full queue drains within a batch or two: keep offering the stop until it fits.
            while let Err(mpsc::error::TrySendError::Full(_)) = self.jobs.try_send(Job::Stop) {
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = thread.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}

type Reply = oneshot::Sender<Result<Stored, StoreError>>;
type RedeliverReply = oneshot::Sender<Result<Vec<Redelivery>, StoreError>>;

/// Reopening after a disk error is tried at most this often.
const REOPEN_PAUSE: Duration = Duration::from_secs(1);
/// How long a reopening waits for readers to let go of the old database.
const REOPEN_WAIT: Duration = Duration::from_secs(5);

/// The writer's loop; returns after a `Stop` or when every sender is gone.
fn run(slot: Arc<Slot>, mut jobs: mpsc::Receiver<Job>) {
    let mut batch: Vec<(OutboxRecord, Reply)> = Vec::with_capacity(MAX_BATCH);
    let mut redeliveries: Vec<(Vec<u64>, Shelf, RedeliverReply)> = Vec::new();
    let mut last_reopen: Option<Instant> = None;
    loop {
        let mut stop = false;
        let mut recover = false;
        let mut next = jobs.blocking_recv();
        loop {
            match next {
                None | Some(Job::Stop) => stop = true,
                Some(Job::Accept { record, reply }) => batch.push((*record, reply)),
                Some(Job::Redeliver { seqs, from, reply }) => {
                    redeliveries.push((seqs, from, reply))
                }
                Some(Job::Recover) => recover = true,
            }
            if stop || batch.len() + redeliveries.len() >= MAX_BATCH {
                break;
            }
            match jobs.try_recv() {
                Ok(job) => next = Some(job),
                Err(_) => break,
            }
        }
        // sled fails every operation after an I/O error, even once space is back: an
        // unwritable store is reopened (at most once per pause) before it writes again.
        let has_work = recover || !batch.is_empty() || !redeliveries.is_empty();
        if has_work
            && !slot.is_writable()
            && last_reopen.is_none_or(|t| t.elapsed() >= REOPEN_PAUSE)
        {
            last_reopen = Some(Instant::now());
            match reopen(&slot) {
                Ok(()) => tracing::warn!("store reopened after a disk error; writes resume"),
                Err(e) => tracing::warn!(error = %e, "store still unwritable; will try again"),
            }
        }
        match slot.database() {
            Ok(database) => write_batch(&slot, &database, &mut batch, &mut redeliveries),
            Err(e) => {
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(StoreError::Unwritable(e.to_string())));
                }
                for (_, _, reply) in redeliveries.drain(..) {
                    let _ = reply.send(Err(StoreError::Unwritable(e.to_string())));
                }
            }
        }
        if stop {
            jobs.close();
            while let Ok(job) = jobs.try_recv() {
                match job {
                    Job::Accept { reply, .. } => {
                        let _ = reply.send(Err(StoreError::Closed));
                    }
                    Job::Redeliver { reply, .. } => {
                        let _ = reply.send(Err(StoreError::Closed));
                    }
                    Job::Recover | Job::Stop => {}
                }
            }
            if let Ok(database) = slot.database() {
                let _ = flush(&slot, &database);
            }
            return;
        }
    }
}

/// Commits, syncs and answers one batch.
fn write_batch(
    slot: &Slot,
    database: &Database,
    batch: &mut Vec<(OutboxRecord, Reply)>,
    redeliveries: &mut Vec<(Vec<u64>, Shelf, RedeliverReply)>,
) {
    let outcomes = commit(slot, database, batch);
    // After the new events, so their sequence numbers stay in commit order.
    let redelivered: Vec<_> = redeliveries
        .iter()
        .map(|(seqs, from, _)| put_back(slot, database, seqs, *from))
        .collect();
    let newest_redelivered = redelivered
        .iter()
        .flat_map(|r| r.iter().flatten())
        .filter_map(|r| match r {
            Redelivery::Queued(seq) => Some(*seq),
            _ => None,
        })
        .max();
    let write_failed = outcomes
        .iter()
        .any(|o| matches!(o, Err(StoreError::Unwritable(_))))
        || redelivered
            .iter()
            .any(|r| matches!(r, Err(StoreError::Unwritable(_))));
    let newest = outcomes
        .iter()
        .filter_map(|o| match o {
            Ok((Stored::New, seq)) => Some(*seq),
            _ => None,
        })
        .chain(newest_redelivered)
        .max();
    // A batch of duplicates needs no sync: every original it found in this database was
    // synced before its own answer (or at the open), since a failed sync retires the database.
    let failure = if write_failed {
        slot.retire();
        Some("a write to the store failed".to_string())
    } else if newest.is_some() {
        flush(slot, database).err()
    } else {
        None
    };
    if let (None, Some(newest)) = (&failure, newest) {
        slot.durable.send_replace(newest);
    }
    for ((_, reply), outcome) in batch.drain(..).zip(outcomes) {
        let answer = match (&failure, outcome) {
            (Some(reason), Ok(_)) => Err(StoreError::Unwritable(reason.clone())),
            (_, outcome) => outcome.map(|(stored, _)| stored),
        };
        let _ = reply.send(answer);
    }
    for ((_, _, reply), outcome) in redeliveries.drain(..).zip(redelivered) {
        let answer = match (&failure, outcome) {
            (Some(reason), Ok(_)) => Err(StoreError::Unwritable(reason.clone())),
            (_, outcome) => outcome,
        };
        let _ = reply.send(answer);
    }
}

/// Closes the failed database and opens it again. Readers get `Unwritable` meanwhile; the old
/// database is dropped only once no reader holds it, because sled's file lock is released only
/// when its last handle goes. What the reopened database recovers from disk is durable.
fn reopen(slot: &Slot) -> Result<(), StoreError> {
    let current = slot
        .current
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let old = current.or_else(|| {
        slot.retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    });
    if let Some(old) = old {
        let deadline = Instant::now() + REOPEN_WAIT;
        while Arc::strong_count(&old) > 1 {
            if Instant::now() >= deadline {
                // Still failed: it goes back to retirement, never into service.
                *slot.retired.lock().unwrap_or_else(|p| p.into_inner()) = Some(old);
                return Err(StoreError::Unwritable(
                    "the old database is still in use".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(old);
    }
    // Synced inside: what it recovered is on disk before it counts as durable.
    let (database, counts) = open_database(&slot.options)?;
    let recovered = database.db.generate_id()?;
    slot.durable.send_if_modified(|durable| {
        let raise = recovered > *durable;
        if raise {
            *durable = recovered;
        }
        raise
    });
    slot.install(database, counts);
    Ok(())
}

/// Makes the batch just written durable; on failure the database is retired, because the
/// kernel may already have dropped what it failed to write.
fn flush(slot: &Slot, database: &Database) -> Result<(), String> {
    let result = database.make_durable();
    if let Err(reason) = &result {
        tracing::error!(%reason, "store sync failed; answering 503 until the database is reopened");
        slot.retire();
    }
    result
}

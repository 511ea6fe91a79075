//! Group commit: one thread makes durable everything that is waiting, a second indexes it.
//!
//! Requests hand their record to the **writer** thread and wait for the answer. It takes
//! whatever has queued up (up to [`MAX_BATCH`]), sorts out the duplicates, appends the new
//! events' records to the body log in one write, `fdatasync`s it, and answers the whole batch:
//! a 2xx rests on that sync. While it syncs, the next batch gathers: the busier the service,
//! the more requests share one sync.
//!
//! The **index** thread ([`indexer`]) then writes what sled holds for those events (dedup
//! keys, the outbox's references, the time index; then the mark and its totals as one value)
//! once per cycle, and syncs sled only every [`indexer::SYNC_INTERVAL`] or when an answer waits on it:
//! what a power cut takes from sled, the next open writes again from the body log (see
//! [`index`](super::index)). Until an event is indexed its keys stay in the slot's
//! `unindexed` map, which the writer's "seen before?" reads too, and the relay does not see it
//! (the durability mark moves once sled has it). Taking sled's transaction and syncs off the
//! answer's path was measured on the 2-core VM in the README's performance section. An
//! earlier second thread that synced sled while the writer wrote had halved the throughput:
//! there every answer still waited for sled's sync, and the two slowed each other; here no
//! answer waits for sled, and sled is synced every 200 ms rather than every batch.
//!
//! **A failed write or sync retires the database.** After a failed sync the kernel may have
//! dropped what it could not write while still returning it to reads, so nothing more is
//! answered from that database, not even a duplicate: it is taken out of service at once
//! (readers get `Unwritable`, so 503), and the next job reopens it from what the disk holds,
//! which counts as durable only once the sync after that open succeeds.
//!
//! Redeliveries go through both threads too: the writer draws their sequence numbers in
//! commit order, the index thread moves the events and syncs sled before answering, so the
//! outbox fills in sequence order and the relay can read it as a log.
//!
//! One writer thread, not a lock and `flush_async` per request: the HTTP workers never block
//! on sled, sequence numbers are assigned in commit order without a lock, and
//! `flush_async` from seven or more tasks at once hangs on sled 0.34.7 (sled issue #1308).

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

mod commit;
mod indexer;
mod put_back;

use commit::commit;
use indexer::{IndexJob, Indexer};

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
pub(super) type RedeliverReply = oneshot::Sender<Result<Vec<Redelivery>, StoreError>>;

/// Reopening after a disk error is tried at most this often.
const REOPEN_PAUSE: Duration = Duration::from_secs(1);
/// How long a reopening waits for readers to let go of the old database.
const REOPEN_WAIT: Duration = Duration::from_secs(5);

/// The writer's loop; returns after a `Stop` or when every sender is gone, once the index
/// thread has indexed and synced everything.
fn run(slot: Arc<Slot>, mut jobs: mpsc::Receiver<Job>) {
    let indexer = match Indexer::start(slot.clone()) {
        Ok(indexer) => indexer,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the store's index thread");
            slot.retire();
            return;
        }
    };
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
            Ok(database) => write_batch(&slot, &database, &indexer, &mut batch, &mut redeliveries),
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
            // Indexes what is queued and syncs sled before it returns.
            indexer.stop();
            return;
        }
    }
}

/// Commits, syncs and answers one batch of new events, then hands them to the index thread;
/// hands the redeliveries on with their new sequence numbers, drawn after the new events' so
/// that numbers stay in commit order.
fn write_batch(
    slot: &Slot,
    database: &Arc<Database>,
    indexer: &Indexer,
    batch: &mut Vec<(OutboxRecord, Reply)>,
    redeliveries: &mut Vec<(Vec<u64>, Shelf, RedeliverReply)>,
) {
    let (outcomes, committed) = commit(slot, database, batch);
    let failed = outcomes
        .iter()
        .any(|o| matches!(o, Err(StoreError::Unwritable(_))));
    if failed {
        // A read or the body log's write or sync failed: what it wrote may be gone while reads
        // still return it (see `disk`). Nothing more is answered from this database, not even
        // a duplicate; what did reach the log is indexed again by the reopening.
        tracing::error!("store write failed; answering 503 until the database is reopened");
        slot.retire();
    }
    for ((_, reply), outcome) in batch.drain(..).zip(outcomes) {
        let answer = match outcome {
            Ok(_) if failed => Err(StoreError::Unwritable("a write to the store failed".into())),
            outcome => outcome.map(|(stored, _)| stored),
        };
        let _ = reply.send(answer);
    }
    if !committed.is_empty() {
        indexer.send(IndexJob::Batch {
            database: Arc::downgrade(database),
            events: committed,
        });
    }
    for (seqs, from, reply) in redeliveries.drain(..) {
        if !slot.is_writable() {
            let _ = reply.send(Err(StoreError::Unwritable(
                "a write to the store failed".into(),
            )));
            continue;
        }
        // Numbers are drawn here, in commit order; unused ones are only gaps.
        let fresh = seqs
            .iter()
            .map(|_| database.db.generate_id())
            .collect::<Result<Vec<u64>, _>>();
        match fresh {
            Ok(fresh) => indexer.send(IndexJob::Redeliver {
                database: Arc::downgrade(database),
                seqs,
                fresh,
                from,
                reply,
            }),
            Err(e) => {
                slot.retire();
                let _ = reply.send(Err(StoreError::Unwritable(e.to_string())));
            }
        }
    }
}

/// Closes the failed database and opens it again. Readers get `Unwritable` meanwhile; the old
/// database is dropped only once no reader holds it, because sled's file lock is released only
/// when its last handle goes. What the reopened database recovers from disk is durable.
fn reopen(slot: &Slot) -> Result<(), StoreError> {
    let current = slot.current.swap(None);
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
    slot.raise_durable(recovered);
    slot.install(database, counts);
    Ok(())
}

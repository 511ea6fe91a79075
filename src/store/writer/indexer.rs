//! The index thread: writes into sled what the writer made durable in the body log, in commit
//! order, and syncs sled lazily (see [`index`](crate::store::index) for why that is safe).

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::put_back::put_back;
use super::{RedeliverReply, Redelivery, Shelf};
use crate::store::database::{Database, Slot};
use crate::store::error::StoreError;
use crate::store::index::{self, IndexEntry};

/// sled is synced at least this often while it has unsynced index entries (and before any
/// answer that rests on sled itself, a redelivery's): it bounds what an open may have to
/// replay, and keeps sled's syncs from queueing behind every body-log sync on one disk.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(200);

/// How long the thread lets new-event batches gather after the first one: one pass (and one
/// write of the mark) for several batches costs less CPU than one each, and on two cores that
/// CPU is the HTTP workers' and the writer's. The relay sees an event this much later at most.
const GATHER: Duration = Duration::from_millis(5);

/// Batches the writer may hand over before it waits for this thread: enough for one
/// pass to take several of them when sled falls behind, few enough that the map of
/// unindexed keys stays small.
const QUEUE: usize = 16;

pub enum IndexJob {
    /// New events, durable in the body log and answered.
    Batch {
        database: Weak<Database>,
        events: Vec<IndexEntry>,
    },
    /// Events put back into the outbox under `fresh` numbers, answered once sled is synced.
    Redeliver {
        database: Weak<Database>,
        seqs: Vec<u64>,
        fresh: Vec<u64>,
        from: Shelf,
        reply: RedeliverReply,
    },
}

/// The index thread, owned by the writer thread.
pub struct Indexer {
    jobs: Mutex<Option<SyncSender<IndexJob>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Indexer {
    pub fn start(slot: Arc<Slot>) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::sync_channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name("store-index".into())
            .spawn(move || run(slot, queue))?;
        Ok(Self {
            jobs: Mutex::new(Some(jobs)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues a job, waiting while the queue is full: sled falling behind slows the writer
    /// rather than growing memory.
    pub fn send(&self, job: IndexJob) {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(jobs) = &*jobs {
            // The thread only exits once this sender is gone.
            let _ = jobs.send(job);
        }
    }

    /// Indexes what is queued, syncs sled and joins the thread.
    pub fn stop(&self) {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for Indexer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(slot: Arc<Slot>, queue: Receiver<IndexJob>) {
    let mut unsynced = false;
    let mut last_sync = Instant::now();
    loop {
        let first = match queue.recv_timeout(SYNC_INTERVAL) {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) => {
                if unsynced {
                    sync(&slot);
                    unsynced = false;
                    last_sync = Instant::now();
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => {
                // Stopping: everything sled holds is synced, the relay's archive moves too.
                sync(&slot);
                return;
            }
        };
        if matches!(first, IndexJob::Batch { .. }) {
            std::thread::sleep(GATHER);
        }
        let jobs: Vec<IndexJob> = std::iter::once(first)
            .chain(std::iter::from_fn(|| queue.try_recv().ok()).take(QUEUE))
            .collect();
        let mut cycle = Cycle::default();
        for job in jobs {
            cycle.take(&slot, job);
        }
        cycle.index_batches(&slot);
        let must_sync = !cycle.redeliveries.is_empty();
        unsynced |= cycle.applied.is_some();
        let sync_failed = if must_sync || (unsynced && last_sync.elapsed() >= SYNC_INTERVAL) {
            last_sync = Instant::now();
            unsynced = false;
            !sync(&slot)
        } else {
            false
        };
        cycle.finish(&slot, sync_failed);
    }
}

/// One pass over what was queued, in order.
#[derive(Default)]
struct Cycle {
    /// Consecutive new-event batches for the same database, indexed in one pass.
    batches: Vec<Vec<IndexEntry>>,
    database: Option<Arc<Database>>,
    /// Keys and highest number of what was indexed.
    indexed_keys: Vec<String>,
    applied: Option<u64>,
    redeliveries: Vec<(RedeliverReply, Result<Vec<Redelivery>, StoreError>)>,
}

impl Cycle {
    fn take(&mut self, slot: &Slot, job: IndexJob) {
        match job {
            IndexJob::Batch { database, events } => {
                // A database retired or replaced since: the reopening replays these events
                // from the body log, and cleared their keys from the unindexed map.
                let Some(database) = in_service(slot, &database) else {
                    return;
                };
                if self
                    .database
                    .as_ref()
                    .is_some_and(|d| !Arc::ptr_eq(d, &database))
                {
                    self.index_batches(slot);
                }
                self.database = Some(database);
                self.batches.push(events);
            }
            IndexJob::Redeliver {
                database,
                seqs,
                fresh,
                from,
                reply,
            } => {
                // In order: the new events queued before it first.
                self.index_batches(slot);
                let outcome = match in_service(slot, &database) {
                    Some(database) => {
                        let outcome = put_back(slot, &database, &seqs, &fresh, from);
                        if matches!(outcome, Err(StoreError::Unwritable(_))) {
                            slot.retire();
                        } else if let Some(last) = fresh.last() {
                            self.applied = self.applied.max(Some(*last));
                        }
                        outcome
                    }
                    None => Err(StoreError::Unwritable(
                        "the database is being reopened after a disk error".into(),
                    )),
                };
                self.redeliveries.push((reply, outcome));
            }
        }
    }

    /// The new events gathered so far, in one pass.
    fn index_batches(&mut self, slot: &Slot) {
        let batches = std::mem::take(&mut self.batches);
        let Some(database) = self.database.take() else {
            return;
        };
        if let Err(reason) = index::apply(&database, &batches) {
            // Answered already and durable in the body log: the reopening indexes them.
            tracing::error!(%reason, "indexing in sled failed; answering 503 until the database is reopened");
            slot.retire();
            return;
        }
        let events = batches.into_iter().flatten();
        for event in events {
            self.applied = self.applied.max(Some(event.seq));
            self.indexed_keys.extend(event.keys);
        }
    }

    /// Moves the durability mark, lets go of the indexed keys and answers redeliveries.
    fn finish(self, slot: &Slot, sync_failed: bool) {
        if let (Some(applied), false) = (self.applied, sync_failed || !slot.is_writable()) {
            slot.raise_durable(applied);
        }
        if !self.indexed_keys.is_empty() {
            let mut unindexed = slot.unindexed.lock().unwrap_or_else(|p| p.into_inner());
            for key in &self.indexed_keys {
                unindexed.remove(key);
            }
        }
        for (reply, outcome) in self.redeliveries {
            let answer = match outcome {
                Ok(_) if sync_failed => {
                    Err(StoreError::Unwritable("the store's sync failed".into()))
                }
                outcome => outcome,
            };
            let _ = reply.send(answer);
        }
    }
}

/// The database a job was written for, if it is still the one in service.
fn in_service(slot: &Slot, database: &Weak<Database>) -> Option<Arc<Database>> {
    let database = database.upgrade()?;
    let current = slot.database().ok()?;
    Arc::ptr_eq(&database, &current).then_some(database)
}

/// Makes what sled wrote durable; on failure the database is retired, because the kernel may
/// already have dropped what it failed to write. Returns whether it succeeded.
fn sync(slot: &Slot) -> bool {
    let Ok(database) = slot.database() else {
        return false;
    };
    match database.make_durable() {
        Ok(()) => true,
        Err(reason) => {
            tracing::error!(%reason, "store sync failed; answering 503 until the database is reopened");
            slot.retire();
            false
        }
    }
}

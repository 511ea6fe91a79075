//! The durable heart of the receiver: the body log, the dedup index, and sled for the outbox.
//!
//! The [`dedup_index`] answers "seen before?" for new events' keys: a bounded map in memory
//! and immutable sorted files under `<data_dir>/dedup-index/`, its journal being the body log
//! (see there). sled's trees:
//! - `dedup`: dedup key → (receive time, outbox sequence number), for keys stored before the
//!   dedup index existed and keys a redelivery moved to the event's new number. Read before
//!   the dedup index while it may hold anything.
//! - `dedup_by_time`: (newest receive time ‖ first sequence number) of a batch written before
//!   the dedup index → the keys it wrote; the sweeper expires those keys by range scan.
//! - `meta`: the counts of outbox records, dedup keys and archived events, so that a start
//!   never has to scan a million entries (a scan measured 170 MB of extra peak memory with 1M
//!   events waiting). Each count is kept in parts: the rare moves' part in the same
//!   transactions as the writes they count, the index thread's in its mark's value, the
//!   archive moves' in a record written before each move (see [`codec`]).
//! - `outbox`: the pending events, read in order by the relay (see [`outbox`]): new events
//!   as runs, one entry per index pass holding each event's sequence number and a reference to
//!   its [`OutboxRecord`] in the [`bodies`] log; redelivered events (and those of databases
//!   written before runs) under their own sequence number (big-endian), with the record itself
//!   or a reference.
//! - `archive`: sequence number → published event, kept for `archive_retention` for the admin
//!   API. A confirmed event moves here under the same sequence number.
//! - `quarantine`: sequence number → an outbox record the relay could not publish (it does not
//!   decode, or the broker refused it for good), byte for byte with the reason, until an
//!   operator puts it back; everything behind it is published meanwhile.
//!
//! The modules, leaves first: [`codec`] (keys and values on disk), [`record`] and [`bodies`]
//! (the records' own segment files), [`dedup_index`], [`outbox`] (the outbox tree's runs and
//! singles as one ordered list), `trees` (sled's trees, the body log and
//! the dedup index as one value),
//! [`index`] (what sled holds for a committed event, and the replay at open) and
//! `archive_moves` (an archive move's writes, and finishing one at open); `database`
//! (the open, and the slot that outlives a reopening); then the three that use them
//! and never each other's internals: the [`writer`] thread, the `maintenance` thread and
//! functions, and the read-side `queries`. [`Store`] is the handle over all of them.
//!
//! Who writes what:
//! - **Everything that must be durable before it is answered goes through the writer**: new
//!   events (their records appended to the body log and synced, then answered) and
//!   redeliveries. It commits whatever is waiting as one batch with one sync: a 2xx never
//!   stands on memory alone. It assigns sequence numbers in commit order, so the relay can read
//!   the outbox as a log, and it alone reopens the database after a disk error.
//! - **sled and the dedup index are indexes over the body log, written by the writer's index
//!   thread** after the answer: the dedup keys into the dedup index's map, the outbox's
//!   references into sled as one plain insert per run, then sled's mark of what is indexed and its totals
//!   as **one value**, no sled transaction, synced lazily. Every open indexes again what a power
//!   cut took from either, each from its own mark (see [`index`]). A key or a reference is
//!   written only after its record is synced, so there is never a dedup key without its event.
//!   Putting the dedup keys in sled cost more than a third of ingest's throughput (README,
//!   performance, "2026-12-05, late night").
//! - **Housekeeping goes through `maintenance`, unsynced on purpose**: moving confirmed
//!   events to the archive (plain writes after a record of the move, finished by the next open
//!   if a power cut interrupted it) and unpublishable ones to the quarantine (called by the
//!   relay), and sweeping what outlived its retention (the store's own maintenance thread).
//!
//! A duplicate whose original is already durable is answered without the writer.

mod archive_moves;
mod bodies;
mod codec;
mod database;
mod dedup_index;
mod disk;
mod error;
mod index;
mod maintenance;
pub mod options;
mod outbox;
mod queries;
mod record;
mod trees;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

pub use codec::unix_millis;
pub use error::StoreError;
pub use maintenance::Confirmed;
pub use options::StoreOptions;
pub use queries::{
    EventPage, EventQuery, EventStatus, EventView, OutboxEntry, OutboxRead, QuarantinedView,
    StoreStats, Unreadable,
};
pub use record::{dedup_keys, delivery_dedup_key, OutboxRecord, RecordError};
pub use writer::{Redelivery, Shelf, Stored};

use database::Slot;
use maintenance::Maintenance;
use writer::Writer;

/// Handle to the store; cheap to clone. The last handle to go stops the store's threads.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    slot: Arc<Slot>,
    // Stopped in field order when the last handle goes: maintenance first (no sweep while
    // closing), then the writer (which answers what is queued and syncs).
    maintenance: Maintenance,
    writer: Writer,
    /// Never sent on: dropped with the last handle, after the threads stopped, which is what
    /// [`Store::released`] waits for.
    release: watch::Sender<()>,
    /// Held while the store is open, across reopenings (see [`database::lock_data_dir`]).
    _lock: std::fs::File,
}

impl Store {
    /// Opens (or creates) the database and starts the writer and maintenance threads; fails
    /// with [`StoreError::Locked`] if another process has the data directory open.
    pub fn open(options: &StoreOptions) -> Result<Self, StoreError> {
        let lock = database::lock_data_dir(&options.data_dir)?;
        let slot = Arc::new(Slot::open(options)?);
        let writer = Writer::start(slot.clone())?;
        let maintenance = Maintenance::start(slot.clone(), writer.recover_request())?;
        Ok(Self {
            inner: Arc::new(Inner {
                slot,
                maintenance,
                writer,
                release: watch::channel(()).0,
                _lock: lock,
            }),
        })
    }

    /// True if one of `keys` (see [`dedup_keys`]) was stored before and that write is already
    /// on disk.
    pub fn is_durable_duplicate(&self, keys: &[&str]) -> Result<bool, StoreError> {
        queries::is_durable_duplicate(&self.inner.slot, keys)
    }

    /// Stores `record` under its dedup keys, once, and returns when that is durable.
    ///
    /// The writer finds duplicates itself; a caller that expects many (the ingress) asks
    /// [`is_durable_duplicate`](Self::is_durable_duplicate) first, so that a retry is answered
    /// without queueing behind a batch. Asking here too cost every new event two more sled
    /// lookups on the HTTP workers, which the CPU-bound ingest measured (README, performance).
    pub async fn accept(&self, record: OutboxRecord) -> Result<Stored, StoreError> {
        self.inner.writer.accept(record).await
    }

    /// Resolves once sled indexes every event answered so far (or after a few seconds, or
    /// once the store is out of service): for tests and tools that read the outbox as the
    /// relay does, right after an answer.
    pub async fn indexed(&self) {
        self.inner.slot.indexed().await;
    }

    /// Changes whenever more of the outbox becomes durable: the relay's wake-up call.
    pub fn durability(&self) -> watch::Receiver<u64> {
        self.inner.slot.durable.subscribe()
    }

    /// The highest sequence number durable in the outbox so far: what
    /// [`durability`](Self::durability) announces, and the end of what
    /// [`outbox_after`](Self::outbox_after) reads.
    pub fn durable_through(&self) -> u64 {
        self.inner.slot.durable_through()
    }

    /// Up to `limit` durable outbox records above `after`, oldest first, and those of them
    /// that do not decode. Blocking: the relay calls it from its blocking pool.
    pub fn outbox_after(&self, after: Option<u64>, limit: usize) -> Result<OutboxRead, StoreError> {
        queries::outbox_after(&self.inner.slot, after, limit)
    }

    /// Sets aside an outbox record the relay cannot publish (see `maintenance::quarantine`).
    /// Blocking.
    pub fn quarantine(&self, seq: u64, reason: &str) -> Result<bool, StoreError> {
        maintenance::quarantine(&self.inner.slot, seq, reason)
    }

    /// Quarantined records after `after`, oldest first. Blocking.
    pub fn list_quarantined(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<QuarantinedView>, StoreError> {
        self.inner.slot.wait_indexed();
        queries::list_quarantined(&*self.inner.slot.database()?, after, limit)
    }

    /// Moves what the broker confirmed from the outbox to the archive (or deletes it when no
    /// archive is kept). Blocking; unsynced on purpose (see the module docs).
    pub fn archive_published(&self, confirmed: &[Confirmed]) -> Result<u64, StoreError> {
        maintenance::archive_published(&self.inner.slot, confirmed)
    }

    /// The event whose `message_id` (its body's hash) or delivery id is `id`, wherever it is.
    /// Blocking.
    pub fn find_event(&self, id: &str) -> Result<Option<EventView>, StoreError> {
        self.inner.slot.wait_indexed();
        let database = self.inner.slot.database()?;
        match queries::seq_of_id(&database, id)? {
            Some(seq) => queries::event_at(&database, seq),
            None => Ok(None),
        }
    }

    /// A page of events matching `query`, oldest first. Blocking.
    pub fn list_events(&self, query: &EventQuery) -> Result<EventPage, StoreError> {
        self.inner.slot.wait_indexed();
        queries::list_events(&*self.inner.slot.database()?, query)
    }

    /// Sequence numbers of the archived events a redrive would put back. Blocking.
    pub fn archived_matching(&self, query: &EventQuery) -> Result<Vec<u64>, StoreError> {
        self.inner.slot.wait_indexed();
        queries::archived_matching(&*self.inner.slot.database()?, query)
    }

    /// Puts the event `id` back into the outbox, to be published again.
    pub async fn redeliver_event(&self, id: &str) -> Result<Redelivery, StoreError> {
        self.inner.slot.indexed().await;
        let seq = queries::seq_of_id(&*self.inner.slot.database()?, id)?;
        let Some(seq) = seq else {
            return Ok(Redelivery::Missing);
        };
        let outcomes = self.redeliver(vec![seq], Shelf::Archive).await?;
        Ok(outcomes.first().copied().unwrap_or(Redelivery::Missing))
    }

    /// Puts archived or quarantined events back into the outbox, durably, through the writer;
    /// one outcome per sequence number.
    pub async fn redeliver(
        &self,
        seqs: Vec<u64>,
        from: Shelf,
    ) -> Result<Vec<Redelivery>, StoreError> {
        self.inner.writer.redeliver(seqs, from).await
    }

    /// Deletes dedup keys first received before `now - retention`; returns how many. The
    /// maintenance thread does this every `sweep_interval`; this is for tests and tools.
    pub fn sweep_expired(&self, retention: Duration) -> Result<u64, StoreError> {
        self.inner.slot.wait_indexed();
        maintenance::sweep_dedup(&self.inner.slot, retention)
    }

    /// Removes archived events first received before `now - retention`; returns how many.
    pub fn sweep_archive(&self, retention: Duration) -> Result<u64, StoreError> {
        self.inner.slot.wait_indexed();
        maintenance::sweep_archive(&self.inner.slot, retention)
    }

    /// Deletes the body log's segments that nothing refers to any more; returns how many. The
    /// maintenance thread does this after every sweep; this is for tests and tools.
    pub fn remove_unreferenced_bodies(&self) -> Result<usize, StoreError> {
        maintenance::remove_unreferenced_bodies(&self.inner.slot)
    }

    pub fn stats(&self) -> StoreStats {
        queries::stats(&self.inner.slot)
    }

    /// Resolves once every handle to the store is gone, this one included (so drop it after
    /// calling this): the threads have stopped and the data directory is free for another
    /// process. HTTP workers drop their handles on their own threads, a moment after their
    /// server stopped, so this is how stopping knows when the store is really closed.
    pub fn released(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut alive = self.inner.release.subscribe();
        async move {
            // No value is ever sent: this returns when the sender is dropped with the store.
            let _ = alive.changed().await;
        }
    }

    /// Stops maintenance, answers what is queued, makes everything durable and stops the
    /// writer. Later `accept` calls fail with [`StoreError::Closed`].
    pub fn close(&self) {
        self.inner.maintenance.stop();
        self.inner.writer.stop();
    }
}

#[cfg(test)]
mod tests;

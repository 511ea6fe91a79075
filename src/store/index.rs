//! sled and the dedup index as indexes over the body log: what a committed event writes into
//! them, and how an open writes again what a power cut took from them.
//!
//! **Why neither is synced before an answer.** A 2xx rests on the body log's `fdatasync`
//! alone (see [`bodies`](super::bodies)): everything they hold for a new event (its dedup
//! keys in the [`dedup_index`](super::dedup_index), the outbox's reference and the counts in
//! sled) can be derived from the record
//! and its sequence number, both in the log. So the index thread writes them after the answer
//! and syncs sled only now and then, and a power cut that takes sled's unsynced tail is
//! repaired here at the next open, before anything reads the store. Measured on the 2-core VM,
//! sled's transaction, `flush` and sync were 1.75 ms of a 3.05-ms batch on the answer's path.
//!
//! **What tells an open where to start.** `meta`'s [`IndexState`] holds the highest sequence
//! number indexed and the index thread's totals of events and keys, as one value written with
//! a plain insert after the entries of the events up to it: sled recovers a prefix of its log
//! (it cuts the log at the first torn or missing segment, see `check_contiguity_in_unstable_tail`
//! in its `pagecache/iterator.rs`), so every frame at or below that number has its entries in
//! sled (or they were moved on, archived or swept, since) and is counted, and a frame above it
//! may have some of its entries but is not counted; the replay writes those again and counts
//! them once. Every entry is a plain insert of a value derived from the frame; the outbox's
//! runs are written whole or not at all, so the replay writes a reference only for an event
//! no entry holds (as a single: see [`outbox`](super::outbox)), and an event sled kept is
//! never held twice. The writer draws sequence numbers in commit order and the
//! index thread applies batches in that order, so the number only grows. The dedup index keeps
//! a mark of its own (the number its manifest holds, see there): the replay adds to it the keys
//! of every frame above that number, and to sled what is above sled's.
//!
//! **Why no transaction.** A sled transaction holds sled's global lock exclusively while it
//! commits, and every other sled read waits: the writer's "seen before?" and the HTTP
//! workers' duplicate lookups. And each one makes sled write its I/O buffer twice, with a
//! `sync_file_range` each (`pin_log` in sled's `pagecache/mod.rs`): on one disk those writes
//! queue with the body log's `fdatasync`. One value needs no transaction to be written whole.
//! The counts the rare moves keep in their own transactions are separate keys (see
//! [`codec`](super::codec)).

use std::collections::HashSet;

use super::bodies::{Frame, REFERENCE_LEN};
use super::codec::{DedupEntry, IndexState, INDEX_STATE};
use super::error::StoreError;
use super::record::OutboxRecord;
use super::trees::Database;

/// One committed event, as sled indexes it.
pub struct IndexEntry {
    pub seq: u64,
    pub received_at_ms: u64,
    pub keys: Vec<String>,
    pub reference: [u8; REFERENCE_LEN],
}

/// Writes `batches` (each a writer batch, ascending sequence numbers, every record already
/// synced in the body log): each event's dedup keys and outbox reference, one time-index entry
/// per batch listing its keys (the sweeper's work list, which expires a batch's keys once its
/// newest is old enough), then the mark and the totals in one value ([`IndexState`]).
pub fn apply(database: &Database, batches: &[Vec<IndexEntry>]) -> Result<(), String> {
    let Some(last) = batches.iter().rev().find_map(|b| b.last()) else {
        return Ok(());
    };
    add_keys(database, batches.iter().flatten(), last.seq)?;
    apply_sled(database, batches, References::Runs)
}

/// How the outbox's references are written.
#[derive(Clone, Copy)]
enum References {
    /// New events: one run for the whole pass (see [`outbox`](super::outbox)).
    Runs,
    /// The replay at open: a single for each event no entry holds yet, since what sled kept
    /// of a run after a power cut is whole, and a run and a single must not both hold one.
    Missing,
}

/// Adds the events' dedup keys to the dedup index; `through` is the highest number among them.
fn add_keys<'a>(
    database: &Database,
    events: impl Iterator<Item = &'a IndexEntry>,
    through: u64,
) -> Result<(), String> {
    let keys = events.flat_map(|event| {
        let entry = DedupEntry {
            received_at_ms: event.received_at_ms,
            seq: event.seq,
        };
        event.keys.iter().map(move |key| (key.as_str(), entry))
    });
    database
        .dedup_index
        .insert(keys, through)
        .map_err(|e| format!("dedup index: {e}"))
}

/// What sled holds for the events: the outbox's references, then the mark.
fn apply_sled(
    database: &Database,
    batches: &[Vec<IndexEntry>],
    references: References,
) -> Result<(), String> {
    let Some(last) = batches.iter().rev().find_map(|b| b.last()) else {
        return Ok(());
    };
    let events = || batches.iter().flatten();
    let added_events = events().count() as u64;
    let storage = |e: sled::Error| e.to_string();
    match references {
        References::Runs => {
            let members: Vec<_> = events().map(|e| (e.seq, e.reference)).collect();
            database.outbox.insert_runs(&members).map_err(storage)?;
        }
        References::Missing => {
            for event in events() {
                if !database.outbox.contains(event.seq).map_err(storage)? {
                    database
                        .outbox
                        .insert_single(event.seq, &event.reference)
                        .map_err(storage)?;
                }
            }
        }
    }
    // Last, and one value: sled's recovered prefix never holds the mark without the entries,
    // nor the totals without the mark.
    let before = IndexState::read(&database.meta).map_err(storage)?;
    let after = IndexState {
        through: last.seq,
        events: before.events.wrapping_add(added_events),
        // Keys are the dedup index's, counted there; these are keys of data from before it.
        keys: before.keys,
    };
    database
        .meta
        .insert(INDEX_STATE, &after.encode()[..])
        .map_err(storage)?;
    Ok(())
}

/// The dedup entry of `key`: a key a redelivery moved (or one stored before the dedup index)
/// in sled first, then the dedup index.
pub fn stored_entry(database: &Database, key: &str) -> Result<Option<DedupEntry>, StoreError> {
    if database
        .legacy_dedup
        .load(std::sync::atomic::Ordering::Acquire)
    {
        if let Some(entry) = database.dedup.get(key.as_bytes())? {
            if let Some(entry) = DedupEntry::decode(&entry) {
                return Ok(Some(entry));
            }
        }
    }
    database
        .dedup_index
        .get(key)
        .map_err(|e| StoreError::Unwritable(format!("dedup index: {e}")))
}

/// Indexes every frame of the body log above the mark of [`IndexState`]: what sled lost of the
/// events answered before a power cut (or a crash, or a disk error that retired the
/// database). Then makes sure sled's sequence numbers continue above every number the body log
/// has seen, since sled's own record of the numbers it handed out may have been lost with the
/// rest. Returns how many events it indexed.
pub fn replay(database: &Database) -> Result<u64, StoreError> {
    let indexed_through = IndexState::read(&database.meta)?.through;
    let keys_through = database.dedup_index.flushed_through();
    let mut replayed = 0u64;
    let mut highest = indexed_through;
    database.bodies.frames_after(
        indexed_through.min(keys_through),
        1024,
        |frames: Vec<Frame>| {
            let mut seen = HashSet::new();
            let events: Vec<IndexEntry> = frames
                .into_iter()
                .map(|frame| {
                    // A record that does not decode still gets its place in the outbox, where
                    // the relay sets it aside into the quarantine like any unreadable record.
                    let (received_at_ms, keys) = match OutboxRecord::decode(&frame.record) {
                        Ok(record) => (record.received_at_ms, record.dedup_keys()),
                        Err(_) => (0, Vec::new()),
                    };
                    // The writer never stores a key twice; a retry's copy stays harmless here.
                    let keys = keys
                        .into_iter()
                        .filter(|k| seen.insert(k.clone()))
                        .collect();
                    IndexEntry {
                        seq: frame.seq,
                        received_at_ms,
                        keys,
                        reference: frame.reference,
                    }
                })
                .collect();
            let Some(last) = events.last().map(|e| e.seq) else {
                return Ok(());
            };
            // Each part from its own mark: keys a file already holds are not added twice, and
            // what sled holds is not counted twice.
            let new_keys = events.iter().filter(|e| e.seq > keys_through);
            add_keys(database, new_keys, last).map_err(StoreError::Unwritable)?;
            let for_sled: Vec<IndexEntry> = events
                .into_iter()
                .filter(|e| e.seq > indexed_through)
                .collect();
            highest = highest.max(last);
            replayed += for_sled.len() as u64;
            apply_sled(database, &[for_sled], References::Missing).map_err(StoreError::Unwritable)
        },
    )?;
    // A segment is named after the first number it holds, so numbers at or below the newest
    // segment's were handed out, even where its append failed and nothing reached the log.
    let highest = highest.max(database.bodies.newest_segment()?.unwrap_or(0));
    while database.db.generate_id()? <= highest {}
    if replayed > 0 {
        tracing::warn!(
            replayed,
            indexed_through,
            "indexed events from the body log that sled had not kept"
        );
    }
    Ok(replayed)
}

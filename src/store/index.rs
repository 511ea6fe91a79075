//! sled as an index over the body log: what a committed event writes into sled, and how an
//! open writes again what a power cut took from sled.
//!
//! **Why sled is not synced before an answer.** A 2xx rests on the body log's `fdatasync`
//! alone (see [`bodies`](super::bodies)): everything sled holds for a new event (its dedup
//! keys, the outbox's reference, the time index, the counts) can be derived from the record
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
//! them once. Every entry is a plain insert of a value derived from the frame, so writing it
//! twice leaves the same thing. The writer draws sequence numbers in commit order and the
//! index thread applies batches in that order, so the number only grows.
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
use super::codec::{encode_keys, seq_key, DedupEntry, IndexState, TimeIndexKey, INDEX_STATE};
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
    let time_index: Vec<([u8; 16], Vec<u8>)> = batches
        .iter()
        .filter_map(|events| {
            let first = events.first()?;
            let key = TimeIndexKey {
                newest_received_at_ms: events.iter().map(|e| e.received_at_ms).max()?,
                first_seq: first.seq,
            }
            .encode();
            let keys = encode_keys(
                events
                    .iter()
                    .flat_map(|e| e.keys.iter().map(String::as_str)),
            );
            (!keys.is_empty()).then_some((key, keys))
        })
        .collect();
    let events = || batches.iter().flatten();
    let added_events = events().count() as u64;
    let added_keys = events().map(|e| e.keys.len()).sum::<usize>() as u64;
    let storage = |e: sled::Error| e.to_string();
    for event in events() {
        let entry = DedupEntry {
            received_at_ms: event.received_at_ms,
            seq: event.seq,
        }
        .encode();
        for key in &event.keys {
            database
                .dedup
                .insert(key.as_bytes(), &entry[..])
                .map_err(storage)?;
        }
        database
            .outbox
            .insert(&seq_key(event.seq)[..], &event.reference[..])
            .map_err(storage)?;
    }
    for (key, keys) in &time_index {
        database
            .dedup_by_time
            .insert(&key[..], keys.as_slice())
            .map_err(storage)?;
    }
    // Last, and one value: sled's recovered prefix never holds the mark without the entries,
    // nor the totals without the mark.
    let before = IndexState::read(&database.meta).map_err(storage)?;
    let after = IndexState {
        through: last.seq,
        events: before.events.wrapping_add(added_events),
        keys: before.keys.wrapping_add(added_keys),
    };
    database
        .meta
        .insert(INDEX_STATE, &after.encode()[..])
        .map_err(storage)?;
    Ok(())
}

/// Indexes every frame of the body log above the mark of [`IndexState`]: what sled lost of the
/// events answered before a power cut (or a crash, or a disk error that retired the
/// database). Then makes sure sled's sequence numbers continue above every number the body log
/// has seen, since sled's own record of the numbers it handed out may have been lost with the
/// rest. Returns how many events it indexed.
pub fn replay(database: &Database) -> Result<u64, StoreError> {
    let indexed_through = IndexState::read(&database.meta)?.through;
    let mut replayed = 0u64;
    let mut highest = indexed_through;
    database
        .bodies
        .frames_after(indexed_through, 1024, |frames: Vec<Frame>| {
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
            highest = highest.max(events.last().map_or(0, |e| e.seq));
            replayed += events.len() as u64;
            apply(database, &[events]).map_err(StoreError::Unwritable)
        })?;
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

//! A batch of new events: which are new, and making those durable in the body log.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use super::{Reply, Stored};
use crate::store::database::{Database, Slot};
use crate::store::error::StoreError;
use crate::store::index::{stored_entry, IndexEntry};
use crate::store::record::OutboxRecord;

pub(super) type Outcome = Result<(Stored, u64), StoreError>;

/// A batch's event that is new: its place in the batch, the sequence number drawn for it, its
/// dedup keys and its encoded outbox record.
struct NewEvent {
    index: usize,
    seq: u64,
    keys: Vec<String>,
    encoded: Vec<u8>,
}

/// Sorts out a batch and makes its new events durable: their records appended to the body log
/// and synced, their keys entered as committed but not yet indexed. Returns each request's
/// outcome and what the index thread is to write into sled for the new ones. An event one of
/// whose keys is already stored (indexed or not), or was seen earlier in the batch, is a
/// duplicate; new events beyond the outbox capacity are refused.
///
/// The "seen before?" reads happen here, on the only thread that adds keys: nothing can add
/// one between a read and the append.
pub(super) fn commit(
    slot: &Slot,
    database: &Database,
    batch: &[(OutboxRecord, Reply)],
) -> (Vec<Outcome>, Vec<IndexEntry>) {
    let (mut outcomes, new) = sort_out(slot, database, batch);
    if new.is_empty() {
        return (outcomes, Vec::new());
    }
    let records: Vec<(u64, &[u8])> = new.iter().map(|n| (n.seq, n.encoded.as_slice())).collect();
    let references = match database.bodies.append(&records) {
        Ok(references) => references,
        Err(e) => {
            let reason = format!("body log: {e}");
            for event in &new {
                outcomes[event.index] = Err(StoreError::Unwritable(reason.clone()));
            }
            return (outcomes, Vec::new());
        }
    };
    let added_keys: usize = new.iter().map(|n| n.keys.len()).sum();
    {
        let mut unindexed = slot.unindexed.lock().unwrap_or_else(|p| p.into_inner());
        for event in &new {
            for key in &event.keys {
                unindexed.insert(key.clone());
            }
        }
    }
    slot.outbox_len
        .fetch_add(new.len() as u64, Ordering::Relaxed);
    slot.dedup_len
        .fetch_add(added_keys as u64, Ordering::Relaxed);
    let newest = new.last().map_or(0, |n| n.seq);
    slot.committed.fetch_max(newest, Ordering::AcqRel);
    let entries = new
        .into_iter()
        .zip(references)
        .map(|(event, reference)| IndexEntry {
            seq: event.seq,
            received_at_ms: batch[event.index].0.received_at_ms,
            keys: event.keys,
            reference,
        })
        .collect();
    (outcomes, entries)
}

/// Each event of the batch: a duplicate, refused (no room, a failed read), or new, with its
/// sequence number drawn.
fn sort_out(
    slot: &Slot,
    database: &Database,
    batch: &[(OutboxRecord, Reply)],
) -> (Vec<Outcome>, Vec<NewEvent>) {
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(batch.len());
    let mut new: Vec<NewEvent> = Vec::new();
    let mut seen_in_batch: HashSet<String> = HashSet::new();
    let room = slot.outbox_room();
    let unindexed = slot.unindexed.lock().unwrap_or_else(|p| p.into_inner());
    for (i, (record, _)) in batch.iter().enumerate() {
        let keys = record.dedup_keys();
        // Not yet indexed first: the index thread takes a key from there only after sled has it.
        let stored = keys.iter().try_fold(false, |seen, key| {
            Ok::<_, StoreError>(
                seen || unindexed.contains(key) || stored_entry(database, key)?.is_some(),
            )
        });
        let outcome = match stored {
            Err(e) => Err(e),
            Ok(true) => Ok((Stored::Duplicate, 0)),
            Ok(false) if keys.iter().any(|k| seen_in_batch.contains(k)) => {
                Ok((Stored::Duplicate, 0))
            }
            Ok(false) if new.len() as u64 >= room => Err(StoreError::Full {
                capacity: slot.options.outbox_max,
            }),
            Ok(false) => match database.db.generate_id() {
                Err(e) => Err(StoreError::Unwritable(e.to_string())),
                Ok(seq) => {
                    seen_in_batch.extend(keys.iter().cloned());
                    new.push(NewEvent {
                        index: i,
                        seq,
                        keys,
                        encoded: record.encode(),
                    });
                    Ok((Stored::New, seq))
                }
            },
        };
        outcomes.push(outcome);
    }
    (outcomes, new)
}

//! Putting archived or quarantined events back into the outbox (redeliver, redrive).

use std::sync::atomic::Ordering;

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::{Redelivery, Shelf};
use crate::store::codec::{
    add_count, decode_archived, decode_quarantined, seq_key, DedupEntry, ARCHIVE_COUNT,
    OUTBOX_COUNT, QUARANTINE_COUNT,
};
use crate::store::database::{Database, Slot};
use crate::store::error::StoreError;
use crate::store::index::stored_entry;
use crate::store::record::{OutboxRecord, RecordError};

/// Moves archived (or quarantined) events back into the outbox under the new sequence numbers
/// `fresh` (drawn by the writer, in commit order; unused ones are only gaps),
/// marked as redelivered, in one transaction; their dedup entries follow them so the admin API
/// still finds them by id. Room in the outbox is checked like for new events. A quarantined
/// record that does not decode goes back byte for byte: the relay will set it aside again.
pub(super) fn put_back(
    slot: &Slot,
    database: &Database,
    seqs: &[u64],
    fresh: &[u64],
    from: Shelf,
) -> Result<Vec<Redelivery>, StoreError> {
    let room = slot.outbox_room();
    if seqs.len() as u64 > room {
        return Err(StoreError::Full {
            capacity: slot.options.outbox_max,
        });
    }
    let (shelf, shelf_count, shelf_len) = match from {
        Shelf::Archive => (&database.archive, ARCHIVE_COUNT, &slot.archive_len),
        Shelf::Quarantine => (&database.quarantine, QUARANTINE_COUNT, &slot.quarantine_len),
    };
    // The archived records, read (through the body log) before the transaction, which may run
    // more than once: no I/O inside it. Only this thread takes entries off the shelves but the
    // sweeps, which only remove, so what the transaction finds is what was read here.
    let mut archived = std::collections::HashMap::new();
    // The dedup entries of the events' keys, read here for the same reason: most are in the
    // dedup index, outside sled's transaction.
    let mut entries = std::collections::HashMap::new();
    let mut read_entries = |record: &OutboxRecord| -> Result<(), StoreError> {
        for key in record.dedup_keys() {
            if let Some(entry) = stored_entry(database, &key)? {
                entries.insert(key, entry);
            }
        }
        Ok(())
    };
    if from == Shelf::Archive {
        for old in seqs {
            if let Some(bytes) = shelf.get(seq_key(*old))? {
                let entry = decode_archived(&bytes, &database.bodies)?;
                read_entries(&entry.record)?;
                archived.insert(*old, (entry.attempts, entry.record));
            }
        }
    } else {
        for old in seqs {
            if let Some(bytes) = shelf.get(seq_key(*old))? {
                let quarantined = decode_quarantined(&bytes).map_err(StoreError::Record)?;
                if let Ok(record) = OutboxRecord::decode(&quarantined.outbox_bytes) {
                    read_entries(&record)?;
                }
            }
        }
    }
    // Whether each is still pending, read here too: an event can be in a run of the outbox,
    // which only a range read finds, and a transaction reads keys. Only this thread puts
    // events into the outbox but the index passes, which it runs between.
    let mut pending = std::collections::HashSet::new();
    for old in seqs {
        if database.outbox.contains(*old)? {
            pending.insert(*old);
        }
    }
    let trees = (
        shelf,
        database.outbox.tree(),
        &database.dedup,
        &database.meta,
    );
    let outcomes = trees
        .transaction(|(shelf, outbox, dedup, meta)| {
            let mut outcomes = Vec::with_capacity(seqs.len());
            let mut moved = 0i64;
            for (old, new) in seqs.iter().zip(fresh) {
                let old_key = seq_key(*old);
                let Some(bytes) = shelf.remove(&old_key[..])? else {
                    outcomes.push(if pending.contains(old) {
                        Redelivery::Pending
                    } else {
                        Redelivery::Missing
                    });
                    continue;
                };
                let abort = |e| ConflictableTransactionError::Abort(StoreError::Record(e));
                let record = match from {
                    Shelf::Archive => match archived.get(old) {
                        Some((attempts, record)) => Ok((*attempts, record.clone())),
                        // Archived after the read above: cannot happen (see there). Refused
                        // rather than read here, inside a closure that may run again.
                        None => {
                            return Err(abort(RecordError::Corrupt(
                                "an archive entry appeared while it was put back".into(),
                            )))
                        }
                    },
                    Shelf::Quarantine => {
                        let quarantined = decode_quarantined(&bytes).map_err(abort)?;
                        match OutboxRecord::decode(&quarantined.outbox_bytes) {
                            Ok(record) => Ok((record.attempts_before, record)),
                            Err(_) => Err(quarantined.outbox_bytes),
                        }
                    }
                };
                match record {
                    Ok((attempts, mut record)) => {
                        record.redelivered = true;
                        record.attempts_before = attempts;
                        outbox.insert(&seq_key(*new)[..], record.encode())?;
                        for key in record.dedup_keys() {
                            // sled's entry if it has one (this transaction's writes included),
                            // else the dedup index's, read above.
                            let points_here = dedup
                                .get(key.as_bytes())?
                                .and_then(|v| DedupEntry::decode(&v))
                                .or_else(|| entries.get(&key).copied())
                                .filter(|e| e.seq == *old);
                            if let Some(entry) = points_here {
                                let moved_entry = DedupEntry { seq: *new, ..entry };
                                dedup.insert(key.as_bytes(), &moved_entry.encode()[..])?;
                            }
                        }
                    }
                    Err(raw) => {
                        outbox.insert(&seq_key(*new)[..], raw)?;
                    }
                }
                outcomes.push(Redelivery::Queued(*new));
                moved += 1;
            }
            add_count(meta, shelf_count, -moved)?;
            add_count(meta, OUTBOX_COUNT, moved)?;
            Ok(outcomes)
        })
        .map_err(|e| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Unwritable(e.to_string()),
        })?;
    let moved = outcomes
        .iter()
        .filter(|o| matches!(o, Redelivery::Queued(_)))
        .count() as u64;
    shelf_len.fetch_sub(moved, Ordering::Relaxed);
    slot.outbox_len.fetch_add(moved, Ordering::Relaxed);
    if moved > 0 {
        // Moved keys are in sled's tree now, which lookups read first.
        database.legacy_dedup.store(true, Ordering::Release);
    }
    Ok(outcomes)
}

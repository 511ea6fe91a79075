//! The archive move's record, applied: what [`maintenance::archive_published`] does for each
//! record after it wrote [`ArchiveMoves`], and what an open does to finish a move that a power
//! cut interrupted. A leaf over [`trees`](super::trees), so that the open can call it.
//!
//! [`maintenance::archive_published`]: super::maintenance::archive_published

use super::codec::{encode_archived, seq_key, ArchiveMoves};
use super::error::StoreError;
use super::trees::Database;

/// One record of a move: its archive entry first, then its removal from the outbox, so that a
/// record is always in one tree or both, never in neither.
pub fn move_one(
    database: &Database,
    record: &ArchiveMoves,
    seq: u64,
    attempts: u32,
    outbox_bytes: &[u8],
) -> Result<(), StoreError> {
    let key = seq_key(seq);
    if record.keep {
        let entry = encode_archived(record.published_at_ms, attempts, outbox_bytes);
        database.archive.insert(&key[..], entry)?;
    }
    database.outbox.remove(&key[..])?;
    Ok(())
}

/// At open: finishes the last archive move, which a power cut may have interrupted. Its
/// records still in the outbox are moved as the move would have moved them (an archive entry
/// already there is written again, the same bytes), and not counted again: the record's totals
/// count them already. Returns how many it moved.
pub fn finish(database: &Database) -> Result<u64, StoreError> {
    let record = ArchiveMoves::read(&database.meta)?;
    let mut finished = 0;
    for &(seq, attempts) in &record.pending {
        if let Some(bytes) = database.outbox.get(seq_key(seq))? {
            move_one(database, &record, seq, attempts, &bytes)?;
            finished += 1;
        }
    }
    if finished > 0 {
        tracing::warn!(
            finished,
            "finished an archive move that sled had kept only part of"
        );
    }
    Ok(finished)
}

//! The archive move's record, applied: what [`maintenance::archive_published`] does for each
//! record after it wrote [`ArchiveMoves`], and what an open does to finish a move that a power
//! cut interrupted. A leaf over [`trees`](super::trees), so that the open can call it.
//!
//! [`maintenance::archive_published`]: super::maintenance::archive_published

use super::codec::{encode_archived, seq_key, ArchiveMoves};
use super::error::StoreError;
use super::outbox::Place;
use super::trees::Database;

/// A move's records, each `(seq, attempts, where the outbox holds it)`: their archive entries
/// first, then their removal from the outbox (one rewrite per run), so that a record is always
/// in one tree or both, never in neither.
pub fn move_all(
    database: &Database,
    record: &ArchiveMoves,
    moving: &[(u64, u32, Place)],
) -> Result<(), StoreError> {
    if record.keep {
        for (seq, attempts, place) in moving {
            let entry = encode_archived(record.published_at_ms, *attempts, place.value());
            database.archive.insert(&seq_key(*seq)[..], entry)?;
        }
    }
    let found = moving.iter().map(|(seq, _, place)| (*seq, place));
    database.outbox.remove_all(found)?;
    Ok(())
}

/// At open: finishes the last archive move, which a power cut may have interrupted. Its
/// records still in the outbox are moved as the move would have moved them (an archive entry
/// already there is written again, the same bytes), and not counted again: the record's totals
/// count them already. Returns how many it moved.
pub fn finish(database: &Database) -> Result<u64, StoreError> {
    let record = ArchiveMoves::read(&database.meta)?;
    let mut moving = Vec::new();
    for &(seq, attempts) in &record.pending {
        if let Some(place) = database.outbox.locate(seq)? {
            moving.push((seq, attempts, place));
        }
    }
    move_all(database, &record, &moving)?;
    let finished = moving.len() as u64;
    if finished > 0 {
        tracing::warn!(
            finished,
            "finished an archive move that sled had kept only part of"
        );
    }
    Ok(finished)
}

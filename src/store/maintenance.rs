//! Housekeeping that needs no sync: confirmed events move from the outbox to the archive,
//! records the relay cannot publish move to the quarantine, and dedup keys and archived events
//! past their retention are swept. A thread of the store's own
//! runs the sweeps every `sweep_interval` and, while a disk error keeps the store unwritable,
//! asks the writer every second to reopen it; [`Maintenance::stop`] ends it.
//!
//! None of this is synced on purpose, and none of it goes through the writer: a move lost in a
//! power cut only means the event is published once more (at least once allows it), a sweep
//! lost is done again, and the next batch's sync covers both anyway. The rare moves (quarantine,
//! sweeps) are sled transactions with their counts; the archive move, one per burst of
//! confirms, is plain writes after a record of itself, finished at the next open if a power
//! cut interrupted it ([`archive_published`]).

use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use sled::transaction::ConflictableTransactionError;
use sled::Transactional;

use super::archive_moves;
use super::codec::{
    add_count, cutoff_ms, decode_archived, decode_keys, encode_quarantined, seq_key, seq_of,
    transaction_error, unix_millis, ArchiveMoves, DedupEntry, TimeIndexKey, ARCHIVE_COUNT,
    ARCHIVE_MOVES, DEDUP_COUNT, OUTBOX_COUNT, QUARANTINE_COUNT,
};
use super::database::Slot;
use super::error::StoreError;
use super::outbox::{without_members, Place};
use super::writer::RecoverRequest;

/// Archive entries removed per sweep transaction.
const SWEEP_BATCH: usize = 512;
/// How often an unwritable store asks to be reopened.
const RECOVER_EVERY: Duration = Duration::from_secs(1);

/// An outbox record the broker confirmed, and how many publishes that took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirmed {
    pub seq: u64,
    pub attempts: u32,
}

/// Moves confirmed records from the outbox to the archive, or deletes them when no archive is
/// kept; returns how many were still in the outbox.
///
/// Plain inserts and removes, no transaction (see `index` for what a transaction costs the
/// others): first the [`ArchiveMoves`] record, whose totals already count this move and which
/// lists its records, then each record's archive entry, then its removal from the outbox.
/// sled recovers a prefix of its log, so a power cut leaves the record without the move
/// (nothing moved, nothing counted), or the record with part of the move, which the next open
/// finishes ([`archive_moves::finish`]). A record is never in neither tree.
pub fn archive_published(slot: &Slot, confirmed: &[Confirmed]) -> Result<u64, StoreError> {
    if confirmed.is_empty() {
        return Ok(0);
    }
    let database = slot.database()?;
    let keep = slot.options.keeps_archive();
    // The record lists the move in progress: a second mover at once would overwrite it.
    let _mover = slot.archive_mover.lock().unwrap_or_else(|p| p.into_inner());
    let mut moving = Vec::with_capacity(confirmed.len());
    for done in confirmed {
        if let Some(place) = database.outbox.locate(done.seq)? {
            moving.push((done.seq, done.attempts, place));
        }
    }
    if moving.is_empty() {
        return Ok(0);
    }
    let moved = moving.len() as u64;
    let before = ArchiveMoves::read(&database.meta)?;
    let record = ArchiveMoves {
        removed: before.removed.wrapping_add(moved),
        archived: before.archived.wrapping_add(if keep { moved } else { 0 }),
        published_at_ms: unix_millis(SystemTime::now()),
        keep,
        pending: moving
            .iter()
            .map(|(seq, attempts, _)| (*seq, *attempts))
            .collect(),
    };
    database.meta.insert(ARCHIVE_MOVES, record.encode())?;
    archive_moves::move_all(&database, &record, &moving)?;
    slot.outbox_len.fetch_sub(moved, Ordering::Relaxed);
    if keep {
        slot.archive_len.fetch_add(moved, Ordering::Relaxed);
    }
    Ok(moved)
}

/// Moves an outbox record the relay cannot publish to the quarantine, byte for byte, with the
/// reason; false if it is no longer in the outbox. Unsynced like the archive moves: a move lost
/// in a power cut leaves the record in the outbox, where the relay finds it unpublishable again.
///
/// The quarantine keeps the record itself, read from the body log if the outbox held a
/// reference (a reference that does not resolve is kept as it is): a quarantined event may
/// stay for long, and must not keep old segments of the body log alive.
pub fn quarantine(slot: &Slot, seq: u64, reason: &str) -> Result<bool, StoreError> {
    let database = slot.database()?;
    let quarantined_at_ms = unix_millis(SystemTime::now());
    let key = seq_key(seq);
    // Nobody else takes members out of runs meanwhile (the archive moves take this too), so
    // the run read here is the one the transaction rewrites.
    let _edits = database.outbox.edits();
    // Read outside the transaction, which may run more than once: no I/O inside it.
    let Some(place) = database.outbox.locate(seq)? else {
        return Ok(false);
    };
    let stored = place.value();
    let record = database
        .bodies
        .resolve(stored)
        .map(|r| r.into_owned())
        .unwrap_or_else(|_| stored.to_vec());
    let moved = (database.outbox.tree(), &database.quarantine, &database.meta)
        .transaction(|(outbox, quarantine, meta)| {
            let kept = match &place {
                Place::Single(_) => {
                    let Some(bytes) = outbox.remove(&key[..])? else {
                        return Ok(false);
                    };
                    // Only the relay moves records out of the outbox, so this is what was
                    // read above.
                    if bytes == stored {
                        record.clone()
                    } else {
                        bytes.to_vec()
                    }
                }
                Place::InRun { run_key, .. } => {
                    let Some(run) = outbox.get(&run_key[..])? else {
                        return Ok(false);
                    };
                    match without_members(&run, &[seq]) {
                        Some(rest) if rest.len() == run.len() => return Ok(false),
                        Some(rest) => outbox.insert(&run_key[..], rest)?,
                        None => outbox.remove(&run_key[..])?,
                    };
                    record.clone()
                }
            };
            quarantine.insert(
                &key[..],
                encode_quarantined(quarantined_at_ms, reason, &kept),
            )?;
            add_count(meta, OUTBOX_COUNT, -1)?;
            add_count(meta, QUARANTINE_COUNT, 1)?;
            Ok::<_, ConflictableTransactionError<()>>(true)
        })
        .map_err(transaction_error)?;
    if moved {
        slot.outbox_len.fetch_sub(1, Ordering::Relaxed);
        slot.quarantine_len.fetch_add(1, Ordering::Relaxed);
    }
    Ok(moved)
}

/// Deletes dedup keys first received before `now - retention`; returns how many.
pub fn sweep_dedup(slot: &Slot, retention: Duration) -> Result<u64, StoreError> {
    let cutoff_ms = cutoff_ms(retention);
    let database = slot.database()?;
    let dedup_index = |e: std::io::Error| StoreError::Unwritable(format!("dedup index: {e}"));
    database.dedup_index.flush().map_err(dedup_index)?;
    let expired = database
        .dedup_index
        .expire(cutoff_ms)
        .map_err(dedup_index)?;
    slot.dedup_len.fetch_sub(expired, Ordering::Relaxed);
    let mut removed = expired;
    // Batches whose newest event is older than the cutoff hold only expired keys.
    let end = TimeIndexKey {
        newest_received_at_ms: cutoff_ms,
        first_seq: 0,
    }
    .encode();
    loop {
        let Some((index_key, keys)) = database
            .dedup_by_time
            .range(..&end[..])
            .next()
            .transpose()?
        else {
            return Ok(removed);
        };
        // Remove a key only if it is still this old entry (not received again since).
        let swept = (&database.dedup, &database.meta)
            .transaction(|(dedup, meta)| {
                let mut swept = 0;
                for key in decode_keys(&keys) {
                    let expired = dedup
                        .get(key)?
                        .and_then(|v| DedupEntry::decode(&v))
                        .is_some_and(|e| e.received_at_ms < cutoff_ms);
                    if expired {
                        dedup.remove(key)?;
                        swept += 1;
                    }
                }
                add_count(meta, DEDUP_COUNT, -(swept as i64))?;
                Ok::<_, ConflictableTransactionError<()>>(swept)
            })
            .map_err(transaction_error)?;
        slot.dedup_len.fetch_sub(swept, Ordering::Relaxed);
        removed += swept;
        database.dedup_by_time.remove(index_key)?;
    }
}

/// Removes archived events first received before `now - retention`, in sequence order: the
/// scan stops at the first entry still inside the retention. Returns how many.
pub fn sweep_archive(slot: &Slot, retention: Duration) -> Result<u64, StoreError> {
    let cutoff_ms = cutoff_ms(retention);
    let database = slot.database()?;
    let mut removed = 0;
    loop {
        let mut expired = Vec::new();
        let mut reached_live = false;
        for item in database.archive.iter().take(SWEEP_BATCH) {
            let (key, bytes) = item?;
            let record = decode_archived(&bytes, &database.bodies)?.record;
            if record.received_at_ms >= cutoff_ms {
                reached_live = true;
                break;
            }
            expired.push(key);
        }
        if !expired.is_empty() {
            let swept = (&database.archive, &database.meta)
                .transaction(|(archive, meta)| {
                    let mut swept = 0;
                    for key in &expired {
                        if archive.remove(key)?.is_some() {
                            swept += 1;
                        }
                    }
                    add_count(meta, ARCHIVE_COUNT, -(swept as i64))?;
                    Ok::<_, ConflictableTransactionError<()>>(swept)
                })
                .map_err(transaction_error)?;
            slot.archive_len.fetch_sub(swept, Ordering::Relaxed);
            removed += swept;
        }
        if reached_live || expired.len() < SWEEP_BATCH {
            return Ok(removed);
        }
    }
}

/// The maintenance thread, reached only through this handle.
pub struct Maintenance {
    stop: Mutex<Option<mpsc::Sender<()>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Maintenance {
    pub fn start(slot: Arc<Slot>, recover: RecoverRequest) -> Result<Self, StoreError> {
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("store-maintenance".into())
            .spawn(move || run(&slot, &recover, &stopped))
            .map_err(|e| StoreError::Unwritable(format!("cannot start maintenance: {e}")))?;
        Ok(Self {
            stop: Mutex::new(Some(stop)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Ends the thread (a sweep under way finishes its current transaction first).
    pub fn stop(&self) {
        drop(self.stop.lock().unwrap_or_else(|p| p.into_inner()).take());
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for Maintenance {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(slot: &Slot, recover: &RecoverRequest, stopped: &mpsc::Receiver<()>) {
    let interval = slot.options.sweep_interval;
    // The first sweep at start, as after a long stop there may be plenty to do.
    let mut next_sweep = Instant::now();
    loop {
        let wait = next_sweep
            .saturating_duration_since(Instant::now())
            .min(RECOVER_EVERY);
        match stopped.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        // sled stays failed after an I/O error: only a reopen brings writes back, so that
        // readiness returns soon after space does, with or without traffic.
        if !slot.is_writable() {
            recover.send();
        }
        if Instant::now() >= next_sweep {
            sweep(slot);
            next_sweep = Instant::now() + interval;
        }
    }
}

fn sweep(slot: &Slot) {
    match sweep_dedup(slot, slot.options.dedup_retention) {
        Ok(0) => {}
        Ok(removed) => tracing::info!(removed, "expired dedup keys swept"),
        Err(e) => tracing::error!(error = %e, "dedup sweep failed"),
    }
    match sweep_archive(slot, slot.options.archive_retention) {
        Ok(0) => {}
        Ok(removed) => tracing::info!(removed, "expired archived events swept"),
        Err(e) => tracing::error!(error = %e, "archive sweep failed"),
    }
    match remove_unreferenced_bodies(slot) {
        Ok(0) => {}
        Ok(removed) => tracing::info!(removed, "body log segments removed"),
        Err(e) => tracing::error!(error = %e, "body log cleanup failed"),
    }
}

/// Deletes the body log's segments that neither the outbox nor the archive refers to any
/// more; returns how many.
///
/// The moves and sweeps that freed them are unsynced, so the store is made durable first: a
/// power cut must not bring back a reference (an archive move lost, say) to a segment already
/// gone. The outbox is read before the archive, because records move from the first to the
/// second: read the other way round, a record moved in between would be missed by both.
pub fn remove_unreferenced_bodies(slot: &Slot) -> Result<usize, StoreError> {
    let database = slot.database()?;
    let _one_at_a_time = database.bodies.removal();
    // The keys the dedup index holds in memory go to a file first: until then the body log
    // is what keeps them.
    database
        .dedup_index
        .flush()
        .map_err(|e| StoreError::Unwritable(format!("dedup index: {e}")))?;
    let in_outbox = database.outbox.first()?.map_or(u64::MAX, |(seq, _)| seq);
    let in_archive = match database.archive.first()? {
        Some((key, _)) => seq_of(&key)?,
        None => u64::MAX,
    };
    // The dedup index's map holds keys the body log alone keeps durable until a file has them.
    let lowest_live = in_outbox
        .min(in_archive)
        .min(slot.durable_through().saturating_add(1))
        .min(database.dedup_index.flushed_through().saturating_add(1));
    let body_log = |e: std::io::Error| StoreError::Unwritable(format!("body log: {e}"));
    let unreferenced = database
        .bodies
        .unreferenced(lowest_live)
        .map_err(body_log)?;
    if unreferenced.is_empty() {
        return Ok(0);
    }
    if let Err(reason) = database.make_durable() {
        slot.retire();
        return Err(StoreError::Unwritable(reason));
    }
    database.bodies.remove(&unreferenced).map_err(body_log)?;
    Ok(unreferenced.len())
}

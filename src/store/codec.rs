//! How the store's keys and values look on disk, apart from the outbox record itself
//! ([`record`](super::record)): dedup entries, the time index, the counts in `meta`, archive
//! entries and sequence-number keys. A leaf: the writer, the maintenance and the queries all
//! read and write through these, and none of them through each other.

use super::bodies::BodyLog;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sled::transaction::{TransactionError, TransactionalTree, UnabortableTransactionError};

use super::error::StoreError;
use super::record::{OutboxRecord, RecordError};

/// A dedup entry: when the key was first received and which outbox record it made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupEntry {
    pub received_at_ms: u64,
    pub seq: u64,
}

impl DedupEntry {
    pub fn encode(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.received_at_ms.to_be_bytes());
        out[8..].copy_from_slice(&self.seq.to_be_bytes());
        out
    }
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; 16] = bytes.try_into().ok()?;
        Some(Self {
            received_at_ms: u64::from_be_bytes(bytes[..8].try_into().ok()?),
            seq: u64::from_be_bytes(bytes[8..].try_into().ok()?),
        })
    }
}

/// Key of a `dedup_by_time` entry: big-endian, so that byte order is time order.
pub struct TimeIndexKey {
    pub newest_received_at_ms: u64,
    pub first_seq: u64,
}

impl TimeIndexKey {
    pub fn encode(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.newest_received_at_ms.to_be_bytes());
        out[8..].copy_from_slice(&self.first_seq.to_be_bytes());
        out
    }
}

#[cfg(test)]
/// A batch's keys as one value: each key prefixed by its length (keys are ≤ 255 bytes).
pub fn encode_keys<'a>(keys: impl Iterator<Item = &'a str>) -> Vec<u8> {
    let mut out = Vec::new();
    for key in keys {
        let len = u8::try_from(key.len()).expect("dedup keys are at most 200 bytes");
        out.push(len);
        out.extend_from_slice(key.as_bytes());
    }
    out
}

pub fn decode_keys(mut bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let (&len, rest) = bytes.split_first()?;
        let (key, rest) = rest.split_at_checked(len as usize)?;
        bytes = rest;
        Some(key)
    })
}

/// Counts kept in `meta` by the rare moves (quarantine, redelivery, sweeps), each in the same
/// transaction as the move it counts. The busy paths, indexing new events and archiving
/// published ones, keep their own totals in [`IndexState`] and [`ArchiveMoves`], written with
/// plain inserts; a count is the sum of its parts ([`Counts`](super::database::Counts)).
/// Values are `u64` and wrap: `outbox_events` goes below zero as the archive moves take out
/// what the index thread put in.
pub const OUTBOX_COUNT: &[u8] = b"outbox_events";
pub const DEDUP_COUNT: &[u8] = b"dedup_keys";
pub const ARCHIVE_COUNT: &[u8] = b"archive_events";
pub const QUARANTINE_COUNT: &[u8] = b"quarantined_events";
/// In `meta`, before [`INDEX_STATE`]: the highest sequence number indexed, beside counts that
/// included the index thread's. Read only when a database has no `INDEX_STATE` yet.
pub const INDEXED_THROUGH: &[u8] = b"indexed_through";
/// In `meta`: the index thread's [`IndexState`].
pub const INDEX_STATE: &[u8] = b"index_state";
/// In `meta`: the relay's [`ArchiveMoves`].
pub const ARCHIVE_MOVES: &[u8] = b"archive_moves";

pub fn decode_count(bytes: &[u8]) -> u64 {
    bytes.try_into().map_or(0, u64::from_be_bytes)
}

/// What the index thread has written into sled, as one value, so that one plain insert moves
/// the mark and the totals together (a single value is written whole or not at all). sled
/// recovers a prefix of its log, and the insert comes after the entries it counts (see
/// `index`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexState {
    /// Every frame at or below this has its entries in sled.
    pub through: u64,
    /// Events added to the outbox by indexing, in all.
    pub events: u64,
    /// Dedup keys added by indexing, in all.
    pub keys: u64,
}

impl IndexState {
    pub fn encode(&self) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[..8].copy_from_slice(&self.through.to_be_bytes());
        out[8..16].copy_from_slice(&self.events.to_be_bytes());
        out[16..].copy_from_slice(&self.keys.to_be_bytes());
        out
    }

    /// The stored state; a database from before it has only the mark, and counts that already
    /// hold what its index thread added.
    pub fn read(meta: &sled::Tree) -> Result<Self, sled::Error> {
        if let Some(v) = meta.get(INDEX_STATE)? {
            let word = |i: usize| v.get(i * 8..i * 8 + 8).map_or(0, decode_count);
            return Ok(Self {
                through: word(0),
                events: word(1),
                keys: word(2),
            });
        }
        Ok(Self {
            through: meta.get(INDEXED_THROUGH)?.map_or(0, |v| decode_count(&v)),
            ..Self::default()
        })
    }
}

/// The relay's moves from the outbox to the archive, as one value written with a plain insert
/// *before* the move it describes: the totals already count it, and `pending` lists its
/// records, so that an open finishes a move a power cut interrupted (see
/// `archive_moves::finish`). One mover at a time writes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveMoves {
    /// Records taken out of the outbox by moves, in all.
    pub removed: u64,
    /// Of those, the ones put into the archive (none while no archive is kept).
    pub archived: u64,
    /// The latest move: when the broker's confirms were booked, whether it archives, and its
    /// records with the publishes each took.
    pub published_at_ms: u64,
    pub keep: bool,
    pub pending: Vec<(u64, u32)>,
}

impl ArchiveMoves {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(25 + 12 * self.pending.len());
        out.extend_from_slice(&self.removed.to_be_bytes());
        out.extend_from_slice(&self.archived.to_be_bytes());
        out.extend_from_slice(&self.published_at_ms.to_be_bytes());
        out.push(u8::from(self.keep));
        for (seq, attempts) in &self.pending {
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(&attempts.to_be_bytes());
        }
        out
    }

    pub fn read(meta: &sled::Tree) -> Result<Self, StoreError> {
        let Some(v) = meta.get(ARCHIVE_MOVES)? else {
            return Ok(Self::default());
        };
        let corrupt = || StoreError::Unwritable("meta: archive_moves does not decode".into());
        let (head, mut rest) = v.split_at_checked(25).ok_or_else(corrupt)?;
        let mut pending = Vec::new();
        while !rest.is_empty() {
            let (entry, tail) = rest.split_at_checked(12).ok_or_else(corrupt)?;
            let seq = decode_count(&entry[..8]);
            let attempts = u32::from_be_bytes(entry[8..].try_into().map_err(|_| corrupt())?);
            pending.push((seq, attempts));
            rest = tail;
        }
        Ok(Self {
            removed: decode_count(&head[..8]),
            archived: decode_count(&head[8..16]),
            published_at_ms: decode_count(&head[16..24]),
            keep: head[24] != 0,
            pending,
        })
    }
}

/// Adds `delta` to a count inside a transaction (wrapping: see [`OUTBOX_COUNT`]).
pub fn add_count(
    meta: &TransactionalTree,
    name: &[u8],
    delta: i64,
) -> Result<(), UnabortableTransactionError> {
    if delta == 0 {
        return Ok(());
    }
    let current = meta.get(name)?.map_or(0, |v| decode_count(&v));
    let updated = current.wrapping_add_signed(delta);
    meta.insert(name, &updated.to_be_bytes())?;
    Ok(())
}

pub fn transaction_error(e: TransactionError<()>) -> StoreError {
    match e {
        TransactionError::Abort(()) => StoreError::Unwritable("transaction aborted".into()),
        TransactionError::Storage(e) => StoreError::Sled(e),
    }
}

/// `outbox` and `archive` keys: the sequence number, big-endian, so that byte order is
/// acceptance order.
pub fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

pub fn seq_of(key: &[u8]) -> Result<u64, RecordError> {
    key.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| RecordError::Corrupt("key is not a sequence number".into()))
}

const ARCHIVE_VERSION: u8 = 1;
const ARCHIVE_HEADER: usize = 1 + 8 + 4;

/// An archive entry: the outbox record as it was, and what publishing it took.
pub struct Archived {
    pub published_at_ms: u64,
    /// Publishes this process made before the broker confirmed it.
    pub attempts: u32,
    pub record: OutboxRecord,
}

/// An archived event: when the broker confirmed it, how many publishes that took, and the
/// outbox record as it was (its encoded bytes, copied without decoding).
pub fn encode_archived(published_at_ms: u64, attempts: u32, outbox_bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ARCHIVE_HEADER + outbox_bytes.len());
    out.push(ARCHIVE_VERSION);
    out.extend_from_slice(&published_at_ms.to_be_bytes());
    out.extend_from_slice(&attempts.to_be_bytes());
    out.extend_from_slice(outbox_bytes);
    out
}

/// An archived event, its record read through `bodies` when the entry holds a reference.
pub fn decode_archived(bytes: &[u8], bodies: &BodyLog) -> Result<Archived, RecordError> {
    match bytes.split_first() {
        Some((&ARCHIVE_VERSION, rest)) if rest.len() >= ARCHIVE_HEADER - 1 => Ok(Archived {
            published_at_ms: u64::from_be_bytes(rest[..8].try_into().expect("8 bytes")),
            attempts: u32::from_be_bytes(rest[8..12].try_into().expect("4 bytes")),
            record: OutboxRecord::decode(&bodies.resolve(&rest[12..])?)?,
        }),
        Some((&ARCHIVE_VERSION, _)) => Err(RecordError::Corrupt("short archive entry".into())),
        Some((&other, _)) => Err(RecordError::UnknownVersion(other)),
        None => Err(RecordError::Corrupt("empty archive entry".into())),
    }
}

const QUARANTINE_VERSION: u8 = 1;

/// A quarantine entry: an outbox record the relay could not publish however often it tried,
/// kept byte for byte (it may not even decode), with when and why.
pub struct Quarantined {
    pub quarantined_at_ms: u64,
    pub reason: String,
    pub outbox_bytes: Vec<u8>,
}

pub fn encode_quarantined(quarantined_at_ms: u64, reason: &str, outbox_bytes: &[u8]) -> Vec<u8> {
    let reason = &reason.as_bytes()[..reason.len().min(u16::MAX as usize)];
    let mut out = Vec::with_capacity(1 + 8 + 2 + reason.len() + outbox_bytes.len());
    out.push(QUARANTINE_VERSION);
    out.extend_from_slice(&quarantined_at_ms.to_be_bytes());
    out.extend_from_slice(&(reason.len() as u16).to_be_bytes());
    out.extend_from_slice(reason);
    out.extend_from_slice(outbox_bytes);
    out
}

pub fn decode_quarantined(bytes: &[u8]) -> Result<Quarantined, RecordError> {
    let short = || RecordError::Corrupt("short quarantine entry".into());
    let rest = match bytes.split_first() {
        Some((&QUARANTINE_VERSION, rest)) => rest,
        Some((&other, _)) => return Err(RecordError::UnknownVersion(other)),
        None => return Err(short()),
    };
    let (at, rest) = rest.split_at_checked(8).ok_or_else(short)?;
    let (len, rest) = rest.split_at_checked(2).ok_or_else(short)?;
    let len = u16::from_be_bytes(len.try_into().expect("2 bytes")) as usize;
    let (reason, outbox_bytes) = rest.split_at_checked(len).ok_or_else(short)?;
    Ok(Quarantined {
        quarantined_at_ms: u64::from_be_bytes(at.try_into().expect("8 bytes")),
        reason: String::from_utf8_lossy(reason).into_owned(),
        outbox_bytes: outbox_bytes.to_vec(),
    })
}

pub fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The receive time before which entries have outlived `retention`. Saturating: a retention
/// too large for milliseconds in a `u64` keeps everything instead of wrapping round to a
/// small number that would sweep fresh keys at once.
pub fn cutoff_ms(retention: Duration) -> u64 {
    let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
    unix_millis(SystemTime::now()).saturating_sub(retention_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_key_lists_round_trip() {
        let keys = ["a", "", &"k".repeat(200)];
        let encoded = encode_keys(keys.iter().copied());
        let decoded: Vec<&[u8]> = decode_keys(&encoded).collect();
        assert_eq!(
            decoded,
            keys.iter().map(|k| k.as_bytes()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_retention_beyond_u64_milliseconds_keeps_everything() {
        // `as_millis() as u64` wrapped: u64::MAX seconds became a cutoff near now.
        assert_eq!(cutoff_ms(Duration::from_secs(u64::MAX)), 0);
        assert_eq!(cutoff_ms(Duration::MAX), 0);
        let now = unix_millis(SystemTime::now());
        assert!(cutoff_ms(Duration::from_secs(60)) <= now - 60_000);
    }

    #[test]
    fn a_quarantine_entry_keeps_any_bytes_and_its_reason() {
        let entry = encode_quarantined(9, "cannot decode", &[7, 0, 1]);
        let q = decode_quarantined(&entry).unwrap();
        assert_eq!(
            (q.quarantined_at_ms, q.reason.as_str()),
            (9, "cannot decode")
        );
        assert_eq!(q.outbox_bytes, [7, 0, 1]);
        assert!(decode_quarantined(&entry[..5]).is_err());
    }

    #[test]
    fn an_archive_entry_round_trips_and_a_short_one_is_refused() {
        let record = OutboxRecord {
            key: "k".into(),
            event: "call.ended".into(),
            signature: "sha256=00".into(),
            received_at_ms: 1,
            source: "test".into(),
            body: b"{}".to_vec(),
            redelivered: false,
            attempts_before: 0,
            delivery_id: None,
            trace: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let bodies = BodyLog::open(dir.path()).unwrap();
        let entry = encode_archived(7, 3, &record.encode());
        let archived = decode_archived(&entry, &bodies).unwrap();
        assert_eq!((archived.published_at_ms, archived.attempts), (7, 3));
        assert_eq!(archived.record.key, "k");
        assert!(decode_archived(&entry[..5], &bodies).is_err());
        assert!(decode_archived(&[], &bodies).is_err());
        // An entry holding a reference into the body log reads the record from there.
        let reference = bodies.append(&[(1, &record.encode())]).unwrap();
        let entry = encode_archived(8, 1, &reference[0]);
        assert_eq!(decode_archived(&entry, &bodies).unwrap().record, record);
    }
}

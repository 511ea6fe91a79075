//! The body log: outbox records in append-only segment files of the store's own, so that sled
//! holds a 25-byte reference per event instead of the whole record.
//!
//! **Why.** sled 0.34.7 rewrites a leaf as it grows and splits it past 16 entries: with
//! ≈ 750-byte records in the outbox tree, every event cost sled several kilobytes of log writes
//! and the `flush` before each answer waited for all of them. Measured on the 2-core VM (three
//! paired ingest runs, a simulation of this layout against the inline one), sled's `flush` per
//! batch went from 3.8 ms to 0.8–1.5 ms and ingest rose by 75 %.
//!
//! **Layout.** `<data_dir>/bodies/<first seq, 20 digits>.seg`, each a run of frames of
//! `[u32 length][u32 CRC-32][the encoded record]`. Every open of the database starts a new
//! segment, so a torn tail left by a crash is never appended to; a segment is also closed once
//! it passes [`SEGMENT_BYTES`].
//!
//! **Durability order.** The writer appends a batch's records in one write and `fdatasync`s the
//! segment (and, when it has just created the segment, the directory) **before** its sled
//! transaction writes the references: sled may put its log on disk at any moment, and a
//! reference that reached the disk before its body would be a dedup key without its event. A
//! failed append or sync leaves no reference to what it wrote; the writer retires the database,
//! and the reopening starts a new segment.
//!
//! **Reading.** A stored outbox value is either a record (databases written before the body
//! log, redelivered events, quarantined ones) or a reference ([`REFERENCE_TAG`], segment,
//! offset, length, CRC), which [`BodyLog::resolve`] reads back with `pread` and checks.
//!
//! **Removal.** References live in the outbox and the archive, under the sequence number of the
//! event; events put back get their record inline and the quarantine keeps its own copy. So a
//! segment whose successor starts at or below the lowest sequence number left in those two
//! trees is referenced by nobody: [`BodyLog::unreferenced`] finds it and [`BodyLog::remove`]
//! deletes it (the maintenance thread, after each sweep).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::record::RecordError;

/// The first byte of a stored reference; record format versions are small numbers.
pub const REFERENCE_TAG: u8 = 0xB0;
pub const REFERENCE_LEN: usize = 1 + 8 + 8 + 4 + 4;
const FRAME_HEADER: usize = 8;
/// A segment is closed once it holds this much (a batch never splits across two).
const SEGMENT_BYTES: u64 = 64 << 20;
const DIR: &str = "bodies";
const SUFFIX: &str = ".seg";

/// The segment files of one open database.
pub struct BodyLog {
    dir: PathBuf,
    /// Only the writer appends.
    active: Mutex<Option<Active>>,
    /// Read descriptors, by segment; dropped when the segment is removed.
    readers: Mutex<HashMap<u64, Arc<File>>>,
    /// Held from finding unreferenced segments to deleting them: the maintenance thread's
    /// sweep at open and a caller of `Store::remove_unreferenced_bodies` may otherwise pick the
    /// same segments and report each other's removals as errors or count them twice.
    removal: Mutex<()>,
}

struct Active {
    id: u64,
    file: File,
    len: u64,
}

impl BodyLog {
    /// Opens `<data_dir>/bodies/`, creating it (and syncing the data directory's entry for
    /// it) if needed. No segment is created until the first append.
    pub fn open(data_dir: &Path) -> io::Result<Self> {
        let dir = data_dir.join(DIR);
        if !dir.exists() {
            std::fs::create_dir_all(&dir)?;
            sync_dir(data_dir)?;
        }
        Ok(Self {
            dir,
            active: Mutex::new(None),
            readers: Mutex::new(HashMap::new()),
            removal: Mutex::new(()),
        })
    }

    /// One removal at a time: hold this across [`unreferenced`](Self::unreferenced) and
    /// [`remove`](Self::remove).
    pub fn removal(&self) -> std::sync::MutexGuard<'_, ()> {
        self.removal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `records` (the first one numbered `first_seq`) in one write and makes them
    /// durable; returns each one's reference, to be stored in its place.
    pub fn append(
        &self,
        first_seq: u64,
        records: &[&[u8]],
    ) -> io::Result<Vec<[u8; REFERENCE_LEN]>> {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let created = match &*active {
            Some(a) if a.len < SEGMENT_BYTES => false,
            _ => {
                let path = self.path_of(first_seq);
                let file = OpenOptions::new()
                    .create_new(true)
                    .append(true)
                    .open(&path)?;
                *active = Some(Active {
                    id: first_seq,
                    file,
                    len: 0,
                });
                true
            }
        };
        let segment = active.as_mut().expect("set above");
        let size: usize = records.iter().map(|r| FRAME_HEADER + r.len()).sum();
        let mut buffer = Vec::with_capacity(size);
        let mut references = Vec::with_capacity(records.len());
        for record in records {
            let len = u32::try_from(record.len())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "record over 4 GiB"))?;
            let crc = crc32fast::hash(record);
            let offset = segment.len + buffer.len() as u64 + FRAME_HEADER as u64;
            buffer.extend_from_slice(&len.to_be_bytes());
            buffer.extend_from_slice(&crc.to_be_bytes());
            buffer.extend_from_slice(record);
            references.push(encode_reference(segment.id, offset, len, crc));
        }
        if let Err(e) = segment.file.write_all(&buffer) {
            // Nothing more goes into a segment whose write failed part way.
            *active = None;
            return Err(e);
        }
        segment.len += buffer.len() as u64;
        if !cfg!(kallina_relay_skip_sync) {
            // The power-loss campaign's control build skips this as it skips every sync.
            if let Err(e) = segment.file.sync_data().and_then(|()| {
                if created {
                    sync_dir(&self.dir)
                } else {
                    Ok(())
                }
            }) {
                // Nothing more goes into a segment whose sync failed.
                *active = None;
                return Err(e);
            }
        }
        Ok(references)
    }

    /// The record a stored outbox value stands for: the value itself, or what its reference
    /// points at, checked against the reference's length and CRC.
    pub fn resolve<'a>(&self, value: &'a [u8]) -> Result<Cow<'a, [u8]>, RecordError> {
        let Some(reference) = decode_reference(value) else {
            return Ok(Cow::Borrowed(value));
        };
        let corrupt = |what: String| RecordError::Corrupt(format!("body log: {what}"));
        let file = self
            .reader(reference.segment)
            .map_err(|e| corrupt(format!("segment {}: {e}", reference.segment)))?;
        let mut record = vec![0; reference.len as usize];
        file.read_exact_at(&mut record, reference.offset)
            .map_err(|e| corrupt(format!("segment {}: {e}", reference.segment)))?;
        if crc32fast::hash(&record) != reference.crc {
            return Err(corrupt(format!(
                "segment {} offset {}: checksum mismatch",
                reference.segment, reference.offset
            )));
        }
        Ok(Cow::Owned(record))
    }

    /// The segments whose events all have sequence numbers below `lowest_live`, so that
    /// nothing refers to them any more, oldest first.
    ///
    /// A segment holds numbers below its successor's first, so it qualifies if that successor
    /// starts at or below `lowest_live`. The newest segment, the only one appended to, has no
    /// successor and never qualifies.
    pub fn unreferenced(&self, lowest_live: u64) -> io::Result<Vec<u64>> {
        let segments = self.segments()?;
        Ok(segments
            .windows(2)
            .take_while(|pair| pair[1] <= lowest_live)
            .map(|pair| pair[0])
            .collect())
    }

    /// Deletes `segments` (from [`unreferenced`](Self::unreferenced)) and syncs the directory.
    /// A segment already gone counts as removed: the aim is its absence.
    pub fn remove(&self, segments: &[u64]) -> io::Result<()> {
        for segment in segments {
            self.readers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(segment);
            match std::fs::remove_file(self.path_of(*segment)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        if segments.is_empty() {
            Ok(())
        } else {
            sync_dir(&self.dir)
        }
    }

    /// The segments on disk, oldest first.
    fn segments(&self) -> io::Result<Vec<u64>> {
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let id = name
                .to_str()
                .and_then(|n| n.strip_suffix(SUFFIX))
                .and_then(|n| n.parse::<u64>().ok());
            ids.extend(id);
        }
        ids.sort_unstable();
        Ok(ids)
    }

    fn reader(&self, segment: u64) -> io::Result<Arc<File>> {
        let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(file) = readers.get(&segment) {
            return Ok(file.clone());
        }
        let file = Arc::new(File::open(self.path_of(segment))?);
        readers.insert(segment, file.clone());
        Ok(file)
    }

    fn path_of(&self, segment: u64) -> PathBuf {
        self.dir.join(format!("{segment:020}{SUFFIX}"))
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    if cfg!(kallina_relay_skip_sync) {
        return Ok(());
    }
    File::open(dir)?.sync_all()
}

struct Reference {
    segment: u64,
    offset: u64,
    len: u32,
    crc: u32,
}

fn encode_reference(segment: u64, offset: u64, len: u32, crc: u32) -> [u8; REFERENCE_LEN] {
    let mut out = [0; REFERENCE_LEN];
    out[0] = REFERENCE_TAG;
    out[1..9].copy_from_slice(&segment.to_be_bytes());
    out[9..17].copy_from_slice(&offset.to_be_bytes());
    out[17..21].copy_from_slice(&len.to_be_bytes());
    out[21..25].copy_from_slice(&crc.to_be_bytes());
    out
}

fn decode_reference(value: &[u8]) -> Option<Reference> {
    if value.len() != REFERENCE_LEN || value[0] != REFERENCE_TAG {
        return None;
    }
    let u64_at = |i: usize| u64::from_be_bytes(value[i..i + 8].try_into().expect("8 bytes"));
    let u32_at = |i: usize| u32::from_be_bytes(value[i..i + 4].try_into().expect("4 bytes"));
    Some(Reference {
        segment: u64_at(1),
        offset: u64_at(9),
        len: u32_at(17),
        crc: u32_at(21),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_records_resolve_and_plain_values_pass_through() {
        let dir = tempfile::tempdir().unwrap();
        let log = BodyLog::open(dir.path()).unwrap();
        let refs = log.append(7, &[b"first", b"second record"]).unwrap();
        assert_eq!(&*log.resolve(&refs[0]).unwrap(), b"first");
        assert_eq!(&*log.resolve(&refs[1]).unwrap(), b"second record");
        assert_eq!(&*log.resolve(b"\x04inline").unwrap(), b"\x04inline");
        // A new log (a reopened database) reads the old segment and writes a new one.
        let reopened = BodyLog::open(dir.path()).unwrap();
        assert_eq!(&*reopened.resolve(&refs[1]).unwrap(), b"second record");
        reopened.append(9, &[b"third"]).unwrap();
        assert_eq!(reopened.segments().unwrap(), vec![7, 9]);
    }

    #[test]
    fn a_changed_byte_is_reported_not_returned() {
        let dir = tempfile::tempdir().unwrap();
        let log = BodyLog::open(dir.path()).unwrap();
        let refs = log.append(1, &[b"the body"]).unwrap();
        let path = log.path_of(1);
        let mut bytes = std::fs::read(&path).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let fresh = BodyLog::open(dir.path()).unwrap();
        let err = fresh.resolve(&refs[0]).unwrap_err().to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
    }

    #[test]
    fn only_segments_below_the_lowest_live_number_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        for first in [1, 10, 20] {
            BodyLog::open(dir.path())
                .unwrap()
                .append(first, &[b"x"])
                .unwrap();
        }
        let log = BodyLog::open(dir.path()).unwrap();
        // 15 is live: segment 10 (10..20) still holds it, segment 1 (1..10) is free.
        assert_eq!(log.unreferenced(15).unwrap(), vec![1]);
        log.remove(&[1]).unwrap();
        assert_eq!(log.segments().unwrap(), vec![10, 20]);
        // The newest segment is never offered: later numbers may go into it.
        assert_eq!(log.unreferenced(u64::MAX).unwrap(), vec![10]);
        log.remove(&[10]).unwrap();
        assert_eq!(log.segments().unwrap(), vec![20]);
        // Removing what is already gone is not an error.
        log.remove(&[10]).unwrap();
        assert_eq!(log.segments().unwrap(), vec![20]);
    }
}

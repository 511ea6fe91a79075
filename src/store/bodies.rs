//! The body log: outbox records in append-only segment files of the store's own, so that sled
//! holds a 25-byte reference per event instead of the whole record.
//!
//! **Why.** sled 0.34.7 rewrites a leaf as it grows and splits it past 16 entries: with
//! ≈ 750-byte records in the outbox tree, every event cost sled several kilobytes of log writes
//! and the `flush` before each answer waited for all of them. Measured on the 2-core VM (three
//! paired ingest runs, a simulation of this layout against the inline one), sled's `flush` per
//! batch went from 3.8 ms to 0.8–1.5 ms and ingest rose by 75 %.
//!
//! **Layout.** `<data_dir>/bodies/<first seq, 20 digits>.log`, each a run of frames of
//! `[u32 length][u32 CRC-32 of the record][u64 sequence number][u32 CRC-32 of the 16 bytes
//! before][the encoded record]`. Segments named `.seg` were written before frames carried their
//! sequence number (`[u32 length][u32 CRC-32][record]`): they are still read through references
//! and removed like the others, and never replayed (everything in them was in sled before it
//! was answered). Every open of the database starts a new segment, so a torn tail left by a
//! crash is never appended to; a segment is also closed once it passes [`SEGMENT_BYTES`].
//! Behind its frames a segment holds zeros up to the next [`ZEROED_AHEAD`] boundary, written
//! and synced with the batch that reached past the previous one (unless that batch is large,
//! [`ZEROED_BATCH_MAX`]): the batches in between
//! overwrite blocks the file already has, so their `fdatasync` writes data and no inode. A zero
//! header fails its checksum, so a reader stops there as it does at a torn tail.
//!
//! **The body log is the store's write-ahead log.** The writer appends a batch's records in one
//! write, `fdatasync`s the segment (and, when it has just created the segment, the directory),
//! and answers: that sync is what a 2xx rests on. sled's dedup keys and references follow on
//! the index thread and are synced lazily; what a power cut takes from sled is written again
//! from here at the next open ([`BodyLog::frames_after`], see `index`). A reference never
//! reaches sled before its body is synced, so sled never holds a dedup key without its event.
//! A failed append or sync leaves no reference to what it wrote; the writer retires the
//! database, and the reopening starts a new segment.
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
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::record::RecordError;

/// The first byte of a stored reference; record format versions are small numbers.
pub const REFERENCE_TAG: u8 = 0xB0;
pub const REFERENCE_LEN: usize = 1 + 8 + 8 + 4 + 4;
/// `[u32 length][u32 CRC-32 of the record][u64 seq][u32 CRC-32 of those 16 bytes]`.
const FRAME_HEADER: usize = 20;
/// A segment is closed once it holds this much (a batch never splits across two).
const SEGMENT_BYTES: u64 = 64 << 20;
/// A segment grows by this much of zeros at a time, written with the batch that needs it (see
/// [`BodyLog::append`]).
const ZEROED_AHEAD: u64 = 1 << 20;
/// Batches at least this large grow the segment by their own frames only: every byte of zeros
/// is written twice in the end (as zeros, then as a frame), and for a batch this size the
/// inode's write costs less than its bytes written twice (100 KB events in two pairs: 181 and
/// 200 MB/s of bodies with zeros after every batch, 255 and 264 MB/s without them for these).
const ZEROED_BATCH_MAX: u64 = ZEROED_AHEAD / 4;
const DIR: &str = "bodies";
const SUFFIX: &str = ".log";
/// Segments written before frames carried their sequence number: read, removed, not replayed.
const SUFFIX_UNNUMBERED: &str = ".seg";

/// A frame read back from the log by [`BodyLog::frames_after`].
pub struct Frame {
    pub seq: u64,
    pub reference: [u8; REFERENCE_LEN],
    pub record: Vec<u8>,
}

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
    /// Where the next frame goes.
    len: u64,
    /// The file's size: frames, then zeros.
    zeroed: u64,
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

    /// Appends `records` (each with its sequence number, ascending) in one write and makes
    /// them durable; returns each one's reference, to be stored in its place.
    pub fn append(&self, records: &[(u64, &[u8])]) -> io::Result<Vec<[u8; REFERENCE_LEN]>> {
        let Some(&(first_seq, _)) = records.first() else {
            return Ok(Vec::new());
        };
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let created = match &*active {
            Some(a) if a.len < SEGMENT_BYTES => false,
            _ => {
                let path = self.dir.join(name_of(first_seq, SUFFIX));
                let file = OpenOptions::new()
                    .create_new(true)
                    .write(true)
                    .open(&path)?;
                *active = Some(Active {
                    id: first_seq,
                    file,
                    len: 0,
                    zeroed: 0,
                });
                true
            }
        };
        let segment = active.as_mut().expect("set above");
        let size: usize = records.iter().map(|(_, r)| FRAME_HEADER + r.len()).sum();
        let mut buffer = Vec::with_capacity(size);
        let mut references = Vec::with_capacity(records.len());
        for (seq, record) in records {
            let len = u32::try_from(record.len())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "record over 4 GiB"))?;
            let crc = crc32fast::hash(record);
            let offset = segment.len + buffer.len() as u64 + FRAME_HEADER as u64;
            let mut header = [0u8; FRAME_HEADER];
            header[0..4].copy_from_slice(&len.to_be_bytes());
            header[4..8].copy_from_slice(&crc.to_be_bytes());
            header[8..16].copy_from_slice(&seq.to_be_bytes());
            let header_crc = crc32fast::hash(&header[..16]);
            header[16..20].copy_from_slice(&header_crc.to_be_bytes());
            buffer.extend_from_slice(&header);
            buffer.extend_from_slice(record);
            references.push(encode_reference(segment.id, offset, len, crc));
        }
        let frames_len = buffer.len() as u64;
        let end = segment.len + frames_len;
        if end > segment.zeroed {
            // Zeros past the frames, synced with them: until the batch that reaches their end,
            // every sync overwrites blocks the file already has and leaves its size alone, so
            // `fdatasync` writes no inode (measured: 0.14 against 0.21 ms at p50 for 30 KB).
            // A zero header fails its checksum, so readers stop there as at a torn tail.
            segment.zeroed = if frames_len < ZEROED_BATCH_MAX {
                end.div_ceil(ZEROED_AHEAD) * ZEROED_AHEAD
            } else {
                end
            };
            buffer.resize((segment.zeroed - segment.len) as usize, 0);
        }
        if let Err(e) = segment.file.write_all_at(&buffer, segment.len) {
            // Nothing more goes into a segment whose write failed part way.
            *active = None;
            return Err(e);
        }
        segment.len = end;
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

    /// Every intact frame numbered above `applied`, in log order, handed to `apply` a chunk
    /// of at most `chunk` at a time: what the index may not hold after a power cut.
    ///
    /// A segment whose successor starts at or below `applied + 1` holds nothing above it and is
    /// not read. Within a segment, the first frame whose header or record fails its checksum,
    /// or is cut short, ends that segment: it is the unsynced tail of a batch that was never
    /// answered (a segment is never appended to after a failed write or sync, nor across an
    /// open), and the next segment, opened later, is read on.
    pub fn frames_after<E: From<io::Error>>(
        &self,
        applied: u64,
        chunk: usize,
        mut apply: impl FnMut(Vec<Frame>) -> Result<(), E>,
    ) -> Result<(), E> {
        let numbered: Vec<u64> = self
            .segments()?
            .into_iter()
            .filter(|id| self.dir.join(name_of(*id, SUFFIX)).exists())
            .collect();
        let first_needed = numbered
            .windows(2)
            .take_while(|pair| pair[1] <= applied.saturating_add(1))
            .count();
        for id in &numbered[first_needed..] {
            let file = File::open(self.dir.join(name_of(*id, SUFFIX)))?;
            let len = file.metadata()?.len();
            let mut offset = 0u64;
            let mut frames = Vec::new();
            while offset + FRAME_HEADER as u64 <= len {
                let mut header = [0u8; FRAME_HEADER];
                file.read_exact_at(&mut header, offset)?;
                let field = |i: usize| u32::from_be_bytes(header[i..i + 4].try_into().expect("4"));
                if crc32fast::hash(&header[..16]) != field(16) {
                    break;
                }
                let record_len = field(0);
                let crc = field(4);
                let seq = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
                let start = offset + FRAME_HEADER as u64;
                if start + u64::from(record_len) > len {
                    break;
                }
                offset = start + u64::from(record_len);
                if seq <= applied {
                    continue;
                }
                let mut record = vec![0; record_len as usize];
                file.read_exact_at(&mut record, start)?;
                if crc32fast::hash(&record) != crc {
                    break;
                }
                frames.push(Frame {
                    seq,
                    reference: encode_reference(*id, start, record_len, crc),
                    record,
                });
                if frames.len() >= chunk {
                    apply(std::mem::take(&mut frames))?;
                }
            }
            if !frames.is_empty() {
                apply(frames)?;
            }
        }
        Ok(())
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
            for suffix in [SUFFIX, SUFFIX_UNNUMBERED] {
                match std::fs::remove_file(self.dir.join(name_of(*segment, suffix))) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
        }
        if segments.is_empty() {
            Ok(())
        } else {
            sync_dir(&self.dir)
        }
    }

    /// The first sequence number of the newest segment: numbers handed out before it was
    /// created, even for a batch whose append then failed.
    pub fn newest_segment(&self) -> io::Result<Option<u64>> {
        Ok(self.segments()?.last().copied())
    }

    /// The segments on disk, oldest first.
    fn segments(&self) -> io::Result<Vec<u64>> {
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let id = name
                .to_str()
                .and_then(|n| n.strip_suffix(SUFFIX).or(n.strip_suffix(SUFFIX_UNNUMBERED)))
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

    /// The segment's file: numbered frames, or else one written before they were.
    fn path_of(&self, segment: u64) -> PathBuf {
        let numbered = self.dir.join(name_of(segment, SUFFIX));
        if numbered.exists() {
            return numbered;
        }
        let unnumbered = self.dir.join(name_of(segment, SUFFIX_UNNUMBERED));
        if unnumbered.exists() {
            unnumbered
        } else {
            numbered
        }
    }
}

fn name_of(segment: u64, suffix: &str) -> String {
    format!("{segment:020}{suffix}")
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
        let refs = log
            .append(&[(7, b"first".as_slice()), (8, b"second record")])
            .unwrap();
        assert_eq!(&*log.resolve(&refs[0]).unwrap(), b"first");
        assert_eq!(&*log.resolve(&refs[1]).unwrap(), b"second record");
        assert_eq!(&*log.resolve(b"\x04inline").unwrap(), b"\x04inline");
        // A new log (a reopened database) reads the old segment and writes a new one.
        let reopened = BodyLog::open(dir.path()).unwrap();
        assert_eq!(&*reopened.resolve(&refs[1]).unwrap(), b"second record");
        reopened.append(&[(9, b"third".as_slice())]).unwrap();
        assert_eq!(reopened.segments().unwrap(), vec![7, 9]);
    }

    #[test]
    fn a_changed_byte_is_reported_not_returned() {
        let dir = tempfile::tempdir().unwrap();
        let log = BodyLog::open(dir.path()).unwrap();
        let refs = log.append(&[(1, b"the body".as_slice())]).unwrap();
        let path = log.path_of(1);
        let mut bytes = std::fs::read(&path).unwrap();
        // The record's last byte; the zeros after it are not part of any record.
        bytes[FRAME_HEADER + b"the body".len() - 1] ^= 1;
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
                .append(&[(first, b"x".as_slice())])
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

    /// What [`BodyLog::frames_after`] hands over: (seq, record) in order.
    fn replayed(log: &BodyLog, applied: u64) -> Vec<(u64, Vec<u8>)> {
        let mut seen = Vec::new();
        log.frames_after(applied, 2, |frames| {
            for frame in frames {
                assert_eq!(&*log.resolve(&frame.reference).unwrap(), frame.record);
                seen.push((frame.seq, frame.record));
            }
            Ok::<_, io::Error>(())
        })
        .unwrap();
        seen
    }

    #[test]
    fn frames_above_the_applied_number_are_replayed_up_to_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log = BodyLog::open(dir.path()).unwrap();
        log.append(&[(1, b"one".as_slice()), (2, b"two"), (3, b"three")])
            .unwrap();
        log.append(&[(5, b"five".as_slice())]).unwrap();
        // A segment from before frames were numbered is never replayed.
        std::fs::write(dir.path().join("bodies").join(name_of(0, ".seg")), b"old").unwrap();
        let all: Vec<u64> = replayed(&log, 0).iter().map(|(s, _)| *s).collect();
        assert_eq!(all, vec![1, 2, 3, 5]);
        assert_eq!(
            replayed(&log, 2),
            vec![(3, b"three".to_vec()), (5, b"five".to_vec())]
        );

        // A power cut in the middle of the next batch: its frames stop counting where the
        // bytes stop being intact, and a later segment is read on.
        let torn = BodyLog::open(dir.path()).unwrap();
        torn.append(&[(6, b"six".as_slice()), (7, b"seven")])
            .unwrap();
        let path = torn.path_of(6);
        let mut bytes = std::fs::read(&path).unwrap();
        let end = 2 * FRAME_HEADER + b"six".len() + b"seven".len();
        bytes[end - 2] ^= 0xff; // the second record's bytes
        std::fs::write(&path, &bytes).unwrap();
        let later = BodyLog::open(dir.path()).unwrap();
        later.append(&[(9, b"nine".as_slice())]).unwrap();
        let seqs: Vec<u64> = replayed(&later, 5).iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![6, 9]);

        // A header cut short ends its segment too.
        std::fs::write(&path, &bytes[..FRAME_HEADER + 3 + 5]).unwrap();
        let seqs: Vec<u64> = replayed(&later, 5).iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![6, 9]);
        // Everything applied: segments wholly below are not read at all.
        assert!(replayed(&later, 9).is_empty());
    }

    #[test]
    fn a_segment_is_zeroed_ahead_of_its_frames_and_read_up_to_them() {
        let dir = tempfile::tempdir().unwrap();
        let log = BodyLog::open(dir.path()).unwrap();
        let size = |log: &BodyLog| std::fs::metadata(log.path_of(1)).unwrap().len();
        // The first batch writes its frames and zeros up to the next boundary, with one sync.
        log.append(&[(1, b"one".as_slice())]).unwrap();
        assert_eq!(size(&log), ZEROED_AHEAD);
        // Batches inside the zeros leave the file's size alone: their fdatasync has no inode
        // to write.
        let record = vec![7u8; 200_000];
        for seq in 2..=6 {
            log.append(&[(seq, record.as_slice())]).unwrap();
            assert_eq!(size(&log), ZEROED_AHEAD);
        }
        // The batch that passes the zeros' end writes the next stretch with it.
        log.append(&[(7, record.as_slice())]).unwrap();
        assert_eq!(size(&log), 2 * ZEROED_AHEAD);
        // A large batch past the zeros brings none: zeros would double the bytes it writes.
        let frames = |records: u64, len: u64| records * (FRAME_HEADER as u64 + len);
        let end = frames(1, 3) + frames(6, 200_000) + frames(3, 300_000);
        let large = vec![8u8; 300_000];
        log.append(&[(8, large.as_slice()), (9, &large), (10, &large)])
            .unwrap();
        assert_eq!(size(&log), end);
        // And a small one after it zeros ahead again.
        log.append(&[(11, b"eleven".as_slice())]).unwrap();
        assert_eq!(size(&log), 3 * ZEROED_AHEAD);
        // The zeros read as the end of the frames, here and after a reopen.
        let seqs: Vec<u64> = replayed(&log, 0).iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (1..=11).collect::<Vec<u64>>());
        let reopened = BodyLog::open(dir.path()).unwrap();
        reopened.append(&[(12, b"twelve".as_slice())]).unwrap();
        let seqs: Vec<u64> = replayed(&reopened, 0).iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (1..=12).collect::<Vec<u64>>());
    }
}

//! The durable heart of the receiver: dedup keys and the outbox, in one sled database.
//!
//! Trees:
//! - `dedup`: dedup key → (receive time, outbox sequence number). Answers "seen before?".
//! - `dedup_by_time`: receive time ‖ key → (). Lets the sweeper expire keys by range scan.
//! - `outbox`: sequence number (big-endian) → [`OutboxRecord`]. The relay reads it in order
//!   and deletes what the broker confirmed.
//!
//! A new event writes its dedup key, time-index entry and outbox record in **one sled
//! transaction**, so there is never a dedup key without its event. Commits are serialised by a
//! short lock so that sequence numbers become visible in order: the relay can then read the
//! outbox as a log. The answer waits for the [group-commit flusher](flusher) to make the
//! write durable; a duplicate waits for the original's write too, so no 2xx ever stands on
//! memory alone.

mod flusher;
mod record;

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use tokio::sync::watch;

pub use flusher::Durability;
pub use record::{OutboxRecord, RecordError};

use flusher::{Nudge, Shared};

/// Why the store could not take or give an event.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the outbox holds {capacity} events waiting for the broker, its configured capacity")]
    Full { capacity: u64 },
    #[error("the store cannot write to disk: {0}")]
    Unwritable(String),
    #[error(
        "data directory {0} is in use by another kallina-relay process \
         (only one process may open it; stop the other one or choose another directory)"
    )]
    Locked(PathBuf),
    #[error("store error: {0}")]
    Sled(#[from] sled::Error),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("the store is closed")]
    Closed,
}

/// How a new event was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// First time this key was seen: the event is durably in the outbox.
    New { seq: u64 },
    /// The key was seen before (within retention); nothing was written.
    Duplicate,
}

/// A dedup entry: when the key was first received and which outbox record it made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DedupEntry {
    received_at_ms: u64,
    seq: u64,
}

impl DedupEntry {
    fn encode(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.received_at_ms.to_be_bytes());
        out[8..].copy_from_slice(&self.seq.to_be_bytes());
        out
    }
    fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; 16] = bytes.try_into().ok()?;
        Some(Self {
            received_at_ms: u64::from_be_bytes(bytes[..8].try_into().ok()?),
            seq: u64::from_be_bytes(bytes[8..].try_into().ok()?),
        })
    }
}

/// What the store has now, for `/readyz` and the metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreStats {
    pub outbox_events: u64,
    pub outbox_capacity: u64,
    pub outbox_oldest_age: Option<Duration>,
    pub dedup_keys: u64,
    pub writable: bool,
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    dedup: sled::Tree,
    dedup_by_time: sled::Tree,
    outbox: sled::Tree,
    /// Serialises commits so that outbox sequence numbers are committed in order.
    commit_lock: Mutex<()>,
    outbox_len: AtomicU64,
    dedup_len: AtomicU64,
    outbox_max: u64,
    nudge: SyncSender<Nudge>,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

/// How to open the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub data_dir: PathBuf,
    pub cache_size: u64,
    pub outbox_max: u64,
}

impl Store {
    /// Opens (or creates) the database; fails with [`StoreError::Locked`] if another process
    /// has it open.
    pub fn open(options: &StoreOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&options.data_dir)
            .map_err(|e| StoreError::Unwritable(format!("{}: {e}", options.data_dir.display())))?;
        let db = sled::Config::new()
            .path(&options.data_dir)
            .cache_capacity(options.cache_size)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(ref io) if io.to_string().contains("could not acquire lock") => {
                    StoreError::Locked(options.data_dir.clone())
                }
                other => StoreError::Sled(other),
            })?;
        let log_file = OpenOptions::new()
            .read(true)
            .open(log_file_path(&options.data_dir))
            .map_err(|e| StoreError::Unwritable(format!("sled log file: {e}")))?;
        let dedup = db.open_tree("dedup")?;
        let dedup_by_time = db.open_tree("dedup_by_time")?;
        let outbox = db.open_tree("outbox")?;
        // Everything recovered at open is already on disk; new numbers start above it.
        let recovered = db.generate_id()?;
        let (durability, _) = watch::channel(Durability {
            durable: recovered,
            failed: None,
        });
        let shared = Arc::new(Shared {
            db: db.clone(),
            log_file,
            committed: AtomicU64::new(recovered),
            writable: true.into(),
            durability,
            last_batch_micros: AtomicU64::new(0),
        });
        let (nudge, nudges) = sync_channel(1);
        let flusher = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("store-flusher".into())
                .spawn(move || flusher::run(shared, nudges))
                .map_err(|e| StoreError::Unwritable(format!("cannot start the flusher: {e}")))?
        };
        let inner = Inner {
            outbox_len: AtomicU64::new(outbox.len() as u64),
            dedup_len: AtomicU64::new(dedup.len() as u64),
            shared,
            dedup,
            dedup_by_time,
            outbox,
            commit_lock: Mutex::new(()),
            outbox_max: options.outbox_max,
            nudge,
            flusher: Mutex::new(Some(flusher)),
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Stores `record` under its dedup key, once, and returns when that is durable.
    pub async fn accept(&self, record: &OutboxRecord) -> Result<Stored, StoreError> {
        let (stored, wait_for) = self.commit(record)?;
        if let Stored::New { .. } = stored {
            // A full channel means a flush is already due: it will cover this write too.
            let _ = self.inner.nudge.try_send(Nudge::Flush);
        }
        self.wait_durable(wait_for).await?;
        Ok(stored)
    }

    fn commit(&self, record: &OutboxRecord) -> Result<(Stored, u64), StoreError> {
        let inner = &*self.inner;
        let key = record.key.as_bytes();
        let encoded = record.encode();
        let mut time_key = record.received_at_ms.to_be_bytes().to_vec();
        time_key.extend_from_slice(key);

        let _order = inner.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        let seq = inner.shared.db.generate_id()?;
        let entry = DedupEntry {
            received_at_ms: record.received_at_ms,
            seq,
        };
        let outcome = (&inner.dedup, &inner.dedup_by_time, &inner.outbox).transaction(
            |(dedup, by_time, outbox)| {
                if let Some(existing) = dedup.get(key)? {
                    return Ok(Err(DedupEntry::decode(&existing).map_or(0, |e| e.seq)));
                }
                if inner.outbox_len.load(Ordering::Relaxed) >= inner.outbox_max {
                    return Err(ConflictableTransactionError::Abort(()));
                }
                dedup.insert(key, &entry.encode()[..])?;
                by_time.insert(time_key.as_slice(), &[][..])?;
                outbox.insert(&seq.to_be_bytes()[..], encoded.as_slice())?;
                Ok(Ok(()))
            },
        );
        match outcome {
            Ok(Ok(())) => {
                inner.outbox_len.fetch_add(1, Ordering::Relaxed);
                inner.dedup_len.fetch_add(1, Ordering::Relaxed);
                inner.shared.committed.store(seq, Ordering::Release);
                Ok((Stored::New { seq }, seq))
            }
            Ok(Err(original_seq)) => Ok((Stored::Duplicate, original_seq)),
            Err(TransactionError::Abort(())) => Err(StoreError::Full {
                capacity: inner.outbox_max,
            }),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// Waits until the write numbered `seq` is on disk (at once if it already is).
    async fn wait_durable(&self, seq: u64) -> Result<(), StoreError> {
        let mut rx = self.inner.shared.durability.subscribe();
        let state = rx
            .wait_for(|d| d.durable >= seq || d.failed.as_ref().is_some_and(|f| f.0 >= seq))
            .await
            .map_err(|_| StoreError::Closed)?;
        if state.durable >= seq {
            Ok(())
        } else {
            let reason = state
                .failed
                .as_ref()
                .map(|f| f.1.to_string())
                .unwrap_or_default();
            Err(StoreError::Unwritable(reason))
        }
    }

    /// Changes whenever more of the outbox becomes durable: the relay's wake-up call.
    pub fn durability(&self) -> watch::Receiver<Durability> {
        self.inner.shared.durability.subscribe()
    }

    /// Up to `limit` durable outbox records with sequence numbers above `after`, oldest first.
    pub fn outbox_after(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, OutboxRecord)>, StoreError> {
        let durable = self.inner.shared.durability.borrow().durable;
        let start = after.map_or(0, |a| a.saturating_add(1));
        if start > durable {
            return Ok(Vec::new());
        }
        self.inner
            .outbox
            .range(start.to_be_bytes()..=durable.to_be_bytes())
            .take(limit)
            .map(|item| {
                let (k, v) = item?;
                let seq = u64::from_be_bytes(k.as_ref().try_into().map_err(|_| {
                    RecordError::Corrupt("outbox key is not a sequence number".into())
                })?);
                Ok((seq, OutboxRecord::decode(&v)?))
            })
            .collect()
    }

    /// Deletes records the broker has confirmed. Not fsync'd on purpose: a deletion lost in a
    /// crash only means the event is published again, which at-least-once allows.
    pub fn remove_published(&self, seqs: &[u64]) -> Result<(), StoreError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for seq in seqs {
            batch.remove(&seq.to_be_bytes()[..]);
        }
        self.inner.outbox.apply_batch(batch)?;
        self.inner
            .outbox_len
            .fetch_sub(seqs.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Deletes dedup keys first received before `now - retention`; returns how many.
    pub fn sweep_expired(&self, retention: Duration) -> Result<u64, StoreError> {
        let cutoff_ms = unix_millis(SystemTime::now()).saturating_sub(retention.as_millis() as u64);
        let inner = &*self.inner;
        let mut removed = 0;
        loop {
            let batch: Vec<sled::IVec> = inner
                .dedup_by_time
                .range(..cutoff_ms.to_be_bytes().to_vec())
                .keys()
                .take(1000)
                .collect::<Result<_, _>>()?;
            if batch.is_empty() {
                return Ok(removed);
            }
            for time_key in &batch {
                let (time, key) = time_key.split_at(8);
                let received_at_ms = u64::from_be_bytes(time.try_into().expect("8 bytes"));
                // Remove the key only if it is still the entry this index line describes.
                if let Some(current) = inner.dedup.get(key)? {
                    let matches = DedupEntry::decode(&current)
                        .is_some_and(|e| e.received_at_ms == received_at_ms);
                    if matches
                        && inner
                            .dedup
                            .compare_and_swap(key, Some(&current), None as Option<&[u8]>)?
                            .is_ok()
                    {
                        inner.dedup_len.fetch_sub(1, Ordering::Relaxed);
                        removed += 1;
                    }
                }
                inner.dedup_by_time.remove(time_key)?;
            }
        }
    }

    pub fn stats(&self) -> StoreStats {
        let inner = &*self.inner;
        let oldest = inner
            .outbox
            .first()
            .ok()
            .flatten()
            .and_then(|(_, v)| OutboxRecord::decode(&v).ok())
            .map(|r| {
                let now = unix_millis(SystemTime::now());
                Duration::from_millis(now.saturating_sub(r.received_at_ms))
            });
        StoreStats {
            outbox_events: inner.outbox_len.load(Ordering::Relaxed),
            outbox_capacity: inner.outbox_max,
            outbox_oldest_age: oldest,
            dedup_keys: inner.dedup_len.load(Ordering::Relaxed),
            writable: inner.shared.writable.load(Ordering::Acquire),
        }
    }

    /// Duration of the most recent flush batch (flush + fdatasync).
    pub fn last_flush_duration(&self) -> Duration {
        Duration::from_micros(self.inner.shared.last_batch_micros.load(Ordering::Relaxed))
    }

    /// Makes everything durable and stops the flusher. Later `accept` calls fail.
    pub fn close(&self) {
        let handle = self
            .inner
            .flusher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(handle) = handle {
            let _ = self.inner.nudge.send(Nudge::Stop);
            let _ = handle.join();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(handle) = self
            .flusher
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = self.nudge.send(Nudge::Stop);
            let _ = handle.join();
        }
    }
}

/// sled 0.34 keeps its log in `<data_dir>/db`.
fn log_file_path(data_dir: &Path) -> PathBuf {
    data_dir.join("db")
}

pub fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(dir: &Path, outbox_max: u64) -> StoreOptions {
        StoreOptions {
            data_dir: dir.to_path_buf(),
            cache_size: 8 << 20,
            outbox_max,
        }
    }

    fn record(key: &str, received_at_ms: u64) -> OutboxRecord {
        OutboxRecord {
            key: key.into(),
            event: "call.ended".into(),
            signature: "sha256=00".into(),
            received_at_ms,
            source: "test".into(),
            body: format!("{{\"k\":\"{key}\"}}").into_bytes(),
        }
    }

    #[tokio::test]
    async fn a_key_is_stored_once_and_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&options(dir.path(), 10)).unwrap();
        let now = unix_millis(SystemTime::now());
        assert!(matches!(
            store.accept(&record("a", now)).await.unwrap(),
            Stored::New { .. }
        ));
        assert_eq!(
            store.accept(&record("a", now)).await.unwrap(),
            Stored::Duplicate
        );
        assert!(matches!(
            store.accept(&record("b", now)).await.unwrap(),
            Stored::New { .. }
        ));
        let pending = store.outbox_after(None, 10).unwrap();
        let keys: Vec<_> = pending.iter().map(|(_, r)| r.key.as_str()).collect();
        assert_eq!(keys, ["a", "b"]);
        assert_eq!(store.outbox_after(Some(pending[0].0), 10).unwrap().len(), 1);
        store.remove_published(&[pending[0].0]).unwrap();
        let stats = store.stats();
        assert_eq!((stats.outbox_events, stats.dedup_keys), (1, 2));
    }

    #[tokio::test]
    async fn a_full_outbox_refuses_new_keys_but_still_answers_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&options(dir.path(), 1)).unwrap();
        let now = unix_millis(SystemTime::now());
        store.accept(&record("a", now)).await.unwrap();
        assert!(matches!(
            store.accept(&record("b", now)).await,
            Err(StoreError::Full { capacity: 1 })
        ));
        assert_eq!(
            store.accept(&record("a", now)).await.unwrap(),
            Stored::Duplicate
        );
    }

    #[tokio::test]
    async fn the_sweeper_expires_only_old_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&options(dir.path(), 10)).unwrap();
        let now = unix_millis(SystemTime::now());
        store.accept(&record("old", now - 3_600_000)).await.unwrap();
        store.accept(&record("new", now)).await.unwrap();
        assert_eq!(store.sweep_expired(Duration::from_secs(60)).unwrap(), 1);
        assert_eq!(store.stats().dedup_keys, 1);
        assert!(matches!(
            store.accept(&record("old", now)).await.unwrap(),
            Stored::New { .. }
        ));
        assert_eq!(
            store.accept(&record("new", now)).await.unwrap(),
            Stored::Duplicate
        );
    }

    #[tokio::test]
    async fn everything_survives_a_reopen_and_a_second_opener_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let now = unix_millis(SystemTime::now());
        {
            let store = Store::open(&options(dir.path(), 10)).unwrap();
            store.accept(&record("a", now)).await.unwrap();
            assert!(matches!(
                Store::open(&options(dir.path(), 10)),
                Err(StoreError::Locked(_))
            ));
            store.close();
        }
        let store = Store::open(&options(dir.path(), 10)).unwrap();
        assert_eq!(
            store.accept(&record("a", now)).await.unwrap(),
            Stored::Duplicate
        );
        assert_eq!(store.stats().outbox_events, 1);
        assert!(matches!(
            store.accept(&record("b", now)).await.unwrap(),
            Stored::New { .. }
        ));
        assert_eq!(store.outbox_after(None, 10).unwrap().len(), 2);
    }
}

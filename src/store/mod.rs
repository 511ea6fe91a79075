//! The durable heart of the receiver: dedup keys and the outbox, in one sled database.
//!
//! Trees:
//! - `dedup`: dedup key → (receive time, outbox sequence number). Answers "seen before?".
//! - `dedup_by_time`: (newest receive time ‖ first sequence number) of a written batch → the
//!   keys it wrote. One entry per batch, not per event; the sweeper expires keys by range scan.
//! - `meta`: the counts of outbox records and dedup keys, kept in the same transactions as the
//!   writes and deletes they count, so that a start never has to scan a million entries (a scan
//!   measured 170 MB of extra peak memory with 1M events waiting).
//! - `outbox`: sequence number (big-endian) → [`OutboxRecord`]. The relay reads it in order
//!   and moves what the broker confirmed to the archive.
//! - `archive`: sequence number → published event, kept for `archive_retention` for the admin
//!   API (see [`archive`]).
//!
//! A new event writes its dedup key, time-index entry and outbox record in **one sled
//! transaction**, so there is never a dedup key without its event. All writes go through one
//! [writer thread](writer), which commits whatever is waiting as one batch, makes it durable
//! with one flush + fdatasync, and only then answers: a 2xx never stands on memory alone. The
//! writer assigns sequence numbers in commit order, so the relay can read the outbox as a log.
//! A duplicate whose original is already durable is answered without the writer.

mod archive;
mod disk;
pub mod options;
mod record;
mod writer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use tokio::sync::{mpsc, oneshot, watch};

pub use archive::{EventPage, EventQuery, EventStatus, EventView, Redelivery};
pub use options::StoreOptions;
pub use record::{OutboxRecord, RecordError};

use writer::{Job, Shared, Slot};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// First time this key was seen: the event is durably in the outbox.
    New,
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

const OUTBOX_COUNT: &[u8] = b"outbox_events";
const DEDUP_COUNT: &[u8] = b"dedup_keys";
const ARCHIVE_COUNT: &[u8] = b"archive_events";

/// A count from `meta`; a database without one (made before counts were kept) is counted once.
fn stored_count(meta: &sled::Tree, name: &[u8], tree: &sled::Tree) -> Result<u64, StoreError> {
    match meta.get(name)? {
        Some(v) => Ok(decode_count(&v)),
        None => {
            let n = tree.len() as u64;
            meta.insert(name, &n.to_be_bytes())?;
            Ok(n)
        }
    }
}

fn decode_count(bytes: &[u8]) -> u64 {
    bytes.try_into().map_or(0, u64::from_be_bytes)
}

/// Adds `delta` to a count inside a transaction.
fn add_count(
    meta: &sled::transaction::TransactionalTree,
    name: &[u8],
    delta: i64,
) -> Result<(), sled::transaction::UnabortableTransactionError> {
    if delta == 0 {
        return Ok(());
    }
    let current = meta.get(name)?.map_or(0, |v| decode_count(&v));
    let updated = current.saturating_add_signed(delta);
    meta.insert(name, &updated.to_be_bytes())?;
    Ok(())
}

fn transaction_error(e: TransactionError<()>) -> StoreError {
    match e {
        TransactionError::Abort(()) => StoreError::Unwritable("transaction aborted".into()),
        TransactionError::Storage(e) => StoreError::Sled(e),
    }
}

/// Key of a `dedup_by_time` entry: big-endian, so that byte order is time order.
struct TimeIndexKey {
    newest_received_at_ms: u64,
    first_seq: u64,
}

impl TimeIndexKey {
    fn encode(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.newest_received_at_ms.to_be_bytes());
        out[8..].copy_from_slice(&self.first_seq.to_be_bytes());
        out
    }
}

/// A batch's keys as one value: each key prefixed by its length (keys are ≤ 255 bytes).
fn encode_keys<'a>(keys: impl Iterator<Item = &'a str>) -> Vec<u8> {
    let mut out = Vec::new();
    for key in keys {
        let len = u8::try_from(key.len()).expect("dedup keys are at most 200 bytes");
        out.push(len);
        out.extend_from_slice(key.as_bytes());
    }
    out
}

fn decode_keys(mut bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let (&len, rest) = bytes.split_first()?;
        let (key, rest) = rest.split_at_checked(len as usize)?;
        bytes = rest;
        Some(key)
    })
}

/// What the store has now, for `/readyz` and the metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreStats {
    pub outbox_events: u64,
    pub outbox_capacity: u64,
    pub outbox_oldest_age: Option<Duration>,
    pub dedup_keys: u64,
    pub archive_events: u64,
    pub writable: bool,
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    slot: Arc<Slot>,
    keep_archive: bool,
    jobs: mpsc::Sender<Job>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Never sent on: dropped with the last handle, after the writer stopped, which is what
    /// [`Store::released`] waits for.
    release: watch::Sender<()>,
    /// Held while the store is open, across reopenings (see [`lock_data_dir`]).
    _lock: std::fs::File,
}

impl Store {
    /// Opens (or creates) the database; fails with [`StoreError::Locked`] if another process
    /// has it open.
    pub fn open(options: &StoreOptions) -> Result<Self, StoreError> {
        let lock = lock_data_dir(&options.data_dir)?;
        let (shared, counts) = open_database(options)?;
        // Everything recovered at open is on disk already; new numbers are above it.
        let (durable, _) = watch::channel(shared.db.generate_id()?);
        let slot = Arc::new(Slot {
            current: RwLock::new(Some(Arc::new(shared))),
            retired: Mutex::new(None),
            durable,
            writable: true.into(),
            outbox_len: AtomicU64::new(counts.outbox),
            dedup_len: AtomicU64::new(counts.dedup),
            archive_len: AtomicU64::new(counts.archive),
            options: options.clone(),
        });
        let (jobs, queue) = mpsc::channel(4 * writer::MAX_BATCH);
        let writer = {
            let slot = slot.clone();
            std::thread::Builder::new()
                .name("store-writer".into())
                .spawn(move || writer::run(slot, queue))
                .map_err(|e| StoreError::Unwritable(format!("cannot start the writer: {e}")))?
        };
        Ok(Self {
            inner: Arc::new(Inner {
                slot,
                keep_archive: options.keeps_archive(),
                jobs,
                writer: Mutex::new(Some(writer)),
                release: watch::channel(()).0,
                _lock: lock,
            }),
        })
    }

    /// The open database, or `Unwritable` while the writer reopens it after a disk error.
    fn shared(&self) -> Result<Arc<Shared>, StoreError> {
        self.inner.slot.get()
    }

    /// Asks the writer to reopen the database if a disk error left it unwritable: sled stays
    /// failed after an I/O error, so once space is back only a reopen brings writes back.
    /// Cheap when the store is writable (nothing is sent).
    pub fn recover(&self) {
        if !self.inner.slot.writable.load(Ordering::Acquire) {
            let _ = self.inner.jobs.try_send(Job::Recover);
        }
    }

    /// True if `key` was stored before and that write is already on disk: a retry that needs
    /// nothing written and nothing waited for.
    pub fn is_durable_duplicate(&self, key: &str) -> Result<bool, StoreError> {
        let slot = &self.inner.slot;
        let found = self.shared()?.dedup.get(key.as_bytes()).inspect_err(|_| {
            // sled fails every operation after an I/O error: readiness must say so at once.
            slot.writable.store(false, Ordering::Release);
        })?;
        let Some(entry) = found.and_then(|v| DedupEntry::decode(&v)) else {
            return Ok(false);
        };
        Ok(entry.seq <= *slot.durable.borrow() && slot.writable.load(Ordering::Acquire))
    }

    /// Stores `record` under its dedup key, once, and returns when that is durable.
    pub async fn accept(&self, record: OutboxRecord) -> Result<Stored, StoreError> {
        if self.is_durable_duplicate(&record.key)? {
            return Ok(Stored::Duplicate);
        }
        let (reply, answer) = oneshot::channel();
        self.inner
            .jobs
            .send(Job::Accept { record, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Changes whenever more of the outbox becomes durable: the relay's wake-up call.
    pub fn durability(&self) -> watch::Receiver<u64> {
        self.inner.slot.durable.subscribe()
    }

    /// Up to `limit` durable outbox records with sequence numbers above `after`, oldest first.
    pub fn outbox_after(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, OutboxRecord)>, StoreError> {
        let durable = *self.inner.slot.durable.borrow();
        let start = after.map_or(0, |a| a.saturating_add(1));
        if start > durable {
            return Ok(Vec::new());
        }
        self.shared()?
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

    /// Moves records the broker has confirmed (sequence number, publish attempts) from the
    /// outbox to the archive, or deletes them when no archive is kept. Not fsync'd on purpose:
    /// a move lost in a crash only means the event is published again, which at-least-once
    /// allows.
    pub fn archive_published(&self, confirmed: &[(u64, u32)]) -> Result<(), StoreError> {
        if confirmed.is_empty() {
            return Ok(());
        }
        let shared = self.shared()?;
        let slot = &self.inner.slot;
        let keep = self.inner.keep_archive;
        let published_at_ms = unix_millis(SystemTime::now());
        let moved = (&shared.outbox, &shared.archive, &shared.meta)
            .transaction(|(outbox, archive, meta)| {
                let mut moved = 0;
                for (seq, attempts) in confirmed {
                    let key = seq.to_be_bytes();
                    if let Some(bytes) = outbox.remove(&key[..])? {
                        if keep {
                            let entry =
                                archive::encode_archived(published_at_ms, *attempts, &bytes);
                            archive.insert(&key[..], entry)?;
                        }
                        moved += 1;
                    }
                }
                add_count(meta, OUTBOX_COUNT, -(moved as i64))?;
                if keep {
                    add_count(meta, ARCHIVE_COUNT, moved as i64)?;
                }
                Ok::<_, ConflictableTransactionError<()>>(moved)
            })
            .map_err(transaction_error)?;
        slot.outbox_len.fetch_sub(moved, Ordering::Relaxed);
        if keep {
            slot.archive_len.fetch_add(moved, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Deletes dedup keys first received before `now - retention`; returns how many.
    pub fn sweep_expired(&self, retention: Duration) -> Result<u64, StoreError> {
        let cutoff_ms = unix_millis(SystemTime::now()).saturating_sub(retention.as_millis() as u64);
        let inner = self.shared()?;
        let mut removed = 0;
        // Batches whose newest event is older than the cutoff hold only expired keys.
        let end = TimeIndexKey {
            newest_received_at_ms: cutoff_ms,
            first_seq: 0,
        }
        .encode();
        loop {
            let Some((index_key, keys)) =
                inner.dedup_by_time.range(..&end[..]).next().transpose()?
            else {
                return Ok(removed);
            };
            // Remove a key only if it is still this old entry (not received again since).
            let swept = (&inner.dedup, &inner.meta)
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
            self.inner
                .slot
                .dedup_len
                .fetch_sub(swept, Ordering::Relaxed);
            removed += swept;
            inner.dedup_by_time.remove(index_key)?;
        }
    }

    pub fn stats(&self) -> StoreStats {
        let slot = &*self.inner.slot;
        let oldest = self
            .shared()
            .ok()
            .and_then(|shared| shared.outbox.first().ok().flatten())
            .and_then(|(_, v)| OutboxRecord::decode(&v).ok())
            .map(|r| {
                let now = unix_millis(SystemTime::now());
                Duration::from_millis(now.saturating_sub(r.received_at_ms))
            });
        StoreStats {
            outbox_events: slot.outbox_len.load(Ordering::Relaxed),
            outbox_capacity: slot.options.outbox_max,
            outbox_oldest_age: oldest,
            dedup_keys: slot.dedup_len.load(Ordering::Relaxed),
            archive_events: slot.archive_len.load(Ordering::Relaxed),
            writable: slot.writable.load(Ordering::Acquire),
        }
    }

    /// Resolves once every handle to the store is gone, this one included (so drop it after
    /// calling this): the writer has stopped and the data directory is free for another
    /// process. HTTP workers drop their handles on their own threads, a moment after their
    /// server stopped, so this is how stopping knows when the store is really closed.
    pub fn released(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut alive = self.inner.release.subscribe();
        async move {
            // No value is ever sent: this returns when the sender is dropped with the store.
            let _ = alive.changed().await;
        }
    }

    /// Answers what is queued, makes everything durable and stops the writer. Later `accept`
    /// calls fail with [`StoreError::Closed`].
    pub fn close(&self) {
        self.inner.stop_writer();
    }
}

impl Inner {
    fn stop_writer(&self) {
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            // A full queue drains within a batch or two: keep offering the stop until it fits.
            while let Err(mpsc::error::TrySendError::Full(_)) = self.jobs.try_send(Job::Stop) {
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = handle.join();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop_writer();
    }
}

/// Counts kept in `meta`, read at open.
struct Counts {
    outbox: u64,
    dedup: u64,
    archive: u64,
}

/// The data directory's own lock file, locked for as long as the store is open: a second
/// process is refused by the lock's kind (`WouldBlock`), not by reading sled's error text, and
/// the lock stays held while the writer closes and reopens sled after a disk error.
fn lock_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File, StoreError> {
    let unwritable =
        |e: std::io::Error| StoreError::Unwritable(format!("{}: {e}", data_dir.display()));
    std::fs::create_dir_all(data_dir).map_err(unwritable)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data_dir.join(LOCK_FILE))
        .map_err(unwritable)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked(data_dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => Err(unwritable(e)),
    }
}

const LOCK_FILE: &str = "kallina-relay.lock";

/// Opens sled on the data directory with its trees, and makes what it recovered durable.
///
/// The cached pages of the store's files are dropped first, so that sled recovers from what
/// the disk holds (see [`disk`]), and everything is synced before this returns: the files and
/// directory entries sled just created, and pages left dirty by an earlier process. So what an
/// open finds counts as durable, at the first start as after a reopen.
fn open_database(options: &StoreOptions) -> Result<(Shared, Counts), StoreError> {
    let unwritable =
        |e: std::io::Error| StoreError::Unwritable(format!("{}: {e}", options.data_dir.display()));
    disk::check_kernel().map_err(StoreError::Unwritable)?;
    disk::evict_cached_pages(&options.data_dir).map_err(unwritable)?;
    std::fs::create_dir_all(&options.data_dir).map_err(unwritable)?;
    let db = sled::Config::new()
        .path(&options.data_dir)
        .cache_capacity(options.cache_size)
        .open()?;
    let data_dir = disk::DataDir::open(&options.data_dir).map_err(unwritable)?;
    let dedup = db.open_tree("dedup")?;
    let dedup_by_time = db.open_tree("dedup_by_time")?;
    let outbox = db.open_tree("outbox")?;
    let archive = db.open_tree("archive")?;
    let meta = db.open_tree("meta")?;
    let counts = Counts {
        outbox: stored_count(&meta, OUTBOX_COUNT, &outbox)?,
        dedup: stored_count(&meta, DEDUP_COUNT, &dedup)?,
        archive: stored_count(&meta, ARCHIVE_COUNT, &archive)?,
    };
    let shared = Shared {
        db,
        data_dir,
        dedup,
        dedup_by_time,
        outbox,
        archive,
        meta,
    };
    shared.make_durable().map_err(StoreError::Unwritable)?;
    Ok((shared, counts))
}

pub fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn options(dir: &Path, outbox_max: u64) -> StoreOptions {
        StoreOptions {
            cache_size: 8 << 20,
            outbox_max,
            ..StoreOptions::at(dir)
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
            redelivered: false,
            attempts_before: 0,
        }
    }

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

    #[tokio::test]
    async fn a_key_is_stored_once_and_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&options(dir.path(), 10)).unwrap();
        let now = unix_millis(SystemTime::now());
        assert!(matches!(
            store.accept(record("a", now)).await.unwrap(),
            Stored::New
        ));
        assert_eq!(
            store.accept(record("a", now)).await.unwrap(),
            Stored::Duplicate
        );
        assert!(matches!(
            store.accept(record("b", now)).await.unwrap(),
            Stored::New
        ));
        let pending = store.outbox_after(None, 10).unwrap();
        let keys: Vec<_> = pending.iter().map(|(_, r)| r.key.as_str()).collect();
        assert_eq!(keys, ["a", "b"]);
        assert_eq!(store.outbox_after(Some(pending[0].0), 10).unwrap().len(), 1);
        store.archive_published(&[(pending[0].0, 1)]).unwrap();
        let stats = store.stats();
        assert_eq!((stats.outbox_events, stats.dedup_keys), (1, 2));
    }

    #[tokio::test]
    async fn a_full_outbox_refuses_new_keys_but_still_answers_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&options(dir.path(), 1)).unwrap();
        let now = unix_millis(SystemTime::now());
        store.accept(record("a", now)).await.unwrap();
        assert!(matches!(
            store.accept(record("b", now)).await,
            Err(StoreError::Full { capacity: 1 })
        ));
        assert_eq!(
            store.accept(record("a", now)).await.unwrap(),
            Stored::Duplicate
        );
    }

    #[tokio::test]
    async fn the_sweeper_expires_only_old_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&options(dir.path(), 10)).unwrap();
        let now = unix_millis(SystemTime::now());
        store.accept(record("old", now - 3_600_000)).await.unwrap();
        store.accept(record("new", now)).await.unwrap();
        assert_eq!(store.sweep_expired(Duration::from_secs(60)).unwrap(), 1);
        assert_eq!(store.stats().dedup_keys, 1);
        assert!(matches!(
            store.accept(record("old", now)).await.unwrap(),
            Stored::New
        ));
        assert_eq!(
            store.accept(record("new", now)).await.unwrap(),
            Stored::Duplicate
        );
    }

    #[tokio::test]
    async fn everything_survives_a_reopen_and_a_second_opener_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let now = unix_millis(SystemTime::now());
        {
            let store = Store::open(&options(dir.path(), 10)).unwrap();
            store.accept(record("a", now)).await.unwrap();
            assert!(matches!(
                Store::open(&options(dir.path(), 10)),
                Err(StoreError::Locked(_))
            ));
            store.close();
        }
        let store = Store::open(&options(dir.path(), 10)).unwrap();
        assert_eq!(
            store.accept(record("a", now)).await.unwrap(),
            Stored::Duplicate
        );
        // The counts come back from `meta`, not from a scan.
        let stats = store.stats();
        assert_eq!((stats.outbox_events, stats.dedup_keys), (1, 1));
        assert!(matches!(
            store.accept(record("b", now)).await.unwrap(),
            Stored::New
        ));
        assert_eq!(store.outbox_after(None, 10).unwrap().len(), 2);
    }
}

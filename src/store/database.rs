//! The open database and what outlives it.
//!
//! [`Database`] is sled with its trees and the data directory it syncs: replaced as a whole
//! when the writer reopens it after a disk error. [`Slot`] lives as long as the store, across
//! reopenings: the database in service (none while it is being reopened), the durability mark
//! the relay waits on, readiness, and the counts. Every other module of the store reaches the
//! database through the slot, so nobody keeps using a database that was taken out of service.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::archive_moves;
use super::bodies::BodyLog;
use super::codec::{
    decode_count, ArchiveMoves, IndexState, ARCHIVE_COUNT, DEDUP_COUNT, OUTBOX_COUNT,
    QUARANTINE_COUNT,
};
use super::dedup_index::DedupIndex;
use super::disk::{self, DataDir};
use super::error::StoreError;
use super::index;
use super::options::StoreOptions;
use super::outbox::Outbox;

pub use super::trees::Database;

/// What lives as long as the store, across reopenings.
pub struct Slot {
    /// Read by every request, replaced only by a retirement or a reopen: an `ArcSwap`, whose
    /// reads write nothing shared. Behind a lock (and an `Arc` clone per read) the two HTTP
    /// workers wrote the lock's and the count's cache lines for every duplicate they answered.
    /// A replacement turns readers' borrows into counted references, so a reopen's wait for
    /// the old database's last reader still sees them.
    pub current: ArcSwapOption<Database>,
    /// A database taken out of service by a failed write or sync, kept until the reopen
    /// can wait for its last reader to let go of it.
    pub retired: Mutex<Option<Arc<Database>>>,
    /// Every outbox sequence number at or below this is on disk and indexed in sled; the relay
    /// reads up to it.
    pub durable: watch::Sender<u64>,
    /// The same mark, for readers that do not wait for it to move: a load of it writes nothing,
    /// where a read of the channel takes its lock. Raised only by [`raise_durable`](Self::raise_durable).
    durable_mark: AtomicU64,
    /// The highest sequence number the writer answered as new: its record is on disk, its
    /// index entries may still be on their way to sled (see [`index`]).
    pub committed: AtomicU64,
    /// Dedup keys of committed events not yet indexed in sled: the writer's "seen before?"
    /// looks here too. Filled by the writer before it answers,
    /// emptied by the index thread once sled has them, and by every install (whose open
    /// replayed them into sled).
    pub unindexed: Mutex<HashSet<String>>,
    /// False from a failed write or sync until a reopen succeeds.
    pub writable: AtomicBool,
    pub outbox_len: AtomicU64,
    pub dedup_len: AtomicU64,
    pub archive_len: AtomicU64,
    pub quarantine_len: AtomicU64,
    /// Held by the archive move: its record in `meta` lists one move at a time.
    pub archive_mover: Mutex<()>,
    pub options: StoreOptions,
}

impl Slot {
    /// Opens the database on the data directory; what it recovers counts as durable.
    pub fn open(options: &StoreOptions) -> Result<Self, StoreError> {
        let (database, counts) = open_database(options)?;
        // Everything recovered at open is on disk already; new numbers are above it.
        let recovered = database.db.generate_id()?;
        let (durable, _) = watch::channel(recovered);
        Ok(Self {
            current: ArcSwapOption::from_pointee(database),
            retired: Mutex::new(None),
            durable_mark: AtomicU64::new(recovered),
            durable,
            committed: AtomicU64::new(0),
            unindexed: Mutex::new(HashSet::new()),
            writable: true.into(),
            outbox_len: AtomicU64::new(counts.outbox),
            dedup_len: AtomicU64::new(counts.dedup),
            archive_len: AtomicU64::new(counts.archive),
            quarantine_len: AtomicU64::new(counts.quarantine),
            archive_mover: Mutex::new(()),
            options: options.clone(),
        })
    }

    /// The database in service, or `Unwritable` while the writer reopens it.
    pub fn database(&self) -> Result<Arc<Database>, StoreError> {
        self.current
            .load_full()
            .ok_or_else(unwritable_while_reopening)
    }

    /// Every outbox sequence number at or below this is durable (see [`durable`](Self::durable)).
    pub fn durable_through(&self) -> u64 {
        self.durable_mark.load(Ordering::Acquire)
    }

    /// Raises the durability mark to `to`, and wakes whoever waits for it, if it is higher.
    pub fn raise_durable(&self, to: u64) {
        self.durable.send_if_modified(|durable| {
            let raise = to > *durable;
            if raise {
                *durable = to;
                self.durable_mark.store(to, Ordering::Release);
            }
            raise
        });
    }

    pub fn is_writable(&self) -> bool {
        self.writable.load(Ordering::Acquire)
    }

    /// Room left in the outbox for new events.
    pub fn outbox_room(&self) -> u64 {
        self.options
            .outbox_max
            .saturating_sub(self.outbox_len.load(Ordering::Relaxed))
    }

    /// Takes the database out of service after a failed write or sync: from now on every
    /// request is refused until a reopen brings back one that the disk vouches for.
    pub fn retire(&self) {
        self.writable.store(false, Ordering::Release);
        let failed = self.current.swap(None);
        if let Some(failed) = failed {
            *self.retired.lock().unwrap_or_else(|p| p.into_inner()) = Some(failed);
        }
    }

    /// Waits (a little) until sled indexes every event answered so far, so that a read after
    /// an answer finds what was answered: the admin API's and the tools' reads, not the relay's
    /// (which reads up to [`durable`](Self::durable)) nor the ingress's.
    pub fn wait_indexed(&self) {
        let target = self.committed.load(Ordering::Acquire);
        let deadline = Instant::now() + Duration::from_secs(5);
        while *self.durable.borrow() < target && self.is_writable() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// [`wait_indexed`](Self::wait_indexed) for async callers.
    pub async fn indexed(&self) {
        let target = self.committed.load(Ordering::Acquire);
        let mut durable = self.durable.subscribe();
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            durable.wait_for(|d| *d >= target || !self.is_writable()),
        )
        .await;
    }

    /// Puts a freshly opened database into service with the counts it read.
    pub fn install(&self, database: Database, counts: Counts) {
        // The open replayed every committed event into sled.
        self.unindexed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.outbox_len.store(counts.outbox, Ordering::Relaxed);
        self.dedup_len.store(counts.dedup, Ordering::Relaxed);
        self.archive_len.store(counts.archive, Ordering::Relaxed);
        self.quarantine_len
            .store(counts.quarantine, Ordering::Relaxed);
        self.current.store(Some(Arc::new(database)));
        self.writable.store(true, Ordering::Release);
    }
}

/// Counts kept in `meta`, read at open.
pub struct Counts {
    pub outbox: u64,
    pub dedup: u64,
    pub archive: u64,
    pub quarantine: u64,
}

/// The counts at open: each is the count its rare moves keep in `meta`, plus the totals the
/// index thread and the archive moves keep in their own records (see [`codec`](super::codec)).
fn read_counts(database: &Database) -> Result<Counts, StoreError> {
    let meta = &database.meta;
    let index = IndexState::read(meta)?;
    let moves = ArchiveMoves::read(meta)?;
    Ok(Counts {
        outbox: stored_count(
            meta,
            OUTBOX_COUNT,
            || database.outbox.count(),
            index.events.wrapping_sub(moves.removed),
        )?,
        dedup: stored_count(
            meta,
            DEDUP_COUNT,
            || Ok(database.dedup.len() as u64),
            index.keys,
        )? + database.dedup_index.len(),
        archive: stored_count(
            meta,
            ARCHIVE_COUNT,
            || Ok(database.archive.len() as u64),
            moves.archived,
        )?,
        quarantine: stored_count(
            meta,
            QUARANTINE_COUNT,
            || Ok(database.quarantine.len() as u64),
            0,
        )?,
    })
}

/// A count from `meta` plus `elsewhere` (wrapping). A database without it (made before counts
/// were kept), or one whose sum is past any real count (which only a defect could leave), is
/// counted once, and the stored part set so that the sum is right.
fn stored_count(
    meta: &sled::Tree,
    name: &[u8],
    count: impl FnOnce() -> Result<u64, StoreError>,
    elsewhere: u64,
) -> Result<u64, StoreError> {
    if let Some(v) = meta.get(name)? {
        let sum = decode_count(&v).wrapping_add(elsewhere);
        if sum <= u64::MAX / 2 {
            return Ok(sum);
        }
        tracing::error!(
            count = %String::from_utf8_lossy(name),
            "a stored count is impossible; counting again"
        );
    }
    let n = count()?;
    meta.insert(name, &n.wrapping_sub(elsewhere).to_be_bytes())?;
    Ok(n)
}

/// Opens sled on the data directory with its trees, and makes what it recovered durable.
///
/// The cached pages of the store's files are dropped first, so that sled recovers from what
/// the disk holds (see [`disk`]), and everything is synced before this returns: the files and
/// directory entries sled just created, and pages left dirty by an earlier process. So what an
/// open finds counts as durable, at the first start as after a reopen.
pub fn open_database(options: &StoreOptions) -> Result<(Database, Counts), StoreError> {
    let unwritable =
        |e: std::io::Error| StoreError::Unwritable(format!("{}: {e}", options.data_dir.display()));
    disk::check_kernel().map_err(StoreError::Unwritable)?;
    disk::evict_cached_pages(&options.data_dir).map_err(unwritable)?;
    std::fs::create_dir_all(&options.data_dir).map_err(unwritable)?;
    let db = open_sled(options)?;
    // Before the data directory's first sync, which then covers `bodies/` and its entry.
    let bodies = BodyLog::open(&options.data_dir).map_err(unwritable)?;
    let data_dir = DataDir::open(&options.data_dir).map_err(unwritable)?;
    let dedup = db.open_tree("dedup")?;
    let dedup_by_time = db.open_tree("dedup_by_time")?;
    let retention_ms = u64::try_from(options.dedup_retention.as_millis()).unwrap_or(u64::MAX);
    let (dedup_index, _) = DedupIndex::open(
        &options.data_dir.join(DEDUP_INDEX_DIR),
        DEDUP_MAP_CAPACITY,
        retention_ms,
    )
    .map_err(unwritable)?;
    let legacy_dedup = (!dedup.is_empty()).into();
    let outbox = Outbox::new(db.open_tree("outbox")?);
    let archive = db.open_tree("archive")?;
    let quarantine = db.open_tree("quarantine")?;
    let meta = db.open_tree("meta")?;
    let database = Database {
        db,
        data_dir,
        dedup,
        dedup_by_time,
        dedup_index,
        legacy_dedup,
        outbox,
        archive,
        quarantine,
        meta,
        bodies,
    };
    // A data directory from before the dedup index: its keys up to sled's mark are in sled.
    let marked = IndexState::read(&database.meta)?.through;
    database.dedup_index.adopt(marked).map_err(unwritable)?;
    index::replay(&database)?;
    archive_moves::finish(&database)?;
    let counts = read_counts(&database)?;
    database.make_durable().map_err(StoreError::Unwritable)?;
    Ok((database, counts))
}

const LOCK_FILE: &str = "kallina-relay.lock";
/// The dedup index's directory, inside the data directory.
const DEDUP_INDEX_DIR: &str = "dedup-index";
/// Keys the dedup index keeps in memory before it writes them to a file: about 4 MiB of map,
/// and as many keys for an open to read again from the body log.
const DEDUP_MAP_CAPACITY: usize = 131_072;

/// The data directory's own lock file, locked for as long as the store is open: a second
/// process is refused by the lock's kind (`WouldBlock`), not by reading sled's error text, and
/// the lock stays held while the writer closes and reopens sled after a disk error.
pub fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File, StoreError> {
    let unwritable =
        |e: std::io::Error| StoreError::Unwritable(format!("{}: {e}", data_dir.display()));
    std::fs::create_dir_all(data_dir).map_err(unwritable)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data_dir.join(LOCK_FILE))
        .map_err(unwritable)?;
    // The lock belongs to the open file, and a child process forked while the store was open
    // holds a copy of its descriptor until the child's exec closes it: a store reopened in
    // that moment (a restart in the same process while another thread starts a program)
    // would find it held. Such a copy goes within milliseconds; another relay does not.
    let deadline = Instant::now() + LOCK_PATIENCE;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked(data_dir.to_path_buf()))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(unwritable(e)),
        }
    }
}

/// How long an open waits for the data directory's lock before it reports another process.
const LOCK_PATIENCE: Duration = Duration::from_secs(2);

/// sled's own lock, on its `db` file, can be held for a moment after the data directory's is
/// free: sled's threads close the file after the store let go of the directory, and a child
/// forked meanwhile keeps a copy until its exec. With the directory's lock held no other relay
/// can hold sled's, so the open waits that moment out as [`lock_data_dir`] does. The held lock
/// is told by its kind, on a descriptor of our own, not by sled's error text.
fn open_sled(options: &StoreOptions) -> Result<sled::Db, StoreError> {
    let deadline = Instant::now() + LOCK_PATIENCE;
    loop {
        match sled::Config::new()
            .path(&options.data_dir)
            .cache_capacity(options.cache_size)
            .open()
        {
            Ok(db) => return Ok(db),
            Err(_) if Instant::now() < deadline && sled_lock_held(&options.data_dir) => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn sled_lock_held(data_dir: &Path) -> bool {
    std::fs::File::open(data_dir.join("db"))
        .is_ok_and(|file| matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock)))
}

pub fn unwritable_while_reopening() -> StoreError {
    StoreError::Unwritable("the database is being reopened after a disk error".into())
}

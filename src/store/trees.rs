//! sled's trees, the body log and the data directory, as one value: what the writer replaces
//! as a whole when it reopens the store after a disk error ([`Database`]). A leaf beside
//! [`database`](super::database), which opens it: the modules that recover what a power cut
//! took at open ([`index`](super::index), [`archive_moves`](super::archive_moves)) work on it
//! without reaching back to the open.

use super::bodies::BodyLog;
use super::dedup_index::DedupIndex;
use super::disk::DataDir;
use super::outbox::Outbox;

/// sled, its trees, and the data directory it syncs.
pub struct Database {
    pub db: sled::Db,
    pub data_dir: DataDir,
    /// Dedup keys stored before the [`DedupIndex`], and keys a redelivery moved to the event's
    /// new number: read after the index until they expire.
    pub dedup: sled::Tree,
    pub dedup_by_time: sled::Tree,
    /// Where new events' dedup keys go (see [`dedup_index`](super::dedup_index)).
    pub dedup_index: DedupIndex,
    /// Whether `dedup` may hold anything: lookups of new keys skip it when it is empty.
    pub legacy_dedup: std::sync::atomic::AtomicBool,
    /// Pending events, new ones in runs (see [`outbox`](super::outbox)).
    pub outbox: Outbox,
    pub archive: sled::Tree,
    /// Outbox records the relay could not publish: see [`super::maintenance::quarantine`].
    pub quarantine: sled::Tree,
    pub meta: sled::Tree,
    /// The outbox records that sled holds references to (see [`super::bodies`]).
    pub bodies: BodyLog,
}

impl Database {
    /// sled's buffers to its files (`flush`), then what sled wrote to stable storage (see
    /// [`disk`](super::disk) for what a sync covers).
    pub fn make_durable(&self) -> Result<(), String> {
        self.db.flush().map_err(|e| e.to_string())?;
        self.data_dir.sync().map_err(|e| format!("sync: {e}"))
    }
}

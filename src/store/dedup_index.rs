//! The dedup index: "was this key stored, and as which event?", without sled's B-tree work per
//! key (see the README's performance section, "2026-12-05, late night", for what that work
//! cost).
//!
//! **Shape.** Keys are reduced to 16-byte fingerprints (the first half of their SHA-256). The
//! newest keys live in a bounded map in memory. When the map holds `map_capacity` keys it is
//! frozen and a thread of the index's own writes it, once, as an immutable sorted file (a
//! *run*), with a Bloom filter and block fences that stay in memory, so that a key that is new
//! costs no disk read. Past [`MAX_RUNS`] runs the thread merges them into one, dropping the
//! entries that outlived the retention on the way. A lookup reads the map, the frozen map, then
//! the runs, newest first: at most one 4-KiB block of each run that its filter lets through.
//!
//! **Durability: the body log is the journal.** The index writes no journal of its own: every
//! key it holds came from a record already synced in the body log. A run becomes part of the
//! index only once it is synced and named by the manifest, which is replaced atomically
//! (written aside, synced, renamed, directory synced) with `flushed_through`: the highest
//! sequence number whose keys are all in named runs. An open keeps what the manifest names,
//! deletes any other run file (a flush or merge a power cut interrupted), and reports
//! `flushed_through`; the caller replays the body log above it into the map, and must keep the
//! body log's segments above it until a later flush moves the mark.
//!
//! **Failures.** A write or sync that fails leaves the manifest as it was and stops the flush
//! thread; every later insert reports the failure, so that the store can retire and reopen,
//! which rebuilds the map from the body log. A block whose checksum fails is an error, never
//! "not found": a lookup that cannot read must not call a stored event new.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

use super::codec::DedupEntry;

/// Runs kept before the flush thread merges them into one: each costs a filter probe per
/// lookup of a new key.
pub const MAX_RUNS: usize = 8;

const ENTRY: usize = 32;
/// Entries per block: a lookup that passes a run's filter reads one block, 4 KiB.
const BLOCK: usize = 128;
const BLOOM_BITS_PER_KEY: u64 = 10;
const BLOOM_PROBES: u64 = 7;
const RUN_MAGIC: &[u8; 8] = b"KRDXRUN1";
const MANIFEST_MAGIC: &[u8; 8] = b"KRDXMAN1";
const MANIFEST: &str = "manifest";
const MANIFEST_NEW: &str = "manifest.new";
const RUN_HEADER: usize = 48;

/// A key as the index holds it.
pub type Fingerprint = [u8; 16];

pub fn fingerprint(key: &str) -> Fingerprint {
    let digest = Sha256::digest(key.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

/// The dedup index of one data directory.
pub struct DedupIndex {
    map_capacity: usize,
    shared: Arc<Shared>,
    flushes: Mutex<Option<SyncSender<Arc<Frozen>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    dir: PathBuf,
    retention_ms: u64,
    state: RwLock<State>,
    /// Why the flush thread stopped, if it did.
    failed: Mutex<Option<String>>,
    /// Serialises manifest writers: the flush thread, and [`DedupIndex::expire`].
    manifest: Mutex<Manifest>,
}

#[derive(Default)]
struct State {
    active: HashMap<Fingerprint, DedupEntry>,
    /// The highest sequence number inserted into `active`.
    active_through: u64,
    frozen: Option<Arc<Frozen>>,
    /// Newest first.
    runs: Arc<Vec<Arc<Run>>>,
}

impl State {
    /// The map, set aside for a flush: lookups still read it until its file is named.
    fn freeze(&mut self) -> Arc<Frozen> {
        let frozen = Arc::new(Frozen {
            map: std::mem::take(&mut self.active),
            through: self.active_through,
        });
        self.frozen = Some(frozen.clone());
        frozen
    }
}

struct Frozen {
    map: HashMap<Fingerprint, DedupEntry>,
    through: u64,
}

#[derive(Clone, Default, PartialEq, Eq, Debug)]
struct Manifest {
    flushed_through: u64,
    /// Run file ids, newest first.
    runs: Vec<u64>,
    next_id: u64,
}

impl DedupIndex {
    /// Opens (or creates) the index in `dir`. Returns it with `flushed_through`: the caller
    /// inserts again every key of the body log above that number.
    pub fn open(dir: &Path, map_capacity: usize, retention_ms: u64) -> io::Result<(Self, u64)> {
        std::fs::create_dir_all(dir)?;
        let manifest = Manifest::read(dir)?;
        // Files no manifest names: a flush or merge a power cut (or an error) interrupted.
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            let stale = match name
                .strip_prefix("run-")
                .and_then(|id| id.parse::<u64>().ok())
            {
                Some(id) => !manifest.runs.contains(&id),
                None => name == MANIFEST_NEW,
            };
            if stale {
                std::fs::remove_file(dir.join(&*name))?;
            }
        }
        let runs = manifest
            .runs
            .iter()
            .map(|id| Run::open(&run_path(dir, *id)).map(Arc::new))
            .collect::<io::Result<Vec<_>>>()?;
        let flushed_through = manifest.flushed_through;
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            retention_ms,
            state: RwLock::new(State {
                runs: Arc::new(runs),
                ..State::default()
            }),
            failed: Mutex::new(None),
            manifest: Mutex::new(manifest),
        });
        let (flushes, queue) = mpsc::sync_channel(1);
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("store-dedup-flush".into())
                .spawn(move || flush_thread(&shared, queue))?
        };
        Ok((
            Self {
                map_capacity: map_capacity.max(1),
                shared,
                flushes: Mutex::new(Some(flushes)),
                thread: Mutex::new(Some(thread)),
            },
            flushed_through,
        ))
    }

    /// The entry stored under `key`, if any.
    pub fn get(&self, key: &str) -> io::Result<Option<DedupEntry>> {
        let fp = fingerprint(key);
        let (frozen, runs) = {
            let state = read(&self.shared.state);
            if let Some(entry) = state.active.get(&fp) {
                return Ok(Some(*entry));
            }
            (state.frozen.clone(), state.runs.clone())
        };
        if let Some(entry) = frozen.as_ref().and_then(|f| f.map.get(&fp)) {
            return Ok(Some(*entry));
        }
        for run in runs.iter() {
            if let Some(entry) = run.get(&fp)? {
                return Ok(Some(entry));
            }
        }
        Ok(None)
    }

    /// Adds entries whose records are synced in the body log, with the highest sequence number
    /// among them (or above them). Fails once a flush has failed.
    pub fn insert<'a>(
        &self,
        entries: impl IntoIterator<Item = (&'a str, DedupEntry)>,
        through: u64,
    ) -> io::Result<()> {
        if let Some(reason) = self.failure() {
            return Err(io::Error::other(reason));
        }
        let frozen = {
            let mut state = write(&self.shared.state);
            state
                .active
                .extend(entries.into_iter().map(|(k, e)| (fingerprint(k), e)));
            state.active_through = state.active_through.max(through);
            // While a flush is in progress the map grows past its capacity rather than wait.
            if state.active.len() < self.map_capacity || state.frozen.is_some() {
                return Ok(());
            }
            state.freeze()
        };
        if let Some(flushes) = &*lock(&self.flushes) {
            // The thread takes the frozen map at once; a full queue cannot happen, since only
            // one map is frozen at a time.
            let _ = flushes.send(frozen);
        }
        Ok(())
    }

    /// Writes the map's keys to a file now, whatever their number, and returns once they are
    /// in one (or the flush failed): a quiet relay's keys must not keep the body log's segments
    /// alive, nor outlive their retention in memory. The maintenance thread calls it before
    /// every sweep.
    pub fn flush(&self) -> io::Result<()> {
        if let Some(reason) = self.failure() {
            return Err(io::Error::other(reason));
        }
        // Only one map is frozen at a time: the flush thread's, if any, goes first.
        let frozen = loop {
            let mut state = write(&self.shared.state);
            if state.frozen.is_none() {
                if state.active.is_empty() {
                    return Ok(());
                }
                break state.freeze();
            }
            drop(state);
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        flush(&self.shared, &frozen).inspect_err(|e| {
            *lock(&self.shared.failed) = Some(format!("dedup index flush: {e}"));
        })
    }

    /// Removes the entries received before `cutoff_ms` from the files (call
    /// [`flush`](Self::flush) first for the map's); returns how many went. A file wholly
    /// expired goes; a small one partly expired is written again without them. A large one
    /// keeps them until the next merge: writing it again at every sweep would cost more than
    /// the disk space its expired entries hold.
    pub fn expire(&self, cutoff_ms: u64) -> io::Result<u64> {
        let mut manifest = lock(&self.shared.manifest);
        let runs = read(&self.shared.state).runs.clone();
        let rewrite_at_most = self.map_capacity.saturating_mul(4);
        let expires = |r: &Run| {
            r.newest_received_ms < cutoff_ms
                || (r.oldest_received_ms < cutoff_ms && r.len <= rewrite_at_most)
        };
        if !runs.iter().any(|r| expires(r)) {
            return Ok(0);
        }
        let mut removed = 0u64;
        let mut kept = Vec::with_capacity(runs.len());
        let mut next_id = manifest.next_id;
        for run in runs.iter() {
            if !expires(run) {
                kept.push(run.clone());
                continue;
            }
            if run.newest_received_ms < cutoff_ms {
                removed += run.len as u64;
                continue;
            }
            let entries: Vec<_> = run
                .entries()?
                .into_iter()
                .filter(|(_, e)| e.received_at_ms >= cutoff_ms)
                .collect();
            removed += (run.len - entries.len()) as u64;
            if !entries.is_empty() {
                let id = next_id;
                next_id += 1;
                kept.push(Arc::new(Run::write(
                    &run_path(&self.shared.dir, id),
                    id,
                    &entries,
                )?));
            }
        }
        let next = Manifest {
            runs: kept.iter().map(|r| r.id).collect(),
            next_id,
            ..manifest.clone()
        };
        next.write(&self.shared.dir)?;
        *manifest = next;
        write(&self.shared.state).runs = Arc::new(kept);
        for run in runs.iter() {
            if !manifest.runs.contains(&run.id) {
                let _ = std::fs::remove_file(run_path(&self.shared.dir, run.id));
            }
        }
        Ok(removed)
    }

    /// Entries held, the expired ones not yet dropped included.
    pub fn len(&self) -> u64 {
        let state = read(&self.shared.state);
        state.active.len() as u64
            + state.frozen.as_ref().map_or(0, |f| f.map.len() as u64)
            + state.runs.iter().map(|r| r.len as u64).sum::<u64>()
    }

    /// On a data directory that had no dedup index: the keys up to `through` are elsewhere (in
    /// sled, where the store kept them before), so the replay starts above it. Does nothing
    /// once a manifest exists.
    pub fn adopt(&self, through: u64) -> io::Result<()> {
        let mut manifest = lock(&self.shared.manifest);
        if self.shared.dir.join(MANIFEST).exists() {
            return Ok(());
        }
        let next = Manifest {
            flushed_through: through,
            ..manifest.clone()
        };
        next.write(&self.shared.dir)?;
        *manifest = next;
        Ok(())
    }

    /// The highest sequence number whose keys are all in synced runs: the body log must keep
    /// its segments above it.
    pub fn flushed_through(&self) -> u64 {
        lock(&self.shared.manifest).flushed_through
    }

    /// Why flushing stopped, if it did.
    pub fn failure(&self) -> Option<String> {
        lock(&self.shared.failed).clone()
    }

    /// Waits for a flush in progress; the map is not flushed (the body log holds it).
    pub fn close(&self) {
        lock(&self.flushes).take();
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

impl Drop for DedupIndex {
    fn drop(&mut self) {
        self.close();
    }
}

fn flush_thread(shared: &Shared, queue: Receiver<Arc<Frozen>>) {
    for frozen in queue {
        if let Err(e) = flush(shared, &frozen) {
            tracing::error!(error = %e, "dedup index flush failed; the store must reopen");
            *lock(&shared.failed) = Some(format!("dedup index flush: {e}"));
            return;
        }
    }
}

fn flush(shared: &Shared, frozen: &Frozen) -> io::Result<()> {
    let mut entries: Vec<(Fingerprint, DedupEntry)> =
        frozen.map.iter().map(|(f, e)| (*f, *e)).collect();
    entries.sort_unstable_by_key(|e| e.0);
    let mut manifest = lock(&shared.manifest);
    let id = manifest.next_id;
    let run = Arc::new(Run::write(&run_path(&shared.dir, id), id, &entries)?);
    let next = Manifest {
        flushed_through: manifest.flushed_through.max(frozen.through),
        runs: std::iter::once(id)
            .chain(manifest.runs.iter().copied())
            .collect(),
        next_id: id + 1,
    };
    next.write(&shared.dir)?;
    *manifest = next;
    let runs = {
        let mut state = write(&shared.state);
        let mut runs = Vec::with_capacity(state.runs.len() + 1);
        runs.push(run);
        runs.extend(state.runs.iter().cloned());
        state.runs = Arc::new(runs);
        state.frozen = None;
        state.runs.clone()
    };
    if runs.len() > MAX_RUNS {
        merge(shared, &mut manifest, &runs)?;
    }
    Ok(())
}

/// Merges `runs` (the index's runs, newest first) into one, dropping expired entries; only the
/// flush thread merges, with the manifest held, so the runs cannot change meanwhile.
fn merge(shared: &Shared, manifest: &mut Manifest, runs: &[Arc<Run>]) -> io::Result<()> {
    let cutoff_ms =
        super::codec::unix_millis(std::time::SystemTime::now()).saturating_sub(shared.retention_ms);
    // A k-way merge over the runs (newest first): for a key in several, the newest run's
    // entry wins. One block of each run in memory at a time.
    let mut cursors: Vec<Cursor> = runs.iter().map(|r| Cursor::new(r)).collect();
    let mut heads = std::collections::BinaryHeap::new();
    for (i, cursor) in cursors.iter_mut().enumerate() {
        if let Some((fp, entry)) = cursor.next()? {
            heads.push(std::cmp::Reverse((fp, i, entry.received_at_ms, entry.seq)));
        }
    }
    let id = manifest.next_id;
    let at_most = runs.iter().map(|r| r.len).sum();
    let mut writer = RunWriter::create(&run_path(&shared.dir, id), id, at_most)?;
    let mut last: Option<Fingerprint> = None;
    while let Some(std::cmp::Reverse((fp, i, received_at_ms, seq))) = heads.pop() {
        if let Some((next_fp, entry)) = cursors[i].next()? {
            heads.push(std::cmp::Reverse((
                next_fp,
                i,
                entry.received_at_ms,
                entry.seq,
            )));
        }
        // The first of equal keys off the heap is the newest run's (lowest index).
        if last == Some(fp) || received_at_ms < cutoff_ms {
            last = Some(fp);
            continue;
        }
        last = Some(fp);
        writer.push(
            &fp,
            DedupEntry {
                received_at_ms,
                seq,
            },
        )?;
    }
    let run = Arc::new(writer.finish()?);
    let next = Manifest {
        runs: vec![id],
        next_id: id + 1,
        ..manifest.clone()
    };
    next.write(&shared.dir)?;
    *manifest = next;
    write(&shared.state).runs = Arc::new(vec![run]);
    for old in runs {
        let _ = std::fs::remove_file(run_path(&shared.dir, old.id));
    }
    Ok(())
}

/// One immutable sorted file: a header, the entries, then each block's checksum, the block
/// fences and the Bloom filter, and a checksum of those.
struct Run {
    id: u64,
    file: File,
    len: usize,
    newest_received_ms: u64,
    oldest_received_ms: u64,
    block_crcs: Vec<u32>,
    /// The first fingerprint of each block.
    fences: Vec<Fingerprint>,
    bloom: Vec<u64>,
}

/// Writes a run as its sorted entries come, in constant memory but for its filter and fences:
/// a merge streams millions of entries through it.
struct RunWriter {
    id: u64,
    out: std::io::BufWriter<File>,
    len: usize,
    newest_received_ms: u64,
    oldest_received_ms: u64,
    block: crc32fast::Hasher,
    block_crcs: Vec<u32>,
    fences: Vec<Fingerprint>,
    bloom: Vec<u64>,
}

impl RunWriter {
    /// `at_most` entries will come: the filter is sized for them.
    fn create(path: &Path, id: u64, at_most: usize) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        let mut out = std::io::BufWriter::with_capacity(1 << 16, file);
        // The header goes last, over these zeros, once the counts are known.
        std::io::Write::write_all(&mut out, &[0u8; RUN_HEADER])?;
        let bloom_bits = (at_most as u64 * BLOOM_BITS_PER_KEY).max(64);
        Ok(Self {
            id,
            out,
            len: 0,
            newest_received_ms: 0,
            oldest_received_ms: u64::MAX,
            block: crc32fast::Hasher::new(),
            block_crcs: Vec::new(),
            fences: Vec::new(),
            bloom: vec![0u64; bloom_bits.div_ceil(64) as usize],
        })
    }

    fn push(&mut self, fp: &Fingerprint, entry: DedupEntry) -> io::Result<()> {
        if self.len.is_multiple_of(BLOCK) {
            if self.len > 0 {
                let done = std::mem::replace(&mut self.block, crc32fast::Hasher::new());
                self.block_crcs.push(done.finalize());
            }
            self.fences.push(*fp);
        }
        let mut bytes = [0u8; ENTRY];
        bytes[..16].copy_from_slice(fp);
        bytes[16..].copy_from_slice(&entry.encode());
        self.block.update(&bytes);
        std::io::Write::write_all(&mut self.out, &bytes)?;
        for bit in bloom_bits_of(fp, self.bloom.len() as u64 * 64) {
            self.bloom[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        self.newest_received_ms = self.newest_received_ms.max(entry.received_at_ms);
        self.oldest_received_ms = self.oldest_received_ms.min(entry.received_at_ms);
        self.len += 1;
        Ok(())
    }

    /// Writes the block checksums, fences, filter and header, and syncs the file.
    fn finish(mut self) -> io::Result<Run> {
        // The last block, full or not, is still open.
        if self.len > 0 {
            let done = std::mem::replace(&mut self.block, crc32fast::Hasher::new());
            self.block_crcs.push(done.finalize());
        }
        if self.len == 0 {
            self.oldest_received_ms = 0;
        }
        let mut meta = Vec::with_capacity(self.block_crcs.len() * 20 + self.bloom.len() * 8 + 4);
        for crc in &self.block_crcs {
            meta.extend_from_slice(&crc.to_le_bytes());
        }
        for fence in &self.fences {
            meta.extend_from_slice(fence);
        }
        for word in &self.bloom {
            meta.extend_from_slice(&word.to_le_bytes());
        }
        let meta_crc = crc32fast::hash(&meta);
        meta.extend_from_slice(&meta_crc.to_le_bytes());
        std::io::Write::write_all(&mut self.out, &meta)?;
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        let mut header = Vec::with_capacity(RUN_HEADER);
        header.extend_from_slice(RUN_MAGIC);
        header.extend_from_slice(&(self.len as u64).to_le_bytes());
        header.extend_from_slice(&(self.bloom.len() as u64).to_le_bytes());
        header.extend_from_slice(&self.newest_received_ms.to_le_bytes());
        header.extend_from_slice(&self.oldest_received_ms.to_le_bytes());
        header.extend_from_slice(&[0u8; 4]);
        let header_crc = crc32fast::hash(&header);
        header.extend_from_slice(&header_crc.to_le_bytes());
        file.write_all_at(&header, 0)?;
        file.sync_all()?;
        Ok(Run {
            id: self.id,
            file,
            len: self.len,
            newest_received_ms: self.newest_received_ms,
            oldest_received_ms: self.oldest_received_ms,
            block_crcs: self.block_crcs,
            fences: self.fences,
            bloom: self.bloom,
        })
    }
}

/// A run's entries in order, one block in memory at a time.
struct Cursor<'a> {
    run: &'a Run,
    block: usize,
    entries: Vec<u8>,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn new(run: &'a Run) -> Self {
        Self {
            run,
            block: 0,
            entries: Vec::new(),
            at: 0,
        }
    }

    fn next(&mut self) -> io::Result<Option<(Fingerprint, DedupEntry)>> {
        if self.at == self.entries.len() {
            if self.block == self.run.fences.len() {
                return Ok(None);
            }
            self.entries = self.run.block(self.block)?;
            self.block += 1;
            self.at = 0;
        }
        let e = &self.entries[self.at..self.at + ENTRY];
        self.at += ENTRY;
        let fp: Fingerprint = e[..16].try_into().expect("16 bytes");
        let entry = DedupEntry::decode(&e[16..]).expect("16 bytes");
        Ok(Some((fp, entry)))
    }
}

impl Run {
    fn write(path: &Path, id: u64, entries: &[(Fingerprint, DedupEntry)]) -> io::Result<Self> {
        let mut writer = RunWriter::create(path, id, entries.len())?;
        for (fp, entry) in entries {
            writer.push(fp, *entry)?;
        }
        writer.finish()
    }

    fn open(path: &Path) -> io::Result<Self> {
        let corrupt = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {what}", path.display()),
            )
        };
        let id = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("run-"))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| corrupt("not a run file"))?;
        let file = OpenOptions::new().read(true).open(path)?;
        let mut header = [0u8; RUN_HEADER];
        file.read_exact_at(&mut header, 0)?;
        let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        if &header[..8] != RUN_MAGIC
            || crc32fast::hash(&header[..RUN_HEADER - 4]).to_le_bytes() != header[RUN_HEADER - 4..]
        {
            return Err(corrupt("bad header"));
        }
        let len = usize::try_from(u64_at(&header, 8)).map_err(|_| corrupt("bad length"))?;
        let bloom_words =
            usize::try_from(u64_at(&header, 16)).map_err(|_| corrupt("bad filter"))?;
        let newest_received_ms = u64_at(&header, 24);
        let oldest_received_ms = u64_at(&header, 32);
        let blocks = len.div_ceil(BLOCK);
        let meta_len = blocks * 4 + blocks * 16 + bloom_words * 8;
        let mut meta = vec![0u8; meta_len + 4];
        file.read_exact_at(&mut meta, (RUN_HEADER + len * ENTRY) as u64)?;
        if crc32fast::hash(&meta[..meta_len]).to_le_bytes() != meta[meta_len..] {
            return Err(corrupt("bad checksum of its filter and fences"));
        }
        let (crcs, rest) = meta[..meta_len].split_at(blocks * 4);
        let (fences, bloom) = rest.split_at(blocks * 16);
        Ok(Self {
            id,
            file,
            len,
            newest_received_ms,
            oldest_received_ms,
            block_crcs: crcs
                .chunks(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            fences: fences.chunks(16).map(|c| c.try_into().unwrap()).collect(),
            bloom: bloom
                .chunks(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        })
    }

    fn may_hold(&self, fp: &Fingerprint) -> bool {
        bloom_bits_of(fp, self.bloom.len() as u64 * 64)
            .all(|bit| self.bloom[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }

    fn get(&self, fp: &Fingerprint) -> io::Result<Option<DedupEntry>> {
        if self.len == 0 || !self.may_hold(fp) {
            return Ok(None);
        }
        let Some(block) = self.fences.partition_point(|f| f <= fp).checked_sub(1) else {
            return Ok(None);
        };
        let entries = self.block(block)?;
        let found = entries
            .chunks(ENTRY)
            .collect::<Vec<_>>()
            .binary_search_by(|e| e[..16].cmp(&fp[..]));
        Ok(found
            .ok()
            .and_then(|i| DedupEntry::decode(&entries[i * ENTRY + 16..(i + 1) * ENTRY])))
    }

    fn block(&self, block: usize) -> io::Result<Vec<u8>> {
        let first = block * BLOCK;
        let count = BLOCK.min(self.len - first);
        let mut bytes = vec![0u8; count * ENTRY];
        self.file
            .read_exact_at(&mut bytes, (RUN_HEADER + first * ENTRY) as u64)?;
        if crc32fast::hash(&bytes) != self.block_crcs[block] {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "dedup index run {}: block {block} fails its checksum",
                    self.id
                ),
            ));
        }
        Ok(bytes)
    }

    fn entries(&self) -> io::Result<Vec<(Fingerprint, DedupEntry)>> {
        let mut out = Vec::with_capacity(self.len);
        for block in 0..self.fences.len() {
            let bytes = self.block(block)?;
            for e in bytes.chunks(ENTRY) {
                let fp: Fingerprint = e[..16].try_into().expect("16 bytes");
                let entry = DedupEntry::decode(&e[16..]).expect("16 bytes");
                out.push((fp, entry));
            }
        }
        Ok(out)
    }
}

/// The filter's bits for a fingerprint: double hashing over its two halves, which SHA-256
/// already made uniform.
fn bloom_bits_of(fp: &Fingerprint, bits: u64) -> impl Iterator<Item = u64> {
    let h1 = u64::from_le_bytes(fp[..8].try_into().expect("8 bytes"));
    let h2 = u64::from_le_bytes(fp[8..].try_into().expect("8 bytes")) | 1;
    (0..BLOOM_PROBES).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % bits)
}

impl Manifest {
    fn read(dir: &Path) -> io::Result<Self> {
        let bytes = match std::fs::read(dir.join(MANIFEST)) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(e),
        };
        let corrupt = || io::Error::new(io::ErrorKind::InvalidData, "dedup index manifest");
        if bytes.len() < 32 || &bytes[..8] != MANIFEST_MAGIC {
            return Err(corrupt());
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(body).to_le_bytes() != crc {
            return Err(corrupt());
        }
        let words: Vec<u64> = body[8..]
            .chunks(8)
            .map(|c| c.try_into().map(u64::from_le_bytes).map_err(|_| corrupt()))
            .collect::<io::Result<_>>()?;
        let [flushed_through, next_id, count, runs @ ..] = &words[..] else {
            return Err(corrupt());
        };
        if runs.len() as u64 != *count {
            return Err(corrupt());
        }
        Ok(Self {
            flushed_through: *flushed_through,
            runs: runs.to_vec(),
            next_id: *next_id,
        })
    }

    /// Replaces the manifest: written aside and synced, renamed over, the directory synced.
    fn write(&self, dir: &Path) -> io::Result<()> {
        let mut out = MANIFEST_MAGIC.to_vec();
        for word in [self.flushed_through, self.next_id, self.runs.len() as u64]
            .into_iter()
            .chain(self.runs.iter().copied())
        {
            out.extend_from_slice(&word.to_le_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        let aside = dir.join(MANIFEST_NEW);
        {
            let file = File::create(&aside)?;
            file.write_all_at(&out, 0)?;
            file.sync_all()?;
        }
        std::fs::rename(&aside, dir.join(MANIFEST))?;
        File::open(dir)?.sync_all()
    }
}

fn run_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("run-{id}"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_MS: u64 = 86_400_000;

    fn entry(seq: u64, received_at_ms: u64) -> DedupEntry {
        DedupEntry {
            received_at_ms,
            seq,
        }
    }

    fn now() -> u64 {
        super::super::codec::unix_millis(std::time::SystemTime::now())
    }

    /// Inserts keys `k<from>..k<to>` as events `from..to`, received at `at`.
    fn insert_range(index: &DedupIndex, from: u64, to: u64, at: u64) {
        let keys: Vec<String> = (from..to).map(|i| format!("k{i}")).collect();
        index
            .insert(
                keys.iter()
                    .zip(from..to)
                    .map(|(k, i)| (k.as_str(), entry(i, at))),
                to - 1,
            )
            .unwrap();
    }

    /// An index in `dir` whose keys `k0..k10` (events 0..10, received at `at`) are in one
    /// run, closed.
    fn with_one_run(dir: &Path, at: u64) {
        let (index, _) = DedupIndex::open(dir, 10, DAY_MS).unwrap();
        insert_range(&index, 0, 10, at);
        settle(&index, 1);
    }

    /// Waits until no frozen map is left and `runs` runs are named (a merge follows the flush
    /// that makes one run too many).
    fn settle(index: &DedupIndex, runs: usize) {
        for _ in 0..500 {
            let state = read(&index.shared.state);
            if state.frozen.is_none() && state.runs.len() == runs {
                return;
            }
            drop(state);
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let state = read(&index.shared.state);
        panic!(
            "the flush thread did not settle at {runs} runs: {} runs, frozen {}",
            state.runs.len(),
            state.frozen.is_some()
        );
    }

    #[test]
    fn a_key_is_found_in_the_map_in_a_run_and_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let t = now();
        let (index, through) = DedupIndex::open(dir.path(), 100, DAY_MS).unwrap();
        assert_eq!(through, 0);
        insert_range(&index, 1, 101, t);
        settle(&index, 1);
        insert_range(&index, 101, 151, t);
        assert_eq!(index.get("k7").unwrap(), Some(entry(7, t)), "in a run");
        assert_eq!(
            index.get("k120").unwrap(),
            Some(entry(120, t)),
            "in the map"
        );
        assert_eq!(index.get("k999").unwrap(), None);
        assert_eq!(index.flushed_through(), 100);
        drop(index);

        let (index, through) = DedupIndex::open(dir.path(), 100, DAY_MS).unwrap();
        assert_eq!(through, 100, "the map's keys are the body log's to replay");
        assert_eq!(index.get("k7").unwrap(), Some(entry(7, t)));
        assert_eq!(index.get("k120").unwrap(), None);
    }

    #[test]
    fn no_new_key_is_taken_for_a_stored_one_across_many_runs_and_a_merge() {
        let dir = tempfile::tempdir().unwrap();
        let t = now();
        let (index, _) = DedupIndex::open(dir.path(), 1000, DAY_MS).unwrap();
        for run in 0..(MAX_RUNS as u64 + 1) {
            insert_range(&index, run * 1000, run * 1000 + 1000, t);
            let expected = if run as usize + 1 > MAX_RUNS {
                1
            } else {
                run as usize + 1
            };
            settle(&index, expected);
        }
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 2, "one merged run and the manifest");
        for i in 0..(MAX_RUNS as u64 + 1) * 1000 {
            assert_eq!(index.get(&format!("k{i}")).unwrap(), Some(entry(i, t)));
        }
        let false_hits = (0..10_000)
            .filter(|i| index.get(&format!("new{i}")).unwrap().is_some())
            .count();
        assert_eq!(false_hits, 0);
        assert_eq!(index.len(), (MAX_RUNS as u64 + 1) * 1000);
    }

    #[test]
    fn expired_runs_are_dropped_and_a_merge_drops_expired_entries() {
        let dir = tempfile::tempdir().unwrap();
        let t = now();
        let old = t - 2 * DAY_MS;
        let (index, _) = DedupIndex::open(dir.path(), 10, DAY_MS).unwrap();
        insert_range(&index, 0, 10, old);
        settle(&index, 1);
        insert_range(&index, 10, 20, t);
        settle(&index, 2);
        assert_eq!(index.expire(t - DAY_MS).unwrap(), 10);
        assert_eq!(index.get("k3").unwrap(), None);
        assert_eq!(index.get("k13").unwrap(), Some(entry(13, t)));

        // A run of old and new keys keeps only the new ones through a merge.
        for run in 0..MAX_RUNS as u64 {
            let at = if run == 0 { old } else { t };
            insert_range(&index, 100 + run * 10, 110 + run * 10, at);
            let merged = run as usize + 2 > MAX_RUNS;
            settle(&index, if merged { 1 } else { run as usize + 2 });
        }
        assert_eq!(index.get("k105").unwrap(), None, "expired, merged away");
        assert_eq!(index.get("k115").unwrap(), Some(entry(115, t)));
        assert_eq!(index.get("k13").unwrap(), Some(entry(13, t)));
    }

    #[test]
    fn a_run_no_manifest_names_is_removed_at_open_and_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let t = now();
        with_one_run(dir.path(), t);
        // A flush a power cut interrupted: its run written, the manifest not replaced.
        Run::write(
            &run_path(dir.path(), 7),
            7,
            &[(fingerprint("ghost"), entry(99, t))],
        )
        .unwrap();
        std::fs::write(dir.path().join(MANIFEST_NEW), b"torn").unwrap();

        let (index, through) = DedupIndex::open(dir.path(), 10, DAY_MS).unwrap();
        assert_eq!(through, 9);
        assert_eq!(index.get("ghost").unwrap(), None);
        assert!(!run_path(dir.path(), 7).exists());
        assert!(!dir.path().join(MANIFEST_NEW).exists());
        assert_eq!(index.get("k4").unwrap(), Some(entry(4, t)));
    }

    #[test]
    fn a_damaged_block_is_an_error_not_a_new_key() {
        let dir = tempfile::tempdir().unwrap();
        let t = now();
        with_one_run(dir.path(), t);
        let path = run_path(dir.path(), 0);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[RUN_HEADER + 20] ^= 0xFF;
        std::fs::write(&path, bytes).unwrap();

        let (index, _) = DedupIndex::open(dir.path(), 10, DAY_MS).unwrap();
        let errors = (0..10)
            .filter(|i| index.get(&format!("k{i}")).is_err())
            .count();
        assert_eq!(
            errors, 10,
            "every key of the damaged block's run is an error"
        );
    }

    #[test]
    fn a_failed_flush_fails_every_later_insert() {
        let dir = tempfile::tempdir().unwrap();
        let t = now();
        let (index, _) = DedupIndex::open(dir.path(), 10, DAY_MS).unwrap();
        // The directory goes: the run cannot be created.
        std::fs::remove_dir_all(dir.path()).unwrap();
        insert_range(&index, 0, 10, t);
        for _ in 0..500 {
            if index.failure().is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(index.failure().is_some());
        let keys = ["k10".to_string()];
        assert!(index
            .insert(keys.iter().map(|k| (k.as_str(), entry(10, t))), 10)
            .is_err());
        assert_eq!(
            index.get("k3").unwrap(),
            Some(entry(3, t)),
            "still in the frozen map"
        );
    }
}

//! The read side: what the relay, the admin API and readiness ask the store. Nothing here
//! writes; every read goes through the [`Slot`], so a database taken out of service after a
//! disk error answers nobody.
//!
//! A confirmed event moves from `outbox` to `archive` under the same sequence number, so an
//! event is always in exactly one of the two, and its dedup entry (key → sequence number)
//! finds it in either. Both hold either the record or a reference into the body log, which
//! every read resolves (see [`super::bodies`]).

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use super::bodies::BodyLog;
use super::codec::{decode_archived, decode_quarantined, seq_key, seq_of, unix_millis};
use super::database::{unwritable_while_reopening, Database, Slot};
use super::error::StoreError;
use super::index::stored_entry;
use super::record::{delivery_key, OutboxRecord, RecordError};

/// Most records one page of [`list_events`] reads, matching or not.
const SCAN_LIMIT: usize = 10_000;

/// A durable outbox record and its sequence number, as the relay reads them.
#[derive(Debug, Clone)]
pub struct OutboxEntry {
    pub seq: u64,
    pub record: OutboxRecord,
}

/// What one read of the outbox found: the records in order, and those that do not decode
/// (the relay quarantines them rather than stall on them).
#[derive(Debug, Default)]
pub struct OutboxRead {
    pub entries: Vec<OutboxEntry>,
    pub unreadable: Vec<Unreadable>,
}

impl OutboxRead {
    /// The highest sequence number read, readable or not: where the next read starts.
    pub fn last_seq(&self) -> Option<u64> {
        let entries = self.entries.last().map(|e| e.seq);
        let unreadable = self.unreadable.last().map(|u| u.seq);
        entries.max(unreadable)
    }
}

/// An outbox record that cannot be decoded, and why.
#[derive(Debug, Clone)]
pub struct Unreadable {
    pub seq: u64,
    pub reason: String,
}

/// A quarantined record, as the admin API lists it: what can be read of it.
#[derive(Debug, Clone)]
pub struct QuarantinedView {
    pub seq: u64,
    pub quarantined_at_ms: u64,
    pub reason: String,
    pub size_bytes: usize,
    /// The record itself, when it decodes (a broker refusal rather than corruption).
    pub record: Option<OutboxRecord>,
}

/// Where an event is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventStatus {
    /// In the outbox, waiting for the broker's confirm.
    Pending,
    /// Confirmed by the broker; kept in the archive.
    Published,
}

impl EventStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Published => "published",
        }
    }
}

/// One stored event, as the admin API shows it.
#[derive(Debug, Clone)]
pub struct EventView {
    pub seq: u64,
    pub status: EventStatus,
    pub published_at_ms: Option<u64>,
    /// Publishes the broker confirmed or refused so far (0 while first waiting).
    pub attempts: u32,
    pub record: OutboxRecord,
}

impl EventView {
    /// An outbox record, still waiting for the broker.
    fn pending(seq: u64, outbox_bytes: &[u8], bodies: &BodyLog) -> Result<Self, RecordError> {
        let record = OutboxRecord::decode(&bodies.resolve(outbox_bytes)?)?;
        Ok(Self {
            seq,
            status: EventStatus::Pending,
            published_at_ms: None,
            attempts: record.attempts_before,
            record,
        })
    }

    /// An archive entry: confirmed by the broker.
    fn published(seq: u64, archive_bytes: &[u8], bodies: &BodyLog) -> Result<Self, RecordError> {
        let archived = decode_archived(archive_bytes, bodies)?;
        Ok(Self {
            seq,
            status: EventStatus::Published,
            published_at_ms: Some(archived.published_at_ms),
            attempts: archived.attempts,
            record: archived.record,
        })
    }
}

/// A filter over stored events, in acceptance order.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    /// Receive time at or after (Unix ms).
    pub since_ms: Option<u64>,
    /// Receive time before (Unix ms).
    pub until_ms: Option<u64>,
    pub event: Option<String>,
    /// The source's name (`x-source`).
    pub source: Option<String>,
    pub status: Option<EventStatus>,
    pub limit: usize,
    /// Continue after this sequence number (the previous page's cursor, oldest first).
    pub after: Option<u64>,
    /// Newest first instead of oldest first.
    pub newest_first: bool,
    /// Continue before this sequence number (the previous page's cursor, newest first).
    pub before: Option<u64>,
    /// Only events whose body holds this text (bytes, case-sensitive); the scan limit per page
    /// bounds what it costs.
    pub text: Option<String>,
}

impl EventQuery {
    fn matches(&self, record: &OutboxRecord) -> bool {
        self.since_ms.is_none_or(|s| record.received_at_ms >= s)
            && self.until_ms.is_none_or(|u| record.received_at_ms < u)
            && self.event.as_deref().is_none_or(|e| record.event == e)
            && self.source.as_deref().is_none_or(|s| record.source == s)
            && self
                .text
                .as_deref()
                .is_none_or(|t| contains(&record.body, t.as_bytes()))
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// One page of events; `next_cursor` is `None` once the scan reached the end.
#[derive(Debug, Clone)]
pub struct EventPage {
    pub events: Vec<EventView>,
    pub next_cursor: Option<u64>,
}

/// What the store has now, for `/readyz` and the metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreStats {
    pub outbox_events: u64,
    pub outbox_capacity: u64,
    pub outbox_oldest_age: Option<Duration>,
    pub dedup_keys: u64,
    pub archive_events: u64,
    pub quarantined_events: u64,
    pub writable: bool,
}

/// The sequence number the dedup key `key` points at, if it is stored.
pub fn seq_of_key(database: &Database, key: &str) -> Result<Option<u64>, StoreError> {
    Ok(stored_entry(database, key)?.map(|entry| entry.seq))
}

/// The sequence number of the event an operator names by its `message_id` or its delivery id.
pub fn seq_of_id(database: &Database, id: &str) -> Result<Option<u64>, StoreError> {
    match seq_of_key(database, id)? {
        Some(seq) => Ok(Some(seq)),
        None => seq_of_key(database, &delivery_key(id)),
    }
}

/// True if one of `keys` was stored before and that write is already on disk: a retry that
/// needs nothing written and nothing waited for.
pub fn is_durable_duplicate(slot: &Slot, keys: &[&str]) -> Result<bool, StoreError> {
    // Borrowed for these few lookups rather than counted: nothing shared is written.
    let guard = slot.current.load();
    let Some(database) = guard.as_deref() else {
        return Err(unwritable_while_reopening());
    };
    let durable = slot.durable_through();
    for key in keys {
        let found = seq_of_key(database, key).inspect_err(|_| {
            // sled fails every operation after an I/O error: readiness must say so at once.
            slot.writable.store(false, Ordering::Release);
        })?;
        if found.is_some_and(|seq| seq <= durable) {
            return Ok(slot.is_writable());
        }
    }
    Ok(false)
}

/// Up to `limit` durable outbox records with sequence numbers above `after`, oldest first; a
/// record that does not decode is reported beside the others, never an error for all.
pub fn outbox_after(
    slot: &Slot,
    after: Option<u64>,
    limit: usize,
) -> Result<OutboxRead, StoreError> {
    let durable = slot.durable_through();
    let start = after.map_or(0, |a| a.saturating_add(1));
    let mut read = OutboxRead::default();
    if start > durable {
        return Ok(read);
    }
    let database = slot.database()?;
    for item in database.outbox.starting_at(start)?.take(limit) {
        let (seq, v) = item?;
        if seq > durable {
            break;
        }
        let record = database
            .bodies
            .resolve(&v)
            .and_then(|bytes| OutboxRecord::decode(&bytes));
        match record {
            Ok(record) => read.entries.push(OutboxEntry { seq, record }),
            Err(e) => read.unreadable.push(Unreadable {
                seq,
                reason: e.to_string(),
            }),
        }
    }
    Ok(read)
}

/// Quarantined records after `after`, oldest first, at most `limit`.
pub fn list_quarantined(
    database: &Database,
    after: Option<u64>,
    limit: usize,
) -> Result<Vec<QuarantinedView>, StoreError> {
    let start = seq_key(after.map_or(0, |a| a.saturating_add(1)));
    let mut views = Vec::new();
    for item in database.quarantine.range(start..).take(limit) {
        let (k, v) = item?;
        let q = decode_quarantined(&v)?;
        views.push(QuarantinedView {
            seq: seq_of(&k)?,
            quarantined_at_ms: q.quarantined_at_ms,
            reason: q.reason,
            size_bytes: q.outbox_bytes.len(),
            record: OutboxRecord::decode(&q.outbox_bytes).ok(),
        });
    }
    Ok(views)
}

/// The event at `seq`, wherever it is.
pub fn event_at(database: &Database, seq: u64) -> Result<Option<EventView>, StoreError> {
    if let Some(bytes) = database.outbox.get(seq)? {
        return Ok(Some(EventView::pending(seq, &bytes, &database.bodies)?));
    }
    match database.archive.get(seq_key(seq))? {
        Some(bytes) => Ok(Some(EventView::published(seq, &bytes, &database.bodies)?)),
        None => Ok(None),
    }
}

/// A page of events matching `query`, oldest first (or newest first): outbox and archive
/// merged by sequence number. At most [`SCAN_LIMIT`] records are read per page, so a page may
/// come back short with a cursor to go on from. The cursor is a sequence number, so paging
/// stays right while events arrive: newer ones get higher numbers.
pub fn list_events(database: &Database, query: &EventQuery) -> Result<EventPage, StoreError> {
    type Records<'a> = std::iter::Peekable<Box<dyn Iterator<Item = Numbered> + 'a>>;
    let want = |status| query.status.is_none_or(|s| s == status);
    let start = query.after.map_or(0, |a| a.saturating_add(1));
    let pending: Box<dyn Iterator<Item = Numbered>> =
        match (want(EventStatus::Pending), query.newest_first) {
            (false, _) => Box::new(std::iter::empty()),
            (true, false) => Box::new(database.outbox.starting_at(start)?),
            (true, true) => Box::new(database.outbox.before(query.before)),
        };
    let archived: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> =
        match (want(EventStatus::Published), query.newest_first) {
            (false, _) => Box::new(std::iter::empty()),
            (true, false) => Box::new(database.archive.range(seq_key(start)..)),
            (true, true) => match query.before {
                Some(before) => Box::new(database.archive.range(..seq_key(before)).rev()),
                None => Box::new(database.archive.iter().rev()),
            },
        };
    let numbered = |item: sled::Result<(sled::IVec, sled::IVec)>| -> Numbered {
        let (key, value) = item?;
        Ok((seq_of(&key)?, value))
    };
    let archived: Box<dyn Iterator<Item = Numbered>> = Box::new(archived.map(numbered));
    let mut pending: Records<'_> = pending.peekable();
    let mut published: Records<'_> = archived.peekable();
    let mut events = Vec::new();
    let mut scanned = 0;
    let mut last = None;
    loop {
        if events.len() >= query.limit || scanned >= SCAN_LIMIT {
            // More may follow: the caller goes on from the last record read.
            return Ok(EventPage {
                events,
                next_cursor: last,
            });
        }
        let next_pending = peek_seq(&mut pending)?;
        let next_published = peek_seq(&mut published)?;
        // The next in the page's order: the lower sequence number oldest first, the higher
        // newest first.
        let take_pending = match (next_pending, next_published) {
            (None, None) => {
                return Ok(EventPage {
                    events,
                    next_cursor: None,
                })
            }
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(p), Some(a)) => (p < a) != query.newest_first,
        };
        let view = if take_pending {
            let (seq, bytes) = pending.next().expect("peeked")?;
            EventView::pending(seq, &bytes, &database.bodies)?
        } else {
            let (seq, bytes) = published.next().expect("peeked")?;
            EventView::published(seq, &bytes, &database.bodies)?
        };
        scanned += 1;
        last = Some(view.seq);
        if query.matches(&view.record) {
            events.push(view);
        }
    }
}

/// An event's sequence number and its stored value, or why it could not be read.
type Numbered = Result<(u64, sled::IVec), StoreError>;

/// The sequence number of the next record, or its read error.
fn peek_seq<I>(records: &mut std::iter::Peekable<I>) -> Result<Option<u64>, StoreError>
where
    I: Iterator<Item = Numbered>,
{
    match records.peek() {
        Some(Ok((seq, _))) => Ok(Some(*seq)),
        Some(Err(_)) => Err(records.next().expect("peeked").unwrap_err()),
        None => Ok(None),
    }
}

/// Sequence numbers of the archived events a redrive would put back.
pub fn archived_matching(database: &Database, query: &EventQuery) -> Result<Vec<u64>, StoreError> {
    let mut seqs = Vec::new();
    for item in database.archive.iter() {
        let (key, bytes) = item?;
        if query.matches(&decode_archived(&bytes, &database.bodies)?.record) {
            seqs.push(seq_of(&key)?);
        }
    }
    Ok(seqs)
}

pub fn stats(slot: &Slot) -> StoreStats {
    let oldest = slot
        .database()
        .ok()
        .and_then(|database| {
            let (_, v) = database.outbox.first().ok().flatten()?;
            let bytes = database.bodies.resolve(&v).ok()?;
            OutboxRecord::decode(&bytes).ok()
        })
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
        quarantined_events: slot.quarantine_len.load(Ordering::Relaxed),
        writable: slot.is_writable(),
    }
}

//! The archive: published events kept for `archive_retention`, so that an operator can look
//! an event up, and publish it again when a consumer lost it.
//!
//! A confirmed event moves from `outbox` to `archive` under the same sequence number, in the
//! relay's delete transaction, so an event is always in exactly one of the two and its dedup
//! entry (key → sequence number) finds it in either. Putting an event back (redeliver or
//! redrive) moves it the other way under a new sequence number, through the writer, so that
//! it is durable and ordered like a new event before the relay sees it.
//!
//! The archive is swept by receive time, like the dedup keys, and in sequence order: the scan
//! stops at the first entry still inside the retention.

use std::time::{Duration, SystemTime};

use sled::transaction::ConflictableTransactionError;
use sled::Transactional;

use super::{
    add_count, transaction_error, unix_millis, DedupEntry, OutboxRecord, RecordError, Store,
    StoreError, ARCHIVE_COUNT,
};

const ARCHIVE_VERSION: u8 = 1;
const ARCHIVE_HEADER: usize = 1 + 8 + 4;
/// Most records one page of [`Store::list_events`] reads, matching or not.
const SCAN_LIMIT: usize = 10_000;
/// Archive entries removed per sweep transaction.
const SWEEP_BATCH: usize = 512;

/// An archived event: when the broker confirmed it, how many publishes that took, and the
/// outbox record as it was (its encoded bytes, copied without decoding).
pub(super) fn encode_archived(published_at_ms: u64, attempts: u32, outbox_bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ARCHIVE_HEADER + outbox_bytes.len());
    out.push(ARCHIVE_VERSION);
    out.extend_from_slice(&published_at_ms.to_be_bytes());
    out.extend_from_slice(&attempts.to_be_bytes());
    out.extend_from_slice(outbox_bytes);
    out
}

/// An archive entry: the outbox record as it was, and what publishing it took.
pub(super) struct Archived {
    pub published_at_ms: u64,
    /// Publishes this process made before the broker confirmed it.
    pub attempts: u32,
    pub record: OutboxRecord,
}

pub(super) fn decode_archived(bytes: &[u8]) -> Result<Archived, RecordError> {
    match bytes.split_first() {
        Some((&ARCHIVE_VERSION, rest)) if rest.len() >= ARCHIVE_HEADER - 1 => Ok(Archived {
            published_at_ms: u64::from_be_bytes(rest[..8].try_into().expect("8 bytes")),
            attempts: u32::from_be_bytes(rest[8..12].try_into().expect("4 bytes")),
            record: OutboxRecord::decode(&rest[12..])?,
        }),
        Some((&ARCHIVE_VERSION, _)) => Err(RecordError::Corrupt("short archive entry".into())),
        Some((&other, _)) => Err(RecordError::UnknownVersion(other)),
        None => Err(RecordError::Corrupt("empty archive entry".into())),
    }
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
    fn pending(seq: u64, outbox_bytes: &[u8]) -> Result<Self, RecordError> {
        let record = OutboxRecord::decode(outbox_bytes)?;
        Ok(Self {
            seq,
            status: EventStatus::Pending,
            published_at_ms: None,
            attempts: record.attempts_before,
            record,
        })
    }

    /// An archive entry: confirmed by the broker.
    fn published(seq: u64, archive_bytes: &[u8]) -> Result<Self, RecordError> {
        let Archived {
            published_at_ms,
            attempts,
            record,
        } = decode_archived(archive_bytes)?;
        Ok(Self {
            seq,
            status: EventStatus::Published,
            published_at_ms: Some(published_at_ms),
            attempts,
            record,
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
    pub status: Option<EventStatus>,
    pub limit: usize,
    /// Continue after this sequence number (the previous page's cursor).
    pub after: Option<u64>,
}

impl EventQuery {
    fn matches(&self, record: &OutboxRecord) -> bool {
        self.since_ms.is_none_or(|s| record.received_at_ms >= s)
            && self.until_ms.is_none_or(|u| record.received_at_ms < u)
            && self.event.as_deref().is_none_or(|e| record.event == e)
    }
}

/// One page of events; `next_cursor` is `None` once the scan reached the end.
#[derive(Debug, Clone)]
pub struct EventPage {
    pub events: Vec<EventView>,
    pub next_cursor: Option<u64>,
}

/// What putting one archived event back did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redelivery {
    /// Back in the outbox under this sequence number, durable.
    Queued(u64),
    /// Still in the outbox: it will be published anyway.
    Pending,
    /// Neither in the outbox nor in the archive (swept, or never stored).
    Missing,
}

fn seq_of(key: &[u8]) -> Result<u64, StoreError> {
    Ok(u64::from_be_bytes(key.try_into().map_err(|_| {
        RecordError::Corrupt("key is not a sequence number".into())
    })?))
}

impl Store {
    /// The event whose dedup key (the AMQP `message_id`) is `id`, wherever it is.
    pub fn find_event(&self, id: &str) -> Result<Option<EventView>, StoreError> {
        let shared = self.shared()?;
        let Some(entry) = shared
            .dedup
            .get(id.as_bytes())?
            .and_then(|v| DedupEntry::decode(&v))
        else {
            return Ok(None);
        };
        self.event_at(entry.seq)
    }

    fn event_at(&self, seq: u64) -> Result<Option<EventView>, StoreError> {
        let shared = self.shared()?;
        if let Some(bytes) = shared.outbox.get(seq.to_be_bytes())? {
            return Ok(Some(EventView::pending(seq, &bytes)?));
        }
        match shared.archive.get(seq.to_be_bytes())? {
            Some(bytes) => Ok(Some(EventView::published(seq, &bytes)?)),
            None => Ok(None),
        }
    }

    /// A page of events matching `query`, oldest first: outbox and archive merged by sequence
    /// number. At most [`SCAN_LIMIT`] records are read per page, so a page may come back short
    /// with a cursor to go on from.
    pub fn list_events(&self, query: &EventQuery) -> Result<EventPage, StoreError> {
        let shared = self.shared()?;
        let start = query.after.map_or(0, |a| a.saturating_add(1)).to_be_bytes();
        let want = |status| query.status.is_none_or(|s| s == status);
        let mut pending = want(EventStatus::Pending)
            .then(|| shared.outbox.range(start..))
            .into_iter()
            .flatten()
            .peekable();
        let mut published = want(EventStatus::Published)
            .then(|| shared.archive.range(start..))
            .into_iter()
            .flatten()
            .peekable();
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
            let next_pending = match pending.peek() {
                Some(Ok((k, _))) => Some(seq_of(k)?),
                Some(Err(_)) => return Err(pending.next().expect("peeked").unwrap_err().into()),
                None => None,
            };
            let next_published = match published.peek() {
                Some(Ok((k, _))) => Some(seq_of(k)?),
                Some(Err(_)) => return Err(published.next().expect("peeked").unwrap_err().into()),
                None => None,
            };
            let view = match (next_pending, next_published) {
                (None, None) => {
                    return Ok(EventPage {
                        events,
                        next_cursor: None,
                    })
                }
                (Some(p), a) if a.is_none_or(|a| p < a) => {
                    let (_, bytes) = pending.next().expect("peeked")?;
                    EventView::pending(p, &bytes)?
                }
                (_, Some(a)) => {
                    let (_, bytes) = published.next().expect("peeked")?;
                    EventView::published(a, &bytes)?
                }
                (Some(_), None) => unreachable!("covered by the arm above"),
            };
            scanned += 1;
            last = Some(view.seq);
            if query.matches(&view.record) {
                events.push(view);
            }
        }
    }

    /// Sequence numbers of the archived events a redrive would put back.
    pub fn archived_matching(&self, query: &EventQuery) -> Result<Vec<u64>, StoreError> {
        let mut seqs = Vec::new();
        for item in self.shared()?.archive.iter() {
            let (key, bytes) = item?;
            let record = decode_archived(&bytes)?.record;
            if query.matches(&record) {
                seqs.push(seq_of(&key)?);
            }
        }
        Ok(seqs)
    }

    /// Puts the event `id` back into the outbox, to be published again.
    pub async fn redeliver_event(&self, id: &str) -> Result<Redelivery, StoreError> {
        let shared = self.shared()?;
        let Some(entry) = shared
            .dedup
            .get(id.as_bytes())?
            .and_then(|v| DedupEntry::decode(&v))
        else {
            return Ok(Redelivery::Missing);
        };
        let outcomes = self.redeliver(vec![entry.seq]).await?;
        Ok(outcomes.first().copied().unwrap_or(Redelivery::Missing))
    }

    /// Puts archived events back into the outbox, durably, through the writer; one outcome per
    /// sequence number.
    pub async fn redeliver(&self, seqs: Vec<u64>) -> Result<Vec<Redelivery>, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.inner
            .jobs
            .send(super::writer::Job::Redeliver { seqs, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Removes archived events first received before `now - retention`; returns how many.
    pub fn sweep_archive(&self, retention: Duration) -> Result<u64, StoreError> {
        let cutoff_ms = unix_millis(SystemTime::now()).saturating_sub(retention.as_millis() as u64);
        let shared = self.shared()?;
        let mut removed = 0;
        loop {
            let mut expired = Vec::new();
            let mut reached_live = false;
            for item in shared.archive.iter().take(SWEEP_BATCH) {
                let (key, bytes) = item?;
                let record = decode_archived(&bytes)?.record;
                if record.received_at_ms >= cutoff_ms {
                    reached_live = true;
                    break;
                }
                expired.push(key);
            }
            if !expired.is_empty() {
                let swept = (&shared.archive, &shared.meta)
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
                self.inner
                    .slot
                    .archive_len
                    .fetch_sub(swept, std::sync::atomic::Ordering::Relaxed);
                removed += swept;
            }
            if reached_live || expired.len() < SWEEP_BATCH {
                return Ok(removed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{StoreOptions, Stored};
    use super::*;

    fn open(dir: &Path, outbox_max: u64) -> Store {
        Store::open(&StoreOptions {
            cache_size: 8 << 20,
            outbox_max,
            ..StoreOptions::at(dir)
        })
        .unwrap()
    }

    fn record(key: &str, event: &str, received_at_ms: u64) -> OutboxRecord {
        OutboxRecord {
            key: key.into(),
            event: event.into(),
            signature: "sha256=00".into(),
            received_at_ms,
            source: "test".into(),
            body: format!("{{\"k\":\"{key}\"}}").into_bytes(),
            redelivered: false,
            attempts_before: 0,
        }
    }

    /// Accepts the records and "publishes" the first `published` of them.
    async fn stored(store: &Store, records: Vec<OutboxRecord>, published: usize) {
        for r in records {
            assert_eq!(store.accept(r).await.unwrap(), Stored::New);
        }
        let seqs: Vec<(u64, u32)> = store
            .outbox_after(None, 1000)
            .unwrap()
            .iter()
            .take(published)
            .map(|(s, _)| (*s, 2))
            .collect();
        store.archive_published(&seqs).unwrap();
    }

    #[tokio::test]
    async fn a_published_event_is_found_in_the_archive_and_a_pending_one_in_the_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 10);
        let now = unix_millis(SystemTime::now());
        let records = vec![
            record("a", "call.ended", now),
            record("b", "call.started", now),
        ];
        stored(&store, records, 1).await;

        let a = store.find_event("a").unwrap().unwrap();
        assert_eq!((a.status, a.attempts), (EventStatus::Published, 2));
        assert!(a.published_at_ms.is_some());
        assert_eq!(a.record.body, b"{\"k\":\"a\"}");
        let b = store.find_event("b").unwrap().unwrap();
        assert_eq!(b.status, EventStatus::Pending);
        assert!(store.find_event("c").unwrap().is_none());
        let stats = store.stats();
        assert_eq!((stats.outbox_events, stats.archive_events), (1, 1));
    }

    #[tokio::test]
    async fn lists_merge_outbox_and_archive_in_order_and_filter() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 100);
        let now = unix_millis(SystemTime::now());
        let records = (0..10)
            .map(|i| {
                let event = if i % 2 == 0 {
                    "call.ended"
                } else {
                    "call.started"
                };
                record(&format!("k{i}"), event, now + i)
            })
            .collect();
        stored(&store, records, 6).await;

        let all = |q: EventQuery| -> Vec<String> {
            let mut keys = Vec::new();
            let mut q = EventQuery { limit: 3, ..q };
            loop {
                let page = store.list_events(&q).unwrap();
                keys.extend(page.events.iter().map(|e| e.record.key.clone()));
                match page.next_cursor {
                    Some(c) => q.after = Some(c),
                    None => return keys,
                }
            }
        };
        let keys = all(EventQuery::default());
        assert_eq!(keys, (0..10).map(|i| format!("k{i}")).collect::<Vec<_>>());
        let pending = all(EventQuery {
            status: Some(EventStatus::Pending),
            ..EventQuery::default()
        });
        assert_eq!(pending, ["k6", "k7", "k8", "k9"]);
        let started_in_window = all(EventQuery {
            event: Some("call.started".into()),
            since_ms: Some(now + 3),
            until_ms: Some(now + 9),
            ..EventQuery::default()
        });
        assert_eq!(started_in_window, ["k3", "k5", "k7"]);
    }

    #[tokio::test]
    async fn redelivery_moves_an_event_back_once_and_keeps_it_findable() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 10);
        let now = unix_millis(SystemTime::now());
        stored(
            &store,
            vec![
                record("a", "call.ended", now),
                record("b", "call.ended", now),
            ],
            1,
        )
        .await;

        assert_eq!(
            store.redeliver_event("b").await.unwrap(),
            Redelivery::Pending
        );
        assert_eq!(
            store.redeliver_event("zz").await.unwrap(),
            Redelivery::Missing
        );
        let Redelivery::Queued(seq) = store.redeliver_event("a").await.unwrap() else {
            panic!("a was archived");
        };
        // Durable and visible to the relay, marked, with its earlier attempts carried over.
        let waiting = store.outbox_after(None, 10).unwrap();
        let (_, again) = waiting.iter().find(|(s, _)| *s == seq).unwrap();
        assert!(again.redelivered);
        assert_eq!(again.attempts_before, 2);
        let found = store.find_event("a").unwrap().unwrap();
        assert_eq!((found.seq, found.status), (seq, EventStatus::Pending));
        // Still a duplicate for the receiver, and not put back twice.
        assert_eq!(
            store.redeliver_event("a").await.unwrap(),
            Redelivery::Pending
        );
        assert_eq!(
            store.accept(record("a", "call.ended", now)).await.unwrap(),
            Stored::Duplicate
        );
        let stats = store.stats();
        assert_eq!((stats.outbox_events, stats.archive_events), (2, 0));
    }

    #[tokio::test]
    async fn redelivery_respects_the_outbox_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1);
        let now = unix_millis(SystemTime::now());
        stored(&store, vec![record("a", "call.ended", now)], 1).await;
        store.accept(record("b", "call.ended", now)).await.unwrap();
        assert!(matches!(
            store.redeliver_event("a").await,
            Err(StoreError::Full { capacity: 1 })
        ));
        assert_eq!(
            store.find_event("a").unwrap().unwrap().status,
            EventStatus::Published
        );
    }

    #[tokio::test]
    async fn the_archive_sweep_removes_only_old_events_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let now = unix_millis(SystemTime::now());
        {
            let store = open(dir.path(), 10);
            let records = vec![
                record("old", "call.ended", now - 3_600_000),
                record("new", "call.ended", now),
            ];
            stored(&store, records, 2).await;
            assert_eq!(store.sweep_archive(Duration::from_secs(60)).unwrap(), 1);
            store.close();
        }
        let store = open(dir.path(), 10);
        assert_eq!(store.stats().archive_events, 1);
        assert!(store.find_event("old").unwrap().is_none());
        let matched = store
            .archived_matching(&EventQuery {
                since_ms: Some(now - 10),
                until_ms: Some(now + 10),
                ..EventQuery::default()
            })
            .unwrap();
        assert_eq!(matched.len(), 1);
    }
}

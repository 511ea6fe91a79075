//! The store as its users see it: accept, dedup, read back, archive, redeliver, sweep, reopen.

use std::path::Path;
use std::time::{Duration, SystemTime};

use super::outbox::Outbox;
use super::*;

fn options(dir: &Path, outbox_max: u64) -> StoreOptions {
    StoreOptions {
        cache_size: 8 << 20,
        outbox_max,
        ..StoreOptions::at(dir)
    }
}

fn open(dir: &Path, outbox_max: u64) -> Store {
    Store::open(&options(dir, outbox_max)).unwrap()
}

/// Opens sled on a closed store's data directory, as a power cut would have left it.
fn sled_of(data: &Path) -> sled::Db {
    // A child another test forked may hold sled's lock for a moment (see `database`).
    for _ in 0..200 {
        if let Ok(db) = sled::Config::new().path(data).open() {
            return db;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    sled::Config::new().path(data).open().unwrap()
}

/// Opens the store on `data`, stores each of `keys` as a new event, and closes it.
async fn store_new(data: &Path, keys: &[&str], received_at_ms: u64) {
    let store = open(data, 10);
    for key in keys {
        assert_eq!(
            store.accept(record(key, received_at_ms)).await.unwrap(),
            Stored::New
        );
    }
    store.close();
}

fn record(key: &str, received_at_ms: u64) -> OutboxRecord {
    record_of(key, "call.ended", received_at_ms)
}

fn record_of(key: &str, event: &str, received_at_ms: u64) -> OutboxRecord {
    OutboxRecord {
        key: key.into(),
        event: event.into(),
        signature: "sha256=00".into(),
        received_at_ms,
        source: "test".into(),
        body: format!("{{\"k\":\"{key}\"}}").into_bytes(),
        redelivered: false,
        attempts_before: 0,
        delivery_id: None,
        trace: None,
    }
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
    store.indexed().await;
    let pending = store.outbox_after(None, 10).unwrap().entries;
    let keys: Vec<_> = pending.iter().map(|e| e.record.key.as_str()).collect();
    assert_eq!(keys, ["a", "b"]);
    assert_eq!(
        store
            .outbox_after(Some(pending[0].seq), 10)
            .unwrap()
            .entries
            .len(),
        1
    );
    store
        .archive_published(&[Confirmed {
            seq: pending[0].seq,
            attempts: 1,
        }])
        .unwrap();
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
    // The longest retention the settings take, and one far past it, sweep nothing: the cutoff
    // saturates instead of wrapping round to a recent time (`as_millis() as u64` did).
    for retention in [crate::config::MAX_DURATION, Duration::MAX] {
        assert_eq!(store.sweep_expired(retention).unwrap(), 0);
        assert_eq!(store.sweep_archive(retention).unwrap(), 0);
    }
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
    store.indexed().await;
    assert_eq!(store.outbox_after(None, 10).unwrap().entries.len(), 2);
}

/// Accepts the records and "publishes" the first `published` of them.
async fn stored(store: &Store, records: Vec<OutboxRecord>, published: usize) {
    for r in records {
        assert_eq!(store.accept(r).await.unwrap(), Stored::New);
    }
    store.indexed().await;
    let seqs: Vec<Confirmed> = store
        .outbox_after(None, 1000)
        .unwrap()
        .entries
        .iter()
        .take(published)
        .map(|e| Confirmed {
            seq: e.seq,
            attempts: 2,
        })
        .collect();
    store.archive_published(&seqs).unwrap();
}

#[tokio::test]
async fn a_published_event_is_found_in_the_archive_and_a_pending_one_in_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 10);
    let now = unix_millis(SystemTime::now());
    let records = vec![
        record_of("a", "call.ended", now),
        record_of("b", "call.started", now),
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
            record_of(&format!("k{i}"), event, now + i)
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
            record_of("a", "call.ended", now),
            record_of("b", "call.ended", now),
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
    store.indexed().await;
    let waiting = store.outbox_after(None, 10).unwrap().entries;
    let again = &waiting.iter().find(|e| e.seq == seq).unwrap().record;
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
        store
            .accept(record_of("a", "call.ended", now))
            .await
            .unwrap(),
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
    stored(&store, vec![record_of("a", "call.ended", now)], 1).await;
    store
        .accept(record_of("b", "call.ended", now))
        .await
        .unwrap();
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
            record_of("old", "call.ended", now - 3_600_000),
            record_of("new", "call.ended", now),
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

/// The segment files of the body log under `dir`.
fn segments(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("bodies")).unwrap().count()
}

#[tokio::test]
async fn records_live_in_the_body_log_and_their_segments_go_once_nothing_refers_to_them() {
    let dir = tempfile::tempdir().unwrap();
    let now = unix_millis(SystemTime::now());
    // Every open starts a segment of its own: three opens, three segments.
    for (key, received_at_ms) in [("old", now - 3_600_000), ("new", now), ("newer", now)] {
        let store = open(dir.path(), 10);
        assert_eq!(
            store.accept(record(key, received_at_ms)).await.unwrap(),
            Stored::New
        );
        // sled holds a reference, not the record.
        store.indexed().await;
        let database = store.inner.slot.database().unwrap();
        let (_, value) = database.outbox.before(None).next().unwrap().unwrap();
        assert_eq!(value.len(), bodies::REFERENCE_LEN);
        drop(database);
        store.close();
    }
    assert_eq!(segments(dir.path()), 3);
    let store = open(dir.path(), 10);
    store.indexed().await;
    let pending = store.outbox_after(None, 10).unwrap().entries;
    let keys: Vec<_> = pending.iter().map(|e| e.record.key.as_str()).collect();
    assert_eq!(keys, ["old", "new", "newer"]);
    // Nothing is removed while the outbox still refers to the oldest segment.
    assert_eq!(store.remove_unreferenced_bodies().unwrap(), 0);
    let confirmed: Vec<Confirmed> = pending
        .iter()
        .map(|e| Confirmed {
            seq: e.seq,
            attempts: 1,
        })
        .collect();
    store.archive_published(&confirmed).unwrap();
    // Archived, the oldest is still referred to; swept, it is not.
    assert_eq!(store.remove_unreferenced_bodies().unwrap(), 0);
    assert_eq!(store.sweep_archive(Duration::from_secs(60)).unwrap(), 1);
    // From here on the maintenance thread's sweep at open could remove it first.
    store.remove_unreferenced_bodies().unwrap();
    assert_eq!(segments(dir.path()), 2);
    let kept = store.find_event("new").unwrap().expect("still archived");
    assert_eq!(kept.record.body, record("new", now).body);
    store.close();
    drop(store);
    let store = open(dir.path(), 10);
    assert_eq!(
        store
            .list_events(&EventQuery {
                limit: 10,
                ..EventQuery::default()
            })
            .unwrap()
            .events
            .len(),
        2
    );
}

#[tokio::test]
async fn a_quarantined_record_keeps_its_body_when_its_segment_goes() {
    let dir = tempfile::tempdir().unwrap();
    let now = unix_millis(SystemTime::now());
    for key in ["refused", "published"] {
        store_new(dir.path(), &[key], now).await;
    }
    let store = open(dir.path(), 10);
    store.indexed().await;
    let pending = store.outbox_after(None, 10).unwrap().entries;
    assert!(store
        .quarantine(pending[0].seq, "refused by the broker")
        .unwrap());
    store
        .archive_published(&[Confirmed {
            seq: pending[1].seq,
            attempts: 1,
        }])
        .unwrap();
    // The maintenance thread's sweep at open may get there first: count the files, not
    // this call's removals.
    store.remove_unreferenced_bodies().unwrap();
    assert_eq!(segments(dir.path()), 1);
    let quarantined = store.list_quarantined(None, 10).unwrap();
    let record = quarantined[0].record.as_ref().expect("the record itself");
    assert_eq!(record.key, "refused");
    // Put back, it is published like any other.
    store
        .redeliver(vec![pending[0].seq], Shelf::Quarantine)
        .await
        .unwrap();
    store.indexed().await;
    let again = store.outbox_after(None, 10).unwrap().entries;
    assert_eq!(again[0].record.key, "refused");
}

/// Copies (or, with `restore`, puts back) everything sled keeps in `data`: all but the body
/// log and the lock file.
fn copy_sled_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == "bodies" || name == "kallina-relay.lock" {
            continue;
        }
        if entry.file_type().unwrap().is_dir() {
            copy_sled_files(&entry.path(), &to.join(&name));
        } else {
            std::fs::copy(entry.path(), to.join(&name)).unwrap();
        }
    }
}

#[tokio::test]
async fn events_sled_lost_after_their_answer_are_indexed_again_from_the_body_log() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let saved = dir.path().join("sled-before");
    let now = unix_millis(SystemTime::now());
    store_new(&data, &["a"], now).await;
    copy_sled_files(&data, &saved);
    {
        let store = open(&data, 10);
        assert_eq!(store.accept(record("b", now)).await.unwrap(), Stored::New);
        let mut with_id = record("c", now);
        with_id.delivery_id = Some("delivery-c".into());
        assert_eq!(store.accept(with_id).await.unwrap(), Stored::New);
        store.close();
    }
    // sled as a power cut could leave it: without what it indexed after "a" (the body log,
    // synced before each answer, keeps "b" and "c").
    for entry in std::fs::read_dir(&data).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name != "bodies" && name != "kallina-relay.lock" {
            if entry.file_type().unwrap().is_dir() {
                std::fs::remove_dir_all(entry.path()).unwrap();
            } else {
                std::fs::remove_file(entry.path()).unwrap();
            }
        }
    }
    copy_sled_files(&saved, &data);

    let store = open(&data, 10);
    // Found again before anything else reads the store: duplicates by body and by delivery id,
    // counted, in order for the relay, and new numbers above the replayed ones.
    assert_eq!(
        store.accept(record("b", now)).await.unwrap(),
        Stored::Duplicate
    );
    let mut again = record("other body", now);
    again.delivery_id = Some("delivery-c".into());
    assert_eq!(store.accept(again).await.unwrap(), Stored::Duplicate);
    let stats = store.stats();
    assert_eq!((stats.outbox_events, stats.dedup_keys), (3, 4));
    assert_eq!(store.accept(record("d", now)).await.unwrap(), Stored::New);
    store.indexed().await;
    let pending = store.outbox_after(None, 10).unwrap().entries;
    let keys: Vec<_> = pending.iter().map(|e| e.record.key.as_str()).collect();
    assert_eq!(keys, ["a", "b", "c", "d"]);
    assert!(store.find_event("delivery-c").unwrap().is_some());
    store.close();
    drop(store);
    // Indexed once: a second open replays nothing more.
    let store = open(&data, 10);
    assert_eq!(store.stats().outbox_events, 4);
}

/// A child process started while the store was open holds a copy of the lock's file
/// descriptor from its fork until its exec closes it. A store opened in that moment (a restart
/// in the same process, while another thread starts a program) must wait for it, not be
/// refused as if another relay had the directory.
#[test]
fn a_reopen_waits_out_a_child_that_has_not_yet_exec_d() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 10);
    let mut command = std::process::Command::new("true");
    // Runs in the child between fork and exec, holding the inherited descriptors.
    unsafe {
        command.pre_exec(|| {
            std::thread::sleep(Duration::from_millis(300));
            Ok(())
        });
    }
    // Another thread starts it (`spawn` returns only after the exec); the fork is done well
    // within the 100 ms this thread waits.
    let starter = std::thread::spawn(move || command.spawn().unwrap().wait().unwrap());
    std::thread::sleep(Duration::from_millis(100));
    drop(store);
    let again = Store::open(&options(dir.path(), 10));
    assert!(
        again.is_ok(),
        "reopening while a child held the lock's descriptor failed: {:?}",
        again.err()
    );
    starter.join().unwrap();
}

/// sled's own lock outlives the store that held it for a moment when sled's threads close its
/// file late, or a child forked meanwhile holds a copy: an open waits that out too, as it does
/// for the data directory's lock.
#[test]
fn an_open_waits_out_a_moment_of_sled_s_own_lock() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path(), 10));
    let held = std::fs::File::open(dir.path().join("db")).unwrap();
    held.try_lock().unwrap();
    let holder = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(held);
    });
    let again = Store::open(&options(dir.path(), 10));
    assert!(
        again.is_ok(),
        "opening while sled's lock was held for a moment failed: {:?}",
        again.err()
    );
    holder.join().unwrap();
}

/// What a power cut may leave now that an event's index entries are written before, and
/// outside, the value with the mark and the totals: the entries of the last events in sled,
/// the mark and the totals from before them. The open indexes those events again from the body
/// log, counting each once.
#[tokio::test]
async fn entries_sled_kept_without_their_mark_are_indexed_again_and_counted_once() {
    use super::codec::{DEDUP_COUNT, INDEX_STATE, OUTBOX_COUNT};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let now = unix_millis(SystemTime::now());
    let meta_of = |names: &[&[u8]]| {
        let db = sled_of(&data);
        let meta = db.open_tree("meta").unwrap();
        names
            .iter()
            .map(|name| meta.get(name).unwrap().map(|v| v.to_vec()))
            .collect::<Vec<_>>()
    };
    let names: [&[u8]; 3] = [INDEX_STATE, OUTBOX_COUNT, DEDUP_COUNT];
    store_new(&data, &["a"], now).await;
    let after_a = meta_of(&names);
    store_new(&data, &["b", "c"], now).await;
    assert_ne!(
        meta_of(&names),
        after_a,
        "b and c moved the mark and the counts"
    );
    {
        let db = sled_of(&data);
        let meta = db.open_tree("meta").unwrap();
        for (name, value) in names.iter().zip(&after_a) {
            meta.insert(name, value.clone().unwrap()).unwrap();
        }
        assert_eq!(
            Outbox::new(db.open_tree("outbox").unwrap())
                .count()
                .unwrap(),
            3,
            "b's and c's entries stay"
        );
        db.flush().unwrap();
    }

    let store = open(&data, 10);
    let stats = store.stats();
    assert_eq!((stats.outbox_events, stats.dedup_keys), (3, 3));
    assert_eq!(
        store.accept(record("c", now)).await.unwrap(),
        Stored::Duplicate
    );
    let keys: Vec<_> = store
        .outbox_after(None, 10)
        .unwrap()
        .entries
        .into_iter()
        .map(|e| e.record.key)
        .collect();
    assert_eq!(keys, ["a", "b", "c"]);
    store.close();
    drop(store);
    // The mark caught up: a second open replays nothing and counts the same.
    let store = open(&data, 10);
    assert_eq!(store.stats().outbox_events, 3);
    assert_eq!(store.stats().dedup_keys, 3);
}

/// What a power cut may leave of an archive move, now that it is plain writes after a record
/// of itself: the record (its totals counting the move), and only part of the move. Here `b`
/// has its archive entry but is still in the outbox, and `c` was not touched. The open
/// finishes the move, and counts it once.
#[tokio::test]
async fn an_archive_move_a_power_cut_interrupted_is_finished_at_open_and_counted_once() {
    use super::codec::{encode_archived, seq_key, ArchiveMoves, ARCHIVE_MOVES};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let now = unix_millis(SystemTime::now());
    let seqs = {
        let store = open(&data, 10);
        for key in ["a", "b", "c"] {
            assert_eq!(store.accept(record(key, now)).await.unwrap(), Stored::New);
        }
        store.indexed().await;
        let seqs: Vec<u64> = store
            .outbox_after(None, 10)
            .unwrap()
            .entries
            .iter()
            .map(|e| e.seq)
            .collect();
        let a = Confirmed {
            seq: seqs[0],
            attempts: 1,
        };
        assert_eq!(store.archive_published(&[a]).unwrap(), 1);
        store.close();
        seqs
    };
    {
        let db = sled_of(&data);
        let meta = db.open_tree("meta").unwrap();
        let outbox = Outbox::new(db.open_tree("outbox").unwrap());
        let archive = db.open_tree("archive").unwrap();
        let before = ArchiveMoves::read(&meta).unwrap();
        assert_eq!((before.removed, before.archived), (1, 1));
        let published_at_ms = now + 5;
        let record = ArchiveMoves {
            removed: 3,
            archived: 3,
            published_at_ms,
            keep: true,
            pending: vec![(seqs[1], 3), (seqs[2], 4)],
        };
        meta.insert(ARCHIVE_MOVES, record.encode()).unwrap();
        let b = outbox.get(seqs[1]).unwrap().unwrap();
        archive
            .insert(seq_key(seqs[1]), encode_archived(published_at_ms, 3, &b))
            .unwrap();
        db.flush().unwrap();
    }

    for _ in 0..2 {
        let store = open(&data, 10);
        let stats = store.stats();
        assert_eq!((stats.outbox_events, stats.archive_events), (0, 3));
        assert!(store.outbox_after(None, 10).unwrap().entries.is_empty());
        for (key, attempts) in [("a", 1), ("b", 3), ("c", 4)] {
            let event = store.find_event(key).unwrap().unwrap();
            assert_eq!(
                (event.status, event.attempts),
                (EventStatus::Published, attempts)
            );
        }
        store.close();
    }
}

/// A database written before the index thread kept its own totals: the mark in
/// `indexed_through`, and counts that include what it indexed. Its counts stay right through
/// the first open, new events and the next open.
#[tokio::test]
async fn a_database_from_before_the_index_totals_keeps_its_counts() {
    use super::codec::{ARCHIVE_MOVES, DEDUP_COUNT, INDEXED_THROUGH, INDEX_STATE, OUTBOX_COUNT};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let now = unix_millis(SystemTime::now());
    store_new(&data, &["a", "b"], now).await;
    {
        let db = sled_of(&data);
        let meta = db.open_tree("meta").unwrap();
        let through = super::codec::IndexState::read(&meta).unwrap().through;
        meta.remove(INDEX_STATE).unwrap();
        meta.remove(ARCHIVE_MOVES).unwrap();
        meta.insert(INDEXED_THROUGH, &through.to_be_bytes())
            .unwrap();
        meta.insert(OUTBOX_COUNT, &2u64.to_be_bytes()).unwrap();
        meta.insert(DEDUP_COUNT, &2u64.to_be_bytes()).unwrap();
        // Its keys were in sled, and it had no dedup index.
        let dedup = db.open_tree("dedup").unwrap();
        for (key, seq) in [("a", through - 1), ("b", through)] {
            let entry = super::codec::DedupEntry {
                received_at_ms: now,
                seq,
            };
            dedup.insert(key, &entry.encode()[..]).unwrap();
        }
        std::fs::remove_dir_all(data.join("dedup-index")).unwrap();
        db.flush().unwrap();
    }
    let store = open(&data, 10);
    assert_eq!(
        (store.stats().outbox_events, store.stats().dedup_keys),
        (2, 2)
    );
    assert_eq!(store.accept(record("c", now)).await.unwrap(), Stored::New);
    assert_eq!(
        store.accept(record("a", now)).await.unwrap(),
        Stored::Duplicate
    );
    store.indexed().await;
    assert_eq!(
        (store.stats().outbox_events, store.stats().dedup_keys),
        (3, 3)
    );
    store.close();
    drop(store);
    let store = open(&data, 10);
    assert_eq!(
        (store.stats().outbox_events, store.stats().dedup_keys),
        (3, 3)
    );
}

/// A stored count that no real store could have (only a defect could leave one) is not
/// believed: the open counts the tree instead, and the count stays right afterwards.
#[tokio::test]
async fn an_impossible_count_is_counted_again_at_open() {
    use super::codec::OUTBOX_COUNT;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let now = unix_millis(SystemTime::now());
    store_new(&data, &["a"], now).await;
    {
        let db = sled_of(&data);
        let meta = db.open_tree("meta").unwrap();
        meta.insert(OUTBOX_COUNT, &(u64::MAX - 5).to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let store = open(&data, 10);
    assert_eq!(store.stats().outbox_events, 1);
    assert_eq!(store.accept(record("b", now)).await.unwrap(), Stored::New);
    store.close();
    drop(store);
    assert_eq!(open(&data, 10).stats().outbox_events, 2);
}

/// Events accepted together are indexed as one run of the outbox: one taken out of the middle
/// (quarantined), one from the front (published), and one put back, and the outbox still reads
/// in order, before and after a reopen, with the counts right.
#[tokio::test]
async fn events_of_one_run_leave_it_one_by_one_and_the_outbox_stays_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let now = unix_millis(SystemTime::now());
    let store = open(dir.path(), 10);
    let accepted = futures_util::future::join_all(
        ["a", "b", "c", "d"].map(|key| store.accept(record(key, now))),
    )
    .await;
    assert!(accepted.iter().all(|a| matches!(a, Ok(Stored::New))));
    store.indexed().await;
    let keys = |store: &Store| -> Vec<(u64, String)> {
        let entries = store.outbox_after(None, 10).unwrap().entries;
        entries.into_iter().map(|e| (e.seq, e.record.key)).collect()
    };
    let pending = keys(&store);
    let seq_of = |key: &str| pending.iter().find(|(_, k)| k == key).unwrap().0;
    {
        let database = store.inner.slot.database().unwrap();
        assert!(
            database.outbox.tree().len() < 4,
            "four events accepted at once share a run"
        );
    }
    assert!(store.quarantine(seq_of("b"), "refused").unwrap());
    assert!(!store.quarantine(seq_of("b"), "refused").unwrap());
    store
        .archive_published(&[Confirmed {
            seq: seq_of("a"),
            attempts: 1,
        }])
        .unwrap();
    assert_eq!(
        store
            .redeliver(vec![seq_of("b")], Shelf::Quarantine)
            .await
            .unwrap(),
        vec![Redelivery::Queued(seq_of("d") + 1)]
    );
    // Still pending in the run: not put back twice.
    assert_eq!(
        store
            .redeliver(vec![seq_of("c")], Shelf::Archive)
            .await
            .unwrap(),
        vec![Redelivery::Pending]
    );
    store.indexed().await;
    let expected = vec![
        (seq_of("c"), "c".to_string()),
        (seq_of("d"), "d".to_string()),
        (seq_of("d") + 1, "b".to_string()),
    ];
    assert_eq!(keys(&store), expected);
    assert_eq!(
        store.find_event("c").unwrap().unwrap().status,
        EventStatus::Pending
    );
    let stats = store.stats();
    assert_eq!(
        (
            stats.outbox_events,
            stats.archive_events,
            stats.quarantined_events
        ),
        (3, 1, 0)
    );
    store.close();
    drop(store);
    let store = open(dir.path(), 10);
    assert_eq!(keys(&store), expected);
    assert_eq!(store.stats().outbox_events, 3);
}

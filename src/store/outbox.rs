//! sled's `outbox` tree, seen as one entry per pending event although new events are stored
//! as **runs**: one sled entry per index pass holding the references of every event it
//! indexed, rather than one entry per event.
//!
//! **Why runs.** The index thread used to insert each new event's reference under its own
//! key. On the 2-core VM that was three quarters of the index thread's time: sled copies the
//! leaf it appends to on every insert and splits it every few (`Tree::insert` 74 %, of which
//! `split_node` 33 %, in a profile of ingest), CPU taken from the HTTP workers and the writer.
//! A run holds up to [`RUN_MAX`] events, so a pass costs one insert per that many.
//!
//! **Layout.** Two kinds of entry, told apart by their key's length, never by their value
//! (a quarantined record put back byte for byte may begin with any byte):
//! - a **single**: key [`seq_key`] (8 bytes) → the event's record, or a reference to it in the
//!   body log. Redelivered events, events the replay at open writes again, and everything a
//!   database written before runs holds.
//! - a **run**: key [`seq_key`] of its first member followed by [`RUN_MARK`] (9 bytes, so it
//!   sorts after a single of the same number and before the next number) → its members,
//!   ascending, each `[u64 seq][reference]` ([`MEMBER_LEN`] bytes). A run's key never
//!   changes: taking a member out rewrites the value (one insert, or a removal once it is
//!   empty), so a power cut leaves the run before or after, never half.
//!
//! **Invariants.** Runs never overlap one another or a single: the index thread writes a run
//! of consecutive new-event batches and ends it at any redelivery (whose numbers are drawn
//! after those batches' and before the next ones'), and the replay at open writes a single
//! only for a number no entry holds ([`Outbox::contains`]). So reading the tree in key order
//! and each run's members in order gives the events in sequence order, which the relay relies
//! on. A run's key is at or below its lowest member, so the tree's first key is at or below
//! the lowest pending number, which is what removing old body-log segments needs.
//!
//! **Who edits a run.** The index thread writes new runs only; the archive moves and the
//! quarantine take members out, each under [`Outbox::edits`], so that neither rewrites a run
//! from a value the other has just replaced.

use std::sync::{Mutex, MutexGuard};

use sled::IVec;

use super::bodies::REFERENCE_LEN;
use super::codec::seq_key;
use super::error::StoreError;
use super::record::RecordError;

/// The ninth byte of a run's key.
pub const RUN_MARK: u8 = 0xFF;
/// A member of a run: its sequence number and its reference.
pub const MEMBER_LEN: usize = 8 + REFERENCE_LEN;
/// Most members in one run (4 KiB): a member taken out rewrites its run, and a leaf of sled's
/// holds up to 17 entries (it splits above 16, `should_split` in its `node.rs`), so a leaf of
/// full runs stays near 70 KiB, under the 128 KiB (`segment_size / 4`) past which sled writes
/// a rewritten leaf to a blob file of its own, each one more file for every sync to cover.
pub const RUN_MAX: usize = 128;

/// The outbox tree and the lock its run edits take.
pub struct Outbox {
    tree: sled::Tree,
    edits: Mutex<()>,
}

/// Where an event is held.
pub enum Place {
    /// Under its own key; the value is the record or its reference.
    Single(IVec),
    /// A member of the run at `run_key`, with its reference.
    InRun { run_key: Vec<u8>, reference: IVec },
}

impl Place {
    /// The record or its reference.
    pub fn value(&self) -> &IVec {
        match self {
            Place::Single(value) => value,
            Place::InRun { reference, .. } => reference,
        }
    }
}

impl Outbox {
    pub fn new(tree: sled::Tree) -> Self {
        Self {
            tree,
            edits: Mutex::new(()),
        }
    }

    /// The tree itself, for the transactions that write singles (redeliveries) or rewrite a
    /// run (the quarantine, holding [`Self::edits`]).
    pub fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// Held by whoever takes members out of runs.
    pub fn edits(&self) -> MutexGuard<'_, ()> {
        self.edits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores one event under its own key.
    pub fn insert_single(&self, seq: u64, value: &[u8]) -> sled::Result<()> {
        self.tree.insert(&seq_key(seq)[..], value)?;
        Ok(())
    }

    /// Stores `members` (ascending, numbers no entry holds) as runs of at most [`RUN_MAX`].
    pub fn insert_runs(&self, members: &[(u64, [u8; REFERENCE_LEN])]) -> sled::Result<()> {
        for chunk in members.chunks(RUN_MAX) {
            let mut value = Vec::with_capacity(chunk.len() * MEMBER_LEN);
            for (seq, reference) in chunk {
                value.extend_from_slice(&seq.to_be_bytes());
                value.extend_from_slice(reference);
            }
            self.tree.insert(run_key(chunk[0].0), value)?;
        }
        Ok(())
    }

    /// Where `seq` is held, if it is pending.
    pub fn locate(&self, seq: u64) -> Result<Option<Place>, sled::Error> {
        let Some((key, value)) = self.tree.range(..=run_key(seq)).next_back().transpose()? else {
            return Ok(None);
        };
        match key.len() {
            8 if key[..] == seq_key(seq) => Ok(Some(Place::Single(value))),
            9 => Ok(reference_in(&value, seq).map(|reference| Place::InRun {
                run_key: key.to_vec(),
                reference: IVec::from(reference),
            })),
            _ => Ok(None),
        }
    }

    /// The record or reference of `seq`, if it is pending.
    pub fn get(&self, seq: u64) -> Result<Option<IVec>, sled::Error> {
        Ok(self.locate(seq)?.map(|place| place.value().clone()))
    }

    pub fn contains(&self, seq: u64) -> Result<bool, sled::Error> {
        Ok(self.locate(seq)?.is_some())
    }

    /// Takes events out of the outbox, each where [`Self::locate`] found it: a single's key
    /// removed, a run rewritten once without its members among them (or removed once empty).
    /// The run is read again here, under [`Self::edits`]: a member taken out since is passed
    /// over, and one never comes back.
    pub fn remove_all<'a>(
        &self,
        found: impl IntoIterator<Item = (u64, &'a Place)>,
    ) -> Result<(), sled::Error> {
        let _edits = self.edits();
        let mut runs: Vec<(&[u8], Vec<u64>)> = Vec::new();
        for (seq, place) in found {
            match place {
                Place::Single(_) => {
                    self.tree.remove(&seq_key(seq)[..])?;
                }
                Place::InRun { run_key, .. } => match runs.last_mut() {
                    Some((key, members)) if *key == &run_key[..] => members.push(seq),
                    _ => runs.push((run_key, vec![seq])),
                },
            }
        }
        for (key, leaving) in runs {
            let Some(run) = self.tree.get(key)? else {
                continue;
            };
            match without_members(&run, &leaving) {
                Some(rest) => self.tree.insert(key, rest)?,
                None => self.tree.remove(key)?,
            };
        }
        Ok(())
    }

    /// The pending events numbered `from` and up, in order.
    pub fn starting_at(&self, from: u64) -> Result<Members<'static>, sled::Error> {
        // A run keyed below `from` may hold members at or above it.
        let before = self.tree.range(..seq_key(from)).next_back().transpose()?;
        let run_before = before.filter(|(key, _)| key.len() == 9).map(Ok);
        Ok(Members::new(
            Box::new(
                run_before
                    .into_iter()
                    .chain(self.tree.range(seq_key(from)..)),
            ),
            false,
            from,
            u64::MAX,
        ))
    }

    /// The pending events numbered below `before` (all if `None`), newest first.
    pub fn before(&self, before: Option<u64>) -> Members<'static> {
        let entries: Box<dyn Iterator<Item = _>> = match before {
            // A run keyed below `before` is found by its key even if it reaches past it.
            Some(before) => Box::new(self.tree.range(..seq_key(before)).rev()),
            None => Box::new(self.tree.iter().rev()),
        };
        Members::new(entries, true, 0, before.unwrap_or(u64::MAX))
    }

    /// The oldest pending event.
    pub fn first(&self) -> Result<Option<(u64, IVec)>, StoreError> {
        self.starting_at(0)?.next().transpose()
    }

    /// How many events are pending, by reading them all: only for a database without counts.
    pub fn count(&self) -> Result<u64, StoreError> {
        let mut count = 0;
        for member in self.starting_at(0)? {
            member?;
            count += 1;
        }
        Ok(count)
    }
}

/// The key of a run whose first member is `seq`.
pub fn run_key(seq: u64) -> [u8; 9] {
    let mut key = [RUN_MARK; 9];
    key[..8].copy_from_slice(&seq_key(seq));
    key
}

/// A run's members as `[u64 seq][reference]` arrays, and whatever is left over (nothing, in
/// a run that decodes).
fn member_arrays(run: &[u8]) -> (&[[u8; MEMBER_LEN]], &[u8]) {
    run.as_chunks::<MEMBER_LEN>()
}

fn seq_of_member(member: &[u8; MEMBER_LEN]) -> u64 {
    u64::from_be_bytes(member[..8].try_into().expect("8 bytes"))
}

/// The members of a run's value, or an error if it is not one.
fn members(run: &[u8]) -> Result<impl DoubleEndedIterator<Item = (u64, &[u8])>, RecordError> {
    let (members, rest) = member_arrays(run);
    if members.is_empty() || !rest.is_empty() {
        return Err(RecordError::Corrupt(format!(
            "an outbox run of {} bytes",
            run.len()
        )));
    }
    Ok(members
        .iter()
        .map(|member| (seq_of_member(member), &member[8..])))
}

/// The reference of `seq` in a run, if it is a member (members are ascending).
fn reference_in(run: &[u8], seq: u64) -> Option<&[u8]> {
    let (members, _) = member_arrays(run);
    let at = members.binary_search_by_key(&seq, seq_of_member).ok()?;
    Some(&members[at][8..])
}

/// A run's value without `leaving`; `None` once nothing is left.
pub fn without_members(run: &[u8], leaving: &[u64]) -> Option<Vec<u8>> {
    let (members, _) = member_arrays(run);
    let rest: Vec<u8> = members
        .iter()
        .filter(|member| !leaving.contains(&seq_of_member(member)))
        .flatten()
        .copied()
        .collect();
    (!rest.is_empty()).then_some(rest)
}

/// Pending events in order (or newest first) within `[low, high)`, runs read member by member.
pub struct Members<'a> {
    entries: Box<dyn Iterator<Item = sled::Result<(IVec, IVec)>> + 'a>,
    newest_first: bool,
    low: u64,
    high: u64,
    /// What is left of the run being read, in the order they come out.
    queued: std::collections::VecDeque<(u64, IVec)>,
}

impl<'a> Members<'a> {
    fn new(
        entries: Box<dyn Iterator<Item = sled::Result<(IVec, IVec)>> + 'a>,
        newest_first: bool,
        low: u64,
        high: u64,
    ) -> Self {
        Self {
            entries,
            newest_first,
            low,
            high,
            queued: Default::default(),
        }
    }

    fn queue_run(&mut self, run: &[u8]) -> Result<(), RecordError> {
        let (low, high) = (self.low, self.high);
        let within = members(run)?
            .filter(|(seq, _)| (low..high).contains(seq))
            .map(|(seq, reference)| (seq, IVec::from(reference)));
        if self.newest_first {
            self.queued.extend(within.rev());
        } else {
            self.queued.extend(within);
        }
        Ok(())
    }
}

impl Iterator for Members<'_> {
    type Item = Result<(u64, IVec), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(member) = self.queued.pop_front() {
                return Some(Ok(member));
            }
            let (key, value) = match self.entries.next()? {
                Ok(entry) => entry,
                Err(e) => return Some(Err(e.into())),
            };
            match key.len() {
                8 => {
                    let seq = u64::from_be_bytes(key[..].try_into().expect("8 bytes"));
                    if (self.low..self.high).contains(&seq) {
                        return Some(Ok((seq, value)));
                    }
                }
                9 if key[8] == RUN_MARK => {
                    if let Err(e) = self.queue_run(&value) {
                        return Some(Err(e.into()));
                    }
                }
                _ => {
                    return Some(Err(RecordError::Corrupt(
                        "an outbox key is neither a number nor a run".into(),
                    )
                    .into()))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(n: u8) -> [u8; REFERENCE_LEN] {
        [n; REFERENCE_LEN]
    }

    fn outbox() -> (tempfile::TempDir, Outbox) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        (dir, Outbox::new(db.open_tree("outbox").unwrap()))
    }

    fn seqs(members: Members<'_>) -> Vec<u64> {
        members.map(|m| m.unwrap().0).collect()
    }

    /// Runs 10–14 and 20–21, a single 16 between them (a redelivery), a single 5 before.
    fn filled() -> (tempfile::TempDir, Outbox) {
        let (dir, outbox) = outbox();
        outbox.insert_single(5, b"five").unwrap();
        let run: Vec<_> = (10..15).map(|s| (s, reference(s as u8))).collect();
        outbox.insert_runs(&run).unwrap();
        outbox.insert_single(16, b"sixteen").unwrap();
        outbox
            .insert_runs(&[(20, reference(20)), (21, reference(21))])
            .unwrap();
        (dir, outbox)
    }

    #[test]
    fn runs_and_singles_read_as_one_ordered_outbox() {
        let (_dir, outbox) = filled();
        assert_eq!(
            seqs(outbox.starting_at(0).unwrap()),
            [5, 10, 11, 12, 13, 14, 16, 20, 21]
        );
        // From the middle of a run: the run keyed below is read too.
        assert_eq!(
            seqs(outbox.starting_at(12).unwrap()),
            [12, 13, 14, 16, 20, 21]
        );
        assert_eq!(seqs(outbox.starting_at(15).unwrap()), [16, 20, 21]);
        assert_eq!(
            seqs(outbox.before(None)),
            [21, 20, 16, 14, 13, 12, 11, 10, 5]
        );
        assert_eq!(seqs(outbox.before(Some(13))), [12, 11, 10, 5]);
        assert_eq!(
            seqs(outbox.before(Some(21))),
            [20, 16, 14, 13, 12, 11, 10, 5]
        );
        assert_eq!(outbox.count().unwrap(), 9);
        assert_eq!(outbox.first().unwrap().unwrap().0, 5);
    }

    #[test]
    fn each_event_is_found_where_it_is_held() {
        let (_dir, outbox) = filled();
        assert_eq!(&outbox.get(5).unwrap().unwrap()[..], b"five");
        assert_eq!(&outbox.get(16).unwrap().unwrap()[..], b"sixteen");
        assert_eq!(&outbox.get(12).unwrap().unwrap()[..], reference(12));
        assert_eq!(&outbox.get(20).unwrap().unwrap()[..], reference(20));
        for absent in [0, 4, 6, 9, 15, 17, 19, 22, u64::MAX] {
            assert!(!outbox.contains(absent).unwrap(), "{absent}");
        }
    }

    /// Takes out those of `seqs` that are pending, as the archive moves do.
    fn remove(outbox: &Outbox, seqs: &[u64]) {
        let found: Vec<(u64, Place)> = seqs
            .iter()
            .filter_map(|&seq| Some((seq, outbox.locate(seq).unwrap()?)))
            .collect();
        outbox
            .remove_all(found.iter().map(|(seq, place)| (*seq, place)))
            .unwrap();
    }

    #[test]
    fn members_leave_one_by_one_and_an_empty_run_goes() {
        let (_dir, outbox) = filled();
        remove(&outbox, &[5, 10, 12, 16, 99]);
        assert_eq!(seqs(outbox.starting_at(0).unwrap()), [11, 13, 14, 20, 21]);
        remove(&outbox, &[11, 13, 14, 20]);
        assert_eq!(seqs(outbox.starting_at(0).unwrap()), [21]);
        // The first run is gone, not left empty; the second keeps its key.
        assert_eq!(outbox.tree().len(), 1);
        assert_eq!(outbox.first().unwrap().unwrap().0, 21);
        remove(&outbox, &[21]);
        assert!(outbox.tree().is_empty());
    }

    #[test]
    fn a_long_pass_is_stored_as_several_runs() {
        let (_dir, outbox) = outbox();
        let many: Vec<_> = (1..=(RUN_MAX as u64 * 2 + 3))
            .map(|s| (s, reference(1)))
            .collect();
        outbox.insert_runs(&many).unwrap();
        assert_eq!(outbox.tree().len(), 3);
        assert_eq!(outbox.count().unwrap(), many.len() as u64);
        assert!(outbox.contains(RUN_MAX as u64 + 1).unwrap());
    }

    #[test]
    fn a_run_that_does_not_decode_is_reported_not_skipped() {
        let (_dir, outbox) = outbox();
        outbox.tree().insert(run_key(3), &b"short"[..]).unwrap();
        let read: Vec<_> = outbox.starting_at(0).unwrap().collect();
        assert!(matches!(
            read[..],
            [Err(StoreError::Record(RecordError::Corrupt(_)))]
        ));
    }
}

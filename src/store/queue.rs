//! The outbox: records queued under `q` + their id, in detection order. What the recorder calls
//! (commit a cycle's states and records, within the bounds; sync) and what the sender calls (the next
//! batch, ack, failure notes).
//!
//! Invariants: a commit is refused whole per meter when it would pass `max_records` / `max_bytes` or
//! when free space is below `min_free` (nothing dropped, the caller keeps its old state); the sender
//! sees only records below the durable mark (committed before a completed sync); a batch holds one
//! `eventName` and never reorders a meter's records; a record leaves the queue here only by
//! [`Store::ack`]. Never sends, never retries, never decides when a record is dead.

use std::borrow::Borrow;
use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use super::states::encode_state_into;
use super::{id_key, id_of, state_key, stored_record, Store, StoreError, Stored, StoredState, QUEUE};
use crate::events::record::{Draft, Record};

/// Most changes (meters) applied in one sled batch by [`Store::commit_batch`]; a Modbus line has at
/// most 247 units.
const CHUNK: usize = 256;
/// How often [`Store::check_blocking`] looks at most.
const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Store {
    /// Commit a meter's new state and its records atomically. Returns the records with their ids.
    /// Refuses with [`StoreError::Full`] or [`StoreError::NoSpace`] (committing nothing) when a
    /// bound would be passed. Not durable until [`Store::sync`].
    pub fn commit(&self, meter_no: &str, state: &StoredState, drafts: Vec<Draft>) -> Result<Vec<Record>, StoreError> {
        let mut results = self.commit_batch(vec![(meter_no.to_string(), state.clone(), drafts)])?;
        results.pop().unwrap_or_else(|| Ok(Vec::new()))
    }

    /// Commit the changes of a whole poll cycle — each a meter's new state and its records — in ONE
    /// atomic batch, so a cycle costs one commit instead of one per meter. Returns one result per
    /// change, in order: its records with their ids, or [`StoreError::Full`] for a change that would
    /// pass the bounds (that change alone is not committed: its state stays old, so the transition is
    /// seen again; the changes that fit are committed, exactly as with one [`Store::commit`] each in
    /// this order). Below `min_free` every change is refused with [`StoreError::NoSpace`]. An `Err`
    /// of the whole call is a storage error: the changes of the failed chunk (below) and after it
    /// were not committed, earlier chunks may have been, so read states back. Not durable until
    /// [`Store::sync`]. A meter listed twice ends with its last state; its records keep order.
    ///
    /// Each change is atomic; the changes are applied in chunks of `CHUNK`: one sled batch of
    /// thousands of writes keeps every node version it replaces until it ends. A bus cycle is below
    /// one chunk.
    #[allow(clippy::type_complexity)]
    pub fn commit_batch<M: AsRef<str>, S: Borrow<StoredState>>(
        &self,
        mut changes: Vec<(M, S, Vec<Draft>)>,
    ) -> Result<Vec<Result<Vec<Record>, StoreError>>, StoreError> {
        if let Some(low) = self.low_space() {
            self.shared.counts.refused_space.fetch_add(1, Ordering::Relaxed);
            self.shared.counts.refusing.store(true, Ordering::Relaxed);
            return Ok(changes.iter().map(|_| Err(StoreError::NoSpace(low))).collect());
        }
        let mut results = Vec::with_capacity(changes.len());
        while !changes.is_empty() {
            let rest = changes.split_off(changes.len().min(CHUNK));
            results.extend(self.commit_chunk(changes)?);
            changes = rest;
        }
        Ok(results)
    }

    /// One chunk of [`Store::commit_batch`], in one atomic batch.
    #[allow(clippy::type_complexity)]
    fn commit_chunk<M: AsRef<str>, S: Borrow<StoredState>>(
        &self,
        changes: Vec<(M, S, Vec<Draft>)>,
    ) -> Result<Vec<Result<Vec<Record>, StoreError>>, StoreError> {
        let mut last_refused = None;
        let (results, top) = self.write(|open, batch, stored| {
            let mut results = Vec::with_capacity(changes.len());
            let mut top = 0;
            // sled copies keys and values: one buffer serves every record, one every state.
            let (mut scratch, mut state_text) = (Vec::new(), String::new());
            for (meter_no, state, drafts) in changes {
                let meter_no = meter_no.as_ref();
                let mut records = Vec::with_capacity(drafts.len());
                for d in drafts {
                    records.push(Record {
                        id: open.db.generate_id().map_err(|e| self.db_error(open, e))?,
                        event_name: d.event_name,
                        meter_no: meter_no.to_string(),
                        detected_at: d.detected_at,
                        from: d.from,
                        to: d.to,
                        biz_data: d.biz_data,
                        attempts: 0,
                        rejections: 0,
                        last_error: None,
                    });
                }
                let bytes: u64 = records.iter().map(|r| stored_record::encoded_len(r) as u64).sum();
                if let Err(e) = self.check_room(stored, records.len() as u64, bytes) {
                    last_refused = Some(true);
                    results.push(Err(e));
                    continue;
                }
                last_refused = Some(false);
                stored.records += records.len() as u64;
                stored.bytes += bytes;
                encode_state_into(&mut state_text, state.borrow());
                batch.insert(state_key(meter_no), state_text.as_bytes());
                for r in &records {
                    top = top.max(r.id.saturating_add(1));
                    scratch.clear();
                    stored_record::encode_into(&mut scratch, r);
                    batch.insert(&id_key(QUEUE, r.id)[..], &scratch[..]);
                }
                results.push(Ok(records));
            }
            stored.top = stored.top.max(top);
            Ok((results, top))
        })?;
        self.shared.counts.committed.fetch_max(top, Ordering::SeqCst);
        // As after one commit per change in order: the last change decides whether we are refusing.
        if let Some(refused) = last_refused {
            self.shared.counts.refusing.store(refused, Ordering::Relaxed);
        }
        Ok(results)
    }

    /// Whether `records` more records of `bytes` fit next to the `stored` counts; a refusal is
    /// counted and sets the refusing flag.
    fn check_room(&self, stored: &Stored, records: u64, bytes: u64) -> Result<(), StoreError> {
        let limits = &self.shared.limits;
        if records > 0 && (stored.records + records > limits.max_records || stored.bytes + bytes > limits.max_bytes) {
            self.shared.counts.refused.fetch_add(1, Ordering::Relaxed);
            self.shared.counts.refusing.store(true, Ordering::Relaxed);
            return Err(StoreError::Full {
                records: stored.records,
                bytes: stored.bytes,
                max_records: limits.max_records,
                max_bytes: limits.max_bytes,
            });
        }
        Ok(())
    }

    /// Make everything committed so far durable: sled flush, then fsync of its log and of whatever
    /// else of the database changed (`durable.rs`). A failure fails the store (module docs):
    /// the records of this sync stay invisible to the sender until a reopen has synced them.
    /// Blocking; call from `spawn_blocking` in async code (or use [`Store::sync`]).
    pub fn sync_blocking(&self) -> Result<(), StoreError> {
        let open = self.handle()?;
        let target = self.shared.counts.committed.load(Ordering::SeqCst);
        open.db.flush().map_err(|e| self.db_error(&open, e))?;
        open.synced.sync(&self.shared.dir).map_err(|e| {
            let e = StoreError::from(e);
            self.fail_from(&open, &e.to_string());
            e
        })?;
        self.shared.counts.durable.fetch_max(target, Ordering::SeqCst);
        Ok(())
    }

    /// On a quiet store, at most once per [`CHECK_EVERY`]: flush what sled holds (no fsync; usually
    /// nothing) so that a disk that failed meanwhile is noticed, and healed, without waiting for the
    /// next transition. sled's own flusher writes every 500 ms, but its error reaches us only through
    /// a call that looks at it; writes to its memory do not. Blocking.
    pub(crate) fn check_blocking(&self) {
        {
            let mut checked = self.shared.checked.lock().unwrap_or_else(PoisonError::into_inner);
            if checked.is_some_and(|t| t.elapsed() < CHECK_EVERY) {
                return;
            }
            *checked = Some(std::time::Instant::now());
        }
        if let Ok(open) = self.handle() {
            // A failure is recorded by `db_error`; the caller heals on its next cycle.
            let _ = open.db.flush().map_err(|e| self.db_error(&open, e));
        }
    }

    /// [`Store::sync_blocking`] off the async threads.
    pub async fn sync(&self) -> Result<(), StoreError> {
        self.off_async(Store::sync_blocking).await
    }

    /// Records queued.
    pub fn len(&self) -> u64 {
        self.shared.counts.records.load(Ordering::Relaxed)
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of queued records.
    pub fn bytes(&self) -> u64 {
        self.shared.counts.bytes.load(Ordering::Relaxed)
    }

    /// Commits refused because the outbox was full, since open.
    pub(crate) fn refused(&self) -> u64 {
        self.shared.counts.refused.load(Ordering::Relaxed)
    }

    /// Commits refused because free space was below `min_free`, since open.
    pub(crate) fn refused_space(&self) -> u64 {
        self.shared.counts.refused_space.load(Ordering::Relaxed)
    }

    /// Whether the last commit was refused for lack of room and nothing has been removed since: new
    /// valve states are not being recorded (health `critical`).
    pub fn is_refusing(&self) -> bool {
        self.shared.counts.refusing.load(Ordering::Relaxed)
    }

    /// Queued records, oldest first, at most `limit` (for the admin API and tests). Undecodable ones
    /// are set aside.
    pub fn list(&self, limit: usize) -> Result<Vec<Record>, StoreError> {
        let open = self.handle()?;
        let mut out = Vec::new();
        for item in open.store.scan_prefix([QUEUE]) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = self.read(&open, item)?;
            match decode_record(id_of(&k), &v) {
                Ok(r) => out.push(r),
                Err(e) => self.set_aside(&k, &v, &e)?,
            }
        }
        Ok(out)
    }

    /// How long the record now at the head of the queue has waited there, as this process saw it (a
    /// monotonic clock: a record's wall-clock detection time can be decades off on a board whose clock
    /// was stepped). Counted from when this process first saw it at the head (by this call or by
    /// [`Store::next_batch_where`]), so after a restart a backlog's wait counts from the start.
    /// `None` when nothing is queued or the store cannot be read.
    pub(crate) fn oldest_waiting(&self) -> Option<std::time::Duration> {
        let head = self.list(1).ok()?.first()?.id;
        Some(self.seen_at_head(head).elapsed())
    }

    /// Since when `id` has been at the head of the queue (now, if it was not before).
    fn seen_at_head(&self, id: u64) -> tokio::time::Instant {
        let mut head = self.shared.head.lock().unwrap_or_else(PoisonError::into_inner);
        match *head {
            Some((seen, since)) if seen == id => since,
            _ => {
                let now = tokio::time::Instant::now();
                *head = Some((id, now));
                now
            }
        }
    }

    /// The next batch to send: the oldest record, plus later records with the same `eventName`, up
    /// to `max`, among records already synced to disk. A meter whose older record has another event is skipped from then on, so records of
    /// one meter are always sent in detection order.
    pub fn next_batch(&self, max: usize) -> Result<Vec<Record>, StoreError> {
        self.next_batch_where(max, |_| false)
    }

    /// [`Store::next_batch`], passing over records for which `skip` is true (the sender's records on
    /// hold after a rejection). A skipped record blocks the later records of its meter like a record of
    /// another event does, so skipping never reorders a meter's records. A record that does not
    /// decode is set aside and blocks nothing.
    pub(crate) fn next_batch_where(
        &self,
        max: usize,
        skip: impl Fn(&Record) -> bool,
    ) -> Result<Vec<Record>, StoreError> {
        let open = self.handle()?;
        let mut batch: Vec<Record> = Vec::new();
        let mut blocked: HashSet<String> = HashSet::new();
        // Bound the scan: a backlog of other events must not make each batch read the whole queue.
        let durable = self.shared.counts.durable.load(Ordering::SeqCst);
        for item in open.store.scan_prefix([QUEUE]).take(max.saturating_mul(20).max(100)) {
            let (k, v) = self.read(&open, item)?;
            // Read the few fields the choice needs first; only a record that joins the batch (or must
            // be shown to `skip`) is decoded in full. A record of another event blocks its meter
            // whether or not `skip` would hold it, so `skip` is not needed for it.
            if id_of(&k) >= durable {
                break;
            }
            if batch.is_empty() && blocked.is_empty() {
                self.seen_at_head(id_of(&k));
            }
            let head = match stored_record::head(&v) {
                Ok(head) => head,
                Err(e) => {
                    self.set_aside(&k, &v, &corrupt_record(id_of(&k), e))?;
                    continue;
                }
            };
            if blocked.contains(head.meter_no) {
                continue;
            }
            if batch.first().is_some_and(|first| first.event_name != head.event_name) {
                blocked.insert(head.meter_no.to_string());
                continue;
            }
            let r = match decode_record(head.id, &v) {
                Ok(r) => r,
                Err(e) => {
                    self.set_aside(&k, &v, &e)?;
                    continue;
                }
            };
            if skip(&r) {
                blocked.insert(r.meter_no);
                continue;
            }
            batch.push(r);
            if batch.len() >= max {
                break;
            }
        }
        Ok(batch)
    }

    /// `Store::ack_blocking` off the async threads.
    pub async fn ack(&self, ids: &[u64]) -> Result<(), StoreError> {
        let ids = ids.to_vec();
        self.off_async(move |o| o.ack_blocking(&ids)).await
    }

    /// Remove delivered records (the server answered `code: 0`), then sync. An `Err` means the removal
    /// may not be stored: the caller must not send anything more until it is. Blocking.
    pub(crate) fn ack_blocking(&self, ids: &[u64]) -> Result<(), StoreError> {
        let removed = self.write(|open, batch, stored| {
            let mut removed = 0;
            for id in ids.iter().collect::<BTreeSet<_>>() {
                let key = id_key(QUEUE, *id);
                if let Some(v) = self.get(open, &key)? {
                    batch.remove(&key[..]);
                    stored.records = stored.records.saturating_sub(1);
                    stored.bytes = stored.bytes.saturating_sub(v.len() as u64);
                    removed += 1;
                }
            }
            Ok(removed)
        })?;
        if removed > 0 {
            self.shared.counts.refusing.store(false, Ordering::Relaxed);
        }
        self.sync_blocking()
    }

    /// Count a failed attempt on each record and keep the reason; returns the updated records.
    pub fn note_failure(&self, ids: &[u64], error: &str) -> Result<Vec<Record>, StoreError> {
        self.update_failed(ids, error, false)
    }

    /// The server refused this record alone (`code != 0` for a request carrying only it): count an
    /// attempt *and* a rejection, keep the server's msg. Returns the updated record (`None` if it is no
    /// longer queued). The caller buries it once `rejections` reaches its limit.
    pub fn note_rejection(&self, id: u64, msg: &str) -> Result<Option<Record>, StoreError> {
        Ok(self.update_failed(&[id], msg, true)?.pop())
    }

    fn update_failed(&self, ids: &[u64], error: &str, rejected: bool) -> Result<Vec<Record>, StoreError> {
        let last_error: String = error.chars().take(500).collect();
        let mut bad = Vec::new();
        // Under the writer's lock, so an ack that raced this update is not undone (a record acked
        // meanwhile is not found here).
        let out = self.write(|open, batch, stored| {
            let mut out = Vec::new();
            for id in ids.iter().collect::<BTreeSet<_>>() {
                let key = id_key(QUEUE, *id);
                let Some(v) = self.get(open, &key)? else {
                    continue;
                };
                let mut r = match decode_record(*id, &v) {
                    Ok(r) => r,
                    Err(e) => {
                        bad.push((key, v, e));
                        continue;
                    }
                };
                r.attempts = r.attempts.saturating_add(1);
                if rejected {
                    r.rejections = r.rejections.saturating_add(1);
                }
                r.last_error = Some(last_error.clone());
                let nv = stored_record::encode(&r);
                stored.bytes = (stored.bytes + nv.len() as u64).saturating_sub(v.len() as u64);
                batch.insert(&key[..], nv);
                out.push(r);
            }
            Ok(out)
        })?;
        for (key, v, e) in bad {
            self.set_aside(&key, &v, &e)?;
        }
        Ok(out)
    }
}

/// Read back a queued record; a value that does not parse is a typed, located [`StoreError::Corrupt`].
pub(super) fn decode_record(id: u64, v: &[u8]) -> Result<Record, StoreError> {
    stored_record::decode(v).map_err(|e| corrupt_record(id, e))
}

fn corrupt_record(id: u64, e: stored_record::Malformed) -> StoreError {
    StoreError::Corrupt {
        tree: "outbox",
        detail: format!("{id}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;
    use crate::store::testing::*;

    #[tokio::test]
    async fn commit_survives_reopen_and_ack_removes() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<u64> = {
            let o = Store::open(dir.path(), BIG).unwrap();
            let a = o.commit("M1", &state(1), vec![draft("开")]).unwrap();
            let b = o.commit("M2", &state(0), vec![draft("关")]).unwrap();
            o.sync().await.unwrap();
            vec![a[0].id, b[0].id]
        };
        let o = Store::open(dir.path(), BIG).unwrap();
        assert_eq!(o.len(), 2);
        assert_eq!(o.state("M1").unwrap(), Some(state(1)));
        assert_eq!(o.list(10).unwrap().iter().map(|r| r.id).collect::<Vec<_>>(), ids);
        o.ack(&ids[..1]).await.unwrap();
        assert_eq!(o.list(10).unwrap().iter().map(|r| r.id).collect::<Vec<_>>(), ids[1..]);
        assert!(o.bytes() > 0);
    }

    #[tokio::test]
    async fn batches_group_one_event_and_keep_each_meters_order() {
        let dir = tempfile::tempdir().unwrap();
        let o = Store::open(dir.path(), BIG).unwrap();
        let a = o.commit("M1", &state(1), vec![draft("开")]).unwrap()[0].id;
        let b = o.commit("M2", &state(0), vec![draft("关")]).unwrap()[0].id;
        let c = o.commit("M2", &state(1), vec![draft("开")]).unwrap()[0].id;
        let d = o.commit("M3", &state(1), vec![draft("开")]).unwrap()[0].id;
        assert!(
            o.next_batch(10).unwrap().is_empty(),
            "nothing is sent before it is synced"
        );
        o.sync().await.unwrap();
        let batch: Vec<u64> = o.next_batch(10).unwrap().iter().map(|r| r.id).collect();
        // M2's "开" waits behind its older "关".
        assert_eq!(batch, vec![a, d]);
        assert_eq!(
            o.next_batch(1).unwrap().iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![a]
        );
        o.ack(&[a, d]).await.unwrap();
        assert_eq!(
            o.next_batch(10).unwrap().iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![b]
        );
        o.ack(&[b]).await.unwrap();
        assert_eq!(
            o.next_batch(10).unwrap().iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![c]
        );
    }

    #[tokio::test]
    async fn a_full_outbox_refuses_and_commits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let o = Store::open(
            dir.path(),
            Limits {
                max_records: 1,
                max_bytes: 1 << 20,
                ..Limits::DEFAULT
            },
        )
        .unwrap();
        o.commit("M1", &state(1), vec![draft("开")]).unwrap();
        let err = o.commit("M1", &state(0), vec![draft("关")]).unwrap_err();
        assert!(matches!(err, StoreError::Full { records: 1, .. }), "{err}");
        assert_eq!(
            o.state("M1").unwrap(),
            Some(state(1)),
            "state must not move when the record is refused"
        );
        assert_eq!(o.refused(), 1);
    }

    #[tokio::test]
    async fn held_records_are_skipped_and_block_their_meter() {
        let dir = tempfile::tempdir().unwrap();
        let o = Store::open(dir.path(), BIG).unwrap();
        let a = o.commit("M1", &state(1), vec![draft("开")]).unwrap()[0].id;
        let b = o.commit("M2", &state(1), vec![draft("开")]).unwrap()[0].id;
        let c = o.commit("M1", &state(1), vec![draft("开")]).unwrap()[0].id;
        o.sync().await.unwrap();
        let ids = |skip: u64| -> Vec<u64> {
            o.next_batch_where(10, |r| r.id == skip)
                .unwrap()
                .iter()
                .map(|r| r.id)
                .collect()
        };
        assert_eq!(ids(a), vec![b], "M1's later record waits behind the held one");
        assert_eq!(ids(b), vec![a, c]);
        let r = o.note_rejection(a, "refused").unwrap().unwrap();
        assert_eq!((r.attempts, r.rejections), (1, 1));
        assert_eq!(
            o.note_failure(&[a], "timeout").unwrap()[0].rejections,
            1,
            "an outage is no refusal"
        );
    }

    #[tokio::test]
    async fn a_cycle_committed_in_one_batch_survives_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<u64> = {
            let o = Store::open(dir.path(), BIG).unwrap();
            let results = o
                .commit_batch(vec![
                    ("M1", state(1), vec![draft("开")]),
                    ("M2", state(0), vec![]),
                    ("M3", state(1), vec![draft("开"), draft("开2")]),
                ])
                .unwrap();
            assert_eq!(results.len(), 3);
            assert!(
                results[1].as_ref().unwrap().is_empty(),
                "a state without records is fine"
            );
            assert_eq!(o.len(), 3);
            o.sync().await.unwrap();
            results.into_iter().flat_map(|r| r.unwrap()).map(|r| r.id).collect()
        };
        let o = Store::open(dir.path(), BIG).unwrap();
        assert_eq!(o.list(10).unwrap().iter().map(|r| r.id).collect::<Vec<_>>(), ids);
        assert_eq!(o.list(10).unwrap()[2].meter_no, "M3");
        assert_eq!(o.state("M2").unwrap(), Some(state(0)));
        assert_eq!(o.state("M3").unwrap(), Some(state(1)));
        assert_eq!(o.len(), 3);
    }

    #[tokio::test]
    async fn a_batch_past_the_bounds_commits_what_fits_like_one_commit_each() {
        let dir = tempfile::tempdir().unwrap();
        let o = Store::open(
            dir.path(),
            Limits {
                max_records: 2,
                max_bytes: 1 << 20,
                ..Limits::DEFAULT
            },
        )
        .unwrap();
        let results = o
            .commit_batch(vec![
                ("M1", state(1), vec![draft("开")]),
                ("M2", state(1), vec![draft("开")]),
                ("M3", state(1), vec![draft("开")]),
                ("M4", state(1), vec![]),
            ])
            .unwrap();
        assert!(results[0].is_ok() && results[1].is_ok());
        assert!(matches!(results[2], Err(StoreError::Full { records: 2, .. })));
        assert!(results[3].is_ok(), "a baseline needs no room");
        assert_eq!(o.state("M3").unwrap(), None, "a refused change keeps its old state");
        assert_eq!(o.state("M4").unwrap(), Some(state(1)));
        assert_eq!((o.len(), o.refused()), (2, 1));
        assert!(!o.is_refusing(), "the last change fitted, as with one commit each");
        let again = o.commit_batch(vec![("M3", state(1), vec![draft("开")])]).unwrap();
        assert!(again[0].is_err());
        assert!(o.is_refusing());
    }

    #[tokio::test]
    async fn next_batch_reads_meters_and_events_that_need_unescaping() {
        // The scan reads meter and event from the stored record without copying them; quotes,
        // backslashes and tabs must still be read (and compared) correctly.
        let dir = tempfile::tempdir().unwrap();
        let o = Store::open(dir.path(), BIG).unwrap();
        let a = o.commit("M\"1\\", &state(1), vec![draft("开\t")]).unwrap()[0].id;
        let b = o.commit("M\"1\\", &state(0), vec![draft("关")]).unwrap()[0].id;
        let c = o.commit("M2", &state(1), vec![draft("开\t")]).unwrap()[0].id;
        let d = o.commit("M\"1\\", &state(1), vec![draft("开\t")]).unwrap()[0].id;
        o.sync().await.unwrap();
        let batch = o.next_batch(10).unwrap();
        assert_eq!(batch.iter().map(|r| r.id).collect::<Vec<_>>(), vec![a, c]);
        assert_eq!(batch[0].meter_no, "M\"1\\");
        o.ack(&[a, c]).await.unwrap();
        assert_eq!(
            o.next_batch(10).unwrap().iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![b]
        );
        o.ack(&[b]).await.unwrap();
        assert_eq!(
            o.next_batch(10).unwrap().iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![d]
        );
    }

    #[tokio::test]
    async fn a_batch_of_several_chunks_commits_like_one_commit_each() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_records: 300,
            max_bytes: 1 << 30,
            ..Limits::DEFAULT
        };
        let o = Store::open(dir.path(), limits).unwrap();
        let n = 2 * CHUNK + 88;
        let changes = (0..n).map(|i| (format!("M{i}"), state(1), vec![draft("开")])).collect();
        let results = o.commit_batch(changes).unwrap();
        assert_eq!(results.len(), n);
        assert!(results[..300].iter().all(|r| r.as_ref().is_ok_and(|v| v.len() == 1)));
        assert!(results[300..].iter().all(|r| matches!(r, Err(StoreError::Full { .. }))));
        assert!(o.is_refusing());
        o.sync().await.unwrap();
        drop(o);
        let o = Store::open(dir.path(), limits).unwrap();
        assert_eq!(o.len(), 300);
        let meters: Vec<String> = o.list(1000).unwrap().into_iter().map(|r| r.meter_no).collect();
        assert_eq!(
            meters,
            (0..300).map(|i| format!("M{i}")).collect::<Vec<_>>(),
            "detection order"
        );
        assert_eq!(o.state("M299").unwrap(), Some(state(1)));
        assert_eq!(o.state("M300").unwrap(), None, "a refused change keeps its old state");
    }

    #[tokio::test]
    async fn an_id_given_twice_is_acked_and_noted_once() {
        let dir = tempfile::tempdir().unwrap();
        let o = Store::open(dir.path(), BIG).unwrap();
        let ids: Vec<u64> = (0..2)
            .map(|i| o.commit("M1", &state(i), vec![draft("开")]).unwrap()[0].id)
            .collect();
        let noted = o.note_failure(&[ids[0], ids[0]], "timeout").unwrap();
        assert_eq!(
            noted.iter().map(|r| (r.id, r.attempts)).collect::<Vec<_>>(),
            [(ids[0], 1)]
        );
        o.ack(&[ids[1], ids[1]]).await.unwrap();
        assert_eq!(o.len(), 1);
        let s = stored(&o).unwrap();
        assert_eq!((s.records, s.bytes), (1, o.bytes()));
        assert_eq!(o.bytes(), stored_record::encode(&o.list(1).unwrap()[0]).len() as u64);
    }
}

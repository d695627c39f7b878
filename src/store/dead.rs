//! Dead letters: records the server refused too often, kept under `d` + their id ([`DeadLetter`],
//! JSON) for an operator. Burying and requeueing are each one batch that moves the record between
//! the queue and here under the same id, so it never exists twice or not at all.
//!
//! Bound: at most `max_dead` dead letters (counted at open, then kept in memory); at the bound
//! [`Store::bury`] refuses ([`StoreError::DeadFull`]) and the record stays queued. Dead letters do
//! not count against the outbox bounds. Never deleted: only requeued (or set aside when undecodable).

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::queue::decode_record;
use super::{decode, encode, id_key, id_of, stored_record, Store, StoreError, DEAD, QUEUE};
use crate::events::record::Record;

/// A record the server refused too often, kept for an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The record as it was queued.
    pub record: Record,
    /// The server's last `msg`.
    pub reason: String,
    /// When it was moved here (RFC 3339).
    pub died_at: String,
}

impl Store {
    /// Number of dead letters (a count kept in memory: no walk).
    pub fn dead_len(&self) -> u64 {
        self.shared.counts.dead.load(Ordering::Relaxed)
    }

    /// Burials refused because `max_dead` dead letters were kept, since start.
    pub(crate) fn dead_refused(&self) -> u64 {
        self.shared.counts.dead_refused.load(Ordering::Relaxed)
    }

    /// Move a record to the dead letters with the server's reason (one batch), then sync. Refused
    /// with [`StoreError::DeadFull`] at `max_dead` dead letters: the record stays queued.
    pub async fn bury(&self, id: u64, reason: &str, died_at: &str) -> Result<(), StoreError> {
        let (reason, died_at) = (reason.to_string(), died_at.to_string());
        self.off_async(move |o| o.bury_blocking(id, &reason, &died_at)).await
    }

    /// [`Store::bury`], blocking.
    pub(crate) fn bury_blocking(&self, id: u64, reason: &str, died_at: &str) -> Result<(), StoreError> {
        let max_dead = self.shared.limits.max_dead;
        let mut bad = None;
        let buried = self.write(|open, batch, stored| {
            let key = id_key(QUEUE, id);
            // Gone meanwhile (acked by a request that carried it): nothing to bury.
            let Some(v) = self.get(open, &key)? else {
                return Ok(false);
            };
            let record = match decode_record(id, &v) {
                Ok(r) => r,
                Err(e) => {
                    bad = Some((key, v, e));
                    return Ok(false);
                }
            };
            let dead = self.shared.counts.dead.load(Ordering::Relaxed);
            if dead >= max_dead {
                self.shared.counts.dead_refused.fetch_add(1, Ordering::Relaxed);
                return Err(StoreError::DeadFull { dead });
            }
            let dead = DeadLetter {
                record,
                reason: reason.to_string(),
                died_at: died_at.to_string(),
            };
            batch.remove(&key[..]);
            batch.insert(&id_key(DEAD, id)[..], encode(&dead));
            stored.records = stored.records.saturating_sub(1);
            stored.bytes = stored.bytes.saturating_sub(v.len() as u64);
            Ok(true)
        })?;
        if let Some((key, v, e)) = bad {
            self.set_aside(&key, &v, &e)?;
        }
        if buried {
            self.shared.counts.dead.fetch_add(1, Ordering::Relaxed);
            self.shared.counts.refusing.store(false, Ordering::Relaxed);
        }
        self.sync_blocking()
    }

    /// All dead letters, oldest first. Loads every one: for tools on a stopped state directory and
    /// tests; the admin API pages with `Store::dead_page`.
    pub fn dead(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = self.dead_page(after, 1000)?;
            let Some(last) = page.last() else {
                return Ok(out);
            };
            after = Some(last.record.id);
            out.extend(page);
        }
    }

    /// At most `limit` dead letters with ids after `after` (all when `None`), oldest first.
    /// Undecodable ones are set aside.
    pub(crate) fn dead_page(&self, after: Option<u64>, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let open = self.handle()?;
        let from = id_key(DEAD, after.map_or(0, |a| a.saturating_add(1)));
        let mut out = Vec::new();
        for item in open.store.range(&from[..]..&[DEAD + 1][..]) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = self.read(&open, item)?;
            match decode::<DeadLetter>("dead", id_of(&k), &v) {
                Ok(d) => out.push(d),
                Err(e) => self.set_aside(&k, &v, &e)?,
            }
        }
        Ok(out)
    }

    /// Put dead letters back in the outbox under their old ids (attempts and rejections reset, last
    /// error kept); `None` = all. Returns how many moved (0 when `id` is not a dead letter). Syncs.
    ///
    /// The old id puts the record back at its place in detection order, ahead of anything queued
    /// after it; later records of its meter that were delivered meanwhile stay delivered.
    pub async fn requeue(&self, id: Option<u64>) -> Result<usize, StoreError> {
        self.off_async(move |o| o.requeue_blocking(id)).await
    }

    /// [`Store::requeue`], blocking.
    fn requeue_blocking(&self, id: Option<u64>) -> Result<usize, StoreError> {
        let mut moved = 0;
        let mut after = None;
        loop {
            // A page at a time: "requeue all" never holds every dead letter in memory.
            let ids: Vec<u64> = match id {
                Some(id) if after.is_none() => vec![id],
                Some(_) => Vec::new(),
                None => self.dead_page(after, 256)?.iter().map(|d| d.record.id).collect(),
            };
            let Some(&last) = ids.last() else { break };
            after = Some(last);
            for id in ids {
                if self.requeue_one(id)? {
                    moved += 1;
                }
            }
        }
        self.sync_blocking()?;
        Ok(moved)
    }

    fn requeue_one(&self, id: u64) -> Result<bool, StoreError> {
        let mut bad = None;
        let requeued = self.write(|open, batch, stored| {
            let key = id_key(DEAD, id);
            // Not a dead letter (any more: another requeue was quicker).
            let Some(v) = self.get(open, &key)? else {
                return Ok(false);
            };
            let mut record = match decode::<DeadLetter>("dead", id, &v) {
                Ok(d) => d.record,
                Err(e) => {
                    bad = Some((key, v, e));
                    return Ok(false);
                }
            };
            record.attempts = 0;
            record.rejections = 0;
            let v = stored_record::encode(&record);
            stored.records += 1;
            stored.bytes += v.len() as u64;
            stored.top = stored.top.max(id.saturating_add(1));
            batch.remove(&key[..]);
            batch.insert(&id_key(QUEUE, id)[..], v);
            Ok(true)
        })?;
        if let Some((key, v, e)) = bad {
            self.set_aside(&key, &v, &e)?;
        }
        if requeued {
            self.shared.counts.dead.fetch_sub(1, Ordering::Relaxed);
            // The sender sees ids below the durable mark only; the sync after this brings the mark past
            // this id even if the queue held nothing newer since the store was opened.
            self.shared
                .counts
                .committed
                .fetch_max(id.saturating_add(1), Ordering::SeqCst);
        }
        Ok(requeued)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;
    use crate::store::testing::*;

    #[tokio::test]
    async fn failures_count_and_dead_letters_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let o = Store::open(dir.path(), BIG).unwrap();
        let id = o.commit("M1", &state(1), vec![draft("开")]).unwrap()[0].id;
        let r = o.note_failure(&[id], "事件【开】不存在").unwrap();
        assert_eq!(r[0].attempts, 1);
        o.bury(id, "事件【开】不存在", "t").await.unwrap();
        assert_eq!(o.len(), 0);
        assert_eq!(o.dead().unwrap()[0].record.id, id);
        assert_eq!(o.requeue(None).await.unwrap(), 1);
        assert_eq!(o.list(10).unwrap()[0].id, id);
        assert!(o.dead().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_dead_letter_requeued_after_a_reopen_with_an_empty_queue_is_sent() {
        // Found by the model test: the durable mark came from the queue alone, so a record requeued
        // into an empty queue after a restart stayed invisible to the sender.
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let o = Store::open(dir.path(), BIG).unwrap();
            let id = o.commit("M1", &state(1), vec![draft("开")]).unwrap()[0].id;
            o.bury(id, "x", "t").await.unwrap();
            id
        };
        let o = Store::open(dir.path(), BIG).unwrap();
        assert_eq!(o.requeue(None).await.unwrap(), 1);
        assert_eq!(
            o.next_batch(10).unwrap().iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![id]
        );
    }

    #[tokio::test]
    async fn dead_letters_are_counted_bounded_and_paged() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits { max_dead: 3, ..BIG };
        let o = Store::open(dir.path(), limits).unwrap();
        let mut ids = Vec::new();
        for i in 0..5 {
            ids.push(o.commit(&format!("M{i}"), &state(1), vec![draft("开")]).unwrap()[0].id);
        }
        o.sync().await.unwrap();
        for id in &ids[..3] {
            o.bury(*id, "bad", "t").await.unwrap();
        }
        assert_eq!(o.dead_len(), 3);
        let e = o.bury(ids[3], "bad", "t").await.unwrap_err();
        assert!(matches!(e, StoreError::DeadFull { dead: 3 }), "{e}");
        assert_eq!((o.len(), o.dead_refused()), (2, 1), "the refused record stays queued");
        let first: Vec<u64> = o.dead_page(None, 2).unwrap().iter().map(|d| d.record.id).collect();
        assert_eq!(first, ids[..2]);
        let rest: Vec<u64> = o
            .dead_page(Some(ids[1]), 2)
            .unwrap()
            .iter()
            .map(|d| d.record.id)
            .collect();
        assert_eq!(rest, ids[2..3]);
        drop(o);
        let o = Store::open(dir.path(), limits).unwrap();
        assert_eq!(o.dead_len(), 3, "counted at open");
        assert_eq!(o.requeue(None).await.unwrap(), 3);
        assert_eq!((o.dead_len(), o.len()), (0, 5));
        o.bury(ids[3], "bad", "t").await.unwrap();
        assert_eq!(o.dead_len(), 1);
    }
}

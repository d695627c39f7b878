//! Entries set aside: a state, record or dead letter that does not decode is moved, bytes unchanged,
//! to `x` + its key (one batch, counts mended), logged once, counted, and listed for an operator
//! ([`Store::corrupt`], `fieldgate outbox corrupt`), so that the rest of the queue and the other
//! meters go on. A record that is not in the stored form of [`super::stored_record`] is such an entry.
//!
//! Never deletes or repairs an entry and never puts it back: what is set aside stays as it was.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::queue::decode_record;
use super::{
    decode, describe_key, id_key, id_of, state_key, DeadLetter, Store, StoreError, StoredState, ASIDE, DEAD, QUEUE,
    STATE,
};

/// An entry that could not be decoded and was set aside (kept as it was, for an operator).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorruptEntry {
    /// What it was: `record 42`, `dead letter 42` or `state M1`.
    pub entry: String,
    /// Its size in bytes.
    pub(crate) bytes: usize,
    /// Why it does not decode.
    pub(crate) error: String,
    /// Its first bytes, as text where they are text.
    pub(crate) preview: String,
}

/// Which entry [`Store::damage`] overwrites.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub enum DamageTarget<'a> {
    /// A queued record.
    Record(u64),
    /// A meter's state.
    State(&'a str),
}

impl Store {
    /// Number of entries set aside as undecodable.
    pub(crate) fn corrupt_len(&self) -> u64 {
        self.shared.counts.corrupt.load(Ordering::Relaxed)
    }

    /// Move an undecodable entry aside (one batch: kept under `x` + its key, removed from where it
    /// was, the counts mended), unless it changed meanwhile. Logged once per entry.
    pub(super) fn set_aside(&self, key: &[u8], value: &[u8], why: &StoreError) -> Result<(), StoreError> {
        let moved = self.write(|open, batch, stored| {
            if self.get(open, key)?.as_deref() != Some(value) {
                return Ok(false);
            }
            batch.remove(key);
            let mut aside = Vec::with_capacity(1 + key.len());
            aside.push(ASIDE);
            aside.extend_from_slice(key);
            batch.insert(aside, value);
            if key.first() == Some(&QUEUE) {
                stored.records = stored.records.saturating_sub(1);
                stored.bytes = stored.bytes.saturating_sub(value.len() as u64);
            }
            Ok(true)
        })?;
        if moved {
            let c = &self.shared.counts;
            c.corrupt.fetch_add(1, Ordering::Relaxed);
            if key.first() == Some(&DEAD) {
                c.dead.fetch_sub(1, Ordering::Relaxed);
            }
            tracing::error!(
                message = "An entry of the state database cannot be read; it is set aside (kept, see `fieldgate outbox corrupt`) and the rest goes on.",
                entry = %describe_key(key),
                bytes = value.len(),
                error = %why
            );
        }
        Ok(())
    }

    /// Entries set aside as undecodable, at most `limit`.
    pub fn corrupt(&self, limit: usize) -> Result<Vec<CorruptEntry>, StoreError> {
        let open = self.handle()?;
        let mut out = Vec::new();
        for item in open.store.scan_prefix([ASIDE]).take(limit) {
            let (k, v) = self.read(&open, item)?;
            let key = k.get(1..).unwrap_or_default();
            let error = match key.first() {
                Some(&QUEUE) => decode_record(id_of(key), &v).err(),
                Some(&DEAD) => decode::<DeadLetter>("dead", id_of(key), &v).err(),
                Some(&STATE) => decode::<StoredState>("state", "", &v).err(),
                _ => None,
            };
            let text = String::from_utf8_lossy(&v);
            out.push(CorruptEntry {
                entry: describe_key(key),
                bytes: v.len(),
                error: error.map_or_else(|| "decodes now (kept as it was)".into(), |e| e.to_string()),
                preview: text.chars().take(120).collect(),
            });
        }
        Ok(out)
    }

    /// Write raw bytes under a queued record's or a state's key, bypassing every check: for tests
    /// that damage an entry as a failing disk would.
    #[doc(hidden)]
    pub fn damage(&self, entry: DamageTarget<'_>, bytes: &[u8]) -> Result<(), StoreError> {
        let key = match entry {
            DamageTarget::Record(id) => id_key(QUEUE, id).to_vec(),
            DamageTarget::State(meter_no) => state_key(meter_no),
        };
        let open = self.handle()?;
        open.store.insert(key, bytes).map_err(|e| self.db_error(&open, e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::*;

    #[tokio::test]
    async fn a_corrupt_record_is_set_aside_and_the_queue_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let o = Store::open(dir.path(), BIG).unwrap();
        let a = o.commit("M1", &state(1), vec![draft("开")]).unwrap()[0].id;
        let b = o.commit("M2", &state(1), vec![draft("开")]).unwrap()[0].id;
        let c = o.commit("M3", &state(1), vec![draft("开")]).unwrap()[0].id;
        o.sync().await.unwrap();
        o.damage(DamageTarget::Record(b), b"\x01garbage").unwrap();
        let batch: Vec<u64> = o.next_batch(10).unwrap().iter().map(|r| r.id).collect();
        assert_eq!(batch, vec![a, c], "the bad record blocks nothing");
        assert_eq!((o.len(), o.corrupt_len()), (2, 1));
        let aside = o.corrupt(10).unwrap();
        assert_eq!(aside.len(), 1);
        assert_eq!(aside[0].entry, format!("record {b}"));
        assert_eq!(aside[0].bytes, 8);
        assert!(!aside[0].error.is_empty());
        o.ack(&[a, c]).await.unwrap();
        drop(o);
        let o = Store::open(dir.path(), BIG).unwrap();
        assert_eq!(
            (o.len(), o.corrupt_len()),
            (0, 1),
            "kept across a reopen, out of the queue"
        );
        assert_eq!(o.corrupt(10).unwrap()[0].entry, format!("record {b}"));
    }

    #[tokio::test]
    async fn a_corrupt_state_is_set_aside_and_the_meter_starts_from_a_baseline() {
        let dir = tempfile::tempdir().unwrap();
        let o = Store::open(dir.path(), BIG).unwrap();
        o.commit("M1", &state(1), vec![]).unwrap();
        o.commit("M2", &state(0), vec![]).unwrap();
        o.damage(DamageTarget::State("M1"), b"{\"raw\":").unwrap();
        assert_eq!(o.state("M1").unwrap(), None, "no state: the next sample is a baseline");
        assert_eq!(o.state("M2").unwrap(), Some(state(0)));
        assert_eq!(o.corrupt_len(), 1);
        assert_eq!(o.corrupt(10).unwrap()[0].entry, "state M1");
        assert_eq!(o.corrupt(10).unwrap()[0].preview, "{\"raw\":");
        o.commit("M1", &state(1), vec![]).unwrap();
        assert_eq!(o.state("M1").unwrap(), Some(state(1)), "the meter is stored again");
    }

    #[tokio::test]
    async fn a_record_in_json_is_not_a_stored_record_and_is_set_aside() {
        // Records are read only in their stored form: a JSON record (what a pre-release wrote) under a
        // queue key takes the path of any undecodable entry.
        let dir = tempfile::tempdir().unwrap();
        let o = Store::open(dir.path(), BIG).unwrap();
        let a = o.commit("M1", &state(1), vec![draft("开")]).unwrap()[0].id;
        let b = o.commit("M2", &state(1), vec![draft("开")]).unwrap()[0].id;
        o.sync().await.unwrap();
        let json = serde_json::to_vec(&raw_record(b)).unwrap();
        o.damage(DamageTarget::Record(b), &json).unwrap();
        let batch: Vec<u64> = o.next_batch(10).unwrap().iter().map(|r| r.id).collect();
        assert_eq!(batch, vec![a], "the JSON record is not sent and blocks nothing");
        assert_eq!((o.len(), o.corrupt_len()), (1, 1));
        let mut aside = vec![ASIDE];
        aside.extend_from_slice(&id_key(QUEUE, b));
        let open = o.handle().unwrap();
        assert_eq!(
            open.store.get(&aside).unwrap().as_deref(),
            Some(&json[..]),
            "kept unchanged"
        );
        assert_eq!(open.store.get(id_key(QUEUE, b)).unwrap(), None, "out of the queue");
        drop(open);
        let listed = o.corrupt(10).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].entry, format!("record {b}"));
        assert_eq!(listed[0].bytes, json.len());
        assert!(listed[0].preview.starts_with("{\"id\":"), "{:?}", listed[0].preview);
        assert!(!listed[0].error.is_empty());
        assert_eq!(o.list(10).unwrap().iter().map(|r| r.id).collect::<Vec<_>>(), vec![a]);
    }
}

//! Opening the store: the database and its lock, the counts found on disk (the id watermark, the
//! queue's counts, dead letters and entries set aside), and the sync that makes everything found
//! durable before anything is handed out.
//!
//! The queue's counts are read from `m` + `outbox_counts`. If a record sits at or past the stored top
//! (written by something that does not keep the counts), or no counts are stored, the queue is counted
//! once here; an empty queue resets them. Dead letters and set-aside entries are counted here (they
//! are bounded) and kept in memory.
//!
//! Never wipes or moves aside anything it cannot open: a damaged database is reported and kept for
//! an operator.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use super::durable::Synced;
use super::fault::Fault;
use super::space::Space;
use super::{id_key, id_of, Counts, Open, Shared, Store, StoreError, Stored, ASIDE, COUNTS_KEY, DEAD, QUEUE, STORE};
use crate::config::Limits;

/// What [`open_store`] found.
pub(super) struct Opened {
    open: Open,
    stored: Stored,
    /// One past the highest id on disk.
    top: u64,
    dead: u64,
    corrupt: u64,
}

impl Store {
    /// Open (or create) the store in `dir`. Everything found on disk is made durable before this
    /// returns.
    pub fn open(dir: &Path, limits: Limits) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Sync {
            path: dir.to_path_buf(),
            source: e,
        })?;
        let opened = open_store(dir)?;
        let outbox = Store::unopened(dir, limits, opened.stored);
        outbox.install(opened, 0);
        Ok(outbox)
    }

    /// [`Store::open`] for the daemon: a store that cannot be opened for a reason of the disk (full,
    /// I/O error, read-only, sled refusing or panicking on what it found) is returned failed, and
    /// [`Store::heal`] opens it once the cause is gone, so the gateway starts and polls anyway (a
    /// power cut while the disk is full must not leave it in a restart loop). Only
    /// [`StoreError::Locked`] (another instance) is an error.
    pub(crate) fn open_or_failed(dir: &Path, limits: Limits) -> Result<Store, StoreError> {
        let opened = std::panic::catch_unwind(|| {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Sync {
                path: dir.to_path_buf(),
                source: e,
            })?;
            open_store(dir)
        });
        let error = match opened {
            Ok(Err(e @ StoreError::Locked(_))) => return Err(e),
            Ok(Ok(opened)) => {
                let outbox = Store::unopened(dir, limits, opened.stored);
                outbox.install(opened, 0);
                return Ok(outbox);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "sled panicked while opening the database".to_string(),
        };
        let outbox = Store::unopened(dir, limits, Stored::default());
        outbox.shared.fault.fail(dir, &error);
        Ok(outbox)
    }

    /// The handle before a database is installed.
    fn unopened(dir: &Path, limits: Limits, stored: Stored) -> Store {
        Store {
            shared: Arc::new(Shared {
                dir: dir.to_path_buf(),
                limits,
                counts: Counts::default(),
                open: RwLock::new(None),
                writer: Mutex::new(stored),
                fault: Fault::default(),
                space: Space::new(limits.min_free),
                generation: AtomicU64::new(0),
                checked: Mutex::new(None),
                head: Mutex::new(None),
            }),
        }
    }

    /// Put a freshly opened database in place as `generation` and take its counts.
    pub(super) fn install(&self, mut o: Opened, generation: u64) {
        o.open.generation = generation;
        let c = &self.shared.counts;
        c.records.store(o.stored.records, Ordering::Relaxed);
        c.bytes.store(o.stored.bytes, Ordering::Relaxed);
        c.committed.store(o.top, Ordering::SeqCst);
        c.durable.store(o.top, Ordering::SeqCst);
        c.dead.store(o.dead, Ordering::Relaxed);
        c.corrupt.store(o.corrupt, Ordering::Relaxed);
        c.refusing.store(false, Ordering::Relaxed);
        *self.shared.writer.lock().unwrap_or_else(PoisonError::into_inner) = o.stored;
        *self.shared.open.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(o.open));
    }
}

/// Open the database in `dir`, read or rebuild its counts, and make it durable (module docs) before
/// anything on it is handed out.
/// Trees of the pre-release layout (one tree per kind). No installed gateway has them; a directory
/// that does is refused rather than read as empty, so its queue is never silently left behind.
const PRE_RELEASE_TREES: [&str; 4] = ["state", "outbox", "dead", "meta"];

fn refuse_pre_release(dir: &Path, db: &sled::Db) -> Result<(), StoreError> {
    let names = db.tree_names();
    let mut found = Vec::new();
    for name in PRE_RELEASE_TREES {
        if names.iter().any(|n| n == name.as_bytes()) && !db.open_tree(name).map_err(|e| open_error(dir, e))?.is_empty()
        {
            found.push(name);
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    Err(StoreError::PreRelease {
        path: dir.to_path_buf(),
        trees: found.join(", "),
    })
}

pub(super) fn open_store(dir: &Path) -> Result<Opened, StoreError> {
    let db = open_db(dir)?;
    refuse_pre_release(dir, &db)?;
    let store = db.open_tree(STORE).map_err(|e| open_error(dir, e))?;
    // Whatever is on disk at open is durable once the sync below is done, dead letters included
    // (they may be requeued): every id sled ever gave out is below the next one it gives (its ids
    // are monotonic across restarts). Not the last key of the queue: any backward walk in sled
    // (`last`, `next_back`) links its 1 MiB `MAX_KEY` constant into the binary.
    let mut top = db.generate_id().map_err(|e| open_error(dir, e))?;
    // Ids written by other means (tests, tools) are covered too; and the dead letters are counted
    // (they are bounded by max_dead).
    let mut dead = 0u64;
    for k in store.scan_prefix([DEAD]).keys() {
        top = top.max(id_of(&k.map_err(|e| open_error(dir, e))?).saturating_add(1));
        dead += 1;
    }
    let mut corrupt = 0u64;
    for k in store.scan_prefix([ASIDE]).keys() {
        k.map_err(|e| open_error(dir, e))?;
        corrupt += 1;
    }
    let stored = store
        .get(COUNTS_KEY)
        .map_err(|e| open_error(dir, e))?
        .and_then(|v| Stored::parse(&v));
    let first = |from: [u8; 9]| {
        store
            .range(&from[..]..&[QUEUE + 1][..])
            .next()
            .transpose()
            .map(|item| item.is_none())
            .map_err(|e| open_error(dir, e))
    };
    let (records, bytes, counted) = match stored {
        // An empty queue needs no count (this also mends counts left wrong by other means).
        _ if first(id_key(QUEUE, 0))? => (0, 0, false),
        // No record at or past the stored top: nobody but us wrote to the queue since.
        Some(c) if first(id_key(QUEUE, c.top))? => (c.records, c.bytes, false),
        // No counts yet, or records written by something that does not keep them: read the whole
        // queue, once.
        _ => {
            let (mut n, mut b) = (0u64, 0u64);
            for item in store.scan_prefix([QUEUE]) {
                let (k, v) = item.map_err(|e| open_error(dir, e))?;
                top = top.max(id_of(&k).saturating_add(1));
                n += 1;
                b += v.len() as u64;
            }
            tracing::info!(message = "Outbox counted.", records = n, bytes = b);
            (n, b, true)
        }
    };
    let keep = Stored {
        records,
        bytes,
        top: stored.map_or(top, |c| c.top.max(top)),
    };
    if stored != Some(keep) {
        store
            .insert(COUNTS_KEY, &keep.to_bytes())
            .map_err(|e| open_error(dir, e))?;
    }
    if counted {
        // The count read every page of the queue into sled's cache, which does not give them back
        // (1,000,000 records: ~50 MiB held for the whole drain). Open again to start from an empty
        // cache; the second open finds the counts just written.
        db.flush().map_err(|e| open_error(dir, e))?;
        drop((store, db));
        return open_store(dir);
    }
    // Open syncs first: what sled recovered may sit only in the page cache (a crash before its
    // fsync); it is on disk before the sender may deliver it.
    db.flush().map_err(|e| open_error(dir, e))?;
    let synced = Synced::default();
    synced.sync(dir)?;
    Ok(Opened {
        open: Open {
            db,
            store,
            synced,
            generation: 0,
        },
        stored: keep,
        top,
        dead,
        corrupt,
    })
}

/// How long [`Store::open`] waits for a lock to be released. sled releases its file lock only when its
/// background flusher has let go of the last handle, which can lag a moment behind the drop of our own
/// previous handle (a restart in the same process, a test reopening). A real second instance still
/// holds it after this and gets [`StoreError::Locked`].
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// sled's page cache of the outbox database, in bytes.
pub const CACHE_CAPACITY: u64 = 16 * 1024 * 1024;

fn open_db(dir: &Path) -> Result<sled::Db, StoreError> {
    let start = std::time::Instant::now();
    loop {
        let opened = sled::Config::new().path(dir).cache_capacity(CACHE_CAPACITY).open();
        match opened.map_err(|e| open_error(dir, e)) {
            Err(StoreError::Locked(_)) if start.elapsed() < LOCK_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

fn open_error(dir: &Path, e: sled::Error) -> StoreError {
    let text = e.to_string();
    if text.contains("lock") || text.contains("WouldBlock") || text.contains("temporarily unavailable") {
        StoreError::Locked(dir.to_path_buf())
    } else {
        StoreError::Db {
            path: dir.to_path_buf(),
            source: e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::stored_record;
    use crate::store::testing::*;

    /// Write records straight into the queue in their stored form, as something that does not keep
    /// the counts would.
    fn write_raw(dir: &Path, ids: &[u64]) {
        let db = open_db(dir).unwrap();
        let store = db.open_tree(STORE).unwrap();
        for id in ids {
            store
                .insert(id_key(QUEUE, *id), stored_record::encode(&raw_record(*id)))
                .unwrap();
        }
        db.flush().unwrap();
    }

    #[tokio::test]
    async fn counts_are_stored_with_the_records_and_read_back_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (len, bytes) = {
            let o = Store::open(dir.path(), BIG).unwrap();
            assert_eq!(stored(&o), Some(Stored::default()), "a new store writes zero counts");
            let ids: Vec<u64> = (0..5)
                .map(|i| o.commit("M1", &state(i), vec![draft("开")]).unwrap()[0].id)
                .collect();
            o.note_failure(&ids[..2], "timeout").unwrap();
            o.bury(ids[2], "refused", "t").await.unwrap();
            o.ack(&ids[3..4]).await.unwrap();
            let s = stored(&o).unwrap();
            assert_eq!((s.records, s.bytes, s.top), (o.len(), o.bytes(), ids[4] + 1));
            (o.len(), o.bytes())
        };
        let o = Store::open(dir.path(), BIG).unwrap();
        assert_eq!((o.len(), o.bytes()), (len, bytes));
        assert_eq!(o.requeue(None).await.unwrap(), 1);
        assert_eq!(o.len(), 4);
        let s = stored(&o).unwrap();
        assert_eq!((s.records, s.bytes), (o.len(), o.bytes()));
    }

    #[tokio::test]
    async fn a_queue_written_without_stored_counts_is_counted_once_at_open() {
        let dir = tempfile::tempdir().unwrap();
        // A queue without stored counts.
        write_raw(dir.path(), &[3, 5, 9]);
        let bytes = {
            let o = Store::open(dir.path(), BIG).unwrap();
            assert_eq!(o.len(), 3);
            assert_eq!(stored(&o).map(|s| (s.records, s.bytes)), Some((3, o.bytes())));
            assert!(
                stored(&o).is_some_and(|s| s.top >= 10),
                "one past the highest id at least"
            );
            assert_eq!(
                o.next_batch(10).unwrap().len(),
                3,
                "what was on disk at open is durable"
            );
            o.bytes()
        };
        // Opened again: the stored counts, no second count.
        let o = Store::open(dir.path(), BIG).unwrap();
        assert_eq!((o.len(), o.bytes()), (3, bytes));
        let top = stored(&o).map_or(0, |s| s.top);
        drop(o);
        // Something that does not keep the counts adds records: their ids are past the stored top.
        write_raw(dir.path(), &[top, top + 1]);
        let o = Store::open(dir.path(), BIG).unwrap();
        assert_eq!(o.len(), 5);
        assert!(o.bytes() > bytes);
        let ids: Vec<u64> = o.list(10).unwrap().iter().map(|r| r.id).collect();
        o.ack(&ids).await.unwrap();
        assert_eq!((o.len(), o.bytes()), (0, 0));
    }

    #[tokio::test]
    async fn stored_counts_left_wrong_by_another_version_mend_when_the_queue_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let o = Store::open(dir.path(), BIG).unwrap();
            o.commit("M1", &state(1), vec![draft("开")]).unwrap()[0].id
        };
        // Something that does not keep the counts removes the record.
        {
            let db = open_db(dir.path()).unwrap();
            db.open_tree(STORE).unwrap().remove(id_key(QUEUE, id)).unwrap();
            db.flush().unwrap();
        }
        let o = Store::open(dir.path(), BIG).unwrap();
        assert_eq!((o.len(), o.bytes()), (0, 0));
        assert_eq!(stored(&o).map(|s| (s.records, s.bytes)), Some((0, 0)));
    }

    #[tokio::test]
    async fn records_written_past_the_stored_top_by_other_means_are_counted_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let top = {
            let o = Store::open(dir.path(), BIG).unwrap();
            o.commit("M1", &state(1), vec![draft("开")]).unwrap();
            o.sync().await.unwrap();
            stored(&o).unwrap().top
        };
        {
            let db = open_db(dir.path()).unwrap();
            let store = db.open_tree(STORE).unwrap();
            store
                .insert(id_key(QUEUE, top + 5), stored_record::encode(&raw_record(top + 5)))
                .unwrap();
            db.flush().unwrap();
        }
        let o = Store::open(dir.path(), BIG).unwrap();
        assert_eq!(o.len(), 2);
        assert_eq!(stored(&o).map(|s| (s.records, s.top >= top + 6)), Some((2, true)));
    }

    #[tokio::test]
    async fn ids_go_on_after_a_reopen_past_the_highest_in_the_queue_or_the_dead_letters() {
        let dir = tempfile::tempdir().unwrap();
        let reopen_and_commit = || async {
            let o = Store::open(dir.path(), BIG).unwrap();
            let id = o.commit("M1", &state(1), vec![draft("开")]).unwrap()[0].id;
            o.sync().await.unwrap();
            (o, id)
        };
        // More than 256 ids, so the order of the big-endian keys matters.
        let o = Store::open(dir.path(), BIG).unwrap();
        let mut ids = Vec::new();
        for _ in 0..300 {
            ids.push(o.commit("M1", &state(1), vec![draft("开")]).unwrap()[0].id);
        }
        o.sync().await.unwrap();
        let top = *ids.iter().max().unwrap();
        // The highest only in the dead letters.
        o.bury(top, "x", "t").await.unwrap();
        drop(o);
        let (o, next) = reopen_and_commit().await;
        assert!(next > top, "{next} after {top}");
        // The highest only in the queue, a lower one dead.
        o.bury(ids[0], "x", "t").await.unwrap();
        drop(o);
        let (o, after) = reopen_and_commit().await;
        assert!(after > next, "{after} after {next}");
        // Nothing queued: the dead letters alone.
        let queued: Vec<u64> = o.list(1000).unwrap().iter().map(|r| r.id).collect();
        o.ack(&queued).await.unwrap();
        drop(o);
        let (_, last) = reopen_and_commit().await;
        assert!(last > after, "{last} after {after}");
    }

    #[test]
    fn the_open_makes_what_it_found_durable_first() {
        let dir = tempfile::tempdir().unwrap();
        let o = Store::open(dir.path(), BIG).unwrap();
        assert!(
            o.handle().unwrap().synced.fsyncs() >= 2,
            "the log and the folder were fsynced at open"
        );
    }

    #[test]
    fn a_second_open_says_the_directory_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path(), BIG).unwrap();
        let err = Store::open(dir.path(), BIG).err().unwrap();
        assert!(matches!(err, StoreError::Locked(_)), "{err}");
    }

    #[test]
    fn a_directory_of_the_pre_release_layout_is_refused_and_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = open_db(dir.path()).unwrap();
            db.open_tree("outbox")
                .unwrap()
                .insert(7u64.to_be_bytes(), &b"{\"id\":7}"[..])
                .unwrap();
            db.open_tree("state").unwrap();
            db.flush().unwrap();
        }
        let err = Store::open(dir.path(), BIG).err().unwrap();
        assert!(
            matches!(&err, StoreError::PreRelease { trees, .. } if trees == "outbox"),
            "only the tree that holds entries is named: {err}"
        );
        // The daemon starts with the store failed (polling, health critical with the reason) and the
        // old queue untouched.
        let o = Store::open_or_failed(dir.path(), BIG).unwrap();
        assert!(o.fault().is_some_and(|f| f.error.contains("pre-release")));
        drop(o);
        let db = open_db(dir.path()).unwrap();
        assert_eq!(db.open_tree("outbox").unwrap().len(), 1);
        assert!(db.open_tree(STORE).unwrap().is_empty());
    }
}

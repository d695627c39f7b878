//! The durable store (sled 0.34.7): last accepted valve states and the outbox of records waiting for
//! delivery.
//!
//! Layout, one sled database in `site.state_dir` with ONE tree, `store`, whose keys start with a byte
//! that says what the value is:
//! - `s` + meter number (UTF-8) → [`StoredState`] (JSON): valve state, link and rule memory.
//! - `q` + record id (big-endian u64, so iteration order is detection order) → [`Record`] in its
//!   stored form ([`crate::store::stored_record`]; the JSON of releases before still reads): the outbox.
//! - `d` + record id → [`DeadLetter`] (JSON): records the server refused too often.
//! - `x` + the key of any entry above → its bytes, unchanged: an entry that could not be decoded,
//!   set aside ([`Store::corrupt`]) so that the rest of the queue and the other meters go on.
//! - `m` + `outbox_counts` → records queued, their bytes, and one past the highest record id ever
//!   committed (three big-endian u64). Written with every change of the queue, so opening the store
//!   never has to read the whole queue to count it. If a record sits at or past the stored top
//!   (written by something that does not keep the counts), the queue is counted once at open; an
//!   empty queue resets them. Dead letters and set-aside entries are counted at open (they are
//!   bounded) and kept in memory.
//!
//! Why one tree: a `sled::Batch` applied to one tree is atomic, across a crash too, and costs what its
//! inserts cost. Every change of the store goes through [`Store::write`]: one lock held while the
//! change reads what it needs and its batch is applied. That serialises writers (an ack racing a
//! failure note cannot bring a delivered record back) and keeps the stored counts exact.
//!
//! A state directory of the layout before (trees `state`, `outbox`, `dead` and `meta`) is moved into
//! `store` at open: copied in bounded batches, made durable, then the old trees dropped, and the queue
//! counted once. A crash in the middle copies again at the next open (same keys, same values).
//!
//! Faults of the disk ([`fault`], [`space`]):
//! - Below `min_free` bytes free on the state directory's file system, [`Store::commit_batch`]
//!   refuses every change ([`StoreError::NoSpace`]) exactly as when the outbox is full; what empties
//!   the queue still writes (it uses the reserve).
//! - The first sled error or failed fsync marks the store failed: sled stays failed after one failed
//!   write, and after a failed fsync the page cache cannot be trusted. From then on every call
//!   returns [`StoreError::Failed`] without touching the database until [`Store::heal`] has opened
//!   it again (with backoff). A reopen bumps [`Store::generation`]: whoever keeps what the store
//!   held (the station's states) reads it again, because what sat in sled's failed buffer is gone.
//! - Every open (the first and each reopen) makes the whole database durable before anything found
//!   on it is handed to the sender: a record that only the page cache held could otherwise be
//!   delivered, then lost in a power cut with its state, detected again and delivered twice.
//!
//! Invariants:
//! - A meter's new state (valve, link, rule memory) and its records are committed in one atomic batch
//!   ([`Store::commit`]). If a crash loses the commit, it loses the state with it, and the
//!   transition is detected again: nothing is repeated, nothing forgotten.
//! - "Stored" means committed *and* [`Store::sync`]ed: sled's `flush()` is followed by `fsync` of the
//!   database's log and of every other file and folder of it that changed ([`crate::store::durable`]).
//!   The sender sees only records below the durable mark.
//! - A record is removed only by [`Store::ack`] (the server answered `code: 0`), or moved between
//!   outbox and dead letters by [`Store::bury`] / [`Store::requeue`] (each one batch, keeping the
//!   record's id), or set aside undecodable (kept, listed). Nothing here ever drops a record to make
//!   room: when a bound is reached, the write is refused and the caller keeps what it had.
//! - Dead letters do not count against the outbox bounds; they have their own, `max_dead`: at it,
//!   [`Store::bury`] refuses ([`StoreError::DeadFull`]) and the record stays queued.

pub mod durable;
pub mod fault;
pub mod space;
pub mod stored_record;

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::clock::BootStamp;
use crate::config::Limits;
use crate::events::detect::RuleMemory;
use crate::events::record::{json_str, Draft, Record};
use crate::store::durable::{SyncFailed, Synced};
use fault::{Fault, StoreFault};
use space::{LowSpace, Space};

/// What is persisted about one meter: the last accepted state of its valve, its link, and the
/// memory of every `[[event]]` rule for it. Committed together with the records it produced.
///
/// Format (JSON): `{"raw", "label", "since"}` as before, plus optional keys that older state
/// directories do not have and that load as their defaults: `valve_unknown`, `offline_since`,
/// `back_since`, `rules`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredState {
    /// Raw value read.
    pub raw: i64,
    /// Its label.
    pub label: String,
    /// When it was accepted (RFC 3339).
    pub since: String,
    /// True while the valve was never read: the entry exists only to keep link memory (the meter was
    /// offline from the start); `raw`, `label` and `since` are placeholders and the first sample
    /// is the valve's baseline.
    #[serde(default, skip_serializing_if = "is_false")]
    pub valve_unknown: bool,
    /// Since when the meter counts as offline (after `offline_after` failed reads); `None` = online.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_since: Option<DateTime<Utc>>,
    /// When the meter answered again after an outage that `在线` rules report; `None` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub back_since: Option<DateTime<Utc>>,
    /// `offline_since` on the boot clock: what a `for` is measured with (the wall-clock time above is
    /// a label and the stretch's identity only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_boot: Option<BootStamp>,
    /// `back_since` on the boot clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub back_boot: Option<BootStamp>,
    /// Memory of each event rule, by [`crate::config::EventRule::key`]. Rules no longer configured
    /// are dropped on the next write.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rules: BTreeMap<String, RuleMemory>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

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

/// An entry that could not be decoded and was set aside (kept as it was, for an operator).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorruptEntry {
    /// What it was: `record 42`, `dead letter 42` or `state M1`.
    pub entry: String,
    /// Its size in bytes.
    pub bytes: usize,
    /// Why it does not decode.
    pub error: String,
    /// Its first bytes, as text where they are text.
    pub preview: String,
}

/// What can go wrong with the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process has the database open.
    #[error("the state directory {0} is in use by another fieldgate process (sled allows one); stop it, or use its admin API")]
    Locked(PathBuf),
    /// The database could not be opened or written.
    #[error("state database {path}: {source}")]
    Db {
        /// The state directory.
        path: PathBuf,
        /// sled's error.
        source: sled::Error,
    },
    /// fsync failed: the data may not be on disk.
    #[error("cannot sync {path} to disk: {source}")]
    Sync {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The store failed earlier and has not been opened again yet: nothing was read or written.
    #[error("the state database failed ({error}) and is not open again yet; nothing was written")]
    Failed {
        /// The error that failed it.
        error: String,
    },
    /// A stored value could not be read back.
    #[error("corrupt entry in tree {tree}: {detail}")]
    Corrupt {
        /// The tree.
        tree: &'static str,
        /// What failed.
        detail: String,
    },
    /// The bounds are reached; nothing was committed.
    #[error("outbox full: {records} records, {bytes} bytes (limits {max_records} records, {max_bytes} bytes)")]
    Full {
        /// Records queued.
        records: u64,
        /// Bytes queued.
        bytes: u64,
        /// Limit.
        max_records: u64,
        /// Limit.
        max_bytes: u64,
    },
    /// Free space below `min_free`; nothing was committed.
    #[error("disk almost full: {} bytes free, outbox.min_free is {} bytes", .0.free, .0.reserve)]
    NoSpace(LowSpace),
    /// `max_dead` dead letters already: the record stays queued.
    #[error("{dead} dead letters, the bound outbox.max_dead; the record stays queued")]
    DeadFull {
        /// Dead letters kept.
        dead: u64,
    },
}

impl From<SyncFailed> for StoreError {
    fn from(e: SyncFailed) -> StoreError {
        StoreError::Sync {
            path: e.path,
            source: e.source,
        }
    }
}

impl StoreError {
    /// A bounded label for metrics.
    pub fn error_code(&self) -> &'static str {
        match self {
            StoreError::Locked(_) => "locked",
            StoreError::Db { .. } => "db",
            StoreError::Sync { .. } => "sync",
            StoreError::Failed { .. } => "store_failed",
            StoreError::Corrupt { .. } => "corrupt",
            StoreError::Full { .. } => "full",
            StoreError::NoSpace(_) => "no_space",
            StoreError::DeadFull { .. } => "dead_full",
        }
    }

    /// A refusal for lack of room (outbox bound or disk reserve): nothing was written, the caller
    /// keeps what it had and tries again later.
    pub fn is_no_room(&self) -> bool {
        matches!(self, StoreError::Full { .. } | StoreError::NoSpace(_))
    }
}

/// Counters of the outbox (shared by clones).
#[derive(Debug, Default)]
struct Counts {
    records: AtomicU64,
    bytes: AtomicU64,
    refused: AtomicU64,
    /// Commits refused for lack of disk space, since open.
    refused_space: AtomicU64,
    /// One past the highest record id committed.
    committed: AtomicU64,
    /// Set when a commit was refused for lack of room; cleared by the next commit that fits or by any
    /// removal. Health reads it: "new states are not being recorded right now".
    refusing: AtomicBool,
    /// One past the highest record id known to be on disk (committed before a completed sync). The sender only
    /// sees records up to here: a record that a crash could still take back is never delivered,
    /// so a lost commit can never turn into a duplicate work order.
    durable: AtomicU64,
    /// Dead letters kept.
    dead: AtomicU64,
    /// Burials refused at `max_dead`, since start.
    dead_refused: AtomicU64,
    /// Entries set aside as undecodable.
    corrupt: AtomicU64,
    /// Entries read by scans since open.
    entries_read: AtomicU64,
}

/// Handle to the store; cheap to clone, all clones share one database.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    limits: Limits,
    counts: Counts,
    /// The open database; `None` only while [`Store::heal`] replaces it.
    open: RwLock<Option<Arc<Open>>>,
    /// The stored counts as last written, locked by every writer: see [`Store::write`].
    writer: Mutex<Stored>,
    fault: Fault,
    space: Space,
    /// Reopens of the database since start.
    generation: AtomicU64,
    /// When [`Store::check_blocking`] last looked.
    checked: Mutex<Option<std::time::Instant>>,
    /// The record at the head of the queue and since when this process has seen it there (tokio's
    /// monotonic clock: tests may pause it).
    head: Mutex<Option<(u64, tokio::time::Instant)>>,
}

/// One opened database.
struct Open {
    db: sled::Db,
    store: sled::Tree,
    synced: Synced,
    /// [`Store::generation`] it was opened as: an error from a handle of an older one (an operation
    /// that began before a reopen) must not fail the database that replaced it.
    generation: u64,
}

/// What [`open_store`] found.
struct Opened {
    open: Open,
    stored: Stored,
    /// One past the highest id on disk.
    top: u64,
    dead: u64,
    corrupt: u64,
}

impl Store {
    /// Open (or create) the store in `dir`; a state directory of the layout before is moved into it.
    /// Everything found on disk is made durable before this returns.
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
    pub fn open_or_failed(dir: &Path, limits: Limits) -> Result<Store, StoreError> {
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
    fn install(&self, mut o: Opened, generation: u64) {
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

    /// If the store failed, open it again once its backoff allows (blocking: call from a blocking
    /// thread, or use [`Store::heal`]). Returns whether the store works now.
    pub fn heal_blocking(&self) -> bool {
        let sh = &self.shared;
        if !sh.fault.is_failed() {
            return true;
        }
        if !sh.fault.reopen_due() {
            return false;
        }
        // No writer may run against a half-replaced store.
        let writer = sh.writer.lock().unwrap_or_else(PoisonError::into_inner);
        // Our handles go first: sled lets go of its file lock only when the last one is dropped.
        *sh.open.write().unwrap_or_else(PoisonError::into_inner) = None;
        // Opening a damaged database can panic inside sled: that is a failed attempt, not our end.
        let opened = std::panic::catch_unwind(|| open_store(&sh.dir));
        drop(writer);
        match opened {
            Ok(Ok(opened)) => {
                let generation = sh.generation.load(Ordering::SeqCst) + 1;
                self.install(opened, generation);
                sh.generation.store(generation, Ordering::SeqCst);
                sh.fault.healed(&sh.dir);
                true
            }
            Ok(Err(e)) => {
                sh.fault.reopen_failed(&sh.dir, &e.to_string());
                false
            }
            Err(_) => {
                sh.fault
                    .reopen_failed(&sh.dir, "sled panicked while opening the database");
                false
            }
        }
    }

    /// [`Store::heal_blocking`] off the async threads.
    pub async fn heal(&self) -> bool {
        if !self.shared.fault.is_failed() {
            return true;
        }
        self.off_async(|o| Ok(o.heal_blocking())).await.unwrap_or(false)
    }

    /// Run `f` with this store on tokio's blocking threads: sled blocks (I/O, locks, fsync) and must
    /// not stall an async worker. A call that panicked is an error like a failed write.
    pub async fn off_async<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let me = self.clone();
        match tokio::task::spawn_blocking(move || f(&me)).await {
            Ok(r) => r,
            Err(e) => Err(StoreError::Sync {
                path: self.shared.dir.clone(),
                source: std::io::Error::other(format!("the store call did not finish: {e}")),
            }),
        }
    }

    /// Whether the store is failed (waiting to be opened again).
    pub fn is_failed(&self) -> bool {
        self.shared.fault.is_failed()
    }

    /// The failure of the store, if it is failed.
    pub fn fault(&self) -> Option<StoreFault> {
        self.shared.fault.view()
    }

    /// (failures, successful reopens) since start.
    pub fn fault_totals(&self) -> (u64, u64) {
        self.shared.fault.totals()
    }

    /// How often the database was opened again after a failure: what a cache of its contents
    /// compares to know it must read them again.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::SeqCst)
    }

    /// Free space below `min_free`, if it is (looked up at most once a second).
    pub fn low_space(&self) -> Option<LowSpace> {
        self.shared.space.low(&self.shared.dir)
    }

    /// Free bytes of the state directory's file system at the last look, and the reserve.
    pub fn space(&self) -> (Option<u64>, u64, bool) {
        let s = &self.shared.space;
        (s.free(), s.reserve(), s.is_low())
    }

    /// The open database, or [`StoreError::Failed`].
    fn handle(&self) -> Result<Arc<Open>, StoreError> {
        let failed = || StoreError::Failed {
            error: self.shared.fault.error().unwrap_or_else(|| "being opened again".into()),
        };
        if self.shared.fault.is_failed() {
            return Err(failed());
        }
        self.shared
            .open
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(failed)
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The last accepted state of a meter. A state that does not decode is set aside (listed by
    /// [`Store::corrupt`]) and the meter starts again from no state: its next sample is a baseline.
    pub fn state(&self, meter_no: &str) -> Result<Option<StoredState>, StoreError> {
        let key = state_key(meter_no);
        let open = self.handle()?;
        let Some(v) = open.store.get(&key).map_err(|e| self.db_error(&open, e))? else {
            return Ok(None);
        };
        match decode("state", meter_no, &v) {
            Ok(st) => Ok(Some(st)),
            Err(e) => {
                self.set_aside(&key, &v, &e)?;
                Ok(None)
            }
        }
    }

    /// Apply one change of the store atomically. `change` reads what it needs (no other writer runs
    /// meanwhile: they all come through here), fills the batch, and changes the counts to match; the
    /// counts go into the same batch when they changed. An `Err` from `change` writes nothing.
    fn write<T>(
        &self,
        change: impl FnOnce(&Open, &mut sled::Batch, &mut Stored) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut stored = self.shared.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let open = self.handle()?;
        let mut next = *stored;
        let mut batch = sled::Batch::default();
        let out = change(&open, &mut batch, &mut next)?;
        if next != *stored {
            batch.insert(COUNTS_KEY, &next.to_bytes()[..]);
        }
        open.store.apply_batch(batch).map_err(|e| self.db_error(&open, e))?;
        *stored = next;
        self.shared.counts.records.store(next.records, Ordering::Relaxed);
        self.shared.counts.bytes.store(next.bytes, Ordering::Relaxed);
        Ok(out)
    }

    /// One entry of a scan, counted ([`Store::entries_read`]).
    fn read(
        &self,
        open: &Open,
        item: sled::Result<(sled::IVec, sled::IVec)>,
    ) -> Result<(sled::IVec, sled::IVec), StoreError> {
        self.shared.counts.entries_read.fetch_add(1, Ordering::Relaxed);
        item.map_err(|e| self.db_error(open, e))
    }

    /// Entries read by scans (queue, dead letters, set-aside entries) since open: what a request
    /// costs in store reads, independent of timing (tests compare it).
    pub fn entries_read(&self) -> u64 {
        self.shared.counts.entries_read.load(Ordering::Relaxed)
    }

    /// A stored value, read under the writer's lock.
    fn get(&self, open: &Open, key: &[u8]) -> Result<Option<sled::IVec>, StoreError> {
        open.store.get(key).map_err(|e| self.db_error(open, e))
    }

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
    /// Each change is atomic; the changes are applied in chunks of [`CHUNK`]: one sled batch of
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
    /// else of the database changed ([`crate::store::durable`]). A failure fails the store (module docs):
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
    pub fn check_blocking(&self) {
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

    /// Whether records were committed that are not yet durable (a sync is due).
    pub fn unsynced(&self) -> bool {
        let c = &self.shared.counts;
        c.committed.load(Ordering::SeqCst) > c.durable.load(Ordering::SeqCst)
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
    pub fn refused(&self) -> u64 {
        self.shared.counts.refused.load(Ordering::Relaxed)
    }

    /// Commits refused because free space was below `min_free`, since open.
    pub fn refused_space(&self) -> u64 {
        self.shared.counts.refused_space.load(Ordering::Relaxed)
    }

    /// Whether the last commit was refused for lack of room and nothing has been removed since: new
    /// valve states are not being recorded (health `critical`).
    pub fn is_refusing(&self) -> bool {
        self.shared.counts.refusing.load(Ordering::Relaxed)
    }

    /// The bounds this store was opened with.
    pub fn limits(&self) -> Limits {
        self.shared.limits
    }

    /// Number of dead letters (a count kept in memory: no walk).
    pub fn dead_len(&self) -> u64 {
        self.shared.counts.dead.load(Ordering::Relaxed)
    }

    /// Burials refused because `max_dead` dead letters were kept, since start.
    pub fn dead_refused(&self) -> u64 {
        self.shared.counts.dead_refused.load(Ordering::Relaxed)
    }

    /// Number of entries set aside as undecodable.
    pub fn corrupt_len(&self) -> u64 {
        self.shared.counts.corrupt.load(Ordering::Relaxed)
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
    pub fn oldest_waiting(&self) -> Option<std::time::Duration> {
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
    pub fn next_batch_where(&self, max: usize, skip: impl Fn(&Record) -> bool) -> Result<Vec<Record>, StoreError> {
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
            if blocked.contains(&*head.meter_no) {
                continue;
            }
            if batch.first().is_some_and(|first| first.event_name != head.event_name) {
                blocked.insert(head.meter_no.into_owned());
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

    /// [`Store::ack_blocking`] off the async threads.
    pub async fn ack(&self, ids: &[u64]) -> Result<(), StoreError> {
        let ids = ids.to_vec();
        self.off_async(move |o| o.ack_blocking(&ids)).await
    }

    /// Remove delivered records (the server answered `code: 0`), then sync. An `Err` means the removal
    /// may not be stored: the caller must not send anything more until it is. Blocking.
    pub fn ack_blocking(&self, ids: &[u64]) -> Result<(), StoreError> {
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

    /// Move a record to the dead letters with the server's reason (one batch), then sync. Refused
    /// with [`StoreError::DeadFull`] at `max_dead` dead letters: the record stays queued.
    pub async fn bury(&self, id: u64, reason: &str, died_at: &str) -> Result<(), StoreError> {
        let (reason, died_at) = (reason.to_string(), died_at.to_string());
        self.off_async(move |o| o.bury_blocking(id, &reason, &died_at)).await
    }

    /// [`Store::bury`], blocking.
    pub fn bury_blocking(&self, id: u64, reason: &str, died_at: &str) -> Result<(), StoreError> {
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
    /// tests; the admin API pages with [`Store::dead_page`].
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
    pub fn dead_page(&self, after: Option<u64>, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
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
    pub fn requeue_blocking(&self, id: Option<u64>) -> Result<usize, StoreError> {
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

    /// Move an undecodable entry aside (one batch: kept under `x` + its key, removed from where it
    /// was, the counts mended), unless it changed meanwhile. Logged once per entry.
    fn set_aside(&self, key: &[u8], value: &[u8], why: &StoreError) -> Result<(), StoreError> {
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

    /// A sled error from `open`: the store is failed from now on (module docs).
    fn db_error(&self, open: &Open, e: sled::Error) -> StoreError {
        // sled shows an I/O error in Debug form; the OS's own words read better in health and logs.
        let text = match &e {
            sled::Error::Io(io) => io.to_string(),
            other => other.to_string(),
        };
        self.fail_from(open, &text);
        StoreError::Db {
            path: self.shared.dir.clone(),
            source: e,
        }
    }

    /// Fail the store for an error of `open`, unless `open` was replaced meanwhile (the error is of a
    /// database already given up, and its replacement may work).
    fn fail_from(&self, open: &Open, error: &str) {
        self.fail_for(open.generation, error);
    }

    /// [`Store::fail_from`] for a database opened as `generation`.
    fn fail_for(&self, generation: u64, error: &str) {
        if generation == self.shared.generation.load(Ordering::SeqCst) {
            self.shared.fault.fail(&self.shared.dir, error);
        }
    }
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

/// An entry's key in words, for logs and listings.
fn describe_key(key: &[u8]) -> String {
    match key.first() {
        Some(&QUEUE) => format!("record {}", id_of(key)),
        Some(&DEAD) => format!("dead letter {}", id_of(key)),
        Some(&STATE) => format!("state {}", String::from_utf8_lossy(key.get(1..).unwrap_or_default())),
        _ => format!("key {}", String::from_utf8_lossy(key)),
    }
}

/// Open the database in `dir` (moving a layout before), read or rebuild its counts, and make it
/// durable (module docs) before anything on it is handed out.
fn open_store(dir: &Path) -> Result<Opened, StoreError> {
    let db = open_db(dir)?;
    let store = db.open_tree(STORE).map_err(|e| open_error(dir, e))?;
    let moved = migrate(&db, &store, dir)?;
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
        // No counts yet (a state directory just moved from the layout before), or records written
        // by something that does not keep them: read the whole queue, once.
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
    if counted || moved {
        // The count (or the move) read every page of the queue into sled's cache, which does not
        // give them back (1,000,000 records: ~50 MiB held for the whole drain). Open again to
        // start from an empty cache; the second open finds the counts just written.
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

/// How often [`Store::check_blocking`] looks at most.
pub const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The one tree of the store (module docs).
const STORE: &str = "store";
/// Most changes (meters) applied in one sled batch by [`Store::commit_batch`]; a Modbus line has at
/// most 247 units.
const CHUNK: usize = 256;
/// First byte of a key: a meter's state.
const STATE: u8 = b's';
/// First byte of a key: a queued record.
const QUEUE: u8 = b'q';
/// First byte of a key: a dead letter.
const DEAD: u8 = b'd';
/// First byte of a key: an undecodable entry set aside (followed by its original key).
const ASIDE: u8 = b'x';
/// The stored counts (first byte `m`, metadata).
const COUNTS_KEY: &[u8] = b"moutbox_counts";

/// Key of a record (queued or dead) in the store: kind, then its id big-endian.
fn id_key(kind: u8, id: u64) -> [u8; 9] {
    let mut k = [kind; 9];
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

/// The id in a key made by [`id_key`] (0 for anything else; ids start at 1).
fn id_of(key: &[u8]) -> u64 {
    key.get(1..9)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_be_bytes)
}

/// Key of a meter's state in the store.
fn state_key(meter_no: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + meter_no.len());
    k.push(STATE);
    k.extend_from_slice(meter_no.as_bytes());
    k
}

/// The trees of the layout before `store`, and the kind byte their keys get in it. Their stored counts
/// (tree `meta`) are not moved: the queue is counted once instead.
const OLD_TREES: [(&str, Option<u8>); 4] = [
    ("state", Some(STATE)),
    ("outbox", Some(QUEUE)),
    ("dead", Some(DEAD)),
    ("meta", None),
];

/// Move a state directory of the layout before into `store` (module docs). Returns whether one was
/// found; the caller then counts the queue.
fn migrate(db: &sled::Db, store: &sled::Tree, dir: &Path) -> Result<bool, StoreError> {
    let err = |e| open_error(dir, e);
    let names = db.tree_names();
    let old: Vec<_> = OLD_TREES
        .iter()
        .filter(|(name, _)| names.iter().any(|n| n == name.as_bytes()))
        .collect();
    if old.is_empty() {
        return Ok(false);
    }
    let mut moved = 0u64;
    for (name, kind) in &old {
        let Some(kind) = kind else { continue };
        let tree = db.open_tree(name).map_err(err)?;
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        for item in tree.iter() {
            let (k, v) = item.map_err(err)?;
            let mut key = Vec::with_capacity(1 + k.len());
            key.push(*kind);
            key.extend_from_slice(&k);
            batch.insert(key, v);
            in_batch += 1;
            moved += 1;
            // Bounded: a week of backlog is moved without holding it all in one batch.
            if in_batch == 1000 {
                store.apply_batch(std::mem::take(&mut batch)).map_err(err)?;
                in_batch = 0;
            }
        }
        store.apply_batch(batch).map_err(err)?;
    }
    // The copies are on disk before the originals go.
    db.flush().map_err(err)?;
    Synced::default().sync(dir)?;
    for (name, _) in &old {
        db.drop_tree(name).map_err(err)?;
    }
    tracing::info!(
        message = "State directory moved to the one-tree layout.",
        dir = %dir.display(),
        entries = moved
    );
    Ok(true)
}

/// The counts kept under [`COUNTS_KEY`] (see the module docs): records queued and their bytes, and one
/// past the highest record id ever committed to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Stored {
    records: u64,
    bytes: u64,
    top: u64,
}

impl Stored {
    fn parse(v: &[u8]) -> Option<Stored> {
        let v: &[u8; 24] = v.try_into().ok()?;
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&v[i * 8..i * 8 + 8]);
            u64::from_be_bytes(b)
        };
        Some(Stored {
            records: word(0),
            bytes: word(1),
            top: word(2),
        })
    }

    fn to_bytes(self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&self.records.to_be_bytes());
        b[8..16].copy_from_slice(&self.bytes.to_be_bytes());
        b[16..].copy_from_slice(&self.top.to_be_bytes());
        b
    }
}

/// Read back a queued record; a value that does not parse is a typed, located [`StoreError::Corrupt`].
fn decode_record(id: u64, v: &[u8]) -> Result<Record, StoreError> {
    stored_record::decode(v).map_err(|e| corrupt_record(id, e))
}

fn corrupt_record(id: u64, e: stored_record::Malformed) -> StoreError {
    StoreError::Corrupt {
        tree: "outbox",
        detail: format!("{id}: {e}"),
    }
}

/// Read back a stored value; a value that does not parse is a typed, located [`StoreError::Corrupt`].
fn decode<'de, T: Deserialize<'de>>(
    tree: &'static str,
    key: impl std::fmt::Display,
    v: &'de [u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        tree,
        detail: format!("{key}: {e}"),
    })
}

/// Write the stored form of a meter's state into `out` (emptied first; a commit writes every state
/// through one buffer): its JSON, exactly as serde_json writes it. The usual state (a valve and
/// nothing else) is written here directly, byte for byte the same (a proptest checks it): serde's
/// escaper, byte by byte, was a fifth of a commit's own work (BENCHMARKS.md row 2).
fn encode_state_into(out: &mut String, st: &StoredState) {
    out.clear();
    if st.offline_since.is_some()
        || st.back_since.is_some()
        || st.offline_boot.is_some()
        || st.back_boot.is_some()
        || !st.rules.is_empty()
    {
        // Serialising our own plain struct to JSON cannot fail (no maps with non-string keys).
        out.push_str(&serde_json::to_string(st).unwrap_or_default());
        return;
    }
    out.reserve(48 + st.label.len() + st.since.len());
    out.push_str("{\"raw\":");
    // Writing into a String cannot fail.
    let _ = write!(out, "{}", st.raw);
    out.push_str(",\"label\":");
    json_str(out, &st.label);
    out.push_str(",\"since\":");
    json_str(out, &st.since);
    if st.valve_unknown {
        out.push_str(",\"valve_unknown\":true");
    }
    out.push('}');
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising our own plain structs to JSON cannot fail (no maps with non-string keys).
    serde_json::to_vec(v).unwrap_or_default()
}

/// How long [`Store::open`] waits for a lock to be released. sled releases its file lock only when its
/// background flusher has let go of the last handle, which can lag a moment behind the drop of our own
/// previous handle (a restart in the same process, a test reopening). A real second instance still
/// holds it after this and gets [`StoreError::Locked`].
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// sled's page cache of the outbox database, in bytes .
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

    fn draft(event: &str) -> Draft {
        Draft {
            event_name: event.into(),
            detected_at: "2026-01-01T00:00:00+08:00".into(),
            from: "关闭".into(),
            to: "开启".into(),
            biz_data: "{}".into(),
        }
    }

    fn state(raw: i64) -> StoredState {
        StoredState {
            raw,
            label: format!("L{raw}"),
            since: String::new(),
            ..StoredState::default()
        }
    }

    const BIG: Limits = Limits {
        max_records: 1000,
        max_bytes: 1 << 30,
        ..Limits::DEFAULT
    };

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
        // The scan borrows meter and event from the stored JSON; an escaped string cannot be borrowed
        // and must still be read (and compared) correctly.
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

    /// Write records straight into the tree `outbox` of the layout before `store`, as an older version
    /// would (it keeps no counts there either).
    fn write_raw(dir: &Path, ids: &[u64]) {
        let db = open_db(dir).unwrap();
        let q = db.open_tree("outbox").unwrap();
        for id in ids {
            q.insert(id.to_be_bytes(), encode(&raw_record(*id))).unwrap();
        }
        db.flush().unwrap();
    }

    fn raw_record(id: u64) -> Record {
        Record {
            id,
            event_name: "开".into(),
            meter_no: format!("R{id}"),
            detected_at: String::new(),
            from: String::new(),
            to: String::new(),
            biz_data: "{}".into(),
            attempts: 0,
            rejections: 0,
            last_error: None,
        }
    }

    fn stored(o: &Store) -> Option<Stored> {
        o.handle()
            .unwrap()
            .store
            .get(COUNTS_KEY)
            .unwrap()
            .and_then(|v| Stored::parse(&v))
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
        // A state directory from before the counts were kept.
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
        // Another version that does not keep the counts adds records: their ids are past the stored top.
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
    async fn a_state_directory_of_the_layout_before_is_moved_whole_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let letter = DeadLetter {
            record: raw_record(4),
            reason: "事件不存在".into(),
            died_at: "t".into(),
        };
        {
            // The layout before: one tree per kind, counts in `meta` (left wrong on purpose: they are
            // not trusted after a move).
            let db = open_db(dir.path()).unwrap();
            let tree = |name: &str| db.open_tree(name).unwrap();
            tree("state").insert("M1", encode(&state(1))).unwrap();
            tree("state").insert("M2", encode(&state(0))).unwrap();
            for id in [2u64, 7, 3000] {
                tree("outbox")
                    .insert(id.to_be_bytes(), encode(&raw_record(id)))
                    .unwrap();
            }
            tree("dead").insert(4u64.to_be_bytes(), encode(&letter)).unwrap();
            tree("meta").insert(b"outbox_counts", &[0u8; 24][..]).unwrap();
            db.flush().unwrap();
        }
        let o = Store::open(dir.path(), BIG).unwrap();
        assert_eq!(o.state("M1").unwrap(), Some(state(1)));
        assert_eq!(o.state("M2").unwrap(), Some(state(0)));
        let ids: Vec<u64> = o.list(10).unwrap().iter().map(|r| r.id).collect();
        assert_eq!(ids, [2, 7, 3000], "every record, in detection order");
        assert_eq!(o.list(10).unwrap()[2], raw_record(3000));
        assert_eq!(o.dead().unwrap(), [letter]);
        let bytes: u64 = [2u64, 7, 3000]
            .iter()
            .map(|i| encode(&raw_record(*i)).len() as u64)
            .sum();
        assert_eq!(
            (o.len(), o.bytes()),
            (3, bytes),
            "counted, not taken from the old `meta`"
        );
        assert_eq!(
            stored(&o).map(|s| (s.records, s.bytes, s.top >= 3001)),
            Some((3, bytes, true))
        );
        assert_eq!(
            o.next_batch(10).unwrap().len(),
            3,
            "what was on disk at open is durable"
        );
        let new = o.commit("M3", &state(1), vec![draft("开")]).unwrap()[0].id;
        assert!(new > 3000, "ids go on past the moved ones: {new}");
        o.sync().await.unwrap();
        drop(o);
        let o = Store::open(dir.path(), BIG).unwrap();
        let names: Vec<String> = o
            .handle()
            .unwrap()
            .db
            .tree_names()
            .iter()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect();
        for old in ["state", "outbox", "dead", "meta"] {
            assert!(!names.iter().any(|n| n == old), "tree {old} left: {names:?}");
        }
        assert_eq!(o.len(), 4);
        assert_eq!(o.requeue(Some(4)).await.unwrap(), 1);
        let ids: Vec<u64> = o.list(10).unwrap().iter().map(|r| r.id).collect();
        assert_eq!(ids, [2, 4, 7, 3000, new]);
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
                .insert(id_key(QUEUE, top + 5), encode(&raw_record(top + 5)))
                .unwrap();
            db.flush().unwrap();
        }
        let o = Store::open(dir.path(), BIG).unwrap();
        assert_eq!(o.len(), 2);
        assert_eq!(stored(&o).map(|s| (s.records, s.top >= top + 6)), Some((2, true)));
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

    #[test]
    fn a_state_written_before_event_rules_still_loads() {
        let old: StoredState =
            serde_json::from_str(r#"{"raw":1,"label":"开启","since":"2026-01-01T08:00:00+08:00"}"#).unwrap();
        assert_eq!(
            (old.raw, old.valve_unknown, old.offline_since, old.rules.len()),
            (1, false, None, 0)
        );
        assert_eq!(
            String::from_utf8(encode(&old)).unwrap(),
            r#"{"raw":1,"label":"开启","since":"2026-01-01T08:00:00+08:00"}"#,
            "nothing new is written while the new parts are empty"
        );
    }

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

    #[tokio::test]
    async fn a_failed_store_refuses_everything_until_it_is_opened_again() {
        let dir = tempfile::tempdir().unwrap();
        let o = Store::open(dir.path(), BIG).unwrap();
        let a = o.commit("M1", &state(1), vec![draft("开")]).unwrap()[0].id;
        o.sync().await.unwrap();
        let g = o.generation();
        o.shared.fault.fail(dir.path(), "No space left on device (os error 28)");
        assert!(o.is_failed());
        assert!(matches!(o.next_batch(10), Err(StoreError::Failed { .. })));
        assert!(matches!(o.ack(&[a]).await, Err(StoreError::Failed { .. })));
        assert!(matches!(
            o.commit("M1", &state(0), vec![]),
            Err(StoreError::Failed { .. })
        ));
        let f = o.fault().unwrap();
        assert!(f.error.contains("os error 28"), "{f:?}");
        assert!(!o.heal_blocking(), "not before its backoff");
        let start = std::time::Instant::now();
        while !o.heal_blocking() {
            assert!(start.elapsed() < std::time::Duration::from_secs(30), "healed");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(o.generation(), g + 1);
        assert!(o.fault().is_none());
        // An operation that began on the failed database and errs now does not fail its replacement.
        o.fail_for(g, "a late error of the old database");
        assert!(
            !o.is_failed(),
            "an old handle's error fails the database that replaced it"
        );
        assert_eq!(o.state("M1").unwrap(), Some(state(1)));
        assert_eq!(
            o.next_batch(10).unwrap().iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![a]
        );
        o.ack(&[a]).await.unwrap();
        assert!(o.is_empty());
        assert_eq!(o.fault_totals(), (1, 1));
    }

    #[tokio::test]
    async fn below_the_reserve_nothing_is_committed_but_acks_still_are() {
        let dir = tempfile::tempdir().unwrap();
        let o = Store::open(dir.path(), BIG).unwrap();
        let a = o.commit("M1", &state(1), vec![draft("开")]).unwrap()[0].id;
        o.sync().await.unwrap();
        drop(o);
        let o = Store::open(
            dir.path(),
            Limits {
                min_free: u64::MAX,
                ..BIG
            },
        )
        .unwrap();
        let r = o
            .commit_batch(vec![("M1", state(0), vec![draft("关")]), ("M2", state(1), vec![])])
            .unwrap();
        assert!(r.iter().all(|r| matches!(r, Err(StoreError::NoSpace(_)))), "{r:?}");
        assert!(o.is_refusing() && o.refused_space() == 1);
        assert_eq!(o.state("M1").unwrap(), Some(state(1)), "the old state stays");
        assert_eq!(o.state("M2").unwrap(), None);
        o.ack(&[a]).await.unwrap();
        assert!(o.is_empty());
        let (free, reserve, low) = o.space();
        assert!(free.is_some() && reserve == u64::MAX && low);
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

    proptest::proptest! {
        /// A state is stored exactly as serde_json writes it, whichever path writes it.
        #[test]
        fn a_state_is_stored_as_serde_writes_it(
            raw in proptest::prelude::any::<i64>(),
            label in ".{0,12}",
            since in "[-0-9T:+\"\\\\\n\u{1}a-z]{0,30}",
            valve_unknown in proptest::prelude::any::<bool>(),
            offline in proptest::prelude::any::<bool>(),
            rule in proptest::prelude::any::<bool>(),
        ) {
            let mut st = StoredState { raw, label, since, valve_unknown, ..StoredState::default() };
            if offline {
                st.offline_since = Some(DateTime::from_timestamp(1_700_000_000, 5).unwrap_or_default());
            }
            if rule {
                st.rules.insert("r".into(), RuleMemory { fired: true, ..RuleMemory::default() });
            }
            proptest::prop_assert_eq!(
                {
                    let mut text = String::new();
                    encode_state_into(&mut text, &st);
                    text
                },
                String::from_utf8(serde_json::to_vec(&st).unwrap()).unwrap()
            );
        }
    }
}

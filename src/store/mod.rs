//! The durable store (sled 0.34.7): each meter's last accepted state, the outbox of records waiting
//! for delivery, the dead letters, and the entries set aside as undecodable; committing them and
//! making them durable; the disk's faults.
//!
//! It never talks to a meter or to the server, never decides what fires or when to send, never drops
//! a record to make room, and never wipes what it cannot read (it sets it aside for an operator).
//!
//! # Key layout
//! One sled database in `site.state_dir` with ONE tree, `store`. The first byte of a key says what
//! its value is:
//! - `s` + meter number (UTF-8) → [`StoredState`] (JSON): valve state, link and rule memory.
//! - `q` + record id (big-endian u64, so iteration order is detection order) → the queued
//!   [`Record`](crate::events::record::Record) in its stored form ([`stored_record`]): the outbox.
//! - `d` + record id → [`DeadLetter`] (JSON): records the server refused too often.
//! - `x` + the key of any entry above → its bytes, unchanged: an entry that could not be decoded, set
//!   aside so that the rest of the queue and the other meters go on.
//! - `m` + `outbox_counts` → records queued, their bytes, and one past the highest record id ever
//!   committed (three big-endian u64), written with every change of the queue, so that opening the
//!   store never has to read the whole queue to count it.
//!
//! # Invariants
//! - One tree, because a `sled::Batch` applied to one tree is atomic, across a crash too, and costs
//!   what its inserts cost. Every change goes through `Store::write`: one lock held while the change
//!   reads what it needs and its batch is applied. That serialises writers (an ack racing a failure
//!   note cannot bring a delivered record back) and keeps the stored counts exact.
//! - A meter's new state (valve, link, rule memory) and its records are committed in one atomic batch
//!   ([`Store::commit`]). If a crash loses the commit, it loses the state with it, and the transition
//!   is detected again: nothing is repeated, nothing forgotten.
//! - "Stored" means committed *and* [`Store::sync`]ed: sled's `flush()` is followed by `fsync` of the
//!   database's log and of every other file and folder of it that changed (`durable.rs`). The sender
//!   sees only records below the durable mark. Every open (the first and each reopen) makes the whole
//!   database durable before anything found on it is handed out.
//! - A record is removed only by [`Store::ack`] (the server answered `code: 0`), moved between outbox
//!   and dead letters by [`Store::bury`] / [`Store::requeue`] (each one batch, keeping the record's
//!   id), or set aside undecodable (kept, listed). When a bound is reached the write is refused and
//!   the caller keeps what it had.
//! - Dead letters do not count against the outbox bounds; they have their own, `max_dead`.
//! - Below `min_free` free bytes nothing new is committed; what empties the queue still writes.
//! - After the first sled error or failed fsync the store is failed: every call returns
//!   [`StoreError::Failed`] without touching the database until `Store::heal` has opened it again,
//!   which bumps `Store::generation`.
//!
//! # Files
//! - `mod.rs`: the [`Store`] handle, the key layout, the one writer.
//! - `error.rs`: [`StoreError`].
//! - `open.rs`: opening, counting what is found, the open-time sync.
//! - `states.rs`: meter states.
//! - `queue.rs`: the outbox: commit, sync, the sender's batches, ack, failure notes.
//! - `dead.rs`: dead letters: bury, paging, their bound, requeue.
//! - `corrupt.rs`: entries set aside as undecodable.
//! - `fault.rs`: the failed state, healing and the generation.
//! - `space.rs`: free space and the `min_free` reserve.
//! - `durable.rs`: which files and folders of the database a sync fsyncs.
//! - `stored_record.rs`: the stored form of a queued record.

mod corrupt;
mod dead;
pub(crate) mod durable;
mod error;
pub(crate) mod fault;
mod open;
mod queue;
pub(crate) mod space;
mod states;
pub mod stored_record;
#[cfg(test)]
mod testing;

pub use corrupt::{CorruptEntry, DamageTarget};
pub use dead::DeadLetter;
pub use error::StoreError;
pub use open::CACHE_CAPACITY;
pub use states::StoredState;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use serde::{Deserialize, Serialize};

use crate::config::Limits;
use durable::Synced;
use fault::Fault;
use space::Space;

// The key layout (module docs).

/// The one tree of the store (module docs).
const STORE: &str = "store";
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

/// An entry's key in words, for logs and listings.
fn describe_key(key: &[u8]) -> String {
    match key.first() {
        Some(&QUEUE) => format!("record {}", id_of(key)),
        Some(&DEAD) => format!("dead letter {}", id_of(key)),
        Some(&STATE) => format!("state {}", String::from_utf8_lossy(key.get(1..).unwrap_or_default())),
        _ => format!("key {}", String::from_utf8_lossy(key)),
    }
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

impl Store {
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

    /// The bounds this store was opened with.
    pub(crate) fn limits(&self) -> Limits {
        self.shared.limits
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

    /// One entry of a scan, counted (`entries_read`).
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
    #[cfg(test)]
    pub(crate) fn entries_read(&self) -> u64 {
        self.shared.counts.entries_read.load(Ordering::Relaxed)
    }

    /// A stored value, read under the writer's lock.
    fn get(&self, open: &Open, key: &[u8]) -> Result<Option<sled::IVec>, StoreError> {
        open.store.get(key).map_err(|e| self.db_error(open, e))
    }

    /// Run `f` with this store on tokio's blocking threads: sled blocks (I/O, locks, fsync) and must
    /// not stall an async worker. A call that panicked is an error like a failed write.
    pub(crate) async fn off_async<T: Send + 'static>(
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

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising our own plain structs to JSON cannot fail (no maps with non-string keys).
    serde_json::to_vec(v).unwrap_or_default()
}

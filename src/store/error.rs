//! What can go wrong with the store: [`StoreError`].
//!
//! Every error says what was (not) written: a refusal for lack of room ([`StoreError::Full`],
//! [`StoreError::NoSpace`], [`StoreError::DeadFull`]) wrote nothing and the caller keeps what it had;
//! [`StoreError::Failed`] touched nothing.

use std::path::PathBuf;

use super::durable::SyncFailed;
use super::space::LowSpace;

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
    /// The directory holds the trees of the pre-release layout; nothing in it was read or changed.
    #[error("the state directory {path} was written by a pre-release fieldgate (trees {trees}), which this release does not read; it is kept as it is: deliver its queue with that release, or move the directory aside to start empty")]
    PreRelease {
        /// The state directory.
        path: PathBuf,
        /// The old trees that hold entries.
        trees: String,
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
    /// A bounded label of the error's kind.
    #[cfg(test)]
    pub(crate) fn error_code(&self) -> &'static str {
        match self {
            StoreError::Locked(_) => "locked",
            StoreError::Db { .. } => "db",
            StoreError::Sync { .. } => "sync",
            StoreError::PreRelease { .. } => "pre_release",
            StoreError::Failed { .. } => "store_failed",
            StoreError::Corrupt { .. } => "corrupt",
            StoreError::Full { .. } => "full",
            StoreError::NoSpace(_) => "no_space",
            StoreError::DeadFull { .. } => "dead_full",
        }
    }
}

//! Free space of the state directory's file system, and the reserve below which no new state or
//! record is committed (`[outbox] min_free`). Looked up with `statvfs` at most once per
//! [`LOOK_EVERY`] (monotonic clock), never once per record. The reserve is kept for what empties the
//! queue (acknowledgements, failure notes, dead letters): those still write while space is low.
//!
//! Logged once per change: space fell below the reserve, space came back. Never frees space itself.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::Store;

/// How often the free space is looked up at most.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// Free space below the reserve: the reason a commit was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LowSpace {
    /// Bytes free for an unprivileged writer.
    pub(crate) free: u64,
    /// The reserve (`[outbox] min_free`).
    pub(crate) reserve: u64,
}

/// The free-space watch of one state directory.
#[derive(Debug)]
pub(crate) struct Space {
    reserve: u64,
    /// Free bytes at the last look (`u64::MAX` before the first, or when the look failed).
    free: AtomicU64,
    low: AtomicBool,
    looked: Mutex<Option<Instant>>,
    /// Looks that failed (statvfs error): the reserve is not enforced then.
    failed_looks: AtomicU64,
}

impl Space {
    pub(crate) fn new(reserve: u64) -> Space {
        Space {
            reserve,
            free: AtomicU64::new(u64::MAX),
            low: AtomicBool::new(false),
            looked: Mutex::new(None),
            failed_looks: AtomicU64::new(0),
        }
    }

    /// `Some` when the free space of `dir`'s file system is below the reserve; looks again when the
    /// last look is older than [`LOOK_EVERY`].
    fn low(&self, dir: &Path) -> Option<LowSpace> {
        let due = {
            let mut looked = self.looked.lock().unwrap_or_else(PoisonError::into_inner);
            let due = looked.is_none_or(|t| t.elapsed() >= LOOK_EVERY);
            if due {
                *looked = Some(Instant::now());
            }
            due
        };
        if due {
            self.look(dir);
        }
        self.low.load(Ordering::Relaxed).then(|| LowSpace {
            free: self.free.load(Ordering::Relaxed),
            reserve: self.reserve,
        })
    }

    fn look(&self, dir: &Path) {
        let free = match rustix::fs::statvfs(dir) {
            Ok(s) => s.f_bavail.saturating_mul(s.f_frsize),
            Err(e) => {
                if self.failed_looks.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(message = "Cannot read the free space of the state directory; the min_free reserve is not enforced while this lasts.", dir = %dir.display(), error = %e);
                }
                u64::MAX
            }
        };
        self.free.store(free, Ordering::Relaxed);
        let low = free < self.reserve;
        if self.low.swap(low, Ordering::Relaxed) != low {
            if low {
                tracing::error!(message = "Disk almost full: new states and records are not committed until space returns (they are detected again then). Free space on the state directory's file system is below outbox.min_free.", dir = %dir.display(), free_bytes = free, min_free = self.reserve);
            } else {
                tracing::info!(message = "Disk space is back above outbox.min_free; commits resume.", dir = %dir.display(), free_bytes = free, min_free = self.reserve);
            }
        }
    }

    /// Free bytes at the last look; `None` before the first or when it failed.
    fn free(&self) -> Option<u64> {
        Some(self.free.load(Ordering::Relaxed)).filter(|f| *f != u64::MAX)
    }

    fn reserve(&self) -> u64 {
        self.reserve
    }

    /// Whether the last look found less than the reserve.
    fn is_low(&self) -> bool {
        self.low.load(Ordering::Relaxed)
    }
}

impl Store {
    /// Free space below `min_free`, if it is (looked up at most once a second).
    pub(crate) fn low_space(&self) -> Option<LowSpace> {
        self.shared.space.low(&self.shared.dir)
    }

    /// Free bytes of the state directory's file system at the last look, and the reserve.
    pub(crate) fn space(&self) -> (Option<u64>, u64, bool) {
        let s = &self.shared.space;
        (s.free(), s.reserve(), s.is_low())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;
    use crate::store::testing::*;
    use crate::store::{Store, StoreError};

    #[test]
    fn a_reserve_larger_than_any_disk_is_low_and_names_both_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let s = Space::new(u64::MAX - 1);
        let low = s.low(dir.path()).expect("low");
        assert_eq!(low.reserve, u64::MAX - 1);
        assert!(low.free > 0 && low.free < u64::MAX - 1);
        assert_eq!(s.free(), Some(low.free));
        let ok = Space::new(0);
        assert_eq!(ok.low(dir.path()), None);
        assert!(!ok.is_low());
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
}

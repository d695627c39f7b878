//! The store's failed state, and healing. sled is failed for good after one failed write (its global
//! error), and after a failed fsync the page cache can no longer be trusted, so the first such error
//! marks the store failed; nothing is read or written until [`Store::heal`] has opened the database
//! again. Reopen attempts back off from [`REOPEN_MIN`] to [`REOPEN_MAX`] on the monotonic clock. A
//! reopen bumps [`Store::generation`]: whoever keeps what the store held (the recorder's states)
//! reads it again, because what sat in sled's failed buffer is gone. An error from a handle of a
//! database already replaced does not fail its replacement.
//!
//! Logged once per change of state: the failure (with its error), a reopen that fails with a new
//! error, and the recovery (with how many errors were suppressed meanwhile and how long it took).
//! Never wipes or moves the database aside to get it open.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::open::open_store;
use super::{Open, Store, StoreError};
use crate::backoff::Backoff;

/// First wait before opening a failed store again.
const REOPEN_MIN: Duration = Duration::from_millis(500);
/// Longest wait between two attempts to open a failed store again.
const REOPEN_MAX: Duration = Duration::from_secs(30);

/// A failed store as health, metrics and `fieldgate status` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreFault {
    /// The error that failed it.
    pub(crate) error: String,
    /// Seconds since it failed (monotonic clock).
    pub(crate) for_seconds: u64,
    /// Attempts to open it again so far.
    pub(crate) reopen_attempts: u64,
    /// Why the last attempt failed, if one did.
    pub(crate) reopen_error: Option<String>,
}

#[derive(Debug)]
struct State {
    /// When it failed; `None` while the store works.
    since: Option<Instant>,
    error: String,
    /// Errors reported while already failed (not logged one by one).
    suppressed: u64,
    attempts: u64,
    reopen_error: Option<String>,
    /// Not before this instant is the next reopen attempted.
    next_try: Option<Instant>,
    backoff: Backoff,
}

/// The failure state of one store (shared by every clone of the outbox).
#[derive(Debug)]
pub(crate) struct Fault {
    failed: AtomicBool,
    state: Mutex<State>,
    /// Failures since start (each change from working to failed).
    failures: AtomicU64,
    /// Successful reopens since start.
    reopens: AtomicU64,
}

impl Default for Fault {
    fn default() -> Fault {
        Fault {
            failed: AtomicBool::new(false),
            state: Mutex::new(State {
                since: None,
                error: String::new(),
                suppressed: 0,
                attempts: 0,
                reopen_error: None,
                next_try: None,
                backoff: Backoff::new(REOPEN_MIN, REOPEN_MAX),
            }),
            failures: AtomicU64::new(0),
            reopens: AtomicU64::new(0),
        }
    }
}

impl Fault {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the store is failed (cheap: one atomic load).
    pub(crate) fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// The error that failed the store, if it is failed.
    pub(crate) fn error(&self) -> Option<String> {
        if !self.is_failed() {
            return None;
        }
        let s = self.state();
        s.since.map(|_| s.error.clone())
    }

    /// A store I/O error: the store is failed from now on (logged when it was working).
    pub(crate) fn fail(&self, dir: &std::path::Path, error: &str) {
        let mut s = self.state();
        if s.since.is_some() {
            s.suppressed = s.suppressed.saturating_add(1);
            return;
        }
        s.since = Some(Instant::now());
        s.error = error.to_string();
        s.suppressed = 0;
        s.attempts = 0;
        s.reopen_error = None;
        s.backoff.reset();
        // The first attempt waits a little: the cause (a full disk) is rarely gone at once.
        s.next_try = Some(Instant::now() + REOPEN_MIN);
        self.failed.store(true, Ordering::Release);
        self.failures.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            message = "The state database failed; nothing is delivered or committed until it is opened again (tried by itself, with backoff). Polling goes on.",
            dir = %dir.display(),
            error = %error
        );
    }

    /// Whether a reopen may be tried now; if so the next one is scheduled (so two callers do not both
    /// try).
    fn reopen_due(&self) -> bool {
        let mut s = self.state();
        let now = Instant::now();
        if s.since.is_none() || s.next_try.is_some_and(|t| t > now) {
            return false;
        }
        // Full jitter below a doubling cap, but never sooner than the minimum.
        let delay = s.backoff.next_delay().max(REOPEN_MIN);
        s.next_try = Some(now + delay);
        s.attempts = s.attempts.saturating_add(1);
        true
    }

    /// A reopen failed; logged when its error differs from the last one.
    fn reopen_failed(&self, dir: &std::path::Path, error: &str) {
        let mut s = self.state();
        if s.reopen_error.as_deref() != Some(error) {
            tracing::warn!(
                message = "The state database cannot be opened again yet; retrying with backoff.",
                dir = %dir.display(),
                attempts = s.attempts,
                error = %error
            );
            s.reopen_error = Some(error.to_string());
        } else {
            s.suppressed = s.suppressed.saturating_add(1);
        }
    }

    /// The store was opened again and works.
    fn healed(&self, dir: &std::path::Path) {
        let mut s = self.state();
        let Some(since) = s.since.take() else {
            return;
        };
        self.failed.store(false, Ordering::Release);
        self.reopens.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            message = "The state database works again (opened again); delivery and commits resume.",
            dir = %dir.display(),
            failed_for_ms = since.elapsed().as_millis() as u64,
            reopen_attempts = s.attempts,
            suppressed_errors = s.suppressed,
            error_was = %s.error
        );
        s.suppressed = 0;
        s.reopen_error = None;
        s.next_try = None;
        s.backoff.reset();
    }

    /// The failure, as health shows it; `None` while the store works.
    fn view(&self) -> Option<StoreFault> {
        if !self.is_failed() {
            return None;
        }
        let s = self.state();
        s.since.map(|since| StoreFault {
            error: s.error.clone(),
            for_seconds: since.elapsed().as_secs(),
            reopen_attempts: s.attempts,
            reopen_error: s.reopen_error.clone(),
        })
    }

    /// (failures, reopens) since start.
    fn totals(&self) -> (u64, u64) {
        (
            self.failures.load(Ordering::Relaxed),
            self.reopens.load(Ordering::Relaxed),
        )
    }
}

impl Store {
    /// If the store failed, open it again once its backoff allows (blocking: call from a blocking
    /// thread, or use [`Store::heal`]). Returns whether the store works now.
    pub(crate) fn heal_blocking(&self) -> bool {
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
    pub(crate) async fn heal(&self) -> bool {
        if !self.shared.fault.is_failed() {
            return true;
        }
        self.off_async(|o| Ok(o.heal_blocking())).await.unwrap_or(false)
    }

    /// Whether the store is failed (waiting to be opened again).
    pub(crate) fn is_failed(&self) -> bool {
        self.shared.fault.is_failed()
    }

    /// The failure of the store, if it is failed.
    pub(crate) fn fault(&self) -> Option<StoreFault> {
        self.shared.fault.view()
    }

    /// (failures, successful reopens) since start.
    pub(crate) fn fault_totals(&self) -> (u64, u64) {
        self.shared.fault.totals()
    }

    /// How often the database was opened again after a failure: what a cache of its contents
    /// compares to know it must read them again.
    pub(crate) fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::SeqCst)
    }

    /// A sled error from `open`: the store is failed from now on (module docs).
    pub(super) fn db_error(&self, open: &Open, e: sled::Error) -> StoreError {
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
    pub(super) fn fail_from(&self, open: &Open, error: &str) {
        self.fail_for(open.generation, error);
    }

    /// [`Store::fail_from`] for a database opened as `generation`.
    fn fail_for(&self, generation: u64, error: &str) {
        if generation == self.shared.generation.load(Ordering::SeqCst) {
            self.shared.fault.fail(&self.shared.dir, error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::*;

    #[test]
    fn a_failure_is_reported_once_and_reopens_are_spaced() {
        let f = Fault::default();
        let dir = std::path::Path::new("/x");
        assert!(!f.is_failed() && !f.reopen_due());
        f.fail(dir, "No space left on device");
        f.fail(dir, "No space left on device");
        assert!(f.is_failed());
        assert_eq!(f.error().as_deref(), Some("No space left on device"));
        assert_eq!(f.totals(), (1, 0), "one failure, however many errors");
        assert!(!f.reopen_due(), "the first reopen waits REOPEN_MIN");
        {
            let mut s = f.state();
            s.next_try = Some(Instant::now());
        }
        assert!(f.reopen_due());
        assert!(!f.reopen_due(), "a second caller does not also try");
        f.healed(dir);
        assert!(!f.is_failed() && f.view().is_none());
        assert_eq!(f.totals(), (1, 1));
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
}

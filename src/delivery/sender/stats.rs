//! The sender's counters ([`SenderStats`], shared with the admin API and the tests) and their copy at one
//! moment ([`SenderSnapshot`], the admin API's JSON).
//!
//! Invariants: every request is counted once by its outcome (`ok`, `rejected`, `transient`,
//! `unauthorized`, `login_failed`), and a throttled, redirected or refused one once more in its detail
//! counter. Counters only grow, except the gauges `held` and `failures_in_a_row`. Nothing here decides
//! what the sender sends. Beside the counters: the ring of the work orders delivered last
//! (`recent.rs`), read by the status page.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::delivery::panda::answer::DeliveryError;

use super::recent::RecentDeliveries;

/// Counters of the sender, shared with the admin API and tests.
#[derive(Debug, Default)]
pub struct SenderStats {
    /// Records delivered (acknowledged by `code: 0` and removed from the outbox).
    pub delivered: AtomicU64,
    /// Requests answered `code: 0`.
    pub ok: AtomicU64,
    /// Requests refused: `code != 0`, or 400/403/413/422 without a `code` (each half of a split batch
    /// counts; the latter also in `http_refused`).
    pub rejected: AtomicU64,
    /// Refusals of a record sent alone (each refusal counts; at `dead_after` of them the record is dead).
    pub(crate) records_rejected: AtomicU64,
    /// Requests without a usable answer (network, timeout, 5xx, HTML, non-JSON, 3xx, 408/429/503, other
    /// 4xx).
    pub transient: AtomicU64,
    /// Of [`SenderStats::transient`]: answers 408, 429 or 503 (the server asked to wait).
    throttled: AtomicU64,
    /// Of [`SenderStats::transient`]: 3xx answers (never followed; `panda.base_url` is wrong).
    pub redirects: AtomicU64,
    /// Of [`SenderStats::rejected`]: 400/403/413/422 answers without a Panda `code`.
    http_refused: AtomicU64,
    /// Requests answered 401 even with a fresh token.
    unauthorized: AtomicU64,
    /// Requests not sent because GenerateToken failed.
    pub login_failed: AtomicU64,
    /// Tokens fetched (successful GenerateToken calls).
    pub token_refreshes: AtomicU64,
    /// Failed requests since the last success (0 while delivering).
    failures_in_a_row: AtomicU64,
    /// Records moved to the dead letters by this sender.
    pub dead_lettered: AtomicU64,
    /// Records on hold after the server refused them alone (gauge).
    pub(crate) held: AtomicU64,
    /// Store writes about an answer that failed and were retried (nothing was sent meanwhile).
    pub(crate) store_retries: AtomicU64,
    /// Burials refused because `max_dead` dead letters are kept (the record stays queued, held).
    pub(crate) dead_full: AtomicU64,
    /// GenerateToken refuses the configured credentials (`errMsg`): a configuration fault, health
    /// `critical`. Cleared by the next answer that needed a token.
    pub login_failing: AtomicBool,
    /// The last delivery error, cleared on success.
    last_error: Mutex<Option<String>>,
    /// The work orders delivered last (bounded), for the status page; not a counter, but shared the
    /// same way.
    pub(crate) recent: RecentDeliveries,
}

/// A copy of [`SenderStats`] at one moment, for the admin API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SenderSnapshot {
    /// See [`SenderStats::delivered`].
    pub delivered: u64,
    /// See [`SenderStats::ok`].
    pub ok: u64,
    /// See [`SenderStats::rejected`].
    pub rejected: u64,
    /// See `SenderStats::records_rejected`.
    #[serde(default)]
    pub records_rejected: u64,
    /// See [`SenderStats::transient`].
    pub transient: u64,
    /// See `SenderStats::throttled`.
    #[serde(default)]
    pub throttled: u64,
    /// See [`SenderStats::redirects`].
    #[serde(default)]
    pub(crate) redirects: u64,
    /// See `SenderStats::http_refused`.
    #[serde(default)]
    pub http_refused: u64,
    /// See [`SenderStats::unauthorized`].
    pub(crate) unauthorized: u64,
    /// See [`SenderStats::login_failed`].
    pub(crate) login_failed: u64,
    /// See [`SenderStats::token_refreshes`].
    pub(crate) token_refreshes: u64,
    /// See [`SenderStats::failures_in_a_row`].
    pub(crate) failures_in_a_row: u64,
    /// See [`SenderStats::dead_lettered`].
    pub dead_lettered: u64,
    /// See [`SenderStats::held`].
    pub(crate) held: u64,
    /// See [`SenderStats::store_retries`].
    #[serde(default)]
    pub(crate) store_retries: u64,
    /// See [`SenderStats::dead_full`].
    #[serde(default)]
    pub(crate) dead_full: u64,
    /// See [`SenderStats::login_failing`].
    pub login_failing: bool,
    /// See [`SenderStats::last_error`].
    pub last_error: Option<String>,
}

impl SenderStats {
    /// The last delivery error, if the latest attempt failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// All counters at once.
    pub fn snapshot(&self) -> SenderSnapshot {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SenderSnapshot {
            delivered: n(&self.delivered),
            ok: n(&self.ok),
            rejected: n(&self.rejected),
            records_rejected: n(&self.records_rejected),
            transient: n(&self.transient),
            throttled: n(&self.throttled),
            redirects: n(&self.redirects),
            http_refused: n(&self.http_refused),
            unauthorized: n(&self.unauthorized),
            login_failed: n(&self.login_failed),
            token_refreshes: n(&self.token_refreshes),
            failures_in_a_row: n(&self.failures_in_a_row),
            dead_lettered: n(&self.dead_lettered),
            held: n(&self.held),
            store_retries: n(&self.store_retries),
            dead_full: n(&self.dead_full),
            login_failing: self.login_failing.load(Ordering::Relaxed),
            last_error: self.last_error(),
        }
    }

    pub(super) fn set_last_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = e;
    }

    /// Count one request by its outcome (and its detail counter), and the failures in a row.
    pub(super) fn count(&self, outcome: &Result<(), DeliveryError>) {
        let counter = match outcome {
            Ok(()) => &self.ok,
            Err(DeliveryError::Rejected { .. } | DeliveryError::Refused { .. }) => &self.rejected,
            Err(DeliveryError::Transient(_) | DeliveryError::Busy { .. } | DeliveryError::Redirect { .. }) => {
                &self.transient
            }
            Err(DeliveryError::Unauthorized) => &self.unauthorized,
            Err(DeliveryError::Login(_)) => &self.login_failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let detail = match outcome {
            Err(DeliveryError::Busy { .. }) => Some(&self.throttled),
            Err(DeliveryError::Redirect { .. }) => Some(&self.redirects),
            Err(DeliveryError::Refused { .. }) => Some(&self.http_refused),
            _ => None,
        };
        if let Some(c) = detail {
            c.fetch_add(1, Ordering::Relaxed);
        }
        match outcome {
            Ok(()) => self.failures_in_a_row.store(0, Ordering::Relaxed),
            Err(_) => {
                self.failures_in_a_row.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

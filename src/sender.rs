//! The sender: moves records from the outbox to Panda, oldest first, and removes them only once Panda
//! answered `code: 0`.
//!
//! Owns the delivery loop, its backoff and its counters ([`SenderStats`]). Invariants:
//! - A record leaves the outbox only through [`Outbox::ack`], called right after a `code: 0` answer for
//!   the request that carried it (which also fsyncs). Every other outcome keeps it queued, with its attempt
//!   count and last error updated ([`Outbox::note_failure`]). It retries forever.
//! - Delivery is at-least-once: if the answer is lost, or the process dies between the answer and the
//!   ack's fsync, that one batch is sent again. The window is kept to one request.
//! - After a failure it waits a fully jittered delay, `random(0..=min(retry_max, retry_min * 2^n))` with
//!   `n` the failures in a row, and resets on success. New records do not cut that wait short.
//! - Failures are logged when their kind changes and at most once a minute while they repeat, not once
//!   per retry; recovery is logged once.
//! - On shutdown no new batch is taken; a request in flight may finish within a grace period (the request
//!   timeout). If it is abandoned its records stay queued, and are sent again on the next start (the
//!   server may have applied it: a possible duplicate).
//!
//! Rejections (`code != 0`) keep the records and back off like any failure; dead-lettering comes later.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::PandaConfig;
use crate::outbox::Outbox;
use crate::panda::{DeliveryError, PandaClient};

/// How often an idle sender looks at the outbox without being woken.
pub const IDLE_TICK: Duration = Duration::from_secs(5);

/// A repeating failure of the same kind is logged at most this often.
pub const REPEAT_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Counters of the sender, shared with the admin API and tests.
#[derive(Debug, Default)]
pub struct SenderStats {
    /// Records delivered (acknowledged by `code: 0` and removed from the outbox).
    pub delivered: AtomicU64,
    /// Requests answered `code: 0`.
    pub ok: AtomicU64,
    /// Requests answered with `code != 0`.
    pub rejected: AtomicU64,
    /// Requests without a usable answer (network, timeout, 5xx, HTML, non-JSON).
    pub transient: AtomicU64,
    /// Requests answered 401 even with a fresh token.
    pub unauthorized: AtomicU64,
    /// Requests not sent because GenerateToken failed.
    pub login_failed: AtomicU64,
    /// Tokens fetched (successful GenerateToken calls).
    pub token_refreshes: AtomicU64,
    /// Failed requests since the last success (0 while delivering).
    pub failures_in_a_row: AtomicU64,
    /// The last delivery error, cleared on success.
    pub last_error: Mutex<Option<String>>,
}

impl SenderStats {
    /// The last delivery error, if the latest attempt failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_last_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = e;
    }

    fn count(&self, outcome: &Result<(), DeliveryError>) {
        let counter = match outcome {
            Ok(()) => &self.ok,
            Err(DeliveryError::Rejected { .. }) => &self.rejected,
            Err(DeliveryError::Transient(_)) => &self.transient,
            Err(DeliveryError::Unauthorized) => &self.unauthorized,
            Err(DeliveryError::Login(_)) => &self.login_failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Deliver the outbox to Panda until `shutdown`. `wake` is notified when new records were committed.
pub async fn run_sender(
    outbox: Outbox,
    client: PandaClient,
    cfg: PandaConfig,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    stats: Arc<SenderStats>,
) {
    let mut backoff = Backoff::new(cfg.retry_min, cfg.retry_max);
    let mut log = FailureLog::default();
    let max_batch = cfg.max_batch.max(1);
    let grace = cfg.timeout;
    tracing::info!(message = "Sender started.", url = %client.post_url(), queued = outbox.len());
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        // Register for a wake-up before looking, so a commit between the look and the wait is not missed.
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        let batch = match outbox.next_batch(max_batch) {
            Ok(b) => b,
            Err(e) => {
                log.failure("outbox", &e.to_string(), false, true);
                stats.set_last_error(Some(e.to_string()));
                if !wait(backoff.next_delay(), &shutdown).await {
                    break;
                }
                continue;
            }
        };
        let Some(first) = batch.first() else {
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(IDLE_TICK) => {}
                _ = shutdown.cancelled() => break,
            }
            continue;
        };
        let event_name = first.event_name.clone();
        let ids: Vec<u64> = batch.iter().map(|r| r.id).collect();

        let post = client.post(&event_name, &batch);
        tokio::pin!(post);
        let outcome = tokio::select! {
            r = &mut post => r,
            _ = shutdown.cancelled() => match tokio::time::timeout(grace, &mut post).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(
                        message = "Shutdown abandoned a request in flight; its records stay queued and are sent again on the next start (the server may have applied it).",
                        records = ids.len(),
                        event = %event_name
                    );
                    break;
                }
            },
        };
        stats.count(&outcome);
        stats.token_refreshes.store(client.token_refreshes(), Ordering::Relaxed);

        match outcome {
            Ok(()) => {
                // Acknowledge right after the answer: this is what keeps the duplicate window small.
                if let Err(e) = outbox.ack(&ids).await {
                    // The records may be sent again: a duplicate, never a loss.
                    tracing::error!(message = "Delivered records could not be removed from the outbox; they may be sent again.", records = ids.len(), error = %e);
                }
                stats.failures_in_a_row.store(0, Ordering::Relaxed);
                stats.set_last_error(None);
                // Last, so that a reader who sees the count also sees the rest of this delivery.
                stats.delivered.fetch_add(ids.len() as u64, Ordering::Relaxed);
                backoff.reset();
                log.success(ids.len());
            }
            Err(e) => {
                let reason = e.to_string();
                if let Err(store_err) = outbox.note_failure(&ids, &reason) {
                    tracing::error!(message = "Cannot record a failed attempt in the outbox.", error = %store_err);
                }
                stats.failures_in_a_row.fetch_add(1, Ordering::Relaxed);
                stats.set_last_error(Some(reason.clone()));
                // The server's own words (a rejection's msg, a login's errMsg) are a new state when they
                // change; a network error's details are not.
                let by_text = matches!(e, DeliveryError::Rejected { .. } | DeliveryError::Login(_));
                log.failure(e.error_code(), &reason, by_text, matches!(e, DeliveryError::Login(_)));
                let delay = backoff.next_delay();
                tracing::debug!(message = "Retrying after a delay.", delay_ms = delay.as_millis() as u64, event = %event_name, records = ids.len());
                if !wait(delay, &shutdown).await {
                    break;
                }
            }
        }
    }
    tracing::info!(message = "Sender stopped.", queued = outbox.len());
}

/// Sleep `delay` unless shutdown comes first; `false` on shutdown.
async fn wait(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = shutdown.cancelled() => false,
    }
}

// === impl Backoff ===

/// Exponential backoff with full jitter: the n-th delay in a row is uniform in `0..=min(max, min * 2^n)`.
/// Full jitter keeps many gateways from retrying in step after a shared outage.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            failures: 0,
        }
    }

    /// The cap of the next delay, without jitter.
    fn cap(&self) -> Duration {
        let factor = 1u32 << self.failures.min(31);
        self.min.checked_mul(factor).map_or(self.max, |d| d.min(self.max))
    }

    fn next_delay(&mut self) -> Duration {
        let cap = self.cap();
        self.failures = self.failures.saturating_add(1);
        let cap_ns = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::rng().random_range(0..=cap_ns))
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

// === impl FailureLog ===

/// Logs failures once per change of state and at most once per [`REPEAT_LOG_INTERVAL`] while one repeats.
/// A state is the error kind, plus the text where the text is the server's (rejections, logins).
#[derive(Debug, Default)]
struct FailureLog {
    kind: Option<&'static str>,
    /// The text that is part of the state, if any.
    text: Option<String>,
    last_logged: Option<Instant>,
    /// Failures since the last line logged.
    unlogged: u64,
    /// Failures since the last success.
    in_a_row: u64,
}

impl FailureLog {
    fn failure(&mut self, kind: &'static str, reason: &str, by_text: bool, loud: bool) {
        self.in_a_row += 1;
        let text = by_text.then(|| reason.to_string());
        let due = self.kind != Some(kind)
            || self.text != text
            || self.last_logged.is_none_or(|t| t.elapsed() >= REPEAT_LOG_INTERVAL);
        if !due {
            self.unlogged += 1;
            return;
        }
        if loud {
            tracing::error!(message = "Panda delivery failing.", error_code = kind, error = %reason, failures_in_a_row = self.in_a_row, not_logged = self.unlogged);
        } else {
            tracing::warn!(message = "Panda delivery failing.", error_code = kind, error = %reason, failures_in_a_row = self.in_a_row, not_logged = self.unlogged);
        }
        self.kind = Some(kind);
        self.text = text;
        self.last_logged = Some(Instant::now());
        self.unlogged = 0;
    }

    fn success(&mut self, records: usize) {
        if self.kind.is_some() {
            tracing::info!(message = "Panda delivery recovered.", failures = self.in_a_row, records);
        }
        *self = FailureLog::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_caps_double_from_min_to_max_and_reset() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(20), ms(200));
        let mut caps = Vec::new();
        for _ in 0..6 {
            caps.push(b.cap());
            let d = b.next_delay();
            assert!(d <= *caps.last().unwrap());
        }
        assert_eq!(caps, vec![ms(20), ms(40), ms(80), ms(160), ms(200), ms(200)]);
        b.reset();
        assert_eq!(b.cap(), ms(20));
    }

    #[test]
    fn backoff_does_not_overflow_after_many_failures() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        for _ in 0..200 {
            assert!(b.next_delay() <= Duration::from_secs(300));
        }
        assert_eq!(b.cap(), Duration::from_secs(300));
    }

    #[test]
    fn backoff_jitter_is_full_not_just_near_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
        let small = (0..200).filter(|_| b.next_delay() < Duration::from_secs(5)).count();
        assert!(
            small > 20,
            "full jitter spreads delays over 0..=cap, got {small}/200 below half"
        );
    }

    #[test]
    fn a_repeating_failure_is_logged_once_until_its_kind_changes() {
        let mut log = FailureLog::default();
        log.failure("transient", "connect: refused", false, false);
        let first = log.last_logged;
        log.failure("transient", "connect: refused", false, false);
        log.failure("transient", "timeout", false, false);
        assert_eq!(log.last_logged, first);
        assert_eq!(log.unlogged, 2);
        log.failure("rejected", "事件【A】不存在", true, false);
        assert_eq!(log.kind, Some("rejected"));
        assert_eq!(log.unlogged, 0);
        log.failure("rejected", "事件【A】不存在", true, false);
        assert_eq!(log.unlogged, 1);
        log.failure("rejected", "事件【B】不存在", true, false);
        assert_eq!(log.unlogged, 0, "a new server msg is a new state");
        log.success(3);
        assert_eq!(log.kind, None);
        assert_eq!(log.in_a_row, 0);
    }
}

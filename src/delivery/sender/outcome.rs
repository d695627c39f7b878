//! What the sender stores about an answer before anything more is sent: the acknowledgement of a
//! `code: 0` (the records leave the store), or a failed attempt (the records stay, with why), and the
//! delay before the next round. Refusals and burials are in `hold.rs`.
//!
//! Every such write, here and in `hold.rs`, goes through [`Sender::until_stored`], which retries it with
//! backoff (healing the store meanwhile) and lets nothing else be sent until it is stored (the folder's
//! rule, see [`super`]). On shutdown the write is given up: at most that one request is sent again at
//! the next start. Never sends a request itself.

use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};

use crate::backoff::Backoff;
use crate::config::LOGIN_BACKOFF_MAX;
use crate::delivery::panda::answer::DeliveryError;
use crate::events::record::Record;
use crate::store::Store;

use super::{wait, Sender, STORE_RETRY_MAX, STORE_RETRY_MIN};

impl Sender {
    /// Store `what` about an answer: retry `op` with backoff (healing the store meanwhile) until it
    /// succeeds; nothing else is sent meanwhile. Logged once when it fails and once when it is
    /// stored. `None` on shutdown (the write is then not stored: at most this one request is sent
    /// again at the next start).
    pub(super) async fn until_stored<T, F, Fut>(&mut self, what: &'static str, mut op: F) -> Option<T>
    where
        F: FnMut(Store) -> Fut,
        Fut: std::future::Future<Output = Result<T, crate::store::StoreError>>,
    {
        let mut backoff = Backoff::new(STORE_RETRY_MIN, STORE_RETRY_MAX);
        let mut failures = 0u64;
        loop {
            match op(self.outbox.clone()).await {
                Ok(v) => {
                    if failures > 0 {
                        tracing::info!(
                            message = "Stored after the store recovered; sending resumes.",
                            what,
                            tries = failures + 1
                        );
                    }
                    return Some(v);
                }
                Err(e) => {
                    if failures == 0 {
                        tracing::error!(message = "Cannot store the outcome of a delivery; nothing more is sent until it is stored (retrying with backoff).", what, error = %e);
                    }
                    failures += 1;
                    self.stats.store_retries.fetch_add(1, Ordering::Relaxed);
                    self.stats.set_last_error(Some(format!("cannot store {what}: {e}")));
                    self.outbox.heal().await;
                    if !wait(backoff.next_delay().max(STORE_RETRY_MIN), &self.shutdown).await {
                        tracing::warn!(message = "Shutdown while a delivery's outcome was not stored; its request may be sent again at the next start.", what);
                        return None;
                    }
                }
            }
        }
    }

    /// The server accepted `records`: remove them (stored before anything more is sent), then list
    /// them among the recent deliveries. `false` on shutdown before the removal was stored.
    pub(super) async fn delivered(&mut self, records: Vec<Record>) -> bool {
        let ids: Vec<u64> = records.iter().map(|r| r.id).collect();
        // Acknowledge right after the answer: this is what keeps the duplicate window small.
        let owned = ids.clone();
        let acked = self
            .until_stored("the removal of delivered records", |o| {
                let ids = owned.clone();
                async move { o.off_async(move |o| o.ack_blocking(&ids)).await }
            })
            .await;
        if acked.is_none() {
            return false;
        }
        tracing::info!(message = "Work orders delivered.", records = ids.len(), ids = ?ids);
        self.stats.set_last_error(None);
        let at = Utc::now()
            .with_timezone(&self.cfg.tz)
            .to_rfc3339_opts(SecondsFormat::Secs, false);
        self.stats.recent.push(records, &at);
        // Last, so that a reader who sees the count also sees the rest of this delivery.
        self.stats.delivered.fetch_add(ids.len() as u64, Ordering::Relaxed);
        self.log.success(ids.len());
        true
    }

    /// A request without a definite answer: keep the records, note why, pick the delay (`None` on
    /// shutdown before the note was stored).
    pub(super) async fn failed(&mut self, ids: &[u64], e: &DeliveryError) -> Option<Duration> {
        let reason = e.to_string();
        let owned = ids.to_vec();
        self.until_stored("a failed attempt", |o| {
            let (ids, reason) = (owned.clone(), reason.clone());
            async move { o.off_async(move |o| o.note_failure(&ids, &reason)).await }
        })
        .await?;
        self.stats.set_last_error(Some(reason.clone()));
        let login = matches!(e, DeliveryError::Login(_));
        if login {
            self.stats.login_failing.store(true, Ordering::Relaxed);
        }
        // The server's own words (a login's errMsg, a redirect's Location) are a new state when they
        // change; a network error's details are not.
        let by_text = login || matches!(e, DeliveryError::Redirect { .. });
        self.log.failure(e.error_code(), &reason, by_text, login);
        let backoff = if login {
            self.backoff.next_delay_capped(LOGIN_BACKOFF_MAX)
        } else {
            self.backoff.next_delay()
        };
        // At least what the server asked for (already bounded by the client), kept on the monotonic clock.
        Some(e.retry_after().map_or(backoff, |asked| backoff.max(asked)))
    }

    /// An answer that needed a token came: the login works (again).
    pub(super) fn login_works(&self) {
        if self.stats.login_failing.swap(false, Ordering::Relaxed) {
            tracing::info!(message = "Panda accepts the credentials again.");
        }
    }
}

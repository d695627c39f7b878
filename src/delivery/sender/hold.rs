//! The records the server refused alone: the hold list (each held record waits `retry_min·2^(n-1)` up to
//! `max_backoff`, half-jittered, while other records go on), the burial at `dead_after` refusals, and a
//! refusal without a Panda `code` while nothing shows that the path to Panda works (noted as a failed
//! attempt only, never counted against the record; the round decides which it is, see [`super`]).
//!
//! Invariants: a record leaves the store here only through
//! [`Store::bury`](crate::store::Store::bury), after `dead_after` refusals of it alone; at `max_dead`
//! dead letters it stays queued, held at the longest backoff. The hold list is in memory only: after a
//! restart a refused record is tried once more at once (alone, as its stored `rejections` says). Every
//! refusal or burial is stored ([`Sender::until_stored`]) before anything more is sent.

use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use rand::Rng;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::delivery::panda::answer::DeliveryError;
use crate::events::record::Record;
use crate::store::StoreError;

use super::{Flow, Sender};

impl Sender {
    /// The server refused `record` alone (`error` is [`DeliveryError::Rejected`] or
    /// [`DeliveryError::Refused`]): count it; hold it, or bury it at `dead_after`. `false` on shutdown
    /// before that was stored.
    pub(super) async fn refused_alone(&mut self, record: Record, error: &DeliveryError) -> bool {
        let reason = match error {
            DeliveryError::Rejected { code, msg } if msg.trim().is_empty() => format!("code {code} (no msg)"),
            DeliveryError::Rejected { msg, .. } => msg.clone(),
            other => other.to_string(),
        };
        self.stats.records_rejected.fetch_add(1, Ordering::Relaxed);
        self.stats.set_last_error(Some(error.to_string()));
        self.log.failure(error.error_code(), &error.to_string(), true, false);
        let text = error.to_string();
        let id = record.id;
        let noted = self
            .until_stored("a refusal", |o| {
                let text = text.clone();
                async move { o.off_async(move |o| o.note_rejection(id, &text)).await }
            })
            .await;
        let updated = match noted {
            None => return false,
            Some(None) => return true,
            Some(Some(r)) => r,
        };
        if updated.rejections < self.cfg.dead_after {
            tracing::info!(message = "Panda refused a record; it is held and tried again alone.", id = updated.id, meter = %updated.meter_no, event = %updated.event_name, rejections = updated.rejections, dead_after = self.cfg.dead_after, msg = %reason);
            self.hold(updated.id, updated.rejections);
            return true;
        }
        let died_at = Utc::now()
            .with_timezone(&self.cfg.tz)
            .to_rfc3339_opts(SecondsFormat::Secs, false);
        let buried = self
            .until_stored("a dead letter", |o| {
                let (reason, died_at) = (reason.clone(), died_at.clone());
                async move {
                    match o.off_async(move |o| o.bury_blocking(id, &reason, &died_at)).await {
                        Ok(()) => Ok(true),
                        // At the bound the record stays queued: not a store fault, nothing to retry.
                        Err(StoreError::DeadFull { .. }) => Ok(false),
                        Err(e) => Err(e),
                    }
                }
            })
            .await;
        match buried {
            None => return false,
            Some(true) => {
                self.dead_full = false;
                self.holds.remove(&updated.id);
                self.suspects.remove(&updated.id);
                self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                tracing::error!(message = "Panda refused a record too often; moved it to the dead letters. Fix the cause on the server, then `fieldgate outbox requeue`.", id = updated.id, meter = %updated.meter_no, event = %updated.event_name, rejections = updated.rejections, msg = %reason);
            }
            Some(false) => {
                self.stats.dead_full.fetch_add(1, Ordering::Relaxed);
                // Once per episode; the next burial that succeeds ends it.
                if !self.dead_full {
                    self.dead_full = true;
                    tracing::error!(message = "The dead letters are at outbox.max_dead: a record the server refused too often stays queued, held, and is retried at the longest backoff. Look at `fieldgate outbox dead`, fix the cause, requeue them.", id = updated.id, max_dead = self.outbox.limits().max_dead);
                }
                self.hold(updated.id, u32::MAX);
            }
        }
        true
    }

    /// Hold a record after its `rejections`-th refusal: `retry_min·2^(n-1)` capped at `max_backoff`, the
    /// delay drawn from the upper half so that there is always a real pause between tries.
    fn hold(&mut self, id: u64, rejections: u32) {
        self.hold_after(id, rejections, Duration::ZERO);
    }

    /// [`Sender::hold`], the hold starting `after` from now.
    fn hold_after(&mut self, id: u64, rejections: u32, after: Duration) {
        let cap = Backoff::cap_for(self.cfg.retry_min, self.cfg.max_backoff, rejections.saturating_sub(1));
        let cap_ns = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        let delay = Duration::from_nanos(rand::rng().random_range(cap_ns / 2..=cap_ns));
        let now = Instant::now();
        // Both parts are bounded by the configuration; saturate rather than panic all the same.
        let until = now
            .checked_add(after.saturating_add(delay))
            .unwrap_or_else(|| now + Duration::from_secs(86_400));
        self.holds.insert(id, until);
        self.stats.held.store(self.holds.len() as u64, Ordering::Relaxed);
    }

    /// A 400/403/413/422 without a `code` refused `record` alone, and nothing shows that the path to
    /// Panda lets any request through (module docs): note a failed attempt (not a refusal), hold the
    /// record past the next backoff and leave it out of the next batch, so that other records go first,
    /// and end the round.
    pub(super) async fn unproven(&mut self, record: Record, e: &DeliveryError) -> Flow {
        let id = record.id;
        let reason = e.to_string();
        let noted = self
            .until_stored("a failed attempt", |o| {
                let reason = reason.clone();
                async move { o.off_async(move |o| o.note_failure(&[id], &reason)).await }
            })
            .await;
        if noted.is_none() {
            return Flow::Stop;
        }
        self.stats.set_last_error(Some(format!(
            "{reason}; no request got through to Panda since: if every record is refused so, it is not the records but what is in front of Panda (a firewall rule, nginx client_max_body_size)"
        )));
        self.log.failure(e.error_code(), &reason, true, false);
        tracing::debug!(message = "A record was refused alone without a Panda code, and no request reached Panda since; not counted as a refusal yet.", id, meter = %record.meter_no, error = %reason);
        let delay = self.backoff.next_delay();
        self.hold_after(id, 1, delay);
        self.deferred.insert(id);
        Flow::Retry(delay)
    }
}

//! The sender: moves records from the outbox to Panda, oldest first, and removes them only once Panda
//! answered `code: 0`.
//!
//! Owns the delivery loop, its backoff, the hold list of refused records and the counters
//! ([`SenderStats`]); it never decides what an answer means (that is [`crate::delivery::panda::answer`]).
//! One rule per server answer:
//!
//! | answer | what the sender does |
//! |---|---|
//! | `code: 0` | [`Store::ack`] the request's records (removes them, flush + fsync), count them delivered |
//! | `code != 0` for a request of several records | split it in halves, and the halves again, until single records: deliver what the server accepts, find what it refuses |
//! | `code != 0` for a single record | [`Store::note_rejection`]; hold it (backoff `retry_min·2^(n-1)` up to `max_backoff`, half-jittered) while other records go on; at `dead_after` rejections [`Store::bury`] it with the server's msg |
//! | 400, 403, 413, 422 without a Panda `code` ([`DeliveryError::Refused`]: nginx's 1 MB body limit, a web application firewall, a body the server cannot take) for several records | split like `code != 0` |
//! | the same for a single record | a refusal like `code != 0` for a single record (held, dead after `dead_after`) **if Panda has answered some request (`code: 0`, or any `code`) since the start of the round in which this record was first refused so**. Otherwise nothing shows that the path to Panda works at all (a firewall rule against the gateway, a body limit below every record): only a failed attempt ([`Store::note_failure`]); the record is held past the next backoff, sent alone from then on, and the round ends so that other records go first and can prove the path. A proxy rule that refuses everything never dead-letters the queue |
//! | 408, 429, 503 ([`DeliveryError::Busy`]) | transient: records kept; the next request waits the longer of the normal backoff and the server's `Retry-After` (seconds or HTTP date, turned into a delay once when the answer arrives, bounded by `max(max_backoff, 5 min)`, see [`crate::delivery::panda::answer`]) |
//! | 3xx ([`DeliveryError::Redirect`]) | never followed (no request goes to the `Location`); transient: records kept, backoff; [`SenderStats::last_error`] (health `delivery_failing`) and the log name the `Location` and say to fix `panda.base_url` |
//! | 404, 405 and every other 4xx without a `code` | transient (the URL or request does not fit the server: `panda.base_url`, `panda.project`): records kept, never counted as a refusal |
//! | 401 | the client fetches one token for all waiters and resends once; a second 401 is a failure like a transient one |
//! | GenerateToken `errMsg` | credentials wrong: `SenderStats::login_failing` set, one error log per change of `errMsg`, backoff up to `LOGIN_BACKOFF_MAX`; records kept |
//! | anything else (5xx, HTML, empty/truncated body, timeout, refused/reset connection, DNS) | transient: records kept, full-jitter exponential backoff `retry_min` → `max_backoff`, forever |
//!
//! Every delay (backoff, holds, `Retry-After`, log intervals) is kept on the monotonic clock (tokio's
//! [`Instant`]); wall-clock time is only the `died_at` label of a dead letter. Every store read or write
//! runs on tokio's blocking threads, never on an async worker.
//!
//! What the sender writes about an answer (the ack, a failure or refusal note, a burial) is stored
//! before anything more is sent: if the store cannot take it (disk full, I/O error, a failed store
//! being reopened), the sender waits, retrying that one write with backoff, and sends nothing
//! until it is stored (`Sender::until_stored`). A store fault therefore costs at most the one
//! request whose answer is being stored, and only if the process dies meanwhile; it never loops.
//! While the store is failed, nothing is sent at all.
//!
//! Invariants:
//! - A record leaves the outbox only through [`Store::ack`] right after a `code: 0` for a request that
//!   carried it, or [`Store::bury`] after `dead_after` refusals of it alone. Nothing is deleted otherwise.
//! - Records of one meter go out in detection order: a held record blocks the later records of its meter
//!   (the outbox skips them), and within a split batch a refused record blocks its meter for the rest of
//!   the round. Once buried it blocks nothing.
//! - A record that was ever refused alone (`rejections > 0`) is sent alone, so one known-bad record does not
//!   cost a split of every batch it lands in (this also holds across restarts: the count is stored).
//! - Delivery is at-least-once: if the answer is lost, or the process dies between the answer and the
//!   ack's fsync, that one request is sent again. The window is one request.
//! - Failures are logged when their kind (or the server's text) changes and at most once a minute while
//!   they repeat; a refused login only once per change, its ongoing state is on health. Recovery is logged
//!   once.
//! - On shutdown no new request is started; a request in flight may finish within a grace period (the
//!   request timeout). If it is abandoned its records stay queued, and are sent again on the next start
//!   (the server may have applied it: a possible duplicate).
//!
//! - this file: [`SenderConfig`], [`run_sender`], the loop and its rounds (a batch, split on a refusal).
//! - `outcome.rs`: what is stored about an answer before anything more is sent (`until_stored`): the
//!   acknowledgement, a failed attempt, and the delay before the next round.
//! - `hold.rs`: the records refused alone: the hold list, burial at `dead_after`, and refusals without
//!   proof that the path to Panda works.
//! - [`stats`]: the counters ([`SenderStats`]) and their copy for the admin API
//!   ([`stats::SenderSnapshot`]).
//! - `failure_log.rs`: when a failure is logged (once per change of state, at most once a minute).
//! - `recent.rs`: the last work orders delivered (a bounded ring in [`SenderStats`], for the status page).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::FixedOffset;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::{Config, OutboxConfig, PandaConfig};
use crate::delivery::panda::answer::DeliveryError;
use crate::delivery::panda::PandaClient;
use crate::events::record::Record;
use crate::store::Store;

mod failure_log;
mod hold;
mod outcome;
pub(crate) mod recent;
pub mod stats;

use failure_log::FailureLog;
use stats::SenderStats;

/// How often an idle sender looks at the outbox without being woken.
const IDLE_TICK: Duration = Duration::from_secs(5);

/// First wait before a store write about an answer is tried again.
const STORE_RETRY_MIN: Duration = Duration::from_millis(200);
/// Longest wait between two tries of a store write about an answer.
const STORE_RETRY_MAX: Duration = Duration::from_secs(10);

/// `dead_after` when none is configured.
pub const DEFAULT_DEAD_AFTER: u32 = 5;

/// Records remembered as refused alone by a proxy without proof that the path to Panda works (see the
/// module docs); beyond this many, a new one is judged by its own round only.
const MAX_SUSPECTS: usize = 10_000;

/// What the delivery loop needs from the configuration.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// `FlowDatas` per request.
    pub max_batch: usize,
    /// First retry delay.
    pub retry_min: Duration,
    /// Largest retry delay (a refused login waits at most
    /// `LOGIN_BACKOFF_MAX`).
    pub max_backoff: Duration,
    /// How long a request in flight may finish after shutdown was asked.
    pub grace: Duration,
    /// Refusals of a record alone before it moves to the dead letters.
    pub dead_after: u32,
    /// Zone of the `died_at` time written on dead letters.
    pub tz: FixedOffset,
}

impl SenderConfig {
    /// From `[panda]` and `[outbox]`.
    fn new(panda: &PandaConfig, outbox: &OutboxConfig, tz: FixedOffset) -> SenderConfig {
        SenderConfig {
            dead_after: outbox.dead_after.max(1),
            tz,
            ..SenderConfig::from(panda.clone())
        }
    }

    /// From the whole validated configuration.
    pub fn from_config(cfg: &Config) -> SenderConfig {
        SenderConfig::new(&cfg.panda, &cfg.outbox, cfg.site.timezone)
    }
}

/// `[panda]` alone: `dead_after` = [`DEFAULT_DEAD_AFTER`], dead-letter times in +08:00.
impl From<PandaConfig> for SenderConfig {
    fn from(p: PandaConfig) -> SenderConfig {
        SenderConfig {
            max_batch: p.max_batch.max(1),
            retry_min: p.retry_min,
            max_backoff: p.max_backoff,
            grace: p.timeout,
            dead_after: DEFAULT_DEAD_AFTER,
            tz: FixedOffset::east_opt(8 * 3600).unwrap_or_else(|| unreachable!("+08:00 is a valid offset")),
        }
    }
}

/// Deliver the outbox to Panda until `shutdown`. `wake` is notified when new records were committed (or
/// dead letters requeued). `cfg` is a [`SenderConfig`], or a [`PandaConfig`] alone (default `dead_after`).
pub async fn run_sender(
    outbox: Store,
    client: PandaClient,
    cfg: impl Into<SenderConfig>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    stats: Arc<SenderStats>,
) {
    let cfg: SenderConfig = cfg.into();
    tracing::info!(message = "Sender started.", url = %client.post_url(), queued = outbox.len(), dead_after = cfg.dead_after);
    let mut sender = Sender {
        backoff: Backoff::new(cfg.retry_min, cfg.max_backoff),
        outbox,
        client,
        cfg,
        shutdown,
        stats,
        holds: HashMap::new(),
        suspects: HashMap::new(),
        deferred: HashSet::new(),
        panda_answered_at: None,
        log: FailureLog::default(),
        store_backoff: Backoff::new(STORE_RETRY_MIN, STORE_RETRY_MAX),
        dead_full: false,
    };
    sender.run(&wake).await;
    tracing::info!(message = "Sender stopped.", queued = sender.outbox.len());
}

/// How a round (one batch, split as needed) ended.
enum Flow {
    /// Every request got a definite answer (accepted or refused).
    Answered,
    /// A request failed without a definite answer: wait this long before the next round.
    Retry(Duration),
    /// Shutdown: stop now.
    Stop,
}

struct Sender {
    outbox: Store,
    client: PandaClient,
    cfg: SenderConfig,
    shutdown: CancellationToken,
    stats: Arc<SenderStats>,
    backoff: Backoff,
    /// Records refused alone → not before this instant. In memory only: after a restart a refused record
    /// is tried once more at once (alone, as its stored `rejections` says).
    holds: HashMap<u64, Instant>,
    /// Records refused alone with 400/403/413/422 and no `code` → the start of the round of the first such
    /// refusal. Such a refusal counts against the record only if Panda answered something since then
    /// ([`Sender::panda_answered_at`]). In memory only; these records are sent alone. At most
    /// [`MAX_SUSPECTS`].
    suspects: HashMap<u64, Instant>,
    /// Records left out of the next batch whatever their hold (a record refused without proof, so that
    /// other records go first and can prove the path to Panda); cleared once that batch is read.
    deferred: HashSet<u64>,
    /// When Panda itself last answered a request (`code: 0` or any other `code`): proof that the path
    /// to it (proxies, firewalls, body limits) lets requests through.
    panda_answered_at: Option<Instant>,
    log: FailureLog,
    /// Waits while the store is failed.
    store_backoff: Backoff,
    /// A burial was refused at `max_dead` and none succeeded since (logged once).
    dead_full: bool,
}

// === impl Sender ===

impl Sender {
    async fn run(&mut self, wake: &Notify) {
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            if !self.outbox.heal().await {
                // Nothing is sent while the store is failed: no answer could be stored.
                if !wait(self.store_backoff.next_delay().max(STORE_RETRY_MIN), &self.shutdown).await {
                    return;
                }
                continue;
            }
            self.store_backoff.reset();
            // Register for a wake-up before looking, so a commit between the look and the wait is not missed.
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            let now = Instant::now();
            self.holds.retain(|_, until| *until > now);
            self.stats.held.store(self.holds.len() as u64, Ordering::Relaxed);
            let mut held: HashSet<u64> = self.holds.keys().copied().collect();
            let deferred = !self.deferred.is_empty();
            held.extend(self.deferred.drain());
            let max_batch = self.cfg.max_batch;
            let batch = match self
                .outbox
                .off_async(move |o| o.next_batch_where(max_batch, |r| held.contains(&r.id)))
                .await
            {
                Ok(b) => b,
                Err(e) => {
                    self.log.failure("outbox", &e.to_string(), false, false);
                    self.stats.set_last_error(Some(e.to_string()));
                    if !wait(self.backoff.next_delay(), &self.shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            if batch.is_empty() {
                if deferred {
                    // Nothing else to send: the deferred records may go now (their holds permitting).
                    continue;
                }
                let idle = self
                    .holds
                    .values()
                    .min()
                    .map_or(IDLE_TICK, |t| t.saturating_duration_since(now).min(IDLE_TICK));
                tokio::select! {
                    _ = &mut notified => {}
                    _ = tokio::time::sleep(idle) => {}
                    _ = self.shutdown.cancelled() => return,
                }
                continue;
            }
            let suspects = &self.suspects;
            let batch = alone_if_suspect(batch, |r| r.rejections > 0 || suspects.contains_key(&r.id));
            match self.round(batch).await {
                Flow::Answered => self.backoff.reset(),
                Flow::Retry(delay) => {
                    tracing::debug!(message = "Retrying after a delay.", delay_ms = delay.as_millis() as u64);
                    if !wait(delay, &self.shutdown).await {
                        return;
                    }
                }
                Flow::Stop => return,
            }
        }
    }

    /// Send one batch; on a refusal split it until single records.
    async fn round(&mut self, batch: Vec<Record>) -> Flow {
        let Some(event) = batch.first().map(|r| r.event_name.clone()) else {
            return Flow::Answered;
        };
        let started = Instant::now();
        let mut pending: VecDeque<Vec<Record>> = VecDeque::from([batch]);
        // Meters with a record refused in this round: their later records wait.
        let mut blocked: HashSet<String> = HashSet::new();
        while let Some(mut part) = pending.pop_front() {
            if self.shutdown.is_cancelled() {
                return Flow::Stop;
            }
            part.retain(|r| !blocked.contains(&r.meter_no));
            if part.is_empty() {
                continue;
            }
            let ids: Vec<u64> = part.iter().map(|r| r.id).collect();
            let Some(outcome) = self.post(&event, &part).await else {
                return Flow::Stop;
            };
            self.stats.count(&outcome);
            self.stats
                .token_refreshes
                .store(self.client.token_refreshes(), Ordering::Relaxed);
            if matches!(outcome, Ok(()) | Err(DeliveryError::Rejected { .. })) {
                self.panda_answered_at = Some(Instant::now());
            }
            if !matches!(
                outcome,
                Err(DeliveryError::Login(_)
                    | DeliveryError::Transient(_)
                    | DeliveryError::Busy { .. }
                    | DeliveryError::Redirect { .. })
            ) {
                self.login_works();
            }
            match outcome {
                Ok(()) => {
                    for id in &ids {
                        self.suspects.remove(id);
                    }
                    if !self.delivered(part).await {
                        return Flow::Stop;
                    }
                }
                Err(e @ (DeliveryError::Rejected { .. } | DeliveryError::Refused { .. })) if part.len() > 1 => {
                    tracing::debug!(message = "The request was refused; splitting it to find the refused records.", records = part.len(), error = %e);
                    let right = part.split_off(part.len() / 2);
                    pending.push_front(right);
                    pending.push_front(part);
                }
                Err(e @ DeliveryError::Rejected { .. }) => {
                    if let Some(record) = part.pop() {
                        blocked.insert(record.meter_no.clone());
                        if !self.refused_alone(record, &e).await {
                            return Flow::Stop;
                        }
                    }
                }
                Err(e @ DeliveryError::Refused { .. }) => {
                    let Some(record) = part.pop() else { continue };
                    blocked.insert(record.meter_no.clone());
                    let since = match self.suspects.get(&record.id) {
                        Some(t) => *t,
                        None => {
                            if self.suspects.len() < MAX_SUSPECTS {
                                self.suspects.insert(record.id, started);
                            }
                            started
                        }
                    };
                    if self.panda_answered_at.is_some_and(|t| t >= since) {
                        if !self.refused_alone(record, &e).await {
                            return Flow::Stop;
                        }
                    } else {
                        return self.unproven(record, &e).await;
                    }
                }
                Err(e) => {
                    let mut unanswered = ids;
                    unanswered.extend(
                        pending
                            .iter()
                            .flatten()
                            .filter(|r| !blocked.contains(&r.meter_no))
                            .map(|r| r.id),
                    );
                    return match self.failed(&unanswered, &e).await {
                        Some(delay) => Flow::Retry(delay),
                        None => Flow::Stop,
                    };
                }
            }
        }
        Flow::Answered
    }

    /// Post, letting a request in flight finish within the grace period on shutdown; `None` if abandoned.
    async fn post(&self, event: &str, records: &[Record]) -> Option<Result<(), DeliveryError>> {
        let post = self.client.post(event, records);
        tokio::pin!(post);
        tokio::select! {
            r = &mut post => Some(r),
            _ = self.shutdown.cancelled() => match tokio::time::timeout(self.cfg.grace, &mut post).await {
                Ok(r) => Some(r),
                Err(_) => {
                    tracing::warn!(
                        message = "Shutdown abandoned a request in flight; its records stay queued and are sent again on the next start (the server may have applied it).",
                        records = records.len(),
                        event = %event
                    );
                    None
                }
            },
        }
    }
}

/// A record refused alone before (`suspect`) goes alone again; otherwise the batch stops before the first
/// such record (cutting a suffix keeps every meter's order).
fn alone_if_suspect(mut batch: Vec<Record>, suspect: impl Fn(&Record) -> bool) -> Vec<Record> {
    match batch.iter().position(suspect) {
        Some(0) => batch.truncate(1),
        Some(i) => batch.truncate(i),
        None => {}
    }
    batch
}

/// Sleep `delay` unless shutdown comes first; `false` on shutdown.
async fn wait(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = shutdown.cancelled() => false,
    }
}

//! The sender: moves records from the outbox to Panda, oldest first, and removes them only once Panda
//! answered `code: 0`.
//!
//! Owns the delivery loop, its backoff, the hold list of refused records and the counters
//! ([`SenderStats`]). One rule per server answer:
//!
//! | answer | what the sender does |
//! |---|---|
//! | `code: 0` | [`Store::ack`] the request's records (removes them, flush + fsync), count them delivered |
//! | `code != 0` for a request of several records | split it in halves, and the halves again, until single records: deliver what the server accepts, find what it refuses |
//! | `code != 0` for a single record | [`Store::note_rejection`]; hold it (backoff `retry_min·2^(n-1)` up to `max_backoff`, half-jittered) while other records go on; at `dead_after` rejections [`Store::bury`] it with the server's msg |
//! | 400, 403, 413, 422 without a Panda `code` ([`DeliveryError::Refused`]: nginx's 1 MB body limit, a web application firewall, a body the server cannot take) for several records | split like `code != 0` |
//! | the same for a single record | a refusal like `code != 0` for a single record (held, dead after `dead_after`) **if Panda has answered some request (`code: 0`, or any `code`) since the start of the round in which this record was first refused so**. Otherwise nothing shows that the path to Panda works at all (a firewall rule against the gateway, a body limit below every record): only a failed attempt ([`Store::note_failure`]); the record is held past the next backoff, sent alone from then on, and the round ends so that other records go first and can prove the path. A proxy rule that refuses everything never dead-letters the queue |
//! | 408, 429, 503 ([`DeliveryError::Busy`]) | transient: records kept; the next request waits the longer of the normal backoff and the server's `Retry-After` (seconds or HTTP date, turned into a delay once when the answer arrives, bounded by `max(max_backoff, 5 min)`, see [`crate::delivery::panda::retry_after`]) |
//! | 3xx ([`DeliveryError::Redirect`]) | never followed (no request goes to the `Location`); transient: records kept, backoff; [`SenderStats::last_error`] (health `delivery_failing`) and the log name the `Location` and say to fix `panda.base_url` |
//! | 404, 405 and every other 4xx without a `code` | transient (the URL or request does not fit the server: `panda.base_url`, `panda.project`): records kept, never counted as a refusal |
//! | 401 | the client fetches one token for all waiters and resends once; a second 401 is a failure like a transient one |
//! | GenerateToken `errMsg` | credentials wrong: [`SenderStats::login_failing`] set, one error log per change of `errMsg`, backoff up to [`LOGIN_BACKOFF_MAX`]; records kept |
//! | anything else (5xx, HTML, empty/truncated body, timeout, refused/reset connection, DNS) | transient: records kept, full-jitter exponential backoff `retry_min` → `max_backoff`, forever |
//!
//! Every delay (backoff, holds, `Retry-After`, log intervals) is kept on the monotonic clock (tokio's
//! [`Instant`]); wall-clock time is only the `died_at` label of a dead letter. Every store read or write
//! runs on tokio's blocking threads, never on an async worker.
//!
//! What the sender writes about an answer (the ack, a failure or refusal note, a burial) is stored
//! before anything more is sent: if the store cannot take it (disk full, I/O error, a failed store
//! being reopened), the sender waits, retrying that one write with backoff, and sends nothing
//! until it is stored ([`Sender::until_stored`]). A store fault therefore costs at most the one
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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{FixedOffset, SecondsFormat, Utc};

use crate::backoff::Backoff;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, OutboxConfig, PandaConfig, LOGIN_BACKOFF_MAX};
use crate::delivery::panda::{DeliveryError, PandaClient};
use crate::events::record::Record;
use crate::store::{Store, StoreError};

/// How often an idle sender looks at the outbox without being woken.
pub const IDLE_TICK: Duration = Duration::from_secs(5);

/// A repeating failure of the same kind is logged at most this often.
pub const REPEAT_LOG_INTERVAL: Duration = Duration::from_secs(60);

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
    /// Largest retry delay (a refused login waits at most [`LOGIN_BACKOFF_MAX`]).
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
    pub fn new(panda: &PandaConfig, outbox: &OutboxConfig, tz: FixedOffset) -> SenderConfig {
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

/// Counters of the sender, shared with the admin API and tests.
#[derive(Debug, Default)]
pub struct SenderStats {
    /// Records delivered (acknowledged by `code: 0` and removed from the outbox).
    pub delivered: AtomicU64,
    /// Requests answered `code: 0`.
    pub ok: AtomicU64,
    /// Requests refused: `code != 0`, or 400/403/413/422 without a `code` (each half of a split batch
    /// counts; the latter also in [`SenderStats::http_refused`]).
    pub rejected: AtomicU64,
    /// Refusals of a record sent alone (each refusal counts; at `dead_after` of them the record is dead).
    pub records_rejected: AtomicU64,
    /// Requests without a usable answer (network, timeout, 5xx, HTML, non-JSON, 3xx, 408/429/503, other
    /// 4xx).
    pub transient: AtomicU64,
    /// Of [`SenderStats::transient`]: answers 408, 429 or 503 (the server asked to wait).
    pub throttled: AtomicU64,
    /// Of [`SenderStats::transient`]: 3xx answers (never followed; `panda.base_url` is wrong).
    pub redirects: AtomicU64,
    /// Of [`SenderStats::rejected`]: 400/403/413/422 answers without a Panda `code`.
    pub http_refused: AtomicU64,
    /// Requests answered 401 even with a fresh token.
    pub unauthorized: AtomicU64,
    /// Requests not sent because GenerateToken failed.
    pub login_failed: AtomicU64,
    /// Tokens fetched (successful GenerateToken calls).
    pub token_refreshes: AtomicU64,
    /// Failed requests since the last success (0 while delivering).
    pub failures_in_a_row: AtomicU64,
    /// Records moved to the dead letters by this sender.
    pub dead_lettered: AtomicU64,
    /// Records on hold after the server refused them alone (gauge).
    pub held: AtomicU64,
    /// Store writes about an answer that failed and were retried (nothing was sent meanwhile).
    pub store_retries: AtomicU64,
    /// Burials refused because `max_dead` dead letters are kept (the record stays queued, held).
    pub dead_full: AtomicU64,
    /// GenerateToken refuses the configured credentials (`errMsg`): a configuration fault, health
    /// `critical`. Cleared by the next answer that needed a token.
    pub login_failing: AtomicBool,
    /// The last delivery error, cleared on success.
    pub last_error: Mutex<Option<String>>,
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
    /// See [`SenderStats::records_rejected`].
    #[serde(default)]
    pub records_rejected: u64,
    /// See [`SenderStats::transient`].
    pub transient: u64,
    /// See [`SenderStats::throttled`].
    #[serde(default)]
    pub throttled: u64,
    /// See [`SenderStats::redirects`].
    #[serde(default)]
    pub redirects: u64,
    /// See [`SenderStats::http_refused`].
    #[serde(default)]
    pub http_refused: u64,
    /// See [`SenderStats::unauthorized`].
    pub unauthorized: u64,
    /// See [`SenderStats::login_failed`].
    pub login_failed: u64,
    /// See [`SenderStats::token_refreshes`].
    pub token_refreshes: u64,
    /// See [`SenderStats::failures_in_a_row`].
    pub failures_in_a_row: u64,
    /// See [`SenderStats::dead_lettered`].
    pub dead_lettered: u64,
    /// See [`SenderStats::held`].
    pub held: u64,
    /// See [`SenderStats::store_retries`].
    #[serde(default)]
    pub store_retries: u64,
    /// See [`SenderStats::dead_full`].
    #[serde(default)]
    pub dead_full: u64,
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

    fn set_last_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = e;
    }

    fn count(&self, outcome: &Result<(), DeliveryError>) {
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
                    if !self.delivered(&ids).await {
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

    /// Store `what` about an answer: retry `op` with backoff (healing the store meanwhile) until it
    /// succeeds; nothing else is sent meanwhile. Logged once when it fails and once when it is
    /// stored. `None` on shutdown (the write is then not stored: at most this one request is sent
    /// again at the next start).
    async fn until_stored<T, F, Fut>(&mut self, what: &'static str, mut op: F) -> Option<T>
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

    /// The server accepted `ids`: remove them (stored before anything more is sent). `false` on
    /// shutdown before the removal was stored.
    async fn delivered(&mut self, ids: &[u64]) -> bool {
        // Acknowledge right after the answer: this is what keeps the duplicate window small.
        let owned = ids.to_vec();
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
        // Last, so that a reader who sees the count also sees the rest of this delivery.
        self.stats.delivered.fetch_add(ids.len() as u64, Ordering::Relaxed);
        self.log.success(ids.len());
        true
    }

    /// The server refused `record` alone (`error` is [`DeliveryError::Rejected`] or
    /// [`DeliveryError::Refused`]): count it; hold it, or bury it at `dead_after`. `false` on shutdown
    /// before that was stored.
    async fn refused_alone(&mut self, record: Record, error: &DeliveryError) -> bool {
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
    async fn unproven(&mut self, record: Record, e: &DeliveryError) -> Flow {
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

    /// A request without a definite answer: keep the records, note why, pick the delay (`None` on
    /// shutdown before the note was stored).
    async fn failed(&mut self, ids: &[u64], e: &DeliveryError) -> Option<Duration> {
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
    fn login_works(&self) {
        if self.stats.login_failing.swap(false, Ordering::Relaxed) {
            tracing::info!(message = "Panda accepts the credentials again.");
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
        // A refused login (loud) is a configuration fault: once per change; health carries it meanwhile.
        let due = self.kind != Some(kind)
            || self.text != text
            || (!loud && self.last_logged.is_none_or(|t| t.elapsed() >= REPEAT_LOG_INTERVAL));
        if !due {
            self.unlogged += 1;
            return;
        }
        if loud {
            tracing::error!(message = "Panda refuses the login: check panda.username and the password in the configuration. Every record is kept; the login is retried with a backoff of up to 5 minutes.", error_code = kind, error = %reason, failures_in_a_row = self.in_a_row, not_logged = self.unlogged);
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

//! The admin HTTP API: health and the outbox of the running daemon (sled lets one process open the
//! database, so while the daemon runs this is the only way in).
//!
//! Routes (JSON unless said otherwise):
//! - `GET /healthz`: `ok` / `degraded` / `critical` with the reasons; HTTP 200, or 503 when critical.
//! - `GET /metrics`: Prometheus text format ([`crate::ops::metrics`]).
//! - `GET /buses`: each bus: up, requests, errors by kind, reconnects, last round time.
//! - `GET /meters`: each meter: bus, unit, current state, readings, last change, online, last sample age.
//! - `GET /outbox[?limit=N]`: counts, bounds, refused commits, free disk space, the state of the store,
//!   oldest age and the oldest queued records.
//! - `GET /outbox/dead[?limit=N&after=ID]`: one page of dead letters (id, meter, event, msg, attempts, …),
//!   oldest first: at most `limit` (default [`PAGE_DEFAULT`] = 100, at most [`PAGE_MAX`] = 1000) with ids
//!   after `after`; the next page starts after the last id of this one, an answer shorter than `limit`
//!   is the last page.
//! - `GET /outbox/corrupt[?limit=N]`: entries of the state database that could not be read and were set
//!   aside ([`CorruptEntry`]: what it was, size, why, first bytes); same `limit` default and bound.
//! - `POST /outbox/requeue` with `{"id": N}` or `{"all": true}`: dead letters back into the outbox.
//!
//! No request loads an unbounded list: every listing has a bound, and health and `/metrics` take their
//! numbers from the store's counts (dead letters, set-aside entries) without reading the entries. A
//! failed store (waiting to be opened again, see [`crate::store::fault`]) answers the routes that read
//! it with HTTP 503 and the error in words; `/healthz` and `/metrics` still answer (`store_failed`).
//!
//! It listens on loopback unless `[admin] allow_remote = true` ([`check_listen`]): there is no
//! authentication, and requeue changes what is delivered. It never opens the database itself: it works on
//! the daemon's [`Store`] handle, and on the buses' counters and the live meter view ([`FieldView`]) when
//! the daemon gives them. [`router`] returns a plain axum `Router` so more views can be merged in;
//! [`HealthCheck`] lets other parts add health findings.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{AdminConfig, Config, Transport};
use crate::delivery::sender::stats::{SenderSnapshot, SenderStats};
use crate::events::record::Record;
use crate::modbus::stats::BusStats;
use crate::recorder::live::Live;
use crate::store::fault::StoreFault;
use crate::store::{CorruptEntry, DeadLetter, Store, StoreError};

/// How many of the oldest queued records `GET /outbox` shows.
pub const OLDEST_SHOWN: usize = 20;

/// At this share of either bound the outbox is reported `degraded` (filling up).
pub const FILL_WARN_PERCENT: u64 = 80;

/// Most records `GET /outbox?limit=N` lists.
pub const LIST_MAX: usize = 10_000;

/// Entries `GET /outbox/dead` and `GET /outbox/corrupt` list when no `limit` is given.
pub const PAGE_DEFAULT: usize = 100;

/// Most entries one `GET /outbox/dead` or `GET /outbox/corrupt` lists, whatever `limit` asks.
pub const PAGE_MAX: usize = 1000;

/// A queued record older than this makes health `degraded` (`oldest_record_age`): deliveries are stuck.
pub const OLDEST_WARN: Duration = Duration::from_secs(3600);

/// Offline meters named in the `meters_offline` finding; more are counted, not named.
const OFFLINE_NAMED: usize = 10;

/// Why the admin API cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A non-loopback address without `allow_remote`.
    #[error("admin.listen {0} is not a loopback address; the admin API has no authentication: use 127.0.0.1, or set [admin] allow_remote = true behind a firewall")]
    NotLoopback(SocketAddr),
    /// The address could not be bound.
    #[error("cannot listen on {addr} for the admin API: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

impl AdminError {
    /// A bounded label for metrics.
    pub fn error_code(&self) -> &'static str {
        match self {
            AdminError::NotLoopback(_) => "not_loopback",
            AdminError::Bind { .. } => "bind",
        }
    }
}

/// Health levels, ordered: the worst finding wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Working.
    Ok,
    /// Working, but something needs a look (failing deliveries, dead letters, outbox filling).
    Degraded,
    /// Losing the ability to do the job (login refused, outbox full, disk full, store failed).
    Critical,
}

/// One reason for a health level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// How bad.
    pub status: Status,
    /// A bounded label (`login_failing`, `outbox_full`, …).
    pub code: String,
    /// What it means and what to do, in words.
    pub message: String,
}

/// Something that contributes health findings (buses, meters, …), added with [`AdminState::with_check`].
pub trait HealthCheck: Send + Sync {
    /// The current findings; empty when all is well.
    fn findings(&self) -> Vec<Finding>;
}

/// The field side as the admin API sees it: names from the configuration, the live meter view and the
/// bus counters. Without it (e.g. an outbox-only admin in tests) `/buses` and `/meters` are empty and
/// health has no bus or meter findings.
#[derive(Clone)]
pub struct FieldView {
    /// The configuration the buses and the station run with (bus and meter names, units, reading fields).
    pub cfg: Arc<Config>,
    /// Live meter view, indexed like `cfg.meters`.
    pub live: Arc<Live>,
    /// Bus counters, indexed like `cfg.buses`.
    pub buses: Vec<Arc<BusStats>>,
}

/// What the admin API serves from. Cheap to clone.
#[derive(Clone)]
pub struct AdminState {
    /// The daemon's store.
    pub outbox: Store,
    /// The sender's counters.
    pub sender: Arc<SenderStats>,
    /// `site.name`.
    pub site: String,
    /// Notified after a requeue, so the sender does not wait for its idle tick.
    pub wake: Option<Arc<Notify>>,
    /// More health sources.
    pub checks: Vec<Arc<dyn HealthCheck>>,
    /// Buses and meters, when the daemon runs them. Shared with the daemon, which swaps it on reload.
    pub field: Option<SharedField>,
}

/// A [`FieldView`] the daemon replaces when a reload changes buses or meters.
pub type SharedField = Arc<std::sync::RwLock<FieldView>>;

impl AdminState {
    /// State with the outbox, the sender's counters and the site name.
    pub fn new(outbox: Store, sender: Arc<SenderStats>, site: impl Into<String>) -> AdminState {
        AdminState {
            outbox,
            sender,
            site: site.into(),
            wake: None,
            checks: Vec::new(),
            field: None,
        }
    }

    /// Serve buses and meters too (`/buses`, `/meters`, their metrics and health findings).
    pub fn with_field(mut self, cfg: Arc<Config>, live: Arc<Live>, buses: Vec<Arc<BusStats>>) -> AdminState {
        self.field = Some(Arc::new(std::sync::RwLock::new(FieldView { cfg, live, buses })));
        self
    }

    /// Serve buses and meters from a view the daemon keeps current across reloads.
    pub fn with_shared_field(mut self, field: SharedField) -> AdminState {
        self.field = Some(field);
        self
    }

    /// The current field view (a copy of its handles).
    pub fn field_view(&self) -> Option<FieldView> {
        self.field
            .as_ref()
            .map(|f| f.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Wake the sender with this after a requeue.
    pub fn with_wake(mut self, wake: Arc<Notify>) -> AdminState {
        self.wake = Some(wake);
        self
    }

    /// Add a health source.
    pub fn with_check(mut self, check: Arc<dyn HealthCheck>) -> AdminState {
        self.checks.push(check);
        self
    }
}

/// `GET /healthz`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    /// The worst of `reasons`, `ok` when there are none.
    pub status: Status,
    /// `site.name`.
    pub site: String,
    /// Every finding, worst first.
    pub reasons: Vec<Finding>,
    /// Store counts.
    pub outbox: OutboxCounts,
    /// Sender counters.
    pub sender: SenderSnapshot,
    /// The system clock: whether the kernel says it is synchronized, and the time it shows.
    #[serde(default)]
    pub clock: ClockView,
}

/// What `/healthz` says of the system clock. Not a reason for `degraded`: many boards have no NTP,
/// and nothing the gateway decides depends on it; it explains odd detection times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockView {
    /// What the kernel says (`adjtimex`).
    pub sync: crate::clock::ClockSync,
    /// The time the gateway labels with now (RFC 3339, UTC).
    pub now: String,
}

impl Default for ClockView {
    fn default() -> ClockView {
        ClockView {
            sync: crate::clock::ClockSync::Unknown,
            now: String::new(),
        }
    }
}

/// Store counts and bounds, free disk space and the state of the store. Fields added after the first
/// release default when absent, so a command line of this release reads an older daemon's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxCounts {
    /// Records queued.
    pub records: u64,
    /// Bytes of queued records.
    pub bytes: u64,
    /// Bound.
    pub max_records: u64,
    /// Bound.
    pub max_bytes: u64,
    /// Commits refused because the outbox was full, since start.
    pub refused: u64,
    /// The last commit was refused (outbox full or disk below `min_free`) and nothing was removed
    /// since: new states are not recorded.
    pub refusing: bool,
    /// Dead letters.
    pub dead: u64,
    /// Age of the oldest queued record (from its `detected_at`), in seconds; `None` when nothing is
    /// queued or the store cannot be read (failed).
    #[serde(default)]
    pub oldest_age_seconds: Option<u64>,
    /// Free bytes on the state directory's file system (for an unprivileged writer) at the last look;
    /// `None` when unknown.
    #[serde(default)]
    pub free_bytes: Option<u64>,
    /// `[outbox] min_free`: below this many free bytes no new state or record is committed.
    #[serde(default)]
    pub min_free: u64,
    /// Free space is below `min_free` now: new valve states are not recorded.
    #[serde(default)]
    pub disk_low: bool,
    /// Commits refused because free space was below `min_free`, since start.
    #[serde(default)]
    pub refused_space: u64,
    /// `[outbox] max_dead`: at it, records the server refuses stay queued (0: not known).
    #[serde(default)]
    pub max_dead: u64,
    /// Records not moved to the dead letters because `max_dead` were kept, since start.
    #[serde(default)]
    pub dead_refused: u64,
    /// Entries of the state database set aside because they could not be read.
    #[serde(default)]
    pub corrupt: u64,
    /// Why the state database is failed and how its reopening goes; `None` while it works.
    #[serde(default)]
    pub store: Option<StoreFault>,
    /// Times the state database failed, since start.
    #[serde(default)]
    pub store_failures: u64,
    /// Times it was opened again after a failure, since start.
    #[serde(default)]
    pub store_reopens: u64,
}

/// `GET /outbox`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutboxView {
    /// Counts and bounds.
    #[serde(flatten)]
    pub counts: OutboxCounts,
    /// The oldest queued records (at most [`OLDEST_SHOWN`]).
    pub oldest: Vec<RecordView>,
}

/// A queued record, without its BizData.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordView {
    /// Record id.
    pub id: u64,
    /// Meter.
    pub meter_no: String,
    /// `eventName`.
    pub event_name: String,
    /// When detected.
    pub detected_at: String,
    /// Failed attempts.
    pub attempts: u32,
    /// Refusals of it alone.
    pub rejections: u32,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

impl From<&Record> for RecordView {
    fn from(r: &Record) -> RecordView {
        RecordView {
            id: r.id,
            meter_no: r.meter_no.clone(),
            event_name: r.event_name.clone(),
            detected_at: r.detected_at.clone(),
            attempts: r.attempts,
            rejections: r.rejections,
            last_error: r.last_error.clone(),
        }
    }
}

/// A dead letter as listed by `GET /outbox/dead` and `fieldgate outbox dead`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadView {
    /// Record id (use it to requeue).
    pub id: u64,
    /// Meter.
    pub meter_no: String,
    /// `eventName`.
    pub event_name: String,
    /// The server's `msg`.
    pub msg: String,
    /// Failed attempts, all reasons.
    pub attempts: u32,
    /// Refusals of it alone.
    pub rejections: u32,
    /// When detected.
    pub detected_at: String,
    /// When it was moved to the dead letters.
    pub died_at: String,
}

impl From<&DeadLetter> for DeadView {
    fn from(d: &DeadLetter) -> DeadView {
        DeadView {
            id: d.record.id,
            meter_no: d.record.meter_no.clone(),
            event_name: d.record.event_name.clone(),
            msg: d.reason.clone(),
            attempts: d.record.attempts,
            rejections: d.record.rejections,
            detected_at: d.record.detected_at.clone(),
            died_at: d.died_at.clone(),
        }
    }
}

/// `POST /outbox/requeue` body: `{"id": N}` or `{"all": true}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequeueRequest {
    /// One dead letter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// All of them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
}

/// `POST /outbox/requeue` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequeueAnswer {
    /// Records moved back into the outbox.
    pub requeued: usize,
}

/// `GET /outbox?limit=N`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ListQuery {
    /// Oldest records to list (default [`OLDEST_SHOWN`], at most [`LIST_MAX`]).
    pub limit: Option<usize>,
}

/// `GET /outbox/dead?limit=N&after=ID` and `GET /outbox/corrupt?limit=N`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PageQuery {
    /// Entries to list (default [`PAGE_DEFAULT`], at most [`PAGE_MAX`]).
    pub limit: Option<usize>,
    /// Dead letters only: list those with ids after this one (the last id of the page before).
    pub after: Option<u64>,
}

impl PageQuery {
    /// The page size asked for, within [`PAGE_MAX`].
    pub fn limit(&self) -> usize {
        self.limit.unwrap_or(PAGE_DEFAULT).min(PAGE_MAX)
    }
}

/// One bus in `GET /buses`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BusView {
    /// `[[bus]] name`.
    pub name: String,
    /// `tcp`, `serial` or `rtu_over_tcp`.
    pub transport: String,
    /// Address or device path.
    pub endpoint: String,
    /// The port or connection opened the last time it was tried.
    pub up: bool,
    /// Whether an open was tried at all yet (`up` means nothing before).
    pub tried: bool,
    /// Meters on the bus.
    pub meters: usize,
    /// Of them, online.
    pub meters_online: usize,
    /// Requests sent.
    pub requests: u64,
    /// Failed requests, all kinds.
    pub errors: u64,
    /// Exception answers.
    pub exceptions: u64,
    /// No answer within the timeout.
    pub timeouts: u64,
    /// Answers that did not fit the request.
    pub protocol_errors: u64,
    /// Transport failures.
    pub transport_errors: u64,
    /// Opens after the first.
    pub reconnects: u64,
    /// Failed opens.
    pub connect_failures: u64,
    /// Rounds completed.
    pub rounds: u64,
    /// Duration of the last round, seconds.
    pub last_round_seconds: f64,
}

/// One meter in `GET /meters`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeterInfo {
    /// `meter_no`.
    pub meter_no: String,
    /// Its bus's name.
    pub bus: String,
    /// Modbus unit id.
    pub unit: u8,
    /// Answering (false after `offline_after` failures in a row).
    pub online: bool,
    /// The valve label of the latest read; `None` before the first.
    pub state: Option<String>,
    /// The accepted (stored) valve label; it differs from `state` while a change waits for `confirm`.
    pub stored_state: Option<String>,
    /// When the stored state was accepted (RFC 3339): the last change, or the baseline.
    pub last_change: Option<String>,
    /// Reading field → latest value, in configuration order.
    pub readings: serde_json::Map<String, serde_json::Value>,
    /// Seconds since the latest answer; `None` before the first.
    pub last_sample_age_seconds: Option<f64>,
    /// Answer time of the meter's last answered request, ms: from handing the request to the line to
    /// its decoded answer (`crate::modbus::stats` module doc); `None` before the first answer.
    #[serde(default)]
    pub answer_ms: Option<f64>,
    /// The slowest of its last `crate::modbus::stats::ANSWER_WINDOW` answer times, ms.
    #[serde(default)]
    pub answer_max_ms: Option<f64>,
    /// The bus `timeout`, ms.
    #[serde(default)]
    pub timeout_ms: Option<f64>,
    /// Its requests not answered within the timeout (since the bus task started: start or reload).
    #[serde(default)]
    pub timeouts: u64,
    /// Answers that came after the timeout; seen on RTU only, while the link waits out its guard.
    #[serde(default)]
    pub late_answers: u64,
    /// When the last late answer came, ms after its request.
    #[serde(default)]
    pub late_answer_ms: Option<f64>,
    /// While offline: its current retry period, seconds (one poll round at first, growing to
    /// `offline_retry`).
    #[serde(default)]
    pub retry_every_seconds: Option<f64>,
    /// Advice when answers come near or after the timeout (raise the bus `timeout`).
    #[serde(default)]
    pub hint: Option<String>,
}

/// Refuse a non-loopback address unless `allow_remote`.
pub fn check_listen(addr: SocketAddr, allow_remote: bool) -> Result<(), AdminError> {
    if addr.ip().is_loopback() || allow_remote {
        Ok(())
    } else {
        Err(AdminError::NotLoopback(addr))
    }
}

/// Check `[admin]` and bind its address.
pub async fn bind(cfg: &AdminConfig) -> Result<TcpListener, AdminError> {
    check_listen(cfg.listen, cfg.allow_remote)?;
    TcpListener::bind(cfg.listen).await.map_err(|source| AdminError::Bind {
        addr: cfg.listen,
        source,
    })
}

/// The admin routes over `state`; merge more routes into it before serving if needed.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(get_health))
        .route("/metrics", get(get_metrics))
        .route("/buses", get(get_buses))
        .route("/meters", get(get_meters))
        .route("/outbox", get(get_outbox))
        .route("/outbox/dead", get(get_dead))
        .route("/outbox/corrupt", get(get_corrupt))
        .route("/outbox/requeue", post(post_requeue))
        .with_state(state)
}

/// Serve [`router`]`(state)` on `listener` until `shutdown`.
pub async fn serve_admin(listener: TcpListener, state: AdminState, shutdown: CancellationToken) -> std::io::Result<()> {
    serve_router(listener, router(state), shutdown).await
}

/// Serve any router (e.g. [`router`] with more views merged in) until `shutdown`.
pub async fn serve_router(listener: TcpListener, router: Router, shutdown: CancellationToken) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(message = "Admin API listening.", addr = %addr);
    }
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// The health of the gateway as the outbox, the sender and the extra checks see it.
pub fn health(state: &AdminState) -> Health {
    let counts = outbox_counts(&state.outbox);
    let sender = state.sender.snapshot();
    let mut reasons = delivery_findings(&counts, &sender);
    if let Some(field) = state.field_view() {
        reasons.extend(field_findings(&field));
    }
    for check in &state.checks {
        reasons.extend(check.findings());
    }
    reasons.sort_by_key(|f| std::cmp::Reverse(f.status));
    Health {
        status: reasons.first().map_or(Status::Ok, |f| f.status),
        site: state.site.clone(),
        reasons,
        outbox: counts,
        sender,
        clock: ClockView {
            sync: crate::clock::sync_state(),
            now: state
                .field_view()
                .map_or_else(chrono::Utc::now, |f| f.live.clock.now())
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        },
    }
}

/// The findings of the store, the outbox and the sender, from their numbers alone (pure: tested with
/// made-up numbers, e.g. a failed store).
pub fn delivery_findings(counts: &OutboxCounts, sender: &SenderSnapshot) -> Vec<Finding> {
    let mut reasons = Vec::new();
    let mut add = |status: Status, code: &str, message: String| {
        reasons.push(Finding {
            status,
            code: code.into(),
            message,
        })
    };
    if sender.login_failing {
        add(
            Status::Critical,
            "login_failing",
            format!(
                "GenerateToken refuses the credentials ({}); nothing is delivered, every record is kept. Fix panda.username / the password and restart.",
                sender.last_error.clone().unwrap_or_default()
            ),
        );
    }
    if let Some(f) = &counts.store {
        add(Status::Critical, "store_failed", store_failed_message(f));
    }
    if counts.disk_low {
        add(
            Status::Critical,
            "disk_low",
            format!(
                "disk almost full: {} free on the state directory's file system, below the reserve outbox.min_free ({}): new valve states are not recorded ({} commits refused); they are detected again once space returns. Deliveries go on. Free space on that disk.",
                free_text(counts.free_bytes),
                crate::config::format_byte_size(counts.min_free),
                counts.refused_space
            ),
        );
    }
    // `refusing` is also set by a commit refused for disk space: only a refusal by the bounds (counted
    // in `refused`) while the disk has room is `outbox_full`. Once space is back the next cycle
    // commits and clears it.
    if counts.refusing && !counts.disk_low && counts.refused > 0 {
        add(
            Status::Critical,
            "outbox_full",
            format!(
                "outbox full ({} of {} records, {} of {} bytes): new valve states are not recorded ({} commits refused); they are detected again once deliveries make room.",
                counts.records, counts.max_records, counts.bytes, counts.max_bytes, counts.refused
            ),
        );
    } else if counts.records.saturating_mul(100) >= counts.max_records.saturating_mul(FILL_WARN_PERCENT)
        || counts.bytes.saturating_mul(100) >= counts.max_bytes.saturating_mul(FILL_WARN_PERCENT)
    {
        add(
            Status::Degraded,
            "outbox_filling",
            format!(
                "outbox at {} of {} records, {} of {} bytes",
                counts.records, counts.max_records, counts.bytes, counts.max_bytes
            ),
        );
    }
    if !sender.login_failing && sender.failures_in_a_row > 0 && counts.records > 0 {
        add(
            Status::Degraded,
            "delivery_failing",
            format!(
                "{} failed requests in a row; last: {}",
                sender.failures_in_a_row,
                sender.last_error.clone().unwrap_or_default()
            ),
        );
    }
    if sender.held > 0 {
        add(
            Status::Degraded,
            "records_held",
            format!(
                "{} record(s) refused by the server are held and tried again alone",
                sender.held
            ),
        );
    }
    if counts.dead > 0 {
        add(
            Status::Degraded,
            "dead_letters",
            format!(
                "{} dead letter(s): see `fieldgate outbox dead`, fix the cause on the server, then `fieldgate outbox requeue`",
                counts.dead
            ),
        );
    }
    if counts.max_dead > 0 && counts.dead >= counts.max_dead {
        add(
            Status::Degraded,
            "dead_letters_full",
            format!(
                "{} dead letters, the bound outbox.max_dead: records the server refuses are not moved there any more; they stay queued, held and retried at the longest backoff ({} refused). See `fieldgate outbox dead`, fix the cause, then `fieldgate outbox requeue --all`",
                counts.dead, counts.dead_refused
            ),
        );
    }
    if counts.corrupt > 0 {
        add(
            Status::Degraded,
            "corrupt_entries",
            format!(
                "{} entries of the state database could not be read and were set aside: see `fieldgate outbox corrupt` (a record set aside is not delivered; a meter whose state was set aside started again from a baseline)",
                counts.corrupt
            ),
        );
    }
    if let Some(age) = counts.oldest_age_seconds.filter(|a| *a > OLDEST_WARN.as_secs()) {
        add(
            Status::Degraded,
            "oldest_record_age",
            format!(
                "the oldest queued record waits for {}: deliveries are not getting through (see the other reasons and `fieldgate outbox list`)",
                humantime::format_duration(Duration::from_secs(age))
            ),
        );
    }
    reasons
}

/// Bus down (`critical`: nothing on that line is watched) and meters offline on buses that are up
/// (`degraded`).
fn field_findings(field: &FieldView) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut down = vec![false; field.cfg.buses.len()];
    for (i, (bus, stats)) in field.cfg.buses.iter().zip(&field.buses).enumerate() {
        let s = stats.snapshot();
        if !s.up && s.connects + s.connect_failures > 0 {
            if let Some(d) = down.get_mut(i) {
                *d = true;
            }
            out.push(Finding {
                status: Status::Critical,
                code: "bus_down".into(),
                message: format!(
                    "bus {} ({}) cannot be opened: its meters are not read; it is retried by itself (see the log for why)",
                    bus.name,
                    bus.transport.endpoint()
                ),
            });
        }
    }
    let offline: Vec<&str> = field
        .live
        .snapshot()
        .iter()
        .zip(&field.cfg.meters)
        .filter(|(view, m)| !view.online && !down.get(m.bus).copied().unwrap_or(false))
        .map(|(_, m)| m.meter_no.as_str())
        .collect();
    if !offline.is_empty() {
        let mut names = offline
            .iter()
            .take(OFFLINE_NAMED)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        if offline.len() > OFFLINE_NAMED {
            names.push_str(&format!(" and {} more", offline.len() - OFFLINE_NAMED));
        }
        out.push(Finding {
            status: Status::Degraded,
            code: "meters_offline".into(),
            message: format!(
                "{} meter(s) do not answer: {names}; check wiring, unit id, baud and parity (`fieldgate probe`)",
                offline.len()
            ),
        });
    }
    out
}

/// The `store_failed` finding in words: since when, why, and that it heals by itself.
fn store_failed_message(f: &StoreFault) -> String {
    let last = f
        .reopen_error
        .as_ref()
        .map_or_else(String::new, |e| format!(", last: {e}"));
    format!(
        "the state database failed {} ago ({}): nothing is delivered or committed; it is reopened by itself ({} attempts{last}). Polling goes on.",
        humantime::format_duration(Duration::from_secs(f.for_seconds)),
        f.error,
        f.reopen_attempts
    )
}

/// Free bytes in words (`unknown` when the look failed).
fn free_text(free: Option<u64>) -> String {
    free.map_or_else(|| "unknown".to_string(), crate::config::format_byte_size)
}

/// How long the oldest queued record has waited at the head of the queue, in seconds, on the
/// monotonic clock ([`Store::oldest_waiting`]; not its wall-clock detection time, which a clock step
/// can put decades away); `None` when nothing is queued or the store cannot be read (a failed store
/// is reported by its own finding, not as an error here).
fn oldest_age(outbox: &Store) -> Option<u64> {
    outbox.oldest_waiting().map(|d| d.as_secs())
}

/// Counts and bounds of the outbox, free space, the state of the store, and the age of its oldest
/// record. Reads no dead letter and no set-aside entry (their counts are kept in memory); looks up the
/// free space at most once a second.
pub fn outbox_counts(outbox: &Store) -> OutboxCounts {
    let limits = outbox.limits();
    // Looks again when the last look is older than a second: a quiet station (no commits) still shows
    // the disk as it is.
    outbox.low_space();
    let (free_bytes, min_free, disk_low) = outbox.space();
    let (store_failures, store_reopens) = outbox.fault_totals();
    OutboxCounts {
        records: outbox.len(),
        bytes: outbox.bytes(),
        max_records: limits.max_records,
        max_bytes: limits.max_bytes,
        refused: outbox.refused(),
        refusing: outbox.is_refusing(),
        dead: outbox.dead_len(),
        oldest_age_seconds: oldest_age(outbox),
        free_bytes,
        min_free,
        disk_low,
        refused_space: outbox.refused_space(),
        max_dead: limits.max_dead,
        dead_refused: outbox.dead_refused(),
        corrupt: outbox.corrupt_len(),
        store: outbox.fault(),
        store_failures,
        store_reopens,
    }
}

/// The buses as `GET /buses` shows them.
pub fn buses(state: &AdminState) -> Vec<BusView> {
    let Some(field) = state.field_view() else {
        return Vec::new();
    };
    let live = field.live.snapshot();
    field
        .cfg
        .buses
        .iter()
        .zip(&field.buses)
        .enumerate()
        .map(|(i, (bus, stats))| {
            let s = stats.snapshot();
            let on_bus = || live.iter().zip(&field.cfg.meters).filter(move |(_, m)| m.bus == i);
            BusView {
                name: bus.name.clone(),
                transport: match bus.transport {
                    Transport::Tcp(_) => "tcp",
                    Transport::Serial { .. } => "serial",
                    Transport::RtuOverTcp(_) => "rtu_over_tcp",
                }
                .to_string(),
                endpoint: bus.transport.endpoint().to_string(),
                up: s.up,
                tried: s.connects + s.connect_failures > 0,
                meters: on_bus().count(),
                meters_online: on_bus().filter(|(v, _)| v.online).count(),
                requests: s.requests,
                errors: s.exceptions + s.timeouts + s.protocol_errors + s.transport_errors,
                exceptions: s.exceptions,
                timeouts: s.timeouts,
                protocol_errors: s.protocol_errors,
                transport_errors: s.transport_errors,
                reconnects: s.reconnects,
                connect_failures: s.connect_failures,
                rounds: s.rounds,
                last_round_seconds: s.last_round_micros as f64 / 1e6,
            }
        })
        .collect()
}

/// The meters as `GET /meters` shows them (reads each stored state from the outbox).
pub fn meters(state: &AdminState) -> Vec<MeterInfo> {
    let Some(field) = state.field_view() else {
        return Vec::new();
    };
    let live = field.live.snapshot();
    field
        .cfg
        .meters
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let view = live.get(i).cloned().unwrap_or_default();
            let stored = state.outbox.state(&m.meter_no).ok().flatten();
            let readings = m
                .readings
                .iter()
                .zip(&view.readings)
                .map(|(r, v)| (r.field.clone(), serde_json::Value::String(v.clone())))
                .collect();
            let link = field.buses.get(m.bus).and_then(|b| b.meter_link(&m.meter_no));
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            MeterInfo {
                meter_no: m.meter_no.clone(),
                bus: field.cfg.buses.get(m.bus).map(|b| b.name.clone()).unwrap_or_default(),
                unit: m.unit,
                online: view.online,
                state: view.state,
                stored_state: stored.as_ref().map(|s| s.label.clone()),
                last_change: stored.map(|s| s.since),
                readings,
                last_sample_age_seconds: view.last_sample.map(|t| t.elapsed().as_secs_f64()),
                answer_ms: link.and_then(|l| l.answer_last).map(ms),
                answer_max_ms: link.and_then(|l| l.answer_max).map(ms),
                timeout_ms: link.map(|l| ms(l.timeout)),
                timeouts: link.map_or(0, |l| l.timeouts),
                late_answers: link.map_or(0, |l| l.late_answers),
                late_answer_ms: link.and_then(|l| l.late_last).map(ms),
                retry_every_seconds: link.and_then(|l| l.retry_every).map(|d| d.as_secs_f64()),
                hint: link.and_then(|l| l.hint()),
            }
        })
        .collect()
}

/// Valve transitions committed since start (0 without a field view).
pub fn transitions(state: &AdminState) -> u64 {
    state
        .field_view()
        .map_or(0, |f| f.live.transitions.load(Ordering::Relaxed))
}

// === handlers ===

/// Run `f` (it reads the store: sled blocks) on the blocking pool, not on an async worker.
async fn off_the_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Response> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, format!("internal error: {e}")))
}

async fn get_health(State(state): State<AdminState>) -> Response {
    let h = match off_the_runtime(move || health(&state)).await {
        Ok(h) => h,
        Err(r) => return r,
    };
    let code = if h.status == Status::Critical {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, Json(h)).into_response()
}

async fn get_metrics(State(state): State<AdminState>) -> Response {
    match off_the_runtime(move || crate::ops::metrics::render(&state)).await {
        Ok(text) => ([(header::CONTENT_TYPE, crate::ops::metrics::CONTENT_TYPE)], text).into_response(),
        Err(r) => r,
    }
}

async fn get_buses(State(state): State<AdminState>) -> Response {
    Json(buses(&state)).into_response()
}

async fn get_meters(State(state): State<AdminState>) -> Response {
    Json(meters(&state)).into_response()
}

async fn get_outbox(State(state): State<AdminState>, Query(q): Query<ListQuery>) -> Response {
    let limit = q.limit.unwrap_or(OLDEST_SHOWN).min(LIST_MAX);
    let read = off_the_runtime(move || {
        let records = state.outbox.list(limit)?;
        Ok(OutboxView {
            counts: outbox_counts(&state.outbox),
            oldest: records.iter().map(RecordView::from).collect(),
        })
    });
    match read.await {
        Ok(Ok(view)) => Json(view).into_response(),
        Ok(Err(e)) => store_error(&e),
        Err(r) => r,
    }
}

async fn get_dead(State(state): State<AdminState>, Query(q): Query<PageQuery>) -> Response {
    match off_the_runtime(move || state.outbox.dead_page(q.after, q.limit())).await {
        Ok(Ok(letters)) => Json(letters.iter().map(DeadView::from).collect::<Vec<_>>()).into_response(),
        Ok(Err(e)) => store_error(&e),
        Err(r) => r,
    }
}

async fn get_corrupt(State(state): State<AdminState>, Query(q): Query<PageQuery>) -> Response {
    match off_the_runtime(move || state.outbox.corrupt(q.limit())).await {
        Ok(Ok(entries)) => Json::<Vec<CorruptEntry>>(entries).into_response(),
        Ok(Err(e)) => store_error(&e),
        Err(r) => r,
    }
}

async fn post_requeue(State(state): State<AdminState>, body: Result<Json<RequeueRequest>, JsonRejection>) -> Response {
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"id\": N}} or {{\"all\": true}}: {}", e.body_text()),
            )
        }
    };
    let which = match (req.id, req.all) {
        (Some(id), false) => Some(id),
        (None, true) => None,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "give exactly one of {\"id\": N} and {\"all\": true}".into(),
            )
        }
    };
    // `requeue` does its store work on the blocking pool.
    match state.outbox.requeue(which).await {
        Ok(0) if which.is_some() => error(
            StatusCode::NOT_FOUND,
            format!("no dead letter with id {}", which.unwrap_or_default()),
        ),
        Ok(n) => {
            if n > 0 {
                tracing::info!(
                    message = "Dead letters requeued through the admin API.",
                    records = n,
                    id = which
                );
                if let Some(w) = &state.wake {
                    w.notify_one();
                }
            }
            Json(RequeueAnswer { requeued: n }).into_response()
        }
        Err(e) => store_error(&e),
    }
}

/// A store error as an answer: 503 while the store is failed (it is opened again by itself: ask
/// again later), 500 otherwise; the error in words either way.
fn store_error(e: &StoreError) -> Response {
    match e {
        StoreError::Failed { .. } | StoreError::Db { .. } | StoreError::Sync { .. } => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{e}; it is opened again by itself, ask again later (see /healthz, store_failed)"),
        ),
        _ => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn error(code: StatusCode, message: String) -> Response {
    (code, Json(serde_json::json!({ "error": message }))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_unless_allowed() {
        assert!(check_listen("127.0.0.1:9898".parse().unwrap(), false).is_ok());
        assert!(check_listen("[::1]:9898".parse().unwrap(), false).is_ok());
        let err = check_listen("0.0.0.0:9898".parse().unwrap(), false).unwrap_err();
        assert_eq!(err.error_code(), "not_loopback");
        assert!(err.to_string().contains("allow_remote"), "{err}");
        assert!(check_listen("10.0.0.5:9898".parse().unwrap(), true).is_ok());
    }

    #[test]
    fn statuses_order_worst_last() {
        assert!(Status::Critical > Status::Degraded && Status::Degraded > Status::Ok);
        assert_eq!(serde_json::to_string(&Status::Critical).unwrap(), "\"critical\"");
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_waiting_over_an_hour_degrades_health() {
        use crate::config::Limits;
        use crate::events::record::Draft;
        use crate::store::StoredState;
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_records: 100,
            max_bytes: 1 << 20,
            ..Limits::DEFAULT
        };
        let outbox = Store::open(dir.path(), limits).unwrap();
        let state = AdminState::new(outbox.clone(), Arc::new(SenderStats::default()), "s");
        assert_eq!(health(&state).outbox.oldest_age_seconds, None);
        let old = (chrono::Utc::now() - chrono::Duration::hours(2)).to_rfc3339();
        // From JSON, as stored: fields added to StoredState later default (and do not break this test).
        let stored: StoredState =
            serde_json::from_value(serde_json::json!({"raw": 1, "label": "open", "since": old})).unwrap();
        let draft = Draft {
            event_name: "e".into(),
            detected_at: old,
            from: "closed".into(),
            to: "open".into(),
            biz_data: "{}".into(),
        };
        outbox.commit("M1", &stored, vec![draft]).unwrap();
        outbox.sync().await.unwrap();
        // Its detection time, two hours back on the wall clock, says nothing: its wait is timed here.
        assert_eq!(health(&state).status, Status::Ok);
        tokio::time::advance(Duration::from_secs(7200)).await;
        let h = health(&state);
        assert!(h.outbox.oldest_age_seconds.is_some_and(|a| a >= 7200), "{:?}", h.outbox);
        assert_eq!(h.status, Status::Degraded);
        assert_eq!(h.reasons.first().map(|f| f.code.as_str()), Some("oldest_record_age"));
        assert!(crate::ops::metrics::render(&state).contains("\nfieldgate_outbox_oldest_age_seconds 72"));
    }

    fn limits(max_dead: u64, min_free: u64) -> crate::config::Limits {
        crate::config::Limits {
            max_records: 100,
            max_bytes: 1 << 20,
            min_free,
            max_dead,
        }
    }

    fn change(meter: &str) -> (String, crate::store::StoredState, Vec<crate::events::record::Draft>) {
        let state = crate::store::StoredState {
            raw: 1,
            label: "开启".into(),
            since: "2026-01-01T08:00:00+08:00".into(),
            ..crate::store::StoredState::default()
        };
        let draft = crate::events::record::Draft {
            event_name: "用水户开阀".into(),
            detected_at: chrono::Utc::now().to_rfc3339(),
            from: "关闭".into(),
            to: "开启".into(),
            biz_data: "{}".into(),
        };
        (meter.to_string(), state, vec![draft])
    }

    fn codes(h: &Health) -> Vec<&str> {
        h.reasons.iter().map(|f| f.code.as_str()).collect()
    }

    fn series(text: &str, name: &str) -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ').map(str::to_string))
    }

    /// Store reads of one `/metrics` and one `/healthz` answer, with `dead` dead letters kept.
    async fn reads_per_request(dead: usize) -> u64 {
        let dir = tempfile::tempdir().unwrap();
        let big = crate::config::Limits {
            max_records: 10_000,
            ..limits(10_000, 0)
        };
        let outbox = Store::open(dir.path(), big).unwrap();
        let mut ids = Vec::new();
        for i in 0..=dead {
            let records = outbox.commit_batch(vec![change(&format!("M{i}"))]).unwrap();
            ids.extend(records.into_iter().flatten().flatten().map(|r| r.id));
        }
        outbox.sync().await.unwrap();
        for id in &ids[..dead] {
            outbox.bury(*id, "refused", "2026-01-01T08:00:00+08:00").await.unwrap();
        }
        assert_eq!(outbox.dead_len(), dead as u64);
        let state = AdminState::new(outbox.clone(), Arc::new(SenderStats::default()), "s");
        let before = outbox.entries_read();
        let text = crate::ops::metrics::render(&state);
        let h = health(&state);
        assert!(
            text.lines().any(|l| l == format!("fieldgate_records_dead {dead}")),
            "{text}"
        );
        assert_eq!(h.outbox.dead, dead as u64);
        outbox.entries_read() - before
    }

    #[tokio::test]
    async fn metrics_and_health_cost_the_same_store_reads_with_one_or_500_dead_letters() {
        let (few, many) = (reads_per_request(1).await, reads_per_request(500).await);
        assert_eq!(
            few, many,
            "store reads per /metrics + /healthz: {few} with 1 dead letter, {many} with 500"
        );
        assert!(few <= 2, "only the oldest queued record is read: {few}");
    }

    #[test]
    fn a_disk_below_the_reserve_is_critical_disk_low_and_not_outbox_full() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Store::open(dir.path(), limits(10, u64::MAX)).unwrap();
        let state = AdminState::new(outbox.clone(), Arc::new(SenderStats::default()), "s");
        // Health looks at the disk itself: a quiet station with no commit is reported too.
        let h = health(&state);
        assert_eq!((h.status, codes(&h)), (Status::Critical, vec!["disk_low"]));
        assert!(h.outbox.disk_low && h.outbox.free_bytes.is_some(), "{:?}", h.outbox);
        assert_eq!((h.outbox.min_free, h.outbox.refused_space), (u64::MAX, 0));

        let refused = outbox.commit_batch(vec![change("M1"), change("M2")]).unwrap();
        assert!(refused
            .iter()
            .all(|r| r.as_ref().is_err_and(|e| e.error_code() == "no_space")));
        assert!(outbox.is_refusing(), "the store says commits are refused");
        let h = health(&state);
        assert_eq!(
            (h.status, codes(&h)),
            (Status::Critical, vec!["disk_low"]),
            "low space is not reported as a full outbox too: {:?}",
            h.reasons
        );
        let free = crate::config::format_byte_size(h.outbox.free_bytes.unwrap());
        assert_eq!(
            h.reasons[0].message,
            format!(
                "disk almost full: {free} free on the state directory's file system, below the reserve outbox.min_free (16384 PiB): new valve states are not recorded (1 commits refused); they are detected again once space returns. Deliveries go on. Free space on that disk."
            )
        );
        assert_eq!((h.outbox.refused_space, h.outbox.refused), (1, 0));

        let text = crate::ops::metrics::render(&state);
        assert_eq!(series(&text, "fieldgate_health_status").as_deref(), Some("2"));
        assert_eq!(
            series(&text, "fieldgate_outbox_refused_space_total").as_deref(),
            Some("1")
        );
        assert_eq!(series(&text, "fieldgate_outbox_refused_total").as_deref(), Some("0"));
        assert_eq!(series(&text, "fieldgate_store_failed").as_deref(), Some("0"));
        // The free space of the render's own look (nothing else looks meanwhile).
        let free_bytes: u64 = series(&text, "fieldgate_store_free_bytes").unwrap().parse().unwrap();
        assert_eq!(Some(free_bytes), outbox.space().0);
    }

    #[tokio::test]
    async fn an_entry_that_cannot_be_read_is_reported_as_set_aside() {
        use crate::store::DamageTarget;
        let dir = tempfile::tempdir().unwrap();
        let outbox = Store::open(dir.path(), limits(10, 0)).unwrap();
        let state = AdminState::new(outbox.clone(), Arc::new(SenderStats::default()), "s");
        let (meter, st, drafts) = change("M1");
        outbox.commit(&meter, &st, drafts).unwrap();
        outbox.sync().await.unwrap();
        outbox.damage(DamageTarget::State("M1"), b"{\"raw\":").unwrap();
        assert_eq!(outbox.state("M1").unwrap(), None, "read once: set aside");

        let h = health(&state);
        assert_eq!((h.status, codes(&h)), (Status::Degraded, vec!["corrupt_entries"]));
        assert_eq!(
            h.reasons[0].message,
            "1 entries of the state database could not be read and were set aside: see `fieldgate outbox corrupt` (a record set aside is not delivered; a meter whose state was set aside started again from a baseline)"
        );
        assert_eq!(h.outbox.corrupt, 1);
        let text = crate::ops::metrics::render(&state);
        assert_eq!(series(&text, "fieldgate_outbox_corrupt_entries").as_deref(), Some("1"));
        assert_eq!(series(&text, "fieldgate_health_status").as_deref(), Some("1"));
    }

    #[tokio::test]
    async fn dead_letters_at_their_bound_degrade_health_with_the_refusals_counted() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Store::open(dir.path(), limits(1, 0)).unwrap();
        let state = AdminState::new(outbox.clone(), Arc::new(SenderStats::default()), "s");
        let results = outbox.commit_batch(vec![change("M1"), change("M2")]).unwrap();
        let ids: Vec<u64> = results.into_iter().map(|r| r.unwrap()[0].id).collect();
        outbox.sync().await.unwrap();
        outbox.bury(ids[0], "事件不存在", "t").await.unwrap();
        let e = outbox.bury(ids[1], "事件不存在", "t").await.unwrap_err();
        assert_eq!(e.error_code(), "dead_full");

        let h = health(&state);
        assert_eq!(
            (h.status, codes(&h)),
            (Status::Degraded, vec!["dead_letters", "dead_letters_full"])
        );
        assert_eq!(
            h.reasons[1].message,
            "1 dead letters, the bound outbox.max_dead: records the server refuses are not moved there any more; they stay queued, held and retried at the longest backoff (1 refused). See `fieldgate outbox dead`, fix the cause, then `fieldgate outbox requeue --all`"
        );
        assert_eq!(
            (
                h.outbox.dead,
                h.outbox.max_dead,
                h.outbox.dead_refused,
                h.outbox.records
            ),
            (1, 1, 1, 1)
        );
        let text = crate::ops::metrics::render(&state);
        assert_eq!(series(&text, "fieldgate_records_dead").as_deref(), Some("1"));
        assert_eq!(series(&text, "fieldgate_dead_letters_max").as_deref(), Some("1"));
        assert_eq!(
            series(&text, "fieldgate_dead_letters_refused_total").as_deref(),
            Some("1")
        );
    }

    fn quiet_counts() -> OutboxCounts {
        OutboxCounts {
            max_records: 100,
            max_bytes: 1 << 20,
            free_bytes: Some(3 << 30),
            min_free: 64 << 20,
            max_dead: 10_000,
            ..OutboxCounts::default()
        }
    }

    #[test]
    fn a_failed_store_is_critical_in_plain_words() {
        let counts = OutboxCounts {
            store: Some(StoreFault {
                error: "No space left on device (os error 28)".into(),
                for_seconds: 125,
                reopen_attempts: 5,
                reopen_error: Some("IO error: Input/output error (os error 5)".into()),
            }),
            store_failures: 1,
            ..quiet_counts()
        };
        let found = delivery_findings(&counts, &SenderSnapshot::default());
        assert_eq!(
            found,
            [Finding {
                status: Status::Critical,
                code: "store_failed".into(),
                message: "the state database failed 2m 5s ago (No space left on device (os error 28)): nothing is delivered or committed; it is reopened by itself (5 attempts, last: IO error: Input/output error (os error 5)). Polling goes on.".into(),
            }]
        );
        assert!(delivery_findings(&quiet_counts(), &SenderSnapshot::default()).is_empty());
    }

    #[test]
    fn commits_refused_while_space_is_back_are_not_a_full_outbox() {
        // The disk refused the last commit; space is back and the next cycle commits: no finding.
        let counts = OutboxCounts {
            refusing: true,
            refused_space: 3,
            ..quiet_counts()
        };
        assert!(delivery_findings(&counts, &SenderSnapshot::default()).is_empty());
        // The bounds refused it: outbox_full, as before.
        let full = OutboxCounts {
            refusing: true,
            refused: 1,
            records: 100,
            ..quiet_counts()
        };
        let codes: Vec<String> = delivery_findings(&full, &SenderSnapshot::default())
            .into_iter()
            .map(|f| f.code)
            .collect();
        assert_eq!(codes, ["outbox_full"]);
    }

    #[tokio::test]
    async fn store_errors_answer_503_in_words_while_the_store_is_failed() {
        let failed = store_error(&StoreError::Failed {
            error: "No space left on device (os error 28)".into(),
        });
        assert_eq!(failed.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(failed.into_body(), 1 << 16).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v["error"],
            "the state database failed (No space left on device (os error 28)) and is not open again yet; nothing was written; it is opened again by itself, ask again later (see /healthz, store_failed)"
        );
        let other = store_error(&StoreError::Corrupt {
            tree: "dead",
            detail: "x".into(),
        });
        assert_eq!(other.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn an_older_daemons_counts_still_read() {
        let old = r#"{"records":1,"bytes":2,"max_records":3,"max_bytes":4,"refused":0,"refusing":false,"dead":0}"#;
        let c: OutboxCounts = serde_json::from_str(old).unwrap();
        assert_eq!(
            (c.records, c.free_bytes, c.min_free, c.store, c.corrupt),
            (1, None, 0, None, 0)
        );
    }

    #[test]
    fn pages_are_bounded() {
        let q = |limit| PageQuery { limit, after: None };
        assert_eq!(q(None).limit(), PAGE_DEFAULT);
        assert_eq!(q(Some(5)).limit(), 5);
        assert_eq!(q(Some(1_000_000)).limit(), PAGE_MAX);
    }

    #[test]
    fn requeue_requests_read_both_shapes() {
        let one: RequeueRequest = serde_json::from_str(r#"{"id": 7}"#).unwrap();
        assert_eq!(
            one,
            RequeueRequest {
                id: Some(7),
                all: false
            }
        );
        let all: RequeueRequest = serde_json::from_str(r#"{"all": true}"#).unwrap();
        assert_eq!(all, RequeueRequest { id: None, all: true });
        assert_eq!(serde_json::to_string(&one).unwrap(), r#"{"id":7}"#);
    }
}

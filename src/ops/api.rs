//! The wire types of the admin API: the JSON the daemon serves ([`crate::ops::admin`]) and the command
//! line reads back ([`crate::cli`]), and the bounds of its listings.
//!
//! Invariants: field names and the lowercase health levels are the wire format; a field added after the
//! first release defaults when absent, so a command line of this release reads an older daemon's answer.
//!
//! Never: decides anything (the health rules are in [`crate::ops::health`]), reads the store, or serves
//! a route. The `From` conversions only copy fields (a delivery's customer is read from its BizData).

use serde::{Deserialize, Serialize};

use crate::config::mapping::customer_label;
use crate::delivery::sender::recent::Delivered;
use crate::delivery::sender::stats::SenderSnapshot;
use crate::events::record::Record;
use crate::store::fault::StoreFault;
use crate::store::DeadLetter;

/// How many of the oldest queued records `GET /outbox` shows.
pub(crate) const OLDEST_SHOWN: usize = 20;

/// Most records `GET /outbox?limit=N` lists.
pub(crate) const LIST_MAX: usize = 10_000;

/// Entries `GET /outbox/dead` and `GET /outbox/corrupt` list when no `limit` is given.
pub(crate) const PAGE_DEFAULT: usize = 100;

/// Most entries one `GET /outbox/dead` or `GET /outbox/corrupt` lists, whatever `limit` asks.
pub(crate) const PAGE_MAX: usize = 1000;

/// Health levels, ordered: the worst finding wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Status {
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
    pub(crate) status: Status,
    /// A bounded label (`login_failing`, `outbox_full`, …).
    pub code: String,
    /// What it means and what to do, in words.
    pub message: String,
}

/// `GET /healthz`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Health {
    /// The worst of `reasons`, `ok` when there are none.
    pub(crate) status: Status,
    /// `site.name`.
    pub(crate) site: String,
    /// Every finding, worst first.
    pub(crate) reasons: Vec<Finding>,
    pub(crate) outbox: OutboxCounts,
    pub(crate) sender: SenderSnapshot,
    /// The system clock: whether the kernel says it is synchronized, and the time it shows.
    #[serde(default)]
    pub(crate) clock: ClockView,
}

/// What `/healthz` says of the system clock. Not a reason for `degraded`: many boards have no NTP,
/// and nothing the gateway decides depends on it; it explains odd detection times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ClockView {
    /// What the kernel says (`adjtimex`).
    pub(crate) sync: crate::clock::ClockSync,
    /// The time the gateway labels with now (RFC 3339, UTC).
    pub(crate) now: String,
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
    /// `[outbox] max_records`: at it, new valve states are not committed.
    pub max_records: u64,
    /// `[outbox] max_bytes`: at it, new valve states are not committed.
    pub max_bytes: u64,
    /// Commits refused because the outbox was full, since start.
    pub refused: u64,
    /// The last commit was refused (outbox full or disk below `min_free`) and nothing was removed
    /// since: new states are not recorded.
    pub refusing: bool,
    /// Dead letters.
    pub dead: u64,
    /// How long the oldest queued record has waited, in seconds (timed by the daemon, not taken from
    /// its `detected_at`); `None` when nothing is queued or the store cannot be read (failed).
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
pub(crate) struct OutboxView {
    /// Counts and bounds.
    #[serde(flatten)]
    pub(crate) counts: OutboxCounts,
    /// The oldest queued records (at most [`OLDEST_SHOWN`]).
    pub(crate) oldest: Vec<RecordView>,
}

/// A queued record, without its BizData.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RecordView {
    pub(crate) id: u64,
    pub(crate) meter_no: String,
    /// `eventName`.
    pub(crate) event_name: String,
    pub(crate) detected_at: String,
    /// Failed attempts.
    pub(crate) attempts: u32,
    /// Refusals of it alone.
    rejections: u32,
    /// Why the last attempt failed.
    pub(crate) last_error: Option<String>,
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
    detected_at: String,
    /// When it was moved to the dead letters.
    pub(crate) died_at: String,
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
pub(crate) struct RequeueRequest {
    /// One dead letter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) id: Option<u64>,
    /// All of them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) all: bool,
}

/// `POST /outbox/requeue` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RequeueAnswer {
    /// Records moved back into the outbox.
    pub(crate) requeued: usize,
}

/// One bus in `GET /buses`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct BusView {
    /// `[[bus]] name`.
    pub(crate) name: String,
    /// `tcp`, `serial` or `rtu_over_tcp`.
    pub(crate) transport: String,
    /// Address or device path.
    pub(crate) endpoint: String,
    /// The port or connection opened the last time it was tried.
    pub(crate) up: bool,
    /// Whether an open was tried at all yet (`up` means nothing before).
    pub(crate) tried: bool,
    /// Why the last open failed, while the bus is down (e.g. a port that refuses RS-485 mode).
    #[serde(default)]
    pub(crate) open_error: Option<String>,
    /// Meters on the bus.
    pub(crate) meters: usize,
    /// Of them, online.
    pub(crate) meters_online: usize,
    /// Requests sent.
    pub(crate) requests: u64,
    /// Failed requests, all kinds.
    pub(crate) errors: u64,
    /// Exception answers.
    pub(crate) exceptions: u64,
    /// No answer within the timeout.
    pub(crate) timeouts: u64,
    /// Answers that did not fit the request.
    pub(crate) protocol_errors: u64,
    /// Transport failures.
    pub(crate) transport_errors: u64,
    /// Opens after the first.
    pub(crate) reconnects: u64,
    /// Failed opens.
    pub(crate) connect_failures: u64,
    /// Rounds completed.
    pub(crate) rounds: u64,
    /// Duration of the last round, seconds.
    pub(crate) last_round_seconds: f64,
    /// `poll_interval`, seconds: a round that takes longer delays the next one.
    #[serde(default)]
    pub(crate) poll_interval_seconds: f64,
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
    pub(crate) late_answer_ms: Option<f64>,
    /// While offline: its current retry period, seconds (one poll round at first, growing to
    /// `offline_retry`).
    #[serde(default)]
    pub(crate) retry_every_seconds: Option<f64>,
    /// Advice when answers come near or after the timeout (raise the bus `timeout`).
    #[serde(default)]
    pub(crate) hint: Option<String>,
    /// The customer from the mapping row (`用户名称 (用户编号)`, see
    /// `crate::config::mapping::customer_label`); `None` when the meter has no row or neither column.
    #[serde(default)]
    pub(crate) customer: Option<String>,
    /// Since when it counts as offline (RFC 3339 in the site's zone, from the stored state); `None`
    /// while online.
    #[serde(default)]
    pub(crate) offline_since: Option<String>,
    /// Its last failed read (also after it answers again); `None` if none since the bus task started.
    #[serde(default)]
    pub(crate) last_failure: Option<FailureView>,
}

/// A meter's last failed read in `GET /meters`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct FailureView {
    /// `timeout`, `exception`, `protocol`, `transport`, `bus_down` or `decode` (the log has the details).
    pub(crate) kind: String,
    /// The Modbus exception code, for `exception`.
    pub(crate) exception: Option<u8>,
    /// How long ago, seconds.
    pub(crate) age_seconds: f64,
}

/// One work order in `GET /deliveries`: delivered (the server answered `code: 0`), newest first.
/// Serialize only: no command reads it back (the page and scripts do).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct DeliveryView {
    /// Record id.
    pub(crate) id: u64,
    /// `eventName`.
    pub(crate) event_name: String,
    pub(crate) meter_no: String,
    /// The customer in its BizData (`用户名称 (用户编号)`), as it was sent.
    pub(crate) customer: Option<String>,
    /// What it reports: the new valve state, link, or `<field>=<value>`.
    pub(crate) to: String,
    /// When it was detected (RFC 3339).
    pub(crate) detected_at: String,
    /// When the server's acknowledgement was stored (RFC 3339).
    pub(crate) delivered_at: String,
}

impl From<&Delivered> for DeliveryView {
    fn from(d: &Delivered) -> DeliveryView {
        let r = &d.record;
        // Read only here, at most RECENT_DELIVERIES at a time, never on the sender's path.
        let biz: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&r.biz_data).unwrap_or_default();
        let customer = customer_label(biz.iter().filter_map(|(k, v)| Some((k.as_str(), v.as_str()?))));
        DeliveryView {
            id: r.id,
            event_name: r.event_name.clone(),
            meter_no: r.meter_no.clone(),
            customer,
            to: r.to.clone(),
            detected_at: r.detected_at.clone(),
            delivered_at: d.delivered_at.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_order_worst_last() {
        assert!(Status::Critical > Status::Degraded && Status::Degraded > Status::Ok);
        assert_eq!(serde_json::to_string(&Status::Critical).unwrap(), "\"critical\"");
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

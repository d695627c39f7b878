//! The validated configuration: [`Config`] and its parts, as every later module reads them. Only the
//! validator builds them, so every value is in range and every reference resolves (a meter's bus, an
//! event's valve label or reading field); nothing downstream checks again. Besides the data, the few
//! questions asked of it: a transport's endpoint, a valve's label, whether a rule fires, the store's
//! [`Limits`]. Nothing here parses or reads anything.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chrono::FixedOffset;

use super::mapping::Mapping;
use super::point::PointSpec;

/// A validated site configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (relative paths inside resolve against its folder).
    pub(crate) path: PathBuf,
    /// `[site]`.
    pub site: SiteConfig,
    /// `[panda]`.
    pub panda: PandaConfig,
    pub(crate) admin: AdminConfig,
    pub(crate) outbox: OutboxConfig,
    /// `[[bus]]`, in file order.
    pub buses: Vec<BusConfig>,
    /// `[[meter]]`, in file order, profiles applied.
    pub meters: Vec<MeterConfig>,
    /// `[[event]]`, in file order.
    pub(crate) events: Vec<EventRule>,
    /// The loaded meter → customer table.
    pub mapping: Mapping,
}

/// `[site]`.
#[derive(Debug, Clone)]
pub struct SiteConfig {
    /// Shows in logs, metrics and /healthz.
    pub(crate) name: String,
    /// The sled database folder (absolute).
    pub state_dir: PathBuf,
    /// The mapping CSV (absolute).
    pub mapping: PathBuf,
    /// Zone of the server's `expirationTime` and of detection times.
    pub timezone: FixedOffset,
}

/// How the gateway authenticates to Panda.
#[derive(Clone)]
pub enum Auth {
    /// External URL with a `panda-token` header from GenerateToken.
    Token {
        /// GenerateToken `username`.
        username: String,
        /// GenerateToken `password`; never logged.
        password: String,
    },
    /// Internal URL, no token.
    None,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::Token { username, .. } => f
                .debug_struct("Token")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Auth::None => f.write_str("None"),
        }
    }
}

/// `[panda]`.
#[derive(Debug, Clone)]
pub struct PandaConfig {
    /// `scheme://host:port`, no trailing slash.
    pub base_url: String,
    /// The `{projectName}` path segment.
    pub project: String,
    /// Token or internal.
    pub auth: Auth,
    /// `userId` of every request.
    pub user_id: i64,
    /// `FlowDatas[].toUserIds`.
    pub to_user_ids: String,
    /// `FlowDatas[].opinion`.
    pub opinion: String,
    /// One HTTP request, connect included.
    pub timeout: Duration,
    /// FlowDatas per request.
    pub max_batch: usize,
    /// First retry delay after a failed delivery (full jitter up to the current cap).
    pub retry_min: Duration,
    /// Largest retry delay (`max_backoff`, formerly `retry_max`). A failed login backs off to at
    /// most `LOGIN_BACKOFF_MAX` (5 min) whatever this is.
    pub max_backoff: Duration,
    /// Fetch a new token this long before it expires.
    pub refresh_before: Duration,
}

/// `[admin]`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Where the admin HTTP API listens (loopback unless `allow_remote`).
    pub(crate) listen: SocketAddr,
    /// Allow a non-loopback `listen`. The admin API has no authentication and can requeue records.
    pub(crate) allow_remote: bool,
}

/// The longest wait between GenerateToken attempts while the credentials are refused.
pub(crate) const LOGIN_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// `[outbox]`.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// Most records queued before new states stop being committed.
    pub(crate) max_records: u64,
    /// Most bytes of queued records.
    pub(crate) max_bytes: u64,
    /// A record the server refuses on its own this many times moves to the dead letters.
    pub(crate) dead_after: u32,
    /// Least free bytes on the state directory's file system; below it no new state or record is
    /// committed (as when the outbox is full).
    pub(crate) min_free: u64,
    /// Most dead letters kept; at it a refused record stays queued (held) instead.
    pub(crate) max_dead: u64,
}

/// Bounds of the store.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most records.
    pub max_records: u64,
    /// Most bytes (sum of stored record sizes).
    pub max_bytes: u64,
    /// Least free bytes on the state directory's file system for new states and records.
    pub min_free: u64,
    /// Most dead letters.
    pub max_dead: u64,
}

/// `min_free` when none is configured: room for sled to finish what it has begun (its log grows
/// in segments of 512 KiB) and for a day of acknowledgements, small next to any SD card.
pub(crate) const DEFAULT_MIN_FREE: u64 = 64 * 1024 * 1024;
/// `max_dead` when none is configured.
pub(crate) const DEFAULT_MAX_DEAD: u64 = 10_000;

impl Limits {
    /// The defaults of `[outbox]`.
    pub const DEFAULT: Limits = Limits {
        max_records: 100_000,
        max_bytes: 64 * 1024 * 1024,
        min_free: DEFAULT_MIN_FREE,
        max_dead: DEFAULT_MAX_DEAD,
    };
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::DEFAULT
    }
}

impl OutboxConfig {
    /// The bounds of the store.
    pub(crate) fn limits(&self) -> Limits {
        Limits {
            max_records: self.max_records,
            max_bytes: self.max_bytes,
            min_free: self.min_free,
            max_dead: self.max_dead,
        }
    }
}

/// Serial line parity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parity {
    /// No parity bit.
    None,
    /// Even parity.
    Even,
    /// Odd parity.
    Odd,
}

impl Parity {
    /// As written in the TOML and on the command line: `none`, `even`, `odd`.
    pub(crate) fn word(self) -> &'static str {
        match self {
            Parity::None => "none",
            Parity::Even => "even",
            Parity::Odd => "odd",
        }
    }

    /// The letter of the `8N1` notation.
    pub(crate) fn letter(self) -> char {
        match self {
            Parity::None => 'N',
            Parity::Even => 'E',
            Parity::Odd => 'O',
        }
    }
}

/// Where a bus's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Modbus TCP to `host:port`.
    Tcp(String),
    /// Modbus RTU on a local serial device.
    Serial {
        /// Device path, e.g. `/dev/serial/by-id/...`.
        path: String,
        /// Baud rate.
        baud: u32,
        /// Parity.
        parity: Parity,
        /// 7 or 8.
        data_bits: u8,
        /// 1 or 2.
        stop_bits: u8,
        /// `rs485`: the kernel's RS-485 mode, set when the port opens; `None`: the port's mode is
        /// left as it is (USB adapters switch direction by themselves).
        rs485: Option<Rs485>,
    },
    /// Modbus RTU frames over a TCP socket (RS-485 device server).
    RtuOverTcp(String),
}

impl Transport {
    /// Where it goes, for logs and metrics.
    pub(crate) fn endpoint(&self) -> &str {
        match self {
            Transport::Tcp(a) | Transport::RtuOverTcp(a) => a,
            Transport::Serial { path, .. } => path,
        }
    }

    /// Whether frames are RTU (needs frame gaps and a guard time after errors).
    pub(crate) fn is_rtu(&self) -> bool {
        !matches!(self, Transport::Tcp(_))
    }
}

/// `[[bus]] rs485`: the kernel's RS-485 mode of an on-board UART (i.MX, AM335x, Raspberry Pi HATs), whose
/// transceiver's direction (DE/RE) the UART drives with RTS. USB adapters switch direction by themselves
/// and have no such mode. Applied with `TIOCSRS485` after every open of the port (`modbus::rs485`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rs485 {
    /// RTS level while sending (`true`: high). Default `true`.
    pub rts_on_send: bool,
    /// RTS level after sending. Default: the opposite of `rts_on_send` (the kernel refuses both equal).
    pub rts_after_send: bool,
    /// RTS is set this long before the first bit is sent (whole milliseconds, at most 100 ms, the
    /// kernel's limit). Default 0.
    pub delay_before_send: Duration,
    /// RTS is held this long after the last bit (whole milliseconds, at most 100 ms). Default 0.
    pub delay_after_send: Duration,
}

impl Rs485 {
    /// `rs485 = {}`: RTS high while sending, low after, no delays.
    pub const DEFAULT: Rs485 = Rs485 {
        rts_on_send: true,
        rts_after_send: false,
        delay_before_send: Duration::ZERO,
        delay_after_send: Duration::ZERO,
    };
}

/// The longest `rs485` delay: the kernel's own limit (`RS485_MAX_RTS_DELAY`, 100 ms; it clamps longer
/// ones), so what is configured is what the port does.
pub(crate) const MAX_RS485_DELAY: Duration = Duration::from_millis(100);

/// `[[bus]]`.
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// Unique bus name.
    pub(crate) name: String,
    /// Where requests go.
    pub transport: Transport,
    /// One full round over the bus's meters.
    pub(crate) poll_interval: Duration,
    /// One Modbus request.
    pub timeout: Duration,
    /// Consecutive failures before a meter counts as offline.
    pub(crate) offline_after: u32,
    /// How often an offline meter is tried again.
    pub offline_retry: Duration,
    /// Silence after every answer on RTU (at least t3.5 for the baud rate).
    pub(crate) frame_gap: Duration,
    /// Silence after a timeout or error on RTU before the input is cleared, so late answers die.
    pub(crate) guard: Duration,
}

/// A valve point: where its raw value is and what each value means.
#[derive(Debug, Clone, PartialEq)]
pub struct ValveSpec {
    /// Where the raw value is.
    pub point: PointSpec,
    /// Raw value → label.
    pub states: BTreeMap<i64, String>,
}

impl ValveSpec {
    /// The label of a raw value: its mapped label or `未知(<raw>)`.
    pub(crate) fn label(&self, raw: i64) -> std::borrow::Cow<'_, str> {
        // Borrowed: this runs for every sample of every meter.
        match self.states.get(&raw) {
            Some(label) => label.as_str().into(),
            None => format!("未知({raw})").into(),
        }
    }
}

/// A reading written into BizData.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadingSpec {
    /// The BizData key.
    pub field: String,
    /// Where the value is.
    pub point: PointSpec,
}

/// `[[meter]]`, with its profile applied.
#[derive(Debug, Clone)]
pub struct MeterConfig {
    /// The meter number (key into the mapping).
    pub meter_no: String,
    /// Index into [`Config::buses`].
    pub bus: usize,
    /// Modbus unit id, 1..=247.
    pub unit: u8,
    /// The valve.
    pub valve: ValveSpec,
    /// Readings, in order.
    pub readings: Vec<ReadingSpec>,
    /// Equal consecutive samples needed before a new state counts.
    pub confirm: u32,
}

/// The link label a meter gets after `offline_after` failed reads in a row.
pub(crate) const OFFLINE: &str = "离线";
/// The link label of a meter that answers again after being offline.
pub(crate) const ONLINE: &str = "在线";

/// `[[event]]`: one reason for a work order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EventRule {
    /// `eventName` sent to Panda.
    pub(crate) name: String,
    /// What fires it.
    pub(crate) kind: EventKind,
    /// Fixed extra BizData fields (`fields = { 事件说明 = "…" }`), in key order.
    pub(crate) fields: Vec<(String, String)>,
    /// Identity of the rule's persisted memory: its name and definition. Editing a rule's definition
    /// starts its memory afresh (a threshold re-armed, a pending `for` restarted).
    pub(crate) key: String,
}

/// The kinds of `[[event]]` (`point = "valve" | "link" | "reading"`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum EventKind {
    /// `point = "valve"`: the valve's accepted state becomes `to` (from `from`, if given).
    Valve {
        /// Label the valve must reach.
        to: String,
        /// Label the valve must come from, if given.
        from: Option<String>,
    },
    /// `point = "link"`: the meter went offline (`to = "离线"`) or answers again (`to = "在线"`), and
    /// stayed so for `after` (zero when no `for` is given).
    Link {
        /// `true` for `在线`, `false` for `离线`.
        online: bool,
        /// `for`: how long the link must stay so; zero = at once.
        after: Duration,
    },
    /// `point = "reading"` with `below`/`above`: a reading past a limit, with hysteresis.
    Threshold {
        /// The reading's BizData key.
        field: String,
        /// Limit and re-arm level.
        rule: Threshold,
    },
    /// `point = "reading"` with `rises_by`: a reading grew by `by` while the valve stayed in `while_valve`.
    RisesBy {
        /// The reading's BizData key.
        field: String,
        /// The rise that fires.
        by: f64,
        /// The valve label the rise is measured in.
        while_valve: String,
    },
}

impl EventRule {
    /// Whether a valve transition `from → to` fires this rule (only valve rules do).
    pub(crate) fn matches(&self, from: &str, to: &str) -> bool {
        match &self.kind {
            EventKind::Valve { to: t, from: f } => t == to && f.as_deref().is_none_or(|f| f == from),
            _ => false,
        }
    }
}

/// Which side of the limit fires a threshold rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// Fires when the value is below the limit (`below = …`).
    Below,
    /// Fires when the value is above the limit (`above = …`).
    Above,
}

/// A reading threshold with hysteresis: fires when the value goes past `limit`, and only again after
/// it came back to `rearm` (which is `limit` itself when no `rearm` is configured).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold {
    pub(crate) side: Side,
    /// The limit, strictly: `below = 3.3` fires at 3.29, not at 3.30.
    pub(crate) limit: f64,
    /// Re-arm level, inclusive; on the safe side of `limit` or equal to it (config checks).
    pub(crate) rearm: f64,
}

//! The site configuration: TOML text → [`RawConfig`] (serde, unknown keys refused, spans kept) →
//! [`Config`] (validated; every later module trusts it and never checks again).
//!
//! The contract is `../shared/spec/config.md`. Every problem found is reported as a [`ConfigIssue`]
//! with file, line, field and what is allowed; validation collects *all* issues before failing, so a
//! commissioning engineer fixes a file in one pass. The mapping file is loaded here too, because
//! "meter missing from the mapping" is a config error.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::FixedOffset;
use serde::Deserialize;
use toml::Spanned;

pub mod mapping;
pub mod point;

use self::mapping::Mapping;
use self::point::{ByteOrder, PointSpec, Table, ValueType, WordOrder};

/// The name of the environment variable that may carry the Panda password.
pub const PASSWORD_ENV: &str = "FIELDGATE_PANDA_PASSWORD";

/// Which side of the limit fires a threshold rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Fires when the value is below the limit (`below = …`).
    Below,
    /// Fires when the value is above the limit (`above = …`).
    Above,
}

/// A reading threshold with hysteresis: fires when the value goes past `limit`, and only again after
/// it came back to `rearm` (which is `limit` itself when no `rearm` is configured).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold {
    /// Below or above.
    pub side: Side,
    /// The limit, strictly: `below = 3.3` fires at 3.29, not at 3.30.
    pub limit: f64,
    /// Re-arm level, inclusive; on the safe side of `limit` or equal to it (config checks).
    pub rearm: f64,
}

/// One problem in a config or mapping file, located for a person to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The field (dotted path, e.g. `meter[3].unit`), when known.
    pub field: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every issue found in one load; `run` refuses to start on it, `check` prints it and exits 2.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    /// All issues, in file order as far as known.
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.issues.len();
        writeln!(f, "{n} configuration error{}:", if n == 1 { "" } else { "s" })?;
        for issue in &self.issues {
            writeln!(f, "  {issue}")?;
        }
        Ok(())
    }
}

// === raw form (what serde reads) ===

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    site: Spanned<RawSite>,
    panda: Spanned<RawPanda>,
    #[serde(default)]
    admin: Option<Spanned<RawAdmin>>,
    #[serde(default)]
    outbox: Option<Spanned<RawOutbox>>,
    #[serde(default)]
    bus: Vec<Spanned<RawBus>>,
    #[serde(default)]
    profile: BTreeMap<String, Spanned<RawProfile>>,
    #[serde(default)]
    meter: Vec<Spanned<RawMeter>>,
    #[serde(default)]
    event: Vec<Spanned<RawEvent>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    name: String,
    state_dir: String,
    mapping: String,
    #[serde(default)]
    timezone: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPanda {
    base_url: String,
    project: String,
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    password_file: Option<String>,
    user_id: i64,
    #[serde(default)]
    to_user_ids: String,
    #[serde(default)]
    opinion: String,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    max_batch: Option<Spanned<i64>>,
    #[serde(default)]
    retry_min: Option<Spanned<String>>,
    #[serde(default)]
    max_backoff: Option<Spanned<String>>,
    /// The old name of `max_backoff`, still accepted.
    #[serde(default)]
    retry_max: Option<Spanned<String>>,
    #[serde(default)]
    refresh_before: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default)]
    listen: Option<String>,
    #[serde(default)]
    allow_remote: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutbox {
    #[serde(default)]
    max_records: Option<Spanned<i64>>,
    #[serde(default)]
    max_bytes: Option<Spanned<i64>>,
    #[serde(default)]
    dead_after: Option<Spanned<i64>>,
    #[serde(default)]
    min_free: Option<Spanned<RawByteSize>>,
    #[serde(default)]
    max_dead: Option<Spanned<i64>>,
}

/// A byte size as written in the TOML: a number of bytes, or text with a unit (`"64MiB"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawByteSize {
    Bytes(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBus {
    name: String,
    #[serde(default)]
    tcp: Option<String>,
    #[serde(default)]
    serial: Option<String>,
    #[serde(default)]
    rtu_over_tcp: Option<String>,
    #[serde(default)]
    baud: Option<Spanned<i64>>,
    #[serde(default)]
    parity: Option<String>,
    #[serde(default)]
    data_bits: Option<Spanned<i64>>,
    #[serde(default)]
    stop_bits: Option<Spanned<i64>>,
    #[serde(default)]
    poll_interval: Option<Spanned<String>>,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    offline_after: Option<Spanned<i64>>,
    #[serde(default)]
    offline_retry: Option<Spanned<String>>,
    #[serde(default)]
    frame_gap: Option<Spanned<String>>,
    #[serde(default)]
    guard: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawPoint {
    table: String,
    address: Spanned<i64>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    word_order: Option<String>,
    #[serde(default)]
    byte_order: Option<String>,
    #[serde(default)]
    scale: Option<f64>,
    #[serde(default)]
    decimals: Option<Spanned<i64>>,
    #[serde(default)]
    states: Option<BTreeMap<String, String>>,
    #[serde(default)]
    field: Option<String>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    #[serde(default)]
    valve: Option<RawPoint>,
    #[serde(default)]
    readings: Option<Vec<RawPoint>>,
    #[serde(default)]
    confirm: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMeter {
    meter_no: String,
    bus: String,
    unit: Spanned<i64>,
    #[serde(default)]
    profile: Option<String>,
    #[serde(default)]
    valve: Option<RawPoint>,
    #[serde(default)]
    readings: Option<Vec<RawPoint>>,
    #[serde(default)]
    confirm: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    name: String,
    point: Spanned<String>,
    #[serde(default)]
    to: Option<Spanned<String>>,
    #[serde(default)]
    from: Option<Spanned<String>>,
    #[serde(default, rename = "for")]
    after: Option<Spanned<String>>,
    #[serde(default)]
    field: Option<Spanned<String>>,
    #[serde(default)]
    below: Option<Spanned<f64>>,
    #[serde(default)]
    above: Option<Spanned<f64>>,
    #[serde(default)]
    rearm: Option<Spanned<f64>>,
    #[serde(default)]
    rises_by: Option<Spanned<f64>>,
    #[serde(default)]
    while_valve: Option<Spanned<String>>,
    #[serde(default)]
    fields: Option<Spanned<BTreeMap<String, Spanned<toml::Value>>>>,
}

// === validated form ===

/// A validated site configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (relative paths inside resolve against its folder).
    pub path: PathBuf,
    /// `[site]`.
    pub site: SiteConfig,
    /// `[panda]`.
    pub panda: PandaConfig,
    /// `[admin]`.
    pub admin: AdminConfig,
    /// `[outbox]`.
    pub outbox: OutboxConfig,
    /// `[[bus]]`, in file order.
    pub buses: Vec<BusConfig>,
    /// `[[meter]]`, in file order, profiles applied.
    pub meters: Vec<MeterConfig>,
    /// `[[event]]`, in file order.
    pub events: Vec<EventRule>,
    /// The loaded meter → customer table.
    pub mapping: Mapping,
}

/// `[site]`.
#[derive(Debug, Clone)]
pub struct SiteConfig {
    /// Shows in logs, metrics and /healthz.
    pub name: String,
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
    /// most [`LOGIN_BACKOFF_MAX`] whatever this is.
    pub max_backoff: Duration,
    /// Fetch a new token this long before it expires.
    pub refresh_before: Duration,
}

/// `[admin]`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Where the admin HTTP API listens (loopback unless `allow_remote`).
    pub listen: SocketAddr,
    /// Allow a non-loopback `listen`. The admin API has no authentication and can requeue records.
    pub allow_remote: bool,
}

/// The longest wait between GenerateToken attempts while the credentials are refused.
pub const LOGIN_BACKOFF_MAX: Duration = Duration::from_secs(300);

// Upper bounds of every duration and count (`fieldgate check` refuses more, naming the bound). Each
// is far above what a real site needs; they keep a slip of the keyboard ("1000000000years") from
// reaching the timers, where `Instant + Duration` overflows and panics, and from silently turning
// polling or delivery off.

/// `[[bus]] poll_interval`: at most one round an hour.
pub const MAX_POLL_INTERVAL: Duration = Duration::from_secs(3600);
/// `[[bus]] timeout` and `guard`: a Modbus answer takes milliseconds, a slow device server seconds.
pub const MAX_BUS_TIMEOUT: Duration = Duration::from_secs(60);
/// `[[bus]] offline_retry`.
pub const MAX_OFFLINE_RETRY: Duration = Duration::from_secs(3600);
/// `[[bus]] frame_gap`: t3.5 at 300 baud is 128 ms.
pub const MAX_FRAME_GAP: Duration = Duration::from_secs(1);
/// `[panda] timeout`: one HTTP request.
pub const MAX_HTTP_TIMEOUT: Duration = Duration::from_secs(300);
/// `[panda] retry_min` and `max_backoff` (`retry_max`).
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// `[panda] refresh_before`.
pub const MAX_REFRESH_BEFORE: Duration = Duration::from_secs(24 * 3600);
/// `[[event]] for` of a link rule.
pub const MAX_LINK_FOR: Duration = Duration::from_secs(30 * 24 * 3600);
/// `[panda] max_batch`.
pub const MAX_BATCH: i64 = 1000;
/// `[outbox] max_records`: 500 times the default.
pub const MAX_RECORDS: i64 = 100_000_000;
/// `[outbox] max_bytes`: 1 TiB.
pub const MAX_BYTES: i64 = 1 << 40;
/// `[outbox] min_free`: 1 TiB.
pub const MAX_MIN_FREE: u64 = 1 << 40;
/// `[outbox] dead_after`.
pub const MAX_DEAD_AFTER: i64 = 1000;
/// `[outbox] max_dead`.
pub const MAX_DEAD: i64 = 10_000_000;
/// `[[bus]] offline_after`.
pub const MAX_OFFLINE_AFTER: i64 = 1000;
/// `[[meter]] confirm` (and a profile's).
pub const MAX_CONFIRM: i64 = 100;

/// `[outbox]`.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// Most records queued before new states stop being committed.
    pub max_records: u64,
    /// Most bytes of queued records.
    pub max_bytes: u64,
    /// A record the server refuses on its own this many times moves to the dead letters.
    pub dead_after: u32,
    /// Least free bytes on the state directory's file system; below it no new state or record is
    /// committed (as when the outbox is full).
    pub min_free: u64,
    /// Most dead letters kept; at it a refused record stays queued (held) instead.
    pub max_dead: u64,
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
pub const DEFAULT_MIN_FREE: u64 = 64 * 1024 * 1024;
/// `max_dead` when none is configured.
pub const DEFAULT_MAX_DEAD: u64 = 10_000;

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
    pub fn limits(&self) -> Limits {
        Limits {
            max_records: self.max_records,
            max_bytes: self.max_bytes,
            min_free: self.min_free,
            max_dead: self.max_dead,
        }
    }
}

/// Parse a byte size: digits, then optionally a unit `B`, `kB`/`KB`, `KiB`, `MB`, `MiB`, `GB`, `GiB`
/// (any case; decimal units are powers of 1000, binary ones of 1024).
pub fn parse_byte_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: u64 = n.parse().ok()?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "kib" => 1 << 10,
        "mb" => 1000 * 1000,
        "mib" => 1 << 20,
        "gb" => 1000 * 1000 * 1000,
        "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(factor)
}

/// A byte count, short and readable in binary units: `512 B`, `12.3 MiB`, `64 MiB`, `3.1 GiB`.
pub fn format_byte_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = UNITS[0];
    for next in &UNITS[1..] {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    let text = format!("{value:.1}");
    format!("{} {unit}", text.strip_suffix(".0").unwrap_or(&text))
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
    },
    /// Modbus RTU frames over a TCP socket (RS-485 device server).
    RtuOverTcp(String),
}

impl Transport {
    /// Where it goes, for logs and metrics.
    pub fn endpoint(&self) -> &str {
        match self {
            Transport::Tcp(a) | Transport::RtuOverTcp(a) => a,
            Transport::Serial { path, .. } => path,
        }
    }

    /// Whether frames are RTU (needs frame gaps and a guard time after errors).
    pub fn is_rtu(&self) -> bool {
        !matches!(self, Transport::Tcp(_))
    }
}

/// `[[bus]]`.
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// Unique bus name.
    pub name: String,
    /// Where requests go.
    pub transport: Transport,
    /// One full round over the bus's meters.
    pub poll_interval: Duration,
    /// One Modbus request.
    pub timeout: Duration,
    /// Consecutive failures before a meter counts as offline.
    pub offline_after: u32,
    /// How often an offline meter is tried again.
    pub offline_retry: Duration,
    /// Silence after every answer on RTU (at least t3.5 for the baud rate).
    pub frame_gap: Duration,
    /// Silence after a timeout or error on RTU before the input is cleared, so late answers die.
    pub guard: Duration,
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
    pub fn label(&self, raw: i64) -> std::borrow::Cow<'_, str> {
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
pub const OFFLINE: &str = "离线";
/// The link label of a meter that answers again after being offline.
pub const ONLINE: &str = "在线";

/// `[[event]]`: one reason for a work order.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRule {
    /// `eventName` sent to Panda.
    pub name: String,
    /// What fires it.
    pub kind: EventKind,
    /// Fixed extra BizData fields (`fields = { 事件说明 = "…" }`), in key order.
    pub fields: Vec<(String, String)>,
    /// Identity of the rule's persisted memory: its name and definition. Editing a rule's definition
    /// starts its memory afresh (a threshold re-armed, a pending `for` restarted).
    pub key: String,
}

/// The kinds of `[[event]]` (`point = "valve" | "link" | "reading"`).
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
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
    pub fn matches(&self, from: &str, to: &str) -> bool {
        match &self.kind {
            EventKind::Valve { to: t, from: f } => t == to && f.as_deref().is_none_or(|f| f == from),
            _ => false,
        }
    }
}

// === loading ===

/// Read, parse and validate the config at `path`, the mapping it names, and the password source.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| single(path, None, "", &read_error(&e)))?;
    parse(path, &text, &std::env::var(PASSWORD_ENV).ok())
}

/// Parse and validate config text as if it were read from `path` (relative paths resolve
/// against its folder). `env_password` stands for `FIELDGATE_PANDA_PASSWORD`.
pub fn parse(path: &Path, text: &str, env_password: &Option<String>) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        let mut message = e.message().trim().to_string();
        if message.contains("invalid unquoted key") {
            // The first thing people write for `fields = { 事件说明 = "…" }`.
            message.push_str(
                "; a key with other characters (e.g. Chinese) must be quoted: fields = { \"事件说明\" = \"…\" }",
            );
        }
        single(path, line, "", &message)
    })?;
    Validator::new(path, text).validate(raw, env_password)
}

fn single(path: &Path, line: Option<usize>, field: &str, message: &str) -> ConfigError {
    ConfigError {
        issues: vec![ConfigIssue {
            file: path.to_path_buf(),
            line,
            field: field.to_string(),
            message: message.to_string(),
        }],
    }
}

/// A file error in words that say what to do.
pub fn read_error(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "file not found: check the path".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied: the fieldgate user cannot read it".to_string(),
        _ => format!("cannot read: {e}"),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

/// Collects issues while turning the raw form into the validated one.
struct Validator<'a> {
    path: &'a Path,
    text: &'a str,
    dir: PathBuf,
    issues: Vec<ConfigIssue>,
}

impl<'a> Validator<'a> {
    fn new(path: &'a Path, text: &'a str) -> Self {
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        Validator {
            path,
            text,
            dir,
            issues: Vec::new(),
        }
    }

    fn at<T>(&self, s: &Spanned<T>) -> usize {
        line_of(self.text, s.span().start)
    }

    fn issue(&mut self, line: usize, field: impl Into<String>, message: impl Into<String>) {
        self.issues.push(ConfigIssue {
            file: self.path.to_path_buf(),
            line: Some(line),
            field: field.into(),
            message: message.into(),
        });
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    /// A duration: more than zero and at most `max`; reported at its own line.
    fn duration(&mut self, field: &str, v: Option<&Spanned<String>>, default: Duration, max: Duration) -> Duration {
        let Some(v) = v else {
            return default;
        };
        let (line, s) = (self.at(v), v.get_ref());
        let allowed = format!("allowed more than 0 and at most {}", humantime::format_duration(max));
        match humantime::parse_duration(s.trim()) {
            Ok(d) if !d.is_zero() && d <= max => d,
            Ok(_) => {
                self.issue(line, field, format!("`{s}` is out of range: {allowed}"));
                default
            }
            Err(_) => {
                self.issue(
                    line,
                    field,
                    format!(
                        "`{s}` is not a duration: use a number with a unit, e.g. \"300ms\", \"1s\", \"5m\" ({allowed})"
                    ),
                );
                default
            }
        }
    }

    /// A whole number in `lo..=hi`; reported at its own line.
    fn ranged(&mut self, field: &str, v: Option<&Spanned<i64>>, default: i64, lo: i64, hi: i64) -> i64 {
        let Some(v) = v else {
            return default;
        };
        let n = *v.get_ref();
        if (lo..=hi).contains(&n) {
            return n;
        }
        let line = self.at(v);
        self.issue(line, field, format!("{n} is out of range: allowed {lo}..={hi}"));
        default
    }

    fn validate(mut self, raw: RawConfig, env_password: &Option<String>) -> Result<Config, ConfigError> {
        let site = self.site(&raw.site);
        let panda = self.panda(&raw.panda, env_password);
        let admin = self.admin(raw.admin.as_ref());
        let outbox = self.outbox(raw.outbox.as_ref());
        let buses = self.buses(&raw.bus);
        let meters = self.meters(&raw.meter, &raw.profile, &buses);
        let mapping = match Mapping::load(&site.mapping) {
            Ok(m) => m,
            Err(e) => {
                self.issues.extend(e.issues);
                Mapping::default()
            }
        };
        let events = self.events(&raw.event, &meters, &mapping);
        if !mapping.is_empty() {
            for (m, rm) in meters.iter().zip(raw.meter.iter()) {
                if mapping.get(&m.meter_no).is_none() {
                    let line = self.at(rm);
                    self.issue(
                        line,
                        "meter.meter_no",
                        format!(
                            "meter `{}` is not in the mapping file {} (column 水表表号)",
                            m.meter_no,
                            site.mapping.display()
                        ),
                    );
                }
            }
        }
        if !self.issues.is_empty() {
            self.issues.sort_by_key(|i| (i.file.clone(), i.line));
            return Err(ConfigError { issues: self.issues });
        }
        Ok(Config {
            path: self.path.to_path_buf(),
            site,
            panda,
            admin,
            outbox,
            buses,
            meters,
            events,
            mapping,
        })
    }

    fn site(&mut self, s: &Spanned<RawSite>) -> SiteConfig {
        let line = self.at(s);
        let r = s.get_ref();
        let timezone = match &r.timezone {
            None => FixedOffset::east_opt(8 * 3600),
            Some(tz) => parse_offset(tz),
        };
        let timezone = timezone.unwrap_or_else(|| {
            self.issue(line, "site.timezone", "not a UTC offset: use the form \"+08:00\"");
            FixedOffset::east_opt(0).unwrap_or_else(|| unreachable!("zero offset is valid"))
        });
        if r.name.trim().is_empty() {
            self.issue(line, "site.name", "must not be empty");
        }
        SiteConfig {
            name: r.name.clone(),
            state_dir: self.resolve(&r.state_dir),
            mapping: self.resolve(&r.mapping),
            timezone,
        }
    }

    fn panda(&mut self, p: &Spanned<RawPanda>, env_password: &Option<String>) -> PandaConfig {
        let line = self.at(p);
        let r = p.get_ref();
        let base_url = r.base_url.trim_end_matches('/').to_string();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://"))
            || base_url.splitn(4, '/').nth(3).is_some()
        {
            self.issue(
                line,
                "panda.base_url",
                format!(
                    "`{}` must be scheme://host:port with no path, e.g. \"http://10.0.0.5:8080\"",
                    r.base_url
                ),
            );
        }
        let auth = match r.auth.as_deref().unwrap_or("token") {
            "none" => Auth::None,
            "token" => {
                let username = r.username.clone().unwrap_or_default();
                if username.is_empty() {
                    self.issue(line, "panda.username", "required when auth = \"token\"");
                }
                let password = self.password(line, r, env_password);
                Auth::Token { username, password }
            }
            other => {
                self.issue(
                    line,
                    "panda.auth",
                    format!("`{other}` is not allowed: use \"token\" or \"none\""),
                );
                Auth::None
            }
        };
        let timeout = self.duration(
            "panda.timeout",
            r.timeout.as_ref(),
            Duration::from_secs(10),
            MAX_HTTP_TIMEOUT,
        );
        let max_batch = self.ranged("panda.max_batch", r.max_batch.as_ref(), 50, 1, MAX_BATCH) as usize;
        let retry_min = self.duration(
            "panda.retry_min",
            r.retry_min.as_ref(),
            Duration::from_secs(1),
            MAX_BACKOFF,
        );
        if r.max_backoff.is_some() && r.retry_max.is_some() {
            self.issue(
                line,
                "panda.retry_max",
                "is the old name of panda.max_backoff: set only max_backoff",
            );
        }
        let (backoff_field, backoff_value) = match (&r.max_backoff, &r.retry_max) {
            (None, Some(_)) => ("panda.retry_max", &r.retry_max),
            _ => ("panda.max_backoff", &r.max_backoff),
        };
        let max_backoff = self.duration(
            backoff_field,
            backoff_value.as_ref(),
            Duration::from_secs(300),
            MAX_BACKOFF,
        );
        if retry_min > max_backoff {
            self.issue(
                line,
                "panda.retry_min",
                format!("must not be larger than {backoff_field}"),
            );
        }
        let refresh_before = self.duration(
            "panda.refresh_before",
            r.refresh_before.as_ref(),
            Duration::from_secs(60),
            MAX_REFRESH_BEFORE,
        );
        PandaConfig {
            base_url,
            project: r.project.clone(),
            auth,
            user_id: r.user_id,
            to_user_ids: r.to_user_ids.clone(),
            opinion: r.opinion.clone(),
            timeout,
            max_batch,
            retry_min,
            max_backoff,
            refresh_before,
        }
    }

    fn password(&mut self, line: usize, r: &RawPanda, env_password: &Option<String>) -> String {
        if let Some(file) = &r.password_file {
            let path = self.resolve(file);
            return match std::fs::read_to_string(&path) {
                Ok(s) => s.trim_end_matches(['\r', '\n']).to_string(),
                Err(e) => {
                    self.issue(
                        line,
                        "panda.password_file",
                        format!("{}: {}", path.display(), read_error(&e)),
                    );
                    String::new()
                }
            };
        }
        if let Some(p) = r.password.as_ref().filter(|p| !p.is_empty()) {
            return p.clone();
        }
        if let Some(p) = env_password.as_ref().filter(|p| !p.is_empty()) {
            return p.clone();
        }
        self.issue(
            line,
            "panda.password",
            format!("no password: set password_file (preferred), password, or the environment variable {PASSWORD_ENV}"),
        );
        String::new()
    }

    fn admin(&mut self, a: Option<&Spanned<RawAdmin>>) -> AdminConfig {
        let default: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 9898));
        let Some(a) = a else {
            return AdminConfig {
                listen: default,
                allow_remote: false,
            };
        };
        let line = self.at(a);
        let listen = match &a.get_ref().listen {
            None => default,
            Some(s) => s.parse().unwrap_or_else(|_| {
                self.issue(
                    line,
                    "admin.listen",
                    format!("`{s}` is not ip:port, e.g. \"127.0.0.1:9898\""),
                );
                default
            }),
        };
        let allow_remote = a.get_ref().allow_remote.unwrap_or(false);
        if !listen.ip().is_loopback() && !allow_remote {
            self.issue(
                line,
                "admin.listen",
                format!(
                    "`{listen}` is not a loopback address; the admin API has no authentication and can requeue \
                     records: use 127.0.0.1, or set admin.allow_remote = true behind a firewall"
                ),
            );
        }
        AdminConfig { listen, allow_remote }
    }

    fn outbox(&mut self, o: Option<&Spanned<RawOutbox>>) -> OutboxConfig {
        // A large station: 2000 meters, each moving its valve 4 times a day, for 7 days = 56,000
        // records; ~1 KiB each with BizData. Defaults leave ~3.5x head room.
        let (records, bytes, dead_after) = (200_000i64, 256 * 1024 * 1024i64, 5i64);
        let max_dead = DEFAULT_MAX_DEAD as i64;
        let Some(o) = o else {
            return OutboxConfig {
                max_records: records as u64,
                max_bytes: bytes as u64,
                dead_after: dead_after as u32,
                min_free: DEFAULT_MIN_FREE,
                max_dead: max_dead as u64,
            };
        };
        let line = self.at(o);
        let r = o.get_ref();
        OutboxConfig {
            max_records: self.ranged("outbox.max_records", r.max_records.as_ref(), records, 1, MAX_RECORDS) as u64,
            max_bytes: self.ranged("outbox.max_bytes", r.max_bytes.as_ref(), bytes, 1024, MAX_BYTES) as u64,
            dead_after: self.ranged(
                "outbox.dead_after",
                r.dead_after.as_ref(),
                dead_after,
                1,
                MAX_DEAD_AFTER,
            ) as u32,
            min_free: self.byte_size(line, "outbox.min_free", r.min_free.as_ref(), DEFAULT_MIN_FREE),
            max_dead: self.ranged("outbox.max_dead", r.max_dead.as_ref(), max_dead, 1, MAX_DEAD) as u64,
        }
    }

    /// A byte size: at most [`MAX_MIN_FREE`]; reported at its own line (else at `line`, the section's).
    fn byte_size(&mut self, line: usize, field: &str, v: Option<&Spanned<RawByteSize>>, default: u64) -> u64 {
        let Some(v) = v else {
            return default;
        };
        let line = self.at(v).max(line);
        let (parsed, shown) = match v.get_ref() {
            RawByteSize::Bytes(n) => (u64::try_from(*n).ok(), n.to_string()),
            RawByteSize::Text(t) => (parse_byte_size(t), format!("`{t}`")),
        };
        let max = MAX_MIN_FREE;
        match parsed {
            Some(n) if n <= max => n,
            Some(_) => {
                self.issue(
                    line,
                    field,
                    format!("{shown} is out of range: allowed 0 to {max} bytes (1TiB)"),
                );
                default
            }
            None => {
                self.issue(
                    line,
                    field,
                    format!("{shown} is not a byte size: use a number of bytes (0 or more) or text with a unit, e.g. \"64MiB\", \"500MB\", \"1GiB\" (at most 1TiB)"),
                );
                default
            }
        }
    }

    fn buses(&mut self, raw: &[Spanned<RawBus>]) -> Vec<BusConfig> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for (i, b) in raw.iter().enumerate() {
            let line = self.at(b);
            let r = b.get_ref();
            let f = |name: &str| format!("bus[{i}].{name}");
            if !seen.insert(r.name.clone()) {
                self.issue(line, f("name"), format!("bus name `{}` is used twice", r.name));
            }
            let transport = self.transport(line, i, r);
            let poll_interval = self.duration(
                &f("poll_interval"),
                r.poll_interval.as_ref(),
                Duration::from_secs(1),
                MAX_POLL_INTERVAL,
            );
            let timeout = self.duration(
                &f("timeout"),
                r.timeout.as_ref(),
                Duration::from_millis(300),
                MAX_BUS_TIMEOUT,
            );
            let offline_after =
                self.ranged(&f("offline_after"), r.offline_after.as_ref(), 3, 1, MAX_OFFLINE_AFTER) as u32;
            let offline_retry = self.duration(
                &f("offline_retry"),
                r.offline_retry.as_ref(),
                Duration::from_secs(30),
                MAX_OFFLINE_RETRY,
            );
            let default_gap = match &transport {
                Transport::Serial { baud, .. } => frame_gap_for(*baud),
                Transport::RtuOverTcp(_) => Duration::from_millis(4),
                Transport::Tcp(_) => Duration::ZERO,
            };
            let frame_gap = self.duration(&f("frame_gap"), r.frame_gap.as_ref(), default_gap, MAX_FRAME_GAP);
            let guard = self.duration(&f("guard"), r.guard.as_ref(), timeout, MAX_BUS_TIMEOUT);
            out.push(BusConfig {
                name: r.name.clone(),
                transport,
                poll_interval,
                timeout,
                offline_after,
                offline_retry,
                frame_gap,
                guard,
            });
        }
        out
    }

    fn transport(&mut self, line: usize, i: usize, r: &RawBus) -> Transport {
        let kinds = [&r.tcp, &r.serial, &r.rtu_over_tcp]
            .iter()
            .filter(|k| k.is_some())
            .count();
        if kinds != 1 {
            self.issue(
                line,
                format!("bus[{i}]"),
                "give exactly one of: tcp, serial, rtu_over_tcp",
            );
        }
        let serial_only = r.baud.is_some() || r.parity.is_some() || r.data_bits.is_some() || r.stop_bits.is_some();
        if let Some(path) = &r.serial {
            let baud = self.ranged(&format!("bus[{i}].baud"), r.baud.as_ref(), 9600, 300, 4_000_000) as u32;
            let parity = match r.parity.as_deref().unwrap_or("none") {
                "none" => Parity::None,
                "even" => Parity::Even,
                "odd" => Parity::Odd,
                other => {
                    self.issue(
                        line,
                        format!("bus[{i}].parity"),
                        format!("`{other}` is not allowed: use \"none\", \"even\" or \"odd\""),
                    );
                    Parity::None
                }
            };
            let data_bits = self.ranged(&format!("bus[{i}].data_bits"), r.data_bits.as_ref(), 8, 7, 8) as u8;
            let stop_bits = self.ranged(&format!("bus[{i}].stop_bits"), r.stop_bits.as_ref(), 1, 1, 2) as u8;
            return Transport::Serial {
                path: path.clone(),
                baud,
                parity,
                data_bits,
                stop_bits,
            };
        }
        if serial_only {
            self.issue(
                line,
                format!("bus[{i}]"),
                "baud, parity, data_bits and stop_bits are for serial buses only",
            );
        }
        let (addr, is_tcp) = match (&r.tcp, &r.rtu_over_tcp) {
            (Some(a), _) => (a.clone(), true),
            (None, Some(a)) => (a.clone(), false),
            (None, None) => (String::new(), true),
        };
        if kinds == 1 && !valid_host_port(&addr) {
            let key = if is_tcp { "tcp" } else { "rtu_over_tcp" };
            self.issue(
                line,
                format!("bus[{i}].{key}"),
                format!("`{addr}` is not host:port, e.g. \"192.168.1.20:502\""),
            );
        }
        if is_tcp {
            Transport::Tcp(addr)
        } else {
            Transport::RtuOverTcp(addr)
        }
    }

    fn meters(
        &mut self,
        raw: &[Spanned<RawMeter>],
        profiles: &BTreeMap<String, Spanned<RawProfile>>,
        buses: &[BusConfig],
    ) -> Vec<MeterConfig> {
        let mut numbers: HashMap<String, usize> = HashMap::new();
        let mut units: HashMap<(usize, u8), usize> = HashMap::new();
        let mut out = Vec::new();
        for (i, m) in raw.iter().enumerate() {
            let line = self.at(m);
            let r = m.get_ref();
            let f = |name: &str| format!("meter[{i}].{name}");
            if let Some(first) = numbers.insert(r.meter_no.clone(), line) {
                self.issue(
                    line,
                    f("meter_no"),
                    format!("meter `{}` is already defined at line {first}", r.meter_no),
                );
            }
            let bus = match buses.iter().position(|b| b.name == r.bus) {
                Some(b) => b,
                None => {
                    let names: Vec<_> = buses.iter().map(|b| b.name.as_str()).collect();
                    self.issue(
                        line,
                        f("bus"),
                        format!("no bus named `{}`; defined: {}", r.bus, names.join(", ")),
                    );
                    0
                }
            };
            // Only a real bus and a valid unit can clash: a stand-in (bus 0, unit 1) after an error
            // would report a duplicate that is not there.
            let checkable = buses.iter().any(|b| b.name == r.bus) && (1..=247).contains(r.unit.get_ref());
            let unit = self.ranged(&f("unit"), Some(&r.unit), 1, 1, 247) as u8;
            let clash = if checkable {
                units.insert((bus, unit), line)
            } else {
                None
            };
            if let Some(first) = clash {
                self.issue(
                    line,
                    f("unit"),
                    format!(
                        "unit {unit} on bus `{}` is already used by the meter at line {first}",
                        r.bus
                    ),
                );
            }
            let profile = match &r.profile {
                None => None,
                Some(p) => match profiles.get(p) {
                    Some(p) => Some(p.get_ref().clone()),
                    None => {
                        let names: Vec<_> = profiles.keys().map(String::as_str).collect();
                        self.issue(
                            line,
                            f("profile"),
                            format!("no profile named `{p}`; defined: {}", names.join(", ")),
                        );
                        None
                    }
                },
            };
            let valve_raw = r
                .valve
                .clone()
                .or_else(|| profile.as_ref().and_then(|p| p.valve.clone()));
            let readings_raw = r
                .readings
                .clone()
                .or_else(|| profile.as_ref().and_then(|p| p.readings.clone()))
                .unwrap_or_default();
            let confirm_raw = r.confirm.clone().or(profile.as_ref().and_then(|p| p.confirm.clone()));
            let confirm = self.ranged(&f("confirm"), confirm_raw.as_ref(), 1, 1, MAX_CONFIRM) as u32;
            let Some(valve_raw) = valve_raw else {
                self.issue(
                    line,
                    f("valve"),
                    "no valve: give valve = {...} or a profile that has one",
                );
                continue;
            };
            let valve = self.valve(line, &f("valve"), &valve_raw);
            let mut readings = Vec::new();
            let mut fields = HashSet::new();
            for (k, rr) in readings_raw.iter().enumerate() {
                let name = format!("meter[{i}].readings[{k}]");
                let point = self.point(line, &name, rr, false);
                let field = rr.field.clone().unwrap_or_default();
                if field.trim().is_empty() {
                    self.issue(
                        line,
                        format!("{name}.field"),
                        "a reading needs field = \"<BizData key>\"",
                    );
                } else if !fields.insert(field.clone()) || field == "水表表号" || field == "阀门当前状态" {
                    self.issue(
                        line,
                        format!("{name}.field"),
                        format!("field `{field}` is used twice in BizData"),
                    );
                }
                readings.push(ReadingSpec { field, point });
            }
            out.push(MeterConfig {
                meter_no: r.meter_no.clone(),
                bus,
                unit,
                valve,
                readings,
                confirm,
            });
        }
        out
    }

    fn valve(&mut self, line: usize, name: &str, r: &RawPoint) -> ValveSpec {
        let point = self.point(line, name, r, true);
        let mut states = BTreeMap::new();
        match &r.states {
            None => self.issue(
                line,
                format!("{name}.states"),
                "a valve needs states = { 0 = \"关闭\", 1 = \"开启\" }",
            ),
            Some(map) => {
                for (k, v) in map {
                    match k.trim().parse::<i64>() {
                        Ok(n) => {
                            states.insert(n, v.clone());
                        }
                        Err(_) => self.issue(
                            line,
                            format!("{name}.states"),
                            format!("key `{k}` is not an integer raw value"),
                        ),
                    }
                }
            }
        }
        if r.field.is_some() {
            self.issue(
                line,
                format!("{name}.field"),
                "field is for readings; the valve's key is 阀门当前状态",
            );
        }
        ValveSpec { point, states }
    }

    fn point(&mut self, line: usize, name: &str, r: &RawPoint, is_valve: bool) -> PointSpec {
        let table = match r.table.as_str() {
            "coil" => Table::Coil,
            "discrete" => Table::Discrete,
            "holding" => Table::Holding,
            "input" => Table::Input,
            other => {
                self.issue(
                    line,
                    format!("{name}.table"),
                    format!("`{other}` is not allowed: use coil, discrete, holding or input"),
                );
                Table::Holding
            }
        };
        let address = self.ranged(&format!("{name}.address"), Some(&r.address), 0, 0, 65535) as u16;
        let kind = match r.kind.as_deref() {
            None | Some("u16") => ValueType::U16,
            Some("i16") => ValueType::I16,
            Some("u32") => ValueType::U32,
            Some("i32") => ValueType::I32,
            Some("f32") => ValueType::F32,
            Some("u64") => ValueType::U64,
            Some("f64") => ValueType::F64,
            Some(other) => {
                self.issue(
                    line,
                    format!("{name}.type"),
                    format!("`{other}` is not allowed: use u16, i16, u32, i32, f32, u64 or f64"),
                );
                ValueType::U16
            }
        };
        if table.is_bit() && r.kind.is_some() {
            self.issue(
                line,
                format!("{name}.type"),
                "coils and discrete inputs are single bits: remove type",
            );
        }
        if is_valve && matches!(kind, ValueType::F32 | ValueType::F64) {
            self.issue(line, format!("{name}.type"), "a valve state must be an integer type");
        }
        let word_order = match r.word_order.as_deref() {
            None | Some("big") => WordOrder::Big,
            Some("little") => WordOrder::Little,
            Some(other) => {
                self.issue(
                    line,
                    format!("{name}.word_order"),
                    format!("`{other}` is not allowed: use big or little"),
                );
                WordOrder::Big
            }
        };
        let byte_order = match r.byte_order.as_deref() {
            None | Some("big") => ByteOrder::Big,
            Some("little") => ByteOrder::Little,
            Some(other) => {
                self.issue(
                    line,
                    format!("{name}.byte_order"),
                    format!("`{other}` is not allowed: use big or little"),
                );
                ByteOrder::Big
            }
        };
        if let Some(s) = r.scale {
            if !s.is_finite() || s == 0.0 {
                self.issue(
                    line,
                    format!("{name}.scale"),
                    "must be a finite non-zero number, e.g. 0.01",
                );
            }
        }
        let decimals = r
            .decimals
            .as_ref()
            .map(|d| self.ranged(&format!("{name}.decimals"), Some(d), 0, 0, 12) as u32);
        let spec = PointSpec {
            table,
            address,
            kind,
            word_order,
            byte_order,
            scale: r.scale,
            decimals,
        };
        if u32::from(address) + u32::from(spec.count()) > 65536 {
            self.issue(line, format!("{name}.address"), "the value runs past address 65535");
        }
        if r.states.is_some() && !is_valve {
            self.issue(line, format!("{name}.states"), "states are for the valve only");
        }
        spec
    }

    fn events(&mut self, raw: &[Spanned<RawEvent>], meters: &[MeterConfig], mapping: &Mapping) -> Vec<EventRule> {
        let labels: BTreeMap<&str, ()> = meters
            .iter()
            .flat_map(|m| m.valve.states.values())
            .map(|l| (l.as_str(), ()))
            .collect();
        let known: Vec<&str> = labels.keys().copied().collect();
        let read: BTreeMap<&str, ()> = meters
            .iter()
            .flat_map(|m| m.readings.iter())
            .map(|r| (r.field.as_str(), ()))
            .collect();
        let read_known: Vec<&str> = read.keys().copied().collect();
        let mut out = Vec::new();
        for (i, e) in raw.iter().enumerate() {
            let line = self.at(e);
            let r = e.get_ref();
            let f = |k: &str| format!("event[{i}].{k}");
            if r.name.trim().is_empty() {
                self.issue(line, f("name"), "must not be empty (it is the Panda eventName)");
            }
            let point = r.point.get_ref().as_str();
            // Keys each point kind takes; any other key given is an error naming the kind.
            let allowed: &[&str] = match point {
                "valve" => &["to", "from"],
                "link" => &["to", "for"],
                "reading" => &["field", "below", "above", "rearm", "rises_by", "while_valve"],
                other => {
                    let l = self.at(&r.point);
                    self.issue(
                        l,
                        f("point"),
                        format!("`{other}` is not allowed: use \"valve\", \"link\" or \"reading\""),
                    );
                    continue;
                }
            };
            let given: [(&str, Option<usize>); 9] = [
                ("to", r.to.as_ref().map(|v| self.at(v))),
                ("from", r.from.as_ref().map(|v| self.at(v))),
                ("for", r.after.as_ref().map(|v| self.at(v))),
                ("field", r.field.as_ref().map(|v| self.at(v))),
                ("below", r.below.as_ref().map(|v| self.at(v))),
                ("above", r.above.as_ref().map(|v| self.at(v))),
                ("rearm", r.rearm.as_ref().map(|v| self.at(v))),
                ("rises_by", r.rises_by.as_ref().map(|v| self.at(v))),
                ("while_valve", r.while_valve.as_ref().map(|v| self.at(v))),
            ];
            let mut wrong_key = false;
            for (key, at) in given {
                if let Some(l) = at {
                    if !allowed.contains(&key) {
                        wrong_key = true;
                        self.issue(
                            l,
                            f(key),
                            format!(
                                "`{key}` does not apply to point = \"{point}\"; it takes: {}",
                                allowed.join(", ")
                            ),
                        );
                    }
                }
            }
            let fields = self.event_fields(i, r, meters, mapping);
            let kind = match point {
                "valve" => self.valve_event(i, line, r, &labels, &known),
                "link" => self.link_event(i, line, r),
                _ => self.reading_event(i, line, r, &labels, &known, &read, &read_known),
            };
            let (Some(kind), false) = (kind, wrong_key) else {
                continue;
            };
            let key = rule_key(&r.name, &kind);
            out.push(EventRule {
                name: r.name.clone(),
                kind,
                fields,
                key,
            });
        }
        out
    }

    /// A required label key (`to`) or an optional one (`from`, `while_valve`) naming a valve label.
    fn valve_label(
        &mut self,
        line: usize,
        field: String,
        v: Option<&Spanned<String>>,
        labels: &BTreeMap<&str, ()>,
        known: &[&str],
    ) -> Option<String> {
        let v = v?;
        let label = v.get_ref();
        if !labels.contains_key(label.as_str()) && !label.starts_with("未知(") {
            let l = self.at(v).max(line);
            self.issue(
                l,
                field,
                format!(
                    "no valve can take the label `{label}`; labels in use: {}",
                    known.join(", ")
                ),
            );
        }
        Some(label.clone())
    }

    fn valve_event(
        &mut self,
        i: usize,
        line: usize,
        r: &RawEvent,
        labels: &BTreeMap<&str, ()>,
        known: &[&str],
    ) -> Option<EventKind> {
        let to = self.valve_label(line, format!("event[{i}].to"), r.to.as_ref(), labels, known);
        let from = self.valve_label(line, format!("event[{i}].from"), r.from.as_ref(), labels, known);
        let Some(to) = to else {
            self.issue(
                line,
                format!("event[{i}].to"),
                "a valve event needs to = \"<valve label>\", e.g. to = \"开启\"",
            );
            return None;
        };
        Some(EventKind::Valve { to, from })
    }

    fn link_event(&mut self, i: usize, line: usize, r: &RawEvent) -> Option<EventKind> {
        let online = match r.to.as_ref().map(|t| (self.at(t), t.get_ref().as_str())) {
            Some((_, OFFLINE)) => false,
            Some((_, ONLINE)) => true,
            Some((l, other)) => {
                self.issue(
                    l,
                    format!("event[{i}].to"),
                    format!("`{other}` is not allowed for a link event: use \"{OFFLINE}\" or \"{ONLINE}\""),
                );
                return None;
            }
            None => {
                self.issue(
                    line,
                    format!("event[{i}].to"),
                    format!("a link event needs to = \"{OFFLINE}\" or to = \"{ONLINE}\""),
                );
                return None;
            }
        };
        let after = self.duration(
            &format!("event[{i}].for"),
            r.after.as_ref(),
            Duration::ZERO,
            MAX_LINK_FOR,
        );
        Some(EventKind::Link { online, after })
    }

    #[allow(clippy::too_many_arguments)]
    fn reading_event(
        &mut self,
        i: usize,
        line: usize,
        r: &RawEvent,
        labels: &BTreeMap<&str, ()>,
        known: &[&str],
        read: &BTreeMap<&str, ()>,
        read_known: &[&str],
    ) -> Option<EventKind> {
        let f = |k: &str| format!("event[{i}].{k}");
        let Some(field_v) = &r.field else {
            self.issue(
                line,
                f("field"),
                "a reading event needs field = \"<reading field>\", e.g. field = \"电池电压\"",
            );
            return None;
        };
        let field = field_v.get_ref().clone();
        let mut ok = true;
        if !read.contains_key(field.as_str()) {
            let l = self.at(field_v);
            self.issue(
                l,
                f("field"),
                format!(
                    "no meter reads a field `{field}`; readings configured: {}",
                    if read_known.is_empty() {
                        "none".to_string()
                    } else {
                        read_known.join(", ")
                    }
                ),
            );
            ok = false;
        }
        let finite = |this: &mut Self, key: &str, v: &Spanned<f64>| -> bool {
            if v.get_ref().is_finite() {
                true
            } else {
                let l = this.at(v);
                this.issue(l, f(key), "must be a finite number");
                false
            }
        };
        match (&r.below, &r.above, &r.rises_by) {
            (Some(b), Some(a), _) => {
                let l = self.at(a).max(self.at(b));
                self.issue(
                    l,
                    f("above"),
                    "give either below or above, not both: make two events for a band",
                );
                None
            }
            (Some(_), None, Some(v)) | (None, Some(_), Some(v)) => {
                let l = self.at(v);
                self.issue(
                    l,
                    f("rises_by"),
                    "rises_by is its own kind of reading event: do not combine it with below/above",
                );
                None
            }
            (Some(limit), None, None) | (None, Some(limit), None) => {
                let side = if r.below.is_some() { Side::Below } else { Side::Above };
                ok &= finite(self, if side == Side::Below { "below" } else { "above" }, limit);
                if let Some(w) = &r.while_valve {
                    let l = self.at(w);
                    self.issue(l, f("while_valve"), "while_valve goes with rises_by only");
                    ok = false;
                }
                let limit = *limit.get_ref();
                let rearm = match &r.rearm {
                    None => limit,
                    Some(v) => {
                        ok &= finite(self, "rearm", v);
                        let rearm = *v.get_ref();
                        let wrong = match side {
                            Side::Below => rearm <= limit,
                            Side::Above => rearm >= limit,
                        };
                        if wrong {
                            let l = self.at(v);
                            let (key, cmp) = match side {
                                Side::Below => ("below", "greater"),
                                Side::Above => ("above", "smaller"),
                            };
                            self.issue(
                                l,
                                f("rearm"),
                                format!(
                                    "rearm = {rearm} is on the wrong side: with {key} = {limit} it must be {cmp} than {limit} (the value has to come back past it)"
                                ),
                            );
                            ok = false;
                        }
                        rearm
                    }
                };
                ok.then_some(EventKind::Threshold {
                    field,
                    rule: Threshold { side, limit, rearm },
                })
            }
            (None, None, Some(by)) => {
                ok &= finite(self, "rises_by", by);
                let by_v = *by.get_ref();
                if ok && by_v <= 0.0 {
                    let l = self.at(by);
                    self.issue(l, f("rises_by"), "must be greater than 0");
                    ok = false;
                }
                if let Some(v) = &r.rearm {
                    let l = self.at(v);
                    self.issue(
                        l,
                        f("rearm"),
                        "rearm goes with below/above; rises_by re-arms when the valve leaves while_valve",
                    );
                    ok = false;
                }
                let while_valve = self.valve_label(line, f("while_valve"), r.while_valve.as_ref(), labels, known);
                let Some(while_valve) = while_valve else {
                    let l = self.at(by);
                    self.issue(
                        l,
                        f("while_valve"),
                        "rises_by needs while_valve = \"<valve label>\", e.g. while_valve = \"关闭\"",
                    );
                    return None;
                };
                ok.then_some(EventKind::RisesBy {
                    field,
                    by: by_v,
                    while_valve,
                })
            }
            (None, None, None) => {
                self.issue(
                    line,
                    f("below"),
                    "a reading event needs one of: below = N, above = N, or rises_by = N with while_valve",
                );
                None
            }
        }
    }

    /// `fields = { … }`: string values whose keys do not clash with the BizData keys already there.
    fn event_fields(
        &mut self,
        i: usize,
        r: &RawEvent,
        meters: &[MeterConfig],
        mapping: &Mapping,
    ) -> Vec<(String, String)> {
        let Some(table) = &r.fields else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, v) in table.get_ref() {
            let l = self.at(v);
            let name = format!("event[{i}].fields.{k}");
            let clash = k == crate::config::mapping::METER_COLUMN
                || k == crate::config::mapping::VALVE_STATE_KEY
                || mapping.header.iter().any(|h| h == k)
                || meters.iter().any(|m| m.readings.iter().any(|r| &r.field == k));
            if k.trim().is_empty() {
                self.issue(l, name, "a BizData key must not be empty");
            } else if clash {
                self.issue(
                    l,
                    name,
                    format!("`{k}` is already a BizData key (mapping column, 水表表号, 阀门当前状态 or a reading)"),
                );
            } else {
                match v.get_ref() {
                    toml::Value::String(s) => out.push((k.clone(), s.clone())),
                    other => self.issue(
                        l,
                        name,
                        format!(
                            "must be a string (BizData values are strings): write \"{}\"",
                            other.to_string().trim_matches('"')
                        ),
                    ),
                }
            }
        }
        out
    }
}

/// The identity of a rule's memory: name and definition.
fn rule_key(name: &str, kind: &EventKind) -> String {
    match kind {
        EventKind::Valve { to, from } => format!("{name}|valve|{}>{to}", from.as_deref().unwrap_or("*")),
        EventKind::Link { online, after } => format!(
            "{name}|link|{}|{}ms",
            if *online { ONLINE } else { OFFLINE },
            after.as_millis()
        ),
        EventKind::Threshold { field, rule } => format!(
            "{name}|reading|{field}|{}{}|rearm{}",
            if rule.side == Side::Below { "<" } else { ">" },
            rule.limit,
            rule.rearm
        ),
        EventKind::RisesBy { field, by, while_valve } => {
            format!("{name}|reading|{field}|+{by}|while {while_valve}")
        }
    }
}

/// t3.5 for a baud rate, as the Modbus serial line spec fixes it (1.75 ms above 19200).
pub fn frame_gap_for(baud: u32) -> Duration {
    if baud > 19200 {
        Duration::from_micros(1750)
    } else {
        // 3.5 characters of 11 bits.
        Duration::from_micros((3.5 * 11.0 * 1_000_000.0 / f64::from(baud.max(1))).ceil() as u64)
    }
}

fn valid_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}

/// Parse `+08:00`, `-05:30`, `Z` or `UTC`.
pub fn parse_offset(s: &str) -> Option<FixedOffset> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("z") || s.eq_ignore_ascii_case("utc") {
        return FixedOffset::east_opt(0);
    }
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':')?;
    let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
    if !(0..=14).contains(&h) || !(0..60).contains(&m) {
        return None;
    }
    FixedOffset::east_opt(sign * (h * 3600 + m * 60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(format_byte_size(512), "512 B");
        assert_eq!(format_byte_size(64 << 20), "64 MiB");
        assert_eq!(format_byte_size(12_897_485), "12.3 MiB");
        assert_eq!(format_byte_size(3_328_599_655), "3.1 GiB");
        assert_eq!(format_byte_size(u64::MAX), "16384 PiB");
    }

    #[test]
    fn offsets_parse_in_the_forms_people_write() {
        assert_eq!(parse_offset("+08:00"), FixedOffset::east_opt(8 * 3600));
        assert_eq!(parse_offset("-05:30"), FixedOffset::east_opt(-(5 * 3600 + 1800)));
        assert_eq!(parse_offset("Z"), FixedOffset::east_opt(0));
        assert_eq!(parse_offset("8"), None);
        assert_eq!(parse_offset("+25:00"), None);
    }

    #[test]
    fn frame_gap_follows_the_serial_line_spec() {
        assert_eq!(frame_gap_for(9600), Duration::from_micros(4011));
        assert_eq!(frame_gap_for(115200), Duration::from_micros(1750));
    }

    /// Parse a minimal site with `extra` appended to `[panda]` and the given trailing sections.
    fn minimal(panda_extra: &str, sections: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mapping.csv"), "用户编号,水表表号\nU1,M1\n").unwrap();
        let text = format!(
            "[site]\nname = \"s\"\nstate_dir = \"state\"\nmapping = \"mapping.csv\"\n\n\
             [panda]\nbase_url = \"http://127.0.0.1:1\"\nproject = \"demo\"\nauth = \"none\"\nuser_id = 42\n{panda_extra}\n{sections}"
        );
        parse(&dir.path().join("fieldgate.toml"), &text, &None)
    }

    #[test]
    fn max_backoff_has_a_default_and_accepts_its_old_name() {
        let c = minimal("", "").unwrap();
        assert_eq!(c.panda.max_backoff, Duration::from_secs(300));
        assert_eq!(c.outbox.dead_after, 5);
        assert!(!c.admin.allow_remote);
        let c = minimal("max_backoff = \"2m\"", "").unwrap();
        assert_eq!(c.panda.max_backoff, Duration::from_secs(120));
        let c = minimal("retry_max = \"90s\"", "").unwrap();
        assert_eq!(c.panda.max_backoff, Duration::from_secs(90));
        let e = minimal("max_backoff = \"2m\"\nretry_max = \"90s\"", "").unwrap_err();
        assert!(e.to_string().contains("old name of panda.max_backoff"), "{e}");
        let e = minimal("retry_min = \"10m\"", "").unwrap_err();
        assert!(
            e.to_string().contains("must not be larger than panda.max_backoff"),
            "{e}"
        );
    }

    #[test]
    fn dead_after_is_ranged() {
        assert_eq!(minimal("", "[outbox]\ndead_after = 3\n").unwrap().outbox.dead_after, 3);
        let e = minimal("", "[outbox]\ndead_after = 0\n").unwrap_err();
        assert!(e.to_string().contains("outbox.dead_after"), "{e}");
    }

    #[test]
    fn a_remote_admin_address_needs_allow_remote() {
        let e = minimal("", "[admin]\nlisten = \"0.0.0.0:9898\"\n").unwrap_err();
        assert!(e.to_string().contains("allow_remote"), "{e}");
        let c = minimal("", "[admin]\nlisten = \"0.0.0.0:9898\"\nallow_remote = true\n").unwrap();
        assert!(c.admin.allow_remote);
        assert!(minimal("", "[admin]\nlisten = \"[::1]:9898\"\n").is_ok());
    }

    /// One bus, one meter M1 reading 累计流量 and 电池电压, valve 关闭/开启/故障, plus `events`.
    fn with_events(events: &str) -> Result<Config, ConfigError> {
        minimal(
            "",
            &format!(
                "[[bus]]\nname = \"a\"\ntcp = \"127.0.0.1:502\"\n\n\
                 [[meter]]\nmeter_no = \"M1\"\nbus = \"a\"\nunit = 1\n\
                 valve = {{ table = \"holding\", address = 3, states = {{ 0 = \"关闭\", 1 = \"开启\", 2 = \"故障\" }} }}\n\
                 readings = [\n  {{ field = \"累计流量\", table = \"holding\", address = 0, type = \"u32\", scale = 0.01 }},\n  \
                 {{ field = \"电池电压\", table = \"holding\", address = 2, scale = 0.01 }},\n]\n\n{events}"
            ),
        )
    }

    fn error_lines(e: &ConfigError) -> Vec<(usize, String, String)> {
        e.issues
            .iter()
            .map(|i| (i.line.unwrap_or(0), i.field.clone(), i.message.clone()))
            .collect()
    }

    #[test]
    fn every_event_kind_parses_into_its_rule() {
        let c = with_events(
            r#"
[[event]]
name = "用水户开阀"
point = "valve"
to = "开启"

[[event]]
name = "阀门故障"
point = "valve"
to = "故障"
fields = { "事件说明" = "阀门报告故障" }

[[event]]
name = "水表离线"
point = "link"
to = "离线"
for = "10m"

[[event]]
name = "水表恢复"
point = "link"
to = "在线"

[[event]]
name = "电池电压低"
point = "reading"
field = "电池电压"
below = 3.3
rearm = 3.4

[[event]]
name = "流量过大"
point = "reading"
field = "累计流量"
above = 9000

[[event]]
name = "关阀后仍有流量"
point = "reading"
field = "累计流量"
rises_by = 0.01
while_valve = "关闭"
"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let kinds: Vec<&EventKind> = c.events.iter().map(|e| &e.kind).collect();
        assert_eq!(
            kinds[0],
            &EventKind::Valve {
                to: "开启".into(),
                from: None
            }
        );
        assert_eq!(
            c.events[1].fields,
            [("事件说明".to_string(), "阀门报告故障".to_string())]
        );
        assert_eq!(
            kinds[2],
            &EventKind::Link {
                online: false,
                after: Duration::from_secs(600)
            }
        );
        assert_eq!(
            kinds[3],
            &EventKind::Link {
                online: true,
                after: Duration::ZERO
            }
        );
        assert_eq!(
            kinds[4],
            &EventKind::Threshold {
                field: "电池电压".into(),
                rule: Threshold {
                    side: Side::Below,
                    limit: 3.3,
                    rearm: 3.4
                }
            }
        );
        assert_eq!(
            kinds[5],
            &EventKind::Threshold {
                field: "累计流量".into(),
                rule: Threshold {
                    side: Side::Above,
                    limit: 9000.0,
                    rearm: 9000.0
                }
            },
            "no rearm: re-armed at the limit"
        );
        assert_eq!(
            kinds[6],
            &EventKind::RisesBy {
                field: "累计流量".into(),
                by: 0.01,
                while_valve: "关闭".into()
            }
        );
        let keys: HashSet<&str> = c.events.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys.len(), 7, "every rule has its own memory");
    }

    #[test]
    fn bad_event_rules_are_reported_with_their_line() {
        let events = r#"
[[event]]
name = "a"
point = "valve"
to = "半开"

[[event]]
name = "b"
point = "reading"
field = "水压"
below = 1

[[event]]
name = "c"
point = "reading"
field = "电池电压"
below = 3.3
rearm = 3.2

[[event]]
name = "d"
point = "reading"
field = "电池电压"
above = 3.3
rearm = 3.4

[[event]]
name = "e"
point = "reading"
field = "电池电压"
below = 3.3
above = 4.0

[[event]]
name = "f"
point = "link"
to = "离线"
field = "电池电压"

[[event]]
name = "g"
point = "valve"
to = "开启"
for = "5m"

[[event]]
name = "h"
point = "link"
to = "掉线"

[[event]]
name = "i"
point = "reading"
field = "累计流量"
rises_by = 0.01
while_valve = "关上"

[[event]]
name = "j"
point = "reading"
field = "累计流量"
rises_by = 0.01

[[event]]
name = "k"
point = "valve"
to = "关闭"
fields = { "水表表号" = "x", "优先级" = 1 }

[[event]]
name = "l"
point = "reading"
field = "电池电压"
"#;
        let e = with_events(events).expect_err("every rule above is wrong");
        let got = error_lines(&e);
        assert!(with_events("").is_ok(), "the base is valid");
        let expect = [
            ("to = \"半开\"", "event[0].to", "no valve can take the label `半开`"),
            ("field = \"水压\"", "event[1].field", "no meter reads a field `水压`"),
            ("rearm = 3.2", "event[2].rearm", "must be greater than 3.3"),
            ("rearm = 3.4", "event[3].rearm", "must be smaller than 3.3"),
            ("above = 4.0", "event[4].above", "either below or above"),
            (
                "field = \"电池电压\"\n\n[[event]]\nname = \"g\"",
                "event[5].field",
                "does not apply to point = \"link\"",
            ),
            ("for = \"5m\"", "event[6].for", "does not apply to point = \"valve\""),
            ("to = \"掉线\"", "event[7].to", "use \"离线\" or \"在线\""),
            (
                "while_valve = \"关上\"",
                "event[8].while_valve",
                "no valve can take the label `关上`",
            ),
            (
                "rises_by = 0.01\n\n[[event]]\nname = \"k\"",
                "event[9].while_valve",
                "rises_by needs while_valve",
            ),
            (
                "\"水表表号\" = \"x\"",
                "event[10].fields.水表表号",
                "already a BizData key",
            ),
            ("\"优先级\" = 1", "event[10].fields.优先级", "must be a string"),
            ("name = \"l\"", "event[11].below", "needs one of: below"),
        ];
        let full = "[site]\nname = \"s\"\nstate_dir = \"state\"\nmapping = \"mapping.csv\"\n\n\
             [panda]\nbase_url = \"http://127.0.0.1:1\"\nproject = \"demo\"\nauth = \"none\"\nuser_id = 42\n\n";
        let prefix_lines = full.lines().count()
            + "[[bus]]\nname = \"a\"\ntcp = \"127.0.0.1:502\"\n\n[[meter]]\nmeter_no = \"M1\"\nbus = \"a\"\nunit = 1\nvalve\nreadings = [\n  r1,\n  r2,\n]\n\n"
                .lines()
                .count();
        for (needle, field, msg) in expect {
            let found = got.iter().find(|(_, f, m)| f == field && m.contains(msg));
            let Some((line, _, _)) = found else {
                panic!("no issue {field}: {msg} in\n{e}");
            };
            let at = events.find(needle).map(|o| events[..o].matches('\n').count() + 1);
            // Lines of the events block start after the site, panda, bus and meter sections.
            let want = at.map(|a| a + prefix_lines);
            // A rule whose problem is a missing key is reported at its [[event]] header or first key.
            if needle.starts_with("name =") {
                let l = *line;
                assert!(
                    want.is_some_and(|w| l + 2 >= w && l <= w),
                    "{field} at line {l}, want ~{want:?}\n{e}"
                );
            } else {
                assert_eq!(Some(*line), want, "{field}: {msg}\n{e}");
            }
        }
        assert_eq!(got.len(), expect.len(), "{e}");
    }

    #[test]
    fn an_unquoted_chinese_key_gets_a_hint() {
        let e =
            with_events("[[event]]\nname = \"x\"\npoint = \"valve\"\nto = \"关闭\"\nfields = { 事件说明 = \"y\" }\n")
                .expect_err("bare non-ASCII keys are not TOML");
        assert!(e.to_string().contains("must be quoted"), "{e}");
    }

    #[test]
    fn old_event_configs_stay_valid() {
        let c = with_events("[[event]]\nname = \"用水户关阀\"\npoint = \"valve\"\nto = \"关闭\"\nfrom = \"开启\"\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(c.events[0].matches("开启", "关闭"));
        assert!(!c.events[0].matches("故障", "关闭"));
        assert!(c.events[0].fields.is_empty());
    }

    /// A site with every section, each with a `#KEY` marker where a test puts one more line.
    const EVERY_SECTION: &str = r#"[site]
name = "s"
state_dir = "state"
mapping = "mapping.csv"

[panda]
base_url = "http://127.0.0.1:1"
project = "demo"
auth = "none"
user_id = 42
#PANDA

[outbox]
#OUTBOX

[[bus]]
name = "a"
tcp = "127.0.0.1:502"
#BUS

[[bus]]
name = "s"
serial = "/dev/ttyUSB0"
#SERIAL

[profile.p]
valve = { table = "coil", address = 0, states = { 0 = "关闭", 1 = "开启" } }
#PROFILE

[[meter]]
meter_no = "M1"
bus = "a"
unit = 1
valve = { table = "coil", address = 0, states = { 0 = "关闭", 1 = "开启" } }
#METER

[[meter]]
meter_no = "M2"
bus = "s"
unit = 1
profile = "p"

[[event]]
name = "水表离线"
point = "link"
to = "离线"
#EVENT
"#;

    /// [`EVERY_SECTION`] with `line` at `marker`; the text and the result.
    fn with_line(marker: &str, line: &str) -> (String, Result<Config, ConfigError>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mapping.csv"), "用户编号,水表表号\nU1,M1\nU2,M2\n").unwrap();
        let text = EVERY_SECTION.replace(&format!("#{marker}"), line);
        let r = parse(&dir.path().join("fieldgate.toml"), &text, &None);
        (text, r)
    }

    #[test]
    fn every_duration_and_count_has_an_upper_bound_reported_at_its_own_line() {
        if let Err(e) = with_line("NONE", "").1 {
            panic!("the base is valid: {e}");
        }
        // (section marker, the line, field, what the message says is allowed)
        let cases = [
            ("PANDA", "timeout = \"1000000000years\"", "panda.timeout", "at most 5m"),
            ("PANDA", "retry_min = \"2h\"", "panda.retry_min", "at most 1h"),
            (
                "PANDA",
                "max_backoff = \"1000000000years\"",
                "panda.max_backoff",
                "at most 1h",
            ),
            (
                "PANDA",
                "retry_max = \"1000000000years\"",
                "panda.retry_max",
                "at most 1h",
            ),
            (
                "PANDA",
                "refresh_before = \"400days\"",
                "panda.refresh_before",
                "at most 1day",
            ),
            ("PANDA", "max_batch = 1001", "panda.max_batch", "allowed 1..=1000"),
            (
                "OUTBOX",
                "max_records = 9223372036854775807",
                "outbox.max_records",
                "allowed 1..=100000000",
            ),
            (
                "OUTBOX",
                "max_bytes = 9223372036854775807",
                "outbox.max_bytes",
                "allowed 1024..=1099511627776",
            ),
            ("OUTBOX", "dead_after = 1001", "outbox.dead_after", "allowed 1..=1000"),
            (
                "OUTBOX",
                "max_dead = 10000001",
                "outbox.max_dead",
                "allowed 1..=10000000",
            ),
            (
                "OUTBOX",
                "min_free = \"2048GiB\"",
                "outbox.min_free",
                "allowed 0 to 1099511627776 bytes",
            ),
            (
                "OUTBOX",
                "min_free = 1099511627777",
                "outbox.min_free",
                "allowed 0 to 1099511627776 bytes",
            ),
            (
                "BUS",
                "poll_interval = \"1000000000years\"",
                "bus[0].poll_interval",
                "at most 1h",
            ),
            ("BUS", "timeout = \"1000000000years\"", "bus[0].timeout", "at most 1m"),
            (
                "BUS",
                "offline_after = 100000",
                "bus[0].offline_after",
                "allowed 1..=1000",
            ),
            (
                "BUS",
                "offline_retry = \"1000000000years\"",
                "bus[0].offline_retry",
                "at most 1h",
            ),
            ("BUS", "frame_gap = \"2s\"", "bus[0].frame_gap", "at most 1s"),
            ("BUS", "guard = \"1000000000years\"", "bus[0].guard", "at most 1m"),
            ("SERIAL", "baud = 4000001", "bus[1].baud", "allowed 300..=4000000"),
            ("SERIAL", "data_bits = 9", "bus[1].data_bits", "allowed 7..=8"),
            ("SERIAL", "stop_bits = 3", "bus[1].stop_bits", "allowed 1..=2"),
            ("PROFILE", "confirm = 101", "meter[1].confirm", "allowed 1..=100"),
            ("METER", "confirm = 1000000", "meter[0].confirm", "allowed 1..=100"),
            (
                "METER",
                "readings = [ { field = \"f\", table = \"holding\", address = 70000 } ]",
                "meter[0].readings[0].address",
                "allowed 0..=65535",
            ),
            (
                "METER",
                "readings = [ { field = \"f\", table = \"holding\", address = 1, decimals = 13 } ]",
                "meter[0].readings[0].decimals",
                "allowed 0..=12",
            ),
            ("EVENT", "for = \"1000000000years\"", "event[0].for", "at most 30days"),
        ];
        for (marker, line, field, allowed) in cases {
            let (text, r) = with_line(marker, line);
            let e = r.expect_err(line);
            assert_eq!(e.issues.len(), 1, "{line}: one error\n{e}");
            let issue = &e.issues[0];
            let want = text.lines().position(|l| l == line).map(|i| i + 1);
            assert_eq!(issue.line, want, "{line}: at its own line\n{e}");
            assert_eq!(issue.field, field, "{line}\n{e}");
            assert!(
                issue.message.contains("out of range") && issue.message.contains(allowed),
                "{line}: says what is allowed ({allowed})\n{e}"
            );
            assert!(issue.to_string().contains("fieldgate.toml:"), "{e}");
        }
    }

    #[test]
    fn a_duration_at_its_bound_passes_and_one_past_it_is_refused() {
        let (_, r) = with_line("BUS", "poll_interval = \"1h\"");
        assert_eq!(r.unwrap().buses[0].poll_interval, MAX_POLL_INTERVAL);
        let (_, r) = with_line("BUS", "poll_interval = \"3601s\"");
        assert!(r.unwrap_err().to_string().contains("`3601s` is out of range"));
        let (_, r) = with_line("EVENT", "for = \"30days\"");
        assert!(matches!(r.unwrap().events[0].kind, EventKind::Link { after, .. } if after == MAX_LINK_FOR));
        let (_, r) = with_line("BUS", "timeout = \"0s\"");
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("`0s` is out of range: allowed more than 0 and at most 1m"),
            "{e}"
        );
        // A number too large even for humantime is still one located error.
        let (_, r) = with_line("BUS", "offline_retry = \"99999999999999999999999s\"");
        let e = r.unwrap_err();
        assert_eq!(e.issues.len(), 1, "{e}");
        assert!(e.issues[0].message.contains("is not a duration"), "{e}");
    }

    #[test]
    fn host_port_needs_both_parts() {
        assert!(valid_host_port("10.0.0.1:502"));
        assert!(valid_host_port("gw.local:4001"));
        assert!(!valid_host_port("10.0.0.1"));
        assert!(!valid_host_port(":502"));
        assert!(!valid_host_port("a:0"));
    }
}

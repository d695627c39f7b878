//! The validator: TOML text → [`RawConfig`] → [`Config`], collecting every issue before it fails.
//!
//! This file: the entry points ([`load`], [`parse`]), the upper bound of every duration and count,
//! the [`Validator`] with the checks every section shares (a duration, a ranged number, a byte size,
//! a path resolved against the config's folder) and the order the parts are checked in. One file
//! per part of the TOML, each an `impl Validator` block:
//! - `sections.rs`: `[site]`, `[panda]` (and its password), `[admin]`, `[outbox]`;
//! - `buses.rs`: `[[bus]]` and its transport;
//! - `meters.rs`: `[[meter]]` with its profile, its valve and its reading points;
//! - `events.rs`: `[[event]]` rules.
//!
//! It reads the config file, the mapping and the `password_file` it names, and the
//! `FIELDGATE_PANDA_PASSWORD` environment variable; nothing else, and it writes nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use crate::config::error::{line_of, read_error, single, ConfigError, ConfigIssue};
use crate::config::mapping::Mapping;
use crate::config::raw::{RawByteSize, RawConfig};
use crate::config::types::Config;
use crate::config::units::parse_byte_size;

mod buses;
pub(crate) use self::buses::parse_rs485_option;
mod events;
mod meters;
mod sections;
#[cfg(test)]
mod test_sites;

pub(crate) use buses::frame_gap_for;

/// The name of the environment variable that may carry the Panda password.
const PASSWORD_ENV: &str = "FIELDGATE_PANDA_PASSWORD";

// Upper bounds of every duration and count (`fieldgate check` refuses more, naming the bound). Each
// is far above what a real site needs; they keep a slip of the keyboard ("1000000000years") from
// reaching the timers, where `Instant + Duration` overflows and panics, and from silently turning
// polling or delivery off.

/// `[[bus]] poll_interval`: at most one round an hour.
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(3600);
/// `[[bus]] timeout` and `guard`: a Modbus answer takes milliseconds, a slow device server seconds.
const MAX_BUS_TIMEOUT: Duration = Duration::from_secs(60);
/// `[[bus]] offline_retry`.
const MAX_OFFLINE_RETRY: Duration = Duration::from_secs(3600);
/// `[[bus]] frame_gap`: t3.5 at 300 baud is 128 ms.
const MAX_FRAME_GAP: Duration = Duration::from_secs(1);
/// `[panda] timeout`: one HTTP request.
const MAX_HTTP_TIMEOUT: Duration = Duration::from_secs(300);
/// `[panda] retry_min` and `max_backoff` (`retry_max`).
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// `[panda] refresh_before`.
const MAX_REFRESH_BEFORE: Duration = Duration::from_secs(24 * 3600);
/// `[[event]] for` of a link rule.
const MAX_LINK_FOR: Duration = Duration::from_secs(30 * 24 * 3600);
/// `[panda] max_batch`.
const MAX_BATCH: i64 = 1000;
/// `[outbox] max_records`: 500 times the default.
const MAX_RECORDS: i64 = 100_000_000;
/// `[outbox] max_bytes`: 1 TiB.
const MAX_BYTES: i64 = 1 << 40;
/// `[outbox] min_free`: 1 TiB.
const MAX_MIN_FREE: u64 = 1 << 40;
/// `[outbox] dead_after`.
const MAX_DEAD_AFTER: i64 = 1000;
/// `[outbox] max_dead`.
const MAX_DEAD: i64 = 10_000_000;
/// `[[bus]] offline_after`.
const MAX_OFFLINE_AFTER: i64 = 1000;
/// `[[meter]] confirm` (and a profile's).
const MAX_CONFIRM: i64 = 100;

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
}

#[cfg(test)]
mod tests {
    use super::test_sites::with_events;
    use super::*;
    use crate::config::types::{EventKind, Rs485, Transport};

    #[test]
    fn an_unquoted_chinese_key_gets_a_hint() {
        let e =
            with_events("[[event]]\nname = \"x\"\npoint = \"valve\"\nto = \"关闭\"\nfields = { 事件说明 = \"y\" }\n")
                .expect_err("bare non-ASCII keys are not TOML");
        assert!(e.to_string().contains("must be quoted"), "{e}");
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
            (
                "SERIAL",
                "rs485 = { delay_before_send = \"101ms\" }",
                "bus[1].rs485.delay_before_send",
                "allowed 0ms to 100ms",
            ),
            (
                "SERIAL",
                "rs485 = { delay_after_send = \"1000000000years\" }",
                "bus[1].rs485.delay_after_send",
                "allowed 0ms to 100ms",
            ),
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
    fn rs485_is_read_with_its_defaults_and_absent_leaves_the_port_alone() {
        let serial = |r: Result<Config, ConfigError>| match r.unwrap_or_else(|e| panic!("{e}")).buses[1].transport {
            Transport::Serial { rs485, .. } => rs485,
            ref other => panic!("{other:?}"),
        };
        assert_eq!(
            serial(with_line("NONE", "").1),
            None,
            "absent: the port's mode is not touched"
        );
        assert_eq!(serial(with_line("SERIAL", "rs485 = {}").1), Some(Rs485::DEFAULT));
        let ms = Duration::from_millis;
        let cases = [
            ("rs485 = { rts_on_send = false }", (false, true, 0, 0)),
            ("rs485 = { rts_after_send = true }", (false, true, 0, 0)),
            ("rs485 = { rts_after_send = false }", (true, false, 0, 0)),
            (
                "rs485 = { rts_on_send = true, rts_after_send = false, delay_before_send = \"0ms\", delay_after_send = \"0ms\" }",
                (true, false, 0, 0),
            ),
            (
                "rs485 = { delay_before_send = \"2ms\", delay_after_send = \"100ms\" }",
                (true, false, 2, 100),
            ),
        ];
        for (line, (on, after, before_ms, after_ms)) in cases {
            assert_eq!(
                serial(with_line("SERIAL", line).1),
                Some(Rs485 {
                    rts_on_send: on,
                    rts_after_send: after,
                    delay_before_send: ms(before_ms),
                    delay_after_send: ms(after_ms),
                }),
                "{line}"
            );
        }
    }

    #[test]
    fn every_rs485_mistake_is_one_error_at_its_own_line() {
        // (marker, the line, field, words of the message)
        let cases = [
            ("BUS", "rs485 = {}", "bus[0].rs485", "rs485 is for serial buses only"),
            (
                "SERIAL",
                "rs485 = { rts_on_send = true, rts_after_send = true }",
                "bus[1].rs485.rts_after_send",
                "are both true",
            ),
            (
                "SERIAL",
                "rs485 = { rts_on_send = false, rts_after_send = false }",
                "bus[1].rs485.rts_after_send",
                "are both false",
            ),
            (
                "SERIAL",
                "rs485 = { delay_before_send = \"1500us\" }",
                "bus[1].rs485.delay_before_send",
                "`1500us` is not a whole number of milliseconds: allowed 0ms to 100ms",
            ),
            (
                "SERIAL",
                "rs485 = { delay_after_send = \"soon\" }",
                "bus[1].rs485.delay_after_send",
                "`soon` is not a duration",
            ),
        ];
        for (marker, line, field, words) in cases {
            let (text, r) = with_line(marker, line);
            let e = r.expect_err(line);
            assert_eq!(e.issues.len(), 1, "{line}: one error\n{e}");
            let issue = &e.issues[0];
            let want = text.lines().position(|l| l == line).map(|i| i + 1);
            assert_eq!(issue.line, want, "{line}: at its own line\n{e}");
            assert_eq!(issue.field, field, "{line}\n{e}");
            assert!(issue.message.contains(words), "{line}: says `{words}`\n{e}");
        }
        // Keys and types: each error names the key and what is allowed, at the key's own line.
        let cases = [
            (
                "[bus.rs485]\nrts_on_sent = true",
                "rts_on_sent = true",
                "bus[1].rs485.rts_on_sent",
                "unknown key: the keys of rs485 are rts_on_send, rts_after_send, delay_before_send, delay_after_send",
            ),
            (
                "[bus.rs485]\nrts_on_send = 1",
                "rts_on_send = 1",
                "bus[1].rs485.rts_on_send",
                "`1` is not true or false",
            ),
            (
                "[bus.rs485]\ndelay_after_send = 2",
                "delay_after_send = 2",
                "bus[1].rs485.delay_after_send",
                "`2` is not a duration: write it as text, e.g. \"2ms\"",
            ),
        ];
        for (lines, line, field, words) in cases {
            let (text, r) = with_line("SERIAL", lines);
            let e = r.expect_err(lines);
            assert_eq!(e.issues.len(), 1, "{lines}: one error\n{e}");
            let want = text.lines().position(|l| l == line).map(|i| i + 1);
            assert_eq!(e.issues[0].line, want, "{lines}: at its own line\n{e}");
            assert_eq!(e.issues[0].field, field, "{e}");
            assert!(e.issues[0].message.contains(words), "{lines}: says `{words}`\n{e}");
        }
    }

    #[test]
    fn the_probe_option_takes_the_same_keys_defaults_and_bounds() {
        assert_eq!(parse_rs485_option(""), Ok(Rs485::DEFAULT));
        assert_eq!(
            parse_rs485_option("rts_on_send=false, delay_before_send=\"3ms\",delay_after_send=1ms"),
            Ok(Rs485 {
                rts_on_send: false,
                rts_after_send: true,
                delay_before_send: Duration::from_millis(3),
                delay_after_send: Duration::from_millis(1),
            })
        );
        for (bad, words) in [
            ("delay_before_send=200ms", "allowed 0ms to 100ms"),
            ("rts_on_send=yes", "`yes` is not true or false"),
            ("rts_on_send=true,rts_after_send=true", "are both true"),
            ("rts", "is not KEY=VALUE"),
            ("speed=fast", "speed: unknown key: the keys of rs485 are rts_on_send,"),
        ] {
            let e = parse_rs485_option(bad).expect_err(bad);
            assert!(e.contains(words), "{bad}: {e}");
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
}

//! `GET /metrics`: every counter and gauge of the daemon in the Prometheus text format (version 0.0.4),
//! written by hand: the format is a few lines per family and not worth a dependency.
//!
//! Names follow `fieldgate_<name>_<unit>` for gauges and `fieldgate_<name>_total` for counters; every
//! family has `# HELP` and `# TYPE` lines. Label sets are bounded: `bus` and `meter` come from the
//! configuration, `kind` and `outcome` from fixed lists ([`ERROR_KINDS`], [`HTTP_OUTCOMES`]). Counters
//! start at zero with the process. A value that is not known is left out, its family still declared (a
//! meter's age before its first answer, the free space when it cannot be read, the clock's sync state
//! where the kernel cannot be asked).
//!
//! Gathering reads the store's counts only (queued, dead letters, set-aside entries are counted in
//! memory) and at most one queued record (the oldest): a scrape costs the same with 10 dead letters or
//! 10,000, and answers while the store is failed (`fieldgate_store_failed 1`).
//!
//! Split in two: [`gather`] copies the numbers out of the running daemon ([`Metrics`], plain data), and
//! [`encode`] turns them into text; `encode` is pure and tested on its own.

use std::fmt::Write as _;

use crate::clock::ClockSync;
use crate::delivery::sender::stats::SenderSnapshot;
use crate::modbus::stats::BusStatsSnapshot;
use crate::ops::api::{OutboxCounts, Status};
use crate::ops::health::health;
use crate::ops::sources::AdminState;

/// The `Content-Type` of the text format.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Values of the `kind` label of `fieldgate_bus_errors_total`.
const ERROR_KINDS: [&str; 4] = ["exception", "timeout", "protocol", "transport"];

/// Values of the `outcome` label of `fieldgate_http_requests_total`.
const HTTP_OUTCOMES: [&str; 5] = ["ok", "rejected", "transient", "unauthorized", "login_failed"];

/// One meter's numbers.
#[derive(Debug, Clone, PartialEq)]
struct MeterMetrics {
    /// `meter_no`.
    meter: String,
    /// Answering.
    online: bool,
    /// Seconds since the last answer; `None` before the first (the series is left out then).
    last_sample_age: Option<f64>,
    /// The slowest of its recent answer times, seconds (`crate::modbus::bus::MeterLink`); `None` before one.
    answer_max: Option<f64>,
    /// Its requests not answered within the bus timeout.
    timeouts: u64,
    /// Answers that came after the timeout (seen on RTU only).
    late_answers: u64,
}

/// Everything `/metrics` shows, copied out of the daemon at one moment.
#[derive(Debug, Clone, PartialEq)]
struct Metrics {
    /// The crate version.
    version: String,
    /// Health at this moment.
    health: Status,
    /// The system clock's sync state, as `/healthz` reports it.
    clock: ClockSync,
    /// (bus name, its counters), in configuration order.
    buses: Vec<(String, BusStatsSnapshot)>,
    /// In configuration order.
    meters: Vec<MeterMetrics>,
    /// Valve transitions committed.
    transitions: u64,
    outbox: OutboxCounts,
    sender: SenderSnapshot,
}

/// Copy the numbers out of the running daemon.
fn gather(state: &AdminState) -> Metrics {
    let health = health(state);
    let (buses, meters) = match state.field_view() {
        Some(field) => {
            let buses = field
                .cfg
                .buses
                .iter()
                .zip(&field.buses)
                .map(|(b, s)| (b.name.clone(), s.snapshot()))
                .collect();
            let live = field.live.snapshot();
            let meters = field
                .cfg
                .meters
                .iter()
                .zip(live)
                .map(|(m, v)| {
                    let link = field.buses.get(m.bus).and_then(|b| b.meter_link(&m.meter_no));
                    MeterMetrics {
                        meter: m.meter_no.clone(),
                        online: v.online,
                        last_sample_age: v.last_sample.map(|t| t.elapsed().as_secs_f64()),
                        answer_max: link.and_then(|l| l.answer_max).map(|d| d.as_secs_f64()),
                        timeouts: link.map_or(0, |l| l.timeouts),
                        late_answers: link.map_or(0, |l| l.late_answers),
                    }
                })
                .collect();
            (buses, meters)
        }
        None => (Vec::new(), Vec::new()),
    };
    Metrics {
        version: env!("CARGO_PKG_VERSION").to_string(),
        health: health.status,
        clock: health.clock.sync,
        buses,
        meters,
        transitions: state.transitions(),
        outbox: health.outbox,
        sender: health.sender,
    }
}

/// `GET /metrics` of the running daemon.
pub(crate) fn render(state: &AdminState) -> String {
    encode(&gather(state))
}

/// The text format of `m`.
fn encode(m: &Metrics) -> String {
    let mut w = Writer::default();

    w.family(
        "fieldgate_build_info",
        Kind::Gauge,
        "Always 1; the version is in the label.",
    );
    w.sample("fieldgate_build_info", &[("version", &m.version)], 1.0);
    w.family(
        "fieldgate_health_status",
        Kind::Gauge,
        "Health as /healthz reports it: 0 ok, 1 degraded, 2 critical.",
    );
    let level = match m.health {
        Status::Ok => 0.0,
        Status::Degraded => 1.0,
        Status::Critical => 2.0,
    };
    w.sample("fieldgate_health_status", &[], level);
    // Its own series, not a label of the health: fleet alerts want "unsynchronized for 15 min" and the
    // kernel's flag says nothing about the rest of health. Unknown (not Linux with glibc) is left out.
    w.family(
        "fieldgate_clock_synchronized",
        Kind::Gauge,
        "1 while the kernel reports the system clock synchronized (NTP), 0 while not: detection times are labels from that clock (absent where the kernel cannot be asked).",
    );
    match m.clock {
        ClockSync::Synchronized => w.sample("fieldgate_clock_synchronized", &[], 1.0),
        ClockSync::Unsynchronized => w.sample("fieldgate_clock_synchronized", &[], 0.0),
        ClockSync::Unknown => {}
    }

    // === buses ===
    let bus_counter = |w: &mut Writer, name: &str, help: &str, f: fn(&BusStatsSnapshot) -> u64| {
        w.family(name, Kind::Counter, help);
        for (bus, s) in &m.buses {
            w.sample(name, &[("bus", bus)], f(s) as f64);
        }
    };
    bus_counter(&mut w, "fieldgate_bus_requests_total", "Modbus requests sent.", |s| {
        s.requests
    });
    w.family(
        "fieldgate_bus_errors_total",
        Kind::Counter,
        "Failed Modbus requests by kind: exception (the device refused), timeout (no answer), protocol (an answer that does not fit), transport (connection or device lost).",
    );
    for (bus, s) in &m.buses {
        let by_kind = [s.exceptions, s.timeouts, s.protocol_errors, s.transport_errors];
        for (kind, n) in ERROR_KINDS.iter().zip(by_kind) {
            w.sample("fieldgate_bus_errors_total", &[("bus", bus), ("kind", kind)], n as f64);
        }
    }
    bus_counter(
        &mut w,
        "fieldgate_bus_timeouts_total",
        "Modbus requests without an answer within the bus timeout.",
        |s| s.timeouts,
    );
    bus_counter(
        &mut w,
        "fieldgate_bus_reconnects_total",
        "Opens of the port or connection after the first (each follows a lost or poisoned link).",
        |s| s.reconnects,
    );
    bus_counter(
        &mut w,
        "fieldgate_bus_connect_failures_total",
        "Failed opens of the port or connection.",
        |s| s.connect_failures,
    );
    bus_counter(&mut w, "fieldgate_bus_rounds_total", "Poll rounds completed.", |s| {
        s.rounds
    });
    w.family(
        "fieldgate_bus_last_round_seconds",
        Kind::Gauge,
        "Duration of the last poll round.",
    );
    for (bus, s) in &m.buses {
        w.sample(
            "fieldgate_bus_last_round_seconds",
            &[("bus", bus)],
            s.last_round_micros as f64 / 1e6,
        );
    }
    w.family(
        "fieldgate_bus_up",
        Kind::Gauge,
        "1 if the port or connection opened the last time it was tried.",
    );
    for (bus, s) in &m.buses {
        w.sample("fieldgate_bus_up", &[("bus", bus)], bool_value(s.up));
    }

    // === meters ===
    w.family(
        "fieldgate_meter_online",
        Kind::Gauge,
        "1 while the meter answers; 0 after offline_after failed reads in a row.",
    );
    for meter in &m.meters {
        w.sample(
            "fieldgate_meter_online",
            &[("meter", &meter.meter)],
            bool_value(meter.online),
        );
    }
    w.family(
        "fieldgate_meter_last_sample_age_seconds",
        Kind::Gauge,
        "Time since the meter last answered (absent before its first answer).",
    );
    for meter in &m.meters {
        if let Some(age) = meter.last_sample_age {
            w.sample(
                "fieldgate_meter_last_sample_age_seconds",
                &[("meter", &meter.meter)],
                age,
            );
        }
    }
    w.family(
        "fieldgate_meter_answer_max_seconds",
        Kind::Gauge,
        "The slowest of the meter's recent answer times (absent before its first answer); compare with the bus timeout.",
    );
    for meter in &m.meters {
        if let Some(t) = meter.answer_max {
            w.sample("fieldgate_meter_answer_max_seconds", &[("meter", &meter.meter)], t);
        }
    }
    for (name, help, value) in [
        (
            "fieldgate_meter_timeouts_total",
            "Requests to the meter not answered within the bus timeout (since the bus started or was reloaded).",
            (|x: &MeterMetrics| x.timeouts) as fn(&MeterMetrics) -> u64,
        ),
        (
            "fieldgate_meter_late_answers_total",
            "Answers of the meter that came after the bus timeout (seen on RTU only): raise the timeout.",
            |x: &MeterMetrics| x.late_answers,
        ),
    ] {
        w.family(name, Kind::Counter, help);
        for meter in &m.meters {
            w.sample(name, &[("meter", &meter.meter)], value(meter) as f64);
        }
    }
    w.family(
        "fieldgate_transitions_total",
        Kind::Counter,
        "Valve transitions detected and committed.",
    );
    w.sample("fieldgate_transitions_total", &[], m.transitions as f64);

    // === records and outbox ===
    let o = &m.outbox;
    let s = &m.sender;
    w.gauge(
        "fieldgate_records_queued",
        "Records waiting for delivery (the same number as fieldgate_outbox_records).",
        o.records as f64,
    );
    w.counter(
        "fieldgate_records_delivered_total",
        "Records Panda accepted (code 0) and removed from the outbox.",
        s.delivered,
    );
    w.counter(
        "fieldgate_records_rejected_total",
        "Refusals by Panda of a record sent alone; at dead_after refusals it becomes a dead letter.",
        s.records_rejected,
    );
    w.gauge(
        "fieldgate_records_dead",
        "Dead letters: records Panda refused too often (see fieldgate outbox dead).",
        o.dead as f64,
    );
    w.counter(
        "fieldgate_records_dead_lettered_total",
        "Records moved to the dead letters.",
        s.dead_lettered,
    );
    w.gauge(
        "fieldgate_records_held",
        "Records refused alone and waiting to be tried again.",
        s.held as f64,
    );
    w.gauge("fieldgate_outbox_records", "Records in the outbox.", o.records as f64);
    w.gauge(
        "fieldgate_outbox_bytes",
        "Bytes of the records in the outbox.",
        o.bytes as f64,
    );
    w.gauge(
        "fieldgate_outbox_max_records",
        "Bound on records; at it new valve states are not committed.",
        o.max_records as f64,
    );
    w.gauge(
        "fieldgate_outbox_max_bytes",
        "Bound on bytes; at it new valve states are not committed.",
        o.max_bytes as f64,
    );
    w.gauge(
        "fieldgate_outbox_oldest_age_seconds",
        "Age of the oldest queued record (0 when empty).",
        o.oldest_age_seconds.unwrap_or(0) as f64,
    );
    // The state, not only the counters: a quiet station that refused its last commit stays refusing
    // (the next change is not recorded) while its counters stand still.
    w.gauge(
        "fieldgate_outbox_refusing",
        "1 while the last commit was refused (outbox full, or free disk space below outbox.min_free) and nothing was removed since: new valve states are not recorded.",
        bool_value(o.refusing),
    );
    w.counter(
        "fieldgate_outbox_refused_total",
        "Commits refused because the outbox was full.",
        o.refused,
    );
    w.counter(
        "fieldgate_outbox_refused_space_total",
        "Commits refused because free disk space was below outbox.min_free (new valve states not recorded).",
        o.refused_space,
    );
    w.gauge(
        "fieldgate_outbox_corrupt_entries",
        "Entries of the state database that could not be read and were set aside (see fieldgate outbox corrupt).",
        o.corrupt as f64,
    );
    w.gauge(
        "fieldgate_dead_letters_max",
        "Bound on dead letters (outbox.max_dead); at it refused records stay queued.",
        o.max_dead as f64,
    );
    w.counter(
        "fieldgate_dead_letters_refused_total",
        "Records not moved to the dead letters because outbox.max_dead were kept (they stay queued, held).",
        o.dead_refused,
    );

    // === store ===
    w.family(
        "fieldgate_store_free_bytes",
        Kind::Gauge,
        "Free bytes on the state directory's file system (absent when unknown).",
    );
    if let Some(free) = o.free_bytes {
        w.sample("fieldgate_store_free_bytes", &[], free as f64);
    }
    w.gauge(
        "fieldgate_store_min_free_bytes",
        "Reserve outbox.min_free: below it no new state or record is committed.",
        o.min_free as f64,
    );
    w.gauge(
        "fieldgate_store_failed",
        "1 while the state database is failed (nothing delivered or committed; it is reopened by itself).",
        bool_value(o.store.is_some()),
    );
    w.counter(
        "fieldgate_store_failures_total",
        "Times the state database failed (sled I/O error or failed fsync).",
        o.store_failures,
    );
    w.counter(
        "fieldgate_store_reopens_total",
        "Times the state database was opened again after a failure.",
        o.store_reopens,
    );

    // === delivery ===
    w.family(
        "fieldgate_http_requests_total",
        Kind::Counter,
        "PostFlowNodeData requests by outcome: ok (code 0), rejected (code != 0), transient (network, timeout, 5xx, not JSON), unauthorized (401 with a fresh token), login_failed (no token).",
    );
    let by_outcome = [s.ok, s.rejected, s.transient, s.unauthorized, s.login_failed];
    for (outcome, n) in HTTP_OUTCOMES.iter().zip(by_outcome) {
        w.sample("fieldgate_http_requests_total", &[("outcome", outcome)], n as f64);
    }
    w.counter(
        "fieldgate_http_throttled_total",
        "Of the transient requests: answers 408, 429 or 503 (the server asked to wait; Retry-After honoured).",
        s.throttled,
    );
    w.counter(
        "fieldgate_http_redirects_total",
        "Of the transient requests: 3xx answers, never followed (panda.base_url is wrong).",
        s.redirects,
    );
    w.counter(
        "fieldgate_http_refused_pages_total",
        "Of the rejected requests: 400/403/413/422 pages without a Panda code (a proxy or firewall refusing the body).",
        s.http_refused,
    );
    w.counter(
        "fieldgate_sender_store_retries_total",
        "Store writes about a server answer that failed and were retried (nothing more was sent meanwhile).",
        s.store_retries,
    );
    w.counter(
        "fieldgate_token_refreshes_total",
        "Tokens fetched from GenerateToken.",
        s.token_refreshes,
    );
    w.gauge(
        "fieldgate_login_failing",
        "1 while GenerateToken refuses the configured credentials.",
        bool_value(s.login_failing),
    );
    w.out
}

fn bool_value(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

#[derive(Default)]
struct Writer {
    out: String,
}

impl Writer {
    fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", number(value));
    }

    fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, Kind::Gauge, help);
        self.sample(name, &[], value);
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, Kind::Counter, help);
        self.sample(name, &[], value as f64);
    }
}

/// A label value with `\`, `"` and newlines escaped, as the text format requires.
fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A sample value: integers without a fraction, `+Inf`/`-Inf`/`NaN` as the format spells them.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fault::StoreFault;

    fn sample_metrics() -> Metrics {
        Metrics {
            version: "1.2.3".into(),
            health: Status::Degraded,
            clock: ClockSync::Unsynchronized,
            buses: vec![(
                "line-a".into(),
                BusStatsSnapshot {
                    requests: 10,
                    ok: 6,
                    exceptions: 1,
                    timeouts: 2,
                    protocol_errors: 0,
                    transport_errors: 1,
                    reconnects: 3,
                    last_round_micros: 52_000,
                    up: true,
                    ..BusStatsSnapshot::default()
                },
            )],
            meters: vec![
                MeterMetrics {
                    meter: "M1".into(),
                    online: true,
                    last_sample_age: Some(0.25),
                    answer_max: Some(0.125),
                    timeouts: 4,
                    late_answers: 1,
                },
                MeterMetrics {
                    meter: "表\"2\"".into(),
                    online: false,
                    last_sample_age: None,
                    answer_max: None,
                    timeouts: 9,
                    late_answers: 0,
                },
            ],
            transitions: 2,
            outbox: OutboxCounts {
                records: 3,
                bytes: 900,
                max_records: 100,
                max_bytes: 1000,
                refused: 0,
                refusing: false,
                dead: 1,
                oldest_age_seconds: Some(42),
                free_bytes: Some(3_000_000_000),
                min_free: 64 << 20,
                disk_low: false,
                refused_space: 4,
                max_dead: 10_000,
                dead_refused: 6,
                corrupt: 2,
                store: Some(StoreFault {
                    error: "No space left on device (os error 28)".into(),
                    for_seconds: 120,
                    reopen_attempts: 5,
                    reopen_error: None,
                }),
                store_failures: 3,
                store_reopens: 2,
            },
            sender: SenderSnapshot {
                delivered: 2,
                ok: 2,
                transient: 5,
                token_refreshes: 1,
                store_retries: 7,
                throttled: 3,
                redirects: 1,
                http_refused: 2,
                ..SenderSnapshot::default()
            },
        }
    }

    #[test]
    fn every_family_has_help_and_type_and_samples_carry_their_labels() {
        let text = encode(&sample_metrics());
        for line in [
            "fieldgate_build_info{version=\"1.2.3\"} 1",
            "fieldgate_health_status 1",
            "fieldgate_clock_synchronized 0",
            "fieldgate_bus_requests_total{bus=\"line-a\"} 10",
            "fieldgate_bus_errors_total{bus=\"line-a\",kind=\"exception\"} 1",
            "fieldgate_bus_errors_total{bus=\"line-a\",kind=\"timeout\"} 2",
            "fieldgate_bus_errors_total{bus=\"line-a\",kind=\"protocol\"} 0",
            "fieldgate_bus_errors_total{bus=\"line-a\",kind=\"transport\"} 1",
            "fieldgate_bus_timeouts_total{bus=\"line-a\"} 2",
            "fieldgate_bus_reconnects_total{bus=\"line-a\"} 3",
            "fieldgate_bus_last_round_seconds{bus=\"line-a\"} 0.052",
            "fieldgate_bus_up{bus=\"line-a\"} 1",
            "fieldgate_meter_online{meter=\"M1\"} 1",
            "fieldgate_meter_online{meter=\"表\\\"2\\\"\"} 0",
            "fieldgate_meter_last_sample_age_seconds{meter=\"M1\"} 0.25",
            "fieldgate_meter_answer_max_seconds{meter=\"M1\"} 0.125",
            "fieldgate_meter_timeouts_total{meter=\"M1\"} 4",
            "fieldgate_meter_late_answers_total{meter=\"M1\"} 1",
            "fieldgate_meter_timeouts_total{meter=\"表\\\"2\\\"\"} 9",
            "fieldgate_transitions_total 2",
            "fieldgate_records_queued 3",
            "fieldgate_records_delivered_total 2",
            "fieldgate_records_rejected_total 0",
            "fieldgate_records_dead 1",
            "fieldgate_outbox_records 3",
            "fieldgate_outbox_bytes 900",
            "fieldgate_outbox_oldest_age_seconds 42",
            "fieldgate_http_requests_total{outcome=\"ok\"} 2",
            "fieldgate_http_requests_total{outcome=\"transient\"} 5",
            "fieldgate_token_refreshes_total 1",
            "fieldgate_store_free_bytes 3000000000",
            "fieldgate_store_min_free_bytes 67108864",
            "fieldgate_store_failed 1",
            "fieldgate_store_failures_total 3",
            "fieldgate_store_reopens_total 2",
            "fieldgate_outbox_refused_space_total 4",
            "fieldgate_outbox_refusing 0",
            "fieldgate_outbox_corrupt_entries 2",
            "fieldgate_dead_letters_max 10000",
            "fieldgate_dead_letters_refused_total 6",
            "fieldgate_sender_store_retries_total 7",
            "fieldgate_http_throttled_total 3",
            "fieldgate_http_redirects_total 1",
            "fieldgate_http_refused_pages_total 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
        assert!(
            !text.contains("fieldgate_meter_last_sample_age_seconds{meter=\"表"),
            "no age before the first answer"
        );
        // Every sample's family is declared before it, once, with HELP then TYPE.
        let mut declared = Vec::new();
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap();
                let ty = lines.next().unwrap();
                assert!(ty.starts_with(&format!("# TYPE {name} ")), "{ty}");
                assert!(
                    ty.ends_with(" counter") == name.ends_with("_total"),
                    "counters and only counters end in _total: {ty}"
                );
                assert!(!declared.contains(&name.to_string()), "{name} declared twice");
                declared.push(name.to_string());
            } else {
                let name = line.split(['{', ' ']).next().unwrap();
                assert_eq!(declared.last().map(String::as_str), Some(name), "{line}");
                assert!(name.starts_with("fieldgate_"));
                let value = line.rsplit(' ').next().unwrap();
                assert!(value.parse::<f64>().is_ok(), "{line}");
            }
        }
    }

    #[test]
    fn unknown_free_space_leaves_its_sample_out_and_a_working_store_is_not_failed() {
        let mut m = sample_metrics();
        m.outbox.free_bytes = None;
        m.outbox.store = None;
        let text = encode(&m);
        assert!(text.contains("# TYPE fieldgate_store_free_bytes gauge\n"), "{text}");
        assert!(
            !text.lines().any(|l| l.starts_with("fieldgate_store_free_bytes ")),
            "no sample when unknown:\n{text}"
        );
        assert!(text.lines().any(|l| l == "fieldgate_store_failed 0"), "{text}");
    }

    #[test]
    fn the_clock_gauge_follows_the_kernels_sync_state_and_is_left_out_when_unknown() {
        let mut m = sample_metrics();
        let samples = |m: &Metrics| -> Vec<String> {
            let text = encode(m);
            assert!(text.contains("\n# TYPE fieldgate_clock_synchronized gauge\n"), "{text}");
            text.lines()
                .filter(|l| l.starts_with("fieldgate_clock_synchronized"))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(samples(&m), ["fieldgate_clock_synchronized 0"]);
        m.clock = ClockSync::Synchronized;
        assert_eq!(samples(&m), ["fieldgate_clock_synchronized 1"]);
        m.clock = ClockSync::Unknown;
        assert_eq!(samples(&m), Vec::<String>::new());
    }

    #[test]
    fn a_refusing_outbox_shows_as_one() {
        let mut m = sample_metrics();
        m.outbox.refusing = true;
        let text = encode(&m);
        assert!(text.lines().any(|l| l == "fieldgate_outbox_refusing 1"), "{text}");
    }

    #[test]
    fn values_use_the_spellings_of_the_text_format() {
        assert_eq!(number(3.0), "3");
        assert_eq!(number(0.5), "0.5");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NEG_INFINITY), "-Inf");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(escape_label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }
}

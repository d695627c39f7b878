//! `run_bus` against the in-process simulator, over real sockets and pseudo-terminals: values, valve flips,
//! late / garbled / short answers, a dead unit and its retry backoff, answer times and late answers as
//! `/meters` shows them, and a restarted server. Each scenario runs on Modbus TCP,
//! RTU on a pty (`SerialStream::pair()`, no socat needed) and RTU over TCP; the serial unplug test needs
//! `socat` and says so in its name.
//!
//! Nothing here sleeps to assert: tests wait for a condition (the next cycle, a counter) with a generous
//! deadline. Values are distinct per unit and address, and in the fault tests a ticker rewrites every
//! unit's 电池电压 register every 10 ms, so an answer attributed to the wrong unit or to a later request
//! (a stale answer) is caught, not just an error count.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use fieldgate::config::Config;
use fieldgate::modbus::bus::run_bus;
use fieldgate::modbus::cycle::{Cycle, Sample};
use fieldgate::modbus::stats::{BusStats, BusStatsSnapshot, MeterLink};
use fieldgate::tools::simulator::{self, Fault, Plant, FLOW_PER_FLIP};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;

use crate::util::socat::Socat;

/// How long any condition may take before the test fails (generous: 2 busy cores).
const DEADLINE: Duration = Duration::from_secs(20);

/// How each test reaches the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp,
    RtuPty,
    RtuOverTcp,
}

/// Bus timing of one test.
#[derive(Debug, Clone, Copy)]
struct Timing {
    poll: &'static str,
    timeout: Duration,
    guard: &'static str,
    offline_after: u32,
    offline_retry: &'static str,
}

/// Fast rounds for flips, dead units and restarts.
const FAST: Timing = Timing {
    poll: "50ms",
    timeout: Duration::from_millis(150),
    guard: "150ms",
    offline_after: 2,
    offline_retry: "300ms",
};

/// For the fault tests: a round period well above timeout + slack, so an answer one round stale fails
/// the freshness check; faults never take a meter offline. The late-answer tests use [`LATE`].
const CHECKED: Timing = Timing {
    poll: "500ms",
    timeout: Duration::from_millis(100),
    guard: "400ms",
    offline_after: 5,
    offline_retry: "300ms",
};

/// For the late-answer tests: CHECKED with a guard of 1 s, so the 300 ms late answer lands 800 ms
/// before the line is reopened. The simulator, its late-frame timer and the bus share the test's one
/// thread; with CHECKED's 400 ms guard, one stall of 200 ms across both deadlines let the two timers
/// fire in the same tick and the frame be written after the reopen. That is an answer later than the
/// guard, which no RTU master can tell from a fresh one, not the case these tests are about.
const LATE: Timing = Timing { guard: "1s", ..CHECKED };

/// For the backoff test: a failed request (timeout + guard: 60 ms) fits in a round, so rounds keep their
/// period and the retry gaps can be counted in rounds. offline_retry = 8 rounds.
const BACKOFF: Timing = Timing {
    poll: "100ms",
    timeout: Duration::from_millis(30),
    guard: "30ms",
    offline_after: 2,
    offline_retry: "800ms",
};

/// For the answer-time test: a 300 ms timeout, a guard of 1.5 s to listen for late answers in.
const SLOW: Timing = Timing {
    poll: "500ms",
    timeout: Duration::from_millis(300),
    guard: "1500ms",
    offline_after: 5,
    offline_retry: "1s",
};

/// Scheduling slack allowed between a request going out and its sample's timestamp, beyond the timeout.
const SLACK: Duration = Duration::from_millis(250);

/// A meter with its valve in holding 3: its four holding registers are read in one merged request.
macro_rules! holding_meter {
    ($no:literal, $unit:literal) => {
        concat!(
            "\n[[meter]]\nmeter_no = \"",
            $no,
            "\"\nbus = \"b\"\nunit = ",
            $unit,
            r#"
valve = { table = "holding", address = 3, states = { 0 = "关闭", 1 = "开启" } }
readings = [
  { field = "累计流量", table = "holding", address = 0, type = "u32", scale = 0.01 },
  { field = "电池电压", table = "holding", address = 2, scale = 0.01 },
]
"#
        )
    };
}

macro_rules! profile {
    () => {
        r#"
[profile.coil-valve]
valve = { table = "coil", address = 0, states = { 0 = "关闭", 1 = "开启" } }
readings = [
  { field = "累计流量", table = "holding", address = 0, type = "u32", scale = 0.01 },
  { field = "电池电压", table = "holding", address = 2, scale = 0.01 },
]
"#
    };
}

/// The three meters: M1 unit 1 and M3 unit 3 have the valve in coil 0 (two requests per meter); M2 unit 2
/// has it in holding 3, so its four holding registers are read in one merged request.
const METERS: &str = concat!(
    r#"
[[meter]]
meter_no = "M1"
bus = "b"
unit = 1
profile = "coil-valve"
"#,
    holding_meter!("M2", 2),
    r#"
[[meter]]
meter_no = "M3"
bus = "b"
unit = 3
profile = "coil-valve"
"#,
    profile!()
);

/// M2 alone: one meter, one request per round. A late answer kept by mistake would be read as the answer
/// to its own next request (same unit, function and count: RTU cannot tell), i.e. a stale value.
const ONLY_M2: &str = concat!(holding_meter!("M2", 2), profile!());

/// M1 as usual, and M9 pointing at unit 2's holding 100: past the end of its table, so every read of
/// M9 is answered with exception IllegalDataAddress.
const WITH_BAD_ADDRESS: &str = concat!(
    holding_meter!("M1", 1),
    r#"
[[meter]]
meter_no = "M9"
bus = "b"
unit = 2
valve = { table = "holding", address = 100, states = { 0 = "关闭", 1 = "开启" } }
"#,
    profile!()
);

/// M1 and M2 both with one request each: if a late answer of M1 were left on the line, M1's next request
/// (same unit, function and count) would take it as its own.
const SINGLE_REQUEST_METERS: &str = concat!(holding_meter!("M1", 1), holding_meter!("M2", 2), profile!());

fn init_tracing() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let _ = tracing_subscriber::registry()
        .with(fieldgate::cli::log_filter(
            std::env::var("RUST_LOG").ok().as_deref(),
            "error",
        ))
        .with(tracing_subscriber::fmt::layer().with_test_writer())
        .try_init();
}

/// The config for one bus over `transport` (a `tcp = ...`-style line).
fn config(dir: &Path, transport: &str, t: Timing, meters: &str) -> Arc<Config> {
    let mapping = "水表表号,用户名称\nM1,张三\nM2,李四\nM3,王五\nM9,赵六\n";
    std::fs::write(dir.join("mapping.csv"), mapping).expect("temp dir is writable");
    let text = format!(
        r#"
[site]
name = "test"
state_dir = "state"
mapping = "mapping.csv"

[panda]
base_url = "http://127.0.0.1:9"
project = "t"
auth = "none"
user_id = 1

[[bus]]
name = "b"
{transport}
poll_interval = "{poll}"
timeout = "{timeout}ms"
guard = "{guard}"
offline_after = {offline_after}
offline_retry = "{offline_retry}"
{meters}
"#,
        poll = t.poll,
        timeout = t.timeout.as_millis(),
        guard = t.guard,
        offline_after = t.offline_after,
        offline_retry = t.offline_retry,
    );
    match fieldgate::config::parse(&dir.join("fieldgate.toml"), &text, &None) {
        Ok(c) => Arc::new(c),
        Err(e) => panic!("test config is invalid: {e}"),
    }
}

/// Every unit's 电池电压 (holding 2) rewritten every 10 ms to `tick * 4 + unit`, with the time of each
/// write, so the age of any value read can be told.
#[derive(Clone, Default)]
struct Ticker {
    /// Time of tick n, at index n (recorded right after the write).
    times: Arc<Mutex<Vec<DateTime<Utc>>>>,
}

impl Ticker {
    fn value(tick: usize, unit: u8) -> u16 {
        ((tick * 4 + usize::from(unit)) % 65536) as u16
    }

    fn tick(&self, plant: &Plant) {
        let mut times = self.times.lock().expect("ticker lock");
        let n = times.len();
        for unit in 1..=3 {
            plant.set_holding(unit, 2, Ticker::value(n, unit));
        }
        times.push(Utc::now());
    }

    fn start(&self, plant: &Plant) -> JoinHandle<()> {
        self.tick(plant);
        let (me, plant) = (self.clone(), plant.clone());
        tokio::spawn(async move {
            loop {
                sleep(Duration::from_millis(10)).await;
                me.tick(&plant);
            }
        })
    }

    /// Whether a 电池电压 value read in a sample of `unit` taken at `at` is that unit's, and was still the
    /// current value when the request went out (no earlier than `at - window`).
    fn check(&self, unit: u8, raw: u16, at: DateTime<Utc>, window: Duration) -> Result<(), String> {
        let times = self.times.lock().expect("ticker lock");
        let diff = raw.wrapping_sub(u16::from(unit));
        if diff % 4 != 0 {
            return Err(format!("电池电压 {raw} is not a value of unit {unit}"));
        }
        let n = usize::from(diff / 4);
        if n >= times.len() {
            return Err(format!("电池电压 {raw} was never written (tick {n})"));
        }
        let Some(replaced) = times.get(n + 1) else {
            return Ok(()); // still the current value
        };
        let window = chrono::Duration::from_std(window).expect("small duration");
        if *replaced >= at - window {
            Ok(())
        } else {
            Err(format!(
                "stale value: 电池电压 tick {n} was replaced at {replaced}, {} ms before the sample at {at}",
                (at - *replaced).num_milliseconds()
            ))
        }
    }
}

/// The raw integer of a rendered reading ("112.34" → 11234).
fn raw(s: &str) -> u32 {
    match s.replace('.', "").parse() {
        Ok(v) => v,
        Err(_) => panic!("reading `{s}` is not a decimal"),
    }
}

/// A running bus against a running simulator.
struct Rig {
    kind: Kind,
    plant: Plant,
    stats: Arc<BusStats>,
    cycles: mpsc::Receiver<Cycle>,
    shutdown: CancellationToken,
    server: Option<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
    addr: Option<std::net::SocketAddr>,
    timing: Timing,
    /// Unit of each configured meter, by meter index.
    units: Vec<u8>,
    /// Units whose valve is in holding 3 (the others: coil 0).
    holding_valves: Vec<u8>,
    /// Every cycle received, in order.
    seen: Vec<Cycle>,
    ticker: Option<Ticker>,
    /// Valve and flow of each unit over time: (unit, since, valve raw, flow raw), oldest first.
    history: Vec<(u8, DateTime<Utc>, i64, u32)>,
    _dir: tempfile::TempDir,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.shutdown.cancel();
        for t in self.tasks.drain(..).chain(self.server.take()) {
            t.abort();
        }
    }
}

impl Rig {
    async fn start(kind: Kind, timing: Timing, with_ticker: bool) -> Rig {
        Rig::start_with(kind, timing, with_ticker, METERS).await
    }

    async fn start_with(kind: Kind, timing: Timing, with_ticker: bool, meters: &str) -> Rig {
        init_tracing();
        let dir = tempfile::tempdir().expect("temp dir");
        let plant = Plant::with_meters(3);
        let mut tasks = Vec::new();
        let ticker = with_ticker.then(|| {
            let t = Ticker::default();
            tasks.push(t.start(&plant));
            t
        });
        let (server, transport, addr) = match kind {
            Kind::Tcp | Kind::RtuOverTcp => {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
                let addr = listener.local_addr().expect("bound address");
                if kind == Kind::Tcp {
                    (
                        simulator::serve_tcp(listener, plant.clone()),
                        format!("tcp = \"{addr}\""),
                        Some(addr),
                    )
                } else {
                    let server = simulator::serve_rtu_over_tcp(listener, plant.clone());
                    (server, format!("rtu_over_tcp = \"{addr}\""), Some(addr))
                }
            }
            Kind::RtuPty => {
                use tokio_serial::SerialPort as _;
                let (master, slave) = tokio_serial::SerialStream::pair().expect("pty pair");
                let path = slave.name().expect("the pty slave has a path");
                // The gateway opens the slave by path, as it would a real adapter.
                drop(slave);
                let server = simulator::serve_rtu(master, plant.clone());
                (server, format!("serial = \"{path}\"\nbaud = 115200"), None)
            }
        };
        let cfg = config(dir.path(), &transport, timing, meters);
        let units = cfg.meters.iter().map(|m| m.unit).collect();
        let holding_valves = cfg
            .meters
            .iter()
            .filter(|m| m.valve.point.table == fieldgate::config::point::Table::Holding)
            .map(|m| m.unit)
            .collect();
        let (tx, cycles) = mpsc::channel(64);
        let shutdown = CancellationToken::new();
        let stats = Arc::new(BusStats::default());
        tasks.push(tokio::spawn(run_bus(cfg, 0, tx, shutdown.clone(), Arc::clone(&stats))));
        Rig {
            kind,
            plant,
            stats,
            cycles,
            shutdown,
            server: Some(server),
            tasks,
            addr,
            timing,
            units,
            holding_valves,
            seen: Vec::new(),
            ticker,
            history: Vec::new(),
            _dir: dir,
        }
        .with_history()
    }

    /// Record the plant's starting values as history.
    fn with_history(mut self) -> Rig {
        let epoch = DateTime::<Utc>::MIN_UTC;
        for unit in self.plant.units() {
            let (valve, flow) = self.truth(unit);
            self.history.push((unit, epoch, valve, flow));
        }
        self
    }

    /// The plant's valve (raw) and flow of `unit` now.
    fn truth(&self, unit: u8) -> (i64, u32) {
        let valve = if self.holding_valves.contains(&unit) {
            i64::from(self.plant.holding(unit, 3).unwrap_or(u16::MAX))
        } else {
            i64::from(self.plant.valve(unit).unwrap_or(false))
        };
        (valve, self.plant.flow(unit).unwrap_or(u32::MAX))
    }

    /// Flip a unit's valve (M2's lives in holding 3) and record when.
    fn flip(&mut self, unit: u8) {
        if self.holding_valves.contains(&unit) {
            let v = self.plant.holding(unit, 3).unwrap_or(0);
            self.plant.set_holding(unit, 3, 1 - v.min(1));
        } else {
            self.plant.flip_valve(unit);
        }
        let (valve, flow) = self.truth(unit);
        self.history.push((unit, Utc::now(), valve, flow));
    }

    /// (valve, flow) values a sample of `unit` taken at `at` may show: the one current at `at - window`
    /// (when the request went out at the earliest) and any set after it.
    fn allowed(&self, unit: u8, at: DateTime<Utc>, window: chrono::Duration) -> Vec<(i64, u32)> {
        let mine: Vec<_> = self.history.iter().filter(|h| h.0 == unit).collect();
        let start = mine.iter().rposition(|h| h.1 <= at - window).unwrap_or(0);
        mine[start..].iter().filter(|h| h.1 <= at).map(|h| (h.2, h.3)).collect()
    }

    fn stats(&self) -> BusStatsSnapshot {
        self.stats.snapshot()
    }

    /// The bus task's figures of one meter, as `/meters` shows them.
    fn link(&self, meter: &str) -> MeterLink {
        match self.stats.meter_link(meter) {
            Some(l) => l,
            None => panic!("{:?}: no figures of {meter}", self.kind),
        }
    }

    /// The next cycle (recorded in `seen`).
    async fn next_cycle(&mut self, what: &str) -> Cycle {
        match tokio::time::timeout(DEADLINE, self.cycles.recv()).await {
            Ok(Some(c)) => {
                self.seen.push(c.clone());
                c
            }
            Ok(None) => panic!("{:?}: the bus task ended while waiting for {what}", self.kind),
            Err(_) => panic!(
                "{:?}: no cycle within {DEADLINE:?} while waiting for {what}; stats {:?}",
                self.kind,
                self.stats()
            ),
        }
    }

    /// Receive cycles until one satisfies `cond`; returns it.
    async fn cycle_where(&mut self, what: &str, mut cond: impl FnMut(&Cycle) -> bool) -> Cycle {
        let end = Instant::now() + DEADLINE;
        loop {
            let c = self.next_cycle(what).await;
            if cond(&c) {
                return c;
            }
            assert!(
                Instant::now() < end,
                "{:?}: {what} not seen within {DEADLINE:?}; stats {:?}",
                self.kind,
                self.stats()
            );
        }
    }

    /// Poll `cond` every 20 ms (taking cycles meanwhile) until it holds.
    async fn until(&mut self, what: &str, cond: impl Fn(&Rig) -> bool) {
        let end = Instant::now() + DEADLINE;
        while !cond(self) {
            assert!(
                Instant::now() < end,
                "{:?}: {what} not reached within {DEADLINE:?}; stats {:?}",
                self.kind,
                self.stats()
            );
            tokio::select! {
                c = self.cycles.recv() => if let Some(c) = c { self.seen.push(c) },
                () = sleep(Duration::from_millis(20)) => {}
            }
        }
    }

    /// Wait until each meter has produced `n` more samples than now.
    async fn more_samples(&mut self, n: usize) {
        let start = self.seen.len();
        let mut counts = vec![0usize; self.units.len()];
        while counts.iter().any(|&c| c < n) {
            let c = self.next_cycle(&format!("{n} more samples of every meter")).await;
            for s in &c.samples {
                if let Some(k) = counts.get_mut(s.meter) {
                    *k += 1;
                }
            }
            assert!(
                self.seen.len() - start < 500,
                "{:?}: too many cycles without samples of every meter",
                self.kind
            );
        }
    }

    fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.seen.iter().flat_map(|c| c.samples.iter())
    }

    fn links(&self) -> Vec<(usize, bool)> {
        self.seen.iter().flat_map(|c| c.links.iter().copied()).collect()
    }

    /// Every sample received so far is right: valve and flow were the plant's when the request went out
    /// (or changed while it was out), and 电池电压 is this unit's and was current then too.
    fn assert_every_sample_true(&self) {
        let ticker = self.ticker.as_ref().expect("fault tests run with a ticker");
        let window = self.timing.timeout + SLACK;
        let mut checked = 0;
        let chrono_window = chrono::Duration::from_std(window).expect("small duration");
        for s in self.samples() {
            let unit = self.units[s.meter];
            let seen = (s.valve_raw, raw(&s.readings[0]));
            let allowed = self.allowed(unit, s.at, chrono_window);
            assert!(
                allowed.contains(&seen),
                "{:?}: WRONG VALUE in {s:?}: valve and flow {seen:?}, allowed then {allowed:?}",
                self.kind
            );
            if let Err(e) = ticker.check(unit, raw(&s.readings[1]) as u16, s.at, window) {
                panic!("{:?}: WRONG VALUE in {s:?}: {e}", self.kind);
            }
            checked += 1;
        }
        assert!(checked > 0, "no samples checked");
    }
}

/// Generates one test per transport for a scenario `async fn name(kind: Kind)`.
macro_rules! on_every_transport {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use super::Kind;
            #[tokio::test]
            async fn tcp() {
                super::$scenario(Kind::Tcp).await
            }
            #[tokio::test]
            async fn rtu_pty() {
                super::$scenario(Kind::RtuPty).await
            }
            #[tokio::test]
            async fn rtu_over_tcp() {
                super::$scenario(Kind::RtuOverTcp).await
            }
        }
    )*};
}

on_every_transport!(
    values_are_read_and_valve_flips_show_in_the_next_samples,
    a_late_answer_never_becomes_a_wrong_value,
    a_late_answer_to_one_unit_never_lands_on_another,
    a_garbled_answer_is_counted_and_the_bus_recovers,
    a_short_answer_is_rejected_and_the_bus_recovers,
    a_dead_unit_goes_offline_once_while_the_others_keep_reporting,
    an_exception_keeps_the_connection_and_takes_only_that_meter_offline,
    a_dead_meter_is_retried_every_round_at_first_then_less_often_and_again_every_round_after_an_answer,
    answer_times_and_late_answers_are_measured_and_a_slow_meter_gets_the_hint_to_raise_the_timeout,
);

async fn values_are_read_and_valve_flips_show_in_the_next_samples(kind: Kind) {
    let mut rig = Rig::start(kind, FAST, false).await;
    let c = rig
        .cycle_where("a cycle with every meter", |c| c.samples.len() == 3)
        .await;
    let by_meter = |m: usize| c.samples.iter().find(|s| s.meter == m).cloned().expect("sample");
    for (m, flow, battery) in [(0, "112.34", "3.51"), (1, "212.34", "3.52"), (2, "312.34", "3.53")] {
        let s = by_meter(m);
        assert_eq!(s.valve_raw, 0, "{kind:?} meter {m}");
        assert_eq!(s.readings, [flow, battery], "{kind:?} meter {m}");
    }
    assert!(c.links.is_empty());
    assert_eq!(c.bus, 0);

    // Open M1's valve (coil; the flip adds 1.23 m³) and M2's (holding 3).
    assert_eq!(rig.plant.flip_valve(1), Some(true));
    assert!(rig.plant.set_holding(2, 3, 1));
    rig.cycle_where("both valves open", |c| {
        let open = |m| c.samples.iter().any(|s| s.meter == m && s.valve_raw == 1);
        open(0) && open(1)
    })
    .await;
    let flow = rig.plant.flow(1).expect("unit 1");
    assert_eq!(flow, 11_234 + FLOW_PER_FLIP);
    rig.more_samples(3).await;
    // Once seen open, never seen closed again: no stale answer slipped in.
    let mut open_seen = [false; 2];
    for s in rig.samples().filter(|s| s.meter < 2) {
        if s.valve_raw == 1 {
            open_seen[s.meter] = true;
            if s.meter == 0 {
                assert_eq!(s.readings[0], "113.57", "{kind:?}: the flow moved with the flip");
            }
        } else {
            assert!(!open_seen[s.meter], "{kind:?}: valve seen closed after open: {s:?}");
        }
    }
    assert!(rig.links().is_empty(), "{kind:?}: no link changes expected");
    let st = rig.stats();
    assert_eq!(
        st.timeouts + st.protocol_errors + st.transport_errors,
        0,
        "{kind:?}: {st:?}"
    );
    assert_eq!(st.connects, 1, "{kind:?}: one connection for the whole test");
}

async fn a_late_answer_never_becomes_a_wrong_value(kind: Kind) {
    let mut rig = Rig::start_with(kind, LATE, true, ONLY_M2).await;
    rig.more_samples(1).await;
    // The next request answers 300 ms late: after the 100 ms timeout, before the 1 s guard ends, and
    // before the next round's request (500 ms) would read it if it were kept.
    rig.plant.inject(2, Fault::Late(Duration::from_millis(300)));
    rig.until("the late answer sent and timed out", |r| {
        r.plant.pending_faults(2) == 0 && r.stats().timeouts >= 1
    })
    .await;
    rig.more_samples(4).await;
    rig.assert_every_sample_true();
    assert!(
        rig.stats().reconnects >= 1,
        "{kind:?}: the timeout drops the context: {:?}",
        rig.stats()
    );
}

async fn a_late_answer_to_one_unit_never_lands_on_another(kind: Kind) {
    let mut rig = Rig::start_with(kind, LATE, true, SINGLE_REQUEST_METERS).await;
    rig.more_samples(1).await;
    // M1's next request answers 300 ms late, with the valve as it was; the valve moves while that answer
    // is on its way. M2 is read right after the timeout: the guard keeps the late frame off the line's
    // buffer, so neither M2 nor M1's next request (which could not tell it from a fresh one) takes it.
    rig.plant.inject(1, Fault::Late(Duration::from_millis(300)));
    rig.until("the late request taken", |r| r.plant.pending_faults(1) == 0)
        .await;
    rig.flip(1);
    rig.until("the late request timed out", |r| r.stats().timeouts >= 1)
        .await;
    rig.more_samples(4).await;
    rig.assert_every_sample_true();
    let st = rig.stats();
    assert!(st.reconnects >= 1, "{kind:?}: the timeout drops the context: {st:?}");
    assert!(
        rig.links().is_empty(),
        "{kind:?}: one failure does not take a meter offline"
    );
}

async fn a_garbled_answer_is_counted_and_the_bus_recovers(kind: Kind) {
    let mut rig = Rig::start(kind, CHECKED, true).await;
    rig.more_samples(1).await;
    let before = rig.stats();
    rig.plant.inject(1, Fault::Garbage);
    rig.plant.inject(2, Fault::Garbage);
    rig.until("both garbled answers sent and counted", |r| {
        let st = r.stats();
        let errors = |s: &BusStatsSnapshot| s.protocol_errors + s.timeouts + s.transport_errors;
        r.plant.pending_faults(1) + r.plant.pending_faults(2) == 0 && errors(&st) >= errors(&before) + 2
    })
    .await;
    rig.more_samples(4).await;
    rig.assert_every_sample_true();
    if kind == Kind::Tcp {
        // Zero bytes are an MBAP length of 0: the decoder refuses them at once.
        assert!(rig.stats().protocol_errors >= 2, "{kind:?}: {:?}", rig.stats());
    }
}

async fn a_short_answer_is_rejected_and_the_bus_recovers(kind: Kind) {
    let mut rig = Rig::start(kind, CHECKED, true).await;
    rig.more_samples(1).await;
    // M1: its coil read gets 0 bits for 1; M2: its merged read gets 3 registers for 4.
    rig.plant.inject(1, Fault::WrongCount);
    rig.plant.inject(2, Fault::WrongCount);
    rig.until("both short answers rejected", |r| {
        r.plant.pending_faults(1) + r.plant.pending_faults(2) == 0 && r.stats().protocol_errors >= 2
    })
    .await;
    rig.more_samples(4).await;
    rig.assert_every_sample_true();
}

async fn a_dead_unit_goes_offline_once_while_the_others_keep_reporting(kind: Kind) {
    let mut rig = Rig::start(kind, FAST, false).await;
    rig.cycle_where("a cycle with every meter", |c| c.samples.len() == 3)
        .await;
    rig.plant.silence(2, true);
    rig.cycle_where("M2 offline", |c| c.links.contains(&(1, false))).await;
    // While M2 is offline, every round still reads M1 and M3.
    for _ in 0..8 {
        let c = rig.next_cycle("rounds while M2 is offline").await;
        let metered: Vec<usize> = c.samples.iter().map(|s| s.meter).collect();
        assert!(metered.contains(&0) && metered.contains(&2), "{kind:?}: {c:?}");
        assert!(
            !metered.contains(&1),
            "{kind:?}: a dead unit cannot give samples: {c:?}"
        );
    }
    let tried = rig.plant.requests(2);
    rig.until("M2 retried while offline", |r| r.plant.requests(2) > tried)
        .await;
    assert_eq!(rig.links(), [(1, false)], "{kind:?}: exactly one link change");
    rig.plant.silence(2, false);
    rig.cycle_where("M2 back online", |c| c.links.contains(&(1, true)))
        .await;
    rig.cycle_where("a sample of M2", |c| c.samples.iter().any(|s| s.meter == 1))
        .await;
    assert_eq!(rig.links(), [(1, false), (1, true)], "{kind:?}");
}

async fn an_exception_keeps_the_connection_and_takes_only_that_meter_offline(kind: Kind) {
    let mut rig = Rig::start_with(kind, FAST, false, WITH_BAD_ADDRESS).await;
    rig.cycle_where("M9 offline", |c| c.links.contains(&(1, false))).await;
    for _ in 0..5 {
        let c = rig.next_cycle("rounds after M9 went offline").await;
        assert!(
            c.samples.iter().any(|s| s.meter == 0),
            "{kind:?}: M1 read every round: {c:?}"
        );
    }
    let st = rig.stats();
    assert!(st.exceptions >= 2, "{kind:?}: {st:?}");
    assert_eq!(
        st.connects, 1,
        "{kind:?}: an exception never drops the connection: {st:?}"
    );
    assert_eq!(
        st.timeouts + st.protocol_errors + st.transport_errors,
        0,
        "{kind:?}: {st:?}"
    );
    assert_eq!(rig.links(), [(1, false)], "{kind:?}");
}

/// Tries of a dead M2 (its timeouts, as the bus task counts them) round by round: the round numbers of
/// the tries and the retry period after each, from the round where it went offline.
async fn offline_tries(rig: &mut Rig, tries: usize) -> Vec<(usize, Option<Duration>)> {
    rig.cycle_where("M2 offline", |c| c.links.contains(&(1, false))).await;
    let mut seen = vec![(0, rig.link("M2").retry_every)];
    let mut timeouts = rig.link("M2").timeouts;
    let mut round = 0;
    while seen.len() <= tries {
        let c = rig.next_cycle("rounds while M2 is offline").await;
        round += 1;
        assert!(
            c.samples.iter().any(|s| s.meter == 0),
            "{:?}: M1 read every round: {c:?}",
            rig.kind
        );
        let l = rig.link("M2");
        assert!(
            l.timeouts <= timeouts + 1,
            "{:?}: M2 tried twice in one round",
            rig.kind
        );
        if l.timeouts > timeouts {
            seen.push((round, l.retry_every));
        }
        timeouts = l.timeouts;
    }
    seen
}

async fn a_dead_meter_is_retried_every_round_at_first_then_less_often_and_again_every_round_after_an_answer(
    kind: Kind,
) {
    let mut rig = Rig::start_with(kind, BACKOFF, false, SINGLE_REQUEST_METERS).await;
    rig.cycle_where("a cycle with both meters", |c| c.samples.len() == 2)
        .await;
    assert_eq!(rig.link("M2").retry_every, None, "{kind:?}: online");
    let requests_before = rig.plant.requests(2);
    let timeouts_before = rig.link("M2").timeouts;
    rig.plant.silence(2, true);
    let tries = offline_tries(&mut rig, 7).await;
    let poll = Duration::from_millis(100);
    // The period after each try: offline_after (2) retries at one round, then doubling up to 8 rounds.
    let periods: Vec<Option<Duration>> = tries.iter().map(|t| t.1).collect();
    let want: Vec<Option<Duration>> = [1, 1, 2, 4, 8, 8, 8, 8].iter().map(|&n| Some(poll * n)).collect();
    assert_eq!(periods, want, "{kind:?}: retry periods {tries:?}");
    // Retries are due by round: a try comes no later than its period in rounds (rounds are never
    // shorter than the poll interval); one-round periods mean the very next round.
    for pair in tries.windows(2) {
        let ((r0, period), (r1, _)) = (pair[0], pair[1]);
        let rounds = (period.expect("offline").as_millis() / poll.as_millis()) as usize;
        assert!(
            r1 - r0 >= 1 && r1 - r0 <= rounds,
            "{kind:?}: gap {} rounds after a period of {rounds}: {tries:?}",
            r1 - r0
        );
        if rounds == 1 {
            assert_eq!(r1 - r0, 1, "{kind:?}: {tries:?}");
        }
    }
    // Once grown, a dead meter costs one timeout per offline_retry (8 rounds), not one per round.
    let (first_grown, last) = (tries[5].0, tries[7].0);
    assert!(last - first_grown >= 8, "{kind:?}: the backoff did not grow: {tries:?}");
    // The simulator saw exactly these requests of unit 2: the two that took it offline, then the tries.
    let timeouts = rig.link("M2").timeouts - timeouts_before;
    assert_eq!(timeouts, 2 + 7, "{kind:?}");
    rig.until("the simulator counted every try", |r| {
        r.plant.requests(2) - requests_before >= timeouts
    })
    .await;
    assert_eq!(
        rig.plant.requests(2) - requests_before,
        timeouts,
        "{kind:?}: one request per try"
    );

    // An answer resets the backoff: back online, then dead again, it is retried every round again.
    rig.plant.silence(2, false);
    rig.cycle_where("M2 back online", |c| c.links.contains(&(1, true)))
        .await;
    assert_eq!(rig.link("M2").retry_every, None, "{kind:?}");
    rig.plant.silence(2, true);
    let tries = offline_tries(&mut rig, 3).await;
    let rounds: Vec<usize> = tries.iter().map(|t| t.0).collect();
    assert_eq!(rounds, [0, 1, 2, 4], "{kind:?}: reset to one round: {tries:?}");
}

async fn answer_times_and_late_answers_are_measured_and_a_slow_meter_gets_the_hint_to_raise_the_timeout(kind: Kind) {
    let mut rig = Rig::start_with(kind, SLOW, true, SINGLE_REQUEST_METERS).await;
    rig.more_samples(2).await;
    let fast = rig.link("M1");
    let last = fast.answer_last.expect("answered");
    assert!(last < Duration::from_millis(100), "{kind:?}: a quick answer: {fast:?}");
    assert_eq!(
        (fast.timeout, fast.timeouts, fast.late_answers),
        (Duration::from_millis(300), 0, 0)
    );
    assert_eq!(fast.hint(), None, "{kind:?}: quick answers need no advice");

    // M1 answers after 270 ms: within the 300 ms timeout, but near it (90 %).
    rig.plant.inject(1, Fault::Late(Duration::from_millis(270)));
    rig.until("the slow answer timed", |r| {
        r.link("M1").answer_max.is_some_and(|t| t >= Duration::from_millis(270)) || r.link("M1").timeouts > 0
    })
    .await;
    let slow = rig.link("M1");
    let hint = slow.hint().unwrap_or_else(|| panic!("{kind:?}: no hint for {slow:?}"));
    assert!(hint.contains("raise the bus `timeout`"), "{kind:?}: {hint}");

    // M2 answers after 600 ms: a timeout; on RTU the link listens through its guard (1.5 s) and sees it.
    rig.plant.inject(2, Fault::Late(Duration::from_millis(600)));
    rig.until("the late request timed out", |r| r.link("M2").timeouts >= 1)
        .await;
    let late = rig.link("M2");
    if kind == Kind::Tcp {
        // The connection is closed at the timeout: a late TCP answer cannot be seen.
        assert_eq!(
            (late.late_answers, late.late_last, late.sees_late),
            (0, None, false),
            "{kind:?}"
        );
    } else {
        assert!(late.sees_late, "{kind:?}");
        assert_eq!(late.late_answers, 1, "{kind:?}: {late:?}");
        let at = late.late_last.expect("timed");
        assert!(
            at >= Duration::from_millis(600) && at < Duration::from_millis(300 + 1500),
            "{kind:?}: seen {at:?} after the request"
        );
        let hint = late.hint().unwrap_or_else(|| panic!("{kind:?}: no hint for {late:?}"));
        assert!(
            hint.contains("after the 300 ms timeout") && hint.contains("raise the bus `timeout`"),
            "{kind:?}: {hint}"
        );
    }
    // Listening for it never lets it pass for a later request's answer: every sample is right.
    rig.more_samples(2).await;
    rig.assert_every_sample_true();
    assert!(rig.links().is_empty(), "{kind:?}: one timeout takes no meter offline");
}

async fn a_restarted_server_is_found_again(kind: Kind) {
    let mut rig = Rig::start(kind, FAST, false).await;
    rig.cycle_where("a cycle with every meter", |c| c.samples.len() == 3)
        .await;
    let addr = rig.addr.expect("a TCP server");
    if let Some(server) = rig.server.take() {
        server.abort();
        let _ = server.await;
    }
    rig.until("the bus noticed", |r| {
        let st = r.stats();
        st.transport_errors + st.protocol_errors + st.timeouts + st.connect_failures > 0
    })
    .await;
    let end = Instant::now() + DEADLINE;
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) => {
                assert!(Instant::now() < end, "cannot bind {addr} again: {e}");
                sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let server = if kind == Kind::Tcp {
        simulator::serve_tcp(listener, rig.plant.clone())
    } else {
        simulator::serve_rtu_over_tcp(listener, rig.plant.clone())
    };
    rig.server = Some(server);
    let restarted = Utc::now();
    rig.cycle_where("every meter read after the restart", |c| {
        c.samples.len() == 3 && c.samples.iter().all(|s| s.at > restarted)
    })
    .await;
    assert!(rig.stats().reconnects >= 1, "{kind:?}: {:?}", rig.stats());
    // Meters that went offline during the outage came back.
    let links = rig.links();
    for m in 0..3 {
        let last = links.iter().rev().find(|(k, _)| *k == m);
        assert!(
            last.is_none_or(|(_, online)| *online),
            "{kind:?}: meter {m} left offline: {links:?}"
        );
    }
}

#[tokio::test]
async fn tcp_server_restarted_on_the_same_port_is_reconnected() {
    a_restarted_server_is_found_again(Kind::Tcp).await;
}

#[tokio::test]
async fn rtu_over_tcp_server_restarted_on_the_same_port_is_reconnected() {
    a_restarted_server_is_found_again(Kind::RtuOverTcp).await;
}

async fn recv_cycle(cycles: &mut mpsc::Receiver<Cycle>, stats: &BusStats) -> Cycle {
    match tokio::time::timeout(DEADLINE, cycles.recv()).await {
        Ok(Some(c)) => c,
        _ => panic!("no cycle within {DEADLINE:?}; stats {:?}", stats.snapshot()),
    }
}

/// Needs `socat`: the serial device disappears (socat killed, its pty gone, like an unplugged USB
/// adapter) and comes back under the same path; the bus reopens it by itself.
#[tokio::test]
async fn rtu_socat_device_unplugged_and_replugged_is_reopened() {
    init_tracing();
    let dir = tempfile::tempdir().expect("temp dir");
    let (gw, sim) = (dir.path().join("ttyV0"), dir.path().join("ttyV1"));
    let mut socat = Socat::start(&gw, &sim).await;
    let plant = Plant::with_meters(3);
    let server = simulator::serve_rtu_path(sim.display().to_string(), 115200, plant.clone());
    let transport = format!("serial = \"{}\"\nbaud = 115200", gw.display());
    let cfg = config(dir.path(), &transport, FAST, METERS);
    let (tx, mut cycles) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let stats = Arc::new(BusStats::default());
    let bus = tokio::spawn(run_bus(cfg, 0, tx, shutdown.clone(), Arc::clone(&stats)));
    let end = Instant::now() + DEADLINE;
    while recv_cycle(&mut cycles, &stats).await.samples.len() < 3 {
        assert!(Instant::now() < end, "no full cycle");
    }

    socat.stop();
    let _ = std::fs::remove_file(&gw);
    let _ = std::fs::remove_file(&sim);
    let end = Instant::now() + DEADLINE;
    while stats.snapshot().connect_failures == 0 {
        assert!(Instant::now() < end, "the bus did not notice: {:?}", stats.snapshot());
        let _ = tokio::time::timeout(Duration::from_millis(20), cycles.recv()).await;
    }

    let _socat = Socat::start(&gw, &sim).await;
    let replugged = Utc::now();
    let end = Instant::now() + DEADLINE;
    loop {
        let c = recv_cycle(&mut cycles, &stats).await;
        if c.samples.len() == 3 && c.samples.iter().all(|s| s.at > replugged) {
            break;
        }
        assert!(
            Instant::now() < end,
            "no full cycle after replug: {:?}",
            stats.snapshot()
        );
    }
    assert!(stats.snapshot().reconnects >= 1);
    shutdown.cancel();
    let _ = bus.await;
    server.abort();
}

#[tokio::test]
async fn the_bus_task_ends_promptly_on_shutdown_even_with_every_meter_dead() {
    let mut rig = Rig::start(Kind::Tcp, FAST, false).await;
    for unit in 1..=3 {
        rig.plant.silence(unit, true);
    }
    rig.until("all meters offline", |r| {
        r.links().iter().filter(|(_, online)| !online).count() == 3
    })
    .await;
    // Still retried while all are offline.
    let tried = rig.plant.requests(1);
    rig.until("offline meters retried", |r| r.plant.requests(1) > tried)
        .await;
    rig.shutdown.cancel();
    let bus = rig.tasks.pop().expect("the bus task");
    match tokio::time::timeout(DEADLINE, bus).await {
        Ok(Ok(())) => {}
        other => panic!("bus task did not end cleanly: {other:?}"),
    }
}

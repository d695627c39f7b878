//! Flaky meters end to end (issue 14): units that fail a random 25 % of their requests, answering late
//! (after the timeout) or not at all, on Modbus TCP and on RTU over a pty; every valve transition held
//! for at least 5 poll rounds must arrive exactly once as a work order at the mock Panda server.
//!
//! Scaled from the field (1 s poll, 30 s `offline_retry`) to a 50 ms poll and a 1.5 s `offline_retry`
//! (30 rounds); poll rounds are the clock: a transition is held until the bus has completed 6 more
//! rounds (so at least 5 whole rounds see it), whatever they take. Failures are drawn from a seeded
//! generator ([`fieldgate::tools::simulator::Flaky`]): a failing run names its seed, and
//! `FIELDGATE_FLAKY_SEED=N cargo test flaky` reruns the same failure pattern (up to scheduling).
//!
//! With the old rule (an offline meter retried only every `offline_retry`) this loses transitions
//! on both transports; see the measured figures in the report of the change.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fieldgate::app::{self, Gateway};
use fieldgate::tools::mock_panda::{MockOptions, MockPanda};
use fieldgate::tools::simulator::{self, Flaky, Plant};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::util::{mapping_csv, site_config, wait_until, Site};

const GRACE: Duration = Duration::from_secs(10);

/// The default seed of the failure draws (any seed must pass; this one is what CI runs).
const SEED: u64 = 14;

/// Transitions per meter (open, close, open, …).
const TRANSITIONS: usize = 10;

/// Rounds each valve position is held: the round in progress at the flip may have read the meter
/// already, so 6 more completed rounds hold it for at least 5 whole rounds.
const HOLD_ROUNDS: u64 = 6;

/// Units 1 and 2 are flaky, unit 3 answers every request.
const FLAKY_UNITS: [u8; 2] = [1, 2];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    Tcp,
    RtuPty,
}

fn seed() -> u64 {
    std::env::var("FIELDGATE_FLAKY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEED)
}

/// The test site of `crate::util::site_config` with one bus on `transport` and three meters whose
/// valve is holding 3 (one request per read, so a meter fails exactly the share of reads its unit fails
/// requests), a 50 ms timeout, an RTU `guard` and a short `offline_retry`.
fn config(transport: &str, guard: &str, panda: &str) -> String {
    let base = site_config(transport, panda, "token", 3);
    [
        (
            "timeout = \"200ms\"\n",
            format!("timeout = \"50ms\"\nguard = \"{guard}\"\n"),
        ),
        (
            "offline_after = 2\noffline_retry = \"300ms\"",
            "offline_after = 3\noffline_retry = \"1500ms\"".into(),
        ),
        (
            r#"valve = { table = "coil", address = 0, states = { 0 = "关闭", 1 = "开启" } }"#,
            r#"valve = { table = "holding", address = 3, states = { 0 = "关闭", 1 = "开启" } }"#.into(),
        ),
    ]
    .into_iter()
    .fold(base, |text, (from, to)| {
        assert!(
            text.contains(from),
            "the shared test config changed: update this test ({from:?})"
        );
        text.replacen(from, &to, 1)
    })
}

/// The simulator on `line`, serving `plant`; the bus lines of the config.
async fn serve(line: Line, plant: &Plant) -> (JoinHandle<()>, String) {
    match line {
        Line::Tcp => {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
            let addr = listener.local_addr().expect("bound");
            (
                simulator::serve_tcp(listener, plant.clone()),
                format!("tcp = \"{addr}\""),
            )
        }
        Line::RtuPty => {
            use tokio_serial::SerialPort as _;
            let (master, slave) = tokio_serial::SerialStream::pair().expect("pty pair");
            let path = slave.name().expect("the pty slave has a path");
            // The gateway opens the slave by path, as it would a real adapter.
            drop(slave);
            (
                simulator::serve_rtu(master, plant.clone()),
                format!("serial = \"{path}\"\nbaud = 115200"),
            )
        }
    }
}

async fn wait_rounds(gw: &Gateway, n: u64) {
    let start = gw.bus_stats[0].rounds.load(Ordering::Relaxed);
    wait_until("more poll rounds", || async {
        gw.bus_stats[0].rounds.load(Ordering::Relaxed) >= start + n
    })
    .await;
}

/// (meter, valve state, 累计流量) of one transition: the flow moves with every flip, so it names the flip.
type Transition = (String, String, String);

fn flow(plant: &Plant, unit: u8) -> String {
    let raw = plant.flow(unit).expect("a simulated unit");
    format!("{}.{:02}", raw / 100, raw % 100)
}

async fn every_transition_held_five_rounds_arrives_exactly_once(line: Line) {
    let seed = seed();
    let plant = Plant::with_meters(3);
    // Late answers come 30 ms after the 50 ms timeout; on RTU the guard (250 ms) outlasts them with
    // room for a stalled test thread, so a late frame never lands after the line is reopened.
    let late = Duration::from_millis(80);
    for unit in FLAKY_UNITS {
        plant.set_flaky(
            unit,
            Some(Flaky {
                rate: 0.25,
                late: Some(late),
                seed,
            }),
        );
    }
    let (sim, transport) = serve(line, &plant).await;
    let panda = MockPanda::start(
        TcpListener::bind("127.0.0.1:0").await.expect("bind loopback"),
        MockOptions::default(),
    );
    let site = Site::new(&config(&transport, "250ms", &panda.base_url()), &mapping_csv(3));
    let gw = app::start(site.load()).await.unwrap_or_else(|e| panic!("start: {e}"));
    wait_until("every meter read once", || async {
        gw.live.snapshot().iter().all(|m| m.state.is_some())
    })
    .await;

    let mut expected: Vec<Transition> = Vec::new();
    let state = |open: bool| if open { "开启" } else { "关闭" }.to_string();
    for _ in 0..TRANSITIONS {
        for unit in 1..=3u8 {
            let open = plant.flip_valve(unit).expect("a simulated unit");
            expected.push((format!("M{unit}"), state(open), flow(&plant, unit)));
        }
        wait_rounds(&gw, HOLD_ROUNDS).await;
    }
    wait_rounds(&gw, 2 * HOLD_ROUNDS).await;
    wait_until("outbox drained", || async { gw.outbox.is_empty() }).await;

    let mut got: BTreeMap<Transition, usize> = BTreeMap::new();
    for o in panda.orders() {
        let field = |k: &str| o.biz.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_string();
        let t = (field("水表表号"), field("阀门当前状态"), field("累计流量"));
        let event = if t.1 == "开启" {
            "用水户开阀"
        } else {
            "用水户关阀"
        };
        assert_eq!(o.event_name, event, "{line:?}: {o:?}");
        *got.entry(t).or_default() += 1;
    }
    let lost: Vec<&Transition> = expected.iter().filter(|t| !got.contains_key(*t)).collect();
    let twice: Vec<(&Transition, &usize)> = got.iter().filter(|(_, n)| **n > 1).collect();
    let unknown: Vec<&Transition> = got.keys().filter(|t| !expected.contains(t)).collect();
    let failures: Vec<u64> = FLAKY_UNITS.iter().map(|&u| plant.flaky_failures(u)).collect();
    let requests: Vec<u64> = FLAKY_UNITS.iter().map(|&u| plant.requests(u)).collect();
    let summary = format!(
        "{line:?}, seed {seed}: {} of {} transitions lost {lost:?}, twice {twice:?}, unknown {unknown:?}; \
         flaky units failed {failures:?} of {requests:?} requests; bus {:?}",
        lost.len(),
        expected.len(),
        gw.bus_stats[0].snapshot()
    );
    println!("{summary}");
    assert!(lost.is_empty() && twice.is_empty() && unknown.is_empty(), "{summary}");
    for (f, r) in failures.iter().zip(&requests) {
        // About 25 % of some 75 requests: the fault really was injected.
        assert!(*f * 20 >= *r && *f * 2 <= *r, "{line:?}: {f} failures of {r} requests");
    }

    // What `/meters` and `fieldgate status` tell the engineer about the flaky meters.
    let admin = format!("http://{}", gw.admin_addr.expect("admin listens"));
    let meters: Vec<fieldgate::ops::api::MeterInfo> = reqwest::get(format!("{admin}/meters"))
        .await
        .expect("GET /meters")
        .json()
        .await
        .expect("JSON");
    for m in &meters {
        assert_eq!(m.timeout_ms, Some(50.0), "{line:?}: {m:?}");
        assert!(m.answer_ms.is_some() && m.answer_max_ms.is_some(), "{line:?}: {m:?}");
        // Late answers are seen on RTU (during the guard), never on TCP (the connection is closed).
        // (M3 answers at once, but a stalled test thread can make even its answer late.)
        if m.meter_no != "M3" {
            assert!(m.timeouts > 0, "{line:?}: {m:?}");
            assert_eq!(m.late_answers > 0, line == Line::RtuPty, "{line:?}: {m:?}");
        } else if line == Line::Tcp {
            assert_eq!(m.late_answers, 0, "{line:?}: {m:?}");
        }
    }
    let text = fieldgate::cli::status::status_run(fieldgate::cli::status::StatusArgs {
        config: None,
        admin: Some(admin),
        json: false,
    })
    .await
    .expect("status");
    println!("{text}");
    assert!(text.contains("ANSWER"), "{text}");
    if line == Line::RtuPty {
        assert!(
            text.contains("M1 (bus line-a): answers arrive after the 50 ms timeout"),
            "{text}"
        );
    }
    gw.stop(GRACE).await;
    sim.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_meters_failing_a_quarter_of_reads_lose_no_transition_held_five_rounds() {
    every_transition_held_five_rounds_arrives_exactly_once(Line::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_meters_failing_a_quarter_of_reads_lose_no_transition_held_five_rounds() {
    every_transition_held_five_rounds_arrives_exactly_once(Line::RtuPty).await;
}

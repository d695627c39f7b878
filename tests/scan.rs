//! `fieldgate scan` against the in-process simulator, over Modbus TCP and on a `socat` pty (RTU): the
//! units found are exactly the present ones, with their answers (a value, an exception, a late answer);
//! `--json` parsed and checked field by field; `--emit-config` loaded by the config validator; a setting
//! whose answers are all garbled given up at the bound; bad arguments and a missing device. The
//! simulator's units 3 and 4 are silenced, so "units 1, 2 and 5 present" has gaps on both sides.
//!
//! Nothing here is timed: a scan runs to its end and its report is checked. The pty tests need `socat`
//! (`.ci/run` installs it).

use std::process::{Command, Output};
use std::time::Duration;

use clap::Parser as _;
use fieldgate::cli::scan::{scan_run, ScanArgs, SettingOutcome, GARBAGE_LIMIT};
use fieldgate::config::point::Table;
use fieldgate::config::{Parity, Transport};
use fieldgate::tools::simulator::{self, Fault, Plant};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::util::socat::Socat;
use crate::util::Site;

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    args: ScanArgs,
}

fn args(argv: &[&str]) -> ScanArgs {
    Cli::try_parse_from(std::iter::once("scan").chain(argv.iter().copied()))
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
        .args
}

/// Standard simulated meters with units 1, 2 and 5 answering (3 and 4 silenced: absent on the wire).
fn plant_1_2_5() -> Plant {
    let plant = Plant::with_meters(5);
    plant.silence(3, true);
    plant.silence(4, true);
    plant
}

async fn tcp_simulator(plant: &Plant) -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    (addr, simulator::serve_tcp(listener, plant.clone()))
}

/// `fieldgate scan ARGS` (the real binary), run off the runtime so the in-process simulator answers.
async fn scan_binary(argv: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_fieldgate"))
            .arg("scan")
            .args(&argv)
            .output()
            .expect("run fieldgate scan")
    })
    .await
    .expect("join")
}

/// The `--json` array with each `answer_ms` checked (a number, not negative) and removed, so the rest
/// compares exactly.
fn without_answer_times(mut v: Value) -> Value {
    for unit in v.as_array_mut().expect("an array").iter_mut() {
        for at in unit["settings"].as_array_mut().expect("settings").iter_mut() {
            let took = at
                .as_object_mut()
                .and_then(|o| o.remove("answer_ms"))
                .unwrap_or_else(|| panic!("no answer_ms in {at}"));
            assert!(took.as_f64().is_some_and(|ms| ms >= 0.0), "answer_ms {took}");
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tcp_exactly_the_present_units_are_found_with_their_answers() {
    let plant = plant_1_2_5();
    let (addr, server) = tcp_simulator(&plant).await;
    let report = scan_run(args(&["--tcp", &addr, "--units", "1-8", "--address", "2"]))
        .await
        .expect("scan");
    assert_eq!(report.found_units(), [1, 2, 5]);
    assert_eq!(
        report.outcomes(),
        [SettingOutcome {
            label: format!("tcp {addr}"),
            tried: 8,
            found: vec![1, 2, 5],
            garbled: 0,
            abandoned: false,
        }]
    );
    // Holding 2 is 350 + unit on a standard simulated meter.
    assert_eq!(
        without_answer_times(report.json()),
        json!([
            { "unit": 1, "settings": [{ "tcp": addr, "table": "holding", "address": 2, "answer": "value", "value": 351 }] },
            { "unit": 2, "settings": [{ "tcp": addr, "table": "holding", "address": 2, "answer": "value", "value": 352 }] },
            { "unit": 5, "settings": [{ "tcp": addr, "table": "holding", "address": 2, "answer": "value", "value": 355 }] },
        ])
    );
    let text = report.text();
    for row in [
        "holding 2 = 351 (0x015f)",
        "holding 2 = 355 (0x0163)",
        "3 unit(s) answered: 1, 2, 5.",
    ] {
        assert!(text.contains(row), "`{row}` missing from:\n{text}");
    }
    for unit in 1..=8 {
        assert_eq!(plant.requests(unit), 1, "unit {unit} tried exactly once");
    }

    // An address the units lack: each present unit answers with an exception, and counts as present.
    let report = scan_run(args(&["--tcp", &addr, "--units", "1-8", "--address", "100"]))
        .await
        .expect("scan");
    assert_eq!(report.found_units(), [1, 2, 5]);
    let exception = |unit: u8| {
        json!({ "unit": unit, "settings": [{ "tcp": addr, "table": "holding", "address": 100, "answer": "exception",
                "exception_code": 2, "exception_name": "illegal data address" }] })
    };
    assert_eq!(
        without_answer_times(report.json()),
        json!([exception(1), exception(2), exception(5)])
    );
    assert!(
        report.text().contains("exception 0x02 (illegal data address): present"),
        "{}",
        report.text()
    );
    server.abort();
}

/// The real binary: `--json` on stdout is exactly the units found; the summary goes to stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_prints_json_of_the_units_found_and_nothing_else_on_stdout() {
    let plant = plant_1_2_5();
    let (addr, server) = tcp_simulator(&plant).await;
    let out = scan_binary(
        ["--tcp", &addr, "--units", "1-8", "--table", "coil", "--json"]
            .map(String::from)
            .to_vec(),
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    let valve = |unit: u8| json!({ "unit": unit, "settings": [{ "tcp": addr, "table": "coil", "address": 0, "answer": "value", "value": 0 }] });
    assert_eq!(without_answer_times(v), json!([valve(1), valve(2), valve(5)]));
    assert!(stderr.contains("3 unit(s) answered: 1, 2, 5."), "{stderr}");
    server.abort();
}

/// A simulator serving `plant` on one end of a socat pty pair; the scan's end is `gw`.
struct Pty {
    gw: String,
    _dir: tempfile::TempDir,
    _socat: Socat,
    server: JoinHandle<()>,
}

impl Pty {
    async fn start(plant: &Plant) -> Pty {
        let dir = tempfile::tempdir().expect("temp dir");
        let (gw, sim) = (dir.path().join("ttyV0"), dir.path().join("ttyV1"));
        let socat = Socat::start(&gw, &sim).await;
        let server = simulator::serve_rtu_path(sim.display().to_string(), 9600, plant.clone());
        Pty {
            gw: gw.display().to_string(),
            _dir: dir,
            _socat: socat,
            server,
        }
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The real binary on a pty: present and absent units, then `--emit-config`, whose blocks (with the
/// placeholders' meter numbers in the mapping) pass the config validator as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_pty_the_present_units_are_found_and_the_emitted_config_is_valid() {
    let plant = plant_1_2_5();
    let pty = Pty::start(&plant).await;
    let report = scan_run(args(&["--serial", &pty.gw, "--units", "1-8", "--address", "2"]))
        .await
        .expect("scan");
    assert_eq!(
        report.outcomes(),
        [SettingOutcome {
            label: "9600 8N1".into(),
            tried: 8,
            found: vec![1, 2, 5],
            garbled: 0,
            abandoned: false,
        }]
    );
    let at = |value: u16| {
        json!({ "serial": pty.gw, "baud": 9600, "parity": "none", "data_bits": 8, "stop_bits": 1,
                "table": "holding", "address": 2, "answer": "value", "value": value })
    };
    assert_eq!(
        without_answer_times(report.json()),
        json!([
            { "unit": 1, "settings": [at(351)] },
            { "unit": 2, "settings": [at(352)] },
            { "unit": 5, "settings": [at(355)] },
        ])
    );

    let out = scan_binary(
        ["--serial", &pty.gw, "--units", "1-8", "--address", "2", "--emit-config"]
            .map(String::from)
            .to_vec(),
    )
    .await;
    let blocks = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}\n{blocks}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The bus is named after the device: ttyV0; the placeholder meter numbers after bus and unit.
    let mut mapping =
        String::from("用户编号,用户名称,用户状态,电话号码,用户地址,水表表号,水表位置,阀门口径,营业区域\n");
    for unit in [1, 2, 5] {
        mapping.push_str(&format!(
            "U{unit},用户{unit},正常,13800000000,东风路,ttyV0-u{unit},井内,DN20,城东\n"
        ));
    }
    let config = format!(
        "[site]\nname = \"scanned\"\nstate_dir = \"state\"\nmapping = \"mapping.csv\"\n\n\
         [panda]\nbase_url = \"http://127.0.0.1:9\"\nproject = \"demo\"\nauth = \"none\"\nuser_id = 1\n\n{blocks}"
    );
    let site = Site::new(&config, &mapping);
    let cfg = fieldgate::config::load(&site.config_path())
        .unwrap_or_else(|e| panic!("the emitted blocks do not validate:\n{e}\n{config}"));
    assert_eq!(cfg.buses.len(), 1, "{blocks}");
    assert_eq!(
        cfg.buses[0].transport,
        Transport::Serial {
            path: pty.gw.clone(),
            baud: 9600,
            parity: Parity::None,
            data_bits: 8,
            stop_bits: 1,
            rs485: None,
        }
    );
    assert_eq!(cfg.buses[0].timeout, Duration::from_millis(300));
    let meters: Vec<(String, u8, usize)> = cfg.meters.iter().map(|m| (m.meter_no.clone(), m.unit, m.bus)).collect();
    assert_eq!(
        meters,
        [
            ("ttyV0-u1".to_string(), 1, 0),
            ("ttyV0-u2".to_string(), 2, 0),
            ("ttyV0-u5".to_string(), 5, 0)
        ]
    );
    for m in &cfg.meters {
        assert_eq!(
            m.valve.point.table,
            Table::Holding,
            "the placeholder valve is the scanned table"
        );
        let labels: Vec<&str> = m.valve.states.values().map(String::as_str).collect();
        assert_eq!(labels, ["关闭", "开启"]);
    }
}

/// Every answer garbled at the first setting (what a wrong baud rate looks like): it is given up after
/// GARBAGE_LIMIT tries, before the units after them, and reported; the next setting finds every unit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_whose_answers_are_all_garbled_is_given_up_at_the_bound() {
    let plant = Plant::with_meters(6);
    for unit in 1..=GARBAGE_LIMIT as u8 {
        plant.inject(unit, Fault::Garbage);
    }
    let pty = Pty::start(&plant).await;
    let report = scan_run(args(&["--serial", &pty.gw, "--units", "1-6", "--baud", "9600,19200"]))
        .await
        .expect("scan");
    assert_eq!(
        report.outcomes(),
        [
            SettingOutcome {
                label: "9600 8N1".into(),
                tried: GARBAGE_LIMIT,
                found: vec![],
                garbled: GARBAGE_LIMIT,
                abandoned: true,
            },
            SettingOutcome {
                label: "19200 8N1".into(),
                tried: 6,
                found: vec![1, 2, 3, 4, 5, 6],
                garbled: 0,
                abandoned: false,
            },
        ]
    );
    assert_eq!(plant.requests(6), 1, "unit 6 was not tried at the abandoned setting");
    assert_eq!(plant.requests(1), 2);
    let text = report.text();
    assert!(
        text.contains("given up: 5 garbled answers and no valid one (wrong baud rate or parity?)"),
        "{text}"
    );
    // Only the setting that answered is in the JSON.
    let bauds: Vec<u64> = report.json()[0]["settings"]
        .as_array()
        .expect("settings")
        .iter()
        .filter_map(|s| s["baud"].as_u64())
        .collect();
    assert_eq!(bauds, [19200]);
}

/// A unit answering after the timeout but within the guard is there (late), and the advice says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_answering_after_the_timeout_is_found_as_late() {
    let plant = Plant::with_meters(2);
    // 1.5 s: half a second after the 1 s timeout, half a second before the guard ends (a busy CI
    // machine may stall a timer that long and the answer still counts).
    plant.inject(2, Fault::Late(Duration::from_millis(1500)));
    let pty = Pty::start(&plant).await;
    let report = scan_run(args(&["--serial", &pty.gw, "--units", "1-2", "--timeout", "1s"]))
        .await
        .expect("scan");
    assert_eq!(report.found_units(), [1, 2]);
    let v = without_answer_times(report.json());
    assert_eq!(v[0]["settings"][0]["answer"], "value", "{v}");
    assert_eq!(v[1]["settings"][0]["answer"], "late", "{v}");
    let text = report.text();
    assert!(text.contains("Unit(s) 2 answered after the timeout"), "{text}");
}

/// Bad input gets a clear error and exit 2 (clap's usage error); a missing device exit 1 with advice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_and_a_missing_device_are_clear_errors() {
    let out = scan_binary(["--serial", "/dev/x", "--units", "0-5"].map(String::from).to_vec()).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("unit 0 is out of range: allowed 1..=247"), "{stderr}");

    let out = scan_binary(["--serial", "/dev/x", "--units", "9-3"].map(String::from).to_vec()).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("the range `9-3` runs backwards: write 3-9"), "{stderr}");

    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("ttyUSB9").display().to_string();
    let out = scan_binary(["--serial", &missing, "--units", "1-3"].map(String::from).to_vec()).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("serial device {missing} does not exist")),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

/// `--rs485` on a port that refuses the kernel's RS-485 mode (a pty: ENOTTY) is a clear error naming
/// the device and the kernel's answer, before any unit is tried; without it the same line scans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs485_on_a_port_that_refuses_it_is_a_clear_error() {
    let plant = Plant::with_meters(2);
    let pty = Pty::start(&plant).await;
    let before = plant.requests(1) + plant.requests(2);
    let out = scan_binary(
        ["--serial", &pty.gw, "--units", "1-2", "--rs485"]
            .map(String::from)
            .to_vec(),
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{} refused RS-485 mode (TIOCSRS485: ENOTTY", pty.gw)),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    assert_eq!(plant.requests(1) + plant.requests(2), before, "no request went out");

    let out = scan_binary(
        ["--serial", &pty.gw, "--units", "1-2", "--json"]
            .map(String::from)
            .to_vec(),
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let found: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let units: Vec<u64> = found
        .as_array()
        .expect("an array")
        .iter()
        .filter_map(|u| u["unit"].as_u64())
        .collect();
    assert_eq!(units, [1, 2], "{stderr}");
}

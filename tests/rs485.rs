//! RS-485 mode (`[[bus]] rs485`, `fieldgate probe --rs485`) against a real pseudo-terminal, which refuses
//! `TIOCSRS485` with ENOTTY exactly as a USB adapter does. The simulator answers on the pty's master side
//! (`SerialStream::pair`, no socat needed), so the same line polls normally once `rs485` is gone: the
//! failure is the mode, never the line.
//!
//! The real binary runs (`fieldgate run`, `probe`, `check`), so the log is its own JSON log and the
//! reload is a real SIGHUP. Every wait is a condition with the shared deadline; nothing is timed.

use std::process::{Command, Output};

use fieldgate::tools::mock_panda::{MockOptions, MockPanda};
use fieldgate::tools::simulator::{serve_rtu, Plant};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::util::daemon::Daemon;
use crate::util::{mapping_csv, site_config, wait_until, Site};

/// The JSON log's line of a bus that cannot be opened (`modbus::link`).
const CANNOT_OPEN: &str = "Bus cannot be opened; retrying with backoff.";

/// The simulator on the master side of a new pty; the slave's path, which the gateway opens by name as it
/// would an adapter's.
fn pty_with_simulator(plant: &Plant) -> (String, JoinHandle<()>) {
    use tokio_serial::SerialPort as _;
    let (master, slave) = tokio_serial::SerialStream::pair().expect("pty pair");
    let path = slave.name().expect("the pty slave has a path");
    drop(slave);
    (path, serve_rtu(master, plant.clone()))
}

/// The serial lines of a `[[bus]]` on `path`, with `rs485` when given.
fn serial_bus(path: &str, rs485: Option<&str>) -> String {
    let mut s = format!("serial = \"{path}\"\nbaud = 115200");
    if let Some(table) = rs485 {
        s.push_str(&format!("\nrs485 = {table}"));
    }
    s
}

/// Run the real binary with `args` (off the async workers: the simulator keeps answering meanwhile).
async fn fieldgate(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_fieldgate"))
            .args(&args)
            .env("RUST_LOG", "off")
            .output()
            .expect("run fieldgate")
    })
    .await
    .expect("join")
}

/// The admin API's address, from the daemon's "Admin API listening." log line.
async fn admin_url(daemon: &Daemon) -> String {
    daemon.wait_log("Admin API listening.", 1).await;
    let log = daemon.dump();
    let line = log
        .lines()
        .find(|l| l.contains("Admin API listening."))
        .expect("the line waited for");
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    let addr = v["fields"]["addr"]
        .as_str()
        .unwrap_or_else(|| panic!("no addr in {line}"));
    format!("http://{addr}")
}

async fn get_json(base: &str, path: &str) -> serde_json::Value {
    let body = reqwest::get(format!("{base}{path}"))
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .text()
        .await
        .unwrap();
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// The message of the `/healthz` finding `code`, if it is there.
fn finding(health: &serde_json::Value, code: &str) -> Option<String> {
    health["reasons"]
        .as_array()?
        .iter()
        .find(|f| f["code"] == code)
        .and_then(|f| f["message"].as_str())
        .map(str::to_string)
}

/// A serial bus whose port refuses RS-485 mode is down: the kernel's answer (device, ENOTTY) is in the log
/// once, in `/healthz` and `/buses`; the open is retried with backoff, not once per round; and once a
/// reload drops `rs485`, the same line polls normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_whose_port_refuses_rs485_is_down_with_the_kernels_answer_until_a_reload_drops_it() {
    let plant = Plant::with_meters(2);
    let (path, _sim) = pty_with_simulator(&plant);
    let panda = MockPanda::start(TcpListener::bind("127.0.0.1:0").await.unwrap(), MockOptions::default());
    let with_rs485 = site_config(
        &serial_bus(&path, Some("{ rts_on_send = true, delay_before_send = \"1ms\" }")),
        &panda.base_url(),
        "none",
        2,
    );
    let site = Site::new(&with_rs485, &mapping_csv(2));
    let refusal = format!("{path} refused RS-485 mode (TIOCSRS485: ENOTTY, Inappropriate ioctl for device)");

    // `check` validates the file and notes what a refusal would mean.
    let check = fieldgate(vec![
        "check".into(),
        "--config".into(),
        site.config_path().display().to_string(),
    ])
    .await;
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert_eq!(
        check.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "note: bus `line-a`: rs485 is set: {path} is put in the kernel's RS-485 mode each time it opens"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("ENOTTY (\"Inappropriate ioctl for device\")"),
        "{stdout}"
    );

    let mut daemon = Daemon::spawn(&site.config_path(), &[]);
    let admin = admin_url(&daemon).await;

    // The log says why, with the device and the kernel's answer.
    daemon.wait_log(CANNOT_OPEN, 1).await;
    let log = daemon.dump();
    let line = log.lines().find(|l| l.contains(CANNOT_OPEN)).unwrap();
    assert!(line.contains(&refusal), "{line}");
    assert!(line.contains("\"reason\":\"rs485\""), "{line}");
    assert!(line.contains("remove `rs485` from this bus"), "{line}");

    // Health: critical, bus_down with the same words.
    wait_until("bus_down on /healthz", || async {
        finding(&get_json(&admin, "/healthz").await, "bus_down").is_some()
    })
    .await;
    let health = get_json(&admin, "/healthz").await;
    assert_eq!(health["status"], "critical", "{health}");
    let down = finding(&health, "bus_down").unwrap();
    assert!(
        down.starts_with(&format!("bus line-a ({path}) cannot be opened")),
        "{down}"
    );
    assert!(down.contains(&refusal), "{down}");
    assert!(
        finding(&health, "meters_offline").is_none(),
        "meters of a down bus are not reported twice: {health}"
    );

    // Retried, with backoff: fewer opens than rounds by far, each a failure, and one log line for all.
    wait_until("60 rounds with the bus down", || async {
        get_json(&admin, "/buses").await[0]["rounds"].as_u64().unwrap_or(0) >= 60
    })
    .await;
    wait_until("3 failed opens", || async {
        get_json(&admin, "/buses").await[0]["connect_failures"]
            .as_u64()
            .unwrap_or(0)
            >= 3
    })
    .await;
    let bus = get_json(&admin, "/buses").await[0].clone();
    assert_eq!(bus["up"], false, "{bus}");
    assert_eq!(bus["tried"], true, "{bus}");
    assert_eq!(
        bus["requests"], 0,
        "no request goes out on a port in the wrong mode: {bus}"
    );
    let open_error = bus["open_error"].as_str().unwrap_or_else(|| panic!("{bus}"));
    assert!(open_error.starts_with(&refusal), "{bus}");
    let (failures, rounds) = (
        bus["connect_failures"].as_u64().unwrap(),
        bus["rounds"].as_u64().unwrap(),
    );
    assert!(
        failures * 3 <= rounds,
        "opens back off instead of one per round: {failures} failed opens in {rounds} rounds"
    );
    assert_eq!(
        daemon.count(CANNOT_OPEN),
        1,
        "one log line per change of state:\n{}",
        daemon.dump()
    );

    // A reload without `rs485`: the same line polls normally.
    std::fs::write(
        site.config_path(),
        site_config(&serial_bus(&path, None), &panda.base_url(), "none", 2),
    )
    .unwrap();
    daemon.signal("HUP");
    daemon.wait_log("Configuration reloaded.", 1).await;
    daemon.wait_log("Baseline valve state stored.", 2).await;
    wait_until("health ok after the reload", || async {
        get_json(&admin, "/healthz").await["status"] == "ok"
    })
    .await;
    let bus = get_json(&admin, "/buses").await[0].clone();
    assert_eq!(bus["up"], true, "{bus}");
    assert_eq!(bus["open_error"], serde_json::Value::Null, "{bus}");
    assert_eq!(bus["meters_online"], 2, "{bus}");
    assert_eq!(daemon.count(CANNOT_OPEN), 1, "{}", daemon.dump());

    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit().code(), Some(0), "{}", daemon.dump());
}

/// `fieldgate probe --rs485` on the pty fails with the device, the kernel's answer and what to do, and exits
/// non-zero; so does a probe of a configured bus with `rs485`. Without it the same line answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_with_rs485_on_a_pty_fails_with_the_kernels_answer_and_a_nonzero_exit() {
    let plant = Plant::with_meters(1);
    let (path, _sim) = pty_with_simulator(&plant);
    let read = |extra: &[&str]| {
        let mut args: Vec<String> = [
            "probe",
            "--unit",
            "1",
            "--table",
            "coil",
            "--address",
            "0",
            "--timeout",
            "5s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let serial = ["--serial", path.as_str(), "--baud", "115200"];
    let refusal = format!("{path} refused RS-485 mode (TIOCSRS485: ENOTTY, Inappropriate ioctl for device)");

    let ok = fieldgate(read(&serial)).await;
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("1 bit(s):"));

    let mut args = serial.to_vec();
    args.extend(["--rs485", "rts_on_send=false,delay_after_send=2ms"]);
    let refused = fieldgate(read(&args)).await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(refused.stdout.is_empty(), "no values printed");
    assert!(
        stderr.contains(&format!(
            "via serial {path} 115200 8N1 rs485 (RTS low while sending, high after; delays 0ms / 2ms): {refusal}"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("remove `rs485` from this bus"), "{stderr}");
    assert!(stderr.contains("probe without --rs485"), "{stderr}");

    // From a bus of the configuration that has `rs485`.
    let panda = MockPanda::start(TcpListener::bind("127.0.0.1:0").await.unwrap(), MockOptions::default());
    let site = Site::new(
        &site_config(&serial_bus(&path, Some("{}")), &panda.base_url(), "none", 1),
        &mapping_csv(1),
    );
    let config = site.config_path().display().to_string();
    let refused = fieldgate(read(&["--config", &config])).await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("rs485 (RTS high while sending, low after; delays 0ms / 0ms)") && stderr.contains(&refusal),
        "{stderr}"
    );
}

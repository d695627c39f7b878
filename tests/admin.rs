//! The admin API of a running gateway (`/metrics`, `/meters`, `/buses`, `/healthz`, `/outbox/dead`,
//! `/outbox/corrupt`), the commands that read it (`fieldgate status`, `fieldgate outbox
//! stats|list|dead|corrupt`), and `fieldgate probe` against the simulator.
//!
//! Everything runs in-process over real sockets: simulator (Modbus TCP) → gateway (`app::start`, real sled
//! on disk) → mock Panda (loopback HTTP). No sleep is an assertion: each check waits for its condition
//! with the shared deadline.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use fieldgate::app::Gateway;
use fieldgate::cli::outbox::{outbox_run, OutboxArgs, OutboxCommand};
use fieldgate::cli::probe::{probe_run, ParityArg, ProbeArgs, ProbeCliError, TableArg};
use fieldgate::cli::status::{status_run, StatusArgs};
use fieldgate::ops::api::MeterInfo;
use fieldgate::store::DamageTarget;
use fieldgate::tools::mock_panda::{MockOptions, MockPanda};
use fieldgate::tools::simulator::{serve_rtu_over_tcp, serve_tcp, Plant};
use tokio::net::TcpListener;

use crate::e2e::{rig, wait_for_baselines, wait_orders};
use crate::util::{mapping_csv, site_config, wait_until, Site};

const GRACE: Duration = Duration::from_secs(10);

fn url(gw: &Gateway) -> String {
    format!("http://{}", gw.admin_addr.expect("the admin API is bound"))
}

async fn get_text(gw: &Gateway, path: &str) -> (u16, String, String) {
    let resp = reqwest::get(format!("{}{path}", url(gw))).await.unwrap();
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (status, ct, resp.text().await.unwrap())
}

async fn get_json(gw: &Gateway, path: &str) -> (u16, serde_json::Value) {
    let (code, _, body) = get_text(gw, path).await;
    (
        code,
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}")),
    )
}

/// `/metrics` as series (`name{labels}`) → value.
async fn metrics(gw: &Gateway) -> BTreeMap<String, f64> {
    let (code, ct, text) = get_text(gw, "/metrics").await;
    assert_eq!(code, 200);
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {l}"));
            (
                series.to_string(),
                value.parse().unwrap_or_else(|_| panic!("bad value {l}")),
            )
        })
        .collect()
}

fn metric(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series).unwrap_or_else(|| panic!("no {series} in {m:#?}"))
}

/// Wait until `/metrics` shows `series` satisfying `cond`.
async fn wait_metric(gw: &Gateway, series: &str, cond: impl Fn(f64) -> bool) {
    wait_until(&format!("{series} as expected"), || async {
        metrics(gw).await.get(series).is_some_and(|v| cond(*v))
    })
    .await;
}

async fn health_codes(gw: &Gateway) -> (u16, String, Vec<String>) {
    let (code, h) = get_json(gw, "/healthz").await;
    let codes = h["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap().to_string())
        .collect();
    (code, h["status"].as_str().unwrap().to_string(), codes)
}

async fn meters(gw: &Gateway) -> Vec<MeterInfo> {
    let (code, v) = get_json(gw, "/meters").await;
    assert_eq!(code, 200);
    serde_json::from_value(v).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_transitions_deliveries_and_a_silenced_meter() {
    let rig = rig(3, "token", MockOptions::default()).await;
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;

    rig.plant.flip_valve(1);
    wait_orders(&rig.panda, 1).await;
    rig.plant.flip_valve(1);
    wait_orders(&rig.panda, 2).await;
    wait_metric(&gw, "fieldgate_records_delivered_total", |v| v == 2.0).await;
    rig.plant.silence(3, true);
    wait_metric(&gw, "fieldgate_meter_online{meter=\"M3\"}", |v| v == 0.0).await;

    let m = metrics(&gw).await;
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        metric(&m, &format!("fieldgate_build_info{{version=\"{version}\"}}")),
        1.0
    );
    assert_eq!(metric(&m, "fieldgate_transitions_total"), 2.0);
    assert_eq!(metric(&m, "fieldgate_records_delivered_total"), 2.0);
    assert_eq!(metric(&m, "fieldgate_records_queued"), 0.0);
    assert_eq!(metric(&m, "fieldgate_outbox_records"), 0.0);
    assert_eq!(metric(&m, "fieldgate_outbox_oldest_age_seconds"), 0.0);
    assert_eq!(metric(&m, "fieldgate_records_rejected_total"), 0.0);
    assert_eq!(metric(&m, "fieldgate_records_dead"), 0.0);
    assert!(metric(&m, "fieldgate_http_requests_total{outcome=\"ok\"}") >= 1.0);
    assert_eq!(metric(&m, "fieldgate_http_requests_total{outcome=\"rejected\"}"), 0.0);
    assert!(metric(&m, "fieldgate_token_refreshes_total") >= 1.0);
    assert!(metric(&m, "fieldgate_bus_requests_total{bus=\"line-a\"}") > 0.0);
    assert_eq!(metric(&m, "fieldgate_bus_up{bus=\"line-a\"}"), 1.0);
    assert!(
        metric(&m, "fieldgate_bus_errors_total{bus=\"line-a\",kind=\"timeout\"}") >= 2.0,
        "the silenced unit timed out offline_after times"
    );
    assert_eq!(
        metric(&m, "fieldgate_bus_timeouts_total{bus=\"line-a\"}"),
        metric(&m, "fieldgate_bus_errors_total{bus=\"line-a\",kind=\"timeout\"}")
    );
    assert!(
        metric(&m, "fieldgate_bus_reconnects_total{bus=\"line-a\"}") >= 1.0,
        "a timeout poisons the TCP connection"
    );
    assert!(metric(&m, "fieldgate_bus_last_round_seconds{bus=\"line-a\"}") > 0.0);
    assert_eq!(metric(&m, "fieldgate_meter_online{meter=\"M1\"}"), 1.0);
    assert_eq!(metric(&m, "fieldgate_meter_online{meter=\"M3\"}"), 0.0);
    assert!(metric(&m, "fieldgate_meter_last_sample_age_seconds{meter=\"M1\"}") < 30.0);
    assert_eq!(metric(&m, "fieldgate_health_status"), 1.0, "an offline meter degrades");

    let (code, status, codes) = health_codes(&gw).await;
    assert_eq!((code, status.as_str()), (200, "degraded"));
    assert_eq!(codes, ["meters_offline"]);
    let (_, h) = get_json(&gw, "/healthz").await;
    assert!(h["reasons"][0]["message"].as_str().unwrap().contains("M3"), "{h}");

    rig.plant.silence(3, false);
    wait_metric(&gw, "fieldgate_health_status", |v| v == 0.0).await;
    gw.stop(GRACE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meters_show_state_readings_and_last_change() {
    let rig = rig(2, "none", MockOptions::default()).await;
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    let before = meters(&gw).await;
    let baseline_m1 = before[0].last_change.clone().expect("baseline stored");

    rig.plant.flip_valve(2);
    wait_orders(&rig.panda, 1).await;
    let flow = rig.plant.flow(2).unwrap();
    let flow = format!("{}.{:02}", flow / 100, flow % 100);
    // The readings of the live view follow the next poll after the flip.
    wait_until("M2 open with its new flow in /meters", || async {
        let m = meters(&gw).await;
        m[1].state.as_deref() == Some("开启") && m[1].readings["累计流量"] == flow.as_str()
    })
    .await;

    let m = meters(&gw).await;
    assert_eq!(m.len(), 2);
    let (m1, m2) = (&m[0], &m[1]);
    assert_eq!((m1.meter_no.as_str(), m1.bus.as_str(), m1.unit), ("M1", "line-a", 1));
    assert_eq!((m2.meter_no.as_str(), m2.unit), ("M2", 2));
    assert!(m1.online && m2.online);
    assert_eq!(m1.state.as_deref(), Some("关闭"));
    assert_eq!(m1.stored_state.as_deref(), Some("关闭"));
    assert_eq!(m1.last_change.as_deref(), Some(baseline_m1.as_str()), "no change on M1");
    assert_eq!(m2.stored_state.as_deref(), Some("开启"));
    let changed = m2.last_change.as_deref().unwrap();
    assert!(changed.ends_with("+08:00"), "site time zone: {changed}");
    let changed = chrono::DateTime::parse_from_rfc3339(changed).unwrap();
    let baseline_m2 = chrono::DateTime::parse_from_rfc3339(before[1].last_change.as_deref().unwrap()).unwrap();
    assert!(
        changed >= baseline_m2,
        "the flip is the last change (seconds resolution)"
    );
    let keys: Vec<&String> = m2.readings.keys().collect();
    assert_eq!(keys, ["累计流量", "电池电压"], "configuration order");
    assert_eq!(m2.readings["电池电压"], "3.52");
    assert!(m2.last_sample_age_seconds.is_some_and(|a| a < 30.0));

    // /buses agrees.
    let (_, buses) = get_json(&gw, "/buses").await;
    assert_eq!(buses[0]["name"], "line-a");
    assert_eq!(buses[0]["transport"], "tcp");
    assert_eq!(buses[0]["up"], true);
    assert_eq!(buses[0]["meters"], 2);
    assert_eq!(buses[0]["meters_online"], 2);
    gw.stop(GRACE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_that_cannot_connect_is_critical_until_it_comes_up() {
    // A free port nobody listens on yet.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let panda = MockPanda::start(TcpListener::bind("127.0.0.1:0").await.unwrap(), MockOptions::default());
    let config = site_config(&format!("tcp = \"127.0.0.1:{port}\""), &panda.base_url(), "none", 2);
    let site = Site::new(&config, &mapping_csv(2));
    let gw = fieldgate::app::start(site.load()).await.unwrap();

    wait_until("bus_down on /healthz", || async {
        health_codes(&gw).await.2.contains(&"bus_down".to_string())
    })
    .await;
    let (code, status, codes) = health_codes(&gw).await;
    assert_eq!((code, status.as_str()), (503, "critical"));
    assert!(
        !codes.contains(&"meters_offline".to_string()),
        "meters of a down bus are not reported twice: {codes:?}"
    );
    let m = metrics(&gw).await;
    assert_eq!(metric(&m, "fieldgate_bus_up{bus=\"line-a\"}"), 0.0);
    assert!(metric(&m, "fieldgate_bus_connect_failures_total{bus=\"line-a\"}") >= 1.0);
    assert_eq!(metric(&m, "fieldgate_health_status"), 2.0);

    // The device comes up: the bus reconnects by itself and health is ok again.
    let plant = Plant::with_meters(2);
    let _sim = serve_tcp(TcpListener::bind(("127.0.0.1", port)).await.unwrap(), plant);
    wait_until("health ok after the bus came up", || async {
        health_codes(&gw).await.1 == "ok"
    })
    .await;
    wait_for_baselines(&gw).await;
    assert_eq!(metric(&metrics(&gw).await, "fieldgate_bus_up{bus=\"line-a\"}"), 1.0);
    gw.stop(GRACE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_panda_server_degrades_health_and_queued_records_show() {
    let rig = rig(2, "token", MockOptions::default()).await;
    let panda_addr = rig.panda.addr();
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    rig.panda.stop().await;

    rig.plant.flip_valve(1);
    wait_until("delivery_failing on /healthz", || async {
        health_codes(&gw).await.2.contains(&"delivery_failing".to_string())
    })
    .await;
    let (code, status, _) = health_codes(&gw).await;
    assert_eq!((code, status.as_str()), (200, "degraded"));
    let m = metrics(&gw).await;
    assert_eq!(metric(&m, "fieldgate_records_queued"), 1.0);
    assert_eq!(metric(&m, "fieldgate_transitions_total"), 1.0);
    assert!(metric(&m, "fieldgate_outbox_bytes") > 0.0);
    assert!(metric(&m, "fieldgate_http_requests_total{outcome=\"transient\"}") >= 1.0);

    // `fieldgate status` and `fieldgate outbox stats|list` through the admin API.
    let admin = Some(url(&gw));
    let text = status_run(StatusArgs {
        config: None,
        admin: admin.clone(),
        json: false,
    })
    .await
    .unwrap();
    for want in [
        "site `test-station`",
        "DEGRADED",
        "delivery_failing",
        "line-a",
        "tcp 127.0.0.1:",
        "2/2",
        "M1",
        "M2",
        "开启",
        "累计流量=",
        "queued 1 record(s)",
        "dead letters 0",
    ] {
        assert!(text.contains(want), "`{want}` missing from status:\n{text}");
    }
    let record = gw.outbox.list(1).unwrap().remove(0);
    let args = |command| through(&admin, command);
    let stats = outbox_run(args(OutboxCommand::Stats)).await.unwrap();
    assert!(stats.contains("queued        1 record(s) (bound 200000)"), "{stats}");
    assert!(stats.contains("dead letters  0"), "{stats}");
    let list = outbox_run(args(OutboxCommand::List { limit: 10 })).await.unwrap();
    let row = list
        .lines()
        // The header ("1 of 1 queued …") may start with the same digits as the id.
        .find(|l| l.trim_start().starts_with(&record.id.to_string()) && !l.contains("queued record(s)"))
        .unwrap_or_else(|| panic!("no row for {} in\n{list}", record.id));
    assert!(
        row.contains("M1") && row.contains("用水户开阀") && row.contains(&record.detected_at),
        "{row}"
    );
    assert!(list.contains("1 of 1 queued record(s)"), "{list}");

    // The server is back: the record goes out and health is ok.
    let panda = MockPanda::start(TcpListener::bind(panda_addr).await.unwrap(), MockOptions::default());
    wait_orders(&panda, 1).await;
    wait_until("health ok after delivery", || async {
        health_codes(&gw).await.1 == "ok"
    })
    .await;
    gw.stop(GRACE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_stats_and_list_read_a_stopped_state_dir_and_status_says_when_the_daemon_is_gone() {
    let rig = rig(2, "token", MockOptions::default()).await;
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    rig.panda.stop().await;
    rig.plant.flip_valve(2);
    wait_until("one record queued", || async { gw.outbox.len() == 1 }).await;
    let admin = url(&gw);
    let state_dir: PathBuf = gw.cfg.site.state_dir.clone();
    gw.stop(GRACE).await;

    let args = |command| OutboxArgs {
        command,
        config: None,
        state_dir: Some(state_dir.clone()),
        admin: None,
        json: false,
    };
    let stats = outbox_run(args(OutboxCommand::Stats)).await.unwrap();
    assert!(
        stats.contains("queued        1 record(s)\n"),
        "no bounds offline: {stats}"
    );
    assert!(stats.contains(&state_dir.display().to_string()), "{stats}");
    assert!(
        stats.contains("\n  Disk: ") && !stats.contains("reserve"),
        "free space, but no reserve without the configuration: {stats}"
    );
    let list = outbox_run(args(OutboxCommand::List { limit: 10 })).await.unwrap();
    assert!(list.contains("M2") && list.contains("用水户开阀"), "{list}");
    let corrupt = outbox_run(args(OutboxCommand::Corrupt { limit: 10 })).await.unwrap();
    assert_eq!(
        corrupt,
        format!(
            "No entries set aside in {}: every entry of the state database reads.\n",
            state_dir.display()
        )
    );
    let json = outbox_run(OutboxArgs {
        json: true,
        ..args(OutboxCommand::List { limit: 10 })
    })
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v[0]["meter_no"], "M2");

    let err = status_run(StatusArgs {
        config: None,
        admin: Some(admin),
        json: false,
    })
    .await
    .unwrap_err();
    assert_eq!(err.error_code(), "unreachable");
    assert!(err.to_string().contains("systemctl status fieldgate"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_page_set_aside_entries_list_and_metrics_show_the_store() {
    let rig = rig(
        3,
        "token",
        MockOptions {
            unknown_events: vec!["用水户开阀".into()],
            ..MockOptions::default()
        },
    )
    .await;
    // A record the server refuses alone is a dead letter at once.
    let config = std::fs::read_to_string(rig.site.config_path()).unwrap() + "\n[outbox]\ndead_after = 1\n";
    std::fs::write(rig.site.config_path(), config).unwrap();
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    for unit in 1..=3 {
        rig.plant.flip_valve(unit);
    }
    wait_metric(&gw, "fieldgate_records_dead", |v| v == 3.0).await;

    // Dead letters, a page at a time, oldest first.
    let ids = |v: &serde_json::Value| -> Vec<u64> {
        v.as_array()
            .unwrap_or_else(|| panic!("not a list: {v}"))
            .iter()
            .map(|d| d["id"].as_u64().unwrap())
            .collect()
    };
    let (code, all) = get_json(&gw, "/outbox/dead").await;
    assert_eq!(code, 200);
    let all_ids = ids(&all);
    assert_eq!(all_ids.len(), 3, "{all}");
    assert!(all_ids.windows(2).all(|w| w[0] < w[1]), "oldest first: {all_ids:?}");
    let mut dead_meters: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["meter_no"].as_str().unwrap())
        .collect();
    dead_meters.sort_unstable();
    assert_eq!(dead_meters, ["M1", "M2", "M3"]);
    assert!(all[0]["msg"].as_str().unwrap().contains("不存在"), "{all}");
    let (code, first) = get_json(&gw, "/outbox/dead?limit=2").await;
    assert_eq!((code, ids(&first)), (200, all_ids[..2].to_vec()));
    let (code, rest) = get_json(&gw, &format!("/outbox/dead?limit=2&after={}", all_ids[1])).await;
    assert_eq!((code, ids(&rest)), (200, all_ids[2..].to_vec()));
    let (code, none) = get_json(&gw, &format!("/outbox/dead?limit=2&after={}", all_ids[2])).await;
    assert_eq!((code, ids(&none)), (200, vec![]));

    // Nothing is set aside yet; then a meter's stored state stops decoding, as a failing disk would
    // leave it, and is set aside when it is read (`/meters` reads every stored state).
    let (code, corrupt) = get_json(&gw, "/outbox/corrupt").await;
    assert_eq!((code, corrupt), (200, serde_json::json!([])));
    gw.outbox.damage(DamageTarget::State("M1"), b"{\"raw\":").unwrap();
    let m = meters(&gw).await;
    assert_eq!((m[0].meter_no.as_str(), m[0].stored_state.as_deref()), ("M1", None));
    let (code, corrupt) = get_json(&gw, "/outbox/corrupt?limit=5").await;
    assert_eq!(code, 200);
    let list = corrupt.as_array().unwrap_or_else(|| panic!("not a list: {corrupt}"));
    assert_eq!(list.len(), 1, "{corrupt}");
    assert_eq!(
        (&list[0]["entry"], &list[0]["bytes"], &list[0]["preview"]),
        (
            &serde_json::json!("state M1"),
            &serde_json::json!(7),
            &serde_json::json!("{\"raw\":")
        )
    );
    assert!(!list[0]["error"].as_str().unwrap().is_empty(), "{corrupt}");
    let (_, corrupt) = get_json(&gw, "/outbox/corrupt?limit=0").await;
    assert_eq!(corrupt, serde_json::json!([]));

    wait_until("health names the dead letters and the set-aside entry", || async {
        health_codes(&gw).await.2 == ["dead_letters", "corrupt_entries"]
    })
    .await;
    let (code, status, _) = health_codes(&gw).await;
    assert_eq!((code, status.as_str()), (200, "degraded"));

    let m = metrics(&gw).await;
    assert_eq!(metric(&m, "fieldgate_records_dead"), 3.0);
    assert_eq!(metric(&m, "fieldgate_outbox_corrupt_entries"), 1.0);
    assert_eq!(metric(&m, "fieldgate_dead_letters_max"), 10_000.0);
    assert_eq!(metric(&m, "fieldgate_dead_letters_refused_total"), 0.0);
    assert_eq!(metric(&m, "fieldgate_store_failed"), 0.0);
    assert_eq!(metric(&m, "fieldgate_store_failures_total"), 0.0);
    assert_eq!(metric(&m, "fieldgate_store_reopens_total"), 0.0);
    assert_eq!(metric(&m, "fieldgate_store_min_free_bytes"), (64u64 << 20) as f64);
    assert!(metric(&m, "fieldgate_store_free_bytes") > (64u64 << 20) as f64);
    assert_eq!(metric(&m, "fieldgate_outbox_refused_space_total"), 0.0);
    assert_eq!(metric(&m, "fieldgate_sender_store_retries_total"), 0.0);

    // The commands that read these.
    let admin = Some(url(&gw));
    let args = |command| through(&admin, command);
    let dead = outbox_run(args(OutboxCommand::Dead)).await.unwrap();
    assert!(dead.starts_with("3 dead letter(s) in the running daemon"), "{dead}");
    let text = outbox_run(args(OutboxCommand::Corrupt { limit: 10 })).await.unwrap();
    assert!(
        text.starts_with("1 entry of the state database in the running daemon") && text.contains("  state M1  7 "),
        "{text}"
    );
    let stats = outbox_run(args(OutboxCommand::Stats)).await.unwrap();
    assert!(stats.contains("  dead letters  3\n"), "{stats}");
    assert!(stats.contains("(reserve 64 MiB)\n"), "{stats}");
    let text = status_run(StatusArgs {
        config: None,
        admin: admin.clone(),
        json: false,
    })
    .await
    .unwrap();
    for want in [
        "corrupt_entries",
        "  Set aside: 1 unreadable entry of the state database — see `fieldgate outbox corrupt`\n",
        "(reserve 64 MiB)\n",
        "  State database: ok\n",
    ] {
        assert!(text.contains(want), "`{want}` missing from status:\n{text}");
    }
    gw.stop(GRACE).await;
}

fn probe_args(line: (&str, String), unit: u8, table: TableArg, address: u16, count: u16) -> ProbeArgs {
    let mut a = ProbeArgs {
        config: None,
        bus: None,
        tcp: None,
        serial: None,
        baud: 9600,
        parity: ParityArg::None,
        stop_bits: 1,
        rs485: None,
        rtu_over_tcp: None,
        unit,
        table,
        address,
        count,
        timeout: Some(Duration::from_millis(500)),
    };
    match line.0 {
        "tcp" => a.tcp = Some(line.1),
        "rtu" => a.rtu_over_tcp = Some(line.1),
        "config" => a.config = Some(PathBuf::from(line.1)),
        other => panic!("{other}"),
    }
    a
}

fn row_of<'a>(text: &'a str, addr: &str, order: &str) -> Vec<&'a str> {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|c| c.first() == Some(&addr) && c.get(1) == Some(&order))
        .unwrap_or_else(|| panic!("no row {addr} {order} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_prints_known_registers_in_every_order_and_explains_failures() {
    let plant = Plant::with_meters(2);
    assert!(plant.set_holding(1, 10, 0x4049) && plant.set_holding(1, 11, 0x0FDB));
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_addr = tcp.local_addr().unwrap().to_string();
    let _tcp = serve_tcp(tcp, plant.clone());
    let rtu = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rtu_addr = rtu.local_addr().unwrap().to_string();
    let _rtu = serve_rtu_over_tcp(rtu, plant.clone());

    for line in [("tcp", tcp_addr.clone()), ("rtu", rtu_addr)] {
        let text = probe_run(probe_args(line.clone(), 1, TableArg::Holding, 10, 2))
            .await
            .unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert!(text.contains("unit 1, holding 10..11"), "{text}");
        assert_eq!(
            row_of(&text, "10", "ABCD"),
            ["10", "ABCD", "0x40490fdb", "1078530011", "1078530011", "3.1415927"]
        );
        assert_eq!(row_of(&text, "10", "CDAB")[2], "0x0fdb4049");
        let reg: Vec<&str> = text
            .lines()
            .find(|l| l.trim_start().starts_with("10 ") && l.contains("0x4049"))
            .unwrap()
            .split_whitespace()
            .collect();
        assert_eq!(reg, ["10", "0x4049", "16457", "16457", "0x4940", "18752", "18752"]);
    }

    // Through the configuration: the bus's line; the simulator's flow of unit 2 (u32 at holding 0).
    let config = site_config(&format!("tcp = \"{tcp_addr}\""), "http://127.0.0.1:1", "none", 2);
    let site = Site::new(&config, &mapping_csv(2));
    let mut args = probe_args(
        ("config", site.config_path().display().to_string()),
        2,
        TableArg::Holding,
        0,
        2,
    );
    args.bus = Some("line-a".into());
    let text = probe_run(args.clone()).await.unwrap();
    let flow = plant.flow(2).unwrap();
    assert_eq!(row_of(&text, "0", "ABCD")[3], flow.to_string(), "{text}");
    args.bus = Some("nope".into());
    let err = probe_run(args).await.unwrap_err();
    assert!(err.to_string().contains("line-a"), "{err}");

    // Coils.
    plant.flip_valve(1);
    let text = probe_run(probe_args(("tcp", tcp_addr.clone()), 1, TableArg::Coil, 0, 2))
        .await
        .unwrap();
    assert!(text.contains("  0     1\n") && text.contains("  1     0\n"), "{text}");

    // An address the device does not have: the exception and what it means.
    let err = probe_run(probe_args(("tcp", tcp_addr.clone()), 1, TableArg::Holding, 60, 10))
        .await
        .unwrap_err();
    assert_eq!(err.error_code(), "exception");
    let msg = err.to_string();
    assert!(
        msg.contains("illegal data address") && msg.contains("--address"),
        "{msg}"
    );

    // A silent unit: a timeout, with the things to check.
    plant.silence(2, true);
    let err = probe_run(probe_args(("tcp", tcp_addr), 2, TableArg::Holding, 0, 1))
        .await
        .unwrap_err();
    assert!(matches!(err, ProbeCliError::Read { .. }));
    assert_eq!(err.error_code(), "timeout");
    assert!(err.to_string().contains("unit id"), "{err}");

    // Nothing listening.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = probe_run(probe_args(
        ("tcp", format!("127.0.0.1:{port}")),
        1,
        TableArg::Holding,
        0,
        1,
    ))
    .await
    .unwrap_err();
    assert_eq!(err.error_code(), "open");
    assert!(err.to_string().contains("Nothing listens"), "{err}");
}

/// `fieldgate outbox` arguments that go through the admin API at `admin`.
fn through(admin: &Option<String>, command: OutboxCommand) -> OutboxArgs {
    OutboxArgs {
        command,
        config: None,
        state_dir: None,
        admin: admin.clone(),
        json: false,
    }
}

//! Event rules end to end (issue 6): the in-process Modbus simulator over real TCP, the gateway with a
//! real sled database, the strict mock Panda. For each kind: exactly one work order per occurrence,
//! none for glitches, and the right count across a restart in the middle of a `for` or a `rises_by`
//! window. "Nothing happened" is observed by waiting for more bus rounds, never by sleeping.

use std::time::Duration;

use chrono::{DateTime, Utc};
use fieldgate::app::Gateway;
use fieldgate::tools::mock_panda::{MockOptions, MockPanda, WorkOrder};
use fieldgate::tools::simulator::{serve_tcp, Plant};
use tokio::net::TcpListener;

use crate::e2e::{wait_for_baselines, wait_orders, wait_rounds, Rig};
use crate::util::{mapping_csv, site_config, wait_until, Site};

const GRACE: Duration = Duration::from_secs(10);

/// Meters whose valve is the simulator's status register (holding 3: 关闭/开启/故障), reading
/// 累计流量, 电池电压 and 水温 (f32 at holding 10, so a NaN can be served), with `events` added to
/// the two valve events of the base config.
async fn rig_with(n: usize, events: &str) -> Rig {
    let plant = Plant::with_meters(n as u8);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let modbus = listener.local_addr().unwrap();
    let sim = serve_tcp(listener, plant.clone());
    let mut names: Vec<String> = vec!["用水户开阀".into(), "用水户关阀".into()];
    for line in events.lines() {
        if let Some(name) = line.strip_prefix("name = ") {
            names.push(name.trim_matches('"').to_string());
        }
    }
    let panda = MockPanda::start(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        MockOptions {
            events: names,
            ..MockOptions::default()
        },
    );
    let base = site_config(&format!("tcp = \"{modbus}\""), &panda.base_url(), "none", n);
    let coil = r#"valve = { table = "coil", address = 0, states = { 0 = "关闭", 1 = "开启" } }"#;
    assert!(base.contains(coil), "the base config changed: update this test");
    let config =
        base.replace(
            coil,
            r#"valve = { table = "holding", address = 3, states = { 0 = "关闭", 1 = "开启", 2 = "故障" } }"#,
        )
        .replace(
            "  { field = \"电池电压\", table = \"holding\", address = 2, scale = 0.01 },\n",
            "  { field = \"电池电压\", table = \"holding\", address = 2, scale = 0.01 },\n  \
             { field = \"水温\", table = \"holding\", address = 10, type = \"f32\" },\n",
        ) + "\n"
            + events;
    let site = Site::new(&config, &mapping_csv(n));
    Rig {
        plant,
        _sim: sim,
        panda,
        site,
    }
}

fn s(o: &WorkOrder, key: &str) -> String {
    o.biz
        .get(key)
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("BizData has no {key}: {:?}", o.biz))
        .to_string()
}

fn named<'a>(orders: &'a [WorkOrder], event: &str) -> Vec<&'a WorkOrder> {
    orders.iter().filter(|o| o.event_name == event).collect()
}

/// Let `rounds` more bus rounds pass, let the outbox drain, and return every order delivered.
async fn settle(gw: &Gateway, panda: &MockPanda, rounds: u64) -> Vec<WorkOrder> {
    wait_rounds(gw, rounds).await;
    wait_until("outbox drained", || async { gw.outbox.is_empty() }).await;
    panda.orders()
}

fn flow(plant: &Plant, unit: u8) -> String {
    let raw = plant.flow(unit).unwrap();
    format!("{}.{:02}", raw / 100, raw % 100)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valve_fault_is_one_work_order_with_the_events_fixed_fields() {
    let rig = rig_with(
        3,
        r#"
[[event]]
name = "阀门故障"
point = "valve"
to = "故障"
fields = { "事件说明" = "阀门报告故障", "处理建议" = "派人检查阀门" }
"#,
    )
    .await;
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    assert!(rig.plant.fault_valve(2));
    let orders = wait_orders(&rig.panda, 1).await;
    let o = &orders[0];
    assert_eq!(o.event_name, "阀门故障");
    assert_eq!(s(o, "水表表号"), "M2");
    assert_eq!(s(o, "阀门当前状态"), "故障");
    assert_eq!(s(o, "事件说明"), "阀门报告故障");
    assert_eq!(s(o, "处理建议"), "派人检查阀门");
    assert_eq!(s(o, "用户名称"), "用户2", "the mapping row is there as before");
    assert_eq!(s(o, "累计流量"), flow(&rig.plant, 2));

    // The fault stays: no second work order. A flip clears it and is an ordinary transition.
    let orders = settle(&gw, &rig.panda, 10).await;
    assert_eq!(orders.len(), 1, "{orders:#?}");
    rig.plant.flip_valve(2);
    let orders = wait_orders(&rig.panda, 2).await;
    assert_eq!(orders[1].event_name, "用水户开阀");
    assert!(
        orders[1].biz.get("事件说明").is_none(),
        "fixed fields belong to their event only"
    );
    gw.stop(GRACE).await;
}

const LINK_EVENTS: &str = r#"
[[event]]
name = "水表离线"
point = "link"
to = "离线"
for = "FOR"
fields = { "事件说明" = "水表不应答" }

[[event]]
name = "水表恢复在线"
point = "link"
to = "在线"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_for_is_one_work_order_and_the_return_another() {
    let rig = rig_with(3, &LINK_EVENTS.replace("FOR", "600ms")).await;
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    let (flow2, battery2) = (flow(&rig.plant, 2), "3.52".to_string());
    rig.plant.silence(2, true);
    let orders = wait_orders(&rig.panda, 1).await;
    let o = &orders[0];
    assert_eq!(o.event_name, "水表离线");
    assert_eq!(s(o, "水表表号"), "M2");
    assert_eq!(s(o, "阀门当前状态"), "关闭", "the last known valve label");
    assert_eq!(s(o, "累计流量"), flow2, "the last readings of the meter");
    assert_eq!(s(o, "电池电压"), battery2);
    assert_eq!(s(o, "事件说明"), "水表不应答");

    // Still offline for many more rounds: still one work order.
    let orders = settle(&gw, &rig.panda, 20).await;
    assert_eq!(orders.len(), 1, "{orders:#?}");

    rig.plant.silence(2, false);
    let orders = wait_orders(&rig.panda, 2).await;
    assert_eq!(orders[1].event_name, "水表恢复在线");
    assert_eq!(s(&orders[1], "水表表号"), "M2");
    let orders = settle(&gw, &rig.panda, 10).await;
    assert_eq!(orders.len(), 2, "{orders:#?}");

    // A second outage is a second occurrence.
    rig.plant.silence(2, true);
    wait_orders(&rig.panda, 3).await;
    rig.plant.silence(2, false);
    let orders = wait_orders(&rig.panda, 4).await;
    let names: Vec<&str> = orders.iter().map(|o| o.event_name.as_str()).collect();
    assert_eq!(names, ["水表离线", "水表恢复在线", "水表离线", "水表恢复在线"]);
    let orders = settle(&gw, &rig.panda, 10).await;
    assert_eq!(orders.len(), 4, "{orders:#?}");
    gw.stop(GRACE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_shorter_than_for_makes_no_work_order_at_all() {
    // `for` is far longer than the outage below (offline_retry is 300 ms in the test config).
    let rig = rig_with(3, &LINK_EVENTS.replace("FOR", "20s")).await;
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    rig.plant.silence(2, true);
    wait_until("M2 offline", || async { !gw.live.snapshot()[1].online }).await;
    rig.plant.silence(2, false);
    wait_until("M2 online", || async { gw.live.snapshot()[1].online }).await;
    // Neither 离线 (too short) nor 在线 (its outage was never reported).
    let orders = settle(&gw, &rig.panda, 20).await;
    assert!(orders.is_empty(), "{orders:#?}");
    gw.stop(GRACE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_the_middle_of_for_neither_repeats_nor_forgets_the_work_order() {
    let rig = rig_with(3, &LINK_EVENTS.replace("FOR", "2s")).await;
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    rig.plant.silence(2, true);
    wait_until("M2 counted offline", || async {
        gw.outbox
            .state("M2")
            .ok()
            .flatten()
            .and_then(|st| st.offline_since)
            .is_some()
    })
    .await;
    let since: DateTime<Utc> = gw.outbox.state("M2").unwrap().unwrap().offline_since.unwrap();
    assert!(rig.panda.orders().is_empty());
    gw.stop(GRACE).await;

    // Restarted (most likely before the 2 s ran out): the outage keeps its start, and is reported once.
    let gw = rig.start().await;
    let orders = wait_orders(&rig.panda, 1).await;
    assert_eq!(orders[0].event_name, "水表离线");
    let st = gw.outbox.state("M2").unwrap().unwrap();
    assert_eq!(st.offline_since, Some(since), "the restart did not restart the outage");
    assert!(
        Utc::now() >= since + chrono::Duration::seconds(2),
        "reported before its `for` ran out"
    );
    let orders = settle(&gw, &rig.panda, 20).await;
    assert_eq!(orders.len(), 1, "{orders:#?}");
    gw.stop(GRACE).await;

    // A third start, the meter still dead: the outage was reported already.
    let gw = rig.start().await;
    wait_until("M2 offline again", || async { !gw.live.snapshot()[1].online }).await;
    let orders = settle(&gw, &rig.panda, 20).await;
    assert_eq!(orders.len(), 1, "{orders:#?}");
    // It comes back: the return of a reported outage is reported, once.
    rig.plant.silence(2, false);
    let orders = wait_orders(&rig.panda, 2).await;
    assert_eq!(orders[1].event_name, "水表恢复在线");
    let orders = settle(&gw, &rig.panda, 10).await;
    assert_eq!(orders.len(), 2, "{orders:#?}");
    gw.stop(GRACE).await;
}

const BATTERY_EVENTS: &str = r#"
[[event]]
name = "电池电压低"
point = "reading"
field = "电池电压"
below = 3.3
rearm = 3.4

[[event]]
name = "水温过高"
point = "reading"
field = "水温"
above = 50
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_falling_battery_is_one_work_order_and_wobbling_in_the_band_is_none() {
    let rig = rig_with(3, BATTERY_EVENTS).await;
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    rig.plant.set_battery(2, 340);
    wait_rounds(&gw, 3).await;
    rig.plant.set_battery(2, 329);
    let orders = wait_orders(&rig.panda, 1).await;
    assert_eq!(orders[0].event_name, "电池电压低");
    assert_eq!(s(&orders[0], "电池电压"), "3.29");
    assert_eq!(s(&orders[0], "阀门当前状态"), "关闭");

    // Wobbling around the limit, inside the band below rearm: nothing more.
    for raw in [335, 325, 331, 339, 320, 333] {
        rig.plant.set_battery(2, raw);
        wait_rounds(&gw, 3).await;
    }
    let orders = settle(&gw, &rig.panda, 5).await;
    assert_eq!(orders.len(), 1, "{orders:#?}");

    // Back past rearm (a new battery), then low again: a second occurrence.
    rig.plant.set_battery(2, 360);
    wait_rounds(&gw, 3).await;
    rig.plant.set_battery(2, 310);
    let orders = wait_orders(&rig.panda, 2).await;
    assert_eq!(s(&orders[1], "电池电压"), "3.10");
    let orders = settle(&gw, &rig.panda, 10).await;
    assert_eq!(named(&orders, "电池电压低").len(), 2, "{orders:#?}");
    gw.stop(GRACE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_reading_or_an_offline_meter_never_fires_a_threshold() {
    let rig = rig_with(3, BATTERY_EVENTS).await;
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    // 水温 = NaN (f32 0x7FC00000), then +inf: not a value, no work order.
    rig.plant.set_holding(1, 10, 0x7FC0);
    wait_rounds(&gw, 5).await;
    rig.plant.set_holding(1, 10, 0x7F80);
    let orders = settle(&gw, &rig.panda, 5).await;
    assert!(orders.is_empty(), "{orders:#?}");
    assert_eq!(gw.live.snapshot()[0].readings[2], "inf", "the reading was served");
    // 60.0 (0x42700000): a real value past the limit.
    rig.plant.set_holding(1, 10, 0x4270);
    let orders = wait_orders(&rig.panda, 1).await;
    assert_eq!(orders[0].event_name, "水温过高");
    assert_eq!(s(&orders[0], "水温"), "60");

    // A meter that does not answer fires nothing, whatever its battery says; once back, it does.
    rig.plant.silence(3, true);
    wait_until("M3 offline", || async { !gw.live.snapshot()[2].online }).await;
    rig.plant.set_battery(3, 300);
    let orders = settle(&gw, &rig.panda, 10).await;
    assert_eq!(orders.len(), 1, "{orders:#?}");
    rig.plant.silence(3, false);
    let orders = wait_orders(&rig.panda, 2).await;
    assert_eq!(orders[1].event_name, "电池电压低");
    assert_eq!(s(&orders[1], "水表表号"), "M3");
    gw.stop(GRACE).await;
}

const LEAK_EVENTS: &str = r#"
[[event]]
name = "关阀后仍有流量"
point = "reading"
field = "累计流量"
rises_by = 0.02
while_valve = "关闭"
fields = { "事件说明" = "关阀后水表仍在走" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_through_a_shut_valve_is_one_work_order_per_closed_period() {
    let rig = rig_with(3, LEAK_EVENTS).await;
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    // Below rises_by: nothing.
    rig.plant.add_flow(2, 1);
    let orders = settle(&gw, &rig.panda, 5).await;
    assert!(orders.is_empty(), "{orders:#?}");
    rig.plant.add_flow(2, 1);
    let orders = wait_orders(&rig.panda, 1).await;
    assert_eq!(orders[0].event_name, "关阀后仍有流量");
    assert_eq!(s(&orders[0], "阀门当前状态"), "关闭");
    assert_eq!(s(&orders[0], "累计流量"), flow(&rig.plant, 2));
    assert_eq!(s(&orders[0], "事件说明"), "关阀后水表仍在走");
    // The leak goes on: still one work order for this closed period.
    for _ in 0..3 {
        rig.plant.add_flow(2, 50);
        wait_rounds(&gw, 2).await;
    }
    let orders = settle(&gw, &rig.panda, 5).await;
    assert_eq!(orders.len(), 1, "{orders:#?}");

    // Opened (flow while open is normal), closed again (the flip's own flow is the new baseline).
    rig.plant.flip_valve(2);
    wait_orders(&rig.panda, 2).await;
    rig.plant.add_flow(2, 500);
    wait_rounds(&gw, 3).await;
    rig.plant.flip_valve(2);
    wait_orders(&rig.panda, 3).await;
    let orders = settle(&gw, &rig.panda, 5).await;
    let names: Vec<&str> = orders.iter().map(|o| o.event_name.as_str()).collect();
    assert_eq!(names, ["关阀后仍有流量", "用水户开阀", "用水户关阀"]);
    // A new closed period, a new leak.
    rig.plant.add_flow(2, 2);
    let orders = wait_orders(&rig.panda, 4).await;
    assert_eq!(orders[3].event_name, "关阀后仍有流量");
    let orders = settle(&gw, &rig.panda, 10).await;
    assert_eq!(orders.len(), 4, "{orders:#?}");
    gw.stop(GRACE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_the_middle_of_a_rises_by_window_keeps_its_baseline() {
    let rig = rig_with(3, LEAK_EVENTS).await;
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    wait_until("M2's baseline stored", || async {
        gw.outbox
            .state("M2")
            .ok()
            .flatten()
            .is_some_and(|st| st.rules.values().any(|m| m.baseline.is_some()))
    })
    .await;
    // Half the rise before the restart, half while the gateway is down.
    rig.plant.add_flow(2, 1);
    let orders = settle(&gw, &rig.panda, 5).await;
    assert!(orders.is_empty(), "{orders:#?}");
    gw.stop(GRACE).await;
    rig.plant.add_flow(2, 1);

    let gw = rig.start().await;
    let orders = wait_orders(&rig.panda, 1).await;
    assert_eq!(orders[0].event_name, "关阀后仍有流量");
    assert_eq!(s(&orders[0], "水表表号"), "M2");
    assert_eq!(s(&orders[0], "累计流量"), flow(&rig.plant, 2));
    let orders = settle(&gw, &rig.panda, 10).await;
    assert_eq!(orders.len(), 1, "{orders:#?}");
    gw.stop(GRACE).await;

    // Restarted again with the leak still going: the closed period was reported already.
    rig.plant.add_flow(2, 10);
    let gw = rig.start().await;
    let orders = settle(&gw, &rig.panda, 15).await;
    assert_eq!(orders.len(), 1, "{orders:#?}");
    gw.stop(GRACE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flow_of_a_valve_being_opened_is_no_leak_while_confirm_is_pending() {
    let rig = rig_with(3, LEAK_EVENTS).await;
    let text = std::fs::read_to_string(rig.site.config_path())
        .unwrap()
        .replace("[profile.sim]\n", "[profile.sim]\nconfirm = 3\n");
    std::fs::write(rig.site.config_path(), text).unwrap();
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    wait_rounds(&gw, 3).await;
    // The flip opens the valve and adds 1.23 m³ at once; the open state needs 3 equal samples, and
    // during the first two the accepted state is still 关闭.
    rig.plant.flip_valve(2);
    let orders = wait_orders(&rig.panda, 1).await;
    assert_eq!(orders[0].event_name, "用水户开阀");
    let orders = settle(&gw, &rig.panda, 10).await;
    assert_eq!(orders.len(), 1, "{orders:#?}");
    gw.stop(GRACE).await;
}

/// M2's stored outage start, if it is counted offline.
fn outage_start(gw: &Gateway, meter: &str) -> Option<DateTime<Utc>> {
    gw.outbox.state(meter).ok().flatten().and_then(|st| st.offline_since)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_step_forward_and_back_during_a_short_outage_makes_no_work_order() {
    // A board without a battery-backed clock: NTP steps it by decades while a meter is silent for a
    // moment. `for` is far longer than the outages.
    let rig = rig_with(3, &LINK_EVENTS.replace("FOR", "10m")).await;
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    let fifty_six_years = chrono::Duration::days(56 * 365);
    for (unit, meter, step) in [(2, "M2", fifty_six_years), (3, "M3", -fifty_six_years)] {
        rig.plant.silence(unit, true);
        wait_until("counted offline", || async { outage_start(&gw, meter).is_some() }).await;
        gw.live.clock.step(step);
        wait_rounds(&gw, 5).await;
        rig.plant.silence(unit, false);
        wait_until("back online", || async { outage_start(&gw, meter).is_none() }).await;
    }
    // Neither 离线 (each outage was far shorter than `for`) nor 在线 (none was reported).
    let orders = settle(&gw, &rig.panda, 20).await;
    assert!(orders.is_empty(), "{orders:#?}");
    gw.stop(GRACE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_orders_refused_while_the_outbox_is_full_fire_once_there_is_room() {
    // No `for`: 离线 fires on the cycle the bus reports the outage, which finds the outbox full.
    let events = LINK_EVENTS.replace("for = \"FOR\"\n", "") + BATTERY_EVENTS;
    let rig = rig_with(4, &events).await;
    let text = std::fs::read_to_string(rig.site.config_path()).unwrap() + "\n[outbox]\nmax_records = 2\n";
    std::fs::write(rig.site.config_path(), text).unwrap();
    rig.panda.set_unavailable(true);
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    rig.plant.flip_valve(1);
    rig.plant.flip_valve(4);
    wait_until("the outbox full", || async { gw.outbox.len() == 2 }).await;
    // While full: M2 goes silent (离线), M3's battery falls (电池电压低).
    rig.plant.silence(2, true);
    assert!(rig.plant.set_battery(3, 320));
    wait_until("a commit refused", || async { gw.outbox.is_refusing() }).await;
    wait_rounds(&gw, 10).await;
    assert!(!gw.live.snapshot()[1].online, "M2 is offline");
    assert_eq!(gw.outbox.len(), 2, "nothing more fits");

    // The server comes back; M2 is still silent and M3's battery still low: both fire now, once.
    rig.panda.set_unavailable(false);
    let orders = wait_orders(&rig.panda, 4).await;
    let orders = {
        let more = settle(&gw, &rig.panda, 20).await;
        assert_eq!(more.len(), orders.len(), "{more:#?}");
        more
    };
    let got: Vec<(String, String)> = orders
        .iter()
        .map(|o| (o.event_name.clone(), s(o, "水表表号")))
        .collect();
    for want in [
        ("水表离线", "M2"),
        ("电池电压低", "M3"),
        ("用水户开阀", "M1"),
        ("用水户开阀", "M4"),
    ] {
        let n = got.iter().filter(|(e, m)| e == want.0 && m == want.1).count();
        assert_eq!(n, 1, "{want:?} once: {got:?}");
    }
    assert_eq!(got.len(), 4, "{got:?}");
    // It comes back: the return of the reported outage, once.
    rig.plant.silence(2, false);
    let orders = wait_orders(&rig.panda, 5).await;
    assert_eq!(
        (orders[4].event_name.as_str(), s(&orders[4], "水表表号").as_str()),
        ("水表恢复在线", "M2")
    );
    let orders = settle(&gw, &rig.panda, 10).await;
    assert_eq!(orders.len(), 5, "{orders:#?}");
    gw.stop(GRACE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_return_and_a_leak_refused_while_the_outbox_is_full_fire_once_there_is_room() {
    let events = LINK_EVENTS.replace("for = \"FOR\"\n", "") + LEAK_EVENTS;
    let rig = rig_with(4, &events).await;
    let text = std::fs::read_to_string(rig.site.config_path()).unwrap() + "\n[outbox]\nmax_records = 2\n";
    std::fs::write(rig.site.config_path(), text).unwrap();
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    // M2's outage is reported while there is room.
    rig.plant.silence(2, true);
    wait_orders(&rig.panda, 1).await;
    // Server down, the outbox filled; then M2 answers again and M3 leaks through its shut valve.
    rig.panda.set_unavailable(true);
    rig.plant.flip_valve(1);
    rig.plant.flip_valve(4);
    wait_until("the outbox full", || async { gw.outbox.len() == 2 }).await;
    rig.plant.silence(2, false);
    rig.plant.add_flow(3, 5);
    wait_until("a commit refused", || async { gw.outbox.is_refusing() }).await;
    wait_rounds(&gw, 10).await;
    assert_eq!(gw.outbox.len(), 2, "nothing more fits");

    rig.panda.set_unavailable(false);
    wait_orders(&rig.panda, 5).await;
    let orders = settle(&gw, &rig.panda, 20).await;
    let got: Vec<(String, String)> = orders
        .iter()
        .map(|o| (o.event_name.clone(), s(o, "水表表号")))
        .collect();
    for want in [("水表恢复在线", "M2"), ("关阀后仍有流量", "M3")] {
        let n = got.iter().filter(|(e, m)| e == want.0 && m == want.1).count();
        assert_eq!(n, 1, "{want:?} once: {got:?}");
    }
    assert_eq!(got.len(), 5, "离线, two flips, the return and the leak: {got:?}");
    gw.stop(GRACE).await;
}

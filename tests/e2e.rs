//! End to end: the in-process Modbus simulator over real TCP, the gateway (`app::start`) with a real
//! sled database on disk, and the strict mock Panda server over loopback HTTP.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fieldgate::app::{self, Gateway};
use fieldgate::tools::mock_panda::{MockOptions, MockPanda, WorkOrder};
use fieldgate::tools::simulator::{serve_tcp, Plant};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::util::{mapping_csv, site_config, wait_until, Site};

const GRACE: Duration = Duration::from_secs(10);

pub struct Rig {
    pub plant: Plant,
    pub _sim: JoinHandle<()>,
    pub panda: MockPanda,
    pub site: Site,
}

/// Simulator with `n` meters, mock Panda with `opts`, a site config pointing at both.
pub async fn rig(n: usize, auth: &str, opts: MockOptions) -> Rig {
    let plant = Plant::with_meters(n as u8);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let modbus = listener.local_addr().unwrap();
    let sim = serve_tcp(listener, plant.clone());
    let panda = MockPanda::start(TcpListener::bind("127.0.0.1:0").await.unwrap(), opts);
    let config = site_config(&format!("tcp = \"{modbus}\""), &panda.base_url(), auth, n);
    let site = Site::new(&config, &mapping_csv(n));
    Rig {
        plant,
        _sim: sim,
        panda,
        site,
    }
}

impl Rig {
    pub async fn start(&self) -> Gateway {
        app::start(self.site.load())
            .await
            .unwrap_or_else(|e| panic!("start: {e}"))
    }
}

/// Wait until the gateway has read every meter at least once (so baselines are taken).
pub async fn wait_for_baselines(gw: &Gateway) {
    wait_until("every meter read once", || async {
        gw.live.snapshot().iter().all(|m| m.state.is_some())
    })
    .await;
}

/// Wait until the bus has completed `n` more rounds: lets "nothing happens" be observed without sleeps.
pub async fn wait_rounds(gw: &Gateway, n: u64) {
    let start = gw.bus_stats[0].rounds.load(Ordering::Relaxed);
    wait_until("more poll rounds", || async {
        gw.bus_stats[0].rounds.load(Ordering::Relaxed) >= start + n
    })
    .await;
}

pub async fn wait_orders(panda: &MockPanda, n: usize) -> Vec<WorkOrder> {
    wait_until(&format!("{n} work orders"), || async { panda.orders().len() >= n }).await;
    panda.orders()
}

fn s(o: &WorkOrder, key: &str) -> String {
    o.biz
        .get(key)
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("BizData has no {key}: {:?}", o.biz))
        .to_string()
}

/// The flow reading the simulator holds for `unit`, rendered as the gateway renders it (scale 0.01).
pub fn flow(plant: &Plant, unit: u8) -> String {
    let raw = plant.flow(unit).unwrap();
    format!("{}.{:02}", raw / 100, raw % 100)
}

fn assert_order(o: &WorkOrder, site: &Site, meter: usize, event: &str, state: &str, flow: &str) {
    assert_eq!(o.event_name, event);
    assert_eq!(o.user_id, 42);
    assert!(o.external, "token auth posts to the external URL");
    let mapping = site.load().mapping;
    let row = mapping.get(&format!("M{meter}")).unwrap();
    let mut expected: BTreeMap<String, String> = row.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    expected.insert("阀门当前状态".into(), state.into());
    expected.insert("累计流量".into(), flow.into());
    expected.insert("电池电压".into(), format!("3.{:02}", 50 + meter));
    let got: BTreeMap<String, String> = o.biz.keys().map(|k| (k.clone(), s(o, k))).collect();
    assert_eq!(got, expected, "BizData of {event} for M{meter}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_flip_becomes_exactly_one_work_order_with_the_mapping_row() {
    let rig = rig(4, "token", MockOptions::default()).await;
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    wait_rounds(&gw, 3).await;
    assert!(rig.panda.orders().is_empty(), "baselines make no work orders");

    rig.plant.flip_valve(2);
    let orders = wait_orders(&rig.panda, 1).await;
    assert_order(&orders[0], &rig.site, 2, "用水户开阀", "开启", &flow(&rig.plant, 2));

    rig.plant.flip_valve(2);
    let orders = wait_orders(&rig.panda, 2).await;
    assert_order(&orders[1], &rig.site, 2, "用水户关阀", "关闭", &flow(&rig.plant, 2));

    rig.plant.flip_valve(4);
    let orders = wait_orders(&rig.panda, 3).await;
    assert_order(&orders[2], &rig.site, 4, "用水户开阀", "开启", &flow(&rig.plant, 4));

    // Unchanged states make nothing more: let many rounds pass, and the queue stays empty.
    wait_rounds(&gw, 10).await;
    wait_until("outbox drained", || async { gw.outbox.is_empty() }).await;
    assert_eq!(rig.panda.orders().len(), 3, "{:#?}", rig.panda.orders());
    assert_eq!(gw.sender_stats.delivered.load(Ordering::Relaxed), 3);
    gw.stop(GRACE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flip_while_the_gateway_is_down_is_reported_once_after_restart() {
    let rig = rig(3, "token", MockOptions::default()).await;
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    assert_eq!(gw.stop(GRACE).await, 0);

    rig.plant.flip_valve(2);

    let gw = rig.start().await;
    let orders = wait_orders(&rig.panda, 1).await;
    assert_order(&orders[0], &rig.site, 2, "用水户开阀", "开启", &flow(&rig.plant, 2));
    wait_rounds(&gw, 10).await;
    wait_until("outbox drained", || async { gw.outbox.is_empty() }).await;
    assert_eq!(
        rig.panda.orders().len(),
        1,
        "exactly one work order: {:#?}",
        rig.panda.orders()
    );
    gw.stop(GRACE).await;

    // A third start sees nothing new.
    let gw = rig.start().await;
    wait_rounds(&gw, 10).await;
    assert_eq!(rig.panda.orders().len(), 1);
    gw.stop(GRACE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_detected_while_the_server_is_down_all_arrive_in_order() {
    let rig = rig(3, "token", MockOptions::default()).await;
    let panda_addr = rig.panda.addr();
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    rig.panda.stop().await;

    // Six transitions while the server refuses connections: each is queued before the next flip.
    let mut expected = Vec::new();
    for (i, unit) in [1u8, 2, 1, 3, 2, 1].into_iter().enumerate() {
        let open = rig.plant.flip_valve(unit).unwrap();
        expected.push((
            format!("M{unit}"),
            if open { "开启" } else { "关闭" },
            flow(&rig.plant, unit),
        ));
        wait_until("transition queued", || async { gw.outbox.len() as usize == i + 1 }).await;
    }
    assert!(
        gw.sender_stats.transient.load(Ordering::Relaxed) > 0 || gw.sender_stats.delivered.load(Ordering::Relaxed) == 0
    );

    let panda = MockPanda::start(TcpListener::bind(panda_addr).await.unwrap(), MockOptions::default());
    let orders = wait_orders(&panda, 6).await;
    wait_until("outbox drained", || async { gw.outbox.is_empty() }).await;
    let got: Vec<(String, &str, String)> = orders
        .iter()
        .map(|o| {
            (
                s(o, "水表表号"),
                if s(o, "阀门当前状态") == "开启" {
                    "开启"
                } else {
                    "关闭"
                },
                s(o, "累计流量"),
            )
        })
        .collect();
    // Order per meter is detection order; batching groups by eventName, so compare per meter.
    for meter in ["M1", "M2", "M3"] {
        let want: Vec<_> = expected.iter().filter(|e| e.0 == meter).collect();
        let have: Vec<_> = got.iter().filter(|g| g.0 == meter).collect();
        assert_eq!(have, want, "records of {meter}");
    }
    assert_eq!(orders.len(), 6);
    gw.stop(GRACE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_go_on_across_token_expiries() {
    let opts = MockOptions {
        token_ttl: Duration::from_secs(1),
        ..MockOptions::default()
    };
    let rig = rig(2, "token", opts).await;
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    let mut n = 0;
    while rig.panda.logins() < 3 {
        rig.plant.flip_valve(1 + (n % 2) as u8);
        n += 1;
        wait_orders(&rig.panda, n).await;
        assert!(n < 200, "tokens never expired");
    }
    wait_until("outbox drained", || async { gw.outbox.is_empty() }).await;
    let orders = rig.panda.orders();
    assert_eq!(orders.len(), n, "one work order per flip, none lost or doubled");
    let mut flows: Vec<String> = orders
        .iter()
        .map(|o| format!("{}/{}", s(o, "水表表号"), s(o, "累计流量")))
        .collect();
    flows.sort();
    flows.dedup();
    assert_eq!(flows.len(), n, "no duplicates");
    gw.stop(GRACE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_unit_goes_offline_and_the_others_still_deliver() {
    let rig = rig(3, "none", MockOptions::default()).await;
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    rig.plant.silence(2, true);
    wait_until("M2 offline", || async { !gw.live.snapshot()[1].online }).await;

    rig.plant.flip_valve(1);
    rig.plant.flip_valve(3);
    let orders = wait_orders(&rig.panda, 2).await;
    let mut meters: Vec<String> = orders.iter().map(|o| s(o, "水表表号")).collect();
    meters.sort();
    assert_eq!(meters, ["M1", "M3"]);
    assert!(
        orders.iter().all(|o| !o.external),
        "auth = none posts to the internal URL"
    );
    let view = gw.live.snapshot();
    assert!(view[0].online && !view[1].online && view[2].online, "{view:?}");

    // Woken again, it comes back online and its flip made while dead is reported.
    rig.plant.flip_valve(2);
    rig.plant.silence(2, false);
    wait_until("M2 online", || async { gw.live.snapshot()[1].online }).await;
    let orders = wait_orders(&rig.panda, 3).await;
    assert_eq!(s(&orders[2], "水表表号"), "M2");
    assert_eq!(s(&orders[2], "阀门当前状态"), "开启");
    gw.stop(GRACE).await;
}

/// A cycle commits all its meters in one transaction, but each meter is all-or-nothing: a meter whose
/// record does not fit keeps its old state, and its transition is detected again once there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_that_overflows_the_outbox_keeps_the_refused_meter_for_later() {
    let rig = RecorderRig::new(1);
    let (outbox, mut station, cycle) = (rig.outbox.clone(), rig.station(), two_meter_cycle);
    assert_eq!(station.apply(cycle([0, 0])), 0, "baselines");
    assert_eq!(station.apply(cycle([1, 1])), 1, "room for one record only");
    let queued = outbox.list(10).unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].meter_no, "M1");
    assert_eq!(outbox.state("M1").unwrap().unwrap().raw, 1);
    assert_eq!(
        outbox.state("M2").unwrap().unwrap().raw,
        0,
        "the refused meter keeps its old state"
    );

    outbox.ack(&[queued[0].id]).await.unwrap();
    assert_eq!(station.apply(cycle([1, 1])), 1, "M2's transition is detected again");
    let queued = outbox.list(10).unwrap();
    assert_eq!(
        (queued.len(), queued[0].meter_no.as_str(), queued[0].to.as_str()),
        (1, "M2", "开启")
    );
}

/// A two-meter site (M1, M2) with its outbox, for driving a station by hand.
struct RecorderRig {
    _site: Site,
    cfg: std::sync::Arc<fieldgate::config::Config>,
    outbox: fieldgate::store::Store,
}

impl RecorderRig {
    fn new(max_records: u64) -> RecorderRig {
        let text = site_config("tcp = \"127.0.0.1:502\"", "http://127.0.0.1:9", "none", 2);
        let site = Site::new(&text, &mapping_csv(2));
        let cfg = std::sync::Arc::new(site.load());
        let limits = fieldgate::config::Limits {
            max_records,
            max_bytes: 1 << 20,
            ..fieldgate::config::Limits::DEFAULT
        };
        let outbox = fieldgate::store::Store::open(&cfg.site.state_dir, limits).unwrap();
        RecorderRig {
            _site: site,
            cfg,
            outbox,
        }
    }

    fn station(&self) -> fieldgate::recorder::Recorder {
        fieldgate::recorder::Recorder::new(
            self.cfg.clone(),
            self.outbox.clone(),
            std::sync::Arc::new(tokio::sync::Notify::new()),
            fieldgate::recorder::live::Live::new(2),
        )
    }
}

/// One cycle of bus 0 with both meters' valve values.
fn two_meter_cycle(raws: [i64; 2]) -> fieldgate::modbus::cycle::Cycle {
    fieldgate::modbus::cycle::Cycle {
        bus: 0,
        samples: (0..2)
            .map(|m| fieldgate::modbus::cycle::Sample {
                meter: m,
                valve_raw: raws[m],
                readings: vec!["1.00".into(), "3.60".into()],
                at: chrono::Utc::now(),
            })
            .collect(),
        links: vec![],
    }
}

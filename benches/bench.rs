//! fieldgate's benchmark runner: every figure is a ratio against a bare baseline measured in the same
//! run on the same machine, repeated, reported as median and spread. Writes `BENCHMARKS.md`.
//!
//! `cargo bench --bench bench` (add `-- --long` for the long rows, `-- --quick` for a smoke run).
//! Not a timed test: nothing here fails the build; CI only compiles it (`cargo bench --no-run`).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fieldgate::bus::{run_bus, BusStats};
use fieldgate::config::{self, Config};
use fieldgate::mock_panda::{MockOptions, MockPanda};
use fieldgate::outbox::{Draft, Limits, Outbox, StoredState};
use fieldgate::panda::PandaClient;
use fieldgate::sender::{run_sender, SenderConfig, SenderStats};
use fieldgate::simulator::{serve_tcp, Plant};
use fieldgate::station::{Cycle, Live, Sample, Station};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio_modbus::prelude::*;
use tokio_util::sync::CancellationToken;

/// Run-wide knobs.
#[derive(Clone, Copy)]
struct Plan {
    repeats: usize,
    seconds: f64,
    long: bool,
}

/// One table row.
struct Row {
    id: &'static str,
    what: String,
    baseline: String,
    result: String,
    target: &'static str,
    bound: String,
}

/// Median and spread (min..max) of a sample.
fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return (0.0, 0.0, 0.0);
    }
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (med, v[0], v[n - 1])
}

fn fmt3(v: (f64, f64, f64), unit: &str) -> String {
    format!("{:.3}{unit} ({:.3}–{:.3})", v.0, v.1, v.2)
}

fn fmt0(v: (f64, f64, f64), unit: &str) -> String {
    format!("{:.0}{unit} ({:.0}–{:.0})", v.0, v.1, v.2)
}

// === site helpers ===

fn mapping_csv(n: usize) -> String {
    let mut s = String::from(
        "用户编号,用户名称,用户状态,电话号码,用户地址,水表表号,水表位置,水表铭牌,水表厂家,用户缴费状态,欠费金额,阀门口径,营业区域\n",
    );
    for i in 1..=n {
        s.push_str(&format!(
            "U{i:05},用户{i},正常,138{i:08},东风路{i}号,M{i},井内,DN20,宁波水表,已缴费,0.00,DN20,城东营业所\n"
        ));
    }
    s
}

/// A site with `buses` buses of `per_bus` meters each (units 1..=per_bus), 4 registers + 1 coil each.
fn site_text(buses: &[String], per_bus: usize, poll: &str, panda: &str) -> String {
    let mut s = format!(
        r#"[site]
name = "bench"
state_dir = "state"
mapping = "mapping.csv"

[panda]
base_url = "{panda}"
project = "demo"
auth = "none"
user_id = 42
max_batch = 50
retry_min = "10ms"
retry_max = "100ms"

[admin]
listen = "127.0.0.1:0"

[profile.m]
valve = {{ table = "coil", address = 0, states = {{ 0 = "关闭", 1 = "开启" }} }}
readings = [
  {{ field = "累计流量", table = "holding", address = 0, type = "u32", scale = 0.01 }},
  {{ field = "电池电压", table = "holding", address = 2, scale = 0.01 }},
  {{ field = "状态字", table = "holding", address = 3 }},
]

[[event]]
name = "用水户开阀"
point = "valve"
to = "开启"

[[event]]
name = "用水户关阀"
point = "valve"
to = "关闭"
"#
    );
    for (b, addr) in buses.iter().enumerate() {
        s.push_str(&format!(
            "\n[[bus]]\nname = \"b{b}\"\ntcp = \"{addr}\"\npoll_interval = \"{poll}\"\ntimeout = \"1s\"\n"
        ));
    }
    for b in 0..buses.len() {
        for u in 1..=per_bus {
            let n = b * per_bus + u;
            s.push_str(&format!(
                "\n[[meter]]\nmeter_no = \"M{n}\"\nbus = \"b{b}\"\nunit = {u}\nprofile = \"m\"\n"
            ));
        }
    }
    s
}

fn load_site(dir: &Path, text: &str, meters: usize) -> Config {
    std::fs::write(dir.join("mapping.csv"), mapping_csv(meters)).expect("write mapping");
    config::parse(&dir.join("fieldgate.toml"), text, &None).unwrap_or_else(|e| panic!("bench config: {e}"))
}

// === row 1: poll rate of one bus task vs a bare tokio-modbus loop ===

async fn bare_poll(addr: std::net::SocketAddr, units: u8, seconds: f64) -> f64 {
    let mut ctx = tcp::connect_slave(addr, Slave(1)).await.expect("connect");
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        for u in 1..=units {
            ctx.set_slave(Slave(u));
            let _ = ctx.read_coils(0, 1).await.expect("coils");
            let _ = ctx.read_holding_registers(0, 4).await.expect("holding");
            n += 2;
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn gateway_poll(cfg: Arc<Config>, seconds: f64) -> f64 {
    let (tx, mut rx) = mpsc::channel::<Cycle>(16);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let stats = Arc::new(BusStats::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(run_bus(cfg, 0, tx, stop.clone(), stats.clone()));
    // Warm up: the connection is open and a round is done.
    while stats.rounds.load(Ordering::Relaxed) < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r0 = stats.requests.load(Ordering::Relaxed);
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let rate = (stats.requests.load(Ordering::Relaxed) - r0) as f64 / start.elapsed().as_secs_f64();
    stop.cancel();
    let _ = task.await;
    let _ = drain.await;
    rate
}

async fn row1(plan: Plan) -> Row {
    let units: u8 = 50;
    let plant = Plant::with_meters(units);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let _server = serve_tcp(listener, plant);
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = Arc::new(load_site(
        dir.path(),
        &site_text(&[addr.to_string()], units as usize, "1ms", "http://127.0.0.1:9"),
        units as usize,
    ));
    let (mut ratios, mut gw, mut bare) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..plan.repeats {
        let b = bare_poll(addr, units, plan.seconds).await;
        let g = gateway_poll(cfg.clone(), plan.seconds).await;
        ratios.push(g / b);
        gw.push(g);
        bare.push(b);
    }
    Row {
        id: "1",
        what: format!("poll rate of one bus task, {units} units × (1 coil + 4 holding registers), Modbus TCP loopback"),
        baseline: format!("bare tokio-modbus loop: {}", fmt0(stats(bare), " req/s")),
        result: format!("{} = {}", fmt0(stats(gw), " req/s"), fmt3(stats(ratios), "×")),
        target: "≥ 0.95",
        bound: "the in-process simulator and loopback round trip (one request in flight per bus)".into(),
    }
}

// === row 2: durable transitions per second vs a bare sled loop ===

fn sync_dir(dir: &Path) {
    for folder in [dir.to_path_buf(), dir.join("blobs")] {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_file()) {
                let _ = std::fs::File::open(e.path()).and_then(|f| f.sync_all());
            }
        }
        let _ = std::fs::File::open(&folder).and_then(|f| f.sync_all());
    }
}

fn bare_sled(batch: usize, cycles: usize, value: &[u8]) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = sled::Config::new()
        .path(dir.path())
        .cache_capacity(16 << 20)
        .open()
        .expect("sled");
    let (state, queue) = (
        db.open_tree("state").expect("tree"),
        db.open_tree("outbox").expect("tree"),
    );
    let start = Instant::now();
    for c in 0..cycles {
        for m in 0..batch {
            let id = db.generate_id().expect("id");
            state
                .insert(format!("M{m}").as_bytes(), format!("{{\"raw\":{}}}", c % 2).as_bytes())
                .expect("insert");
            queue.insert(id.to_be_bytes(), value).expect("insert");
        }
        db.flush().expect("flush");
        sync_dir(dir.path());
    }
    (batch * cycles) as f64 / start.elapsed().as_secs_f64()
}

async fn station_rate(batch: usize, cycles: usize) -> (f64, usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = Arc::new(load_site(
        dir.path(),
        &site_text(&["127.0.0.1:502".into()], batch, "1s", "http://127.0.0.1:9"),
        batch,
    ));
    let outbox = Outbox::open(
        &cfg.site.state_dir,
        Limits {
            max_records: u64::MAX,
            max_bytes: u64::MAX,
        },
    )
    .expect("open");
    let mut station = Station::new(cfg.clone(), outbox.clone(), Arc::new(Notify::new()), Live::new(batch));
    let cycle = |raw: i64| Cycle {
        bus: 0,
        samples: (0..batch)
            .map(|m| Sample {
                meter: m,
                valve_raw: raw,
                readings: vec!["1234.56".into(), "3.60".into(), "0".into()],
                at: chrono::Utc::now(),
            })
            .collect(),
        links: vec![],
    };
    station.apply(cycle(0)).await; // baselines
    let start = Instant::now();
    let mut n = 0;
    for c in 0..cycles {
        n += station.apply(cycle(1 - (c as i64 % 2))).await;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let size = outbox
        .list(1)
        .expect("list")
        .first()
        .map_or(0, |r| serde_json::to_vec(r).map_or(0, |v| v.len()));
    (rate, size)
}

async fn row2(plan: Plan) -> Row {
    let batch = 50;
    let cycles = if plan.long { 200 } else { 40 };
    let (mut ratios, mut gw, mut bare) = (Vec::new(), Vec::new(), Vec::new());
    let mut record_size = 0;
    for _ in 0..plan.repeats {
        let (g, size) = station_rate(batch, cycles).await;
        record_size = size;
        let value = vec![b'x'; size.max(1)];
        let b = tokio::task::spawn_blocking(move || bare_sled(batch, cycles, &value))
            .await
            .expect("join");
        ratios.push(g / b);
        gw.push(g);
        bare.push(b);
    }
    Row {
        id: "2",
        what: format!("transitions made durable per second ({batch} per cycle: state + record in one transaction each, one flush + fsync per cycle; record {record_size} B)"),
        baseline: format!("bare sled: {batch} state + {batch} record inserts, flush + fsync: {}", fmt0(stats(bare), "/s")),
        result: format!("{} = {}", fmt0(stats(gw), "/s"), fmt3(stats(ratios), "×")),
        target: "≥ 0.8",
        bound: "disk: the fsync per cycle".into(),
    }
}

// === row 3: records delivered per second vs a bare reqwest loop ===

fn biz(i: usize) -> String {
    fieldgate::record::render_biz_data(
        &[
            ("用户编号", "U00001"),
            ("用户名称", "张三"),
            ("用户状态", "正常"),
            ("电话号码", "13800000001"),
            ("用户地址", "东风路12号"),
        ],
        &format!("M{i}"),
        "开启",
        [("累计流量", "1234.56")],
    )
}

async fn sender_rate(records: usize) -> f64 {
    let panda = MockPanda::start(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        MockOptions::default(),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = load_site(
        dir.path(),
        &site_text(&["127.0.0.1:502".into()], 1, "1s", &panda.base_url()),
        1,
    );
    let outbox = Outbox::open(
        &cfg.site.state_dir,
        Limits {
            max_records: u64::MAX,
            max_bytes: u64::MAX,
        },
    )
    .expect("open");
    for i in 0..records {
        let d = Draft {
            event_name: "用水户开阀".into(),
            detected_at: "2026-11-24T08:00:00+08:00".into(),
            from: "关闭".into(),
            to: "开启".into(),
            biz_data: biz(i),
        };
        outbox
            .commit(
                &format!("M{i}"),
                &StoredState {
                    raw: 1,
                    label: "开启".into(),
                    since: String::new(),
                    ..StoredState::default()
                },
                vec![d],
            )
            .expect("commit");
    }
    outbox.sync().await.expect("sync");
    let client = PandaClient::new(&cfg.panda, cfg.site.timezone).expect("client");
    let stats = Arc::new(SenderStats::default());
    let stop = CancellationToken::new();
    let start = Instant::now();
    let task = tokio::spawn(run_sender(
        outbox.clone(),
        client,
        SenderConfig::from_config(&cfg),
        Arc::new(Notify::new()),
        stop.clone(),
        stats.clone(),
    ));
    while !outbox.is_empty() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = records as f64 / start.elapsed().as_secs_f64();
    stop.cancel();
    let _ = task.await;
    assert_eq!(panda.orders().len(), records, "every record delivered once");
    panda.stop().await;
    rate
}

async fn bare_reqwest(records: usize) -> f64 {
    let panda = MockPanda::start(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        MockOptions::default(),
    );
    let url = format!("{}/PandaWorkFlow/WorkFlow/api/PostFlowNodeData", panda.base_url());
    let http = reqwest::Client::new();
    let start = Instant::now();
    for chunk in (0..records).collect::<Vec<_>>().chunks(50) {
        let flow: Vec<_> = chunk
            .iter()
            .map(|i| serde_json::json!({"toUserIds": "", "opinion": "", "BizData": biz(*i)}))
            .collect();
        let body = serde_json::json!({"eventName": "用水户开阀", "userId": 42, "FlowDatas": flow});
        let resp = http.post(&url).json(&body).send().await.expect("post");
        let _ = resp.bytes().await.expect("body");
    }
    let rate = records as f64 / start.elapsed().as_secs_f64();
    panda.stop().await;
    rate
}

async fn row3(plan: Plan) -> Row {
    let records = if plan.long { 50_000 } else { 10_000 };
    let (mut ratios, mut gw, mut bare) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..plan.repeats {
        let b = bare_reqwest(records).await;
        let g = sender_rate(records).await;
        ratios.push(g / b);
        gw.push(g);
        bare.push(b);
    }
    Row {
        id: "3",
        what: format!(
            "records delivered per second to the mock Panda over loopback, max_batch 50, {records} records queued"
        ),
        baseline: format!(
            "bare reqwest loop posting the same bodies: {}",
            fmt0(stats(bare), " rec/s")
        ),
        result: format!("{} = {}", fmt0(stats(gw), " rec/s"), fmt3(stats(ratios), "×")),
        target: "≥ 0.8 and ≥ 5,000 rec/s",
        bound: "the mock server (in-process, same cores) and the ack fsync per batch".into(),
    }
}

// === report ===

fn report(rows: &[Row], command: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Produced by `{command}` on {} ({} cores). Each figure: median (min–max) over the repeats;",
        std::env::consts::ARCH,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let _ = writeln!(
        s,
        "each ratio is against a baseline measured in the same run, interleaved with it.\n"
    );
    let _ = writeln!(
        s,
        "| # | what | baseline (same run) | fieldgate | target | what bounds it |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            r.id, r.what, r.baseline, r.result, r.target, r.bound
        );
    }
    s
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let long = args.iter().any(|a| a == "--long");
    let quick = args.iter().any(|a| a == "--quick");
    let plan = Plan {
        repeats: if quick { 1 } else { 5 },
        seconds: if quick { 0.5 } else { 2.0 },
        long,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let rows = rt.block_on(async {
        let mut rows = Vec::new();
        for (name, row) in [("1", 1), ("2", 2), ("3", 3)] {
            eprintln!("row {name} …");
            rows.push(match row {
                1 => row1(plan).await,
                2 => row2(plan).await,
                _ => row3(plan).await,
            });
        }
        rows
    });
    let command = format!(
        "cargo bench --bench bench{}",
        if long {
            " -- --long"
        } else if quick {
            " -- --quick"
        } else {
            ""
        }
    );
    let text = report(&rows, &command);
    println!("{text}");
    if !quick {
        let _ = std::fs::write("BENCHMARKS.md", &text);
    }
}

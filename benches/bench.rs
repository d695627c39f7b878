//! fieldgate's benchmark runner: every figure is a ratio against a bare baseline measured in the same
//! run on the same machine, repeated, reported as median and spread. Writes `BENCHMARKS.md`.
//!
//! `cargo bench --bench bench` (add `-- --long` for the long rows 4 and 6, `-- --quick` for a smoke run,
//! `-- --rows 3,6` for some rows only; only a full default or `--long` run of all rows writes the file).
//! Not a timed test: nothing here fails the build; CI only compiles it (`cargo bench --no-run`).
//!
//! Rows 4–8 run the gateway as its own process (`fieldgate run`, the release binary cargo builds for
//! benches), the simulators as their own processes (`fieldgate simulate`), and the bare baseline poller as
//! this binary re-invoked with `--bare-poller`; CPU and RSS come from `/proc/<pid>` of each.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fieldgate::config::Limits;
use fieldgate::config::{self, Config};
use fieldgate::delivery::panda::PandaClient;
use fieldgate::delivery::sender::stats::SenderStats;
use fieldgate::delivery::sender::{run_sender, SenderConfig};
use fieldgate::events::record::Draft;
use fieldgate::modbus::bus::run_bus;
use fieldgate::modbus::cycle::{Cycle, Sample};
use fieldgate::modbus::stats::BusStats;
use fieldgate::recorder::live::Live;
use fieldgate::recorder::Recorder;
use fieldgate::store::{Store, StoredState};
use fieldgate::tools::mock_panda::{MockOptions, MockPanda};
use fieldgate::tools::simulator::{serve_tcp, Plant};
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
    quick: bool,
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

/// "rate (spread) = ratio× (spread)": a figure and its ratio to a baseline.
fn rate_ratio(rates: Vec<f64>, unit: &str, ratios: Vec<f64>) -> String {
    format!("{} = {}", fmt0(stats(rates), unit), fmt3(stats(ratios), "×"))
}

fn fmt1(v: (f64, f64, f64), unit: &str) -> String {
    format!("{:.1}{unit} ({:.1}–{:.1})", v.0, v.1, v.2)
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

/// A site with one Modbus TCP bus per address, `per_bus` meters each (units 1..=per_bus), 4 registers +
/// 1 coil each.
fn site_text(addrs: &[String], per_bus: usize, poll: &str, panda: &str) -> String {
    let transports: Vec<String> = addrs.iter().map(|a| format!("tcp = \"{a}\"")).collect();
    site_text_with(&transports, per_bus, poll, panda, "")
}

/// [`site_text`] with the transport lines of each bus given, and `extra` appended to each bus section.
fn site_text_with(buses: &[String], per_bus: usize, poll: &str, panda: &str, extra: &str) -> String {
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
    for (b, transport) in buses.iter().enumerate() {
        s.push_str(&format!(
            "\n[[bus]]\nname = \"b{b}\"\n{transport}\npoll_interval = \"{poll}\"\ntimeout = \"1s\"\n{extra}"
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

/// Wait until a state directory just created looks like one of a running gateway: its folder
/// unchanged for 2 s, after which a sync lists it no more (`fieldgate::store::durable`). The bare loops never
/// list it at all.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(2100)).await;
}

// === row 1: poll rate of one bus task vs a bare tokio-modbus loop ===

/// The bare loop; with `limit`, every read is under `tokio::time::timeout` as the bus task's are; with
/// `idle_timer`, another task holds a timer that never fires while the loop runs.
async fn bare_poll(
    addr: std::net::SocketAddr,
    units: u8,
    seconds: f64,
    limit: Option<Duration>,
    idle_timer: bool,
) -> f64 {
    let mut ctx = tcp::connect_slave(addr, Slave(1)).await.expect("connect");
    // Like the bus task, hand each round's values to another task.
    let (tx, mut rx) = mpsc::channel::<Vec<u16>>(16);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    // An idle timer elsewhere in the runtime, as every gateway has (poll interval, sender backoff,
    // watchdog): with any timer pending, tokio's time driver works on every park of a worker.
    let idle = idle_timer.then(|| tokio::spawn(tokio::time::sleep(Duration::from_secs(3600))));
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        let mut round = Vec::new();
        for u in 1..=units {
            ctx.set_slave(Slave(u));
            let r = match limit {
                None => {
                    let _ = ctx.read_coils(0, 1).await.expect("coils");
                    ctx.read_holding_registers(0, 4).await.expect("holding")
                }
                Some(d) => {
                    let _ = tokio::time::timeout(d, ctx.read_coils(0, 1))
                        .await
                        .expect("in time")
                        .expect("coils");
                    tokio::time::timeout(d, ctx.read_holding_registers(0, 4))
                        .await
                        .expect("in time")
                        .expect("holding")
                }
            };
            round.extend(r.unwrap_or_default());
            n += 2;
        }
        let _ = tx.send(round).await;
    }
    drop(tx);
    if let Some(idle) = idle {
        idle.abort();
    }
    let _ = drain.await;
    n as f64 / start.elapsed().as_secs_f64()
}

/// Wait `seconds` without a timer of the runtime: the bare loops measure themselves with no timer, so
/// the measuring adds none to the bus task's run either (the bus task's own timers are its cost).
async fn pause_off_runtime(seconds: f64) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs_f64(seconds));
        let _ = tx.send(());
    });
    let _ = rx.await;
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
    pause_off_runtime(seconds).await;
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
    let (mut timed, mut timed_ratios) = (Vec::new(), Vec::new());
    let (mut idle, mut idle_ratios) = (Vec::new(), Vec::new());
    for _ in 0..plan.repeats {
        // Both loops run as spawned tasks on the runtime's workers, like the simulator they talk to (a
        // loop driven by `block_on` runs on the main thread: a third thread on two cores, not a fair
        // comparison).
        let b = tokio::spawn(bare_poll(addr, units, plan.seconds, None, false))
            .await
            .expect("join");
        let g = gateway_poll(cfg.clone(), plan.seconds).await;
        let i = tokio::spawn(bare_poll(addr, units, plan.seconds, None, true))
            .await
            .expect("join");
        let t = tokio::spawn(bare_poll(
            addr,
            units,
            plan.seconds,
            Some(Duration::from_secs(1)),
            false,
        ))
        .await
        .expect("join");
        idle.push(i);
        idle_ratios.push(g / i);
        timed.push(t);
        timed_ratios.push(g / t);
        ratios.push(g / b);
        gw.push(g);
        bare.push(b);
    }
    Row {
        id: "1",
        what: format!("poll rate of one bus task, {units} units × (1 coil + 4 holding registers), Modbus TCP loopback"),
        baseline: format!("bare tokio-modbus loop: {}", fmt0(stats(bare), " req/s")),
        result: format!(
            "{}; against the same loop while an idle timer is pending in the runtime (as in any gateway): {}; \
             against the same loop with each read under `tokio::time::timeout` as the bus task's: {}",
            rate_ratio(gw, " req/s", ratios),
            rate_ratio(idle, " req/s", idle_ratios),
            rate_ratio(timed, " req/s", timed_ratios)
        ),
        target: "≥ 0.95 (judged against the second baseline, the same runtime state: notes, row 1)",
        bound: "the in-process simulator and loopback round trip (one request in flight per bus)".into(),
    }
}

// === row 2: durable transitions per second vs a bare sled loop ===

/// The least a bare loop must do to make a flushed sled database durable: fsync its log file `db`
/// (one flush of the disk's cache). The gateway does the same plus an fsync of any other file or
/// folder of the database that changed (`fieldgate::store::durable`), which in steady state is none.
fn sync_dir(dir: &Path) {
    let _ = std::fs::File::open(dir.join("db")).and_then(|f| f.sync_all());
}

/// A sled database of the bare baselines in a new temporary folder, with the gateway's cache size.
fn bare_db() -> (tempfile::TempDir, sled::Db) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = sled::Config::new()
        .path(dir.path())
        .cache_capacity(fieldgate::store::CACHE_CAPACITY)
        .open()
        .expect("sled");
    (dir, db)
}

/// The baseline: per cycle `batch` state and `batch` record inserts, flush, fsync. With `one_batch`
/// (the issue's "batch insert") all inserts of a cycle go into one `sled::Batch` of one tree;
/// otherwise they are single inserts into two trees.
struct BareSled {
    dir: tempfile::TempDir,
    db: sled::Db,
    state: sled::Tree,
    queue: sled::Tree,
    value: Vec<u8>,
    /// Two state values of the stored state's size, one per valve position.
    states: [Vec<u8>; 2],
    batch: usize,
    one_batch: bool,
}

impl BareSled {
    fn new(batch: usize, (value_size, state_size): (usize, usize), one_batch: bool) -> BareSled {
        let (dir, db) = bare_db();
        let (state, queue) = (
            db.open_tree("state").expect("tree"),
            db.open_tree("outbox").expect("tree"),
        );
        let value = vec![b'x'; value_size.max(1)];
        let states = [vec![b'0'; state_size.max(1)], vec![b'1'; state_size.max(1)]];
        BareSled {
            dir,
            db,
            state,
            queue,
            value,
            states,
            batch,
            one_batch,
        }
    }

    /// One cycle; transitions made durable.
    fn cycle(&self, c: usize) -> usize {
        if self.one_batch {
            let mut b = sled::Batch::default();
            for m in 0..self.batch {
                let id = self.db.generate_id().expect("id");
                b.insert(format!("M{m}").as_bytes(), &self.states[c % 2][..]);
                b.insert(&id.to_be_bytes()[..], &self.value[..]);
            }
            self.queue.apply_batch(b).expect("batch");
            self.db.flush().expect("flush");
            sync_dir(self.dir.path());
            return self.batch;
        }
        for m in 0..self.batch {
            let id = self.db.generate_id().expect("id");
            self.state
                .insert(format!("M{m}").as_bytes(), &self.states[c % 2][..])
                .expect("insert");
            self.queue.insert(id.to_be_bytes(), &self.value[..]).expect("insert");
        }
        self.db.flush().expect("flush");
        sync_dir(self.dir.path());
        self.batch
    }
}

/// The product: `Recorder::apply` of a cycle whose every meter's valve flipped (samples made before
/// the clock: they are the bus task's work, row 1).
struct RecorderRig {
    _dir: tempfile::TempDir,
    station: Recorder,
    outbox: Store,
    batch: usize,
}

fn flipped(batch: usize, raw: i64) -> Cycle {
    Cycle {
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
    }
}

fn unlimited() -> Limits {
    Limits {
        max_records: u64::MAX,
        max_bytes: u64::MAX,
        ..Limits::DEFAULT
    }
}

impl RecorderRig {
    fn new(batch: usize) -> RecorderRig {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = Arc::new(load_site(
            dir.path(),
            &site_text(&["127.0.0.1:502".into()], batch, "1s", "http://127.0.0.1:9"),
            batch,
        ));
        let outbox = Store::open(&cfg.site.state_dir, unlimited()).expect("open");
        let mut station = Recorder::new(cfg, outbox.clone(), Arc::new(Notify::new()), Live::new(batch));
        station.apply(flipped(batch, 0)); // baselines
        RecorderRig {
            _dir: dir,
            station,
            outbox,
            batch,
        }
    }

    /// Bytes of a stored record (as `stored_record` encodes it) and of a stored state (serde's JSON). The
    /// rig holds only baselines, which make no record: one flip there and back makes some (and leaves
    /// every valve where the measured cycles expect it).
    fn sizes(&mut self) -> (usize, usize) {
        self.station.apply(flipped(self.batch, 1));
        self.station.apply(flipped(self.batch, 0));
        let first = self.outbox.list(1).expect("list");
        let record = fieldgate::store::stored_record::encode(first.first().expect("the flips made records")).len();
        let state = self.outbox.state("M1").expect("state").expect("stored");
        (record, serde_json::to_vec(&state).expect("json").len())
    }
}

/// `Store::commit_batch` alone, through the public API: per sample read the stored state (as the
/// station does), then one `commit_batch` of the cycle's transitions, then one flush + fsync.
struct BatchRig {
    _dir: tempfile::TempDir,
    outbox: Store,
    batch: usize,
}

fn valve_state(raw: i64) -> StoredState {
    StoredState {
        raw,
        label: if raw == 1 { "开启".into() } else { "关闭".into() },
        since: "2026-11-24T08:00:00+08:00".into(),
        ..StoredState::default()
    }
}

impl BatchRig {
    fn new(batch: usize) -> BatchRig {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = Store::open(dir.path(), unlimited()).expect("open");
        let base: Vec<_> = (0..batch).map(|m| (format!("M{m}"), valve_state(0), vec![])).collect();
        outbox.commit_batch(base).expect("baselines");
        outbox.sync_blocking().expect("sync");
        BatchRig {
            _dir: dir,
            outbox,
            batch,
        }
    }

    fn cycle(&self, c: usize) -> usize {
        let raw = 1 - (c as i64 % 2);
        let mut changes = Vec::with_capacity(self.batch);
        for m in 0..self.batch {
            let meter = format!("M{m}");
            let old = self.outbox.state(&meter).expect("state").map(|s| s.raw);
            if old != Some(raw) {
                changes.push((meter, valve_state(raw), vec![draft(m)]));
            }
        }
        let mut n = 0;
        for r in self.outbox.commit_batch(changes).expect("commit") {
            n += r.expect("room").len();
        }
        self.outbox.sync_blocking().expect("sync");
        n
    }
}

/// Rates (transitions/s) of the station, `commit_batch` alone, the bare loop with one batch and with
/// single inserts, and the record size. The four run cycle by cycle in turn (the order rotating), each
/// cycle timed alone, so a slow spell of this shared disk falls on all alike instead of on whichever
/// ran during it.
fn interleaved_rates(batch: usize, cycles: usize) -> ([f64; KINDS], (usize, usize)) {
    let mut station = RecorderRig::new(batch);
    let sizes = station.sizes();
    let commit = BatchRig::new(batch);
    let bare = BareSled::new(batch, sizes, true);
    let singles = BareSled::new(batch, sizes, false);
    // New state dirs settle as a running gateway's have (`settle`); the bare loop never lists them.
    std::thread::sleep(Duration::from_millis(2100));
    let flips: Vec<Cycle> = (0..cycles)
        .map(|c| flipped(station.batch, 1 - (c as i64 % 2)))
        .collect();
    let mut spent = [Duration::ZERO; KINDS];
    let mut done = [0usize; KINDS];
    for (c, mut flip) in flips.into_iter().map(Some).enumerate() {
        for k in 0..KINDS {
            let which = (c + k) % KINDS;
            let start = Instant::now();
            done[which] += match which {
                0 => station.station.apply(flip.take().expect("one per cycle")),
                1 => commit.cycle(c),
                2 => bare.cycle(c),
                _ => singles.cycle(c),
            };
            spent[which] += start.elapsed();
        }
    }
    (std::array::from_fn(|k| done[k] as f64 / spent[k].as_secs_f64()), sizes)
}

/// Recorder, commit_batch alone, bare (one batch), bare (single inserts).
const KINDS: usize = 4;

async fn row2(plan: Plan) -> Row {
    let batch = 50;
    // 10,000 transitions per measurement and kind.
    let cycles = if plan.long { 1000 } else { 200 };
    let (mut ratios, mut gw, mut bare) = (Vec::new(), Vec::new(), Vec::new());
    let (mut station_ratios, mut station) = (Vec::new(), Vec::new());
    let (mut singles_ratios, mut singles) = (Vec::new(), Vec::new());
    let mut sizes = (0, 0);
    for _ in 0..plan.repeats {
        let ([st, g, b, one], size) = tokio::task::spawn_blocking(move || interleaved_rates(batch, cycles))
            .await
            .expect("join");
        sizes = size;
        singles_ratios.push(st / one);
        singles.push(one);
        ratios.push(g / b);
        gw.push(g);
        bare.push(b);
        station_ratios.push(st / b);
        station.push(st);
    }
    Row {
        id: "2",
        what: format!("transitions made durable per second ({batch} per cycle, record {} B, state {} B, one flush + fsync per cycle): `Recorder::apply`, the whole cycle in ONE atomic batch (`Store::commit_batch`); in brackets `commit_batch` alone through the Store API; all run cycle by cycle in turn, each cycle timed alone", sizes.0, sizes.1),
        baseline: format!(
            "bare sled: one `sled::Batch` of {batch} state + {batch} record inserts (values of the stored sizes), flush + fsync: {}",
            fmt0(stats(bare), "/s")
        ),
        result: format!(
            "station: {} [commit_batch alone: {}]; station against the bare loop with {} single inserts into two trees: {}",
            rate_ratio(station, "/s", station_ratios),
            rate_ratio(gw, "/s", ratios),
            2 * batch,
            rate_ratio(singles, "/s", singles_ratios)
        ),
        target: "≥ 0.8",
        bound: "disk: the fsync per cycle; then rendering each record (BizData JSON)".into(),
    }
}

// === row 3: records delivered per second vs a bare reqwest loop ===

fn biz(i: usize) -> String {
    fieldgate::events::record::render_biz_data(
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
    let outbox = Store::open(
        &cfg.site.state_dir,
        Limits {
            max_records: u64::MAX,
            max_bytes: u64::MAX,
            ..Limits::DEFAULT
        },
    )
    .expect("open");
    for i in 0..records {
        let d = draft(i);
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
    settle().await;
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

/// A plain reqwest loop posting the same bodies as the sender, sequentially: the mock's own ceiling.
async fn bare_reqwest(records: usize) -> f64 {
    post_loop(records, None).await
}

/// [`bare_reqwest`] plus the disk work the delivery rule demands of anyone: after each answer, remove
/// the batch's records from a sled tree holding them, flush + fsync (the same `sync_dir` as row 2's
/// bare loop). Shows how much of the gap to the plain loop is the disk, and how much is the sender.
async fn bare_reqwest_durable(records: usize) -> f64 {
    let (dir, db) = bare_db();
    let tree = db.open_tree("outbox").expect("tree");
    let value = vec![b'x'; 700];
    for i in 0..records as u64 {
        tree.insert(i.to_be_bytes(), value.as_slice()).expect("insert");
    }
    db.flush().expect("flush");
    post_loop(records, Some(Ack::Sled(db, tree, dir.path().to_path_buf()))).await
}

/// [`bare_reqwest`] plus the cheapest durable acknowledgement there is: the last answered position,
/// 8 bytes written over the start of a file allocated beforehand, then `fdatasync` (no size change,
/// so no metadata to journal). No store can acknowledge a batch for less on this disk: this loop is
/// the ceiling of any sender that makes each acknowledgement durable before its next request.
async fn bare_reqwest_watermark(records: usize) -> f64 {
    use std::io::Write as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("acked");
    let mut file = std::fs::File::create(&path).expect("create");
    file.write_all(&[0; 4096]).expect("allocate");
    file.sync_all().expect("fsync");
    post_loop(records, Some(Ack::Watermark(file))).await
}

/// How a post loop acknowledges each answer before its next request.
enum Ack {
    Sled(sled::Db, sled::Tree, PathBuf),
    Watermark(std::fs::File),
}

/// Post `records` in batches of 50 to a fresh mock; with `ack`, acknowledge each answered batch as it
/// says before the next request.
async fn post_loop(records: usize, ack: Option<Ack>) -> f64 {
    let panda = MockPanda::start(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        MockOptions::default(),
    );
    let url = format!("{}/PandaWorkFlow/WorkFlow/api/PostFlowNodeData", panda.base_url());
    let http = reqwest::Client::new();
    let ack = ack.map(Arc::new);
    let start = Instant::now();
    for chunk in (0..records).collect::<Vec<_>>().chunks(50) {
        let flow: Vec<_> = chunk
            .iter()
            .map(|i| serde_json::json!({"toUserIds": "", "opinion": "", "BizData": biz(*i)}))
            .collect();
        let body = serde_json::json!({"eventName": "用水户开阀", "userId": 42, "FlowDatas": flow});
        let resp = http.post(&url).json(&body).send().await.expect("post");
        let _ = resp.bytes().await.expect("body");
        if let Some(ack) = &ack {
            let (ack, ids) = (ack.clone(), chunk.to_vec());
            tokio::task::spawn_blocking(move || acknowledge(&ack, &ids))
                .await
                .expect("join");
        }
    }
    let rate = records as f64 / start.elapsed().as_secs_f64();
    panda.stop().await;
    rate
}

/// Make one answered batch's acknowledgement durable, as `ack` says.
fn acknowledge(ack: &Ack, ids: &[usize]) {
    use std::os::unix::fs::FileExt as _;
    match ack {
        Ack::Sled(db, tree, path) => {
            for &i in ids {
                tree.remove((i as u64).to_be_bytes()).expect("remove");
            }
            db.flush().expect("flush");
            sync_dir(path);
        }
        Ack::Watermark(file) => {
            let last = ids.last().copied().unwrap_or_default() as u64;
            file.write_all_at(&last.to_le_bytes(), 0).expect("write");
            file.sync_data().expect("fdatasync");
        }
    }
}

async fn row3(plan: Plan) -> (Row, f64) {
    let records = if plan.long { 50_000 } else { 10_000 };
    let (mut ratios, mut gw, mut bare) = (Vec::new(), Vec::new(), Vec::new());
    let (mut durable, mut durable_ratios) = (Vec::new(), Vec::new());
    let (mut ceiling, mut ceiling_ratios) = (Vec::new(), Vec::new());
    for _ in 0..plan.repeats {
        let b = bare_reqwest(records).await;
        let g = sender_rate(records).await;
        let d = bare_reqwest_durable(records).await;
        let w = bare_reqwest_watermark(records).await;
        ratios.push(g / b);
        gw.push(g);
        bare.push(b);
        durable.push(d);
        durable_ratios.push(g / d);
        ceiling_ratios.push(w / b);
        ceiling.push(w);
    }
    let bare_median = stats(bare.clone()).0;
    let row = Row {
        id: "3",
        what: format!(
            "records delivered per second to the mock Panda over loopback, max_batch 50, {records} records queued"
        ),
        baseline: format!(
            "bare reqwest loop posting the same bodies: {}",
            fmt0(stats(bare), " rec/s")
        ),
        result: format!(
            "{}; against the same loop that also removes each batch from sled and flushes + fsyncs: {}. Ceiling of any sender that makes each acknowledgement durable before its next request (the plain loop + an 8-byte overwrite + `fdatasync` per batch): {} of the plain loop",
            rate_ratio(gw, " rec/s", ratios),
            rate_ratio(durable, " rec/s", durable_ratios),
            rate_ratio(ceiling, " rec/s", ceiling_ratios)
        ),
        target: "≥ 0.8 and ≥ 5,000 rec/s",
        bound: "the acknowledgement made durable before the next request (rule 3 of the sled notes: a crash repeats at most one batch): sled's remove of 50 + flush + fsync per batch, which the plain baseline does not do; then the mock server (in-process, same cores)".into(),
    };
    (row, bare_median)
}

// === processes: the gateway, simulators and the bare poller as their own processes ===

/// The release build of this crate's binary (cargo builds it for benches).
const FIELDGATE: &str = env!("CARGO_BIN_EXE_fieldgate");

/// A child process killed (SIGTERM, then SIGKILL) on drop.
struct Proc {
    child: std::process::Child,
    name: String,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut std::process::Command) -> Proc {
        let child = cmd
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child,
            name: name.to_string(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// utime + stime in seconds, from /proc/<pid>/stat.
    fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid())
    }

    fn stop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop on SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn clock_ticks() -> f64 {
    // CLK_TCK is 100 on every Linux this runs on (arm64 and x86-64 included).
    100.0
}

fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start at field 3; utime is 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / clock_ticks()
}

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn simulator(args: &[String]) -> Proc {
    Proc::spawn(
        "simulator",
        std::process::Command::new(FIELDGATE)
            .arg("simulate")
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null()),
    )
}

/// `fieldgate simulate --tcp ADDR --meters N`, waiting until it accepts connections.
fn tcp_simulator(meters: usize) -> (Proc, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let p = simulator(&["--tcp".into(), addr.clone(), "--meters".into(), meters.to_string()]);
    wait_for_port(&addr);
    (p, addr)
}

fn wait_for_port(addr: &str) {
    let end = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < end, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A gateway site on disk, run as `fieldgate run --config F`.
struct Gateway {
    proc: Proc,
    admin: String,
}

impl Gateway {
    /// Write the site (`text` without an `[admin]` section) into `dir` and start the gateway on it.
    async fn start(dir: &Path, text: &str, meters: usize) -> Gateway {
        let port = free_port();
        let text = text.replace("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\""));
        std::fs::write(dir.join("mapping.csv"), mapping_csv(meters)).expect("write mapping");
        std::fs::write(dir.join("fieldgate.toml"), text).expect("write config");
        let log = std::fs::File::create(dir.join("gateway.log")).expect("log file");
        let proc = Proc::spawn(
            "gateway",
            std::process::Command::new(FIELDGATE)
                .arg("run")
                .arg("--config")
                .arg(dir.join("fieldgate.toml"))
                .current_dir(dir)
                .stdout(std::process::Stdio::null())
                .stderr(log),
        );
        let g = Gateway {
            proc,
            admin: format!("http://127.0.0.1:{port}"),
        };
        let end = Instant::now() + Duration::from_secs(60);
        while g.metrics().await.is_none() {
            assert!(
                Instant::now() < end,
                "the gateway's admin API did not come up; see gateway.log"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        g
    }

    async fn metrics(&self) -> Option<String> {
        let r = reqwest::get(format!("{}/metrics", self.admin)).await.ok()?;
        r.text().await.ok()
    }

    /// Sum of a metric over its labels.
    async fn metric(&self, name: &str) -> f64 {
        self.metrics().await.map_or(0.0, |text| metric_sum(&text, name))
    }
}

fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// The bare baseline poller as its own process: this bench binary in `--bare-poller` mode.
struct BarePoller {
    proc: Proc,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl BarePoller {
    fn start(addrs: &[String], units: usize, interval_ms: u64, warmup: f64, window: f64) -> BarePoller {
        let mut proc = Proc::spawn(
            "bare poller",
            std::process::Command::new(std::env::current_exe().expect("own path"))
                .arg("--bare-poller")
                .arg(addrs.join(","))
                .arg(units.to_string())
                .arg(interval_ms.to_string())
                .arg(warmup.to_string())
                .arg(window.to_string())
                .stdout(std::process::Stdio::piped()),
        );
        let out = proc.child.stdout.take().expect("stdout");
        use std::io::BufRead as _;
        BarePoller {
            proc,
            lines: std::io::BufReader::new(out).lines(),
        }
    }

    fn next_line(&mut self) -> String {
        self.lines
            .next()
            .and_then(|l| l.ok())
            .unwrap_or_else(|| panic!("the bare poller ended early"))
    }
}

/// `--bare-poller ADDRS UNITS INTERVAL_MS WARMUP_S WINDOW_S`: one plain tokio-modbus client loop per
/// address (1 coil + 4 holding registers per unit, one round every INTERVAL_MS), nothing else. Prints
/// `start` when the window opens and `requests N` when it closes, then idles until killed.
fn bare_poller_main(args: &[String]) {
    let addrs: Vec<std::net::SocketAddr> = args[0].split(',').map(|a| a.parse().expect("addr")).collect();
    let units: u8 = args[1].parse().expect("units");
    let interval = Duration::from_millis(args[2].parse().expect("interval"));
    let warmup: f64 = args[3].parse().expect("warmup");
    let window: f64 = args[4].parse().expect("window");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        for addr in addrs {
            let count = count.clone();
            tokio::spawn(async move {
                let mut ctx = tcp::connect_slave(addr, Slave(1)).await.expect("connect");
                loop {
                    let start = tokio::time::Instant::now();
                    for u in 1..=units {
                        ctx.set_slave(Slave(u));
                        let _ = ctx.read_coils(0, 1).await.expect("coils");
                        let _ = ctx.read_holding_registers(0, 4).await.expect("holding");
                        count.fetch_add(2, Ordering::Relaxed);
                    }
                    tokio::time::sleep_until(start + interval).await;
                }
            });
        }
        tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
        let c0 = count.load(Ordering::Relaxed);
        println!("start");
        tokio::time::sleep(Duration::from_secs_f64(window)).await;
        println!("requests {}", count.load(Ordering::Relaxed) - c0);
        std::future::pending::<()>().await;
    });
}

/// Samples a process's RSS every `every` until stopped; returns (median, max) in MiB.
struct RssSampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Vec<u64>>,
}

impl RssSampler {
    fn start(pid: u32, every: Duration) -> RssSampler {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut v = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let kib = proc_status_kib(pid, "VmRSS:");
                if kib > 0 {
                    v.push(kib);
                }
                std::thread::sleep(every);
            }
            v
        });
        RssSampler { stop, handle }
    }

    fn finish(self) -> (f64, f64) {
        self.stop.store(true, Ordering::Relaxed);
        let v = self.handle.join().unwrap_or_default();
        let mib: Vec<f64> = v.iter().map(|k| *k as f64 / 1024.0).collect();
        let max = mib.iter().cloned().fold(0.0, f64::max);
        (stats(mib).0, max)
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_bytes(&e.path()),
                // Allocated blocks, as `du` counts them (sled preallocates; sparse files count less).
                Ok(m) => total += std::os::unix::fs::MetadataExt::blocks(&m) * 512,
                Err(_) => {}
            }
        }
    }
    total
}

// === row 4: 2,000 meters on 20 TCP buses, 1 s poll: CPU per request and RSS of the gateway process ===

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

/// (CPU seconds per request, RSS median MiB, RSS max MiB) of the bare poller process.
fn bare_process(addrs: &[String], units: usize, warmup: f64, window: f64) -> (f64, f64, f64) {
    let mut bare = BarePoller::start(addrs, units, 1000, warmup, window);
    assert_eq!(bare.next_line(), "start");
    let c0 = bare.proc.cpu_seconds();
    let rss = RssSampler::start(bare.proc.pid(), Duration::from_millis(250));
    let line = bare.next_line();
    let c1 = bare.proc.cpu_seconds();
    let (rss_med, rss_max) = rss.finish();
    let requests: f64 = line
        .strip_prefix("requests ")
        .and_then(|n| n.parse().ok())
        .expect("request count");
    ((c1 - c0) / requests.max(1.0), rss_med, rss_max)
}

async fn row4(plan: Plan) -> Row {
    let (buses, per_bus) = (20usize, 100usize);
    let (warmup, window, repeats) = if plan.long {
        (10.0, 600.0, 1)
    } else if plan.quick {
        (3.0, 5.0, 1)
    } else {
        (5.0, 30.0, 3)
    };
    let sims: Vec<(Proc, String)> = (0..buses).map(|_| tcp_simulator(per_bus)).collect();
    let addrs: Vec<String> = sims.iter().map(|(_, a)| a.clone()).collect();
    let panda = MockPanda::start(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        MockOptions::default(),
    );
    let (mut ratios, mut gw_us, mut bare_us, mut gw_rss, mut gw_rss_max, mut rates) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut bare_rss = Vec::new();
    for _ in 0..repeats {
        let a = addrs.clone();
        let (b, brss, _) = tokio::task::spawn_blocking(move || bare_process(&a, per_bus, warmup, window))
            .await
            .expect("join");
        let dir = tempfile::tempdir().expect("tempdir");
        let gw = Gateway::start(
            dir.path(),
            &site_text(&addrs, per_bus, "1s", &panda.base_url()),
            buses * per_bus,
        )
        .await;
        tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
        let (r0, c0, t0) = (
            gw.metric("fieldgate_bus_requests_total").await,
            gw.proc.cpu_seconds(),
            Instant::now(),
        );
        let rss = RssSampler::start(gw.proc.pid(), Duration::from_millis(250));
        tokio::time::sleep(Duration::from_secs_f64(window)).await;
        let (r1, c1) = (gw.metric("fieldgate_bus_requests_total").await, gw.proc.cpu_seconds());
        let secs = t0.elapsed().as_secs_f64();
        let (rss_med, rss_max) = rss.finish();
        drop(gw);
        let g = (c1 - c0) / (r1 - r0).max(1.0);
        ratios.push(g / b);
        gw_us.push(g * 1e6);
        bare_us.push(b * 1e6);
        gw_rss.push(rss_med);
        gw_rss_max.push(rss_max);
        bare_rss.push(brss);
        rates.push((r1 - r0) / secs);
    }
    drop(sims);
    panda.stop().await;
    Row {
        id: "4",
        what: format!(
            "{} meters on {buses} simulated TCP buses (each simulator its own process), poll 1 s, {}: CPU (utime+stime from /proc) of the gateway process per Modbus request; its RSS (VmRSS, sampled every 250 ms)",
            buses * per_bus,
            if plan.long { "10-minute window (`--long`)".to_string() } else { format!("{window:.0} s window after {warmup:.0} s warm-up (default; `--long` = 10 minutes)") }
        ),
        baseline: format!(
            "bare poller process (this bench binary, `--bare-poller`: 20 plain tokio-modbus loops, same reads, same 1 s rounds): {} CPU/request, RSS {}",
            fmt1(stats(bare_us), " µs"),
            fmt1(stats(bare_rss), " MiB")
        ),
        result: format!(
            "{} CPU/request = {}; RSS {} (max {:.1} MiB); {} req/s",
            fmt1(stats(gw_us), " µs"),
            fmt3(stats(ratios), "×"),
            fmt1(stats(gw_rss), " MiB"),
            gw_rss_max.iter().cloned().fold(0.0, f64::max),
            fmt0(stats(rates), "")
        ),
        target: "≤ 1.3 ×, RSS ≤ 30 MB",
        bound: "wire (loopback round trips; the 1 s interval sets the request rate, not the gateway); CPU is the gateway's own".into(),
    }
}

// === row 5: valve flip → work order at the mock, poll 1 s ===

async fn row5(plan: Plan) -> Row {
    let units = 20usize;
    let addr = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let _sim = simulator(&[
        "--tcp".into(),
        addr.clone(),
        "--meters".into(),
        units.to_string(),
        "--admin".into(),
        admin.clone(),
    ]);
    wait_for_port(&addr);
    wait_for_port(&admin);
    let panda = MockPanda::start(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        MockOptions::default(),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = Gateway::start(
        dir.path(),
        &site_text(std::slice::from_ref(&addr), units, "1s", &panda.base_url()),
        units,
    )
    .await;
    // Baselines stored (first round) before the first flip.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let want = if plan.quick {
        40
    } else if plan.long {
        1000
    } else {
        300
    };
    let http = reqwest::Client::new();
    let mut outstanding: std::collections::HashMap<String, Instant> = Default::default();
    let mut latencies: Vec<f64> = Vec::new();
    let mut seen = panda.orders().len();
    let mut next_flip = Instant::now();
    let mut cursor = 0usize;
    let deadline = Instant::now() + Duration::from_secs(want as u64 + 60);
    let mut rng = rand::rng();
    while latencies.len() < want && Instant::now() < deadline {
        if Instant::now() >= next_flip && outstanding.len() < units {
            let unit = (0..units)
                .map(|k| (cursor + k) % units + 1)
                .find(|u| !outstanding.contains_key(&format!("M{u}")));
            if let Some(u) = unit {
                cursor = u;
                let t = Instant::now();
                let ok = http
                    .post(format!("http://{admin}/units/{u}/flip"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    outstanding.insert(format!("M{u}"), t);
                }
            }
            // Flips at random moments, so they fall at every phase of the 1 s poll.
            next_flip = Instant::now() + Duration::from_millis(rand::Rng::random_range(&mut rng, 50..250));
        }
        let orders = panda.orders();
        let now = Instant::now();
        for o in orders.iter().skip(seen) {
            let meter = o.biz.get("水表表号").and_then(|v| v.as_str()).unwrap_or_default();
            if let Some(t) = outstanding.remove(meter) {
                latencies.push((now - t).as_secs_f64() * 1000.0);
            }
        }
        seen = orders.len();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    drop(gw);
    panda.stop().await;
    let n = latencies.len();
    let (p50, p99, max) = (
        pct(latencies.clone(), 50.0),
        pct(latencies.clone(), 99.0),
        pct(latencies, 100.0),
    );
    Row {
        id: "5",
        what: format!("valve flip (simulator admin API, random phase) → work order arriving at the mock Panda; gateway and simulator as processes, {units} meters, poll 1 s; {n} flips"),
        baseline: "poll interval 1000 ms".into(),
        result: format!("p50 {p50:.0} ms, p99 {p99:.0} ms (max {max:.0} ms); p99 − poll = {:.0} ms", p99 - 1000.0),
        target: "p99 ≤ poll + 50 ms",
        bound: "the poll interval (a flip waits for the next read of its meter), then one commit + fsync and one POST".into(),
    }
}

// === row 6: a large backlog queued with the server down, then drained ===

/// `--fill-outbox DIR N`: queue N records through the public Store API as a 2,000-meter station
/// would (one `commit_batch` of 2,000 transitions per cycle, then flush + fsync), then exit.
fn fill_outbox_main(args: &[String]) {
    let dir = PathBuf::from(&args[0]);
    let n: usize = args[1].parse().expect("count");
    let outbox = Store::open(
        &dir,
        Limits {
            max_records: u64::MAX,
            max_bytes: u64::MAX,
            ..Limits::DEFAULT
        },
    )
    .expect("open");
    // Changes per commit: 2,000 meters flipping in one cycle by default.
    let per: usize = std::env::var("FILL_PER")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let mut i = 0;
    while i < n {
        let changes: Vec<_> = (i..n.min(i + per))
            .map(|k| {
                (
                    format!("F{}", k % 2000),
                    StoredState {
                        raw: (k / 2000 % 2) as i64,
                        label: "开启".into(),
                        since: String::new(),
                        ..StoredState::default()
                    },
                    vec![draft(k)],
                )
            })
            .collect();
        i += changes.len();
        for r in outbox.commit_batch(changes).expect("commit") {
            r.expect("room");
        }
        outbox.sync_blocking().expect("sync");
    }
}

fn draft(i: usize) -> Draft {
    Draft {
        event_name: "用水户开阀".into(),
        detected_at: "2026-11-24T08:00:00+08:00".into(),
        from: "关闭".into(),
        to: "开启".into(),
        biz_data: biz(i),
    }
}

async fn row6(plan: Plan, bare_rate: f64) -> Row {
    let n = if plan.long {
        1_000_000
    } else if plan.quick {
        20_000
    } else {
        100_000
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    // Fill, as its own process.
    let mut fill = Proc::spawn(
        "outbox filler",
        std::process::Command::new(std::env::current_exe().expect("own path"))
            .arg("--fill-outbox")
            .arg(&state)
            .arg(n.to_string()),
    );
    let fill_rss = RssSampler::start(fill.pid(), Duration::from_millis(100));
    let t = Instant::now();
    let status = tokio::task::block_in_place(|| fill.child.wait()).expect("wait");
    assert!(status.success(), "the filler failed");
    let fill_secs = t.elapsed().as_secs_f64();
    let (_, fill_rss_max) = fill_rss.finish();
    let disk_full = dir_bytes(&state);
    // The gateway on that backlog, the server down.
    let (_sim, addr) = tcp_simulator(1);
    let panda_port = free_port();
    let mut text = site_text(&[addr], 1, "1s", &format!("http://127.0.0.1:{panda_port}"));
    text.push_str("\n[outbox]\nmax_records = 2000000\nmax_bytes = 4294967296\n");
    let t_open = Instant::now();
    let gw = Gateway::start(dir.path(), &text, 1).await;
    let open_secs = t_open.elapsed().as_secs_f64();
    let rss = RssSampler::start(gw.proc.pid(), Duration::from_millis(100));
    let queued = gw.metric("fieldgate_outbox_records").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The server comes up: drain.
    let panda = MockPanda::start(
        TcpListener::bind(("127.0.0.1", panda_port)).await.expect("bind"),
        MockOptions::default(),
    );
    let t = Instant::now();
    let limit = Instant::now() + Duration::from_secs(1800);
    loop {
        let left = gw.metric("fieldgate_outbox_records").await;
        if left == 0.0 || Instant::now() > limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drain_secs = t.elapsed().as_secs_f64();
    let (rss_med, rss_max) = rss.finish();
    let disk_after = dir_bytes(&state);
    drop(gw);
    let delivered = panda.orders().len();
    panda.stop().await;
    let rate = n as f64 / drain_secs;
    Row {
        id: "6",
        what: format!(
            "{n} records queued with the server down ({}), then drained to the mock Panda by the gateway process",
            if plan.long { "`--long`" } else { "default; `--long` = 1,000,000" }
        ),
        baseline: format!("row 3's bare reqwest rate in this run: {bare_rate:.0} rec/s"),
        result: format!(
            "queued {queued:.0} ({:.0} rec/s through `commit_batch` + fsync per 2,000, filler RSS max {fill_rss_max:.1} MiB); disk {:.0} MiB queued, {:.0} MiB after draining; gateway open {open_secs:.1} s; gateway RSS median {rss_med:.1} MiB, max {rss_max:.1} MiB; drained {delivered} in {drain_secs:.1} s = {rate:.0} rec/s = {:.3}× row 3's baseline",
            n as f64 / fill_secs,
            disk_full as f64 / 1048576.0,
            disk_after as f64 / 1048576.0,
            rate / bare_rate
        ),
        target: "disk ≤ 1 GiB, RSS ≤ 64 MB throughout, drain at row 3's rate",
        bound: "disk (one fsync per acknowledged batch of 50) and the server (in-process mock on the same 2 cores)".into(),
    }
}

// === row 7: binary size and RSS polling 10 meters ===

async fn row7(plan: Plan) -> Row {
    let size = std::fs::metadata(FIELDGATE).map_or(0, |m| m.len());
    let (_sim, addr) = tcp_simulator(10);
    let panda = MockPanda::start(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        MockOptions::default(),
    );
    let (warmup, window, repeats) = if plan.quick { (2.0, 3.0, 1) } else { (5.0, 15.0, 3) };
    let (mut gw, mut gw_max, mut bare) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..repeats {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = Gateway::start(
            dir.path(),
            &site_text(std::slice::from_ref(&addr), 10, "1s", &panda.base_url()),
            10,
        )
        .await;
        tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
        let rss = RssSampler::start(g.proc.pid(), Duration::from_millis(250));
        tokio::time::sleep(Duration::from_secs_f64(window)).await;
        let (m, x) = rss.finish();
        gw.push(m);
        gw_max.push(x);
        drop(g);
        let a = vec![addr.clone()];
        let (_, b, _) = tokio::task::spawn_blocking(move || bare_process(&a, 10, warmup, window))
            .await
            .expect("join");
        bare.push(b);
    }
    panda.stop().await;
    Row {
        id: "7",
        what: "stripped release binary (`target/release/fieldgate`); RSS (VmRSS) of the gateway process polling 10 meters every second".into(),
        baseline: format!(
            "bare tokio-modbus poller process, 10 meters every second: RSS {}. Not measured here, cited from the issue: a hello program with the same crates ~4 MB stripped; Node-RED + node-red-contrib-modbus ~112 MB RSS",
            fmt1(stats(bare.clone()), " MiB")
        ),
        result: format!(
            "binary {:.2} MiB; RSS {} (max {:.1} MiB) = {:.3}× the bare poller, {:.3}× Node-RED's 112 MB",
            size as f64 / 1048576.0,
            fmt1(stats(gw.clone()), " MiB"),
            gw_max.iter().cloned().fold(0.0, f64::max),
            stats(gw.clone()).0 / stats(bare.clone()).0.max(0.001),
            stats(gw).0 * 1.048576 / 112.0
        ),
        target: "≤ 6 MB binary, ≤ 10 MB RSS",
        bound: "code size (tokio, rustls, axum, sled, clap); RSS: sled's page cache and the runtime's threads".into(),
    }
}

// === row 8: RTU at 9600 baud 8N1 on a pty pair, the simulator pacing its bytes ===

/// Wire time of one request/answer exchange at `baud`, 8N1 (10 bits a character): the request, 3.5
/// characters of silence (the slave's end of frame), the answer, 3.5 characters before the next request.
fn wire_ms(baud: f64, request: usize, answer: usize) -> f64 {
    (request as f64 + 3.5 + answer as f64 + 3.5) * 10.0 / baud * 1000.0
}

async fn row8(plan: Plan) -> Row {
    let units = 10usize;
    let (warmup, window, repeats) = if plan.quick { (2.0, 4.0, 1) } else { (3.0, 10.0, 3) };
    let dir = tempfile::tempdir().expect("tempdir");
    let (gw_tty, sim_tty) = (dir.path().join("ttyGW"), dir.path().join("ttySIM"));
    let arg = |p: &Path| format!("pty,raw,echo=0,link={}", p.display());
    let _socat = Proc::spawn(
        "socat",
        std::process::Command::new("socat").arg(arg(&gw_tty)).arg(arg(&sim_tty)),
    );
    let end = Instant::now() + Duration::from_secs(10);
    while !(gw_tty.exists() && sim_tty.exists()) {
        assert!(
            Instant::now() < end,
            "socat did not create its pty links (is socat installed?)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _sim = simulator(&[
        "--serial".into(),
        sim_tty.display().to_string(),
        "--baud".into(),
        "9600".into(),
        "--pace-baud".into(),
        "9600".into(),
        "--meters".into(),
        units.to_string(),
    ]);
    let panda = MockPanda::start(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        MockOptions::default(),
    );
    // Coil read: request 8 bytes, answer 6 (unit, fc, count, 1 data byte, CRC 2). Holding read of 4:
    // request 8, answer 13 (unit, fc, count, 8 data bytes, CRC 2). One of each per meter.
    let wire = (wire_ms(9600.0, 8, 6) + wire_ms(9600.0, 8, 13)) / 2.0;
    let (mut per_req, mut ratios, mut timeouts) = (Vec::new(), Vec::new(), 0.0);
    for _ in 0..repeats {
        let sub = tempfile::tempdir().expect("tempdir");
        let transport = format!("serial = \"{}\"\nbaud = 9600", gw_tty.display());
        let gw = Gateway::start(
            sub.path(),
            &site_text_with(&[transport], units, "1ms", &panda.base_url(), ""),
            units,
        )
        .await;
        tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
        let (r0, x0, t0) = (
            gw.metric("fieldgate_bus_requests_total").await,
            gw.metric("fieldgate_bus_timeouts_total").await,
            Instant::now(),
        );
        tokio::time::sleep(Duration::from_secs_f64(window)).await;
        let (r1, x1) = (
            gw.metric("fieldgate_bus_requests_total").await,
            gw.metric("fieldgate_bus_timeouts_total").await,
        );
        let ms = t0.elapsed().as_secs_f64() * 1000.0 / (r1 - r0).max(1.0);
        per_req.push(ms);
        ratios.push(ms / wire);
        timeouts += x1 - x0;
        drop(gw);
    }
    panda.stop().await;
    Row {
        id: "8",
        what: format!("RTU 9600 8N1 on a socat pty pair, simulator process pacing its bytes at line rate (`--pace-baud 9600`), {units} meters × (1 coil + 4 holding registers), polled back to back: time per request ({timeouts:.0} timeouts in the windows)"),
        baseline: format!("wire time {wire:.2} ms/request (arithmetic below)"),
        result: format!("{} = {}", fmt3(stats(per_req), " ms"), fmt3(stats(ratios), "×")),
        target: "≤ 1.2 × the wire time",
        bound: "wire (9600 baud), plus the gateway's frame gap (3.5 characters of 11 bits, 4.01 ms, vs 3.65 ms for 10-bit characters)".into(),
    }
}

// === report ===

/// Where the generated part of BENCHMARKS.md ends and the hand-written notes begin.
const NOTES_MARK: &str = "<!-- notes: benches/BENCHMARKS.notes.md -->";

fn report(rows: &[Row], command: &str, minutes: f64) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Produced by `{command}` on {} ({} cores, shared with other builds: noisy) in {minutes:.1} minutes. Each figure:",
        std::env::consts::ARCH,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let _ = writeln!(
        s,
        "median (min–max) over the repeats; each ratio is against a baseline measured in the same run, interleaved with it.\n"
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
    // Hand-written findings (profiles, changes, before/after), kept next to the runner.
    let notes = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/BENCHMARKS.notes.md"))
        .unwrap_or_default();
    let _ = writeln!(s, "\n{NOTES_MARK}\n\n{notes}");
    s
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--bare-poller") {
        return bare_poller_main(&args[i + 1..]);
    }
    if let Some(i) = args.iter().position(|a| a == "--fill-outbox") {
        return fill_outbox_main(&args[i + 1..]);
    }
    let long = args.iter().any(|a| a == "--long");
    let quick = args.iter().any(|a| a == "--quick");
    let only: Option<Vec<u32>> = args
        .iter()
        .position(|a| a == "--rows")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect());
    let plan = Plan {
        // Rows 1-3 sit near their targets on a shared machine: nine repeats make their medians steady.
        repeats: if quick { 1 } else { 9 },
        seconds: if quick { 0.5 } else { 2.0 },
        long,
        quick,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    let wanted = |n: u32| only.as_ref().is_none_or(|o| o.contains(&n));
    let rows = rt.block_on(async {
        let mut rows = Vec::new();
        let mut bare_rate = 0.0;
        for n in 1..=8u32 {
            if !wanted(n) {
                continue;
            }
            eprintln!("row {n} … ({:.1} min so far)", started.elapsed().as_secs_f64() / 60.0);
            let row = match n {
                1 => row1(plan).await,
                2 => row2(plan).await,
                3 => {
                    let (row, b) = row3(plan).await;
                    bare_rate = b;
                    row
                }
                4 => row4(plan).await,
                5 => row5(plan).await,
                6 => {
                    if bare_rate == 0.0 {
                        bare_rate = bare_reqwest(10_000).await;
                    }
                    row6(plan, bare_rate).await
                }
                7 => row7(plan).await,
                _ => row8(plan).await,
            };
            eprintln!("| {} | {} | {} |", row.id, row.baseline, row.result);
            rows.push(row);
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
    let text = report(&rows, &command, started.elapsed().as_secs_f64() / 60.0);
    println!("{text}");
    if !quick && only.is_none() {
        let _ = std::fs::write("BENCHMARKS.md", &text);
    }
}

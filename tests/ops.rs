//! Running as a service: systemd notifications and the watchdog, reload (SIGHUP) of config and mapping,
//! SIGTERM, and a second instance on the same state directory. In-process through `app::start_with`
//! / `Gateway::reload`, and with the real `fieldgate run` binary and real signals (`kill`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fieldgate::app::{self, Supervision};
use fieldgate::config::Limits;
use fieldgate::ops::notify::Notifier;
use fieldgate::store::Store;
use fieldgate::tools::mock_panda::{MockOptions, MockPanda, WorkOrder};
use tokio::net::{TcpListener, UnixDatagram};

use crate::e2e::{rig, wait_for_baselines, wait_orders, wait_rounds, Rig};
use crate::util::daemon::Daemon;
use crate::util::{mapping_csv, wait_until, wait_until_sync, Site, DEADLINE};

const GRACE: Duration = Duration::from_secs(10);

// === helpers ===

/// A datagram socket in a temp dir standing in for systemd's `$NOTIFY_SOCKET`.
struct FakeSystemd {
    _dir: tempfile::TempDir,
    path: PathBuf,
    sock: UnixDatagram,
}

impl FakeSystemd {
    fn new() -> FakeSystemd {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        FakeSystemd { _dir: dir, path, sock }
    }

    fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// The next message; panics after the test deadline.
    async fn next(&self) -> String {
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(DEADLINE, self.sock.recv(&mut buf))
            .await
            .expect("timed out waiting for a notification")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Skip messages until one that starts with `prefix`; returns it.
    async fn until(&self, prefix: &str) -> String {
        loop {
            let m = self.next().await;
            if m.starts_with(prefix) {
                return m;
            }
        }
    }

    /// Every message already waiting, without blocking.
    fn drain(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        while let Ok(n) = self.sock.try_recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }
}

/// Supervision with pings every 100 ms and a small stall slack, so a stall shows within seconds.
fn supervision(systemd: &FakeSystemd) -> Supervision {
    Supervision {
        notifier: Notifier::new(Some(systemd.path()), Some(Duration::from_millis(200))).unwrap(),
        stall_slack: Duration::from_millis(300),
    }
}

fn biz(o: &WorkOrder, key: &str) -> String {
    o.biz.get(key).and_then(|v| v.as_str()).unwrap_or_default().to_string()
}

/// Write the mapping of the rig's site with M1's customer renamed to `name`.
fn rename_m1(site: &Site, n: usize, name: &str) {
    let csv = mapping_csv(n).replace(",用户1,", &format!(",{name},"));
    std::fs::write(site.path().join("mapping.csv"), csv).unwrap();
}

/// A mapping the loader refuses: M1's row twice.
fn write_invalid_mapping(site: &Site, n: usize) {
    let mut csv = mapping_csv(n);
    csv.push_str("U9999,重复,正常,13800009999,西路1号,M1,井内,DN20,城东营业所\n");
    std::fs::write(site.path().join("mapping.csv"), csv).unwrap();
}

fn open_outbox(site: &Site) -> Store {
    Store::open(
        &site.path().join("state"),
        Limits {
            max_records: 1000,
            max_bytes: 1 << 20,
            ..Limits::DEFAULT
        },
    )
    .unwrap_or_else(|e| panic!("reopen the state dir: {e}"))
}

// === systemd notifications and the watchdog ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_gets_ready_then_watchdog_pings_while_buses_poll_even_one_that_cannot_connect() {
    // Two meters on a live simulator, and a third bus whose port refuses every connection.
    let rig = rig(2, "none", MockOptions::default()).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = closed.local_addr().unwrap();
    drop(closed);
    let mut config = std::fs::read_to_string(rig.site.config_path()).unwrap();
    config.push_str(&format!(
        "\n[[bus]]\nname = \"dead\"\ntcp = \"{dead_addr}\"\npoll_interval = \"50ms\"\ntimeout = \"200ms\"\n\
         \n[[meter]]\nmeter_no = \"M3\"\nbus = \"dead\"\nunit = 3\nprofile = \"sim\"\n"
    ));
    std::fs::write(rig.site.config_path(), config).unwrap();
    std::fs::write(rig.site.path().join("mapping.csv"), mapping_csv(3)).unwrap();

    let systemd = FakeSystemd::new();
    let gw = app::start_with(rig.site.load(), supervision(&systemd))
        .await
        .unwrap_or_else(|e| panic!("start: {e}"));
    let first = systemd.next().await;
    assert!(
        first.starts_with("READY=1\nSTATUS=Polling 2 bus(es), 3 meter(s)"),
        "{first:?}"
    );

    // The dead bus keeps completing rounds (connect refused, then backoff) ...
    wait_until("the dead bus fails to connect and still completes rounds", || async {
        let s = gw.bus_stats[1].snapshot();
        s.connect_failures >= 2 && s.rounds >= 5 && !s.up
    })
    .await;
    // ... so the pings go on.
    systemd.drain();
    for _ in 0..3 {
        assert_eq!(systemd.until("WATCHDOG=1").await, "WATCHDOG=1");
    }
    assert!(gw.liveness().stalls().is_empty(), "{:?}", gw.liveness().stalls());
    assert_eq!(gw.liveness().pings_withheld(), 0);

    gw.stop(GRACE).await;
    let after: Vec<String> = systemd.drain();
    assert!(
        after.iter().any(|m| m.starts_with("STOPPING=1")),
        "STOPPING=1 on stop: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_pings_stop_when_a_bus_heartbeat_is_frozen_by_the_test_hook() {
    let rig = rig(2, "none", MockOptions::default()).await;
    let systemd = FakeSystemd::new();
    let gw = app::start_with(rig.site.load(), supervision(&systemd))
        .await
        .unwrap_or_else(|e| panic!("start: {e}"));
    systemd.until("READY=1").await;
    systemd.until("WATCHDOG=1").await;

    // Stands for a bus task stuck forever in an await (the real one cannot hang: every await in it
    // is bounded): its round counter is read as never advancing again.
    assert!(gw.liveness().freeze("line-a"));
    let status = systemd.until("STATUS=Stalled").await;
    assert!(status.contains("bus line-a completed no poll round"), "{status}");
    // From the stall on, ticks pass and none of them pings.
    let withheld = gw.liveness().pings_withheld();
    wait_until("three more watchdog ticks withheld", || async {
        gw.liveness().pings_withheld() >= withheld + 3
    })
    .await;
    let after = systemd.drain();
    assert!(
        !after.iter().any(|m| m == "WATCHDOG=1"),
        "no ping after the stall: {after:?}"
    );
    // The bus itself still polls: only the registry was frozen.
    wait_rounds(&gw, 2).await;
    gw.stop(GRACE).await;
}

// === reload ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_with_a_valid_mapping_changes_the_next_work_order_and_queued_records_keep_their_bizdata() {
    let rig = rig(2, "none", MockOptions::default()).await;
    let panda_addr = rig.panda.addr();
    let mut gw = rig.start().await;
    wait_for_baselines(&gw).await;
    rig.panda.stop().await;

    // Queued (the server is down) with the old mapping.
    rig.plant.flip_valve(1);
    wait_until("M1 opening queued", || async { gw.outbox.len() == 1 }).await;

    rename_m1(&rig.site, 2, "王一");
    gw.reload(&rig.site.config_path())
        .await
        .unwrap_or_else(|e| panic!("reload: {e}"));
    assert_eq!(
        gw.cfg
            .mapping
            .get("M1")
            .and_then(|r| r.iter().find(|(k, _)| *k == "用户名称").map(|(_, v)| v.to_string())),
        Some("王一".to_string())
    );
    assert_eq!(gw.outbox.len(), 1, "the queued record is untouched");

    rig.plant.flip_valve(1);
    wait_until("M1 closing queued", || async { gw.outbox.len() == 2 }).await;

    let panda = MockPanda::start(TcpListener::bind(panda_addr).await.unwrap(), MockOptions::default());
    let orders = wait_orders(&panda, 2).await;
    let m1: Vec<(String, String)> = orders
        .iter()
        .filter(|o| biz(o, "水表表号") == "M1")
        .map(|o| (biz(o, "阀门当前状态"), biz(o, "用户名称")))
        .collect();
    assert_eq!(
        m1,
        [
            ("开启".to_string(), "用户1".to_string()),
            ("关闭".to_string(), "王一".to_string())
        ],
        "queued before the reload: old name; detected after: new name"
    );
    gw.stop(GRACE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_with_an_invalid_mapping_is_refused_and_the_old_one_stays_active() {
    let rig = rig(2, "none", MockOptions::default()).await;
    let mut gw = rig.start().await;
    wait_for_baselines(&gw).await;
    let stats_before = gw.bus_stats[0].clone();

    write_invalid_mapping(&rig.site, 2);
    let err = gw
        .reload(&rig.site.config_path())
        .await
        .expect_err("a duplicate meter row must be refused");
    assert!(
        err.issues.iter().any(|i| i.file.ends_with("mapping.csv")),
        "the issue names the mapping file: {err}"
    );
    assert!(Arc::ptr_eq(&stats_before, &gw.bus_stats[0]), "nothing was restarted");

    rig.plant.flip_valve(1);
    let orders = wait_orders(&rig.panda, 1).await;
    assert_eq!(biz(&orders[0], "用户名称"), "用户1", "the old mapping is still active");
    // And the buses were never stopped: rounds keep coming.
    wait_rounds(&gw, 3).await;
    assert!(gw.bus_stats[0].rounds.load(Ordering::Relaxed) > 0);
    gw.stop(GRACE).await;
}

// === the real binary and real signals ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_0_and_the_record_detected_just_before_is_on_disk() {
    let rig: Rig = rig(2, "none", MockOptions::default()).await;
    rig.panda.stop().await; // nothing can be delivered: the record must be in the outbox afterwards
    let systemd = FakeSystemd::new();
    let mut daemon = Daemon::spawn(
        &rig.site.config_path(),
        &[("NOTIFY_SOCKET", systemd.path()), ("WATCHDOG_USEC", "200000")],
    );
    let ready = systemd.until("READY=1").await;
    assert!(ready.contains("Polling 1 bus(es), 2 meter(s)"), "{ready}");
    systemd.until("WATCHDOG=1").await;
    daemon.wait_log("Baseline valve state stored.", 2).await;

    rig.plant.flip_valve(2);
    daemon.wait_log("Valve transition queued.", 1).await;
    daemon.signal("TERM");
    let status = daemon.wait_exit();
    assert_eq!(status.code(), Some(0), "exit 0 on SIGTERM; log:\n{}", daemon.dump());
    assert_eq!(daemon.count("Gateway stopped."), 1, "{}", daemon.dump());
    let after = systemd.drain();
    assert!(after.iter().any(|m| m.starts_with("STOPPING=1")), "{after:?}");

    let outbox = open_outbox(&rig.site);
    let queued = outbox.list(100).unwrap();
    assert_eq!(queued.len(), 1, "{queued:?}");
    assert_eq!(queued[0].meter_no, "M2");
    assert_eq!(queued[0].to, "开启");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_mapping_in_the_running_binary_and_refuses_an_invalid_one() {
    let rig = rig(2, "none", MockOptions::default()).await;
    let mut daemon = Daemon::spawn(&rig.site.config_path(), &[]);
    daemon.wait_log("Baseline valve state stored.", 2).await;

    rename_m1(&rig.site, 2, "王一");
    daemon.signal("HUP");
    daemon.wait_log("Configuration reloaded.", 1).await;
    rig.plant.flip_valve(1);
    let orders = wait_orders(&rig.panda, 1).await;
    assert_eq!(biz(&orders[0], "用户名称"), "王一");

    write_invalid_mapping(&rig.site, 2);
    daemon.signal("HUP");
    daemon
        .wait_log("Reload refused; the running configuration stays.", 1)
        .await;
    assert!(daemon.count("Invalid configuration.") >= 1, "{}", daemon.dump());
    rig.plant.flip_valve(1);
    let orders = wait_orders(&rig.panda, 2).await;
    assert_eq!(biz(&orders[1], "用户名称"), "王一", "the last valid mapping stays");

    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit().code(), Some(0), "{}", daemon.dump());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_on_the_same_state_dir_fails_with_a_clear_message() {
    let rig = rig(1, "none", MockOptions::default()).await;
    let mut first = Daemon::spawn(&rig.site.config_path(), &[]);
    first.wait_log("Gateway started.", 1).await;

    let config = rig.site.config_path();
    let second = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_fieldgate"))
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "off")
            .env_remove("NOTIFY_SOCKET")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("state directory") && stderr.contains("in use by another fieldgate process"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&rig.site.path().join("state").display().to_string()),
        "{stderr}"
    );

    // The first one is unaffected and stops cleanly.
    first.signal("TERM");
    assert_eq!(first.wait_exit().code(), Some(0), "{}", first.dump());
    wait_until_sync("state dir free again", || {
        Store::open(
            &rig.site.path().join("state"),
            Limits {
                max_records: 10,
                max_bytes: 1 << 20,
                ..Limits::DEFAULT
            },
        )
        .is_ok()
    });
}

// === packaging ===

/// The config the .deb installs as /etc/fieldgate/fieldgate.toml is the documented example with the
/// install paths, and it validates with the mapping the .deb installs beside it.
#[test]
fn the_packaged_config_is_the_example_with_install_paths() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = std::fs::read_to_string(root.join("config/fieldgate.example.toml")).unwrap();
    let packaged = std::fs::read_to_string(root.join("pkg/deb/fieldgate.toml")).unwrap();
    let (a, b): (Vec<&str>, Vec<&str>) = (example.lines().collect(), packaged.lines().collect());
    assert_eq!(
        a.len(),
        b.len(),
        "pkg/deb/fieldgate.toml must follow config/fieldgate.example.toml"
    );
    for (n, (a, b)) in a.iter().zip(&b).enumerate() {
        if a.starts_with("state_dir =") {
            assert!(
                b.starts_with("state_dir = \"/var/lib/fieldgate\""),
                "line {}: {b}",
                n + 1
            );
        } else if a.starts_with("mapping =") {
            assert!(b.starts_with("mapping = \"mapping.csv\""), "line {}: {b}", n + 1);
        } else {
            assert_eq!(a, b, "line {}: only state_dir and mapping may differ", n + 1);
        }
    }
    let etc = tempfile::tempdir().unwrap();
    std::fs::write(etc.path().join("fieldgate.toml"), &packaged).unwrap();
    std::fs::copy(root.join("config/mapping.example.csv"), etc.path().join("mapping.csv")).unwrap();
    let cfg = fieldgate::config::load(&etc.path().join("fieldgate.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.site.state_dir, Path::new("/var/lib/fieldgate"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_removes_a_meter_is_what_the_admin_api_shows() {
    let rig = rig(3, "none", MockOptions::default()).await;
    let mut gw = rig.start().await;
    wait_for_baselines(&gw).await;
    let url = format!("http://{}/meters", gw.admin_addr.expect("admin bound"));
    let meters = |body: serde_json::Value| -> Vec<String> {
        body.as_array()
            .expect("array")
            .iter()
            .map(|m| m["meter_no"].as_str().expect("meter_no").to_string())
            .collect()
    };
    let before: serde_json::Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    assert_eq!(meters(before), ["M1", "M2", "M3"]);

    let text = std::fs::read_to_string(rig.site.config_path()).unwrap();
    let cut = text.find("\n[[meter]]\nmeter_no = \"M3\"").expect("M3 section");
    std::fs::write(rig.site.config_path(), &text[..cut]).unwrap();
    gw.reload(&rig.site.config_path())
        .await
        .unwrap_or_else(|e| panic!("reload: {e}"));

    let after: serde_json::Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    assert_eq!(
        meters(after),
        ["M1", "M2"],
        "the admin API follows the reloaded meter list"
    );
    gw.stop(GRACE).await;
}

// === one station at a time across reloads ===

/// `/healthz` as JSON.
async fn healthz(gw: &app::Gateway) -> serde_json::Value {
    let url = format!("http://{}/healthz", gw.admin_addr.expect("admin bound"));
    reqwest::get(&url).await.unwrap().json().await.unwrap()
}

/// The finding `code` of `/healthz`, if present: (status, message).
fn finding(h: &serde_json::Value, code: &str) -> Option<(String, String)> {
    h["reasons"].as_array()?.iter().find(|r| r["code"] == code).map(|r| {
        (
            r["status"].as_str().unwrap_or_default().to_string(),
            r["message"].as_str().unwrap_or_default().to_string(),
        )
    })
}

/// Every queued record of each meter, in commit order (ids grow with each commit): each takes the
/// valve from the state the previous one left it in, and the last leaves it where the store and the
/// plant have it. A record committed by an old station after its successor's breaks the chain.
fn assert_records_chain(gw: &app::Gateway, rig: &Rig, meters: u8) {
    let records = gw.outbox.list(100_000).unwrap();
    assert!(records.windows(2).all(|w| w[0].id < w[1].id), "listed in commit order");
    for unit in 1..=meters {
        let meter = format!("M{unit}");
        let chain: Vec<(String, String)> = records
            .iter()
            .filter(|r| r.meter_no == meter)
            .map(|r| (r.from.clone(), r.to.clone()))
            .collect();
        let mut at = "关闭".to_string(); // the simulator's valves start closed: the baseline
        for (from, to) in &chain {
            assert_eq!(
                from, &at,
                "{meter}: a record from a state the valve was not in: {chain:?}"
            );
            assert_ne!(from, to, "{meter}: {chain:?}");
            at = to.clone();
        }
        let plant = if rig.plant.valve(unit) == Some(true) {
            "开启"
        } else {
            "关闭"
        };
        assert_eq!(
            at, plant,
            "{meter}: the last record leaves the valve where it is: {chain:?}"
        );
        let stored = gw.outbox.state(&meter).unwrap().expect("state stored");
        assert_eq!(stored.label, plant, "{meter}: the stored state");
    }
}

/// The station stands still inside a cycle (the hook stands for a commit or fsync on a dying SD card)
/// for longer than the grace period: the reload waits for that cycle to finish before it starts the
/// next station, so the old one can never commit beside (or after) its successor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_starts_the_new_station_only_once_the_old_one_has_stopped_applying() {
    let rig = rig(2, "none", MockOptions::default()).await;
    rig.panda.stop().await; // records stay queued, in commit order, for the chain check
    let mut gw = rig.start().await;
    wait_for_baselines(&gw).await;
    let stations = gw.stations().clone();
    assert_eq!(stations.generation(), 1);

    stations.hooks().hold();
    wait_until("the station stands still inside a cycle", || async {
        stations.hooks().holding()
    })
    .await;
    let path = rig.site.config_path();
    let reload = tokio::spawn(async move { gw.reload(&path).await.map(|()| gw) });
    // Past the grace period (5 s here: the panda timeout) the reload gives up on the old station
    // and waits for its cycle to finish.
    wait_until("the reload waits for the old station", || async {
        stations.waiting_for_old()
    })
    .await;
    assert_eq!(
        stations.generation(),
        1,
        "no new station while the old one is inside a cycle"
    );
    assert!(!reload.is_finished());
    // A valve moves while no station runs: the next station sees it.
    rig.plant.flip_valve(1);
    stations.hooks().release();
    let gw = reload.await.unwrap().unwrap_or_else(|e| panic!("reload: {e}"));
    assert_eq!(stations.generation(), 2);
    assert!(!stations.waiting_for_old());

    wait_until("the new station records M1's opening", || async {
        gw.outbox
            .list(10)
            .unwrap()
            .iter()
            .any(|r| r.meter_no == "M1" && r.to == "开启")
    })
    .await;
    rig.plant.flip_valve(2);
    wait_until("and M2's", || async {
        gw.outbox.list(10).unwrap().iter().any(|r| r.meter_no == "M2")
    })
    .await;
    let applied = stations.applied();
    assert!(
        applied.iter().any(|&(g, n)| g == 2 && n > 0),
        "the new station applies cycles: {applied:?}"
    );
    assert_eq!(stations.violations(), 0, "never two stations at once: {applied:?}");
    assert_records_chain(&gw, &rig, 2);
    gw.stop(GRACE).await;
}

/// Valves keep moving while the configuration is reloaded again and again: every generation applies
/// cycles, never beside another, and each meter's records chain from its baseline to the state the
/// valve is in (a cycle applied twice or a state written backwards would break the chain).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_while_valves_move_apply_each_cycle_once_and_never_write_a_state_backwards() {
    const METERS: u8 = 4;
    const RELOADS: u64 = 5;
    let rig = rig(METERS as usize, "none", MockOptions::default()).await;
    rig.panda.stop().await;
    let mut gw = rig.start().await;
    wait_for_baselines(&gw).await;
    let stations = gw.stations().clone();

    // Flip valves round-robin every 70 ms until told to stop; count the flips of each.
    let stop_flipping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flipper = tokio::spawn({
        let (plant, stop) = (rig.plant.clone(), stop_flipping.clone());
        async move {
            let mut flips = [0u32; METERS as usize];
            let mut k = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let unit = (k % METERS as usize) as u8 + 1;
                plant.flip_valve(unit);
                flips[unit as usize - 1] += 1;
                k += 1;
                tokio::time::sleep(Duration::from_millis(70)).await;
            }
            flips
        }
    });

    for n in 1..=RELOADS {
        // Let this generation apply a few cycles with valves moving, then replace it.
        wait_until("the running station applies cycles", || async {
            stations.applied().iter().any(|&(g, c)| g == n && c >= 5)
        })
        .await;
        rename_m1(&rig.site, METERS as usize, &format!("用户1-{n}"));
        gw.reload(&rig.site.config_path())
            .await
            .unwrap_or_else(|e| panic!("reload {n}: {e}"));
        assert_eq!(stations.generation(), n + 1);
    }
    wait_until("the last station applies cycles", || async {
        stations.applied().iter().any(|&(g, c)| g == RELOADS + 1 && c >= 5)
    })
    .await;
    stop_flipping.store(true, Ordering::Relaxed);
    let flips = flipper.await.unwrap();

    // Quiet now: wait until every stored state is where its valve is.
    wait_until("every stored state follows its valve", || async {
        (1..=METERS).all(|u| {
            let plant = if rig.plant.valve(u) == Some(true) {
                "开启"
            } else {
                "关闭"
            };
            gw.outbox
                .state(&format!("M{u}"))
                .ok()
                .flatten()
                .is_some_and(|st| st.label == plant)
        })
    })
    .await;
    wait_rounds(&gw, 3).await;

    let applied = stations.applied();
    let generations: Vec<u64> = applied.iter().map(|&(g, _)| g).collect();
    assert_eq!(generations, (1..=RELOADS + 1).collect::<Vec<_>>(), "{applied:?}");
    assert_eq!(stations.violations(), 0, "{applied:?}");
    assert_records_chain(&gw, &rig, METERS);
    let records = gw.outbox.list(100_000).unwrap();
    for unit in 1..=METERS {
        let n = records.iter().filter(|r| r.meter_no == format!("M{unit}")).count() as u32;
        let f = flips[unit as usize - 1];
        assert!(
            n <= f,
            "M{unit}: {n} records for {f} flips: a transition recorded twice"
        );
        assert!(n > 0, "M{unit}: transitions were recorded across the reloads");
    }
    gw.stop(GRACE).await;
}

// === the station thread ===

const OFFLINE_FOR: &str = r#"
[[event]]
name = "水表离线"
point = "link"
to = "离线"
for = "3s"
"#;

/// A panic in the station (a bug, raised here by the test hook) restarts it on the same channel: the
/// buses go on polling, valve changes are still recorded, `/healthz` names the panic and the restart,
/// and a meter that went offline before the panic still gets its `离线` work order when `for` has run
/// out (the new station is told the offline meters again: the bus reports a link only when it changes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_station_that_panics_is_restarted_on_the_same_channel_and_health_says_so() {
    let mut opts = MockOptions::default();
    opts.events.push("水表离线".into());
    let rig = rig(2, "none", opts).await;
    let mut config = std::fs::read_to_string(rig.site.config_path()).unwrap();
    config.push_str(OFFLINE_FOR);
    std::fs::write(rig.site.config_path(), config).unwrap();
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    let stations = gw.stations().clone();
    assert!(finding(&healthz(&gw).await, "station_restarted").is_none());

    rig.plant.silence(2, true);
    wait_until("M2 counted offline", || async {
        gw.outbox
            .state("M2")
            .ok()
            .flatten()
            .is_some_and(|st| st.offline_since.is_some())
    })
    .await;
    stations.hooks().panic_next();
    wait_until("the station panicked", || async {
        gw.liveness().station().restarts() == 1
    })
    .await;
    assert!(
        rig.panda.orders().iter().all(|o| o.event_name != "水表离线"),
        "`for` has not run out before the restart, so the new station must fire it"
    );
    let h = healthz(&gw).await;
    let (status, message) = finding(&h, "station_restarted").unwrap_or_else(|| panic!("{h:#}"));
    assert_eq!(status, "degraded");
    assert!(
        message.contains("test hook: the station panics on this cycle") && message.contains("1 restart(s)"),
        "{message}"
    );
    assert_eq!(h["status"], "degraded", "{h:#}");

    // The restarted station records changes, and the buses never stopped.
    rig.plant.flip_valve(1);
    wait_until("M1's opening and M2's 离线 work order", || async {
        let orders = rig.panda.orders();
        orders.iter().any(|o| o.event_name == "水表离线") && orders.iter().any(|o| o.event_name == "用水户开阀")
    })
    .await;
    let orders: Vec<(String, String)> = rig
        .panda
        .orders()
        .iter()
        .map(|o| (o.event_name.clone(), biz(o, "水表表号")))
        .collect();
    assert!(orders.contains(&("用水户开阀".into(), "M1".into())), "{orders:?}");
    assert_eq!(
        orders.iter().filter(|(e, _)| e == "水表离线").collect::<Vec<_>>(),
        [&("水表离线".to_string(), "M2".to_string())],
        "one 离线 work order, for M2"
    );
    wait_rounds(&gw, 3).await;
    assert_eq!(stations.generation(), 1, "restarted in place, not reloaded");
    assert_eq!(stations.violations(), 0);
    gw.stop(GRACE).await;
}

/// Panics in a burst mean the station cannot do its job in this process: `/healthz` is critical
/// (`station_failing`) and the watchdog stops pinging, so systemd restarts the whole service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_station_that_keeps_panicking_is_critical_and_stops_the_watchdog() {
    let rig = rig(2, "none", MockOptions::default()).await;
    let systemd = FakeSystemd::new();
    let gw = app::start_with(rig.site.load(), supervision(&systemd))
        .await
        .unwrap_or_else(|e| panic!("start: {e}"));
    systemd.until("READY=1").await;
    systemd.until("WATCHDOG=1").await;
    let stations = gw.stations().clone();
    // Read the socket while the panics come: its queue holds only 10 datagrams
    // (net.unix.max_dgram_qlen), and a ping every 100 ms fills it in a second; a full queue drops the
    // STATUS line the test waits for.
    let mut seen = Vec::new();
    for n in 1..=fieldgate::ops::watchdog::STATION_PANICS_FAILING as u64 {
        stations.hooks().panic_next();
        wait_until("one more panic", || {
            seen.extend(systemd.drain());
            let done = gw.liveness().station().restarts() == n;
            async move { done }
        })
        .await;
    }
    let status = match seen.iter().find(|m| m.starts_with("STATUS=Stalled")) {
        Some(m) => m.clone(),
        None => systemd.until("STATUS=Stalled").await,
    };
    assert!(status.contains("the station panicked 3 times within 10m"), "{status}");
    let withheld = gw.liveness().pings_withheld();
    wait_until("watchdog ticks withheld", || async {
        gw.liveness().pings_withheld() >= withheld + 3
    })
    .await;
    assert!(
        !systemd.drain().iter().any(|m| m == "WATCHDOG=1"),
        "no ping once failing"
    );
    let h = healthz(&gw).await;
    let (level, message) = finding(&h, "station_failing").unwrap_or_else(|| panic!("{h:#}"));
    assert_eq!((level.as_str(), h["status"].as_str()), ("critical", Some("critical")));
    assert!(message.contains("systemd restarts the service"), "{message}");
    gw.stop(GRACE).await;
}

// === the package on a minimal system ===

/// What the Debian package of each absolute command the unit may run is (`dpkg -S PATH` on Debian
/// 12), and whether it is Essential (always installed, never declared: Debian policy 3.5).
const COMMAND_PACKAGES: &[(&str, &str, bool)] = &[
    ("/bin/kill", "procps", false),
    ("/usr/bin/kill", "procps", false),
    ("/bin/sh", "dash", true),
    ("/usr/bin/env", "coreutils", true),
];

/// A minimal Debian 12 (debootstrap minbase) has no procps, so an `ExecReload=/bin/kill` fails there
/// unless the package depends on procps. Every absolute command in the unit's `Exec*=` lines is the
/// binary the package installs, or comes from a package that is Essential or declared in `depends`;
/// and the unit uses nothing newer than Debian 12's systemd 252 (no `Type=notify-reload`, 253+).
#[test]
fn every_command_the_unit_runs_is_in_the_package_or_a_declared_dependency() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("systemd/fieldgate.service")).unwrap();
    let manifest: toml::Value = toml::from_str(&std::fs::read_to_string(root.join("Cargo.toml")).unwrap()).unwrap();
    let deb = &manifest["package"]["metadata"]["deb"];
    let depends: Vec<String> = deb["depends"]
        .as_str()
        .expect("depends")
        .split([',', '|'])
        .map(|d| d.split_whitespace().next().unwrap_or_default().to_string())
        .filter(|d| !d.is_empty() && !d.starts_with('$'))
        .collect();
    let installed: Vec<String> = deb["assets"]
        .as_array()
        .expect("assets")
        .iter()
        .map(|a| {
            let (src, dest) = (a[0].as_str().unwrap(), a[1].as_str().unwrap());
            let name = Path::new(src).file_name().unwrap().to_str().unwrap();
            if dest.ends_with('/') {
                format!("/{dest}{name}")
            } else {
                format!("/{dest}")
            }
        })
        .collect();

    let mut commands = Vec::new();
    for line in unit.lines().map(str::trim) {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if key == "Type" {
            let known = ["simple", "exec", "forking", "oneshot", "dbus", "notify", "idle"];
            assert!(
                known.contains(&value),
                "Type={value} is not known to systemd 252 (Debian 12)"
            );
        }
        if !key.starts_with("Exec") {
            continue;
        }
        let command = value
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .trim_start_matches(['@', '-', ':', '+', '!']);
        assert!(command.starts_with('/'), "{key}: `{command}` must be an absolute path");
        commands.push((key.to_string(), command.to_string()));
    }
    assert!(commands.iter().any(|(k, _)| k == "ExecReload"), "the unit can reload");

    for (key, command) in &commands {
        if installed.contains(command) {
            continue;
        }
        let Some(&(_, package, essential)) = COMMAND_PACKAGES.iter().find(|(p, _, _)| p == command) else {
            panic!(
                "{key}={command}: not installed by the package; add the Debian package that ships it (`dpkg -S {command}`) \
                 to COMMAND_PACKAGES and to [package.metadata.deb] depends"
            );
        };
        assert!(
            essential || depends.iter().any(|d| d == package),
            "{key}={command} comes from {package}, which a minimal Debian lacks: declare it in [package.metadata.deb] depends ({depends:?})"
        );
        // Where this runs on Debian with the command installed, the table must agree with dpkg.
        if let Ok(out) = Command::new("dpkg-query").args(["-S", command]).output() {
            let text = String::from_utf8_lossy(&out.stdout);
            // `dash: /bin/sh`; lines about diversions name no owner.
            let owner = text
                .lines()
                .find(|l| !l.starts_with("diversion by"))
                .and_then(|l| l.split(':').next());
            if out.status.success() {
                assert_eq!(owner, Some(package), "dpkg-query -S {command}: {text}");
            }
        }
    }
}

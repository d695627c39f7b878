//! Running as a service: systemd notifications and the watchdog, reload (SIGHUP) of config and mapping,
//! SIGTERM, and a second instance on the same state directory. In-process through `app::start_with`
//! / `Gateway::reload`, and with the real `fieldgate run` binary and real signals (`kill`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fieldgate::app::{self, Supervision};
use fieldgate::mock_panda::{MockOptions, MockPanda, WorkOrder};
use fieldgate::notify::Notifier;
use fieldgate::outbox::{Limits, Outbox};
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

fn open_outbox(site: &Site) -> Outbox {
    Outbox::open(
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
        Outbox::open(
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

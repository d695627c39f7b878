//! Disk faults, most under the real `fieldgate run` binary: its state directory on a real small file
//! system (tmpfs, loop-mounted ext4) that fills up or fails with EIO while valves move and the Panda
//! server is down. What is asserted: every record stored before the fault is delivered, each meter's
//! last work order is its final valve state, no work order twice, health `critical` during the fault
//! and `ok` after, the same process recovers without an operator, and the log stays short.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};

use fieldgate::tools::mock_panda::{MockOptions, WorkOrder};
use serde_json::Value;

use crate::e2e::{flow, rig, Rig};
use crate::util::daemon::Daemon;
use crate::util::smallfs::{self, SmallFs};
use crate::util::{wait_until, DEADLINE};

const METERS: u8 = 4;
/// `max_batch` of these tests: the bound on work orders is "transitions + one batch".
const MAX_BATCH: usize = 4;
/// How long a store may take to come back once the disk is: its reopen backoff is capped at 30 s.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(120);

/// The rig's site with its state directory on `fs` and a small `min_free`.
fn site_on(rig: &Rig, fs: &SmallFs, min_free: &str) {
    let state = fs.path().join("state");
    let text = std::fs::read_to_string(rig.site.config_path())
        .unwrap()
        .replace("state_dir = \"state\"", &format!("state_dir = \"{}\"", state.display()))
        .replace("max_batch = 50", &format!("max_batch = {MAX_BATCH}"))
        + &format!("\n[outbox]\nmin_free = \"{min_free}\"\n");
    std::fs::write(rig.site.config_path(), text).unwrap();
}

/// The daemon's admin address, from its "Admin API listening." log line.
async fn admin_addr(d: &Daemon) -> String {
    d.wait_log("Admin API listening.", 1).await;
    let log = d.dump();
    let line = log.lines().find(|l| l.contains("Admin API listening.")).unwrap();
    let v: Value = serde_json::from_str(line).unwrap();
    v["fields"]["addr"]
        .as_str()
        .unwrap_or_else(|| panic!("no addr in {line}"))
        .to_string()
}

async fn health(addr: &str) -> Value {
    let r = reqwest::get(format!("http://{addr}/healthz"))
        .await
        .expect("GET /healthz");
    r.json().await.expect("health JSON")
}

/// Poll `/healthz` until `done` holds for an answer (each answer is shown to it), within `deadline`.
async fn health_until(addr: &str, what: &str, deadline: Duration, mut done: impl FnMut(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let h = health(addr).await;
        if done(&h) {
            return h;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for: {what}; last health {h}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until the recorder has applied a cycle that began after `since`: the one before it, and so
/// every commit logged before `since`, has then been synced (the recorder fsyncs each cycle before it
/// takes the next) or has failed the store. Polls alone do not show it: the buses run ahead of a
/// recorder whose fsync is slow.
async fn wait_recorded_since(addr: &str, since: Instant) {
    wait_until("the recorder applied a cycle after the commits", || async {
        let asked = since.elapsed().as_secs_f64();
        let meters: Value = reqwest::get(format!("http://{addr}/meters"))
            .await
            .expect("GET /meters")
            .json()
            .await
            .expect("meters JSON");
        let ages: Vec<f64> = meters
            .as_array()
            .map(|a| a.iter().filter_map(|m| m["last_sample_age_seconds"].as_f64()).collect())
            .unwrap_or_default();
        ages.len() == METERS as usize && ages.iter().all(|age| *age < asked)
    })
    .await;
}

fn codes(h: &Value) -> BTreeSet<String> {
    h["reasons"]
        .as_array()
        .map(|a| a.iter().filter_map(|r| r["code"].as_str().map(String::from)).collect())
        .unwrap_or_default()
}

fn polls(rig: &Rig) -> u64 {
    (1..=METERS).map(|u| rig.plant.requests(u)).sum()
}

async fn wait_polls(rig: &Rig, more: u64) {
    let start = polls(rig);
    wait_until("the gateway polls", || async { polls(rig) >= start + more }).await;
}

/// Flip every meter once, each time waiting until the gateway has queued the transition.
async fn flip_all(rig: &Rig, d: &Daemon, flips: &mut usize) {
    for unit in 1..=METERS {
        let queued = d.count("Valve transition queued.");
        rig.plant.flip_valve(unit);
        *flips += 1;
        d.wait_log("Valve transition queued.", queued + 1).await;
    }
}

/// Flip every meter once while commits are refused: the gateway keeps polling but records nothing.
async fn flip_all_unrecorded(rig: &Rig, flips: &mut usize) {
    for unit in 1..=METERS {
        rig.plant.flip_valve(unit);
        *flips += 1;
        wait_polls(rig, 3 * METERS as u64).await;
    }
}

fn biz(o: &WorkOrder, key: &str) -> String {
    o.biz.get(key).and_then(Value::as_str).unwrap_or_default().to_string()
}

fn label(open: bool) -> &'static str {
    if open {
        "开启"
    } else {
        "关闭"
    }
}

/// (meter, state, flow) of every meter as it stands: the records the last flips made.
fn standing(rig: &Rig) -> Vec<(String, String, String)> {
    (1..=METERS)
        .map(|u| {
            (
                format!("M{u}"),
                label(rig.plant.valve(u).unwrap()).to_string(),
                flow(&rig.plant, u),
            )
        })
        .collect()
}

/// Deliver everything, then check the outcome against what the plant did.
async fn settle_and_check(rig: &Rig, addr: &str, stored_before: &[(String, String, String)], flips: usize) {
    rig.panda.set_unavailable(false);
    let final_states: BTreeMap<String, String> = (1..=METERS)
        .map(|u| (format!("M{u}"), label(rig.plant.valve(u).unwrap()).to_string()))
        .collect();
    wait_until("each meter's final state delivered and the outbox empty", || async {
        let orders = rig.panda.orders();
        let last_ok = final_states.iter().all(|(meter, state)| {
            orders
                .iter()
                .rev()
                .find(|o| biz(o, "水表表号") == *meter)
                .map(|o| biz(o, "阀门当前状态"))
                == Some(state.clone())
        });
        last_ok && health(addr).await["outbox"]["records"] == 0
    })
    .await;
    wait_until("health ok", || async { health(addr).await["status"] == "ok" }).await;

    let orders = rig.panda.orders();
    let unique: HashSet<&str> = orders.iter().map(|o| o.biz_data.as_str()).collect();
    println!(
        "{flips} flips, {} work orders, {} duplicates",
        orders.len(),
        orders.len() - unique.len()
    );
    assert_eq!(orders.len(), unique.len(), "no work order twice");
    assert!(
        orders.len() <= flips + MAX_BATCH,
        "{} work orders for {flips} transitions (bound: transitions + one batch of {MAX_BATCH})",
        orders.len()
    );
    for (meter, state, flow) in stored_before {
        assert!(
            orders.iter().any(|o| biz(o, "水表表号") == *meter
                && biz(o, "阀门当前状态") == *state
                && biz(o, "累计流量") == *flow),
            "the record stored before the fault ({meter} {state} flow {flow}) was not delivered"
        );
    }
    // Records of one meter alternate (each is a change from the stored state).
    for unit in 1..=METERS {
        let meter = format!("M{unit}");
        let states: Vec<String> = orders
            .iter()
            .filter(|o| biz(o, "水表表号") == meter)
            .map(|o| biz(o, "阀门当前状态"))
            .collect();
        for pair in states.windows(2) {
            assert_ne!(pair[0], pair[1], "{meter}: the same state twice in a row: {states:?}");
        }
    }
}

/// Error and warning lines of the daemon's log.
fn loud_lines(d: &Daemon) -> usize {
    d.count("\"level\":\"ERROR\"") + d.count("\"level\":\"WARN\"")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_loses_nothing_sends_nothing_twice_and_the_gateway_recovers_by_itself() {
    let Some(fs) = smallfs::tmpfs(24 << 20) else { return };
    let rig = rig(METERS as usize, "token", MockOptions::default()).await;
    site_on(&rig, &fs, "1MiB");
    let mut d = Daemon::spawn(&rig.site.config_path(), &[]);
    let addr = admin_addr(&d).await;
    d.wait_log("Baseline valve state stored.", METERS as usize).await;

    // Server down, valves move: records wait in the outbox.
    rig.panda.set_unavailable(true);
    let mut flips = 0;
    flip_all(&rig, &d, &mut flips).await;
    let committed = Instant::now();
    let stored_before = standing(&rig);
    wait_until("4 records queued", || async {
        health(&addr).await["outbox"]["records"] == METERS
    })
    .await;
    wait_recorded_since(&addr, committed).await;

    // Another program takes the last bytes of the disk; valves go on moving.
    let filler = fs.fill();
    let mut seen = BTreeSet::new();
    let filled = Instant::now();
    health_until(&addr, "health critical about the disk", DEADLINE, |h| {
        seen.extend(codes(h));
        h["status"] == "critical" && (seen.contains("disk_low") || seen.contains("store_failed"))
    })
    .await;
    println!("critical {} ms after the disk filled", filled.elapsed().as_millis());
    for _ in 0..3 {
        flip_all_unrecorded(&rig, &mut flips).await;
        let h = health(&addr).await;
        seen.extend(codes(&h));
        assert_eq!(h["status"], "critical", "while the disk is full: {h}");
    }
    let queued_while_full = d.count("Valve transition queued.");

    // Space comes back: the gateway takes up by itself, then the server comes back.
    filler.release();
    let released = Instant::now();
    wait_until("health no longer critical about the disk", || async {
        let c = codes(&health(&addr).await);
        !c.contains("disk_low") && !c.contains("store_failed")
    })
    .await;
    let recovery = released.elapsed();
    // Three flips each while full: every meter now stands opposite to its last stored record, a
    // change the gateway must see again by itself.
    wait_until("the standing states recorded again", || async {
        d.count("Valve transition queued.") >= queued_while_full + METERS as usize
    })
    .await;
    settle_and_check(&rig, &addr, &stored_before, flips).await;

    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the same process recovered:\n{}",
        d.dump()
    );
    let failures = d.count("The state database failed");
    let loud = loud_lines(&d);
    println!(
        "disk full: health codes seen {seen:?}; store failures {failures}; recovered {} ms after space returned; {loud} error/warning lines",
        recovery.as_millis()
    );
    assert!(failures <= 1, "a failure is logged once:\n{}", d.dump());
    assert!(loud <= 25, "{loud} error/warning lines:\n{}", d.dump());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fails_with_eio_and_comes_back_is_reopened_by_the_same_process() {
    let Some(mut fs) = smallfs::ext4(32 << 20) else { return };
    let rig = rig(METERS as usize, "token", MockOptions::default()).await;
    site_on(&rig, &fs, "1MiB");
    let mut d = Daemon::spawn(&rig.site.config_path(), &[]);
    let addr = admin_addr(&d).await;
    d.wait_log("Baseline valve state stored.", METERS as usize).await;

    let mut flips = 0;
    flip_all(&rig, &d, &mut flips).await;
    wait_until("the first flips delivered", || async {
        rig.panda.orders().len() == METERS as usize
    })
    .await;

    rig.panda.set_unavailable(true);
    flip_all(&rig, &d, &mut flips).await;
    let committed = Instant::now();
    let stored_before = standing(&rig);
    wait_until("4 records queued", || async {
        health(&addr).await["outbox"]["records"] == METERS
    })
    .await;
    wait_recorded_since(&addr, committed).await;

    // The disk dies (every read, write and fsync: EIO) while valves move.
    fs.shutdown();
    // Each transition makes a commit and its fsync, which fail now.
    flip_all_unrecorded(&rig, &mut flips).await;
    let h = health_until(&addr, "health critical: store_failed", DEADLINE, |h| {
        h["status"] == "critical" && codes(h).contains("store_failed")
    })
    .await;
    let reason = h["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["code"] == "store_failed")
        .unwrap()
        .clone();
    println!("store_failed: {reason}");
    // M1 once more while the disk is dead: three flips in all during the fault, the others one.
    for _ in 0..2 {
        rig.plant.flip_valve(1);
        flips += 1;
        wait_polls(&rig, 3 * METERS as u64).await;
    }
    assert!(
        codes(&health(&addr).await).contains("store_failed"),
        "still failed while the disk is dead"
    );

    // The disk comes back (mounted again at the same path): the same process reopens it.
    fs.remount();
    let back = Instant::now();
    health_until(&addr, "the store reopened", RECOVERY_DEADLINE, |h| {
        !codes(h).contains("store_failed")
    })
    .await;
    let recovery = back.elapsed();
    // Records detected while the disk was dead were never durable: the meters' standing states are
    // detected again from what the disk kept. Records stored before the fault must all arrive.
    settle_and_check(&rig, &addr, &stored_before, flips).await;

    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the same process recovered:\n{}",
        d.dump()
    );
    assert!(d.count("The state database works again") >= 1, "{}", d.dump());
    let failures = d.count("The state database failed");
    let loud = loud_lines(&d);
    println!(
        "EIO: store failures {failures}; reopened {} ms after the disk came back; {loud} error/warning lines",
        recovery.as_millis()
    );
    assert!(failures <= 2, "a failure is logged once per episode:\n{}", d.dump());
    assert!(loud <= 25, "{loud} error/warning lines:\n{}", d.dump());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_and_a_corrupt_state_are_set_aside_and_everything_else_goes_on() {
    let rig = rig(3, "token", MockOptions::default()).await;
    rig.panda.set_unavailable(true);
    let gw = rig.start().await;
    crate::e2e::wait_for_baselines(&gw).await;
    for unit in 1..=3 {
        rig.plant.flip_valve(unit);
    }
    wait_until("3 records queued", || async { gw.outbox.len() == 3 }).await;
    let queued = gw.outbox.list(10).unwrap();
    gw.stop(Duration::from_secs(10)).await;

    // A failing card damages one queued record (M2's) and one meter's state (M3's).
    let m2 = queued.iter().find(|r| r.meter_no == "M2").unwrap().id;
    {
        let o =
            fieldgate::store::Store::open(&rig.site.load().site.state_dir, fieldgate::config::Limits::DEFAULT).unwrap();
        o.damage(fieldgate::store::DamageTarget::Record(m2), b"\x01\xff\xfe")
            .unwrap();
        o.damage(fieldgate::store::DamageTarget::State("M3"), b"{\"raw\":1,\"lab")
            .unwrap();
        o.sync().await.unwrap();
    }

    rig.panda.set_unavailable(false);
    let gw = rig.start().await;
    // The other records are delivered: M1's and M3's (M3's record is sound; only its state is not).
    let orders = crate::e2e::wait_orders(&rig.panda, 2).await;
    let meters: BTreeSet<String> = orders.iter().map(|o| biz(o, "水表表号")).collect();
    assert_eq!(meters, BTreeSet::from(["M1".to_string(), "M3".to_string()]));
    wait_until("the outbox drained", || async { gw.outbox.is_empty() }).await;
    // M3 is polled again: its state starts from a baseline, and its next transition is delivered.
    crate::e2e::wait_rounds(&gw, 3).await;
    let open = rig.plant.flip_valve(3).unwrap();
    let orders = crate::e2e::wait_orders(&rig.panda, 3).await;
    let last = orders.last().unwrap();
    assert_eq!(
        (biz(last, "水表表号"), biz(last, "阀门当前状态")),
        ("M3".to_string(), label(open).to_string())
    );

    // The bad entries are kept and listed, through the admin API too.
    let listed: BTreeSet<String> = gw.outbox.corrupt(10).unwrap().into_iter().map(|c| c.entry).collect();
    assert_eq!(listed, BTreeSet::from([format!("record {m2}"), "state M3".to_string()]));
    let addr = gw.admin_addr.unwrap();
    let body: Value = reqwest::get(format!("http://{addr}/outbox/corrupt"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entries: BTreeSet<String> = body
        .as_array()
        .or_else(|| body["entries"].as_array())
        .unwrap_or_else(|| panic!("a list of entries: {body}"))
        .iter()
        .map(|e| e["entry"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(entries, listed);
    let metrics = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.lines().any(|l| l == "fieldgate_outbox_corrupt_entries 2"),
        "{metrics}"
    );
    assert!(codes(&health(&addr.to_string()).await).contains("corrupt_entries"));
    gw.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_that_cannot_be_stored_stops_delivery_and_nothing_is_sent_twice() {
    let Some(mut fs) = smallfs::ext4(32 << 20) else { return };
    let rig = rig(METERS as usize, "token", MockOptions::default()).await;
    site_on(&rig, &fs, "1MiB");
    // A request timeout well above the slow answer below: the answer arrives, late.
    let text = std::fs::read_to_string(rig.site.config_path())
        .unwrap()
        .replace("timeout = \"5s\"", "timeout = \"30s\"");
    std::fs::write(rig.site.config_path(), text).unwrap();
    let d = Daemon::spawn(&rig.site.config_path(), &[]);
    let addr = admin_addr(&d).await;
    d.wait_log("Baseline valve state stored.", METERS as usize).await;

    // The server applies M1's work order at once but answers only after 8 s; meanwhile the disk dies,
    // so the acknowledgement of that answer cannot be stored.
    rig.panda
        .push_fault(fieldgate::tools::mock_panda::Fault::SlowAnswer(Duration::from_secs(8)));
    rig.plant.flip_valve(1);
    wait_until("M1's work order applied", || async { rig.panda.orders().len() == 1 }).await;
    fs.shutdown();
    d.wait_log("Cannot store the outcome of a delivery", 1).await;
    health_until(&addr, "store_failed", DEADLINE, |h| codes(h).contains("store_failed")).await;
    // Valves move; nothing is sent while the acknowledgement is not stored.
    let requests = rig.panda.requests();
    rig.plant.flip_valve(2);
    wait_polls(&rig, 6 * METERS as u64).await;
    assert_eq!(
        rig.panda.requests(),
        requests,
        "a request was sent while an acknowledgement was not stored"
    );

    fs.remount();
    // M2's flip (never stored) is detected again and delivered; M1's work order is not sent again.
    wait_until("M2 delivered", || async {
        rig.panda.orders().iter().any(|o| biz(o, "水表表号") == "M2")
    })
    .await;
    health_until(&addr, "health ok", DEADLINE, |h| h["status"] == "ok").await;
    let orders: Vec<(String, String)> = rig
        .panda
        .orders()
        .iter()
        .map(|o| (biz(o, "水表表号"), biz(o, "阀门当前状态")))
        .collect();
    assert_eq!(
        orders,
        vec![
            ("M1".to_string(), "开启".to_string()),
            ("M2".to_string(), "开启".to_string())
        ],
        "each work order exactly once:\n{}",
        d.dump()
    );
    assert_eq!(d.count("Cannot store the outcome of a delivery"), 1, "logged once");
    assert_eq!(d.count("Stored after the store recovered"), 1, "{}", d.dump());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_on_a_full_disk_polls_and_opens_its_store_once_space_returns() {
    let Some(fs) = smallfs::tmpfs(24 << 20) else { return };
    let rig = rig(METERS as usize, "token", MockOptions::default()).await;
    site_on(&rig, &fs, "1MiB");
    rig.panda.set_unavailable(true);
    let mut d = Daemon::spawn(&rig.site.config_path(), &[]);
    let addr = admin_addr(&d).await;
    d.wait_log("Baseline valve state stored.", METERS as usize).await;
    let mut flips = 0;
    flip_all(&rig, &d, &mut flips).await;
    let committed = Instant::now();
    let stored_before = standing(&rig);
    wait_recorded_since(&addr, committed).await;
    // A power cut; when the gateway boots again, the disk is full (sled cannot even open its log).
    d.signal("KILL");
    d.wait_exit();
    let filler = fs.fill();

    let mut d = Daemon::spawn(&rig.site.config_path(), &[]);
    let addr = admin_addr(&d).await;
    let h = health_until(&addr, "store_failed", DEADLINE, |h| codes(h).contains("store_failed")).await;
    assert_eq!(h["status"], "critical", "{h}");
    // It polls meanwhile, and a valve that moves now is seen once the store works.
    let polled = polls(&rig);
    rig.plant.flip_valve(2);
    flips += 1;
    wait_polls(&rig, 4 * METERS as u64).await;
    assert!(polls(&rig) > polled);
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the gateway keeps running:\n{}",
        d.dump()
    );

    filler.release();
    health_until(&addr, "the store opened", RECOVERY_DEADLINE, |h| {
        !codes(h).contains("store_failed")
    })
    .await;
    settle_and_check(&rig, &addr, &stored_before, flips).await;
    assert_eq!(d.count("The state database failed"), 1, "{}", d.dump());
}

//! `fieldgate demo`: the whole product in one process, for a newcomer. A simulated Modbus TCP slave
//! with four meters, a mock Panda server and the real gateway (embedded config from `config/demo/`)
//! run on free loopback ports. Every few seconds one scripted thing happens in the field (a valve
//! opens and closes, a meter dies, a battery drops, water flows through a shut valve, the dead
//! meter answers again, a valve reports a fault; then valves flip round robin), and each work order
//! that reaches the server is printed in a readable form.
//!
//! The state directory is a fresh temporary folder, removed at the end. Never: touches a real site's
//! config, state or devices; everything runs on loopback and in that folder.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::config::{self, Transport};
use crate::tools::mock_panda::{MockOptions, MockPanda, WorkOrder};
use crate::tools::simulator::{serve_tcp, Plant};

const DEMO_CONFIG: &str = include_str!("../../config/demo/fieldgate.toml");
const DEMO_MAPPING: &str = include_str!("../../config/demo/mapping.csv");

/// Arguments of `fieldgate demo`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct DemoArgs {
    /// Stop after this long (e.g. `30s`); default: run until Ctrl-C.
    #[arg(long = "for", value_parser = humantime::parse_duration)]
    run_for: Option<Duration>,
    /// How often something happens in the simulated field (the script, then valve flips).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    flip_every: Duration,
}

pub(crate) async fn demo_main(args: DemoArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("fieldgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = demo_in(&dir, &args).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn demo_in(dir: &std::path::Path, args: &DemoArgs) -> anyhow::Result<()> {
    std::fs::write(dir.join("mapping.csv"), DEMO_MAPPING).context("writing the demo mapping")?;
    let config_path: PathBuf = dir.join("fieldgate.toml");
    let mut cfg = config::parse(&config_path, DEMO_CONFIG, &None).map_err(|e| anyhow::anyhow!("{e}"))?;

    let plant = Plant::with_meters(cfg.meters.len() as u8);
    let modbus = TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the simulator")?;
    let modbus_addr = modbus.local_addr()?;
    let _sim = serve_tcp(modbus, plant.clone());
    let mut events: Vec<String> = Vec::new();
    for e in &cfg.events {
        if !events.contains(&e.name) {
            events.push(e.name.clone());
        }
    }
    let panda = MockPanda::start(
        TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the mock server")?,
        MockOptions {
            token_ttl: Duration::from_secs(20),
            events,
            ..MockOptions::default()
        },
    );
    for bus in &mut cfg.buses {
        bus.transport = Transport::Tcp(modbus_addr.to_string());
    }
    cfg.panda.base_url = panda.base_url();

    println!("fieldgate demo");
    println!(
        "  simulated Modbus TCP slave with {} meters on {modbus_addr}",
        cfg.meters.len()
    );
    println!(
        "  mock Panda WorkFlow server on {} (tokens expire every 20 s)",
        panda.base_url()
    );
    println!("  gateway polling every 500 ms; state in {}", dir.display());
    println!(
        "  {} event rules: {}",
        cfg.events.len(),
        cfg.events
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "Every {} something happens in the field; what the rules in config/demo/fieldgate.toml make of it\n\
         arrives at the server as a work order.",
        humantime::format_duration(args.flip_every)
    );
    println!(
        "Stop with Ctrl-C{}.\n",
        args.run_for
            .map(|d| format!(" (or after {})", humantime::format_duration(d)))
            .unwrap_or_default()
    );

    let meters: Vec<(u8, String)> = cfg.meters.iter().map(|m| (m.unit, m.meter_no.clone())).collect();
    let gateway = crate::app::start(cfg).await.context("starting the gateway")?;
    let deadline = args.run_for.map(|d| Instant::now() + d);
    let mut flips = tokio::time::interval(args.flip_every);
    flips.tick().await; // the first tick is immediate: let the gateway take its baseline first
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    let mut shown = 0usize;
    let mut step = 0usize;
    let stop = crate::app::signals::shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            () = sleep_until(deadline) => break,
            _ = flips.tick() => {
                println!("field   : {}", field_step(&plant, &meters, step));
                step += 1;
            }
            _ = poll.tick() => {
                let orders = panda.orders();
                for order in orders.iter().skip(shown) {
                    println!("{}", work_order_line(order));
                }
                shown = orders.len();
            }
        }
    }
    let queued = gateway.stop(Duration::from_secs(5)).await;
    println!(
        "\n{} work order(s) delivered; {queued} still queued; {} login(s) to the server.",
        panda.orders().len(),
        panda.logins()
    );
    panda.stop().await;
    Ok(())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Do step `n` of the demo script in the simulated field; what was done, in words.
///
/// One of each event kind first (meters 1–4 by position), then valves flip round robin.
fn field_step(plant: &Plant, meters: &[(u8, String)], n: usize) -> String {
    let meter = |i: usize| meters.get(i % meters.len().max(1)).cloned().unwrap_or_default();
    let valve = |open: bool| if open { "开启 (open)" } else { "关闭 (closed)" };
    let flip = |i: usize| {
        let (unit, no) = meter(i);
        match plant.flip_valve(unit) {
            Some(open) => format!("valve of meter {no} (unit {unit}) turned {}", valve(open)),
            None => format!("meter {no} (unit {unit}) is not simulated"),
        }
    };
    match n {
        0 => flip(0),
        1 => {
            let (unit, no) = meter(3);
            plant.silence(unit, true);
            format!("meter {no} (unit {unit}) stops answering")
        }
        2 => flip(0),
        3 => {
            let (unit, no) = meter(1);
            plant.set_battery(unit, 320);
            format!("battery of meter {no} (unit {unit}) drops to 3.20 V")
        }
        4 => {
            let (unit, no) = meter(2);
            plant.add_flow(unit, 5);
            format!("water flows through the shut valve of meter {no} (unit {unit}): +0.05 m³")
        }
        5 => {
            let (unit, no) = meter(3);
            plant.silence(unit, false);
            format!("meter {no} (unit {unit}) answers again")
        }
        6 => {
            let (unit, no) = meter(1);
            plant.fault_valve(unit);
            format!("valve of meter {no} (unit {unit}) reports a fault")
        }
        _ => flip(n - 7),
    }
}

fn work_order_line(o: &WorkOrder) -> String {
    let get = |k: &str| o.field(k);
    let note = match o.field("事件说明") {
        "-" => String::new(),
        n => format!("  ({n})"),
    };
    format!(
        "panda   : work order {} for meter {}, customer {} {} ({}): valve {}, flow {} m³, battery {} V{note}",
        o.event_name,
        get("水表表号"),
        get("用户编号"),
        get("用户名称"),
        get("用户地址"),
        get("阀门当前状态"),
        get("累计流量"),
        get("电池电压"),
    )
}

//! `fieldgate demo`: the whole product in one process, for a newcomer. A simulated Modbus TCP slave
//! with four meters, a mock Panda server and the real gateway (embedded config from `config/demo/`)
//! run on free loopback ports; valves are flipped every few seconds and each work order that reaches
//! the server is printed in a readable form.
//!
//! The state directory is a fresh temporary folder, removed at the end.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::config::{self, Transport};
use crate::mock_panda::{MockOptions, MockPanda, WorkOrder};
use crate::simulator::{serve_tcp, Plant};

const DEMO_CONFIG: &str = include_str!("../config/demo/fieldgate.toml");
const DEMO_MAPPING: &str = include_str!("../config/demo/mapping.csv");

/// Arguments of `fieldgate demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Stop after this long (e.g. `30s`); default: run until Ctrl-C.
    #[arg(long = "for", value_parser = humantime::parse_duration)]
    pub run_for: Option<Duration>,
    /// How often a valve is flipped in the simulator.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub flip_every: Duration,
}

/// Run the demo.
pub async fn demo_main(args: DemoArgs) -> anyhow::Result<()> {
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
    let panda = MockPanda::start(
        TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the mock server")?,
        MockOptions {
            token_ttl: Duration::from_secs(20),
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
        "A valve is flipped every {}; each flip becomes a work order.",
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
    let mut next = 0usize;
    let stop = crate::app::shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            () = sleep_until(deadline) => break,
            _ = flips.tick() => {
                if let Some((unit, meter_no)) = meters.get(next % meters.len().max(1)) {
                    next += 1;
                    if let Some(open) = plant.flip_valve(*unit) {
                        println!("field   : valve of meter {meter_no} (unit {unit}) turned {}", if open { "开启 (open)" } else { "关闭 (closed)" });
                    }
                }
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

fn work_order_line(o: &WorkOrder) -> String {
    let get = |k: &str| o.biz.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_string();
    format!(
        "panda   : work order {:<6} meter {}  customer {} {} ({})  valve {}  flow {} m³",
        o.event_name,
        get("水表表号"),
        get("用户编号"),
        get("用户名称"),
        get("用户地址"),
        get("阀门当前状态"),
        get("累计流量"),
    )
}

//! `fieldgate simulate`: serve simulated meters for commissioning and demos, on the transport chosen on
//! the command line, with a periodic valve flip, the admin HTTP API (`admin.rs`) and commands read from
//! stdin ([`command`]: flip, fault, battery, flow, silence, late, flaky, status...).
//!
//! Never: stops on the end of stdin (under systemd there is none); only Ctrl-C or SIGTERM stop it.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::AsyncBufReadExt as _;
use tokio::net::TcpListener;
use tokio_serial::SerialStream;
use tracing::warn;

use super::admin::admin_router;
use super::serve::{serve_rtu_over_tcp, serve_rtu_path_paced, serve_tcp, AbortOnDrop, Pace};
use super::{Fault, Flaky, Plant, VALVE_FAULT};

/// `fieldgate simulate`: serve simulated meters for commissioning and demos.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SimulateArgs {
    /// Serve Modbus TCP on this address, e.g. 127.0.0.1:5020.
    #[arg(long, value_name = "ADDR")]
    tcp: Option<SocketAddr>,
    /// Serve Modbus RTU over TCP (like an RS-485 device server) on this address.
    #[arg(long, value_name = "ADDR")]
    rtu_over_tcp: Option<SocketAddr>,
    /// Serve Modbus RTU on this serial device, e.g. a socat pty link.
    #[arg(long, value_name = "PATH")]
    serial: Option<String>,
    /// Baud rate for --serial.
    #[arg(long, value_name = "N", default_value_t = 9600)]
    baud: u32,
    /// Pace the serial bytes at this line rate (8N1), for a pty that has no baud rate of its own:
    /// answers take their wire time, requests their wire time plus 3.5 characters. Benchmarks only.
    #[arg(long, value_name = "BAUD")]
    pace_baud: Option<u32>,
    /// Simulate meters with units 1..=N.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=247))]
    meters: u8,
    /// Flip one valve (round robin over the units) this often, e.g. "10s".
    #[arg(long, value_name = "DUR", value_parser = humantime::parse_duration)]
    flip_every: Option<Duration>,
    /// Serve the admin HTTP API here: POST /units/{unit}/flip|fault|silence|wake,
    /// POST /units/{unit}/battery/{volts}, POST /units/{unit}/flow/{m3},
    /// POST /units/{unit}/flaky/{percent}?late_ms=MS&seed=N, GET /units.
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,
}

/// Run the simulator until Ctrl-C (or SIGTERM).
pub(crate) async fn simulate_main(args: SimulateArgs) -> anyhow::Result<()> {
    let chosen = [args.tcp.is_some(), args.rtu_over_tcp.is_some(), args.serial.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if chosen != 1 {
        anyhow::bail!("give exactly one of --tcp ADDR, --rtu-over-tcp ADDR or --serial PATH");
    }
    let plant = Plant::with_meters(args.meters);
    let mut tasks: Vec<AbortOnDrop> = Vec::new();
    if let Some(addr) = args.tcp {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        println!("Serving Modbus TCP on {addr}, units 1..={}.", args.meters);
        tasks.push(AbortOnDrop(serve_tcp(listener, plant.clone())));
    }
    if let Some(addr) = args.rtu_over_tcp {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        println!("Serving Modbus RTU over TCP on {addr}, units 1..={}.", args.meters);
        tasks.push(AbortOnDrop(serve_rtu_over_tcp(listener, plant.clone())));
    }
    if let Some(path) = &args.serial {
        // Fail early on an obvious mistake; the server itself keeps reopening the device.
        drop(
            SerialStream::open(&tokio_serial::new(path.as_str(), args.baud))
                .with_context(|| format!("cannot open serial device {path}"))?,
        );
        println!(
            "Serving Modbus RTU on {path} at {} baud, units 1..={}.",
            args.baud, args.meters
        );
        let pace = args.pace_baud.and_then(Pace::baud);
        tasks.push(AbortOnDrop(serve_rtu_path_paced(
            path.clone(),
            args.baud,
            pace,
            plant.clone(),
        )));
    }
    if let Some(addr) = args.admin {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for the admin API"))?;
        println!("Admin API on http://{addr}/units");
        let app = admin_router(plant.clone());
        tasks.push(AbortOnDrop(tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                warn!(message = "Simulator admin API stopped.", %error);
            }
        })));
    }
    if let Some(every) = args.flip_every {
        let plant = plant.clone();
        tasks.push(AbortOnDrop(tokio::spawn(async move {
            let mut next = 0usize;
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let units = plant.units();
                if let Some(&unit) = units.get(next % units.len().max(1)) {
                    if let Some(open) = plant.flip_valve(unit) {
                        println!("unit {unit}: valve {} (periodic flip)", valve_word(open));
                    }
                }
                next = next.wrapping_add(1);
            }
        })));
    }
    let stdin_plant = plant.clone();
    tasks.push(AbortOnDrop(tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        // EOF (no terminal, e.g. under systemd) just ends the command reader, not the simulator.
        while let Ok(Some(line)) = lines.next_line().await {
            if !line.trim().is_empty() {
                println!("{}", command(&stdin_plant, &line));
            }
        }
    })));
    println!("Type `help` for commands; Ctrl-C stops.");
    shutdown_signal().await;
    println!("Stopping.");
    drop(tasks);
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

pub(super) fn valve_word(open: bool) -> &'static str {
    if open {
        "开启 (open)"
    } else {
        "关闭 (closed)"
    }
}

const HELP: &str = "commands:
  flip U               flip the valve of unit U (adds 1.23 m³ to its flow; clears a fault)
  fault U              the valve of unit U reports a fault (holding 3 = 2)
  battery U VOLTS      set the battery voltage of unit U, e.g. battery 2 3.2
  flow U M3            add M3 m³ to the flow of unit U without moving its valve, e.g. flow 3 0.05
  silence U            unit U stops answering
  wake U               unit U answers again
  set U holding A V    set holding register A of unit U to V
  late U MS            answer the next request to U after MS milliseconds
  garbage U            garble the next answer of U
  wrong-count U        answer the next read of U with one item fewer
  flaky U PCT [MS] [SEED]
                       unit U fails PCT % of its requests at random: half answered MS ms late
                       (default 1000), half not at all; the same SEED fails the same requests;
                       `flaky U 0` ends it
  status               show every unit
  help                 this text";

/// Run one stdin command against the plant; the text says what was done.
fn command(plant: &Plant, line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let unit_arg = |i: usize| -> Result<u8, String> {
        let w = words.get(i).ok_or("missing unit")?;
        let u: u8 = w.parse().map_err(|_| format!("`{w}` is not a unit id"))?;
        if plant.unit(u).is_none() {
            return Err(format!("no unit {u}"));
        }
        Ok(u)
    };
    let result: Result<String, String> = match words.first().copied().unwrap_or("") {
        "flip" => unit_arg(1).map(|u| match plant.flip_valve(u) {
            Some(open) => format!("unit {u}: valve {}", valve_word(open)),
            None => format!("unit {u} has no valve coil"),
        }),
        "fault" => unit_arg(1).map(|u| {
            plant.fault_valve(u);
            format!("unit {u}: valve reports 故障 (fault)")
        }),
        "battery" => (|| {
            let u = unit_arg(1)?;
            let raw = words
                .get(2)
                .and_then(|w| hundredths(w))
                .and_then(|r| u16::try_from(r).ok())
                .ok_or("VOLTS must be a number 0..655.35, e.g. 3.2")?;
            plant.set_battery(u, raw);
            Ok(format!("unit {u}: 电池电压 {}.{:02} V", raw / 100, raw % 100))
        })(),
        "flow" => (|| {
            let u = unit_arg(1)?;
            let raw = words
                .get(2)
                .and_then(|w| hundredths(w))
                .and_then(|r| u32::try_from(r).ok())
                .ok_or("M3 must be a positive number, e.g. 0.05")?;
            let flow = plant.add_flow(u, raw).unwrap_or(0);
            Ok(format!(
                "unit {u}: 累计流量 {}.{:02} m³ (+{}.{:02}, valve not moved)",
                flow / 100,
                flow % 100,
                raw / 100,
                raw % 100
            ))
        })(),
        "silence" => unit_arg(1).map(|u| {
            plant.silence(u, true);
            format!("unit {u}: silenced (no answers)")
        }),
        "wake" => unit_arg(1).map(|u| {
            plant.silence(u, false);
            format!("unit {u}: answering again")
        }),
        "set" => (|| {
            let u = unit_arg(1)?;
            if words.get(2) != Some(&"holding") {
                return Err("usage: set U holding A V".to_string());
            }
            let a: u16 = words.get(3).and_then(|w| w.parse().ok()).ok_or("A must be 0..65535")?;
            let v: u16 = words.get(4).and_then(|w| w.parse().ok()).ok_or("V must be 0..65535")?;
            if plant.set_holding(u, a, v) {
                Ok(format!("unit {u}: holding {a} = {v}"))
            } else {
                Err(format!("unit {u} has no holding register {a}"))
            }
        })(),
        "late" => (|| {
            let u = unit_arg(1)?;
            let ms: u64 = words.get(2).and_then(|w| w.parse().ok()).ok_or("MS must be a number")?;
            plant.inject(u, Fault::Late(Duration::from_millis(ms)));
            Ok(format!("unit {u}: next answer {ms} ms late"))
        })(),
        "flaky" => (|| {
            let u = unit_arg(1)?;
            let pct: f64 = words
                .get(2)
                .and_then(|w| w.parse().ok())
                .filter(|p| (0.0..=100.0).contains(p))
                .ok_or("PCT must be a number 0..100")?;
            let ms: u64 = match words.get(3) {
                Some(w) => w.parse().map_err(|_| "MS must be a number of milliseconds")?,
                None => 1000,
            };
            let seed: u64 = match words.get(4) {
                Some(w) => w.parse().map_err(|_| "SEED must be a number")?,
                None => rand::random(),
            };
            if pct == 0.0 {
                plant.set_flaky(u, None);
                return Ok(format!("unit {u}: answers every request again"));
            }
            plant.set_flaky(u, Some(flaky(pct, ms, seed)));
            Ok(format!(
                "unit {u}: fails {pct} % of its requests at random (half answered {ms} ms late, half not at all), seed {seed}"
            ))
        })(),
        "garbage" => unit_arg(1).map(|u| {
            plant.inject(u, Fault::Garbage);
            format!("unit {u}: next answer garbled")
        }),
        "wrong-count" => unit_arg(1).map(|u| {
            plant.inject(u, Fault::WrongCount);
            format!("unit {u}: next read answered one item short")
        }),
        "status" => Ok(plant
            .status()
            .iter()
            .map(|s| {
                format!(
                    "unit {}: valve {}{}, 累计流量 {}.{:02} m³, 电池电压 {}.{:02} V{}{}{}",
                    s.unit,
                    valve_word(s.valve_open),
                    if s.valve_status == VALVE_FAULT {
                        ", reports 故障"
                    } else {
                        ""
                    },
                    s.flow_raw / 100,
                    s.flow_raw % 100,
                    s.battery_raw / 100,
                    s.battery_raw % 100,
                    if s.silenced { ", SILENCED" } else { "" },
                    if s.flaky_percent > 0.0 {
                        format!(", flaky {} % ({} failed)", s.flaky_percent, s.flaky_failures)
                    } else {
                        String::new()
                    },
                    if s.pending_faults > 0 {
                        format!(", {} fault(s) queued", s.pending_faults)
                    } else {
                        String::new()
                    },
                )
            })
            .collect::<Vec<_>>()
            .join("\n")),
        "help" => Ok(HELP.to_string()),
        other => Err(format!("unknown command `{other}`; type help")),
    };
    result.unwrap_or_else(|e| format!("error: {e}"))
}

/// A [`Flaky`] failing `percent` % of the requests, late ones `late_ms` late (0: never answered).
pub(super) fn flaky(percent: f64, late_ms: u64, seed: u64) -> Flaky {
    Flaky {
        rate: percent / 100.0,
        late: (late_ms > 0).then(|| Duration::from_millis(late_ms)),
        seed,
    }
}

/// A non-negative decimal with at most two decimals, in hundredths: "3.2" → 320.
pub(super) fn hundredths(s: &str) -> Option<u64> {
    let v: f64 = s.trim().parse().ok()?;
    if !(0.0..=4.0e7).contains(&v) {
        return None;
    }
    Some((v * 100.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn battery_and_flow_commands_script_the_readings() {
        let p = Plant::with_meters(3);
        assert_eq!(command(&p, "battery 2 3.2"), "unit 2: 电池电压 3.20 V");
        assert_eq!(p.holding(2, 2), Some(320));
        assert_eq!(
            command(&p, "flow 3 0.05"),
            "unit 3: 累计流量 312.39 m³ (+0.05, valve not moved)"
        );
        assert_eq!(p.valve(3), Some(false));
        assert_eq!(command(&p, "fault 1"), "unit 1: valve reports 故障 (fault)");
        assert!(command(&p, "status").contains("unit 1: valve 关闭 (closed), reports 故障"));
        assert!(command(&p, "battery 2 x").starts_with("error:"));
        assert!(command(&p, "flow 2 -1").starts_with("error:"));
        assert!(command(&p, "fault 9").starts_with("error: no unit 9"));
    }

    #[test]
    fn the_flaky_command_sets_and_ends_the_fault() {
        let p = Plant::with_meters(2);
        assert_eq!(
            command(&p, "flaky 2 25 400 9"),
            "unit 2: fails 25 % of its requests at random (half answered 400 ms late, half not at all), seed 9"
        );
        assert!(command(&p, "status")
            .contains("unit 2: valve 关闭 (closed), 累计流量 212.34 m³, 电池电压 3.52 V, flaky 25 % (0 failed)"));
        assert_eq!(command(&p, "flaky 2 0"), "unit 2: answers every request again");
        assert_eq!(p.status()[1].flaky_percent, 0.0);
        assert!(command(&p, "flaky 2 101").starts_with("error:"));
        assert!(command(&p, "flaky 2 25 x").starts_with("error:"));
        assert!(command(&p, "flaky 9 25").starts_with("error: no unit 9"));
    }

    #[test]
    fn commands_say_what_they_did_and_refuse_bad_input() {
        let p = Plant::with_meters(2);
        assert_eq!(command(&p, "flip 1"), "unit 1: valve 开启 (open)");
        assert_eq!(command(&p, "set 2 holding 2 999"), "unit 2: holding 2 = 999");
        assert_eq!(p.holding(2, 2), Some(999));
        assert!(command(&p, "flip 9").starts_with("error: no unit 9"));
        assert!(command(&p, "set 1 holding 9999 1").starts_with("error:"));
        assert!(command(&p, "set 1 holding").starts_with("error:"));
        assert!(command(&p, "frobnicate").starts_with("error: unknown command"));
        assert!(command(&p, "status").contains("unit 2: valve 关闭 (closed), 累计流量 212.34 m³, 电池电压 9.99 V"));
    }
}

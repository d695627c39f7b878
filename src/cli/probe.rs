//! `fieldgate probe`: one Modbus read for commissioning, printed so an engineer sees which word and byte
//! order a meter uses, and, when it fails, what to check next.
//!
//! The line comes from a bus of the configuration (`--config F --bus B`) or from the command line
//! (`--tcp`, `--serial`, `--rtu-over-tcp`; `--rs485` puts a serial port in the kernel's RS-485 mode as
//! a bus's `rs485` does, and replaces that of a configured bus). The read itself is
//! `crate::modbus::probe::read_once`: the bus task's own open, timeout and answer checks, not a second
//! implementation. This module owns the arguments,
//! the output (`render_registers`, `render_bits`, pure) and the advice for each failure
//! (`advice`, pure; the caller lists `/dev/serial/by-id/`), and `fieldgate check`'s notes on the serial
//! buses with `rs485` (`check_notes`).
//!
//! Never run it against a line the daemon is polling: a serial port has one user, and stop the service
//! first (`systemctl stop fieldgate`).

use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;

use crate::config::point::{ByteOrder, PointSpec, Table, ValueType, WordOrder};
use crate::config::{self, ConfigError, Parity, Rs485, Transport};
use crate::modbus::point::{self, Raw};
use crate::modbus::probe::{read_once, ProbeError, Readout};

/// The request timeout when neither `--timeout` nor a bus of the configuration gives one.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// The advice for a slow meter, part of every timeout's advice.
const SLOW: &str = "A slow meter answers after the timeout: try again with --timeout 5s; if it answers then, set the bus `timeout` well above the answer time printed.";

/// Where serial adapters appear under stable names.
const SERIAL_BY_ID: &str = "/dev/serial/by-id";

/// `fieldgate probe`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeArgs {
    /// The site configuration: the line of `--bus` (its transport and timeout).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The `[[bus]] name` to use (may be left out when the configuration has one bus).
    #[arg(long, requires = "config")]
    pub bus: Option<String>,
    /// Modbus TCP to HOST:PORT.
    #[arg(long, value_name = "HOST:PORT", conflicts_with_all = ["config", "serial", "rtu_over_tcp"])]
    pub tcp: Option<String>,
    /// Modbus RTU on this serial device (e.g. /dev/serial/by-id/usb-…).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["config", "rtu_over_tcp"])]
    pub serial: Option<String>,
    /// Serial baud rate.
    #[arg(long, default_value_t = 9600)]
    pub baud: u32,
    /// Serial parity.
    #[arg(long, value_enum, default_value_t = ParityArg::None)]
    pub parity: ParityArg,
    /// Serial stop bits.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub stop_bits: u8,
    /// Put the serial port in the kernel's RS-485 mode after opening it, as a bus's `rs485` does: for
    /// the on-board UARTs of ARM boards (i.MX, AM335x, Raspberry Pi HATs), whose RTS switches the
    /// transceiver's direction. Not for USB adapters: they switch direction by themselves and refuse
    /// it (ENOTTY). Alone: RTS high while sending, low after, no delays; or the keys of `rs485`,
    /// e.g. `--rs485 rts_on_send=false,delay_before_send=1ms` (rts_on_send, rts_after_send: true|false,
    /// each defaulting to the other's opposite; delay_before_send, delay_after_send: 0ms..100ms). With
    /// --config it replaces the bus's own `rs485`.
    #[arg(
        long,
        value_name = "KEY=VALUE,...",
        num_args = 0..=1,
        default_missing_value = "",
        value_parser = config::parse_rs485_option,
        conflicts_with_all = ["tcp", "rtu_over_tcp"]
    )]
    pub rs485: Option<Rs485>,
    /// Modbus RTU frames over TCP (an RS-485 device server) at HOST:PORT.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "config")]
    pub rtu_over_tcp: Option<String>,
    /// Modbus unit (slave) id.
    #[arg(long)]
    pub unit: u8,
    /// The table to read.
    #[arg(long, value_enum, default_value_t = TableArg::Holding)]
    pub table: TableArg,
    /// First address, 0-based as on the wire (register 40001 is holding address 0).
    #[arg(long)]
    pub address: u16,
    /// Items to read (at most 125 registers or 2000 bits).
    #[arg(long, default_value_t = 1)]
    pub count: u16,
    /// Request timeout, e.g. 500ms (default: the bus's timeout, or 1s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
}

/// `--parity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ParityArg {
    /// No parity bit.
    None,
    /// Even.
    Even,
    /// Odd.
    Odd,
}

/// `--table`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TableArg {
    /// Coils (fc 1).
    Coil,
    /// Discrete inputs (fc 2).
    Discrete,
    /// Holding registers (fc 3).
    Holding,
    /// Input registers (fc 4).
    Input,
}

impl From<TableArg> for Table {
    fn from(t: TableArg) -> Table {
        match t {
            TableArg::Coil => Table::Coil,
            TableArg::Discrete => Table::Discrete,
            TableArg::Holding => Table::Holding,
            TableArg::Input => Table::Input,
        }
    }
}

/// Why `probe` did not print values.
#[derive(Debug, thiserror::Error)]
pub enum ProbeCliError {
    /// The configuration did not load.
    #[error("{0}(or give the line directly with --tcp, --serial or --rtu-over-tcp)")]
    Config(#[from] ConfigError),
    /// No such bus in the configuration.
    #[error("no bus `{name}` in the configuration; its buses: {known}")]
    NoBus {
        /// The name asked.
        name: String,
        /// The names there are.
        known: String,
    },
    /// Several buses and no `--bus`.
    #[error("the configuration has several buses: choose one with --bus ({known})")]
    ChooseBus {
        /// The names there are.
        known: String,
    },
    /// `--rs485` for a bus of the configuration that is not a serial line.
    #[error("--rs485 is for serial lines; bus `{bus}` is not one")]
    Rs485NotSerial {
        /// The bus's name.
        bus: String,
    },
    /// Neither a configuration nor a line.
    #[error("say which line to read: --config F [--bus B], --tcp HOST:PORT, --serial PATH [--baud N --parity P], or --rtu-over-tcp HOST:PORT")]
    NoLine,
    /// The read failed.
    #[error("{what}: {error}\n{advice}")]
    Read {
        /// What was asked, e.g. `unit 3, holding 0..1 via tcp 10.0.0.5:502`.
        what: String,
        /// Why it failed (not a `source`: the advice ends the message, the cause is already in it).
        error: ProbeError,
        /// What to check next, in words.
        advice: String,
    },
}

impl ProbeCliError {
    /// A bounded label.
    pub fn error_code(&self) -> &'static str {
        match self {
            ProbeCliError::Config(_) => "config",
            ProbeCliError::NoBus { .. } => "no_bus",
            ProbeCliError::ChooseBus { .. } => "choose_bus",
            ProbeCliError::Rs485NotSerial { .. } => "rs485_not_serial",
            ProbeCliError::NoLine => "no_line",
            ProbeCliError::Read { error, .. } => error.error_code(),
        }
    }
}

/// Run `probe` and print its output.
pub(crate) async fn probe_main(args: ProbeArgs) -> anyhow::Result<()> {
    print!("{}", probe_run(args).await?);
    Ok(())
}

/// Run `probe`; returns what it would print.
pub async fn probe_run(args: ProbeArgs) -> Result<String, ProbeCliError> {
    let (transport, bus_timeout) = line(&args)?;
    let timeout = args.timeout.or(bus_timeout).unwrap_or(DEFAULT_TIMEOUT);
    let table = Table::from(args.table);
    let what = format!(
        "unit {}, {table} {} via {}",
        args.unit,
        span(args.address, args.count),
        describe(&transport)
    );
    let took = |t: Duration| {
        format!(
            "answered in {:.1} ms, {:.0} % of the {} timeout",
            t.as_secs_f64() * 1e3,
            t.as_secs_f64() * 100.0 / timeout.as_secs_f64().max(1e-9),
            humantime::format_duration(timeout)
        )
    };
    match read_once(&transport, timeout, args.unit, table, args.address, args.count).await {
        Ok((Readout::Registers(words), t)) => Ok(format!(
            "Read {what} ({}):\n\n{}",
            took(t),
            render_registers(args.address, &words)
        )),
        Ok((Readout::Bits(bits), t)) => Ok(format!(
            "Read {what} ({}):\n\n{}",
            took(t),
            render_bits(args.address, &bits)
        )),
        Err(error) => {
            let by_id = if error.error_code() == "open" {
                serial_by_id()
            } else {
                Vec::new()
            };
            Err(ProbeCliError::Read {
                advice: advice(&error, &transport, args.unit, &by_id),
                what,
                error,
            })
        }
    }
}

/// The line to read and the bus's own timeout, from the arguments.
fn line(args: &ProbeArgs) -> Result<(Transport, Option<Duration>), ProbeCliError> {
    if let Some(path) = &args.config {
        let cfg = config::load(path)?;
        let known = cfg.buses.iter().map(|b| b.name.as_str()).collect::<Vec<_>>().join(", ");
        let bus = match &args.bus {
            Some(name) => cfg
                .buses
                .iter()
                .find(|b| &b.name == name)
                .ok_or_else(|| ProbeCliError::NoBus {
                    name: name.clone(),
                    known: known.clone(),
                })?,
            None if cfg.buses.len() == 1 => cfg.buses.first().ok_or(ProbeCliError::NoLine)?,
            None => return Err(ProbeCliError::ChooseBus { known }),
        };
        let mut transport = bus.transport.clone();
        if let Some(wanted) = args.rs485 {
            match &mut transport {
                Transport::Serial { rs485, .. } => *rs485 = Some(wanted),
                _ => return Err(ProbeCliError::Rs485NotSerial { bus: bus.name.clone() }),
            }
        }
        return Ok((transport, Some(bus.timeout)));
    }
    if let Some(addr) = &args.tcp {
        return Ok((Transport::Tcp(addr.clone()), None));
    }
    if let Some(addr) = &args.rtu_over_tcp {
        return Ok((Transport::RtuOverTcp(addr.clone()), None));
    }
    if let Some(path) = &args.serial {
        return Ok((
            Transport::Serial {
                path: path.clone(),
                baud: args.baud,
                parity: match args.parity {
                    ParityArg::None => Parity::None,
                    ParityArg::Even => Parity::Even,
                    ParityArg::Odd => Parity::Odd,
                },
                data_bits: 8,
                stop_bits: args.stop_bits,
                rs485: args.rs485,
            },
            None,
        ));
    }
    Err(ProbeCliError::NoLine)
}

fn describe(t: &Transport) -> String {
    match t {
        Transport::Serial { path, rs485, .. } => {
            let mode = rs485.map_or_else(String::new, |r| {
                let level = |high: bool| if high { "high" } else { "low" };
                format!(
                    " rs485 (RTS {} while sending, {} after; delays {}ms / {}ms)",
                    level(r.rts_on_send),
                    level(r.rts_after_send),
                    r.delay_before_send.as_millis(),
                    r.delay_after_send.as_millis()
                )
            });
            format!("serial {path} {}{mode}", setting_label(t))
        }
        other => setting_label(other),
    }
}

/// `9600 8N1`, `tcp HOST:PORT`, `rtu-over-tcp HOST:PORT`.
pub(super) fn setting_label(t: &Transport) -> String {
    match t {
        Transport::Serial {
            baud,
            parity,
            data_bits,
            stop_bits,
            ..
        } => format!("{baud} {data_bits}{}{stop_bits}", parity.letter()),
        Transport::Tcp(a) => format!("tcp {a}"),
        Transport::RtuOverTcp(a) => format!("rtu-over-tcp {a}"),
    }
}

fn span(address: u16, count: u16) -> String {
    let last = u32::from(address) + u32::from(count.max(1)) - 1;
    if count <= 1 {
        format!("{address}")
    } else {
        format!("{address}..{last}")
    }
}

/// Entries of `/dev/serial/by-id/`, sorted; empty when there are none (or no such folder).
pub(super) fn serial_by_id() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(SERIAL_BY_ID)
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| e.path().display().to_string())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// `fieldgate check`'s notes on the serial buses of a valid configuration: for each bus with `rs485`,
/// what happens when the port refuses RS-485 mode, and a warning when the device is a USB adapter
/// (which always refuses it). Reads only where the device path leads (no port is opened: the daemon
/// may hold it).
pub(crate) fn check_notes(cfg: &config::Config, config_path: &std::path::Path) -> Vec<String> {
    cfg.buses
        .iter()
        .filter_map(|bus| match &bus.transport {
            Transport::Serial {
                path, rs485: Some(_), ..
            } => {
                let resolved = std::fs::canonicalize(path).ok();
                Some(rs485_note(&bus.name, path, resolved.as_deref(), config_path))
            }
            _ => None,
        })
        .collect()
}

/// The note on one bus with `rs485` on `path` (which leads to `resolved`, when it exists).
fn rs485_note(bus: &str, path: &str, resolved: Option<&std::path::Path>, config_path: &std::path::Path) -> String {
    let usb = resolved
        .and_then(|r| r.file_name())
        .and_then(|n| n.to_str())
        .filter(|n| n.starts_with("ttyUSB") || n.starts_with("ttyACM"));
    if let (Some(real), Some(name)) = (resolved, usb) {
        return format!(
            "bus `{bus}`: rs485 is set, but {path} is a USB adapter ({name}, {}): USB adapters switch direction by \
             themselves and refuse the kernel's RS-485 mode (ENOTTY, \"Inappropriate ioctl for device\"), so the \
             bus would stay down: remove `rs485` from this bus",
            real.display()
        );
    }
    format!(
        "bus `{bus}`: rs485 is set: {path} is put in the kernel's RS-485 mode each time it opens. A port that \
         refuses it keeps the bus down (retried with backoff; the kernel's answer in the log and /healthz): \
         ENOTTY (\"Inappropriate ioctl for device\") means it is not a UART with RS-485 support, e.g. a USB \
         adapter that switches direction by itself: remove `rs485`; EINVAL means the UART driver refuses these \
         settings. Try it with the service stopped: fieldgate probe --config {} --bus {bus} --unit N --address A",
        config_path.display()
    )
}

/// What to check next after `e`, in plain words. `by_id` lists `/dev/serial/by-id/` (for a missing device).
pub(super) fn advice(e: &ProbeError, transport: &Transport, unit: u8, by_id: &[String]) -> String {
    let serial = matches!(transport, Transport::Serial { .. });
    match e {
        ProbeError::Range { .. } => "Ask for 1..125 registers or 1..2000 bits, within addresses 0..65535.".into(),
        ProbeError::Open { kind: "missing", .. } => {
            if by_id.is_empty() {
                format!("No serial adapters found in {SERIAL_BY_ID}/: is the USB adapter plugged in? (`dmesg | tail` shows what the kernel saw.)")
            } else {
                let mut s = format!("Serial adapters found in {SERIAL_BY_ID}/ (use one of these stable names):\n");
                for entry in by_id {
                    s.push_str(&format!("  {entry}\n"));
                }
                s.truncate(s.trim_end().len());
                s
            }
        }
        ProbeError::Open {
            kind: "permission", ..
        } => "Your user may not open the port: add it to the dialout group (`sudo usermod -aG dialout $USER`, then log in again), or run the probe with sudo. The service gets it through SupplementaryGroups=dialout.".into(),
        ProbeError::Open { kind: "rs485", .. } => "The port refused the kernel's RS-485 mode (the reason is above). A USB RS-485 adapter switches direction by itself: probe without --rs485 (and leave `rs485` out of its bus). On a board's own UART, check that its driver has RS-485 enabled (device tree) and try the opposite RTS levels: --rs485 rts_on_send=false.".into(),
        ProbeError::Open { kind: "busy", .. } => "Another program holds the port: if the fieldgate daemon polls this line, `sudo systemctl stop fieldgate` while probing.".into(),
        ProbeError::Open { kind: "refused", .. } => "Nothing listens at that address: check the IP address and port (Modbus TCP is usually 502) and that the device or device server is powered and configured.".into(),
        ProbeError::Open {
            kind: "connect_timeout" | "connect",
            ..
        } => "The device cannot be reached: check the network, the IP address and any firewall (`ping` it).".into(),
        ProbeError::Open { .. } => "Check the device path and that the adapter works (`dmesg | tail`).".into(),
        ProbeError::Timeout(_) if serial => format!("Unit {unit} did not answer: check the unit id, the baud rate and parity (they must match the meter's), and the wiring (A/B swapped? common ground? termination at the ends of the line?). {SLOW}"),
        ProbeError::Timeout(_) => match transport {
            Transport::RtuOverTcp(_) => format!("Unit {unit} did not answer: check the unit id, the serial settings of the device server (baud, parity) and the RS-485 wiring behind it; if it is a Modbus TCP gateway, try --tcp instead. {SLOW}"),
            _ => format!("Unit {unit} did not answer: check the unit id (many TCP devices answer only 1 or 255); if the device server passes RTU frames through, try --rtu-over-tcp instead. {SLOW}"),
        },
        ProbeError::Exception { code } => match code {
            0x01 => "Illegal function: the device does not support reading this table; try another --table (e.g. input instead of holding).".into(),
            0x02 => "Illegal data address: the device has nothing at this address in this table. Check --address (0-based: register 40001 is holding address 0, 30001 is input address 0), --table, and that --count does not run past the end of the block.".into(),
            0x03 => "Illegal data value: the device refuses this request; read fewer items (--count).".into(),
            0x04 => "Server device failure: the device could not carry out the read; try again, then check the device itself.".into(),
            0x05 | 0x06 => "The device is busy; try again in a moment.".into(),
            0x0A | 0x0B => format!("The gateway could not reach unit {unit} behind it: check the unit id and the serial side of the gateway (wiring, baud, parity)."),
            _ => "An exception code the Modbus specification does not define: see the device's manual.".into(),
        },
        ProbeError::Protocol(_) => "The answer did not fit the request: another device with the same unit id, noise on the line, or the wrong framing (try --tcp vs --rtu-over-tcp; on serial check baud and parity).".into(),
        ProbeError::Transport(_) => "The connection broke during the read: check the cable or the network, then try again.".into(),
    }
}

/// The four orders of a 32-bit value over two registers: name, word order, byte order.
const ORDERS: [(&str, WordOrder, ByteOrder); 4] = [
    ("ABCD", WordOrder::Big, ByteOrder::Big),
    ("CDAB", WordOrder::Little, ByteOrder::Big),
    ("BADC", WordOrder::Big, ByteOrder::Little),
    ("DCBA", WordOrder::Little, ByteOrder::Little),
];

/// Registers read from `address`: each as hex, u16 and i16 (as sent and byte-swapped), then for every
/// pair starting at each address, the 32-bit value as hex, u32, i32 and f32 in the four orders.
fn render_registers(address: u16, words: &[u16]) -> String {
    let addr = |i: usize| (usize::from(address) + i).to_string();
    let rows: Vec<Vec<String>> = words
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            let s = w.swap_bytes();
            vec![
                addr(i),
                format!("{w:#06x}"),
                w.to_string(),
                (w as i16).to_string(),
                format!("{s:#06x}"),
                s.to_string(),
                (s as i16).to_string(),
            ]
        })
        .collect();
    let mut out = format!("{} register(s):\n", words.len());
    out.push_str(&crate::cli::table::table(
        &["ADDR", "HEX", "U16", "I16", "SWAPPED", "U16 (BA)", "I16 (BA)"],
        &rows,
    ));
    if words.len() < 2 {
        out.push_str("\nRead 2 or more registers (--count 2) to see 32-bit values.\n");
        return out;
    }
    let mut rows = Vec::new();
    for (i, pair) in words.windows(2).enumerate() {
        for (name, word_order, byte_order) in ORDERS {
            let spec = PointSpec {
                table: Table::Holding,
                address: 0,
                kind: ValueType::U32,
                word_order,
                byte_order,
                scale: None,
                decimals: None,
            };
            let Ok(Raw::Int(v)) = point::decode_registers(&spec, pair) else {
                continue;
            };
            let v = v as u32;
            rows.push(vec![
                addr(i),
                name.to_string(),
                format!("{v:#010x}"),
                v.to_string(),
                (v as i32).to_string(),
                f32_text(f32::from_bits(v)),
            ]);
        }
    }
    out.push_str("\n32-bit values of each register and the next:\n");
    out.push_str(&crate::cli::table::table(
        &["ADDR", "ORDER", "HEX", "U32", "I32", "F32"],
        &rows,
    ));
    out.push_str(
        "\nABCD: word_order = \"big\", byte_order = \"big\" (the default)   CDAB: word_order = \"little\"\n\
         BADC: byte_order = \"little\"   DCBA: word_order = \"little\", byte_order = \"little\"\n",
    );
    out
}

/// Bits read from `address`, one per line.
fn render_bits(address: u16, bits: &[bool]) -> String {
    let rows: Vec<Vec<String>> = bits
        .iter()
        .enumerate()
        .map(|(i, b)| vec![(usize::from(address) + i).to_string(), u8::from(*b).to_string()])
        .collect();
    format!(
        "{} bit(s):\n{}",
        bits.len(),
        crate::cli::table::table(&["ADDR", "VALUE"], &rows)
    )
}

/// An f32 the way a person reads it: shortest round-trip digits, exponent form when very large or small.
fn f32_text(v: f32) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.into()
    } else if v == 0.0 || (1e-4..1e9).contains(&v.abs()) {
        format!("{v}")
    } else {
        format!("{v:e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ProbeArgs,
    }

    fn row<'a>(text: &'a str, addr: &str, order: &str) -> Vec<&'a str> {
        text.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cells| cells.first() == Some(&addr) && cells.get(1) == Some(&order))
            .unwrap_or_else(|| panic!("no row {addr} {order} in\n{text}"))
    }

    #[test]
    fn pi_reads_as_f32_in_abcd_and_every_order_is_shown() {
        let text = render_registers(100, &[0x4049, 0x0FDB]);
        assert_eq!(
            row(&text, "100", "ABCD"),
            ["100", "ABCD", "0x40490fdb", "1078530011", "1078530011", "3.1415927"]
        );
        assert_eq!(row(&text, "100", "CDAB")[2], "0x0fdb4049");
        assert_eq!(row(&text, "100", "BADC")[2], "0x4940db0f");
        assert_eq!(row(&text, "100", "DCBA")[2], "0xdb0f4940");
        // The same value stored low word first reads as pi in CDAB.
        let text = render_registers(0, &[0x0FDB, 0x4049]);
        assert_eq!(row(&text, "0", "CDAB")[5], "3.1415927");
        // And byte-swapped in each register, in BADC.
        let text = render_registers(0, &[0x4940, 0xDB0F]);
        assert_eq!(row(&text, "0", "BADC")[5], "3.1415927");
    }

    #[test]
    fn single_registers_show_hex_unsigned_signed_and_swapped() {
        let text = render_registers(7, &[0xFFFE]);
        let cells: Vec<&str> = text
            .lines()
            .find(|l| l.trim_start().starts_with("7 "))
            .unwrap()
            .split_whitespace()
            .collect();
        assert_eq!(cells, ["7", "0xfffe", "65534", "-2", "0xfeff", "65279", "-257"]);
        assert!(text.contains("--count 2"), "{text}");
    }

    #[test]
    fn every_starting_offset_gets_its_32_bit_values() {
        // u32 0x00012345 = 74565 at 10..11; i32 -2 at 11..12.
        let text = render_registers(10, &[0x0001, 0x2345, 0xFFFF, 0xFFFE]);
        assert_eq!(row(&text, "10", "ABCD")[3], "74565");
        assert_eq!(row(&text, "12", "ABCD")[4], "-2");
        assert_eq!(row(&text, "11", "ABCD")[2], "0x2345ffff");
        assert!(!text
            .lines()
            .any(|l| l.trim_start().starts_with("13 ") && l.contains("ABCD")));
    }

    #[test]
    fn floats_print_without_noise_or_endless_digits() {
        assert_eq!(f32_text(1.5), "1.5");
        assert_eq!(f32_text(0.0), "0");
        assert_eq!(f32_text(1e20), "1e20");
        assert_eq!(f32_text(f32::NAN), "NaN");
        assert_eq!(f32_text(-f32::INFINITY), "-inf");
    }

    #[test]
    fn bits_list_one_address_per_line() {
        let text = render_bits(3, &[true, false]);
        assert!(text.contains("  3     1\n") && text.contains("  4     0\n"), "{text}");
    }

    #[test]
    fn advice_names_the_next_step() {
        let serial = Transport::Serial {
            path: "/dev/ttyUSB9".into(),
            baud: 9600,
            parity: Parity::None,
            data_bits: 8,
            stop_bits: 1,
            rs485: None,
        };
        let missing = ProbeError::Open {
            kind: "missing",
            message: String::new(),
        };
        let a = advice(&missing, &serial, 1, &[]);
        assert!(a.contains("No serial adapters found"), "{a}");
        let found = ["/dev/serial/by-id/usb-FTDI_FT232R-if00-port0".to_string()];
        let a = advice(&missing, &serial, 1, &found);
        assert!(a.contains("usb-FTDI_FT232R-if00-port0"), "{a}");
        let perm = ProbeError::Open {
            kind: "permission",
            message: String::new(),
        };
        assert!(advice(&perm, &serial, 1, &[]).contains("dialout"));
        let a = advice(&ProbeError::Timeout(DEFAULT_TIMEOUT), &serial, 4, &[]);
        assert!(
            a.contains("unit id") && a.contains("baud") && a.contains("parity") && a.contains("wiring"),
            "{a}"
        );
        let a = advice(
            &ProbeError::Exception { code: 2 },
            &Transport::Tcp("h:502".into()),
            1,
            &[],
        );
        assert!(a.contains("--address") && a.contains("--table"), "{a}");
        let e = ProbeError::Exception { code: 2 };
        assert!(e.to_string().contains("illegal data address"), "{e}");
    }

    #[test]
    fn check_warns_of_rs485_on_a_usb_adapter_and_explains_it_otherwise() {
        let cfg = std::path::Path::new("/etc/fieldgate/fieldgate.toml");
        let by_id = "/dev/serial/by-id/usb-FTDI_FT232R-if00-port0";
        let usb = rs485_note("b", by_id, Some(std::path::Path::new("/dev/ttyUSB0")), cfg);
        assert!(
            usb.starts_with(&format!(
                "bus `b`: rs485 is set, but {by_id} is a USB adapter (ttyUSB0, /dev/ttyUSB0)"
            )),
            "{usb}"
        );
        assert!(
            usb.contains("ENOTTY") && usb.contains("remove `rs485` from this bus"),
            "{usb}"
        );
        let uart = rs485_note("b", "/dev/ttymxc2", Some(std::path::Path::new("/dev/ttymxc2")), cfg);
        assert!(
            uart.contains("/dev/ttymxc2 is put in the kernel's RS-485 mode"),
            "{uart}"
        );
        assert!(uart.contains("ENOTTY") && uart.contains("EINVAL"), "{uart}");
        assert!(
            uart.contains("fieldgate probe --config /etc/fieldgate/fieldgate.toml --bus b"),
            "{uart}"
        );
        // A device that is not there (yet) gets the general note.
        assert!(rs485_note("b", "/dev/ttyS9", None, cfg).contains("/dev/ttyS9 is put in"));
    }

    #[test]
    fn rs485_parses_alone_or_with_keys_and_only_for_serial_lines() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["x", "--serial", "/dev/ttymxc2", "--unit", "1", "--address", "0"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).map(|c| c.args)
        };
        assert_eq!(parse(&[]).unwrap().rs485, None);
        assert_eq!(parse(&["--rs485"]).unwrap().rs485, Some(Rs485::DEFAULT));
        let a = parse(&["--rs485", "rts_on_send=false,delay_after_send=2ms"]).unwrap();
        let want = Rs485 {
            rts_on_send: false,
            rts_after_send: true,
            delay_before_send: Duration::ZERO,
            delay_after_send: Duration::from_millis(2),
        };
        assert_eq!(a.rs485, Some(want));
        assert!(matches!(line(&a).unwrap().0, Transport::Serial { rs485: Some(r), .. } if r == want));
        assert!(describe(&line(&a).unwrap().0).ends_with("rs485 (RTS low while sending, high after; delays 0ms / 2ms)"));
        // `--rs485` alone before another option takes no value.
        let mut argv = vec![
            "x",
            "--serial",
            "/dev/ttymxc2",
            "--rs485",
            "--unit",
            "1",
            "--address",
            "0",
        ];
        assert_eq!(Cli::try_parse_from(&argv).unwrap().args.rs485, Some(Rs485::DEFAULT));
        argv[3] = "--rs485=delay_before_send=101ms";
        let e = Cli::try_parse_from(&argv)
            .err()
            .expect("a delay past 100ms is refused")
            .to_string();
        assert!(e.contains("allowed 0ms to 100ms"), "{e}");
        let tcp = Cli::try_parse_from(["x", "--tcp", "h:502", "--rs485", "--unit", "1", "--address", "0"]);
        assert!(tcp.is_err(), "--rs485 is for serial lines");
    }

    #[test]
    fn arguments_parse_for_a_config_or_a_direct_line() {
        let a = Cli::try_parse_from([
            "x",
            "--tcp",
            "127.0.0.1:502",
            "--unit",
            "3",
            "--address",
            "0",
            "--count",
            "2",
        ])
        .unwrap()
        .args;
        assert_eq!(line(&a).unwrap().0, Transport::Tcp("127.0.0.1:502".into()));
        assert_eq!(a.table, TableArg::Holding);
        let a = Cli::try_parse_from([
            "x",
            "--serial",
            "/dev/ttyUSB0",
            "--baud",
            "19200",
            "--parity",
            "even",
            "--unit",
            "1",
            "--table",
            "input",
            "--address",
            "5",
            "--timeout",
            "300ms",
        ])
        .unwrap()
        .args;
        assert!(matches!(
            line(&a).unwrap().0,
            Transport::Serial {
                baud: 19200,
                parity: Parity::Even,
                ..
            }
        ));
        assert_eq!(a.timeout, Some(Duration::from_millis(300)));
        assert!(Cli::try_parse_from([
            "x",
            "--tcp",
            "a:1",
            "--serial",
            "/dev/x",
            "--unit",
            "1",
            "--address",
            "0"
        ])
        .is_err());
        assert!(Cli::try_parse_from(["x", "--bus", "a", "--unit", "1", "--address", "0"]).is_err());
        let none = Cli::try_parse_from(["x", "--unit", "1", "--address", "0"])
            .unwrap()
            .args;
        assert!(matches!(line(&none), Err(ProbeCliError::NoLine)));
    }
}

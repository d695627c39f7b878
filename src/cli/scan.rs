//! `fieldgate scan`: find the meters on a line. Tries every unit id of `--units` at every line setting
//! asked for (serial: each baud rate × parity × stop bits; TCP: the one connection), reads one item of
//! each (`--table`, `--address`, as `probe` names them), and reports which units answered, at which
//! setting, with what: a value, an exception (the unit is there; its code and name), or a late answer
//! (there, but slow). Prints a table, or `--json` (one object per unit found), or `--emit-config`
//! (`[[bus]]` and `[[meter]]` blocks that `fieldgate check` accepts once the placeholders are filled in).
//!
//! Policy (this file): the settings and their order, when a setting is given up (every answer garbled
//! after [`GARBAGE_LIMIT`] of them: a wrong baud rate, parity or framing), the progress line with its
//! ETA (stderr, only on a terminal), the printing. One try of one unit, its timeout from the wire time
//! and what it heard are `crate::modbus::scan`'s; the line is opened by the bus task's own code.
//!
//! The report's pure parts (`text`, `json`, `config_blocks`, the progress line) take no clock and do no
//! I/O. Never run it on a line the daemon is polling (`sudo systemctl stop fieldgate` first): a serial
//! port has one user.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cli::probe::{setting_label, ParityArg, TableArg};
use crate::cli::table::table;
use crate::config::point::Table;
use crate::config::{Parity, Rs485, Transport};
use crate::modbus::probe::{exception_name, ProbeError, Readout};
use crate::modbus::scan::{Heard, ScanLine, Timing};

/// A setting is given up after this many garbled answers while none was valid: every answer garbled
/// is what a wrong baud rate or parity looks like, and the rest of its units would only add more.
pub const GARBAGE_LIMIT: usize = 5;

/// `--all-bauds`: the rates Modbus meters ship with, the most common first (9600 is the Modbus
/// default, 19200 the spec's recommendation).
const ALL_BAUDS: [u32; 8] = [9600, 19200, 38400, 57600, 115_200, 4800, 2400, 1200];

/// The longest `--timeout`, as a `[[bus]] timeout` may be.
const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// The bus `timeout` `--emit-config` writes, unless the answers seen ask for more (the `[[bus]]` default).
const CONFIG_TIMEOUT: Duration = Duration::from_millis(300);

/// `fieldgate scan`.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("line").required(true).args(["serial", "tcp", "rtu_over_tcp"])))]
#[command(
    after_help = "The timeout of a try follows the wire time at each baud rate: request (8 bytes) and \
answer (7 bytes) on the wire, t3.5, and 30 ms for the device; at 9600 baud 8N1 that is 49.6 ms. An absent \
unit costs that and as long again listening for a late answer (99.3 ms), so 247 absent units take about \
25 s at 9600 baud. Modbus TCP and RTU over TCP wait 100 ms. A unit answering within twice the timeout \
is still found, as late. A setting whose first 5 answers are all garbled (a wrong baud rate or parity) \
is given up."
)]
pub struct ScanArgs {
    /// Modbus RTU on this serial device (e.g. /dev/serial/by-id/usb-…).
    #[arg(long, value_name = "PATH")]
    serial: Option<String>,
    /// Modbus TCP to HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    tcp: Option<String>,
    /// Modbus RTU frames over TCP (an RS-485 device server) at HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    rtu_over_tcp: Option<String>,
    /// Serial: put the port in the kernel's RS-485 mode after opening it, as a bus's `rs485` does
    /// (on-board UARTs of ARM boards; not USB adapters, which refuse it with ENOTTY). Alone: RTS high
    /// while sending, low after, no delays; or the keys of `rs485`, e.g.
    /// `--rs485 rts_on_send=false,delay_before_send=1ms`.
    #[arg(
        long,
        value_name = "KEY=VALUE,...",
        num_args = 0..=1,
        default_missing_value = "",
        value_parser = crate::config::parse_rs485_option,
        conflicts_with_all = ["tcp", "rtu_over_tcp"]
    )]
    rs485: Option<Rs485>,
    /// Unit ids to try: numbers and ranges, e.g. 1-10,20 (within 1..=247).
    #[arg(long, value_name = "LIST", default_value = "1-247", value_parser = parse_units)]
    units: Units,
    /// Serial: baud rates to try, e.g. 9600,19200 (default 9600).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_baud, conflicts_with_all = ["all_bauds", "tcp", "rtu_over_tcp"])]
    baud: Vec<u32>,
    /// Serial: try 9600, 19200, 38400, 57600, 115200, 4800, 2400 and 1200 baud, in this order.
    #[arg(long, conflicts_with_all = ["tcp", "rtu_over_tcp"])]
    all_bauds: bool,
    /// Serial: parities to try, e.g. none,even,odd (default none).
    #[arg(long, value_name = "LIST", value_enum, value_delimiter = ',', conflicts_with_all = ["tcp", "rtu_over_tcp"])]
    parity: Vec<ParityArg>,
    /// Serial: stop bits to try: 1, 2 or 1,2 (default 1). Data bits are 8 (RTU frames are 8-bit).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = clap::value_parser!(u8).range(1..=2), conflicts_with_all = ["tcp", "rtu_over_tcp"])]
    stop_bits: Vec<u8>,
    /// The table to read one item of.
    #[arg(long, value_enum, default_value_t = TableArg::Holding)]
    table: TableArg,
    /// The address to read, 0-based as on the wire (register 40001 is holding address 0).
    #[arg(long, default_value_t = 0)]
    address: u16,
    /// Timeout of a try, e.g. 300ms, for slow meters (default: from the wire time, see below).
    #[arg(long, value_parser = parse_timeout)]
    timeout: Option<Duration>,
    /// Print a JSON array, one object per unit found (the summary goes to stderr).
    #[arg(long, conflicts_with = "emit_config")]
    json: bool,
    /// Print `[[bus]]` and `[[meter]]` blocks for the units found (the summary goes to stderr).
    #[arg(long)]
    emit_config: bool,
    /// With --emit-config: meters use this `[profile.NAME]` instead of a placeholder valve.
    #[arg(long, value_name = "NAME", requires = "emit_config")]
    profile: Option<String>,
}

/// Unit ids to try: ascending, each once, each in 1..=247.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Units(Vec<u8>);

/// `--units`: numbers and ranges separated by commas.
fn parse_units(s: &str) -> Result<Units, String> {
    let mut units = BTreeSet::new();
    for part in s.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(format!(
                "`{s}` has an empty item: give unit ids and ranges separated by commas, e.g. 1-10,20"
            ));
        }
        let id = |t: &str| -> Result<u8, String> {
            match t.trim().parse::<u32>() {
                Ok(n @ 1..=247) => Ok(n as u8),
                Ok(n) => Err(format!("unit {n} is out of range: allowed 1..=247")),
                Err(_) => Err(format!(
                    "`{}` is not a unit id: give numbers and ranges, e.g. 1-10,20",
                    t.trim()
                )),
            }
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (id(a)?, id(b)?);
                if a > b {
                    return Err(format!("the range `{part}` runs backwards: write {b}-{a}"));
                }
                units.extend(a..=b);
            }
            None => {
                units.insert(id(part)?);
            }
        }
    }
    Ok(Units(units.into_iter().collect()))
}

/// One `--baud` rate, within what a `[[bus]] baud` may be.
fn parse_baud(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(b @ 300..=4_000_000) => Ok(b),
        _ => Err(format!("`{s}` is not a baud rate: allowed 300..=4000000, e.g. 9600")),
    }
}

/// `--timeout`: more than zero, at most a minute.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s.trim()) {
        Ok(d) if !d.is_zero() && d <= MAX_TIMEOUT => Ok(d),
        _ => Err(format!(
            "`{s}` is not a timeout: allowed more than 0 and at most 1m, e.g. 300ms"
        )),
    }
}

/// The settings to try, in order: for a serial line each baud rate × parity × stop bits (as given,
/// repeats dropped); for TCP the one connection.
fn settings(args: &ScanArgs) -> Vec<Transport> {
    if let Some(addr) = &args.tcp {
        return vec![Transport::Tcp(addr.clone())];
    }
    if let Some(addr) = &args.rtu_over_tcp {
        return vec![Transport::RtuOverTcp(addr.clone())];
    }
    let Some(path) = &args.serial else {
        return Vec::new();
    };
    let bauds: Vec<u32> = if args.all_bauds {
        ALL_BAUDS.to_vec()
    } else if args.baud.is_empty() {
        vec![9600]
    } else {
        args.baud.clone()
    };
    let parities = if args.parity.is_empty() {
        vec![ParityArg::None]
    } else {
        args.parity.clone()
    };
    let stops = if args.stop_bits.is_empty() {
        vec![1]
    } else {
        args.stop_bits.clone()
    };
    let mut out: Vec<Transport> = Vec::new();
    for &baud in &bauds {
        for parity in &parities {
            for &stop_bits in &stops {
                let t = Transport::Serial {
                    path: path.clone(),
                    baud,
                    parity: match parity {
                        ParityArg::None => Parity::None,
                        ParityArg::Even => Parity::Even,
                        ParityArg::Odd => Parity::Odd,
                    },
                    data_bits: 8,
                    stop_bits,
                    rs485: args.rs485,
                };
                if !out.contains(&t) {
                    out.push(t);
                }
            }
        }
    }
    out
}

/// Why a scan stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// No line given (clap's group makes this unreachable from the command line).
    #[error("say which line to scan: --serial PATH, --tcp HOST:PORT or --rtu-over-tcp HOST:PORT")]
    NoLine,
    /// The line cannot be opened (at the start, or again after a failed try).
    #[error("{what}: {error}\n{advice}")]
    Open {
        /// The line and setting, and how far the scan had come.
        what: String,
        /// Why it failed.
        error: ProbeError,
        /// What to check next.
        advice: String,
    },
}

/// What a present unit answered.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    Value { readout: Readout, took: Duration },
    Exception { code: u8, took: Duration },
    Late { took: Duration },
}

/// The scan of one setting.
#[derive(Debug, Clone)]
struct SettingScan {
    transport: Transport,
    timing: Timing,
    tried: usize,
    /// Units that answered, in the order tried.
    found: Vec<(u8, Answer)>,
    silent: usize,
    garbled: usize,
    /// The first garbled answer, in words.
    garbled_why: Option<String>,
    broken: usize,
    broken_why: Option<String>,
    /// Gateway exceptions (0x0A, 0x0B): a Modbus TCP gateway saying nothing answers behind it.
    gateway: usize,
    abandoned: bool,
}

impl SettingScan {
    fn new(transport: Transport, timing: Timing) -> SettingScan {
        SettingScan {
            transport,
            timing,
            tried: 0,
            found: Vec::new(),
            silent: 0,
            garbled: 0,
            garbled_why: None,
            broken: 0,
            broken_why: None,
            gateway: 0,
            abandoned: false,
        }
    }

    fn record(&mut self, unit: u8, heard: Heard) {
        self.tried += 1;
        match heard {
            Heard::Answer { readout, took } => self.found.push((unit, Answer::Value { readout, took })),
            // "Gateway path unavailable" and "gateway target device failed to respond" are the
            // gateway's answer that nothing is there: listing them would list every unit id.
            Heard::Exception { code: 0x0A | 0x0B, .. } => self.gateway += 1,
            Heard::Exception { code, took } => self.found.push((unit, Answer::Exception { code, took })),
            Heard::Late { took } => self.found.push((unit, Answer::Late { took })),
            Heard::Garbage { why } => {
                self.garbled += 1;
                self.garbled_why.get_or_insert(why);
            }
            Heard::Silent => self.silent += 1,
            Heard::Broken { why } => {
                self.broken += 1;
                self.broken_why.get_or_insert(why);
            }
        }
    }

    /// Every answer so far garbled, and enough of them: give the setting up.
    fn hopeless(&self) -> bool {
        self.found.is_empty() && self.gateway == 0 && self.garbled >= GARBAGE_LIMIT
    }
}

/// What a finished scan found; printed as text, JSON or config blocks.
#[derive(Debug, Clone)]
pub struct ScanReport {
    units: Units,
    table: Table,
    address: u16,
    profile: Option<String>,
    settings: Vec<SettingScan>,
    took: Duration,
}

/// One setting's outcome, for scripts and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingOutcome {
    /// `9600 8N1`, `tcp HOST:PORT` or `rtu-over-tcp HOST:PORT`.
    pub label: String,
    /// Units tried.
    pub tried: usize,
    /// Units that answered (a value, an exception or a late answer), in the order tried.
    pub found: Vec<u8>,
    /// Garbled answers.
    pub garbled: usize,
    /// Given up after [`GARBAGE_LIMIT`] garbled answers and no valid one.
    pub abandoned: bool,
}

/// Where the scan is, for the progress line.
struct Progress<'a> {
    label: &'a str,
    unit: u8,
    done: usize,
    /// Tries in all, less those of settings given up.
    total: usize,
    found: usize,
    elapsed: Duration,
    /// A try's cost before any was measured.
    estimate: Duration,
}

/// Run `scan` and print its output.
pub(crate) async fn scan_main(args: ScanArgs) -> anyhow::Result<()> {
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let all = settings(&args);
    let upper: Duration = all
        .iter()
        .map(|t| Timing::auto(t, args.timeout).absent_cost() * args.units.0.len() as u32)
        .sum();
    if let Some(first) = all.first() {
        let t = Timing::auto(first, args.timeout);
        eprintln!(
            "Scanning {} unit id(s) on {} at {} setting(s), {} {}: about {} if none answers ({} a try at {}, {} an absent unit).",
            args.units.0.len(),
            line_label(first),
            all.len(),
            Table::from(args.table),
            args.address,
            seconds(upper),
            ms(t.timeout),
            setting_label(first),
            ms(t.absent_cost())
        );
    }
    let mut last_draw: Option<Instant> = None;
    let mut draw = |p: &Progress<'_>| {
        // At most ten redraws a second: a fast line tries hundreds of units a second.
        if terminal && last_draw.is_none_or(|t| t.elapsed() >= Duration::from_millis(100)) {
            last_draw = Some(Instant::now());
            eprint!("\r\x1b[2K{}", progress_line(p));
            let _ = std::io::stderr().flush();
        }
    };
    let result = scan_with(args.clone(), &mut draw).await;
    if terminal {
        eprint!("\r\x1b[2K");
    }
    let report = result?;
    if args.json {
        eprint!("{}", report.summary());
        println!("{}", serde_json::to_string_pretty(&report.json())?);
    } else if args.emit_config {
        eprint!("{}", report.summary());
        print!("{}", report.config_blocks());
    } else {
        print!("{}", report.text());
    }
    Ok(())
}

/// Run `scan` (no output); what it found.
pub async fn scan_run(args: ScanArgs) -> Result<ScanReport, ScanError> {
    scan_with(args, &mut |_| {}).await
}

async fn scan_with(args: ScanArgs, progress: &mut dyn FnMut(&Progress<'_>)) -> Result<ScanReport, ScanError> {
    let all = settings(&args);
    if all.is_empty() {
        return Err(ScanError::NoLine);
    }
    let table = Table::from(args.table);
    let units = args.units.0.clone();
    let started = Instant::now();
    let mut total = all.len() * units.len();
    let mut done = 0;
    let mut scans: Vec<SettingScan> = Vec::new();
    for transport in &all {
        let timing = Timing::auto(transport, args.timeout);
        let label = setting_label(transport);
        let mut scan = SettingScan::new(transport.clone(), timing);
        let found_before: usize = scans.iter().map(|s| s.found.len()).sum();
        let mut line = ScanLine::open(transport, timing)
            .await
            .map_err(|e| open_failed(e, transport, &scans, None))?;
        for &unit in &units {
            progress(&Progress {
                label: &label,
                unit,
                done,
                total,
                found: found_before + scan.found.len(),
                elapsed: started.elapsed(),
                estimate: timing.absent_cost(),
            });
            let heard = match line.try_unit(unit, table, args.address).await {
                Ok(heard) => heard,
                Err(e) => {
                    scans.push(scan);
                    return Err(open_failed(e, transport, &scans, Some(unit)));
                }
            };
            done += 1;
            scan.record(unit, heard);
            if scan.hopeless() {
                scan.abandoned = true;
                total -= units.len() - scan.tried;
                break;
            }
        }
        line.close().await;
        scans.push(scan);
    }
    Ok(ScanReport {
        units: args.units,
        table,
        address: args.address,
        profile: args.profile,
        settings: scans,
        took: started.elapsed(),
    })
}

/// The error of a line that cannot be opened, with what was found before and the advice `probe` gives.
fn open_failed(error: ProbeError, transport: &Transport, scans: &[SettingScan], unit: Option<u8>) -> ScanError {
    let mut what = format!("{} at {}", line_label(transport), setting_label(transport));
    if let Some(unit) = unit {
        what.push_str(&format!(", reopening it before unit {unit}"));
    }
    let found: BTreeSet<u8> = scans.iter().flat_map(|s| s.found.iter().map(|(u, _)| *u)).collect();
    if !found.is_empty() {
        let list: Vec<String> = found.iter().map(u8::to_string).collect();
        what.push_str(&format!(" (found before it failed: {})", list.join(", ")));
    }
    let by_id = if error.error_code() == "open" {
        crate::cli::probe::serial_by_id()
    } else {
        Vec::new()
    };
    ScanError::Open {
        advice: crate::cli::probe::advice(&error, transport, unit.unwrap_or(1), &by_id),
        what,
        error,
    }
}

impl ScanReport {
    /// Every unit that answered at some setting, ascending.
    pub fn found_units(&self) -> Vec<u8> {
        let set: BTreeSet<u8> = self
            .settings
            .iter()
            .flat_map(|s| s.found.iter().map(|(u, _)| *u))
            .collect();
        set.into_iter().collect()
    }

    /// Each setting's outcome, in the order scanned.
    pub fn outcomes(&self) -> Vec<SettingOutcome> {
        self.settings
            .iter()
            .map(|s| SettingOutcome {
                label: setting_label(&s.transport),
                tried: s.tried,
                found: s.found.iter().map(|(u, _)| *u).collect(),
                garbled: s.garbled,
                abandoned: s.abandoned,
            })
            .collect()
    }

    /// The JSON array: one object per unit found, ascending, with every setting it answered at
    /// (`serial`, `baud`, `parity`, `data_bits`, `stop_bits`, or `tcp` / `rtu_over_tcp`: the keys of a
    /// `[[bus]]`) and what it answered there (`answer`: `value` with `value`, `exception` with
    /// `exception_code` and `exception_name`, or `late`; `table`, `address`, `answer_ms`).
    pub fn json(&self) -> Value {
        let units: Vec<Value> = self
            .found_units()
            .into_iter()
            .map(|unit| {
                let at: Vec<Value> = self
                    .settings
                    .iter()
                    .flat_map(|s| {
                        s.found
                            .iter()
                            .filter(move |(u, _)| *u == unit)
                            .map(move |(_, a)| self.answer_json(&s.transport, a))
                    })
                    .collect();
                json!({ "unit": unit, "settings": at })
            })
            .collect();
        Value::Array(units)
    }

    fn answer_json(&self, transport: &Transport, answer: &Answer) -> Value {
        let mut o = serde_json::Map::new();
        match transport {
            Transport::Serial {
                path,
                baud,
                parity,
                data_bits,
                stop_bits,
                rs485,
            } => {
                o.insert("serial".into(), json!(path));
                if let Some(r) = rs485 {
                    o.insert("rs485".into(), json!(rs485_toml(r)));
                }
                o.insert("baud".into(), json!(baud));
                o.insert("parity".into(), json!(parity.word()));
                o.insert("data_bits".into(), json!(data_bits));
                o.insert("stop_bits".into(), json!(stop_bits));
            }
            Transport::Tcp(addr) => {
                o.insert("tcp".into(), json!(addr));
            }
            Transport::RtuOverTcp(addr) => {
                o.insert("rtu_over_tcp".into(), json!(addr));
            }
        }
        o.insert("table".into(), json!(self.table.to_string()));
        o.insert("address".into(), json!(self.address));
        let round = |d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
        match answer {
            Answer::Value { readout, took } => {
                o.insert("answer".into(), json!("value"));
                o.insert("value".into(), json!(first_value(readout)));
                o.insert("answer_ms".into(), json!(round(*took)));
            }
            Answer::Exception { code, took } => {
                o.insert("answer".into(), json!("exception"));
                o.insert("exception_code".into(), json!(code));
                o.insert("exception_name".into(), json!(exception_name(*code)));
                o.insert("answer_ms".into(), json!(round(*took)));
            }
            Answer::Late { took } => {
                o.insert("answer".into(), json!("late"));
                o.insert("answer_ms".into(), json!(round(*took)));
            }
        }
        Value::Object(o)
    }

    /// The header, the settings and what to do next (without the units' table): what goes to stderr
    /// beside `--json` and `--emit-config`.
    pub fn summary(&self) -> String {
        let mut out = self.header();
        out.push_str(&self.settings_table());
        out.push_str(&self.notes(false));
        out
    }

    /// The whole report: header, settings, every answer, what to do next.
    pub fn text(&self) -> String {
        let mut out = self.header();
        out.push_str(&self.settings_table());
        let rows: Vec<Vec<String>> = self
            .settings
            .iter()
            .flat_map(|s| s.found.iter().map(move |(u, a)| (s, *u, a)))
            .map(|(s, unit, a)| {
                let (what, took) = self.answer_text(s, a);
                vec![unit.to_string(), setting_label(&s.transport), what, took]
            })
            .collect();
        if !rows.is_empty() {
            out.push('\n');
            out.push_str(&table(&["UNIT", "SETTING", "ANSWER", "TIME"], &rows));
        }
        out.push_str(&self.notes(true));
        out
    }

    fn header(&self) -> String {
        let line = self
            .settings
            .first()
            .map(|s| line_label(&s.transport))
            .unwrap_or_default();
        format!(
            "Scanned units {} on {line} ({} {}), {} setting(s), in {}.\n\n",
            ranges(&self.units.0),
            self.table,
            self.address,
            self.settings.len(),
            seconds(self.took)
        )
    }

    fn settings_table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .settings
            .iter()
            .map(|s| {
                vec![
                    setting_label(&s.transport),
                    ms(s.timing.timeout),
                    s.tried.to_string(),
                    s.found.len().to_string(),
                    s.garbled.to_string(),
                    setting_note(s),
                ]
            })
            .collect();
        table(&["SETTING", "TIMEOUT", "TRIED", "FOUND", "GARBLED", "NOTE"], &rows)
    }

    fn answer_text(&self, s: &SettingScan, a: &Answer) -> (String, String) {
        match a {
            Answer::Value { readout, took } => {
                let v = first_value(readout);
                let text = match readout {
                    Readout::Registers(_) => format!("{} {} = {v} ({v:#06x})", self.table, self.address),
                    Readout::Bits(_) => format!("{} {} = {v}", self.table, self.address),
                };
                (text, ms(*took))
            }
            Answer::Exception { code, took } => (
                format!("exception {code:#04x} ({}): present", exception_name(*code)),
                ms(*took),
            ),
            Answer::Late { took } => (
                format!("late: after the {} timeout (slow, but present)", ms(s.timing.timeout)),
                ms(*took),
            ),
        }
    }

    /// What the scan means and what to check; `next`: and the next step (the table's output only).
    fn notes(&self, next: bool) -> String {
        let mut notes: Vec<String> = Vec::new();
        let found = self.found_units();
        let Some(first) = self.settings.first() else {
            return String::new();
        };
        let serial = matches!(first.transport, Transport::Serial { .. });
        if found.is_empty() {
            notes.push(match &first.transport {
                Transport::Serial { .. } => "No unit answered. Check that the meters are powered, the wiring (A/B swapped? common ground? termination at both ends?) and the line settings: try --all-bauds --parity none,even,odd. A slow meter: --timeout 500ms.".to_string(),
                Transport::Tcp(_) => "No unit answered. Check the unit ids (many TCP devices answer only 1); if the device server passes RTU frames through, try --rtu-over-tcp. A slow device: --timeout 1s.".to_string(),
                Transport::RtuOverTcp(_) => "No unit answered. Check the device server's serial settings (baud, parity) and the RS-485 wiring behind it; if it is a Modbus TCP gateway, try --tcp. A slow device: --timeout 1s.".to_string(),
            });
        } else {
            let list: Vec<String> = found.iter().map(u8::to_string).collect();
            notes.push(format!("{} unit(s) answered: {}.", found.len(), list.join(", ")));
        }
        let late: BTreeSet<u8> = self
            .settings
            .iter()
            .flat_map(|s| s.found.iter())
            .filter(|(_, a)| matches!(a, Answer::Late { .. }))
            .map(|(u, _)| *u)
            .collect();
        if !late.is_empty() {
            let list: Vec<String> = late.iter().map(u8::to_string).collect();
            notes.push(format!(
                "Unit(s) {} answered after the timeout: they are there, but slow. Scan them again with a longer --timeout to read them; the bus `timeout` must be above their answer time (--emit-config sets it).",
                list.join(", ")
            ));
        }
        for s in &self.settings {
            if s.gateway > 0 {
                notes.push(format!(
                    "At {}, the gateway answered for {} unit id(s) that nothing answers behind it (exception 0x0a/0x0b): not listed.",
                    setting_label(&s.transport),
                    s.gateway
                ));
            }
            if !serial && s.tried >= 2 && s.found.len() == s.tried {
                notes.push(format!(
                    "Every unit id answered at {}: the device ignores the unit id. Configure it with one unit (1, or the one its manual names).",
                    setting_label(&s.transport)
                ));
            }
            if s.broken > 0 {
                notes.push(format!(
                    "At {}, the line broke during {} tr(ies) and was reopened: {}.",
                    setting_label(&s.transport),
                    s.broken,
                    s.broken_why.as_deref().unwrap_or("")
                ));
            }
        }
        if serial && self.settings.iter().filter(|s| !s.found.is_empty()).count() > 1 {
            notes.push(format!(
                "Units answered at more than one setting. One line has one setting: --emit-config uses {}, where the most answered.",
                main_setting(&self.settings)
                    .map(|s| setting_label(&s.transport))
                    .unwrap_or_default()
            ));
        }
        if let (true, Some(s), Some(&unit)) = (next, main_setting(&self.settings), found.first()) {
            notes.push(format!(
                "Next: read more of a meter, e.g. `fieldgate probe {} --unit {unit} --table {} --address {} --count 4`, then write the config: the same scan with --emit-config.",
                probe_line_args(&s.transport),
                self.table,
                self.address
            ));
        }
        let mut out = String::from("\n");
        for n in notes {
            out.push_str(&n);
            out.push('\n');
        }
        out
    }

    /// `[[bus]]` and `[[meter]]` blocks for the units found at the setting where the most answered (one
    /// line has one setting; units found only at another are named in a comment). `fieldgate check`
    /// accepts them once each placeholder `meter_no` is in the mapping; the valve is a placeholder at the
    /// scanned point unless `--profile` names one.
    pub fn config_blocks(&self) -> String {
        let Some(main) = main_setting(&self.settings) else {
            return format!(
                "# fieldgate scan: no unit answered on {}: nothing to configure.\n",
                self.settings
                    .first()
                    .map(|s| line_label(&s.transport))
                    .unwrap_or_default()
            );
        };
        let bus = bus_name(&main.transport);
        let mut out = format!(
            "# fieldgate scan of {}, units {} ({} {}): {} unit(s) at {}.\n\
             # Before `fieldgate check`: give each meter its meter_no (水表表号 in the mapping) and its valve\n\
             # and readings (a [profile.*] of the meter model, or points found with `fieldgate probe`).\n\n",
            line_label(&main.transport),
            ranges(&self.units.0),
            self.table,
            self.address,
            main.found.len(),
            setting_label(&main.transport)
        );
        out.push_str(&format!("[[bus]]\nname = {}\n", toml_str(&bus)));
        match &main.transport {
            Transport::Serial {
                path,
                baud,
                parity,
                data_bits,
                stop_bits,
                rs485,
            } => {
                out.push_str(&format!(
                    "serial = {}\nbaud = {baud}\nparity = \"{}\"\ndata_bits = {data_bits}\nstop_bits = {stop_bits}\n",
                    toml_str(path),
                    parity.word()
                ));
                if let Some(r) = rs485 {
                    out.push_str(&format!("rs485 = {}\n", rs485_toml(r)));
                }
            }
            Transport::Tcp(addr) => out.push_str(&format!("tcp = {}\n", toml_str(addr))),
            Transport::RtuOverTcp(addr) => out.push_str(&format!("rtu_over_tcp = {}\n", toml_str(addr))),
        }
        let slowest = main
            .found
            .iter()
            .map(|(_, a)| match a {
                Answer::Value { took, .. } | Answer::Exception { took, .. } | Answer::Late { took } => *took,
            })
            .max()
            .unwrap_or_default();
        out.push_str(&format!(
            "timeout = \"{}\"                # slowest answer seen: {}\n",
            humantime::format_duration(bus_timeout(slowest)),
            ms(slowest)
        ));
        for (unit, answer) in &main.found {
            let said = match answer {
                Answer::Value { readout, .. } => format!("{} {} = {}", self.table, self.address, first_value(readout)),
                Answer::Exception { code, .. } => format!("exception {code:#04x} ({})", exception_name(*code)),
                Answer::Late { .. } => "late".to_string(),
            };
            out.push_str(&format!(
                "\n[[meter]]\nmeter_no = {}   # placeholder: its 水表表号 in the mapping\nbus = {}\nunit = {unit}                       # answered: {said}\n",
                toml_str(&format!("{bus}-u{unit}")),
                toml_str(&bus)
            ));
            match &self.profile {
                Some(p) => out.push_str(&format!("profile = {}\n", toml_str(p))),
                None => out.push_str(&format!(
                    "valve = {{ table = \"{}\", address = {}, states = {{ 0 = \"关闭\", 1 = \"开启\" }} }}   # placeholder: the valve's point\n",
                    self.table, self.address
                )),
            }
        }
        let elsewhere: Vec<String> = self
            .settings
            .iter()
            .filter(|s| !std::ptr::eq(*s, main))
            .flat_map(|s| {
                s.found
                    .iter()
                    .filter(|(u, _)| !main.found.iter().any(|(m, _)| m == u))
                    .map(move |(u, _)| format!("unit {u} at {}", setting_label(&s.transport)))
            })
            .collect();
        if !elsewhere.is_empty() {
            out.push_str(&format!(
                "\n# Not configured: {} answered only at another setting. One line has one setting:\n\
                 # set those meters to {} (see their manuals) and scan again.\n",
                elsewhere.join(", "),
                setting_label(&main.transport)
            ));
        }
        out
    }
}

/// The setting where the most units answered (the first of equals), if any did.
fn main_setting(scans: &[SettingScan]) -> Option<&SettingScan> {
    scans
        .iter()
        .filter(|s| !s.found.is_empty())
        .fold(None, |best: Option<&SettingScan>, s| match best {
            Some(b) if b.found.len() >= s.found.len() => Some(b),
            _ => Some(s),
        })
}

/// The bus `timeout` for answers that took up to `slowest`: the `[[bus]]` default, or twice the
/// slowest answer rounded up to 100 ms when that is more (at most a minute).
fn bus_timeout(slowest: Duration) -> Duration {
    let twice = slowest.as_millis().saturating_mul(2);
    let rounded = twice.div_ceil(100).saturating_mul(100);
    let rounded = Duration::from_millis(u64::try_from(rounded).unwrap_or(u64::MAX));
    rounded.clamp(CONFIG_TIMEOUT, MAX_TIMEOUT)
}

/// A bus name from the line: the device's file name, or the kind and address; only characters that
/// read well in a log line and a metric label.
fn bus_name(t: &Transport) -> String {
    let raw = match t {
        Transport::Serial { path, .. } => std::path::Path::new(path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "serial".into()),
        Transport::Tcp(addr) => format!("tcp-{addr}"),
        Transport::RtuOverTcp(addr) => format!("rtu-{addr}"),
    };
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// A TOML basic string (or literal string), quoted and escaped as needed.
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The first (only) item read, as a number.
fn first_value(readout: &Readout) -> u16 {
    match readout {
        Readout::Registers(w) => w.first().copied().unwrap_or(0),
        Readout::Bits(b) => u16::from(b.first().copied().unwrap_or(false)),
    }
}

/// The line without its setting: `serial PATH`, `tcp HOST:PORT`, `rtu-over-tcp HOST:PORT`.
fn line_label(t: &Transport) -> String {
    match t {
        Transport::Serial { path, .. } => format!("serial {path}"),
        other => setting_label(other),
    }
}

/// The `fieldgate probe` arguments for a line at a setting.
fn probe_line_args(t: &Transport) -> String {
    match t {
        Transport::Serial {
            path,
            baud,
            parity,
            stop_bits,
            ..
        } => {
            let mut s = format!("--serial {path} --baud {baud} --parity {}", parity.word());
            if *stop_bits != 1 {
                s.push_str(&format!(" --stop-bits {stop_bits}"));
            }
            s
        }
        Transport::Tcp(a) => format!("--tcp {a}"),
        Transport::RtuOverTcp(a) => format!("--rtu-over-tcp {a}"),
    }
}

/// Unit ids as ranges: `1-8,20`.
fn ranges(units: &[u8]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while let Some(&start) = units.get(i) {
        let mut end = start;
        while units.get(i + 1).is_some_and(|&n| u16::from(n) == u16::from(end) + 1) {
            i += 1;
            end = units.get(i).copied().unwrap_or(end);
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

/// Why a setting's row reads as it does.
fn setting_note(s: &SettingScan) -> String {
    if s.abandoned {
        let hint = match s.transport {
            Transport::Serial { .. } => "wrong baud rate or parity?",
            Transport::Tcp(_) => "RTU frames? try --rtu-over-tcp",
            Transport::RtuOverTcp(_) => "Modbus TCP? try --tcp",
        };
        return format!(
            "given up: {} garbled answers and no valid one ({hint}); first: {}",
            s.garbled,
            s.garbled_why.as_deref().unwrap_or("")
        );
    }
    let late = s.found.iter().filter(|(_, a)| matches!(a, Answer::Late { .. })).count();
    let mut parts = Vec::new();
    if late > 0 {
        parts.push(format!("{late} late"));
    }
    if s.garbled > 0 {
        parts.push(format!("garbled: {}", s.garbled_why.as_deref().unwrap_or("")));
    }
    parts.join("; ")
}

/// A short duration in ms: `49.6 ms`.
fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// A longer duration: `24.5 s`, `3 min 20 s`.
fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 120.0 {
        format!("{s:.1} s")
    } else {
        format!("{} min {} s", (s / 60.0).floor(), (s % 60.0).floor())
    }
}

/// The progress line: share done, a bar, the setting and unit, units found, and the time left.
fn progress_line(p: &Progress<'_>) -> String {
    let share = if p.total == 0 {
        1.0
    } else {
        p.done as f64 / p.total as f64
    };
    let filled = ((share * 20.0).round() as usize).min(20);
    let eta = eta(p.elapsed, p.done, p.total, p.estimate);
    format!(
        "{:>3}% [{}{}] {}  unit {}  found {}  ETA {}:{:02}",
        (share * 100.0).round() as u32,
        "#".repeat(filled),
        "-".repeat(20 - filled),
        p.label,
        p.unit,
        p.found,
        eta.as_secs() / 60,
        eta.as_secs() % 60
    )
}

/// Time left: the tries left at the mean cost of those done, or at `estimate` before any is done.
fn eta(elapsed: Duration, done: usize, total: usize, estimate: Duration) -> Duration {
    let left = total.saturating_sub(done) as u32;
    if done == 0 {
        estimate * left
    } else {
        (elapsed / done as u32) * left
    }
}

/// `rs485` as the TOML inline table of a `[[bus]]` (what `--rs485` asked for, every key written).
fn rs485_toml(r: &Rs485) -> String {
    format!(
        "{{ rts_on_send = {}, rts_after_send = {}, delay_before_send = \"{}ms\", delay_after_send = \"{}ms\" }}",
        r.rts_on_send,
        r.rts_after_send,
        r.delay_before_send.as_millis(),
        r.delay_after_send.as_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ScanArgs,
    }

    fn parse(argv: &[&str]) -> Result<ScanArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("scan").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn units_take_numbers_ranges_and_lists() {
        assert_eq!(parse_units("1-10,20").unwrap().0, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 20]);
        assert_eq!(parse_units("5").unwrap().0, [5]);
        assert_eq!(parse_units(" 3 , 1-2 ,2").unwrap().0, [1, 2, 3], "sorted, each once");
        assert_eq!(parse_units("1-247").unwrap().0.len(), 247);
        for (bad, says) in [
            ("0", "unit 0 is out of range: allowed 1..=247"),
            ("1-248", "unit 248 is out of range"),
            ("10-1", "runs backwards: write 1-10"),
            ("a", "`a` is not a unit id"),
            ("1,,2", "empty item"),
            ("", "empty item"),
            ("1-", "`` is not a unit id"),
        ] {
            let e = parse_units(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn settings_are_every_baud_parity_and_stop_bits_in_order() {
        let a = parse(&["--serial", "/dev/x", "--baud", "9600,19200", "--parity", "none,even"]).unwrap();
        let labels: Vec<String> = settings(&a).iter().map(setting_label).collect();
        assert_eq!(labels, ["9600 8N1", "9600 8E1", "19200 8N1", "19200 8E1"]);
        let a = parse(&["--serial", "/dev/x"]).unwrap();
        assert_eq!(settings(&a).iter().map(setting_label).collect::<Vec<_>>(), ["9600 8N1"]);
        let a = parse(&["--serial", "/dev/x", "--all-bauds", "--stop-bits", "2"]).unwrap();
        let labels: Vec<String> = settings(&a).iter().map(setting_label).collect();
        assert_eq!(labels.len(), 8);
        assert_eq!(labels[0], "9600 8N2");
        assert_eq!(labels[7], "1200 8N2");
        let a = parse(&["--tcp", "h:502", "--units", "1-3"]).unwrap();
        assert_eq!(settings(&a), [Transport::Tcp("h:502".into())]);
    }

    #[test]
    fn bad_arguments_are_refused_with_what_is_allowed() {
        let e = |argv: &[&str]| parse(argv).unwrap_err().to_string();
        assert!(e(&[]).contains("--serial"), "{}", e(&[]));
        assert!(e(&["--tcp", "a:1", "--serial", "/dev/x"]).contains("cannot be used with"));
        assert!(e(&["--tcp", "a:1", "--baud", "9600"]).contains("cannot be used with"));
        assert!(e(&["--serial", "/dev/x", "--baud", "9600", "--all-bauds"]).contains("cannot be used with"));
        assert!(e(&["--serial", "/dev/x", "--baud", "96"]).contains("allowed 300..=4000000"));
        assert!(e(&["--serial", "/dev/x", "--units", "300"]).contains("unit 300 is out of range: allowed 1..=247"));
        assert!(e(&["--serial", "/dev/x", "--parity", "mark"]).contains("mark"));
        assert!(e(&["--serial", "/dev/x", "--stop-bits", "3"]).contains("3"));
        assert!(e(&["--serial", "/dev/x", "--timeout", "0s"]).contains("more than 0"));
        assert!(e(&["--serial", "/dev/x", "--timeout", "2m"]).contains("at most 1m"));
        assert!(e(&["--serial", "/dev/x", "--json", "--emit-config"]).contains("cannot be used with"));
        assert!(e(&["--serial", "/dev/x", "--profile", "p"]).contains("--emit-config"));
    }

    #[test]
    fn unit_lists_print_as_ranges() {
        assert_eq!(ranges(&[1, 2, 3, 5, 7, 8, 247]), "1-3,5,7-8,247");
        assert_eq!(ranges(&[]), "");
        assert_eq!(ranges(&parse_units("1-247").unwrap().0), "1-247");
    }

    #[test]
    fn the_progress_line_shows_share_setting_unit_found_and_time_left() {
        let p = Progress {
            label: "9600 8N1",
            unit: 62,
            done: 61,
            total: 244,
            found: 2,
            elapsed: Duration::from_millis(6100),
            estimate: Duration::from_millis(99),
        };
        assert_eq!(
            progress_line(&p),
            " 25% [#####---------------] 9600 8N1  unit 62  found 2  ETA 0:18"
        );
        // Before any try: the estimate.
        assert_eq!(
            eta(Duration::ZERO, 0, 247, Duration::from_millis(100)),
            Duration::from_millis(24_700)
        );
    }

    #[test]
    fn the_config_timeout_is_the_default_or_twice_the_slowest_answer() {
        assert_eq!(bus_timeout(Duration::from_millis(12)), CONFIG_TIMEOUT);
        assert_eq!(bus_timeout(Duration::from_millis(180)), Duration::from_millis(400));
        assert_eq!(bus_timeout(Duration::from_secs(100)), MAX_TIMEOUT);
    }

    #[test]
    fn bus_names_come_from_the_line() {
        let serial = Transport::Serial {
            path: "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A10K1ABC-if00-port0".into(),
            baud: 9600,
            parity: Parity::None,
            data_bits: 8,
            stop_bits: 1,
            rs485: None,
        };
        assert_eq!(bus_name(&serial), "usb-FTDI_FT232R_USB_UART_A10K1ABC-if00-port0");
        assert_eq!(bus_name(&Transport::Tcp("10.0.0.5:502".into())), "tcp-10.0.0.5-502");
        for tricky in ["a\"b\\", "it's", "/dev/ttyUSB0", "a'\"b", "tab\tnew\nline\u{7f}", "表"] {
            let doc: toml::Table = toml::from_str(&format!("x = {}", toml_str(tricky))).unwrap();
            assert_eq!(doc["x"].as_str(), Some(tricky), "{}", toml_str(tricky));
        }
    }

    /// A setting with only garbled answers is given up at the bound, not before; one valid answer keeps
    /// it going.
    #[test]
    fn a_setting_is_given_up_after_the_bound_of_garbled_answers_with_none_valid() {
        let t = Transport::Tcp("h:1".into());
        let mut s = SettingScan::new(t.clone(), Timing::auto(&t, None));
        let garbage = || Heard::Garbage { why: "x".into() };
        for u in 1..GARBAGE_LIMIT as u8 {
            s.record(u, garbage());
            assert!(!s.hopeless(), "after {u}");
        }
        s.record(GARBAGE_LIMIT as u8, garbage());
        assert!(s.hopeless());
        let mut s = SettingScan::new(t.clone(), Timing::auto(&t, None));
        s.record(
            1,
            Heard::Exception {
                code: 2,
                took: Duration::ZERO,
            },
        );
        for u in 2..20 {
            s.record(u, garbage());
        }
        assert!(!s.hopeless(), "a unit answered at this setting");
        assert_eq!(s.found.len(), 1);
        // Silence never gives a setting up: absent units are silent.
        let mut s = SettingScan::new(t.clone(), Timing::auto(&t, None));
        for u in 1..100 {
            s.record(u, Heard::Silent);
        }
        assert!(!s.hopeless());
        // A gateway's "nothing behind me" is an answer of the gateway, not a unit.
        s.record(
            100,
            Heard::Exception {
                code: 0x0B,
                took: Duration::ZERO,
            },
        );
        assert_eq!((s.found.len(), s.gateway), (0, 1));
    }

    #[test]
    fn an_emitted_rs485_table_reads_back_as_the_option_asked_for() {
        let asked = crate::config::parse_rs485_option("rts_on_send=false,delay_before_send=2ms").unwrap();
        let text = format!("rs485 = {}", rs485_toml(&asked));
        let back: toml::Table = toml::from_str(&text).unwrap();
        let t = back["rs485"].as_table().unwrap();
        assert_eq!(t["rts_on_send"].as_bool(), Some(false));
        assert_eq!(t["rts_after_send"].as_bool(), Some(true));
        assert_eq!(t["delay_before_send"].as_str(), Some("2ms"));
        assert_eq!(t["delay_after_send"].as_str(), Some("0ms"));
    }
}

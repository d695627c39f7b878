//! The command line: `run`, `check`, `status`, `probe`, `scan`, `outbox`, `demo`, `simulate`, `mock-panda`. Thin:
//! each subcommand parses its arguments and calls the library. Exit codes: 0 done, 1 failed at run time,
//! 2 bad configuration or arguments.
//!
//! What lives where:
//! - this file: the clap commands, the dispatch to each subcommand, `run` and `check`, and the logging
//!   setup ([`log_filter`]).
//! - [`admin_client`]: the client of the running daemon's admin API (GET JSON with a timeout, plain
//!   errors when the daemon is not there) and the API's address from `[admin] listen`.
//! - [`status`]: `fieldgate status`, the daemon's health, buses, meters and outbox as tables.
//! - [`outbox`]: `fieldgate outbox …`, on a stopped daemon's state directory or through the admin API.
//! - [`probe`]: `fieldgate probe`, one Modbus read printed in every word and byte order.
//! - [`scan`]: `fieldgate scan`, the units that answer on a line, at which settings, with what.
//! - `table`: the text layout they share (aligned columns, short durations).
//!
//! Imports run one way: `table` ← `status` ← `outbox`, `table` ← `probe` ← `scan`, and `admin_client` ← `status`
//! and `outbox`. The admin API's answers are read as [`crate::ops::api`] types; the server
//! ([`crate::ops::admin`]) is never imported.
//!
//! Never: opens the state database while the daemon holds it (sled allows one process: the admin API is
//! the way in then).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config;

pub mod admin_client;
pub mod outbox;
pub mod probe;
pub mod scan;
pub mod status;
pub(crate) mod table;

/// Exit code for configuration errors (the contract of `fieldgate check`).
const EXIT_CONFIG: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "fieldgate",
    version,
    about = "Modbus valves and meters -> durable outbox -> Panda work orders"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (the daemon) until SIGTERM or Ctrl-C.
    Run {
        /// The site configuration.
        #[arg(long, short, default_value = "/etc/fieldgate/fieldgate.toml")]
        config: PathBuf,
    },
    /// Validate a configuration and its mapping file; print every error; exit 2 on any.
    Check {
        /// The site configuration.
        #[arg(long, short, default_value = "/etc/fieldgate/fieldgate.toml")]
        config: PathBuf,
    },
    /// Show the whole product in one process: simulated meters, a mock Panda server and the gateway.
    Demo(crate::tools::demo::DemoArgs),
    /// A Modbus slave simulator with N meters (TCP or RTU on a serial device).
    Simulate(crate::tools::simulator::SimulateArgs),
    /// A strict Panda WorkFlow server for tests and commissioning.
    MockPanda(crate::tools::mock_panda::MockPandaArgs),
    /// The outbox: `stats`, `list` (queued records), `dead` (dead letters), `corrupt` (unreadable entries
    /// set aside), `requeue ID|--all`.
    Outbox(crate::cli::outbox::OutboxArgs),
    /// Buses, meters, outbox and health of the running daemon, from its admin API.
    Status(crate::cli::status::StatusArgs),
    /// Read registers or bits once and print them in every word and byte order (commissioning).
    Probe(crate::cli::probe::ProbeArgs),
    /// Find the meters on a line: which unit ids answer, at which baud rate and parity, with what.
    Scan(crate::cli::scan::ScanArgs),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Demo(_) => "warn",
        // A wrong baud rate garbles every answer, and tokio-modbus logs each one it cannot decode: the
        // scan counts and reports them itself.
        Command::Scan(_) => "warn,tokio_modbus=off",
        _ => "info",
    };
    init_logging(cli.log_format, default_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fieldgate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(dispatch(cli.command))
}

async fn dispatch(command: Command) -> ExitCode {
    match command {
        Command::Check { config } => check(&config),
        Command::Run { config } => run(&config).await,
        Command::Demo(args) => report(crate::tools::demo::demo_main(args).await),
        Command::Simulate(args) => report(crate::tools::simulator::simulate_main(args).await),
        Command::MockPanda(args) => report(crate::tools::mock_panda::mock_panda_main(args).await),
        Command::Outbox(args) => report(crate::cli::outbox::outbox_main(args).await),
        Command::Status(args) => report(crate::cli::status::status_main(args).await),
        Command::Probe(args) => report(crate::cli::probe::probe_main(args).await),
        Command::Scan(args) => report(crate::cli::scan::scan_main(args).await),
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fieldgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match config::load(path) {
        Ok(cfg) => {
            println!(
                "{}: OK — site `{}`, {} bus(es), {} meter(s), {} event rule(s), {} mapping row(s) in {}",
                path.display(),
                cfg.site.name,
                cfg.buses.len(),
                cfg.meters.len(),
                cfg.events.len(),
                cfg.mapping.len(),
                cfg.site.mapping.display()
            );
            for note in crate::cli::probe::check_notes(&cfg, path) {
                println!("note: {note}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprint!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

async fn run(path: &std::path::Path) -> ExitCode {
    let cfg = match config::load(path) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprint!("{e}");
            eprintln!(
                "fieldgate: not started; fix the configuration (`fieldgate check --config {}`)",
                path.display()
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match crate::app::run(cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(message = "Gateway failed to start.", error = %e);
            eprintln!("fieldgate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat, default_level: &str) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref(), default_level);
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Human => registry.with(layer).try_init(),
        LogFormat::Json => registry.with(layer.json()).try_init(),
    };
}

/// The log filter: `RUST_LOG` when it is set and valid, else `default_level`. `RUST_LOG` is a
/// comma-separated list of `level`, `target` or `target=level` directives (`debug`,
/// `fieldgate=debug,sled=warn`), a target matching itself and every target below it (`fieldgate` covers
/// `fieldgate::modbus::bus`). An invalid value is ignored as a whole; the span and field filters of
/// tracing's `EnvFilter` (`target[span{field=value}]=level`) are not supported and make the value
/// invalid. An empty `RUST_LOG` logs nothing.
pub fn log_filter(rust_log: Option<&str>, default_level: &str) -> tracing_subscriber::filter::Targets {
    rust_log
        .and_then(parse_log_filter)
        .or_else(|| parse_log_filter(default_level))
        .unwrap_or_default()
}

/// `None` if any directive is invalid.
fn parse_log_filter(s: &str) -> Option<tracing_subscriber::filter::Targets> {
    let directives: Vec<&str> = s.split(',').map(str::trim).filter(|d| !d.is_empty()).collect();
    if directives.iter().any(|d| d.contains(['[', ']', '{', '}'])) {
        return None;
    }
    // `Targets` would take an empty string as the empty target, which matches everything.
    if directives.is_empty() {
        return Some(tracing_subscriber::filter::Targets::new());
    }
    directives.join(",").parse().ok()
}

#[cfg(test)]
mod tests {
    use tracing::Level;
    use tracing_subscriber::filter::LevelFilter;

    use super::log_filter;

    #[test]
    fn rust_log_is_used_when_valid_else_the_default() {
        let f = log_filter(None, "info");
        assert!(f.would_enable("fieldgate::modbus::bus", &Level::INFO));
        assert!(!f.would_enable("fieldgate::modbus::bus", &Level::DEBUG));
        assert!(f.would_enable("sled", &Level::WARN));

        let f = log_filter(Some("debug"), "info");
        assert!(f.would_enable("fieldgate::modbus::bus", &Level::DEBUG));
        assert!(!f.would_enable("fieldgate::modbus::bus", &Level::TRACE));

        let f = log_filter(Some("fieldgate=debug,sled=warn"), "info");
        assert!(f.would_enable("fieldgate::modbus::bus", &Level::DEBUG));
        assert!(f.would_enable("sled::pagecache", &Level::WARN));
        assert!(!f.would_enable("sled::pagecache", &Level::INFO));
        assert!(!f.would_enable("hyper", &Level::ERROR), "only the named targets");

        let f = log_filter(Some("warn,fieldgate::delivery::sender=trace"), "info");
        assert!(f.would_enable("fieldgate::delivery::sender", &Level::TRACE));
        assert!(!f.would_enable("fieldgate::modbus::bus", &Level::INFO));
        assert!(f.would_enable("fieldgate::modbus::bus", &Level::WARN));

        // Case-insensitive levels, `off`, a trailing comma.
        assert!(log_filter(Some("DEBUG,"), "info").would_enable("x", &Level::DEBUG));
        assert_eq!(log_filter(Some("off"), "info").default_level(), Some(LevelFilter::OFF));

        // Invalid: the whole value is ignored.
        for bad in ["fieldgate=loud", "a=b=c", "fieldgate[{bus}]=debug", "[span]=debug"] {
            let f = log_filter(Some(bad), "info");
            assert_eq!(f.default_level(), Some(LevelFilter::INFO), "{bad}");
        }

        // Empty: nothing (not the empty target, which would match everything).
        let f = log_filter(Some(""), "info");
        assert!(!f.would_enable("fieldgate", &Level::ERROR));
    }
}

//! The command line: `run`, `check`, `status`, `probe`, `outbox`, `demo`, `simulate`, `mock-panda`. Thin: each subcommand parses
//! its arguments and calls the library. Exit codes: 0 done, 1 failed at run time, 2 bad configuration
//! or arguments.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config;

/// Exit code for configuration errors (the contract of `fieldgate check`).
pub const EXIT_CONFIG: u8 = 2;

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
    Demo(crate::demo::DemoArgs),
    /// A Modbus slave simulator with N meters (TCP or RTU on a serial device).
    Simulate(crate::simulator::SimulateArgs),
    /// A strict Panda WorkFlow server for tests and commissioning.
    MockPanda(crate::mock_panda::MockPandaArgs),
    /// The outbox: `stats`, `list` (queued records), `dead` (dead letters), `requeue ID|--all`.
    Outbox(crate::outbox_cli::OutboxArgs),
    /// Buses, meters, outbox and health of the running daemon, from its admin API.
    Status(crate::status::StatusArgs),
    /// Read registers or bits once and print them in every word and byte order (commissioning).
    Probe(crate::probe::ProbeArgs),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Demo(_) => "warn",
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
        Command::Demo(args) => report(crate::demo::demo_main(args).await),
        Command::Simulate(args) => report(crate::simulator::simulate_main(args).await),
        Command::MockPanda(args) => report(crate::mock_panda::mock_panda_main(args).await),
        Command::Outbox(args) => report(crate::outbox_cli::outbox_main(args).await),
        Command::Status(args) => report(crate::status::status_main(args).await),
        Command::Probe(args) => report(crate::probe::probe_main(args).await),
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
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

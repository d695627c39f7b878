//! `fieldgate outbox stats|list|dead|corrupt|requeue`: what is queued, seeing and recovering dead
//! letters, and the entries of the state database that could not be read and were set aside.
//!
//! Two ways in, because sled lets one process open the database:
//! - the daemon is stopped: open the state directory directly (`--state-dir D`, or `state_dir` of
//!   `--config F`);
//! - the daemon is running (the database is locked): its admin API, `GET {admin}/healthz` (stats),
//!   `GET {admin}/outbox[?limit=N]`, `GET {admin}/outbox/dead?limit=N&after=ID` (page by page: `dead`
//!   asks for pages of `PAGE_MAX` until a short one), `GET {admin}/outbox/corrupt?limit=N` and
//!   `POST {admin}/outbox/requeue`. Used with `--admin URL`, or found through `[admin] listen` of
//!   `--config` when the database turns out to be locked. Without either, the error says so plainly.
//!
//! It never creates a state directory: a path without a database is an error, not an empty answer.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::admin_client::{admin_url, AdminClient, AdminClientError, DEFAULT_CONFIG};
use crate::config::Limits;
use crate::config::{self, ConfigError};
use crate::ops::api::{
    DeadView, Health, OutboxCounts, OutboxView, RecordView, RequeueAnswer, RequeueRequest, LIST_MAX, PAGE_DEFAULT,
    PAGE_MAX,
};
use crate::ops::health::outbox_counts;
use crate::store::{CorruptEntry, Store, StoreError};

/// `fieldgate outbox …`.
#[derive(Debug, Clone, clap::Args)]
pub struct OutboxArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: OutboxCommand,
    /// The site configuration: its `state_dir`, and its `[admin] listen` when the daemon runs.
    /// Default /etc/fieldgate/fieldgate.toml when neither --state-dir nor --admin is given.
    #[arg(long, short, global = true, conflicts_with = "state_dir")]
    pub config: Option<PathBuf>,
    /// The state directory of a stopped daemon.
    #[arg(long, global = true)]
    pub state_dir: Option<PathBuf>,
    /// The admin API of a running daemon, e.g. http://127.0.0.1:9898.
    #[arg(long, global = true)]
    pub admin: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The `outbox` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum OutboxCommand {
    /// Records queued, their bytes, dead letters, and the age of the oldest queued record.
    Stats,
    /// The oldest queued records: id, meter, event, detected at, attempts, last error.
    List {
        /// How many, oldest first.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// List the dead letters: records the server refused too often (id, meter, event, msg, attempts).
    Dead,
    /// Entries of the state database that could not be read and were set aside (kept as they were):
    /// what each was, its size, why it does not read, and its first bytes.
    Corrupt {
        /// How many at most.
        #[arg(long, default_value_t = PAGE_DEFAULT)]
        limit: usize,
    },
    /// Put dead letters back into the outbox (e.g. after the event was created on the server).
    Requeue {
        /// The record id (from `fieldgate outbox dead`).
        #[arg(required_unless_present = "all")]
        id: Option<u64>,
        /// Every dead letter.
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
}

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum OutboxCliError {
    /// The configuration did not load.
    #[error("{0}(or give the state directory with --state-dir)")]
    Config(#[from] ConfigError),
    /// No database at the path.
    #[error("no fieldgate state database in {0}: check --state-dir / site.state_dir")]
    NoDatabase(PathBuf),
    /// The daemon has the database and no admin API is known.
    #[error("the state directory {dir} is locked: the fieldgate daemon is running. Ask it through its admin API instead: `fieldgate outbox … --admin http://127.0.0.1:9898` (or --config with its [admin] listen), i.e. GET http://127.0.0.1:9898/outbox/dead and POST http://127.0.0.1:9898/outbox/requeue with {{\"id\": N}} or {{\"all\": true}}")]
    Locked {
        /// The state directory.
        dir: PathBuf,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The admin API did not answer usefully.
    #[error("admin API {url}: {reason}")]
    Admin {
        /// The URL asked.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// Requeue of an id that is not a dead letter.
    #[error("no dead letter with id {0} (see `fieldgate outbox dead`)")]
    NotFound(u64),
    /// The admin API could not be asked (`stats`, `list`).
    #[error(transparent)]
    Client(#[from] AdminClientError),
}

impl OutboxCliError {
    /// A bounded label for metrics and tests.
    pub fn error_code(&self) -> &'static str {
        match self {
            OutboxCliError::Config(_) => "config",
            OutboxCliError::NoDatabase(_) => "no_database",
            OutboxCliError::Locked { .. } => "locked",
            OutboxCliError::Store(_) => "outbox",
            OutboxCliError::Admin { .. } => "admin",
            OutboxCliError::NotFound(_) => "not_found",
            OutboxCliError::Client(e) => e.error_code(),
        }
    }
}

/// Run the command and print its output.
pub(crate) async fn outbox_main(args: OutboxArgs) -> anyhow::Result<()> {
    let text = outbox_run(args).await?;
    print!("{text}");
    Ok(())
}

/// Run the command; returns what it would print.
pub async fn outbox_run(args: OutboxArgs) -> Result<String, OutboxCliError> {
    if let Some(url) = &args.admin {
        return via_admin(url, &args).await;
    }
    let (dir, admin) = match (&args.state_dir, &args.config) {
        (Some(dir), _) => (dir.clone(), None),
        (None, cfg) => {
            let path = cfg.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
            let cfg = config::load(&path)?;
            (cfg.site.state_dir.clone(), Some(admin_url(cfg.admin.listen)))
        }
    };
    match open_stopped(&dir).await {
        Ok(outbox) => offline(&outbox, &dir, &args).await,
        Err(OutboxCliError::Locked { dir }) => match admin {
            Some(url) => via_admin(&url, &args).await,
            None => Err(OutboxCliError::Locked { dir }),
        },
        Err(e) => Err(e),
    }
}

async fn open_stopped(dir: &Path) -> Result<Store, OutboxCliError> {
    if !(dir.join("conf").is_file() || dir.join("db").is_file()) {
        return Err(OutboxCliError::NoDatabase(dir.to_path_buf()));
    }
    // Bounds do not matter here: requeue puts back what was there, and nothing new is committed.
    let limits = Limits {
        max_records: u64::MAX,
        max_bytes: u64::MAX,
        // An operator's tool on a stopped daemon's directory: it only moves what is there.
        min_free: 0,
        max_dead: u64::MAX,
    };
    let d = dir.to_path_buf();
    match tokio::task::spawn_blocking(move || Store::open(&d, limits)).await {
        Ok(Ok(o)) => Ok(o),
        Ok(Err(StoreError::Locked(dir))) => Err(OutboxCliError::Locked { dir }),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(StoreError::Sync {
            path: dir.to_path_buf(),
            source: std::io::Error::other(e),
        }
        .into()),
    }
}

async fn offline(outbox: &Store, dir: &Path, args: &OutboxArgs) -> Result<String, OutboxCliError> {
    let place = dir.display().to_string();
    match &args.command {
        OutboxCommand::Stats => Ok(render_stats(&outbox_counts(outbox), &place, args.json)),
        OutboxCommand::List { limit } => {
            let records: Vec<RecordView> = outbox.list(*limit)?.iter().map(RecordView::from).collect();
            Ok(render_list(&records, outbox.len(), &place, args.json))
        }
        OutboxCommand::Dead => {
            let letters: Vec<DeadView> = outbox.dead()?.iter().map(DeadView::from).collect();
            Ok(render_dead(&letters, &place, args.json))
        }
        OutboxCommand::Corrupt { limit } => {
            let entries = outbox.corrupt(*limit)?;
            Ok(render_corrupt(&entries, *limit, &place, args.json))
        }
        OutboxCommand::Requeue { id, all } => {
            let which = if *all { None } else { *id };
            let n = outbox.requeue(which).await?;
            if n == 0 {
                if let Some(id) = which {
                    return Err(OutboxCliError::NotFound(id));
                }
            }
            Ok(render_requeued(n, which, &place, args.json))
        }
    }
}

async fn via_admin(base: &str, args: &OutboxArgs) -> Result<String, OutboxCliError> {
    let base = base.trim_end_matches('/');
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| OutboxCliError::Admin {
            url: base.to_string(),
            reason: e.to_string(),
        })?;
    let fail = |url: &str, reason: String| OutboxCliError::Admin {
        url: url.to_string(),
        reason,
    };
    let place = format!("the running daemon ({base})");
    match &args.command {
        OutboxCommand::Stats => {
            // From the health answer: it has every count, and it answers (503) while the store is failed.
            let health: Health = AdminClient::new(base)?.get_accepting("/healthz", &[200, 503]).await?;
            Ok(render_stats(&health.outbox, &place, args.json))
        }
        OutboxCommand::List { limit } => {
            let limit = (*limit).min(LIST_MAX);
            let view: OutboxView = AdminClient::new(base)?.get(&format!("/outbox?limit={limit}")).await?;
            Ok(render_list(&view.oldest, view.counts.records, &place, args.json))
        }
        OutboxCommand::Dead => {
            let client = AdminClient::new(base)?;
            let mut letters: Vec<DeadView> = Vec::new();
            let mut after: Option<u64> = None;
            loop {
                let path = match after {
                    Some(id) => format!("/outbox/dead?limit={}&after={id}", PAGE_MAX),
                    None => format!("/outbox/dead?limit={}", PAGE_MAX),
                };
                let mut page: Vec<DeadView> = client.get(&path).await?;
                let full = page.len() >= PAGE_MAX;
                // A daemon that does not page answers everything every time: keep only what is new.
                page.retain(|d| after.is_none_or(|a| d.id > a));
                let Some(last) = page.last().map(|d| d.id) else { break };
                after = Some(last);
                letters.extend(page);
                if !full {
                    break;
                }
            }
            Ok(render_dead(&letters, &place, args.json))
        }
        OutboxCommand::Corrupt { limit } => {
            let limit = (*limit).min(PAGE_MAX);
            let entries: Vec<CorruptEntry> = AdminClient::new(base)?
                .get(&format!("/outbox/corrupt?limit={limit}"))
                .await?;
            Ok(render_corrupt(&entries, limit, &place, args.json))
        }
        OutboxCommand::Requeue { id, all } => {
            let url = format!("{base}/outbox/requeue");
            let which = if *all { None } else { *id };
            let req = RequeueRequest { id: which, all: *all };
            let resp = http
                .post(&url)
                .json(&req)
                .send()
                .await
                .map_err(|e| fail(&url, unreachable(&e)))?;
            let status = resp.status();
            let body = resp.bytes().await.map_err(|e| fail(&url, e.to_string()))?;
            if status == reqwest::StatusCode::NOT_FOUND {
                if let Some(id) = which {
                    return Err(OutboxCliError::NotFound(id));
                }
            }
            if !status.is_success() {
                return Err(fail(
                    &url,
                    format!("HTTP {}: {}", status.as_u16(), String::from_utf8_lossy(&body)),
                ));
            }
            let answer: RequeueAnswer =
                serde_json::from_slice(&body).map_err(|e| fail(&url, format!("unexpected answer: {e}")))?;
            Ok(render_requeued(answer.requeued, which, &place, args.json))
        }
    }
}

fn unreachable(e: &reqwest::Error) -> String {
    if e.is_connect() {
        "does not answer (is the daemon running, and is [admin] listen this address?)".to_string()
    } else {
        e.to_string()
    }
}

/// The dead letters as a table (or JSON).
fn render_dead(letters: &[DeadView], place: &str, json: bool) -> String {
    if json {
        return serde_json::to_string_pretty(letters).unwrap_or_default() + "\n";
    }
    if letters.is_empty() {
        return format!("No dead letters in {place}.\n");
    }
    let mut out = format!("{} dead letter(s) in {place}:\n", letters.len());
    out.push_str("ID\tMETER\tEVENT\tATTEMPTS\tREJECTIONS\tDIED AT\tMSG\n");
    for d in letters {
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
            d.id,
            d.meter_no,
            d.event_name,
            d.attempts,
            d.rejections,
            d.died_at,
            d.msg.replace(['\n', '\t'], " ")
        ));
    }
    out.push_str("Requeue with `fieldgate outbox requeue ID` or `--all` once the cause is fixed on the server.\n");
    out
}

/// Entries set aside as a table (or JSON). `limit` is how many were asked for: a full answer says
/// there may be more.
fn render_corrupt(entries: &[CorruptEntry], limit: usize, place: &str, json: bool) -> String {
    if json {
        return serde_json::to_string_pretty(entries).unwrap_or_default() + "\n";
    }
    if entries.is_empty() {
        return format!("No entries set aside in {place}: every entry of the state database reads.\n");
    }
    let (noun, verb) = if entries.len() == 1 {
        ("entry", "was")
    } else {
        ("entries", "were")
    };
    let mut out = format!(
        "{} {noun} of the state database in {place} could not be read and {verb} set aside (kept unchanged):\n",
        entries.len()
    );
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.entry.clone(),
                e.bytes.to_string(),
                one_line(&e.error),
                one_line(&e.preview),
            ]
        })
        .collect();
    out.push_str(&crate::cli::table::table(
        &["ENTRY", "BYTES", "ERROR", "FIRST BYTES"],
        &rows,
    ));
    if entries.len() >= limit {
        out.push_str(&format!("Showing the first {limit}; --limit N shows more.\n"));
    }
    out.push_str(
        "A record set aside was not delivered: if its first bytes show what it was, raise that work order by hand. \
         A meter whose state was set aside started again from a new baseline. Nothing here is deleted.\n",
    );
    out
}

/// Text on one line: control characters (newlines, tabs, NULs of a damaged entry) become spaces.
fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// Counts of the outbox as lines (or JSON). Bounds are shown when known (a stopped state directory
/// opened without a configuration has none).
fn render_stats(c: &OutboxCounts, place: &str, json: bool) -> String {
    if json {
        return serde_json::to_string_pretty(c).unwrap_or_default() + "\n";
    }
    let bound = |n: u64| {
        if n == u64::MAX {
            String::new()
        } else {
            format!(" (bound {n})")
        }
    };
    let mut out = format!("Outbox of {place}:\n");
    out.push_str(&format!(
        "  queued        {} record(s){}\n",
        c.records,
        bound(c.max_records)
    ));
    out.push_str(&format!("  bytes         {}{}\n", c.bytes, bound(c.max_bytes)));
    out.push_str(&format!("  dead letters  {}\n", c.dead));
    out.push_str(&format!(
        "  oldest        {}\n",
        c.oldest_age_seconds
            .map_or_else(|| "-".to_string(), |s| crate::cli::table::age(s as f64))
    ));
    if c.refusing && !c.disk_low && c.refused > 0 {
        out.push_str("  FULL: new valve states are not recorded until deliveries make room.\n");
    }
    out.push_str(&crate::cli::status::store_lines(c));
    out
}

/// Queued records as a table (or JSON). `total` is how many are queued in all.
fn render_list(records: &[RecordView], total: u64, place: &str, json: bool) -> String {
    if json {
        return serde_json::to_string_pretty(records).unwrap_or_default() + "\n";
    }
    if records.is_empty() {
        return format!("Nothing queued in {place}.\n");
    }
    let mut out = format!(
        "{} of {total} queued record(s) in {place}, oldest first:\n",
        records.len()
    );
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.meter_no.clone(),
                r.event_name.clone(),
                r.detected_at.clone(),
                r.attempts.to_string(),
                r.last_error
                    .as_deref()
                    .map_or_else(|| "-".to_string(), |e| e.replace(['\n', '\t'], " ")),
            ]
        })
        .collect();
    out.push_str(&crate::cli::table::table(
        &["ID", "METER", "EVENT", "DETECTED AT", "ATTEMPTS", "LAST ERROR"],
        &rows,
    ));
    out
}

fn render_requeued(n: usize, id: Option<u64>, place: &str, json: bool) -> String {
    if json {
        return serde_json::json!({ "requeued": n }).to_string() + "\n";
    }
    match id {
        Some(id) => format!("Requeued record {id} in {place}; it is delivered in its place in detection order.\n"),
        None => format!("Requeued {n} dead letter(s) in {place}.\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: OutboxArgs,
    }

    #[test]
    fn arguments_parse() {
        let a = Cli::try_parse_from(["x", "dead", "--state-dir", "/s"]).unwrap().args;
        assert!(matches!(a.command, OutboxCommand::Dead));
        assert_eq!(a.state_dir, Some(PathBuf::from("/s")));
        let a = Cli::try_parse_from(["x", "requeue", "42", "--config", "/c.toml"])
            .unwrap()
            .args;
        assert!(matches!(
            a.command,
            OutboxCommand::Requeue {
                id: Some(42),
                all: false
            }
        ));
        let a = Cli::try_parse_from(["x", "requeue", "--all", "--admin", "http://127.0.0.1:9898"])
            .unwrap()
            .args;
        assert!(matches!(a.command, OutboxCommand::Requeue { id: None, all: true }));
        let a = Cli::try_parse_from(["x", "list", "--limit", "5", "--admin", "http://127.0.0.1:9898"])
            .unwrap()
            .args;
        assert!(matches!(a.command, OutboxCommand::List { limit: 5 }));
        let a = Cli::try_parse_from(["x", "list"]).unwrap().args;
        assert!(matches!(a.command, OutboxCommand::List { limit: 100 }));
        let a = Cli::try_parse_from(["x", "stats", "--json", "--state-dir", "/s"])
            .unwrap()
            .args;
        assert!(matches!(a.command, OutboxCommand::Stats) && a.json);
        let a = Cli::try_parse_from(["x", "corrupt", "--state-dir", "/s"]).unwrap().args;
        assert!(matches!(a.command, OutboxCommand::Corrupt { limit: 100 }));
        let a = Cli::try_parse_from([
            "x",
            "corrupt",
            "--limit",
            "7",
            "--json",
            "--admin",
            "http://127.0.0.1:9898",
        ])
        .unwrap()
        .args;
        assert!(matches!(a.command, OutboxCommand::Corrupt { limit: 7 }) && a.json);
        assert!(Cli::try_parse_from(["x", "requeue"]).is_err(), "an id or --all");
        assert!(Cli::try_parse_from(["x", "requeue", "1", "--all"]).is_err());
        assert!(Cli::try_parse_from(["x", "dead", "--state-dir", "/s", "--config", "/c"]).is_err());
    }

    #[test]
    fn entries_set_aside_are_listed_on_one_line_each() {
        let e = CorruptEntry {
            entry: "record 42".into(),
            bytes: 8,
            error: "bad\nrecord".into(),
            preview: "\u{1}garbage".into(),
        };
        assert_eq!(
            render_corrupt(std::slice::from_ref(&e), 100, "/s", false),
            "1 entry of the state database in /s could not be read and was set aside (kept unchanged):\n\
             \x20 ENTRY      BYTES  ERROR       FIRST BYTES\n\
             \x20 record 42  8      bad record   garbage\n\
             A record set aside was not delivered: if its first bytes show what it was, raise that work order by hand. \
             A meter whose state was set aside started again from a new baseline. Nothing here is deleted.\n"
        );
        assert!(render_corrupt(std::slice::from_ref(&e), 1, "/s", false)
            .contains("Showing the first 1; --limit N shows more.\n"));
        assert_eq!(
            render_corrupt(&[], 100, "/s", false),
            "No entries set aside in /s: every entry of the state database reads.\n"
        );
        let json: Vec<CorruptEntry> =
            serde_json::from_str(&render_corrupt(std::slice::from_ref(&e), 100, "/s", true)).unwrap();
        assert_eq!(json, [e]);
    }
}

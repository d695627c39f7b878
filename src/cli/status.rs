//! `fieldgate status`: a readable table of the running daemon (health, buses, meters, outbox), from its
//! admin API. It never opens the state database and never loads the whole configuration: only
//! `[admin] listen` is read from it (see `crate::cli::admin_client::admin_url_of`).
//!
//! [`status_run`] returns the text, so tests check exactly what a person sees; `render_status` is the
//! pure part. Also home of `store_lines`, the store and disk lines `fieldgate outbox stats` prints too.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cli::admin_client::{admin_url_of, AdminClient, AdminClientError, DEFAULT_CONFIG};
use crate::cli::table::{age, table};
use crate::config::format_byte_size;
use crate::ops::api::{BusView, Health, MeterInfo, OutboxCounts, OutboxView, Status};

/// `fieldgate status`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// The site configuration; only its `[admin] listen` is read. Default /etc/fieldgate/fieldgate.toml.
    #[arg(long, short, conflicts_with = "admin")]
    pub config: Option<PathBuf>,
    /// The admin API of the running daemon, e.g. http://127.0.0.1:9898.
    #[arg(long)]
    pub admin: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Everything `status` shows, as fetched.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StatusReport {
    /// The admin URL asked.
    admin: String,
    /// `GET /healthz`.
    health: Health,
    /// `GET /buses`.
    buses: Vec<BusView>,
    /// `GET /meters`.
    meters: Vec<MeterInfo>,
    /// `GET /outbox`.
    outbox: OutboxView,
}

/// Run `status`; prints the text.
pub(crate) async fn status_main(args: StatusArgs) -> anyhow::Result<()> {
    print!("{}", status_run(args).await?);
    Ok(())
}

/// Run `status`; returns the text it would print.
pub async fn status_run(args: StatusArgs) -> Result<String, AdminClientError> {
    let url = match &args.admin {
        Some(url) => url.clone(),
        None => admin_url_of(&args.config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG)))?,
    };
    let report = fetch(&url).await?;
    if args.json {
        return Ok(serde_json::to_string_pretty(&report).unwrap_or_default() + "\n");
    }
    Ok(render_status(&report))
}

/// Ask the daemon at `url` for everything `status` shows.
async fn fetch(url: &str) -> Result<StatusReport, AdminClientError> {
    let client = AdminClient::new(url)?;
    // Health first: if the daemon is not there, this is the one error to show.
    let health: Health = client.get_accepting("/healthz", &[200, 503]).await?;
    let (buses, meters, outbox) = tokio::join!(
        client.get::<Vec<BusView>>("/buses"),
        client.get::<Vec<MeterInfo>>("/meters"),
        client.get::<OutboxView>("/outbox?limit=1"),
    );
    let (buses, meters) = (buses?, meters?);
    let outbox = match outbox {
        Ok(view) => view,
        // A failed store cannot list records (503); its counts are in the health answer, and the
        // failure is what the report shows.
        Err(AdminClientError::Http { status: 503, .. }) => OutboxView {
            counts: health.outbox.clone(),
            oldest: Vec::new(),
        },
        Err(e) => return Err(e),
    };
    Ok(StatusReport {
        admin: client.base().to_string(),
        health,
        buses,
        meters,
        outbox,
    })
}

/// The report as tables.
fn render_status(r: &StatusReport) -> String {
    let h = &r.health;
    let mut out = format!(
        "fieldgate at site `{}` ({}): {}\n",
        h.site,
        r.admin,
        status_word(h.status)
    );
    for f in &h.reasons {
        out.push_str(&format!("  {:<8}  {}: {}\n", status_word(f.status), f.code, f.message));
    }
    if h.clock.sync == crate::clock::ClockSync::Unsynchronized {
        out.push_str(&format!(
            "  System clock NOT synchronized (no NTP yet, or none configured): it shows {}; detection times may be wrong and are marked `{}`. Durations and rules do not depend on it.\n",
            h.clock.now,
            crate::recorder::UNSYNCED_MARK.trim()
        ));
    }

    out.push_str("\nBuses\n");
    if r.buses.is_empty() {
        out.push_str("  (none)\n");
    } else {
        let rows: Vec<Vec<String>> = r
            .buses
            .iter()
            .map(|b| {
                vec![
                    b.name.clone(),
                    format!("{} {}", b.transport, b.endpoint),
                    if !b.tried {
                        "-".to_string()
                    } else if b.up {
                        "yes".to_string()
                    } else {
                        "DOWN".to_string()
                    },
                    format!("{}/{}", b.meters_online, b.meters),
                    b.requests.to_string(),
                    b.errors.to_string(),
                    b.timeouts.to_string(),
                    b.reconnects.to_string(),
                    format!("{:.3} s", b.last_round_seconds),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "BUS",
                "ENDPOINT",
                "UP",
                "ONLINE",
                "REQUESTS",
                "ERRORS",
                "TIMEOUTS",
                "RECONNECTS",
                "LAST ROUND",
            ],
            &rows,
        ));
    }

    out.push_str("\nMeters\n");
    if r.meters.is_empty() {
        out.push_str("  (none)\n");
    } else {
        let rows: Vec<Vec<String>> = r
            .meters
            .iter()
            .map(|m| {
                let readings = m
                    .readings
                    .iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().map_or_else(|| v.to_string(), str::to_string)))
                    .collect::<Vec<_>>()
                    .join(" ");
                vec![
                    m.meter_no.clone(),
                    m.bus.clone(),
                    m.unit.to_string(),
                    match (m.online, m.retry_every_seconds) {
                        (true, _) => "yes".to_string(),
                        (false, Some(every)) => format!("OFFLINE (retry every {})", age(every)),
                        (false, None) => "OFFLINE".to_string(),
                    },
                    m.state.clone().unwrap_or_else(|| "-".into()),
                    m.last_change.clone().unwrap_or_else(|| "-".into()),
                    m.last_sample_age_seconds.map_or_else(|| "never".into(), age),
                    answer_cell(m),
                    readings,
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "METER",
                "BUS",
                "UNIT",
                "ONLINE",
                "STATE",
                "SINCE",
                "LAST READ",
                "ANSWER",
                "READINGS",
            ],
            &rows,
        ));
        for m in r.meters.iter().filter(|m| m.hint.is_some()) {
            out.push_str(&format!(
                "  {} (bus {}): {}\n",
                m.meter_no,
                m.bus,
                m.hint.as_deref().unwrap_or_default()
            ));
        }
    }

    let c = &r.outbox.counts;
    out.push_str(&format!(
        "\nOutbox\n  queued {} record(s), {} bytes (bounds {} records, {} bytes){}; dead letters {}; oldest {}\n",
        c.records,
        c.bytes,
        c.max_records,
        c.max_bytes,
        if c.refusing && !c.disk_low && c.refused > 0 {
            ", FULL: new states are not recorded"
        } else {
            ""
        },
        c.dead,
        c.oldest_age_seconds.map_or_else(|| "-".into(), |s| age(s as f64)),
    ));
    out.push_str(&store_lines(c));
    let s = &h.sender;
    out.push_str(&format!(
        "  delivered {} since start; failures in a row {}{}\n",
        s.delivered,
        s.failures_in_a_row,
        s.last_error
            .as_ref()
            .map_or_else(String::new, |e| format!("; last error: {e}"))
    ));
    out
}

/// The state database, the disk under it, set-aside entries and the dead-letter bound, in words a
/// technician acts on. Shared with `fieldgate outbox stats`.
pub(crate) fn store_lines(c: &OutboxCounts) -> String {
    let mut out = String::new();
    match &c.store {
        Some(f) => {
            out.push_str(&format!(
                "  State database: FAILED for {} ({}) — reopening by itself ({} attempts{}); nothing is delivered meanwhile, polling goes on.\n",
                age(f.for_seconds as f64),
                f.error,
                f.reopen_attempts,
                f.reopen_error
                    .as_ref()
                    .map_or_else(String::new, |e| format!(", last: {e}"))
            ));
        }
        None if c.store_failures > 0 => out.push_str(&format!(
            "  State database: ok (failed {} time(s) since start, opened again {} time(s))\n",
            c.store_failures, c.store_reopens
        )),
        None => out.push_str("  State database: ok\n"),
    }
    // No reserve is known for a stopped state directory opened without its configuration (nor from
    // a daemon of an older release).
    let reserve = (c.min_free > 0).then(|| format_byte_size(c.min_free));
    match (c.free_bytes, reserve) {
        (Some(free), Some(reserve)) if c.disk_low => out.push_str(&format!(
            "  Disk: {} free, reserve {reserve} — new valve changes are NOT recorded until space is freed ({} refused)\n",
            format_byte_size(free),
            c.refused_space
        )),
        (Some(free), Some(reserve)) => out.push_str(&format!("  Disk: {} free (reserve {reserve})\n", format_byte_size(free))),
        (Some(free), None) => out.push_str(&format!("  Disk: {} free\n", format_byte_size(free))),
        (None, Some(reserve)) => out.push_str(&format!("  Disk: free space unknown (reserve {reserve})\n")),
        (None, None) => {}
    }
    if c.corrupt > 0 {
        out.push_str(&format!(
            "  Set aside: {} unreadable entr{} of the state database — see `fieldgate outbox corrupt`\n",
            c.corrupt,
            if c.corrupt == 1 { "y" } else { "ies" }
        ));
    }
    if c.max_dead > 0 && c.dead >= c.max_dead {
        out.push_str(&format!(
            "  Dead letters FULL ({} of {}): records the server refuses stay queued and held ({} refused) — see `fieldgate outbox dead`\n",
            c.dead, c.max_dead, c.dead_refused
        ));
    }
    out
}

/// A meter's answer times, `4.2 ms, max 280 of 300 ms` (last, slowest recent, the timeout), then its
/// late answers and timeouts when it had any; `-` before the first answer.
fn answer_cell(m: &MeterInfo) -> String {
    let mut cell = match (m.answer_ms, m.answer_max_ms, m.timeout_ms) {
        (Some(last), Some(max), Some(t)) => format!("{} ms, max {} of {} ms", millis(last), millis(max), millis(t)),
        (Some(last), Some(max), None) => format!("{} ms, max {} ms", millis(last), millis(max)),
        (Some(last), None, _) => format!("{} ms", millis(last)),
        (None, ..) => "-".to_string(),
    };
    if m.late_answers > 0 {
        cell.push_str(&format!("; {} late", m.late_answers));
    }
    if m.timeouts > 0 {
        cell.push_str(&format!("; {} timeouts", m.timeouts));
    }
    cell
}

/// Milliseconds, short: `0.04`, `4.2`, `12`, `1500`.
fn millis(ms: f64) -> String {
    if ms < 1.0 {
        format!("{ms:.2}")
    } else if ms < 10.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

fn status_word(s: Status) -> &'static str {
    match s {
        Status::Ok => "ok",
        Status::Degraded => "DEGRADED",
        Status::Critical => "CRITICAL",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts() -> OutboxCounts {
        OutboxCounts {
            max_records: 100,
            max_bytes: 1000,
            free_bytes: Some(3_328_599_655),
            min_free: 64 << 20,
            max_dead: 10_000,
            ..OutboxCounts::default()
        }
    }

    #[test]
    fn the_store_lines_say_what_a_technician_must_know() {
        assert_eq!(
            store_lines(&counts()),
            "  State database: ok\n  Disk: 3.1 GiB free (reserve 64 MiB)\n"
        );
        let low = OutboxCounts {
            free_bytes: Some(12_897_485),
            disk_low: true,
            refusing: true,
            refused_space: 7,
            ..counts()
        };
        assert_eq!(
            store_lines(&low),
            "  State database: ok\n  Disk: 12.3 MiB free, reserve 64 MiB — new valve changes are NOT recorded until space is freed (7 refused)\n"
        );
        let failed = OutboxCounts {
            store: Some(crate::store::fault::StoreFault {
                error: "No space left on device (os error 28)".into(),
                for_seconds: 120,
                reopen_attempts: 5,
                reopen_error: None,
            }),
            store_failures: 1,
            corrupt: 2,
            dead: 10_000,
            dead_refused: 3,
            ..counts()
        };
        assert_eq!(
            store_lines(&failed),
            "  State database: FAILED for 2 min (No space left on device (os error 28)) — reopening by itself (5 attempts); nothing is delivered meanwhile, polling goes on.\n\
             \x20 Disk: 3.1 GiB free (reserve 64 MiB)\n\
             \x20 Set aside: 2 unreadable entries of the state database — see `fieldgate outbox corrupt`\n\
             \x20 Dead letters FULL (10000 of 10000): records the server refuses stay queued and held (3 refused) — see `fieldgate outbox dead`\n"
        );
        let healed = OutboxCounts {
            store_failures: 1,
            store_reopens: 1,
            free_bytes: None,
            min_free: 0,
            ..counts()
        };
        assert_eq!(
            store_lines(&healed),
            "  State database: ok (failed 1 time(s) since start, opened again 1 time(s))\n"
        );
    }

    #[test]
    fn a_meter_from_an_older_daemon_parses_and_answer_times_read_in_milliseconds() {
        // `/meters` of a release before answer times: the new fields take their defaults.
        let old = r#"{"meter_no":"M2","bus":"line-a","unit":2,"online":true,"state":"开启",
            "stored_state":"开启","last_change":null,"readings":{},"last_sample_age_seconds":0.4}"#;
        let mut m: MeterInfo = serde_json::from_str(old).expect("older JSON parses");
        assert_eq!(
            (m.answer_ms, m.timeouts, m.late_answers, m.hint.clone()),
            (None, 0, 0, None)
        );
        assert_eq!(answer_cell(&m), "-");
        m.answer_ms = Some(4.21);
        m.answer_max_ms = Some(281.4);
        m.timeout_ms = Some(300.0);
        m.late_answers = 2;
        m.timeouts = 3;
        assert_eq!(answer_cell(&m), "4.2 ms, max 281 of 300 ms; 2 late; 3 timeouts");
        m.answer_ms = Some(0.042);
        m.answer_max_ms = None;
        assert_eq!(answer_cell(&m), "0.04 ms; 2 late; 3 timeouts");
    }
}

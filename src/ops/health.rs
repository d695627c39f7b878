//! The health rules: what makes the gateway `ok`, `degraded` or `critical`, and why, in words an operator
//! acts on. `/healthz` ([`crate::ops::admin`]) and `fieldgate_health_status` (`crate::ops::metrics`)
//! both come from `health`; the recorder's own findings come from [`crate::ops::watchdog`] through a
//! `crate::ops::sources::HealthCheck`. The numbers it judges are `outbox_counts`, which `fieldgate
//! outbox stats` also prints for a stopped daemon's state directory.
//!
//! Invariants: the worst finding sets the level; every finding has a bounded `code` (the wire name, never
//! renamed) and a message that says what it means and what to do. The numbers come from the store's
//! counts and at most one queued record (the oldest): health costs the same with 10 dead letters or
//! 10,000, and answers while the store is failed (`store_failed`).
//!
//! Never: writes to the store or changes what is delivered; never reads a dead letter or a set-aside
//! entry.

use std::time::Duration;

use crate::delivery::sender::stats::SenderSnapshot;
use crate::ops::api::{ClockView, Finding, Health, OutboxCounts, Status};
use crate::ops::sources::{AdminState, FieldView};
use crate::store::fault::StoreFault;
use crate::store::Store;

/// At this share of either bound the outbox is reported `degraded` (filling up).
const FILL_WARN_PERCENT: u64 = 80;

/// A queued record older than this makes health `degraded` (`oldest_record_age`): deliveries are stuck.
const OLDEST_WARN: Duration = Duration::from_secs(3600);

/// Offline meters named in the `meters_offline` finding; more are counted, not named.
const OFFLINE_NAMED: usize = 10;

/// The health of the gateway as the outbox, the sender and the extra checks see it.
pub(crate) fn health(state: &AdminState) -> Health {
    let counts = outbox_counts(&state.outbox);
    let sender = state.sender.snapshot();
    let mut reasons = delivery_findings(&counts, &sender);
    if let Some(field) = state.field_view() {
        reasons.extend(field_findings(&field));
    }
    for check in &state.checks {
        reasons.extend(check.findings());
    }
    reasons.sort_by_key(|f| std::cmp::Reverse(f.status));
    Health {
        status: reasons.first().map_or(Status::Ok, |f| f.status),
        site: state.site.clone(),
        reasons,
        outbox: counts,
        sender,
        clock: ClockView {
            sync: crate::clock::sync_state(),
            now: state
                .field_view()
                .map_or_else(chrono::Utc::now, |f| f.live.clock.now())
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        },
    }
}

/// The findings of the store, the outbox and the sender, from their numbers alone (pure: tested with
/// made-up numbers, e.g. a failed store).
pub fn delivery_findings(counts: &OutboxCounts, sender: &SenderSnapshot) -> Vec<Finding> {
    let mut reasons = Vec::new();
    let mut add = |status: Status, code: &str, message: String| {
        reasons.push(Finding {
            status,
            code: code.into(),
            message,
        })
    };
    if sender.login_failing {
        add(
            Status::Critical,
            "login_failing",
            format!(
                "GenerateToken refuses the credentials ({}); nothing is delivered, every record is kept. Fix panda.username / the password and restart.",
                sender.last_error.clone().unwrap_or_default()
            ),
        );
    }
    if let Some(f) = &counts.store {
        add(Status::Critical, "store_failed", store_failed_message(f));
    }
    if counts.disk_low {
        add(
            Status::Critical,
            "disk_low",
            format!(
                "disk almost full: {} free on the state directory's file system, below the reserve outbox.min_free ({}): new valve states are not recorded ({} commits refused); they are detected again once space returns. Deliveries go on. Free space on that disk.",
                free_text(counts.free_bytes),
                crate::config::format_byte_size(counts.min_free),
                counts.refused_space
            ),
        );
    }
    // `refusing` is also set by a commit refused for disk space: only a refusal by the bounds (counted
    // in `refused`) while the disk has room is `outbox_full`. Once space is back the next cycle
    // commits and clears it.
    if counts.refusing && !counts.disk_low && counts.refused > 0 {
        add(
            Status::Critical,
            "outbox_full",
            format!(
                "outbox full ({} of {} records, {} of {} bytes): new valve states are not recorded ({} commits refused); they are detected again once deliveries make room.",
                counts.records, counts.max_records, counts.bytes, counts.max_bytes, counts.refused
            ),
        );
    } else if counts.records.saturating_mul(100) >= counts.max_records.saturating_mul(FILL_WARN_PERCENT)
        || counts.bytes.saturating_mul(100) >= counts.max_bytes.saturating_mul(FILL_WARN_PERCENT)
    {
        add(
            Status::Degraded,
            "outbox_filling",
            format!(
                "outbox at {} of {} records, {} of {} bytes",
                counts.records, counts.max_records, counts.bytes, counts.max_bytes
            ),
        );
    }
    if !sender.login_failing && sender.failures_in_a_row > 0 && counts.records > 0 {
        add(
            Status::Degraded,
            "delivery_failing",
            format!(
                "{} failed requests in a row; last: {}",
                sender.failures_in_a_row,
                sender.last_error.clone().unwrap_or_default()
            ),
        );
    }
    if sender.held > 0 {
        add(
            Status::Degraded,
            "records_held",
            format!(
                "{} record(s) refused by the server are held and tried again alone",
                sender.held
            ),
        );
    }
    if counts.dead > 0 {
        add(
            Status::Degraded,
            "dead_letters",
            format!(
                "{} dead letter(s): see `fieldgate outbox dead`, fix the cause on the server, then `fieldgate outbox requeue`",
                counts.dead
            ),
        );
    }
    if counts.max_dead > 0 && counts.dead >= counts.max_dead {
        add(
            Status::Degraded,
            "dead_letters_full",
            format!(
                "{} dead letters, the bound outbox.max_dead: records the server refuses are not moved there any more; they stay queued, held and retried at the longest backoff ({} refused). See `fieldgate outbox dead`, fix the cause, then `fieldgate outbox requeue --all`",
                counts.dead, counts.dead_refused
            ),
        );
    }
    if counts.corrupt > 0 {
        add(
            Status::Degraded,
            "corrupt_entries",
            format!(
                "{} entries of the state database could not be read and were set aside: see `fieldgate outbox corrupt` (a record set aside is not delivered; a meter whose state was set aside started again from a baseline)",
                counts.corrupt
            ),
        );
    }
    if let Some(age) = counts.oldest_age_seconds.filter(|a| *a > OLDEST_WARN.as_secs()) {
        add(
            Status::Degraded,
            "oldest_record_age",
            format!(
                "the oldest queued record waits for {}: deliveries are not getting through (see the other reasons and `fieldgate outbox list`)",
                humantime::format_duration(Duration::from_secs(age))
            ),
        );
    }
    reasons
}

/// Bus down (`critical`: nothing on that line is watched) and meters offline on buses that are up
/// (`degraded`).
fn field_findings(field: &FieldView) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut down = vec![false; field.cfg.buses.len()];
    for (i, (bus, stats)) in field.cfg.buses.iter().zip(&field.buses).enumerate() {
        let s = stats.snapshot();
        if !s.up && s.connects + s.connect_failures > 0 {
            if let Some(d) = down.get_mut(i) {
                *d = true;
            }
            let why = stats
                .open_error()
                .map_or_else(|| "see the log for why".to_string(), |e| format!("last error: {e}"));
            out.push(Finding {
                status: Status::Critical,
                code: "bus_down".into(),
                message: format!(
                    "bus {} ({}) cannot be opened: its meters are not read; it is retried by itself ({why})",
                    bus.name,
                    bus.transport.endpoint()
                ),
            });
        }
    }
    let offline: Vec<&str> = field
        .live
        .snapshot()
        .iter()
        .zip(&field.cfg.meters)
        .filter(|(view, m)| !view.online && !down.get(m.bus).copied().unwrap_or(false))
        .map(|(_, m)| m.meter_no.as_str())
        .collect();
    if !offline.is_empty() {
        let mut names = offline
            .iter()
            .take(OFFLINE_NAMED)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        if offline.len() > OFFLINE_NAMED {
            names.push_str(&format!(" and {} more", offline.len() - OFFLINE_NAMED));
        }
        out.push(Finding {
            status: Status::Degraded,
            code: "meters_offline".into(),
            message: format!(
                "{} meter(s) do not answer: {names}; check wiring, unit id, baud and parity (`fieldgate probe`)",
                offline.len()
            ),
        });
    }
    out
}

/// The `store_failed` finding in words: since when, why, and that it heals by itself.
fn store_failed_message(f: &StoreFault) -> String {
    let last = f
        .reopen_error
        .as_ref()
        .map_or_else(String::new, |e| format!(", last: {e}"));
    format!(
        "the state database failed {} ago ({}): nothing is delivered or committed; it is reopened by itself ({} attempts{last}). Polling goes on.",
        humantime::format_duration(Duration::from_secs(f.for_seconds)),
        f.error,
        f.reopen_attempts
    )
}

/// Free bytes in words (`unknown` when the look failed).
fn free_text(free: Option<u64>) -> String {
    free.map_or_else(|| "unknown".to_string(), crate::config::format_byte_size)
}

/// How long the oldest queued record has waited at the head of the queue, in seconds, on the
/// monotonic clock ([`Store::oldest_waiting`]; not its wall-clock detection time, which a clock step
/// can put decades away); `None` when nothing is queued or the store cannot be read (a failed store
/// is reported by its own finding, not as an error here).
fn oldest_age(outbox: &Store) -> Option<u64> {
    outbox.oldest_waiting().map(|d| d.as_secs())
}

/// Counts and bounds of the outbox, free space, the state of the store, and the age of its oldest
/// record. Reads no dead letter and no set-aside entry (their counts are kept in memory); looks up the
/// free space at most once a second.
pub(crate) fn outbox_counts(outbox: &Store) -> OutboxCounts {
    let limits = outbox.limits();
    // Looks again when the last look is older than a second: a quiet station (no commits) still shows
    // the disk as it is.
    outbox.low_space();
    let (free_bytes, min_free, disk_low) = outbox.space();
    let (store_failures, store_reopens) = outbox.fault_totals();
    OutboxCounts {
        records: outbox.len(),
        bytes: outbox.bytes(),
        max_records: limits.max_records,
        max_bytes: limits.max_bytes,
        refused: outbox.refused(),
        refusing: outbox.is_refusing(),
        dead: outbox.dead_len(),
        oldest_age_seconds: oldest_age(outbox),
        free_bytes,
        min_free,
        disk_low,
        refused_space: outbox.refused_space(),
        max_dead: limits.max_dead,
        dead_refused: outbox.dead_refused(),
        corrupt: outbox.corrupt_len(),
        store: outbox.fault(),
        store_failures,
        store_reopens,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::delivery::sender::stats::SenderStats;

    #[tokio::test(start_paused = true)]
    async fn a_record_waiting_over_an_hour_degrades_health() {
        use crate::config::Limits;
        use crate::events::record::Draft;
        use crate::store::StoredState;
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_records: 100,
            max_bytes: 1 << 20,
            ..Limits::DEFAULT
        };
        let outbox = Store::open(dir.path(), limits).unwrap();
        let state = AdminState::new(outbox.clone(), Arc::new(SenderStats::default()), "s");
        assert_eq!(health(&state).outbox.oldest_age_seconds, None);
        let old = (chrono::Utc::now() - chrono::Duration::hours(2)).to_rfc3339();
        // From JSON, as stored: fields added to StoredState later default (and do not break this test).
        let stored: StoredState =
            serde_json::from_value(serde_json::json!({"raw": 1, "label": "open", "since": old})).unwrap();
        let draft = Draft {
            event_name: "e".into(),
            detected_at: old,
            from: "closed".into(),
            to: "open".into(),
            biz_data: "{}".into(),
        };
        outbox.commit("M1", &stored, vec![draft]).unwrap();
        outbox.sync().await.unwrap();
        // Its detection time, two hours back on the wall clock, says nothing: its wait is timed here.
        assert_eq!(health(&state).status, Status::Ok);
        tokio::time::advance(Duration::from_secs(7200)).await;
        let h = health(&state);
        assert!(h.outbox.oldest_age_seconds.is_some_and(|a| a >= 7200), "{:?}", h.outbox);
        assert_eq!(h.status, Status::Degraded);
        assert_eq!(h.reasons.first().map(|f| f.code.as_str()), Some("oldest_record_age"));
        assert!(crate::ops::metrics::render(&state).contains("\nfieldgate_outbox_oldest_age_seconds 72"));
    }

    fn limits(max_dead: u64, min_free: u64) -> crate::config::Limits {
        crate::config::Limits {
            max_records: 100,
            max_bytes: 1 << 20,
            min_free,
            max_dead,
        }
    }

    fn change(meter: &str) -> (String, crate::store::StoredState, Vec<crate::events::record::Draft>) {
        let state = crate::store::StoredState {
            raw: 1,
            label: "开启".into(),
            since: "2026-01-01T08:00:00+08:00".into(),
            ..crate::store::StoredState::default()
        };
        let draft = crate::events::record::Draft {
            event_name: "用水户开阀".into(),
            detected_at: chrono::Utc::now().to_rfc3339(),
            from: "关闭".into(),
            to: "开启".into(),
            biz_data: "{}".into(),
        };
        (meter.to_string(), state, vec![draft])
    }

    fn codes(h: &Health) -> Vec<&str> {
        h.reasons.iter().map(|f| f.code.as_str()).collect()
    }

    fn series(text: &str, name: &str) -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ').map(str::to_string))
    }

    /// Store reads of one `/metrics` and one `/healthz` answer, with `dead` dead letters kept.
    async fn reads_per_request(dead: usize) -> u64 {
        let dir = tempfile::tempdir().unwrap();
        let big = crate::config::Limits {
            max_records: 10_000,
            ..limits(10_000, 0)
        };
        let outbox = Store::open(dir.path(), big).unwrap();
        let mut ids = Vec::new();
        for i in 0..=dead {
            let records = outbox.commit_batch(vec![change(&format!("M{i}"))]).unwrap();
            ids.extend(records.into_iter().flatten().flatten().map(|r| r.id));
        }
        outbox.sync().await.unwrap();
        for id in &ids[..dead] {
            outbox.bury(*id, "refused", "2026-01-01T08:00:00+08:00").await.unwrap();
        }
        assert_eq!(outbox.dead_len(), dead as u64);
        let state = AdminState::new(outbox.clone(), Arc::new(SenderStats::default()), "s");
        let before = outbox.entries_read();
        let text = crate::ops::metrics::render(&state);
        let h = health(&state);
        assert!(
            text.lines().any(|l| l == format!("fieldgate_records_dead {dead}")),
            "{text}"
        );
        assert_eq!(h.outbox.dead, dead as u64);
        outbox.entries_read() - before
    }

    #[tokio::test]
    async fn metrics_and_health_cost_the_same_store_reads_with_one_or_500_dead_letters() {
        let (few, many) = (reads_per_request(1).await, reads_per_request(500).await);
        assert_eq!(
            few, many,
            "store reads per /metrics + /healthz: {few} with 1 dead letter, {many} with 500"
        );
        assert!(few <= 2, "only the oldest queued record is read: {few}");
    }

    #[test]
    fn a_disk_below_the_reserve_is_critical_disk_low_and_not_outbox_full() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Store::open(dir.path(), limits(10, u64::MAX)).unwrap();
        let state = AdminState::new(outbox.clone(), Arc::new(SenderStats::default()), "s");
        // Health looks at the disk itself: a quiet station with no commit is reported too.
        let h = health(&state);
        assert_eq!((h.status, codes(&h)), (Status::Critical, vec!["disk_low"]));
        assert!(h.outbox.disk_low && h.outbox.free_bytes.is_some(), "{:?}", h.outbox);
        assert_eq!((h.outbox.min_free, h.outbox.refused_space), (u64::MAX, 0));

        let refused = outbox.commit_batch(vec![change("M1"), change("M2")]).unwrap();
        assert!(refused
            .iter()
            .all(|r| r.as_ref().is_err_and(|e| e.error_code() == "no_space")));
        assert!(outbox.is_refusing(), "the store says commits are refused");
        let h = health(&state);
        assert_eq!(
            (h.status, codes(&h)),
            (Status::Critical, vec!["disk_low"]),
            "low space is not reported as a full outbox too: {:?}",
            h.reasons
        );
        let free = crate::config::format_byte_size(h.outbox.free_bytes.unwrap());
        assert_eq!(
            h.reasons[0].message,
            format!(
                "disk almost full: {free} free on the state directory's file system, below the reserve outbox.min_free (16384 PiB): new valve states are not recorded (1 commits refused); they are detected again once space returns. Deliveries go on. Free space on that disk."
            )
        );
        assert_eq!((h.outbox.refused_space, h.outbox.refused), (1, 0));

        let text = crate::ops::metrics::render(&state);
        assert_eq!(series(&text, "fieldgate_health_status").as_deref(), Some("2"));
        assert_eq!(
            series(&text, "fieldgate_outbox_refused_space_total").as_deref(),
            Some("1")
        );
        assert_eq!(series(&text, "fieldgate_outbox_refused_total").as_deref(), Some("0"));
        assert_eq!(series(&text, "fieldgate_store_failed").as_deref(), Some("0"));
        // The free space of the render's own look (nothing else looks meanwhile).
        let free_bytes: u64 = series(&text, "fieldgate_store_free_bytes").unwrap().parse().unwrap();
        assert_eq!(Some(free_bytes), outbox.space().0);
    }

    #[tokio::test]
    async fn an_entry_that_cannot_be_read_is_reported_as_set_aside() {
        use crate::store::DamageTarget;
        let dir = tempfile::tempdir().unwrap();
        let outbox = Store::open(dir.path(), limits(10, 0)).unwrap();
        let state = AdminState::new(outbox.clone(), Arc::new(SenderStats::default()), "s");
        let (meter, st, drafts) = change("M1");
        outbox.commit(&meter, &st, drafts).unwrap();
        outbox.sync().await.unwrap();
        outbox.damage(DamageTarget::State("M1"), b"{\"raw\":").unwrap();
        assert_eq!(outbox.state("M1").unwrap(), None, "read once: set aside");

        let h = health(&state);
        assert_eq!((h.status, codes(&h)), (Status::Degraded, vec!["corrupt_entries"]));
        assert_eq!(
            h.reasons[0].message,
            "1 entries of the state database could not be read and were set aside: see `fieldgate outbox corrupt` (a record set aside is not delivered; a meter whose state was set aside started again from a baseline)"
        );
        assert_eq!(h.outbox.corrupt, 1);
        let text = crate::ops::metrics::render(&state);
        assert_eq!(series(&text, "fieldgate_outbox_corrupt_entries").as_deref(), Some("1"));
        assert_eq!(series(&text, "fieldgate_health_status").as_deref(), Some("1"));
    }

    #[tokio::test]
    async fn dead_letters_at_their_bound_degrade_health_with_the_refusals_counted() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Store::open(dir.path(), limits(1, 0)).unwrap();
        let state = AdminState::new(outbox.clone(), Arc::new(SenderStats::default()), "s");
        let results = outbox.commit_batch(vec![change("M1"), change("M2")]).unwrap();
        let ids: Vec<u64> = results.into_iter().map(|r| r.unwrap()[0].id).collect();
        outbox.sync().await.unwrap();
        outbox.bury(ids[0], "事件不存在", "t").await.unwrap();
        let e = outbox.bury(ids[1], "事件不存在", "t").await.unwrap_err();
        assert_eq!(e.error_code(), "dead_full");

        let h = health(&state);
        assert_eq!(
            (h.status, codes(&h)),
            (Status::Degraded, vec!["dead_letters", "dead_letters_full"])
        );
        assert_eq!(
            h.reasons[1].message,
            "1 dead letters, the bound outbox.max_dead: records the server refuses are not moved there any more; they stay queued, held and retried at the longest backoff (1 refused). See `fieldgate outbox dead`, fix the cause, then `fieldgate outbox requeue --all`"
        );
        assert_eq!(
            (
                h.outbox.dead,
                h.outbox.max_dead,
                h.outbox.dead_refused,
                h.outbox.records
            ),
            (1, 1, 1, 1)
        );
        let text = crate::ops::metrics::render(&state);
        assert_eq!(series(&text, "fieldgate_records_dead").as_deref(), Some("1"));
        assert_eq!(series(&text, "fieldgate_dead_letters_max").as_deref(), Some("1"));
        assert_eq!(
            series(&text, "fieldgate_dead_letters_refused_total").as_deref(),
            Some("1")
        );
    }

    fn quiet_counts() -> OutboxCounts {
        OutboxCounts {
            max_records: 100,
            max_bytes: 1 << 20,
            free_bytes: Some(3 << 30),
            min_free: 64 << 20,
            max_dead: 10_000,
            ..OutboxCounts::default()
        }
    }

    #[test]
    fn a_failed_store_is_critical_in_plain_words() {
        let counts = OutboxCounts {
            store: Some(StoreFault {
                error: "No space left on device (os error 28)".into(),
                for_seconds: 125,
                reopen_attempts: 5,
                reopen_error: Some("IO error: Input/output error (os error 5)".into()),
            }),
            store_failures: 1,
            ..quiet_counts()
        };
        let found = delivery_findings(&counts, &SenderSnapshot::default());
        assert_eq!(
            found,
            [Finding {
                status: Status::Critical,
                code: "store_failed".into(),
                message: "the state database failed 2m 5s ago (No space left on device (os error 28)): nothing is delivered or committed; it is reopened by itself (5 attempts, last: IO error: Input/output error (os error 5)). Polling goes on.".into(),
            }]
        );
        assert!(delivery_findings(&quiet_counts(), &SenderSnapshot::default()).is_empty());
    }

    #[test]
    fn commits_refused_while_space_is_back_are_not_a_full_outbox() {
        // The disk refused the last commit; space is back and the next cycle commits: no finding.
        let counts = OutboxCounts {
            refusing: true,
            refused_space: 3,
            ..quiet_counts()
        };
        assert!(delivery_findings(&counts, &SenderSnapshot::default()).is_empty());
        // The bounds refused it: outbox_full.
        let full = OutboxCounts {
            refusing: true,
            refused: 1,
            records: 100,
            ..quiet_counts()
        };
        let codes: Vec<String> = delivery_findings(&full, &SenderSnapshot::default())
            .into_iter()
            .map(|f| f.code)
            .collect();
        assert_eq!(codes, ["outbox_full"]);
    }
}

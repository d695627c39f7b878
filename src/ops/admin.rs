//! The admin HTTP API: the routes, their handlers and the server (sled lets one process open the
//! database, so while the daemon runs this is the only way in). What the answers contain is in
//! [`crate::ops::api`], how health is judged in [`crate::ops::health`].
//!
//! Routes (JSON unless said otherwise):
//! - `GET /`: the status page (HTML; its files under `/page/`, see `crate::ops::page`).
//! - `GET /healthz`: `ok` / `degraded` / `critical` with the reasons; HTTP 200, or 503 when critical.
//! - `GET /metrics`: Prometheus text format (`crate::ops::metrics`).
//! - `GET /buses`: each bus: up, requests, errors by kind, reconnects, last round time.
//! - `GET /meters`: each meter: bus, unit, current state, readings, last change, online, last sample age.
//! - `GET /outbox[?limit=N]`: counts, bounds, refused commits, free disk space, the state of the store,
//!   oldest age and the oldest queued records.
//! - `GET /outbox/dead[?limit=N&after=ID]`: one page of dead letters (id, meter, event, msg, attempts, …),
//!   oldest first: at most `limit` (default `PAGE_DEFAULT` = 100, at most `PAGE_MAX` = 1000) with ids
//!   after `after`; the next page starts after the last id of this one, an answer shorter than `limit`
//!   is the last page.
//! - `GET /outbox/corrupt[?limit=N]`: entries of the state database that could not be read and were set
//!   aside ([`CorruptEntry`]: what it was, size, why, first bytes); same `limit` default and bound.
//! - `GET /deliveries`: the work orders delivered last (at most 50, newest first, kept in memory).
//! - `POST /outbox/requeue` with `{"id": N}` or `{"all": true}`: dead letters back into the outbox.
//!
//! A `POST` must be JSON and, from a browser, come from the page it was sent to: every POST handler
//! starts with `same_origin::check` (`crate::ops::same_origin`); another site's page cannot requeue.
//!
//! No request loads an unbounded list: every listing has a bound, and health and `/metrics` take their
//! numbers from the store's counts (dead letters, set-aside entries) without reading the entries. A
//! failed store (waiting to be opened again, see `crate::store::fault`) answers the routes that read
//! it with HTTP 503 and the error in words; `/healthz` and `/metrics` still answer (`store_failed`).
//! Handlers that read the store run it on the blocking pool (sled blocks).
//!
//! It listens on loopback unless `[admin] allow_remote = true` (`check_listen`): there is no
//! authentication, and requeue changes what is delivered. It never opens the database itself: it works on
//! the daemon's handles ([`AdminState`]).

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::mapping::customer_label;
use crate::config::{AdminConfig, Transport};
use crate::ops::api::{
    BusView, DeadView, FailureView, MeterInfo, OutboxView, RecordView, RequeueAnswer, RequeueRequest, Status, LIST_MAX,
    OLDEST_SHOWN, PAGE_DEFAULT, PAGE_MAX,
};
use crate::ops::health::{health, outbox_counts};
use crate::ops::page::page_file;
use crate::ops::sources::AdminState;
use crate::store::{CorruptEntry, StoreError};

/// Why the admin API cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A non-loopback address without `allow_remote`.
    #[error("admin.listen {0} is not a loopback address; the admin API has no authentication: use 127.0.0.1, or set [admin] allow_remote = true behind a firewall")]
    NotLoopback(SocketAddr),
    /// The address could not be bound.
    #[error("cannot listen on {addr} for the admin API: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

#[cfg(test)]
impl AdminError {
    /// A bounded label for metrics.
    pub(crate) fn error_code(&self) -> &'static str {
        match self {
            AdminError::NotLoopback(_) => "not_loopback",
            AdminError::Bind { .. } => "bind",
        }
    }
}

/// `GET /outbox?limit=N`.
#[derive(Debug, Clone, Default, Deserialize)]
struct ListQuery {
    /// Oldest records to list (default [`OLDEST_SHOWN`], at most [`LIST_MAX`]).
    limit: Option<usize>,
}

/// `GET /outbox/dead?limit=N&after=ID` and `GET /outbox/corrupt?limit=N`.
#[derive(Debug, Clone, Default, Deserialize)]
struct PageQuery {
    /// Entries to list (default [`PAGE_DEFAULT`], at most [`PAGE_MAX`]).
    limit: Option<usize>,
    /// Dead letters only: list those with ids after this one (the last id of the page before).
    after: Option<u64>,
}

impl PageQuery {
    /// The page size asked for, within [`PAGE_MAX`].
    fn limit(&self) -> usize {
        self.limit.unwrap_or(PAGE_DEFAULT).min(PAGE_MAX)
    }
}

/// Refuse a non-loopback address unless `allow_remote`.
fn check_listen(addr: SocketAddr, allow_remote: bool) -> Result<(), AdminError> {
    if addr.ip().is_loopback() || allow_remote {
        Ok(())
    } else {
        Err(AdminError::NotLoopback(addr))
    }
}

/// Check `[admin]` and bind its address.
pub(crate) async fn bind(cfg: &AdminConfig) -> Result<TcpListener, AdminError> {
    check_listen(cfg.listen, cfg.allow_remote)?;
    TcpListener::bind(cfg.listen).await.map_err(|source| AdminError::Bind {
        addr: cfg.listen,
        source,
    })
}

/// The admin routes over `state`; merge more routes into it before serving if needed.
fn router(state: AdminState) -> Router {
    Router::new()
        .route("/", get(page_file))
        .route("/page/style.css", get(page_file))
        .route("/page/app.js", get(page_file))
        .route("/deliveries", get(get_deliveries))
        .route("/healthz", get(get_health))
        .route("/metrics", get(get_metrics))
        .route("/buses", get(get_buses))
        .route("/meters", get(get_meters))
        .route("/outbox", get(get_outbox))
        .route("/outbox/dead", get(get_dead))
        .route("/outbox/corrupt", get(get_corrupt))
        .route("/outbox/requeue", post(post_requeue))
        .with_state(state)
}

/// Serve the admin routes over `state` on `listener` until `shutdown`.
pub async fn serve_admin(listener: TcpListener, state: AdminState, shutdown: CancellationToken) -> std::io::Result<()> {
    let loopback = listener.local_addr().is_ok_and(|a| a.ip().is_loopback());
    serve_router(listener, router(state.on_loopback(loopback)), shutdown).await
}

/// Serve `router` on `listener` until `shutdown`.
async fn serve_router(listener: TcpListener, router: Router, shutdown: CancellationToken) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(message = "Admin API listening.", addr = %addr);
    }
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// The buses as `GET /buses` shows them.
fn buses(state: &AdminState) -> Vec<BusView> {
    let Some(field) = state.field_view() else {
        return Vec::new();
    };
    let live = field.live.snapshot();
    field
        .cfg
        .buses
        .iter()
        .zip(&field.buses)
        .enumerate()
        .map(|(i, (bus, stats))| {
            let s = stats.snapshot();
            let on_bus = || live.iter().zip(&field.cfg.meters).filter(move |(_, m)| m.bus == i);
            BusView {
                name: bus.name.clone(),
                transport: match bus.transport {
                    Transport::Tcp(_) => "tcp",
                    Transport::Serial { .. } => "serial",
                    Transport::RtuOverTcp(_) => "rtu_over_tcp",
                }
                .to_string(),
                endpoint: bus.transport.endpoint().to_string(),
                up: s.up,
                tried: s.connects + s.connect_failures > 0,
                open_error: stats.open_error(),
                meters: on_bus().count(),
                meters_online: on_bus().filter(|(v, _)| v.online).count(),
                requests: s.requests,
                errors: s.exceptions + s.timeouts + s.protocol_errors + s.transport_errors,
                exceptions: s.exceptions,
                timeouts: s.timeouts,
                protocol_errors: s.protocol_errors,
                transport_errors: s.transport_errors,
                reconnects: s.reconnects,
                connect_failures: s.connect_failures,
                rounds: s.rounds,
                last_round_seconds: s.last_round_micros as f64 / 1e6,
                poll_interval_seconds: bus.poll_interval.as_secs_f64(),
            }
        })
        .collect()
}

/// The meters as `GET /meters` shows them (reads each stored state from the outbox).
fn meters(state: &AdminState) -> Vec<MeterInfo> {
    let Some(field) = state.field_view() else {
        return Vec::new();
    };
    let live = field.live.snapshot();
    field
        .cfg
        .meters
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let view = live.get(i).cloned().unwrap_or_default();
            let stored = state.outbox.state(&m.meter_no).ok().flatten();
            let readings = m
                .readings
                .iter()
                .zip(&view.readings)
                .map(|(r, v)| (r.field.clone(), serde_json::Value::String(v.clone())))
                .collect();
            let link = field.buses.get(m.bus).and_then(|b| b.meter_link(&m.meter_no));
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            let tz = field.cfg.site.timezone;
            let offline_since = stored
                .as_ref()
                .and_then(|s| s.offline_since)
                .map(|t| t.with_timezone(&tz).to_rfc3339_opts(chrono::SecondsFormat::Secs, false));
            MeterInfo {
                customer: field.cfg.mapping.get(&m.meter_no).and_then(customer_label),
                offline_since,
                last_failure: link.and_then(|l| l.last_failure).map(|f| FailureView {
                    kind: f.kind.to_string(),
                    exception: f.exception,
                    age_seconds: f.at.elapsed().as_secs_f64(),
                }),
                meter_no: m.meter_no.clone(),
                bus: field.cfg.buses.get(m.bus).map(|b| b.name.clone()).unwrap_or_default(),
                unit: m.unit,
                online: view.online,
                state: view.state,
                stored_state: stored.as_ref().map(|s| s.label.clone()),
                last_change: stored.map(|s| s.since),
                readings,
                last_sample_age_seconds: view.last_sample.map(|t| t.elapsed().as_secs_f64()),
                answer_ms: link.and_then(|l| l.answer_last).map(ms),
                answer_max_ms: link.and_then(|l| l.answer_max).map(ms),
                timeout_ms: link.map(|l| ms(l.timeout)),
                timeouts: link.map_or(0, |l| l.timeouts),
                late_answers: link.map_or(0, |l| l.late_answers),
                late_answer_ms: link.and_then(|l| l.late_last).map(ms),
                retry_every_seconds: link.and_then(|l| l.retry_every).map(|d| d.as_secs_f64()),
                hint: link.and_then(|l| l.hint()),
            }
        })
        .collect()
}

// === handlers ===

/// Run `f` (it reads the store: sled blocks) on the blocking pool, not on an async worker.
async fn off_the_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Response> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, format!("internal error: {e}")))
}

async fn get_health(State(state): State<AdminState>) -> Response {
    let h = match off_the_runtime(move || health(&state)).await {
        Ok(h) => h,
        Err(r) => return r,
    };
    let code = if h.status == Status::Critical {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, Json(h)).into_response()
}

async fn get_metrics(State(state): State<AdminState>) -> Response {
    match off_the_runtime(move || crate::ops::metrics::render(&state)).await {
        Ok(text) => ([(header::CONTENT_TYPE, crate::ops::metrics::CONTENT_TYPE)], text).into_response(),
        Err(r) => r,
    }
}

async fn get_buses(State(state): State<AdminState>) -> Response {
    Json(buses(&state)).into_response()
}

async fn get_meters(State(state): State<AdminState>) -> Response {
    Json(meters(&state)).into_response()
}

async fn get_deliveries(State(state): State<AdminState>) -> Response {
    Json(state.recent_deliveries()).into_response()
}

async fn get_outbox(State(state): State<AdminState>, Query(q): Query<ListQuery>) -> Response {
    let limit = q.limit.unwrap_or(OLDEST_SHOWN).min(LIST_MAX);
    let read = off_the_runtime(move || {
        let records = state.outbox.list(limit)?;
        Ok(OutboxView {
            counts: outbox_counts(&state.outbox),
            oldest: records.iter().map(RecordView::from).collect(),
        })
    });
    match read.await {
        Ok(Ok(view)) => Json(view).into_response(),
        Ok(Err(e)) => store_error(&e),
        Err(r) => r,
    }
}

async fn get_dead(State(state): State<AdminState>, Query(q): Query<PageQuery>) -> Response {
    match off_the_runtime(move || state.outbox.dead_page(q.after, q.limit())).await {
        Ok(Ok(letters)) => Json(letters.iter().map(DeadView::from).collect::<Vec<_>>()).into_response(),
        Ok(Err(e)) => store_error(&e),
        Err(r) => r,
    }
}

async fn get_corrupt(State(state): State<AdminState>, Query(q): Query<PageQuery>) -> Response {
    match off_the_runtime(move || state.outbox.corrupt(q.limit())).await {
        Ok(Ok(entries)) => Json::<Vec<CorruptEntry>>(entries).into_response(),
        Ok(Err(e)) => store_error(&e),
        Err(r) => r,
    }
}

async fn post_requeue(
    State(state): State<AdminState>,
    headers: HeaderMap,
    body: Result<Json<RequeueRequest>, JsonRejection>,
) -> Response {
    if let Err(refusal) = crate::ops::same_origin::check(&headers, state.loopback) {
        return refusal.answer("/outbox/requeue");
    }
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"id\": N}} or {{\"all\": true}}: {}", e.body_text()),
            )
        }
    };
    let which = match (req.id, req.all) {
        (Some(id), false) => Some(id),
        (None, true) => None,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "give exactly one of {\"id\": N} and {\"all\": true}".into(),
            )
        }
    };
    // `requeue` does its store work on the blocking pool.
    match state.outbox.requeue(which).await {
        Ok(0) if which.is_some() => error(
            StatusCode::NOT_FOUND,
            format!("no dead letter with id {}", which.unwrap_or_default()),
        ),
        Ok(n) => {
            if n > 0 {
                tracing::info!(
                    message = "Dead letters requeued through the admin API.",
                    records = n,
                    id = which
                );
                if let Some(w) = &state.wake {
                    w.notify_one();
                }
            }
            Json(RequeueAnswer { requeued: n }).into_response()
        }
        Err(e) => store_error(&e),
    }
}

/// A store error as an answer: 503 while the store is failed (it is opened again by itself: ask
/// again later), 500 otherwise; the error in words either way.
fn store_error(e: &StoreError) -> Response {
    match e {
        StoreError::Failed { .. } | StoreError::Db { .. } | StoreError::Sync { .. } => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{e}; it is opened again by itself, ask again later (see /healthz, store_failed)"),
        ),
        _ => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn error(code: StatusCode, message: String) -> Response {
    (code, Json(serde_json::json!({ "error": message }))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_unless_allowed() {
        assert!(check_listen("127.0.0.1:9898".parse().unwrap(), false).is_ok());
        assert!(check_listen("[::1]:9898".parse().unwrap(), false).is_ok());
        let err = check_listen("0.0.0.0:9898".parse().unwrap(), false).unwrap_err();
        assert_eq!(err.error_code(), "not_loopback");
        assert!(err.to_string().contains("allow_remote"), "{err}");
        assert!(check_listen("10.0.0.5:9898".parse().unwrap(), true).is_ok());
    }

    #[tokio::test]
    async fn store_errors_answer_503_in_words_while_the_store_is_failed() {
        let failed = store_error(&StoreError::Failed {
            error: "No space left on device (os error 28)".into(),
        });
        assert_eq!(failed.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(failed.into_body(), 1 << 16).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v["error"],
            "the state database failed (No space left on device (os error 28)) and is not open again yet; nothing was written; it is opened again by itself, ask again later (see /healthz, store_failed)"
        );
        let other = store_error(&StoreError::Corrupt {
            tree: "dead",
            detail: "x".into(),
        });
        assert_eq!(other.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn pages_are_bounded() {
        let q = |limit| PageQuery { limit, after: None };
        assert_eq!(q(None).limit(), PAGE_DEFAULT);
        assert_eq!(q(Some(5)).limit(), 5);
        assert_eq!(q(Some(1_000_000)).limit(), PAGE_MAX);
    }
}

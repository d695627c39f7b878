//! The Panda WorkFlow client: GenerateToken, PostFlowNodeData, and the classification of every answer.
//!
//! Owns the HTTP client, the URLs of both auth modes, and the token (one per client, shared by clones).
//! It does **not** retry (beyond the one resend after a 401 with a fresh token), does not touch the outbox
//! and does not sleep: the sender owns the retry loop and the backoff.
//!
//! Classification ([`DeliveryError`]) decides what the caller does next, never the message text. In this
//! order:
//! - 401 (an nginx HTML page), whatever the body: the token is dropped, a new one fetched (single-flight),
//!   and the same request sent once more; a second 401 in a row is [`DeliveryError::Unauthorized`]. No loop.
//! - any 3xx: [`DeliveryError::Redirect`], naming the `Location`. **No request is ever redirected**
//!   (reqwest's redirect policy is `none` for GenerateToken and PostFlowNodeData): a POST re-sent to
//!   another address would carry the password or the work orders wherever a proxy points, and a 301/302
//!   would even turn it into a GET. A redirect means `panda.base_url` is wrong (often `http://` where
//!   the server wants `https://`).
//! - 408, 429, 503, whatever the body: [`DeliveryError::Busy`], with the server's `Retry-After` turned
//!   into a delay once, when the answer arrives ([`retry_after`]): delay-seconds as they are; an HTTP date
//!   minus the answer's own `Date` (both the server's clock; the local clock only when `Date` is missing),
//!   clamped to `0..=max(max_backoff, RETRY_AFTER_MAX)`. Nothing later subtracts wall-clock times.
//! - HTTP 2xx with a JSON object whose integer `code` is 0: delivered.
//! - a JSON object whose integer `code` is not 0 (and no 5xx): [`DeliveryError::Rejected`] (Panda said no).
//! - 400, 403, 413 or 422 without such a `code` (an nginx or firewall page, an empty body, JSON without
//!   `code`): [`DeliveryError::Refused`]: something at or in front of the server refused the request
//!   for what it carries (413: nginx's `client_max_body_size`, 1 MB by default; 403: a web application
//!   firewall; 400/422: a body the server cannot take). The sender splits such a request like a
//!   rejection.
//! - any other 4xx (404, 405, 410, 414, 415, 421, 426, 431, ...): [`DeliveryError::Transient`], with a
//!   hint that the URL or the request does not fit the server (`panda.base_url`, `panda.project`): these
//!   say nothing about one record, and a wrong URL must never dead-letter the queue.
//! - anything else (5xx, HTML or non-JSON under 2xx, an empty, truncated or oversized body, a timeout, a
//!   refused or reset connection, DNS): [`DeliveryError::Transient`]. A body that is not JSON is never
//!   success.
//! - GenerateToken: 3xx and 408/429/503 as above; a non-empty `errMsg`, an empty token, or a non-JSON
//!   client error (404 for a wrong project): [`DeliveryError::Login`].
//!
//! Token lifetime: the JWT payload's `exp` (seconds, may be a float), else `expirationTime` read in the site's
//! zone. Both are wall-clock times: the lifetime (expiry minus now) is computed **once**, when the token
//! arrives, and from then on measured on the monotonic clock (tokio's [`Instant`]), so a clock step (NTP
//! after a boot in 1970) neither expires a good token nor keeps a dead one. "Now" is the local clock, or
//! the server's `Date` header when the two disagree by more than [`CLOCK_SKEW_LIMIT`] (gateways often boot
//! without a real-time clock). The token is refreshed `refresh_before` ahead of expiry (or at half its
//! lifetime when that is shorter, so a short-lived token does not cause a login per request). A token whose
//! expiry cannot be read (or lies beyond what the monotonic clock can hold) is used until the server
//! answers 401.
//!
//! The password and the token are never logged and never appear in an error.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use chrono::{DateTime, FixedOffset, NaiveDateTime, TimeZone, Utc};
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, DATE, LOCATION, RETRY_AFTER};
use reqwest::StatusCode;
use serde::Serialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::{Auth, PandaConfig};
use crate::events::record::Record;

/// The header that carries the token on the external URL.
pub const TOKEN_HEADER: &str = "panda-token";

/// When the local clock and the server's `Date` differ by more than this, token lifetimes are measured
/// against the server's `Date`.
pub const CLOCK_SKEW_LIMIT: Duration = Duration::from_secs(30);

/// The most of a response body read; a longer body is a transient failure (no Panda answer is this long).
const MAX_BODY: usize = 256 * 1024;

/// The longest `Retry-After` honoured when `panda.max_backoff` is shorter (the bound is the larger of the
/// two): a server, or a clock off by years, asking for a day must not park the gateway for a day.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);

/// 4xx statuses that refuse a request for what it carries ([`DeliveryError::Refused`]): the sender
/// splits a batch answered so, down to the record at fault.
pub const REFUSAL_STATUSES: [u16; 4] = [400, 403, 413, 422];

/// The most of a `Location` kept in an error (it is shown in health and logs).
const MAX_LOCATION: usize = 300;

/// Errors building a [`PandaClient`] (configuration faults found at start).
#[derive(Debug, thiserror::Error)]
pub enum PandaError {
    /// A URL built from `base_url` and `project` does not parse.
    #[error("panda URL {url:?} is not valid: {reason}")]
    BadUrl {
        /// The URL that failed.
        url: String,
        /// Why.
        reason: String,
    },
    /// The HTTP client could not be set up (TLS backend).
    #[error("cannot set up the HTTP client: {0}")]
    Client(String),
}

impl PandaError {
    /// A bounded label for metrics.
    pub fn error_code(&self) -> &'static str {
        match self {
            PandaError::BadUrl { .. } => "bad_url",
            PandaError::Client(_) => "client",
        }
    }
}

/// Why a delivery did not happen. The records of a failed delivery stay queued, whatever the variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// GenerateToken refused (wrong credentials, or an unusable answer to a login): a configuration fault.
    #[error("Panda login failed: {0}")]
    Login(String),
    /// The server answered with a `code` other than 0 for the whole request.
    #[error("Panda rejected the request: code {code}: {msg}")]
    Rejected {
        /// The server's `code`.
        code: i64,
        /// The server's `msg`.
        msg: String,
    },
    /// The server answered 401 to a request sent with a freshly fetched token (or to an internal request).
    #[error("Panda answered 401 (no permission) even with a fresh token")]
    Unauthorized,
    /// No usable answer: network, timeout, 5xx, HTML, empty or non-JSON body, a 4xx that is not about the
    /// records (404: a wrong URL). Retrying may help.
    #[error("Panda unreachable or answer unusable: {0}")]
    Transient(String),
    /// 408, 429 or 503: the server (or a proxy) is busy or asks to slow down. Transient; the next
    /// attempt waits at least `retry_after` when the server gave one.
    #[error("Panda is busy: HTTP {status}{}: {detail}", retry_after_text(.retry_after))]
    Busy {
        /// The HTTP status.
        status: u16,
        /// The server's `Retry-After` as a delay from the answer, bounded (see [`retry_after`]).
        retry_after: Option<Duration>,
        /// What the body was.
        detail: String,
    },
    /// A 3xx: not followed. `panda.base_url` is wrong (a moved server, `http://` for `https://`).
    /// Transient for the records (kept), a configuration fault for the operator.
    #[error("Panda answered HTTP {status}, a redirect to {location}; requests are never redirected: set panda.base_url to the server's real address (e.g. https://)")]
    Redirect {
        /// The HTTP status.
        status: u16,
        /// The `Location` (resolved against the request's URL, without user info), or a note that it
        /// was missing.
        location: String,
    },
    /// 400, 403, 413 or 422 without a Panda `code`: the server or something in front of it (nginx's body
    /// limit, a web application firewall) refused this request for what it carries, without saying
    /// which record.
    #[error("the request was refused with HTTP {status} (no Panda code): {detail}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// What the body was (an nginx page's title).
        detail: String,
    },
}

fn retry_after_text(d: &Option<Duration>) -> String {
    d.map(|d| format!(" (Retry-After {})", humantime::format_duration(d)))
        .unwrap_or_default()
}

impl DeliveryError {
    /// A bounded label for metrics.
    pub fn error_code(&self) -> &'static str {
        match self {
            DeliveryError::Login(_) => "login_failed",
            DeliveryError::Rejected { .. } => "rejected",
            DeliveryError::Unauthorized => "unauthorized",
            DeliveryError::Transient(_) => "transient",
            DeliveryError::Busy { .. } => "busy",
            DeliveryError::Redirect { .. } => "redirect",
            DeliveryError::Refused { .. } => "http_refused",
        }
    }

    /// The least delay before the next attempt that the server asked for (`Retry-After`), if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            DeliveryError::Busy { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Client for one Panda deployment; cheap to clone, clones share the token.
#[derive(Clone)]
pub struct PandaClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// PostFlowNodeData URL of the configured auth mode.
    post_url: reqwest::Url,
    /// GenerateToken URL and credentials; `None` for `auth = "none"`.
    login: Option<Login>,
    user_id: i64,
    to_user_ids: String,
    opinion: String,
    refresh_before: Duration,
    tz: FixedOffset,
    /// The longest `Retry-After` honoured: `max(max_backoff, RETRY_AFTER_MAX)`.
    retry_after_bound: Duration,
    /// The current token. A tokio mutex held across GenerateToken, so concurrent callers wait for one
    /// login instead of each starting their own.
    token: Mutex<Option<Token>>,
    /// Successful GenerateToken calls.
    logins: AtomicU64,
}

struct Login {
    url: reqwest::Url,
    username: String,
    /// Never logged; not part of any Debug or Display.
    password: String,
}

struct Token {
    value: String,
    /// Fetch a new one from here on; `None` = expiry unknown, use until a 401.
    refresh_at: Option<Instant>,
    /// After this it is certainly useless; before it, it is still used if a refresh fails.
    expires_at: Option<Instant>,
}

impl std::fmt::Debug for PandaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PandaClient")
            .field("post_url", &self.inner.post_url.as_str())
            .field("auth", &if self.inner.login.is_some() { "token" } else { "none" })
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct PostBody<'a> {
    #[serde(rename = "eventName")]
    event_name: &'a str,
    #[serde(rename = "userId")]
    user_id: i64,
    #[serde(rename = "FlowDatas")]
    flow_datas: Vec<FlowData<'a>>,
}

#[derive(Serialize)]
struct FlowData<'a> {
    #[serde(rename = "toUserIds")]
    to_user_ids: &'a str,
    opinion: &'a str,
    #[serde(rename = "BizData")]
    biz_data: &'a str,
}

/// What one PostFlowNodeData exchange came to.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Accepted,
    /// HTTP 401: fetch a new token.
    Unauthorized,
    Failed(DeliveryError),
}

// === impl PandaClient ===

impl PandaClient {
    /// Build a client. `tz` is the zone of the server's `expirationTime` (the site's timezone).
    pub fn new(cfg: &PandaConfig, tz: FixedOffset) -> Result<PandaClient, PandaError> {
        let base = cfg.base_url.trim_end_matches('/');
        let parse = |s: String| {
            reqwest::Url::parse(&s).map_err(|e| PandaError::BadUrl {
                reason: e.to_string(),
                url: s,
            })
        };
        let (post_url, login) = match &cfg.auth {
            Auth::Token { username, password } => (
                parse(format!(
                    "{base}/pandaServer/{}/PandaWorkFlow/WorkFlow/api/PostFlowNodeData",
                    cfg.project
                ))?,
                Some(Login {
                    url: parse(format!("{base}/pandaServer/{}/GenerateToken", cfg.project))?,
                    username: username.clone(),
                    password: password.clone(),
                }),
            ),
            Auth::None => (
                parse(format!("{base}/PandaWorkFlow/WorkFlow/api/PostFlowNodeData"))?,
                None,
            ),
        };
        let http = reqwest::Client::builder()
            // Never follow a redirect: see the module docs; a 3xx is DeliveryError::Redirect.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .user_agent(concat!("fieldgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| PandaError::Client(e.to_string()))?;
        Ok(PandaClient {
            inner: Arc::new(Inner {
                http,
                post_url,
                login,
                user_id: cfg.user_id,
                to_user_ids: cfg.to_user_ids.clone(),
                opinion: cfg.opinion.clone(),
                refresh_before: cfg.refresh_before,
                tz,
                retry_after_bound: cfg.max_backoff.max(RETRY_AFTER_MAX),
                token: Mutex::new(None),
                logins: AtomicU64::new(0),
            }),
        })
    }

    /// The PostFlowNodeData URL in use (external or internal by auth mode).
    pub fn post_url(&self) -> &str {
        self.inner.post_url.as_str()
    }

    /// Successful GenerateToken calls since the client was built.
    pub fn token_refreshes(&self) -> u64 {
        self.inner.logins.load(Ordering::Relaxed)
    }

    /// Send `records` as one PostFlowNodeData request with `eventName = event_name`. `Ok` only when the
    /// server answered `{"code": 0}`; then every record in the request was accepted. An empty slice sends
    /// nothing and is `Ok`.
    ///
    /// Delivery is at-least-once: if the answer is lost (timeout, reset), the server may still have
    /// applied the request, and the caller will send it again.
    pub async fn post(&self, event_name: &str, records: &[Record]) -> Result<(), DeliveryError> {
        if records.is_empty() {
            return Ok(());
        }
        let inner = &self.inner;
        let body = PostBody {
            event_name,
            user_id: inner.user_id,
            flow_datas: records
                .iter()
                .map(|r| FlowData {
                    to_user_ids: &inner.to_user_ids,
                    opinion: &inner.opinion,
                    biz_data: &r.biz_data,
                })
                .collect(),
        };
        let body = serde_json::to_vec(&body)
            .map_err(|e| DeliveryError::Transient(format!("cannot encode the request: {e}")))?;
        if inner.login.is_none() {
            return match self.send(&body, None).await {
                Answer::Accepted => Ok(()),
                Answer::Unauthorized => Err(DeliveryError::Unauthorized),
                Answer::Failed(e) => Err(e),
            };
        }
        let token = self.token().await?;
        match self.send(&body, Some(&token)).await {
            Answer::Accepted => return Ok(()),
            Answer::Failed(e) => return Err(e),
            Answer::Unauthorized => {}
        }
        tracing::info!(message = "Panda answered 401; fetching a new token and sending again.");
        self.invalidate(&token).await;
        let token = self.token().await?;
        match self.send(&body, Some(&token)).await {
            Answer::Accepted => Ok(()),
            Answer::Unauthorized => Err(DeliveryError::Unauthorized),
            Answer::Failed(e) => Err(e),
        }
    }

    /// One PostFlowNodeData exchange, classified.
    async fn send(&self, body: &[u8], token: Option<&str>) -> Answer {
        let mut req = self
            .inner
            .http
            .post(self.inner.post_url.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_vec());
        if let Some(token) = token {
            match HeaderValue::from_str(token) {
                Ok(mut v) => {
                    v.set_sensitive(true);
                    req = req.header(TOKEN_HEADER, v);
                }
                Err(_) => {
                    return Answer::Failed(DeliveryError::Login(
                        "GenerateToken returned a token that cannot be sent in a header".into(),
                    ))
                }
            }
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Answer::Failed(DeliveryError::Transient(describe(e))),
        };
        let status = resp.status();
        let meta = Meta::of(&resp, self.inner.retry_after_bound);
        match read_body(resp).await {
            Ok(body) => classify_post(status, &meta, &body),
            // The status alone decides for a redirect or a busy server; a body cut short changes nothing.
            Err(reason) => {
                classify_post(status, &meta, &[]).or_transient(format!("HTTP {}: {reason}", status.as_u16()))
            }
        }
    }

    /// The current token, fetching a new one when there is none or it is due. Single-flight: the lock is
    /// held across GenerateToken.
    async fn token(&self) -> Result<String, DeliveryError> {
        let mut guard = self.inner.token.lock().await;
        let now = Instant::now();
        if let Some(t) = guard.as_ref() {
            if t.refresh_at.is_none_or(|at| now < at) {
                return Ok(t.value.clone());
            }
        }
        match self.login().await {
            Ok(fresh) => {
                let value = fresh.value.clone();
                *guard = Some(fresh);
                Ok(value)
            }
            Err(e) => {
                // A refresh ahead of expiry failed: the old token is still good until it expires.
                if let Some(old) = guard.as_ref().filter(|t| t.expires_at.is_some_and(|at| now < at)) {
                    tracing::warn!(message = "Cannot refresh the Panda token; using the current one until it expires.", error = %e);
                    return Ok(old.value.clone());
                }
                *guard = None;
                Err(e)
            }
        }
    }

    /// Drop `stale` after a 401, unless another caller has already replaced it.
    async fn invalidate(&self, stale: &str) {
        let mut guard = self.inner.token.lock().await;
        if guard.as_ref().is_some_and(|t| t.value == stale) {
            *guard = None;
        }
    }

    /// Call GenerateToken.
    async fn login(&self) -> Result<Token, DeliveryError> {
        let Some(login) = &self.inner.login else {
            return Err(DeliveryError::Login("no credentials configured".into()));
        };
        let form = [
            ("username", login.username.as_str()),
            ("password", login.password.as_str()),
        ];
        let resp = self
            .inner
            .http
            .post(login.url.clone())
            .form(&form)
            .send()
            .await
            .map_err(|e| DeliveryError::Transient(format!("GenerateToken: {}", describe(e))))?;
        let status = resp.status();
        let server_date = server_date(resp.headers());
        let meta = Meta::of(&resp, self.inner.retry_after_bound);
        let body = match read_body(resp).await {
            Ok(body) => body,
            // A redirect or a busy server is that whatever the body; anything else is transient.
            Err(r) => {
                return Err(match classify_login(status, &meta, b"") {
                    Err(e @ (DeliveryError::Redirect { .. } | DeliveryError::Busy { .. })) => e,
                    _ => DeliveryError::Transient(format!("GenerateToken HTTP {}: {r}", status.as_u16())),
                })
            }
        };
        let (value, expiration_time) = classify_login(status, &meta, &body)?;
        // The one place where wall-clock times are subtracted: expiry minus now, once, at arrival.
        let local_now = Utc::now();
        let now = match server_date {
            Some(d) if (d - local_now).abs().to_std().is_ok_and(|skew| skew > CLOCK_SKEW_LIMIT) => d,
            _ => local_now,
        };
        let expiry = token_expiry(&value, &expiration_time, self.inner.tz);
        let lifetime = expiry.and_then(|e| (e - now).to_std().ok()).filter(|l| !l.is_zero());
        let started = Instant::now();
        // An expiry too far away for the monotonic clock is an unknown one (used until a 401).
        let due = lifetime.and_then(|l| {
            Some((
                started.checked_add(refresh_delay(l, self.inner.refresh_before))?,
                started.checked_add(l)?,
            ))
        });
        let token = Token {
            refresh_at: due.map(|(refresh, _)| refresh),
            expires_at: due.map(|(_, expiry)| expiry),
            value,
        };
        self.inner.logins.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            message = "Fetched a Panda token.",
            expires_in_s = lifetime.map(|l| l.as_secs()),
            user = %login.username
        );
        Ok(token)
    }
}

// === classification (pure) ===

/// What the headers of an answer say, read before its body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Meta {
    /// `Retry-After` as a bounded delay from the answer.
    retry_after: Option<Duration>,
    /// `Location`, resolved against the request's URL, without user info, cut to [`MAX_LOCATION`].
    location: Option<String>,
}

impl Meta {
    fn of(resp: &reqwest::Response, bound: Duration) -> Meta {
        let headers = resp.headers();
        let retry_after = headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after(v, server_date(headers), Utc::now(), bound));
        let location = headers.get(LOCATION).map(|v| {
            let raw = String::from_utf8_lossy(v.as_bytes()).trim().to_string();
            let shown = match resp.url().join(&raw) {
                Ok(mut url) => {
                    let _ = url.set_username("");
                    let _ = url.set_password(None);
                    url.to_string()
                }
                Err(_) => raw,
            };
            let mut shown: String = shown.chars().filter(|c| !c.is_control()).collect();
            if shown.chars().count() > MAX_LOCATION {
                shown = shown.chars().take(MAX_LOCATION).collect::<String>() + "…";
            }
            shown
        });
        Meta { retry_after, location }
    }

    fn location_text(&self) -> String {
        self.location
            .clone()
            .unwrap_or_else(|| "(no Location header)".to_string())
    }
}

/// The `Date` of an answer, if it has a readable one.
fn server_date(headers: &HeaderMap) -> Option<DateTime<Utc>> {
    headers
        .get(DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_http_date)
}

impl Answer {
    /// `self`, unless it is a failure other than a redirect or a busy server: then `Transient(reason)`.
    fn or_transient(self, reason: String) -> Answer {
        match self {
            Answer::Failed(e @ (DeliveryError::Redirect { .. } | DeliveryError::Busy { .. })) => Answer::Failed(e),
            Answer::Unauthorized => Answer::Unauthorized,
            _ => Answer::Failed(DeliveryError::Transient(reason)),
        }
    }
}

/// Whether an answer with `status` says the server is busy (and may carry `Retry-After`).
fn is_busy(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 429 | 503)
}

/// Classify a PostFlowNodeData answer (see the module docs for the order of the rules).
fn classify_post(status: StatusCode, meta: &Meta, body: &[u8]) -> Answer {
    if status == StatusCode::UNAUTHORIZED {
        return Answer::Unauthorized;
    }
    if status.is_redirection() {
        return Answer::Failed(DeliveryError::Redirect {
            status: status.as_u16(),
            location: meta.location_text(),
        });
    }
    if is_busy(status) {
        return Answer::Failed(DeliveryError::Busy {
            status: status.as_u16(),
            retry_after: meta.retry_after,
            detail: describe_body(body),
        });
    }
    let code_msg = serde_json::from_slice::<serde_json::Value>(strip_bom(body))
        .ok()
        .and_then(|v| {
            let obj = v.as_object()?;
            let code = obj.get("code")?.as_i64()?;
            let msg = obj.get("msg").and_then(|m| m.as_str()).unwrap_or_default().to_string();
            Some((code, msg))
        });
    match code_msg {
        Some((0, _)) if status.is_success() => Answer::Accepted,
        Some((code, msg)) if code != 0 && !status.is_server_error() => {
            Answer::Failed(DeliveryError::Rejected { code, msg })
        }
        _ if REFUSAL_STATUSES.contains(&status.as_u16()) => Answer::Failed(DeliveryError::Refused {
            status: status.as_u16(),
            detail: describe_body(body),
        }),
        _ if status.is_client_error() => Answer::Failed(DeliveryError::Transient(format!(
            "HTTP {}: {}: the URL or the request does not fit this server (check panda.base_url and panda.project)",
            status.as_u16(),
            describe_body(body)
        ))),
        _ => Answer::Failed(DeliveryError::Transient(format!(
            "HTTP {}: {}",
            status.as_u16(),
            describe_body(body)
        ))),
    }
}

/// Classify a GenerateToken answer into (token, expirationTime).
fn classify_login(status: StatusCode, meta: &Meta, body: &[u8]) -> Result<(String, String), DeliveryError> {
    if status.is_redirection() {
        return Err(DeliveryError::Redirect {
            status: status.as_u16(),
            location: meta.location_text(),
        });
    }
    if is_busy(status) {
        return Err(DeliveryError::Busy {
            status: status.as_u16(),
            retry_after: meta.retry_after,
            detail: format!("GenerateToken: {}", describe_body(body)),
        });
    }
    let parsed = serde_json::from_slice::<serde_json::Value>(strip_bom(body)).ok();
    let obj = parsed.as_ref().and_then(|v| v.as_object());
    let text = |k: &str| {
        obj.and_then(|o| o.get(k))
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let retryable = status.is_server_error();
    if retryable || obj.is_none() {
        let what = format!("GenerateToken HTTP {}: {}", status.as_u16(), describe_body(body));
        // A non-JSON answer with a client-error status (404 for a wrong project, 403) is a configuration
        // fault: report it as a login failure, loudly. Overload and garbage may pass.
        return Err(if retryable || status.is_success() {
            DeliveryError::Transient(what)
        } else {
            DeliveryError::Login(what)
        });
    }
    let err_msg = text("errMsg");
    if !err_msg.is_empty() {
        return Err(DeliveryError::Login(err_msg));
    }
    let token = text("token");
    if token.is_empty() {
        return Err(DeliveryError::Login(format!(
            "GenerateToken (HTTP {}) returned no token and no errMsg",
            status.as_u16()
        )));
    }
    Ok((token, text("expirationTime")))
}

/// JSON may start with a UTF-8 byte order mark (RFC 8259 lets a parser ignore it); serde_json does not.
fn strip_bom(body: &[u8]) -> &[u8] {
    body.strip_prefix(b"\xef\xbb\xbf".as_slice()).unwrap_or(body)
}

/// A `Retry-After` value as a delay from the answer: delay-seconds as they are; an HTTP date minus the
/// answer's `Date` (`server_date`: both on the server's clock), or minus `local_now` when the answer has
/// no `Date`. Wall-clock times are subtracted here, once; the caller keeps the delay on the monotonic
/// clock. Clamped to `0..=bound` (a date in the past is 0). `None` when the value is unreadable.
pub fn retry_after(
    value: &str,
    server_date: Option<DateTime<Utc>>,
    local_now: DateTime<Utc>,
    bound: Duration,
) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Digits beyond u64 are a very long delay: the bound.
        return Some(value.parse::<u64>().map_or(bound, Duration::from_secs).min(bound));
    }
    let at = parse_http_date(value)?;
    let now = server_date.unwrap_or(local_now);
    Some((at - now).to_std().unwrap_or(Duration::ZERO).min(bound))
}

/// An HTTP date (RFC 9110 §5.6.7): IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), or the obsolete RFC 850
/// (`Sunday, 06-Nov-94 08:49:37 GMT`) and asctime (`Sun Nov  6 08:49:37 1994`) forms.
pub fn parse_http_date(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(d) = DateTime::parse_from_rfc2822(s) {
        return Some(d.with_timezone(&Utc));
    }
    let squeezed = s.split_whitespace().collect::<Vec<_>>().join(" ");
    NaiveDateTime::parse_from_str(&squeezed, "%A, %d-%b-%y %H:%M:%S GMT")
        .or_else(|_| NaiveDateTime::parse_from_str(&squeezed, "%a %b %e %H:%M:%S %Y"))
        .ok()
        .map(|n| n.and_utc())
}

/// When a token expires: the JWT payload's `exp`, else `expiration_time` (`YYYY-MM-DD HH:MM:SS`) in `tz`.
pub fn token_expiry(token: &str, expiration_time: &str, tz: FixedOffset) -> Option<DateTime<Utc>> {
    jwt_exp(token).or_else(|| expiration_in_zone(expiration_time, tz))
}

/// The `exp` claim of a JWT (seconds since the epoch, integer or float), if it has a readable one.
pub fn jwt_exp(token: &str) -> Option<DateTime<Utc>> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_f64()?;
    if !exp.is_finite() || exp <= 0.0 || exp > 1.0e11 {
        return None;
    }
    let secs = exp.trunc();
    let nanos = ((exp - secs) * 1e9) as u32;
    DateTime::from_timestamp(secs as i64, nanos.min(999_999_999))
}

/// `expirationTime` (`YYYY-MM-DD HH:MM:SS`, local wall-clock time of the server) read in zone `tz`.
pub fn expiration_in_zone(s: &str, tz: FixedOffset) -> Option<DateTime<Utc>> {
    let naive = NaiveDateTime::parse_from_str(s.trim(), "%Y-%m-%d %H:%M:%S").ok()?;
    tz.from_local_datetime(&naive).single().map(|d| d.with_timezone(&Utc))
}

/// How long after login to fetch a new token: `refresh_before` ahead of expiry, but not before half the
/// lifetime (a token shorter-lived than `refresh_before` must not cause a login per request).
fn refresh_delay(lifetime: Duration, refresh_before: Duration) -> Duration {
    lifetime.saturating_sub(refresh_before).max(lifetime / 2)
}

/// Read a body up to [`MAX_BODY`]; a broken or oversized body is an error (the answer is unusable).
async fn read_body(mut resp: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > MAX_BODY {
                    return Err(format!("body longer than {MAX_BODY} bytes"));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(buf),
            Err(e) => return Err(format!("body unreadable (truncated?): {}", describe(e))),
        }
    }
}

/// A reqwest error as one line: what kind, then its causes (no URL: it could carry credentials).
fn describe(e: reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "request"
    };
    let e = e.without_url();
    let mut text = format!("{kind}: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A short description of a body that was not a usable answer.
fn describe_body(body: &[u8]) -> String {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return "empty body".into();
    }
    let text = String::from_utf8_lossy(body);
    let lower = text.to_ascii_lowercase();
    if lower.contains("<html") || lower.contains("<!doctype") {
        let title = lower
            .find("<title>")
            .and_then(|start| {
                let from = start + "<title>".len();
                let len = lower.get(from..)?.find("</title>")?;
                text.get(from..from + len)
            })
            .map(|t| t.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        return format!("HTML page, not JSON (title {title:?})");
    }
    let snippet: String = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(120)
        .collect();
    format!("not a Panda answer: {snippet:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC_TOKEN: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJleHAiOjE2NzIzODI3NDQuMCwidXNlcklEIjo0Mn0.aGH7TCqdA8MroKu3kp2rjrNF3NFLuBySUDOXA2PdHQo";

    fn cst() -> FixedOffset {
        FixedOffset::east_opt(8 * 3600).unwrap()
    }

    fn post(status: u16, body: &str) -> Answer {
        classify_post(StatusCode::from_u16(status).unwrap(), &Meta::default(), body.as_bytes())
    }

    fn post_with(status: u16, meta: Meta, body: &str) -> Answer {
        classify_post(StatusCode::from_u16(status).unwrap(), &meta, body.as_bytes())
    }

    fn login(status: StatusCode, body: &[u8]) -> Result<(String, String), DeliveryError> {
        classify_login(status, &Meta::default(), body)
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn transient(a: Answer) -> String {
        match a {
            Answer::Failed(DeliveryError::Transient(r)) => r,
            other => panic!("expected transient, got {other:?}"),
        }
    }

    #[test]
    fn code_zero_with_200_is_the_only_success() {
        assert_eq!(post(200, r#"{"code":0,"msg":""}"#), Answer::Accepted);
        assert_eq!(post(200, r#"{"code": 0}"#), Answer::Accepted);
        assert_eq!(
            post(200, "\u{feff}{\"code\":0}"),
            Answer::Accepted,
            "a BOM may precede JSON"
        );
        transient(post(500, r#"{"code":0,"msg":""}"#));
        transient(post(404, r#"{"code":0}"#));
        transient(post(200, r#"{"code":"0","msg":""}"#));
        transient(post(200, r#"{"code":0.5}"#));
        transient(post(200, r#"[{"code":0}]"#));
        transient(post(200, r#"{"msg":""}"#));
    }

    #[test]
    fn a_nonzero_code_is_a_rejection_with_the_servers_msg() {
        assert_eq!(
            post(200, r#"{"code":-1,"msg":"事件【用水户开阀】不存在"}"#),
            Answer::Failed(DeliveryError::Rejected {
                code: -1,
                msg: "事件【用水户开阀】不存在".into()
            })
        );
        assert_eq!(
            post(400, r#"{"code":7}"#),
            Answer::Failed(DeliveryError::Rejected {
                code: 7,
                msg: "".into()
            })
        );
    }

    #[test]
    fn html_empty_truncated_and_server_errors_are_transient() {
        let r = transient(post(200, "<html><head><title>502 Bad Gateway</title></head></html>"));
        assert!(r.contains("HTML") && r.contains("502 Bad Gateway"), "{r}");
        assert!(transient(post(200, "")).contains("empty body"));
        assert!(transient(post(200, "  \n")).contains("empty body"));
        assert!(transient(post(200, r#"{"code":0,"ms"#)).contains("not a Panda answer"));
        assert!(transient(post(200, "OK")).contains("not a Panda answer"));
        transient(post(502, "<html>bad gateway</html>"));
    }

    #[test]
    fn a_401_asks_for_a_new_token_whatever_the_body() {
        let page = "<!DOCTYPE html><html><head><title>401-对不起！您没有权限访问</title></head></html>";
        assert_eq!(post(401, page), Answer::Unauthorized);
        assert_eq!(post(401, r#"{"code":0}"#), Answer::Unauthorized);
    }

    #[test]
    fn a_login_with_errmsg_or_without_token_fails_as_login() {
        let ok = StatusCode::OK;
        assert_eq!(
            login(ok, r#"{"errMsg":"密码错误","expirationTime":"","token":""}"#.as_bytes()),
            Err(DeliveryError::Login("密码错误".into()))
        );
        assert!(matches!(
            login(ok, r#"{"errMsg":"","expirationTime":"","token":""}"#.as_bytes()),
            Err(DeliveryError::Login(_))
        ));
        assert_eq!(
            login(
                ok,
                r#"{"errMsg":"","expirationTime":"2022-12-30 11:12:52","token":"a.b.c"}"#.as_bytes()
            ),
            Ok(("a.b.c".into(), "2022-12-30 11:12:52".into()))
        );
    }

    #[test]
    fn an_unusable_login_answer_is_transient_unless_it_is_a_client_error() {
        assert!(matches!(
            login(StatusCode::OK, b"<html></html>"),
            Err(DeliveryError::Transient(_))
        ));
        assert!(matches!(
            login(StatusCode::BAD_GATEWAY, br#"{"errMsg":"x"}"#),
            Err(DeliveryError::Transient(_))
        ));
        assert!(matches!(
            login(StatusCode::NOT_FOUND, b"<html>404</html>"),
            Err(DeliveryError::Login(_))
        ));
    }

    #[test]
    fn the_spec_tokens_float_exp_is_read() {
        let exp = jwt_exp(SPEC_TOKEN).unwrap();
        assert_eq!(exp.timestamp(), 1_672_382_744);
        let frac = format!(
            "x.{}.y",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"exp":1700000000.25,"userID":42}"#)
        );
        assert_eq!(jwt_exp(&frac).unwrap().timestamp_millis(), 1_700_000_000_250);
        let int = format!(
            "x.{}.y",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"exp":1700000000}"#)
        );
        assert_eq!(jwt_exp(&int).unwrap().timestamp(), 1_700_000_000);
    }

    #[test]
    fn a_garbage_token_has_no_exp_and_does_not_panic() {
        for t in [
            "",
            ".",
            "a",
            "a.b",
            "a.!!!.c",
            "a.e30.c",
            "a.bnVsbA.c",
            "x.eyJleHAiOiJzb29uIn0.y",
            "x.eyJleHAiOjFlMzAwfQ.y",
            "x.eyJleHAiOi0xfQ.y",
        ] {
            assert_eq!(jwt_exp(t), None, "{t}");
        }
    }

    #[test]
    fn expiration_time_is_read_in_the_configured_zone() {
        let t = expiration_in_zone("2022-12-30 11:12:52", cst()).unwrap();
        assert_eq!(t.to_rfc3339(), "2022-12-30T03:12:52+00:00");
        let utc = FixedOffset::east_opt(0).unwrap();
        assert_eq!(
            expiration_in_zone("2022-12-30 11:12:52", utc).unwrap().to_rfc3339(),
            "2022-12-30T11:12:52+00:00"
        );
        assert_eq!(expiration_in_zone("", cst()), None);
        assert_eq!(expiration_in_zone("2022-12-30T11:12:52", cst()), None);
        assert_eq!(expiration_in_zone("2022-13-30 11:12:52", cst()), None);
    }

    #[test]
    fn the_jwt_exp_wins_over_expiration_time() {
        let t = token_expiry(SPEC_TOKEN, "2022-12-30 11:12:52", cst()).unwrap();
        assert_eq!(t.timestamp(), 1_672_382_744);
        let t = token_expiry("opaque", "2022-12-30 11:12:52", cst()).unwrap();
        assert_eq!(t.to_rfc3339(), "2022-12-30T03:12:52+00:00");
    }

    #[test]
    fn refresh_is_ahead_of_expiry_but_not_before_half_the_lifetime() {
        let s = Duration::from_secs;
        assert_eq!(refresh_delay(s(3600), s(60)), s(3540));
        assert_eq!(refresh_delay(s(2), s(60)), s(1));
        assert_eq!(refresh_delay(s(0), s(60)), s(0));
    }

    #[test]
    fn busy_answers_carry_retry_after_whatever_the_body() {
        let meta = Meta {
            retry_after: Some(Duration::from_secs(7)),
            location: None,
        };
        for status in [408, 429, 503] {
            for body in [
                "<html><title>busy</title></html>",
                r#"{"code":-1,"msg":"busy"}"#,
                r#"{"code":0}"#,
                "",
            ] {
                match post_with(status, meta.clone(), body) {
                    Answer::Failed(e @ DeliveryError::Busy { .. }) => {
                        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)), "{status} {body}");
                        assert_eq!(e.error_code(), "busy");
                        assert!(e.to_string().contains(&format!("HTTP {status}")), "{e}");
                        assert!(e.to_string().contains("(Retry-After 7s)"), "{e}");
                    }
                    other => panic!("{status} {body}: {other:?}"),
                }
            }
        }
        assert!(matches!(
            post(429, ""),
            Answer::Failed(DeliveryError::Busy { retry_after: None, .. })
        ));
        assert!(matches!(
            login(StatusCode::SERVICE_UNAVAILABLE, br#"{"errMsg":"x"}"#),
            Err(DeliveryError::Busy { status: 503, .. })
        ));
        assert!(matches!(
            login(StatusCode::TOO_MANY_REQUESTS, b""),
            Err(DeliveryError::Busy { status: 429, .. })
        ));
    }

    #[test]
    fn a_redirect_is_an_error_that_names_the_location() {
        let meta = Meta {
            retry_after: None,
            location: Some("https://panda.example/pandaServer/demo/GenerateToken".into()),
        };
        for status in [301, 302, 303, 307, 308] {
            match post_with(status, meta.clone(), r#"{"code":0}"#) {
                Answer::Failed(e @ DeliveryError::Redirect { .. }) => {
                    let text = e.to_string();
                    assert!(
                        text.contains("https://panda.example/pandaServer/demo/GenerateToken"),
                        "{text}"
                    );
                    assert!(text.contains("panda.base_url"), "{text}");
                    assert_eq!(e.error_code(), "redirect");
                }
                other => panic!("{status}: {other:?}"),
            }
            assert!(matches!(
                classify_login(StatusCode::from_u16(status).unwrap(), &meta, b""),
                Err(DeliveryError::Redirect { .. })
            ));
        }
        match post(301, "") {
            Answer::Failed(DeliveryError::Redirect { location, .. }) => {
                assert!(location.contains("no Location"), "{location}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_content_4xx_without_code_is_a_refusal_and_other_4xx_are_transient() {
        let page = "<html>\r\n<head><title>413 Request Entity Too Large</title></head><body>nginx</body></html>";
        for status in REFUSAL_STATUSES {
            for body in [page, "", r#"{"type":"about:blank","status":400}"#] {
                match post(status, body) {
                    Answer::Failed(e @ DeliveryError::Refused { .. }) => {
                        assert_eq!(e.error_code(), "http_refused");
                        assert!(e.to_string().contains(&format!("HTTP {status}")), "{e}");
                    }
                    other => panic!("{status} {body}: {other:?}"),
                }
            }
        }
        match post(413, page) {
            Answer::Failed(DeliveryError::Refused { detail, .. }) => {
                assert!(detail.contains("413 Request Entity Too Large"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
        // Panda's own refusal stays a rejection with its msg.
        assert_eq!(
            post(403, r#"{"code":-3,"msg":"无权限"}"#),
            Answer::Failed(DeliveryError::Rejected {
                code: -3,
                msg: "无权限".into()
            })
        );
        for status in [404, 405, 410, 414, 415, 421, 426, 431, 409] {
            let r = transient(post(status, "<html><title>x</title></html>"));
            assert!(r.contains("panda.base_url"), "{status}: {r}");
        }
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date_turned_into_a_bounded_delay_once() {
        let s = Duration::from_secs;
        let bound = s(300);
        let now = utc("2026-03-01T08:00:00Z");
        assert_eq!(retry_after("120", None, now, bound), Some(s(120)));
        assert_eq!(retry_after(" 0 ", None, now, bound), Some(s(0)));
        assert_eq!(retry_after("86400", None, now, bound), Some(bound), "clamped");
        assert_eq!(retry_after("99999999999999999999999", None, now, bound), Some(bound));
        assert_eq!(retry_after("-5", None, now, bound), None);
        assert_eq!(retry_after("1.5", None, now, bound), None);
        assert_eq!(retry_after("soon", None, now, bound), None);
        assert_eq!(retry_after("", None, now, bound), None);
        // An HTTP date against the answer's own Date: the local clock (here 56 years off) does not matter.
        let server = Some(utc("2026-03-01T08:00:00Z"));
        let boot = utc("1970-01-01T00:00:10Z");
        assert_eq!(
            retry_after("Sun, 01 Mar 2026 08:00:30 GMT", server, boot, bound),
            Some(s(30))
        );
        // Without Date, the local clock.
        assert_eq!(
            retry_after("Sun, 01 Mar 2026 08:00:30 GMT", None, now, bound),
            Some(s(30))
        );
        assert_eq!(
            retry_after("Sun, 01 Mar 2026 07:00:00 GMT", None, now, bound),
            Some(s(0)),
            "past"
        );
        assert_eq!(
            retry_after("Mon, 01 Mar 2027 08:00:00 GMT", None, now, bound),
            Some(bound),
            "far"
        );
        assert_eq!(
            retry_after("Sunday, 01-Mar-26 08:01:00 GMT", None, now, bound),
            Some(s(60)),
            "RFC 850"
        );
        assert_eq!(
            retry_after("Sun Mar  1 08:02:00 2026", None, now, bound),
            Some(s(120)),
            "asctime"
        );
    }

    #[test]
    fn the_retry_after_bound_is_the_larger_of_max_backoff_and_five_minutes() {
        let cfg = |max_backoff: Duration| PandaConfig {
            base_url: "http://127.0.0.1:1".into(),
            project: "demo".into(),
            auth: Auth::None,
            user_id: 42,
            to_user_ids: String::new(),
            opinion: String::new(),
            timeout: Duration::from_secs(5),
            max_batch: 10,
            retry_min: Duration::from_millis(10),
            max_backoff,
            refresh_before: Duration::from_secs(60),
        };
        let c = PandaClient::new(&cfg(Duration::from_secs(1)), cst()).unwrap();
        assert_eq!(c.inner.retry_after_bound, RETRY_AFTER_MAX);
        let c = PandaClient::new(&cfg(Duration::from_secs(1800)), cst()).unwrap();
        assert_eq!(c.inner.retry_after_bound, Duration::from_secs(1800));
    }

    #[test]
    fn errors_have_bounded_codes_and_carry_the_servers_msg() {
        let e = DeliveryError::Rejected {
            code: -1,
            msg: "事件【X】不存在".into(),
        };
        assert_eq!(e.error_code(), "rejected");
        assert!(e.to_string().contains("事件【X】不存在"));
        assert_eq!(DeliveryError::Login("x".into()).error_code(), "login_failed");
        assert_eq!(DeliveryError::Transient("x".into()).error_code(), "transient");
        assert_eq!(DeliveryError::Unauthorized.error_code(), "unauthorized");
    }
}

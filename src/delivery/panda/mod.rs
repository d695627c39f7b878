//! The Panda WorkFlow client: PostFlowNodeData under both auth modes, and how a response is read.
//!
//! Owns the HTTP client, the URLs of both auth modes (`auth = "token"`: the external URL, the token in
//! the `panda-token` header; `auth = "none"`: the internal URL, no token), and the token (one per
//! client, shared by clones). It does **not** retry (beyond the one resend after a 401 with a fresh
//! token), does not touch the store and does not sleep: the sender owns the retry loop and the backoff.
//!
//! **No request is ever redirected** (reqwest's redirect policy is `none` for GenerateToken and
//! PostFlowNodeData): a POST re-sent to another address would carry the password or the work orders
//! wherever a proxy points, and a 301/302 would even turn it into a GET. A 3xx is
//! [`DeliveryError::Redirect`]. A response body is read up to 256 KiB; a longer, broken or truncated one
//! is an unusable answer. The password and the token are never logged and never appear in an error.
//!
//! - this file: [`PandaClient`] (build, PostFlowNodeData and its JSON body, reading a response),
//!   [`PandaError`].
//! - [`answer`]: what every server answer means ([`DeliveryError`]); pure: status, headers and body in,
//!   a classification out; `Retry-After` and HTTP dates.
//! - `token.rs`: the token: single-flight GenerateToken, its lifetime on the monotonic clock, dropped
//!   after a 401.
//!
//! The request body is built here and is small (`eventName`, `userId`, `FlowDatas`); the answers are
//! read field by field in `answer.rs`, never into a fixed type: that is why there is no separate file
//! of wire types.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::FixedOffset;
use reqwest::header::{HeaderValue, CONTENT_TYPE};
use serde::Serialize;
use tokio::sync::Mutex;

use crate::config::{Auth, PandaConfig};
use crate::events::record::Record;

pub mod answer;
pub(crate) mod token;

use answer::{classify_post, Answer, DeliveryError, Meta, RETRY_AFTER_MAX};
use token::Token;

/// The header that carries the token on the external URL.
const TOKEN_HEADER: &str = "panda-token";

/// The most of a response body read; a longer body is a transient failure (no Panda answer is this long).
const MAX_BODY: usize = 256 * 1024;

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

impl std::fmt::Debug for PandaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PandaClient")
            .field("post_url", &self.inner.post_url.as_str())
            .field("auth", &if self.inner.login.is_some() { "token" } else { "none" })
            .finish_non_exhaustive()
    }
}

/// The PostFlowNodeData request body (the server's field names).
#[derive(Serialize)]
struct PostBody<'a> {
    #[serde(rename = "eventName")]
    event_name: &'a str,
    #[serde(rename = "userId")]
    user_id: i64,
    #[serde(rename = "FlowDatas")]
    flow_datas: Vec<FlowData<'a>>,
}

/// One work order of a request: its BizData, with the configured recipients and opinion.
#[derive(Serialize)]
struct FlowData<'a> {
    #[serde(rename = "toUserIds")]
    to_user_ids: &'a str,
    opinion: &'a str,
    #[serde(rename = "BizData")]
    biz_data: &'a str,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cst() -> FixedOffset {
        FixedOffset::east_opt(8 * 3600).unwrap()
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
}

//! What the mock Panda keeps: issued tokens (shaped like the document's JWTs), accepted work orders
//! (in memory, and appended to the JSON-lines file if one is set), counters, the injected-fault queue
//! and the log of every PostFlowNodeData request.
//!
//! Invariant: the JSON-lines file is appended under one lock, so lines never interleave; an order is
//! kept only after it was written there. Never: decides an answer (`handlers.rs`, `check.rs` do).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use base64::Engine;
use chrono::{FixedOffset, Utc};
use serde::Serialize;
use tokio::io::AsyncWriteExt;

use super::{lock, Fault, MockOptions};

/// `userID` in the tokens' payload.
const TOKEN_USER_ID: i64 = 42;

/// One PostFlowNodeData request as the mock saw it
/// ([`MockPanda::request_log`](super::MockPanda::request_log)).
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// When it arrived, on tokio's monotonic clock.
    pub at: tokio::time::Instant,
    /// The status answered ([`Fault::Reset`] shows 500, never sent).
    pub status: u16,
    /// The `Retry-After` answered, if any.
    pub retry_after: Option<String>,
    /// The `Location` answered, if any.
    pub location: Option<String>,
}

/// The most requests [`MockPanda::request_log`](super::MockPanda::request_log) keeps (the oldest go
/// first).
pub(super) const REQUEST_LOG_MAX: usize = 100_000;

/// One accepted `FlowDatas` element, with its request's fields.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkOrder {
    /// Number of the PostFlowNodeData request that carried it (1-based, counts every request received).
    pub request: u64,
    /// `eventName`.
    pub event_name: String,
    /// `userId`.
    pub user_id: i64,
    /// `FlowDatas[].toUserIds` (`""` when absent).
    pub to_user_ids: String,
    /// `FlowDatas[].opinion` (`""` when absent).
    pub opinion: String,
    /// `FlowDatas[].BizData`, exactly as received.
    pub biz_data: String,
    /// `BizData` parsed.
    pub biz: serde_json::Map<String, serde_json::Value>,
    /// Arrived on the external (token) URL.
    pub external: bool,
}

impl WorkOrder {
    /// A BizData value as text, `-` when the key is missing or not a string (for printing).
    pub(crate) fn field(&self, key: &str) -> &str {
        self.biz.get(key).and_then(|v| v.as_str()).unwrap_or("-")
    }
}

/// One readable line per order: event, 水表表号, 用户名称, 阀门当前状态.
fn order_line(o: &WorkOrder) -> String {
    let get = |k: &str| o.field(k);
    format!(
        "工单 #{} {}  水表表号={}  用户名称={}  阀门当前状态={}{}",
        o.request,
        o.event_name,
        get("水表表号"),
        get("用户名称"),
        get(crate::config::mapping::VALVE_STATE_KEY),
        if o.external { "" } else { "  (internal)" }
    )
}

/// The state every handler shares (behind an `Arc`), and the handle reads.
pub(super) struct Shared {
    pub(super) opts: MockOptions,
    pub(super) orders: Mutex<Vec<WorkOrder>>,
    /// Issued token → when it expires.
    pub(super) tokens: Mutex<HashMap<String, SystemTime>>,
    pub(super) logins: AtomicU64,
    pub(super) login_attempts: AtomicU64,
    pub(super) requests: AtomicU64,
    /// PostFlowNodeData requests answered 401.
    pub(super) unauthorized: AtomicU64,
    pub(super) unavailable: AtomicBool,
    pub(super) login_fails: AtomicBool,
    /// GenerateToken calls still to refuse (`fail_next_logins`).
    pub(super) fail_next_logins: AtomicU64,
    pub(super) unknown_events: Mutex<HashSet<String>>,
    pub(super) faults: Mutex<VecDeque<Fault>>,
    /// While set, every request answers this redirect: (status, Location).
    pub(super) redirect: Mutex<Option<(u16, String)>>,
    /// [`MockOptions::status_biz`], changeable while running.
    pub(super) status_biz: Mutex<Vec<(u16, String)>>,
    /// PostFlowNodeData requests as seen, at most [`REQUEST_LOG_MAX`].
    pub(super) log: Mutex<VecDeque<SeenRequest>>,
    /// Serialises appends to the JSON-lines file so lines never interleave.
    pub(super) jsonl: tokio::sync::Mutex<()>,
}

impl Shared {
    pub(super) fn new(opts: MockOptions) -> Shared {
        Shared {
            orders: Mutex::new(Vec::new()),
            tokens: Mutex::new(HashMap::new()),
            logins: AtomicU64::new(0),
            login_attempts: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
            unavailable: AtomicBool::new(false),
            login_fails: AtomicBool::new(false),
            fail_next_logins: AtomicU64::new(0),
            unknown_events: Mutex::new(opts.unknown_events.iter().cloned().collect()),
            faults: Mutex::new(VecDeque::new()),
            redirect: Mutex::new(None),
            status_biz: Mutex::new(opts.status_biz.clone()),
            log: Mutex::new(VecDeque::new()),
            jsonl: tokio::sync::Mutex::new(()),
            opts,
        }
    }

    /// Write accepted orders to the file (if any), then keep them in memory and print them.
    pub(super) async fn keep(&self, orders: &[WorkOrder]) -> io::Result<()> {
        let _serial = self.jsonl.lock().await;
        if let Some(path) = &self.opts.jsonl {
            let mut lines = String::new();
            for o in orders {
                lines.push_str(&serde_json::to_string(o).map_err(io::Error::other)?);
                lines.push('\n');
            }
            let mut f = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .await?;
            f.write_all(lines.as_bytes()).await?;
            f.flush().await?;
        }
        lock(&self.orders).extend(orders.iter().cloned());
        if self.opts.print {
            for o in orders {
                println!("{}", order_line(o));
            }
        }
        Ok(())
    }
}

/// A token shaped like the document's: `header.payload.sig` (base64url), payload `{"exp": float, "userID"}`.
/// Returns (token, expiry, `expirationTime` in +08:00).
pub(super) fn mint(ttl: Duration) -> (String, SystemTime, String) {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let expires = SystemTime::now() + ttl;
    let exp = expires
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    let header = b64.encode(r#"{"typ":"JWT","alg":"HS256"}"#);
    let payload = b64.encode(serde_json::json!({"exp": exp, "userID": TOKEN_USER_ID}).to_string());
    let sig = b64.encode(rand::random::<[u8; 32]>());
    let cst = FixedOffset::east_opt(8 * 3600).unwrap_or_else(|| unreachable!("+08:00 is a valid offset"));
    let expiration_time = chrono::Duration::from_std(ttl)
        .ok()
        .and_then(|d| Utc::now().checked_add_signed(d))
        .map(|t| t.with_timezone(&cst).format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default();
    (format!("{header}.{payload}.{sig}"), expires, expiration_time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_carry_a_float_exp_the_client_can_read() {
        let (token, expires, expiration_time) = mint(Duration::from_secs(60));
        assert_eq!(token.split('.').count(), 3);
        let exp = crate::delivery::panda::token::jwt_exp(&token).unwrap();
        let want = chrono::DateTime::<Utc>::from(expires);
        assert!((exp - want).num_milliseconds().abs() < 2, "{exp} vs {want}");
        let cst = FixedOffset::east_opt(8 * 3600).unwrap();
        let by_time = crate::delivery::panda::token::expiration_in_zone(&expiration_time, cst).unwrap();
        assert!((by_time - want).num_seconds().abs() <= 1);
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap();
        let text = String::from_utf8(payload).unwrap();
        assert!(
            text.contains("\"exp\":") && text.contains('.') && text.contains("\"userID\":42"),
            "{text}"
        );
    }
}

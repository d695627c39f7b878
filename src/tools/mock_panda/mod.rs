//! A strict, in-process Panda WorkFlow server (axum) for tests, the demo and users trying the gateway
//! without the real server.
//!
//! Owns its own state only: issued tokens, accepted work orders, counters and injected faults. It is
//! stricter than the vendor's document demands of a server, so that a client that passes here sends only
//! what the document allows:
//! - GenerateToken (form): wrong user → `errMsg` 用户名不存在, wrong password → 密码错误; tokens are
//!   JWT-shaped (`header.payload.sig`, base64url) with payload `{"exp": <float secs>, "userID": 42}` and an
//!   `expirationTime` in +08:00, as the document shows.
//! - External PostFlowNodeData needs an issued, unexpired token in `panda-token`, else HTTP 401 with the
//!   nginx HTML page of the document. Internal PostFlowNodeData needs none.
//! - The body must be a JSON object with exactly `eventName` (string), `userId` (integer) and `FlowDatas`
//!   (non-empty array of objects with `toUserIds`/`opinion` (optional strings) and `BizData`, a *string*
//!   holding a JSON object); anything else is `{"code":-1,"msg":…}`. Unknown events are
//!   `{"code":-1,"msg":"事件【X】不存在"}`. A request is accepted or refused as a whole.
//!
//! Fault injection: every PostFlowNodeData first honours the persistent [`MockPanda::set_unavailable`]
//! and [`MockPanda::set_redirect`] (both also answer GenerateToken), then consumes the next queued
//! [`Fault`] ([`MockPanda::push_fault`], `POST /_mock/fault/{kind}`), then draws a random fault at
//! [`MockOptions::fail_rate`] from [`MockOptions::fault_kinds`], then applies the rules of a proxy in
//! front of Panda: [`MockOptions::max_body`] (nginx's `client_max_body_size`: 413 with nginx's page) and
//! [`MockOptions::status_biz`] (a web application firewall: a status page for any request whose body, or a
//! BizData in it, contains a text). All of these answer before any token or body check, so they never
//! apply the request, except [`Fault::SlowAnswer`], which applies it and then answers late (the
//! lost-answer case). [`Fault::Busy`] answers 408/429/503 with an optional `Retry-After` (seconds, or an
//! HTTP date with a matching `Date`); [`Fault::Redirect`] answers a 3xx with a `Location`. [`Fault::Truncate`] sends a 200 with a JSON body cut
//! in the middle (the connection then closes); [`Fault::Reset`] closes the TCP connection without any
//! answer. Beyond faults: events the server does not know ([`MockOptions::unknown_events`],
//! [`MockPanda::set_unknown_event`]), poison BizData ([`MockOptions::reject_biz`]: a request carrying it
//! is refused as a whole, as the real server does), revoked tokens ([`MockPanda::revoke_tokens`]: every
//! token in use answers 401) and refused logins ([`MockPanda::fail_next_logins`],
//! `POST /_mock/fail-next-login`).
//!
//! Every PostFlowNodeData is logged with its arrival time (on tokio's monotonic clock) and the status and
//! headers answered ([`MockPanda::request_log`]), so tests can check the gaps a client leaves.
//!
//! Control endpoints (for the CLI mock; not part of the Panda API): `POST /_mock/fail-next-login`,
//! `POST /_mock/fault/{kind}` (`500`, `html`, `truncate`, `reset`, `slow`, `reject`, `408`, `429`, `503`
//! (with `--retry-after`), `413`, `403`, `301` (to `--redirect-to`)), `POST /_mock/revoke-tokens`,
//! `GET /_mock/stats`.
//!
//! [`MockPanda::stop`] closes the listener *and* every open connection (keep-alive included), so clients
//! see refused or reset connections, as with a real server going down.
//!
//! Files:
//! - `mod.rs`: [`MockOptions`] and the running server's handle, [`MockPanda`] (its test controls).
//! - `state.rs`: what the server keeps: tokens, accepted [`WorkOrder`]s, counters, the request log.
//! - `handlers.rs`: the routes, and the order in which a PostFlowNodeData meets faults and checks.
//! - `faults.rs`: the faults ([`Fault`], [`FaultKind`], [`RetryAfter`]) and the random draw.
//! - `check.rs`: the strict checks of what a client sends (token, Content-Type, body).
//! - `replies.rs`: how the answers look (JSON, nginx pages, busy, redirect, truncated).
//! - `listener.rs`: the listener whose connections all fail once the mock stops (or one is reset).
//! - `command.rs`: `fieldgate mock-panda`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod check;
mod command;
mod faults;
mod handlers;
mod listener;
mod replies;
mod state;

pub(crate) use command::{mock_panda_main, MockPandaArgs};
pub use faults::{Fault, FaultKind, RetryAfter};
pub use state::{SeenRequest, WorkOrder};

use listener::{Conn, StoppableListener};
use state::Shared;

/// How the mock behaves.
#[derive(Debug, Clone)]
pub struct MockOptions {
    /// GenerateToken `username` accepted.
    pub username: String,
    /// GenerateToken `password` accepted.
    pub password: String,
    /// The `{projectName}` path segment served.
    pub project: String,
    /// Lifetime of an issued token.
    pub token_ttl: Duration,
    /// Known `eventName`s; others are refused with 事件【X】不存在.
    pub events: Vec<String>,
    /// Append every accepted order to this file as one JSON line.
    pub jsonl: Option<PathBuf>,
    /// Print every accepted order as one readable line on stdout.
    pub print: bool,
    /// Events refused with 事件【X】不存在 even if listed in `events`.
    pub unknown_events: Vec<String>,
    /// A request with a `BizData` containing one of these texts is refused as a whole (a poison record).
    pub reject_biz: Vec<String>,
    /// Probability (0..=1) that a PostFlowNodeData meets a random fault from `fault_kinds`.
    pub fail_rate: f64,
    /// The faults drawn at `fail_rate` (empty: HTTP 500).
    pub fault_kinds: Vec<FaultKind>,
    /// How late [`FaultKind::Slow`] answers.
    pub slow_delay: Duration,
    /// `Retry-After` (whole seconds) sent with the 408/429/503 of [`FaultKind`]; `None`: no header.
    pub retry_after: Option<Duration>,
    /// `Location` of [`FaultKind::Redirect301`]; `None`: the request's URL with `https://`.
    pub redirect_to: Option<String>,
    /// A request whose body is longer answers 413 with nginx's page (its `client_max_body_size`, 1 MB by
    /// default in nginx); `None`: no limit.
    pub max_body: Option<usize>,
    /// (status, text): a request whose body, or a BizData in it, contains the text answers the status with
    /// an nginx-style page (a web application firewall that dislikes one record, or a per-record 413).
    pub status_biz: Vec<(u16, String)>,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            username: "0CYKwAUCTLZ4KW6l".into(),
            password: "1vOkb5Ps4XfitL6G".into(),
            project: "demo".into(),
            token_ttl: Duration::from_secs(3600),
            events: vec!["用水户开阀".into(), "用水户关阀".into()],
            jsonl: None,
            print: false,
            unknown_events: Vec::new(),
            reject_biz: Vec::new(),
            fail_rate: 0.0,
            fault_kinds: Vec::new(),
            slow_delay: Duration::from_secs(30),
            retry_after: None,
            redirect_to: None,
            max_body: None,
            status_biz: Vec::new(),
        }
    }
}

/// A running mock server; dropping it stops the server.
pub struct MockPanda {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MockPanda {
    /// Serve on `listener` (bind `127.0.0.1:0` in tests; bind the old address again to "restart").
    /// Must be called inside a tokio runtime.
    pub fn start(listener: TcpListener, opts: MockOptions) -> MockPanda {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let shared = Arc::new(Shared::new(opts));
        let router = handlers::router(shared.clone());
        let stop = CancellationToken::new();
        let listener = StoppableListener {
            inner: listener,
            stop: stop.clone(),
        };
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router.into_make_service_with_connect_info::<Conn>()).await {
                tracing::warn!(message = "Mock Panda server ended.", error = %e);
            }
        });
        MockPanda {
            addr,
            shared,
            stop,
            task: Mutex::new(Some(task)),
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr`, for `panda.base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every accepted order, in arrival order.
    pub fn orders(&self) -> Vec<WorkOrder> {
        lock(&self.shared.orders).clone()
    }

    /// Tokens issued.
    pub fn logins(&self) -> u64 {
        self.shared.logins.load(Ordering::Relaxed)
    }

    /// GenerateToken calls, failed ones included.
    pub fn login_attempts(&self) -> u64 {
        self.shared.login_attempts.load(Ordering::Relaxed)
    }

    /// PostFlowNodeData requests received, whatever the answer.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// PostFlowNodeData requests answered 401 (no valid token, or an injected 401).
    pub fn unauthorized(&self) -> u64 {
        self.shared.unauthorized.load(Ordering::Relaxed)
    }

    /// While `true`, PostFlowNodeData and GenerateToken answer 503 with an HTML page.
    pub fn set_unavailable(&self, on: bool) {
        self.shared.unavailable.store(on, Ordering::Relaxed);
    }

    /// While `true`, GenerateToken refuses every login (`errMsg` set, empty token).
    pub fn set_login_fails(&self, on: bool) {
        self.shared.login_fails.store(on, Ordering::Relaxed);
    }

    /// Queue a fault for the next PostFlowNodeData request (faults are used up in order).
    pub fn push_fault(&self, fault: Fault) {
        lock(&self.shared.faults).push_back(fault);
    }

    /// Refuse the next `n` GenerateToken calls with `errMsg` 密码错误 (as wrong credentials would).
    pub fn fail_next_logins(&self, n: u64) {
        self.shared.fail_next_logins.fetch_add(n, Ordering::Relaxed);
    }

    /// Make `event` unknown (refused with 事件【X】不存在) or known again (if listed in `events`), e.g. to
    /// model an operator creating the event on the server.
    pub fn set_unknown_event(&self, event: &str, unknown: bool) {
        let mut set = lock(&self.shared.unknown_events);
        if unknown {
            set.insert(event.to_string());
        } else {
            set.remove(event);
        }
    }

    /// While `Some((status, location))`, GenerateToken and PostFlowNodeData answer that redirect (a server
    /// that moved, or an http→https redirect); `None` ends it.
    pub fn set_redirect(&self, redirect: Option<(u16, String)>) {
        *lock(&self.shared.redirect) = redirect;
    }

    /// Replace the firewall rules of [`MockOptions::status_biz`] (empty: lift them).
    pub fn set_status_biz(&self, rules: Vec<(u16, String)>) {
        *lock(&self.shared.status_biz) = rules;
    }

    /// Every PostFlowNodeData request so far (the latest `REQUEST_LOG_MAX`), in arrival order.
    pub fn request_log(&self) -> Vec<SeenRequest> {
        lock(&self.shared.log).iter().cloned().collect()
    }

    /// Forget every issued token: the next request with any of them is answered 401.
    pub fn revoke_tokens(&self) {
        lock(&self.shared.tokens).clear();
    }

    /// Stop serving: the listener closes (connections are refused) and every open connection is closed.
    pub async fn stop(&self) {
        self.stop.cancel();
        let task = lock(&self.task).take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for MockPanda {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}

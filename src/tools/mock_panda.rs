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
//! Every PostFlowNodeData is logged with its arrival time (tokio's monotonic clock and the wall clock) and
//! the status and headers answered ([`MockPanda::request_log`]), so tests can check the gaps a client
//! leaves.
//!
//! Control endpoints (for the CLI mock; not part of the Panda API): `POST /_mock/fail-next-login`,
//! `POST /_mock/fault/{kind}` (`500`, `html`, `truncate`, `reset`, `slow`, `reject`, `408`, `429`, `503`
//! (with `--retry-after`), `413`, `403`, `301` (to `--redirect-to`)), `POST /_mock/revoke-tokens`,
//! `GET /_mock/stats`.
//!
//! [`MockPanda::stop`] closes the listener *and* every open connection (keep-alive included), so clients
//! see refused or reset connections, as with a real server going down.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::connect_info::Connected;
use axum::extract::rejection::FormRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use base64::Engine;
use chrono::{FixedOffset, Utc};
use futures_util::StreamExt;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// The 401 page the document shows (an nginx HTML page, not JSON).
pub const UNAUTHORIZED_PAGE: &str = r##"<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN" "http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">
<html xmlns="http://www.w3.org/1999/xhtml">
<head> <meta http-equiv="Content-Type" content="text/html; charset=utf-8" />
<title>401-对不起！您没有权限访问</title>
<style type="text/css">
.head404{ width:480px; height:234px; margin:50px auto 0 auto; background:url("/nginx_images/lock.png") no-repeat; }.txtbg404{ width:499px; height:169px; margin:10px auto 0 auto; background:url("/nginx_images/txtbg404.png") no-repeat;}.txtbg404 .txtbox{ width:390px; position:relative; top:30px; left:60px;color:#eee; font-size:13px;}.txtbg404 .txtbox p {margin:5px 0; line-height:18px;}.txtbg404 .txtbox .paddingbox { padding-top:15px;}.txtbg404 .txtbox p a { color:#eee; text-decoration:none;}.txtbg404 .txtbox p a:hover { color:#FC9D1D; text-decoration:underline;}
</style>
</head>
<body bgcolor="#494949">
<div class="head404"></div>
<div class="txtbg404">
<div class="txtbox">
<h3>对不起，您没有权限访问,请检查 token 状态</h3>
<p class="paddingbox">请点击以下链接继续浏览网页</p>
<p>》<a style="cursor:pointer" onclick="history.back()">返回上一页面</a></p>
<p>》<a href="https://panda-water.cn/">返回网站首页</a></p>
</div>
</div>
</body>
</html>
"##;

/// `userID` in the tokens' payload.
const TOKEN_USER_ID: i64 = 42;

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

/// A `Retry-After` header of [`Fault::Busy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryAfter {
    /// Delay-seconds.
    Seconds(u64),
    /// An HTTP date this long after the answer (whole seconds), sent with a `Date` header of the same
    /// instant, so the delay the two give is exactly this.
    DateIn(Duration),
    /// This text as it is (garbage, a date in the past, ...).
    Raw(String),
}

/// One PostFlowNodeData request as the mock saw it ([`MockPanda::request_log`]).
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// Its number (1-based), as in [`WorkOrder::request`].
    pub n: u64,
    /// When it arrived, on tokio's monotonic clock.
    pub at: tokio::time::Instant,
    /// When it arrived, by the wall clock.
    pub wall: SystemTime,
    /// The status answered ([`Fault::Reset`] shows 500, never sent).
    pub status: u16,
    /// The `Retry-After` answered, if any.
    pub retry_after: Option<String>,
    /// The `Location` answered, if any.
    pub location: Option<String>,
}

/// The most requests [`MockPanda::request_log`] keeps (the oldest go first).
const REQUEST_LOG_MAX: usize = 100_000;

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

/// A misbehaviour for the next PostFlowNodeData request. All but [`Fault::SlowAnswer`] answer before the
/// request is looked at, so the request is not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Answer this HTTP status with an nginx-style HTML page (401: the document's 401 page, as for an
    /// invalid token).
    Status(u16),
    /// Answer 200 with an HTML page.
    Html,
    /// Answer 200 with an empty body.
    Empty,
    /// Answer 200 with `{"code": code, "msg": msg}`.
    Reject {
        /// `code`.
        code: i64,
        /// `msg`.
        msg: String,
    },
    /// Handle the request normally (it is applied if valid), then wait this long before answering: a client
    /// that times out first has lost the answer to an applied request.
    SlowAnswer(Duration),
    /// Answer 200 with `Content-Length` of a full `{"code":0,"msg":""}` but only its first half, then close
    /// the connection: a body cut mid-JSON under a correct-looking status.
    Truncate,
    /// Close the TCP connection without answering anything.
    Reset,
    /// Answer `status` (408, 429, 503: busy) with an nginx-style page and, if set, `Retry-After`.
    Busy {
        /// The status.
        status: u16,
        /// The `Retry-After` header.
        retry_after: Option<RetryAfter>,
    },
    /// Answer `status` (301, 302, 307, 308) with a `Location` header and nginx's page. `None`: the
    /// request's URL with `https://` (an http→https redirect).
    Redirect {
        /// The status.
        status: u16,
        /// The `Location`.
        location: Option<String>,
    },
}

/// The fault kinds of the command line (`--fault`) and of `POST /_mock/fault/{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FaultKind {
    /// HTTP 500 with an HTML page.
    #[value(name = "500")]
    Status500,
    /// HTTP 200 with an HTML page.
    Html,
    /// HTTP 200, body cut mid-JSON.
    Truncate,
    /// Connection closed without an answer.
    Reset,
    /// Applied, but answered after `slow_delay` (the client's timeout loses the answer).
    Slow,
    /// `{"code":-1,"msg":"模拟拒绝（故障注入）"}`.
    Reject,
    /// HTTP 408 (with `Retry-After` if `--retry-after` is set).
    #[value(name = "408")]
    Status408,
    /// HTTP 429 (with `Retry-After` if `--retry-after` is set).
    #[value(name = "429")]
    Status429,
    /// HTTP 503 (with `Retry-After` if `--retry-after` is set).
    #[value(name = "503")]
    Status503,
    /// HTTP 413 with nginx's page (a body over `client_max_body_size`).
    #[value(name = "413")]
    Status413,
    /// HTTP 403 with an nginx-style page (a web application firewall).
    #[value(name = "403")]
    Status403,
    /// HTTP 301 to `--redirect-to` (default: the request's URL with https://).
    #[value(name = "301")]
    Redirect301,
}

impl FaultKind {
    /// The fault this kind stands for, with the delays and addresses of `opts`.
    pub fn fault_with(self, opts: &MockOptions) -> Fault {
        let busy = |status| Fault::Busy {
            status,
            retry_after: opts.retry_after.map(|d| RetryAfter::Seconds(d.as_secs())),
        };
        match self {
            FaultKind::Status408 => busy(408),
            FaultKind::Status429 => busy(429),
            FaultKind::Status503 => busy(503),
            FaultKind::Redirect301 => Fault::Redirect {
                status: 301,
                location: opts.redirect_to.clone(),
            },
            other => other.fault(opts.slow_delay),
        }
    }

    /// The fault this kind stands for (408/429/503 without `Retry-After`, 301 to https://).
    pub fn fault(self, slow_delay: Duration) -> Fault {
        match self {
            FaultKind::Status408 => Fault::Busy {
                status: 408,
                retry_after: None,
            },
            FaultKind::Status429 => Fault::Busy {
                status: 429,
                retry_after: None,
            },
            FaultKind::Status503 => Fault::Busy {
                status: 503,
                retry_after: None,
            },
            FaultKind::Status413 => Fault::Status(413),
            FaultKind::Status403 => Fault::Status(403),
            FaultKind::Redirect301 => Fault::Redirect {
                status: 301,
                location: None,
            },
            FaultKind::Status500 => Fault::Status(500),
            FaultKind::Html => Fault::Html,
            FaultKind::Truncate => Fault::Truncate,
            FaultKind::Reset => Fault::Reset,
            FaultKind::Slow => Fault::SlowAnswer(slow_delay),
            FaultKind::Reject => Fault::Reject {
                code: -1,
                msg: "模拟拒绝（故障注入）".into(),
            },
        }
    }

    /// Parse `500`, `html`, `truncate`, `reset`, `slow`, `reject`, `408`, `429`, `503`, `413`, `403`, `301`.
    pub fn parse(s: &str) -> Option<FaultKind> {
        <FaultKind as clap::ValueEnum>::from_str(s.trim(), true).ok()
    }
}

struct Shared {
    opts: MockOptions,
    orders: Mutex<Vec<WorkOrder>>,
    /// Issued token → when it expires.
    tokens: Mutex<HashMap<String, SystemTime>>,
    logins: AtomicU64,
    login_attempts: AtomicU64,
    requests: AtomicU64,
    /// PostFlowNodeData requests answered 401.
    unauthorized: AtomicU64,
    unavailable: AtomicBool,
    login_fails: AtomicBool,
    /// GenerateToken calls still to refuse (`fail_next_logins`).
    fail_next_logins: AtomicU64,
    unknown_events: Mutex<HashSet<String>>,
    faults: Mutex<VecDeque<Fault>>,
    /// While set, every request answers this redirect: (status, Location).
    redirect: Mutex<Option<(u16, String)>>,
    /// [`MockOptions::status_biz`], changeable while running.
    status_biz: Mutex<Vec<(u16, String)>>,
    /// PostFlowNodeData requests as seen, at most [`REQUEST_LOG_MAX`].
    log: Mutex<VecDeque<SeenRequest>>,
    /// Serialises appends to the JSON-lines file so lines never interleave.
    jsonl: tokio::sync::Mutex<()>,
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

// === impl MockPanda ===

impl MockPanda {
    /// Serve on `listener` (bind `127.0.0.1:0` in tests; bind the old address again to "restart").
    /// Must be called inside a tokio runtime.
    pub fn start(listener: TcpListener, opts: MockOptions) -> MockPanda {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let shared = Arc::new(Shared {
            opts: opts.clone(),
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
        });
        let router = Router::new()
            .route("/pandaServer/{project}/GenerateToken", post(generate_token))
            .route(
                "/pandaServer/{project}/PandaWorkFlow/WorkFlow/api/PostFlowNodeData",
                post(post_external),
            )
            .route("/PandaWorkFlow/WorkFlow/api/PostFlowNodeData", post(post_internal))
            .route("/_mock/fail-next-login", post(control_fail_next_login))
            .route("/_mock/fault/{kind}", post(control_fault))
            .route("/_mock/revoke-tokens", post(control_revoke_tokens))
            .route("/_mock/stats", get(control_stats))
            .fallback(not_found)
            .with_state(shared.clone());
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

    /// Every PostFlowNodeData request so far (the latest [`REQUEST_LOG_MAX`]), in arrival order.
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

// === handlers ===

async fn not_found() -> Response {
    html(StatusCode::NOT_FOUND, "404 Not Found")
}

async fn generate_token(
    State(s): State<Arc<Shared>>,
    Path(project): Path<String>,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    if project != s.opts.project {
        return html(StatusCode::NOT_FOUND, "404 Not Found");
    }
    s.login_attempts.fetch_add(1, Ordering::Relaxed);
    if s.unavailable.load(Ordering::Relaxed) {
        return html(StatusCode::SERVICE_UNAVAILABLE, "503 Service Temporarily Unavailable");
    }
    let redirect = lock(&s.redirect).clone();
    if let Some((status, location)) = redirect {
        return redirect_page(status, &location);
    }
    let Ok(Form(form)) = form else {
        return json(
            serde_json::json!({"errMsg": "请求必须是 application/x-www-form-urlencoded 表单", "expirationTime": "", "token": ""}),
        );
    };
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
    let fail_next = s
        .fail_next_logins
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok();
    let err_msg = if s.login_fails.load(Ordering::Relaxed) {
        Some("登录失败（模拟故障）")
    } else if fail_next {
        Some("密码错误")
    } else if field("username") != s.opts.username {
        Some("用户名不存在")
    } else if field("password") != s.opts.password {
        Some("密码错误")
    } else {
        None
    };
    if let Some(m) = err_msg {
        return json(serde_json::json!({"errMsg": m, "expirationTime": "", "token": ""}));
    }
    let (token, expires, expiration_time) = mint(s.opts.token_ttl);
    {
        let mut tokens = lock(&s.tokens);
        let now = SystemTime::now();
        tokens.retain(|_, exp| *exp > now);
        tokens.insert(token.clone(), expires);
    }
    s.logins.fetch_add(1, Ordering::Relaxed);
    json(serde_json::json!({"errMsg": "", "expirationTime": expiration_time, "token": token}))
}

async fn post_external(
    State(s): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    Path(project): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if project != s.opts.project {
        return html(StatusCode::NOT_FOUND, "404 Not Found");
    }
    s.post_flow_node_data(true, &conn, &uri, &headers, &body).await
}

async fn post_internal(
    State(s): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    s.post_flow_node_data(false, &conn, &uri, &headers, &body).await
}

async fn control_fail_next_login(State(s): State<Arc<Shared>>) -> Response {
    let pending = s.fail_next_logins.fetch_add(1, Ordering::Relaxed) + 1;
    json(serde_json::json!({"ok": true, "failing_logins": pending}))
}

async fn control_fault(State(s): State<Arc<Shared>>, Path(kind): Path<String>) -> Response {
    match FaultKind::parse(&kind) {
        Some(k) => {
            lock(&s.faults).push_back(k.fault_with(&s.opts));
            json(serde_json::json!({"ok": true, "queued": lock(&s.faults).len()}))
        }
        None => (
            StatusCode::BAD_REQUEST,
            format!("unknown fault `{kind}`: use 500, html, truncate, reset, slow, reject, 408, 429, 503, 413, 403 or 301\n"),
        )
            .into_response(),
    }
}

async fn control_revoke_tokens(State(s): State<Arc<Shared>>) -> Response {
    let n = {
        let mut tokens = lock(&s.tokens);
        let n = tokens.len();
        tokens.clear();
        n
    };
    json(serde_json::json!({"ok": true, "revoked": n}))
}

async fn control_stats(State(s): State<Arc<Shared>>) -> Response {
    json(serde_json::json!({
        "orders": lock(&s.orders).len(),
        "requests": s.requests.load(Ordering::Relaxed),
        "logins": s.logins.load(Ordering::Relaxed),
        "login_attempts": s.login_attempts.load(Ordering::Relaxed),
    }))
}

// === impl Shared ===

impl Shared {
    async fn post_flow_node_data(
        &self,
        external: bool,
        conn: &Conn,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Response {
        let request = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let (at, wall) = (tokio::time::Instant::now(), SystemTime::now());
        let resp = self.answer(request, external, conn, uri, headers, body).await;
        let header = |name| {
            resp.headers()
                .get(name)
                .map(|v: &header::HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let seen = SeenRequest {
            n: request,
            at,
            wall,
            status: resp.status().as_u16(),
            retry_after: header(header::RETRY_AFTER),
            location: header(header::LOCATION),
        };
        {
            let mut log = lock(&self.log);
            if log.len() >= REQUEST_LOG_MAX {
                log.pop_front();
            }
            log.push_back(seen);
        }
        resp
    }

    async fn answer(
        &self,
        request: u64,
        external: bool,
        conn: &Conn,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Response {
        if self.unavailable.load(Ordering::Relaxed) {
            return html(StatusCode::SERVICE_UNAVAILABLE, "503 Service Temporarily Unavailable");
        }
        let redirect = lock(&self.redirect).clone();
        if let Some((status, location)) = redirect {
            return redirect_page(status, &location);
        }
        let queued = lock(&self.faults).pop_front();
        let fault = queued.or_else(|| self.random_fault());
        let mut answer_delay = None;
        match fault {
            None => {}
            Some(Fault::Status(401)) => return self.unauthorized(),
            Some(Fault::Status(code)) => return status_page(code),
            Some(Fault::Html) => return html(StatusCode::OK, "200 but HTML"),
            Some(Fault::Empty) => return StatusCode::OK.into_response(),
            Some(Fault::Reject { code, msg }) => return json(serde_json::json!({"code": code, "msg": msg})),
            Some(Fault::SlowAnswer(d)) => answer_delay = Some(d),
            Some(Fault::Truncate) => return truncated(),
            Some(Fault::Reset) => {
                // Every read and write on this connection fails from now on: hyper drops it before
                // writing a byte of the response below.
                conn.kill.cancel();
                return StatusCode::INTERNAL_SERVER_ERROR.into_response();
            }
            Some(Fault::Busy { status, retry_after }) => return busy(status, retry_after.as_ref()),
            Some(Fault::Redirect { status, location }) => {
                let location = location.unwrap_or_else(|| https_of(uri, headers));
                return redirect_page(status, &location);
            }
        }
        // A proxy in front of Panda: nginx's body limit, then a web application firewall.
        if self.opts.max_body.is_some_and(|max| body.len() > max) {
            return status_page(413);
        }
        let refused = lock(&self.status_biz)
            .iter()
            .find(|(_, text)| body_contains(body, text))
            .map(|(status, _)| *status);
        if let Some(status) = refused {
            return status_page(status);
        }
        let answer = self.check_and_apply(request, external, headers, body).await;
        if let Some(d) = answer_delay {
            tokio::time::sleep(d).await;
        }
        answer
    }

    /// The document's 401 page, counted.
    fn unauthorized(&self) -> Response {
        self.unauthorized.fetch_add(1, Ordering::Relaxed);
        (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            UNAUTHORIZED_PAGE,
        )
            .into_response()
    }

    /// A fault drawn at `fail_rate`, if any.
    fn random_fault(&self) -> Option<Fault> {
        let rate = self.opts.fail_rate;
        if rate.is_nan() || rate <= 0.0 || rand::random::<f64>() >= rate {
            return None;
        }
        let kinds = &self.opts.fault_kinds;
        let kind = if kinds.is_empty() {
            FaultKind::Status500
        } else {
            kinds
                .get(rand::random_range(0..kinds.len()))
                .copied()
                .unwrap_or(FaultKind::Status500)
        };
        Some(kind.fault_with(&self.opts))
    }

    /// Token, Content-Type and body checks; keeps the orders of a valid request.
    async fn check_and_apply(&self, request: u64, external: bool, headers: &HeaderMap, body: &[u8]) -> Response {
        if external && !self.token_valid(headers) {
            return self.unauthorized();
        }
        let is_json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("application/json"));
        if !is_json {
            return reject("Content-Type 必须是 application/json");
        }
        let orders = match parse_flow_node_data(body, request, external) {
            Ok(o) => o,
            Err(msg) => return reject(&msg),
        };
        let event = orders.first().map(|o| o.event_name.clone()).unwrap_or_default();
        if !self.opts.events.contains(&event) || lock(&self.unknown_events).contains(&event) {
            return reject(&format!("事件【{event}】不存在"));
        }
        if let Some(bad) = self
            .opts
            .reject_biz
            .iter()
            .find(|bad| orders.iter().any(|o| o.biz_data.contains(bad.as_str())))
        {
            return reject(&format!("业务数据不合法：{bad}"));
        }
        if let Err(e) = self.keep(&orders).await {
            tracing::error!(message = "Mock Panda cannot write its JSON-lines file.", error = %e);
            return html(StatusCode::INTERNAL_SERVER_ERROR, "500 Internal Server Error");
        }
        json(serde_json::json!({"code": 0, "msg": ""}))
    }

    fn token_valid(&self, headers: &HeaderMap) -> bool {
        let Some(token) = headers.get("panda-token").and_then(|v| v.to_str().ok()) else {
            return false;
        };
        lock(&self.tokens)
            .get(token)
            .is_some_and(|exp| *exp > SystemTime::now())
    }

    /// Write accepted orders to the file (if any), then keep them in memory and print them.
    async fn keep(&self, orders: &[WorkOrder]) -> io::Result<()> {
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

/// One readable line per order: event, 水表表号, 用户名称, 阀门当前状态.
pub fn order_line(o: &WorkOrder) -> String {
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

impl WorkOrder {
    /// A BizData value as text, `-` when the key is missing or not a string (for printing).
    pub fn field(&self, key: &str) -> &str {
        self.biz.get(key).and_then(|v| v.as_str()).unwrap_or("-")
    }
}

/// Check a PostFlowNodeData body strictly; the orders it carries, or the `msg` to refuse it with.
fn parse_flow_node_data(body: &[u8], request: u64, external: bool) -> Result<Vec<WorkOrder>, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("请求体不是合法的 JSON: {e}"))?;
    let obj = v.as_object().ok_or("请求体必须是 JSON 对象")?;
    if let Some(k) = obj
        .keys()
        .find(|k| !["eventName", "userId", "FlowDatas"].contains(&k.as_str()))
    {
        return Err(format!("未知字段【{k}】"));
    }
    let event_name = obj
        .get("eventName")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .ok_or("eventName 必填，且必须是字符串")?;
    let user_id = obj
        .get("userId")
        .and_then(|v| v.as_i64())
        .ok_or("userId 必填，且必须是整数")?;
    let datas = obj
        .get("FlowDatas")
        .and_then(|v| v.as_array())
        .filter(|a| !a.is_empty())
        .ok_or("FlowDatas 必填，且必须是非空数组")?;
    let mut orders = Vec::with_capacity(datas.len());
    for (i, d) in datas.iter().enumerate() {
        let d = d.as_object().ok_or(format!("FlowDatas[{i}] 必须是对象"))?;
        if let Some(k) = d
            .keys()
            .find(|k| !["toUserIds", "opinion", "BizData"].contains(&k.as_str()))
        {
            return Err(format!("FlowDatas[{i}] 未知字段【{k}】"));
        }
        let optional = |k: &str| match d.get(k) {
            None => Ok(String::new()),
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(format!("FlowDatas[{i}].{k} 必须是字符串")),
        };
        let to_user_ids = optional("toUserIds")?;
        let opinion = optional("opinion")?;
        let biz_data = d.get("BizData").and_then(|v| v.as_str()).ok_or(format!(
            "FlowDatas[{i}].BizData 必填，且必须是字符串（序列化后的 JSON 对象）"
        ))?;
        let biz = match serde_json::from_str::<serde_json::Value>(biz_data) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => return Err(format!("FlowDatas[{i}].BizData 不是 JSON 对象字符串")),
        };
        orders.push(WorkOrder {
            request,
            event_name: event_name.to_string(),
            user_id,
            to_user_ids,
            opinion,
            biz_data: biz_data.to_string(),
            biz,
            external,
        });
    }
    Ok(orders)
}

/// A token shaped like the document's: `header.payload.sig` (base64url), payload `{"exp": float, "userID"}`.
/// Returns (token, expiry, `expirationTime` in +08:00).
fn mint(ttl: Duration) -> (String, SystemTime, String) {
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

fn json(v: serde_json::Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        v.to_string(),
    )
        .into_response()
}

/// 200 and the headers of a full `{"code":0,"msg":""}`, but only half of it, then the connection closes.
fn truncated() -> Response {
    let full = serde_json::json!({"code": 0, "msg": ""}).to_string();
    let half = Bytes::from(full.as_bytes().get(..full.len() / 2).unwrap_or_default().to_vec());
    let cut = futures_util::stream::iter([Ok::<Bytes, io::Error>(half)]).chain(futures_util::stream::once(async {
        // Let the half body reach the socket before the connection is aborted.
        tokio::time::sleep(Duration::from_millis(50)).await;
        Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "mock Panda: truncated answer",
        ))
    }));
    let mut resp = Response::new(Body::from_stream(cut));
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    headers.insert(header::CONTENT_LENGTH, header::HeaderValue::from(full.len()));
    resp
}

fn reject(msg: &str) -> Response {
    json(serde_json::json!({"code": -1, "msg": msg}))
}

/// An nginx-style error page.
fn html(status: StatusCode, title: &str) -> Response {
    let page = format!(
        "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    );
    (status, [(header::CONTENT_TYPE, "text/html")], page).into_response()
}

/// An nginx-style page for `code` (nginx's own title for 413).
fn status_page(code: u16) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match status.as_u16() {
        413 => html(status, "413 Request Entity Too Large"),
        _ => html(status, &status.to_string()),
    }
}

/// A busy answer (408, 429, 503, ...) with its `Retry-After`; a date comes with a `Date` of the same
/// instant (whole seconds), so the two give exactly the delay asked for.
fn busy(code: u16, retry_after: Option<&RetryAfter>) -> Response {
    let mut resp = status_page(code);
    let now = chrono::DateTime::<Utc>::from(SystemTime::now());
    let value = match retry_after {
        None => return resp,
        Some(RetryAfter::Seconds(n)) => n.to_string(),
        Some(RetryAfter::Raw(s)) => s.clone(),
        Some(RetryAfter::DateIn(d)) => {
            let whole = chrono::Duration::seconds(i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2_000));
            let at = now.checked_add_signed(whole).unwrap_or(now);
            if let Ok(v) = header::HeaderValue::from_str(&http_date(now)) {
                resp.headers_mut().insert(header::DATE, v);
            }
            http_date(at)
        }
    };
    if let Ok(v) = header::HeaderValue::from_str(&value) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

/// IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(t: chrono::DateTime<Utc>) -> String {
    t.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

/// A redirect with nginx's page.
fn redirect_page(code: u16, location: &str) -> Response {
    let mut resp = status_page(code);
    if let Ok(v) = header::HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// The request's URL with `https://` (what an http→https redirect points to).
fn https_of(uri: &Uri, headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost");
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    format!("https://{host}{path}")
}

/// Whether a request body, or one of its BizData strings, contains `text` (a firewall sees the raw body;
/// a text with quotes appears escaped there).
fn body_contains(body: &[u8], text: &str) -> bool {
    if text.is_empty() {
        return false;
    }
    if String::from_utf8_lossy(body).contains(text) {
        return true;
    }
    parse_flow_node_data(body, 0, false).is_ok_and(|orders| orders.iter().any(|o| o.biz_data.contains(text)))
}

// === stoppable listener ===

/// A TCP listener whose connections all fail once `stop` is cancelled, so that stopping the mock also
/// ends keep-alive connections that axum's per-connection tasks would otherwise keep serving.
struct StoppableListener {
    inner: TcpListener,
    stop: CancellationToken,
}

impl axum::serve::Listener for StoppableListener {
    type Io = StoppableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    // Cancelled with the whole server, or alone by a Reset fault.
                    let kill = self.stop.child_token();
                    let stopped = Box::pin(kill.clone().cancelled_owned());
                    return (
                        StoppableStream {
                            inner: stream,
                            stopped,
                            kill,
                        },
                        addr,
                    );
                }
                // Out of file descriptors and the like: wait a little, as axum's own listener does.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection that errors on every read and write after the mock is stopped or the connection is
/// killed (the [`Fault::Reset`] fault).
pub struct StoppableStream {
    inner: TcpStream,
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
    kill: CancellationToken,
}

/// What a handler knows of its connection: the switch that kills it.
#[derive(Clone)]
struct Conn {
    kill: CancellationToken,
}

impl Connected<axum::serve::IncomingStream<'_, StoppableListener>> for Conn {
    fn connect_info(stream: axum::serve::IncomingStream<'_, StoppableListener>) -> Conn {
        Conn {
            kill: stream.io().kill.clone(),
        }
    }
}

impl StoppableStream {
    fn stopped(&mut self, cx: &mut Context<'_>) -> bool {
        self.stopped.as_mut().poll(cx).is_ready()
    }
}

fn stopped_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "mock Panda stopped")
}

impl AsyncRead for StoppableStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.stopped(cx) {
            return Poll::Ready(Err(stopped_error()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for StoppableStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.stopped(cx) {
            return Poll::Ready(Err(stopped_error()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

// === command line ===

/// `fieldgate mock-panda`: run the mock until Ctrl-C.
#[derive(Debug, Clone, clap::Args)]
pub struct MockPandaArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Lifetime of issued tokens, e.g. "1h", "90s".
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub token_ttl: Duration,
    /// Known eventNames, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "用水户开阀,用水户关阀")]
    pub events: Vec<String>,
    /// Append every accepted order to this file as a JSON line.
    #[arg(long)]
    pub jsonl: Option<PathBuf>,
    /// GenerateToken username accepted.
    #[arg(long, default_value = "0CYKwAUCTLZ4KW6l")]
    pub username: String,
    /// GenerateToken password accepted.
    #[arg(long, default_value = "1vOkb5Ps4XfitL6G")]
    pub password: String,
    /// The {projectName} path segment.
    #[arg(long, default_value = "demo")]
    pub project: String,
    /// Probability (0..=1) that a PostFlowNodeData meets a random fault from --fault (default 500).
    #[arg(long, value_parser = parse_rate)]
    pub fail_rate: Option<f64>,
    /// Fault kinds: 500, html, truncate, reset, slow, reject, 408, 429, 503 (with --retry-after), 413, 403,
    /// 301 (to --redirect-to) (repeatable or comma list). With --fail-rate they are drawn at random;
    /// without it each is used once, in order, by the first requests.
    #[arg(long = "fault", value_enum, value_delimiter = ',')]
    pub faults: Vec<FaultKind>,
    /// How late a `slow` fault answers (the request is applied; a client with a shorter timeout loses
    /// the answer).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub slow_delay: Duration,
    /// An event to refuse with 事件【NAME】不存在 (repeatable), even if it is in --events.
    #[arg(long = "unknown-event")]
    pub unknown_events: Vec<String>,
    /// Refuse any request whose BizData contains this text (repeatable): a poison record.
    #[arg(long = "reject-biz")]
    pub reject_biz: Vec<String>,
    /// Refuse the first N logins with errMsg 密码错误 (more: `POST /_mock/fail-next-login`).
    #[arg(long, default_value_t = 0)]
    pub fail_logins: u64,
    /// The odd HTTP answers of a proxy in front of Panda (boxed: they would make every `fieldgate`
    /// command's arguments larger).
    #[command(flatten)]
    pub answers: Box<AnswerArgs>,
}

/// `fieldgate mock-panda`: the odd HTTP answers (busy, redirect, a proxy's body limit or firewall).
#[derive(Debug, Clone, clap::Args)]
pub struct AnswerArgs {
    /// `Retry-After` (whole seconds, e.g. "30s") sent with the 408, 429 and 503 faults; none by default.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub retry_after: Option<Duration>,
    /// `Location` of the 301 fault; default: the request's URL with https://.
    #[arg(long)]
    pub redirect_to: Option<String>,
    /// Answer 413 with nginx's page to any PostFlowNodeData with a longer body (bytes): nginx's
    /// client_max_body_size, 1048576 by default in nginx.
    #[arg(long)]
    pub max_body: Option<usize>,
    /// STATUS:TEXT: answer STATUS (e.g. 413, 403) with an nginx-style page to any PostFlowNodeData whose
    /// body or a BizData in it contains TEXT (repeatable): a firewall or proxy that refuses one record.
    #[arg(long = "status-biz", value_parser = parse_status_biz)]
    pub status_biz: Vec<(u16, String)>,
}

fn parse_status_biz(s: &str) -> Result<(u16, String), String> {
    let (status, text) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}`: use STATUS:TEXT, e.g. 413:M13"))?;
    let status = status
        .trim()
        .parse::<u16>()
        .ok()
        .filter(|c| (400..=599).contains(c))
        .ok_or_else(|| format!("`{s}`: STATUS must be an HTTP error status from 400 to 599"))?;
    if text.is_empty() {
        return Err(format!("`{s}`: TEXT must not be empty"));
    }
    Ok((status, text.to_string()))
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!(
            "`{s}` is not a probability: use a number from 0 to 1, e.g. 0.2"
        )),
    }
}

/// Run the mock with `args`, printing each accepted order, until Ctrl-C.
pub async fn mock_panda_main(args: MockPandaArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let opts = MockOptions {
        username: args.username,
        password: args.password,
        project: args.project,
        token_ttl: args.token_ttl,
        events: args
            .events
            .into_iter()
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect(),
        jsonl: args.jsonl,
        print: true,
        unknown_events: args.unknown_events,
        reject_biz: args.reject_biz,
        fail_rate: args.fail_rate.unwrap_or(0.0),
        fault_kinds: args.faults.clone(),
        slow_delay: args.slow_delay,
        retry_after: args.answers.retry_after,
        redirect_to: args.answers.redirect_to,
        max_body: args.answers.max_body,
        status_biz: args.answers.status_biz,
    };
    println!(
        "Mock Panda on http://{}  project={}  username={}  token_ttl={}  events={}",
        listener.local_addr().unwrap_or(args.listen),
        opts.project,
        opts.username,
        humantime::format_duration(opts.token_ttl),
        opts.events.join(",")
    );
    if let Some(p) = &opts.jsonl {
        println!("Appending accepted orders to {}", p.display());
    }
    if opts.fail_rate > 0.0 {
        println!(
            "Faults: {:.0}% of requests, drawn from {:?}",
            opts.fail_rate * 100.0,
            if opts.fault_kinds.is_empty() {
                vec![FaultKind::Status500]
            } else {
                opts.fault_kinds.clone()
            }
        );
    }
    let once = if args.fail_rate.is_none() {
        args.faults
    } else {
        Vec::new()
    };
    let faults: Vec<Fault> = once.into_iter().map(|k| k.fault_with(&opts)).collect();
    let mock = MockPanda::start(listener, opts);
    for fault in faults {
        mock.push_fault(fault);
    }
    if args.fail_logins > 0 {
        mock.fail_next_logins(args.fail_logins);
    }
    println!(
        "Control: POST /_mock/fail-next-login, POST /_mock/fault/{{kind}}, POST /_mock/revoke-tokens, GET /_mock/stats"
    );
    tokio::signal::ctrl_c().await?;
    println!(
        "Stopping: {} orders accepted, {} tokens issued.",
        mock.orders().len(),
        mock.logins()
    );
    mock.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: MockPandaArgs,
    }

    #[test]
    fn mock_args_default_and_parse() {
        let a = Cli::try_parse_from(["x"]).unwrap().args;
        assert_eq!(a.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(a.token_ttl, Duration::from_secs(3600));
        assert_eq!(a.events, vec!["用水户开阀", "用水户关阀"]);
        let a = Cli::try_parse_from(["x", "--events", "a,b,c", "--token-ttl", "90s"])
            .unwrap()
            .args;
        assert_eq!(a.events, vec!["a", "b", "c"]);
        assert_eq!(a.token_ttl, Duration::from_secs(90));
        let a = Cli::try_parse_from([
            "x",
            "--fail-rate",
            "0.25",
            "--fault",
            "500,html",
            "--fault",
            "truncate",
            "--fault",
            "reset,slow,reject",
            "--unknown-event",
            "用水户开阀",
            "--unknown-event",
            "B",
            "--reject-biz",
            "M13",
        ])
        .unwrap()
        .args;
        assert_eq!(a.fail_rate, Some(0.25));
        assert_eq!(
            a.faults,
            vec![
                FaultKind::Status500,
                FaultKind::Html,
                FaultKind::Truncate,
                FaultKind::Reset,
                FaultKind::Slow,
                FaultKind::Reject
            ]
        );
        assert_eq!(a.unknown_events, vec!["用水户开阀", "B"]);
        assert_eq!(a.reject_biz, vec!["M13"]);
        assert!(Cli::try_parse_from(["x", "--fail-rate", "1.5"]).is_err());
        assert!(Cli::try_parse_from(["x", "--fault", "explode"]).is_err());
        assert_eq!(FaultKind::parse("RESET"), Some(FaultKind::Reset));
        assert_eq!(FaultKind::parse("500"), Some(FaultKind::Status500));
    }

    #[test]
    fn the_odd_answers_parse_from_the_command_line() {
        let a = Cli::try_parse_from([
            "x",
            "--fault",
            "408,429,503,413,403,301",
            "--retry-after",
            "30s",
            "--redirect-to",
            "https://panda.example/",
            "--max-body",
            "1048576",
            "--status-biz",
            "413:M13",
            "--status-biz",
            "403:<script>",
        ])
        .unwrap()
        .args;
        assert_eq!(
            a.faults,
            vec![
                FaultKind::Status408,
                FaultKind::Status429,
                FaultKind::Status503,
                FaultKind::Status413,
                FaultKind::Status403,
                FaultKind::Redirect301
            ]
        );
        let answers = &a.answers;
        assert_eq!(answers.retry_after, Some(Duration::from_secs(30)));
        assert_eq!(answers.max_body, Some(1_048_576));
        assert_eq!(
            answers.status_biz,
            vec![(413, "M13".to_string()), (403, "<script>".to_string())]
        );
        let opts = MockOptions {
            retry_after: answers.retry_after,
            redirect_to: answers.redirect_to.clone(),
            ..MockOptions::default()
        };
        assert_eq!(
            FaultKind::Status429.fault_with(&opts),
            Fault::Busy {
                status: 429,
                retry_after: Some(RetryAfter::Seconds(30))
            }
        );
        assert_eq!(
            FaultKind::Redirect301.fault_with(&opts),
            Fault::Redirect {
                status: 301,
                location: Some("https://panda.example/".into())
            }
        );
        assert_eq!(FaultKind::Status413.fault_with(&opts), Fault::Status(413));
        for bad in ["413", "99:x", "413:", "abc:x"] {
            assert!(Cli::try_parse_from(["x", "--status-biz", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_firewall_rule_matches_the_raw_body_or_a_bizdata() {
        let body = r#"{"eventName":"e","userId":42,"FlowDatas":[{"BizData":"{\"序号\":\"17\"}"}]}"#;
        assert!(body_contains(body.as_bytes(), r#""序号":"17""#), "inside BizData");
        assert!(body_contains(body.as_bytes(), "userId"), "raw body");
        assert!(!body_contains(body.as_bytes(), r#""序号":"18""#));
        assert!(!body_contains(body.as_bytes(), ""));
    }

    #[test]
    fn http_dates_are_imf_fixdate() {
        let t = chrono::DateTime::parse_from_rfc3339("1994-11-06T08:49:37Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(crate::delivery::panda::answer::parse_http_date(&http_date(t)), Some(t));
    }

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

    #[test]
    fn bodies_are_checked_strictly() {
        let ok =
            r#"{"eventName":"e","userId":42,"FlowDatas":[{"toUserIds":"","opinion":"","BizData":"{\"a\":\"1\"}"}]}"#;
        let orders = parse_flow_node_data(ok.as_bytes(), 1, true).unwrap();
        assert_eq!(orders[0].biz_data, r#"{"a":"1"}"#);
        assert_eq!(orders[0].biz.get("a").unwrap(), "1");
        for bad in [
            "",
            "[]",
            r#"{"eventName":"e","userId":"42","FlowDatas":[{"BizData":"{}"}]}"#,
            r#"{"eventName":"e","userId":42.5,"FlowDatas":[{"BizData":"{}"}]}"#,
            r#"{"eventName":1,"userId":42,"FlowDatas":[{"BizData":"{}"}]}"#,
            r#"{"eventName":"e","userId":42,"FlowDatas":[]}"#,
            r#"{"eventName":"e","userId":42,"FlowDatas":[{"BizData":{"a":"1"}}]}"#,
            r#"{"eventName":"e","userId":42,"FlowDatas":[{"BizData":"[1]"}]}"#,
            r#"{"eventName":"e","userId":42,"FlowDatas":[{"BizData":"{}","extra":""}]}"#,
            r#"{"eventName":"e","userId":42,"FlowDatas":[{"BizData":"{}"}],"meterNo":"M1"}"#,
            r#"{"eventName":"e","userId":42,"FlowDatas":[{"BizData":"{}","opinion":1}]}"#,
        ] {
            assert!(parse_flow_node_data(bad.as_bytes(), 1, true).is_err(), "{bad}");
        }
    }
}

//! The routes of the mock Panda and their handlers: GenerateToken, PostFlowNodeData (external, with a
//! token; internal, without), the `/_mock/` control endpoints.
//!
//! Invariant: a PostFlowNodeData meets, in this order, the persistent faults (unavailable, redirect), the
//! next queued or random [`Fault`], the proxy's rules (body limit, firewall), then the strict checks of
//! `check.rs`; only [`Fault::SlowAnswer`] lets the request through. Every PostFlowNodeData is counted and
//! logged, whatever the answer.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Bytes;
use axum::extract::rejection::FormRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};

use super::check::body_contains;
use super::listener::Conn;
use super::replies::{busy, html, https_of, json, redirect_page, status_page, truncated, UNAUTHORIZED_PAGE};
use super::state::{mint, SeenRequest, Shared, REQUEST_LOG_MAX};
use super::{lock, Fault, FaultKind};

/// The Panda API and the `/_mock/` control endpoints, on `shared`.
pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
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
        .with_state(shared)
}

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
        let at = tokio::time::Instant::now();
        let resp = self.answer(request, external, conn, uri, headers, body).await;
        let header = |name| {
            resp.headers()
                .get(name)
                .map(|v: &header::HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let seen = SeenRequest {
            at,
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
    pub(super) fn unauthorized(&self) -> Response {
        self.unauthorized.fetch_add(1, Ordering::Relaxed);
        (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            UNAUTHORIZED_PAGE,
        )
            .into_response()
    }
}

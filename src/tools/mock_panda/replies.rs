//! How the mock Panda's answers look: its JSON, the nginx-style HTML pages of a proxy in front of it
//! (the document's 401 page among them), busy answers with `Retry-After`, redirects, and a body cut in
//! the middle.
//!
//! Never: looks at the server's state; each function only builds one answer.

use std::io;
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures_util::StreamExt;

use super::RetryAfter;

/// The 401 page the document shows (an nginx HTML page, not JSON).
pub(super) const UNAUTHORIZED_PAGE: &str = r##"<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN" "http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">
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

pub(super) fn json(v: serde_json::Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        v.to_string(),
    )
        .into_response()
}

/// 200 and the headers of a full `{"code":0,"msg":""}`, but only half of it, then the connection closes.
pub(super) fn truncated() -> Response {
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

pub(super) fn reject(msg: &str) -> Response {
    json(serde_json::json!({"code": -1, "msg": msg}))
}

/// An nginx-style error page.
pub(super) fn html(status: StatusCode, title: &str) -> Response {
    let page = format!(
        "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    );
    (status, [(header::CONTENT_TYPE, "text/html")], page).into_response()
}

/// An nginx-style page for `code` (nginx's own title for 413).
pub(super) fn status_page(code: u16) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match status.as_u16() {
        413 => html(status, "413 Request Entity Too Large"),
        _ => html(status, &status.to_string()),
    }
}

/// A busy answer (408, 429, 503, ...) with its `Retry-After`; a date comes with a `Date` of the same
/// instant (whole seconds), so the two give exactly the delay asked for.
pub(super) fn busy(code: u16, retry_after: Option<&RetryAfter>) -> Response {
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
fn http_date(t: chrono::DateTime<Utc>) -> String {
    t.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

/// A redirect with nginx's page.
pub(super) fn redirect_page(code: u16, location: &str) -> Response {
    let mut resp = status_page(code);
    if let Ok(v) = header::HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// The request's URL with `https://` (what an http→https redirect points to).
pub(super) fn https_of(uri: &Uri, headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost");
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    format!("https://{host}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_are_imf_fixdate() {
        let t = chrono::DateTime::parse_from_rfc3339("1994-11-06T08:49:37Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(crate::delivery::panda::answer::parse_http_date(&http_date(t)), Some(t));
    }
}

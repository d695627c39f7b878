//! What every answer of the Panda server means: the classification ([`DeliveryError`]) that decides what
//! the caller does next, never the message text. A status, the headers read as `Meta` and the body in,
//! an `Answer` out: pure, except that `Meta::of` reads the local clock for a `Retry-After` date when
//! the answer has no `Date`. Nothing here sends, sleeps or logs.
//!
//! In this order:
//! - 401 (an nginx HTML page), whatever the body: the token is dropped, a new one fetched (single-flight),
//!   and the same request sent once more; a second 401 in a row is [`DeliveryError::Unauthorized`]. No loop.
//! - any 3xx: [`DeliveryError::Redirect`], naming the `Location` (never followed, see [`super`]). A
//!   redirect means `panda.base_url` is wrong (often `http://` where the server wants `https://`).
//! - 408, 429, 503, whatever the body: [`DeliveryError::Busy`], with the server's `Retry-After` turned
//!   into a delay once, when the answer arrives (`retry_after`): delay-seconds as they are; an HTTP date
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

use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use reqwest::header::{HeaderMap, DATE, LOCATION, RETRY_AFTER};
use reqwest::StatusCode;

/// The longest `Retry-After` honoured when `panda.max_backoff` is shorter (the bound is the larger of the
/// two): a server, or a clock off by years, asking for a day must not park the gateway for a day.
pub(super) const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);

/// 4xx statuses that refuse a request for what it carries ([`DeliveryError::Refused`]): the sender
/// splits a batch answered so, down to the record at fault.
const REFUSAL_STATUSES: [u16; 4] = [400, 403, 413, 422];

/// The most of a `Location` kept in an error (it is shown in health and logs).
const MAX_LOCATION: usize = 300;

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
        /// The server's `Retry-After` as a delay from the answer, bounded (see the module docs).
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
    pub(crate) fn error_code(&self) -> &'static str {
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
    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            DeliveryError::Busy { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// What one PostFlowNodeData exchange came to.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Answer {
    Accepted,
    /// HTTP 401: fetch a new token.
    Unauthorized,
    Failed(DeliveryError),
}

/// What the headers of an answer say, read before its body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Meta {
    /// `Retry-After` as a bounded delay from the answer.
    retry_after: Option<Duration>,
    /// `Location`, resolved against the request's URL, without user info, cut to [`MAX_LOCATION`].
    location: Option<String>,
}

impl Meta {
    pub(super) fn of(resp: &reqwest::Response, bound: Duration) -> Meta {
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
pub(super) fn server_date(headers: &HeaderMap) -> Option<DateTime<Utc>> {
    headers
        .get(DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_http_date)
}

impl Answer {
    /// `self`, unless it is a failure other than a redirect or a busy server: then `Transient(reason)`.
    pub(super) fn or_transient(self, reason: String) -> Answer {
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
pub(super) fn classify_post(status: StatusCode, meta: &Meta, body: &[u8]) -> Answer {
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
pub(super) fn classify_login(status: StatusCode, meta: &Meta, body: &[u8]) -> Result<(String, String), DeliveryError> {
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
fn retry_after(
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
pub(crate) fn parse_http_date(s: &str) -> Option<DateTime<Utc>> {
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

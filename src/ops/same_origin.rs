//! What a state-changing request to the admin API must show, so that a page of another site open in
//! the same browser (the station laptop's, tunnelled to the gateway) cannot make it: the status page's
//! requeue button works, a form or a script on any other site does not.
//!
//! Every state-changing request (a `POST`: today only `/outbox/requeue`) must, checked by [`check`]
//! at the start of its handler:
//! - carry `Content-Type: application/json` (a plain HTML form can only send form or text types), else
//!   415;
//! - if it has an `Origin` header (a browser always sends one with a POST), come from the address it
//!   was sent to: the origin's host and port equal the `Host` header, else 403;
//! - while the API listens on loopback (no `allow_remote`), name a loopback host in `Host`
//!   (`127.0.0.1`, `[::1]`, `localhost`), else 403: a site whose name an attacker points at 127.0.0.1
//!   (DNS rebinding) passes the origin check, but not this one.
//!
//! Refusals answer JSON `{"error": …}` saying what is missing ([`Refusal::answer`]). Never: reads a
//! body, or looks at `GET` requests (they change nothing; the command line and Prometheus send no
//! `Origin`). A check in each POST handler rather than a middleware layer: a layer wraps every route
//! and cost the binary tens of KB (BENCHMARKS.md row 7).

use std::net::IpAddr;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Why a state-changing request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    /// No `Content-Type: application/json` (the type sent, if any).
    #[error("a state-changing request must be sent with Content-Type: application/json (got {})", .0.as_deref().unwrap_or("none"))]
    NotJson(Option<String>),
    /// `Origin` names another address than `Host`.
    #[error("cross-site request refused: Origin {origin} is not the address the request was sent to (Host {})", .host.as_deref().unwrap_or("missing"))]
    ForeignOrigin {
        /// The `Origin` header.
        origin: String,
        /// The `Host` header.
        host: Option<String>,
    },
    /// The API listens on loopback, but `Host` names something else.
    #[error("refused: the admin API listens on loopback, but the request names host {0:?}; open it as http://127.0.0.1:PORT/ (through `ssh -L` from a laptop)")]
    NotLoopbackHost(String),
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::NotJson(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Refusal::ForeignOrigin { .. } | Refusal::NotLoopbackHost(_) => StatusCode::FORBIDDEN,
        }
    }

    /// The answer: 415 or 403 with `{"error": …}`; logged (a refused request may be an attack, or a
    /// page opened under another name).
    pub(crate) fn answer(&self, path: &str) -> Response {
        tracing::warn!(message = "Admin request refused.", path, reason = %self);
        (self.status(), Json(serde_json::json!({ "error": self.to_string() }))).into_response()
    }
}

/// Check the headers of a state-changing request (see the module doc). `loopback`: the API listens on
/// a loopback address.
pub(crate) fn check(headers: &HeaderMap, loopback: bool) -> Result<(), Refusal> {
    let text = |name| {
        headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let content_type = text(header::CONTENT_TYPE);
    let is_json = content_type.as_deref().is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
    });
    if !is_json {
        return Err(Refusal::NotJson(content_type));
    }
    let host = text(header::HOST);
    if let Some(origin) = text(header::ORIGIN) {
        // `Origin: scheme://host[:port]`, or `null` (a sandboxed frame, a file): never the address itself.
        let authority = origin.split_once("://").map(|(_, rest)| rest);
        let same = matches!((authority, host.as_deref()), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h.trim()));
        if !same {
            return Err(Refusal::ForeignOrigin { origin, host });
        }
    }
    if loopback {
        let host = host.unwrap_or_default();
        if !names_loopback(&host) {
            return Err(Refusal::NotLoopbackHost(host));
        }
    }
    Ok(())
}

/// Whether a `Host` header (`name[:port]`, `[v6][:port]`) names the loopback interface.
fn names_loopback(host: &str) -> bool {
    let host = host.trim();
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const JSON: (header::HeaderName, &str) = (header::CONTENT_TYPE, "application/json");
    const HOST: (header::HeaderName, &str) = (header::HOST, "127.0.0.1:9898");

    #[test]
    fn a_post_needs_a_json_content_type() {
        let form = headers(&[(header::CONTENT_TYPE, "application/x-www-form-urlencoded"), HOST]);
        let err = check(&form, true).unwrap_err();
        assert_eq!(err, Refusal::NotJson(Some("application/x-www-form-urlencoded".into())));
        assert_eq!(err.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let text = headers(&[(header::CONTENT_TYPE, "text/plain"), HOST]);
        assert!(check(&text, true).is_err());
        assert_eq!(check(&headers(&[HOST]), true), Err(Refusal::NotJson(None)));
        let charset = headers(&[(header::CONTENT_TYPE, "Application/JSON; charset=utf-8"), HOST]);
        assert_eq!(check(&charset, true), Ok(()));
    }

    #[test]
    fn a_foreign_origin_is_refused_and_the_same_one_passes() {
        let same = headers(&[JSON, HOST, (header::ORIGIN, "http://127.0.0.1:9898")]);
        assert_eq!(check(&same, true), Ok(()));
        assert_eq!(check(&headers(&[JSON, HOST]), true), Ok(()), "no Origin: not a browser");
        for foreign in [
            "http://evil.example",
            "http://127.0.0.1:9899",
            "http://127.0.0.1",
            "null",
            "127.0.0.1:9898",
        ] {
            let h = headers(&[JSON, HOST, (header::ORIGIN, foreign)]);
            let err = check(&h, true).unwrap_err();
            assert_eq!(
                err,
                Refusal::ForeignOrigin {
                    origin: foreign.into(),
                    host: Some("127.0.0.1:9898".into())
                },
                "{foreign}"
            );
            assert_eq!(err.status(), StatusCode::FORBIDDEN);
        }
        let no_host = headers(&[JSON, (header::ORIGIN, "http://127.0.0.1:9898")]);
        assert!(matches!(
            check(&no_host, false),
            Err(Refusal::ForeignOrigin { host: None, .. })
        ));
    }

    #[test]
    fn on_loopback_the_host_must_be_loopback_too() {
        // DNS rebinding: the attacker's name resolves to 127.0.0.1; its page is "same origin".
        let rebound = headers(&[
            JSON,
            (header::HOST, "evil.example:9898"),
            (header::ORIGIN, "http://evil.example:9898"),
        ]);
        let err = check(&rebound, true).unwrap_err();
        assert_eq!(err, Refusal::NotLoopbackHost("evil.example:9898".into()));
        assert!(err.to_string().contains("http://127.0.0.1:PORT/"), "{err}");
        assert_eq!(check(&rebound, false), Ok(()), "allow_remote: names are fine");
        for host in [
            "localhost:9898",
            "LOCALHOST",
            "127.0.0.1",
            "127.0.0.2:80",
            "[::1]:9898",
            "[::1]",
        ] {
            assert!(names_loopback(host), "{host}");
        }
        for host in [
            "",
            "10.0.0.5:9898",
            "gateway:9898",
            "[fe80::1]:9898",
            "127.0.0.1.evil.example",
        ] {
            assert!(!names_loopback(host), "{host}");
        }
    }
}

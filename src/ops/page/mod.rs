//! The status page: `GET /` on the admin port serves one HTML page, its style sheet and its script,
//! all embedded in the binary (`include_str!`): no external asset, no framework, no build step; the
//! laptop at a pump station has no internet.
//!
//! The script (`app.js`) reads the JSON endpoints (`/healthz`, `/buses`, `/meters`, `/outbox`,
//! `/outbox/dead`, `/deliveries`) every few seconds and renders them; its only write is the requeue
//! button (`POST /outbox/requeue`, JSON, same origin: see `crate::ops::same_origin`). Labels are in
//! Chinese, in English with `?lang=en` (one table of strings in the script).
//!
//! Invariants: the answers carry a Content-Security-Policy that allows only this origin's script,
//! style and requests, and no framing (the requeue button cannot be clicked through another site's
//! frame). Never: renders data on the server (the script does, from the same JSON the command line
//! reads), or serves anything but these three files.

use axum::http::{header, Uri};
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("index.html");
const STYLE: &str = include_str!("style.css");
const SCRIPT: &str = include_str!("app.js");

/// Only this origin's files and requests; no inline script or style; never inside a frame.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /`, `GET /page/style.css` and `GET /page/app.js` (routed in `crate::ops::admin`): one
/// handler for the three, with no router of its own (each handler and router is code in the binary,
/// BENCHMARKS.md row 7).
pub(crate) async fn page_file(uri: Uri) -> Response {
    let (content_type, body) = match uri.path() {
        "/page/style.css" => ("text/css; charset=utf-8", STYLE),
        "/page/app.js" => ("text/javascript; charset=utf-8", SCRIPT),
        _ => ("text/html; charset=utf-8", INDEX),
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
            // A new binary serves a new page: never keep an old one.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_refers_only_to_its_own_files() {
        for text in [INDEX, STYLE, SCRIPT] {
            assert!(
                !text.contains("http://") && !text.contains("https://"),
                "an external reference"
            );
        }
        assert!(INDEX.contains("src=\"/page/app.js\"") && INDEX.contains("href=\"/page/style.css\""));
        assert!(
            !INDEX.contains("<script>") && !INDEX.contains("style=\""),
            "the CSP forbids inline code"
        );
    }
}

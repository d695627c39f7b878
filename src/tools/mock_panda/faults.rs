//! The mock Panda's faults: a [`Fault`] is one misbehaviour for the next PostFlowNodeData request (queued
//! by [`MockPanda::push_fault`](super::MockPanda::push_fault) or `POST /_mock/fault/{kind}`, or drawn at
//! random at [`MockOptions::fail_rate`]); a [`FaultKind`] is how the command line and the control
//! endpoint name one.
//!
//! Never: carries a fault out (`handlers.rs` does, before any check of the request).

use std::time::Duration;

use super::state::Shared;
use super::MockOptions;

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
    pub(crate) fn fault_with(self, opts: &MockOptions) -> Fault {
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
    fn fault(self, slow_delay: Duration) -> Fault {
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
    pub(crate) fn parse(s: &str) -> Option<FaultKind> {
        <FaultKind as clap::ValueEnum>::from_str(s.trim(), true).ok()
    }
}

impl Shared {
    /// A fault drawn at `fail_rate`, if any.
    pub(super) fn random_fault(&self) -> Option<Fault> {
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
}

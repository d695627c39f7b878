//! When a delivery failure is logged: once per change of state (the error kind, plus the server's text
//! where the text is the server's), at most once a minute while one repeats, a refused login only once per
//! change (health carries it meanwhile), and recovery once. Logs only; counts nothing.

use std::time::Duration;

use tokio::time::Instant;

/// A repeating failure of the same kind is logged at most this often.
const REPEAT_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Logs failures once per change of state and at most once per [`REPEAT_LOG_INTERVAL`] while one repeats.
/// A state is the error kind, plus the text where the text is the server's (rejections, logins).
#[derive(Debug, Default)]
pub(super) struct FailureLog {
    kind: Option<&'static str>,
    /// The text that is part of the state, if any.
    text: Option<String>,
    last_logged: Option<Instant>,
    /// Failures since the last line logged.
    unlogged: u64,
    /// Failures since the last success.
    in_a_row: u64,
}

impl FailureLog {
    pub(super) fn failure(&mut self, kind: &'static str, reason: &str, by_text: bool, loud: bool) {
        self.in_a_row += 1;
        let text = by_text.then(|| reason.to_string());
        // A refused login (loud) is a configuration fault: once per change; health carries it meanwhile.
        let due = self.kind != Some(kind)
            || self.text != text
            || (!loud && self.last_logged.is_none_or(|t| t.elapsed() >= REPEAT_LOG_INTERVAL));
        if !due {
            self.unlogged += 1;
            return;
        }
        if loud {
            tracing::error!(message = "Panda refuses the login: check panda.username and the password in the configuration. Every record is kept; the login is retried with a backoff of up to 5 minutes.", error_code = kind, error = %reason, failures_in_a_row = self.in_a_row, not_logged = self.unlogged);
        } else {
            tracing::warn!(message = "Panda delivery failing.", error_code = kind, error = %reason, failures_in_a_row = self.in_a_row, not_logged = self.unlogged);
        }
        self.kind = Some(kind);
        self.text = text;
        self.last_logged = Some(Instant::now());
        self.unlogged = 0;
    }

    pub(super) fn success(&mut self, records: usize) {
        if self.kind.is_some() {
            tracing::info!(message = "Panda delivery recovered.", failures = self.in_a_row, records);
        }
        *self = FailureLog::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeating_failure_is_logged_once_until_its_kind_changes() {
        let mut log = FailureLog::default();
        log.failure("transient", "connect: refused", false, false);
        let first = log.last_logged;
        log.failure("transient", "connect: refused", false, false);
        log.failure("transient", "timeout", false, false);
        assert_eq!(log.last_logged, first);
        assert_eq!(log.unlogged, 2);
        log.failure("rejected", "事件【A】不存在", true, false);
        assert_eq!(log.kind, Some("rejected"));
        assert_eq!(log.unlogged, 0);
        log.failure("rejected", "事件【A】不存在", true, false);
        assert_eq!(log.unlogged, 1);
        log.failure("rejected", "事件【B】不存在", true, false);
        assert_eq!(log.unlogged, 0, "a new server msg is a new state");
        log.success(3);
        assert_eq!(log.kind, None);
        assert_eq!(log.in_a_row, 0);
    }
}

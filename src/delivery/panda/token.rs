//! The token of `auth = "token"`: fetched by GenerateToken, one per client (shared by clones), fetched by
//! one caller while the others wait (single-flight), and dropped after a 401.
//!
//! Token lifetime: the JWT payload's `exp` (seconds, may be a float), else `expirationTime` read in the site's
//! zone. Both are wall-clock times: the lifetime (expiry minus now) is computed **once**, when the token
//! arrives, and from then on measured on the monotonic clock (tokio's [`Instant`]), so a clock step (NTP
//! after a boot in 1970) neither expires a good token nor keeps a dead one. "Now" is the local clock, or
//! the server's `Date` header when the two disagree by more than [`CLOCK_SKEW_LIMIT`] (gateways often boot
//! without a real-time clock). The token is refreshed `refresh_before` ahead of expiry (or at half its
//! lifetime when that is shorter, so a short-lived token does not cause a login per request). A token whose
//! expiry cannot be read (or lies beyond what the monotonic clock can hold) is used until the server
//! answers 401. A refresh that fails keeps the old token until it expires.
//!
//! The password and the token are never logged and never appear in an error.

use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine;
use chrono::{DateTime, FixedOffset, NaiveDateTime, TimeZone, Utc};
use tokio::time::Instant;

use super::answer::{classify_login, server_date, DeliveryError, Meta};
use super::{describe, read_body, PandaClient};

/// When the local clock and the server's `Date` differ by more than this, token lifetimes are measured
/// against the server's `Date`.
const CLOCK_SKEW_LIMIT: Duration = Duration::from_secs(30);

/// A token and when it is due, on the monotonic clock.
pub(super) struct Token {
    value: String,
    /// Fetch a new one from here on; `None` = expiry unknown, use until a 401.
    refresh_at: Option<Instant>,
    /// After this it is certainly useless; before it, it is still used if a refresh fails.
    expires_at: Option<Instant>,
}

impl PandaClient {
    /// The current token, fetching a new one when there is none or it is due. Single-flight: the lock is
    /// held across GenerateToken.
    pub(super) async fn token(&self) -> Result<String, DeliveryError> {
        let mut guard = self.inner.token.lock().await;
        let now = Instant::now();
        if let Some(t) = guard.as_ref() {
            if t.refresh_at.is_none_or(|at| now < at) {
                return Ok(t.value.clone());
            }
        }
        match self.login().await {
            Ok(fresh) => {
                let value = fresh.value.clone();
                *guard = Some(fresh);
                Ok(value)
            }
            Err(e) => {
                // A refresh ahead of expiry failed: the old token is still good until it expires.
                if let Some(old) = guard.as_ref().filter(|t| t.expires_at.is_some_and(|at| now < at)) {
                    tracing::warn!(message = "Cannot refresh the Panda token; using the current one until it expires.", error = %e);
                    return Ok(old.value.clone());
                }
                *guard = None;
                Err(e)
            }
        }
    }

    /// Drop `stale` after a 401, unless another caller has already replaced it.
    pub(super) async fn invalidate(&self, stale: &str) {
        let mut guard = self.inner.token.lock().await;
        if guard.as_ref().is_some_and(|t| t.value == stale) {
            *guard = None;
        }
    }

    /// Call GenerateToken.
    async fn login(&self) -> Result<Token, DeliveryError> {
        let Some(login) = &self.inner.login else {
            return Err(DeliveryError::Login("no credentials configured".into()));
        };
        let form = [
            ("username", login.username.as_str()),
            ("password", login.password.as_str()),
        ];
        let resp = self
            .inner
            .http
            .post(login.url.clone())
            .form(&form)
            .send()
            .await
            .map_err(|e| DeliveryError::Transient(format!("GenerateToken: {}", describe(e))))?;
        let status = resp.status();
        let server_date = server_date(resp.headers());
        let meta = Meta::of(&resp, self.inner.retry_after_bound);
        let body = match read_body(resp).await {
            Ok(body) => body,
            // A redirect or a busy server is that whatever the body; anything else is transient.
            Err(r) => {
                return Err(match classify_login(status, &meta, b"") {
                    Err(e @ (DeliveryError::Redirect { .. } | DeliveryError::Busy { .. })) => e,
                    _ => DeliveryError::Transient(format!("GenerateToken HTTP {}: {r}", status.as_u16())),
                })
            }
        };
        let (value, expiration_time) = classify_login(status, &meta, &body)?;
        // The one place where wall-clock times are subtracted: expiry minus now, once, at arrival.
        let local_now = Utc::now();
        let now = match server_date {
            Some(d) if (d - local_now).abs().to_std().is_ok_and(|skew| skew > CLOCK_SKEW_LIMIT) => d,
            _ => local_now,
        };
        let expiry = token_expiry(&value, &expiration_time, self.inner.tz);
        let lifetime = expiry.and_then(|e| (e - now).to_std().ok()).filter(|l| !l.is_zero());
        let started = Instant::now();
        // An expiry too far away for the monotonic clock is an unknown one (used until a 401).
        let due = lifetime.and_then(|l| {
            Some((
                started.checked_add(refresh_delay(l, self.inner.refresh_before))?,
                started.checked_add(l)?,
            ))
        });
        let token = Token {
            refresh_at: due.map(|(refresh, _)| refresh),
            expires_at: due.map(|(_, expiry)| expiry),
            value,
        };
        self.inner.logins.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            message = "Fetched a Panda token.",
            expires_in_s = lifetime.map(|l| l.as_secs()),
            user = %login.username
        );
        Ok(token)
    }
}

/// When a token expires: the JWT payload's `exp`, else `expiration_time` (`YYYY-MM-DD HH:MM:SS`) in `tz`.
fn token_expiry(token: &str, expiration_time: &str, tz: FixedOffset) -> Option<DateTime<Utc>> {
    jwt_exp(token).or_else(|| expiration_in_zone(expiration_time, tz))
}

/// The `exp` claim of a JWT (seconds since the epoch, integer or float), if it has a readable one.
pub(crate) fn jwt_exp(token: &str) -> Option<DateTime<Utc>> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_f64()?;
    if !exp.is_finite() || exp <= 0.0 || exp > 1.0e11 {
        return None;
    }
    let secs = exp.trunc();
    let nanos = ((exp - secs) * 1e9) as u32;
    DateTime::from_timestamp(secs as i64, nanos.min(999_999_999))
}

/// `expirationTime` (`YYYY-MM-DD HH:MM:SS`, local wall-clock time of the server) read in zone `tz`.
pub(crate) fn expiration_in_zone(s: &str, tz: FixedOffset) -> Option<DateTime<Utc>> {
    let naive = NaiveDateTime::parse_from_str(s.trim(), "%Y-%m-%d %H:%M:%S").ok()?;
    tz.from_local_datetime(&naive).single().map(|d| d.with_timezone(&Utc))
}

/// How long after login to fetch a new token: `refresh_before` ahead of expiry, but not before half the
/// lifetime (a token shorter-lived than `refresh_before` must not cause a login per request).
fn refresh_delay(lifetime: Duration, refresh_before: Duration) -> Duration {
    lifetime.saturating_sub(refresh_before).max(lifetime / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC_TOKEN: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJleHAiOjE2NzIzODI3NDQuMCwidXNlcklEIjo0Mn0.aGH7TCqdA8MroKu3kp2rjrNF3NFLuBySUDOXA2PdHQo";

    fn cst() -> FixedOffset {
        FixedOffset::east_opt(8 * 3600).unwrap()
    }

    #[test]
    fn the_spec_tokens_float_exp_is_read() {
        let exp = jwt_exp(SPEC_TOKEN).unwrap();
        assert_eq!(exp.timestamp(), 1_672_382_744);
        let frac = format!(
            "x.{}.y",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"exp":1700000000.25,"userID":42}"#)
        );
        assert_eq!(jwt_exp(&frac).unwrap().timestamp_millis(), 1_700_000_000_250);
        let int = format!(
            "x.{}.y",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"exp":1700000000}"#)
        );
        assert_eq!(jwt_exp(&int).unwrap().timestamp(), 1_700_000_000);
    }

    #[test]
    fn a_garbage_token_has_no_exp_and_does_not_panic() {
        for t in [
            "",
            ".",
            "a",
            "a.b",
            "a.!!!.c",
            "a.e30.c",
            "a.bnVsbA.c",
            "x.eyJleHAiOiJzb29uIn0.y",
            "x.eyJleHAiOjFlMzAwfQ.y",
            "x.eyJleHAiOi0xfQ.y",
        ] {
            assert_eq!(jwt_exp(t), None, "{t}");
        }
    }

    #[test]
    fn expiration_time_is_read_in_the_configured_zone() {
        let t = expiration_in_zone("2022-12-30 11:12:52", cst()).unwrap();
        assert_eq!(t.to_rfc3339(), "2022-12-30T03:12:52+00:00");
        let utc = FixedOffset::east_opt(0).unwrap();
        assert_eq!(
            expiration_in_zone("2022-12-30 11:12:52", utc).unwrap().to_rfc3339(),
            "2022-12-30T11:12:52+00:00"
        );
        assert_eq!(expiration_in_zone("", cst()), None);
        assert_eq!(expiration_in_zone("2022-12-30T11:12:52", cst()), None);
        assert_eq!(expiration_in_zone("2022-13-30 11:12:52", cst()), None);
    }

    #[test]
    fn the_jwt_exp_wins_over_expiration_time() {
        let t = token_expiry(SPEC_TOKEN, "2022-12-30 11:12:52", cst()).unwrap();
        assert_eq!(t.timestamp(), 1_672_382_744);
        let t = token_expiry("opaque", "2022-12-30 11:12:52", cst()).unwrap();
        assert_eq!(t.to_rfc3339(), "2022-12-30T03:12:52+00:00");
    }

    #[test]
    fn refresh_is_ahead_of_expiry_but_not_before_half_the_lifetime() {
        let s = Duration::from_secs;
        assert_eq!(refresh_delay(s(3600), s(60)), s(3540));
        assert_eq!(refresh_delay(s(2), s(60)), s(1));
        assert_eq!(refresh_delay(s(0), s(60)), s(0));
    }
}

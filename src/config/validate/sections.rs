//! The one-of-a-kind sections: `[site]` (name, paths resolved against the config's folder, time
//! zone), `[panda]` (base URL, authentication and where the password comes from, delivery timings),
//! `[admin]` (loopback unless `allow_remote`) and `[outbox]` (the store's bounds; defaults when the
//! section is absent). The one file read here is `password_file`, when given.

use std::net::SocketAddr;
use std::time::Duration;

use chrono::FixedOffset;
use toml::Spanned;

use super::{
    Validator, MAX_BACKOFF, MAX_BATCH, MAX_BYTES, MAX_DEAD, MAX_DEAD_AFTER, MAX_HTTP_TIMEOUT, MAX_RECORDS,
    MAX_REFRESH_BEFORE, PASSWORD_ENV,
};
use crate::config::error::read_error;
use crate::config::raw::{RawAdmin, RawOutbox, RawPanda, RawSite};
use crate::config::types::{
    AdminConfig, Auth, OutboxConfig, PandaConfig, SiteConfig, DEFAULT_MAX_DEAD, DEFAULT_MIN_FREE,
};
use crate::config::units::parse_offset;

impl Validator<'_> {
    pub(super) fn site(&mut self, s: &Spanned<RawSite>) -> SiteConfig {
        let line = self.at(s);
        let r = s.get_ref();
        let timezone = match &r.timezone {
            None => FixedOffset::east_opt(8 * 3600),
            Some(tz) => parse_offset(tz),
        };
        let timezone = timezone.unwrap_or_else(|| {
            self.issue(line, "site.timezone", "not a UTC offset: use the form \"+08:00\"");
            FixedOffset::east_opt(0).unwrap_or_else(|| unreachable!("zero offset is valid"))
        });
        if r.name.trim().is_empty() {
            self.issue(line, "site.name", "must not be empty");
        }
        SiteConfig {
            name: r.name.clone(),
            state_dir: self.resolve(&r.state_dir),
            mapping: self.resolve(&r.mapping),
            timezone,
        }
    }

    pub(super) fn panda(&mut self, p: &Spanned<RawPanda>, env_password: &Option<String>) -> PandaConfig {
        let line = self.at(p);
        let r = p.get_ref();
        let base_url = r.base_url.trim_end_matches('/').to_string();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://"))
            || base_url.splitn(4, '/').nth(3).is_some()
        {
            self.issue(
                line,
                "panda.base_url",
                format!(
                    "`{}` must be scheme://host:port with no path, e.g. \"http://10.0.0.5:8080\"",
                    r.base_url
                ),
            );
        }
        let auth = match r.auth.as_deref().unwrap_or("token") {
            "none" => Auth::None,
            "token" => {
                let username = r.username.clone().unwrap_or_default();
                if username.is_empty() {
                    self.issue(line, "panda.username", "required when auth = \"token\"");
                }
                let password = self.password(line, r, env_password);
                Auth::Token { username, password }
            }
            other => {
                self.issue(
                    line,
                    "panda.auth",
                    format!("`{other}` is not allowed: use \"token\" or \"none\""),
                );
                Auth::None
            }
        };
        let timeout = self.duration(
            "panda.timeout",
            r.timeout.as_ref(),
            Duration::from_secs(10),
            MAX_HTTP_TIMEOUT,
        );
        let max_batch = self.ranged("panda.max_batch", r.max_batch.as_ref(), 50, 1, MAX_BATCH) as usize;
        let retry_min = self.duration(
            "panda.retry_min",
            r.retry_min.as_ref(),
            Duration::from_secs(1),
            MAX_BACKOFF,
        );
        if r.max_backoff.is_some() && r.retry_max.is_some() {
            self.issue(
                line,
                "panda.retry_max",
                "is the old name of panda.max_backoff: set only max_backoff",
            );
        }
        let (backoff_field, backoff_value) = match (&r.max_backoff, &r.retry_max) {
            (None, Some(_)) => ("panda.retry_max", &r.retry_max),
            _ => ("panda.max_backoff", &r.max_backoff),
        };
        let max_backoff = self.duration(
            backoff_field,
            backoff_value.as_ref(),
            Duration::from_secs(300),
            MAX_BACKOFF,
        );
        if retry_min > max_backoff {
            self.issue(
                line,
                "panda.retry_min",
                format!("must not be larger than {backoff_field}"),
            );
        }
        let refresh_before = self.duration(
            "panda.refresh_before",
            r.refresh_before.as_ref(),
            Duration::from_secs(60),
            MAX_REFRESH_BEFORE,
        );
        PandaConfig {
            base_url,
            project: r.project.clone(),
            auth,
            user_id: r.user_id,
            to_user_ids: r.to_user_ids.clone(),
            opinion: r.opinion.clone(),
            timeout,
            max_batch,
            retry_min,
            max_backoff,
            refresh_before,
        }
    }

    fn password(&mut self, line: usize, r: &RawPanda, env_password: &Option<String>) -> String {
        if let Some(file) = &r.password_file {
            let path = self.resolve(file);
            return match std::fs::read_to_string(&path) {
                Ok(s) => s.trim_end_matches(['\r', '\n']).to_string(),
                Err(e) => {
                    self.issue(
                        line,
                        "panda.password_file",
                        format!("{}: {}", path.display(), read_error(&e)),
                    );
                    String::new()
                }
            };
        }
        if let Some(p) = r.password.as_ref().filter(|p| !p.is_empty()) {
            return p.clone();
        }
        if let Some(p) = env_password.as_ref().filter(|p| !p.is_empty()) {
            return p.clone();
        }
        self.issue(
            line,
            "panda.password",
            format!("no password: set password_file (preferred), password, or the environment variable {PASSWORD_ENV}"),
        );
        String::new()
    }

    pub(super) fn admin(&mut self, a: Option<&Spanned<RawAdmin>>) -> AdminConfig {
        let default: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 9898));
        let Some(a) = a else {
            return AdminConfig {
                listen: default,
                allow_remote: false,
            };
        };
        let line = self.at(a);
        let listen = match &a.get_ref().listen {
            None => default,
            Some(s) => s.parse().unwrap_or_else(|_| {
                self.issue(
                    line,
                    "admin.listen",
                    format!("`{s}` is not ip:port, e.g. \"127.0.0.1:9898\""),
                );
                default
            }),
        };
        let allow_remote = a.get_ref().allow_remote.unwrap_or(false);
        if !listen.ip().is_loopback() && !allow_remote {
            self.issue(
                line,
                "admin.listen",
                format!(
                    "`{listen}` is not a loopback address; the admin API has no authentication and can requeue \
                     records: use 127.0.0.1, or set admin.allow_remote = true behind a firewall"
                ),
            );
        }
        AdminConfig { listen, allow_remote }
    }

    pub(super) fn outbox(&mut self, o: Option<&Spanned<RawOutbox>>) -> OutboxConfig {
        // A large station: 2000 meters, each moving its valve 4 times a day, for 7 days = 56,000
        // records; ~1 KiB each with BizData. Defaults leave ~3.5x head room.
        let (records, bytes, dead_after) = (200_000i64, 256 * 1024 * 1024i64, 5i64);
        let max_dead = DEFAULT_MAX_DEAD as i64;
        let Some(o) = o else {
            return OutboxConfig {
                max_records: records as u64,
                max_bytes: bytes as u64,
                dead_after: dead_after as u32,
                min_free: DEFAULT_MIN_FREE,
                max_dead: max_dead as u64,
            };
        };
        let line = self.at(o);
        let r = o.get_ref();
        OutboxConfig {
            max_records: self.ranged("outbox.max_records", r.max_records.as_ref(), records, 1, MAX_RECORDS) as u64,
            max_bytes: self.ranged("outbox.max_bytes", r.max_bytes.as_ref(), bytes, 1024, MAX_BYTES) as u64,
            dead_after: self.ranged(
                "outbox.dead_after",
                r.dead_after.as_ref(),
                dead_after,
                1,
                MAX_DEAD_AFTER,
            ) as u32,
            min_free: self.byte_size(line, "outbox.min_free", r.min_free.as_ref(), DEFAULT_MIN_FREE),
            max_dead: self.ranged("outbox.max_dead", r.max_dead.as_ref(), max_dead, 1, MAX_DEAD) as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::validate::test_sites::minimal;

    #[test]
    fn max_backoff_has_a_default_and_accepts_its_old_name() {
        let c = minimal("", "").unwrap();
        assert_eq!(c.panda.max_backoff, Duration::from_secs(300));
        assert_eq!(c.outbox.dead_after, 5);
        assert!(!c.admin.allow_remote);
        let c = minimal("max_backoff = \"2m\"", "").unwrap();
        assert_eq!(c.panda.max_backoff, Duration::from_secs(120));
        let c = minimal("retry_max = \"90s\"", "").unwrap();
        assert_eq!(c.panda.max_backoff, Duration::from_secs(90));
        let e = minimal("max_backoff = \"2m\"\nretry_max = \"90s\"", "").unwrap_err();
        assert!(e.to_string().contains("old name of panda.max_backoff"), "{e}");
        let e = minimal("retry_min = \"10m\"", "").unwrap_err();
        assert!(
            e.to_string().contains("must not be larger than panda.max_backoff"),
            "{e}"
        );
    }

    #[test]
    fn dead_after_is_ranged() {
        assert_eq!(minimal("", "[outbox]\ndead_after = 3\n").unwrap().outbox.dead_after, 3);
        let e = minimal("", "[outbox]\ndead_after = 0\n").unwrap_err();
        assert!(e.to_string().contains("outbox.dead_after"), "{e}");
    }

    #[test]
    fn a_remote_admin_address_needs_allow_remote() {
        let e = minimal("", "[admin]\nlisten = \"0.0.0.0:9898\"\n").unwrap_err();
        assert!(e.to_string().contains("allow_remote"), "{e}");
        let c = minimal("", "[admin]\nlisten = \"0.0.0.0:9898\"\nallow_remote = true\n").unwrap();
        assert!(c.admin.allow_remote);
        assert!(minimal("", "[admin]\nlisten = \"[::1]:9898\"\n").is_ok());
    }
}

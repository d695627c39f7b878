//! A small client of the admin API for the command line (`fieldgate status`, `fieldgate outbox …`): GET
//! JSON with a timeout, and errors that say plainly whether the daemon is there at all.
//!
//! Also finds the API's address from a configuration file without loading the whole configuration
//! (`admin_url_of`): `status` must work for an operator who may read `fieldgate.toml` but not the
//! password file or the mapping.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

/// Where `--config` points by default (as for `fieldgate run`).
pub(crate) const DEFAULT_CONFIG: &str = "/etc/fieldgate/fieldgate.toml";

/// `http://` URL of a listen address; an unspecified address (0.0.0.0, ::) is asked on loopback.
pub(crate) fn admin_url(listen: SocketAddr) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, listen.port()))
}

/// `[admin] listen` when the configuration does not set it.
const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9898);

/// How long one admin request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Why the admin API could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    /// Nothing answers at the address.
    #[error("the fieldgate daemon does not answer at {url}: is it running? Check with `systemctl status fieldgate` (and that [admin] listen is this address)")]
    Unreachable {
        /// The base URL.
        url: String,
    },
    /// It answered with an unexpected HTTP status.
    #[error("admin API {url}: HTTP {status}: {body}")]
    Http {
        /// The URL asked.
        url: String,
        /// The status code.
        status: u16,
        /// The body, for the error text.
        body: String,
    },
    /// The request failed in another way, or the answer did not parse.
    #[error("admin API {url}: {reason}")]
    Answer {
        /// The URL asked.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The configuration file could not be read for its `[admin] listen`.
    #[error(
        "cannot read [admin] listen from {path}: {reason} (or give the address with --admin http://127.0.0.1:9898)"
    )]
    Config {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

impl AdminClientError {
    /// A bounded label.
    pub fn error_code(&self) -> &'static str {
        match self {
            AdminClientError::Unreachable { .. } => "unreachable",
            AdminClientError::Http { .. } => "http",
            AdminClientError::Answer { .. } => "answer",
            AdminClientError::Config { .. } => "config",
        }
    }
}

/// The admin API of a running daemon.
#[derive(Debug, Clone)]
pub(crate) struct AdminClient {
    base: String,
    http: reqwest::Client,
}

impl AdminClient {
    /// A client for `base`, e.g. `http://127.0.0.1:9898` (a trailing `/` is ignored).
    pub(crate) fn new(base: &str) -> Result<AdminClient, AdminClientError> {
        let base = base.trim_end_matches('/').to_string();
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .build()
            .map_err(|e| AdminClientError::Answer {
                url: base.clone(),
                reason: e.to_string(),
            })?;
        Ok(AdminClient { base, http })
    }

    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    /// `GET {base}{path}` answered 200, as JSON.
    pub(crate) async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, AdminClientError> {
        self.get_accepting(path, &[200]).await
    }

    /// `GET {base}{path}` answered with one of `statuses` (e.g. `/healthz` answers 503 when critical),
    /// as JSON.
    pub(crate) async fn get_accepting<T: DeserializeOwned>(
        &self,
        path: &str,
        statuses: &[u16],
    ) -> Result<T, AdminClientError> {
        let url = format!("{}{path}", self.base);
        let resp = self.http.get(&url).send().await.map_err(|e| {
            if e.is_connect() {
                AdminClientError::Unreachable { url: self.base.clone() }
            } else {
                AdminClientError::Answer {
                    url: url.clone(),
                    reason: e.to_string(),
                }
            }
        })?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|e| AdminClientError::Answer {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        if !statuses.contains(&status) {
            return Err(AdminClientError::Http {
                url,
                status,
                body: String::from_utf8_lossy(&body).chars().take(500).collect(),
            });
        }
        serde_json::from_slice(&body).map_err(|e| AdminClientError::Answer {
            url,
            reason: format!("unexpected answer (is this a fieldgate admin API of the same version?): {e}"),
        })
    }
}

/// The admin URL from `[admin] listen` of the configuration at `path` (default [`DEFAULT_LISTEN`]),
/// reading only that key: the rest of the file is not validated here.
pub(crate) fn admin_url_of(path: &Path) -> Result<String, AdminClientError> {
    let fail = |reason: String| AdminClientError::Config {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(crate::config::read_error(&e)))?;
    let value: toml::Table = toml::from_str(&text).map_err(|e| fail(e.message().to_string()))?;
    let listen = match value.get("admin").and_then(|a| a.get("listen")) {
        None => DEFAULT_LISTEN,
        Some(toml::Value::String(s)) => s
            .parse()
            .map_err(|_| fail(format!("`{s}` is not ip:port, e.g. \"127.0.0.1:9898\"")))?,
        Some(other) => return Err(fail(format!("listen is a {}, not a string", other.type_str()))),
    };
    Ok(admin_url(listen))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_url_comes_from_admin_listen_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        // Nothing else in the file needs to be valid: the password and mapping are not read.
        std::fs::write(&path, "[site]\nname = 1\n[admin]\nlisten = \"0.0.0.0:7000\"\n").unwrap();
        assert_eq!(admin_url_of(&path).unwrap(), "http://127.0.0.1:7000");
        std::fs::write(&path, "[site]\n").unwrap();
        assert_eq!(admin_url_of(&path).unwrap(), "http://127.0.0.1:9898");
        std::fs::write(&path, "[admin]\nlisten = \"nope\"\n").unwrap();
        let e = admin_url_of(&path).unwrap_err();
        assert!(e.to_string().contains("not ip:port"), "{e}");
        let e = admin_url_of(&dir.path().join("missing.toml")).unwrap_err();
        assert_eq!(e.error_code(), "config");
        assert!(e.to_string().contains("--admin"), "{e}");
    }

    #[test]
    fn unspecified_admin_addresses_are_asked_on_loopback() {
        assert_eq!(admin_url("0.0.0.0:9898".parse().unwrap()), "http://127.0.0.1:9898");
        assert_eq!(admin_url("[::]:9898".parse().unwrap()), "http://[::1]:9898");
        assert_eq!(admin_url("127.0.0.1:1".parse().unwrap()), "http://127.0.0.1:1");
    }
}

//! The systemd notification protocol (`sd_notify(3)`), written out: one datagram of `KEY=VALUE` lines
//! per message to the Unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` for an abstract
//! socket), and the watchdog interval from `$WATCHDOG_USEC`.
//!
//! Owns: [`Notifier`], which says READY=1, RELOADING=1, STOPPING=1, WATCHDOG=1 and STATUS=… . It never
//! fails the gateway: without `$NOTIFY_SOCKET` (not under systemd, or `Type=` other than `notify`)
//! every message is a no-op, and a send error is logged once, not returned.
//!
//! Never mutates the process environment: `Notifier::from_env` reads it once, and tests build a
//! notifier with [`Notifier::new`] from an explicit socket and interval instead.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Where systemd listens; set by systemd for `Type=notify` services.
const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";
/// The watchdog timeout in microseconds; set by systemd when the unit has `WatchdogSec=`.
const WATCHDOG_USEC_ENV: &str = "WATCHDOG_USEC";
/// The process the watchdog timeout is meant for; when set and not us, the watchdog is not ours.
const WATCHDOG_PID_ENV: &str = "WATCHDOG_PID";

/// Sends notifications to systemd. Cheap to clone (shared socket).
#[derive(Clone, Debug, Default)]
pub struct Notifier {
    inner: Option<Arc<Inner>>,
    watchdog: Option<Duration>,
}

#[derive(Debug)]
struct Inner {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// The name as configured, for logs.
    name: String,
    /// A failed send is logged once; later ones only at debug.
    failed: AtomicBool,
}

impl Notifier {
    /// A notifier that sends nothing (not under systemd).
    pub(crate) fn disabled() -> Notifier {
        Notifier::default()
    }

    /// From `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`, as systemd sets them. Disabled
    /// without `$NOTIFY_SOCKET`; without a valid `$WATCHDOG_USEC` (or with a `$WATCHDOG_PID` that is
    /// not this process) there is no watchdog. A socket that cannot be used is logged, and the
    /// notifier is disabled.
    pub(crate) fn from_env() -> Notifier {
        let socket = std::env::var(NOTIFY_SOCKET_ENV).ok().filter(|s| !s.is_empty());
        let usec = std::env::var(WATCHDOG_USEC_ENV).ok();
        let pid = std::env::var(WATCHDOG_PID_ENV).ok();
        let watchdog = watchdog_from(usec.as_deref(), pid.as_deref(), std::process::id());
        match Notifier::new(socket.as_deref(), watchdog) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(
                    message = "Cannot use the systemd notification socket; no READY or watchdog pings will be sent.",
                    socket = %socket.unwrap_or_default(),
                    error = %e,
                );
                Notifier::disabled()
            }
        }
    }

    /// A notifier for `socket` (a path, or `@name` for an abstract socket; `None` = disabled) with
    /// the given watchdog timeout (pings go out every half of it).
    pub fn new(socket: Option<&str>, watchdog: Option<Duration>) -> io::Result<Notifier> {
        let Some(name) = socket else {
            return Ok(Notifier { inner: None, watchdog });
        };
        let addr = socket_addr(name)?;
        let socket = UnixDatagram::unbound()?;
        // A datagram to a full socket must not stall a tokio worker: drop it instead (the next
        // ping comes in WatchdogSec/2).
        socket.set_nonblocking(true)?;
        Ok(Notifier {
            inner: Some(Arc::new(Inner {
                socket,
                addr,
                name: name.to_string(),
                failed: AtomicBool::new(false),
            })),
            watchdog,
        })
    }

    /// Whether messages go anywhere.
    fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The watchdog timeout (`WatchdogSec`), if systemd asked for pings.
    pub(crate) fn watchdog_timeout(&self) -> Option<Duration> {
        self.watchdog.filter(|_| self.is_enabled())
    }

    /// How often to ping: half the watchdog timeout, as `sd_watchdog_enabled(3)` advises.
    pub(crate) fn ping_interval(&self) -> Option<Duration> {
        self.watchdog_timeout().map(|t| (t / 2).max(Duration::from_millis(1)))
    }

    /// Startup is complete.
    pub(crate) fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// A reload (SIGHUP) has begun; follow with [`Notifier::ready`].
    pub(crate) fn reloading(&self) {
        self.send("RELOADING=1\nSTATUS=Reloading the configuration.");
    }

    /// Shutdown has begun.
    pub(crate) fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=Stopping.");
    }

    /// The service is alive (every bus task is making progress).
    pub(crate) fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    /// A free-form status line (`systemctl status` shows it).
    pub(crate) fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)));
    }

    fn send(&self, msg: &str) {
        let Some(inner) = &self.inner else { return };
        match inner.socket.send_to_addr(msg.as_bytes(), &inner.addr) {
            Ok(_) => {
                if inner.failed.swap(false, Ordering::Relaxed) {
                    tracing::info!(message = "systemd notifications go through again.", socket = %inner.name);
                }
            }
            Err(e) => {
                if !inner.failed.swap(true, Ordering::Relaxed) {
                    tracing::warn!(message = "Cannot notify systemd.", socket = %inner.name, error = %e);
                } else {
                    tracing::debug!(message = "Cannot notify systemd.", socket = %inner.name, error = %e);
                }
            }
        }
    }
}

/// The watchdog timeout from `$WATCHDOG_USEC` (and `$WATCHDOG_PID`, checked against `own_pid`).
fn watchdog_from(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(own_pid) {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// `/path` or `@abstract-name` → a socket address.
fn socket_addr(name: &str) -> io::Result<SocketAddr> {
    if let Some(abstract_name) = name.strip_prefix('@') {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            #[cfg(target_os = "android")]
            use std::os::android::net::SocketAddrExt as _;
            #[cfg(target_os = "linux")]
            use std::os::linux::net::SocketAddrExt as _;
            return SocketAddr::from_abstract_name(abstract_name.as_bytes());
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            let _ = abstract_name;
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "abstract socket names exist only on Linux",
            ));
        }
    }
    SocketAddr::from_pathname(name)
}

/// STATUS= is one line: newlines would start new assignments.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("recv");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn messages_arrive_on_a_path_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).expect("bind");
        server.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let n = Notifier::new(path.to_str(), Some(Duration::from_secs(30))).expect("notifier");
        n.ready("Polling 2 buses.\nsecond line");
        n.watchdog();
        n.stopping();
        assert_eq!(recv(&server), "READY=1\nSTATUS=Polling 2 buses. second line");
        assert_eq!(recv(&server), "WATCHDOG=1");
        assert_eq!(recv(&server), "STOPPING=1\nSTATUS=Stopping.");
        assert_eq!(n.ping_interval(), Some(Duration::from_secs(15)));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn messages_arrive_on_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("fieldgate-notify-test-{}-{}", std::process::id(), rand::random::<u64>());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let server = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        server.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let n = Notifier::new(Some(&format!("@{name}")), None).expect("notifier");
        n.ready("up");
        assert_eq!(recv(&server), "READY=1\nSTATUS=up");
        assert_eq!(n.ping_interval(), None, "no WATCHDOG_USEC, no pings");
    }

    #[test]
    fn without_a_socket_everything_is_a_no_op() {
        let n = Notifier::new(None, Some(Duration::from_secs(30))).expect("notifier");
        assert!(!n.is_enabled());
        assert_eq!(n.ping_interval(), None, "no socket, no watchdog");
        n.ready("up");
        n.watchdog();
    }

    #[test]
    fn a_missing_socket_file_is_logged_not_fatal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nobody-listens.sock");
        let n = Notifier::new(path.to_str(), None).expect("notifier");
        n.ready("up");
        n.ready("up again");
    }

    #[test]
    fn watchdog_usec_and_pid_are_read_like_sd_watchdog_enabled() {
        assert_eq!(watchdog_from(Some("30000000"), None, 7), Some(Duration::from_secs(30)));
        assert_eq!(
            watchdog_from(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_from(Some("30000000"), Some("8"), 7),
            None,
            "meant for another process"
        );
        assert_eq!(watchdog_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_from(Some("soon"), None, 7), None);
        assert_eq!(watchdog_from(None, Some("7"), 7), None);
    }
}

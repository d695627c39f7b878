//! The integration tests, compiled into one binary (see Cargo.toml `[[test]]`).

mod util;

/// The admin API of a running gateway (metrics, meters, health), `status`, `outbox stats|list`, `probe`.
mod admin;
/// `run_bus` against the in-process simulator over sockets and ptys (one test needs `socat`).
mod bus;
/// Config and mapping files: every error class, encodings, profiles; `fieldgate check`.
mod config;
/// The fleet files in `contrib/` (Prometheus rules and their unit tests, Grafana dashboard) against a
/// live gateway's `/metrics`, with `promtool` and a real Prometheus (Debian package `prometheus`).
mod contrib;
/// `fieldgate run` killed with SIGKILL at random moments.
mod crash;
/// Disk faults under the real binary: a full disk, a disk that fails with EIO.
mod disk;
/// Simulator → gateway → mock Panda, in-process, over TCP and loopback HTTP.
mod e2e;
/// Event rules end to end: valve fault, link offline/online with `for`, thresholds, `rises_by`.
mod events;
/// Meters failing a random quarter of their reads (late or no answer), TCP and RTU pty, end to end:
/// no transition held five rounds is lost; their answer times in `/meters` and `status`.
mod flaky;
/// Running as a service: systemd notify + watchdog, SIGHUP reload, SIGTERM, a second instance.
mod ops;
/// The outbox against an in-memory model (proptest): no record lost, duplicated or reordered.
mod outbox_model;
/// The status page in headless Chromium (needs `chromium`, `chromium-driver`); what a requeue must show.
mod page;
/// RS-485 mode on a pty that refuses it (ENOTTY): the bus down with the kernel's answer in the log,
/// `/healthz` and `/buses`, retried with backoff, polling after a reload without it; `probe --rs485`.
mod rs485;
/// `fieldgate scan` against the simulator over TCP and on socat ptys: units found, `--json`,
/// `--emit-config` validated, a garbled setting given up.
mod scan;
/// The sender against the strict mock Panda over real HTTP, with a real sled outbox.
mod sender;
/// The small file systems the disk-fault tests mount.
mod smallfs_selftest;

//! The two clocks. Wall-clock time is only a label (a record's detection time, a state's `since`):
//! many gateway boards have no battery-backed clock, boot in 1970 and are stepped to today by NTP a
//! few seconds later, so a difference of two wall-clock times can be 56 years long or negative.
//! Every duration the gateway decides on comes from a monotonic clock:
//! - within one process: `tokio::time::Instant` / `std::time::Instant`;
//! - across a restart of the process (a link rule's `for` running while the gateway restarts):
//!   [`BootStamp`], the kernel's `CLOCK_BOOTTIME` with the boot's id. A stamp of another boot (a power
//!   cut) cannot be compared with now: what it started counts again from the boot.
//!
//! [`WallClock`] is the one seam through which the wall clock reaches the rules: tests move it
//! (steps forward and back) without touching the system clock. [`sync_state`] asks the kernel
//! (`adjtimex`) whether the system clock is synchronized, so that health and `fieldgate status` can say
//! why times look odd.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The wall clock as the gateway reads it: the system clock, moved by an offset that only tests set.
/// Cheap to clone; clones share the offset.
#[derive(Debug, Clone, Default)]
pub struct WallClock {
    offset_ms: Arc<AtomicI64>,
}

impl WallClock {
    /// Now, as a label.
    pub fn now(&self) -> DateTime<Utc> {
        let offset = self.offset_ms.load(Ordering::Relaxed);
        Utc::now() + chrono::Duration::milliseconds(offset)
    }

    /// Step this clock by `by` (forward or back), as NTP steps a board's clock: for tests.
    #[doc(hidden)]
    pub fn step(&self, by: chrono::Duration) {
        self.offset_ms.fetch_add(by.num_milliseconds(), Ordering::Relaxed);
    }
}

/// A moment on the boot clock (`CLOCK_BOOTTIME`: monotonic, counts suspend, never stepped), with the
/// boot it belongs to. Persisted with the rule memory it times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootStamp {
    /// `/proc/sys/kernel/random/boot_id` of the boot (empty where unknown).
    pub boot: String,
    /// Nanoseconds since that boot.
    pub ns: u64,
}

impl BootStamp {
    /// Now.
    pub fn now() -> BootStamp {
        BootStamp {
            boot: boot_id().to_string(),
            ns: boot_ns(),
        }
    }

    /// How long ago this stamp was, if it is of this boot (`None`: another boot or an unknown one).
    pub fn elapsed(&self) -> Option<Duration> {
        self.is_this_boot()
            .then(|| Duration::from_nanos(boot_ns().saturating_sub(self.ns)))
    }

    /// Whether the stamp is of this boot.
    pub fn is_this_boot(&self) -> bool {
        !self.boot.is_empty() && self.boot == boot_id()
    }
}

/// Nanoseconds on `CLOCK_BOOTTIME`.
pub fn boot_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    u64::try_from(t.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0))
}

/// This boot's id (read once); empty where the kernel does not tell.
pub fn boot_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}

/// Whether the kernel considers the system clock synchronized (NTP, chrony, systemd-timesyncd).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockSync {
    /// Synchronized: times are right.
    Synchronized,
    /// Not synchronized (no NTP yet, or none configured): times may be wrong, and may step.
    Unsynchronized,
    /// The kernel could not be asked (not Linux with glibc).
    Unknown,
}

/// The kernel's clock state (`adjtimex` in read-only mode: `STA_UNSYNC` in its status).
pub fn sync_state() -> ClockSync {
    adjtimex_status().map_or(ClockSync::Unknown, |status| {
        // STA_UNSYNC: the kernel's "clock not synchronized" flag.
        if status & 0x0040 != 0 {
            ClockSync::Unsynchronized
        } else {
            ClockSync::Synchronized
        }
    })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn adjtimex_status() -> Option<i32> {
    let mut tx: libc::timex = {
        // SAFETY: `timex` is a plain C struct of integers for which all zeroes is a valid value.
        unsafe { std::mem::zeroed() }
    };
    // modes = 0: read only; nothing about the clock is changed.
    tx.modes = 0;
    // SAFETY: `tx` is a valid, exclusively borrowed `timex` for the duration of the call.
    let rc = unsafe { libc::adjtimex(&mut tx) };
    (rc >= 0).then_some(tx.status)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn adjtimex_status() -> Option<i32> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_moves_the_label_and_not_the_boot_clock() {
        let wall = WallClock::default();
        let before = (wall.now(), BootStamp::now());
        wall.step(chrono::Duration::days(-365 * 56));
        let after = (wall.now(), BootStamp::now());
        assert!(after.0 < before.0 - chrono::Duration::days(365 * 55));
        assert!(after.1.ns >= before.1.ns, "the boot clock never goes back");
        assert!(before.1.elapsed().is_some_and(|d| d < Duration::from_secs(60)));
    }

    #[test]
    fn a_stamp_of_another_boot_has_no_age() {
        let other = BootStamp {
            boot: "another-boot".into(),
            ns: 1,
        };
        assert_eq!(other.elapsed(), None);
        assert!(!other.is_this_boot());
        assert!(BootStamp::now().is_this_boot() || boot_id().is_empty());
    }

    #[test]
    fn the_kernel_answers_about_the_clock() {
        // Whatever this machine's state, on Linux with glibc the kernel answers.
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert_ne!(sync_state(), ClockSync::Unknown);
        }
    }
}

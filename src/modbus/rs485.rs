//! RS-485 direction control of on-board UARTs: a bus's `rs485` setting as the kernel's
//! `struct serial_rs485`, handed to the port with the `TIOCSRS485` ioctl right after it is opened
//! (`link::open`, so after every reopen too, and in `fieldgate probe`).
//!
//! The UARTs of ARM boards (i.MX, AM335x, Raspberry Pi HATs) drive the transceiver's direction pin with
//! RTS only in the kernel's RS-485 mode; without it the bus stays silent. USB adapters switch direction
//! by themselves and refuse the ioctl (ENOTTY), as a pty does.
//!
//! Invariants: [`kernel_struct`] is pure and its result is exactly what the kernel reads (layout and
//! values unit-tested below); a refusal is a [`Refused`] naming the device, the kernel's answer (errno
//! name and words) and what it means for the engineer. The only unsafe code is the ioctl call, in one
//! function allowed to ([`tiocsrs485`], the reason beside it). What the kernel writes back (the settings
//! it applied) is not used. Never: touches a port whose bus has no `rs485` (its mode stays as the system set
//! it), retries by itself (the link's open backoff does), or panics on what the kernel answers.

use std::fmt;
use std::os::fd::AsRawFd;

use crate::config::Rs485;

/// `SER_RS485_ENABLED` (linux/serial.h): RS-485 mode on.
const SER_RS485_ENABLED: u32 = 1 << 0;
/// `SER_RS485_RTS_ON_SEND`: RTS high while sending.
const SER_RS485_RTS_ON_SEND: u32 = 1 << 1;
/// `SER_RS485_RTS_AFTER_SEND`: RTS high after sending.
const SER_RS485_RTS_AFTER_SEND: u32 = 1 << 2;

/// `struct serial_rs485` of linux/serial.h: 8 × `__u32`, 32 bytes. The kernel reads it and writes back
/// what it applied. The last 5 words are `addr_recv`/`addr_dest` and padding in newer kernels; zero
/// means unused (no RS-485 addressing flags are set).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct SerialRs485 {
    /// `SER_RS485_*` flags.
    pub(crate) flags: u32,
    /// Milliseconds RTS is set before sending.
    pub(crate) delay_rts_before_send: u32,
    /// Milliseconds RTS is held after sending.
    pub(crate) delay_rts_after_send: u32,
    /// Reserved; zero.
    pub(crate) padding: [u32; 5],
}

/// The kernel's form of a bus's `rs485` (delays are validated whole milliseconds of at most 100 ms;
/// anything larger would be clamped, never wrapped).
pub(crate) fn kernel_struct(cfg: &Rs485) -> SerialRs485 {
    let ms = |d: std::time::Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
    let mut flags = SER_RS485_ENABLED;
    if cfg.rts_on_send {
        flags |= SER_RS485_RTS_ON_SEND;
    }
    if cfg.rts_after_send {
        flags |= SER_RS485_RTS_AFTER_SEND;
    }
    SerialRs485 {
        flags,
        delay_rts_before_send: ms(cfg.delay_before_send),
        delay_rts_after_send: ms(cfg.delay_after_send),
        padding: [0; 5],
    }
}

/// The port refused RS-485 mode: the device, the kernel's answer and what it means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused {
    /// The device path.
    pub(crate) path: String,
    /// The errno (0 when the platform has no such ioctl).
    pub(crate) errno: i32,
}

impl Refused {
    /// The errno's name as the kernel headers spell it (`ENOTTY`), or `errno N`.
    fn name(&self) -> String {
        use rustix::io::Errno;
        if self.errno == 0 {
            return "unsupported".to_string();
        }
        let known = [
            (Errno::NOTTY, "ENOTTY"),
            (Errno::INVAL, "EINVAL"),
            (Errno::PERM, "EPERM"),
            (Errno::IO, "EIO"),
            (Errno::NXIO, "ENXIO"),
            (Errno::BADF, "EBADF"),
            (Errno::FAULT, "EFAULT"),
            (Errno::BUSY, "EBUSY"),
            (Errno::NODEV, "ENODEV"),
            (Errno::OPNOTSUPP, "EOPNOTSUPP"),
        ];
        known
            .iter()
            .find(|(e, _)| e.raw_os_error() == self.errno)
            .map_or_else(|| format!("errno {}", self.errno), |(_, name)| (*name).to_string())
    }

    /// The kernel's answer in words (`Inappropriate ioctl for device`), without the `(os error N)`.
    fn words(&self) -> String {
        if self.errno == 0 {
            return "this build has no TIOCSRS485 for this platform".to_string();
        }
        let text = std::io::Error::from_raw_os_error(self.errno).to_string();
        match text.rfind(" (os error") {
            Some(at) => text[..at].to_string(),
            None => text,
        }
    }

    /// What the answer means for the engineer, and what to do.
    fn meaning(&self) -> &'static str {
        use rustix::io::Errno;
        match self.errno {
            n if n == Errno::NOTTY.raw_os_error() => {
                "the port is not a UART with the kernel's RS-485 support (a USB adapter, which switches \
                   direction by itself, or a pty): remove `rs485` from this bus"
            }
            n if n == Errno::INVAL.raw_os_error() => {
                "the UART driver has RS-485 support but refuses these settings: try the opposite RTS levels \
                   (rts_on_send / rts_after_send) and no delays, and check the board's RS-485 setup (device tree); \
                   remove `rs485` if the transceiver switches direction by itself"
            }
            _ => {
                "the port cannot be put in RS-485 mode: remove `rs485` if the transceiver switches direction \
                  by itself, else check the UART driver (`dmesg | tail`)"
            }
        }
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} refused RS-485 mode (TIOCSRS485: {}, {}): {}",
            self.path,
            self.name(),
            self.words(),
            self.meaning()
        )
    }
}

/// Put the open port `port` (at `path`) in RS-485 mode as `cfg` says. Blocking (a driver may talk to
/// its hardware): call it where the port is opened, off the async workers.
pub(crate) fn apply(port: &impl AsRawFd, path: &str, cfg: &Rs485) -> Result<(), Refused> {
    tiocsrs485(port, kernel_struct(cfg))
        .map(|_applied| ())
        .map_err(|errno| Refused {
            path: path.to_string(),
            errno,
        })
}

/// `TIOCSRS485` on the architectures whose tty ioctl numbers follow asm-generic (x86, ARM, AArch64,
/// RISC-V, PowerPC, …); MIPS and SPARC number it otherwise and get the fallback of [`tiocsrs485`].
#[cfg(all(
    target_os = "linux",
    not(any(
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "mips32r6",
        target_arch = "mips64r6",
        target_arch = "sparc",
        target_arch = "sparc64"
    ))
))]
const TIOCSRS485: rustix::ioctl::Opcode = 0x542F;

/// `ioctl(fd, TIOCSRS485, &serial_rs485)`; returns what the kernel applied, or the errno.
#[cfg(all(
    target_os = "linux",
    not(any(
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "mips32r6",
        target_arch = "mips64r6",
        target_arch = "sparc",
        target_arch = "sparc64"
    ))
))]
// No safe wrapper of TIOCSRS485 exists (serialport/tokio-serial have none; rustix's ioctl API is the
// typed, maintained one): the ioctl is unsafe by nature, allowed here only.
#[allow(unsafe_code)]
fn tiocsrs485(port: &impl AsRawFd, mut value: SerialRs485) -> Result<SerialRs485, i32> {
    use rustix::fd::BorrowedFd;
    use rustix::ioctl::{ioctl, Updater};
    // SAFETY: the descriptor belongs to `port`, which is borrowed (so open) for the whole call.
    let fd = unsafe { BorrowedFd::borrow_raw(port.as_raw_fd()) };
    // SAFETY: TIOCSRS485 takes a pointer to a `struct serial_rs485` (`SerialRs485`: repr(C), 8 × u32,
    // layout tested below), reads it and writes the applied settings back into the same 32 bytes: an
    // updater over our exclusively borrowed `value`, valid for the call. No other memory is touched.
    let request = unsafe { Updater::<TIOCSRS485, SerialRs485>::new(&mut value) };
    // SAFETY: as above.
    match unsafe { ioctl(fd, request) } {
        Ok(()) => Ok(value),
        Err(errno) => Err(errno.raw_os_error()),
    }
}

/// Platforms without the ioctl (or with another number for it): refused, never guessed.
#[cfg(not(all(
    target_os = "linux",
    not(any(
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "mips32r6",
        target_arch = "mips64r6",
        target_arch = "sparc",
        target_arch = "sparc64"
    ))
)))]
fn tiocsrs485(_port: &impl AsRawFd, _value: SerialRs485) -> Result<SerialRs485, i32> {
    Err(0)
}

#[cfg(test)]
mod tests {
    use std::mem::{align_of, offset_of, size_of};
    use std::time::Duration;

    use super::*;

    fn rs485(on: bool, after: bool, before_ms: u64, after_ms: u64) -> Rs485 {
        Rs485 {
            rts_on_send: on,
            rts_after_send: after,
            delay_before_send: Duration::from_millis(before_ms),
            delay_after_send: Duration::from_millis(after_ms),
        }
    }

    /// The layout of `struct serial_rs485` in linux/serial.h: what the kernel copies from the pointer.
    #[test]
    fn the_struct_has_the_kernels_layout() {
        assert_eq!(size_of::<SerialRs485>(), 32);
        assert_eq!(align_of::<SerialRs485>(), 4);
        assert_eq!(offset_of!(SerialRs485, flags), 0);
        assert_eq!(offset_of!(SerialRs485, delay_rts_before_send), 4);
        assert_eq!(offset_of!(SerialRs485, delay_rts_after_send), 8);
        assert_eq!(offset_of!(SerialRs485, padding), 12);
    }

    #[test]
    fn the_default_is_enabled_with_rts_high_while_sending_and_no_delays() {
        assert_eq!(
            kernel_struct(&Rs485::DEFAULT),
            SerialRs485 {
                flags: 0b011,
                delay_rts_before_send: 0,
                delay_rts_after_send: 0,
                padding: [0; 5],
            }
        );
    }

    #[test]
    fn each_setting_lands_in_its_own_field() {
        // (rts_on_send, rts_after_send, before ms, after ms) -> (flags, before, after)
        let cases = [
            ((true, false, 0, 0), (0b011, 0, 0)),
            ((false, true, 0, 0), (0b101, 0, 0)),
            ((true, false, 2, 0), (0b011, 2, 0)),
            ((true, false, 0, 5), (0b011, 0, 5)),
            ((false, true, 100, 100), (0b101, 100, 100)),
            // Both levels equal never passes validation; the struct still says exactly that.
            ((true, true, 1, 3), (0b111, 1, 3)),
            ((false, false, 0, 0), (0b001, 0, 0)),
        ];
        for ((on, after, b, a), (flags, before, after_ms)) in cases {
            let k = kernel_struct(&rs485(on, after, b, a));
            assert_eq!(
                k,
                SerialRs485 {
                    flags,
                    delay_rts_before_send: before,
                    delay_rts_after_send: after_ms,
                    padding: [0; 5],
                },
                "{on} {after} {b} {a}"
            );
            assert_eq!(k.flags & SER_RS485_ENABLED, SER_RS485_ENABLED, "always enabled");
        }
    }

    /// The opcode is the C headers' value on this (glibc) platform.
    #[cfg(all(
        target_os = "linux",
        target_env = "gnu",
        any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "arm")
    ))]
    #[test]
    // libc's `Ioctl` is a c_ulong: 32 bits on ARM, 64 on x86_64 and AArch64 (where `from` is a no-op).
    #[allow(clippy::useless_conversion)]
    fn the_opcode_is_the_c_headers_one() {
        assert_eq!(u64::from(TIOCSRS485), u64::from(libc::TIOCSRS485));
    }

    /// A pty is not a UART: the kernel answers ENOTTY, and the error says so with the device.
    #[tokio::test]
    async fn a_pty_refuses_with_enotty_and_the_error_names_the_device_and_what_to_do() {
        use tokio_serial::SerialPort as _;
        let (_master, slave) = tokio_serial::SerialStream::pair().expect("pty pair");
        let path = slave.name().expect("pty path");
        let e = apply(&slave, &path, &Rs485::DEFAULT).expect_err("a pty has no RS-485 mode");
        assert_eq!(e.errno, rustix::io::Errno::NOTTY.raw_os_error(), "{e}");
        let text = e.to_string();
        assert!(text.starts_with(&format!("{path} refused RS-485 mode")), "{text}");
        assert!(
            text.contains("TIOCSRS485: ENOTTY, Inappropriate ioctl for device"),
            "{text}"
        );
        assert!(text.contains("remove `rs485` from this bus"), "{text}");
    }

    #[test]
    fn einval_and_unknown_answers_are_named_too() {
        let e = Refused {
            path: "/dev/ttymxc2".into(),
            errno: rustix::io::Errno::INVAL.raw_os_error(),
        };
        let text = e.to_string();
        assert!(text.contains("(TIOCSRS485: EINVAL, Invalid argument)"), "{text}");
        assert!(text.contains("refuses these settings"), "{text}");
        let e = Refused {
            path: "/dev/ttyS1".into(),
            errno: 121,
        };
        assert!(e.to_string().contains("errno 121"), "{e}");
    }
}

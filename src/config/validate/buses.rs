//! `[[bus]]`: a unique name, exactly one transport (Modbus TCP, a serial line with its framing and
//! optional RS-485 mode, or RTU over TCP) and the bus's timings, whose defaults follow the transport
//! (the frame gap is t3.5 of the baud rate on a serial line). The checks of an `rs485` table are pure
//! functions shared with `fieldgate probe --rs485` ([`parse_rs485_option`]).

use std::collections::HashSet;
use std::time::Duration;

use toml::Spanned;

use super::{Validator, MAX_BUS_TIMEOUT, MAX_FRAME_GAP, MAX_OFFLINE_AFTER, MAX_OFFLINE_RETRY, MAX_POLL_INTERVAL};
use crate::config::raw::{RawBus, RawTable};
use crate::config::types::{BusConfig, Parity, Rs485, Transport, MAX_RS485_DELAY};

impl Validator<'_> {
    pub(super) fn buses(&mut self, raw: &[Spanned<RawBus>]) -> Vec<BusConfig> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for (i, b) in raw.iter().enumerate() {
            let line = self.at(b);
            let r = b.get_ref();
            let f = |name: &str| format!("bus[{i}].{name}");
            if !seen.insert(r.name.clone()) {
                self.issue(line, f("name"), format!("bus name `{}` is used twice", r.name));
            }
            let transport = self.transport(line, i, r);
            let poll_interval = self.duration(
                &f("poll_interval"),
                r.poll_interval.as_ref(),
                Duration::from_secs(1),
                MAX_POLL_INTERVAL,
            );
            let timeout = self.duration(
                &f("timeout"),
                r.timeout.as_ref(),
                Duration::from_millis(300),
                MAX_BUS_TIMEOUT,
            );
            let offline_after =
                self.ranged(&f("offline_after"), r.offline_after.as_ref(), 3, 1, MAX_OFFLINE_AFTER) as u32;
            let offline_retry = self.duration(
                &f("offline_retry"),
                r.offline_retry.as_ref(),
                Duration::from_secs(30),
                MAX_OFFLINE_RETRY,
            );
            let default_gap = match &transport {
                Transport::Serial { baud, .. } => frame_gap_for(*baud),
                Transport::RtuOverTcp(_) => Duration::from_millis(4),
                Transport::Tcp(_) => Duration::ZERO,
            };
            let frame_gap = self.duration(&f("frame_gap"), r.frame_gap.as_ref(), default_gap, MAX_FRAME_GAP);
            let guard = self.duration(&f("guard"), r.guard.as_ref(), timeout, MAX_BUS_TIMEOUT);
            out.push(BusConfig {
                name: r.name.clone(),
                transport,
                poll_interval,
                timeout,
                offline_after,
                offline_retry,
                frame_gap,
                guard,
            });
        }
        out
    }

    fn transport(&mut self, line: usize, i: usize, r: &RawBus) -> Transport {
        let kinds = [&r.tcp, &r.serial, &r.rtu_over_tcp]
            .iter()
            .filter(|k| k.is_some())
            .count();
        if kinds != 1 {
            self.issue(
                line,
                format!("bus[{i}]"),
                "give exactly one of: tcp, serial, rtu_over_tcp",
            );
        }
        let serial_only = r.baud.is_some() || r.parity.is_some() || r.data_bits.is_some() || r.stop_bits.is_some();
        if let Some(path) = &r.serial {
            let baud = self.ranged(&format!("bus[{i}].baud"), r.baud.as_ref(), 9600, 300, 4_000_000) as u32;
            let parity = match r.parity.as_deref().unwrap_or("none") {
                "none" => Parity::None,
                "even" => Parity::Even,
                "odd" => Parity::Odd,
                other => {
                    self.issue(
                        line,
                        format!("bus[{i}].parity"),
                        format!("`{other}` is not allowed: use \"none\", \"even\" or \"odd\""),
                    );
                    Parity::None
                }
            };
            let data_bits = self.ranged(&format!("bus[{i}].data_bits"), r.data_bits.as_ref(), 8, 7, 8) as u8;
            let stop_bits = self.ranged(&format!("bus[{i}].stop_bits"), r.stop_bits.as_ref(), 1, 1, 2) as u8;
            let rs485 = r.rs485.as_ref().map(|raw| self.rs485(i, raw));
            return Transport::Serial {
                path: path.clone(),
                baud,
                parity,
                data_bits,
                stop_bits,
                rs485,
            };
        }
        if serial_only {
            self.issue(
                line,
                format!("bus[{i}]"),
                "baud, parity, data_bits and stop_bits are for serial buses only",
            );
        }
        if let Some(raw) = &r.rs485 {
            let line = self.at(raw);
            self.issue(
                line,
                format!("bus[{i}].rs485"),
                "rs485 is for serial buses only (an on-board UART whose RS-485 direction the kernel drives); \
                 a device server on tcp or rtu_over_tcp switches direction itself: remove rs485 here",
            );
        }
        let (addr, is_tcp) = match (&r.tcp, &r.rtu_over_tcp) {
            (Some(a), _) => (a.clone(), true),
            (None, Some(a)) => (a.clone(), false),
            (None, None) => (String::new(), true),
        };
        if kinds == 1 && !valid_host_port(&addr) {
            let key = if is_tcp { "tcp" } else { "rtu_over_tcp" };
            self.issue(
                line,
                format!("bus[{i}].{key}"),
                format!("`{addr}` is not host:port, e.g. \"192.168.1.20:502\""),
            );
        }
        if is_tcp {
            Transport::Tcp(addr)
        } else {
            Transport::RtuOverTcp(addr)
        }
    }

    /// `rs485 = { … }` of a serial bus: each problem at the line of its key; a value in error counts as
    /// its default.
    fn rs485(&mut self, i: usize, raw: &Spanned<RawTable>) -> Rs485 {
        let mut draft = Rs485Draft::default();
        // A clash of the two levels is reported at `rts_after_send` when it is given.
        let mut levels_line = self.at(raw);
        for (key, value) in raw.get_ref() {
            let line = self.at(value);
            if key == "rts_after_send" {
                levels_line = line;
            }
            if let Err(message) = draft.set(key, value.get_ref()) {
                self.issue(line, format!("bus[{i}].rs485.{key}"), message);
            }
        }
        match draft.finish() {
            Ok(rs485) => rs485,
            Err(message) => {
                self.issue(levels_line, format!("bus[{i}].rs485.rts_after_send"), message);
                Rs485::DEFAULT
            }
        }
    }
}

/// The keys of an `rs485` table (and of `fieldgate probe --rs485`).
const RS485_KEYS: &str = "rts_on_send, rts_after_send, delay_before_send, delay_after_send";

/// An `rs485` table as its keys come: each key is checked as it is set, the two RTS levels together at
/// the end (each defaults to the opposite of the other).
#[derive(Default)]
struct Rs485Draft {
    on_send: Option<bool>,
    after_send: Option<bool>,
    delay_before_send: Duration,
    delay_after_send: Duration,
}

impl Rs485Draft {
    /// One key and its value; an error says what is wrong and what is allowed.
    fn set(&mut self, key: &str, value: &toml::Value) -> Result<(), String> {
        // As written, without TOML's quotes: the CLI's values come through here too.
        let shown = || value.to_string().trim_matches('"').to_string();
        let level = || match value {
            toml::Value::Boolean(b) => Ok(Some(*b)),
            _ => Err(format!("`{}` is not true or false", shown())),
        };
        let delay = || match value {
            toml::Value::String(text) => rs485_delay(text),
            _ => Err(format!(
                "`{}` is not a duration: write it as text, e.g. \"2ms\"",
                shown()
            )),
        };
        match key {
            "rts_on_send" => self.on_send = level()?,
            "rts_after_send" => self.after_send = level()?,
            "delay_before_send" => self.delay_before_send = delay()?,
            "delay_after_send" => self.delay_after_send = delay()?,
            _ => return Err(format!("unknown key: the keys of rs485 are {RS485_KEYS}")),
        }
        Ok(())
    }

    /// The setting, once every key is in. Both levels given and equal is refused: the kernel needs two
    /// different levels and would silently replace them.
    fn finish(self) -> Result<Rs485, String> {
        let (rts_on_send, rts_after_send) = match (self.on_send, self.after_send) {
            (Some(on), Some(after)) if on == after => {
                return Err(format!(
                    "rts_on_send and rts_after_send are both {on}: RTS must be at one level while sending and at \
                     the other after (the kernel would silently use rts_on_send = true, rts_after_send = false \
                     instead); give opposite values, or only one of them (the other defaults to its opposite)"
                ))
            }
            (Some(on), after) => (on, after.unwrap_or(!on)),
            (None, Some(after)) => (!after, after),
            (None, None) => (Rs485::DEFAULT.rts_on_send, Rs485::DEFAULT.rts_after_send),
        };
        Ok(Rs485 {
            rts_on_send,
            rts_after_send,
            delay_before_send: self.delay_before_send,
            delay_after_send: self.delay_after_send,
        })
    }
}

/// An `rs485` delay: 0 to [`MAX_RS485_DELAY`] in whole milliseconds, the kernel's unit and limit.
fn rs485_delay(text: &str) -> Result<Duration, String> {
    let allowed = format!(
        "allowed 0ms to {}, in whole milliseconds (the kernel's unit and limit)",
        humantime::format_duration(MAX_RS485_DELAY)
    );
    match humantime::parse_duration(text.trim()) {
        Ok(d) if d > MAX_RS485_DELAY => Err(format!("`{text}` is out of range: {allowed}")),
        Ok(d) if d.subsec_nanos() % 1_000_000 != 0 => {
            Err(format!("`{text}` is not a whole number of milliseconds: {allowed}"))
        }
        Ok(d) => Ok(d),
        Err(_) => Err(format!(
            "`{text}` is not a duration: use a number with a unit, e.g. \"0ms\", \"2ms\" ({allowed})"
        )),
    }
}

/// `fieldgate probe --rs485 [KEY=VALUE,…]`: the keys of a bus's `rs485` table with the same defaults and
/// checks (`true`/`false` are the levels, anything else is text); empty text is `rs485 = {}` (RTS high
/// while sending, low after, no delays).
pub(crate) fn parse_rs485_option(text: &str) -> Result<Rs485, String> {
    let mut draft = Rs485Draft::default();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = part.split_once('=') else {
            return Err(format!("`{part}` is not KEY=VALUE (keys: {RS485_KEYS})"));
        };
        let (key, value) = (key.trim(), value.trim().trim_matches('"'));
        let value = match value {
            "true" => toml::Value::Boolean(true),
            "false" => toml::Value::Boolean(false),
            text => toml::Value::String(text.to_string()),
        };
        draft.set(key, &value).map_err(|e| format!("{key}: {e}"))?;
    }
    draft.finish()
}

/// t3.5 for a baud rate, as the Modbus serial line spec fixes it (1.75 ms above 19200). Also the gap
/// `fieldgate scan` keeps and counts in its timeout.
pub(crate) fn frame_gap_for(baud: u32) -> Duration {
    if baud > 19200 {
        Duration::from_micros(1750)
    } else {
        // 3.5 characters of 11 bits.
        Duration::from_micros((3.5 * 11.0 * 1_000_000.0 / f64::from(baud.max(1))).ceil() as u64)
    }
}

fn valid_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_gap_follows_the_serial_line_spec() {
        assert_eq!(frame_gap_for(9600), Duration::from_micros(4011));
        assert_eq!(frame_gap_for(115200), Duration::from_micros(1750));
    }

    #[test]
    fn host_port_needs_both_parts() {
        assert!(valid_host_port("10.0.0.1:502"));
        assert!(valid_host_port("gw.local:4001"));
        assert!(!valid_host_port("10.0.0.1"));
        assert!(!valid_host_port(":502"));
        assert!(!valid_host_port("a:0"));
    }
}

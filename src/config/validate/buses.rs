//! `[[bus]]`: a unique name, exactly one transport (Modbus TCP, a serial line with its framing, or
//! RTU over TCP) and the bus's timings, whose defaults follow the transport (the frame gap is t3.5
//! of the baud rate on a serial line).

use std::collections::HashSet;
use std::time::Duration;

use toml::Spanned;

use super::{Validator, MAX_BUS_TIMEOUT, MAX_FRAME_GAP, MAX_OFFLINE_AFTER, MAX_OFFLINE_RETRY, MAX_POLL_INTERVAL};
use crate::config::raw::RawBus;
use crate::config::types::{BusConfig, Parity, Transport};

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
            return Transport::Serial {
                path: path.clone(),
                baud,
                parity,
                data_bits,
                stop_bits,
            };
        }
        if serial_only {
            self.issue(
                line,
                format!("bus[{i}]"),
                "baud, parity, data_bits and stop_bits are for serial buses only",
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

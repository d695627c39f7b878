//! Values the TOML writes as text that are neither durations nor plain numbers: byte sizes
//! (`"64MiB"`) and UTC offsets (`"+08:00"`); and how a byte count is shown back (admin API,
//! `fieldgate status`). Pure functions: they return `None` for text they cannot read and leave the
//! report to the validator. Durations are read by the validator itself (`humantime`), because the
//! bound of each is part of its message.

use chrono::FixedOffset;

/// Parse a byte size: digits, then optionally a unit `B`, `kB`/`KB`, `KiB`, `MB`, `MiB`, `GB`, `GiB`
/// (any case; decimal units are powers of 1000, binary ones of 1024).
pub(crate) fn parse_byte_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: u64 = n.parse().ok()?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "kib" => 1 << 10,
        "mb" => 1000 * 1000,
        "mib" => 1 << 20,
        "gb" => 1000 * 1000 * 1000,
        "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(factor)
}

/// A byte count, short and readable in binary units: `512 B`, `12.3 MiB`, `64 MiB`, `3.1 GiB`.
pub(crate) fn format_byte_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = UNITS[0];
    for next in &UNITS[1..] {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    let text = format!("{value:.1}");
    format!("{} {unit}", text.strip_suffix(".0").unwrap_or(&text))
}

/// Parse `+08:00`, `-05:30`, `Z` or `UTC`.
pub(crate) fn parse_offset(s: &str) -> Option<FixedOffset> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("z") || s.eq_ignore_ascii_case("utc") {
        return FixedOffset::east_opt(0);
    }
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':')?;
    let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
    if !(0..=14).contains(&h) || !(0..60).contains(&m) {
        return None;
    }
    FixedOffset::east_opt(sign * (h * 3600 + m * 60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(format_byte_size(512), "512 B");
        assert_eq!(format_byte_size(64 << 20), "64 MiB");
        assert_eq!(format_byte_size(12_897_485), "12.3 MiB");
        assert_eq!(format_byte_size(3_328_599_655), "3.1 GiB");
        assert_eq!(format_byte_size(u64::MAX), "16384 PiB");
    }

    #[test]
    fn offsets_parse_in_the_forms_people_write() {
        assert_eq!(parse_offset("+08:00"), FixedOffset::east_opt(8 * 3600));
        assert_eq!(parse_offset("-05:30"), FixedOffset::east_opt(-(5 * 3600 + 1800)));
        assert_eq!(parse_offset("Z"), FixedOffset::east_opt(0));
        assert_eq!(parse_offset("8"), None);
        assert_eq!(parse_offset("+25:00"), None);
    }
}

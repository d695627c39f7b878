//! Decoding: how raw registers or bits read from a device become a number and the decimal string
//! written into BizData. The point's description ([`PointSpec`]) is the configuration's.
//!
//! Pure: no I/O. Decoding is total: a register slice of the wrong length is a [`DecodeError`], never a
//! panic, because the slice comes from a device. Rendering never writes exponent form or binary float
//! noise.
//!
//! Decoding and rendering run for every reading of every poll, so they avoid the heap where they can:
//! registers are ordered on the stack, and the usual reading (an integer times a power-of-ten scale) is
//! written by integer arithmetic instead of float formatting to a precision, which was the largest cost
//! of reading a meter after the wire. A proptest checks that both paths write the same text.

#[cfg(test)]
use crate::config::point::{decimals_of, Table};
use crate::config::point::{ByteOrder, PointSpec, ValueType, WordOrder};

/// A raw value read from a point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Raw {
    /// Integer types and bits.
    Int(i128),
    /// Float types.
    Float(f64),
}

/// The items read did not fit the point.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected {expected} items for the point, got {got}")]
pub(crate) struct DecodeError {
    /// Items the point needs.
    expected: usize,
    /// Items that were there.
    got: usize,
}

/// Decode a register value from exactly `spec.count()` registers.
pub(crate) fn decode_registers(spec: &PointSpec, words: &[u16]) -> Result<Raw, DecodeError> {
    let n = usize::from(spec.kind.registers());
    if words.len() != n {
        return Err(DecodeError {
            expected: n,
            got: words.len(),
        });
    }
    // At most four registers: ordered on the stack (this runs for every reading of every poll).
    let mut ordered = [0u16; 4];
    let ordered = &mut ordered[..n];
    for (o, w) in ordered.iter_mut().zip(words) {
        *o = match spec.byte_order {
            ByteOrder::Big => *w,
            ByteOrder::Little => w.swap_bytes(),
        };
    }
    if spec.word_order == WordOrder::Little {
        ordered.reverse();
    }
    let wide = ordered.iter().fold(0u64, |acc, w| (acc << 16) | u64::from(*w));
    Ok(match spec.kind {
        ValueType::U16 | ValueType::U32 | ValueType::U64 => Raw::Int(i128::from(wide)),
        ValueType::I16 => Raw::Int(i128::from(wide as u16 as i16)),
        ValueType::I32 => Raw::Int(i128::from(wide as u32 as i32)),
        ValueType::F32 => Raw::Float(f64::from(f32::from_bits(wide as u32))),
        ValueType::F64 => Raw::Float(f64::from_bits(wide)),
    })
}

/// The raw value as an integer for a valve state map (floats are refused by config validation; a
/// non-finite or fractional float maps to `None`).
pub(crate) fn as_state(raw: Raw) -> Option<i64> {
    match raw {
        Raw::Int(i) => i64::try_from(i).ok(),
        Raw::Float(f) if f.is_finite() && f.fract() == 0.0 => Some(f as i64),
        Raw::Float(_) => None,
    }
}

/// [`render_with`] with the point's own decimals.
#[cfg(test)]
fn render(spec: &PointSpec, raw: Raw) -> String {
    render_with(spec, raw, spec.render_decimals())
}

/// Render a raw value with the point's scale as the decimal string BizData carries: never exponent
/// form, never binary float noise. `decimals` is `spec.render_decimals()`, computed once by the caller
/// (the bus task renders every reading of every poll; deriving the decimals from the scale formats the
/// scale).
pub(crate) fn render_with(spec: &PointSpec, raw: Raw, decimals: Option<u32>) -> String {
    match (raw, spec.scale) {
        (Raw::Int(i), None) => match decimals {
            Some(d) if d > 0 => format!("{i}.{}", "0".repeat(d as usize)),
            _ => i.to_string(),
        },
        (Raw::Int(i), Some(scale)) => {
            let d = decimals.unwrap_or(0);
            shifted(i, scale, d).unwrap_or_else(|| fixed(i as f64 * scale, d))
        }
        (Raw::Float(f), scale) => {
            let v = f * scale.unwrap_or(1.0);
            match decimals {
                Some(d) => fixed(v, d),
                None if !v.is_finite() => v.to_string(),
                // Shortest representation that round-trips as f32 avoids `0.30000001192092896`.
                None if spec.kind == ValueType::F32 => (v as f32).to_string(),
                None => v.to_string(),
            }
        }
    }
}

fn fixed(v: f64, decimals: u32) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let s = format!("{:.*}", decimals as usize, v);
    // `-0.00` reads as a fault to a person; it is zero.
    if s.starts_with('-') && s[1..].chars().all(|c| c == '0' || c == '.') {
        s[1..].to_string()
    } else {
        s
    }
}

/// What [`fixed`] writes for `i × scale` with `decimals`, by integer arithmetic, in the usual case of
/// a scale that is the f64 of 10^-decimals (`0.01` in the config) and an integer below 2^40: then the
/// float product lies within far less than half a last decimal of i / 10^decimals, so rounding it to
/// `decimals` gives exactly that (a proptest checks it).
fn shifted(i: i128, scale: f64, decimals: u32) -> Option<String> {
    const TENTHS: [f64; 7] = [1.0, 0.1, 0.01, 0.001, 0.0001, 0.00001, 0.000001];
    let d = decimals as usize;
    let magnitude = u64::try_from(i.unsigned_abs()).ok().filter(|a| *a < 1 << 40)?;
    if TENTHS.get(d) != Some(&scale) {
        return None;
    }
    // The digits, on the stack (below 2^40: at most 13).
    let mut buf = [b'0'; 20];
    let mut start = buf.len();
    let mut rest = magnitude;
    loop {
        start -= 1;
        buf[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    // At least one digit before the point: 5 with two decimals is 0.05 (`buf` is zeros before).
    let start = start.min(buf.len() - (d + 1));
    let (whole, fraction) = buf[start..].split_at(buf.len() - start - d);
    let mut s = String::with_capacity(buf.len() - start + 2);
    if i < 0 {
        s.push('-');
    }
    // Only ASCII digits were written.
    s.push_str(std::str::from_utf8(whole).ok()?);
    if d > 0 {
        s.push('.');
        s.push_str(std::str::from_utf8(fraction).ok()?);
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: ValueType, word_order: WordOrder, byte_order: ByteOrder) -> PointSpec {
        PointSpec {
            table: Table::Holding,
            address: 0,
            kind,
            word_order,
            byte_order,
            scale: None,
            decimals: None,
        }
    }

    #[test]
    fn every_type_decodes_in_every_order() {
        use ByteOrder as B;
        use WordOrder as W;
        // 0x12345678 as ABCD, CDAB, BADC, DCBA.
        let cases = [
            (W::Big, B::Big, [0x1234, 0x5678]),
            (W::Little, B::Big, [0x5678, 0x1234]),
            (W::Big, B::Little, [0x3412, 0x7856]),
            (W::Little, B::Little, [0x7856, 0x3412]),
        ];
        for (w, b, regs) in cases {
            assert_eq!(
                decode_registers(&spec(ValueType::U32, w, b), &regs),
                Ok(Raw::Int(0x1234_5678)),
                "{w:?} {b:?}"
            );
        }
        assert_eq!(
            decode_registers(&spec(ValueType::U16, W::Big, B::Big), &[0xFFFF]),
            Ok(Raw::Int(65535))
        );
        assert_eq!(
            decode_registers(&spec(ValueType::I16, W::Big, B::Big), &[0xFFFF]),
            Ok(Raw::Int(-1))
        );
        assert_eq!(
            decode_registers(&spec(ValueType::I16, W::Big, B::Little), &[0x00FF]),
            Ok(Raw::Int(-256))
        );
        assert_eq!(
            decode_registers(&spec(ValueType::I32, W::Big, B::Big), &[0xFFFF, 0xFFFE]),
            Ok(Raw::Int(-2))
        );
        // 1.5f32 = 0x3FC00000
        assert_eq!(
            decode_registers(&spec(ValueType::F32, W::Big, B::Big), &[0x3FC0, 0x0000]),
            Ok(Raw::Float(1.5))
        );
        assert_eq!(
            decode_registers(&spec(ValueType::F32, W::Little, B::Big), &[0x0000, 0x3FC0]),
            Ok(Raw::Float(1.5))
        );
        assert_eq!(
            decode_registers(&spec(ValueType::U64, W::Big, B::Big), &[0x0001, 0x0002, 0x0003, 0x0004]),
            Ok(Raw::Int(0x0001_0002_0003_0004))
        );
        assert_eq!(
            decode_registers(
                &spec(ValueType::U64, W::Little, B::Big),
                &[0x0004, 0x0003, 0x0002, 0x0001]
            ),
            Ok(Raw::Int(0x0001_0002_0003_0004))
        );
        // -2.25f64 = 0xC002000000000000
        assert_eq!(
            decode_registers(&spec(ValueType::F64, W::Big, B::Big), &[0xC002, 0, 0, 0]),
            Ok(Raw::Float(-2.25))
        );
    }

    #[test]
    fn wrong_register_count_is_an_error_not_a_panic() {
        let s = spec(ValueType::U32, WordOrder::Big, ByteOrder::Big);
        assert_eq!(decode_registers(&s, &[1]), Err(DecodeError { expected: 2, got: 1 }));
        assert_eq!(
            decode_registers(&s, &[1, 2, 3]),
            Err(DecodeError { expected: 2, got: 3 })
        );
        assert_eq!(decode_registers(&s, &[]), Err(DecodeError { expected: 2, got: 0 }));
    }

    #[test]
    fn scale_renders_as_many_decimals_as_it_has_and_no_float_noise() {
        let mut s = spec(ValueType::U32, WordOrder::Big, ByteOrder::Big);
        s.scale = Some(0.01);
        assert_eq!(render(&s, Raw::Int(123_456)), "1234.56");
        assert_eq!(render(&s, Raw::Int(30)), "0.30");
        s.scale = Some(0.1);
        assert_eq!(render(&s, Raw::Int(3)), "0.3");
        s.scale = Some(10.0);
        assert_eq!(render(&s, Raw::Int(17)), "170");
        s.scale = None;
        assert_eq!(render(&s, Raw::Int(17)), "17");
        s.decimals = Some(3);
        assert_eq!(render(&s, Raw::Int(17)), "17.000");
        let mut f = spec(ValueType::F32, WordOrder::Big, ByteOrder::Big);
        assert_eq!(render(&f, Raw::Float(f64::from(0.3f32))), "0.3");
        assert_eq!(render(&f, Raw::Float(1e20)), "100000000000000000000");
        f.decimals = Some(2);
        assert_eq!(render(&f, Raw::Float(-0.001)), "0.00");
    }

    #[test]
    fn decimals_follow_the_scale() {
        assert_eq!(decimals_of(0.01), 2);
        assert_eq!(decimals_of(0.5), 1);
        assert_eq!(decimals_of(10.0), 0);
        assert_eq!(decimals_of(0.001), 3);
    }

    #[test]
    fn valve_states_come_from_integers() {
        assert_eq!(as_state(Raw::Int(1)), Some(1));
        assert_eq!(as_state(Raw::Float(2.0)), Some(2));
        assert_eq!(as_state(Raw::Float(2.5)), None);
    }

    #[test]
    fn shifted_integers_read_as_fixed_writes_them() {
        assert_eq!(shifted(123456, 0.01, 2).as_deref(), Some("1234.56"));
        assert_eq!(shifted(5, 0.01, 2).as_deref(), Some("0.05"));
        assert_eq!(shifted(-5, 0.001, 3).as_deref(), Some("-0.005"));
        assert_eq!(shifted(0, 0.1, 1).as_deref(), Some("0.0"));
        assert_eq!(shifted(-17, 1.0, 0).as_deref(), Some("-17"));
        // Not a power of ten, more decimals than the scale, or too large: the float path.
        assert_eq!(shifted(3, 0.5, 1), None);
        assert_eq!(shifted(3, 0.01, 3), None);
        assert_eq!(shifted(1 << 40, 0.01, 2), None);
    }

    proptest::proptest! {
        /// The integer path writes exactly what formatting the float product writes.
        #[test]
        fn shifted_equals_fixed(m in 0u64..(1 << 40), shift in 0u32..40, negative: bool, d in 0u32..=6) {
            // Magnitudes spread over every length, the short ones (zero padding) included.
            let i = i128::from(m >> shift) * if negative { -1 } else { 1 };
            let scale = [1.0, 0.1, 0.01, 0.001, 0.0001, 0.00001, 0.000001][d as usize];
            proptest::prop_assert_eq!(shifted(i, scale, d), Some(fixed(i as f64 * scale, d)));
        }
    }
}

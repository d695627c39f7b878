//! The stored form of a queued [`Record`]: what the outbox keeps on disk for each record, and
//! reading it back. A value in any other form (JSON included) is `Malformed`: the store sets it
//! aside. Reading never panics on bad bytes.
//!
//! Why not JSON: BizData is itself a JSON text, so a JSON record escapes every one of its quotes when
//! it is committed and unescapes them again each time the sender reads it; that escaping costs more
//! than anything else a commit does besides sled's own work. Here every string is stored as its
//! length and its bytes, copied, never escaped.
//!
//! Layout (integers big-endian): byte `1` (the format), id (u64), attempts (u32), rejections (u32),
//! then `event_name`, `meter_no`, `detected_at`, `from`, `to`, `biz_data`, each as a u32 length and
//! UTF-8 bytes, then `last_error` the same way, or the length `u32::MAX` for none. Nothing may
//! follow.

use crate::events::record::Record;

/// First byte of a record in this form.
const FORMAT: u8 = 1;
/// Length that stands for "no `last_error`".
const NONE: u32 = u32::MAX;

/// A value that is not a stored record: what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Malformed(String);

/// The fields of a stored record that choosing a batch needs; the rest (BizData above all) is not
/// copied.
#[derive(Debug)]
pub(crate) struct Head<'a> {
    pub(crate) id: u64,
    pub(crate) event_name: &'a str,
    pub(crate) meter_no: &'a str,
}

/// The stored form of `r`.
pub fn encode(r: &Record) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(r));
    encode_into(&mut out, r);
    out
}

/// Bytes of `r`'s stored form.
pub(crate) fn encoded_len(r: &Record) -> usize {
    17 + strings(r).iter().map(|s| 4 + s.len()).sum::<usize>() + 4 + r.last_error.as_ref().map_or(0, String::len)
}

/// Append `r`'s stored form to `out` (a buffer used again for each record of a commit).
pub(crate) fn encode_into(out: &mut Vec<u8>, r: &Record) {
    out.reserve(encoded_len(r));
    out.push(FORMAT);
    out.extend_from_slice(&r.id.to_be_bytes());
    out.extend_from_slice(&r.attempts.to_be_bytes());
    out.extend_from_slice(&r.rejections.to_be_bytes());
    for s in strings(r) {
        put_str(out, s);
    }
    match &r.last_error {
        Some(e) => put_str(out, e),
        None => out.extend_from_slice(&NONE.to_be_bytes()),
    }
}

fn strings(r: &Record) -> [&String; 6] {
    [&r.event_name, &r.meter_no, &r.detected_at, &r.from, &r.to, &r.biz_data]
}

/// Read a stored record back.
pub(crate) fn decode(v: &[u8]) -> Result<Record, Malformed> {
    let mut r = Reader::new(v)?;
    let record = Record {
        id: r.u64()?,
        attempts: r.u32()?,
        rejections: r.u32()?,
        event_name: r.string()?,
        meter_no: r.string()?,
        detected_at: r.string()?,
        from: r.string()?,
        to: r.string()?,
        biz_data: r.string()?,
        last_error: match r.len()? {
            NONE => None,
            n => Some(r.str_of(n)?.to_string()),
        },
    };
    r.end()?;
    Ok(record)
}

/// Read the [`Head`] of a stored record without copying its strings.
pub(crate) fn head(v: &[u8]) -> Result<Head<'_>, Malformed> {
    let mut r = Reader::new(v)?;
    let id = r.u64()?;
    r.take(8)?; // attempts, rejections
    Ok(Head {
        id,
        event_name: r.str()?,
        meter_no: r.str()?,
    })
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Our strings are far below 4 GiB (a record is bounded by `max_bytes`); saturate all the same.
    let n = u32::try_from(s.len()).unwrap_or(NONE - 1).min(NONE - 1);
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(&s.as_bytes()[..n as usize]);
}

/// Reads a stored record front to back; every read is checked, nothing panics on bad bytes.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// After the format byte; a value that does not start with it is not in this form.
    fn new(v: &'a [u8]) -> Result<Reader<'a>, Malformed> {
        match v.split_first() {
            Some((&FORMAT, rest)) => Ok(Reader { rest }),
            Some((first, _)) => Err(Malformed(format!(
                "not a stored record: first byte {first:#04x}, the format is {FORMAT:#04x}"
            ))),
            None => Err(Malformed("not a stored record: empty".into())),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        let (head, rest) = self
            .rest
            .split_at_checked(n)
            .ok_or_else(|| Malformed(format!("ends {} bytes early", n - self.rest.len())))?;
        self.rest = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, Malformed> {
        let b = self.take(4)?;
        <[u8; 4]>::try_from(b)
            .map(u32::from_be_bytes)
            .map_err(|_| Malformed("a length of 4 bytes that is not 4".into()))
    }

    fn u64(&mut self) -> Result<u64, Malformed> {
        let (hi, lo) = (self.u32()?, self.u32()?);
        Ok(u64::from(hi) << 32 | u64::from(lo))
    }

    fn len(&mut self) -> Result<u32, Malformed> {
        self.u32()
    }

    fn str_of(&mut self, n: u32) -> Result<&'a str, Malformed> {
        let bytes = self.take(n as usize)?;
        std::str::from_utf8(bytes).map_err(|e| Malformed(format!("not UTF-8: {e}")))
    }

    fn str(&mut self) -> Result<&'a str, Malformed> {
        let n = self.len()?;
        self.str_of(n)
    }

    fn string(&mut self) -> Result<String, Malformed> {
        self.str().map(str::to_string)
    }

    fn end(&self) -> Result<(), Malformed> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(Malformed(format!("{} bytes too many", self.rest.len())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record() -> impl Strategy<Value = Record> {
        let text = "[\\x00-\\x7f\"\\\\用户开阀{}]{0,40}";
        (
            any::<u64>(),
            (text, text, text, text, text, text),
            any::<u32>(),
            any::<u32>(),
            proptest::option::of(text),
        )
            .prop_map(
                |(id, (event_name, meter_no, detected_at, from, to, biz_data), attempts, rejections, last_error)| {
                    Record {
                        id,
                        event_name,
                        meter_no,
                        detected_at,
                        from,
                        to,
                        biz_data,
                        attempts,
                        rejections,
                        last_error,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn a_record_reads_back_as_it_was_stored(r in record()) {
            let v = encode(&r);
            prop_assert_eq!(v.len(), encoded_len(&r));
            prop_assert_eq!(decode(&v), Ok(r.clone()));
            let h = head(&v).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!((h.id, h.event_name, h.meter_no), (r.id, r.event_name.as_str(), r.meter_no.as_str()));
        }

        #[test]
        fn cut_or_lengthened_values_are_errors_not_panics(r in record(), cut in any::<prop::sample::Index>(), junk in any::<u8>()) {
            let v = encode(&r);
            let short = &v[..cut.index(v.len())];
            prop_assert!(decode(short).is_err());
            let mut long = v.clone();
            long.push(junk);
            prop_assert!(decode(&long).is_err());
        }

        #[test]
        fn arbitrary_bytes_after_the_format_byte_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut v = vec![FORMAT];
            v.extend(tail);
            let _ = decode(&v);
            let _ = head(&v);
        }
    }

    #[test]
    fn the_layout_is_as_documented() {
        let r = Record {
            id: 0x0102,
            event_name: "开".into(),
            meter_no: "M1".into(),
            detected_at: String::new(),
            from: String::new(),
            to: String::new(),
            biz_data: "{}".into(),
            attempts: 3,
            rejections: 1,
            last_error: None,
        };
        let mut want = vec![1, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 3, 0, 0, 0, 1];
        want.extend([0, 0, 0, 3]);
        want.extend("开".as_bytes());
        want.extend([0, 0, 0, 2, b'M', b'1']);
        want.extend([0; 12]);
        want.extend([0, 0, 0, 2, b'{', b'}']);
        want.extend([255; 4]);
        assert_eq!(encode(&r), want);
    }
}

//! The raw form: the serde structs exactly as the TOML is written. Unknown keys are refused
//! (`deny_unknown_fields`, so a misspelt key is an error, not a silent default) and the values an
//! issue may be reported at keep their span (`Spanned`), so the validator can name the line (the
//! `rs485` and `fields` tables are read as plain tables, [`RawTable`]: the validator checks their
//! keys). Nothing here checks a value: that is the validator's job (`validate/`).

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) site: Spanned<RawSite>,
    pub(super) panda: Spanned<RawPanda>,
    #[serde(default)]
    pub(super) admin: Option<Spanned<RawAdmin>>,
    #[serde(default)]
    pub(super) outbox: Option<Spanned<RawOutbox>>,
    #[serde(default)]
    pub(super) bus: Vec<Spanned<RawBus>>,
    #[serde(default)]
    pub(super) profile: BTreeMap<String, Spanned<RawProfile>>,
    #[serde(default)]
    pub(super) meter: Vec<Spanned<RawMeter>>,
    #[serde(default)]
    pub(super) event: Vec<Spanned<RawEvent>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSite {
    pub(super) name: String,
    pub(super) state_dir: String,
    pub(super) mapping: String,
    #[serde(default)]
    pub(super) timezone: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPanda {
    pub(super) base_url: String,
    pub(super) project: String,
    #[serde(default)]
    pub(super) auth: Option<String>,
    #[serde(default)]
    pub(super) username: Option<String>,
    #[serde(default)]
    pub(super) password: Option<String>,
    #[serde(default)]
    pub(super) password_file: Option<String>,
    pub(super) user_id: i64,
    #[serde(default)]
    pub(super) to_user_ids: String,
    #[serde(default)]
    pub(super) opinion: String,
    #[serde(default)]
    pub(super) timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) max_batch: Option<Spanned<i64>>,
    #[serde(default)]
    pub(super) retry_min: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) max_backoff: Option<Spanned<String>>,
    /// The old name of `max_backoff`, still accepted.
    #[serde(default)]
    pub(super) retry_max: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) refresh_before: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    #[serde(default)]
    pub(super) listen: Option<String>,
    #[serde(default)]
    pub(super) allow_remote: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutbox {
    #[serde(default)]
    pub(super) max_records: Option<Spanned<i64>>,
    #[serde(default)]
    pub(super) max_bytes: Option<Spanned<i64>>,
    #[serde(default)]
    pub(super) dead_after: Option<Spanned<i64>>,
    #[serde(default)]
    pub(super) min_free: Option<Spanned<RawByteSize>>,
    #[serde(default)]
    pub(super) max_dead: Option<Spanned<i64>>,
}

/// A byte size as written in the TOML: a number of bytes, or text with a unit (`"64MiB"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawByteSize {
    Bytes(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBus {
    pub(super) name: String,
    #[serde(default)]
    pub(super) tcp: Option<String>,
    #[serde(default)]
    pub(super) serial: Option<String>,
    #[serde(default)]
    pub(super) rtu_over_tcp: Option<String>,
    #[serde(default)]
    pub(super) baud: Option<Spanned<i64>>,
    #[serde(default)]
    pub(super) parity: Option<String>,
    #[serde(default)]
    pub(super) data_bits: Option<Spanned<i64>>,
    #[serde(default)]
    pub(super) stop_bits: Option<Spanned<i64>>,
    #[serde(default)]
    pub(super) poll_interval: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) offline_after: Option<Spanned<i64>>,
    #[serde(default)]
    pub(super) offline_retry: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) frame_gap: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) guard: Option<Spanned<String>>,
    /// `rs485 = { rts_on_send = true, … }`, read as a plain table (keys checked by the validator): the
    /// same type as `[[event]] fields`, so no second TOML deserializer is compiled in (the binary's size
    /// bound, BENCHMARKS.md row 7).
    #[serde(default)]
    pub(super) rs485: Option<Spanned<RawTable>>,
}

/// An inline table read as it is written: keys to values, each value with its span.
pub(super) type RawTable = BTreeMap<String, Spanned<toml::Value>>;

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPoint {
    pub(super) table: String,
    pub(super) address: Spanned<i64>,
    #[serde(default, rename = "type")]
    pub(super) kind: Option<String>,
    #[serde(default)]
    pub(super) word_order: Option<String>,
    #[serde(default)]
    pub(super) byte_order: Option<String>,
    #[serde(default)]
    pub(super) scale: Option<f64>,
    #[serde(default)]
    pub(super) decimals: Option<Spanned<i64>>,
    #[serde(default)]
    pub(super) states: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub(super) field: Option<String>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProfile {
    #[serde(default)]
    pub(super) valve: Option<RawPoint>,
    #[serde(default)]
    pub(super) readings: Option<Vec<RawPoint>>,
    #[serde(default)]
    pub(super) confirm: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMeter {
    pub(super) meter_no: String,
    pub(super) bus: String,
    pub(super) unit: Spanned<i64>,
    #[serde(default)]
    pub(super) profile: Option<String>,
    #[serde(default)]
    pub(super) valve: Option<RawPoint>,
    #[serde(default)]
    pub(super) readings: Option<Vec<RawPoint>>,
    #[serde(default)]
    pub(super) confirm: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEvent {
    pub(super) name: String,
    pub(super) point: Spanned<String>,
    #[serde(default)]
    pub(super) to: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) from: Option<Spanned<String>>,
    #[serde(default, rename = "for")]
    pub(super) after: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) field: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) below: Option<Spanned<f64>>,
    #[serde(default)]
    pub(super) above: Option<Spanned<f64>>,
    #[serde(default)]
    pub(super) rearm: Option<Spanned<f64>>,
    #[serde(default)]
    pub(super) rises_by: Option<Spanned<f64>>,
    #[serde(default)]
    pub(super) while_valve: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) fields: Option<Spanned<RawTable>>,
}

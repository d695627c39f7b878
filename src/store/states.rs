//! Meter states: what is kept about each meter under `s` + its number ([`StoredState`], JSON), and
//! reading it back. A state is written only together with the records it produced (see
//! [`Store::commit`]); a state that does not decode is set aside and the meter starts from a baseline.
//!
//! Why a state is written by hand: in its usual form (a valve and nothing else) it is written here
//! directly, byte for byte as serde_json writes it (a proptest checks it), because serde's escaper,
//! going byte by byte, is a large part of a commit's own work.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{decode, state_key, Store, StoreError};
use crate::clock::BootStamp;
use crate::events::detect::RuleMemory;
use crate::events::record::json_str;

/// What is persisted about one meter: the last accepted state of its valve, its link, and the
/// memory of every `[[event]]` rule for it. Committed together with the records it produced.
///
/// Format (JSON): `{"raw", "label", "since"}`, plus optional keys written only when set and read as
/// their defaults when absent: `valve_unknown`, `offline_since`, `back_since`, `offline_boot`,
/// `back_boot`, `rules`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredState {
    /// Raw value read.
    pub raw: i64,
    /// Its label.
    pub label: String,
    /// When it was accepted (RFC 3339).
    pub since: String,
    /// True while the valve was never read: the entry exists only to keep link memory (the meter was
    /// offline from the start); `raw`, `label` and `since` are placeholders and the first sample
    /// is the valve's baseline.
    #[serde(default, skip_serializing_if = "is_false")]
    pub valve_unknown: bool,
    /// Since when the meter counts as offline (after `offline_after` failed reads); `None` = online.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_since: Option<DateTime<Utc>>,
    /// When the meter answered again after an outage that `在线` rules report; `None` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub back_since: Option<DateTime<Utc>>,
    /// `offline_since` on the boot clock: what a `for` is measured with (the wall-clock time above is
    /// a label and the stretch's identity only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_boot: Option<BootStamp>,
    /// `back_since` on the boot clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub back_boot: Option<BootStamp>,
    /// Memory of each event rule, by `crate::config::EventRule::key`. Rules no longer configured
    /// are dropped on the next write.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rules: BTreeMap<String, RuleMemory>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Store {
    /// The last accepted state of a meter. A state that does not decode is set aside (listed by
    /// [`Store::corrupt`]) and the meter starts again from no state: its next sample is a baseline.
    pub fn state(&self, meter_no: &str) -> Result<Option<StoredState>, StoreError> {
        let key = state_key(meter_no);
        let open = self.handle()?;
        let Some(v) = open.store.get(&key).map_err(|e| self.db_error(&open, e))? else {
            return Ok(None);
        };
        match decode("state", meter_no, &v) {
            Ok(st) => Ok(Some(st)),
            Err(e) => {
                self.set_aside(&key, &v, &e)?;
                Ok(None)
            }
        }
    }
}

/// Write the stored form of a meter's state into `out` (emptied first; a commit writes every state
/// through one buffer): its JSON, exactly as serde_json writes it. The usual state (a valve and
/// nothing else) is written here directly, byte for byte the same (module docs).
pub(super) fn encode_state_into(out: &mut String, st: &StoredState) {
    out.clear();
    if st.offline_since.is_some()
        || st.back_since.is_some()
        || st.offline_boot.is_some()
        || st.back_boot.is_some()
        || !st.rules.is_empty()
    {
        // Serialising our own plain struct to JSON cannot fail (no maps with non-string keys).
        out.push_str(&serde_json::to_string(st).unwrap_or_default());
        return;
    }
    out.reserve(48 + st.label.len() + st.since.len());
    out.push_str("{\"raw\":");
    // Writing into a String cannot fail.
    let _ = write!(out, "{}", st.raw);
    out.push_str(",\"label\":");
    json_str(out, &st.label);
    out.push_str(",\"since\":");
    json_str(out, &st.since);
    if st.valve_unknown {
        out.push_str(",\"valve_unknown\":true");
    }
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::encode;

    #[test]
    fn a_state_written_before_event_rules_still_loads() {
        let old: StoredState =
            serde_json::from_str(r#"{"raw":1,"label":"开启","since":"2026-01-01T08:00:00+08:00"}"#).unwrap();
        assert_eq!(
            (old.raw, old.valve_unknown, old.offline_since, old.rules.len()),
            (1, false, None, 0)
        );
        assert_eq!(
            String::from_utf8(encode(&old)).unwrap(),
            r#"{"raw":1,"label":"开启","since":"2026-01-01T08:00:00+08:00"}"#,
            "nothing new is written while the new parts are empty"
        );
    }

    proptest::proptest! {
        /// A state is stored exactly as serde_json writes it, whichever path writes it.
        #[test]
        fn a_state_is_stored_as_serde_writes_it(
            raw in proptest::prelude::any::<i64>(),
            label in ".{0,12}",
            since in "[-0-9T:+\"\\\\\n\u{1}a-z]{0,30}",
            valve_unknown in proptest::prelude::any::<bool>(),
            offline in proptest::prelude::any::<bool>(),
            rule in proptest::prelude::any::<bool>(),
        ) {
            let mut st = StoredState { raw, label, since, valve_unknown, ..StoredState::default() };
            if offline {
                st.offline_since = Some(DateTime::from_timestamp(1_700_000_000, 5).unwrap_or_default());
            }
            if rule {
                st.rules.insert("r".into(), RuleMemory { fired: true, ..RuleMemory::default() });
            }
            proptest::prop_assert_eq!(
                {
                    let mut text = String::new();
                    encode_state_into(&mut text, &st);
                    text
                },
                String::from_utf8(serde_json::to_vec(&st).unwrap()).unwrap()
            );
        }
    }
}

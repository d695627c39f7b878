//! A queued work order: what the outbox stores and the sender delivers.
//!
//! BizData is rendered once, when the transition is detected, and stored with the record, so a later
//! mapping change never rewrites a record already queued. A record's id is fixed at detection and
//! follows it through logs, the admin API and dead letters.

use serde::{Deserialize, Serialize};

use crate::mapping::METER_COLUMN;

/// The BizData key of the valve's new state.
pub const VALVE_STATE_KEY: &str = "阀门当前状态";

/// One work order waiting for delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Stable id (monotonic across restarts; ordering key in the outbox).
    pub id: u64,
    /// `eventName`.
    pub event_name: String,
    /// The meter whose valve moved.
    pub meter_no: String,
    /// When the transition was detected, RFC 3339 in the site's zone.
    pub detected_at: String,
    /// The label before.
    pub from: String,
    /// The label after.
    pub to: String,
    /// `FlowDatas[].BizData`: a JSON object serialised to a string.
    pub biz_data: String,
    /// Delivery attempts that failed so far, for any reason (network, login, rejection).
    #[serde(default)]
    pub attempts: u32,
    /// Of those, how often the server refused this record *alone* (`code != 0` for a request carrying
    /// only it). Only these count towards dead-lettering: an outage never kills a record.
    #[serde(default)]
    pub rejections: u32,
    /// Why the last attempt failed.
    #[serde(default)]
    pub last_error: Option<String>,
}

/// Render BizData: every column of the meter's mapping row in header order, then `水表表号`
/// (if the row lacks it), `阀门当前状态`, then one key per reading. All values are strings.
pub fn render_biz_data<'a>(
    row: &[(&str, &str)],
    meter_no: &str,
    state: &str,
    readings: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> String {
    let mut obj = serde_json::Map::new();
    for (k, v) in row {
        obj.insert((*k).to_string(), serde_json::Value::String((*v).to_string()));
    }
    obj.insert(METER_COLUMN.to_string(), meter_no.into());
    obj.insert(VALVE_STATE_KEY.to_string(), state.into());
    for (k, v) in readings {
        obj.insert(k.to_string(), v.into());
    }
    serde_json::Value::Object(obj).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn biz_data_keeps_mapping_order_and_adds_state_and_readings() {
        let row = [("用户编号", "U1"), ("水表表号", "M1"), ("用户名称", "张三")];
        let s = render_biz_data(&row, "M1", "开启", [("累计流量", "12.30")]);
        assert_eq!(
            s,
            r#"{"用户编号":"U1","水表表号":"M1","用户名称":"张三","阀门当前状态":"开启","累计流量":"12.30"}"#
        );
    }
}

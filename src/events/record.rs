//! A work order: its draft as the recorder makes it ([`Draft`]), the queued record the store keeps and
//! the sender delivers ([`Record`]), and its BizData.
//!
//! BizData is rendered once, when the event is detected, and stored with the record, so a later
//! mapping change never rewrites a record already queued. A record's id is fixed at detection and
//! follows it through logs, the admin API and dead letters. Pure: no I/O.
//!
//! BizData is rendered for every record at the rate transitions are detected, so it is written by
//! hand, from a template prepared once per meter and rule (`BizTemplate`), and strings that need no
//! escaping are copied as they are (serde_json's escaper goes byte by byte). The
//! property tests check every rendering against a serde_json map.

use serde::{Deserialize, Serialize};

use crate::config::mapping::{METER_COLUMN, VALVE_STATE_KEY};

/// A record before it has an id.
#[derive(Debug, Clone)]
pub struct Draft {
    /// `eventName`.
    pub event_name: String,
    /// When detected (RFC 3339).
    pub detected_at: String,
    /// Label before.
    pub from: String,
    /// Label after.
    pub to: String,
    /// Rendered BizData.
    pub biz_data: String,
}

/// One work order waiting for delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Stable id (monotonic across restarts; ordering key in the outbox).
    pub id: u64,
    /// `eventName`.
    pub event_name: String,
    /// The meter the event is about.
    pub meter_no: String,
    /// When the transition was detected, RFC 3339 in the site's zone.
    pub detected_at: String,
    /// Before: the valve label before (valve events), the link before (`在线`/`离线`), the
    /// baseline reading (`rises_by`), or `""` (thresholds). For logs and the admin API; not sent.
    pub from: String,
    /// After: the new valve label, the new link, or `<field>=<value>` for reading events.
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
    row: &[(&'a str, &'a str)],
    meter_no: &'a str,
    state: &'a str,
    readings: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> String {
    render_event_biz_data(row, meter_no, state, readings, &[])
}

/// [`render_biz_data`], then the event's fixed `fields` (config keeps them from clashing with the
/// keys before).
pub(crate) fn render_event_biz_data<'a>(
    row: &[(&'a str, &'a str)],
    meter_no: &'a str,
    state: &'a str,
    readings: impl IntoIterator<Item = (&'a str, &'a str)>,
    extra: &'a [(String, String)],
) -> String {
    let (fields, values): (Vec<&str>, Vec<&str>) = readings.into_iter().unzip();
    // One value per field by construction, so the template always renders.
    BizTemplate::new(row, meter_no, &fields, extra)
        .render(state, &values)
        .unwrap_or_default()
}

/// The BizData of one meter and one event rule, prepared once: every key's place decided, keys and
/// fixed values (mapping cells, meter number, the rule's fields) already written as JSON. A record
/// then only adds its valve state and readings; the recorder keeps one per meter and rule, and
/// [`render_event_biz_data`] is a template used once.
#[derive(Debug, Clone)]
pub(crate) struct BizTemplate {
    parts: Vec<Part>,
    readings: usize,
    /// Bytes of the fixed text.
    fixed: usize,
}

#[derive(Debug, Clone)]
enum Part {
    /// JSON text written as it is.
    Text(Box<str>),
    /// The valve's state, as a JSON string.
    Valve,
    /// Reading `i`, as a JSON string.
    Reading(usize),
}

impl BizTemplate {
    /// The template of [`render_event_biz_data`] for this `row`, `meter_no`, reading `fields` (in the
    /// order their values will come) and the rule's `extra` fields.
    pub(crate) fn new(
        row: &[(&str, &str)],
        meter_no: &str,
        fields: &[&str],
        extra: &[(String, String)],
    ) -> BizTemplate {
        enum Value<'a> {
            Fixed(&'a str),
            Valve,
            Reading(usize),
        }
        // A key given twice keeps its first place and its last value (a JSON object has each key once).
        let mut keys: Vec<(&str, Value)> = Vec::with_capacity(row.len() + fields.len() + extra.len() + 2);
        let mut put = |k, v| match keys.iter_mut().find(|(key, _)| *key == k) {
            Some(field) => field.1 = v,
            None => keys.push((k, v)),
        };
        row.iter().for_each(|&(k, v)| put(k, Value::Fixed(v)));
        put(METER_COLUMN, Value::Fixed(meter_no));
        put(VALVE_STATE_KEY, Value::Valve);
        fields.iter().enumerate().for_each(|(i, k)| put(k, Value::Reading(i)));
        extra.iter().for_each(|(k, v)| put(k, Value::Fixed(v)));
        let mut parts = Vec::new();
        let mut text = String::from("{");
        for (i, (k, v)) in keys.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            json_str(&mut text, k);
            text.push(':');
            let part = match v {
                Value::Fixed(s) => {
                    json_str(&mut text, s);
                    continue;
                }
                Value::Valve => Part::Valve,
                Value::Reading(i) => Part::Reading(*i),
            };
            parts.push(Part::Text(std::mem::take(&mut text).into_boxed_str()));
            parts.push(part);
        }
        text.push('}');
        parts.push(Part::Text(text.into_boxed_str()));
        let fixed = parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => t.len(),
                _ => 0,
            })
            .sum();
        BizTemplate {
            parts,
            readings: fields.len(),
            fixed,
        }
    }

    /// The BizData with `valve_state` and one value per reading field; `None` if `readings` has another
    /// length.
    fn render(&self, valve_state: &str, readings: &[impl AsRef<str>]) -> Option<String> {
        let mut out = String::new();
        self.render_into(&mut out, valve_state, readings).then_some(out)
    }

    /// [`BizTemplate::render`] into `out` (emptied first, its capacity kept); false if `readings` has
    /// another length.
    pub(crate) fn render_into(&self, out: &mut String, valve_state: &str, readings: &[impl AsRef<str>]) -> bool {
        out.clear();
        if readings.len() != self.readings {
            return false;
        }
        let dynamic =
            valve_state.len() + readings.iter().map(|r| r.as_ref().len()).sum::<usize>() + 2 * (readings.len() + 1);
        out.reserve(self.fixed + dynamic);
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Valve => json_str(out, valve_state),
                Part::Reading(i) => match readings.get(*i) {
                    Some(r) => json_str(out, r.as_ref()),
                    None => return false,
                },
            }
        }
        true
    }
}

/// Append `s` as a JSON string, escaped exactly as serde_json escapes it.
pub(crate) fn json_str(out: &mut String, s: &str) {
    // Mapping cells, meter numbers and readings almost never need escaping: copy those as they are
    // (module doc).
    if !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.reserve(s.len() + 2);
        out.push('"');
        out.push_str(s);
        out.push('"');
        return;
    }
    // Serialising a &str cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy;

    #[test]
    fn biz_data_keeps_mapping_order_and_adds_state_and_readings() {
        let row = [("用户编号", "U1"), ("水表表号", "M1"), ("用户名称", "张三")];
        let s = render_biz_data(&row, "M1", "开启", [("累计流量", "12.30")]);
        assert_eq!(
            s,
            r#"{"用户编号":"U1","水表表号":"M1","用户名称":"张三","阀门当前状态":"开启","累计流量":"12.30"}"#
        );
    }

    #[test]
    fn an_events_fixed_fields_come_last() {
        let extra = [("事件说明".to_string(), "电池电压低于3.3V".to_string())];
        let s = render_event_biz_data(&[("水表表号", "M1")], "M1", "关闭", [("电池电压", "3.29")], &extra);
        assert_eq!(
            s,
            r#"{"水表表号":"M1","阀门当前状态":"关闭","电池电压":"3.29","事件说明":"电池电压低于3.3V"}"#
        );
    }

    /// The renderer before it wrote JSON by hand: a serde_json map (with `preserve_order`).
    fn oracle(
        row: &[(String, String)],
        meter_no: &str,
        state: &str,
        readings: &[(String, String)],
        extra: &[(String, String)],
    ) -> String {
        let mut obj = serde_json::Map::new();
        for (k, v) in row {
            obj.insert(k.clone(), v.as_str().into());
        }
        obj.insert(METER_COLUMN.to_string(), meter_no.into());
        obj.insert(VALVE_STATE_KEY.to_string(), state.into());
        for (k, v) in readings.iter().chain(extra) {
            obj.insert(k.clone(), v.as_str().into());
        }
        serde_json::Value::Object(obj).to_string()
    }

    fn pairs() -> impl proptest::strategy::Strategy<Value = Vec<(String, String)>> {
        // Keys from a small set so that repeats (a reading named like a mapping column) are common;
        // values with quotes, backslashes, control characters and CJK.
        let key = proptest::sample::select(vec!["用户编号", "水表表号", "阀门当前状态", "a", "b\"c", "累计流量"]);
        proptest::collection::vec(
            (key.prop_map(str::to_string), "[\\x00-\\x1f\"\\\\a-z用户\\u{7f}]{0,6}"),
            0..6,
        )
    }

    proptest::proptest! {
        #[test]
        fn a_template_renders_what_the_renderer_renders(
            row in pairs(), readings in pairs(), extra in pairs(), meter in "[M0-9\"]{0,4}", state in "[开关\\\\]{0,3}"
        ) {
            let cells: Vec<(&str, &str)> = row.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let fields: Vec<&str> = readings.iter().map(|(k, _)| k.as_str()).collect();
            let values: Vec<String> = readings.iter().map(|(_, v)| v.clone()).collect();
            let t = BizTemplate::new(&cells, &meter, &fields, &extra);
            // `render_event_biz_data` is itself a template now: compare with the JSON map's rendering.
            let want = oracle(&row, &meter, &state, &readings, &extra);
            proptest::prop_assert_eq!(t.render(&state, &values), Some(want));
            let mut more = values.clone();
            more.push("1".into());
            proptest::prop_assert_eq!(t.render(&state, &more), None);
        }

        #[test]
        fn biz_data_is_what_a_json_map_renders(
            row in pairs(), readings in pairs(), extra in pairs(), meter in "[M0-9\"]{0,4}", state in "[开关\\\\]{0,3}"
        ) {
            let cells: Vec<(&str, &str)> = row.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let got = render_event_biz_data(&cells, &meter, &state, readings.iter().map(|(k, v)| (k.as_str(), v.as_str())), &extra);
            proptest::prop_assert_eq!(got, oracle(&row, &meter, &state, &readings, &extra));
        }
    }
}

//! `[[event]]`: each rule's kind (`point = "valve" | "link" | "reading"`), the keys that kind takes,
//! the valve labels and reading fields it names (they must exist on some meter), its threshold or
//! rise, its fixed BizData `fields`, and the key that identifies its persisted memory.

use std::collections::BTreeMap;
use std::time::Duration;

use toml::Spanned;

use super::{Validator, MAX_LINK_FOR};
use crate::config::mapping::Mapping;
use crate::config::raw::RawEvent;
use crate::config::types::{EventKind, EventRule, MeterConfig, Side, Threshold, OFFLINE, ONLINE};

impl Validator<'_> {
    pub(super) fn events(
        &mut self,
        raw: &[Spanned<RawEvent>],
        meters: &[MeterConfig],
        mapping: &Mapping,
    ) -> Vec<EventRule> {
        let labels: BTreeMap<&str, ()> = meters
            .iter()
            .flat_map(|m| m.valve.states.values())
            .map(|l| (l.as_str(), ()))
            .collect();
        let known: Vec<&str> = labels.keys().copied().collect();
        let read: BTreeMap<&str, ()> = meters
            .iter()
            .flat_map(|m| m.readings.iter())
            .map(|r| (r.field.as_str(), ()))
            .collect();
        let read_known: Vec<&str> = read.keys().copied().collect();
        let mut out = Vec::new();
        for (i, e) in raw.iter().enumerate() {
            let line = self.at(e);
            let r = e.get_ref();
            let f = |k: &str| format!("event[{i}].{k}");
            if r.name.trim().is_empty() {
                self.issue(line, f("name"), "must not be empty (it is the Panda eventName)");
            }
            let point = r.point.get_ref().as_str();
            // Keys each point kind takes; any other key given is an error naming the kind.
            let allowed: &[&str] = match point {
                "valve" => &["to", "from"],
                "link" => &["to", "for"],
                "reading" => &["field", "below", "above", "rearm", "rises_by", "while_valve"],
                other => {
                    let l = self.at(&r.point);
                    self.issue(
                        l,
                        f("point"),
                        format!("`{other}` is not allowed: use \"valve\", \"link\" or \"reading\""),
                    );
                    continue;
                }
            };
            let given: [(&str, Option<usize>); 9] = [
                ("to", r.to.as_ref().map(|v| self.at(v))),
                ("from", r.from.as_ref().map(|v| self.at(v))),
                ("for", r.after.as_ref().map(|v| self.at(v))),
                ("field", r.field.as_ref().map(|v| self.at(v))),
                ("below", r.below.as_ref().map(|v| self.at(v))),
                ("above", r.above.as_ref().map(|v| self.at(v))),
                ("rearm", r.rearm.as_ref().map(|v| self.at(v))),
                ("rises_by", r.rises_by.as_ref().map(|v| self.at(v))),
                ("while_valve", r.while_valve.as_ref().map(|v| self.at(v))),
            ];
            let mut wrong_key = false;
            for (key, at) in given {
                if let Some(l) = at {
                    if !allowed.contains(&key) {
                        wrong_key = true;
                        self.issue(
                            l,
                            f(key),
                            format!(
                                "`{key}` does not apply to point = \"{point}\"; it takes: {}",
                                allowed.join(", ")
                            ),
                        );
                    }
                }
            }
            let fields = self.event_fields(i, r, meters, mapping);
            let kind = match point {
                "valve" => self.valve_event(i, line, r, &labels, &known),
                "link" => self.link_event(i, line, r),
                _ => self.reading_event(i, line, r, &labels, &known, &read, &read_known),
            };
            let (Some(kind), false) = (kind, wrong_key) else {
                continue;
            };
            let key = rule_key(&r.name, &kind);
            out.push(EventRule {
                name: r.name.clone(),
                kind,
                fields,
                key,
            });
        }
        out
    }

    /// A required label key (`to`) or an optional one (`from`, `while_valve`) naming a valve label.
    fn valve_label(
        &mut self,
        line: usize,
        field: String,
        v: Option<&Spanned<String>>,
        labels: &BTreeMap<&str, ()>,
        known: &[&str],
    ) -> Option<String> {
        let v = v?;
        let label = v.get_ref();
        if !labels.contains_key(label.as_str()) && !label.starts_with("未知(") {
            let l = self.at(v).max(line);
            self.issue(
                l,
                field,
                format!(
                    "no valve can take the label `{label}`; labels in use: {}",
                    known.join(", ")
                ),
            );
        }
        Some(label.clone())
    }

    fn valve_event(
        &mut self,
        i: usize,
        line: usize,
        r: &RawEvent,
        labels: &BTreeMap<&str, ()>,
        known: &[&str],
    ) -> Option<EventKind> {
        let to = self.valve_label(line, format!("event[{i}].to"), r.to.as_ref(), labels, known);
        let from = self.valve_label(line, format!("event[{i}].from"), r.from.as_ref(), labels, known);
        let Some(to) = to else {
            self.issue(
                line,
                format!("event[{i}].to"),
                "a valve event needs to = \"<valve label>\", e.g. to = \"开启\"",
            );
            return None;
        };
        Some(EventKind::Valve { to, from })
    }

    fn link_event(&mut self, i: usize, line: usize, r: &RawEvent) -> Option<EventKind> {
        let online = match r.to.as_ref().map(|t| (self.at(t), t.get_ref().as_str())) {
            Some((_, OFFLINE)) => false,
            Some((_, ONLINE)) => true,
            Some((l, other)) => {
                self.issue(
                    l,
                    format!("event[{i}].to"),
                    format!("`{other}` is not allowed for a link event: use \"{OFFLINE}\" or \"{ONLINE}\""),
                );
                return None;
            }
            None => {
                self.issue(
                    line,
                    format!("event[{i}].to"),
                    format!("a link event needs to = \"{OFFLINE}\" or to = \"{ONLINE}\""),
                );
                return None;
            }
        };
        let after = self.duration(
            &format!("event[{i}].for"),
            r.after.as_ref(),
            Duration::ZERO,
            MAX_LINK_FOR,
        );
        Some(EventKind::Link { online, after })
    }

    #[allow(clippy::too_many_arguments)]
    fn reading_event(
        &mut self,
        i: usize,
        line: usize,
        r: &RawEvent,
        labels: &BTreeMap<&str, ()>,
        known: &[&str],
        read: &BTreeMap<&str, ()>,
        read_known: &[&str],
    ) -> Option<EventKind> {
        let f = |k: &str| format!("event[{i}].{k}");
        let Some(field_v) = &r.field else {
            self.issue(
                line,
                f("field"),
                "a reading event needs field = \"<reading field>\", e.g. field = \"电池电压\"",
            );
            return None;
        };
        let field = field_v.get_ref().clone();
        let mut ok = true;
        if !read.contains_key(field.as_str()) {
            let l = self.at(field_v);
            self.issue(
                l,
                f("field"),
                format!(
                    "no meter reads a field `{field}`; readings configured: {}",
                    if read_known.is_empty() {
                        "none".to_string()
                    } else {
                        read_known.join(", ")
                    }
                ),
            );
            ok = false;
        }
        let finite = |this: &mut Self, key: &str, v: &Spanned<f64>| -> bool {
            if v.get_ref().is_finite() {
                true
            } else {
                let l = this.at(v);
                this.issue(l, f(key), "must be a finite number");
                false
            }
        };
        match (&r.below, &r.above, &r.rises_by) {
            (Some(b), Some(a), _) => {
                let l = self.at(a).max(self.at(b));
                self.issue(
                    l,
                    f("above"),
                    "give either below or above, not both: make two events for a band",
                );
                None
            }
            (Some(_), None, Some(v)) | (None, Some(_), Some(v)) => {
                let l = self.at(v);
                self.issue(
                    l,
                    f("rises_by"),
                    "rises_by is its own kind of reading event: do not combine it with below/above",
                );
                None
            }
            (Some(limit), None, None) | (None, Some(limit), None) => {
                let side = if r.below.is_some() { Side::Below } else { Side::Above };
                ok &= finite(self, if side == Side::Below { "below" } else { "above" }, limit);
                if let Some(w) = &r.while_valve {
                    let l = self.at(w);
                    self.issue(l, f("while_valve"), "while_valve goes with rises_by only");
                    ok = false;
                }
                let limit = *limit.get_ref();
                let rearm = match &r.rearm {
                    None => limit,
                    Some(v) => {
                        ok &= finite(self, "rearm", v);
                        let rearm = *v.get_ref();
                        let wrong = match side {
                            Side::Below => rearm <= limit,
                            Side::Above => rearm >= limit,
                        };
                        if wrong {
                            let l = self.at(v);
                            let (key, cmp) = match side {
                                Side::Below => ("below", "greater"),
                                Side::Above => ("above", "smaller"),
                            };
                            self.issue(
                                l,
                                f("rearm"),
                                format!(
                                    "rearm = {rearm} is on the wrong side: with {key} = {limit} it must be {cmp} than {limit} (the value has to come back past it)"
                                ),
                            );
                            ok = false;
                        }
                        rearm
                    }
                };
                ok.then_some(EventKind::Threshold {
                    field,
                    rule: Threshold { side, limit, rearm },
                })
            }
            (None, None, Some(by)) => {
                ok &= finite(self, "rises_by", by);
                let by_v = *by.get_ref();
                if ok && by_v <= 0.0 {
                    let l = self.at(by);
                    self.issue(l, f("rises_by"), "must be greater than 0");
                    ok = false;
                }
                if let Some(v) = &r.rearm {
                    let l = self.at(v);
                    self.issue(
                        l,
                        f("rearm"),
                        "rearm goes with below/above; rises_by re-arms when the valve leaves while_valve",
                    );
                    ok = false;
                }
                let while_valve = self.valve_label(line, f("while_valve"), r.while_valve.as_ref(), labels, known);
                let Some(while_valve) = while_valve else {
                    let l = self.at(by);
                    self.issue(
                        l,
                        f("while_valve"),
                        "rises_by needs while_valve = \"<valve label>\", e.g. while_valve = \"关闭\"",
                    );
                    return None;
                };
                ok.then_some(EventKind::RisesBy {
                    field,
                    by: by_v,
                    while_valve,
                })
            }
            (None, None, None) => {
                self.issue(
                    line,
                    f("below"),
                    "a reading event needs one of: below = N, above = N, or rises_by = N with while_valve",
                );
                None
            }
        }
    }

    /// `fields = { … }`: string values whose keys do not clash with the BizData keys already there.
    fn event_fields(
        &mut self,
        i: usize,
        r: &RawEvent,
        meters: &[MeterConfig],
        mapping: &Mapping,
    ) -> Vec<(String, String)> {
        let Some(table) = &r.fields else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, v) in table.get_ref() {
            let l = self.at(v);
            let name = format!("event[{i}].fields.{k}");
            let clash = k == crate::config::mapping::METER_COLUMN
                || k == crate::config::mapping::VALVE_STATE_KEY
                || mapping.header.iter().any(|h| h == k)
                || meters.iter().any(|m| m.readings.iter().any(|r| &r.field == k));
            if k.trim().is_empty() {
                self.issue(l, name, "a BizData key must not be empty");
            } else if clash {
                self.issue(
                    l,
                    name,
                    format!("`{k}` is already a BizData key (mapping column, 水表表号, 阀门当前状态 or a reading)"),
                );
            } else {
                match v.get_ref() {
                    toml::Value::String(s) => out.push((k.clone(), s.clone())),
                    other => self.issue(
                        l,
                        name,
                        format!(
                            "must be a string (BizData values are strings): write \"{}\"",
                            other.to_string().trim_matches('"')
                        ),
                    ),
                }
            }
        }
        out
    }
}

/// The identity of a rule's memory: name and definition.
fn rule_key(name: &str, kind: &EventKind) -> String {
    match kind {
        EventKind::Valve { to, from } => format!("{name}|valve|{}>{to}", from.as_deref().unwrap_or("*")),
        EventKind::Link { online, after } => format!(
            "{name}|link|{}|{}ms",
            if *online { ONLINE } else { OFFLINE },
            after.as_millis()
        ),
        EventKind::Threshold { field, rule } => format!(
            "{name}|reading|{field}|{}{}|rearm{}",
            if rule.side == Side::Below { "<" } else { ">" },
            rule.limit,
            rule.rearm
        ),
        EventKind::RisesBy { field, by, while_valve } => {
            format!("{name}|reading|{field}|+{by}|while {while_valve}")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use crate::config::error::ConfigError;
    use crate::config::types::{EventKind, Side, Threshold};
    use crate::config::validate::test_sites::with_events;

    fn error_lines(e: &ConfigError) -> Vec<(usize, String, String)> {
        e.issues
            .iter()
            .map(|i| (i.line.unwrap_or(0), i.field.clone(), i.message.clone()))
            .collect()
    }

    #[test]
    fn every_event_kind_parses_into_its_rule() {
        let c = with_events(
            r#"
[[event]]
name = "用水户开阀"
point = "valve"
to = "开启"

[[event]]
name = "阀门故障"
point = "valve"
to = "故障"
fields = { "事件说明" = "阀门报告故障" }

[[event]]
name = "水表离线"
point = "link"
to = "离线"
for = "10m"

[[event]]
name = "水表恢复"
point = "link"
to = "在线"

[[event]]
name = "电池电压低"
point = "reading"
field = "电池电压"
below = 3.3
rearm = 3.4

[[event]]
name = "流量过大"
point = "reading"
field = "累计流量"
above = 9000

[[event]]
name = "关阀后仍有流量"
point = "reading"
field = "累计流量"
rises_by = 0.01
while_valve = "关闭"
"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let kinds: Vec<&EventKind> = c.events.iter().map(|e| &e.kind).collect();
        assert_eq!(
            kinds[0],
            &EventKind::Valve {
                to: "开启".into(),
                from: None
            }
        );
        assert_eq!(
            c.events[1].fields,
            [("事件说明".to_string(), "阀门报告故障".to_string())]
        );
        assert_eq!(
            kinds[2],
            &EventKind::Link {
                online: false,
                after: Duration::from_secs(600)
            }
        );
        assert_eq!(
            kinds[3],
            &EventKind::Link {
                online: true,
                after: Duration::ZERO
            }
        );
        assert_eq!(
            kinds[4],
            &EventKind::Threshold {
                field: "电池电压".into(),
                rule: Threshold {
                    side: Side::Below,
                    limit: 3.3,
                    rearm: 3.4
                }
            }
        );
        assert_eq!(
            kinds[5],
            &EventKind::Threshold {
                field: "累计流量".into(),
                rule: Threshold {
                    side: Side::Above,
                    limit: 9000.0,
                    rearm: 9000.0
                }
            },
            "no rearm: re-armed at the limit"
        );
        assert_eq!(
            kinds[6],
            &EventKind::RisesBy {
                field: "累计流量".into(),
                by: 0.01,
                while_valve: "关闭".into()
            }
        );
        let keys: HashSet<&str> = c.events.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys.len(), 7, "every rule has its own memory");
    }

    #[test]
    fn bad_event_rules_are_reported_with_their_line() {
        let events = r#"
[[event]]
name = "a"
point = "valve"
to = "半开"

[[event]]
name = "b"
point = "reading"
field = "水压"
below = 1

[[event]]
name = "c"
point = "reading"
field = "电池电压"
below = 3.3
rearm = 3.2

[[event]]
name = "d"
point = "reading"
field = "电池电压"
above = 3.3
rearm = 3.4

[[event]]
name = "e"
point = "reading"
field = "电池电压"
below = 3.3
above = 4.0

[[event]]
name = "f"
point = "link"
to = "离线"
field = "电池电压"

[[event]]
name = "g"
point = "valve"
to = "开启"
for = "5m"

[[event]]
name = "h"
point = "link"
to = "掉线"

[[event]]
name = "i"
point = "reading"
field = "累计流量"
rises_by = 0.01
while_valve = "关上"

[[event]]
name = "j"
point = "reading"
field = "累计流量"
rises_by = 0.01

[[event]]
name = "k"
point = "valve"
to = "关闭"
fields = { "水表表号" = "x", "优先级" = 1 }

[[event]]
name = "l"
point = "reading"
field = "电池电压"
"#;
        let e = with_events(events).expect_err("every rule above is wrong");
        let got = error_lines(&e);
        assert!(with_events("").is_ok(), "the base is valid");
        let expect = [
            ("to = \"半开\"", "event[0].to", "no valve can take the label `半开`"),
            ("field = \"水压\"", "event[1].field", "no meter reads a field `水压`"),
            ("rearm = 3.2", "event[2].rearm", "must be greater than 3.3"),
            ("rearm = 3.4", "event[3].rearm", "must be smaller than 3.3"),
            ("above = 4.0", "event[4].above", "either below or above"),
            (
                "field = \"电池电压\"\n\n[[event]]\nname = \"g\"",
                "event[5].field",
                "does not apply to point = \"link\"",
            ),
            ("for = \"5m\"", "event[6].for", "does not apply to point = \"valve\""),
            ("to = \"掉线\"", "event[7].to", "use \"离线\" or \"在线\""),
            (
                "while_valve = \"关上\"",
                "event[8].while_valve",
                "no valve can take the label `关上`",
            ),
            (
                "rises_by = 0.01\n\n[[event]]\nname = \"k\"",
                "event[9].while_valve",
                "rises_by needs while_valve",
            ),
            (
                "\"水表表号\" = \"x\"",
                "event[10].fields.水表表号",
                "already a BizData key",
            ),
            ("\"优先级\" = 1", "event[10].fields.优先级", "must be a string"),
            ("name = \"l\"", "event[11].below", "needs one of: below"),
        ];
        let full = "[site]\nname = \"s\"\nstate_dir = \"state\"\nmapping = \"mapping.csv\"\n\n\
             [panda]\nbase_url = \"http://127.0.0.1:1\"\nproject = \"demo\"\nauth = \"none\"\nuser_id = 42\n\n";
        let prefix_lines = full.lines().count()
            + "[[bus]]\nname = \"a\"\ntcp = \"127.0.0.1:502\"\n\n[[meter]]\nmeter_no = \"M1\"\nbus = \"a\"\nunit = 1\nvalve\nreadings = [\n  r1,\n  r2,\n]\n\n"
                .lines()
                .count();
        for (needle, field, msg) in expect {
            let found = got.iter().find(|(_, f, m)| f == field && m.contains(msg));
            let Some((line, _, _)) = found else {
                panic!("no issue {field}: {msg} in\n{e}");
            };
            let at = events.find(needle).map(|o| events[..o].matches('\n').count() + 1);
            // Lines of the events block start after the site, panda, bus and meter sections.
            let want = at.map(|a| a + prefix_lines);
            // A rule whose problem is a missing key is reported at its [[event]] header or first key.
            if needle.starts_with("name =") {
                let l = *line;
                assert!(
                    want.is_some_and(|w| l + 2 >= w && l <= w),
                    "{field} at line {l}, want ~{want:?}\n{e}"
                );
            } else {
                assert_eq!(Some(*line), want, "{field}: {msg}\n{e}");
            }
        }
        assert_eq!(got.len(), expect.len(), "{e}");
    }

    #[test]
    fn old_event_configs_stay_valid() {
        let c = with_events("[[event]]\nname = \"用水户关阀\"\npoint = \"valve\"\nto = \"关闭\"\nfrom = \"开启\"\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(c.events[0].matches("开启", "关闭"));
        assert!(!c.events[0].matches("故障", "关闭"));
        assert!(c.events[0].fields.is_empty());
    }
}

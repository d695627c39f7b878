//! The `[[event]]` rules applied to one meter's state, and the drafts of the work orders that fire.
//!
//! Link rules (`在线`/`离线` with their `for`) and reading rules (thresholds, `rises_by`) are evaluated
//! here through the pure functions of [`crate::events::detect`]; valve rules fire in `apply_sample`
//! (`mod.rs`) on an accepted transition and make their drafts here too. A draft carries the detection time in the site's zone (marked when the system clock is not
//! synchronized) and its BizData, rendered from the meter's template for the rule. Only changes the
//! state it is given: storing it (and the drafts) is the caller's.

use chrono::{DateTime, SecondsFormat, Utc};

use crate::clock::BootStamp;
use crate::config::{EventKind, EventRule, MeterConfig, OFFLINE, ONLINE};
use crate::events::detect;
use crate::events::record::{render_event_biz_data, BizTemplate, Draft};
use crate::modbus::cycle::Sample;
use crate::recorder::{Recorder, UNSYNCED_MARK};
use crate::store::StoredState;

impl Recorder {
    /// The detection time of `t` as records show it: RFC 3339 to the second, in the site's zone.
    pub(super) fn stamp(&self, t: DateTime<Utc>) -> String {
        // The samples of a cycle mostly fall in one second: format it once.
        let mut last = self.last_stamp.borrow_mut();
        if last.0 != Some(t.timestamp()) {
            let text = t
                .with_timezone(&self.cfg.site.timezone)
                .to_rfc3339_opts(SecondsFormat::Secs, false);
            // Asked once a second at most: a board that boots in 1970 labels with 1970 until NTP.
            self.unsynced
                .set(crate::clock::sync_state() == crate::clock::ClockSync::Unsynchronized);
            *last = (Some(t.timestamp()), text);
        }
        last.1.clone()
    }

    /// Evaluate every link rule against `st` at `now`; `readings` are the sample's, if there is one.
    pub(super) fn link_drafts(
        &self,
        meter: usize,
        st: &mut StoredState,
        now: DateTime<Utc>,
        readings: Option<&[String]>,
    ) -> Vec<Draft> {
        let confirmed = self.confirmed_offline.get(meter).copied().unwrap_or(false);
        let last = self
            .last_readings
            .get(meter)
            .and_then(Option::as_ref)
            .map(Vec::as_slice);
        let blank: Vec<String>;
        let readings: &[String] = match (readings, last) {
            (Some(r), _) | (None, Some(r)) => r,
            (None, None) => {
                let n = self.cfg.meters.get(meter).map_or(0, |m| m.readings.len());
                blank = vec![String::new(); n];
                &blank
            }
        };
        let label = if st.valve_unknown {
            "未知".to_string()
        } else {
            st.label.clone()
        };
        let mut out = Vec::new();
        for (r, e) in self.cfg.events.iter().enumerate() {
            let EventKind::Link { online, after } = e.kind else {
                continue;
            };
            let since = if online {
                st.back_since.map(|t| (t, lasted(&mut st.back_boot)))
            } else {
                st.offline_since
                    .filter(|_| confirmed)
                    .map(|t| (t, lasted(&mut st.offline_boot)))
            };
            let mem = st.rules.entry(e.key.clone()).or_default();
            if detect::link(after, mem, since) {
                let (from, to) = if online { (OFFLINE, ONLINE) } else { (ONLINE, OFFLINE) };
                out.push(self.draft(meter, (r, e), &self.stamp(now), from, to, &label, readings));
            }
        }
        out
    }

    /// Evaluate the threshold and `rises_by` rules on a sample (the valve state in `st` is the accepted one).
    pub(super) fn reading_drafts(&self, s: &Sample, st: &mut StoredState, at: &str) -> Vec<Draft> {
        let Some(meter) = self.cfg.meters.get(s.meter) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (r, e) in self.cfg.events.iter().enumerate() {
            let (field, fired, shown_from) = match &e.kind {
                EventKind::Threshold { field, rule } => {
                    let Some(rendered) = reading(meter, s, field) else {
                        continue;
                    };
                    let mem = st.rules.entry(e.key.clone()).or_default();
                    (
                        field,
                        detect::threshold(rule, mem, detect::reading_value(rendered)),
                        String::new(),
                    )
                }
                EventKind::RisesBy { field, by, while_valve } => {
                    let Some(rendered) = reading(meter, s, field) else {
                        continue;
                    };
                    let in_state = !st.valve_unknown && st.label == *while_valve;
                    if in_state && meter.valve.label(s.valve_raw) != *while_valve {
                        // The valve reads another state that `confirm` has not accepted yet: the flow
                        // of a valve being opened is no leak. Wait, keeping the baseline (a glitch
                        // must not hide a leak in progress).
                        continue;
                    }
                    let mem = st.rules.entry(e.key.clone()).or_default();
                    let fired = detect::rises_by(*by, mem, in_state, detect::reading_value(rendered));
                    let base = mem.baseline.map(|b| b.to_string()).unwrap_or_default();
                    (field, fired, base)
                }
                _ => continue,
            };
            if fired {
                let value = reading(meter, s, field).unwrap_or_default();
                let to = format!("{field}={value}");
                out.push(self.draft(s.meter, (r, e), at, &shown_from, &to, &st.label, &s.readings));
            }
        }
        out
    }

    /// A record's draft for `rule` (its index in the config, and itself).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn draft(
        &self,
        meter: usize,
        (index, rule): (usize, &EventRule),
        at: &str,
        from: &str,
        to: &str,
        valve_label: &str,
        readings: &[String],
    ) -> Draft {
        let m = self.cfg.meters.get(meter);
        let meter_no = m.map_or("?", |m| m.meter_no.as_str());
        // Looked up only to make a template (or in the rare full render below).
        let row = || m.and_then(|m| self.cfg.mapping.get(&m.meter_no)).unwrap_or_default();
        let fields = || m.map_or(Vec::new(), |m| m.readings.iter().map(|r| r.field.as_str()).collect());
        // From the meter's template for this rule (made on its first record), else rendered in full.
        let mut biz_data = self.spare_biz.borrow_mut().pop().unwrap_or_default();
        let templated = self
            .templates
            .borrow_mut()
            .entry((meter, index))
            .or_insert_with(|| BizTemplate::new(&row(), meter_no, &fields(), &rule.fields))
            .render_into(&mut biz_data, valve_label, readings);
        if !templated {
            let readings = fields().into_iter().zip(readings.iter().map(String::as_str));
            biz_data = render_event_biz_data(&row(), meter_no, valve_label, readings, &rule.fields);
        }
        Draft {
            event_name: rule.name.clone(),
            detected_at: if self.unsynced.get() {
                format!("{at}{UNSYNCED_MARK}")
            } else {
                at.to_string()
            },
            from: from.to_string(),
            to: to.to_string(),
            biz_data,
        }
    }
}

/// How long a stretch timed by `stamp` has lasted, on the boot clock. A stretch without a stamp of this
/// boot (a state written before stamps existed, or before a power cut: the boot clock restarted, and
/// the wall clock cannot say how long the gateway was down) counts from now, and gets a stamp.
fn lasted(stamp: &mut Option<BootStamp>) -> std::time::Duration {
    match stamp.as_ref().and_then(BootStamp::elapsed) {
        Some(d) => d,
        None => {
            *stamp = Some(BootStamp::now());
            std::time::Duration::ZERO
        }
    }
}

/// The rendered reading `field` of a sample, if the meter reads it.
fn reading<'a>(meter: &MeterConfig, s: &'a Sample, field: &str) -> Option<&'a str> {
    let k = meter.readings.iter().position(|r| r.field == field)?;
    s.readings.get(k).map(String::as_str)
}

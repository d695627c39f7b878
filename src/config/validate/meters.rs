//! `[[meter]]` and `[profile.*]`: a meter's number is unique and so is its unit on its bus; its bus
//! and profile exist, and the profile fills in what the meter leaves out; its valve point and states,
//! and its reading points with their BizData keys (unique, never one the gateway fills itself).

use std::collections::{BTreeMap, HashMap, HashSet};

use toml::Spanned;

use super::{Validator, MAX_CONFIRM};
use crate::config::point::{ByteOrder, PointSpec, Table, ValueType, WordOrder};
use crate::config::raw::{RawMeter, RawPoint, RawProfile};
use crate::config::types::{BusConfig, MeterConfig, ReadingSpec, ValveSpec};

impl Validator<'_> {
    pub(super) fn meters(
        &mut self,
        raw: &[Spanned<RawMeter>],
        profiles: &BTreeMap<String, Spanned<RawProfile>>,
        buses: &[BusConfig],
    ) -> Vec<MeterConfig> {
        let mut numbers: HashMap<String, usize> = HashMap::new();
        let mut units: HashMap<(usize, u8), usize> = HashMap::new();
        let mut out = Vec::new();
        for (i, m) in raw.iter().enumerate() {
            let line = self.at(m);
            let r = m.get_ref();
            let f = |name: &str| format!("meter[{i}].{name}");
            if let Some(first) = numbers.insert(r.meter_no.clone(), line) {
                self.issue(
                    line,
                    f("meter_no"),
                    format!("meter `{}` is already defined at line {first}", r.meter_no),
                );
            }
            let bus = match buses.iter().position(|b| b.name == r.bus) {
                Some(b) => b,
                None => {
                    let names: Vec<_> = buses.iter().map(|b| b.name.as_str()).collect();
                    self.issue(
                        line,
                        f("bus"),
                        format!("no bus named `{}`; defined: {}", r.bus, names.join(", ")),
                    );
                    0
                }
            };
            // Only a real bus and a valid unit can clash: a stand-in (bus 0, unit 1) after an error
            // would report a duplicate that is not there.
            let checkable = buses.iter().any(|b| b.name == r.bus) && (1..=247).contains(r.unit.get_ref());
            let unit = self.ranged(&f("unit"), Some(&r.unit), 1, 1, 247) as u8;
            let clash = if checkable {
                units.insert((bus, unit), line)
            } else {
                None
            };
            if let Some(first) = clash {
                self.issue(
                    line,
                    f("unit"),
                    format!(
                        "unit {unit} on bus `{}` is already used by the meter at line {first}",
                        r.bus
                    ),
                );
            }
            let profile = match &r.profile {
                None => None,
                Some(p) => match profiles.get(p) {
                    Some(p) => Some(p.get_ref().clone()),
                    None => {
                        let names: Vec<_> = profiles.keys().map(String::as_str).collect();
                        self.issue(
                            line,
                            f("profile"),
                            format!("no profile named `{p}`; defined: {}", names.join(", ")),
                        );
                        None
                    }
                },
            };
            let valve_raw = r
                .valve
                .clone()
                .or_else(|| profile.as_ref().and_then(|p| p.valve.clone()));
            let readings_raw = r
                .readings
                .clone()
                .or_else(|| profile.as_ref().and_then(|p| p.readings.clone()))
                .unwrap_or_default();
            let confirm_raw = r.confirm.clone().or(profile.as_ref().and_then(|p| p.confirm.clone()));
            let confirm = self.ranged(&f("confirm"), confirm_raw.as_ref(), 1, 1, MAX_CONFIRM) as u32;
            let Some(valve_raw) = valve_raw else {
                self.issue(
                    line,
                    f("valve"),
                    "no valve: give valve = {...} or a profile that has one",
                );
                continue;
            };
            let valve = self.valve(line, &f("valve"), &valve_raw);
            let mut readings = Vec::new();
            let mut fields = HashSet::new();
            for (k, rr) in readings_raw.iter().enumerate() {
                let name = format!("meter[{i}].readings[{k}]");
                let point = self.point(line, &name, rr, false);
                let field = rr.field.clone().unwrap_or_default();
                if field.trim().is_empty() {
                    self.issue(
                        line,
                        format!("{name}.field"),
                        "a reading needs field = \"<BizData key>\"",
                    );
                } else if !fields.insert(field.clone()) || field == "水表表号" || field == "阀门当前状态" {
                    self.issue(
                        line,
                        format!("{name}.field"),
                        format!("field `{field}` is used twice in BizData"),
                    );
                }
                readings.push(ReadingSpec { field, point });
            }
            out.push(MeterConfig {
                meter_no: r.meter_no.clone(),
                bus,
                unit,
                valve,
                readings,
                confirm,
            });
        }
        out
    }

    fn valve(&mut self, line: usize, name: &str, r: &RawPoint) -> ValveSpec {
        let point = self.point(line, name, r, true);
        let mut states = BTreeMap::new();
        match &r.states {
            None => self.issue(
                line,
                format!("{name}.states"),
                "a valve needs states = { 0 = \"关闭\", 1 = \"开启\" }",
            ),
            Some(map) => {
                for (k, v) in map {
                    match k.trim().parse::<i64>() {
                        Ok(n) => {
                            states.insert(n, v.clone());
                        }
                        Err(_) => self.issue(
                            line,
                            format!("{name}.states"),
                            format!("key `{k}` is not an integer raw value"),
                        ),
                    }
                }
            }
        }
        if r.field.is_some() {
            self.issue(
                line,
                format!("{name}.field"),
                "field is for readings; the valve's key is 阀门当前状态",
            );
        }
        ValveSpec { point, states }
    }

    fn point(&mut self, line: usize, name: &str, r: &RawPoint, is_valve: bool) -> PointSpec {
        let table = match r.table.as_str() {
            "coil" => Table::Coil,
            "discrete" => Table::Discrete,
            "holding" => Table::Holding,
            "input" => Table::Input,
            other => {
                self.issue(
                    line,
                    format!("{name}.table"),
                    format!("`{other}` is not allowed: use coil, discrete, holding or input"),
                );
                Table::Holding
            }
        };
        let address = self.ranged(&format!("{name}.address"), Some(&r.address), 0, 0, 65535) as u16;
        let kind = match r.kind.as_deref() {
            None | Some("u16") => ValueType::U16,
            Some("i16") => ValueType::I16,
            Some("u32") => ValueType::U32,
            Some("i32") => ValueType::I32,
            Some("f32") => ValueType::F32,
            Some("u64") => ValueType::U64,
            Some("f64") => ValueType::F64,
            Some(other) => {
                self.issue(
                    line,
                    format!("{name}.type"),
                    format!("`{other}` is not allowed: use u16, i16, u32, i32, f32, u64 or f64"),
                );
                ValueType::U16
            }
        };
        if table.is_bit() && r.kind.is_some() {
            self.issue(
                line,
                format!("{name}.type"),
                "coils and discrete inputs are single bits: remove type",
            );
        }
        if is_valve && matches!(kind, ValueType::F32 | ValueType::F64) {
            self.issue(line, format!("{name}.type"), "a valve state must be an integer type");
        }
        let word_order = match r.word_order.as_deref() {
            None | Some("big") => WordOrder::Big,
            Some("little") => WordOrder::Little,
            Some(other) => {
                self.issue(
                    line,
                    format!("{name}.word_order"),
                    format!("`{other}` is not allowed: use big or little"),
                );
                WordOrder::Big
            }
        };
        let byte_order = match r.byte_order.as_deref() {
            None | Some("big") => ByteOrder::Big,
            Some("little") => ByteOrder::Little,
            Some(other) => {
                self.issue(
                    line,
                    format!("{name}.byte_order"),
                    format!("`{other}` is not allowed: use big or little"),
                );
                ByteOrder::Big
            }
        };
        if let Some(s) = r.scale {
            if !s.is_finite() || s == 0.0 {
                self.issue(
                    line,
                    format!("{name}.scale"),
                    "must be a finite non-zero number, e.g. 0.01",
                );
            }
        }
        let decimals = r
            .decimals
            .as_ref()
            .map(|d| self.ranged(&format!("{name}.decimals"), Some(d), 0, 0, 12) as u32);
        let spec = PointSpec {
            table,
            address,
            kind,
            word_order,
            byte_order,
            scale: r.scale,
            decimals,
        };
        if u32::from(address) + u32::from(spec.count()) > 65536 {
            self.issue(line, format!("{name}.address"), "the value runs past address 65535");
        }
        if r.states.is_some() && !is_valve {
            self.issue(line, format!("{name}.states"), "states are for the valve only");
        }
        spec
    }
}

//! The rules, pure: valve transitions (baseline, debounce) and the event rules of `[[event]]`
//! (link `for`, reading thresholds with hysteresis, `rises_by` while the valve is in a state).
//!
//! Every function here takes the rule, its persisted memory ([`RuleMemory`]) and the facts of the
//! moment (`now` is passed in), changes the memory and says whether a work order fires. Nothing here
//! does I/O or reads the clock, so every rule is unit- and property-tested below. The caller (the
//! recorder) stores the memory with the meter's state in the same transaction as the records a firing
//! produces: a restart neither repeats nor forgets a work order.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::{Side, Threshold};

/// Debounce memory for one meter: a candidate raw value and how many equal samples of it were seen.
/// Kept in memory only: after a restart a change simply needs `confirm` samples again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Pending {
    candidate: Option<(i64, u32)>,
}

/// What one sample means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// First sample ever seen for this meter: store it, no event.
    Baseline,
    /// Equal to the stored state.
    Unchanged,
    /// Different, but not yet seen `confirm` times in a row.
    Pending,
    /// Accepted: the stored state becomes this raw value.
    Transition,
}

/// Decide on a sample `raw` against the stored raw value (`None` = never seen) with `confirm` equal
/// consecutive samples required.
pub(crate) fn decide(stored: Option<i64>, pending: &mut Pending, raw: i64, confirm: u32) -> Decision {
    let Some(stored) = stored else {
        *pending = Pending::default();
        return Decision::Baseline;
    };
    if stored == raw {
        *pending = Pending::default();
        return Decision::Unchanged;
    }
    let seen = match pending.candidate {
        Some((c, n)) if c == raw => n + 1,
        _ => 1,
    };
    if seen >= confirm.max(1) {
        *pending = Pending::default();
        Decision::Transition
    } else {
        pending.candidate = Some((raw, seen));
        Decision::Pending
    }
}

// === event rules ===

/// What one `[[event]]` rule remembers about one meter, persisted with the meter's state.
///
/// One shape for every rule kind (each uses the fields it needs), so the stored map stays simple and
/// a rule whose kind changes simply starts afresh.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleMemory {
    /// Threshold and `rises_by`: fired, and not yet re-armed (threshold: the value has not gone back
    /// past `rearm`; `rises_by`: the valve has not left the state since).
    #[serde(default, skip_serializing_if = "is_false")]
    pub(crate) fired: bool,
    /// Link rules: the start of the stretch (outage or return) this rule last fired for; a stretch
    /// fires at most once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) fired_for: Option<DateTime<Utc>>,
    /// `rises_by`: the reading when the valve (last) reached the state; `None` outside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<f64>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Threshold {
    /// Whether `v` is past the limit.
    fn tripped(&self, v: f64) -> bool {
        match self.side {
            Side::Below => v < self.limit,
            Side::Above => v > self.limit,
        }
    }

    /// Whether `v` is back at or beyond the re-arm level.
    fn rearmed(&self, v: f64) -> bool {
        match self.side {
            Side::Below => v >= self.rearm,
            Side::Above => v <= self.rearm,
        }
    }
}

/// A rendered reading as a number for the rules: `None` when it is not a finite decimal (a float
/// register holding NaN or infinity, an empty string): such a reading never fires anything.
pub(crate) fn reading_value(rendered: &str) -> Option<f64> {
    rendered.trim().parse::<f64>().ok().filter(|v| v.is_finite())
}

/// Apply one reading to a threshold rule; true when it fires. `None` (undecodable) changes nothing.
/// Armed (not `fired`) and past the limit: fire. Fired and back at `rearm`: re-arm.
pub(crate) fn threshold(rule: &Threshold, mem: &mut RuleMemory, value: Option<f64>) -> bool {
    let Some(v) = value.filter(|v| v.is_finite()) else {
        return false;
    };
    if mem.fired {
        if rule.rearmed(v) {
            mem.fired = false;
        }
        false
    } else if rule.tripped(v) {
        mem.fired = true;
        true
    } else {
        false
    }
}

/// Apply one sample to a `rises_by` rule; true when it fires.
///
/// `in_state`: the meter's accepted valve state is the rule's `while_valve`. Outside it the rule
/// forgets its baseline and re-arms. In it, the first usable value is the baseline; the rule fires
/// once when the value has grown by at least `by` since, and not again until the valve has left the
/// state and come back. A value below the baseline (a counter reset or a replaced meter) becomes the
/// new baseline, so it neither fires nor hides a later rise.
pub(crate) fn rises_by(by: f64, mem: &mut RuleMemory, in_state: bool, value: Option<f64>) -> bool {
    if !in_state {
        mem.baseline = None;
        mem.fired = false;
        return false;
    }
    let Some(v) = value.filter(|v| v.is_finite()) else {
        return false;
    };
    match mem.baseline {
        Some(b) if v >= b => {
            // Rendered readings are decimal strings; forgive the binary noise of the subtraction.
            let slack = 1e-9 * v.abs().max(b.abs()).max(1.0);
            if !mem.fired && v - b >= by - slack {
                mem.fired = true;
                true
            } else {
                false
            }
        }
        _ => {
            mem.baseline = Some(v);
            false
        }
    }
}

/// Evaluate a link rule with a `for` (`after`; zero = at once) against the stretch the meter is in.
///
/// `since`: the start of the current stretch of the rule's link state (the outage for `离线`, the
/// return for `在线`) as a wall-clock label that identifies it, and how long it has lasted, measured
/// on a monotonic clock; `None` when the meter is not in that state (or the stretch does not
/// qualify). Fires once per stretch, when it has lasted `after`; the stretch's start is remembered,
/// so a stretch already reported (before a restart, too) never fires again, and a stretch shorter
/// than `after` never fires at all, whatever the wall clock does meanwhile.
pub(crate) fn link(after: Duration, mem: &mut RuleMemory, since: Option<(DateTime<Utc>, Duration)>) -> bool {
    let Some((start, lasted)) = since else {
        return false;
    };
    if mem.fired_for == Some(start) {
        return false;
    }
    if lasted >= after {
        mem.fired_for = Some(start);
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_sample_is_a_baseline() {
        let mut p = Pending::default();
        assert_eq!(decide(None, &mut p, 1, 1), Decision::Baseline);
    }

    #[test]
    fn a_change_is_accepted_at_once_with_confirm_one() {
        let mut p = Pending::default();
        assert_eq!(decide(Some(0), &mut p, 0, 1), Decision::Unchanged);
        assert_eq!(decide(Some(0), &mut p, 1, 1), Decision::Transition);
    }

    #[test]
    fn confirm_needs_equal_consecutive_samples() {
        let mut p = Pending::default();
        assert_eq!(decide(Some(0), &mut p, 1, 3), Decision::Pending);
        assert_eq!(decide(Some(0), &mut p, 1, 3), Decision::Pending);
        assert_eq!(decide(Some(0), &mut p, 1, 3), Decision::Transition);
    }

    #[test]
    fn a_glitch_resets_the_debounce() {
        let mut p = Pending::default();
        assert_eq!(decide(Some(0), &mut p, 1, 2), Decision::Pending);
        assert_eq!(decide(Some(0), &mut p, 0, 2), Decision::Unchanged);
        assert_eq!(decide(Some(0), &mut p, 1, 2), Decision::Pending);
        assert_eq!(
            decide(Some(0), &mut p, 2, 2),
            Decision::Pending,
            "another value restarts the count"
        );
        assert_eq!(decide(Some(0), &mut p, 2, 2), Decision::Transition);
    }
    // --- event rules ---

    const BATTERY: Threshold = Threshold {
        side: Side::Below,
        limit: 3.3,
        rearm: 3.4,
    };

    #[test]
    fn a_threshold_fires_once_past_the_limit_and_again_only_after_rearm() {
        let mut m = RuleMemory::default();
        let fire = |m: &mut RuleMemory, v: f64| threshold(&BATTERY, m, Some(v));
        assert!(!fire(&mut m, 3.5));
        assert!(!fire(&mut m, 3.30), "the limit is strict");
        assert!(fire(&mut m, 3.29));
        assert!(!fire(&mut m, 3.1), "still low: no second work order");
        assert!(!fire(&mut m, 3.35), "inside the band: not re-armed");
        assert!(!fire(&mut m, 3.29), "dipped again inside the band: nothing");
        assert!(!fire(&mut m, 3.40), "re-armed at rearm (inclusive)");
        assert!(fire(&mut m, 3.2));
    }

    #[test]
    fn an_above_threshold_without_rearm_rearms_at_the_limit() {
        let t = Threshold {
            side: Side::Above,
            limit: 10.0,
            rearm: 10.0,
        };
        let mut m = RuleMemory::default();
        assert!(threshold(&t, &mut m, Some(10.5)));
        assert!(!threshold(&t, &mut m, Some(11.0)));
        assert!(!threshold(&t, &mut m, Some(10.0)));
        assert!(threshold(&t, &mut m, Some(10.01)));
    }

    #[test]
    fn an_undecodable_reading_never_fires_or_rearms() {
        let mut m = RuleMemory::default();
        assert!(!threshold(&BATTERY, &mut m, None));
        assert!(!threshold(&BATTERY, &mut m, Some(f64::NAN)));
        assert!(!threshold(&BATTERY, &mut m, Some(f64::NEG_INFINITY)));
        assert_eq!(m, RuleMemory::default());
        assert_eq!(reading_value("NaN"), None);
        assert_eq!(reading_value("inf"), None);
        assert_eq!(reading_value(""), None);
        assert_eq!(reading_value("3.29"), Some(3.29));
        assert!(threshold(&BATTERY, &mut m, reading_value("3.29")));
        assert!(!threshold(&BATTERY, &mut m, reading_value("NaN")));
        assert!(m.fired, "an undecodable reading does not re-arm either");
    }

    #[test]
    fn rises_by_fires_once_per_stay_in_the_state() {
        let mut m = RuleMemory::default();
        assert!(
            !rises_by(0.01, &mut m, true, Some(100.00)),
            "the first value is the baseline"
        );
        assert!(!rises_by(0.01, &mut m, true, Some(100.00)));
        assert!(!rises_by(0.01, &mut m, true, None));
        assert!(rises_by(0.01, &mut m, true, Some(100.01)), "exactly `by` counts");
        assert!(!rises_by(0.01, &mut m, true, Some(105.0)), "once per stay");
        assert!(!rises_by(0.01, &mut m, false, Some(106.0)), "valve left the state");
        assert_eq!(m, RuleMemory::default());
        assert!(!rises_by(0.01, &mut m, true, Some(107.0)), "back: new baseline");
        assert!(rises_by(0.01, &mut m, true, Some(107.02)));
    }

    #[test]
    fn rises_by_follows_a_counter_reset_down() {
        let mut m = RuleMemory::default();
        assert!(!rises_by(0.5, &mut m, true, Some(900.0)));
        assert!(!rises_by(0.5, &mut m, true, Some(1.0)), "a reset is no rise");
        assert_eq!(m.baseline, Some(1.0));
        assert!(rises_by(0.5, &mut m, true, Some(1.5)));
    }

    fn t(ms: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp_millis(1_700_000_000_000 + ms).unwrap_or_default()
    }

    /// How long a stretch from `start` to `now` (ms) lasted, on the monotonic clock.
    fn lasted(start: i64, now: i64) -> Duration {
        Duration::from_millis(u64::try_from(now - start).unwrap_or(0))
    }

    #[test]
    fn a_link_rule_fires_once_per_stretch_after_its_for() {
        let after = Duration::from_millis(600);
        let mut m = RuleMemory::default();
        assert!(!link(after, &mut m, None));
        assert!(!link(after, &mut m, Some((t(0), lasted(0, 599)))));
        assert!(link(after, &mut m, Some((t(0), lasted(0, 600)))));
        assert!(
            !link(after, &mut m, Some((t(0), lasted(0, 5000)))),
            "one work order per outage"
        );
        assert!(!link(after, &mut m, None), "back online");
        assert!(
            !link(after, &mut m, Some((t(7000), lasted(7000, 7100)))),
            "a new outage, still short"
        );
        assert!(link(after, &mut m, Some((t(7000), lasted(7000, 7700)))));
        let mut m = RuleMemory::default();
        assert!(
            link(Duration::ZERO, &mut m, Some((t(0), lasted(0, 0)))),
            "no `for`: at once"
        );
    }

    #[test]
    fn rule_memory_round_trips_and_old_or_empty_json_loads() {
        let m = RuleMemory {
            fired: true,
            fired_for: Some(t(5)),
            baseline: Some(1.25),
        };
        let s = serde_json::to_string(&m).unwrap_or_default();
        assert_eq!(serde_json::from_str::<RuleMemory>(&s).ok(), Some(m));
        assert_eq!(serde_json::to_string(&RuleMemory::default()).unwrap_or_default(), "{}");
        assert_eq!(
            serde_json::from_str::<RuleMemory>("{}").ok(),
            Some(RuleMemory::default())
        );
    }

    mod properties {
        use super::super::*;
        use super::{lasted, t};
        use proptest::prelude::*;

        fn side() -> impl Strategy<Value = Threshold> {
            (any::<bool>(), -100.0f64..100.0, 0.0f64..10.0).prop_map(|(below, limit, band)| {
                if below {
                    Threshold {
                        side: Side::Below,
                        limit,
                        rearm: limit + band,
                    }
                } else {
                    Threshold {
                        side: Side::Above,
                        limit,
                        rearm: limit - band,
                    }
                }
            })
        }

        proptest! {
            /// Between two firings the value has always been back at the re-arm level.
            #[test]
            fn hysteresis_never_fires_twice_without_a_rearm(
                rule in side(),
                values in proptest::collection::vec(proptest::option::of(-120.0f64..120.0), 0..200),
            ) {
                let mut m = RuleMemory::default();
                let mut rearmed_since_fire = true;
                for v in values {
                    let fired = threshold(&rule, &mut m, v);
                    if fired {
                        prop_assert!(rearmed_since_fire, "fired twice without a rearm");
                        prop_assert!(v.is_some_and(|v| rule.tripped(v)));
                        rearmed_since_fire = false;
                    } else if v.is_some_and(|v| rule.rearmed(v)) {
                        rearmed_since_fire = true;
                    }
                }
            }

            /// A value wobbling inside the band (never back at `rearm`) fires at most once.
            #[test]
            fn wobbling_inside_the_band_fires_at_most_once(
                limit in 0.0f64..10.0,
                band in 0.01f64..1.0,
                wobble in proptest::collection::vec(0.0f64..1.0, 1..100),
            ) {
                let rule = Threshold { side: Side::Below, limit, rearm: limit + band };
                let mut m = RuleMemory::default();
                let fires = wobble
                    .iter()
                    .map(|w| limit - band + w * band * 1.999) // in [limit - band, rearm)
                    .filter(|v| threshold(&rule, &mut m, Some(*v)))
                    .count();
                prop_assert!(fires <= 1);
            }

            /// Whatever the outages and polls, a link rule never fires for an outage shorter than
            /// `for`, and fires exactly once for each one that lasts at least `for` while polled.
            #[test]
            fn for_never_fires_for_an_outage_shorter_than_for(
                after_ms in 1u64..5000,
                // (outage length, gap after it) in ms; polls every `step` ms.
                outages in proptest::collection::vec((0i64..10_000, 1i64..3000), 1..10),
                step in 1i64..500,
            ) {
                let after = Duration::from_millis(after_ms);
                let mut m = RuleMemory::default();
                let mut now = 0i64;
                for (len, gap) in outages {
                    let start = now;
                    let mut fired = 0;
                    while now <= start + len {
                        if link(after, &mut m, Some((t(start), lasted(start, now)))) {
                            fired += 1;
                            prop_assert!(now - start >= after_ms as i64, "fired {} ms into the outage", now - start);
                        }
                        now += step;
                    }
                    prop_assert!(fired <= 1);
                    if len < after_ms as i64 {
                        prop_assert_eq!(fired, 0, "outage of {} ms < for {} ms fired", len, after_ms);
                    }
                    if len - step >= after_ms as i64 {
                        prop_assert_eq!(fired, 1, "a long outage polled after `for` must fire");
                    }
                    let end = now + gap;
                    while now < end {
                        prop_assert!(!link(after, &mut m, None));
                        now += step;
                    }
                }
            }

            /// `rises_by` fires at most once per stay in the state, and only after a rise of `by`.
            #[test]
            fn rises_by_fires_at_most_once_per_stay(
                by in 0.001f64..5.0,
                steps in proptest::collection::vec((any::<bool>(), proptest::option::of(0.0f64..20.0)), 0..200),
            ) {
                let mut m = RuleMemory::default();
                let mut fired_in_stay = false;
                let mut low: Option<f64> = None;
                for (in_state, v) in steps {
                    if !in_state {
                        fired_in_stay = false;
                        low = None;
                    }
                    let fired = rises_by(by, &mut m, in_state, v);
                    if fired {
                        prop_assert!(!fired_in_stay, "fired twice in one stay");
                        let (v, b) = (v.unwrap_or(f64::NAN), low.unwrap_or(f64::NAN));
                        prop_assert!(v - b >= by * (1.0 - 1e-6), "fired on a rise of {} < {}", v - b, by);
                        fired_in_stay = true;
                    }
                    if in_state {
                        if let Some(v) = v {
                            // The baseline is the stay's first value, lowered by any later lower value.
                            low = Some(low.map_or(v, |l: f64| if v < l { v } else { l }));
                        }
                    }
                }
            }
        }
    }
}

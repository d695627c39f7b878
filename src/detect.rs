//! Transition rules, pure: given the stored state of a meter's valve, its debounce counter and a new
//! raw sample, decide whether this is a baseline, nothing, a pending change or an accepted transition.
//!
//! Never does I/O or reads the clock, so every rule is unit-tested here.

/// Debounce memory for one meter: a candidate raw value and how many equal samples of it were seen.
/// Kept in memory only: after a restart a change simply needs `confirm` samples again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pending {
    candidate: Option<(i64, u32)>,
}

/// What one sample means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
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
pub fn decide(stored: Option<i64>, pending: &mut Pending, raw: i64, confirm: u32) -> Decision {
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
}

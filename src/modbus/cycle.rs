//! What the field side produces: one [`Cycle`] per round over a bus, with one [`Sample`] per meter
//! read and the meters whose link changed. The recorder consumes it.

use chrono::{DateTime, Utc};

/// One successful read of a meter: its valve's raw value and its readings, rendered.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Index into [`crate::config::Config::meters`].
    pub meter: usize,
    /// The valve's raw value.
    pub valve_raw: i64,
    /// One rendered string per [`crate::config::MeterConfig::readings`], same order.
    pub readings: Vec<String>,
    /// When it was read.
    pub at: DateTime<Utc>,
}

/// What one round over a bus produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cycle {
    /// Index into [`crate::config::Config::buses`].
    pub bus: usize,
    /// Meters read in this round.
    pub samples: Vec<Sample>,
    /// Meters whose link changed in this round: (meter index, online now).
    pub links: Vec<(usize, bool)>,
}

//! What a sample means, pure: the rules and the work orders they produce.
//!
//! - [`detect`]: valve transitions (baseline, debounce) and the `[[event]]` rules, each with its
//!   persisted memory.
//! - [`record`]: a work order before ([`record::Draft`]) and after ([`record::Record`]) it has an id,
//!   and its BizData.
//!
//! No I/O and no clock here: the recorder passes `now` in and stores what the rules remember.

pub mod detect;
pub mod record;

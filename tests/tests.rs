//! The integration tests, compiled into one binary (see Cargo.toml `[[test]]`).

mod util;

/// Config and mapping files: every error class, encodings, profiles; `fieldgate check`.
mod config;
/// The sender against the strict mock Panda over real HTTP, with a real sled outbox.
mod sender;

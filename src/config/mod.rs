//! The site configuration: TOML text → `RawConfig` (serde, unknown keys refused, spans kept) →
//! [`Config`], validated once; every later module trusts it and never checks again.
//!
//! The contract is `../shared/spec/config.md`. Every problem found is a [`ConfigIssue`] with file,
//! line, field and what is allowed; validation collects *all* issues before failing, so a
//! commissioning engineer fixes a file in one pass (only a file serde cannot read, for a TOML syntax
//! error, an unknown key or a value of the wrong type, stops at that first problem). The mapping
//! file is loaded here too, because "meter missing from the mapping" is a config error. It never does
//! I/O beyond reading the config file, the files it names (the mapping, `password_file`) and the
//! `FIELDGATE_PANDA_PASSWORD` environment variable; it writes nothing.
//!
//! Files:
//! - `raw.rs`: the serde structs, exactly as the TOML is written;
//! - `validate/`: raw → validated, every issue located (entry points [`load`] and [`parse`]);
//! - `types.rs`: the validated [`Config`] and its parts, and the store's [`Limits`];
//! - `error.rs`: [`ConfigIssue`], [`ConfigError`] and the helpers that locate an issue;
//! - `units.rs`: byte sizes and UTC offsets written as text;
//! - [`mapping`]: the meter → customer CSV; [`point`]: where a value sits in a Modbus table.
//!
//! Imports inside the folder run one way: `validate` → `types` → `mapping` → `error`; `validate` also
//! uses `raw`, `units` and `point`; `error`, `raw`, `units` and `point` use nothing of the folder.

mod error;
pub mod mapping;
pub mod point;
mod raw;
mod types;
mod units;
mod validate;

pub(crate) use self::error::read_error;
pub use self::error::{ConfigError, ConfigIssue};
pub use self::types::{
    AdminConfig, Auth, BusConfig, Config, Limits, MeterConfig, OutboxConfig, PandaConfig, Parity, ReadingSpec, Rs485,
    SiteConfig, Threshold, Transport, ValveSpec,
};
pub(crate) use self::types::{EventKind, EventRule, Side, LOGIN_BACKOFF_MAX, OFFLINE, ONLINE};
pub(crate) use self::units::format_byte_size;
pub(crate) use self::validate::frame_gap_for;
pub(crate) use self::validate::parse_rs485_option;
pub use self::validate::{load, parse};

//! What the store's unit tests share: a draft, a state, roomy bounds, a record made by hand, and the
//! counts as stored.

use super::{Store, Stored, StoredState, COUNTS_KEY};
use crate::config::Limits;
use crate::events::record::{Draft, Record};

pub(super) fn draft(event: &str) -> Draft {
    Draft {
        event_name: event.into(),
        detected_at: "2026-01-01T00:00:00+08:00".into(),
        from: "关闭".into(),
        to: "开启".into(),
        biz_data: "{}".into(),
    }
}

pub(super) fn state(raw: i64) -> StoredState {
    StoredState {
        raw,
        label: format!("L{raw}"),
        since: String::new(),
        ..StoredState::default()
    }
}

pub(super) const BIG: Limits = Limits {
    max_records: 1000,
    max_bytes: 1 << 30,
    ..Limits::DEFAULT
};

pub(super) fn raw_record(id: u64) -> Record {
    Record {
        id,
        event_name: "开".into(),
        meter_no: format!("R{id}"),
        detected_at: String::new(),
        from: String::new(),
        to: String::new(),
        biz_data: "{}".into(),
        attempts: 0,
        rejections: 0,
        last_error: None,
    }
}

/// The counts under `COUNTS_KEY`, as stored.
pub(super) fn stored(o: &Store) -> Option<Stored> {
    o.handle()
        .unwrap()
        .store
        .get(COUNTS_KEY)
        .unwrap()
        .and_then(|v| Stored::parse(&v))
}

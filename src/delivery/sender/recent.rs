//! The work orders delivered last: a ring of the newest [`RECENT_DELIVERIES`] records the server
//! acknowledged with `code: 0`, kept in memory for the status page (`GET /deliveries`).
//!
//! Invariants: bounded (the oldest entry goes when a new one comes); an entry is added only after the
//! acknowledgement of its request was stored, so everything listed has left the outbox; newest first
//! when read. Lost on restart: it is a view, not a record (the server has the work orders).
//!
//! Never: decides anything about delivery, touches the store, or parses a record's BizData (readers
//! do that, off the sender's path).

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::events::record::Record;

/// How many delivered work orders are kept.
pub(crate) const RECENT_DELIVERIES: usize = 50;

/// One delivered work order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Delivered {
    /// The record as it was sent (its BizData carries the customer).
    pub(crate) record: Record,
    /// When the server's `code: 0` for it was stored (RFC 3339 in the site's zone; a label only).
    pub(crate) delivered_at: String,
}

/// The ring of the last [`RECENT_DELIVERIES`] delivered work orders.
#[derive(Debug, Default)]
pub(crate) struct RecentDeliveries {
    entries: Mutex<VecDeque<Delivered>>,
}

impl RecentDeliveries {
    /// Add the records of one acknowledged request (in the order sent), dropping the oldest entries
    /// beyond the bound. Takes the records by value: the sender has no further use for them.
    pub(crate) fn push(&self, records: Vec<Record>, delivered_at: &str) {
        let skip = records.len().saturating_sub(RECENT_DELIVERIES);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        for record in records.into_iter().skip(skip) {
            if entries.len() == RECENT_DELIVERIES {
                entries.pop_front();
            }
            entries.push_back(Delivered {
                record,
                delivered_at: delivered_at.to_string(),
            });
        }
    }

    /// The entries, newest first.
    pub(crate) fn newest_first(&self) -> Vec<Delivered> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64) -> Record {
        Record {
            id,
            event_name: "用水户开阀".into(),
            meter_no: format!("M{id}"),
            detected_at: "2024-05-01T08:00:00+08:00".into(),
            from: "关闭".into(),
            to: "开启".into(),
            biz_data: "{}".into(),
            attempts: 0,
            rejections: 0,
            last_error: None,
        }
    }

    fn ids(r: &RecentDeliveries) -> Vec<u64> {
        r.newest_first().iter().map(|d| d.record.id).collect()
    }

    #[test]
    fn lists_newest_first_with_the_time_of_delivery() {
        let r = RecentDeliveries::default();
        assert!(r.newest_first().is_empty());
        r.push(vec![record(1), record(2)], "t1");
        r.push(vec![record(3)], "t2");
        assert_eq!(ids(&r), [3, 2, 1]);
        let times: Vec<String> = r.newest_first().into_iter().map(|d| d.delivered_at).collect();
        assert_eq!(times, ["t2", "t1", "t1"]);
        assert_eq!(r.newest_first()[0].record, record(3));
    }

    #[test]
    fn keeps_only_the_last_ones_however_they_come() {
        let r = RecentDeliveries::default();
        for id in 1..=(RECENT_DELIVERIES as u64 + 7) {
            r.push(vec![record(id)], "t");
        }
        let want: Vec<u64> = (8..=RECENT_DELIVERIES as u64 + 7).rev().collect();
        assert_eq!(ids(&r), want);

        // One request larger than the ring keeps its last records only.
        let r = RecentDeliveries::default();
        r.push((1..=120).map(record).collect(), "t");
        let want: Vec<u64> = (71..=120).rev().collect();
        assert_eq!(ids(&r), want);
        r.push(vec![record(121)], "t");
        assert_eq!(ids(&r).len(), RECENT_DELIVERIES);
        assert_eq!((ids(&r)[0], ids(&r)[RECENT_DELIVERIES - 1]), (121, 72));
    }
}

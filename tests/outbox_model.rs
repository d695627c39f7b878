//! Model-based test of the outbox (proptest): random sequences of commit, sync, next batch, ack,
//! failed attempt, refusal, bury, requeue and reopen (drop the database and open the same folder) run
//! against the real sled store and against a plain in-memory model. After every step the store must
//! equal the model: no record lost, none duplicated, none reordered, counts and bytes right, the bounds
//! respected; and every batch must be one the sender may send (synced records only, one event, oldest
//! first, no record of a meter ahead of an older one still queued).

use std::collections::{BTreeMap, HashSet};

use fieldgate::config::Limits;
use fieldgate::events::record::Draft;
use fieldgate::events::record::Record;
use fieldgate::store::{Store, StoreError, StoredState};
use proptest::prelude::*;

const METERS: [&str; 4] = ["M1", "M2", "M3", "M4"];
const EVENTS: [&str; 2] = ["用水户开阀", "用水户关阀"];
const LIMITS: Limits = Limits {
    max_records: 12,
    max_bytes: 1 << 30,
    ..Limits::DEFAULT
};

#[derive(Debug, Clone)]
enum Op {
    /// Commit `n` records for a meter (0: only its state).
    Commit {
        meter: usize,
        event: usize,
        n: usize,
    },
    Sync,
    /// Take a batch of at most `max` and check it.
    NextBatch {
        max: usize,
    },
    /// Acknowledge the last batch taken (as the sender does after `code: 0`).
    AckBatch,
    /// Acknowledge one queued record, picked by position.
    Ack(usize),
    NoteFailure(usize),
    NoteRejection(usize),
    Bury(usize),
    /// Requeue one dead letter by position, or all (`None`).
    Requeue(Option<usize>),
    /// Requeue an id that is not a dead letter.
    RequeueMissing,
    /// Drop every handle and open the folder again.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..METERS.len(), 0..EVENTS.len(), 0..3usize).prop_map(|(meter, event, n)| Op::Commit { meter, event, n }),
        2 => Just(Op::Sync),
        3 => (1..6usize).prop_map(|max| Op::NextBatch { max }),
        2 => Just(Op::AckBatch),
        1 => any::<usize>().prop_map(Op::Ack),
        1 => any::<usize>().prop_map(Op::NoteFailure),
        1 => any::<usize>().prop_map(Op::NoteRejection),
        1 => any::<usize>().prop_map(Op::Bury),
        1 => prop::option::of(any::<usize>()).prop_map(Op::Requeue),
        1 => Just(Op::RequeueMissing),
        1 => Just(Op::Reopen),
    ]
}

/// What the model knows of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    meter: String,
    event: String,
    biz: String,
    attempts: u32,
    rejections: u32,
}

impl Entry {
    fn of(r: &Record) -> Entry {
        Entry {
            meter: r.meter_no.clone(),
            event: r.event_name.clone(),
            biz: r.biz_data.clone(),
            attempts: r.attempts,
            rejections: r.rejections,
        }
    }
}

#[derive(Debug, Default)]
struct Model {
    queue: BTreeMap<u64, Entry>,
    dead: BTreeMap<u64, Entry>,
    /// Committed since the last sync (not yet visible to the sender).
    unsynced: HashSet<u64>,
    last_batch: Vec<u64>,
    /// Every id ever handed out, to catch a reused id.
    seen: HashSet<u64>,
    seq: u64,
}

fn nth(map: &BTreeMap<u64, Entry>, i: usize) -> Option<u64> {
    if map.is_empty() {
        None
    } else {
        map.keys().nth(i % map.len()).copied()
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let open = || Store::open(dir.path(), LIMITS).map_err(|e| TestCaseError::fail(format!("open: {e}")));
    let mut store = Some(open()?);
    let mut m = Model::default();
    for (step, op) in ops.into_iter().enumerate() {
        let o = store.as_ref().ok_or_else(|| TestCaseError::fail("no store"))?;
        match op.clone() {
            Op::Commit { meter, event, n } => {
                let meter = METERS[meter];
                let drafts: Vec<Draft> = (0..n)
                    .map(|_| {
                        m.seq += 1;
                        Draft {
                            event_name: EVENTS[event].into(),
                            detected_at: format!("t{}", m.seq),
                            from: "关闭".into(),
                            to: "开启".into(),
                            biz_data: format!("{{\"序号\":\"{}\"}}", m.seq),
                        }
                    })
                    .collect();
                let state = StoredState {
                    raw: m.seq as i64,
                    label: "开启".into(),
                    since: String::new(),
                    ..StoredState::default()
                };
                let before = o.state(meter).map_err(fail)?;
                let fits = m.queue.len() + n <= LIMITS.max_records as usize;
                match o.commit(meter, &state, drafts) {
                    Ok(records) => {
                        prop_assert!(fits || n == 0, "step {step}: committed past the bound");
                        prop_assert_eq!(records.len(), n);
                        for r in &records {
                            prop_assert!(m.seen.insert(r.id), "step {}: id {} reused", step, r.id);
                            prop_assert!(m.queue.keys().all(|k| *k < r.id), "step {step}: ids not increasing");
                            m.queue.insert(r.id, Entry::of(r));
                            m.unsynced.insert(r.id);
                        }
                        prop_assert_eq!(o.state(meter).map_err(fail)?, Some(state));
                    }
                    Err(StoreError::Full { .. }) => {
                        prop_assert!(!fits, "step {step}: refused with room left");
                        prop_assert_eq!(o.state(meter).map_err(fail)?, before, "refused: state unchanged");
                        prop_assert!(o.is_refusing());
                    }
                    Err(e) => return Err(fail(e)),
                }
            }
            Op::Sync => {
                rt.block_on(o.sync()).map_err(fail)?;
                m.unsynced.clear();
            }
            Op::NextBatch { max } => {
                let batch = o.next_batch(max).map_err(fail)?;
                check_batch(&m, &batch, max, step)?;
                m.last_batch = batch.iter().map(|r| r.id).collect();
            }
            Op::AckBatch => {
                let ids = std::mem::take(&mut m.last_batch);
                rt.block_on(o.ack(&ids)).map_err(fail)?;
                for id in ids {
                    m.queue.remove(&id);
                }
                m.unsynced.clear(); // ack syncs
            }
            Op::Ack(i) => {
                if let Some(id) = nth(&m.queue, i) {
                    rt.block_on(o.ack(&[id])).map_err(fail)?;
                    m.queue.remove(&id);
                    m.unsynced.clear();
                }
            }
            Op::NoteFailure(i) => {
                if let Some(id) = nth(&m.queue, i) {
                    let r = o.note_failure(&[id], "transient").map_err(fail)?;
                    let e = m.queue.get_mut(&id).ok_or_else(|| TestCaseError::fail("model"))?;
                    e.attempts += 1;
                    prop_assert_eq!(r.len(), 1);
                    prop_assert_eq!(&Entry::of(&r[0]), &*e);
                }
            }
            Op::NoteRejection(i) => {
                if let Some(id) = nth(&m.queue, i) {
                    let r = o.note_rejection(id, "事件【X】不存在").map_err(fail)?;
                    let e = m.queue.get_mut(&id).ok_or_else(|| TestCaseError::fail("model"))?;
                    e.attempts += 1;
                    e.rejections += 1;
                    prop_assert_eq!(r.map(|r| Entry::of(&r)), Some(e.clone()));
                }
            }
            Op::Bury(i) => {
                if let Some(id) = nth(&m.queue, i) {
                    rt.block_on(o.bury(id, "事件【X】不存在", "t")).map_err(fail)?;
                    if let Some(e) = m.queue.remove(&id) {
                        m.dead.insert(id, e);
                    }
                    m.unsynced.clear();
                }
            }
            Op::Requeue(which) => {
                let target = match which {
                    Some(i) => match nth(&m.dead, i) {
                        Some(id) => Some(id),
                        None => continue,
                    },
                    None => None,
                };
                let n = rt.block_on(o.requeue(target)).map_err(fail)?;
                let ids: Vec<u64> = m
                    .dead
                    .keys()
                    .copied()
                    .filter(|k| target.is_none_or(|t| t == *k))
                    .collect();
                prop_assert_eq!(n, ids.len());
                for id in ids {
                    if let Some(mut e) = m.dead.remove(&id) {
                        e.attempts = 0;
                        e.rejections = 0;
                        m.queue.insert(id, e);
                    }
                }
                m.unsynced.clear();
            }
            Op::RequeueMissing => {
                let n = rt.block_on(o.requeue(Some(u64::MAX))).map_err(fail)?;
                prop_assert_eq!(n, 0);
                m.unsynced.clear(); // requeue syncs, even when nothing moved
            }
            Op::Reopen => {
                drop(store.take()); // the last handle: sled releases its lock
                store = Some(open()?);
                m.unsynced.clear(); // what is on disk at open is durable
                m.last_batch.clear();
            }
        }
        let o = store.as_ref().ok_or_else(|| TestCaseError::fail("no store"))?;
        check_store(&m, o, step, &op)?;
    }
    Ok(())
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// The store equals the model.
fn check_store(m: &Model, o: &Store, step: usize, op: &Op) -> Result<(), TestCaseError> {
    let queued = o.list(1000).map_err(fail)?;
    let got: Vec<(u64, Entry)> = queued.iter().map(|r| (r.id, Entry::of(r))).collect();
    let want: Vec<(u64, Entry)> = m.queue.iter().map(|(k, v)| (*k, v.clone())).collect();
    prop_assert_eq!(got, want, "step {} ({:?}): queue", step, op);
    let dead: Vec<(u64, Entry)> = o
        .dead()
        .map_err(fail)?
        .iter()
        .map(|d| (d.record.id, Entry::of(&d.record)))
        .collect();
    let want: Vec<(u64, Entry)> = m.dead.iter().map(|(k, v)| (*k, v.clone())).collect();
    prop_assert_eq!(dead, want, "step {} ({:?}): dead letters", step, op);
    prop_assert_eq!(o.len(), m.queue.len() as u64, "step {}: len", step);
    prop_assert_eq!(o.dead_len(), m.dead.len() as u64, "step {}: dead_len", step);
    let bytes: u64 = queued
        .iter()
        .map(|r| fieldgate::store::stored_record::encode(r).len() as u64)
        .sum();
    prop_assert_eq!(o.bytes(), bytes, "step {} ({:?}): bytes", step, op);
    Ok(())
}

/// A batch the sender may send.
fn check_batch(m: &Model, batch: &[Record], max: usize, step: usize) -> Result<(), TestCaseError> {
    let durable: Vec<u64> = m.queue.keys().copied().filter(|k| !m.unsynced.contains(k)).collect();
    prop_assert!(batch.len() <= max, "step {step}: batch over max");
    let Some(first) = batch.first() else {
        prop_assert!(
            durable.is_empty(),
            "step {}: empty batch with {} sendable",
            step,
            durable.len()
        );
        return Ok(());
    };
    prop_assert_eq!(Some(first.id), durable.first().copied(), "step {}: oldest first", step);
    let ids: Vec<u64> = batch.iter().map(|r| r.id).collect();
    prop_assert!(ids.windows(2).all(|w| w[0] < w[1]), "step {step}: batch order");
    for r in batch {
        prop_assert!(durable.contains(&r.id), "step {}: {} is not synced", step, r.id);
        prop_assert_eq!(&r.event_name, &first.event_name, "step {}: one event per batch", step);
        prop_assert_eq!(Some(Entry::of(r)), m.queue.get(&r.id).cloned());
        for (older, e) in m.queue.range(..r.id) {
            if e.meter == r.meter_no {
                prop_assert!(
                    ids.contains(older),
                    "step {}: {} of {} goes out ahead of the older {}",
                    step,
                    r.id,
                    r.meter_no,
                    older
                );
            }
        }
    }
    Ok(())
}

proptest! {
    // Each case opens a sled database and fsyncs often: keep the count modest for two cores.
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn the_outbox_behaves_like_its_model(ops in prop::collection::vec(op(), 1..40)) {
        run(ops)?;
    }
}

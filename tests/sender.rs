//! The sender against the strict mock Panda over real HTTP, with a real sled outbox in a temp dir.
//!
//! Nothing here sleeps to assert: every wait is on a condition with a generous deadline, so the tests
//! hold on two busy cores. Retry delays are small (20 ms .. 200 ms).

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::FixedOffset;
use fieldgate::config::Limits;
use fieldgate::config::{Auth, PandaConfig};
use fieldgate::delivery::panda::{answer::DeliveryError, PandaClient};
use fieldgate::delivery::sender::stats::SenderStats;
use fieldgate::delivery::sender::{run_sender, SenderConfig, DEFAULT_DEAD_AFTER};
use fieldgate::events::record::Draft;
use fieldgate::events::record::{render_biz_data, Record};
use fieldgate::store::{Store, StoredState};
use fieldgate::tools::mock_panda::{Fault, MockOptions, MockPanda, RetryAfter};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const OPEN: &str = "用水户开阀";
const CLOSE: &str = "用水户关阀";
const DEADLINE: Duration = Duration::from_secs(20);

fn cst() -> FixedOffset {
    FixedOffset::east_opt(8 * 3600).unwrap()
}

fn token_auth(password: &str) -> Auth {
    Auth::Token {
        username: MockOptions::default().username,
        password: password.into(),
    }
}

fn panda_cfg(base_url: &str, auth: Auth, max_batch: usize) -> PandaConfig {
    PandaConfig {
        base_url: base_url.into(),
        project: "demo".into(),
        auth,
        user_id: 42,
        to_user_ids: "7,8".into(),
        opinion: "请尽快处理".into(),
        timeout: Duration::from_secs(10),
        max_batch,
        retry_min: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        refresh_before: Duration::from_secs(60),
    }
}

async fn start_mock(opts: MockOptions) -> MockPanda {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    MockPanda::start(listener, opts)
}

fn open_outbox(dir: &tempfile::TempDir) -> Store {
    Store::open(
        dir.path(),
        Limits {
            max_records: 10_000,
            max_bytes: 1 << 30,
            ..Limits::DEFAULT
        },
    )
    .unwrap()
}

/// Queue one record for `meter` with `event`; returns it as stored.
async fn queue(outbox: &Store, meter: &str, event: &str) -> Record {
    let state = if event == CLOSE { "关闭" } else { "开启" };
    let biz = render_biz_data(
        &[("用户编号", "U-1"), ("用户名称", "张三"), ("用户地址", "东风路12号")],
        meter,
        state,
        [("累计流量", "1234.56")],
    );
    let stored = StoredState {
        raw: 1,
        label: state.into(),
        since: "2026-01-01T08:00:00+08:00".into(),
        ..StoredState::default()
    };
    let draft = Draft {
        event_name: event.into(),
        detected_at: "2026-01-01T08:00:00+08:00".into(),
        from: "关闭".into(),
        to: state.into(),
        biz_data: biz,
    };
    let mut records = outbox.commit(meter, &stored, vec![draft]).unwrap();
    outbox.sync().await.unwrap();
    records.pop().unwrap()
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A running sender and what a test needs to drive and observe it.
struct Running {
    stats: Arc<SenderStats>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    fn start(outbox: &Store, cfg: PandaConfig) -> Running {
        Running::start_with(outbox, cfg, DEFAULT_DEAD_AFTER)
    }

    fn start_with(outbox: &Store, cfg: PandaConfig, dead_after: u32) -> Running {
        let client = PandaClient::new(&cfg, cst()).unwrap();
        let cfg = SenderConfig {
            dead_after,
            ..SenderConfig::from(cfg)
        };
        let stats = Arc::new(SenderStats::default());
        let wake = Arc::new(Notify::new());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_sender(
            outbox.clone(),
            client,
            cfg,
            wake.clone(),
            shutdown.clone(),
            stats.clone(),
        ));
        Running {
            stats,
            wake,
            shutdown,
            task,
        }
    }

    async fn stop(&mut self) {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, &mut self.task)
            .await
            .expect("the sender stops on shutdown")
            .unwrap();
    }
}

fn biz_of(records: &[Record]) -> Vec<String> {
    records.iter().map(|r| r.biz_data.clone()).collect()
}

#[tokio::test]
async fn records_are_delivered_once_each_with_exact_biz_data_grouped_by_event() {
    let mock = start_mock(MockOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(&dir);
    // O1..O5, C1..C3, O6, O7, each on its own meter.
    let mut records = Vec::new();
    for i in 1..=5 {
        records.push(queue(&outbox, &format!("M{i:02}"), OPEN).await);
    }
    for i in 6..=8 {
        records.push(queue(&outbox, &format!("M{i:02}"), CLOSE).await);
    }
    for i in 9..=10 {
        records.push(queue(&outbox, &format!("M{i:02}"), OPEN).await);
    }
    let mut sender = Running::start(&outbox, panda_cfg(&mock.base_url(), token_auth("1vOkb5Ps4XfitL6G"), 3));
    wait_until("all ten delivered", || {
        sender.stats.delivered.load(Ordering::Relaxed) == 10
    })
    .await;
    assert!(outbox.is_empty());

    let orders = mock.orders();
    // Batches: [O1 O2 O3] [O4 O5 O6] [C1 C2 C3] [O7]: oldest first, same eventName, at most 3.
    assert_eq!(mock.requests(), 4, "one request per batch");
    let by_request: Vec<(u64, &str, usize)> = {
        let mut v: Vec<(u64, &str, usize)> = Vec::new();
        for o in &orders {
            match v.last_mut() {
                Some((req, _, n)) if *req == o.request => *n += 1,
                _ => v.push((o.request, o.event_name.as_str(), 1)),
            }
        }
        v
    };
    let shape: Vec<(&str, usize)> = by_request.iter().map(|(_, e, n)| (*e, *n)).collect();
    assert_eq!(shape, vec![(OPEN, 3), (OPEN, 3), (CLOSE, 3), (OPEN, 1)]);

    // Exactly once each, BizData byte for byte, and the configured fields.
    let sent: Vec<String> = orders.iter().map(|o| o.biz_data.clone()).collect();
    let mut want = biz_of(&records);
    let mut got = sent.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    assert_eq!(
        sent.iter().collect::<HashSet<_>>().len(),
        records.len(),
        "no duplicates"
    );
    for o in &orders {
        assert_eq!(o.user_id, 42);
        assert_eq!(o.to_user_ids, "7,8");
        assert_eq!(o.opinion, "请尽快处理");
        assert!(o.external);
        assert_eq!(o.biz.get("用户名称").unwrap(), "张三");
    }
    assert_eq!(sender.stats.delivered.load(Ordering::Relaxed), 10);
    assert_eq!(sender.stats.ok.load(Ordering::Relaxed), 4);
    assert_eq!(mock.logins(), 1, "one token serves all requests");

    // A record committed later is picked up after a wake-up.
    let late = queue(&outbox, "M11", CLOSE).await;
    sender.wake.notify_one();
    wait_until("the late record", || mock.orders().len() == 11).await;
    assert_eq!(mock.orders().last().unwrap().biz_data, late.biz_data);
    sender.stop().await;
    assert!(outbox.is_empty());
    assert_eq!(mock.orders().len(), 11);
}

#[tokio::test]
async fn records_wait_while_the_server_is_down_and_go_out_once_in_order_after_a_restart() {
    let first = start_mock(MockOptions::default()).await;
    let addr = first.addr();
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(&dir);
    let mut sender = Running::start(&outbox, panda_cfg(&first.base_url(), token_auth("1vOkb5Ps4XfitL6G"), 4));

    // Deliver one first, so the client holds a token and a keep-alive connection to the old server.
    let warm = queue(&outbox, "M00", OPEN).await;
    sender.wake.notify_one();
    wait_until("the first delivery", || first.orders().len() == 1).await;
    assert_eq!(first.orders()[0].biz_data, warm.biz_data);

    first.stop().await;
    let mut records = Vec::new();
    for i in 1..=9 {
        records.push(queue(&outbox, &format!("M{i:02}"), OPEN).await);
    }
    sender.wake.notify_one();
    // The oldest batch is retried; later records wait behind it.
    wait_until("failed attempts while the server is down", || {
        outbox.list(1).unwrap().first().is_some_and(|r| r.attempts >= 2)
    })
    .await;
    assert_eq!(outbox.len(), 9, "nothing is dropped while the server is down");
    assert!(sender.stats.transient.load(Ordering::Relaxed) >= 2);
    let err = sender.stats.last_error().unwrap();
    assert!(err.contains("connect"), "{err}");

    let second = MockPanda::start(TcpListener::bind(addr).await.unwrap(), MockOptions::default());
    wait_until("the backlog to drain after the restart", || {
        sender.stats.delivered.load(Ordering::Relaxed) == 10
    })
    .await;
    assert!(outbox.is_empty());
    let sent: Vec<String> = second.orders().iter().map(|o| o.biz_data.clone()).collect();
    assert_eq!(sent, biz_of(&records), "all delivered once, in detection order");
    assert_eq!(first.orders().len(), 1);
    // The old token means nothing to the restarted server: one 401, one new token, the same request again.
    assert_eq!(second.logins(), 1);
    assert_eq!(
        second.requests(),
        4,
        "a 401, its resend, then two more batches of at most 4"
    );
    assert_eq!(sender.stats.delivered.load(Ordering::Relaxed), 10);
    assert!(sender.stats.last_error().is_none());
    sender.stop().await;
}

#[tokio::test]
async fn deliveries_continue_across_token_expiries_without_loss_or_duplicates() {
    let mock = start_mock(MockOptions {
        token_ttl: Duration::from_millis(1200),
        ..MockOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(&dir);
    let mut sender = Running::start(&outbox, panda_cfg(&mock.base_url(), token_auth("1vOkb5Ps4XfitL6G"), 5));
    let mut records = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    let mut round = 0;
    while mock.logins() < 4 {
        assert!(
            Instant::now() < deadline,
            "tokens were not refreshed: {} logins",
            mock.logins()
        );
        round += 1;
        for k in 0..2 {
            let event = if k == 0 { OPEN } else { CLOSE };
            records.push(queue(&outbox, &format!("R{round:03}-{k}"), event).await);
        }
        sender.wake.notify_one();
        let want = records.len();
        wait_until("this round's delivery", || mock.orders().len() >= want).await;
        // Let time pass so tokens age (not an assertion).
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    wait_until("the outbox to drain", || outbox.is_empty()).await;
    let sent: Vec<String> = mock.orders().iter().map(|o| o.biz_data.clone()).collect();
    assert_eq!(sent.len(), records.len(), "no loss, no duplicates");
    assert_eq!(sent.iter().collect::<HashSet<_>>().len(), records.len());
    let mut want = biz_of(&records);
    let mut got = sent;
    want.sort();
    got.sort();
    assert_eq!(got, want);
    assert!(mock.logins() > 1);
    assert_eq!(sender.stats.token_refreshes.load(Ordering::Relaxed), mock.logins());
    sender.stop().await;
}

#[tokio::test]
async fn an_unknown_event_keeps_its_records_with_the_servers_reason() {
    let mock = start_mock(MockOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(&dir);
    let a = queue(&outbox, "M01", "用水户爆管").await;
    let b = queue(&outbox, "M02", "用水户爆管").await;
    // Never dead-lettered here: this test is about what is kept while refused.
    let mut sender = Running::start_with(
        &outbox,
        panda_cfg(&mock.base_url(), token_auth("1vOkb5Ps4XfitL6G"), 50),
        1000,
    );
    wait_until("several rejected attempts", || {
        outbox.list(10).unwrap().iter().all(|r| r.attempts >= 2)
    })
    .await;
    sender.stop().await;
    let kept = outbox.list(10).unwrap();
    assert_eq!(kept.iter().map(|r| r.id).collect::<Vec<_>>(), vec![a.id, b.id]);
    for r in &kept {
        let e = r.last_error.as_deref().unwrap_or_default();
        assert!(e.contains("事件【用水户爆管】不存在"), "{e}");
        assert_eq!(&r.biz_data, if r.id == a.id { &a.biz_data } else { &b.biz_data });
    }
    assert!(mock.orders().is_empty());
    assert_eq!(sender.stats.delivered.load(Ordering::Relaxed), 0);
    assert!(sender.stats.rejected.load(Ordering::Relaxed) >= 2);
    assert!(sender.stats.last_error().unwrap().contains("不存在"));
}

#[tokio::test]
async fn auth_none_posts_to_the_internal_url_without_a_token() {
    let mock = start_mock(MockOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(&dir);
    let cfg = panda_cfg(&mock.base_url(), Auth::None, 50);
    let client = PandaClient::new(&cfg, cst()).unwrap();
    assert_eq!(
        client.post_url(),
        format!("{}/PandaWorkFlow/WorkFlow/api/PostFlowNodeData", mock.base_url())
    );
    let records = vec![queue(&outbox, "M01", OPEN).await, queue(&outbox, "M02", OPEN).await];
    let mut sender = Running::start(&outbox, cfg);
    wait_until("delivery", || outbox.is_empty()).await;
    sender.stop().await;
    let orders = mock.orders();
    assert_eq!(
        orders.iter().map(|o| o.biz_data.clone()).collect::<Vec<_>>(),
        biz_of(&records)
    );
    assert!(orders.iter().all(|o| !o.external), "internal URL");
    assert_eq!(mock.login_attempts(), 0, "no GenerateToken in auth = none");
}

#[tokio::test]
async fn a_wrong_password_is_a_login_error_and_keeps_the_records() {
    let mock = start_mock(MockOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(&dir);
    let password = "not-the-password";
    let cfg = panda_cfg(&mock.base_url(), token_auth(password), 50);

    let client = PandaClient::new(&cfg, cst()).unwrap();
    let r = queue(&outbox, "M01", OPEN).await;
    assert_eq!(
        client.post(OPEN, std::slice::from_ref(&r)).await,
        Err(DeliveryError::Login("密码错误".into()))
    );

    let mut sender = Running::start(&outbox, cfg);
    wait_until("repeated login failures", || {
        outbox.list(10).unwrap().iter().all(|r| r.attempts >= 2)
    })
    .await;
    sender.stop().await;
    assert_eq!(outbox.len(), 1);
    let kept = &outbox.list(10).unwrap()[0];
    let e = kept.last_error.clone().unwrap();
    assert!(e.contains("密码错误") && !e.contains(password), "{e}");
    assert!(sender.stats.login_failed.load(Ordering::Relaxed) >= 2);
    assert_eq!(mock.requests(), 0, "no PostFlowNodeData without a token");
    assert!(mock.orders().is_empty());
    assert!(!sender.stats.last_error().unwrap().contains(password));
}

#[tokio::test]
async fn concurrent_posts_share_one_login() {
    let mock = start_mock(MockOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(&dir);
    let client = PandaClient::new(&panda_cfg(&mock.base_url(), token_auth("1vOkb5Ps4XfitL6G"), 50), cst()).unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let r = queue(&outbox, &format!("M{i}"), OPEN).await;
        let c = client.clone();
        tasks.push(tokio::spawn(async move { c.post(OPEN, &[r]).await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(mock.logins(), 1, "single-flight token fetch");
    assert_eq!(client.token_refreshes(), 1);
    assert_eq!(mock.orders().len(), 8);
}

#[tokio::test]
async fn a_second_401_in_a_row_is_an_error_not_a_loop() {
    // Tokens that are dead on arrival: every request is refused with 401.
    let mock = start_mock(MockOptions {
        token_ttl: Duration::ZERO,
        ..MockOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(&dir);
    let client = PandaClient::new(&panda_cfg(&mock.base_url(), token_auth("1vOkb5Ps4XfitL6G"), 50), cst()).unwrap();
    let r = queue(&outbox, "M01", OPEN).await;
    assert_eq!(client.post(OPEN, &[r]).await, Err(DeliveryError::Unauthorized));
    assert_eq!(mock.requests(), 2, "the request and one resend");
    assert_eq!(mock.logins(), 2, "a new token for the resend");
    assert!(mock.orders().is_empty());
}

#[tokio::test]
async fn unusable_answers_are_retried_and_delivered_once() {
    let mock = start_mock(MockOptions::default()).await;
    for f in [Fault::Status(500), Fault::Html, Fault::Empty, Fault::Status(502)] {
        mock.push_fault(f);
    }
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(&dir);
    let records = vec![queue(&outbox, "M01", CLOSE).await, queue(&outbox, "M02", CLOSE).await];
    let mut sender = Running::start(&outbox, panda_cfg(&mock.base_url(), token_auth("1vOkb5Ps4XfitL6G"), 50));
    wait_until("delivery after the faults", || outbox.is_empty()).await;
    sender.stop().await;
    assert_eq!(mock.requests(), 5, "four faults, then the delivery");
    assert_eq!(sender.stats.transient.load(Ordering::Relaxed), 4);
    let sent: Vec<String> = mock.orders().iter().map(|o| o.biz_data.clone()).collect();
    assert_eq!(sent, biz_of(&records));
}

#[tokio::test]
async fn shutdown_while_the_server_is_unavailable_keeps_every_record() {
    let mock = start_mock(MockOptions::default()).await;
    mock.set_unavailable(true);
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(&dir);
    queue(&outbox, "M01", OPEN).await;
    let mut sender = Running::start(&outbox, panda_cfg(&mock.base_url(), token_auth("1vOkb5Ps4XfitL6G"), 50));
    wait_until("a failed attempt", || {
        sender.stats.transient.load(Ordering::Relaxed) >= 1
    })
    .await;
    sender.stop().await;
    assert_eq!(outbox.len(), 1);
    assert!(mock.orders().is_empty());
}

#[tokio::test]
async fn the_mock_appends_accepted_orders_as_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("orders.jsonl");
    let mock = start_mock(MockOptions {
        jsonl: Some(jsonl.clone()),
        ..MockOptions::default()
    })
    .await;
    let outbox = open_outbox(&dir);
    let records = vec![queue(&outbox, "M01", OPEN).await, queue(&outbox, "M02", OPEN).await];
    let client = PandaClient::new(&panda_cfg(&mock.base_url(), Auth::None, 50), cst()).unwrap();
    client.post(OPEN, &records).await.unwrap();
    let rejected = client.post("不存在的事件", &records).await;
    assert!(
        matches!(rejected, Err(DeliveryError::Rejected { code: -1, .. })),
        "{rejected:?}"
    );
    let text = std::fs::read_to_string(&jsonl).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "only accepted orders: {text}");
    assert_eq!(lines[0]["event_name"], OPEN);
    assert_eq!(lines[1]["biz_data"], records[1].biz_data.as_str());
    assert_eq!(lines[1]["biz"]["水表表号"], "M02");
}

#[tokio::test]
async fn a_timeout_is_transient_even_though_the_server_may_still_apply_the_request() {
    let mock = start_mock(MockOptions::default()).await;
    mock.push_fault(Fault::SlowAnswer(Duration::from_secs(3)));
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(&dir);
    let mut cfg = panda_cfg(&mock.base_url(), Auth::None, 50);
    cfg.timeout = Duration::from_secs(1);
    let client = PandaClient::new(&cfg, cst()).unwrap();
    let r = queue(&outbox, "M01", OPEN).await;
    match client.post(OPEN, std::slice::from_ref(&r)).await {
        Err(DeliveryError::Transient(reason)) => assert!(reason.contains("timeout"), "{reason}"),
        other => panic!("expected a transient timeout, got {other:?}"),
    }
    // The answer was lost, not the request: this is why delivery is at-least-once.
    assert_eq!(mock.orders().len(), 1);
    assert_eq!(mock.orders()[0].biz_data, r.biz_data);
}

// === issue 4: one rule per server answer, and the bounds of each ===

const PASSWORD: &str = "1vOkb5Ps4XfitL6G";
const UNKNOWN: &str = "用水户爆管";

/// The BizData text of the record queued with sequence number `seq` (see [`queue_seq`]).
fn seq_marker(seq: usize) -> String {
    format!("\"序号\":\"{seq}\"")
}

/// Queue a record whose BizData is unique (a sequence number among the readings).
/// `n` records opening the valves of meters M00, M01, …, record `i` on meter `i` with sequence `i`.
async fn queue_on_meters(outbox: &Store, n: usize) -> Vec<Record> {
    let mut records = Vec::with_capacity(n);
    for i in 0..n {
        records.push(queue_seq(outbox, &format!("M{i:02}"), OPEN, i).await);
    }
    records
}

async fn queue_seq(outbox: &Store, meter: &str, event: &str, seq: usize) -> Record {
    let state = if event == CLOSE { "关闭" } else { "开启" };
    let seq = seq.to_string();
    let biz = render_biz_data(&[("用户编号", "U-1")], meter, state, [("序号", seq.as_str())]);
    let stored = StoredState {
        raw: 1,
        label: state.into(),
        since: String::new(),
        ..StoredState::default()
    };
    let draft = Draft {
        event_name: event.into(),
        detected_at: format!("2026-01-01T08:00:00+08:00#{seq}"),
        from: "关闭".into(),
        to: state.into(),
        biz_data: biz,
    };
    let mut records = outbox.commit(meter, &stored, vec![draft]).unwrap();
    outbox.sync().await.unwrap();
    records.pop().unwrap()
}

/// What the server (or the network) does in a row of the table.
#[derive(Debug, Clone)]
enum Given {
    /// Accepts everything.
    Accepts,
    /// These faults for the first requests, then accepts.
    Faults(Vec<Fault>),
    /// Refuses one event (事件【X】不存在).
    UnknownEvent,
    /// Refuses any request carrying the BizData of the record with this sequence number.
    Poison(usize),
    /// A proxy answers this status with an HTML page to any request carrying the BizData of the record
    /// with this sequence number.
    StatusBiz(u16, usize),
    /// Refuses the first `n` logins with errMsg 密码错误, then accepts.
    LoginRefused(u64),
    /// Nothing listens at the URL (refused connection).
    Refused,
    /// The host does not resolve.
    NoDns,
}

struct Row {
    rule: &'static str,
    given: Given,
    /// (meter, event) of each record, in detection order.
    records: &'static [(&'static str, &'static str)],
    dead_after: u32,
    delivered: &'static [usize],
    queued: &'static [usize],
    dead: &'static [usize],
    /// PostFlowNodeData requests the server received, 401s and resends included.
    requests: u64,
    /// Tokens issued by the server.
    logins: u64,
}

const FOUR_OPEN: &[(&str, &str)] = &[("M1", OPEN), ("M2", OPEN), ("M3", OPEN), ("M4", OPEN)];

fn table() -> Vec<Row> {
    vec![
        Row {
            rule: "code 0: delivered and removed",
            given: Given::Accepts,
            records: FOUR_OPEN,
            dead_after: 2,
            delivered: &[0, 1, 2, 3],
            queued: &[],
            dead: &[],
            requests: 1,
            logins: 1,
        },
        Row {
            // [abcd]✗ [ab]✗ [a]✗ [b]✗ [cd]✗ [c]✗ [d]✗, then each alone once more: dead at 2.
            rule: "code != 0 for every record: split to singles, each dead after dead_after refusals alone",
            given: Given::UnknownEvent,
            records: &[("M1", UNKNOWN), ("M2", UNKNOWN), ("M3", UNKNOWN), ("M4", UNKNOWN)],
            dead_after: 2,
            delivered: &[],
            queued: &[],
            dead: &[0, 1, 2, 3],
            requests: 7 + 4,
            logins: 1,
        },
        Row {
            // [a P c d]✗ [a P]✗ [a]✓ [P]✗ [c d]✓, then [P]✗ → dead.
            rule: "code != 0 for one record: the rest is delivered, the poison is dead-lettered",
            given: Given::Poison(1),
            records: FOUR_OPEN,
            dead_after: 2,
            delivered: &[0, 2, 3],
            queued: &[],
            dead: &[1],
            requests: 5 + 1,
            logins: 1,
        },
        Row {
            // [a P b]✗ [a]✓ [P b]✗ [P]✗ — b waits behind P (same meter) — [P]✗ dead, then [b]✓.
            rule: "a refused record holds back its own meter's later records until it is dead, not others",
            given: Given::Poison(1),
            records: &[("M1", OPEN), ("M2", OPEN), ("M2", OPEN)],
            dead_after: 2,
            delivered: &[0, 2],
            queued: &[],
            dead: &[1],
            requests: 4 + 1 + 1,
            logins: 1,
        },
        Row {
            rule: "401 (the nginx page): one new token, the same request again",
            given: Given::Faults(vec![Fault::Status(401)]),
            records: FOUR_OPEN,
            dead_after: 2,
            delivered: &[0, 1, 2, 3],
            queued: &[],
            dead: &[],
            requests: 2,
            logins: 2,
        },
        Row {
            rule: "401 again with the fresh token: no loop, a backoff, then delivered",
            given: Given::Faults(vec![Fault::Status(401), Fault::Status(401)]),
            records: FOUR_OPEN,
            dead_after: 2,
            delivered: &[0, 1, 2, 3],
            queued: &[],
            dead: &[],
            requests: 3,
            logins: 2,
        },
        Row {
            rule: "GenerateToken errMsg: records kept, retried with backoff, delivered once the login works",
            given: Given::LoginRefused(3),
            records: FOUR_OPEN,
            dead_after: 2,
            delivered: &[0, 1, 2, 3],
            queued: &[],
            dead: &[],
            requests: 1,
            logins: 1,
        },
        Row {
            rule: "5xx, HTML, empty, truncated, reset: transient, kept, delivered once",
            given: Given::Faults(vec![
                Fault::Status(500),
                Fault::Html,
                Fault::Empty,
                Fault::Truncate,
                Fault::Reset,
                Fault::Status(503),
            ]),
            records: FOUR_OPEN,
            dead_after: 2,
            delivered: &[0, 1, 2, 3],
            queued: &[],
            dead: &[],
            requests: 7,
            logins: 1,
        },
        Row {
            // [a P c d]✗ [a P]✗ [a]✓ [P]✗ [c d]✓, then [P]✗ → dead: exactly as for code != 0.
            rule: "413 page for one record (nginx body limit): split, the rest delivered, the one dead",
            given: Given::StatusBiz(413, 1),
            records: FOUR_OPEN,
            dead_after: 2,
            delivered: &[0, 2, 3],
            queued: &[],
            dead: &[1],
            requests: 5 + 1,
            logins: 1,
        },
        Row {
            rule: "403 page for one record (a web application firewall): split, the rest delivered, the one dead",
            given: Given::StatusBiz(403, 2),
            records: FOUR_OPEN,
            dead_after: 2,
            delivered: &[0, 1, 3],
            queued: &[],
            dead: &[2],
            // [a b P d]✗ [a b]✓ [P d]✗ [P]✗ [d]✓, then [P]✗ → dead.
            requests: 5 + 1,
            logins: 1,
        },
        Row {
            rule: "408, 429, 503 with and without Retry-After: transient, kept, delivered once",
            given: Given::Faults(vec![
                Fault::Busy {
                    status: 408,
                    retry_after: Some(RetryAfter::Seconds(0)),
                },
                Fault::Busy {
                    status: 429,
                    retry_after: None,
                },
                Fault::Busy {
                    status: 503,
                    retry_after: Some(RetryAfter::Raw("not a date".into())),
                },
            ]),
            records: FOUR_OPEN,
            dead_after: 1,
            delivered: &[0, 1, 2, 3],
            queued: &[],
            dead: &[],
            requests: 4,
            logins: 1,
        },
        Row {
            rule: "404, 405 (a wrong URL) and other 4xx pages: transient, never a refusal, delivered once",
            given: Given::Faults(vec![Fault::Status(404), Fault::Status(405), Fault::Status(415)]),
            records: FOUR_OPEN,
            dead_after: 1,
            delivered: &[0, 1, 2, 3],
            queued: &[],
            dead: &[],
            requests: 4,
            logins: 1,
        },
        Row {
            rule: "3xx: not followed, transient, delivered once",
            given: Given::Faults(vec![
                Fault::Redirect {
                    status: 301,
                    location: None,
                },
                Fault::Redirect {
                    status: 308,
                    location: Some("http://127.0.0.1:9/elsewhere".into()),
                },
            ]),
            records: FOUR_OPEN,
            dead_after: 1,
            delivered: &[0, 1, 2, 3],
            queued: &[],
            dead: &[],
            requests: 3,
            logins: 1,
        },
        Row {
            rule: "refused connection: transient, kept, never dead",
            given: Given::Refused,
            records: FOUR_OPEN,
            dead_after: 1,
            delivered: &[],
            queued: &[0, 1, 2, 3],
            dead: &[],
            requests: 0,
            logins: 0,
        },
        Row {
            rule: "DNS failure: transient, kept, never dead",
            given: Given::NoDns,
            records: FOUR_OPEN,
            dead_after: 1,
            delivered: &[],
            queued: &[0, 1, 2, 3],
            dead: &[],
            requests: 0,
            logins: 0,
        },
    ]
}

#[tokio::test]
async fn each_server_answer_has_one_rule() {
    for row in table() {
        run_row(&row).await;
    }
}

async fn run_row(row: &Row) {
    let rule = row.rule;
    let mock = start_mock(MockOptions {
        reject_biz: match row.given {
            Given::Poison(seq) => vec![seq_marker(seq)],
            _ => Vec::new(),
        },
        status_biz: match row.given {
            Given::StatusBiz(status, seq) => vec![(status, seq_marker(seq))],
            _ => Vec::new(),
        },
        unknown_events: vec![UNKNOWN.into()],
        events: vec![OPEN.into(), CLOSE.into(), UNKNOWN.into()],
        ..MockOptions::default()
    })
    .await;
    let base_url = match &row.given {
        Given::Refused => {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            drop(l);
            format!("http://{addr}")
        }
        Given::NoDns => "http://fieldgate-test.invalid:8080".to_string(),
        _ => mock.base_url(),
    };
    match &row.given {
        Given::Faults(faults) => faults.iter().cloned().for_each(|f| mock.push_fault(f)),
        Given::LoginRefused(n) => mock.fail_next_logins(*n),
        _ => {}
    }
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(&dir);
    let mut records = Vec::new();
    for (i, (meter, event)) in row.records.iter().enumerate() {
        records.push(queue_seq(&outbox, meter, event, i).await);
    }
    let mut sender = Running::start_with(&outbox, panda_cfg(&base_url, token_auth(PASSWORD), 50), row.dead_after);
    if row.queued.is_empty() {
        wait_until(rule, || outbox.is_empty()).await;
    } else {
        wait_until(rule, || outbox.list(100).unwrap().iter().all(|r| r.attempts >= 3)).await;
    }
    sender.stop().await;

    let pick = |idx: &[usize]| -> Vec<u64> { idx.iter().map(|&i| records[i].id).collect() };
    let by_biz: std::collections::HashMap<&str, u64> = records.iter().map(|r| (r.biz_data.as_str(), r.id)).collect();
    let delivered: Vec<u64> = mock.orders().iter().map(|o| by_biz[o.biz_data.as_str()]).collect();
    assert_eq!(delivered, pick(row.delivered), "{rule}: delivered, once each, in order");
    let queued: Vec<u64> = outbox.list(100).unwrap().iter().map(|r| r.id).collect();
    assert_eq!(queued, pick(row.queued), "{rule}: queued");
    let dead = outbox.dead().unwrap();
    assert_eq!(
        dead.iter().map(|d| d.record.id).collect::<Vec<_>>(),
        pick(row.dead),
        "{rule}: dead"
    );
    assert_eq!(mock.requests(), row.requests, "{rule}: requests");
    assert_eq!(mock.logins(), row.logins, "{rule}: tokens issued");
    for d in &dead {
        assert_eq!(
            d.record.rejections, row.dead_after,
            "{rule}: refused dead_after times alone"
        );
        assert!(
            d.reason.contains("不存在") || d.reason.contains("序号") || d.reason.contains("HTTP 4"),
            "{rule}: {}",
            d.reason
        );
        assert!(!d.died_at.is_empty());
    }
    let stats = &sender.stats;
    assert_eq!(
        stats.dead_lettered.load(Ordering::Relaxed),
        row.dead.len() as u64,
        "{rule}"
    );
    assert_eq!(
        stats.delivered.load(Ordering::Relaxed),
        row.delivered.len() as u64,
        "{rule}"
    );
    assert!(
        !stats.login_failing.load(Ordering::Relaxed),
        "{rule}: login works at the end"
    );
    if let Given::LoginRefused(n) = row.given {
        assert_eq!(stats.login_failed.load(Ordering::Relaxed), n, "{rule}");
        assert_eq!(mock.login_attempts(), n + 1, "{rule}");
    }
    if !row.queued.is_empty() {
        for r in outbox.list(100).unwrap() {
            assert_eq!(r.rejections, 0, "{rule}: an outage is not a refusal");
            assert!(r.last_error.unwrap_or_default().contains("unreachable"), "{rule}");
        }
    }
}

/// Refusals of the bisection of `n` records with one poison at `p`: every part containing it is refused
/// and split, every part without it is one accepted request.
fn bisection_requests(n: usize, p: usize) -> u64 {
    fn go(lo: usize, hi: usize, p: usize) -> u64 {
        if !(lo..hi).contains(&p) || hi - lo == 1 {
            return 1;
        }
        let mid = lo + (hi - lo) / 2;
        1 + go(lo, mid, p) + go(mid, hi, p)
    }
    go(0, n, p)
}

#[tokio::test]
async fn a_poison_record_in_a_batch_of_50_is_dead_after_dead_after_tries_and_49_are_delivered() {
    let dead_after = 5;
    let opts = MockOptions {
        reject_biz: vec![seq_marker(17)],
        ..MockOptions::default()
    };
    let (mock, _, dead, _) = one_bad_record_in_fifty(opts, 17, dead_after).await;
    assert!(dead[0].reason.contains(&seq_marker(17)), "{}", dead[0].reason);
    assert_eq!(
        mock.requests(),
        bisection_requests(50, 17) + u64::from(dead_after) - 1,
        "one split of the batch, then the poison alone until dead"
    );
}

#[tokio::test]
async fn a_compressed_hour_long_outage_loses_nothing_and_duplicates_nothing() {
    // Down for the "hour" (60 minutes of 15 ms), then up but flaky: faults that never apply a request.
    let mock = start_mock(MockOptions {
        fail_rate: 0.3,
        fault_kinds: vec![
            fieldgate::tools::mock_panda::FaultKind::Status500,
            fieldgate::tools::mock_panda::FaultKind::Html,
            fieldgate::tools::mock_panda::FaultKind::Truncate,
            fieldgate::tools::mock_panda::FaultKind::Reset,
        ],
        ..MockOptions::default()
    })
    .await;
    mock.set_unavailable(true);
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(&dir);
    let mut sender = Running::start(&outbox, panda_cfg(&mock.base_url(), token_auth(PASSWORD), 20));
    let mut records = Vec::new();
    for minute in 0..60 {
        // 20 meters; each meter's valve alternates open/close, so a meter's records alternate events.
        for k in 0..3 {
            let n = minute * 3 + k;
            let meter = format!("M{:02}", n % 20);
            let event = if (n / 20) % 2 == 0 { OPEN } else { CLOSE };
            records.push(queue_seq(&outbox, &meter, event, n).await);
        }
        sender.wake.notify_one();
        tokio::time::sleep(Duration::from_millis(15)).await; // the clock of the outage, not an assertion
    }
    assert_eq!(outbox.len(), records.len() as u64, "nothing dropped during the outage");
    assert!(mock.orders().is_empty());
    assert!(sender.stats.transient.load(Ordering::Relaxed) >= 3);
    assert!(outbox.dead().unwrap().is_empty(), "an outage never dead-letters");

    mock.set_unavailable(false);
    wait_until("the backlog to drain", || outbox.is_empty()).await;
    sender.stop().await;
    let orders = mock.orders();
    let got: Vec<&str> = orders.iter().map(|o| o.biz_data.as_str()).collect();
    assert_eq!(got.len(), records.len(), "every record once");
    assert_eq!(got.iter().collect::<HashSet<_>>().len(), records.len(), "no duplicates");
    // Per meter, detection order.
    for m in 0..20 {
        let meter = format!("\"M{m:02}\"");
        let sent: Vec<&str> = got.iter().copied().filter(|b| b.contains(&meter)).collect();
        let want: Vec<&str> = records
            .iter()
            .map(|r| r.biz_data.as_str())
            .filter(|b| b.contains(&meter))
            .collect();
        assert_eq!(sent, want, "meter {meter} in detection order");
    }
    assert_eq!(sender.stats.delivered.load(Ordering::Relaxed), records.len() as u64);
}

#[tokio::test]
async fn a_hundred_concurrent_401s_cause_one_generate_token() {
    let mock = start_mock(MockOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(&dir);
    let client = PandaClient::new(&panda_cfg(&mock.base_url(), token_auth(PASSWORD), 50), cst()).unwrap();
    let warm = queue_seq(&outbox, "M-warm", OPEN, 1000).await;
    client.post(OPEN, &[warm]).await.unwrap();
    assert_eq!(mock.logins(), 1);
    mock.revoke_tokens();

    let mut records = Vec::new();
    for i in 0..100 {
        records.push(queue_seq(&outbox, &format!("M{i:03}"), OPEN, i).await);
    }
    let start = Arc::new(tokio::sync::Barrier::new(100));
    let tasks: Vec<_> = records
        .into_iter()
        .map(|r| {
            let (c, start) = (client.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                c.post(OPEN, &[r]).await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(mock.logins(), 2, "one GenerateToken for all the 401s");
    assert_eq!(client.token_refreshes(), 2);
    assert_eq!(mock.orders().len(), 101);
    let unauthorized = mock.unauthorized();
    // The barrier makes every task take the cached (revoked) token before the first 401 comes back, so
    // normally all 100 are answered 401; under heavy load a late task may already get the new token.
    // What is under test is the single GenerateToken above.
    assert!(unauthorized >= 50, "concurrent 401s: {unauthorized}");
    assert_eq!(mock.requests(), 1 + 100 + unauthorized, "one resend per 401, no more");
}

#[tokio::test]
async fn a_refused_login_raises_the_health_flag_until_the_credentials_work() {
    let mock = start_mock(MockOptions::default()).await;
    mock.set_login_fails(true);
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(&dir);
    let r = queue_seq(&outbox, "M1", OPEN, 1).await;
    let mut sender = Running::start(&outbox, panda_cfg(&mock.base_url(), token_auth(PASSWORD), 50));
    wait_until("the login flag", || sender.stats.login_failing.load(Ordering::Relaxed)).await;
    wait_until("more refused logins", || mock.login_attempts() >= 3).await;
    assert_eq!(outbox.len(), 1, "the record is kept");
    assert_eq!(mock.requests(), 0);
    assert_eq!(
        outbox.list(1).unwrap()[0].rejections,
        0,
        "a login failure is not a refusal of the record"
    );
    mock.set_login_fails(false);
    wait_until("delivery", || outbox.is_empty()).await;
    assert!(!sender.stats.login_failing.load(Ordering::Relaxed));
    sender.stop().await;
    assert_eq!(mock.orders()[0].biz_data, r.biz_data);
}

#[tokio::test]
async fn a_truncated_body_and_a_reset_connection_are_transient_and_not_applied() {
    let mock = start_mock(MockOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(&dir);
    let client = PandaClient::new(&panda_cfg(&mock.base_url(), Auth::None, 50), cst()).unwrap();
    let r = queue_seq(&outbox, "M1", OPEN, 1).await;
    mock.push_fault(Fault::Truncate);
    match client.post(OPEN, std::slice::from_ref(&r)).await {
        Err(DeliveryError::Transient(reason)) => {
            assert!(reason.contains("HTTP 200") && reason.contains("body"), "{reason}")
        }
        other => panic!("expected a transient truncated body, got {other:?}"),
    }
    mock.push_fault(Fault::Reset);
    match client.post(OPEN, std::slice::from_ref(&r)).await {
        Err(DeliveryError::Transient(reason)) => assert!(!reason.contains("HTTP"), "no answer at all: {reason}"),
        other => panic!("expected a transient reset, got {other:?}"),
    }
    assert!(mock.orders().is_empty());
    client.post(OPEN, std::slice::from_ref(&r)).await.unwrap();
    assert_eq!(mock.orders().len(), 1);
    assert_eq!(mock.requests(), 3);
}

// === admin API and `fieldgate outbox` ===

use fieldgate::cli::outbox::{outbox_run, OutboxArgs, OutboxCliError, OutboxCommand};
use fieldgate::ops::admin::serve_admin;
use fieldgate::ops::api::DeadView;
use fieldgate::ops::sources::AdminState;

struct Admin {
    url: String,
    stop: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl Admin {
    async fn start(state: AdminState) -> Admin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve_admin(listener, state, stop.clone()));
        Admin { url, stop, task }
    }

    async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let resp = reqwest::get(format!("{}{path}", self.url)).await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    async fn post(&self, path: &str, body: &str) -> (u16, serde_json::Value) {
        let resp = reqwest::Client::new()
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap_or_default())
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the admin server stops on shutdown")
            .unwrap()
            .unwrap();
    }
}

fn codes(health: &serde_json::Value) -> Vec<String> {
    health["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn the_admin_api_shows_health_and_dead_letters_and_requeues_them() {
    let mock = start_mock(MockOptions {
        events: vec![OPEN.into(), CLOSE.into(), UNKNOWN.into()],
        unknown_events: vec![UNKNOWN.into()],
        ..MockOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(&dir);
    let a = queue_seq(&outbox, "M1", UNKNOWN, 1).await;
    let b = queue_seq(&outbox, "M2", OPEN, 2).await;
    let mut sender = Running::start_with(&outbox, panda_cfg(&mock.base_url(), token_auth(PASSWORD), 50), 1);
    wait_until("b delivered, a dead", || outbox.is_empty() && outbox.dead_len() == 1).await;
    let admin = Admin::start(
        AdminState::new(outbox.clone(), sender.stats.clone(), "test-station").with_wake(sender.wake.clone()),
    )
    .await;

    let (code, health) = admin.get("/healthz").await;
    assert_eq!((code, health["status"].as_str()), (200, Some("degraded")), "{health}");
    assert_eq!(codes(&health), vec!["dead_letters"]);
    assert_eq!(health["site"], "test-station");
    let (_, view) = admin.get("/outbox").await;
    assert_eq!(
        (view["records"].as_u64(), view["dead"].as_u64()),
        (Some(0), Some(1)),
        "{view}"
    );
    let (code, dead) = admin.get("/outbox/dead").await;
    assert_eq!(code, 200);
    let dead: Vec<DeadView> = serde_json::from_value(dead).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].id, dead[0].meter_no.as_str(), dead[0].event_name.as_str()),
        (a.id, "M1", UNKNOWN)
    );
    assert_eq!((dead[0].attempts, dead[0].rejections), (1, 1));
    assert!(dead[0].msg.contains("不存在"), "{}", dead[0].msg);

    assert_eq!(admin.post("/outbox/requeue", r#"{"id": 123456789}"#).await.0, 404);
    assert_eq!(admin.post("/outbox/requeue", "not json").await.0, 400);
    assert_eq!(admin.post("/outbox/requeue", r#"{"id": 1, "all": true}"#).await.0, 400);
    assert_eq!(admin.post("/outbox/requeue", "{}").await.0, 400);
    assert_eq!(outbox.dead_len(), 1, "bad requests change nothing");

    // The operator creates the event on the server, then requeues: delivered without waiting for a tick.
    mock.set_unknown_event(UNKNOWN, false);
    let (code, answer) = admin.post("/outbox/requeue", &format!(r#"{{"id": {}}}"#, a.id)).await;
    assert_eq!((code, answer["requeued"].as_u64()), (200, Some(1)));
    wait_until("the requeued record", || mock.orders().len() == 2).await;
    let sent: Vec<String> = mock.orders().iter().map(|o| o.biz_data.clone()).collect();
    assert_eq!(sent, vec![b.biz_data.clone(), a.biz_data.clone()]);
    wait_until("the outbox to empty", || outbox.is_empty()).await;
    let (code, health) = admin.get("/healthz").await;
    assert_eq!((code, health["status"].as_str()), (200, Some("ok")), "{health}");
    assert_eq!(admin.get("/outbox/dead").await.1, serde_json::json!([]));

    // Credentials refused: critical, 503, until the login works again.
    mock.set_login_fails(true);
    mock.revoke_tokens();
    queue_seq(&outbox, "M3", OPEN, 3).await;
    sender.wake.notify_one();
    wait_until("login flagged", || sender.stats.login_failing.load(Ordering::Relaxed)).await;
    let (code, health) = admin.get("/healthz").await;
    assert_eq!((code, health["status"].as_str()), (503, Some("critical")), "{health}");
    assert_eq!(codes(&health)[0], "login_failing");
    mock.set_login_fails(false);
    wait_until("delivery after the login works", || outbox.is_empty()).await;
    assert_eq!(admin.get("/healthz").await.0, 200);

    sender.stop().await;
    admin.stop().await;
}

#[tokio::test]
async fn a_full_outbox_is_critical_with_the_refused_commits_counted() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Store::open(
        dir.path(),
        Limits {
            max_records: 2,
            max_bytes: 1 << 20,
            ..Limits::DEFAULT
        },
    )
    .unwrap();
    let admin = Admin::start(AdminState::new(outbox.clone(), Arc::new(SenderStats::default()), "s")).await;
    let first = queue_seq(&outbox, "M1", OPEN, 1).await;
    assert_eq!(admin.get("/healthz").await.1["status"], "ok", "half full");
    queue_seq(&outbox, "M2", OPEN, 2).await;
    let (code, health) = admin.get("/healthz").await;
    assert_eq!(
        (code, codes(&health)),
        (200, vec!["outbox_filling".to_string()]),
        "{health}"
    );
    let state = StoredState {
        raw: 0,
        label: "关闭".into(),
        since: String::new(),
        ..StoredState::default()
    };
    let draft = Draft {
        event_name: CLOSE.into(),
        detected_at: String::new(),
        from: "开启".into(),
        to: "关闭".into(),
        biz_data: "{}".into(),
    };
    assert!(outbox.commit("M1", &state, vec![draft]).is_err());
    let (code, health) = admin.get("/healthz").await;
    assert_eq!((code, health["status"].as_str()), (503, Some("critical")), "{health}");
    assert_eq!(codes(&health)[0], "outbox_full");
    assert_eq!(health["outbox"]["refused"], 1);
    let (_, view) = admin.get("/outbox").await;
    assert_eq!(view["refusing"], true);
    assert_eq!(view["oldest"][0]["id"], first.id);
    outbox.ack(&[first.id]).await.unwrap();
    let (code, health) = admin.get("/healthz").await;
    assert_eq!(code, 200, "room again: {health}");
    assert_eq!(health["outbox"]["refused"], 1, "the counter stays");
    admin.stop().await;
}

fn outbox_args(command: OutboxCommand) -> OutboxArgs {
    OutboxArgs {
        command,
        config: None,
        state_dir: None,
        admin: None,
        json: false,
    }
}

#[tokio::test]
async fn the_outbox_command_lists_and_requeues_dead_letters_offline_and_through_the_daemon() {
    let site = crate::util::Site::new(
        &crate::util::site_config("tcp = \"127.0.0.1:1\"", "http://127.0.0.1:1", "none", 1),
        &crate::util::mapping_csv(1),
    );
    let state_dir = site.path().join("state");
    let (a, b) = {
        let outbox = Store::open(
            &state_dir,
            Limits {
                max_records: 100,
                max_bytes: 1 << 20,
                ..Limits::DEFAULT
            },
        )
        .unwrap();
        let a = queue_seq(&outbox, "M1", UNKNOWN, 1).await;
        let b = queue_seq(&outbox, "M2", UNKNOWN, 2).await;
        for r in [&a, &b] {
            outbox.note_rejection(r.id, "事件【用水户爆管】不存在").unwrap();
            outbox
                .bury(r.id, "事件【用水户爆管】不存在", "2026-01-01T09:00:00+08:00")
                .await
                .unwrap();
        }
        (a, b)
    };
    let offline = |command| OutboxArgs {
        state_dir: Some(state_dir.clone()),
        ..outbox_args(command)
    };

    let text = outbox_run(offline(OutboxCommand::Dead)).await.unwrap();
    assert!(text.starts_with("2 dead letter(s)"), "{text}");
    let line = text.lines().find(|l| l.starts_with(&a.id.to_string())).unwrap();
    for want in ["M1", UNKNOWN, "事件【用水户爆管】不存在", "\t1\t1\t"] {
        assert!(line.contains(want), "{want} in {line}");
    }
    let json = outbox_run(OutboxArgs {
        json: true,
        ..offline(OutboxCommand::Dead)
    })
    .await
    .unwrap();
    let listed: Vec<DeadView> = serde_json::from_str(&json).unwrap();
    assert_eq!(listed.iter().map(|d| d.id).collect::<Vec<_>>(), vec![a.id, b.id]);

    let err = outbox_run(offline(OutboxCommand::Requeue {
        id: Some(999_999_999),
        all: false,
    }))
    .await
    .unwrap_err();
    assert_eq!(err.error_code(), "not_found", "{err}");
    let text = outbox_run(offline(OutboxCommand::Requeue {
        id: Some(a.id),
        all: false,
    }))
    .await
    .unwrap();
    assert!(text.contains(&format!("Requeued record {}", a.id)), "{text}");
    {
        let outbox = open_outbox_at(&state_dir);
        let queued = outbox.list(10).unwrap();
        assert_eq!(queued.iter().map(|r| r.id).collect::<Vec<_>>(), vec![a.id]);
        assert_eq!((queued[0].attempts, queued[0].rejections), (0, 0), "a fresh start");
        assert_eq!(queued[0].biz_data, a.biz_data);
        assert_eq!(outbox.dead_len(), 1);
    }

    // The daemon runs (the database is locked): a plain error, or the admin API.
    let daemon = open_outbox_at(&state_dir);
    let err = outbox_run(offline(OutboxCommand::Dead)).await.unwrap_err();
    assert!(matches!(err, OutboxCliError::Locked { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("daemon is running") && msg.contains("http://127.0.0.1:9898/outbox/dead"),
        "{msg}"
    );
    let admin = Admin::start(AdminState::new(daemon.clone(), Arc::new(SenderStats::default()), "s")).await;
    let text = outbox_run(OutboxArgs {
        admin: Some(admin.url.clone()),
        ..outbox_args(OutboxCommand::Dead)
    })
    .await
    .unwrap();
    assert!(
        text.starts_with("1 dead letter(s) in the running daemon") && text.contains(&b.id.to_string()),
        "{text}"
    );
    // Through --config: the state dir is locked, so it asks the daemon at [admin] listen.
    let cfg = std::fs::read_to_string(site.config_path()).unwrap().replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"{}\"", admin.url.trim_start_matches("http://")),
    );
    std::fs::write(site.config_path(), cfg).unwrap();
    let text = outbox_run(OutboxArgs {
        config: Some(site.config_path()),
        ..outbox_args(OutboxCommand::Requeue { id: None, all: true })
    })
    .await
    .unwrap();
    assert!(
        text.contains("Requeued 1 dead letter(s) in the running daemon"),
        "{text}"
    );
    assert_eq!(daemon.dead_len(), 0);
    assert_eq!(daemon.len(), 2);
    admin.stop().await;
    drop(daemon);

    let empty = tempfile::tempdir().unwrap();
    let err = outbox_run(OutboxArgs {
        state_dir: Some(empty.path().to_path_buf()),
        ..outbox_args(OutboxCommand::Dead)
    })
    .await
    .unwrap_err();
    assert_eq!(err.error_code(), "no_database", "{err}");
    assert!(!empty.path().join("db").exists(), "never creates a database");
}

fn open_outbox_at(dir: &std::path::Path) -> Store {
    Store::open(
        dir,
        Limits {
            max_records: 100,
            max_bytes: 1 << 20,
            ..Limits::DEFAULT
        },
    )
    .unwrap()
}

// === issue 14: odd HTTP answers (Retry-After, a proxy's 4xx pages, redirects) ===

/// A sender against a mock answering `status` with `retry_after` once: the second request arrives no
/// sooner than the server asked, even though a new record and a wake-up come meanwhile. Lower bounds
/// only (a slow machine makes the gap longer, never shorter).
async fn busy_then_accepted(status: u16, retry_after: RetryAfter, at_least: Duration) {
    let mock = start_mock(MockOptions::default()).await;
    mock.push_fault(Fault::Busy {
        status,
        retry_after: Some(retry_after),
    });
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(&dir);
    let mut records = vec![
        queue_seq(&outbox, "M1", OPEN, 1).await,
        queue_seq(&outbox, "M2", OPEN, 2).await,
    ];
    // Backoff of 20..200 ms: far below the server's wish, so only Retry-After can explain the gap.
    let mut sender = Running::start(&outbox, panda_cfg(&mock.base_url(), token_auth(PASSWORD), 50));
    wait_until("the busy answer", || !mock.request_log().is_empty()).await;
    records.push(queue_seq(&outbox, "M3", OPEN, 3).await);
    sender.wake.notify_one();
    wait_until("every record delivered", || outbox.is_empty()).await;
    sender.stop().await;

    let log = mock.request_log();
    assert_eq!(log[0].status, status);
    assert!(log[0].retry_after.is_some(), "the mock sent Retry-After");
    assert_eq!(log[1].status, 200, "the second request is accepted");
    let gap = log[1].at - log[0].at;
    assert!(
        gap >= at_least,
        "HTTP {status} with Retry-After {:?}: the next request came after {gap:?}, before {at_least:?}",
        log[0].retry_after
    );
    let sent: Vec<String> = mock.orders().iter().map(|o| o.biz_data.clone()).collect();
    let mut want = biz_of(&records);
    let mut got = sent.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want, "each delivered once");
    let stats = sender.stats.snapshot();
    assert_eq!((stats.throttled, stats.transient), (1, 1));
    assert_eq!(stats.records_rejected, 0);
}

#[tokio::test]
async fn a_429_with_retry_after_seconds_holds_the_next_request_back_that_long() {
    busy_then_accepted(429, RetryAfter::Seconds(2), Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_408_with_retry_after_seconds_holds_the_next_request_back_that_long() {
    busy_then_accepted(408, RetryAfter::Seconds(1), Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_503_with_an_http_date_holds_the_next_request_back_until_then() {
    // The mock sends `Date` and a Retry-After date 2 s later (whole seconds): a 2 s delay exactly.
    busy_then_accepted(503, RetryAfter::DateIn(Duration::from_secs(2)), Duration::from_secs(2)).await;
}

/// 50 records on 50 meters, sent against a mock with `opts` that refuses record `poison`. Checks that
/// the other 49 arrive once each in detection order and `poison` is the one dead letter, kept as it
/// was queued, after `dead_after` refusals. Returns the mock, the records, the dead letters and the
/// sender's counters.
async fn one_bad_record_in_fifty(
    opts: MockOptions,
    poison: usize,
    dead_after: u32,
) -> (
    MockPanda,
    Vec<Record>,
    Vec<fieldgate::store::DeadLetter>,
    fieldgate::delivery::sender::stats::SenderSnapshot,
) {
    let mock = start_mock(opts).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(&dir);
    let records = queue_on_meters(&outbox, 50).await;
    let mut sender = Running::start_with(
        &outbox,
        panda_cfg(&mock.base_url(), token_auth(PASSWORD), 50),
        dead_after,
    );
    wait_until("the outbox to settle", || outbox.is_empty()).await;
    sender.stop().await;

    let want: Vec<&str> = records
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != poison)
        .map(|(_, r)| r.biz_data.as_str())
        .collect();
    let got: Vec<String> = mock.orders().iter().map(|o| o.biz_data.clone()).collect();
    assert_eq!(got, want, "49 delivered, once each, in detection order");
    let dead = outbox.dead().unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].record.id, records[poison].id);
    assert_eq!(dead[0].record.rejections, dead_after);
    assert_eq!(
        dead[0].record.biz_data, records[poison].biz_data,
        "kept as it was queued"
    );
    let stats = sender.stats.snapshot();
    assert_eq!(stats.dead_lettered, 1);
    assert_eq!(stats.delivered, 49);
    assert_eq!(stats.records_rejected, u64::from(dead_after));
    (mock, records, dead, stats)
}

/// [`one_bad_record_in_fifty`] where a proxy answers `status` with an HTML page to any request carrying
/// record `poison`.
async fn one_record_refused_by_a_proxy(
    status: u16,
    poison: usize,
    dead_after: u32,
) -> (
    MockPanda,
    Vec<Record>,
    Vec<fieldgate::store::DeadLetter>,
    fieldgate::delivery::sender::stats::SenderSnapshot,
) {
    let opts = MockOptions {
        status_biz: vec![(status, seq_marker(poison))],
        ..MockOptions::default()
    };
    let out = one_bad_record_in_fifty(opts, poison, dead_after).await;
    let (_, _, dead, stats) = &out;
    assert!(dead[0].reason.contains(&format!("HTTP {status}")), "{}", dead[0].reason);
    assert_eq!(stats.http_refused, stats.rejected, "every refusal was the proxy's page");
    out
}

#[tokio::test]
async fn a_413_page_for_one_record_in_a_batch_of_50_delivers_49_once_and_dead_letters_the_one() {
    let dead_after = 5;
    let (mock, _, dead, stats) = one_record_refused_by_a_proxy(413, 17, dead_after).await;
    assert!(
        dead[0].reason.contains("413 Request Entity Too Large"),
        "{}",
        dead[0].reason
    );
    // Split exactly as for a `code != 0` refusal: the server accepted other halves in the same round.
    assert_eq!(mock.requests(), bisection_requests(50, 17) + u64::from(dead_after) - 1);
    assert_eq!(stats.ok + stats.rejected, mock.requests());
}

#[tokio::test]
async fn a_403_page_for_the_oldest_record_counts_only_once_others_got_through() {
    // The firewall's first refusal of record 0 comes before anything was accepted in that round:
    // [50]✗ [25]✗ [12]✗ [6]✗ [3]✗ [0]✗ is not proof against record 0 (it could be a rule against the
    // gateway). The other 49 go first, in one request, and are accepted; from then on each refusal of
    // record 0 counts, and it is dead after `dead_after` of them.
    let dead_after = 3;
    let (mock, _, dead, _) = one_record_refused_by_a_proxy(403, 0, dead_after).await;
    assert_eq!(mock.requests(), 6 + 1 + u64::from(dead_after));
    assert_eq!(
        dead[0].record.attempts,
        dead_after + 1,
        "one attempt that was not a refusal"
    );
    let log = mock.request_log();
    assert_eq!(
        log.iter().map(|r| r.status).collect::<Vec<_>>(),
        [vec![403; 6], vec![200], vec![403; dead_after as usize]].concat()
    );
}

#[tokio::test]
async fn a_batch_over_the_proxys_body_limit_is_split_until_it_fits_and_delivered_once() {
    let mock = start_mock(MockOptions {
        // Room for a few records per request: nginx's client_max_body_size, scaled down.
        max_body: Some(2_000),
        ..MockOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(&dir);
    let records = queue_on_meters(&outbox, 50).await;
    let mut sender = Running::start_with(&outbox, panda_cfg(&mock.base_url(), token_auth(PASSWORD), 50), 1);
    wait_until("every record delivered", || outbox.is_empty()).await;
    sender.stop().await;
    let got: Vec<String> = mock.orders().iter().map(|o| o.biz_data.clone()).collect();
    assert_eq!(got, biz_of(&records), "all 50, once each, in order");
    assert!(outbox.dead().unwrap().is_empty(), "no record is too large alone");
    let stats = sender.stats.snapshot();
    assert!(stats.http_refused >= 1, "the first batch was too large");
    assert_eq!(stats.records_rejected, 0);
    assert!(mock.request_log().iter().any(|r| r.status == 413));
}

#[tokio::test]
async fn a_firewall_refusing_every_record_dead_letters_none_and_delivery_resumes_when_lifted() {
    // A rule against the gateway itself (every request answered 403): no request ever reaches Panda, so
    // no refusal is held against a record, even with dead_after = 1.
    let mock = start_mock(MockOptions {
        status_biz: vec![(403, "序号".into())],
        ..MockOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(&dir);
    let records = queue_on_meters(&outbox, 20).await;
    let mut sender = Running::start_with(&outbox, panda_cfg(&mock.base_url(), token_auth(PASSWORD), 50), 1);
    wait_until("several refused rounds", || {
        mock.request_log().iter().filter(|r| r.status == 403).count() >= 30
    })
    .await;
    assert!(outbox.dead().unwrap().is_empty(), "nothing dead-lettered");
    assert_eq!(outbox.len(), 20, "every record kept");
    assert!(outbox.list(100).unwrap().iter().all(|r| r.rejections == 0));
    let stats = sender.stats.snapshot();
    assert_eq!(
        (stats.records_rejected, stats.dead_lettered, stats.delivered),
        (0, 0, 0)
    );
    let err = stats.last_error.unwrap_or_default();
    assert!(err.contains("HTTP 403") && err.contains("in front of Panda"), "{err}");

    mock.set_status_biz(Vec::new());
    wait_until("delivery once the rule is lifted", || outbox.is_empty()).await;
    sender.stop().await;
    let mut got: Vec<String> = mock.orders().iter().map(|o| o.biz_data.clone()).collect();
    let mut want = biz_of(&records);
    got.sort();
    want.sort();
    assert_eq!(got, want, "each delivered once");
    assert!(outbox.dead().unwrap().is_empty());
}

#[tokio::test]
async fn a_redirect_is_never_followed_keeps_the_records_and_names_its_location_in_health() {
    // Where the redirect points: another server that must never see a request.
    let elsewhere = start_mock(MockOptions::default()).await;
    let location = format!(
        "{}/pandaServer/demo/PandaWorkFlow/WorkFlow/api/PostFlowNodeData",
        elsewhere.base_url()
    );
    let mock = start_mock(MockOptions::default()).await;
    mock.set_redirect(Some((301, location.clone())));
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(&dir);
    let mut records = Vec::new();
    for i in 0..3 {
        records.push(queue_seq(&outbox, &format!("M{i}"), OPEN, i).await);
    }
    let mut sender = Running::start_with(&outbox, panda_cfg(&mock.base_url(), token_auth(PASSWORD), 50), 1);
    wait_until("several redirected attempts", || {
        sender.stats.redirects.load(Ordering::Relaxed) >= 3
    })
    .await;
    assert_eq!(outbox.len(), 3, "records kept");
    assert!(outbox.dead().unwrap().is_empty());
    let snapshot = sender.stats.snapshot();
    let err = snapshot.last_error.clone().unwrap_or_default();
    assert!(err.contains(&location) && err.contains("panda.base_url"), "{err}");
    assert!(!snapshot.login_failing, "a redirect is not a refused login");
    let counts = fieldgate::ops::api::OutboxCounts {
        records: 3,
        max_records: 10_000,
        max_bytes: 1 << 30,
        ..Default::default()
    };
    let findings = fieldgate::ops::health::delivery_findings(&counts, &snapshot);
    let failing = findings
        .iter()
        .find(|f| f.code == "delivery_failing")
        .expect("health says delivery is failing");
    assert!(failing.message.contains(&location), "{}", failing.message);
    for r in outbox.list(10).unwrap() {
        assert!(r.last_error.unwrap_or_default().contains(&location));
        assert_eq!(r.rejections, 0);
    }

    // The login works again, but PostFlowNodeData is redirected once (http→https at a proxy).
    mock.set_redirect(None);
    mock.push_fault(Fault::Redirect {
        status: 307,
        location: Some(location.clone()),
    });
    wait_until("delivery after the redirects stop", || outbox.is_empty()).await;
    sender.stop().await;
    let got: Vec<String> = mock.orders().iter().map(|o| o.biz_data.clone()).collect();
    assert_eq!(got, biz_of(&records), "delivered once, in order");
    let log = mock.request_log();
    assert_eq!(log.iter().map(|r| r.status).collect::<Vec<_>>(), vec![307, 200]);
    assert_eq!(log[0].location.as_deref(), Some(location.as_str()));
    assert_eq!(
        (elsewhere.requests(), elsewhere.login_attempts()),
        (0, 0),
        "no request went to the Location"
    );
}

#[tokio::test]
async fn a_relative_location_is_named_as_a_full_url() {
    let mock = start_mock(MockOptions::default()).await;
    mock.push_fault(Fault::Redirect {
        status: 302,
        location: Some("/moved/PostFlowNodeData".into()),
    });
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(&dir);
    let client = PandaClient::new(&panda_cfg(&mock.base_url(), Auth::None, 50), cst()).unwrap();
    let r = queue_seq(&outbox, "M1", OPEN, 1).await;
    match client.post(OPEN, std::slice::from_ref(&r)).await {
        Err(e @ DeliveryError::Redirect { .. }) => {
            let want = format!("{}/moved/PostFlowNodeData", mock.base_url());
            assert!(e.to_string().contains(&want), "{e}");
        }
        other => panic!("expected a redirect error, got {other:?}"),
    }
    assert_eq!(mock.requests(), 1, "not followed");
    client.post(OPEN, std::slice::from_ref(&r)).await.unwrap();
}

//! The sender against the strict mock Panda over real HTTP, with a real sled outbox in a temp dir.
//!
//! Nothing here sleeps to assert: every wait is on a condition with a generous deadline, so the tests
//! hold on two busy cores. Retry delays are small (20 ms .. 200 ms).

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::FixedOffset;
use fieldgate::config::{Auth, PandaConfig};
use fieldgate::mock_panda::{Fault, MockOptions, MockPanda};
use fieldgate::outbox::{Draft, Limits, Outbox, StoredState};
use fieldgate::panda::{DeliveryError, PandaClient};
use fieldgate::record::{render_biz_data, Record};
use fieldgate::sender::{run_sender, SenderStats};
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

fn open_outbox(dir: &tempfile::TempDir) -> Outbox {
    Outbox::open(
        dir.path(),
        Limits {
            max_records: 10_000,
            max_bytes: 1 << 30,
        },
    )
    .unwrap()
}

/// Queue one record for `meter` with `event`; returns it as stored.
async fn queue(outbox: &Outbox, meter: &str, event: &str) -> Record {
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
    fn start(outbox: &Outbox, cfg: PandaConfig) -> Running {
        let client = PandaClient::new(&cfg, cst()).unwrap();
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
    let mut sender = Running::start(&outbox, panda_cfg(&mock.base_url(), token_auth("1vOkb5Ps4XfitL6G"), 50));
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

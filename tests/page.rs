//! The status page (`GET /` on the admin port) in a real browser, and what a state-changing request
//! must show.
//!
//! The browser test drives Debian's headless Chromium over WebDriver (`chromedriver` as a child
//! process, `fantoccini` as the client) against the in-process simulator (Modbus TCP) → gateway
//! (`app::start`, real sled on disk) → mock Panda (loopback HTTP). It reads the page's DOM through
//! WebDriver, waiting on conditions with a generous deadline (the page refreshes by itself every 2 s),
//! and compares what the page shows with the admin API's JSON. It saves `docs/status-page.png`, the
//! screenshot the README shows.
//!
//! The guard tests send plain HTTP (reqwest): a form, a foreign `Origin`, a rebound `Host` are refused
//! and requeue nothing; the same origin with JSON requeues.

use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use fieldgate::app::Gateway;
use fieldgate::tools::mock_panda::MockOptions;
use serde_json::{json, Value};

use crate::e2e::{rig, wait_for_baselines, wait_orders, Rig};
use crate::util::{wait_until, DEADLINE};

const GRACE: Duration = Duration::from_secs(10);

/// How long the page may take to show something: two of its refreshes and a browser on a busy
/// 2-core machine fit many times over.
const PAGE_DEADLINE: Duration = Duration::from_secs(60);

const CLOSE: &str = "用水户关阀";
const OPEN: &str = "用水户开阀";

fn admin(gw: &Gateway) -> String {
    format!("http://{}", gw.admin_addr.expect("the admin API is bound"))
}

async fn get_json(gw: &Gateway, path: &str) -> Value {
    let resp = reqwest::get(format!("{}{path}", admin(gw))).await.unwrap();
    let text = resp.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"))
}

/// A rig with `n` meters where a record the server refuses is a dead letter at once (`dead_after = 1`).
async fn refusing_rig(n: usize) -> Rig {
    let rig = rig(n, "token", MockOptions::default()).await;
    let config = std::fs::read_to_string(rig.site.config_path()).unwrap() + "\n[outbox]\ndead_after = 1\n";
    std::fs::write(rig.site.config_path(), config).unwrap();
    rig
}

/// Flip `unit` while the server refuses `event` (what the flip makes), and wait until it is a dead
/// letter; its id.
async fn dead_letter(rig: &Rig, gw: &Gateway, unit: u8, event: &str) -> u64 {
    rig.panda.set_unknown_event(event, true);
    rig.plant.flip_valve(unit);
    wait_until("one dead letter", || async {
        get_json(gw, "/outbox/dead")
            .await
            .as_array()
            .is_some_and(|a| a.len() == 1)
    })
    .await;
    let dead = get_json(gw, "/outbox/dead").await;
    assert_eq!(dead[0]["meter_no"], format!("M{unit}"), "{dead}");
    assert_eq!(dead[0]["msg"], format!("事件【{event}】不存在"), "{dead}");
    dead[0]["id"].as_u64().unwrap()
}

// === the browser ===

/// `chromedriver` on a free loopback port, in its own process group: dropping it kills the group,
/// the Chromium it started included, even when a test fails before closing its session.
struct Chromedriver {
    child: Child,
    port: u16,
}

const PACKAGES: &str = "this test needs Chromium and its WebDriver (apt-get install chromium chromium-driver)";

impl Chromedriver {
    async fn start() -> Chromedriver {
        for tool in ["chromium", "chromedriver"] {
            if let Err(e) = Command::new(tool).arg("--version").output() {
                panic!("{PACKAGES}: cannot run {tool}: {e}");
            }
        }
        // Bound and released at once: chromedriver binds it next (a port taken meanwhile fails the
        // start below with chromedriver's own message, not a wrong connection).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            // The station laptop's zone: the page shows the gateway's clock in the browser's zone,
            // beside times in the site's (+08:00 in the test config).
            .env("TZ", "Asia/Shanghai")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{PACKAGES}: cannot start chromedriver: {e}"));
        let mut driver = Chromedriver { child, port };
        let url = format!("http://127.0.0.1:{port}/status");
        let start = Instant::now();
        loop {
            if let Ok(r) = reqwest::get(&url).await {
                let status: Value = r.json().await.unwrap_or_default();
                if status["value"]["ready"] == true {
                    return driver;
                }
            }
            if let Ok(Some(exit)) = driver.child.try_wait() {
                panic!("chromedriver exited before it was ready ({exit}); {PACKAGES}");
            }
            assert!(start.elapsed() < DEADLINE, "chromedriver not ready after {DEADLINE:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A headless Chromium session (CI runs as root: no sandbox).
    async fn browser(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({ "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1280,1000",
                "--lang=zh-CN",
            ] }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .unwrap_or_else(|e| panic!("no Chromium session from chromedriver: {e}; {PACKAGES}"))
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `script` in the page until its value satisfies `cond`; that value. Panics with the last value
/// after [`PAGE_DEADLINE`].
async fn wait_page(client: &Client, what: &str, script: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let value = client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("script for {what}: {e}"));
        if cond(&value) {
            return value;
        }
        assert!(
            start.elapsed() < PAGE_DEADLINE,
            "timed out after {PAGE_DEADLINE:?} waiting for the page to show {what}; it shows: {value}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The meters table: meter, online, valve state, and the text of each cell by its data-field.
const METERS: &str = r#"return Array.from(document.querySelectorAll('#meters tbody tr')).map(tr => {
    const text = f => tr.querySelector(`[data-field="${f}"]`).textContent;
    return { meter: tr.dataset.meter, online: tr.dataset.online, state: tr.dataset.state,
             customer: text('customer'), link: text('link'), valve: text('valve'), readings: text('readings'),
             answer: text('answer'), error: text('error') };
});"#;

/// The deliveries table: id and the text of each cell.
const DELIVERIES: &str = r#"return Array.from(document.querySelectorAll('#deliveries tbody tr')).map(tr => {
    const text = f => tr.querySelector(`[data-field="${f}"]`).textContent;
    return { id: Number(tr.dataset.id), time: text('time'), event: text('event'), meter: text('meter'),
             customer: text('customer'), to: text('to') };
});"#;

/// The dead letters table.
const DEAD: &str = r#"return { shown: !document.querySelector('#dead').hidden,
    none: !document.querySelector('#dead-none').hidden,
    rows: Array.from(document.querySelectorAll('#dead tbody tr')).map(tr => ({
        id: Number(tr.dataset.id), meter: tr.dataset.meter,
        msg: tr.querySelector('[data-field="msg"]').textContent,
        button: tr.querySelector('button[data-requeue]').textContent })) };"#;

/// The header and the bus and outbox sections.
const SUMMARY: &str = r#"const q = s => document.querySelector(s);
return { lang: document.documentElement.lang, health: q('#health').dataset.status, badge: q('#health').textContent,
    reasons: Array.from(document.querySelectorAll('#reasons li')).map(li => li.dataset.code),
    clock: q('#clock').dataset.sync, conn: q('#conn').dataset.ok, refreshes: Number(q('#conn').dataset.count),
    buses: Array.from(document.querySelectorAll('#buses tbody tr')).map(tr => ({ bus: tr.dataset.bus, up: tr.dataset.up,
        meters: tr.querySelector('[data-field="meters"]').textContent,
        round: tr.querySelector('[data-field="round"]').textContent,
        errors: tr.querySelector('[data-field="errors"]').textContent })),
    queued: q('#outbox dd[data-field="queued"]') && q('#outbox dd[data-field="queued"]').textContent,
    refusing: q('#outbox dd[data-field="refusing"]') && q('#outbox dd[data-field="refusing"]').textContent,
    headers: Array.from(document.querySelectorAll('#meters thead th')).map(th => th.textContent),
    requeue: q('#requeue-status').textContent };"#;

fn rows(v: &Value) -> &Vec<Value> {
    v.as_array().unwrap_or_else(|| panic!("not a list: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_meters_deliveries_and_requeues_a_dead_letter_in_chromium() {
    let rig = refusing_rig(3).await;
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    let driver = Chromedriver::start().await;
    let client = driver.browser().await;
    client.goto(&format!("{}/", admin(&gw))).await.unwrap();

    // Every meter, with its customer from the mapping and its valve state; labels in Chinese.
    let meters = wait_page(&client, "three meters, read", METERS, |v| {
        rows(v).len() == 3 && rows(v).iter().all(|m| m["state"] == "关闭")
    })
    .await;
    for (i, m) in rows(&meters).iter().enumerate() {
        let n = i + 1;
        assert_eq!(
            (&m["meter"], &m["online"], &m["customer"], &m["link"]),
            (
                &json!(format!("M{n}")),
                &json!("true"),
                &json!(format!("用户{n} (U{n:04})")),
                &json!("在线")
            ),
            "{m}"
        );
        assert!(m["valve"].as_str().unwrap().starts_with("关闭变化于 "), "{m}");
        assert_eq!(
            m["readings"],
            format!(
                "累计流量 {}电池电压 3.{:02}",
                crate::e2e::flow(&rig.plant, n as u8),
                50 + n
            )
        );
        assert!(m["answer"].as_str().unwrap().contains(" ms最慢 "), "{m}");
        assert_eq!(m["error"], "无", "{m}");
    }
    let summary = wait_page(&client, "health ok", SUMMARY, |v| v["health"] == "ok").await;
    assert_eq!(summary["lang"], "zh-CN");
    assert_eq!(summary["badge"], "正常");
    assert_eq!(summary["reasons"], json!([]));
    assert_eq!(summary["conn"], "true");
    assert_eq!(
        summary["headers"],
        json!(["表号", "用户", "在线", "阀门", "读数", "应答时间", "最近错误"])
    );
    let bus = &summary["buses"][0];
    assert_eq!(
        (&bus["bus"], &bus["up"], &bus["meters"]),
        (&json!("line-a"), &json!("true"), &json!("3 / 3"))
    );
    assert!(bus["round"].as_str().unwrap().ends_with(" / 50 ms"), "{bus}");
    assert!(
        bus["errors"]
            .as_str()
            .unwrap()
            .starts_with("超时 0 · 异常应答 0 · 报文错误 0 · 传输错误 0 · 连接失败 0"),
        "{bus}"
    );
    assert_eq!(summary["refusing"], "否");
    let clock = get_json(&gw, "/healthz").await["clock"]["sync"].clone();
    assert_eq!(summary["clock"], clock, "the clock's state as /healthz says");
    let none = client.find(Locator::Css("#deliveries-none")).await.unwrap();
    assert_eq!(none.text().await.unwrap(), "本次启动以来还没有送出工单。");

    // A valve opens: the page shows the new state and the work order, as /deliveries lists it.
    rig.plant.flip_valve(2);
    wait_orders(&rig.panda, 1).await;
    let meters = wait_page(&client, "M2 open", METERS, |v| rows(v)[1]["state"] == "开启").await;
    assert_eq!(
        rows(&meters).iter().map(|m| m["state"].clone()).collect::<Vec<_>>(),
        ["关闭", "开启", "关闭"]
    );
    let shown = wait_page(&client, "the work order delivered", DELIVERIES, |v| rows(v).len() == 1).await;
    let api = get_json(&gw, "/deliveries").await;
    assert_eq!(rows(&api).len(), 1, "{api}");
    let (order, row) = (&api[0], &shown[0]);
    assert_eq!(
        (
            &order["meter_no"],
            &order["event_name"],
            &order["customer"],
            &order["to"]
        ),
        (&json!("M2"), &json!(OPEN), &json!("用户2 (U0002)"), &json!("开启")),
        "{order}"
    );
    assert_eq!(
        (&row["id"], &row["event"], &row["meter"], &row["customer"], &row["to"]),
        (
            &order["id"],
            &json!(OPEN),
            &json!("M2"),
            &json!("用户2 (U0002)"),
            &json!("开启")
        )
    );
    let delivered_at = order["delivered_at"].as_str().unwrap();
    assert!(delivered_at.ends_with("+08:00"), "site time zone: {delivered_at}");
    assert_eq!(
        row["time"],
        format!("{} {}", &delivered_at[5..10], &delivered_at[11..19])
    );

    // A meter falls silent: offline, since when, and why.
    rig.plant.silence(3, true);
    // (No link rule is configured, so no outage start is stored: the page says when it last answered.)
    let meters = wait_page(&client, "M3 offline", METERS, |v| rows(v)[2]["online"] == "false").await;
    let m3 = &rows(&meters)[2];
    assert_eq!(get_json(&gw, "/meters").await[2]["offline_since"], Value::Null);
    let link = m3["link"].as_str().unwrap();
    assert!(link.starts_with("离线最后应答在 ") && link.contains("前 · 每 "), "{m3}");
    assert!(m3["error"].as_str().unwrap().starts_with("超时无应答"), "{m3}");

    // The server refuses a closing: a dead letter with the server's message and a requeue button.
    let id = dead_letter(&rig, &gw, 2, CLOSE).await;
    let dead = wait_page(&client, "the dead letter", DEAD, |v| {
        v["rows"].as_array().is_some_and(|r| r.len() == 1)
    })
    .await;
    assert_eq!(
        dead,
        json!({ "shown": true, "none": false, "rows": [
            { "id": id, "meter": "M2", "msg": format!("事件【{CLOSE}】不存在"), "button": "重新排队" }
        ] })
    );
    let summary = wait_page(&client, "health degraded", SUMMARY, |v| v["health"] == "degraded").await;
    assert_eq!(summary["badge"], "需要关注");
    assert_eq!(
        summary["reasons"],
        json!(["dead_letters", "meters_offline"]),
        "as /healthz lists them"
    );
    let reason = client
        .find(Locator::Css("#reasons li[data-code=\"dead_letters\"] .summary"))
        .await
        .unwrap();
    assert!(reason.text().await.unwrap().contains("重新排队"));

    // The picture the README shows: meters, one offline, a delivery, a dead letter with its button.
    let png = client.screenshot().await.unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(docs.join("status-page.png"), &png).unwrap();

    // The server is fixed; the button puts the record back, and it is delivered.
    rig.panda.set_unknown_event(CLOSE, false);
    let button = client
        .find(Locator::Css(&format!("#dead button[data-requeue=\"{id}\"]")))
        .await
        .unwrap();
    button.click().await.unwrap();
    wait_orders(&rig.panda, 2).await;
    wait_until("no dead letter in the admin API", || async {
        get_json(&gw, "/outbox/dead").await == json!([])
    })
    .await;
    let api = get_json(&gw, "/deliveries").await;
    assert_eq!(
        (&api[0]["id"], &api[0]["event_name"], &api[0]["meter_no"], &api[0]["to"]),
        (&json!(id), &json!(CLOSE), &json!("M2"), &json!("关闭")),
        "{api}"
    );
    assert_eq!(rows(&api).len(), 2, "{api}");
    let orders = rig.panda.orders();
    assert_eq!(
        orders.iter().map(|o| o.event_name.as_str()).collect::<Vec<_>>(),
        [OPEN, CLOSE]
    );
    let dead = wait_page(&client, "no dead letter", DEAD, |v| v["none"] == true).await;
    assert_eq!(dead, json!({ "shown": false, "none": true, "rows": [] }));
    let shown = wait_page(&client, "the requeued work order", DELIVERIES, |v| rows(v).len() == 2).await;
    assert_eq!(
        (&shown[0]["id"], &shown[0]["event"], &shown[0]["meter"], &shown[0]["to"]),
        (&json!(id), &json!(CLOSE), &json!("M2"), &json!("关闭"))
    );
    let summary = client.execute(SUMMARY, vec![]).await.unwrap();
    assert_eq!(summary["requeue"], format!("记录 {id} 已重新排队，将再次送出。"));

    // English on request.
    client.goto(&format!("{}/?lang=en", admin(&gw))).await.unwrap();
    let summary = wait_page(&client, "English labels", SUMMARY, |v| v["badge"] == "Needs a look").await;
    assert_eq!(summary["lang"], "en");
    assert_eq!(
        summary["headers"],
        json!([
            "Meter",
            "Customer",
            "Online",
            "Valve",
            "Readings",
            "Answer time",
            "Last error"
        ])
    );
    assert_eq!(summary["refusing"], "no");
    let meters = wait_page(&client, "English meters", METERS, |v| rows(v).len() == 3).await;
    assert_eq!(rows(&meters)[0]["link"], "online");
    assert!(
        rows(&meters)[2]["link"]
            .as_str()
            .unwrap()
            .starts_with("offlinelast answer "),
        "{meters}"
    );
    let none = client.find(Locator::Css("#dead-none")).await.unwrap();
    assert_eq!(none.text().await.unwrap(), "No dead letters.");

    client.close().await.unwrap();
    drop(driver);
    gw.stop(GRACE).await;
}

// === the guard, over plain HTTP ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeue_needs_json_from_the_same_origin() {
    let rig = refusing_rig(2).await;
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    let id = dead_letter(&rig, &gw, 1, OPEN).await;
    rig.panda.set_unknown_event(OPEN, false);
    let base = admin(&gw);
    let host = base.trim_start_matches("http://").to_string();
    let http = reqwest::Client::new();
    let url = format!("{base}/outbox/requeue");
    let answer = |r: reqwest::Response| async move {
        let code = r.status().as_u16();
        (code, r.json::<Value>().await.unwrap())
    };

    // A form (what another site's page can post without asking) is refused, as is no type at all.
    let form = http
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("id={id}"))
        .send()
        .await
        .unwrap();
    let (code, body) = answer(form).await;
    assert_eq!(code, 415, "{body}");
    assert_eq!(
        body["error"],
        "a state-changing request must be sent with Content-Type: application/json (got application/x-www-form-urlencoded)"
    );
    let text = http.post(&url).body(format!("{{\"id\": {id}}}")).send().await.unwrap();
    assert_eq!(answer(text).await.0, 415);

    // JSON from another site's page.
    let foreign = http
        .post(&url)
        .header("origin", "http://evil.example")
        .json(&json!({ "id": id }))
        .send()
        .await
        .unwrap();
    let (code, body) = answer(foreign).await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(
        body["error"],
        format!("cross-site request refused: Origin http://evil.example is not the address the request was sent to (Host {host})")
    );
    // A name pointed at 127.0.0.1 (DNS rebinding): same origin by name, but not a loopback host.
    let rebound = http
        .post(&url)
        .header("host", "evil.example")
        .header("origin", "http://evil.example")
        .json(&json!({ "id": id }))
        .send()
        .await
        .unwrap();
    assert_eq!(answer(rebound).await.0, 403);

    // Nothing was requeued by those.
    let dead = get_json(&gw, "/outbox/dead").await;
    assert_eq!(rows(&dead).len(), 1, "{dead}");
    assert_eq!(rig.panda.orders().len(), 0);

    // The page's own request: same origin, JSON.
    let same = http
        .post(&url)
        .header("origin", &base)
        .json(&json!({ "id": id }))
        .send()
        .await
        .unwrap();
    assert_eq!(answer(same).await, (200, json!({ "requeued": 1 })));
    let orders = wait_orders(&rig.panda, 1).await;
    assert_eq!((orders[0].event_name.as_str(), orders.len()), (OPEN, 1));
    assert_eq!(get_json(&gw, "/outbox/dead").await, json!([]));
    // The command line sends no Origin, and still works.
    let cli = http.post(&url).json(&json!({ "all": true })).send().await.unwrap();
    assert_eq!(answer(cli).await, (200, json!({ "requeued": 0 })));

    // The page itself: HTML that may run only its own script, in no frame.
    let page = reqwest::get(format!("{base}/")).await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let header = |name: &str| {
        page.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(header("content-type"), "text/html; charset=utf-8");
    let csp = header("content-security-policy");
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(header("x-frame-options"), "DENY");
    assert!(page
        .text()
        .await
        .unwrap()
        .contains("<script src=\"/page/app.js\" defer></script>"));
    for (path, ty) in [
        ("/page/app.js", "text/javascript; charset=utf-8"),
        ("/page/style.css", "text/css; charset=utf-8"),
    ] {
        let r = reqwest::get(format!("{base}{path}")).await.unwrap();
        assert_eq!(
            (r.status().as_u16(), r.headers()["content-type"].to_str().unwrap()),
            (200, ty)
        );
    }
    gw.stop(GRACE).await;
}

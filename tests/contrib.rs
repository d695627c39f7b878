//! The fleet files in `contrib/` against the gateway they describe: the Prometheus alerting rules
//! (`promtool check rules`, their unit tests with `promtool test rules`), the live `/metrics` of a
//! running gateway (`promtool check metrics`), and the Grafana dashboard (valid dashboard JSON whose
//! queries parse). The rules, their tests and the dashboard may name only metrics that gateway exports
//! (the `# TYPE` lines of its scrape); the one other series they use is Prometheus's own `up`.
//! Finally a real Prometheus scrapes the gateway, loads the rules and answers every dashboard query.
//!
//! Needs `promtool` and `prometheus` (Debian package `prometheus`; `.ci/run` installs it): a missing
//! tool fails the test with a message naming the package. Every wait is on a condition with the shared
//! deadline; Prometheus scrapes and evaluates every second here so that the waits are short.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use fieldgate::app::Gateway;
use fieldgate::clock::ClockSync;
use fieldgate::tools::mock_panda::MockOptions;
use serde_json::Value;

use crate::e2e::{rig, wait_for_baselines};
use crate::util::wait_until;

const GRACE: Duration = Duration::from_secs(10);

/// Series the contrib files may use that the gateway does not export: Prometheus's own.
const NOT_OURS: &[&str] = &["up"];

/// The alerts issue 16 asks for, and the bus alert (a bus that cannot be opened reads none of its meters).
const ALERTS: &[&str] = &[
    "FieldgateGatewayDown",
    "FieldgateBusDown",
    "FieldgateDeliveryFailing",
    "FieldgateOutboxOldestRecordOld",
    "FieldgateOutboxRefusing",
    "FieldgateStoreFailed",
    "FieldgateDiskLow",
    "FieldgateMeterOffline",
    "FieldgateDeadLetters",
    "FieldgateClockNotSynchronized",
];

fn contrib(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib").join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Run a tool of the Debian package `prometheus` with `stdin`; a missing tool is a clear failure.
fn run(tool: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("this test needs {tool} (apt-get install prometheus): {e}"));
    let mut input = child.stdin.take().expect("stdin is piped");
    input.write_all(stdin.as_bytes()).expect("write promtool's stdin");
    drop(input);
    child.wait_with_output().expect("wait for promtool")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every `fieldgate_…` metric name in `text` (a name is `fieldgate_` and at least one more of
/// `[a-z0-9_]`, not glued to a word before it).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (at, _) in text.match_indices("fieldgate_") {
        let glued = text[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let rest: String = text[at + "fieldgate_".len()..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        if !glued && !rest.is_empty() {
            out.insert(format!("fieldgate_{rest}"));
        }
    }
    out
}

/// The metric of every selector with label matchers (`name{…}`) in a PromQL expression.
fn selectors(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (at, _) in expr.match_indices('{') {
        let name: String = expr[..at]
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

/// The `expr:` of every rule (one line, or a `|` block of the lines indented deeper).
fn rule_exprs(rules: &str) -> Vec<String> {
    let lines: Vec<&str> = rules.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest != "|" {
            out.push(rest.to_string());
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let block: Vec<&str> = lines[i + 1..]
            .iter()
            .take_while(|l| l.len() - l.trim_start().len() > indent)
            .map(|l| l.trim())
            .collect();
        out.push(block.join("\n"));
    }
    out
}

/// The rules file cut into its alerts: (name, the lines of its block).
fn alert_blocks(rules: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in rules.lines() {
        if let Some(name) = line.trim_start().strip_prefix("- alert:") {
            out.push((name.trim().to_string(), String::new()));
        } else if let Some((_, block)) = out.last_mut() {
            block.push_str(line);
            block.push('\n');
        }
    }
    out
}

/// Every `expr` in the dashboard JSON, with the JSON path it sits at.
fn dashboard_exprs(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push((format!("{at}.expr"), e.clone())),
                    _ => dashboard_exprs(v, &format!("{at}.{k}"), out),
                }
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                dashboard_exprs(v, &format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Every string in the dashboard JSON (titles, variable queries, exprs): metric names hide anywhere.
fn strings(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => {
            out.push_str(s);
            out.push('\n');
        }
        Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        Value::Object(map) => map.values().for_each(|v| strings(v, out)),
        _ => {}
    }
}

fn dashboard() -> Value {
    let path = contrib("grafana/fieldgate.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A dashboard query with its variables as the dashboard's defaults set them (job `fieldgate`, every
/// instance).
fn substituted(expr: &str) -> String {
    expr.replace("$job", "fieldgate").replace("$instance", ".*")
}

async fn scrape(gw: &Gateway) -> String {
    let addr = gw.admin_addr.expect("the admin API is bound");
    let resp = reqwest::get(format!("http://{addr}/metrics")).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    resp.text().await.unwrap()
}

fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The value the clock gauge should have on this machine (`None`: left out).
fn clock_value() -> Option<f64> {
    match fieldgate::clock::sync_state() {
        ClockSync::Synchronized => Some(1.0),
        ClockSync::Unsynchronized => Some(0.0),
        ClockSync::Unknown => None,
    }
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests_cover_every_alert() {
    let rules_path = contrib("prometheus/fieldgate.rules.yml");
    let rules = read(&rules_path);
    let out = run("promtool", &["check", "rules", rules_path.to_str().unwrap()], "");
    assert!(out.status.success(), "promtool check rules: {}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("SUCCESS: {} rules found", ALERTS.len())),
        "{}",
        text(&out)
    );

    let blocks = alert_blocks(&rules);
    let names: Vec<&str> = blocks.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ALERTS, "the alerts, in order");
    for (name, block) in &blocks {
        let severity = block
            .lines()
            .find_map(|l| l.trim().strip_prefix("severity: "))
            .unwrap_or_else(|| panic!("{name} has no severity label"));
        assert!(
            ["critical", "warning"].contains(&severity),
            "{name}: severity {severity}"
        );
        for key in ["summary", "summary_en", "description", "description_en"] {
            let value = block
                .lines()
                .find_map(|l| l.trim().strip_prefix(&format!("{key}: ")))
                .unwrap_or_else(|| panic!("{name} has no {key} annotation"));
            if key.starts_with("description") {
                assert!(value.contains("$labels.instance"), "{name} {key} names no instance");
                assert!(value.contains("$value"), "{name} {key} gives no value");
            }
            if !key.ends_with("_en") {
                assert!(
                    value.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c)),
                    "{name} {key} is not in Chinese: {value}"
                );
            }
        }
    }

    // Each alert is tested firing (an `exp_alerts` with labels) and not firing (an empty one).
    let tests_path = contrib("prometheus/fieldgate.rules.test.yml");
    let tests = read(&tests_path);
    for name in ALERTS {
        let evals: Vec<&str> = tests
            .split("- eval_time:")
            .filter(|e| e.contains(&format!("alertname: {name}\n")))
            .collect();
        assert!(
            evals.iter().any(|e| e.contains("exp_alerts: []")),
            "{name}: no test where it must not fire"
        );
        assert!(
            evals
                .iter()
                .any(|e| e.contains("exp_labels:") && e.contains("exp_annotations:")),
            "{name}: no test where it fires"
        );
    }
    // promtool finds the rules file relative to the test file.
    let out = run("promtool", &["test", "rules", tests_path.to_str().unwrap()], "");
    assert!(out.status.success(), "promtool test rules: {}", text(&out));
}

#[test]
fn the_dashboard_is_grafana_json_with_a_datasource_variable_and_queries_that_parse() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "schemaVersion");
    assert_eq!(d["uid"], "fieldgate-fleet");
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no variable {name}"))
    };
    assert_eq!(var("DS_PROMETHEUS")["type"], "datasource");
    assert_eq!(var("DS_PROMETHEUS")["query"], "prometheus");
    assert_eq!(var("instance")["type"], "query");
    assert_eq!(var("instance")["includeAll"], true);
    assert_eq!(var("instance")["allValue"], ".*");

    let panels = d["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut titles = Vec::new();
    for p in panels {
        let title = p["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "{title}: id used twice"
        );
        for key in ["x", "y", "w", "h"] {
            assert!(p["gridPos"][key].is_u64(), "{title}: gridPos.{key}");
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
            assert!(
                t["expr"].as_str().is_some_and(|e| e.contains("$instance")),
                "{title}: {t}"
            );
        }
        titles.push((p["type"].as_str().unwrap().to_string(), title.to_string()));
    }
    assert!(
        titles.iter().any(|(ty, t)| ty == "table" && t.contains("Stations")),
        "{titles:?}"
    );

    // Every query parses as PromQL: promtool checks them as recording rules (JSON strings are YAML
    // double-quoted scalars).
    let mut exprs = Vec::new();
    dashboard_exprs(&d, "", &mut exprs);
    assert!(exprs.len() >= 15, "{exprs:?}");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, e)) in exprs.iter().enumerate() {
        let e = serde_json::to_string(&substituted(e)).unwrap();
        rules.push_str(&format!("      - record: dashboard:query_{i}\n        expr: {e}\n"));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard.rules.yml");
    std::fs::write(&path, &rules).unwrap();
    let out = run("promtool", &["check", "rules", path.to_str().unwrap()], "");
    assert!(out.status.success(), "dashboard queries:\n{rules}\n{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_scrape_passes_promtool_and_the_contrib_files_name_only_exported_metrics() {
    let rig = rig(3, "token", MockOptions::default()).await;
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    rig.plant.silence(3, true);
    wait_until("M3 offline in /metrics", || async {
        sample(&scrape(&gw).await, "fieldgate_meter_online{meter=\"M3\"}") == Some(0.0)
    })
    .await;
    let live = scrape(&gw).await;
    gw.stop(GRACE).await;

    // The scrape holds the meter, bus and outbox families with their samples, and the new gauges.
    for (series, value) in [
        ("fieldgate_meter_online{meter=\"M1\"}", Some(1.0)),
        ("fieldgate_meter_online{meter=\"M3\"}", Some(0.0)),
        ("fieldgate_bus_up{bus=\"line-a\"}", Some(1.0)),
        ("fieldgate_outbox_records", Some(0.0)),
        ("fieldgate_outbox_refusing", Some(0.0)),
        ("fieldgate_store_failed", Some(0.0)),
        ("fieldgate_clock_synchronized", clock_value()),
    ] {
        assert_eq!(sample(&live, series), value, "{series} in\n{live}");
    }
    for series in [
        "fieldgate_meter_last_sample_age_seconds{meter=\"M1\"}",
        "fieldgate_meter_answer_max_seconds{meter=\"M1\"}",
        "fieldgate_bus_errors_total{bus=\"line-a\",kind=\"timeout\"}",
        "fieldgate_store_free_bytes",
    ] {
        assert!(sample(&live, series).is_some(), "{series} in\n{live}");
    }

    // promtool's lint of names, types and help: nothing to say.
    let out = run("promtool", &["check", "metrics"], &live);
    assert!(out.status.success(), "promtool check metrics: {}\n{live}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "",
        "promtool check metrics: {}",
        text(&out)
    );

    let exported: BTreeSet<String> = live
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .map(str::to_string)
        .collect();
    assert!(exported.len() > 40, "{exported:?}");
    let check = |what: &str, names: &BTreeSet<String>| {
        let unknown: Vec<&String> = names.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{what} names metrics the gateway does not export: {unknown:?}"
        );
    };
    let check_selectors = |what: &str, expr: &str| {
        for name in selectors(expr) {
            assert!(
                exported.contains(&name) || NOT_OURS.contains(&name.as_str()),
                "{what}: `{name}` is neither exported by the gateway nor Prometheus's own: {expr}"
            );
        }
    };

    // The rules: every metric they name (expressions and annotations), every selector.
    let rules = read(&contrib("prometheus/fieldgate.rules.yml"));
    let in_rules = metric_names(&rules);
    check("fieldgate.rules.yml", &in_rules);
    let exprs = rule_exprs(&rules);
    assert_eq!(exprs.len(), ALERTS.len(), "{exprs:?}");
    for e in &exprs {
        check_selectors("fieldgate.rules.yml", e);
        assert!(
            !metric_names(e).is_empty() || e.starts_with("up{"),
            "an alert on no metric of ours: {e}"
        );
    }
    for name in [
        "fieldgate_bus_up",
        "fieldgate_records_queued",
        "fieldgate_records_delivered_total",
        "fieldgate_outbox_oldest_age_seconds",
        "fieldgate_outbox_refusing",
        "fieldgate_store_failed",
        "fieldgate_store_free_bytes",
        "fieldgate_store_min_free_bytes",
        "fieldgate_meter_online",
        "fieldgate_records_dead",
        "fieldgate_clock_synchronized",
    ] {
        assert!(in_rules.contains(name), "the rules do not use {name}");
    }
    // Their unit tests feed series by the same names.
    check(
        "fieldgate.rules.test.yml",
        &metric_names(&read(&contrib("prometheus/fieldgate.rules.test.yml"))),
    );

    // The dashboard: every string of it (queries, variable queries), every selector of its queries.
    let d = dashboard();
    let mut all = String::new();
    strings(&d, &mut all);
    let in_dashboard = metric_names(&all);
    check("fieldgate.json", &in_dashboard);
    let mut exprs = Vec::new();
    dashboard_exprs(&d, "", &mut exprs);
    for (at, e) in &exprs {
        check_selectors(at, e);
    }
    for name in [
        "fieldgate_health_status",
        "fieldgate_records_queued",
        "fieldgate_outbox_oldest_age_seconds",
        "fieldgate_meter_online",
        "fieldgate_records_delivered_total",
    ] {
        assert!(in_dashboard.contains(name), "the dashboard does not show {name}");
    }
}

/// `prometheus` as a child process on a loopback port, killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrape `target` every second as job `fieldgate` with target label `site`, and load the rules.
    fn start(target: &str, site: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let rules = contrib("prometheus/fieldgate.rules.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: fieldgate\n    static_configs:\n      - targets: [\"{target}\"]\n        labels:\n          site: \"{site}\"\n",
            serde_json::to_string(rules.to_str().unwrap()).unwrap()
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        // A free port: Prometheus does not tell which port it got for `:0`.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let listen = format!("127.0.0.1:{port}");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={listen}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("this test needs prometheus (apt-get install prometheus): {e}"));
        Prometheus {
            child,
            url: format!("http://{listen}"),
            _dir: dir,
        }
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Option<Value> {
        let resp = reqwest::Client::new()
            .get(format!("{}{path}", self.url))
            .query(query)
            .send()
            .await
            .ok()?;
        resp.json().await.ok()
    }

    /// An instant query's result vector (`None`: no answer yet); panics on a query Prometheus refuses.
    async fn query(&self, expr: &str) -> Option<Vec<Value>> {
        let v = self.get("/api/v1/query", &[("query", expr)]).await?;
        assert_eq!(v["status"], "success", "{expr}: {v}");
        assert_eq!(v["data"]["resultType"], "vector", "{expr}: {v}");
        v["data"]["result"].as_array().cloned()
    }

    /// The one series of `expr`: its labels and value.
    async fn one(&self, expr: &str) -> (BTreeMap<String, String>, f64) {
        let result = self.query(expr).await.unwrap_or_else(|| panic!("no answer to {expr}"));
        assert_eq!(result.len(), 1, "{expr}: {result:?}");
        let labels = serde_json::from_value(result[0]["metric"].clone()).unwrap();
        let value = result[0]["value"][1].as_str().and_then(|v| v.parse().ok());
        (labels, value.unwrap_or_else(|| panic!("{expr}: {result:?}")))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_answers_every_dashboard_query_and_evaluates_the_rules_on_the_gateway() {
    let rig = rig(3, "token", MockOptions::default()).await;
    let gw = rig.start().await;
    wait_for_baselines(&gw).await;
    rig.plant.silence(3, true);
    wait_until("M3 offline in /metrics", || async {
        sample(&scrape(&gw).await, "fieldgate_meter_online{meter=\"M3\"}") == Some(0.0)
    })
    .await;
    let target = gw.admin_addr.expect("the admin API is bound").to_string();
    let prom = Prometheus::start(&target, "泵站A");
    // Two scrapes at least: `increase` (work orders per hour) needs two samples.
    wait_until("Prometheus has scraped the gateway twice, with M3 offline", || async {
        let offline = prom.query("fieldgate_meter_online{meter=\"M3\"} == 0").await;
        let twice = prom
            .query("count_over_time(fieldgate_records_delivered_total[1h]) >= 2")
            .await;
        offline.is_some_and(|r| r.len() == 1) && twice.is_some_and(|r| r.len() == 1)
    })
    .await;

    // Every query of the dashboard gets an answer with data.
    let d = dashboard();
    let mut exprs = Vec::new();
    dashboard_exprs(&d, "", &mut exprs);
    for (at, e) in &exprs {
        let result = prom.query(&substituted(e)).await.expect("Prometheus answers");
        assert!(!result.is_empty(), "{at}: no data for {e}");
    }

    // The stations table: one row for this gateway (instance and site), each column as the gateway is.
    let table = &d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["type"] == "table")
        .expect("the stations table")["targets"];
    let column = |ref_id: &str| {
        let t = table.as_array().unwrap().iter().find(|t| t["refId"] == ref_id).unwrap();
        substituted(t["expr"].as_str().unwrap())
    };
    let row: BTreeMap<String, String> = [("instance", target.as_str()), ("site", "泵站A")]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .into();
    let mut expected = vec![
        ("A", 1.0), // up
        ("B", 1.0), // health: degraded (M3 offline)
        ("C", 0.0), // queued
        ("D", 0.0), // oldest age
        ("E", 1.0), // offline meters
        ("F", 0.0), // work orders in the last hour
        ("G", 0.0), // dead letters
    ];
    if let Some(v) = clock_value() {
        expected.push(("H", v));
    }
    for (ref_id, value) in expected {
        let expr = column(ref_id);
        assert_eq!(prom.one(&expr).await, (row.clone(), value), "column {ref_id}: {expr}");
    }

    // The rules load and evaluate without error on the real series; M3's alert is pending (`for: 10m`)
    // with the labels the gateway and the scrape give it; the clock's only where the clock is off.
    wait_until("every rule evaluated", || async {
        prom.get("/api/v1/rules", &[]).await.is_some_and(|v| {
            v["data"]["groups"][0]["rules"].as_array().is_some_and(|r| {
                r.len() == ALERTS.len() && r.iter().all(|r| r["lastEvaluation"] != "0001-01-01T00:00:00Z")
            })
        })
    })
    .await;
    let v = prom.get("/api/v1/rules", &[]).await.expect("Prometheus answers");
    for r in v["data"]["groups"][0]["rules"].as_array().unwrap() {
        assert_eq!(r["health"], "ok", "{r}");
    }
    let mut want = vec![("FieldgateMeterOffline".to_string(), Some("M3".to_string()))];
    if clock_value() == Some(0.0) {
        want.push(("FieldgateClockNotSynchronized".to_string(), None));
    }
    want.sort();
    wait_until("the alerts pending", || async {
        let Some(v) = prom.get("/api/v1/alerts", &[]).await else {
            return false;
        };
        let mut got: Vec<(String, Option<String>)> = v["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                assert_eq!(a["state"], "pending", "{a}");
                assert_eq!(a["labels"]["instance"], target.as_str(), "{a}");
                assert_eq!(a["labels"]["site"], "泵站A", "{a}");
                assert_eq!(a["labels"]["job"], "fieldgate", "{a}");
                let name = a["labels"]["alertname"].as_str().unwrap().to_string();
                (name, a["labels"]["meter"].as_str().map(str::to_string))
            })
            .collect();
        got.sort();
        got == want
    })
    .await;
    drop(prom);
    gw.stop(GRACE).await;
}

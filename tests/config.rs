//! Config and mapping loading through the public API and the `fieldgate check` command.

use std::path::Path;
use std::time::Duration;

use fieldgate::config::point::{Table, ValueType, WordOrder};
use fieldgate::config::{self, ConfigError, Transport};

use crate::util::{mapping_csv, site_config, Site};

fn base() -> String {
    site_config("tcp = \"127.0.0.1:502\"", "http://127.0.0.1:8080", "none", 2)
}

fn errors(cfg: &str, mapping: &str) -> ConfigError {
    let site = Site::new(cfg, mapping);
    match config::load(&site.config_path()) {
        Ok(_) => panic!("expected errors for:\n{cfg}"),
        Err(e) => e,
    }
}

/// Line (1-based) of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .expect(needle)
}

#[test]
fn the_example_config_and_mapping_pass() {
    let cfg = config::load(Path::new("config/fieldgate.example.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.buses.len(), 3);
    assert_eq!(cfg.meters.len(), 3);
    assert_eq!(cfg.mapping.len(), 3);
    assert!(matches!(cfg.buses[1].transport, Transport::Serial { baud: 9600, .. }));
    assert_eq!(
        cfg.buses[2].transport,
        Transport::RtuOverTcp("192.168.1.30:4001".into())
    );
    // M0002 has inline points and confirm = 2.
    assert_eq!(cfg.meters[1].confirm, 2);
    assert_eq!(cfg.meters[1].valve.states.get(&2).map(String::as_str), Some("故障"));
    assert_eq!(cfg.meters[1].readings[0].point.word_order, WordOrder::Little);
}

#[test]
fn profiles_apply_and_paths_resolve_against_the_config_folder() {
    let site = Site::new(&base(), &mapping_csv(2));
    let cfg = site.load();
    assert_eq!(cfg.site.state_dir, site.path().join("state"));
    assert_eq!(cfg.site.mapping, site.path().join("mapping.csv"));
    let m = &cfg.meters[1];
    assert_eq!((m.meter_no.as_str(), m.unit, m.bus), ("M2", 2, 0));
    assert_eq!(m.valve.point.table, Table::Coil);
    assert_eq!(m.readings.len(), 2);
    assert_eq!(m.readings[0].field, "累计流量");
    assert_eq!(m.readings[0].point.kind, ValueType::U32);
    assert_eq!(m.readings[0].point.scale, Some(0.01));
    assert_eq!(cfg.buses[0].timeout, Duration::from_millis(200));
    assert_eq!(cfg.buses[0].offline_retry, Duration::from_millis(300));
}

#[test]
fn an_unknown_key_names_its_line_and_the_allowed_keys() {
    let cfg = base().replace("poll_interval = \"50ms\"", "poll_intervall = \"50ms\"");
    let e = errors(&cfg, &mapping_csv(2));
    assert_eq!(e.issues.len(), 1, "{e}");
    let issue = &e.issues[0];
    assert_eq!(issue.line, Some(line_of(&cfg, "poll_intervall")), "{e}");
    assert!(issue.message.contains("unknown field `poll_intervall`"), "{e}");
    assert!(issue.message.contains("poll_interval"), "lists the allowed keys: {e}");
    assert!(issue.to_string().contains("fieldgate.toml:"), "{e}");
}

#[test]
fn every_semantic_error_is_reported_at_once_with_line_and_field() {
    let mut cfg = base();
    // duplicate meter number, duplicate unit on the bus, a meter missing from the mapping, a bad
    // duration and an event label that no valve can take.
    cfg.push_str("\n[[meter]]\nmeter_no = \"M1\"\nbus = \"line-a\"\nunit = 1\nprofile = \"sim\"\n");
    cfg.push_str("\n[[meter]]\nmeter_no = \"M9\"\nbus = \"line-a\"\nunit = 9\nprofile = \"sim\"\n");
    cfg.push_str("\n[[event]]\nname = \"阀门故障\"\npoint = \"valve\"\nto = \"故障\"\n");
    let cfg = cfg.replace("timeout = \"200ms\"", "timeout = \"fast\"");
    let e = errors(&cfg, &mapping_csv(2));
    let text = e.to_string();
    let find = |field: &str, msg: &str| {
        e.issues
            .iter()
            .find(|i| i.field.ends_with(field) && i.message.contains(msg))
            .unwrap_or_else(|| panic!("no issue {field} / {msg} in:\n{text}"))
            .clone()
    };
    let dup = find("meter_no", "already defined at line");
    let unit = find("unit", "unit 1 on bus `line-a` is already used");
    assert_eq!(dup.line, unit.line);
    let missing = find("meter_no", "meter `M9` is not in the mapping file");
    assert!(missing.line > dup.line);
    let label = find("to", "no valve can take the label `故障`");
    assert!(
        label.message.contains("开启") && label.message.contains("关闭"),
        "lists labels in use: {text}"
    );
    let dur = find("timeout", "`fast` is not a duration");
    assert_eq!(
        dur.line,
        Some(line_of(&cfg, "timeout = \"fast\"")),
        "at the value's own line"
    );
    assert_eq!(e.issues.len(), 5, "{text}");
    let lines: Vec<_> = e.issues.iter().map(|i| i.line).collect();
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(lines, sorted, "issues come in file order");
}

#[test]
fn unreadable_files_are_named() {
    let site = Site::new(&base().replace("mapping.csv", "nope.csv"), "");
    let e = config::load(&site.config_path()).unwrap_err();
    assert!(e.issues[0].file.ends_with("nope.csv"), "{e}");
    assert!(e.issues[0].message.contains("file not found"), "{e}");

    let cfg = base().replace(
        "auth = \"none\"",
        "auth = \"token\"\nusername = \"u\"\npassword_file = \"secret\"",
    );
    let e = errors(&cfg, &mapping_csv(2));
    assert_eq!(e.issues[0].field, "panda.password_file", "{e}");
    assert!(
        e.issues[0].message.contains("secret") && e.issues[0].message.contains("file not found"),
        "{e}"
    );

    let e = config::load(Path::new("/nonexistent/fieldgate.toml")).unwrap_err();
    assert!(
        e.to_string().contains("/nonexistent/fieldgate.toml: file not found"),
        "{e}"
    );
}

#[test]
fn password_comes_from_file_or_environment_and_is_never_printed() {
    let site = Site::new(
        &base().replace(
            "auth = \"none\"",
            "auth = \"token\"\nusername = \"u\"\npassword_file = \"secret\"",
        ),
        &mapping_csv(2),
    );
    std::fs::write(site.path().join("secret"), "s3cr3t-pw\n").unwrap();
    let cfg = site.load();
    assert!(matches!(&cfg.panda.auth, config::Auth::Token { password, .. } if password == "s3cr3t-pw"));
    assert!(
        !format!("{cfg:?}").contains("s3cr3t-pw"),
        "Debug must redact the password"
    );

    let text = base().replace("auth = \"none\"", "auth = \"token\"\nusername = \"u\"");
    let path = site.path().join("env.toml");
    let cfg = config::parse(&path, &text, &Some("from-env".into())).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(&cfg.panda.auth, config::Auth::Token { password, .. } if password == "from-env"));
    let e = config::parse(&path, &text, &None).unwrap_err();
    assert!(e.to_string().contains("FIELDGATE_PANDA_PASSWORD"), "{e}");
}

#[test]
fn gb18030_and_bom_mapping_files_load_through_the_config() {
    let csv = mapping_csv(2);
    let (gbk, _, _) = encoding_rs::GB18030.encode(&csv);
    let mut bom = b"\xEF\xBB\xBF".to_vec();
    bom.extend_from_slice(csv.as_bytes());
    for bytes in [gbk.to_vec(), bom] {
        let site = Site::new(&base(), "");
        std::fs::write(site.path().join("mapping.csv"), &bytes).unwrap();
        let cfg = site.load();
        let row = cfg.mapping.get("M2").expect("M2 mapped");
        assert_eq!(row[0], ("用户编号", "U0002"));
        assert_eq!(row[1], ("用户名称", "用户2"));
    }
}

#[test]
fn bus_kinds_are_exclusive_and_serial_settings_are_checked() {
    let cfg = base().replace(
        "tcp = \"127.0.0.1:502\"",
        "tcp = \"127.0.0.1:502\"\nserial = \"/dev/ttyUSB0\"",
    );
    let e = errors(&cfg, &mapping_csv(2));
    assert!(
        e.to_string().contains("exactly one of: tcp, serial, rtu_over_tcp"),
        "{e}"
    );
    let cfg = base().replace(
        "tcp = \"127.0.0.1:502\"",
        "serial = \"/dev/ttyUSB0\"\nparity = \"mark\"\nbaud = 19200",
    );
    let e = errors(&cfg, &mapping_csv(2));
    assert!(
        e.to_string()
            .contains("`mark` is not allowed: use \"none\", \"even\" or \"odd\""),
        "{e}"
    );
    let cfg = base().replace("tcp = \"127.0.0.1:502\"", "tcp = \"127.0.0.1\"");
    let e = errors(&cfg, &mapping_csv(2));
    assert!(
        e.to_string().contains("bus[0].tcp: `127.0.0.1` is not host:port"),
        "{e}"
    );
}

#[test]
fn check_command_prints_every_error_and_exits_2() {
    let mut cfg = base();
    cfg.push_str("\n[[meter]]\nmeter_no = \"M9\"\nbus = \"line-b\"\nunit = 300\nprofile = \"sim\"\n");
    let site = Site::new(&cfg, &mapping_csv(2));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fieldgate"))
        .args(["check", "--config"])
        .arg(site.config_path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("3 configuration errors"), "{err}");
    assert!(err.contains("no bus named `line-b`"), "{err}");
    assert!(err.contains("300 is out of range: allowed 1..=247"), "{err}");
    assert!(err.contains("meter `M9` is not in the mapping file"), "{err}");

    let ok = std::process::Command::new(env!("CARGO_BIN_EXE_fieldgate"))
        .args(["check", "--config", "config/fieldgate.example.toml"])
        .output()
        .unwrap();
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("OK"));
}

/// An absurd duration used to reach the bus task and panic in `Instant + Duration`; now it is one
/// error at its own line, `check` exits 2 and `run` refuses to start with the same message.
#[test]
fn an_absurd_duration_is_one_located_error_and_neither_check_nor_run_starts() {
    let cfg = base().replace("poll_interval = \"50ms\"", "poll_interval = \"1000000000years\"");
    let e = errors(&cfg, &mapping_csv(2));
    assert_eq!(e.issues.len(), 1, "{e}");
    let line = line_of(&cfg, "1000000000years");
    assert_eq!(e.issues[0].line, Some(line), "{e}");
    assert_eq!(e.issues[0].field, "bus[0].poll_interval", "{e}");

    let site = Site::new(&cfg, &mapping_csv(2));
    let want = format!(
        "{}:{line}: bus[0].poll_interval: `1000000000years` is out of range: allowed more than 0 and at most 1h",
        site.config_path().display()
    );
    for command in ["check", "run"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fieldgate"))
            .args([command, "--config"])
            .arg(site.config_path())
            .env("RUST_LOG", "off")
            .env_remove("NOTIFY_SOCKET")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {err}");
        assert!(err.contains(&want), "{command}: want {want}\n{err}");
        assert!(!err.contains("panicked"), "{command}: {err}");
    }
}

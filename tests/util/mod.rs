//! Shared test helpers: temp sites (config + mapping on disk) and condition waits with deadlines.
#![allow(dead_code)]

pub mod daemon;
/// Real small file systems (tmpfs, loop-mounted ext4) to fill or shut down under a state directory.
pub mod smallfs;
pub mod socat;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The deadline every wait uses: generous, because CI has two busy cores.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Poll `cond` every 20 ms until it holds; panic with `what` after [`DEADLINE`].
pub async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Blocking variant of [`wait_until`] for sync tests.
pub fn wait_until_sync(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The mapping used by the end-to-end tests: meters M1..M8 with distinct customers.
pub fn mapping_csv(n: usize) -> String {
    let mut s = String::from("用户编号,用户名称,用户状态,电话号码,用户地址,水表表号,水表位置,阀门口径,营业区域\n");
    for i in 1..=n {
        s.push_str(&format!(
            "U{i:04},用户{i},正常,1380000{i:04},东风路{i}号,M{i},井内,DN20,城东营业所\n"
        ));
    }
    s
}

/// A temp folder holding `fieldgate.toml` and `mapping.csv`.
pub struct Site {
    pub dir: tempfile::TempDir,
}

impl Site {
    pub fn new(config: &str, mapping: &str) -> Site {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("fieldgate.toml"), config).expect("write config");
        std::fs::write(dir.path().join("mapping.csv"), mapping).expect("write mapping");
        Site { dir }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("fieldgate.toml")
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn load(&self) -> fieldgate::config::Config {
        fieldgate::config::load(&self.config_path()).unwrap_or_else(|e| panic!("config: {e}"))
    }
}

/// A config with one TCP bus at `modbus` and `n` meters (units 1..=n, the simulator's layout:
/// coil 0 valve, holding 0-1 累计流量 u32 ×0.01, holding 2 电池电压 u16 ×0.01), delivering to `panda`.
pub fn site_config(modbus_bus: &str, panda: &str, auth: &str, n: usize) -> String {
    let auth_lines = if auth == "token" {
        "auth = \"token\"\nusername = \"0CYKwAUCTLZ4KW6l\"\npassword = \"1vOkb5Ps4XfitL6G\"\n"
    } else {
        "auth = \"none\"\n"
    };
    let mut s = format!(
        r#"[site]
name = "test-station"
state_dir = "state"
mapping = "mapping.csv"
timezone = "+08:00"

[panda]
base_url = "{panda}"
project = "demo"
{auth_lines}user_id = 42
timeout = "5s"
max_batch = 50
retry_min = "20ms"
retry_max = "200ms"

[admin]
listen = "127.0.0.1:0"

[[bus]]
name = "line-a"
{modbus_bus}
poll_interval = "50ms"
timeout = "200ms"
offline_after = 2
offline_retry = "300ms"

[profile.sim]
valve = {{ table = "coil", address = 0, states = {{ 0 = "关闭", 1 = "开启" }} }}
readings = [
  {{ field = "累计流量", table = "holding", address = 0, type = "u32", scale = 0.01 }},
  {{ field = "电池电压", table = "holding", address = 2, scale = 0.01 }},
]

[[event]]
name = "用水户开阀"
point = "valve"
to = "开启"

[[event]]
name = "用水户关阀"
point = "valve"
to = "关闭"
"#
    );
    for i in 1..=n {
        s.push_str(&format!(
            "\n[[meter]]\nmeter_no = \"M{i}\"\nbus = \"line-a\"\nunit = {i}\nprofile = \"sim\"\n"
        ));
    }
    s
}

//! Small site files the validator's unit tests parse: a minimal valid one, and one with a bus and a
//! meter (valve 关闭/开启/故障, readings 累计流量 and 电池电压) for event rules.

use super::parse;
use crate::config::error::ConfigError;
use crate::config::types::Config;

/// Parse a minimal site with `extra` appended to `[panda]` and the given trailing sections.
pub(super) fn minimal(panda_extra: &str, sections: &str) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mapping.csv"), "用户编号,水表表号\nU1,M1\n").unwrap();
    let text = format!(
        "[site]\nname = \"s\"\nstate_dir = \"state\"\nmapping = \"mapping.csv\"\n\n\
         [panda]\nbase_url = \"http://127.0.0.1:1\"\nproject = \"demo\"\nauth = \"none\"\nuser_id = 42\n{panda_extra}\n{sections}"
    );
    parse(&dir.path().join("fieldgate.toml"), &text, &None)
}

/// One bus, one meter M1 reading 累计流量 and 电池电压, valve 关闭/开启/故障, plus `events`.
pub(super) fn with_events(events: &str) -> Result<Config, ConfigError> {
    minimal(
        "",
        &format!(
            "[[bus]]\nname = \"a\"\ntcp = \"127.0.0.1:502\"\n\n\
             [[meter]]\nmeter_no = \"M1\"\nbus = \"a\"\nunit = 1\n\
             valve = {{ table = \"holding\", address = 3, states = {{ 0 = \"关闭\", 1 = \"开启\", 2 = \"故障\" }} }}\n\
             readings = [\n  {{ field = \"累计流量\", table = \"holding\", address = 0, type = \"u32\", scale = 0.01 }},\n  \
             {{ field = \"电池电压\", table = \"holding\", address = 2, scale = 0.01 }},\n]\n\n{events}"
        ),
    )
}

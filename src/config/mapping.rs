//! The site's meter → customer table (CSV): encoding detection (UTF-8 with or without BOM, else
//! GB18030, which is what Excel on a Chinese Windows writes), header check, one row per meter.
//!
//! Each header name becomes a BizData key exactly as written; `水表表号` is the key column. Values are
//! trimmed. Every problem is reported with file, line and column.

use std::collections::HashMap;
use std::path::Path;

use super::error::{read_error, ConfigError, ConfigIssue};

/// The key column.
pub(crate) const METER_COLUMN: &str = "水表表号";

/// The BizData key of the valve's new state (never a mapping column: the gateway fills it).
pub(crate) const VALVE_STATE_KEY: &str = "阀门当前状态";

/// The column with the customer's name, in the utility's export (a site's file may lack it).
const CUSTOMER_NAME_COLUMN: &str = "用户名称";

/// The column with the customer's number, in the utility's export (a site's file may lack it).
const CUSTOMER_ID_COLUMN: &str = "用户编号";

/// A short label of the customer among `cells` (a mapping row, or a work order's BizData): `name
/// (number)` from the columns `用户名称` and `用户编号`, either alone if the other is missing or empty,
/// `None` if both are. For people to read (the status page); BizData carries every column.
pub(crate) fn customer_label<'a>(cells: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<String> {
    let (mut name, mut id) = ("", "");
    for (column, value) in cells {
        match column {
            CUSTOMER_NAME_COLUMN => name = value.trim(),
            CUSTOMER_ID_COLUMN => id = value.trim(),
            _ => {}
        }
    }
    match (name.is_empty(), id.is_empty()) {
        (false, false) => Some(format!("{name} ({id})")),
        (false, true) => Some(name.to_string()),
        (true, false) => Some(id.to_string()),
        (true, true) => None,
    }
}

/// A loaded mapping: header order is kept, because BizData keys follow it.
#[derive(Debug, Clone, Default)]
pub struct Mapping {
    /// The header, trimmed.
    pub(crate) header: Vec<String>,
    rows: HashMap<String, Vec<String>>,
}

impl Mapping {
    /// Load and check a mapping file.
    pub(crate) fn load(path: &Path) -> Result<Mapping, ConfigError> {
        let bytes = std::fs::read(path).map_err(|e| ConfigError {
            issues: vec![issue(path, None, "", read_error(&e))],
        })?;
        Mapping::parse(path, &bytes)
    }

    /// Parse mapping bytes as if read from `path`.
    fn parse(path: &Path, bytes: &[u8]) -> Result<Mapping, ConfigError> {
        let text = decode(bytes);
        let mut issues = Vec::new();
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(text.as_bytes());
        let mut header: Vec<String> = Vec::new();
        let mut rows: HashMap<String, Vec<String>> = HashMap::new();
        let mut first_line: HashMap<String, u64> = HashMap::new();
        let mut key = None;
        for result in reader.records() {
            let record = match result {
                Ok(r) => r,
                Err(e) => {
                    let line = e.position().map(|p| p.line() as usize);
                    issues.push(issue(path, line, "", format!("not valid CSV: {e}")));
                    continue;
                }
            };
            let line = record.position().map_or(0, |p| p.line());
            let cells: Vec<String> = record.iter().map(|c| c.trim().to_string()).collect();
            if header.is_empty() {
                header = cells;
                key = check_header(path, line as usize, &header, &mut issues);
                continue;
            }
            if cells.iter().all(String::is_empty) {
                continue;
            }
            let Some(k) = key else { continue };
            if cells.len() != header.len() {
                issues.push(issue(
                    path,
                    Some(line as usize),
                    "",
                    format!("row has {} cells, the header has {}", cells.len(), header.len()),
                ));
                continue;
            }
            let meter = cells[k].clone();
            if meter.is_empty() {
                issues.push(issue(
                    path,
                    Some(line as usize),
                    METER_COLUMN,
                    "empty meter number".to_string(),
                ));
            } else if let Some(first) = first_line.get(&meter) {
                issues.push(issue(
                    path,
                    Some(line as usize),
                    METER_COLUMN,
                    format!("meter `{meter}` appears twice (first at line {first})"),
                ));
            } else {
                first_line.insert(meter.clone(), line);
                rows.insert(meter, cells);
            }
        }
        if header.is_empty() && issues.is_empty() {
            issues.push(issue(
                path,
                Some(1),
                "",
                format!("the file is empty: it needs a header row with {METER_COLUMN}"),
            ));
        }
        if !issues.is_empty() {
            return Err(ConfigError { issues });
        }
        Ok(Mapping { header, rows })
    }

    /// Whether no meter is mapped (also the state after a failed load).
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Number of meters mapped.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// A meter's row as (column, value) pairs in header order.
    pub fn get(&self, meter_no: &str) -> Option<Vec<(&str, &str)>> {
        self.rows.get(meter_no).map(|cells| {
            self.header
                .iter()
                .map(String::as_str)
                .zip(cells.iter().map(String::as_str))
                .collect()
        })
    }
}

fn check_header(path: &Path, line: usize, header: &[String], issues: &mut Vec<ConfigIssue>) -> Option<usize> {
    let mut seen = HashMap::new();
    for (i, name) in header.iter().enumerate() {
        if name.is_empty() {
            issues.push(issue(
                path,
                Some(line),
                &format!("column {}", i + 1),
                "empty column name".to_string(),
            ));
        } else if let Some(first) = seen.insert(name.as_str(), i + 1) {
            issues.push(issue(
                path,
                Some(line),
                name,
                format!("column name used twice (columns {first} and {})", i + 1),
            ));
        }
    }
    let key = header.iter().position(|h| h == METER_COLUMN);
    if key.is_none() {
        issues.push(issue(
            path,
            Some(line),
            "",
            format!(
                "the header has no {METER_COLUMN} column (found: {}); is the file saved as CSV?",
                header.join(",")
            ),
        ));
    }
    key
}

fn issue(path: &Path, line: Option<usize>, field: &str, message: String) -> ConfigIssue {
    ConfigIssue {
        file: path.to_path_buf(),
        line,
        field: field.to_string(),
        message,
    }
}

/// UTF-8 (a BOM is dropped) when the bytes are valid UTF-8, else GB18030 (a superset of GBK).
fn decode(bytes: &[u8]) -> String {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => encoding_rs::GB18030.decode(bytes).0.into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_customer_label_is_name_and_number_or_whichever_exists() {
        let row = [("用户编号", "U1"), ("用户名称", " 张三 "), ("水表表号", "M1")];
        assert_eq!(customer_label(row).as_deref(), Some("张三 (U1)"));
        assert_eq!(
            customer_label([("用户名称", "张三"), ("用户编号", "")]).as_deref(),
            Some("张三")
        );
        assert_eq!(customer_label([("用户编号", "U1")]).as_deref(), Some("U1"));
        assert_eq!(customer_label([("水表表号", "M1"), ("用户地址", "东风路")]), None);
    }

    const CSV: &str = "用户编号,用户名称,水表表号,阀门口径\nU1, 张三 ,M1,DN20\nU2,李四,M2,\n";

    #[test]
    fn utf8_bom_and_gb18030_files_read_the_same() {
        let plain = Mapping::parse(Path::new("m.csv"), CSV.as_bytes()).unwrap();
        let mut bom = b"\xEF\xBB\xBF".to_vec();
        bom.extend_from_slice(CSV.as_bytes());
        let bom = Mapping::parse(Path::new("m.csv"), &bom).unwrap();
        let (gbk, _, _) = encoding_rs::GB18030.encode(CSV);
        let gbk = Mapping::parse(Path::new("m.csv"), &gbk).unwrap();
        for m in [&plain, &bom, &gbk] {
            assert_eq!(m.header, ["用户编号", "用户名称", "水表表号", "阀门口径"]);
            assert_eq!(
                m.get("M1").unwrap(),
                vec![
                    ("用户编号", "U1"),
                    ("用户名称", "张三"),
                    ("水表表号", "M1"),
                    ("阀门口径", "DN20")
                ]
            );
            assert_eq!(m.get("M2").unwrap()[3], ("阀门口径", ""));
        }
    }

    #[test]
    fn duplicate_meter_and_missing_key_column_are_located() {
        let e = Mapping::parse(Path::new("m.csv"), "水表表号,a\nM1,x\nM1,y\n".as_bytes()).unwrap_err();
        assert_eq!(e.issues.len(), 1);
        assert_eq!(e.issues[0].line, Some(3));
        assert!(
            e.issues[0].message.contains("appears twice (first at line 2)"),
            "{}",
            e.issues[0]
        );
        let e = Mapping::parse(Path::new("m.csv"), "meter,a\nM1,x\n".as_bytes()).unwrap_err();
        assert!(e.issues[0].message.contains("no 水表表号 column"), "{}", e.issues[0]);
        let e = Mapping::parse(Path::new("m.csv"), "水表表号,a\nM1,x,z\n".as_bytes()).unwrap_err();
        assert_eq!(e.issues[0].to_string(), "m.csv:2: row has 3 cells, the header has 2");
    }
}

//! What a failed load reports: a [`ConfigIssue`] is one problem located for a person to fix (file,
//! line, field, what is wrong and what is allowed); a [`ConfigError`] is every issue of one load.
//! Also the helpers that locate an issue: the line of a byte offset, a file error in words.
//!
//! Shared by the validator and the mapping loader; it imports nothing else of the folder.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in a config or mapping file, located for a person to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The field (dotted path, e.g. `meter[3].unit`), when known.
    pub field: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every issue found in one load; `run` refuses to start on it, `check` prints it and exits 2.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    /// All issues, in file order as far as known.
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.issues.len();
        writeln!(f, "{n} configuration error{}:", if n == 1 { "" } else { "s" })?;
        for issue in &self.issues {
            writeln!(f, "  {issue}")?;
        }
        Ok(())
    }
}

/// A [`ConfigError`] of one issue.
pub(super) fn single(path: &Path, line: Option<usize>, field: &str, message: &str) -> ConfigError {
    ConfigError {
        issues: vec![ConfigIssue {
            file: path.to_path_buf(),
            line,
            field: field.to_string(),
            message: message.to_string(),
        }],
    }
}

/// A file error in words that say what to do.
pub(crate) fn read_error(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "file not found: check the path".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied: the fieldgate user cannot read it".to_string(),
        _ => format!("cannot read: {e}"),
    }
}

/// The 1-based line of a byte offset in `text`.
pub(super) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

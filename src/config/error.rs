//! Config errors that always point at a place in the file.
//!
//! An operator who mistypes a key wants the editor to jump to it, so every
//! error carries the file, the 1-based line and column, and a reason, and
//! prints as `FILE:LINE:COL: reason` like a compiler does.

use std::ops::Range;
use std::path::{Path, PathBuf};

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file itself could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but something in it is wrong.
    #[error("{}:{line}:{col}: {reason}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        col: usize,
        reason: String,
    },
}

impl ConfigError {
    /// Builds an [`ConfigError::Invalid`] for the byte range `span` of `text`.
    pub(crate) fn at(path: &Path, text: &str, span: Option<Range<usize>>, reason: impl Into<String>) -> Self {
        let (line, col) = span.map_or((1, 1), |s| line_col(text, s.start));
        ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            col,
            reason: reason.into(),
        }
    }
}

/// Something in the file that works, but probably not as meant. Printed as
/// `FILE:LINE:COL: warning: reason`; the config is still used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{col}: warning: {reason}", path.display())]
pub struct ConfigWarning {
    pub path: PathBuf,
    pub line: usize,
    pub col: usize,
    pub reason: String,
}

impl ConfigWarning {
    pub(crate) fn at(path: &Path, text: &str, span: Range<usize>, reason: impl Into<String>) -> Self {
        let (line, col) = line_col(text, span.start);
        ConfigWarning {
            path: path.to_path_buf(),
            line,
            col,
            reason: reason.into(),
        }
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::line_col;

    #[test]
    fn line_and_column_are_one_based() {
        let text = "a = 1\nbb = 2\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        assert_eq!(line_col(text, 11), (2, 6));
        assert_eq!(line_col(text, 999), (3, 1));
    }
}

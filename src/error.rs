//! The library's error type. Every variant names what a user needs to fix the problem.
//!
//! Exit codes (see `main.rs`): 0 = ok, 1 = a stage failed, 2 = usage / config / internal error.

use std::path::PathBuf;

/// Result alias for the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A position in a file (1-based line and column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

impl std::fmt::Display for Pos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Everything that can go wrong in the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A pipeline file (or registry preset) is invalid.
    #[error("{file}{}: {msg}", pos.map(|p| format!(":{p}")).unwrap_or_default())]
    Config {
        /// The file that holds the problem.
        file: PathBuf,
        /// Where in the file, when known.
        pos: Option<Pos>,
        /// What is wrong and how to fix it.
        msg: String,
    },
    /// Bad command-line usage (e.g. `--set` syntax, unknown stage id).
    #[error("{0}")]
    Usage(String),
    /// The store is held by another process.
    #[error("{0}")]
    StoreBusy(String),
    /// A store problem (sled, corrupt data).
    #[error("store {path}: {msg}")]
    Store {
        /// The store directory.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
    /// A stage failed while running.
    #[error("stage {stage}: {msg}")]
    Stage {
        /// The stage instance id.
        stage: String,
        /// What went wrong.
        msg: String,
    },
    /// The run was interrupted (Ctrl-C / SIGTERM); state was checkpointed.
    #[error("interrupted")]
    Interrupted,
    /// A data problem (missing files, bad formats).
    #[error("{0}")]
    Data(String),
    /// I/O error (paths are named by fs-err).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// sled error.
    #[error("database: {0}")]
    Sled(#[from] sled::Error),
    /// JSON error.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// candle error.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// Build a config error.
    pub fn config(file: impl Into<PathBuf>, pos: Option<Pos>, msg: impl Into<String>) -> Self {
        Error::Config {
            file: file.into(),
            pos,
            msg: msg.into(),
        }
    }

    /// Build a stage error.
    pub fn stage(stage: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Stage {
            stage: stage.into(),
            msg: msg.into(),
        }
    }

    /// Process exit code for this error: 1 for a failed stage, 130 for an interrupt, 2 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Stage { .. } => 1,
            Error::Interrupted => 130,
            _ => 2,
        }
    }
}

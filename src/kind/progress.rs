//! Progress of a running stage, written by the worker to a small file and read by the driver.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// One progress reading.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Steps done.
    pub step: u64,
    /// Total steps.
    pub total: u64,
    /// Short message (e.g. `loss 0.53`).
    pub msg: String,
}

/// Writer side (rate-limited to a few writes a second).
#[derive(Debug)]
pub struct ProgressFile {
    path: PathBuf,
    last: Option<Instant>,
}

impl ProgressFile {
    /// Progress written to `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ProgressFile {
            path: path.into(),
            last: None,
        }
    }

    /// Record progress (cheap; at most every 200 ms, and always the last step).
    pub fn set(&mut self, step: u64, total: u64, msg: impl Into<String>) {
        let now = Instant::now();
        if step < total
            && self
                .last
                .is_some_and(|l| now - l < Duration::from_millis(200))
        {
            return;
        }
        self.last = Some(now);
        let p = Progress {
            step,
            total,
            msg: msg.into(),
        };
        if let Ok(b) = serde_json::to_vec(&p) {
            let tmp = self.path.with_extension("tmp");
            if std::fs::write(&tmp, b).is_ok() {
                let _ = std::fs::rename(&tmp, &self.path);
            }
        }
    }
}

/// Read the latest progress of a stage, if any.
pub fn read(path: &Path) -> Option<Progress> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

//! What the engine hands a running stage: its job (resolved config, upstream artifacts, folders),
//! a checkpointer, a progress sink and the interrupt flag; and what the stage hands back.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::exec::checkpoint::Checkpointer;
use crate::exec::job::Job;
use crate::exec::progress::ProgressFile;

/// Metrics and small outputs of a finished stage (artifacts are files in `job.out_dir`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageOutput {
    /// Scalar metrics (accuracy, loss, AP, ...).
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// Metric series: name -> (step, value) pairs (loss curves).
    #[serde(default)]
    pub series: BTreeMap<String, Vec<(u64, f64)>>,
    /// Small JSON for downstream stages (e.g. a dataset's location and classes).
    #[serde(default)]
    pub info: Value,
}

/// The running stage's view of the engine.
pub struct StageContext {
    /// The job: config, upstream, folders.
    pub job: Job,
    /// Atomic in-stage checkpoints in the stage's work folder.
    pub ckpt: Checkpointer,
    /// Progress reporting (read by the driver for its progress bars).
    pub progress: ProgressFile,
    /// Set by SIGINT / SIGTERM: checkpoint and return [`crate::Error::Interrupted`].
    pub interrupted: Arc<AtomicBool>,
}

impl StageContext {
    /// True once Ctrl-C / SIGTERM arrived.
    pub fn is_interrupted(&self) -> bool {
        self.interrupted.load(Ordering::SeqCst)
    }

    /// Log a line to the stage's log file (stdout of the worker process is the log).
    pub fn log(&self, msg: impl AsRef<str>) {
        use std::io::Write;
        let now = chrono::Local::now().format("%H:%M:%S");
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "[{now}] {}", msg.as_ref());
        let _ = out.flush();
    }
}

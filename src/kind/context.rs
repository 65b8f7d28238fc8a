//! What the engine hands a running stage: its job (resolved config, upstream artifacts, folders),
//! a checkpointer, a progress sink and the interrupt flag; and what the stage hands back.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::kind::checkpoint::Checkpointer;
use crate::kind::job::Job;
use crate::kind::progress::ProgressFile;
use crate::kind::tensorboard::EventWriter;

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
    /// Live curves (TensorBoard event file in the work folder), opened at the first
    /// [`StageContext::scalars`].
    pub curves: Curves,
}

/// The stage's TensorBoard event writer, opened on first use (`None` also after a write
/// failed: curves are a view, never a reason to stop training).
#[derive(Debug, Default)]
pub struct Curves(Option<Result<EventWriter, ()>>);

impl StageContext {
    /// True once Ctrl-C / SIGTERM arrived.
    pub fn is_interrupted(&self) -> bool {
        self.interrupted.load(Ordering::SeqCst)
    }

    /// Where this stage's curves go: `<work>/tb/<stage instance>` (TensorBoard names the run by
    /// the path, so `tensorboard --logdir <store>` lists every stage instance).
    pub fn curves_dir(&self) -> std::path::PathBuf {
        self.job.work_dir.join("tb").join(&self.job.id)
    }

    /// Writes the scalars of a logged step to the live curves and flushes them. Only the first
    /// rank of a data-parallel stage writes; non-finite values are left out. A failure is logged
    /// once and the curves stop; training goes on.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) {
        if self.job.dist.as_ref().is_some_and(|d| d.rank > 0) {
            return;
        }
        if self.curves.0.is_none() {
            let opened = EventWriter::create(&self.curves_dir());
            if let Err(e) = &opened {
                self.log(format!(
                    "live curves off: {}: {e}",
                    self.curves_dir().display()
                ));
            }
            self.curves.0 = Some(opened.map_err(|_| ()));
        }
        if let Some(Ok(w)) = &mut self.curves.0 {
            if let Err(e) = w.scalars(step, values) {
                let path = w.path().display().to_string();
                self.curves.0 = Some(Err(()));
                self.log(format!("live curves off: {path}: {e}"));
            }
        }
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

/// A stage context over a store folder, for unit tests of stages.
#[cfg(test)]
pub(crate) fn test_context(
    store: &std::path::Path,
    key: &str,
    upstream: BTreeMap<String, crate::kind::job::UpstreamRef>,
    pipeline_dir: &std::path::Path,
) -> StageContext {
    use crate::kind::checkpoint::Checkpointer;
    use crate::kind::job::Job;
    use crate::kind::progress::ProgressFile;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    let work = store.join("work").join(key);
    let out = store.join("tmp").join(key).join("out");
    fs_err::create_dir_all(&work).unwrap();
    fs_err::create_dir_all(&out).unwrap();
    let job = Job {
        id: "stage".into(),
        kind: "linear_probe".into(),
        key: key.into(),
        config: serde_json::json!({ "params": {} }),
        seed: 0,
        upstream,
        out_dir: out,
        work_dir: work.clone(),
        pipeline_dir: pipeline_dir.to_path_buf(),
        device: "cpu".into(),
        threads: 1,
        gpus: vec![],
        ranks: 1,
        dist: None,
    };
    StageContext {
        ckpt: Checkpointer::new(work.join("ckpt"), 1, 0),
        progress: ProgressFile::new(work.join("progress.json")),
        interrupted: Arc::new(AtomicBool::new(false)),
        job,
        curves: Default::default(),
    }
}

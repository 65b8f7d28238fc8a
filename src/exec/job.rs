//! The job file: everything `cjepa exec-stage` needs to run one stage, and the result files it
//! writes back (`result.json`, then `exit_code`). Workers never open the store's database.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::Result;
use crate::stages::StageOutput;
use crate::util::atomic;

/// One upstream stage as seen by a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpstreamRef {
    /// Instance id.
    pub id: String,
    /// Kind name.
    pub kind: String,
    /// Stage key.
    pub key: String,
    /// Its artifact folder.
    pub artifacts: PathBuf,
    /// Its resolved config.
    pub config: Value,
    /// Its metrics.
    pub metrics: BTreeMap<String, f64>,
    /// Its `info` output.
    pub info: Value,
}

/// A stage to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Instance id (`stage[k=v]`).
    pub id: String,
    /// Kind name.
    pub kind: String,
    /// Stage key (hex).
    pub key: String,
    /// Resolved config: `{params, model?, seed}`.
    pub config: Value,
    /// Base seed (draws derive from it and the key).
    pub seed: u64,
    /// Upstream stages by the name used in `needs`.
    pub upstream: BTreeMap<String, UpstreamRef>,
    /// Where artifacts are written (moved into the store on success).
    pub out_dir: PathBuf,
    /// Persistent work folder (checkpoints, logs) that survives interruptions.
    pub work_dir: PathBuf,
    /// Folder of the pipeline file.
    pub pipeline_dir: PathBuf,
    /// `auto`, `cpu`, `cuda:N`.
    pub device: String,
    /// CPU threads for this stage.
    pub threads: usize,
    /// GPU indices assigned by the pool.
    pub gpus: Vec<u32>,
}

impl Job {
    /// Path of the job file in the work folder.
    pub fn file(work_dir: &Path) -> PathBuf {
        work_dir.join("job.json")
    }

    /// Write the job file.
    pub fn write(&self) -> Result<PathBuf> {
        let p = Self::file(&self.work_dir);
        atomic::write_json(&p, self)?;
        Ok(p)
    }

    /// Read a job file.
    pub fn read(path: &Path) -> Result<Job> {
        Ok(serde_json::from_slice(&fs_err::read(path)?)?)
    }

    /// `result.json` in the work folder.
    pub fn result_file(&self) -> PathBuf {
        self.work_dir.join("result.json")
    }

    /// `exit_code` in the work folder: the verdict, written last.
    pub fn exit_code_file(&self) -> PathBuf {
        self.work_dir.join("exit_code")
    }

    /// `progress.json` in the work folder.
    pub fn progress_file(&self) -> PathBuf {
        self.work_dir.join("progress.json")
    }

    /// `stage.log` in the work folder.
    pub fn log_file(&self) -> PathBuf {
        self.work_dir.join("stage.log")
    }

    /// Checkpoint folder.
    pub fn ckpt_dir(&self) -> PathBuf {
        self.work_dir.join("ckpt")
    }
}

/// What a worker reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    /// The stage's output on success.
    pub output: Option<StageOutput>,
    /// Error text on failure.
    pub error: Option<String>,
    /// Wall seconds.
    pub secs: f64,
    /// Device actually used.
    pub device: String,
}

/// Read the verdict of a finished worker: exit code file first, then the result.
pub fn read_verdict(job: &Job) -> Option<(i32, Option<JobResult>)> {
    let code: i32 = std::fs::read_to_string(job.exit_code_file())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let res = std::fs::read(job.result_file())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    Some((code, res))
}

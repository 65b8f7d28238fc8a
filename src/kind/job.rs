//! The job file: everything `cjepa exec-stage` needs to run one stage, and the result files it
//! writes back (`result.json`, then `exit_code`). Workers never open the store's database.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::StageOutput;
use crate::error::Result;
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
    /// Data-parallel processes (1: the stage runs as one process).
    #[serde(default = "one")]
    pub ranks: usize,
    /// Set in a rank process only (never in the job file): which rank this process is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dist: Option<DistRole>,
}

fn one() -> usize {
    1
}

/// Which data-parallel rank a process is, and how its ranks meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DistRole {
    /// This process's rank, `0..ranks`.
    pub rank: usize,
    /// The ranks may run on several machines (started by `srun`): rank 0 listens on all
    /// interfaces and publishes its host name instead of the loopback address.
    pub multi_host: bool,
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

    /// `pending_upstream.json` in the work folder: upstream stages that had not finished when
    /// the job was written (Slurm `--detach` submits a whole pipeline at once). It maps the name
    /// used in `needs` to that upstream's work folder, whose result files are read when the stage
    /// starts (see [`Job::resolve_pending_upstream`]).
    pub fn pending_upstream_file(&self) -> PathBuf {
        self.work_dir.join("pending_upstream.json")
    }

    /// Fill in the metrics and info of upstream stages that were still to run when this job was
    /// written, from their `exit_code` (must be 0) and `result.json`. No-op without a
    /// `pending_upstream.json`.
    pub fn resolve_pending_upstream(&mut self) -> Result<()> {
        let Ok(bytes) = std::fs::read(self.pending_upstream_file()) else {
            return Ok(());
        };
        let pending: BTreeMap<String, PathBuf> = serde_json::from_slice(&bytes)?;
        for (name, dir) in pending {
            let code = std::fs::read_to_string(dir.join("exit_code")).ok();
            let res: Option<JobResult> = std::fs::read(dir.join("result.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let out = match (code.as_deref().map(str::trim), res) {
                (
                    Some("0"),
                    Some(JobResult {
                        output: Some(out), ..
                    }),
                ) => out,
                _ => {
                    return Err(crate::Error::stage(
                        &self.id,
                        format!(
                            "upstream `{name}` has no successful result in {} (it should have \
                             finished before this job started; run `cjepa status` to see it)",
                            dir.display()
                        ),
                    ))
                }
            };
            let Some(u) = self.upstream.get_mut(&name) else {
                return Err(crate::Error::stage(
                    &self.id,
                    format!(
                        "{} names upstream `{name}`, which the job does not need",
                        self.pending_upstream_file().display()
                    ),
                ));
            };
            u.metrics = out.metrics;
            u.info = out.info;
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn job(work: &Path, up: &Path) -> Job {
        let mut upstream = BTreeMap::new();
        upstream.insert(
            "data".to_string(),
            UpstreamRef {
                id: "data".into(),
                kind: "dataset".into(),
                key: "k".into(),
                artifacts: up.join("out"),
                config: Value::Null,
                metrics: BTreeMap::new(),
                info: Value::Null,
            },
        );
        Job {
            id: "train".into(),
            kind: "counter".into(),
            key: "t".into(),
            config: Value::Null,
            seed: 0,
            upstream,
            out_dir: work.join("out"),
            work_dir: work.to_path_buf(),
            pipeline_dir: work.to_path_buf(),
            device: "cpu".into(),
            threads: 1,
            gpus: vec![],
            ranks: 1,
            dist: None,
        }
    }

    #[test]
    fn pending_upstream_is_read_from_its_result_files() {
        let d = tempfile::tempdir().unwrap();
        let (work, up) = (d.path().join("w"), d.path().join("u"));
        fs_err::create_dir_all(&work).unwrap();
        fs_err::create_dir_all(&up).unwrap();
        let mut j = job(&work, &up);
        j.resolve_pending_upstream().unwrap(); // no sidecar: nothing to do
        assert_eq!(j.upstream["data"].info, Value::Null);
        let side: BTreeMap<String, PathBuf> = [("data".to_string(), up.clone())].into();
        atomic::write_json(&j.pending_upstream_file(), &side).unwrap();
        // the upstream has not finished: a clear error naming it
        let e = j.resolve_pending_upstream().unwrap_err().to_string();
        assert!(
            e.contains("upstream `data` has no successful result"),
            "{e}"
        );
        let mut out = StageOutput::default();
        out.metrics.insert("n".into(), 3.0);
        out.info = serde_json::json!({ "path": "/data/x" });
        let res = JobResult {
            output: Some(out),
            error: None,
            secs: 1.0,
            device: "cpu".into(),
        };
        atomic::write_json(&up.join("result.json"), &res).unwrap();
        atomic::write(&up.join("exit_code"), b"1").unwrap();
        assert!(
            j.resolve_pending_upstream().is_err(),
            "a failed upstream is no input"
        );
        atomic::write(&up.join("exit_code"), b"0").unwrap();
        j.resolve_pending_upstream().unwrap();
        assert_eq!(j.upstream["data"].metrics["n"], 3.0);
        assert_eq!(j.upstream["data"].info["path"], "/data/x");
    }
}

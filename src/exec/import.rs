//! Importing a finished worker into the store, shared by every executor: the verdict files
//! (`exit_code`, `result.json`) become a committed record (artifacts renamed into place, record
//! last), a failed record, or a checkpoint pointer. Only the process that holds the store calls
//! this; workers never open the database.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::Result;
use crate::kind::job::{Job, JobResult};
use crate::kind::StageOutput;
use crate::plan::Plan;
use crate::store::record::Provenance;
use crate::store::{Invocation, Record, Status, Store};

/// What a record needs to know about its stage, independent of a live [`Plan`] (a detached
/// Slurm job is imported by a later `cjepa status` whose plan may have changed since).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageIdentity {
    /// Pipeline name.
    pub pipeline: String,
    /// Folder of the pipeline file (provenance: git commit).
    pub pipeline_dir: PathBuf,
    /// Instance id.
    pub id: String,
    /// Kind name.
    pub kind: String,
    /// Stage key.
    pub key: String,
    /// Resolved config.
    pub config: Value,
    /// The JSON that was hashed into the key.
    pub key_input: Value,
}

impl StageIdentity {
    /// Identity of stage `i` of a plan.
    pub fn of(plan: &Plan, i: usize) -> Self {
        let s = &plan.stages[i];
        StageIdentity {
            pipeline: plan.pipeline.name.clone(),
            pipeline_dir: plan.pipeline.dir.clone(),
            id: s.inst.id.clone(),
            kind: s.kind.name().into(),
            key: s.key.clone(),
            config: s.config.clone(),
            key_input: s.key_input.clone(),
        }
    }
}

/// A worker's verdict, read from its files.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Exit code 0 with an output.
    Succeeded {
        /// The stage's output.
        output: StageOutput,
        /// Wall seconds of the stage.
        secs: f64,
        /// Device actually used.
        device: String,
    },
    /// Exit code 130: stopped by a signal after checkpointing.
    Interrupted,
    /// Any other exit code (or 0 without an output); the text says why.
    Failed(String),
    /// No `exit_code` file (yet).
    Missing,
}

/// Read and classify the verdict files of `job`.
pub fn verdict(job: &Job) -> Verdict {
    match crate::kind::job::read_verdict(job) {
        Some((
            0,
            Some(JobResult {
                output: Some(output),
                secs,
                device,
                ..
            }),
        )) => Verdict::Succeeded {
            output,
            secs,
            device,
        },
        Some((130, _)) => Verdict::Interrupted,
        Some((_, Some(res))) => Verdict::Failed(res.error.unwrap_or_else(|| "failed".into())),
        Some((code, None)) => {
            Verdict::Failed(format!("worker exited with code {code} and no result"))
        }
        None => Verdict::Missing,
    }
}

/// Commit a succeeded stage: keep its log with the artifacts, move the output into place, write
/// the record last, forget its checkpoint and remove its work and temporary folders.
pub fn commit_success(
    store: &Store,
    who: &StageIdentity,
    job: &Job,
    output: StageOutput,
    secs: f64,
    device: &str,
    started: chrono::DateTime<chrono::Utc>,
) -> Result<Record> {
    if job.log_file().is_file() {
        let _ = fs_err::copy(job.log_file(), job.out_dir.join("stage.log"));
    }
    let rec = Record {
        key: who.key.clone(),
        pipeline: who.pipeline.clone(),
        stage_id: who.id.clone(),
        kind: who.kind.clone(),
        status: Status::Succeeded,
        config: who.config.clone(),
        key_input: who.key_input.clone(),
        metrics: output.metrics,
        series: output.series,
        info: output.info,
        artifacts: vec![],
        artifacts_deleted: false,
        started,
        finished: chrono::Utc::now(),
        secs,
        error: None,
        provenance: Provenance::here(device, &who.pipeline_dir),
    };
    // the live curves outlive the work folder: they become artifacts of the record
    let curves = job.work_dir.join("tb");
    if curves.is_dir() && !job.out_dir.join("tb").exists() {
        fs_err::rename(&curves, job.out_dir.join("tb"))?;
    }
    let rec = store.commit(rec, &job.out_dir)?;
    store.clear_checkpoint(&who.key)?;
    let _ = fs_err::remove_dir_all(&job.work_dir);
    let _ = fs_err::remove_dir_all(store.tmp_dir(&who.key));
    Ok(rec)
}

/// Record a failed stage (never a hit) and remember its last checkpoint, so the next run resumes.
pub fn commit_failure(
    store: &Store,
    who: &StageIdentity,
    job: &Job,
    error: &str,
    started: chrono::DateTime<chrono::Utc>,
) -> Result<Record> {
    let rec = Record {
        key: who.key.clone(),
        pipeline: who.pipeline.clone(),
        stage_id: who.id.clone(),
        kind: who.kind.clone(),
        status: Status::Failed,
        config: who.config.clone(),
        key_input: who.key_input.clone(),
        metrics: BTreeMap::new(),
        series: BTreeMap::new(),
        info: Value::Null,
        artifacts: vec![],
        artifacts_deleted: false,
        started,
        finished: chrono::Utc::now(),
        secs: 0.0,
        error: Some(error.to_string()),
        provenance: Provenance::here(&job.device, &who.pipeline_dir),
    };
    store.put(&rec)?;
    keep_checkpoint(store, job)?;
    Ok(rec)
}

/// Point the store at the job's newest checkpoint (an interrupted or failed stage).
pub fn keep_checkpoint(store: &Store, job: &Job) -> Result<()> {
    if let Some(c) = crate::kind::checkpoint::latest(&job.ckpt_dir())? {
        store.set_checkpoint(&job.key, c.step, &c.path)?;
    }
    Ok(())
}

/// Append one `cjepa run` to the invocation log: the selected stages, each with whether it was
/// taken from the store.
pub fn log_invocation(
    store: &Store,
    plan: &Plan,
    selected: &[usize],
    cached: impl Fn(usize) -> bool,
) -> Result<()> {
    store.log_invocation(&Invocation {
        pipeline: plan.pipeline.name.clone(),
        file: plan.pipeline.file.display().to_string(),
        started: chrono::Utc::now(),
        stages: selected
            .iter()
            .map(|&i| {
                (
                    plan.stages[i].inst.id.clone(),
                    plan.stages[i].key.clone(),
                    cached(i),
                )
            })
            .collect(),
    })
}

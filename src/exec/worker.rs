//! `cjepa exec-stage JOB.json`: runs one stage from its job file and writes `result.json`, then
//! the `exit_code` file (0 ok, 1 failed, 130 interrupted). Every executor runs this.

use std::path::Path;
use std::time::Instant;

use super::checkpoint::Checkpointer;
use super::job::{Job, JobResult};
use super::progress::ProgressFile;
use crate::error::{Error, Result};
use crate::stages::{StageContext, StageKind};
use crate::util::atomic;

/// Checkpoint cadence defaults (overridable per stage with `checkpoint_every` / `checkpoint_secs`).
const DEFAULT_CKPT_SECS: u64 = 300;

/// Run the job in `job_file`; returns the process exit code.
pub fn exec_stage(job_file: &Path) -> Result<i32> {
    let mut job = Job::read(job_file)?;
    let interrupted = super::signals::install();
    if let Err(e) = job.resolve_pending_upstream() {
        let result = JobResult {
            output: None,
            error: Some(e.to_string()),
            secs: 0.0,
            device: job.device.clone(),
        };
        atomic::write_json(&job.result_file(), &result)?;
        atomic::write(&job.exit_code_file(), b"1")?;
        return Ok(1);
    }
    let params = &job.config["params"];
    let every_steps = params
        .get("checkpoint_every")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let every_secs = params
        .get("checkpoint_secs")
        .and_then(|v| v.as_u64())
        .unwrap_or(DEFAULT_CKPT_SECS);
    if let Some(n) = Some(job.threads).filter(|n| *n > 0) {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
    let kind = StageKind::parse(&job.kind)
        .ok_or_else(|| Error::stage(&job.id, format!("unknown kind {}", job.kind)))?;
    fs_err::create_dir_all(&job.out_dir)?;
    let mut ctx = StageContext {
        ckpt: Checkpointer::new(job.ckpt_dir(), every_steps, every_secs),
        progress: ProgressFile::new(job.progress_file()),
        interrupted,
        job,
    };
    let t0 = Instant::now();
    ctx.log(format!(
        "stage {} ({}) key {}",
        ctx.job.id, ctx.job.kind, ctx.job.key
    ));
    let res = kind.run(&mut ctx);
    let secs = t0.elapsed().as_secs_f64();
    let device = ctx.job.device.clone();
    let (code, result) = match res {
        Ok(out) => (
            0,
            JobResult {
                output: Some(out),
                error: None,
                secs,
                device,
            },
        ),
        Err(Error::Interrupted) => {
            ctx.log("interrupted: state checkpointed, stopping");
            (
                130,
                JobResult {
                    output: None,
                    error: Some("interrupted".into()),
                    secs,
                    device,
                },
            )
        }
        Err(e) => {
            ctx.log(format!("error: {e}"));
            (
                1,
                JobResult {
                    output: None,
                    error: Some(e.to_string()),
                    secs,
                    device,
                },
            )
        }
    };
    atomic::write_json(&ctx.job.result_file(), &result)?;
    atomic::write(&ctx.job.exit_code_file(), code.to_string().as_bytes())?;
    Ok(code)
}

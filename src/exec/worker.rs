//! `cjepa exec-stage JOB.json`: runs one stage from its job file and writes `result.json`, then
//! the `exit_code` file (0 ok, 1 failed, 130 interrupted). Every executor runs this.

use std::path::Path;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::kind::checkpoint::Cadence;
use crate::kind::job::{DistRole, Job, JobResult};
use crate::kind::progress::ProgressFile;
use crate::kind::{KindTable, StageContext, StageKind};
use crate::train::parallel::launch::{self as ranks, Launcher, RankVerdict};
use crate::util::atomic;

/// What an `exec-stage` process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The stage's process: runs the stage, or starts its ranks when the job asks for several
    /// (and the kind trains data-parallel), with this launcher.
    Stage(Launcher),
    /// Rank `r` of a data-parallel stage (started by the local launcher).
    Rank(usize),
    /// A rank started by `srun`: the rank is `SLURM_PROCID`.
    SlurmRank,
}

/// Run the job in `job_file` as its stage process with the kinds' implementations `kinds`;
/// returns the process exit code.
pub fn exec_stage(job_file: &Path, kinds: KindTable) -> Result<i32> {
    exec_stage_as(job_file, Role::Stage(Launcher::Local), kinds)
}

/// Run the job in `job_file` in the given role; returns the process exit code.
pub fn exec_stage_as(job_file: &Path, role: Role, kinds: KindTable) -> Result<i32> {
    let mut job = Job::read(job_file)?;
    let interrupted = super::signals::install();
    let rank = match role {
        Role::Stage(_) => None,
        Role::Rank(r) => Some((r, false)),
        Role::SlurmRank => Some((ranks::slurm_rank(&job)?, true)),
    };
    let finish = |job: &Job, code: i32, result: JobResult| -> Result<i32> {
        match rank {
            Some((r, _)) => ranks::write_rank_verdict(job, r, &RankVerdict { code, result })?,
            None => {
                atomic::write_json(&job.result_file(), &result)?;
                atomic::write(&job.exit_code_file(), code.to_string().as_bytes())?;
            }
        }
        Ok(code)
    };
    if let Err(e) = job.resolve_pending_upstream() {
        let result = JobResult {
            output: None,
            error: Some(e.to_string()),
            secs: 0.0,
            device: job.device.clone(),
        };
        return finish(&job, 1, result);
    }
    let kind = StageKind::parse(&job.kind)
        .ok_or_else(|| Error::stage(&job.id, format!("unknown kind {}", job.kind)))?;
    if let (Role::Stage(how), true) = (role, job.ranks > 1 && kind.data_parallel()) {
        fs_err::create_dir_all(&job.out_dir)?;
        let log = |m: &str| log_line(m);
        let (code, result) = match ranks::launch(&job, job_file, how, &interrupted, log) {
            Ok(v) => v,
            Err(e) => (
                1,
                JobResult {
                    output: None,
                    error: Some(e.to_string()),
                    secs: 0.0,
                    device: job.device.clone(),
                },
            ),
        };
        return finish(&job, code, result);
    }
    if let Some((r, multi_host)) = rank {
        job.dist = Some(DistRole {
            rank: r,
            multi_host,
        });
        if multi_host {
            job.device = ranks::slurm_device(&job.device);
        }
    }
    let cadence = Cadence::of(&job.config["params"]);
    if let Some(n) = Some(job.threads).filter(|n| *n > 0) {
        let n = match rank {
            Some(_) => (n / job.ranks).max(1),
            None => n,
        };
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
    kinds(kind).prepare_process(&job, rank.map(|(r, _)| r));
    // bf16 autocast for the whole stage process (the plan writes `precision` only for bf16)
    let precision = match job.config.get("precision").and_then(|v| v.as_str()) {
        Some(s) => crate::model::precision::Precision::parse(s).map_err(crate::Error::Usage)?,
        None => crate::model::precision::Precision::F32,
    };
    crate::model::precision::set_process(precision);
    // f32 matrix products on CUDA use TF32 tensor cores (`CJEPA_TF32=0`: exact f32)
    crate::model::precision::allow_tf32_from_env();
    fs_err::create_dir_all(&job.out_dir)?;
    let progress = match rank {
        Some((r, _)) if r > 0 => ranks::dist_dir(&job).join(format!("progress-{r}.json")),
        _ => job.progress_file(),
    };
    let mut ctx = StageContext {
        ckpt: cadence.checkpointer(job.ckpt_dir()),
        progress: ProgressFile::new(progress),
        interrupted,
        job,
        curves: Default::default(),
    };
    let t0 = Instant::now();
    ctx.log(format!(
        "stage {} ({}) key {}{}",
        ctx.job.id,
        ctx.job.kind,
        ctx.job.key,
        match rank {
            Some((r, _)) => format!(", rank {r} of {}", ctx.job.ranks),
            None => String::new(),
        }
    ));
    let res = kinds(kind).run(&mut ctx);
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
    finish(&ctx.job, code, result)
}

/// A line in the stage log (stdout of the worker process).
fn log_line(msg: &str) {
    use std::io::Write;
    let now = chrono::Local::now().format("%H:%M:%S");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "[{now}] {msg}");
    let _ = out.flush();
}

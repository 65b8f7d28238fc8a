//! The Slurm executor (`executor: slurm` or `cjepa run --executor slurm`).
//!
//! Every stage runs as `cjepa exec-stage JOB.json` inside an sbatch job ([`script`]); the ready
//! instances of a matrix stage go in as one job array ([`submit`]). Two ways to drive it:
//! - attached (default): like the local executor, stages are submitted as their parents finish,
//!   results are imported into the store as they arrive, Ctrl-C runs `scancel` (the stages
//!   checkpoint on SIGTERM) and failed stages are retried up to `retries`;
//! - `--detach`: everything is submitted at once, children with `--dependency=afterok:` on their
//!   parents, and the command returns; `cjepa status` (or the next `cjepa run`) imports the
//!   results later. A detached child reads its parents' results from their work folders
//!   (`pending_upstream.json`), so a parent is imported only once its children ended.
//!
//! States come from batched squeue/scontrol polls with backoff ([`poll`]); an empty or failed
//! answer is "unknown", never a failure. The `exit_code` file written by the job is the verdict:
//! 0 imports the stage, 130 means it checkpointed (on USR1 it requeues itself and resumes), a job
//! that Slurm says ended without one failed. Submitted jobs are kept in the store's `slurm_jobs`
//! tree ([`jobs`]) until imported. The driver is the only process that opens the store.

mod driver;
pub mod jobs;
pub mod poll;
pub mod script;
pub mod submit;
mod track;

pub use track::{cancel, reconcile, Reconciled};

use std::time::Duration;

use self::driver::Driver;
use self::poll::Commands;
use super::core::{Reporter, RunOptions, RunSummary};
use crate::error::Result;
use crate::plan::Plan;
use crate::spec::SlurmSite;
use crate::store::Store;

/// Options of the Slurm executor.
#[derive(Debug, Clone)]
pub struct SlurmOptions {
    /// Site options from the pipeline file.
    pub site: SlurmSite,
    /// Submit everything with afterok dependencies and return.
    pub detach: bool,
    /// The Slurm commands.
    pub commands: Commands,
    /// Shortest time between squeue polls.
    pub poll_min: Duration,
    /// Longest time between squeue polls (backoff while nothing changes).
    pub poll_max: Duration,
    /// How long after Slurm says a job ended its `exit_code` file may still appear (shared file
    /// systems lag) before the job counts as ended without a verdict.
    pub grace: Duration,
    /// After Ctrl-C: how long to wait for cancelled stages to checkpoint and report.
    pub stop_wait: Duration,
}

impl SlurmOptions {
    /// Defaults for a site.
    pub fn new(site: SlurmSite) -> Self {
        SlurmOptions {
            site,
            detach: false,
            commands: Commands::default(),
            poll_min: Duration::from_secs(1),
            poll_max: Duration::from_secs(15),
            grace: Duration::from_secs(20),
            stop_wait: Duration::from_secs(120),
        }
    }
}

/// Whether Slurm's client commands answer here (`sbatch --version`).
pub fn available(cmds: &Commands) -> bool {
    std::process::Command::new(&cmds.sbatch)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// What `--detach` did to a stage.
#[derive(Debug, Clone, PartialEq)]
pub enum DetachedOutcome {
    /// Taken from the store.
    Cached,
    /// Submitted now as this Slurm job.
    Submitted(String),
    /// Still queued or running from an earlier submission.
    AlreadySubmitted(String),
    /// Imported now: finished since an earlier detached run.
    Imported,
    /// Could not be submitted, or failed since an earlier submission.
    Failed(String),
    /// An upstream stage failed.
    Skipped {
        /// The failed upstream stage.
        because: String,
    },
}

/// Result of a detached run.
#[derive(Debug, Clone)]
pub struct DetachedSummary {
    /// (instance id, outcome) for every selected stage, in plan order.
    pub outcomes: Vec<(String, DetachedOutcome)>,
}

/// Run a plan on Slurm (attached), or submit it (`sopts.detach`; see [`run_detached`]).
pub fn run(
    plan: &Plan,
    store: &Store,
    opts: &RunOptions,
    sopts: &SlurmOptions,
    rep: &mut dyn Reporter,
) -> Result<RunSummary> {
    let mut d = Driver::new(plan, store, opts, sopts, rep)?;
    let mut pending = d.start()?;
    d.attached(&mut pending)?;
    d.finish()
}

/// Submit every stage that must run at once, children with `--dependency=afterok:` on their
/// parents, and return without waiting. `cjepa status` imports the results later.
pub fn run_detached(
    plan: &Plan,
    store: &Store,
    opts: &RunOptions,
    sopts: &SlurmOptions,
    rep: &mut dyn Reporter,
) -> Result<DetachedSummary> {
    let mut d = Driver::new(plan, store, opts, sopts, rep)?;
    let pending = d.start()?;
    d.detached(pending)
}

/// A job-name-safe form of an id (`pretrain[method=ijepa]` -> `pretrain_method_ijepa_`).
pub(crate) fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

//! The executors' shared core: what `cjepa run` decides for each planned stage (cache hit, run,
//! resume), the job a stage process is handed, the steps of a run both executors take (cached
//! stages taken over, the ready set, skips below a failure, the run's end) and the events they
//! report. The local executor ([`super::local`]) and the Slurm executor ([`super::slurm`])
//! build on it; neither owns it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::import;
use crate::error::Result;
use crate::kind::job::{Job, UpstreamRef};
use crate::plan::{select, Plan};
use crate::store::{Lookup, Record, Store};

/// Options of `cjepa run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// `--only` ids.
    pub only: Vec<String>,
    /// `--force` ids.
    pub force: Vec<String>,
    /// Stages at once.
    pub jobs: usize,
    /// CPU threads in the pool.
    pub threads: usize,
    /// GPU indices in the pool.
    pub gpus: Vec<u32>,
    /// Keep running independent stages after a failure.
    pub keep_going: bool,
    /// Device setting passed to stages.
    pub device: String,
    /// Worker executable (default: this executable).
    pub worker_exe: Option<PathBuf>,
    /// Set on Ctrl-C / SIGTERM.
    pub interrupted: Arc<AtomicBool>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            only: vec![],
            force: vec![],
            jobs: 1,
            threads: num_cpus::get(),
            gpus: vec![],
            keep_going: false,
            device: "auto".into(),
            worker_exe: None,
            interrupted: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// Why a stage will run (or not).
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Cached: a complete record exists.
    Cached,
    /// Will run; the reasons say why.
    Run(Vec<String>),
    /// Not selected by `--only`.
    NotSelected,
}

/// What happened to a stage.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Taken from the store.
    Cached,
    /// Ran and succeeded.
    Ran {
        /// Wall seconds.
        secs: f64,
    },
    /// Failed after its retries.
    Failed(String),
    /// Not run because an upstream stage failed.
    Skipped {
        /// The failed upstream stage.
        because: String,
    },
    /// Stopped by Ctrl-C / SIGTERM (checkpointed).
    Interrupted,
    /// Not started (an earlier failure stopped the run without --keep-going).
    NotStarted,
}

/// Events for the CLI (the library never prints).
#[derive(Debug, Clone)]
pub enum Event {
    /// Something worth a warning (corrupt record, missing artifact).
    Warning(String),
    /// A stage was found in the store.
    Cached { id: String, key: String },
    /// A stage started.
    Started {
        id: String,
        key: String,
        attempt: u32,
        resume_step: Option<u64>,
        log: PathBuf,
    },
    /// A stage was handed to a batch system (Slurm job id `job`); `earlier`: by an earlier run.
    Submitted {
        id: String,
        job: String,
        earlier: bool,
        log: PathBuf,
    },
    /// Progress of a running stage.
    Progress {
        id: String,
        step: u64,
        total: u64,
        msg: String,
    },
    /// A stage finished.
    Finished {
        id: String,
        secs: f64,
        metrics: BTreeMap<String, f64>,
    },
    /// A stage failed (and may be retried).
    Failed {
        id: String,
        error: String,
        retrying: bool,
        log: PathBuf,
    },
    /// A stage was skipped because an upstream failed.
    Skipped { id: String, because: String },
    /// The run is stopping after an interrupt.
    Stopping,
}

/// Sink for events.
pub trait Reporter {
    /// Receive one event.
    fn event(&mut self, ev: Event);
}

/// Result of a run.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// (instance id, outcome) for every selected stage, in plan order.
    pub outcomes: Vec<(String, Outcome)>,
    /// True if stopped by a signal.
    pub interrupted: bool,
}

impl RunSummary {
    /// Number of failed stages.
    pub fn failed(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Failed(_)))
            .count()
    }
}

/// The pending stages whose upstream stages are all done (have a record).
pub fn ready(plan: &Plan, pending: &BTreeSet<usize>, records: &[Option<Record>]) -> Vec<usize> {
    pending
        .iter()
        .copied()
        .filter(|&i| {
            plan.stages[i]
                .inst
                .upstream
                .iter()
                .all(|(_, u)| records[*u].is_some())
        })
        .collect()
}

/// Pending stages below a failed or skipped stage are skipped, naming the failed one.
pub fn skip_below_failures(
    plan: &Plan,
    pending: &mut BTreeSet<usize>,
    outcome: &mut [Option<Outcome>],
    rep: &mut dyn Reporter,
) {
    let mut changed = true;
    while changed {
        changed = false;
        for &i in pending.clone().iter() {
            let failed_up =
                plan.stages[i]
                    .inst
                    .upstream
                    .iter()
                    .find_map(|(_, u)| match &outcome[*u] {
                        Some(Outcome::Failed(_)) => Some(plan.stages[*u].inst.id.clone()),
                        Some(Outcome::Skipped { because }) => Some(because.clone()),
                        _ => None,
                    });
            if let Some(because) = failed_up {
                pending.remove(&i);
                rep.event(Event::Skipped {
                    id: plan.stages[i].inst.id.clone(),
                    because: because.clone(),
                });
                outcome[i] = Some(Outcome::Skipped { because });
                changed = true;
            }
        }
    }
}

/// The end of a run: flush the store, log the invocation and say what each selected stage
/// came to.
pub fn finish(
    plan: &Plan,
    store: &Store,
    opts: &RunOptions,
    outcome: &[Option<Outcome>],
    interrupted: bool,
) -> Result<RunSummary> {
    store.flush()?;
    let sel = select::only(plan, &opts.only)?;
    let selected: Vec<usize> = sel.iter().copied().collect();
    import::log_invocation(store, plan, &selected, |i| {
        outcome[i] == Some(Outcome::Cached)
    })?;
    Ok(RunSummary {
        outcomes: selected
            .iter()
            .map(|&i| {
                (
                    plan.stages[i].inst.id.clone(),
                    outcome[i].clone().unwrap_or(Outcome::NotStarted),
                )
            })
            .collect(),
        interrupted,
    })
}

/// A stage decided [`Decision::Cached`]: its record, announced as cached (`None` if the record
/// went away since the decision).
pub fn take_cached(
    plan: &Plan,
    store: &Store,
    i: usize,
    rep: &mut dyn Reporter,
) -> Result<Option<Record>> {
    let s = &plan.stages[i];
    let Lookup::Hit(r) = store.lookup(&s.key)? else {
        return Ok(None);
    };
    rep.event(Event::Cached {
        id: s.inst.id.clone(),
        key: s.key.clone(),
    });
    Ok(Some(*r))
}

/// A stage decided [`Decision::Run`]: a warning for each reason that is a damaged record (a
/// corrupt record, a missing artifact), which the run replaces.
pub fn warn_damaged(id: &str, reasons: &[String], rep: &mut dyn Reporter) {
    for r in reasons {
        if r.starts_with("corrupt record") || r.starts_with("artifact") {
            rep.event(Event::Warning(format!("{id}: {r}; it will run again")));
        }
    }
}

/// Decide, for every instance, whether it would run and why (dry run; `status --explain`).
pub fn decide(plan: &Plan, store: &Store, opts: &RunOptions) -> Result<Vec<Decision>> {
    let sel = select::only(plan, &opts.only)?;
    let forced = select::force(plan, &opts.force)?;
    let mut out = Vec::with_capacity(plan.stages.len());
    for (i, s) in plan.stages.iter().enumerate() {
        if !sel.contains(&i) {
            out.push(Decision::NotSelected);
            continue;
        }
        if forced.contains(&i) {
            out.push(Decision::Run(vec!["forced".into()]));
            continue;
        }
        let d = match store.lookup(&s.key)? {
            Lookup::Hit(_) => Decision::Cached,
            Lookup::Failed(r) => Decision::Run(vec![format!(
                "previous attempt failed: {}",
                r.error.unwrap_or_default()
            )]),
            Lookup::Miss(why) => {
                let mut reasons = Vec::new();
                if let Some(w) = why {
                    reasons.push(w);
                }
                if let Some(step) =
                    crate::kind::checkpoint::latest(&store.work_dir(&s.key).join("ckpt"))?
                        .map(|c| c.step)
                {
                    reasons.push(format!("resumes from its checkpoint at step {step}"));
                }
                match store.latest_key(&plan.pipeline.name, &s.inst.id)? {
                    Some(old) if old != s.key => match store.get(&old)? {
                        Some(Ok(rec)) => {
                            reasons.extend(crate::plan::key::explain(&rec.key_input, &s.key_input))
                        }
                        _ => reasons.push("config changed".into()),
                    },
                    Some(_) => {}
                    None if reasons.is_empty() => reasons.push("never run".into()),
                    None => {}
                }
                Decision::Run(reasons)
            }
        };
        out.push(d);
    }
    Ok(out)
}

/// How a job sees a finished upstream stage `u` (its record and artifact folder).
pub fn upstream_ref(plan: &Plan, store: &Store, u: usize, rec: &Record) -> UpstreamRef {
    UpstreamRef {
        id: plan.stages[u].inst.id.clone(),
        kind: rec.kind.clone(),
        key: rec.key.clone(),
        artifacts: store.artifact_dir(&rec.key),
        config: plan.stages[u].config.clone(),
        metrics: rec.metrics.clone(),
        info: rec.info.clone(),
    }
}

/// The device a stage is told to use, from the `--device` setting and whether it holds a GPU.
pub fn device_for(setting: &str, has_gpu: bool) -> String {
    match (setting, has_gpu) {
        // CUDA_VISIBLE_DEVICES is set to the granted GPUs, so the first one is cuda:0
        ("auto", true) | ("cuda", true) => "cuda:0".to_string(),
        ("auto", false) => "cpu".into(),
        (d, _) => d.to_string(),
    }
}

/// Write the job file of stage `i` into fresh work and output folders (stale verdict files of
/// an earlier attempt removed; checkpoints kept).
pub fn prepare_job(
    plan: &Plan,
    store: &Store,
    i: usize,
    upstream: BTreeMap<String, UpstreamRef>,
    device: String,
    threads: usize,
    gpus: Vec<u32>,
) -> Result<Job> {
    let s = &plan.stages[i];
    let ranks = if s.kind.data_parallel() {
        s.resources.world(gpus.len())
    } else {
        1
    };
    let work_dir = store.work_dir(&s.key);
    let out_dir = store.tmp_dir(&s.key).join("out");
    if out_dir.exists() {
        fs_err::remove_dir_all(&out_dir)?;
    }
    fs_err::create_dir_all(&out_dir)?;
    fs_err::create_dir_all(&work_dir)?;
    let _ = fs_err::remove_file(work_dir.join("exit_code"));
    let _ = fs_err::remove_file(work_dir.join("result.json"));
    let _ = fs_err::remove_file(work_dir.join("pending_upstream.json"));
    let job = Job {
        id: s.inst.id.clone(),
        kind: s.kind.name().into(),
        key: s.key.clone(),
        config: s.config.clone(),
        seed: plan.pipeline.spec.defaults.seed,
        upstream,
        out_dir,
        work_dir: work_dir.canonicalize().unwrap_or(work_dir),
        pipeline_dir: plan
            .pipeline
            .dir
            .canonicalize()
            .unwrap_or_else(|_| plan.pipeline.dir.clone()),
        device,
        threads,
        gpus,
        ranks,
        dist: None,
    };
    job.write()?;
    Ok(job)
}

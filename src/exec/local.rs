//! The local executor: runs a plan's stages in topological order, independent stages in
//! parallel within `--jobs` and the resource pool, each as a `cjepa exec-stage` child process.
//! Cache hits are skipped; failures are retried, then their dependents are reported skipped by
//! name; Ctrl-C / SIGTERM are forwarded so stages checkpoint, and an unfinished stage resumes
//! from its checkpoint on the next run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use super::import::{self, StageIdentity, Verdict};
use super::job::{Job, UpstreamRef};
use super::pool::{Grant, Pool};
use crate::error::{Error, Result};
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
                    super::checkpoint::latest(&store.work_dir(&s.key).join("ckpt"))?.map(|c| c.step)
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

struct Running {
    grant: Grant,
    job: Job,
    pid: u32,
    attempt: u32,
    started: chrono::DateTime<chrono::Utc>,
}

/// Run a plan against an open store.
pub fn run(
    plan: &Plan,
    store: &Store,
    opts: &RunOptions,
    rep: &mut dyn Reporter,
) -> Result<RunSummary> {
    let decisions = decide(plan, store, opts)?;
    let n = plan.stages.len();
    let mut outcome: Vec<Option<Outcome>> = vec![None; n];
    let mut records: Vec<Option<Record>> = vec![None; n];
    let exe = match &opts.worker_exe {
        Some(p) => p.clone(),
        None => std::env::current_exe()?,
    };
    // cached stages first (and warnings for unusable records)
    for (i, d) in decisions.iter().enumerate() {
        let s = &plan.stages[i];
        match d {
            Decision::Cached => {
                if let Lookup::Hit(r) = store.lookup(&s.key)? {
                    records[i] = Some(*r);
                    outcome[i] = Some(Outcome::Cached);
                    rep.event(Event::Cached {
                        id: s.inst.id.clone(),
                        key: s.key.clone(),
                    });
                }
            }
            Decision::Run(reasons) => {
                for r in reasons {
                    if r.starts_with("corrupt record") || r.starts_with("artifact") {
                        rep.event(Event::Warning(format!(
                            "{}: {r}; it will run again",
                            s.inst.id
                        )));
                    }
                }
            }
            Decision::NotSelected => {}
        }
    }
    let mut pending: BTreeSet<usize> = decisions
        .iter()
        .enumerate()
        .filter(|(_, d)| matches!(d, Decision::Run(_)))
        .map(|(i, _)| i)
        .collect();
    let mut pool = Pool::new(opts.threads, opts.gpus.clone(), opts.jobs);
    let mut running: BTreeMap<usize, Running> = BTreeMap::new();
    let (tx, rx) = mpsc::channel::<(usize, std::io::Result<std::process::ExitStatus>)>();
    let mut stop_launching = false;
    let mut signalled = false;
    loop {
        // interrupt: forward to children once, stop launching
        if opts.interrupted.load(Ordering::SeqCst) && !signalled {
            signalled = true;
            stop_launching = true;
            rep.event(Event::Stopping);
            for r in running.values() {
                super::proc::terminate(r.pid);
            }
        }
        // launch what is ready
        if !stop_launching {
            let ready: Vec<usize> = pending
                .iter()
                .copied()
                .filter(|&i| {
                    plan.stages[i]
                        .inst
                        .upstream
                        .iter()
                        .all(|(_, u)| records[*u].is_some())
                })
                .collect();
            for i in ready {
                let s = &plan.stages[i];
                let Some(grant) = pool.try_take(&s.resources, running.len()) else {
                    break;
                };
                pending.remove(&i);
                let job = make_job(plan, store, i, &records, &grant, opts)?;
                match spawn(&exe, &job, i, tx.clone()) {
                    Ok(pid) => {
                        let resume_step =
                            super::checkpoint::latest(&job.ckpt_dir())?.map(|c| c.step);
                        rep.event(Event::Started {
                            id: s.inst.id.clone(),
                            key: s.key.clone(),
                            attempt: 1,
                            resume_step,
                            log: job.log_file(),
                        });
                        running.insert(
                            i,
                            Running {
                                grant,
                                job,
                                pid,
                                attempt: 1,
                                started: chrono::Utc::now(),
                            },
                        );
                    }
                    Err(e) => {
                        pool.give_back(grant);
                        return Err(e);
                    }
                }
            }
        }
        // skip stages whose upstream failed
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
        if running.is_empty() && (pending.is_empty() || stop_launching) {
            break;
        }
        if running.is_empty() {
            // nothing running, nothing launchable: would deadlock (should not happen)
            return Err(Error::Usage("internal: no stage can start".into()));
        }
        // wait for a finished child, polling progress meanwhile
        match rx.recv_timeout(Duration::from_millis(250)) {
            Ok((i, _status)) => {
                let r = running.remove(&i).expect("was running");
                let s = &plan.stages[i];
                match import::verdict(&r.job) {
                    Verdict::Succeeded {
                        output,
                        secs,
                        device,
                    } => {
                        let metrics = output.metrics.clone();
                        let who = StageIdentity::of(plan, i);
                        let rec = import::commit_success(
                            store, &who, &r.job, output, secs, &device, r.started,
                        )?;
                        rep.event(Event::Finished {
                            id: s.inst.id.clone(),
                            secs,
                            metrics,
                        });
                        records[i] = Some(rec);
                        outcome[i] = Some(Outcome::Ran { secs });
                        pool.give_back(r.grant);
                    }
                    Verdict::Interrupted | Verdict::Missing if signalled => {
                        import::keep_checkpoint(store, &r.job)?;
                        outcome[i] = Some(Outcome::Interrupted);
                        pool.give_back(r.grant);
                    }
                    other => {
                        let error = match other {
                            Verdict::Failed(e) => e,
                            Verdict::Interrupted => "interrupted".into(),
                            _ => format!(
                                "worker died without a verdict (see {})",
                                r.job.log_file().display()
                            ),
                        };
                        if r.attempt <= s.retries && !signalled {
                            rep.event(Event::Failed {
                                id: s.inst.id.clone(),
                                error,
                                retrying: true,
                                log: r.job.log_file(),
                            });
                            let _ = fs_err::remove_file(r.job.exit_code_file());
                            let pid = spawn(&exe, &r.job, i, tx.clone())?;
                            rep.event(Event::Started {
                                id: s.inst.id.clone(),
                                key: s.key.clone(),
                                attempt: r.attempt + 1,
                                resume_step: super::checkpoint::latest(&r.job.ckpt_dir())?
                                    .map(|c| c.step),
                                log: r.job.log_file(),
                            });
                            running.insert(
                                i,
                                Running {
                                    pid,
                                    attempt: r.attempt + 1,
                                    ..r
                                },
                            );
                            continue;
                        }
                        rep.event(Event::Failed {
                            id: s.inst.id.clone(),
                            error: error.clone(),
                            retrying: false,
                            log: r.job.log_file(),
                        });
                        import::commit_failure(
                            store,
                            &StageIdentity::of(plan, i),
                            &r.job,
                            &error,
                            r.started,
                        )?;
                        outcome[i] = Some(Outcome::Failed(error));
                        pool.give_back(r.grant);
                        if !opts.keep_going {
                            stop_launching = true;
                        }
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                for (i, r) in &running {
                    if let Some(p) = super::progress::read(&r.job.progress_file()) {
                        rep.event(Event::Progress {
                            id: plan.stages[*i].inst.id.clone(),
                            step: p.step,
                            total: p.total,
                            msg: p.msg,
                        });
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    store.flush()?;
    let sel = select::only(plan, &opts.only)?;
    let outcomes: Vec<(String, Outcome)> = sel
        .iter()
        .map(|&i| {
            (
                plan.stages[i].inst.id.clone(),
                outcome[i].clone().unwrap_or(Outcome::NotStarted),
            )
        })
        .collect();
    let selected: Vec<usize> = sel.iter().copied().collect();
    import::log_invocation(store, plan, &selected, |i| {
        outcome[i] == Some(Outcome::Cached)
    })?;
    Ok(RunSummary {
        outcomes,
        interrupted: signalled,
    })
}

fn make_job(
    plan: &Plan,
    store: &Store,
    i: usize,
    records: &[Option<Record>],
    grant: &Grant,
    opts: &RunOptions,
) -> Result<Job> {
    let mut upstream = BTreeMap::new();
    for (name, u) in &plan.stages[i].inst.upstream {
        let rec = records[*u].as_ref().expect("upstream done");
        upstream.insert(name.clone(), upstream_ref(plan, store, *u, rec));
    }
    let device = device_for(&opts.device, !grant.gpus.is_empty());
    prepare_job(
        plan,
        store,
        i,
        upstream,
        device,
        grant.threads,
        grant.gpus.clone(),
    )
}

/// How a job sees a finished upstream stage `u` (its record and artifact folder).
pub(crate) fn upstream_ref(plan: &Plan, store: &Store, u: usize, rec: &Record) -> UpstreamRef {
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
pub(crate) fn device_for(setting: &str, has_gpu: bool) -> String {
    match (setting, has_gpu) {
        // CUDA_VISIBLE_DEVICES is set to the granted GPUs, so the first one is cuda:0
        ("auto", true) | ("cuda", true) => "cuda:0".to_string(),
        ("auto", false) => "cpu".into(),
        (d, _) => d.to_string(),
    }
}

/// Write the job file of stage `i` into fresh work and output folders (stale verdict files of
/// an earlier attempt removed; checkpoints kept).
pub(crate) fn prepare_job(
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

fn spawn(
    exe: &std::path::Path,
    job: &Job,
    i: usize,
    tx: mpsc::Sender<(usize, std::io::Result<std::process::ExitStatus>)>,
) -> Result<u32> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(job.log_file())?;
    let mut cmd = Command::new(exe);
    cmd.arg("exec-stage")
        .arg(Job::file(&job.work_dir))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .env("RAYON_NUM_THREADS", job.threads.to_string());
    if !job.gpus.is_empty() {
        let v: Vec<String> = job.gpus.iter().map(u32::to_string).collect();
        cmd.env("CUDA_VISIBLE_DEVICES", v.join(","));
    }
    super::proc::die_with_parent(&mut cmd);
    let (ptx, prx) = mpsc::channel();
    // The waiting thread is the child's parent thread: it lives until the child exits, so
    // PR_SET_PDEATHSIG fires only when the driver itself dies.
    std::thread::spawn(move || match cmd.spawn() {
        Ok(mut child) => {
            let _ = ptx.send(Ok(child.id()));
            let st = child.wait();
            let _ = tx.send((i, st));
        }
        Err(e) => {
            let _ = ptx.send(Err(e));
        }
    });
    let pid = prx
        .recv()
        .map_err(|_| Error::Usage("internal: spawn thread died".into()))??;
    Ok(pid)
}

//! The local executor: runs a plan's stages in topological order, independent stages in
//! parallel within `--jobs` and the resource pool, each as a `cjepa exec-stage` child process.
//! Cache hits are skipped; failures are retried, then their dependents are reported skipped by
//! name; Ctrl-C / SIGTERM are forwarded so stages checkpoint, and an unfinished stage resumes
//! from its checkpoint on the next run.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use super::core::{
    self, decide, device_for, prepare_job, upstream_ref, Decision, Event, Outcome, Reporter,
    RunOptions, RunSummary,
};
use super::import::{self, StageIdentity, Verdict};
use super::pool::{Grant, Pool};
use crate::error::{Error, Result};
use crate::kind::job::Job;
use crate::plan::Plan;
use crate::store::{Record, Store};

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
    let exe = match &opts.worker_exe {
        Some(p) => p.clone(),
        None => std::env::current_exe()?,
    };
    let mut run = Scheduler::new(plan, store, opts, rep, exe);
    run.take_cached(&decisions)?;
    loop {
        run.forward_interrupt();
        if !run.stop_launching {
            run.launch_ready()?;
        }
        core::skip_below_failures(plan, &mut run.pending, &mut run.outcome, run.rep);
        if run.running.is_empty() && (run.pending.is_empty() || run.stop_launching) {
            break;
        }
        if run.running.is_empty() {
            // nothing running, nothing launchable: would deadlock (should not happen)
            return Err(Error::Usage("internal: no stage can start".into()));
        }
        // wait for a finished child, polling progress meanwhile
        match run.rx.recv_timeout(Duration::from_millis(250)) {
            Ok((i, _status)) => run.on_exit(i)?,
            Err(mpsc::RecvTimeoutError::Timeout) => run.report_progress(),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    core::finish(plan, store, opts, &run.outcome, run.signalled)
}

/// A child's exit: (stage index, wait status).
type Exit = (usize, std::io::Result<std::process::ExitStatus>);

/// The state of one local run: what each stage came to, what waits and what runs.
struct Scheduler<'a> {
    plan: &'a Plan,
    store: &'a Store,
    opts: &'a RunOptions,
    rep: &'a mut dyn Reporter,
    exe: std::path::PathBuf,
    outcome: Vec<Option<Outcome>>,
    /// The record of each stage done (cached or run): its dependents may start.
    records: Vec<Option<Record>>,
    pending: BTreeSet<usize>,
    running: BTreeMap<usize, Running>,
    pool: Pool,
    tx: mpsc::Sender<Exit>,
    rx: mpsc::Receiver<Exit>,
    stop_launching: bool,
    signalled: bool,
}

impl<'a> Scheduler<'a> {
    fn new(
        plan: &'a Plan,
        store: &'a Store,
        opts: &'a RunOptions,
        rep: &'a mut dyn Reporter,
        exe: std::path::PathBuf,
    ) -> Self {
        let n = plan.stages.len();
        let (tx, rx) = mpsc::channel::<Exit>();
        Scheduler {
            plan,
            store,
            opts,
            rep,
            exe,
            outcome: vec![None; n],
            records: vec![None; n],
            pending: BTreeSet::new(),
            running: BTreeMap::new(),
            pool: Pool::new(opts.threads, opts.gpus.clone(), opts.jobs),
            tx,
            rx,
            stop_launching: false,
            signalled: false,
        }
    }

    /// Cached stages are done at once (with warnings for unusable records); the stages to run
    /// become pending.
    fn take_cached(&mut self, decisions: &[Decision]) -> Result<()> {
        for (i, d) in decisions.iter().enumerate() {
            match d {
                Decision::Cached => {
                    if let Some(r) = core::take_cached(self.plan, self.store, i, self.rep)? {
                        self.records[i] = Some(r);
                        self.outcome[i] = Some(Outcome::Cached);
                    }
                }
                Decision::Run(reasons) => {
                    core::warn_damaged(&self.plan.stages[i].inst.id, reasons, self.rep);
                    self.pending.insert(i);
                }
                Decision::NotSelected => {}
            }
        }
        Ok(())
    }

    /// On Ctrl-C / SIGTERM: forward it to the children once and stop launching.
    fn forward_interrupt(&mut self) {
        if self.opts.interrupted.load(Ordering::SeqCst) && !self.signalled {
            self.signalled = true;
            self.stop_launching = true;
            self.rep.event(Event::Stopping);
            for r in self.running.values() {
                crate::util::proc::terminate(r.pid);
            }
        }
    }

    /// Start the pending stages whose upstream stages are done, while the pool has room.
    fn launch_ready(&mut self) -> Result<()> {
        let ready = core::ready(self.plan, &self.pending, &self.records);
        let plan = self.plan;
        for i in ready {
            let s = &plan.stages[i];
            let Some(grant) = self.pool.try_take(&s.resources, self.running.len()) else {
                break;
            };
            self.pending.remove(&i);
            let job = make_job(self.plan, self.store, i, &self.records, &grant, self.opts)?;
            match spawn(&self.exe, &job, i, self.tx.clone()) {
                Ok(pid) => {
                    self.started(i, &job, 1)?;
                    let started = chrono::Utc::now();
                    let attempt = 1;
                    let r = Running {
                        grant,
                        job,
                        pid,
                        attempt,
                        started,
                    };
                    self.running.insert(i, r);
                }
                Err(e) => {
                    self.pool.give_back(grant);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Report stage `i`'s attempt started (resuming from its newest checkpoint, if any).
    fn started(&mut self, i: usize, job: &Job, attempt: u32) -> Result<()> {
        let plan = self.plan;
        let s = &plan.stages[i];
        let resume_step = crate::kind::checkpoint::latest(&job.ckpt_dir())?.map(|c| c.step);
        self.rep.event(Event::Started {
            id: s.inst.id.clone(),
            key: s.key.clone(),
            attempt,
            resume_step,
            log: job.log_file(),
        });
        Ok(())
    }

    /// Stage `i`'s process exited: store its result, keep its checkpoint, retry it or record
    /// its failure.
    fn on_exit(&mut self, i: usize) -> Result<()> {
        let r = self.running.remove(&i).expect("was running");
        let plan = self.plan;
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
                    self.store, &who, &r.job, output, secs, &device, r.started,
                )?;
                self.rep.event(Event::Finished {
                    id: s.inst.id.clone(),
                    secs,
                    metrics,
                });
                self.records[i] = Some(rec);
                self.outcome[i] = Some(Outcome::Ran { secs });
                self.pool.give_back(r.grant);
            }
            Verdict::Interrupted | Verdict::Missing if self.signalled => {
                import::keep_checkpoint(self.store, &r.job)?;
                self.outcome[i] = Some(Outcome::Interrupted);
                self.pool.give_back(r.grant);
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
                if r.attempt <= s.retries && !self.signalled {
                    return self.retry(i, r, error);
                }
                self.rep.event(Event::Failed {
                    id: s.inst.id.clone(),
                    error: error.clone(),
                    retrying: false,
                    log: r.job.log_file(),
                });
                let who = StageIdentity::of(self.plan, i);
                import::commit_failure(self.store, &who, &r.job, &error, r.started)?;
                self.outcome[i] = Some(Outcome::Failed(error));
                self.pool.give_back(r.grant);
                if !self.opts.keep_going {
                    self.stop_launching = true;
                }
            }
        }
        Ok(())
    }

    /// Start stage `i` again after a failed attempt (it resumes from its checkpoint).
    fn retry(&mut self, i: usize, r: Running, error: String) -> Result<()> {
        self.rep.event(Event::Failed {
            id: self.plan.stages[i].inst.id.clone(),
            error,
            retrying: true,
            log: r.job.log_file(),
        });
        let _ = fs_err::remove_file(r.job.exit_code_file());
        let pid = spawn(&self.exe, &r.job, i, self.tx.clone())?;
        self.started(i, &r.job, r.attempt + 1)?;
        let again = Running {
            pid,
            attempt: r.attempt + 1,
            ..r
        };
        self.running.insert(i, again);
        Ok(())
    }

    /// The running stages' progress files, as events.
    fn report_progress(&mut self) {
        for (i, r) in &self.running {
            if let Some(p) = crate::kind::progress::read(&r.job.progress_file()) {
                self.rep.event(Event::Progress {
                    id: self.plan.stages[*i].inst.id.clone(),
                    step: p.step,
                    total: p.total,
                    msg: p.msg,
                });
            }
        }
    }
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
    crate::util::proc::die_with_parent(&mut cmd);
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

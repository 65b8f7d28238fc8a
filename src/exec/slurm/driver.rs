//! The driver over a plan: import what earlier submissions left, take cached stages, then
//! either watch (attached: submit stages as their parents finish, import results as they come,
//! scancel on Ctrl-C, retry failures) or submit everything at once (see `submit.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::track::{Settled, Tracker};
use super::{available, script, submit, SlurmOptions};
use crate::error::{Error, Result};
use crate::exec::core::{self, Decision, Event, Outcome, Reporter, RunOptions, RunSummary};
use crate::plan::Plan;
use crate::store::{Record, Store};

/// The driver's state over a plan.
pub(super) struct Driver<'a, 'b> {
    pub(super) plan: &'a Plan,
    pub(super) store: &'a Store,
    pub(super) opts: &'a RunOptions,
    pub(super) sopts: &'a SlurmOptions,
    pub(super) exe: PathBuf,
    pub(super) rep: &'b mut dyn Reporter,
    pub(super) tr: Tracker<'a>,
    pub(super) outcome: Vec<Option<Outcome>>,
    pub(super) records: Vec<Option<Record>>,
    pub(super) stop_launching: bool,
    /// A stage ended interrupted (Ctrl-C here, or `cjepa cancel` / scancel elsewhere).
    pub(super) interrupted: bool,
}

impl<'a, 'b> Driver<'a, 'b> {
    pub(super) fn new(
        plan: &'a Plan,
        store: &'a Store,
        opts: &'a RunOptions,
        sopts: &'a SlurmOptions,
        rep: &'b mut dyn Reporter,
    ) -> Result<Self> {
        if !available(&sopts.commands) {
            return Err(Error::Usage(format!(
                "the Slurm executor needs Slurm's commands here, and `{} --version` does not run; \
                 run on a login node, or use `--executor local`",
                sopts.commands.sbatch
            )));
        }
        // fail early on bad site options, before anything is submitted
        script::resource_flags(&Default::default(), &sopts.site)?;
        let exe = match &opts.worker_exe {
            Some(p) => p.clone(),
            None => std::env::current_exe()?,
        };
        let tr = Tracker::open(store, sopts, &plan.pipeline.name, Some(plan), rep)?;
        let n = plan.stages.len();
        Ok(Driver {
            plan,
            store,
            opts,
            sopts,
            exe,
            rep,
            tr,
            outcome: vec![None; n],
            records: vec![None; n],
            stop_launching: false,
            interrupted: false,
        })
    }

    /// Import what earlier submissions left, decide, take cached stages; returns the stages to
    /// run that are not already in Slurm.
    pub(super) fn start(&mut self) -> Result<BTreeSet<usize>> {
        self.tr.refresh(true);
        self.look(false, false)?;
        // earlier submissions that failed or stopped are this run's to redo, not its failures
        for o in &mut self.outcome {
            if !matches!(o, Some(Outcome::Ran { .. })) {
                *o = None;
            }
        }
        self.stop_launching = false;
        self.interrupted = false;
        let decisions = core::decide(self.plan, self.store, self.opts)?;
        let mut pending = BTreeSet::new();
        for (i, d) in decisions.iter().enumerate() {
            let s = &self.plan.stages[i];
            match d {
                Decision::Cached => {
                    if self.outcome[i].is_some() {
                        continue; // imported just now
                    }
                    if let Some(r) = core::take_cached(self.plan, self.store, i, self.rep)? {
                        self.records[i] = Some(r);
                        self.outcome[i] = Some(Outcome::Cached);
                    }
                }
                Decision::Run(reasons) => {
                    if let Some(t) = self.tr.active.get(&s.key) {
                        self.rep.event(Event::Submitted {
                            id: s.inst.id.clone(),
                            job: t.sub.job_id.clone(),
                            earlier: true,
                            log: t.sub.log(),
                        });
                        continue;
                    }
                    core::warn_damaged(&s.inst.id, reasons, self.rep);
                    pending.insert(i);
                }
                Decision::NotSelected => {}
            }
        }
        Ok(pending)
    }

    /// One look at every watched stage; settles what it can. With `retries`, failures of stages
    /// with retries left are resubmitted. `stopping`: after our own scancel.
    pub(super) fn look(&mut self, retries: bool, stopping: bool) -> Result<()> {
        for key in self.tr.order() {
            if !self.tr.active.contains_key(&key) {
                continue;
            }
            let step = self.tr.examine(&key, stopping);
            let (idx, id, log, attempt) = {
                let t = &self.tr.active[&key];
                (t.idx, t.sub.stage.id.clone(), t.sub.log(), t.sub.attempt)
            };
            let can_retry = retries
                && !self.stop_launching
                && idx.is_some_and(|i| attempt <= self.plan.stages[i].retries);
            let Some(settled) = self.tr.settle(&key, step, can_retry)? else {
                continue;
            };
            match settled {
                Settled::Started => {
                    let t = &self.tr.active[&key];
                    self.rep.event(Event::Started {
                        id,
                        key: key.clone(),
                        attempt,
                        resume_step: t.sub.resume_step,
                        log,
                    });
                }
                Settled::Imported(rec, secs) => {
                    self.rep.event(Event::Finished {
                        id,
                        secs,
                        metrics: rec.metrics.clone(),
                    });
                    if let Some(i) = idx {
                        self.records[i] = Some(*rec);
                        self.outcome[i] = Some(Outcome::Ran { secs });
                    }
                }
                Settled::Failed(error) if can_retry => {
                    self.rep.event(Event::Failed {
                        id,
                        error,
                        retrying: true,
                        log,
                    });
                    self.resubmit(&key)?;
                }
                Settled::Failed(error) => {
                    self.rep.event(Event::Failed {
                        id,
                        error: error.clone(),
                        retrying: false,
                        log,
                    });
                    if let Some(i) = idx {
                        self.outcome[i] = Some(Outcome::Failed(error));
                    }
                    if !self.opts.keep_going {
                        self.stop_launching = true;
                    }
                }
                Settled::Interrupted => {
                    if let Some(i) = idx {
                        self.outcome[i] = Some(Outcome::Interrupted);
                    }
                    self.interrupted = true;
                    self.stop_launching = true;
                }
                Settled::Skipped(because) => {
                    self.rep.event(Event::Skipped {
                        id,
                        because: because.clone(),
                    });
                    if let Some(i) = idx {
                        self.outcome[i] = Some(Outcome::Skipped { because });
                    }
                }
                Settled::Deferred => {}
            }
        }
        Ok(())
    }

    /// The attached loop: submit ready stages, watch, import, until nothing is left.
    pub(super) fn attached(&mut self, pending: &mut BTreeSet<usize>) -> Result<()> {
        let mut signalled = false;
        let mut stop_deadline: Option<Instant> = None;
        loop {
            if self.opts.interrupted.load(Ordering::SeqCst) && !signalled {
                signalled = true;
                self.stop_launching = true;
                self.interrupted = true;
                self.rep.event(Event::Stopping);
                let ids: Vec<String> = self
                    .tr
                    .active
                    .values()
                    .map(|t| t.sub.job_id.clone())
                    .collect();
                if let Err(e) = submit::scancel(&self.sopts.commands, &ids, None) {
                    self.rep.event(Event::Warning(e));
                }
                stop_deadline = Some(Instant::now() + self.sopts.stop_wait);
                self.tr.backoff.now();
            }
            if !self.stop_launching {
                let ready = core::ready(self.plan, pending, &self.records);
                for group in submit::group(self.plan, &ready, |_| Vec::new()) {
                    for i in &group {
                        pending.remove(i);
                    }
                    self.submit(&group, &BTreeMap::new())?;
                }
            }
            self.skip_dependents(pending);
            if self.tr.active.is_empty() && (pending.is_empty() || self.stop_launching) {
                break;
            }
            if self.tr.active.is_empty() {
                return Err(Error::Usage("internal: no stage can start".into()));
            }
            if stop_deadline.is_some_and(|d| Instant::now() >= d) {
                let left: Vec<String> = self
                    .tr
                    .active
                    .values()
                    .map(|t| format!("{} (Slurm job {})", t.sub.stage.id, t.sub.job_id))
                    .collect();
                self.rep.event(Event::Warning(format!(
                    "stopped waiting for {}; `cjepa status` imports them once Slurm has ended them",
                    left.join(", ")
                )));
                for t in self.tr.active.values() {
                    if let Some(i) = t.idx {
                        self.outcome[i] = Some(Outcome::Interrupted);
                    }
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
            for t in self.tr.active.values() {
                if let (Some(p), true) = (
                    crate::kind::progress::read(&t.job.progress_file()),
                    t.announced,
                ) {
                    self.rep.event(Event::Progress {
                        id: t.sub.stage.id.clone(),
                        step: p.step,
                        total: p.total,
                        msg: p.msg,
                    });
                }
            }
            self.tr.refresh(false);
            self.look(!signalled, signalled)?;
        }
        Ok(())
    }

    /// Stages whose upstream failed or was skipped are skipped (reported by name).
    pub(super) fn skip_dependents(&mut self, pending: &mut BTreeSet<usize>) {
        core::skip_below_failures(self.plan, pending, &mut self.outcome, self.rep);
    }

    /// Flush, log the invocation, and say what happened to every selected stage.
    pub(super) fn finish(self) -> Result<RunSummary> {
        core::finish(
            self.plan,
            self.store,
            self.opts,
            &self.outcome,
            self.interrupted,
        )
    }
}

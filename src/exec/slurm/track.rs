//! Watching submitted stages: their verdict files and Slurm's word on their jobs, settled into
//! the store (imported, failed, skipped, interrupted). Shared by the attached driver, the
//! detached submission and `cjepa status`; also `cjepa cancel`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use super::jobs::{self, Jobs, MirrorEntry, Submitted};
use super::poll::{self, Backoff, Commands, JobState};
use super::{submit, SlurmOptions};
use crate::error::{Error, Result};
use crate::exec::core::{Event, Reporter};
use crate::exec::import::{self, Verdict};
use crate::kind::job::Job;
use crate::kind::StageOutput;
use crate::plan::Plan;
use crate::store::{Lookup, Record, Store};

/// A submitted stage being watched.
pub(super) struct Tracked {
    pub(super) sub: Submitted,
    pub(super) job: Job,
    /// Index in the current plan (None: submitted for a config this plan no longer has).
    pub(super) idx: Option<usize>,
    pub(super) announced: bool,
    pub(super) ended_seen: Option<Instant>,
}

impl Tracked {
    /// A submitted job not yet seen running or ended.
    fn new(sub: Submitted, job: Job, idx: Option<usize>) -> Self {
        Tracked {
            sub,
            job,
            idx,
            announced: false,
            ended_seen: None,
        }
    }
}

/// What one look at a tracked stage found.
pub(super) enum Step {
    /// Nothing new.
    Wait,
    /// Running (first time seen).
    Running,
    /// Verdict 0.
    Succeeded {
        output: StageOutput,
        secs: f64,
        device: String,
    },
    /// Verdict != 0, 130.
    Failed(String),
    /// Verdict 130 and Slurm says the job ended.
    Interrupted,
    /// Slurm says it ended and no verdict came; `cancelled`: by scancel (or a parent that
    /// can never succeed), not by a fault of the stage.
    NoVerdict { desc: String, cancelled: bool },
}

/// What settling a step did.
pub(super) enum Settled {
    Started,
    Imported(Box<Record>, f64),
    Failed(String),
    Interrupted,
    Skipped(String),
    Deferred,
}

/// The submitted stages of one pipeline in a store, and how to look at them.
pub(super) struct Tracker<'a> {
    pub(super) store: &'a Store,
    pub(super) jobs: Jobs,
    pub(super) opts: &'a SlurmOptions,
    pub(super) active: BTreeMap<String, Tracked>,
    pub(super) states: BTreeMap<String, JobState>,
    pub(super) backoff: Backoff,
    /// Keys that failed or were skipped in this process -> the failed stage's id.
    pub(super) failed: BTreeMap<String, String>,
}

impl<'a> Tracker<'a> {
    /// Load the entries of `pipeline` (other pipelines' jobs in the same store are left alone).
    pub(super) fn open(
        store: &'a Store,
        opts: &'a SlurmOptions,
        pipeline: &str,
        plan: Option<&Plan>,
        rep: &mut dyn Reporter,
    ) -> Result<Self> {
        let jobs = Jobs::open(store)?;
        let mut active = BTreeMap::new();
        for sub in jobs.all()? {
            if sub.stage.pipeline != pipeline {
                continue;
            }
            match sub.job() {
                Ok(job) => {
                    let idx =
                        plan.and_then(|p| p.stages.iter().position(|s| s.key == sub.stage.key));
                    active.insert(sub.stage.key.clone(), Tracked::new(sub, job, idx));
                }
                Err(e) => {
                    rep.event(Event::Warning(format!(
                        "{}: Slurm job {} has no readable job file ({e}); forgetting it",
                        sub.stage.id, sub.job_id
                    )));
                    jobs.remove(&sub.stage.key)?;
                }
            }
        }
        Ok(Tracker {
            store,
            jobs,
            opts,
            active,
            states: BTreeMap::new(),
            backoff: Backoff::new(opts.poll_min, opts.poll_max),
            failed: BTreeMap::new(),
        })
    }

    /// Keys in submission order.
    pub(super) fn order(&self) -> Vec<String> {
        let mut v: Vec<&Tracked> = self.active.values().collect();
        v.sort_by(|a, b| {
            a.sub
                .submitted
                .cmp(&b.sub.submitted)
                .then(a.sub.job_id.cmp(&b.sub.job_id))
        });
        v.into_iter().map(|t| t.sub.stage.key.clone()).collect()
    }

    pub(super) fn add(&mut self, subs: Vec<(Submitted, Job, Option<usize>)>) -> Result<()> {
        let entries: Vec<Submitted> = subs.iter().map(|(s, _, _)| s.clone()).collect();
        self.jobs.put_all(&entries)?;
        for (sub, job, idx) in subs {
            self.active
                .insert(sub.stage.key.clone(), Tracked::new(sub, job, idx));
        }
        self.backoff.now();
        Ok(())
    }

    /// Ask Slurm (when due or `force`) about the stages whose verdict does not settle them.
    pub(super) fn refresh(&mut self, force: bool) {
        if !(force || self.backoff.due()) {
            return;
        }
        let ids: Vec<String> = self
            .active
            .values()
            .filter(|t| {
                matches!(
                    import::verdict(&t.job),
                    Verdict::Missing | Verdict::Interrupted
                ) || !t.announced
            })
            .map(|t| t.sub.job_id.clone())
            .collect();
        if ids.is_empty() {
            self.backoff.polled(false);
            return;
        }
        let new = poll::query(&self.opts.commands, &ids);
        let changed = new.iter().any(|(id, s)| self.states.get(id) != Some(s));
        self.states.extend(new);
        self.backoff.polled(changed);
    }

    /// Look at one stage. `no_grace`: a job Slurm says ended without a verdict counts at once
    /// (after our own scancel), instead of after `grace`.
    pub(super) fn examine(&mut self, key: &str, no_grace: bool) -> Step {
        let grace = self.opts.grace;
        let t = self.active.get_mut(key).expect("tracked");
        let state = self.states.get(&t.sub.job_id);
        match import::verdict(&t.job) {
            Verdict::Succeeded {
                output,
                secs,
                device,
            } => Step::Succeeded {
                output,
                secs,
                device,
            },
            Verdict::Failed(e) => Step::Failed(e),
            Verdict::Interrupted => match state {
                Some(JobState::Ended { .. } | JobState::Gone) => Step::Interrupted,
                _ => Step::Wait,
            },
            Verdict::Missing => match state {
                Some(s) if s.is_running() && !t.announced => Step::Running,
                Some(
                    st @ JobState::Ended {
                        state: name,
                        reason,
                        end,
                    },
                ) => {
                    let seen = *t.ended_seen.get_or_insert_with(Instant::now);
                    let never_ran = reason.contains("Dependency");
                    let by_slurm_clock = end.is_some_and(|e| {
                        (chrono::Local::now().naive_local() - e)
                            .to_std()
                            .is_ok_and(|d| d >= grace)
                    });
                    if no_grace || never_ran || by_slurm_clock || seen.elapsed() >= grace {
                        Step::NoVerdict {
                            desc: st.describe(),
                            cancelled: name == "CANCELLED",
                        }
                    } else {
                        Step::Wait
                    }
                }
                Some(JobState::Gone) => Step::NoVerdict {
                    desc: JobState::Gone.describe(),
                    cancelled: false,
                },
                _ => Step::Wait,
            },
        }
    }

    /// Whether another watched stage still reads `key`'s results from its work folder.
    pub(super) fn needed_by_other(&self, key: &str) -> Option<String> {
        self.active
            .values()
            .find(|t| t.sub.stage.key != key && t.sub.waits_for.iter().any(|k| k == key))
            .map(|t| t.sub.stage.id.clone())
    }

    /// The failed or skipped upstream that explains a job ending without a verdict.
    pub(super) fn failed_upstream(&self, t: &Tracked) -> Result<Option<String>> {
        for k in &t.sub.waits_for {
            if let Some(id) = self.failed.get(k) {
                return Ok(Some(id.clone()));
            }
            if let Lookup::Failed(r) = self.store.lookup(k)? {
                return Ok(Some(r.stage_id));
            }
        }
        Ok(None)
    }

    /// Settle one step. `retry` decides whether a failure is resubmitted (then the caller
    /// resubmits and nothing is recorded here).
    pub(super) fn settle(&mut self, key: &str, step: Step, retry: bool) -> Result<Option<Settled>> {
        Ok(Some(match step {
            Step::Wait => return Ok(None),
            Step::Running => {
                let t = self.active.get_mut(key).expect("tracked");
                t.announced = true;
                if t.sub.started.is_none() {
                    t.sub.started = Some(chrono::Utc::now());
                    self.jobs.put_all(std::slice::from_ref(&t.sub))?;
                }
                Settled::Started
            }
            Step::Succeeded {
                output,
                secs,
                device,
            } => {
                if self.needed_by_other(key).is_some() {
                    return Ok(Some(Settled::Deferred));
                }
                let t = self.active.remove(key).expect("tracked");
                let started = t.sub.started.unwrap_or(t.sub.submitted);
                let rec = import::commit_success(
                    self.store,
                    &t.sub.stage,
                    &t.job,
                    output,
                    secs,
                    &device,
                    started,
                )?;
                self.jobs.remove(key)?;
                Settled::Imported(Box::new(rec), secs)
            }
            Step::Failed(e) => self.fail(key, e, retry)?,
            Step::NoVerdict { desc, cancelled } => {
                let t = &self.active[key];
                if let Some(up) = self.failed_upstream(t)? {
                    self.active.remove(key);
                    self.jobs.remove(key)?;
                    self.failed.insert(key.to_string(), up.clone());
                    Settled::Skipped(up)
                } else if cancelled {
                    // scancel is not the stage's fault: no failed record, it runs again
                    let t = self.active.remove(key).expect("tracked");
                    import::keep_checkpoint(self.store, &t.job)?;
                    self.jobs.remove(key)?;
                    Settled::Interrupted
                } else {
                    let mut msg = format!(
                        "Slurm job {} ended as {desc} without writing a verdict (see {}",
                        t.sub.job_id,
                        t.sub.log().display()
                    );
                    if let Some(l) = &t.sub.slurm_log {
                        msg.push_str(&format!(" and {}", l.display()));
                    }
                    msg.push(')');
                    self.fail(key, msg, retry)?
                }
            }
            Step::Interrupted => {
                let t = self.active.remove(key).expect("tracked");
                import::keep_checkpoint(self.store, &t.job)?;
                self.jobs.remove(key)?;
                Settled::Interrupted
            }
        }))
    }

    pub(super) fn fail(&mut self, key: &str, error: String, retry: bool) -> Result<Settled> {
        if retry {
            return Ok(Settled::Failed(error));
        }
        let t = self.active.remove(key).expect("tracked");
        let started = t.sub.started.unwrap_or(t.sub.submitted);
        import::commit_failure(self.store, &t.sub.stage, &t.job, &error, started)?;
        self.jobs.remove(key)?;
        self.failed.insert(key.to_string(), t.sub.stage.id.clone());
        Ok(Settled::Failed(error))
    }
}

/// What `cjepa status` learns from the submitted jobs of a pipeline.
#[derive(Debug, Clone, Default)]
pub struct Reconciled {
    /// Stage key -> (`queued`, `running` or `done`, what Slurm says about its job). `done`: it
    /// finished, and is imported once the children reading its results have ended.
    pub active: BTreeMap<String, (&'static str, String)>,
}

/// Import what detached (or abandoned) jobs of `plan`'s pipeline left: one look at their verdict
/// files and one squeue poll. Events say what was imported, failed or skipped.
pub fn reconcile(
    plan: &Plan,
    store: &Store,
    opts: &SlurmOptions,
    rep: &mut dyn Reporter,
) -> Result<Reconciled> {
    let mut tr = Tracker::open(store, opts, &plan.pipeline.name, Some(plan), rep)?;
    if tr.active.is_empty() {
        return Ok(Reconciled::default());
    }
    tr.refresh(true);
    // twice: a parent deferred for a child that settles in the first pass imports in the second
    for _ in 0..2 {
        for key in tr.order() {
            if !tr.active.contains_key(&key) {
                continue;
            }
            let step = tr.examine(&key, false);
            let id = tr.active[&key].sub.stage.id.clone();
            let job_id = tr.active[&key].sub.job_id.clone();
            let log = tr.active[&key].sub.log();
            match tr.settle(&key, step, false)? {
                Some(Settled::Imported(rec, secs)) => rep.event(Event::Finished {
                    id,
                    secs,
                    metrics: rec.metrics,
                }),
                Some(Settled::Failed(error)) => rep.event(Event::Failed {
                    id,
                    error,
                    retrying: false,
                    log,
                }),
                Some(Settled::Skipped(because)) => rep.event(Event::Skipped { id, because }),
                Some(Settled::Interrupted) => rep.event(Event::Warning(format!(
                    "{id}: Slurm job {job_id} stopped before finishing (cancelled or interrupted); \
                     the next run runs it again, from its checkpoint if it has one"
                ))),
                _ => {}
            }
        }
    }
    store.flush()?;
    let mut out = Reconciled::default();
    for (key, t) in &tr.active {
        let state = tr
            .states
            .get(&t.sub.job_id)
            .cloned()
            .unwrap_or(JobState::Unknown);
        let entry = match import::verdict(&t.job) {
            Verdict::Succeeded { .. } => (
                "done",
                format!(
                    "Slurm job {} finished; imported once {} ends",
                    t.sub.job_id,
                    tr.needed_by_other(key).unwrap_or_default()
                ),
            ),
            _ => (
                match &state {
                    JobState::Active { state, .. }
                        if state == "RUNNING" || state == "COMPLETING" =>
                    {
                        "running"
                    }
                    _ => "queued",
                },
                format!("Slurm job {}: {}", t.sub.job_id, state.describe()),
            ),
        };
        out.active.insert(key.clone(), entry);
    }
    Ok(out)
}

/// `cjepa cancel`: scancel the pipeline's submitted jobs that Slurm still runs or queues (the
/// stages checkpoint on SIGTERM). Works while a driver holds the store: it reads the plain copy
/// of the submitted-jobs record. Returns the cancelled entries.
pub fn cancel(store_root: &Path, pipeline: &str, cmds: &Commands) -> Result<Vec<MirrorEntry>> {
    let entries: Vec<MirrorEntry> = jobs::read_mirror(store_root)?
        .into_iter()
        .filter(|e| e.pipeline == pipeline)
        .collect();
    let ids: Vec<String> = entries.iter().map(|e| e.job_id.clone()).collect();
    let states = poll::query(cmds, &ids);
    let live: Vec<MirrorEntry> = entries
        .into_iter()
        .filter(|e| {
            matches!(
                states.get(&e.job_id),
                Some(JobState::Active { .. } | JobState::Unknown) | None
            )
        })
        .collect();
    let live_ids: Vec<String> = live.iter().map(|e| e.job_id.clone()).collect();
    submit::scancel(cmds, &live_ids, None).map_err(Error::Usage)?;
    Ok(live)
}

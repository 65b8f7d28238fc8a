//! Submitting: which stage instances share one sbatch call, the `sbatch` / `scancel` calls, and
//! the driver's submissions (as parents finish, retries, or everything at once for `--detach`).
//!
//! Mapping: the ready instances of one matrix stage become one job array when they share the
//! stage (hence the kind and the resources) and the same dependencies; instances of one stage
//! never depend on each other, so an array never waits on itself. Element `i` of an array is
//! Slurm job `<array id>_<i>`. Anything else is a job of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::driver::Driver;
use super::jobs::Submitted;
use super::poll::Commands;
use super::script::{self, ScriptSpec};
use super::{sanitize, DetachedOutcome, DetachedSummary};
use crate::error::{Error, Result};
use crate::exec::core::{self, Event, Outcome};
use crate::exec::import::{self, StageIdentity, Verdict};
use crate::kind::job::{Job, UpstreamRef};
use crate::plan::{select, Plan};

/// Group `ready` stage indices (in plan order) into submissions: same stage and the same
/// dependency list (`deps(i)`) share an array.
pub fn group(plan: &Plan, ready: &[usize], deps: impl Fn(usize) -> Vec<String>) -> Vec<Vec<usize>> {
    let mut groups: Vec<(String, Vec<String>, Vec<usize>)> = Vec::new();
    for &i in ready {
        let stage = &plan.stages[i].inst.stage;
        let d = deps(i);
        match groups.iter_mut().find(|(s, gd, _)| s == stage && *gd == d) {
            Some((_, _, v)) => v.push(i),
            None => groups.push((stage.clone(), d, vec![i])),
        }
    }
    groups.into_iter().map(|(_, _, v)| v).collect()
}

/// Slurm job ids of a submission of `n` instances: `id` for one, `id_0 .. id_{n-1}` for an array.
pub fn element_ids(id: &str, n: usize) -> Vec<String> {
    if n == 1 {
        vec![id.to_string()]
    } else {
        (0..n).map(|k| format!("{id}_{k}")).collect()
    }
}

/// Errors from sbatch that say "try again" rather than "this job is wrong".
fn transient(stderr: &str) -> bool {
    [
        "Socket timed out",
        "Unable to contact",
        "temporarily unavailable",
        "Slurm temporarily unable",
        "Connection refused",
    ]
    .iter()
    .any(|m| stderr.contains(m))
}

/// `sbatch --parsable SCRIPT`: the job id, or sbatch's own words. Transient controller errors
/// are retried a few times.
pub fn sbatch(cmds: &Commands, script: &Path) -> Result<String, String> {
    let mut wait = Duration::from_secs(1);
    let mut last = String::new();
    for _ in 0..4 {
        let o = Command::new(&cmds.sbatch)
            .arg("--parsable")
            .arg(script)
            .output()
            .map_err(|e| {
                format!(
                    "cannot run `{}`: {e} (is Slurm installed here?)",
                    cmds.sbatch
                )
            })?;
        let stdout = String::from_utf8_lossy(&o.stdout);
        let stderr = String::from_utf8_lossy(&o.stderr).trim().to_string();
        if o.status.success() {
            // `123` or `123;cluster`
            let id = stdout.trim().split(';').next().unwrap_or("").trim();
            if !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()) {
                return Ok(id.to_string());
            }
            return Err(format!(
                "sbatch printed no job id (stdout {stdout:?}, stderr {stderr:?})"
            ));
        }
        last = stderr;
        if !transient(&last) {
            break;
        }
        std::thread::sleep(wait);
        wait *= 2;
    }
    Err(format!("sbatch refused the job: {last}"))
}

/// `scancel [--signal=SIG] IDS`; scancel's complaints about jobs that already ended are ignored.
pub fn scancel(cmds: &Commands, ids: &[String], signal: Option<&str>) -> Result<(), String> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut c = Command::new(&cmds.scancel);
    if let Some(s) = signal {
        c.arg(format!("--signal={s}"));
    }
    let o = c
        .args(ids)
        .output()
        .map_err(|e| format!("cannot run `{}`: {e}", cmds.scancel))?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    let real: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !l.contains("already completing or completed") && !l.contains("Invalid job id"))
        .collect();
    if !o.status.success() && !real.is_empty() {
        return Err(format!("scancel failed: {}", real.join("; ")));
    }
    Ok(())
}

impl<'a, 'b> Driver<'a, 'b> {
    /// Write the job files of `group` (instances of one stage) and submit them as one job or
    /// array. `pending_up[i]`: upstream name -> (upstream index, Slurm job id to wait for, if
    /// it has no verdict yet) for upstream stages that are submitted but not imported.
    pub(super) fn submit(
        &mut self,
        group: &[usize],
        pending_up: &BTreeMap<usize, BTreeMap<String, (usize, Option<String>)>>,
    ) -> Result<Vec<(usize, Option<String>)>> {
        let plan = self.plan;
        let first = &plan.stages[group[0]];
        let res = &first.resources;
        let threads = res.cpus.max(1) as usize;
        let gpus: Vec<u32> = (0..res.gpus).collect();
        let device = core::device_for(&self.opts.device, res.gpus > 0);
        let mut jobs = Vec::with_capacity(group.len());
        let mut after_ok: Vec<String> = Vec::new();
        let mut waits: Vec<Vec<String>> = Vec::new();
        for &i in group {
            let mut upstream = BTreeMap::new();
            let mut sidecar: BTreeMap<String, PathBuf> = BTreeMap::new();
            let mut w = Vec::new();
            let none = BTreeMap::new();
            let pend = pending_up.get(&i).unwrap_or(&none);
            for (name, u) in &plan.stages[i].inst.upstream {
                let us = &plan.stages[*u];
                if let Some(rec) = &self.records[*u] {
                    upstream.insert(name.clone(), core::upstream_ref(plan, self.store, *u, rec));
                } else if let Some((_, dep)) = pend.get(name) {
                    upstream.insert(
                        name.clone(),
                        UpstreamRef {
                            id: us.inst.id.clone(),
                            kind: us.kind.name().into(),
                            key: us.key.clone(),
                            artifacts: self.store.tmp_dir(&us.key).join("out"),
                            config: us.config.clone(),
                            metrics: BTreeMap::new(),
                            info: serde_json::Value::Null,
                        },
                    );
                    sidecar.insert(name.clone(), self.store.work_dir(&us.key));
                    w.push(us.key.clone());
                    if let Some(d) = dep {
                        if !after_ok.contains(d) {
                            after_ok.push(d.clone());
                        }
                    }
                } else {
                    return Err(Error::Usage(format!(
                        "internal: {} submitted before its upstream {}",
                        plan.stages[i].inst.id, us.inst.id
                    )));
                }
            }
            let job = core::prepare_job(
                plan,
                self.store,
                i,
                upstream,
                device.clone(),
                threads,
                gpus.clone(),
            )?;
            if !sidecar.is_empty() {
                crate::util::atomic::write_json(&job.pending_upstream_file(), &sidecar)?;
            }
            jobs.push(job);
            waits.push(w);
        }
        let slurm_dir = self.store.root().join("slurm");
        let tag = format!(
            "{}-{}-{}",
            sanitize(&first.inst.stage),
            &first.key[..12],
            chrono::Utc::now().format("%Y%m%dT%H%M%S%3f")
        );
        let array = group.len() > 1;
        let slurm_log = array.then(|| slurm_dir.join("logs").join(format!("{tag}_%a.out")));
        if let Some(l) = &slurm_log {
            fs_err::create_dir_all(l.parent().expect("has parent"))?;
        }
        let spec = ScriptSpec {
            name: format!(
                "cjepa-{}-{}",
                sanitize(&plan.pipeline.name),
                sanitize(if array {
                    &first.inst.stage
                } else {
                    &first.inst.id
                })
            ),
            jobs: jobs.iter().map(|j| Job::file(&j.work_dir)).collect(),
            output: slurm_log.clone().unwrap_or_else(|| jobs[0].log_file()),
            resources: res.clone(),
            site: self.sopts.site.clone(),
            exe: self.exe.clone(),
            after_ok,
            ranks: slurm_ranks(first),
        };
        let text = script::render(&spec)?;
        let path = slurm_dir.join("scripts").join(format!("{tag}.sh"));
        crate::util::atomic::write(&path, text.as_bytes())?;
        let mut out = Vec::new();
        match sbatch(&self.sopts.commands, &path) {
            Ok(id) => {
                let ids = element_ids(&id, group.len());
                let mut subs = Vec::new();
                for (k, (&i, job)) in group.iter().zip(jobs).enumerate() {
                    let sub = Submitted {
                        job_id: ids[k].clone(),
                        stage: StageIdentity::of(plan, i),
                        job_file: Job::file(&job.work_dir),
                        slurm_log: slurm_log.as_ref().map(|l| {
                            PathBuf::from(l.to_string_lossy().replace("%a", &k.to_string()))
                        }),
                        waits_for: waits[k].clone(),
                        resume_step: crate::kind::checkpoint::latest(&job.ckpt_dir())?
                            .map(|c| c.step),
                        attempt: 1,
                        submitted: chrono::Utc::now(),
                        started: None,
                        detached: self.sopts.detach,
                    };
                    self.rep.event(Event::Submitted {
                        id: sub.stage.id.clone(),
                        job: sub.job_id.clone(),
                        earlier: false,
                        log: sub.log(),
                    });
                    out.push((i, Some(sub.job_id.clone())));
                    subs.push((sub, job, Some(i)));
                }
                self.tr.add(subs)?;
            }
            Err(msg) => {
                for (&i, job) in group.iter().zip(&jobs) {
                    let who = StageIdentity::of(plan, i);
                    import::commit_failure(self.store, &who, job, &msg, chrono::Utc::now())?;
                    self.rep.event(Event::Failed {
                        id: who.id.clone(),
                        error: msg.clone(),
                        retrying: false,
                        log: path.clone(),
                    });
                    self.outcome[i] = Some(Outcome::Failed(msg.clone()));
                    out.push((i, None));
                }
                if !self.opts.keep_going {
                    self.stop_launching = true;
                }
            }
        }
        Ok(out)
    }

    /// Resubmit a failed stage (a retry) as a job of its own; it resumes from its checkpoint.
    pub(super) fn resubmit(&mut self, key: &str) -> Result<()> {
        let t = self.tr.active.remove(key).expect("tracked");
        let i = t.idx.expect("retries need the plan");
        let plan = self.plan;
        let s = &plan.stages[i];
        let _ = fs_err::remove_file(t.job.exit_code_file());
        let _ = fs_err::remove_file(t.job.result_file());
        let slurm_dir = self.store.root().join("slurm");
        let tag = format!(
            "{}-{}-{}-retry{}",
            sanitize(&s.inst.stage),
            &s.key[..12],
            chrono::Utc::now().format("%Y%m%dT%H%M%S%3f"),
            t.sub.attempt + 1
        );
        let spec = ScriptSpec {
            name: format!(
                "cjepa-{}-{}",
                sanitize(&self.plan.pipeline.name),
                sanitize(&s.inst.id)
            ),
            jobs: vec![t.sub.job_file.clone()],
            output: t.job.log_file(),
            resources: s.resources.clone(),
            site: self.sopts.site.clone(),
            exe: self.exe.clone(),
            after_ok: vec![],
            ranks: slurm_ranks(s),
        };
        let path = slurm_dir.join("scripts").join(format!("{tag}.sh"));
        crate::util::atomic::write(&path, script::render(&spec)?.as_bytes())?;
        match sbatch(&self.sopts.commands, &path) {
            Ok(id) => {
                let sub = Submitted {
                    job_id: id,
                    slurm_log: None,
                    resume_step: crate::kind::checkpoint::latest(&t.job.ckpt_dir())?
                        .map(|c| c.step),
                    attempt: t.sub.attempt + 1,
                    submitted: chrono::Utc::now(),
                    started: None,
                    ..t.sub
                };
                self.rep.event(Event::Submitted {
                    id: sub.stage.id.clone(),
                    job: sub.job_id.clone(),
                    earlier: false,
                    log: sub.log(),
                });
                self.tr.add(vec![(sub, t.job, Some(i))])?;
            }
            Err(msg) => {
                self.tr.active.insert(key.to_string(), t);
                self.tr.fail(key, msg.clone(), false)?;
                self.rep.event(Event::Failed {
                    id: s.inst.id.clone(),
                    error: msg.clone(),
                    retrying: false,
                    log: path,
                });
                self.outcome[i] = Some(Outcome::Failed(msg));
                if !self.opts.keep_going {
                    self.stop_launching = true;
                }
            }
        }
        Ok(())
    }

    /// Submit everything at once with afterok dependencies; nothing is waited for.
    pub(super) fn detached(mut self, pending: BTreeSet<usize>) -> Result<DetachedSummary> {
        let plan = self.plan;
        // Slurm job of each stage that is submitted but not imported (None: its verdict is in)
        let mut in_slurm: BTreeMap<usize, Option<String>> = BTreeMap::new();
        for t in self.tr.active.values() {
            if let Some(i) = t.idx {
                let done = matches!(import::verdict(&t.job), Verdict::Succeeded { .. });
                in_slurm.insert(i, (!done).then(|| t.sub.job_id.clone()));
            }
        }
        let earlier: BTreeMap<usize, String> = self
            .tr
            .active
            .values()
            .filter_map(|t| t.idx.map(|i| (i, t.sub.job_id.clone())))
            .collect();
        let mut submitted: BTreeMap<usize, String> = BTreeMap::new();
        let order: Vec<usize> = pending.iter().copied().collect();
        let mut k = 0;
        while k < order.len() {
            // the pending instances of one stage are consecutive in plan order
            let stage = &plan.stages[order[k]].inst.stage;
            let mut run = Vec::new();
            while k < order.len() && &plan.stages[order[k]].inst.stage == stage {
                run.push(order[k]);
                k += 1;
            }
            let mut pend: BTreeMap<usize, BTreeMap<String, (usize, Option<String>)>> =
                BTreeMap::new();
            let mut ok = Vec::new();
            for &i in &run {
                let mut blocked = None;
                let mut m = BTreeMap::new();
                for (name, u) in &plan.stages[i].inst.upstream {
                    if self.records[*u].is_some() {
                        continue;
                    }
                    match (&self.outcome[*u], in_slurm.get(u)) {
                        (_, Some(dep)) => {
                            m.insert(name.clone(), (*u, dep.clone()));
                        }
                        (Some(Outcome::Failed(_)), _) => {
                            blocked = Some(plan.stages[*u].inst.id.clone())
                        }
                        (Some(Outcome::Skipped { because }), _) => blocked = Some(because.clone()),
                        _ => blocked = Some(plan.stages[*u].inst.id.clone()),
                    }
                }
                match blocked {
                    Some(because) => {
                        self.rep.event(Event::Skipped {
                            id: plan.stages[i].inst.id.clone(),
                            because: because.clone(),
                        });
                        self.outcome[i] = Some(Outcome::Skipped { because });
                    }
                    None => {
                        pend.insert(i, m);
                        ok.push(i);
                    }
                }
            }
            let deps = |i: usize| -> Vec<String> {
                let mut d: Vec<String> = pend[&i]
                    .values()
                    .filter_map(|(_, dep)| dep.clone())
                    .collect();
                d.sort();
                d
            };
            let groups = group(plan, &ok, deps);
            for g in groups {
                for (i, id) in self.submit(&g, &pend)? {
                    if let Some(id) = id {
                        in_slurm.insert(i, Some(id.clone()));
                        submitted.insert(i, id);
                    }
                }
            }
        }
        self.store.flush()?;
        let sel = select::only(plan, &self.opts.only)?;
        let selected: Vec<usize> = sel.iter().copied().collect();
        import::log_invocation(self.store, plan, &selected, |i| {
            self.outcome[i] == Some(Outcome::Cached)
        })?;
        let outcomes = selected
            .iter()
            .map(|&i| {
                let o = if let Some(id) = submitted.get(&i) {
                    DetachedOutcome::Submitted(id.clone())
                } else if let Some(id) = earlier.get(&i) {
                    DetachedOutcome::AlreadySubmitted(id.clone())
                } else {
                    match &self.outcome[i] {
                        Some(Outcome::Cached) => DetachedOutcome::Cached,
                        Some(Outcome::Ran { .. }) => DetachedOutcome::Imported,
                        Some(Outcome::Failed(e)) => DetachedOutcome::Failed(e.clone()),
                        Some(Outcome::Skipped { because }) => DetachedOutcome::Skipped {
                            because: because.clone(),
                        },
                        _ => DetachedOutcome::Failed("not submitted".into()),
                    }
                };
                (plan.stages[i].inst.id.clone(), o)
            })
            .collect();
        Ok(DetachedSummary { outcomes })
    }
}

/// Data-parallel ranks of a stage under Slurm: one per GPU asked for (or `resources.ranks`), for
/// kinds that train data-parallel; 1 otherwise.
fn slurm_ranks(s: &crate::plan::PlannedStage) -> usize {
    if s.kind.data_parallel() {
        s.resources.world(s.resources.gpus as usize)
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_array_per_stage_and_dependency_set() {
        let text = "stages:\n  a:\n    kind: command\n    cmd: 'true'\n    matrix: { vars.x: [1, 2, 3] }\n  \
                    b:\n    kind: command\n    cmd: 'true'\n";
        let p = crate::spec::load::parse_pipeline(
            Path::new("/tmp/p.yaml"),
            text.into(),
            &Default::default(),
        )
        .unwrap();
        let plan = crate::plan::build(&p, crate::stages::table).unwrap();
        let ids: Vec<&str> = plan.stages.iter().map(|s| s.inst.id.as_str()).collect();
        assert_eq!(ids, ["a[vars.x=1]", "a[vars.x=2]", "a[vars.x=3]", "b"]);
        let all: Vec<usize> = (0..4).collect();
        assert_eq!(group(&plan, &all, |_| vec![]), vec![vec![0, 1, 2], vec![3]]);
        // an instance waiting on something else than its siblings goes on its own
        let g = group(
            &plan,
            &all,
            |i| if i == 2 { vec!["9".into()] } else { vec![] },
        );
        assert_eq!(g, vec![vec![0, 1], vec![2], vec![3]]);
    }

    #[test]
    fn array_element_ids() {
        assert_eq!(element_ids("7", 1), vec!["7"]);
        assert_eq!(element_ids("7", 3), vec!["7_0", "7_1", "7_2"]);
    }

    #[test]
    fn transient_errors() {
        assert!(transient(
            "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation"
        ));
        assert!(!transient(
            "sbatch: error: invalid partition specified: gpu"
        ));
    }

    #[test]
    fn sbatch_missing_is_an_error_not_a_panic() {
        let cmds = Commands {
            sbatch: "/nonexistent/sbatch".into(),
            ..Default::default()
        };
        let e = sbatch(&cmds, Path::new("/tmp/x.sh")).unwrap_err();
        assert!(e.contains("is Slurm installed"), "{e}");
    }
}

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
    decide, device_for, prepare_job, upstream_ref, Decision, Event, Outcome, Reporter, RunOptions,
    RunSummary,
};
use super::import::{self, StageIdentity, Verdict};
use super::pool::{Grant, Pool};
use crate::error::{Error, Result};
use crate::kind::job::Job;
use crate::plan::{select, Plan};
use crate::store::{Lookup, Record, Store};

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
                crate::util::proc::terminate(r.pid);
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
                            crate::kind::checkpoint::latest(&job.ckpt_dir())?.map(|c| c.step);
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
                                resume_step: crate::kind::checkpoint::latest(&r.job.ckpt_dir())?
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
                    if let Some(p) = crate::kind::progress::read(&r.job.progress_file()) {
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

//! Data-parallel launch: a stage whose job asks for `ranks > 1` (and whose kind trains
//! data-parallel) runs as that many `cjepa exec-stage JOB --rank R` processes, started here (one
//! per GPU, or CPU processes sharing the stage's threads), or as one `srun --ntasks=N ...
//! --slurm-rank` inside a Slurm allocation. The ranks meet through `<work>/dist/` (emptied before
//! every launch), each writes its verdict to `<work>/dist/rank-R.json`, and this launcher turns
//! them into the stage's one verdict: rank 0's output when every rank succeeded.
//! Ctrl-C / SIGTERM / USR1 are forwarded to the ranks, which agree on the step to stop at;
//! rank 0 checkpoints. When one rank fails the others are killed after a short grace period
//! (a peer stuck in a collective never returns on its own).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kind::job::{Job, JobResult};
use crate::util::atomic;

/// Seconds the other ranks get to stop after one failed, before they are killed.
const FAIL_GRACE: Duration = Duration::from_secs(10);

/// How the ranks are started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Launcher {
    /// Child processes of this one (one machine).
    #[default]
    Local,
    /// One `srun` inside the Slurm allocation that runs this process.
    Srun,
}

/// What one rank reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankVerdict {
    /// Exit code (0, 1 or 130).
    pub code: i32,
    /// The rank's result (rank 0's output is the stage's).
    pub result: JobResult,
}

/// The rendezvous and verdict folder of a data-parallel job.
pub fn dist_dir(job: &Job) -> PathBuf {
    job.work_dir.join("dist")
}

/// Verdict file of rank `r`.
pub fn rank_file(job: &Job, r: usize) -> PathBuf {
    dist_dir(job).join(format!("rank-{r}.json"))
}

/// Write rank `r`'s verdict.
pub fn write_rank_verdict(job: &Job, r: usize, v: &RankVerdict) -> Result<()> {
    atomic::write_json(&rank_file(job, r), v)?;
    Ok(())
}

/// This process's rank under `srun` (`SLURM_PROCID`), checked against the job's world size.
pub fn slurm_rank(job: &Job) -> Result<usize> {
    let var = |k: &str| -> Result<usize> {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| {
                Error::stage(
                    &job.id,
                    format!("--slurm-rank: {k} is not set (is this process started by srun?)"),
                )
            })
    };
    let (rank, n) = (var("SLURM_PROCID")?, var("SLURM_NTASKS")?);
    if n != job.ranks {
        return Err(Error::stage(
            &job.id,
            format!("srun started {n} tasks, the job has {} ranks", job.ranks),
        ));
    }
    Ok(rank)
}

/// The device of a rank under `srun`: with one visible GPU it is `cuda:0`, with several the
/// task's local id picks one.
pub fn slurm_device(device: &str) -> String {
    if !device.starts_with("cuda") {
        return device.to_string();
    }
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default();
    let n = visible.split(',').filter(|s| !s.trim().is_empty()).count();
    let local: usize = std::env::var("SLURM_LOCALID")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if n == 1 {
        "cuda:0".into()
    } else {
        format!("cuda:{local}")
    }
}

/// Start the ranks of `job` (its file is `job_file`), wait for them and return the stage's
/// verdict. `interrupted` is this process's signal flag.
pub fn launch(
    job: &Job,
    job_file: &Path,
    how: Launcher,
    interrupted: &AtomicBool,
    log: impl Fn(&str),
) -> Result<(i32, JobResult)> {
    let n = job.ranks;
    if !job.gpus.is_empty() && job.gpus.len() != n && how == Launcher::Local {
        return Err(Error::stage(
            &job.id,
            format!(
                "resources.ranks ({n}) must equal the GPUs the stage holds ({}); leave `ranks` \
                 out to get one rank per GPU",
                job.gpus.len()
            ),
        ));
    }
    let dir = dist_dir(job);
    if dir.exists() {
        fs_err::remove_dir_all(&dir)?;
    }
    fs_err::create_dir_all(&dir)?;
    let exe = std::env::current_exe()?;
    let t0 = Instant::now();
    let mut children: Vec<(String, Child)> = match how {
        Launcher::Local => {
            let threads = (job.threads / n).max(1);
            log(&format!(
                "data parallel: {n} ranks on this machine, {threads} thread(s) each{}",
                if job.gpus.is_empty() {
                    String::new()
                } else {
                    format!(", GPUs {:?}", job.gpus)
                }
            ));
            let mut v = Vec::with_capacity(n);
            for r in 0..n {
                let mut cmd = Command::new(&exe);
                cmd.arg("exec-stage")
                    .arg(job_file)
                    .arg("--rank")
                    .arg(r.to_string())
                    .stdin(Stdio::null())
                    .env("RAYON_NUM_THREADS", threads.to_string());
                if r > 0 {
                    // rank 0 logs to the stage log; the others to their own files
                    let f = fs_err::File::create(dir.join(format!("rank-{r}.log")))?;
                    let f: std::fs::File = f.into();
                    cmd.stdout(Stdio::from(f.try_clone()?))
                        .stderr(Stdio::from(f));
                }
                if let Some(g) = job.gpus.get(r) {
                    cmd.env("CUDA_VISIBLE_DEVICES", g.to_string());
                }
                crate::util::proc::die_with_parent(&mut cmd);
                v.push((format!("rank {r}"), cmd.spawn()?));
            }
            v
        }
        Launcher::Srun => {
            log(&format!("data parallel: srun --ntasks={n}"));
            let mut cmd = Command::new("srun");
            cmd.arg(format!("--ntasks={n}"))
                // a failed rank's peers get a minute to notice before srun ends them (not
                // --kill-on-bad-exit: an interrupted rank exits 130 while rank 0 may still
                // be writing its checkpoint)
                .arg("--wait=60")
                .arg("--label")
                .arg(&exe)
                .arg("exec-stage")
                .arg(job_file)
                .arg("--slurm-rank")
                .stdin(Stdio::null());
            crate::util::proc::die_with_parent(&mut cmd);
            let child = cmd
                .spawn()
                .map_err(|e| Error::stage(&job.id, format!("could not start srun: {e}")))?;
            vec![("srun".to_string(), child)]
        }
    };
    let signal = match how {
        Launcher::Local => libc::SIGTERM,
        // srun forwards USR1 to its tasks; the ranks treat it like SIGTERM
        Launcher::Srun => libc::SIGUSR1,
    };
    let mut forwarded = false;
    let mut failed_at: Option<Instant> = None;
    let mut statuses: Vec<Option<std::process::ExitStatus>> = vec![None; children.len()];
    while statuses.iter().any(Option::is_none) {
        if interrupted.load(Ordering::SeqCst) && !forwarded {
            forwarded = true;
            for ((_, c), st) in children.iter().zip(&statuses) {
                if st.is_none() {
                    // SAFETY: plain syscall on our own child.
                    unsafe {
                        libc::kill(c.id() as i32, signal);
                    }
                }
            }
        }
        for (i, (_, c)) in children.iter_mut().enumerate() {
            if statuses[i].is_none() {
                if let Some(st) = c.try_wait()? {
                    if !matches!(st.code(), Some(0) | Some(130)) && failed_at.is_none() {
                        failed_at = Some(Instant::now());
                    }
                    statuses[i] = Some(st);
                }
            }
        }
        if failed_at.is_some_and(|t| t.elapsed() >= FAIL_GRACE) {
            for ((_, c), st) in children.iter_mut().zip(&statuses) {
                if st.is_none() {
                    let _ = c.kill();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let secs = t0.elapsed().as_secs_f64();
    let status_text = children
        .iter()
        .zip(&statuses)
        .map(|((name, _), st)| format!("{name}: {}", st.expect("all finished")))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(combine(job, n, secs, &status_text))
}

/// The stage's verdict from the ranks' files.
fn combine(job: &Job, n: usize, secs: f64, statuses: &str) -> (i32, JobResult) {
    let verdicts: Vec<Option<RankVerdict>> = (0..n)
        .map(|r| {
            std::fs::read(rank_file(job, r))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
        })
        .collect();
    let fail = |error: String| {
        (
            1,
            JobResult {
                output: None,
                error: Some(error),
                secs,
                device: job.device.clone(),
            },
        )
    };
    // a real failure first (an interrupted peer of a failed rank is not the story)
    for (r, v) in verdicts.iter().enumerate() {
        match v {
            None => {
                return fail(format!(
                    "rank {r} stopped without a verdict ({statuses}; see {})",
                    if r == 0 {
                        job.log_file()
                    } else {
                        dist_dir(job).join(format!("rank-{r}.log"))
                    }
                    .display()
                ))
            }
            Some(v) if v.code != 0 && v.code != 130 => {
                return fail(format!(
                    "rank {r}: {}",
                    v.result.error.clone().unwrap_or_default()
                ))
            }
            _ => {}
        }
    }
    let all: Vec<RankVerdict> = verdicts.into_iter().flatten().collect();
    if all.iter().any(|v| v.code == 130) {
        return (
            130,
            JobResult {
                output: None,
                error: Some("interrupted".into()),
                secs,
                device: job.device.clone(),
            },
        );
    }
    let mut r0 = all.into_iter().next().expect("rank 0").result;
    r0.secs = secs;
    (0, r0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn job(dir: &Path) -> Job {
        Job {
            id: "pretrain".into(),
            kind: "pretrain".into(),
            key: "k".into(),
            config: serde_json::Value::Null,
            seed: 0,
            upstream: BTreeMap::new(),
            out_dir: dir.join("out"),
            work_dir: dir.to_path_buf(),
            pipeline_dir: dir.to_path_buf(),
            device: "cpu".into(),
            threads: 2,
            gpus: vec![],
            ranks: 2,
            dist: None,
        }
    }

    fn verdict(code: i32, error: Option<&str>, loss: f64) -> RankVerdict {
        let mut out = crate::kind::StageOutput::default();
        out.metrics.insert("loss".into(), loss);
        RankVerdict {
            code,
            result: JobResult {
                output: (code == 0).then_some(out),
                error: error.map(String::from),
                secs: 1.0,
                device: "cpu".into(),
            },
        }
    }

    #[test]
    fn ranks_combine_into_one_verdict() {
        let d = tempfile::tempdir().unwrap();
        let j = job(d.path());
        fs_err::create_dir_all(dist_dir(&j)).unwrap();
        // rank 1 missing: a failure naming it and its log
        write_rank_verdict(&j, 0, &verdict(0, None, 1.5)).unwrap();
        let (code, r) = combine(&j, 2, 2.0, "rank 1: signal 9");
        assert_eq!(code, 1);
        let e = r.error.unwrap();
        assert!(
            e.contains("rank 1 stopped without a verdict") && e.contains("rank-1.log"),
            "{e}"
        );
        // both fine: rank 0's output with the launcher's wall time
        write_rank_verdict(&j, 1, &verdict(0, None, 9.0)).unwrap();
        let (code, r) = combine(&j, 2, 2.0, "");
        assert_eq!(code, 0);
        assert_eq!(r.output.unwrap().metrics["loss"], 1.5);
        assert_eq!(r.secs, 2.0);
        // interrupted
        write_rank_verdict(&j, 1, &verdict(130, Some("interrupted"), 0.0)).unwrap();
        assert_eq!(combine(&j, 2, 2.0, "").0, 130);
        // a failure wins over an interruption
        write_rank_verdict(&j, 0, &verdict(1, Some("diverged"), 0.0)).unwrap();
        let (code, r) = combine(&j, 2, 2.0, "");
        assert_eq!(
            (code, r.error.unwrap()),
            (1, "rank 0: diverged".to_string())
        );
    }
}

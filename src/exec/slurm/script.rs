//! The sbatch script of one submission: a single stage, or the instances of one matrix stage as
//! a job array (element `i` runs the i-th job file). Resources map to `--cpus-per-task`, `--mem`,
//! `--time`, `--gpus`; site options add `--partition`, `--account`, `--qos` and extra flags.
//! Every job asks for `--signal=B:USR1@120 --requeue`: the script forwards USR1 to the stage,
//! which checkpoints and exits 130, and then requeues its own job, which resumes from that
//! checkpoint. SIGTERM (scancel, preemption) is forwarded too, so the stage checkpoints first.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::spec::{Resources, SlurmSite};

/// Seconds before the time limit at which Slurm sends USR1 to the batch script.
pub const SIGNAL_LEAD_SECS: u32 = 120;

/// Everything a script needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ScriptSpec {
    /// `--job-name`.
    pub name: String,
    /// Job files; more than one makes a job array.
    pub jobs: Vec<PathBuf>,
    /// `--output` (a single stage: its log; an array: `...%a...` for Slurm's own messages,
    /// while each element appends the stage's output to its own stage log).
    pub output: PathBuf,
    /// Resources of the stage (all elements of an array share them).
    pub resources: Resources,
    /// Site options.
    pub site: SlurmSite,
    /// The `cjepa` executable that runs `exec-stage`.
    pub exe: PathBuf,
    /// `--dependency=afterok:` job ids (`123` or `123_4`); empty for none.
    pub after_ok: Vec<String>,
    /// Data-parallel ranks: above 1 the job asks for `--ntasks` and the stage starts its ranks
    /// with `srun` inside the allocation.
    pub ranks: usize,
}

impl ScriptSpec {
    /// Whether this is a job array.
    pub fn is_array(&self) -> bool {
        self.jobs.len() > 1
    }

    /// CPUs per task (and threads of the stage): the stage's `cpus`, at least 1.
    pub fn cpus(&self) -> u32 {
        self.resources.cpus.max(1)
    }
}

/// The `#SBATCH` flags for resources and site options (without array and dependency).
pub fn resource_flags(r: &Resources, site: &SlurmSite) -> Result<Vec<String>> {
    let mut v = vec![format!("--cpus-per-task={}", r.cpus.max(1))];
    if r.gpus > 0 {
        v.push(format!("--gpus={}", r.gpus));
    }
    if let Some(gb) = r.mem_gb {
        if !(gb > 0.0 && gb.is_finite()) {
            return Err(Error::Usage(format!(
                "resources.mem_gb must be a positive number of GB (got {gb})"
            )));
        }
        v.push(format!("--mem={}M", (gb * 1024.0).ceil() as u64));
    }
    if let Some(t) = &r.time {
        check_value("resources.time", t)?;
        v.push(format!("--time={t}"));
    }
    for (name, val) in [
        ("partition", &site.partition),
        ("account", &site.account),
        ("qos", &site.qos),
    ] {
        if let Some(x) = val {
            check_value(&format!("slurm.{name}"), x)?;
            v.push(format!("--{name}={x}"));
        }
    }
    for x in &site.extra {
        check_value("slurm.extra", x)?;
        if !x.starts_with('-') {
            return Err(Error::Usage(format!(
                "slurm.extra items are sbatch flags such as `--constraint=a100`; `{x}` does not start with `-`"
            )));
        }
        v.push(x.clone());
    }
    Ok(v)
}

fn check_value(what: &str, x: &str) -> Result<()> {
    if x.trim().is_empty() || x.contains(['\n', '\r']) {
        return Err(Error::Usage(format!(
            "{what} must be one non-empty line (got {x:?})"
        )));
    }
    Ok(())
}

/// Quote for bash (single quotes).
fn q(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Render the script.
pub fn render(spec: &ScriptSpec) -> Result<String> {
    if spec.jobs.is_empty() {
        return Err(Error::Usage("internal: a Slurm script without jobs".into()));
    }
    let mut s = String::from("#!/bin/bash\n");
    let mut flag = |f: String| {
        s.push_str("#SBATCH ");
        s.push_str(&f);
        s.push('\n');
    };
    check_value("job name", &spec.name)?;
    flag(format!("--job-name={}", spec.name));
    flag(format!("--output={}", spec.output.display()));
    flag("--open-mode=append".into());
    for f in resource_flags(&spec.resources, &spec.site)? {
        flag(f);
    }
    if spec.ranks > 1 {
        flag(format!("--ntasks={}", spec.ranks));
    }
    flag(format!("--signal=B:USR1@{SIGNAL_LEAD_SECS}"));
    flag("--requeue".into());
    if spec.is_array() {
        let n = spec.jobs.len();
        match spec.site.array_throttle {
            Some(k) if k > 0 => flag(format!("--array=0-{}%{k}", n - 1)),
            _ => flag(format!("--array=0-{}", n - 1)),
        }
    }
    if !spec.after_ok.is_empty() {
        flag(format!("--dependency=afterok:{}", spec.after_ok.join(":")));
        // a failed parent cancels this job instead of leaving it pending forever
        flag("--kill-on-invalid-dep=yes".into());
    }
    s.push_str(
        "\n# Written by cjepa (Slurm executor): runs `cjepa exec-stage JOB.json`, which writes\n\
         # result.json, then exit_code (the verdict), into the job's work folder.\n",
    );
    s.push_str("set -u\n");
    s.push_str(&format!("CJEPA={}\n", q(&spec.exe.to_string_lossy())));
    s.push_str("JOBS=(\n");
    for j in &spec.jobs {
        s.push_str(&format!("  {}\n", q(&j.to_string_lossy())));
    }
    s.push_str(")\n");
    s.push_str("job=${JOBS[${SLURM_ARRAY_TASK_ID:-0}]}\n");
    s.push_str("work=$(dirname \"$job\")\n");
    if spec.is_array() {
        // Slurm's --output is shared by the pattern; the stage's own output goes to its log
        s.push_str("exec >>\"$work/stage.log\" 2>&1\n");
    }
    s.push_str(&format!(
        r#"echo "[slurm] job ${{SLURM_JOB_ID}} (array ${{SLURM_ARRAY_JOB_ID:-none}} task ${{SLURM_ARRAY_TASK_ID:-none}}) on $(hostname), restart ${{SLURM_RESTART_COUNT:-0}}, $(date -Is)"
# a requeued job starts clean: the verdict of its previous life is not this one's
rm -f "$work/exit_code" "$work/result.json"
export RAYON_NUM_THREADS={threads}
child=
requeue=0
# USR1 (time limit ahead) and TERM (scancel, preemption): the stage checkpoints and exits 130
trap 'requeue=1; [ -n "$child" ] && kill -USR1 "$child" 2>/dev/null' USR1
trap '[ -n "$child" ] && kill -TERM "$child" 2>/dev/null' TERM INT
"$CJEPA" exec-stage{srun} "$job" &
child=$!
while :; do
  wait "$child"
  rc=$?
  kill -0 "$child" 2>/dev/null || break
done
if [ "$rc" -eq 130 ] && [ "$requeue" -eq 1 ]; then
  echo "[slurm] stage checkpointed on USR1; requeueing job $SLURM_JOB_ID to resume"
  rm -f "$work/exit_code"
  scontrol requeue "$SLURM_JOB_ID" && exit 0
  echo "[slurm] scontrol requeue failed: the next cjepa run resumes from the checkpoint"
fi
exit "$rc"
"#,
        threads = spec.cpus(),
        srun = if spec.ranks > 1 { " --srun" } else { "" }
    ));
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(jobs: usize) -> ScriptSpec {
        ScriptSpec {
            name: "cjepa-p-train".into(),
            jobs: (0..jobs)
                .map(|i| PathBuf::from(format!("/s/work/k{i}/job.json")))
                .collect(),
            output: "/s/work/k0/stage.log".into(),
            resources: Resources {
                gpus: 2,
                cpus: 8,
                mem_gb: Some(1.5),
                time: Some("12:00:00".into()),
                ranks: 0,
            },
            site: SlurmSite {
                partition: Some("gpu".into()),
                account: Some("lab".into()),
                qos: Some("high".into()),
                extra: vec!["--constraint=a100".into()],
                array_throttle: Some(2),
            },
            exe: "/opt/it's/cjepa".into(),
            after_ok: vec![],
            ranks: 1,
        }
    }

    fn flags(s: &str) -> Vec<&str> {
        s.lines()
            .filter_map(|l| l.strip_prefix("#SBATCH "))
            .collect()
    }

    #[test]
    fn maps_resources_and_site_options() {
        let s = render(&spec(1)).unwrap();
        let f = flags(&s);
        for want in [
            "--job-name=cjepa-p-train",
            "--output=/s/work/k0/stage.log",
            "--cpus-per-task=8",
            "--gpus=2",
            "--mem=1536M",
            "--time=12:00:00",
            "--partition=gpu",
            "--account=lab",
            "--qos=high",
            "--constraint=a100",
            "--signal=B:USR1@120",
            "--requeue",
        ] {
            assert!(f.contains(&want), "missing {want} in {f:?}");
        }
        assert!(!s.contains("--array"), "one job is not an array");
        assert!(s.contains("RAYON_NUM_THREADS=8"));
        assert!(s.contains(r"CJEPA='/opt/it'\''s/cjepa'"), "quoted exe: {s}");
        assert!(s.contains("\"$CJEPA\" exec-stage \"$job\" &"));
        assert!(s.contains("kill -USR1 \"$child\""), "forwards USR1");
        assert!(s.contains("scontrol requeue \"$SLURM_JOB_ID\""));
        assert!(!s.contains("--ntasks"), "one task without data parallelism");
    }

    #[test]
    fn data_parallel_asks_for_one_task_per_rank_and_starts_them_with_srun() {
        let mut sp = spec(1);
        sp.ranks = 2;
        let s = render(&sp).unwrap();
        assert!(flags(&s).contains(&"--ntasks=2"), "{s}");
        assert!(s.contains("\"$CJEPA\" exec-stage --srun \"$job\" &"), "{s}");
    }

    #[test]
    fn matrix_is_an_array_with_throttle_and_dependencies() {
        let mut sp = spec(3);
        sp.after_ok = vec!["12".into(), "13_1".into()];
        let s = render(&sp).unwrap();
        let f = flags(&s);
        assert!(f.contains(&"--array=0-2%2"), "{f:?}");
        assert!(f.contains(&"--dependency=afterok:12:13_1"), "{f:?}");
        assert!(f.contains(&"--kill-on-invalid-dep=yes"));
        assert!(s.contains("'/s/work/k2/job.json'"));
        assert!(s.contains("exec >>\"$work/stage.log\" 2>&1"));
        sp.site.array_throttle = None;
        assert!(flags(&render(&sp).unwrap()).contains(&"--array=0-2"));
    }

    #[test]
    fn defaults_and_bad_values() {
        let r = Resources::default();
        let f = resource_flags(&r, &SlurmSite::default()).unwrap();
        assert_eq!(f, vec!["--cpus-per-task=1"]);
        let bad = SlurmSite {
            extra: vec!["constraint=a100".into()],
            ..Default::default()
        };
        let e = resource_flags(&r, &bad).unwrap_err().to_string();
        assert!(e.contains("does not start with `-`"), "{e}");
        let bad = SlurmSite {
            partition: Some("gpu\n#SBATCH --x".into()),
            ..Default::default()
        };
        assert!(resource_flags(&r, &bad).is_err());
        let r = Resources {
            mem_gb: Some(-1.0),
            ..Default::default()
        };
        assert!(resource_flags(&r, &SlurmSite::default()).is_err());
    }
}

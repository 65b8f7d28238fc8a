//! Job states from Slurm: one batched `squeue -h -r -t all -o '%i|%T|%e|%r' -j IDS` per poll,
//! with `scontrol show job -o ID` for ids the answer left out. Polls back off while nothing
//! changes. An empty or failed answer means "unknown", never "failed": the `exit_code` file the
//! job writes is the verdict, and a job counts as ended without one only when Slurm itself says
//! it ended (or no longer knows it). Accounting (`sacct`) is never needed.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

/// What Slurm says about one job (an array element is a job of its own: `123_4`).
#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    /// Pending, running, completing, requeued, suspended, ...: the state name and its reason.
    Active {
        /// Slurm state name (`PENDING`, `RUNNING`, ...).
        state: String,
        /// squeue's reason (`Resources`, `Dependency`, `BeginTime`, `None`).
        reason: String,
    },
    /// Ended (`COMPLETED`, `FAILED`, `CANCELLED`, `TIMEOUT`, `OUT_OF_MEMORY`, ...).
    Ended {
        /// Slurm state name.
        state: String,
        /// Reason, when Slurm gives one.
        reason: String,
        /// When it ended, if Slurm says.
        end: Option<chrono::NaiveDateTime>,
    },
    /// Slurm answered that it does not know the id (purged after `MinJobAge`).
    Gone,
    /// No usable answer (controller busy or down, commands missing).
    Unknown,
}

impl JobState {
    /// Whether the job is running now.
    pub fn is_running(&self) -> bool {
        matches!(self, JobState::Active { state, .. } if state == "RUNNING")
    }

    /// Short human text.
    pub fn describe(&self) -> String {
        match self {
            JobState::Active { state, reason } | JobState::Ended { state, reason, .. } => {
                if reason.is_empty() || reason == "None" {
                    state.clone()
                } else {
                    format!("{state} ({reason})")
                }
            }
            JobState::Gone => "no longer known to Slurm".into(),
            JobState::Unknown => "Slurm state unknown".into(),
        }
    }
}

/// Slurm states after which a job does not run again by itself.
const ENDED: &[&str] = &[
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "REVOKED",
    "SPECIAL_EXIT",
    "TIMEOUT",
];

fn classify(state: &str, reason: &str, end: &str) -> JobState {
    let state = state.trim().to_ascii_uppercase();
    // `CANCELLED by 0` in some versions
    let name = state.split_whitespace().next().unwrap_or("").to_string();
    if name.is_empty() {
        return JobState::Unknown;
    }
    if ENDED.contains(&name.as_str()) {
        JobState::Ended {
            state: name,
            reason: reason.trim().to_string(),
            end: parse_time(end),
        }
    } else {
        JobState::Active {
            state: name,
            reason: reason.trim().to_string(),
        }
    }
}

fn parse_time(s: &str) -> Option<chrono::NaiveDateTime> {
    chrono::NaiveDateTime::parse_from_str(s.trim(), "%Y-%m-%dT%H:%M:%S").ok()
}

/// Parse `squeue -h -r -o '%i|%T|%e|%r'` output into id -> state.
pub fn parse_squeue(out: &str) -> BTreeMap<String, JobState> {
    let mut m = BTreeMap::new();
    for line in out.lines() {
        let mut f = line.splitn(4, '|');
        let (Some(id), Some(state)) = (f.next(), f.next()) else {
            continue;
        };
        let end = f.next().unwrap_or("");
        let reason = f.next().unwrap_or("");
        let id = id.trim();
        if id.is_empty() {
            continue;
        }
        m.insert(id.to_string(), classify(state, reason, end));
    }
    m
}

/// Parse one `scontrol show job -o ID` answer (stdout, stderr, success).
pub fn parse_scontrol(stdout: &str, stderr: &str, ok: bool) -> JobState {
    if !ok || stdout.trim().is_empty() {
        return if stderr.contains("Invalid job id") {
            JobState::Gone
        } else {
            JobState::Unknown
        };
    }
    let field = |name: &str| {
        stdout
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
            .unwrap_or("")
            .to_string()
    };
    classify(&field("JobState"), &field("Reason"), &field("EndTime"))
}

/// The Slurm commands (names or paths), so a site can point at wrappers.
#[derive(Debug, Clone)]
pub struct Commands {
    /// `sbatch`.
    pub sbatch: String,
    /// `squeue`.
    pub squeue: String,
    /// `scontrol`.
    pub scontrol: String,
    /// `scancel`.
    pub scancel: String,
}

impl Default for Commands {
    fn default() -> Self {
        Commands {
            sbatch: "sbatch".into(),
            squeue: "squeue".into(),
            scontrol: "scontrol".into(),
            scancel: "scancel".into(),
        }
    }
}

/// At most this many ids per squeue call (command-line length).
const BATCH: usize = 200;
/// At most this many `scontrol show job` follow-ups per poll.
const FOLLOW_UPS: usize = 32;

/// States of `ids` (every id gets an answer, `Unknown` when Slurm gave none).
pub fn query(cmds: &Commands, ids: &[String]) -> BTreeMap<String, JobState> {
    let mut out: BTreeMap<String, JobState> = BTreeMap::new();
    for chunk in ids.chunks(BATCH) {
        let res = Command::new(&cmds.squeue)
            .args(["-h", "-r", "-t", "all", "-o", "%i|%T|%e|%r", "-j"])
            .arg(chunk.join(","))
            .output();
        if let Ok(o) = res {
            if o.status.success() {
                let got = parse_squeue(&String::from_utf8_lossy(&o.stdout));
                for id in chunk {
                    if let Some(s) = got.get(id) {
                        out.insert(id.clone(), s.clone());
                    }
                }
            }
        }
    }
    let missing: Vec<String> = ids
        .iter()
        .filter(|id| !out.contains_key(*id))
        .cloned()
        .collect();
    for (n, id) in missing.into_iter().enumerate() {
        let st = if n < FOLLOW_UPS {
            match Command::new(&cmds.scontrol)
                .args(["show", "job", "-o", &id])
                .output()
            {
                Ok(o) => parse_scontrol(
                    &String::from_utf8_lossy(&o.stdout),
                    &String::from_utf8_lossy(&o.stderr),
                    o.status.success(),
                ),
                Err(_) => JobState::Unknown,
            }
        } else {
            JobState::Unknown
        };
        out.insert(id, st);
    }
    out
}

/// When to ask Slurm next: `min` after a change, doubling up to `max` while nothing changes
/// (or while Slurm does not answer).
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    cur: Duration,
    next: Instant,
}

impl Backoff {
    /// A backoff between `min` and `max`; the first poll is due at once.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            cur: min,
            next: Instant::now(),
        }
    }

    /// Whether a poll is due.
    pub fn due(&self) -> bool {
        Instant::now() >= self.next
    }

    /// Record a poll: `changed` resets the interval, otherwise it doubles.
    pub fn polled(&mut self, changed: bool) {
        self.cur = if changed {
            self.min
        } else {
            (self.cur * 2).min(self.max)
        };
        self.next = Instant::now() + self.cur;
    }

    /// Make the next poll due at once (after scancel, a new submission).
    pub fn now(&mut self) {
        self.cur = self.min;
        self.next = Instant::now();
    }

    /// The current interval.
    pub fn interval(&self) -> Duration {
        self.cur
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_squeue_lines() {
        let out = "12_0|COMPLETED|2026-11-26T09:02:47|None\n12_1|RUNNING|2026-11-26T10:02:47|None\n\
                   12_2|PENDING|N/A|JobArrayTaskLimit\n13|CANCELLED by 0|2026-11-26T09:03:01|DependencyNeverSatisfied\n\ngarbage\n";
        let m = parse_squeue(out);
        assert_eq!(m.len(), 4);
        assert!(
            matches!(&m["12_0"], JobState::Ended { state, end: Some(_), .. } if state == "COMPLETED")
        );
        assert!(m["12_1"].is_running());
        assert_eq!(m["12_2"].describe(), "PENDING (JobArrayTaskLimit)");
        assert!(
            matches!(&m["13"], JobState::Ended { state, reason, .. } if state == "CANCELLED" && reason == "DependencyNeverSatisfied")
        );
    }

    #[test]
    fn requeued_and_completing_are_active() {
        for s in [
            "REQUEUED",
            "COMPLETING",
            "CONFIGURING",
            "SUSPENDED",
            "REQUEUE_HOLD",
        ] {
            assert!(
                matches!(classify(s, "", ""), JobState::Active { .. }),
                "{s}"
            );
        }
    }

    #[test]
    fn parses_scontrol_answers() {
        let ok =
            "JobId=5 JobName=x JobState=PENDING Reason=BeginTime Dependency=(null) EndTime=Unknown";
        assert_eq!(
            parse_scontrol(ok, "", true),
            JobState::Active {
                state: "PENDING".into(),
                reason: "BeginTime".into()
            }
        );
        assert_eq!(
            parse_scontrol("", "slurm_load_jobs error: Invalid job id specified", false),
            JobState::Gone
        );
        assert_eq!(
            parse_scontrol("", "Unable to contact slurm controller", false),
            JobState::Unknown
        );
        assert_eq!(parse_scontrol("", "", true), JobState::Unknown);
    }

    #[test]
    fn backoff_doubles_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        assert!(b.due());
        b.polled(false);
        assert_eq!(b.interval(), Duration::from_millis(200));
        b.polled(false);
        b.polled(false);
        assert_eq!(b.interval(), Duration::from_millis(350));
        b.polled(true);
        assert_eq!(b.interval(), Duration::from_millis(100));
        assert!(!b.due());
        b.now();
        assert!(b.due());
    }

    #[test]
    fn missing_commands_mean_unknown() {
        let cmds = Commands {
            squeue: "/nonexistent/squeue".into(),
            scontrol: "/nonexistent/scontrol".into(),
            ..Default::default()
        };
        let m = query(&cmds, &["1".into(), "2_3".into()]);
        assert_eq!(m["1"], JobState::Unknown);
        assert_eq!(m["2_3"], JobState::Unknown);
    }
}

//! The state of each stage of a plan against the store (fresh / stale / missing / failed /
//! running), with why, its checkpoint, its unfinished progress and its log: what `cjepa status`
//! prints and the HTML report draws.

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::kind::progress::Progress;
use crate::plan::Plan;
use crate::store::{Lookup, Store};

/// Where a stage stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    /// A stored, succeeded record of the current key.
    Fresh,
    /// An older record of the stage with another key (its inputs changed).
    Stale,
    /// Nothing stored for the stage.
    Missing,
    /// The stored record of the current key is failed.
    Failed,
    /// Unfinished progress while a run holds the store.
    Running,
}

impl State {
    /// `fresh`, `stale`, `missing`, `failed` or `running`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Fresh => "fresh",
            State::Stale => "stale",
            State::Missing => "missing",
            State::Failed => "failed",
            State::Running => "running",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One stage's state.
#[derive(Debug, Clone)]
pub struct StageState {
    /// Index into the plan's stages.
    pub index: usize,
    /// State.
    pub state: State,
    /// Why: the failed record's error, the fields changed since a stale record, or why a record
    /// found was not usable.
    pub why: Vec<String>,
    /// Step of the newest checkpoint in the work folder.
    pub checkpoint: Option<u64>,
    /// Progress of a stage that is not fresh and has not finished.
    pub progress: Option<Progress>,
    /// The stage log (`stage.log` in the work folder), when there is one.
    pub log: Option<PathBuf>,
}

/// The state of every stage of `plan`, in plan order.
pub fn stage_states(plan: &Plan, store: &Store) -> Result<Vec<StageState>> {
    (0..plan.stages.len())
        .map(|i| stage_state(plan, store, i))
        .collect()
}

/// The state of stage `i` of `plan`.
pub fn stage_state(plan: &Plan, store: &Store, i: usize) -> Result<StageState> {
    let s = &plan.stages[i];
    let work = store.work_dir(&s.key);
    let checkpoint = crate::kind::checkpoint::latest(&work.join("ckpt"))?.map(|c| c.step);
    let (state, why) = match store.lookup(&s.key)? {
        Lookup::Hit(_) => (State::Fresh, vec![]),
        Lookup::Failed(r) => (State::Failed, vec![r.error.unwrap_or_default()]),
        Lookup::Miss(reason) => match store.latest_key(&plan.pipeline.name, &s.inst.id)? {
            Some(old) if old != s.key => {
                let why = match store.get(&old)? {
                    Some(Ok(rec)) => crate::plan::key::explain(&rec.key_input, &s.key_input),
                    _ => vec!["previous record unreadable".into()],
                };
                (State::Stale, why)
            }
            _ => (State::Missing, reason.into_iter().collect()),
        },
    };
    let progress = (state != State::Fresh)
        .then(|| crate::kind::progress::read(&work.join("progress.json")))
        .flatten()
        .filter(|p| p.step < p.total);
    // a stage with unfinished progress while a run holds the store is that run's
    let state = match &progress {
        Some(_) if store.read_only().is_some() && state != State::Failed => State::Running,
        _ => state,
    };
    let log = Some(work.join("stage.log")).filter(|p| p.is_file());
    Ok(StageState {
        index: i,
        state,
        why,
        checkpoint,
        progress,
        log,
    })
}

/// The last `n` lines of a log file (lossy UTF-8), reading at most its last `max_bytes`.
pub fn log_tail(path: &Path, n: usize, max_bytes: u64) -> std::io::Result<Vec<String>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let from = len.saturating_sub(max_bytes);
    f.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<&str> = text.lines().collect();
    if from > 0 && !lines.is_empty() {
        // the first line read is cut
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(n);
    Ok(lines[skip..].iter().map(|l| l.to_string()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_keeps_the_last_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("stage.log");
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, &text).unwrap();
        assert_eq!(
            log_tail(&p, 3, 1 << 20).unwrap(),
            ["line 97", "line 98", "line 99"]
        );
        // a byte window that cuts a line drops the cut part
        let t = log_tail(&p, 100, 20).unwrap();
        assert_eq!(t, ["line 98", "line 99"]);
    }
}

//! In-stage checkpoints: `save(step, write)` writes into a temporary folder and renames it into
//! place, then points `LATEST` at it (also atomically); `load()` returns the newest complete one.
//! A stage saves every N steps or seconds (policy: [`Checkpointer::due`]), and on Ctrl-C / SIGTERM.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::util::atomic;

/// How often a training stage checkpoints: the params every checkpointing kind shares (flattened
/// into its own, or written out where a kind's defaults differ). Neither is hashed
/// ([`super::NON_SEMANTIC`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default)]
pub struct Cadence {
    /// Checkpoint every N steps (0 = by time only; not hashed).
    pub checkpoint_every: u64,
    /// Checkpoint every N seconds (not hashed).
    pub checkpoint_secs: u64,
}

impl Default for Cadence {
    fn default() -> Self {
        Cadence {
            checkpoint_every: 0,
            checkpoint_secs: 300,
        }
    }
}

impl Cadence {
    /// The cadence of a stage's resolved params, field by field (the default for a field they
    /// do not hold as a whole number, as the worker read them before this block).
    pub fn of(params: &serde_json::Value) -> Cadence {
        let d = Cadence::default();
        let field = |k: &str, or: u64| params.get(k).and_then(|v| v.as_u64()).unwrap_or(or);
        Cadence {
            checkpoint_every: field("checkpoint_every", d.checkpoint_every),
            checkpoint_secs: field("checkpoint_secs", d.checkpoint_secs),
        }
    }

    /// The checkpointer of a stage's work folder with this cadence.
    pub fn checkpointer(self, dir: impl Into<PathBuf>) -> Checkpointer {
        Checkpointer::new(dir, self.checkpoint_every, self.checkpoint_secs)
    }
}

/// A complete checkpoint on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Step it was taken at.
    pub step: u64,
    /// Folder holding the stage's files.
    pub path: PathBuf,
}

/// Checkpoints of one stage, in `<work>/ckpt/`.
#[derive(Debug)]
pub struct Checkpointer {
    dir: PathBuf,
    every_steps: u64,
    every: Duration,
    last: Instant,
    keep: usize,
}

impl Checkpointer {
    /// Checkpoints in `dir`, due every `every_steps` steps or `every_secs` seconds (0 = never by that rule).
    pub fn new(dir: impl Into<PathBuf>, every_steps: u64, every_secs: u64) -> Self {
        Checkpointer {
            dir: dir.into(),
            every_steps,
            every: Duration::from_secs(if every_secs == 0 {
                u64::MAX / 4
            } else {
                every_secs
            }),
            last: Instant::now(),
            keep: 2,
        }
    }

    /// The checkpoint folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a save is due after `step` (step count or time since the last save).
    pub fn due(&self, step: u64) -> bool {
        (self.every_steps > 0 && step % self.every_steps == 0) || self.last.elapsed() >= self.every
    }

    /// Save: `write` fills a fresh folder; it becomes visible only when complete.
    pub fn save(&mut self, step: u64, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        fs_err::create_dir_all(&self.dir)?;
        let name = format!("step-{step:012}");
        let tmp = self.dir.join(format!(".tmp-{name}"));
        if tmp.exists() {
            fs_err::remove_dir_all(&tmp)?;
        }
        fs_err::create_dir_all(&tmp)?;
        write(&tmp)?;
        let fin = self.dir.join(&name);
        if fin.exists() {
            fs_err::remove_dir_all(&fin)?;
        }
        fs_err::rename(&tmp, &fin)?;
        atomic::write(&self.dir.join("LATEST"), name.as_bytes())?;
        self.last = Instant::now();
        self.prune(&name)?;
        Ok(())
    }

    /// The newest complete checkpoint, if any.
    pub fn load(&self) -> Result<Option<Checkpoint>> {
        latest(&self.dir)
    }

    fn prune(&self, current: &str) -> Result<()> {
        let mut names: Vec<String> = fs_err::read_dir(&self.dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| n.starts_with("step-") || n.starts_with(".tmp-"))
            .collect();
        names.sort();
        let finals: Vec<&String> = names.iter().filter(|n| n.starts_with("step-")).collect();
        let drop_n = finals.len().saturating_sub(self.keep);
        for n in finals
            .into_iter()
            .take(drop_n)
            .chain(names.iter().filter(|n| n.starts_with(".tmp-")))
        {
            if n != current {
                let _ = fs_err::remove_dir_all(self.dir.join(n));
            }
        }
        Ok(())
    }
}

/// Newest complete checkpoint in `dir` (what `LATEST` names, if that folder exists).
pub fn latest(dir: &Path) -> Result<Option<Checkpoint>> {
    let Ok(name) = std::fs::read_to_string(dir.join("LATEST")) else {
        return Ok(None);
    };
    let name = name.trim();
    let path = dir.join(name);
    let step = name.strip_prefix("step-").and_then(|s| s.parse().ok());
    match step {
        Some(step) if path.is_dir() => Ok(Some(Checkpoint { step, path })),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_prune() {
        let d = tempfile::tempdir().unwrap();
        let mut c = Checkpointer::new(d.path().join("ckpt"), 2, 0);
        assert!(c.load().unwrap().is_none());
        assert!(c.due(4) && !c.due(3));
        for s in 1..=4 {
            c.save(s, |dir| Ok(fs_err::write(dir.join("x"), s.to_string())?))
                .unwrap();
        }
        let l = c.load().unwrap().unwrap();
        assert_eq!(l.step, 4);
        assert_eq!(std::fs::read_to_string(l.path.join("x")).unwrap(), "4");
        let n = std::fs::read_dir(d.path().join("ckpt")).unwrap().count();
        assert_eq!(n, 3, "two checkpoints + LATEST");
    }

    #[test]
    fn failed_write_leaves_previous() {
        let d = tempfile::tempdir().unwrap();
        let mut c = Checkpointer::new(d.path(), 1, 0);
        c.save(1, |_| Ok(())).unwrap();
        let r = c.save(2, |_| Err(crate::Error::Data("disk full".into())));
        assert!(r.is_err());
        assert_eq!(c.load().unwrap().unwrap().step, 1);
    }
}

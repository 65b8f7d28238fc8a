//! The submitted-jobs record: one entry per stage key in the sled tree `slurm_jobs`, from
//! submission until its verdict is imported. It is what lets `cjepa status` and the next
//! `cjepa run` pick up a detached run. A plain-JSON copy (`<store>/slurm/submitted.json`) lets
//! `cjepa cancel` find the jobs while a driver holds the store.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::exec::import::StageIdentity;
use crate::kind::job::Job;
use crate::store::Store;
use crate::util::atomic;

/// One submitted stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Submitted {
    /// Slurm job id as squeue prints it with `-r`: `123`, or `123_4` for an array element.
    pub job_id: String,
    /// The stage, for its record.
    pub stage: StageIdentity,
    /// Its job file (the work folder holds the verdict files).
    pub job_file: PathBuf,
    /// Slurm's own output for array elements (the stage's output is in the stage log).
    #[serde(default)]
    pub slurm_log: Option<PathBuf>,
    /// Keys of upstream stages that had not finished at submission: this job reads their
    /// results from their work folders, so they are imported only after it ended.
    #[serde(default)]
    pub waits_for: Vec<String>,
    /// Step of the checkpoint the stage resumes from, as it was at submission.
    #[serde(default)]
    pub resume_step: Option<u64>,
    /// Attempt number (retries resubmit).
    pub attempt: u32,
    /// Submission time.
    pub submitted: chrono::DateTime<chrono::Utc>,
    /// First time it was seen running.
    #[serde(default)]
    pub started: Option<chrono::DateTime<chrono::Utc>>,
    /// Submitted by `cjepa run --detach`.
    #[serde(default)]
    pub detached: bool,
}

impl Submitted {
    /// Read its job file.
    pub fn job(&self) -> Result<Job> {
        Job::read(&self.job_file)
    }

    /// The stage log.
    pub fn log(&self) -> PathBuf {
        self.job_file
            .parent()
            .map(|d| d.join("stage.log"))
            .unwrap_or_default()
    }
}

/// What `cjepa cancel` reads without the database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MirrorEntry {
    /// Slurm job id.
    pub job_id: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Instance id.
    pub stage_id: String,
    /// Stage key.
    pub key: String,
}

/// The `slurm_jobs` tree of an open store.
pub struct Jobs {
    tree: sled::Tree,
    mirror: PathBuf,
}

/// Path of the plain copy under a store folder.
pub fn mirror_path(store_root: &Path) -> PathBuf {
    store_root.join("slurm").join("submitted.json")
}

impl Jobs {
    /// Open the tree of `store`.
    pub fn open(store: &Store) -> Result<Jobs> {
        Ok(Jobs {
            tree: store.tree("slurm_jobs")?,
            mirror: mirror_path(store.root()),
        })
    }

    /// Every entry, oldest submission first (unreadable entries are dropped).
    pub fn all(&self) -> Result<Vec<Submitted>> {
        let mut v = Vec::new();
        let mut bad = Vec::new();
        for kv in self.tree.iter() {
            let (k, b) = kv?;
            match serde_json::from_slice::<Submitted>(&b) {
                Ok(s) => v.push(s),
                Err(_) => bad.push(k),
            }
        }
        for k in bad {
            self.tree.remove(k)?;
        }
        v.sort_by(|a, b| a.submitted.cmp(&b.submitted).then(a.job_id.cmp(&b.job_id)));
        Ok(v)
    }

    /// Add or replace entries (keyed by stage key).
    pub fn put_all(&self, subs: &[Submitted]) -> Result<()> {
        for s in subs {
            self.tree
                .insert(s.stage.key.as_bytes(), serde_json::to_vec(s)?)?;
        }
        self.sync()
    }

    /// Forget the entry of a stage key.
    pub fn remove(&self, key: &str) -> Result<()> {
        self.tree.remove(key.as_bytes())?;
        self.sync()
    }

    fn sync(&self) -> Result<()> {
        self.tree.flush()?;
        let entries: Vec<MirrorEntry> = self
            .all()?
            .into_iter()
            .map(|s| MirrorEntry {
                job_id: s.job_id,
                pipeline: s.stage.pipeline,
                stage_id: s.stage.id,
                key: s.stage.key,
            })
            .collect();
        atomic::write_json(&self.mirror, &entries)?;
        Ok(())
    }
}

/// The plain copy, for `cjepa cancel` (empty when there is none).
pub fn read_mirror(store_root: &Path) -> Result<Vec<MirrorEntry>> {
    match std::fs::read(mirror_path(store_root)) {
        Ok(b) => Ok(serde_json::from_slice(&b)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
        Err(e) => Err(e.into()),
    }
}

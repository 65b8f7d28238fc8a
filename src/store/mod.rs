//! The store: one sled database (`<store>/db`) with stage records, the invocation log, the
//! latest key per (pipeline, stage instance) and in-stage checkpoint pointers; artifacts as files
//! under `<store>/artifacts/<key[0..2]>/<key>/`. One process holds it at a time (`LOCK`).
//!
//! Commit protocol: artifacts are written to `tmp/`, renamed into place, and the record is
//! written last; a lookup is a hit only if the record succeeded and every artifact is present
//! with its recorded size. Nothing half-written is ever a hit.

pub mod artifacts;
pub mod lock;
pub mod record;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use record::{ArtifactEntry, Record, Status};

use crate::error::{Error, Result};

/// Result of a cache lookup.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// A complete, successful record with its artifacts.
    Hit(Box<Record>),
    /// A record exists but is failed.
    Failed(Box<Record>),
    /// No usable record; the string says why when something was found but unusable.
    Miss(Option<String>),
}

/// One `cjepa run` in the invocation log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invocation {
    /// Pipeline name.
    pub pipeline: String,
    /// Pipeline file.
    pub file: String,
    /// Start time.
    pub started: chrono::DateTime<chrono::Utc>,
    /// Stages: (instance id, key, cached).
    pub stages: Vec<(String, String, bool)>,
}

/// The open store (holds the lock until dropped).
pub struct Store {
    root: PathBuf,
    db: sled::Db,
    records: sled::Tree,
    invocations: sled::Tree,
    latest: sled::Tree,
    checkpoints: sled::Tree,
    _lock: lock::StoreLock,
}

impl Store {
    /// Open (creating if needed) the store at `root`, taking its lock. With `wait`, block until
    /// the holder releases it; otherwise fail at once naming the holder.
    pub fn open(root: &Path, wait: bool, purpose: &str) -> Result<Store> {
        fs_err::create_dir_all(root)?;
        let root = &root.canonicalize()?;
        let lock = lock::StoreLock::acquire(root, wait, purpose)?;
        let db = sled::Config::new()
            .path(root.join("db"))
            .open()
            .map_err(|e| Error::Store {
                path: root.to_path_buf(),
                msg: format!("cannot open the database: {e}"),
            })?;
        Ok(Store {
            root: root.to_path_buf(),
            records: db.open_tree("records")?,
            invocations: db.open_tree("invocations")?,
            latest: db.open_tree("latest")?,
            checkpoints: db.open_tree("checkpoints")?,
            db,
            _lock: lock,
        })
    }

    /// Store root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Artifact folder of a key.
    pub fn artifact_dir(&self, key: &str) -> PathBuf {
        artifacts::dir(&self.root, key)
    }

    /// Temporary output folder of a key (renamed into `artifact_dir` on success).
    pub fn tmp_dir(&self, key: &str) -> PathBuf {
        self.root.join("tmp").join(key)
    }

    /// Persistent work folder of a key (checkpoints, logs).
    pub fn work_dir(&self, key: &str) -> PathBuf {
        self.root.join("work").join(key)
    }

    /// Read a record; `Err(text)` if it exists but cannot be parsed.
    pub fn get(&self, key: &str) -> Result<Option<std::result::Result<Record, String>>> {
        Ok(self
            .records
            .get(key.as_bytes())?
            .map(|b| serde_json::from_slice::<Record>(&b).map_err(|e| e.to_string())))
    }

    /// Cache lookup with the hit rule. A corrupt record is dropped (reported in the miss reason).
    pub fn lookup(&self, key: &str) -> Result<Lookup> {
        match self.get(key)? {
            None => Ok(Lookup::Miss(None)),
            Some(Err(e)) => {
                self.records.remove(key.as_bytes())?;
                Ok(Lookup::Miss(Some(format!("corrupt record dropped ({e})"))))
            }
            Some(Ok(r)) if r.status == Status::Failed => Ok(Lookup::Failed(Box::new(r))),
            Some(Ok(r)) => match artifacts::verify(&self.artifact_dir(key), &r.artifacts) {
                Ok(()) => Ok(Lookup::Hit(Box::new(r))),
                Err(why) => Ok(Lookup::Miss(Some(why))),
            },
        }
    }

    /// Commit a finished stage: move `tmp` output into place, then write the record (last).
    pub fn commit(&self, mut rec: Record, out_dir: &Path) -> Result<Record> {
        let dst = self.artifact_dir(&rec.key);
        if dst.exists() {
            fs_err::remove_dir_all(&dst)?;
        }
        if out_dir.exists() {
            fs_err::create_dir_all(dst.parent().expect("has parent"))?;
            fs_err::rename(out_dir, &dst)?;
        } else {
            fs_err::create_dir_all(&dst)?;
        }
        rec.artifacts = artifacts::manifest(&dst)?;
        self.put(&rec)?;
        self.db.flush()?;
        Ok(rec)
    }

    /// Write a record as is (failed stages, imports, benchmarks).
    pub fn put(&self, rec: &Record) -> Result<()> {
        self.records
            .insert(rec.key.as_bytes(), serde_json::to_vec(rec)?)?;
        if rec.status == Status::Succeeded {
            self.latest
                .insert(latest_key(&rec.pipeline, &rec.stage_id), rec.key.as_bytes())?;
        }
        Ok(())
    }

    /// The last successful key of a (pipeline, stage instance).
    pub fn latest_key(&self, pipeline: &str, stage_id: &str) -> Result<Option<String>> {
        Ok(self
            .latest
            .get(latest_key(pipeline, stage_id))?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// Every record (corrupt ones skipped), in key order.
    pub fn records(&self) -> Result<Vec<Record>> {
        let mut v = Vec::new();
        for kv in self.records.iter() {
            let (_, b) = kv?;
            if let Ok(r) = serde_json::from_slice::<Record>(&b) {
                v.push(r);
            }
        }
        Ok(v)
    }

    /// Records whose key starts with `prefix`.
    pub fn find_prefix(&self, prefix: &str) -> Result<Vec<Record>> {
        let mut v = Vec::new();
        for kv in self.records.scan_prefix(prefix.as_bytes()) {
            let (_, b) = kv?;
            if let Ok(r) = serde_json::from_slice::<Record>(&b) {
                v.push(r);
            }
        }
        Ok(v)
    }

    /// Append to the invocation log.
    pub fn log_invocation(&self, inv: &Invocation) -> Result<()> {
        let id = self.db.generate_id()?;
        self.invocations
            .insert(id.to_be_bytes(), serde_json::to_vec(inv)?)?;
        self.db.flush()?;
        Ok(())
    }

    /// The invocation log, oldest first.
    pub fn invocations(&self) -> Result<Vec<Invocation>> {
        let mut v = Vec::new();
        for kv in self.invocations.iter() {
            let (_, b) = kv?;
            if let Ok(i) = serde_json::from_slice(&b) {
                v.push(i);
            }
        }
        Ok(v)
    }

    /// Remember the newest in-stage checkpoint of an unfinished stage.
    pub fn set_checkpoint(&self, key: &str, step: u64, path: &Path) -> Result<()> {
        let v = serde_json::json!({ "step": step, "path": path, "time": chrono::Utc::now() });
        self.checkpoints
            .insert(key.as_bytes(), serde_json::to_vec(&v)?)?;
        Ok(())
    }

    /// Forget a checkpoint pointer (the stage finished).
    pub fn clear_checkpoint(&self, key: &str) -> Result<()> {
        self.checkpoints.remove(key.as_bytes())?;
        Ok(())
    }

    /// The checkpoint step recorded for a key.
    pub fn checkpoint_step(&self, key: &str) -> Result<Option<u64>> {
        Ok(self
            .checkpoints
            .get(key.as_bytes())?
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["step"].as_u64()))
    }

    /// A named tree of the database for an executor's own bookkeeping (e.g. `slurm_jobs`: the
    /// submitted Slurm jobs not yet imported).
    pub fn tree(&self, name: &str) -> Result<sled::Tree> {
        Ok(self.db.open_tree(name)?)
    }

    /// Flush to disk.
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }
}

fn latest_key(pipeline: &str, stage_id: &str) -> Vec<u8> {
    format!("{pipeline}\u{0}{stage_id}").into_bytes()
}

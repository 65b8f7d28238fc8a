//! The store: one sled database (`<store>/db`) with stage records, the invocation log, the
//! latest key per (pipeline, stage instance) and in-stage checkpoint pointers; artifacts as files
//! under `<store>/artifacts/<key[0..2]>/<key>/`. One process holds it at a time (`LOCK`); the
//! holder keeps a readers' copy of the records ([`snapshot`]) so that `status`, `report`, `ls`
//! and `show` work while a run holds the store ([`Store::open_read`]).
//!
//! Beside it, [`feature_cache`]: the frozen features the evaluation stages share
//! (`<store>/cache/features/`).
//!
//! Commit protocol: artifacts are written to `tmp/`, renamed into place, and the record is
//! written last; a lookup is a hit only if the record succeeded and every artifact is present
//! with its recorded size. Nothing half-written is ever a hit.

pub mod artifacts;
pub mod feature_cache;
pub mod lock;
pub mod record;
pub mod snapshot;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use record::{ArtifactEntry, Record, Status};
pub use snapshot::Snapshot;

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

/// The open store: the database (holding the lock until dropped), or, from
/// [`Store::open_read`] while another process holds it, that process's readers' copy.
pub struct Store {
    root: PathBuf,
    backend: Backend,
}

enum Backend {
    Db(Box<Db>),
    ReadOnly { snap: Box<Snapshot>, holder: String },
}

struct Db {
    db: sled::Db,
    records: sled::Tree,
    invocations: sled::Tree,
    latest: sled::Tree,
    checkpoints: sled::Tree,
    /// The readers' copy, kept in memory and written by a background thread.
    mirror: std::sync::Arc<Mirror>,
    _lock: lock::StoreLock,
}

impl Drop for Db {
    fn drop(&mut self) {
        let _ = self.mirror.write_if_dirty();
    }
}

/// The readers' copy in memory. Changes mark it dirty; a background thread writes it at most
/// every [`MIRROR_PERIOD`] (so a burst of records costs one write, not one per record), and the
/// store writes it once more when it is closed.
struct Mirror {
    root: PathBuf,
    state: std::sync::Mutex<(Snapshot, bool)>,
}

/// How often the background thread looks for changes to write.
const MIRROR_PERIOD: std::time::Duration = std::time::Duration::from_millis(300);

impl Mirror {
    /// Start mirroring; `dirty` when the file on disk must be rewritten.
    fn start(root: &Path, snap: Snapshot, dirty: bool) -> std::sync::Arc<Mirror> {
        let m = std::sync::Arc::new(Mirror {
            root: root.to_path_buf(),
            state: std::sync::Mutex::new((snap, dirty)),
        });
        let weak = std::sync::Arc::downgrade(&m);
        std::thread::spawn(move || loop {
            std::thread::sleep(MIRROR_PERIOD);
            match weak.upgrade() {
                Some(m) => {
                    let _ = m.write_if_dirty();
                }
                None => break,
            }
        });
        m
    }

    fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut st.0);
        st.1 = true;
    }

    fn write_if_dirty(&self) -> Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.1 {
            st.0.written = Some(chrono::Utc::now());
            st.0.write(&self.root)?;
            st.1 = false;
        }
        Ok(())
    }
}

/// How long [`open_db`] waits for a closing database of this process to let go of its file.
const DB_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Open the sled database under `root`. The caller holds the store lock, so a database file
/// that is still locked belongs to a handle of this process that is closing (sled's background
/// thread lets go of the file a moment after the last handle is dropped): wait for it.
fn open_db(root: &Path) -> sled::Result<sled::Db> {
    let start = std::time::Instant::now();
    loop {
        match sled::Config::new().path(root.join("db")).open() {
            // (sled reports it as `ErrorKind::Other` with this text)
            Err(sled::Error::Io(e))
                if e.to_string().starts_with("could not acquire lock")
                    && start.elapsed() < DB_RELEASE_WAIT =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            r => return r,
        }
    }
}

impl Store {
    /// Open (creating if needed) the store at `root`, taking its lock. With `wait`, block until
    /// the holder releases it; otherwise fail at once naming the holder.
    pub fn open(root: &Path, wait: bool, purpose: &str) -> Result<Store> {
        fs_err::create_dir_all(root)?;
        let root = &root.canonicalize()?;
        let lock = lock::StoreLock::acquire(root, wait, purpose)?;
        Self::with_lock(root, lock)
    }

    /// Open the store for reading: like [`Store::open`] when it is free; while another process
    /// holds it, a read-only view of the records as that process last wrote them
    /// ([`Store::read_only`] says so). Fails only when it is held and has no readers' copy.
    pub fn open_read(root: &Path, purpose: &str) -> Result<Store> {
        fs_err::create_dir_all(root)?;
        let root = &root.canonicalize()?;
        match lock::StoreLock::try_acquire_reader(root, purpose)? {
            Ok(lock) => Self::with_lock(root, lock),
            Err(holder) => match Self::holders_snapshot(root) {
                Some(snap) => Ok(Store {
                    root: root.to_path_buf(),
                    backend: Backend::ReadOnly {
                        snap: Box::new(snap),
                        holder,
                    },
                }),
                None => Err(Error::StoreBusy(format!(
                    "the store {} is in use by {holder} (which keeps no readers' copy); wait for it to finish",
                    root.display()
                ))),
            },
        }
    }

    /// The holder's readers' copy. A holder that has just opened the store writes it within
    /// [`MIRROR_PERIOD`], so a missing copy is looked for again for a moment.
    fn holders_snapshot(root: &Path) -> Option<Snapshot> {
        let start = std::time::Instant::now();
        loop {
            match Snapshot::read(root) {
                Some(s) => return Some(s),
                None if start.elapsed() < 10 * MIRROR_PERIOD => {
                    std::thread::sleep(MIRROR_PERIOD / 6)
                }
                None => return None,
            }
        }
    }

    fn with_lock(root: &Path, lock: lock::StoreLock) -> Result<Store> {
        let db = open_db(root).map_err(|e| Error::Store {
            path: root.to_path_buf(),
            msg: format!("cannot open the database: {e}"),
        })?;
        let records = db.open_tree("records")?;
        let latest = db.open_tree("latest")?;
        let checkpoints = db.open_tree("checkpoints")?;
        let snap = snapshot_of(&records, &latest, &checkpoints)?;
        // the copy on disk is current unless missing: every change since went through a mirror
        let dirty = !Snapshot::path(root).exists();
        Ok(Store {
            root: root.to_path_buf(),
            backend: Backend::Db(Box::new(Db {
                mirror: Mirror::start(root, snap, dirty),
                records,
                invocations: db.open_tree("invocations")?,
                latest,
                checkpoints,
                db,
                _lock: lock,
            })),
        })
    }

    /// `Some((holder, written))` when this is a read-only view of a store another process holds.
    pub fn read_only(&self) -> Option<(&str, Option<chrono::DateTime<chrono::Utc>>)> {
        match &self.backend {
            Backend::Db(_) => None,
            Backend::ReadOnly { snap, holder } => Some((holder.as_str(), snap.written)),
        }
    }

    fn db(&self) -> Result<&Db> {
        match &self.backend {
            Backend::Db(d) => Ok(d),
            Backend::ReadOnly { holder, .. } => Err(Error::StoreBusy(format!(
                "the store {} is in use by {holder}; this command only reads it, so it cannot change it",
                self.root.display()
            ))),
        }
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
        match &self.backend {
            Backend::Db(d) => Ok(d
                .records
                .get(key.as_bytes())?
                .map(|b| serde_json::from_slice::<Record>(&b).map_err(|e| e.to_string()))),
            Backend::ReadOnly { snap, .. } => Ok(snap.records.get(key).cloned().map(Ok)),
        }
    }

    /// Cache lookup with the hit rule. A corrupt record is dropped (reported in the miss reason).
    pub fn lookup(&self, key: &str) -> Result<Lookup> {
        match self.get(key)? {
            None => Ok(Lookup::Miss(None)),
            Some(Err(e)) => {
                let d = self.db()?;
                d.records.remove(key.as_bytes())?;
                d.mirror.update(|m| {
                    m.records.remove(key);
                });
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
        let d = self.db()?;
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
        d.db.flush()?;
        Ok(rec)
    }

    /// Write a record as is (failed stages, imports, benchmarks).
    pub fn put(&self, rec: &Record) -> Result<()> {
        let d = self.db()?;
        d.records
            .insert(rec.key.as_bytes(), serde_json::to_vec(rec)?)?;
        if rec.status == Status::Succeeded {
            d.latest
                .insert(latest_key(&rec.pipeline, &rec.stage_id), rec.key.as_bytes())?;
        }
        d.mirror.update(|m| {
            if rec.status == Status::Succeeded {
                m.latest
                    .entry(rec.pipeline.clone())
                    .or_default()
                    .insert(rec.stage_id.clone(), rec.key.clone());
            }
            m.records.insert(rec.key.clone(), rec.clone());
        });
        Ok(())
    }

    /// The last successful key of a (pipeline, stage instance).
    pub fn latest_key(&self, pipeline: &str, stage_id: &str) -> Result<Option<String>> {
        match &self.backend {
            Backend::Db(d) => Ok(d
                .latest
                .get(latest_key(pipeline, stage_id))?
                .map(|b| String::from_utf8_lossy(&b).into_owned())),
            Backend::ReadOnly { snap, .. } => Ok(snap.latest_key(pipeline, stage_id)),
        }
    }

    /// Every record (corrupt ones skipped), in key order.
    pub fn records(&self) -> Result<Vec<Record>> {
        match &self.backend {
            Backend::Db(d) => {
                let mut v = Vec::new();
                for kv in d.records.iter() {
                    let (_, b) = kv?;
                    if let Ok(r) = serde_json::from_slice::<Record>(&b) {
                        v.push(r);
                    }
                }
                Ok(v)
            }
            Backend::ReadOnly { snap, .. } => Ok(snap.records.values().cloned().collect()),
        }
    }

    /// Records whose key starts with `prefix`.
    pub fn find_prefix(&self, prefix: &str) -> Result<Vec<Record>> {
        match &self.backend {
            Backend::Db(d) => {
                let mut v = Vec::new();
                for kv in d.records.scan_prefix(prefix.as_bytes()) {
                    let (_, b) = kv?;
                    if let Ok(r) = serde_json::from_slice::<Record>(&b) {
                        v.push(r);
                    }
                }
                Ok(v)
            }
            Backend::ReadOnly { snap, .. } => Ok(snap
                .records
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(_, r)| r.clone())
                .collect()),
        }
    }

    /// Append to the invocation log.
    pub fn log_invocation(&self, inv: &Invocation) -> Result<()> {
        let d = self.db()?;
        let id = d.db.generate_id()?;
        d.invocations
            .insert(id.to_be_bytes(), serde_json::to_vec(inv)?)?;
        d.db.flush()?;
        Ok(())
    }

    /// The invocation log, oldest first.
    pub fn invocations(&self) -> Result<Vec<Invocation>> {
        let mut v = Vec::new();
        for kv in self.db()?.invocations.iter() {
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
        let d = self.db()?;
        d.checkpoints
            .insert(key.as_bytes(), serde_json::to_vec(&v)?)?;
        d.mirror.update(|m| {
            m.checkpoints.insert(key.to_string(), step);
        });
        Ok(())
    }

    /// Forget a checkpoint pointer (the stage finished).
    pub fn clear_checkpoint(&self, key: &str) -> Result<()> {
        let d = self.db()?;
        d.checkpoints.remove(key.as_bytes())?;
        d.mirror.update(|m| {
            m.checkpoints.remove(key);
        });
        Ok(())
    }

    /// The checkpoint step recorded for a key.
    pub fn checkpoint_step(&self, key: &str) -> Result<Option<u64>> {
        match &self.backend {
            Backend::Db(d) => Ok(d
                .checkpoints
                .get(key.as_bytes())?
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["step"].as_u64())),
            Backend::ReadOnly { snap, .. } => Ok(snap.checkpoints.get(key).copied()),
        }
    }

    /// A named tree of the database for an executor's own bookkeeping (e.g. `slurm_jobs`: the
    /// submitted Slurm jobs not yet imported).
    pub fn tree(&self, name: &str) -> Result<sled::Tree> {
        Ok(self.db()?.db.open_tree(name)?)
    }

    /// Flush to disk, the readers' copy included (nothing to do on a read-only view).
    pub fn flush(&self) -> Result<()> {
        if let Backend::Db(d) = &self.backend {
            d.db.flush()?;
            d.mirror.write_if_dirty()?;
        }
        Ok(())
    }
}

/// The readers' copy of what the database holds now.
fn snapshot_of(
    records: &sled::Tree,
    latest: &sled::Tree,
    checkpoints: &sled::Tree,
) -> Result<Snapshot> {
    let mut snap = Snapshot::default();
    for kv in records.iter() {
        let (_, b) = kv?;
        if let Ok(r) = serde_json::from_slice::<Record>(&b) {
            snap.records.insert(r.key.clone(), r);
        }
    }
    for kv in latest.iter() {
        let (k, v) = kv?;
        let k = String::from_utf8_lossy(&k);
        if let Some((pipeline, stage)) = k.split_once('\u{0}') {
            snap.latest
                .entry(pipeline.to_string())
                .or_default()
                .insert(stage.to_string(), String::from_utf8_lossy(&v).into_owned());
        }
    }
    for kv in checkpoints.iter() {
        let (k, v) = kv?;
        if let Some(step) = serde_json::from_slice::<serde_json::Value>(&v)
            .ok()
            .and_then(|v| v["step"].as_u64())
        {
            snap.checkpoints
                .insert(String::from_utf8_lossy(&k).into_owned(), step);
        }
    }
    Ok(snap)
}

fn latest_key(pipeline: &str, stage_id: &str) -> Vec<u8> {
    format!("{pipeline}\u{0}{stage_id}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database still held by a closing handle of this process is waited for, not refused.
    #[test]
    fn opening_waits_for_a_closing_database() {
        let d = tempfile::tempdir().unwrap();
        let held = sled::Config::new()
            .path(d.path().join("db"))
            .open()
            .unwrap();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(held);
        });
        let started = std::time::Instant::now();
        let db = open_db(d.path()).unwrap();
        assert!(started.elapsed() >= std::time::Duration::from_millis(250));
        closer.join().unwrap();
        drop(db);
    }

    fn record(key: &str, stage: &str) -> Record {
        let now = chrono::Utc::now();
        Record {
            key: key.into(),
            pipeline: "p".into(),
            stage_id: stage.into(),
            kind: "command".into(),
            status: Status::Succeeded,
            config: serde_json::json!({}),
            key_input: serde_json::json!({}),
            metrics: [("top1".to_string(), 42.0)].into(),
            series: Default::default(),
            info: serde_json::json!({}),
            artifacts: vec![],
            artifacts_deleted: false,
            started: now,
            finished: now,
            secs: 0.0,
            error: None,
            provenance: Default::default(),
        }
    }

    #[test]
    fn readers_see_the_holders_records_while_it_holds_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let holder = Store::open(dir.path(), false, "test run").unwrap();
        assert!(holder.read_only().is_none());
        holder
            .commit(record("aa11", "first"), &dir.path().join("none"))
            .unwrap();
        holder.flush().unwrap();
        // a second open for writing fails at once, naming the holder
        let busy = Store::open(dir.path(), false, "second").err().unwrap();
        assert!(busy.to_string().contains("test run"), "{busy}");
        // a reader gets the holder's copy
        let r = Store::open_read(dir.path(), "reader").unwrap();
        let (who, written) = r.read_only().expect("read-only view");
        assert!(who.contains("test run") && written.is_some(), "{who}");
        assert_eq!(r.records().unwrap().len(), 1);
        assert!(matches!(r.lookup("aa11").unwrap(), Lookup::Hit(_)));
        assert_eq!(r.find_prefix("aa").unwrap()[0].metrics["top1"], 42.0);
        assert_eq!(r.latest_key("p", "first").unwrap().as_deref(), Some("aa11"));
        // ... which cannot write
        assert!(matches!(
            r.put(&record("bb22", "second")),
            Err(Error::StoreBusy(_))
        ));
        // a later commit of the holder reaches new readers
        holder.put(&record("bb22", "second")).unwrap();
        // written by the background thread within a moment (or at once by `flush`)
        std::thread::sleep(MIRROR_PERIOD * 3);
        let r2 = Store::open_read(dir.path(), "reader").unwrap();
        assert_eq!(r2.records().unwrap().len(), 2);
        assert_eq!(
            r.records().unwrap().len(),
            1,
            "a view does not change under its reader"
        );
        drop(holder);
        // once free, a reader opens the database itself
        let r3 = Store::open_read(dir.path(), "reader").unwrap();
        assert!(r3.read_only().is_none());
        assert_eq!(r3.records().unwrap().len(), 2);
    }
}

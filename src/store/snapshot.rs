//! The readers' copy of the store: `<store>/snapshot.json`, rewritten (write to a temporary file,
//! then rename) by the process that holds the store within a moment of every change to its
//! records or checkpoint pointers (see `Mirror` in the parent module). While a run holds the store, `status`, `report`, `ls` and `show` read
//! this copy instead of failing on the lock, so one long run never blocks looking at results.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::record::Record;
use crate::error::Result;

/// File name under the store root.
pub const FILE: &str = "snapshot.json";

/// What the readers see.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// When the holder wrote it.
    pub written: Option<chrono::DateTime<chrono::Utc>>,
    /// Every readable record by key.
    pub records: BTreeMap<String, Record>,
    /// Latest successful key per `pipeline` -> stage instance id.
    pub latest: BTreeMap<String, BTreeMap<String, String>>,
    /// Step of the newest in-stage checkpoint per unfinished key.
    pub checkpoints: BTreeMap<String, u64>,
}

impl Snapshot {
    /// Path of the snapshot of the store at `root`.
    pub fn path(root: &Path) -> PathBuf {
        root.join(FILE)
    }

    /// Read the snapshot of the store at `root`; `None` when there is none (or it is unreadable,
    /// e.g. written by a different version).
    pub fn read(root: &Path) -> Option<Snapshot> {
        let bytes = std::fs::read(Self::path(root)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Write it atomically: readers see the old copy or the new one, never half of one.
    pub fn write(&self, root: &Path) -> Result<()> {
        let tmp = root.join(format!(".{FILE}.{}.tmp", std::process::id()));
        fs_err::write(&tmp, serde_json::to_vec(self)?)?;
        fs_err::rename(&tmp, Self::path(root))?;
        Ok(())
    }

    /// Latest successful key of a (pipeline, stage instance).
    pub fn latest_key(&self, pipeline: &str, stage_id: &str) -> Option<String> {
        self.latest.get(pipeline)?.get(stage_id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_round_trips_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Snapshot {
            written: Some(chrono::Utc::now()),
            ..Default::default()
        };
        s.latest
            .entry("p".into())
            .or_default()
            .insert("pretrain".into(), "abc".into());
        s.checkpoints.insert("abc".into(), 7);
        s.write(dir.path()).unwrap();
        assert_eq!(Snapshot::read(dir.path()), Some(s.clone()));
        assert_eq!(s.latest_key("p", "pretrain").as_deref(), Some("abc"));
        assert_eq!(s.latest_key("p", "other"), None);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![FILE.to_string()]);
    }

    #[test]
    fn a_missing_or_foreign_file_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Snapshot::read(dir.path()), None);
        std::fs::write(Snapshot::path(dir.path()), b"{\"records\": 3}").unwrap();
        assert_eq!(Snapshot::read(dir.path()), None);
    }
}

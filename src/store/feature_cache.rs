//! The feature cache beside the store: `<store>/cache/features/<digest>/`, one entry per
//! extraction (`features.safetensors`: `train` and `val`, each `(layers, images, dim)` f32;
//! `meta.json`: what the digest was computed from, the extraction's speed and the stage that
//! made it). What goes into the digest is the extracting code's business
//! (`stages::features`); this module only keeps entries whole.
//!
//! An entry is written into a temporary folder and renamed into place, so a reader never sees
//! half of one; when two stages race, the first rename wins and the other reads it. An entry
//! that cannot be read (a file missing, unparsable metadata or tensors) is a miss. `cjepa gc`
//! does not manage the cache folder; deleting it is always safe.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// Features file, in a cache entry and in a stage's artifacts.
pub const FEATURES_FILE: &str = "features.safetensors";
/// Description of a cache entry.
pub const META_FILE: &str = "meta.json";

/// Metadata written next to the features.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// What the digest was computed from.
    pub key_input: Value,
    /// Images per second of the extraction.
    pub images_per_sec: f64,
    /// Seconds the extraction took.
    pub secs: f64,
    /// Stage that computed the entry.
    pub stage: String,
}

/// One entry's contents, on the CPU.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Train features.
    pub train: Tensor,
    /// Val features.
    pub val: Tensor,
    /// Its metadata.
    pub meta: Meta,
    /// Its folder.
    pub dir: PathBuf,
}

/// The cache folder of one store.
#[derive(Debug, Clone)]
pub struct FeatureCache {
    dir: PathBuf,
}

impl FeatureCache {
    /// The cache of the store whose work folder `work_dir` is (`<store>/work/<key>`); `None`
    /// for a folder laid out otherwise.
    pub fn of_work_dir(work_dir: &Path) -> Option<FeatureCache> {
        match (work_dir.parent(), work_dir.parent().and_then(Path::parent)) {
            (Some(p), Some(root)) if p.file_name().is_some_and(|n| n == "work") => {
                Some(FeatureCache::of_store(root))
            }
            _ => None,
        }
    }

    /// The cache of the store at `root`.
    pub fn of_store(root: &Path) -> FeatureCache {
        FeatureCache {
            dir: root.join("cache").join("features"),
        }
    }

    /// `<store>/cache/features`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The entry of `digest`, if it is there whole.
    pub fn get(&self, digest: &str) -> Result<Option<Entry>> {
        read_entry(&self.dir.join(digest))
    }

    /// Write the entry of `digest` (temporary folder, then rename) and return it with `true`.
    /// When another writer got there first, its entry is returned instead, with `false`.
    pub fn put(
        &self,
        digest: &str,
        train: &Tensor,
        val: &Tensor,
        meta: Meta,
    ) -> Result<(Entry, bool)> {
        let dir = self.dir.join(digest);
        fs_err::create_dir_all(&self.dir)?;
        let tmp = self
            .dir
            .join(format!(".tmp-{digest}-{}", std::process::id()));
        if tmp.exists() {
            fs_err::remove_dir_all(&tmp)?;
        }
        fs_err::create_dir_all(&tmp)?;
        let mut map = HashMap::new();
        map.insert("train".to_string(), train.clone());
        map.insert("val".to_string(), val.clone());
        candle_core::safetensors::save(&map, tmp.join(FEATURES_FILE))?;
        crate::util::atomic::write_json(&tmp.join(META_FILE), &meta)?;
        if fs_err::rename(&tmp, &dir).is_err() {
            // Another stage finished the same entry first: use theirs.
            let _ = fs_err::remove_dir_all(&tmp);
            let theirs = read_entry(&dir)?.ok_or_else(|| Error::Store {
                path: self.dir.clone(),
                msg: format!("cannot move the features into {}", dir.display()),
            })?;
            return Ok((theirs, false));
        }
        let entry = Entry {
            train: train.clone(),
            val: val.clone(),
            meta,
            dir,
        };
        Ok((entry, true))
    }
}

/// An entry folder's contents; `None` when a file is missing or unreadable.
fn read_entry(dir: &Path) -> Result<Option<Entry>> {
    let (f, m) = (dir.join(FEATURES_FILE), dir.join(META_FILE));
    if !f.is_file() || !m.is_file() {
        return Ok(None);
    }
    let meta: Meta = match serde_json::from_slice(&fs_err::read(&m)?) {
        Ok(m) => m,
        Err(_) => return Ok(None),
    };
    let mut t = match candle_core::safetensors::load(&f, &Device::Cpu) {
        Ok(t) => t,
        Err(_) => return Ok(None),
    };
    let (Some(train), Some(val)) = (t.remove("train"), t.remove("val")) else {
        return Ok(None);
    };
    Ok(Some(Entry {
        train,
        val,
        meta,
        dir: dir.to_path_buf(),
    }))
}

/// Hard-link (or copy, where a link is impossible) an entry's features file into a stage's
/// artifact folder, so a result keeps its inputs after the cache is cleared.
pub fn link_into(entry_dir: &Path, out_dir: &Path) -> Result<()> {
    let src = entry_dir.join(FEATURES_FILE);
    let dst = out_dir.join(FEATURES_FILE);
    if dst.exists() {
        fs_err::remove_file(&dst)?;
    }
    if std::fs::hard_link(&src, &dst).is_err() {
        fs_err::copy(&src, &dst)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(stage: &str) -> Meta {
        Meta {
            key_input: serde_json::json!({"v": 1}),
            images_per_sec: 2.0,
            secs: 0.5,
            stage: stage.into(),
        }
    }

    #[test]
    fn the_store_of_a_work_folder() {
        let c = FeatureCache::of_work_dir(Path::new("/s/work/abc")).unwrap();
        assert_eq!(c.dir(), Path::new("/s/cache/features"));
        assert!(FeatureCache::of_work_dir(Path::new("/s/elsewhere/abc")).is_none());
    }

    #[test]
    fn an_entry_is_read_back_whole_and_a_broken_one_is_a_miss() {
        let d = tempfile::tempdir().unwrap();
        let c = FeatureCache::of_store(d.path());
        assert!(c.get("abc").unwrap().is_none());
        let train = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 3))
            .unwrap();
        let val = Tensor::ones((1, 1, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let (put, written) = c.put("abc", &train, &val, meta("a")).unwrap();
        assert!(written);
        let got = c.get("abc").unwrap().unwrap();
        assert_eq!(got.dir, put.dir);
        assert_eq!(got.meta.stage, "a");
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&got.train), flat(&train));
        assert_eq!(flat(&got.val), flat(&val));
        // a second writer of the same digest reads the first one's entry
        let (again, written) = c.put("abc", &val, &val, meta("b")).unwrap();
        assert!(!written);
        assert_eq!(again.meta.stage, "a");
        assert_eq!(flat(&again.train), flat(&train));
        // no temporary folder is left behind
        let names: Vec<_> = fs_err::read_dir(c.dir()).unwrap().collect();
        assert_eq!(names.len(), 1);
        // a missing metadata file is a miss, not an error
        fs_err::remove_file(put.dir.join(META_FILE)).unwrap();
        assert!(c.get("abc").unwrap().is_none());
    }

    #[test]
    fn linked_features_survive_the_cache() {
        let d = tempfile::tempdir().unwrap();
        let c = FeatureCache::of_store(&d.path().join("store"));
        let t = Tensor::zeros((1, 1, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let (e, _) = c.put("k", &t, &t, meta("a")).unwrap();
        let out = d.path().join("out");
        fs_err::create_dir_all(&out).unwrap();
        link_into(&e.dir, &out).unwrap();
        link_into(&e.dir, &out).unwrap();
        fs_err::remove_dir_all(c.dir()).unwrap();
        assert!(out.join(FEATURES_FILE).is_file());
    }
}

//! CLEVR v1.0 layout: `images/{train,val}/CLEVR_{split}_%06d.png` and
//! `scenes/CLEVR_{train,val}_scenes.json`, plus the VTAB Count / Dist labels.
//!
//! * Count: `n_objects - 3` (3..10 objects -> 0..7, 8 classes).
//! * Dist: `d = min over objects of pixel_coords[2]`, converted to **f32** (VTAB reads it through
//!   TFDS as float32); thresholds `[0, 8, 8.5, 9, 9.5, 10, 100]` in f32; label = the largest `i`
//!   with `thr[i] < d` (strict), so a depth exactly on a threshold goes to the lower bucket.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::check::{files_with_ext, probe_and_report, CheckOptions, CheckReport};
use super::DataError;

/// The two labelled splits.
pub const SPLITS: [&str; 2] = ["train", "val"];

/// VTAB closest-object-distance thresholds.
pub use crate::data::clevr_labels::DIST_THRESHOLDS;

/// Number of Count classes.
pub const COUNT_CLASSES: usize = 8;

/// Number of Dist classes.
pub const DIST_CLASSES: usize = 6;

/// `scenes/CLEVR_<split>_scenes.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClevrScenes {
    /// `{split, license, version, date}`.
    #[serde(default)]
    pub info: serde_json::Value,
    /// One entry per image.
    pub scenes: Vec<ClevrScene>,
}

/// One scene.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClevrScene {
    /// `train` / `val`.
    #[serde(default)]
    pub split: String,
    /// Index in the split.
    pub image_index: u64,
    /// File name inside `images/<split>/`.
    pub image_filename: String,
    /// The objects.
    pub objects: Vec<ClevrObject>,
    /// `behind/front/left/right` -> per object, indices of related objects.
    #[serde(default)]
    pub relationships: serde_json::Value,
    /// Unit vectors of the directions in world space.
    #[serde(default)]
    pub directions: serde_json::Value,
}

/// One object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClevrObject {
    /// Colour name.
    pub color: String,
    /// `large` / `small`.
    pub size: String,
    /// Rotation in degrees.
    #[serde(default)]
    pub rotation: f64,
    /// `cube` / `sphere` / `cylinder`.
    pub shape: String,
    /// World coordinates.
    #[serde(rename = "3d_coords")]
    pub coords_3d: [f64; 3],
    /// `rubber` / `metal`.
    pub material: String,
    /// `[px, py, depth]` (depth = camera-space distance); whole `px`/`py` are written as
    /// integers, as in the real files.
    #[serde(serialize_with = "ser_pixel_coords")]
    pub pixel_coords: [f64; 3],
}

fn ser_pixel_coords<S: serde::Serializer>(v: &[f64; 3], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeTuple;
    let mut t = s.serialize_tuple(3)?;
    for (k, x) in v.iter().enumerate() {
        if k < 2 && x.fract() == 0.0 && x.abs() < 1e15 {
            t.serialize_element(&(*x as i64))?;
        } else {
            t.serialize_element(x)?;
        }
    }
    t.end()
}

/// The two VTAB CLEVR tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClevrTask {
    /// Number of objects - 3.
    Count,
    /// Bucketed depth of the closest object.
    Dist,
}

impl ClevrTask {
    /// Number of classes of the task.
    pub fn num_classes(self) -> usize {
        match self {
            ClevrTask::Count => COUNT_CLASSES,
            ClevrTask::Dist => DIST_CLASSES,
        }
    }

    /// Label of a scene, `None` if the scene is outside the task's range.
    pub fn label(self, scene: &ClevrScene) -> Option<usize> {
        match self {
            ClevrTask::Count => count_label(scene.objects.len()),
            ClevrTask::Dist => min_depth_f32(scene).and_then(dist_label),
        }
    }

    /// Why a scene has no label ([`ClevrTask::label`] is `None`).
    fn why_unlabelled(self, scene: &ClevrScene) -> String {
        match self {
            ClevrTask::Count => {
                format!("{} objects, CLEVR scenes have 3..=10", scene.objects.len())
            }
            ClevrTask::Dist => format!("closest depth {:?} outside (0, 100]", min_depth_f32(scene)),
        }
    }
}

/// `n_objects - 3` for 3..=10 objects, else `None` (the golden-tested [`crate::data::clevr_labels`] rule).
pub fn count_label(n_objects: usize) -> Option<usize> {
    crate::data::clevr_labels::count_label(n_objects)
        .ok()
        .map(usize::from)
}

/// Minimum over objects of `pixel_coords[2]`, each converted to f32 first (as TFDS does).
pub fn min_depth_f32(scene: &ClevrScene) -> Option<f32> {
    scene
        .objects
        .iter()
        .map(|o| o.pixel_coords[2] as f32)
        .reduce(f32::min)
}

/// Largest `i` with `DIST_THRESHOLDS[i] < d` (f32 compare); `None` for `d <= 0`, `d > 100` or NaN.
pub fn dist_label(d: f32) -> Option<usize> {
    // f32 -> f64 is exact, and the eval rule compares in f32 again
    crate::data::clevr_labels::dist_label(f64::from(d))
        .ok()
        .map(usize::from)
}

/// Accept the dataset root itself or a parent holding `CLEVR_v1.0/`.
pub fn resolve_root(path: &Path) -> PathBuf {
    super::root_or_inner(path, "CLEVR_v1.0", "scenes")
}

/// Path of `scenes/CLEVR_<split>_scenes.json`.
pub fn scenes_path(root: &Path, split: &str) -> PathBuf {
    root.join("scenes")
        .join(format!("CLEVR_{split}_scenes.json"))
}

impl ClevrScenes {
    /// Parse a scenes file.
    pub fn load(path: &Path) -> Result<Self, DataError> {
        DataError::read_json(path, "CLEVR scenes")
    }
}

/// One split of CLEVR.
#[derive(Debug, Clone, PartialEq)]
pub struct Clevr {
    /// Dataset root (`CLEVR_v1.0`).
    pub root: PathBuf,
    /// `train` or `val`.
    pub split: String,
    /// Scenes in file order.
    pub scenes: Vec<ClevrScene>,
}

impl Clevr {
    /// Load one split's scenes.
    pub fn open(path: &Path, split: &str) -> Result<Self, DataError> {
        let root = resolve_root(path);
        let sp = scenes_path(&root, split);
        if !sp.is_file() {
            return Err(DataError::layout(
                &sp,
                format!("missing CLEVR scenes file for split `{split}`"),
            ));
        }
        let scenes = ClevrScenes::load(&sp)?.scenes;
        Ok(Clevr {
            root,
            split: split.to_string(),
            scenes,
        })
    }

    /// Path of a scene's image.
    pub fn image_path(&self, scene: &ClevrScene) -> PathBuf {
        self.root
            .join("images")
            .join(&self.split)
            .join(&scene.image_filename)
    }

    /// `(image path, label)` for every scene; a scene without a valid label is an error.
    pub fn samples(&self, task: ClevrTask) -> Result<Vec<(PathBuf, usize)>, DataError> {
        self.scenes
            .iter()
            .map(|s| {
                let l = task.label(s).ok_or_else(|| {
                    DataError::invalid(
                        scenes_path(&self.root, &self.split),
                        format!("scene {} ({}) has no valid {task:?} label ({} objects, min depth {:?})", s.image_index, s.image_filename, s.objects.len(), min_depth_f32(s)),
                    )
                })?;
                Ok((self.image_path(s), l))
            })
            .collect()
    }
}

/// Check both splits: scenes parse, every scene's image exists and is readable, every image has
/// a scene, object counts and depths give valid labels.
pub(crate) fn check_layout(root: &Path, opts: &CheckOptions, report: &mut CheckReport) {
    for split in SPLITS {
        let sp = scenes_path(root, split);
        let idir = root.join("images").join(split);
        let missing = format!("missing CLEVR scenes file for split `{split}`");
        let Some(ClevrScenes { scenes, .. }) =
            report.load_or_report(&sp, missing, ClevrScenes::load)
        else {
            continue;
        };
        let on_disk = files_with_ext(&idir, &["png"]).unwrap_or_else(|_| {
            report.problem(&idir, "missing image folder");
            Vec::new()
        });
        let mut referenced = std::collections::HashSet::new();
        let mut present = Vec::new();
        let mut classes: BTreeMap<String, usize> = BTreeMap::new();
        for s in &scenes {
            let p = idir.join(&s.image_filename);
            referenced.insert(p.clone());
            if p.is_file() {
                present.push(p);
            } else {
                report.problem(
                    &p,
                    format!(
                        "image of scene {} missing (referenced by {})",
                        s.image_index,
                        sp.display()
                    ),
                );
            }
            for (task, tag) in [(ClevrTask::Count, "count"), (ClevrTask::Dist, "dist")] {
                match task.label(s) {
                    Some(l) => *classes.entry(format!("{tag}={l}")).or_default() += 1,
                    None => {
                        let why = task.why_unlabelled(s);
                        report.problem(&sp, format!("scene {}: {why}", s.image_index));
                    }
                }
            }
            if !s.split.is_empty() && s.split != split {
                report.problem(
                    &sp,
                    format!(
                        "scene {} says split `{}` in the `{split}` file",
                        s.image_index, s.split
                    ),
                );
            }
        }
        for p in &on_disk {
            if !referenced.contains(p) {
                report.problem(p, format!("image has no scene in {}", sp.display()));
            }
        }
        probe_and_report(&present, opts, report);
        report.count(split, on_disk.len(), scenes.len(), classes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_go_to_lower_bucket() {
        assert_eq!(dist_label(7.4), Some(0));
        assert_eq!(dist_label(8.0), Some(0));
        assert_eq!(dist_label(8.000_001), Some(1));
        assert_eq!(dist_label(8.5), Some(1));
        assert_eq!(dist_label(9.0), Some(2));
        assert_eq!(dist_label(9.5), Some(3));
        assert_eq!(dist_label(10.0), Some(4));
        assert_eq!(dist_label(10.5), Some(5));
        assert_eq!(dist_label(100.0), Some(5));
        assert_eq!(dist_label(100.5), None);
        assert_eq!(dist_label(0.0), None);
        assert_eq!(dist_label(f32::NAN), None);
        // 8.00000001 is > 8 in f64 but exactly 8.0 in f32 -> bucket 0.
        assert_eq!(dist_label(8.000_000_01_f64 as f32), Some(0));
    }

    #[test]
    fn count_labels() {
        assert_eq!(count_label(3), Some(0));
        assert_eq!(count_label(10), Some(7));
        assert_eq!(count_label(2), None);
        assert_eq!(count_label(11), None);
    }
}

//! CLEVR Count / Dist labels exactly as VTAB defines them
//! (`task_adaptation/data/clevr.py`: `count_all` and `closest_object_distance`).
//!
//! * Count: `n_objects - 3` (3..=10 objects -> 8 classes 0..=7).
//! * Dist: `d = min over objects of pixel_coords[2]` (camera depth), thresholds
//!   `[0, 8, 8.5, 9, 9.5, 10, 100]`; the label is the largest `i` with `thr[i] < d` (strict), so a
//!   depth exactly on a threshold goes to the lower bucket. VTAB reads the depths through TFDS as
//!   **float32** and compares in float32: 8.00000001 rounds to exactly 8.0 in f32 and gets label 0.
//!
//! The scenes file is the CLEVR_v1.0 `scenes/CLEVR_{split}_scenes.json` layout. Only the fields the
//! labels (and simple data inspection) need are parsed; `relationships`/`directions` are skipped.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Number of Clevr/Count classes (3..=10 objects).
pub const COUNT_NUM_CLASSES: usize = 8;
/// Number of Clevr/Dist classes.
pub const DIST_NUM_CLASSES: usize = 6;
/// VTAB `closest_object_distance` thresholds (exactly representable in f32).
pub const DIST_THRESHOLDS: [f32; 7] = [0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0];

/// Errors of the CLEVR label code; messages name the file / scene and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ClevrError {
    #[error("cannot read CLEVR scenes file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CLEVR scenes file {path} is not valid CLEVR_v1.0 scenes JSON ({source}); expected {{\"info\": .., \"scenes\": [{{\"image_index\", \"image_filename\", \"objects\": [{{\"pixel_coords\": [x, y, depth], ..}}]}}]}}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("Clevr/Count needs 3..=10 objects per scene, got {n_objects}; the scene is not from the standard CLEVR_v1.0 generator (--min_objects 3 --max_objects 10)")]
    CountOutOfRange { n_objects: usize },
    #[error("Clevr/Dist: minimum depth {depth} (as f32) is outside the VTAB range (0, 100]; check the scene's pixel_coords[2] values")]
    DepthOutOfRange { depth: f32 },
    #[error("CLEVR scene {image_index} ({image_filename}): {reason}")]
    Scene {
        image_index: u64,
        image_filename: String,
        reason: String,
    },
}

/// `scenes/CLEVR_{split}_scenes.json` under a CLEVR_v1.0 root.
pub fn scenes_path(clevr_root: &Path, split: &str) -> PathBuf {
    clevr_root
        .join("scenes")
        .join(format!("CLEVR_{split}_scenes.json"))
}

/// A whole CLEVR_v1.0 scenes file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClevrScenesFile {
    #[serde(default)]
    pub info: Option<ClevrInfo>,
    pub scenes: Vec<ClevrScene>,
}

/// The `info` block of a scenes file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClevrInfo {
    #[serde(default)]
    pub split: Option<String>,
    #[serde(default)]
    pub license: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub date: Option<String>,
}

/// One scene (image). `relationships` and `directions` are not parsed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClevrScene {
    #[serde(default)]
    pub split: Option<String>,
    pub image_index: u64,
    pub image_filename: String,
    pub objects: Vec<ClevrObject>,
}

/// One object of a scene.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClevrObject {
    #[serde(default)]
    pub color: String,
    #[serde(default)]
    pub size: String,
    #[serde(default)]
    pub shape: String,
    #[serde(default)]
    pub material: String,
    #[serde(default)]
    pub rotation: f64,
    #[serde(rename = "3d_coords", default)]
    pub coords_3d: [f64; 3],
    /// `[px, py, depth]`; `depth` is the camera-space depth used by Clevr/Dist.
    pub pixel_coords: [f64; 3],
}

/// Both VTAB labels of one scene.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClevrLabel {
    pub image_index: u64,
    pub image_filename: String,
    pub count_label: u8,
    pub dist_label: u8,
    pub n_objects: usize,
    /// The minimum depth as float32, i.e. the value VTAB compares with the thresholds.
    pub min_depth: f32,
}

/// Clevr/Count label: `n_objects - 3`, for 3..=10 objects.
pub fn count_label(n_objects: usize) -> Result<u8, ClevrError> {
    if !(3..=10).contains(&n_objects) {
        return Err(ClevrError::CountOutOfRange { n_objects });
    }
    Ok((n_objects - 3) as u8)
}

/// Clevr/Dist label of a minimum depth. The depth is converted to f32 first and compared in f32
/// (as VTAB does through TFDS): the largest `i` with `DIST_THRESHOLDS[i] < d`.
/// Depths `<= 0`, `> 100` or NaN are errors (VTAB would produce an out-of-range class).
pub fn dist_label(min_depth: f64) -> Result<u8, ClevrError> {
    let d = min_depth as f32;
    let label = DIST_THRESHOLDS.iter().rposition(|&t| t < d);
    match label {
        Some(i) if i < DIST_NUM_CLASSES => Ok(i as u8),
        _ => Err(ClevrError::DepthOutOfRange { depth: d }),
    }
}

/// Minimum object depth of a scene as f32 (f32 rounding is monotone, so this equals the f32 of
/// the f64 minimum and the minimum of the f32 depths TFDS stores). `None` for a scene without objects.
pub fn min_depth_f32(objects: &[ClevrObject]) -> Option<f32> {
    objects
        .iter()
        .map(|o| o.pixel_coords[2] as f32)
        .reduce(f32::min)
}

/// Labels of one scene.
pub fn label_scene(scene: &ClevrScene) -> Result<ClevrLabel, ClevrError> {
    let scene_err = |e: ClevrError| ClevrError::Scene {
        image_index: scene.image_index,
        image_filename: scene.image_filename.clone(),
        reason: e.to_string(),
    };
    let n_objects = scene.objects.len();
    let count = count_label(n_objects).map_err(scene_err)?;
    let min_depth = min_depth_f32(&scene.objects).ok_or_else(|| ClevrError::Scene {
        image_index: scene.image_index,
        image_filename: scene.image_filename.clone(),
        reason: "scene has no objects, so Clevr/Dist is undefined".to_string(),
    })?;
    let dist = dist_label(min_depth as f64).map_err(scene_err)?;
    Ok(ClevrLabel {
        image_index: scene.image_index,
        image_filename: scene.image_filename.clone(),
        count_label: count,
        dist_label: dist,
        n_objects,
        min_depth,
    })
}

/// Parse a CLEVR_v1.0 scenes JSON file.
pub fn load_scenes(path: &Path) -> Result<ClevrScenesFile, ClevrError> {
    let bytes = fs_err::read(path).map_err(|source| ClevrError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| ClevrError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Labels of every scene of a scenes file, in file order.
pub fn labels_from_scenes(path: &Path) -> Result<Vec<ClevrLabel>, ClevrError> {
    let file = load_scenes(path)?;
    file.scenes.iter().map(label_scene).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_labels() {
        assert_eq!(count_label(3).unwrap(), 0);
        assert_eq!(count_label(10).unwrap(), 7);
        assert!(count_label(2).is_err());
        assert!(count_label(11).is_err());
    }

    #[test]
    fn dist_thresholds_lower_bucket_and_f32() {
        assert_eq!(dist_label(7.9).unwrap(), 0);
        assert_eq!(dist_label(8.0).unwrap(), 0);
        // > 8 in f64 but exactly 8.0 in f32.
        assert_eq!(dist_label(8.00000001).unwrap(), 0);
        assert_eq!(dist_label(8.000001).unwrap(), 1);
        assert_eq!(dist_label(8.5).unwrap(), 1);
        assert_eq!(dist_label(9.0).unwrap(), 2);
        assert_eq!(dist_label(9.5).unwrap(), 3);
        assert_eq!(dist_label(10.0).unwrap(), 4);
        assert_eq!(dist_label(10.0001).unwrap(), 5);
        assert_eq!(dist_label(100.0).unwrap(), 5);
        assert!(dist_label(100.01).is_err());
        assert!(dist_label(0.0).is_err());
        assert!(dist_label(f64::NAN).is_err());
    }

    #[test]
    fn scene_min_depth_ties_and_empty() {
        let obj = |d: f64| ClevrObject {
            color: String::new(),
            size: String::new(),
            shape: String::new(),
            material: String::new(),
            rotation: 0.0,
            coords_3d: [0.0; 3],
            pixel_coords: [1.0, 2.0, d],
        };
        let mut scene = ClevrScene {
            split: None,
            image_index: 4,
            image_filename: "x.png".into(),
            objects: vec![obj(9.5), obj(11.0), obj(9.5), obj(12.0)],
        };
        let l = label_scene(&scene).unwrap();
        assert_eq!((l.count_label, l.dist_label, l.min_depth), (1, 3, 9.5));
        scene.objects.clear();
        let e = label_scene(&scene).unwrap_err().to_string();
        assert!(e.contains("x.png"), "{e}");
    }
}

//! Dataset presets from `registry/datasets/*.yaml`: where a public dataset lives by default, its
//! format, split sizes and expected layout. The cost estimate of `cjepa run --dry-run` takes its
//! image counts from here; a `registry/` folder on disk wins over the copies built into the binary.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::registry;

/// Size of one split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitSize {
    /// Images (frames, for video datasets).
    pub images: u64,
    /// Video sequences, for video datasets.
    #[serde(default)]
    pub sequences: Option<u64>,
}

/// One dataset preset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetPreset {
    /// Preset name (the file stem).
    pub name: String,
    /// Human name.
    pub title: String,
    /// `format:` of the dataset stage that reads it.
    pub format: String,
    /// Default location, with `${CJEPA_DATA:-/data}` as the one place to change.
    pub path: String,
    /// Folder names under which the dataset is usually found (to recognise a stage's `path`).
    #[serde(default)]
    pub dirnames: Vec<String>,
    /// Number of classes, where the dataset has them.
    #[serde(default)]
    pub classes: Option<u32>,
    /// Split name -> size.
    pub splits: BTreeMap<String, SplitSize>,
    /// Expected folder layout below `path`.
    pub layout: String,
    /// Where to get it.
    #[serde(default)]
    pub source: Option<String>,
}

impl DatasetPreset {
    /// Images of the training split.
    pub fn train_images(&self) -> Option<u64> {
        self.splits.get("train").map(|s| s.images)
    }
}

/// Load preset `name` (disk `registry/` at or above `start` first, then the embedded copy).
pub fn load(name: &str, start: &Path) -> Result<DatasetPreset, String> {
    let (v, src) = registry::load("datasets", name, start)?;
    serde_json::from_value(v).map_err(|e| format!("dataset preset `{name}` ({src:?}): {e}"))
}

/// Every dataset preset.
pub fn all(start: &Path) -> Result<Vec<DatasetPreset>, String> {
    registry::names("datasets", start)
        .iter()
        .map(|n| load(n, start))
        .collect()
}

/// The preset a dataset stage's `path` points at: its last folder name is one of a preset's
/// `dirnames` (or the preset's own default `path`), and the format agrees.
pub fn recognise(path: &str, format: &str, start: &Path) -> Option<DatasetPreset> {
    all(start)
        .ok()?
        .into_iter()
        .find(|d| points_at(d, path, format))
}

/// [`recognise`] among the presets built into the binary only (no `registry/` folder on disk
/// is consulted), for callers that have no pipeline location (reports from stored records).
pub fn recognise_embedded(path: &str, format: &str) -> Option<DatasetPreset> {
    registry::EMBEDDED
        .iter()
        .filter(|(rel, _)| rel.starts_with("datasets/"))
        .filter_map(|(_, text)| serde_yaml::from_str::<DatasetPreset>(text).ok())
        .find(|d| points_at(d, path, format))
}

fn points_at(d: &DatasetPreset, path: &str, format: &str) -> bool {
    let base = path
        .trim_end_matches(['/', '\\'])
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or("");
    d.format == format && (d.path == path || d.dirnames.iter().any(|n| n == base))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_presets_parse_and_are_recognised() {
        let none = Path::new("/nonexistent");
        let all = all(none).unwrap();
        assert_eq!(all.len(), 5);
        let inet = load("imagenet", none).unwrap();
        assert_eq!(inet.train_images(), Some(1_281_167));
        let d = recognise("${CJEPA_DATA:-/data}/imagenet", "imagefolder", none).unwrap();
        assert_eq!(d.name, "imagenet");
        assert_eq!(
            recognise("/mnt/x/ADEChallengeData2016/", "ade20k", none)
                .unwrap()
                .name,
            "ade20k"
        );
        assert!(recognise("/mnt/x/imagenet", "coco", none).is_none());
        assert_eq!(
            recognise_embedded("/data/ILSVRC2012", "imagefolder")
                .unwrap()
                .name,
            "imagenet"
        );
        assert!(recognise_embedded("/data/cifar10", "imagefolder").is_none());
    }
}

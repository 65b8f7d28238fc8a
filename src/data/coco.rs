//! MS-COCO 2017 instances: `annotations/instances_{train,val}2017.json` + `{train,val}2017/<file_name>`.
//!
//! Serde types follow the official format (EVALS.md §2.1). Category ids are not contiguous (COCO
//! uses 1..90 with gaps); [`CategoryMap`] maps them to `0..K` in sorted-id order and back.
//! Segmentations are polygons (`iscrowd = 0`) or RLE (`iscrowd = 1`, uncompressed in GT files).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::check::{probe_and_report, CheckOptions, CheckReport};
use super::DataError;

/// The two splits of the layout.
pub const SPLITS: [&str; 2] = ["train", "val"];

/// Top level of an instances JSON file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoFile {
    /// Free-form `info` block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
    /// `licenses` list (kept verbatim).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub licenses: Vec<serde_json::Value>,
    /// Images.
    pub images: Vec<CocoImage>,
    /// Object annotations.
    #[serde(default)]
    pub annotations: Vec<CocoAnnotation>,
    /// Categories (ids not contiguous).
    pub categories: Vec<CocoCategory>,
}

/// One `images[]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoImage {
    /// Image id (not contiguous).
    pub id: u64,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// File name inside `{split}2017/`.
    pub file_name: String,
    /// Other fields (`license`, `coco_url`, `date_captured`, ...), kept verbatim.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// One `categories[]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CocoCategory {
    /// Category id (COCO: 1..90 with gaps).
    pub id: u64,
    /// Name, e.g. `person`.
    pub name: String,
    /// Super-category, e.g. `person`.
    #[serde(default)]
    pub supercategory: String,
}

/// One `annotations[]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoAnnotation {
    /// Annotation id (COCO starts at 1; the evaluator relies on ids > 0).
    pub id: u64,
    /// Id of the image it belongs to.
    pub image_id: u64,
    /// Category id (not contiguous).
    pub category_id: u64,
    /// Polygons or RLE; absent in some files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<Segmentation>,
    /// Area as stored (polygon shoelace area or RLE pixel count); the evaluator never recomputes it.
    #[serde(default)]
    pub area: f64,
    /// `[x, y, width, height]`, 0-indexed, top-left origin.
    pub bbox: [f64; 4],
    /// 1 for crowd regions (RLE segmentation, ignored by the evaluator).
    #[serde(default)]
    pub iscrowd: u8,
}

/// A COCO segmentation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Segmentation {
    /// `[[x1, y1, x2, y2, ...], ...]`: one or more polygons, unioned.
    Polygons(Vec<Vec<f64>>),
    /// `{"size": [h, w], "counts": ...}`.
    Rle(Rle),
}

/// Run-length encoding of a mask (column-major runs starting with a run of zeros).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rle {
    /// `[height, width]`.
    pub size: [u32; 2],
    /// Runs (uncompressed) or the compressed string.
    pub counts: RleCounts,
}

/// RLE counts, uncompressed (GT files) or compressed (result files).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RleCounts {
    /// Run lengths.
    Uncompressed(Vec<u64>),
    /// pycocotools compressed string.
    Compressed(String),
}

impl CocoFile {
    /// Parse an instances JSON file.
    pub fn load(path: &Path) -> Result<Self, DataError> {
        DataError::read_json(path, "COCO instances")
    }

    /// Write as compact JSON (the way COCO ships it).
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        DataError::write_json(path, "COCO instances", self)
    }
}

/// Non-contiguous category ids <-> contiguous indices `0..K` (sorted-id order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CategoryMap {
    ids: Vec<u64>,
    index: HashMap<u64, usize>,
}

impl CategoryMap {
    /// Build from the `categories` list (duplicates are collapsed).
    pub fn new(categories: &[CocoCategory]) -> Self {
        let mut ids: Vec<u64> = categories.iter().map(|c| c.id).collect();
        ids.sort_unstable();
        ids.dedup();
        let index = ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        CategoryMap { ids, index }
    }
    /// Number of categories.
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    /// True if there are none.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    /// Category id -> contiguous index.
    pub fn to_contiguous(&self, category_id: u64) -> Option<usize> {
        self.index.get(&category_id).copied()
    }
    /// Contiguous index -> category id (for result files).
    pub fn to_category_id(&self, index: usize) -> Option<u64> {
        self.ids.get(index).copied()
    }
    /// Sorted category ids.
    pub fn ids(&self) -> &[u64] {
        &self.ids
    }
}

/// One split of a COCO dataset, indexed.
#[derive(Debug, Clone)]
pub struct CocoDataset {
    /// Dataset root.
    pub root: PathBuf,
    /// `train` or `val`.
    pub split: String,
    /// The parsed annotation file.
    pub file: CocoFile,
    /// Category id mapping.
    pub categories: CategoryMap,
    image_index: HashMap<u64, usize>,
    anns_by_image: HashMap<u64, Vec<usize>>,
}

impl CocoDataset {
    /// Path of `annotations/instances_{split}2017.json`.
    pub fn annotation_path(root: &Path, split: &str) -> PathBuf {
        root.join("annotations")
            .join(format!("instances_{split}2017.json"))
    }

    /// Image folder `{split}2017/`.
    pub fn image_dir(root: &Path, split: &str) -> PathBuf {
        root.join(format!("{split}2017"))
    }

    /// Load and index one split.
    pub fn open(root: &Path, split: &str) -> Result<Self, DataError> {
        let path = Self::annotation_path(root, split);
        if !path.is_file() {
            return Err(DataError::layout(&path, format!("missing COCO annotation file (expected annotations/instances_{split}2017.json)")));
        }
        let file = CocoFile::load(&path)?;
        let categories = CategoryMap::new(&file.categories);
        let image_index = file
            .images
            .iter()
            .enumerate()
            .map(|(i, im)| (im.id, i))
            .collect();
        let mut anns_by_image: HashMap<u64, Vec<usize>> = HashMap::new();
        for (i, a) in file.annotations.iter().enumerate() {
            anns_by_image.entry(a.image_id).or_default().push(i);
        }
        Ok(CocoDataset {
            root: root.to_path_buf(),
            split: split.to_string(),
            file,
            categories,
            image_index,
            anns_by_image,
        })
    }

    /// Image entry by id.
    pub fn image(&self, image_id: u64) -> Option<&CocoImage> {
        self.image_index
            .get(&image_id)
            .map(|&i| &self.file.images[i])
    }

    /// Path of an image file.
    pub fn image_path(&self, image: &CocoImage) -> PathBuf {
        Self::image_dir(&self.root, &self.split).join(&image.file_name)
    }

    /// Annotations of one image, in file order.
    pub fn annotations_for(&self, image_id: u64) -> impl Iterator<Item = &CocoAnnotation> + '_ {
        self.anns_by_image
            .get(&image_id)
            .into_iter()
            .flatten()
            .map(move |&i| &self.file.annotations[i])
    }
}

/// Check both splits: JSON parses, images exist and match their declared size, annotation ids
/// unique, image/category ids resolve, bbox/area/segmentation sane.
pub(crate) fn check_layout(root: &Path, opts: &CheckOptions, report: &mut CheckReport) {
    for split in SPLITS {
        let ann_path = CocoDataset::annotation_path(root, split);
        let missing = format!("missing COCO annotation file for split `{split}`");
        let Some(file) = report.load_or_report(&ann_path, missing, CocoFile::load) else {
            continue;
        };
        check_file(root, split, &ann_path, &file, opts, report);
    }
}

fn check_file(
    root: &Path,
    split: &str,
    ann_path: &Path,
    file: &CocoFile,
    opts: &CheckOptions,
    report: &mut CheckReport,
) {
    let img_dir = CocoDataset::image_dir(root, split);
    let mut images: HashMap<u64, &CocoImage> = HashMap::new();
    for im in &file.images {
        if images.insert(im.id, im).is_some() {
            report.problem(ann_path, format!("duplicate image id {}", im.id));
        }
    }
    let mut cats: HashMap<u64, &str> = HashMap::new();
    for c in &file.categories {
        if cats.insert(c.id, &c.name).is_some() {
            report.problem(ann_path, format!("duplicate category id {}", c.id));
        }
    }
    // Image files: existence + readable header + declared size.
    let paths: Vec<PathBuf> = file
        .images
        .iter()
        .map(|im| img_dir.join(&im.file_name))
        .collect();
    let mut present = Vec::new();
    let mut present_imgs = Vec::new();
    for (p, im) in paths.iter().zip(&file.images) {
        if p.is_file() {
            present.push(p.clone());
            present_imgs.push(im);
        } else {
            report.problem(
                p,
                format!(
                    "image file missing (image id {} in {})",
                    im.id,
                    ann_path.display()
                ),
            );
        }
    }
    let dims = probe_and_report(&present, opts, report);
    for ((p, im), d) in present.iter().zip(present_imgs).zip(dims) {
        if let Some((w, h)) = d {
            if (w, h) != (im.width, im.height) {
                report.problem(
                    p,
                    format!(
                        "image is {w}x{h} but image id {} declares {}x{} (width x height)",
                        im.id, im.width, im.height
                    ),
                );
            }
        }
    }
    let mut ann_ids = HashSet::new();
    let mut per_cat: BTreeMap<String, usize> = BTreeMap::new();
    for a in &file.annotations {
        let at = format!("annotation id {}", a.id);
        if a.id == 0 {
            report.problem(
                ann_path,
                format!("{at}: ids must start at 1 (COCOeval uses 0 for 'unmatched')"),
            );
        }
        if !ann_ids.insert(a.id) {
            report.problem(ann_path, format!("{at}: duplicate annotation id"));
        }
        let Some(im) = images.get(&a.image_id) else {
            report.problem(
                ann_path,
                format!("{at}: image_id {} is not in `images`", a.image_id),
            );
            continue;
        };
        match cats.get(&a.category_id) {
            Some(name) => *per_cat.entry(name.to_string()).or_default() += 1,
            None => report.problem(
                ann_path,
                format!("{at}: category_id {} is not in `categories`", a.category_id),
            ),
        }
        if let Some(msg) = bbox_problem(&a.bbox, im) {
            report.problem(ann_path, format!("{at}: bbox {:?} {msg}", a.bbox));
        }
        if !(a.area.is_finite() && a.area >= 0.0) {
            report.problem(
                ann_path,
                format!("{at}: area {} must be finite and >= 0", a.area),
            );
        }
        if let Some(msg) = segmentation_problem(a, im) {
            report.problem(ann_path, format!("{at}: {msg}"));
        }
    }
    report.count(split, file.images.len(), file.annotations.len(), per_cat);
}

fn bbox_problem(b: &[f64; 4], im: &CocoImage) -> Option<String> {
    let [x, y, w, h] = *b;
    if !b.iter().all(|v| v.is_finite()) {
        return Some("has non-finite values".into());
    }
    if w < 0.0 || h < 0.0 {
        return Some("has negative width/height (format is [x, y, width, height])".into());
    }
    // One pixel of slack: real COCO boxes sometimes overshoot the border slightly.
    if x < -1.0 || y < -1.0 || x + w > im.width as f64 + 1.0 || y + h > im.height as f64 + 1.0 {
        return Some(format!(
            "lies outside image {} ({}x{})",
            im.id, im.width, im.height
        ));
    }
    None
}

fn segmentation_problem(a: &CocoAnnotation, im: &CocoImage) -> Option<String> {
    match &a.segmentation {
        None => None,
        Some(Segmentation::Polygons(polys)) => {
            if a.iscrowd == 1 {
                return Some(
                    "iscrowd = 1 but segmentation is a polygon list (crowd regions use RLE)".into(),
                );
            }
            polys
                .iter()
                .find(|p| p.len() < 6 || p.len() % 2 != 0 || !p.iter().all(|v| v.is_finite()))
                .map(|p| {
                    format!(
                        "polygon with {} numbers: needs an even count >= 6 of finite coordinates",
                        p.len()
                    )
                })
        }
        Some(Segmentation::Rle(r)) => {
            if r.size != [im.height, im.width] {
                return Some(format!(
                    "RLE size {:?} differs from image [height, width] [{}, {}]",
                    r.size, im.height, im.width
                ));
            }
            match &r.counts {
                RleCounts::Uncompressed(c) => {
                    let sum: u64 = c.iter().sum();
                    let n = im.height as u64 * im.width as u64;
                    (sum != n)
                        .then(|| format!("RLE counts sum to {sum}, expected height*width = {n}"))
                }
                RleCounts::Compressed(s) => s
                    .is_empty()
                    .then(|| "empty compressed RLE string".to_string()),
            }
        }
    }
}
